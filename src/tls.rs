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

/// Why a server's certificate was refused, in words that say what to change, for the
/// common causes; `None` for other TLS failures (their own text says enough).
pub fn refused_certificate(err: &rustls::Error) -> Option<String> {
    use rustls::CertificateError as E;
    let rustls::Error::InvalidCertificate(cause) = err else {
        return None;
    };
    let words = match cause {
        E::UnknownIssuer => {
            "its TLS certificate is not signed by an authority this relay trusts (the system's, the bundled Mozilla set and ca_file); for a private CA, set ca_file to that CA's certificate (PEM)"
        }
        E::NotValidForName | E::NotValidForNameContext { .. } => {
            "its TLS certificate was issued for another name than the URL's host; write the host the certificate names in the URL"
        }
        E::Expired | E::ExpiredContext { .. } => "its TLS certificate has expired",
        E::NotValidYet | E::NotValidYetContext { .. } => {
            "its TLS certificate is not valid yet (is this machine's clock right?)"
        }
        E::Other(other) if other.to_string().contains("CaUsedAsEndEntity") => {
            "it presents a CA certificate as its own (a self-signed certificate made with CA:TRUE, as `openssl req -x509` makes by default), which rustls refuses even as ca_file; give the server a certificate made with basicConstraints CA:FALSE (or issued by a CA), and that certificate (or the CA's) as ca_file"
        }
        _ => return None,
    };
    Some(format!("{words} (rustls: {err})"))
}

/// [`refused_certificate`] for the rustls error somewhere in `err`'s chain: hyper-rustls
/// and tokio-postgres hand it over wrapped in `io::Error`s (sometimes one in another), and
/// `io::Error::source` skips what it wraps, so those are opened too.
pub fn refused_certificate_in(err: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut chain = Some(err);
    while let Some(link) = chain {
        let mut current = link;
        loop {
            if let Some(tls) = current.downcast_ref::<rustls::Error>() {
                return refused_certificate(tls);
            }
            match current
                .downcast_ref::<std::io::Error>()
                .and_then(std::io::Error::get_ref)
            {
                Some(inner) => current = inner,
                None => break,
            }
        }
        chain = link.source();
    }
    None
}

/// Reads the PEM certificates of a file (a `ca_file`, a server's chain); at least one
/// must be there.
pub fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = read_pem(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| format!("{} is not a PEM certificate file: {err}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no PEM certificate", path.display()));
    }
    Ok(certs)
}

/// A PEM file's bytes, bounded (see [`crate::named_file`]).
fn read_pem(path: &Path) -> Result<Vec<u8>, String> {
    crate::named_file::read(path, crate::named_file::PEM)
        .map_err(|err| format!("cannot read {}: {err}", path.display()))
}

/// A client configuration trusting the default roots and those of `ca_file`.
pub fn client_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, String> {
    let mut roots = default_roots().clone();
    if let Some(ca_file) = ca_file {
        for cert in read_certificates(ca_file)? {
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
    let chain = read_certificates(cert)?;
    let private_key = PrivateKeyDer::from_pem_slice(&read_pem(key)?).map_err(|err| {
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

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::{CertificateError, Error, OtherError};

    #[test]
    fn a_refused_certificate_is_said_with_what_to_change() {
        let said = |cause: CertificateError| refused_certificate(&Error::InvalidCertificate(cause));
        let unknown = said(CertificateError::UnknownIssuer).unwrap();
        assert!(
            unknown.contains("set ca_file") && unknown.contains("(rustls: "),
            "{unknown}"
        );
        assert!(
            said(CertificateError::NotValidForName)
                .unwrap()
                .contains("another name")
        );
        assert!(said(CertificateError::Expired).unwrap().contains("expired"));
        assert!(
            said(CertificateError::NotValidYet)
                .unwrap()
                .contains("clock")
        );
        // webpki's refusal of a CA:TRUE certificate served as the server's own.
        #[derive(Debug)]
        struct CaUsedAsEndEntity;
        impl std::fmt::Display for CaUsedAsEndEntity {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("CaUsedAsEndEntity")
            }
        }
        impl std::error::Error for CaUsedAsEndEntity {}
        let ca = said(CertificateError::Other(OtherError(Arc::new(
            CaUsedAsEndEntity,
        ))))
        .unwrap();
        assert!(
            ca.contains("CA:FALSE") && ca.contains("openssl req -x509"),
            "{ca}"
        );
        // Found inside io::Errors, one in another, as hyper-rustls hands it over.
        let nested = std::io::Error::other(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            Error::InvalidCertificate(CertificateError::UnknownIssuer),
        ));
        assert!(
            refused_certificate_in(&nested)
                .unwrap()
                .contains("set ca_file")
        );
        assert_eq!(refused_certificate_in(&std::io::Error::other("no")), None);
        // Other failures keep rustls's own words.
        assert_eq!(said(CertificateError::BadEncoding), None);
        assert_eq!(refused_certificate(&Error::DecryptError), None);
    }
}
