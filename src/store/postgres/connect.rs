//! Connecting to PostgreSQL: the settings a relay needs (`[store]`), TLS with rustls, and
//! messages that never show the password.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use postgres::Client;
use postgres::config::SslMode;

use crate::secret::SecretRef;
use crate::store::EngineError;

/// How to reach the shared database: `[store] url` (or `HOOKRELAY_STORE_URL`, or
/// `--store`), with the password apart so it is never printed.
#[derive(Clone)]
pub struct PostgresConfig {
    /// `postgres://user@host:port/db?sslmode=…`; a password in it is used, never shown.
    pub url: String,
    /// `[store] password` (`env:NAME` or `file:PATH`), when the URL carries none; read at
    /// each connection, so a rotated file is picked up when the relay reconnects.
    pub password: Option<SecretRef>,
    /// How long a claim holds its key before another relay may take it over.
    pub lease: Duration,
    /// Extra PEM certificates to trust for the database's TLS (a private CA).
    pub ca_file: Option<PathBuf>,
}

/// The default lease: twice an upstream call's default timeout (30 s), and ten seconds.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(70);

/// Without the password, so that a configuration dump never shows it.
impl std::fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("url", &self.describe())
            .field("password", &self.password)
            .field("lease", &self.lease)
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

impl PostgresConfig {
    pub fn new(url: impl Into<String>) -> PostgresConfig {
        PostgresConfig {
            url: url.into(),
            password: None,
            lease: DEFAULT_LEASE,
            ca_file: None,
        }
    }

    /// The URL for messages and logs, without its password.
    pub fn describe(&self) -> String {
        without_password(&self.url)
    }

    /// Checks the URL; says what is wrong without repeating the password.
    pub fn parse_url(url: &str) -> Result<postgres::Config, String> {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(format!(
                "{:?} is not a PostgreSQL URL; write postgres://user@host:5432/database",
                without_password(url)
            ));
        }
        postgres::Config::from_str(url).map_err(|err| {
            format!(
                "{} is not a valid PostgreSQL URL: {err}",
                without_password(url)
            )
        })
    }

    /// Opens one connection: TLS as `sslmode` asks (rustls; `prefer` by default, as libpq),
    /// timeouts so that a database that stops answering is noticed within seconds.
    pub fn connect(&self) -> Result<Client, EngineError> {
        let mut config = PostgresConfig::parse_url(&self.url).map_err(EngineError::refused)?;
        if let Some(reference) = &self.password {
            let password = reference.resolve().map_err(|reason| {
                EngineError::refused(format!("store.password ({reference}): {reason}"))
            })?;
            config.password(password.expose());
        }
        if config.get_user().is_none() {
            config.user("postgres");
        }
        config
            .application_name("hookrelay")
            .connect_timeout(Duration::from_secs(5))
            // A database cut off mid-request (a blackholed network) fails the call after
            // this long instead of hanging the writer.
            .tcp_user_timeout(Duration::from_secs(10))
            .keepalives_idle(Duration::from_secs(5))
            .keepalives_interval(Duration::from_secs(1))
            .keepalives_retries(5)
            // A relay frozen in a transaction must not hold its locks for ever.
            .options("-c idle_in_transaction_session_timeout=60000 -c client_min_messages=warning");
        let client = if config.get_ssl_mode() == SslMode::Disable {
            config.connect(postgres::NoTls)
        } else {
            let tls = crate::tls::client_config(self.ca_file.as_deref()).map_err(|err| {
                EngineError::refused(format!("TLS for {}: {err}", self.describe()))
            })?;
            config.connect(tokio_postgres_rustls::MakeRustlsConnect::new(tls))
        };
        client.map_err(|err| {
            let mut failed = super::error(err);
            failed.message = format!("connecting to {}: {}", self.describe(), failed.message);
            failed
        })
    }
}

/// The URL without its password, for messages.
pub fn without_password(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:…{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// Whether the URL carries a password (not allowed in a configuration file).
pub fn has_password(url: &str) -> bool {
    postgres::Config::from_str(url).is_ok_and(|config| config.get_password().is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_messages() {
        assert_eq!(
            without_password("postgres://hookrelay:s3cret@db:5432/hr"),
            "postgres://hookrelay:…@db:5432/hr"
        );
        assert_eq!(without_password("postgres://db/hr"), "postgres://db/hr");
        let err = PostgresConfig::parse_url("mysql://u:s3cret@db/hr").unwrap_err();
        assert!(!err.contains("s3cret"), "{err}");
        let err = PostgresConfig::parse_url("postgres://u:s3cret@db:notaport/hr").unwrap_err();
        assert!(!err.contains("s3cret"), "{err}");
        assert!(has_password("postgres://u:s3cret@db/hr"));
        assert!(!has_password("postgres://u@db/hr"));
    }
}
