//! The traffic service. There are no layers between the listener and [`proxy::handle`]: every concern a
//! middleware would own (request id, body limit, access log, timeouts) has to see the attribution result
//! or the upstream response body, so each lives in the proxy phase where it happens:
//!
//! - config: `proxy::handle` loads the snapshot in force once per request (`live::Live`), and the request keeps
//!   it to its end;
//! - request id: read or made in `proxy::handle`, carried by the request's tracing span (so every log line of
//!   the request names it), sent upstream, set on every response;
//! - body limit: `proxy::body` (declared length first, then a counting wrapper);
//! - the request's record: `proxy::in_flight::InFlight`, filled in phase by phase, owned by the response body,
//!   and handed to the sinks (metrics, ledger, access log; `record`) when the request ends;
//! - timeouts: the caller's head and send timeouts on its connection (`server`), connect in the client, the
//!   response head in `proxy::forward`, idle in `body::Observed`.
//!
//! It is served with hyper's HTTP/1 connection directly (see `server`), not through a router: every path goes
//! to the proxy, which alone decides what is an inference route, so a router would only add per-request work
//! and a copy of its route table per connection.

use std::convert::Infallible;
use std::sync::Arc;

use http::{Request, Response};
use hyper::body::Incoming;

use crate::proxy::{self, ResponseBody, Worker};

/// The traffic service of one traffic thread: every request goes to the proxy, with the thread's worker.
pub fn service(
    worker: Arc<Worker>,
) -> impl hyper::service::Service<Request<Incoming>, Response = Response<ResponseBody>, Error = Infallible, Future: Send>
+ Clone {
    hyper::service::service_fn(move |req| {
        // Boxed: hyper keeps a slot the size of this future for each connection's whole life, where the
        // box lives only while the request is being forwarded (an idle stream needs none of it).
        let handled = Box::pin(proxy::handle(worker.clone(), req));
        async move { Ok(handled.await) }
    })
}
