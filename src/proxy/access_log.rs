//! The one structured log line each request gets, written when its response is finished: when the body
//! ends, fails, or is dropped because the caller went away. It names the key by its configured name and
//! the project; it never holds a credential, a query string or a byte of a body.

use std::time::Duration;

use http::{HeaderValue, Method, StatusCode};
use tokio::time::Instant;

/// The request's log record, filled in phase by phase.
#[derive(Debug)]
pub struct AccessLog {
    started: Instant,
    request_id: HeaderValue,
    method: Method,
    path: String,
    /// The endpoint name, once the route is known.
    pub endpoint: Option<&'static str>,
    /// The caller's key name.
    pub key: Option<String>,
    /// The project's name.
    pub project: Option<String>,
    /// The project's id.
    pub project_id: Option<String>,
    /// Which attribution rule chose the project.
    pub attribution: Option<&'static str>,
    /// The requested model, where the body was read.
    pub model: Option<String>,
    /// Response status.
    pub status: Option<StatusCode>,
    /// The gateway's error code, for errors it answered itself.
    pub error: Option<&'static str>,
    ttfb: Option<Duration>,
    complete: bool,
    stream_error: Option<String>,
}

/// Paths are caller input: keep what is logged bounded.
const MAX_LOGGED_PATH: usize = 256;

impl AccessLog {
    /// Starts the record for a request.
    pub fn start(request_id: HeaderValue, method: &Method, path: &str) -> Self {
        let path = match path.char_indices().nth(MAX_LOGGED_PATH) {
            Some((at, _)) => format!("{}...", &path[..at]),
            None => path.to_owned(),
        };
        Self {
            started: Instant::now(),
            request_id,
            method: method.clone(),
            path,
            endpoint: None,
            key: None,
            project: None,
            project_id: None,
            attribution: None,
            model: None,
            status: None,
            error: None,
            ttfb: None,
            complete: false,
            stream_error: None,
        }
    }

    /// The request id this record carries.
    pub fn request_id(&self) -> &HeaderValue {
        &self.request_id
    }

    /// Marks the first response byte (once).
    pub fn first_byte(&mut self) {
        if self.ttfb.is_none() {
            self.ttfb = Some(self.started.elapsed());
        }
    }

    /// Marks the response as fully sent.
    pub fn complete(&mut self) {
        self.first_byte();
        self.complete = true;
    }

    /// Records why a response body stopped early.
    pub fn stream_error(&mut self, error: &(dyn std::error::Error + 'static)) {
        self.stream_error = Some(error_chain(error));
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        let duration = self.started.elapsed();
        let ms = |d: Duration| d.as_micros() as f64 / 1000.0;
        let incomplete_reason = match (&self.stream_error, self.complete) {
            (Some(e), _) => Some(e.as_str()),
            (None, false) => Some("client went away before the response ended"),
            (None, true) => None,
        };
        tracing::info!(
            target: "mantlegate::access",
            request_id = self.request_id.to_str().unwrap_or("-"),
            method = %self.method,
            path = %self.path,
            endpoint = self.endpoint,
            key = self.key.as_deref(),
            project = self.project.as_deref(),
            project_id = self.project_id.as_deref(),
            attribution = self.attribution,
            model = self.model.as_deref(),
            status = self.status.map(|s| s.as_u16()),
            error = self.error,
            duration_ms = ms(duration),
            ttfb_ms = self.ttfb.map(ms),
            complete = self.complete,
            incomplete_reason,
            "request"
        );
    }
}

/// An error and its sources on one line.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        line.push_str(": ");
        line.push_str(&e.to_string());
        source = e.source();
    }
    line
}
