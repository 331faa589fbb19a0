//! Rate limits and GitLab's pauses shared by every relay on one database: the same GCRA
//! as governor (one row per key holding its theoretical arrival time), decided on the
//! database's clock under the key's row lock, so N relays admit exactly what one would,
//! whatever their own clocks say.
//!
//! A refusal needs no lock: `tat` only grows, so a plain read that already shows "over" is
//! a correct refusal; only a "maybe" takes the row lock. A limit's parameters travel with
//! each call and are not part of its key, so during a rolling reload the old and the new
//! configuration share one state.

use std::sync::Mutex;
use std::time::Duration;

use postgres::Client;

use super::PostgresConfig;

/// Connections kept for limit checks; more callers at once wait for one.
const POOL: usize = 4;

/// Shared limits over a few connections of their own.
pub struct SharedLimits {
    config: PostgresConfig,
    idle: Mutex<Vec<Client>>,
    /// Callers waiting for or holding a connection.
    slots: std::sync::Condvar,
    in_use: Mutex<usize>,
    /// After a failure, calls fail at once for a second (with its reason) instead of each
    /// waiting for a connection to time out: a limit fails closed, and fast.
    failed: Mutex<Option<(std::time::Instant, String)>>,
}

/// How long a failure answers for the database before it is tried again.
const FAILED_FOR: Duration = Duration::from_secs(1);

impl std::fmt::Debug for SharedLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedLimits")
            .field("store", &self.config.describe())
            .finish()
    }
}

impl SharedLimits {
    pub fn new(config: PostgresConfig) -> SharedLimits {
        SharedLimits {
            config,
            idle: Mutex::new(Vec::new()),
            slots: std::sync::Condvar::new(),
            in_use: Mutex::new(0),
            failed: Mutex::new(None),
        }
    }

    /// Runs `call` on a pooled connection; a connection that failed is not kept.
    fn with_client<T>(
        &self,
        call: impl FnOnce(&mut Client) -> Result<T, postgres::Error>,
    ) -> Result<T, String> {
        if let Some((at, reason)) = &*self.failed.lock().expect("never poisoned")
            && at.elapsed() < FAILED_FOR
        {
            return Err(reason.clone());
        }
        {
            let mut in_use = self.in_use.lock().expect("never poisoned");
            while *in_use >= POOL {
                in_use = self.slots.wait(in_use).expect("never poisoned");
            }
            *in_use += 1;
        }
        let result = (|| {
            let pooled = self.idle.lock().expect("never poisoned").pop();
            let mut client = match pooled {
                Some(client) if !client.is_closed() => client,
                _ => self.config.connect().map_err(|err| err.message)?,
            };
            let result = call(&mut client).map_err(|err| super::error(err).message);
            if result.is_ok() {
                self.idle.lock().expect("never poisoned").push(client);
            }
            result
        })();
        *self.in_use.lock().expect("never poisoned") -= 1;
        self.slots.notify_one();
        *self.failed.lock().expect("never poisoned") = result
            .as_ref()
            .err()
            .map(|reason| (std::time::Instant::now(), reason.clone()));
        result
    }

    /// Takes one request for `key` at `count` per `per` with `burst`: `Ok(ZERO)` when
    /// admitted, else how long until one would be. `Err` when the database cannot say.
    pub fn admit(
        &self,
        key: &str,
        per: Duration,
        count: u32,
        burst: u32,
    ) -> Result<Duration, String> {
        let t_us = (per.as_micros() / u128::from(count.max(1))) as i64;
        let burst = i64::from(burst);
        crate::store::blocking(|| {
            self.with_client(|client| {
                // One round trip: the lock-free read refuses, and only a "maybe" takes
                // the key's row lock.
                client
                    .query_one(
                        "SELECT CASE WHEN greatest(hr_gcra_peek($1, $2, $3), hr_pause_left($1)) > 0
                                     THEN greatest(hr_gcra_peek($1, $2, $3), hr_pause_left($1))
                                     ELSE hr_gcra($1, $2, $3) END",
                        &[&key, &t_us, &burst],
                    )
                    .map(|row| row.get::<_, i64>(0))
            })
        })
        .map(|wait_us| Duration::from_micros(wait_us.max(0) as u64))
    }

    /// Holds `key` back on every relay for `wait` (GitLab's `Retry-After`).
    pub fn pause(&self, key: &str, wait: Duration) -> Result<(), String> {
        let wait_us = wait.as_micros() as i64;
        crate::store::blocking(|| {
            self.with_client(|client| {
                client
                    .execute("SELECT hr_pause($1, $2)", &[&key, &wait_us])
                    .map(|_| ())
            })
        })
    }

    /// How long `key` is still paused, if it is.
    pub fn paused(&self, key: &str) -> Result<Option<Duration>, String> {
        crate::store::blocking(|| {
            self.with_client(|client| {
                client
                    .query_one("SELECT hr_pause_left($1)", &[&key])
                    .map(|row| row.get::<_, i64>(0))
            })
        })
        .map(|left| (left > 0).then(|| Duration::from_micros(left as u64)))
    }

    /// Forgets keys that are back to a full burst and not paused (on one relay at a time).
    pub fn evict_idle(&self) -> Result<u64, String> {
        crate::store::blocking(|| {
            self.with_client(|client| {
                let mut tx = client.transaction()?;
                let ours: bool = tx
                    .query_one(
                        "SELECT pg_try_advisory_xact_lock(hashtext('hookrelay:limits'))",
                        &[],
                    )?
                    .get(0);
                if !ours {
                    return Ok(0);
                }
                let gone = tx.execute(
                    "DELETE FROM hr_limits WHERE tat < hr_now_us() AND coalesce(paused_until, 0) < hr_now_us()",
                    &[],
                )?;
                tx.commit()?;
                Ok(gone)
            })
        })
    }
}

/// Connections cannot be closed on a thread that runs async tasks (see `PostgresEngine`).
impl Drop for SharedLimits {
    fn drop(&mut self) {
        let idle = std::mem::take(&mut *self.idle.lock().unwrap_or_else(|e| e.into_inner()));
        if !idle.is_empty() && tokio::runtime::Handle::try_current().is_ok() {
            let _ = std::thread::spawn(move || drop(idle)).join();
        }
    }
}

/// The schema of shared limits (a migration of the engine's).
pub(super) const SCHEMA: &str = r#"
CREATE TABLE hr_limits (key text PRIMARY KEY, tat bigint NOT NULL, paused_until bigint);
CREATE FUNCTION hr_now_us() RETURNS bigint LANGUAGE sql VOLATILE AS
  $$ SELECT (extract(epoch from clock_timestamp()) * 1000000)::bigint $$;
-- How long until a request would be admitted, from a plain read (0: maybe now).
CREATE FUNCTION hr_gcra_peek(p_key text, p_t bigint, p_burst bigint) RETURNS bigint
LANGUAGE sql VOLATILE AS $$
  SELECT coalesce(max(greatest(tat, hr_now_us()) + p_t - hr_now_us() - p_burst * p_t), 0)
  FROM hr_limits WHERE key = p_key
$$;
-- Takes one request (0) or says how long until one is allowed, under the key's row lock.
CREATE FUNCTION hr_gcra(p_key text, p_t bigint, p_burst bigint) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE v_now bigint; v_tat bigint;
BEGIN
  INSERT INTO hr_limits (key, tat) VALUES (p_key, 0) ON CONFLICT (key) DO NOTHING;
  SELECT tat INTO v_tat FROM hr_limits WHERE key = p_key FOR UPDATE;
  v_now := hr_now_us();
  v_tat := greatest(v_tat, v_now) + p_t;
  IF v_tat - v_now > p_burst * p_t THEN
    RETURN v_tat - v_now - p_burst * p_t;
  END IF;
  UPDATE hr_limits SET tat = v_tat WHERE key = p_key;
  RETURN 0;
END $$;
CREATE FUNCTION hr_pause(p_key text, p_wait bigint) RETURNS void LANGUAGE sql AS $$
  INSERT INTO hr_limits (key, tat, paused_until) VALUES (p_key, 0, hr_now_us() + p_wait)
  ON CONFLICT (key) DO UPDATE
    SET paused_until = greatest(coalesce(hr_limits.paused_until, 0), hr_now_us() + p_wait)
$$;
CREATE FUNCTION hr_pause_left(p_key text) RETURNS bigint LANGUAGE sql VOLATILE AS $$
  SELECT coalesce(max(greatest(paused_until - hr_now_us(), 0)), 0) FROM hr_limits WHERE key = p_key
$$;
"#;
