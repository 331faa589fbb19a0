//! GitHub's published webhook addresses, for a source's `allow_from = ["github"]`.
//!
//! GitHub lists the networks its webhooks come from in the `hooks` list of
//! `https://api.github.com/meta`, and changes it now and then. The relay reads it when it
//! starts and every hour after (a conditional request, which GitHub's rate limit does not
//! count), and keeps the last list it read in the state folder, or in the database that
//! relays sharing one keep their work in, so that a start while GitHub's API cannot be
//! reached still knows it. Until a list is known, webhooks to such a
//! source are refused with `503` rather than let in unchecked; a list read once is kept
//! through any number of failed reads, which are logged.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use ipnet::IpNet;
use tokio::sync::watch;

use crate::store::postgres::SharedState;
use crate::upstream::{Called, Upstream, UpstreamConfig};

/// Where GitHub publishes its addresses; `HOOKRELAY_GITHUB_META_URL` replaces it (a mirror,
/// or a stand-in in tests).
pub const META_URL: &str = "https://api.github.com/meta";
/// How often a known list is read again.
const READ_EVERY: Duration = Duration::from_secs(3600);
/// After a failed read, the next waits this long, doubling up to [`READ_EVERY`].
const FIRST_RETRY: Duration = Duration::from_secs(30);
/// Networks a list may hold at most (GitHub's has a handful).
const MOST_NETWORKS: usize = 1000;
/// The kept copy's name in the state folder, and in a shared store.
const KEPT_FILE: &str = "github-hooks.json";
/// How long a shared store may take to give or keep the copy: one that stops answering
/// holds up no read of GitHub's.
const STORE_WAIT: Duration = Duration::from_secs(10);

/// The list as last read.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Known {
    pub networks: Vec<IpNet>,
    /// When GitHub last gave it or said it is unchanged (milliseconds since the epoch): how
    /// current the list in use is.
    pub read_at_ms: i64,
    /// GitHub's `ETag`, for the next conditional read.
    #[serde(default)]
    pub etag: Option<String>,
}

/// The addresses GitHub sends webhooks from, shared by the server and the reader.
#[derive(Default)]
pub struct GithubHooks {
    known: ArcSwapOption<Known>,
    /// Why no list is known yet (the last read's failure), for the `503`'s message.
    missing: std::sync::Mutex<Option<String>>,
}

impl GithubHooks {
    /// Whether `client` is one of GitHub's webhook addresses: `Err` with the reason while
    /// no list is known.
    pub fn contains(&self, client: IpAddr) -> Result<bool, String> {
        match self.known.load().as_deref() {
            Some(known) => Ok(known.networks.iter().any(|net| net.contains(&client))),
            None => Err(self
                .missing
                .lock()
                .expect("never poisoned")
                .clone()
                .unwrap_or_else(|| "it has not been read yet".into())),
        }
    }

    /// The list in use, if any.
    pub fn known(&self) -> Option<Arc<Known>> {
        self.known.load_full()
    }

    fn set(&self, known: Known) {
        self.known.store(Some(Arc::new(known)));
    }

    fn failed(&self, reason: String) {
        *self.missing.lock().expect("never poisoned") = Some(reason);
    }
}

/// The networks in the `hooks` list of GitHub's meta answer.
pub fn read_meta(body: &[u8]) -> Result<Vec<IpNet>, String> {
    #[derive(serde::Deserialize)]
    struct Meta {
        hooks: Option<Vec<String>>,
    }
    let meta: Meta = serde_json::from_slice(body)
        .map_err(|err| format!("the answer is not GitHub's meta JSON: {err}"))?;
    let hooks = meta
        .hooks
        .ok_or("the answer has no \"hooks\" list of addresses")?;
    if hooks.is_empty() {
        return Err("the \"hooks\" list is empty".into());
    }
    if hooks.len() > MOST_NETWORKS {
        return Err(format!(
            "the \"hooks\" list names {} networks, more than {MOST_NETWORKS}",
            hooks.len()
        ));
    }
    hooks
        .iter()
        .map(|text| {
            crate::config::networks::parse_network(text)
                .ok_or_else(|| format!("{text:?} in \"hooks\" is not an IP network"))
        })
        .collect()
}

/// Where the last list read is kept for the next start.
pub enum KeptIn {
    /// A file in the state folder, which only this relay uses.
    Folder(PathBuf),
    /// The store relays share: a list one of them read serves them all, a relay started
    /// on another machine included.
    Store(Arc<SharedState>),
}

impl KeptIn {
    /// The kept copy, when there is a readable one.
    async fn read(&self) -> Option<Known> {
        match self {
            KeptIn::Folder(folder) => read_kept(&folder.join(KEPT_FILE)),
            KeptIn::Store(shared) => match within_store_wait(shared.kept(KEPT_FILE)).await {
                Ok(Some((text, _))) => {
                    let known = usable(text.as_bytes());
                    if known.is_none() {
                        tracing::warn!(
                            "the store's copy of GitHub's webhook addresses is not readable; it is read again from GitHub"
                        );
                    }
                    known
                }
                Ok(None) => None,
                Err(reason) => {
                    tracing::warn!(%reason, "the store's copy of GitHub's webhook addresses could not be read");
                    None
                }
            },
        }
    }

    /// Keeps `known` for the next start (and, in a shared store, for the other relays).
    async fn keep(&self, known: &Known) {
        match self {
            KeptIn::Folder(folder) => keep(&folder.join(KEPT_FILE), known),
            KeptIn::Store(shared) => {
                let text = serde_json::to_string(known).expect("a list always serializes");
                let keeping = shared.keep(KEPT_FILE, &text, known.read_at_ms);
                if let Err(reason) = within_store_wait(keeping).await {
                    tracing::warn!(%reason, "GitHub's webhook addresses could not be kept in the store for the next start");
                }
            }
        }
    }

    /// Whether another relay may keep a list here while this one runs.
    fn shared(&self) -> bool {
        matches!(self, KeptIn::Store(_))
    }
}

/// A call on the shared store, failed when it takes over [`STORE_WAIT`].
async fn within_store_wait<T>(
    call: impl std::future::Future<Output = Result<T, String>>,
) -> Result<T, String> {
    tokio::time::timeout(STORE_WAIT, call)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {} s", STORE_WAIT.as_secs())))
}

/// Uses `known`, read earlier and kept, and says so.
fn use_kept(hooks: &GithubHooks, known: Known) {
    let (networks, read_at) = (known.networks.len(), known.read_at_ms);
    hooks.set(known);
    tracing::info!(
        networks,
        read_at = %chrono::DateTime::from_timestamp_millis(read_at)
            .map_or_else(|| read_at.to_string(), |t| t.to_rfc3339()),
        "GitHub's webhook addresses, as last read"
    );
}

/// Reads the list into `hooks` while `needed` (a source of the running configuration lists
/// `"github"` in `allow_from`), until `stopped`; `kept`: where the last list read is kept.
/// A reload (`reloads`) that adds such a source has the list read at once.
pub async fn run(
    hooks: &GithubHooks,
    needed: impl Fn() -> bool,
    kept: KeptIn,
    mut reloads: watch::Receiver<u64>,
    mut stopped: watch::Receiver<bool>,
) {
    let url = std::env::var("HOOKRELAY_GITHUB_META_URL").unwrap_or_else(|_| META_URL.into());
    let client = meta_client(&url);
    // The kept copy is read once, when a source first needs the list.
    let mut kept_read = false;
    let mut retry = FIRST_RETRY;
    let mut next_read = tokio::time::Instant::now();
    loop {
        let now = tokio::time::Instant::now();
        if needed() && !kept_read {
            kept_read = true;
            if let Some(known) = kept.read().await {
                use_kept(hooks, known);
            }
        }
        if needed() && now >= next_read {
            let (client, path) = match &client {
                Ok(client) => client,
                Err(reason) => {
                    tracing::error!(%url, %reason, "GitHub's webhook addresses cannot be read");
                    hooks.failed(reason.clone());
                    return;
                }
            };
            let wait = match read(client, path, hooks.known().as_deref()).await {
                Ok(Some(known)) => {
                    let networks = known.networks.len();
                    hooks.set(known.clone());
                    tracing::info!(networks, %url, "GitHub's webhook addresses read");
                    kept.keep(&known).await;
                    retry = FIRST_RETRY;
                    READ_EVERY
                }
                Ok(None) => {
                    // Unchanged, and so as current as a new read: the list's age starts
                    // again (GitHub's list changes rarely; an age that counted from the
                    // last change would call a healthy relay's list stale after a day).
                    if let Some(known) = hooks.known() {
                        let confirmed = Known {
                            read_at_ms: crate::outbox::now_ms(),
                            ..(*known).clone()
                        };
                        hooks.set(confirmed.clone());
                        kept.keep(&confirmed).await;
                    }
                    tracing::debug!(%url, "GitHub's webhook addresses unchanged");
                    retry = FIRST_RETRY;
                    READ_EVERY
                }
                Err(reason) => {
                    hooks.failed(format!("reading {url} failed: {reason}"));
                    // Another relay on the store may have read it since.
                    if kept.shared()
                        && let Some(newer) = kept.read().await
                        && hooks
                            .known()
                            .is_none_or(|known| known.read_at_ms < newer.read_at_ms)
                    {
                        use_kept(hooks, newer);
                    }
                    let kept = hooks.known().is_some();
                    tracing::warn!(%url, %reason, retry_in = ?retry, keeping_the_last_list = kept, "GitHub's webhook addresses could not be read");
                    let wait = retry;
                    retry = (retry * 2).min(READ_EVERY);
                    wait
                }
            };
            next_read = tokio::time::Instant::now() + wait;
        }
        // While no source needs the list, only a reload can change that.
        let wake = if needed() {
            next_read
        } else {
            tokio::time::Instant::now() + READ_EVERY
        };
        tokio::select! {
            _ = tokio::time::sleep_until(wake) => {}
            changed = reloads.changed() => {
                if changed.is_err() {
                    return;
                }
                // A source that now needs a list nobody has read yet: read it at once.
                if hooks.known().is_none() {
                    next_read = tokio::time::Instant::now();
                }
            }
            _ = stopped.changed() => return,
        }
    }
}

/// A client of the meta URL's host, and the URL's path and query on it.
fn meta_client(url: &str) -> Result<(Upstream, String), String> {
    let uri: http::Uri = url.parse().map_err(|_| format!("{url:?} is not a URL"))?;
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    let root = match (uri.scheme_str(), uri.authority()) {
        (Some(scheme @ ("http" | "https")), Some(authority)) => format!("{scheme}://{authority}"),
        _ => return Err(format!("{url:?} is not an http:// or https:// URL")),
    };
    let config = UpstreamConfig {
        name: "GitHub's meta".into(),
        url: crate::upstream::parse_upstream_url(&root)?,
        ca_file: None,
        connect_timeout: Duration::from_secs(10),
        timeout: Duration::from_secs(30),
        per_project: crate::upstream::default_per_project(),
        coalesce: None,
        max_in_flight: 1,
        read_token: None,
        polls_per_minute: 0,
        poll_interval: Duration::ZERO,
    };
    let client = Upstream::calling(Called::GithubMeta, &config).map_err(|err| err.to_string())?;
    Ok((client, path))
}

/// One read of `path`: the new list, `None` when GitHub says it has not changed (`304`).
async fn read(
    client: &Upstream,
    path: &str,
    last: Option<&Known>,
) -> Result<Option<Known>, String> {
    let mut headers = http::HeaderMap::new();
    headers.insert(
        http::header::ACCEPT,
        http::HeaderValue::from_static(crate::status::forge::GITHUB_ACCEPT),
    );
    if let Some(etag) = last
        .and_then(|known| known.etag.as_deref())
        .and_then(|etag| http::HeaderValue::from_str(etag).ok())
    {
        headers.insert(http::header::IF_NONE_MATCH, etag);
    }
    let answer = client
        .call(http::Method::GET, path, headers, bytes::Bytes::new())
        .await
        .map_err(|err| err.to_string())?;
    if answer.status == http::StatusCode::NOT_MODIFIED && last.is_some() {
        return Ok(None);
    }
    if !answer.status.is_success() {
        return Err(format!(
            "GitHub answered {}: {}",
            answer.status.as_u16(),
            crate::status::forge::shorten(&crate::status::forge::message(&answer.body), 200)
        ));
    }
    let networks = read_meta(&answer.body)?;
    let etag = answer
        .headers
        .get(http::header::ETAG)
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);
    Ok(Some(Known {
        networks,
        read_at_ms: crate::outbox::now_ms(),
        etag,
    }))
}

/// The kept copy, when there is a readable one.
fn read_kept(path: &std::path::Path) -> Option<Known> {
    let text = std::fs::read(path).ok()?;
    let known = usable(&text);
    if known.is_none() {
        tracing::warn!(path = %path.display(), "the kept copy of GitHub's webhook addresses is not readable; it is read again from GitHub");
    }
    known
}

/// A kept copy's text as a list to use: `None` when it is not one, or names no network.
fn usable(text: &[u8]) -> Option<Known> {
    serde_json::from_slice::<Known>(text)
        .ok()
        .filter(|known| !known.networks.is_empty())
}

/// Keeps `known` for the next start: written beside, then renamed over the old copy, so a
/// crash leaves one whole copy or the other.
fn keep(path: &std::path::Path, known: &Known) {
    let written = serde_json::to_vec_pretty(known)
        .map_err(std::io::Error::other)
        .and_then(|text| {
            let beside = path.with_extension("json.new");
            std::fs::write(&beside, text)?;
            std::fs::rename(&beside, path)
        });
    if let Err(err) = written {
        tracing::warn!(path = %path.display(), error = %err, "GitHub's webhook addresses could not be kept for the next start");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shape of GitHub's answer (the REST API's "Get GitHub meta information" example,
    /// shortened): `hooks` beside lists for other services.
    const META: &str = r#"{
      "verifiable_password_authentication": true,
      "ssh_key_fingerprints": {"SHA256_RSA": "uNiVztksCsDhcc0u9e8BujQXVUpKZIDTMczCvj3tD2s"},
      "hooks": ["192.30.252.0/22", "185.199.108.0/22", "140.82.112.0/20", "143.55.64.0/20", "2a0a:a440::/29", "2606:50c0::/32"],
      "web": ["192.30.252.0/22", "185.199.108.0/22"],
      "api": ["192.30.252.0/22"],
      "git": ["192.30.252.0/22"],
      "actions": ["13.64.0.0/16"]
    }"#;

    #[test]
    fn the_hooks_list_is_read_and_only_it() {
        let networks = read_meta(META.as_bytes()).unwrap();
        assert_eq!(networks.len(), 6);
        let hooks = GithubHooks::default();
        assert!(
            hooks.contains("140.82.115.4".parse().unwrap()).is_err(),
            "unknown yet"
        );
        hooks.set(Known {
            networks,
            read_at_ms: 0,
            etag: None,
        });
        for (address, inside) in [
            ("140.82.115.4", true),
            ("192.30.255.254", true),
            ("2a0a:a440::1", true),
            ("13.64.0.1", false),
            ("127.0.0.1", false),
        ] {
            assert_eq!(
                hooks.contains(address.parse().unwrap()),
                Ok(inside),
                "{address}"
            );
        }
    }

    #[test]
    fn an_answer_without_a_usable_list_is_refused_with_the_reason() {
        for (body, says) in [
            ("<html>rate limited</html>", "not GitHub's meta JSON"),
            (r#"{"web": []}"#, "no \"hooks\" list"),
            (r#"{"hooks": []}"#, "empty"),
            (
                r#"{"hooks": ["192.30.252.0/22", "nope"]}"#,
                "\"nope\" in \"hooks\"",
            ),
            (r#"{"hooks": "192.30.252.0/22"}"#, "not GitHub's meta JSON"),
        ] {
            let err = read_meta(body.as_bytes()).unwrap_err();
            assert!(err.contains(says), "{body}: {err}");
        }
        let many: Vec<String> = (0..=MOST_NETWORKS)
            .map(|i| format!("10.{}.{}.0/24", i / 256, i % 256))
            .collect();
        let body = serde_json::json!({ "hooks": many }).to_string();
        assert!(
            read_meta(body.as_bytes())
                .unwrap_err()
                .contains("more than")
        );
    }

    #[test]
    fn the_kept_copy_survives_a_restart_and_a_broken_one_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(KEPT_FILE);
        assert_eq!(read_kept(&path), None);
        let known = Known {
            networks: read_meta(META.as_bytes()).unwrap(),
            read_at_ms: 1_764_000_000_000,
            etag: Some("W/\"abc\"".into()),
        };
        keep(&path, &known);
        assert_eq!(read_kept(&path), Some(known));
        std::fs::write(&path, "{ half").unwrap();
        assert_eq!(read_kept(&path), None);
    }
}
