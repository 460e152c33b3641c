//! What a request leaves behind, and where it goes. Every request, forwarded or refused, ends in exactly one
//! [`Record`]: a plain value built once, when the response has ended (or the caller has gone), and handed to
//! each [`Sink`] in turn: the metrics, the usage ledger, the access log. A sink that has work to wait for (a
//! shared store to update, say) returns it as a [`Followup`], which runs after the request, off its path; the
//! gateway waits for follow-ups still running before it exits.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Method};
use tokio_util::task::TaskTracker;

use crate::attribution::Source;
use crate::endpoint::Endpoint;
use crate::metering::Unmetered;
use crate::metering::usage::Usage;
use crate::snapshot::{Key, Project, Snapshot};
use crate::telemetry::Stamp;

/// A finished request.
#[derive(Debug)]
pub struct Record {
    /// The configuration the request was served under: its keys, projects, prices and ledger.
    pub snapshot: Arc<Snapshot>,
    /// `x-request-id`, the caller's or the gateway's.
    pub request_id: HeaderValue,
    /// The request method.
    pub method: Method,
    /// The request path, without its query, cut to a bounded length (it is caller input).
    pub path: String,
    /// The endpoint, if the path named one.
    pub endpoint: Option<Endpoint>,
    /// The caller's key (none for trusted callers, or when the key was refused).
    pub key: Option<Arc<Key>>,
    /// The project the request was attributed to, and how.
    pub project: Option<(Arc<Project>, Source)>,
    /// The model, from the request body where it was read, else from the response.
    pub model: Option<String>,
    /// Whether the response was an event stream.
    pub stream: bool,
    /// The response status; 499 when the caller left before the response head.
    pub status: u16,
    /// The gateway's own error code, for answers it gave itself.
    pub error: Option<&'static str>,
    /// Whether upstream answered (the request may bill tokens).
    pub forwarded: bool,
    /// Its reservation against limits, to settle.
    pub hold: Option<crate::limits::Hold>,
    /// The limit that refused it (`project:Name/usd_per_day`).
    pub refused_by: Option<String>,
    /// Tokens seen.
    pub usage: Option<Usage>,
    /// What the usage cost at the snapshot's prices (none for an unpriced model).
    pub cost: Option<f64>,
    /// Why a response that bills tokens went unmetered.
    pub unmetered: Option<Unmetered>,
    /// Whether the response ended as its protocol says it should.
    pub complete: bool,
    /// Why it did not.
    pub incomplete_reason: Option<String>,
    /// From the request's arrival to the end of its response.
    pub duration: Duration,
    /// From the request's arrival to the first response byte.
    pub ttfb: Option<Duration>,
    /// When it ended.
    pub time: Stamp,
}

impl Record {
    /// The project's name, if the request had one.
    pub fn project(&self) -> Option<&Project> {
        self.project.as_ref().map(|(p, _)| &**p)
    }
}

/// Work a sink returns to be done after a request.
pub type Followup = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Takes each finished request's record.
pub trait Sink: Send + Sync {
    /// Called once per request, on the thread that served it, as the request ends: must not block. What has to
    /// wait goes in the returned follow-up.
    fn record(&self, record: &Record) -> Option<Followup>;
}

/// The sinks every record goes to, in order, and the follow-ups still running.
#[derive(Clone)]
pub struct Sinks {
    sinks: Arc<[Arc<dyn Sink>]>,
    followups: TaskTracker,
}

impl std::fmt::Debug for Sinks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sinks").field("sinks", &self.sinks.len()).field("followups", &self.followups.len()).finish()
    }
}

impl Sinks {
    /// Records go to `sinks`, in order.
    pub fn new(sinks: Vec<Arc<dyn Sink>>) -> Self {
        Self { sinks: sinks.into(), followups: TaskTracker::new() }
    }

    /// The end of a request: its record goes to every sink; follow-ups run on the current runtime.
    pub fn end(&self, record: Record) {
        for sink in self.sinks.iter() {
            if let Some(followup) = sink.record(&record) {
                match tokio::runtime::Handle::try_current() {
                    Ok(runtime) => drop(self.followups.spawn_on(followup, &runtime)),
                    Err(_) => {
                        let request_id = record.request_id.to_str().unwrap_or("-");
                        tracing::warn!(request_id, "no runtime left for a record's follow-up");
                    }
                }
            }
        }
    }

    /// Resolves once every follow-up started so far has finished.
    pub async fn followups_done(&self) {
        self.followups.close();
        self.followups.wait().await;
        self.followups.reopen();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// A sink that counts records, and follow-ups that have run.
    #[derive(Default)]
    struct Counting {
        records: AtomicUsize,
        followups: Arc<AtomicUsize>,
    }

    impl Sink for Counting {
        fn record(&self, record: &Record) -> Option<Followup> {
            assert_eq!(record.status, 200);
            self.records.fetch_add(1, Ordering::SeqCst);
            let followups = self.followups.clone();
            Some(Box::pin(async move {
                tokio::task::yield_now().await;
                followups.fetch_add(1, Ordering::SeqCst);
            }))
        }
    }

    #[tokio::test]
    async fn every_sink_takes_each_record_once_and_its_followups_are_waited_for() {
        let (a, b) = (Arc::new(Counting::default()), Arc::new(Counting::default()));
        let sinks = Sinks::new(vec![a.clone(), b.clone()]);
        let snapshot = Arc::new(crate::snapshot::tests::snapshot("[callers]\nauth = \"none\""));
        for _ in 0..3 {
            sinks.end(Record {
                snapshot: snapshot.clone(),
                request_id: HeaderValue::from_static("rid"),
                method: Method::GET,
                path: "/v1/models".into(),
                endpoint: Some(Endpoint::ModelsList),
                key: None,
                project: None,
                model: None,
                stream: false,
                status: 200,
                error: None,
                forwarded: true,
                hold: None,
                refused_by: None,
                usage: None,
                cost: None,
                unmetered: None,
                complete: true,
                incomplete_reason: None,
                duration: Duration::ZERO,
                ttfb: None,
                time: Stamp::new(std::time::SystemTime::now()),
            });
        }
        sinks.followups_done().await;
        for sink in [a, b] {
            assert_eq!((sink.records.load(Ordering::SeqCst), sink.followups.load(Ordering::SeqCst)), (3, 3));
        }
    }
}
