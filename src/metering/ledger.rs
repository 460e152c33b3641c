//! The usage ledger: one JSON line per forwarded request, appended by a writer thread so that a slow disk
//! never slows a response. Requests hand their line over a bounded queue and never wait: if the writer
//! falls that far behind, the line is dropped and counted (`mantlegate_ledger_dropped_total`), and the
//! metrics still have it. The file is rotated at UTC midnight: `usage.jsonl` becomes `usage.YYYY-MM-DD.jsonl`.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::{Duration, SystemTime};

/// Lines that may wait for the writer.
const QUEUE: usize = 65_536;

/// How long the writer lets lines gather after the first one wakes it. Under load the queue is never empty
/// when the writer comes back for more, so requests never have to wake it (a futex call and a context switch
/// each), and a batch costs one `write`.
const GATHER: Duration = Duration::from_millis(20);

/// What the writer thread is sent.
#[derive(Debug)]
enum Msg {
    Line(String),
    /// Write out everything before this, then stop.
    Close,
}

/// The request side of the ledger.
#[derive(Debug, Clone)]
pub struct Ledger {
    tx: SyncSender<Msg>,
    dropped: Arc<AtomicU64>,
}

/// The writer thread.
#[derive(Debug)]
pub struct LedgerWriter {
    tx: SyncSender<Msg>,
    thread: std::thread::JoinHandle<()>,
}

impl LedgerWriter {
    /// Writes out every line queued so far and stops the writer, waiting at most `limit`.
    pub async fn finish(self, limit: Duration) {
        let Self { tx, thread } = self;
        let join = tokio::task::spawn_blocking(move || {
            let _ = tx.send(Msg::Close);
            thread.join()
        });
        if tokio::time::timeout(limit, join).await.is_err() {
            tracing::warn!("usage ledger writer did not finish in time; some lines may be lost");
        }
    }
}

impl Ledger {
    /// Opens (creating) the ledger file and starts its writer.
    pub fn open(path: &Path) -> anyhow::Result<(Self, LedgerWriter)> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| anyhow::anyhow!("metering.ledger_path: cannot create {}: {e}", dir.display()))?;
        }
        let file = open_append(path)?;
        let (tx, rx) = sync_channel(QUEUE);
        let path = path.to_owned();
        let thread = std::thread::Builder::new()
            .name("usage-ledger".into())
            .spawn(move || write_loop(&path, file, &rx))
            .map_err(|e| anyhow::anyhow!("starting the ledger writer: {e}"))?;
        Ok((Self { tx: tx.clone(), dropped: Arc::new(AtomicU64::new(0)) }, LedgerWriter { tx, thread }))
    }

    /// Queues a line without waiting.
    pub fn append(&self, line: String) {
        match self.tx.try_send(Msg::Line(line)) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Lines dropped because the writer was behind.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

fn open_append(path: &Path) -> anyhow::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| anyhow::anyhow!("metering.ledger_path: cannot open {}: {e}", path.display()))
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

fn write_loop(path: &Path, file: File, rx: &Receiver<Msg>) {
    let mut day =
        file.metadata().and_then(|m| m.modified()).map(utc_day).unwrap_or_else(|_| utc_day(SystemTime::now()));
    let mut out = BufWriter::new(file);
    let mut closing = false;
    while !closing {
        let Ok(first) = rx.recv() else { break };
        if !matches!(first, Msg::Close) {
            std::thread::sleep(GATHER);
        }
        let today = utc_day(SystemTime::now());
        if today != day {
            let _ = out.flush();
            match rotate(path, &day) {
                Ok(file) => out = BufWriter::new(file),
                Err(e) => tracing::error!(error = %e, "usage ledger rotation failed; still writing to the old file"),
            }
            day = today;
        }
        // Write everything already queued, then flush once: a burst costs one write system call.
        for msg in std::iter::once(first).chain(rx.try_iter()) {
            let line = match msg {
                Msg::Line(line) => line,
                Msg::Close => {
                    closing = true;
                    continue;
                }
            };
            if let Err(e) = out.write_all(line.as_bytes()).and_then(|()| out.write_all(b"\n")) {
                tracing::error!(error = %e, "usage ledger write failed");
            }
        }
        if let Err(e) = out.flush() {
            tracing::error!(error = %e, "usage ledger flush failed");
        }
    }
}

fn rotate(path: &Path, day: &str) -> anyhow::Result<File> {
    std::fs::rename(path, rotated_path(path, day))?;
    open_append(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotated_names() {
        assert_eq!(rotated_path(Path::new("/v/usage.jsonl"), "2026-11-25"), Path::new("/v/usage.2026-11-25.jsonl"));
        assert_eq!(rotated_path(Path::new("ledger"), "2026-11-25"), Path::new("ledger.2026-11-25"));
        assert_eq!(utc_day(SystemTime::UNIX_EPOCH + Duration::from_secs(86_400 * 365)), "1971-01-01");
    }

    #[tokio::test]
    async fn a_ledger_from_an_earlier_day_is_rotated_before_the_first_write() {
        let dir = std::env::temp_dir().join(format!("mantlegate-ledger-rotate-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("usage.jsonl");
        std::fs::write(&path, "{\"old\":true}\n").expect("old ledger");
        let yesterday = SystemTime::now() - Duration::from_secs(86_400);
        File::options().write(true).open(&path).and_then(|f| f.set_modified(yesterday)).expect("mtime");

        let (ledger, writer) = Ledger::open(&path).expect("open");
        ledger.append("{\"new\":true}".into());
        writer.finish(Duration::from_secs(10)).await;
        let rotated = rotated_path(&path, &utc_day(yesterday));
        assert_eq!(std::fs::read_to_string(&rotated).expect("rotated file"), "{\"old\":true}\n");
        assert_eq!(std::fs::read_to_string(&path).expect("new file"), "{\"new\":true}\n");
    }

    #[tokio::test]
    async fn lines_queued_before_close_are_written() {
        let dir = std::env::temp_dir().join(format!("mantlegate-ledger-{}", std::process::id()));
        let path = dir.join("usage.jsonl");
        let _ = std::fs::remove_file(&path);
        let (ledger, writer) = Ledger::open(&path).expect("open");
        for i in 0..1000 {
            ledger.append(format!("{{\"n\":{i}}}"));
        }
        // The ledger handle is still alive (as it is in a running gateway): finish must not wait for it.
        writer.finish(Duration::from_secs(10)).await;
        let text = std::fs::read_to_string(&path).expect("ledger");
        assert_eq!(text.lines().count(), 1000);
        assert_eq!(text.lines().last(), Some("{\"n\":999}"));
        drop(ledger);
    }
}
