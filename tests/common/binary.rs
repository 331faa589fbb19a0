//! The real `hookrelay` binary, started and driven as an operator would.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use super::{Received, RecordingUpstream, Reply, signed_github};

pub const BIN: &str = env!("CARGO_BIN_EXE_hookrelay");

pub fn hookrelay(args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .env_remove("HOOKRELAY_CONFIG")
        .env_remove("HOOKRELAY_LISTEN")
        .output()
        .unwrap()
}

pub fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

/// A running `hookrelay serve` whose log lines are collected.
pub struct Served {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Served {
    pub fn start(config_dir: &Path, state: &Path) -> Served {
        Served::start_with(Command::new(BIN), config_dir, state)
    }

    pub fn start_with(mut command: Command, config_dir: &Path, state: &Path) -> Served {
        let mut child = command
            .args([
                "serve",
                "--config",
                config_dir.to_str().unwrap(),
                "--listen",
                "127.0.0.1:0",
            ])
            .args(["--state", state.to_str().unwrap()])
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Served {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for a log line containing `needle`.
    pub fn wait_for(&mut self, needle: &str) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(line) = self.seen.iter().find(|l| l.contains(needle)) {
                return line.clone();
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(_) => panic!("no log line with {needle:?}; saw {:#?}", self.seen),
            }
        }
    }

    pub fn address(&mut self) -> String {
        let line = self.wait_for("hookrelay listening");
        if line.starts_with('{') {
            let json: serde_json::Value = serde_json::from_str(&line).expect("a JSON log line");
            return json["address"]
                .as_str()
                .expect("the address field")
                .to_owned();
        }
        let start = line.find("address=").expect("address in the line") + "address=".len();
        line[start..].split_whitespace().next().unwrap().to_owned()
    }

    /// The dashboard's address, from its start-up line (`[admin]` on port 0).
    pub fn dashboard_address(&mut self) -> String {
        let line = self.wait_for("dashboard listening");
        let start = line.find("address=").expect("address in the line") + "address=".len();
        line[start..].split_whitespace().next().unwrap().to_owned()
    }

    pub fn terminate(mut self) -> (Option<i32>, Vec<String>) {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        let status = self.child.wait().unwrap();
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.seen.push(line);
        }
        (status.code(), std::mem::take(&mut self.seen))
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

/// A process killed when dropped, so that a failing test leaves none running.
pub struct KilledOnDrop(pub Child);

impl Drop for KilledOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A relay configuration whose one rule sends every GitHub push to acme/app on main, with
/// the delivery id as a variable, so the upstream shows which deliveries arrived.
pub fn durable_config(dir: &Path, upstream: &str) {
    write(dir, "secret", "s3cret-for-the-tests");
    write(
        dir,
        "relay.toml",
        &format!(
            "[upstream.gitlab]\nurl = \"{upstream}\"\nlimit = {{ per_project = \"1000/s\" }}\n[source.github]\nprovider = \"github\"\nsecret = \"file:{}\"\n\
             [delivery]\nretry_base = \"50ms\"\nretry_cap = \"200ms\"\n\
             [[rule]]\nname = \"all\"\nsource = \"github\"\n[rule.trigger]\nproject = \"acme/app\"\nref = \"main\"\n\
             token = \"env:HOOKRELAY_TEST_TOKEN\"\nvariables = {{ DELIVERY = \"{{{{ event.delivery }}}}\" }}\n",
            dir.join("secret").display()
        ),
    );
}

pub fn serve_in(dir: &Path) -> Served {
    let mut command = Command::new(BIN);
    command.env("HOOKRELAY_TEST_TOKEN", "glptt-test");
    Served::start_with(command, dir, &dir.join("state"))
}

/// A relay serving [`durable_config`] from a folder of its own, with its recording
/// upstream: what most fault tests start from.
pub struct DurableRelay {
    pub upstream: RecordingUpstream,
    pub dir: tempfile::TempDir,
    pub served: Served,
    pub address: String,
}

impl DurableRelay {
    pub async fn start() -> DurableRelay {
        let upstream = RecordingUpstream::start().await;
        let dir = tempfile::tempdir().unwrap();
        durable_config(dir.path(), &upstream.url());
        let mut served = serve_in(dir.path());
        let address = served.address();
        DurableRelay {
            upstream,
            dir,
            served,
            address,
        }
    }
}

/// The relay at `address` still takes a webhook (on [`durable_config`]); then it stops
/// cleanly.
pub async fn takes_one_more_and_stops(served: Served, address: &str) {
    assert_eq!(
        github_tag(address, "s3cret-for-the-tests").await.status,
        202
    );
    let (code, lines) = served.terminate();
    assert_eq!(code, Some(0), "{lines:#?}");
}

/// The delivery id a call carries in `variables[DELIVERY]` ([`durable_config`]'s rule).
pub fn delivery_of(call: &Received) -> Option<String> {
    call.json()["variables"]["DELIVERY"]
        .as_str()
        .map(str::to_owned)
}

pub fn delivered(upstream: &RecordingUpstream) -> std::collections::BTreeSet<String> {
    upstream.received().iter().filter_map(delivery_of).collect()
}

/// Sends a GitHub tag push signed with `secret` to a running relay.
pub async fn github_tag(address: &str, secret: &str) -> Reply {
    static SENT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let delivery = format!(
        "delivery-{}",
        SENT.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    );
    let url = format!("http://{address}/hooks/github");
    signed_github(&url, secret, "push", &delivery, "github/push_tag.json").await
}

/// libfaketime, from Debian's `libfaketime` package (`.ci/run` installs it), for a
/// process whose clock a test sets.
pub const FAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";

/// Whether libfaketime is here; where it is not, the test says it is skipped, and fails
/// instead where `required_by` (an environment variable CI sets) is set.
pub fn faketime_here(required_by: &str) -> bool {
    if Path::new(FAKETIME).exists() {
        return true;
    }
    assert!(
        std::env::var_os(required_by).is_none(),
        "{required_by} is set but {FAKETIME} is missing (apt-get install libfaketime)"
    );
    eprintln!("SKIPPED: no libfaketime ({FAKETIME})");
    false
}
