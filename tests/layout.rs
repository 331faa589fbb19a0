//! The house's layout holds: the crate's top-level modules form layers, none importing a
//! module that imports it back (`style.md`, "Two import circles"). Read from the source:
//! every `crate::name` outside comments and test-only code is an edge from the module it
//! is written in to `name`; a cycle fails the test and prints its path and where each of
//! its edges is written.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Where each edge is written, by (from, to).
type Edges = BTreeMap<String, BTreeMap<String, Vec<String>>>;

#[test]
fn top_level_modules_import_each_other_in_one_direction() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let edges = module_edges(&src);
    assert!(
        edges.len() > 20,
        "read too few modules from {}: {:?}",
        src.display(),
        edges.keys()
    );
    if let Some(cycle) = find_cycle(&edges) {
        let mut text = format!(
            "the modules import each other in a circle: {}\n",
            cycle.join(" -> ")
        );
        for pair in cycle.windows(2) {
            let places = &edges[&pair[0]][&pair[1]];
            text.push_str(&format!(
                "  {} -> {}: {}\n",
                pair[0],
                pair[1],
                places.join(", ")
            ));
        }
        panic!("{text}");
    }
}

#[test]
fn a_circle_is_found_and_named() {
    let mut edges = Edges::new();
    for (from, to) in [("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")] {
        edges
            .entry(from.into())
            .or_default()
            .insert(to.into(), vec![format!("{from}.rs:1")]);
    }
    let cycle = find_cycle(&edges).expect("a -> b -> c -> a");
    assert_eq!(cycle.first(), cycle.last());
    assert_eq!(cycle.len(), 4);
    edges.get_mut("c").unwrap().remove("a");
    assert_eq!(find_cycle(&edges), None);
}

#[test]
fn imports_are_read_from_code_only() {
    let code = "//! [`crate::doc_link`]\nuse crate::app::App;\nuse crate::{config::Config, limits};\n\
                let x = crate::outbox::now_ms(); // crate::trailing\n\
                let url = \"https://x/\"; crate::metrics::up();\n#[cfg(test)]\nmod tests {\n    use crate::late;\n}\n";
    let found: BTreeSet<String> = imports(code).into_iter().map(|(name, _)| name).collect();
    let expected: BTreeSet<String> = ["app", "config", "limits", "metrics", "outbox"]
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(found, expected);
}

/// Every edge between top-level modules, from the files under `src`.
fn module_edges(src: &Path) -> Edges {
    let mut files = Vec::new();
    collect(src, &mut files);
    let test_only = test_only_files(&files);
    let mut edges = Edges::new();
    for file in files.iter().filter(|file| !test_only.contains(*file)) {
        let relative = file.strip_prefix(src).expect("under src");
        let first = relative.components().next().expect("a file");
        let module = first
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_owned();
        if module == "main" || module == "lib" {
            continue;
        }
        let code = std::fs::read_to_string(file).expect("readable source");
        for (target, line) in imports(&code) {
            if target != module {
                edges
                    .entry(module.clone())
                    .or_default()
                    .entry(target)
                    .or_default()
                    .push(format!("src/{}:{line}", relative.display()));
            }
        }
    }
    edges
}

fn collect(dir: &Path, files: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("readable folder")
        .map(|entry| entry.expect("a folder entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            collect(&path, files);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            files.push(path);
        }
    }
}

/// Files declared as modules under `#[cfg(test)]` (`mod tests;`, `pub mod semantics;`).
fn test_only_files(files: &[PathBuf]) -> BTreeSet<PathBuf> {
    let mut found = BTreeSet::new();
    for file in files {
        let code = std::fs::read_to_string(file).expect("readable source");
        let lines: Vec<&str> = code.lines().map(str::trim).collect();
        for pair in lines.windows(2) {
            if pair[0] != "#[cfg(test)]" {
                continue;
            }
            let Some(name) = pair[1]
                .split_whitespace()
                .skip_while(|word| *word != "mod")
                .nth(1)
                .and_then(|name| name.strip_suffix(';'))
            else {
                continue;
            };
            // A module's children sit beside `mod.rs`/`lib.rs`, else in a folder named
            // after the file.
            let parent = file.parent().expect("in a folder");
            let stem = file.file_stem().expect("a name").to_string_lossy();
            let folder = if stem == "mod" || stem == "lib" || stem == "main" {
                parent.to_owned()
            } else {
                parent.join(stem.as_ref())
            };
            found.insert(folder.join(format!("{name}.rs")));
            found.insert(folder.join(name).join("mod.rs"));
        }
    }
    found
}

/// The top-level modules a file's code names as `crate::name` (or in `crate::{…}`), with
/// their line numbers: comments and an inline `mod tests { … }` at the end are not code.
fn imports(code: &str) -> Vec<(String, usize)> {
    let mut found = Vec::new();
    let mut lines = code.lines().enumerate().peekable();
    while let Some((index, line)) = lines.next() {
        let trimmed = line.trim();
        if trimmed == "#[cfg(test)]"
            && lines
                .peek()
                .is_some_and(|(_, next)| next.trim().starts_with("mod tests {"))
        {
            break;
        }
        let code = &trimmed[..comment_start(trimmed)];
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            let preceded_by_word = rest[..at]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_alphanumeric() || c == '_');
            rest = &rest[at + "crate::".len()..];
            if preceded_by_word {
                continue;
            }
            if let Some(group) = rest.strip_prefix('{') {
                let end = group.find('}').unwrap_or(group.len());
                for item in group[..end].split(',') {
                    let name = identifier(item.trim());
                    if !name.is_empty() {
                        found.push((name.to_owned(), index + 1));
                    }
                }
            } else {
                let name = identifier(rest);
                if !name.is_empty() {
                    found.push((name.to_owned(), index + 1));
                }
            }
        }
    }
    found
}

/// Where a line's `//` comment starts (its length if none): the first `//` outside a
/// string literal (`"https://…"` is not a comment).
fn comment_start(line: &str) -> usize {
    let mut in_string = false;
    let mut previous = ' ';
    for (at, c) in line.char_indices() {
        match c {
            '"' if previous != '\\' => in_string = !in_string,
            '/' if !in_string && previous == '/' => return at - 1,
            _ => {}
        }
        previous = c;
    }
    line.len()
}

fn identifier(text: &str) -> &str {
    let end = text
        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
        .unwrap_or(text.len());
    &text[..end]
}

/// A cycle as its path (first and last the same), if the graph has one.
fn find_cycle(edges: &Edges) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Open,
        Done,
    }
    fn visit(
        node: &str,
        edges: &Edges,
        marks: &mut BTreeMap<String, Mark>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        marks.insert(node.to_owned(), Mark::Open);
        path.push(node.to_owned());
        for next in edges.get(node).into_iter().flat_map(BTreeMap::keys) {
            match marks.get(next) {
                Some(Mark::Open) => {
                    let start = path.iter().position(|n| n == next).expect("on the path");
                    let mut cycle = path[start..].to_vec();
                    cycle.push(next.clone());
                    return Some(cycle);
                }
                Some(Mark::Done) => {}
                None => {
                    if let Some(cycle) = visit(next, edges, marks, path) {
                        return Some(cycle);
                    }
                }
            }
        }
        path.pop();
        marks.insert(node.to_owned(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for node in edges.keys() {
        if !marks.contains_key(node) {
            let mut path = Vec::new();
            if let Some(cycle) = visit(node, edges, &mut marks, &mut path) {
                return Some(cycle);
            }
        }
    }
    None
}
