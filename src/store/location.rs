//! Where the outbox lives, as the command line, the environment and `[store]` choose it.

use std::path::PathBuf;

use super::{postgres, sqlite};

/// Where the outbox lives: SQLite in a state folder (one relay), or a PostgreSQL database
/// shared by any number of relays.
#[derive(Clone, Debug)]
pub enum StoreLocation {
    Folder(PathBuf),
    Postgres(postgres::PostgresConfig),
}

/// The environment variable that sets (or overrides) `[store] url`.
pub const STORE_URL_ENV: &str = "HOOKRELAY_STORE_URL";

impl StoreLocation {
    /// For messages: the store file, or the database URL without its password.
    pub fn describe(&self) -> String {
        match self {
            StoreLocation::Folder(dir) => dir.join(sqlite::STORE_FILE).display().to_string(),
            StoreLocation::Postgres(config) => config.describe(),
        }
    }

    /// Chooses the store: `--store URL` first, then the configured (or environment's)
    /// database, else SQLite in the state folder. A password on the command line is
    /// refused: every user of the machine can read it there.
    pub fn choose(
        state: &std::path::Path,
        flag: Option<&str>,
        configured: Option<postgres::PostgresConfig>,
    ) -> Result<StoreLocation, String> {
        match (flag, configured) {
            (Some(url), configured) => {
                if postgres::has_password(url) {
                    return Err(format!(
                        "--store: a password on the command line is visible to every user of this machine; \
                         set {} instead, or write [store] password = \"env:NAME\"",
                        STORE_URL_ENV
                    ));
                }
                postgres::PostgresConfig::parse_url(url)
                    .map_err(|err| format!("--store: {err}"))?;
                let mut config = configured.unwrap_or_else(|| postgres::PostgresConfig::new(url));
                config.url = url.to_owned();
                Ok(StoreLocation::Postgres(config))
            }
            (None, Some(config)) => Ok(StoreLocation::Postgres(config)),
            (None, None) => Ok(StoreLocation::Folder(state.to_owned())),
        }
    }

    /// For commands without a configuration: `--store`, `HOOKRELAY_STORE_URL`, or the
    /// state folder.
    pub fn from_command_line(
        state: &std::path::Path,
        flag: Option<&str>,
    ) -> Result<StoreLocation, String> {
        let from_env = match std::env::var(STORE_URL_ENV) {
            Ok(url) if !url.is_empty() => {
                postgres::PostgresConfig::parse_url(&url)
                    .map_err(|err| format!("{}: {err}", STORE_URL_ENV))?;
                Some(postgres::PostgresConfig::new(url))
            }
            _ => None,
        };
        StoreLocation::choose(state, flag, from_env)
    }

    /// Whether several relays may share this store (and so must share limits and pauses).
    pub fn is_shared(&self) -> bool {
        matches!(self, StoreLocation::Postgres(_))
    }
}
