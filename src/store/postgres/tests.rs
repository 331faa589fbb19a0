/// A database of the test's own and an engine on it whose claims hold their keys for a
/// second of the times the test gives it; `None` where no PostgreSQL can run.
fn leasing_engine() -> Option<(super::test_server::Database, super::PostgresEngine)> {
    let database = super::test_server::Database::create()?;
    let engine = super::PostgresEngine::open(&super::PostgresConfig::new(&database.url))
        .unwrap()
        .with_lease(std::time::Duration::from_millis(1000))
        .with_callers_clock();
    Some((database, engine))
}

/// A relay back from losing the store (or holding outcomes it could not write) claims
/// due keys but leaves those whose lease ran out, until it lets its claims take over.
#[test]
fn claims_take_over_run_out_leases_only_when_let() {
    use crate::store::Engine;
    let Some((_database, mut engine)) = leasing_engine() else {
        return;
    };
    assert_eq!(engine.lease(), Some(std::time::Duration::from_millis(1000)));
    engine.begin(true).unwrap();
    for (id, project) in [("a", "p"), ("b", "q")] {
        let delivery =
            crate::store::semantics::delivery(id, vec![crate::store::semantics::trigger(project)]);
        engine.insert_delivery(&delivery, 0).unwrap();
    }
    engine.commit().unwrap();
    engine.begin(true).unwrap();
    let first = engine.claim(0, 1).unwrap().due.remove(0);
    engine.commit().unwrap();

    engine.let_claims_take_over(false);
    engine.begin(true).unwrap();
    let due = engine.claim(5000, 8).unwrap().due;
    engine.commit().unwrap();
    assert_eq!(due.len(), 1, "the other key, due");
    assert_ne!(due[0].id, first.id);

    engine.let_claims_take_over(true);
    engine.begin(true).unwrap();
    let taken = engine.claim(5000, 8).unwrap().due;
    engine.commit().unwrap();
    assert_eq!(taken.len(), 1, "the run-out lease, taken over");
    assert_eq!(taken[0].id, first.id);
}

/// A relay that dies or freezes holding a key: after the lease another claim takes the
/// trigger over, and the first holder's late outcome changes nothing.
#[test]
fn an_expired_lease_is_taken_over_and_the_old_holder_is_fenced_out() {
    use crate::store::{Engine, Recorded};
    let Some((_database, mut engine)) = leasing_engine() else {
        return;
    };
    let tx = |engine: &mut super::PostgresEngine| engine.begin(true).unwrap();
    tx(&mut engine);
    engine
        .insert_delivery(
            &crate::store::semantics::delivery("a", vec![crate::store::semantics::trigger("p")]),
            0,
        )
        .unwrap();
    engine.commit().unwrap();
    tx(&mut engine);
    let first = engine.claim(0, 8).unwrap().due.remove(0);
    engine.commit().unwrap();
    tx(&mut engine);
    assert!(engine.claim(999, 8).unwrap().due.is_empty(), "still leased");
    let second = engine.claim(1001, 8).unwrap().due.remove(0);
    engine.commit().unwrap();
    assert_eq!(second.id, first.id);
    assert_ne!(second.lease, first.lease);
    let sent = Recorded::Sent {
        status: 201,
        pipeline_id: None,
        pipeline_url: None,
    };
    tx(&mut engine);
    assert!(
        !engine.record(first.lease, &sent, 1002).unwrap(),
        "fenced out"
    );
    assert!(engine.record(second.lease, &sent, 1003).unwrap());
    engine.commit().unwrap();
    assert_eq!(engine.depth().unwrap().open, 0);
}

/// An engine on a throwaway database (dropped with the first), on the caller's clock.
fn on_new_database() -> Option<(super::test_server::Database, super::PostgresEngine)> {
    let database = super::test_server::Database::create()?;
    let engine = super::PostgresEngine::open(&super::PostgresConfig::new(&database.url))
        .unwrap()
        .with_callers_clock();
    Some((database, engine))
}

/// The trigger ids the answers queued, in order.
fn queued_ids(answers: &[crate::store::Accepted]) -> Vec<i64> {
    answers
        .iter()
        .flat_map(|answer| match answer {
            crate::store::Accepted::Queued { trigger_ids, .. } => trigger_ids.clone(),
            crate::store::Accepted::Duplicate { .. } => panic!("new"),
        })
        .collect()
}

/// Every key row as (key, head, floor), in key order.
fn key_rows(engine: &mut super::PostgresEngine) -> Vec<(String, i64, i64)> {
    engine
        .client()
        .query(
            "SELECT order_key, head, floor FROM hr_keys ORDER BY order_key COLLATE \"C\"",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

/// Bodies arrive compressed (LZ4): PostgreSQL neither compresses them again nor moves
/// a webhook-sized row's body to the TOAST table.
#[test]
fn bodies_are_not_compressed_again_and_small_rows_stay_whole() {
    use crate::store::semantics::delivery;
    use crate::store::{Engine, StoredBody};
    let Some((_database, mut engine)) = on_new_database() else {
        return;
    };
    // Bytes LZ4 cannot shrink, as a compressed body looks to PostgreSQL: 3 KB (a
    // typical webhook's) and 40 KB.
    let noise = |len: usize| -> bytes::Bytes {
        let mut rng = fastrand::Rng::with_seed(7);
        (0..len).map(|_| rng.u8(..)).collect::<Vec<u8>>().into()
    };
    let mut small = delivery("small", vec![]);
    small.body = StoredBody::encode(noise(3_000));
    let mut large = delivery("large", vec![]);
    large.body = StoredBody::encode(noise(40_000));
    engine.begin(true).unwrap();
    let refs = [&small, &large];
    engine.insert_deliveries(&refs, 0, true).unwrap().unwrap();
    engine.commit().unwrap();
    let rows = engine
        .client()
        .query(
            "SELECT delivery_id, pg_column_compression(body), pg_column_size(body) FROM hr_deliveries
             ORDER BY delivery_id",
            &[],
        )
        .unwrap();
    let seen: Vec<(String, Option<String>, i32)> = rows
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect();
    assert_eq!(
        seen,
        [
            ("large".to_owned(), None, 40_000),
            ("small".to_owned(), None, 3_000 + 4)
        ]
    );
    // Only the large body went out of line (in the TOAST table, as one value).
    let toast_table: String = engine
        .client()
        .query_one(
            "SELECT reltoastrelid::regclass::text FROM pg_class WHERE relname = 'hr_deliveries'",
            &[],
        )
        .unwrap()
        .get(0);
    let chunks: i64 = engine
        .client()
        .query_one(
            &format!("SELECT count(DISTINCT chunk_id) FROM {toast_table}"),
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(chunks, 1, "one body out of line");
    // And both come back byte for byte.
    for (id, sent) in [("small", &small), ("large", &large)] {
        let stored = engine.stored_webhook(id).unwrap().unwrap();
        assert_eq!(stored.body, sent.body.bytes, "{id}");
    }
}

/// A group's webhooks in a few statements: the same answers, ids and order as one
/// by one, duplicates (earlier, and within the batch) included.
#[test]
fn webhooks_recorded_together_answer_as_one_by_one() {
    use crate::store::semantics::{delivery, trigger};
    use crate::store::{Accepted, Engine};
    let Some((_database, mut engine)) = on_new_database() else {
        return;
    };
    engine.begin(true).unwrap();
    engine
        .insert_delivery(&delivery("old", vec![trigger("p")]), 0)
        .unwrap();
    engine.commit().unwrap();
    let batch = [
        delivery("a", vec![trigger("p"), trigger("q")]),
        delivery("old", vec![trigger("p")]),
        delivery("b", vec![]),
        delivery("a", vec![trigger("p")]),
        delivery("c", vec![trigger("p")]),
    ];
    let refs: Vec<&crate::store::NewDelivery> = batch.iter().collect();
    engine.begin(true).unwrap();
    let answers = engine.insert_deliveries(&refs, 1, true).unwrap().unwrap();
    engine.commit().unwrap();
    let Accepted::Queued { trigger_ids: a, .. } = &answers[0] else {
        panic!("{answers:?}")
    };
    assert_eq!(a.len(), 2);
    assert!(
        matches!(answers[1], Accepted::Duplicate { .. }),
        "{answers:?}"
    );
    assert!(matches!(&answers[2], Accepted::Queued { trigger_ids, .. } if trigger_ids.is_empty()));
    assert!(
        matches!(answers[3], Accepted::Duplicate { .. }),
        "{answers:?}"
    );
    let Accepted::Queued { trigger_ids: c, .. } = &answers[4] else {
        panic!("{answers:?}")
    };
    assert!(a[0] < a[1] && a[1] < c[0]);
    assert_eq!(engine.depth().unwrap().open, 4);
    // Key p: old, then a, then c — in the order accepted.
    let mut sent = Vec::new();
    for _ in 0..4 {
        engine.begin(false).unwrap();
        let due = engine.claim(10, 8).unwrap().due;
        engine.commit().unwrap();
        engine.begin(false).unwrap();
        for trigger in &due {
            sent.push((trigger.project.clone(), trigger.delivery_id.clone()));
            engine
                .record(
                    trigger.lease,
                    &crate::store::Recorded::Sent {
                        status: 201,
                        pipeline_id: None,
                        pipeline_url: None,
                    },
                    11,
                )
                .unwrap();
        }
        engine.commit().unwrap();
    }
    let p: Vec<&str> = sent
        .iter()
        .filter(|(p, _)| p == "p")
        .map(|(_, d)| d.as_str())
        .collect();
    assert_eq!(p, ["old", "a", "c"]);
    assert_eq!(sent.len(), 4);
}

/// `sslmode=require` with the server's CA in `ca_file`: the session is encrypted; the
/// same without the CA is refused, naming the problem.
#[test]
fn tls_to_the_database_with_rustls() {
    let Some(server) = super::test_server::Server::own() else {
        return;
    };
    let issued = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    server.enable_tls(&issued.cert.pem(), &issued.key_pair.serialize_pem());
    let database = server.database();
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("db-ca.pem");
    std::fs::write(&ca, issued.cert.pem()).unwrap();
    let url = database
        .url
        .replace("127.0.0.1", "localhost")
        .replace("postgres@", "postgres:unused-password@")
        + "?sslmode=require";
    let mut config = super::PostgresConfig::new(&url);
    config.ca_file = Some(ca);
    let mut client = config.connect().unwrap();
    let encrypted: bool = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(encrypted);
    drop(client);
    config.ca_file = None;
    let refused = config.connect().err().unwrap();
    assert!(
        refused
            .message
            .contains("not signed by an authority this relay trusts")
            && refused.message.contains("set ca_file"),
        "{refused}"
    );
    assert!(!refused.message.contains("unused-password"), "{refused}");
    assert!(
        refused.message.contains("postgres:…@localhost"),
        "{refused}"
    );
}

#[test]
fn a_database_that_does_not_wait_for_the_disk_is_refused() {
    let Some(database) = super::test_server::Database::create() else {
        return;
    };
    let name = database.url.rsplit('/').next().unwrap().to_owned();
    let mut admin = postgres::Client::connect(&database.url, postgres::NoTls).unwrap();
    admin
        .batch_execute(&format!(
            "ALTER DATABASE {name} SET synchronous_commit = off"
        ))
        .unwrap();
    let refused = super::PostgresEngine::open(&super::PostgresConfig::new(&database.url))
        .err()
        .unwrap();
    assert!(refused.refused, "{refused}");
    assert!(
        refused.message.contains("synchronous_commit is \"off\""),
        "{refused}"
    );
}

mod semantics {
    fn make() -> Option<(
        super::super::test_server::Database,
        super::super::PostgresEngine,
    )> {
        let database = super::super::test_server::Database::create()?;
        let engine =
            super::super::PostgresEngine::open(&super::super::PostgresConfig::new(&database.url))
                .unwrap()
                .with_callers_clock();
        Some((database, engine))
    }

    crate::engine_semantics!(make);
}

/// A group of webhooks for several keys settles them all in one statement: a new key is
/// headed by its oldest new trigger (which is also its floor), and a key that already
/// had a trigger keeps its head and floor.
#[test]
fn a_group_of_webhooks_settles_every_key_it_touched_at_once() {
    use crate::store::Engine;
    use crate::store::semantics::{delivery, trigger};
    let Some((_database, mut engine)) = on_new_database() else {
        return;
    };
    engine.begin(true).unwrap();
    let first = engine
        .insert_delivery(&delivery("first", vec![trigger("b")]), 0)
        .unwrap();
    engine.commit().unwrap();
    let group = [
        delivery("x", vec![trigger("c"), trigger("a")]),
        delivery("y", vec![trigger("b"), trigger("c")]),
        delivery("z", vec![trigger("a")]),
    ];
    engine.begin(true).unwrap();
    let answers = engine
        .insert_deliveries(&group.iter().collect::<Vec<_>>(), 10, true)
        .expect("PostgreSQL records a group together")
        .unwrap();
    engine.commit().unwrap();
    let b0 = queued_ids(std::slice::from_ref(&first))[0];
    // x's triggers for c and a, y's for b and c, z's for a.
    let queued = queued_ids(&answers);
    let (x, rest) = queued.split_at(2);
    let rows = key_rows(&mut engine);
    let key = |project: &str| trigger(project).order_key();
    let mut want = vec![
        (key("a"), x[1], x[1]),
        (key("b"), b0, b0),
        (key("c"), x[0], x[0]),
    ];
    want.sort();
    assert_eq!(rows, want, "the rest queued {rest:?}");
    assert_eq!(engine.depth().unwrap().open, 6);
}

/// A group that finishes one key's head and brings new triggers for it and for keys on
/// either side settles each: the finished key moves on to its new trigger, the others
/// are headed by theirs.
#[test]
fn a_group_with_an_outcome_among_new_triggers_settles_every_key() {
    use crate::store::semantics::{delivery, trigger};
    use crate::store::{Engine, Recorded};
    let Some((_database, mut engine)) = on_new_database() else {
        return;
    };
    engine.begin(true).unwrap();
    engine
        .insert_delivery(&delivery("first", vec![trigger("b")]), 0)
        .unwrap();
    engine.commit().unwrap();
    engine.begin(true).unwrap();
    let claimed = engine.claim(0, 8).unwrap().due.remove(0);
    engine.commit().unwrap();
    engine.begin(true).unwrap();
    let sent = Recorded::Sent {
        status: 201,
        pipeline_id: None,
        pipeline_url: None,
    };
    assert!(engine.record(claimed.lease, &sent, 5).unwrap());
    let group = [
        delivery("x", vec![trigger("a"), trigger("b")]),
        delivery("y", vec![trigger("c")]),
    ];
    let answers = engine
        .insert_deliveries(&group.iter().collect::<Vec<_>>(), 10, true)
        .expect("PostgreSQL records a group together")
        .unwrap();
    engine.commit().unwrap();
    let ids = queued_ids(&answers);
    let rows: Vec<(String, i64)> = key_rows(&mut engine)
        .into_iter()
        .map(|(key, head, _)| (key, head))
        .collect();
    let key = |project: &str| trigger(project).order_key();
    let mut want = vec![(key("a"), ids[0]), (key("b"), ids[1]), (key("c"), ids[2])];
    want.sort();
    assert_eq!(rows, want);
    assert_eq!(engine.depth().unwrap().open, 3);
}

/// A duplicate whose first delivery another relay prunes between the insert that found it
/// and the read of its row: one by one it is recorded as new; a group's batch gives up
/// (the writer then goes one by one) instead of answering for a row that is gone.
#[test]
fn a_duplicate_pruned_meanwhile_is_recorded_as_new() {
    use crate::store::semantics::{delivery, trigger};
    use crate::store::{Accepted, Engine};
    let Some((database, mut engine)) = on_new_database() else {
        return;
    };
    engine.begin(true).unwrap();
    engine.insert_delivery(&delivery("old", vec![]), 0).unwrap();
    engine.commit().unwrap();
    // Every insert into the deliveries is followed, from another connection (another
    // relay's pruning), by the deletion of the delivery "old".
    engine
        .client()
        .batch_execute(&format!(
            "CREATE EXTENSION dblink;
             CREATE FUNCTION prune_behind() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
               PERFORM dblink_exec('{}', 'DELETE FROM hr_deliveries WHERE delivery_id = ''old''');
               RETURN NULL;
             END $$;
             CREATE TRIGGER prune_behind AFTER INSERT ON hr_deliveries
               FOR EACH STATEMENT EXECUTE FUNCTION prune_behind();",
            database.url
        ))
        .unwrap();
    let again = delivery("old", vec![trigger("p")]);
    let other = delivery("other", vec![trigger("p")]);
    engine.begin(true).unwrap();
    let batch = engine
        .insert_deliveries(&[&again, &other], 1, true)
        .unwrap();
    let err = batch.expect_err("the batch cannot answer for a row that is gone");
    assert!(err.message.contains("old"), "{}", err.message);
    engine.rollback();

    engine
        .client()
        .batch_execute("INSERT INTO hr_deliveries (source, delivery_id, received_at, event_type, headers, body, summary)
                        VALUES ('gh', 'old', 0, 'push', '[]', '', '')")
        .unwrap();
    engine.begin(true).unwrap();
    let answer = engine.insert_delivery(&again, 2).unwrap();
    engine.commit().unwrap();
    assert!(
        matches!(&answer, Accepted::Queued { trigger_ids, .. } if trigger_ids.len() == 1),
        "{answer:?}"
    );
    assert_eq!(engine.depth().unwrap().open, 1);
}

/// An operation that fails undoes only itself, whether it was the first in its
/// transaction (where the engine sets no savepoint: it begins the transaction again) or
/// came after others (whose savepoints are released with the next one).
#[test]
fn a_failed_operation_undoes_only_itself_first_or_later() {
    use crate::store::semantics::{delivery, trigger};
    use crate::store::{Engine, ListFilter};
    let Some((_database, mut engine)) = on_new_database() else {
        return;
    };
    // A constraint of the test's own makes these deliveries' inserts fail, and with them
    // the transaction (unless a savepoint undoes only the failed statement).
    engine
        .client()
        .batch_execute(
            "ALTER TABLE hr_deliveries ADD CONSTRAINT test_refuses CHECK (summary <> 'refused')",
        )
        .unwrap();
    let bad = |id: &str| {
        let mut d = delivery(id, vec![trigger("p")]);
        d.summary = "refused".into();
        d
    };
    engine.begin(true).unwrap();
    for (d, ok) in [
        (bad("b1"), false),
        (delivery("g1", vec![trigger("p")]), true),
        (bad("b2"), false),
        (delivery("g2", vec![trigger("q")]), true),
        (bad("b3"), false),
    ] {
        engine.savepoint().unwrap();
        let result = engine.insert_delivery(&d, 0);
        assert_eq!(result.is_ok(), ok, "{}: {result:?}", d.delivery_id);
        engine.release(result.is_ok());
    }
    engine.commit().unwrap();
    let mut listed: Vec<String> = engine
        .list(&ListFilter {
            limit: 10,
            ..ListFilter::default()
        })
        .unwrap()
        .into_iter()
        .map(|row| row.delivery_id)
        .collect();
    listed.sort();
    assert_eq!(listed, ["g1", "g2"]);
    assert_eq!(engine.depth().unwrap().open, 2);
    engine.begin(false).unwrap();
    let claimed = engine.claim(1, 8).unwrap();
    engine.commit().unwrap();
    assert_eq!(claimed.due.len(), 2, "both keys were settled");
    assert_eq!(claimed.next_due, None);
}

/// One claim takes the heads of many keys in one statement; a head whose row someone
/// holds (a late outcome being written) is skipped, not waited for, and its key is due
/// again at once.
#[test]
fn a_claim_skips_a_held_head_and_says_its_key_is_still_due() {
    use crate::store::Engine;
    use crate::store::semantics::{delivery, trigger};
    let Some((database, mut engine)) = on_new_database() else {
        return;
    };
    engine.begin(true).unwrap();
    let mut heads = Vec::new();
    for (id, project) in [("a", "p"), ("b", "q"), ("c", "r")] {
        let answer = engine
            .insert_delivery(&delivery(id, vec![trigger(project)]), 5)
            .unwrap();
        heads.extend(queued_ids(&[answer]));
    }
    engine.commit().unwrap();
    let mut other = postgres::Client::connect(&database.url, postgres::NoTls).unwrap();
    let mut holding = other.transaction().unwrap();
    holding
        .execute(
            "SELECT 1 FROM hr_triggers WHERE id = $1 FOR UPDATE",
            &[&heads[1]],
        )
        .unwrap();
    engine.begin(false).unwrap();
    let claimed = engine.claim(10, 8).unwrap();
    engine.commit().unwrap();
    let mut taken: Vec<i64> = claimed.due.iter().map(|due| due.id).collect();
    taken.sort();
    assert_eq!(taken, [heads[0], heads[2]]);
    assert_eq!(claimed.next_due, Some(5), "q is due still");
    holding.commit().unwrap();
    engine.begin(false).unwrap();
    let claimed = engine.claim(10, 8).unwrap();
    engine.commit().unwrap();
    assert_eq!(
        claimed.due.iter().map(|due| due.id).collect::<Vec<_>>(),
        [heads[1]]
    );
    assert_eq!(claimed.next_due, None);
}

/// The writer's connection plans no sequential scans, also after it reconnects: its
/// statements are planned once, often while the tables are small.
#[test]
fn the_writers_connections_plan_no_sequential_scans() {
    use crate::store::Engine;
    let Some(database) = super::test_server::Database::create() else {
        return;
    };
    let config = super::PostgresConfig::new(&database.url);
    let mut engine = super::PostgresEngine::open(&config)
        .unwrap()
        .as_writer()
        .unwrap();
    let setting = |engine: &mut super::PostgresEngine| -> String {
        engine
            .client()
            .query_one("SHOW enable_seqscan", &[])
            .unwrap()
            .get(0)
    };
    assert_eq!(setting(&mut engine), "off");
    let pid: i32 = engine
        .client()
        .query_one("SELECT pg_backend_pid()", &[])
        .unwrap()
        .get(0);
    let mut other = postgres::Client::connect(&database.url, postgres::NoTls).unwrap();
    other
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .unwrap();
    for _ in 0..100 {
        if engine.client().is_closed() {
            break;
        }
        let _ = engine.client().simple_query("SELECT 1");
    }
    engine.begin(true).unwrap();
    assert_eq!(setting(&mut engine), "off", "after reconnecting");
    engine.commit().unwrap();
    let mut reader = super::PostgresEngine::open_beside(&config).unwrap();
    assert_eq!(setting(&mut reader), "on", "readers plan as usual");
}

/// A relay warns at start when the database streams to standbys none of which is
/// synchronous (a failover could lose acknowledged webhooks), and not before.
#[test]
fn a_database_streaming_to_an_asynchronous_receiver_is_a_failover_risk() {
    let Some(server) = super::test_server::Server::own() else {
        return;
    };
    let database = server.database();
    let mut engine =
        super::PostgresEngine::open(&super::PostgresConfig::new(&database.url)).unwrap();
    assert_eq!(engine.replication_risk().unwrap(), None, "a server alone");
    let mut receiver = server.stream_to_a_receiver();
    let until = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let risk = loop {
        if let Some(risk) = engine.replication_risk().unwrap() {
            break risk;
        }
        assert!(
            std::time::Instant::now() < until,
            "pg_receivewal never showed in pg_stat_replication"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert!(risk.contains("1 receiver(s)"), "{risk}");
    server.admin("ALTER SYSTEM SET synchronous_standby_names = '*'");
    server.admin("SELECT pg_reload_conf()");
    let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while engine.replication_risk().unwrap().is_some() {
        assert!(
            std::time::Instant::now() < until,
            "a synchronous standby is no risk"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let _ = receiver.kill();
    let _ = receiver.wait();
}

/// Another relay's replay and this relay's pruning of one delivery at the same moment:
/// whichever locks the delivery first goes first, the other waits and then sees what it
/// did, and no trigger is ever left without its delivery (the foreign key that used to
/// guard this is gone: see the schema).
#[test]
fn a_replay_and_a_prune_of_one_delivery_at_once_leave_no_trigger_behind() {
    use crate::store::semantics::{delivery, trigger};
    use crate::store::{Engine, Recorded, ReplayTarget};
    let Some((database, mut pruner)) = on_new_database() else {
        return;
    };
    let open = |url: &str| {
        super::PostgresEngine::open(&super::PostgresConfig::new(url))
            .unwrap()
            .with_callers_clock()
    };
    let (mut replayer, mut watcher) = (open(&database.url), open(&database.url));
    let failed = Recorded::Failed {
        status: Some(404),
        reason: "404 Not Found".into(),
        pipeline_id: None,
        pipeline_url: None,
    };
    let finish_due = |engine: &mut super::PostgresEngine, now: i64| {
        engine.begin(true).unwrap();
        for due in engine.claim(now, 8).unwrap().due {
            assert!(engine.record(due.lease, &failed, now).unwrap());
        }
        engine.commit().unwrap();
    };
    // Until the other connection waits for a lock that the test holds.
    let wait_for_a_lock_wait = |watcher: &mut super::PostgresEngine| {
        let until = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let waiting: i64 = watcher
                .client()
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'",
                    &[],
                )
                .unwrap()
                .get(0);
            if waiting > 0 {
                return;
            }
            assert!(std::time::Instant::now() < until, "nobody waited");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    };
    let triggers = |watcher: &mut super::PostgresEngine| -> i64 {
        watcher
            .client()
            .query_one("SELECT count(*) FROM hr_triggers", &[])
            .unwrap()
            .get(0)
    };
    pruner.begin(true).unwrap();
    pruner
        .insert_delivery(&delivery("a", vec![trigger("p")]), 0)
        .unwrap();
    pruner.commit().unwrap();
    finish_due(&mut pruner, 1);

    // The replay first: the pruning waits for it, then keeps the delivery.
    replayer.begin(true).unwrap();
    let replayed = replayer
        .replay(&ReplayTarget::Delivery("a".into()), 2)
        .unwrap();
    let pruning = std::thread::spawn(move || {
        pruner.begin(true).unwrap();
        let pruned = pruner.prune(100, 10, None).unwrap().deleted;
        pruner.commit().unwrap();
        (pruner, pruned)
    });
    wait_for_a_lock_wait(&mut watcher);
    replayer.commit().unwrap();
    let (mut pruner, pruned) = pruning.join().unwrap();
    assert_eq!(pruned, 0, "the replay's trigger is still to be sent");
    assert_eq!(pruner.depth().unwrap().open, 1);
    assert_eq!(triggers(&mut watcher), 2);

    // The pruning first: the replay waits for it, then finds the delivery gone.
    finish_due(&mut pruner, 3);
    pruner.begin(true).unwrap();
    assert_eq!(pruner.prune(100, 10, None).unwrap().deleted, 1);
    let replaying = std::thread::spawn(move || {
        replayer.begin(true).unwrap();
        let answer = replayer.replay(&ReplayTarget::Trigger(replayed[0]), 4);
        replayer.rollback();
        answer
    });
    wait_for_a_lock_wait(&mut watcher);
    pruner.commit().unwrap();
    let refused = replaying.join().unwrap().unwrap_err();
    assert!(refused.refused, "{refused}");
    assert!(
        refused.message.contains("no longer in the store"),
        "{refused}"
    );
    assert_eq!(
        triggers(&mut watcher),
        0,
        "the triggers went with their delivery"
    );
    assert_eq!(pruner.depth().unwrap().open, 0);
}

/// A database clock set back an hour: shared limits and pauses set before the step keep
/// the time they had left (else a project's limit or pause held every relay for the hour),
/// and a limit already past is left alone; every relay's noted time comes down.
#[test]
fn limits_and_pauses_move_back_with_a_clock_set_back() {
    use crate::store::Engine;
    let Some((_database, mut engine)) = on_new_database() else {
        return;
    };
    let hour_us: i64 = 3_600_000_000;
    engine
        .client()
        .batch_execute(&format!(
            "INSERT INTO hr_limits (key, tat, paused_until) VALUES
                 ('fast', hr_now_us() + {hour_us} + 2000000, hr_now_us() + {hour_us} + 30000000),
                 ('past', 5, NULL);
             UPDATE hr_open SET clock_noted = {} WHERE shard = 3",
            crate::store::now_ms() + 3_600_000
        ))
        .unwrap();
    engine.begin(true).unwrap();
    assert!(engine.clock_noted().unwrap().is_some());
    engine
        .move_deadlines_back(3_600_000, crate::store::now_ms())
        .unwrap();
    engine.commit().unwrap();
    let row = engine
        .client()
        .query_one(
            "SELECT (tat - hr_now_us()) / 1000, (paused_until - hr_now_us()) / 1000,
                    (SELECT tat FROM hr_limits WHERE key = 'past'),
                    (SELECT count(DISTINCT clock_noted) FROM hr_open)
             FROM hr_limits WHERE key = 'fast'",
            &[],
        )
        .unwrap();
    let (tat_left, pause_left): (i64, i64) = (row.get(0), row.get(1));
    assert!((1_000..=2_000).contains(&tat_left), "{tat_left} ms");
    assert!((29_000..=30_000).contains(&pause_left), "{pause_left} ms");
    assert_eq!(row.get::<_, i64>(2), 5);
    assert_eq!(row.get::<_, i64>(3), 1, "every shard noted the same time");
}

/// The failures that pass are transient (the outbox keeps what failed and `/readyz` says
/// why): a statement cancelled by `statement_timeout` (a DBA's setting on the role), a
/// lock not granted within `lock_timeout`, a write on a server that takes none. A
/// mistake in a statement is not.
#[test]
fn cancelled_statements_and_read_only_servers_are_transient() {
    let Some((_database, mut engine)) = on_new_database() else {
        return;
    };
    let mut failure = |sql: &str| {
        let err = engine.client().batch_execute(sql).unwrap_err();
        let _ = engine.client().batch_execute("ROLLBACK");
        super::error(err)
    };
    let timed_out = failure("SET statement_timeout = 10; SELECT pg_sleep(1)");
    assert!(timed_out.transient, "{}", timed_out.message);
    let read_only =
        failure("SET statement_timeout = 0; BEGIN READ ONLY; INSERT INTO hr_open VALUES (1000, 0)");
    assert!(read_only.transient, "{}", read_only.message);
    assert!(
        read_only.message.contains("takes no writes"),
        "{}",
        read_only.message
    );
    let mistake = failure("SELECT no_such_column FROM hr_open");
    assert!(!mistake.transient, "{}", mistake.message);
}

/// A database a newer relay migrated (an older relay restarting during a rolling upgrade,
/// or a deployment rolled back): refused, saying what to do, unless that relay wrote that
/// relays of this schema may run beside it.
#[test]
fn a_database_migrated_by_a_newer_relay_is_refused_unless_it_lets_this_one_run() {
    let Some((database, mut engine)) = on_new_database() else {
        return;
    };
    let known = super::schema::MIGRATIONS.len() as i32;
    let mut newer = |floor: i32| {
        engine
            .client()
            .execute(
                "INSERT INTO hr_schema (version) SELECT $1 WHERE NOT EXISTS
                 (SELECT 1 FROM hr_schema WHERE version = $1)",
                &[&(known + 1)],
            )
            .unwrap();
        engine
            .client()
            .execute("UPDATE hr_schema_floor SET floor = $1", &[&floor])
            .unwrap();
    };
    let open = || super::PostgresEngine::open(&super::PostgresConfig::new(&database.url));
    newer(known + 1);
    let Err(refused) = open() else {
        panic!("a database of a newer schema was opened");
    };
    assert!(refused.refused);
    assert!(
        refused.message.contains(&format!(
            "migrated by a newer hookrelay (schema {}; this hookrelay knows schemas up to {known}, \
             and the store takes relays of schema {} or later)",
            known + 1,
            known + 1
        )),
        "{}",
        refused.message
    );
    newer(known);
    assert!(open().is_ok());
}

/// A database whose schema is up to date is opened without a write (no lock, no
/// `CREATE … IF NOT EXISTS`): commands that only read work on a standby, here one whose
/// sessions are all read-only.
#[test]
fn an_up_to_date_database_is_opened_without_a_write() {
    let Some((database, mut engine)) = on_new_database() else {
        return;
    };
    let name = database.url.rsplit('/').next().unwrap().to_owned();
    engine
        .client()
        .batch_execute(&format!(
            "ALTER DATABASE {name} SET default_transaction_read_only = on"
        ))
        .unwrap();
    let mut reader = super::PostgresEngine::open(&super::PostgresConfig::new(&database.url))
        .expect("opened on a read-only database");
    use crate::store::Engine;
    assert_eq!(reader.depth().unwrap().open, 0);
    engine
        .client()
        .batch_execute(&format!(
            "ALTER DATABASE {name} RESET default_transaction_read_only"
        ))
        .unwrap();
}
