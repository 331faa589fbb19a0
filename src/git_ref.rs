//! Git ref names, validated once at the edge.
//!
//! A [`GitRef`] is a branch or tag name that git itself would accept
//! (`git check-ref-format` rules, one-level names allowed), given either short (`main`) or
//! fully qualified (`refs/heads/main`, `refs/tags/v1`). GitLab builds the ref's current head,
//! so a commit SHA is refused here with advice to pass it as a variable instead.

use std::fmt;

/// A validated branch or tag name, kept exactly as the caller wrote it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct GitRef(String);

/// Why a ref was refused; the message names the ref and the rule it breaks.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("ref {name:?} {reason}")]
pub struct RefError {
    pub name: String,
    pub reason: String,
}

/// Whether a fully qualified ref names a branch or a tag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefKind {
    Branch,
    Tag,
}

const BRANCH_PREFIX: &str = "refs/heads/";
const TAG_PREFIX: &str = "refs/tags/";

impl GitRef {
    /// Validates `name` against git's ref-name rules.
    pub fn parse(name: &str) -> Result<GitRef, RefError> {
        match ref_name_problem(name) {
            None => Ok(GitRef(name.to_owned())),
            Some(reason) => Err(RefError {
                name: name.to_owned(),
                reason,
            }),
        }
    }

    /// The ref as written: short or fully qualified.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name without `refs/heads/` or `refs/tags/`.
    pub fn short_name(&self) -> &str {
        self.0
            .strip_prefix(BRANCH_PREFIX)
            .or_else(|| self.0.strip_prefix(TAG_PREFIX))
            .unwrap_or(&self.0)
    }

    /// `Some` when the ref is fully qualified as a branch or tag.
    pub fn kind(&self) -> Option<RefKind> {
        if self.0.starts_with(BRANCH_PREFIX) {
            Some(RefKind::Branch)
        } else if self.0.starts_with(TAG_PREFIX) {
            Some(RefKind::Tag)
        } else {
            None
        }
    }
}

impl fmt::Display for GitRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The first rule `name` breaks, in words a user can act on; `None` when it is valid.
fn ref_name_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("is empty".into());
    }
    if name == "@" {
        return Some("is `@`, which git does not allow as a ref name".into());
    }
    if let Some(c) = name.chars().find(|c| c.is_ascii_control()) {
        return Some(format!("contains the control character {:?}", c));
    }
    if let Some(c) = name
        .chars()
        .find(|c| matches!(c, ' ' | '~' | '^' | ':' | '?' | '*' | '[' | '\\'))
    {
        return Some(format!(
            "contains {c:?}; git ref names cannot contain spaces or any of ~ ^ : ? * [ \\"
        ));
    }
    if name.contains("..") {
        return Some("contains \"..\"".into());
    }
    if name.contains("@{") {
        return Some("contains \"@{\"".into());
    }
    if name.starts_with('/') || name.ends_with('/') {
        return Some("starts or ends with \"/\"".into());
    }
    if name.contains("//") {
        return Some("contains \"//\"".into());
    }
    if name.ends_with('.') {
        return Some("ends with \".\"".into());
    }
    for component in name.split('/') {
        if component.starts_with('.') {
            return Some(format!("has a part starting with \".\" ({component:?})"));
        }
        if component.ends_with(".lock") {
            return Some(format!("has a part ending with \".lock\" ({component:?})"));
        }
    }
    let short = name
        .strip_prefix(BRANCH_PREFIX)
        .or_else(|| name.strip_prefix(TAG_PREFIX))
        .unwrap_or(name);
    if short.is_empty() {
        return Some("names no branch or tag after its prefix".into());
    }
    if short.starts_with('-') {
        return Some("starts with \"-\", which git refuses for branch and tag names".into());
    }
    if is_commit_sha(short) {
        return Some(
            "looks like a commit SHA; the trigger API runs a branch or tag at its current \
             head, so send the branch or tag name and pass the SHA as a variable"
                .into(),
        );
    }
    None
}

/// A full object id: 40 (SHA-1) or 64 (SHA-256) hex digits.
fn is_commit_sha(text: &str) -> bool {
    matches!(text.len(), 40 | 64) && text.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_branch_and_tag_names() {
        for name in [
            "main",
            "master",
            "feature/x",
            "release/1.2",
            "v1.0.0",
            "v.1-branch",
            "refs/heads/main",
            "refs/tags/v1.2.3",
            "deps/@scope",
            "a-b_c+d=e",
            "ünïcode",
            "%2F",
        ] {
            assert!(GitRef::parse(name).is_ok(), "{name} should be valid");
        }
    }

    #[test]
    fn refuses_what_git_check_ref_format_refuses() {
        let cases = [
            ("", "is empty"),
            ("@", "`@`"),
            ("a..b", "\"..\""),
            ("a b", "' '"),
            ("a~1", "'~'"),
            ("a^", "'^'"),
            ("a:b", "':'"),
            ("a?", "'?'"),
            ("a*", "'*'"),
            ("a[b", "'['"),
            ("a\\b", "'\\\\'"),
            ("tab\there", "control character"),
            ("del\u{7f}", "control character"),
            ("/a", "starts or ends"),
            ("a/", "starts or ends"),
            ("a//b", "\"//\""),
            ("a.", "ends with \".\""),
            (".hidden", "starting with \".\""),
            ("a/.b", "starting with \".\""),
            ("a.lock", "\".lock\""),
            ("a.lock/b", "\".lock\""),
            ("a@{1}", "\"@{\""),
            ("-rf", "starts with \"-\""),
            ("refs/heads/-x", "starts with \"-\""),
            ("refs/heads/", "starts or ends"),
        ];
        for (name, why) in cases {
            let err = GitRef::parse(name).expect_err(name);
            assert!(
                err.to_string().contains(why),
                "{name:?}: {err} should mention {why}"
            );
        }
    }

    #[test]
    fn refuses_commit_shas_with_advice() {
        let sha1 = "da1560886d4f094c3e6c9ef40349f7d38b5d27d7";
        let err = GitRef::parse(sha1).unwrap_err();
        assert!(err.to_string().contains("pass the SHA as a variable"));
        assert!(GitRef::parse(&"ab".repeat(32)).is_err());
        // Shorter hex strings are ordinary names (`deadbeef` could be a branch).
        assert!(GitRef::parse("deadbeef").is_ok());
    }

    #[test]
    fn short_name_and_kind() {
        let branch = GitRef::parse("refs/heads/feature/x").unwrap();
        assert_eq!(branch.short_name(), "feature/x");
        assert_eq!(branch.kind(), Some(RefKind::Branch));
        let tag = GitRef::parse("refs/tags/v1").unwrap();
        assert_eq!(tag.short_name(), "v1");
        assert_eq!(tag.kind(), Some(RefKind::Tag));
        let short = GitRef::parse("main").unwrap();
        assert_eq!(short.short_name(), "main");
        assert_eq!(short.kind(), None);
    }
}
