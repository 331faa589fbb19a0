//! `[admin]`: the delivery dashboard's own listener, never the webhook port.

use std::net::SocketAddr;

use serde::Deserialize;
use toml::Spanned;

use super::{EnvLookup, FileProblems};
use crate::secret::{Secret, SecretRef};

/// `[admin]`: where the dashboard and its JSON API listen, and who may use them.
#[derive(Clone, Debug)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// `token = "env:NAME"`: needed for every action, and for viewing unless the listener
    /// is on a loopback address. `None`: viewing on loopback only, no actions.
    pub token: Option<(SecretRef, Option<Secret>)>,
    /// HTTPS, as on the main listener.
    pub tls: Option<super::server::ServerTls>,
    /// `allow_from`: the only client addresses the dashboard answers. Empty: any.
    pub allow_from: Vec<ipnet::IpNet>,
}

/// The dashboard's default address: loopback, beside the webhook port.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:8081";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    listen: Option<Spanned<String>>,
    token: Option<Spanned<String>>,
    tls_cert: Option<Spanned<String>>,
    tls_key: Option<Spanned<String>>,
    allow_from: Option<Spanned<Vec<Spanned<String>>>>,
}

pub(super) fn compile(
    raw: RawAdmin,
    resolve_secrets: Option<EnvLookup<'_>>,
    problems: &mut FileProblems<'_>,
) -> Option<AdminConfig> {
    let listen_span = raw.listen.as_ref().map(Spanned::span);
    let listen = super::typed(
        raw.listen,
        DEFAULT_ADMIN_LISTEN.parse().expect("a valid address"),
        problems,
        |text| super::parse_listen(text).map_err(|err| format!("admin.listen: {err}")),
    );
    let token = match raw.token {
        None => None,
        Some(field) => {
            let span = field.span();
            let found = super::secret_setting(
                field.get_ref(),
                Some(span.clone()),
                "admin.token",
                resolve_secrets,
                problems,
            )?;
            if found
                .1
                .as_ref()
                .is_some_and(|token| token.expose().len() < 16)
            {
                problems.at(
                    Some(span),
                    "admin.token: the token must have at least 16 bytes (`openssl rand -hex 32`)",
                );
                return None;
            }
            Some(found)
        }
    };
    if token.is_none() && !listen.ip().is_loopback() {
        problems.at(
            listen_span,
            format!(
                "admin.listen {listen} is not a loopback address, so the dashboard needs `token = \"env:HOOKRELAY_ADMIN_TOKEN\"`"
            ),
        );
        return None;
    }
    let tls = super::server::server_tls(raw.tls_cert, raw.tls_key, problems);
    let allow_from = raw.allow_from.as_ref().map_or_else(Vec::new, |list| {
        super::networks::read_allow_from(list, "admin.allow_from", problems)
    });
    let admin = AdminConfig {
        listen,
        token,
        tls,
        allow_from,
    };
    if let (Some(warning), Some(span)) = (admin.in_the_clear(), listen_span) {
        problems.warn(span, format!("admin.listen {warning}"));
    }
    Some(admin)
}

impl AdminConfig {
    /// Why this dashboard wants HTTPS, when it listens off loopback without TLS of its
    /// own: a warning, since a TLS proxy in front may give it (then browsers see HTTPS and
    /// the relay cannot tell).
    pub fn in_the_clear(&self) -> Option<String> {
        (self.tls.is_none() && !self.listen.ip().is_loopback()).then(|| {
            format!(
                "{} serves the dashboard over plain HTTP off loopback: its token crosses the network in clear, and browsers keep the login's cookie (Secure) only over HTTPS, so logging in from a browser does not stick; set tls_cert and tls_key, or serve it through a TLS proxy",
                self.listen
            )
        })
    }
}
