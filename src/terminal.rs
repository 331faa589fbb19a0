//! What reaches an operator's terminal: text that came from a payload or a header may
//! hold control characters (terminal escape codes among them), which must be shown, not
//! obeyed. Everything printed for people — `explain`, `deliveries`, text log lines — goes
//! through here; JSON output escapes them by itself.

use std::borrow::Cow;
use std::fmt;
use std::fmt::Write as _;

/// Whether `c` must be shown escaped: every control character but newline and tab. The
/// definition [`first_unsafe`] implements byte by byte; its test checks the two agree.
#[cfg(test)]
fn is_unsafe(c: char) -> bool {
    c.is_control() && c != '\n' && c != '\t'
}

/// Where the first character to show escaped (`is_unsafe`, which the tests hold it to)
/// starts in `text`, read byte by byte (every log line passes through here, and decoding
/// each character took a fifth of a line's cost):
/// control characters are U+0000–U+001F, U+007F (one byte each) and U+0080–U+009F (0xC2
/// then 0x80–0x9F in UTF-8; no other character's encoding holds that pair).
fn first_unsafe(text: &str) -> Option<usize> {
    let bytes = text.as_bytes();
    // Almost no text holds those bytes, nor a tab or a newline: a pass without an early
    // exit, which the compiler turns into vector instructions, says so at a fraction of
    // the search's cost per byte (a log line's fields: 1,600 instructions, now a few
    // hundred).
    let suspect = bytes.iter().fold(false, |found, &b| {
        found | (b < 0x20) | (b == 0x7f) | (b == 0xc2)
    });
    if !suspect {
        return None;
    }
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

/// Text log lines' fields as `name=value` pairs after the message, separated by spaces,
/// each value as its `Debug` (a string quoted, a `%value` as its `Display`), with control
/// characters that came from payloads shown as escapes: a log line must never drive the
/// terminal that shows it.
///
/// Why not `tracing_subscriber`'s `debug_fn` with an escaping writer, which wrote the same:
/// that escaped each piece of a field as it was written, some 25 pieces a line, and with
/// the formatting around it cost 8,000–10,000 instructions a line (`benches/instructions.sh`):
/// a webhook's three lines, a tenth of its request path outside the HMAC. Here a line's fields
/// are written into one buffer, plain strings without the formatting machinery, and
/// escaped once.
pub struct LogFields;

impl<'writer> tracing_subscriber::fmt::FormatFields<'writer> for LogFields {
    fn format_fields<R: tracing_subscriber::field::RecordFields>(
        &self,
        mut writer: tracing_subscriber::fmt::format::Writer<'writer>,
        fields: R,
    ) -> fmt::Result {
        use std::cell::RefCell;
        thread_local! {
            static LINE: RefCell<String> = const { RefCell::new(String::new()) };
        }
        LINE.with(|line| {
            // Should fields ever be formatted inside another line's (tracing drops an event
            // logged from a field's `Debug`), the buffer is taken: that line goes apart.
            let mut apart = String::new();
            let mut held = line.try_borrow_mut().ok();
            let buffer = match held.as_deref_mut() {
                Some(buffer) => {
                    buffer.clear();
                    buffer
                }
                None => &mut apart,
            };
            fields.record(&mut FieldWriter::new(buffer));
            let result = writer.write_str(&escape_controls(buffer));
            // Keep the buffer for the next line, unless a huge one grew it.
            if buffer.capacity() > 64 * 1024 {
                *buffer = String::new();
            }
            result
        })
    }
}

/// Writes each field of one event into a line, as [`LogFields`] describes.
struct FieldWriter<'a> {
    line: &'a mut String,
    first: bool,
}

impl<'a> FieldWriter<'a> {
    fn new(line: &'a mut String) -> Self {
        FieldWriter { line, first: true }
    }

    /// The space before every field but the first, and the name before every value but
    /// the message.
    fn start(&mut self, field: &tracing::field::Field) {
        if !std::mem::take(&mut self.first) {
            self.line.push(' ');
        }
        if field.name() != "message" {
            self.line.push_str(field.name());
            self.line.push('=');
        }
    }
}

impl tracing::field::Visit for FieldWriter<'_> {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.start(field);
        // What `Debug` writes for a string of printable ASCII without quotes or
        // backslashes: itself, quoted.
        let plain = value
            .bytes()
            .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\');
        if plain {
            self.line.push('"');
            self.line.push_str(value);
            self.line.push('"');
        } else {
            let _ = write!(self.line, "{value:?}");
        }
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn fmt::Debug) {
        self.start(field);
        let _ = write!(self.line, "{value:?}");
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

    /// The fields as `tracing_subscriber`'s `debug_fn` wrote them before [`LogFields`]
    /// (`name=value`, delimited, each piece escaped): what the lines must still read.
    fn reference_fields() -> impl for<'w> tracing_subscriber::fmt::FormatFields<'w> {
        use tracing_subscriber::field::MakeExt;
        tracing_subscriber::fmt::format::debug_fn(|writer, field, value| {
            let mut out = Escaping(writer);
            match field.name() {
                "message" => write!(out, "{value:?}"),
                name => write!(out, "{name}={value:?}"),
            }
        })
        .delimited(" ")
    }

    /// Log lines written by `emit` through a text subscriber with `fields`.
    fn lines_with<F>(fields: F, emit: fn()) -> String
    where
        F: for<'w> tracing_subscriber::fmt::FormatFields<'w> + Send + Sync + 'static,
    {
        let sink = crate::log_writer::MemorySink::default();
        let written = sink.clone();
        let subscriber = tracing_subscriber::fmt()
            .without_time()
            .with_ansi(false)
            .fmt_fields(fields)
            .with_writer(move || sink.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, emit);
        let bytes = written.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn log_lines_read_as_they_did_and_show_control_characters_as_escapes() {
        fn emit() {
            let peer: std::net::SocketAddr = "127.0.0.1:4242".parse().unwrap();
            let hostile = "Codertocat/\u{1b}[31mRED\u{1b}[0m\r\u{7}";
            tracing::info!(%peer, method = "POST", status = 202u16, elapsed_ms = 0.25, "request");
            tracing::warn!(
                source = "github",
                reason = %hostile,
                quoted = "say \"hi\" \\ then\ttab and caf\u{e9} \u{200b}",
                id = -7i64,
                ok = true,
                "webhook \u{1b}[2J refused"
            );
            tracing::info!(
                empty = "",
                error = &std::io::Error::other("disk \u{1b} full") as &dyn std::error::Error,
                debug = ?vec!["a\nb", "\u{9b}"],
                "plain"
            );
            tracing::info!("only a message, {} of it", 1);
            // A field whose `Debug` logs while its own line is being written: tracing drops
            // that inner event (its dispatcher is not re-entered), and the line still comes.
            struct Chatty;
            impl fmt::Debug for Chatty {
                fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    tracing::info!(inner = "x\u{1b}", "logged from inside a field");
                    f.write_str("chatty")
                }
            }
            tracing::info!(field = ?Chatty, "outer");
        }
        let expected = lines_with(reference_fields(), emit);
        let written = lines_with(LogFields, emit);
        assert_eq!(written, expected);
        assert_eq!(written.lines().count(), 5, "{written}");
        assert!(written.contains("outer field=chatty"), "{written}");
        assert!(!written.contains('\u{1b}') && !written.contains('\u{7}'));
        assert!(
            written.contains(r#"quoted="say \"hi\" \\ then\ttab and café \u{200b}""#),
            "{written}"
        );
    }
}
