//! Configuration problems, reported as `file:line: message`, all of them at once.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// One thing wrong with the configuration, located where the user can fix it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    /// 1-based; `None` when the problem is with the file as a whole.
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{}: {}", self.file.display(), line, self.message),
            None => write!(f, "{}: {}", self.file.display(), self.message),
        }
    }
}

/// Every problem found while loading, in file and line order.
#[derive(Clone, Debug, Default, PartialEq, Eq, thiserror::Error)]
pub struct Problems(pub Vec<Problem>);

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{problem}")?;
        }
        Ok(())
    }
}

/// Collects problems for one file, turning byte spans into line numbers.
pub struct FileProblems<'a> {
    pub file: &'a Path,
    text: &'a str,
    pub found: Vec<Problem>,
    /// What is valid but will not do what it looks like (`check` shows it and passes).
    pub warnings: Vec<Problem>,
}

impl<'a> FileProblems<'a> {
    pub fn new(file: &'a Path, text: &'a str) -> Self {
        FileProblems {
            file,
            text,
            found: Vec::new(),
            warnings: Vec::new(),
        }
    }

    /// Records a warning at a byte span of the file.
    pub fn warn(&mut self, span: std::ops::Range<usize>, message: impl Into<String>) {
        self.warnings.push(Problem {
            file: self.file.to_owned(),
            line: Some(line_of(self.text, span.start)),
            message: message.into(),
        });
    }

    /// Records a problem at a byte span of the file (`None`: the whole file).
    pub fn at(&mut self, span: Option<Range<usize>>, message: impl Into<String>) {
        let line = span.map(|span| line_of(self.text, span.start));
        self.found.push(Problem {
            file: self.file.to_owned(),
            line,
            message: message.into(),
        });
    }

    /// The folder of the file, against which the paths it names are taken.
    pub fn folder(&self) -> &'a Path {
        self.file.parent().unwrap_or(Path::new("."))
    }

    /// The 1-based line of a byte offset, for messages that cite another place.
    pub fn line(&self, offset: usize) -> usize {
        line_of(self.text, offset)
    }

    /// The key whose value starts at byte `offset` (`allow_sha1` for `allow_sha1 = "yes"`,
    /// `header` inside `{ header = 1 }`), read from the text before it on its line: the
    /// TOML reader's type errors ("invalid type: string \"yes\", expected a boolean") name
    /// the value, not the key.
    pub fn key_at(&self, offset: usize) -> Option<&'a str> {
        let before = self.text.get(..offset)?;
        let line = &before[before.rfind('\n').map_or(0, |i| i + 1)..];
        let key = line.trim_end().strip_suffix('=')?.trim_end();
        let start = key
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
            .map_or(0, |i| i + 1);
        Some(&key[start..]).filter(|key| !key.is_empty())
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_one_based() {
        let text = "a = 1\nb = 2\n";
        let mut problems = FileProblems::new(Path::new("x.toml"), text);
        problems.at(Some(0..1), "first");
        problems.at(Some(6..7), "second");
        problems.at(None, "whole");
        let shown: Vec<String> = problems.found.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            ["x.toml:1: first", "x.toml:2: second", "x.toml: whole"]
        );
    }

    #[test]
    fn the_key_of_a_value_is_read_from_its_line() {
        let text = "[s]\nallow_sha1 = \"yes\"\nsig = { header = 1, algorithm = 2 }\n[t]\n";
        let problems = FileProblems::new(Path::new("x.toml"), text);
        let at = |needle: &str| problems.key_at(text.find(needle).unwrap());
        assert_eq!(at("\"yes\""), Some("allow_sha1"));
        assert_eq!(at("{ header"), Some("sig"));
        assert_eq!(at("1,"), Some("header"));
        assert_eq!(at("2 }"), Some("algorithm"));
        assert_eq!(at("allow_sha1"), None);
        assert_eq!(at("[t]"), None);
    }
}
