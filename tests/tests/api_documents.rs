//! The two services' OpenAPI documents say exactly what the services do.
//! Each document must pass a real OpenAPI 3.1 validator, and a fuzzer that
//! builds requests from it (schemathesis: valid and invalid bodies, ids,
//! headers and query strings) must never be answered with a 5xx, a status
//! the operation does not list, a content type or header it does not
//! declare, or a body that breaks its schema. Both tools are pinned and
//! installed by `make tools` (`scripts/infra.sh api-checkers`).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context};
use serde_json::{json, Value};
use ticketing_tests::system::{System, SystemSettings};

/// The checks schemathesis makes of every answer. Left out:
/// `positive_data_acceptance`, since a request valid by its schema is still
/// refused for what no schema can say (a consistency token signed with
/// another key, an `Idempotency-Key` reused with another body, seats taken).
/// `ignored_auth` sends each operation that declares the `bearer` scheme
/// without the token and with a wrong one: it must be refused.
const CHECKS: &str = "not_a_server_error,status_code_conformance,content_type_conformance,\
                      response_headers_conformance,response_schema_conformance,\
                      negative_data_rejection,unsupported_method,missing_required_header,\
                      allow_header_conformance,ignored_auth";

fn checkers() -> anyhow::Result<PathBuf> {
    let bin = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.data/api-checkers/bin");
    ensure!(
        bin.join("schemathesis").exists() && bin.join("openapi-spec-validator").exists(),
        "the OpenAPI checkers are not installed in {}; run `make tools`",
        bin.display()
    );
    Ok(bin)
}

/// Where the documents and the checkers' files go.
fn checks_dir() -> anyhow::Result<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/api-checks");
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Runs a checker; its whole output when it fails.
fn run(program: &Path, args: &[&str]) -> anyhow::Result<String> {
    // Run in target/, where schemathesis keeps its example database.
    let output = Command::new(program)
        .current_dir(checks_dir()?)
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .with_context(|| format!("cannot run {}", program.display()))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    ensure!(
        output.status.success(),
        "{} {} failed:\n{text}",
        program.display(),
        args.join(" ")
    );
    Ok(text)
}

/// Ids of things that exist, given to the fuzzer as examples so that its
/// requests reach past "not found" into the routes' own logic.
struct Known {
    show_id: String,
    booking_id: String,
    user_id: String,
}

impl Known {
    /// A show of 30 seats in rows A to C, and a held booking of C10.
    async fn create(system: &System) -> anyhow::Result<Self> {
        let created: Value = system
            .http
            .post(format!("{}/shows", system.command_url))
            .json(&json!({
                "name": "Fuzz Night", "venue": "Blue Note", "starts_at": "2027-06-01T20:00:00Z",
                "sections": [{ "name": "Floor", "price_cents": 1000,
                    "rows": [{ "row": "A", "seats": 10 }, { "row": "B", "seats": 10 },
                             { "row": "C", "seats": 10 }] }]
            }))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let show_id = created["show_id"]
            .as_str()
            .context("no show_id")?
            .to_owned();
        let user_id = uuid::Uuid::new_v4().to_string();
        let booked: Value = system
            .http
            .post(format!("{}/bookings", system.command_url))
            .json(
                &json!({ "show_id": show_id, "user_id": user_id, "seats": ["C10"], "hold": true }),
            )
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let booking_id = booked["booking_id"]
            .as_str()
            .context("no booking_id")?
            .to_owned();
        Ok(Self {
            show_id,
            booking_id,
            user_id,
        })
    }

    /// Puts the ids into `doc` as examples of the parameters and body
    /// members that take them.
    fn add_examples_to(&self, doc: &mut Value) {
        let booking_paths = [
            "/bookings/{id}",
            "/bookings/{id}/confirm",
            "/bookings/{id}/cancel",
        ];
        if let Some(paths) = doc["paths"].as_object_mut() {
            for (path, operations) in paths.iter_mut() {
                let id = match path.as_str() {
                    p if booking_paths.contains(&p) => &self.booking_id,
                    "/users/{id}/bookings" => &self.user_id,
                    _ => &self.show_id,
                };
                for operation in operations
                    .as_object_mut()
                    .into_iter()
                    .flat_map(|o| o.values_mut())
                {
                    for parameter in operation["parameters"].as_array_mut().into_iter().flatten() {
                        if parameter["in"] == "path" && parameter["name"] == "id" {
                            parameter["example"] = json!(id);
                        }
                    }
                }
            }
        }
        // Only command-api's document has the schema (indexing a missing
        // member of a `Value` for writing would add it).
        if let Some(booking) = doc.pointer_mut("/components/schemas/NewBooking/properties") {
            booking["show_id"]["examples"] = json!([self.show_id]);
            booking["user_id"]["examples"] = json!([self.user_id]);
            booking["seats"]["examples"] = json!([["A1", "A2"], ["B5"]]);
        }
    }
}

/// Fetches the document `base` serves, with `known`'s ids as examples, and
/// saves it where the checkers read it.
async fn save_document(
    system: &System,
    base: &str,
    name: &str,
    known: &Known,
) -> anyhow::Result<PathBuf> {
    let mut doc: Value = system
        .http
        .get(format!("{base}/openapi.json"))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    known.add_examples_to(&mut doc);
    let path = checks_dir()?.join(format!("{name}.json"));
    std::fs::write(&path, serde_json::to_vec_pretty(&doc)?)?;
    Ok(path)
}

#[tokio::test]
async fn each_service_answers_only_what_its_document_says() -> anyhow::Result<()> {
    let bin = checkers()?;
    let system = System::start(SystemSettings::default()).await?;
    let known = Known::create(&system).await?;
    // A fixed seed makes a failure reproducible; API_FUZZ_SEED explores others.
    let seed = std::env::var("API_FUZZ_SEED").unwrap_or_else(|_| "20261202".to_owned());
    let examples = std::env::var("API_FUZZ_EXAMPLES").unwrap_or_else(|_| "40".to_owned());
    let services = [
        ("command-api", system.command_url.clone()),
        ("query-api", system.query_url.clone()),
    ];
    // A box-office operator's token (organizer and admin): every operation
    // is open to it, so the fuzzer reaches past the 401s and 403s.
    let authorization = format!(
        "Authorization: {}",
        ticketing_tests::auth::bearer(&ticketing_tests::auth::token(
            uuid::Uuid::new_v4(),
            &[
                ticketing_tests::auth::ORGANIZER,
                ticketing_tests::auth::ADMIN
            ],
        ))
    );
    for (name, base) in &services {
        let path = save_document(&system, base, name, &known).await?;
        let document = path.to_string_lossy();
        run(&bin.join("openapi-spec-validator"), &[&document])?;
        // The validator is alive: the mistake an earlier document made (a
        // query parameter described as a path one) is refused.
        let mut broken: Value = serde_json::from_slice(&std::fs::read(&path)?)?;
        let operation = broken["paths"]
            .as_object_mut()
            .and_then(|paths| paths.values_mut().next())
            .and_then(|operations| operations.as_object_mut()?.values_mut().next())
            .context("a document without operations")?;
        operation["parameters"] = serde_json::json!([
            { "name": "section", "in": "path", "required": true, "schema": { "type": "string" } }
        ]);
        let broken_path = path.with_extension("broken.json");
        std::fs::write(&broken_path, serde_json::to_vec(&broken)?)?;
        ensure!(
            run(
                &bin.join("openapi-spec-validator"),
                &[&broken_path.to_string_lossy()]
            )
            .is_err(),
            "the validator passed a path parameter that is not in its path"
        );
        let report = run(
            &bin.join("schemathesis"),
            &[
                "run",
                &document,
                "--url",
                base,
                "--checks",
                CHECKS,
                "--header",
                &authorization,
                "--max-examples",
                &examples,
                "--seed",
                &seed,
                "--workers",
                "4",
                "--no-color",
                "--suppress-health-check",
                "all",
            ],
        )?;
        println!("{name}:\n{report}");
    }
    system.stop().await
}
