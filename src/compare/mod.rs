//! Asking the forge which files a branch push changed, when its webhook does not list them
//! all and a rule's `paths` would read them (`compare = { token = "env:NAME" }` on the
//! source). Without it such a push passes every path filter, so as not to miss a build;
//! with it the filters read the forge's own answer.
//!
//! | forge | request (below the API root) | files read from |
//! |---|---|---|
//! | GitHub | `GET /repos/{owner}/{repo}/compare/{before}...{after}` | `files[].filename`, `previous_filename` (at most 300: with 300 the rest are not known) |
//! | Gitea, Forgejo (1.22 and later) | `GET /repos/{owner}/{repo}/compare/{before}...{after}?verification=false` | each of `commits[]`'s `files[].filename` |
//! | GitLab | `GET /projects/{path}/repository/compare?from={before}&to={after}` | `diffs[].old_path`, `new_path` (not known when `compare_timeout`) |
//! | Bitbucket Cloud | `GET /repositories/{workspace}/{repo}/diffstat/{after}..{before}?topic=true` (the newer commit first, the opposite of `git diff`) | `values[].old.path`, `new.path`, following `next` |
//! | Bitbucket Data Center | `GET /rest/api/latest/projects/{key}/repos/{slug}/changes?since={before}&until={after}&limit=1000` | `values[].path.toString`, `srcPath.toString`, to `isLastPage` |
//!
//! The call is made before the webhook is acknowledged, so it is bounded by `timeout`
//! (3 s unless set; at most 8, inside GitHub's 10 s for an answer), by 20 pages, by the
//! client's 4 MiB an answer, and by 10,000 files (as many as path filters compare). Any
//! failure (a refusal, a timeout, an answer it cannot read, a list the forge cut short)
//! leaves the files not known, and the reason is shown where the push's changed files are. Gogs has no compare API; a generic sender lists its own
//! changed files (`paths.changed_files`).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use http::Method;
use serde::Deserialize;

use crate::event::{ComparedRecord, Event, EventKind, MOST_CHANGED_FILES, Provider, is_zero_id};
use crate::rules::RuleSet;
use crate::status::forge::{owner_and_repo, redirect_within, segment};
use crate::status::{Forge, ForgeApi};
use crate::status::{ForgeCalls, forge_client};
use crate::upstream::{Upstream, UpstreamError};

/// How long a compare may hold up its webhook's answer unless `timeout` says.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3);
/// The longest `timeout` allowed: GitHub waits 10 seconds for an answer, Gitea 5 by
/// default; the webhook must still be stored and answered after the compare.
pub const LONGEST_TIMEOUT: Duration = Duration::from_secs(8);
/// Pages of one answer read at most (Bitbucket's lists come a page at a time).
const MOST_PAGES: usize = 20;
/// GitHub's compare lists at most this many files.
const GITHUB_MOST_FILES: usize = 300;
/// Compares in flight to one forge at most; a push beyond waits its turn within `timeout`.
const IN_FLIGHT: usize = 16;

/// `compare = { token = "env:NAME", api_url = "…", ca_file = "…", timeout = "3s" }`.
#[derive(Clone, Debug)]
pub struct CompareConfig {
    pub api: ForgeApi,
    pub timeout: Duration,
    /// `new_branch_base = "main"`: a new branch's push is compared with this branch (where
    /// it forked from it), as GitLab's `rules:changes:compare_to` does; without it a new
    /// branch has nothing to be compared with and passes the filters.
    pub new_branch_base: Option<String>,
}

impl CompareConfig {
    /// What `event`'s files are asked against: the commit before the push, or for a new
    /// branch `new_branch_base` (unless the push creates that branch itself).
    fn base_of<'a>(&'a self, event: &'a Event) -> Option<&'a str> {
        if !is_zero_id(&event.before) {
            return is_commit_id(&event.before).then_some(event.before.as_str());
        }
        self.new_branch_base
            .as_deref()
            .filter(|base| *base != event.ref_name)
    }

    /// The forge a provider's pushes are compared on, or why there is none.
    pub fn forge_of(provider: Provider) -> Result<Forge, String> {
        match provider {
            Provider::Gogs => Err("Gogs has no API that compares two commits, so hookrelay cannot ask it which files a push changed; remove `compare`".into()),
            Provider::Generic => Err("a generic sender lists a push's changed files itself: name them with `paths.changed_files`; remove `compare`".into()),
            other => Forge::of(other),
        }
    }
}

/// The clients compares go out through, one per source with `compare = { … }`, built with
/// each configuration.
#[derive(Default)]
pub struct CompareClients {
    forges: HashMap<String, Arc<ForgeClient>>,
}

/// One source's client, and until when its forge asked not to be called (a rate limit's
/// `Retry-After` or reset): pushes meanwhile are not asked about, so a busy monorepo does
/// not keep calling a forge that already refused, which GitHub and Bitbucket may answer
/// by blocking the token.
pub struct ForgeClient {
    client: Upstream,
    held_until: std::sync::Mutex<Option<std::time::SystemTime>>,
}

impl CompareClients {
    pub fn new<'a>(
        compares: impl IntoIterator<Item = (&'a String, &'a CompareConfig)>,
    ) -> Result<CompareClients, UpstreamError> {
        let mut forges = HashMap::new();
        for (name, compare) in compares {
            let client = forge_client(
                name,
                ForgeCalls {
                    label: format!("compare of {name}"),
                    api: &compare.api,
                    connect_timeout: compare.timeout,
                    timeout: compare.timeout,
                    max_in_flight: IN_FLIGHT,
                },
            )?;
            forges.insert(
                name.clone(),
                Arc::new(ForgeClient {
                    client,
                    held_until: std::sync::Mutex::new(None),
                }),
            );
        }
        Ok(CompareClients { forges })
    }

    /// The client of the forge `source`'s pushes are compared on.
    pub fn forge(&self, source: &str) -> Option<&Arc<ForgeClient>> {
        self.forges.get(source)
    }
}

/// Whether the forge would be asked about `event`: a branch push with something to compare
/// it with (the commit before it, or for a new branch `new_branch_base`) whose webhook does
/// not tell every changed file, from a list of its own (a generic sender's) or per commit,
/// and that was not asked about before.
fn worth_asking(event: &Event, config: &CompareConfig) -> bool {
    event.kind == EventKind::Push
        && event.files.is_none()
        && event.compared.is_none()
        && config.base_of(event).is_some()
        && is_commit_id(&event.after)
        && matches!(
            event.changed_files(),
            crate::event::ChangedFiles::Unknown(_)
        )
}

/// A commit id: hex (SHA-1 or SHA-256); anything else would be a path of its own.
fn is_commit_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Whether the relay asks the forge about `event`: it is [worth asking](worth_asking), and
/// a rule with path filters would match it but for them.
pub fn would_ask(event: &Event, config: &CompareConfig, rules: &RuleSet) -> bool {
    worth_asking(event, config) && rules.reads_changed_files(event)
}

/// The indices of one webhook's `events` the relay asks the forge about ([`would_ask`]).
pub fn to_ask(events: &[Event], config: &CompareConfig, rules: &RuleSet) -> Vec<usize> {
    (0..events.len())
        .filter(|&i| would_ask(&events[i], config, rules))
        .collect()
}

/// Asks the forge about each of one webhook's `events` named by `asked` ([`to_ask`]),
/// within one `timeout` for all, and gives each its answer. The relay runs it before a
/// webhook is stored, `explain --ask-forge` on a payload.
pub async fn ask_about(
    client: &ForgeClient,
    config: &CompareConfig,
    events: &mut [Event],
    asked: &[usize],
) {
    let deadline = tokio::time::Instant::now() + config.timeout;
    for &i in asked {
        let answer = changed_files(client, config, &events[i], deadline).await;
        events[i].set_compared(answer);
    }
}

/// Asks the forge which files `event` changed: every path added, modified, removed or
/// renamed (both names) between `before` and `after`, sorted, once each; or why it cannot
/// tell, by `deadline` (the webhook's share of `compare.timeout`).
async fn changed_files(
    client: &ForgeClient,
    config: &CompareConfig,
    event: &Event,
    deadline: tokio::time::Instant,
) -> ComparedRecord {
    match ask(client, config, event, deadline).await {
        Ok(files) => ComparedRecord::Files(files),
        Err(reason) => ComparedRecord::Failed(reason),
    }
}

async fn ask(
    forge: &ForgeClient,
    config: &CompareConfig,
    event: &Event,
    deadline: tokio::time::Instant,
) -> Result<Vec<String>, String> {
    let now = std::time::SystemTime::now();
    if let Some(until) = *forge.held_until.lock().expect("never poisoned")
        && until > now
    {
        return Err(format!(
            "the forge asked to wait (rate limited) until {}",
            httpdate::fmt_http_date(until)
        ));
    }
    let client = &forge.client;
    let token = config
        .api
        .token
        .as_ref()
        .ok_or_else(|| "its token was not read".to_owned())?;
    let headers = crate::status::forge::api_headers(config.api.forge, token, "compare")?;
    let asked = async {
        let mut files = BTreeSet::new();
        let base = config
            .base_of(event)
            .ok_or_else(|| "the push has nothing to be compared with".to_owned())?;
        let mut path = first_path(config.api.forge, &event.repository, base, &event.after)?;
        for _ in 0..MOST_PAGES {
            let answer = client
                .call(Method::GET, &path, headers.clone(), bytes::Bytes::new())
                .await
                .map_err(|err| err.to_string())?;
            // A renamed or transferred repository's old address (GitHub answers `301`
            // with its new one): followed within the API root, as the token goes along.
            if answer.status.is_redirection()
                && let Some(moved) = answer
                    .headers
                    .get(http::header::LOCATION)
                    .and_then(|location| location.to_str().ok())
                    .and_then(|location| redirect_within(&config.api.api_url, location))
            {
                path = moved;
                continue;
            }
            let now = std::time::SystemTime::now();
            if let Some(wait) = crate::status::forge::rate_limited(&answer, now) {
                let until = now + wait;
                *forge.held_until.lock().expect("never poisoned") = Some(until);
                return Err(format!(
                    "the forge is rate limiting its token ({}); not asked again until {}",
                    answer.status.as_u16(),
                    httpdate::fmt_http_date(until)
                ));
            }
            if !answer.status.is_success() {
                return Err(format!(
                    "the forge answered {}: {}",
                    answer.status.as_u16(),
                    crate::status::forge::shorten(
                        &crate::status::forge::message(&answer.body),
                        200
                    )
                ));
            }
            let page = read_page(config.api.forge, &answer.body, &path, &config.api.api_url)?;
            files.extend(page.files);
            // More than path filters compare: not kept (the record would hold them all).
            if files.len() > MOST_CHANGED_FILES {
                return Err(format!(
                    "the forge lists more than the {MOST_CHANGED_FILES} changed files hookrelay compares"
                ));
            }
            match page.next {
                Some(next) => path = next,
                None => return Ok(files.into_iter().collect()),
            }
        }
        Err(format!(
            "the forge's list of changed files runs past {MOST_PAGES} pages"
        ))
    };
    tokio::time::timeout_at(deadline, asked)
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "the forge did not answer within {:?} (`compare.timeout`)",
                config.timeout
            ))
        })
}

/// The first request's path and query, below the API root.
fn first_path(forge: Forge, repository: &str, base: &str, after: &str) -> Result<String, String> {
    // A commit id, or a branch (`new_branch_base`) whose `/`s stay in a path and are
    // encoded in a query.
    let in_path = base.split('/').map(segment).collect::<Vec<_>>().join("/");
    let (before, after) = (segment(base), segment(after));
    let repo = || {
        owner_and_repo(repository).map_err(|_| {
            format!("repository {repository:?} is not owner/name, so the forge cannot be asked")
        })
    };
    Ok(match forge {
        Forge::Github => format!("/repos/{}/compare/{in_path}...{after}", repo()?),
        Forge::Gitea => format!(
            "/repos/{}/compare/{in_path}...{after}?verification=false",
            repo()?
        ),
        Forge::Gitlab => format!(
            "/projects/{}/repository/compare?from={before}&to={after}",
            segment(repository)
        ),
        Forge::BitbucketCloud => format!(
            "/repositories/{}/diffstat/{after}..{in_path}?topic=true",
            repo()?
        ),
        Forge::BitbucketServer => {
            let repo = repo()?;
            let (project, slug) = repo.split_once('/').expect("owner_and_repo has a /");
            format!(
                "/rest/api/latest/projects/{project}/repos/{slug}/changes?since={before}&until={after}&limit=1000"
            )
        }
    })
}

/// One page of a forge's answer: the paths it names, and the next page's path, if any.
#[derive(Debug, Default, PartialEq, Eq)]
struct Page {
    files: Vec<String>,
    next: Option<String>,
}

#[derive(Deserialize)]
struct GithubCompare {
    files: Option<Vec<GithubFile>>,
}

#[derive(Deserialize)]
struct GithubFile {
    filename: String,
    previous_filename: Option<String>,
}

#[derive(Deserialize)]
struct GiteaCompare {
    #[serde(default)]
    commits: Vec<GiteaCommit>,
}

#[derive(Deserialize)]
struct GiteaCommit {
    files: Option<Vec<GiteaFile>>,
}

#[derive(Deserialize)]
struct GiteaFile {
    filename: String,
}

#[derive(Deserialize)]
struct GitlabCompare {
    #[serde(default)]
    diffs: Vec<GitlabDiff>,
    #[serde(default)]
    compare_timeout: bool,
}

#[derive(Deserialize)]
struct GitlabDiff {
    old_path: Option<String>,
    new_path: Option<String>,
}

#[derive(Deserialize)]
struct BitbucketCloudPage {
    #[serde(default)]
    values: Vec<BitbucketCloudStat>,
    next: Option<String>,
}

#[derive(Deserialize)]
struct BitbucketCloudStat {
    old: Option<BitbucketCloudPath>,
    new: Option<BitbucketCloudPath>,
}

#[derive(Deserialize)]
struct BitbucketCloudPath {
    path: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct BitbucketServerPage {
    #[serde(default)]
    values: Vec<BitbucketServerChange>,
    #[serde(default = "last_page")]
    is_last_page: bool,
    next_page_start: Option<u64>,
}

fn last_page() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct BitbucketServerChange {
    path: Option<BitbucketServerPath>,
    src_path: Option<BitbucketServerPath>,
}

#[derive(Deserialize)]
struct BitbucketServerPath {
    #[serde(rename = "toString")]
    to_string: String,
}

/// Reads one page of `forge`'s answer to the request at `path` (below `api_url`).
fn read_page(forge: Forge, body: &[u8], path: &str, api_url: &str) -> Result<Page, String> {
    let unreadable = |err: serde_json::Error| {
        format!("the forge's answer is not a comparison hookrelay can read: {err}")
    };
    let page = match forge {
        Forge::Github => {
            let compare: GithubCompare = serde_json::from_slice(body).map_err(unreadable)?;
            let files = compare.files.unwrap_or_default();
            if files.len() >= GITHUB_MOST_FILES {
                return Err(format!(
                    "GitHub's comparison lists at most {GITHUB_MOST_FILES} files, and it lists {}",
                    files.len()
                ));
            }
            Page {
                files: files
                    .into_iter()
                    .flat_map(|file| std::iter::once(file.filename).chain(file.previous_filename))
                    .collect(),
                next: None,
            }
        }
        Forge::Gitea => {
            let compare: GiteaCompare = serde_json::from_slice(body).map_err(unreadable)?;
            let mut files = Vec::new();
            for commit in compare.commits {
                let Some(listed) = commit.files else {
                    return Err("the forge's comparison lists no files for a commit".into());
                };
                files.extend(listed.into_iter().map(|file| file.filename));
            }
            Page { files, next: None }
        }
        Forge::Gitlab => {
            let compare: GitlabCompare = serde_json::from_slice(body).map_err(unreadable)?;
            if compare.compare_timeout {
                return Err("GitLab's comparison timed out (`compare_timeout`)".into());
            }
            Page {
                files: compare
                    .diffs
                    .into_iter()
                    .flat_map(|diff| diff.old_path.into_iter().chain(diff.new_path))
                    .collect(),
                next: None,
            }
        }
        Forge::BitbucketCloud => {
            let page: BitbucketCloudPage = serde_json::from_slice(body).map_err(unreadable)?;
            let next = match page.next {
                None => None,
                Some(next) => Some(redirect_within(api_url, &next).ok_or_else(|| {
                    "the forge's next page is not below its API root (`compare.api_url`)".to_owned()
                })?),
            };
            Page {
                files: page
                    .values
                    .into_iter()
                    .flat_map(|stat| stat.old.into_iter().chain(stat.new))
                    .map(|side| side.path)
                    .collect(),
                next,
            }
        }
        Forge::BitbucketServer => {
            let page: BitbucketServerPage = serde_json::from_slice(body).map_err(unreadable)?;
            let next = match (page.is_last_page, page.next_page_start) {
                (true, _) => None,
                (false, Some(start)) => {
                    let first = path.split("&start=").next().unwrap_or(path);
                    Some(format!("{first}&start={start}"))
                }
                (false, None) => {
                    return Err(
                        "the forge says more changes follow but not from where (`nextPageStart`)"
                            .into(),
                    );
                }
            };
            Page {
                files: page
                    .values
                    .into_iter()
                    .flat_map(|change| change.src_path.into_iter().chain(change.path))
                    .map(|path| path.to_string)
                    .collect(),
                next,
            }
        }
    };
    Ok(page)
}

pub mod fuzz;
#[cfg(test)]
mod tests;
