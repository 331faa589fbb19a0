//! A bounded load run: trigger calls through the relay against calls straight to the same
//! fast upstream, measured in the same run so the ratio survives a noisy machine.
//! Everything listens on 127.0.0.1 and stops by itself.
//!
//! Run: `cargo bench --bench gateway_load` (env: LOAD_REQUESTS, default 20000;
//! LOAD_CONCURRENCY, default 64).

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

const TRIGGER_RESPONSE: &str = include_str!("../tests/fixtures/gitlab/trigger_response.json");

/// An upstream that answers every call `201` with GitLab's example body at once.
async fn fast_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let service = service_fn(|request: Request<hyper::body::Incoming>| async move {
                let _ = request.into_body().collect().await;
                let mut response =
                    Response::new(Full::new(Bytes::from_static(TRIGGER_RESPONSE.as_bytes())));
                *response.status_mut() = StatusCode::CREATED;
                Ok::<_, Infallible>(response)
            });
            tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(stream), service));
        }
    });
    addr
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
        let upstream = fast_upstream().await;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("relay.toml"),
            format!("[upstream.gitlab]\nurl = \"http://{upstream}\"\n[gateway]\n"),
        )
        .unwrap();
        let running = support::start_relay(dir, hookrelay::outbox::Durability::Full).await;
        let relay = running.addr;
        let request = Arc::new(|_: usize| {
            Request::post("/api/v4/projects/9/trigger/pipeline")
                .header("host", "127.0.0.1")
                .header("content-type", "application/x-www-form-urlencoded")
                .body(Full::new(Bytes::from_static(
                    b"token=glptt-0123456789abcdef&ref=main&variables%5BUPLOAD_TO_S3%5D=true",
                )))
                .unwrap()
        });
        // Warm both paths (connection pools, allocators) before measuring.
        support::load(upstream, 500.min(requests), concurrency.min(8), 201, request.clone()).await;
        support::load(relay, 500.min(requests), concurrency.min(8), 201, request.clone()).await;
        println!("gateway load: {requests} form-encoded trigger calls, {concurrency} connections, 127.0.0.1");
        let direct = support::load(upstream, requests, concurrency, 201, request.clone()).await.report("direct to upstream (base)");
        let relayed = support::load(relay, requests, concurrency, 201, request).await.report("through hookrelay");
        println!("relayed / direct throughput: {:.2}", relayed / direct);
        running.stop().await;
    });
}
