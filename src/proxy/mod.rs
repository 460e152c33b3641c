//! The forwarding path, in pingora's phase order, each phase a function of its own:
//! [`request_filter`] (route, caller, attribution) -> [`request_body`] (read whole where needed, model allowlist)
//! -> [`upstream_request`] (headers, URI) -> upstream peer (the thread's client, under the response timeout;
//! [`upstream_error`] maps its failures) -> [`response_filter`] (headers, usage tap) -> response body filter
//! ([`body::Observed`]) -> logging (the request's [`Record`](crate::record::Record), handed to the sinks as it
//! ends; see [`in_flight`]).
//!
//! Each traffic thread has a [`Worker`]: the live config every thread shares, and the thread's own upstream
//! connections and access-line batch, so a request, its upstream connection and both bodies stay on one thread.
//! A request loads the config in force once, as it arrives, and keeps that snapshot to its end.

pub mod access_log;
pub mod body;
pub mod client;
pub mod credential;
pub mod headers;
pub mod in_flight;
pub mod upstream_auth;

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use axum::body::Body;
use axum::response::IntoResponse;
use http::request::Parts;
use http::uri::PathAndQuery;
use http::{HeaderValue, Request, Response, StatusCode, Uri, Version};
use http_body_util::Either;
use hyper::body::Incoming;

use crate::attribution::Source;
use crate::endpoint::{Api, Endpoint};
use crate::error::GatewayError;
use crate::limits::{Demand, Subjects, estimate};
use crate::live::Live;
use crate::metering::usage::{Dialect, UsageTap};
use crate::record::Sinks;
use crate::shutdown::Shutdown;
use crate::snapshot::{Project, Snapshot};
pub use client::{CONNECTION_BUFFER, UpstreamClient};
pub use credential::Credential;
use in_flight::InFlight;

/// What one traffic thread serves requests with.
pub struct Worker {
    /// The config in force, shared by every thread.
    pub live: Arc<Live>,
    /// This thread's upstream connections.
    pub client: UpstreamClient,
    /// Where this thread's records go.
    pub sinks: Sinks,
    /// This thread's view of the shutdown switch.
    pub shutdown: Shutdown,
    /// Whether upstream accepts the gateway's credential, shared by every thread.
    pub upstream_auth: Arc<upstream_auth::UpstreamAuth>,
    /// Set once the shutdown grace is over and this thread closes what is still open: a response cut from then
    /// on was cut by the gateway, and its record says so rather than blaming the caller.
    pub closing: AtomicBool,
}

/// A response body: upstream's, observed on its way through, or the gateway's own answer. Upstream's is boxed
/// all the same: hyper moves the response several times on its way out, and the observed body is large.
pub type ResponseBody = Either<Pin<Box<body::Observed<UpstreamAnswer>>>, Body>;

/// Upstream's response body as the caller gets it: as it arrives, or as the gateway read it (a 403 read to
/// learn whether it refused the gateway's credential, and passed on when it did not).
pub type UpstreamAnswer = Either<client::UpstreamBody, http_body_util::Full<bytes::Bytes>>;

/// A request the request filter let through: where it goes.
struct Admitted<'s> {
    endpoint: Endpoint,
    api: Api,
    project: &'s Arc<Project>,
    /// How much of the path is a route prefix, removed before forwarding.
    prefix_len: usize,
    /// What the request counts against: its project, the project's tag values, its key.
    limits: Subjects,
}

/// A request body on its way upstream.
enum Upload {
    /// The caller's, forwarded as it arrives.
    Streamed(body::Outgoing),
    /// Read whole by the gateway (and perhaps rewritten): these are the bytes sent.
    Whole(bytes::Bytes),
}

/// A request upstream answered.
struct Forwarded {
    response: Response<UpstreamAnswer>,
    endpoint: Endpoint,
    /// The gateway asked for stream usage the client did not ask for.
    usage_injected: bool,
}

/// The traffic handler: every request on the traffic listener comes here, with its thread's worker.
pub async fn handle(worker: Arc<Worker>, req: Request<Incoming>) -> Response<ResponseBody> {
    let snapshot = worker.live.load();
    let request_id = headers::request_id(req.headers());
    let mut record =
        InFlight::start(worker.clone(), snapshot.clone(), request_id.clone(), req.method(), req.uri().path());
    let expects_continue = req.headers().contains_key(http::header::EXPECT);
    let req = req.map(|body| body::CallerIncoming::new(body, expects_continue, &worker.shutdown));
    match forward(&worker, &snapshot, req, &mut record).await {
        Ok(forwarded) => response_filter(forwarded, record, &snapshot),
        Err(e) => {
            record.refused(&e);
            drop(record);
            let mut res = e.into_response().map(Either::Right);
            res.headers_mut().insert(headers::REQUEST_ID, request_id);
            res
        }
    }
}

/// Every phase up to upstream's response head. Errors are the gateway's own answers; upstream's error
/// responses are `Ok` and pass through unchanged.
async fn forward(
    worker: &Worker,
    snapshot: &Snapshot,
    req: Request<body::CallerIncoming>,
    record: &mut InFlight,
) -> Result<Forwarded, GatewayError> {
    if worker.shutdown.is_draining() {
        return Err(GatewayError::ShuttingDown);
    }
    let (mut parts, body) = req.into_parts();
    let admitted = request_filter(snapshot, &parts, record)?;
    let upstream = &snapshot.config.upstream;
    let started = tokio::time::Instant::now();
    // Reading the caller's body (when it is read whole) and waiting for upstream's response head share one
    // deadline, so a caller that trickles its body cannot hold a request open longer than upstream may.
    // Pinned where it is built: the exchange is large, and moved into the timeout it would be copied.
    let exchanged = {
        let exchange = std::pin::pin!(async {
            let (body, usage_injected, demand) =
                request_body(snapshot, &mut parts.headers, body, &admitted, record).await?;
            // Every limit that applies must admit the request; its reservation is settled as its record ends.
            let subjects = admitted.limits.clone();
            let hold = snapshot.limiter.admit(snapshot, &admitted.project.name, subjects, demand).await?;
            record.held(hold);
            let request = upstream_request(parts, body, &admitted, snapshot, record.request_id())?;
            let response = worker.client.request(request, upstream).await;
            Ok::<_, GatewayError>((response, usage_injected))
        });
        tokio::time::timeout(upstream.response_timeout, exchange).await
    };
    match exchanged {
        Err(_) => Err(GatewayError::UpstreamTimeout),
        Ok(Err(e)) => Err(e),
        // hyper passes 100 and 103 by; any other 1xx as a final answer (101 to a request that asked for no
        // upgrade) is nothing a caller can use.
        Ok(Ok((Ok(response), _))) if response.status().is_informational() => {
            record.span().in_scope(|| {
                tracing::warn!(status = %response.status(), "upstream answered with an informational status");
            });
            Err(GatewayError::UpstreamUnreachable)
        }
        Ok(Ok((Ok(response), usage_injected))) => {
            let remaining = upstream.response_timeout.saturating_sub(started.elapsed());
            let response = credential_filter(worker, snapshot, response, remaining, record).await?;
            Ok(Forwarded { response, endpoint: admitted.endpoint, usage_injected })
        }
        Ok(Ok((Err(e), _))) => Err(upstream_error(&*e, snapshot, record)),
    }
}

/// Request filter: a well-formed request (one `Host`, a body the gateway can pass on), then which endpoint, who
/// is calling, which project, each recorded as it is learned.
fn request_filter<'s>(
    snapshot: &'s Snapshot,
    parts: &Parts,
    record: &mut InFlight,
) -> Result<Admitted<'s>, GatewayError> {
    well_formed(parts)?;
    let path = parts.uri.path();
    let matched = snapshot.routes.classify(&parts.method, path)?;
    record.routed(matched.endpoint);
    let key = snapshot.callers.authenticate(&parts.headers)?;
    record.caller(key);
    let requested = snapshot.attributor.requested(&parts.headers);
    let attribution = snapshot.attributor.resolve(key.map(|k| &**k), requested, matched.route_project)?;
    record.attributed(&attribution);
    if attribution.source == Source::Rerouted {
        record.span().in_scope(|| tracing::warn!(project = %attribution.project.name, "unattributed request rerouted"));
    }
    // Most requests go to their key's own project: their subjects are ready-made.
    let limits: Subjects = match key {
        Some(k) if k.project.as_ref().is_some_and(|p| Arc::ptr_eq(p, attribution.project)) => {
            k.counted_with_project.clone()
        }
        Some(k) => attribution.project.counted.iter().cloned().chain(k.counted.clone()).collect(),
        None => attribution.project.counted.clone(),
    };
    Ok(Admitted {
        endpoint: matched.endpoint,
        api: matched.api,
        project: attribution.project,
        prefix_len: path.len() - matched.upstream_path.len(),
        limits,
    })
}

/// What hyper leaves to the server to refuse (RFC 9112): more than one `Host` in any request, or none in an
/// HTTP/1.1 one (section 3.2: 400); `chunked` applied more than once (section 6.1: 400, as hyper refuses a
/// coding list it cannot read); and a transfer coding other than `chunked` (section 6.1: 501; hyper takes the last
/// coding, `chunked`, and would have the gateway forward the rest of the coding's bytes as the body). A
/// `Transfer-Encoding` list is read across every field line, and its empty elements (`chunked, ,`) are no coding
/// (RFC 9110 section 5.6.1).
fn well_formed(parts: &Parts) -> Result<(), GatewayError> {
    let hosts = parts.headers.get_all(http::header::HOST).iter().count();
    if hosts > 1 || (hosts == 0 && parts.version == Version::HTTP_11) {
        return Err(GatewayError::InvalidRequest(
            "a request carries one Host header (an HTTP/1.1 request exactly one)".into(),
        ));
    }
    let mut chunked = 0;
    for value in parts.headers.get_all(http::header::TRANSFER_ENCODING) {
        let text = String::from_utf8_lossy(value.as_bytes());
        for coding in text.split(',').map(str::trim).filter(|c| !c.is_empty()) {
            if !coding.eq_ignore_ascii_case("chunked") {
                return Err(GatewayError::UnsupportedTransferCoding(coding.chars().take(32).collect()));
            }
            chunked += 1;
        }
    }
    if chunked > 1 {
        return Err(GatewayError::InvalidRequest("the chunked transfer coding is applied once at most".into()));
    }
    Ok(())
}

/// The body to send upstream, whether the gateway asked for stream usage on the caller's behalf, and what the
/// request may use at most. The body is read whole only when the gateway needs what it says (the model, for a
/// project's allowlist; the stream flag, to have a chat stream report its usage for metering; the output cap, to
/// reserve against limits) or signs it (SigV4 hashes the body).
async fn request_body(
    snapshot: &Snapshot,
    headers: &mut http::HeaderMap,
    body: body::CallerIncoming,
    admitted: &Admitted<'_>,
    record: &mut InFlight,
) -> Result<(Upload, bool, Demand), GatewayError> {
    let limit = snapshot.config.server.max_body_bytes;
    body::check_declared_length(headers, limit)?;
    let (endpoint, project) = (admitted.endpoint, admitted.project);
    let check_model = endpoint.has_model() && !project.models.is_empty();
    let meter_stream = snapshot.config.metering.enabled && endpoint == Endpoint::ChatCompletions;
    let signs = matches!(snapshot.credential, Credential::SigV4(_));
    let estimate = !admitted.limits.is_empty() && Dialect::of(endpoint).is_some();
    if !check_model && !meter_stream && !signs && !estimate {
        return Ok((Upload::Streamed(body::streamed(body, limit)), false, estimate::unbilled()));
    }
    let bytes = body::read(body, limit).await?;
    if !check_model && !meter_stream && !estimate {
        return Ok((Upload::Whole(bytes), false, estimate::unbilled()));
    }
    let facts = if check_model || estimate || body::may_stream(&bytes) {
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
    let demand = match estimate {
        true => estimate::billed(&facts, bytes.len(), &snapshot.config.limits, &snapshot.prices),
        false => estimate::unbilled(),
    };
    // The model is caller text until upstream accepts it: keep logs, ledger and metric labels bounded.
    let (stream, include_usage) = (facts.stream, facts.include_usage);
    record.model(facts.model.filter(|m| is_model_id(m)));
    if meter_stream && stream && !include_usage {
        headers.remove(http::header::CONTENT_LENGTH);
        return Ok((Upload::Whole(off_thread_if_large(&bytes, body::with_include_usage).await?), true, demand));
    }
    Ok((Upload::Whole(bytes), false, demand))
}

/// Upstream request filter: the caller's request as upstream gets it: the gateway's credential and the
/// resolved project instead of the caller's, the route prefix removed, HTTP/1.1; with SigV4, signed last, as sent.
fn upstream_request(
    mut parts: Parts,
    upload: Upload,
    admitted: &Admitted<'_>,
    snapshot: &Snapshot,
    request_id: &HeaderValue,
) -> Result<Request<body::Outgoing>, GatewayError> {
    headers::to_upstream(
        &mut parts.headers,
        admitted.api,
        &admitted.project.id_header,
        &snapshot.credential,
        request_id,
    );
    if snapshot.config.metering.enabled && Dialect::of(admitted.endpoint).is_some() {
        // Usage is read from the bytes as they pass, so they must arrive as they are. Accept-Encoding is a
        // preference, and the caller still gets a valid (uncompressed) response.
        parts.headers.insert(http::header::ACCEPT_ENCODING, HeaderValue::from_static("identity"));
    }
    // Most requests go upstream with the target they came with: then their parsed target (origin form, no
    // authority) is reused as it is.
    let cleaned = parts.uri.query().and_then(headers::query_without_credentials);
    if parts.uri.authority().is_some() || admitted.prefix_len > 0 || cleaned.is_some() {
        let path = &parts.uri.path()[admitted.prefix_len..];
        let query = match &cleaned {
            Some(cleaned) => Some(cleaned.as_str()).filter(|q| !q.is_empty()),
            None => parts.uri.query(),
        };
        parts.uri = upstream_uri(path, query)?;
    }
    parts.version = Version::HTTP_11;
    let body = match (upload, &snapshot.credential) {
        (Upload::Whole(bytes), Credential::SigV4(signer)) => {
            if let Some(query) = parts.uri.query().and_then(crate::aws::sigv4::canonical_query) {
                parts.uri = upstream_uri(parts.uri.path(), Some(query.as_str()).filter(|q| !q.is_empty()))?;
            }
            let target = parts.uri.path_and_query().map_or("/", PathAndQuery::as_str);
            if let Err(e) = signer.sign(&parts.method, target, &mut parts.headers, &bytes) {
                tracing::error!(error = %format!("{e:#}"), "the request could not be signed");
                return Err(GatewayError::UpstreamUnreachable);
            }
            body::whole(bytes)
        }
        // `request_body` reads every body whole for SigV4: an unsigned request never goes upstream.
        (Upload::Streamed(_), Credential::SigV4(_)) => {
            tracing::error!("a streamed body cannot be signed");
            return Err(GatewayError::UpstreamUnreachable);
        }
        (Upload::Whole(bytes), _) => body::whole(bytes),
        (Upload::Streamed(body), _) => body,
    };
    Ok(Request::from_parts(parts, body))
}

/// The request target upstream, in origin form (`/path?query`): the client sends `Host` itself.
fn upstream_uri(path: &str, query: Option<&str>) -> Result<Uri, GatewayError> {
    let path_and_query = match query {
        Some(q) => PathAndQuery::try_from(format!("{path}?{q}")),
        None => PathAndQuery::try_from(path),
    }
    .map_err(|_| GatewayError::UnknownRoute)?;
    Ok(Uri::from(path_and_query))
}

/// How much of an upstream 401 or 403 body the gateway reads (they are small), and for how long at most for a
/// 401, whose body is read only for the log.
const REFUSAL_READ: (u64, std::time::Duration) = (16 * 1024, std::time::Duration::from_secs(5));

/// Upstream's answer, judged for what it says of the gateway's own credential. With the caller's own credential
/// passed through, a refusal is about the caller's and passes through. Otherwise a 401 is always the gateway's
/// credential refused; a 403 is only when its error code says so (a permission error, such as a model the
/// account may not use, is upstream's answer to the request, and passes through unchanged), so its body is read,
/// within `remaining` of the request's deadline, and sent on as read when it passes through.
async fn credential_filter(
    worker: &Worker,
    snapshot: &Snapshot,
    response: Response<client::UpstreamBody>,
    remaining: std::time::Duration,
    record: &mut InFlight,
) -> Result<Response<UpstreamAnswer>, GatewayError> {
    let status = response.status();
    if upstream_auth::shows_acceptance(status) {
        worker.upstream_auth.accepted();
    }
    if !snapshot.credential.replaces_callers() || !matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
        return Ok(response.map(Either::Left));
    }
    let (limit, log_within) = REFUSAL_READ;
    if status == StatusCode::UNAUTHORIZED {
        snapshot.credential.refused();
        if let Some(unlogged) = worker.upstream_auth.refused(status.as_u16()) {
            let (parts, body) = response.into_parts();
            let read = tokio::time::timeout(remaining.min(log_within), body::read(body, limit)).await;
            let code = read.ok().and_then(Result::ok).map(|b| error_codes(&parts.headers, &b)).unwrap_or_default();
            log_refusal(worker, record, status, code.first().map_or("", String::as_str), unlogged);
        }
        return Err(GatewayError::UpstreamAuthFailed);
    }
    // A 403 too large to read whole is judged by its header alone.
    if body::declared_length(response.headers()).is_some_and(|n| n > limit) {
        return match credential_code(&error_codes(response.headers(), b"")) {
            Some(code) => Err(refused_403(worker, snapshot, record, &code)),
            None => Ok(response.map(Either::Left)),
        };
    }
    let (parts, body) = response.into_parts();
    let bytes = match tokio::time::timeout(remaining, body::read(body, limit)).await {
        Err(_) => return Err(GatewayError::UpstreamTimeout),
        Ok(Ok(bytes)) => bytes,
        Ok(Err(e)) => {
            record.span().in_scope(|| {
                tracing::warn!(
                    upstream_status = status.as_u16(),
                    error = %e,
                    limit,
                    "upstream's 403 body could not be read whole"
                );
            });
            return Err(GatewayError::UpstreamUnreachable);
        }
    };
    match credential_code(&error_codes(&parts.headers, &bytes)) {
        Some(code) => Err(refused_403(worker, snapshot, record, &code)),
        None => Ok(Response::from_parts(parts, Either::Right(http_body_util::Full::new(bytes)))),
    }
}

/// A 403 whose code says upstream refused the gateway's credential: counted, and logged if it is the first of a
/// burst.
fn refused_403(worker: &Worker, snapshot: &Snapshot, record: &mut InFlight, code: &str) -> GatewayError {
    snapshot.credential.refused();
    if let Some(unlogged) = worker.upstream_auth.refused(StatusCode::FORBIDDEN.as_u16()) {
        log_refusal(worker, record, StatusCode::FORBIDDEN, code, unlogged);
    }
    GatewayError::UpstreamAuthFailed
}

/// The error line for the first refusal of a burst, with what upstream said (its error's code, never its
/// message, which may quote the key).
fn log_refusal(worker: &Worker, record: &mut InFlight, status: StatusCode, code: &str, unlogged: u64) {
    record.span().in_scope(|| {
        tracing::error!(
            upstream_status = status.as_u16(),
            upstream_code = %code,
            unlogged_since_last = unlogged,
            hint = worker.live.load().credential.refusal_hint(),
            "upstream refused the gateway's own credential (callers get 502 upstream_auth_failed)"
        );
    });
}

/// The error codes that say upstream did not accept the credential itself (OpenAI's, Anthropic's, and AWS's
/// for a key, a signature or a token it does not take), as opposed to what the credential may do
/// (`AccessDeniedException`, a model permission error).
const CREDENTIAL_CODES: [&str; 11] = [
    "invalid_api_key",
    "authentication_error",
    "UnrecognizedClientException",
    "InvalidSignatureException",
    "SignatureDoesNotMatch",
    "IncompleteSignature",
    "InvalidClientTokenId",
    "ExpiredToken",
    "ExpiredTokenException",
    "MissingAuthenticationToken",
    "MissingAuthenticationTokenException",
];

/// The first of `codes` that says the credential itself was refused.
pub fn credential_code(codes: &[String]) -> Option<String> {
    codes.iter().find(|code| CREDENTIAL_CODES.iter().any(|c| c.eq_ignore_ascii_case(code))).cloned()
}

/// The error codes an upstream error gives, most specific first, each kept to a short id: AWS's
/// `x-amzn-errortype` header (`UnrecognizedClientException:http://...`, the part before `:`), then the body's,
/// as OpenAI (`error.code`, `error.type`) or AWS (`__type`, `com.amazon.coral.service#ExpiredTokenException`:
/// the part after `#`; `code`) shape it.
pub fn error_codes(headers: &http::HeaderMap, body: &[u8]) -> Vec<String> {
    let short = |code: &str| -> String {
        code.chars().filter(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')).take(64).collect()
    };
    let mut codes = Vec::new();
    for value in headers.get_all("x-amzn-errortype") {
        let text = String::from_utf8_lossy(value.as_bytes());
        codes.push(short(text.split(':').next().unwrap_or("")));
    }
    if !body.is_empty() {
        let value: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
        for v in [&value["error"]["code"], &value["error"]["type"], &value["__type"], &value["code"], &value["type"]] {
            if let Some(code) = v.as_str() {
                codes.push(short(code.rsplit('#').next().unwrap_or("")));
            }
        }
    }
    codes.retain(|c| !c.is_empty());
    codes
}

/// The gateway's answer to an exchange with upstream that failed before its response head.
fn upstream_error(e: &(dyn std::error::Error + 'static), snapshot: &Snapshot, record: &mut InFlight) -> GatewayError {
    if body::is_over_limit(e) {
        GatewayError::RequestTooLarge(snapshot.config.server.max_body_bytes)
    } else if body::is_caller_body_error(e) {
        // As a body read whole answers it (`body::read`).
        GatewayError::InvalidRequest("the request body could not be read".into())
    } else {
        record.span().in_scope(|| tracing::warn!(error = %access_log::error_chain(e), "upstream request failed"));
        GatewayError::UpstreamUnreachable
    }
}

/// Response filter: upstream's head as the caller gets it, and the body observed on its way through (read for
/// usage where it bills tokens).
fn response_filter(forwarded: Forwarded, mut record: InFlight, snapshot: &Snapshot) -> Response<ResponseBody> {
    let Forwarded { response, endpoint, usage_injected } = forwarded;
    let (mut parts, incoming) = response.into_parts();
    headers::to_caller(&mut parts.headers, parts.status, record.request_id());
    let stream =
        parts.headers.get(http::header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    record.answered(parts.status, stream);
    // Content codings are case-insensitive.
    let encoded = parts
        .headers
        .get(http::header::CONTENT_ENCODING)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
    // hyper sends these without polling their body: they are complete once their head is.
    let bodiless = matches!(parts.status, StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED);
    if bodiless {
        record.body_ended();
    }
    if snapshot.config.metering.enabled
        && parts.status.is_success()
        && !bodiless
        && let Some(dialect) = Dialect::of(endpoint)
    {
        if encoded {
            record.encoded();
        } else {
            let tap = if stream { UsageTap::sse(dialect, usage_injected) } else { UsageTap::json(dialect) };
            let tap = if record.knows_model() { tap.model_known() } else { tap };
            if tap.rewrites() {
                parts.headers.remove(http::header::CONTENT_LENGTH);
            }
            record.tap = Some(tap);
        }
    }
    // An empty body (`Content-Length: 0`) is never polled either: it ends here, and a tap reads it as the
    // nothing it is.
    if !bodiless && http_body::Body::is_end_stream(&incoming) {
        if let Some(tap) = &mut record.tap {
            tap.finish();
        }
        record.body_ended();
    }
    let body = body::Observed::new(incoming, snapshot.config.upstream.idle_timeout, record);
    Response::from_parts(parts, Either::Left(Box::pin(body)))
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
