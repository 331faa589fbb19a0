//! The normalized [`Event`]: one change to one ref, whoever sent the webhook.
//!
//! Every source turns its sender's payload into this one shape; rules, templates and
//! `explain` see nothing else. Field names are the names templates use (`event.ref_name`,
//! `event.after`, …). A branch or tag deletion is kind `delete` with `deleted_kind` saying
//! which; a zero object id is 40 or 64 zeros (SHA-1 or SHA-256 repositories).

use std::collections::BTreeSet;
use std::sync::Arc;

use serde::Serialize;

/// Which sender's format a source reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Provider {
    Github,
    Gitlab,
    Gitea,
    /// Forgejo sends Gitea's payloads and headers (and its own `X-Forgejo-*` names); it is
    /// read as Gitea is, and named as the configuration names it.
    Forgejo,
    Gogs,
    BitbucketCloud,
    BitbucketServer,
    Generic,
}

impl Provider {
    /// The provider names configuration accepts.
    pub const NAMES: &'static str =
        "github, gitlab, gitea, forgejo, gogs, bitbucket-cloud, bitbucket-server, generic";

    pub fn parse(name: &str) -> Option<Provider> {
        Some(match name {
            "github" => Provider::Github,
            "gitlab" => Provider::Gitlab,
            "gitea" => Provider::Gitea,
            "forgejo" => Provider::Forgejo,
            "gogs" => Provider::Gogs,
            "bitbucket-cloud" => Provider::BitbucketCloud,
            "bitbucket-server" => Provider::BitbucketServer,
            "generic" => Provider::Generic,
            _ => return None,
        })
    }

    /// Whether the forge treats repository names without regard to case (GitHub, GitLab,
    /// Gitea, Gogs and Bitbucket all serve `Acme/App` and `acme/app` as one repository), so
    /// a rule's `repository` matches the same way. A generic sender's names are exact.
    pub fn repository_names_ignore_case(self) -> bool {
        !matches!(self, Provider::Generic)
    }

    /// Whether the sender can be set to deliver with `GET`, the JSON payload in the URL's
    /// `payload` parameter (Gitea's and Forgejo's "HTTP Method: GET"), signed as with POST.
    pub fn delivers_with_get(self) -> bool {
        matches!(self, Provider::Gitea | Provider::Forgejo)
    }

    /// The methods `/hooks/NAME` takes from this sender, as an `Allow` header lists them.
    pub fn webhook_methods(self) -> &'static str {
        match self.delivers_with_get() {
            true => "POST, GET",
            false => "POST",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Github => "github",
            Provider::Gitlab => "gitlab",
            Provider::Gitea => "gitea",
            Provider::Forgejo => "forgejo",
            Provider::Gogs => "gogs",
            Provider::BitbucketCloud => "bitbucket-cloud",
            Provider::BitbucketServer => "bitbucket-server",
            Provider::Generic => "generic",
        }
    }

    /// How many commits the sender lists in a push at most, where it does not say how many
    /// there were: a list this long may have been cut short. GitHub lists up to 2,048 (its
    /// webhook schema, `push.commits`); Gogs up to `[ui] FEED_MAX_COMMIT_NUM`, 5 by
    /// default. GitLab and Gitea say their true count (`total_commits_count`,
    /// `total_commits`), which [`Event::commit_count`] holds.
    fn commits_listed_at_most(self) -> Option<usize> {
        match self {
            Provider::Github => Some(2048),
            Provider::Gogs => Some(5),
            _ => None,
        }
    }

    /// How many files the sender lists for one commit at most (GitHub: "a maximum of 3000
    /// changed files will be reported per commit").
    fn files_listed_at_most(self) -> Option<usize> {
        match self {
            Provider::Github => Some(3000),
            _ => None,
        }
    }
}

impl std::fmt::Display for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What happened to the ref.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    /// Commits pushed to a branch (including a new branch).
    Push,
    /// A tag pushed (created or moved).
    Tag,
    /// A branch or tag deleted; `deleted_kind` says which.
    Delete,
    /// The sender testing the webhook.
    Ping,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Push => "push",
            EventKind::Tag => "tag",
            EventKind::Delete => "delete",
            EventKind::Ping => "ping",
        }
    }
}

/// For deletions: whether a branch or a tag went away.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RefType {
    Branch,
    Tag,
}

/// One commit, as much of it as the sender gives.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Commit {
    pub id: String,
    pub message: String,
    pub url: String,
    pub author: String,
    pub timestamp: String,
    /// The files it touched, where the sender lists them (GitHub, GitLab, Gitea/Forgejo,
    /// Gogs); Bitbucket lists none. Templates see `added`, `modified` and `removed`. Shared,
    /// since templates see a copy of the event and a push may list thousands.
    #[serde(flatten)]
    pub files: Option<Arc<CommitFiles>>,
}

/// The paths, from the repository's root, that one commit added, modified and removed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CommitFiles {
    pub added: Vec<String>,
    pub modified: Vec<String>,
    pub removed: Vec<String>,
}

impl CommitFiles {
    fn len(&self) -> usize {
        self.added.len() + self.modified.len() + self.removed.len()
    }

    fn iter(&self) -> impl Iterator<Item = &str> {
        self.added
            .iter()
            .chain(&self.modified)
            .chain(&self.removed)
            .map(String::as_str)
    }
}

/// The files a push changed, as far as its webhook tells.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChangedFiles<'a> {
    /// Every path its commits added, modified or removed, once each, sorted.
    Listed(BTreeSet<&'a str>),
    /// Not told, and why: rules' path filters then let the event through, as GitLab's
    /// `rules:changes` and GitHub Actions' `paths` do, rather than miss a build.
    Unknown(String),
}

impl ChangedFiles<'_> {
    /// Beside an event's fields in JSON (`explain --json`, the dashboard's API):
    /// `changed_files`, a list or `null` when not known, and then `changed_files_unknown`
    /// saying why.
    pub fn add_to(self, fields: &mut serde_json::Map<String, serde_json::Value>) {
        let (files, unknown) = match self {
            ChangedFiles::Listed(files) => (serde_json::json!(files), None),
            ChangedFiles::Unknown(why) => (serde_json::Value::Null, Some(why)),
        };
        fields.insert("changed_files".into(), files);
        if let Some(why) = unknown {
            fields.insert("changed_files_unknown".into(), why.into());
        }
    }
}

/// One change to one ref, normalized.
#[derive(Clone, Debug, Serialize)]
pub struct Event {
    pub provider: Provider,
    /// The `[source.NAME]` it arrived on.
    pub source: String,
    pub kind: EventKind,
    pub deleted_kind: Option<RefType>,
    /// Full name: `group/sub/project`, `workspace/repo`, `PROJECT/repo`.
    pub repository: String,
    /// Clone URL (HTTP), where the sender gives or implies one.
    pub repository_url: String,
    pub repository_web_url: String,
    /// The full ref: `refs/heads/main`, `refs/tags/v1.0`.
    #[serde(rename = "ref")]
    pub git_ref: String,
    /// The ref without `refs/heads/` or `refs/tags/`.
    pub ref_name: String,
    pub before: String,
    pub after: String,
    /// The commit the ref now names: `after` for a branch, the commit an annotated tag
    /// points to (not the tag object `after` names); empty for a deletion. Statuses go here.
    pub commit: String,
    pub pusher: String,
    /// The true number of commits, which may exceed `commits.len()` (senders truncate).
    pub commit_count: u64,
    pub commits: Vec<Commit>,
    /// The paths the change touched as the sender lists them for the whole change (a
    /// generic sender's `paths.changed_files`); per commit otherwise ([`Commit::files`]).
    #[serde(skip)]
    pub files: Option<Vec<String>>,
    /// What the forge answered when asked which files the push changed (`compare = { … }`
    /// on its source), because the webhook did not tell them all: `files` then holds them.
    #[serde(skip)]
    pub compared: Option<Compared>,
    pub delivery: String,
    /// The sender's JSON, for expressions that need more (shared by a webhook's events).
    pub payload: Arc<Payload>,
}

/// What came of asking the forge which files a push changed ([`crate::compare`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Compared {
    /// Its answer is the event's `files`.
    Listed,
    /// It could not tell, and why.
    Failed(String),
}

/// The forge's answer as a delivery's record keeps it (`"compared": {"files": […]}` or
/// `{"failed": "…"}` beside each event), so that the dashboard and a replan read it again
/// instead of asking.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ComparedRecord {
    Files(Vec<String>),
    Failed(String),
}

/// The most changed files a push's rules compare: sorting and matching them runs on the
/// webhook's own request, so a signed payload of millions of paths is let through (as
/// any push whose files are not known) instead of holding up the connections beside it.
pub const MOST_CHANGED_FILES: usize = 10_000;

/// `count` changed files as not known, when there are more than [`MOST_CHANGED_FILES`].
fn more_than_compared(count: usize) -> Option<ChangedFiles<'static>> {
    (count > MOST_CHANGED_FILES).then(|| {
        ChangedFiles::Unknown(format!(
            "the webhook lists {count} changed files, more than the {MOST_CHANGED_FILES} hookrelay compares"
        ))
    })
}

impl Event {
    /// The files this change touched, when the webhook tells them all: a branch push whose
    /// sender listed every commit, and every commit's files. Tags and deletions have none
    /// to tell (GitLab's `rules:changes` and GitHub Actions' `paths` skip them too), and a
    /// push that lists no commits (a new branch without new ones, a branch moved back) or
    /// no files (an empty commit, pushed to start a pipeline) is not known to have changed
    /// nothing.
    pub fn changed_files(&self) -> ChangedFiles<'_> {
        match (self.told_files(), &self.compared) {
            (ChangedFiles::Unknown(why), Some(Compared::Failed(reason))) => {
                ChangedFiles::Unknown(format!("{why}, and asking the forge failed: {reason}"))
            }
            (files, _) => files,
        }
    }

    /// The forge's answer to which files the push changed, or why it could not tell.
    pub fn set_compared(&mut self, answer: ComparedRecord) {
        match answer {
            ComparedRecord::Files(files) => {
                self.files = Some(files);
                self.compared = Some(Compared::Listed);
            }
            ComparedRecord::Failed(reason) => self.compared = Some(Compared::Failed(reason)),
        }
    }

    /// The forge's answer as the delivery's record keeps it, when it was asked.
    pub fn compared_record(&self) -> Option<ComparedRecord> {
        Some(match self.compared.as_ref()? {
            Compared::Listed => ComparedRecord::Files(self.files.clone().unwrap_or_default()),
            Compared::Failed(reason) => ComparedRecord::Failed(reason.clone()),
        })
    }

    /// [`Event::changed_files`] as the webhook, or the forge asked about it, tells them.
    fn told_files(&self) -> ChangedFiles<'_> {
        use ChangedFiles::Unknown;
        match self.kind {
            EventKind::Push => {}
            EventKind::Tag => return Unknown("a tag push changes no files".into()),
            EventKind::Delete => return Unknown("a deletion changes no files".into()),
            EventKind::Ping => return Unknown("a ping changes no files".into()),
        }
        if let Some(files) = &self.files {
            if files.is_empty() {
                return Unknown(match self.compared {
                    Some(Compared::Listed) => {
                        "the forge's comparison lists no changed files (an empty commit, or a branch moved back)".into()
                    }
                    _ => "the webhook lists no changed files".into(),
                });
            }
            if let Some(unknown) = more_than_compared(files.len()) {
                return unknown;
            }
            return ChangedFiles::Listed(files.iter().map(String::as_str).collect());
        }
        if self.provider == Provider::Generic {
            return Unknown(
                "a generic sender's changed files are read from its source's `paths.changed_files`, and this webhook has no list there".into(),
            );
        }
        let listed = self.commits.len();
        if listed == 0 {
            return Unknown(
                "the webhook lists no commits (a new branch without new commits, or a branch moved back)".into(),
            );
        }
        if self.commit_count > listed as u64 {
            return Unknown(format!(
                "the webhook lists {listed} of the push's {} commits",
                self.commit_count
            ));
        }
        if let Some(most) = self.provider.commits_listed_at_most()
            && listed >= most
        {
            return Unknown(format!(
                "{} lists at most {most} commits of a push, and it lists {listed}",
                self.provider
            ));
        }
        let listed_files: usize = self
            .commits
            .iter()
            .filter_map(|commit| commit.files.as_deref())
            .map(CommitFiles::len)
            .sum();
        if let Some(unknown) = more_than_compared(listed_files) {
            return unknown;
        }
        let mut files = BTreeSet::new();
        for commit in &self.commits {
            let Some(touched) = &commit.files else {
                return Unknown(format!("{} lists no files for a commit", self.provider));
            };
            if let Some(most) = self.provider.files_listed_at_most()
                && touched.len() >= most
            {
                return Unknown(format!(
                    "{} lists at most {most} files of a commit, and it lists {} for {}",
                    self.provider,
                    touched.len(),
                    commit.id
                ));
            }
            files.extend(touched.iter());
        }
        if files.is_empty() {
            return Unknown(
                "the webhook's commits list no files (an empty commit, or a merge)".into(),
            );
        }
        ChangedFiles::Listed(files)
    }
}

/// The words in a commit message that ask CI to skip the push, as GitLab (`[skip ci]`,
/// `[ci skip]`, any capitalization) and GitHub Actions (those and `[no ci]`) read them.
const SKIP_CI_MARKERS: [&str; 3] = ["[skip ci]", "[ci skip]", "[no ci]"];

impl Event {
    /// The marker (`[skip ci]`, `[ci skip]` or `[no ci]`, in any capitalization) in the
    /// message of the commit a branch push leaves the branch at, if the webhook lists that
    /// commit. Tags are never skipped: a release tag often sits on a commit that skipped
    /// its own branch build (`chore(release): 1.2.0 [skip ci]`) and must still build.
    pub fn skip_ci_marker(&self) -> Option<&'static str> {
        if self.kind != EventKind::Push {
            return None;
        }
        let head = self
            .commits
            .iter()
            .find(|commit| commit.id.eq_ignore_ascii_case(&self.after))?;
        let message = head.message.as_bytes();
        SKIP_CI_MARKERS.into_iter().find(|marker| {
            message
                .windows(marker.len())
                .any(|window| window.eq_ignore_ascii_case(marker.as_bytes()))
        })
    }
}

const BRANCH_PREFIX: &str = "refs/heads/";
const TAG_PREFIX: &str = "refs/tags/";

/// `true` for the all-zero object id (40 or 64 zeros) senders use for "no object".
pub fn is_zero_id(id: &str) -> bool {
    matches!(id.len(), 40 | 64) && id.bytes().all(|b| b == b'0')
}

/// The zero object id, for changes whose sender gives no SHA.
pub const ZERO_ID: &str = "0000000000000000000000000000000000000000";

/// What every event from one webhook shares.
#[derive(Clone, Debug)]
pub struct EventContext {
    pub provider: Provider,
    pub source: String,
    pub delivery: String,
    pub repository: String,
    pub repository_url: String,
    pub repository_web_url: String,
    pub pusher: String,
    pub payload: Arc<Payload>,
}

/// A webhook's JSON. A sender's events read their typed fields straight from the bytes;
/// the JSON becomes a tree only when something reads it whole (`event.payload` in a
/// template, a generic source's paths), since building one costs more than the rest of a
/// webhook's handling.
#[derive(Debug)]
pub struct Payload {
    bytes: bytes::Bytes,
    /// Old Gitea and Gogs put the webhook secret itself in the payload: never shown.
    without_secret: bool,
    tree: std::sync::OnceLock<serde_json::Value>,
}

impl Payload {
    /// The JSON in `bytes`, not parsed yet; `without_secret` drops a top-level `secret`.
    pub fn new(bytes: bytes::Bytes, without_secret: bool) -> Payload {
        Payload {
            bytes,
            without_secret,
            tree: std::sync::OnceLock::new(),
        }
    }

    /// The JSON in `bytes`, parsed now (a syntax error is returned, not hidden).
    pub fn parsed(bytes: bytes::Bytes) -> Result<Payload, serde_json::Error> {
        let tree = crate::json_syntax::read(&bytes)?;
        let payload = Payload::new(bytes, false);
        let _ = payload.tree.set(tree);
        Ok(payload)
    }

    /// No payload (a scheduled rule's event, tests).
    pub fn empty() -> Payload {
        Payload::parsed(bytes::Bytes::from_static(b"null")).expect("null is JSON")
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The whole JSON as a tree, parsed on first use.
    pub fn tree(&self) -> &serde_json::Value {
        self.tree.get_or_init(|| {
            let mut tree: serde_json::Value =
                crate::json_syntax::read(&self.bytes).unwrap_or_default();
            if self.without_secret
                && let Some(map) = tree.as_object_mut()
            {
                map.remove("secret");
            }
            tree
        })
    }
}

impl Serialize for Payload {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.tree().serialize(serializer)
    }
}

/// One ref's change, in the sender's terms, before it becomes an [`Event`].
#[derive(Clone, Debug, Default)]
pub struct RefChange {
    /// Full (`refs/heads/x`) ref.
    pub full_ref: String,
    pub before: String,
    pub after: String,
    /// The sender says the ref was deleted (in addition to a zero `after`).
    pub deleted: bool,
    /// The commit `after` resolves to, when the sender says (`head_commit.id`,
    /// `checkout_sha`); `None`: `after` itself.
    pub commit: Option<String>,
    pub commits: Vec<Commit>,
    /// The sender's true count when it truncates `commits`; else `commits.len()`.
    pub commit_count: Option<u64>,
    /// Every path the change touched, where the sender lists them for the change as a
    /// whole rather than per commit (a generic sender's `paths.changed_files`).
    pub files: Option<Vec<String>>,
}

impl EventContext {
    /// Builds the event for one ref change. Refs that are neither a branch nor a tag
    /// (`refs/notes/…`, `refs/merge-requests/…`) are refused with the reason.
    pub fn event(&self, change: RefChange) -> Result<Event, String> {
        let (ref_type, ref_name) = if let Some(name) = change.full_ref.strip_prefix(BRANCH_PREFIX) {
            (RefType::Branch, name)
        } else if let Some(name) = change.full_ref.strip_prefix(TAG_PREFIX) {
            (RefType::Tag, name)
        } else {
            return Err(format!(
                "ref {:?} is neither a branch nor a tag",
                change.full_ref
            ));
        };
        if ref_name.is_empty() {
            return Err(format!("ref {:?} names no branch or tag", change.full_ref));
        }
        let deleted = change.deleted || is_zero_id(&change.after);
        let kind = match (deleted, ref_type) {
            (true, _) => EventKind::Delete,
            (false, RefType::Branch) => EventKind::Push,
            (false, RefType::Tag) => EventKind::Tag,
        };
        let commit_count = change.commit_count.unwrap_or(change.commits.len() as u64);
        Ok(Event {
            provider: self.provider,
            source: self.source.clone(),
            kind,
            deleted_kind: deleted.then_some(ref_type),
            repository: self.repository.clone(),
            repository_url: self.repository_url.clone(),
            repository_web_url: self.repository_web_url.clone(),
            ref_name: ref_name.to_owned(),
            git_ref: change.full_ref,
            commit: match (deleted, change.commit) {
                (true, _) => String::new(),
                (false, Some(commit)) if !commit.is_empty() && !is_zero_id(&commit) => commit,
                (false, _) => change.after.clone(),
            },
            before: change.before,
            after: change.after,
            pusher: self.pusher.clone(),
            commit_count,
            commits: change.commits,
            files: change.files,
            compared: None,
            delivery: self.delivery.clone(),
            payload: self.payload.clone(),
        })
    }

    /// A ping: the sender testing the webhook.
    pub fn ping(&self) -> Event {
        Event {
            provider: self.provider,
            source: self.source.clone(),
            kind: EventKind::Ping,
            deleted_kind: None,
            repository: self.repository.clone(),
            repository_url: self.repository_url.clone(),
            repository_web_url: self.repository_web_url.clone(),
            git_ref: String::new(),
            ref_name: String::new(),
            before: String::new(),
            after: String::new(),
            commit: String::new(),
            pusher: self.pusher.clone(),
            commit_count: 0,
            commits: Vec::new(),
            files: None,
            compared: None,
            delivery: self.delivery.clone(),
            payload: self.payload.clone(),
        }
    }
}

/// `refs/heads/` + name or `refs/tags/` + name, for senders that give short names.
pub fn full_ref(ref_type: RefType, short: &str) -> String {
    match ref_type {
        RefType::Branch => format!("{BRANCH_PREFIX}{short}"),
        RefType::Tag => format!("{TAG_PREFIX}{short}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context() -> EventContext {
        EventContext {
            provider: Provider::Github,
            source: "gh".into(),
            delivery: "d1".into(),
            repository: "acme/app".into(),
            repository_url: String::new(),
            repository_web_url: String::new(),
            pusher: "me".into(),
            payload: Arc::new(Payload::empty()),
        }
    }

    fn change(full_ref: &str, after: &str) -> RefChange {
        RefChange {
            full_ref: full_ref.into(),
            before: "a".repeat(40),
            after: after.into(),
            ..RefChange::default()
        }
    }

    #[test]
    fn zero_ids_are_40_or_64_zeros() {
        assert!(is_zero_id(&"0".repeat(40)));
        assert!(is_zero_id(&"0".repeat(64)));
        assert!(!is_zero_id(&"0".repeat(39)));
        assert!(!is_zero_id(&format!("{}1", "0".repeat(39))));
    }

    #[test]
    fn kinds_from_refs() {
        let sha = "b".repeat(40);
        let e = context()
            .event(change("refs/heads/feature/x", &sha))
            .unwrap();
        assert_eq!(
            (e.kind, e.ref_name.as_str(), e.deleted_kind),
            (EventKind::Push, "feature/x", None)
        );
        let e = context().event(change("refs/tags/v1", &sha)).unwrap();
        assert_eq!(e.kind, EventKind::Tag);
        let e = context()
            .event(change("refs/tags/v1", &"0".repeat(64)))
            .unwrap();
        assert_eq!(
            (e.kind, e.deleted_kind),
            (EventKind::Delete, Some(RefType::Tag))
        );
        let mut deleted = change("refs/heads/x", &sha);
        deleted.deleted = true;
        let e = context().event(deleted).unwrap();
        assert_eq!(
            (e.kind, e.deleted_kind),
            (EventKind::Delete, Some(RefType::Branch))
        );
        assert!(context().event(change("refs/notes/x", &sha)).is_err());
        assert!(context().event(change("refs/heads/", &sha)).is_err());
    }

    #[test]
    fn the_commit_is_what_the_ref_names_now() {
        let tag_object = "c".repeat(40);
        let commit = "d".repeat(40);
        let mut annotated = change("refs/tags/v1", &tag_object);
        annotated.commit = Some(commit.clone());
        assert_eq!(context().event(annotated).unwrap().commit, commit);
        let branch = context().event(change("refs/heads/main", &commit)).unwrap();
        assert_eq!(branch.commit, commit, "without a sender's word, `after`");
        let mut deleted = change("refs/tags/v1", &"0".repeat(40));
        deleted.commit = Some(commit);
        assert_eq!(
            context().event(deleted).unwrap().commit,
            "",
            "a deletion names no commit"
        );
    }

    #[test]
    fn serializes_with_template_names() {
        let e = context()
            .event(change("refs/tags/v1", &"c".repeat(40)))
            .unwrap();
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(json["ref"], "refs/tags/v1");
        assert_eq!(json["kind"], "tag");
        assert_eq!(json["provider"], "github");
        assert_eq!(json["deleted_kind"], serde_json::Value::Null);
    }

    fn touched(id: &str, added: &[&str], modified: &[&str], removed: &[&str]) -> Commit {
        let paths = |list: &[&str]| list.iter().map(|p| p.to_string()).collect();
        Commit {
            id: id.into(),
            files: Some(Arc::new(CommitFiles {
                added: paths(added),
                modified: paths(modified),
                removed: paths(removed),
            })),
            ..Commit::default()
        }
    }

    fn push_of(commits: Vec<Commit>, commit_count: Option<u64>) -> RefChange {
        RefChange {
            commits,
            commit_count,
            ..change("refs/heads/main", &"b".repeat(40))
        }
    }

    fn unknown_why(files: ChangedFiles<'_>) -> String {
        match files {
            ChangedFiles::Unknown(why) => why,
            listed => panic!("expected unknown files, got {listed:?}"),
        }
    }

    #[test]
    fn a_push_changed_what_its_commits_touched_once_each() {
        let e = context()
            .event(push_of(
                vec![
                    touched("1", &["b.rs"], &["a.rs"], &[]),
                    touched("2", &[], &["a.rs"], &["c.rs"]),
                ],
                None,
            ))
            .unwrap();
        assert_eq!(
            e.changed_files(),
            ChangedFiles::Listed(["a.rs", "b.rs", "c.rs"].into_iter().collect())
        );
        // Templates see each commit's lists under the senders' names.
        let json = serde_json::to_value(&e.commits[1]).unwrap();
        assert_eq!(json["modified"], serde_json::json!(["a.rs"]));
        assert_eq!(json["removed"], serde_json::json!(["c.rs"]));
    }

    #[test]
    fn files_a_webhook_does_not_tell_are_unknown_and_say_why() {
        let one = || vec![touched("1", &["a"], &[], &[])];
        let why = |change: RefChange| unknown_why(context().event(change).unwrap().changed_files());
        assert_eq!(
            why(push_of(one(), Some(25))),
            "the webhook lists 1 of the push's 25 commits"
        );
        assert!(why(push_of(Vec::new(), None)).starts_with("the webhook lists no commits"));
        assert_eq!(
            why(push_of(vec![Commit::default()], None)),
            "github lists no files for a commit"
        );
        assert!(why(push_of(vec![touched("1", &[], &[], &[])], None)).contains("an empty commit"));
        assert_eq!(
            why(RefChange {
                commits: one(),
                ..change("refs/tags/v1", &"b".repeat(40))
            }),
            "a tag push changes no files"
        );
        assert_eq!(
            why(RefChange {
                commits: one(),
                ..change("refs/heads/x", &"0".repeat(40))
            }),
            "a deletion changes no files"
        );
        // GitHub says no count: a list at its cap of 2,048 may have been cut, and so may
        // one commit's 3,000 files.
        let many: Vec<Commit> = (0..2048)
            .map(|i| touched(&i.to_string(), &["a"], &[], &[]))
            .collect();
        assert_eq!(
            why(push_of(many, None)),
            "github lists at most 2048 commits of a push, and it lists 2048"
        );
        let files: Vec<String> = (0..3000).map(|i| format!("f{i}")).collect();
        let files: Vec<&str> = files.iter().map(String::as_str).collect();
        assert_eq!(
            why(push_of(vec![touched("big", &files, &[], &[])], None)),
            "github lists at most 3000 files of a commit, and it lists 3000 for big"
        );
        // More files than are worth comparing on the request's thread.
        let paths: Vec<String> = (0..2000).map(|i| format!("f{i}")).collect();
        let paths: Vec<&str> = paths.iter().map(String::as_str).collect();
        let mut many: Vec<Commit> = (0..5)
            .map(|i| touched(&i.to_string(), &paths, &[], &[]))
            .collect();
        assert!(matches!(
            context()
                .event(push_of(many.clone(), None))
                .unwrap()
                .changed_files(),
            ChangedFiles::Listed(_)
        ));
        many.push(touched("5", &["one-more"], &[], &[]));
        assert_eq!(
            why(push_of(many, None)),
            "the webhook lists 10001 changed files, more than the 10000 hookrelay compares"
        );
        // Gogs lists 5 at most ([ui] FEED_MAX_COMMIT_NUM) and says no count either.
        let gogs = EventContext {
            provider: Provider::Gogs,
            ..context()
        };
        let five: Vec<Commit> = (0..5)
            .map(|i| touched(&i.to_string(), &["a"], &[], &[]))
            .collect();
        assert_eq!(
            unknown_why(
                gogs.event(push_of(five.clone(), None))
                    .unwrap()
                    .changed_files()
            ),
            "gogs lists at most 5 commits of a push, and it lists 5"
        );
        let four = five[..4].to_vec();
        assert!(matches!(
            gogs.event(push_of(four, None)).unwrap().changed_files(),
            ChangedFiles::Listed(_)
        ));
    }

    #[test]
    fn a_head_commit_saying_skip_ci_is_found_in_any_capitalization() {
        let after = "b".repeat(40);
        let commit = |id: &str, message: &str| Commit {
            id: id.into(),
            message: message.into(),
            ..Commit::default()
        };
        let push = |commits: Vec<Commit>| context().event(push_of(commits, None)).unwrap();
        for (message, marker) in [
            ("docs: typo [skip ci]", Some("[skip ci]")),
            ("Docs: typo\n\n[CI SKIP]", Some("[ci skip]")),
            ("chore: bump [No Ci]", Some("[no ci]")),
            ("skip ci", None),
            ("[skip  ci]", None),
            ("fix: the [skip ci] parser", Some("[skip ci]")),
        ] {
            assert_eq!(
                push(vec![commit(&after, message)]).skip_ci_marker(),
                marker,
                "{message:?}"
            );
        }
        // Only the head's message counts: an older commit of the push may say it.
        let older = commit(&"a".repeat(40), "wip [skip ci]");
        assert_eq!(
            push(vec![older.clone(), commit(&after, "feat: done")]).skip_ci_marker(),
            None
        );
        // A webhook that does not list the head says nothing about it.
        assert_eq!(push(vec![older]).skip_ci_marker(), None);
        // Tags build whatever their commit says.
        let tag = context()
            .event(RefChange {
                commits: vec![commit(&after, "chore(release): 1.2.0 [skip ci]")],
                ..change("refs/tags/v1.2.0", &after)
            })
            .unwrap();
        assert_eq!(tag.skip_ci_marker(), None);
    }
}
