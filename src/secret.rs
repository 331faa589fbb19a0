//! Secrets: values that must never reach a log line, an error message or a metric.
//!
//! [`Secret`] wraps the value and prints only a mask through `Debug` and `Display`, so a
//! secret cannot be logged by accident. [`SecretRef`] is how configuration names a secret
//! (`env:NAME` or `file:PATH`); a literal in a file is refused, because configuration files
//! end up in repositories.

use std::fmt;
use std::path::{Path, PathBuf};

/// A secret value. `Debug` and `Display` show only its mask ([`Secret::masked`]).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

/// GitLab's token prefixes, with what each token is: no part of its secret, so a mask
/// keeps it. The trigger API takes the first two; [`crate::trigger::check_trigger_token`]
/// refuses the others, saying what they are.
pub const GITLAB_TOKENS: &[(&str, &str)] = &[
    ("glptt-", "a pipeline trigger token"),
    ("glcbt-", "a CI job token"),
    ("glpat-", "a personal, project or group access token"),
    ("gldt-", "a deploy token"),
    ("glrt-", "a runner authentication token"),
    ("GR1348941", "a runner registration token"),
    ("glft-", "a feed token"),
    ("gloas-", "an OAuth application secret"),
    ("glimt-", "an incoming email token"),
    ("glagent-", "a Kubernetes agent token"),
    ("glsoat-", "a SCIM token"),
    ("glffct-", "a feature flags client token"),
];

/// GitHub's token prefixes (a status token may be one), kept by a mask as GitLab's are.
const GITHUB_TOKENS: &[&str] = &["github_pat_", "ghp_", "gho_", "ghu_", "ghs_", "ghr_"];

/// Characters of the secret part a mask shows: enough to tell two tokens apart in a log,
/// too few to matter (8 bits of a hex token).
const SHOWN: usize = 2;
/// Values shorter than this (after their type prefix) show none of their secret part.
const SHOWN_FROM: usize = 16;

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself, for the one place that must send or compare it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The secret as an HTTP header's value after `scheme` (`"Bearer "`, `"token "`, or
    /// `""` for the bare token), marked sensitive so that no print of the headers shows
    /// it; `None` when it holds characters a header cannot carry.
    pub fn header_value(&self, scheme: &str) -> Option<http::HeaderValue> {
        let mut value = http::HeaderValue::from_str(&format!("{scheme}{}", self.0)).ok()?;
        value.set_sensitive(true);
        Some(value)
    }

    /// The value as it may be shown: its type prefix when it has a known one (`glptt-`),
    /// then two characters of the rest when at least 16 follow, then `…`: `glptt-01…`.
    pub fn masked(&self) -> String {
        let prefix = GITLAB_TOKENS
            .iter()
            .map(|(prefix, _)| *prefix)
            .chain(GITHUB_TOKENS.iter().copied())
            .find(|prefix| self.0.starts_with(prefix))
            .unwrap_or("");
        let rest = &self.0[prefix.len()..];
        let mut masked = String::with_capacity(prefix.len() + 3 * SHOWN + 3);
        masked.push_str(prefix);
        // At least SHOWN_FROM characters follow: counted no further than that.
        if rest.chars().nth(SHOWN_FROM - 1).is_some() {
            masked.extend(rest.chars().take(SHOWN));
        }
        masked.push('…');
        masked
    }

    /// `text` with this secret, wherever it appears, replaced by its mask. An answer may
    /// repeat the request (a proxy's error page quoting the URL, whose query holds the
    /// webhook form's trigger token); what it says must not carry the secret into a log
    /// line or the store. A value shorter than [`SCRUBBED_FROM`] is no token and is left
    /// alone (scrubbing `T` would garble every message).
    pub fn scrubbed_from(&self, text: String) -> String {
        if self.0.len() < SCRUBBED_FROM || !text.contains(&self.0) {
            return text;
        }
        text.replace(&self.0, &self.masked())
    }
}

/// The shortest value [`Secret::scrubbed_from`] looks for.
const SCRUBBED_FROM: usize = 8;

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({})", self.masked())
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.masked())
    }
}

/// Where configuration says a secret lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SecretRef {
    /// `env:NAME`: an environment variable.
    Env(String),
    /// `file:PATH`: a file whose contents (trailing line breaks removed) are the secret.
    File(PathBuf),
}

impl SecretRef {
    /// Parses `env:NAME` or `file:PATH`. Anything else is refused with a message that says
    /// how to write it.
    pub fn parse(text: &str) -> Result<SecretRef, String> {
        if let Some(name) = text.strip_prefix("env:") {
            let valid = !name.is_empty()
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !name.starts_with(|c: char| c.is_ascii_digit());
            if !valid {
                return Err(format!(
                    "`env:{name}` is not a valid environment variable name (letters, digits and `_`)"
                ));
            }
            Ok(SecretRef::Env(name.to_owned()))
        } else if let Some(path) = text.strip_prefix("file:") {
            if path.is_empty() {
                return Err("`file:` needs a path, e.g. `file:/run/secrets/token`".into());
            }
            Ok(SecretRef::File(PathBuf::from(path)))
        } else {
            Err("a secret must be written `env:NAME` or `file:PATH`; \
                 literal secrets are not accepted in configuration files"
                .into())
        }
    }

    /// [`SecretRef::parse`] for a reference written in a configuration file: a relative
    /// `file:` path is taken from the file's folder (like `ca_file`), and made absolute, so
    /// the reference means the same file whatever the working directory of whoever reads
    /// it later (the forwarder, `replay` on another shell).
    pub fn parse_in(text: &str, folder: &Path) -> Result<SecretRef, String> {
        match SecretRef::parse(text)? {
            SecretRef::File(path) if path.is_relative() => {
                let joined = folder.join(path);
                Ok(SecretRef::File(
                    std::path::absolute(&joined).unwrap_or(joined),
                ))
            }
            reference => Ok(reference),
        }
    }

    /// Reads the secret now. The error names the variable or file, never a value.
    pub fn resolve(&self) -> Result<Secret, String> {
        self.resolve_with(&|name| std::env::var(name).ok())
    }

    /// [`SecretRef::resolve`] with an explicit environment.
    pub fn resolve_with(&self, env: &dyn Fn(&str) -> Option<String>) -> Result<Secret, String> {
        match self {
            SecretRef::Env(name) => match env(name) {
                Some(value) if !value.is_empty() => Ok(Secret(value)),
                Some(_) => Err(format!("environment variable {name} is empty")),
                None => Err(env_not_set(name)),
            },
            SecretRef::File(path) => {
                match crate::named_file::read_text(path, crate::named_file::SECRET) {
                    Ok(text) => {
                        let value = text.trim_end_matches(['\r', '\n']);
                        if value.is_empty() {
                            Err(format!("secret file {} is empty", path.display()))
                        } else {
                            Ok(Secret(value.to_owned()))
                        }
                    }
                    Err(err) => Err(format!("cannot read secret file {}: {err}", path.display())),
                }
            }
        }
    }
}

/// A token as it was resolved at load, else read now from the reference stored with the
/// queued work (`env:NAME`, `file:PATH`): a reload may have dropped the setting that named it.
pub fn loaded_or_stored(loaded: Option<Secret>, stored: &str) -> Result<Secret, String> {
    match loaded {
        Some(token) => Ok(token),
        None => SecretRef::parse(stored).and_then(|reference| reference.resolve()),
    }
}

/// What a missing environment variable is called in every message (a reload looks for it,
/// to say that the environment is read only at start).
pub fn env_not_set(name: &str) -> String {
    format!("environment variable {name} is not set")
}

impl fmt::Display for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretRef::Env(name) => write!(f, "env:{name}"),
            SecretRef::File(path) => write!(f, "file:{}", path.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_header_value_is_sensitive_and_refused_for_what_a_header_cannot_carry() {
        let value = Secret::new("ghp_0123456789abcdef")
            .header_value("Bearer ")
            .unwrap();
        assert_eq!(value, "Bearer ghp_0123456789abcdef");
        assert!(value.is_sensitive());
        assert_eq!(Secret::new("glrt-x").header_value("").unwrap(), "glrt-x");
        assert!(Secret::new("ghp_abc\n").header_value("Bearer ").is_none());
    }

    #[test]
    fn a_secret_echoed_in_a_text_is_masked_there() {
        let token = Secret::new("glptt-0123456789abcdef0123456789abcdef01234567");
        let page = "Not found: /api/v4/projects/9/ref/main/trigger/pipeline?token=glptt-0123456789abcdef0123456789abcdef01234567";
        assert_eq!(
            token.scrubbed_from(page.into()),
            "Not found: /api/v4/projects/9/ref/main/trigger/pipeline?token=glptt-01…"
        );
        assert_eq!(
            Secret::new("T").scrubbed_from("Try again".into()),
            "Try again"
        );
    }

    #[test]
    fn masks_show_a_tokens_kind_and_two_characters() {
        let token = Secret::new("glptt-0123456789abcdef0123456789abcdef01234567");
        assert_eq!(token.masked(), "glptt-01…");
        assert_eq!(format!("{token}"), "glptt-01…");
        assert_eq!(format!("{token:?}"), "Secret(glptt-01…)");
        assert_eq!(
            Secret::new("glcbt-64_abcdefghijklmnopqrstuv").masked(),
            "glcbt-64…"
        );
        assert_eq!(
            Secret::new("github_pat_11ABCDEFG0123456789abcdef").masked(),
            "github_pat_11…"
        );
        // Without a known prefix, the same two characters: a quarter of a 24-character
        // secret showed before.
        assert_eq!(Secret::new("secret123secret123secret").masked(), "se…");
        assert_eq!(
            Secret::new("6d056f63e50fe6f8c5f8f4aa10edb7").masked(),
            "6d…",
            "a legacy trigger token"
        );
    }

    #[test]
    fn short_secrets_show_nothing_of_themselves() {
        assert_eq!(Secret::new("abcdefghijklmno").masked(), "…");
        assert_eq!(Secret::new("glptt-abc").masked(), "glptt-…");
        assert_eq!(Secret::new("abc").masked(), "…");
        assert_eq!(Secret::new("").masked(), "…");
    }

    #[test]
    fn references_parse_and_refuse_literals() {
        assert_eq!(
            SecretRef::parse("env:A_B1"),
            Ok(SecretRef::Env("A_B1".into()))
        );
        assert_eq!(
            SecretRef::parse("file:/run/x"),
            Ok(SecretRef::File(PathBuf::from("/run/x")))
        );
        assert!(SecretRef::parse("hunter2").unwrap_err().contains("literal"));
        assert!(SecretRef::parse("env:").is_err());
        assert!(SecretRef::parse("env:1X").is_err());
        assert!(SecretRef::parse("file:").is_err());
    }

    #[test]
    fn relative_files_are_taken_from_the_configuration_folder() {
        let folder = Path::new("/etc/hookrelay");
        assert_eq!(
            SecretRef::parse_in("file:secrets/token", folder),
            Ok(SecretRef::File(PathBuf::from(
                "/etc/hookrelay/secrets/token"
            )))
        );
        assert_eq!(
            SecretRef::parse_in("file:/run/x", folder),
            Ok(SecretRef::File(PathBuf::from("/run/x")))
        );
        assert_eq!(
            SecretRef::parse_in("env:A", folder),
            Ok(SecretRef::Env("A".into()))
        );
        let relative = SecretRef::parse_in("file:token", Path::new("rules")).unwrap();
        let SecretRef::File(path) = relative else {
            panic!("a file reference")
        };
        assert!(
            path.is_absolute() && path.ends_with("rules/token"),
            "{path:?}"
        );
    }

    #[test]
    fn missing_environment_variable_is_named_not_shown() {
        let err = SecretRef::Env("HOOKRELAY_TEST_SURELY_UNSET".into())
            .resolve()
            .unwrap_err();
        assert_eq!(
            err,
            "environment variable HOOKRELAY_TEST_SURELY_UNSET is not set"
        );
    }

    #[test]
    fn file_secrets_lose_trailing_newlines() {
        let dir = std::env::temp_dir().join(format!("hookrelay-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token");
        std::fs::write(&path, "s3cret\r\n").unwrap();
        let secret = SecretRef::File(path.clone()).resolve().unwrap();
        assert_eq!(secret.expose(), "s3cret");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
