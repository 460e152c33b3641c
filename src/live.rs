//! Live configuration: the [`Snapshot`] in force behind one atomic pointer, and the [`Reloader`] that replaces
//! it when the config file changes (a `SIGHUP`, a change to the file or its directory, `POST /reload` on the
//! admin listener, or `mantlegate reload`).
//!
//! A reload reads the file (and the environment's overrides), validates all of it and builds the new snapshot
//! beside the one in force; only if every step succeeds is it swapped in, atomically. Requests that started
//! before keep the snapshot they loaded until they end. A config with problems is refused whole, every problem
//! logged, and the one in force keeps serving. Settings that cannot change in place (the listeners, the thread
//! count, the connection cap, the upstream's address) keep their running values, and a warning names them.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};

use crate::config::{self, Config};
use crate::metering::ledger::{Ledger, LedgerWriter};
use crate::metering::metrics::Metrics;
use crate::proxy::Credential;
use crate::snapshot::Snapshot;
use crate::watch::FileWatch;

/// The snapshot in force.
#[derive(Debug)]
pub struct Live(ArcSwap<Snapshot>);

impl Live {
    /// `snapshot` in force.
    pub fn new(snapshot: Snapshot) -> Self {
        Self(ArcSwap::from_pointee(snapshot))
    }

    /// The snapshot in force now, to hold for as long as a request (or anything else) needs one config.
    pub fn load(&self) -> Arc<Snapshot> {
        self.0.load_full()
    }
}

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Outcome {
    /// A new config is in force.
    Applied {
        /// Its file's SHA-256.
        sha256: String,
    },
    /// The file is the one in force.
    Unchanged {
        /// Its SHA-256.
        sha256: String,
    },
    /// The config in force stays; these are the reasons.
    Rejected {
        /// Every problem found.
        problems: Vec<String>,
    },
}

impl Outcome {
    /// `applied`, `unchanged` or `rejected`, as `mantlegate_config_reloads_total` labels it.
    pub fn result(&self) -> &'static str {
        match self {
            Self::Applied { .. } => "applied",
            Self::Unchanged { .. } => "unchanged",
            Self::Rejected { .. } => "rejected",
        }
    }
}

/// Replaces the snapshot in force with the config file's current content, one reload at a time.
#[derive(Debug)]
pub struct Reloader {
    /// The config file; none for a gateway started from a config given whole (the demo, tests).
    path: Option<PathBuf>,
    live: Arc<Live>,
    metrics: Arc<Metrics>,
    /// Where a reload that changes the upstream credential fetches the new one (reloads run off the async threads).
    runtime: tokio::runtime::Handle,
    state: Mutex<State>,
}

/// What the reloader owns besides the snapshot: held through each reload, so reloads never interleave.
#[derive(Debug, Default)]
struct State {
    /// The writers of the ledger in force and of those a reload moved away from that are still finishing the
    /// lines of requests that began before it; one per file.
    writers: Vec<LedgerWriter>,
    /// Re-reads the upstream key file in force.
    key_watch: Option<FileWatch>,
    /// Re-reads the config when its file, or the lock file beside it (`projects.lock.toml`), changes.
    config_watch: Vec<FileWatch>,
}

impl Reloader {
    /// Puts `config` in force: opens its ledger, starts watching its key file and (if `path` is given) the config
    /// file itself. Called on the runtime, which later reloads use to fetch a new upstream credential.
    pub fn start(
        path: Option<PathBuf>,
        config: Config,
        credential: Credential,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Arc<Self>> {
        // Read for each admin request; here, so that a token that cannot be read stops the start, not the probes.
        if let Some(token) = &config.server.admin_token {
            token.read()?;
        }
        let mut snapshot = Snapshot::build(config, credential, None, &metrics)
            .map_err(|problems| anyhow::anyhow!("{}", problems.join("; ")))?;
        // The limits' store lives as long as the process: a memory one starts from what the ledger says this
        // month (and minute) used, so a restart forgets no spend.
        let limits = &snapshot.config.limits;
        snapshot.limiter =
            crate::limits::Limiter::start(limits, snapshot.config.metering.ledger_path.as_deref(), metrics.limits())?;
        let (ledger, writer) = open_ledger(&snapshot.config, &metrics)?;
        snapshot.ledger = ledger;
        let key_watch = snapshot.credential.watch(&snapshot.config.upstream.auth, &metrics);
        metrics.publish(&snapshot.projects, &snapshot.config.sha256);
        let state = State { writers: writer.into_iter().collect(), key_watch, ..State::default() };
        let reloader = Arc::new(Self {
            path,
            live: Arc::new(Live::new(snapshot)),
            metrics,
            runtime: tokio::runtime::Handle::current(),
            state: Mutex::new(state),
        });
        let limiter = reloader.live.load().limiter.clone();
        limiter.spawn_sweeper(reloader.live.clone());
        if let Some(path) = &reloader.path {
            // The lock file is watched apart: `projects apply` may rewrite it alone. (In a Kubernetes volume both
            // change at once, with its `..data` swap.)
            let lock = config::lock::path_beside(path);
            for (path, what) in [(path.as_path(), "config file"), (lock.as_path(), "projects lock file")] {
                let watched = FileWatch::start(path, what, {
                    let reloader = Arc::downgrade(&reloader);
                    move || {
                        if let Some(reloader) = reloader.upgrade() {
                            reloader.reload_as(Trigger::Watch);
                        }
                    }
                });
                match watched {
                    Ok(watch) => reloader.lock().config_watch.push(watch),
                    Err(e) => tracing::warn!(
                        error = %e,
                        "the {what} will not be reloaded when it changes (SIGHUP and POST /reload still reload it)"
                    ),
                }
            }
        }
        Ok(reloader)
    }

    /// The snapshot in force, and what replaces it.
    pub fn live(&self) -> &Arc<Live> {
        &self.live
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether there is a config file to reload (not for a gateway started from a config given whole).
    pub fn reloadable(&self) -> bool {
        self.path.is_some()
    }

    /// Reloads the config file, as asked (SIGHUP, `POST /reload`, `mantlegate reload`): puts it in force if it is
    /// new and valid, and logs and counts what happened. It blocks (reading files, and fetching AWS credentials
    /// when the upstream credential changes): call it off the async threads, as [`Self::reload_blocking`] does.
    pub fn reload(&self) -> Outcome {
        self.reload_as(Trigger::Asked).unwrap_or_else(|| Outcome::Rejected {
            problems: vec!["this gateway was started without a config file, so there is nothing to reload".into()],
        })
    }

    /// Reloads the config file for `trigger`. The file watch sees each change as several events (a rename is
    /// three), and an editor's save may remove the file for a moment: for the watch, a missing file and a file
    /// that is the config in force are no reload at all (not counted, not logged at info).
    fn reload_as(&self, trigger: Trigger) -> Option<Outcome> {
        let path = self.path.as_deref()?;
        let mut state = self.lock();
        if trigger == Trigger::Watch && !path.exists() {
            tracing::debug!(path = %path.display(), "the config file is gone for now; waiting for it to come back");
            return None;
        }
        let current = self.live.load();
        let outcome = match self.prepare(path, &current, &state) {
            Ok(None) if trigger == Trigger::Watch => return None,
            Ok(None) => {
                tracing::info!(sha256 = %current.config.sha256, "config reload: the file is the config in force");
                Outcome::Unchanged { sha256: current.config.sha256.clone() }
            }
            Ok(Some(prepared)) => self.apply(&mut state, &current, prepared),
            Err(problems) => {
                for problem in &problems {
                    tracing::error!(problem = %problem, "config reload refused; the config in force stays");
                }
                Outcome::Rejected { problems }
            }
        };
        self.metrics.config_reload(outcome.result());
        Some(outcome)
    }

    /// The new snapshot, if the file holds a new config and every part of it works; none if it is the one in
    /// force.
    fn prepare(&self, path: &Path, current: &Snapshot, state: &State) -> Result<Option<Prepared>, Vec<String>> {
        let text = config::read_file(path).map_err(|e| vec![format!("{e:#}")])?;
        // The lock file beside it gives ids to projects without one: a change to either is a new config.
        let lock = config::lock::read_beside(path).map_err(|e| vec![format!("{e:#}")])?;
        let lock_sha256 = lock.as_ref().map(|l| l.sha256.clone());
        if config::sha256(&text) == current.config.sha256 && lock_sha256 == current.config.lock.sha256 {
            return Ok(None);
        }
        let mut config = Config::parse(&text, true).map_err(|e| match e.downcast::<config::ConfigErrors>() {
            Ok(errors) => errors.0,
            Err(e) => vec![format!("{e:#}")],
        })?;
        config::lock::apply(&mut config, lock).map_err(|e| vec![format!("{e:#}")])?;
        if let Some(token) = &config.server.admin_token {
            token.read().map_err(|e| vec![format!("{e:#}")])?;
        }
        let kept = keep_restart_only(&mut config, &current.config);
        let (new, old) = (&config.upstream, &current.config.upstream);
        let auth_changed = new.auth != old.auth || (new.auth.is_aws() && new.region != old.region);
        let credential = if auth_changed {
            // AWS credentials are fetched (from STS, say) before the reload is put in force, or refused with it.
            self.runtime.block_on(Credential::connect(new, &self.metrics)).map_err(|e| vec![format!("{e:#}")])?
        } else {
            current.credential.clone()
        };
        // The ledger in force, or one still finishing earlier requests' lines, is taken as it is: one writer per
        // file. A new one is opened last, once nothing else can fail.
        let path = config.metering.ledger_path.clone();
        let running = path.as_deref().and_then(|path| {
            current
                .ledger
                .clone()
                .filter(|l| l.path() == path)
                .or_else(|| state.writers.iter().filter(|w| w.path() == path).find_map(LedgerWriter::ledger))
        });
        let mut snapshot = Snapshot::build(config, credential, running, &self.metrics)?;
        snapshot.limiter = current.limiter.clone();
        let mut new_writer = None;
        if snapshot.ledger.is_none() && path.is_some() {
            let (ledger, writer) = open_ledger(&snapshot.config, &self.metrics).map_err(|e| vec![format!("{e:#}")])?;
            snapshot.ledger = ledger;
            new_writer = writer;
        }
        Ok(Some(Prepared { snapshot, kept, new_writer, auth_changed }))
    }

    /// Puts `prepared` in force.
    fn apply(&self, state: &mut State, current: &Snapshot, prepared: Prepared) -> Outcome {
        let Prepared { snapshot, kept, new_writer, auth_changed } = prepared;
        if auth_changed {
            state.key_watch = snapshot.credential.watch(&snapshot.config.upstream.auth, &self.metrics);
        }
        // Writers whose last requests have ended have stopped; a new one joins the rest.
        state.writers.retain(|w| !w.is_finished());
        state.writers.extend(new_writer);
        let changes = Changes::between(current, &snapshot);
        let sha256 = snapshot.config.sha256.clone();
        let snapshot = Arc::new(snapshot);
        // In force first, then exported: `/metrics` never shows a config before it serves.
        self.live.0.store(snapshot.clone());
        self.metrics.publish(&snapshot.projects, &sha256);
        tracing::info!(
            sha256 = %sha256,
            keys_added = %changes.keys_added.join(", "),
            keys_removed = %changes.keys_removed.join(", "),
            keys_changed = %changes.keys_changed.join(", "),
            projects_added = %changes.projects_added.join(", "),
            projects_removed = %changes.projects_removed.join(", "),
            projects_retagged = %changes.projects_retagged.join(", "),
            projects_changed = %changes.projects_changed.join(", "),
            routes_added = %changes.routes_added.join(", "),
            routes_removed = %changes.routes_removed.join(", "),
            settings = %changes.settings.join(", "),
            "config reloaded; new requests use it"
        );
        if !kept.is_empty() {
            tracing::warn!(
                settings = %kept.join(", "),
                "config reloaded, but these settings change only with a restart: the running values stay"
            );
        }
        Outcome::Applied { sha256 }
    }

    /// [`Self::reload`], off the async threads (it reads files, and may open a ledger).
    pub async fn reload_blocking(self: &Arc<Self>) -> Outcome {
        let reloader = self.clone();
        match tokio::task::spawn_blocking(move || reloader.reload()).await {
            Ok(outcome) => outcome,
            Err(e) => Outcome::Rejected { problems: vec![format!("the reload failed: {e}")] },
        }
    }

    /// Keeps the limits' settles not yet made, then writes out what every ledger holds and stops their writers,
    /// within `limit` (at shutdown, once every request has ended).
    pub async fn finish(&self, limit: Duration) {
        self.live.load().limiter.finish().await;
        let writers: Vec<LedgerWriter> = std::mem::take(&mut self.lock().writers);
        for writer in writers {
            writer.finish(limit).await;
        }
    }
}

/// What asked for a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trigger {
    /// SIGHUP, `POST /reload`, `mantlegate reload`.
    Asked,
    /// The file watch.
    Watch,
}

/// A reload that is ready to be put in force.
struct Prepared {
    snapshot: Snapshot,
    /// Restart-only settings the file changed, which keep their running values.
    kept: Vec<String>,
    /// The writer of a ledger the reload moved to (or opened).
    new_writer: Option<LedgerWriter>,
    /// Whether the upstream credential is a new one.
    auth_changed: bool,
}

/// Opens the ledger `config` names, if any.
fn open_ledger(config: &Config, metrics: &Metrics) -> anyhow::Result<(Option<Ledger>, Option<LedgerWriter>)> {
    match &config.metering.ledger_path {
        Some(path) => {
            let (ledger, writer) = Ledger::open(path, metrics.ledger_dropped())?;
            Ok((Some(ledger), Some(writer)))
        }
        None => Ok((None, None)),
    }
}

/// Gives `new` the running values of the settings only a restart changes, and names each one it changed.
fn keep_restart_only(new: &mut Config, running: &Config) -> Vec<String> {
    let mut kept = Vec::new();
    let mut keep = |name: &str, changed: bool| {
        if changed {
            kept.push(name.to_owned());
        }
    };
    keep("server.listen", new.server.listen != running.server.listen);
    new.server.listen = running.server.listen;
    keep("server.admin_listen", new.server.admin_listen != running.server.admin_listen);
    new.server.admin_listen = running.server.admin_listen;
    // "One per CPU" is one setting, however many CPUs the process may use now.
    let (new_per_cpu, running_per_cpu) = (new.server.workers_per_cpu, running.server.workers_per_cpu);
    keep(
        "server.workers",
        !(new_per_cpu && running_per_cpu)
            && (new_per_cpu != running_per_cpu || new.server.workers != running.server.workers),
    );
    new.server.workers = running.server.workers;
    new.server.workers_per_cpu = running_per_cpu;
    keep("server.max_connections", new.server.max_connections != running.server.max_connections);
    new.server.max_connections = running.server.max_connections;
    let upstream_moved =
        new.upstream.scheme != running.upstream.scheme || new.upstream.authority != running.upstream.authority;
    keep("upstream.base_url", upstream_moved);
    new.upstream.scheme = running.upstream.scheme.clone();
    new.upstream.authority = running.upstream.authority.clone();
    if upstream_moved {
        // Requests are signed for the region of the host they still go to, not the new host's.
        keep("upstream.region", new.upstream.region != running.upstream.region);
        new.upstream.region = running.upstream.region.clone();
    }
    // The counters stay where they are: a replica moving to another store would leave its reservations behind.
    keep("limits.backend", new.limits.backend != running.limits.backend);
    new.limits.backend = running.limits.backend.clone();
    keep("limits.instance", new.limits.instance != running.limits.instance);
    new.limits.instance = running.limits.instance.clone();
    keep("limits.backend_timeout", new.limits.backend_timeout != running.limits.backend_timeout);
    new.limits.backend_timeout = running.limits.backend_timeout;
    kept
}

/// What a reload changed, by name, for its log line.
#[derive(Debug, Default, PartialEq, Eq)]
struct Changes {
    keys_added: Vec<String>,
    keys_removed: Vec<String>,
    /// Same name, new hash or projects.
    keys_changed: Vec<String>,
    projects_added: Vec<String>,
    projects_removed: Vec<String>,
    /// Same name, new tags.
    projects_retagged: Vec<String>,
    /// Same name, new id or models.
    projects_changed: Vec<String>,
    /// `prefix -> project`.
    routes_added: Vec<String>,
    routes_removed: Vec<String>,
    /// The other sections that changed.
    settings: Vec<String>,
}

impl Changes {
    fn between(old: &Snapshot, new: &Snapshot) -> Self {
        let (o, n) = (&old.config, &new.config);
        let mut changes = Self::default();
        let key_of = |c: &Config, name: &str| c.keys.iter().find(|k| k.name == name).cloned();
        for k in &n.keys {
            match key_of(o, &k.name) {
                None => changes.keys_added.push(k.name.clone()),
                Some(old) if (old.sha256, &old.project, &old.may_select) != (k.sha256, &k.project, &k.may_select) => {
                    changes.keys_changed.push(k.name.clone());
                }
                Some(_) => {}
            }
        }
        changes.keys_removed = o.keys.iter().filter(|k| key_of(n, &k.name).is_none()).map(|k| k.name.clone()).collect();
        for p in &n.projects {
            match o.project(&p.name) {
                None => changes.projects_added.push(p.name.clone()),
                Some(old) => {
                    if old.tags != p.tags {
                        changes.projects_retagged.push(p.name.clone());
                    }
                    if (&old.id, &old.models) != (&p.id, &p.models) {
                        changes.projects_changed.push(p.name.clone());
                    }
                }
            }
        }
        changes.projects_removed =
            o.projects.iter().filter(|p| n.project(&p.name).is_none()).map(|p| p.name.clone()).collect();
        let routes =
            |c: &Config| -> Vec<String> { c.routes.iter().map(|r| format!("{} -> {}", r.prefix, r.project)).collect() };
        let (old_routes, new_routes) = (routes(o), routes(n));
        changes.routes_added = new_routes.iter().filter(|r| !old_routes.contains(r)).cloned().collect();
        changes.routes_removed = old_routes.iter().filter(|r| !new_routes.contains(r)).cloned().collect();
        let sections = [
            ("server", format!("{:?}", o.server) != format!("{:?}", n.server)),
            ("upstream", format!("{:?}", o.upstream) != format!("{:?}", n.upstream)),
            ("callers", o.callers != n.callers),
            ("attribution", o.attribution != n.attribution),
            ("taxonomy", format!("{:?}", o.taxonomy) != format!("{:?}", n.taxonomy)),
            ("metering", format!("{:?}", o.metering) != format!("{:?}", n.metering)),
        ];
        changes.settings =
            sections.into_iter().filter(|(_, changed)| *changed).map(|(name, _)| name.to_owned()).collect();
        changes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"
        [[projects]]
        name = "A"
        id = "proj_a"
        tags = { Team = "t" }
        [[projects]]
        name = "B"
        id = "proj_b"
        [[keys]]
        name = "k"
        sha256 = "0000000000000000000000000000000000000000000000000000000000000000"
        project = "A"
        [[keys]]
        name = "gone"
        sha256 = "1111111111111111111111111111111111111111111111111111111111111111"
        [[routes]]
        prefix = "/a"
        project = "A"
    "#;

    #[test]
    fn changes_are_named() {
        let old = crate::snapshot::tests::snapshot(CONFIG);
        let new = crate::snapshot::tests::snapshot(
            &(CONFIG
                .replace("Team = \"t\"", "Team = \"u\"")
                .replace("name = \"gone\"", "name = \"new\"")
                .replace("project = \"A\"\n        [[keys]]", "project = \"B\"\n        [[keys]]")
                .replace("prefix = \"/a\"", "prefix = \"/b\"")
                + "\n[[projects]]\nname = \"C\"\nid = \"proj_c\"\n[server]\nmax_body_bytes = 10\n"),
        );
        let changes = Changes::between(&old, &new);
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            changes,
            Changes {
                keys_added: names(&["new"]),
                keys_removed: names(&["gone"]),
                keys_changed: names(&["k"]),
                projects_added: names(&["C"]),
                projects_removed: vec![],
                projects_retagged: names(&["A"]),
                projects_changed: vec![],
                routes_added: names(&["/b -> A"]),
                routes_removed: names(&["/a -> A"]),
                settings: names(&["server"]),
            }
        );
    }

    #[test]
    fn restart_only_settings_keep_their_running_values_and_are_named() {
        let running = Config::from_toml(CONFIG).expect("config");
        let mut new = Config::from_toml(&format!(
            "[server]\nlisten = \"127.0.0.1:1\"\nworkers = 77\nmax_body_bytes = 10\n\
             [upstream]\nbase_url = \"https://elsewhere.example\"\nresponse_timeout = \"1s\"\n{CONFIG}"
        ))
        .expect("config");
        let kept = keep_restart_only(&mut new, &running);
        assert_eq!(kept, ["server.listen", "server.workers", "upstream.base_url"]);
        assert_eq!(
            (new.server.listen, new.server.workers, &new.upstream.authority),
            (running.server.listen, running.server.workers, &running.upstream.authority)
        );
        // What can change in place does.
        assert_eq!((new.server.max_body_bytes, new.upstream.response_timeout), (10, Duration::from_secs(1)));
    }

    /// A new host's region goes with the host: kept until a restart, or requests would be signed for one region
    /// and sent to another.
    #[test]
    fn a_region_that_follows_a_kept_base_url_is_kept_with_it() {
        let host = |region: &str| {
            format!("[upstream]\nbase_url = \"https://bedrock-mantle.{region}.api.aws\"\nauth = \"sigv4\"\n")
        };
        let running = Config::from_toml(&format!("{}{CONFIG}", host("us-east-1"))).expect("config");
        let mut new = Config::from_toml(&format!("{}{CONFIG}", host("us-west-2"))).expect("config");
        assert_eq!(new.upstream.region.as_deref(), Some("us-west-2"));
        let kept = keep_restart_only(&mut new, &running);
        assert_eq!(kept, ["upstream.base_url", "upstream.region"]);
        assert_eq!(
            (&new.upstream.authority, new.upstream.region.as_deref()),
            (&running.upstream.authority, Some("us-east-1"))
        );
    }
}
