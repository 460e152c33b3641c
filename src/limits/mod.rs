//! Rate limits and budgets: before a request is forwarded, its worst case is reserved against every limit that
//! applies to it (its project's, its key's, and those of its project's tag values), all checked and reserved
//! together; when it ends, the reservation is replaced by what it used, as metered. Spend is counted for every
//! project, key and tag value once any rule exists, so a budget added by a reload sees the month so far.
//!
//! - [`Limiter`]: the counters' store for the process's life (the memory backend, or Redis shared by every
//!   replica), what happens while it cannot be reached, and the sweeper that releases reservations left behind
//!   and publishes every limit's use as metrics.
//! - [`Counted`]: a subject (project, key, tag value) with its limits, attached to the snapshot's projects and
//!   keys, so a request finds what it counts against without a lookup.
//! - [`Demand`]: what a request may use at most, estimated from its body ([`estimate`]).
//! - [`Hold`]: an admitted request's reservation, carried by its record to the [`LimitsSink`], which settles it.
//!
//! Reservations expire on their own after `limits.reservation_ttl`, so a replica that dies holding some
//! cannot hold budget for ever; settlement is idempotent, so a settle retried after a lost answer counts once.

pub mod estimate;
pub mod memory;
pub mod redis;
pub mod seed;
pub mod window;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;

use crate::config::limits::{Backend, Kind, Limits, NANOS_PER_USD, OnBackendError, Subject};
use crate::error::GatewayError;
use crate::record::{Followup, Record, Sink};
use crate::snapshot::Snapshot;
pub use window::Windows;

/// What one request counts against, shared (a key's requests to its own project share one list, made once).
pub type Subjects = Arc<[Arc<Counted>]>;

/// A subject requests count against, with the limits its rule sets (none: its spend is still counted).
#[derive(Debug)]
pub struct Counted {
    /// Whom.
    pub subject: Subject,
    /// `project:Name`, as counters, metrics and messages name it.
    pub id: Arc<str>,
    /// Its limits, by kind.
    pub limits: Vec<(Kind, u64)>,
}

impl Counted {
    /// `subject` with `limits`.
    pub fn new(subject: Subject, limits: Vec<(Kind, u64)>) -> Self {
        Self { id: subject.to_string().into(), subject, limits }
    }

    /// Whether it counts `kind` (it has a limit of that kind, or `kind` is spend, counted for every subject).
    pub fn counts(&self, kind: Kind) -> bool {
        kind.is_budget() || self.limits.iter().any(|(k, _)| *k == kind)
    }
}

/// Amounts of each thing limits count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Amounts {
    /// Requests.
    pub requests: u64,
    /// Input tokens.
    pub input: u64,
    /// Output tokens.
    pub output: u64,
    /// Spend, in nano-USD.
    pub nanos: u64,
}

impl Amounts {
    /// The amount that counts against `kind` (spend for both budget windows).
    pub fn of(&self, kind: Kind) -> u64 {
        match kind {
            Kind::RequestsPerMinute => self.requests,
            Kind::InputTokensPerMinute => self.input,
            Kind::OutputTokensPerMinute => self.output,
            Kind::UsdPerDay | Kind::UsdPerMonth => self.nanos,
        }
    }
}

/// USD as whole nano-dollars, as every counter holds spend.
pub fn nanos(usd: f64) -> u64 {
    if usd.is_finite() && usd > 0.0 { (usd * NANOS_PER_USD).round() as u64 } else { 0 }
}

/// What a request may use at most.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Demand {
    /// Its worst case: one request, estimated input, its output cap, their price.
    pub amounts: Amounts,
    /// Whether it bills tokens: token and spend limits apply to it even when its amounts are zero (a model
    /// without a price), so that a spent budget stops it.
    pub billed: bool,
    /// Whether the gateway knows its model's price (a budget cannot count a model it cannot price).
    pub priced: bool,
}

/// A request's reservation, from admission to settlement.
#[derive(Debug, Clone)]
pub struct Hold {
    /// Unique in this process; the Redis store names it with the instance and a per-process nonce.
    pub id: u64,
    /// The windows it was reserved in.
    pub windows: Windows,
    /// Whom it counts against.
    pub subjects: Subjects,
    /// What was reserved.
    pub reserved: Amounts,
    /// Whether its request bills tokens (else it reserved nothing, and has nothing to settle).
    pub billed: bool,
    /// Whether the store holds it (false: admitted while the store could not be reached; its usage is still
    /// counted when it ends).
    pub in_store: bool,
}

/// Which limit refused a request, with the numbers of that limit only (the caller's own project, key or tag).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Whose limit.
    pub subject: String,
    /// Which.
    pub kind: Kind,
    /// Its value.
    pub limit: u64,
    /// In use (reserved or used) when the request came.
    pub used: u64,
    /// What the request needed.
    pub requested: u64,
    /// When the window ends (milliseconds since the epoch).
    pub reset_ms: u64,
    /// How long until then.
    pub reset_in: Duration,
}

impl Refusal {
    /// `project:Name/usd_per_day`, as the access and ledger lines name it.
    pub fn name(&self) -> String {
        format!("{}/{}", self.subject, self.kind.name())
    }

    /// Whether the request alone needs more than the limit allows: no wait helps.
    pub fn too_large(&self) -> bool {
        self.requested > self.limit
    }

    /// The `Retry-After` value, in whole seconds (at least 1).
    pub fn retry_after_secs(&self) -> u64 {
        self.reset_in.as_millis().div_ceil(1000).max(1) as u64
    }

    /// `12s`, `6m0s`, `2h3m0s`: OpenAI's spelling of `x-ratelimit-reset-*`.
    pub fn reset_text(&self) -> String {
        let s = self.retry_after_secs();
        match (s / 3600, s / 60 % 60, s % 60) {
            (0, 0, s) => format!("{s}s"),
            (0, m, s) => format!("{m}m{s}s"),
            (h, m, s) => format!("{h}h{m}m{s}s"),
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (subject, kind) = (&self.subject, self.kind.name());
        if self.kind.is_budget() {
            let usd = |n: u64| n as f64 / NANOS_PER_USD;
            write!(
                f,
                "budget exhausted for {subject}: {kind} is ${:.2}, ${:.4} is spent or reserved, and this request may \
                 cost up to ${:.4}; it resets at {}",
                usd(self.limit),
                usd(self.used),
                usd(self.requested),
                window::rfc3339(self.reset_ms)
            )
        } else if self.too_large() {
            write!(
                f,
                "request too large for {subject}: {kind} is {}, and this request alone needs {} (estimated); send \
                 less, or set a lower max_tokens",
                self.limit, self.requested
            )
        } else {
            write!(
                f,
                "rate limit reached for {subject}: {kind} is {}, {} in use, this request needs {} (estimated); try \
                 again in {}",
                self.limit,
                self.used,
                self.requested,
                self.reset_text()
            )
        }
    }
}

/// What a store answered an admission.
#[derive(Debug)]
pub enum Admit {
    /// Reserved.
    Admitted,
    /// Refused by the limit of `subjects[index]` of `kind`, whose counter stood at `used`.
    Refused {
        /// The subject's place in the request's subjects.
        index: usize,
        /// Which limit.
        kind: Kind,
        /// Its counter.
        used: u64,
    },
    /// The store has lost this replica's share of spend (Redis flushed, or restarted empty): rebuild it first.
    Unseeded,
}

/// The store's failure: unreachable, timed out, or an answer it could not read.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct StoreError {
    /// What happened.
    pub message: String,
    /// Whether the call may yet have run (it was sent, and no answer came in time).
    pub maybe_ran: bool,
}

impl StoreError {
    /// A call that did not run.
    pub fn new(message: impl Into<String>) -> Self {
        Self { message: message.into(), maybe_ran: false }
    }
}

/// Where counters live.
#[derive(Debug)]
pub enum Store {
    /// In this process.
    Memory(memory::MemoryStore),
    /// In Redis.
    Redis(redis::RedisStore),
}

/// One limit's state, as `limits status` prints it and `/metrics` exports it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Status {
    /// `project:Name`.
    pub subject: String,
    /// `usd_per_day`.
    pub limit: &'static str,
    /// The configured value (USD for budgets).
    pub max: f64,
    /// Used or reserved in the current window (USD for budgets).
    pub used: f64,
    /// What is left.
    pub remaining: f64,
    /// When the window ends (RFC 3339).
    pub resets_at: String,
}

/// The gateway's limiter, for the life of the process (its backend changes only with a restart).
#[derive(Debug)]
pub struct Limiter {
    store: Store,
    next_id: AtomicU64,
    counters: crate::metering::metrics::LimitCounters,
}

impl Limiter {
    /// The limiter `limits` configures: a memory store rebuilt from the ledger at `ledger` (this month's spend,
    /// this minute's rates), or a Redis client that connects when first used.
    pub fn start(
        limits: &Limits,
        ledger: Option<&std::path::Path>,
        counters: crate::metering::metrics::LimitCounters,
    ) -> anyhow::Result<Arc<Self>> {
        let process = process_nonce();
        let store = match &limits.backend {
            Backend::Memory => {
                let store = memory::MemoryStore::default();
                // Without a rule nothing is counted (a first rule added by a reload counts from then on, until
                // a restart reads the ledger): a gateway without limits does not read its month to start.
                if let Some(path) = ledger.filter(|_| !limits.rules.is_empty()) {
                    let now = Windows::now();
                    let seeded = seed::from_ledger(path, now, now.now_ms)?;
                    store.seed(&seeded);
                }
                Store::Memory(store)
            }
            Backend::Redis(url) => {
                let url = url.resolve()?;
                let holds = format!("{}:{process}", limits.instance);
                Store::Redis(redis::RedisStore::new(
                    &url,
                    limits.backend_timeout,
                    ledger,
                    &limits.instance,
                    holds,
                    &counters,
                )?)
            }
        };
        Ok(Arc::new(Self { store, next_id: AtomicU64::new(0), counters }))
    }

    /// A memory limiter of its own, for a snapshot built apart from a running gateway (`check`, tests); a
    /// gateway's snapshots share the one it started with.
    pub fn unshared() -> Arc<Self> {
        Arc::new(Self {
            store: Store::Memory(memory::MemoryStore::default()),
            next_id: AtomicU64::new(0),
            counters: crate::metering::metrics::LimitCounters::default(),
        })
    }

    /// Reserves `demand` against `subjects` (the request's project, tag values and key), as limits in `snapshot`
    /// say: the request's hold, or the refusal of the first limit that does not admit it. No subject, no work.
    pub async fn admit(
        &self,
        snapshot: &Snapshot,
        project: &str,
        subjects: Subjects,
        demand: Demand,
    ) -> Result<Option<Hold>, GatewayError> {
        if subjects.is_empty() {
            return Ok(None);
        }
        // A budget counts spend at the gateway's prices: a model it has no price for would spend it unseen.
        if demand.billed && !demand.priced {
            let budgeted = subjects.iter().find(|c| c.limits.iter().any(|(k, _)| k.is_budget()));
            if let Some(counted) = budgeted {
                self.counters.rejected(project, &counted.id, "unpriced_model");
                return Err(GatewayError::ModelNotPriced(counted.id.to_string()));
            }
        }
        let limits = &snapshot.config.limits;
        let windows = Windows::now();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut hold = Hold { id, windows, subjects, reserved: demand.amounts, billed: demand.billed, in_store: true };
        let expires_ms = windows.now_ms + u64::try_from(limits.reservation_ttl.as_millis()).unwrap_or(u64::MAX / 2);
        let answer = match &self.store {
            Store::Memory(store) => Ok(store.admit(&hold, demand.billed, expires_ms)),
            Store::Redis(store) => store.admit(&hold, snapshot).await,
        };
        match answer {
            Ok(Admit::Admitted) => {
                self.counters.in_flight.inc();
                Ok(Some(hold))
            }
            Ok(Admit::Refused { index, kind, used }) => {
                let counted = &hold.subjects[index];
                let limit = counted.limits.iter().find(|(k, _)| *k == kind).map_or(0, |(_, n)| *n);
                let reset_ms = match kind {
                    Kind::UsdPerDay => windows.day_end_ms(),
                    Kind::UsdPerMonth => windows.month_end_ms(),
                    _ => windows.now_ms + u64::try_from(windows.minute_left().as_millis()).unwrap_or(60_000),
                };
                let refusal = Refusal {
                    subject: counted.id.to_string(),
                    kind,
                    limit,
                    used,
                    requested: demand.amounts.of(kind),
                    reset_ms,
                    reset_in: Duration::from_millis(reset_ms.saturating_sub(windows.now_ms)),
                };
                self.counters.rejected(project, &refusal.subject, kind.name());
                Err(GatewayError::LimitExceeded(Box::new(refusal)))
            }
            // Rebuilding failed or timed out: as if the store could not be reached.
            Ok(Admit::Unseeded) | Err(_) => {
                if let Err(e) = &answer {
                    tracing::debug!(error = %e, "limits store unavailable at admission");
                }
                match limits.on_backend_error {
                    OnBackendError::Allow => {
                        self.counters.backend_decision("allowed");
                        hold.in_store = false;
                        self.counters.in_flight.inc();
                        Ok(Some(hold))
                    }
                    OnBackendError::Deny => {
                        // (An admission Redis runs after this gave up on it is released as it answers.)
                        self.counters.backend_decision("denied");
                        Err(GatewayError::LimitsUnavailable)
                    }
                }
            }
        }
    }

    /// Replaces `hold`'s reservation with what its request used (`used`; its request is counted already). A
    /// settle the store cannot take now is kept and retried once it is back.
    pub fn settle(&self, hold: &Hold, used: Amounts) -> Option<Followup> {
        self.counters.in_flight.dec();
        let used = Amounts { requests: 0, ..used };
        // A request that bills nothing reserved nothing: its request is all it counts, counted at admission.
        if !hold.billed && used == Amounts::default() {
            return None;
        }
        match &self.store {
            Store::Memory(store) => {
                store.settle(hold, used, Windows::now());
                None
            }
            Store::Redis(store) => Some(store.settle(hold.clone(), used, Windows::now())),
        }
    }

    /// Releases reservations past their expiry, and publishes every limit of `snapshot` with its use.
    pub async fn sweep(&self, snapshot: &Snapshot) {
        let now = Windows::now();
        let rules: Vec<Arc<Counted>> = snapshot.limited.clone();
        let used = match &self.store {
            Store::Memory(store) => Ok(store.sweep_and_read(&rules, now)),
            Store::Redis(store) => store.read(&rules, now, Some(snapshot.ledger.clone())).await,
        };
        match used {
            Ok(used) => self.counters.statuses(statuses(&rules, &used, now)),
            Err(e) => tracing::debug!(error = %e, "limits sweep failed"),
        }
    }

    /// Every limit of `snapshot` with its use now (read from the store, not from the last sweep).
    pub async fn status(&self, snapshot: &Snapshot) -> Result<Vec<Status>, StoreError> {
        let now = Windows::now();
        let rules: Vec<Arc<Counted>> = snapshot.limited.clone();
        let used = match &self.store {
            Store::Memory(store) => store.sweep_and_read(&rules, now),
            Store::Redis(store) => store.read(&rules, now, None).await?,
        };
        Ok(statuses(&rules, &used, now))
    }

    /// Runs the sweeper until the process ends: every second, releases expired reservations and refreshes the
    /// limits' metrics from the store.
    pub fn spawn_sweeper(self: &Arc<Self>, live: Arc<crate::live::Live>) {
        let limiter = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(limiter) = limiter.upgrade() else { return };
                let snapshot = live.load();
                if snapshot.config.limits.rules.is_empty()
                    && limiter.counters.in_flight.get() == 0
                    && !limiter.has_kept()
                {
                    continue;
                }
                limiter.sweep(&snapshot).await;
            }
        });
    }

    /// Whether settles are kept for a store that did not take them (never, for memory).
    fn has_kept(&self) -> bool {
        matches!(&self.store, Store::Redis(store) if store.has_kept())
    }

    /// At shutdown, once every request has ended: a Redis store's settles not yet taken are replayed or written
    /// beside the ledger for the next start.
    pub async fn finish(&self) {
        if let Store::Redis(store) = &self.store {
            store.finish().await;
        }
    }

    /// Whether the store answers (always, for memory).
    pub fn store_up(&self) -> bool {
        match &self.store {
            Store::Memory(_) => true,
            Store::Redis(store) => store.is_up(),
        }
    }
}

/// Eight random hex digits: hold ids in Redis stay unique across restarts, and should two processes share an
/// instance name.
fn process_nonce() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..8].to_owned()
}

/// Each rule's limits with what `used` (by subject and kind) says of them.
fn statuses(rules: &[Arc<Counted>], used: &BTreeMap<(Arc<str>, Kind), u64>, now: Windows) -> Vec<Status> {
    let mut out = Vec::new();
    for rule in rules {
        for (kind, max) in &rule.limits {
            let used = used.get(&(rule.id.clone(), *kind)).copied().unwrap_or(0);
            let (scale, resets) = match kind {
                Kind::UsdPerDay => (NANOS_PER_USD, now.day_end_ms()),
                Kind::UsdPerMonth => (NANOS_PER_USD, now.month_end_ms()),
                _ => (1.0, now.now_ms + u64::try_from(now.minute_left().as_millis()).unwrap_or(0)),
            };
            out.push(Status {
                subject: rule.id.to_string(),
                limit: kind.name(),
                max: *max as f64 / scale,
                used: used as f64 / scale,
                remaining: max.saturating_sub(used) as f64 / scale,
                resets_at: window::rfc3339(resets),
            });
        }
    }
    out
}

/// Settles each request's hold as its record ends, with the usage metered.
#[derive(Debug)]
pub struct LimitsSink;

impl Sink for LimitsSink {
    fn record(&self, r: &Record) -> Option<Followup> {
        let hold = r.hold.as_ref()?;
        let usage = r.usage.unwrap_or_default();
        let seen = Amounts { requests: 0, input: usage.input, output: usage.output, nanos: r.cost.map_or(0, nanos) };
        // Upstream answered and billed it, but its usage could not be read (a stream cut before its usage, a
        // compressed answer, a background response): the gateway cannot say how much it used, so its worst case,
        // as reserved, counts.
        let unread = r.forwarded && (200..300).contains(&r.status) && r.unmetered.is_some();
        let used = match unread {
            true => Amounts {
                requests: 0,
                input: seen.input.max(hold.reserved.input),
                output: seen.output.max(hold.reserved.output),
                nanos: seen.nanos.max(hold.reserved.nanos),
            },
            false => seen,
        };
        r.snapshot.limiter.settle(hold, used)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the memory store of a limiter started with `rules` on a ledger holding one $1.50 request of project
    /// A today says A spent today.
    fn rebuilt_spend(rules: &str) -> u64 {
        let dir = std::env::temp_dir().join(format!("mantlegate-limiter-start-{}-{}", std::process::id(), rules.len()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let ledger = dir.join("usage.jsonl");
        let now = Windows::now();
        let line = format!(
            r#"{{"time":"{}","project":"A","tags":{{}},"input_tokens":1,"output_tokens":1,"cost_usd":1.5}}"#,
            window::rfc3339(now.now_ms.saturating_sub(1))
        );
        std::fs::write(&ledger, line + "\n").expect("ledger");
        let config = crate::Config::from_toml(&format!(
            "[callers]\nauth = \"none\"\n[[projects]]\nname = \"A\"\nid = \"proj_a\"\n[limits]\nbackend = \"memory\"\n{rules}"
        ))
        .expect("config");
        let limiter = Limiter::start(&config.limits, Some(&ledger), Default::default()).expect("limiter");
        let Store::Memory(store) = &limiter.store else { panic!("memory") };
        let a = Arc::new(Counted::new(Subject::Project("A".into()), vec![(Kind::UsdPerDay, u64::MAX)]));
        let used = store.sweep_and_read(std::slice::from_ref(&a), now)[&(a.id.clone(), Kind::UsdPerDay)];
        std::fs::remove_dir_all(&dir).expect("cleanup");
        used
    }

    #[test]
    fn the_memory_store_reads_the_ledger_at_start_only_when_a_rule_counts() {
        assert_eq!(rebuilt_spend("[[limits.rules]]\nproject = \"A\"\nrequests_per_minute = 10\n"), nanos(1.5));
        // No rule, nothing counted: a gateway without limits does not read its month to start.
        assert_eq!(rebuilt_spend(""), 0);
    }
}
