//! The configuration loader's tests: every section, every problem, with its line.

use super::*;

fn load_text(files: &[(&str, &str)], env: &[(&str, &str)]) -> Result<Config, Problems> {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let lookup = move |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    let prefix = format!("{}/", dir.path().display());
    load_with_env(dir.path(), &lookup).map_err(|problems| {
        // Strip the temporary folder so messages compare stably.
        Problems(
            problems
                .0
                .into_iter()
                .map(|mut p| {
                    p.file = PathBuf::from(p.file.file_name().unwrap());
                    p.message = p.message.replace(&prefix, "");
                    p
                })
                .collect(),
        )
    })
}

fn messages(result: Result<Config, Problems>) -> Vec<String> {
    result
        .unwrap_err()
        .0
        .iter()
        .map(ToString::to_string)
        .collect()
}

/// Each of `found` starts with the `expected` at its place, and there are as many.
fn assert_each_starts_with(found: &[String], expected: &[&str]) {
    for (one, expected) in found.iter().zip(expected) {
        assert!(
            one.starts_with(expected),
            "{one:?} should start with {expected:?}"
        );
    }
    assert_eq!(found.len(), expected.len(), "{found:#?}");
}

#[test]
fn a_complete_configuration() {
    let config = load_text(
        &[(
            "a.toml",
            r#"
[server]
listen = "127.0.0.1:9000"
max_body = "1MiB"

[upstream.gitlab]
url = "https://gitlab.example.com/"
timeout = "10s"

[gateway]
upstream = "gitlab"
"#,
        )],
        &[],
    )
    .unwrap();
    assert_eq!(config.server.listen.to_string(), "127.0.0.1:9000");
    assert_eq!(config.server.max_body, 1 << 20);
    let upstream = &config.upstreams["gitlab"];
    assert_eq!(upstream.url.to_string(), "https://gitlab.example.com/");
    assert_eq!(upstream.timeout, Duration::from_secs(10));
    let gateway = config.gateway.unwrap();
    assert_eq!(gateway.upstream, "gitlab");
    assert_eq!(gateway.per_project, None);
    assert_eq!(upstream.per_project, default_per_project());
}

#[test]
fn every_problem_in_every_file_with_its_line() {
    let problems = messages(load_text(
        &[
            (
                "a.toml",
                "[server]\nlisten = \"nowhere\"\nmax_body = \"lots\"\n",
            ),
            (
                "b.toml",
                "[upstream.gitlab]\nurl = \"ftp://x\"\ncolour = \"red\"\n\n[gateway]\nupstream = \"gitlab\"\n",
            ),
            (
                "c.toml",
                "[upstream.other]\nurl = \"https://x\"\n[gateway]\nupstream = \"nope\"\n[mystery]\n",
            ),
        ],
        &[],
    ));
    // [gateway] names [upstream.gitlab], which has problems of its own: those are all.
    assert_eq!(problems.len(), 5, "{problems:#?}");
    let expected = [
        "a.toml:2: listen: \"nowhere\" is not an address",
        "a.toml:3: max_body:",
        "b.toml:3: unknown field `colour`",
        "c.toml:3: [gateway] is already defined at",
        "c.toml:5: unknown section `mystery`",
    ];
    for (problem, expected) in problems.iter().zip(expected) {
        assert!(
            problem.starts_with(expected),
            "{problem:?} should start with {expected:?}"
        );
    }
}

#[test]
fn event_loops_default_to_one_per_core_and_are_bounded() {
    let server = |text: &str| load_text(&[("a.toml", text)], &[]);
    assert_eq!(server("[server]\n").unwrap().server.event_loops, None);
    assert_eq!(
        server("[server]\nevent_loops = 0\n")
            .unwrap()
            .server
            .event_loops,
        Some(0)
    );
    assert_eq!(
        server("[server]\nevent_loops = 3\n")
            .unwrap()
            .server
            .event_loops,
        Some(3)
    );
    for wrong in ["-1", "65"] {
        let problems = messages(server(&format!("[server]\nevent_loops = {wrong}\n")));
        assert_eq!(
            problems,
            [
                "a.toml:2: event_loops must be between 0 (tokio's shared workers) and 64; leave it out for one per core"
            ]
        );
    }
}

#[test]
fn syntax_errors_are_located() {
    let problems = messages(load_text(&[("a.toml", "[server]\nlisten = \n")], &[]));
    assert!(problems[0].starts_with("a.toml:2: "), "{problems:?}");
}

#[test]
fn environment_overrides_the_upstream_url_and_is_validated() {
    let file = [(
        "a.toml",
        "[upstream.my-gitlab]\nurl = \"https://a.example\"\n",
    )];
    let config = load_text(
        &file,
        &[("HOOKRELAY_UPSTREAM_MY_GITLAB_URL", "http://127.0.0.1:1")],
    )
    .unwrap();
    assert_eq!(
        config.upstreams["my-gitlab"].url.to_string(),
        "http://127.0.0.1:1/"
    );
    let problems = messages(load_text(
        &file,
        &[("HOOKRELAY_UPSTREAM_MY_GITLAB_URL", "nope")],
    ));
    assert!(
        problems[0].contains("(from HOOKRELAY_UPSTREAM_MY_GITLAB_URL)"),
        "{problems:?}"
    );
}

#[test]
fn gateway_defaults_to_the_only_upstream() {
    let config = load_text(
        &[("a.toml", "[upstream.gl]\nurl = \"https://x\"\n[gateway]\n")],
        &[],
    )
    .unwrap();
    assert_eq!(config.gateway.unwrap().upstream, "gl");
    let problems = messages(load_text(&[("a.toml", "[gateway]\n")], &[]));
    assert!(
        problems[0].contains("needs an [upstream.NAME]"),
        "{problems:?}"
    );
}

#[test]
fn duplicate_upstreams_across_files() {
    let problems = messages(load_text(
        &[
            ("a.toml", "[upstream.gl]\nurl = \"https://x\"\n"),
            ("b.toml", "\n[upstream.gl]\nurl = \"https://y\"\n"),
        ],
        &[],
    ));
    assert_eq!(
        problems,
        ["b.toml:2: [upstream.gl] is already defined at a.toml:1"]
    );
}

#[test]
fn an_empty_folder_is_a_problem() {
    let dir = tempfile::tempdir().unwrap();
    let problems = load(dir.path()).unwrap_err();
    assert!(problems.to_string().contains("contains no *.toml files"));
}

#[test]
fn a_secret_being_rotated_is_a_list_of_two() {
    let text = "[source.gh]\nprovider = \"github\"\nsecret = [\"env:NEW\", \"env:OLD\"]\n";
    let env = [
        ("NEW", "the-new-secret-0123456789"),
        ("OLD", "the-old-secret-0123456789"),
    ];
    let config = load_text(&[("a.toml", text)], &env).unwrap();
    let secrets: Vec<&str> = config.sources["gh"]
        .secrets
        .iter()
        .map(|s| s.expose())
        .collect();
    assert_eq!(
        secrets,
        ["the-new-secret-0123456789", "the-old-secret-0123456789"]
    );
    // Each is checked as one alone would be; an empty list names the setting.
    let problems = messages(load_text(&[("a.toml", text)], &[("NEW", "short"), env[1]]));
    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert!(
        problems[0].starts_with("a.toml:3: source.gh.secret: the secret is 5 bytes"),
        "{problems:?}"
    );
    let problems = messages(load_text(
        &[(
            "a.toml",
            "[source.gh]\nprovider = \"github\"\nsecret = []\n",
        )],
        &env,
    ));
    assert_eq!(
        problems,
        [
            "a.toml:3: source.gh.secret is an empty list; name it (while rotating it, the new one and then the old)"
        ]
    );
}

#[test]
fn sources_resolve_their_secrets_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("gh-secret");
    std::fs::write(&secret, "s3cret-s3cret-s3cret\n").unwrap();
    let text = format!(
        "[source.gh]\nprovider = \"github\"\nsecret = \"file:{}\"\n[source.gl]\nprovider = \"gitlab\"\nsecret = \"env:GL_TOKEN\"\nsigning_secret = \"env:GL_SIGNING\"\n",
        secret.display()
    );
    let config = load_text(
        &[("a.toml", &text)],
        &[
            ("GL_TOKEN", "a-gitlab-token-of-32-characters!"),
            ("GL_SIGNING", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
        ],
    );
    let config = config.unwrap();
    assert_eq!(
        config.sources["gh"].secrets[0].expose(),
        "s3cret-s3cret-s3cret"
    );
    assert_eq!(
        config.sources["gl"].secrets[0].expose(),
        "a-gitlab-token-of-32-characters!"
    );
    // Too short, or only whitespace: refused where it is configured.
    for (value, expected) in [
        (
            "short",
            "the secret is 5 bytes; a webhook secret needs at least 16",
        ),
        ("                    ", "the secret is only whitespace"),
    ] {
        let problems = messages(load_text(
            &[("a.toml", &text)],
            &[
                ("GL_TOKEN", value),
                ("GL_SIGNING", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
            ],
        ));
        assert_eq!(problems.len(), 1, "{problems:#?}");
        assert!(
            problems[0].starts_with("a.toml:6: source.gl.secret: ")
                && problems[0].contains(expected),
            "{problems:?}"
        );
    }
    assert!(config.sources["gl"].signing_keys.len() == 1);
    let problems = messages(load_text(&[("a.toml", &text)], &[]));
    assert_eq!(problems.len(), 2, "{problems:#?}");
    assert!(
        problems[0].starts_with(
            "a.toml:6: source.gl.secret (env:GL_TOKEN): environment variable GL_TOKEN is not set"
        ),
        "{problems:?}"
    );
}

#[test]
fn source_problems_are_specific() {
    let problems = messages(load_text(
        &[(
            "a.toml",
            r#"[source.a]
provider = "githab"

[source.b]
provider = "github"
secret = "hunter2"

[source.c]
provider = "gitlab"
allow_sha1 = true
secret = "file:/nonexistent/secret"

[source.d]
provider = "gitea"

[source.e]
provider = "generic"
signature = { scheme = "token" }
secret = "file:/nonexistent/secret"

[source."bad name"]
provider = "github"
allow_unsigned = true

[source.f]
provider = "generic"
allow_unsigned = true
paths = { repository = "", ref = "change..ref", after = "changes[0].sha", pusher = "who.name" }
"#,
        )],
        &[],
    ));
    let expected = [
        "a.toml:2: source.a.provider: \"githab\" is not one of",
        "a.toml:6: source.b.secret: a secret must be written `env:NAME` or `file:PATH`",
        "a.toml:10: source.c.allow_sha1 applies only to provider github, not gitlab",
        "a.toml:11: source.c.secret (file:/nonexistent/secret): cannot read secret file",
        "a.toml:14: source.d has no way to check who sent a webhook",
        "a.toml:18: source.e.signature: a token needs `header",
        "a.toml:19: source.e.secret (file:/nonexistent/secret): cannot read secret file",
        "a.toml:21: source name \"bad name\" may use only",
        "a.toml:28: source.f.paths.repository: \"\" is empty; a path is the payload's keys joined by dots",
        "a.toml:28: source.f.paths.ref: \"change..ref\" has an empty part",
        "a.toml:28: source.f.paths.after: \"changes[0].sha\" has brackets; an array's item is its index as a part (`changes.0.ref`)",
    ];
    assert_each_starts_with(&problems, &expected);
}

#[test]
fn unsigned_sources_must_say_so() {
    let config = load_text(
        &[(
            "a.toml",
            "[source.open]\nprovider = \"bitbucket-server\"\nallow_unsigned = true\n",
        )],
        &[],
    )
    .unwrap();
    assert!(config.sources["open"].allow_unsigned);
}

#[test]
fn rule_names_are_unique_across_files() {
    let rule = "[[rule]]\nname = \"x\"\nschedule = \"0 * * * *\"\n[rule.trigger]\nproject = \"9\"\nref = \"main\"\ntoken = \"env:T\"\n";
    let problems = messages(load_text(
        &[
            (
                "a.toml",
                &format!("[upstream.gl]\nurl = \"https://x\"\n{rule}"),
            ),
            ("b.toml", rule),
        ],
        &[("T", "glptt-x")],
    ));
    assert_eq!(
        problems,
        ["b.toml:1: rule name \"x\" is already used at a.toml:3"]
    );
}

#[test]
fn limits_are_checked_where_they_are_written() {
    let problems = messages(load_text(
        &[(
            "a.toml",
            "[upstream.gl]\nurl = \"https://x\"\nlimit = { per_project = \"fast\" }\n\n\
             [gateway]\nlimit = { rate = \"1/s\" }\ntrusted_proxies = [\"proxy\"]\n\n\
             [source.s]\nprovider = \"github\"\nallow_unsigned = true\nlimit = { rate = \"2/min\", on_limit = \"later\" }\n",
        )],
        &[],
    ));
    let expected = [
        "a.toml:3: [upstream.gl] limit.per_project: \"fast\" is not a rate",
        "a.toml:6: [gateway] limit.rate is not a setting here; use per_project, per_client, per_token",
        "a.toml:7: [gateway] trusted_proxies: \"proxy\" is not an IP address or network",
        "a.toml:12: [source.s] limit.on_limit: \"later\" is not \"reject\" or \"queue\"",
    ];
    assert_each_starts_with(&problems, &expected);
}

#[test]
fn settings_that_cannot_work_are_refused_where_they_are_written() {
    let problems = messages(load_text(
        &[(
            "a.toml",
            "[server]\nread_timeout = \"0s\"\nmax_body = \"0\"\nack_timeout = \"soon\"\n\n\
             [upstream.gl]\nurl = \"https://x\"\ntimeout = \"0s\"\nconnect_timeout = \"1ms\"\npoll_interval = \"0s\"\n\n\
             [delivery]\nretry_base = \"0s\"\nretry_cap = \"50ms\"\nretention = \"18446744073709551615s\"\n\n\
             [source.s]\nprovider = \"gitlab\"\nallow_unsigned = true\ntimestamp_tolerance = \"0s\"\n",
        )],
        &[],
    ));
    let expected = [
        "a.toml:2: read_timeout: \"0s\" is too short: at least 100ms",
        "a.toml:3: max_body: \"0\" is too small for any webhook: at least 1KiB",
        "a.toml:4: ack_timeout: \"soon\" is not a duration (expected number at 0); write e.g. \"30s\" or \"5m\"",
        "a.toml:8: upstream.gl.timeout: \"0s\" is too short: at least 100ms",
        "a.toml:9: upstream.gl.connect_timeout: \"1ms\" is too short: at least 100ms",
        "a.toml:10: upstream.gl.poll_interval: \"0s\" is too short: at least 100ms",
        "a.toml:13: delivery.retry_base: \"0s\" is too short: at least 10ms",
        "a.toml:14: delivery.retry_cap: \"50ms\" is too short: at least 100ms",
        "a.toml:15: delivery.retention: \"18446744073709551615s\" is longer than 100 years, the longest duration hookrelay takes",
        "a.toml:20: source.s.timestamp_tolerance: \"0s\" is too short: at least 1s",
    ];
    assert_eq!(problems, expected, "{problems:#?}");
    // What is meant, and long, is taken: never retry, keep nothing, keep for a century.
    let config = load_text(
        &[(
            "a.toml",
            "[delivery]\nmax_age = \"0s\"\nretention = \"100y\"\n",
        )],
        &[],
    )
    .unwrap();
    assert_eq!(config.delivery.retry.max_age, Duration::ZERO);
    assert_eq!(config.delivery.retention, LONGEST_DURATION);
}

#[test]
fn a_triggers_variables_are_strings_and_its_project_may_be_a_number() {
    let rule = |project: &str, variables: &str| {
        format!(
            "[upstream.gl]\nurl = \"https://x\"\n\n[[rule]]\nname = \"nightly\"\nschedule = \"0 3 * * *\"\n\
             [rule.trigger]\nproject = {project}\nref = \"main\"\ntoken = \"env:T\"\nvariables = {variables}\n"
        )
    };
    let env = [("T", "glptt-0123456789abcdefghij")];
    let problems = messages(load_text(
        &[(
            "a.toml",
            &rule(
                "\"a/b\"",
                "{ RETRIES = 3, DEBUG = true, HOSTS = [\"a\"], OK = \"x\" }",
            ),
        )],
        &env,
    ));
    // Each wrong value at its line, and nothing about the rule having no trigger.
    assert_eq!(
        problems,
        [
            "a.toml:11: rule \"nightly\": variables.DEBUG is a boolean; GitLab's variables are strings: write DEBUG = \"true\"",
            "a.toml:11: rule \"nightly\": variables.HOSTS is a list; GitLab's variables are strings: join it into one string, or render it in a template",
            "a.toml:11: rule \"nightly\": variables.RETRIES is a number; GitLab's variables are strings: write RETRIES = \"3\"",
        ],
        "{problems:#?}"
    );
    let problems = messages(load_text(&[("a.toml", &rule("0", "{}"))], &env));
    assert_eq!(
        problems,
        [
            "a.toml:8: rule \"nightly\": project = 0 is neither a project's path (\"group/app\") nor its numeric id"
        ]
    );
    let config = load_text(&[("a.toml", &rule("1234", "{ OK = \"x\" }"))], &env).unwrap();
    let trigger = &config.rules.rules()[0].spec.triggers[0];
    assert_eq!(trigger.project, "1234");
    assert_eq!(trigger.variables, [("OK".to_owned(), "x".to_owned())]);
}

#[test]
fn upstream_urls() {
    assert!(parse_upstream_url("https://gitlab.com").is_ok());
    assert_eq!(
        parse_upstream_url("https://x.org/gitlab/")
            .unwrap()
            .to_string(),
        "https://x.org/gitlab"
    );
    assert!(parse_upstream_url("gitlab.com").is_err());
    assert!(parse_upstream_url("https://x.org/?a=1").is_err());
}

/// An API client's base URL (`…/api/v4`) as an upstream would call `/api/v4/api/v4/…` and
/// read GitLab's `404` as a bad token: the ending is taken off, a relative root kept.
#[test]
fn an_upstream_url_ending_in_the_api_path_is_gitlabs_own() {
    for (url, used) in [
        (
            "https://gitlab.example.com/api/v4",
            "https://gitlab.example.com",
        ),
        (
            "https://gitlab.example.com/api/v4/",
            "https://gitlab.example.com",
        ),
        ("https://x.org/gitlab/api/v4", "https://x.org/gitlab"),
        // A relative root that merely looks like the API's path is GitLab's own.
        ("https://x.org/api", "https://x.org/api"),
        ("https://x.org/api/v4-gitlab", "https://x.org/api/v4-gitlab"),
    ] {
        let text = format!(
            "[upstream.gitlab]\nurl = \"{url}\"\n[source.s]\nprovider = \"generic\"\nallow_unsigned = true\n"
        );
        let config = load_text(&[("a.toml", &text)], &[]).unwrap();
        assert_eq!(
            config.upstreams["gitlab"].url,
            parse_upstream_url(used).unwrap(),
            "{url}"
        );
    }
}

#[test]
fn the_store_is_checked_where_it_is_written_and_never_shows_a_password() {
    let upstream = "[upstream.gitlab]\nurl = \"https://gitlab.example\"\ntimeout = \"30s\"\n";
    let found = messages(load_text(
        &[
            ("a.toml", upstream),
            (
                "store.toml",
                "[store]\nurl = \"postgres://hr:hunter2@db/hr\"\nlease = \"10s\"\npassword = \"hunter2\"\n",
            ),
        ],
        &[],
    ));
    assert_eq!(found.len(), 2, "{found:#?}");
    assert!(
        found[0].starts_with("store.toml:2: store.url: a password does not belong in a file"),
        "{found:#?}"
    );
    assert!(
        found[1].starts_with("store.toml:4: store.password: a secret must be written"),
        "{found:#?}"
    );
    assert!(found.iter().all(|m| !m.contains("hunter2")), "{found:#?}");

    let found = messages(load_text(
        &[
            ("a.toml", upstream),
            (
                "store.toml",
                "[store]\nurl = \"postgres://hr@db/hr\"\nlease = \"10s\"\n",
            ),
        ],
        &[],
    ));
    assert!(found[0].starts_with("store.toml:1: store.lease (10s) must be at least 1s longer than upstream.gitlab.timeout (30s)"), "{found:#?}");

    let found = messages(load_text(
        &[
            ("a.toml", upstream),
            ("store.toml", "[store]\nurl = \"mysql://db/hr\"\n"),
        ],
        &[],
    ));
    assert!(found[0].contains("is not a PostgreSQL URL"), "{found:#?}");

    // The environment may carry the password, and sets the URL without a [store].
    let config = load_text(
        &[("a.toml", upstream)],
        &[("HOOKRELAY_STORE_URL", "postgres://hr:hunter2@db/hr")],
    )
    .unwrap();
    let store = config.store.unwrap();
    assert_eq!(store.describe(), "postgres://hr:…@db/hr");
    assert!(!format!("{store:?}").contains("hunter2"), "{store:?}");
    let config = load_text(
        &[
            ("a.toml", upstream),
            (
                "store.toml",
                "[store]\nurl = \"postgres://hr@db/hr\"\npassword = \"env:DB_PASSWORD\"\n",
            ),
        ],
        &[("DB_PASSWORD", "hunter2")],
    )
    .unwrap();
    assert_eq!(
        config.store.unwrap().lease,
        crate::store::postgres::DEFAULT_LEASE
    );
    let found = messages(load_text(
        &[
            ("a.toml", upstream),
            (
                "store.toml",
                "[store]\nurl = \"postgres://hr@db/hr\"\npassword = \"env:DB_PASSWORD\"\n",
            ),
        ],
        &[],
    ));
    assert!(
        found[0].contains(
            "store.password (env:DB_PASSWORD): environment variable DB_PASSWORD is not set"
        ),
        "{found:#?}"
    );
}

const GITHUB_AND_GITLAB: &str = "[upstream.gitlab]\nurl = \"https://gitlab.example.com\"\n\
    [source.github]\nprovider = \"github\"\nsecret = \"env:S\"\n\
    [source.other]\nprovider = \"generic\"\nsignature = { scheme = \"token\", header = \"X-Token\" }\nsecret = \"env:S\"\n";
const SECRETS: &[(&str, &str)] = &[("S", "0123456789abcdef0123"), ("T", "glptt-0123456789")];

fn warnings(config: &Config) -> Vec<String> {
    config
        .warnings
        .iter()
        .map(|w| {
            format!(
                "{}:{}: {}",
                w.file.file_name().unwrap().to_string_lossy(),
                w.line.unwrap(),
                w.message
            )
        })
        .collect()
}

#[test]
fn rules_that_cannot_match_are_warned_about_and_still_load() {
    let rules = r#"[[rule]]
name = "full-refs"
source = "github"
refs = ["refs/heads/main", "v*"]
refs_exclude = "refs/tags/v0*"
[rule.trigger]
project = "acme%2Fapp-a"
ref = "release%2F1.0"
token = "env:T"

[[rule]]
name = "url"
source = "github"
repository = ["https://github.com/acme/app", "acme/app.git"]
events = ["delete"]
[rule.trigger]
project = "acme/app"
token = "env:T"

[[rule]]
name = "clone"
source = "github"
[rule.trigger]
project = "git@gitlab.example.com:acme/app.git"
ref = "main"
token = "env:T"
"#;
    let config = load_text(&[("a.toml", GITHUB_AND_GITLAB), ("b.toml", rules)], SECRETS).unwrap();
    let found = warnings(&config);
    let expected = [
        "b.toml:4: rule \"full-refs\": refs: \"refs/heads/main\" is a full ref name, but refs are matched by their short name (`main`, `v1.2`), so it never matches; write \"main\"",
        "b.toml:5: rule \"full-refs\": refs_exclude: \"refs/tags/v0*\" is a full ref name",
        "b.toml:7: rule \"full-refs\": project \"acme%2Fapp-a\" looks URL-encoded; hookrelay encodes it when sending, so it would reach GitLab encoded twice; write \"acme/app-a\"",
        "b.toml:8: rule \"full-refs\": ref \"release%2F1.0\" looks URL-encoded",
        "b.toml:14: rule \"url\": repository: \"https://github.com/acme/app\" never matches",
        "b.toml:14: rule \"url\": repository: \"acme/app.git\" never matches",
        "b.toml:17: rule \"url\": the rule reacts to `delete` but its trigger has no `ref`",
        "b.toml:24: rule \"clone\": project \"git@gitlab.example.com:acme/app.git\" is written as a clone address, but GitLab knows a project by its path (never ending in `.git`), so it would answer 404; write \"acme/app\"",
    ];
    assert_each_starts_with(&found, &expected);
}

#[test]
fn path_filters_load_and_say_where_they_cannot_work() {
    let rules = r#"[[rule]]
name = "api"
source = "github"
paths = ["services/api/**", "/libs/**", "docs/"]
paths_exclude = "**/*.md"
[rule.trigger]
project = "acme/api"
token = "env:T"

[[rule]]
name = "tags-only"
source = "github"
events = ["tag"]
paths_exclude = ["docs/**"]
[rule.trigger]
project = "acme/api"
token = "env:T"
"#;
    let config = load_text(&[("a.toml", GITHUB_AND_GITLAB), ("b.toml", rules)], SECRETS).unwrap();
    assert_eq!(
        warnings(&config),
        [
            "b.toml:4: rule \"api\": paths: \"/libs/**\" matches no file: paths are matched from the repository's root without a leading `/`; write \"libs/**\"",
            "b.toml:4: rule \"api\": paths: \"docs/\" matches no file: a path names a file, never a folder; write \"docs/**\" for every file beneath it",
            "b.toml:14: rule \"tags-only\": `paths_exclude` applies to branch pushes only, and the rule reacts to none (tags and deletions change no files, so they run whatever `paths_exclude` says)",
        ]
    );
    let api = &config.rules.rules()[0].spec;
    assert_eq!(
        api.paths.as_ref().unwrap().texts,
        ["services/api/**", "/libs/**", "docs/"]
    );
    assert_eq!(api.paths_exclude.as_ref().unwrap().texts, ["**/*.md"]);

    let bad = |line: &str| {
        let rule = format!(
            "[[rule]]\nname = \"r\"\nsource = \"github\"\n{line}\n[rule.trigger]\nproject = \"a/b\"\ntoken = \"env:T\"\n"
        );
        messages(load_text(
            &[("a.toml", GITHUB_AND_GITLAB), ("b.toml", &rule)],
            SECRETS,
        ))
    };
    assert_eq!(
        bad("paths = []"),
        ["b.toml:4: rule \"r\": `paths` is an empty list; leave it out to match everything"]
    );
    assert_eq!(
        bad("paths_exclude = [\"a/[b\"]"),
        [
            "b.toml:4: rule \"r\": paths_exclude: \"a/[b\" is not a valid glob: unclosed character class; missing ']'"
        ]
    );
    assert_eq!(
        bad("paths = [\"\"]"),
        ["b.toml:4: rule \"r\": paths: an empty name matches nothing; leave it out"]
    );
    let scheduled = "[[rule]]\nname = \"nightly\"\nschedule = \"0 3 * * *\"\npaths = [\"src/**\"]\n\
                     [rule.trigger]\nproject = \"a/b\"\nref = \"main\"\ntoken = \"env:T\"\n";
    assert_eq!(
        messages(load_text(
            &[("a.toml", GITHUB_AND_GITLAB), ("b.toml", scheduled)],
            SECRETS
        )),
        [
            "b.toml:4: rule \"nightly\": `paths` filters a push's changed files, and a scheduled rule has none; leave it out"
        ]
    );
}

#[test]
fn skip_ci_is_on_unless_a_rule_turns_it_off_and_only_for_pushes() {
    let rules = r#"[[rule]]
name = "builds"
source = "github"
[rule.trigger]
project = "acme/app"
token = "env:T"

[[rule]]
name = "mirror"
source = "github"
skip_ci = false
[rule.trigger]
project = "acme/mirror"
token = "env:T"

[[rule]]
name = "releases"
source = "github"
events = ["tag"]
skip_ci = false
[rule.trigger]
project = "acme/app"
token = "env:T"
"#;
    let config = load_text(&[("a.toml", GITHUB_AND_GITLAB), ("b.toml", rules)], SECRETS).unwrap();
    let skip: Vec<bool> = config
        .rules
        .rules()
        .iter()
        .map(|r| r.spec.skip_ci)
        .collect();
    assert_eq!(skip, [true, false, false]);
    assert_eq!(
        warnings(&config),
        [
            "b.toml:20: rule \"releases\": `skip_ci` applies to branch pushes only, and the rule reacts to none (tags and deletions run whatever their commit says)"
        ]
    );
    let scheduled = "[[rule]]\nname = \"nightly\"\nschedule = \"0 3 * * *\"\nskip_ci = true\n\
                     [rule.trigger]\nproject = \"a/b\"\nref = \"main\"\ntoken = \"env:T\"\n";
    assert_eq!(
        messages(load_text(
            &[("a.toml", GITHUB_AND_GITLAB), ("b.toml", scheduled)],
            SECRETS
        )),
        [
            "b.toml:4: rule \"nightly\": `skip_ci` reads a push's commit message, and a scheduled rule has none; leave it out"
        ]
    );
    let wrong = "[[rule]]\nname = \"r\"\nsource = \"github\"\nskip_ci = \"no\"\n\
                 [rule.trigger]\nproject = \"a/b\"\ntoken = \"env:T\"\n";
    let found = messages(load_text(
        &[("a.toml", GITHUB_AND_GITLAB), ("b.toml", wrong)],
        SECRETS,
    ));
    assert_eq!(found.len(), 1, "{found:#?}");
    assert!(found[0].starts_with("b.toml:4"), "{found:#?}");
}

#[test]
fn a_schedule_no_date_matches_is_warned_about() {
    let rule = |schedule: &str| {
        format!(
            "[upstream.gl]\nurl = \"https://x\"\n\n[[rule]]\nname = \"never\"\nschedule = \"{schedule}\"\n\
             [rule.trigger]\nproject = \"a/b\"\nref = \"main\"\ntoken = \"env:T\"\n"
        )
    };
    let env = [("T", "glptt-0123456789abcdefghij")];
    let config = load_text(&[("a.toml", &rule("0 0 30 2 *"))], &env).unwrap();
    assert_eq!(
        warnings(&config),
        [
            "a.toml:6: rule \"never\": schedule \"0 0 30 2 *\" never fires: no date to come matches it"
        ]
    );
    let config = load_text(&[("a.toml", &rule("0 0 29 2 *"))], &env).unwrap();
    assert_eq!(warnings(&config), Vec::<String>::new(), "29 February comes");
}

#[test]
fn url_refs_that_let_a_url_choose_any_ref_are_warned_about() {
    let env = [("S", "0123456789abcdef0123")];
    let source = |refs: &str| {
        format!("[source.gh]\nprovider = \"github\"\nsecret = \"env:S\"\nurl_refs = {refs}\n")
    };
    let config = load_text(&[("a.toml", &source("[\"stable\", \"**\"]"))], &env).unwrap();
    let warned = warnings(&config);
    assert_eq!(warned.len(), 1, "{warned:#?}");
    assert!(
        warned[0].starts_with("a.toml:4: source.gh.url_refs: \"**\" lets whoever holds one captured webhook choose the ref it builds"),
        "{warned:#?}"
    );
    let config = load_text(&[("a.toml", &source("[\"release/*\"]"))], &env).unwrap();
    assert_eq!(warnings(&config), Vec::<String>::new());
    // A full ref name never matches: `?ref=` is matched by its short name.
    let config = load_text(&[("a.toml", &source("[\"refs/tags/v1\"]"))], &env).unwrap();
    assert_eq!(
        warnings(&config),
        [
            "a.toml:4: source.gh.url_refs: \"refs/tags/v1\" is a full ref name, but a URL's ?ref= is matched by its short name (`?ref=refs/heads/main` as `main`), so it never matches; write \"v1\""
        ]
    );
    // An empty name is a mistake, not a ref.
    assert_eq!(
        messages(load_text(
            &[("a.toml", &source("[\"stable\", \"\"]"))],
            &env
        )),
        ["a.toml:4: source.gh.url_refs: an empty name matches nothing; leave it out"]
    );
}

#[test]
fn the_dashboard_never_shares_the_webhook_port() {
    let env = [("A", "0123456789abcdef0123")];
    let problems = messages(load_text(
        &[
            ("a.toml", "[server]\nlisten = \"127.0.0.1:9000\"\n"),
            (
                "b.toml",
                "\n[admin]\nlisten = \"127.0.0.1:9000\"\ntoken = \"env:A\"\n",
            ),
        ],
        &env,
    ));
    assert_eq!(
        problems,
        [
            "b.toml:2: admin.listen 127.0.0.1:9000 is the webhooks' address too ([server] listen); the dashboard needs a port of its own"
        ]
    );
    // The default webhook address counts too; another port is fine.
    let problems = messages(load_text(
        &[("a.toml", "[admin]\nlisten = \"127.0.0.1:8080\"\n")],
        &env,
    ));
    assert_eq!(problems.len(), 1, "{problems:#?}");
    load_text(
        &[("a.toml", "[admin]\nlisten = \"127.0.0.1:8081\"\n")],
        &env,
    )
    .unwrap();
}

#[test]
fn a_dashboard_off_loopback_over_plain_http_is_warned_about() {
    let env = [("A", "0123456789abcdef0123")];
    let config = load_text(
        &[(
            "a.toml",
            "[admin]\ntoken = \"env:A\"\nlisten = \"0.0.0.0:8081\"\n",
        )],
        &env,
    )
    .unwrap();
    let found = warnings(&config);
    assert_eq!(found.len(), 1, "{found:#?}");
    assert!(
        found[0].starts_with(
            "a.toml:3: admin.listen 0.0.0.0:8081 serves the dashboard over plain HTTP off loopback"
        ) && found[0].contains("tls_cert"),
        "{found:#?}"
    );
    // On loopback, plain HTTP stays on the machine.
    let config = load_text(
        &[(
            "a.toml",
            "[admin]\ntoken = \"env:A\"\nlisten = \"127.0.0.1:8081\"\n",
        )],
        &env,
    )
    .unwrap();
    assert!(warnings(&config).is_empty());
}

#[test]
fn a_table_defined_twice_suggests_an_array_of_tables() {
    let rules = "[[rule]]\nname = \"r\"\nsource = \"github\"\n[rule.trigger]\nproject = \"a/b\"\ntoken = \"env:T\"\n\
        [rule.trigger]\nproject = \"a/c\"\ntoken = \"env:T\"\n[rule.trigger]  # third\nproject = \"a/d\"\ntoken = \"env:T\"\n";
    let found = messages(load_text(
        &[("a.toml", GITHUB_AND_GITLAB), ("b.toml", rules)],
        SECRETS,
    ));
    assert_eq!(
        found,
        [
            "b.toml:7: table [rule.trigger] is defined twice; for several, write [[rule.trigger]] before each one (an array of tables)",
            "b.toml:10: table [rule.trigger] is defined twice; for several, write [[rule.trigger]] before each one (an array of tables)",
        ]
    );
    // The second one written as an array of tables, the first not.
    let rules = rules.replace(
        "[rule.trigger]\nproject = \"a/c\"",
        "[[rule.trigger]]\nproject = \"a/c\"",
    );
    let found = messages(load_text(
        &[("a.toml", GITHUB_AND_GITLAB), ("b.toml", &rules)],
        SECRETS,
    ));
    assert_eq!(
        found[0],
        "b.toml:7: table [[rule.trigger]] is defined twice: an earlier [rule.trigger] (one table) is in the way; for several, write [[rule.trigger]] before each one, the first one too",
    );
}

/// A push to `main` of `repository`, as if from `source`.
fn push_event(source: &str, repository: &str) -> crate::event::Event {
    crate::event::EventContext {
        provider: crate::event::Provider::Github,
        source: source.into(),
        delivery: "d".into(),
        repository: repository.into(),
        repository_url: String::new(),
        repository_web_url: String::new(),
        pusher: String::new(),
        payload: std::sync::Arc::new(
            crate::event::Payload::parsed(bytes::Bytes::from_static(b"{}")).unwrap(),
        ),
    }
    .event(crate::event::RefChange {
        full_ref: "refs/heads/main".into(),
        before: "0".repeat(40),
        after: "abcdef0123456789abcdef0123456789abcdef01".into(),
        ..crate::event::RefChange::default()
    })
    .unwrap()
}

#[test]
fn repository_names_follow_each_providers_case_rule() {
    let rules = "[[rule]]\nname = \"forge\"\nsource = \"github\"\nrepository = \"codertocat/hello-world\"\n[rule.trigger]\nproject = \"1\"\ntoken = \"env:T\"\n\
        [[rule]]\nname = \"forge-glob\"\nsource = \"github\"\nrepository = \"codertocat/*\"\n[rule.trigger]\nproject = \"2\"\ntoken = \"env:T\"\n\
        [[rule]]\nname = \"exact\"\nsource = \"other\"\nrepository = \"codertocat/hello-world\"\n[rule.trigger]\nproject = \"3\"\ntoken = \"env:T\"\n";
    let config = load_text(&[("a.toml", GITHUB_AND_GITLAB), ("b.toml", rules)], SECRETS).unwrap();
    let event = |source: &str| push_event(source, "Codertocat/Hello-World");
    let matched = |source: &str| -> Vec<String> {
        config
            .rules
            .matching(&event(source))
            .iter()
            .map(|r| r.name().to_owned())
            .collect()
    };
    assert_eq!(
        matched("github"),
        ["forge", "forge-glob"],
        "GitHub names ignore case"
    );
    assert_eq!(
        matched("other"),
        Vec::<String>::new(),
        "a generic sender's names are exact"
    );
    let verdicts = config.rules.verdicts(&event("other"));
    assert_eq!(
        verdicts[0].1.as_deref(),
        Some("repository: \"Codertocat/Hello-World\" matches none of [\"codertocat/hello-world\"]")
    );
}

#[test]
fn a_rule_may_react_to_several_sources() {
    let config_text =
        format!("{GITHUB_AND_GITLAB}[source.gitea]\nprovider = \"gitea\"\nsecret = \"env:S\"\n");
    let rules = "[[rule]]\nname = \"both\"\nsource = [\"github\", \"gitea\"]\nrepository = \"codertocat/*\"\n[rule.trigger]\nproject = \"1\"\ntoken = \"env:T\"\n";
    let config = load_text(&[("a.toml", &config_text), ("b.toml", rules)], SECRETS).unwrap();
    let event = |source: &str| push_event(source, "Codertocat/Hello-World");
    for source in ["github", "gitea"] {
        let matched: Vec<&str> = config
            .rules
            .matching(&event(source))
            .iter()
            .map(|r| r.name())
            .collect();
        assert_eq!(matched, ["both"], "from {source}, names ignoring case");
        assert_eq!(config.rules.count_for_source(source), 1);
    }
    assert!(config.rules.matching(&event("other")).is_empty());

    let problems = |rules: &str| {
        messages(load_text(
            &[("a.toml", &config_text), ("b.toml", rules)],
            SECRETS,
        ))
    };
    let rule = |source: &str, repository: &str| {
        format!(
            "[[rule]]\nname = \"r\"\nsource = {source}\n{repository}[rule.trigger]\nproject = \"1\"\ntoken = \"env:T\"\n"
        )
    };
    assert_eq!(
        problems(&rule("[]", "")),
        [
            "b.toml:3: rule \"r\": `source` is an empty list; name the [source.NAME] whose webhooks it reacts to"
        ]
    );
    assert_eq!(
        problems(&rule(
            "\"github\"",
            "repository = [\"\"]\nrefs = [\"main\", \" \"]\n"
        )),
        [
            "b.toml:4: rule \"r\": repository: an empty name matches nothing; leave it out",
            "b.toml:5: rule \"r\": refs: an empty name matches nothing; leave it out",
        ]
    );
    assert_eq!(
        problems(&rule("\"github\"", "when = \" \"\n")),
        [
            "b.toml:4: rule \"r\": `when` is empty; leave it out, or write an expression (`event.commit_count > 0`)"
        ]
    );
    assert_eq!(
        problems(&rule("\"github\"", "events = []\n")),
        [
            "b.toml:4: rule \"r\": `events` is an empty list, so the rule would never run; leave it out for push and tag, or list some of push, tag and delete"
        ]
    );
    assert_eq!(
        problems(&rule("[\"github\", \"github\"]", "")),
        ["b.toml:3: rule \"r\": source \"github\" is listed twice"]
    );
    assert_eq!(
        problems(&rule("[\"github\", \"gitee\"]", "")),
        [
            "b.toml:3: rule \"r\": source \"gitee\" names no [source.gitee] (defined: gitea, github, other)"
        ]
    );
    assert_eq!(
        problems(&rule(
            "[\"github\", \"other\"]",
            "repository = \"acme/*\"\n"
        )),
        [
            "b.toml:3: rule \"r\": `repository` would match \"github\"'s names ignoring case and \"other\"'s exactly (a generic source); write a rule for each"
        ]
    );
    // Without `repository`, case does not matter.
    assert!(
        load_text(
            &[
                ("a.toml", &config_text),
                ("b.toml", &rule("[\"github\", \"other\"]", ""))
            ],
            SECRETS
        )
        .is_ok()
    );
}

#[test]
fn statuses_that_would_stay_pending_are_warned_about_once() {
    let config = |upstream_extra: &str, extra: &str| {
        format!(
            "[upstream.gitlab]\nurl = \"https://gitlab.example.com\"\n{upstream_extra}\
             [source.gh]\nprovider = \"github\"\nsecret = \"env:S\"\nstatus = {{ token = \"env:T\" }}\n{extra}\
             [[rule]]\nname = \"a\"\nsource = \"gh\"\n[rule.trigger]\nproject = \"1\"\nref = \"main\"\ntoken = \"env:T\"\n\
             [[rule]]\nname = \"b\"\nsource = \"gh\"\n[rule.trigger]\nproject = \"2\"\nref = \"main\"\ntoken = \"env:T\"\n"
        )
    };
    let env = [("S", "0123456789abcdef0123"), ("T", "glptt-0123456789")];
    let found = warnings(&load_text(&[("a.toml", &config("", ""))], &env).unwrap());
    assert_eq!(found.len(), 1, "once per source and upstream: {found:#?}");
    assert!(
        found[0].starts_with("a.toml:11: rule \"a\": source \"gh\" posts commit statuses, but nothing tells hookrelay how pipelines on upstream \"gitlab\" go on"),
        "{found:?}"
    );
    // Told by pipeline events, or by polls: nothing to warn about.
    let events =
        "[source.pipelines]\nprovider = \"gitlab\"\nsecret = \"env:S\"\nupstream = \"gitlab\"\n";
    let polls = "read_token = \"env:T\"\n";
    for (upstream_extra, extra) in [("", events), (polls, "")] {
        let config = load_text(&[("a.toml", &config(upstream_extra, extra))], &env).unwrap();
        assert!(warnings(&config).is_empty(), "{:#?}", warnings(&config));
    }
}

#[test]
fn status_settings_are_checked_where_they_are_written() {
    let env = [
        ("S", "0123456789abcdef0123"),
        ("STATUS", "ghp_token"),
        ("T", "glptt-x"),
    ];
    let config = load_text(
        &[(
            "a.toml",
            r#"
[upstream.gitlab]
url = "https://gitlab.example.com"
read_token = "env:T"
poll_interval = "30s"

[source.gh]
provider = "github"
secret = "env:S"
status = { token = "env:STATUS" }

[source.ghes]
provider = "github"
secret = "env:S"
status = { token = "env:STATUS", api_url = "https://ghe.example.com/" }

[source.codeberg]
provider = "forgejo"
secret = "env:S"
status = { token = "env:STATUS", api_url = "https://codeberg.org" }

[source.pipelines]
provider = "gitlab"
secret = "env:S"
upstream = "gitlab"

[[rule]]
name = "r"
source = "gh"
[rule.trigger]
project = "a/b"
token = "env:T"
status_context = "ci/{{ trigger.project }}/{{ event.ref_name }}"
"#,
        )],
        &env,
    )
    .unwrap();
    let api = |name: &str| {
        config.sources[name]
            .status
            .as_ref()
            .unwrap()
            .api_url
            .clone()
    };
    assert_eq!(api("gh"), "https://api.github.com");
    assert_eq!(api("ghes"), "https://ghe.example.com/api/v3");
    assert_eq!(api("codeberg"), "https://codeberg.org/api/v1");
    assert_eq!(
        config.sources["pipelines"].pipelines_of.as_deref(),
        Some("gitlab")
    );
    let upstream = &config.upstreams["gitlab"];
    assert!(upstream.read_token.is_some());
    assert_eq!(upstream.poll_interval, Duration::from_secs(30));

    let problems = messages(load_text(
        &[(
            "a.toml",
            r#"
[upstream.gitlab]
url = "https://gitlab.example.com"

[source.gogs]
provider = "gogs"
secret = "env:S"
status = { token = "env:STATUS" }

[source.gitea]
provider = "gitea"
secret = "env:S"
status = { token = "env:STATUS" }

[source.unset]
provider = "github"
secret = "env:S"
status = { token = "env:NOT_SET" }

[source.gh]
provider = "github"
secret = "env:S"
upstream = "gitlab"

[source.pipelines]
provider = "gitlab"
secret = "env:S"
upstream = "elsewhere"

[[rule]]
name = "r"
source = "pipelines"
[rule.trigger]
project = "a/b"
token = "env:T"
status_context = "{{ trigger.token }}"
"#,
        )],
        &env,
    ));
    let expect = [
        "a.toml:8: source.gogs.status: Gogs has no commit-status API",
        "a.toml:13: source.gitea.status: a Gitea or Forgejo server has no default address",
        "a.toml:18: source.unset.status: token (env:NOT_SET)",
        "a.toml:23: source.gh.upstream (pipeline events of a GitLab) applies only to provider gitlab",
        "source.pipelines.upstream: \"elsewhere\" names no [upstream.elsewhere]",
        "a.toml:36: rule \"r\": status_context: `trigger.token` does not exist",
    ];
    for (problem, expected) in problems.iter().zip(expect) {
        assert!(
            problem.contains(expected),
            "{problem}\n  should say {expected}"
        );
    }
    assert_eq!(problems.len(), expect.len(), "{problems:#?}");
}

#[test]
fn compare_settings_are_checked_where_they_are_written() {
    let env = [("S", "0123456789abcdef0123"), ("READ", "glpat-read")];
    let config = load_text(
        &[(
            "a.toml",
            r#"
[source.bb]
provider = "bitbucket-cloud"
secret = "env:S"
compare = { token = "env:READ" }

[source.gl]
provider = "gitlab"
secret = "env:S"
compare = { token = "env:READ", api_url = "https://gitlab.example.com", timeout = "1500ms", new_branch_base = "release/1.x" }
"#,
        )],
        &env,
    )
    .unwrap();
    let bb = config.sources["bb"].compare.as_ref().unwrap();
    assert_eq!(bb.api.api_url, "https://api.bitbucket.org/2.0");
    assert_eq!(bb.timeout, crate::compare::DEFAULT_TIMEOUT);
    let gl = config.sources["gl"].compare.as_ref().unwrap();
    assert_eq!(gl.api.api_url, "https://gitlab.example.com/api/v4");
    assert_eq!(gl.timeout, Duration::from_millis(1500));
    assert_eq!(gl.new_branch_base.as_deref(), Some("release/1.x"));
    assert_eq!(bb.new_branch_base, None);
    // No rule reads the files of either source's pushes: the forge would never be asked.
    assert_eq!(
        warnings(&config),
        [
            "a.toml:2: source.bb.compare: no rule of this source has `paths` or `paths_exclude`, so the forge is never asked",
            "a.toml:7: source.gl.compare: no rule of this source has `paths` or `paths_exclude`, so the forge is never asked",
        ]
    );

    let problems = messages(load_text(
        &[(
            "a.toml",
            r#"
[upstream.gitlab]
url = "https://gitlab.example.com"

[source.gogs]
provider = "gogs"
secret = "env:S"
compare = { token = "env:READ" }

[source.generic]
provider = "generic"
allow_unsigned = true
compare = { token = "env:READ" }

[source.slow]
provider = "github"
secret = "env:S"
compare = { token = "env:READ", timeout = "20s" }

[source.gitea]
provider = "gitea"
secret = "env:S"
compare = { token = "env:READ" }

[source.pipelines]
provider = "gitlab"
secret = "env:S"
upstream = "gitlab"
compare = { token = "env:READ" }

[source.based]
provider = "github"
secret = "env:S"
compare = { token = "env:READ", new_branch_base = "../main" }
"#,
        )],
        &env,
    ));
    let expect = [
        "a.toml:8: source.gogs.compare: Gogs has no API that compares two commits",
        "a.toml:13: source.generic.compare: a generic sender lists a push's changed files itself",
        "a.toml:18: source.slow.compare.timeout: \"20s\" is longer than 8s",
        "a.toml:23: source.gitea.compare: a Gitea or Forgejo server has no default address: set api_url",
        "a.toml:29: source.pipelines.compare: a source of pipeline events (`upstream`) takes no pushes",
        "a.toml:34: source.based.compare.new_branch_base: \"../main\" is not a branch name: it contains \"..\"",
    ];
    for (problem, expected) in problems.iter().zip(expect) {
        assert!(
            problem.contains(expected),
            "{problem}\n  should say {expected}"
        );
    }
    assert_eq!(problems.len(), expect.len(), "{problems:#?}");
}

/// A section with problems of its own is reported once, where it is: a rule, a source or
/// the gateway naming it is not also told that nothing by that name is defined (before,
/// a short secret in [source.github] read as two problems, the second "names no
/// [source.github] (defined: none)"). A name that is nowhere is still reported, with
/// every section of its kind as defined, those with problems too (the name meant).
#[test]
fn a_section_with_problems_is_reported_once_not_again_where_it_is_named() {
    let problems = messages(load_text(
        &[(
            "a.toml",
            r#"
[upstream.gitlab]
url = "not a url"

[upstream.other]
url = "https://gitlab.example.com"
colour = "blue"

[gateway]
upstream = "gitlab"

[source.github]
provider = "github"
secret = "env:SHORT"

[source.pipelines]
provider = "gitlab"
secret = "env:S"
upstream = "gitlab"

[[rule]]
name = "uses-broken"
source = "github"
[rule.trigger]
upstream = "gitlab"
project = "a/b"
token = "env:T"

[[rule]]
name = "no-upstream-named"
source = "pipelines"
[rule.trigger]
project = "a/b"
token = "env:T"

[[rule]]
name = "typo"
source = "gthub"
[rule.trigger]
upstream = "gitlba"
project = "a/b"
token = "env:T"
"#,
        )],
        &[
            ("SHORT", "too-short"),
            ("S", "a-secret-long-enough-for-it"),
            ("T", "glptt-x"),
        ],
    ));
    let expect = [
        "a.toml:3: ",
        "a.toml:7: unknown field `colour`",
        "a.toml:14: source.github.secret: the secret is 9 bytes",
        "a.toml:38: rule \"typo\": source \"gthub\" names no [source.gthub] (defined: github, pipelines)",
        "a.toml:40: rule \"typo\": upstream \"gitlba\" names no [upstream.gitlba] (defined: gitlab, other)",
    ];
    assert_each_starts_with(&problems, &expect);
}

/// A name is part of every key and id stored for its source or upstream; one of
/// thousands of characters made every webhook's write fail on PostgreSQL.
#[test]
fn names_longer_than_64_characters_are_refused_with_their_line() {
    let long = "s".repeat(65);
    let problems = messages(load_text(
        &[(
            "a.toml",
            &format!(
                "[upstream.gitlab]\nurl = \"https://gitlab.example.com\"\n\n[source.{long}]\nprovider = \"github\"\nallow_unsigned = true\n"
            ),
        )],
        &[],
    ));
    assert_eq!(
        problems,
        ["a.toml:4: source name ssssssssssssssss… is 65 characters long; names may have up to 64"]
    );
    let fine = "s".repeat(64);
    load_text(
        &[(
            "a.toml",
            &format!(
                "[upstream.gitlab]\nurl = \"https://gitlab.example.com\"\n\n[source.{fine}]\nprovider = \"github\"\nallow_unsigned = true\n"
            ),
        )],
        &[],
    )
    .unwrap();
}

/// What would fail every trigger of a rule at run time is refused at load, each problem
/// at the line of the template that has it: a plain project or ref that can never be
/// valid, and a filter, test, method or function that does not exist (minijinja looks
/// those up only when a render reaches them).
#[test]
fn templates_that_would_fail_every_trigger_are_refused_at_their_lines() {
    let env = [("S", "0123456789abcdef0123"), ("T", "glptt-x")];
    let text = r#"
[upstream.gitlab]
url = "https://gitlab.example.com"

[source.gh]
provider = "github"
secret = "env:S"

[[rule]]
name = "r"
source = "gh"
[[rule.trigger]]
project = " "
ref = "bad..ref"
token = "env:T"
status_context = "{{ trigger.project | uper }}"
[rule.trigger.variables]
FINE = "{{ 'x | nosuch' }}{{ event.ref_name | upper }}{{ range(2) | join }}{{ event.ref_name.split('/') | first }}"
C = "{{ event.nosuch }}"
D = "{{ nosuch(event.after) }}"
[rule.trigger.inputs]
one = 1
two = "{{ event.ref_name is nosuchtest }}"
three = "{{ event.ref_name.nosuchmethod() }}"

[[rule.trigger]]
project = "acme/{{ event.repository }}"
ref = "{% filter lower %}{{ event.ref_name }}{% endfilter %}"
token = "env:T"
variables = { FOR = "{% for c in event.commits %}{{ loop.cycle('a', 'b') }}{% if c is defined %}|{% endif %}{% endfor %}", E = "{% filter nosuch %}x{% endfilter %}" }
"#;
    let problems = messages(load_text(&[("a.toml", text)], &env));
    let expect = [
        "a.toml:13: rule \"r\": project: the project id is empty",
        "a.toml:14: rule \"r\": ref: ref \"bad..ref\" contains \"..\"",
        "a.toml:16: rule \"r\": status_context: unknown filter `uper`",
        "a.toml:19: rule \"r\": variables.C: `event.nosuch` does not exist",
        "a.toml:20: rule \"r\": variables.D: unknown function `nosuch`; the functions are: debug, dict, namespace, range",
        "a.toml:23: rule \"r\": inputs.two: unknown test `nosuchtest`",
        "a.toml:24: rule \"r\": inputs.three: unknown method `nosuchmethod()`",
        "a.toml:30: rule \"r\": variables.E: unknown filter `nosuch`",
    ];
    assert_each_starts_with(&problems, &expect);
}

/// A coalescing window is read on a rule and on an upstream; one over an hour is a warning
/// (each trigger waits that long: `100d` typed for `100s`), and one that is not a duration
/// is a problem where it is written.
#[test]
fn coalescing_windows_are_read_and_long_ones_warned_about() {
    let env = [("S", "0123456789abcdef0123"), ("T", "glptt-x")];
    let text = |upstream: &str, rule: &str| {
        format!(
            "[upstream.gitlab]\nurl = \"https://gitlab.example.com\"\ncoalesce = \"{upstream}\"\n\
             [source.gh]\nprovider = \"github\"\nsecret = \"env:S\"\n\
             [[rule]]\nname = \"r\"\nsource = \"gh\"\ncoalesce = \"{rule}\"\n[rule.trigger]\nproject = \"a/b\"\ntoken = \"env:T\"\n"
        )
    };
    let config = load_text(&[("a.toml", &text("2m", "30s"))], &env).unwrap();
    assert_eq!(warnings(&config), Vec::<String>::new());
    assert_eq!(
        config.rules.rules()[0].spec.coalesce,
        Some(std::time::Duration::from_secs(30))
    );
    let config = load_text(&[("a.toml", &text("2h", "100d"))], &env).unwrap();
    assert_eq!(
        warnings(&config),
        [
            "a.toml:3: upstream.gitlab.coalesce: \"2h\" holds every trigger that long before it is sent; a push storm settles in minutes (\"2m\")",
            "a.toml:10: rule \"r\": coalesce: \"100d\" holds every trigger that long before it is sent; a push storm settles in minutes (\"2m\")",
        ]
    );
    assert_eq!(
        messages(load_text(&[("a.toml", &text("2m", "soon"))], &env)),
        [
            "a.toml:10: rule \"r\": coalesce: \"soon\" is not a duration (expected number at 0); write e.g. \"30s\" or \"5m\""
        ]
    );
}

#[test]
fn catch_up_settings_are_checked_where_they_are_written() {
    let env = [
        ("S", "0123456789abcdef0123"),
        ("HOOKS", "ghp_hooks_token"),
        ("T", "glptt-x"),
        (
            "APP_KEY",
            include_str!("../../tests/fixtures/github_app/test-app-key.pem"),
        ),
        (
            "NOT_A_KEY",
            "-----BEGIN RSA PRIVATE KEY-----\nbm90\n-----END RSA PRIVATE KEY-----",
        ),
    ];
    let config = load_text(
        &[(
            "a.toml",
            r#"
[upstream.gitlab]
url = "https://gitlab.example.com"

[source.gh]
provider = "github"
secret = "env:S"
catch_up = { hook = "https://api.github.com/repos/acme/app/hooks/123", token = "env:HOOKS" }

[source.ghes]
provider = "github"
secret = "env:S"
catch_up = { hook = "https://ghe.example.com/api/v3/orgs/acme/hooks/9", token = "env:HOOKS", every = "2m", since = "3h" }

[source.app]
provider = "github"
secret = "env:S"
catch_up = { hook = "https://api.github.com/app/hook", app = "Iv23liTest", key = "env:APP_KEY" }

[source.app_on_repos]
provider = "github"
secret = "env:S"
catch_up = { hooks = ["https://api.github.com/repos/acme/app/hooks/1", "https://api.github.com/orgs/acme/hooks/2"], app = "7", key = "env:APP_KEY" }

[source.lab]
provider = "gitlab"
secret = "env:S"
catch_up = { hooks = ["https://gitlab.example.com/api/v4/projects/acme%2Fapp/hooks/7", "https://gitlab.example.com/api/v4/projects/9/hooks/8"], token = "env:HOOKS", since = "7d" }
"#,
        )],
        &env,
    )
    .unwrap();
    let lab = config.sources["lab"].catch_up.as_ref().unwrap();
    assert_eq!(lab.hooks.len(), 2);
    assert!(
        lab.hooks
            .iter()
            .all(|hook| hook.forge == crate::catch_up::Forge::GitLab)
    );
    assert_eq!(lab.since, Duration::from_secs(7 * 24 * 3600));
    // An App reads a repository's or organisation's hook through its installation.
    let on_repos = config.sources["app_on_repos"].catch_up.as_ref().unwrap();
    assert!(matches!(
        on_repos.credential,
        Some(crate::catch_up::Credential::App(_))
    ));
    let app = config.sources["app"].catch_up.as_ref().unwrap();
    assert!(app.hooks[0].is_app());
    assert_eq!(
        app.credential_ref.to_string(),
        "App Iv23liTest (key env:APP_KEY)"
    );
    match &app.credential {
        Some(crate::catch_up::Credential::App(key)) => assert_eq!(key.app(), "Iv23liTest"),
        other => panic!("{other:?}"),
    }
    let gh = config.sources["gh"].catch_up.as_ref().unwrap();
    assert_eq!(
        gh.hooks[0].shown(),
        "https://api.github.com/repos/acme/app/hooks/123"
    );
    assert_eq!(gh.every, crate::catch_up::DEFAULT_EVERY);
    assert_eq!(gh.since, crate::catch_up::DEFAULT_SINCE);
    match &gh.credential {
        Some(crate::catch_up::Credential::Token(token)) => {
            assert_eq!(token.expose(), "ghp_hooks_token")
        }
        other => panic!("{other:?}"),
    }
    let ghes = config.sources["ghes"].catch_up.as_ref().unwrap();
    assert_eq!(ghes.every, Duration::from_secs(120));
    assert_eq!(ghes.since, Duration::from_secs(3 * 3600));

    let problems = messages(load_text(
        &[(
            "a.toml",
            r#"
[source.gitea]
provider = "gitea"
secret = "env:S"
catch_up = { hook = "https://gitea.example.com/api/v1/repos/a/b/hooks/1", token = "env:HOOKS" }

[source.page]
provider = "github"
secret = "env:S"
catch_up = { hook = "https://github.com/acme/app/settings/hooks/123", token = "env:HOOKS" }

[source.often]
provider = "github"
secret = "env:S"
catch_up = { hook = "https://api.github.com/repos/a/b/hooks/1", token = "env:HOOKS", every = "10s", since = "7d" }

[source.unset]
provider = "github"
secret = "env:S"
catch_up = { hook = "https://api.github.com/repos/a/b/hooks/1", token = "env:NOT_SET" }

[source.typo]
provider = "github"
secret = "env:S"
catch_up = { hook = "https://api.github.com/repos/a/b/hooks/1", token = "env:HOOKS", evry = "5m" }

[source.both]
provider = "github"
secret = "env:S"
catch_up = { hook = "https://api.github.com/app/hook", token = "env:HOOKS", app = "1", key = "env:APP_KEY" }

[source.keyless]
provider = "github"
secret = "env:S"
catch_up = { hook = "https://api.github.com/app/hook", app = "1" }

[source.app_with_token]
provider = "github"
secret = "env:S"
catch_up = { hook = "https://api.github.com/app/hook", token = "env:HOOKS" }

[source.key_without_app]
provider = "github"
secret = "env:S"
catch_up = { hook = "https://api.github.com/repos/a/b/hooks/1", key = "env:APP_KEY" }

[source.bad_key]
provider = "github"
secret = "env:S"
catch_up = { hook = "https://api.github.com/app/hook", app = "1", key = "env:NOT_A_KEY" }

[source.bad_app]
provider = "github"
secret = "env:S"
catch_up = { hook = "https://api.github.com/app/hook", app = "my app", key = "env:APP_KEY" }

[source.lab_with_github_hook]
provider = "gitlab"
secret = "env:S"
catch_up = { hook = "https://api.github.com/repos/a/b/hooks/1", token = "env:HOOKS", since = "8d" }

[source.lab_with_app]
provider = "gitlab"
secret = "env:S"
catch_up = { hook = "https://gitlab.example.com/api/v4/groups/9/hooks/1", app = "1", key = "env:APP_KEY" }

[source.hub_with_gitlab_hook]
provider = "github"
secret = "env:S"
catch_up = { hook = "https://gitlab.example.com/api/v4/projects/9/hooks/1", token = "env:HOOKS" }

[source.hook_and_hooks]
provider = "github"
secret = "env:S"
catch_up = { hook = "https://api.github.com/repos/a/b/hooks/1", hooks = ["https://api.github.com/repos/a/c/hooks/2"], token = "env:HOOKS" }

[source.twice]
provider = "github"
secret = "env:S"
catch_up = { hooks = ["https://api.github.com/repos/a/b/hooks/1", "https://api.github.com/repos/a/b/hooks/1/"], token = "env:HOOKS" }

[source.no_hook]
provider = "github"
secret = "env:S"
catch_up = { hooks = [], token = "env:HOOKS" }
"#,
        )],
        &env,
    ));
    let expect = [
        "a.toml:5: source.gitea.catch_up (the forge's log of a hook's deliveries) applies only to provider github or gitlab, not gitea",
        "a.toml:10: source.page.catch_up.hook: \"https://github.com/acme/app/settings/hooks/123\" is not a hook's API address",
        "a.toml:15: source.often.catch_up.every: ",
        "a.toml:15: source.often.catch_up.since: \"7d\" is longer than the 3 days over which GitHub redelivers",
        "a.toml:20: source.unset.catch_up.token (env:NOT_SET)",
        "a.toml:25: ",
        "a.toml:30: source.both.catch_up: give a token, or a GitHub App's app and key, not both",
        "a.toml:35: source.keyless.catch_up: a GitHub App is read with both its app",
        "a.toml:40: source.app_with_token.catch_up.hook: https://api.github.com/app/hook is a GitHub App's own hook, which only the App may read",
        "a.toml:45: source.key_without_app.catch_up: a GitHub App is read with both its app",
        "a.toml:50: source.bad_key.catch_up.key (env:NOT_A_KEY): the App's private key",
        "a.toml:55: source.bad_app.catch_up.app: \"my app\" is not a GitHub App's ID",
        "a.toml:60: source.lab_with_github_hook.catch_up.hook: https://api.github.com/repos/a/b/hooks/1 is a GitHub hook's address, and this source's provider is gitlab",
        "a.toml:60: source.lab_with_github_hook.catch_up.since: \"8d\" is longer than the 7 days over which GitLab lists and resends",
        "a.toml:65: source.lab_with_app.catch_up.hook: https://gitlab.example.com/api/v4/groups/9/hooks/1 is a GitLab hook: it is read with a GitLab token",
        "a.toml:70: source.hub_with_gitlab_hook.catch_up.hook: https://gitlab.example.com/api/v4/projects/9/hooks/1 is a GitLab hook's address, and this source's provider is github",
        "a.toml:75: source.hook_and_hooks.catch_up.hook: give hook = \"…\" (one) or hooks = [\"…\", …] (several), not both",
        "a.toml:80: source.twice.catch_up.hooks: https://api.github.com/repos/a/b/hooks/1 is listed twice",
        "a.toml:85: source.no_hook.catch_up.hook: missing",
    ];
    for (problem, expected) in problems.iter().zip(expect) {
        assert!(
            problem.contains(expected),
            "{problem}\n  should say {expected}"
        );
    }
    assert!(problems[5].contains("evry"), "{problems:#?}");
    assert_eq!(problems.len(), expect.len(), "{problems:#?}");
}

#[test]
fn a_source_limit_that_refuses_webhooks_from_gitlab_or_github_is_warned_about() {
    let text = r#"[upstream.gitlab]
url = "https://gitlab.example.com"

[source.lab]
provider = "gitlab"
secret = "env:S"
limit = { rate = "100/min", on_limit = "reject" }

[source.hub]
provider = "github"
secret = "env:S"
limit = { rate = "100/min", on_limit = "reject" }

[source.hub_caught_up]
provider = "github"
secret = "env:S"
limit = { rate = "100/min", on_limit = "reject" }
catch_up = { hook = "https://api.github.com/repos/a/b/hooks/1", token = "env:T" }

[source.tea]
provider = "gitea"
secret = "env:S"
limit = { rate = "100/min", on_limit = "reject" }

[source.queued]
provider = "gitlab"
secret = "env:S"
limit = { rate = "100/min" }
"#;
    let config = load_text(&[("a.toml", text)], SECRETS).unwrap();
    let warned = warnings(&config);
    assert_eq!(warned.len(), 2, "{warned:#?}");
    assert!(
        warned[0].starts_with("a.toml:7: source.lab.limit: on_limit = \"reject\" answers 429 to GitLab, which counts it as a failed delivery"),
        "{warned:#?}"
    );
    assert!(
        warned[1].starts_with("a.toml:12: source.hub.limit: on_limit = \"reject\" answers 429 to GitHub, which never sends that webhook again"),
        "{warned:#?}"
    );
}

/// A secret, a CA file or a certificate that names an endless device (or a huge file) by
/// mistake is a problem at its line, read no further than its kind's bound, not all of
/// the machine's memory.
#[test]
fn files_named_by_mistake_are_refused_by_their_size() {
    let problems = messages(load_text(
        &[(
            "a.toml",
            r#"[upstream.gitlab]
url = "https://gitlab.example.com"
ca_file = "/dev/zero"

[source.gh]
provider = "github"
secret = "file:/dev/zero"

[server]
tls_cert = "/dev/zero"
tls_key = "/dev/zero"
"#,
        )],
        &[],
    ));
    let expected = [
        "a.toml:3: upstream.gitlab.ca_file: cannot read /dev/zero: larger than 8 MiB, more than any PEM file holds",
        "a.toml:7: source.gh.secret (file:/dev/zero): cannot read secret file /dev/zero: larger than 64 KiB, more than any secret holds: is it the right file?",
        "a.toml:10: tls_cert: cannot read /dev/zero: larger than 8 MiB",
    ];
    assert_each_starts_with(&problems, &expected);
}

/// `[delivery] min_free_disk`: a size, `0` to turn the reserve off, 2 % of the disk (at
/// most 256 MiB) when left out; anything else is a problem at its line.
#[test]
fn the_disk_reserve_is_a_size() {
    let reserve = |text: &str| {
        load_text(&[("a.toml", &format!("[delivery]\n{text}\n"))], &[])
            .map(|config| config.delivery.min_free_disk)
            .map_err(|problems| messages(Err(problems)))
    };
    use crate::disk_reserve::Reserve;
    assert_eq!(reserve(""), Ok(Reserve::Default));
    assert_eq!(
        reserve("min_free_disk = \"512MiB\""),
        Ok(Reserve::Bytes(512 * 1024 * 1024))
    );
    assert_eq!(reserve("min_free_disk = \"0\""), Ok(Reserve::Bytes(0)));
    let problems = reserve("min_free_disk = \"plenty\"").unwrap_err();
    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert!(
        problems[0].starts_with("a.toml:2: delivery.min_free_disk: "),
        "{problems:#?}"
    );
}

#[test]
fn allow_from_and_trusted_proxies_are_addresses_and_networks_each_at_its_line() {
    let problems = messages(load_text(
        &[(
            "a.toml",
            "[server]\ntrusted_proxies = [\n  \"10.0.0.0/8\",\n  \"nginx\",\n]\n\n\
             [source.a]\nprovider = \"github\"\nallow_unsigned = true\nallow_from = [\n  \"192.30.252.0/22\",\n  \"192.30.252.0/33\",\n]\n\n\
             [source.b]\nprovider = \"github\"\nallow_unsigned = true\nallow_from = []\n\n\
             [upstream.gl]\nurl = \"https://gitlab.example\"\n\n\
             [gateway]\nallow_from = [\"10.0.0.0/8\", \"10.0.0.0/8/8\"]\n",
        )],
        &[],
    ));
    let expected = [
        "a.toml:4: trusted_proxies: \"nginx\" is not an IP address or network",
        "a.toml:12: source.a.allow_from: \"192.30.252.0/33\" is not an IP address or network",
        "a.toml:18: source.b.allow_from: an empty list would refuse everyone",
        "a.toml:24: [gateway] allow_from: \"10.0.0.0/8/8\" is not an IP address or network",
    ];
    assert_each_starts_with(&problems, &expected);
}

#[test]
fn trusted_proxies_of_the_server_and_of_the_gateway_are_one_list() {
    use crate::client_address::allowed;
    let config = load_text(
        &[(
            "a.toml",
            "[server]\ntrusted_proxies = [\"10.0.0.0/8\"]\n\n\
             [upstream.gl]\nurl = \"https://gitlab.example\"\n\n\
             [gateway]\ntrusted_proxies = [\"192.0.2.7\", \"::ffff:172.16.0.0/108\"]\nallow_from = [\"192.0.2.0/24\"]\n\n\
             [source.a]\nprovider = \"github\"\nallow_unsigned = true\nallow_from = [\"192.30.252.9/22\", \"2001:db8::1\"]\n",
        )],
        &[],
    )
    .unwrap();
    let shown = |nets: &[ipnet::IpNet]| nets.iter().map(|n| n.to_string()).collect::<Vec<_>>();
    assert_eq!(
        shown(&config.server.trusted_proxies),
        ["10.0.0.0/8", "192.0.2.7/32", "172.16.0.0/12"]
    );
    let source = &config.sources["a"];
    assert_eq!(
        shown(&source.allow_from),
        ["192.30.252.0/22", "2001:db8::1/128"]
    );
    assert!(allowed(&source.allow_from, "192.30.255.1".parse().unwrap()));
    assert!(!allowed(
        &source.allow_from,
        "192.30.251.255".parse().unwrap()
    ));
    assert!(!allowed(&source.allow_from, "203.0.113.9".parse().unwrap()));
    assert!(allowed(&source.allow_from, "2001:db8::1".parse().unwrap()));
    assert!(!allowed(&source.allow_from, "2001:db8::2".parse().unwrap()));
    let gateway = config.gateway.as_ref().unwrap();
    assert!(allowed(&gateway.allow_from, "192.0.2.200".parse().unwrap()));
    assert!(!allowed(&gateway.allow_from, "192.0.3.1".parse().unwrap()));
    let open = load_text(
        &[(
            "a.toml",
            "[source.a]\nprovider = \"github\"\nallow_unsigned = true\n",
        )],
        &[],
    )
    .unwrap();
    assert!(allowed(
        &open.sources["a"].allow_from,
        "203.0.113.9".parse().unwrap()
    ));
}

#[test]
fn an_allow_from_a_proxy_on_this_machine_would_be_refused_by_is_a_warning() {
    let source = "[source.ci]\nprovider = \"generic\"\nallow_unsigned = true\nallow_from = [\"10.20.0.0/16\"]\n";
    let gateway = "[upstream.gl]\nurl = \"https://gitlab.example\"\n[gateway]\nallow_from = [\"192.0.2.0/24\"]\n";
    let admin = "[admin]\nallow_from = [\"2001:db8::/32\", \"bogus\"]\n";
    let problems = messages(load_text(&[("c.toml", admin)], &[]));
    assert_each_starts_with(
        &problems,
        &["c.toml:2: admin.allow_from: \"bogus\" is not an IP address or network"],
    );
    let admin = "[admin]\nallow_from = [\"2001:db8::/32\"]\n";
    let config = load_text(
        &[("a.toml", source), ("b.toml", gateway), ("c.toml", admin)],
        &[],
    )
    .unwrap();
    let found = warnings(&config);
    assert_eq!(found.len(), 3, "{found:#?}");
    assert!(
        found[2].starts_with(
            "c.toml:1: admin.allow_from does not name this machine, yet admin.listen (127.0.0.1:8081)"
        ),
        "{found:#?}"
    );
    assert!(
        found[0].starts_with(
            "a.toml:1: source.ci.allow_from does not name this machine, yet [server] listen (127.0.0.1:8080) takes connections from this machine alone"
        ),
        "{found:#?}"
    );
    assert!(
        found[1].starts_with("b.toml:3: [gateway] allow_from does not name this machine"),
        "{found:#?}"
    );
    // A trusted proxy here, a listener others reach, or this machine in the list: no warning.
    for server in [
        "[server]\ntrusted_proxies = [\"127.0.0.1\"]\n",
        "[server]\nlisten = \"0.0.0.0:8080\"\n",
    ] {
        let config = load_text(&[("a.toml", source), ("s.toml", server)], &[]).unwrap();
        assert_eq!(warnings(&config), Vec::<String>::new(), "{server}");
    }
    let here = source.replace("[\"10.20.0.0/16\"]", "[\"10.20.0.0/16\", \"::1\"]");
    let config = load_text(&[("a.toml", here.as_str())], &[]).unwrap();
    assert_eq!(warnings(&config), Vec::<String>::new());
}

/// `serve --listen` and `--admin-listen` take the files' place in the same checks, at the
/// start and at every reload: a listener others reach warns of nothing, one on this
/// machine alone is named by its flag.
#[test]
fn where_serve_s_command_line_listens_is_what_the_proxy_warning_reads() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("a.toml"),
        "[source.ci]\nprovider = \"generic\"\nallow_unsigned = true\nallow_from = [\"10.20.0.0/16\"]\n\
         [admin]\nallow_from = [\"10.20.0.0/16\"]\n",
    )
    .unwrap();
    let env = |_: &str| None;
    let load = |listen: Option<&str>, admin_listen: Option<&str>| {
        let flags = super::ListenFlags {
            listen: listen.map(|a| a.parse().unwrap()),
            admin_listen: admin_listen.map(|a| a.parse().unwrap()),
        };
        let config = super::load_serving(dir.path(), &env, flags).unwrap();
        config
            .warnings
            .iter()
            .map(|w| w.message.clone())
            .collect::<Vec<_>>()
    };
    let from_the_files = load(None, None);
    assert_eq!(from_the_files.len(), 2, "{from_the_files:#?}");
    assert!(
        load(Some("0.0.0.0:8080"), Some("0.0.0.0:8081")).is_empty(),
        "listeners others reach"
    );
    let flagged = load(Some("127.0.0.1:9000"), Some("[::1]:9001"));
    assert!(
        flagged[0]
            .contains("yet --listen (127.0.0.1:9000) takes connections from this machine alone")
            && flagged[1].contains("yet --admin-listen ([::1]:9001)"),
        "{flagged:#?}"
    );
}

#[test]
fn a_new_branch_base_is_a_short_branch_name_every_forge_takes_in_a_path() {
    use super::forge_api::branch_base_problem;
    for good in ["main", "master", "release/1.x", "dev_2", "v1.2-rc"] {
        assert_eq!(branch_base_problem(good), None, "{good}");
    }
    for (bad, says) in [
        ("", "is empty"),
        ("main.", "ends with \".\""),
        ("a/b.lock/c", "ending with \".lock\""),
        ("a//b", "contains \"//\""),
        ("feat ure", "contains ' '"),
        ("refs/heads/main", "is a full ref"),
        ("caf\u{e9}", "contains '\u{e9}'"),
        ("a+b", "contains '+'"),
        ("a/-b", "part starting with \"-\""),
        ("-main", "starts with \"-\""),
        ("0123456789abcdef0123456789abcdef01234567", "is a commit id"),
    ] {
        let problem = branch_base_problem(bad).unwrap_or_else(|| panic!("{bad:?} passed"));
        assert!(problem.contains(says), "{bad:?}: {problem}");
    }
}

#[test]
fn allow_from_github_stands_for_githubs_published_webhook_addresses() {
    let config = load_text(
        &[(
            "a.toml",
            "[server]\nlisten = \"0.0.0.0:8080\"\n\n\
             [source.only]\nprovider = \"github\"\nallow_unsigned = true\nallow_from = [\"github\"]\n\n\
             [source.also]\nprovider = \"github\"\nallow_unsigned = true\nallow_from = [\"github\", \"10.0.0.0/8\"]\n",
        )],
        &[],
    )
    .unwrap();
    let (only, also) = (&config.sources["only"], &config.sources["also"]);
    assert!(only.allow_github_hooks && only.allow_from.is_empty());
    assert!(also.allow_github_hooks);
    assert_eq!(
        crate::config::networks::shown(&also.allow_from),
        "10.0.0.0/8"
    );
    assert!(warnings(&config).is_empty(), "{:#?}", warnings(&config));
    // On another sender's source it means nothing, and is refused at its line.
    let problems = messages(load_text(
        &[(
            "a.toml",
            "[source.gl]\nprovider = \"gitlab\"\nallow_unsigned = true\nallow_from = [\n  \"10.0.0.0/8\",\n  \"github\",\n]\n",
        )],
        &[],
    ));
    assert_each_starts_with(
        &problems,
        &[
            "a.toml:6: source.gl.allow_from: \"github\" names the addresses GitHub sends webhooks from, and this source is",
        ],
    );
    // Behind a proxy on this machine, GitHub's addresses are never the connection's.
    let config = load_text(
        &[(
            "a.toml",
            "[source.only]\nprovider = \"github\"\nallow_unsigned = true\nallow_from = [\"github\"]\n",
        )],
        &[],
    )
    .unwrap();
    let found = warnings(&config);
    assert!(
        found
            .iter()
            .any(|w| w.contains("source.only.allow_from does not name this machine")),
        "{found:#?}"
    );
}
