//! Who may use the dashboard: the `[admin] token`, shown as `Authorization: Bearer` (scripts)
//! or once in the login form, which sets a session cookie (`Secure`, `HttpOnly`,
//! `SameSite=Strict`) derived from the token, so nothing is stored and a new token ends
//! every session. Viewing without the token is allowed only on a loopback listener, and
//! only to requests that name a loopback host (`Host: 127.0.0.1:8081`, `localhost`): a
//! web page whose name a DNS rebinding points at 127.0.0.1 names its own host, and must not
//! read the deliveries through the visitor's browser. Every action needs the token always.
//! A browser's state-changing request must also carry the page's cross-site token and must
//! not come from another site (`Origin`, `Sec-Fetch-Site`).

use http::{HeaderMap, header};

use crate::config::admin::AdminConfig;
use crate::secret::Secret;
use crate::sources::signature::{Algorithm, hmac_hex, token_matches};

/// The session cookie's name.
pub const COOKIE: &str = "hookrelay_admin";

/// What a request may do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Access {
    /// It showed the token (a header or the session cookie).
    pub authenticated: bool,
    /// By the session cookie: actions must carry [`csrf_token`].
    pub by_cookie: bool,
    /// The cross-site token its pages put in forms (empty without a token configured).
    pub csrf: String,
}

/// Why a request may not go on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Show the login form (pages) or answer 401 (the API).
    LogIn,
    /// Answer 403 with this reason.
    Forbidden(String),
}

fn mac(token: &Secret, purpose: &str) -> String {
    hmac_hex(
        Algorithm::Sha256,
        token.expose().as_bytes(),
        format!("hookrelay admin {purpose}").as_bytes(),
    )
}

/// The session cookie's value for `token`.
pub fn session_value(token: &Secret) -> String {
    mac(token, "session")
}

/// The cross-site token forms carry for `token`.
pub fn csrf_token(token: &Secret) -> String {
    mac(token, "csrf")
}

/// The `Set-Cookie` that logs in (or, with `None`, out).
pub fn cookie(token: Option<&Secret>) -> String {
    match token {
        Some(token) => format!(
            "{COOKIE}={}; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age=43200",
            session_value(token)
        ),
        None => format!("{COOKIE}=; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age=0"),
    }
}

fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

/// Who the request is, by the configured token (`None`: no token configured).
pub fn access(admin: &AdminConfig, headers: &HeaderMap) -> Result<Access, Refusal> {
    let token = admin.token.as_ref().and_then(|(_, token)| token.as_ref());
    let loopback = admin.listen.ip().is_loopback();
    let Some(token) = token else {
        return if !loopback {
            Err(Refusal::Forbidden(
                "the dashboard has no token and does not listen on loopback".into(),
            ))
        } else if names_a_loopback_host(headers) {
            Ok(Access::anonymous())
        } else {
            Err(Refusal::Forbidden(not_a_loopback_host(admin)))
        };
    };
    let csrf = csrf_token(token);
    if let Some(bearer) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    {
        return if token_matches(token.expose(), bearer.trim()) {
            Ok(Access {
                authenticated: true,
                by_cookie: false,
                csrf,
            })
        } else {
            Err(Refusal::Forbidden(
                "the bearer token is not the dashboard's [admin] token".into(),
            ))
        };
    }
    if let Some(session) = cookie_value(headers, COOKIE)
        && token_matches(&session_value(token), session)
    {
        return Ok(Access {
            authenticated: true,
            by_cookie: true,
            csrf,
        });
    }
    // Behind a proxy that passes its own name on, the login form still lets one in.
    if loopback && names_a_loopback_host(headers) {
        Ok(Access::anonymous())
    } else {
        Err(Refusal::LogIn)
    }
}

/// Whether a browser showing this request's page talks plain HTTP to another machine:
/// the dashboard has no TLS of its own, the `Host` is not this machine, and no proxy in
/// front says it took the request over HTTPS (`X-Forwarded-Proto`). Its login would not
/// stick, since the session cookie is `Secure`.
pub fn over_plain_http_from_afar(admin: &AdminConfig, headers: &HeaderMap) -> bool {
    let proxied_over_https = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|proto| proto.trim().eq_ignore_ascii_case("https"));
    admin.tls.is_none() && !proxied_over_https && !names_a_loopback_host(headers)
}

impl Access {
    /// A viewer who showed no token (on a loopback listener only).
    fn anonymous() -> Access {
        Access {
            authenticated: false,
            by_cookie: false,
            csrf: String::new(),
        }
    }
}

/// Whether the request's `Host` names this machine: `localhost`, a name under
/// `.localhost`, or a loopback address (any port). A request without one is no browser's.
pub fn names_a_loopback_host(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST) else {
        return true;
    };
    let Ok(host) = host.to_str() else {
        return false;
    };
    let name = match host.strip_prefix('[') {
        Some(bracketed) => bracketed.split_once(']').map_or(bracketed, |(ip, _)| ip),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    name == "localhost"
        || name.ends_with(".localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn not_a_loopback_host(admin: &AdminConfig) -> String {
    format!(
        "without a token the dashboard shows itself only at a loopback address, such as http://{}/ (this request named another host: a guard against DNS rebinding); or set [admin] token and log in",
        admin.listen
    )
}

/// Whether a state-changing request may act: it showed the token, and a browser's came
/// from the dashboard's own page (its cross-site token, and no other site's `Origin`).
pub fn may_act(
    admin: &AdminConfig,
    access: &Access,
    headers: &HeaderMap,
    form_csrf: Option<&str>,
) -> Result<(), Refusal> {
    if admin.token.is_none() {
        return Err(Refusal::Forbidden(
            "actions need the dashboard's token: set [admin] token = \"env:HOOKRELAY_ADMIN_TOKEN\""
                .into(),
        ));
    }
    if !access.authenticated {
        return Err(Refusal::LogIn);
    }
    if !access.by_cookie {
        return Ok(());
    }
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if header("sec-fetch-site").is_some_and(|site| site == "cross-site") {
        return Err(Refusal::Forbidden("a request from another site".into()));
    }
    if let (Some(origin), Some(host)) = (header("origin"), header("host")) {
        let origin_host = origin.split_once("://").map_or(origin, |(_, rest)| rest);
        if origin_host != host {
            return Err(Refusal::Forbidden(format!(
                "a request from another origin ({origin})"
            )));
        }
    }
    let given = form_csrf
        .or_else(|| header("x-csrf-token"))
        .unwrap_or_default();
    if !token_matches(&access.csrf, given) {
        return Err(Refusal::Forbidden(
            "the form's cross-site token is missing or stale; reload the page".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admin(listen: &str, token: Option<&str>) -> AdminConfig {
        AdminConfig {
            listen: listen.parse().unwrap(),
            token: token.map(|t| {
                (
                    crate::secret::SecretRef::parse("env:T").unwrap(),
                    Some(Secret::new(t.to_owned())),
                )
            }),
            tls: None,
            allow_from: Vec::new(),
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        map
    }

    #[test]
    fn viewing_needs_the_token_off_loopback_and_acting_always() {
        let token = "0123456789abcdef-admin";
        let remote = admin("0.0.0.0:8081", Some(token));
        assert_eq!(access(&remote, &headers(&[])), Err(Refusal::LogIn));
        let bearer = format!("Bearer {token}");
        let by_bearer = access(&remote, &headers(&[("authorization", &bearer)])).unwrap();
        assert!(by_bearer.authenticated && !by_bearer.by_cookie);
        assert!(may_act(&remote, &by_bearer, &headers(&[]), None).is_ok());
        assert!(matches!(
            access(&remote, &headers(&[("authorization", "Bearer wrong")])),
            Err(Refusal::Forbidden(_))
        ));
        let local = admin("127.0.0.1:8081", Some(token));
        let anonymous = access(&local, &headers(&[])).unwrap();
        assert!(!anonymous.authenticated, "viewing on loopback");
        assert_eq!(
            may_act(&local, &anonymous, &headers(&[]), None),
            Err(Refusal::LogIn)
        );
        let none = admin("127.0.0.1:8081", None);
        assert!(matches!(
            may_act(
                &none,
                &access(&none, &headers(&[])).unwrap(),
                &headers(&[]),
                None
            ),
            Err(Refusal::Forbidden(_))
        ));
    }

    #[test]
    fn viewing_without_the_token_needs_a_request_that_names_a_loopback_host() {
        let token = "0123456789abcdef-admin";
        for config in [
            admin("127.0.0.1:8081", Some(token)),
            admin("127.0.0.1:8081", None),
        ] {
            for host in [
                "127.0.0.1:8081",
                "localhost:8081",
                "LOCALHOST",
                "localhost.",
                "app.localhost:9",
                "127.0.0.2",
                "[::1]:8081",
            ] {
                let viewer = access(&config, &headers(&[("host", host)]));
                assert!(viewer.is_ok_and(|a| !a.authenticated), "{host}");
            }
            for host in [
                "evil.example:8081",
                "evil.example",
                "127.0.0.1.evil.example",
                "localhost.evil.example",
                "[::2]:8081",
                "10.0.0.1",
            ] {
                assert!(
                    access(&config, &headers(&[("host", host)])).is_err(),
                    "{host}"
                );
            }
        }
        // Without a token nothing lets a rebound page in; with one, the login form does,
        // and the token works from any host name.
        let none = admin("127.0.0.1:8081", None);
        let Err(Refusal::Forbidden(why)) = access(&none, &headers(&[("host", "evil.example")]))
        else {
            panic!("refused")
        };
        assert!(
            why.contains("http://127.0.0.1:8081/") && why.contains("DNS rebinding"),
            "{why}"
        );
        let local = admin("127.0.0.1:8081", Some(token));
        assert_eq!(
            access(&local, &headers(&[("host", "evil.example")])),
            Err(Refusal::LogIn)
        );
        let bearer = format!("Bearer {token}");
        assert!(
            access(
                &local,
                &headers(&[("host", "relay.internal"), ("authorization", &bearer)])
            )
            .is_ok_and(|a| a.authenticated)
        );
    }

    #[test]
    fn a_cookie_session_acts_only_from_the_dashboards_own_page() {
        let token = Secret::new("0123456789abcdef-admin".to_owned());
        let config = admin("0.0.0.0:8081", Some(token.expose()));
        let cookie = format!("other=1; {COOKIE}={}", session_value(&token));
        let request = headers(&[("cookie", &cookie), ("host", "relay:8081")]);
        let by_cookie = access(&config, &request).unwrap();
        assert!(by_cookie.by_cookie);
        let csrf = csrf_token(&token);
        assert!(may_act(&config, &by_cookie, &request, Some(&csrf)).is_ok());
        assert!(
            may_act(&config, &by_cookie, &request, None).is_err(),
            "no token"
        );
        assert!(may_act(&config, &by_cookie, &request, Some("forged")).is_err());
        let cross = headers(&[
            ("cookie", &cookie),
            ("host", "relay:8081"),
            ("origin", "https://evil.example"),
        ]);
        assert!(may_act(&config, &by_cookie, &cross, Some(&csrf)).is_err());
        let fetch = headers(&[("cookie", &cookie), ("sec-fetch-site", "cross-site")]);
        assert!(may_act(&config, &by_cookie, &fetch, Some(&csrf)).is_err());
        let same = headers(&[
            ("cookie", &cookie),
            ("host", "relay:8081"),
            ("origin", "http://relay:8081"),
        ]);
        assert!(may_act(&config, &by_cookie, &same, Some(&csrf)).is_ok());
        assert!(cookie_value(&headers(&[("cookie", "x=1")]), COOKIE).is_none());
        assert!(super::cookie(Some(&token)).contains("HttpOnly; Secure; SameSite=Strict"));
    }
}
