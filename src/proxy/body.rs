//! Bodies in both directions. Request bodies stream through under the `max_body_bytes` cap, except where
//! the gateway must read the JSON to learn the model; then they are read whole, still under the cap.
//! Response bodies pass through [`Observed`], which forwards each frame the moment it arrives, ends a stream
//! that falls silent for longer than `idle_timeout`, and records first byte and completion for the access log.

use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::HeaderMap;
use http_body::{Frame, SizeHint};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tokio::time::{Instant, Sleep};

use super::access_log::AccessLog;
use crate::error::GatewayError;

/// Rejects a request whose declared length is over the cap before a byte of it is read.
pub fn check_declared_length(headers: &HeaderMap, limit: u64) -> Result<(), GatewayError> {
    let declared =
        headers.get(http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(len) if len > limit => Err(GatewayError::RequestTooLarge(limit)),
        _ => Ok(()),
    }
}

/// A request body forwarded as it arrives; going over `limit` fails the upstream request, which
/// [`is_over_limit`] recognises.
pub fn streamed(body: Body, limit: u64) -> Body {
    Body::new(Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX)))
}

/// Whether an upstream client error was caused by the request body going over its cap.
pub fn is_over_limit(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(error);
    while let Some(e) = source {
        if e.is::<LengthLimitError>() {
            return true;
        }
        source = e.source();
    }
    false
}

/// Reads a JSON request body (at most `limit` bytes) and returns it unchanged, with the `model` it names.
pub async fn read_json(body: Body, limit: u64) -> Result<(Bytes, Option<String>), GatewayError> {
    let limited = Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX));
    let bytes = match limited.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<LengthLimitError>() => return Err(GatewayError::RequestTooLarge(limit)),
        Err(_) => {
            return Err(GatewayError::InvalidRequest("the request body could not be read".into()));
        }
    };
    let model = model_of(&bytes)?;
    Ok((bytes, model))
}

/// The `model` of a JSON object body. Only that field is materialised; a body that is not one JSON object,
/// or that names `model` twice (which a parser upstream might read the other way), is refused.
fn model_of(bytes: &[u8]) -> Result<Option<String>, GatewayError> {
    #[derive(serde::Deserialize)]
    struct ModelOnly {
        model: Option<String>,
    }
    serde_json::from_slice::<ModelOnly>(bytes)
        .map(|m| m.model)
        .map_err(|e| GatewayError::InvalidRequest(format!("request body is not valid JSON: {e}")))
}

pin_project_lite::pin_project! {
    /// An upstream response body on its way to the caller. Owns the request's access log, which is written
    /// when the body ends or is dropped (the caller went away), whichever comes first.
    pub struct Observed<B> {
        #[pin]
        inner: B,
        #[pin]
        idle: Sleep,
        idle_timeout: Duration,
        log: AccessLog,
    }
}

impl<B> Observed<B> {
    /// Wraps `inner`; silence longer than `idle_timeout` ends the body with an error.
    pub fn new(inner: B, idle_timeout: Duration, log: AccessLog) -> Self {
        Self { inner, idle: tokio::time::sleep(idle_timeout), idle_timeout, log }
    }
}

/// The error that ends a stream which fell silent.
#[derive(Debug, thiserror::Error)]
#[error("upstream sent nothing for {0:?}; stream ended")]
pub struct IdleTimeout(Duration);

impl<B> http_body::Body for Observed<B>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<axum::BoxError>,
{
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let mut this = self.project();
        match this.inner.as_mut().poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if frame.is_data() {
                    this.log.first_byte();
                }
                // A body of known length is done after its last frame; hyper will not poll again to see `None`.
                if this.inner.is_end_stream() {
                    this.log.complete();
                }
                this.idle.as_mut().reset(Instant::now() + *this.idle_timeout);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                let e = e.into();
                this.log.stream_error(&*e);
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                this.log.complete();
                Poll::Ready(None)
            }
            Poll::Pending => {
                ready!(this.idle.poll(cx));
                let e = IdleTimeout(*this.idle_timeout);
                this.log.stream_error(&e);
                Poll::Ready(Some(Err(e.into())))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_is_read_strictly() {
        assert_eq!(model_of(br#"{"model":"m","messages":[{"model":"x"}]}"#), Ok(Some("m".into())));
        assert_eq!(model_of(br#"{"messages":[]}"#), Ok(None));
        for bad in [&br#"{"model":"a","model":"b"}"#[..], b"[]", b"{", b"", br#"{"model":1}"#, b"{} {}"] {
            assert!(
                matches!(model_of(bad), Err(GatewayError::InvalidRequest(_))),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[tokio::test]
    async fn reading_respects_the_cap() {
        let body = Body::from(r#"{"model":"m"}"#);
        assert_eq!(read_json(body, 13).await.map(|(_, m)| m), Ok(Some("m".into())));
        let body = Body::from(r#"{"model":"m"}"#);
        assert_eq!(read_json(body, 12).await.map(|(_, m)| m), Err(GatewayError::RequestTooLarge(12)));
    }

    #[test]
    fn declared_length_is_checked() {
        let mut h = HeaderMap::new();
        h.insert("content-length", http::HeaderValue::from_static("11"));
        assert_eq!(check_declared_length(&h, 10), Err(GatewayError::RequestTooLarge(10)));
        assert_eq!(check_declared_length(&h, 11), Ok(()));
    }
}
