//! Hostile callers against the real binary and a recording raw upstream: request smuggling and framing, header
//! and path spellings, heads and bodies at the documented limits, and slow clients. Each case checks what the
//! caller got and what reached upstream (nothing, for refusals); each test, that the gateway wrote one access line
//! per request it saw as a request (none for a head hyper refused before the gateway saw it), a ledger line only
//! for what upstream answered, that upstream never received a request the gateway did not log or any caller's
//! key, and that the gateway's descriptors are back to their baseline.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::binary::*;
use common::raw_upstream::{Act, Conn, RawUpstream, Then, header, ok_json, sse};
use common::*;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Short timeouts, so that a slow client is dealt with in a fraction of a second.
const SERVER: &str = "header_read_timeout = \"300ms\"\nsend_timeout = \"300ms\"";
const UPSTREAM: &str = "response_timeout = \"300ms\"\nidle_timeout = \"300ms\"";
/// `server.max_body_bytes` in the test config.
const MAX_BODY: usize = 4096;

/// How the gateway dealt with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Forwarded, and upstream's 200 came back.
    Forwarded,
    /// Refused by the gateway itself, with this status and code: an access line, nothing upstream.
    Refused(u16, &'static str),
    /// Refused by hyper before the gateway saw a request (README: "a request head that cannot be parsed as
    /// HTTP"): this status, an empty body, no `x-request-id`, no access line, nothing upstream.
    Unparsed(u16),
    /// Never seen as a request at all (bytes after a message whose connection is closed): no access line,
    /// nothing upstream.
    Unseen,
}
use Outcome::*;

/// The binary in front of a raw upstream that answers every request with a small JSON body (and, asked with
/// `x-fault: flood`, with an event stream that never ends), after one whole exchange, with its descriptor count.
struct Rig {
    upstream: Arc<RawUpstream>,
    gw: Watched,
    ledger: PathBuf,
    fds: usize,
    /// Each request sent, by id, and how it was dealt with.
    sent: Mutex<Vec<(String, Outcome)>>,
}

async fn rig(name: &str) -> Rig {
    let upstream = RawUpstream::start(|head| match header(head, "x-fault") {
        Some("flood") => Act::new(sse(&[]), Then::Flood),
        _ => ok_json(r#"{"object":"list","data":[]}"#),
    })
    .await;
    let opts = Opts { server: SERVER, upstream: UPSTREAM, ..Opts::default() };
    let (gw, ledger) = serve_metered(&format!("hostile-{name}"), upstream.addr, opts).await;
    let rig = Rig { upstream, gw, ledger, fds: 0, sent: Mutex::new(Vec::new()) };
    rig.check("rid-warm", &get("/v1/models", "rid-warm", &key()), Forwarded).await;
    Rig { fds: rig.gw.quiet_fds().await, ..rig }
}

/// The chat key's `authorization` line.
fn key() -> String {
    format!("authorization: Bearer {CHAT_KEY}\r\n")
}

/// A request: `line` (method and target), then `host`, `x-request-id`, `headers` (whole lines), `connection:
/// close`, and `body` after the blank line.
fn request(line: &str, id: &str, headers: &str, body: &str) -> Vec<u8> {
    format!("{line} HTTP/1.1\r\nhost: gw\r\nx-request-id: {id}\r\n{headers}connection: close\r\n\r\n{body}")
        .into_bytes()
}

fn get(path: &str, id: &str, headers: &str) -> Vec<u8> {
    request(&format!("GET {path}"), id, headers, "")
}

impl Rig {
    /// Sends `bytes` (request `id`) on a connection of its own and checks the caller's answer against `outcome`,
    /// and, for a forwarded request, that upstream got it as the gateway's; returns the answer, and the upstream
    /// connection that carried it.
    async fn check(&self, id: &str, bytes: &[u8], outcome: Outcome) -> (Answer, Option<Conn>) {
        let answer = exchange(&self.gw.addr, bytes).await;
        self.sent.lock().unwrap().push((id.to_owned(), outcome));
        let text = String::from_utf8_lossy(bytes);
        match outcome {
            Forwarded => {
                assert_eq!(answer.status, 200, "{text}\n{answer:?}");
                assert_eq!(answer.header("x-request-id"), Some(id), "{answer:?}");
                let conn = self.upstream.request(id).await;
                let head = conn.request(id).unwrap();
                assert_eq!(header(head, "authorization"), Some(format!("Bearer {UPSTREAM_KEY}").as_str()), "{head}");
                return (answer, Some(conn));
            }
            Refused(status, code) => {
                assert_eq!((answer.status, answer.error_code().as_str()), (status, code), "{text}\n{answer:?}");
                assert_eq!(answer.header("x-request-id"), Some(id), "{answer:?}");
            }
            Unparsed(status) => {
                assert_eq!(answer.status, status, "{text}\n{answer:?}");
                assert!(answer.body.is_empty() && answer.header("x-request-id").is_none(), "{answer:?}");
            }
            Unseen => unreachable!("a request of its own is seen"),
        }
        assert!(!self.upstream.conns().iter().any(|c| c.carries(id)), "{text}: reached upstream");
        (answer, None)
    }

    /// Records request `id` (sent by the test itself) as dealt with by `outcome`.
    fn sent(&self, id: &str, outcome: Outcome) {
        self.sent.lock().unwrap().push((id.to_owned(), outcome));
    }

    /// Waits for the descriptors to be back to the baseline, stops the gateway, and checks its records against
    /// what was sent; returns the log.
    async fn finish(self) -> Vec<Value> {
        self.gw.back_to(self.fds).await;
        let log = self.gw.stop().await;
        let ledger = read_ledger(&self.ledger);
        let sent = self.sent.into_inner().unwrap();
        for (id, outcome) in &sent {
            let lines = access_lines(&log, id);
            let billed = ledger.iter().filter(|l| l["request_id"] == id.as_str()).count();
            match outcome {
                Unparsed(_) | Unseen => assert!(lines.is_empty(), "{id}: the gateway never saw it, yet {lines:#?}"),
                _ => assert_eq!(lines.len(), 1, "{id}: one access line: {lines:#?}"),
            }
            if let Refused(status, code) = outcome {
                assert_eq!(
                    (lines[0]["status"].as_u64(), lines[0]["error"].as_str()),
                    (Some((*status).into()), Some(*code))
                );
            }
            assert_eq!(billed, usize::from(*outcome == Forwarded), "{id}: ledger lines");
        }
        // Upstream received nothing the gateway did not log as answered, and no caller's key.
        for conn in self.upstream.conns() {
            for head in &conn.requests {
                let id = header(head, "x-request-id").unwrap();
                let lines = access_lines(&log, id);
                assert!(lines.len() == 1 && lines[0]["status"] != 404, "upstream got {head}, logged as {lines:#?}");
            }
            let received = String::from_utf8_lossy(&conn.received);
            for key in [CHAT_KEY, SEARCH_KEY, FLOATING_KEY] {
                assert!(!received.contains(key), "a caller's key reached upstream: {received}");
            }
        }
        assert_eq!(ledger.len(), sent.iter().filter(|(_, o)| *o == Forwarded).count(), "{ledger:#?}");
        log
    }
}

/// The body upstream received for the request on `conn` (the whole of what followed its head).
fn body_upstream(conn: &Conn) -> String {
    let received = String::from_utf8_lossy(&conn.received).into_owned();
    received.split_once("\r\n\r\n").unwrap().1.to_owned()
}

#[tokio::test]
async fn conflicting_and_malformed_framing_is_refused_or_read_one_way_and_never_smuggles_a_request() {
    let rig = rig("framing").await;
    let k = key();
    let post = |id: &str, framing: &str, rest: &str| {
        let mut bytes = request("POST /v1/responses", id, &format!("{k}{framing}"), "");
        bytes.extend_from_slice(rest.as_bytes());
        bytes
    };
    // A request hidden after a chunked body that a Content-Length reader would count differently: it must
    // neither reach upstream nor be served (the connection is closed after a message with both headers).
    let smuggled = format!("GET /v1/models HTTP/1.1\r\nhost: gw\r\n{k}x-request-id: rid-smuggled\r\n\r\n");
    let chunked_hello = "5\r\nhello\r\n0\r\n\r\n";
    for (id, framing) in [
        ("rid-cl-te", "content-length: 4\r\ntransfer-encoding: chunked\r\n"),
        ("rid-te-cl", "transfer-encoding: chunked\r\ncontent-length: 40\r\n"),
        // Empty list elements are no coding.
        ("rid-te-empty", "transfer-encoding: , chunked\r\n"),
    ] {
        let (_, conn) = rig.check(id, &post(id, framing, &format!("{chunked_hello}{smuggled}")), Forwarded).await;
        let conn = conn.unwrap();
        let head = conn.request(id).unwrap();
        assert_eq!(header(head, "content-length"), None, "{head}");
        assert_eq!((conn.requests.len(), body_upstream(&conn)), (1, chunked_hello.to_owned()), "{head}");
    }
    rig.sent("rid-smuggled", Unseen);
    // Chunked applied twice, in one field line or two, is malformed: refused, never read one way or the other.
    for (id, framing) in [
        ("rid-te-te", "transfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n"),
        ("rid-te-list", "transfer-encoding: chunked, chunked\r\n"),
        ("rid-te-list-empty", "transfer-encoding: chunked, , chunked\r\n"),
    ] {
        rig.check(id, &post(id, framing, chunked_hello), Refused(400, "invalid_request")).await;
    }

    let cases: &[(&str, &str, &str, Outcome)] = &[
        ("rid-two-lengths", "content-length: 5\r\ncontent-length: 6\r\n", "hello!", Unparsed(400)),
        ("rid-length-list", "content-length: 5, 5\r\n", "hello", Unparsed(400)),
        ("rid-length-sign", "content-length: +5\r\n", "hello", Unparsed(400)),
        ("rid-length-hex", "content-length: 0x5\r\n", "hello", Unparsed(400)),
        ("rid-chunked-not-last", "transfer-encoding: chunked, gzip\r\n", chunked_hello, Unparsed(400)),
        ("rid-not-chunked", "transfer-encoding: xchunked\r\n", chunked_hello, Unparsed(400)),
        ("rid-te-space", "transfer-encoding : chunked\r\n", chunked_hello, Unparsed(400)),
        ("rid-obs-fold", "x-folded: a\r\n b\r\ncontent-length: 5\r\n", "hello", Unparsed(400)),
        (
            "rid-obs-fold-project",
            "openai-project: Chat-Dev\r\n Search\r\ncontent-length: 5\r\n",
            "hello",
            Unparsed(400),
        ),
        ("rid-bare-cr", "x-cr: a\rb\r\ncontent-length: 5\r\n", "hello", Unparsed(400)),
        ("rid-nul", "x-nul: a\0b\r\ncontent-length: 5\r\n", "hello", Unparsed(400)),
        ("rid-no-colon", "x-no-colon\r\ncontent-length: 5\r\n", "hello", Unparsed(400)),
        ("rid-same-lengths", "content-length: 5\r\ncontent-length: 5\r\n", "hello", Forwarded),
    ];
    for (id, framing, body, outcome) in cases {
        let (_, conn) = rig.check(id, &post(id, framing, body), *outcome).await;
        if let Some(conn) = conn {
            let head = conn.request(id).unwrap();
            assert_eq!(head.to_ascii_lowercase().matches("content-length: 5\r\n").count(), 1, "{head}");
            assert_eq!(body_upstream(&conn), "hello");
        }
    }

    // HTTP/1.0 has no chunked coding; an unknown version is no HTTP/1.x.
    let http10 = format!(
        "POST /v1/responses HTTP/1.0\r\nhost: gw\r\nx-request-id: rid-http10\r\n{k}transfer-encoding: chunked\r\n\r\n{chunked_hello}"
    );
    rig.check("rid-http10", http10.as_bytes(), Unparsed(400)).await;
    let http12 = format!("GET /v1/models HTTP/1.2\r\nhost: gw\r\nx-request-id: rid-http12\r\n{k}\r\n");
    rig.check("rid-http12", http12.as_bytes(), Unparsed(400)).await;

    // Bare LF line ends are read as line ends (RFC 9112 allows it), and upstream gets CRLF.
    let bare_lf = format!(
        "POST /v1/responses HTTP/1.1\nhost: gw\nx-request-id: rid-bare-lf\nauthorization: Bearer {CHAT_KEY}\n\
         content-length: 5\nconnection: close\n\nhello"
    );
    let (_, conn) = rig.check("rid-bare-lf", bare_lf.as_bytes(), Forwarded).await;
    let received = String::from_utf8_lossy(&conn.unwrap().received).into_owned();
    assert_eq!(received.matches('\n').count(), received.matches("\r\n").count(), "{received:?}");
    rig.finish().await;
}

#[tokio::test]
async fn a_transfer_coding_the_gateway_cannot_decode_is_refused_not_forwarded() {
    let rig = rig("gzip-coding").await;
    let bytes =
        request("POST /v1/responses", "rid-gzip", &format!("{}transfer-encoding: gzip, chunked\r\n", key()), "");
    let bytes = [bytes, b"5\r\nhello\r\n0\r\n\r\n".to_vec()].concat();
    rig.check("rid-gzip", &bytes, Refused(501, "unsupported_transfer_coding")).await;
    rig.finish().await;
}

#[tokio::test]
async fn a_request_without_exactly_one_host_is_refused() {
    let rig = rig("host").await;
    for (id, version, hosts) in [
        ("rid-no-host", "1.1", ""),
        ("rid-two-hosts", "1.1", "host: a\r\nhost: b\r\n"),
        ("rid-two-same-hosts", "1.1", "host: a\r\nhost: a\r\n"),
        // HTTP/1.0 may leave Host out, but not send two.
        ("rid-two-hosts-http10", "1.0", "host: a\r\nhost: b\r\n"),
    ] {
        let bytes =
            format!("GET /v1/models HTTP/{version}\r\n{hosts}x-request-id: {id}\r\n{}connection: close\r\n\r\n", key());
        rig.check(id, bytes.as_bytes(), Refused(400, "invalid_request")).await;
    }
    let http10 = format!("GET /v1/models HTTP/1.0\r\nx-request-id: rid-no-host-http10\r\n{}\r\n", key());
    rig.check("rid-no-host-http10", http10.as_bytes(), Forwarded).await;
    rig.finish().await;
}

#[tokio::test]
async fn a_malformed_chunked_body_is_the_callers_400_and_upstream_never_gets_a_whole_request() {
    let rig = rig("chunks").await;
    // Chat bodies are read whole (the gateway meters chat streams), /v1/responses bodies stream to upstream as
    // they come: there upstream may have got the start of the body, never its end, and the gateway hangs up.
    for (path, streamed) in [("/v1/chat/completions", false), ("/v1/responses", true)] {
        for (case, chunks) in [
            ("letters", "zz\r\nhello\r\n0\r\n\r\n"),
            ("negative", "-1\r\nhello\r\n0\r\n\r\n"),
            ("overflow", "fffffffffffffffff1\r\nhello\r\n0\r\n\r\n"),
            ("hex-prefix", "0x5\r\nhello\r\n0\r\n\r\n"),
            ("shorter-than-said", "5\r\nhel\r\n0\r\n\r\n"),
            ("bare-lf", "5\nhello\n0\n\n"),
        ] {
            let id = format!("rid-{case}-{streamed}");
            let head = request(&format!("POST {path}"), &id, &format!("{}transfer-encoding: chunked\r\n", key()), "");
            let bytes = [head, chunks.as_bytes().to_vec()].concat();
            rig.check(&id, &bytes, Refused(400, "invalid_request")).await;
            if streamed
                && let Some(conn) =
                    rig.upstream.conns().into_iter().find(|c| c.received.windows(id.len()).any(|w| w == id.as_bytes()))
            {
                assert!(
                    conn.requests.is_empty(),
                    "upstream got a whole request: {:?}",
                    String::from_utf8_lossy(&conn.received)
                );
            }
        }
        // A chunk extension is valid, and dropped.
        let id = format!("rid-extension-{streamed}");
        let head = request(&format!("POST {path}"), &id, &format!("{}transfer-encoding: chunked\r\n", key()), "");
        let body = format!("{:x};x=1\r\n{CHAT_BODY}\r\n0\r\n\r\n", CHAT_BODY.len());
        rig.check(&id, &[head, body.into_bytes()].concat(), Forwarded).await;
    }
    rig.finish().await;
}

/// Request headers, as raw bytes (some of them not UTF-8).
fn raw_request(line: &str, id: &[u8], headers: &[u8]) -> Vec<u8> {
    [
        format!("{line} HTTP/1.1\r\nhost: gw\r\nx-request-id: ").as_bytes(),
        id,
        b"\r\n",
        headers,
        b"connection: close\r\n\r\n",
    ]
    .concat()
}

#[tokio::test]
async fn project_and_key_headers_count_however_they_are_spelled_and_upstream_gets_only_the_gateways() {
    let rig = rig("headers").await;
    let chat = key();
    let search = format!("authorization: Bearer {SEARCH_KEY}\r\n");
    // (id, headers, outcome, the project id upstream gets)
    let cases = [
        // Not a project header: read as nothing, and dropped on the way.
        ("rid-underscore", format!("{chat}OpenAI_Project: Chat-Dev\r\n"), Forwarded, "proj_chat"),
        (
            "rid-mixed-case",
            format!("AUTHORIZATION: Bearer {CHAT_KEY}\r\noPeNaI-pRoJeCt: Chat-Dev\r\n"),
            Forwarded,
            "proj_dev",
        ),
        (
            "rid-name-and-id",
            format!("{chat}openai-project: Chat-Dev\r\nopenai-project: proj_dev\r\n"),
            Forwarded,
            "proj_dev",
        ),
        (
            "rid-both-families",
            format!("{chat}anthropic-workspace-id: Chat-Dev\r\nOpenAI-Project: proj_dev\r\n"),
            Forwarded,
            "proj_dev",
        ),
        ("rid-padded", format!("{chat}openai-project:    Chat-Dev   \r\n"), Forwarded, "proj_dev"),
        ("rid-default", format!("{chat}openai-project: DEFAULT\r\n"), Forwarded, "proj_chat"),
        ("rid-empty", format!("{chat}openai-project:\r\n"), Forwarded, "proj_chat"),
        (
            "rid-two-projects",
            format!("{chat}openai-project: Chat-Dev\r\nopenai-project: Chat-Prod\r\n"),
            Refused(400, "invalid_request"),
            "",
        ),
        ("rid-list", format!("{chat}openai-project: Chat-Dev, Chat-Prod\r\n"), Refused(403, "project_not_allowed"), ""),
        (
            "rid-other-family",
            format!("{chat}anthropic-workspace-id: Search\r\n"),
            Refused(403, "project_not_allowed"),
            "",
        ),
        ("rid-x-api-key", format!("X-Api-Key: {CHAT_KEY}\r\n"), Forwarded, "proj_chat"),
        ("rid-same-key-twice", format!("x-api-key: {CHAT_KEY}\r\n{chat}"), Forwarded, "proj_chat"),
        ("rid-two-keys", format!("x-api-key: {CHAT_KEY}\r\n{search}"), Refused(401, "invalid_api_key"), ""),
        ("rid-two-bearers", format!("{chat}{chat}"), Refused(401, "invalid_api_key"), ""),
        ("rid-lowercase-scheme", format!("authorization: bearer {CHAT_KEY}\r\n"), Forwarded, "proj_chat"),
        ("rid-basic", "authorization: Basic Y2FsbGVyOnNlY3JldA==\r\n".to_owned(), Refused(401, "invalid_api_key"), ""),
        ("rid-underscore-key", format!("x_api_key: {CHAT_KEY}\r\n"), Refused(401, "invalid_api_key"), ""),
        (
            "rid-caller-identity",
            format!(
                "{chat}proxy-authorization: Bearer {SEARCH_KEY}\r\nOpenAI-Organization: org-evil\r\n\
                 openai_organization: org-evil\r\nx_api_key: {SEARCH_KEY}\r\nanthropic_workspace_id: Search\r\n"
            ),
            Forwarded,
            "proj_chat",
        ),
        // Names the caller calls hop-by-hop are dropped, and the gateway's own are sent all the same.
        (
            "rid-connection-names",
            format!(
                "{chat}openai-project: Chat-Dev\r\nconnection: authorization, openai-project, x-request-id, host\r\n"
            ),
            Forwarded,
            "proj_dev",
        ),
    ];
    for (id, headers, outcome, project) in cases {
        let (_, conn) = rig.check(id, &get("/v1/models", id, &headers), outcome).await;
        let Some(conn) = conn else { continue };
        let head = conn.request(id).unwrap();
        let lower = head.to_ascii_lowercase();
        assert_eq!(header(head, "openai-project"), Some(project), "{id}: {head}");
        assert_eq!(lower.matches("openai-project:").count(), 1, "{id}: {head}");
        assert_eq!(lower.matches("authorization:").count(), 1, "{id}: {head}");
        assert_eq!(header(head, "host"), Some(rig.upstream.addr.to_string().as_str()), "{id}: {head}");
        for gone in [
            "x-api-key",
            "x_api_key",
            "openai_project",
            "anthropic-workspace-id",
            "anthropic_workspace_id",
            "openai-organization",
            "openai_organization",
            "proxy-authorization",
        ] {
            assert_eq!(header(head, gone), None, "{id}: {gone} reached upstream: {head}");
        }
        assert!(!head.contains("org-evil"), "{id}: {head}");
    }

    // Values that are not UTF-8: a project that names nothing, a key that is none, a request id replaced, and
    // anything else passed on byte for byte.
    let chat = chat.as_bytes();
    rig.check(
        "rid-project-bytes",
        &raw_request("GET /v1/models", b"rid-project-bytes", &[chat, b"openai-project: \xe9\xff\r\n"].concat()),
        Refused(403, "project_not_allowed"),
    )
    .await;
    rig.check(
        "rid-key-bytes",
        &raw_request("GET /v1/models", b"rid-key-bytes", b"authorization: Bearer \xe9\xff\r\n"),
        Refused(401, "invalid_api_key"),
    )
    .await;
    let (_, conn) = rig
        .check(
            "rid-custom-bytes",
            &raw_request("GET /v1/models", b"rid-custom-bytes", &[chat, b"x-custom: caf\xe9\xff\r\n"].concat()),
            Forwarded,
        )
        .await;
    let received = conn.unwrap().received;
    assert!(received.windows(17).any(|w| w == b"x-custom: caf\xe9\xff\r\n"), "{}", String::from_utf8_lossy(&received));
    let answer = exchange(&rig.gw.addr, &raw_request("GET /v1/models", b"rid-\xe9\xff", chat)).await;
    let made = answer.header("x-request-id").unwrap().to_owned();
    assert!(answer.status == 200 && made.len() == 36, "a fresh id: {answer:?}");
    rig.upstream.request(&made).await;
    rig.sent(&made, Forwarded);
    rig.finish().await;
}

#[tokio::test]
async fn the_projects_api_and_every_other_route_is_unreachable_however_it_is_spelled() {
    let rig = rig("paths").await;
    let refused = Refused(404, "unknown_route");
    let lines = [
        ("GET /v1/organization", refused),
        ("GET /v1/organization/", refused),
        ("GET /V1/organization/projects", refused),
        ("GET /v1/ORGANIZATION/projects", refused),
        ("GET /v1/organization/projects?limit=1", refused),
        ("GET /v1/organization/projects#x", refused),
        ("POST /v1/organization/projects/proj_chat", refused),
        ("DELETE /v1/organization/projects/proj_chat", refused),
        // Encoded slashes and letters, dot segments (plain and encoded), parameters, backslashes, odd bytes.
        ("GET /v1/organization%2Fprojects", refused),
        ("GET /v1%2Forganization%2Fprojects", refused),
        ("GET /v1/%6f%72%67anization/projects", refused),
        ("GET /v1/%2e/organization/projects", refused),
        ("GET /v1/organization/./projects", refused),
        ("GET /v1/organization/projects/..", refused),
        ("GET /v1/models/..%2f..%2fv1%2forganization%2fprojects", refused),
        ("GET /v1/models/openai.gpt-oss-120b/../../organization/projects", refused),
        ("GET /v1/models/.../organization", refused),
        ("GET /v1/models/..", refused),
        ("GET /v1/models/a%2Fb", refused),
        ("GET /v1;/organization/projects", refused),
        ("GET /v1/organization;x=1/projects", refused),
        ("GET /v1/models;/../organization", refused),
        ("GET /v1\\organization\\projects", refused),
        ("GET /v1/organization%00/projects", refused),
        ("GET /v1/organization%20/projects", refused),
        ("GET /v1/organizati\u{f3}n/projects", refused),
        ("GET ///v1/organization/projects", refused),
        ("GET /./v1/organization/projects", refused),
        ("GET //evil/v1/organization/projects", refused),
        // Under the other API families and route prefixes.
        ("GET /openai/v1/../v1/organization/projects", refused),
        ("GET /anthropic/v1/organization/projects", refused),
        ("GET /search/openai/v1/organization/projects", refused),
        // Absolute form: the authority is ignored, the path decides.
        ("GET https://bedrock-mantle.us-east-1.api.aws/v1/organization/projects", refused),
        ("GET http://x/v1/models/../organization/projects", refused),
        // Other forms and methods.
        ("OPTIONS *", refused),
        ("CONNECT bedrock-mantle.us-east-1.api.aws:443", refused),
        ("PUT /v1/chat/completions", refused),
        ("PATCH /v1/responses/resp_1", refused),
        ("TRACE /v1/models", refused),
        ("post /v1/chat/completions", refused),
        // Targets that are no URI: hyper refuses them before the gateway sees a request.
        ("GET %2Fv1%2Forganization%2Fprojects", Unparsed(400)),
        ("GET v1/organization/projects", Unparsed(400)),
        ("GET #/v1/organization", Unparsed(400)),
        ("GET http:///v1/models", Unparsed(400)),
        ("GET /v1/mo\tdels", Unparsed(400)),
    ];
    for (i, (line, outcome)) in lines.into_iter().enumerate() {
        let id = format!("rid-path-{i}");
        rig.check(&id, &request(line, &id, &key(), ""), outcome).await;
    }
    // What is forwarded goes in origin form, with its query, without a fragment, to upstream's host.
    for (i, (line, target)) in [
        ("GET http://evil.example/v1/models?after=m", "/v1/models?after=m"),
        ("GET https://user@evil.example:8443/v1/models", "/v1/models"),
        ("GET /v1/models?x=/../organization/projects", "/v1/models?x=/../organization/projects"),
        ("GET /v1/models#/../organization", "/v1/models"),
    ]
    .into_iter()
    .enumerate()
    {
        let id = format!("rid-forwarded-{i}");
        let (_, conn) = rig.check(&id, &request(line, &id, &key(), ""), Forwarded).await;
        let conn = conn.unwrap();
        let head = conn.request(&id).unwrap();
        assert!(head.starts_with(&format!("GET {target} HTTP/1.1\r\n")), "{line}: {head}");
        assert_eq!(header(head, "host"), Some(rig.upstream.addr.to_string().as_str()), "{head}");
    }
    // A long path is refused, and logged cut short.
    let long = format!("/v1/models/{}", "a".repeat(300));
    rig.check("rid-long-path", &get(&long, "rid-long-path", &key()), refused).await;
    let log = rig.finish().await;
    let logged = access_lines(&log, "rid-long-path")[0]["path"].as_str().unwrap().to_owned();
    assert_eq!((logged.chars().count(), &long[..256]), (259, logged.strip_suffix("...").unwrap()));
}

/// A `GET /v1/models` head of exactly `len` bytes (request line to the blank line that ends it), padded by one
/// header; `end` says whether it has that blank line (without it, it is `len` bytes of a head still to come).
fn head_of(len: usize, id: &str, end: bool) -> Vec<u8> {
    let start =
        format!("GET /v1/models HTTP/1.1\r\nhost: gw\r\nx-request-id: {id}\r\n{}connection: close\r\nx-pad: ", key());
    let mut head = format!("{start}{}\r\n\r\n", "a".repeat(len - start.len() - 4));
    if !end {
        head.truncate(len);
        head.replace_range(len - 4.., "aaaa");
    }
    assert_eq!(head.len(), len);
    head.into_bytes()
}

/// A `GET /v1/models` head with exactly `n` header lines.
fn headers_of(n: usize, id: &str) -> Vec<u8> {
    let padding: String = (0..n - 4).map(|i| format!("x-h{i}: v\r\n")).collect();
    let head = get("/v1/models", id, &format!("{}{padding}", key()));
    assert_eq!(String::from_utf8_lossy(&head).matches("\r\n").count(), n + 2);
    head
}

/// README: "A request head larger than that [the 64 KiB connection buffer] is refused with 431 before anything is
/// sent upstream", and more than 100 headers are refused.
const HEAD_LIMIT: usize = 64 * 1024;

#[tokio::test]
async fn request_heads_are_served_up_to_the_documented_limits() {
    let rig = rig("head-limits").await;
    rig.check("rid-head-64k", &head_of(HEAD_LIMIT, "rid-head-64k", true), Forwarded).await;
    // A head still incomplete when the buffer is full is refused at once; one byte short of it, the gateway
    // waits for the rest, until the head timeout closes the connection without an answer.
    rig.check("rid-open-64k", &head_of(HEAD_LIMIT, "rid-open-64k", false), Unparsed(431)).await;
    let started = Instant::now();
    let answer = exchange(&rig.gw.addr, &head_of(HEAD_LIMIT - 1, "rid-open-64k-1", false)).await;
    assert!(answer.status == 0 && started.elapsed() >= Duration::from_millis(300), "{answer:?}");
    rig.sent("rid-open-64k-1", Unseen);
    rig.check("rid-100-headers", &headers_of(100, "rid-100-headers"), Forwarded).await;
    rig.check("rid-101-headers", &headers_of(101, "rid-101-headers"), Unparsed(431)).await;
    rig.finish().await;
}

#[tokio::test]
async fn a_request_head_one_byte_over_64_kib_is_refused_with_431() {
    let rig = rig("head-over").await;
    rig.check("rid-head-64k+1", &head_of(HEAD_LIMIT + 1, "rid-head-64k+1", true), Unparsed(431)).await;
    rig.check("rid-head-112k", &head_of(112 * 1024, "rid-head-112k", true), Unparsed(431)).await;
    rig.finish().await;
}

/// A chat body (read whole by the gateway, for metering) of exactly `len` bytes.
fn chat_body(len: usize) -> String {
    let start = r#"{"model":"openai.gpt-oss-120b","messages":[],"user":""#;
    format!("{start}{}\"}}", "u".repeat(len - start.len() - 2))
}

/// `body` as chunks of at most 1000 bytes.
fn chunked(body: &str) -> String {
    let mut out: String =
        body.as_bytes().chunks(1000).map(|c| format!("{:x}\r\n{}\r\n", c.len(), String::from_utf8_lossy(c))).collect();
    out.push_str("0\r\n\r\n");
    out
}

#[tokio::test]
async fn request_bodies_are_served_up_to_max_body_bytes_and_refused_past_it() {
    let rig = rig("body-limits").await;
    let too_large = Refused(413, "request_too_large");
    // Chat bodies are read whole, /v1/responses bodies stream to upstream.
    for path in ["/v1/chat/completions", "/v1/responses"] {
        let line = format!("POST {path}");
        for (len, framing) in
            [(MAX_BODY, "sized"), (MAX_BODY + 1, "sized"), (MAX_BODY, "chunked"), (MAX_BODY + 1, "chunked")]
        {
            let id = format!("rid-{path}-{len}-{framing}");
            let body = chat_body(len);
            let bytes = match framing {
                "sized" => request(&line, &id, &format!("{}content-length: {len}\r\n", key()), &body),
                _ => request(&line, &id, &format!("{}transfer-encoding: chunked\r\n", key()), &chunked(&body)),
            };
            let streamed = path == "/v1/responses" && framing == "chunked";
            if len > MAX_BODY && streamed {
                // Streamed until the cap: upstream may have got the start of it, never the whole.
                rig.check(&id, &bytes, too_large).await;
                for conn in rig.upstream.conns() {
                    assert!(!conn.requests.iter().any(|h| h.contains(&id)), "{id} reached upstream whole");
                }
                continue;
            }
            let (_, conn) = rig.check(&id, &bytes, if len > MAX_BODY { too_large } else { Forwarded }).await;
            if let Some(conn) = conn {
                let upstream_body = body_upstream(&conn);
                let upstream_body =
                    if upstream_body.ends_with("0\r\n\r\n") { chunked_body(&upstream_body) } else { upstream_body };
                assert_eq!(upstream_body, body, "{id}: the body, byte for byte");
            }
        }
    }
    rig.finish().await;
}

/// The data of a chunked body.
fn chunked_body(mut rest: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n").unwrap();
        let size = usize::from_str_radix(size, 16).unwrap();
        if size == 0 {
            return out;
        }
        out.push_str(&after[..size]);
        rest = &after[size + 2..];
    }
}

#[tokio::test]
async fn a_head_trickled_past_the_head_timeout_is_cut_and_never_seen_as_a_request() {
    let rig = rig("trickled-head").await;
    let head = get("/v1/models", "rid-trickled", &key());
    let mut tcp = tokio::net::TcpStream::connect(&rig.gw.addr).await.unwrap();
    let started = Instant::now();
    // A byte every 20 ms: the whole head would take some seconds, each byte well inside the timeout.
    let (mut read, mut write) = tcp.split();
    let trickle = async {
        for byte in &head {
            if write.write_all(&[*byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let mut got = Vec::new();
    let closed = async { while read.read_buf(&mut got).await.is_ok_and(|n| n > 0) {} };
    tokio::select! {
        () = closed => {}
        () = trickle => panic!("the whole head went through"),
    }
    assert!(started.elapsed() < Duration::from_millis(20 * head.len() as u64));
    // Closed without an answer (hyper sends no 408).
    assert!(got.is_empty(), "{}", String::from_utf8_lossy(&got));
    rig.sent("rid-trickled", Unseen);
    rig.finish().await;
}

#[tokio::test]
async fn a_body_trickled_to_upstream_past_the_response_timeout_is_a_504() {
    let rig = rig("trickled-body").await;
    let head = request("POST /v1/responses", "rid-trickled", &format!("{}content-length: 1000\r\n", key()), "");
    let mut tcp = tokio::net::TcpStream::connect(&rig.gw.addr).await.unwrap();
    tcp.write_all(&head).await.unwrap();
    let (mut read, mut write) = tcp.split();
    let trickle = async {
        loop {
            if write.write_all(b" ").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let mut got = Vec::new();
    let answer = async {
        while !got.windows(16).any(|w| w == b"upstream_timeout") {
            assert!(read.read_buf(&mut got).await.unwrap() > 0, "closed without an answer");
        }
    };
    tokio::select! {
        () = answer => {}
        () = trickle => unreachable!(),
    }
    assert!(got.starts_with(b"HTTP/1.1 504 "), "{}", String::from_utf8_lossy(&got));
    drop(tcp);
    // Upstream had the head and the start of the body, never the whole, and was hung up on.
    let conn = rig
        .upstream
        .conns()
        .into_iter()
        .find(|c| String::from_utf8_lossy(&c.received).contains("rid-trickled"))
        .unwrap();
    assert!(conn.requests.is_empty() && conn.received.ends_with(b" "), "{conn:?}");
    eventually("the gateway never hung up on upstream", || {
        rig.upstream
            .conns()
            .iter()
            .any(|c| c.hung_up && String::from_utf8_lossy(&c.received).contains("rid-trickled"))
            .then_some(())
    })
    .await;
    rig.sent("rid-trickled", Refused(504, "upstream_timeout"));
    rig.finish().await;
}

#[tokio::test]
async fn a_caller_that_stops_reading_is_cut_after_the_send_timeout_and_upstream_with_it() {
    let rig = rig("slow-reader").await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut tcp = socket.connect(rig.gw.addr.parse().unwrap()).await.unwrap();
    tcp.write_all(&get("/v1/models", "rid-stalled", &format!("{}x-fault: flood\r\n", key()))).await.unwrap();
    let got = read_until(&mut tcp, Vec::new(), b"data: x").await;
    assert!(got.starts_with(b"HTTP/1.1 200 "));
    // The caller reads nothing more; upstream goes on sending until every buffer between them is full, and the
    // gateway gives up on the caller, and on upstream with it.
    let conn = rig.upstream.hung_up("rid-stalled").await;
    assert_eq!(conn.requests.len(), 1);
    let line = rig.gw.access_line("rid-stalled").await;
    assert_eq!((line["status"].as_u64(), line["complete"].as_bool()), (Some(200), Some(false)), "{line}");
    drop(tcp);
    rig.sent("rid-stalled", Forwarded);
    let log = rig.finish().await;
    assert!(log.iter().any(|l| l["message"] == "caller connection closed: the caller stopped reading"), "{log:#?}");
}
