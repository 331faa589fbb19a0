//! Rules' `paths` and `paths_exclude`: run only for pushes that changed files the rule
//! cares about, as GitLab's `rules:changes` and GitHub Actions' `paths` / `paths-ignore`
//! choose pipelines in a monorepo.
//!
//! A push passes a rule when at least one file it changed matches the rule's `paths` (any
//! file, without them) and none of its `paths_exclude`. When the webhook does not tell
//! every changed file ([`crate::event::ChangedFiles::Unknown`]: a tag, a deletion, a
//! truncated commit list), the filters do not apply and the rule runs: a build too many
//! is cheaper than a release that never built.
//!
//! Every rule's globs are one [`GlobSet`], so a push's files are matched once for all
//! rules rather than once per rule: a monorepo's fifty services each with a rule cost
//! about what one does.

use std::collections::BTreeSet;

use globset::{GlobSet, GlobSetBuilder};

use super::{Patterns, RuleSpec};

/// How many of the changed files a reason names before `…`.
const FILES_SHOWN: usize = 3;

/// Every rule's path globs together, and whose each one is.
#[derive(Clone, Debug, Default)]
pub struct PathFilters {
    set: GlobSet,
    /// For each glob of `set`: its rule's index, and whether it is a `paths_exclude` one.
    owners: Vec<(usize, bool)>,
    /// The rules with filters, by index, and whether each has `paths` (else only excludes).
    filtered: Vec<(usize, bool)>,
}

impl PathFilters {
    /// The filters of `rules`, indexed as they are.
    pub fn of<'a>(rules: impl Iterator<Item = &'a RuleSpec>) -> PathFilters {
        let mut builder = GlobSetBuilder::new();
        let mut owners = Vec::new();
        let mut filtered = Vec::new();
        for (index, spec) in rules.enumerate() {
            if !spec.filters_paths() {
                continue;
            }
            filtered.push((index, spec.paths.is_some()));
            for (patterns, excludes) in [(&spec.paths, false), (&spec.paths_exclude, true)] {
                for glob in patterns.iter().flat_map(Patterns::globs) {
                    builder.add(glob);
                    owners.push((index, excludes));
                }
            }
        }
        PathFilters {
            set: builder
                .build()
                .expect("globs that compiled one by one compile together"),
            owners,
            filtered,
        }
    }

    /// Which rules (by index, among `rule_count`) a push that changed `files` passes:
    /// `true` for each rule with filters that one of the files gets through, and for every
    /// rule without filters.
    pub fn passing(&self, files: &BTreeSet<&str>, rule_count: usize) -> Vec<bool> {
        let mut passes = vec![true; rule_count];
        for &(index, _) in &self.filtered {
            passes[index] = false;
        }
        let mut waiting = self.filtered.len();
        let mut hits = Vec::new();
        for file in files {
            if waiting == 0 {
                break;
            }
            self.set.matches_into(file, &mut hits);
            for &(index, has_paths) in &self.filtered {
                if passes[index] {
                    continue;
                }
                let owned = |excludes: bool| {
                    hits.iter()
                        .any(|&glob| self.owners[glob] == (index, excludes))
                };
                if (!has_paths || owned(false)) && !owned(true) {
                    passes[index] = true;
                    waiting -= 1;
                }
            }
        }
        passes
    }
}

/// Why a push that changed `files` does not pass a rule's filters (one that
/// [`PathFilters::passing`] says it does not pass).
pub fn reason(
    paths: Option<&Patterns>,
    paths_exclude: Option<&Patterns>,
    files: &BTreeSet<&str>,
) -> String {
    let count = files.len();
    let mut named = files
        .iter()
        .take(FILES_SHOWN)
        .copied()
        .collect::<Vec<_>>()
        .join(", ");
    if count > FILES_SHOWN {
        named.push_str(", …");
    }
    let changed = match count {
        1 => "the 1 changed file".to_owned(),
        n => format!("the {n} changed files"),
    };
    match (paths, paths_exclude) {
        (Some(paths), None) => {
            format!(
                "paths: none of {changed} ({named}) matches {}",
                paths.shown()
            )
        }
        (Some(paths), Some(exclude)) => format!(
            "paths: none of {changed} ({named}) matches {} without also matching paths_exclude {}",
            paths.shown(),
            exclude.shown()
        ),
        (None, exclude) => format!(
            "paths_exclude: {} ({named}) {} {}",
            match count {
                1 => "the 1 changed file".to_owned(),
                n => format!("all {n} changed files"),
            },
            if count == 1 { "matches" } else { "match" },
            exclude.map(Patterns::shown).unwrap_or_default()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn patterns(texts: &[&str]) -> Option<Patterns> {
        Some(Patterns::new(texts.iter().map(|t| t.to_string()).collect()).unwrap())
    }

    fn files<'a>(paths: &[&'a str]) -> BTreeSet<&'a str> {
        paths.iter().copied().collect()
    }

    /// One rule's verdict, as the rules ask for it: `None` when the push passes.
    fn why_not(
        paths: Option<Patterns>,
        paths_exclude: Option<Patterns>,
        changed: &[&str],
    ) -> Option<String> {
        let spec = RuleSpec {
            paths,
            paths_exclude,
            ..crate::rules::tests::spec("r", None, None, &[])
        };
        let changed = files(changed);
        let passes = PathFilters::of(std::iter::once(&spec)).passing(&changed, 1)[0];
        (!passes).then(|| reason(spec.paths.as_ref(), spec.paths_exclude.as_ref(), &changed))
    }

    #[test]
    fn a_push_passes_when_one_changed_file_is_wanted() {
        let api = || patterns(&["services/api/**"]);
        assert_eq!(
            why_not(api(), None, &["README.md", "services/api/src/main.rs"]),
            None
        );
        assert_eq!(
            why_not(api(), None, &["README.md", "services/web/index.html"]).unwrap(),
            "paths: none of the 2 changed files (README.md, services/web/index.html) matches [\"services/api/**\"]"
        );
    }

    #[test]
    fn globs_follow_the_rules_globs() {
        // `*` stays within a folder, `**` crosses them, and `**/` may stand for none.
        let intro = ["docs/guide/intro.md"];
        assert!(why_not(patterns(&["docs/*"]), None, &intro).is_some());
        assert!(why_not(patterns(&["docs/**"]), None, &intro).is_none());
        assert!(why_not(patterns(&["**/*.md"]), None, &["README.md"]).is_none());
        // Git's paths are case-sensitive, and so are these.
        assert!(why_not(patterns(&["readme.md"]), None, &["README.md"]).is_some());
    }

    #[test]
    fn excluded_files_do_not_count() {
        let docs = || patterns(&["**/*.md", "docs/**"]);
        assert_eq!(
            why_not(None, docs(), &["README.md", "docs/a.txt"]).unwrap(),
            "paths_exclude: all 2 changed files (README.md, docs/a.txt) match [\"**/*.md\", \"docs/**\"]"
        );
        assert_eq!(
            why_not(None, docs(), &["README.md"]).unwrap(),
            "paths_exclude: the 1 changed file (README.md) matches [\"**/*.md\", \"docs/**\"]"
        );
        assert_eq!(why_not(None, docs(), &["README.md", "src/lib.rs"]), None);
        // Both: a file must be wanted and not excluded.
        let src = || patterns(&["src/**"]);
        assert_eq!(
            why_not(src(), docs(), &["src/README.md", "docs/x.rs"]).unwrap(),
            "paths: none of the 2 changed files (docs/x.rs, src/README.md) matches [\"src/**\"] without also matching paths_exclude [\"**/*.md\", \"docs/**\"]"
        );
        assert_eq!(
            why_not(src(), docs(), &["src/README.md", "src/lib.rs"]),
            None
        );
    }

    #[test]
    fn each_rule_is_judged_by_its_own_globs() {
        let spec = |paths: &[&str], exclude: Option<&[&str]>| RuleSpec {
            paths: (!paths.is_empty()).then(|| patterns(paths)).flatten(),
            paths_exclude: exclude.and_then(patterns),
            ..crate::rules::tests::spec("r", None, None, &[])
        };
        let specs = [
            spec(&["api/**"], None),
            spec(&[], None),
            spec(&["web/**"], Some(&["**/*.md"])),
            spec(&[], Some(&["**/*.md"])),
            spec(&["docs/**"], None),
        ];
        let filters = PathFilters::of(specs.iter());
        assert_eq!(
            filters.passing(&files(&["api/main.rs", "web/README.md"]), 5),
            [true, true, false, true, false]
        );
        assert_eq!(
            filters.passing(&files(&["web/a.md", "docs/b.md"]), 5),
            [false, true, false, false, true]
        );
    }

    #[test]
    fn a_reason_names_three_files_at_most() {
        assert_eq!(
            why_not(patterns(&["z/**"]), None, &["a", "b", "c", "d", "e"]).unwrap(),
            "paths: none of the 5 changed files (a, b, c, …) matches [\"z/**\"]"
        );
    }
}
