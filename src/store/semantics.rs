//! What every engine must do, written once against [`Engine`] and run for each engine
//! (`engine_semantics!` below instantiates them; a new engine adds one line).
//!
//! These are the outbox's promises at the storage level: duplicates are acknowledged
//! once, one trigger per key is leased at a time and keys go in order, outcomes need a
//! current lease, held heads do not hide other keys' work, counts follow every change.

use bytes::Bytes;

use super::*;

/// Runs `op` in its own committed transaction, as the writer would.
fn tx<T>(engine: &mut dyn Engine, op: impl FnOnce(&mut dyn Engine) -> T) -> T {
    engine.begin(true).unwrap();
    let out = op(engine);
    engine.commit().unwrap();
    out
}

pub(crate) fn trigger(project: &str) -> NewTrigger {
    NewTrigger {
        rule: "r".into(),
        upstream: "gitlab".into(),
        project: project.into(),
        git_ref: "main".into(),
        token_ref: "env:T".into(),
        variables: "{}".into(),
        inputs: "{}".into(),
        delay_ms: 0,
        coalesce_ms: 0,
        done: None,
        kind: Default::default(),
        status_target: None,
        pipeline_id: None,
        queue_key: None,
    }
}

pub(crate) fn delivery(id: &str, triggers: Vec<NewTrigger>) -> NewDelivery {
    NewDelivery {
        source: "gh".into(),
        delivery_id: id.into(),
        event_type: "push".into(),
        headers: vec![("x-github-event".into(), "push".into())],
        body: StoredBody::encode(Bytes::from_static(b"{}")),
        summary: "{}".into(),
        triggers,
    }
}

fn accept(engine: &mut dyn Engine, id: &str, project: &str, now: i64) -> Accepted {
    tx(engine, |e| {
        e.insert_delivery(&delivery(id, vec![trigger(project)]), now)
            .unwrap()
    })
}

/// The delivery ids the store lists under `filter` (up to 50), newest first.
fn listed(engine: &mut dyn Engine, filter: ListFilter) -> Vec<String> {
    listed_rows(engine, filter)
        .into_iter()
        .map(|r| r.delivery_id)
        .collect()
}

/// The rows the store lists under `filter` (up to 50), newest first.
fn listed_rows(engine: &mut dyn Engine, filter: ListFilter) -> Vec<DeliveryRow> {
    engine
        .list(&ListFilter {
            limit: 50,
            ..filter
        })
        .unwrap()
}

fn claim(engine: &mut dyn Engine, now: i64, limit: usize) -> Vec<DueTrigger> {
    tx(engine, |e| e.claim(now, limit).unwrap()).due
}

fn ids(due: &[DueTrigger]) -> Vec<String> {
    due.iter().map(|t| t.delivery_id.clone()).collect()
}

fn record(engine: &mut dyn Engine, lease: Lease, recorded: Recorded, now: i64) -> bool {
    tx(engine, |e| e.record(lease, &recorded, now).unwrap())
}

fn sent() -> Recorded {
    Recorded::Sent {
        status: 201,
        pipeline_id: Some(7),
        pipeline_url: None,
    }
}

/// A send GitLab answered with pipeline `id` and its page.
fn sent_to_pipeline(id: i64) -> Recorded {
    Recorded::Sent {
        status: 201,
        pipeline_id: Some(id),
        pipeline_url: Some(format!("https://gitlab.example/p/-/pipelines/{id}")),
    }
}

/// A gateway call to project `p`, recorded with what the upstream answered.
fn finished(recorded: Recorded) -> NewTrigger {
    NewTrigger {
        done: Some(recorded),
        ..trigger("p")
    }
}

fn failed() -> Recorded {
    Recorded::Failed {
        status: Some(404),
        reason: "404 Not Found".into(),
        pipeline_id: None,
        pipeline_url: None,
    }
}

pub fn duplicates_are_recorded_once(engine: &mut dyn Engine) {
    assert!(!engine.is_stored("gh", "a").unwrap());
    assert!(matches!(
        accept(engine, "a", "p", 1),
        Accepted::Queued { .. }
    ));
    assert!(engine.is_stored("gh", "a").unwrap());
    assert!(
        !engine.is_stored("gl", "a").unwrap(),
        "an id is another source's own"
    );
    assert!(matches!(
        accept(engine, "a", "p", 2),
        Accepted::Duplicate { .. }
    ));
    assert_eq!(engine.depth().unwrap().open, 1);
}

/// Each listed delivery with the trigger its trigger waits for, newest first.
fn waiting_for(engine: &mut dyn Engine) -> Vec<(String, Option<i64>)> {
    engine
        .list(&ListFilter {
            limit: 50,
            ..ListFilter::default()
        })
        .unwrap()
        .into_iter()
        .map(|r| (r.delivery_id, r.waits_for))
        .collect()
}

fn first_trigger(accepted: Accepted) -> i64 {
    match accepted {
        Accepted::Queued { trigger_ids, .. } => trigger_ids[0],
        other => panic!("not queued: {other:?}"),
    }
}

pub fn one_lease_per_key_and_keys_go_in_order(engine: &mut dyn Engine) {
    let a = first_trigger(accept(engine, "a", "p1", 1));
    accept(engine, "b", "p1", 2);
    accept(engine, "c", "p2", 3);
    let b_waits = vec![
        ("c".to_owned(), None),
        ("b".to_owned(), Some(a)),
        ("a".to_owned(), None),
    ];
    assert_eq!(
        waiting_for(engine),
        b_waits,
        "the list says what b waits for"
    );
    let first = claim(engine, 10, 10);
    assert_eq!(ids(&first), ["a", "c"], "b waits behind a");
    assert!(
        claim(engine, 10, 10).is_empty(),
        "b waits while a is leased"
    );
    assert_eq!(waiting_for(engine), b_waits, "and while a is being sent");
    assert!(record(engine, first[0].lease, sent(), 11));
    assert_eq!(
        waiting_for(engine)[1],
        ("b".to_owned(), None),
        "b heads its key"
    );
    assert_eq!(ids(&claim(engine, 12, 10)), ["b"]);
}

pub fn outcomes_need_the_current_lease(engine: &mut dyn Engine) {
    accept(engine, "a", "p", 1);
    let due = claim(engine, 1, 1);
    let lease = due[0].lease;
    assert!(record(
        engine,
        lease,
        Recorded::Retry {
            due_at: 5,
            status: Some(503),
            reason: "503".into()
        },
        2
    ));
    // The same lease again: the trigger was handed back, so nothing changes.
    assert!(!record(engine, lease, sent(), 3));
    let again = claim(engine, 5, 1);
    assert_eq!(again[0].attempts, 1, "attempts before this one");
    assert_ne!(again[0].lease, lease, "a new claim, a new token");
    assert!(!record(engine, lease, sent(), 6), "the old token is stale");
    assert!(record(engine, again[0].lease, sent(), 6));
    assert_eq!(engine.depth().unwrap().open, 0);
}

pub fn retries_and_deferrals_wait_until_due(engine: &mut dyn Engine) {
    accept(engine, "a", "p", 0);
    let due = claim(engine, 0, 1);
    record(
        engine,
        due[0].lease,
        Recorded::Deferred {
            due_at: 1000,
            reason: "over the limit".into(),
        },
        1,
    );
    let claimed = tx(engine, |e| e.claim(999, 1).unwrap());
    assert!(claimed.due.is_empty());
    assert_eq!(
        claimed.next_due,
        Some(1000),
        "the claim says when to look again"
    );
    let again = claim(engine, 1000, 1);
    assert_eq!(again[0].attempts, 0, "a deferral is not an attempt");
    assert_ne!(
        again[0].lease, due[0].lease,
        "each claim gets its own token"
    );
    assert!(!record(engine, due[0].lease, sent(), 1001));
}

/// A clock an hour fast set a retry, a trigger queued behind it and another key's
/// trigger, and was then set right: each deadline moves back the hour and keeps the
/// time it had left; the time noted comes down with it, and is never lowered otherwise.
pub fn deadlines_move_back_with_a_clock_set_back(engine: &mut dyn Engine) {
    let hour = 3_600_000;
    let fast = 10 * hour;
    let right = fast - hour;
    assert_eq!(tx(engine, |e| e.clock_noted().unwrap()), None);
    tx(engine, |e| e.note_clock(fast).unwrap());
    accept(engine, "retried", "p", fast);
    accept(engine, "behind", "p", fast);
    let due = claim(engine, fast, 1);
    record(
        engine,
        due[0].lease,
        Recorded::Retry {
            due_at: fast + 5_000,
            status: Some(500),
            reason: "500 Internal Server Error".into(),
        },
        fast,
    );
    tx(engine, |e| {
        e.insert_delivery(
            &delivery(
                "later",
                vec![NewTrigger {
                    delay_ms: 1_000,
                    ..trigger("q")
                }],
            ),
            fast,
        )
        .unwrap()
    });
    tx(engine, |e| e.note_clock(fast + 100).unwrap());
    assert_eq!(tx(engine, |e| e.clock_noted().unwrap()), Some(fast + 100));

    tx(engine, |e| {
        e.move_deadlines_back(hour + 100, right).unwrap()
    });
    assert_eq!(tx(engine, |e| e.clock_noted().unwrap()), Some(right));
    let claimed = tx(engine, |e| e.claim(right + 899, 10).unwrap());
    assert!(claimed.due.is_empty(), "nothing is due before its time");
    assert_eq!(claimed.next_due, Some(right + 900));
    assert_eq!(ids(&claim(engine, right + 900, 10)), ["later"]);
    assert!(claim(engine, right + 4_899, 10).is_empty());
    let retried = claim(engine, right + 4_900, 10);
    assert_eq!(ids(&retried), ["retried"]);
    assert!(record(engine, retried[0].lease, sent(), right + 4_901));
    assert_eq!(ids(&claim(engine, right + 4_902, 10)), ["behind"]);

    tx(engine, |e| e.note_clock(right - 50_000).unwrap());
    assert_eq!(
        tx(engine, |e| e.clock_noted().unwrap()),
        Some(right),
        "noting never lowers the time noted"
    );
}

pub fn a_held_head_hides_no_other_key(engine: &mut dyn Engine) {
    // 200 triggers behind one held head; one trigger on another key, due later.
    tx(engine, |e| {
        for i in 0..200 {
            e.insert_delivery(&delivery(&format!("held-{i}"), vec![trigger("held")]), 0)
                .unwrap();
        }
    });
    let head = claim(engine, 0, 1);
    record(
        engine,
        head[0].lease,
        Recorded::Deferred {
            due_at: 10_000,
            reason: "paused".into(),
        },
        1,
    );
    accept(engine, "other", "other", 5);
    assert_eq!(ids(&claim(engine, 6, 8)), ["other"]);
    let depth = engine.depth().unwrap();
    assert_eq!(depth.open, 201);
    assert_eq!(depth.earliest_due, Some(10_000));
}

/// An outage's hold moves every due key of that upstream past the pause in one go: other
/// upstreams' keys, keys being sent and keys due after the pause stay as they are, and no
/// attempt is counted.
pub fn a_down_upstreams_keys_wait_for_its_pause(engine: &mut dyn Engine) {
    let on = |upstream: &str, project: &str| NewTrigger {
        upstream: upstream.into(),
        ..trigger(project)
    };
    tx(engine, |e| {
        for (id, upstream, project) in [
            ("a", "gitlab", "p1"),
            ("b", "gitlab", "p2"),
            ("sending", "gitlab", "p3"),
            ("later", "gitlab", "p4"),
            ("elsewhere", "other", "p5"),
        ] {
            e.insert_delivery(&delivery(id, vec![on(upstream, project)]), 0)
                .unwrap();
        }
    });
    let mut claimed = claim(engine, 0, 5);
    claimed.sort_by(|x, y| x.delivery_id.cmp(&y.delivery_id));
    assert_eq!(ids(&claimed), ["a", "b", "elsewhere", "later", "sending"]);
    for due in &claimed {
        let recorded = match due.delivery_id.as_str() {
            "sending" => continue,
            "later" => Recorded::Deferred {
                due_at: 50_000,
                reason: "over the limit".into(),
            },
            _ => Recorded::Deferred {
                due_at: 10,
                reason: "over the limit".into(),
            },
        };
        assert!(record(engine, due.lease, recorded, 5));
    }
    let hold = UpstreamHold {
        upstream: "gitlab".into(),
        until: 10_000,
        spread_ms: 1_000,
        reason: "upstream gitlab is down; waiting for it".into(),
    };
    let first = tx(engine, |e| e.hold_upstream(&hold, 1, 20).unwrap());
    assert_eq!(first, 1, "a step moves no more keys than it is asked to");
    let rest = tx(engine, |e| e.hold_upstream(&hold, 10, 20).unwrap());
    assert_eq!(
        rest, 1,
        "a and b in all; not the one being sent, nor the later one"
    );
    assert_eq!(tx(engine, |e| e.hold_upstream(&hold, 10, 20).unwrap()), 0);
    assert_eq!(
        ids(&claim(engine, 9_999, 5)),
        ["elsewhere"],
        "only the other upstream's key is due during the pause"
    );
    let mut after = claim(engine, 11_000, 5);
    after.sort_by(|x, y| x.delivery_id.cmp(&y.delivery_id));
    assert_eq!(
        ids(&after),
        ["a", "b"],
        "due within the spread after the pause"
    );
    assert!(
        after.iter().all(|due| due.attempts == 0),
        "no attempt counted"
    );
    let rows = engine
        .list(&ListFilter {
            limit: 50,
            ..Default::default()
        })
        .unwrap();
    let row = |id: &str| rows.iter().find(|r| r.delivery_id == id).unwrap();
    assert_eq!(row("a").last_error.as_deref(), Some(hold.reason.as_str()));
    assert_eq!(row("later").due_at, Some(50_000));
    let sending = claimed.iter().find(|d| d.delivery_id == "sending").unwrap();
    assert!(
        record(engine, sending.lease, sent(), 11_001),
        "a send in flight keeps its lease"
    );
}

/// A one-process engine gives a dead process's leases back at the next start; a shared one
/// cannot know the holder is dead, and lets the lease expire instead. Either way the
/// triggers are claimed again, with no operator action.
pub fn leases_of_a_dead_process_are_due_again(engine: &mut dyn Engine) {
    accept(engine, "a", "p1", 0);
    accept(engine, "b", "p2", 0);
    assert_eq!(claim(engine, 0, 5).len(), 2);
    let later = match engine.recover_leases().unwrap() {
        2 => 0,
        0 => 10 * 60 * 1000,
        other => panic!("{other} leases recovered"),
    };
    assert_eq!(claim(engine, later, 5).len(), 2);
}

pub fn pruning_keeps_what_is_still_to_be_sent(engine: &mut dyn Engine) {
    accept(engine, "old-done", "p1", 0);
    accept(engine, "old-pending", "p2", 0);
    accept(engine, "new", "p3", 500);
    let due = claim(engine, 0, 1);
    assert_eq!(ids(&due), ["old-done"]);
    record(engine, due[0].lease, failed(), 1);
    assert_eq!(tx(engine, |e| e.prune(100, 10, None).unwrap().deleted), 1);
    let left = listed(engine, ListFilter::default());
    assert_eq!(left, ["new", "old-pending"]);
}

/// Pruning takes a delivery's triggers with it, and nothing is added to a pruned delivery
/// afterwards (a replay, a status post): no trigger is ever left without its delivery.
pub fn pruned_deliveries_leave_no_triggers_behind(engine: &mut dyn Engine) {
    let accepted = accept(engine, "old", "p", 0);
    let Accepted::Queued { delivery_row, .. } = accepted else {
        panic!("not queued: {accepted:?}");
    };
    let first = first_trigger(accepted);
    let due = claim(engine, 0, 1);
    record(engine, due[0].lease, failed(), 1);
    assert_eq!(tx(engine, |e| e.prune(100, 10, None).unwrap().deleted), 1);
    let origin = engine.pipeline_origin(&OriginOf::Trigger(first)).unwrap();
    assert!(origin.is_none(), "the trigger went with its delivery");
    let replay = tx(engine, |e| e.replay(&ReplayTarget::Trigger(first), 2)).unwrap_err();
    assert!(replay.refused, "{replay}");
    let added = tx(engine, |e| e.queue_work(delivery_row, &[trigger("p")], 3)).unwrap_err();
    assert!(added.refused, "{added}");
    assert!(added.message.contains("no longer in the store"), "{added}");
    assert_eq!(engine.depth().unwrap().open, 0);
    assert!(claim(engine, 10, 5).is_empty());
}

/// Deliveries still to be sent in front of the old ones cost every step of a pass no more
/// than its batch: each step goes on where the last one stopped.
pub fn pruning_steps_past_what_is_still_to_be_sent(engine: &mut dyn Engine) {
    for id in ["a1", "a2", "a3"] {
        accept(engine, id, "held", 0);
    }
    accept(engine, "b1", "q1", 0);
    accept(engine, "b2", "q2", 0);
    let due = claim(engine, 0, 5);
    assert_eq!(ids(&due), ["a1", "b1", "b2"]);
    for trigger in &due[1..] {
        record(engine, trigger.lease, failed(), 1);
    }
    let mut steps = Vec::new();
    let mut after = None;
    loop {
        let step = tx(engine, |e| e.prune(100, 2, after).unwrap());
        steps.push(step.deleted);
        match step.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    assert_eq!(
        steps,
        [0, 1, 1],
        "two deliveries a step, the held ones kept"
    );
    let left = listed(engine, ListFilter::default());
    assert_eq!(left, ["a3", "a2", "a1"]);
}

pub fn replays_are_new_triggers_linked_to_the_original(engine: &mut dyn Engine) {
    accept(engine, "a", "p", 0);
    let err = tx(engine, |e| e.replay(&ReplayTarget::Delivery("a".into()), 1)).unwrap_err();
    assert!(err.message.contains("still queued"), "{err}");
    let due = claim(engine, 0, 1);
    record(engine, due[0].lease, failed(), 1);
    let new = tx(engine, |e| e.replay(&ReplayTarget::Delivery("a".into()), 2)).unwrap();
    assert_eq!(new.len(), 1);
    let claimed = claim(engine, 2, 5);
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].id, new[0]);
    let unknown = tx(engine, |e| e.replay(&ReplayTarget::Trigger(99_999), 3)).unwrap_err();
    assert!(unknown.refused, "an unknown id is a refusal, not a failure");
    assert!(
        unknown
            .message
            .contains("trigger 99999 is not in the store")
    );
}

/// A delivery id is found whatever source it came from and however many sources the store
/// holds: the stored webhook is the newest with that id, and a replay takes the triggers of
/// every delivery with it.
pub fn deliveries_are_found_by_their_id_in_every_source(engine: &mut dyn Engine) {
    for (source, id, project) in [
        ("bitbucket", "other", "p0"),
        ("gh", "shared", "p1"),
        ("gitlab", "shared", "p2"),
        ("zz-last", "mine", "p3"),
    ] {
        let mut d = delivery(id, vec![trigger(project)]);
        d.source = source.into();
        d.body = StoredBody::encode(Bytes::from(format!("{{\"from\":\"{source}\"}}")));
        tx(engine, |e| e.insert_delivery(&d, 0).unwrap());
    }
    let stored = engine.stored_webhook("shared").unwrap().unwrap();
    assert_eq!(stored.source, "gitlab", "the newest with that id");
    assert_eq!(&stored.body[..], br#"{"from":"gitlab"}"#);
    let last = engine.stored_webhook("mine").unwrap().unwrap();
    assert_eq!(
        last.source, "zz-last",
        "the last source in order is looked in too"
    );
    assert!(engine.stored_webhook("absent").unwrap().is_none());
    // By its source too: each source's own, the older one included.
    for (source, id, from) in [
        ("gh", "shared", Some("gh")),
        ("gitlab", "shared", Some("gitlab")),
        ("gh", "mine", None),
    ] {
        let stored = engine.stored_webhook_from(source, id).unwrap();
        assert_eq!(
            stored.as_ref().map(|s| s.source.as_str()),
            from,
            "{source} {id}"
        );
        if let Some(stored) = stored {
            assert_eq!(
                stored.body,
                format!("{{\"from\":\"{source}\"}}").into_bytes()
            );
        }
    }
    for due in claim(engine, 0, 10) {
        record(engine, due.lease, failed(), 1);
    }
    let replayed = tx(engine, |e| {
        e.replay(&ReplayTarget::Delivery("shared".into()), 2)
            .unwrap()
    });
    assert_eq!(replayed.len(), 2, "both sources' triggers: {replayed:?}");
    let claimed = claim(engine, 2, 10);
    let projects: Vec<&str> = claimed.iter().map(|t| t.project.as_str()).collect();
    assert_eq!(projects.len(), 2);
    assert!(projects.contains(&"p1") && projects.contains(&"p2"));
    // By its source: that source's original triggers alone, not the replays, not the
    // other source's.
    for due in claimed {
        record(engine, due.lease, failed(), 3);
    }
    let from_gh = tx(engine, |e| {
        super::replay_from(e, "gh", "shared", 4).unwrap()
    });
    assert_eq!(from_gh.len(), 1, "{from_gh:?}");
    let claimed = claim(engine, 4, 10);
    assert_eq!(
        claimed
            .iter()
            .map(|t| t.project.as_str())
            .collect::<Vec<_>>(),
        ["p1"]
    );
    let absent = tx(engine, |e| super::replay_from(e, "gh", "mine", 5)).unwrap_err();
    assert!(
        absent.refused
            && absent
                .message
                .contains("no delivery \"mine\" from source gh in the store"),
        "{absent}"
    );
    let mut nothing = delivery("quiet", Vec::new());
    nothing.source = "gh".into();
    tx(engine, |e| e.insert_delivery(&nothing, 5).unwrap());
    let quiet = tx(engine, |e| super::replay_from(e, "gh", "quiet", 6)).unwrap_err();
    assert!(
        quiet.refused && quiet.message.contains("queued no trigger to replay"),
        "{quiet}"
    );
    // By the id alone too: a webhook that queued nothing is not said to be missing.
    let quiet = tx(engine, |e| {
        e.replay(&ReplayTarget::Delivery("quiet".into()), 6)
    })
    .unwrap_err();
    assert!(
        quiet.refused
            && quiet
                .message
                .starts_with("delivery quiet queued no trigger to replay"),
        "{quiet}"
    );
    let absent = tx(engine, |e| {
        e.replay(&ReplayTarget::Delivery("absent".into()), 6)
    })
    .unwrap_err();
    assert!(
        absent.refused && absent.message == "delivery absent is not in the store",
        "{absent}"
    );
}

/// Identical triggers within the window become one; the trigger they went into knows
/// their status targets (each push's commit), oldest first, for its pipeline's statuses.
pub fn identical_triggers_coalesce_within_the_window(engine: &mut dyn Engine) {
    let windowed = |commit: Option<&str>| NewTrigger {
        coalesce_ms: 1000,
        status_target: commit.map(str::to_owned),
        ..trigger("p")
    };
    let first = tx(engine, |e| {
        e.insert_delivery(&delivery("a", vec![windowed(Some("commit a"))]), 0)
            .unwrap()
    });
    let second = tx(engine, |e| {
        e.insert_delivery(&delivery("b", vec![windowed(Some("commit b"))]), 10)
            .unwrap()
    });
    tx(engine, |e| {
        e.insert_delivery(&delivery("c", vec![windowed(None)]), 20)
            .unwrap();
        e.insert_delivery(&delivery("d", vec![windowed(Some("commit d"))]), 30)
            .unwrap()
    });
    let (Accepted::Queued { trigger_ids, .. }, Accepted::Queued { coalesced, .. }) =
        (&first, &second)
    else {
        panic!("both queued");
    };
    assert_eq!(coalesced, &[Some(trigger_ids[0])]);
    assert!(first.adds_work() && !second.adds_work());
    assert_eq!(engine.depth().unwrap().open, 1);
    let origin = engine
        .pipeline_origin(&OriginOf::Trigger(trigger_ids[0]))
        .unwrap()
        .expect("the first trigger");
    assert_eq!(origin.status_target.as_deref(), Some("commit a"));
    assert_eq!(origin.merged_targets, ["commit b", "commit d"]);
    let merged = first_trigger(second.clone());
    let origin = engine
        .pipeline_origin(&OriginOf::Trigger(merged))
        .unwrap()
        .expect("a coalesced trigger");
    assert!(origin.merged_targets.is_empty(), "nothing went into it");
    assert!(claim(engine, 999, 5).is_empty(), "held for its window");
    assert_eq!(claim(engine, 1000, 5).len(), 1);
}

/// A gateway call is recorded finished: nothing queued, and its row says what the upstream
/// answered (state, status, error, pipeline) as an outcome written after a send would.
pub fn finished_gateway_calls_are_not_queued(engine: &mut dyn Engine) {
    let sent = sent_to_pipeline(7);
    let dry_run = Recorded::DryRun {
        would_send: "POST /api/v4/projects/p/trigger/pipeline".into(),
    };
    tx(engine, |e| {
        e.insert_delivery(&delivery("gateway-1", vec![finished(sent)]), 0)
            .unwrap();
        e.insert_delivery(&delivery("gateway-2", vec![finished(failed())]), 1)
            .unwrap();
        e.insert_delivery(&delivery("gateway-3", vec![finished(dry_run)]), 2)
            .unwrap()
    });
    assert_eq!(engine.depth().unwrap(), Depth::default());
    assert!(claim(engine, 0, 5).is_empty());
    let rows = engine
        .list(&super::ListFilter {
            limit: 5,
            ..Default::default()
        })
        .unwrap();
    let ends: Vec<_> = rows
        .iter()
        .map(|row| {
            (
                row.delivery_id.as_str(),
                row.state.as_deref(),
                row.last_status,
                row.last_error.as_deref(),
                row.pipeline_url.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        ends,
        [
            (
                "gateway-3",
                Some("dry-run"),
                None,
                Some("POST /api/v4/projects/p/trigger/pipeline"),
                None
            ),
            (
                "gateway-2",
                Some("failed"),
                Some(404),
                Some("404 Not Found"),
                None
            ),
            (
                "gateway-1",
                Some("sent"),
                Some(201),
                None,
                Some("https://gitlab.example/p/-/pipelines/7")
            ),
        ]
    );
    // Its pipeline leads back to it, for the pipeline's events.
    let origin = engine
        .pipeline_origin(&super::OriginOf::Pipeline {
            upstream: "gitlab".into(),
            pipeline_id: 7,
        })
        .unwrap()
        .expect("the pipeline's trigger");
    assert_eq!(origin.trigger_id, rows[2].trigger_id.unwrap());
}

/// Gateway calls recorded together with webhooks (each engine batches both): finished
/// rows as one by one, nothing of theirs queued, their pipeline leading back to them;
/// the webhooks beside them queued.
pub fn gateway_calls_recorded_together_are_finished(engine: &mut dyn Engine) {
    let sent = sent_to_pipeline(9);
    let group = [
        delivery("gateway-1", vec![finished(sent)]),
        delivery("gateway-2", vec![finished(failed())]),
        delivery("webhook-1", vec![trigger("p")]),
        delivery("webhook-2", vec![trigger("q")]),
    ];
    let group: Vec<&NewDelivery> = group.iter().collect();
    let answers = tx(engine, |e| e.insert_deliveries(&group, 5, true))
        .expect("every engine records these together")
        .unwrap();
    assert_eq!(answers.len(), 4);
    for answer in &answers {
        assert!(
            matches!(answer, Accepted::Queued { trigger_ids, .. } if trigger_ids.len() == 1),
            "{answer:?}"
        );
    }
    assert_eq!(
        engine.depth().unwrap().open,
        2,
        "the webhooks' triggers only"
    );
    assert_eq!(
        ids(&claim(engine, 5, 5)),
        ["webhook-1", "webhook-2"],
        "gateway calls are never claimed"
    );
    let rows = engine
        .list(&super::ListFilter {
            limit: 5,
            ..Default::default()
        })
        .unwrap();
    let call = |id: &str| {
        let row = rows.iter().find(|r| r.delivery_id == id).expect("listed");
        (
            row.state.clone(),
            row.last_status,
            row.last_error.clone(),
            row.pipeline_url.clone(),
        )
    };
    assert_eq!(
        call("gateway-1"),
        (
            Some("sent".into()),
            Some(201),
            None,
            Some("https://gitlab.example/p/-/pipelines/9".into())
        )
    );
    assert_eq!(
        call("gateway-2"),
        (
            Some("failed".into()),
            Some(404),
            Some("404 Not Found".into()),
            None
        )
    );
    let origin = engine
        .pipeline_origin(&super::OriginOf::Pipeline {
            upstream: "gitlab".into(),
            pipeline_id: 9,
        })
        .unwrap()
        .expect("the pipeline's trigger");
    let Accepted::Queued { trigger_ids, .. } = &answers[0] else {
        unreachable!("checked above")
    };
    assert_eq!(origin.trigger_id, trigger_ids[0]);
}

/// A cancelled head lets its key's next trigger go; a cancelled trigger behind a head
/// being sent leaves that send alone; a trigger being sent cannot be cancelled.
pub fn cancelled_triggers_are_never_sent_and_their_key_moves_on(engine: &mut dyn Engine) {
    let first = accept(engine, "first", "p", 0);
    accept(engine, "second", "p", 0);
    accept(engine, "other", "q", 0);
    let Accepted::Queued { trigger_ids, .. } = first else {
        panic!("queued")
    };
    let cancelled = tx(engine, |e| {
        e.cancel(&CancelTarget::Trigger(trigger_ids[0]), 0).unwrap()
    });
    assert_eq!(cancelled, trigger_ids);
    assert_eq!(engine.depth().unwrap().open, 2);
    let claimed = claim(engine, 0, 5);
    let mut due = ids(&claimed);
    due.sort();
    assert_eq!(
        due,
        ["other", "second"],
        "the key moved on to its next trigger"
    );
    // "second" is being sent: it cannot be cancelled, and a project-wide cancel skips it.
    let sending = claimed
        .iter()
        .find(|t| t.delivery_id == "second")
        .expect("claimed")
        .lease;
    accept(engine, "third", "p", 0);
    engine.begin(true).unwrap();
    let refused = engine
        .cancel(&CancelTarget::Trigger(sending.trigger), 0)
        .unwrap_err();
    engine.rollback();
    assert!(
        refused.refused && refused.message.contains("being sent"),
        "{}",
        refused.message
    );
    let cancelled = tx(engine, |e| {
        e.cancel(
            &CancelTarget::Project {
                project: "p".into(),
                upstream: Some("gitlab".into()),
            },
            0,
        )
        .unwrap()
    });
    assert_eq!(cancelled.len(), 1, "only \"third\" was waiting");
    assert!(
        record(engine, sending, sent(), 1),
        "the send in flight records its answer"
    );
    assert!(
        claim(engine, 2, 5).is_empty(),
        "nothing of p is left to send"
    );
    let rows = engine
        .list(&ListFilter {
            state: Some(StateFilter::Cancelled),
            limit: 10,
            ..Default::default()
        })
        .unwrap();
    let mut shown: Vec<&str> = rows.iter().map(|r| r.delivery_id.as_str()).collect();
    shown.sort_unstable();
    assert_eq!(shown, ["first", "third"]);
    assert!(
        rows.iter()
            .all(|r| r.last_error.as_deref() == Some(CANCELLED_NOTE))
    );
    let refused = tx(engine, |e| {
        e.cancel(&CancelTarget::Trigger(trigger_ids[0]), 3)
            .unwrap_err()
    });
    assert!(
        refused.message.contains("is cancelled, not waiting"),
        "{}",
        refused.message
    );
}

/// Deliveries are listed by source, kind, rule, project, status, time and id prefix.
pub fn deliveries_are_listed_by_every_filter(engine: &mut dyn Engine) {
    accept(engine, "abc-1", "p", 1_000);
    let second = first_trigger(accept(engine, "abc-2", "q", 2_000));
    tx(engine, |e| {
        e.insert_delivery(&delivery("abd-none", Vec::new()), 3_000)
            .unwrap()
    });
    // In id order: what matters here is which deliveries a filter keeps.
    let kept = |engine: &mut dyn Engine, filter: ListFilter| -> Vec<String> {
        let mut ids = listed(engine, filter);
        ids.sort();
        ids
    };
    assert_eq!(kept(engine, ListFilter::default()).len(), 3);
    // One trigger, by its id (as `merged into` and `replay of` name it).
    let by_trigger = |engine: &mut dyn Engine, trigger: i64| {
        listed_rows(
            engine,
            ListFilter {
                trigger: Some(trigger),
                ..Default::default()
            },
        )
        .into_iter()
        .map(|row| (row.delivery_id, row.trigger_id))
        .collect::<Vec<_>>()
    };
    assert_eq!(
        by_trigger(engine, second),
        [("abc-2".to_owned(), Some(second))]
    );
    assert!(by_trigger(engine, second + 1000).is_empty());
    // Free text: in the id, or a trigger's project.
    assert_eq!(
        kept(
            engine,
            ListFilter {
                text: Some("c-2".into()),
                ..Default::default()
            }
        ),
        ["abc-2"]
    );
    assert_eq!(
        kept(
            engine,
            ListFilter {
                text: Some("q".into()),
                ..Default::default()
            }
        ),
        ["abc-2"]
    );
    // A page cursor: strictly older than the delivery given.
    let newest = engine
        .list(&ListFilter {
            limit: 1,
            ..Default::default()
        })
        .unwrap()
        .remove(0);
    assert_eq!(newest.delivery_id, "abd-none");
    assert_eq!(
        kept(
            engine,
            ListFilter {
                before: Some((newest.received_at, newest.row)),
                ..Default::default()
            }
        ),
        ["abc-1", "abc-2"]
    );
    assert_eq!(
        kept(
            engine,
            ListFilter {
                delivery: Some("abc".into()),
                ..Default::default()
            }
        ),
        ["abc-1", "abc-2"]
    );
    assert_eq!(
        kept(
            engine,
            ListFilter {
                delivery: Some("ab_".into()),
                ..Default::default()
            }
        ),
        Vec::<String>::new(),
        "wildcards are literal"
    );
    assert_eq!(
        kept(
            engine,
            ListFilter {
                delivery: Some("ABC".into()),
                ..Default::default()
            }
        ),
        Vec::<String>::new(),
        "ids are compared exactly, case included, in every engine"
    );
    // A whole id finds its own delivery, not those whose ids start with it.
    for (whole, found) in [("abc-1", vec!["abc-1"]), ("abc", vec![]), ("ABC-1", vec![])] {
        assert_eq!(
            kept(
                engine,
                ListFilter {
                    source: Some("gh".into()),
                    whole_delivery: Some(whole.into()),
                    ..Default::default()
                }
            ),
            found,
            "{whole}"
        );
    }
    assert_eq!(
        kept(
            engine,
            ListFilter {
                project: Some("q".into()),
                ..Default::default()
            }
        ),
        ["abc-2"]
    );
    assert_eq!(
        kept(
            engine,
            ListFilter {
                rule: Some("r".into()),
                ..Default::default()
            }
        ),
        ["abc-1", "abc-2"]
    );
    assert_eq!(
        kept(
            engine,
            ListFilter {
                state: Some(StateFilter::None),
                ..Default::default()
            }
        ),
        ["abd-none"]
    );
    assert_eq!(
        kept(
            engine,
            ListFilter {
                state: Some(StateFilter::Queued),
                ..Default::default()
            }
        ),
        ["abc-1", "abc-2"]
    );
    assert_eq!(
        kept(
            engine,
            ListFilter {
                since: Some(1_500),
                until: Some(2_500),
                ..Default::default()
            }
        ),
        ["abc-2"]
    );
    assert_eq!(
        kept(
            engine,
            ListFilter {
                kind: Some(DeliveryKind::Gateway),
                ..Default::default()
            }
        ),
        Vec::<String>::new()
    );
    assert_eq!(
        kept(
            engine,
            ListFilter {
                kind: Some(DeliveryKind::Webhook),
                source: Some("gh".into()),
                ..Default::default()
            }
        )
        .len(),
        3
    );
    let row = engine
        .list(&ListFilter {
            delivery: Some("abc-1".into()),
            limit: 1,
            ..Default::default()
        })
        .unwrap()
        .remove(0);
    assert_eq!(row.due_at, Some(1_000));
    assert_eq!(row.summary, "{}");
}

/// A trigger whose pipeline reports to a forge: its first status is queued with the
/// recorded answer; pipeline events of that pipeline (and only it) queue the next, a newer
/// state supersedes an unsent older one, and a late state never follows a finished one.
pub fn statuses_follow_the_pipeline_and_never_go_back(engine: &mut dyn Engine) {
    use crate::status::{Applied, PipelineEvent, PipelineUpdate, StatusTarget};
    let target = StatusTarget {
        source: "gh".into(),
        forge: crate::status::Forge::Github,
        api_url: "https://api.github.com".into(),
        token_ref: "env:STATUS".into(),
        repository: "octo/app".into(),
        sha: "a".repeat(40),
        context: "gitlab/p".into(),
        fallback_url: "https://gitlab.example.com/p".into(),
        poll_after_ms: 10_000,
    };
    let with_target = NewTrigger {
        status_target: Some(serde_json::to_string(&target).unwrap()),
        ..trigger("p")
    };
    tx(engine, |e| {
        e.insert_delivery(&delivery("push-1", vec![with_target]), 0)
            .unwrap()
    });
    let due = claim(engine, 0, 5);
    assert_eq!(due.len(), 1);
    tx(engine, |e| {
        assert!(e.record(due[0].lease, &sent(), 10).unwrap());
        crate::status::after_trigger(e, due[0].id, &sent(), 10).unwrap();
    });
    // The pending post and the first poll (due after FIRST_POLL).
    let posts = claim(engine, 20, 5);
    assert_eq!(posts.len(), 1, "the poll waits");
    assert_eq!(posts[0].kind, WorkKind::Status);
    assert_eq!(posts[0].pipeline_id, Some(7));
    assert_eq!(posts[0].variables["state"], "pending");
    assert_eq!(posts[0].token_ref, "env:STATUS");
    let polls = claim(engine, 10_010, 5);
    assert_eq!(polls.len(), 1);
    assert_eq!(polls[0].kind, WorkKind::Poll);
    let update =
        |id: i64, status: &str, finished_at: Option<&str>, delivery_id: &str| PipelineUpdate {
            upstream: "gitlab".into(),
            event: PipelineEvent {
                pipeline_id: id,
                status: status.into(),
                url: Some(format!("https://gitlab.example.com/p/-/pipelines/{id}")),
                finished_at: finished_at.map(str::to_owned),
                project_id: None,
                project_path: Some("p".into()),
            },
            delivery: Some(delivery(delivery_id, Vec::new())),
        };
    let apply = |engine: &mut dyn Engine, update: PipelineUpdate, now: i64| {
        tx(engine, |e| {
            crate::status::apply_pipeline(e, &update, now).unwrap()
        })
    };
    // Another pipeline of the project: not hookrelay's.
    assert!(matches!(
        apply(engine, update(8, "running", None, "hook-0"), 30),
        Applied::NotOurs(_)
    ));
    // Running, then success before running was sent: running is superseded.
    assert!(matches!(
        apply(engine, update(7, "running", None, "hook-1"), 30),
        Applied::Queued { superseded: 0, .. }
    ));
    assert!(matches!(
        apply(engine, update(7, "success", Some("t1"), "hook-2"), 40),
        Applied::Queued { superseded: 1, .. }
    ));
    // A late "running" changes nothing; a repeated delivery id is a duplicate.
    assert!(matches!(
        apply(engine, update(7, "running", None, "hook-3"), 50),
        Applied::Skipped(_)
    ));
    assert_eq!(
        apply(engine, update(7, "success", Some("t1"), "hook-2"), 60),
        Applied::Duplicate
    );
    // The pending post is still leased; once it is sent, the success post is the head.
    tx(engine, |e| {
        assert!(e.record(posts[0].lease, &sent(), 70).unwrap())
    });
    let next = claim(engine, 80, 5);
    let states: Vec<&str> = next
        .iter()
        .filter(|d| d.kind == WorkKind::Status)
        .map(|d| d.variables["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["success"]);
    let listed = engine
        .list(&super::ListFilter {
            state: Some(super::StateFilter::Superseded),
            limit: 10,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].kind.as_deref(), Some("status"));
    assert_eq!(listed[0].delivery_id, "hook-1");
    // A trigger GitLab refused for good gets an error status (no pipeline, no poll).
    let other_context = StatusTarget {
        context: "gitlab/q".into(),
        ..target
    };
    let refused = NewTrigger {
        status_target: Some(serde_json::to_string(&other_context).unwrap()),
        ..trigger("q")
    };
    tx(engine, |e| {
        e.insert_delivery(&delivery("push-2", vec![refused]), 100)
            .unwrap()
    });
    let due = claim(engine, 100, 5);
    let trigger_due: Vec<&DueTrigger> =
        due.iter().filter(|d| d.kind == WorkKind::Trigger).collect();
    assert_eq!(trigger_due.len(), 1);
    tx(engine, |e| {
        assert!(e.record(trigger_due[0].lease, &failed(), 110).unwrap());
        crate::status::after_trigger(e, trigger_due[0].id, &failed(), 110).unwrap();
    });
    let error: Vec<DueTrigger> = claim(engine, 120, 5)
        .into_iter()
        .filter(|d| d.kind == WorkKind::Status)
        .collect();
    assert_eq!(error.len(), 1);
    assert_eq!(error[0].variables["state"], "refused");
    assert!(
        error[0].variables["description"]
            .as_str()
            .unwrap()
            .contains("404 Not Found")
    );
}

/// A NUL in text that came from outside (an upstream's or a proxy's answer, a payload
/// field a rule copied) is written, not refused: a result that cannot be written is
/// retried from memory for good, holding its key. U+FFFD is stored in its place (text in
/// PostgreSQL cannot hold a NUL), and the id is found again by what the sender sent.
pub fn text_from_outside_with_a_nul_byte_is_stored(engine: &mut dyn Engine) {
    let mut with_nul = delivery("a\0b", vec![trigger("group/p\0q")]);
    with_nul.event_type = "push\0".into();
    with_nul.summary = r#"{"message":"ok\u0000"}"#.into();
    with_nul.headers = vec![("x-odd".into(), "a\0b".into())];
    tx(engine, |e| e.insert_delivery(&with_nul, 1).unwrap());
    let due = claim(engine, 1, 5);
    assert_eq!(due.len(), 1);
    let answer = Recorded::Failed {
        status: Some(502),
        reason: "502 from the proxy: \u{1f}\0\u{8b}binary".into(),
        pipeline_id: None,
        pipeline_url: Some("https://gitlab.example/\0".into()),
    };
    assert!(record(engine, due[0].lease, answer, 2));
    let rows = listed_rows(engine, ListFilter::default());
    assert_eq!(rows.len(), 1);
    let row = &rows[0];
    assert_eq!(row.delivery_id, "a\u{fffd}b");
    assert_eq!(row.event_type, "push\u{fffd}");
    assert_eq!(row.project.as_deref(), Some("group/p\u{fffd}q"));
    assert_eq!(
        row.last_error.as_deref(),
        Some("502 from the proxy: \u{1f}\u{fffd}\u{8b}binary")
    );
    assert_eq!(
        row.pipeline_url.as_deref(),
        Some("https://gitlab.example/\u{fffd}")
    );
    assert_eq!(row.summary, r#"{"message":"ok\u0000"}"#);
    assert!(engine.is_stored("gh", "a\0b").unwrap());
    assert!(engine.stored_webhook("a\0b").unwrap().is_some());
    let again = tx(engine, |e| e.insert_delivery(&with_nul, 3).unwrap());
    assert!(matches!(again, Accepted::Duplicate { .. }), "{again:?}");
    let found = listed_rows(
        engine,
        ListFilter {
            delivery: Some("a\0b".into()),
            ..ListFilter::default()
        },
    );
    assert_eq!(found.len(), 1);
}

/// A trigger whose key is longer than an index entry may be (PostgreSQL's B-tree takes
/// 2,704 bytes): a coalescing one with a long commit message among its variables, a
/// project of thousands of bytes. Its keys are bounded (see `bounded_key`), so it is
/// stored, and an identical one still coalesces into it.
pub fn long_keys_are_stored_and_identical_triggers_still_coalesce(engine: &mut dyn Engine) {
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let message: String = (0..6_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b'a' + (x % 26) as u8)
        })
        .collect();
    let long = || NewTrigger {
        project: format!("group/{}", &message[..3_000]),
        variables: serde_json::json!({ "MESSAGE": message }).to_string(),
        coalesce_ms: 60_000,
        ..trigger("p")
    };
    tx(engine, |e| {
        e.insert_delivery(&delivery("long-1", vec![long()]), 1)
            .unwrap()
    });
    let second = tx(engine, |e| {
        e.insert_delivery(&delivery("long-2", vec![long()]), 2)
            .unwrap()
    });
    assert!(
        matches!(&second, Accepted::Queued { coalesced, .. } if coalesced[0].is_some()),
        "{second:?}"
    );
    let due = claim(engine, 60_001, 5);
    assert_eq!(due.len(), 1);
    assert_eq!(
        due[0].project.len(),
        "group/".len() + 3_000,
        "the project as given"
    );
}

/// Instantiates every semantic test for one engine: `engine_semantics!(make)` where
/// `make()` returns a fresh, empty engine (and whatever keeps it alive), or `None` where
/// that engine cannot run here (the test is then skipped, saying why).
#[macro_export]
#[doc(hidden)]
macro_rules! engine_semantics {
    ($make:expr) => {
        $crate::engine_semantics!(@tests $make;
            duplicates_are_recorded_once,
            one_lease_per_key_and_keys_go_in_order,
            outcomes_need_the_current_lease,
            retries_and_deferrals_wait_until_due,
            deadlines_move_back_with_a_clock_set_back,
            a_held_head_hides_no_other_key,
            a_down_upstreams_keys_wait_for_its_pause,
            leases_of_a_dead_process_are_due_again,
            pruning_keeps_what_is_still_to_be_sent,
            pruning_steps_past_what_is_still_to_be_sent,
            pruned_deliveries_leave_no_triggers_behind,
            replays_are_new_triggers_linked_to_the_original,
            deliveries_are_found_by_their_id_in_every_source,
            identical_triggers_coalesce_within_the_window,
            finished_gateway_calls_are_not_queued,
            gateway_calls_recorded_together_are_finished,
            cancelled_triggers_are_never_sent_and_their_key_moves_on,
            deliveries_are_listed_by_every_filter,
            statuses_follow_the_pipeline_and_never_go_back,
            text_from_outside_with_a_nul_byte_is_stored,
            long_keys_are_stored_and_identical_triggers_still_coalesce,
        );
    };
    (@tests $make:expr; $($name:ident,)*) => {
        $(
            #[test]
            fn $name() {
                let Some((_keep, mut engine)) = $make() else {
                    return;
                };
                $crate::store::semantics::$name(&mut engine);
            }
        )*
    };
}

mod sqlite {
    fn make() -> Option<(tempfile::TempDir, crate::store::sqlite::SqliteEngine)> {
        let dir = tempfile::tempdir().unwrap();
        let engine = crate::store::sqlite::SqliteEngine::open(
            &dir.path().join("s.sqlite3"),
            crate::store::sqlite::Durability::Full,
        )
        .unwrap();
        Some((dir, engine))
    }

    crate::engine_semantics!(make);
}
