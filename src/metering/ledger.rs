//! The usage ledger: one JSON line per forwarded request, appended by a writer thread so that a slow disk
//! never slows a response. Requests never wait: each thread appends its lines to a buffer of its own, and the
//! writer takes every thread's buffer whole, so a line costs no allocation, channel message or cache line
//! shared with another thread. Lines are in order per thread; within one 20 ms batch, one thread's lines come
//! before the next thread's. If the writer falls far behind, lines are dropped and counted
//! (`mantlegate_ledger_dropped_total`), and the metrics still have them. The file is rotated at UTC midnight:
//! `usage.jsonl` becomes `usage.YYYY-MM-DD.jsonl`.
//!
//! A reload that moves the ledger opens the new one beside the old: requests that began under the old config
//! still write their lines to it, and its writer stops once the last of them has (when every [`Ledger`] handle
//! is gone), after a last pass. A reload back to a path whose writer is still running gets that writer's ledger
//! again ([`LedgerWriter::ledger`]), so one file never has two writers.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering, fence};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, SystemTime};

use prometheus_client::metrics::counter::Counter;
use thread_local::ThreadLocal;

use crate::record::{Followup, Record, Sink};
use crate::telemetry::JsonLine;

pub mod read;

/// How much one thread may hold for the writer before its lines are dropped (some 20,000 lines, a second or
/// more of a busy thread's traffic).
const MAX_PENDING: usize = 8 << 20;

/// What a buffer may keep of its capacity once written out, so that a stall's backlog is not held for good.
const KEPT_CAPACITY: usize = 1 << 20;

/// How long the writer lets lines gather after the first one wakes it. Under load a thread's buffer is never
/// empty when the writer comes back for more, so requests rarely have to wake it (a futex call and a context
/// switch each), and a batch costs one `write`.
const GATHER: Duration = Duration::from_millis(20);

/// What the writer thread is sent.
#[derive(Debug)]
enum Msg {
    /// A thread's buffer went from empty to holding a line.
    Wake,
    /// Write out everything appended before this, then stop.
    Close,
    /// Write out everything appended before this, then say so.
    Flush(SyncSender<()>),
}

/// What requests and the writer share.
#[derive(Debug)]
struct Shared {
    /// Each thread's lines, newline-terminated, not yet taken by the writer. Only the owning thread and the
    /// writer ever lock one, and the writer only to swap the buffer out.
    pending: ThreadLocal<Mutex<String>>,
    /// Set by the writer's last pass: lines appended after it are dropped (and counted), not left unwritten.
    closed: AtomicBool,
    /// `mantlegate_ledger_dropped_total`.
    dropped: Counter,
}

/// The request side of the ledger.
#[derive(Debug, Clone)]
pub struct Ledger(Arc<Handle>);

/// What every clone of a [`Ledger`] shares; the writer stops once the last is gone (its channel then has no
/// sender).
#[derive(Debug)]
struct Handle {
    path: PathBuf,
    shared: Arc<Shared>,
    wake: SyncSender<Msg>,
}

/// The writer thread.
#[derive(Debug)]
pub struct LedgerWriter {
    path: PathBuf,
    ledger: Weak<Handle>,
    thread: std::thread::JoinHandle<()>,
}

impl LedgerWriter {
    /// The file it writes.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its ledger, while anything (the config in force, or a request that began under an earlier one) holds it.
    pub fn ledger(&self) -> Option<Ledger> {
        self.ledger.upgrade().map(Ledger)
    }

    /// Whether the writer has stopped (every handle gone, and the last lines written).
    pub fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }

    /// Writes out every line appended so far and stops the writer, waiting at most `limit`.
    pub async fn finish(self, limit: Duration) {
        let Self { ledger, thread, .. } = self;
        let join = tokio::task::spawn_blocking(move || {
            if let Some(handle) = ledger.upgrade() {
                let _ = handle.wake.send(Msg::Close);
            }
            thread.join()
        });
        if tokio::time::timeout(limit, join).await.is_err() {
            tracing::warn!("usage ledger writer did not finish in time; some lines may be lost");
        }
    }
}

impl Ledger {
    /// Opens (creating) the ledger file and starts its writer; lines it drops are counted on `dropped`.
    pub fn open(path: &Path, dropped: Counter) -> anyhow::Result<(Self, LedgerWriter)> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| anyhow::anyhow!("metering.ledger_path: cannot create {}: {e}", dir.display()))?;
        }
        let file = open_append(path)?;
        // Wake-ups only: one per thread per batch at most, so a few slots are plenty (a full queue already
        // has a wake-up on its way).
        let (tx, rx) = sync_channel(64);
        let shared = Arc::new(Shared { pending: ThreadLocal::new(), closed: AtomicBool::new(false), dropped });
        let thread = std::thread::Builder::new()
            .name("usage-ledger".into())
            .spawn({
                let (shared, path) = (shared.clone(), path.to_owned());
                move || write_loop(&path, file, &rx, &shared)
            })
            .map_err(|e| anyhow::anyhow!("starting the ledger writer: {e}"))?;
        let handle = Arc::new(Handle { path: path.to_owned(), shared, wake: tx });
        let writer = LedgerWriter { path: path.to_owned(), ledger: Arc::downgrade(&handle), thread };
        Ok((Self(handle), writer))
    }

    /// Where it writes.
    pub fn path(&self) -> &Path {
        &self.0.path
    }

    /// Appends the line `write` puts at the end of the buffer it is given (without a newline), without
    /// waiting. The line is written straight into this thread's pending buffer: no allocation, no copy.
    pub fn append_with(&self, write: impl FnOnce(&mut String)) {
        let slot = match self.0.shared.pending.get() {
            Some(slot) => slot,
            None => {
                let slot = self.0.shared.pending.get_or_default();
                // Pairs with the writer's fence: either its last pass sees this new buffer, or this thread sees
                // `closed` (without both fences each side could miss the other's write).
                fence(Ordering::SeqCst);
                slot
            }
        };
        let mut pending = slot.lock().unwrap_or_else(PoisonError::into_inner);
        if self.0.shared.closed.load(Ordering::Acquire) {
            self.0.shared.dropped.inc();
            return;
        }
        let start = pending.len();
        write(&mut pending);
        if pending.len() >= MAX_PENDING {
            pending.truncate(start);
            self.0.shared.dropped.inc();
            return;
        }
        pending.push('\n');
        drop(pending);
        if start == 0 {
            // Full means a wake-up is already queued; gone means the writer stopped, and `closed` says so.
            let _ = self.0.wake.try_send(Msg::Wake);
        }
    }

    /// Waits (blocking, at most `within`) until every line appended before the call is written to the file:
    /// whether it was.
    pub fn flush(&self, within: Duration) -> bool {
        let (done, written) = sync_channel(1);
        self.0.wake.send(Msg::Flush(done)).is_ok() && written.recv_timeout(within).is_ok()
    }

    /// Lines dropped because the writer was behind or had stopped, or because writing them failed.
    pub fn dropped(&self) -> u64 {
        self.0.shared.dropped.get()
    }
}

/// Whether the gateway could open the ledger at `path` (for `mantlegate check`, which must not leave a ledger
/// behind): an existing file or device is opened for appending; for a new one, the nearest directory that
/// exists must be one the gateway can create files in.
pub fn check_writable(path: &Path) -> Result<(), String> {
    let shown = path.display();
    if path.is_dir() {
        return Err(format!("{shown} is a directory; name a file"));
    }
    if path.exists() {
        return OpenOptions::new().append(true).open(path).map(drop).map_err(|e| format!("cannot open {shown}: {e}"));
    }
    let mut dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    while !dir.exists() {
        dir = dir.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    }
    if !dir.is_dir() {
        return Err(format!("cannot create {shown}: {} is not a directory", dir.display()));
    }
    let probe = dir.join(format!(".mantlegate-check-{}", std::process::id()));
    match OpenOptions::new().write(true).create_new(true).open(&probe) {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) => Err(format!("cannot create {shown}: cannot write in {}: {e}", dir.display())),
    }
}

/// Writes each forwarded request's line to the ledger of the config it was served under.
#[derive(Debug, Default)]
pub struct LedgerSink;

impl Sink for LedgerSink {
    fn record(&self, r: &Record) -> Option<Followup> {
        // Gateway refusals bill nothing and write no line, but for a limit's: the ledger says which limit refused
        // whom (and usage reports leave such lines out of their sums).
        let (Some(ledger), Some((project, _)), true) =
            (&r.snapshot.ledger, &r.project, r.forwarded || r.refused_by.is_some())
        else {
            return None;
        };
        let usage = r.usage.unwrap_or_default();
        ledger.append_with(|text| {
            let mut line = JsonLine::open(text);
            line.str("time", r.time.millis().as_str()).str("request_id", r.request_id.to_str().unwrap_or("-"));
            match &r.key {
                Some(key) => line.members(&key.member),
                None => line.null("key"),
            };
            line.str("route", r.endpoint.map_or("-", crate::endpoint::Endpoint::name))
                .str_or_null("model", r.model.as_deref())
                .bool("stream", r.stream)
                .u64("status", r.status.into())
                .u64("input_tokens", usage.input)
                .u64("output_tokens", usage.output)
                .u64("cached_input_tokens", usage.cached_input)
                .u64("reasoning_tokens", usage.reasoning)
                .f64_or_null("cost_usd", r.cost)
                .millis("duration_ms", r.duration)
                .millis_or_null("ttfb_ms", r.ttfb)
                .bool("complete", r.complete);
            if let Some(unmetered) = r.unmetered {
                line.str("unmetered", unmetered.name());
            }
            if let Some(limit) = &r.refused_by {
                line.str("refused_by", limit);
            }
            line.members(&project.ledger_members);
            line.close();
        });
        None
    }
}

fn open_append(path: &Path) -> anyhow::Result<File> {
    let cannot = |e: std::io::Error| anyhow::anyhow!("metering.ledger_path: cannot open {}: {e}", path.display());
    // A regular file is opened for reading too, to look at its last byte; anything else (a pipe, /dev/stdout) may
    // not be readable and has no last line to end.
    let regular = std::fs::metadata(path).is_ok_and(|m| m.is_file());
    let mut file = OpenOptions::new().create(true).append(true).read(regular).open(path).map_err(cannot)?;
    if regular {
        end_torn_line(&mut file).map_err(cannot)?;
    }
    Ok(file)
}

/// Ends the file's last line if it is torn (a crash mid-write left it without its newline), so that the next
/// line is not appended to it: that line would be read as part of one unreadable line, and lost with it.
fn end_torn_line(file: &mut File) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let len = file.metadata()?.len();
    let mut last = [b'\n'];
    if len > 0 {
        file.read_exact_at(&mut last, len - 1)?;
    }
    if last[0] != b'\n' {
        file.write_all(b"\n")?;
    }
    Ok(())
}

/// `usage.jsonl` on 2026-11-25 -> `usage.2026-11-25.jsonl`.
pub fn rotated_path(path: &Path, day: &str) -> PathBuf {
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "usage".into());
    let name = match path.extension() {
        Some(ext) => format!("{stem}.{day}.{}", ext.to_string_lossy()),
        None => format!("{stem}.{day}"),
    };
    path.with_file_name(name)
}

/// The UTC day of `time`, as `YYYY-MM-DD`.
pub fn utc_day(time: SystemTime) -> String {
    humantime::format_rfc3339_seconds(time).to_string()[..10].to_owned()
}

fn write_loop(path: &Path, file: File, rx: &Receiver<Msg>, shared: &Shared) {
    let mut day =
        file.metadata().and_then(|m| m.modified()).map(utc_day).unwrap_or_else(|_| utc_day(SystemTime::now()));
    // A device or pipe (`/dev/stdout`) is written to as it is: never renamed, never reopened.
    let regular = is_regular(&file);
    let mut out = file;
    let mut taken = String::new();
    let mut batch = String::new();
    let mut closing = false;
    while !closing {
        // Every handle gone (a retired ledger's last requests have ended): one last pass for what they appended.
        let first = rx.recv().unwrap_or(Msg::Close);
        // Lines gather for a moment before a pass; one asked for is made at once.
        if matches!(first, Msg::Wake) {
            std::thread::sleep(GATHER);
        }
        let mut flushed = Vec::new();
        for msg in std::iter::once(first).chain(rx.try_iter()) {
            match msg {
                Msg::Wake => {}
                Msg::Close => closing = true,
                Msg::Flush(done) => flushed.push(done),
            }
        }
        if closing {
            // Before the last pass: whatever a thread appends from here on is counted, not lost unseen.
            shared.closed.store(true, Ordering::Release);
            fence(Ordering::SeqCst);
        }
        let today = utc_day(SystemTime::now());
        if regular && today != day {
            match rotate(path, &day) {
                Ok(file) => out = file,
                Err(e) => tracing::error!(error = %e, "usage ledger rotation failed; still writing to the old file"),
            }
            day = today;
        } else if regular && !same_file(&out, path) {
            // Moved or deleted from outside (an operator, logrotate): lines written to it now would be lost.
            match open_append(path) {
                Ok(file) => {
                    tracing::warn!(path = %path.display(), "usage ledger file was moved or deleted; opened a new one");
                    out = file;
                }
                Err(e) => tracing::error!(error = %e, "usage ledger file was moved or deleted and cannot be reopened"),
            }
        }
        // Every thread's lines so far, each buffer swapped for an empty one: a burst costs one write.
        for pending in shared.pending.iter() {
            std::mem::swap(&mut *pending.lock().unwrap_or_else(PoisonError::into_inner), &mut taken);
            batch.push_str(&taken);
            taken.clear();
            taken.shrink_to(KEPT_CAPACITY);
        }
        if let Err(e) = out.write_all(batch.as_bytes()) {
            // Counted with the lines dropped for a writer that was behind: `mantlegate_ledger_dropped_total`.
            let lost = batch.bytes().filter(|&b| b == b'\n').count() as u64;
            shared.dropped.inc_by(lost);
            tracing::error!(error = %e, lines = lost, "usage ledger write failed; lines dropped");
        }
        batch.clear();
        batch.shrink_to(KEPT_CAPACITY);
        for done in flushed {
            let _ = done.send(());
        }
    }
}

/// Whether the ledger is a regular file, which is rotated daily and reopened if moved.
fn is_regular(file: &File) -> bool {
    file.metadata().is_ok_and(|m| m.is_file())
}

/// Whether `file` is still the file at `path`.
fn same_file(file: &File, path: &Path) -> bool {
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(open), Ok(named)) => open.dev() == named.dev() && open.ino() == named.ino(),
        _ => false,
    }
}

fn rotate(path: &Path, day: &str) -> anyhow::Result<File> {
    std::fs::rename(path, rotated_path(path, day))?;
    open_append(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn append(ledger: &Ledger, line: &str) {
        ledger.append_with(|text| text.push_str(line));
    }

    /// `usage.jsonl` in an emptied directory of its own for the test `name`.
    fn fresh_ledger_path(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("mantlegate-ledger-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        dir.join("usage.jsonl")
    }

    #[test]
    fn rotated_names() {
        assert_eq!(rotated_path(Path::new("/v/usage.jsonl"), "2026-11-25"), Path::new("/v/usage.2026-11-25.jsonl"));
        assert_eq!(rotated_path(Path::new("ledger"), "2026-11-25"), Path::new("ledger.2026-11-25"));
        assert_eq!(utc_day(SystemTime::UNIX_EPOCH + Duration::from_secs(86_400 * 365)), "1971-01-01");
    }

    #[tokio::test]
    async fn a_ledger_from_an_earlier_day_is_rotated_before_the_first_write() {
        let path = fresh_ledger_path("rotate");
        std::fs::write(&path, "{\"old\":true}\n").expect("old ledger");
        let yesterday = SystemTime::now() - Duration::from_secs(86_400);
        File::options().write(true).open(&path).and_then(|f| f.set_modified(yesterday)).expect("mtime");

        let (ledger, writer) = Ledger::open(&path, Counter::default()).expect("open");
        append(&ledger, "{\"new\":true}");
        writer.finish(Duration::from_secs(10)).await;
        let rotated = rotated_path(&path, &utc_day(yesterday));
        assert_eq!(std::fs::read_to_string(&rotated).expect("rotated file"), "{\"old\":true}\n");
        assert_eq!(std::fs::read_to_string(&path).expect("new file"), "{\"new\":true}\n");
    }

    #[tokio::test]
    async fn a_line_torn_by_a_crash_is_ended_before_the_next_is_written() {
        let path = fresh_ledger_path("torn");
        std::fs::write(&path, "{\"whole\":true}\n{\"torn\":").expect("torn ledger");
        let (ledger, writer) = Ledger::open(&path, Counter::default()).expect("open");
        append(&ledger, "{\"next\":true}");
        writer.finish(Duration::from_secs(10)).await;
        let text = std::fs::read_to_string(&path).expect("ledger");
        assert_eq!(text, "{\"whole\":true}\n{\"torn\":\n{\"next\":true}\n");
        // A whole ledger gets nothing added.
        let (ledger, writer) = Ledger::open(&path, Counter::default()).expect("reopen");
        append(&ledger, "{\"last\":true}");
        writer.finish(Duration::from_secs(10)).await;
        assert!(std::fs::read_to_string(&path).expect("ledger").ends_with("true}\n{\"last\":true}\n"));
    }

    #[tokio::test]
    async fn lines_queued_before_close_are_written() {
        let path = fresh_ledger_path("close");
        let (ledger, writer) = Ledger::open(&path, Counter::default()).expect("open");
        for i in 0..1000 {
            append(&ledger, &format!("{{\"n\":{i}}}"));
        }
        // The ledger handle is still alive (as it is in a running gateway): finish must not wait for it.
        writer.finish(Duration::from_secs(10)).await;
        let text = std::fs::read_to_string(&path).expect("ledger");
        assert_eq!(text.lines().count(), 1000);
        assert_eq!(text.lines().last(), Some("{\"n\":999}"));
        drop(ledger);
    }

    #[tokio::test]
    async fn lines_from_many_threads_are_written_whole_and_once_and_late_ones_are_counted() {
        let path = fresh_ledger_path("threads");
        let (ledger, writer) = Ledger::open(&path, Counter::default()).expect("open");
        let (threads, per_thread) = (4, 5_000);
        // A barrier between batches so the writer takes buffers while threads are still appending to them.
        let barrier = Arc::new(std::sync::Barrier::new(threads));
        let appenders: Vec<_> = (0..threads)
            .map(|t| {
                let (ledger, barrier) = (ledger.clone(), barrier.clone());
                std::thread::spawn(move || {
                    for i in 0..per_thread {
                        append(&ledger, &format!("{{\"thread\":{t},\"n\":{i},\"pad\":\"{}\"}}", "x".repeat(i % 300)));
                        if i % 1000 == 999 {
                            barrier.wait();
                            std::thread::sleep(GATHER);
                        }
                    }
                })
            })
            .collect();
        for appender in appenders {
            appender.join().expect("appender");
        }
        // Every thread's lines reach the file while the writer runs (each thread's wake-ups work), not only at
        // the close.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::fs::read_to_string(&path).map_or(0, |t| t.lines().count()) < threads * per_thread {
            assert!(std::time::Instant::now() < deadline, "lines still unwritten before the close");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        writer.finish(Duration::from_secs(10)).await;
        append(&ledger, "{\"late\":true}");
        assert_eq!(ledger.dropped(), 1, "a line appended after the writer stopped is counted");

        let text = std::fs::read_to_string(&path).expect("ledger");
        let mut next = vec![0u64; threads];
        for line in text.lines() {
            let value: serde_json::Value = serde_json::from_str(line).expect("each line whole");
            let t = usize::try_from(value["thread"].as_u64().expect("thread")).expect("index");
            // One thread's lines stay in its order.
            assert_eq!(value["n"].as_u64(), Some(next[t]), "{line}");
            next[t] += 1;
        }
        assert_eq!(next, vec![per_thread as u64; threads]);
    }

    #[tokio::test]
    async fn a_ledger_takes_lines_until_its_last_handle_is_gone_and_then_stops() {
        let path = fresh_ledger_path("retired");
        let (ledger, writer) = Ledger::open(&path, Counter::default()).expect("open");
        // A reload moved away from it; a request that began under the old config ends after the reload.
        append(&ledger, "{\"n\":1}");
        let late = ledger.clone();
        drop(ledger);
        append(&late, "{\"n\":2}");
        // Still running, and its ledger can be had again while a handle is left.
        assert!(!writer.is_finished());
        let again = writer.ledger().expect("a handle is left");
        assert_eq!(again.path(), path);
        drop((late, again));
        assert!(writer.ledger().is_none());
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !writer.is_finished() {
            assert!(std::time::Instant::now() < deadline, "the writer never stopped");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        writer.finish(Duration::from_secs(10)).await;
        assert_eq!(std::fs::read_to_string(&path).expect("ledger"), "{\"n\":1}\n{\"n\":2}\n");
    }

    #[test]
    fn a_ledger_the_gateway_could_not_open_is_found_by_the_check() {
        let path = fresh_ledger_path("check");
        assert_eq!(check_writable(&path), Ok(()));
        assert!(!path.exists(), "the check leaves nothing behind");
        assert_eq!(check_writable(&path.parent().expect("dir").join("a/b/usage.jsonl")), Ok(()));
        assert_eq!(check_writable(Path::new("/dev/null")), Ok(()));
        let dir = path.parent().expect("dir");
        assert!(check_writable(dir).expect_err("a directory").ends_with("is a directory; name a file"));
        std::fs::write(dir.join("file"), "").expect("file");
        let under_a_file = dir.join("file/usage.jsonl");
        assert!(check_writable(&under_a_file).expect_err("under a file").contains("is not a directory"));
        assert!(check_writable(Path::new("/proc/mantlegate/usage.jsonl")).is_err());
    }

    #[tokio::test]
    async fn lines_that_cannot_be_written_are_counted() {
        // A device, so never renamed at the day's end: checked first, as renaming /dev/full would be a mess.
        let full = Path::new("/dev/full");
        assert!(!is_regular(&open_append(full).expect("/dev/full")));
        let (ledger, writer) = Ledger::open(full, Counter::default()).expect("open");
        for i in 0..100 {
            append(&ledger, &format!("{{\"n\":{i}}}"));
        }
        writer.finish(Duration::from_secs(10)).await;
        assert_eq!(ledger.dropped(), 100);
    }

    #[tokio::test]
    async fn a_ledger_deleted_or_moved_while_running_is_opened_again() {
        let path = fresh_ledger_path("deleted");
        let (ledger, writer) = Ledger::open(&path, Counter::default()).expect("open");
        let wait_for = |want: &'static str| {
            let path = path.clone();
            async move {
                let deadline = std::time::Instant::now() + Duration::from_secs(10);
                while !std::fs::read_to_string(&path).is_ok_and(|t| t.ends_with(want)) {
                    assert!(std::time::Instant::now() < deadline, "{want} never reached {}", path.display());
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        };
        append(&ledger, "{\"n\":1}");
        wait_for("{\"n\":1}\n").await;
        std::fs::remove_file(&path).expect("delete");
        append(&ledger, "{\"n\":2}");
        wait_for("{\"n\":2}\n").await;
        let moved = path.with_file_name("moved.jsonl");
        std::fs::rename(&path, &moved).expect("move");
        append(&ledger, "{\"n\":3}");
        writer.finish(Duration::from_secs(10)).await;
        assert_eq!(std::fs::read_to_string(&path).expect("reopened"), "{\"n\":3}\n");
        assert_eq!(std::fs::read_to_string(&moved).expect("moved"), "{\"n\":2}\n");
        assert_eq!(ledger.dropped(), 0);
    }

    #[tokio::test]
    async fn a_line_past_the_pending_limit_is_dropped_whole_and_counted() {
        let path = fresh_ledger_path("limit");
        let (ledger, writer) = Ledger::open(&path, Counter::default()).expect("open");
        append(&ledger, "{\"n\":1}");
        append(&ledger, &format!("{{\"pad\":\"{}\"}}", "x".repeat(MAX_PENDING)));
        append(&ledger, "{\"n\":2}");
        writer.finish(Duration::from_secs(10)).await;
        assert_eq!(ledger.dropped(), 1);
        assert_eq!(std::fs::read_to_string(&path).expect("ledger"), "{\"n\":1}\n{\"n\":2}\n");
    }

    #[test]
    fn a_line_reaches_the_file_while_the_gateway_runs() {
        let path = fresh_ledger_path("live");
        let (ledger, _writer) = Ledger::open(&path, Counter::default()).expect("open");
        for round in 0..3 {
            let line = format!("{{\"round\":{round}}}");
            append(&ledger, &line);
            // Written within a gather interval or so of the first line into an empty buffer; no close needed.
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while !std::fs::read_to_string(&path).expect("ledger").contains(&line) {
                assert!(std::time::Instant::now() < deadline, "{line} never reached the file");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}
