//! Faults, for real: a second relay on the same state folder, a full disk under a
//! running relay (a small tmpfs as `--state`, filled and then freed), a disk taken under
//! the relay's reserve (by another file, and by an outage's backlog), and a backup onto a
//! full disk.
//!
//! The full-disk test mounts a tmpfs, which needs root. Where mounting is impossible it
//! says so on standard error and returns without checking anything; CI sets
//! `HOOKRELAY_REQUIRE_TMPFS=1`, which turns that into a failure, so it never passes there
//! unchecked.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::binary::*;
use common::*;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_relay_on_the_same_state_folder_is_refused_and_a_kill_9_leaves_no_stale_lock() {
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    durable_config(dir.path(), &upstream.url());
    let mut first = serve_in(dir.path());
    let address = first.address();
    assert_eq!(
        github_tag(&address, "s3cret-for-the-tests").await.status,
        202
    );

    // Webhook bodies are in there: the folder and every file in it are the owner's alone,
    // whatever the umask of whoever started the relay.
    use std::os::unix::fs::PermissionsExt;
    let state = dir.path().join("state");
    let mode = |name: &str| {
        std::fs::metadata(state.join(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode(""), 0o700);
    for file in [
        "hookrelay.sqlite3",
        "hookrelay.sqlite3-wal",
        "hookrelay.lock",
    ] {
        assert_eq!(mode(file), 0o600, "{file}");
    }

    let second = Command::new(BIN)
        .args(["serve", "--config", dir.path().to_str().unwrap()])
        .args(["--listen", "127.0.0.1:0", "--state"])
        .arg(dir.path().join("state"))
        .env("HOOKRELAY_TEST_TOKEN", "glptt-test")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("another hookrelay is already using the state folder"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("pid {}", first.child.id())),
        "names the running relay: {stderr}"
    );

    // Killed hard, the first leaves no lock behind: the kernel released it.
    Command::new("kill")
        .args(["-KILL", &first.child.id().to_string()])
        .status()
        .unwrap();
    let _ = first.child.wait();
    let mut again = serve_in(dir.path());
    let _ = again.address();
    let (code, _) = again.terminate();
    assert_eq!(code, Some(0));
}

/// A tmpfs of `size` mounted on a new folder; unmounted on drop.
struct Tmpfs {
    path: PathBuf,
    _parent: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Result<Tmpfs, String> {
        let parent = tempfile::tempdir().unwrap();
        let path = parent.path().join("state");
        std::fs::create_dir(&path).unwrap();
        let size = format!("size={size}");
        run(
            "mount",
            &[
                "-t".as_ref(),
                "tmpfs".as_ref(),
                "-o".as_ref(),
                size.as_ref(),
                "tmpfs".as_ref(),
                path.as_ref(),
            ],
        )?;
        Ok(Tmpfs {
            path,
            _parent: parent,
        })
    }
}

impl Tmpfs {
    /// [`Tmpfs::mount`], or `None` after saying on standard error that `test` is skipped:
    /// a failure instead where `HOOKRELAY_REQUIRE_TMPFS` is set (CI).
    fn mount_or_skip(size: &str, test: &str) -> Option<Tmpfs> {
        match Tmpfs::mount(size) {
            Ok(tmpfs) => Some(tmpfs),
            Err(reason) => {
                assert!(
                    std::env::var_os("HOOKRELAY_REQUIRE_TMPFS").is_none(),
                    "HOOKRELAY_REQUIRE_TMPFS is set but no tmpfs could be mounted: {reason}"
                );
                eprintln!("SKIPPED: cannot mount a tmpfs for {test} ({reason}); run as root");
                None
            }
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = run("umount", &["-l".as_ref(), self.path.as_ref()]);
    }
}

/// Fills the file system holding `folder` to its last byte.
fn fill(folder: &Path) -> PathBuf {
    use std::io::Write;
    let path = folder.join("filler");
    let mut file = std::fs::File::create(&path).unwrap();
    let block = vec![0u8; 64 * 1024];
    for size in [block.len(), 4096, 1] {
        while file.write_all(&block[..size]).is_ok() {}
    }
    let _ = file.sync_all();
    path
}

/// A relay serving [`durable_config`] with `upstream` as its GitLab and its state on
/// `state`: `delivery` added to its `[delivery]` section (a reserve, say) and `more` to
/// the end. The folder it reads is dropped with the returned `TempDir`.
fn durable_relay_on(
    state: &Path,
    upstream: &str,
    delivery: &str,
    more: &str,
) -> (tempfile::TempDir, Served) {
    let dir = tempfile::tempdir().unwrap();
    durable_config(dir.path(), upstream);
    let config = dir.path().join("relay.toml");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("[delivery]\n", &format!("[delivery]\n{delivery}"));
    std::fs::write(&config, text + more).unwrap();
    let mut command = Command::new(BIN);
    command.env("HOOKRELAY_TEST_TOKEN", "glptt-test");
    let served = Served::start_with(command, dir.path(), state);
    (dir, served)
}

/// Waits until `/readyz` answers `status`; fails saying `what` after `within`. Asks
/// every 100 ms: each `503` is a log line, and the full-disk test counts them.
async fn wait_for_ready(address: &str, status: u16, within: Duration, what: &str) {
    let since = Instant::now();
    while ready(address).await != status {
        assert!(since.elapsed() < within, "{what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn ready(address: &str) -> u16 {
    send("GET", &format!("http://{address}/readyz"), &[], "")
        .await
        .status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_webhooks_then_heals_without_a_restart_or_a_duplicate() {
    let Some(state) = Tmpfs::mount_or_skip("3m", "the full-disk test") else {
        return;
    };
    let upstream = RecordingUpstream::start().await;
    let (_dir, mut served) = durable_relay_on(&state.path, &upstream.url(), "", "");
    let address = served.address();

    // `a` is on its way to GitLab, which takes 3 s to answer; `b` waits behind it.
    upstream.answer_next(Answer::created().delayed(Duration::from_secs(3)));
    let a = github_tag(&address, "s3cret-for-the-tests").await;
    assert_eq!(a.status, 202, "{}", a.text());
    for _ in 0..200 {
        if !upstream.received().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(upstream.received().len(), 1, "a is being sent");
    let b = github_tag(&address, "s3cret-for-the-tests").await;
    assert_eq!(b.status, 202, "{}", b.text());

    // The disk fills up while a is in flight: webhooks are refused, never acknowledged.
    let filler = fill(&state.path);
    let started = Instant::now();
    let mut refused = 0;
    let mut acknowledged = vec![a.json()["delivery"].clone(), b.json()["delivery"].clone()];
    for _ in 0..200 {
        let reply = github_tag(&address, "s3cret-for-the-tests").await;
        match reply.status {
            503 => {
                refused += 1;
                assert!(
                    reply.text().contains("not acknowledged"),
                    "{}",
                    reply.text()
                );
                if refused == 3 {
                    break;
                }
            }
            202 => acknowledged.push(reply.json()["delivery"].clone()),
            other => panic!("unexpected {other}: {}", reply.text()),
        }
    }
    assert_eq!(refused, 3, "webhooks are refused while the disk is full");
    assert_eq!(
        ready(&address).await,
        503,
        "/readyz says the store cannot be written"
    );
    let readyz = send("GET", &format!("http://{address}/readyz"), &[], "").await;
    assert!(
        readyz.text().contains("cannot be written"),
        "{}",
        readyz.text()
    );

    // GitLab answers a while the disk is still full; its outcome cannot be written yet.
    while started.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        upstream.received().len(),
        1,
        "b waits behind a until a's outcome is written"
    );

    // Space again, no restart: ready within a few seconds, a recorded once, b sent after.
    std::fs::remove_file(filler).unwrap();
    wait_for_ready(
        &address,
        200,
        Duration::from_secs(10),
        "/readyz stays 503 after the disk was freed",
    )
    .await;
    let c = github_tag(&address, "s3cret-for-the-tests").await;
    assert_eq!(c.status, 202, "{}", c.text());
    acknowledged.push(c.json()["delivery"].clone());
    let wanted: std::collections::BTreeSet<String> = acknowledged
        .iter()
        .map(|d| d.as_str().unwrap().to_owned())
        .collect();
    for _ in 0..500 {
        if delivered(&upstream) == wanted {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        delivered(&upstream),
        wanted,
        "every acknowledged webhook sent"
    );
    assert_eq!(
        upstream.received().len(),
        wanted.len(),
        "and each exactly once: no duplicate pipeline from the store error"
    );
    let order = deliveries_in_order(&upstream.received());
    assert_eq!(order[0], a.json()["delivery"].as_str().unwrap());
    assert_eq!(order[1], b.json()["delivery"].as_str().unwrap());

    let (code, lines) = served.terminate();
    assert_eq!(code, Some(0));
    if std::env::var_os("SHOW_RELAY_LOG").is_some() {
        eprintln!("{}", lines.join("\n"));
    }
    // Nothing stays `sending`, and the store errors were not logged in a flood.
    let rows = stored_rows(&state.path);
    assert!(rows.iter().all(|r| r["state"] == "sent"), "{rows:#?}");
    let errors = lines
        .iter()
        .filter(|l| l.contains("ERROR") || l.contains("WARN"))
        .count();
    assert!(errors <= 30, "{errors} error lines:\n{}", lines.join("\n"));
}

/// Another process takes the disk down to under the relay's reserve (`[delivery]
/// min_free_disk`), not to its last byte: new webhooks and gateway calls are refused with
/// the reason, `/readyz` says it, and the triggers already queued are still sent and
/// recorded, each once. With room again the relay takes webhooks without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn below_the_disk_reserve_new_work_is_refused_while_the_queue_still_drains() {
    let Some(state) = Tmpfs::mount_or_skip("24m", "the disk-reserve test") else {
        return;
    };
    let upstream = RecordingUpstream::start().await;
    let (_dir, mut served) = durable_relay_on(
        &state.path,
        &upstream.url(),
        "min_free_disk = \"8MiB\"\n",
        "[gateway]\nupstream = \"gitlab\"\n",
    );
    let address = served.address();
    let secret = "s3cret-for-the-tests";

    // GitLab takes 2 s over the first trigger: `b` waits behind it.
    upstream.answer_next(Answer::created().delayed(Duration::from_secs(2)));
    let a = github_tag(&address, secret).await;
    assert_eq!(a.status, 202, "{}", a.text());
    let b = github_tag(&address, secret).await;
    assert_eq!(b.status, 202, "{}", b.text());

    // Another file takes the disk down to 4 MiB free, under the 8 MiB reserve.
    let filler = state.path.join("filler");
    let free = free_bytes(&state.path);
    std::fs::write(&filler, vec![0u8; (free - 4 * 1024 * 1024) as usize]).unwrap();
    wait_for_ready(
        &address,
        503,
        Duration::from_secs(5),
        "/readyz says 200 below the reserve",
    )
    .await;
    let readyz = send("GET", &format!("http://{address}/readyz"), &[], "").await;
    assert!(readyz.text().contains("min_free_disk"), "{}", readyz.text());
    let scrape = send("GET", &format!("http://{address}/metrics"), &[], "").await;
    let gauge = |name: &str| hookrelay::metrics::sample(&scrape.text(), name).unwrap();
    assert_eq!(
        gauge("hookrelay_store_disk_reserve_bytes "),
        8.0 * 1024.0 * 1024.0
    );
    assert!(gauge("hookrelay_store_disk_free_bytes ") < 8.0 * 1024.0 * 1024.0);
    let c = github_tag(&address, secret).await;
    assert_eq!(c.status, 503, "{}", c.text());
    let refusal = c.json()["message"].as_str().unwrap().to_owned();
    assert!(
        refusal.starts_with(
            "the webhook was not stored, so it is not acknowledged; try again: the store's disk has"
        ) && refusal.contains("under its reserve of 8.0 MiB ([delivery] min_free_disk)"),
        "{refusal}"
    );
    let call = send(
        "POST",
        &format!(
            "http://{address}/api/v4/projects/9/trigger/pipeline?token=glptt-gateway&ref=main"
        ),
        &[],
        "",
    )
    .await;
    assert_eq!(call.status, 503, "{}", call.text());
    assert!(
        call.text().contains("not forwarded to GitLab"),
        "{}",
        call.text()
    );

    // The queue drains below the reserve all the same: a, then b, each once.
    let wanted: std::collections::BTreeSet<String> = [&a, &b]
        .iter()
        .map(|reply| reply.json()["delivery"].as_str().unwrap().to_owned())
        .collect();
    for _ in 0..500 {
        if delivered(&upstream) == wanted {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(delivered(&upstream), wanted, "the queued triggers are sent");
    assert_eq!(
        upstream.received().len(),
        2,
        "each once; the gateway call never"
    );
    assert_eq!(ready(&address).await, 503, "still below the reserve");

    // Room again, no restart.
    std::fs::remove_file(&filler).unwrap();
    wait_for_ready(
        &address,
        200,
        Duration::from_secs(5),
        "/readyz stays 503 with room again",
    )
    .await;
    let d = github_tag(&address, secret).await;
    assert_eq!(d.status, 202, "{}", d.text());

    let (code, lines) = served.terminate();
    assert_eq!(code, Some(0));
    let crossings: Vec<&String> = lines
        .iter()
        .filter(|line| line.contains("min_free_disk") || line.contains("has room again"))
        .collect();
    assert!(
        crossings.len() >= 2
            && crossings[0].contains("WARN")
            && crossings.last().unwrap().contains("has room again"),
        "each crossing logged once: {crossings:#?}"
    );
    let rows = stored_rows(&state.path);
    let sent: std::collections::BTreeSet<String> = rows
        .iter()
        .filter(|r| r["state"] == "sent")
        .map(|r| r["delivery_id"].as_str().unwrap().to_owned())
        .collect();
    assert!(sent.is_superset(&wanted), "{rows:#?}");
    assert!(
        rows.iter()
            .all(|r| r["state"] == "sent" || r["state"] == "queued"),
        "nothing stays sending: {rows:#?}"
    );
}

/// The relay's own backlog fills its disk during a GitLab outage: webhooks are taken
/// until the disk is down to the reserve, refused from then on (never a store error, so
/// never a write that fails), and once GitLab is back every acknowledged webhook is sent,
/// each once, while the disk stays under the reserve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outages_backlog_stops_at_the_reserve_and_drains_when_gitlab_is_back() {
    let Some(state) = Tmpfs::mount_or_skip("16m", "the backlog-reserve test") else {
        return;
    };
    // GitLab is down: nothing listens on its address yet.
    let gitlab = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let gitlab_address = gitlab.local_addr().unwrap().to_string();
    drop(gitlab);
    let (_dir, mut served) = durable_relay_on(
        &state.path,
        &format!("http://{gitlab_address}"),
        "min_free_disk = \"10MiB\"\n",
        "",
    );
    let address = served.address();
    let secret = "s3cret-for-the-tests";

    let mut acknowledged = std::collections::BTreeSet::new();
    let mut refusal = None;
    for _ in 0..4_000 {
        let reply = github_tag(&address, secret).await;
        match reply.status {
            202 => {
                acknowledged.insert(reply.json()["delivery"].as_str().unwrap().to_owned());
            }
            503 => {
                refusal = Some(reply.json()["message"].as_str().unwrap().to_owned());
                break;
            }
            other => panic!("unexpected {other}: {}", reply.text()),
        }
    }
    let refusal = refusal.expect("the backlog reaches the reserve");
    assert!(refusal.contains("[delivery] min_free_disk"), "{refusal}");
    assert!(
        acknowledged.len() > 100,
        "{} webhooks taken before the reserve",
        acknowledged.len()
    );
    assert!(
        free_bytes(&state.path) > 8 * 1024 * 1024,
        "the reserve held"
    );

    // GitLab is back: every acknowledged webhook is sent, each once.
    let upstream = RecordingUpstream::start_on(&gitlab_address).await;
    let until = Instant::now() + Duration::from_secs(60);
    while delivered(&upstream).len() < acknowledged.len() && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        delivered(&upstream),
        acknowledged,
        "every acknowledged webhook sent"
    );
    assert_eq!(upstream.received().len(), acknowledged.len(), "each once");
    let (code, lines) = served.terminate();
    assert_eq!(code, Some(0));
    assert!(
        !lines.iter().any(|line| line.contains("ERROR")),
        "no store error: {}",
        lines.join("\n")
    );
}

/// What the file system holding `folder` has free, as `df` says.
fn free_bytes(folder: &Path) -> u64 {
    let out = Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(folder)
        .output()
        .unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .nth(1)
        .expect("df prints a figure")
        .trim()
        .parse()
        .unwrap()
}

/// Opens a connection and sends a webhook's headers and `sent` bytes of a body that
/// claims `length`; the rest never comes.
async fn partial_webhook(
    addr: &str,
    path: &str,
    length: usize,
    sent: usize,
) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         X-GitHub-Event: push\r\nX-Hub-Signature-256: sha256=00\r\nContent-Length: {length}\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&vec![b' '; sent]).await.unwrap();
    stream
}

/// Reads an HTTP answer's status line from a raw connection (bounded).
async fn status_of(stream: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut answer = vec![0u8; 4096];
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut answer))
        .await
        .expect("an answer within 5 s")
        .unwrap();
    String::from_utf8_lossy(&answer[..read])
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_cannot_be_valid_is_refused_before_its_body_and_bodies_share_one_budget() {
    let upstream = RecordingUpstream::start().await;
    let config = format!(
        "[server]\nmax_body = \"1MiB\"\nbody_memory = \"1MiB\"\n\
         [upstream.gitlab]\nurl = \"{}\"\n[source.github]\nprovider = \"github\"\nsecret = \"file:{{dir}}/secret\"\n",
        upstream.url()
    );
    let relay = Relay::start_with(&config, &[("secret", "s3cret-for-the-tests")]).await;
    let addr = relay.addr.to_string();

    // An unknown source, and a webhook with no signature header: answered while the
    // body (which claims 900 KB) has not been sent at all.
    let mut unknown = partial_webhook(&addr, "/hooks/nope", 900_000, 0).await;
    assert!(status_of(&mut unknown).await.contains(" 404 "));
    let mut unsigned = {
        use tokio::io::AsyncWriteExt;
        let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
        stream
            .write_all(b"POST /hooks/github HTTP/1.1\r\nHost: x\r\nX-GitHub-Event: push\r\nContent-Length: 900000\r\n\r\n")
            .await
            .unwrap();
        stream
    };
    assert!(status_of(&mut unsigned).await.contains(" 401 "));

    // One slow sender holds 800 KB of the 1 MiB budget; a second body that needs more
    // room than is left waits a moment, then is told to come back.
    let _slow = partial_webhook(&addr, "/hooks/github", 1_000_000, 800_000).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut second = partial_webhook(&addr, "/hooks/github", 600_000, 600_000).await;
    let status = status_of(&mut second).await;
    assert!(status.contains(" 503 "), "{status}");
    // A small webhook still fits and is checked as usual (a wrong signature here).
    let small = post(
        &relay.url("/hooks/github"),
        &[
            ("X-GitHub-Event", "push"),
            ("X-Hub-Signature-256", "sha256=00"),
        ],
        "{}",
    )
    .await;
    assert_eq!(small.status, 401, "{}", small.text());
    assert!(upstream.received().is_empty());
}

/// The relay's peak resident memory so far, from /proc (kB).
fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap()
}

/// Sends 40 bodies of 25 MiB at once (with `signature`, or none), each on its own
/// connection, and waits (bounded) until every connection has its answer or is closed.
async fn forty_big_bodies(addr: &str, signature: Option<&str>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = std::sync::Arc::new(vec![b' '; 25 * 1024 * 1024 - 1024]);
    let mut senders = Vec::new();
    for _ in 0..40 {
        let (addr, body) = (addr.to_owned(), body.clone());
        let signature = signature
            .map(|s| format!("X-Hub-Signature-256: {s}\r\n"))
            .unwrap_or_default();
        senders.push(tokio::spawn(async move {
            let Ok(stream) = tokio::net::TcpStream::connect(&addr).await else { return };
            let (mut reader, mut writer) = stream.into_split();
            let head = format!(
                "POST /hooks/github HTTP/1.1\r\nHost: x\r\nX-GitHub-Event: push\r\n{signature}Content-Length: {}\r\n\r\n",
                body.len()
            );
            let write = async move {
                let _ = writer.write_all(head.as_bytes()).await;
                let _ = writer.write_all(&body).await;
            };
            let read = async move {
                let mut answer = [0u8; 256];
                let _ = reader.read(&mut answer).await;
            };
            let _ = tokio::time::timeout(Duration::from_secs(30), async {
                tokio::join!(write, read)
            })
            .await;
        }));
    }
    for sender in senders {
        let _ = sender.await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_parallel_25_mib_bodies_stay_within_the_body_budget() {
    let DurableRelay {
        upstream: _upstream,
        dir: _dir,
        served,
        address,
    } = DurableRelay::start().await;
    let pid = served.child.id();
    let before = peak_rss_kib(pid);

    // Unsigned: refused before a byte of any body is read.
    forty_big_bodies(&address, None).await;
    let unsigned = peak_rss_kib(pid);
    assert!(
        unsigned < 100 * 1024,
        "peak RSS {unsigned} kB after 40 unsigned 25 MiB bodies (started at {before} kB)"
    );
    // With a (wrong) signature header: read, but 64 MiB of bodies at most at any time.
    forty_big_bodies(&address, Some("sha256=00")).await;
    let signed = peak_rss_kib(pid);
    assert!(
        signed < before + (64 + 64) * 1024,
        "peak RSS {signed} kB after 40 signed-looking 25 MiB bodies (started at {before} kB)"
    );
    eprintln!(
        "peak RSS: {before} kB at start, {unsigned} kB after unsigned bodies, {signed} kB after signed-looking ones"
    );
    // And the relay still answers.
    takes_one_more_and_stops(served, &address).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sockets_cannot_take_every_descriptor_from_signed_webhooks() {
    // This test holds 1,100 sockets itself.
    rlimit::increase_nofile_limit(4096).unwrap();
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    durable_config(dir.path(), &upstream.url());
    // The relay runs with the usual 1,024 open files, soft and hard.
    let mut command = Command::new("sh");
    command
        .args(["-c", "ulimit -n 1024 && exec \"$0\" \"$@\"", BIN])
        .env("HOOKRELAY_TEST_TOKEN", "glptt-test");
    let mut served = Served::start_with(command, dir.path(), &dir.path().join("state"));
    let address = served.address();
    assert!(
        served
            .wait_for("open-file limit")
            .contains("open_file_limit=1024")
    );

    // Someone opens 1,100 connections and sends nothing.
    let idle: Vec<std::net::TcpStream> = (0..1100)
        .map(|_| std::net::TcpStream::connect(&address).unwrap())
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;

    // A signed webhook is still answered, promptly, and so is /healthz.
    let started = Instant::now();
    let reply = tokio::time::timeout(
        Duration::from_secs(2),
        github_tag(&address, "s3cret-for-the-tests"),
    )
    .await
    .expect("a signed webhook is answered within 2 s");
    assert_eq!(reply.status, 202, "{}", reply.text());
    let health = tokio::time::timeout(
        Duration::from_secs(2),
        send("GET", &format!("http://{address}/healthz"), &[], ""),
    )
    .await
    .expect("/healthz answers within 2 s");
    assert_eq!(health.status, 200);
    let metrics = send("GET", &format!("http://{address}/metrics"), &[], "").await;
    let shed: f64 = metrics
        .text()
        .lines()
        .find_map(|l| l.strip_prefix("hookrelay_connections_shed_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    assert!(
        shed >= 100.0,
        "{shed} idle connections shed:\n{}",
        metrics.text()
    );
    eprintln!(
        "answered in {:?} with 1,100 idle sockets open; {shed} shed",
        started.elapsed()
    );
    drop(idle);
    let (code, lines) = served.terminate();
    assert_eq!(code, Some(0));
    assert!(
        !lines.iter().any(|l| l.contains("Too many open files")),
        "{}",
        lines.join("\n")
    );
}

/// `hookrelay backup` onto a full disk fails with the file and the reason, and leaves
/// nothing behind: neither the file it created nor the journal SQLite kept beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_onto_a_full_disk_fails_and_leaves_nothing_behind() {
    let Some(target) = Tmpfs::mount_or_skip("1m", "the backup test") else {
        return;
    };
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    durable_config(dir.path(), &upstream.url());
    let mut served = serve_in(dir.path());
    let reply = github_tag(&served.address(), "s3cret-for-the-tests").await;
    assert_eq!(reply.status, 202);
    let filler = fill(&target.path);
    let copy = target.path.join("copy.sqlite3");
    let state = dir.path().join("state");
    let output = Command::new(BIN)
        .args(["backup", "--state", state.to_str().unwrap()])
        .arg(&copy)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("writing {}", copy.display())) && stderr.contains("full"),
        "{stderr}"
    );
    let left: Vec<PathBuf> = std::fs::read_dir(&target.path)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .collect();
    assert_eq!(left, vec![filler], "nothing but the filler is left");
    let (code, _) = served.terminate();
    assert_eq!(code, Some(0));
}

/// The store file deleted under a running relay (its state folder cleaned up, a tmpfs
/// emptied): SQLite writes on to the open file, which no one can open again, so what it
/// acknowledged would be gone at the next start. Webhooks are refused with why, `/readyz`
/// says so, and the triggers already waiting in the open file are still sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_file_deleted_under_the_relay_acknowledges_nothing_more_and_sends_what_waits() {
    let DurableRelay {
        upstream,
        dir,
        served,
        address,
    } = DurableRelay::start().await;
    // `a` is on its way to GitLab, which takes 2 s to answer; `b` waits behind it.
    upstream.answer_next(Answer::created().delayed(Duration::from_secs(2)));
    let a = github_tag(&address, "s3cret-for-the-tests").await;
    assert_eq!(a.status, 202, "{}", a.text());
    let b = github_tag(&address, "s3cret-for-the-tests").await;
    assert_eq!(b.status, 202, "{}", b.text());
    assert_eq!(ready(&address).await, 200);

    for entry in std::fs::read_dir(dir.path().join("state")).unwrap() {
        let path = entry.unwrap().path();
        if path.to_string_lossy().contains("hookrelay.sqlite3") {
            std::fs::remove_file(path).unwrap();
        }
    }
    let refused = github_tag(&address, "s3cret-for-the-tests").await;
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert!(
        refused
            .text()
            .contains("hookrelay.sqlite3 was deleted while the relay ran"),
        "{}",
        refused.text()
    );
    assert_eq!(ready(&address).await, 503);
    let deliveries = [a.json()["delivery"].clone(), b.json()["delivery"].clone()];
    let started = Instant::now();
    while delivered(&upstream).len() < 2 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "what waited is still sent: {:?} of {deliveries:?}",
            delivered(&upstream)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, lines) = served.terminate();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("was deleted while the relay ran")),
        "{lines:?}"
    );
}

/// Connections that each send 400 KB of a header without its end: each is answered `431`
/// once its headers pass 32 KB, and the relay holds at most that much for each (hyper's
/// default let each hold 408 KB: 500 such connections took the relay from 17 MB to
/// 229 MB). Then the relay serves as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endless_headers_are_refused_at_32_kb_and_hold_no_more() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let DurableRelay {
        upstream: _upstream,
        dir: _dir,
        served,
        address,
    } = DurableRelay::start().await;
    let pid = served.child.id();
    let before = peak_rss_kib(pid);
    let header = format!(
        "POST /hooks/github HTTP/1.1\r\nHost: x\r\nX-Endless: {}",
        "a".repeat(400 * 1024)
    );
    let mut connections = Vec::new();
    for _ in 0..400 {
        let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
        // The relay may close the connection before all of it is written.
        let _ = stream.write_all(header.as_bytes()).await;
        connections.push(stream);
    }
    let peak = peak_rss_kib(pid);
    let mut refused = 0;
    for stream in &mut connections {
        let mut answer = Vec::new();
        if let Ok(Ok(_)) =
            tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await
            && answer.starts_with(b"HTTP/1.1 431")
        {
            refused += 1;
            if refused == 1 {
                let message = json_message_of(&answer);
                assert!(message.contains("more than 32 KiB"), "{message}");
            }
        }
    }
    assert_eq!(refused, 400, "each is answered 431 with its reason");
    assert!(
        peak < before + 64 * 1024,
        "peak RSS {peak} kB with 400 endless headers (started at {before} kB)"
    );
    drop(connections);
    takes_one_more_and_stops(served, &address).await;
}

/// The `{"message": ...}` body of a whole HTTP answer read off a socket.
fn json_message_of(answer: &[u8]) -> String {
    let text = String::from_utf8_lossy(answer);
    let (head, body) = text.split_once("\r\n\r\n").expect("an answer with a head");
    assert!(head.contains("content-type: application/json"), "{text}");
    let body: serde_json::Value = serde_json::from_str(body).expect("a JSON body");
    body["message"].as_str().expect("a message").to_owned()
}

/// Requests hyper cannot read, answered by hyper itself before the relay sees them, get
/// the JSON body every refusal has, saying what was wrong (before: `400` or `431` and
/// nothing else). Then the relay serves as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_requests_are_told_why_in_json() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let DurableRelay {
        upstream: _upstream,
        dir: _dir,
        served,
        address,
    } = DurableRelay::start().await;
    let many_headers: String = (0..101).map(|i| format!("X-H{i}: v\r\n")).collect();
    for (request, status, says) in [
        (
            "GARBAGE\r\n\r\n".to_owned(),
            "400",
            "could not be read as HTTP/1.1",
        ),
        (
            "POST /hooks/github HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n".to_owned(),
            "400",
            "malformed",
        ),
        (
            format!("GET /readyz HTTP/1.1\r\nHost: x\r\n{many_headers}\r\n"),
            "431",
            "more than 100 headers",
        ),
        (
            format!(
                "GET /readyz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
                "a".repeat(100 * 1024)
            ),
            "431",
            "more than 32 KiB",
        ),
    ] {
        let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
        let _ = stream.write_all(request.as_bytes()).await;
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
            .await
            .unwrap_or_else(|_| panic!("{says}: not answered and closed within 5 s: {answer:?}"))
            .unwrap();
        let text = String::from_utf8_lossy(&answer);
        assert!(text.starts_with(&format!("HTTP/1.1 {status} ")), "{text}");
        let message = json_message_of(&answer);
        assert!(message.contains(says), "{message}");
    }
    takes_one_more_and_stops(served, &address).await;
}

/// The store refusing every webhook for a reason that does not pass by itself (here a
/// trigger added to the live file raising an error; a schema tampered with, a corrupt
/// index fail alike): each webhook gets `503` with the reason, `/readyz` says it until
/// the store takes webhooks again, and turns ready with no webhook arriving once it
/// does (the relay tries one of its own each second, undone). Before, `/readyz` said
/// `200` throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_refuses_webhooks_for_good_is_shown_on_readyz() {
    let DurableRelay {
        upstream: _upstream,
        dir,
        served,
        address,
    } = DurableRelay::start().await;
    assert_eq!(
        github_tag(&address, "s3cret-for-the-tests").await.status,
        202
    );
    let store = dir.path().join("state").join("hookrelay.sqlite3");
    let sql = |sql: &str| {
        let conn = rusqlite::Connection::open(&store).unwrap();
        conn.busy_timeout(Duration::from_secs(10)).unwrap();
        conn.execute_batch(sql).unwrap();
    };
    sql(
        "CREATE TRIGGER refuse BEFORE INSERT ON deliveries BEGIN SELECT RAISE(ABORT, 'not now'); END;",
    );
    let readyz = || async { send("GET", &format!("http://{address}/readyz"), &[], "").await };
    let refused = github_tag(&address, "s3cret-for-the-tests").await;
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert!(refused.text().contains("not now"), "{}", refused.text());
    let ready = readyz().await;
    assert_eq!(ready.status, 503, "{}", ready.text());
    assert!(ready.text().contains("not now"), "{}", ready.text());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        readyz().await.status,
        503,
        "still refused, with no webhook coming"
    );

    sql("DROP TRIGGER refuse");
    let waited = std::time::Instant::now();
    while readyz().await.status != 200 {
        assert!(
            waited.elapsed() < Duration::from_secs(5),
            "never ready again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    takes_one_more_and_stops(served, &address).await;
}

/// An anonymous client sending unsigned webhooks and scanning paths as fast as it can:
/// each refusal is answered and counted, but at most `REFUSALS_LOGGED_A_SECOND` of each
/// kind a second reach the log, and the next line that does says how many were left
/// out. Before, every refused webhook wrote two lines (400 bytes): tens of megabytes a
/// second of log for anyone to make.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_refused_requests_cannot_flood_the_log() {
    let DurableRelay {
        upstream: _upstream,
        dir: _dir,
        served,
        address,
    } = DurableRelay::start().await;
    let started = std::time::Instant::now();
    for round in 0..30 {
        let sends = (0..20).map(|i| {
            let address = address.clone();
            async move {
                let delivery = format!("flood-{round}-{i}");
                let unsigned = send(
                    "POST",
                    &format!("http://{address}/hooks/github"),
                    &[
                        ("x-github-event", "push"),
                        ("x-github-delivery", &delivery),
                        ("x-hub-signature-256", "sha256=00"),
                    ],
                    "{}",
                )
                .await
                .status;
                let scan = send("GET", &format!("http://{address}/wp-admin-{i}"), &[], "")
                    .await
                    .status;
                (unsigned, scan)
            }
        });
        for answers in futures_util::future::join_all(sends).await {
            assert_eq!(answers, (401, 404));
        }
    }
    let seconds = started.elapsed().as_secs() + 1;
    // Past the period, so that the next line says how many were left out.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // A path of 20 KB: answered and logged with its first 200 bytes and its length.
    let long = format!("/wp-admin-last{}", "x".repeat(20_000));
    let last = send("GET", &format!("http://{address}{long}"), &[], "").await;
    assert_eq!(last.status, 404);
    assert!(
        last.text().contains("… (20014 bytes)") && last.text().len() < 400,
        "{}",
        last.text()
    );
    let (code, lines) = served.terminate();
    assert_eq!(code, Some(0));
    let refused: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("request refused"))
        .collect();
    let most = 2 * hookrelay::app::REFUSALS_LOGGED_A_SECOND * (seconds + 1) + 1;
    assert!(
        (refused.len() as u64) <= most,
        "{} refusal lines for 1,201 refusals over {seconds} s (at most {most})",
        refused.len()
    );
    assert!(
        !lines.iter().any(|l| l.contains("webhook refused")),
        "one line a refusal, not two"
    );
    let summary = refused.last().unwrap();
    assert!(
        summary.contains("/wp-admin-last") && summary.contains("held_back="),
        "{summary}"
    );
    assert!(
        summary.contains("… (20014 bytes)") && summary.len() < 1_000,
        "{summary}"
    );
}

/// A relay configured in `dir` (retries 3 s apart) with its state in `state`, whose wall
/// clock libfaketime moves by what [`set_clock`] writes (its monotonic clock runs on, as
/// the kernel's does when the wall clock is set).
fn relay_on_a_clock_of_its_own(dir: &Path, upstream: &RecordingUpstream, state: &Path) -> Served {
    durable_config(dir, &upstream.url());
    // Retries a few seconds apart, so that the first one waits when the clock is set.
    let config = std::fs::read_to_string(dir.join("relay.toml"))
        .unwrap()
        .replace("retry_base = \"50ms\"", "retry_base = \"3s\"")
        .replace("retry_cap = \"200ms\"", "retry_cap = \"3s\"");
    write(dir, "relay.toml", &config);
    write(dir, "faketime", "+0");
    let mut command = Command::new(BIN);
    command
        .env("HOOKRELAY_TEST_TOKEN", "glptt-test")
        .env("LD_PRELOAD", FAKETIME)
        .env("FAKETIME_TIMESTAMP_FILE", dir.join("faketime"))
        .env("FAKETIME_NO_CACHE", "1")
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
    Served::start_with(command, dir, state)
}

/// Sets the clock of [`relay_on_a_clock_of_its_own`] to `offset` (`-1h`). Renamed into
/// place: libfaketime reads the file at every look at the clock, and one written in place
/// can be read half written (empty: no offset for that look).
fn set_clock(dir: &Path, offset: &str) {
    write(dir, "faketime.new", offset);
    std::fs::rename(dir.join("faketime.new"), dir.join("faketime")).unwrap();
}

/// Waits (at most 15 s) for the retry of the first call, which a clock set back at
/// `set_back` would have held for the hour, and checks it came within 10 s of the step.
async fn the_retry_comes_within_seconds(upstream: &RecordingUpstream, set_back: Instant) {
    eventually(
        Duration::from_secs(15),
        "the retry, which waits for the hour the clock went back",
        || upstream.received().len() >= 2,
    )
    .await;
    let waited = set_back.elapsed();
    eprintln!("the retry came {waited:?} after the step");
    assert!(
        waited < Duration::from_secs(10),
        "the retry came {waited:?} after the step"
    );
}

/// The relay's clock set back an hour (an NTP step after a boot with a wrong hardware
/// clock, a virtual machine restored) while a trigger waits for its retry: the retry
/// comes when it was due, with no webhook arriving to wake anything, and a trigger queued
/// behind it follows; before, both waited the hour. The step is libfaketime's, for the
/// relay only (its monotonic clock runs on, as the kernel's does when the wall clock is
/// set).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_set_back_an_hour_delays_no_retry_and_nothing_behind_it() {
    if !faketime_here("HOOKRELAY_REQUIRE_TMPFS") {
        return;
    }
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut relay = relay_on_a_clock_of_its_own(dir.path(), &upstream, &dir.path().join("state"));
    let address = relay.address();
    let secret = "s3cret-for-the-tests";

    upstream.answer_next(Answer::new(
        500,
        r#"{"message":"500 Internal Server Error"}"#,
    ));
    assert_eq!(github_tag(&address, secret).await.status, 202);
    eventually(Duration::from_secs(10), "the first call", || {
        !upstream.received().is_empty()
    })
    .await;
    relay.wait_for("trigger will be retried");
    let set_back = Instant::now();
    set_clock(dir.path(), "-1h");

    the_retry_comes_within_seconds(&upstream, set_back).await;
    relay.wait_for("the store's clock went back");
    let metrics = send("GET", &format!("http://{address}/metrics"), &[], "")
        .await
        .text();
    assert!(
        metrics.contains("hookrelay_store_clock_steps_back_total 1"),
        "{metrics}"
    );
    assert_eq!(github_tag(&address, secret).await.status, 202);
    eventually(Duration::from_secs(10), "the next webhook's call", || {
        upstream.received().len() >= 3
    })
    .await;
    let order: Vec<Option<String>> = upstream.received().iter().map(delivery_of).collect();
    assert_eq!(order[0], order[1], "the first call, then its retry");
    assert_ne!(order[1], order[2]);
    let (code, lines) = relay.terminate();
    assert_eq!(code, Some(0), "{lines:#?}");
}

/// A retry's outcome made while the disk is full, kept in the writer's memory, and the
/// clock set back an hour before the disk has room again: once written, the retry comes
/// within seconds. Before, the store's deadlines moved back when the writer noticed the
/// step, but an outcome made before the step and written after it was not among them,
/// and its retry waited the hour (the race behind a run of
/// `a_clock_set_back_an_hour_delays_no_retry_and_nothing_behind_it` that failed once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_kept_in_memory_while_the_clock_is_set_back_comes_on_time() {
    if !faketime_here("HOOKRELAY_REQUIRE_TMPFS") {
        return;
    }
    let Some(state) = Tmpfs::mount_or_skip("3m", "the clock test on a full disk") else {
        return;
    };
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut relay = relay_on_a_clock_of_its_own(dir.path(), &upstream, &state.path);
    let address = relay.address();

    // GitLab answers 500 a second after the call, by when the disk is full.
    upstream.answer_next(
        Answer::new(500, r#"{"message":"500 Internal Server Error"}"#)
            .delayed(Duration::from_secs(1)),
    );
    assert_eq!(
        github_tag(&address, "s3cret-for-the-tests").await.status,
        202
    );
    eventually(Duration::from_secs(10), "the first call", || {
        !upstream.received().is_empty()
    })
    .await;
    let filler = fill(&state.path);
    relay.wait_for("trigger will be retried");
    // The outcome is refused (the writer says so), kept, and the clock goes back.
    relay.wait_for("cannot be written");
    set_clock(dir.path(), "-1h");
    let set_back = Instant::now();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    std::fs::remove_file(filler).unwrap();

    the_retry_comes_within_seconds(&upstream, set_back).await;
    let (code, lines) = relay.terminate();
    assert_eq!(code, Some(0), "{lines:#?}");
}

/// Standard error that takes no more lines (a pipe whose reader is stuck, a log collector
/// that stalls) must not stop the relay. Before, once 4 MiB of lines waited, every request
/// waited for the log: gateway calls, webhooks and `/readyz` went unanswered until the
/// reader came back, and SIGTERM never ended the process. Now the lines beyond are dropped
/// and counted, the first lines written again say how many, and on the way out the last
/// lines are waited for a few seconds only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_pipe_nobody_reads_holds_up_no_request() {
    use std::io::BufRead;
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "relay.toml",
        &gateway_config(&upstream.url(), ""),
    );
    let mut relay = KilledOnDrop(
        Command::new(BIN)
            .args(["serve", "--config", dir.path().to_str().unwrap()])
            .args(["--listen", "127.0.0.1:0", "--state"])
            .arg(dir.path().join("state"))
            // About a kilobyte of lines a gateway call (the upstream pool's among them).
            .env("RUST_LOG", "trace")
            .stderr(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let child = &mut relay.0;
    let mut log = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    let address = loop {
        line.clear();
        assert!(log.read_line(&mut line).unwrap() > 0, "the relay stopped");
        if let Some(at) = line.find("hookrelay listening address=") {
            let rest = &line[at + "hookrelay listening address=".len()..];
            break rest.split_whitespace().next().unwrap().to_owned();
        }
    };
    // From here on nobody reads the pipe: the kernel holds 64 KiB of it, the relay 4 MiB.
    let client = Client::builder(TokioExecutor::new()).build_http();
    let trigger =
        format!("http://{address}/api/v4/projects/9/trigger/pipeline?token=glptt-t&ref=main");
    let calls = |count: usize| {
        let (client, trigger) = (client.clone(), trigger.clone());
        async move {
            for _ in 0..count / 16 {
                let answers = futures_util::future::join_all(
                    (0..16).map(|_| answered(&client, "POST", &trigger)),
                )
                .await;
                for (status, body) in answers {
                    assert_eq!(status, 201, "{body}");
                }
            }
        }
    };
    calls(6_000).await;
    assert_eq!(upstream.received().len(), 6_000);
    let (status, body) = answered(&client, "GET", &format!("http://{address}/readyz")).await;
    assert_eq!(status, 200, "{body}");
    let (_, metrics) = answered(&client, "GET", &format!("http://{address}/metrics")).await;
    let dropped = hookrelay::metrics::sample(&metrics, "hookrelay_log_lines_dropped_total ")
        .expect("the dropped lines' count in /metrics");
    assert!(dropped > 0.0, "no line dropped after 6,000 calls");

    // Read again: the lines written after the stall say how many were dropped.
    let reading = std::thread::spawn(move || {
        let mut line = String::new();
        loop {
            line.clear();
            if log.read_line(&mut line).unwrap() == 0 {
                return None;
            }
            if line.contains("log lines dropped") {
                return Some((line.clone(), log));
            }
        }
    });
    let (said, log) = tokio::task::spawn_blocking(move || reading.join().unwrap())
        .await
        .unwrap()
        .expect("a line saying how many lines were dropped");
    assert!(said.contains("dropped_lines="), "{said}");

    // Stuck again (past the pipe's 64 KiB), then told to stop: the relay exits all the same.
    calls(320).await;
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let asked = Instant::now();
    let exited = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            asked.elapsed() < Duration::from_secs(30),
            "still running 30 s after SIGTERM, its log pipe stuck"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(exited.success(), "{exited:?}");
    drop(log);
}

/// (status, body) of one request through `client`, which must be answered within 10 s.
async fn answered(
    client: &Client<HttpConnector, http_body_util::Full<bytes::Bytes>>,
    method: &str,
    url: &str,
) -> (u16, String) {
    let request = http::Request::builder()
        .method(method)
        .uri(url)
        .body(http_body_util::Full::default())
        .unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(10), client.request(request))
        .await
        .unwrap_or_else(|_| panic!("{method} {url} was not answered within 10 s"))
        .unwrap();
    let status = answer.status().as_u16();
    let body = http_body_util::BodyExt::collect(answer.into_body())
        .await
        .unwrap()
        .to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// An ext4 file system in a file, mounted through a loop device on a folder of its own,
/// which a test can freeze (`fsfreeze`): every write to it then waits, as on a disk or a
/// network file system that stopped answering. Thawed and unmounted on drop.
struct FreezableDisk {
    path: PathBuf,
    _parent: tempfile::TempDir,
}

/// Runs a command, or says why it failed.
fn run(program: &str, args: &[&std::ffi::OsStr]) -> Result<(), String> {
    let output = Command::new(program)
        .args(args)
        .output()
        .map_err(|err| format!("{program}: {err}"))?;
    if output.status.success() {
        return Ok(());
    }
    Err(format!(
        "{program}: {}",
        String::from_utf8_lossy(&output.stderr).trim()
    ))
}

impl FreezableDisk {
    /// A 64 MiB disk, or `None` after saying on standard error that `test` is skipped
    /// (no loop device, no `mkfs.ext4`, not root): a failure instead where
    /// `HOOKRELAY_REQUIRE_FREEZE` is set.
    fn mount_or_skip(test: &str) -> Option<FreezableDisk> {
        let parent = tempfile::tempdir().unwrap();
        let image = parent.path().join("disk.img");
        let path = parent.path().join("state");
        std::fs::create_dir(&path).unwrap();
        std::fs::File::create(&image)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        let mounted =
            run("mkfs.ext4", &["-q".as_ref(), "-F".as_ref(), image.as_ref()]).and_then(|()| {
                run(
                    "mount",
                    &[
                        "-o".as_ref(),
                        "loop".as_ref(),
                        image.as_ref(),
                        path.as_ref(),
                    ],
                )
            });
        match mounted {
            Ok(()) => Some(FreezableDisk {
                path,
                _parent: parent,
            }),
            Err(reason) => {
                assert!(
                    std::env::var_os("HOOKRELAY_REQUIRE_FREEZE").is_none(),
                    "HOOKRELAY_REQUIRE_FREEZE is set but no loop device could be mounted: {reason}"
                );
                eprintln!("SKIPPED: cannot mount a loop device for {test} ({reason}); run as root");
                None
            }
        }
    }

    fn freeze(&self) {
        run("fsfreeze", &["-f".as_ref(), self.path.as_ref()]).unwrap();
    }

    fn thaw(&self) {
        run("fsfreeze", &["-u".as_ref(), self.path.as_ref()]).unwrap();
    }
}

impl Drop for FreezableDisk {
    fn drop(&mut self) {
        let _ = run("fsfreeze", &["-u".as_ref(), self.path.as_ref()]);
        let _ = run("umount", &["-l".as_ref(), self.path.as_ref()]);
    }
}

/// A disk that stops answering raises no error: a write to it just never ends. Before,
/// `/readyz` answered `200` for as long as it hung (a load balancer kept sending webhooks
/// that could not be acknowledged), and every webhook whose sender gave up stayed in
/// memory until the disk came back. Now `/readyz` answers `503` once a write has run 5 s,
/// a webhook waiting for the store keeps its body's room under `[server] body_memory`
/// (past it, webhooks are refused at once with `503`), and everything taken is written
/// and sent once the disk answers again. A dashboard action meanwhile is answered within
/// `ack_timeout` too, saying that the store did not answer, and is carried out once it does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_that_stops_answering_is_shown_on_readyz_and_holds_bounded_memory() {
    async fn patient_tag(address: &str, secret: &str) -> Reply {
        let url = format!("http://{address}/hooks/github");
        signed_github(&url, secret, "push", "patient", "github/push_tag.json").await
    }
    let Some(disk) = FreezableDisk::mount_or_skip("the frozen-disk test") else {
        return;
    };
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    durable_config(dir.path(), &upstream.url());
    // Room for about eight of the test's 7.9 KB webhooks.
    let config = dir.path().join("relay.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        format!(
            "[server]\nmax_body = \"16KiB\"\nbody_memory = \"64KiB\"\nack_timeout = \"8s\"\n\n\
             [admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"env:HOOKRELAY_ADMIN_TOKEN\"\n\n{text}"
        ),
    )
    .unwrap();
    let mut command = Command::new(BIN);
    command.env("HOOKRELAY_TEST_TOKEN", "glptt-test");
    command.env("HOOKRELAY_ADMIN_TOKEN", "admin-token-for-the-frozen-disk");
    let mut served = Served::start_with(command, dir.path(), &disk.path);
    let address = served.address();
    let dashboard = served.dashboard_address();
    let secret = "s3cret-for-the-tests";
    assert_eq!(github_tag(&address, secret).await.status, 202);
    assert_eq!(ready(&address).await, 200);

    disk.freeze();
    let patient = tokio::spawn({
        let address = address.clone();
        async move { patient_tag(&address, secret).await }
    });
    // An operator replays the first webhook's trigger (id 1) from the dashboard's API.
    let replay = tokio::spawn({
        let url = format!("http://{dashboard}/api/triggers/1/replay");
        async move {
            let token = [("authorization", "Bearer admin-token-for-the-frozen-disk")];
            send("POST", &url, &token, "").await
        }
    });
    let frozen = Instant::now();
    let said = loop {
        let reply = send("GET", &format!("http://{address}/readyz"), &[], "").await;
        if reply.status == 503 {
            break reply.text();
        }
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert!(
            frozen.elapsed() < Duration::from_secs(20),
            "/readyz still 200 with the disk frozen for 20 s"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(said.contains("has not finished for"), "{said}");
    let scrape = send("GET", &format!("http://{address}/metrics"), &[], "").await;
    let running =
        hookrelay::metrics::sample(&scrape.text(), "hookrelay_store_write_running_seconds ")
            .expect("the running write's age in /metrics");
    assert!(running >= 5.0, "the write under way has run {running} s");

    // Senders that give up after 1.5 s: their webhooks wait in memory, each with its room,
    // until there is none left; the next is refused at once, saying why.
    let mut given_up = 0;
    let refused = loop {
        match tokio::time::timeout(Duration::from_millis(1500), github_tag(&address, secret)).await
        {
            Err(_) => given_up += 1,
            Ok(reply) => break reply,
        }
        assert!(
            given_up <= 12,
            "{given_up} webhooks given up on are held, past 64 KiB of bodies"
        );
    };
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert!(
        refused.text().contains("not acknowledged")
            && refused.text().contains("has not finished for"),
        "says why: {}",
        refused.text()
    );
    // A sender that waits: told after `ack_timeout` that its webhook is not acknowledged,
    // and why (before, it waited for as long as the disk was frozen).
    let patient = tokio::time::timeout(Duration::from_secs(20), patient)
        .await
        .expect("answered within ack_timeout")
        .unwrap();
    assert!(
        frozen.elapsed() >= Duration::from_secs(8),
        "answered after {:?}",
        frozen.elapsed()
    );
    assert_eq!(patient.status, 503, "{}", patient.text());
    assert!(
        patient
            .text()
            .contains("did not confirm this webhook within 8s ([server] ack_timeout): its write under way has not finished for")
            && patient.text().contains("not acknowledged"),
        "says why: {}",
        patient.text()
    );

    // Before, the dashboard's answer waited for as long as the disk was frozen.
    let replay = tokio::time::timeout(Duration::from_secs(5), replay)
        .await
        .expect("the dashboard answered within ack_timeout")
        .unwrap();
    assert_eq!(replay.status, 503, "{}", replay.text());
    assert!(
        replay.text().contains("the delivery store did not answer within 8s ([server] ack_timeout): its write under way has not finished for")
            && replay.text().contains("the replay of trigger 1 waits for it and may still be carried out"),
        "says why: {}",
        replay.text()
    );

    disk.thaw();
    wait_for_ready(&address, 200, Duration::from_secs(20), "/readyz still 503").await;
    // The first, the patient one, every one given up on, and the dashboard's replay of the
    // first (a second call for its delivery): written and sent, once each.
    eventually(
        Duration::from_secs(20),
        "every webhook taken and the replay are sent",
        || upstream.received().len() == 3 + given_up,
    )
    .await;
    assert_eq!(delivered(&upstream).len(), 2 + given_up);
    // The patient webhook delivered again, as its sender would: recognised, not queued twice.
    let again = patient_tag(&address, secret).await;
    assert_eq!(again.status, 200, "{}", again.text());
    assert!(
        again.text().contains("\"duplicate\":true"),
        "{}",
        again.text()
    );
    assert_eq!(upstream.received().len(), 3 + given_up);
    let (code, lines) = served.terminate();
    assert_eq!(code, Some(0));
    assert!(
        lines
            .iter()
            .any(|l| l.contains("one write to the delivery store took this long")),
        "the long write is logged"
    );
}

/// The deliveries the store in `state` holds, as `hookrelay deliveries --json` lists them.
fn stored_rows(state: &std::path::Path) -> Vec<serde_json::Value> {
    let rows = hookrelay(&["deliveries", "--json", "--state", state.to_str().unwrap()]);
    serde_json::from_slice(&rows.stdout).unwrap()
}
