//! The end of every request: one structured log line, the metrics, and the usage ledger line, all written
//! when the response is finished (its body ended, failed, or was dropped because the caller went away). The
//! record names the key by its configured name; it never holds a credential, a query string or a body byte.

use std::io::Write;
use std::os::fd::AsFd as _;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{HeaderValue, Method, StatusCode};
use tokio::time::Instant;

use crate::attribution::Source;
use crate::auth::KeyIdx;
use crate::config::ProjectIdx;
use crate::metering::usage::UsageTap;
use crate::metering::{Finished, Meter, Unmetered};
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
    /// Whether a response the tap should have read came compressed, and so passed unread.
    pub encoded: bool,
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
            encoded: false,
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
        let time = Stamp::new(SystemTime::now());
        let usage = self.tap.as_ref().and_then(UsageTap::usage);
        let model = self.model.as_deref().or_else(|| self.tap.as_ref().and_then(UsageTap::model));
        // A stream is complete only if it reached its protocol's end, not merely the end of the connection.
        let complete = self.body_ended && self.tap.as_ref().is_none_or(UsageTap::finished);
        let incomplete_reason = match (&self.stream_error, self.body_ended, complete) {
            (Some(e), _, _) => Some(e.as_str()),
            (None, false, _) if CLOSING.get() => Some("the gateway shut down before the response ended"),
            (None, false, _) => Some("client went away before the response ended"),
            (None, true, false) => Some("stream ended without its end marker"),
            (None, true, true) => None,
        };
        let unmetered = match &self.tap {
            _ if self.encoded => Some(Unmetered::Encoded),
            // Cut before its final count: what was seen (perhaps nothing) is recorded, and marked.
            Some(tap) if !complete && !tap.usage_final() => Some(Unmetered::Incomplete),
            Some(_) if usage.is_none() => Some(Unmetered::NoUsage),
            _ => None,
        };
        let status = self.status.map_or(499, |s| s.as_u16());
        let meter = &self.meter;
        let cost = self.endpoint.and_then(|endpoint| {
            meter.record(&Finished {
                request_id: self.request_id.to_str().unwrap_or("-"),
                key: self.key,
                project: self.project.map(|(p, _)| p),
                endpoint,
                model,
                stream: self.stream,
                status,
                usage,
                duration,
                ttfb: self.ttfb,
                complete,
                unmetered,
                forwarded: self.forwarded,
                time,
            })
        });
        if !tracing::enabled!(target: ACCESS_TARGET, tracing::Level::INFO) {
            return;
        }
        // In the shape of the other JSON log lines (`timestamp`, `level`, `target`, `message`, then the fields;
        // absent fields are left out), but written here rather than through a `tracing` event: the JSON
        // formatter's field visitor cost more than a third of the gateway's own CPU time per request.
        write_line(|text| {
            let mut line = JsonLine::open(text);
            line.str("timestamp", time.as_str())
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
            line.millis("duration_ms", duration);
            if let Some(ttfb) = self.ttfb {
                line.millis("ttfb_ms", ttfb);
            }
            line.bool("complete", complete);
            if let Some(reason) = incomplete_reason {
                line.str("incomplete_reason", reason);
            }
            if let Some(unmetered) = unmetered {
                line.str("unmetered", unmetered.name());
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
/// on a pipe (POSIX `PIPE_BUF` on Linux), as any single `write` is on a regular file. A batch of lines is
/// never longer, so lines from different threads never interleave.
const ATOMIC_WRITE: usize = 4096;

/// What a thread's line buffer may keep of its capacity between batches (an error chain can make a line
/// longer than a batch).
const KEPT_CAPACITY: usize = 16 * 1024;

/// A thread's lines not yet written, and its own handle on stdout.
struct Pending<W: Write = std::fs::File> {
    lines: String,
    /// Whether lines may wait for the thread's next `flush` (traffic threads), or are written at once.
    batched: bool,
    /// A duplicate of descriptor 1 (same file, same offset), so that traffic threads writing their lines at
    /// once do not queue on the process-wide stdout lock.
    out: Option<W>,
}

impl<W: Write> Pending<W> {
    /// Adds the line `fill` writes, and writes what is pending if this thread does not batch its lines or the
    /// line does not fit in the batch. A line is always written by one `write`, whole.
    fn push(&mut self, fill: impl FnOnce(&mut String)) {
        let start = self.lines.len();
        fill(&mut self.lines);
        self.lines.push('\n');
        if start > 0 && self.lines.len() > ATOMIC_WRITE {
            // The earlier lines go first, as one batch; the new one starts the next.
            self.write(start);
        }
        if !self.batched || self.lines.len() > ATOMIC_WRITE {
            self.flush();
        }
    }

    /// Writes the first `len` bytes pending (whole lines) and keeps the rest.
    fn write(&mut self, len: usize) {
        let batch = &self.lines.as_bytes()[..len];
        // Nothing useful can be done if stdout is gone; the requests themselves are unaffected.
        match &mut self.out {
            Some(out) if len <= ATOMIC_WRITE => drop(out.write_all(batch)),
            _ => drop(std::io::stdout().lock().write_all(batch)),
        }
        self.lines.drain(..len);
        if self.lines.is_empty() && self.lines.capacity() > KEPT_CAPACITY {
            self.lines = String::new();
        }
    }

    /// Writes everything pending.
    fn flush(&mut self) {
        if !self.lines.is_empty() {
            self.write(self.lines.len());
        }
    }
}

impl<W: Write> Drop for Pending<W> {
    fn drop(&mut self) {
        self.flush();
    }
}

thread_local! {
    static PENDING: std::cell::RefCell<Pending> = std::cell::RefCell::new(Pending {
        lines: String::new(),
        batched: false,
        out: std::io::stdout().as_fd().try_clone_to_owned().ok().map(std::fs::File::from),
    });
}

/// From now on this thread's access lines wait in a buffer of up to `ATOMIC_WRITE` bytes and are written
/// together, one `write` per batch instead of one per request (under load, a fifth of the system calls or
/// fewer), as nginx's `access_log ... buffer=` and Envoy's access log do. The thread must call [`flush`]
/// whenever it goes idle (its runtime's `on_thread_park`) and before it ends, so that no line waits longer
/// than its thread stays busy.
pub fn batch_lines() {
    let _ = PENDING.try_with(|p| p.borrow_mut().batched = true);
}

thread_local! {
    /// Set on a traffic thread once its shutdown grace is over and it closes what is still open.
    static CLOSING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Marks this traffic thread as closing its remaining connections at the end of the shutdown grace: a
/// response cut from now on was cut by the gateway, and its line says so rather than blaming the caller.
pub fn closing_connections() {
    CLOSING.set(true);
}

/// Writes this thread's pending access lines.
pub fn flush() {
    let _ = PENDING.try_with(|p| p.borrow_mut().flush());
}

/// Writes (or, on a thread that batches, queues) the line `fill` puts in the buffer.
fn write_line(fill: impl FnOnce(&mut String)) {
    let mut fill = Some(fill);
    let queued = PENDING.try_with(|p| {
        if let Some(fill) = fill.take() {
            p.borrow_mut().push(fill);
        }
    });
    if let (Err(_), Some(fill)) = (queued, fill) {
        // A record dropped while its thread is being torn down still gets its line.
        let mut line = String::new();
        fill(&mut line);
        line.push('\n');
        let _ = std::io::stdout().lock().write_all(line.as_bytes());
    }
}

/// An error and its sources on one line.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    crate::error::chain(error).map(ToString::to_string).collect::<Vec<_>>().join(": ")
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::rc::Rc;

    use super::*;

    /// Every `write` a batch makes, as its bytes.
    #[derive(Clone, Default)]
    struct Writes(Rc<RefCell<Vec<String>>>);

    impl Write for Writes {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.borrow_mut().push(String::from_utf8_lossy(buf).into_owned());
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn pending(batched: bool) -> (Pending<Writes>, Writes) {
        let writes = Writes::default();
        (Pending { lines: String::new(), batched, out: Some(writes.clone()) }, writes)
    }

    fn line(n: usize, len: usize) -> impl FnOnce(&mut String) {
        move |out| out.push_str(&format!("{n:04}{}", "x".repeat(len - 4)))
    }

    #[test]
    fn lines_are_written_at_once_unless_the_thread_batches_them() {
        let (mut now, writes) = pending(false);
        now.push(line(1, 10));
        assert_eq!(*writes.0.borrow(), ["0001xxxxxx\n"]);

        let (mut batched, writes) = pending(true);
        batched.push(line(1, 10));
        batched.push(line(2, 10));
        assert!(writes.0.borrow().is_empty());
        batched.flush();
        assert_eq!(*writes.0.borrow(), ["0001xxxxxx\n0002xxxxxx\n"]);
        batched.flush();
        assert_eq!(writes.0.borrow().len(), 1, "nothing left to write");
    }

    #[test]
    fn a_batch_is_whole_lines_and_never_longer_than_one_atomic_write() {
        let (mut batched, writes) = pending(true);
        for n in 0..50 {
            batched.push(line(n, 399));
        }
        drop(batched);
        let writes = writes.0.borrow();
        assert!(writes.len() > 1, "{} writes", writes.len());
        assert!(writes.iter().all(|w| w.len() <= ATOMIC_WRITE && w.ends_with('\n')), "{writes:?}");
        // Ten 400-byte lines fit in a batch, an eleventh does not.
        assert_eq!(writes[0].lines().count(), 10);
        let lines: Vec<String> = writes.iter().flat_map(|w| w.lines().map(str::to_owned)).collect();
        let expected: Vec<String> = (0..50).map(|n| format!("{n:04}{}", "x".repeat(395))).collect();
        assert_eq!(lines, expected, "every line, in order, once");
    }
}
