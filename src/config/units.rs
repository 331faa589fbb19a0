//! Durations (`30s`, `5m`), sizes (`25MiB`) and listening addresses as written in
//! configuration files (and, for addresses, on the command line).

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

/// Parses an address to listen on: `IP:PORT`, `[IPv6]:PORT`, or `localhost:PORT` (this
/// machine's IPv4 loopback, as nginx and most servers read it). Other names are refused:
/// which of a name's addresses a listener would take is not for a configuration to guess.
pub fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    let text = text.trim();
    if let Ok(address) = text.parse() {
        return Ok(address);
    }
    let invalid = || {
        format!(
            "{text:?} is not an address; write IP:PORT (e.g. \"127.0.0.1:8080\") or localhost:PORT"
        )
    };
    let (host, port) = text.rsplit_once(':').ok_or_else(invalid)?;
    if !host.eq_ignore_ascii_case("localhost") {
        return Err(invalid());
    }
    let port: u16 = port.parse().map_err(|_| invalid())?;
    Ok(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
}

/// Parses a duration such as `250ms`, `30s`, `5m` or `1h 30m`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|err| format!("{text:?} is not a duration ({err}); write e.g. \"30s\" or \"5m\""))
}

/// Parses a size in bytes: `1024`, `512KiB`, `25MiB`, `1GB` (KB = 1000, KiB = 1024).
pub fn parse_size(text: &str) -> Result<usize, String> {
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (digits, unit) = trimmed.split_at(split);
    let invalid =
        || format!("{text:?} is not a size; write e.g. \"25MiB\", \"512KiB\" or \"1048576\"");
    let number: usize = digits.parse().map_err(|_| invalid())?;
    let multiplier: usize = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" | "k" => 1_000,
        "kib" => 1 << 10,
        "mb" | "m" => 1_000_000,
        "mib" => 1 << 20,
        "gb" | "g" => 1_000_000_000,
        "gib" => 1 << 30,
        _ => return Err(invalid()),
    };
    number.checked_mul(multiplier).ok_or_else(invalid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_addresses() {
        assert_eq!(
            parse_listen("127.0.0.1:8080").unwrap().to_string(),
            "127.0.0.1:8080"
        );
        assert_eq!(parse_listen("[::]:8443").unwrap().to_string(), "[::]:8443");
        assert_eq!(
            parse_listen(" localhost:8080").unwrap().to_string(),
            "127.0.0.1:8080"
        );
        assert_eq!(
            parse_listen("LOCALHOST:0").unwrap().to_string(),
            "127.0.0.1:0"
        );
        for bad in [
            "localhost",
            "relay.example.com:8080",
            "localhost:http",
            "8080",
            ":8080",
        ] {
            let message = parse_listen(bad).unwrap_err();
            assert!(message.ends_with("or localhost:PORT"), "{bad}: {message}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1024"), Ok(1024));
        assert_eq!(parse_size("25MiB"), Ok(25 * 1024 * 1024));
        assert_eq!(parse_size("25 MiB"), Ok(25 * 1024 * 1024));
        assert_eq!(parse_size("1kb"), Ok(1000));
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("-1").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
        assert!(
            parse_duration("soon")
                .unwrap_err()
                .contains("not a duration")
        );
    }
}
