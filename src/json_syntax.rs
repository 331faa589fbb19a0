//! Reading a request body's JSON, and a body that is not valid JSON told as every "not
//! valid JSON" message tells it: what serde_json found and where. Its own small module
//! because both readers of JSON bodies (the webhook sources and the gateway) use it and
//! [`crate::error`] answers its error; neither reader reaches into the answers' module.

/// A JSON syntax error with its position, as every "not valid JSON" message shows it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message} at line {line} column {column}")]
pub struct JsonSyntaxError {
    pub message: String,
    pub line: usize,
    pub column: usize,
}

impl From<&serde_json::Error> for JsonSyntaxError {
    fn from(err: &serde_json::Error) -> Self {
        let text = err.to_string();
        let message = match text.rfind(" at line ") {
            Some(at) => text[..at].to_owned(),
            None => text,
        };
        JsonSyntaxError {
            message,
            line: err.line(),
            column: err.column(),
        }
    }
}

/// Reads a JSON body as serde_json does, checking that it is UTF-8 once for the whole body
/// (a vectorised pass) instead of once for every string it keeps: every key of a GitHub
/// push's 75-key `repository` is one such check. Verifying and reading a push took
/// 0.91–0.96× the time (`benches/sources.rs`, two builds alternating; the HMAC is half of
/// it). A body that is not UTF-8 is read as bytes, so that its error is serde_json's own,
/// with the line and column of the bad byte.
pub fn read<T: serde::de::DeserializeOwned>(body: &[u8]) -> serde_json::Result<T> {
    match std::str::from_utf8(body) {
        Ok(text) => serde_json::from_str(text),
        Err(_) => serde_json::from_slice(body),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_and_bytes_read_alike_and_fail_alike() {
        let good = br#"{"a": ["\u00e9", "\ud83d\ude00", 1.5], "b": null}"#;
        let read_text: serde_json::Value = read(good).unwrap();
        let read_bytes: serde_json::Value = serde_json::from_slice(good).unwrap();
        assert_eq!(read_text, read_bytes);
        for bad in [
            &b"{\"a\": \"\xff\"}"[..],
            b"{\"a\": 1,}",
            b"{\"a\"",
            b"\xc3",
            b"[1] 2",
        ] {
            let ours = read::<serde_json::Value>(bad).unwrap_err();
            let theirs = serde_json::from_slice::<serde_json::Value>(bad).unwrap_err();
            assert_eq!(
                (ours.to_string(), ours.classify()),
                (theirs.to_string(), theirs.classify()),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
