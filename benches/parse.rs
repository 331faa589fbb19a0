//! The gateway's per-request parsing cost, for each body encoding.
//! Run: `cargo bench --bench parse`.

use std::hint::black_box;

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use hookrelay::gateway::{CallRequest, parse_trigger_call};

const PUSH: &[u8] = include_bytes!("../tests/fixtures/gitlab/push.json");

fn request<'a>(
    query: &'a str,
    content_type: Option<&'a str>,
    body: &'static [u8],
    git_ref: Option<&'a str>,
) -> CallRequest<'a> {
    CallRequest {
        project: "group%2Fapp",
        git_ref,
        query: Some(query),
        content_type,
        gitlab_event: None,
        body: Bytes::from_static(body),
    }
}

fn bench_parse(c: &mut Criterion) {
    let cases: [(&str, CallRequest<'static>); 5] = [
        ("query", request("token=glptt-abc&ref=main&variables[A]=1&variables[B]=2", None, b"", None)),
        (
            "urlencoded",
            request("", Some("application/x-www-form-urlencoded"), b"token=glptt-abc&ref=main&variables%5BA%5D=1&variables%5BB%5D=2", None),
        ),
        (
            "multipart",
            request(
                "",
                Some("multipart/form-data; boundary=XYZ"),
                b"--XYZ\r\nContent-Disposition: form-data; name=\"token\"\r\n\r\nglptt-abc\r\n--XYZ\r\nContent-Disposition: form-data; name=\"ref\"\r\n\r\nmain\r\n--XYZ\r\nContent-Disposition: form-data; name=\"variables[A]\"\r\n\r\n1\r\n--XYZ--\r\n",
                None,
            ),
        ),
        (
            "json",
            request("", Some("application/json"), br#"{"token":"glptt-abc","ref":"main","variables":{"A":"1","B":"2"},"inputs":{"n":3}}"#, None),
        ),
        ("webhook_form_gitlab_push", request("token=glptt-abc", Some("application/json"), PUSH, Some("release%2F1.2"))),
    ];
    let mut group = c.benchmark_group("parse_trigger_call");
    for (name, call) in cases {
        group.bench_function(name, |b| {
            b.iter(|| {
                let trigger = futures_executor::block_on(parse_trigger_call(
                    black_box(call.clone()),
                    "gitlab",
                ))
                .unwrap();
                black_box(trigger.upstream_call())
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_parse);
criterion_main!(benches);
