//! A Postgres cluster of a test's own, whose transaction ids start where the
//! test says, for logs as a long-lived deployment has them: ids that cross
//! a change in their number of digits, ids past the 32-bit wraparound.
//!
//! The shared cluster cannot serve for this: its ids only grow, and the
//! next change of digit count is ever further away (from 100,000 it takes
//! 900,000 transactions). A fresh cluster is placed next to the boundary by
//! `pg_resetwal` before its first start, and the last stretch is crossed by
//! real transactions ([`burn_tx_ids_until`]).
//!
//! Needs the server binaries of the machine's Postgres (`initdb`, `pg_ctl`,
//! `pg_resetwal`): `PG_BINDIR`, else the newest `/usr/lib/postgresql/*/bin`,
//! else `PATH`. As root, they run as the `postgres` user (`initdb` refuses
//! root).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context};
use sqlx::PgPool;

use crate::unique_name;

/// Transaction ids per page of Postgres' commit log: a cluster may only be
/// started at the first id of a page, which it then creates.
const CLOG_PAGE: u64 = 32_768;

/// The clusters' directories in the temporary directory start so.
const CLUSTER_PREFIX: &str = "pgcluster";

/// Older than any test run: a cluster this old was left behind.
const LEFT_BEHIND: Duration = Duration::from_secs(3 * 3600);

/// A running private cluster; stopped and deleted on drop.
pub struct PrivateCluster {
    root: PathBuf,
    bin: PathBuf,
    owner: Option<String>,
    port: u16,
}

impl PrivateCluster {
    /// Creates and starts a cluster whose next transaction id is `near`,
    /// rounded down to a page of the commit log (at most 32,767 less).
    /// Durability is off: it lives for one test. Clusters that earlier test
    /// runs left behind (killed before they could stop theirs) are stopped
    /// and removed first.
    ///
    /// # Errors
    /// When the server binaries are missing, `near` is out of range, or a
    /// step fails (its output is in the error).
    pub async fn start_near(near: u64) -> anyhow::Result<Self> {
        let epoch = near >> 32;
        let xid = (near & 0xffff_ffff) / CLOG_PAGE * CLOG_PAGE;
        // The catalog rows initdb writes are not frozen: an id 2^31 past
        // theirs would see them as written in the future, and so not see
        // them at all.
        ensure!(
            (CLOG_PAGE..1 << 31).contains(&xid),
            "transaction id {near} is not within 32,768 to 2^31 of a wraparound epoch"
        );
        let bin = server_binaries()?;
        let owner = owner()?;
        sweep_left_behind(&bin, owner.as_deref());
        let mut failure = None;
        // A port found free can be taken before the server binds it: then
        // try another.
        for _ in 0..3 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port();
            let cluster = Self {
                root: std::env::temp_dir().join(unique_name(CLUSTER_PREFIX)),
                bin: bin.clone(),
                owner: owner.clone(),
                port,
            };
            match cluster.create(epoch, xid) {
                Ok(()) => return cluster.answering().await,
                Err(error) => failure = Some(error),
            }
        }
        Err(failure.unwrap_or_else(|| anyhow::anyhow!("no cluster was started")))
    }

    fn create(&self, epoch: u64, xid: u64) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.root)?;
        if let Some(user) = &self.owner {
            chown(&self.root, user)?;
        }
        let data = self.data();
        self.run(
            "initdb",
            &[
                "-D",
                path(&data)?,
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "--no-instructions",
                "-E",
                "UTF8",
            ],
        )?;
        self.run(
            "pg_resetwal",
            &[
                "-e",
                &epoch.to_string(),
                "-x",
                &xid.to_string(),
                "-D",
                path(&data)?,
            ],
        )?;
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off \
             -c full_page_writes=off -c max_connections=60",
            self.port,
            path(&self.root)?
        );
        let log = self.root.join("server.log");
        self.run(
            "pg_ctl",
            &[
                "-D",
                path(&data)?,
                "-l",
                path(&log)?,
                "-o",
                &options,
                "-w",
                "-t",
                "60",
                "start",
            ],
        )
        .map_err(|error| {
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            error.context(format!("starting the private cluster; its log: {log}"))
        })
    }

    async fn answering(self) -> anyhow::Result<Self> {
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return Ok(self);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        anyhow::bail!("the private cluster did not answer on port {}", self.port)
    }

    /// The URL of its `postgres` database.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn data(&self) -> PathBuf {
        self.root.join("data")
    }

    fn run(&self, program: &str, args: &[&str]) -> anyhow::Result<()> {
        run(&self.bin, self.owner.as_deref(), program, args)
    }
}

/// Runs one of the server binaries, as `owner` when given.
fn run(bin: &Path, owner: Option<&str>, program: &str, args: &[&str]) -> anyhow::Result<()> {
    let program = bin.join(program);
    let mut command = match owner {
        Some(user) => {
            let mut command = Command::new("runuser");
            command.args(["-u", user, "--"]).arg(&program);
            command
        }
        None => Command::new(&program),
    };
    let output = command
        .args(args)
        .output()
        .with_context(|| format!("running {}", program.display()))?;
    ensure!(
        output.status.success(),
        "{} {args:?} failed: {}{}",
        program.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

/// Stops and removes the clusters of test runs that were killed before
/// they could (their postmaster outlives them).
fn sweep_left_behind(bin: &Path, owner: Option<&str>) {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|at| at.elapsed().ok())
            .is_some_and(|age| age > LEFT_BEHIND);
        let ours = entry
            .file_name()
            .to_str()
            .is_some_and(|name| name.starts_with(&format!("{CLUSTER_PREFIX}_")));
        if !(old && ours) {
            continue;
        }
        if let Some(data) = entry.path().join("data").to_str() {
            let _ = run(
                bin,
                owner,
                "pg_ctl",
                &["-D", data, "-m", "immediate", "-w", "stop"],
            );
        }
        let _ = std::fs::remove_dir_all(entry.path());
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        let data = self.data();
        if let Some(data) = data.to_str() {
            let _ = self.run("pg_ctl", &["-D", data, "-m", "immediate", "-w", "stop"]);
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// The id the next transaction of `pool`'s cluster will get, as far as its
/// finished transactions tell (asking does not use one up).
///
/// # Errors
/// Store errors.
pub async fn next_tx_id(pool: &PgPool) -> anyhow::Result<u64> {
    let next: String = sqlx::query_scalar("SELECT pg_snapshot_xmax(pg_current_snapshot())::text")
        .fetch_one(pool)
        .await?;
    Ok(next.parse()?)
}

/// Commits empty transactions until the next transaction id of `pool`'s
/// cluster is at least `next`; returns that id. Each is a real top-level
/// transaction with an id, as any writer's (about 150,000 a second here).
///
/// # Errors
/// Store errors, or `next` already passed.
pub async fn burn_tx_ids_until(pool: &PgPool, next: u64) -> anyhow::Result<u64> {
    let at = next_tx_id(pool).await?;
    ensure!(at <= next, "transaction id {next} is already passed ({at})");
    let count = next - at;
    if count > 0 {
        // Simple protocol, outside any transaction block: a DO block may then
        // commit, and each loop turn is a transaction of its own.
        sqlx::raw_sql(&format!(
            "DO $$ BEGIN FOR i IN 1..{count} LOOP PERFORM pg_current_xact_id(); COMMIT; END LOOP; END $$"
        ))
        .execute(pool)
        .await
        .context("using up transaction ids")?;
    }
    next_tx_id(pool).await
}

fn server_binaries() -> anyhow::Result<PathBuf> {
    if let Ok(dir) = std::env::var("PG_BINDIR") {
        return Ok(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    let found = Command::new("sh")
        .args(["-c", "command -v initdb"])
        .output()
        .context("looking for initdb")?;
    let initdb = String::from_utf8_lossy(&found.stdout).trim().to_owned();
    let dir = Path::new(&initdb)
        .parent()
        .filter(|_| found.status.success());
    dir.map(Path::to_path_buf).context(
        "no Postgres server binaries (initdb, pg_ctl, pg_resetwal): set PG_BINDIR or install \
         the postgresql package (scripts/infra.sh does)",
    )
}

/// The user the server runs as: `postgres` when the tests run as root.
fn owner() -> anyhow::Result<Option<String>> {
    let uid = Command::new("id")
        .arg("-u")
        .output()
        .context("running id")?;
    let root = String::from_utf8_lossy(&uid.stdout).trim() == "0";
    Ok(root.then(|| "postgres".to_owned()))
}

fn chown(dir: &Path, user: &str) -> anyhow::Result<()> {
    let id = |flag: &str| -> anyhow::Result<u32> {
        let output = Command::new("id").args([flag, user]).output()?;
        ensure!(output.status.success(), "no user {user}");
        Ok(String::from_utf8_lossy(&output.stdout).trim().parse()?)
    };
    std::os::unix::fs::chown(dir, Some(id("-u")?), Some(id("-g")?))
        .with_context(|| format!("giving {} to {user}", dir.display()))
}

fn path(path: &Path) -> anyhow::Result<&str> {
    path.to_str().context("a path that is not UTF-8")
}
