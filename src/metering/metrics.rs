//! Prometheus metrics, served as OpenMetrics text on the admin listener's `/metrics`. Built on
//! `prometheus-client`, the Prometheus project's own Rust client: typed label sets and no global registry.
//!
//! Series are keyed by their label values, never by a position in the config. What is counted per project lives
//! in the project's [`ProjectSeries`], which a reload carries over to the new snapshot while the project keeps
//! its name; `/metrics` exports the series of the projects in the snapshot in force (and of requests with no
//! project), so a project removed by a reload stops being exported, and `mantlegate_project_info` always shows
//! the tags in force. Within a project, the series of an endpoint, status, model or reason are made on first use
//! and found again without a lock (a copy-on-write list read through one atomic load).

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};

use arc_swap::ArcSwap;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::Unmetered;
use super::usage::Usage;
use crate::endpoint::Endpoint;
use crate::projects::drift::Status;
use crate::record::{Followup, Record, Sink};
use crate::snapshot::Project;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

type CostCounter = Counter<f64, AtomicU64>;

fn latency_histogram() -> Histogram {
    // 1 ms to ~8.7 min: gateway rejections at the bottom, long reasoning streams at the top.
    Histogram::new(exponential_buckets(0.001, 2.0, 20))
}

/// A short list keyed by label value, read without a lock and copied to add an entry (which happens once per
/// label value for the process's life).
#[derive(Debug)]
struct ReadMostly<K, V>(ArcSwap<Entries<K, V>>);

type Entries<K, V> = Vec<(K, Arc<V>)>;

impl<K, V> Default for ReadMostly<K, V> {
    fn default() -> Self {
        Self(ArcSwap::from_pointee(Vec::new()))
    }
}

impl<K: Clone, V> ReadMostly<K, V> {
    /// Calls `f` with the entry for `key`, made by `make` if there is none yet.
    fn with<Q>(&self, key: &Q, make: impl FnOnce() -> (K, V), f: impl FnOnce(&V))
    where
        K: std::borrow::Borrow<Q>,
        Q: PartialEq + ?Sized,
    {
        // Read through the guard: cloning an entry's Arc would write its shared count.
        if let Some((_, v)) = self.0.load().iter().find(|(k, _)| k.borrow() == key) {
            return f(v);
        }
        let (new_key, value) = make();
        let value = Arc::new(value);
        // Racing requests may both get here: whichever adds its entry first, both count on that one.
        let mut found = None;
        self.0.rcu(|list| {
            let mut list = Vec::clone(list);
            match list.iter().find(|(k, _)| k.borrow() == key) {
                Some((_, v)) => found = Some(v.clone()),
                None => {
                    list.push((new_key.clone(), value.clone()));
                    found = Some(value.clone());
                }
            }
            list
        });
        if let Some(v) = found {
            f(&v);
        }
    }

    fn entries(&self) -> arc_swap::Guard<Arc<Entries<K, V>>> {
        self.0.load()
    }
}

/// One project and endpoint's series.
#[derive(Debug)]
struct EndpointSeries {
    duration: Histogram,
    ttfb: Histogram,
    statuses: ReadMostly<u16, Counter>,
    unmetered: ReadMostly<Unmetered, Counter>,
}

/// One project and model's token and cost series.
#[derive(Debug, Default)]
struct ModelSeries {
    input: Counter,
    output: Counter,
    cached_input: Counter,
    reasoning: Counter,
    cost: OnceLock<CostCounter>,
    unpriced: OnceLock<Counter>,
}

impl ModelSeries {
    /// Counts `usage`, and its cost if the model had a price.
    fn add(&self, usage: Usage, cost: Option<f64>) {
        self.input.inc_by(usage.input);
        self.output.inc_by(usage.output);
        self.cached_input.inc_by(usage.cached_input);
        self.reasoning.inc_by(usage.reasoning);
        match cost {
            Some(cost) => {
                self.cost.get_or_init(CostCounter::default).inc_by(cost);
            }
            None => {
                self.unpriced.get_or_init(Counter::default).inc();
            }
        }
    }
}

/// What is counted for one project (or for requests that have none), labelled with its name.
#[derive(Debug)]
pub struct ProjectSeries {
    project: Arc<str>,
    endpoints: [OnceLock<EndpointSeries>; Endpoint::ALL.len()],
    /// By model (`unknown` for a response that names none; such a response is never priced).
    models: ReadMostly<Arc<str>, ModelSeries>,
}

impl ProjectSeries {
    /// No series yet, for the project named `project`.
    pub fn new(project: &str) -> Self {
        Self {
            project: project.into(),
            endpoints: std::array::from_fn(|_| OnceLock::new()),
            models: ReadMostly::default(),
        }
    }

    /// Counts a finished request to `endpoint`.
    fn observe(&self, endpoint: Endpoint, r: &Record) {
        let series = self.endpoints[endpoint.index()].get_or_init(|| EndpointSeries {
            duration: latency_histogram(),
            ttfb: latency_histogram(),
            statuses: ReadMostly::default(),
            unmetered: ReadMostly::default(),
        });
        series.statuses.with(
            &r.status,
            || (r.status, Counter::default()),
            |c| {
                c.inc();
            },
        );
        series.duration.observe(r.duration.as_secs_f64());
        if let Some(ttfb) = r.ttfb {
            series.ttfb.observe(ttfb.as_secs_f64());
        }
        if let Some(reason) = r.unmetered {
            series.unmetered.with(
                &reason,
                || (reason, Counter::default()),
                |c| {
                    c.inc();
                },
            );
        }
        let Some(usage) = r.usage else { return };
        let model = r.model.as_deref().unwrap_or("unknown");
        self.models.with(model, || (model.into(), ModelSeries::default()), |m| m.add(usage, r.cost));
    }

    /// Each endpoint that has series, with them.
    fn endpoints(&self) -> impl Iterator<Item = (&'static str, &EndpointSeries)> {
        Endpoint::ALL.iter().zip(&self.endpoints).filter_map(|(e, s)| Some((e.name(), s.get()?)))
    }
}

/// The series `/metrics` exports per project: those of the projects in force, and of requests with none; and
/// the config in force's hash, published with them in one store.
#[derive(Debug)]
struct ProjectsExport {
    current: ArcSwap<Exported>,
    none: Arc<ProjectSeries>,
    /// Each project name's series, while anything holds them: a project removed by a reload and added back by
    /// the next keeps its counts (and takes the counts of requests still running under the config between).
    series: Mutex<HashMap<String, Weak<ProjectSeries>>>,
}

/// What a config in force exports.
#[derive(Debug, Default)]
struct Exported {
    projects: Vec<Arc<Project>>,
    sha256: String,
}

/// Every metric the gateway exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    unattributed: Family<OutcomeLabels, Counter>,
    ledger_dropped: Counter,
    key_reloads: Family<ResultLabels, Counter>,
    config_reloads: Family<ResultLabels, Counter>,
    upstream_auth_failures: Counter,
    aws_credentials: AwsCredentialMetrics,
    projects: Arc<ProjectsExport>,
    upstream_statuses: Arc<UpstreamStatuses>,
    limits: LimitCounters,
    reconcile_rows: Arc<ReconcileRows>,
    reconcile_runs: Family<ResultLabels, Counter>,
    reconcile_last_success: Gauge,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RejectionLabels {
    project: String,
    subject: String,
    limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabels {
    operation: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    decision: &'static str,
}

/// What limits report: refusals, the store's health, reservations in flight, and every limit's use as last read.
#[derive(Debug, Clone, Default)]
pub struct LimitCounters {
    rejections: Family<RejectionLabels, Counter>,
    backend_errors: Family<OperationLabels, Counter>,
    decisions: Family<DecisionLabels, Counter>,
    backend_up: Gauge,
    settles_dropped: Counter,
    /// Reservations this replica holds.
    pub in_flight: Gauge,
    statuses: Arc<LimitStatuses>,
}

impl LimitCounters {
    /// A request of `project` refused by `subject`'s `limit`.
    pub fn rejected(&self, project: &str, subject: &str, limit: &'static str) {
        let labels = RejectionLabels { project: project.to_owned(), subject: subject.to_owned(), limit };
        self.rejections.get_or_create(&labels).inc();
    }

    /// The store failed an `operation` (admit, settle, sweep, seed).
    pub fn backend_error(&self, operation: &'static str) {
        self.backend_errors.get_or_create(&OperationLabels { operation }).inc();
    }

    /// A request came while the store could not be reached, and was `allowed` or `denied`.
    pub fn backend_decision(&self, decision: &'static str) {
        self.decisions.get_or_create(&DecisionLabels { decision }).inc();
    }

    /// Whether the store answers.
    pub fn backend_up(&self, up: bool) {
        self.backend_up.set(i64::from(up));
    }

    /// A settle kept for replay was dropped (too many kept, kept too long, refused too often, or left at shutdown
    /// with nowhere to keep it).
    pub fn settle_dropped(&self) {
        self.settles_dropped.inc();
    }

    /// From now on, exports these limits' values and use.
    pub fn statuses(&self, statuses: Vec<crate::limits::Status>) {
        self.statuses.0.store(Arc::new(statuses));
    }
}

/// Every limit's value and use, as last read from the store, replaced whole by each read.
#[derive(Debug, Default)]
struct LimitStatuses(ArcSwap<Vec<crate::limits::Status>>);

const LIMIT_GAUGES: [Descriptor; 3] = [
    Descriptor {
        name: "limit",
        help: "Each configured limit's value (USD for usd_per_day and usd_per_month)",
        kind: MetricType::Gauge,
    },
    Descriptor {
        name: "limit_used",
        help: "What each limit's current window has used or reserved, across replicas, at the last read (every second)",
        kind: MetricType::Gauge,
    },
    Descriptor { name: "limit_remaining", help: "What each limit's current window has left", kind: MetricType::Gauge },
];

impl Collector for LimitStatuses {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let statuses = self.0.load();
        if statuses.is_empty() {
            return Ok(());
        }
        for (i, d) in LIMIT_GAUGES.iter().enumerate() {
            let mut metric = encoder.encode_descriptor(d.name, d.help, None, d.kind)?;
            for s in statuses.iter() {
                let value = [s.max, s.used, s.remaining][i];
                let labels = [("subject", s.subject.as_str()), ("limit", s.limit)];
                metric.encode_family(&labels)?.encode_gauge(&value)?;
            }
        }
        Ok(())
    }
}

/// The last statuses the projects check found upstream (see `projects::drift`), by project name, in the config's
/// order: replaced whole by each check, so a scrape never sees half of one.
#[derive(Debug, Default)]
struct UpstreamStatuses(ArcSwap<Vec<(String, Status)>>);

const UPSTREAM_STATUS: Descriptor = Descriptor {
    name: "project_upstream_status",
    help: "Each configured project's status upstream at the last projects check: 1 for the status it is in, 0 for \
           the others (active, archived, missing, tags_drifted)",
    kind: MetricType::Gauge,
};

impl Collector for UpstreamStatuses {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let statuses = self.0.load();
        if statuses.is_empty() {
            return Ok(());
        }
        let d = &UPSTREAM_STATUS;
        let mut metric = encoder.encode_descriptor(d.name, d.help, None, d.kind)?;
        for (project, status) in statuses.iter() {
            for each in Status::ALL {
                let labels = [("project", project.as_str()), ("status", each.name())];
                metric.encode_family(&labels)?.encode_gauge(&i64::from(each == *status))?;
            }
        }
        Ok(())
    }
}

/// The rows of the last scheduled reconciliation with CloudWatch (see `reconcile::schedule`): replaced whole by
/// each run, so a scrape never sees half of one.
#[derive(Debug, Default)]
struct ReconcileRows(ArcSwap<Vec<crate::reconcile::compare::Row>>);

const RECONCILE_TOKENS: Descriptor = Descriptor {
    name: "reconcile_tokens",
    help: "Tokens over the last scheduled reconciliation's window, per project and model (model \"*\": every model), \
           as the gateway's ledger (source=\"gateway\") and CloudWatch AWS/BedrockMantle (source=\"aws\") count them",
    kind: MetricType::Gauge,
};

const RECONCILE_VERDICT: Descriptor = Descriptor {
    name: "reconcile_verdict",
    help: "Each row's verdict at the last scheduled reconciliation: 1 for the verdict it has, 0 for the others (ok, \
           bypass, missing, unattributed)",
    kind: MetricType::Gauge,
};

impl Collector for ReconcileRows {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use crate::reconcile::compare::Verdict;
        let rows = self.0.load();
        if rows.is_empty() {
            return Ok(());
        }
        let gauge = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        let d = &RECONCILE_TOKENS;
        let mut metric = encoder.encode_descriptor(d.name, d.help, None, d.kind)?;
        for r in rows.iter() {
            for (source, tokens) in [("gateway", r.gateway), ("aws", r.aws)] {
                for (kind, n) in [("input", tokens.input), ("output", tokens.output)] {
                    let labels = [
                        ("project", r.project.as_str()),
                        ("model", r.model.as_str()),
                        ("source", source),
                        ("kind", kind),
                    ];
                    metric.encode_family(&labels)?.encode_gauge(&gauge(n))?;
                }
            }
        }
        let d = &RECONCILE_VERDICT;
        let mut metric = encoder.encode_descriptor(d.name, d.help, None, d.kind)?;
        for r in rows.iter() {
            for each in Verdict::ALL {
                let labels = [("project", r.project.as_str()), ("model", r.model.as_str()), ("verdict", each.name())];
                metric.encode_family(&labels)?.encode_gauge(&i64::from(each == r.verdict))?;
            }
        }
        Ok(())
    }
}

/// What the AWS credential refresher reports: each fetch's result, and when the credentials in hand expire.
#[derive(Debug, Clone, Default)]
pub struct AwsCredentialMetrics {
    refreshes: Family<ResultLabels, Counter>,
    expiry: Gauge,
}

impl AwsCredentialMetrics {
    /// Credentials were fetched; they expire at `expiry` (if ever).
    pub fn refreshed(&self, expiry: Option<std::time::SystemTime>) {
        self.refreshes.get_or_create(&ResultLabels { result: "ok" }).inc();
        let at = expiry.and_then(|at| at.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_secs());
        self.expiry.set(i64::try_from(at).unwrap_or(i64::MAX));
    }

    /// A fetch failed; the credentials in hand stay.
    pub fn failed(&self) {
        self.refreshes.get_or_create(&ResultLabels { result: "failed" }).inc();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric; no project is exported until [`Self::publish`].
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("mantlegate");
        let unattributed = Family::<OutcomeLabels, Counter>::default();
        registry.register("unattributed", "Requests nothing attributed: rejected or rerouted", unattributed.clone());
        let ledger_dropped = Counter::default();
        registry.register(
            "ledger_dropped",
            "Ledger lines dropped because the writer fell behind",
            ledger_dropped.clone(),
        );
        let key_reloads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "upstream_key_reloads",
            "Re-reads of upstream.api_key_file that changed the key or failed (the old key stays)",
            key_reloads.clone(),
        );
        let config_reloads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "config_reloads",
            "Config reloads: applied, rejected (the config in force stays) or unchanged",
            config_reloads.clone(),
        );
        let upstream_auth_failures = Counter::default();
        registry.register(
            "upstream_auth_failures",
            "Upstream answers that refused the gateway's own credential (401 or 403); callers got 502 upstream_auth_failed",
            upstream_auth_failures.clone(),
        );
        let aws_credentials = AwsCredentialMetrics::default();
        registry.register(
            "aws_credential_refreshes",
            "Fetches of AWS credentials from the chain (upstream.auth sigv4 or aws_token), by result",
            aws_credentials.refreshes.clone(),
        );
        registry.register(
            "aws_credential_expiry_timestamp_seconds",
            "When the AWS credentials in hand expire (Unix time; 0 if they do not, or none are used)",
            aws_credentials.expiry.clone(),
        );
        let projects = Arc::new(ProjectsExport {
            current: ArcSwap::default(),
            none: Arc::new(ProjectSeries::new("")),
            series: Mutex::default(),
        });
        registry.register_collector(Box::new(projects.clone()));
        let upstream_statuses = Arc::new(UpstreamStatuses::default());
        registry.register_collector(Box::new(upstream_statuses.clone()));
        let limits = LimitCounters::default();
        registry.register(
            "limit_rejections",
            "Requests a limit refused, by the request's project and the limit (subject and kind)",
            limits.rejections.clone(),
        );
        registry.register(
            "limit_backend_errors",
            "Failures of the limits store (Redis), by operation: admit, settle, sweep, seed",
            limits.backend_errors.clone(),
        );
        registry.register(
            "limit_backend_error_decisions",
            "Requests that came while the limits store could not be reached, by what limits.on_backend_error did",
            limits.decisions.clone(),
        );
        registry.register(
            "limit_backend_up",
            "Whether the limits store answers (1) or not (0)",
            limits.backend_up.clone(),
        );
        registry.register(
            "limit_settles_dropped",
            "Settles the limits store did not take and that were then dropped: too many kept, kept too long, refused \
             too often, or left at shutdown with no ledger to keep them beside",
            limits.settles_dropped.clone(),
        );
        registry.register(
            "limit_reservations_in_flight",
            "Reservations this replica holds: admitted requests not yet settled",
            limits.in_flight.clone(),
        );
        registry.register_collector(Box::new(limits.statuses.clone()));
        let reconcile_rows = Arc::new(ReconcileRows::default());
        registry.register_collector(Box::new(reconcile_rows.clone()));
        let reconcile_runs = Family::<ResultLabels, Counter>::default();
        registry.register(
            "reconcile_runs",
            "Scheduled reconciliations with CloudWatch, by result: ok, discrepancies (a row not ok), failed (CloudWatch \
             or the ledger could not be read)",
            reconcile_runs.clone(),
        );
        let reconcile_last_success = Gauge::default();
        registry.register(
            "reconcile_last_success_timestamp_seconds",
            "When the last scheduled reconciliation that read CloudWatch ended (Unix time; 0 before the first)",
            reconcile_last_success.clone(),
        );
        Self {
            registry,
            unattributed,
            ledger_dropped,
            key_reloads,
            config_reloads,
            upstream_auth_failures,
            aws_credentials,
            projects,
            upstream_statuses,
            limits,
            reconcile_rows,
            reconcile_runs,
            reconcile_last_success,
        }
    }

    /// What limits report to.
    pub fn limits(&self) -> LimitCounters {
        self.limits.clone()
    }

    /// The series of the project named `name`: the same ones for as long as anything holds them.
    pub fn series(&self, name: &str) -> Arc<ProjectSeries> {
        let mut series = self.projects.series.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(held) = series.get(name).and_then(Weak::upgrade) {
            return held;
        }
        series.retain(|_, s| s.strong_count() > 0);
        let made = Arc::new(ProjectSeries::new(name));
        series.insert(name.to_owned(), Arc::downgrade(&made));
        made
    }

    /// From now on, exports the series and tags of `projects` (a snapshot's, once it is in force) and of the
    /// config whose file hashes to `sha256`.
    pub fn publish(&self, projects: &[Arc<Project>], sha256: &str) {
        self.projects.current.store(Arc::new(Exported { projects: projects.to_vec(), sha256: sha256.to_owned() }));
    }

    /// From now on, exports these statuses upstream (by project name) as `mantlegate_project_upstream_status`.
    pub fn project_upstream_statuses(&self, statuses: &[(String, Status)]) {
        self.upstream_statuses.0.store(Arc::new(statuses.to_vec()));
    }

    /// From now on, exports these reconciliation rows as `mantlegate_reconcile_tokens` and
    /// `mantlegate_reconcile_verdict` (none: neither is exported).
    pub fn reconcile_rows(&self, rows: &[crate::reconcile::compare::Row]) {
        self.reconcile_rows.0.store(Arc::new(rows.to_vec()));
    }

    /// Counts a scheduled reconciliation by result (`ok`, `discrepancies` or `failed`).
    pub fn reconciled(&self, result: &'static str) {
        self.reconcile_runs.get_or_create(&ResultLabels { result }).inc();
        if result != "failed" {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
            self.reconcile_last_success.set(i64::try_from(now).unwrap_or(i64::MAX));
        }
    }

    /// The counter of upstream refusals of the gateway's credential.
    pub fn upstream_auth_failures(&self) -> Counter {
        self.upstream_auth_failures.clone()
    }

    /// What the AWS credential refresher reports to.
    pub fn aws_credentials(&self) -> AwsCredentialMetrics {
        self.aws_credentials.clone()
    }

    /// The counter of ledger lines dropped, for the ledger to count on.
    pub fn ledger_dropped(&self) -> Counter {
        self.ledger_dropped.clone()
    }

    /// Counts a re-read of the upstream key file by result (`changed` or `failed`).
    pub fn upstream_key_reload(&self, result: &'static str) {
        self.key_reloads.get_or_create(&ResultLabels { result }).inc();
    }

    /// Counts a config reload by result (`applied`, `rejected` or `unchanged`).
    pub fn config_reload(&self, result: &'static str) {
        self.config_reloads.get_or_create(&ResultLabels { result }).inc();
    }

    /// The OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

impl Sink for Metrics {
    fn record(&self, r: &Record) -> Option<Followup> {
        // A path that names no endpoint has no route label to count it under.
        let endpoint = r.endpoint?;
        match &r.project {
            Some((project, source)) => {
                if *source == crate::attribution::Source::Rerouted {
                    self.unattributed.get_or_create(&OutcomeLabels { outcome: "rerouted" }).inc();
                }
                project.series.observe(endpoint, r);
            }
            None => {
                if r.error == Some(crate::error::GatewayError::ProjectRequired.code()) {
                    self.unattributed.get_or_create(&OutcomeLabels { outcome: "rejected" }).inc();
                }
                self.projects.none.observe(endpoint, r);
            }
        }
        None
    }
}

/// A metric's name, help and type, as the collector writes its descriptor.
struct Descriptor {
    name: &'static str,
    help: &'static str,
    kind: MetricType,
}

const REQUESTS: Descriptor =
    Descriptor { name: "requests", help: "Requests by project, endpoint and status", kind: MetricType::Counter };
const DURATION: Descriptor = Descriptor {
    name: "request_duration_seconds",
    help: "Request duration, to the end of the response body",
    kind: MetricType::Histogram,
};
const TTFB: Descriptor = Descriptor {
    name: "time_to_first_byte_seconds",
    help: "Time to the first response body byte",
    kind: MetricType::Histogram,
};
const TOKENS: Descriptor = Descriptor {
    name: "tokens",
    help: "Tokens by project, model and kind (input, output, cached_input, reasoning)",
    kind: MetricType::Counter,
};
const COST: Descriptor =
    Descriptor { name: "cost_usd", help: "Cost in USD at configured prices", kind: MetricType::Counter };
const UNPRICED: Descriptor = Descriptor {
    name: "unpriced_requests",
    help: "Metered requests for models with no price",
    kind: MetricType::Counter,
};
const UNMETERED: Descriptor = Descriptor {
    name: "unmetered_requests",
    help: "Successful responses that bill tokens but whose usage the gateway could not read, by reason \
           (encoded, no_usage, incomplete)",
    kind: MetricType::Counter,
};
const CONFIG_INFO: Descriptor =
    Descriptor { name: "config_info", help: "The SHA-256 of the config file in force", kind: MetricType::Gauge };
const PROJECT_INFO: Descriptor = Descriptor {
    name: "project_info",
    help: "Configured projects and their cost allocation tags",
    kind: MetricType::Gauge,
};

impl Collector for ProjectsExport {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let exported = self.current.load();
        let current = &exported.projects;
        let all: Vec<&ProjectSeries> = current.iter().map(|p| &*p.series).chain([&*self.none]).collect();
        let mut family =
            |d: &Descriptor, each: &dyn Fn(&mut prometheus_client::encoding::MetricEncoder<'_>) -> std::fmt::Result| {
                let mut metric = encoder.encode_descriptor(d.name, d.help, None, d.kind)?;
                each(&mut metric)
            };
        family(&REQUESTS, &|m| {
            for p in &all {
                for (route, s) in p.endpoints() {
                    for (status, counter) in s.statuses.entries().iter() {
                        let labels = ([("project", &*p.project), ("route", route)], [("status", *status)]);
                        counter.encode(m.encode_family(&labels)?)?;
                    }
                }
            }
            Ok(())
        })?;
        for (d, pick) in [(&DURATION, true), (&TTFB, false)] {
            family(d, &|m| {
                for p in &all {
                    for (route, s) in p.endpoints() {
                        let labels = [("project", &*p.project), ("route", route)];
                        (if pick { &s.duration } else { &s.ttfb }).encode(m.encode_family(&labels)?)?;
                    }
                }
                Ok(())
            })?;
        }
        family(&TOKENS, &|m| {
            for p in &all {
                for (model, s) in p.models.entries().iter() {
                    for (kind, counter) in [
                        ("input", &s.input),
                        ("output", &s.output),
                        ("cached_input", &s.cached_input),
                        ("reasoning", &s.reasoning),
                    ] {
                        let labels = [("project", &*p.project), ("model", &**model), ("kind", kind)];
                        counter.encode(m.encode_family(&labels)?)?;
                    }
                }
            }
            Ok(())
        })?;
        family(&COST, &|m| {
            for p in &all {
                for (model, s) in p.models.entries().iter() {
                    if let Some(cost) = s.cost.get() {
                        cost.encode(m.encode_family(&[("project", &*p.project), ("model", &**model)])?)?;
                    }
                }
            }
            Ok(())
        })?;
        family(&UNPRICED, &|m| {
            for p in &all {
                for (model, s) in p.models.entries().iter() {
                    if let Some(unpriced) = s.unpriced.get() {
                        unpriced.encode(m.encode_family(&[("project", &*p.project), ("model", &**model)])?)?;
                    }
                }
            }
            Ok(())
        })?;
        family(&UNMETERED, &|m| {
            for p in &all {
                for (route, s) in p.endpoints() {
                    for (reason, counter) in s.unmetered.entries().iter() {
                        let labels = [("project", &*p.project), ("route", route), ("reason", reason.name())];
                        counter.encode(m.encode_family(&labels)?)?;
                    }
                }
            }
            Ok(())
        })?;
        family(&CONFIG_INFO, &|m| {
            if !exported.sha256.is_empty() {
                m.encode_family(&[("sha256", exported.sha256.as_str())])?.encode_gauge(&1i64)?;
            }
            Ok(())
        })?;
        family(&PROJECT_INFO, &|m| {
            for p in current.iter() {
                let mut labels = vec![("project".to_owned(), p.name.clone()), ("project_id".to_owned(), p.id.clone())];
                labels.extend(p.tags.iter().map(|(tag, value)| (tag_label(tag), value.clone())));
                let mut series = m.encode_family(&labels)?;
                series.encode_gauge(&1i64)?;
            }
            Ok(())
        })
    }
}

/// A tag name as a label name: letters, digits and `_` only, and never one of the fixed labels.
pub(crate) fn tag_label(tag: &str) -> String {
    let mut label: String = tag.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
    // `__` begins Prometheus' own labels (`__name__`).
    if label.starts_with(|c: char| c.is_ascii_digit())
        || label.starts_with("__")
        || matches!(label.as_str(), "project" | "project_id")
    {
        label.insert_str(0, "tag_");
    }
    label
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = "[upstream]\nbase_url = \"http://127.0.0.1:9\"\nauth = \"passthrough\"\n[callers]\nauth = \"none\"\n\
         [[projects]]\nname = \"P\"\nid = \"proj_p\"\ntags = { Team = \"t\" }\n\
         [[prices]]\nmodel = \"m\"\ninput = 25000\noutput = 0\n\
         [[prices]]\nmodel = \"unknown\"\ninput = 25000\noutput = 0\n";

    /// A record of a request to project `P` of `snapshot`.
    fn record(
        snapshot: &Arc<crate::snapshot::Snapshot>,
        status: u16,
        model: Option<&str>,
        usage: Option<Usage>,
    ) -> Record {
        let project = snapshot.project("P").expect("P").clone();
        let cost = usage.and_then(|u| Some(snapshot.prices.get(model?)?.cost(&u)));
        Record {
            snapshot: snapshot.clone(),
            request_id: http::HeaderValue::from_static("rid"),
            method: http::Method::POST,
            path: "/v1/chat/completions".into(),
            endpoint: Some(Endpoint::ChatCompletions),
            key: None,
            project: Some((project, crate::attribution::Source::Header)),
            model: model.map(str::to_owned),
            stream: false,
            status,
            error: None,
            forwarded: true,
            hold: None,
            refused_by: None,
            usage,
            cost,
            unmetered: None,
            complete: true,
            incomplete_reason: None,
            duration: std::time::Duration::from_millis(10),
            ttfb: Some(std::time::Duration::from_millis(5)),
            time: crate::telemetry::Stamp::new(std::time::SystemTime::now()),
        }
    }

    #[test]
    fn repeated_requests_count_on_the_same_series_whichever_path_counts_them() {
        let metrics = Metrics::new();
        let snapshot = Arc::new(crate::snapshot::tests::snapshot_in(CONFIG, &metrics));
        metrics.publish(&snapshot.projects, "abc");
        let usage = Usage { input: 10, output: 3, cached_input: 0, reasoning: 0 };
        // 10 input tokens at 25,000 USD per 1M: 0.25 USD a request, for the priced models only. A response
        // that names no model is never priced, before or after one from a model really named `unknown`.
        for (status, model) in [(200, Some("m")), (502, Some("m")), (200, Some("m")), (200, Some("n"))]
            .into_iter()
            .chain([(200, None), (200, Some("unknown")), (200, None)])
        {
            let r = record(&snapshot, status, model, (status == 200).then_some(usage));
            assert_eq!(
                r.cost,
                (model.is_some_and(|m| m != "n") && status == 200).then_some(0.25),
                "{status} {model:?}"
            );
            metrics.record(&r);
        }
        let text = metrics.encode();
        for line in [
            r#"mantlegate_requests_total{project="P",route="chat.completions",status="200"} 6"#,
            r#"mantlegate_requests_total{project="P",route="chat.completions",status="502"} 1"#,
            r#"mantlegate_request_duration_seconds_count{project="P",route="chat.completions"} 7"#,
            r#"mantlegate_tokens_total{project="P",model="m",kind="input"} 20"#,
            r#"mantlegate_tokens_total{project="P",model="n",kind="output"} 3"#,
            r#"mantlegate_cost_usd_total{project="P",model="m"} 0.5"#,
            r#"mantlegate_unpriced_requests_total{project="P",model="n"} 1"#,
            r#"mantlegate_unpriced_requests_total{project="P",model="unknown"} 2"#,
            r#"mantlegate_cost_usd_total{project="P",model="unknown"} 0.25"#,
            r#"mantlegate_tokens_total{project="P",model="unknown",kind="input"} 30"#,
            r#"mantlegate_project_info{project="P",project_id="proj_p",Team="t"} 1"#,
            r#"mantlegate_config_info{sha256="abc"} 1"#,
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing from:\n{text}");
        }
    }

    #[test]
    fn only_the_projects_in_force_are_exported_and_a_kept_project_keeps_its_counts() {
        let metrics = Metrics::new();
        let first = Arc::new(crate::snapshot::tests::snapshot_in(CONFIG, &metrics));
        metrics.publish(&first.projects, "one");
        metrics.record(&record(&first, 200, Some("m"), None));
        // Retagged, and a project added: P's series carry over, its info shows the new tags at once.
        let retagged = CONFIG.replace("Team = \"t\"", "Team = \"u\"") + "[[projects]]\nname = \"Q\"\nid = \"proj_q\"\n";
        let second = Arc::new(crate::snapshot::tests::snapshot_in(&retagged, &metrics));
        metrics.publish(&second.projects, "two");
        metrics.record(&record(&second, 200, Some("m"), None));
        // A request that began under the first snapshot and ends now still counts on P.
        metrics.record(&record(&first, 200, Some("m"), None));
        let text = metrics.encode();
        for line in [
            r#"mantlegate_requests_total{project="P",route="chat.completions",status="200"} 3"#,
            r#"mantlegate_project_info{project="P",project_id="proj_p",Team="u"} 1"#,
            r#"mantlegate_project_info{project="Q",project_id="proj_q"} 1"#,
            r#"mantlegate_config_info{sha256="two"} 1"#,
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing from:\n{text}");
        }
        assert!(!text.contains("Team=\"t\"") && !text.contains("sha256=\"one\""), "{text}");
        // P removed: none of its series are exported any more.
        let third = crate::snapshot::tests::snapshot_in(&CONFIG.replace("name = \"P\"", "name = \"R\""), &metrics);
        metrics.publish(&third.projects, "three");
        let text = metrics.encode();
        assert!(!text.contains("project=\"P\""), "{text}");
        assert!(text.contains(r#"mantlegate_project_info{project="R",project_id="proj_p",Team="t"} 1"#), "{text}");
        // Back again while requests of the earlier configs still run: its counts carry on from where they were.
        let fourth = crate::snapshot::tests::snapshot_in(CONFIG, &metrics);
        metrics.publish(&fourth.projects, "four");
        metrics.record(&record(&first, 200, Some("m"), None));
        let text = metrics.encode();
        assert!(
            text.contains(r#"mantlegate_requests_total{project="P",route="chat.completions",status="200"} 4"#),
            "{text}"
        );
    }

    #[test]
    fn tag_labels_are_valid_label_names() {
        assert_eq!(tag_label("CostCenter"), "CostCenter");
        assert_eq!(tag_label("cost-center:eu"), "cost_center_eu");
        assert_eq!(tag_label("1st"), "tag_1st");
        assert_eq!(tag_label("project"), "tag_project");
        assert_eq!(tag_label("__name__"), "tag___name__");
    }
}
