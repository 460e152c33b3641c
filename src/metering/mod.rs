//! Real-time metering: tokens and cost per project, model and tag, from every response the gateway
//! forwards (streams included), into Prometheus metrics and a JSON-lines usage ledger. AWS billing lags a
//! day; this does not.

pub mod ledger;
pub mod metrics;
pub mod prices;
pub mod usage;

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use crate::auth::KeyIdx;
use crate::config::{Config, ProjectIdx};
use crate::telemetry::{JsonLine, Stamp};
use ledger::{Ledger, LedgerWriter};
use metrics::{Metrics, Observation};
use usage::Usage;

/// A project as the meter reports it. Its JSON members are rendered once: they are the same in every line.
#[derive(Debug)]
struct ProjectMeta {
    /// `"project":...,"project_id":...`, for the access line.
    members: String,
    /// `"project":...,"project_id":...,"tags":{...}`, for the ledger line.
    ledger_fields: String,
}

/// The access line's project members.
#[derive(Serialize)]
struct ProjectNames<'a> {
    project: &'a str,
    project_id: &'a str,
}

/// A key's member in the access and ledger lines.
#[derive(Serialize)]
struct KeyName<'a> {
    key: &'a str,
}

/// The ledger line's fields that are fixed per project.
#[derive(Serialize)]
struct ProjectFields<'a> {
    project: &'a str,
    project_id: &'a str,
    tags: &'a BTreeMap<String, String>,
}

/// `{"a":1,"b":2}` -> `"a":1,"b":2`, for splicing into a larger object.
fn members_of(object: &impl Serialize) -> String {
    let text = serde_json::to_string(object).unwrap_or_else(|_| "{}".into());
    text[1..text.len() - 1].to_owned()
}

/// Prices, metrics and the ledger, shared by every request.
#[derive(Debug)]
pub struct Meter {
    /// Whether responses are tapped for usage (and chat streams asked for it).
    pub taps: bool,
    metrics: Metrics,
    ledger: Option<Ledger>,
    projects: Vec<ProjectMeta>,
    /// `"key":...` by key index.
    keys: Vec<String>,
}

/// Why a successful response from an endpoint that bills tokens was not (or not fully) metered: its ledger and
/// access lines carry `"unmetered":REASON` beside whatever tokens were seen, and
/// `mantlegate_unmetered_requests_total` counts it, so spend the gateway could not see is never silent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unmetered {
    /// Upstream compressed the body although the gateway asked for it uncompressed, so it passed unread.
    Encoded,
    /// The response ended as its protocol says without usage that counts anything (a background Response, an
    /// upstream that sends none, or one whose usage object is empty or unreadable).
    NoUsage,
    /// The response stopped before its final usage arrived: the caller left, or upstream broke off. What was seen
    /// is kept (an Anthropic stream cut after `message_start` has its input count).
    Incomplete,
}

impl Unmetered {
    /// The reason's name in lines and labels.
    pub fn name(self) -> &'static str {
        match self {
            Self::Encoded => "encoded",
            Self::NoUsage => "no_usage",
            Self::Incomplete => "incomplete",
        }
    }
}

/// Everything known about a finished request.
#[derive(Debug)]
pub struct Finished<'a> {
    /// Request id.
    pub request_id: &'a str,
    /// The caller's key.
    pub key: Option<KeyIdx>,
    /// The resolved project.
    pub project: Option<ProjectIdx>,
    /// The endpoint.
    pub endpoint: crate::endpoint::Endpoint,
    /// Model (from the request, else the response).
    pub model: Option<&'a str>,
    /// Whether the response was a stream.
    pub stream: bool,
    /// Response status.
    pub status: u16,
    /// Tokens seen.
    pub usage: Option<Usage>,
    /// Whole request.
    pub duration: Duration,
    /// To first response byte.
    pub ttfb: Option<Duration>,
    /// Whether the response ended as its protocol says it should.
    pub complete: bool,
    /// Why a response that bills tokens went unmetered.
    pub unmetered: Option<Unmetered>,
    /// Whether upstream was contacted (gateway rejections write no ledger line).
    pub forwarded: bool,
    /// When it finished (the access line's timestamp too).
    pub time: Stamp,
}

impl Meter {
    /// Builds the meter; opens the ledger when `metering.ledger_path` is set.
    pub fn new(config: &Config) -> anyhow::Result<(Self, Option<LedgerWriter>)> {
        let (ledger, writer) = match &config.metering.ledger_path {
            Some(path) => {
                let (ledger, writer) = Ledger::open(path)?;
                (Some(ledger), Some(writer))
            }
            None => (None, None),
        };
        let meter = Self {
            taps: config.metering.enabled,
            metrics: Metrics::new(config),
            ledger,
            projects: config
                .projects
                .iter()
                .map(|p| {
                    let id = p.id.as_deref().unwrap_or_default();
                    ProjectMeta {
                        members: members_of(&ProjectNames { project: &p.name, project_id: id }),
                        ledger_fields: members_of(&ProjectFields { project: &p.name, project_id: id, tags: &p.tags }),
                    }
                })
                .collect(),
            keys: config.keys.iter().map(|k| members_of(&KeyName { key: &k.name })).collect(),
        };
        Ok((meter, writer))
    }

    /// A project's name and id as JSON members: `"project":...,"project_id":...`.
    pub fn project_members(&self, idx: ProjectIdx) -> &str {
        &self.projects[idx.0].members
    }

    /// A key's name as a JSON member: `"key":...`.
    pub fn key_member(&self, idx: KeyIdx) -> &str {
        &self.keys[idx.0]
    }

    /// Counts an unattributed request (`rejected` or `rerouted`).
    pub fn unattributed(&self, outcome: &'static str) {
        self.metrics.unattributed(outcome);
    }

    /// Counts a re-read of the upstream key file that changed the key (`changed`) or could not be used
    /// (`failed`).
    pub fn upstream_key_reload(&self, result: &'static str) {
        self.metrics.upstream_key_reload(result);
    }

    /// Records a finished request in the metrics and, if it was forwarded, the ledger. Returns the cost of its
    /// usage, if the model has a price.
    pub fn record(&self, f: &Finished<'_>) -> Option<f64> {
        let cost = self.metrics.observe(&Observation {
            project: f.project,
            endpoint: f.endpoint,
            status: f.status,
            duration: f.duration.as_secs_f64(),
            ttfb: f.ttfb.map(|d| d.as_secs_f64()),
            model: f.model,
            usage: f.usage,
            unmetered: f.unmetered,
        });
        let (Some(ledger), Some(project), true) = (&self.ledger, f.project, f.forwarded) else { return cost };
        let project = &self.projects[project.0];
        let usage = f.usage.unwrap_or_default();
        ledger.append_with(|text| {
            let mut line = JsonLine::open(text);
            line.str("time", f.time.millis().as_str()).str("request_id", f.request_id);
            match f.key {
                Some(key) => line.members(self.key_member(key)),
                None => line.null("key"),
            };
            line.str("route", f.endpoint.name())
                .str_or_null("model", f.model)
                .bool("stream", f.stream)
                .u64("status", f.status.into())
                .u64("input_tokens", usage.input)
                .u64("output_tokens", usage.output)
                .u64("cached_input_tokens", usage.cached_input)
                .u64("reasoning_tokens", usage.reasoning)
                .f64_or_null("cost_usd", cost)
                .millis("duration_ms", f.duration)
                .millis_or_null("ttfb_ms", f.ttfb)
                .bool("complete", f.complete);
            if let Some(unmetered) = f.unmetered {
                line.str("unmetered", unmetered.name());
            }
            line.members(&project.ledger_fields);
            line.close();
        });
        cost
    }

    /// The `/metrics` text.
    pub fn render(&self) -> String {
        if let Some(ledger) = &self.ledger {
            self.metrics.set_ledger_dropped(ledger.dropped());
        }
        self.metrics.encode()
    }
}
