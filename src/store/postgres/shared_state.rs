//! What relays on one database share outside the outbox, over a pool of asynchronous
//! connections of its own: rate limits and GitLab's pauses (`limits`), and what one relay
//! read from elsewhere that the others may use (`kept`). Calls on it are asynchronous, so
//! an event loop may make them without lending its thread.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};

use super::PostgresConfig;

/// Connections kept for shared state; more callers at once wait for one (without holding
/// a thread: the calls are asynchronous, so an event loop may make them).
const POOL: usize = 8;

/// How long a check waits for a free connection before it fails closed.
const WAIT_FOR_CONNECTION: Duration = Duration::from_secs(5);

/// The pool of connections (deadpool-postgres) that shared state is read and written on.
pub struct SharedState {
    config: PostgresConfig,
    pool: Pool,
    /// Why the last connection could not be tried, from [`Connector`].
    problem: std::sync::Arc<Mutex<Option<String>>>,
    /// After a failure, calls fail at once for a second (with its reason) instead of each
    /// waiting for a connection to time out: a limit fails closed, and fast.
    failed: Mutex<Option<(Instant, String)>>,
}

/// How long a failure answers for the database before it is tried again.
const FAILED_FOR: Duration = Duration::from_secs(1);

impl std::fmt::Debug for SharedState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedState")
            .field("store", &self.config.describe())
            .finish()
    }
}

/// Opens the pool's connections: the password read at each connection, rustls as
/// `sslmode` asks, and each connection's task on the runtime that made the pool (not on
/// whichever event loop first needed a connection).
struct Connector {
    config: PostgresConfig,
    /// The runtime the pool was made on (the server's), when it was made on one.
    runtime: Option<tokio::runtime::Handle>,
    /// Why the last connection could not even be tried (a password file gone, a CA file
    /// unreadable): deadpool only carries PostgreSQL's own errors.
    problem: std::sync::Arc<Mutex<Option<String>>>,
}

type Connecting<'a> = std::pin::Pin<
    Box<
        dyn Future<
                Output = Result<
                    (tokio_postgres::Client, tokio::task::JoinHandle<()>),
                    tokio_postgres::Error,
                >,
            > + Send
            + 'a,
    >,
>;

impl deadpool_postgres::Connect for Connector {
    fn connect(&self, _: &tokio_postgres::Config) -> Connecting<'_> {
        Box::pin(async move {
            match self.config.prepare_async() {
                Ok(connect) => {
                    *self.problem.lock().expect("never poisoned") = None;
                    let runtime = self
                        .runtime
                        .clone()
                        .unwrap_or_else(tokio::runtime::Handle::current);
                    let (client, task) = connect.open(&runtime).await?;
                    // A limit's state changes with every admitted call, under its key's row
                    // lock; waiting for the WAL to reach the disk before the lock is let go
                    // would serialize each key's calls on the disk's flush (about 2,000 a
                    // second here, whatever the cores). What a crash of the database can
                    // lose is its last fraction of a second of limit state: a few calls
                    // admitted twice, a pause asked for again by GitLab's next 429. What is
                    // kept (`kept`) can be read again from where it came from.
                    client.batch_execute("SET synchronous_commit = off").await?;
                    Ok((client, task))
                }
                Err(err) => {
                    *self.problem.lock().expect("never poisoned") = Some(err.message);
                    // A PostgreSQL error for deadpool, made without touching the network:
                    // settings without a host. The reason above is what is reported.
                    Err(tokio_postgres::Config::new()
                        .connect(tokio_postgres::NoTls)
                        .await
                        .err()
                        .expect("settings without a host never connect"))
                }
            }
        })
    }
}

impl SharedState {
    /// The pool; connections are opened when first needed, so a database that is down
    /// at start only fails the checks made while it is.
    pub fn new(config: PostgresConfig) -> SharedState {
        let problem = std::sync::Arc::new(Mutex::new(None));
        let settings = PostgresConfig::parse_url(&config.url).unwrap_or_default();
        let connector = Connector {
            config: config.clone(),
            runtime: tokio::runtime::Handle::try_current().ok(),
            problem: problem.clone(),
        };
        let manager = Manager::from_connect(
            settings,
            connector,
            ManagerConfig {
                // A connection is checked when it is taken (a closed one is replaced), not
                // with a query: a failed query drops its connection anyway.
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(WAIT_FOR_CONNECTION))
            .create_timeout(Some(super::connect::CONNECT_TIMEOUT * 2))
            .recycle_timeout(Some(WAIT_FOR_CONNECTION))
            .build()
            .expect("a pool with a runtime always builds");
        SharedState {
            config,
            pool,
            problem,
            failed: Mutex::new(None),
        }
    }

    /// A pooled connection, or why there is none (at once, for a second after a failure).
    pub(super) async fn client(&self) -> Result<deadpool_postgres::Object, String> {
        if let Some((at, reason)) = &*self.failed.lock().expect("never poisoned")
            && at.elapsed() < FAILED_FOR
        {
            return Err(reason.clone());
        }
        self.pool.get().await.map_err(|err| {
            let reason = match err {
                deadpool_postgres::PoolError::Backend(err) => self
                    .problem
                    .lock()
                    .expect("never poisoned")
                    .take()
                    .unwrap_or_else(|| self.config.connect_failed(err).message),
                deadpool_postgres::PoolError::Timeout(_) => format!(
                    "no connection to {} for shared state within {} s",
                    self.config.describe(),
                    WAIT_FOR_CONNECTION.as_secs()
                ),
                other => format!("{}: {other}", self.config.describe()),
            };
            self.remember(Some(&reason));
            reason
        })
    }

    /// Keeps a failure's reason for [`FAILED_FOR`], or forgets the last one.
    fn remember(&self, failure: Option<&str>) {
        *self.failed.lock().expect("never poisoned") =
            failure.map(|reason| (Instant::now(), reason.to_owned()));
    }

    /// The result of a call on `client`; a connection whose call failed is not kept.
    pub(super) fn settle<T>(
        &self,
        client: deadpool_postgres::Object,
        result: Result<T, tokio_postgres::Error>,
    ) -> Result<T, String> {
        match result {
            Ok(value) => {
                self.remember(None);
                Ok(value)
            }
            Err(err) => {
                drop(deadpool_postgres::Object::take(client));
                let reason = super::error(err).message;
                self.remember(Some(&reason));
                Err(reason)
            }
        }
    }

    /// One row of one prepared (and cached) statement.
    pub(super) async fn one(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<tokio_postgres::Row, String> {
        let client = self.client().await?;
        let result = async {
            let statement = client.prepare_cached(sql).await?;
            client.query_one(&statement, params).await
        }
        .await;
        self.settle(client, result)
    }
}
