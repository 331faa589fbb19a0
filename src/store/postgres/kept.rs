//! What one relay read from elsewhere, kept in the database for every relay on it: a relay
//! that starts while the source cannot be reached uses the copy another relay (or it
//! itself, before a restart) read last, as a relay with a state folder uses its file.
//! GitHub's published webhook addresses are kept here (`github_meta`).
//!
//! One row per name; the newest read wins, so a relay whose read was slow never puts back
//! an older copy over a newer one another relay wrote meanwhile.

use super::shared_state::SharedState;

impl SharedState {
    /// The copy kept under `name`, and when it was read (milliseconds since the epoch):
    /// `Ok(None)` when there is none yet. `Err` when the database cannot say.
    pub async fn kept(&self, name: &str) -> Result<Option<(String, i64)>, String> {
        // One row whether or not a copy is kept (NULLs when none), as `one` reads.
        let row = self
            .one(
                "SELECT k.value, k.read_at
                 FROM (SELECT $1::text AS name) wanted LEFT JOIN hr_kept k USING (name)",
                &[&name],
            )
            .await?;
        let (value, read_at): (Option<String>, Option<i64>) = (row.get(0), row.get(1));
        Ok(value.zip(read_at))
    }

    /// Keeps `value` under `name`, read at `read_at`, unless a copy read later is kept.
    pub async fn keep(&self, name: &str, value: &str, read_at: i64) -> Result<(), String> {
        let value = crate::store::text::text(value);
        self.one(
            "WITH kept AS (
               INSERT INTO hr_kept (name, value, read_at) VALUES ($1, $2, $3)
               ON CONFLICT (name) DO UPDATE SET value = excluded.value, read_at = excluded.read_at
                 WHERE hr_kept.read_at <= excluded.read_at
               RETURNING 1)
             SELECT count(*) FROM kept",
            &[&name, &value, &read_at],
        )
        .await
        .map(drop)
    }
}

/// The schema of kept copies (a migration of the engine's). A new table that relays of
/// the version before never read, so they may run beside this one (`OLDEST_COMPATIBLE`).
pub(super) const SCHEMA: &str = r#"
CREATE TABLE hr_kept (name text PRIMARY KEY, value text NOT NULL, read_at bigint NOT NULL);
"#;

#[cfg(test)]
mod tests {
    use super::super::PostgresConfig;
    use super::*;

    #[tokio::test]
    async fn the_newest_copy_is_kept_and_read_back() {
        let Some(database) = crate::store::blocking(super::super::test_server::Database::create)
        else {
            return;
        };
        let config = PostgresConfig::new(&database.url);
        crate::store::blocking(|| drop(super::super::PostgresEngine::open(&config).unwrap()));
        let shared = SharedState::new(config);
        assert_eq!(shared.kept("list").await, Ok(None));
        shared.keep("list", "[1]", 1_000).await.unwrap();
        assert_eq!(shared.kept("list").await, Ok(Some(("[1]".into(), 1_000))));
        shared.keep("list", "[2]", 2_000).await.unwrap();
        // A slower relay's older read does not put its copy back.
        shared.keep("list", "[old]", 1_500).await.unwrap();
        assert_eq!(shared.kept("list").await, Ok(Some(("[2]".into(), 2_000))));
        assert_eq!(shared.kept("other").await, Ok(None));
    }
}
