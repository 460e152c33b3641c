//! The forwarding path, in pingora's phase order: request filter (route, caller, attribution, body, model
//! allowlist) -> upstream request filter (headers, URI) -> upstream peer (the shared client, with timeouts) ->
//! response filter (headers) -> response body filter ([`body::Observed`]) -> logging ([`access_log`]).
//!
//! A [`Gateway`] is shared by every traffic thread; the upstream client is not: each thread has its own
//! (see `server`), so a request, its upstream connection and both bodies stay on one thread.

pub mod access_log;
pub mod body;
pub mod client;
pub mod credential;
pub mod headers;

use std::pin::Pin;
use std::sync::Arc;

use axum::body::Body;
use axum::response::IntoResponse;
use http::uri::PathAndQuery;
use http::{HeaderValue, Request, Response, StatusCode, Uri, Version};
use http_body_util::Either;
use hyper::body::Incoming;

use crate::attribution::{Attributor, Source};
use crate::auth::KeyTable;
use crate::config::{Config, Project};
use crate::deadline::Deadlines;
use crate::endpoint::{Endpoint, RouteTable};
use crate::error::GatewayError;
use crate::metering::Meter;
use crate::metering::usage::{Dialect, UsageTap};
use crate::shutdown::Shutdown;
use access_log::AccessLog;
pub use client::{CONNECTION_BUFFER, UpstreamClient};
pub use credential::{Credential, KeyFileWatch};

/// Everything a request needs but its thread's upstream client, built once per config and shared read-only
/// by every request.
pub struct Gateway {
    config: Config,
    keys: KeyTable,
    attributor: Attributor,
    routes: RouteTable,
    /// Each project's id as a ready header value, by project index.
    project_ids: Vec<HeaderValue>,
    credential: Credential,
    connector: client::Connector,
    meter: Arc<Meter>,
    shutdown: Shutdown,
}

/// What one traffic thread serves requests with: the gateway every thread shares, and the thread's own
/// upstream connections and deadlines.
pub struct Worker {
    /// Shared by every traffic thread.
    pub gateway: Arc<Gateway>,
    /// This thread's upstream connections.
    pub client: UpstreamClient,
    /// This thread's deadlines (its ticker runs beside it).
    pub deadlines: Deadlines,
}

/// A response body: upstream's, observed on its way through, or the gateway's own answer. Upstream's is boxed
/// all the same: hyper moves the response several times on its way out, and the observed body is large.
pub type ResponseBody = Either<Pin<Box<body::Observed<client::UpstreamBody>>>, Body>;

/// A request upstream answered.
struct Forwarded {
    response: Response<client::UpstreamBody>,
    endpoint: Endpoint,
    /// The gateway asked for stream usage the client did not ask for.
    usage_injected: bool,
}

impl Gateway {
    /// Builds the gateway. Every project must have an id: a request can be attributed to any of them.
    pub fn new(config: Config, credential: Credential, meter: Arc<Meter>, shutdown: Shutdown) -> anyhow::Result<Self> {
        let missing: Vec<&str> = config.projects.iter().filter(|p| p.id.is_none()).map(|p| p.name.as_str()).collect();
        if !missing.is_empty() {
            anyhow::bail!(
                "projects without an id cannot receive traffic: {} (set each one's `id`, the proj_... id the Projects API gave it)",
                missing.join(", ")
            );
        }
        let project_ids = config
            .projects
            .iter()
            .map(|p| HeaderValue::from_str(p.id.as_deref().unwrap_or_default()))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            keys: KeyTable::new(config.callers, &config.keys),
            attributor: Attributor::new(&config),
            routes: RouteTable::new(&config.routes),
            project_ids,
            connector: client::connector(&config.upstream)?,
            credential,
            meter,
            shutdown,
            config,
        })
    }

    /// The request filter and upstream phases. Errors are the gateway's own answers; upstream's error
    /// responses are `Ok` and pass through unchanged.
    async fn forward(
        &self,
        client: &UpstreamClient,
        deadlines: &Deadlines,
        req: Request<body::CallerIncoming>,
        log: &mut AccessLog,
    ) -> Result<Forwarded, GatewayError> {
        if self.shutdown.is_draining() {
            return Err(GatewayError::ShuttingDown);
        }
        let (mut parts, body) = req.into_parts();

        // Request filter: which endpoint, who is calling, which project.
        let matched = self.routes.classify(&parts.method, parts.uri.path())?;
        let endpoint = matched.endpoint;
        log.endpoint = Some(endpoint);
        let key_idx = self.keys.authenticate(&parts.headers)?;
        log.key = key_idx;
        let key = key_idx.map(|k| &self.config.keys[k.0]);
        let attribution =
            self.attributor.resolve(key, self.attributor.requested(&parts.headers), matched.route_project)?;
        let project = self.config.project(attribution.project);
        log.project = Some((attribution.project, attribution.source));
        if attribution.source == Source::Rerouted {
            self.meter.unattributed("rerouted");
            tracing::warn!(request_id = ?log.request_id(), project = %project.name, "unattributed request rerouted");
        }

        // Most requests go upstream with the path they came with: then their parsed target (origin form, no
        // authority) is reused as it is.
        let as_received = parts.uri.authority().is_none() && matched.upstream_path.len() == parts.uri.path().len();
        let upstream_uri =
            if as_received { None } else { Some(self.upstream_uri(matched.upstream_path, parts.uri.query())?) };
        // Reading the caller's body (when it is read whole) and waiting for upstream's response head share one
        // deadline, so a caller that trickles its body cannot hold a request open longer than upstream may.
        // Pinned where it is built: the exchange is large, and moved into the timeout it was copied twice per
        // request (or, bound to a local first, stored twice in this future).
        let exchanged = {
            let exchange = std::pin::pin!(async {
                let (body, usage_injected) =
                    self.request_body(&mut parts.headers, body, endpoint, project, &mut *log).await?;

                // Upstream request filter.
                headers::to_upstream(
                    &mut parts.headers,
                    matched.api,
                    &self.project_ids[attribution.project.0],
                    &self.credential,
                    log.request_id(),
                );
                if self.meter.taps && Dialect::of(endpoint).is_some() {
                    // Usage is read from the bytes as they pass, so they must arrive as they are. Accept-Encoding is
                    // a preference, and the caller still gets a valid (uncompressed) response.
                    parts.headers.insert(http::header::ACCEPT_ENCODING, HeaderValue::from_static("identity"));
                }
                if let Some(uri) = upstream_uri {
                    parts.uri = uri;
                }
                parts.version = Version::HTTP_11;

                // Upstream peer.
                Ok::<_, GatewayError>((client.request(Request::from_parts(parts, body)).await, usage_injected))
            });
            deadlines.timeout(self.config.upstream.response_timeout, exchange).await
        };
        match exchanged {
            Err(_) => Err(GatewayError::UpstreamTimeout),
            Ok(Err(e)) => Err(e),
            // hyper passes 100 and 103 by; any other 1xx as a final answer (101 to a request that asked for no
            // upgrade) is nothing a caller can use.
            Ok(Ok((Ok(response), _))) if response.status().is_informational() => {
                tracing::warn!(request_id = ?log.request_id(), status = %response.status(), "upstream answered with an informational status");
                Err(GatewayError::UpstreamUnreachable)
            }
            Ok(Ok((Ok(response), usage_injected))) => Ok(Forwarded { response, endpoint, usage_injected }),
            Ok(Ok((Err(e), _))) if body::is_over_limit(&*e) => {
                Err(GatewayError::RequestTooLarge(self.config.server.max_body_bytes))
            }
            // As a body read whole answers it (`body::read`).
            Ok(Ok((Err(e), _))) if body::is_caller_body_error(&*e) => {
                Err(GatewayError::InvalidRequest("the request body could not be read".into()))
            }
            Ok(Ok((Err(e), _))) => {
                tracing::warn!(request_id = ?log.request_id(), error = %access_log::error_chain(&*e), "upstream request failed");
                Err(GatewayError::UpstreamUnreachable)
            }
        }
    }

    /// The body to send upstream, and whether the gateway asked for stream usage on the caller's behalf. The
    /// body is read whole only when the gateway needs what it says: the model, for a project's allowlist, or
    /// the stream flag, to have a chat stream report its usage for metering.
    async fn request_body(
        &self,
        headers: &mut http::HeaderMap,
        body: body::CallerIncoming,
        endpoint: Endpoint,
        project: &Project,
        log: &mut AccessLog,
    ) -> Result<(body::Outgoing, bool), GatewayError> {
        let limit = self.config.server.max_body_bytes;
        body::check_declared_length(headers, limit)?;
        let check_model = endpoint.has_model() && !project.models.is_empty();
        let meter_stream = self.meter.taps && endpoint == Endpoint::ChatCompletions;
        if !check_model && !meter_stream {
            return Ok((body::streamed(body, limit), false));
        }
        let bytes = body::read(body, limit).await?;
        let facts = if check_model || body::may_stream(&bytes) {
            off_thread_if_large(&bytes, body::facts_of).await?
        } else {
            body::Facts::default()
        };
        if check_model {
            let model = facts
                .model
                .as_deref()
                .ok_or_else(|| GatewayError::InvalidRequest("request body names no \"model\"".into()))?;
            if !project.allows_model(model) {
                return Err(GatewayError::ModelNotAllowed { model: model.to_owned(), project: project.name.clone() });
            }
        }
        // The model is caller text until upstream accepts it: keep logs, ledger and metric labels bounded.
        log.model = facts.model.filter(|m| is_model_id(m));
        if meter_stream && facts.stream && !facts.include_usage {
            headers.remove(http::header::CONTENT_LENGTH);
            return Ok((body::whole(off_thread_if_large(&bytes, body::with_include_usage).await?), true));
        }
        Ok((body::whole(bytes), false))
    }

    /// The request target upstream, in origin form (`/path?query`): the client sends `Host` itself.
    fn upstream_uri(&self, path: &str, query: Option<&str>) -> Result<Uri, GatewayError> {
        let path_and_query = match query {
            Some(q) => PathAndQuery::try_from(format!("{path}?{q}")),
            None => PathAndQuery::try_from(path),
        }
        .map_err(|_| GatewayError::UnknownRoute)?;
        Ok(Uri::from(path_and_query))
    }

    /// How long upstream may take to answer with a response head.
    pub fn response_timeout(&self) -> std::time::Duration {
        self.config.upstream.response_timeout
    }

    /// A new upstream client (connection pool) for one traffic thread.
    pub fn client(&self) -> anyhow::Result<UpstreamClient> {
        UpstreamClient::new(self.connector.clone(), &self.config.upstream)
    }
}

/// Request bodies larger than this are parsed on tokio's blocking pool rather than on the traffic thread,
/// whose other connections (streams among them) would wait for the parse: serde_json takes milliseconds per
/// megabyte, and a body may be up to `server.max_body_bytes`.
const PARSE_INLINE_MAX: usize = 256 * 1024;

/// `parse(bytes)`, off the traffic thread if `bytes` is large.
async fn off_thread_if_large<T: Send + 'static>(
    bytes: &bytes::Bytes,
    parse: impl FnOnce(&[u8]) -> Result<T, GatewayError> + Send + 'static,
) -> Result<T, GatewayError> {
    if bytes.len() <= PARSE_INLINE_MAX {
        return parse(bytes);
    }
    let bytes = bytes.clone();
    match tokio::task::spawn_blocking(move || parse(&bytes)).await {
        Ok(parsed) => parsed,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        // The runtime is shutting down.
        Err(_) => Err(GatewayError::ShuttingDown),
    }
}

/// Whether `model` looks like a model id (`openai.gpt-oss-120b`, `us.anthropic.claude-...:0`), and so may be
/// logged and used as a metric label.
fn is_model_id(model: &str) -> bool {
    !model.is_empty()
        && model.len() <= 128
        && model.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':' | b'/'))
}

/// The traffic handler: every request on the traffic listener comes here, with its thread's worker.
pub async fn handle(worker: Arc<Worker>, req: Request<Incoming>) -> Response<ResponseBody> {
    let Worker { gateway, client, deadlines } = &*worker;
    let request_id = headers::request_id(req.headers());
    let mut log = AccessLog::start(gateway.meter.clone(), request_id.clone(), req.method(), req.uri().path());
    let expects_continue = req.headers().contains_key(http::header::EXPECT);
    let req = req.map(|body| body::CallerIncoming::new(body, expects_continue));
    match gateway.forward(client, deadlines, req, &mut log).await {
        Ok(Forwarded { response, endpoint, usage_injected }) => {
            let (mut parts, incoming) = response.into_parts();
            headers::to_caller(&mut parts.headers, parts.status, &request_id);
            log.status = Some(parts.status);
            log.forwarded = true;
            log.stream = parts
                .headers
                .get(http::header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
            // Content codings are case-insensitive.
            let encoded = parts
                .headers
                .get(http::header::CONTENT_ENCODING)
                .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
            // hyper sends these without polling their body: they are complete once their head is.
            let bodiless = matches!(parts.status, StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED);
            if bodiless {
                log.body_ended();
            }
            if gateway.meter.taps
                && parts.status.is_success()
                && !bodiless
                && let Some(dialect) = Dialect::of(endpoint)
            {
                if encoded {
                    log.encoded = true;
                } else {
                    let tap = if log.stream { UsageTap::sse(dialect, usage_injected) } else { UsageTap::json(dialect) };
                    let tap = if log.model.is_some() { tap.model_known() } else { tap };
                    if tap.rewrites() {
                        parts.headers.remove(http::header::CONTENT_LENGTH);
                    }
                    log.tap = Some(tap);
                }
            }
            // An empty body (`Content-Length: 0`) is never polled either: it ends here, and a tap reads it as the
            // nothing it is.
            if !bodiless && http_body::Body::is_end_stream(&incoming) {
                if let Some(tap) = &mut log.tap {
                    tap.finish();
                }
                log.body_ended();
            }
            let body = body::Observed::new(incoming, gateway.config.upstream.idle_timeout, log);
            Response::from_parts(parts, Either::Left(Box::pin(body)))
        }
        Err(e) => {
            if e == GatewayError::ProjectRequired {
                gateway.meter.unattributed("rejected");
            }
            log.status = Some(e.status());
            log.error = Some(e.code());
            log.body_ended();
            let mut res = e.into_response().map(Either::Right);
            res.headers_mut().insert(headers::REQUEST_ID, request_id);
            res
        }
    }
}
