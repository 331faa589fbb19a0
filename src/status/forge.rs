//! Each forge's commit-status API: the request a status becomes, and what the answer means.
//!
//! | forge | request | auth |
//! |---|---|---|
//! | GitHub (and Enterprise Server) | `POST {api}/repos/{owner}/{repo}/statuses/{sha}` `{state, target_url, description, context}` | `Authorization: Bearer` |
//! | Gitea, Forgejo | `POST {api}/repos/{owner}/{repo}/statuses/{sha}` (same body; `{api}` ends in `/api/v1`) | `Authorization: token` |
//! | Bitbucket Cloud | `POST {api}/repositories/{workspace}/{repo}/commit/{sha}/statuses/build` `{key, state, url, name, description}` | `Authorization: Bearer` |
//! | Bitbucket Data Center | `POST {base}/rest/api/latest/projects/{key}/repos/{slug}/commits/{sha}/builds` (same body) | `Authorization: Bearer` |
//! | GitLab (the sending project, for a pipeline started on another) | `POST {api}/projects/{url-encoded path}/statuses/{sha}` `{state, name, target_url, description}` (`{api}` ends in `/api/v4`) | `Authorization: Bearer` |
//!
//! The same context (GitHub, Gitea) or key (Bitbucket) is sent for every state of one
//! pipeline, so the forge shows one check that changes. Descriptions are cut to each
//! forge's limit (GitHub refuses more than 140 characters with a `422`). Answers: `2xx`
//! posted; network errors, `5xx`, `408`, `429`, and a `403` that is a rate limit (GitHub's
//! `x-ratelimit-remaining: 0` or a secondary limit's `retry-after`) are retried no sooner
//! than the forge asks (`Retry-After`, `X-RateLimit-Reset`); every other `4xx` is final,
//! kept with the forge's message. Gogs has no status API (`check` refuses `status` there).

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::StatusPost;
use crate::event::Provider;
use crate::retry::{LONGEST_WAIT_ASKED, Verdict, wait_asked_for};
use crate::secret::Secret;
use crate::upstream::{UpstreamError, UpstreamResponse, flatten_message};

/// What GitHub's REST API is asked for, and the version of it the calls are written
/// for (status posts here, and catch-up's reading of a hook's deliveries).
pub const GITHUB_ACCEPT: &str = "application/vnd.github+json";
pub const GITHUB_API_VERSION: &str = "2022-11-28";

/// A forge hookrelay can post statuses to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Forge {
    Github,
    /// Gitea and Forgejo: one API.
    Gitea,
    BitbucketCloud,
    BitbucketServer,
    /// A GitLab project whose push started a pipeline on another (a cross-project
    /// rebuild): the sending commit shows the downstream pipeline.
    Gitlab,
}

/// GitHub refuses longer descriptions (`422 description is too long`).
const GITHUB_DESCRIPTION: usize = 140;
/// Bitbucket Data Center's build-status fields hold 255 characters; the others are kept
/// as short, since a status's description is one line on every forge.
const OTHER_DESCRIPTION: usize = 255;
/// Bitbucket's keys: at most this long (Data Center's field limit).
const BITBUCKET_KEY: usize = 255;
/// When a forge says it is rate limited but not until when: wait at least this (GitHub's
/// advice for secondary limits).
const RATE_LIMITED_WAIT: Duration = Duration::from_secs(60);

impl Forge {
    /// The forge of a provider, or why it has none.
    pub fn of(provider: Provider) -> Result<Forge, String> {
        match provider {
            Provider::Github => Ok(Forge::Github),
            Provider::Gitea | Provider::Forgejo => Ok(Forge::Gitea),
            Provider::BitbucketCloud => Ok(Forge::BitbucketCloud),
            Provider::BitbucketServer => Ok(Forge::BitbucketServer),
            Provider::Gogs => Err("Gogs has no commit-status API (gogs/gogs#4631), so hookrelay cannot report pipelines back to it; remove `status`".into()),
            Provider::Gitlab => Ok(Forge::Gitlab),
            Provider::Generic => Err("a generic sender has no known status API; `status` applies to github, gitlab, gitea, forgejo, bitbucket-cloud and bitbucket-server sources".into()),
        }
    }

    /// The API root used when `status.api_url` is not given, or why it must be.
    pub fn default_api_url(self) -> Result<&'static str, &'static str> {
        match self {
            Forge::Github => Ok("https://api.github.com"),
            Forge::BitbucketCloud => Ok("https://api.bitbucket.org/2.0"),
            Forge::Gitlab => Ok("https://gitlab.com/api/v4"),
            Forge::Gitea => Err(
                "a Gitea or Forgejo server has no default address: set api_url, e.g. \"https://codeberg.org/api/v1\"",
            ),
            Forge::BitbucketServer => Err(
                "a Bitbucket Data Center server has no default address: set api_url to its base URL, e.g. \"https://bitbucket.example.com\"",
            ),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Forge::Github => "github",
            Forge::Gitea => "gitea",
            Forge::BitbucketCloud => "bitbucket-cloud",
            Forge::BitbucketServer => "bitbucket-server",
            Forge::Gitlab => "gitlab",
        }
    }

    /// The forge's word for a GitLab pipeline state (`refused`: GitLab refused the trigger).
    pub fn state(self, gitlab: &str) -> &'static str {
        if self == Forge::Gitlab {
            // The states GitLab's commit-status API documents (`pending`, `running`,
            // `success`, `failed`, `canceled`); a skipped pipeline reads as passed, as on
            // the other forges.
            return match gitlab {
                "running" => "running",
                "success" | "skipped" => "success",
                "failed" | "refused" => "failed",
                "canceled" => "canceled",
                _ => "pending",
            };
        }
        let bitbucket = matches!(self, Forge::BitbucketCloud | Forge::BitbucketServer);
        match gitlab {
            "success" | "skipped" if bitbucket => "SUCCESSFUL",
            "success" | "skipped" => "success",
            "failed" | "refused" if bitbucket => "FAILED",
            "failed" => "failure",
            "refused" => "error",
            "canceled" => match self {
                Forge::BitbucketCloud => "STOPPED",
                Forge::BitbucketServer => "CANCELLED",
                _ => "error",
            },
            _ if bitbucket => "INPROGRESS",
            _ => "pending",
        }
    }
}

/// One request to a forge: below the API root, with its headers (the token among them).
pub struct ForgeRequest {
    pub method: Method,
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// `text` cut to `most` characters, with an ellipsis when cut.
pub fn shorten(text: &str, most: usize) -> String {
    if text.chars().count() <= most {
        return text.to_owned();
    }
    let mut cut: String = text.chars().take(most.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// Percent-encodes one path segment (a repository name may hold anything GitHub allows).
pub(crate) fn segment(text: &str) -> String {
    const KEEP: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'~');
    percent_encoding::utf8_percent_encode(text, KEEP).to_string()
}

/// `owner/repo` as two encoded segments; a repository name without an owner is refused.
pub(crate) fn owner_and_repo(repository: &str) -> Result<String, String> {
    match repository.split_once('/') {
        Some((owner, repo))
            if !owner.is_empty()
                && !repo.is_empty()
                && !repo.contains('/')
                && !crate::trigger::is_dot_segment(owner)
                && !crate::trigger::is_dot_segment(repo) =>
        {
            Ok(format!("{}/{}", segment(owner), segment(repo)))
        }
        _ => Err(format!(
            "repository {repository:?} is not owner/name, so no status can be posted for it"
        )),
    }
}

/// The headers every call to `forge`'s API carries: what it answers in (GitHub's media
/// type and API version), and `token` as the forge reads it (`Bearer`, Gitea's `token`),
/// marked sensitive. `setting` (`status`, `compare`) names the token when it holds what a
/// header cannot carry.
pub fn api_headers(forge: Forge, token: &Secret, setting: &str) -> Result<HeaderMap, String> {
    let mut headers = HeaderMap::new();
    let (scheme, accept) = match forge {
        Forge::Github => ("Bearer ", GITHUB_ACCEPT),
        Forge::Gitea => ("token ", "application/json"),
        Forge::BitbucketCloud | Forge::BitbucketServer | Forge::Gitlab => {
            ("Bearer ", "application/json")
        }
    };
    headers.insert(header::ACCEPT, HeaderValue::from_static(accept));
    if forge == Forge::Github {
        headers.insert(
            "x-github-api-version",
            HeaderValue::from_static(GITHUB_API_VERSION),
        );
    }
    let authorization = token
        .header_value(scheme)
        .ok_or_else(|| format!("the {setting} token holds characters a header cannot carry"))?;
    headers.insert(header::AUTHORIZATION, authorization);
    Ok(headers)
}

/// The request that posts `post`, with `token`.
pub fn request(post: &StatusPost, token: &Secret) -> Result<ForgeRequest, String> {
    let target = &post.target;
    let forge = target.forge;
    let url = post
        .target_url
        .clone()
        .unwrap_or_else(|| target.fallback_url.clone());
    // A commit id is hex (SHA-1 or SHA-256): anything else would be a path of its own.
    if target.sha.is_empty() || !target.sha.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "commit {:?} is not a hex commit id, so no status can be posted for it",
            shorten(&target.sha, 80)
        ));
    }
    let sha = segment(&target.sha);
    let mut headers = api_headers(forge, token, "status")?;
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let (path, body) = match forge {
        Forge::Gitlab if crate::trigger::is_dot_segment(&target.repository) => {
            return Err(format!(
                "project {:?} is not a project path, so no status can be posted for it",
                target.repository
            ));
        }
        Forge::Gitlab => (
            // A project path (`group/sub/project`) is one encoded segment.
            format!("/projects/{}/statuses/{sha}", segment(&target.repository)),
            json!({
                "state": forge.state(&post.state),
                "name": shorten(&target.context, OTHER_DESCRIPTION),
                "target_url": url,
                "description": shorten(&post.description, OTHER_DESCRIPTION),
            }),
        ),
        Forge::Github | Forge::Gitea => {
            let repo = owner_and_repo(&target.repository)?;
            let most = if forge == Forge::Github {
                GITHUB_DESCRIPTION
            } else {
                OTHER_DESCRIPTION
            };
            (
                format!("/repos/{repo}/statuses/{sha}"),
                json!({
                    "state": forge.state(&post.state),
                    "target_url": url,
                    "description": shorten(&post.description, most),
                    "context": target.context,
                }),
            )
        }
        Forge::BitbucketCloud | Forge::BitbucketServer => {
            let repo = owner_and_repo(&target.repository)?;
            let body = json!({
                "key": shorten(&target.context, BITBUCKET_KEY),
                "state": forge.state(&post.state),
                "url": url,
                "name": shorten(&target.context, OTHER_DESCRIPTION),
                "description": shorten(&post.description, OTHER_DESCRIPTION),
            });
            let path = if forge == Forge::BitbucketCloud {
                format!("/repositories/{repo}/commit/{sha}/statuses/build")
            } else {
                let (project, slug) = repo.split_once('/').expect("owner_and_repo has a /");
                format!("/rest/api/latest/projects/{project}/repos/{slug}/commits/{sha}/builds")
            };
            (path, body)
        }
    };
    Ok(ForgeRequest {
        method: Method::POST,
        path,
        headers,
        body: Bytes::from(body.to_string()),
    })
}

/// Where a `307`/`308` answer to a status post leads, as a path to post to on the same
/// forge API (`api_url`, written `base`): GitHub answers a POST to a renamed or transferred
/// repository's old URL with `307` and the repository's new one, which keeps the method
/// and body. Followed only within `base` (the same scheme, host and port, under its path),
/// as the status token goes with it; `None` for anywhere else.
pub fn redirect_within(base: &str, location: &str) -> Option<String> {
    let base: http::Uri = base.parse().ok()?;
    let location: http::Uri = location.parse().ok()?;
    if location.scheme().is_some() || location.authority().is_some() {
        let same = location.scheme() == base.scheme()
            && location.authority().map(|a| a.host().to_ascii_lowercase())
                == base.authority().map(|a| a.host().to_ascii_lowercase())
            && location.port_u16().or(default_port(&location))
                == base.port_u16().or(default_port(&base));
        if !same {
            return None;
        }
    }
    let path = location.path();
    // `//host/…` names another host, whatever a parser makes of it.
    if path.starts_with("//") {
        return None;
    }
    let prefix = base.path().trim_end_matches('/');
    let rest = path.strip_prefix(prefix)?;
    if !rest.starts_with('/') {
        return None;
    }
    Some(match location.query() {
        Some(query) => format!("{rest}?{query}"),
        None => rest.to_owned(),
    })
}

fn default_port(uri: &http::Uri) -> Option<u16> {
    match uri.scheme_str()? {
        "https" => Some(443),
        "http" => Some(80),
        _ => None,
    }
}

/// What a forge's answer means for the post.
pub fn classify(result: &Result<UpstreamResponse, UpstreamError>, now: SystemTime) -> Verdict {
    let answer = match result {
        Ok(answer) => answer,
        Err(err) => return crate::retry::unanswered(err),
    };
    let status = answer.status;
    if status.is_success() {
        return Verdict::Sent {
            status: status.as_u16(),
            pipeline_id: None,
            pipeline_url: None,
        };
    }
    let said = message(&answer.body);
    // GitLab refuses to set a commit status to the state it has already (`400 Cannot
    // transition status via :run from :running`): the commit shows what was wanted.
    if status == StatusCode::BAD_REQUEST && said.starts_with("Cannot transition status via") {
        return Verdict::Sent {
            status: status.as_u16(),
            pipeline_id: None,
            pipeline_url: None,
        };
    }
    let reason = format!("{} {said}", status.as_u16());
    if let Some(floor) = rate_limited(answer, now) {
        return Verdict::Retry {
            floor,
            status: Some(status.as_u16()),
            reason,
        };
    }
    if crate::retry::retryable(status) {
        return Verdict::Retry {
            floor: wait_asked_for(&answer.headers, now).unwrap_or(Duration::ZERO),
            status: Some(status.as_u16()),
            reason,
        };
    }
    let hint = match status {
        StatusCode::UNAUTHORIZED => {
            " — the status token was not accepted (expired, revoked, or not a token of this forge)"
        }
        StatusCode::FORBIDDEN => {
            " — the status token may not write commit statuses to this repository (GitHub: repo:status or \"Commit statuses\" write; Gitea/Forgejo: write:repository; Bitbucket: repository write; GitLab: api, Developer or more)"
        }
        StatusCode::NOT_FOUND => {
            " — the repository or commit is not visible to the status token (a private repository answers 404 to a token without access)"
        }
        _ => "",
    };
    // A redirect that was not followed (see [`redirect_within`]): say where it led.
    let hint = match crate::retry::redirected_to(status, &answer.headers) {
        Some(place) => format!(
            " — redirected to {place}, not followed: only a 307 or 308 within the forge's API (api_url) is, once, as the status token goes with it"
        ),
        None => hint.to_owned(),
    };
    Verdict::Failed {
        status: Some(status.as_u16()),
        reason: format!("{reason}{hint}"),
        pipeline_id: None,
        pipeline_url: None,
    }
}

/// A forge's answer that says "rate limited" (GitHub answers `403` or `429`): how long
/// to wait. `X-RateLimit-Reset` (epoch seconds) when no request is left, else
/// `Retry-After`, else a minute. Also what tells catch-up to stop asking GitHub.
pub fn rate_limited(answer: &UpstreamResponse, now: SystemTime) -> Option<Duration> {
    let header = |name: &str| {
        answer
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    let status = answer.status;
    if status != StatusCode::FORBIDDEN && status != StatusCode::TOO_MANY_REQUESTS {
        return None;
    }
    if header("x-ratelimit-remaining") == Some("0")
        && let Some(reset) = header("x-ratelimit-reset").and_then(|v| v.parse::<u64>().ok())
    {
        // A reset past what a clock holds is a broken header: wait the longest then.
        let wait = SystemTime::UNIX_EPOCH
            .checked_add(Duration::from_secs(reset))
            .map_or(LONGEST_WAIT_ASKED, |at| {
                at.duration_since(now).unwrap_or(Duration::ZERO)
            });
        return Some(wait.clamp(Duration::from_secs(1), LONGEST_WAIT_ASKED));
    }
    if let Some(wait) = wait_asked_for(&answer.headers, now) {
        return Some(wait);
    }
    let said = String::from_utf8_lossy(&answer.body).to_lowercase();
    (status == StatusCode::TOO_MANY_REQUESTS || said.contains("rate limit"))
        .then_some(RATE_LIMITED_WAIT)
}

/// The forge's own words from an error answer: `message` (GitHub, Gitea), `error.message`
/// (Bitbucket Cloud), `errors[0].message` (Bitbucket Data Center), else the body's start.
pub(crate) fn message(body: &[u8]) -> String {
    #[derive(Default, Deserialize)]
    struct Answer {
        message: Option<serde_json::Value>,
        error: Option<serde_json::Value>,
        errors: Option<serde_json::Value>,
    }
    let parsed: Answer = serde_json::from_slice(body).unwrap_or_default();
    let first_error = parsed
        .errors
        .as_ref()
        .and_then(|e| e.get(0))
        .and_then(|e| e.get("message"))
        .cloned();
    let nested = parsed
        .error
        .as_ref()
        .and_then(|e| e.get("message"))
        .cloned();
    parsed
        .message
        .or(nested)
        .or(first_error)
        .or(parsed.error)
        .map(|m| flatten_message(&m))
        .unwrap_or_else(|| String::from_utf8_lossy(body).chars().take(300).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_redirect_not_followed_says_where_it_led() {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            http::header::LOCATION,
            "https://elsewhere.example/repositories/42/statuses/abc?token=secret"
                .parse()
                .unwrap(),
        );
        let answer = UpstreamResponse {
            status: StatusCode::TEMPORARY_REDIRECT,
            headers,
            body: bytes::Bytes::new(),
            latency: Duration::ZERO,
        };
        match classify(&Ok(answer), SystemTime::now()) {
            Verdict::Failed { reason, .. } => {
                assert!(
                    reason.contains(
                        "redirected to https://elsewhere.example/repositories/42/statuses/abc,"
                    ),
                    "{reason}"
                );
                assert!(!reason.contains("secret"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_redirect_is_followed_only_within_the_forge_api() {
        let github = "https://api.github.com";
        assert_eq!(
            redirect_within(
                github,
                "https://api.github.com/repositories/42/statuses/abc"
            )
            .as_deref(),
            Some("/repositories/42/statuses/abc")
        );
        assert_eq!(
            redirect_within(
                github,
                "https://API.GitHub.com:443/repositories/42/statuses/abc?x=1"
            )
            .as_deref(),
            Some("/repositories/42/statuses/abc?x=1")
        );
        assert_eq!(
            redirect_within(github, "/repositories/42/statuses/abc").as_deref(),
            Some("/repositories/42/statuses/abc")
        );
        let enterprise = "https://ghe.example/api/v3";
        assert_eq!(
            redirect_within(
                enterprise,
                "https://ghe.example/api/v3/repositories/7/statuses/abc"
            )
            .as_deref(),
            Some("/repositories/7/statuses/abc")
        );
        for elsewhere in [
            "https://evil.example/repositories/42/statuses/abc",
            "http://api.github.com/repositories/42/statuses/abc",
            "https://api.github.com:8443/repositories/42/statuses/abc",
            "//evil.example/x",
            "not a url at all",
        ] {
            assert_eq!(redirect_within(github, elsewhere), None, "{elsewhere}");
        }
        assert_eq!(
            redirect_within(enterprise, "https://ghe.example/other/repositories/7"),
            None,
            "outside the API's path"
        );
        assert_eq!(
            redirect_within(enterprise, "https://ghe.example/api/v3evil/x"),
            None,
            "a path that only starts with the API's"
        );
    }
    use crate::status::StatusTarget;

    fn post(forge: Forge, repository: &str, state: &str) -> StatusPost {
        StatusPost {
            target: StatusTarget {
                source: "src".into(),
                forge,
                api_url: String::new(),
                token_ref: "env:T".into(),
                repository: repository.into(),
                sha: "6113728f27ae82c7b1a177c8d03f9e96e0adf246".into(),
                context: "gitlab/acme/app".into(),
                fallback_url: "https://gitlab.example.com/acme/app".into(),
                poll_after_ms: 0,
            },
            state: state.into(),
            pipeline_id: 287,
            target_url: Some("https://gitlab.example.com/acme/app/-/pipelines/287".into()),
            description: "d".repeat(200),
            finished_at: None,
        }
    }

    fn body(request: &ForgeRequest) -> serde_json::Value {
        serde_json::from_slice(&request.body).unwrap()
    }

    #[test]
    fn states_map_to_each_forges_words() {
        let table = [
            (
                "pending",
                ["pending", "pending", "INPROGRESS", "INPROGRESS"],
            ),
            (
                "running",
                ["pending", "pending", "INPROGRESS", "INPROGRESS"],
            ),
            ("manual", ["pending", "pending", "INPROGRESS", "INPROGRESS"]),
            (
                "success",
                ["success", "success", "SUCCESSFUL", "SUCCESSFUL"],
            ),
            (
                "skipped",
                ["success", "success", "SUCCESSFUL", "SUCCESSFUL"],
            ),
            ("failed", ["failure", "failure", "FAILED", "FAILED"]),
            ("canceled", ["error", "error", "STOPPED", "CANCELLED"]),
            ("refused", ["error", "error", "FAILED", "FAILED"]),
        ];
        let forges = [
            Forge::Github,
            Forge::Gitea,
            Forge::BitbucketCloud,
            Forge::BitbucketServer,
        ];
        for (gitlab, words) in table {
            for (forge, word) in forges.iter().zip(words) {
                assert_eq!(forge.state(gitlab), word, "{gitlab} on {forge:?}");
            }
        }
    }

    /// The body has the fields of GitHub's published example request, and no others.
    #[test]
    fn github_requests_are_githubs_documented_shape() {
        let request = request(
            &post(Forge::Github, "octo-org/hello world", "success"),
            &Secret::new("ghp_x".to_owned()),
        )
        .unwrap();
        assert_eq!(
            request.path,
            "/repos/octo-org/hello%20world/statuses/6113728f27ae82c7b1a177c8d03f9e96e0adf246"
        );
        assert_eq!(request.headers["authorization"], "Bearer ghp_x");
        assert!(request.headers["authorization"].is_sensitive());
        assert_eq!(request.headers["x-github-api-version"], "2022-11-28");
        let sent = body(&request);
        let example: serde_json::Value = serde_json::from_slice(include_bytes!(
            "../../tests/fixtures/status/github_create_status_request.json"
        ))
        .unwrap();
        let keys = |v: &serde_json::Value| {
            let mut keys: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
            keys.sort();
            keys
        };
        assert_eq!(keys(&sent), keys(&example));
        assert_eq!(sent["state"], "success");
        assert_eq!(sent["description"].as_str().unwrap().chars().count(), 140);
    }

    #[test]
    fn a_repository_or_commit_that_would_climb_out_of_the_api_path_is_refused() {
        let token = Secret::new("t".to_owned());
        for forge in [
            Forge::Github,
            Forge::Gitea,
            Forge::BitbucketCloud,
            Forge::BitbucketServer,
        ] {
            for repository in ["../x", "x/..", "./x", "x/.", "x"] {
                let err = request(&post(forge, repository, "success"), &token)
                    .err()
                    .unwrap();
                assert!(
                    err.contains("is not owner/name"),
                    "{forge:?} {repository}: {err}"
                );
            }
            // Dots inside a name are names: `.github`, `a..b`.
            assert!(request(&post(forge, "acme/.github", "success"), &token).is_ok());
            assert!(request(&post(forge, "acme/a..b", "success"), &token).is_ok());
        }
        assert!(request(&post(Forge::Gitlab, "..", "success"), &token).is_err());
        assert!(request(&post(Forge::Gitlab, "group/../x", "success"), &token).is_ok());
        for sha in ["", "../../user", "6113728f?x=1", "abc def"] {
            let mut bad = post(Forge::Github, "acme/app", "success");
            bad.target.sha = sha.into();
            let err = request(&bad, &token).err().unwrap();
            assert!(err.contains("is not a hex commit id"), "{sha}: {err}");
        }
    }

    #[test]
    fn bitbucket_requests_carry_a_key_and_the_documented_fields() {
        let cloud = request(
            &post(Forge::BitbucketCloud, "team/repo", "running"),
            &Secret::new("t".to_owned()),
        )
        .unwrap();
        assert_eq!(
            cloud.path,
            "/repositories/team/repo/commit/6113728f27ae82c7b1a177c8d03f9e96e0adf246/statuses/build"
        );
        let example: serde_json::Value = serde_json::from_slice(include_bytes!(
            "../../tests/fixtures/status/bitbucket_cloud_create_build_status_request_atlassian_doc.json"
        ))
        .unwrap();
        let sent = body(&cloud);
        for field in example.as_object().unwrap().keys() {
            assert!(sent.get(field).is_some(), "{field} missing from {sent}");
        }
        assert_eq!(sent["state"], "INPROGRESS");
        let server = request(
            &post(Forge::BitbucketServer, "PROJ/repo", "canceled"),
            &Secret::new("t".to_owned()),
        )
        .unwrap();
        assert_eq!(
            server.path,
            "/rest/api/latest/projects/PROJ/repos/repo/commits/6113728f27ae82c7b1a177c8d03f9e96e0adf246/builds"
        );
        assert_eq!(body(&server)["state"], "CANCELLED");
        assert!(
            request(
                &post(Forge::Github, "no-owner", "success"),
                &Secret::new("t".to_owned())
            )
            .is_err()
        );
    }

    /// GitLab's commit-status API: the project path as one encoded segment (subgroups
    /// included), `name` for the context, GitLab's own state words.
    #[test]
    fn gitlab_requests_post_to_the_sending_projects_commit() {
        let sent = request(
            &post(Forge::Gitlab, "acme/platform/app", "running"),
            &Secret::new("glpat-x".to_owned()),
        )
        .unwrap();
        assert_eq!(
            sent.path,
            "/projects/acme%2Fplatform%2Fapp/statuses/6113728f27ae82c7b1a177c8d03f9e96e0adf246"
        );
        assert_eq!(sent.headers["authorization"], "Bearer glpat-x");
        assert!(sent.headers["authorization"].is_sensitive());
        let fields = body(&sent);
        let mut keys: Vec<&String> = fields.as_object().unwrap().keys().collect();
        keys.sort();
        assert_eq!(keys, ["description", "name", "state", "target_url"]);
        assert_eq!(fields["state"], "running");
        for (gitlab, word) in [
            ("created", "pending"),
            ("pending", "pending"),
            ("manual", "pending"),
            ("running", "running"),
            ("success", "success"),
            ("skipped", "success"),
            ("failed", "failed"),
            ("refused", "failed"),
            ("canceled", "canceled"),
        ] {
            assert_eq!(Forge::Gitlab.state(gitlab), word, "{gitlab}");
        }
    }

    fn answer(status: u16, headers: &[(&str, &str)], body: &str) -> UpstreamResponse {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.insert(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        UpstreamResponse {
            status: StatusCode::from_u16(status).unwrap(),
            headers: map,
            body: Bytes::from(body.to_owned()),
            latency: Duration::ZERO,
        }
    }

    /// GitLab's answer to a state set again (from its own API tests) is the commit already
    /// showing it; another 400 is a refusal.
    #[test]
    fn gitlab_refusing_a_repeated_state_is_sent() {
        let now = SystemTime::now();
        let repeated = answer(
            400,
            &[],
            r#"{"message":"Cannot transition status via :run from :running (Reason(s): Status cannot transition via \"run\")"}"#,
        );
        assert!(matches!(
            classify(&Ok(repeated), now),
            Verdict::Sent { status: 400, .. }
        ));
        let refused = answer(400, &[], r#"{"message":"state is missing"}"#);
        assert!(matches!(
            classify(&Ok(refused), now),
            Verdict::Failed { .. }
        ));
    }

    #[test]
    fn rate_limits_wait_for_the_reset_and_refusals_keep_the_forges_words() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let limited = answer(
            403,
            &[
                ("x-ratelimit-remaining", "0"),
                ("x-ratelimit-reset", "1000030"),
            ],
            r#"{"message":"API rate limit exceeded"}"#,
        );
        match classify(&Ok(limited), now) {
            Verdict::Retry { floor, status, .. } => {
                assert_eq!((floor, status), (Duration::from_secs(30), Some(403)))
            }
            other => panic!("{other:?}"),
        }
        // A reset no clock can hold, or a wait of centuries, is waited a day at most.
        for reset in ["18446744073709551615", "99999999999"] {
            let broken = answer(
                429,
                &[("x-ratelimit-remaining", "0"), ("x-ratelimit-reset", reset)],
                "",
            );
            assert!(
                matches!(classify(&Ok(broken), now), Verdict::Retry { floor, .. } if floor == crate::retry::LONGEST_WAIT_ASKED),
                "{reset}"
            );
        }
        let secondary = answer(
            403,
            &[("retry-after", "7")],
            r#"{"message":"You have exceeded a secondary rate limit"}"#,
        );
        assert!(
            matches!(classify(&Ok(secondary), now), Verdict::Retry { floor, .. } if floor == Duration::from_secs(7))
        );
        let forbidden = answer(
            403,
            &[],
            r#"{"message":"Resource not accessible by integration"}"#,
        );
        match classify(&Ok(forbidden), now) {
            Verdict::Failed { reason, .. } => {
                assert!(
                    reason.starts_with("403 Resource not accessible by integration"),
                    "{reason}"
                )
            }
            other => panic!("{other:?}"),
        }
        let too_long = answer(
            422,
            &[],
            r#"{"message":"Validation Failed","errors":[{"resource":"Status","code":"custom","field":"description","message":"description is too long (maximum is 140 characters)"}]}"#,
        );
        assert!(matches!(
            classify(&Ok(too_long), now),
            Verdict::Failed {
                status: Some(422),
                ..
            }
        ));
        let bitbucket = answer(
            401,
            &[],
            r#"{"type":"error","error":{"message":"Access token expired."}}"#,
        );
        match classify(&Ok(bitbucket), now) {
            Verdict::Failed { reason, .. } => {
                assert!(reason.starts_with("401 Access token expired."), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            classify(&Ok(answer(502, &[], "")), now),
            Verdict::Retry { .. }
        ));
        assert!(matches!(
            classify(&Ok(answer(201, &[], "{}")), now),
            Verdict::Sent { status: 201, .. }
        ));
    }
}
