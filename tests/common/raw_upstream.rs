//! A scriptable raw-TCP upstream on 127.0.0.1:0, for fault injection. It reads each request whole (head, and a
//! `content-length` or chunked body), asks the script what to do with it, and does it byte for byte: sends some
//! bytes (a whole response, part of one, garbage, a huge head, a stream without its end, or nothing at all),
//! then holds the connection, closes it, resets it or floods it. A held connection can be reset on cue, and
//! connections can be refused (reset) as they are accepted. Everything each connection received is kept, with
//! whether the gateway hung up on it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

/// What the upstream does with a request it has read: sends `send`, then `then`.
#[derive(Debug, Clone)]
pub struct Act {
    pub send: Vec<u8>,
    pub then: Then,
}

/// What the upstream does once it has sent its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Then {
    /// Holds the connection open and silent until the gateway hangs up (or [`RawUpstream::reset`]).
    Hold,
    /// Closes its side (which ends a body delimited by the connection's end), then waits for the gateway to
    /// close its own.
    Close,
    /// Resets the connection.
    Reset,
    /// Sends 16 KiB stream events, as fast as the gateway takes them, until the gateway hangs up.
    Flood,
}

impl Act {
    pub fn new(send: impl Into<Vec<u8>>, then: Then) -> Self {
        Self { send: send.into(), then }
    }
}

/// A whole `200` JSON response; upstream closes the connection after it.
pub fn ok_json(body: &str) -> Act {
    let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close";
    Act::new(format!("{head}\r\ncontent-length: {}\r\n\r\n{body}", body.len()), Then::Close)
}

/// The head of a `200` event stream whose body ends with the connection, followed by `events`.
pub fn sse(events: &[String]) -> Vec<u8> {
    let mut bytes = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n".to_vec();
    bytes.extend(events.concat().into_bytes());
    bytes
}

/// A `200` head of exactly `len` bytes (status line to the blank line that ends it, padded by one header), and
/// a two-byte body.
pub fn head_of(len: usize) -> Vec<u8> {
    let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\nx-big: ";
    format!("{head}{}\r\n\r\n{{}}", "a".repeat(len - head.len() - 4)).into_bytes()
}

/// One connection, as the upstream saw it.
#[derive(Debug, Default, Clone)]
pub struct Conn {
    /// Every byte the gateway sent on it.
    pub received: Vec<u8>,
    /// The head of each whole request read on it.
    pub requests: Vec<String>,
    /// Reset as it was accepted ([`RawUpstream::refuse`]).
    pub refused: bool,
    /// The gateway closed (or reset) its end while the upstream was reading.
    pub hung_up: bool,
    /// Resets the connection while it is held.
    cue: Arc<Notify>,
}

impl Conn {
    /// Whether a request on this connection carried `x-request-id: id`.
    pub fn carries(&self, id: &str) -> bool {
        self.request(id).is_some()
    }

    /// The head of the request on this connection that carried `x-request-id: id`.
    pub fn request(&self, id: &str) -> Option<&str> {
        self.requests.iter().map(String::as_str).find(|head| header(head, "x-request-id") == Some(id))
    }
}

/// The value of header `name` in a request or response head (the first, if repeated).
pub fn header<'h>(head: &'h str, name: &str) -> Option<&'h str> {
    head.split("\r\n").skip(1).find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.eq_ignore_ascii_case(name).then_some(v.trim())
    })
}

type Script = dyn Fn(&str) -> Act + Send + Sync;

/// The upstream. `script` is given each request's head and says what to do.
pub struct RawUpstream {
    pub addr: SocketAddr,
    conns: Arc<Mutex<Vec<Conn>>>,
    refuse: Arc<AtomicUsize>,
}

impl RawUpstream {
    pub async fn start(script: impl Fn(&str) -> Act + Send + Sync + 'static) -> Arc<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let conns = Arc::new(Mutex::new(Vec::new()));
        let refuse = Arc::new(AtomicUsize::new(0));
        let script: Arc<Script> = Arc::new(script);
        tokio::spawn({
            let (conns, refuse) = (conns.clone(), refuse.clone());
            async move {
                loop {
                    let (tcp, _) = listener.accept().await.unwrap();
                    let refused = refuse.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok();
                    let (n, cue) = {
                        let mut conns = conns.lock().unwrap();
                        conns.push(Conn { refused, ..Conn::default() });
                        (conns.len() - 1, conns[conns.len() - 1].cue.clone())
                    };
                    if refused {
                        reset(tcp);
                        continue;
                    }
                    // Each write goes out at once, as a real upstream's stream events do.
                    tcp.set_nodelay(true).unwrap();
                    tokio::spawn(serve(tcp, n, cue, conns.clone(), script.clone()));
                }
            }
        });
        Arc::new(Self { addr, conns, refuse })
    }

    /// Resets the next `n` connections as they are accepted, before reading anything.
    pub fn refuse(&self, n: usize) {
        self.refuse.store(n, Ordering::SeqCst);
    }

    /// Resets the connection that carried request `id` (once the upstream holds it).
    pub fn reset(&self, id: &str) {
        let conns = self.conns();
        conns.iter().find(|c| c.carries(id)).expect("no such request").cue.notify_one();
    }

    /// Every connection so far, in the order they were accepted.
    pub fn conns(&self) -> Vec<Conn> {
        self.conns.lock().unwrap().clone()
    }

    /// The connection that carried the request with `x-request-id: id`, once the upstream has read it whole.
    pub async fn request(&self, id: &str) -> Conn {
        super::eventually(&format!("upstream never read request {id}"), || {
            self.conns().into_iter().find(|c| c.carries(id))
        })
        .await
    }

    /// The connection that carried request `id`, once the gateway has hung up on it.
    pub async fn hung_up(&self, id: &str) -> Conn {
        super::eventually(&format!("the gateway never hung up on the upstream connection of {id}"), || {
            self.conns().into_iter().find(|c| c.carries(id) && c.hung_up)
        })
        .await
    }

    /// Every byte the upstream has received, on every connection.
    pub fn all_received(&self) -> Vec<u8> {
        self.conns().into_iter().flat_map(|c| c.received).collect()
    }
}

/// Closes `tcp` with a reset rather than a clean close. What was written before has left already (every write
/// is sent at once, and on loopback a small one is in the gateway's receive queue when it returns), and Linux
/// lets the gateway read what it had received before it sees the reset.
fn reset(tcp: TcpStream) {
    tcp.set_zero_linger().unwrap();
    drop(tcp);
}

async fn serve(mut tcp: TcpStream, n: usize, cue: Arc<Notify>, conns: Arc<Mutex<Vec<Conn>>>, script: Arc<Script>) {
    let mut buf = Vec::new();
    loop {
        // Everything buffered that makes a whole request is answered first.
        if let Some(len) = request_len(&buf) {
            let head_end = find(&buf, b"\r\n\r\n").unwrap() + 4;
            let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
            buf.drain(..len);
            conns.lock().unwrap()[n].requests.push(head.clone());
            let Act { send, then } = script(&head);
            // Write errors are the gateway hanging up, which the read that follows sees.
            let _ = tcp.write_all(&send).await;
            match then {
                Then::Hold => {}
                Then::Close => drop(tcp.shutdown().await),
                Then::Reset => return reset(tcp),
                Then::Flood => {
                    let event = format!("data: {}\n\n", "x".repeat(16 * 1024));
                    while tcp.write_all(event.as_bytes()).await.is_ok() {}
                }
            }
            continue;
        }
        let mut chunk = [0u8; 16 * 1024];
        let read = tokio::select! {
            read = tcp.read(&mut chunk) => read,
            () = cue.notified() => return reset(tcp),
        };
        match read {
            Ok(0) | Err(_) => break,
            Ok(k) => {
                conns.lock().unwrap()[n].received.extend_from_slice(&chunk[..k]);
                buf.extend_from_slice(&chunk[..k]);
            }
        }
    }
    conns.lock().unwrap()[n].hung_up = true;
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The length of the whole request at the start of `buf`, once it is all there.
fn request_len(buf: &[u8]) -> Option<usize> {
    let head_end = find(buf, b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&buf[..head_end]);
    if header(&head, "transfer-encoding").is_some_and(|te| te.eq_ignore_ascii_case("chunked")) {
        // Chunks: a hex size line, that many bytes and CRLF, until the zero-size chunk and its (empty) trailer.
        let mut at = head_end;
        loop {
            let line_end = at + find(&buf[at..], b"\r\n")?;
            let size_text = String::from_utf8_lossy(&buf[at..line_end]);
            let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16).ok()?;
            at = line_end + 2;
            if size == 0 {
                return Some(at + find(&buf[at..], b"\r\n")? + 2);
            }
            at += size + 2;
            if at > buf.len() {
                return None;
            }
        }
    }
    // (A length the gateway passed on as the caller spelled it, `5, 5`, counts once.)
    let length = header(&head, "content-length").map_or(0, |v| v.split(',').next().unwrap().trim().parse().unwrap());
    (buf.len() >= head_end + length).then_some(head_end + length)
}
