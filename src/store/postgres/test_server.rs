//! A throwaway PostgreSQL server for tests: initialised in a temporary folder and run as
//! the unprivileged `postgres` user (PostgreSQL refuses to run as root), on a free port of
//! 127.0.0.1, and stopped (its folder removed) within a second of the test process ending.
//! One server is shared by the tests of a process, each with a database of its own; a test
//! that restarts the server starts one of its own ([`Server::own`]). The engine's unit tests
//! and the cluster tests in `tests/` both include this file.
//!
//! Where no server can be started (no PostgreSQL binaries, not root), tests say so and are
//! skipped; CI sets `HOOKRELAY_REQUIRE_POSTGRES=1`, which makes that a failure instead.

// Each including crate uses its own part of this file.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// A running server.
pub struct Server {
    pub port: u16,
    bin: PathBuf,
    data: PathBuf,
    dir: PathBuf,
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
    start_in(new_dir()?, "")
}

/// The server's folder, the `postgres` user's.
fn new_dir() -> Result<PathBuf, String> {
    let dir = tempfile::Builder::new()
        .prefix("hookrelay-pg-")
        .tempdir()
        .map_err(|e| e.to_string())?
        .keep();
    run(Command::new("chown").args(["postgres:postgres"]).arg(&dir))?;
    Ok(dir)
}

/// Starts a server in `dir` (see [`new_dir`]), with `env` (`NAME=value …`) in its
/// environment.
fn start_in(dir: PathBuf, env: &str) -> Result<Server, String> {
    let bin = bin_dir().ok_or("no PostgreSQL under /usr/lib/postgresql")?;
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
    // The server stops, and its folder goes, within a second of this process ending
    // (whichever postmaster runs then: a test may have restarted it).
    let script = format!(
        "runuser -u postgres -- env {env} '{postgres}' -D '{data}' -k '{dir}' -p {port} -c listen_addresses=127.0.0.1 \
         -c fsync=off -c synchronous_commit=on -c max_connections=200 >'{dir}/log' 2>&1 & \
         while kill -0 {me} 2>/dev/null && [ -d '{data}' ]; do sleep 1; done; \
         kill -INT \"$(head -n1 '{data}/postmaster.pid' 2>/dev/null)\" 2>/dev/null; sleep 2; rm -rf '{dir}'",
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
            Ok(_) => {
                return Ok(Server {
                    port,
                    bin,
                    data,
                    dir,
                });
            }
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

/// The server, or why none can run here (a failure when CI requires one).
fn available(started: Result<Server, String>) -> Option<Server> {
    match started {
        Ok(server) => Some(server),
        Err(reason) => {
            assert!(
                std::env::var_os("HOOKRELAY_REQUIRE_POSTGRES").is_none(),
                "HOOKRELAY_REQUIRE_POSTGRES is set but no PostgreSQL could start: {reason}"
            );
            eprintln!("SKIPPED: no PostgreSQL server for these tests ({reason})");
            None
        }
    }
}

impl Server {
    /// A server of this test's own, to restart or stop; `None` (test skipped) where no
    /// server can run here.
    pub fn own() -> Option<Server> {
        available(start())
    }

    /// [`Server::own`], its clock libfaketime's (`faketime`, the library): offset by what
    /// the returned file says (`+0`, `-1h`), read again at every look.
    pub fn own_with_clock(faketime: &Path) -> Option<(Server, PathBuf)> {
        let started = new_dir().and_then(|dir| {
            let offset = dir.join("faketime");
            std::fs::write(&offset, "+0").map_err(|e| e.to_string())?;
            let env = format!(
                "LD_PRELOAD='{}' FAKETIME_TIMESTAMP_FILE='{}' FAKETIME_NO_CACHE=1 FAKETIME_DONT_FAKE_MONOTONIC=1",
                faketime.display(),
                offset.display()
            );
            start_in(dir, &env).map(|server| (server, offset))
        });
        match started {
            Ok(started) => Some(started),
            Err(reason) => {
                // Says why (a failure where CI requires a server), and skips.
                let _ = available(Err(reason));
                None
            }
        }
    }

    /// A new empty database on this server.
    pub fn database(&self) -> Database {
        let name = format!(
            "hr_test_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let mut admin = self.admin_client();
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .expect("a test database");
        Database {
            url: format!("postgres://postgres@127.0.0.1:{}/{name}", self.port),
        }
    }

    fn admin_url(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.port
        )
    }

    /// `pg_ctl restart -m MODE` (`immediate` is a crash and its recovery); returns once the
    /// server takes connections again.
    pub fn restart(&self, mode: &str) {
        let log = self.dir.join("pg_ctl.log");
        run(Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .args(["restart", "-w", "-t", "60", "-m", mode, "-D"])
            .arg(&self.data)
            .arg("-l")
            .arg(&log))
        .expect("pg_ctl restart");
    }

    /// `pg_ctl stop -m MODE`, or `start` again after it.
    pub fn pg_ctl(&self, action: &str, mode: &str) {
        let log = self.dir.join("pg_ctl.log");
        let mut command = Command::new("runuser");
        command
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .args([action, "-w", "-t", "60", "-D"])
            .arg(&self.data)
            .arg("-l")
            .arg(&log);
        if action == "stop" {
            command.args(["-m", mode]);
        } else {
            // As the first start had them (only `restart` reads them back itself).
            command.arg("-o").arg(format!(
                "-p {} -k '{}' -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=on -c max_connections=200",
                self.port,
                self.dir.display()
            ));
        }
        run(&mut command).expect("pg_ctl");
    }

    /// Serves TLS with this certificate and key (PEM) from now on.
    pub fn enable_tls(&self, cert_pem: &str, key_pem: &str) {
        let (cert, key) = (self.data.join("server.crt"), self.data.join("server.key"));
        std::fs::write(&cert, cert_pem).expect("the certificate is written");
        std::fs::write(&key, key_pem).expect("the key is written");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        run(Command::new("chown")
            .args(["postgres:postgres"])
            .arg(&cert)
            .arg(&key))
        .expect("chown");
        self.admin("ALTER SYSTEM SET ssl = on");
        self.admin("SELECT pg_reload_conf()");
        std::thread::sleep(Duration::from_millis(500));
    }

    /// Streams the server's log to a `pg_receivewal` (as a standby would), until the
    /// server stops (`-n`: it does not reconnect).
    pub fn stream_to_a_receiver(&self) -> std::process::Child {
        let into = self.dir.join("received");
        std::fs::create_dir_all(&into).expect("the receiver's folder");
        run(Command::new("chown").args(["postgres:postgres"]).arg(&into)).expect("chown");
        Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_receivewal"))
            .args(["-n", "-h", "127.0.0.1", "-U", "postgres", "-p"])
            .arg(self.port.to_string())
            .arg("-D")
            .arg(&into)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("pg_receivewal starts")
    }

    /// How many receivers the server streams its log to now (`pg_stat_replication`).
    pub fn receivers(&self) -> i64 {
        let mut admin = self.admin_client();
        admin
            .query_one("SELECT count(*) FROM pg_stat_replication", &[])
            .expect("pg_stat_replication")
            .get(0)
    }

    /// A connection as the superuser to database `postgres`.
    fn admin_client(&self) -> postgres::Client {
        postgres::Client::connect(&self.admin_url(), postgres::NoTls)
            .expect("the test server takes connections")
    }

    /// Runs SQL as the superuser on database `postgres` (e.g. `pg_terminate_backend`).
    pub fn admin(&self, sql: &str) {
        let mut admin = self.admin_client();
        admin.batch_execute(sql).expect("admin SQL");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if SERVER.get().and_then(|s| s.as_ref()).map(|s| s.port) != Some(self.port) {
            let _ = Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(self.bin.join("pg_ctl"))
                .args(["stop", "-m", "immediate", "-D"])
                .arg(&self.data)
                .output();
            let _ = std::fs::remove_dir_all(&self.data);
        }
    }
}

impl Database {
    /// A new empty database on the shared server, or `None` (test skipped) where no server
    /// can run here.
    pub fn create() -> Option<Database> {
        let server = SERVER.get_or_init(|| available(start())).as_ref()?;
        Some(server.database())
    }
}
