//! A GitHub App's own credentials: the JSON Web Token GitHub asks of an App that reads
//! its own webhook's log (`GET /app/hook/deliveries`: one hook for all its installations,
//! which only the App itself may read) or asks for its installations' tokens (with which
//! it reads a repository's or organisation's hook, see [`super`]).
//!
//! The token is RS256 over `{"iat", "exp", "iss"}` (GitHub's "Generating a JSON Web Token
//! for a GitHub App"): issued a minute in the past for clocks that drift, expiring nine
//! minutes later (GitHub refuses more than ten), issued by the App's ID or client ID.
//! `ring` (already under rustls) signs; the three base64url parts are the whole format.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::signature::{RSA_PKCS1_SHA256, RsaKeyPair};
use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::pem::PemObject;

use crate::secret::Secret;

/// How far back a token says it was issued: GitHub's advice for clocks that drift.
const ISSUED_BEFORE: Duration = Duration::from_secs(60);
/// How long after its issue time a token lasts (GitHub refuses more than 10 minutes).
const LIFETIME: Duration = Duration::from_secs(10 * 60);
/// A token older than this is made again before the next call of a long run.
pub const FRESH_FOR: Duration = Duration::from_secs(5 * 60);

/// An App's ID and private key, ready to sign tokens. Never printed: its `Debug` names the
/// App only.
pub struct AppKey {
    /// The App's ID (`123456`) or client ID (`Iv23li…`): a token's `iss`.
    app: String,
    key: RsaKeyPair,
}

impl std::fmt::Debug for AppKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppKey")
            .field("app", &self.app)
            .finish_non_exhaustive()
    }
}

/// Checks an App's ID or client ID as written in the configuration or on the command line.
pub fn check_app(app: &str) -> Result<(), String> {
    let fits = !app.is_empty()
        && app.len() <= 64
        && app
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if fits {
        Ok(())
    } else {
        Err(format!(
            "{app:?} is not a GitHub App's ID or client ID (the App's settings page shows \
             both: \"App ID: 123456\", \"Client ID: Iv23li…\")"
        ))
    }
}

impl AppKey {
    /// The App `app`'s key from its PEM file as GitHub gives it (`-----BEGIN RSA PRIVATE
    /// KEY-----`), or as PKCS #8 (`-----BEGIN PRIVATE KEY-----`). Errors never quote the key.
    pub fn new(app: &str, pem: &Secret) -> Result<AppKey, String> {
        check_app(app)?;
        let not_a_key = || {
            "the App's private key is not an unencrypted RSA key in PEM (the .pem file \
             GitHub gives on the App's settings page starts with -----BEGIN RSA PRIVATE \
             KEY-----)"
                .to_owned()
        };
        let der =
            PrivateKeyDer::from_pem_slice(pem.expose().as_bytes()).map_err(|_| not_a_key())?;
        let key = match &der {
            PrivateKeyDer::Pkcs1(pkcs1) => RsaKeyPair::from_der(pkcs1.secret_pkcs1_der()),
            PrivateKeyDer::Pkcs8(pkcs8) => RsaKeyPair::from_pkcs8(pkcs8.secret_pkcs8_der()),
            _ => return Err(not_a_key()),
        }
        .map_err(|rejected| {
            format!("the App's private key cannot sign GitHub's tokens (RS256): {rejected}")
        })?;
        Ok(AppKey {
            app: app.to_owned(),
            key,
        })
    }

    /// The App's ID or client ID.
    pub fn app(&self) -> &str {
        &self.app
    }

    /// A token GitHub accepts from `now` for a few minutes, to send as `Bearer`.
    pub fn token(&self, now: SystemTime) -> Result<Secret, String> {
        let seconds = now
            .duration_since(UNIX_EPOCH)
            .map_err(|_| "the clock is before 1970".to_owned())?;
        let issued = seconds.saturating_sub(ISSUED_BEFORE).as_secs();
        // An App ID is a number in GitHub's examples; a client ID a string.
        let issuer = match self.app.parse::<u64>() {
            Ok(number) => serde_json::Value::from(number),
            Err(_) => serde_json::Value::from(self.app.as_str()),
        };
        let claims = serde_json::json!({
            "iat": issued,
            "exp": issued + LIFETIME.as_secs() - 60,
            "iss": issuer,
        });
        let signed = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","typ":"JWT"}"#),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let mut signature = vec![0; self.key.public().modulus_len()];
        self.key
            .sign(
                &RSA_PKCS1_SHA256,
                &ring::rand::SystemRandom::new(),
                signed.as_bytes(),
                &mut signature,
            )
            .map_err(|_| "the App's private key could not sign a token".to_owned())?;
        Ok(Secret::new(format!(
            "{signed}.{}",
            URL_SAFE_NO_PAD.encode(signature)
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PKCS1: &str = include_str!("../../tests/fixtures/github_app/test-app-key.pem");
    const PKCS8: &str = include_str!("../../tests/fixtures/github_app/test-app-key-pkcs8.pem");

    fn parts(token: &Secret) -> Vec<Vec<u8>> {
        token
            .expose()
            .split('.')
            .map(|part| URL_SAFE_NO_PAD.decode(part).unwrap())
            .collect()
    }

    #[test]
    fn a_token_is_rs256_over_issue_expiry_and_the_app_and_verifies_with_the_public_key() {
        let key = AppKey::new("123456", &Secret::new(PKCS1)).unwrap();
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let token = key.token(now).unwrap();
        let parts = parts(&token);
        assert_eq!(parts.len(), 3);
        assert_eq!(parts[0], br#"{"alg":"RS256","typ":"JWT"}"#);
        let claims: serde_json::Value = serde_json::from_slice(&parts[1]).unwrap();
        assert_eq!(
            claims,
            serde_json::json!({"iat": 1_799_999_940u64, "exp": 1_800_000_480u64, "iss": 123456})
        );
        let signed = token.expose().rsplit_once('.').unwrap().0;
        let public = ring::signature::UnparsedPublicKey::new(
            &ring::signature::RSA_PKCS1_2048_8192_SHA256,
            key.key.public().as_ref(),
        );
        public.verify(signed.as_bytes(), &parts[2]).unwrap();
        // RS256 is deterministic: the same claims give the same token, byte for byte the
        // one `openssl dgst -sha256 -sign` made (tests/fixtures/README.md says how).
        assert_eq!(key.token(now).unwrap().expose(), token.expose());
        let made_by_openssl = include_str!("../../tests/fixtures/github_app/openssl-jwt.txt");
        assert_eq!(token.expose(), made_by_openssl.trim_end());
    }

    #[test]
    fn a_client_id_is_issued_as_a_string_and_pkcs8_keys_sign_the_same() {
        let pkcs1 = AppKey::new("Iv23liABC.x_y-z", &Secret::new(PKCS1)).unwrap();
        let pkcs8 = AppKey::new("Iv23liABC.x_y-z", &Secret::new(PKCS8)).unwrap();
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let token = pkcs1.token(now).unwrap();
        let claims: serde_json::Value = serde_json::from_slice(&parts(&token)[1]).unwrap();
        assert_eq!(claims["iss"], "Iv23liABC.x_y-z");
        assert_eq!(pkcs8.token(now).unwrap().expose(), token.expose());
    }

    #[test]
    fn keys_and_apps_that_cannot_sign_are_named_without_quoting_the_key() {
        let wrong = |app: &str, pem: &str| AppKey::new(app, &Secret::new(pem)).unwrap_err();
        for pem in [
            "not a key at all",
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIB\n-----END ENCRYPTED PRIVATE KEY-----\n",
            "-----BEGIN RSA PRIVATE KEY-----\nbm90IGEga2V5\n-----END RSA PRIVATE KEY-----\n",
            "-----BEGIN EC PRIVATE KEY-----\nbm90IGEga2V5\n-----END EC PRIVATE KEY-----\n",
        ] {
            let err = wrong("1", pem);
            assert!(err.contains("private key"), "{err}");
            assert!(!err.contains("bm90") && !err.contains("MIIB"), "{err}");
        }
        for app in ["", "12 34", "app/1", &"9".repeat(65)] {
            assert!(wrong(app, PKCS1).contains("not a GitHub App's ID"), "{app}");
        }
        let key = AppKey::new("7", &Secret::new(PKCS1)).unwrap();
        assert!(!format!("{key:?}").contains("BEGIN"));
    }
}
