//! Trigger-call parameters, read the way GitLab reads them.
//!
//! GitLab's API is Grape on Rack: parameters come from the query string and from a
//! urlencoded, multipart or JSON body; `variables[KEY]=value` nests by Rack's rules; the
//! body wins over the query string per top-level key (shallow: a `variables` map in the
//! body replaces one in the query), and a ref in the URL path wins over both. Every
//! encoding is turned into one JSON object here, so the rest of the gateway sees a single
//! shape. Nothing here touches the network; the fuzz target drives it directly.

use bytes::Bytes;
use indexmap::IndexMap;
use serde_json::{Map, Value};

use crate::json_syntax::JsonSyntaxError;

/// All parameters of one call, by top-level name.
pub type Params = Map<String, Value>;

/// Most parameters one request may carry (Rack's default `params_limit`).
pub const MAX_PARAMS: usize = 4096;
/// Deepest `a[b][c]…` nesting accepted (Rack's default is 32).
pub const MAX_DEPTH: usize = 32;

/// Why a call's parameters could not be read.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ParamError {
    #[error("the body is not valid JSON: {0}")]
    Json(JsonSyntaxError),
    #[error("the multipart body cannot be read: {0}")]
    Multipart(String),
    #[error("the request has more than {MAX_PARAMS} parameters")]
    TooMany,
    #[error(
        "a JSON body must be an object: {{\"token\": \"…\", \"ref\": \"main\", \"variables\": {{…}}}}"
    )]
    NotAnObject,
    #[error("parameter {0:?} is nested more than {MAX_DEPTH} levels deep")]
    TooDeep(String),
    #[error("parameter {0:?} is given both as a single value and as a list or map")]
    Conflict(String),
    #[error(
        "content type {0:?} is not supported: send application/json, application/x-www-form-urlencoded or multipart/form-data"
    )]
    UnsupportedContentType(String),
    /// Grape's parameter validation, joined as GitLab joins it: `{"error": "ref is missing"}`.
    #[error("{}", .0.join(", "))]
    Invalid(Vec<String>),
    /// GitLab's own check on variable values: `{"message": "variables needs to be …"}`.
    #[error("variables needs to be a map of key-valued strings")]
    VariablesNotStrings,
}

/// How a body is encoded, from its `Content-Type`.
#[derive(Debug, PartialEq, Eq)]
pub enum BodyEncoding {
    Json,
    UrlEncoded,
    Multipart { boundary: String },
    Other(String),
}

impl BodyEncoding {
    pub fn from_content_type(content_type: &str) -> BodyEncoding {
        let media_type = content_type
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        match media_type.as_str() {
            "application/json" => BodyEncoding::Json,
            "application/x-www-form-urlencoded" => BodyEncoding::UrlEncoded,
            "multipart/form-data" => match multer::parse_boundary(content_type) {
                Ok(boundary) => BodyEncoding::Multipart { boundary },
                Err(_) => BodyEncoding::Other(media_type),
            },
            _ => BodyEncoding::Other(media_type),
        }
    }
}

/// Parses a query string (`token=…&variables[K]=v`).
pub fn parse_query(query: &str) -> Result<Params, ParamError> {
    parse_urlencoded(query.as_bytes())
}

/// Parses an `application/x-www-form-urlencoded` body.
pub fn parse_urlencoded(body: &[u8]) -> Result<Params, ParamError> {
    let mut params = Params::new();
    for (count, (name, value)) in form_urlencoded::parse(body).enumerate() {
        if count >= MAX_PARAMS {
            return Err(ParamError::TooMany);
        }
        insert_nested(&mut params, &name, Value::String(value.into_owned()), 0)?;
    }
    Ok(params)
}

/// Parses a `multipart/form-data` body (what `curl --form` sends). A file part becomes a
/// map describing the file, which no string parameter accepts, as in GitLab.
pub async fn parse_multipart(body: Bytes, boundary: &str) -> Result<Params, ParamError> {
    let stream = futures_util::stream::once(async move { Ok::<Bytes, std::io::Error>(body) });
    let mut multipart = multer::Multipart::new(stream, boundary);
    let mut params = Params::new();
    let mut count = 0;
    while let Some(field) = multipart
        .next_field()
        .await
        .map_err(|err| ParamError::Multipart(err.to_string()))?
    {
        count += 1;
        if count > MAX_PARAMS {
            return Err(ParamError::TooMany);
        }
        let Some(name) = field.name().map(str::to_owned) else {
            continue;
        };
        let value = match field.file_name() {
            Some(file_name) => {
                let mut file = Map::new();
                file.insert("filename".into(), file_name.into());
                if let Some(mime) = field.content_type() {
                    file.insert("type".into(), mime.to_string().into());
                }
                Value::Object(file)
            }
            None => Value::String(
                field
                    .text()
                    .await
                    .map_err(|err| ParamError::Multipart(err.to_string()))?,
            ),
        };
        insert_nested(&mut params, &name, value, 0)?;
    }
    Ok(params)
}

/// Most values (objects, arrays, scalars) a trigger call's JSON body may hold: a call is a
/// token, a ref and a few thousand variables or inputs at the very most.
pub const MAX_JSON_VALUES: usize = 4 * MAX_PARAMS;

/// An upper bound on the number of values in a JSON text, counted without parsing it:
/// every value after the first is preceded by `,`, `[`, `{` or `:` outside strings.
fn json_values_bound(body: &[u8]) -> usize {
    let (mut count, mut in_string, mut escaped) = (1, false, false);
    for &byte in body {
        if in_string {
            match (escaped, byte) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
        } else {
            match byte {
                b'"' => in_string = true,
                b',' | b'[' | b'{' | b':' => count += 1,
                _ => {}
            }
        }
    }
    count
}

/// Parses a trigger call's JSON body, which must be an object. A body with more values
/// than any call needs is refused before a tree of it is built.
pub fn parse_json(body: &[u8]) -> Result<Params, ParamError> {
    if json_values_bound(body) > MAX_JSON_VALUES {
        return Err(ParamError::TooMany);
    }
    match crate::json_syntax::read::<Value>(body) {
        Ok(Value::Object(map)) => {
            for name in ["variables", "inputs"] {
                if map
                    .get(name)
                    .and_then(Value::as_object)
                    .is_some_and(|m| m.len() > MAX_PARAMS)
                {
                    return Err(ParamError::TooMany);
                }
            }
            Ok(map)
        }
        Ok(_) => Err(ParamError::NotAnObject),
        Err(err) => Err(ParamError::Json(JsonSyntaxError::from(&err))),
    }
}

/// The parameters GitLab reads from a webhook sent to the webhook form: only these four
/// top-level fields; the rest of the webhook is skipped, never built into a tree.
#[derive(serde::Deserialize)]
struct WebhookParams {
    token: Option<Value>,
    #[serde(rename = "ref")]
    git_ref: Option<Value>,
    variables: Option<Value>,
    inputs: Option<Value>,
}

/// Reads the trigger parameters out of a webhook body (JSON of any shape and size).
fn parse_webhook_json(body: &[u8]) -> Result<Params, ParamError> {
    let fields = match crate::json_syntax::read::<WebhookParams>(body) {
        Ok(fields) => fields,
        Err(err) if err.is_data() => return Ok(Params::new()), // not an object: no params
        Err(err) => return Err(ParamError::Json(JsonSyntaxError::from(&err))),
    };
    let mut params = Params::new();
    for (name, value) in [
        ("token", fields.token),
        ("ref", fields.git_ref),
        ("variables", fields.variables),
        ("inputs", fields.inputs),
    ] {
        if let Some(value) = value {
            if value.as_object().is_some_and(|m| m.len() > MAX_PARAMS) {
                return Err(ParamError::TooMany);
            }
            params.insert(name.into(), value);
        }
    }
    Ok(params)
}

/// Parses a body by its encoding. `strict` refuses encodings GitLab cannot read (the plain
/// endpoint); otherwise they contribute no parameters (a webhook body of any kind).
pub async fn parse_body(
    content_type: Option<&str>,
    body: &Bytes,
    strict: bool,
) -> Result<Params, ParamError> {
    if body.is_empty() {
        return Ok(Params::new());
    }
    let encoding = match content_type {
        Some(content_type) => BodyEncoding::from_content_type(content_type),
        None if strict => BodyEncoding::Other(String::new()),
        None => return Ok(Params::new()),
    };
    match encoding {
        BodyEncoding::Json if strict => parse_json(body),
        BodyEncoding::Json => parse_webhook_json(body),
        BodyEncoding::UrlEncoded => parse_urlencoded(body),
        BodyEncoding::Multipart { boundary } => parse_multipart(body.clone(), &boundary).await,
        BodyEncoding::Other(media_type) if strict => {
            Err(ParamError::UnsupportedContentType(media_type))
        }
        BodyEncoding::Other(_) => Ok(Params::new()),
    }
}

/// Puts one `name=value` pair into `params` by Rack's nesting rules: `a[b]` is a map
/// entry, `a[]` a list item, `a[][b]` a map in a list.
fn insert_nested(
    params: &mut Params,
    name: &str,
    value: Value,
    depth: usize,
) -> Result<(), ParamError> {
    if depth > MAX_DEPTH {
        return Err(ParamError::TooDeep(name.to_owned()));
    }
    // Rack looks for the first `[` after the first character.
    let split = name
        .char_indices()
        .skip(1)
        .find(|&(_, c)| c == '[')
        .map(|(i, _)| i);
    let (key, after) = match split {
        Some(i) => (&name[..i], &name[i..]),
        None => (name, ""),
    };
    if key.is_empty() {
        return Ok(());
    }
    if after.is_empty() || after == "[" {
        let key = if after.is_empty() { key } else { name };
        params.insert(key.to_owned(), value);
        return Ok(());
    }
    if after == "[]" {
        let entry = params
            .entry(key.to_owned())
            .or_insert_with(|| Value::Array(Vec::new()));
        let Value::Array(items) = entry else {
            return Err(ParamError::Conflict(key.to_owned()));
        };
        items.push(value);
        return Ok(());
    }
    if let Some(rest) = after.strip_prefix("[]") {
        // `a[][b]=1&a[][c]=2` builds one map per item until a key repeats.
        let Some(child) = child_name(rest) else {
            params.insert(name.to_owned(), value);
            return Ok(());
        };
        let entry = params
            .entry(key.to_owned())
            .or_insert_with(|| Value::Array(Vec::new()));
        let Value::Array(items) = entry else {
            return Err(ParamError::Conflict(key.to_owned()));
        };
        let child_key = top_key(&child);
        let reuse_last =
            matches!(items.last(), Some(Value::Object(m)) if !m.contains_key(child_key));
        if !reuse_last {
            items.push(Value::Object(Map::new()));
        }
        let Some(Value::Object(last)) = items.last_mut() else {
            return Err(ParamError::Conflict(key.to_owned()));
        };
        return insert_nested(last, &child, value, depth + 1);
    }
    match child_name(after) {
        Some(child) => {
            let entry = params
                .entry(key.to_owned())
                .or_insert_with(|| Value::Object(Map::new()));
            let Value::Object(map) = entry else {
                return Err(ParamError::Conflict(key.to_owned()));
            };
            insert_nested(map, &child, value, depth + 1)
        }
        None => {
            params.insert(name.to_owned(), value);
            Ok(())
        }
    }
}

/// `[b][c]` → `b[c]`; `None` when there is no closing bracket or no name inside.
fn child_name(after: &str) -> Option<String> {
    let inner = after.strip_prefix('[')?;
    let close = inner.find(']')?;
    if close == 0 {
        return None;
    }
    Some(format!("{}{}", &inner[..close], &inner[close + 1..]))
}

fn top_key(name: &str) -> &str {
    match name.char_indices().skip(1).find(|&(_, c)| c == '[') {
        Some((i, _)) => &name[..i],
        None => name,
    }
}

/// Merges query and body parameters as Rack does: the body wins, per top-level key.
pub fn merge(query: Params, body: Params) -> Params {
    let mut merged = query;
    for (key, value) in body {
        merged.insert(key, value);
    }
    merged
}

/// A call's parameters after Grape's validation: required ones present, maps are maps.
#[derive(Debug, PartialEq)]
pub struct CallParams {
    pub token: String,
    pub git_ref: String,
    /// Still unchecked values: GitLab checks them only after refusing pipeline hooks.
    pub variables: Map<String, Value>,
    pub inputs: Map<String, Value>,
    pub other: Params,
}

/// Applies the ref from the URL path (it wins over everything), then Grape's validation
/// in GitLab's declaration order (`ref`, `token`, `variables`, `inputs`).
pub fn validate(mut params: Params, path_ref: Option<String>) -> Result<CallParams, ParamError> {
    if let Some(path_ref) = path_ref {
        params.insert("ref".into(), Value::String(path_ref));
    }
    let mut problems = Vec::new();
    let git_ref = required_string(&mut params, "ref", &mut problems);
    // GitLab declares `token` without `allow_blank: false`: an empty one passes validation
    // and then finds no trigger (404), which the gateway answers in GitLab's place.
    let token = match params.get("token") {
        Some(Value::Null) => {
            params.remove("token");
            Some(String::new())
        }
        Some(Value::String(s)) if s.trim().is_empty() => {
            params.remove("token");
            Some(String::new())
        }
        _ => required_string(&mut params, "token", &mut problems),
    };
    let variables = optional_map(&mut params, "variables", &mut problems);
    let inputs = optional_map(&mut params, "inputs", &mut problems);
    // GitLab sets `id` from the path; a body `id` never reaches the pipeline.
    params.remove("id");
    match (git_ref, token) {
        (Some(git_ref), Some(token)) if problems.is_empty() => Ok(CallParams {
            token,
            git_ref,
            variables,
            inputs,
            other: params,
        }),
        _ => Err(ParamError::Invalid(problems)),
    }
}

fn required_string(params: &mut Params, name: &str, problems: &mut Vec<String>) -> Option<String> {
    match params.remove(name) {
        None => {
            problems.push(format!("{name} is missing"));
            None
        }
        Some(Value::String(s)) if s.trim().is_empty() => {
            problems.push(format!("{name} is empty"));
            None
        }
        Some(Value::Null) => {
            problems.push(format!("{name} is empty"));
            None
        }
        Some(Value::String(s)) => Some(s),
        Some(Value::Number(n)) => Some(n.to_string()),
        Some(Value::Bool(b)) => Some(b.to_string()),
        Some(_) => {
            problems.push(format!("{name} is invalid"));
            None
        }
    }
}

fn optional_map(params: &mut Params, name: &str, problems: &mut Vec<String>) -> Map<String, Value> {
    match params.remove(name) {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(map)) => map,
        Some(_) => {
            problems.push(format!("{name} is invalid"));
            Map::new()
        }
    }
}

/// GitLab's rule for variable values: every one a string.
pub fn string_variables(
    variables: Map<String, Value>,
) -> Result<IndexMap<String, String>, ParamError> {
    variables
        .into_iter()
        .map(|(key, value)| match value {
            Value::String(s) => Ok((key, s)),
            _ => Err(ParamError::VariablesNotStrings),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(value: Value) -> Params {
        match value {
            Value::Object(map) => map,
            _ => panic!("not an object"),
        }
    }

    #[test]
    fn query_with_nested_variables() {
        let params = parse_query("token=T&ref=main&variables[A]=1&variables%5BB%5D=x+y").unwrap();
        assert_eq!(
            Value::Object(params),
            json!({"token":"T","ref":"main","variables":{"A":"1","B":"x y"}})
        );
    }

    #[test]
    fn rack_nesting_rules() {
        let params =
            parse_urlencoded(b"a[b][c]=1&l[]=x&l[]=y&h[][k]=1&h[][j]=2&h[][k]=3&w[=1&[x]=2")
                .unwrap();
        assert_eq!(
            Value::Object(params),
            json!({
                "a": {"b": {"c": "1"}},
                "l": ["x", "y"],
                "h": [{"k": "1", "j": "2"}, {"k": "3"}],
                "w[": "1",
                "[x]": "2"
            })
        );
    }

    #[test]
    fn later_values_win_and_conflicts_are_refused() {
        let params = parse_query("ref=a&ref=b").unwrap();
        assert_eq!(params["ref"], "b");
        assert_eq!(
            parse_query("variables=x&variables[A]=1").unwrap_err(),
            ParamError::Conflict("variables".into())
        );
    }

    #[test]
    fn limits_on_count_and_depth() {
        let many = "a=1&".repeat(MAX_PARAMS + 1);
        assert_eq!(parse_query(&many).unwrap_err(), ParamError::TooMany);
        let deep = format!("a{}=1", "[b]".repeat(MAX_DEPTH + 2));
        assert!(matches!(
            parse_query(&deep).unwrap_err(),
            ParamError::TooDeep(_)
        ));
    }

    #[test]
    fn json_bodies_and_errors_with_position() {
        let params = parse_json(br#"{"token":"T","variables":{"A":"1"}}"#).unwrap();
        assert_eq!(params["variables"], json!({"A":"1"}));
        assert_eq!(parse_json(b"[1]").unwrap_err(), ParamError::NotAnObject);
        // Huge bodies are refused by counting, before any tree is built.
        let zeros = format!("[{}0]", "0,".repeat(MAX_JSON_VALUES));
        assert_eq!(
            parse_json(zeros.as_bytes()).unwrap_err(),
            ParamError::TooMany
        );
        let keys: String = (0..MAX_PARAMS + 1)
            .map(|i| format!("\"K{i}\":\"v\","))
            .collect();
        let many = format!(
            "{{\"token\":\"T\",\"variables\":{{{}}}}}",
            keys.trim_end_matches(',')
        );
        assert_eq!(
            parse_json(many.as_bytes()).unwrap_err(),
            ParamError::TooMany
        );
        // Commas and braces inside strings are not values.
        let quoted = format!("{{\"token\":\"{}\"}}", ",[{:".repeat(MAX_JSON_VALUES));
        assert!(parse_json(quoted.as_bytes()).is_ok());
        // A webhook sent to the webhook form: only its trigger fields are read.
        let webhook = br#"{"object_kind":"push","ref":"refs/heads/x","commits":[{"id":"1"}],"variables":{"A":"1"}}"#;
        let params = parse_webhook_json(webhook).unwrap();
        assert_eq!(params.len(), 2, "{params:?}");
        assert_eq!(parse_webhook_json(b"[0,0,0]").unwrap(), Params::new());
        let err = parse_json(b"{\n  \"token\": }").unwrap_err();
        assert_eq!(
            err,
            ParamError::Json(JsonSyntaxError {
                message: "expected value".into(),
                line: 2,
                column: 12
            })
        );
    }

    #[test]
    fn multipart_like_curl_form() {
        let body = "--XYZ\r\nContent-Disposition: form-data; name=\"token\"\r\n\r\nTOKEN\r\n\
                    --XYZ\r\nContent-Disposition: form-data; name=\"ref\"\r\n\r\nmaster\r\n\
                    --XYZ\r\nContent-Disposition: form-data; name=\"variables[UPLOAD_TO_S3]\"\r\n\r\ntrue\r\n\
                    --XYZ\r\nContent-Disposition: form-data; name=\"variables[F]\"; filename=\"f.txt\"\r\nContent-Type: text/plain\r\n\r\nhello\r\n\
                    --XYZ--\r\n";
        let params = futures_executor::block_on(parse_multipart(Bytes::from(body), "XYZ")).unwrap();
        assert_eq!(
            Value::Object(params),
            json!({"token":"TOKEN","ref":"master","variables":{"UPLOAD_TO_S3":"true","F":{"filename":"f.txt","type":"text/plain"}}})
        );
        let broken =
            futures_executor::block_on(parse_multipart(Bytes::from("--XYZ\r\nbad"), "XYZ"));
        assert!(matches!(broken, Err(ParamError::Multipart(_))));
    }

    #[test]
    fn content_types() {
        assert_eq!(
            BodyEncoding::from_content_type("application/json; charset=utf-8"),
            BodyEncoding::Json
        );
        assert_eq!(
            BodyEncoding::from_content_type("Application/X-WWW-Form-Urlencoded"),
            BodyEncoding::UrlEncoded
        );
        assert_eq!(
            BodyEncoding::from_content_type("multipart/form-data; boundary=abc"),
            BodyEncoding::Multipart {
                boundary: "abc".into()
            }
        );
        assert_eq!(
            BodyEncoding::from_content_type("multipart/form-data"),
            BodyEncoding::Other("multipart/form-data".into())
        );
        assert_eq!(
            BodyEncoding::from_content_type("text/plain"),
            BodyEncoding::Other("text/plain".into())
        );
    }

    #[test]
    fn body_wins_over_query_shallowly_and_path_ref_wins_over_both() {
        let query = obj(json!({"token":"Q","ref":"q","variables":{"A":"1","B":"2"}}));
        let body = obj(json!({"ref":"b","variables":{"A":"9"}}));
        let call = validate(merge(query, body), Some("path".into())).unwrap();
        assert_eq!(call.token, "Q");
        assert_eq!(call.git_ref, "path");
        assert_eq!(Value::Object(call.variables), json!({"A":"9"}));
    }

    #[test]
    fn grape_style_validation_messages() {
        let err = validate(Params::new(), None).unwrap_err();
        assert_eq!(err.to_string(), "ref is missing, token is missing");
        let err = validate(obj(json!({"ref":"","token":"T"})), None).unwrap_err();
        assert_eq!(err.to_string(), "ref is empty");
        let err = validate(obj(json!({"ref":"m","token":"T","variables":"x"})), None).unwrap_err();
        assert_eq!(err.to_string(), "variables is invalid");
        let err = validate(obj(json!({"ref":"m","token":"T","inputs":[1]})), None).unwrap_err();
        assert_eq!(err.to_string(), "inputs is invalid");
        let ok = validate(
            obj(json!({"ref":"m","token":"T","id":"5","extra":"e"})),
            None,
        )
        .unwrap();
        assert_eq!(Value::Object(ok.other), json!({"extra":"e"}));
    }

    #[test]
    fn variable_values_must_be_strings() {
        assert!(string_variables(obj(json!({"A":"1"}))).is_ok());
        for bad in [
            json!({"A":1}),
            json!({"A":true}),
            json!({"A":null}),
            json!({"A":["1","2"]}),
            json!({"A":{"B":"c"}}),
        ] {
            assert_eq!(
                string_variables(obj(bad)).unwrap_err(),
                ParamError::VariablesNotStrings
            );
        }
    }
}
