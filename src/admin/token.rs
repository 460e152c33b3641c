//! The admin listener's bearer token (`server.admin_token_env` / `server.admin_token_file`): when one is
//! configured, every admin request but the kubelet's probes (`/healthz`, `/readyz`) and the spend page's own
//! code (its HTML, script and stylesheet, which hold no data and ask for the token) must present it as
//! `Authorization: Bearer <token>`. The token is read from its source for each request that presents one, so a
//! rotated Secret file is in force at once; a source that cannot be read lets nothing through.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use super::error::AdminError;
use crate::live::Live;

/// Paths served without the token: probes, and the page's code (every number it shows comes from `/api/`).
pub const PUBLIC: [&str; 5] = ["/healthz", "/readyz", "/", "/assets/spend.js", "/assets/spend.css"];

/// Lets a request through if no token is configured, its path is [`PUBLIC`], or it presents the token.
pub async fn require(State(live): State<Arc<Live>>, request: Request, next: Next) -> Response {
    let Some(source) = live.load().config.server.admin_token.clone() else {
        return next.run(request).await;
    };
    if PUBLIC.contains(&request.uri().path()) {
        return next.run(request).await;
    }
    let Some(presented) = bearer(request.headers()) else {
        tracing::debug!(path = request.uri().path(), "admin request without a token refused");
        return AdminError::TokenRequired.into_response();
    };
    // A file read, off the async threads.
    let token = match tokio::task::spawn_blocking(move || source.read()).await {
        Ok(Ok(token)) => token,
        Ok(Err(e)) => {
            tracing::error!(error = %format!("{e:#}"), "the admin token cannot be read; admin requests are refused");
            return AdminError::TokenUnreadable.into_response();
        }
        Err(e) => {
            tracing::error!(error = %e, "reading the admin token failed");
            return AdminError::TokenUnreadable.into_response();
        }
    };
    if same(presented.as_bytes(), token.expose().as_bytes()) {
        next.run(request).await
    } else {
        tracing::warn!(path = request.uri().path(), "admin request with a wrong token refused");
        AdminError::TokenRequired.into_response()
    }
}

/// The token of `Authorization: Bearer <token>` (the scheme in any case, as RFC 9110 has it).
fn bearer(headers: &http::HeaderMap) -> Option<String> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim().to_owned())
}

/// Whether `a` and `b` are equal, in a time that depends on neither: their SHA-256 digests (of one length,
/// whatever the inputs' lengths) are compared whole, every byte, with no early exit.
fn same(a: &[u8], b: &[u8]) -> bool {
    let (a, b) = (Sha256::digest(a), Sha256::digest(b));
    let differences = a.iter().zip(b.iter()).fold(0u8, |acc, (x, y)| std::hint::black_box(acc | (x ^ y)));
    differences == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_token_matches() {
        assert!(same(b"0123456789abcdef", b"0123456789abcdef"));
        for other in [&b"0123456789abcdeF"[..], b"0123456789abcde", b"0123456789abcdef0", b""] {
            assert!(!same(other, b"0123456789abcdef"), "{other:?}");
        }
    }

    #[test]
    fn the_token_is_taken_from_a_bearer_authorization_only() {
        let headers = |value: &str| {
            let mut h = http::HeaderMap::new();
            h.insert(http::header::AUTHORIZATION, http::HeaderValue::from_str(value).expect("value"));
            h
        };
        assert_eq!(bearer(&headers("Bearer abc")).as_deref(), Some("abc"));
        assert_eq!(bearer(&headers("bearer  abc ")).as_deref(), Some("abc"));
        assert_eq!(bearer(&headers("Basic abc")), None);
        assert_eq!(bearer(&headers("Bearer")), None);
        assert_eq!(bearer(&http::HeaderMap::new()), None);
    }
}
