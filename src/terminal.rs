//! What reaches an operator's terminal: text that came from a payload or a header may
//! hold control characters (terminal escape codes among them), which must be shown, not
//! obeyed. Everything printed for people — `explain`, `deliveries`, text log lines — goes
//! through here; JSON output escapes them by itself.

use std::borrow::Cow;
use std::fmt;

/// Whether `c` must be shown escaped: every control character but newline and tab.
fn is_unsafe(c: char) -> bool {
    c.is_control() && c != '\n' && c != '\t'
}

/// `text` with its control characters (but newlines and tabs) written as `\u{1b}`.
pub fn escape_controls(text: &str) -> Cow<'_, str> {
    if !text.chars().any(is_unsafe) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if is_unsafe(c) {
            out.push_str(&c.escape_unicode().to_string());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// A [`fmt::Write`] that escapes control characters on their way through.
pub struct Escaping<W>(pub W);

impl<W: fmt::Write> fmt::Write for Escaping<W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut rest = s;
        while let Some(at) = rest.find(is_unsafe) {
            self.0.write_str(&rest[..at])?;
            let c = rest[at..].chars().next().expect("a character at a match");
            write!(self.0, "{}", c.escape_unicode())?;
            rest = &rest[at + c.len_utf8()..];
        }
        self.0.write_str(rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fmt::Write;

    #[test]
    fn escape_codes_are_shown_not_obeyed() {
        let hostile = "Codertocat/\u{1b}[31mRED\u{1b}[0m\r\u{7}ok\n\tnext";
        let shown = escape_controls(hostile);
        assert_eq!(
            shown,
            "Codertocat/\\u{1b}[31mRED\\u{1b}[0m\\u{d}\\u{7}ok\n\tnext"
        );
        let mut written = String::new();
        write!(Escaping(&mut written), "{hostile}").unwrap();
        assert_eq!(written, shown);
        assert!(matches!(escape_controls("plain"), Cow::Borrowed(_)));
    }
}
