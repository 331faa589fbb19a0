//! Signature checks, all over the exact bytes received and all in constant time.
//!
//! HMACs are compared by `hmac`'s `verify_slice` (constant time); plain tokens with
//! `subtle`. Error messages name the header that was expected or did not match, never a
//! computed value. Standard Webhooks (GitLab's signing tokens, and generic senders) take
//! the current time as a parameter, so tests use the specification's fixed vector.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::digest::KeyInit;
use hmac::{Hmac, Mac};
use subtle::ConstantTimeEq;

/// Why a webhook's proof of origin was refused. All are answered `401`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error(
        "no signature: expected the {header} header; check that the webhook is configured with this source's secret"
    )]
    Missing { header: String },
    #[error(
        "the {header} header does not match the body; check that the webhook's secret is this source's secret"
    )]
    Mismatch { header: String },
    #[error("the {header} header is not a valid signature: {reason}")]
    Malformed { header: String, reason: String },
    #[error(
        "webhook-timestamp is {age_seconds}s away from now, outside the {tolerance_seconds}s tolerance; a replayed or long-delayed request is refused"
    )]
    Stale {
        age_seconds: u64,
        tolerance_seconds: u64,
    },
}

impl SignatureError {
    /// None of `headers` was sent: "A, B or C".
    pub fn missing_any(headers: &[&str]) -> SignatureError {
        let header = match headers.split_last() {
            Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
            _ => headers.concat(),
        };
        SignatureError::Missing { header }
    }
}

/// HMAC hash functions senders use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    Sha1,
    Sha256,
    Sha512,
}

impl Algorithm {
    pub fn parse(name: &str) -> Option<Algorithm> {
        match name.to_ascii_lowercase().as_str() {
            "sha1" => Some(Algorithm::Sha1),
            "sha256" => Some(Algorithm::Sha256),
            "sha512" => Some(Algorithm::Sha512),
            _ => None,
        }
    }
}

/// How a signature's bytes are written in its header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    Hex,
    Base64,
}

fn mac_matches<M: Mac + KeyInit>(key: &[u8], parts: &[&[u8]], expected: &[u8]) -> bool {
    let mut mac = <M as KeyInit>::new_from_slice(key).expect("HMAC accepts keys of any length");
    for part in parts {
        mac.update(part);
    }
    mac.verify_slice(expected).is_ok()
}

fn mac_bytes<M: Mac + KeyInit>(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut mac = <M as KeyInit>::new_from_slice(key).expect("HMAC accepts keys of any length");
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().to_vec()
}

/// Constant-time check of `expected` against the HMAC of the concatenated `parts`.
pub fn hmac_matches(algorithm: Algorithm, key: &[u8], parts: &[&[u8]], expected: &[u8]) -> bool {
    match algorithm {
        Algorithm::Sha1 => mac_matches::<Hmac<sha1::Sha1>>(key, parts, expected),
        Algorithm::Sha256 => mac_matches::<Hmac<sha2::Sha256>>(key, parts, expected),
        Algorithm::Sha512 => mac_matches::<Hmac<sha2::Sha512>>(key, parts, expected),
    }
}

/// The HMAC of `body`, hex-encoded: what a sender puts in its header (for tests and tools).
pub fn hmac_hex(algorithm: Algorithm, key: &[u8], body: &[u8]) -> String {
    hex::encode(match algorithm {
        Algorithm::Sha1 => mac_bytes::<Hmac<sha1::Sha1>>(key, &[body]),
        Algorithm::Sha256 => mac_bytes::<Hmac<sha2::Sha256>>(key, &[body]),
        Algorithm::Sha512 => mac_bytes::<Hmac<sha2::Sha512>>(key, &[body]),
    })
}

/// Checks a signature header such as `sha256=<hex>` (prefix `sha256=`) or bare hex
/// against the source's secrets: usually one; while one is rotated, the new one first and
/// then the old. The header is read once; a signature that cannot be read fails whatever
/// the secrets.
pub fn verify_hmac_header(
    header: &str,
    value: &str,
    prefix: &str,
    encoding: Encoding,
    algorithm: Algorithm,
    keys: &[crate::secret::Secret],
    body: &[u8],
) -> Result<(), SignatureError> {
    let malformed = |reason: &str| SignatureError::Malformed {
        header: header.to_owned(),
        reason: reason.to_owned(),
    };
    let value = value.trim();
    let encoded = if prefix.is_empty() {
        value
    } else {
        match value.get(..prefix.len()) {
            Some(start) if start.eq_ignore_ascii_case(prefix) => &value[prefix.len()..],
            _ => return Err(malformed(&format!("it does not start with {prefix:?}"))),
        }
    };
    let signature = match encoding {
        Encoding::Hex => hex::decode(encoded).map_err(|_| malformed("it is not hexadecimal"))?,
        Encoding::Base64 => BASE64
            .decode(encoded)
            .map_err(|_| malformed("it is not base64"))?,
    };
    if keys
        .iter()
        .any(|key| hmac_matches(algorithm, key.expose().as_bytes(), &[body], &signature))
    {
        Ok(())
    } else {
        Err(SignatureError::Mismatch {
            header: header.to_owned(),
        })
    }
}

/// Constant-time comparison of a plain token (GitLab's `X-Gitlab-Token`).
pub fn token_matches(expected: &str, given: &str) -> bool {
    expected.as_bytes().ct_eq(given.as_bytes()).into()
}

/// Whether `given` is any of the source's tokens (the current one, or the one before it
/// while it is rotated). Each comparison runs in constant time, and every one runs.
pub fn any_token_matches(secrets: &[crate::secret::Secret], given: &str) -> bool {
    secrets.iter().fold(false, |found, secret| {
        token_matches(secret.expose(), given) | found
    })
}

/// A Standard Webhooks key, decoded from its `whsec_<base64>` form. Prints only a mask.
#[derive(Clone, PartialEq, Eq)]
pub struct SigningKey(Vec<u8>);

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningKey(whsec_…)")
    }
}

impl SigningKey {
    /// Decodes `whsec_<base64>`; the prefix is optional, as in the reference libraries.
    pub fn parse(secret: &str) -> Result<SigningKey, String> {
        let encoded = secret.strip_prefix("whsec_").unwrap_or(secret);
        let key = BASE64
            .decode(encoded.trim())
            .map_err(|_| "a signing secret must be `whsec_` followed by base64".to_owned())?;
        if key.is_empty() {
            return Err("the signing secret is empty".into());
        }
        Ok(SigningKey(key))
    }
}

/// Standard Webhooks' headers (GitLab's signing tokens, and generic senders that use it).
pub const WEBHOOK_ID: &str = "webhook-id";
pub const WEBHOOK_TIMESTAMP: &str = "webhook-timestamp";
pub const WEBHOOK_SIGNATURE: &str = "webhook-signature";

/// The Standard Webhooks headers of one request.
pub struct StandardWebhookHeaders<'a> {
    pub id: Option<&'a str>,
    pub timestamp: Option<&'a str>,
    pub signature: Option<&'a str>,
}

impl<'a> StandardWebhookHeaders<'a> {
    pub fn of(request: &'a super::WebhookRequest<'_>) -> StandardWebhookHeaders<'a> {
        StandardWebhookHeaders {
            id: request.header(WEBHOOK_ID),
            timestamp: request.header(WEBHOOK_TIMESTAMP),
            signature: request.header(WEBHOOK_SIGNATURE),
        }
    }
}

/// Verifies a Standard Webhooks signature: `v1,<base64 HMAC-SHA256 of "id.timestamp.body">`,
/// any of several space-separated entries, with the timestamp within `tolerance` of `now`.
pub fn verify_standard_webhook(
    keys: &[SigningKey],
    headers: &StandardWebhookHeaders<'_>,
    body: &[u8],
    now: SystemTime,
    tolerance: Duration,
) -> Result<(), SignatureError> {
    let missing = |header: &str| SignatureError::Missing {
        header: header.to_owned(),
    };
    let id = headers.id.ok_or_else(|| missing(WEBHOOK_ID))?;
    let timestamp = headers
        .timestamp
        .ok_or_else(|| missing(WEBHOOK_TIMESTAMP))?;
    let signatures = headers
        .signature
        .ok_or_else(|| missing(WEBHOOK_SIGNATURE))?;
    let seconds: u64 = timestamp
        .trim()
        .parse()
        .map_err(|_| SignatureError::Malformed {
            header: WEBHOOK_TIMESTAMP.into(),
            reason: "it is not a number of seconds since 1970".into(),
        })?;
    let now = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let age = now.abs_diff(seconds);
    if age > tolerance.as_secs() {
        return Err(SignatureError::Stale {
            age_seconds: age,
            tolerance_seconds: tolerance.as_secs(),
        });
    }
    let signed = [id.as_bytes(), b".", timestamp.trim().as_bytes(), b".", body];
    let mut saw_v1 = false;
    for entry in signatures.split_whitespace() {
        let Some(encoded) = entry.strip_prefix("v1,") else {
            continue;
        };
        saw_v1 = true;
        // Any of the keys (the new and the old while one is rotated), any listed signature.
        if let Ok(signature) = BASE64.decode(encoded)
            && keys
                .iter()
                .any(|key| hmac_matches(Algorithm::Sha256, &key.0, &signed, &signature))
        {
            return Ok(());
        }
    }
    if saw_v1 {
        Err(SignatureError::Mismatch {
            header: WEBHOOK_SIGNATURE.into(),
        })
    } else {
        Err(SignatureError::Malformed {
            header: WEBHOOK_SIGNATURE.into(),
            reason: "it has no `v1,` entry".into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GITHUB_SECRET: &[u8] = b"It's a Secret to Everybody";

    fn keys(keys: &[&str]) -> Vec<crate::secret::Secret> {
        keys.iter()
            .map(|key| crate::secret::Secret::new(key.to_string()))
            .collect()
    }

    #[test]
    fn a_missing_signature_names_the_headers_expected() {
        let message = |headers: &[&str]| SignatureError::missing_any(headers).to_string();
        assert!(
            message(&["X-Hub-Signature"])
                .starts_with("no signature: expected the X-Hub-Signature header; ")
        );
        assert!(message(&["X-Gitea-Signature", "X-Forgejo-Signature", "X-Hub-Signature-256"])
            .starts_with("no signature: expected the X-Gitea-Signature, X-Forgejo-Signature or X-Hub-Signature-256 header; "));
    }

    #[test]
    fn githubs_published_vector() {
        let header = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        let check = |body: &[u8]| {
            verify_hmac_header(
                "X-Hub-Signature-256",
                header,
                "sha256=",
                Encoding::Hex,
                Algorithm::Sha256,
                &keys(&["It's a Secret to Everybody"]),
                body,
            )
        };
        assert_eq!(check(b"Hello, World!"), Ok(()));
        assert!(matches!(
            check(b"Hello, World?"),
            Err(SignatureError::Mismatch { .. })
        ));
        assert_eq!(
            hmac_hex(Algorithm::Sha1, GITHUB_SECRET, b"Hello, World!"),
            "01dc10d0c83e72ed246219cdd91669667fe2ca59"
        );
    }

    #[test]
    fn malformed_headers_say_why() {
        let err = verify_hmac_header(
            "X-Hub-Signature-256",
            "md5=abc",
            "sha256=",
            Encoding::Hex,
            Algorithm::Sha256,
            &keys(&["k"]),
            b"b",
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("does not start with \"sha256=\""),
            "{err}"
        );
        let err = verify_hmac_header(
            "X",
            "zz",
            "",
            Encoding::Hex,
            Algorithm::Sha256,
            &keys(&["k"]),
            b"b",
        )
        .unwrap_err();
        assert!(err.to_string().contains("not hexadecimal"), "{err}");
    }

    #[test]
    fn base64_and_sha512() {
        let key = b"key";
        let hex = hmac_hex(Algorithm::Sha512, key, b"body");
        let b64 = BASE64.encode(hex::decode(&hex).unwrap());
        assert_eq!(
            verify_hmac_header(
                "X-Sig",
                &b64,
                "",
                Encoding::Base64,
                Algorithm::Sha512,
                &keys(&["key"]),
                b"body"
            ),
            Ok(())
        );
    }

    #[test]
    fn tokens() {
        assert!(token_matches("s3cret", "s3cret"));
        assert!(!token_matches("s3cret", "s3creT"));
        assert!(!token_matches("s3cret", "s3cre"));
    }

    fn standard_vector(now: u64, signature: &str, body: &[u8]) -> Result<(), SignatureError> {
        // Another key first, as while the published one is rotated out.
        let keys = [
            SigningKey::parse("whsec_bmV3LWtleS1uZXcta2V5LW5ldy1rZXk=").unwrap(),
            SigningKey::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap(),
        ];
        let headers = StandardWebhookHeaders {
            id: Some("msg_p5jXN8AQM9LWM0D4loKWxJek"),
            timestamp: Some("1614265330"),
            signature: Some(signature),
        };
        verify_standard_webhook(
            &keys,
            &headers,
            body,
            UNIX_EPOCH + Duration::from_secs(now),
            Duration::from_secs(300),
        )
    }

    #[test]
    fn standard_webhooks_published_vector() {
        let good = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(standard_vector(1614265330, good, body), Ok(()));
        // Several entries: any match passes.
        assert_eq!(
            standard_vector(1614265330, &format!("v1,Zm9v {good}"), body),
            Ok(())
        );
        assert!(matches!(
            standard_vector(1614265330, good, br#"{"test": 1}"#),
            Err(SignatureError::Mismatch { .. })
        ));
        assert!(matches!(
            standard_vector(1614265330 + 301, good, body),
            Err(SignatureError::Stale {
                age_seconds: 301,
                ..
            })
        ));
        assert!(matches!(
            standard_vector(1614265330 - 301, good, body),
            Err(SignatureError::Stale { .. })
        ));
        assert!(matches!(
            standard_vector(1614265330, "v2,abc", body),
            Err(SignatureError::Malformed { .. })
        ));
    }

    #[test]
    fn signing_keys_are_masked() {
        let key = SigningKey::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        assert_eq!(format!("{key:?}"), "SigningKey(whsec_…)");
        assert!(SigningKey::parse("whsec_!!!").is_err());
    }
}
