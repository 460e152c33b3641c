//! The errors the admin listener's API answers with, in the gateway's one error shape (OpenAI's), so a script
//! that reads the traffic port's errors reads these too.

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};

/// An admin request the listener refuses or cannot answer.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum AdminError {
    // The caller's fault.
    /// No admin token, or the wrong one, where one is configured.
    #[error("this admin endpoint needs the admin token: send it as `Authorization: Bearer <token>`")]
    TokenRequired,
    /// A query parameter the endpoint cannot use.
    #[error("{message}")]
    InvalidParam {
        /// The parameter.
        param: &'static str,
        /// What is wrong with it (it never quotes a value that could be a secret: values here are dates and words).
        message: String,
    },

    // The gateway's state.
    /// The admin token is configured but cannot be read now (the file is gone, say): nothing is let through.
    #[error("the admin token cannot be read; see the gateway's log")]
    TokenUnreadable,
    /// The config names no usage ledger, so there is no spend to show.
    #[error("no usage ledger is configured ([metering] ledger_path): there is no spend to show")]
    NoLedger,
    /// The spend index is still reading the ledger at start-up.
    #[error("the spend index is still reading the ledger ({lines} lines so far); retry in a moment")]
    Indexing {
        /// Lines read so far.
        lines: u64,
    },
    /// Reading the ledger at start-up failed.
    #[error("the spend index could not read the ledger; see the gateway's log")]
    IndexFailed,
}

impl AdminError {
    /// HTTP status of the error.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::TokenRequired => StatusCode::UNAUTHORIZED,
            Self::InvalidParam { .. } => StatusCode::BAD_REQUEST,
            Self::NoLedger => StatusCode::NOT_FOUND,
            Self::TokenUnreadable | Self::Indexing { .. } | Self::IndexFailed => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The `error.code`.
    pub fn code(&self) -> &'static str {
        match self {
            Self::TokenRequired => "invalid_admin_token",
            Self::InvalidParam { .. } => "invalid_request",
            Self::TokenUnreadable => "admin_token_unreadable",
            Self::NoLedger => "no_ledger",
            Self::Indexing { .. } => "indexing",
            Self::IndexFailed => "index_failed",
        }
    }

    /// The `error.type`, from OpenAI's vocabulary.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::TokenRequired => "authentication_error",
            Self::InvalidParam { .. } => "invalid_request_error",
            Self::NoLedger => "not_found_error",
            Self::TokenUnreadable | Self::Indexing { .. } | Self::IndexFailed => "api_error",
        }
    }

    /// The parameter at fault, if one is.
    fn param(&self) -> Option<&'static str> {
        match self {
            Self::InvalidParam { param, .. } => Some(param),
            Self::TokenRequired
            | Self::TokenUnreadable
            | Self::NoLedger
            | Self::Indexing { .. }
            | Self::IndexFailed => None,
        }
    }
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "error": { "message": self.to_string(), "type": self.kind(), "param": self.param(), "code": self.code() }
        });
        let mut res = (self.status(), body.to_string()).into_response();
        let headers = res.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        match self {
            Self::TokenRequired => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"mantlegate admin\""));
            }
            Self::Indexing { .. } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            Self::InvalidParam { .. } | Self::TokenUnreadable | Self::NoLedger | Self::IndexFailed => {}
        }
        res
    }
}
