//! How connections to GitLab and the forges are made: directly, or through the HTTP proxy
//! that the standard variables name (`HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY`, except for
//! hosts in `NO_PROXY`, and never for this machine's own loopback addresses), as curl,
//! git and Go's clients read them. A relay in a network whose only way out
//! is a proxy would otherwise fail every call with a connect timeout and nothing to say why.
//!
//! An `https://` destination is reached through a `CONNECT` tunnel, so TLS still runs end
//! to end with the destination; an `http://` one by sending the request in absolute form
//! to the proxy. Only `http://` proxies are spoken to; a proxy of another scheme (SOCKS,
//! TLS to the proxy) is refused when the relay starts, with the variable named.

use std::error::Error as StdError;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::{HeaderValue, Uri};
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

type BoxError = Box<dyn StdError + Send + Sync>;

/// The proxy a destination is reached through, as found in the environment.
#[derive(Clone)]
pub struct Proxy {
    /// `http://host:port`, without credentials: what logs and messages show.
    pub shown: String,
    uri: Uri,
    /// `Proxy-Authorization` from the variable's `user:password@`.
    authorization: Option<HeaderValue>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown)
    }
}

impl Proxy {
    /// The proxy the environment names for `destination`, if any.
    pub fn for_destination(destination: &Uri) -> Result<Option<Proxy>, String> {
        Proxy::from_variables(&|name| std::env::var(name).ok(), destination)
    }

    /// [`Proxy::for_destination`] with the variables `lookup` gives, read as curl reads
    /// them (the upper-case name first). A variable that is set but names no proxy
    /// hookrelay can read is an error, not a silent direct connection.
    fn from_variables(
        lookup: &dyn Fn(&str) -> Option<String>,
        destination: &Uri,
    ) -> Result<Option<Proxy>, String> {
        let first = |names: [&'static str; 2]| {
            names
                .into_iter()
                .find_map(|name| lookup(name).map(|value| (name, value)))
        };
        let own = if destination.scheme_str() == Some("https") {
            first(["HTTPS_PROXY", "https_proxy"])
        } else {
            first(["HTTP_PROXY", "http_proxy"])
        };
        let all = first(["ALL_PROXY", "all_proxy"]);
        let no = first(["NO_PROXY", "no_proxy"]).map(|(_, value)| value);
        let value = |v: &Option<(&str, String)>| v.as_ref().map(|(_, value)| value.clone());
        let matcher = Matcher::builder()
            .http(value(&own).unwrap_or_default())
            .https(value(&own).unwrap_or_default())
            .all(value(&all).unwrap_or_default())
            .no(no.clone().unwrap_or_default())
            .build();
        let found = Proxy::from_matcher(&matcher, destination)?;
        if found.is_none() && !is_loopback(destination.host().unwrap_or_default()) {
            // Set, yet no proxy: a value that is not a URL, unless NO_PROXY exempts the host.
            let exempt = Matcher::builder()
                .all("http://probe.invalid:1")
                .no(no.unwrap_or_default())
                .build()
                .intercept(destination)
                .is_none();
            let set: Vec<&str> = [&own, &all]
                .into_iter()
                .flatten()
                .filter(|(_, value)| !value.trim().is_empty())
                .map(|(name, _)| *name)
                .collect();
            if !exempt && !set.is_empty() {
                return Err(format!(
                    "{} is set but names no proxy hookrelay can read; write http://host:port \
                     (or http://user:password@host:port), or unset it",
                    set.join(" and ")
                ));
            }
        }
        Ok(found)
    }

    /// [`Proxy::for_destination`] for a configured URL, for what is shown (`check`, the
    /// dashboard): `None` also when the URL or the proxy cannot be used, which `serve`
    /// refuses at start with the reason.
    pub fn shown_for(url: &str) -> Option<Proxy> {
        Proxy::for_destination(&url.parse().ok()?).ok()?
    }

    fn from_matcher(matcher: &Matcher, destination: &Uri) -> Result<Option<Proxy>, String> {
        if is_loopback(destination.host().unwrap_or_default()) {
            return Ok(None);
        }
        let Some(intercept) = matcher.intercept(destination) else {
            return Ok(None);
        };
        let uri = intercept.uri().clone();
        let variable = if destination.scheme_str() == Some("https") {
            "HTTPS_PROXY (or ALL_PROXY)"
        } else {
            "HTTP_PROXY (or ALL_PROXY)"
        };
        let host = uri.host().unwrap_or_default();
        let port = uri.port_u16().unwrap_or(80);
        let shown = format!("{}://{host}:{port}", uri.scheme_str().unwrap_or("http"));
        if uri.scheme_str() != Some("http") || host.is_empty() {
            return Err(format!(
                "{variable} names the proxy {shown}; hookrelay speaks to http:// proxies only \
                 (an https:// destination still gets TLS end to end, through CONNECT). \
                 Name an http:// proxy, or list {} in NO_PROXY",
                destination.host().unwrap_or_default()
            ));
        }
        let mut authorization = intercept.basic_auth().cloned();
        if let Some(value) = &mut authorization {
            value.set_sensitive(true);
        }
        Ok(Some(Proxy {
            shown,
            uri,
            authorization,
        }))
    }

    /// `Proxy-Authorization` for requests sent to the proxy in absolute form.
    pub fn authorization(&self) -> Option<&HeaderValue> {
        self.authorization.as_ref()
    }
}

/// What to tell an operator when the proxy would not open a tunnel, from hyper-util's
/// message (its error type is not public); `None` for failures that say enough themselves
/// (a connection refused, a timeout).
pub fn tunnel_refused(message: &str) -> Option<&'static str> {
    match message {
        "tunnel error: proxy authorization required" => Some(
            "the proxy asks for credentials (407); give them in the variable that names it: http://user:password@host:port",
        ),
        "tunnel error: unsuccessful" => {
            Some("the proxy refused to open a tunnel to it (CONNECT was not answered 200)")
        }
        _ => None,
    }
}

/// This machine's own addresses, which no proxy could reach for it (as Go's clients
/// decide).
fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|address| address.is_loopback())
}

/// A connector for one destination's scheme and host: directly, through a `CONNECT`
/// tunnel (for `https://`), or to the proxy that forwards absolute-form requests.
#[derive(Clone)]
pub struct Outbound {
    http: HttpConnector,
    route: Route,
}

#[derive(Clone)]
enum Route {
    Direct,
    Tunnel(Tunnel<HttpConnector>),
    Forward(Uri),
}

impl Outbound {
    /// Connections to `destination` (a scheme and host), through `proxy` if one is given.
    pub fn new(http: HttpConnector, destination: &Uri, proxy: Option<&Proxy>) -> Outbound {
        let route = match proxy {
            None => Route::Direct,
            Some(proxy) if destination.scheme_str() == Some("https") => {
                let tunnel = Tunnel::new(proxy.uri.clone(), http.clone());
                Route::Tunnel(match &proxy.authorization {
                    Some(authorization) => tunnel.with_auth(authorization.clone()),
                    None => tunnel,
                })
            }
            Some(proxy) => Route::Forward(proxy.uri.clone()),
        };
        Outbound { http, route }
    }
}

impl tower_service::Service<Uri> for Outbound {
    type Response = Stream;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Stream, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Both connectors are always ready.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, destination: Uri) -> Self::Future {
        match &mut self.route {
            Route::Direct => {
                let connecting = self.http.call(destination);
                Box::pin(async move { Ok(Stream::new(connecting.await?, false)) })
            }
            Route::Tunnel(tunnel) => {
                let connecting = tunnel.call(destination);
                Box::pin(async move { Ok(Stream::new(connecting.await?, false)) })
            }
            Route::Forward(proxy) => {
                let connecting = self.http.call(proxy.clone());
                Box::pin(async move { Ok(Stream::new(connecting.await?, true)) })
            }
        }
    }
}

/// A TCP connection that tells hyper whether requests on it go to a forwarding proxy (and
/// so in absolute form).
pub struct Stream {
    io: TokioIo<TcpStream>,
    forwarding_proxy: bool,
}

impl Stream {
    fn new(io: TokioIo<TcpStream>, forwarding_proxy: bool) -> Stream {
        Stream {
            io,
            forwarding_proxy,
        }
    }
}

impl Connection for Stream {
    fn connected(&self) -> Connected {
        self.io.connected().proxy(self.forwarding_proxy)
    }
}

impl hyper::rt::Read for Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matcher(all: &str, no: &str) -> Matcher {
        Matcher::builder().all(all).no(no).build()
    }

    #[test]
    fn the_proxy_is_shown_without_its_credentials() {
        let destination = Uri::from_static("https://gitlab.example.com");
        let proxy = Proxy::from_matcher(
            &matcher("http://relay:s3cret-proxy-pw@proxy.internal:3128", ""),
            &destination,
        )
        .unwrap()
        .unwrap();
        assert_eq!(proxy.shown, "http://proxy.internal:3128");
        assert_eq!(format!("{proxy:?}"), "http://proxy.internal:3128");
        let authorization = proxy.authorization().unwrap();
        assert!(authorization.is_sensitive());
        assert_eq!(authorization, "Basic cmVsYXk6czNjcmV0LXByb3h5LXB3");
    }

    #[test]
    fn a_variable_that_names_no_proxy_is_an_error_not_a_direct_connection() {
        let destination = Uri::from_static("https://gitlab.com");
        let with = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        let message =
            Proxy::from_variables(&with(&[("HTTPS_PROXY", "http://")]), &destination).unwrap_err();
        assert!(
            message.starts_with("HTTPS_PROXY is set but names no proxy hookrelay can read"),
            "{message}"
        );
        let message = Proxy::from_variables(&with(&[("all_proxy", "::not a url")]), &destination)
            .unwrap_err();
        assert!(message.starts_with("all_proxy is set"), "{message}");
        // Exempted by NO_PROXY, or empty, or for the relay's own machine: direct, no error.
        for pairs in [
            &[("HTTPS_PROXY", "http://"), ("NO_PROXY", "gitlab.com")][..],
            &[("HTTPS_PROXY", "")][..],
        ] {
            assert!(
                Proxy::from_variables(&with(pairs), &destination)
                    .unwrap()
                    .is_none()
            );
        }
        assert!(
            Proxy::from_variables(
                &with(&[("HTTPS_PROXY", "http://")]),
                &Uri::from_static("https://127.0.0.1:8443")
            )
            .unwrap()
            .is_none()
        );
        // The upper-case name is read first, as curl reads them.
        let proxy = Proxy::from_variables(
            &with(&[
                ("HTTPS_PROXY", "http://upper:3128"),
                ("https_proxy", "http://lower:3128"),
            ]),
            &destination,
        )
        .unwrap()
        .unwrap();
        assert_eq!(proxy.shown, "http://upper:3128");
    }

    #[test]
    fn a_proxy_written_without_a_scheme_is_http_as_curl_reads_it() {
        let destination = Uri::from_static("https://gitlab.com");
        let proxy = Proxy::from_matcher(&matcher("proxy.internal:3128", ""), &destination)
            .unwrap()
            .unwrap();
        assert_eq!(proxy.shown, "http://proxy.internal:3128");
    }

    #[test]
    fn no_proxy_hosts_and_unset_variables_go_direct() {
        let destination = Uri::from_static("https://gitlab.internal");
        let proxied = matcher("http://proxy.internal:3128", "gitlab.internal,.corp");
        assert!(
            Proxy::from_matcher(&proxied, &destination)
                .unwrap()
                .is_none()
        );
        assert!(
            Proxy::from_matcher(&proxied, &Uri::from_static("https://ci.corp"))
                .unwrap()
                .is_none()
        );
        assert!(
            Proxy::from_matcher(&matcher("", ""), &destination)
                .unwrap()
                .is_none()
        );
        for own in [
            "http://127.0.0.1:8080",
            "https://localhost",
            "http://[::1]:80",
        ] {
            assert!(
                Proxy::from_matcher(&proxied, &Uri::from_static(own))
                    .unwrap()
                    .is_none(),
                "{own}"
            );
        }
    }

    #[test]
    fn a_proxy_hookrelay_cannot_speak_to_is_refused_with_the_variable_named() {
        let destination = Uri::from_static("https://gitlab.com");
        for proxy in [
            "socks5://proxy.internal:1080",
            "https://proxy.internal:3129",
        ] {
            let message = Proxy::from_matcher(&matcher(proxy, ""), &destination).unwrap_err();
            assert!(
                message.starts_with("HTTPS_PROXY (or ALL_PROXY) names the proxy "),
                "{message}"
            );
            assert!(message.contains("http:// proxies only"), "{message}");
            assert!(message.contains("list gitlab.com in NO_PROXY"), "{message}");
        }
    }
}
