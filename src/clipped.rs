//! A caller's own words (a path, a method, a source's name, where a redirect leads)
//! repeated in an answer, an error or a log line: cut to a length, so that a 30 KB path
//! is not 30 KB of log per request. Its own module because the answers, the server's log
//! lines and the upstream's failures all repeat such words.

/// The most bytes of a caller's own words (a path, a method, a source's name) repeated in
/// an answer or a log line: a 30 KB path is not worth 30 KB of log per request.
pub const MOST_ECHOED: usize = 200;

/// A caller's words cut to [`MOST_ECHOED`] bytes (at a character's end), saying how long
/// they were when cut.
pub struct Clipped<'a>(pub &'a str);

impl std::fmt::Display for Clipped<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.len() <= MOST_ECHOED {
            return f.write_str(self.0);
        }
        let end = (0..=MOST_ECHOED)
            .rev()
            .find(|&at| self.0.is_char_boundary(at))
            .unwrap_or(0);
        write!(f, "{}… ({} bytes)", &self.0[..end], self.0.len())
    }
}

/// [`Clipped`], as a string to keep in an error.
pub fn clipped(text: &str) -> String {
    Clipped(text).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_caller_s_long_words_are_clipped_at_a_character() {
        assert_eq!(clipped("/hooks/github"), "/hooks/github");
        let long = format!("/{}", "é".repeat(300));
        let cut = clipped(&long);
        assert!(cut.ends_with("… (601 bytes)"), "{cut}");
        assert!(cut.len() < MOST_ECHOED + 20, "{}", cut.len());
        let exact = "a".repeat(MOST_ECHOED);
        assert_eq!(clipped(&exact), exact);
    }
}
