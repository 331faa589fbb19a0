//! The fuzzing entry point for what catch-up reads from GitHub and GitLab (a hook's
//! address, a `Link` header, a page of the delivery log, read as GitHub's and as GitLab's,
//! and GitLab's hook), shared by `fuzz/` (cargo-fuzz) and a smoke test that runs on every
//! `cargo test`.
//!
//! Input layout: the first line is a hook's address, the second a `Link` header, the rest
//! a page of the log. Whatever the input, reading it must return, never panic; a page
//! linked to is followed only on the hook's own origin; every attempt read belongs to
//! exactly one event.

use super::{Attempt, HookUrl, events, gitlab, next_link};

/// Drives the parsers with arbitrary bytes and checks their invariants.
pub fn delivery_log(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.splitn(3, '\n');
    let (address, link, page) = (
        lines.next().unwrap_or_default(),
        lines.next().unwrap_or_default(),
        lines.next().unwrap_or_default(),
    );
    let hook = HookUrl::parse(address).ok();
    if let Some(hook) = &hook {
        assert!(hook.path.contains("/hooks/") || hook.is_app(), "{hook:?}");
        assert!(hook.first_page().starts_with(&hook.path));
        if let Some((path, covered)) = hook.installation() {
            assert!(
                path.ends_with("/installation") && path.starts_with('/'),
                "{path}"
            );
            assert!(!covered.is_empty() && !hook.is_app(), "{hook:?}");
        }
    }
    if let (Some(hook), Some(next)) = (&hook, next_link(link))
        && let Some(path) = hook.within(&next)
    {
        assert!(path.starts_with('/'));
        assert!(next.to_lowercase().starts_with(&hook.origin.to_lowercase()));
        assert!(next.ends_with(&path));
    }
    gitlab_log(page);
    if let Ok(state) = serde_json::from_str::<gitlab::HookState>(page) {
        let _ = state.disabled();
    }
    let _ = gitlab::resent_answer(page.as_bytes());
    let Ok(attempts) = serde_json::from_str::<Vec<Attempt>>(page) else {
        return;
    };
    let events = events(&attempts);
    assert_eq!(
        events.iter().map(|event| event.attempts).sum::<usize>(),
        attempts.len()
    );
    let mut guids: Vec<&str> = events.iter().map(|event| event.guid.as_str()).collect();
    guids.sort_unstable();
    guids.dedup();
    assert_eq!(guids.len(), events.len(), "one event per guid");
    for event in &events {
        let _ = event.may_arrive_again();
        assert!(
            attempts
                .iter()
                .any(|a| a.id == event.newest && a.guid == event.guid)
        );
    }
    for attempt in &attempts {
        let _ = attempt.at();
    }
}

/// A page read as GitLab's failed attempts: each keyed attempt is in exactly one event,
/// named by its newest attempt; the rest are counted as keyless.
fn gitlab_log(page: &str) {
    let Ok(attempts) = serde_json::from_str::<Vec<gitlab::LoggedAttempt>>(page) else {
        return;
    };
    let (events, keyless) = gitlab::events(&attempts);
    assert_eq!(
        events.iter().map(|event| event.attempts).sum::<usize>() + keyless,
        attempts.len()
    );
    for event in &events {
        let newest = attempts
            .iter()
            .filter(|a| a.key() == Some(event.guid.as_str()))
            .map(|a| a.id)
            .max();
        assert_eq!(newest, Some(event.newest));
        let _ = (
            event.may_arrive_again(),
            attempts[0].at(),
            attempts[0].code(),
        );
    }
}

#[cfg(test)]
mod tests {
    /// A deterministic pseudo-random run over mutated seeds: a smoke test, not a fuzzer.
    #[test]
    fn the_log_readers_survive_mutated_inputs() {
        let seeds: [&[u8]; 5] = [
            b"https://gitlab.example.com/api/v4/projects/a%2Fb/hooks/7\n<https://gitlab.example.com/api/v4/projects/a%2Fb/hooks/7/events?page=2>; rel=\"next\"\n[{\"id\":4,\"trigger\":\"push_hooks\",\"request_headers\":{\"Idempotency-Key\":\"k\",\"X-Gitlab-Event\":\"Push Hook\"},\"response_status\":\"internal error\",\"created_at\":\"2026-12-06T10:00:00.000Z\"},{\"id\":2,\"request_headers\":{\"idempotency-key\":\"k\"},\"response_status\":503},{\"id\":1,\"request_headers\":{},\"response_status\":\"502\"}]",
            b"https://gitlab.example.com/api/v4/groups/9/hooks/1\n\n{\"id\":1,\"alert_status\":\"temporarily_disabled\",\"disabled_until\":\"2026-12-06T12:00:00Z\",\"response_status\":200}",
            b"https://api.github.com/repos/a/b/hooks/1\n<https://api.github.com/repositories/7/hooks/1/deliveries?cursor=v1_9>; rel=\"next\"\n[{\"id\":2,\"guid\":\"g\",\"delivered_at\":\"2026-12-06T10:00:00Z\",\"status_code\":503,\"status\":\"x\",\"event\":\"push\",\"action\":null},{\"id\":1,\"guid\":\"g\",\"delivered_at\":\"2026-12-06T09:00:00Z\",\"status_code\":0}]",
            b"https://ghe.example.com:8443/api/v3/orgs/o/hooks/22\n<https://evil.example/x>; rel=next, <https://ghe.example.com:8443/y>; rel=\"prev\"\n[]",
            b"http://127.0.0.1:1/repos/a/b/hooks/9\n\n[{\"id\":18446744073709551615,\"guid\":\"\",\"delivered_at\":\"not a time\",\"status_code\":65535,\"action\":\"opened\"}]",
        ];
        let mut mutations = crate::mutations::Mutations::new(0x2545_F491_4F6C_DD1D);
        for round in 0..3000 {
            let mut input = seeds[round % seeds.len()].to_vec();
            mutations.mutate(&mut input, 0, 8, crate::mutations::Shorten::Byte);
            super::delivery_log(&input);
        }
    }
}
