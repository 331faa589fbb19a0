//! Which hook a catch-up reads: its REST address on GitHub (a repository's, an
//! organisation's, a GitHub App's own; or below Enterprise Server's `/api/v3`) or on GitLab
//! (a project's or a group's), and the paths of its log and its redeliveries.

/// GitHub's largest page of deliveries.
const PER_PAGE: usize = 100;

/// The forge whose hook is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Forge {
    GitHub,
    GitLab,
}

impl Forge {
    pub fn name(self) -> &'static str {
        match self {
            Forge::GitHub => "GitHub",
            Forge::GitLab => "GitLab",
        }
    }
}

/// A hook's REST address: `https://api.github.com/repos/OWNER/REPO/hooks/ID`, an
/// organisation's `…/orgs/ORG/hooks/ID`, a GitHub App's own `…/app/hook`, or the same
/// below GitHub Enterprise Server's `https://HOST/api/v3`; on GitLab a project's
/// `https://HOST/api/v4/projects/ID/hooks/ID` or a group's `…/groups/ID/hooks/ID`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HookUrl {
    /// `scheme://host[:port]`: every call (and every page the forge links to) goes there.
    pub(super) origin: String,
    /// The hook's path, `/repos/OWNER/REPO/hooks/ID`, without a trailing slash.
    pub(super) path: String,
    pub forge: Forge,
}

impl HookUrl {
    pub fn parse(text: &str) -> Result<HookUrl, String> {
        let uri = crate::upstream::parse_upstream_url(text)?;
        let path = uri.path().trim_end_matches('/').to_owned();
        let parts: Vec<&str> = path.split('/').collect();
        let hook_id = parts.last().copied().unwrap_or_default();
        let numbered_hook = parts.len() >= 3
            && parts[parts.len() - 2] == "hooks"
            && !hook_id.is_empty()
            && hook_id.bytes().all(|b| b.is_ascii_digit());
        // GitLab: …/api/v4/{projects,groups}/ID/hooks/ID (a project's ID may be its
        // path, `acme%2Fapp`).
        let is_gitlab = numbered_hook
            && parts.len() >= 6
            && matches!(parts[parts.len() - 4], "projects" | "groups")
            && !parts[parts.len() - 3].is_empty()
            && parts[parts.len() - 5] == "v4"
            && parts[parts.len() - 6] == "api";
        // GitHub: [/api/v3]/repos/OWNER/REPO/hooks/ID or [/api/v3]/orgs/ORG/hooks/ID.
        let github_parts: Vec<&str> = path
            .strip_prefix("/api/v3")
            .unwrap_or(&path)
            .split('/')
            .collect();
        let is_github = numbered_hook
            && match github_parts.as_slice() {
                ["", "repos", owner, repo, "hooks", _] => !owner.is_empty() && !repo.is_empty(),
                ["", "orgs", org, "hooks", _] => !org.is_empty(),
                _ => false,
            };
        let is_app_hook = path == "/app/hook" || path == "/api/v3/app/hook";
        let forge = match (is_gitlab, is_github || is_app_hook) {
            (true, _) => Forge::GitLab,
            (false, true) => Forge::GitHub,
            (false, false) => {
                return Err(format!(
                    "{text:?} is not a hook's API address; write e.g. \
                     https://api.github.com/repos/OWNER/REPO/hooks/ID (the ID is in the hook's \
                     settings page address), …/orgs/ORG/hooks/ID for an organisation's hook, \
                     https://api.github.com/app/hook for a GitHub App's own, \
                     https://HOST/api/v3/repos/OWNER/REPO/hooks/ID on GitHub Enterprise Server, \
                     or https://HOST/api/v4/projects/ID/hooks/ID on GitLab"
                ));
            }
        };
        let origin = format!(
            "{}://{}",
            uri.scheme_str().unwrap_or("https"),
            uri.authority().map(|a| a.as_str()).unwrap_or_default()
        );
        Ok(HookUrl {
            origin,
            path,
            forge,
        })
    }

    /// The whole address, for messages.
    pub fn shown(&self) -> String {
        format!("{}{}", self.origin, self.path)
    }

    /// A GitHub App's own hook (`…/app/hook`), read with the App's token.
    pub fn is_app(&self) -> bool {
        self.forge == Forge::GitHub && (self.path == "/app/hook" || self.path == "/api/v3/app/hook")
    }

    /// The path of GitHub's REST API root (empty, or Enterprise Server's `/api/v3`).
    pub(super) fn api_prefix(&self) -> &str {
        ["/repos/", "/orgs/", "/app/hook"]
            .iter()
            .filter_map(|marker| self.path.find(marker))
            .min()
            .map_or("", |at| &self.path[..at])
    }

    /// Where GitHub says which installation of an App covers this repository's or
    /// organisation's hook (`…/repos/OWNER/REPO/installation`, `…/orgs/ORG/installation`),
    /// and what it covers (`OWNER/REPO`, `ORG`), for messages.
    pub(super) fn installation(&self) -> Option<(String, String)> {
        let prefix = self.api_prefix();
        let rest = self.path[prefix.len()..].strip_prefix('/')?;
        let (owner, _) = rest.rsplit_once("/hooks/")?;
        matches!(owner.split('/').next(), Some("repos" | "orgs")).then(|| {
            let named = owner.split_once('/').map_or(owner, |(_, name)| name);
            (format!("{prefix}/{owner}/installation"), named.to_owned())
        })
    }

    pub(super) fn first_page(&self) -> String {
        match self.forge {
            Forge::GitHub => format!("{}/deliveries?per_page={PER_PAGE}", self.path),
            Forge::GitLab => format!(
                "{}/events?status=server_failure,429&per_page={}",
                self.path,
                super::gitlab::PER_PAGE
            ),
        }
    }

    pub(super) fn redeliver(&self, attempt: u64) -> String {
        match self.forge {
            Forge::GitHub => format!("{}/deliveries/{attempt}/attempts", self.path),
            Forge::GitLab => format!("{}/events/{attempt}/resend", self.path),
        }
    }

    /// The path and query of a page GitHub links to, when it is on the hook's origin:
    /// the token is sent nowhere else.
    pub(super) fn within(&self, link: &str) -> Option<String> {
        // A host name is the same in any case (`API.github.com`).
        let (origin, rest) = link.split_at_checked(self.origin.len())?;
        (origin.eq_ignore_ascii_case(&self.origin) && rest.starts_with('/'))
            .then(|| rest.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hook_is_read_from_its_api_address_on_github_and_enterprise_server() {
        let hook = HookUrl::parse("https://api.github.com/repos/acme/app/hooks/123").unwrap();
        assert_eq!(hook.origin, "https://api.github.com");
        assert_eq!(hook.path, "/repos/acme/app/hooks/123");
        assert_eq!(
            hook.first_page(),
            "/repos/acme/app/hooks/123/deliveries?per_page=100"
        );
        assert_eq!(
            hook.redeliver(42),
            "/repos/acme/app/hooks/123/deliveries/42/attempts"
        );
        let org = HookUrl::parse("https://api.github.com/orgs/acme/hooks/9/").unwrap();
        assert_eq!(org.path, "/orgs/acme/hooks/9");
        let ghes = HookUrl::parse("https://ghe.example.com:8443/api/v3/repos/a/b/hooks/5").unwrap();
        assert_eq!(ghes.origin, "https://ghe.example.com:8443");
        assert_eq!(ghes.path, "/api/v3/repos/a/b/hooks/5");
        let app = HookUrl::parse("https://api.github.com/app/hook").unwrap();
        assert!(app.is_app() && !hook.is_app());
        assert_eq!(app.first_page(), "/app/hook/deliveries?per_page=100");
        assert_eq!(app.redeliver(7), "/app/hook/deliveries/7/attempts");
        let ghes_app = HookUrl::parse("https://ghe.example.com/api/v3/app/hook/").unwrap();
        assert!(ghes_app.is_app());
        assert_eq!(ghes_app.api_prefix(), "/api/v3");
        assert_eq!(ghes_app.installation(), None);
        assert_eq!(
            ghes.installation(),
            Some(("/api/v3/repos/a/b/installation".into(), "a/b".into()))
        );
        assert_eq!(
            org.installation(),
            Some(("/orgs/acme/installation".into(), "acme".into()))
        );
        let lab = HookUrl::parse("https://gitlab.example.com/api/v4/projects/acme%2Fapp/hooks/7")
            .unwrap();
        assert_eq!(lab.forge, Forge::GitLab);
        assert_eq!(
            lab.first_page(),
            "/api/v4/projects/acme%2Fapp/hooks/7/events?status=server_failure,429&per_page=20"
        );
        assert_eq!(
            lab.redeliver(31),
            "/api/v4/projects/acme%2Fapp/hooks/7/events/31/resend"
        );
        let group = HookUrl::parse("https://example.com/gitlab/api/v4/groups/9/hooks/3").unwrap();
        assert_eq!(
            (group.forge, group.origin.as_str(), group.path.as_str()),
            (
                Forge::GitLab,
                "https://example.com",
                "/gitlab/api/v4/groups/9/hooks/3"
            )
        );
        assert_eq!(hook.forge, Forge::GitHub);
        for wrong in [
            "https://gitlab.example.com/api/v4/projects/9/hooks",
            "https://gitlab.example.com/api/v4/users/9/hooks/1",
            "https://gitlab.example.com/api/v3/projects/9/hooks/1",
            "https://gitlab.example.com/acme/app/-/hooks/1/edit",
            "https://api.github.com/repos/acme/app/app/hook",
            "https://api.github.com/orgs//hooks/1",
            "https://api.github.com/repos/acme//hooks/1",
            "https://api.github.com/repos//app/hooks/1",
            "https://api.github.com/repos/acme/app/extra/hooks/1",
            "https://api.github.com/x/repos/acme/app/hooks/1",
            "https://ghe.example.com/x/api/v3/app/hook",
            "https://api.github.com/app/hooks",
            "https://api.github.com/app",
            "https://github.com/acme/app/settings/hooks/123",
            "https://api.github.com/repos/acme/app/hooks",
            "https://api.github.com/repos/acme/app/hooks/abc",
            "https://api.github.com/repos/acme/app/hooks/1?x=1",
            "https://me:pw@api.github.com/repos/acme/app/hooks/1",
            "api.github.com/repos/acme/app/hooks/1",
        ] {
            let err = HookUrl::parse(wrong).unwrap_err();
            assert!(!err.contains(":pw@"), "{err}");
        }
    }

    #[test]
    fn only_pages_on_the_hooks_own_origin_are_followed() {
        let hook = HookUrl::parse("https://api.github.com/repos/acme/app/hooks/1").unwrap();
        assert_eq!(
            hook.within("https://api.github.com/repositories/7/hooks/1/deliveries?cursor=v1_9")
                .as_deref(),
            Some("/repositories/7/hooks/1/deliveries?cursor=v1_9")
        );
        assert_eq!(hook.within("https://evil.example/x"), None);
        assert_eq!(
            hook.within("https://API.GitHub.com/x").as_deref(),
            Some("/x")
        );
        assert_eq!(hook.within("https://api.github.co"), None);
        assert_eq!(hook.within("https://api.github.com.evil.example/x"), None);
    }
}
