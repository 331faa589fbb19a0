//! The monitoring shipped in `deploy/` reads series the relay really writes: every
//! `hookrelay_…` name and label value the alerting rules (`deploy/prometheus/`) match on is
//! in the `/metrics` of a relay just started (so an alert on a counter's first increase can
//! fire), and every one the Grafana dashboard (`deploy/grafana/`) reads is there once the
//! relay has answered a webhook and a gateway call. Where Prometheus's `promtool` is
//! installed, the rules load and pass their own cases and the dashboard's queries parse.
//!
//! Where `promtool` is missing those parts say so and return; CI installs Debian's
//! `prometheus` package and sets `HOOKRELAY_REQUIRE_PROMTOOL=1`, which turns that into a
//! failure.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use common::binary::{Served, write};
use common::{RecordingUpstream, send, signed_github};

const ALERTS: &str = "deploy/prometheus/hookrelay-alerts.yml";
const CASES: &str = "deploy/prometheus/hookrelay-alerts.test.yml";
const DASHBOARD: &str = "deploy/grafana/hookrelay-dashboard.json";
const SECRET: &str = "s3cret-for-the-tests";

fn shipped(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path))
        .unwrap_or_else(|err| panic!("{path}: {err}"))
}

/// The dashboard's panels (rows included), as Grafana reads them.
fn dashboard_panels() -> Vec<serde_json::Value> {
    let dashboard: serde_json::Value =
        serde_json::from_str(&shipped(DASHBOARD)).expect("the dashboard is JSON");
    dashboard["panels"].as_array().expect("panels").clone()
}

/// Every query of the dashboard, with Grafana's variables as Prometheus would get them.
fn dashboard_queries() -> Vec<String> {
    dashboard_panels()
        .iter()
        .flat_map(|panel| panel["targets"].as_array().cloned().unwrap_or_default())
        .map(|target| {
            target["expr"]
                .as_str()
                .expect("every target has an expr")
                .replace("$__rate_interval", "5m")
                .replace("$__range", "6h")
                .replace("$instance", ".*")
        })
        .collect()
}

/// A metric selector as written in an alert: the name, and its `label="value"` or
/// `label=~"a|b"` matchers (as the values they require).
#[derive(Debug)]
struct Selector {
    name: String,
    matchers: Vec<(String, Vec<String>)>,
}

/// Every `hookrelay_…` selector in the `expr:` of `rules` (a YAML text).
fn selectors(rules: &str) -> Vec<Selector> {
    let mut found = Vec::new();
    let mut in_expr = false;
    for line in rules.lines() {
        let trimmed = line.trim_start();
        if let Some(rest) = trimmed.strip_prefix("expr:") {
            in_expr = true;
            read_selectors(rest, &mut found);
            continue;
        }
        // An `expr: >-` block goes on while its lines are indented deeper than the key.
        if in_expr && (line.starts_with("          ") || trimmed.starts_with(')')) {
            read_selectors(trimmed, &mut found);
        } else {
            in_expr = false;
        }
    }
    found
}

fn read_selectors(text: &str, found: &mut Vec<Selector>) {
    let mut rest = text;
    while let Some(at) = rest.find("hookrelay_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = tail[..end].to_owned();
        let mut matchers = Vec::new();
        let after = &tail[end..];
        if let Some(inner) = after.strip_prefix('{') {
            let close = inner.find('}').expect("a selector's braces close");
            for matcher in inner[..close].split(',') {
                // `!=` and `!~` are met by a series without the label: nothing to find.
                if matcher.contains("!=") || matcher.contains("!~") {
                    continue;
                }
                let (label, value) = match matcher.split_once("=~") {
                    Some((label, value)) => (label, value.trim_matches('"').split('|').collect()),
                    None => {
                        let (label, value) = matcher.split_once('=').expect("label=value");
                        (label, vec![value.trim_matches('"')])
                    }
                };
                matchers.push((
                    label.trim().to_owned(),
                    value.into_iter().map(str::to_owned).collect(),
                ));
            }
        }
        found.push(Selector { name, matchers });
        rest = &tail[end..];
    }
}

/// Every `hookrelay_…` selector in the dashboard's queries.
fn dashboard_selectors() -> Vec<Selector> {
    let mut found = Vec::new();
    for query in dashboard_queries() {
        read_selectors(&query, &mut found);
    }
    found
}

/// The selectors that read no series of `scrape`, or a label value none of them has
/// (`instance` is the scrape's, not the relay's).
fn unwritten(wanted: &[Selector], scrape: &str) -> Vec<String> {
    // The outbox's gauges of a store relays share carry `scope="cluster"`; this test's
    // relay is on SQLite, so those are looked for where a shared store's relay writes them.
    let shared = hookrelay::metrics::Metrics::for_store(true).encode();
    let written: Vec<_> = series(scrape)
        .into_iter()
        .chain(
            series(&shared)
                .into_iter()
                .filter(|(_, labels)| labels.contains("scope=\"cluster\"")),
        )
        .collect();
    let mut missing = Vec::new();
    for selector in wanted {
        let of_name: Vec<&BTreeSet<String>> = written
            .iter()
            .filter(|(name, _)| *name == selector.name)
            .map(|(_, labels)| labels)
            .collect();
        if of_name.is_empty() {
            missing.push(format!("{} (no such series)", selector.name));
            continue;
        }
        for (label, values) in &selector.matchers {
            if label == "instance" {
                continue;
            }
            for value in values {
                let pair = format!("{label}=\"{value}\"");
                if !of_name.iter().any(|labels| labels.contains(&pair)) {
                    missing.push(format!("{}{{{pair}}}", selector.name));
                }
            }
        }
    }
    missing
}

/// The series in a scrape, as (name, labels as `k="v"` texts).
fn series(scrape: &str) -> Vec<(String, BTreeSet<String>)> {
    scrape
        .lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .map(|line| {
            let name_end = line.find(['{', ' ']).unwrap_or(line.len());
            let labels = match line[name_end..].strip_prefix('{') {
                Some(inner) => inner[..inner.find('}').unwrap()]
                    .split(',')
                    .map(str::to_owned)
                    .collect(),
                None => BTreeSet::new(),
            };
            (line[..name_end].to_owned(), labels)
        })
        .collect()
}

#[tokio::test]
async fn the_alerts_and_the_dashboard_read_series_the_relay_writes() {
    let alerts = selectors(&shipped(ALERTS));
    assert!(alerts.len() >= 15, "read the alerts' selectors: {alerts:?}");
    let dashboard = dashboard_selectors();
    assert!(
        dashboard.len() >= 30,
        "read the dashboard's selectors: {dashboard:?}"
    );

    // A relay with a source of every kind an alert reads: statuses, compares, catch-up,
    // polled pipelines, and the gateway. The forge and GitLab are recording stand-ins.
    let forge = RecordingUpstream::start().await;
    let gitlab = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "token", "forge-token-for-the-tests");
    write(dir.path(), "secret", SECRET);
    let toml = format!(
        r#"[upstream.gitlab]
url = "{gitlab}"
read_token = "file:{dir}/token"

[gateway]
upstream = "gitlab"
limit = {{ per_client = "1/h" }}

[source.github]
provider = "github"
secret = "file:{dir}/secret"
status = {{ token = "file:{dir}/token", api_url = "{forge}" }}
compare = {{ token = "file:{dir}/token", api_url = "{forge}" }}
catch_up = {{ hook = "{forge}/repos/acme/app/hooks/42", token = "file:{dir}/token", every = "1h" }}

[source.fenced]
provider = "github"
secret = "file:{dir}/secret"
allow_from = ["github", "127.0.0.1"]

[[rule]]
name = "app"
source = "github"
events = ["tag"]
[rule.trigger]
project = "acme/app"
token = "file:{dir}/token"
"#,
        gitlab = gitlab.url(),
        forge = forge.url(),
        dir = dir.path().display(),
    );
    write(dir.path(), "relay.toml", &toml);
    // GitHub's meta where nothing answers: the list's age reads -1 (none known).
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut command = Command::new(common::binary::BIN);
    command.env(
        "HOOKRELAY_GITHUB_META_URL",
        format!("http://{}/meta", closed.local_addr().unwrap()),
    );
    drop(closed);
    let mut served = Served::start_with(command, dir.path(), &dir.path().join("state"));
    served.wait_for("GitHub's webhook addresses could not be read");
    let base = format!("http://{}", served.address());
    let scrape = || async {
        send("GET", &format!("{base}/metrics"), &[], "")
            .await
            .text()
    };

    let fresh = scrape().await;
    assert!(
        fresh.contains("hookrelay_limit_refusals_total{limit=\"[gateway] limit.per_client\"} 0"),
        "a limit that refuses counts from 0: {fresh}"
    );
    let missing = unwritten(&alerts, &fresh);
    assert!(
        missing.is_empty(),
        "the alerts read series a fresh relay does not write: {missing:#?}\n{fresh}"
    );

    // Once a webhook and gateway calls were answered (one refused at a limit), the dashboard
    // has all it reads.
    let reply = signed_github(
        &format!("{base}/hooks/github"),
        SECRET,
        "push",
        "monitoring-1",
        "github/push_tag.json",
    )
    .await;
    assert_eq!(reply.status, 202, "{}", reply.text());
    let reply = send(
        "POST",
        &format!(
            "{base}/api/v4/projects/9/trigger/pipeline?token=glptt-0123456789abcdef0123&ref=main"
        ),
        &[],
        "",
    )
    .await;
    assert_eq!(reply.status, 201, "{}", reply.text());
    // The webhook form, over the caller's limit of one call an hour.
    let reply = send(
        "POST",
        &format!(
            "{base}/api/v4/projects/9/ref/main/trigger/pipeline?token=glptt-0123456789abcdef0123"
        ),
        &[("content-type", "application/json")],
        "{}",
    )
    .await;
    assert_eq!(reply.status, 429, "{}", reply.text());
    let busy = scrape().await;
    let missing = unwritten(&dashboard, &busy);
    assert!(
        missing.is_empty(),
        "the dashboard reads series the relay does not write: {missing:#?}\n{busy}"
    );
    let _ = served.child.kill();
}

/// Grafana places panels on a grid 24 columns wide: each fits, none covers another, ids and
/// query letters are unique, and every query goes to the dashboard's chosen Prometheus.
#[test]
fn the_dashboards_panels_fit_its_grid_and_name_their_data() {
    let panels = dashboard_panels();
    let mut ids = BTreeSet::new();
    let mut cells = BTreeSet::new();
    for panel in &panels {
        let title = panel["title"].as_str().expect("a title");
        assert!(
            ids.insert(panel["id"].as_u64().expect("an id")),
            "{title}: id taken"
        );
        let grid = &panel["gridPos"];
        let [x, y, w, h] = ["x", "y", "w", "h"].map(|k| grid[k].as_u64().expect("gridPos"));
        assert!(x + w <= 24 && w > 0 && h > 0, "{title}: {grid}");
        for cx in x..x + w {
            for cy in y..y + h {
                assert!(
                    cells.insert((cx, cy)),
                    "{title} covers another panel at {cx},{cy}"
                );
            }
        }
        if panel["type"] == "row" {
            continue;
        }
        assert!(
            !panel["description"].as_str().unwrap_or("").is_empty(),
            "{title}: say what it shows"
        );
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no query");
        let mut letters = BTreeSet::new();
        for target in targets {
            assert!(
                letters.insert(target["refId"].as_str().unwrap()),
                "{title}: refId twice"
            );
            assert_eq!(target["datasource"]["uid"], "${datasource}", "{title}");
            let expr = target["expr"].as_str().unwrap();
            assert!(
                expr.contains("instance=~\"$instance\""),
                "{title}: {expr} ignores the relay chosen"
            );
        }
    }
}

#[test]
fn the_rules_load_and_pass_their_cases_in_promtool() {
    let required = std::env::var("HOOKRELAY_REQUIRE_PROMTOOL").is_ok_and(|v| v == "1");
    let Ok(version) = Command::new("promtool").arg("--version").output() else {
        assert!(
            !required,
            "HOOKRELAY_REQUIRE_PROMTOOL=1 but promtool is not installed (Debian: apt-get install prometheus)"
        );
        eprintln!("promtool is not installed: the alerting rules' own cases were not run");
        return;
    };
    assert!(version.status.success());
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // The dashboard's queries, each as a recording rule: `promtool check rules` parses them.
    let scratch = tempfile::tempdir().unwrap();
    let mut recorded = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, query) in dashboard_queries().iter().enumerate() {
        recorded.push_str(&format!(
            "      - record: dashboard_query_{i}\n        expr: {}\n",
            serde_json::to_string(query).unwrap()
        ));
    }
    let queries = scratch.path().join("dashboard-queries.yml");
    std::fs::write(&queries, recorded).unwrap();
    let queries = queries.to_str().unwrap();
    for args in [
        ["check", "rules", ALERTS],
        ["test", "rules", CASES],
        ["check", "rules", queries],
    ] {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(root)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {}:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn selectors_are_read_with_their_matchers() {
    let text = "      - alert: A\n        expr: >-\n          sum(increase(hookrelay_x_total{outcome=~\"a|b\"}[1h])) > 0\n          and hookrelay_y{k=\"v\"} == 0\n        for: 1m\n      - alert: B\n        expr: hookrelay_z > 5\n        labels:\n          severity: hookrelay_not_an_expr\n";
    let found = selectors(text);
    let shown: Vec<String> = found
        .iter()
        .map(|s| format!("{} {:?}", s.name, s.matchers))
        .collect();
    assert_eq!(
        shown,
        [
            "hookrelay_x_total [(\"outcome\", [\"a\", \"b\"])]",
            "hookrelay_y [(\"k\", [\"v\"])]",
            "hookrelay_z []",
        ]
    );
}
