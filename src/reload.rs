//! Configuration reloads: on SIGHUP, and when a file in the configuration folder changes.
//!
//! The new configuration is loaded and validated whole, then swapped in atomically; a
//! broken file keeps the running configuration and logs every problem. Requests already
//! in flight finish on the snapshot they started with. Changes are found by polling the
//! files' sizes and modification times, which works the same on every file system
//! (including network mounts and container volumes, where change notifications are not
//! delivered). `[server]` settings (listen address, limits), `[admin]` and `[store]` apply
//! at the next start, and a reload that changes them says so
//! ([`crate::app::RestartOnly`]), but for the listener's certificate, which is read again
//! (and watched) like the rules.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use crate::app::App;

/// What identifies the configuration's state on disk: each file's path, size and mtime.
type Fingerprint = Vec<(PathBuf, u64, Option<SystemTime>)>;

/// The configuration files, and the listener's certificate and key, so that a certificate
/// renewed on disk is served without a signal.
fn fingerprint(path: &Path, app: &App) -> Fingerprint {
    let mut files = crate::config::config_files(path).unwrap_or_default();
    let runtime = app.runtime();
    let admin = runtime.config.admin.as_ref().and_then(|a| a.tls.as_ref());
    for tls in runtime.config.server.tls.iter().chain(admin) {
        files.extend([tls.cert.clone(), tls.key.clone()]);
    }
    files
        .into_iter()
        .map(|file| {
            let meta = std::fs::metadata(&file).ok();
            let len = meta.as_ref().map(|m| m.len()).unwrap_or(0);
            let modified = meta.and_then(|m| m.modified().ok());
            (file, len, modified)
        })
        .collect()
}

/// Reloads now, logging the outcome. Returns whether the new configuration is in use.
pub fn reload_now(app: &App, why: &str) -> bool {
    let result = app.reload();
    let now = crate::outbox::now_ms();
    // The health page and the metrics record the same reload.
    app.metrics.config_reloaded(result.is_ok(), now);
    {
        let mut reloaded = app.reloaded.lock().expect("never poisoned");
        match &result {
            Ok(_) => {
                reloaded.loaded_at = now;
                reloaded.failed = None;
            }
            Err(problems) => reloaded.failed = Some((now, problems.clone())),
        }
    }
    match result {
        Ok(runtime) => {
            tracing::info!(
                why,
                rules = runtime.config.rules.len(),
                sources = runtime.config.sources.len(),
                upstreams = runtime.config.upstreams.len(),
                "configuration reloaded"
            );
            for warning in &runtime.config.warnings {
                tracing::warn!(%warning, "configuration warning: this will not do what it looks like");
            }
            true
        }
        Err(problems) => {
            for problem in problems.lines() {
                tracing::error!(
                    why,
                    problem,
                    "configuration not reloaded; the running one stays"
                );
            }
            false
        }
    }
}

/// Where the reloader starts from: the configuration's files as they are, and SIGHUP taken
/// over (left alone, it would end the process). Made before the relay says it is
/// listening: a file changed, or a SIGHUP sent, right after that line is never missed.
/// (Taken by the spawned task, a change made meanwhile was its starting point, and no
/// reload came.)
pub struct Watcher {
    path: PathBuf,
    last: Fingerprint,
    #[cfg(unix)]
    hangup: Option<tokio::signal::unix::Signal>,
}

impl Watcher {
    /// `None` for a relay with no configuration folder to watch. Within the runtime.
    pub fn prepare(app: &App) -> Option<Watcher> {
        let path = app.config_path()?.to_owned();
        Some(Watcher {
            last: fingerprint(&path, app),
            path,
            #[cfg(unix)]
            hangup: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok(),
        })
    }
}

/// Watches for SIGHUP and file changes until `stop` turns true.
pub async fn watch(
    watcher: Watcher,
    app: Arc<App>,
    poll: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let Watcher {
        path,
        mut last,
        #[cfg(unix)]
        mut hangup,
    } = watcher;
    loop {
        #[cfg(unix)]
        let hangup_received = async {
            match hangup.as_mut() {
                Some(signal) => {
                    signal.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let hangup_received = std::future::pending::<()>();
        tokio::select! {
            _ = stop.changed() => return,
            () = hangup_received => {
                reload_now(&app, "SIGHUP");
                last = fingerprint(&path, &app);
            }
            () = tokio::time::sleep(poll) => {
                let now = fingerprint(&path, &app);
                if now != last {
                    reload_now(&app, "a configuration or certificate file changed");
                    last = fingerprint(&path, &app);
                }
            }
        }
        if *stop.borrow() {
            return;
        }
    }
}
