//! A request body that is not valid JSON, told as every "not valid JSON" message tells it:
//! what serde_json found and where. Its own small module because both readers of JSON
//! bodies (the webhook sources and the gateway) produce it and [`crate::error`] answers
//! it; neither reader reaches into the answers' module for it.

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
