//! The memory backend: every subject's counters in this process, behind one lock (an admission checks and
//! reserves across all of a request's subjects at once, and holds it for a few hundred nanoseconds).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use super::seed::Seeded;
use rustc_hash::FxHashMap;

use super::{Admit, Amounts, Counted, Hold, Subjects, Windows};
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
    /// Starts each window that has moved on since it was last counted in. Only forward: a request that read the
    /// clock just before a window ended, and takes the lock just after another began it, counts in the new one
    /// rather than taking the counters back to the old.
    fn roll(&mut self, w: &Windows) {
        if w.minute > self.minute {
            (self.minute, self.requests, self.input, self.output) = (w.minute, 0, 0, 0);
        }
        if w.day > self.day {
            (self.day, self.day_nanos) = (w.day, 0);
        }
        if w.month > self.month {
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
        self.requests = self.requests.saturating_add(a.requests);
        self.input = self.input.saturating_add(a.input);
        self.output = self.output.saturating_add(a.output);
        self.day_nanos = self.day_nanos.saturating_add(a.nanos);
        self.month_nanos = self.month_nanos.saturating_add(a.nanos);
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
    subjects: Subjects,
    reserved: Amounts,
}

/// Keyed by subject id and hold id, with a fast hasher (the keys are the gateway's own names and numbers, not
/// the caller's: nothing to flood).
#[derive(Debug, Default)]
struct State {
    tallies: FxHashMap<Arc<str>, Tally>,
    held: FxHashMap<u64, Held>,
}

impl State {
    fn release(&mut self, held: &Held) {
        for counted in held.subjects.iter() {
            if let Some(tally) = self.tallies.get_mut(&counted.id) {
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
                // A spent budget stops a billed request that costs nothing by the gateway's prices (an unpriced
                // model): AWS bills it all the same.
                let spent = kind.is_budget() && used >= *limit;
                if applies && (used.saturating_add(amount) > *limit || spent) {
                    return Admit::Refused { index, kind: *kind, used };
                }
            }
        }
        for counted in hold.subjects.iter() {
            if let Some(tally) = state.tallies.get_mut(&counted.id) {
                tally.add(&hold.reserved);
            }
        }
        let subjects = hold.subjects.clone();
        state.held.insert(hold.id, Held { expires_ms, windows: *w, subjects, reserved: hold.reserved });
        Admit::Admitted
    }

    /// Releases `hold`'s reservation (if the store still holds it) and counts `used` in the windows of `now`.
    pub fn settle(&self, hold: &Hold, used: Amounts, now: Windows) {
        let mut state = self.lock();
        if let Some(held) = state.held.remove(&hold.id) {
            state.release(&held);
        }
        for counted in hold.subjects.iter() {
            let tally = state.tallies.entry(counted.id.clone()).or_default();
            tally.roll(&now);
            tally.add(&used);
        }
    }

    /// Releases reservations past their expiry; what each of `rules`' limits has used now.
    pub fn sweep_and_read(&self, rules: &[Arc<Counted>], now: Windows) -> BTreeMap<(Arc<str>, Kind), u64> {
        let mut state = self.lock();
        let expired: Vec<u64> =
            state.held.iter().filter(|(_, h)| h.expires_ms <= now.now_ms).map(|(id, _)| *id).collect();
        for id in expired {
            if let Some(held) = state.held.remove(&id) {
                tracing::warn!(
                    reservation = %id,
                    "a request has held its reservation longer than limits.reservation_ttl: released (its usage is \
                     still counted when it ends)"
                );
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
            let (day_nanos, month_nanos) = (sums.day_nanos, sums.month_nanos);
            let tally = state.tallies.entry(subject.as_str().into()).or_default();
            tally.roll(&seeded.windows);
            let sums = Amounts { requests: sums.requests, input: sums.input, output: sums.output, nanos: 0 };
            tally.add(&sums);
            tally.day_nanos = tally.day_nanos.saturating_add(day_nanos);
            tally.month_nanos = tally.month_nanos.saturating_add(month_nanos);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::limits::Subject;

    fn hold(id: u64, subjects: &[&Arc<Counted>], at: u64, reserved: Amounts) -> Hold {
        Hold {
            id,
            windows: Windows::at(at),
            subjects: subjects.iter().map(|c| Arc::clone(c)).collect(),
            reserved,
            billed: true,
            in_store: true,
        }
    }

    fn used(store: &MemoryStore, rule: &Arc<Counted>, kind: Kind, at: u64) -> u64 {
        store.sweep_and_read(std::slice::from_ref(rule), Windows::at(at))[&(rule.id.clone(), kind)]
    }

    const T: u64 = 1_798_761_600_000; // 2027-01-01T00:00:00Z

    #[test]
    fn every_limit_must_admit_and_all_are_reserved_together() {
        let store = MemoryStore::default();
        let project = Arc::new(Counted::new(Subject::Project("P".into()), vec![(Kind::OutputTokensPerMinute, 100)]));
        let tag = Arc::new(Counted::new(Subject::Tag("Team".into(), "t".into()), vec![(Kind::UsdPerDay, 1000)]));
        let ask = |output, nanos| Amounts { requests: 1, input: 10, output, nanos };
        assert!(matches!(store.admit(&hold(1, &[&project, &tag], T, ask(60, 600)), true, T + 1000), Admit::Admitted));
        // The tag's budget has room, the project's rate has not: refused, and nothing of it reserved anywhere.
        match store.admit(&hold(2, &[&project, &tag], T, ask(50, 100)), true, T + 1000) {
            Admit::Refused { index: 0, kind: Kind::OutputTokensPerMinute, used: 60 } => {}
            other => panic!("{other:?}"),
        }
        assert_eq!(used(&store, &tag, Kind::UsdPerDay, T), 600);
        // A spent budget (used up exactly, or a budget of 0) stops a billed request that costs nothing (an
        // unpriced model), not an unbilled one.
        let spent = Arc::new(Counted::new(Subject::Key("k".into()), vec![(Kind::UsdPerDay, 5)]));
        store.settle(&hold(6, &[&spent], T, Amounts::default()), ask(0, 5), Windows::at(T));
        assert!(matches!(store.admit(&hold(3, &[&spent], T, ask(0, 0)), true, T + 1000), Admit::Refused { .. }));
        assert!(matches!(store.admit(&hold(4, &[&spent], T, ask(0, 0)), false, T + 1000), Admit::Admitted));
        let zero = Arc::new(Counted::new(Subject::Key("z".into()), vec![(Kind::UsdPerMonth, 0)]));
        assert!(matches!(store.admit(&hold(5, &[&zero], T, ask(0, 0)), true, T + 1000), Admit::Refused { .. }));
    }

    #[test]
    fn settling_replaces_the_reservation_with_the_usage_once() {
        let store = MemoryStore::default();
        let p = Arc::new(Counted::new(
            Subject::Project("P".into()),
            vec![(Kind::UsdPerMonth, 10_000), (Kind::RequestsPerMinute, 9)],
        ));
        let h = hold(1, &[&p], T, Amounts { requests: 1, input: 100, output: 100, nanos: 5000 });
        assert!(matches!(store.admit(&h, true, T + 1000), Admit::Admitted));
        assert_eq!(used(&store, &p, Kind::UsdPerMonth, T), 5000);
        store.settle(&h, Amounts { requests: 0, input: 40, output: 2, nanos: 700 }, Windows::at(T + 10));
        assert_eq!(used(&store, &p, Kind::UsdPerMonth, T + 10), 700);
        // Requests stay counted.
        assert_eq!(used(&store, &p, Kind::RequestsPerMinute, T + 10), 1);
        assert_eq!(store.held(), 0);
    }

    #[test]
    fn an_unsettled_reservation_is_released_at_its_expiry_and_a_late_settle_counts_the_usage() {
        let store = MemoryStore::default();
        let p = Arc::new(Counted::new(Subject::Project("P".into()), vec![(Kind::UsdPerDay, 10_000)]));
        let h = hold(1, &[&p], T, Amounts { requests: 1, input: 1, output: 1, nanos: 9000 });
        assert!(matches!(store.admit(&h, true, T + 1000), Admit::Admitted));
        assert_eq!(used(&store, &p, Kind::UsdPerDay, T + 999), 9000);
        assert_eq!(used(&store, &p, Kind::UsdPerDay, T + 1000), 0);
        assert_eq!(store.held(), 0);
        store.settle(&h, Amounts { nanos: 300, ..Amounts::default() }, Windows::at(T + 2000));
        assert_eq!(used(&store, &p, Kind::UsdPerDay, T + 2000), 300);
    }

    #[test]
    fn windows_move_on_and_a_reservation_is_taken_back_only_from_its_own() {
        let store = MemoryStore::default();
        let p = Arc::new(Counted::new(
            Subject::Project("P".into()),
            vec![(Kind::InputTokensPerMinute, 1000), (Kind::UsdPerDay, 10_000), (Kind::UsdPerMonth, 10_000)],
        ));
        // Reserved in the last second of a day (and month), settled in the next.
        let before = T - 1000;
        let h = hold(1, &[&p], before, Amounts { requests: 1, input: 500, output: 0, nanos: 4000 });
        assert!(matches!(store.admit(&h, true, before + 60_000), Admit::Admitted));
        store.settle(&h, Amounts { input: 100, nanos: 100, ..Amounts::default() }, Windows::at(T + 5));
        // The new windows hold the usage only; the old ones had their reservation taken back.
        assert_eq!(used(&store, &p, Kind::InputTokensPerMinute, T + 5), 100);
        assert_eq!(used(&store, &p, Kind::UsdPerDay, T + 5), 100);
        assert_eq!(used(&store, &p, Kind::UsdPerMonth, T + 5), 100);
    }
}
