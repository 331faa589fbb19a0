//! The fuzzing entry point for configuration files, shared by `fuzz/` (the `config_file`
//! target) and a smoke test that runs on every `cargo test`.
//!
//! The input is one configuration file's text (invalid UTF-8 replaced). Whatever it holds,
//! loading it must return, never panic: either a configuration, or problems that each
//! name the file and, where they name a line, a line the text has. A configuration that
//! loads then plans real webhooks (the senders' published payloads) on every source it
//! names, with and without a webhook URL's `?ref=`, and explains every rule's verdict:
//! templates and `when` expressions run on real events, within their bounds.

use std::sync::OnceLock;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};

use super::{Config, Problems};
use crate::event::{Event, Provider};
use crate::git_ref::GitRef;
use crate::sources::{Outcome, Verification, WebhookRequest, receive};

/// Loads `data` as the configuration file `fuzz.toml` and checks the invariants.
pub fn config_file(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    // Paths the configuration names (`ca_file`, `tls_cert`) are read when it loads; a
    // device could block the fuzzer for good (`/dev/stdin`), and names nothing a
    // configuration means.
    if ["/dev", "/proc", "/sys"]
        .iter()
        .any(|dir| text.contains(dir))
    {
        return;
    }
    match load(&text) {
        Ok(config) => plan_real_webhooks(&config),
        Err(Problems(problems)) => {
            assert!(!problems.is_empty(), "a refusal names its problems");
            let lines = text.lines().count().max(1);
            for problem in problems {
                assert!(!problem.message.is_empty(), "{problem:?}");
                if let Some(line) = problem.line {
                    assert!(
                        (1..=lines + 1).contains(&line),
                        "line {line} of a text of {lines} lines: {problem:?}"
                    );
                }
            }
        }
    }
}

/// The configuration `text` makes, as `hookrelay check` would load it from one file; every
/// environment variable is set (to a value that names it), but those of the relay's own.
fn load(text: &str) -> Result<Config, Problems> {
    let env = |name: &str| {
        (!name.starts_with("HOOKRELAY_")).then(|| format!("fuzz-{name}-0123456789abcdef"))
    };
    super::load_texts(
        [("fuzz.toml".into(), Ok(text.to_owned()))],
        &env,
        true,
        super::ListenFlags::default(),
    )
}

/// Plans each real webhook's events as if they came from each configured source.
fn plan_real_webhooks(config: &Config) {
    let url_ref = GitRef::parse("release/1.2").expect("a valid ref");
    for event in real_events() {
        for name in config.sources.keys() {
            let event = Event {
                source: name.clone(),
                ..event.clone()
            };
            for planned in config
                .rules
                .plan(&event, None)
                .into_iter()
                .chain(config.rules.plan(&event, Some(&url_ref)))
            {
                if let Ok(trigger) = planned.trigger {
                    assert!(!trigger.git_ref.as_str().is_empty());
                    assert!(config.upstreams.contains_key(&trigger.upstream));
                }
            }
            for (rule, reason) in config.rules.verdicts(&event) {
                assert!(!rule.name().is_empty());
                assert!(reason.is_none_or(|reason| !reason.is_empty()));
            }
        }
    }
}

/// The events of the senders' published payloads (`tests/fixtures/`), read once.
fn real_events() -> &'static [Event] {
    static EVENTS: OnceLock<Vec<Event>> = OnceLock::new();
    EVENTS.get_or_init(|| {
        let payloads: [(Provider, &str, &str, &'static [u8]); 4] = [
            (
                Provider::Github,
                "x-github-event",
                "push",
                include_bytes!("../../tests/fixtures/github/push_tag.json"),
            ),
            (
                Provider::Github,
                "x-github-event",
                "push",
                include_bytes!("../../tests/fixtures/github/push_branch.json"),
            ),
            (
                Provider::Gitlab,
                "x-gitlab-event",
                "Push Hook",
                include_bytes!("../../tests/fixtures/gitlab/push.json"),
            ),
            (
                Provider::BitbucketCloud,
                "x-event-key",
                "repo:push",
                include_bytes!("../../tests/fixtures/bitbucket_cloud/repo_push_branch.json"),
            ),
        ];
        let mut events = Vec::new();
        for (provider, header, name, body) in payloads {
            let mut headers = HeaderMap::new();
            headers.insert(header, HeaderValue::from_static(name));
            headers.insert("content-type", HeaderValue::from_static("application/json"));
            let body = Bytes::from_static(body);
            let request = WebhookRequest {
                headers: &headers,
                body: &body,
            };
            let source = crate::sources::fuzz::source(provider);
            match receive(&source, &request, Verification::Skip)
                .expect("a published payload is read")
                .outcome
            {
                Outcome::Events(found) => events.extend(found),
                other => panic!("a published push is a change: {other:?}"),
            }
        }
        events
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shipped examples as one configuration (as `--config rules/examples` reads
    /// them), each alone, and mutations of them: a smoke test, not a fuzzer.
    fn seeds() -> Vec<Vec<u8>> {
        let mut files: Vec<_> =
            std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/rules/examples"))
                .expect("the examples are shipped")
                .map(|entry| entry.expect("listed").path())
                .filter(|path| path.extension().is_some_and(|ext| ext == "toml"))
                .collect();
        files.sort();
        let mut seeds: Vec<Vec<u8>> = files
            .iter()
            .map(|path| std::fs::read(path).expect("readable"))
            .collect();
        seeds.insert(0, seeds.join(&b"\n"[..]));
        seeds
    }

    #[test]
    fn configurations_survive_mutation() {
        let seeds = seeds();
        assert!(seeds.len() >= 6, "{} seeds", seeds.len());
        let whole = load(&String::from_utf8_lossy(&seeds[0]))
            .unwrap_or_else(|problems| panic!("the examples load together: {problems:?}"));
        assert!(
            whole.rules.len() >= 4 && whole.sources.len() >= 5,
            "{} rules, {} sources",
            whole.rules.len(),
            whole.sources.len()
        );
        for seed in &seeds {
            config_file(seed);
        }
        let mut mutations = crate::mutations::Mutations::new(0x9E37_79B9_7F4A_7C15);
        for round in 0..600 {
            let mut input = seeds[round % seeds.len()].clone();
            mutations.mutate(&mut input, 0, 4, crate::mutations::Shorten::Rest);
            config_file(&input);
        }
    }

    /// A rule that matches plans a trigger from a real tag push: the smoke test
    /// reaches the planning half.
    #[test]
    fn a_configuration_that_loads_plans_the_real_webhooks() {
        let text = r#"
[upstream.gitlab]
url = "https://gitlab.example.com"

[source.gh]
provider = "github"
secret = "env:S"

[[rule]]
name = "tags"
source = "gh"
events = ["tag"]

[[rule.trigger]]
project = "acme/{{ event.repository | replace('/', '-') }}"
ref = "main"
token = "env:T"
variables = { TAG = "{{ event.ref_name }}" }
"#;
        let config = load(text).unwrap_or_else(|problems| panic!("{problems:?}"));
        let tag = real_events()
            .iter()
            .find(|event| event.git_ref.starts_with("refs/tags/"))
            .expect("a tag push among the fixtures");
        let tag = Event {
            source: "gh".into(),
            ..tag.clone()
        };
        let planned = config.rules.plan(&tag, None);
        assert_eq!(planned.len(), 1, "{planned:?}");
        let trigger = planned[0].trigger.as_ref().expect("planned");
        assert_eq!(trigger.variables["TAG"], tag.ref_name);
        config_file(text.as_bytes());
    }
}
