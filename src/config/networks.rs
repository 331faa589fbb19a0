//! Lists of IP addresses and networks (`trusted_proxies`, `allow_from`), each entry
//! checked at its own line.

use ipnet::IpNet;
use toml::Spanned;

use super::problems::FileProblems;

/// The addresses and networks `list` names (`"10.0.0.0/8"`, `"192.0.2.7"`,
/// `"2001:db8::/32"`); an entry that is neither is a problem at its line. An address is a
/// network of one; a network written with host bits (`10.1.2.3/8`) is the network.
pub(super) fn read_networks(
    list: &[Spanned<String>],
    setting: &str,
    problems: &mut FileProblems<'_>,
) -> Vec<IpNet> {
    let mut networks = Vec::with_capacity(list.len());
    for entry in list {
        match parse_network(entry.get_ref()) {
            Some(net) => networks.push(net),
            None => problems.at(
                Some(entry.span()),
                format!(
                    "{setting}: {:?} is not an IP address or network (\"10.0.0.0/8\", \"192.0.2.7\", \"2001:db8::/32\")",
                    entry.get_ref()
                ),
            ),
        }
    }
    networks
}

/// An `allow_from` list: [`read_networks`], and an empty list is a problem (it would
/// refuse everyone; left out, the setting allows any address).
pub(super) fn read_allow_from(
    list: &Spanned<Vec<Spanned<String>>>,
    setting: &str,
    problems: &mut FileProblems<'_>,
) -> Vec<IpNet> {
    if list.get_ref().is_empty() {
        problems.at(
            Some(list.span()),
            format!("{setting}: an empty list would refuse everyone; leave allow_from out to allow any address"),
        );
    }
    read_networks(list.get_ref(), setting, problems)
}

/// One address or network (`"10.0.0.0/8"`, `"192.0.2.7"`, `"2001:db8::/32"`) in the form
/// clients are compared with: an address is a network of one, host bits are dropped
/// (`10.1.2.3/8` is `10.0.0.0/8`), and IPv4 in IPv6's mapped form is IPv4.
pub fn parse_network(text: &str) -> Option<IpNet> {
    let text = text.trim();
    let parsed = text
        .parse::<IpNet>()
        .or_else(|_| text.parse::<std::net::IpAddr>().map(IpNet::from))
        .ok()?;
    Some(canonical(parsed.trunc()))
}

/// Addresses and networks as `check` and the dashboard show them: `10.0.0.0/8
/// 192.0.2.7/32`; empty when there are none.
pub fn shown(list: &[IpNet]) -> String {
    let shown: Vec<String> = list.iter().map(ToString::to_string).collect();
    shown.join(" ")
}

/// An `allow_from` as `check` and the dashboard show it, `"github"` first when it stands
/// for GitHub's published webhook addresses.
pub fn shown_with_github(list: &[IpNet], github: bool) -> String {
    let networks = shown(list);
    match (github, networks.is_empty()) {
        (false, _) => networks,
        (true, true) => "GitHub's webhook addresses (api.github.com/meta)".into(),
        (true, false) => format!("GitHub's webhook addresses (api.github.com/meta) {networks}"),
    }
}

/// Whether `list` names this machine (`127.0.0.1` or `::1`), as the address of a proxy
/// on it.
pub(super) fn names_this_machine(list: &[IpNet]) -> bool {
    let here: [std::net::IpAddr; 2] = [
        std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::Ipv6Addr::LOCALHOST.into(),
    ];
    list.iter()
        .any(|net| here.iter().any(|addr| net.contains(addr)))
}

/// An IPv4 network written in IPv6's mapped form (`::ffff:10.0.0.0/104`) as IPv4, since
/// addresses are compared in their canonical form ([`crate::client_address`]).
fn canonical(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96)
                .map(IpNet::V4)
                .unwrap_or(net),
            None => net,
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_ipv4_networks_are_ipv4() {
        let net: IpNet = "::ffff:10.0.0.0/104".parse().unwrap();
        assert_eq!(canonical(net).to_string(), "10.0.0.0/8");
        let v6: IpNet = "2001:db8::/32".parse().unwrap();
        assert_eq!(canonical(v6), v6);
    }
}
