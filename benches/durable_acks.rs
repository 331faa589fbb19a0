//! Durable acknowledgements per second: signed GitHub pushes over 64 connections on
//! 127.0.0.1, each verified, matched and committed (delivery and trigger) before its `202`.
//! The same server is measured with the store at `synchronous = FULL` (what runs in
//! production) and `OFF` (no fsync) in one run, so the ratio is what durability costs.
//! The forwarder does not run: this measures the acknowledging path alone.
//!
//! Run: `cargo bench --bench durable_acks` (env: LOAD_REQUESTS, default 20000;
//! LOAD_CONCURRENCY, default 64).

mod support;

use std::sync::Arc;

use hookrelay::outbox::Durability;

const SECRET: &str = "It's a Secret to Everybody";
const PUSH: &[u8] = include_bytes!("../tests/fixtures/github/push_branch.json");

async fn run(durability: Durability, requests: usize, concurrency: usize, name: &str) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("secret"), SECRET).unwrap();
    std::fs::write(
        dir.path().join("relay.toml"),
        format!(
            "[upstream.gitlab]\nurl = \"http://127.0.0.1:9\"\n[source.github]\nprovider = \"github\"\nsecret = \"file:{}\"\n\
             [[rule]]\nname = \"build\"\nsource = \"github\"\n[rule.trigger]\nproject = \"acme/app\"\n\
             token = \"file:{}\"\nvariables = {{ SHA = \"{{{{ event.after }}}}\" }}\n",
            dir.path().join("secret").display(),
            dir.path().join("secret").display()
        ),
    )
    .unwrap();
    let relay = support::start_relay(dir, durability).await;
    let addr = relay.addr;
    let request = support::signed_github(SECRET, PUSH, name);
    support::load(
        addr,
        200.min(requests),
        concurrency.min(8),
        202,
        request.clone(),
    )
    .await;
    let outcome = support::load(
        addr,
        requests,
        concurrency,
        202,
        Arc::new(move |i| request(i + 1_000_000)),
    )
    .await;
    let rate = outcome.report(name);
    relay.stop().await;
    rate
}

fn main() {
    let requests = if support::quick() {
        200
    } else {
        support::env_number("LOAD_REQUESTS", 20_000)
    };
    let concurrency = support::env_number("LOAD_CONCURRENCY", 64);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        println!("durable acknowledgements: {requests} signed GitHub pushes, {concurrency} connections, 127.0.0.1");
        let off = run(Durability::Off, requests, concurrency, "synchronous=OFF (base)").await;
        let full = run(Durability::Full, requests, concurrency, "synchronous=FULL (durable)").await;
        println!("durable / no-fsync throughput: {:.2}", full / off);
    });
}
