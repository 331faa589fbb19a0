//! The store from outside the server: the commands (`deliveries`, `replay`, `cancel`,
//! `explain --delivery`) and the dashboard's replans read and change it beside a running
//! relay, which sees what they changed within a second.

use crate::store::postgres::PostgresEngine;
use crate::store::sqlite::SqliteEngine;
use crate::store::{Engine, EngineError, StoreLocation};

use super::{
    Accepted, CancelTarget, DeliveryRow, ListFilter, NewDelivery, ReplayTarget, StoreError,
    StoredWebhook, now_ms,
};

/// The store opened from outside the server (`deliveries`, `replay`, `explain --delivery`,
/// the dashboard's replans) and kept for every step of one command: a command that reads
/// and writes many webhooks opens one connection, not one a step (a PostgreSQL connection
/// costs milliseconds). A state folder's store must exist already.
pub struct OfflineStore {
    engine: Box<dyn Engine>,
    place: String,
}

impl OfflineStore {
    pub fn open(location: &StoreLocation) -> Result<OfflineStore, StoreError> {
        let place = location.describe();
        let error = |err| StoreError::from_engine(place.clone(), err);
        let engine: Box<dyn Engine> = match location {
            StoreLocation::Folder(dir) => {
                Box::new(SqliteEngine::open_existing(dir).map_err(error)?)
            }
            StoreLocation::Postgres(config) => {
                Box::new(PostgresEngine::open(config).map_err(error)?)
            }
        };
        Ok(OfflineStore { engine, place })
    }

    fn error(&self, err: EngineError) -> StoreError {
        StoreError::from_engine(self.place.clone(), err)
    }

    /// The rows `filter` selects.
    pub fn list(&mut self, filter: &ListFilter) -> Result<Vec<DeliveryRow>, StoreError> {
        let listed = self.engine.list(filter);
        listed.map_err(|err| self.error(err))
    }

    /// The stored webhook whose delivery id is `delivery_id` or uniquely starts with it.
    pub fn stored_webhook(&mut self, delivery_id: &str) -> Result<StoredWebhook, StoreError> {
        let stored = stored_in(self.engine.as_mut(), delivery_id);
        stored.map_err(|err| self.error(err))
    }

    /// The stored webhook `source` sent as `delivery_id` (its whole id).
    pub fn stored_webhook_from(
        &mut self,
        source: &str,
        delivery_id: &str,
    ) -> Result<StoredWebhook, StoreError> {
        let stored = stored_from_in(self.engine.as_mut(), source, delivery_id);
        stored.map_err(|err| self.error(err))
    }

    /// Whether the store holds the webhook `source` sent as `delivery_id` (its whole id).
    pub fn holds_webhook_from(
        &mut self,
        source: &str,
        delivery_id: &str,
    ) -> Result<bool, StoreError> {
        let stored = self.engine.stored_webhook_from(source, delivery_id);
        stored
            .map(|webhook| webhook.is_some())
            .map_err(|err| self.error(err))
    }

    /// Runs `op` in one committed transaction; a running relay sees what it changed within
    /// a second.
    pub fn transaction<T>(
        &mut self,
        op: impl FnOnce(&mut dyn Engine) -> Result<T, EngineError>,
    ) -> Result<T, StoreError> {
        let engine = self.engine.as_mut();
        let result = (|| {
            engine.begin(true)?;
            match op(engine) {
                Ok(done) => engine.commit().map(|()| done),
                Err(err) => {
                    engine.rollback();
                    Err(err)
                }
            }
        })();
        result.map_err(|err| self.error(err))
    }

    /// Records deliveries (`replay --replan`), all of them in one transaction: either every
    /// one is recorded or none is.
    pub fn accept_all(&mut self, deliveries: &[NewDelivery]) -> Result<Vec<Accepted>, StoreError> {
        self.transaction(|engine| {
            let now = now_ms();
            deliveries
                .iter()
                .map(|delivery| engine.insert_delivery(delivery, now))
                .collect()
        })
    }
}

/// Reads the store without the server (`deliveries`), or beside it.
pub fn list(location: &StoreLocation, filter: &ListFilter) -> Result<Vec<DeliveryRow>, StoreError> {
    OfflineStore::open(location)?.list(filter)
}

/// The one delivery id that is `text` or starts with it, as `deliveries` shows ids: an
/// unknown id and an ambiguous prefix are said as such, never as a broken store.
fn resolve_delivery(engine: &mut dyn Engine, text: &str) -> Result<String, EngineError> {
    // A whole id is found by a few index lookups; only the start of one needs a listing.
    if engine.stored_webhook(text)?.is_some() {
        return Ok(text.to_owned());
    }
    resolve_start(engine, text)
}

/// [`resolve_delivery`] for text that is not a whole id: a listing of the ids that start
/// with it (newest first, the newest 200 of them).
fn resolve_start(engine: &mut dyn Engine, text: &str) -> Result<String, EngineError> {
    // Every id starts with nothing: an empty one would pick the store's only delivery.
    if text.is_empty() {
        return Err(EngineError::refused(
            "the delivery id is empty; give the id (or its start) that `hookrelay deliveries` shows",
        ));
    }
    let rows = engine.list(&ListFilter {
        delivery: Some(text.to_owned()),
        limit: 200,
        ..ListFilter::default()
    })?;
    let mut ids: Vec<String> = rows.into_iter().map(|row| row.delivery_id).collect();
    ids.sort();
    ids.dedup();
    if ids.iter().any(|id| id == text) {
        return Ok(text.to_owned());
    }
    // A webhook and the records named after it (`ID~duplicate-…`, `ID~replan-…`): the
    // start of the webhook's id means the webhook.
    let originals: Vec<&String> = ids
        .iter()
        .filter(|id| match id.split_once('~') {
            Some((base, _)) => !ids.iter().any(|other| other == base),
            None => true,
        })
        .collect();
    if let [only] = originals.as_slice()
        && !only.contains('~')
    {
        return Ok((*only).clone());
    }
    match ids.as_slice() {
        [] => Err(EngineError::refused(format!(
            "no delivery {text:?} in the store"
        ))),
        [only] => Ok(only.clone()),
        many => Err(EngineError::refused(format!(
            "{text:?} is the start of {} delivery ids ({}{}); give more of it",
            many.len(),
            many.iter().take(3).cloned().collect::<Vec<_>>().join(", "),
            if many.len() > 3 { ", …" } else { "" }
        ))),
    }
}

/// Reads a stored webhook by its delivery id, or a unique start of one (`explain --delivery`).
pub fn stored_webhook(
    location: &StoreLocation,
    delivery_id: &str,
) -> Result<StoredWebhook, StoreError> {
    OfflineStore::open(location)?.stored_webhook(delivery_id)
}

/// The stored webhook whose delivery id is `delivery_id` or uniquely starts with it.
pub(super) fn stored_in(
    engine: &mut dyn Engine,
    delivery_id: &str,
) -> Result<StoredWebhook, EngineError> {
    if let Some(whole) = engine.stored_webhook(delivery_id)? {
        return Ok(whole);
    }
    let delivery_id = resolve_start(engine, delivery_id)?;
    engine
        .stored_webhook(&delivery_id)?
        .ok_or_else(|| EngineError::refused(format!("no delivery {delivery_id:?} in the store")))
}

/// The stored webhook `source` sent as `delivery_id` (its whole id).
pub(super) fn stored_from_in(
    engine: &mut dyn Engine,
    source: &str,
    delivery_id: &str,
) -> Result<StoredWebhook, EngineError> {
    engine
        .stored_webhook_from(source, delivery_id)?
        .ok_or_else(|| {
            EngineError::refused(format!(
                "no delivery {delivery_id:?} from source {source} in the store"
            ))
        })
}

/// Runs `op` in one committed transaction on the store, from outside the server (the
/// commands).
fn offline<T>(
    location: &StoreLocation,
    op: impl FnOnce(&mut dyn Engine) -> Result<T, EngineError>,
) -> Result<T, StoreError> {
    OfflineStore::open(location)?.transaction(op)
}

/// Stops waiting triggers from outside the server (`hookrelay cancel`); a running relay
/// never claims them again.
pub fn cancel_offline(
    location: &StoreLocation,
    target: &CancelTarget,
) -> Result<Vec<i64>, StoreError> {
    offline(location, |engine| engine.cancel(target, now_ms()))
}

/// Re-queues from outside the server (`hookrelay replay`); a delivery may be named by a
/// unique start of its id.
pub fn replay_offline(
    location: &StoreLocation,
    target: &ReplayTarget,
) -> Result<Vec<i64>, StoreError> {
    offline(location, |engine| {
        let target = match target {
            ReplayTarget::Delivery(text) => ReplayTarget::Delivery(resolve_delivery(engine, text)?),
            other => other.clone(),
        };
        engine.replay(&target, now_ms())
    })
}

/// Re-queues the triggers of the webhook `source` sent as `delivery_id` (its whole id),
/// from outside the server (`hookrelay replay ID --source NAME`, the dashboard's page of
/// one delivery): where two sources sent the same id, the id alone names both.
pub fn replay_from_offline(
    location: &StoreLocation,
    source: &str,
    delivery_id: &str,
) -> Result<Vec<i64>, StoreError> {
    offline(location, |engine| {
        crate::store::replay_from(engine, source, delivery_id, now_ms())
    })
}

/// Re-queues several triggers from outside the server (`hookrelay replay --failed`): one
/// store connection and one transaction for all of them, so either every one is queued
/// again or none is. Returns each trigger with the ids of its replays.
pub fn replay_triggers_offline(
    location: &StoreLocation,
    triggers: &[i64],
) -> Result<Vec<(i64, Vec<i64>)>, StoreError> {
    offline(location, |engine| {
        let now = now_ms();
        triggers
            .iter()
            .map(|&id| Ok((id, engine.replay(&ReplayTarget::Trigger(id), now)?)))
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sqlite::Durability;

    /// A store holding a delivery of each of `ids`, the nth received at n.
    fn store_of(ids: &[String]) -> (tempfile::TempDir, SqliteEngine) {
        let dir = tempfile::tempdir().unwrap();
        let mut engine =
            SqliteEngine::open(&dir.path().join("s.sqlite3"), Durability::Off).unwrap();
        engine.begin(true).unwrap();
        for (at, id) in ids.iter().enumerate() {
            let delivery = crate::store::semantics::delivery(id, Vec::new());
            engine.insert_delivery(&delivery, at as i64).unwrap();
        }
        engine.commit().unwrap();
        (dir, engine)
    }

    /// A whole delivery id is found however many newer ids start with it (a generic
    /// sender's "1" before "10" … "1999"), and the start of an id still resolves to the one
    /// webhook it names.
    #[test]
    fn a_whole_delivery_id_is_found_among_newer_ids_that_start_with_it() {
        let ids: Vec<String> = ["1", "abc-unique"]
            .into_iter()
            .map(str::to_owned)
            .chain((10..2000).map(|n| n.to_string()))
            .collect();
        let (_dir, mut engine) = store_of(&ids);
        let found = stored_in(&mut engine, "1").unwrap();
        assert_eq!((found.delivery_id.as_str(), found.received_at), ("1", 0));
        assert_eq!(resolve_delivery(&mut engine, "1").unwrap(), "1");
        assert_eq!(
            stored_in(&mut engine, "abc").unwrap().delivery_id,
            "abc-unique"
        );
        let Err(unknown) = stored_in(&mut engine, "nope") else {
            panic!("an id nobody sent was found");
        };
        assert!(unknown.refused, "{unknown}");
    }

    /// `replay delivery:` with nothing after it: every id starts with nothing, and with one
    /// delivery in the store it used to be replayed.
    #[test]
    fn an_empty_delivery_id_names_no_delivery() {
        let (_dir, mut engine) = store_of(&["the-only-one".to_owned()]);
        for empty in ["", "delivery:"] {
            let ReplayTarget::Delivery(text) = ReplayTarget::parse(empty) else {
                panic!("{empty:?} is not a trigger id");
            };
            let err = resolve_start(&mut engine, &text).unwrap_err();
            assert!(err.refused, "{err}");
            assert!(
                err.to_string().contains("the delivery id is empty"),
                "{err}"
            );
        }
        assert_eq!(resolve_start(&mut engine, "the").unwrap(), "the-only-one");
    }
}
