use super::*;
use crate::secret::{Secret, SecretRef};
use crate::status::forge::{GITHUB_ACCEPT, GITHUB_API_VERSION, api_headers};
use http::header;

const BEFORE: &str = "95790bf891e76fee5e1747ab589903a6a1f80f22";
const AFTER: &str = "da1560886d4f094c3e6c9ef40349f7d38b5d27d7";

fn page(forge: Forge, body: &str, path: &str, api_url: &str) -> Result<Page, String> {
    read_page(forge, body.as_bytes(), path, api_url)
}

/// Each forge's request: the order of the two commits (Bitbucket Cloud's is the opposite
/// of `git diff`), the repository's segments encoded, a GitLab project path as one.
#[test]
fn each_forge_is_asked_in_its_own_terms() {
    let path = |forge, repository| first_path(forge, repository, BEFORE, AFTER).unwrap();
    assert_eq!(
        path(Forge::Github, "acme/app"),
        format!("/repos/acme/app/compare/{BEFORE}...{AFTER}")
    );
    assert_eq!(
        path(Forge::Gitea, "acme/my app"),
        format!("/repos/acme/my%20app/compare/{BEFORE}...{AFTER}?verification=false")
    );
    assert_eq!(
        path(Forge::Gitlab, "group/sub/app"),
        format!("/projects/group%2Fsub%2Fapp/repository/compare?from={BEFORE}&to={AFTER}")
    );
    assert_eq!(
        path(Forge::BitbucketCloud, "team/app"),
        format!("/repositories/team/app/diffstat/{AFTER}..{BEFORE}?topic=true")
    );
    assert_eq!(
        path(Forge::BitbucketServer, "PROJ/app"),
        format!(
            "/rest/api/latest/projects/PROJ/repos/app/changes?since={BEFORE}&until={AFTER}&limit=1000"
        )
    );
    let refused = first_path(Forge::Github, "../etc", BEFORE, AFTER).unwrap_err();
    assert!(refused.contains("not owner/name"), "{refused}");
}

/// GitHub's token goes as `Bearer` with its API version, Gitea's as `token`; the header
/// is marked sensitive, so no debug print shows it.
#[test]
fn the_token_goes_as_each_forge_expects_it() {
    let token = Secret::new("ghp_abcdefghijklmnop0123");
    let github = api_headers(Forge::Github, &token, "compare").unwrap();
    assert_eq!(
        github[header::AUTHORIZATION],
        "Bearer ghp_abcdefghijklmnop0123"
    );
    assert!(github[header::AUTHORIZATION].is_sensitive());
    assert_eq!(github["x-github-api-version"], GITHUB_API_VERSION);
    assert_eq!(github[header::ACCEPT], GITHUB_ACCEPT);
    let gitea = api_headers(Forge::Gitea, &token, "compare").unwrap();
    assert_eq!(
        gitea[header::AUTHORIZATION],
        "token ghp_abcdefghijklmnop0123"
    );
    assert!(api_headers(Forge::Gitlab, &Secret::new("a\nb"), "compare").is_err());
}

#[test]
fn github_lists_files_and_the_old_names_of_renamed_ones() {
    let body = r#"{"status": "ahead", "total_commits": 30, "commits": [],
        "files": [{"filename": "services/api/main.go", "status": "modified"},
                  {"filename": "docs/new.md", "status": "renamed", "previous_filename": "docs/old.md"}]}"#;
    let read = page(Forge::Github, body, "/", "https://api.github.com").unwrap();
    assert_eq!(
        read.files,
        ["services/api/main.go", "docs/new.md", "docs/old.md"]
    );
    assert_eq!(read.next, None);
    // GitHub cuts the list at 300: the rest are not known.
    let files: Vec<String> = (0..300)
        .map(|i| format!(r#"{{"filename": "f{i}"}}"#))
        .collect();
    let body = format!(r#"{{"files": [{}]}}"#, files.join(","));
    let cut = page(Forge::Github, &body, "/", "https://api.github.com").unwrap_err();
    assert!(cut.contains("at most 300"), "{cut}");
}

#[test]
fn gitea_lists_each_commits_files() {
    let body = r#"{"total_commits": 2, "commits": [
        {"sha": "a", "files": [{"filename": "services/api/main.go", "status": "modified"}]},
        {"sha": "b", "files": [{"filename": "README.md", "status": "added"}]}]}"#;
    let read = page(Forge::Gitea, body, "/", "https://codeberg.org/api/v1").unwrap();
    assert_eq!(read.files, ["services/api/main.go", "README.md"]);
    let without = r#"{"total_commits": 1, "commits": [{"sha": "a"}]}"#;
    assert!(page(Forge::Gitea, without, "/", "https://codeberg.org/api/v1").is_err());
}

#[test]
fn gitlab_lists_both_paths_and_a_comparison_that_timed_out_tells_nothing() {
    let body = r#"{"commit": {}, "commits": [], "compare_timeout": false, "compare_same_ref": false,
        "diffs": [{"old_path": "a.txt", "new_path": "b.txt", "renamed_file": true, "diff": "@@ -1 +1 @@"},
                  {"old_path": "services/api/x.go", "new_path": "services/api/x.go", "diff": ""}]}"#;
    let read = page(Forge::Gitlab, body, "/", "https://gitlab.com/api/v4").unwrap();
    assert_eq!(
        read.files,
        ["a.txt", "b.txt", "services/api/x.go", "services/api/x.go"]
    );
    let timed_out = r#"{"diffs": [], "compare_timeout": true}"#;
    let err = page(Forge::Gitlab, timed_out, "/", "https://gitlab.com/api/v4").unwrap_err();
    assert!(err.contains("timed out"), "{err}");
}

/// Bitbucket Cloud pages by a `next` URL, followed only below the API root (the token
/// goes with it).
#[test]
fn bitbucket_cloud_follows_next_pages_below_its_api_root() {
    let api = "https://api.bitbucket.org/2.0";
    let body = r#"{"pagelen": 500, "values": [
        {"type": "diffstat", "status": "modified", "old": {"path": "a.txt"}, "new": {"path": "a.txt"}},
        {"type": "diffstat", "status": "added", "old": null, "new": {"path": "services/api/x.go"}},
        {"type": "diffstat", "status": "removed", "old": {"path": "gone.txt"}, "new": null}],
        "next": "https://api.bitbucket.org/2.0/repositories/team/app/diffstat/a..b?topic=true&page=2"}"#;
    let read = page(Forge::BitbucketCloud, body, "/", api).unwrap();
    assert_eq!(
        read.files,
        ["a.txt", "a.txt", "services/api/x.go", "gone.txt"]
    );
    assert_eq!(
        read.next.as_deref(),
        Some("/repositories/team/app/diffstat/a..b?topic=true&page=2")
    );
    let elsewhere = r#"{"values": [], "next": "https://evil.example/2.0/x"}"#;
    let err = page(Forge::BitbucketCloud, elsewhere, "/", api).unwrap_err();
    assert!(err.contains("not below its API root"), "{err}");
}

#[test]
fn bitbucket_data_center_pages_until_the_last() {
    let first = format!(
        "/rest/api/latest/projects/P/repos/r/changes?since={BEFORE}&until={AFTER}&limit=1000"
    );
    let body = r#"{"size": 2, "limit": 2, "isLastPage": false, "start": 0, "nextPageStart": 2,
        "values": [{"path": {"toString": "services/api/x.go"}, "type": "MODIFY"},
                   {"path": {"toString": "new.txt"}, "srcPath": {"toString": "old.txt"}, "type": "MOVE"}]}"#;
    let read = page(
        Forge::BitbucketServer,
        body,
        &first,
        "https://bb.example.com",
    )
    .unwrap();
    assert_eq!(read.files, ["services/api/x.go", "old.txt", "new.txt"]);
    let second = read.next.unwrap();
    assert_eq!(second, format!("{first}&start=2"));
    let last = r#"{"isLastPage": true, "values": [{"path": {"toString": "z"}}]}"#;
    let read = page(
        Forge::BitbucketServer,
        last,
        &second,
        "https://bb.example.com",
    )
    .unwrap();
    assert_eq!((read.files, read.next), (vec!["z".to_owned()], None));
    // The third page's path replaces the second's start rather than adding another.
    let more = r#"{"isLastPage": false, "nextPageStart": 4, "values": []}"#;
    let read = page(
        Forge::BitbucketServer,
        more,
        &second,
        "https://bb.example.com",
    )
    .unwrap();
    assert_eq!(read.next.unwrap(), format!("{first}&start=4"));
}

#[test]
fn an_answer_that_is_not_a_comparison_is_refused_with_why() {
    for forge in [
        Forge::Github,
        Forge::Gitea,
        Forge::Gitlab,
        Forge::BitbucketCloud,
        Forge::BitbucketServer,
    ] {
        let err = page(forge, "<html>login</html>", "/x", "https://h.example").unwrap_err();
        assert!(err.contains("not a comparison"), "{forge:?}: {err}");
    }
}

/// Which pushes the forge is asked about: a branch push onto an existing commit whose
/// webhook does not tell every file; never a tag, a deletion, a new branch, or a push
/// whose files are all listed.
#[test]
fn only_pushes_whose_files_are_not_all_told_are_worth_asking() {
    let context = crate::event::EventContext {
        provider: Provider::BitbucketCloud,
        source: "bb".into(),
        repository: "team/app".into(),
        repository_url: String::new(),
        repository_web_url: String::new(),
        pusher: "me".into(),
        delivery: "d".into(),
        payload: std::sync::Arc::new(crate::event::Payload::new(
            bytes::Bytes::from_static(b"{}"),
            false,
        )),
    };
    let change = |full_ref: &str, before: &str| crate::event::RefChange {
        full_ref: full_ref.into(),
        before: before.into(),
        after: AFTER.into(),
        commits: vec![crate::event::Commit {
            id: AFTER.into(),
            message: "x".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let mut config = CompareConfig {
        api: ForgeApi {
            forge: Forge::BitbucketCloud,
            api_url: "https://api.bitbucket.org/2.0".into(),
            token_ref: SecretRef::parse("env:T").unwrap(),
            token: None,
            ca_file: None,
        },
        timeout: DEFAULT_TIMEOUT,
        new_branch_base: None,
    };
    let push = context.event(change("refs/heads/main", BEFORE)).unwrap();
    assert!(worth_asking(&push, &config), "Bitbucket lists no files");
    assert_eq!(config.base_of(&push), Some(BEFORE));
    let tag = context.event(change("refs/tags/v1", BEFORE)).unwrap();
    assert!(!worth_asking(&tag, &config));
    let new_branch = context
        .event(change("refs/heads/new", crate::event::ZERO_ID))
        .unwrap();
    assert!(
        !worth_asking(&new_branch, &config),
        "nothing to compare a new branch with"
    );
    let mut told = push.clone();
    told.set_compared(ComparedRecord::Files(vec!["a".into()]));
    assert!(!worth_asking(&told, &config), "asked already");

    // With `new_branch_base`, a new branch is compared with it, except that branch itself.
    config.new_branch_base = Some("main".into());
    assert!(worth_asking(&new_branch, &config));
    assert_eq!(config.base_of(&new_branch), Some("main"));
    let new_main = context
        .event(change("refs/heads/main", crate::event::ZERO_ID))
        .unwrap();
    assert!(
        !worth_asking(&new_main, &config),
        "main compared with itself"
    );
}

/// A base branch keeps its `/`s in a path and has them encoded in a query.
#[test]
fn a_base_branch_is_written_as_each_forge_reads_a_ref() {
    let path = |forge| first_path(forge, "acme/app", "release/1.x", AFTER).unwrap();
    assert_eq!(
        path(Forge::Github),
        format!("/repos/acme/app/compare/release/1.x...{AFTER}")
    );
    assert_eq!(
        path(Forge::Gitlab),
        format!("/projects/acme%2Fapp/repository/compare?from=release%2F1.x&to={AFTER}")
    );
    assert_eq!(
        path(Forge::BitbucketCloud),
        format!("/repositories/acme/app/diffstat/{AFTER}..release/1.x?topic=true")
    );
    assert_eq!(
        path(Forge::BitbucketServer),
        format!(
            "/rest/api/latest/projects/acme/repos/app/changes?since=release%2F1.x&until={AFTER}&limit=1000"
        )
    );
}
