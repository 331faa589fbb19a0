//! A throwaway PostgreSQL server for the engine's tests: initialised in a temporary
//! folder and run as the unprivileged `postgres` user (PostgreSQL refuses to run as root),
//! on a free port of 127.0.0.1, shared by the tests of one process and stopped (its folder
//! removed) within a second of that process ending. Each test gets a database of its own.
//!
//! Where no server can be started (no PostgreSQL binaries, not root), tests say so and are
//! skipped; CI sets `HOOKRELAY_REQUIRE_POSTGRES=1`, which makes that a failure instead.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

struct Server {
    port: u16,
}

/// One test's database, dropped at the end of the test.
pub struct Database {
    pub url: String,
}

static SERVER: OnceLock<Option<Server>> = OnceLock::new();
static NEXT: AtomicUsize = AtomicUsize::new(0);

fn bin_dir() -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("bin"))
        .filter(|bin| bin.join("initdb").exists())
        .collect();
    found.sort();
    found.pop()
}

fn run(command: &mut Command) -> Result<(), String> {
    let output = command.output().map_err(|e| e.to_string())?;
    if output.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).trim().to_owned())
    }
}

fn start() -> Result<Server, String> {
    let bin = bin_dir().ok_or("no PostgreSQL under /usr/lib/postgresql")?;
    let dir = tempfile::Builder::new()
        .prefix("hookrelay-pg-")
        .tempdir()
        .map_err(|e| e.to_string())?
        .keep();
    run(Command::new("chown").args(["postgres:postgres"]).arg(&dir))?;
    let data = dir.join("data");
    run(Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(bin.join("initdb"))
        .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
        .arg(&data))?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port();
    // The server stops, and its folder goes, within a second of this process ending.
    let script = format!(
        "runuser -u postgres -- '{postgres}' -D '{data}' -k '{dir}' -p {port} -c listen_addresses=127.0.0.1 \
         -c fsync=off -c synchronous_commit=on >'{dir}/log' 2>&1 & pg=$!; \
         while kill -0 {me} 2>/dev/null && kill -0 $pg 2>/dev/null; do sleep 1; done; \
         kill -INT \"$(head -n1 '{data}/postmaster.pid')\" 2>/dev/null; wait $pg; rm -rf '{dir}'",
        postgres = bin.join("postgres").display(),
        data = data.display(),
        dir = dir.display(),
        me = std::process::id(),
    );
    Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    let started = Instant::now();
    loop {
        match postgres::Client::connect(
            &format!("host=127.0.0.1 port={port} user=postgres dbname=postgres"),
            postgres::NoTls,
        ) {
            Ok(_) => return Ok(Server { port }),
            Err(_) if started.elapsed() < Duration::from_secs(30) => {
                std::thread::sleep(Duration::from_millis(100))
            }
            Err(err) => {
                let log = std::fs::read_to_string(Path::new(&dir).join("log")).unwrap_or_default();
                return Err(format!("the server did not start: {err}\n{log}"));
            }
        }
    }
}

impl Database {
    /// A new empty database on the shared server, or `None` (test skipped) where no server
    /// can run here.
    pub fn create() -> Option<Database> {
        let server = SERVER
            .get_or_init(|| match start() {
                Ok(server) => Some(server),
                Err(reason) => {
                    assert!(
                        std::env::var_os("HOOKRELAY_REQUIRE_POSTGRES").is_none(),
                        "HOOKRELAY_REQUIRE_POSTGRES is set but no PostgreSQL could start: {reason}"
                    );
                    eprintln!("SKIPPED: no PostgreSQL server for the engine tests ({reason})");
                    None
                }
            })
            .as_ref()?;
        let name = format!(
            "hr_test_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let mut admin = postgres::Client::connect(
            &format!(
                "host=127.0.0.1 port={} user=postgres dbname=postgres",
                server.port
            ),
            postgres::NoTls,
        )
        .expect("the test server takes connections");
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .expect("a test database");
        Some(Database {
            url: format!("postgres://postgres@127.0.0.1:{}/{name}", server.port),
        })
    }
}
