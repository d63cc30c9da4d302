//! A real browser for the tests: Debian's headless Chromium, driven through
//! ChromeDriver over the W3C WebDriver protocol (plain HTTP and JSON, so
//! the HTTP client the tests already have is all it takes). `make test`
//! installs both when the machine lacks them (`make tools`).

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use serde_json::{json, Value};
use tokio::process::{Child, Command};

/// The key of an element reference in WebDriver answers.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A browser session: ChromeDriver and the Chromium it started.
pub struct Browser {
    driver: Child,
    session: String,
    base: String,
    http: reqwest::Client,
}

impl Browser {
    /// Starts ChromeDriver on a free port and a headless Chromium window of
    /// 1280×900.
    ///
    /// # Errors
    /// When Chromium or ChromeDriver is missing (`make tools` installs
    /// them) or does not start.
    pub async fn start() -> anyhow::Result<Self> {
        let driver_path = std::env::var("CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".into());
        let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
        ensure!(
            Path::new(&chromium).exists(),
            "{chromium} is missing: `make tools` installs Debian's chromium"
        );
        let [addr] = crate::system::free_addrs()?;
        let port = addr
            .rsplit(':')
            .next()
            .context("an address without a port")?;
        let driver = Command::new(&driver_path)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| {
                format!("cannot start {driver_path}: `make tools` installs chromium-driver")
            })?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()?;
        let base = format!("http://{addr}");
        let started = std::time::Instant::now();
        loop {
            let ready = http
                .get(format!("{base}/status"))
                .send()
                .await
                .ok()
                .map(|answer| answer.json::<Value>());
            if let Some(body) = ready {
                if body.await.is_ok_and(|b| b["value"]["ready"] == true) {
                    break;
                }
            }
            ensure!(
                started.elapsed() < Duration::from_secs(20),
                "chromedriver did not get ready"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                // Root in a container needs --no-sandbox; /dev/shm is small
                // there.
                "args": ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                         "--disable-gpu", "--window-size=1280,900"]
            }
        }}});
        let answer = call(
            &http,
            reqwest::Method::POST,
            &format!("{base}/session"),
            capabilities,
        )
        .await
        .context("chromium did not start")?;
        let session = answer["sessionId"]
            .as_str()
            .context("no sessionId")?
            .to_owned();
        Ok(Self {
            driver,
            session,
            base,
            http,
        })
    }

    async fn command(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Value,
    ) -> anyhow::Result<Value> {
        let url = format!("{}/session/{}{path}", self.base, self.session);
        call(&self.http, method, &url, body).await
    }

    /// Opens `url`.
    ///
    /// # Errors
    /// When the browser fails.
    pub async fn goto(&self, url: &str) -> anyhow::Result<()> {
        self.command(reqwest::Method::POST, "/url", json!({ "url": url }))
            .await?;
        Ok(())
    }

    /// Runs `script` (a function body; `arguments` holds `args`) in the
    /// page and returns what it returns.
    ///
    /// # Errors
    /// When the script throws or the browser fails.
    pub async fn run(&self, script: &str, args: Value) -> anyhow::Result<Value> {
        self.command(
            reqwest::Method::POST,
            "/execute/sync",
            json!({ "script": script, "args": args }),
        )
        .await
    }

    /// Runs `script` until it returns something other than `null` or
    /// `false`, and returns that.
    ///
    /// # Errors
    /// When it does not within `wait`.
    pub async fn wait_for(
        &self,
        what: &str,
        script: &str,
        args: Value,
        wait: Duration,
    ) -> anyhow::Result<Value> {
        let started = std::time::Instant::now();
        loop {
            let value = self.run(script, args.clone()).await?;
            if !value.is_null() && value != false {
                return Ok(value);
            }
            if started.elapsed() > wait {
                bail!("{what}: not within {wait:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn element(&self, css: &str) -> anyhow::Result<String> {
        let found = self
            .command(
                reqwest::Method::POST,
                "/element",
                json!({ "using": "css selector", "value": css }),
            )
            .await
            .with_context(|| format!("no element {css}"))?;
        Ok(found[ELEMENT]
            .as_str()
            .with_context(|| format!("not an element reference: {found}"))?
            .to_owned())
    }

    /// Clicks the element `css` selects, as a user would.
    ///
    /// # Errors
    /// When there is none or it cannot be clicked.
    pub async fn click(&self, css: &str) -> anyhow::Result<()> {
        let id = self.element(css).await?;
        self.command(
            reqwest::Method::POST,
            &format!("/element/{id}/click"),
            json!({}),
        )
        .await?;
        Ok(())
    }

    /// Types `text` into the element `css` selects.
    ///
    /// # Errors
    /// When there is none or it takes no text.
    pub async fn type_into(&self, css: &str, text: &str) -> anyhow::Result<()> {
        let id = self.element(css).await?;
        self.command(
            reqwest::Method::POST,
            &format!("/element/{id}/value"),
            json!({ "text": text }),
        )
        .await?;
        Ok(())
    }

    /// Saves a PNG of the window to `path`.
    ///
    /// # Errors
    /// When the browser or the file system fails.
    pub async fn screenshot(&self, path: &Path) -> anyhow::Result<()> {
        use base64::Engine as _;
        let png = self
            .command(reqwest::Method::GET, "/screenshot", Value::Null)
            .await?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(png.as_str().context("no screenshot")?)
            .context("the screenshot is not base64")?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, bytes).with_context(|| format!("cannot write {}", path.display()))
    }

    /// Closes the browser and ChromeDriver.
    ///
    /// # Errors
    /// When the session cannot be closed.
    pub async fn quit(mut self) -> anyhow::Result<()> {
        let closed = self.command(reqwest::Method::DELETE, "", Value::Null).await;
        let _ = self.driver.kill().await;
        closed.map(|_| ())
    }
}

/// One WebDriver call: its `value`, or its error as an error.
async fn call(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    body: Value,
) -> anyhow::Result<Value> {
    let mut request = http.request(method, url);
    if !body.is_null() {
        request = request.json(&body);
    }
    let answer = request.send().await.with_context(|| url.to_owned())?;
    let status = answer.status();
    let body: Value = answer.json().await.context("a WebDriver answer not JSON")?;
    if !status.is_success() {
        bail!("{url}: {status} {}", body["value"]);
    }
    Ok(body["value"].clone())
}
