//! Logging: JSON lines on stdout, one per request (target `mantlegate::access`) plus start-up, shutdown and
//! upstream trouble. `MANTLEGATE_LOG` (or `RUST_LOG`) sets the filter; the default is `info`.

use tracing_subscriber::EnvFilter;

/// Installs the JSON subscriber; safe to call more than once (later calls do nothing).
pub fn init() {
    let filter = std::env::var("MANTLEGATE_LOG")
        .ok()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_span_list(false)
        .with_env_filter(filter)
        .with_writer(std::io::stdout)
        .try_init();
}
