//! Drift noticed at run time: while `upstream.projects_check_interval` is set, `serve` reads the projects
//! upstream on start and then at that interval, and says per configured project (by id: the config's or the lock
//! file's) whether it is `active`, `archived`, `missing` or `tags_drifted` there, as
//! `mantlegate_project_upstream_status`. A project that takes traffic and is archived or missing upstream is
//! logged as a warning once per change, since its requests would then fail or be billed wrong.
//!
//! The check calls the Projects API itself, with the gateway's own credential from the snapshot in force, never
//! through the proxy. The interval is read from the snapshot in force at least every [`CONFIG_RECHECK`], so a reload
//! turns it on, off or changes it without a restart; a reload that changes the projects is checked at the next
//! interval.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use super::UpstreamProject;
use super::client::{ProjectsClient, Retry};
use crate::config::Project;
use crate::live::Live;
use crate::metering::metrics::Metrics;
use crate::snapshot::Snapshot;

/// How often the snapshot in force is looked at for an interval a reload set, changed or removed.
pub const CONFIG_RECHECK: Duration = Duration::from_secs(1);

/// A configured project's state upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// Listed, or found by id, and active, with every configured tag at its configured value.
    Active,
    /// Archived upstream: it takes no new inference.
    Archived,
    /// Neither listed nor found by id.
    Missing,
    /// Active, but a configured tag is missing upstream or has another value (tags upstream that the config
    /// does not list do not count, as `projects plan` keeps them by default).
    TagsDrifted,
}

impl Status {
    /// Every status, in the order `/metrics` lists them.
    pub const ALL: [Self; 4] = [Self::Active, Self::Archived, Self::Missing, Self::TagsDrifted];

    /// Its `status` label value.
    pub fn name(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Archived => "archived",
            Self::Missing => "missing",
            Self::TagsDrifted => "tags_drifted",
        }
    }
}

/// The status of `configured` given what upstream says of its id (`None`: neither listed nor found).
pub fn status(configured: &Project, upstream: Option<&UpstreamProject>) -> Status {
    match upstream {
        None => Status::Missing,
        Some(u) if u.is_archived() => Status::Archived,
        Some(u) if configured.tags.iter().any(|(tag, value)| u.tags.get(tag) != Some(value)) => Status::TagsDrifted,
        Some(_) => Status::Active,
    }
}

/// Reads every configured project with an id upstream: the list, and a get for each id it does not show (the
/// list may leave archived projects out). Projects in the config's order, by name.
pub async fn check(client: &ProjectsClient, configured: &[Project]) -> anyhow::Result<Vec<(String, Status)>> {
    let listed: HashMap<String, UpstreamProject> =
        client.list().await?.into_iter().map(|p| (p.id.clone(), p)).collect();
    let mut statuses = Vec::with_capacity(configured.len());
    for p in configured {
        let Some(id) = &p.id else { continue };
        let found = match listed.get(id) {
            Some(u) => Some(u.clone()),
            None => client.get(id).await?,
        };
        statuses.push((p.name.clone(), status(p, found.as_ref())));
    }
    Ok(statuses)
}

/// Checks, then waits the interval in force, for ever (the server aborts it at shutdown).
pub async fn run(live: Arc<Live>, metrics: Arc<Metrics>) {
    let mut last: BTreeMap<String, Status> = BTreeMap::new();
    // The client of the snapshot it was made for: made again when a reload puts another in force.
    let mut client: Option<(Arc<Snapshot>, ProjectsClient)> = None;
    loop {
        let snapshot = live.load();
        if snapshot.config.upstream.projects_check_interval.is_none() {
            // Turned off by a reload: statuses no longer checked are no longer exported.
            if !last.is_empty() {
                metrics.project_upstream_statuses(&[]);
                last.clear();
            }
            client = None;
            tokio::time::sleep(CONFIG_RECHECK).await;
            continue;
        }
        let checked = tokio::time::Instant::now();
        if !client.as_ref().is_some_and(|(made_for, _)| Arc::ptr_eq(made_for, &snapshot)) {
            client = match connect(&snapshot) {
                Ok(made) => Some((snapshot.clone(), made)),
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "projects check cannot run; the last statuses stay");
                    None
                }
            };
        }
        if let Some((_, c)) = &client {
            match check(c, &snapshot.config.projects).await {
                Ok(statuses) => {
                    report(&snapshot.config.projects, &last, &statuses);
                    metrics.project_upstream_statuses(&statuses);
                    last = statuses.into_iter().collect();
                }
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "projects check failed; the last statuses stay");
                }
            }
        }
        wait(&live, checked).await;
    }
}

/// Until the interval in force has passed since `checked`, looking every [`CONFIG_RECHECK`] for a reload that
/// shortened it or turned the check off, so a change does not wait out the interval it replaces.
async fn wait(live: &Live, checked: tokio::time::Instant) {
    while let Some(interval) = live.load().config.upstream.projects_check_interval {
        let now = tokio::time::Instant::now();
        let due = checked + interval;
        if now >= due {
            return;
        }
        tokio::time::sleep((due - now).min(CONFIG_RECHECK)).await;
    }
}

fn connect(snapshot: &Snapshot) -> anyhow::Result<ProjectsClient> {
    let credential = snapshot.credential.clone();
    let hint = credential.refusal_hint();
    let mut client = ProjectsClient::new(&snapshot.config.upstream, credential, hint)?;
    // A check that fails is tried again at the next interval: no long backoff inside one.
    client.retry = Retry { attempts: 2, base: Duration::from_millis(500), max: Duration::from_secs(1) };
    Ok(client)
}

/// Logs each project whose status changed: a warning for one that takes traffic and is now archived or missing.
fn report(configured: &[Project], last: &BTreeMap<String, Status>, statuses: &[(String, Status)]) {
    for (name, status) in statuses {
        if last.get(name) == Some(status) {
            continue;
        }
        let routed = configured.iter().any(|p| &p.name == name && !p.archived);
        let (project, status_name) = (name.as_str(), status.name());
        match status {
            Status::Archived | Status::Missing if routed => tracing::warn!(
                project,
                status = status_name,
                "project is not active upstream: its requests will fail or be billed wrong"
            ),
            Status::TagsDrifted => tracing::warn!(
                project,
                status = status_name,
                "project's cost allocation tags upstream differ from the config; run `mantlegate projects plan`"
            ),
            _ => tracing::info!(project, status = status_name, "project status upstream"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn statuses_follow_what_upstream_says() {
        let p = Project {
            name: "P".into(),
            id: Some("proj_p".into()),
            tags: tags(&[("Team", "a")]),
            models: vec![],
            archived: false,
        };
        let u = |status: &str, t: &[(&str, &str)]| UpstreamProject {
            id: "proj_p".into(),
            name: "P".into(),
            status: status.into(),
            tags: tags(t),
        };
        assert_eq!(status(&p, None), Status::Missing);
        assert_eq!(status(&p, Some(&u("archived", &[("Team", "a")]))), Status::Archived);
        assert_eq!(status(&p, Some(&u("active", &[("Team", "a"), ("Extra", "x")]))), Status::Active);
        assert_eq!(status(&p, Some(&u("", &[("Team", "a")]))), Status::Active);
        assert_eq!(status(&p, Some(&u("active", &[("Team", "b")]))), Status::TagsDrifted);
        assert_eq!(status(&p, Some(&u("active", &[]))), Status::TagsDrifted);
    }
}
