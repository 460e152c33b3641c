//! Bodies in both directions. Request bodies stream through under the `max_body_bytes` cap, except where the
//! gateway must read or sign them (the model for a project's allowlist, a chat request's stream flag for metering,
//! the SigV4 body hash); then they are read whole, still under the cap.
//! Response bodies pass through [`Observed`], which forwards each frame the moment it arrives, ends a stream
//! that falls silent for longer than `idle_timeout`, and tells the request's [`InFlight`] record of its first
//! byte and its end.

use std::pin::Pin;
use std::sync::LazyLock;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Frame, SizeHint};
use http_body_util::{BodyExt, Either, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use memchr::memmem::Finder;
use tokio::time::{Instant, Sleep};

use super::in_flight::InFlight;
use crate::error::GatewayError;
use crate::metering::usage::UsageTap;
use crate::shutdown::Shutdown;
use tokio_util::sync::CancellationToken;

/// Rejects a request whose declared length is over the cap before a byte of it is read.
pub fn check_declared_length(headers: &HeaderMap, limit: u64) -> Result<(), GatewayError> {
    match declared_length(headers) {
        Some(len) if len > limit => Err(GatewayError::RequestTooLarge(limit)),
        _ => Ok(()),
    }
}

/// The body length a message's `Content-Length` declares, if it declares one.
pub fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok())
}

/// A request body on its way upstream: the caller's, streamed, or one the gateway read whole (and may have
/// rewritten). Concrete types rather than a boxed `Body`: a box per layer per request, and a virtual call per
/// layer per poll, cost more than the types save in writing.
pub type Outgoing = Either<Limited<CallerBody>, Full<Bytes>>;

/// The caller's body as it arrives, its errors marked as the caller's.
pub type CallerBody = http_body_util::combinators::MapErr<CallerIncoming, fn(hyper::Error) -> CallerBodyError>;

/// How much of an upload the gateway reads and throws away after answering without it.
pub const DISCARD_BYTES: usize = 64 << 20;
/// How long the gateway keeps reading an upload it answered without.
pub const DISCARD_TIME: Duration = Duration::from_secs(30);

/// The caller's request body. Dropped before its end, because the gateway answered without the rest (a
/// refusal, a 413, upstream's early answer), it is read to its end and thrown away by a task of its own, as
/// nginx discards an unread body. hyper then finishes reading the request, so a caller that writes its whole
/// request before it reads (Python's `http.client`, many simple clients) gets the answer rather than a reset
/// from a socket closed with data unread, and the connection stays usable. At most [`DISCARD_BYTES`] over
/// [`DISCARD_TIME`] are read so, and none once the gateway is draining; past that, the connection is closed.
///
/// Not discarded: a body that declares more than [`DISCARD_BYTES`] still to come (the connection closes
/// anyway), and one whose caller sent `Expect: 100-continue` and was never asked for it (hyper would ask for
/// it now, after the answer, and take the caller's next request for its body).
#[derive(Debug)]
pub struct CallerIncoming {
    /// `None` once it has ended (a chunked body says so only by ending).
    body: Option<Incoming>,
    /// Whether it is discarded if dropped before its end.
    discard: bool,
    /// The drain: discarding stops when it begins.
    drain: CancellationToken,
}

impl CallerIncoming {
    /// The caller's body, as hyper hands it over; `expects_continue` if the request said `Expect`.
    pub fn new(body: Incoming, expects_continue: bool, shutdown: &Shutdown) -> Self {
        Self { body: Some(body), discard: !expects_continue, drain: shutdown.drain_token() }
    }
}

impl http_body::Body for CallerIncoming {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let Some(body) = &mut this.body else { return Poll::Ready(None) };
        // Asked for: a caller that expected to be asked is sending it now.
        this.discard = true;
        let frame = ready!(Pin::new(body).poll_frame(cx));
        if frame.is_none() {
            this.body = None;
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.as_ref().is_none_or(Incoming::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.body.as_ref().map(Incoming::size_hint).unwrap_or_default()
    }
}

impl Drop for CallerIncoming {
    fn drop(&mut self) {
        let Some(body) = self.body.take() else { return };
        if !self.discard
            || http_body::Body::is_end_stream(&body)
            || http_body::Body::size_hint(&body).lower() > DISCARD_BYTES as u64
        {
            return;
        }
        if self.drain.is_cancelled() {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let drain = self.drain.clone();
            runtime.spawn(async move {
                tokio::select! {
                    () = discard(body) => {}
                    () = drain.cancelled() => {}
                }
            });
        }
    }
}

/// Reads a body to its end and throws it away, within [`DISCARD_BYTES`] and [`DISCARD_TIME`]. A caller that
/// went away ends it at once.
async fn discard(mut body: Incoming) {
    let until = Instant::now() + DISCARD_TIME;
    let mut left = DISCARD_BYTES;
    while let Ok(Some(Ok(frame))) = tokio::time::timeout_at(until, body.frame()).await {
        let n = frame.data_ref().map_or(0, Bytes::len);
        if n >= left {
            return;
        }
        left -= n;
    }
}

/// The caller's body failed (a malformed chunk, or the caller stopped before its declared length): the caller's
/// fault, not upstream's, which [`is_caller_body_error`] recognises in a failed upstream request.
#[derive(Debug, thiserror::Error)]
#[error("the request body could not be read: {0}")]
pub struct CallerBodyError(#[source] hyper::Error);

/// A request body forwarded as it arrives; going over `limit` fails the upstream request, which
/// [`is_over_limit`] recognises, as is the caller's body failing ([`is_caller_body_error`]).
pub fn streamed(body: CallerIncoming, limit: u64) -> Outgoing {
    let body: CallerBody = body.map_err(CallerBodyError);
    Either::Left(Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX)))
}

/// A request body the gateway read whole.
pub fn whole(bytes: Bytes) -> Outgoing {
    Either::Right(Full::new(bytes))
}

/// Whether an upstream client error was caused by the request body going over its cap.
pub fn is_over_limit(error: &(dyn std::error::Error + 'static)) -> bool {
    crate::error::chain(error).any(|e| e.is::<LengthLimitError>())
}

/// Whether an upstream client error was caused by the caller's body failing.
pub fn is_caller_body_error(error: &(dyn std::error::Error + 'static)) -> bool {
    crate::error::chain(error).any(|e| e.is::<CallerBodyError>())
}

/// What the gateway needs to know from a JSON request body.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Facts {
    /// The `model`.
    pub model: Option<String>,
    /// `stream: true`.
    pub stream: bool,
    /// `stream_options.include_usage: true`.
    pub include_usage: bool,
    /// The output cap it sets (`max_completion_tokens`, else `max_tokens`, else `max_output_tokens`), if a whole
    /// number.
    pub max_output: Option<u64>,
    /// How many answers it asks for (`n`), if a whole number.
    pub choices: Option<u64>,
}

/// Reads a request body whole, refusing more than `limit` bytes. A body that arrives as one frame (nearly every
/// small one) is returned as it is, without a copy.
pub async fn read<B>(body: B, limit: u64) -> Result<Bytes, GatewayError>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<axum::BoxError>,
{
    let mut body = Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX));
    let mut first = Bytes::new();
    let mut joined: Option<BytesMut> = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| match e.is::<LengthLimitError>() {
            true => GatewayError::RequestTooLarge(limit),
            false => GatewayError::InvalidRequest("the request body could not be read".into()),
        })?;
        // Trailers carry nothing the gateway reads, nor does an empty frame.
        let Some(data) = frame.into_data().ok().filter(|d| !d.is_empty()) else { continue };
        match &mut joined {
            Some(buf) => buf.extend_from_slice(&data),
            None if first.is_empty() => first = data,
            None => {
                let mut buf = BytesMut::with_capacity(first.len() + data.len());
                buf.extend_from_slice(&first);
                buf.extend_from_slice(&data);
                joined = Some(buf);
            }
        }
    }
    Ok(joined.map_or(first, BytesMut::freeze))
}

/// Whether a JSON body can ask for a stream at all: without the bytes `"stream"`, and without a `\u` escape
/// that could spell the key another way, it cannot, and need not be parsed to find out.
pub fn may_stream(bytes: &[u8]) -> bool {
    let n = &*NEEDLES;
    n.stream.find(bytes).is_some() || n.escape.find(bytes).is_some()
}

/// The byte strings looked for in request bodies, each with its searcher built once (building one costs more
/// than searching a small body).
struct Needles {
    stream: Finder<'static>,
    stream_options: Finder<'static>,
    escape: Finder<'static>,
}

static NEEDLES: LazyLock<Needles> = LazyLock::new(|| Needles {
    stream: Finder::new(b"\"stream\""),
    stream_options: Finder::new(b"\"stream_options\""),
    escape: Finder::new(b"\\u"),
});

/// The [`Facts`] of a JSON object body. Only those fields are materialised; a body that is not one JSON
/// object, or that names a field twice (which a parser upstream might read the other way), is refused.
pub fn facts_of(bytes: &[u8]) -> Result<Facts, GatewayError> {
    #[derive(serde::Deserialize)]
    struct Raw {
        model: Option<String>,
        stream: Option<bool>,
        stream_options: Option<StreamOptions>,
        // Any JSON value: a cap the gateway cannot read is upstream's to refuse, not the gateway's.
        max_completion_tokens: Option<serde_json::Value>,
        max_tokens: Option<serde_json::Value>,
        max_output_tokens: Option<serde_json::Value>,
        n: Option<serde_json::Value>,
    }
    #[derive(serde::Deserialize)]
    struct StreamOptions {
        include_usage: Option<bool>,
    }
    // serde reads a struct from an array too (`["m",true,null]`); a request body must be an object.
    if bytes.trim_ascii_start().first() != Some(&b'{') {
        return Err(GatewayError::InvalidRequest("request body must be a JSON object".into()));
    }
    serde_json::from_slice::<Raw>(bytes)
        .map(|r| Facts {
            model: r.model,
            stream: r.stream == Some(true),
            include_usage: r.stream_options.and_then(|o| o.include_usage) == Some(true),
            // The largest of the caps it sets, whichever its dialect reads: upstream may read any of them.
            max_output: [r.max_completion_tokens, r.max_tokens, r.max_output_tokens]
                .iter()
                .filter_map(|v| v.as_ref().and_then(whole_number))
                .max(),
            choices: r.n.as_ref().and_then(whole_number),
        })
        .map_err(|e| GatewayError::InvalidRequest(format!("request body is not valid JSON: {e}")))
}

/// A JSON number that is a whole number of 0 or more (`100`, `1e5`), as a cap or a count may be written.
fn whole_number(value: &serde_json::Value) -> Option<u64> {
    value
        .as_u64()
        .or_else(|| value.as_f64().filter(|f| f.fract() == 0.0 && *f >= 0.0).map(|f| f.min(u64::MAX as f64) as u64))
}

/// A chat request body with `stream_options.include_usage: true`, so the stream reports its usage. When the
/// body has no `stream_options` the member is spliced in after the opening brace and every other byte is
/// kept; otherwise the object is rewritten.
pub fn with_include_usage(body: &[u8]) -> Result<Bytes, GatewayError> {
    const MEMBER: &[u8] = br#""stream_options":{"include_usage":true}"#;
    // A body that may already hold the member (or spell a key with escapes) is rewritten, never spliced:
    // a second `stream_options` could be read either way upstream.
    let mentions = NEEDLES.stream_options.find(body).is_some() || NEEDLES.escape.find(body).is_some();
    let open = body.iter().position(|b| !b.is_ascii_whitespace()).filter(|i| body[*i] == b'{');
    if let (false, Some(open)) = (mentions, open) {
        let empty = body[open + 1..].iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'}');
        let mut out = Vec::with_capacity(body.len() + MEMBER.len() + 1);
        out.extend_from_slice(&body[..=open]);
        out.extend_from_slice(MEMBER);
        if !empty {
            out.push(b',');
        }
        out.extend_from_slice(&body[open + 1..]);
        return Ok(Bytes::from(out));
    }
    let mut value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| GatewayError::InvalidRequest(format!("request body is not valid JSON: {e}")))?;
    let object = value
        .as_object_mut()
        .ok_or_else(|| GatewayError::InvalidRequest("request body must be a JSON object".into()))?;
    let options = object.entry("stream_options").or_insert_with(|| serde_json::json!({}));
    if !options.is_object() {
        *options = serde_json::json!({});
    }
    options["include_usage"] = serde_json::Value::Bool(true);
    serde_json::to_vec(&value).map(Bytes::from).map_err(|e| GatewayError::InvalidRequest(e.to_string()))
}

pin_project_lite::pin_project! {
    /// An upstream response body on its way to the caller. Owns the request's [`InFlight`] record, which ends
    /// when the body does or is dropped (the caller went away), and feeds each chunk to its usage tap on the way
    /// through.
    pub struct Observed<B> {
        #[pin]
        inner: B,
        // The idle timer is made only when the body first has to wait (most JSON bodies never do), and then
        // moved only when it fires: resetting a tokio timer on every frame wakes the timer driver with a
        // system call each time.
        idle: Option<Pin<Box<Sleep>>>,
        last_frame: Instant,
        idle_timeout: Duration,
        record: InFlight,
        done: bool,
        // Upstream's body failed: the record is told at once, but hyper gets the error only on the next poll.
        // hyper drops the connection on a body's error without flushing its write buffer, so an error returned
        // at once, right behind the first bytes, would lose the head and the frames still buffered. Instead this
        // poll wakes the task and returns `Pending`, on which hyper flushes what it holds before polling again
        // (in the same turn or the next) and getting the error. Only what the caller's socket takes in that
        // flush is saved: from a caller that is not reading, the rest is lost all the same.
        failed: Option<axum::BoxError>,
    }
}

/// `from + timeout`, or thirty years on for a timeout too large to add (a configured "never").
fn after(from: Instant, timeout: Duration) -> Instant {
    from.checked_add(timeout).unwrap_or_else(|| from + Duration::from_secs(30 * 365 * 86_400))
}

impl<B> Observed<B> {
    /// Wraps `inner`; silence longer than `idle_timeout` ends the body with an error.
    pub fn new(inner: B, idle_timeout: Duration, record: InFlight) -> Self {
        Self { inner, idle: None, last_frame: Instant::now(), idle_timeout, record, done: false, failed: None }
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
        if let Some(e) = this.failed.take() {
            *this.done = true;
            return Poll::Ready(Some(Err(e)));
        }
        if *this.done {
            return Poll::Ready(None);
        }
        loop {
            return match this.inner.as_mut().poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    if this.idle.is_some() {
                        *this.last_frame = Instant::now();
                    }
                    // A body of known length is done after its last frame; hyper will not poll again for `None`.
                    let mut ended = this.inner.is_end_stream();
                    let frame = match frame.into_data() {
                        Ok(mut data) => {
                            if let Some(tap) = &mut this.record.tap {
                                data = tap.on_chunk(data);
                                // Past the protocol's end marker, a stream upstream holds open is over.
                                ended |= tap.stream_over();
                                if ended {
                                    let rest = tap.finish();
                                    if !rest.is_empty() {
                                        data = [data, rest].concat().into();
                                    }
                                }
                            }
                            if data.is_empty() {
                                // Everything in this chunk was held back or hidden: nothing to send yet.
                                if !ended {
                                    continue;
                                }
                                *this.done = true;
                                this.record.body_ended();
                                return Poll::Ready(None);
                            }
                            this.record.first_byte();
                            Frame::data(data)
                        }
                        Err(trailers) => {
                            // Trailers end the body: the tap reads what it held back, which goes out instead
                            // of them. (Callers never get upstream's trailers anyway: `Trailer` is dropped as
                            // hop-by-hop, and hyper sends only the trailer fields a response declares there.)
                            let rest = this.record.tap.as_mut().map(UsageTap::finish).unwrap_or_default();
                            *this.done = true;
                            this.record.body_ended();
                            let frame = if rest.is_empty() { trailers } else { Frame::data(rest) };
                            return Poll::Ready(Some(Ok(frame)));
                        }
                    };
                    if ended {
                        *this.done = true;
                        this.record.body_ended();
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                Poll::Ready(Some(Err(e))) => {
                    let e = e.into();
                    this.record.stream_error(&*e);
                    *this.failed = Some(e);
                    cx.waker().wake_by_ref();
                    Poll::Pending
                }
                Poll::Ready(None) => {
                    *this.done = true;
                    let rest = this.record.tap.as_mut().map(UsageTap::finish).unwrap_or_default();
                    this.record.body_ended();
                    Poll::Ready((!rest.is_empty()).then(|| Ok(Frame::data(rest))))
                }
                Poll::Pending => {
                    let idle = this.idle.get_or_insert_with(|| {
                        // Frames that arrived without a wait need no timer: the silence starts now.
                        *this.last_frame = Instant::now();
                        Box::pin(tokio::time::sleep_until(after(*this.last_frame, *this.idle_timeout)))
                    });
                    loop {
                        ready!(idle.as_mut().poll(cx));
                        let deadline = after(*this.last_frame, *this.idle_timeout);
                        if Instant::now() >= deadline {
                            break;
                        }
                        // Frames came after the timer was set: the silence began at the last of them.
                        idle.as_mut().reset(deadline);
                    }
                    let e = IdleTimeout(*this.idle_timeout);
                    this.record.stream_error(&e);
                    *this.done = true;
                    Poll::Ready(Some(Err(e.into())))
                }
            };
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        match &self.record.tap {
            Some(tap) if tap.rewrites() => SizeHint::default(),
            _ => self.inner.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use axum::body::Body;

    use super::*;

    fn model_of(bytes: &[u8]) -> Result<Option<String>, GatewayError> {
        facts_of(bytes).map(|f| f.model)
    }

    #[test]
    fn model_is_read_strictly() {
        assert_eq!(model_of(br#"{"model":"m","messages":[{"model":"x"}]}"#), Ok(Some("m".into())));
        assert_eq!(model_of(br#"{"messages":[]}"#), Ok(None));
        for bad in [
            &br#"{"model":"a","model":"b"}"#[..],
            b"[]",
            br#"["openai.gpt-oss-20b",true,null]"#,
            b"{",
            b"",
            br#"{"model":1}"#,
            b"{} {}",
        ] {
            assert!(
                matches!(model_of(bad), Err(GatewayError::InvalidRequest(_))),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn stream_facts() {
        let f = facts_of(br#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#).expect("facts");
        assert_eq!(f, Facts { model: Some("m".into()), stream: true, include_usage: true, ..Facts::default() });
        let f = facts_of(br#"{"max_tokens":7,"max_completion_tokens":5,"n":3}"#).expect("facts");
        assert_eq!((f.max_output, f.choices), (Some(7), Some(3)));
        let f = facts_of(br#"{"max_output_tokens":1e5,"max_completion_tokens":1}"#).expect("facts");
        assert_eq!(f.max_output, Some(100_000));
        // A cap the gateway cannot read is no cap to it (upstream refuses it or not), never a refusal here.
        let f = facts_of(br#"{"max_output_tokens":"many","max_tokens":null,"n":-1}"#).expect("facts");
        assert_eq!((f.max_output, f.choices), (None, None));
        let f = facts_of(br#"{"model":"m","stream":false,"stream_options":null}"#).expect("facts");
        assert!(!f.stream && !f.include_usage);
    }

    #[test]
    fn include_usage_is_added_keeping_the_body() {
        let body = br#" {"model":"m","stream":true}"#;
        let expected = br#" {"stream_options":{"include_usage":true},"model":"m","stream":true}"#;
        assert_eq!(&with_include_usage(body).expect("rewrite")[..], expected);
        assert_eq!(&with_include_usage(b"{ }").expect("rewrite")[..], br#"{"stream_options":{"include_usage":true} }"#);
        let body = br#"{"model":"m","stream":true,"stream_options":{"include_usage":false,"x":1}}"#;
        let v: serde_json::Value = serde_json::from_slice(&with_include_usage(body).expect("rewrite")).expect("json");
        assert_eq!(v["stream_options"], serde_json::json!({"include_usage": true, "x": 1}));
        assert_eq!(v["model"], "m");
        let body = br#"{"model":"m","stream_options":null}"#;
        let v: serde_json::Value = serde_json::from_slice(&with_include_usage(body).expect("rewrite")).expect("json");
        assert_eq!(v["stream_options"], serde_json::json!({"include_usage": true}));
        assert!(matches!(with_include_usage(br#"["stream",true,null]"#), Err(GatewayError::InvalidRequest(_))));
        let body = br#"{"model":"m","stream":true,"\u0073tream_options":{"include_usage":false}}"#;
        let v: serde_json::Value = serde_json::from_slice(&with_include_usage(body).expect("rewrite")).expect("json");
        assert_eq!(v["stream_options"], serde_json::json!({"include_usage": true}));
        assert_eq!(v.as_object().map(|o| o.len()), Some(3), "one stream_options member, not two: {v}");
    }

    #[tokio::test]
    async fn reading_respects_the_cap() {
        let body = Body::from(r#"{"model":"m"}"#);
        assert_eq!(read(body, 13).await.map(|b| b.len()), Ok(13));
        let body = Body::from(r#"{"model":"m"}"#);
        assert_eq!(read(body, 12).await, Err(GatewayError::RequestTooLarge(12)));
    }

    /// A body sent as these frames.
    fn framed(frames: Vec<Frame<Bytes>>) -> Body {
        let frames = futures_util::stream::iter(frames.into_iter().map(Ok::<_, std::convert::Infallible>));
        Body::new(http_body_util::StreamBody::new(frames))
    }

    #[tokio::test]
    async fn a_body_in_many_frames_is_read_whole_and_in_order() {
        let data = |s: &'static str| Frame::data(Bytes::from_static(s.as_bytes()));
        let frames = || {
            vec![
                data(""),
                data(r#"{"model""#),
                data(""),
                data(r#":"m","#),
                data(r#""n":1}"#),
                data(""),
                Frame::trailers(HeaderMap::new()),
            ]
        };
        assert_eq!(read(framed(frames()), 1024).await, Ok(Bytes::from_static(br#"{"model":"m","n":1}"#)));
        // The cap counts every frame, not only the first.
        assert_eq!(read(framed(frames()), 18).await, Err(GatewayError::RequestTooLarge(18)));
        assert_eq!(read(framed(vec![data("{}")]), 2).await, Ok(Bytes::from_static(b"{}")));
        assert_eq!(read(framed(vec![]), 2).await, Ok(Bytes::new()));
    }

    #[test]
    fn stream_screen() {
        assert!(may_stream(br#"{"model":"m","stream":true}"#));
        assert!(may_stream(br#"{"model":"m", "stream" : false}"#));
        assert!(!may_stream(br#"{"model":"m","messages":[{"content":"streaming"}]}"#));
        assert!(may_stream(br#"{"model":"m","\u0073tream":true}"#));
    }

    #[test]
    fn declared_length_is_checked() {
        let mut h = HeaderMap::new();
        h.insert("content-length", http::HeaderValue::from_static("11"));
        assert_eq!(check_declared_length(&h, 10), Err(GatewayError::RequestTooLarge(10)));
        assert_eq!(check_declared_length(&h, 11), Ok(()));
    }
}
