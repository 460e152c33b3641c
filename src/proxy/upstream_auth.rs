//! Whether upstream accepts the gateway's own credential. A caller's key never reaches upstream, so an upstream
//! 401 or 403 (with the gateway's key, not a caller's passed through) is always the gateway's problem: callers
//! get 502 `upstream_auth_failed` instead of an error their SDK would blame on their own key, each refusal is
//! counted (`mantlegate_upstream_auth_failures_total`), the operator gets one error line per burst (not one per
//! request), and `/readyz` says so while no request has been accepted since.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use prometheus_client::metrics::counter::Counter;

/// How long after an error line further refusals are only counted.
const BURST: Duration = Duration::from_secs(60);

/// The gateway's credential as upstream last judged it.
#[derive(Debug)]
pub struct UpstreamAuth {
    /// Set by a refusal, cleared by the next answer that is not one: read by every request, written rarely.
    failing: AtomicBool,
    state: Mutex<State>,
    refusals: Counter,
}

#[derive(Debug, Default)]
struct State {
    /// When the last error line was written, and refusals since.
    logged: Option<Instant>,
    since_logged: u64,
    /// The last refusal: when, and upstream's status.
    last: Option<(SystemTime, u16)>,
}

impl UpstreamAuth {
    /// Refusals are counted on `refusals`.
    pub fn new(refusals: Counter) -> Self {
        Self { failing: AtomicBool::new(false), state: Mutex::default(), refusals }
    }

    /// Upstream refused the gateway's credential with `status`: returns whether to log it (the first of a burst),
    /// with how many refusals went unlogged before it.
    pub fn refused(&self, status: u16) -> Option<u64> {
        self.refusals.inc();
        self.failing.store(true, Ordering::Release);
        let mut state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        state.last = Some((SystemTime::now(), status));
        let now = Instant::now();
        if state.logged.is_some_and(|at| now.duration_since(at) < BURST) {
            state.since_logged += 1;
            return None;
        }
        state.logged = Some(now);
        Some(std::mem::take(&mut state.since_logged))
    }

    /// Upstream answered a request without refusing the credential.
    pub fn accepted(&self) {
        // A load per request, a store only after a refusal: the line stays shared between threads.
        if self.failing.load(Ordering::Acquire) && self.failing.swap(false, Ordering::AcqRel) {
            tracing::info!("upstream accepts the gateway's credential again");
        }
    }

    /// The last refusal, while no request has been accepted since.
    pub fn failing_since(&self) -> Option<(SystemTime, u16)> {
        if !self.failing.load(Ordering::Acquire) {
            return None;
        }
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner).last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_burst_every_refusal_counted_and_an_acceptance_clears_it() {
        let counter = Counter::default();
        let auth = UpstreamAuth::new(counter.clone());
        assert_eq!(auth.failing_since(), None);
        assert_eq!(auth.refused(401), Some(0), "the first is logged");
        assert_eq!(auth.refused(401), None);
        assert_eq!(auth.refused(403), None);
        assert_eq!(counter.get(), 3);
        assert_eq!(auth.failing_since().map(|(_, status)| status), Some(403));
        // A burst later: logged again, saying how many went unlogged.
        auth.state.lock().expect("lock").logged = Some(Instant::now() - BURST);
        assert_eq!(auth.refused(401), Some(2));
        auth.accepted();
        assert_eq!(auth.failing_since(), None);
    }
}
