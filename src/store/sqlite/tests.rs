use super::operator::{BY_DELIVERY_ID, CANCEL_PROJECT};
use super::schema::MIGRATIONS;
use super::*;

/// Groups committed back to back never leave the writer idle, which is when SQLite
/// would start the WAL over by itself; the checkpointer and the writer still do.
#[test]
fn a_steady_stream_of_commits_keeps_the_wal_short() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.sqlite3");
    let mut engine = SqliteEngine::open(&path, Durability::Off).unwrap();
    engine.checkpoint_in_background().unwrap();
    // 3 KB that does not compress, as a compressed webhook body is.
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut noise = || {
        (0..3000)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect::<Vec<u8>>()
    };
    let mut longest = 0;
    for group in 0..1200 {
        engine.begin(true).unwrap();
        for i in 0..25 {
            let mut delivery =
                super::super::semantics::delivery(&format!("{group}-{i}"), Vec::new());
            delivery.body = super::super::StoredBody {
                bytes: bytes::Bytes::from(noise()),
                encoding: None,
            };
            engine.insert_delivery(&delivery, 0).unwrap();
        }
        engine.commit().unwrap();
        let wal = std::fs::metadata(path.with_extension("sqlite3-wal"))
            .map(|m| m.len())
            .unwrap_or(0);
        longest = longest.max(wal);
    }
    // 1,200 groups write about 120 MB of frames; a WAL that is never started over
    // holds them all. Started over, it stays near WAL_KEEP_BYTES: the checkpointer is a
    // thread beside this loop and, on a busy machine, can fall a few megabytes behind
    // for a moment (68 MB once in CI), so the bound is one and a half times that.
    let bound = super::checkpoint::WAL_KEEP_BYTES as u64 * 3 / 2;
    assert!(longest < bound, "the WAL grew to {longest} bytes");
}

#[test]
fn migrations_run_once_and_reopen_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.sqlite3");
    drop(SqliteEngine::open(&path, Durability::Full).unwrap());
    let engine = SqliteEngine::open(&path, Durability::Full).unwrap();
    let version: i64 = engine
        .conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, MIGRATIONS.len() as i64);
    let mode: String = engine
        .conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
}

/// A store a newer relay migrated (a deployment rolled back): refused, saying what to do,
/// unless that relay wrote that relays of this schema may run beside it; then opened
/// as it is, its schema and floor left alone.
#[test]
fn a_store_migrated_by_a_newer_relay_is_refused_unless_it_lets_this_one_run() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.sqlite3");
    drop(SqliteEngine::open(&path, Durability::Full).unwrap());
    let known = MIGRATIONS.len() as i64;
    let newer = |floor: i64| {
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", known + 1).unwrap();
        conn.execute("UPDATE schema_floor SET floor = ?1", [floor])
            .unwrap();
    };
    let read = |sql: &str| -> i64 {
        let conn = Connection::open(&path).unwrap();
        conn.query_row(sql, [], |row| row.get(0)).unwrap()
    };
    newer(known + 1);
    let Err(refused) = SqliteEngine::open(&path, Durability::Full) else {
        panic!("a store of a newer schema was opened");
    };
    assert!(refused.refused);
    assert_eq!(
        refused.message,
        format!(
            "the store was migrated by a newer hookrelay (schema {}; this hookrelay knows schemas \
             up to {known}, and the store takes relays of schema {} or later): run that newer \
             hookrelay, or restore the store from a backup taken before the upgrade",
            known + 1,
            known + 1
        )
    );
    newer(known);
    drop(SqliteEngine::open(&path, Durability::Full).unwrap());
    assert_eq!(read("PRAGMA user_version"), known + 1);
    assert_eq!(read("SELECT floor FROM schema_floor"), known);
}

/// A store written by an earlier release (schema 2, triggers waiting and one being sent
/// when it stopped) opens with its queue rebuilt: heads, due times and counts.
#[test]
fn an_earlier_store_is_upgraded_with_its_queue() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.sqlite3");
    {
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(MIGRATIONS[0]).unwrap();
        conn.execute_batch(MIGRATIONS[1]).unwrap();
        conn.pragma_update(None, "user_version", 2).unwrap();
        conn.execute_batch(
            "INSERT INTO deliveries VALUES (1, 'gh', 'd1', 0, 'push', '[]', x'7b7d', '{}');
             INSERT INTO triggers (id, delivery, rule, upstream, project, git_ref, token_ref, variables,
                                   inputs, order_key, state, created_at, due_at, updated_at)
             VALUES (1, 1, 'r', 'gitlab', 'a', 'main', 'env:T', '{}', '{}', 'k1', 'sent', 0, 0, 0),
                    (2, 1, 'r', 'gitlab', 'a', 'main', 'env:T', '{}', '{}', 'k1', 'sending', 0, 5, 0),
                    (3, 1, 'r', 'gitlab', 'a', 'main', 'env:T', '{}', '{}', 'k1', 'queued', 0, 1, 0),
                    (4, 1, 'r', 'gitlab', 'b', 'main', 'env:T', '{}', '{}', 'k2', 'queued', 0, 9, 0);",
        )
        .unwrap();
    }
    let mut engine = SqliteEngine::open(&path, Durability::Full).unwrap();
    assert_eq!(
        engine.depth().unwrap(),
        Depth {
            open: 3,
            earliest_due: Some(5)
        }
    );
    engine.begin(true).unwrap();
    let claimed = engine.claim(10, 10).unwrap();
    engine.commit().unwrap();
    let ids: Vec<i64> = claimed.due.iter().map(|t| t.id).collect();
    assert_eq!(
        ids,
        [2, 4],
        "the one being sent is due again, and heads its key"
    );
    let stored = engine.stored_webhook("d1").unwrap().unwrap();
    assert_eq!(
        &stored.body[..],
        b"{}",
        "bodies stored before compression read as they are"
    );
}

/// The queries on the claim path use the indexes meant for them, never a scan of the
/// triggers table.
#[test]
fn claim_path_queries_read_indexes_not_the_backlog() {
    let dir = tempfile::tempdir().unwrap();
    let engine = SqliteEngine::open(&dir.path().join("s.sqlite3"), Durability::Full).unwrap();
    let plan = |sql: &str| query_plan(&engine, sql, 0);
    let claim = plan(
        "SELECT order_key, head FROM queue_keys WHERE due_at IS NOT NULL AND due_at <= 5 ORDER BY due_at LIMIT 8",
    );
    assert!(claim.contains("queue_keys_due"), "{claim}");
    let next = plan(
        "SELECT id, due_at FROM triggers WHERE order_key = 'k' AND state IN ('queued', 'sending') ORDER BY id LIMIT 1",
    );
    assert!(next.contains("triggers_open"), "{next}");
    let earliest = plan("SELECT min(due_at) FROM queue_keys WHERE due_at IS NOT NULL");
    assert!(earliest.contains("queue_keys_due"), "{earliest}");
    let twin = plan(
        "SELECT id FROM triggers WHERE coalesce_key = 'k' AND state = 'queued' AND due_at > 5 ORDER BY id LIMIT 1",
    );
    assert!(twin.contains("triggers_coalescing"), "{twin}");
    let merged = plan(
        "SELECT status_target FROM triggers WHERE coalesced_into = 7 AND status_target IS NOT NULL ORDER BY id",
    );
    assert!(merged.contains("triggers_coalesced_into"), "{merged}");
    // A pruning step starts where the last one stopped, not at the oldest delivery.
    let prune = plan(
        "SELECT d.id FROM deliveries d WHERE d.received_at < 9 AND d.received_at >= 5
           AND (d.received_at > 5 OR d.id > 3) ORDER BY d.received_at, d.id LIMIT 500",
    );
    assert!(
        prune.contains("deliveries_received (received_at>? AND received_at<?)"),
        "{prune}"
    );
}

/// SQLite's plan for `sql` (its `?` parameters bound to `x`), one step after another.
fn query_plan(engine: &SqliteEngine, sql: &str, parameters: usize) -> String {
    let mut statement = engine
        .conn
        .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
        .unwrap();
    let values = vec!["x"; parameters];
    let rows: Vec<String> = statement
        .query_map(rusqlite::params_from_iter(values), |row| {
            row.get::<_, String>(3)
        })
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap();
    rows.join("; ")
}

/// Cancelling a project's triggers reads the index of open triggers, not every trigger the
/// store keeps.
#[test]
fn cancelling_a_project_reads_only_open_triggers() {
    let dir = tempfile::tempdir().unwrap();
    let engine = SqliteEngine::open(&dir.path().join("s.sqlite3"), Durability::Off).unwrap();
    let plan = query_plan(&engine, CANCEL_PROJECT, 2);
    assert!(plan.contains("USING INDEX triggers_open"), "{plan}");
}

/// Finding deliveries by their id alone (`explain --delivery`, a replay of a delivery)
/// seeks each source in the `(source, delivery_id)` index: it never reads the whole
/// table, which with a million deliveries held the writer for seconds.
#[test]
fn lookups_by_delivery_id_seek_each_source() {
    let dir = tempfile::tempdir().unwrap();
    let engine = SqliteEngine::open(&dir.path().join("s.sqlite3"), Durability::Off).unwrap();
    let plan = |sql: String| query_plan(&engine, &sql, 1);
    for sql in [
        format!(
            "{BY_DELIVERY_ID} SELECT d.id FROM sources CROSS JOIN deliveries d
             WHERE d.source = sources.source AND d.delivery_id = ?1"
        ),
        format!(
            "{BY_DELIVERY_ID} SELECT t.id FROM sources CROSS JOIN deliveries d CROSS JOIN triggers t
             WHERE d.source = sources.source AND d.delivery_id = ?1 AND t.delivery = d.id"
        ),
    ] {
        let plan = plan(sql);
        assert!(
            plan.contains("sqlite_autoindex_deliveries_1 (source=? AND delivery_id=?)"),
            "{plan}"
        );
        assert!(
            !plan.contains("SCAN d") && !plan.contains("SCAN deliveries"),
            "{plan}"
        );
        assert!(!plan.contains("SCAN t"), "{plan}");
    }
}

/// A claim's statement keeps its plan whatever room it is given: SQLite would otherwise
/// prepare it again whenever the bound `LIMIT` changed, which it does from group to group.
#[test]
fn claims_of_changing_room_are_not_prepared_again() {
    let dir = tempfile::tempdir().unwrap();
    let engine = SqliteEngine::open(&dir.path().join("s.sqlite3"), Durability::Off).unwrap();
    for room in [1, 7, 2, 64, 3] {
        claim(&engine, 0, room).unwrap();
    }
    let statement = engine.conn.prepare_cached(keys::DUE_KEYS).unwrap();
    assert_eq!(
        statement.get_status(rusqlite::StatementStatus::RePrepare),
        0
    );
}

/// A new store is made of `PAGE_SIZE` pages; one made with other pages (by an earlier
/// version) keeps them, and works as before.
#[test]
fn new_stores_use_small_pages_and_older_ones_keep_theirs() {
    let dir = tempfile::tempdir().unwrap();
    let page_size = |path: &Path| -> i64 {
        Connection::open(path)
            .unwrap()
            .query_row("PRAGMA page_size", [], |row| row.get(0))
            .unwrap()
    };
    let new = dir.path().join("new.sqlite3");
    SqliteEngine::open(&new, Durability::Off).unwrap();
    assert_eq!(page_size(&new), PAGE_SIZE);

    let old = dir.path().join("old.sqlite3");
    {
        let conn = Connection::open(&old).unwrap();
        conn.pragma_update(None, "page_size", 4096).unwrap();
        conn.pragma_update(None, "journal_mode", "WAL").unwrap();
        conn.execute_batch("CREATE TABLE made_before (x)").unwrap();
    }
    let mut engine = SqliteEngine::open(&old, Durability::Off).unwrap();
    engine.checkpoint_in_background().unwrap();
    engine.begin(true).unwrap();
    let delivery = super::super::semantics::delivery("kept", Vec::new());
    engine.insert_delivery(&delivery, 0).unwrap();
    engine.commit().unwrap();
    drop(engine);
    assert_eq!(page_size(&old), 4096);
    let mut reopened = SqliteEngine::open(&old, Durability::Off).unwrap();
    let rows = reopened
        .list(&ListFilter {
            limit: 10,
            ..ListFilter::default()
        })
        .unwrap();
    assert_eq!(rows.len(), 1);
}

/// The count of unfinished triggers is written once a transaction, at its commit; a
/// savepoint rolled back, or the whole transaction, takes its part of the count with it,
/// and a change outside any transaction is written at once.
#[test]
fn the_open_count_follows_commits_savepoints_and_rollbacks() {
    use super::super::semantics::{delivery, trigger};
    let dir = tempfile::tempdir().unwrap();
    let mut engine = SqliteEngine::open(&dir.path().join("s.sqlite3"), Durability::Off).unwrap();
    let open = |engine: &mut SqliteEngine| engine.depth().unwrap().open;
    let one = |id: &str| delivery(id, vec![trigger("p")]);

    engine.begin(true).unwrap();
    engine.savepoint().unwrap();
    engine.insert_delivery(&one("undone"), 0).unwrap();
    engine.release(false);
    engine.savepoint().unwrap();
    engine.insert_delivery(&one("kept"), 0).unwrap();
    engine.release(true);
    engine.insert_delivery(&one("also kept"), 0).unwrap();
    engine.commit().unwrap();
    assert_eq!(open(&mut engine), 2);

    engine.begin(true).unwrap();
    engine.insert_delivery(&one("rolled back"), 0).unwrap();
    engine.rollback();
    assert_eq!(open(&mut engine), 2);

    engine.insert_delivery(&one("on its own"), 0).unwrap();
    assert_eq!(open(&mut engine), 3);
    let counted: i64 = engine
        .conn
        .query_row(
            "SELECT count(*) FROM triggers WHERE state IN ('queued', 'sending')",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(counted, 3);
}
