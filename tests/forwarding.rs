//! Forwarding: blocked routes, transparency, streaming without buffering, client disconnects, timeouts,
//! body limits, upstream errors, health and graceful shutdown.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use axum::body::Bytes;
use axum::response::IntoResponse;
use common::*;
use futures_util::{FutureExt, StreamExt};
use http::StatusCode;

#[tokio::test]
async fn only_inference_routes_are_forwarded_however_a_path_is_spelled() {
    let gw = Gw::start(Mock::ok_json().await, Opts::default()).await;
    let paths = [
        "GET /v1/organization/projects",
        "POST /v1/organization/projects",
        "POST /v1/organization/projects/proj_chat/archive",
        "GET /openai/v1/organization/projects",
        "GET /v1/./organization/projects",
        "GET /v1/../v1/organization/projects",
        "GET /v1/models/../organization/projects",
        "GET /v1/responses/%2e%2e/organization/projects",
        "GET /v1/responses/..%2Forganization%2Fprojects",
        "GET /v1/%6Frganization/projects",
        "GET //v1/organization/projects",
        "GET /v1//organization/projects",
        "GET /chatbot/v1/organization/projects",
        "GET /chatbot/../v1/organization/projects",
        "POST /v1/chat/completions/../../organization/projects",
        "POST /v1/chat//completions",
        "POST /v1/chat/completions/",
        "GET /v1/chat/completions",
        "POST /v2/chat/completions",
        "GET /",
        "GET /healthz",
        "GET /metrics",
        "GET http://evil.example/v1/organization/projects",
    ];
    for line in paths {
        let request = format!(
            "{line} HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer {CHAT_KEY}\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"
        );
        let (status, text) = gw.raw(&request).await;
        assert_eq!(status, 404, "{line}: {text}");
        assert!(text.contains("\"unknown_route\""), "{line}: {text}");
    }
    // Also without a key: the route check comes first and never leaks to upstream.
    let (status, _) = gw.raw("GET /v1/organization/projects HTTP/1.1\r\nhost: gw\r\nconnection: close\r\n\r\n").await;
    assert_eq!(status, 404);
    assert_eq!(gw.mock.hits(), 0, "no blocked path may reach upstream");
}

#[tokio::test]
async fn every_inference_endpoint_is_forwarded_under_v1_and_openai_v1() {
    let gw = Gw::start(Mock::ok_json().await, Opts::default()).await;
    for prefix in ["/v1", "/openai/v1"] {
        let calls = [
            ("POST", "/chat/completions"),
            ("POST", "/responses"),
            ("GET", "/responses/resp_123"),
            ("DELETE", "/responses/resp_123"),
            ("POST", "/responses/resp_123/cancel"),
            ("GET", "/models"),
            ("GET", "/models/openai.gpt-oss-120b"),
        ];
        for (method, path) in calls {
            let url = gw.url(&format!("{prefix}{path}"));
            let req = gw.client.request(method.parse().unwrap(), &url).bearer_auth(CHAT_KEY);
            let req = if method == "POST" { req.body(CHAT_BODY) } else { req };
            assert_eq!(req.send().await.unwrap().status(), 200, "{method} {url}");
            let seen = gw.mock.next().await;
            assert_eq!((seen.method.as_str(), seen.uri.path()), (method, format!("{prefix}{path}").as_str()));
        }
    }
}

#[tokio::test]
async fn headers_and_bodies_pass_through_transparently() {
    let mock = Mock::start(|seen| async move {
        let mut res = (StatusCode::CREATED, seen.body.clone()).into_response();
        let h = res.headers_mut();
        h.insert("x-upstream", "yes".parse().unwrap());
        h.insert("openai-processing-ms", "12".parse().unwrap());
        h.insert("connection", "x-secret-hop".parse().unwrap());
        h.insert("x-secret-hop", "hop".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        res
    })
    .await;
    let gw = Gw::start(mock, Opts::default()).await;
    let body: Vec<u8> = (0..=255u8).cycle().take(3000).collect();
    let res = gw
        .client
        .post(gw.url("/v1/responses?foo=bar&x=%2F"))
        .bearer_auth(CHAT_KEY)
        .header("content-type", "application/octet-stream")
        .header("openai-beta", "responses=v1")
        .header("x-custom", "kept")
        .header("connection", "x-hop-header")
        .header("x-hop-header", "dropped")
        .header("te", "trailers")
        .header("proxy-authorization", "Basic abc")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    assert_eq!(res.headers()["x-upstream"], "yes");
    assert_eq!(res.headers()["openai-processing-ms"], "12");
    assert!(res.headers().get("x-secret-hop").is_none());
    assert!(res.headers().get("keep-alive").is_none());
    assert_eq!(res.bytes().await.unwrap(), body, "response body is byte-identical");

    let seen = gw.mock.next().await;
    assert_eq!(seen.uri.path_and_query().unwrap().as_str(), "/v1/responses?foo=bar&x=%2F");
    assert_eq!(seen.body, body, "request body is byte-identical");
    assert_eq!(seen.header("openai-beta"), Some("responses=v1"));
    assert_eq!(seen.header("x-custom"), Some("kept"));
    assert_eq!(seen.header("content-type"), Some("application/octet-stream"));
    for gone in ["x-hop-header", "te", "proxy-authorization"] {
        assert_eq!(seen.header(gone), None, "{gone}");
    }
    assert_eq!(seen.header("host"), Some(gw.mock.addr.to_string().as_str()));
}

#[tokio::test]
async fn large_responses_pass_whole_and_request_heads_are_bounded() {
    // Many times the connection buffer, so it crosses both sides' buffers in many pieces.
    const SIZE: usize = 3 * 1024 * 1024;
    let pattern = |len: usize| (0..len).map(|i| u8::try_from(i % 251).unwrap()).collect::<Vec<u8>>();
    let mock = Mock::start(move |_| async move { (StatusCode::OK, pattern(SIZE)).into_response() }).await;
    let gw = Gw::start(mock, Opts::default()).await;
    // Twice: the second response on the same caller connection, through the buffer the first one left.
    for _ in 0..2 {
        let res = gw.post("/v1/responses", CHAT_KEY).header("content-type", "application/octet-stream").body("x");
        let res = res.send().await.unwrap();
        assert_eq!(res.status(), 200);
        assert!(res.bytes().await.unwrap() == pattern(SIZE), "response body is byte-identical");
    }
    assert_eq!(gw.mock.connections(), 1);

    // A head of exactly 64 KiB (request line to blank line) goes through; one byte more is refused before
    // anything reaches upstream. So are 101 header fields; 100 are not.
    let hits = gw.mock.hits();
    let head = |total: usize, fields: usize| {
        // Many fields go to a path the gateway answers itself: upstream has a field limit of its own.
        let path = if fields > 5 { "/v1/nowhere" } else { "/v1/responses" };
        let mut head = format!("POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {CHAT_KEY}\r\n");
        head.push_str("Content-Type: text/plain\r\nContent-Length: 1\r\nConnection: close\r\n");
        for i in 5..fields - 1 {
            head.push_str(&format!("X-F{i}: v\r\n"));
        }
        let filler = total - head.len() - "X-Big: \r\n\r\n".len();
        head.push_str(&format!("X-Big: {}\r\n\r\nx", "a".repeat(filler)));
        head
    };
    let limit = mantlegate::proxy::CONNECTION_BUFFER;
    assert_eq!(gw.raw(&head(limit, 5)).await.0, 200);
    assert_eq!(gw.mock.hits(), hits + 1);
    assert_eq!(gw.raw(&head(limit + 1, 5)).await.0, 431);
    assert_eq!(gw.raw(&head(2 * limit, 5)).await.0, 431);
    assert_eq!(gw.mock.hits(), hits + 1);
    assert_eq!(gw.raw(&head(4096, 100)).await.0, 404);
    assert_eq!(gw.raw(&head(4096, 101)).await.0, 431);
    assert_eq!(gw.mock.hits(), hits + 1);
}

#[tokio::test]
async fn an_upstream_response_head_past_the_bound_is_a_502() {
    let mock = Mock::start(|seen| async move {
        let len: usize = seen.header("x-head-size").unwrap().parse().unwrap();
        let mut res = (StatusCode::OK, "{}").into_response();
        res.headers_mut().insert("x-big", "a".repeat(len).parse().unwrap());
        res
    })
    .await;
    let gw = Gw::start(mock, Opts::default()).await;
    let with_head = |len: usize| gw.get("/v1/models", CHAT_KEY).header("x-head-size", len.to_string()).send();
    assert_eq!(with_head(40 * 1024).await.unwrap().status(), 200);
    let res = with_head(2 * mantlegate::proxy::CONNECTION_BUFFER).await.unwrap();
    assert_eq!(error_code(res).await.0, 502);
}

#[tokio::test]
async fn upstream_errors_pass_through_unchanged() {
    let body = r#"{"error":{"message":"Rate limit reached","type":"rate_limit_error","param":null,"code":"rate_limit_exceeded"}}"#;
    let mock = Mock::start(move |_| async move {
        let mut res = json_response(StatusCode::TOO_MANY_REQUESTS, body);
        res.headers_mut().insert("retry-after", "7".parse().unwrap());
        res
    })
    .await;
    let gw = Gw::start(mock, Opts::default()).await;
    let res = gw.post("/v1/chat/completions", CHAT_KEY).body(CHAT_BODY).send().await.unwrap();
    assert_eq!(res.status(), 429);
    assert_eq!(res.headers()["retry-after"], "7");
    assert_eq!(res.text().await.unwrap(), body);

    let mock =
        Mock::start(|_| async { json_response(StatusCode::NOT_FOUND, r#"{"error":{"code":"project_not_found"}}"#) })
            .await;
    let gw = Gw::start(mock, Opts::default()).await;
    let res = gw.post("/v1/chat/completions", CHAT_KEY).body(CHAT_BODY).send().await.unwrap();
    assert_eq!(error_code(res).await, (404, "project_not_found".into()));
}

#[tokio::test]
async fn sse_events_reach_the_client_while_upstream_is_still_producing() {
    let (mock, mut script_rx) = Mock::scripted().await;
    let gw = Gw::start(mock, Opts::default()).await;
    let body = r#"{"model":"openai.gpt-oss-120b","stream":true,"messages":[]}"#;
    let res = gw.post("/v1/chat/completions", CHAT_KEY).body(body).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    let script = script_rx.recv().await.unwrap();
    let mut stream = res.bytes_stream();

    // Each event is released by upstream only after the previous one reached the client: a gateway that
    // buffered anything would deadlock here, and the bounded wait turns that into a failure.
    let mut received = Vec::new();
    for i in 0..5 {
        let event = format!("data: {{\"n\":{i}}}\n\n");
        script.tx.send(Bytes::from(event.clone())).await.unwrap();
        let chunk = tokio::time::timeout(WAIT, stream.next()).await.expect("event held back").unwrap().unwrap();
        assert_eq!(chunk, event.as_bytes(), "event {i} arrives whole and on its own");
        received.push(chunk);
    }
    script.tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await.unwrap();
    drop(script.tx);
    let rest: Vec<Bytes> = stream.map(|c| c.unwrap()).collect().await;
    assert_eq!(rest.concat(), b"data: [DONE]\n\n");
}

#[tokio::test]
async fn client_going_away_mid_stream_drops_the_upstream_request() {
    let (mock, mut script_rx) = Mock::scripted().await;
    let gw = Gw::start(mock, Opts::default()).await;
    let res = gw.post("/v1/chat/completions", CHAT_KEY).body(CHAT_BODY).send().await.unwrap();
    let script = script_rx.recv().await.unwrap();
    script.tx.send(Bytes::from_static(b"data: {}\n\n")).await.unwrap();
    let mut stream = res.bytes_stream();
    tokio::time::timeout(WAIT, stream.next()).await.unwrap().unwrap().unwrap();
    drop(stream); // the client hangs up; upstream has sent nothing more

    tokio::time::timeout(WAIT, script.dropped)
        .await
        .expect("upstream stream still open after the client left")
        .unwrap();
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_after_the_send_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mock, mut script_rx) = Mock::scripted().await;
    let gw = Gw::start(mock, Opts { server: "send_timeout = \"200ms\"", ..Opts::default() }).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut caller = socket.connect(gw.addr).await.unwrap();
    caller.write_all(raw_chat_request(CHAT_KEY).as_bytes()).await.unwrap();
    let script = script_rx.recv().await.unwrap();
    script.tx.send(Bytes::from_static(b"data: {}\n\n")).await.unwrap();
    let mut head = [0u8; 64];
    let n = tokio::time::timeout(WAIT, caller.read(&mut head)).await.unwrap().unwrap();
    assert!(head[..n].starts_with(b"HTTP/1.1 200"));
    // The caller reads nothing more while upstream keeps sending, until every buffer between them is full.
    let tx = script.tx.clone();
    tokio::spawn(async move {
        let chunk = Bytes::from(format!("data: {}\n\n", "x".repeat(64 * 1024)));
        while tx.send(chunk.clone()).await.is_ok() {}
    });
    tokio::time::timeout(WAIT, script.dropped)
        .await
        .expect("upstream stream still open while the caller read nothing")
        .unwrap();
    drop(caller);
}

#[tokio::test]
async fn upstream_connections_are_kept_alive_across_whole_responses() {
    // Sized, chunked and error responses, one after another: each ends its exchange cleanly.
    let mock = Mock::start(|seen| async move {
        match seen.uri.path() {
            "/v1/models" => json_response(StatusCode::OK, r#"{"data":[]}"#),
            "/v1/responses" => json_response(StatusCode::BAD_REQUEST, r#"{"error":{"message":"no"}}"#),
            _ => {
                let events = futures_util::stream::iter(
                    ["data: 1\n\n", "data: 2\n\n"].map(|e| Ok::<_, std::convert::Infallible>(Bytes::from(e))),
                );
                ([(http::header::CONTENT_TYPE, "text/event-stream")], axum::body::Body::from_stream(events))
                    .into_response()
            }
        }
    })
    .await;
    // One traffic thread, so one pool.
    let gw = Gw::start(mock.clone(), Opts { server: "workers = 1", ..Opts::default() }).await;
    for _ in 0..3 {
        let res = gw.get("/v1/models", CHAT_KEY).send().await.unwrap();
        assert_eq!((res.status(), res.text().await.unwrap()), (StatusCode::OK, r#"{"data":[]}"#.to_owned()));
        let res = gw.post("/v1/chat/completions", CHAT_KEY).body(CHAT_BODY).send().await.unwrap();
        assert_eq!(res.text().await.unwrap(), "data: 1\n\ndata: 2\n\n");
        let res = gw.post("/v1/responses", CHAT_KEY).body(CHAT_BODY).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::BAD_REQUEST);
        res.bytes().await.unwrap();
    }
    assert_eq!(mock.hits(), 9);
    assert_eq!(mock.connections(), 1, "every request after the first should reuse the connection");
}

#[tokio::test]
async fn a_response_cut_short_is_not_reused() {
    let (mock, mut script_rx) = Mock::scripted().await;
    let gw = Gw::start(mock.clone(), Opts { server: "workers = 1", ..Opts::default() }).await;
    let res = gw.post("/v1/chat/completions", CHAT_KEY).body(CHAT_BODY).send().await.unwrap();
    let script = script_rx.recv().await.unwrap();
    script.tx.send(Bytes::from_static(b"data: 1\n\n")).await.unwrap();
    let mut stream = res.bytes_stream();
    tokio::time::timeout(WAIT, stream.next()).await.unwrap().unwrap().unwrap();
    drop(stream);
    tokio::time::timeout(WAIT, script.dropped)
        .await
        .expect("upstream stream still open after the client left")
        .unwrap();

    // The next request cannot go on a connection with half a response still in it.
    let res = gw.post("/v1/chat/completions", CHAT_KEY).body(CHAT_BODY).send().await.unwrap();
    let script = script_rx.recv().await.unwrap();
    script.tx.send(Bytes::from_static(b"data: 2\n\n")).await.unwrap();
    drop(script.tx);
    assert_eq!(res.text().await.unwrap(), "data: 2\n\n");
    assert_eq!(mock.connections(), 2);
}

/// An upstream that answers one request per connection, keep-alive by the protocol, then closes it, and
/// reports each close.
async fn one_request_per_connection() -> (std::net::SocketAddr, tokio::sync::mpsc::UnboundedReceiver<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = upstream.local_addr().unwrap();
    let (closed_tx, closed_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (mut conn, _) = upstream.accept().await.unwrap();
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.ends_with(b"\r\n\r\n") {
                let n = conn.read(&mut buf).await.unwrap();
                assert!(n > 0, "connection closed before a whole request head");
                head.extend_from_slice(&buf[..n]);
            }
            conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}")
                .await
                .unwrap();
            drop(conn);
            closed_tx.send(()).unwrap();
        }
    });
    (upstream_addr, closed_rx)
}

/// An upstream that answers every request (a head with no body) with the raw bytes `reply`, then waits for the
/// gateway to close the connection.
async fn replying_with(reply: &'static [u8]) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = upstream.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut conn, _) = upstream.accept().await.unwrap();
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut buf = [0u8; 1024];
                loop {
                    if seen.windows(4).any(|w| w == b"\r\n\r\n") {
                        seen.clear();
                        conn.write_all(reply).await.unwrap();
                    }
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn upstreams_framing_headers_are_not_passed_on() {
    // Content-Length beside Transfer-Encoding: the chunked body is the message, the length is stale.
    let upstream = replying_with(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 3\r\n\
          transfer-encoding: chunked\r\n\r\n17\r\n{\"hello\":\"world\",\"x\":1}\r\n0\r\n\r\n",
    )
    .await;
    let gw = Gw::start(Mock::ok_json().await, Opts { upstream_addr: Some(upstream), ..Opts::default() }).await;
    let res = gw.get("/v1/models", CHAT_KEY).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.text().await.unwrap(), r#"{"hello":"world","x":1}"#);

    // A 204 never carries a length, whatever upstream says.
    let upstream = replying_with(b"HTTP/1.1 204 No Content\r\ncontent-length: 5\r\n\r\n").await;
    let gw = Gw::start(Mock::ok_json().await, Opts { upstream_addr: Some(upstream), ..Opts::default() }).await;
    let (status, text) =
        gw.raw(&format!("DELETE /v1/responses/resp_1 HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {CHAT_KEY}\r\nConnection: close\r\n\r\n")).await;
    assert_eq!(status, 204, "{text}");
    assert!(!text.to_ascii_lowercase().contains("content-length"), "{text}");

    // A 304's length is the one a 200 would have had; hyper (in debug builds, a panic) checks it against the
    // empty body it sends.
    let upstream = replying_with(b"HTTP/1.1 304 Not Modified\r\ncontent-length: 5\r\n\r\n").await;
    let gw = Gw::start(Mock::ok_json().await, Opts { upstream_addr: Some(upstream), ..Opts::default() }).await;
    let (status, text) = gw
        .raw(&format!(
            "GET /v1/models HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {CHAT_KEY}\r\nConnection: close\r\n\r\n"
        ))
        .await;
    assert_eq!(status, 304, "{text}");
}

#[tokio::test]
async fn an_upstream_answering_with_an_informational_status_is_a_502() {
    let upstream =
        replying_with(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n").await;
    let gw = Gw::start(Mock::ok_json().await, Opts { upstream_addr: Some(upstream), ..Opts::default() }).await;
    let res = gw.get("/v1/models", CHAT_KEY).send().await.unwrap();
    assert_eq!(error_code(res).await, (502, "upstream_unreachable".into()));
}

/// A gateway with one traffic thread (so one pool of upstream connections) in front of `upstream`.
async fn one_thread_gateway(upstream: std::net::SocketAddr) -> Gw {
    Gw::start(Mock::ok_json().await, Opts { server: "workers = 1", upstream_addr: Some(upstream), ..Opts::default() })
        .await
}

#[tokio::test]
async fn an_idle_connection_upstream_closed_is_not_used() {
    let (upstream_addr, mut closed_rx) = one_request_per_connection().await;
    let gw = one_thread_gateway(upstream_addr).await;
    for _ in 0..3 {
        let res = gw.get("/v1/models", CHAT_KEY).send().await.unwrap();
        assert_eq!((res.status(), res.text().await.unwrap()), (StatusCode::OK, "{}".to_owned()));
        tokio::time::timeout(WAIT, closed_rx.recv()).await.unwrap().unwrap();
    }
}

/// This machine's IPv4 sockets connected to `port` that the peer has closed and this end has not.
fn half_closed_to(port: u16) -> usize {
    let remote = format!(":{port:04X}");
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap()
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields[2].ends_with(&remote) && fields[3] == "08" // CLOSE_WAIT
        })
        .count()
}

#[tokio::test]
async fn an_idle_connection_upstream_closes_is_closed_here_at_once() {
    let (upstream_addr, mut closed_rx) = one_request_per_connection().await;
    let gw = one_thread_gateway(upstream_addr).await;
    let res = gw.get("/v1/models", CHAT_KEY).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    res.bytes().await.unwrap();
    // Upstream has closed its end (on loopback its FIN has arrived when close returns); the gateway's end,
    // idle in the pool with nobody asking for it, must follow without waiting for the next request.
    tokio::time::timeout(WAIT, closed_rx.recv()).await.unwrap().unwrap();
    tokio::time::timeout(WAIT, async {
        while half_closed_to(upstream_addr.port()) > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the gateway left its upstream connection half closed");
}

#[tokio::test]
async fn a_request_that_may_have_reached_upstream_is_never_sent_twice() {
    use tokio::io::AsyncWriteExt;
    // Upstream answers the first request on a connection; it reads the second and closes without answering.
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = upstream.local_addr().unwrap();
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    tokio::spawn({
        let seen = seen.clone();
        async move {
            loop {
                let (mut conn, _) = upstream.accept().await.unwrap();
                let seen = seen.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    for n in 1.. {
                        if !read_request(&mut conn, &mut buf).await {
                            return;
                        }
                        seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        if n == 2 {
                            return;
                        }
                        conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}").await.unwrap();
                    }
                });
            }
        }
    });
    let gw = one_thread_gateway(upstream_addr).await;
    assert_eq!(gw.get("/v1/models", CHAT_KEY).send().await.unwrap().status(), StatusCode::OK);
    // Sent on the kept-alive connection, which upstream then closes: a resend would get a 200 on a new one.
    let res = gw.post("/v1/responses", CHAT_KEY).body(CHAT_BODY).send().await.unwrap();
    assert_eq!(error_code(res).await, (502, "upstream_unreachable".to_owned()));
    assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 2);
}

/// Reads one request (head and a `content-length` body) from `conn`, keeping what follows it in `buf`;
/// false once the connection has closed.
async fn read_request(conn: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> bool {
    use tokio::io::AsyncReadExt;
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let length: usize =
                head.lines().find_map(|l| l.strip_prefix("content-length:")).map_or(0, |v| v.trim().parse().unwrap());
            if buf.len() >= end + 4 + length {
                buf.drain(..end + 4 + length);
                return true;
            }
        }
        let mut chunk = [0u8; 8192];
        match conn.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

#[tokio::test]
async fn an_upload_upstream_answers_early_goes_on_while_the_caller_is_still_sending() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    const UPLOAD: usize = 32 * 1024 * 1024;
    // Upstream answers at once and streams its answer until it has read the whole request body.
    let mock = Mock::start_raw(|req| async move {
        let consumed = Arc::new(AtomicBool::new(false));
        tokio::spawn({
            let consumed = consumed.clone();
            async move {
                let mut body = req.into_body().into_data_stream();
                while let Some(chunk) = body.next().await {
                    chunk.unwrap();
                }
                consumed.store(true, Ordering::SeqCst);
            }
        });
        let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
        let answer = futures_util::stream::unfold((), move |()| {
            let (consumed, chunk) = (consumed.clone(), chunk.clone());
            async move { (!consumed.load(Ordering::SeqCst)).then_some((Ok::<_, std::convert::Infallible>(chunk), ())) }
        });
        axum::body::Body::from_stream(answer).into_response()
    })
    .await;
    let max_body_bytes = 2 * UPLOAD as u64;
    let gw = Gw::start(mock, Opts { server: "workers = 1", max_body_bytes, ..Opts::default() }).await;
    assert_eq!(&upload_first(gw.addr, UPLOAD).await, b"HTTP/1.1 200");
}

/// A caller that sends its whole request, a `/v1/responses` upload of `size` bytes, before it reads a byte of the
/// answer: the answer's first 12 bytes (`HTTP/1.1 NNN`).
async fn upload_first(addr: std::net::SocketAddr, size: usize) -> [u8; 12] {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut caller = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /v1/responses HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer {CHAT_KEY}\r\ncontent-length: {size}\r\n\r\n"
    );
    caller.write_all(head.as_bytes()).await.unwrap();
    tokio::time::timeout(WAIT, caller.write_all(&vec![b' '; size]))
        .await
        .expect("the upload never finished")
        .expect("the connection was reset under the upload");
    let mut start = [0u8; 12];
    tokio::time::timeout(WAIT, caller.read_exact(&mut start)).await.unwrap().unwrap();
    start
}

#[tokio::test]
async fn a_callers_broken_body_is_its_fault_not_upstreams() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gw = Gw::start(Mock::ok_json().await, Opts::default()).await;
    // The chat key's body streams upstream; the search key's project has a model allowlist, so its body is
    // read whole first. Either way a broken body is the caller's 400, not a 502 blaming upstream.
    for key in [CHAT_KEY, SEARCH_KEY] {
        let bad_chunk = format!(
            "POST /v1/responses HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {key}\r\n\
             Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n"
        );
        let (status, text) = gw.raw(&bad_chunk).await;
        assert_eq!(status, 400, "{key}: {text}");
        assert!(text.contains("\"invalid_request\"") && text.contains("x-request-id"), "{text}");

        // A caller that stops sending before its declared length.
        let mut stream = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        let short = format!(
            "POST /v1/responses HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {key}\r\n\
             Content-Length: 100\r\n\r\n{{\"model\":"
        );
        stream.write_all(short.as_bytes()).await.unwrap();
        stream.shutdown().await.unwrap();
        let mut text = String::new();
        tokio::time::timeout(WAIT, stream.read_to_string(&mut text)).await.unwrap().unwrap();
        assert!(text.starts_with("HTTP/1.1 400 ") && text.contains("\"invalid_request\""), "{key}: {text}");
    }
}

#[tokio::test]
async fn request_bodies_stream_to_upstream_when_the_model_need_not_be_read() {
    let (first_tx, first_rx) = tokio::sync::oneshot::channel::<Bytes>();
    let first_tx = std::sync::Mutex::new(Some(first_tx));
    let mock = Mock::start_raw(move |req| {
        let first_tx = first_tx.lock().unwrap().take();
        async move {
            let mut body = req.into_body().into_data_stream();
            let first = body.next().await.unwrap().unwrap();
            first_tx.unwrap().send(first).unwrap();
            let rest: Vec<Bytes> = body.map(|c| c.unwrap()).collect().await;
            (StatusCode::OK, rest.concat()).into_response()
        }
    })
    .await;
    let gw = Gw::start(mock, Opts::default()).await;
    let (body_tx, body_rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    let req = gw
        .post("/v1/responses", CHAT_KEY)
        .body(reqwest::Body::wrap_stream(tokio_stream::wrappers::ReceiverStream::new(body_rx)))
        .send();
    let pending = tokio::spawn(req);
    body_tx.send(Ok(Bytes::from_static(b"{\"model\":\"openai.gpt-oss-120b\","))).await.unwrap();
    // Upstream sees the first part while the client has not finished sending.
    let first = tokio::time::timeout(WAIT, first_rx).await.expect("request body was held back").unwrap();
    assert_eq!(first, &b"{\"model\":\"openai.gpt-oss-120b\","[..]);
    body_tx.send(Ok(Bytes::from_static(b"\"messages\":[]}"))).await.unwrap();
    drop(body_tx);
    let res = pending.await.unwrap().unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.text().await.unwrap(), "\"messages\":[]}");
}

#[tokio::test]
async fn oversized_bodies_get_413() {
    let gw = Gw::start(Mock::ok_json().await, Opts::default()).await;
    let big = format!(r#"{{"model":"openai.gpt-oss-20b","input":"{}"}}"#, "x".repeat(5000));
    // Declared length over the cap: refused before reading, for both the streamed and the read path.
    for key in [CHAT_KEY, SEARCH_KEY] {
        let res = gw.post("/v1/responses", key).body(big.clone()).send().await.unwrap();
        assert_eq!(error_code(res).await, (413, "request_too_large".into()));
    }
    // Chunked, no declared length: the cap still holds while reading the model...
    let chunked = || reqwest::Body::wrap_stream(futures_util::stream::iter(vec![Ok::<_, std::io::Error>(big.clone())]));
    let res = gw.post("/v1/responses", SEARCH_KEY).body(chunked()).send().await.unwrap();
    assert_eq!(error_code(res).await, (413, "request_too_large".into()));
    assert_eq!(gw.mock.hits(), 0);
    // ...and while streaming to upstream (which may have seen the start, never the whole).
    let res = gw.post("/v1/responses", CHAT_KEY).body(chunked()).send().await.unwrap();
    assert_eq!(error_code(res).await, (413, "request_too_large".into()));
    // At the cap exactly is fine.
    let exact = format!(r#"{{"model":"openai.gpt-oss-20b","input":"{}"}}"#, "x".repeat(4096 - 41));
    assert_eq!(exact.len(), 4096);
    let res = gw.post("/v1/responses", SEARCH_KEY).body(exact).send().await.unwrap();
    assert_eq!(res.status(), 200);
}

#[tokio::test]
async fn a_caller_that_sends_its_whole_body_before_reading_gets_the_early_answer() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // More than both ends' socket buffers hold, so most of it arrives after the answer was sent.
    const UPLOAD: usize = 24 << 20;
    let gw = Gw::start(Mock::ok_json().await, Opts::default()).await;
    let mut conn = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    for (key, status) in [("not-a-key", "401"), (CHAT_KEY, "413")] {
        let head = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\
             Content-Type: application/json\r\nContent-Length: {UPLOAD}\r\n\r\n"
        );
        conn.write_all(head.as_bytes()).await.unwrap();
        // As Python's http.client does: the whole request first, then the answer.
        tokio::time::timeout(WAIT, conn.write_all(&vec![b' '; UPLOAD]))
            .await
            .expect("the upload never finished")
            .expect("the connection was reset under the upload");
        let mut answer = Vec::new();
        while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(WAIT, conn.read(&mut chunk)).await.unwrap().unwrap();
            assert!(n > 0, "closed before the answer: {}", String::from_utf8_lossy(&answer));
            answer.extend_from_slice(&chunk[..n]);
        }
        let answer = String::from_utf8_lossy(&answer).into_owned();
        assert!(answer.starts_with(&format!("HTTP/1.1 {status} ")), "{answer}");
        // The rest of this answer's body, so the next request starts clean on the same connection.
        let length: usize = answer
            .lines()
            .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap()))
            .unwrap();
        let have = answer.len() - answer.find("\r\n\r\n").unwrap() - 4;
        let mut rest = vec![0u8; length - have];
        conn.read_exact(&mut rest).await.unwrap();
    }
    // Both uploads were read to their end, so the connection is still good for the next request.
    conn.write_all(raw_chat_request(CHAT_KEY).as_bytes()).await.unwrap();
    let mut answer = [0u8; 12];
    tokio::time::timeout(WAIT, conn.read_exact(&mut answer)).await.unwrap().unwrap();
    assert_eq!(&answer, b"HTTP/1.1 200");
    assert_eq!(gw.mock.hits(), 1);
}

#[tokio::test]
async fn a_refused_caller_that_expected_to_be_asked_for_its_body_is_not_read_for_it() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gw = Gw::start(Mock::ok_json().await, Opts::default()).await;
    let mut conn = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    // It waits for `100 Continue`, which a refusal never sends: the body never comes, and what the caller sends
    // next must not be read as that body.
    conn.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer not-a-key\r\n\
          Expect: 100-continue\r\nContent-Length: 300\r\n\r\n",
    )
    .await
    .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, conn.read_to_end(&mut answer)).await.expect("the connection was kept").unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 401 ") && !answer.contains("100 Continue"), "{answer}");
}

#[tokio::test]
async fn a_drain_does_not_wait_for_an_upload_being_thrown_away() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut gw = Gw::start(Mock::ok_json().await, Opts { grace: "60s", ..Opts::default() }).await;
    let mut conn = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    // Refused, with most of its declared body still to come (and never sent).
    conn.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer not-a-key\r\n\
          Content-Length: 1000\r\n\r\n{\"model\":",
    )
    .await
    .unwrap();
    let mut head = [0u8; 12];
    tokio::time::timeout(WAIT, conn.read_exact(&mut head)).await.unwrap().unwrap();
    assert_eq!(&head, b"HTTP/1.1 401");
    // The gateway is reading the rest to throw it away; a drain stops that, well within its grace.
    tokio::time::timeout(WAIT, gw.running.take().unwrap().stop()).await.expect("the drain waited for the upload");
}

#[tokio::test]
async fn an_early_upstream_refusal_reaches_a_caller_still_uploading() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const UPLOAD: usize = 24 << 20;
    // Upstream refuses on the request head, without reading the body. The gateway has its whole answer at once,
    // so it stops uploading and throws the rest of the caller's upload away.
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = upstream.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut conn, _) = upstream.accept().await.unwrap();
        let mut buf = Vec::new();
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            let mut chunk = [0u8; 4096];
            let n = conn.read(&mut chunk).await.unwrap();
            buf.extend_from_slice(&chunk[..n]);
        }
        let refusal = r#"{"error":{"message":"no","type":"invalid_request_error","param":null,"code":null}}"#;
        let answer = format!("HTTP/1.1 400 Bad Request\r\ncontent-length: {}\r\n\r\n{refusal}", refusal.len());
        conn.write_all(answer.as_bytes()).await.unwrap();
        // It reads no more, and neither closes (which, with the upload unread, would reset the connection and
        // could take the answer with it) nor lets go.
        std::future::pending::<()>().await;
        drop(conn);
    });
    let gw = Gw::start(
        Mock::ok_json().await,
        Opts { upstream_addr: Some(upstream_addr), max_body_bytes: 2 * UPLOAD as u64, ..Opts::default() },
    )
    .await;
    assert_eq!(&upload_first(gw.addr, UPLOAD).await, b"HTTP/1.1 400");
}

#[tokio::test]
async fn unreachable_upstream_is_502() {
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let gw = Gw::start(Mock::ok_json().await, Opts { upstream_addr: Some(closed), ..Opts::default() }).await;
    let res = gw.post("/v1/chat/completions", CHAT_KEY).body(CHAT_BODY).send().await.unwrap();
    assert_eq!(error_code(res).await, (502, "upstream_unreachable".into()));
}

#[tokio::test]
async fn no_response_head_in_time_is_504() {
    let mock = Mock::start(|_| async { std::future::pending().await }).await;
    let gw = Gw::start(mock, Opts { upstream: "response_timeout = \"300ms\"", ..Opts::default() }).await;
    let started = std::time::Instant::now();
    let res = gw.post("/v1/chat/completions", CHAT_KEY).body(CHAT_BODY).send().await.unwrap();
    assert_eq!(error_code(res).await, (504, "upstream_timeout".into()));
    assert!(started.elapsed() >= Duration::from_millis(300));
}

#[tokio::test]
async fn a_silent_stream_is_ended_after_the_idle_timeout() {
    let (mock, mut script_rx) = Mock::scripted().await;
    let gw = Gw::start(mock, Opts { upstream: "idle_timeout = \"300ms\"", ..Opts::default() }).await;
    let res = gw.post("/v1/chat/completions", CHAT_KEY).body(CHAT_BODY).send().await.unwrap();
    let script = script_rx.recv().await.unwrap();
    script.tx.send(Bytes::from_static(b"data: {}\n\n")).await.unwrap();
    let mut stream = res.bytes_stream();
    assert_eq!(stream.next().await.unwrap().unwrap(), &b"data: {}\n\n"[..]);
    // Upstream keeps the stream open and says nothing: the gateway ends it, as an error the client can see
    // (never as a clean end, which would pass a truncated answer off as complete).
    let end = tokio::time::timeout(WAIT, stream.next()).await.expect("silent stream was never ended");
    assert!(matches!(end, Some(Err(_))), "{end:?}");
    tokio::time::timeout(WAIT, script.dropped).await.expect("upstream still attached").unwrap();
}

#[tokio::test]
async fn a_stream_that_keeps_talking_outlives_the_idle_timeout() {
    // The idle timer is armed once and moved only when it fires: a stream whose events come well inside
    // the timeout, for several timeouts in all, must not be cut; the silence after its last event must be.
    let (mock, mut script_rx) = Mock::scripted().await;
    let gw = Gw::start(mock, Opts { upstream: "idle_timeout = \"500ms\"", ..Opts::default() }).await;
    let res = gw.post("/v1/chat/completions", CHAT_KEY).body(CHAT_BODY).send().await.unwrap();
    let script = script_rx.recv().await.unwrap();
    let mut stream = res.bytes_stream();
    let started = std::time::Instant::now();
    for i in 0..16 {
        let event = format!("data: {i}\n\n");
        script.tx.send(Bytes::from(event.clone())).await.unwrap();
        let got = tokio::time::timeout(WAIT, stream.next()).await.expect("event never arrived");
        assert_eq!(got.unwrap().unwrap(), event.as_bytes(), "event {i}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(started.elapsed() >= Duration::from_millis(1500), "the stream outlived three idle timeouts");
    let silent = std::time::Instant::now();
    let end = tokio::time::timeout(WAIT, stream.next()).await.expect("silent stream was never ended");
    assert!(matches!(end, Some(Err(_))), "{end:?}");
    // 100 ms of the silence had passed before the wait began.
    assert!(silent.elapsed() >= Duration::from_millis(350), "ended {:?} into the silence", silent.elapsed());
}

#[tokio::test]
async fn health_readiness_and_graceful_drain() {
    let (mock, mut script_rx) = Mock::scripted().await;
    let mut gw = Gw::start(mock, Opts::default()).await;
    let admin = |path: &str| format!("http://{}{path}", gw.admin);
    assert_eq!(gw.client.get(admin("/healthz")).send().await.unwrap().status(), 200);
    assert_eq!(gw.client.get(admin("/readyz")).send().await.unwrap().status(), 200);
    // Admin endpoints are not on the traffic port.
    assert_eq!(gw.client.get(gw.url("/healthz")).send().await.unwrap().status(), 404);

    // A stream in flight when shutdown starts runs to its end.
    let res = gw.post("/v1/chat/completions", CHAT_KEY).body(CHAT_BODY).send().await.unwrap();
    let script = script_rx.recv().await.unwrap();
    let running = gw.running.take().unwrap();
    running.shutdown.trigger();
    assert_eq!(gw.client.get(admin("/readyz")).send().await.unwrap().status(), 503);
    script.tx.send(Bytes::from_static(b"data: late\n\n")).await.unwrap();
    drop(script.tx);
    assert_eq!(res.bytes().await.unwrap(), &b"data: late\n\n"[..]);
    tokio::time::timeout(WAIT, running.stopped()).await.expect("gateway did not stop after the drain");
    assert!(tokio::net::TcpStream::connect(gw.addr).await.is_err(), "listener still accepting");
}

#[tokio::test]
async fn idle_connections_are_closed_as_soon_as_the_drain_starts() {
    // A grace far longer than the test may take: only closing idle keep-alive connections at once lets the
    // gateway stop in time.
    let mut gw =
        Gw::start(Mock::ok_json().await, Opts { grace: "60s", server: "workers = 2", ..Opts::default() }).await;
    let mut idle = Vec::new();
    for _ in 0..4 {
        // A client per connection, each left open and idle after its response.
        let client = reqwest::Client::new();
        let res = client.get(gw.url("/v1/models")).bearer_auth(CHAT_KEY).send().await.unwrap();
        assert_eq!(res.status(), 200);
        res.bytes().await.unwrap();
        idle.push(client);
    }
    let running = gw.running.take().unwrap();
    running.shutdown.trigger();
    tokio::time::timeout(WAIT, running.stopped()).await.expect("idle connections held the drain open");
}

#[tokio::test]
async fn the_drain_waits_for_streams_on_every_traffic_thread() {
    let (mock, mut script_rx) = Mock::scripted().await;
    let mut gw = Gw::start(mock, Opts { server: "workers = 4", ..Opts::default() }).await;
    // Streams on connections of their own, spread over the threads as they accept them.
    let mut streams = Vec::new();
    for _ in 0..8 {
        let client = reqwest::Client::new();
        let res =
            client.post(gw.url("/v1/chat/completions")).bearer_auth(CHAT_KEY).body(CHAT_BODY).send().await.unwrap();
        streams.push((res, script_rx.recv().await.unwrap()));
    }
    let running = gw.running.take().unwrap();
    running.shutdown.trigger();
    let mut stopped = Box::pin(running.stopped());
    let last = streams.len() - 1;
    for (i, (res, script)) in streams.into_iter().enumerate() {
        // Still draining: this stream has not ended. Before the last one, give a wrongly finished drain
        // (one that stopped waiting after the first thread) time to show.
        if i == last {
            let early = tokio::time::timeout(Duration::from_millis(300), stopped.as_mut()).await;
            assert!(early.is_err(), "stopped with a stream in flight");
        }
        assert!(stopped.as_mut().now_or_never().is_none(), "stopped with a stream in flight");
        script.tx.send(Bytes::from_static(b"data: late\n\n")).await.unwrap();
        drop(script.tx);
        assert_eq!(res.bytes().await.unwrap(), &b"data: late\n\n"[..]);
    }
    tokio::time::timeout(WAIT, stopped).await.expect("gateway did not stop after the drain");
    assert!(tokio::net::TcpStream::connect(gw.addr).await.is_err(), "listener still accepting");
}

#[tokio::test]
async fn client_going_away_before_the_response_head_drops_the_upstream_request() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A raw TCP upstream that reads the request, never answers, and reports when the gateway hangs up.
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = upstream.local_addr().unwrap();
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel();
    let (got_tx, got_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut conn, _) = upstream.accept().await.unwrap();
        let mut buf = vec![0u8; 8192];
        let mut got_tx = Some(got_tx);
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    if let Some(tx) = got_tx.take() {
                        let _ = tx.send(());
                    }
                }
            }
        }
        let _ = closed_tx.send(());
    });
    let gw = Gw::start(Mock::ok_json().await, Opts { upstream_addr: Some(upstream_addr), ..Opts::default() }).await;
    let mut client = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer {CHAT_KEY}\r\ncontent-length: {}\r\n\r\n{CHAT_BODY}",
        CHAT_BODY.len()
    );
    client.write_all(request.as_bytes()).await.unwrap();
    tokio::time::timeout(WAIT, got_rx).await.expect("request never reached upstream").unwrap();
    drop(client);
    tokio::time::timeout(WAIT, closed_rx).await.expect("upstream connection still open after the client left").unwrap();
}

/// A fresh, empty directory for one test.
fn fresh_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("mantlegate-forwarding-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The `Authorization` upstream receives for one chat request.
async fn upstream_authorization(gw: &Gw) -> String {
    let res = gw.post("/v1/chat/completions", CHAT_KEY).body(CHAT_BODY).send().await.unwrap();
    assert_eq!(res.status(), 200);
    gw.mock.next().await.header("authorization").unwrap().to_owned()
}

#[tokio::test]
async fn a_key_file_rotated_as_kubernetes_does_it_is_used_without_a_restart() {
    // A mounted Secret: `key -> ..data/key`, `..data -> ..<timestamp>`; an update writes a new timestamped
    // directory and renames a new `..data` symlink over the old one.
    let dir = fresh_dir("k8s-key");
    let version = |name: &str, key: &str| {
        std::fs::create_dir(dir.join(name)).unwrap();
        std::fs::write(dir.join(name).join("key"), key).unwrap();
        std::os::unix::fs::symlink(name, dir.join("..data_tmp")).unwrap();
        std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    };
    version("..2026_11_26_01", "key-one\n");
    std::os::unix::fs::symlink("..data/key", dir.join("key")).unwrap();
    let upstream = format!("api_key_file = \"{}\"", dir.join("key").display());
    let gw = Gw::start(Mock::ok_json().await, Opts { upstream: upstream.leak(), ..Opts::default() }).await;
    assert_eq!(upstream_authorization(&gw).await, "Bearer key-one");

    version("..2026_11_26_02", "key-two\n");
    std::fs::remove_dir_all(dir.join("..2026_11_26_01")).unwrap();
    let metrics = gw.metric_line("mantlegate_upstream_key_reloads_total{result=\"changed\"} 1").await;
    assert_eq!(upstream_authorization(&gw).await, "Bearer key-two");
    assert!(!metrics.contains("key-one") && !metrics.contains("key-two"));

    // A key that cannot be used (here: empty) leaves the last good one in use. (Each event in the directory
    // leads to a read, so the failures are counted more than once.)
    version("..2026_11_26_03", "");
    gw.metric_prefix("mantlegate_upstream_key_reloads_total{result=\"failed\"}").await;
    assert_eq!(upstream_authorization(&gw).await, "Bearer key-two");
    version("..2026_11_26_04", "key-three");
    gw.metric_line("mantlegate_upstream_key_reloads_total{result=\"changed\"} 2").await;
    assert_eq!(upstream_authorization(&gw).await, "Bearer key-three");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A gateway whose upstream key is read from a plain file holding `key-one`: the gateway, and the file.
async fn with_a_key_file(name: &str) -> (Gw, std::path::PathBuf) {
    let path = fresh_dir(name).join("api-key");
    std::fs::write(&path, "key-one").unwrap();
    let upstream = format!("api_key_file = \"{}\"", path.display());
    let gw = Gw::start(Mock::ok_json().await, Opts { upstream: upstream.leak(), ..Opts::default() }).await;
    assert_eq!(upstream_authorization(&gw).await, "Bearer key-one");
    (gw, path)
}

#[tokio::test]
async fn a_key_file_removed_is_counted_as_failed_and_its_key_stays_in_use() {
    let (gw, path) = with_a_key_file("removed-key").await;
    std::fs::remove_file(&path).unwrap();
    gw.metric_prefix("mantlegate_upstream_key_reloads_total{result=\"failed\"}").await;
    assert_eq!(upstream_authorization(&gw).await, "Bearer key-one");
    // Put back, it is used again.
    std::fs::write(&path, "key-two").unwrap();
    gw.metric_line("mantlegate_upstream_key_reloads_total{result=\"changed\"} 1").await;
    assert_eq!(upstream_authorization(&gw).await, "Bearer key-two");
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

#[tokio::test]
async fn a_key_file_edited_in_place_is_used_once_written() {
    let (gw, path) = with_a_key_file("edited-key").await;
    // Truncated, then written: the read waits for the writer to close the file, so no half-written key is
    // ever tried.
    std::fs::write(&path, "key-two\n").unwrap();
    gw.metric_line("mantlegate_upstream_key_reloads_total{result=\"changed\"} 1").await;
    assert_eq!(upstream_authorization(&gw).await, "Bearer key-two");
    assert!(!gw.metrics().await.contains("result=\"failed\""));
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

#[tokio::test]
async fn a_caller_that_sends_half_a_request_head_or_nothing_is_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let opts = Opts { server: "header_read_timeout = \"300ms\"", ..Opts::default() };
    let gw = Gw::start(Mock::ok_json().await, opts).await;
    // Connected and silent, half a head, and a whole request followed by silence on the kept-alive connection.
    let whole = raw_chat_request(CHAT_KEY);
    for sent in [String::new(), "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n".to_owned(), whole.clone()] {
        let mut tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        tcp.write_all(sent.as_bytes()).await.unwrap();
        let mut received = Vec::new();
        // The gateway closes the connection; without the timeout this read would wait for ever.
        tokio::time::timeout(WAIT, tcp.read_to_end(&mut received)).await.expect("connection closed").unwrap_or(0);
        let received = String::from_utf8_lossy(&received);
        if sent == whole {
            assert!(received.starts_with("HTTP/1.1 200"), "{received}");
        } else {
            assert!(!received.contains(" 200 "), "{received}");
        }
    }
    assert_eq!(gw.mock.hits(), 1, "only the whole request went upstream");
}

#[tokio::test]
async fn a_stream_may_outlast_the_header_read_timeout() {
    let (mock, mut script_rx) = Mock::scripted().await;
    let gw = Gw::start(mock, Opts { server: "header_read_timeout = \"200ms\"", ..Opts::default() }).await;
    let res = gw.post("/v1/chat/completions", CHAT_KEY).body(CHAT_BODY).send().await.unwrap();
    let script = script_rx.recv().await.unwrap();
    let mut stream = res.bytes_stream();
    script.tx.send(Bytes::from_static(b"data: {\"n\":0}\n\n")).await.unwrap();
    tokio::time::timeout(WAIT, stream.next()).await.unwrap().unwrap().unwrap();
    // Upstream is quiet for longer than the timeout; the timeout is for request heads only.
    tokio::time::sleep(Duration::from_millis(600)).await;
    script.tx.send(Bytes::from_static(b"data: {\"n\":1}\n\n")).await.unwrap();
    drop(script.tx);
    let rest: Vec<Bytes> = stream.map(|c| c.unwrap()).collect().await;
    assert_eq!(rest.concat(), b"data: {\"n\":1}\n\n");
}

#[tokio::test]
async fn a_request_in_absolute_form_goes_upstream_in_origin_form() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gw = Gw::start(Mock::ok_json().await, Opts::default()).await;
    let mut tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let target = "http://gateway.example:8080/v1/chat/completions?trace=1 ";
    let request = raw_chat_request(CHAT_KEY).replacen("/v1/chat/completions ", target, 1);
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut received = vec![0; 4096];
    let n = tokio::time::timeout(WAIT, tcp.read(&mut received)).await.expect("an answer").unwrap();
    let received = String::from_utf8_lossy(&received[..n]);
    assert!(received.starts_with("HTTP/1.1 200"), "{received}");
    let seen = gw.mock.next().await;
    assert_eq!((seen.uri.scheme(), seen.uri.authority()), (None, None));
    assert_eq!(seen.uri.path_and_query().unwrap().as_str(), "/v1/chat/completions?trace=1");
}

#[tokio::test]
async fn a_caller_that_never_finishes_a_body_read_whole_gets_a_504() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // The Search project has a model allowlist, so its request bodies are read whole before going upstream.
    let opts = Opts { upstream: "response_timeout = \"300ms\"", ..Opts::default() };
    let gw = Gw::start(Mock::ok_json().await, opts).await;
    let mut tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {SEARCH_KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"model\":"
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut received = vec![0; 4096];
    let n = tokio::time::timeout(WAIT, tcp.read(&mut received)).await.expect("an answer, not a wait").unwrap();
    let received = String::from_utf8_lossy(&received[..n]);
    assert!(received.starts_with("HTTP/1.1 504"), "{received}");
    assert!(received.contains("upstream_timeout"), "{received}");
    assert_eq!(gw.mock.hits(), 0);
}

#[tokio::test]
async fn past_max_connections_a_caller_waits_until_a_connection_closes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gw = Gw::start(Mock::ok_json().await, Opts { server: "max_connections = 1", ..Opts::default() }).await;
    let request = raw_chat_request(CHAT_KEY);
    let exchange = async |tcp: &mut tokio::net::TcpStream| {
        tcp.write_all(request.as_bytes()).await.unwrap();
        let mut head = vec![0; 4096];
        let n = tcp.read(&mut head).await.unwrap();
        String::from_utf8_lossy(&head[..n]).into_owned()
    };
    // The first connection is kept alive after its answer, so it holds the only place.
    let mut first = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    assert!(tokio::time::timeout(WAIT, exchange(&mut first)).await.unwrap().starts_with("HTTP/1.1 200"));
    let mut second = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let answer = exchange(&mut second);
    tokio::pin!(answer);
    // (A bounded wait for something that must not happen: it can only pass wrongly, never fail wrongly.)
    assert!(tokio::time::timeout(Duration::from_millis(300), &mut answer).await.is_err(), "served past the cap");
    assert_eq!(gw.mock.hits(), 1);
    drop(first);
    assert!(
        tokio::time::timeout(WAIT, answer).await.expect("served once a place was free").starts_with("HTTP/1.1 200")
    );
    assert_eq!(gw.mock.hits(), 2);
}

#[tokio::test]
async fn upstream_refusing_the_gateways_credential_is_the_gateways_error_not_the_callers() {
    use std::sync::atomic::{AtomicU16, Ordering};
    // An upstream whose answer the test sets: 401 as for a wrong or expired key, 403, or 200.
    let status = std::sync::Arc::new(AtomicU16::new(401));
    let mock = Mock::start({
        let status = status.clone();
        move |_| {
            let status = StatusCode::from_u16(status.load(Ordering::SeqCst)).unwrap();
            async move {
                let body = r#"{"error":{"message":"Incorrect API key provided: upstr***key","type":"invalid_request_error","code":"invalid_api_key"}}"#;
                json_response(status, if status.is_success() { r#"{"ok":true}"# } else { body })
            }
        }
    })
    .await;
    let gw = Gw::start(mock, Opts::default()).await;
    let ready = || async { gw.client.get(format!("http://{}/readyz", gw.admin)).send().await.unwrap() };
    for refusal in [401, 403] {
        status.store(refusal, Ordering::SeqCst);
        let res = gw.post("/v1/chat/completions", CHAT_KEY).body(CHAT_BODY).send().await.unwrap();
        assert_eq!(res.headers()["x-should-retry"], "false", "SDKs must not retry a refused credential");
        let body: serde_json::Value = res.json().await.unwrap();
        assert_eq!(body["error"]["code"], "upstream_auth_failed", "{refusal}: {body}");
        assert_eq!(body["error"]["type"], "api_error");
        assert!(!body.to_string().contains("invalid_api_key"), "the caller's SDK must not blame its own key");
    }
    gw.metric_line("mantlegate_upstream_auth_failures_total 2").await;
    // Ready all the same (every replica has the same credential), and saying so.
    let res = ready().await;
    assert_eq!(res.status(), 200);
    let text = res.text().await.unwrap();
    assert!(text.contains("upstream refused the gateway's credential (403)"), "{text}");
    // Accepted again: the warning goes.
    status.store(200, Ordering::SeqCst);
    assert_eq!(gw.post("/v1/chat/completions", CHAT_KEY).body(CHAT_BODY).send().await.unwrap().status(), 200);
    assert_eq!(ready().await.text().await.unwrap(), "ready\n");

    // With the caller's own credential passed through, a refusal is the caller's, and passes through unchanged.
    let mock =
        Mock::start(|_| async { json_response(StatusCode::UNAUTHORIZED, r#"{"error":{"code":"invalid_api_key"}}"#) })
            .await;
    let gw = Gw::start(
        mock,
        Opts {
            callers: "none",
            keys: false,
            upstream: "auth = \"passthrough\"",
            credential: Some(mantlegate::proxy::Credential::Passthrough),
            ..Opts::default()
        },
    )
    .await;
    let res = gw.post("/chatbot/v1/chat/completions", "callers-own-key").body(CHAT_BODY).send().await.unwrap();
    assert_eq!(error_code(res).await, (401, "invalid_api_key".into()));
}

/// An upstream 403: what upstream says in it, and what the caller must get.
struct Forbidden {
    errortype: Option<&'static str>,
    body: &'static str,
    credential: bool,
}

#[tokio::test]
async fn a_403_is_the_gateways_credential_refused_only_when_its_code_says_so() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    const CASES: &[Forbidden] = &[
        Forbidden {
            errortype: None,
            body: r#"{"error":{"message":"bad key","code":"invalid_api_key"}}"#,
            credential: true,
        },
        Forbidden {
            errortype: None,
            body: r#"{"type":"error","error":{"type":"authentication_error"}}"#,
            credential: true,
        },
        Forbidden {
            errortype: Some("UnrecognizedClientException:http://internal.amazon.com/coral/com.amazon.coral.service/"),
            body: r#"{"message":"The security token included in the request is invalid."}"#,
            credential: true,
        },
        Forbidden {
            errortype: None,
            body: r#"{"__type":"com.amazon.coral.service#ExpiredTokenException"}"#,
            credential: true,
        },
        Forbidden {
            errortype: None,
            body: r#"{"message":"no","__type":"InvalidSignatureException"}"#,
            credential: true,
        },
        Forbidden { errortype: Some("MissingAuthenticationTokenException"), body: "", credential: true },
        // What the credential may do, not the credential itself: upstream's answer to the caller, unchanged.
        Forbidden {
            errortype: None,
            body: r#"{"error":{"message":"You don't have access to the model with the specified model ID.","type":"permission_error","code":"AccessDeniedException"}}"#,
            credential: false,
        },
        Forbidden {
            errortype: Some("AccessDeniedException:http://internal.amazon.com/coral/com.amazon.coral.service/"),
            body: r#"{"Message":"User is not authorized to perform: bedrock:InvokeModel"}"#,
            credential: false,
        },
        Forbidden { errortype: None, body: "forbidden, in plain text", credential: false },
    ];
    let case = std::sync::Arc::new(AtomicUsize::new(0));
    let mock = Mock::start({
        let case = case.clone();
        move |_| {
            let case = &CASES[case.load(Ordering::SeqCst)];
            let mut res = (StatusCode::FORBIDDEN, case.body).into_response();
            if let Some(errortype) = case.errortype {
                res.headers_mut().insert("x-amzn-errortype", errortype.parse().unwrap());
            }
            res.headers_mut().insert("x-upstream-own", "kept".parse().unwrap());
            async move { res }
        }
    })
    .await;
    let gw = Gw::start(mock, Opts::default()).await;
    let mut refusals = 0;
    for (i, expected) in CASES.iter().enumerate() {
        case.store(i, Ordering::SeqCst);
        let res = gw.post("/v1/chat/completions", CHAT_KEY).body(CHAT_BODY).send().await.unwrap();
        if expected.credential {
            refusals += 1;
            assert_eq!(res.status(), 502, "{}", expected.body);
            let body: serde_json::Value = res.json().await.unwrap();
            assert_eq!(body["error"]["code"], "upstream_auth_failed", "{}", expected.body);
        } else {
            assert_eq!(res.status(), 403, "{}", expected.body);
            assert_eq!(res.headers()["x-upstream-own"], "kept");
            assert_eq!(res.headers().get("x-amzn-errortype").map(|v| v.to_str().unwrap()), expected.errortype);
            assert_eq!(res.text().await.unwrap(), expected.body, "passed on as upstream sent it");
        }
    }
    gw.metric_line(&format!("mantlegate_upstream_auth_failures_total {refusals}")).await;

    // With the caller's own credential passed through, every 403 is the caller's.
    case.store(0, Ordering::SeqCst);
    let mock_addr = gw.mock.addr;
    let gw = Gw::start(
        Mock::ok_json().await,
        Opts {
            callers: "none",
            keys: false,
            upstream: "auth = \"passthrough\"",
            credential: Some(mantlegate::proxy::Credential::Passthrough),
            upstream_addr: Some(mock_addr),
            ..Opts::default()
        },
    )
    .await;
    let res = gw.post("/chatbot/v1/chat/completions", "callers-own-key").body(CHAT_BODY).send().await.unwrap();
    assert_eq!(error_code(res).await, (403, "invalid_api_key".into()));
}

#[tokio::test]
async fn only_answers_that_show_the_credential_accepted_clear_the_refusal() {
    use std::sync::atomic::{AtomicU16, Ordering};
    let status = std::sync::Arc::new(AtomicU16::new(401));
    let mock = Mock::start({
        let status = status.clone();
        move |_| {
            let status = StatusCode::from_u16(status.load(Ordering::SeqCst)).unwrap();
            async move { json_response(status, r#"{"error":{"code":"some_code"}}"#) }
        }
    })
    .await;
    let gw = Gw::start(mock, Opts::default()).await;
    let readyz =
        || async { gw.client.get(format!("http://{}/readyz", gw.admin)).send().await.unwrap().text().await.unwrap() };
    assert_eq!(gw.post("/v1/chat/completions", CHAT_KEY).body(CHAT_BODY).send().await.unwrap().status(), 502);
    // A throttle, an outage, or a 403 that is not about the credential: nothing said about the credential.
    for said_nothing in [429, 500, 503, 403] {
        status.store(said_nothing, Ordering::SeqCst);
        let res = gw.post("/v1/chat/completions", CHAT_KEY).body(CHAT_BODY).send().await.unwrap();
        assert_eq!(res.status().as_u16(), said_nothing);
        assert!(readyz().await.contains("upstream refused the gateway's credential (401)"), "after {said_nothing}");
    }
    // A caller's error comes only past authentication.
    status.store(404, Ordering::SeqCst);
    assert_eq!(gw.post("/v1/chat/completions", CHAT_KEY).body(CHAT_BODY).send().await.unwrap().status(), 404);
    assert_eq!(readyz().await, "ready\n");
}

#[tokio::test]
async fn a_key_pasted_into_the_query_never_reaches_upstream_and_the_rest_of_the_query_does() {
    let gw = Gw::start(Mock::ok_json().await, Opts::default()).await;
    let path = "/chatbot/v1/responses/resp_1?include=a&api_key=PASTED-SECRET&X-Amz-Signature=sig&stream=true";
    let res = gw.get(path, CHAT_KEY).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let seen = gw.mock.next().await;
    assert_eq!(seen.uri.to_string(), "/v1/responses/resp_1?include=a&stream=true");
    let res = gw.get("/v1/models?key=PASTED-SECRET", CHAT_KEY).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(gw.mock.next().await.uri.to_string(), "/v1/models");
    // Other spellings, `;` as the separator, and a gateway key under any name.
    let gateway_key = format!("mg_{}", "0123456789abcdef".repeat(4));
    let path = format!("/v1/models?limit=2;apiKey=PASTED-SECRET;api_key[]=PASTED-SECRET&note={gateway_key}&order=asc");
    let res = gw.get(&path, CHAT_KEY).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(gw.mock.next().await.uri.to_string(), "/v1/models?limit=2&order=asc");
}
