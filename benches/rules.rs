//! Matching cost as rules grow: 10, 1,000 and 10,000 rules, of which one matches.
//! The others are rules for other sources, or for the same source but other repositories,
//! the two ways a large installation grows. And what path filters cost: a monorepo's 50
//! services, each a rule with `paths`, against pushes of 10 to 100,000 changed files, beside
//! the same rules without `paths`. Run: `cargo bench --bench rules`.

use std::hint::black_box;
use std::path::PathBuf;
use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use hookrelay::event::{Commit, CommitFiles, EventContext, EventKind, Provider, RefChange};
use hookrelay::rules::{Patterns, RuleSet, RuleSpec, TriggerSpec};
use hookrelay::secret::{Secret, SecretRef};

fn rule(name: String, source: &str, repository: &str) -> RuleSpec {
    RuleSpec {
        name,
        file: PathBuf::from("bench.toml"),
        line: 1,
        sources: vec![source.to_owned()],
        repository: Some(Patterns::new(vec![repository.to_owned()]).unwrap()),
        events: vec![EventKind::Push, EventKind::Tag],
        refs: Some(Patterns::new(vec!["main".into(), "release/*".into()]).unwrap()),
        refs_exclude: None,
        paths: None,
        paths_exclude: None,
        skip_ci: true,
        when: None,
        schedule: None,
        coalesce: None,
        triggers: vec![TriggerSpec {
            line: 1,
            upstream: "gitlab".into(),
            project: "acme/{{ event.repository | replace('/', '-') }}".into(),
            git_ref: None,
            token_ref: SecretRef::Env("TOKEN".into()),
            token: Some(Secret::new("glptt-bench")),
            variables: vec![("SHA".into(), "{{ event.after }}".into())],
            inputs: Vec::new(),
            status_context: None,
            lines: Default::default(),
        }],
    }
}

fn rules(count: usize, others_on_same_source: bool) -> RuleSet {
    let mut specs: Vec<RuleSpec> = (1..count)
        .map(|i| {
            if others_on_same_source {
                rule(format!("r{i}"), "github", &format!("other/repo-{i}"))
            } else {
                rule(format!("r{i}"), &format!("source-{i}"), "acme/app")
            }
        })
        .collect();
    specs.push(rule("match".into(), "github", "acme/app"));
    RuleSet::build(specs).unwrap()
}

fn bench_rules(c: &mut Criterion) {
    let context = EventContext {
        provider: Provider::Github,
        source: "github".into(),
        delivery: "d".into(),
        repository: "acme/app".into(),
        repository_url: String::new(),
        repository_web_url: String::new(),
        pusher: "me".into(),
        payload: Arc::new(hookrelay::event::Payload::empty()),
    };
    let event = context
        .event(RefChange {
            full_ref: "refs/heads/main".into(),
            before: "a".repeat(40),
            after: "b".repeat(40),
            ..RefChange::default()
        })
        .unwrap();
    for (group_name, same_source) in [
        ("plan/others_on_other_sources", false),
        ("plan/others_on_other_repositories", true),
    ] {
        let mut group = c.benchmark_group(group_name);
        for count in [10, 1_000, 10_000] {
            let set = rules(count, same_source);
            assert_eq!(set.plan(&event, None).len(), 1);
            group.bench_with_input(BenchmarkId::from_parameter(count), &set, |b, set| {
                b.iter(|| black_box(set.plan(black_box(&event), None)))
            });
        }
        group.finish();
    }
}

/// A monorepo's service rule: `services/svc-N/**` and the shared `libs/**`, never a
/// Markdown file; or the same rule without path filters.
fn service_rule(index: usize, with_paths: bool) -> RuleSpec {
    let patterns = |texts: &[String]| Some(Patterns::new(texts.to_vec()).unwrap());
    RuleSpec {
        paths: with_paths
            .then(|| patterns(&[format!("services/svc-{index}/**"), "libs/**".into()]))
            .flatten(),
        paths_exclude: with_paths.then(|| patterns(&["**/*.md".into()])).flatten(),
        ..rule(format!("svc-{index}"), "github", "acme/mono")
    }
}

fn bench_paths(c: &mut Criterion) {
    let context = EventContext {
        provider: Provider::Github,
        source: "github".into(),
        delivery: "d".into(),
        repository: "acme/mono".into(),
        repository_url: String::new(),
        repository_web_url: String::new(),
        pusher: "me".into(),
        payload: Arc::new(hookrelay::event::Payload::empty()),
    };
    // A push whose commits touch `files` paths under services 0–9 (so 10 rules match),
    // in commits of at most 1,000 files each.
    let push = |files: usize| {
        let paths: Vec<String> = (0..files)
            .map(|i| format!("services/svc-{}/src/module-{i}/file.rs", i % 10))
            .collect();
        let commits: Vec<Commit> = paths
            .chunks(1000)
            .enumerate()
            .map(|(n, chunk)| Commit {
                id: format!("{n:040x}"),
                files: Some(Arc::new(CommitFiles {
                    modified: chunk.to_vec(),
                    ..CommitFiles::default()
                })),
                ..Commit::default()
            })
            .collect();
        context
            .event(RefChange {
                full_ref: "refs/heads/main".into(),
                before: "a".repeat(40),
                after: "b".repeat(40),
                commits,
                ..RefChange::default()
            })
            .unwrap()
    };
    let mut group = c.benchmark_group("plan/monorepo_of_50_services");
    for with_paths in [false, true] {
        let set = RuleSet::build((0..50).map(|i| service_rule(i, with_paths)).collect()).unwrap();
        for files in [10, 1_000, 10_000] {
            let event = push(files);
            let expected = if with_paths { 10 } else { 50 };
            assert_eq!(set.plan(&event, None).len(), expected);
            let name = if with_paths { "paths" } else { "no_paths" };
            group.bench_with_input(BenchmarkId::new(name, files), &event, |b, event| {
                b.iter(|| black_box(set.plan(black_box(event), None)))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench_rules, bench_paths);
criterion_main!(benches);
