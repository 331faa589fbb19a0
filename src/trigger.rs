//! A [`Trigger`]: one pipeline-trigger call to make, and how it is encoded for GitLab.
//!
//! Both halves of the relay end here: the gateway turns one incoming trigger call into one
//! `Trigger`, and (later) rules turn one webhook into several. Everything about the shape
//! of the upstream request lives in [`Trigger::upstream_call`], so the wire format is
//! decided in exactly one place: JSON with string variables, or, for the webhook form,
//! the ref in the path and the caller's body untouched (GitLab hands that body to the
//! pipeline as `TRIGGER_PAYLOAD`).

use std::fmt;

use bytes::Bytes;
use indexmap::IndexMap;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::{Map, Value};

use crate::git_ref::GitRef;
use crate::secret::Secret;

/// Characters escaped in one URL path segment: everything but RFC 3986's unreserved set.
const PATH_SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// The variable GitLab fills with the request body; a caller's variable of that name makes
/// GitLab fail the pipeline ("Duplicate variable name: TRIGGER_PAYLOAD").
pub const RESERVED_VARIABLE: &str = "TRIGGER_PAYLOAD";

/// A GitLab project: a numeric id or a full path such as `group/sub/app`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ProjectId {
    Id(u64),
    Path(String),
}

/// A `.` or `..` path segment: percent-encoding keeps it, and a server reading the path
/// climbs with it (`/projects/../trigger/pipeline`). No GitLab project or forge
/// repository is named so.
pub fn is_dot_segment(part: &str) -> bool {
    part == "." || part == ".."
}

impl ProjectId {
    /// Reads a decoded project reference: all digits is an id, anything else a full path.
    pub fn parse(text: &str) -> Result<ProjectId, String> {
        if text.is_empty() {
            return Err("the project id is empty".into());
        }
        if text.bytes().all(|b| b.is_ascii_digit()) {
            return text
                .parse()
                .map(ProjectId::Id)
                .map_err(|_| format!("project id {text} is too large"));
        }
        // A project's web or clone URL, pasted whole: say which part is its path.
        if let Some((_, rest)) = text.split_once("://") {
            let path = rest.split_once('/').map_or("", |(_, path)| path);
            let path = path.trim_end_matches('/');
            let path = path.strip_suffix(".git").unwrap_or(path);
            return Err(format!(
                "project {text:?} is a URL; write the project's path ({path:?}) or its numeric id"
            ));
        }
        if text.split('/').any(str::is_empty) {
            return Err(format!(
                "project path {text:?} has an empty part; write it as group/sub/project"
            ));
        }
        // A `.` or `..` would steer the upstream URL (`/projects/../trigger/pipeline`);
        // GitLab's paths never have one.
        if text.split('/').any(is_dot_segment) {
            return Err(format!(
                "project path {text:?} has a `.` or `..` part; GitLab project paths never do"
            ));
        }
        if text.chars().any(|c| c.is_control()) {
            return Err(format!(
                "project path {text:?} contains a control character"
            ));
        }
        Ok(ProjectId::Path(text.to_owned()))
    }

    /// The project as one URL path segment (`group%2Fsub%2Fapp`), as GitLab's routes need.
    pub fn encoded(&self) -> String {
        match self {
            ProjectId::Id(id) => id.to_string(),
            ProjectId::Path(path) => utf8_percent_encode(path, PATH_SEGMENT).to_string(),
        }
    }
}

impl fmt::Display for ProjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProjectId::Id(id) => write!(f, "{id}"),
            ProjectId::Path(path) => f.write_str(path),
        }
    }
}

/// The kinds of [`crate::secret::GITLAB_TOKENS`] the trigger API takes: trigger tokens
/// (`glptt-`, or legacy bare hex) and CI job tokens (`glcbt-`, JWTs). Every other kind is
/// refused.
const TRIGGER_API_TAKES: &[&str] = &["glptt-", "glcbt-"];

/// Refuses a token that GitLab will certainly reject on the trigger API, saying why. GitLab
/// itself answers such a call with a bare `404 Not Found`, which users find baffling.
pub fn check_trigger_token(token: &str) -> Result<(), String> {
    let refused = crate::secret::GITLAB_TOKENS
        .iter()
        .filter(|(prefix, _)| !TRIGGER_API_TAKES.contains(prefix));
    for (prefix, kind) in refused {
        if token.starts_with(prefix) {
            return Err(format!(
                "this is {kind} ({prefix}…); the trigger API needs a pipeline trigger token \
                 (Settings > CI/CD > Pipeline trigger tokens) or a CI job token, and GitLab \
                 would answer 404 Not Found"
            ));
        }
    }
    Ok(())
}

/// Checks one variable name the way GitLab will: letters, digits and `_`, at most 255
/// characters, and never `TRIGGER_PAYLOAD`.
pub fn check_variable_name(name: &str) -> Result<(), String> {
    if name == RESERVED_VARIABLE {
        return Err(format!(
            "variables[{RESERVED_VARIABLE}] is reserved: GitLab fills it with the request \
             body and fails the pipeline when a caller sets it; choose another name"
        ));
    }
    if name.is_empty() || name.len() > 255 {
        return Err(format!(
            "variables[{name}]: a variable name must have 1 to 255 characters"
        ));
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(format!(
            "variables[{name}]: a variable name can contain only letters, digits and '_'"
        ));
    }
    Ok(())
}

/// A caller's webhook body, forwarded byte for byte with its content type.
#[derive(Clone, Debug)]
pub struct WebhookBody {
    pub content_type: Option<String>,
    pub bytes: Bytes,
}

/// One pipeline-trigger call to make.
#[derive(Clone, Debug)]
pub struct Trigger {
    /// Name of the `[upstream.NAME]` that receives it.
    pub upstream: String,
    pub project: ProjectId,
    pub git_ref: GitRef,
    pub token: Secret,
    /// Pipeline variables; all strings, names checked by [`check_variable_name`].
    pub variables: IndexMap<String, String>,
    /// Pipeline inputs (`spec:inputs`); JSON keeps their types.
    pub inputs: Map<String, Value>,
    /// Other top-level parameters the caller sent. GitLab ignores them but shows them to
    /// the pipeline in `TRIGGER_PAYLOAD`, so a drop-in gateway keeps them.
    pub other_params: Map<String, Value>,
    /// Set for the webhook form (`…/ref/:ref/trigger/pipeline`).
    pub webhook_body: Option<WebhookBody>,
}

/// The HTTP request a trigger becomes, relative to the upstream's base URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamCall {
    pub path_and_query: String,
    pub content_type: Option<String>,
    pub body: Bytes,
}

impl Trigger {
    /// Encodes the call GitLab expects.
    ///
    /// The plain form is a JSON body (`token`, `ref`, `variables`, `inputs`, other
    /// parameters) with every variable a string. The webhook form keeps the caller's body
    /// and content type, puts the ref in the path and the token, variables and inputs in
    /// the query string, exactly as a webhook pointed at GitLab would have sent them.
    pub fn upstream_call(&self) -> UpstreamCall {
        let project = self.project.encoded();
        match &self.webhook_body {
            None => UpstreamCall {
                path_and_query: format!("/api/v4/projects/{project}/trigger/pipeline"),
                content_type: Some("application/json".into()),
                body: Bytes::from(self.json_body()),
            },
            Some(webhook) => {
                let mut query = form_urlencoded::Serializer::new(String::new());
                query.append_pair("token", self.token.expose());
                for (key, value) in &self.variables {
                    query.append_pair(&format!("variables[{key}]"), value);
                }
                for (key, value) in &self.inputs {
                    let text = match value {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    query.append_pair(&format!("inputs[{key}]"), &text);
                }
                // The caller's other query parameters go on to GitLab, which puts them in
                // `TRIGGER_PAYLOAD` as it would have without the relay.
                for (key, value) in &self.other_params {
                    append_query_param(&mut query, key, value);
                }
                let git_ref = utf8_percent_encode(self.git_ref.as_str(), PATH_SEGMENT);
                UpstreamCall {
                    path_and_query: format!(
                        "/api/v4/projects/{project}/ref/{git_ref}/trigger/pipeline?{}",
                        query.finish()
                    ),
                    content_type: webhook.content_type.clone(),
                    body: webhook.bytes.clone(),
                }
            }
        }
    }

    /// The plain form's JSON body: `token`, `ref`, `variables` and `inputs` (where there
    /// are any), then the caller's other parameters but those named so. Written straight
    /// from the trigger: a JSON tree built first and then printed cost every send about
    /// 5,000 instructions more.
    fn json_body(&self) -> Vec<u8> {
        use serde::ser::{SerializeMap, Serializer};
        let mut body = Vec::with_capacity(128);
        let mut writer = serde_json::Serializer::new(&mut body);
        let written = (|| {
            let mut map = writer.serialize_map(None)?;
            map.serialize_entry("token", self.token.expose())?;
            map.serialize_entry("ref", self.git_ref.as_str())?;
            if !self.variables.is_empty() {
                map.serialize_entry("variables", &self.variables)?;
            }
            if !self.inputs.is_empty() {
                map.serialize_entry("inputs", &self.inputs)?;
            }
            for (key, value) in &self.other_params {
                let named = match key.as_str() {
                    "token" | "ref" => true,
                    "variables" => !self.variables.is_empty(),
                    "inputs" => !self.inputs.is_empty(),
                    _ => false,
                };
                if !named {
                    map.serialize_entry(key, value)?;
                }
            }
            map.end()
        })();
        // Strings and JSON values into memory: nothing here can fail to serialize.
        written.expect("a trigger's JSON body serializes");
        body
    }
}

/// Appends one parameter to a query string in Rack's nesting (`a[b]=c`, `a[]=1`), the
/// form [`crate::gateway::params::parse_query`] reads: strings as they are, other values as JSON text.
fn append_query_param(
    query: &mut form_urlencoded::Serializer<'_, String>,
    name: &str,
    value: &Value,
) {
    match value {
        Value::Object(map) => {
            for (key, value) in map {
                append_query_param(query, &format!("{name}[{key}]"), value);
            }
        }
        Value::Array(items) => {
            for item in items {
                append_query_param(query, &format!("{name}[]"), item);
            }
        }
        Value::String(text) => {
            query.append_pair(name, text);
        }
        Value::Null => {
            query.append_key_only(name);
        }
        other => {
            query.append_pair(name, &other.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trigger(project: &str, git_ref: &str) -> Trigger {
        Trigger {
            upstream: "gitlab".into(),
            project: ProjectId::parse(project).unwrap(),
            git_ref: GitRef::parse(git_ref).unwrap(),
            token: Secret::new("glptt-abc"),
            variables: IndexMap::new(),
            inputs: Map::new(),
            other_params: Map::new(),
            webhook_body: None,
        }
    }

    #[test]
    fn project_ids_and_paths() {
        assert_eq!(ProjectId::parse("9"), Ok(ProjectId::Id(9)));
        assert_eq!(
            ProjectId::parse("group/sub/app").unwrap().encoded(),
            "group%2Fsub%2Fapp"
        );
        assert_eq!(ProjectId::parse("a.b-c_d").unwrap().encoded(), "a.b-c_d");
        assert!(ProjectId::parse("").is_err());
        assert!(ProjectId::parse("group//app").is_err());
        // A web or clone URL pasted whole is answered with its path.
        for url in [
            "https://gitlab.example.com/group/app",
            "https://gitlab.example.com/group/app.git",
            "https://gitlab.example.com/group/app/",
        ] {
            assert_eq!(
                ProjectId::parse(url).unwrap_err(),
                format!(
                    "project {url:?} is a URL; write the project's path (\"group/app\") or its numeric id"
                )
            );
        }
        for steering in ["..", ".", "group/..", "../app", "group/./app"] {
            let err = ProjectId::parse(steering).unwrap_err();
            assert!(err.contains("`.` or `..`"), "{steering}: {err}");
        }
        assert!(ProjectId::parse("group/.hidden/app..x").is_ok());
        assert!(ProjectId::parse("99999999999999999999999").is_err());
    }

    #[test]
    fn plain_calls_are_json_with_string_variables_in_order() {
        let mut t = trigger("9", "master");
        t.variables.insert("Z_LAST".into(), "1".into());
        t.variables.insert("A_FIRST".into(), "true".into());
        t.inputs.insert("level".into(), Value::from(3));
        let call = t.upstream_call();
        assert_eq!(call.path_and_query, "/api/v4/projects/9/trigger/pipeline");
        assert_eq!(call.content_type.as_deref(), Some("application/json"));
        assert_eq!(
            std::str::from_utf8(&call.body).unwrap(),
            r#"{"token":"glptt-abc","ref":"master","variables":{"Z_LAST":"1","A_FIRST":"true"},"inputs":{"level":3}}"#
        );
    }

    /// The caller's other parameters follow, but never in place of the trigger's own.
    #[test]
    fn other_parameters_follow_and_never_replace_the_triggers_own() {
        let mut t = trigger("9", "main");
        t.variables.insert("V".into(), "x\"y".into());
        for (key, value) in [
            ("token", Value::from("other")),
            ("ref", Value::from("other")),
            ("variables", Value::from("other")),
            ("inputs", serde_json::json!({ "kept": true })),
            ("extra", serde_json::json!({ "a": [1, "b"] })),
        ] {
            t.other_params.insert(key.into(), value);
        }
        let call = t.upstream_call();
        assert_eq!(
            std::str::from_utf8(&call.body).unwrap(),
            r#"{"token":"glptt-abc","ref":"main","variables":{"V":"x\"y"},"inputs":{"kept":true},"extra":{"a":[1,"b"]}}"#
        );
    }

    #[test]
    fn webhook_calls_keep_the_body_and_put_the_ref_in_the_path() {
        let mut t = trigger("group/app", "feature/x");
        t.webhook_body = Some(WebhookBody {
            content_type: Some("application/json".into()),
            bytes: Bytes::from_static(br#"{"ref":"refs/heads/other"}"#),
        });
        t.variables.insert("K".into(), "a b&c".into());
        let call = t.upstream_call();
        assert_eq!(
            call.path_and_query,
            "/api/v4/projects/group%2Fapp/ref/feature%2Fx/trigger/pipeline?token=glptt-abc&variables%5BK%5D=a+b%26c"
        );
        assert_eq!(&call.body[..], br#"{"ref":"refs/heads/other"}"#);
    }

    #[test]
    fn token_kinds() {
        assert!(check_trigger_token("glptt-0123").is_ok());
        assert!(check_trigger_token("0123456789abcdef0123456789abcd").is_ok());
        assert!(check_trigger_token("glcbt-64_abc").is_ok());
        let err = check_trigger_token("glpat-xxxxxxxxxxxxxxxxxxxx").unwrap_err();
        assert!(err.contains("personal"), "{err}");
        assert!(err.contains("trigger token"), "{err}");
        assert!(
            !err.contains("xxxx"),
            "the message must not echo the token: {err}"
        );
    }

    #[test]
    fn variable_names() {
        assert!(check_variable_name("UPLOAD_TO_S3").is_ok());
        assert!(
            check_variable_name("TRIGGER_PAYLOAD")
                .unwrap_err()
                .contains("reserved")
        );
        assert!(check_variable_name("a-b").is_err());
        assert!(check_variable_name("").is_err());
        assert!(check_variable_name(&"A".repeat(256)).is_err());
    }
}
