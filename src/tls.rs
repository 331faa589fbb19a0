//! TLS with rustls, both ways. Outgoing (GitLab, PostgreSQL): one way to build a client
//! configuration, so both trust the same roots: the system's, the bundled Mozilla set, and
//! an optional `ca_file` (a self-hosted GitLab's or a database's private CA). Incoming
//! (`[server] tls_cert`/`tls_key`): the listener's certificate, swapped on reload so a
//! renewed certificate is served without a restart or a dropped connection.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

/// System and bundled roots, loaded once per process.
fn default_roots() -> &'static RootCertStore {
    static ROOTS: OnceLock<RootCertStore> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let mut roots = RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        for cert in rustls_native_certs::load_native_certs().certs {
            // A malformed system certificate is skipped, as browsers do.
            let _ = roots.add(cert);
        }
        roots
    })
}

/// Reads the PEM certificates of a `ca_file`; at least one must be there.
pub fn read_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|err| format!("cannot read {}: {err}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| format!("{} is not a PEM certificate file: {err}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no PEM certificate", path.display()));
    }
    Ok(certs)
}

/// A client configuration trusting the default roots and those of `ca_file`.
pub fn client_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, String> {
    let mut roots = default_roots().clone();
    if let Some(ca_file) = ca_file {
        for cert in read_ca_file(ca_file)? {
            roots.add(cert).map_err(|err| err.to_string())?;
        }
    }
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|err| err.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth())
}

/// Reads a certificate chain and its private key (PEM) and checks that they belong together.
pub fn read_server_certificate(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, String> {
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|err| format!("cannot read {}: {err}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| format!("{} is not a PEM certificate file: {err}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("{} holds no PEM certificate", cert.display()));
    }
    let private_key = PrivateKeyDer::from_pem_file(key).map_err(|err| {
        format!(
            "{} holds no PEM private key (PKCS#8, PKCS#1 or SEC1): {err}",
            key.display()
        )
    })?;
    let provider = rustls::crypto::ring::default_provider();
    CertifiedKey::from_der(chain, private_key, &provider)
        .map(Arc::new)
        .map_err(|err| {
            format!(
                "the key in {} does not go with the certificate in {}: {err}",
                key.display(),
                cert.display()
            )
        })
}

/// The listener's certificate. Each handshake takes the current one, so a replaced
/// certificate serves every new connection while open ones keep theirs.
#[derive(Debug)]
pub struct ServerCertificate {
    current: ArcSwap<CertifiedKey>,
}

impl ServerCertificate {
    pub fn new(key: Arc<CertifiedKey>) -> Arc<ServerCertificate> {
        Arc::new(ServerCertificate {
            current: ArcSwap::new(key),
        })
    }

    pub fn replace(&self, key: Arc<CertifiedKey>) {
        self.current.store(key);
    }
}

impl rustls::server::ResolvesServerCert for ServerCertificate {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// The listener's TLS configuration: TLS 1.2 and 1.3, HTTP/1.1, the certificate of `certs`.
pub fn server_config(certs: Arc<ServerCertificate>) -> Result<rustls::ServerConfig, String> {
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|err| err.to_string())?
    .with_no_client_auth()
    .with_cert_resolver(certs);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}
