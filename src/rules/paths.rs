//! A rule's `paths` and `paths_exclude`: run only for pushes that changed files the rule
//! cares about, as GitLab's `rules:changes` and GitHub Actions' `paths` / `paths-ignore`
//! choose pipelines in a monorepo.
//!
//! A push passes when at least one file it changed matches `paths` (any file, without
//! it) and does not match `paths_exclude`. When the webhook does not tell every changed
//! file ([`ChangedFiles::Unknown`]: a tag, a deletion, a truncated commit list), the
//! filters do not apply and the rule runs: a build too many is cheaper than a release
//! that never built.

use super::Patterns;
use crate::event::ChangedFiles;

/// How many of the changed files a reason names before `…`.
const FILES_SHOWN: usize = 3;

/// Why a push's files do not pass a rule's filters, or `None` when they do (or when the
/// files are not known).
pub fn why_not(
    paths: Option<&Patterns>,
    paths_exclude: Option<&Patterns>,
    files: &ChangedFiles<'_>,
) -> Option<String> {
    if paths.is_none() && paths_exclude.is_none() {
        return None;
    }
    let ChangedFiles::Listed(files) = files else {
        return None;
    };
    let passes = |file: &&str| {
        paths.is_none_or(|p| p.is_match(file)) && !paths_exclude.is_some_and(|e| e.is_match(file))
    };
    if files.iter().any(passes) {
        return None;
    }
    let count = files.len();
    let named = shown(files.iter().copied(), count);
    let changed = match count {
        1 => "the 1 changed file".to_owned(),
        n => format!("the {n} changed files"),
    };
    Some(match (paths, paths_exclude) {
        (Some(paths), None) => format!(
            "paths: none of {changed} ({named}) matches {}",
            paths.shown()
        ),
        (Some(paths), Some(exclude)) => format!(
            "paths: none of {changed} ({named}) matches {} without also matching paths_exclude {}",
            paths.shown(),
            exclude.shown()
        ),
        (None, Some(exclude)) => format!(
            "paths_exclude: {} ({named}) {} {}",
            match count {
                1 => "the 1 changed file".to_owned(),
                n => format!("all {n} changed files"),
            },
            if count == 1 { "matches" } else { "match" },
            exclude.shown()
        ),
        (None, None) => unreachable!("returned above"),
    })
}

/// `a.md, b.md, c.md, …`: the first few names.
fn shown<'a>(files: impl Iterator<Item = &'a str>, count: usize) -> String {
    let mut text = files.take(FILES_SHOWN).collect::<Vec<_>>().join(", ");
    if count > FILES_SHOWN {
        text.push_str(", …");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn patterns(texts: &[&str]) -> Patterns {
        Patterns::new(texts.iter().map(|t| t.to_string()).collect()).unwrap()
    }

    fn listed<'a>(files: &[&'a str]) -> ChangedFiles<'a> {
        ChangedFiles::Listed(files.iter().copied().collect())
    }

    #[test]
    fn a_push_passes_when_one_changed_file_is_wanted() {
        let api = patterns(&["services/api/**"]);
        let files = listed(&["README.md", "services/api/src/main.rs"]);
        assert_eq!(why_not(Some(&api), None, &files), None);
        let files = listed(&["README.md", "services/web/index.html"]);
        assert_eq!(
            why_not(Some(&api), None, &files).unwrap(),
            "paths: none of the 2 changed files (README.md, services/web/index.html) matches [\"services/api/**\"]"
        );
    }

    #[test]
    fn globs_follow_the_rules_globs() {
        // `*` stays within a folder, `**` crosses them, and `**/` may stand for none.
        let files = listed(&["docs/guide/intro.md"]);
        assert!(why_not(Some(&patterns(&["docs/*"])), None, &files).is_some());
        assert!(why_not(Some(&patterns(&["docs/**"])), None, &files).is_none());
        assert!(why_not(Some(&patterns(&["**/*.md"])), None, &listed(&["README.md"])).is_none());
        // Git's paths are case-sensitive, and so are these.
        assert!(
            why_not(
                Some(&patterns(&["readme.md"])),
                None,
                &listed(&["README.md"])
            )
            .is_some()
        );
    }

    #[test]
    fn excluded_files_do_not_count() {
        let docs = patterns(&["**/*.md", "docs/**"]);
        assert_eq!(
            why_not(None, Some(&docs), &listed(&["README.md", "docs/a.txt"])).unwrap(),
            "paths_exclude: all 2 changed files (README.md, docs/a.txt) match [\"**/*.md\", \"docs/**\"]"
        );
        assert_eq!(
            why_not(None, Some(&docs), &listed(&["README.md"])).unwrap(),
            "paths_exclude: the 1 changed file (README.md) matches [\"**/*.md\", \"docs/**\"]"
        );
        assert_eq!(
            why_not(None, Some(&docs), &listed(&["README.md", "src/lib.rs"])),
            None
        );
        // Both: a file must be wanted and not excluded.
        let src = patterns(&["src/**"]);
        let files = listed(&["src/README.md", "docs/x.rs"]);
        assert_eq!(
            why_not(Some(&src), Some(&docs), &files).unwrap(),
            "paths: none of the 2 changed files (docs/x.rs, src/README.md) matches [\"src/**\"] without also matching paths_exclude [\"**/*.md\", \"docs/**\"]"
        );
        let files = listed(&["src/README.md", "src/lib.rs"]);
        assert_eq!(why_not(Some(&src), Some(&docs), &files), None);
    }

    #[test]
    fn unknown_files_let_the_push_through() {
        let api = patterns(&["services/api/**"]);
        let unknown = ChangedFiles::Unknown("a tag push changes no files".into());
        assert_eq!(why_not(Some(&api), Some(&api), &unknown), None);
        // No filters: nothing to say whatever the files.
        assert_eq!(why_not(None, None, &listed(&["a"])), None);
    }

    #[test]
    fn a_reason_names_three_files_at_most() {
        let files = listed(&["a", "b", "c", "d", "e"]);
        assert_eq!(
            why_not(Some(&patterns(&["z/**"])), None, &files).unwrap(),
            "paths: none of the 5 changed files (a, b, c, …) matches [\"z/**\"]"
        );
    }
}
