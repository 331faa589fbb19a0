//! What a catch-up asks the forge with: a token, or a GitHub App's key (its own token,
//! or its installation's on the hook's repository or organisation), and the headers of
//! each call, with the token made again before it expires.

use std::time::SystemTime;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, header};

use super::github_app::{self, AppKey};
use super::{Forge, HookUrl};
use crate::secret::{Secret, SecretRef};
use crate::status::forge::{GITHUB_ACCEPT, GITHUB_API_VERSION};
use crate::upstream::{Upstream, UpstreamResponse};

/// What a catch-up asks the forge with, as configured: a token, or a GitHub App's ID and
/// private key (for the App's own hook, or a repository's or organisation's hook through
/// the App's installation there).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CredentialRef {
    Token(SecretRef),
    App { app: String, key: SecretRef },
}

/// A [`CredentialRef`] read: the token, or the App's key ready to sign its tokens.
#[derive(Clone, Debug)]
pub enum Credential {
    Token(Secret),
    App(std::sync::Arc<AppKey>),
}

impl CredentialRef {
    /// Reads the token or the App's key now. Errors name where from, never a value.
    pub fn resolve(&self) -> Result<Credential, String> {
        self.resolve_with(&|name| std::env::var(name).ok())
    }

    /// [`CredentialRef::resolve`] with an explicit environment.
    pub fn resolve_with(&self, env: &dyn Fn(&str) -> Option<String>) -> Result<Credential, String> {
        match self {
            CredentialRef::Token(token) => token.resolve_with(env).map(Credential::Token),
            CredentialRef::App { app, key } => {
                let pem = key.resolve_with(env)?;
                AppKey::new(app, &pem)
                    .map(|key| Credential::App(std::sync::Arc::new(key)))
                    .map_err(|err| format!("{key}: {err}"))
            }
        }
    }

    /// Whether this credential can read `hook`'s log: the App's own hook only with the
    /// App's key; a GitLab hook only with a token. An App reads a repository's or an
    /// organisation's hook through its installation there.
    pub fn fits(&self, hook: &HookUrl) -> Result<(), String> {
        match (self, hook.is_app()) {
            (CredentialRef::App { .. }, _) if hook.forge == Forge::GitLab => Err(format!(
                "{} is a GitLab hook: it is read with a GitLab token (token = \"env:…\"; \
                 --token), not a GitHub App's key",
                hook.shown()
            )),
            (CredentialRef::Token(_), true) => Err(format!(
                "{} is a GitHub App's own hook, which only the App may read: give the App's \
                 ID and private key (app = \"…\", key = \"file:…\"; --app and --key) instead \
                 of a token",
                hook.shown()
            )),
            _ => Ok(()),
        }
    }
}

impl std::fmt::Display for CredentialRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CredentialRef::Token(token) => write!(f, "token {token}"),
            CredentialRef::App { app, key } => write!(f, "App {app} (key {key})"),
        }
    }
}

/// The headers of a run's calls (to GitHub as status posts send them): made once a run
/// for a token; for a GitHub App, with a token signed by its key for its own hook, or
/// the token of its installation on the repository or organisation for theirs, each
/// made again before it expires.
pub(super) struct Authorization<'a> {
    credential: &'a Credential,
    hook: &'a HookUrl,
    bearer: Secret,
    /// The App's own token, while `bearer` is its installation's (scrubbed too).
    app_token: Option<Secret>,
    made: std::time::Instant,
    headers: HeaderMap,
}

/// How long an installation's token is used (GitHub's last an hour).
const INSTALLATION_TOKEN_FOR: std::time::Duration = std::time::Duration::from_secs(50 * 60);

impl<'a> Authorization<'a> {
    pub(super) async fn new(
        credential: &'a Credential,
        hook: &'a HookUrl,
        client: &Upstream,
    ) -> Result<Authorization<'a>, String> {
        let mut asking = Authorization {
            credential,
            hook,
            headers: HeaderMap::new(),
            bearer: Secret::new(String::new()),
            app_token: None,
            made: std::time::Instant::now(),
        };
        match hook.forge {
            Forge::GitHub => {
                asking
                    .headers
                    .insert(header::ACCEPT, HeaderValue::from_static(GITHUB_ACCEPT));
                asking.headers.insert(
                    "x-github-api-version",
                    HeaderValue::from_static(GITHUB_API_VERSION),
                );
            }
            Forge::GitLab => {
                asking
                    .headers
                    .insert(header::ACCEPT, HeaderValue::from_static("application/json"));
            }
        }
        asking.renew(client).await?;
        Ok(asking)
    }

    /// Makes the bearer token (again).
    async fn renew(&mut self, client: &Upstream) -> Result<(), String> {
        self.made = std::time::Instant::now();
        match self.credential {
            Credential::Token(token) => {
                self.bearer = token.clone();
                self.authorize()
            }
            Credential::App(key) => {
                self.bearer = key.token(SystemTime::now())?;
                self.authorize()?;
                if self.hook.is_app() {
                    return Ok(());
                }
                let installation = self.installation_token(client, key).await?;
                self.app_token = Some(std::mem::replace(&mut self.bearer, installation));
                self.authorize()
            }
        }
    }

    /// The token of the App's installation that covers the hook's repository or
    /// organisation (`GET …/installation`, then `POST …/access_tokens`), asked for with
    /// the App's own token, which `self` carries now.
    async fn installation_token(&self, client: &Upstream, key: &AppKey) -> Result<Secret, String> {
        let (path, covered) = self
            .hook
            .installation()
            .ok_or_else(|| format!("{} names no repository or organisation", self.hook.shown()))?;
        let answer = client
            .call(Method::GET, &path, self.headers.clone(), Bytes::new())
            .await
            .map_err(|err| format!("{}{path}: {err}", self.hook.origin))?;
        let app = key.app();
        let installation = match answer.status.as_u16() {
            200 => serde_json::from_slice::<serde_json::Value>(&answer.body)
                .ok()
                .and_then(|found| found["id"].as_u64())
                .ok_or_else(|| {
                    format!("GitHub's answer for the App's installation on {covered} names no id")
                })?,
            404 => {
                return Err(format!(
                    "the GitHub App {app} is not installed on {covered}: install it there \
                     (with the permission Webhooks: read and write), or read the hook with a token"
                ));
            }
            _ => {
                return Err(
                    self.app_refused(&answer, &format!("the App's installation on {covered}"))
                );
            }
        };
        let path = format!(
            "{}/app/installations/{installation}/access_tokens",
            self.hook.api_prefix()
        );
        let answer = client
            .call(Method::POST, &path, self.headers.clone(), Bytes::new())
            .await
            .map_err(|err| format!("{}{path}: {err}", self.hook.origin))?;
        if !answer.status.is_success() {
            return Err(self.app_refused(
                &answer,
                &format!("a token of the App's installation on {covered}"),
            ));
        }
        serde_json::from_slice::<serde_json::Value>(&answer.body)
            .ok()
            .and_then(|made| made["token"].as_str().map(Secret::new))
            .filter(|token| !token.expose().is_empty())
            .ok_or_else(|| {
                format!(
                    "GitHub's answer with a token of the App's installation on {covered} holds none"
                )
            })
    }

    /// GitHub's refusal while the App asked for `what`.
    fn app_refused(&self, answer: &UpstreamResponse, what: &str) -> String {
        let said = crate::upstream::readable_message(&answer.body)
            .map(|message| format!(" ({})", self.scrubbed_from(message)))
            .unwrap_or_default();
        let why = match answer.status.as_u16() {
            401 => ": check the App's ID (or client ID), that the key is one of the App's \
                    current private keys, and this machine's clock"
                .to_owned(),
            403 => ": the installation may lack the permission Webhooks: read and write".to_owned(),
            _ => String::new(),
        };
        format!(
            "GitHub answered {} when asked for {what}{said}{why}",
            answer.status
        )
    }

    fn authorize(&mut self) -> Result<(), String> {
        let authorization = self.bearer.header_value("Bearer ").ok_or_else(|| {
            "the token holds characters a header cannot carry (a line break at its end?)".to_owned()
        })?;
        self.headers.insert(header::AUTHORIZATION, authorization);
        Ok(())
    }

    /// The next call's headers, with a token made again when the one it has ages.
    pub(super) async fn headers(&mut self, client: &Upstream) -> Result<HeaderMap, String> {
        let lasts = match (self.credential, self.app_token.is_some()) {
            (Credential::Token(_), _) => None,
            (Credential::App(_), false) => Some(github_app::FRESH_FOR),
            (Credential::App(_), true) => Some(INSTALLATION_TOKEN_FOR),
        };
        if lasts.is_some_and(|lasts| self.made.elapsed() >= lasts) {
            self.renew(client).await?;
        }
        Ok(self.headers.clone())
    }

    /// `text` (the forge's words) without the tokens, should it have repeated one.
    pub(super) fn scrubbed_from(&self, text: String) -> String {
        let text = self.bearer.scrubbed_from(text);
        match &self.app_token {
            Some(app_token) => app_token.scrubbed_from(text),
            None => text,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_apps_own_hook_is_read_with_its_key_and_a_gitlab_hook_with_a_token() {
        let token = CredentialRef::Token(SecretRef::parse("env:T").unwrap());
        let app = CredentialRef::App {
            app: "1".into(),
            key: SecretRef::parse("env:K").unwrap(),
        };
        let repo = HookUrl::parse("https://api.github.com/repos/a/b/hooks/1").unwrap();
        let own = HookUrl::parse("https://api.github.com/app/hook").unwrap();
        assert!(token.fits(&repo).is_ok() && app.fits(&own).is_ok());
        let refused = token.fits(&own).unwrap_err();
        assert!(
            refused.contains("--app and --key") && !refused.contains("  "),
            "{refused}"
        );
        // An App reads a repository's hook through its installation there.
        assert!(app.fits(&repo).is_ok());
        let lab = HookUrl::parse("https://gitlab.example.com/api/v4/projects/1/hooks/2").unwrap();
        assert!(app.fits(&lab).unwrap_err().contains("GitLab token"));
        assert!(token.fits(&lab).is_ok());
        assert_eq!(app.to_string(), "App 1 (key env:K)");
        assert_eq!(token.to_string(), "token env:T");
    }
}
