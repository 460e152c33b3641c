//! The access log: one JSON line per request (target `mantlegate::access`), written from its record as the
//! request ends. Each traffic thread batches its lines in an [`AccessLines`] of its own and writes them with
//! one `write` per batch; the thread writes what it holds whenever it goes idle (its runtime's park hook) and
//! before it stops, so a line never waits longer than its thread stays busy.

use std::io::Write;
use std::os::fd::AsFd;
use std::sync::{Mutex, PoisonError};

use crate::record::{Followup, Record, Sink};
use crate::telemetry::JsonLine;

/// Paths are caller input: keep what is logged bounded.
pub const MAX_LOGGED_PATH: usize = 256;

/// `path`, cut to [`MAX_LOGGED_PATH`] characters.
pub fn logged_path(path: &str) -> String {
    match path.char_indices().nth(MAX_LOGGED_PATH) {
        Some((at, _)) => format!("{}...", &path[..at]),
        None => path.to_owned(),
    }
}

/// One traffic thread's access lines not yet written. Only its own thread locks it, but for the final flush.
#[derive(Debug)]
pub struct AccessLines(Mutex<Pending>);

impl Default for AccessLines {
    fn default() -> Self {
        Self::new()
    }
}

impl AccessLines {
    /// Lines batched up to `ATOMIC_WRITE` bytes, written through a duplicate of stdout.
    pub fn new() -> Self {
        let out = std::io::stdout().as_fd().try_clone_to_owned().ok().map(std::fs::File::from);
        Self(Mutex::new(Pending { lines: String::new(), out }))
    }

    /// Writes every line pending.
    pub fn flush(&self) {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).flush();
    }
}

impl Sink for AccessLines {
    fn record(&self, r: &Record) -> Option<Followup> {
        if tracing::enabled!(target: ACCESS_TARGET, tracing::Level::INFO) {
            self.0.lock().unwrap_or_else(PoisonError::into_inner).push(|text| write_line(text, r));
        }
        None
    }
}

/// The access line of `r`. In the shape of the other JSON log lines (`timestamp`, `level`, `target`,
/// `message`, then the fields; absent fields are left out), but written here rather than through a `tracing`
/// event: the JSON formatter's field visitor cost more than a third of the gateway's own CPU time per request.
fn write_line(text: &mut String, r: &Record) {
    let mut line = JsonLine::open(text);
    line.str("timestamp", r.time.as_str())
        .members(ACCESS_FIXED_MEMBERS)
        .str("request_id", r.request_id.to_str().unwrap_or("-"))
        .str("method", r.method.as_str())
        .str("path", &r.path);
    if let Some(endpoint) = r.endpoint {
        line.str("endpoint", endpoint.name());
    }
    if let Some(key) = &r.key {
        line.members(&key.member);
    }
    if let Some((project, source)) = &r.project {
        line.members(&project.access_members).str("attribution", source.name());
    }
    if let Some(model) = &r.model {
        line.str("model", model);
    }
    line.bool("stream", r.stream).u64("status", r.status.into());
    if let Some(error) = r.error {
        line.str("error", error);
    }
    if let Some(limit) = &r.refused_by {
        line.str("refused_by", limit);
    }
    if let Some(usage) = r.usage {
        line.u64("input_tokens", usage.input)
            .u64("output_tokens", usage.output)
            .u64("cached_input_tokens", usage.cached_input)
            .u64("reasoning_tokens", usage.reasoning);
    }
    if let Some(cost) = r.cost {
        line.f64("cost_usd", cost);
    }
    line.millis("duration_ms", r.duration);
    if let Some(ttfb) = r.ttfb {
        line.millis("ttfb_ms", ttfb);
    }
    line.bool("complete", r.complete);
    if let Some(reason) = &r.incomplete_reason {
        line.str("incomplete_reason", reason);
    }
    if let Some(unmetered) = r.unmetered {
        line.str("unmetered", unmetered.name());
    }
    line.close();
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
#[derive(Debug)]
struct Pending<W: Write = std::fs::File> {
    lines: String,
    /// A duplicate of descriptor 1 (same file, same offset), so that traffic threads writing their batches do
    /// not queue on the process-wide stdout lock.
    out: Option<W>,
}

impl<W: Write> Pending<W> {
    /// Adds the line `fill` writes, and writes what is pending if the line does not fit in the batch. A line is
    /// always written by one `write`, whole.
    fn push(&mut self, fill: impl FnOnce(&mut String)) {
        let start = self.lines.len();
        fill(&mut self.lines);
        self.lines.push('\n');
        if start > 0 && self.lines.len() > ATOMIC_WRITE {
            // The earlier lines go first, as one batch; the new one starts the next.
            self.write(start);
        }
        if self.lines.len() > ATOMIC_WRITE {
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

    fn pending() -> (Pending<Writes>, Writes) {
        let writes = Writes::default();
        (Pending { lines: String::new(), out: Some(writes.clone()) }, writes)
    }

    fn line(n: usize, len: usize) -> impl FnOnce(&mut String) {
        move |out| out.push_str(&format!("{n:04}{}", "x".repeat(len - 4)))
    }

    #[test]
    fn lines_wait_for_the_flush() {
        let (mut batched, writes) = pending();
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
        let (mut batched, writes) = pending();
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
