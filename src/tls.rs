//! TLS for the relay's outgoing connections (GitLab, PostgreSQL): one way to build a
//! rustls client configuration, so both trust the same roots.
//!
//! Trusted roots are the system's, the bundled Mozilla set, and an optional `ca_file` (a
//! self-hosted GitLab's or a database's private CA).

use std::path::Path;
use std::sync::{Arc, OnceLock};

use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

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
