//! Every error the gateway itself returns to a caller, grouped by whose fault it is, and the one JSON
//! shape they all take. Upstream errors never pass through here: they are forwarded unchanged.

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};

/// `error` and its sources, outermost first.
pub fn chain<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(error), |e| e.source())
}

/// A request-time error the gateway answers itself.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum GatewayError {
    // The caller's fault.
    /// No gateway key, or one that is not configured.
    #[error("missing or unknown API key: send a gateway key as `Authorization: Bearer` or `x-api-key`")]
    InvalidApiKey,
    /// The caller asked for a project its key may not use: what it sent, if that has a project id's shape; else
    /// none, and the message does not quote it (a key pasted into the project header is never sent back, nor is the
    /// name of a configured project the caller may not use).
    #[error("{} is not allowed for this caller", shown_project(.0.as_deref()))]
    ProjectNotAllowed(Option<String>),
    /// Nothing attributes the request and the policy rejects unattributed traffic.
    #[error("this request is not attributed to any project: use a key, route or OpenAI-Project header that names one")]
    ProjectRequired,
    /// The project's `models` allowlist excludes the requested model.
    #[error("model {model:?} is not allowed for project {project:?}")]
    ModelNotAllowed {
        /// The requested model.
        model: String,
        /// The resolved project's name.
        project: String,
    },
    /// Not an inference route the gateway forwards.
    #[error("unknown route: only inference endpoints are served here")]
    UnknownRoute,
    /// The request body exceeds `server.max_body_bytes`.
    #[error("request body is larger than the limit of {0} bytes")]
    RequestTooLarge(u64),
    /// The body could not be read as the JSON the route needs, or the request is not well-formed.
    #[error("{0}")]
    InvalidRequest(String),
    /// The request body is in a transfer coding the gateway cannot decode (`gzip, chunked`): forwarded without it,
    /// upstream would read the coded bytes as the body (RFC 9112 section 6.1: 501).
    #[error("transfer coding {0:?} is not supported: send the body chunked, or with a Content-Length")]
    UnsupportedTransferCoding(String),

    /// A budget applies to the request, and the gateway has no price for its model, so it could not count it:
    /// the budget's subject.
    #[error(
        "the budget of {0} cannot count this request: the gateway has no price for its model (the gateway's operator \
         can add one under [[prices]])"
    )]
    ModelNotPriced(String),
    /// A configured limit refused the request: a rate limit (`rate_limit_exceeded`) or a spent budget
    /// (`insufficient_quota`). The message names that limit, with its own numbers only.
    #[error("{0}")]
    LimitExceeded(Box<crate::limits::Refusal>),

    // The gateway's state.
    /// The gateway is draining for shutdown.
    #[error("the gateway is shutting down; retry")]
    ShuttingDown,
    /// The limits store cannot be reached, and `limits.on_backend_error = "deny"`.
    #[error("limits cannot be checked right now; retry shortly")]
    LimitsUnavailable,

    // The upstream's fault.
    /// No connection to the upstream could be made.
    #[error("the upstream could not be reached")]
    UpstreamUnreachable,
    /// The upstream did not answer in time.
    #[error("the upstream did not respond in time")]
    UpstreamTimeout,
    /// The upstream refused the gateway's own credential (a 401, or a 403 whose code says so): callers' keys never
    /// reach upstream, so this is always the gateway's configuration, never the caller's key.
    #[error(
        "the upstream refused the gateway's own credential; this is not about your key: the gateway's operator must fix it"
    )]
    UpstreamAuthFailed,
}

/// The project a `project_not_allowed` message names.
fn shown_project(id: Option<&str>) -> String {
    match id {
        Some(id) => format!("project {id:?}"),
        None => "the project the request names".to_owned(),
    }
}

impl GatewayError {
    /// HTTP status of the error.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::InvalidApiKey => StatusCode::UNAUTHORIZED,
            Self::ProjectNotAllowed(_)
            | Self::ProjectRequired
            | Self::ModelNotAllowed { .. }
            | Self::ModelNotPriced(_) => StatusCode::FORBIDDEN,
            Self::UnknownRoute => StatusCode::NOT_FOUND,
            Self::RequestTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::InvalidRequest(_) => StatusCode::BAD_REQUEST,
            Self::UnsupportedTransferCoding(_) => StatusCode::NOT_IMPLEMENTED,
            Self::LimitExceeded(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::ShuttingDown | Self::LimitsUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::UpstreamUnreachable | Self::UpstreamAuthFailed => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The `error.code` callers and SDKs match on.
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidApiKey => "invalid_api_key",
            Self::ProjectNotAllowed(_) => "project_not_allowed",
            Self::ProjectRequired => "project_required",
            Self::ModelNotAllowed { .. } => "model_not_allowed",
            Self::ModelNotPriced(_) => "model_not_priced",
            Self::UnknownRoute => "unknown_route",
            Self::RequestTooLarge(_) => "request_too_large",
            Self::InvalidRequest(_) => "invalid_request",
            Self::UnsupportedTransferCoding(_) => "unsupported_transfer_coding",
            Self::LimitExceeded(r) if r.kind.is_budget() => "insufficient_quota",
            Self::LimitExceeded(_) => "rate_limit_exceeded",
            Self::ShuttingDown => "shutting_down",
            Self::LimitsUnavailable => "limits_unavailable",
            Self::UpstreamUnreachable => "upstream_unreachable",
            Self::UpstreamTimeout => "upstream_timeout",
            Self::UpstreamAuthFailed => "upstream_auth_failed",
        }
    }

    /// The `error.type`, from the vocabulary both OpenAI and Anthropic SDKs know.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::InvalidApiKey => "authentication_error",
            Self::ProjectNotAllowed(_)
            | Self::ProjectRequired
            | Self::ModelNotAllowed { .. }
            | Self::ModelNotPriced(_) => "permission_error",
            Self::UnknownRoute => "not_found_error",
            Self::RequestTooLarge(_) => "request_too_large",
            Self::InvalidRequest(_) | Self::UnsupportedTransferCoding(_) => "invalid_request_error",
            // OpenAI's types for its own quota and rate limit errors.
            Self::LimitExceeded(r) if r.kind.is_budget() => "insufficient_quota",
            Self::LimitExceeded(r) if r.kind == crate::config::limits::Kind::RequestsPerMinute => "requests",
            Self::LimitExceeded(_) => "tokens",
            Self::ShuttingDown => "overloaded_error",
            Self::LimitsUnavailable | Self::UpstreamUnreachable | Self::UpstreamTimeout | Self::UpstreamAuthFailed => {
                "api_error"
            }
        }
    }

    /// Whether retrying the same request could help. OpenAI's SDKs retry 5xx answers unless told otherwise by
    /// `x-should-retry: false`, which is sent where a retry cannot succeed: a refused gateway credential stays
    /// refused until the operator fixes it, and retrying would only multiply the refusals.
    pub fn retryable(&self) -> bool {
        match self {
            Self::UpstreamAuthFailed => false,
            // A spent budget stays spent until its window ends (hours or days), and a request larger than a
            // rate limit never fits it.
            Self::LimitExceeded(r) => !r.kind.is_budget() && !r.too_large(),
            Self::LimitsUnavailable
            | Self::InvalidApiKey
            | Self::ProjectNotAllowed(_)
            | Self::ProjectRequired
            | Self::ModelNotAllowed { .. }
            | Self::ModelNotPriced(_)
            | Self::UnknownRoute
            | Self::RequestTooLarge(_)
            | Self::InvalidRequest(_)
            | Self::UnsupportedTransferCoding(_)
            | Self::ShuttingDown
            | Self::UpstreamUnreachable
            | Self::UpstreamTimeout => true,
        }
    }

    /// The error body: OpenAI's `{"error": {...}}`, with Anthropic's top-level `"type": "error"` beside it so
    /// that both SDK families parse it.
    pub fn body(&self) -> String {
        serde_json::json!({
            "type": "error",
            "error": {
                "message": self.to_string(),
                "type": self.kind(),
                "param": null,
                "code": self.code(),
            }
        })
        .to_string()
    }
}

impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        let mut res = (self.status(), self.body()).into_response();
        res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if !self.retryable() {
            res.headers_mut().insert("x-should-retry", HeaderValue::from_static("false"));
        }
        if let Self::LimitExceeded(refusal) = &self {
            limit_headers(res.headers_mut(), refusal);
        }
        if matches!(self, Self::LimitsUnavailable) {
            res.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        res
    }
}

/// `Retry-After` and the `x-ratelimit-*` headers OpenAI's clients read, for the limit that refused a request:
/// `-requests` for a request rate, `-tokens` for a token rate (none for a budget: waiting is no use).
fn limit_headers(headers: &mut http::HeaderMap, refusal: &crate::limits::Refusal) {
    use crate::config::limits::Kind;
    let unit = match refusal.kind {
        Kind::RequestsPerMinute => "requests",
        Kind::InputTokensPerMinute | Kind::OutputTokensPerMinute => "tokens",
        Kind::UsdPerDay | Kind::UsdPerMonth => return,
    };
    let mut set = |name: String, value: String| {
        if let (Ok(name), Ok(value)) = (http::HeaderName::try_from(name), HeaderValue::try_from(value)) {
            headers.insert(name, value);
        }
    };
    set("retry-after".into(), refusal.retry_after_secs().to_string());
    set(format!("x-ratelimit-limit-{unit}"), refusal.limit.to_string());
    set(format!("x-ratelimit-remaining-{unit}"), refusal.limit.saturating_sub(refusal.used).to_string());
    set(format!("x-ratelimit-reset-{unit}"), refusal.reset_text());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_openai_shaped() {
        let e = GatewayError::ModelNotAllowed { model: "m".into(), project: "P".into() };
        let v: serde_json::Value = serde_json::from_str(&e.body()).expect("json");
        assert_eq!(v["error"]["code"], "model_not_allowed");
        assert_eq!(v["error"]["type"], "permission_error");
        assert_eq!(v["error"]["param"], serde_json::Value::Null);
        assert_eq!(v["error"]["message"], "model \"m\" is not allowed for project \"P\"");
        assert_eq!(e.status(), StatusCode::FORBIDDEN);
    }

    #[test]
    fn a_refused_gateway_credential_tells_sdks_not_to_retry() {
        let res = GatewayError::UpstreamAuthFailed.into_response();
        assert_eq!(res.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(res.headers().get("x-should-retry").map(HeaderValue::as_bytes), Some(&b"false"[..]));
        // Worth a retry: no header, and the SDK's own policy applies.
        for retryable in [GatewayError::UpstreamUnreachable, GatewayError::UpstreamTimeout, GatewayError::ShuttingDown]
        {
            assert!(!retryable.into_response().headers().contains_key("x-should-retry"));
        }
    }
}
