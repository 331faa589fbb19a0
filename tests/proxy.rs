//! Calls to GitLab through the HTTP proxy the environment names (`HTTPS_PROXY`,
//! `HTTP_PROXY`), as a relay in a network whose only way out is a proxy makes them: the real
//! binary, a recording proxy on 127.0.0.1:0, and upstreams named by host names that only the
//! proxy knows how to reach, so nothing could have gone around it.

mod common;

use std::process::Command;
use std::sync::{Arc, Mutex};

use common::binary::{BIN, Served, github_tag, write};
use common::{RecordingUpstream, TRIGGER_RESPONSE, https_upstream, post};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the proxy saw of one connection: its first request line and
/// `Proxy-Authorization`.
type Seen = Arc<Mutex<Vec<(String, Option<String>)>>>;

/// An HTTP proxy on 127.0.0.1:0 that takes `CONNECT host:port` (a tunnel; `407` without
/// credentials, `403` to `forbidden.test`) and absolute-form requests, sends every host to 127.0.0.1, and records
/// what it saw.
async fn recording_proxy() -> (u16, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Seen::default();
    let recorded = seen.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            tokio::spawn(relay_one(client, recorded.clone()));
        }
    });
    (port, seen)
}

async fn relay_one(mut client: TcpStream, seen: Seen) {
    let mut head = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        let Ok(n) = client.read(&mut chunk).await else {
            return;
        };
        if n == 0 {
            return;
        }
        head.extend_from_slice(&chunk[..n]);
        if let Some(at) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
    };
    let text = String::from_utf8_lossy(&head[..end]).into_owned();
    let mut lines = text.split("\r\n");
    let first = lines.next().unwrap_or_default().to_owned();
    let headers: Vec<&str> = lines.filter(|l| !l.is_empty()).collect();
    let authorization = headers.iter().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("proxy-authorization")
            .then(|| value.trim().to_owned())
    });
    let anonymous = authorization.is_none();
    seen.lock().unwrap().push((first.clone(), authorization));
    let mut words = first.split(' ');
    let (method, target) = (
        words.next().unwrap_or_default(),
        words.next().unwrap_or_default(),
    );
    let rest = head[end..].to_vec();
    if method == "CONNECT" && target.starts_with("forbidden.test:") {
        let _ = client
            .write_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
            .await;
    } else if method == "CONNECT" && anonymous {
        let _ = client
            .write_all(b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"test\"\r\nContent-Length: 0\r\n\r\n")
            .await;
    } else if method == "CONNECT" {
        let port: u16 = target.rsplit(':').next().unwrap().parse().unwrap();
        let Ok(mut upstream) = TcpStream::connect(("127.0.0.1", port)).await else {
            return;
        };
        client
            .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
            .await
            .unwrap();
        upstream.write_all(&rest).await.unwrap();
        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
    } else {
        let uri: http::Uri = target.parse().unwrap();
        let Ok(mut upstream) =
            TcpStream::connect(("127.0.0.1", uri.port_u16().unwrap_or(80))).await
        else {
            return;
        };
        // On to the origin in origin form, without the proxy's credentials.
        let mut forwarded = format!(
            "{method} {} HTTP/1.1\r\n",
            uri.path_and_query().map_or("/", |p| p.as_str())
        );
        for line in headers {
            if !line
                .to_ascii_lowercase()
                .starts_with("proxy-authorization:")
            {
                forwarded.push_str(line);
                forwarded.push_str("\r\n");
            }
        }
        forwarded.push_str("\r\n");
        upstream.write_all(forwarded.as_bytes()).await.unwrap();
        upstream.write_all(&rest).await.unwrap();
        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
    }
}

/// A plain trigger call to the relay's gateway.
async fn trigger_call(address: &str) -> common::Reply {
    post(
        &format!(
            "http://{address}/api/v4/projects/9/trigger/pipeline?token=glptt-0123456789abcdef0123&ref=main"
        ),
        &[],
        "",
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_go_through_the_proxy_the_environment_names() {
    let (proxy_port, seen) = recording_proxy().await;
    let (tls_port, ca_pem) = https_upstream(&["gitlab.test"]).await;
    let plain = RecordingUpstream::start().await;
    let plain_port = plain.addr.port();
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "ca.pem", &ca_pem);
    write(dir.path(), "secret", "s3cret-for-the-tests");
    write(
        dir.path(),
        "relay.toml",
        &format!(
            "[upstream.secure]\nurl = \"https://gitlab.test:{tls_port}\"\nca_file = \"ca.pem\"\n\
             [upstream.plain]\nurl = \"http://gitlab-plain.test:{plain_port}\"\n\
             [gateway]\nupstream = \"secure\"\n\
             [source.github]\nprovider = \"github\"\nsecret = \"file:{}\"\n\
             [[rule]]\nname = \"all\"\nsource = \"github\"\n[rule.trigger]\nupstream = \"plain\"\n\
             project = \"acme/app\"\nref = \"main\"\ntoken = \"env:HOOKRELAY_TEST_TOKEN\"\n",
            dir.path().join("secret").display()
        ),
    );
    let proxy = format!("http://relay:pr0xy-passw0rd@127.0.0.1:{proxy_port}");
    let with_proxy = |command: &mut Command| {
        command
            .env("HTTPS_PROXY", &proxy)
            .env("HTTP_PROXY", &proxy)
            .env("HOOKRELAY_TEST_TOKEN", "glptt-0123456789abcdef0123")
            .env_remove("ALL_PROXY")
            .env_remove("NO_PROXY")
            .env_remove("no_proxy");
    };

    // `check` says which calls go through which proxy, without its credentials.
    let mut check = Command::new(BIN);
    with_proxy(&mut check);
    let output = check
        .args(["check", "--config", dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains(&format!(
            "secure (https://gitlab.test:{tls_port} via the proxy http://127.0.0.1:{proxy_port})"
        )),
        "{stdout}"
    );
    assert!(!stdout.contains("pr0xy-passw0rd"), "{stdout}");

    let mut command = Command::new(BIN);
    with_proxy(&mut command);
    let mut served = Served::start_with(command, dir.path(), &dir.path().join("state"));
    let address = served.address();

    // The gateway to an https:// GitLab: a CONNECT tunnel, TLS end to end inside it.
    let reply = trigger_call(&address).await;
    assert_eq!(reply.status, 201, "{}", reply.text());
    assert_eq!(reply.text(), TRIGGER_RESPONSE);

    // A webhook's trigger to an http:// GitLab: the request in absolute form.
    let reply = github_tag(&address, "s3cret-for-the-tests").await;
    assert_eq!(reply.status, 202, "{}", reply.text());
    served.wait_for("trigger sent");
    let calls = plain.received();
    assert_eq!(calls.len(), 1);
    assert_eq!(
        calls[0].path_and_query,
        "/api/v4/projects/acme%2Fapp/trigger/pipeline"
    );
    assert!(
        !calls[0].headers.contains_key("proxy-authorization"),
        "the proxy's credentials stay with the proxy"
    );

    let basic = "Basic cmVsYXk6cHIweHktcGFzc3cwcmQ="; // relay:pr0xy-passw0rd
    let seen = seen.lock().unwrap().clone();
    assert!(
        seen.contains(&(
            format!("CONNECT gitlab.test:{tls_port} HTTP/1.1"),
            Some(basic.to_owned())
        )),
        "{seen:#?}"
    );
    assert!(
        seen.contains(&(
            format!(
                "POST http://gitlab-plain.test:{plain_port}/api/v4/projects/acme%2Fapp/trigger/pipeline HTTP/1.1"
            ),
            Some(basic.to_owned())
        )),
        "{seen:#?}"
    );
    let (code, lines) = served.terminate();
    assert_eq!(code, Some(0));
    let log = lines.join("\n");
    assert!(
        log.contains("calls go through the proxy")
            && log.contains(&format!("http://127.0.0.1:{proxy_port}")),
        "{log}"
    );
    assert!(!log.contains("pr0xy-passw0rd"), "{log}");
}

#[test]
fn a_proxy_hookrelay_cannot_speak_to_stops_check_and_serve_with_the_variable_named() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "relay.toml",
        "[upstream.gitlab]\nurl = \"https://gitlab.example.com\"\n[gateway]\n",
    );
    let config = dir.path().to_str().unwrap();
    let state = dir.path().join("state");
    for args in [
        vec!["check", "--config", config],
        vec![
            "serve",
            "--config",
            config,
            "--listen",
            "127.0.0.1:0",
            "--state",
            state.to_str().unwrap(),
        ],
    ] {
        let output = Command::new(BIN)
            .args(&args)
            .env("ALL_PROXY", "socks5://proxy.internal:1080")
            .env_remove("HTTPS_PROXY")
            .env_remove("https_proxy")
            .env_remove("NO_PROXY")
            .env_remove("no_proxy")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?}: {stderr}");
        assert!(
            stderr.contains("HTTPS_PROXY (or ALL_PROXY) names the proxy socks5://proxy.internal:1080; hookrelay speaks to http:// proxies only"),
            "{args:?}: {stderr}"
        );
    }
    // Listed in NO_PROXY, the upstream is called directly.
    let output = Command::new(BIN)
        .args(["check", "--config", config])
        .env("ALL_PROXY", "socks5://proxy.internal:1080")
        .env("NO_PROXY", "gitlab.example.com")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_that_wants_credentials_or_refuses_is_named_in_the_answer() {
    let (proxy_port, _) = recording_proxy().await;
    for (host, reason) in [
        (
            "gitlab.test",
            "the proxy asks for credentials (407); give them in the variable that names it: http://user:password@host:port",
        ),
        (
            "forbidden.test",
            "the proxy refused to open a tunnel to it (CONNECT was not answered 200)",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "relay.toml",
            &format!("[upstream.gitlab]\nurl = \"https://{host}\"\n[gateway]\n"),
        );
        let mut command = Command::new(BIN);
        command
            .env("HTTPS_PROXY", format!("http://127.0.0.1:{proxy_port}"))
            .env_remove("NO_PROXY")
            .env_remove("no_proxy");
        let mut served = Served::start_with(command, dir.path(), &dir.path().join("state"));
        let address = served.address();
        let reply = trigger_call(&address).await;
        assert_eq!(reply.status, 502, "{}", reply.text());
        assert_eq!(
            reply.json()["message"],
            format!(
                "upstream \"gitlab\" (https://{host}) is unreachable: {reason} (through the proxy http://127.0.0.1:{proxy_port})"
            )
        );
    }
}
