//! Fault injection: the real binary in front of a raw-socket upstream that misbehaves on cue (refuses, resets
//! mid-head, mid-body and mid-stream, hangs, answers garbage, ends a stream without its end marker or holds it
//! open, sends a huge head). For each fault: what the caller got, what reached upstream, exactly one access line
//! and (only for what upstream answered) one ledger line, and the gateway's descriptors and memory back to
//! their baseline afterwards.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use common::binary::*;
use common::raw_upstream::{Act, RawUpstream, Then, head_of, header, ok_json, sse};
use common::*;
use serde_json::Value;
use tokio::io::AsyncWriteExt;

/// Short timeouts, so that each fault that waits for one is over in a fraction of a second.
const SERVER: &str = "header_read_timeout = \"300ms\"\nsend_timeout = \"300ms\"";
const UPSTREAM: &str = "response_timeout = \"300ms\"\nidle_timeout = \"300ms\"";

const USAGE: &str = r#"{"prompt_tokens":1000,"completion_tokens":500,"total_tokens":1500}"#;
const STREAM_BODY: &str = r#"{"model":"openai.gpt-oss-120b","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"hi"}]}"#;

/// A chat stream's first events: some content, then its usage; never its `[DONE]`.
fn events() -> Vec<String> {
    vec![
        "data: {\"model\":\"openai.gpt-oss-120b\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n".to_owned(),
        format!("data: {{\"model\":\"openai.gpt-oss-120b\",\"choices\":[],\"usage\":{USAGE}}}\n\n"),
    ]
}

/// A JSON head that promises 1000 bytes, and the first of them.
const PARTIAL_BODY: &str =
    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{\"id\":\"c\",";

/// The upstream's script: the request's `x-fault` header (passed on by the gateway like any other) names the
/// fault; without one, a whole chat completion.
fn script(head: &str) -> Act {
    let fault = header(head, "x-fault").unwrap_or_default();
    // `head-N`: a response head of N bytes, and then a close (a whole response is kept alive otherwise).
    if let Some(len) = fault.strip_prefix("head-") {
        return Act::new(head_of(len.parse().unwrap()), Then::Close);
    }
    match fault {
        "close-silently" => Act::new("", Then::Close),
        "reset-mid-head" => Act::new("HTTP/1.1 200 OK\r\ncontent-type: appli", Then::Reset),
        "hang" => Act::new("", Then::Hold),
        "garbage" => Act::new(&b"\x00\x01\x02\x03 this is not HTTP \xff\xfe\r\n\r\n"[..], Then::Hold),
        "bad-status" => Act::new("HTTP/1.1 2OO OK\r\ncontent-length: 0\r\n\r\n", Then::Hold),
        // Held until the test resets it, once the caller has what came before.
        "body-then-reset" => Act::new(PARTIAL_BODY, Then::Hold),
        "stream-then-reset" => Act::new(sse(&events()), Then::Hold),
        // The reset right behind the bytes.
        "body-and-reset" => Act::new(PARTIAL_BODY, Then::Reset),
        "stream-and-reset" => Act::new(sse(&events()), Then::Reset),
        "stream-closed" => Act::new(sse(&events()), Then::Close),
        "stream-held" => Act::new(sse(&events()), Then::Hold),
        _ => ok_json(&format!(
            r#"{{"object":"chat.completion","model":"openai.gpt-oss-120b","choices":[],"usage":{USAGE}}}"#
        )),
    }
}

/// The binary in front of a scripted raw upstream, with a ledger, after one whole exchange (so everything made
/// on first use exists), and its descriptor count then, with no connection open.
struct Rig {
    upstream: Arc<RawUpstream>,
    gw: Watched,
    ledger: PathBuf,
    fds: usize,
}

async fn rig(name: &str) -> Rig {
    let upstream = RawUpstream::start(script).await;
    rig_in_front_of(name, upstream.clone(), upstream.addr).await
}

async fn rig_in_front_of(name: &str, upstream: Arc<RawUpstream>, addr: std::net::SocketAddr) -> Rig {
    let opts = Opts { server: SERVER, upstream: UPSTREAM, ..Opts::default() };
    let (gw, ledger) = serve_metered(&format!("faults-{name}"), addr, opts).await;
    let mut rig = Rig { upstream, gw, ledger, fds: 0 };
    if addr == rig.upstream.addr {
        let warm = rig.call("rid-warm", "none", CHAT_BODY).await;
        assert_eq!(warm.status, 200, "{warm:?}");
    }
    rig.fds = rig.gw.quiet_fds().await;
    rig
}

/// A chat request from the chat key, asking for its other project, as raw text on its own connection.
fn chat_request(id: &str, fault: &str, body: &str) -> String {
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer {CHAT_KEY}\r\n\
         openai-project: Chat-Dev\r\nopenai-organization: org-caller\r\nx-request-id: {id}\r\nx-fault: {fault}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
}

impl Rig {
    async fn call(&self, id: &str, fault: &str, body: &str) -> Answer {
        exchange(&self.gw.addr, chat_request(id, fault, body).as_bytes()).await
    }

    /// Asserts that request `id` reached upstream as the gateway's, never the caller's: the gateway's key, the
    /// resolved project once, the request id, and nothing of the caller's credential or project header anywhere
    /// upstream received.
    async fn reached_upstream_as_the_gateways(&self, id: &str) {
        let conn = self.upstream.request(id).await;
        let head = conn.request(id).unwrap();
        assert_eq!(header(head, "authorization"), Some(format!("Bearer {UPSTREAM_KEY}").as_str()), "{head}");
        assert_eq!(header(head, "openai-project"), Some("proj_dev"), "{head}");
        assert_eq!(head.to_ascii_lowercase().matches("openai-project:").count(), 1, "{head}");
        let all = String::from_utf8_lossy(&self.upstream.all_received()).into_owned();
        for never in [CHAT_KEY, "Chat-Dev", "org-caller"] {
            assert!(!all.contains(never), "{never} reached upstream:\n{all}");
        }
    }

    /// Waits for the descriptors to be back to the baseline, stops the gateway, and returns its log and ledger.
    async fn finish(self) -> (Vec<Value>, Vec<Value>) {
        self.gw.back_to(self.fds).await;
        let log = self.gw.stop().await;
        (log, read_ledger(&self.ledger))
    }
}

/// The one access line of request `id` (failing if there is not exactly one).
fn one_access_line(log: &[Value], id: &str) -> Value {
    let lines = access_lines(log, id);
    assert_eq!(lines.len(), 1, "{id}: {lines:#?}");
    lines.into_iter().next().unwrap()
}

/// Asserts that the gateway logged why upstream failed request `id`, once, in the request's span (which joins
/// it to the access line).
fn upstream_failure_logged(log: &[Value], id: &str) {
    let about: Vec<&Value> = log.iter().filter(|l| l["span"]["request_id"] == id).collect();
    assert_eq!(about.len(), 1, "{about:#?}");
    assert_eq!(
        (about[0]["level"].as_str(), about[0]["message"].as_str()),
        (Some("WARN"), Some("upstream request failed"))
    );
}

/// The ledger lines of request `id`.
fn ledger_lines(ledger: &[Value], id: &str) -> Vec<Value> {
    ledger.iter().filter(|l| l["request_id"] == id).cloned().collect()
}

/// A fault upstream causes before its response head: the caller's status and code, the request reached
/// upstream as the gateway's, the gateway hung up on upstream (unless upstream reset the connection itself), one
/// access line saying the same, and no ledger line (nothing was answered).
async fn before_the_head(name: &str, fault: &str, status: u16, code: &str) {
    let rig = rig(name).await;
    let answer = rig.call("rid-fault", fault, CHAT_BODY).await;
    assert_eq!((answer.status, answer.error_code().as_str()), (status, code), "{answer:?}");
    assert_eq!(answer.header("x-request-id"), Some("rid-fault"));
    rig.reached_upstream_as_the_gateways("rid-fault").await;
    if fault != "reset-mid-head" {
        rig.upstream.hung_up("rid-fault").await;
    }
    let (log, ledger) = rig.finish().await;
    let line = one_access_line(&log, "rid-fault");
    assert_eq!((line["status"].as_u64(), line["error"].as_str()), (Some(status.into()), Some(code)), "{line}");
    assert_eq!((line["project"].as_str(), line["key"].as_str()), (Some("Chat-Dev"), Some("chat-service")));
    if status == 502 {
        upstream_failure_logged(&log, "rid-fault");
    }
    assert!(ledger_lines(&ledger, "rid-fault").is_empty(), "{ledger:#?}");
    assert_eq!(ledger_lines(&ledger, "rid-warm").len(), 1);
}

#[tokio::test]
async fn a_connection_upstream_resets_as_it_accepts_is_a_502() {
    let rig = rig("refused").await;
    rig.upstream.refuse(1);
    let answer = rig.call("rid-refused", "none", CHAT_BODY).await;
    assert_eq!((answer.status, answer.error_code().as_str()), (502, "upstream_unreachable"), "{answer:?}");
    let conns = rig.upstream.conns();
    assert!(conns.last().unwrap().refused, "{conns:?}");
    assert!(!conns.iter().any(|c| c.carries("rid-refused")), "a refused connection carries nothing, and no retry");
    let (log, ledger) = rig.finish().await;
    let line = one_access_line(&log, "rid-refused");
    assert_eq!((line["status"].as_u64(), line["error"].as_str()), (Some(502), Some("upstream_unreachable")));
    upstream_failure_logged(&log, "rid-refused");
    assert!(ledger_lines(&ledger, "rid-refused").is_empty());
}

#[tokio::test]
async fn an_upstream_port_nobody_listens_on_is_a_502() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let nobody = RawUpstream::start(script).await;
    let rig = rig_in_front_of("closed-port", nobody, closed).await;
    let answer = rig.call("rid-closed", "none", CHAT_BODY).await;
    assert_eq!((answer.status, answer.error_code().as_str()), (502, "upstream_unreachable"), "{answer:?}");
    let (log, ledger) = rig.finish().await;
    let line = one_access_line(&log, "rid-closed");
    assert_eq!((line["status"].as_u64(), line["error"].as_str()), (Some(502), Some("upstream_unreachable")));
    upstream_failure_logged(&log, "rid-closed");
    assert!(ledger.is_empty(), "{ledger:#?}");
}

#[tokio::test]
async fn an_upstream_that_closes_without_a_word_is_a_502() {
    before_the_head("close-silently", "close-silently", 502, "upstream_unreachable").await;
}

#[tokio::test]
async fn an_upstream_that_resets_mid_head_is_a_502() {
    before_the_head("reset-mid-head", "reset-mid-head", 502, "upstream_unreachable").await;
}

#[tokio::test]
async fn an_upstream_that_answers_garbage_is_a_502() {
    before_the_head("garbage", "garbage", 502, "upstream_unreachable").await;
}

#[tokio::test]
async fn an_upstream_whose_status_line_is_garbled_is_a_502() {
    before_the_head("bad-status", "bad-status", 502, "upstream_unreachable").await;
}

#[tokio::test]
async fn an_upstream_response_head_of_a_mebibyte_is_a_502() {
    before_the_head("huge-head", "head-1048576", 502, "upstream_unreachable").await;
}

/// README: "an upstream response head larger than that [the 64 KiB connection buffer] is a 502".
const HEAD_LIMIT: usize = 64 * 1024;

#[tokio::test]
async fn an_upstream_response_head_of_exactly_64_kib_is_passed_on() {
    let rig = rig("head-64k").await;
    let answer = rig.call("rid-head", &format!("head-{HEAD_LIMIT}"), CHAT_BODY).await;
    assert_eq!((answer.status, answer.text().as_str()), (200, "{}"), "{}", answer.head);
    let sent = String::from_utf8(head_of(HEAD_LIMIT)).unwrap();
    assert_eq!(answer.header("x-big"), header(&sent, "x-big"), "upstream's header, whole");
    rig.upstream.hung_up("rid-head").await;
    let (log, ledger) = rig.finish().await;
    assert_eq!(one_access_line(&log, "rid-head")["status"], 200);
    assert_eq!(ledger_lines(&ledger, "rid-head").len(), 1);
}

#[tokio::test]
async fn an_upstream_response_head_over_64_kib_is_a_502() {
    let rig = rig("head-over").await;
    for len in [HEAD_LIMIT + 1, 70_000, 100_000, 112 * 1024] {
        let answer = rig.call(&format!("rid-head-{len}"), &format!("head-{len}"), CHAT_BODY).await;
        assert_eq!((answer.status, answer.error_code().as_str()), (502, "upstream_unreachable"), "{len}");
    }
}

#[tokio::test]
async fn an_upstream_that_never_answers_is_a_504_and_is_hung_up_on() {
    let started = std::time::Instant::now();
    before_the_head("hang", "hang", 504, "upstream_timeout").await;
    assert!(started.elapsed() >= std::time::Duration::from_millis(300));
}

/// What the records of a request cut after upstream's head say: the access line, status 200 and incomplete,
/// with a reason; and the one ledger line, incomplete too.
fn cut_after_the_head(log: &[Value], ledger: &[Value], id: &str) -> (Value, Value) {
    let line = one_access_line(log, id);
    assert_eq!((line["status"].as_u64(), line["complete"].as_bool()), (Some(200), Some(false)), "{line}");
    assert!(line["incomplete_reason"].is_string(), "{line}");
    let billed = ledger_lines(ledger, id);
    assert_eq!(billed.len(), 1, "{ledger:#?}");
    let billed = billed.into_iter().next().unwrap();
    assert_eq!((billed["complete"].as_bool(), billed["project"].as_str()), (Some(false), Some("Chat-Dev")));
    (line, billed)
}

/// Sends request `id` asking for `fault` (whose connection upstream holds), reads the answer until `seen` has
/// come, has upstream reset the connection, and reads the rest.
async fn reset_once_seen(rig: &Rig, fault: &str, body: &str, seen: &[u8]) -> Answer {
    let mut tcp = tokio::net::TcpStream::connect(&rig.gw.addr).await.unwrap();
    tcp.write_all(chat_request("rid-fault", fault, body).as_bytes()).await.unwrap();
    let got = read_until(&mut tcp, Vec::new(), seen).await;
    rig.upstream.reset("rid-fault");
    read_answer(&mut tcp, got).await
}

#[tokio::test]
async fn an_upstream_that_resets_mid_body_cuts_the_caller_short() {
    let rig = rig("reset-mid-body").await;
    let answer = reset_once_seen(&rig, "body-then-reset", CHAT_BODY, b"{\"id\":\"c\",").await;
    assert_eq!((answer.status, answer.header("content-length")), (200, Some("1000")), "{answer:?}");
    assert!(answer.body == b"{\"id\":\"c\"," && !answer.whole(), "{answer:?}");
    rig.reached_upstream_as_the_gateways("rid-fault").await;
    let (log, ledger) = rig.finish().await;
    let (line, billed) = cut_after_the_head(&log, &ledger, "rid-fault");
    assert_eq!(line["unmetered"], "incomplete", "{line}");
    assert_eq!((billed["input_tokens"].as_u64(), billed["unmetered"].as_str()), (Some(0), Some("incomplete")));
}

#[tokio::test]
async fn an_upstream_that_resets_mid_stream_cuts_the_caller_short_and_bills_what_it_saw() {
    let rig = rig("reset-mid-stream").await;
    let answer = reset_once_seen(&rig, "stream-then-reset", STREAM_BODY, b"total_tokens").await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.text(), events().concat(), "every event before the reset");
    assert!(!answer.whole(), "no clean end: {answer:?}");
    rig.reached_upstream_as_the_gateways("rid-fault").await;
    let (log, ledger) = rig.finish().await;
    let (line, billed) = cut_after_the_head(&log, &ledger, "rid-fault");
    // The usage came before the reset: it is billed, and the lines say the stream was cut.
    assert_eq!((billed["input_tokens"].as_u64(), billed["output_tokens"].as_u64()), (Some(1000), Some(500)));
    assert!(billed.get("unmetered").is_none() && line.get("unmetered").is_none(), "{billed}");
}

#[tokio::test]
async fn an_upstream_reset_right_behind_its_first_bytes_still_gives_the_caller_its_head_and_those_bytes() {
    let rig = rig("reset-right-behind").await;
    let body = rig.call("rid-body", "body-and-reset", CHAT_BODY).await;
    let stream = rig.call("rid-stream", "stream-and-reset", STREAM_BODY).await;
    let (log, ledger) = rig.finish().await;
    cut_after_the_head(&log, &ledger, "rid-body");
    cut_after_the_head(&log, &ledger, "rid-stream");
    for (answer, sent) in [(body, "{\"id\":\"c\",".to_owned()), (stream, events().concat())] {
        assert_eq!(answer.status, 200, "{answer:?}");
        assert!(answer.header("x-request-id").is_some(), "{answer:?}");
        assert_eq!(answer.text(), sent, "what upstream sent before its reset");
        assert!(!answer.whole(), "{answer:?}");
    }
}

#[tokio::test]
async fn a_stream_upstream_closes_without_its_end_marker_ends_cleanly_but_incomplete() {
    let rig = rig("stream-closed").await;
    let answer = rig.call("rid-fault", "stream-closed", STREAM_BODY).await;
    // As HTTP goes the body ended where upstream's did; the missing [DONE] is the caller's to see, and the
    // records' to say.
    assert_eq!((answer.status, answer.text()), (200, events().concat()));
    assert!(answer.whole() && !answer.reset, "{answer:?}");
    rig.reached_upstream_as_the_gateways("rid-fault").await;
    let (log, ledger) = rig.finish().await;
    let (line, billed) = cut_after_the_head(&log, &ledger, "rid-fault");
    assert_eq!(line["incomplete_reason"], "stream ended without its end marker", "{line}");
    assert_eq!(billed["input_tokens"].as_u64(), Some(1000));
}

#[tokio::test]
async fn a_stream_upstream_holds_open_without_its_end_marker_is_ended_after_the_idle_timeout() {
    let rig = rig("stream-held").await;
    let started = std::time::Instant::now();
    let answer = rig.call("rid-fault", "stream-held", STREAM_BODY).await;
    assert!(started.elapsed() >= std::time::Duration::from_millis(300));
    assert_eq!((answer.status, answer.text()), (200, events().concat()));
    assert!(!answer.whole(), "never passed off as a clean end: {answer:?}");
    rig.reached_upstream_as_the_gateways("rid-fault").await;
    rig.upstream.hung_up("rid-fault").await;
    let (log, ledger) = rig.finish().await;
    let (_, billed) = cut_after_the_head(&log, &ledger, "rid-fault");
    assert_eq!(billed["input_tokens"].as_u64(), Some(1000));
}

/// Every fault, at once, each on a request of its own, and then a refused connection. The tests above check
/// what each one gives; here only the status (and, for the records, whether upstream answered: `billed`).
async fn round(rig: &Rig, round: usize) -> Vec<(String, bool)> {
    let faults = [
        ("none", CHAT_BODY, 200, true),
        ("close-silently", CHAT_BODY, 502, false),
        ("reset-mid-head", CHAT_BODY, 502, false),
        // (0: the caller got nothing at all; see the ignored test above.)
        ("body-and-reset", CHAT_BODY, 0, true),
        ("stream-and-reset", STREAM_BODY, 0, true),
        ("hang", CHAT_BODY, 504, false),
        ("garbage", CHAT_BODY, 502, false),
        ("bad-status", CHAT_BODY, 502, false),
        ("stream-closed", STREAM_BODY, 200, true),
        ("stream-held", STREAM_BODY, 200, true),
        ("head-1048576", CHAT_BODY, 502, false),
    ];
    let calls = faults.iter().map(|(fault, body, status, billed)| async move {
        let id = format!("rid-{round}-{fault}");
        let answer = rig.call(&id, fault, body).await;
        // A reset right behind the head may or may not let the head through first.
        let status = if *status == 0 && answer.status == 200 { 200 } else { *status };
        assert_eq!(answer.status, status, "{id}: {answer:?}");
        (id, *billed)
    });
    let mut sent = futures_util::future::join_all(calls).await;
    rig.upstream.refuse(1);
    let id = format!("rid-{round}-refused");
    assert_eq!(rig.call(&id, "none", CHAT_BODY).await.status, 502);
    sent.push((id, false));
    sent
}

/// After a first round of every fault (which grows the allocator's arenas and the gateway's buffers to their
/// working size), further rounds must not grow the gateway's resident memory by more than this. A leak of one
/// 64 KiB connection buffer per faulty request would grow it by some 4 MiB over the rounds; what is allowed is
/// the allocator's slack: freed memory glibc keeps in its per-thread arenas rather than returning it, and
/// fragmentation that moves from round to round. (Measured here: 0.3 to 0.6 MiB over 6 rounds, 0.9 MiB over 40.)
const RSS_SLACK_KIB: u64 = 2048;
const ROUNDS: usize = 6;

#[tokio::test]
async fn after_rounds_of_every_fault_descriptors_and_memory_are_back_to_their_baseline() {
    let rig = rig("rounds").await;
    let mut sent = round(&rig, 0).await;
    rig.gw.back_to(rig.fds).await;
    let baseline = rig.gw.rss_kib();
    for r in 1..=ROUNDS {
        sent.extend(round(&rig, r).await);
    }
    rig.gw.back_to(rig.fds).await;
    let after = rig.gw.rss_kib();
    eprintln!("resident memory: {baseline} KiB after the first round, {after} KiB after {ROUNDS} more");
    assert!(after <= baseline + RSS_SLACK_KIB, "grew from {baseline} KiB to {after} KiB");
    let (log, ledger) = rig.finish().await;
    for (id, billed) in &sent {
        one_access_line(&log, id);
        assert_eq!(ledger_lines(&ledger, id).len(), usize::from(*billed), "{id}");
    }
    // Nothing else was billed either.
    assert_eq!(ledger.len(), 1 + sent.iter().filter(|(_, billed)| *billed).count());
}
