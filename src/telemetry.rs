//! Logging: JSON lines on stdout, one per request (target `mantlegate::access`) plus start-up, shutdown, reloads
//! and upstream trouble. A line logged while a request is being served carries the request's span,
//! `"span":{"request_id":...,"name":"request"}`, so it joins the request's access line. `MANTLEGATE_LOG` (or
//! `RUST_LOG`) sets the filter; the default is `info`.

use tracing_subscriber::EnvFilter;

pub mod json_line;

pub use json_line::JsonLine;

/// Installs the JSON subscriber; safe to call more than once (later calls do nothing).
pub fn init() {
    let _ = tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(true)
        .with_span_list(false)
        .with_env_filter(filter())
        .with_writer(std::io::stdout)
        .try_init();
}

/// For a command whose stdout is its output (`projects plan`, `projects import`): plain lines on stderr, where
/// they never mix with what is printed for a person or a program to read.
pub fn init_stderr() {
    let _ = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_target(false)
        .with_env_filter(filter())
        .with_writer(std::io::stderr)
        .try_init();
}

/// `MANTLEGATE_LOG`, else `RUST_LOG`, else `info`.
fn filter() -> EnvFilter {
    std::env::var("MANTLEGATE_LOG")
        .ok()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new("info"))
}

/// A UTC timestamp in RFC 3339 with 6 fractional digits (`2026-11-26T08:20:19.114342Z`), as the log lines print
/// it, or 3 ([`Stamp::millis`]) as the ledger does. The date and time of day are formatted once per second per
/// thread; the rest is digits. (Per request, formatting the whole date each time cost more than the rest of the
/// line.)
#[derive(Clone, Copy)]
pub struct Stamp {
    buf: [u8; 27],
    len: usize,
}

impl Stamp {
    /// `time`, to the microsecond.
    pub fn new(time: std::time::SystemTime) -> Self {
        use std::cell::RefCell;
        thread_local! {
            static SECOND: RefCell<(u64, [u8; 19])> = const { RefCell::new((u64::MAX, [0; 19])) };
        }
        // RFC 3339 years run from 0000 to 9999; a clock outside 1970..=9999 is clamped, never a panic.
        const LAST_SECOND: u64 = 253_402_300_799; // 9999-12-31T23:59:59Z
        let since = time.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let seconds = since.as_secs().min(LAST_SECOND);
        let mut buf = [0u8; 27];
        SECOND.with_borrow_mut(|(second, text)| {
            if *second != seconds {
                // "2026-11-26T08:20:19Z": keep all but the Z.
                let whole = std::time::UNIX_EPOCH + std::time::Duration::from_secs(seconds);
                let whole = humantime::format_rfc3339_seconds(whole).to_string();
                text.copy_from_slice(&whole.as_bytes()[..19]);
                *second = seconds;
            }
            buf[..19].copy_from_slice(&text[..]);
        });
        buf[19] = b'.';
        let mut fraction = since.subsec_micros();
        for at in (20..26).rev() {
            buf[at] = b'0' + (fraction % 10) as u8;
            fraction /= 10;
        }
        buf[26] = b'Z';
        Self { buf, len: 27 }
    }

    /// The same time to the millisecond (truncated, as humantime's millisecond format does).
    pub fn millis(mut self) -> Self {
        self.buf[23] = b'Z';
        self.len = 24;
        self
    }

    /// The timestamp's text.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or("1970-01-01T00:00:00Z")
    }
}

impl std::fmt::Debug for Stamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::Stamp;

    #[test]
    fn stamps_match_humantime() {
        // Across a second boundary and on the same second twice, so the per-second cache is exercised.
        for nanos in [1_764_145_219_114_342_999u64, 1_764_145_219_999_999_000, 1_764_145_220_000_001_000, 0] {
            let time = UNIX_EPOCH + Duration::from_nanos(nanos);
            assert_eq!(Stamp::new(time).as_str(), humantime::format_rfc3339_micros(time).to_string());
            assert_eq!(Stamp::new(time).millis().as_str(), humantime::format_rfc3339_millis(time).to_string());
        }
        // A clock before 1970 or past year 9999 gives the nearest representable second, not a panic.
        assert!(Stamp::new(UNIX_EPOCH - Duration::from_secs(5)).millis().as_str().starts_with("1970-01-01T00:00:00."));
        let far = UNIX_EPOCH + Duration::from_secs(400_000_000_000);
        assert!(Stamp::new(far).as_str().starts_with("9999-12-31T23:59:59."));
    }
}
