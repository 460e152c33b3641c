//! The spend index behind the admin listener's spend page: this replica's usage ledger, summed per UTC hour,
//! project (with its tags), key and model, so that a page view or an API call adds up a few thousand sums
//! instead of re-reading a month of ledger lines.
//!
//! At start, the ledger's files of the month (the file in force and the rotated ones) are opened, the length of
//! the one in force noted, and a thread reads them into the index while the gateway serves; from then on every
//! request's [`Record`] that writes a ledger line adds to it as it ends (the index is a [`Sink`]). What was in the
//! files before the start is read, what came after is added: nothing twice, nothing missed. Lines a limit refused
//! (`refused_by`) are not spend and are left out, as `usage report` leaves them out; the sums are the report's.
//!
//! Each traffic thread adds to a shard of its own (a request locks nothing another thread holds, as the ledger's
//! buffers), and a query adds the shards up. A query first moves the sums of the hours that have ended out of the
//! traffic threads' shards into one of its own, so that a traffic thread never waits while a month is added up.
//! Costs are summed in picodollars (the ledger's precision), so the sums are exact. The index also counts every request (with its 4xx and 5xx answers) and the unattributed ones
//! (refused as `project_required`, or rerouted), which the ledger does not tell apart, for the page's live figures.
//! It keeps the month it started in and, from then on, the current month and the one before. A shard tells apart
//! [`MAX_MODELS`] model names; requests naming any further ones are summed as [`OTHER_MODELS`] (`usage report`
//! lists each: a caller may name any model, and the index must not grow with what callers make up).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use thread_local::ThreadLocal;

use crate::cli::usage::{GroupBy, Row};
use crate::limits::window::{Windows, rfc3339};
use crate::metering::ledger::read::{self, Line};
use crate::metering::usage::Usage;
use crate::record::{Followup, Record, Sink};

const HOUR_MS: u64 = 3_600_000;
const NONE: u32 = u32::MAX;

/// Distinct model names one shard tells apart; the requests of any further ones count as [`OTHER_MODELS`].
const MAX_MODELS: usize = 1000;
/// The model of requests past [`MAX_MODELS`].
pub const OTHER_MODELS: &str = "(other models)";

/// Lines read between two updates of the progress the page shows while the index is being built.
const PROGRESS_EVERY: u64 = 65_536;

/// What the index holds for one (hour, project, key, model).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Sums {
    requests: u64,
    input: u64,
    output: u64,
    cached_input: u64,
    reasoning: u64,
    /// Spend in picodollars (1e-12 USD, the ledger's precision).
    picos: u128,
    unpriced: u64,
    incomplete: u64,
    unmetered: u64,
}

impl Sums {
    /// One request's usage, counted as `usage report` counts its ledger line.
    fn add_request(&mut self, usage: &Usage, cost: Option<f64>, complete: bool, unmetered: bool) {
        self.requests += 1;
        // Counts are whatever the ledger says: sums saturate rather than overflow.
        self.input = self.input.saturating_add(usage.input);
        self.output = self.output.saturating_add(usage.output);
        self.cached_input = self.cached_input.saturating_add(usage.cached_input);
        self.reasoning = self.reasoning.saturating_add(usage.reasoning);
        match cost {
            Some(cost) => self.picos = self.picos.saturating_add(picos(cost)),
            None if usage.input > 0 || usage.output > 0 => self.unpriced += 1,
            None => {}
        }
        self.incomplete += u64::from(!complete);
        self.unmetered += u64::from(unmetered);
    }

    fn add(&mut self, other: &Self) {
        self.requests += other.requests;
        self.input = self.input.saturating_add(other.input);
        self.output = self.output.saturating_add(other.output);
        self.cached_input = self.cached_input.saturating_add(other.cached_input);
        self.reasoning = self.reasoning.saturating_add(other.reasoning);
        self.picos = self.picos.saturating_add(other.picos);
        self.unpriced += other.unpriced;
        self.incomplete += other.incomplete;
        self.unmetered += other.unmetered;
    }

    fn row(&self, group: String) -> Row {
        Row {
            group,
            requests: self.requests,
            input_tokens: self.input,
            output_tokens: self.output,
            cached_input_tokens: self.cached_input,
            reasoning_tokens: self.reasoning,
            cost_usd: usd(self.picos),
            unpriced_requests: self.unpriced,
            incomplete_requests: self.incomplete,
            unmetered_requests: self.unmetered,
        }
    }
}

/// A cost in USD as picodollars, rounded as the ledger writes it (to 1e-12); a cost that is no number, or
/// negative, counts nothing.
fn picos(cost: f64) -> u128 {
    // `as` saturates, and takes NaN to 0.
    (cost * 1e12).round() as u128
}

fn usd(picos: u128) -> f64 {
    picos as f64 / 1e12
}

/// Where a sum belongs: the hour, and the ids of its project, key and model in the shard that holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Cell {
    /// Hours since the epoch.
    hour: u32,
    project: u32,
    /// [`NONE`] for a request without a key.
    key: u32,
    /// [`NONE`] for a response that named no model.
    model: u32,
}

/// A project as the ledger lines name it: its name and the tags it had.
#[derive(Debug)]
struct ProjectTags {
    name: Box<str>,
    tags: BTreeMap<Box<str>, Box<str>>,
}

/// Strings each stored once, by id.
#[derive(Debug, Default)]
struct Names {
    ids: HashMap<Box<str>, u32>,
    names: Vec<Box<str>>,
}

impl Names {
    fn id(&mut self, name: &str) -> u32 {
        if let Some(&id) = self.ids.get(name) {
            return id;
        }
        let id = u32::try_from(self.names.len()).unwrap_or(NONE - 1);
        self.names.push(name.into());
        self.ids.insert(name.into(), id);
        id
    }

    fn get(&self, id: u32) -> Option<&str> {
        self.names.get(id as usize).map(|n| &**n)
    }
}

/// Requests nothing attributed, on one UTC day.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Unattributed {
    /// Refused with 403 `project_required`.
    pub rejected: u64,
    /// Sent to `attribution.reroute_to`.
    pub rerouted: u64,
}

/// Requests answered, with the 4xx and 5xx among them.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Answered {
    /// Every request the gateway answered.
    pub requests: u64,
    /// Answers 400 to 499 (refusals, the caller leaving: 499).
    pub client_errors: u64,
    /// Answers 500 and up (upstream failures and timeouts, the gateway's own).
    pub server_errors: u64,
}

/// One thread's sums (or the ledger's, as read at start).
#[derive(Debug, Default)]
struct Shard {
    projects: Vec<ProjectTags>,
    project_ids: HashMap<Box<str>, u32>,
    names: Names,
    /// How many model names `names` holds (at most [`MAX_MODELS`]).
    models: usize,
    cells: HashMap<Cell, Sums>,
    /// By day since the epoch.
    unattributed: BTreeMap<u32, Unattributed>,
    /// Since the start (the days above are pruned with the months).
    unattributed_since_start: Unattributed,
    answered: Answered,
    /// The first hour of the month after the latest one counted: a record at or past it starts a month, and the
    /// shard lets go of what it no longer keeps.
    next_month: u32,
    /// The first hour it keeps: sums of earlier hours are gone.
    kept_from: u32,
    /// A project's identity as text, built here to be looked up without allocating.
    scratch: String,
}

impl Shard {
    /// The id of project `name` with `tags`.
    fn project<'a>(&mut self, name: &str, tags: impl Iterator<Item = (&'a str, &'a str)> + Clone) -> u32 {
        let Self { scratch, project_ids, projects, .. } = self;
        scratch.clear();
        scratch.push_str(name);
        for (tag, value) in tags.clone() {
            for part in [tag, value] {
                scratch.push('\0');
                scratch.push_str(part);
            }
        }
        if let Some(&id) = project_ids.get(scratch.as_str()) {
            return id;
        }
        let id = u32::try_from(projects.len()).unwrap_or(NONE - 1);
        projects.push(ProjectTags { name: name.into(), tags: tags.map(|(t, v)| (t.into(), v.into())).collect() });
        project_ids.insert(scratch.as_str().into(), id);
        id
    }

    fn name_id(&mut self, name: Option<&str>) -> u32 {
        name.map_or(NONE, |n| self.names.id(n))
    }

    /// The id of model `name`: past [`MAX_MODELS`] distinct names, the id of [`OTHER_MODELS`] (a caller may name
    /// any model, even one upstream refuses, and the index must not grow with what callers make up).
    fn model_id(&mut self, name: Option<&str>) -> u32 {
        let Some(name) = name else { return NONE };
        if !self.names.ids.contains_key(name) {
            if self.models >= MAX_MODELS {
                return self.names.id(OTHER_MODELS);
            }
            self.models += 1;
        }
        self.names.id(name)
    }

    /// Drops the sums of the hours before `keep_from`.
    fn prune(&mut self, keep_from: u32) {
        if keep_from <= self.kept_from {
            return;
        }
        self.kept_from = keep_from;
        self.cells.retain(|cell, _| cell.hour >= keep_from);
        let keep_day = keep_from / 24;
        self.unattributed.retain(|&day, _| day >= keep_day);
    }

    /// The group a cell's sums go to.
    fn label<'a>(&'a self, cell: &Cell, group_by: &'a GroupBy) -> &'a str {
        let project = self.projects.get(cell.project as usize);
        match group_by {
            GroupBy::Project => project.map_or("", |p| &p.name),
            GroupBy::Model => self.names.get(cell.model).unwrap_or("(unknown)"),
            GroupBy::Key => self.names.get(cell.key).unwrap_or("(no key)"),
            GroupBy::Tag(tag) => project.and_then(|p| p.tags.get(tag.as_str())).map_or("(untagged)", |v| &**v),
        }
    }
}

/// How far the reading of the ledger at start has come.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum IndexState {
    /// No ledger is configured: there is no spend to show.
    NoLedger,
    /// Reading; the sums cover what was read and what ended since the start only once it is done.
    Reading {
        /// Lines read so far.
        lines: u64,
    },
    /// Read: the sums are the ledger's.
    Ready {
        /// Lines read at start.
        lines: u64,
        /// Lines that could not be read (torn, not JSON, no time), as `usage report` skips them.
        skipped: u64,
        /// How long reading them took, in milliseconds.
        took_ms: u64,
    },
    /// Reading failed; the page says so rather than show part of the month.
    Failed {
        /// Why.
        error: String,
    },
}

/// A range of hours to add up: from `since` (inclusive) to `until` (exclusive; none: no end).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hours {
    /// Hours since the epoch.
    pub since: u32,
    /// Hours since the epoch.
    pub until: Option<u32>,
}

impl Hours {
    fn contains(&self, hour: u32) -> bool {
        hour >= self.since && self.until.is_none_or(|until| hour < until)
    }
}

/// One UTC day's sums.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Day {
    /// `2026-12-01`.
    pub day: String,
    /// Requests.
    pub requests: u64,
    /// Input tokens (cached included).
    pub input_tokens: u64,
    /// Output tokens (reasoning included).
    pub output_tokens: u64,
    /// Spend in USD at configured prices.
    pub cost_usd: f64,
}

/// The spend index of one ledger. See the module's documentation.
#[derive(Debug)]
pub struct Spend {
    /// The ledger it follows; none if none is configured.
    path: Option<PathBuf>,
    /// Each traffic thread's sums of the requests that ended since the start.
    live: ThreadLocal<Mutex<Shard>>,
    /// The ledger's sums as read at start, in place once they are all read.
    indexed: Mutex<Shard>,
    /// The sums of the hours that have ended since the start, moved out of the traffic threads' shards by the
    /// queries (`fold`), so that a query reads only the current hour under a lock a traffic thread takes.
    folded: Mutex<Shard>,
    state: Mutex<IndexState>,
    progress: AtomicU64,
    /// The first hour of the month the process started in: nothing before it was read.
    first_hour: u32,
    /// When the index started.
    pub started: SystemTime,
}

/// Hours since the epoch of `time`.
fn hour_of(time: SystemTime) -> u32 {
    let ms = time.duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    u32::try_from(ms / HOUR_MS).unwrap_or(NONE - 1)
}

/// The hour of a ledger or record time (`2026-12-02T15:20:10.123Z`), read as `usage report` reads it.
fn hour_of_text(time: &str) -> Option<u32> {
    humantime::parse_rfc3339_weak(time).ok().map(hour_of)
}

/// The first hour of the month `hour` is in.
fn month_start(hour: u32) -> u32 {
    (Windows::at(u64::from(hour) * HOUR_MS).month_start_ms() / HOUR_MS) as u32
}

/// The first hour of the month after the one `hour` is in.
fn next_month(hour: u32) -> u32 {
    (Windows::at(u64::from(hour) * HOUR_MS).month_end_ms() / HOUR_MS) as u32
}

/// `2026-12-01T00:00:00Z` for an hour.
pub fn hour_text(hour: u32) -> String {
    rfc3339(u64::from(hour) * HOUR_MS)
}

impl Spend {
    /// An index of the ledger at `path` (none: no ledger, nothing to index), as of `now`. The files are opened
    /// here, before any request can add a line, and read on a thread of their own: call it before traffic starts.
    pub fn start(path: Option<&Path>, now: SystemTime) -> Arc<Self> {
        let first_hour = month_start(hour_of(now));
        let state = if path.is_some() { IndexState::Reading { lines: 0 } } else { IndexState::NoLedger };
        let spend = Arc::new(Self {
            path: path.map(Path::to_owned),
            live: ThreadLocal::new(),
            indexed: Mutex::new(Shard { next_month: next_month(first_hour), ..Shard::default() }),
            folded: Mutex::default(),
            state: Mutex::new(state),
            progress: AtomicU64::new(0),
            first_hour,
            started: now,
        });
        let Some(path) = path else { return spend };
        let files = match open_month(path, first_hour) {
            Ok(files) => files,
            Err(e) => {
                spend.failed(e);
                return spend;
            }
        };
        let spawned = std::thread::Builder::new().name("spend-index".into()).spawn({
            let spend = Arc::downgrade(&spend);
            move || {
                let began = Instant::now();
                let mut shard = Shard::default();
                let read = read_files(files, first_hour, &mut shard, |lines| {
                    if let Some(spend) = spend.upgrade() {
                        spend.progress.store(lines, Ordering::Relaxed);
                    }
                });
                let Some(spend) = spend.upgrade() else { return };
                match read {
                    Ok((lines, skipped)) => {
                        let took_ms = u64::try_from(began.elapsed().as_millis()).unwrap_or(u64::MAX);
                        shard.next_month = next_month(first_hour);
                        *lock(&spend.indexed) = shard;
                        tracing::info!(lines, skipped, took_ms, "spend index: the ledger is read");
                        *lock(&spend.state) = IndexState::Ready { lines, skipped, took_ms };
                    }
                    Err(e) => spend.failed(e),
                }
            }
        });
        if let Err(e) = spawned {
            spend.failed(anyhow::anyhow!("starting the spend index's reader: {e}"));
        }
        spend
    }

    fn failed(&self, e: anyhow::Error) {
        tracing::error!(error = %format!("{e:#}"), "spend index: the ledger cannot be read; the spend page shows nothing");
        *lock(&self.state) = IndexState::Failed { error: format!("{e:#}") };
    }

    /// The ledger it follows.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// How far reading the ledger has come.
    pub fn state(&self) -> IndexState {
        match &*lock(&self.state) {
            IndexState::Reading { .. } => IndexState::Reading { lines: self.progress.load(Ordering::Relaxed) },
            other => other.clone(),
        }
    }

    /// The first hour the index holds at `now`: the month the process started in, or the month before `now`'s,
    /// whichever is later.
    pub fn first_hour(&self, now: SystemTime) -> u32 {
        let previous = month_start(month_start(hour_of(now)).saturating_sub(1));
        self.first_hour.max(previous)
    }

    /// Calls `each` with every shard, the one read at start first, each pruned to what the index keeps at `now`.
    fn for_each_shard(&self, now: SystemTime, mut each: impl FnMut(&Shard)) {
        let keep_from = self.first_hour(now);
        let mut indexed = lock(&self.indexed);
        indexed.prune(keep_from);
        each(&indexed);
        drop(indexed);
        // Held until the traffic threads' shards are read too: another query's fold cannot move sums from one to
        // the other between the two reads.
        let mut folded = lock(&self.folded);
        self.fold(&mut folded, hour_of(now));
        folded.prune(keep_from);
        each(&folded);
        for shard in self.live.iter() {
            each(&lock(shard));
        }
    }

    /// Moves the sums of the hours before `hour` out of the traffic threads' shards into `folded`: a traffic
    /// thread waits only while its few finished cells are taken out, once an hour, never while a query adds up.
    fn fold(&self, folded: &mut Shard, hour: u32) {
        for shard in self.live.iter() {
            let mut live = lock(shard);
            if !live.cells.keys().any(|cell| cell.hour < hour) {
                continue;
            }
            let ended: Vec<(Cell, Sums)> = live.cells.extract_if(|cell, _| cell.hour < hour).collect();
            let moved: Vec<_> = ended
                .into_iter()
                .map(|(cell, sums)| {
                    let project = live.projects.get(cell.project as usize);
                    let name = project.map_or_else(Box::default, |p| p.name.clone());
                    let tags = project.map(|p| p.tags.clone()).unwrap_or_default();
                    let key: Option<Box<str>> = live.names.get(cell.key).map(Into::into);
                    let model: Option<Box<str>> = live.names.get(cell.model).map(Into::into);
                    (cell.hour, name, tags, key, model, sums)
                })
                .collect();
            drop(live);
            for (hour, name, tags, key, model, sums) in moved {
                let project = folded.project(&name, tags.iter().map(|(t, v)| (&**t, &**v)));
                let key = folded.name_id(key.as_deref());
                let model = folded.model_id(model.as_deref());
                folded.cells.entry(Cell { hour, project, key, model }).or_default().add(&sums);
            }
        }
    }

    /// Totals per group over `hours`, most expensive first (as `usage report` sorts them), and their sum.
    pub fn rows(&self, group_by: &GroupBy, hours: Hours, now: SystemTime) -> (Vec<Row>, Row) {
        let mut groups: HashMap<String, Sums> = HashMap::new();
        self.for_each_shard(now, |shard| {
            // By cell ids first (no string work per cell), then by label.
            let mut by_label: HashMap<&str, Sums> = HashMap::new();
            for (cell, sums) in shard.cells.iter().filter(|(cell, _)| hours.contains(cell.hour)) {
                by_label.entry(shard.label(cell, group_by)).or_default().add(sums);
            }
            for (label, sums) in by_label {
                match groups.get_mut(label) {
                    Some(group) => group.add(&sums),
                    None => {
                        groups.insert(label.to_owned(), sums);
                    }
                }
            }
        });
        let mut total = Sums::default();
        let mut rows: Vec<Row> = groups
            .into_iter()
            .map(|(group, sums)| {
                total.add(&sums);
                sums.row(group)
            })
            .collect();
        rows.sort_by(|a, b| b.cost_usd.total_cmp(&a.cost_usd).then_with(|| a.group.cmp(&b.group)));
        (rows, total.row("total".into()))
    }

    /// Each UTC day of `hours` (which must end) with its sums, days without any included.
    pub fn daily(&self, hours: Hours, now: SystemTime) -> Vec<Day> {
        let (first, last) = (hours.since / 24, hours.until.unwrap_or(hours.since + 1).saturating_sub(1) / 24);
        let mut days = vec![Sums::default(); (last + 1).saturating_sub(first) as usize];
        self.for_each_shard(now, |shard| {
            for (cell, sums) in shard.cells.iter().filter(|(cell, _)| hours.contains(cell.hour)) {
                if let Some(day) = days.get_mut((cell.hour / 24 - first) as usize) {
                    day.add(sums);
                }
            }
        });
        (first..)
            .zip(days)
            .map(|(day, sums)| Day {
                day: hour_text(day * 24)[..10].to_owned(),
                requests: sums.requests,
                input_tokens: sums.input,
                output_tokens: sums.output,
                cost_usd: usd(sums.picos),
            })
            .collect()
    }

    /// Every request answered since the start.
    pub fn answered(&self) -> Answered {
        let mut all = Answered::default();
        for shard in self.live.iter() {
            let a = lock(shard).answered;
            all.requests += a.requests;
            all.client_errors += a.client_errors;
            all.server_errors += a.server_errors;
        }
        all
    }

    /// Requests nothing attributed since the start, and on the UTC day of `now`.
    pub fn unattributed(&self, now: SystemTime) -> (Unattributed, Unattributed) {
        let today = hour_of(now) / 24;
        let (mut since_start, mut on_day) = (Unattributed::default(), Unattributed::default());
        for shard in self.live.iter() {
            let shard = lock(shard);
            since_start.rejected += shard.unattributed_since_start.rejected;
            since_start.rerouted += shard.unattributed_since_start.rerouted;
            if let Some(u) = shard.unattributed.get(&today) {
                on_day.rejected += u.rejected;
                on_day.rerouted += u.rerouted;
            }
        }
        (since_start, on_day)
    }

    /// Whether `record`'s ledger line goes to the ledger this index follows.
    fn follows(&self, record: &Record) -> bool {
        match (&self.path, &record.snapshot.ledger) {
            (Some(path), Some(ledger)) => path.as_os_str() == ledger.path().as_os_str(),
            _ => false,
        }
    }
}

impl Sink for Spend {
    fn record(&self, r: &Record) -> Option<Followup> {
        let mut shard = lock(self.live.get_or_default());
        shard.answered.requests += 1;
        match r.status {
            400..=499 => shard.answered.client_errors += 1,
            500.. => shard.answered.server_errors += 1,
            _ => {}
        }
        let hour = hour_of_text(r.time.as_str())?;
        if hour >= shard.next_month {
            // A month has begun: what is before the month before it is no longer kept.
            shard.next_month = next_month(hour);
            let keep_from = self.first_hour.max(month_start(month_start(hour).saturating_sub(1)));
            shard.prune(keep_from);
        }
        let rerouted = matches!(&r.project, Some((_, crate::attribution::Source::Rerouted)));
        let rejected = r.project.is_none() && r.error == Some(crate::error::GatewayError::ProjectRequired.code());
        if rerouted || rejected {
            let day = shard.unattributed.entry(hour / 24).or_default();
            day.rerouted += u64::from(rerouted);
            day.rejected += u64::from(rejected);
            shard.unattributed_since_start.rerouted += u64::from(rerouted);
            shard.unattributed_since_start.rejected += u64::from(rejected);
        }
        // As the ledger sink writes a line: for a request upstream answered, under a ledger, with a project.
        let Some((project, _)) = &r.project else { return None };
        if !r.forwarded || r.refused_by.is_some() || !self.follows(r) {
            return None;
        }
        let project = shard.project(&project.name, project.tags.iter().map(|(t, v)| (t.as_str(), v.as_str())));
        let key = shard.name_id(r.key.as_ref().map(|k| k.name.as_str()));
        let model = shard.model_id(r.model.as_deref());
        let usage = r.usage.unwrap_or_default();
        shard.cells.entry(Cell { hour, project, key, model }).or_default().add_request(
            &usage,
            r.cost,
            r.complete,
            r.unmetered.is_some(),
        );
        None
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A ledger file to read: the whole of a rotated one, the file in force up to its length at start.
struct Opened {
    path: PathBuf,
    file: File,
    len: u64,
}

/// Opens the ledger's files that may hold lines of the month starting at `first_hour`: the file in force, and
/// those rotated from the day before that month on (a batch begun just before midnight goes to the old day's
/// file). A ledger that is no regular file (a pipe, `/dev/stdout`) has nothing to read back.
fn open_month(path: &Path, first_hour: u32) -> anyhow::Result<Vec<Opened>> {
    if std::fs::metadata(path).is_ok_and(|m| !m.is_file()) {
        return Ok(Vec::new());
    }
    let mut opened = Vec::new();
    for file in read::files_from(path, &hour_text(first_hour)[..10]).into_iter().filter(|f| f.is_file()) {
        let handle = match File::open(&file) {
            Ok(handle) => handle,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => anyhow::bail!("cannot open {}: {e}", file.display()),
        };
        let len = handle.metadata().map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?.len();
        opened.push(Opened { path: file, file: handle, len });
    }
    Ok(opened)
}

/// Reads `files` into `shard` (the lines from `first_hour` on), reporting the lines read now and then; returns
/// the lines read and those skipped.
fn read_files(
    files: Vec<Opened>,
    first_hour: u32,
    shard: &mut Shard,
    progress: impl Fn(u64),
) -> anyhow::Result<(u64, u64)> {
    let (mut lines, mut skipped) = (0u64, 0u64);
    let mut text = Vec::with_capacity(4096);
    for Opened { path, file, len } in files {
        let mut reader = BufReader::with_capacity(1 << 20, file.take(len));
        loop {
            text.clear();
            // Split on newline bytes, not as UTF-8 text, as `usage report` does: a line torn inside a character
            // is one unreadable line, and the lines after it are still read.
            let n =
                reader.read_until(b'\n', &mut text).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
            if n == 0 {
                break;
            }
            lines += 1;
            if lines % PROGRESS_EVERY == 0 {
                progress(lines);
            }
            if !add_line(shard, &text, first_hour) {
                skipped += 1;
            }
        }
    }
    Ok((lines, skipped))
}

/// Adds one ledger line to `shard` if it is from `first_hour` on; false if it could not be read.
fn add_line(shard: &mut Shard, text: &[u8], first_hour: u32) -> bool {
    if text.iter().all(u8::is_ascii_whitespace) {
        return true;
    }
    let Some(line) = Line::parse(text) else { return false };
    if line.refused_by.is_some() {
        return true;
    }
    let Some(hour) = line.time().map(hour_of) else { return false };
    if hour < first_hour {
        return true;
    }
    let project = shard.project(&line.project, line.tags.iter().map(|(t, v)| (&**t, &**v)));
    let key = shard.name_id(line.key.as_deref());
    let model = shard.model_id(line.model.as_deref());
    let usage = Usage {
        input: line.input_tokens,
        output: line.output_tokens,
        cached_input: line.cached_input_tokens,
        reasoning: line.reasoning_tokens,
    };
    shard.cells.entry(Cell { hour, project, key, model }).or_default().add_request(
        &usage,
        line.cost_usd,
        line.complete,
        line.unmetered.is_some(),
    );
    true
}

#[cfg(test)]
pub(crate) mod tests;
