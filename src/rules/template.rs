//! Templates and `when` expressions: one minijinja environment per configuration.
//!
//! Every template of every rule is compiled once, at load, into one environment with
//! strict undefined behaviour, so a field that does not exist is an error rather than an
//! empty string. `check` goes further and refuses, before anything runs, a template that
//! names a field an [`Event`] does not have. The event reaches templates as a lazy object:
//! fields are converted only when a template reads them (the payload can be large).

use std::collections::BTreeSet;
use std::sync::Arc;

use minijinja::value::{Enumerator, Object, Value};
use minijinja::{Environment, UndefinedBehavior};

use crate::event::{ChangedFiles, Event};

/// The names templates may read after `event.`.
pub const EVENT_FIELDS: &[&str] = &[
    "provider",
    "source",
    "kind",
    "deleted_kind",
    "repository",
    "repository_url",
    "repository_web_url",
    "ref",
    "ref_name",
    "before",
    "after",
    "commit",
    "pusher",
    "commit_count",
    "commits",
    "changed_files",
    "delivery",
    "payload",
];

/// The names a scheduled rule's templates may read after `schedule.`.
pub const SCHEDULE_FIELDS: &[&str] = &["rule", "time", "timezone"];

/// What a trigger's `status_context` may read after `trigger.`, besides the event: the
/// trigger as planned.
pub const TRIGGER_FIELDS: &[&str] = &["project", "ref", "upstream"];

/// The steps one template or `when` may take for one event. A template runs on the
/// request's thread with the sender's payload as its data: two nested loops over a
/// 20,000-item list in a payload took minutes; a rule's usual templates take tens of steps,
/// and a loop over a push's commits a few hundred.
pub const TEMPLATE_STEPS: u64 = 100_000;

/// The most text one template may render for one event: a project, a ref or a
/// variable's value; GitLab's whole trigger call is smaller than this in practice.
pub const MOST_RENDERED: usize = 1 << 20;

/// A fresh environment with strict undefined behaviour, Python-style string methods
/// (`event.ref_name.startswith("wip/")`), at most [`TEMPLATE_STEPS`] steps a render, and
/// no escaping: templates render CI variables and inputs, never HTML or JSON documents
/// (minijinja would otherwise choose escaping by the template's name, and an input named
/// `deploy.yml` rendered its value JSON-quoted).
pub fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_fuel(Some(TEMPLATE_STEPS));
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env
}

/// The text a template renders for every event when it has no template syntax at all
/// (every tag, expression and comment starts with `{`) and no trailing newline (which
/// rendering drops): most projects and refs in rule files are such plain text.
pub fn constant_text(source: &str) -> Option<String> {
    (!source.contains('{') && !source.ends_with('\n')).then(|| source.to_owned())
}

/// An event field that is text, which a template may render alone (`{{ event.after }}`):
/// then it is read from the event directly, without the template engine, as most
/// variables in rule files are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TextField {
    Provider,
    Source,
    Kind,
    Repository,
    RepositoryUrl,
    RepositoryWebUrl,
    Ref,
    RefName,
    Before,
    After,
    Commit,
    Pusher,
    Delivery,
}

impl TextField {
    /// The field called `name` after `event.`, when it is text.
    pub fn named(name: &str) -> Option<Self> {
        Some(match name {
            "provider" => Self::Provider,
            "source" => Self::Source,
            "kind" => Self::Kind,
            "repository" => Self::Repository,
            "repository_url" => Self::RepositoryUrl,
            "repository_web_url" => Self::RepositoryWebUrl,
            "ref" => Self::Ref,
            "ref_name" => Self::RefName,
            "before" => Self::Before,
            "after" => Self::After,
            "commit" => Self::Commit,
            "pusher" => Self::Pusher,
            "delivery" => Self::Delivery,
            _ => return None,
        })
    }

    /// The field a template renders when it is that field alone, in one `{{ event.NAME }}`
    /// with spaces or none around the name and nothing else (no filter, no trailing
    /// newline); `None` for every other template.
    pub fn rendered_alone_by(source: &str) -> Option<Self> {
        let inner = source.strip_prefix("{{")?.strip_suffix("}}")?;
        let name = inner.trim_matches(' ').strip_prefix("event.")?;
        Self::named(name)
    }

    /// The field's text in `event`.
    pub fn of(self, event: &Event) -> &str {
        match self {
            Self::Provider => event.provider.as_str(),
            Self::Source => &event.source,
            Self::Kind => event.kind.as_str(),
            Self::Repository => &event.repository,
            Self::RepositoryUrl => &event.repository_url,
            Self::RepositoryWebUrl => &event.repository_web_url,
            Self::Ref => &event.git_ref,
            Self::RefName => &event.ref_name,
            Self::Before => &event.before,
            Self::After => &event.after,
            Self::Commit => &event.commit,
            Self::Pusher => &event.pusher,
            Self::Delivery => &event.delivery,
        }
    }
}

/// The source of a template that renders `1` when `expression` is true.
pub fn expression_template(expression: &str) -> String {
    format!("{{% if {expression} %}}1{{% endif %}}")
}

/// Checks which variables a compiled template reads: each must be `event.<field>` (or
/// `schedule.<field>` for scheduled rules); anything under `event.payload` is allowed.
pub fn check_variables(
    env: &Environment<'static>,
    name: &str,
    scheduled: bool,
) -> Result<(), String> {
    check_variables_with(env, name, scheduled, false)
}

/// [`check_variables`]; `with_trigger`: `trigger.<field>` may be read too (a
/// `status_context`).
pub fn check_variables_with(
    env: &Environment<'static>,
    name: &str,
    scheduled: bool,
    with_trigger: bool,
) -> Result<(), String> {
    let template = env.get_template(name).map_err(|err| err.to_string())?;
    let names = Names::of(template.source())?;
    names.check(env)?;
    let functions: BTreeSet<&str> = env.globals().map(|(name, _)| name).collect();
    let used: BTreeSet<String> = template.undeclared_variables(true).into_iter().collect();
    for path in used {
        let mut parts = path.splitn(3, '.');
        let root = parts.next().unwrap_or_default();
        let field = parts.next();
        if functions.contains(root) {
            continue;
        }
        if names.called.contains(root) {
            return Err(format!(
                "unknown function `{root}`; the functions are: {}",
                functions.iter().copied().collect::<Vec<_>>().join(", ")
            ));
        }
        let (allowed_root, fields) = if with_trigger && root == "trigger" {
            ("trigger", TRIGGER_FIELDS)
        } else if scheduled {
            ("schedule", SCHEDULE_FIELDS)
        } else {
            ("event", EVENT_FIELDS)
        };
        if root != allowed_root {
            return Err(if scheduled && root == "event" {
                "a scheduled rule has no event; its templates may use `schedule.rule`, `schedule.time` and `schedule.timezone`".into()
            } else {
                format!("unknown variable `{root}`; templates can use `{allowed_root}.<field>`")
            });
        }
        if let Some(field) = field
            && !fields.contains(&field)
        {
            return Err(format!(
                "`{allowed_root}.{field}` does not exist; {allowed_root} fields are: {}",
                fields.join(", ")
            ));
        }
    }
    Ok(())
}

/// The filters, tests, methods and functions a template names. minijinja looks each up
/// only when a render reaches it, so a misspelt filter would pass `check` and then fail
/// every trigger of its rule; they are read from the template's tokens instead.
#[derive(Debug, Default)]
struct Names<'a> {
    filters: BTreeSet<&'a str>,
    tests: BTreeSet<&'a str>,
    methods: BTreeSet<&'a str>,
    /// Names called as functions: `range(3)`, never `x.m()` or `x | f()`.
    called: BTreeSet<&'a str>,
}

impl<'a> Names<'a> {
    fn of(source: &'a str) -> Result<Names<'a>, String> {
        use minijinja::machinery::{Token, WhitespaceConfig, tokenize};
        let tokens = tokenize(
            source,
            false,
            Default::default(),
            WhitespaceConfig::default(),
        )
        .map(|token| token.map(|(token, _)| token))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| error_text(&err))?;
        let ident = |i: usize| match tokens.get(i) {
            Some(Token::Ident(name)) => Some(*name),
            _ => None,
        };
        let mut names = Names::default();
        for (i, token) in tokens.iter().enumerate() {
            match token {
                // `x | name`, and `{% filter name %}`.
                Token::Pipe => names.filters.extend(ident(i + 1)),
                Token::BlockStart if ident(i + 1) == Some("filter") => {
                    names.filters.extend(ident(i + 2))
                }
                // `x is name`, `x is not name`.
                Token::Ident("is") => {
                    let at = if ident(i + 1) == Some("not") {
                        i + 2
                    } else {
                        i + 1
                    };
                    names.tests.extend(ident(at));
                }
                Token::Ident(name) if matches!(tokens.get(i + 1), Some(Token::ParenOpen)) => {
                    match i.checked_sub(1).map(|before| &tokens[before]) {
                        Some(Token::Dot) => {
                            names.methods.insert(name);
                        }
                        Some(Token::Pipe) => {}
                        Some(Token::Ident("is" | "not" | "filter")) => {}
                        _ => {
                            names.called.insert(name);
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(names)
    }

    /// Each filter, test and method must be one the environment has: a filter or test
    /// it knows, a Python-style method of a string, a list or a map, or a loop's own
    /// (`loop.cycle`, `loop.changed`).
    fn check(&self, env: &Environment<'static>) -> Result<(), String> {
        use minijinja::ErrorKind;
        let state = env.empty_state();
        if let Some(name) = self.filters.iter().find(|name| {
            matches!(state.apply_filter(name, &[]), Err(err) if err.kind() == ErrorKind::UnknownFilter)
        }) {
            return Err(format!(
                "unknown filter `{name}` (minijinja's filters: https://docs.rs/minijinja/latest/minijinja/filters/)"
            ));
        }
        if let Some(name) = self.tests.iter().find(|name| {
            matches!(state.perform_test(name, &[]), Err(err) if err.kind() == ErrorKind::UnknownTest)
        }) {
            return Err(format!(
                "unknown test `{name}` (minijinja's tests: https://docs.rs/minijinja/latest/minijinja/tests/)"
            ));
        }
        let samples = [
            Value::from(""),
            Value::from(Vec::<Value>::new()),
            Value::from(std::collections::BTreeMap::<String, Value>::new()),
        ];
        if let Some(name) = self.methods.iter().find(|name| {
            !matches!(**name, "cycle" | "changed")
                && samples.iter().all(|sample| {
                    matches!(sample.call_method(&state, name, &[]), Err(err) if err.kind() == ErrorKind::UnknownMethod)
                })
        }) {
            return Err(format!(
                "unknown method `{name}()`; strings, lists and maps have Python's (`startswith`, `split`, `items`, …): https://docs.rs/minijinja-contrib/latest/minijinja_contrib/pycompat/"
            ));
        }
        Ok(())
    }
}

/// Minijinja's error with its detail, on one line.
pub fn error_text(err: &minijinja::Error) -> String {
    if err.kind() == minijinja::ErrorKind::OutOfFuel {
        return format!(
            "the template takes more than {TEMPLATE_STEPS} steps for this event (a loop over a large list in the payload?)"
        );
    }
    let mut text = err.to_string();
    if let Some(detail) = err.detail()
        && !text.contains(detail)
    {
        text.push_str(": ");
        text.push_str(detail);
    }
    text
}

/// Renders `template` into a string of at most [`MOST_RENDERED`] bytes.
pub fn render_bounded(
    template: &minijinja::Template<'_, '_>,
    context: &Value,
) -> Result<String, String> {
    let mut out = Bounded::default();
    match template.render_captured_to(context, &mut out) {
        Ok(_) => Ok(String::from_utf8(out.text).expect("templates render UTF-8")),
        Err(_) if out.overflowed => Err(format!(
            "the template renders more than {} KiB for this event",
            MOST_RENDERED >> 10
        )),
        Err(err) => Err(error_text(&err)),
    }
}

/// A buffer that refuses to grow past [`MOST_RENDERED`], and says it refused.
#[derive(Default)]
struct Bounded {
    text: Vec<u8>,
    overflowed: bool,
}

impl std::io::Write for Bounded {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        if self.text.len() + bytes.len() > MOST_RENDERED {
            self.overflowed = true;
            return Err(std::io::Error::other("rendered text too long"));
        }
        self.text.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The event as templates see it.
#[derive(Debug)]
pub struct EventObject(pub Arc<Event>);

impl Object for EventObject {
    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        let event = &self.0;
        let name = key.as_str()?;
        if let Some(field) = TextField::named(name) {
            return Some(Value::from(field.of(event)));
        }
        Some(match name {
            "deleted_kind" => match event.deleted_kind {
                Some(kind) => Value::from_serialize(kind),
                None => Value::from(()),
            },
            "commit_count" => Value::from(event.commit_count),
            "commits" => Value::from_serialize(&event.commits),
            // Every file the push changed, sorted, or none when the webhook does not tell.
            "changed_files" => match event.changed_files() {
                ChangedFiles::Listed(files) => Value::from_serialize(files),
                ChangedFiles::Unknown(_) => Value::from(()),
            },
            "delivery" => Value::from(event.delivery.as_str()),
            "payload" => Value::from_serialize(event.payload.tree()),
            _ => return None,
        })
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Str(EVENT_FIELDS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plain text is used as it is only where the template engine would render it so.
    #[test]
    fn plain_text_renders_as_itself_without_the_engine() {
        for text in [
            "acme/app",
            "main",
            "release/1.2",
            "group/sub project",
            "a}b",
            "",
            " x ",
        ] {
            let env = env_with("t", text);
            let rendered = env.get_template("t").unwrap().render(()).unwrap();
            assert_eq!(
                constant_text(text).as_deref(),
                Some(rendered.as_str()),
                "{text:?}"
            );
        }
        for text in [
            "{{ event.after }}",
            "v{# note #}1",
            "{% if true %}x{% endif %}",
            "trailing\n",
        ] {
            assert_eq!(constant_text(text), None, "{text:?}");
        }
    }

    /// A field named alone is read from the event, as the engine would render it: the
    /// same text for every text field and spelling, with characters HTML and JSON escape
    /// left as they are; everything else is left to the engine.
    #[test]
    fn a_field_alone_renders_as_the_engine_renders_it() {
        use crate::event::{EventContext, Provider, RefChange};
        let event = EventContext {
            provider: Provider::Gitea,
            source: "gitea-<main>".into(),
            delivery: "d\"1'&".into(),
            repository: "acme/\"app\" & co".into(),
            repository_url: "https://example.com/a?b=1&c=<2>".into(),
            repository_web_url: String::new(),
            pusher: "Zoë <zoe@example.com>".into(),
            payload: Arc::new(
                crate::event::Payload::parsed(bytes::Bytes::from_static(b"{}")).unwrap(),
            ),
        }
        .event(RefChange {
            full_ref: "refs/tags/v1.2-ß&x".into(),
            before: "0".repeat(40),
            after: "abcdef0123456789abcdef0123456789abcdef01".into(),
            commit: Some("fedcba".into()),
            ..RefChange::default()
        })
        .unwrap();
        let context = minijinja::context! {
            event => Value::from_object(EventObject(Arc::new(event.clone())))
        };
        let mut read = 0;
        for name in EVENT_FIELDS {
            for source in [
                format!("{{{{ event.{name} }}}}"),
                format!("{{{{event.{name}}}}}"),
                format!("{{{{   event.{name}  }}}}"),
            ] {
                // Names that look like templates of other kinds, as the rules compile them.
                let env = env_with("rule.html/trigger0/inputs/deploy.yml", &source);
                let template = env
                    .get_template("rule.html/trigger0/inputs/deploy.yml")
                    .unwrap();
                let engine = render_bounded(&template, &context).unwrap();
                match TextField::rendered_alone_by(&source) {
                    Some(field) => {
                        assert_eq!(field.of(&event), engine, "{source}");
                        read += 1;
                    }
                    None => assert!(
                        [
                            "deleted_kind",
                            "commit_count",
                            "commits",
                            "changed_files",
                            "payload"
                        ]
                        .contains(name),
                        "{source} is text the engine renders as {engine:?}"
                    ),
                }
            }
        }
        assert_eq!(read, 3 * 13);
        for source in [
            "{{ event.after[:7] }}",
            "{{ event.after | upper }}",
            "{{ event.after }}\n",
            "v{{ event.after }}",
            "{{ event.after }}{{ event.before }}",
            "{{- event.after -}}",
            "{{ event.commit_count }}",
            "{{ event.payload }}",
            "{{ event.branch }}",
            "{{ schedule.time }}",
            "{{ event.\nafter }}",
        ] {
            assert_eq!(TextField::rendered_alone_by(source), None, "{source:?}");
        }
    }

    /// A sender's payload cannot make a template run for minutes or render gigabytes:
    /// each render stops at [`TEMPLATE_STEPS`] steps or [`MOST_RENDERED`] bytes.
    #[test]
    fn a_render_is_bounded_in_steps_and_in_size() {
        let payload = Value::from_serialize(serde_json::json!({
            "x": (0..20_000).collect::<Vec<u32>>(),
            "big": "y".repeat(100_000),
        }));
        let context = Value::from_serialize(serde_json::json!({ "payload": payload }));
        let render = |source: &str| {
            let env = env_with("t", source);
            let template = env.get_template("t").unwrap();
            render_bounded(&template, &context)
        };
        let nested =
            render("{% for a in payload.x %}{% for b in payload.x %}y{% endfor %}{% endfor %}");
        assert_eq!(
            nested,
            Err(format!(
                "the template takes more than {TEMPLATE_STEPS} steps for this event (a loop over a large list in the payload?)"
            ))
        );
        assert_eq!(
            render("{% for a in payload.x %}{{ payload.big }}{% endfor %}"),
            Err("the template renders more than 1024 KiB for this event".into())
        );
        // What real rules do still renders: a loop over a list, a long value under the cap.
        assert_eq!(
            render("{{ payload.x[:3] | join(',') }}").as_deref(),
            Ok("0,1,2")
        );
        assert_eq!(render("{{ payload.big }}").map(|t| t.len()), Ok(100_000));
        assert_eq!(
            render("{% for a in payload.x[:1000] %}.{% endfor %}").map(|t| t.len()),
            Ok(1000)
        );
    }

    fn env_with(name: &str, source: &str) -> Environment<'static> {
        let mut env = environment();
        env.add_template_owned(name.to_owned(), source.to_owned())
            .unwrap();
        env
    }

    #[test]
    fn variables_are_checked_against_the_event() {
        assert!(
            check_variables(
                &env_with("t", "{{ event.ref_name }}-{{ event.payload.x.y }}"),
                "t",
                false
            )
            .is_ok()
        );
        let err = check_variables(&env_with("t", "{{ event.branch }}"), "t", false).unwrap_err();
        assert!(err.contains("`event.branch` does not exist"), "{err}");
        let err = check_variables(&env_with("t", "{{ ref }}"), "t", false).unwrap_err();
        assert!(err.contains("unknown variable `ref`"), "{err}");
        let err = check_variables(&env_with("t", "{{ event.ref }}"), "t", true).unwrap_err();
        assert!(err.contains("scheduled rule has no event"), "{err}");
        assert!(check_variables(&env_with("t", "{{ schedule.time }}"), "t", true).is_ok());
        // Loop variables and filters are not event fields.
        assert!(
            check_variables(
                &env_with("t", "{% for c in event.commits %}{{ c.id }}{% endfor %}"),
                "t",
                false
            )
            .is_ok()
        );
    }

    #[test]
    fn expressions_with_python_methods() {
        let env = env_with(
            "w",
            &expression_template(
                "event.commit_count > 0 and not event.ref_name.startswith(\"wip/\")",
            ),
        );
        let template = env.get_template("w").unwrap();
        let render = |ref_name: &str, count: u64| {
            let ctx = minijinja::context! { event => minijinja::context! { ref_name => ref_name, commit_count => count } };
            template.render(ctx).unwrap()
        };
        assert_eq!(render("main", 1), "1");
        assert_eq!(render("wip/x", 1), "");
        assert_eq!(render("main", 0), "");
    }
}
