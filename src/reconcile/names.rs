//! Which project is which on the two sides. The ledger names a project by the name and id it had when the line was
//! written; CloudWatch's `Project` dimension holds either the project's id (`proj_...`) or its name (AWS has not
//! said which: **unconfirmed**), so both are asked for and whichever holds data is used. Projects are known from
//! the config (whose ids include those from `projects.lock.toml`) and from the ledger lines themselves (a project
//! since removed from the config, or a run without a config).

use std::collections::{BTreeMap, BTreeSet};

use crate::config::Project;

/// The account's unattributed project, as CloudWatch's `Project` dimension names it.
pub const DEFAULT: &str = "default";

/// How a `Project` dimension value names a project.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Form {
    /// Its `proj_...` id.
    Id,
    /// Its name.
    Name,
}

/// A project to reconcile: its name (the config's, where the config has it), its id, and the models its ledger
/// lines name (with its allowlist, if any).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    /// The config's name, or the ledger's for a project the config lacks.
    pub name: String,
    /// Its id, if known.
    pub id: Option<String>,
    /// Models to ask CloudWatch about for it.
    pub models: BTreeSet<String>,
}

impl Subject {
    /// The `Project` dimension values that may name it: its id (when known), then its name.
    pub fn dimension_values(&self) -> Vec<(Form, String)> {
        let mut values = Vec::with_capacity(2);
        if let Some(id) = &self.id {
            values.push((Form::Id, id.clone()));
        }
        if self.id.as_deref() != Some(self.name.as_str()) {
            values.push((Form::Name, self.name.clone()));
        }
        values
    }
}

/// The configured projects, by id and by name.
#[derive(Debug, Clone, Default)]
pub struct ProjectNames {
    /// Name -> (id, models allowlist), in the config's order.
    configured: BTreeMap<String, (Option<String>, Vec<String>)>,
    /// Id -> name.
    by_id: BTreeMap<String, String>,
}

impl ProjectNames {
    /// The config's projects (archived ones too: their metrics stay readable, and they had traffic until archived).
    pub fn new(projects: &[Project]) -> Self {
        let mut names = Self::default();
        for p in projects {
            names.configured.insert(p.name.clone(), (p.id.clone(), p.models.clone()));
            if let Some(id) = &p.id {
                names.by_id.insert(id.clone(), p.name.clone());
            }
        }
        names
    }

    /// The project a ledger line belongs to: by its id first (a project renamed since keeps its id), else by its
    /// name.
    pub fn of_line(&self, name: &str, id: Option<&str>) -> String {
        id.and_then(|id| self.by_id.get(id)).cloned().unwrap_or_else(|| name.to_owned())
    }

    /// The configured project a `Project` dimension value names (its id or its name), if any.
    pub fn of_dimension(&self, value: &str) -> Option<&str> {
        self.by_id
            .get(value)
            .map(String::as_str)
            .or_else(|| self.configured.get_key_value(value).map(|(name, _)| name.as_str()))
    }

    /// Every project to reconcile: each configured one, and each the ledger names that the config does not, with
    /// the models `seen` in the ledger for it (by project name) and its allowlist.
    pub fn subjects(
        &self,
        seen: &BTreeMap<String, BTreeSet<String>>,
        ledger_ids: &BTreeMap<String, String>,
    ) -> Vec<Subject> {
        let mut subjects: Vec<Subject> = self
            .configured
            .iter()
            .map(|(name, (id, allowlist))| {
                let mut models: BTreeSet<String> = allowlist.iter().cloned().collect();
                models.extend(seen.get(name).into_iter().flatten().cloned());
                Subject { name: name.clone(), id: id.clone(), models }
            })
            .collect();
        for (name, models) in seen {
            if !self.configured.contains_key(name) {
                let id = ledger_ids.get(name).cloned();
                subjects.push(Subject { name: name.clone(), id, models: models.clone() });
            }
        }
        subjects
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn project(name: &str, id: Option<&str>, models: &[&str]) -> Project {
        Project {
            name: name.into(),
            id: id.map(Into::into),
            tags: BTreeMap::new(),
            models: models.iter().map(|m| (*m).to_owned()).collect(),
            archived: false,
        }
    }

    #[test]
    fn ledger_lines_are_matched_by_id_before_name() {
        let names = ProjectNames::new(&[project("Chat", Some("proj_chat"), &[]), project("Search", None, &[])]);
        assert_eq!(names.of_line("Chat", Some("proj_chat")), "Chat");
        // Renamed since the line was written: the id still says which project it was.
        assert_eq!(names.of_line("Chat-Old", Some("proj_chat")), "Chat");
        assert_eq!(names.of_line("Search", Some("proj_unknown")), "Search");
        // Removed from the config: kept under its own name.
        assert_eq!(names.of_line("Gone", Some("proj_gone")), "Gone");
    }

    #[test]
    fn dimension_values_are_ids_or_names_of_configured_projects() {
        let names = ProjectNames::new(&[project("Chat", Some("proj_chat"), &[]), project("Search", None, &[])]);
        assert_eq!(names.of_dimension("proj_chat"), Some("Chat"));
        assert_eq!(names.of_dimension("Chat"), Some("Chat"));
        assert_eq!(names.of_dimension("Search"), Some("Search"));
        assert_eq!(names.of_dimension("proj_other"), None);
        assert_eq!(names.of_dimension(DEFAULT), None);

        let with_id = Subject { name: "Chat".into(), id: Some("proj_chat".into()), models: BTreeSet::new() };
        assert_eq!(
            with_id.dimension_values(),
            [(Form::Id, "proj_chat".to_owned()), (Form::Name, "Chat".to_owned())],
            "the id first"
        );
        let without = Subject { name: "Search".into(), id: None, models: BTreeSet::new() };
        assert_eq!(without.dimension_values(), [(Form::Name, "Search".to_owned())]);
    }

    #[test]
    fn subjects_are_the_configured_projects_and_those_only_the_ledger_names() {
        let names =
            ProjectNames::new(&[project("Chat", Some("proj_chat"), &["m-allowed"]), project("Idle", None, &[])]);
        let seen: BTreeMap<String, BTreeSet<String>> = [
            ("Chat".to_owned(), BTreeSet::from(["m1".to_owned()])),
            ("Gone".to_owned(), BTreeSet::from(["m2".to_owned()])),
        ]
        .into();
        let ids = BTreeMap::from([("Gone".to_owned(), "proj_gone".to_owned())]);
        let subjects = names.subjects(&seen, &ids);
        assert_eq!(subjects.len(), 3);
        assert_eq!(subjects[0].name, "Chat");
        assert_eq!(subjects[0].models, BTreeSet::from(["m-allowed".to_owned(), "m1".to_owned()]));
        assert_eq!((subjects[1].name.as_str(), subjects[1].models.len()), ("Idle", 0));
        assert_eq!((subjects[2].name.as_str(), subjects[2].id.as_deref()), ("Gone", Some("proj_gone")));
    }
}
