//! The end of every request: one structured log line, the metrics, and the usage ledger line, all written
//! when the response is finished (its body ended, failed, or was dropped because the caller went away). The
//! record names the key by its configured name; it never holds a credential, a query string or a body byte.

use std::io::Write as _;
use std::os::fd::AsFd as _;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{HeaderValue, Method, StatusCode};
use tokio::time::Instant;

use crate::attribution::Source;
use crate::auth::KeyIdx;
use crate::config::ProjectIdx;
use crate::metering::usage::UsageTap;
use crate::metering::{Finished, Meter, millis};
use crate::telemetry::{JsonLine, Stamp};

/// The request's record, filled in phase by phase.
#[derive(Debug)]
pub struct AccessLog {
    meter: Arc<Meter>,
    started: Instant,
    request_id: HeaderValue,
    method: Method,
    path: String,
    /// The endpoint, once the route is known.
    pub endpoint: Option<crate::endpoint::Endpoint>,
    /// The caller's key.
    pub key: Option<KeyIdx>,
    /// The resolved project and how it was chosen.
    pub project: Option<(ProjectIdx, Source)>,
    /// The requested model, where the body was read.
    pub model: Option<String>,
    /// Response status.
    pub status: Option<StatusCode>,
    /// The gateway's error code, for errors it answered itself.
    pub error: Option<&'static str>,
    /// Whether upstream answered (so the request is billable).
    pub forwarded: bool,
    /// Whether the response is an event stream.
    pub stream: bool,
    /// Usage tap on the response body.
    pub tap: Option<UsageTap>,
    ttfb: Option<Duration>,
    body_ended: bool,
    stream_error: Option<String>,
}

/// Paths are caller input: keep what is logged bounded.
const MAX_LOGGED_PATH: usize = 256;

impl AccessLog {
    /// Starts the record for a request.
    pub fn start(meter: Arc<Meter>, request_id: HeaderValue, method: &Method, path: &str) -> Self {
        let path = match path.char_indices().nth(MAX_LOGGED_PATH) {
            Some((at, _)) => format!("{}...", &path[..at]),
            None => path.to_owned(),
        };
        Self {
            meter,
            started: Instant::now(),
            request_id,
            method: method.clone(),
            path,
            endpoint: None,
            key: None,
            project: None,
            model: None,
            status: None,
            error: None,
            forwarded: false,
            stream: false,
            tap: None,
            ttfb: None,
            body_ended: false,
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

    /// Marks the response body as fully sent.
    pub fn body_ended(&mut self) {
        self.first_byte();
        self.body_ended = true;
    }

    /// Records why a response body stopped early.
    pub fn stream_error(&mut self, error: &(dyn std::error::Error + 'static)) {
        self.stream_error = Some(error_chain(error));
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        let duration = self.started.elapsed();
        let usage = self.tap.as_ref().and_then(UsageTap::usage);
        let model = self.model.as_deref().or_else(|| self.tap.as_ref().and_then(UsageTap::model));
        let cost = usage.and_then(|u| self.meter.cost(model, &u));
        // A stream is complete only if it reached its protocol's end, not merely the end of the connection.
        let complete = self.body_ended && self.tap.as_ref().is_none_or(UsageTap::finished);
        let incomplete_reason = match (&self.stream_error, self.body_ended, complete) {
            (Some(e), _, _) => Some(e.as_str()),
            (None, false, _) => Some("client went away before the response ended"),
            (None, true, false) => Some("stream ended without its end marker"),
            (None, true, true) => None,
        };
        let status = self.status.map_or(499, |s| s.as_u16());
        let meter = &self.meter;
        if let Some(endpoint) = self.endpoint {
            meter.record(&Finished {
                request_id: self.request_id.to_str().unwrap_or("-"),
                key: self.key,
                project: self.project.map(|(p, _)| p),
                endpoint,
                model,
                stream: self.stream,
                status,
                usage,
                cost,
                duration,
                ttfb: self.ttfb,
                complete,
                forwarded: self.forwarded,
            });
        }
        if !tracing::enabled!(target: ACCESS_TARGET, tracing::Level::INFO) {
            return;
        }
        // In the shape of the other JSON log lines (`timestamp`, `level`, `target`, `message`, then the fields;
        // absent fields are left out), but written here rather than through a `tracing` event: the JSON
        // formatter's field visitor cost more than a third of the gateway's own CPU time per request.
        write_line(|text| {
            let mut line = JsonLine::open(text);
            line.str("timestamp", Stamp::new(SystemTime::now(), 6).as_str())
                .members(ACCESS_FIXED_MEMBERS)
                .str("request_id", self.request_id.to_str().unwrap_or("-"))
                .str("method", self.method.as_str())
                .str("path", &self.path);
            if let Some(endpoint) = self.endpoint {
                line.str("endpoint", endpoint.name());
            }
            if let Some(key) = self.key {
                line.members(meter.key_member(key));
            }
            if let Some((project, source)) = self.project {
                line.members(meter.project_members(project)).str("attribution", source.name());
            }
            if let Some(model) = model {
                line.str("model", model);
            }
            line.bool("stream", self.stream);
            if let Some(status) = self.status {
                line.u64("status", status.as_u16().into());
            }
            if let Some(error) = self.error {
                line.str("error", error);
            }
            if let Some(usage) = usage {
                line.u64("input_tokens", usage.input)
                    .u64("output_tokens", usage.output)
                    .u64("cached_input_tokens", usage.cached_input)
                    .u64("reasoning_tokens", usage.reasoning);
            }
            if let Some(cost) = cost {
                line.f64("cost_usd", cost);
            }
            line.f64("duration_ms", millis(duration));
            if let Some(ttfb) = self.ttfb {
                line.f64("ttfb_ms", millis(ttfb));
            }
            line.bool("complete", complete);
            if let Some(reason) = incomplete_reason {
                line.str("incomplete_reason", reason);
            }
            line.close();
        });
    }
}

/// The access log's target: `MANTLEGATE_LOG=info,mantlegate::access=off` turns the lines off.
macro_rules! access_target {
    () => {
        "mantlegate::access"
    };
}
const ACCESS_TARGET: &str = access_target!();

/// The members every access line has after its timestamp, written as one.
const ACCESS_FIXED_MEMBERS: &str =
    concat!(r#""level":"INFO","target":""#, access_target!(), r#"","message":"request""#);

/// Lines up to this long are written without stdout's lock: one `write` of at most this many bytes is atomic
/// on a pipe (POSIX `PIPE_BUF` on Linux), as any single `write` is on a regular file.
const ATOMIC_WRITE: usize = 4096;

thread_local! {
    /// This thread's own handle on stdout, a duplicate of descriptor 1 (same file, same offset), so that
    /// traffic threads writing their lines at once do not queue on the process-wide stdout lock.
    static STDOUT: Option<std::fs::File> =
        std::io::stdout().as_fd().try_clone_to_owned().ok().map(std::fs::File::from);
}

/// What a line buffer may keep of its capacity between lines (a line is a few hundred bytes; an error chain
/// can make one longer).
const KEPT_LINE_CAPACITY: usize = 16 * 1024;

thread_local! {
    /// This thread's buffer for its lines, reused so that a line costs no allocation.
    static LINE: std::cell::Cell<String> = const { std::cell::Cell::new(String::new()) };
}

/// Writes the line `fill` puts in the buffer to stdout with one `write`, so it never interleaves with
/// another log line.
fn write_line(fill: impl FnOnce(&mut String)) {
    // `try_with`: a request record dropped while its thread is being torn down still gets its line.
    let mut line = LINE.try_with(std::cell::Cell::take).unwrap_or_default();
    line.clear();
    fill(&mut line);
    line.push('\n');
    // Nothing useful can be done if stdout is gone; the request itself is unaffected.
    let written = line.len() <= ATOMIC_WRITE
        && STDOUT
            .try_with(|out| match out {
                Some(file) => {
                    let _ = (&*file).write_all(line.as_bytes());
                    true
                }
                None => false,
            })
            .unwrap_or(false);
    if !written {
        let _ = std::io::stdout().lock().write_all(line.as_bytes());
    }
    if line.capacity() <= KEPT_LINE_CAPACITY {
        let _ = LINE.try_with(|kept| kept.set(line));
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
