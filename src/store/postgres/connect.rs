//! Connecting to PostgreSQL: the settings a relay needs (`[store]`), TLS with rustls, and
//! messages that never show the password.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use postgres::Client;
use tokio_postgres::config::SslMode;

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
    pub fn parse_url(url: &str) -> Result<tokio_postgres::Config, String> {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(format!(
                "{:?} is not a PostgreSQL URL; write postgres://user@host:5432/database",
                without_password(url)
            ));
        }
        tokio_postgres::Config::from_str(url).map_err(|err| {
            format!(
                "{} is not a valid PostgreSQL URL: {err}",
                without_password(url)
            )
        })
    }

    /// The settings of one connection, the password read now (so a rotated file is picked
    /// up at the next connection): timeouts so that a database that stops answering is
    /// noticed within seconds.
    fn settings(&self) -> Result<tokio_postgres::Config, EngineError> {
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
            .connect_timeout(CONNECT_TIMEOUT)
            // A database cut off mid-request (a blackholed network) fails the call after
            // this long instead of hanging the writer.
            .tcp_user_timeout(Duration::from_secs(10))
            .keepalives_idle(Duration::from_secs(5))
            .keepalives_interval(Duration::from_secs(1))
            .keepalives_retries(5)
            // A relay frozen in a transaction must not hold its locks for ever.
            .options("-c idle_in_transaction_session_timeout=60000 -c client_min_messages=warning");
        Ok(config)
    }

    /// TLS as `sslmode` asks (rustls; `prefer` by default, as libpq); `None` when disabled.
    fn tls(
        &self,
        settings: &tokio_postgres::Config,
    ) -> Result<Option<tokio_postgres_rustls::MakeRustlsConnect>, EngineError> {
        if settings.get_ssl_mode() == SslMode::Disable {
            return Ok(None);
        }
        let tls = crate::tls::client_config(self.ca_file.as_deref())
            .map_err(|err| EngineError::refused(format!("TLS for {}: {err}", self.describe())))?;
        Ok(Some(tokio_postgres_rustls::MakeRustlsConnect::new(tls)))
    }

    /// A connection that could not be opened, said without the password.
    /// Transient whatever the reason: a database that refuses connections now (down, a
    /// `pg_hba.conf` or password being changed, `ALLOW_CONNECTIONS false` for maintenance)
    /// may take the next one, and the outbox keeps what waits and says why on `/readyz`
    /// meanwhile. (A relay that cannot connect when it starts stops with the reason.)
    pub(super) fn connect_failed(&self, err: tokio_postgres::Error) -> EngineError {
        let words = crate::tls::refused_certificate_in(&err);
        let mut failed = super::error(err);
        failed.message = match words {
            // The database's certificate: say what to change (store.ca_file among it).
            Some(words) => format!("connecting to {}: {words}", self.describe()),
            None => format!("connecting to {}: {}", self.describe(), failed.message),
        };
        failed.transient = true;
        failed
    }

    /// Opens one blocking connection, for the store's own threads (the writer and the
    /// reader).
    pub fn connect(&self) -> Result<Client, EngineError> {
        let settings = self.settings()?;
        let tls = self.tls(&settings)?;
        let config = postgres::Config::from(settings);
        match tls {
            None => config.connect(postgres::NoTls),
            Some(tls) => config.connect(tls),
        }
        .map_err(|err| self.connect_failed(err))
    }

    /// What an asynchronous connection needs: its settings and TLS, read now.
    pub(super) fn prepare_async(&self) -> Result<AsyncConnect, EngineError> {
        let settings = self.settings()?;
        let tls = self.tls(&settings)?;
        Ok(AsyncConnect {
            settings,
            tls,
            describe: self.describe(),
        })
    }
}

/// One asynchronous connection about to be opened (see [`PostgresConfig::prepare_async`]).
pub(super) struct AsyncConnect {
    settings: tokio_postgres::Config,
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
    describe: String,
}

impl AsyncConnect {
    /// Opens the connection; its task runs on `runtime`, and says why it closed (debug).
    pub(super) async fn open(
        self,
        runtime: &tokio::runtime::Handle,
    ) -> Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>), tokio_postgres::Error> {
        type Driving =
            std::pin::Pin<Box<dyn Future<Output = Result<(), tokio_postgres::Error>> + Send>>;
        let (client, connection): (_, Driving) = match self.tls {
            None => {
                let (client, connection) = self.settings.connect(tokio_postgres::NoTls).await?;
                (client, Box::pin(connection))
            }
            Some(tls) => {
                let (client, connection) = self.settings.connect(tls).await?;
                (client, Box::pin(connection))
            }
        };
        let describe = self.describe;
        let task = runtime.spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(store = %describe, reason = %super::error(err).message, "a connection for shared state closed");
            }
        });
        Ok((client, task))
    }
}

/// How long connecting to the database may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

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
    tokio_postgres::Config::from_str(url).is_ok_and(|config| config.get_password().is_some())
}

/// Why a failover could lose acknowledged webhooks, when the database streams its log to
/// `receivers` (standbys, or logical replication) and `synchronous_standby_names` is empty:
/// a commit then waits for this server's disk alone, and a standby promoted after a crash
/// may lack the last of them. `None` when nothing streams, or a standby is synchronous.
pub fn replication_risk(receivers: i64, synchronous_standby_names: &str) -> Option<String> {
    (receivers > 0 && synchronous_standby_names.trim().is_empty()).then(|| {
        format!(
            "PostgreSQL streams its log to {receivers} receiver(s) (standbys or logical replication) \
             and synchronous_standby_names is empty: should a standby take over after a crash, the \
             last commits may be missing there, acknowledged webhooks among them; name the \
             standbys in synchronous_standby_names to make a webhook wait for one (README, \
             \"Several relays on PostgreSQL\")"
        )
    })
}

/// [`replication_risk`] of the database `client` is connected to. `pg_stat_replication`
/// shows every role its rows (their details need `pg_read_all_stats`; the count does not).
pub fn read_replication_risk(
    client: &mut postgres::Client,
) -> Result<Option<String>, postgres::Error> {
    let row = client.query_one(
        "SELECT (SELECT count(*) FROM pg_stat_replication), \
                current_setting('synchronous_standby_names')",
        &[],
    )?;
    Ok(replication_risk(row.get(0), row.get(1)))
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

    #[test]
    fn only_standbys_none_of_them_synchronous_are_a_risk() {
        assert_eq!(replication_risk(0, ""), None, "a server alone");
        assert_eq!(replication_risk(2, "FIRST 1 (a, b)"), None);
        assert_eq!(replication_risk(1, "*"), None);
        let risk = replication_risk(2, " ").expect("two asynchronous standbys");
        assert!(
            risk.contains("2 receiver(s)") && risk.contains("synchronous_standby_names"),
            "{risk}"
        );
    }
}
