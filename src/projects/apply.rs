//! `mantlegate projects apply`'s work: a plan with no problems carried out upstream, one configured project after
//! another in the config's order, stopping at the first call that fails. The report says precisely what was done,
//! what failed (with what upstream said) and what was not attempted; the ids learnt (created, or found by name)
//! go to the lock file whatever happened, so nothing done is forgotten.
//!
//! Per project: a create sends the name and every tag at once; an update sends the tags to add or correct in one
//! `add_tags` (it sets a value either way), then the keys to remove, then the name; an archive is one call.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::client::ProjectsClient;
use super::plan::{Action, Plan, ProjectPlan};
use crate::config::Config;
use crate::config::lock::{Entry, Lock};

/// What a run did.
#[derive(Debug, Default)]
pub struct Report {
    /// Projects done: name and what was done.
    pub done: Vec<(String, String)>,
    /// The project that failed: name, and what was done for it before the failure and the failure.
    pub failed: Option<(String, String)>,
    /// Projects with changes that were not attempted, as an earlier one failed.
    pub not_attempted: Vec<String>,
    /// Ids created in this run, by name.
    pub created: BTreeMap<String, String>,
}

impl Report {
    /// The report for a person.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let attempted = self.done.len() + usize::from(self.failed.is_some());
        let total = attempted + self.not_attempted.len();
        match &self.failed {
            None => {
                let _ = writeln!(out, "\nApplied: {} project{} changed.", self.done.len(), plural(self.done.len()));
            }
            Some(_) => {
                let _ = writeln!(
                    out,
                    "\nApply stopped at a failure: {} of {total} project{} done, 1 failed, {} not attempted.",
                    self.done.len(),
                    plural(total),
                    self.not_attempted.len()
                );
            }
        }
        for (name, what) in &self.done {
            let _ = writeln!(out, "  done: {name}: {what}");
        }
        if let Some((name, why)) = &self.failed {
            let _ = writeln!(out, "  failed: {name}: {why}");
        }
        for name in &self.not_attempted {
            let _ = writeln!(out, "  not attempted: {name}");
        }
        out
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// Carries out `plan` (which must have no problems). Each call is logged as it is made (see [`super::client`]).
pub async fn apply(client: &ProjectsClient, plan: &Plan) -> Report {
    let mut report = Report::default();
    for p in plan.projects.iter().filter(|p| matches!(p.action, Action::Create | Action::Update | Action::Archive)) {
        if report.failed.is_some() {
            report.not_attempted.push(p.name.clone());
            continue;
        }
        let mut steps = Vec::new();
        match carry_out(client, p, &mut steps, &mut report.created).await {
            Ok(()) => {
                report.done.push((p.name.clone(), steps.join("; ")));
            }
            Err(e) => {
                let mut why = format!("{e:#}");
                if !steps.is_empty() {
                    why = format!("{} done, then {why}", steps.join("; "));
                }
                report.failed = Some((p.name.clone(), why));
            }
        }
    }
    report
}

/// The calls for one project; `steps` says what each that succeeded did.
async fn carry_out(
    client: &ProjectsClient,
    p: &ProjectPlan,
    steps: &mut Vec<String>,
    created: &mut BTreeMap<String, String>,
) -> anyhow::Result<()> {
    if p.action == Action::Create {
        let project = client
            .create(&p.name, &p.add_tags)
            .await
            .map_err(|e| e.context("it may or may not have been created: `mantlegate projects plan` shows whether"))?;
        steps.push(format!("created {} with {} tag{}", project.id, p.add_tags.len(), plural(p.add_tags.len())));
        created.insert(p.name.clone(), project.id);
        return Ok(());
    }
    let id = p.id.as_deref().ok_or_else(|| anyhow::anyhow!("no id to change (a bug: the plan matched none)"))?;
    if p.action == Action::Archive {
        client.archive(id).await?;
        steps.push(format!("archived {id}"));
        return Ok(());
    }
    let mut set = p.add_tags.clone();
    set.extend(p.correct_tags.iter().map(|(tag, c)| (tag.clone(), c.to.clone())));
    if !set.is_empty() {
        client.update(id, &serde_json::json!({ "add_tags": set })).await?;
        let keys: Vec<&str> = set.keys().map(String::as_str).collect();
        steps.push(format!("{id}: set tag{} {}", plural(keys.len()), keys.join(", ")));
    }
    if !p.remove_tag_keys.is_empty() {
        client.update(id, &serde_json::json!({ "remove_tag_keys": p.remove_tag_keys })).await?;
        steps.push(format!("{id}: removed tag{} {}", plural(p.remove_tag_keys.len()), p.remove_tag_keys.join(", ")));
    }
    if let Some(rename) = &p.rename {
        client.update(id, &serde_json::json!({ "name": rename.to })).await?;
        steps.push(format!("{id}: renamed from {:?}", rename.from));
    }
    Ok(())
}

/// The lock for `config` (loaded without one): every project without an `id` in the config whose id is known,
/// created in this run or matched by name in `plan`.
pub fn lock(config: &Config, plan: &Plan, created: &BTreeMap<String, String>) -> Lock {
    let projects = config
        .projects
        .iter()
        .zip(&plan.projects)
        .filter(|(configured, _)| configured.id.is_none() || config.lock.ids.contains(&configured.name))
        .filter_map(|(configured, planned)| {
            let id = created.get(&configured.name).or(planned.id.as_ref())?;
            Some(Entry { name: configured.name.clone(), id: id.clone() })
        })
        .collect();
    Lock { upstream: config.upstream.authority.to_string(), region: config.upstream.region.clone(), projects }
}
