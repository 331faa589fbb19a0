//! Text as both engines store it. PostgreSQL refuses the NUL character (and with it the
//! whole write) that Rust strings and JSON carry, and SQLite's `length()` and `instr()`
//! stop at one. Text from outside (an upstream's or a proxy's answer, a payload field a
//! rule copied into a project, an id typed into the dashboard's address) goes in with
//! U+FFFD in each NUL's place and is looked up the same way: a stray NUL can neither refuse
//! a webhook nor hold a trigger whose answer could never be written.

use std::borrow::Cow;

use sha2::Digest;

use crate::store::{CancelTarget, ListFilter, NewDelivery, NewTrigger, Recorded, ReplayTarget};

/// The longest key kept as it is. PostgreSQL's B-tree takes index entries of at most
/// 2,704 bytes, and a key longer than that failed its write for good: a coalescing
/// trigger whose variables carry a long commit message, a project path of 3,000 bytes in
/// an anonymous gateway call (whose limit check then failed every call for a second).
/// Real keys (upstream, project and ref; a limit's scope and project) are far shorter.
pub const LONGEST_KEY: usize = 512;

/// `key` as stores and limits index it: unchanged up to [`LONGEST_KEY`] bytes; longer,
/// its first 256 bytes (still readable on the dashboard), `…`, and the SHA-256 of all of
/// it, so distinct keys stay distinct. A bounded key is bounded again unchanged.
pub fn bounded_key(key: String) -> String {
    if key.len() <= LONGEST_KEY {
        return key;
    }
    let mut head = 256;
    while !key.is_char_boundary(head) {
        head -= 1;
    }
    let digest = sha2::Sha256::digest(key.as_bytes());
    format!("{}…{}", &key[..head], hex::encode(digest))
}

/// What stands in for a NUL: the character for "this could not be represented".
const REPLACEMENT: &str = "\u{fffd}";

/// Whether `text` holds a NUL.
fn has_nul(text: &str) -> bool {
    text.as_bytes().contains(&0)
}

/// `value`, with U+FFFD for each NUL (borrowed when it has none, as text almost always does).
pub(super) fn text(value: &str) -> Cow<'_, str> {
    if has_nul(value) {
        Cow::Owned(value.replace('\0', REPLACEMENT))
    } else {
        Cow::Borrowed(value)
    }
}

/// Replaces the NULs in `value`, saying whether it had any.
fn mend(value: &mut String) -> bool {
    match text(value) {
        Cow::Borrowed(_) => false,
        Cow::Owned(mended) => {
            *value = mended;
            true
        }
    }
}

fn mend_option(value: &mut Option<String>) -> bool {
    value.as_mut().is_some_and(mend)
}

/// Mends every text of an outcome, saying whether any had a NUL.
fn mend_recorded(recorded: &mut Recorded) -> bool {
    match recorded {
        Recorded::Sent { pipeline_url, .. } => mend_option(pipeline_url),
        Recorded::Retry { reason, .. } | Recorded::Deferred { reason, .. } => mend(reason),
        Recorded::Failed {
            reason,
            pipeline_url,
            ..
        } => mend(reason) | mend_option(pipeline_url),
        Recorded::DryRun { would_send } => mend(would_send),
        Recorded::Released => false,
    }
}

fn mend_trigger(trigger: &mut NewTrigger) -> bool {
    let NewTrigger {
        kind: _,
        rule,
        upstream,
        project,
        git_ref,
        token_ref,
        variables,
        inputs,
        delay_ms: _,
        coalesce_ms: _,
        done,
        status_target,
        pipeline_id: _,
        queue_key,
    } = trigger;
    let texts = [
        rule, upstream, project, git_ref, token_ref, variables, inputs,
    ];
    texts.into_iter().fold(false, |any, t| mend(t) | any)
        | done.as_mut().is_some_and(mend_recorded)
        | mend_option(status_target)
        | mend_option(queue_key)
}

/// Mends every text of a delivery and its work, saying whether any had a NUL.
fn mend_delivery(delivery: &mut NewDelivery) -> bool {
    let NewDelivery {
        source,
        delivery_id,
        event_type,
        headers,
        body: _,
        summary,
        triggers,
    } = delivery;
    let texts = [source, delivery_id, event_type, summary];
    let mut any = texts.into_iter().fold(false, |any, t| mend(t) | any);
    for (name, value) in headers {
        any |= mend(name) | mend(value);
    }
    triggers
        .iter_mut()
        .fold(any, |any, t| mend_trigger(t) | any)
}

/// `value` as PostgreSQL can hold it: borrowed unless `mend` changes a copy of it.
fn mended<T: Clone>(value: &T, mend: impl FnOnce(&mut T) -> bool) -> Cow<'_, T> {
    let mut copy = value.clone();
    if mend(&mut copy) {
        Cow::Owned(copy)
    } else {
        Cow::Borrowed(value)
    }
}

/// The texts of a trigger that may hold a NUL, to look at before anything is copied. Its
/// JSON texts (variables, inputs, status target) cannot: JSON writes a NUL as `\u0000`.
fn trigger_texts(trigger: &NewTrigger) -> impl Iterator<Item = &str> {
    let NewTrigger {
        kind: _,
        rule,
        upstream,
        project,
        git_ref,
        token_ref,
        variables: _,
        inputs: _,
        delay_ms: _,
        coalesce_ms: _,
        done,
        status_target: _,
        pipeline_id: _,
        queue_key,
    } = trigger;
    [rule, upstream, project, git_ref, token_ref]
        .into_iter()
        .map(String::as_str)
        .chain(queue_key.as_deref())
        .chain(done.iter().flat_map(recorded_texts))
}

/// Every text of an outcome, to look at before anything is copied.
fn recorded_texts(recorded: &Recorded) -> impl Iterator<Item = &str> {
    match recorded {
        Recorded::Sent { pipeline_url, .. } => [None, pipeline_url.as_deref()],
        Recorded::Retry { reason, .. } | Recorded::Deferred { reason, .. } => {
            [Some(reason.as_str()), None]
        }
        Recorded::Failed {
            reason,
            pipeline_url,
            ..
        } => [Some(reason.as_str()), pipeline_url.as_deref()],
        Recorded::DryRun { would_send } => [Some(would_send.as_str()), None],
        Recorded::Released => [None, None],
    }
    .into_iter()
    .flatten()
}

/// Whether a text of `delivery` that may hold a NUL does: looked at without copying
/// anything, since a webhook is stored on the path every acknowledgement waits for. Its
/// summary is JSON, and headers cannot hold a NUL (HTTP refuses one, and so does hyper):
/// leaving them out took the writer from 83.4k to 81.4k instructions per webhook
/// (`benches/instructions.sh`; 81.3k before there was a look at all).
fn delivery_has_nul(delivery: &NewDelivery) -> bool {
    let NewDelivery {
        source,
        delivery_id,
        event_type,
        headers: _,
        body: _,
        summary: _,
        triggers,
    } = delivery;
    [source, delivery_id, event_type]
        .into_iter()
        .any(|text| has_nul(text))
        || triggers.iter().flat_map(trigger_texts).any(has_nul)
}

pub(super) fn delivery(delivery: &NewDelivery) -> Cow<'_, NewDelivery> {
    if delivery_has_nul(delivery) {
        mended(delivery, mend_delivery)
    } else {
        Cow::Borrowed(delivery)
    }
}

pub(super) fn triggers(work: &[NewTrigger]) -> Cow<'_, [NewTrigger]> {
    if work.iter().flat_map(trigger_texts).any(has_nul) {
        let mut copy = work.to_vec();
        copy.iter_mut().for_each(|t| {
            mend_trigger(t);
        });
        Cow::Owned(copy)
    } else {
        Cow::Borrowed(work)
    }
}

/// An outcome as stored: copied only when it holds a NUL (the forwarder records one per
/// send).
pub(super) fn recorded(recorded: &Recorded) -> Cow<'_, Recorded> {
    if recorded_texts(recorded).any(has_nul) {
        mended(recorded, mend_recorded)
    } else {
        Cow::Borrowed(recorded)
    }
}

pub(super) fn filter(filter: &ListFilter) -> Cow<'_, ListFilter> {
    mended(filter, |f| {
        [
            &mut f.source,
            &mut f.rule,
            &mut f.project,
            &mut f.delivery,
            &mut f.whole_delivery,
            &mut f.text,
        ]
        .into_iter()
        .fold(false, |any, t| mend_option(t) | any)
    })
}

pub(super) fn replay_target(target: &ReplayTarget) -> Cow<'_, ReplayTarget> {
    mended(target, |t| match t {
        ReplayTarget::Delivery(id) => mend(id),
        ReplayTarget::Trigger(_) => false,
    })
}

pub(super) fn cancel_target(target: &CancelTarget) -> Cow<'_, CancelTarget> {
    mended(target, |t| match t {
        CancelTarget::Trigger(_) => false,
        CancelTarget::Superseded { order_key } => mend(order_key),
        CancelTarget::Project { upstream, project } => mend_option(upstream) | mend(project),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_keys_are_bounded_distinct_and_stable() {
        let short = "gitlab\u{1f}group/app\u{1f}main".to_owned();
        assert_eq!(bounded_key(short.clone()), short);
        let long = format!("gitlab\u{1f}{}\u{1f}main", "é".repeat(2_000));
        let bounded = bounded_key(long.clone());
        assert!(bounded.len() <= LONGEST_KEY, "{}", bounded.len());
        assert!(bounded.starts_with("gitlab\u{1f}éé"));
        assert_eq!(
            bounded_key(bounded.clone()),
            bounded,
            "bounded once for good"
        );
        let other = bounded_key(format!("{long}x"));
        assert_ne!(other, bounded, "the digest tells keys with one head apart");
        let exactly = "k".repeat(LONGEST_KEY);
        assert_eq!(bounded_key(exactly.clone()), exactly);
    }

    #[test]
    fn text_without_a_nul_is_not_copied() {
        assert!(matches!(text("refs/heads/main"), Cow::Borrowed(_)));
        assert_eq!(text("a\0b\0"), "a\u{fffd}b\u{fffd}");
        let plain = crate::store::semantics::delivery("id", vec![]);
        assert!(matches!(delivery(&plain), Cow::Borrowed(_)));
    }

    #[test]
    fn every_text_of_a_delivery_and_its_work_is_mended() {
        let mut work = crate::store::semantics::trigger("p\0");
        work.done = Some(Recorded::Failed {
            status: Some(502),
            reason: "\0".into(),
            pipeline_id: None,
            pipeline_url: Some("u\0".into()),
        });
        work.queue_key = Some("k\0".into());
        let mut with_nul = crate::store::semantics::delivery("id\0", vec![work]);
        with_nul.headers = vec![("x\0".into(), "\0".into())];
        let mended = delivery(&with_nul);
        let debug = format!("{mended:?}");
        assert!(!debug.contains("\\0"), "{debug}");
        assert_eq!(mended.triggers[0].project, "p\u{fffd}");
        assert_eq!(mended.headers[0], ("x\u{fffd}".into(), "\u{fffd}".into()));
    }
}
