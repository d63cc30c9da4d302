//! `docker-compose.yml`, the `Dockerfile` and docs/configuration.md
//! table, checked against what the release binaries actually read (their
//! `--help` lists every variable). Docker itself cannot run on this machine,
//! so this is the compose file's test: parsed, not started.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;

use anyhow::{ensure, Context};
use ticketing_tests::system::release_dir;
use yaml_serde::Value;

fn repo_file(name: &str) -> anyhow::Result<String> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(name);
    std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))
}

/// Every `[env: NAME=` of a binary's `--help` (and its subcommands').
fn variables_read_by(binary: &str, subcommands: &[&str]) -> anyhow::Result<BTreeSet<String>> {
    let mut names = BTreeSet::new();
    let mut runs: Vec<Vec<&str>> = vec![vec!["--help"]];
    runs.extend(subcommands.iter().map(|sub| vec![*sub, "--help"]));
    for args in runs {
        let output = Command::new(release_dir()?.join(binary))
            .args(&args)
            .output()?;
        ensure!(output.status.success(), "{binary} {args:?} failed");
        let help = String::from_utf8(output.stdout)?;
        for part in help.split("[env: ").skip(1) {
            let name = part.split(['=', ']']).next().unwrap_or_default();
            names.insert(name.to_owned());
        }
    }
    ensure!(!names.is_empty(), "{binary} --help names no variable");
    Ok(names)
}

fn service<'a>(compose: &'a Value, name: &str) -> anyhow::Result<&'a Value> {
    compose["services"]
        .get(name)
        .with_context(|| format!("no service {name}"))
}

fn environment(service: &Value) -> BTreeMap<String, String> {
    service["environment"]
        .as_mapping()
        .map(|map| {
            map.iter()
                .filter_map(|(k, v)| {
                    let value = match v {
                        Value::String(s) => s.clone(),
                        Value::Number(n) => n.to_string(),
                        Value::Bool(b) => b.to_string(),
                        _ => return None,
                    };
                    Some((k.as_str()?.to_owned(), value))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_sequence()
        .map(|seq| {
            seq.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn compose_runs_every_service_wired_as_make_up_wires_it() -> anyhow::Result<()> {
    let compose: Value = yaml_serde::from_str(&repo_file("docker-compose.yml")?)?;
    let names: BTreeSet<&str> = compose["services"]
        .as_mapping()
        .context("no services")?
        .keys()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(
        names,
        BTreeSet::from([
            "postgres",
            "kafka",
            "mongo",
            "command-api",
            "projector",
            "query-api",
            "prometheus",
            "grafana"
        ])
    );

    // Published on the same 127.0.0.1 ports as `make up`, each with a health check.
    let ports = [
        ("postgres", 5432),
        ("kafka", 9092),
        ("mongo", 27017),
        ("command-api", 8081),
        ("query-api", 8082),
        ("projector", 8083),
        ("prometheus", 9090),
        ("grafana", 3000),
    ];
    for (name, port) in ports {
        let svc = service(&compose, name)?;
        assert_eq!(
            strings(&svc["ports"]),
            [format!("127.0.0.1:{port}:{port}")],
            "{name}"
        );
        assert!(
            !strings(&svc["healthcheck"]["test"]).is_empty(),
            "{name} has a health check"
        );
    }

    // The services: one image from the Dockerfile's runtime stage, each
    // running its own binary, listening on its port, checked on /readyz.
    let dockerfile = repo_file("Dockerfile")?;
    assert!(dockerfile.contains(" AS build") && dockerfile.contains(" AS runtime"));
    let stores = BTreeMap::from([
        (
            "DATABASE_URL",
            "postgres://postgres@postgres:5432/ticketing",
        ),
        ("KAFKA_BROKERS", "kafka:19092"),
        ("MONGODB_URI", "mongodb://mongo:27017"),
    ]);
    let apps = [
        (
            "command-api",
            "COMMAND_API_ADDR",
            8081,
            &["migrate", "relay"][..],
            &["DATABASE_URL", "KAFKA_BROKERS"][..],
        ),
        (
            "projector",
            "PROJECTOR_ADDR",
            8083,
            &["replay"][..],
            &["KAFKA_BROKERS", "MONGODB_URI"][..],
        ),
        (
            "query-api",
            "QUERY_API_ADDR",
            8082,
            &[][..],
            &["MONGODB_URI"][..],
        ),
    ];
    for (name, addr_variable, port, subcommands, needs_stores) in apps {
        let svc = service(&compose, name)?;
        assert_eq!(svc["build"]["target"].as_str(), Some("runtime"), "{name}");
        assert_eq!(svc["image"].as_str(), Some("ticketing:latest"), "{name}");
        assert_eq!(strings(&svc["command"]), [name], "{name}");
        assert!(
            dockerfile.contains(&format!("target/release/{name}")),
            "the Dockerfile builds {name}"
        );
        let env = environment(svc);
        assert_eq!(
            env.get(addr_variable),
            Some(&format!("0.0.0.0:{port}")),
            "{name}"
        );
        assert!(
            strings(&svc["healthcheck"]["test"])
                .contains(&format!("http://127.0.0.1:{port}/readyz")),
            "{name} is healthy when ready"
        );
        // Only variables the binary reads: a misspelt one would be ignored.
        let read = variables_read_by(name, subcommands)?;
        let unknown: Vec<&String> = env
            .keys()
            .filter(|k| *k != "RUST_LOG" && !read.contains(*k))
            .collect();
        assert!(
            unknown.is_empty(),
            "{name} is given variables it never reads: {unknown:?}"
        );
        // Stores are reached by their compose service names.
        for variable in needs_stores {
            assert_eq!(
                env.get(*variable).map(String::as_str),
                stores.get(variable).copied(),
                "{name}"
            );
        }
    }
    let kafka = environment(service(&compose, "kafka")?);
    assert!(kafka["KAFKA_ADVERTISED_LISTENERS"].contains("INTERNAL://kafka:19092"));
    assert!(kafka["KAFKA_ADVERTISED_LISTENERS"].contains("EXTERNAL://127.0.0.1:9092"));

    // Start order: a service starts when what it needs is healthy.
    let needs = |name: &str| -> anyhow::Result<BTreeMap<String, String>> {
        Ok(service(&compose, name)?["depends_on"]
            .as_mapping()
            .map(|map| {
                map.iter()
                    .filter_map(|(k, v)| {
                        Some((k.as_str()?.to_owned(), v["condition"].as_str()?.to_owned()))
                    })
                    .collect()
            })
            .unwrap_or_default())
    };
    let healthy = |list: &[&str]| -> BTreeMap<String, String> {
        list.iter()
            .map(|n| ((*n).to_owned(), "service_healthy".to_owned()))
            .collect()
    };
    assert_eq!(needs("command-api")?, healthy(&["postgres", "kafka"]));
    // The relay inside command-api creates the topic the projector subscribes to.
    assert_eq!(needs("projector")?, healthy(&["command-api", "mongo"]));
    assert_eq!(needs("query-api")?, healthy(&["mongo"]));
    Ok(())
}

/// Prometheus scrapes the three services where compose runs them, and
/// Grafana loads the on-sale dashboard, whose queries name the series the
/// services write (docs/api.md, "Metrics").
#[test]
fn compose_scrapes_every_service_and_shows_the_on_sale_dashboard() -> anyhow::Result<()> {
    let compose: Value = yaml_serde::from_str(&repo_file("docker-compose.yml")?)?;
    // Every file a container mounts is in the repository.
    for name in ["prometheus", "grafana"] {
        for volume in strings(&service(&compose, name)?["volumes"]) {
            let local = volume.split(':').next().unwrap_or_default();
            let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join(local);
            ensure!(path.exists(), "{name} mounts {local}, which is missing");
        }
    }
    assert_eq!(
        service(&compose, "prometheus")?["depends_on"]
            .as_mapping()
            .map(|m| m.keys().filter_map(Value::as_str).collect::<BTreeSet<_>>()),
        Some(BTreeSet::from(["command-api", "projector", "query-api"]))
    );

    let prometheus: Value = yaml_serde::from_str(&repo_file("deploy/prometheus/prometheus.yml")?)?;
    let targets: BTreeMap<String, Vec<String>> = prometheus["scrape_configs"]
        .as_sequence()
        .context("no scrape_configs")?
        .iter()
        .filter_map(|job| {
            let name = job["job_name"].as_str()?.to_owned();
            let targets = job["static_configs"]
                .as_sequence()?
                .iter()
                .flat_map(|c| strings(&c["targets"]))
                .collect();
            Some((name, targets))
        })
        .collect();
    for (name, port) in [
        ("command-api", 8081),
        ("query-api", 8082),
        ("projector", 8083),
    ] {
        assert_eq!(
            targets.get(name),
            Some(&vec![format!("{name}:{port}")]),
            "{name}"
        );
        let env = environment(service(&compose, name)?);
        assert!(
            env.values().any(|v| v == &format!("0.0.0.0:{port}")),
            "{name} listens where Prometheus scrapes it"
        );
    }
    let datasource: Value = yaml_serde::from_str(&repo_file(
        "deploy/grafana/provisioning/datasources/prometheus.yml",
    )?)?;
    assert_eq!(
        datasource["datasources"][0]["url"].as_str(),
        Some("http://prometheus:9090")
    );

    let dashboard: serde_json::Value =
        serde_json::from_str(&repo_file("deploy/grafana/dashboards/on-sale.json")?)?;
    let queries: Vec<String> = dashboard["panels"]
        .as_array()
        .context("no panels")?
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_owned))
        .collect();
    for series in [
        "bookings_total",
        "http_request_duration_seconds_bucket",
        "relay_lag_events",
        "relay_lag_seconds",
        "projector_lag_events",
        "projector_parked_events",
        "sse_subscribers",
    ] {
        assert!(
            queries.iter().any(|q| q.contains(series)),
            "the dashboard shows no {series}: {queries:?}"
        );
    }
    assert!(queries
        .iter()
        .any(|q| q.contains("histogram_quantile(0.99") && q.contains("by (le")));
    Ok(())
}

#[test]
fn the_configuration_document_lists_every_variable_the_services_read() -> anyhow::Result<()> {
    let readme = repo_file("docs/configuration.md")?;
    let documented: BTreeSet<String> = readme
        .lines()
        .filter_map(|line| line.strip_prefix("| `"))
        .filter_map(|rest| rest.split('`').next())
        .filter(|name| name.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
        .map(str::to_owned)
        .collect();
    let mut read = variables_read_by("command-api", &["migrate", "relay"])?;
    read.extend(variables_read_by("projector", &["replay"])?);
    read.extend(variables_read_by("query-api", &[])?);
    let missing: Vec<&String> = read.difference(&documented).collect();
    assert!(
        missing.is_empty(),
        "docs/configuration.md lacks {missing:?}"
    );
    Ok(())
}
