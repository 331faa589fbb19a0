//! HTTPS on the listener (`[server] tls_cert`/`tls_key`), with the real binary and a CA
//! generated for the test: served with the configured chain, checked at `check`, and a
//! certificate renewed on disk served to new connections while open ones carry on.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::binary::*;
use rcgen::{BasicConstraints, Certificate, CertificateParams, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A CA, and a way to issue `localhost` certificates from it.
struct Authority {
    cert: Certificate,
    key: KeyPair,
    pem: String,
}

impl Authority {
    fn new() -> Authority {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        Authority {
            pem: cert.pem(),
            cert,
            key,
        }
    }

    /// Writes a fresh certificate for localhost and its key; returns the certificate.
    fn issue(&self, dir: &Path) -> CertificateDer<'static> {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .signed_by(&key, &self.cert, &self.key)
            .unwrap();
        // Written whole, then renamed into place, as certbot and cert-manager do.
        for (name, text) in [
            ("relay.crt", cert.pem()),
            ("relay.key", key.serialize_pem()),
        ] {
            let part = dir.join(format!("{name}.new"));
            std::fs::write(&part, text).unwrap();
            std::fs::rename(&part, dir.join(name)).unwrap();
        }
        cert.der().clone()
    }
}

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// A TLS connection to the relay trusting only `ca`; returns it and the certificate served.
async fn connect(address: &str, ca: &str) -> (Tls, CertificateDer<'static>) {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::pem::PemObject::pem_slice_iter(ca.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(address).await.unwrap();
    let tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("the handshake succeeds with the CA");
    let served = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    (tls, served.into_owned())
}

/// One `GET /healthz` on an open connection (kept alive); returns the answer's text.
async fn healthz(tls: &mut Tls) -> String {
    tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let mut buffer = [0u8; 1024];
    while !answer.ends_with(br#"{"status":"ok"}"#) {
        let read = tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buffer))
            .await
            .expect("an answer within 5 s")
            .unwrap();
        assert!(read > 0, "the connection was closed");
        answer.extend_from_slice(&buffer[..read]);
    }
    String::from_utf8(answer).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_a_certificate_renewed_on_disk_without_dropping_connections() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Authority::new();
    let first = ca.issue(dir.path());
    write(
        dir.path(),
        "server.toml",
        "[server]\ntls_cert = \"relay.crt\"\ntls_key = \"relay.key\"\n",
    );
    let mut served = Served::start(dir.path(), &dir.path().join("state"));
    let address = served.address();
    assert!(
        served
            .wait_for("hookrelay listening")
            .contains("https=true")
    );

    let (mut open, shown) = connect(&address, &ca.pem).await;
    assert_eq!(shown, first);
    assert!(healthz(&mut open).await.starts_with("HTTP/1.1 200"));

    // Plain HTTP on the TLS port gets no answer, only a closed connection.
    let mut plain = tokio::net::TcpStream::connect(&address).await.unwrap();
    plain
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buffer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut buffer)).await;
    assert!(!String::from_utf8_lossy(&buffer).contains("200 OK"));

    // Renewed on disk: the file watch reloads, new connections get the new certificate,
    // the open one carries on.
    let renewed = ca.issue(dir.path());
    assert_ne!(renewed, first);
    served.wait_for("configuration reloaded");
    let (mut fresh, shown) = connect(&address, &ca.pem).await;
    assert_eq!(
        shown, renewed,
        "a new connection gets the renewed certificate"
    );
    assert!(healthz(&mut fresh).await.starts_with("HTTP/1.1 200"));
    // A request hyper cannot read, over HTTPS: its `400` says why in JSON, as over HTTP.
    let (mut garbled, _) = connect(&address, &ca.pem).await;
    garbled.write_all(b"GARBAGE\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), garbled.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 400")
            && answer.contains("content-type: application/json")
            && answer.contains("could not be read as HTTP/1.1"),
        "{answer}"
    );
    assert!(
        healthz(&mut open).await.starts_with("HTTP/1.1 200"),
        "the connection opened before the renewal still works"
    );

    // A broken renewal (a key that is not the certificate's) keeps the running one.
    let other = KeyPair::generate().unwrap();
    std::fs::write(dir.path().join("relay.key"), other.serialize_pem()).unwrap();
    let line = served.wait_for("configuration not reloaded");
    assert!(line.contains("does not go with the certificate"), "{line}");
    let (_, shown) = connect(&address, &ca.pem).await;
    assert_eq!(shown, renewed);
    let (code, _) = served.terminate();
    assert_eq!(code, Some(0));
}

#[test]
fn check_refuses_half_a_certificate_and_a_key_that_does_not_match() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Authority::new();
    ca.issue(dir.path());
    write(dir.path(), "a.toml", "[server]\ntls_cert = \"relay.crt\"\n");
    let output = hookrelay(&["check", "--config", dir.path().to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("a.toml:2: tls_cert and tls_key go together"),
        "{stderr}"
    );
    std::fs::write(
        dir.path().join("relay.key"),
        KeyPair::generate().unwrap().serialize_pem(),
    )
    .unwrap();
    write(
        dir.path(),
        "a.toml",
        "[server]\ntls_cert = \"relay.crt\"\ntls_key = \"relay.key\"\n",
    );
    let output = hookrelay(&["check", "--config", dir.path().to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("a.toml:2: tls_cert: the key in")
            && stderr.contains("does not go with the certificate"),
        "{stderr}"
    );
}

/// The dashboard serves HTTPS with its own certificate while the webhook port stays plain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_serves_https_with_its_own_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Authority::new();
    let issued = ca.issue(dir.path());
    write(
        dir.path(),
        "admin.toml",
        "[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"env:HOOKRELAY_ADMIN_TOKEN\"\ntls_cert = \"relay.crt\"\ntls_key = \"relay.key\"\n",
    );
    let mut command = std::process::Command::new(BIN);
    command.env("HOOKRELAY_ADMIN_TOKEN", "admin-token-for-the-tests-0123");
    let mut served = Served::start_with(command, dir.path(), &dir.path().join("state"));
    let address = served.address();
    let line = served.wait_for("dashboard listening");
    assert!(line.contains("https=true"), "{line}");
    let dashboard = served.dashboard_address();
    let (mut tls, shown) = connect(&dashboard, &ca.pem).await;
    assert_eq!(shown, issued);
    tls.write_all(b"GET /api/health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"outbox_depth\""), "{answer}");
    // The webhook port is plain HTTP, as configured.
    let plain = common::send("GET", &format!("http://{address}/healthz"), &[], "").await;
    assert_eq!(plain.status, 200);
    // Renewed on disk: new connections get the new certificate, as on the main listener.
    let renewed = ca.issue(dir.path());
    served.wait_for("configuration reloaded");
    let (_, shown) = connect(&dashboard, &ca.pem).await;
    assert_eq!(
        shown, renewed,
        "the dashboard serves the renewed certificate"
    );
}
