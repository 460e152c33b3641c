//! Everything a request needs that a reload may change, as one immutable value: the validated config, the
//! keys and projects linked to each other, the route table, the attribution policy, prices, the usage ledger
//! and the upstream credential. A reload builds a new [`Snapshot`] beside the one in force and swaps it in
//! (see `live`); a request loads the snapshot once, as it starts, and holds it until its record is written, so
//! everything about one request (its key, project, prices, ledger and metric labels) comes from one config.
//!
//! Keys and projects refer to each other by `Arc`, never by position, so nothing outside a snapshot depends on
//! the order of its config's lists.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use http::HeaderValue;
use serde::Serialize;

use crate::attribution::Attributor;
use crate::auth::KeyTable;
use crate::config::limits::Subject;
use crate::config::{self, Config, Unattributed};
use crate::endpoint::RouteTable;
use crate::limits::{Counted, Limiter, Subjects};
use crate::metering::ledger::Ledger;
use crate::metering::metrics::{Metrics, ProjectSeries};
use crate::metering::prices::PriceTable;
use crate::proxy::Credential;

/// A project requests can be attributed to, with what every request to it needs ready-made.
#[derive(Debug)]
pub struct Project {
    /// Unique name.
    pub name: String,
    /// The bedrock-mantle id (`proj_...`).
    pub id: String,
    /// The id as the header value sent upstream.
    pub id_header: HeaderValue,
    /// Cost allocation tags.
    pub tags: BTreeMap<String, String>,
    /// Allowed model ids; empty allows any.
    pub models: Vec<String>,
    /// `"project":...,"project_id":...`, as the access line writes them.
    pub access_members: String,
    /// `"project":...,"project_id":...,"tags":{...}`, as the ledger line writes them.
    pub ledger_members: String,
    /// Its metric series: one per project name for as long as anything holds it (see [`Metrics::series`]).
    pub series: Arc<ProjectSeries>,
    /// What its requests count against: itself and each of its tag values (none while no limit is configured).
    pub counted: Subjects,
}

impl Project {
    /// Whether this project may use `model`.
    pub fn allows_model(&self, model: &str) -> bool {
        self.models.is_empty() || self.models.iter().any(|m| m == model)
    }
}

/// A gateway key, known by its hash, with the projects it may use.
#[derive(Debug)]
pub struct Key {
    /// Name for logs and metrics.
    pub name: String,
    /// SHA-256 of the key.
    pub sha256: [u8; 32],
    /// The key's own project.
    pub project: Option<Arc<Project>>,
    /// Other projects it may ask for.
    pub may_select: Vec<Arc<Project>>,
    /// `"key":...`, as the access and ledger lines write it.
    pub member: String,
    /// What its requests count against (none while no limit is configured).
    pub counted: Option<Arc<Counted>>,
    /// What its requests to its own project count against: the project's subjects and its own, made once.
    pub counted_with_project: Subjects,
}

impl Key {
    /// Whether this key may send requests to `project` (one of the same snapshot's projects).
    pub fn may_use(&self, project: &Project) -> bool {
        let is = |p: &Arc<Project>| std::ptr::eq(&**p, project);
        self.project.as_ref().is_some_and(is) || self.may_select.iter().any(is)
    }
}

/// Everything a request needs that a reload may change.
#[derive(Debug)]
pub struct Snapshot {
    /// The validated config. Settings that only a restart changes hold the values in force.
    pub config: Config,
    /// Every project, in the config's order.
    pub projects: Vec<Arc<Project>>,
    /// Every key, in the config's order.
    pub keys: Vec<Arc<Key>>,
    /// Callers' keys by hash.
    pub callers: KeyTable,
    /// Project lookups and the fallback policy.
    pub attributor: Attributor,
    /// Route prefixes.
    pub routes: RouteTable,
    /// Prices by model.
    pub prices: PriceTable,
    /// The usage ledger, if one is configured.
    pub ledger: Option<Ledger>,
    /// What the gateway presents upstream.
    pub credential: Credential,
    /// The limits' store, the same for the process's life.
    pub limiter: Arc<Limiter>,
    /// Every subject with a rule, in the config's order.
    pub limited: Vec<Arc<Counted>>,
}

/// The access line's project members.
#[derive(Serialize)]
struct ProjectNames<'a> {
    project: &'a str,
    project_id: &'a str,
}

/// The ledger line's project members.
#[derive(Serialize)]
struct ProjectFields<'a> {
    project: &'a str,
    project_id: &'a str,
    tags: &'a BTreeMap<String, String>,
}

/// A key's member in the access and ledger lines.
#[derive(Serialize)]
struct KeyName<'a> {
    key: &'a str,
}

/// `{"a":1,"b":2}` -> `"a":1,"b":2`, for splicing into a larger object.
fn members_of(object: &impl Serialize) -> String {
    let text = serde_json::to_string(object).unwrap_or_else(|_| "{}".into());
    text[1..text.len() - 1].to_owned()
}

impl Snapshot {
    /// Links `config`'s keys, projects and routes, each project with the series `metrics` keeps under its name.
    /// Every project must have an id: a request can be attributed to any of them.
    pub fn build(
        config: Config,
        credential: Credential,
        ledger: Option<Ledger>,
        metrics: &Metrics,
    ) -> Result<Self, Vec<String>> {
        // An archived project takes no traffic (validation lets nothing name it), so needs no id and is not linked.
        let missing: Vec<&str> =
            config.projects.iter().filter(|p| p.id.is_none() && !p.archived).map(|p| p.name.as_str()).collect();
        if !missing.is_empty() {
            let mut problem = format!(
                "projects without an id cannot receive traffic: {} (run `mantlegate projects apply`, which creates \
                 them and records their ids in {} beside the config; or set each one's `id`, the proj_... id the \
                 Projects API gave it)",
                missing.join(", "),
                config::lock::FILE_NAME
            );
            if let Some(why) = &config.lock.ignored {
                problem.push_str(&format!("; {why}"));
            }
            return Err(vec![problem]);
        }
        let mut problems = Vec::new();
        // One `Counted` per subject, shared by every project with the same tag value. Nothing is counted while no
        // rule is configured.
        let rules = &config.limits.rules;
        let mut counted: BTreeMap<Subject, Arc<Counted>> = BTreeMap::new();
        let mut count = |subject: Subject| -> Option<Arc<Counted>> {
            if rules.is_empty() {
                return None;
            }
            let made = counted.entry(subject.clone()).or_insert_with(|| {
                let limits = rules.iter().find(|r| r.subject == subject).map(|r| r.limits.clone()).unwrap_or_default();
                Arc::new(Counted::new(subject, limits))
            });
            Some(made.clone())
        };
        let limited: Vec<Arc<Counted>> = rules.iter().filter_map(|r| count(r.subject.clone())).collect();
        let projects: Vec<Arc<Project>> = config
            .projects
            .iter()
            .filter(|p| !p.archived)
            .filter_map(|p| match Self::link_project(p, metrics, &mut count) {
                Ok(project) => Some(Arc::new(project)),
                Err(e) => {
                    problems.push(e);
                    None
                }
            })
            .collect();
        let by_name: HashMap<&str, &Arc<Project>> = projects.iter().map(|p| (p.name.as_str(), p)).collect();
        // Validation has checked every name; a miss here is a bug, reported rather than panicked on.
        let mut find = |name: &str| match by_name.get(name) {
            Some(p) => Some(Arc::clone(p)),
            None => {
                problems.push(format!("no project named {name:?}"));
                None
            }
        };
        let keys: Vec<Arc<Key>> = config
            .keys
            .iter()
            .map(|k| {
                let project = k.project.as_deref().and_then(&mut find);
                let counted_key = count(Subject::Key(k.name.clone()));
                Arc::new(Key {
                    name: k.name.clone(),
                    sha256: k.sha256,
                    project: project.clone(),
                    may_select: k.may_select.iter().filter_map(|p| find(p)).collect(),
                    member: members_of(&KeyName { key: &k.name }),
                    counted_with_project: {
                        let own = project.as_ref().map(|p| &p.counted[..]).unwrap_or_default();
                        own.iter().cloned().chain(counted_key.clone()).collect()
                    },
                    counted: counted_key,
                })
            })
            .collect();
        let routes = config.routes.iter().filter_map(|r| Some((r.prefix.clone(), find(&r.project)?))).collect();
        let default_project = config.attribution.default_project.as_deref().and_then(&mut find);
        let reroute = match &config.attribution.unattributed {
            Unattributed::Reject => None,
            Unattributed::Reroute(name) => find(name),
        };
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Self {
            callers: KeyTable::new(config.callers, &keys),
            attributor: Attributor::new(&projects, default_project, reroute),
            routes: RouteTable::new(routes),
            prices: PriceTable::new(&config.metering.prices),
            projects,
            keys,
            ledger,
            credential,
            limiter: Limiter::unshared(),
            limited,
            config,
        })
    }

    fn link_project(
        p: &config::Project,
        metrics: &Metrics,
        count: &mut impl FnMut(Subject) -> Option<Arc<Counted>>,
    ) -> Result<Project, String> {
        let id = p.id.clone().unwrap_or_default();
        let id_header =
            HeaderValue::from_str(&id).map_err(|_| format!("project {:?}: id {id:?} is not a header value", p.name))?;
        let series = metrics.series(&p.name);
        Ok(Project {
            access_members: members_of(&ProjectNames { project: &p.name, project_id: &id }),
            ledger_members: members_of(&ProjectFields { project: &p.name, project_id: &id, tags: &p.tags }),
            name: p.name.clone(),
            id,
            id_header,
            tags: p.tags.clone(),
            models: p.models.clone(),
            series,
            counted: std::iter::once(Subject::Project(p.name.clone()))
                .chain(p.tags.iter().map(|(k, v)| Subject::Tag(k.clone(), v.clone())))
                .filter_map(count)
                .collect(),
        })
    }

    /// The project named `name`.
    pub fn project(&self, name: &str) -> Option<&Arc<Project>> {
        self.projects.iter().find(|p| p.name == name)
    }

    /// The key named `name`.
    pub fn key(&self, name: &str) -> Option<&Arc<Key>> {
        self.keys.iter().find(|k| k.name == name)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A snapshot of `toml` (with no upstream credential or ledger), its series kept by `metrics`.
    pub(crate) fn snapshot_in(toml: &str, metrics: &Metrics) -> Snapshot {
        let config = Config::from_toml(toml).unwrap_or_else(|e| panic!("{e:#}"));
        Snapshot::build(config, Credential::Passthrough, None, metrics).unwrap_or_else(|e| panic!("{e:?}"))
    }

    /// A snapshot of `toml`, with metrics of its own.
    pub(crate) fn snapshot(toml: &str) -> Snapshot {
        snapshot_in(toml, &Metrics::new())
    }

    const CONFIG: &str = r#"
        [callers]
        auth = "keys"
        [[projects]]
        name = "A"
        id = "proj_a"
        tags = { Team = "t", "Cost Center" = "x\"y" }
        [[projects]]
        name = "B"
        id = "proj_b"
        [[keys]]
        name = "k"
        sha256 = "0000000000000000000000000000000000000000000000000000000000000000"
        project = "A"
        may_select = ["B"]
        [[routes]]
        prefix = "/b"
        project = "B"
    "#;

    #[test]
    fn keys_and_routes_point_at_the_snapshots_own_projects() {
        let s = snapshot(CONFIG);
        let (a, b) = (s.project("A").expect("A"), s.project("B").expect("B"));
        let key = s.key("k").expect("k");
        assert!(Arc::ptr_eq(key.project.as_ref().expect("own project"), a));
        assert!(key.may_use(a) && key.may_use(b));
        let other = snapshot(CONFIG);
        assert!(!key.may_use(other.project("A").expect("A")), "a project of another snapshot is not this one's");
        assert_eq!(key.member, r#""key":"k""#);
        assert_eq!(a.access_members, r#""project":"A","project_id":"proj_a""#);
        assert_eq!(a.ledger_members, r#""project":"A","project_id":"proj_a","tags":{"Cost Center":"x\"y","Team":"t"}"#);
        assert_eq!(a.id_header, "proj_a");
    }

    #[test]
    fn a_project_keeps_its_series_across_snapshots_while_it_keeps_its_name() {
        let metrics = Metrics::new();
        let first = snapshot_in(CONFIG, &metrics);
        let second = snapshot_in(&CONFIG.replace("name = \"B\"", "name = \"C\"").replace("\"B\"", "\"C\""), &metrics);
        let kept = |name: &str| {
            Arc::ptr_eq(&first.project(name).expect("first").series, &second.project(name).expect("second").series)
        };
        assert!(kept("A"));
        assert!(second.project("B").is_none() && second.project("C").is_some());
    }

    #[test]
    fn every_project_needs_an_id() {
        let config = Config::from_toml(&CONFIG.replace("id = \"proj_b\"\n", "")).expect("config");
        let problems = Snapshot::build(config, Credential::Passthrough, None, &Metrics::new()).expect_err("no id");
        assert_eq!(problems.len(), 1);
        assert!(problems[0].starts_with("projects without an id cannot receive traffic: B"), "{problems:?}");
        assert!(problems[0].contains("run `mantlegate projects apply`"), "{problems:?}");
    }

    #[test]
    fn an_archived_project_needs_no_id_and_is_not_routable() {
        let archived = format!("{CONFIG}\n[[projects]]\nname = \"Old\"\narchived = true\n");
        let s = snapshot(&archived);
        assert!(s.project("Old").is_none());
        assert_eq!(s.projects.len(), 2);
    }
}
