//! The memory backend: every subject's counters in this process, behind one lock (an admission checks and
//! reserves across all of a request's subjects at once, and holds it for a few hundred nanoseconds).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};

use super::seed::Seeded;
use super::{Admit, Amounts, Counted, Hold, Windows};
use crate::config::limits::Kind;

/// One subject's counters, each for the window it was last counted in.
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    minute: u64,
    requests: u64,
    input: u64,
    output: u64,
    day: u64,
    day_nanos: u64,
    month: u64,
    month_nanos: u64,
}

impl Tally {
    /// Starts each window that has moved on since it was last counted in.
    fn roll(&mut self, w: &Windows) {
        if self.minute != w.minute {
            (self.minute, self.requests, self.input, self.output) = (w.minute, 0, 0, 0);
        }
        if self.day != w.day {
            (self.day, self.day_nanos) = (w.day, 0);
        }
        if self.month != w.month {
            (self.month, self.month_nanos) = (w.month, 0);
        }
    }

    fn used(&self, kind: Kind) -> u64 {
        match kind {
            Kind::RequestsPerMinute => self.requests,
            Kind::InputTokensPerMinute => self.input,
            Kind::OutputTokensPerMinute => self.output,
            Kind::UsdPerDay => self.day_nanos,
            Kind::UsdPerMonth => self.month_nanos,
        }
    }

    /// Adds `a` (the counters are in `a`'s windows: rolled to them first).
    fn add(&mut self, a: &Amounts) {
        self.requests += a.requests;
        self.input += a.input;
        self.output += a.output;
        self.day_nanos += a.nanos;
        self.month_nanos += a.nanos;
    }

    /// Takes back what was reserved in windows `w`, from each counter still in its window (one that has moved on
    /// holds none of it). Requests stay counted.
    fn release(&mut self, w: &Windows, a: &Amounts) {
        if self.minute == w.minute {
            self.input = self.input.saturating_sub(a.input);
            self.output = self.output.saturating_sub(a.output);
        }
        if self.day == w.day {
            self.day_nanos = self.day_nanos.saturating_sub(a.nanos);
        }
        if self.month == w.month {
            self.month_nanos = self.month_nanos.saturating_sub(a.nanos);
        }
    }
}

/// A reservation the store holds.
#[derive(Debug)]
struct Held {
    expires_ms: u64,
    windows: Windows,
    subjects: Vec<Arc<str>>,
    reserved: Amounts,
}

#[derive(Debug, Default)]
struct State {
    tallies: HashMap<Arc<str>, Tally>,
    held: HashMap<String, Held>,
}

impl State {
    fn release(&mut self, held: &Held) {
        for id in &held.subjects {
            if let Some(tally) = self.tallies.get_mut(id) {
                tally.release(&held.windows, &held.reserved);
            }
        }
    }
}

/// Counters in this process.
#[derive(Debug, Default)]
pub struct MemoryStore(Mutex<State>);

impl MemoryStore {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Checks every limit of `hold`'s subjects against its reservation and, if all admit it, reserves it.
    pub fn admit(&self, hold: &Hold, billed: bool, expires_ms: u64) -> Admit {
        let w = &hold.windows;
        let mut state = self.lock();
        for (index, counted) in hold.subjects.iter().enumerate() {
            let tally = state.tallies.entry(counted.id.clone()).or_default();
            tally.roll(w);
            for (kind, limit) in &counted.limits {
                let amount = hold.reserved.of(*kind);
                let applies = amount > 0 || (billed && *kind != Kind::RequestsPerMinute);
                let used = tally.used(*kind);
                if applies && used.saturating_add(amount) > *limit {
                    return Admit::Refused { index, kind: *kind, used };
                }
            }
        }
        for counted in &hold.subjects {
            if let Some(tally) = state.tallies.get_mut(&counted.id) {
                tally.add(&hold.reserved);
            }
        }
        let subjects = hold.subjects.iter().map(|c| c.id.clone()).collect();
        state.held.insert(hold.id.clone(), Held { expires_ms, windows: *w, subjects, reserved: hold.reserved });
        Admit::Admitted
    }

    /// Releases `hold`'s reservation (if the store still holds it) and counts `used` in the windows of `now`.
    pub fn settle(&self, hold: &Hold, used: Amounts, now: Windows) {
        let mut state = self.lock();
        if let Some(held) = state.held.remove(&hold.id) {
            state.release(&held);
        }
        for counted in &hold.subjects {
            let tally = state.tallies.entry(counted.id.clone()).or_default();
            tally.roll(&now);
            tally.add(&used);
        }
    }

    /// Releases reservations past their expiry; what each of `rules`' limits has used now.
    pub fn sweep_and_read(&self, rules: &[Arc<Counted>], now: Windows) -> BTreeMap<(Arc<str>, Kind), u64> {
        let mut state = self.lock();
        let expired: Vec<String> =
            state.held.iter().filter(|(_, h)| h.expires_ms <= now.now_ms).map(|(id, _)| id.clone()).collect();
        for id in expired {
            if let Some(held) = state.held.remove(&id) {
                tracing::warn!(reservation = %id, "a reservation was never settled; released at its expiry");
                state.release(&held);
            }
        }
        let mut used = BTreeMap::new();
        for rule in rules {
            let mut tally = state.tallies.get(&rule.id).copied().unwrap_or_default();
            tally.roll(&now);
            for (kind, _) in &rule.limits {
                used.insert((rule.id.clone(), *kind), tally.used(*kind));
            }
        }
        used
    }

    /// How many reservations it holds.
    pub fn held(&self) -> usize {
        self.lock().held.len()
    }

    /// Adds what the ledger says was used in the windows still open.
    pub fn seed(&self, seeded: &Seeded) {
        let mut state = self.lock();
        for (subject, sums) in &seeded.subjects {
            let tally = state.tallies.entry(subject.as_str().into()).or_default();
            tally.roll(&seeded.windows);
            tally.requests += sums.requests;
            tally.input += sums.input;
            tally.output += sums.output;
            tally.day_nanos += sums.day_nanos;
            tally.month_nanos += sums.month_nanos;
        }
    }
}
