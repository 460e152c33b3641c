//! A request on its way through the gateway: what its phases have learned so far. It lives as long as the
//! request does (in the handler, then in the response body) and ends exactly once, however the request ends:
//! its response body finished, the gateway answered itself, or the caller went away (the body, or the handler
//! still waiting for upstream, dropped). Ending builds the [`Record`] and hands it to the thread's sinks.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use http::{HeaderValue, Method, StatusCode};
use tokio::time::Instant;

use super::Worker;
use crate::attribution::{Attribution, Source};
use crate::endpoint::Endpoint;
use crate::error::GatewayError;
use crate::metering::Unmetered;
use crate::metering::usage::UsageTap;
use crate::record::Record;
use crate::snapshot::{Key, Project, Snapshot};
use crate::telemetry::Stamp;

/// A request's record in the making.
pub struct InFlight {
    worker: Arc<Worker>,
    snapshot: Arc<Snapshot>,
    started: Instant,
    request_id: HeaderValue,
    method: Method,
    path: String,
    endpoint: Option<Endpoint>,
    key: Option<Arc<Key>>,
    project: Option<(Arc<Project>, Source)>,
    model: Option<String>,
    status: Option<StatusCode>,
    error: Option<&'static str>,
    forwarded: bool,
    hold: Option<crate::limits::Hold>,
    refused_by: Option<String>,
    stream: bool,
    /// The usage tap on the response body, if it is read for usage.
    pub tap: Option<UsageTap>,
    /// A response the tap should have read came compressed, and so passed unread.
    encoded: bool,
    ttfb: Option<Duration>,
    body_ended: bool,
    stream_error: Option<String>,
    /// The request's tracing span, made the first time the request logs a line: making one for every request
    /// (the JSON subscriber formats its fields as it is made) cost 4.1k instructions, 7% of a JSON request.
    /// Boxed: most requests never make one, and a stream's record lives as long as the stream.
    span: Option<Box<tracing::Span>>,
}

impl InFlight {
    /// A request that has just arrived, served under `snapshot` by `worker`.
    pub fn start(
        worker: Arc<Worker>,
        snapshot: Arc<Snapshot>,
        request_id: HeaderValue,
        method: &Method,
        path: &str,
    ) -> Self {
        Self {
            worker,
            snapshot,
            started: Instant::now(),
            request_id,
            method: method.clone(),
            path: super::access_log::logged_path(path),
            endpoint: None,
            key: None,
            project: None,
            model: None,
            status: None,
            error: None,
            forwarded: false,
            hold: None,
            refused_by: None,
            stream: false,
            tap: None,
            encoded: false,
            ttfb: None,
            body_ended: false,
            stream_error: None,
            span: None,
        }
    }

    /// The request id.
    pub fn request_id(&self) -> &HeaderValue {
        &self.request_id
    }

    /// The request's span, `request` with its `request_id`: a line logged in it names the request as its
    /// access line does.
    pub fn span(&mut self) -> &tracing::Span {
        let request_id = &self.request_id;
        self.span.get_or_insert_with(|| {
            Box::new(tracing::info_span!("request", request_id = request_id.to_str().unwrap_or("-")))
        })
    }

    /// The path named `endpoint`.
    pub fn routed(&mut self, endpoint: Endpoint) {
        self.endpoint = Some(endpoint);
    }

    /// The caller presented `key`.
    pub fn caller(&mut self, key: Option<&Arc<Key>>) {
        self.key = key.cloned();
    }

    /// The request belongs to this project.
    pub fn attributed(&mut self, attribution: &Attribution<'_>) {
        self.project = Some((attribution.project.clone(), attribution.source));
    }

    /// The model the request body names (only ever a well-formed model id).
    pub fn model(&mut self, model: Option<String>) {
        self.model = model;
    }

    /// Whether the request body named the model.
    pub fn knows_model(&self) -> bool {
        self.model.is_some()
    }

    /// Limits admitted the request with this reservation, settled as it ends.
    pub fn held(&mut self, hold: Option<crate::limits::Hold>) {
        self.hold = hold;
    }

    /// The gateway answered itself, with `error`; that answer is the whole response.
    pub fn refused(&mut self, error: &GatewayError) {
        self.status = Some(error.status());
        self.error = Some(error.code());
        if let GatewayError::LimitExceeded(refusal) = error {
            self.refused_by = Some(refusal.name());
        }
        self.body_ended();
    }

    /// Upstream answered with `status`; `stream` if the answer is an event stream.
    pub fn answered(&mut self, status: StatusCode, stream: bool) {
        self.status = Some(status);
        self.forwarded = true;
        self.stream = stream;
    }

    /// Whether the answer is an event stream.
    pub fn is_stream(&self) -> bool {
        self.stream
    }

    /// The answer came compressed, and its usage cannot be read.
    pub fn encoded(&mut self) {
        self.encoded = true;
    }

    /// Marks the first response byte (once).
    pub fn first_byte(&mut self) {
        if self.ttfb.is_none() {
            self.ttfb = Some(self.started.elapsed());
        }
    }

    /// Marks the response body as fully sent.
    pub fn body_ended(&mut self) {
        self.first_byte();
        self.body_ended = true;
    }

    /// Records why a response body stopped early.
    pub fn stream_error(&mut self, error: &(dyn std::error::Error + 'static)) {
        self.stream_error = Some(super::access_log::error_chain(error));
    }

    /// The finished record.
    fn record(&mut self) -> Record {
        let usage = self.tap.as_ref().and_then(UsageTap::usage);
        let model = self.model.take().or_else(|| self.tap.as_ref().and_then(UsageTap::model).map(str::to_owned));
        // A stream is complete only if it reached its protocol's end, not merely the end of the connection.
        let complete = self.body_ended && self.tap.as_ref().is_none_or(UsageTap::finished);
        // Dropped while unwinding: the gateway failed, whatever the caller did.
        let failed = std::thread::panicking();
        let incomplete_reason = match (self.stream_error.take(), self.body_ended, complete) {
            (Some(e), _, _) => Some(e),
            (None, false, _) if failed => Some("the gateway failed while serving it".to_owned()),
            (None, false, _) if self.worker.closing.load(Ordering::Acquire) => {
                Some("the gateway shut down before the response ended".to_owned())
            }
            (None, false, _) => Some("client went away before the response ended".to_owned()),
            (None, true, false) => Some("stream ended without its end marker".to_owned()),
            (None, true, true) => None,
        };
        let unmetered = match &self.tap {
            _ if self.encoded => Some(Unmetered::Encoded),
            // Cut before its final count: what was seen (perhaps nothing) is recorded, and marked.
            Some(tap) if !complete && !tap.usage_final() => Some(Unmetered::Incomplete),
            Some(_) if usage.is_none() => Some(Unmetered::NoUsage),
            _ => None,
        };
        // A response that names no model is never priced.
        let cost = usage.and_then(|u| Some(self.snapshot.prices.get(model.as_deref()?)?.cost(&u)));
        Record {
            snapshot: self.snapshot.clone(),
            request_id: self.request_id.clone(),
            method: std::mem::take(&mut self.method),
            path: std::mem::take(&mut self.path),
            endpoint: self.endpoint,
            key: self.key.take(),
            project: self.project.take(),
            model,
            stream: self.stream,
            status: self.status.map_or(if failed { 500 } else { 499 }, |s| s.as_u16()),
            error: self.error,
            forwarded: self.forwarded,
            hold: self.hold.take(),
            refused_by: self.refused_by.take(),
            usage,
            cost,
            unmetered,
            complete,
            incomplete_reason,
            duration: self.started.elapsed(),
            ttfb: self.ttfb,
            time: Stamp::new(SystemTime::now()),
        }
    }
}

impl Drop for InFlight {
    /// The request's end, whichever way it came.
    fn drop(&mut self) {
        let record = self.record();
        self.worker.sinks.end(record);
    }
}
