//! Checks of a service's OpenAPI document that a generic validator may
//! pass over: each parameter is where the service reads it.

use serde_json::Value;

/// What is wrong with the parameters of `doc`: a path parameter its path
/// does not name (a query parameter described as a path one, say), or a
/// `{name}` of a path no parameter describes. Empty when nothing is.
pub fn parameter_problems(doc: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    let Some(paths) = doc["paths"].as_object() else {
        return vec!["no paths".to_owned()];
    };
    for (path, operations) in paths {
        let named: Vec<&str> = path
            .split('/')
            .filter_map(|part| part.strip_prefix('{')?.strip_suffix('}'))
            .collect();
        for (method, operation) in operations.as_object().into_iter().flatten() {
            let parameters = operation["parameters"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let in_path: Vec<&str> = parameters
                .iter()
                .filter(|p| p["in"] == "path")
                .filter_map(|p| p["name"].as_str())
                .collect();
            for name in &in_path {
                if !named.contains(name) {
                    problems.push(format!(
                        "{method} {path}: path parameter {name} is not in the path"
                    ));
                }
            }
            for name in &named {
                if !in_path.contains(name) {
                    problems.push(format!("{method} {path}: {{{name}}} has no path parameter"));
                }
            }
        }
    }
    problems
}
