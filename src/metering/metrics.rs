//! Prometheus metrics, served as OpenMetrics text on the admin listener's `/metrics`. Built on
//! `prometheus-client`, the Prometheus project's own Rust client: typed label sets and no global registry.
//!
//! A metric family finds a series by hashing its labels under a lock, so the hot path does that once per
//! request at most (the request counter, whose status label varies). Latency histograms are looked up once
//! per project and endpoint and kept in a table; token and cost counters once per project and model, kept in
//! a copy-on-write map that requests read without a lock.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::prices::{Price, PriceTable};
use super::usage::Usage;
use crate::config::{Config, ProjectIdx};
use crate::endpoint::Endpoint;

/// A shared label value: cloning it for a series costs a reference count, not an allocation.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct Label(Arc<str>);

impl EncodeLabelValue for Label {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(&self.0)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    project: Label,
    route: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LatencyLabels {
    project: Label,
    route: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    project: Label,
    model: Label,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    project: Label,
    model: Label,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UnmeteredLabels {
    project: Label,
    route: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

type HistogramFamily = Family<LatencyLabels, Histogram, fn() -> Histogram>;
type CostCounter = Counter<f64, AtomicU64>;

/// One project and endpoint's latency series, and its request counter for status 200 (most requests), so
/// that counting one takes neither the family's lock nor a reference count on the shared label.
#[derive(Debug)]
struct Latency {
    duration: Histogram,
    ttfb: Histogram,
    ok: OnceLock<Counter>,
}

/// One project and model's token and cost series, with the model's price.
#[derive(Debug)]
struct ModelSeries {
    input: Counter,
    output: Counter,
    cached_input: Counter,
    reasoning: Counter,
    /// The price and cost counter of a priced model; the unpriced-requests counter for the others.
    cost: Result<(Price, CostCounter), Counter>,
}

impl ModelSeries {
    /// Counts `usage` and returns its cost, if the model has a price.
    fn add(&self, usage: Usage) -> Option<f64> {
        self.input.inc_by(usage.input);
        self.output.inc_by(usage.output);
        self.cached_input.inc_by(usage.cached_input);
        self.reasoning.inc_by(usage.reasoning);
        match &self.cost {
            Ok((price, counter)) => {
                let cost = price.cost(&usage);
                counter.inc_by(cost);
                Some(cost)
            }
            Err(unpriced) => {
                unpriced.inc();
                None
            }
        }
    }
}

/// Every metric the gateway exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    duration: HistogramFamily,
    ttfb: HistogramFamily,
    tokens: Family<TokenLabels, Counter>,
    cost: Family<ModelLabels, CostCounter>,
    unpriced: Family<ModelLabels, Counter>,
    unmetered: Family<UnmeteredLabels, Counter>,
    unattributed: Family<OutcomeLabels, Counter>,
    ledger_dropped: Counter,
    key_reloads: Family<ResultLabels, Counter>,
    /// Project label values by project index; the last entry (empty) is for requests with no project.
    projects: Vec<Label>,
    /// Latency series by project (as `projects`) and endpoint, made on first use.
    latency: Vec<[OnceLock<Latency>; Endpoint::ALL.len()]>,
    /// Token series by project (as `projects`) and model.
    models: Vec<ArcSwap<HashMap<Arc<str>, Arc<ModelSeries>>>>,
    /// Token series by project for responses that name no model (labelled `unknown`, never priced: a model
    /// really named `unknown` has series of its own, with its price).
    no_model: Vec<OnceLock<ModelSeries>>,
    prices: PriceTable,
}

fn latency_histogram() -> Histogram {
    // 1 ms to ~8.7 min: gateway rejections at the bottom, long reasoning streams at the top.
    Histogram::new(exponential_buckets(0.001, 2.0, 20))
}

/// A finished request, as the metrics see it.
#[derive(Debug)]
pub struct Observation<'a> {
    /// The resolved project, if any.
    pub project: Option<ProjectIdx>,
    /// The endpoint.
    pub endpoint: Endpoint,
    /// Response status.
    pub status: u16,
    /// Whole request, in seconds.
    pub duration: f64,
    /// To the first response byte, in seconds.
    pub ttfb: Option<f64>,
    /// Model, where known.
    pub model: Option<&'a str>,
    /// Tokens, where seen.
    pub usage: Option<Usage>,
    /// Why a response that bills tokens went unmetered.
    pub unmetered: Option<super::Unmetered>,
}

impl Metrics {
    /// Registers every metric, and `mantlegate_project_info` for each configured project.
    pub fn new(config: &Config) -> Self {
        let mut registry = Registry::with_prefix("mantlegate");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register("requests", "Requests by project, endpoint and status", requests.clone());
        let duration: HistogramFamily = Family::new_with_constructor(latency_histogram);
        registry.register(
            "request_duration_seconds",
            "Request duration, to the end of the response body",
            duration.clone(),
        );
        let ttfb: HistogramFamily = Family::new_with_constructor(latency_histogram);
        registry.register("time_to_first_byte_seconds", "Time to the first response body byte", ttfb.clone());
        let tokens = Family::<TokenLabels, Counter>::default();
        registry.register(
            "tokens",
            "Tokens by project, model and kind (input, output, cached_input, reasoning)",
            tokens.clone(),
        );
        let cost = Family::<ModelLabels, CostCounter>::default();
        registry.register("cost_usd", "Cost in USD at configured prices", cost.clone());
        let unpriced = Family::<ModelLabels, Counter>::default();
        registry.register("unpriced_requests", "Metered requests for models with no price", unpriced.clone());
        let unmetered = Family::<UnmeteredLabels, Counter>::default();
        registry.register(
            "unmetered_requests",
            "Successful responses that bill tokens but whose usage the gateway could not read, by reason \
             (encoded, no_usage, incomplete)",
            unmetered.clone(),
        );
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

        let info = Family::<Vec<(String, String)>, Gauge>::default();
        registry.register("project_info", "Configured projects and their cost allocation tags", info.clone());
        for p in &config.projects {
            let mut labels = vec![("project".to_owned(), p.name.clone())];
            labels.push(("project_id".to_owned(), p.id.clone().unwrap_or_default()));
            for (tag, value) in &p.tags {
                labels.push((tag_label(tag), value.clone()));
            }
            info.get_or_create(&labels).set(1);
        }

        let projects: Vec<Label> =
            config.projects.iter().map(|p| Label(p.name.as_str().into())).chain([Label("".into())]).collect();
        let latency = projects.iter().map(|_| std::array::from_fn(|_| OnceLock::new())).collect();
        let models = projects.iter().map(|_| ArcSwap::from_pointee(HashMap::new())).collect();
        let no_model = projects.iter().map(|_| OnceLock::new()).collect();
        Self {
            registry,
            requests,
            duration,
            ttfb,
            tokens,
            cost,
            unpriced,
            unmetered,
            unattributed,
            ledger_dropped,
            key_reloads,
            projects,
            latency,
            models,
            no_model,
            prices: PriceTable::new(&config.metering.prices),
        }
    }

    /// Records a finished request, and returns the cost of its usage if its model has a price. The price is
    /// kept with the model's series, so a request looks its model up once.
    pub fn observe(&self, o: &Observation<'_>) -> Option<f64> {
        let p = o.project.map_or(self.projects.len() - 1, |p| p.0);
        let project = &self.projects[p];
        let route = o.endpoint.name();
        let latency = self.latency[p][o.endpoint.index()].get_or_init(|| {
            let labels = LatencyLabels { project: project.clone(), route };
            Latency {
                duration: self.duration.get_or_create(&labels).clone(),
                ttfb: self.ttfb.get_or_create(&labels).clone(),
                ok: OnceLock::new(),
            }
        });
        let requests = |status| self.requests.get_or_create(&RequestLabels { project: project.clone(), route, status });
        match o.status {
            200 => latency.ok.get_or_init(|| requests(200).clone()).inc(),
            status => requests(status).inc(),
        };
        latency.duration.observe(o.duration);
        if let Some(ttfb) = o.ttfb {
            latency.ttfb.observe(ttfb);
        }
        if let Some(unmetered) = o.unmetered {
            let labels = UnmeteredLabels { project: project.clone(), route, reason: unmetered.name() };
            self.unmetered.get_or_create(&labels).inc();
        }
        let usage = o.usage?;
        let Some(model) = o.model else {
            return self.no_model[p].get_or_init(|| self.model_series(p, "unknown", None)).add(usage);
        };
        // Read through the map's guard: cloning the series' Arc would write its shared count.
        match self.models[p].load().get(model) {
            Some(series) => series.add(usage),
            None => self.new_model_series(p, model).add(usage),
        }
    }

    /// The series of a model this project has not reported before, added to its map.
    fn new_model_series(&self, p: usize, model: &str) -> Arc<ModelSeries> {
        // Racing requests may both get here; the family hands both the same series, so nothing is counted
        // twice.
        let series = Arc::new(self.model_series(p, model, self.prices.get(model).copied()));
        self.models[p].rcu(|map| {
            let mut map = HashMap::clone(map);
            map.entry(model.into()).or_insert_with(|| series.clone());
            map
        });
        series
    }

    /// The token and cost series of project `p` and `model`.
    fn model_series(&self, p: usize, model: &str, price: Option<Price>) -> ModelSeries {
        let model: Arc<str> = model.into();
        let project = self.projects[p].clone();
        let token = |kind| {
            self.tokens
                .get_or_create(&TokenLabels { project: project.clone(), model: Label(model.clone()), kind })
                .clone()
        };
        let labels = ModelLabels { project: project.clone(), model: Label(model.clone()) };
        ModelSeries {
            input: token("input"),
            output: token("output"),
            cached_input: token("cached_input"),
            reasoning: token("reasoning"),
            cost: match price {
                Some(price) => Ok((price, self.cost.get_or_create(&labels).clone())),
                None => Err(self.unpriced.get_or_create(&labels).clone()),
            },
        }
    }

    /// Counts an unattributed request by outcome (`rejected` or `rerouted`).
    pub fn unattributed(&self, outcome: &'static str) {
        self.unattributed.get_or_create(&OutcomeLabels { outcome }).inc();
    }

    /// Counts a re-read of the upstream key file by result (`changed` or `failed`).
    pub fn upstream_key_reload(&self, result: &'static str) {
        self.key_reloads.get_or_create(&ResultLabels { result }).inc();
    }

    /// Brings the dropped-ledger-lines counter up to `total`.
    pub fn set_ledger_dropped(&self, total: u64) {
        let seen = self.ledger_dropped.get();
        if total > seen {
            self.ledger_dropped.inc_by(total - seen);
        }
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

    #[test]
    fn repeated_requests_count_on_the_same_series_whichever_path_counts_them() {
        let config = Config::from_toml(
            "[upstream]\nbase_url = \"http://127.0.0.1:9\"\nauth = \"passthrough\"\n[callers]\nauth = \"none\"\n\
             [[projects]]\nname = \"P\"\nid = \"proj_p\"\n\
             [[prices]]\nmodel = \"m\"\ninput = 25000\noutput = 0\n\
             [[prices]]\nmodel = \"unknown\"\ninput = 25000\noutput = 0\n",
        )
        .expect("config");
        let metrics = Metrics::new(&config);
        let usage = Usage { input: 10, output: 3, cached_input: 0, reasoning: 0 };
        // 10 input tokens at 25,000 USD per 1M: 0.25 USD a request, for the priced models only. A response
        // that names no model is never priced, before or after one from a model really named `unknown`.
        for (status, model, cost) in
            [(200, Some("m"), Some(0.25)), (502, Some("m"), None), (200, Some("m"), Some(0.25)), (200, Some("n"), None)]
                .into_iter()
                .chain([(200, None, None), (200, Some("unknown"), Some(0.25)), (200, None, None)])
        {
            let observed = metrics.observe(&Observation {
                project: Some(ProjectIdx(0)),
                endpoint: Endpoint::ChatCompletions,
                status,
                duration: 0.01,
                ttfb: Some(0.005),
                model,
                usage: (status == 200).then_some(usage),
                unmetered: None,
            });
            assert_eq!(observed, cost, "{status} {model:?}");
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
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing from:\n{text}");
        }
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
