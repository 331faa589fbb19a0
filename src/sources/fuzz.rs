//! The fuzzing entry point for the senders' parsers, shared by `fuzz/` (one cargo-fuzz
//! target per sender) and a smoke test that runs on every `cargo test`.
//!
//! Input layout: the first byte picks the event type from the sender's list (low 4 bits),
//! a form body (bit 4) and signature checking (bit 5, with a made-up signature, so the
//! verifier's refusal paths run); the rest is the body. Whatever the input, `receive`
//! must return, never panic, and every event it returns must be well formed.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};

use super::{
    GenericConfig, GenericScheme, Outcome, SourceConfig, Verification, WebhookRequest, receive,
};
use crate::event::{EventKind, Provider};
use crate::secret::Secret;
use crate::sources::signature::{Algorithm, Encoding, SigningKey};

/// (event header, event names worth trying) per sender.
fn events(provider: Provider) -> (&'static str, &'static [&'static str]) {
    match provider {
        Provider::Github => (
            "x-github-event",
            &["push", "ping", "create", "delete", "issues"],
        ),
        Provider::Gitlab => (
            "x-gitlab-event",
            &["Push Hook", "Tag Push Hook", "System Hook", "Note Hook"],
        ),
        Provider::Gitea | Provider::Forgejo => {
            ("x-gitea-event", &["push", "create", "delete", "release"])
        }
        Provider::Gogs => ("x-gogs-event", &["push", "create", "delete", "fork"]),
        Provider::BitbucketCloud => ("x-event-key", &["repo:push", "pullrequest:created"]),
        Provider::BitbucketServer => (
            "x-event-key",
            &["repo:refs_changed", "diagnostics:ping", "pr:opened"],
        ),
        Provider::Generic => ("x-event", &["push"]),
    }
}

/// A source of `provider` as a fuzzer needs it.
pub fn source(provider: Provider) -> SourceConfig {
    SourceConfig {
        url_refs: None,
        allow_from: Vec::new(),
        allow_github_hooks: false,
        status: None,
        compare: None,
        pipelines_of: None,
        catch_up: None,
        name: format!("fuzz-{provider}"),
        provider,
        secrets: vec![Secret::new("fuzz-secret")],
        signing_keys: vec![
            SigningKey::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").expect("valid key"),
        ],
        allow_sha1: true,
        timestamp_tolerance: Duration::from_secs(300),
        allow_unsigned: false,
        limit: None,
        generic: GenericConfig {
            scheme: GenericScheme::Hmac {
                header: "x-signature".into(),
                algorithm: Algorithm::Sha256,
                encoding: Encoding::Hex,
                prefix: "sha256=".into(),
            },
            ..GenericConfig::default()
        },
    }
}

/// Drives [`receive`] with arbitrary bytes for one sender and checks its invariants.
pub fn webhook(provider: Provider, data: &[u8]) {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let source = source(provider);
    let (event_header, names) = events(provider);
    let mut headers = HeaderMap::new();
    headers.insert(
        event_header,
        HeaderValue::from_static(names[usize::from(selector & 0x0f) % names.len()]),
    );
    headers.insert(
        "content-type",
        HeaderValue::from_static(if selector & 0x10 != 0 {
            "application/x-www-form-urlencoded"
        } else {
            "application/json"
        }),
    );
    let verification = if selector & 0x20 != 0 {
        for name in [
            "x-hub-signature-256",
            "x-gitea-signature",
            "x-gogs-signature",
            "x-hub-signature",
            "x-signature",
        ] {
            headers.insert(name, HeaderValue::from_static("sha256=00"));
        }
        headers.insert("x-gitlab-token", HeaderValue::from_static("fuzz-secret"));
        Verification::Check {
            now: SystemTime::now(),
        }
    } else {
        Verification::Skip
    };
    let body = Bytes::copy_from_slice(body);
    let request = WebhookRequest {
        headers: &headers,
        body: &body,
    };
    if let Ok(received) = receive(&source, &request, verification) {
        assert!(!received.delivery.is_empty());
        if let Outcome::Events(events) = received.outcome {
            assert!(!events.is_empty());
            for event in events {
                assert!(
                    event.git_ref.starts_with("refs/heads/")
                        || event.git_ref.starts_with("refs/tags/")
                );
                assert!(!event.ref_name.is_empty());
                assert_eq!(
                    event.kind == EventKind::Delete,
                    event.deleted_kind.is_some()
                );
                assert!(event.kind != EventKind::Ping);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Mutated real payloads for every sender: a smoke test, not a fuzzer.
    #[test]
    fn parsers_survive_mutated_payloads() {
        let seeds: [(Provider, &[u8]); 7] = [
            (
                Provider::Github,
                include_bytes!("../../tests/fixtures/github/push_tag.json"),
            ),
            (
                Provider::Gitlab,
                include_bytes!("../../tests/fixtures/gitlab/push.json"),
            ),
            (
                Provider::Gitea,
                include_bytes!("../../tests/fixtures/gitea/push.json"),
            ),
            (
                Provider::Gogs,
                include_bytes!("../../tests/fixtures/gogs/create_tag.json"),
            ),
            (
                Provider::BitbucketCloud,
                include_bytes!("../../tests/fixtures/bitbucket_cloud/repo_push_branch.json"),
            ),
            (
                Provider::BitbucketServer,
                include_bytes!("../../tests/fixtures/bitbucket_server/refs_changed_branch.json"),
            ),
            (
                Provider::Generic,
                include_bytes!("../../tests/fixtures/github/push_branch.json"),
            ),
        ];
        let mut mutations = crate::mutations::Mutations::new(0x2545_F491_4F6C_DD1D);
        for round in 0..1400 {
            let (provider, seed) = seeds[round % seeds.len()];
            let mut input = vec![(mutations.next() & 0x3f) as u8];
            input.extend_from_slice(seed);
            // The first byte picks the request's shape; the edits keep it.
            mutations.mutate(&mut input, 1, 6, crate::mutations::Shorten::Rest);
            webhook(provider, &input);
        }
    }
}
