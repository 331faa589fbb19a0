//! What `hookrelay deliveries` and the dashboard ask for and get back: the filter, the
//! one `WHERE` clause both engines run it as, and a row.

use serde::Serialize;

/// Which deliveries `hookrelay deliveries` shows.
#[derive(Clone, Debug, Default)]
pub struct ListFilter {
    pub source: Option<String>,
    pub rule: Option<String>,
    pub project: Option<String>,
    pub state: Option<StateFilter>,
    pub kind: Option<DeliveryKind>,
    /// Received at or after (ms since 1970).
    pub since: Option<i64>,
    /// Received before (ms since 1970).
    pub until: Option<i64>,
    /// A delivery id, or the start of one.
    pub delivery: Option<String>,
    /// A whole delivery id: with `source`, found through the `(source, delivery_id)`
    /// index, where the start of one reads every delivery.
    pub whole_delivery: Option<String>,
    /// Text anywhere in the delivery id, the answer (repositories, refs) or a trigger's
    /// project or ref.
    pub text: Option<String>,
    /// One trigger (its row alone), as `merged into 42` and `replay of 7` name them.
    pub trigger: Option<i64>,
    /// Deliveries strictly older than this one (received at, row): the next page.
    pub before: Option<(i64, i64)>,
    pub limit: usize,
}

/// Where a delivery came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DeliveryKind {
    /// A webhook from a `[source.NAME]`.
    Webhook,
    /// A call to the trigger gateway.
    Gateway,
    /// A scheduled rule firing.
    Schedule,
    /// An action taken in the dashboard (who did what).
    Admin,
}

/// A trigger state to list, or deliveries without a trigger.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum StateFilter {
    Queued,
    /// Queued again after a failed attempt.
    Retrying,
    Sending,
    Sent,
    Failed,
    Cancelled,
    /// Status posts a newer state of their pipeline replaced before they were sent.
    Superseded,
    /// Deliveries that queued no trigger (no match, ping, not handled, duplicate, refused).
    None,
    /// Webhooks that repeated a delivery id (recorded at most once a second per source).
    Duplicate,
    /// Webhooks a limit refused (recorded at most once a second per source).
    Refused,
}

/// A value bound to a filter's placeholder.
#[derive(Clone, Debug, PartialEq)]
pub enum SqlValue {
    Text(String),
    Int(i64),
}

impl ListFilter {
    /// The rows (at most `limit`) of the webhook `source` sent as `delivery_id` (its whole
    /// id): one seek on the `(source, delivery_id)` index.
    pub fn of_webhook(source: &str, delivery_id: &str, limit: usize) -> ListFilter {
        ListFilter {
            source: Some(source.to_owned()),
            whole_delivery: Some(delivery_id.to_owned()),
            limit,
            ..ListFilter::default()
        }
    }

    /// The `WHERE` clause over `deliveries d LEFT JOIN triggers t` (the same in both
    /// engines), with `placeholder(n)` for the n-th value (1-based), and the values.
    /// `position` is the engine's `(text, part)` search function (`instr`, `strpos`).
    pub fn where_clause(
        &self,
        placeholder: impl Fn(usize) -> String,
        position: &str,
    ) -> (String, Vec<SqlValue>) {
        let mut conditions: Vec<String> = Vec::new();
        let mut values = Vec::new();
        let bind = |value: SqlValue, values: &mut Vec<SqlValue>| {
            values.push(value);
            placeholder(values.len())
        };
        if let Some(source) = &self.source {
            let p = bind(SqlValue::Text(source.clone()), &mut values);
            conditions.push(format!("d.source = {p}"));
        }
        if let Some(rule) = &self.rule {
            let p = bind(SqlValue::Text(rule.clone()), &mut values);
            conditions.push(format!("t.rule = {p}"));
        }
        if let Some(project) = &self.project {
            let p = bind(SqlValue::Text(project.clone()), &mut values);
            conditions.push(format!("t.project = {p}"));
        }
        match self.kind {
            Some(DeliveryKind::Gateway) => conditions.push("d.source = 'gateway'".into()),
            Some(DeliveryKind::Schedule) => conditions.push("d.source = 'schedule'".into()),
            Some(DeliveryKind::Admin) => conditions.push("d.source = 'admin'".into()),
            Some(DeliveryKind::Webhook) => {
                conditions.push("d.source NOT IN ('gateway', 'schedule', 'admin')".into())
            }
            None => {}
        }
        if let Some(state) = self.state {
            conditions.push(
                match state {
                    StateFilter::Queued => "t.state = 'queued'",
                    StateFilter::Retrying => "t.state = 'queued' AND t.attempts > 0",
                    StateFilter::Sending => "t.state = 'sending'",
                    StateFilter::Sent => "t.state = 'sent'",
                    StateFilter::Failed => "t.state = 'failed'",
                    StateFilter::Cancelled => "t.state = 'cancelled'",
                    StateFilter::Superseded => "t.state = 'superseded'",
                    StateFilter::None => "t.id IS NULL",
                    StateFilter::Duplicate => "t.id IS NULL AND d.delivery_id LIKE '%~duplicate-%'",
                    StateFilter::Refused => "t.id IS NULL AND d.delivery_id LIKE '%~refused-%'",
                }
                .into(),
            );
        }
        if let Some(since) = self.since {
            let p = bind(SqlValue::Int(since), &mut values);
            conditions.push(format!("d.received_at >= {p}"));
        }
        if let Some(until) = self.until {
            let p = bind(SqlValue::Int(until), &mut values);
            conditions.push(format!("d.received_at < {p}"));
        }
        if let Some(text) = &self.text {
            let p = bind(SqlValue::Text(text.clone()), &mut values);
            conditions.push(format!(
                "({position}(d.delivery_id, {p}) > 0 OR {position}(d.summary, {p}) > 0 \
                 OR {position}(coalesce(t.project, ''), {p}) > 0 OR {position}(coalesce(t.git_ref, ''), {p}) > 0)"
            ));
        }
        if let Some((received_at, row)) = self.before {
            let at = bind(SqlValue::Int(received_at), &mut values);
            let id = bind(SqlValue::Int(row), &mut values);
            conditions.push(format!(
                "(d.received_at < {at} OR (d.received_at = {at} AND d.id < {id}))"
            ));
        }
        if let Some(delivery) = &self.delivery {
            // A prefix compared exactly, the same in both engines (SQLite's LIKE would
            // ignore case, PostgreSQL's would not).
            let p = bind(SqlValue::Text(delivery.clone()), &mut values);
            conditions.push(format!("substr(d.delivery_id, 1, length({p})) = {p}"));
        }
        if let Some(delivery) = &self.whole_delivery {
            let p = bind(SqlValue::Text(delivery.clone()), &mut values);
            conditions.push(format!("d.delivery_id = {p}"));
        }
        if let Some(trigger) = self.trigger {
            let p = bind(SqlValue::Int(trigger), &mut values);
            conditions.push(format!("t.id = {p}"));
        }
        let clause = if conditions.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", conditions.join(" AND "))
        };
        (clause, values)
    }
}

/// One row of `hookrelay deliveries`.
#[derive(Clone, Debug, Serialize)]
pub struct DeliveryRow {
    /// The delivery's row in the store (with `received_at`, a page's cursor).
    pub row: i64,
    pub received_at: i64,
    pub source: String,
    pub delivery_id: String,
    pub event_type: String,
    pub trigger_id: Option<i64>,
    pub rule: Option<String>,
    pub project: Option<String>,
    pub git_ref: Option<String>,
    pub state: Option<String>,
    pub attempts: i64,
    pub last_status: Option<i64>,
    pub last_error: Option<String>,
    pub pipeline_url: Option<String>,
    pub replay_of: Option<i64>,
    pub coalesced_into: Option<i64>,
    /// When a waiting trigger is next due (ms since 1970).
    pub due_at: Option<i64>,
    /// The trigger a waiting one waits for: the head of its upstream+project+ref, which go
    /// one at a time and in order. `None` for a head, and for work not waiting.
    pub waits_for: Option<i64>,
    /// The answer the webhook got (JSON), which says why nothing ran when nothing did.
    pub summary: String,
    /// `trigger`, `status` or `poll` (`None`: a delivery without work).
    pub kind: Option<String>,
}
