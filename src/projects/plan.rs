//! What applying the config's projects would change upstream, worked out from what upstream has: pure functions,
//! so every rule is tested here without a network.
//!
//! Matching: a configured project with an `id` is that project upstream; one without is the upstream project of
//! exactly its name, and two upstream projects of that name are a problem naming both ids, never a guess. Per
//! configured project the plan is to create it, to add or correct tags (`add_tags` sets a value either way), to
//! remove tags the config does not list (only when asked: a tag someone added upstream may feed a report), to
//! rename it (only when asked: other tools may know it by its upstream name), or nothing. A configured id that
//! upstream does not have, or has archived, is a problem no apply can fix, unless the config marks the project
//! `archived = true`: then the plan is to archive it (its tags are left as they are), or nothing once it is, or
//! nothing if it was never created.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use super::UpstreamProject;
use crate::config::Project;

/// What the plan may change beyond creating projects and adding or correcting tags.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Remove tags upstream that the config does not list (else they are reported and kept).
    pub remove_unlisted_tags: bool,
    /// Rename projects matched by id whose upstream name differs (else the difference is reported).
    pub rename: bool,
}

/// The plan for every configured project, and what upstream has beyond them.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// One entry per configured project, in the config's order.
    pub projects: Vec<ProjectPlan>,
    /// Upstream projects no configured project matches (`mantlegate projects import` prints them as config).
    pub not_in_config: Vec<UpstreamProject>,
}

/// The plan for one configured project.
#[derive(Debug, Clone, Serialize)]
pub struct ProjectPlan {
    /// The configured name.
    pub name: String,
    /// The configured id, or the id of the upstream project matched by name.
    pub id: Option<String>,
    /// How it was matched, if it was.
    pub matched_by: Option<MatchedBy>,
    /// What applying would do.
    pub action: Action,
    /// Tags to add; for a project to create, every tag it is created with.
    pub add_tags: BTreeMap<String, String>,
    /// Tags upstream with another value, to set to the config's.
    pub correct_tags: BTreeMap<String, Correction>,
    /// Tags upstream that the config does not list, to remove (with [`Options::remove_unlisted_tags`]).
    pub remove_tag_keys: Vec<String>,
    /// Tags upstream that the config does not list, left as they are.
    pub unlisted_tags_kept: BTreeMap<String, String>,
    /// A rename (with [`Options::rename`]).
    pub rename: Option<Correction>,
    /// The upstream name, when it differs from the configured one and is kept.
    pub upstream_name: Option<String>,
    /// Why nothing can be done for it until the config or upstream changes.
    pub problems: Vec<String>,
}

/// How a configured project was matched to an upstream one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MatchedBy {
    /// By its configured `id`.
    Id,
    /// By its name, as it has no `id`.
    Name,
}

/// What applying would do for a configured project.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Create it with its tags.
    Create,
    /// Add, correct or remove tags, or rename it.
    Update,
    /// Archive it (`archived = true` in the config).
    Archive,
    /// Nothing: upstream already matches.
    Unchanged,
    /// Nothing can be done: see its problems.
    Blocked,
}

/// A value upstream and the config's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Correction {
    /// Upstream's.
    pub from: String,
    /// The config's.
    pub to: String,
}

impl Plan {
    /// Configured projects applying would create or change.
    pub fn changes(&self) -> usize {
        self.projects.iter().filter(|p| matches!(p.action, Action::Create | Action::Update | Action::Archive)).count()
    }

    /// Problems apply cannot fix, across every project.
    pub fn problems(&self) -> usize {
        self.projects.iter().map(|p| p.problems.len()).sum()
    }

    /// The exit status of `mantlegate projects plan`: 1 when there are problems, 2 when there are changes, else 0,
    /// so a CI job can gate on it.
    pub fn exit_code(&self) -> u8 {
        if self.problems() > 0 {
            1
        } else if self.changes() > 0 {
            2
        } else {
            0
        }
    }
}

/// The configured ids the list did not give: each is asked for by id, as the list may leave out archived projects.
pub fn ids_to_get<'a>(configured: &'a [Project], listed: &[UpstreamProject]) -> Vec<&'a str> {
    configured.iter().filter_map(|p| p.id.as_deref()).filter(|id| !listed.iter().any(|u| u.id == *id)).collect()
}

/// The plan for `configured` against `upstream` (every listed project, and those fetched by id).
pub fn plan(configured: &[Project], upstream: &[UpstreamProject], options: Options) -> Plan {
    let by_id: HashMap<&str, &UpstreamProject> = upstream.iter().map(|u| (u.id.as_str(), u)).collect();
    let mut by_name: HashMap<&str, Vec<&UpstreamProject>> = HashMap::new();
    for u in upstream {
        by_name.entry(u.name.as_str()).or_default().push(u);
    }
    // Upstream id -> the configured project that matched it first.
    let mut claimed: HashMap<&str, &str> = HashMap::new();
    let mut projects = Vec::with_capacity(configured.len());
    for p in configured {
        let mut entry = ProjectPlan {
            name: p.name.clone(),
            id: p.id.clone(),
            matched_by: None,
            action: Action::Blocked,
            add_tags: BTreeMap::new(),
            correct_tags: BTreeMap::new(),
            remove_tag_keys: Vec::new(),
            unlisted_tags_kept: BTreeMap::new(),
            rename: None,
            upstream_name: None,
            problems: Vec::new(),
        };
        let matched = match &p.id {
            Some(id) => match by_id.get(id.as_str()) {
                Some(u) => Some((*u, MatchedBy::Id)),
                None => {
                    entry.problems.push(format!("{id} does not exist upstream (in this region)"));
                    None
                }
            },
            None => match by_name.get(p.name.as_str()).map(Vec::as_slice).unwrap_or_default() {
                // Never created: nothing to archive.
                [] if p.archived => {
                    entry.action = Action::Unchanged;
                    None
                }
                [] => {
                    entry.action = Action::Create;
                    entry.add_tags = p.tags.clone();
                    None
                }
                [u] => Some((*u, MatchedBy::Name)),
                several => {
                    let ids: Vec<&str> = several.iter().map(|u| u.id.as_str()).collect();
                    entry.problems.push(format!(
                        "upstream has {} projects named {:?} ({}): set `id` to the one meant",
                        ids.len(),
                        p.name,
                        ids.join(", ")
                    ));
                    None
                }
            },
        };
        if let Some((u, how)) = matched {
            entry.id = Some(u.id.clone());
            entry.matched_by = Some(how);
            if let Some(other) = claimed.insert(&u.id, &p.name) {
                entry.problems.push(format!("{} is also matched by the configured project {other:?}", u.id));
            }
            if u.is_archived() && !p.archived {
                entry.problems.push(format!("{} is archived upstream: it takes no new requests", u.id));
            }
            if p.archived && how == MatchedBy::Name && !u.is_archived() {
                // Archiving cannot be undone: never on a guess by name (the project may be another's).
                entry.problems.push(format!(
                    "{} matches only by name: set its `id` to archive it (archiving cannot be undone)",
                    u.id
                ));
            }
            if entry.problems.is_empty() {
                if p.archived {
                    entry.action = if u.is_archived() { Action::Unchanged } else { Action::Archive };
                } else {
                    compare(&mut entry, p, u, options);
                }
            }
        }
        projects.push(entry);
    }
    let not_in_config =
        upstream.iter().filter(|u| !claimed.contains_key(u.id.as_str()) && !u.is_default()).cloned().collect();
    Plan { projects, not_in_config }
}

/// Fills in the tag and name differences between configured `p` and its upstream `u`, and the action they make.
fn compare(entry: &mut ProjectPlan, p: &Project, u: &UpstreamProject, options: Options) {
    for (tag, value) in &p.tags {
        match u.tags.get(tag) {
            None => {
                entry.add_tags.insert(tag.clone(), value.clone());
            }
            Some(theirs) if theirs != value => {
                entry.correct_tags.insert(tag.clone(), Correction { from: theirs.clone(), to: value.clone() });
            }
            Some(_) => {}
        }
    }
    for (tag, value) in u.tags.iter().filter(|(tag, _)| !p.tags.contains_key(*tag)) {
        if options.remove_unlisted_tags {
            entry.remove_tag_keys.push(tag.clone());
        } else {
            entry.unlisted_tags_kept.insert(tag.clone(), value.clone());
        }
    }
    if u.name != p.name {
        if options.rename {
            entry.rename = Some(Correction { from: u.name.clone(), to: p.name.clone() });
        } else {
            entry.upstream_name = Some(u.name.clone());
        }
    }
    let changes = !entry.add_tags.is_empty()
        || !entry.correct_tags.is_empty()
        || !entry.remove_tag_keys.is_empty()
        || entry.rename.is_some();
    entry.action = if changes { Action::Update } else { Action::Unchanged };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn configured(name: &str, id: Option<&str>, t: &[(&str, &str)]) -> Project {
        Project { name: name.into(), id: id.map(Into::into), tags: tags(t), models: vec![], archived: false }
    }

    fn upstream(id: &str, name: &str, status: &str, t: &[(&str, &str)]) -> UpstreamProject {
        UpstreamProject { id: id.into(), name: name.into(), status: status.into(), tags: tags(t) }
    }

    #[test]
    fn from_empty_everything_is_created_with_its_tags() {
        let config = [configured("A", None, &[("Team", "a")]), configured("B", None, &[])];
        let plan = plan(&config, &[], Options::default());
        assert!(plan.projects.iter().all(|p| p.action == Action::Create && p.id.is_none()));
        assert_eq!(plan.projects[0].add_tags, tags(&[("Team", "a")]));
        assert_eq!((plan.changes(), plan.problems(), plan.exit_code()), (2, 0, 2));
    }

    #[test]
    fn matching_upstream_is_nothing_to_do() {
        let config = [configured("A", Some("proj_a"), &[("Team", "a")]), configured("B", None, &[("Team", "b")])];
        let up = [upstream("proj_a", "A", "active", &[("Team", "a")]), upstream("proj_b", "B", "", &[("Team", "b")])];
        let plan = plan(&config, &up, Options::default());
        assert!(plan.projects.iter().all(|p| p.action == Action::Unchanged), "{plan:?}");
        assert_eq!(plan.projects[0].matched_by, Some(MatchedBy::Id));
        assert_eq!(plan.projects[1].matched_by, Some(MatchedBy::Name));
        assert_eq!(plan.projects[1].id.as_deref(), Some("proj_b"));
        assert!(plan.not_in_config.is_empty());
        assert_eq!(plan.exit_code(), 0);
    }

    #[test]
    fn tags_missing_or_wrong_are_added_or_corrected() {
        let config = [configured("A", Some("proj_a"), &[("Team", "a"), ("CostCenter", "CC-1")])];
        let up = [upstream("proj_a", "A", "active", &[("Team", "old")])];
        let plan = plan(&config, &up, Options::default());
        let p = &plan.projects[0];
        assert_eq!(p.action, Action::Update);
        assert_eq!(p.add_tags, tags(&[("CostCenter", "CC-1")]));
        assert_eq!(p.correct_tags["Team"], Correction { from: "old".into(), to: "a".into() });
        assert_eq!(plan.exit_code(), 2);
    }

    #[test]
    fn unlisted_tags_are_kept_unless_removal_is_asked_for() {
        let config = [configured("A", Some("proj_a"), &[("Team", "a")])];
        let up = [upstream("proj_a", "A", "active", &[("Team", "a"), ("Owner", "bob")])];
        let kept = plan(&config, &up, Options::default());
        assert_eq!(kept.projects[0].unlisted_tags_kept, tags(&[("Owner", "bob")]));
        assert_eq!((kept.projects[0].action, kept.exit_code()), (Action::Unchanged, 0));
        let removed = plan(&config, &up, Options { remove_unlisted_tags: true, ..Options::default() });
        assert_eq!(removed.projects[0].remove_tag_keys, ["Owner"]);
        assert!(removed.projects[0].unlisted_tags_kept.is_empty());
        assert_eq!((removed.projects[0].action, removed.exit_code()), (Action::Update, 2));
    }

    #[test]
    fn a_different_upstream_name_is_reported_and_renamed_only_when_asked() {
        let config = [configured("A", Some("proj_a"), &[])];
        let up = [upstream("proj_a", "Old name", "active", &[])];
        let kept = plan(&config, &up, Options::default());
        assert_eq!(kept.projects[0].upstream_name.as_deref(), Some("Old name"));
        assert_eq!((kept.projects[0].action, kept.exit_code()), (Action::Unchanged, 0));
        let renamed = plan(&config, &up, Options { rename: true, ..Options::default() });
        assert_eq!(renamed.projects[0].rename, Some(Correction { from: "Old name".into(), to: "A".into() }));
        assert_eq!(renamed.projects[0].action, Action::Update);
    }

    #[test]
    fn two_upstream_projects_of_the_name_are_a_problem_naming_both() {
        let config = [configured("A", None, &[])];
        let up = [upstream("proj_1", "A", "active", &[]), upstream("proj_2", "A", "active", &[])];
        let plan = plan(&config, &up, Options::default());
        let p = &plan.projects[0];
        assert_eq!((p.action, p.id.as_deref()), (Action::Blocked, None));
        assert!(p.problems[0].contains("proj_1") && p.problems[0].contains("proj_2"), "{:?}", p.problems);
        assert_eq!(plan.exit_code(), 1);
    }

    #[test]
    fn archived_and_missing_ids_are_problems() {
        let config = [configured("A", Some("proj_a"), &[]), configured("B", Some("proj_gone"), &[])];
        let up = [upstream("proj_a", "A", "archived", &[])];
        let plan = plan(&config, &up, Options::default());
        assert!(plan.projects[0].problems[0].contains("proj_a is archived"), "{plan:?}");
        assert!(plan.projects[1].problems[0].contains("proj_gone does not exist"), "{plan:?}");
        assert!(plan.projects.iter().all(|p| p.action == Action::Blocked));
        assert_eq!((plan.problems(), plan.exit_code()), (2, 1));
        // Fetched for the config, so not "not in the config".
        assert!(plan.not_in_config.is_empty());
    }

    #[test]
    fn a_project_marked_archived_is_archived_once_and_never_created() {
        let mut config =
            [configured("A", Some("proj_a"), &[("Team", "a")]), configured("B", None, &[]), configured("C", None, &[])];
        for p in &mut config {
            p.archived = true;
        }
        let up = [upstream("proj_a", "A", "active", &[("Team", "old")]), upstream("proj_b", "B", "archived", &[])];
        let plan = plan(&config, &up, Options::default());
        let actions: Vec<Action> = plan.projects.iter().map(|p| p.action).collect();
        assert_eq!(actions, [Action::Archive, Action::Unchanged, Action::Unchanged], "{plan:?}");
        assert!(plan.projects[0].correct_tags.is_empty(), "an archived project's tags are left alone");
        assert_eq!((plan.problems(), plan.exit_code()), (0, 2));
    }

    #[test]
    fn one_upstream_project_matched_twice_is_a_problem() {
        let config = [configured("A", Some("proj_a"), &[]), configured("Other", None, &[])];
        let up = [upstream("proj_a", "Other", "active", &[])];
        let plan = plan(&config, &up, Options::default());
        assert!(plan.projects[1].problems[0].contains("also matched by the configured project \"A\""), "{plan:?}");
    }

    #[test]
    fn upstream_projects_the_config_lacks_are_listed_but_never_default() {
        let config = [configured("A", None, &[])];
        let up = [
            upstream("proj_a", "A", "active", &[]),
            upstream("proj_x", "Extra", "active", &[]),
            upstream("proj_d", "default", "active", &[]),
        ];
        let plan = plan(&config, &up, Options::default());
        let ids: Vec<&str> = plan.not_in_config.iter().map(|u| u.id.as_str()).collect();
        assert_eq!(ids, ["proj_x"]);
        assert_eq!(plan.exit_code(), 0, "an unknown upstream project is nothing to apply");
    }

    #[test]
    fn ids_the_list_lacks_are_fetched() {
        let config =
            [configured("A", Some("proj_a"), &[]), configured("B", Some("proj_b"), &[]), configured("C", None, &[])];
        let listed = [upstream("proj_a", "A", "active", &[])];
        assert_eq!(ids_to_get(&config, &listed), ["proj_b"]);
    }

    #[test]
    fn the_json_shape_is_stable() {
        let plan = plan(&[configured("A", None, &[("Team", "a")])], &[], Options::default());
        let json = serde_json::to_value(&plan).expect("json");
        assert_eq!(json["projects"][0]["action"], "create");
        assert_eq!(json["projects"][0]["add_tags"]["Team"], "a");
        assert_eq!(json["projects"][0]["matched_by"], serde_json::Value::Null);
        assert!(json["not_in_config"].as_array().is_some_and(Vec::is_empty));
    }
}
