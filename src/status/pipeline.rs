//! GitLab's pipeline states as hookrelay reads them: a "Pipeline Hook" webhook, or the
//! answer to `GET /projects/:id/pipelines/:pipeline_id` (a poll).
//!
//! Payload shapes differ by GitLab version (the 2016 captures lack `url`, `source`,
//! `project.id`): only `object_attributes.id` and `status` are required; everything else
//! is optional and has a fallback (`project.web_url` + `/-/pipelines/ID` for the link).

use serde::Deserialize;

/// One pipeline's state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PipelineEvent {
    pub pipeline_id: i64,
    /// GitLab's `status` (`pending`, `running`, `success`, …).
    pub status: String,
    /// The pipeline's page.
    pub url: Option<String>,
    pub finished_at: Option<String>,
    pub project_id: Option<i64>,
    pub project_path: Option<String>,
}

#[derive(Deserialize)]
struct Hook {
    object_attributes: Attributes,
    project: Option<Project>,
}

#[derive(Deserialize)]
struct Attributes {
    id: i64,
    status: String,
    url: Option<String>,
    finished_at: Option<String>,
}

#[derive(Deserialize)]
struct Project {
    id: Option<i64>,
    path_with_namespace: Option<String>,
    web_url: Option<String>,
}

/// A pipeline entity, as `GET /projects/:id/pipelines/:pipeline_id` answers.
#[derive(Deserialize)]
struct Entity {
    id: i64,
    project_id: Option<i64>,
    status: String,
    web_url: Option<String>,
    finished_at: Option<String>,
}

impl PipelineEvent {
    /// A Pipeline Hook's body.
    pub fn from_hook(body: &[u8]) -> Result<PipelineEvent, String> {
        let hook: Hook = crate::json_syntax::read(body).map_err(|err| {
            format!("a GitLab pipeline event needs object_attributes.id and .status: {err}")
        })?;
        let project = hook.project;
        let url = hook.object_attributes.url.or_else(|| {
            let web_url = project.as_ref()?.web_url.as_ref()?;
            Some(format!(
                "{}/-/pipelines/{}",
                web_url.trim_end_matches('/'),
                hook.object_attributes.id
            ))
        });
        Ok(PipelineEvent {
            pipeline_id: hook.object_attributes.id,
            status: hook.object_attributes.status,
            url,
            finished_at: hook.object_attributes.finished_at,
            project_id: project.as_ref().and_then(|p| p.id),
            project_path: project.and_then(|p| p.path_with_namespace),
        })
    }

    /// The answer to a poll of one pipeline.
    pub fn from_entity(body: &[u8]) -> Result<PipelineEvent, String> {
        let entity: Entity = serde_json::from_slice(body)
            .map_err(|err| format!("GitLab's pipeline answer cannot be read: {err}"))?;
        Ok(PipelineEvent {
            pipeline_id: entity.id,
            status: entity.status,
            url: entity.web_url,
            finished_at: entity.finished_at,
            project_id: entity.project_id,
            project_path: None,
        })
    }

    /// Whether the event is about `project` as a trigger named it (an id or a path,
    /// paths compared without case as GitLab does). An event that names neither is
    /// taken at its word: the pipeline id, unique on its GitLab, already matched.
    pub fn is_of_project(&self, project: &str) -> bool {
        match (project.parse::<i64>(), self.project_id, &self.project_path) {
            (Ok(id), Some(event_id), _) => id == event_id,
            (Err(_), _, Some(path)) => path.eq_ignore_ascii_case(project),
            _ => true,
        }
    }

    /// The project for messages.
    pub fn project_name(&self) -> String {
        match (&self.project_path, self.project_id) {
            (Some(path), _) => path.clone(),
            (None, Some(id)) => format!("project {id}"),
            (None, None) => "an unnamed project".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_gitlabs_documented_and_captured_pipeline_events() {
        let doc = PipelineEvent::from_hook(include_bytes!(
            "../../tests/fixtures/status/gitlab_pipeline_event_doc.json"
        ))
        .unwrap();
        assert_eq!(
            doc,
            PipelineEvent {
                pipeline_id: 31,
                status: "success".into(),
                url: Some("http://example.com/gitlab-org/gitlab-test/-/pipelines/31".into()),
                finished_at: Some("2016-08-12 15:26:29 UTC".into()),
                project_id: Some(1),
                project_path: Some("gitlab-org/gitlab-test".into()),
            }
        );
        assert!(doc.is_of_project("1"));
        assert!(doc.is_of_project("GitLab-Org/gitlab-test"));
        assert!(!doc.is_of_project("2"));
        assert!(!doc.is_of_project("gitlab-org/other"));
        // The 2016 capture has no `url` and no `project.id`: the link is built from the
        // project's page, and the path decides.
        let old = PipelineEvent::from_hook(include_bytes!(
            "../../tests/fixtures/status/gitlab_pipeline_event_pending_zulip.json"
        ))
        .unwrap();
        assert_eq!(old.status, "pending");
        assert_eq!(old.project_id, None);
        let url = old.url.unwrap();
        assert!(
            url.ends_with(&format!("/-/pipelines/{}", old.pipeline_id)),
            "{url}"
        );
        let subgroup = PipelineEvent::from_hook(include_bytes!(
            "../../tests/fixtures/status/gitlab_pipeline_event_subgroup_go_scm.json"
        ))
        .unwrap();
        assert!(subgroup.is_of_project("group1/group2/group3/grp2repo"));
        assert!(PipelineEvent::from_hook(b"{\"object_kind\":\"pipeline\"}").is_err());
    }

    #[test]
    fn reads_a_polled_pipeline() {
        let polled = PipelineEvent::from_entity(
            br#"{"id":287,"iid":144,"project_id":21,"status":"running","ref":"main",
                 "web_url":"http://127.0.0.1:3000/test-group/test-project/-/pipelines/287","finished_at":null}"#,
        )
        .unwrap();
        assert_eq!(
            (
                polled.pipeline_id,
                polled.status.as_str(),
                polled.project_id
            ),
            (287, "running", Some(21))
        );
        assert!(polled.is_of_project("21"));
    }
}
