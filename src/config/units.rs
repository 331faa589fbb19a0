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

/// The longest duration any setting takes: a hundred years. Durations become
/// milliseconds since 1970 in the store (`now + retention`, `now + delay`), and one past
/// what those hold used to wrap around: `retention = "18446744073709551615s"`, meant as
/// "keep everything", pruned every finished delivery at the next start.
pub const LONGEST_DURATION: Duration = Duration::from_secs(100 * 31_557_600);

/// Parses a duration such as `250ms`, `30s`, `5m` or `1h 30m`, up to [`LONGEST_DURATION`].
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text.trim()).map_err(|err| {
        format!("{text:?} is not a duration ({err}); write e.g. \"30s\" or \"5m\"")
    })?;
    if duration > LONGEST_DURATION {
        return Err(format!(
            "{text:?} is longer than 100 years, the longest duration hookrelay takes"
        ));
    }
    Ok(duration)
}

/// [`parse_duration`] for a setting that cannot work below `least` (a timeout of `0s`
/// fails every call; a retry delay of `0s` calls a failing GitLab again at once, over and
/// over).
pub fn parse_duration_at_least(text: &str, least: Duration) -> Result<Duration, String> {
    let duration = parse_duration(text)?;
    if duration < least {
        return Err(format!(
            "{text:?} is too short: at least {}",
            humantime::format_duration(least)
        ));
    }
    Ok(duration)
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
        assert_eq!(parse_duration("100y"), Ok(LONGEST_DURATION));
        assert_eq!(
            parse_duration("18446744073709551615s"),
            Err("\"18446744073709551615s\" is longer than 100 years, the longest duration hookrelay takes".into())
        );
        // The longest duration stays far inside the store's milliseconds since 1970.
        assert!(LONGEST_DURATION.as_millis() < (i64::MAX / 1000) as u128);
        assert_eq!(
            parse_duration_at_least("0s", Duration::from_millis(100)),
            Err("\"0s\" is too short: at least 100ms".into())
        );
        assert_eq!(
            parse_duration_at_least("100ms", Duration::from_millis(100)),
            Ok(Duration::from_millis(100))
        );
    }
}
