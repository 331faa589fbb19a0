//! hookrelay: a webhook relay and GitLab pipeline-trigger gateway.
//!
//! A map of the modules, in the order a request meets them:
//!
//! - [`app`]: the shared state every handler stands on (configuration snapshot, outbox).
//! - [`server`]: accept, route, bound bodies and read times, shut down; [`event_loops`] serve
//!   the connections, one thread per core; [`lingering`] closes them without losing the
//!   last answer; [`client_address`] says who sent a request, behind proxies too, and
//!   [`github_meta`] keeps GitHub's published webhook addresses for `allow_from = ["github"]`.
//! - [`hooks`]: `POST /hooks/{source}`; [`sources`] verify and read each sender's webhooks into
//!   one normalized [`event::Event`].
//! - [`gateway`]: the GitLab-compatible trigger endpoints; one call becomes one [`trigger::Trigger`].
//! - [`trigger`]: the trigger call and its encoding for GitLab; [`git_ref`] validates refs.
//! - [`outbox`]: the durable outbox and its group-committing writer; [`store`] is the seam
//!   to its engines (SQLite by default).
//! - [`forwarder`]: sends due triggers and statuses from the outbox; [`retry`] says what
//!   each answer means and when to try again.
//! - [`upstream`]: the shared, pooled HTTPS client to GitLab (and to the forges' status APIs).
//! - [`status`]: the pipeline's status back on the commit: forge requests and their
//!   clients, GitLab's pipeline events, and the rules that keep statuses in order.
//! - [`admin`]: the delivery dashboard and its JSON API, on a listener of its own.
//! - [`error`]: every error a caller sees, mapped to status and JSON in one place;
//!   [`json_syntax`] reads JSON bodies and is the error both their readers report.
//! - [`config`]: the configuration folder, validated into typed values with `file:line` problems.
//! - [`secret`]: secrets that print only as a mask; [`named_file`] reads the files an
//!   operator names (secrets, certificates, configuration) with a bound.
//! - [`commands`]: the command-line commands, called by the thin `main`; [`explain`] and
//!   [`replan`] run a payload or a stored webhook through the rules; [`delivery_rows`]
//!   says how a stored delivery reads, to the command line and the dashboard alike; [`log_writer`] writes
//!   the log lines on a thread of its own; [`dirty_pages`] starts writing a file's pages to
//!   disk early, so that the store's flushes never wait behind a burst of them.
//!   [`disk_reserve`] stops new work before the store's disk is full, so the queue drains.

// One measured exception, allowed where it is: `dirty_pages` (sync_file_range).
#![deny(unsafe_code)]
// The crate is a program, not a library: its documentation is read with its private items
// (`cargo doc --document-private-items`, which CI builds with warnings denied), where a
// link from a public item's comment to a private one resolves.
#![allow(rustdoc::private_intra_doc_links)]

pub mod admin;
pub mod app;
pub mod bare_refusals;
pub mod catch_up;
pub mod catch_up_passes;
pub mod client_address;
pub mod clipped;
pub mod commands;
pub mod compare;
pub mod config;
pub mod connections;
pub mod delivery_rows;
pub mod dirty_pages;
pub mod disk_reserve;
pub mod error;
pub mod event;
pub mod event_loops;
pub mod explain;
pub mod forwarder;
pub mod gateway;
pub mod git_ref;
pub mod github_meta;
pub mod hooks;
pub mod json_syntax;
pub mod limits;
pub mod lingering;
pub mod log_writer;
pub mod metrics;
#[cfg(test)]
mod mutations;
pub mod named_file;
pub mod outbound;
pub mod outbox;
pub mod reload;
pub mod replan;
pub mod retry;
pub mod rules;
pub mod scheduler;
pub mod secret;
pub mod server;
pub mod sources;
pub mod status;
pub mod store;
pub mod terminal;
pub mod tls;
pub mod trigger;
pub mod upstream;
