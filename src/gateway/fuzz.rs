//! The fuzzing entry point for the trigger-call parser, shared by `fuzz/` (cargo-fuzz) and a
//! smoke test that runs on every `cargo test`.
//!
//! Input layout: the first byte picks the body encoding (low 3 bits) and the endpoint
//! (high bit: the webhook form); up to the first `\n` is `query#ref`; the rest is the body.
//! Whatever the input, parsing must return, never panic, and a trigger it accepts must
//! encode to a call on the right project with a valid ref.

use bytes::Bytes;

use super::{CallRequest, parse_trigger_call};

/// Drives [`parse_trigger_call`] with arbitrary bytes and checks its invariants.
pub async fn trigger_call(data: &[u8]) {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let (head, body) = match rest.iter().position(|&b| b == b'\n') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let head = String::from_utf8_lossy(head);
    let (query, git_ref) = head.split_once('#').unwrap_or((&head, "main"));
    let content_type = match selector & 0x07 {
        0 => None,
        1 => Some("application/x-www-form-urlencoded"),
        2 => Some("multipart/form-data; boundary=X"),
        3 => Some("application/json"),
        4 => Some("application/json; charset=utf-8"),
        5 => Some("text/plain"),
        6 => Some("multipart/form-data"),
        _ => Some("application/octet-stream"),
    };
    let webhook_form = selector & 0x80 != 0;
    let request = CallRequest {
        project: "group%2Fapp",
        git_ref: webhook_form.then_some(git_ref),
        query: Some(query),
        content_type,
        gitlab_event: None,
        body: Bytes::copy_from_slice(body),
    };
    if let Ok(trigger) = parse_trigger_call(request, "gitlab").await {
        let call = trigger.upstream_call();
        assert!(
            call.path_and_query
                .starts_with("/api/v4/projects/group%2Fapp/")
        );
        assert!(crate::git_ref::GitRef::parse(trigger.git_ref.as_str()).is_ok());
        if !webhook_form {
            let body: serde_json::Value =
                serde_json::from_slice(&call.body).expect("the plain form encodes JSON");
            assert!(
                body["variables"]
                    .as_object()
                    .is_none_or(|vars| vars.values().all(|v| v.is_string()))
            );
        }
    }
}

#[cfg(test)]
mod tests {
    /// A deterministic pseudo-random run over mutated seeds: a smoke test, not a fuzzer.
    #[test]
    fn parser_survives_mutated_inputs() {
        let seeds: [&[u8]; 6] = [
            b"\x01token=T&ref=main\ntoken=T&ref=main&variables[A]=1",
            b"\x03token=T\n{\"ref\":\"main\",\"variables\":{\"A\":\"1\"},\"inputs\":{\"n\":3}}",
            b"\x02token=T&ref=main\n--X\r\nContent-Disposition: form-data; name=\"variables[A]\"\r\n\r\nv\r\n--X--\r\n",
            b"\x83token=T#feature%2Fx\n{\"ref\":\"refs/heads/other\"}",
            b"\x00token=T&ref=main&a[b][c][]=1&a[][d]=2",
            b"\x81token=T#v1.0\npayload=%7B%7D",
        ];
        let mut mutations = crate::mutations::Mutations::new(0x9E37_79B9_7F4A_7C15);
        for round in 0..3000 {
            let mut input = seeds[round % seeds.len()].to_vec();
            mutations.mutate(&mut input, 0, 8, crate::mutations::Shorten::Byte);
            futures_executor::block_on(super::trigger_call(&input));
        }
    }
}
