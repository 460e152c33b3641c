//! Real-time metering: tokens and cost per project, model and tag, from every response the gateway
//! forwards (streams included), into Prometheus metrics and a JSON-lines usage ledger. AWS billing lags a
//! day; this does not. Both are sinks of the request's record (`crate::record`).

pub mod ledger;
pub mod metrics;
pub mod prices;
pub mod spend;
pub mod usage;

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
