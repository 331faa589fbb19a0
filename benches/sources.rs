//! Verify + parse cost per webhook, for each sender, on its published payloads signed as the
//! sender signs them. Run: `cargo bench --bench sources`.

use std::hint::black_box;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use hookrelay::event::Provider;
use hookrelay::secret::Secret;
use hookrelay::sources::signature::{Algorithm, hmac_hex};
use hookrelay::sources::{GenericConfig, SourceConfig, Verification, WebhookRequest, receive};
use http::{HeaderMap, HeaderValue};

const SECRET: &str = "It's a Secret to Everybody";

fn source(provider: Provider) -> SourceConfig {
    SourceConfig {
        url_refs: None,
        allow_from: Vec::new(),
        allow_github_hooks: false,
        status: None,
        compare: None,
        pipelines_of: None,
        catch_up: None,
        name: provider.to_string(),
        provider,
        secrets: vec![Secret::new(SECRET)],
        signing_keys: Vec::new(),
        allow_sha1: false,
        timestamp_tolerance: Duration::from_secs(300),
        allow_unsigned: false,
        limit: None,
        generic: GenericConfig::default(),
    }
}

/// One benchmark: a sender's payload, its event header, and the header its proof goes in.
struct Case {
    name: &'static str,
    provider: Provider,
    body: &'static [u8],
    event: (&'static str, &'static str),
    signature_header: &'static str,
}

const fn case(
    name: &'static str,
    provider: Provider,
    body: &'static [u8],
    event: (&'static str, &'static str),
    signature_header: &'static str,
) -> Case {
    Case {
        name,
        provider,
        body,
        event,
        signature_header,
    }
}

fn bench_sources(c: &mut Criterion) {
    let cases = [
        case(
            "github_push",
            Provider::Github,
            include_bytes!("../tests/fixtures/github/push_branch.json"),
            ("x-github-event", "push"),
            "x-hub-signature-256",
        ),
        case(
            "gitlab_push",
            Provider::Gitlab,
            include_bytes!("../tests/fixtures/gitlab/push.json"),
            ("x-gitlab-event", "Push Hook"),
            "x-gitlab-token",
        ),
        case(
            "gitea_push",
            Provider::Gitea,
            include_bytes!("../tests/fixtures/gitea/push.json"),
            ("x-gitea-event", "push"),
            "x-gitea-signature",
        ),
        case(
            "gogs_push",
            Provider::Gogs,
            include_bytes!("../tests/fixtures/gogs/push.json"),
            ("x-gogs-event", "push"),
            "x-gogs-signature",
        ),
        case(
            "bitbucket_cloud_push",
            Provider::BitbucketCloud,
            include_bytes!("../tests/fixtures/bitbucket_cloud/repo_push_branch.json"),
            ("x-event-key", "repo:push"),
            "x-hub-signature",
        ),
        case(
            "bitbucket_server_refs_changed",
            Provider::BitbucketServer,
            include_bytes!("../tests/fixtures/bitbucket_server/refs_changed_branch.json"),
            ("x-event-key", "repo:refs_changed"),
            "x-hub-signature",
        ),
    ];
    let mut group = c.benchmark_group("verify_and_parse");
    for Case {
        name,
        provider,
        body,
        event,
        signature_header,
    } in cases
    {
        let source = source(provider);
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        headers.insert(event.0, HeaderValue::from_static(event.1));
        let hex = hmac_hex(Algorithm::Sha256, SECRET.as_bytes(), body);
        let signature = match signature_header {
            "x-gitlab-token" => SECRET.to_owned(),
            "x-gitea-signature" | "x-gogs-signature" => hex,
            _ => format!("sha256={hex}"),
        };
        headers.insert(signature_header, HeaderValue::from_str(&signature).unwrap());
        let body = Bytes::from_static(body);
        let request = WebhookRequest {
            headers: &headers,
            body: &body,
        };
        // The case must really verify and produce events, or the benchmark measures an error.
        let received = receive(
            &source,
            &request,
            Verification::Check {
                now: SystemTime::now(),
            },
        )
        .expect(name);
        assert!(
            matches!(received.outcome, hookrelay::sources::Outcome::Events(_)),
            "{name}"
        );
        group.bench_function(format!("{name} ({} bytes)", body.len()), |b| {
            b.iter(|| {
                receive(
                    black_box(&source),
                    black_box(&request),
                    Verification::Check {
                        now: SystemTime::now(),
                    },
                )
                .unwrap()
            })
        });
    }
    group.finish();
}

/// What storing a webhook's body costs on the receiving thread (LZ4, before the commit).
fn bench_store_body(c: &mut Criterion) {
    let body = Bytes::from_static(include_bytes!("../tests/fixtures/github/push_tag.json"));
    c.bench_function(
        &format!("store_body github_push_tag ({} bytes)", body.len()),
        |b| b.iter(|| hookrelay::store::StoredBody::encode(black_box(body.clone()))),
    );
}

criterion_group!(benches, bench_sources, bench_store_body);
criterion_main!(benches);
