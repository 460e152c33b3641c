//! The traffic router. There are no layers between the listener and [`proxy::handle`]: every concern a
//! middleware would own (request id, body limit, access log, timeouts) has to see the attribution result
//! or the upstream response body, so each lives in the proxy phase where it happens:
//!
//! - request id: read or made in `proxy::handle`, sent upstream, set on every response;
//! - body limit: `proxy::body` (declared length first, then a counting wrapper);
//! - access log: `proxy::access_log::AccessLog`, owned by the response body, written at end of stream;
//! - timeouts: connect in the client, response head in `Gateway::forward`, idle in `body::Observed`.

use std::sync::Arc;

use axum::Router;

use crate::proxy::{self, Gateway};

/// The traffic router: every path goes to the proxy, which alone decides what is an inference route.
pub fn router(gateway: Arc<Gateway>) -> Router {
    Router::new().fallback(proxy::handle).with_state(gateway)
}
