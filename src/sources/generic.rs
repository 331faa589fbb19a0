//! Generic JSON senders: any JSON body, with the proof and the field paths configured.
//!
//! Proof, by `[source.NAME] signature`: an HMAC of the raw body in a header (algorithm
//! sha1, sha256 or sha512; hex or base64; optional prefix such as `sha256=`), Standard
//! Webhooks (with `signing_secret`), or a plain token header. Fields are read from dotted
//! JSON paths (`repository.full_name`, `changes.0.ref`); a short ref is taken as a branch.
//! A zero `after` is a deletion. Delivery id: the configured header, else the configured
//! path, else a hash of the body.

use serde_json::Value;

use super::signature::{
    SignatureError, StandardWebhookHeaders, any_token_matches, verify_hmac_header,
    verify_standard_webhook,
};
use super::{
    GenericScheme, Received, SourceConfig, SourceError, Verification, WebhookRequest, context,
    derived_delivery, one_event, parsed_payload,
};
use crate::event::{RefChange, RefType, ZERO_ID, full_ref};

/// The value at a dotted path; numeric parts index arrays.
pub fn lookup<'a>(value: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.')
        .try_fold(value, |current, part| match current {
            Value::Object(map) => map.get(part),
            Value::Array(items) => part.parse::<usize>().ok().and_then(|i| items.get(i)),
            _ => None,
        })
}

fn lookup_text(value: &Value, path: &str) -> Option<String> {
    match lookup(value, path)? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The list of strings at a dotted path; `None` when it is missing or holds anything else.
fn string_list(value: &Value, path: &str) -> Option<Vec<String>> {
    lookup(value, path)?
        .as_array()?
        .iter()
        .map(|item| item.as_str().map(str::to_owned))
        .collect()
}

pub fn receive(
    source: &SourceConfig,
    request: &WebhookRequest<'_>,
    verification: Verification,
) -> Result<Received, SourceError> {
    if let Verification::Check { now } = verification {
        verify(source, request, now)?;
    }
    let payload = parsed_payload(request.body.clone())?;
    let paths = &source.generic.paths;
    // A signed `webhook-id` is the delivery id: an unsigned header must not make a
    // replayed webhook look new.
    let signed_id = matches!(source.generic.scheme, GenericScheme::StandardWebhooks)
        .then(|| request.header(super::signature::WEBHOOK_ID))
        .flatten();
    let delivery = signed_id
        .or_else(|| {
            source
                .generic
                .delivery_header
                .as_deref()
                .and_then(|h| request.header(h))
        })
        .map(str::to_owned)
        .or_else(|| {
            paths
                .delivery
                .as_deref()
                .and_then(|p| lookup_text(payload.tree(), p))
                // An empty id would make every later webhook a duplicate of the first.
                .filter(|id| !id.trim().is_empty())
        })
        .unwrap_or_else(|| derived_delivery(request.body));
    let required = |path: &str, what: &str| {
        lookup_text(payload.tree(), path)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                SourceError::Payload(format!("the payload has no {what} at `{path}` (a string)"))
            })
    };
    let repository = required(&paths.repository, "repository")?;
    let git_ref = required(&paths.git_ref, "ref")?;
    let optional =
        |path: &Option<String>| path.as_deref().and_then(|p| lookup_text(payload.tree(), p));
    let mut ctx = context(source, &delivery, payload.clone());
    ctx.repository = repository;
    ctx.repository_url = optional(&paths.repository_url).unwrap_or_default();
    ctx.pusher = optional(&paths.pusher).unwrap_or_default();
    let full = if git_ref.starts_with("refs/") {
        git_ref
    } else {
        full_ref(RefType::Branch, &git_ref)
    };
    let outcome = one_event(
        &ctx,
        RefChange {
            full_ref: full,
            before: optional(&paths.before).unwrap_or_else(|| ZERO_ID.into()),
            after: optional(&paths.after).unwrap_or_default(),
            files: paths
                .changed_files
                .as_deref()
                .and_then(|path| string_list(payload.tree(), path)),
            ..RefChange::default()
        },
    )?;
    Ok(Received {
        delivery,
        event_type: "generic".into(),
        outcome,
    })
}

fn verify(
    source: &SourceConfig,
    request: &WebhookRequest<'_>,
    now: std::time::SystemTime,
) -> Result<(), SourceError> {
    let missing = |header: &str| SignatureError::Missing {
        header: header.to_owned(),
    };
    match &source.generic.scheme {
        GenericScheme::None => Ok(()),
        GenericScheme::Hmac {
            header,
            algorithm,
            encoding,
            prefix,
        } => {
            let value = request.header(header).ok_or_else(|| missing(header))?;
            Ok(verify_hmac_header(
                header,
                value,
                prefix,
                *encoding,
                *algorithm,
                &source.secrets,
                request.body,
            )?)
        }
        GenericScheme::Token { header } => {
            let value = request
                .headers
                .get(header.as_str())
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| missing(header))?;
            if any_token_matches(&source.secrets, value) {
                Ok(())
            } else {
                Err(SignatureError::Mismatch {
                    header: header.clone(),
                }
                .into())
            }
        }
        GenericScheme::StandardWebhooks => {
            let headers = StandardWebhookHeaders::of(request);
            Ok(verify_standard_webhook(
                &source.signing_keys,
                &headers,
                request.body,
                now,
                source.timestamp_tolerance,
            )?)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::ChangedFiles;

    #[test]
    fn dotted_paths() {
        let value: Value = serde_json::json!({"a": {"b": [{"c": "x"}, {"c": 5}]}});
        assert_eq!(lookup_text(&value, "a.b.0.c").as_deref(), Some("x"));
        assert_eq!(lookup_text(&value, "a.b.1.c").as_deref(), Some("5"));
        assert_eq!(lookup_text(&value, "a.b.2.c"), None);
        assert_eq!(lookup_text(&value, "a.x"), None);
    }

    /// `paths.changed_files`: a sender that lists the change's files for the change as a
    /// whole gives rules' `paths` what a forge's commits give them.
    #[test]
    fn a_generic_sender_may_list_the_changed_files() {
        let mut source = crate::sources::fuzz::source(crate::event::Provider::Generic);
        source.generic.paths.changed_files = Some("change.files".into());
        let events = |body: &str| {
            let headers = http::HeaderMap::new();
            let body = bytes::Bytes::copy_from_slice(body.as_bytes());
            let request = WebhookRequest {
                headers: &headers,
                body: &body,
            };
            match receive(&source, &request, Verification::Skip)
                .unwrap()
                .outcome
            {
                super::super::Outcome::Events(events) => events,
                other => panic!("{other:?}"),
            }
        };
        let push = |files: &str| {
            format!(
                r#"{{"repository": {{"full_name": "acme/mono"}}, "ref": "main", "before": "{}", "after": "{}", "change": {{"files": {files}}}}}"#,
                "1".repeat(40),
                "2".repeat(40)
            )
        };
        let listed = events(&push(r#"["b/x.rs", "a/y.rs", "b/x.rs"]"#));
        assert_eq!(
            listed[0].changed_files(),
            ChangedFiles::Listed(["a/y.rs", "b/x.rs"].into_iter().collect())
        );
        // Not a list of strings, or none: not known, so filters let the push through.
        for files in [r#""a/y.rs""#, r#"["a", 1]"#, "null"] {
            assert!(
                matches!(
                    events(&push(files))[0].changed_files(),
                    ChangedFiles::Unknown(_)
                ),
                "{files}"
            );
        }
        assert_eq!(
            events(&push("[]"))[0].changed_files(),
            ChangedFiles::Unknown("the webhook lists no changed files".into())
        );
    }
}
