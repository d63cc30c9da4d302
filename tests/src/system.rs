//! The whole system as a user runs it: the release binaries of command-api
//! (with its relay), the projector and query-api, each a child process with
//! its own log file, over a fresh Postgres database, Kafka topic, consumer
//! group and MongoDB database. Tests drive it over public HTTP only; a
//! service can be SIGKILLed and started again on the same address.
//!
//! The binaries come from `cargo build --release` (`make test` builds them
//! first); a missing binary is an error, never a skip.

use std::collections::BTreeMap;
use std::fs::File;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use serde_json::Value;

use crate::{kafka_brokers, mongodb_uri, unique_name, TestDatabase};

/// One of the project's services.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Service {
    /// Writes, with the relay to Kafka in the same process.
    CommandApi,
    /// Kafka to MongoDB.
    Projector,
    /// Reads.
    QueryApi,
}

impl Service {
    fn binary(self) -> &'static str {
        match self {
            Self::CommandApi => "command-api",
            Self::Projector => "projector",
            Self::QueryApi => "query-api",
        }
    }

    /// A member of its `/readyz` answer that the others' lack: whoever
    /// answers on its port must be it.
    fn readyz_member(self) -> &'static str {
        match self {
            Self::CommandApi => "relay",
            Self::Projector => "projection",
            Self::QueryApi => "consistency_waiters",
        }
    }
}

/// Where `cargo build --release` put the binaries.
///
/// # Errors
/// When one of them is missing.
pub fn release_dir() -> anyhow::Result<PathBuf> {
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"),
        PathBuf::from,
    );
    let dir = target.join("release");
    for service in [Service::CommandApi, Service::Projector, Service::QueryApi] {
        let binary = dir.join(service.binary());
        ensure!(
            binary.is_file(),
            "{} is missing: build the release binaries first (`make test` does: \
             make release)",
            binary.display()
        );
    }
    Ok(dir)
}

/// `N` free ports on 127.0.0.1, free when asked (the services bind them
/// soon after), and all different: each is held until all are found, or
/// the port one gave back could be handed out again for the next.
///
/// # Errors
/// When there are not enough.
pub fn free_addrs<const N: usize>() -> anyhow::Result<[String; N]> {
    let listeners = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0").context("no free port"))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let addrs = listeners
        .iter()
        .map(|listener| Ok(listener.local_addr()?.to_string()))
        .collect::<anyhow::Result<Vec<String>>>()?;
    addrs
        .try_into()
        .map_err(|_| anyhow::anyhow!("not {N} addresses"))
}

/// The variables that give services a world of their own on the shared
/// servers: the database `database_url`, and a read-model database, topic
/// and consumer group all named `name`.
pub fn isolated_env(database_url: String, name: &str) -> Vec<(&'static str, String)> {
    vec![
        ("DATABASE_URL", database_url),
        ("KAFKA_BROKERS", kafka_brokers()),
        ("MONGODB_URI", mongodb_uri()),
        ("MONGODB_DATABASE", name.to_owned()),
        ("RELAY_TOPIC", name.to_owned()),
        ("PROJECTOR_TOPIC", name.to_owned()),
        ("PROJECTOR_GROUP", name.to_owned()),
    ]
}

/// Settings of a system under test.
#[derive(Debug, Clone)]
pub struct SystemSettings {
    /// `HOLD_SECS` of command-api.
    pub hold_secs: u64,
    /// More variables for every service, over the defaults.
    pub env: Vec<(&'static str, String)>,
}

impl Default for SystemSettings {
    fn default() -> Self {
        Self {
            hold_secs: 600,
            env: Vec::new(),
        }
    }
}

/// The running system.
pub struct System {
    /// Base URL of command-api.
    pub command_url: String,
    /// Base URL of query-api.
    pub query_url: String,
    /// Base URL of the projector's health endpoints.
    pub projector_url: String,
    /// An HTTP client for the tests, whose requests carry a box-office
    /// operator's token (organizer and admin); tests of who may do what
    /// send tokens of their own.
    pub http: reqwest::Client,
    db: Option<TestDatabase>,
    mongodb_database: String,
    env: Vec<(&'static str, String)>,
    bin: PathBuf,
    logs: PathBuf,
    children: Mutex<BTreeMap<Service, Child>>,
}

impl System {
    /// Starts the three services and waits until each is ready.
    ///
    /// # Errors
    /// When a server is unreachable or a service does not get ready.
    pub async fn start(settings: SystemSettings) -> anyhow::Result<Self> {
        let bin = release_dir()?;
        let db = TestDatabase::create().await?;
        let name = unique_name("e2e");
        let [command_addr, query_addr, projector_addr] = free_addrs()?;
        let mut env = isolated_env(db.url(), &name);
        env.extend([
            ("RELAY_PARTITIONS", "3".to_owned()),
            ("COMMAND_API_ADDR", command_addr.clone()),
            ("QUERY_API_ADDR", query_addr.clone()),
            ("PROJECTOR_ADDR", projector_addr.clone()),
            ("HOLD_SECS", settings.hold_secs.to_string()),
            ("SWEEP_EVERY_SECS", "1".to_owned()),
            // The seat map page, served by query-api, books on command-api.
            ("CORS_ALLOWED_ORIGINS", format!("http://{query_addr}")),
            ("COMMAND_API_URL", format!("http://{command_addr}")),
            ("RELAY_STANDBY_POLL_MS", "300".to_owned()),
            ("REPLAY_GRACE_SECS", "1".to_owned()),
            ("RUST_LOG", "info".to_owned()),
        ]);
        env.extend(crate::auth::service_env());
        env.extend(settings.env);
        let logs = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../target/e2e-logs")
            .join(&name);
        std::fs::create_dir_all(&logs).context("cannot create the log directory")?;
        let system = Self {
            command_url: format!("http://{command_addr}"),
            query_url: format!("http://{query_addr}"),
            projector_url: format!("http://{projector_addr}"),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .default_headers(crate::auth::staff_headers())
                .build()?,
            db: Some(db),
            mongodb_database: name,
            env,
            bin,
            logs,
            children: Mutex::new(BTreeMap::new()),
        };
        // command-api first: its relay creates the topic the projector
        // subscribes to by name.
        system.start_service(Service::CommandApi).await?;
        system.start_service(Service::Projector).await?;
        system.start_service(Service::QueryApi).await?;
        Ok(system)
    }

    /// Books (or holds, with `hold`) `seats` of `show` for a new buyer of
    /// its own, through command-api; fails unless the answer is a 201.
    ///
    /// # Errors
    /// Any other answer, or command-api unreachable.
    pub async fn book(
        &self,
        show: &str,
        seats: &[&str],
        hold: bool,
    ) -> anyhow::Result<crate::http::Answer> {
        let answer = crate::http::Answer::of(
            self.http
                .post(format!("{}/bookings", self.command_url))
                .json(
                    &serde_json::json!({"show_id": show, "user_id": uuid::Uuid::new_v4(),
                                          "seats": seats, "hold": hold}),
                )
                .send()
                .await?,
        )
        .await?;
        ensure!(
            answer.status == reqwest::StatusCode::CREATED,
            "booking {seats:?}: {} {}",
            answer.status,
            answer.body
        );
        Ok(answer)
    }

    /// POSTs `body` to command-api's `path`, with `key` as its
    /// Idempotency-Key when given, and reads whatever answer comes.
    ///
    /// # Errors
    /// command-api unreachable, or an answer that is not read whole.
    pub async fn post(
        &self,
        path: &str,
        body: &Value,
        key: Option<&str>,
    ) -> anyhow::Result<crate::http::Answer> {
        let mut request = self
            .http
            .post(format!("{}{path}", self.command_url))
            .json(body);
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        crate::http::Answer::of(request.send().await?).await
    }

    /// Creates a show of `sections`, each `(name, rows of (row, seats))`,
    /// through command-api, and waits until query-api has it.
    ///
    /// # Errors
    /// Any answer but a 201, or the show not readable within 15 s.
    pub async fn create_show(&self, sections: &[(&str, &[(&str, u32)])]) -> anyhow::Result<String> {
        let sections: Vec<Value> = sections
            .iter()
            .map(|(name, rows)| {
                let rows: Vec<Value> = rows
                    .iter()
                    .map(|(row, seats)| serde_json::json!({"row": row, "seats": seats}))
                    .collect();
                serde_json::json!({"name": name, "price_cents": 5000, "rows": rows})
            })
            .collect();
        let created = crate::http::Answer::of(
            self.http
                .post(format!("{}/shows", self.command_url))
                .json(&serde_json::json!({"name": "Live", "venue": "Hall",
                    "starts_at": "2027-05-01T19:00:00Z", "sections": sections}))
                .send()
                .await?,
        )
        .await?;
        ensure!(
            created.status == reqwest::StatusCode::CREATED,
            "POST /shows: {} {}",
            created.status,
            created.body
        );
        let show = created.body["show_id"]
            .as_str()
            .context("no show_id")?
            .to_owned();
        self.read_until(
            &format!("/shows/{show}"),
            "the show on the read side",
            |_| true,
        )
        .await?;
        Ok(show)
    }

    /// GETs query-api's `path` until it answers 200 with a body `done`
    /// holds of, and returns that body.
    ///
    /// # Errors
    /// No such answer within 15 s (the error names `what` and the last
    /// answer), or query-api unreachable.
    pub async fn read_until(
        &self,
        path: &str,
        what: &str,
        done: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        let started = Instant::now();
        loop {
            let answer = self
                .http
                .get(format!("{}{path}", self.query_url))
                .send()
                .await?;
            let status = answer.status();
            let body: Value = answer.json().await.unwrap_or(Value::Null);
            if status == reqwest::StatusCode::OK && done(&body) {
                return Ok(body);
            }
            ensure!(
                started.elapsed() < Duration::from_secs(15),
                "{what}: {status} {body}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The Kafka topic the relay publishes to and the projector reads.
    pub fn topic(&self) -> &str {
        &self.mongodb_database
    }

    /// The body of a service's `GET /readyz` now, whatever its status.
    ///
    /// # Errors
    /// The service unreachable, or a body that is not JSON.
    pub async fn readyz(&self, service: Service) -> anyhow::Result<Value> {
        Ok(self
            .http
            .get(format!("{}/readyz", self.base_url(service)))
            .send()
            .await?
            .json()
            .await?)
    }

    /// The series a service's `GET /metrics` shows now.
    ///
    /// # Errors
    /// Any answer but a 200, or text that is not Prometheus's format.
    pub async fn metrics(&self, service: Service) -> anyhow::Result<crate::metrics::Scrape> {
        let answer = self
            .http
            .get(format!("{}/metrics", self.base_url(service)))
            .send()
            .await?;
        ensure!(
            answer.status() == reqwest::StatusCode::OK,
            "GET /metrics of {}: {}",
            service.binary(),
            answer.status()
        );
        crate::metrics::Scrape::parse(&answer.text().await?)
    }

    fn base_url(&self, service: Service) -> &str {
        match service {
            Service::CommandApi => &self.command_url,
            Service::Projector => &self.projector_url,
            Service::QueryApi => &self.query_url,
        }
    }

    fn children(&self) -> anyhow::Result<std::sync::MutexGuard<'_, BTreeMap<Service, Child>>> {
        self.children
            .lock()
            .map_err(|_| anyhow::anyhow!("a test thread panicked holding the services"))
    }

    /// The log file of a service.
    pub fn log_path(&self, service: Service) -> PathBuf {
        self.logs.join(format!("{}.log", service.binary()))
    }

    fn command(&self, binary: &str, log: &str) -> anyhow::Result<Command> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.logs.join(log))
            .context("cannot open a log file")?;
        let mut command = Command::new(self.bin.join(binary));
        command
            .envs(self.env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        Ok(command)
    }

    /// Starts a service (again) and waits until its `/readyz` is 200.
    ///
    /// # Errors
    /// When it exits or is not ready within 60 s.
    pub async fn start_service(&self, service: Service) -> anyhow::Result<()> {
        {
            let mut children = self.children()?;
            ensure!(
                !children.contains_key(&service),
                "{service:?} is already running"
            );
            let child = self
                .command(service.binary(), &format!("{}.log", service.binary()))?
                .spawn()
                .with_context(|| format!("cannot start {}", service.binary()))?;
            children.insert(service, child);
        }
        let url = format!("{}/readyz", self.base_url(service));
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(answer) = self.http.get(&url).send().await {
                if answer.status().is_success() {
                    let body: Value = answer.json().await.unwrap_or(Value::Null);
                    // The relay has created the topic once it is active.
                    let ours = body.get(service.readyz_member()).is_some();
                    if ours && (service != Service::CommandApi || body["relay"]["role"] == "active")
                    {
                        return Ok(());
                    }
                }
            }
            let exited = match self.children()?.get_mut(&service) {
                Some(child) => child.try_wait()?,
                None => None,
            };
            if let Some(status) = exited {
                self.children()?.remove(&service);
                bail!(
                    "{} exited with {status} during start-up; see {}",
                    service.binary(),
                    self.log_path(service).display()
                );
            }
            ensure!(
                Instant::now() < deadline,
                "{} not ready within 60 s; see {}",
                service.binary(),
                self.log_path(service).display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILLs a service: no shutdown of any kind.
    ///
    /// # Errors
    /// When it is not running.
    pub fn kill(&self, service: Service) -> anyhow::Result<()> {
        let mut child = self
            .children()?
            .remove(&service)
            .with_context(|| format!("{service:?} is not running"))?;
        child.kill().context("SIGKILL failed")?;
        child.wait()?;
        Ok(())
    }

    /// The event log's database, for checks of what was written.
    ///
    /// # Errors
    /// Once the system is stopped.
    pub fn postgres(&self) -> anyhow::Result<&sqlx::PgPool> {
        self.db
            .as_ref()
            .map(|db| &db.pool)
            .context("the system is stopped")
    }

    /// Runs `projector replay` to the end, as an operator would.
    ///
    /// # Errors
    /// When it fails.
    pub async fn replay(&self) -> anyhow::Result<()> {
        let mut command = self.command("projector", "replay.log")?;
        command.arg("replay");
        let status = tokio::task::spawn_blocking(move || command.status())
            .await?
            .context("cannot run projector replay")?;
        ensure!(
            status.success(),
            "projector replay exited with {status}; see {}",
            self.logs.join("replay.log").display()
        );
        Ok(())
    }

    /// Runs `projector <args>` to the end, as an operator would, and
    /// returns what it printed on stdout (its log goes to `<args>.log`).
    ///
    /// # Errors
    /// When it cannot run or fails.
    pub async fn projector_command(&self, args: &[&str]) -> anyhow::Result<String> {
        let log = format!("{}.log", args.join("-"));
        let mut command = self.command("projector", &log)?;
        command.args(args).stdout(Stdio::piped());
        let output = tokio::task::spawn_blocking(move || command.output())
            .await?
            .context("cannot run the projector")?;
        ensure!(
            output.status.success(),
            "projector {args:?} exited with {}; see {}",
            output.status,
            self.logs.join(log).display()
        );
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Stops every service with SIGTERM, then drops the test's databases.
    ///
    /// # Errors
    /// When a service does not stop within 15 s or exits with a failure.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let children = std::mem::take(&mut *self.children()?);
        for (service, mut child) in children.into_iter().rev() {
            let status = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status()?;
            ensure!(status.success(), "kill -TERM {service:?} failed");
            let deadline = Instant::now() + Duration::from_secs(15);
            let exit = loop {
                if let Some(exit) = child.try_wait()? {
                    break exit;
                }
                if Instant::now() > deadline {
                    child.kill()?;
                    bail!("{service:?} did not stop within 15 s of SIGTERM");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            ensure!(
                exit.success(),
                "{service:?} exited with {exit} on SIGTERM; see {}",
                self.log_path(service).display()
            );
        }
        if let Some(db) = self.db.take() {
            db.drop_database().await?;
        }
        let mongo = mongodb::Client::with_uri_str(mongodb_uri()).await?;
        mongo.database(&self.mongodb_database).drop().await?;
        Ok(())
    }
}

impl Drop for System {
    /// A failed test must not leave services running.
    fn drop(&mut self) {
        let Ok(mut children) = self.children.lock() else {
            return;
        };
        for child in children.values_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
