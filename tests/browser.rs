//! The dashboard in a real headless browser (Debian's `chromium` driven by `chromedriver`
//! over the WebDriver protocol): log in, load the list, open a delivery, replay it, and see
//! the new attempt appear. With `HOOKRELAY_SCREENSHOTS=1` it saves the screenshots the
//! README shows (`docs/screenshots/`).
//!
//! Where no browser is installed the test says so and returns; CI installs one and sets
//! `HOOKRELAY_REQUIRE_BROWSER=1`, which turns that into a failure.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::binary::{BIN, Served, write};
use common::{RecordingUpstream, send, signed_github};
use serde_json::{Value, json};

const SECRET: &str = "s3cret-for-the-tests";
const ADMIN_TOKEN: &str = "admin-token-for-the-tests-0123";
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A chromedriver of the test's own, killed when dropped.
struct Driver {
    child: Child,
    url: String,
    session: String,
}

/// Whether what listens on `port` answers `GET /status` as a ready chromedriver: a plain
/// request with a short timeout, that neither hangs nor panics on a server going away.
fn answers_as_chromedriver(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let request =
        format!("GET /status HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    // Read until the answer says it, or the server closes or stops sending.
    let (mut answer, mut chunk) = (Vec::new(), [0u8; 4096]);
    while let Ok(read @ 1..) = stream.read(&mut chunk) {
        answer.extend_from_slice(&chunk[..read]);
        if String::from_utf8_lossy(&answer).contains("\"ready\":true") {
            return true;
        }
    }
    false
}

impl Drop for Driver {
    /// Ends the browser (its session) and chromedriver, however the test ends.
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = Command::new("curl")
                .args(["-s", "-m", "10", "-X", "DELETE"])
                .arg(format!("{}/session/{}", self.url, self.session))
                .stdout(Stdio::null())
                .status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Driver {
    /// Starts chromedriver and a headless Chromium session, or `None` where none is
    /// installed.
    async fn start() -> Option<Driver> {
        let required = std::env::var("HOOKRELAY_REQUIRE_BROWSER").is_ok_and(|v| v == "1");
        let browser = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
            .into_iter()
            .find(|path| std::path::Path::new(path).exists());
        let (Some(browser), true) = (
            browser,
            Command::new("chromedriver")
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success()),
        ) else {
            assert!(
                !required,
                "HOOKRELAY_REQUIRE_BROWSER=1 but chromium or chromedriver is missing"
            );
            eprintln!(
                "skipped: no chromium and chromedriver here (Debian: apt-get install chromium chromium-driver)"
            );
            return None;
        };
        let mut driver = Driver::listening().await;
        let created = driver
            .call(
                "POST",
                "/session",
                json!({"capabilities": {"alwaysMatch": {
                    "browserName": "chrome",
                    "goog:chromeOptions": {
                        "binary": browser,
                        "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,900"],
                    },
                }}}),
            )
            .await;
        driver.session = created["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {created}"))
            .to_owned();
        Some(driver)
    }

    /// chromedriver on a free port, once it answers there as chromedriver. A port found free
    /// can be taken by another test before chromedriver binds it (chromedriver then exits,
    /// and what answered the port was the other test's server): then it starts again on
    /// another port.
    async fn listening() -> Driver {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let port = free_port();
            let child = Command::new("chromedriver")
                .arg(format!("--port={port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let mut driver = Driver {
                child,
                url: format!("http://127.0.0.1:{port}"),
                session: String::new(),
            };
            loop {
                assert!(Instant::now() < deadline, "chromedriver did not start");
                if driver.child.try_wait().is_ok_and(|ended| ended.is_some()) {
                    break;
                }
                if answers_as_chromedriver(port) {
                    return driver;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    async fn call(&self, method: &str, path: &str, body: Value) -> Value {
        match self.try_call(method, path, body).await {
            Ok(value) => value,
            Err(error) => panic!("{method} {path}: {error}"),
        }
    }

    /// A WebDriver command's value, or its error (a page that changed under it).
    async fn try_call(&self, method: &str, path: &str, body: Value) -> Result<Value, Value> {
        let url = format!("{}{path}", self.url);
        let bodiless = matches!(method, "GET" | "DELETE");
        let (headers, body): (&[(&str, &str)], String) = if bodiless {
            (&[], String::new())
        } else {
            (&[("content-type", "application/json")], body.to_string())
        };
        let reply =
            tokio::time::timeout(Duration::from_secs(60), send(method, &url, headers, body))
                .await
                .expect("chromedriver answers within a minute");
        let value: Value = serde_json::from_slice(&reply.body).unwrap_or(Value::Null);
        if reply.status >= 400 {
            return Err(value);
        }
        Ok(value["value"].clone())
    }

    async fn session(&self, method: &str, path: &str, body: Value) -> Value {
        self.call(method, &format!("/session/{}{path}", self.session), body)
            .await
    }

    async fn open(&self, url: &str) {
        self.session("POST", "/url", json!({ "url": url })).await;
    }

    async fn find(&self, css: &str) -> String {
        let found = self
            .session(
                "POST",
                "/element",
                json!({"using": "css selector", "value": css}),
            )
            .await;
        found[ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("no {css}: {found}"))
            .to_owned()
    }

    async fn click(&self, css: &str) {
        let element = self.find(css).await;
        self.session("POST", &format!("/element/{element}/click"), json!({}))
            .await;
    }

    async fn type_into(&self, css: &str, text: &str) {
        let element = self.find(css).await;
        self.session(
            "POST",
            &format!("/element/{element}/value"),
            json!({ "text": text }),
        )
        .await;
    }

    /// The page's text; empty while a new page replaces it.
    async fn text(&self) -> String {
        let path = format!("/session/{}/element", self.session);
        let Ok(found) = self
            .try_call(
                "POST",
                &path,
                json!({"using": "css selector", "value": "body"}),
            )
            .await
        else {
            return String::new();
        };
        let Some(body) = found[ELEMENT].as_str() else {
            return String::new();
        };
        let text = format!("/session/{}/element/{body}/text", self.session);
        self.try_call("GET", &text, Value::Null)
            .await
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
    }

    /// Waits until the page's text contains `needle` (live updates, redirects).
    async fn wait_for_text(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = self.text().await;
            if text.contains(needle) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?} on the page: {text}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Takes a screenshot of the page; with `HOOKRELAY_SCREENSHOTS=1`, saves it as the
    /// README's `docs/screenshots/NAME.png`.
    async fn screenshot(&self, name: &str) {
        let encoded = self.session("GET", "/screenshot", Value::Null).await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(encoded.as_str().unwrap())
            .unwrap();
        assert!(png.starts_with(b"\x89PNG"), "a PNG");
        if std::env::var("HOOKRELAY_SCREENSHOTS").is_ok_and(|v| v == "1") {
            let folder = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/screenshots");
            std::fs::create_dir_all(&folder).unwrap();
            std::fs::write(folder.join(format!("{name}.png")), png).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_logs_in_opens_a_delivery_replays_it_and_sees_the_new_attempt() {
    let Some(driver) = Driver::start().await else {
        return;
    };
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "secret", SECRET);
    write(
        dir.path(),
        "relay.toml",
        &format!(
            "[upstream.gitlab]\nurl = \"{}\"\n[source.github]\nprovider = \"github\"\nsecret = \"file:{1}/secret\"\n\
             [admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"env:HOOKRELAY_ADMIN_TOKEN\"\n\
             [[rule]]\nname = \"docs-on-tag\"\nsource = \"github\"\n[rule.trigger]\nproject = \"acme/docs\"\nref = \"main\"\n\
             token = \"file:{1}/secret\"\n\
             [[rule]]\nname = \"releases\"\nsource = \"github\"\nrefs = [\"release-*\"]\n[rule.trigger]\nproject = \"acme/app\"\n\
             token = \"file:{1}/secret\"\n",
            upstream.url(),
            dir.path().display()
        ),
    );
    let mut command = Command::new(BIN);
    command.env("HOOKRELAY_ADMIN_TOKEN", ADMIN_TOKEN);
    let mut served = Served::start_with(command, dir.path(), &dir.path().join("state"));
    let address = served.address();
    let dashboard = served.dashboard_address();
    for n in 1..=3 {
        let reply = signed_github(
            &format!("http://{address}/hooks/github"),
            SECRET,
            "push",
            &format!("delivery-{n}"),
            "github/push_tag.json",
        )
        .await;
        assert_eq!(reply.status, 202);
    }
    let base = format!("http://{dashboard}");
    driver.open(&format!("{base}/login")).await;
    driver.type_into("#token", ADMIN_TOKEN).await;
    driver.click("button[type=submit]").await;
    let list = driver.wait_for_text("delivery-3").await;
    assert!(list.contains("Log out"), "logged in: {list}");
    driver.wait_for_text("sent").await;
    driver.screenshot("deliveries").await;
    driver
        .click("a[href='/deliveries/delivery-1?source=github']")
        .await;
    let detail = driver.wait_for_text("Triggers and statuses").await;
    assert!(detail.contains("✓ docs-on-tag"), "{detail}");
    assert!(detail.contains("✗ releases"), "{detail}");
    driver.screenshot("delivery").await;
    driver.click("form[action$='/replay'] button").await;
    driver
        .wait_for_text("Queue every trigger of delivery delivery-1 from source github again")
        .await;
    driver.click("#confirm button[type=submit]").await;
    let after = driver.wait_for_text("queued again as trigger").await;
    assert!(
        after.contains("replay of 1"),
        "the new attempt is shown: {after}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while upstream.received().len() < 4 {
        assert!(Instant::now() < deadline, "the replay was not sent");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The list shows the replay's record without a reload (live updates).
    driver.open(&format!("{base}/deliveries")).await;
    let pushed = signed_github(
        &format!("http://{address}/hooks/github"),
        SECRET,
        "push",
        "delivery-live",
        "github/push_tag.json",
    )
    .await;
    assert_eq!(pushed.status, 202);
    driver.wait_for_text("delivery-live").await;
    driver.open(&format!("{base}/health")).await;
    driver.wait_for_text("GitLab's answers").await;
    driver.screenshot("health").await;
    driver.open(&format!("{base}/rules")).await;
    driver.wait_for_text("Upstreams").await;
    driver.screenshot("rules").await;
}

/// After a rule is fixed, a browser filters the deliveries to the webhooks that matched no
/// rule, follows "Run these webhooks through today's rules", reads what confirming would
/// do, confirms, and sees the result on the filtered page; the pipeline is started once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_runs_the_webhooks_that_matched_no_rule_through_a_fixed_rule() {
    let Some(driver) = Driver::start().await else {
        return;
    };
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "secret", SECRET);
    let relay = |refs: &str| {
        format!(
            "[upstream.gitlab]\nurl = \"{}\"\n[source.github]\nprovider = \"github\"\nsecret = \"file:{1}/secret\"\n\
             [admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"env:HOOKRELAY_ADMIN_TOKEN\"\n\
             [[rule]]\nname = \"releases\"\nsource = \"github\"\nevents = [\"tag\"]\nrefs = [\"{refs}\"]\n\
             [rule.trigger]\nproject = \"acme/app\"\nref = \"main\"\ntoken = \"file:{1}/secret\"\n",
            upstream.url(),
            dir.path().display()
        )
    };
    write(dir.path(), "relay.toml", &relay("release-*"));
    let mut command = Command::new(BIN);
    command.env("HOOKRELAY_ADMIN_TOKEN", ADMIN_TOKEN);
    let mut served = Served::start_with(command, dir.path(), &dir.path().join("state"));
    let address = served.address();
    let dashboard = served.dashboard_address();
    let reply = signed_github(
        &format!("http://{address}/hooks/github"),
        SECRET,
        "push",
        "unmatched-1",
        "github/push_tag.json",
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    write(dir.path(), "relay.toml", &relay("simple-*"));
    served.wait_for("configuration reloaded");

    let base = format!("http://{dashboard}");
    driver.open(&format!("{base}/login")).await;
    driver.type_into("#token", ADMIN_TOKEN).await;
    driver.click("button[type=submit]").await;
    driver.wait_for_text("unmatched-1").await;
    driver
        .open(&format!("{base}/deliveries?state=none&since=1h"))
        .await;
    driver
        .wait_for_text("Run these webhooks through today's rules")
        .await;
    driver.click("a[href^='/replan?']").await;
    let question = driver
        .wait_for_text("Now: 1 webhook would be planned again")
        .await;
    assert!(
        question.contains("unmatched-1 (releases -> acme/app main)"),
        "{question}"
    );
    driver.click("#confirm button[type=submit]").await;
    let done = driver.wait_for_text("1 webhook planned again").await;
    assert!(
        done.contains("unmatched-1 as unmatched-1~replan-"),
        "{done}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while upstream.received().is_empty() {
        assert!(Instant::now() < deadline, "the replan was not sent");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(upstream.received().len(), 1, "one pipeline, once");
}
