//! Prometheus metrics, served as OpenMetrics text on the admin listener's `/metrics`. Built on
//! `prometheus-client`, the Prometheus project's own Rust client: typed label sets and no global registry.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::usage::Usage;
use crate::config::Config;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    project: String,
    route: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LatencyLabels {
    project: String,
    route: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    project: String,
    model: String,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    project: String,
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

type HistogramFamily = Family<LatencyLabels, Histogram, fn() -> Histogram>;

/// Every metric the gateway exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    duration: HistogramFamily,
    ttfb: HistogramFamily,
    tokens: Family<TokenLabels, Counter>,
    cost: Family<ModelLabels, Counter<f64, AtomicU64>>,
    unpriced: Family<ModelLabels, Counter>,
    unattributed: Family<OutcomeLabels, Counter>,
    ledger_dropped: Counter,
}

fn latency_histogram() -> Histogram {
    // 1 ms to ~8.7 min: gateway rejections at the bottom, long reasoning streams at the top.
    Histogram::new(exponential_buckets(0.001, 2.0, 20))
}

/// A finished request, as the metrics see it.
#[derive(Debug)]
pub struct Observation<'a> {
    /// Project name, or empty when none was resolved.
    pub project: &'a str,
    /// Endpoint name.
    pub route: &'static str,
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
    /// Cost in USD, when the model has a price.
    pub cost: Option<f64>,
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
        let cost = Family::<ModelLabels, Counter<f64, AtomicU64>>::default();
        registry.register("cost_usd", "Cost in USD at configured prices", cost.clone());
        let unpriced = Family::<ModelLabels, Counter>::default();
        registry.register("unpriced_requests", "Metered requests for models with no price", unpriced.clone());
        let unattributed = Family::<OutcomeLabels, Counter>::default();
        registry.register("unattributed", "Requests nothing attributed: rejected or rerouted", unattributed.clone());
        let ledger_dropped = Counter::default();
        registry.register(
            "ledger_dropped",
            "Ledger lines dropped because the writer fell behind",
            ledger_dropped.clone(),
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
        Self { registry, requests, duration, ttfb, tokens, cost, unpriced, unattributed, ledger_dropped }
    }

    /// Records a finished request.
    pub fn observe(&self, o: &Observation<'_>) {
        let project = o.project.to_owned();
        self.requests
            .get_or_create(&RequestLabels { project: project.clone(), route: o.route, status: o.status })
            .inc();
        let latency = LatencyLabels { project: project.clone(), route: o.route };
        self.duration.get_or_create(&latency).observe(o.duration);
        if let Some(ttfb) = o.ttfb {
            self.ttfb.get_or_create(&latency).observe(ttfb);
        }
        if let Some(usage) = o.usage {
            let model = o.model.unwrap_or("unknown").to_owned();
            for (kind, n) in [
                ("input", usage.input),
                ("output", usage.output),
                ("cached_input", usage.cached_input),
                ("reasoning", usage.reasoning),
            ] {
                self.tokens
                    .get_or_create(&TokenLabels { project: project.clone(), model: model.clone(), kind })
                    .inc_by(n);
            }
            let labels = ModelLabels { project, model };
            match o.cost {
                Some(cost) => {
                    self.cost.get_or_create(&labels).inc_by(cost);
                }
                None => {
                    self.unpriced.get_or_create(&labels).inc();
                }
            }
        }
    }

    /// Counts an unattributed request by outcome (`rejected` or `rerouted`).
    pub fn unattributed(&self, outcome: &'static str) {
        self.unattributed.get_or_create(&OutcomeLabels { outcome }).inc();
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
fn tag_label(tag: &str) -> String {
    let mut label: String = tag.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
    if label.starts_with(|c: char| c.is_ascii_digit()) || matches!(label.as_str(), "project" | "project_id") {
        label.insert_str(0, "tag_");
    }
    label
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_labels_are_valid_label_names() {
        assert_eq!(tag_label("CostCenter"), "CostCenter");
        assert_eq!(tag_label("cost-center:eu"), "cost_center_eu");
        assert_eq!(tag_label("1st"), "tag_1st");
        assert_eq!(tag_label("project"), "tag_project");
    }
}
