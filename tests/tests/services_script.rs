//! `scripts/services.sh` (the second half of `make up`, and `make down`'s
//! first): the curl lines it prints carry a working token and book a seat
//! that the query side then shows booked, `token` prints tokens the running
//! system takes, a second `up` changes nothing, and `down` leaves none of
//! its processes running. It runs here on its own ports, database, topic
//! and directory, so it never meets a `make up` of the same machine.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use serde_json::Value;
use ticketing_tests::system::{free_addrs, isolated_env, release_dir};
use ticketing_tests::{mongodb_uri, unique_name, TestDatabase};

struct Script {
    env: Vec<(&'static str, String)>,
    dir: PathBuf,
}

impl Script {
    fn run(&self, verb: &str) -> anyhow::Result<Output> {
        self.run_with(verb, &[])
    }

    fn run_with(&self, verb: &str, args: &[&str]) -> anyhow::Result<Output> {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/services.sh");
        let output = Command::new("bash")
            .arg(script)
            .arg(verb)
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (*k, v.as_str())))
            .output()?;
        ensure!(
            output.status.success(),
            "services.sh {verb} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(output)
    }

    fn pids(&self) -> anyhow::Result<Vec<String>> {
        ["command-api", "projector", "query-api"]
            .iter()
            .map(|name| {
                std::fs::read_to_string(self.dir.join(format!("{name}.pid")))
                    .map(|p| p.trim().to_owned())
                    .with_context(|| format!("no pid file of {name}"))
            })
            .collect()
    }
}

/// Alive and not a zombie waiting for its parent: a zombie has no command
/// line.
fn alive(pid: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| !cmdline.is_empty())
}

/// The demo show a printed line names.
fn show_of(line: &str) -> Option<&str> {
    let (_, rest) = line.split_once(r#""show_id":""#)?;
    rest.split('"').next()
}

fn curl(line: &str) -> anyhow::Result<Value> {
    let output = Command::new("bash").arg("-c").arg(line).output()?;
    ensure!(output.status.success(), "{line} failed");
    serde_json::from_slice(&output.stdout).with_context(|| {
        format!(
            "{line} printed no JSON: {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

#[tokio::test]
async fn the_printed_curl_lines_book_a_seat_and_down_stops_everything() -> anyhow::Result<()> {
    let bin = release_dir()?;
    let db = TestDatabase::create().await?;
    let name = unique_name("services");
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/e2e-logs")
        .join(&name);
    let [command_addr, query_addr, projector_addr] = free_addrs()?;
    let projector_url = format!("http://{projector_addr}");
    let (command_url, query_origin) = (
        format!("http://{command_addr}"),
        format!("http://{query_addr}"),
    );
    let script = Script {
        env: [
            ("SERVICES_BIN", bin.display().to_string()),
            ("SERVICES_DIR", dir.display().to_string()),
            ("COMMAND_API_ADDR", command_addr),
            ("QUERY_API_ADDR", query_addr),
            ("PROJECTOR_ADDR", projector_addr),
        ]
        .into_iter()
        .chain(isolated_env(db.url(), &name))
        .collect(),
        dir,
    };
    let result = async {
        let up = script.run("up")?;
        let printed = String::from_utf8(up.stdout)?;
        let lines: Vec<&str> = printed.lines().filter(|l| l.starts_with("curl ")).collect();
        ensure!(lines.len() == 3, "three curl lines, not: {printed}");
        let pids = script.pids()?;

        let booked = curl(lines[0])?;
        ensure!(booked["status"] == "confirmed", "booking: {booked}");

        // Every service names each answer's request.
        for base in [&command_url, &query_origin, &projector_url] {
            let answer = reqwest::get(format!("{base}/healthz")).await?;
            ensure!(
                answer.headers().contains_key("x-request-id"),
                "{base}/healthz answered without X-Request-Id"
            );
        }

        // Each printed metrics address answers Prometheus's text format.
        let metrics = printed
            .lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix("metrics"))
            .context("no metrics line")?;
        let addresses: Vec<&str> = metrics.split_whitespace().collect();
        ensure!(addresses.len() == 3, "metrics line: {metrics}");
        for address in addresses {
            let answer = reqwest::get(address).await?;
            ensure!(
                answer.status() == 200,
                "{address} answered {}",
                answer.status()
            );
            let text = answer.text().await?;
            ensure!(
                text.contains("# TYPE http_requests_total counter"),
                "{address} is not Prometheus's format: {text}"
            );
        }

        // The printed seat map is a page, and command-api lets its origin
        // book from the browser.
        let seat_map = printed
            .lines()
            .map(str::trim)
            .find(|l| l.ends_with("/seatmap"))
            .context("no seat map line")?;
        let page = reqwest::get(seat_map).await?;
        ensure!(
            page.status() == 200
                && page.headers()["content-type"]
                    .to_str()?
                    .starts_with("text/html"),
            "the seat map answered {}",
            page.status()
        );
        let preflight = reqwest::Client::new()
            .request(reqwest::Method::OPTIONS, format!("{command_url}/bookings"))
            .header("Origin", &query_origin)
            .header("Access-Control-Request-Method", "POST")
            .header(
                "Access-Control-Request-Headers",
                "authorization,content-type,idempotency-key",
            )
            .send()
            .await?;
        ensure!(
            preflight
                .headers()
                .get("access-control-allow-origin")
                .and_then(|v| v.to_str().ok())
                == Some(query_origin.as_str()),
            "command-api does not let the seat map's origin book: {:?}",
            preflight.headers()
        );
        let elsewhere = reqwest::Client::new()
            .request(reqwest::Method::OPTIONS, format!("{command_url}/bookings"))
            .header("Origin", "http://elsewhere.example")
            .header("Access-Control-Request-Method", "POST")
            .send()
            .await?;
        ensure!(
            elsewhere
                .headers()
                .get("access-control-allow-origin")
                .is_none(),
            "command-api lets any origin book: {:?}",
            elsewhere.headers()
        );
        // No token in a copied line: the query side catches up in milliseconds.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let seats = curl(lines[1])?;
            let mine = curl(lines[2])?;
            if seats["seats"]["A1"] == "booked"
                && mine["bookings"][0]["booking_id"] == booked["booking_id"]
            {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "A1 never read as booked: {seats} {mine}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        // The printed lines need their token: without it, 401.
        let (without, _) = lines[2]
            .split_once(" -H 'Authorization")
            .context("the bookings line carries no token")?;
        let refused = curl(without)?;
        ensure!(refused["status"] == 401, "without a token: {refused}");
        // `token` makes tokens the system takes: an admin's reads the demo
        // buyer's bookings, another user's is refused them.
        let user = "6f1c0a52-3c0e-4d8e-9a53-2c1d5f0b7e11";
        for (roles, status) in [
            (&["--role", "admin"][..], Value::Null),
            (&[][..], 403.into()),
        ] {
            let other = uuid::Uuid::new_v4().to_string();
            let mut args = vec!["--sub", other.as_str(), "--ttl-secs", "60"];
            args.extend(roles);
            let token = String::from_utf8(script.run_with("token", &args)?.stdout)?;
            let read = curl(&format!(
                "{without} -H 'Authorization: Bearer {}'",
                token.trim()
            ))?;
            ensure!(
                read["status"] == status,
                "{roles:?} reading {user}'s bookings: {read}"
            );
        }

        // A second `up` keeps the same processes and the same demo show.
        let again = String::from_utf8(script.run("up")?.stdout)?;
        ensure!(script.pids()? == pids, "a second up restarted services");
        ensure!(
            again
                .lines()
                .find(|l| l.starts_with("curl "))
                .and_then(show_of)
                == show_of(lines[0]),
            "a second up made another demo show"
        );

        script.run("down")?;
        let running: Vec<&String> = pids.iter().filter(|p| alive(p)).collect();
        ensure!(running.is_empty(), "still running after down: {running:?}");
        anyhow::Ok(())
    }
    .await;
    if result.is_err() {
        let _ = script.run("down");
    }
    db.drop_database().await?;
    let mongo = mongodb::Client::with_uri_str(mongodb_uri()).await?;
    mongo.database(&name).drop().await?;
    result
}
