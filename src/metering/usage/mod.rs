//! Reading token usage out of responses as they pass, without holding a byte back: non-streamed JSON bodies
//! (parsed once at the end, from reference-counted chunk handles, never a copy), and SSE streams line by line,
//! where only the few events that carry usage are parsed (a substring test screens out the rest).
//!
//! Chat Completions: the final usage chunk (`choices: []`, `usage`), then `data: [DONE]`.
//! Responses: `response.completed` / `response.incomplete` / `response.failed`, whose `response.usage` holds it.
//! Anthropic Messages: `message_start` (input, cache reads) and `message_delta` (cumulative output), then
//! `message_stop`.
//!
//! Here: the tap and what every dialect shares. `sse` cuts a stream into lines and events, `json` reads one
//! member of a JSON text without parsing the rest, `strip` takes the `"usage":null` members out of forwarded
//! events, and `chat`, `responses` and `messages` read each dialect's own shapes.

mod chat;
mod json;
mod messages;
mod responses;
mod sse;
mod strip;

use std::sync::LazyLock;

use bytes::{Bytes, BytesMut};
use memchr::memmem::Finder;
use serde::Deserialize;

use crate::endpoint::Endpoint;
use chat::{ChatBody, ChatUsage};
use json::{Member, USAGE_KEY, last_member_that_parses, member};
use messages::{AnthropicCounters, MessagesObject, MessagesUsage};
use responses::{ResponsesObject, ResponsesUsage};

/// Token counts of one request. `input` includes cached input, `output` includes reasoning.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// All input tokens, cached ones included.
    pub input: u64,
    /// All output tokens, reasoning included.
    pub output: u64,
    /// Input tokens served from the prompt cache.
    pub cached_input: u64,
    /// Output tokens spent on reasoning.
    pub reasoning: u64,
}

/// Which usage dialect a response speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// Chat Completions.
    Chat,
    /// Responses API (create).
    Responses,
    /// Anthropic Messages.
    Messages,
}

impl Dialect {
    /// The dialect of an endpoint whose responses carry billable usage. Retrieving a stored response repeats
    /// its usage, so only creation is metered.
    pub fn of(endpoint: Endpoint) -> Option<Self> {
        match endpoint {
            Endpoint::ChatCompletions => Some(Self::Chat),
            Endpoint::ResponsesCreate => Some(Self::Responses),
            Endpoint::Messages => Some(Self::Messages),
            Endpoint::ResponsesGet
            | Endpoint::ResponsesDelete
            | Endpoint::ResponsesCancel
            | Endpoint::ModelsList
            | Endpoint::ModelsGet => None,
        }
    }
}

/// The byte strings the tap looks for, each with its searcher built once.
struct Needles {
    usage: Finder<'static>,
    model: Finder<'static>,
    kind: Finder<'static>,
    completed: Finder<'static>,
    incomplete: Finder<'static>,
    failed: Finder<'static>,
    created: Finder<'static>,
    message_start: Finder<'static>,
    message_delta: Finder<'static>,
    message_stop: Finder<'static>,
}

static NEEDLES: LazyLock<Needles> = LazyLock::new(|| Needles {
    usage: Finder::new(USAGE_KEY),
    model: Finder::new(b"\"model\""),
    kind: Finder::new(b"\"type\""),
    completed: Finder::new(b"response.completed"),
    incomplete: Finder::new(b"response.incomplete"),
    failed: Finder::new(b"response.failed"),
    created: Finder::new(b"response.created"),
    message_start: Finder::new(b"\"message_start\""),
    message_delta: Finder::new(b"\"message_delta\""),
    message_stop: Finder::new(b"\"message_stop\""),
});

/// Largest non-streamed JSON body kept whole for parsing; a bigger one keeps only its start and end.
const MAX_JSON_BODY: usize = 8 * 1024 * 1024;
/// Of a bigger body: how much of its start (the model) and of its end (the usage) is kept.
const LONG_BODY_KEPT: usize = 64 * 1024;
/// Longest SSE line kept whole while waiting for its end; longer ones keep only their start and end.
const MAX_SSE_LINE: usize = 1024 * 1024;
/// Of a longer line: how much of its start is kept (enough for the event type).
const LONG_LINE_HEAD: usize = 512;
/// Largest buffer for rewritten frames kept between chunks.
const MAX_KEPT_OUT: usize = 64 * 1024;
/// Of a longer line: how much of its end is kept (enough for the usage that ends a Responses event).
const LONG_LINE_TAIL: usize = 64 * 1024;

/// Watches one response body for usage.
#[derive(Debug)]
pub struct UsageTap {
    dialect: Dialect,
    state: State,
    usage: Option<Usage>,
    model: Option<String>,
    /// Whether a stream reached its protocol end (`[DONE]`, a terminal Responses event, `message_stop`).
    finished: bool,
    /// The gateway asked for usage on the client's behalf: hide the usage-only chunk (and the `usage: null`
    /// fields that asking adds) from the client.
    strip_usage: bool,
    /// Whether everything forwarded so far ends on an event boundary (a blank line).
    boundary: bool,
    /// The start of a line too long to keep whole, while its end is still arriving.
    long_line_head: Option<Vec<u8>>,
    /// Whether the model still has to be read from the response (it is known when the request was read).
    need_model: bool,
    /// Where the lines of the event being filtered end (kept to reuse its allocation).
    line_ends: Vec<usize>,
    /// What rewritten frames are cut from (kept to reuse its allocation).
    out: BytesMut,
    anthropic: AnthropicCounters,
}

/// What one SSE line showed about usage.
#[derive(Debug, Default, Clone, Copy)]
struct LineSeen {
    /// It is the usage-only chat chunk (no choices).
    usage_only: bool,
    /// Where in the line it first names a `"usage"` member, perhaps `null`.
    usage_at: Option<usize>,
    /// How many times it names one, counted up to 2.
    usage_count: u8,
}

#[derive(Debug)]
enum State {
    /// A JSON body's chunks (reference-counted handles, not copies): the first apart, since most bodies
    /// arrive in one piece and then need no list.
    Json { first: Bytes, more: Vec<Bytes>, len: usize },
    /// A JSON body too big to keep whole: its start, and its end so far.
    LongJson { head: Vec<u8>, tail: BytesMut },
    /// `pending` holds what has arrived of the current line (or, when stripping, of the current event).
    Sse { pending: BytesMut },
}

impl UsageTap {
    /// A tap for a JSON body.
    pub fn json(dialect: Dialect) -> Self {
        Self::new(dialect, State::Json { first: Bytes::new(), more: Vec::new(), len: 0 }, false)
    }

    /// A tap for an SSE body; `strip_usage` when the gateway added `include_usage` itself.
    pub fn sse(dialect: Dialect, strip_usage: bool) -> Self {
        Self::new(dialect, State::Sse { pending: BytesMut::new() }, strip_usage)
    }

    fn new(dialect: Dialect, state: State, strip_usage: bool) -> Self {
        Self {
            dialect,
            state,
            usage: None,
            model: None,
            finished: false,
            strip_usage,
            need_model: true,
            boundary: true,
            long_line_head: None,
            line_ends: Vec::new(),
            out: BytesMut::new(),
            anthropic: AnthropicCounters::default(),
        }
    }

    /// The request named the model already: do not parse a stream's first event just to learn it.
    pub fn model_known(mut self) -> Self {
        self.need_model = false;
        self
    }

    /// Whether the tap changes what is forwarded (so the body's length is no longer upstream's).
    pub fn rewrites(&self) -> bool {
        self.strip_usage
    }

    /// Usage seen so far.
    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    /// Whether the usage seen is the response's final count, not the start of an Anthropic stream's.
    pub fn usage_final(&self) -> bool {
        self.usage.is_some() && (self.dialect != Dialect::Messages || self.anthropic.settled)
    }

    /// The model the response names.
    pub fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }

    /// A stream whose end marker has passed and whose last event is complete: the client is owed nothing
    /// more, even if upstream keeps the connection open.
    pub fn stream_over(&self) -> bool {
        self.finished && self.boundary && matches!(&self.state, State::Sse { pending } if pending.is_empty())
    }

    /// Whether the protocol's own end marker was seen (always true for JSON once [`Self::finish`] ran).
    pub fn finished(&self) -> bool {
        self.finished
    }

    /// Observes a chunk and returns what to forward: the chunk itself, unless usage chunks are being stripped,
    /// in which case whole events are forwarded as they complete.
    pub fn on_chunk(&mut self, chunk: Bytes) -> Bytes {
        match &mut self.state {
            State::Json { first, more, len } => {
                *len += chunk.len();
                if *len > MAX_JSON_BODY {
                    // Too big to keep whole: keep its start and, from here on, its end.
                    let total = *len;
                    let (mut head, mut tail, mut at) = (Vec::with_capacity(LONG_BODY_KEPT), BytesMut::new(), 0);
                    for piece in std::iter::once(&*first).chain(more.iter()).chain(std::iter::once(&chunk)) {
                        let room = LONG_BODY_KEPT - head.len();
                        head.extend_from_slice(&piece[..piece.len().min(room)]);
                        let skip = total.saturating_sub(LONG_BODY_KEPT).saturating_sub(at).min(piece.len());
                        tail.extend_from_slice(&piece[skip..]);
                        at += piece.len();
                    }
                    self.state = State::LongJson { head, tail };
                } else if first.is_empty() {
                    *first = chunk.clone();
                } else if !chunk.is_empty() {
                    more.push(chunk.clone());
                }
                chunk
            }
            State::LongJson { tail, .. } => {
                tail.extend_from_slice(&chunk);
                if tail.len() > 2 * LONG_BODY_KEPT {
                    let excess = tail.len() - LONG_BODY_KEPT;
                    bytes::Buf::advance(tail, excess);
                }
                chunk
            }
            State::Sse { .. } if self.strip_usage => self.filter_events(chunk),
            State::Sse { .. } => {
                self.scan_lines(&chunk);
                chunk
            }
        }
    }

    /// The body ended: parse a JSON body. Returns what is still held back (only a partial last SSE event
    /// when stripping).
    pub fn finish(&mut self) -> Bytes {
        match &mut self.state {
            State::Json { first, more, len } => {
                let (first, more) = (std::mem::take(first), std::mem::take(more));
                if more.is_empty() {
                    // Most bodies arrive in one piece: parse it where it is.
                    self.read_json_body(&first);
                } else {
                    let mut whole = Vec::with_capacity(*len);
                    whole.extend_from_slice(&first);
                    more.iter().for_each(|chunk| whole.extend_from_slice(chunk));
                    self.read_json_body(&whole);
                }
                self.finished = true;
                Bytes::new()
            }
            State::LongJson { head, tail } => {
                let (head, tail) = (std::mem::take(head), std::mem::take(tail));
                self.read_long_json_body(&head, &tail);
                self.finished = true;
                Bytes::new()
            }
            State::Sse { pending } => {
                let rest = std::mem::take(pending).freeze();
                if self.strip_usage {
                    rest
                } else {
                    self.read_line(&rest);
                    Bytes::new()
                }
            }
        }
    }

    /// Reads one SSE line. Nothing after the stream's end marker counts (the gateway ends the stream there),
    /// though a usage chunk in what is forwarded with it is still hidden when the gateway asked for it.
    fn read_line(&mut self, line: &[u8]) -> LineSeen {
        let counting = !self.finished;
        if !counting && self.dialect != Dialect::Chat {
            return LineSeen::default();
        }
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(data) = line.strip_prefix(b"data:") else { return LineSeen::default() };
        let data = data.strip_prefix(b" ").unwrap_or(data);
        match self.dialect {
            Dialect::Chat => self.read_chat_data(line, data, counting),
            Dialect::Responses => self.read_responses_data(data),
            Dialect::Messages => self.read_messages_data(data),
        }
    }

    /// The usage member of a JSON body, in this dialect's shape (an Anthropic one added to what was counted).
    fn usage_member(&mut self, body: &[u8], pick: Pick) -> Option<Usage> {
        fn read<'a, T: Deserialize<'a>>(body: &'a [u8], pick: Pick) -> Option<T> {
            match pick {
                Pick::Last => member(body, Member::LastUsage),
                Pick::LastThatParses => last_member_that_parses(body),
            }
        }
        match self.dialect {
            Dialect::Chat => read::<ChatUsage>(body, pick).and_then(ChatUsage::counted),
            Dialect::Responses => read::<ResponsesUsage>(body, pick).and_then(ResponsesUsage::counted),
            Dialect::Messages => read::<MessagesUsage>(body, pick).and_then(|u| {
                self.anthropic.apply(Some(u), true);
                self.anthropic.usage()
            }),
        }
    }

    /// Reads usage and model from a JSON body too big to keep whole, from its start and its end: usage is the
    /// last `"usage"` member that parses, the model the first `"model"` member (in a Responses object it may
    /// come after megabytes of instructions, beyond the start kept: the request is then recorded unpriced).
    fn read_long_json_body(&mut self, head: &[u8], tail: &[u8]) {
        self.usage = self.usage_member(tail, Pick::LastThatParses).or(self.usage);
        if self.need_model && self.model.is_none() {
            self.model = member::<String>(head, Member::FirstModel);
        }
    }

    /// Reads usage and model from a whole JSON body. Usage is the body's last `"usage"` member and model its
    /// first `"model"` member in every dialect, so only those two values are parsed; should that ever not
    /// hold, the whole body is parsed instead.
    fn read_json_body(&mut self, body: &[u8]) {
        let usage = self.usage_member(body, Pick::Last);
        if usage.is_some() {
            self.usage = usage;
            if self.need_model {
                self.model = member::<String>(body, Member::FirstModel);
            }
            return;
        }
        match self.dialect {
            Dialect::Chat => {
                if let Ok(b) = serde_json::from_slice::<ChatBody>(body) {
                    self.model = b.model;
                    self.usage = b.usage.and_then(ChatUsage::counted);
                }
            }
            Dialect::Responses => {
                if let Ok(r) = serde_json::from_slice::<ResponsesObject>(body) {
                    self.model = r.model;
                    self.usage = r.usage.and_then(ResponsesUsage::counted);
                }
            }
            Dialect::Messages => {
                if let Ok(m) = serde_json::from_slice::<MessagesObject>(body) {
                    self.model = m.model;
                    self.anthropic.apply(m.usage, true);
                    self.usage = self.anthropic.usage();
                }
            }
        }
    }
}

/// Which `"usage"` member of a JSON body is read.
#[derive(Clone, Copy)]
enum Pick {
    /// The last one (a whole body falls back to a whole parse should it not parse).
    Last,
    /// The last one that parses (a body's end, which has nothing to fall back to).
    LastThatParses,
}

#[derive(Deserialize)]
struct CachedDetails {
    #[serde(default)]
    cached_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct ReasoningDetails {
    #[serde(default)]
    reasoning_tokens: Option<u64>,
}

/// Usage from a usage object's members, if it counts anything: `{}`, or another dialect's names, is no usage.
fn counted(
    input: Option<u64>,
    output: Option<u64>,
    cached: Option<CachedDetails>,
    reasoning: Option<ReasoningDetails>,
) -> Option<Usage> {
    (input.is_some() || output.is_some()).then(|| Usage {
        input: input.unwrap_or(0),
        output: output.unwrap_or(0),
        cached_input: cached.and_then(|d| d.cached_tokens).unwrap_or(0),
        reasoning: reasoning.and_then(|d| d.reasoning_tokens).unwrap_or(0),
    })
}

/// What the tests of several submodules share.
#[cfg(test)]
mod testing {
    use bytes::Bytes;

    use super::UsageTap;

    /// Feeds `body` in chunks of `size` and returns what was forwarded.
    pub(super) fn run(tap: &mut UsageTap, body: &[u8], size: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for chunk in body.chunks(size) {
            out.extend_from_slice(&tap.on_chunk(Bytes::copy_from_slice(chunk)));
        }
        out.extend_from_slice(&tap.finish());
        out
    }

    pub(super) const CHAT_STREAM: &str = concat!(
        "data: {\"id\":\"c\",\"model\":\"openai.gpt-oss-120b\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n",
        "data: {\"id\":\"c\",\"model\":\"openai.gpt-oss-120b\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n",
        "data: {\"id\":\"c\",\"model\":\"openai.gpt-oss-120b\",\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":7,",
        "\"prompt_tokens_details\":{\"cached_tokens\":4},\"completion_tokens_details\":{\"reasoning_tokens\":3}}}\n\n",
        "data: [DONE]\n\n",
    );
}

#[cfg(test)]
mod tests {
    use super::testing::run;
    use super::*;

    #[test]
    fn a_usage_object_that_counts_nothing_is_no_usage() {
        for (dialect, body) in [
            (Dialect::Chat, r#"{"model":"m","usage":{"input_tokens":10,"output_tokens":5}}"#),
            (Dialect::Chat, r#"{"model":"m","usage":{}}"#),
            (Dialect::Responses, r#"{"model":"m","usage":{"prompt_tokens":10,"completion_tokens":5}}"#),
            (Dialect::Messages, r#"{"model":"m","usage":{}}"#),
        ] {
            let mut tap = UsageTap::json(dialect);
            run(&mut tap, body.as_bytes(), 64);
            assert_eq!(tap.usage(), None, "{dialect:?} {body}");
            assert!(tap.finished() && !tap.usage_final());
        }
        let completed = "data: {\"type\":\"response.completed\",\"response\":{\"usage\":{}}}\n\n";
        let mut tap = UsageTap::sse(Dialect::Responses, false);
        run(&mut tap, completed.as_bytes(), 16);
        assert!(tap.finished(), "the stream still ends at its terminal event");
        assert_eq!(tap.usage(), None);
        // One count is enough to be usage.
        let mut tap = UsageTap::json(Dialect::Chat);
        run(&mut tap, br#"{"usage":{"completion_tokens":5}}"#, 64);
        assert_eq!(tap.usage().map(|u| (u.input, u.output)), Some((0, 5)));
    }

    #[test]
    fn nothing_after_the_end_marker_counts() {
        let usage =
            |n| format!("data: {{\"choices\":[],\"usage\":{{\"prompt_tokens\":{n},\"completion_tokens\":{n}}}}}\n\n");
        let done = "data: [DONE]\n\n";
        let stop = "data: {\"type\":\"message_stop\"}\n\n";
        let delta = |n| format!("data: {{\"type\":\"message_delta\",\"usage\":{{\"output_tokens\":{n}}}}}\n\n");
        let completed = |n| {
            format!(
                "data: {{\"type\":\"response.completed\",\"response\":{{\"usage\":{{\"input_tokens\":{n},\"output_tokens\":{n}}}}}}}\n\n"
            )
        };
        for (dialect, body) in [
            (Dialect::Chat, format!("{}{done}{}", usage(2), usage(9))),
            (Dialect::Messages, format!("{}{stop}{}", delta(2), delta(9))),
            (Dialect::Responses, format!("{}{}", completed(2), completed(9))),
        ] {
            // All in one network chunk, as an upstream that keeps talking after its end marker might send it.
            let mut tap = UsageTap::sse(dialect, false);
            run(&mut tap, body.as_bytes(), body.len());
            assert_eq!(tap.usage().map(|u| u.output), Some(2), "{dialect:?}");
            assert!(tap.finished());
        }
    }

    #[test]
    fn a_json_body_too_big_to_keep_is_read_from_its_start_and_end() {
        let logprobs = "{\"token\":\"x\",\"logprob\":-0.1},".repeat(300_000);
        let body = format!(
            "{{\"id\":\"c\",\"model\":\"openai.gpt-oss-120b\",\"choices\":[{{\"logprobs\":{{\"content\":[{logprobs}{{}}]}}}}],\
             \"usage\":{{\"prompt_tokens\":1000,\"completion_tokens\":150000}}}}"
        );
        assert!(body.len() > MAX_JSON_BODY);
        for chunk in [64 * 1024, 1024 * 1024 + 7, body.len()] {
            let mut tap = UsageTap::json(Dialect::Chat);
            let out = run(&mut tap, body.as_bytes(), chunk);
            assert_eq!(out.len(), body.len(), "forwarded untouched");
            assert_eq!(tap.usage().map(|u| (u.input, u.output)), Some((1000, 150_000)), "chunks of {chunk}");
            assert_eq!(tap.model(), Some("openai.gpt-oss-120b"));
            assert!(matches!(&tap.state, State::LongJson { head, tail } if head.is_empty() && tail.is_empty()));
        }
    }

    #[test]
    fn json_bodies() {
        let cases = [
            (
                Dialect::Chat,
                r#"{"model":"openai.gpt-oss-20b","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":6,"total_tokens":11}}"#,
                Usage { input: 5, output: 6, cached_input: 0, reasoning: 0 },
            ),
            (
                Dialect::Responses,
                r#"{"model":"m","output":[],"usage":{"input_tokens":8,"output_tokens":2,"input_tokens_details":{"cached_tokens":1}}}"#,
                Usage { input: 8, output: 2, cached_input: 1, reasoning: 0 },
            ),
            (
                Dialect::Messages,
                r#"{"model":"m","content":[],"usage":{"input_tokens":3,"output_tokens":4,"cache_read_input_tokens":10}}"#,
                Usage { input: 13, output: 4, cached_input: 10, reasoning: 0 },
            ),
        ];
        // In pieces, and in one piece (read where it lies).
        for ((dialect, body, usage), size) in cases.into_iter().flat_map(|case| [(case, 7), (case, case.1.len())]) {
            let mut tap = UsageTap::json(dialect);
            assert_eq!(run(&mut tap, body.as_bytes(), size), body.as_bytes());
            assert_eq!(tap.usage(), Some(usage), "{dialect:?} in pieces of {size}");
            assert!(tap.model().is_some_and(|m| body.contains(&format!("\"model\":\"{m}\""))), "{dialect:?}");
        }
        let mut tap = UsageTap::json(Dialect::Chat);
        run(&mut tap, b"{\"truncated", 4);
        assert_eq!(tap.usage(), None);
        // Member order is not fixed by JSON: usage first, model last, still read.
        let mut tap = UsageTap::json(Dialect::Chat);
        run(&mut tap, br#"{"usage":{"prompt_tokens":1,"completion_tokens":2},"choices":[{"message":{"content":"\"usage\": {}"}}],"model":"m"}"#, 5);
        assert_eq!((tap.usage().map(|u| (u.input, u.output)), tap.model()), (Some((1, 2)), Some("m")));
        // A null usage is no usage.
        let mut tap = UsageTap::json(Dialect::Chat);
        run(&mut tap, br#"{"model":"m","usage":null}"#, 64);
        assert_eq!(tap.usage(), None);
    }
}
