//! The alerting rules shipped in `deploy/prometheus/` read series the relay really writes:
//! every `hookrelay_…` name and every label value they match on is in the `/metrics` of a
//! relay just started (so an alert on a counter's first increase can fire), and, where
//! Prometheus's `promtool` is installed, the rules load and pass their own test cases.
//!
//! Where `promtool` is missing that part says so and returns; CI installs Debian's
//! `prometheus` package and sets `HOOKRELAY_REQUIRE_PROMTOOL=1`, which turns that into a
//! failure.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use common::binary::{Served, write};
use common::{RecordingUpstream, send};

const ALERTS: &str = "deploy/prometheus/hookrelay-alerts.yml";
const CASES: &str = "deploy/prometheus/hookrelay-alerts.test.yml";

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
async fn every_alert_reads_series_a_fresh_relay_writes() {
    let rules_text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(ALERTS))
        .expect("the shipped alerts");
    let wanted = selectors(&rules_text);
    assert!(wanted.len() >= 15, "read the alerts' selectors: {wanted:?}");

    // A relay with a source of every kind an alert reads: statuses, compares, catch-up,
    // polled pipelines. The forge and GitLab are recording stand-ins; nothing is sent.
    let forge = RecordingUpstream::start().await;
    let gitlab = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "token", "forge-token-for-the-tests");
    write(dir.path(), "secret", "s3cret-for-the-tests");
    let toml = format!(
        r#"[upstream.gitlab]
url = "{gitlab}"
read_token = "file:{dir}/token"

[source.github]
provider = "github"
secret = "file:{dir}/secret"
status = {{ token = "file:{dir}/token", api_url = "{forge}" }}
compare = {{ token = "file:{dir}/token", api_url = "{forge}" }}
catch_up = {{ hook = "{forge}/repos/acme/app/hooks/42", token = "file:{dir}/token", every = "1h" }}

[[rule]]
name = "app"
source = "github"
paths = ["src/**"]
[rule.trigger]
project = "acme/app"
token = "file:{dir}/token"
"#,
        gitlab = gitlab.url(),
        forge = forge.url(),
        dir = dir.path().display(),
    );
    write(dir.path(), "relay.toml", &toml);
    let mut served = Served::start(dir.path(), &dir.path().join("state"));
    served.wait_for("hookrelay listening");
    let scrape = send(
        "GET",
        &format!("http://{}/metrics", served.address()),
        &[],
        "",
    )
    .await
    .text();
    let written = series(&scrape);

    let mut missing = Vec::new();
    for selector in &wanted {
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
            for value in values {
                let pair = format!("{label}=\"{value}\"");
                if !of_name.iter().any(|labels| labels.contains(&pair)) {
                    missing.push(format!("{}{{{pair}}}", selector.name));
                }
            }
        }
    }
    assert!(
        missing.is_empty(),
        "the alerts read series a fresh relay does not write: {missing:#?}\n{scrape}"
    );
    let _ = served.child.kill();
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
    for args in [["check", "rules", ALERTS], ["test", "rules", CASES]] {
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
