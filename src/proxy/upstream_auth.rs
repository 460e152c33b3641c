//! Whether upstream accepts the gateway's own credential. A caller's key never reaches upstream, so an upstream
//! refusal of the credential (with the gateway's key, not a caller's passed through: a 401, or a 403 whose code
//! says so, as `proxy` judges it) is always the gateway's problem: callers get 502 `upstream_auth_failed`
//! instead of an error their SDK would blame on their own key, each refusal is counted
//! (`mantlegate_upstream_auth_failures_total`), the operator gets one error line per burst (not one per request),
//! and `/readyz` says so until upstream shows it accepts the credential again ([`shows_acceptance`]).

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

    /// Upstream answered a request in a way that shows it accepted the credential (see [`shows_acceptance`]).
    /// After refusals, says so once, and ends the burst: the next refusal is logged again, however soon.
    pub fn accepted(&self) {
        // A load per request, a store only after a refusal: the line stays shared between threads.
        if self.failing.load(Ordering::Acquire) && self.failing.swap(false, Ordering::AcqRel) {
            let mut state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            state.logged = None;
            let unlogged = std::mem::take(&mut state.since_logged);
            drop(state);
            tracing::info!(unlogged_refusals = unlogged, "upstream accepts the gateway's credential again");
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

/// Whether an upstream answer with `status` shows that upstream accepted the gateway's credential: a success, or
/// a caller's error (400, 404, 413, ...), which upstream gives only after authentication. 401 and 403 may be
/// refusals, and a 429 or a 5xx can come before authentication (a throttle, an outage), so they say nothing.
pub fn shows_acceptance(status: http::StatusCode) -> bool {
    status.is_success()
        || (status.is_client_error()
            && !matches!(
                status,
                http::StatusCode::UNAUTHORIZED | http::StatusCode::FORBIDDEN | http::StatusCode::TOO_MANY_REQUESTS
            ))
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

    #[test]
    fn an_acceptance_ends_the_burst_so_the_next_refusal_is_logged_again() {
        let auth = UpstreamAuth::new(Counter::default());
        assert_eq!(auth.refused(401), Some(0));
        assert_eq!(auth.refused(401), None);
        auth.accepted();
        // Well within a minute of the first line, but a new burst.
        assert_eq!(auth.refused(403), Some(0), "the first refusal after an acceptance is logged");
        assert_eq!(auth.refused(403), None);
    }

    #[test]
    fn only_answers_that_show_the_credential_was_accepted_count() {
        let accepts = |code: u16| shows_acceptance(http::StatusCode::from_u16(code).expect("status"));
        for code in [200, 201, 204, 400, 404, 409, 413, 422] {
            assert!(accepts(code), "{code}");
        }
        for code in [401, 403, 429, 500, 502, 503, 504, 101, 304] {
            assert!(!accepts(code), "{code}");
        }
    }
}
