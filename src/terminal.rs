//! What reaches an operator's terminal: text that came from a payload or a header may
//! hold control characters (terminal escape codes among them), which must be shown, not
//! obeyed. Everything printed for people — `explain`, `deliveries`, text log lines — goes
//! through here; JSON output escapes them by itself.

use std::borrow::Cow;
use std::fmt;

/// Whether `c` must be shown escaped: every control character but newline and tab. The
/// definition [`first_unsafe`] implements byte by byte; its test checks the two agree.
#[cfg(test)]
fn is_unsafe(c: char) -> bool {
    c.is_control() && c != '\n' && c != '\t'
}

/// Where the first character [`is_unsafe`] starts in `text`, read byte by byte (every log
/// line passes through here, and decoding each character took a fifth of a line's cost):
/// control characters are U+0000–U+001F, U+007F (one byte each) and U+0080–U+009F (0xC2
/// then 0x80–0x9F in UTF-8; no other character's encoding holds that pair).
fn first_unsafe(text: &str) -> Option<usize> {
    let bytes = text.as_bytes();
    bytes.iter().enumerate().position(|(at, &b)| {
        (b < 0x20 && b != b'\n' && b != b'\t')
            || b == 0x7f
            || (b == 0xc2 && matches!(bytes.get(at + 1), Some(0x80..=0x9f)))
    })
}

/// `text` with its control characters (but newlines and tabs) written as `\u{1b}`.
pub fn escape_controls(text: &str) -> Cow<'_, str> {
    if first_unsafe(text).is_none() {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    fmt::Write::write_str(&mut Escaping(&mut out), text).expect("a String takes every write");
    Cow::Owned(out)
}

/// A [`fmt::Write`] that escapes control characters on their way through.
pub struct Escaping<W>(pub W);

impl<W: fmt::Write> fmt::Write for Escaping<W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut rest = s;
        while let Some(at) = first_unsafe(rest) {
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

    /// The byte-wise search finds exactly what a character-wise one would, for every
    /// character of the first planes, alone and between others.
    #[test]
    fn the_byte_wise_search_agrees_with_the_characters() {
        for code in (0..0x3000).chain([0xfeff, 0x1f600, 0x10ffff]) {
            let Some(c) = char::from_u32(code) else {
                continue;
            };
            for text in [
                c.to_string(),
                format!("a\u{e9}{c}\u{80}"),
                format!("{c}\u{9f}x"),
            ] {
                assert_eq!(
                    first_unsafe(&text),
                    text.find(is_unsafe),
                    "U+{code:04X} in {text:?}"
                );
            }
        }
    }
}
