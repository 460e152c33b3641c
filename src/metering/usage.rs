//! Reading token usage out of responses as they pass, without holding a byte back: non-streamed JSON bodies
//! (parsed once at the end, from reference-counted chunk handles, never a copy), and SSE streams line by line,
//! where only the few events that carry usage are parsed (a substring test screens out the rest).
//!
//! Chat Completions: the final usage chunk (`choices: []`, `usage`), then `data: [DONE]`.
//! Responses: `response.completed` / `response.incomplete` / `response.failed`, whose `response.usage` holds it.
//! Anthropic Messages: `message_start` (input, cache reads) and `message_delta` (cumulative output), then
//! `message_stop`.

use std::sync::LazyLock;

use bytes::{Bytes, BytesMut};
use memchr::memmem::Finder;
use serde::Deserialize;

use crate::endpoint::Endpoint;

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

/// The key of a usage member.
const USAGE_KEY: &[u8] = b"\"usage\"";

/// The byte strings the tap looks for, each with its searcher built once.
struct Needles {
    usage: Finder<'static>,
    model: Finder<'static>,
    choices: Finder<'static>,
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
    choices: Finder::new(b"\"choices\""),
    kind: Finder::new(b"\"type\""),
    completed: Finder::new(b"response.completed"),
    incomplete: Finder::new(b"response.incomplete"),
    failed: Finder::new(b"response.failed"),
    created: Finder::new(b"response.created"),
    message_start: Finder::new(b"\"message_start\""),
    message_delta: Finder::new(b"\"message_delta\""),
    message_stop: Finder::new(b"\"message_stop\""),
});

/// How `data` mentions `"usage"` members.
#[derive(Debug, Default, Clone, Copy)]
struct UsageMentions {
    /// Where the first is.
    first: Option<usize>,
    /// How many there are, counted up to 2.
    count: u8,
    /// Whether one holds an object (not `null`).
    object: bool,
}

/// Where and how often `data` names `"usage"`, and whether one of those members holds an object.
fn usage_mentions(data: &[u8]) -> UsageMentions {
    let first = NEEDLES.usage.find(data);
    let mut seen = UsageMentions { first, count: 0, object: false };
    let mut next = first;
    while let Some(at) = next {
        seen.count = (seen.count + 1).min(2);
        let from = at + USAGE_KEY.len();
        let value = data[from..].trim_ascii_start().strip_prefix(b":").map(<[u8]>::trim_ascii_start);
        seen.object |= value.is_some_and(|v| v.starts_with(b"{"));
        if seen.object && seen.count == 2 {
            break;
        }
        next = NEEDLES.usage.find(&data[from..]).map(|n| from + n);
    }
    seen
}

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

    fn scan_lines(&mut self, chunk: &[u8]) {
        let mut rest = chunk;
        while let Some(nl) = memchr::memchr(b'\n', rest) {
            let (head, tail) = rest.split_at(nl + 1);
            rest = tail;
            let State::Sse { pending } = &mut self.state else { return };
            if let Some(line_head) = self.long_line_head.take() {
                pending.extend_from_slice(head);
                let line_tail = pending.split();
                self.boundary = false;
                self.read_long_line(&line_head, &line_tail);
            } else if pending.is_empty() {
                self.boundary = matches!(head, b"\n" | b"\r\n");
                self.read_line(head);
            } else {
                pending.extend_from_slice(head);
                let line = pending.split();
                self.boundary = matches!(&line[..], b"\n" | b"\r\n");
                self.read_line(&line);
            }
        }
        if let State::Sse { pending } = &mut self.state {
            if pending.len() + rest.len() > MAX_SSE_LINE && self.long_line_head.is_none() {
                // Too long to keep whole: keep its start (the event type) and, from here on, its end.
                let mut line_head = pending[..pending.len().min(LONG_LINE_HEAD)].to_vec();
                let more = LONG_LINE_HEAD.saturating_sub(line_head.len()).min(rest.len());
                line_head.extend_from_slice(&rest[..more]);
                self.long_line_head = Some(line_head);
            }
            pending.extend_from_slice(rest);
            if self.long_line_head.is_some() && pending.len() > LONG_LINE_TAIL {
                let excess = pending.len() - LONG_LINE_TAIL;
                bytes::Buf::advance(pending, excess);
            }
        }
    }

    /// A line too long to keep whole, seen as its start and its end. A Responses terminal event repeats the
    /// request's instructions and tools, so it can be megabytes long; its usage sits at its end.
    fn read_long_line(&mut self, line_head: &[u8], line_tail: &[u8]) {
        // The event's own type (its first member), not the words anywhere in its start: a long
        // `response.created` echoes the caller's instructions, which may name any event.
        let terminal = self.dialect == Dialect::Responses
            && member::<String>(line_head, Member::FirstType).is_some_and(|kind| {
                matches!(kind.as_str(), "response.completed" | "response.incomplete" | "response.failed")
            });
        if terminal {
            self.finished = true;
            // Members after `usage` (`metadata`, whose values are strings) may name a "usage" too.
            if let Some(usage) = last_member_that_parses::<ResponsesUsage>(line_tail).and_then(ResponsesUsage::counted)
            {
                self.usage = Some(usage);
            }
            if self.model.is_none() {
                self.model = member::<String>(line_head, Member::FirstModel);
            }
        }
    }

    /// Event-at-a-time forwarding for streams whose usage chunk the client never asked for: an event goes
    /// out as soon as its blank line arrives, unless it is the usage-only chunk. Chunks made of whole events
    /// that need no change are forwarded as they are, without a copy.
    fn filter_events(&mut self, chunk: Bytes) -> Bytes {
        let State::Sse { pending } = &mut self.state else { return chunk };
        let data = if pending.is_empty() {
            chunk
        } else {
            pending.extend_from_slice(&chunk);
            pending.split().freeze()
        };
        // Rewritten events go into `out`, from which each frame is split off: its allocation serves the next
        // chunks too, once the frames cut from it have been written and dropped.
        let mut out = std::mem::take(&mut self.out);
        let mut rewriting = false;
        // One pass over the lines: an event ends with a blank line that is not its first line. Its lines are
        // read once it is whole; those of an unfinished event wait in `pending` for the next chunk.
        let mut line_ends = std::mem::take(&mut self.line_ends);
        line_ends.clear();
        let mut start = 0;
        for nl in memchr::memchr_iter(b'\n', &data) {
            let line_start = line_ends.last().copied().unwrap_or(start);
            line_ends.push(nl + 1);
            if line_start == start || !matches!(&data[line_start..=nl], b"\n" | b"\r\n") {
                continue;
            }
            let end = nl + 1;
            // Whether this is the usage-only chunk, where (from the event's start) usage is first named, and
            // whether it is named more than once.
            let (mut usage_only, mut usage_at, mut usage_count) = (false, None, 0);
            let mut from = start;
            for &to in &line_ends {
                let seen = self.read_line(&data[from..to]);
                usage_only |= seen.usage_only;
                usage_at = usage_at.or(seen.usage_at.map(|at| from - start + at));
                usage_count = (usage_count + seen.usage_count).min(2);
                from = to;
            }
            line_ends.clear();
            let event = &data[start..end];
            if usage_only || usage_at.is_some() {
                if !rewriting {
                    rewriting = true;
                    // Room for the whole chunk at once: the events after this one are appended too.
                    out.reserve(data.len());
                    out.extend_from_slice(&data[..start]);
                }
                if let (false, Some(at)) = (usage_only, usage_at) {
                    strip_null_usage(&mut out, event, at, usage_count > 1);
                }
            } else if rewriting {
                out.extend_from_slice(event);
            }
            start = end;
        }
        self.line_ends = line_ends;
        self.boundary = true;
        if let State::Sse { pending } = &mut self.state {
            if pending.len() + data.len() - start > MAX_SSE_LINE {
                // No event end in sight: forward what is held rather than hold the stream (unfiltered).
                if rewriting {
                    out.extend_from_slice(&data[start..]);
                }
                start = data.len();
                self.boundary = false;
            } else {
                pending.extend_from_slice(&data[start..]);
            }
        }
        let frame = if rewriting { out.split().freeze() } else { data.slice(..start) };
        // A buffer grown for an unusually large chunk is not kept for the rest of the stream (what is left of
        // it would keep the whole allocation alive).
        if data.len() <= MAX_KEPT_OUT {
            self.out = out;
        }
        frame
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
            Dialect::Chat => {
                if data == b"[DONE]" || !counting && !self.strip_usage {
                    self.finished = true;
                    return LineSeen::default();
                }
                let usage = usage_mentions(data);
                // `data` is a part of `line`: where it starts in it, to say where usage is named.
                let data_start = data.as_ptr() as usize - line.as_ptr() as usize;
                let mut seen = LineSeen {
                    usage_only: false,
                    usage_at: usage.first.map(|at| data_start + at),
                    usage_count: usage.count,
                };
                if counting && self.model.is_none() && (self.need_model || usage.object) {
                    self.model = member::<String>(data, Member::FirstModel);
                }
                // The usage chunk: its usage, and whether it is the usage-only one (`choices: []`), each member
                // parsed alone as in a JSON body; should that not work, the whole chunk is parsed instead.
                if usage.object {
                    if let Some(u) = member::<ChatUsage>(data, Member::LastUsage) {
                        if counting {
                            self.usage = u.counted().or(self.usage);
                        }
                        seen.usage_only = member::<Vec<serde::de::IgnoredAny>>(data, Member::FirstChoices)
                            .is_some_and(|choices| choices.is_empty());
                    } else if let Ok(chunk) = serde_json::from_slice::<ChatBody>(data) {
                        if counting {
                            self.model = self.model.take().or(chunk.model);
                        }
                        if let Some(u) = chunk.usage {
                            if counting {
                                self.usage = u.counted().or(self.usage);
                            }
                            seen.usage_only = chunk.choices.is_some_and(|c| c.is_empty());
                        }
                    }
                }
                seen
            }
            Dialect::Responses => {
                let n = &*NEEDLES;
                if [&n.completed, &n.incomplete, &n.failed].iter().any(|f| f.find(data).is_some()) {
                    if let Ok(event) = serde_json::from_slice::<ResponsesEvent>(data) {
                        if matches!(
                            event.kind.as_str(),
                            "response.completed" | "response.incomplete" | "response.failed"
                        ) {
                            self.finished = true;
                            if let Some(r) = event.response {
                                self.model = r.model.or(self.model.take());
                                self.usage = r.usage.and_then(ResponsesUsage::counted).or(self.usage);
                            }
                        }
                    }
                } else if self.model.is_none() && NEEDLES.created.find(data).is_some() {
                    if let Ok(ResponsesEvent { response: Some(r), .. }) = serde_json::from_slice(data) {
                        self.model = r.model;
                    }
                }
                LineSeen::default()
            }
            Dialect::Messages => {
                if NEEDLES.message_start.find(data).is_some() || NEEDLES.message_delta.find(data).is_some() {
                    if let Ok(event) = serde_json::from_slice::<MessagesEvent>(data) {
                        if let Some(m) = event.message {
                            self.model = m.model.or(self.model.take());
                            self.anthropic.apply(m.usage, false);
                        }
                        self.anthropic.apply(event.usage, true);
                        self.usage = self.anthropic.usage();
                    }
                } else if NEEDLES.message_stop.find(data).is_some() {
                    self.finished = true;
                }
                LineSeen::default()
            }
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

/// The members read from a JSON text without parsing all of it.
#[derive(Clone, Copy)]
enum Member {
    /// The last `"usage"` member.
    LastUsage,
    /// The first `"model"` member.
    FirstModel,
    /// The first `"choices"` member.
    FirstChoices,
    /// The first `"type"` member.
    FirstType,
}

/// Where the last `"usage"` in `body` starts. memmem's reverse searcher has no vector prefilter and costs
/// ~10 instructions a byte; usage sits near the end of a body and `u` is rare there, so stepping back from
/// one `u` to the next with `memrchr` reaches it in a few steps.
fn last_usage_key(body: &[u8]) -> Option<usize> {
    memchr::memrchr_iter(b'u', body).filter_map(|u| u.checked_sub(1)).find(|&at| body[at..].starts_with(USAGE_KEY))
}

/// The value of a member of a JSON text, parsed alone. A key can only match where its quotes are real quotes:
/// inside a string value a quote is always escaped.
fn member<'a, T: Deserialize<'a>>(body: &'a [u8], which: Member) -> Option<T> {
    let n = &*NEEDLES;
    let (at, key) = match which {
        Member::LastUsage => (last_usage_key(body)?, USAGE_KEY),
        Member::FirstModel => (n.model.find(body)?, n.model.needle()),
        Member::FirstChoices => (n.choices.find(body)?, n.choices.needle()),
        Member::FirstType => (n.kind.find(body)?, n.kind.needle()),
    };
    member_at(body, at, key)
}

/// The last `"usage"` member of `body` whose value parses as a `T`, looking back past those that do not.
fn last_member_that_parses<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Option<T> {
    let mut end = body.len();
    while let Some(at) = last_usage_key(&body[..end]) {
        if let Some(value) = member_at(body, at, USAGE_KEY) {
            return Some(value);
        }
        end = at;
    }
    None
}

/// The value of the member whose key (`key`, quoted) starts at `at` in `body`.
fn member_at<'a, T: Deserialize<'a>>(body: &'a [u8], at: usize, key: &[u8]) -> Option<T> {
    if at > 0 && body[at - 1] == b'\\' {
        return None;
    }
    let value = body[at + key.len()..].trim_ascii_start().strip_prefix(b":")?;
    T::deserialize(&mut serde_json::Deserializer::from_slice(value)).ok()
}

/// The `"usage":null` members `include_usage` adds, with the comma that goes with them.
const NULL_USAGE: [&[u8]; 4] = [b",\"usage\":null", b", \"usage\": null", b"\"usage\":null,", b"\"usage\": null, "];

/// Appends `event` to `out` without the `"usage":null` members that `include_usage` adds to every chunk; `first`
/// is where the event first names `"usage"` and `more` whether it does again (both found while reading it, so
/// not searched for again).
fn strip_null_usage(out: &mut BytesMut, event: &[u8], first: usize, more: bool) {
    // `kept` is where the part of the event still to be copied starts; `seen` is where the last mention ended
    // (a member cannot begin before it).
    let (mut kept, mut seen, mut next) = (0, 0, Some(first));
    while let Some(at) = next {
        let found = NULL_USAGE.iter().find_map(|p| {
            // The comma may sit before the member (`,"usage":null`) or after it (`"usage":null,`).
            let begin = at.checked_sub(p.iter().take_while(|b| **b != b'"').count()).filter(|&b| b >= seen)?;
            event[begin..].starts_with(p).then_some((begin, begin + p.len()))
        });
        seen = match found {
            Some((begin, end)) => {
                out.extend_from_slice(&event[kept..begin]);
                kept = end;
                end
            }
            None => at + USAGE_KEY.len(),
        };
        next = match more {
            true => event.get(seen..).and_then(|rest| NEEDLES.usage.find(rest)).map(|n| seen + n),
            false => None,
        };
    }
    out.extend_from_slice(&event[kept..]);
}

#[derive(Deserialize)]
struct ChatBody {
    model: Option<String>,
    choices: Option<Vec<serde::de::IgnoredAny>>,
    usage: Option<ChatUsage>,
}

#[derive(Deserialize)]
struct ChatUsage {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    prompt_tokens_details: Option<CachedDetails>,
    completion_tokens_details: Option<ReasoningDetails>,
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

impl ChatUsage {
    fn counted(self) -> Option<Usage> {
        counted(self.prompt_tokens, self.completion_tokens, self.prompt_tokens_details, self.completion_tokens_details)
    }
}

#[derive(Deserialize)]
struct ResponsesEvent {
    #[serde(rename = "type", default)]
    kind: String,
    response: Option<ResponsesObject>,
}

#[derive(Deserialize)]
struct ResponsesObject {
    model: Option<String>,
    usage: Option<ResponsesUsage>,
}

#[derive(Deserialize)]
struct ResponsesUsage {
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    input_tokens_details: Option<CachedDetails>,
    output_tokens_details: Option<ReasoningDetails>,
}

impl ResponsesUsage {
    fn counted(self) -> Option<Usage> {
        counted(self.input_tokens, self.output_tokens, self.input_tokens_details, self.output_tokens_details)
    }
}

#[derive(Deserialize)]
struct MessagesEvent {
    message: Option<MessagesObject>,
    usage: Option<MessagesUsage>,
}

#[derive(Deserialize)]
struct MessagesObject {
    model: Option<String>,
    usage: Option<MessagesUsage>,
}

/// Anthropic's usage object: cache reads and writes are counted apart from `input_tokens`.
#[derive(Deserialize)]
struct MessagesUsage {
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
}

/// Anthropic's counters as last reported. Events repeat cumulative counts, so a field present replaces the
/// previous value and a field absent keeps it.
#[derive(Debug, Default, Clone, Copy)]
struct AnthropicCounters {
    input: u64,
    output: u64,
    cache_read: u64,
    cache_creation: u64,
    /// Whether any usage object counted input or output tokens.
    counted: bool,
    /// Whether the final count arrived (a body's usage, or a stream's `message_delta`): `message_start`'s
    /// output count is only where the stream began.
    settled: bool,
}

impl AnthropicCounters {
    /// Takes in a usage object; `settles` for one that carries the final counts.
    fn apply(&mut self, usage: Option<MessagesUsage>, settles: bool) {
        let Some(u) = usage else { return };
        if u.input_tokens.is_none() && u.output_tokens.is_none() {
            return;
        }
        self.input = u.input_tokens.unwrap_or(self.input);
        self.output = u.output_tokens.unwrap_or(self.output);
        self.cache_read = u.cache_read_input_tokens.unwrap_or(self.cache_read);
        self.cache_creation = u.cache_creation_input_tokens.unwrap_or(self.cache_creation);
        self.counted = true;
        self.settled |= settles;
    }

    /// Cache reads and writes folded into `input`, as the other dialects count it; none if nothing was counted.
    fn usage(&self) -> Option<Usage> {
        self.counted.then(|| Usage {
            input: self.input.saturating_add(self.cache_read).saturating_add(self.cache_creation),
            output: self.output,
            cached_input: self.cache_read,
            reasoning: 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `body` in chunks of `size` and returns what was forwarded.
    fn run(tap: &mut UsageTap, body: &[u8], size: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for chunk in body.chunks(size) {
            out.extend_from_slice(&tap.on_chunk(Bytes::copy_from_slice(chunk)));
        }
        out.extend_from_slice(&tap.finish());
        out
    }

    const CHAT_STREAM: &str = concat!(
        "data: {\"id\":\"c\",\"model\":\"openai.gpt-oss-120b\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n",
        "data: {\"id\":\"c\",\"model\":\"openai.gpt-oss-120b\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n",
        "data: {\"id\":\"c\",\"model\":\"openai.gpt-oss-120b\",\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":7,",
        "\"prompt_tokens_details\":{\"cached_tokens\":4},\"completion_tokens_details\":{\"reasoning_tokens\":3}}}\n\n",
        "data: [DONE]\n\n",
    );

    #[test]
    fn chat_stream_usage_at_any_chunking() {
        for size in [1, 2, 7, 64, 10_000] {
            let mut tap = UsageTap::sse(Dialect::Chat, false);
            let out = run(&mut tap, CHAT_STREAM.as_bytes(), size);
            assert_eq!(out, CHAT_STREAM.as_bytes(), "forwarded untouched");
            assert_eq!(tap.usage(), Some(Usage { input: 12, output: 7, cached_input: 4, reasoning: 3 }), "{size}");
            assert_eq!(tap.model(), Some("openai.gpt-oss-120b"));
            assert!(tap.finished());
        }
    }

    #[test]
    fn injected_usage_is_hidden_from_the_client() {
        let expected = concat!(
            "data: {\"id\":\"c\",\"model\":\"openai.gpt-oss-120b\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}]}\n\n",
            "data: {\"id\":\"c\",\"model\":\"openai.gpt-oss-120b\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
            "data: [DONE]\n\n",
        );
        for size in [1, 5, 33, 10_000] {
            let mut tap = UsageTap::sse(Dialect::Chat, true);
            let out = run(&mut tap, CHAT_STREAM.as_bytes(), size);
            assert_eq!(String::from_utf8_lossy(&out), expected, "{size}");
            assert_eq!(tap.usage().map(|u| (u.input, u.output)), Some((12, 7)));
        }
    }

    /// The removal as first written (each mention searched for from scratch), to check the one that starts
    /// from the mention the reader found.
    fn strip_null_usage_reference(event: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut rest = event;
        while let Some(at) = NEEDLES.usage.find(rest) {
            let found = NULL_USAGE.iter().find_map(|p| {
                let begin = at.checked_sub(p.iter().take_while(|b| **b != b'"').count())?;
                rest[begin..].starts_with(p).then_some((begin, begin + p.len()))
            });
            match found {
                Some((begin, end)) => {
                    out.extend_from_slice(&rest[..begin]);
                    rest = &rest[end..];
                }
                None => {
                    out.extend_from_slice(&rest[..at + USAGE_KEY.len()]);
                    rest = &rest[at + USAGE_KEY.len()..];
                }
            }
        }
        out.extend_from_slice(rest);
        out
    }

    #[test]
    fn null_usage_removal_matches_a_search_from_scratch() {
        const PIECES: [&str; 9] = [
            ",\"usage\":null",
            "\"usage\":null,",
            ", \"usage\": null",
            "\"usage\": null, ",
            "\"usage\"",
            "{",
            "}",
            ",",
            "\"a\":1",
        ];
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        for _ in 0..20_000 {
            let mut event = String::new();
            for _ in 0..1 + (state % 7) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                event.push_str(PIECES[(state % PIECES.len() as u64) as usize]);
            }
            let Some(first) = NEEDLES.usage.find(event.as_bytes()) else { continue };
            let mut out = BytesMut::new();
            strip_null_usage(&mut out, event.as_bytes(), first, usage_mentions(event.as_bytes()).count > 1);
            assert_eq!(&out[..], strip_null_usage_reference(event.as_bytes()), "{event}");
        }
    }

    #[test]
    fn every_null_usage_of_an_event_is_removed_and_a_usage_chunk_with_choices_is_kept() {
        let stream = concat!(
            "data: {\"a\":1,\"usage\":null}\ndata: {\"b\":2,\"usage\":null,\"c\":{\"usage\":null,\"d\":3}}\n\n",
            "data: {\"model\":\"m\",\"choices\":[{\"index\":0}],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":6}}\n\n",
            "data: [DONE]\n\n",
        );
        let expected = concat!(
            "data: {\"a\":1}\ndata: {\"b\":2,\"c\":{\"d\":3}}\n\n",
            "data: {\"model\":\"m\",\"choices\":[{\"index\":0}],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":6}}\n\n",
            "data: [DONE]\n\n",
        );
        for size in [1, 9, 64, 10_000] {
            let mut tap = UsageTap::sse(Dialect::Chat, true);
            let out = run(&mut tap, stream.as_bytes(), size);
            assert_eq!(String::from_utf8_lossy(&out), expected, "{size}");
            assert_eq!(tap.usage().map(|u| (u.input, u.output)), Some((5, 6)));
            assert_eq!(tap.model(), Some("m"));
        }
    }

    #[test]
    fn an_event_naming_usage_hundreds_of_times_loses_every_null() {
        let line = "data: {\"x\":{\"a\":1,\"usage\":null},\"usage\":null}\n";
        let event = format!("{}\n", line.repeat(300));
        let mut tap = UsageTap::sse(Dialect::Chat, true);
        let out = run(&mut tap, event.as_bytes(), event.len());
        let expected = format!("{}\n", "data: {\"x\":{\"a\":1}}\n".repeat(300));
        assert!(out == expected.as_bytes(), "{}", String::from_utf8_lossy(&out[..200]));
    }

    #[test]
    fn a_usage_chunk_whose_last_usage_is_not_the_object_is_still_read_and_hidden() {
        let stream = concat!(
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2},\"kind\":\"usage\"}\n\n",
            "data: [DONE]\n\n",
        );
        let mut tap = UsageTap::sse(Dialect::Chat, true);
        let out = run(&mut tap, stream.as_bytes(), stream.len());
        assert_eq!(String::from_utf8_lossy(&out), "data: [DONE]\n\n");
        assert_eq!(tap.usage().map(|u| (u.input, u.output)), Some((1, 2)));
    }

    #[test]
    fn the_buffer_of_a_large_rewritten_chunk_is_not_kept() {
        let event = |pad: usize| format!("data: {{\"p\":\"{}\",\"usage\":null}}\n\n", "x".repeat(pad));
        for (pad, kept) in [(100, true), (200 * 1024, false)] {
            let mut tap = UsageTap::sse(Dialect::Chat, true);
            let frame = tap.on_chunk(Bytes::from(event(pad)));
            assert_eq!(frame.len(), event(pad).len() - ",\"usage\":null".len());
            // Kept, the buffer goes on where the frame cut from it ends.
            let shares = tap.out.as_ptr() == frame.as_ptr().wrapping_add(frame.len());
            assert_eq!(shares, kept, "{pad}");
        }
    }

    #[test]
    fn an_event_too_long_to_hold_passes_unfiltered_and_the_next_ones_are_filtered_again() {
        let huge = format!("data: {{\"content\":\"{}\",\"usage\":null}}\n\n", "x".repeat(3 * 1024 * 1024));
        let stream =
            [r#"data: {"a":1,"usage":null}"#, "\n\n", &huge, r#"data: {"b":2,"usage":null}"#, "\n\ndata: [DONE]\n\n"]
                .concat();
        // The second size puts the first event and more than a held line's worth of the next in one chunk.
        for size in [64 * 1024, 1024 * 1024 + 100] {
            let mut tap = UsageTap::sse(Dialect::Chat, true);
            let out = run(&mut tap, stream.as_bytes(), size);
            let expected = [r#"data: {"a":1}"#, "\n\n", &huge, r#"data: {"b":2}"#, "\n\ndata: [DONE]\n\n"].concat();
            assert!(out == expected.as_bytes(), "{size}: {} bytes out, {} expected", out.len(), expected.len());
            assert!(tap.finished());
        }
    }

    #[test]
    fn null_usage_members_are_removed_wherever_they_sit() {
        let cases: [(&[u8], &[u8]); 5] = [
            (br#"{"a":1,"usage":null}"#, br#"{"a":1}"#),
            (br#"{"usage":null,"a":1}"#, br#"{"a":1}"#),
            (br#"{"a":1, "usage": null}"#, br#"{"a":1}"#),
            // A lone member has no comma to take with it; it is left alone (still valid JSON).
            (br#"{"a":{"usage":null},"usage":{"n":1}}"#, br#"{"a":{"usage":null},"usage":{"n":1}}"#),
            (br#"{"a":"usage"}"#, br#"{"a":"usage"}"#),
        ];
        for (input, expected) in cases {
            let mut out = BytesMut::from(&b"before;"[..]);
            let first = NEEDLES.usage.find(input).unwrap_or(input.len());
            strip_null_usage(&mut out, input, first, usage_mentions(input).count > 1);
            let expected = [&b"before;"[..], expected].concat();
            assert_eq!(String::from_utf8_lossy(&out), String::from_utf8_lossy(&expected));
        }
    }

    #[test]
    fn events_of_any_shape_pass_byte_for_byte_in_chunks_of_any_size() {
        // Leading and doubled blank lines, comments, event names, multi-line data, CRLF and LF mixed, and a
        // last event that never ends: only the usage-only chunk and `"usage":null` members are taken out.
        let body = concat!(
            "\n: keep-alive\n\n",
            "event: message\ndata: {\"choices\":[{\"delta\":{\"content\":\"\\\"usage\\\": {}\"}}]}\n\n\n",
            "data: first\r\ndata: second\r\n\r\n",
            "data: {\"choices\":[{\"delta\":{}}],\"usage\":null}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":2,\"completion_tokens\":3}}\n\n",
            "data: [DONE]\n\n",
            "data: unfinished",
        );
        let expected = body
            .replace(",\"usage\":null", "")
            .replace("data: {\"choices\":[],\"usage\":{\"prompt_tokens\":2,\"completion_tokens\":3}}\n\n", "");
        for size in 1..=body.len() {
            let mut tap = UsageTap::sse(Dialect::Chat, true);
            let out = run(&mut tap, body.as_bytes(), size);
            assert_eq!(String::from_utf8_lossy(&out), expected, "in chunks of {size}");
            assert_eq!(tap.usage().map(|u| (u.input, u.output)), Some((2, 3)), "in chunks of {size}");
            assert!(tap.finished());
        }
    }

    #[test]
    fn an_event_is_read_only_once_it_is_whole() {
        let mut tap = UsageTap::sse(Dialect::Chat, true);
        let body: &[u8] = b"data: {\"choices\":[]}\n\ndata: [DONE]\n";
        let out: Vec<u8> = body.chunks(7).flat_map(|c| tap.on_chunk(Bytes::copy_from_slice(c))).collect();
        assert_eq!(out, b"data: {\"choices\":[]}\n\n");
        assert!(!tap.finished(), "[DONE] without its blank line does not end the stream yet");
        assert_eq!(&tap.on_chunk(Bytes::from_static(b"\n"))[..], b"data: [DONE]\n\n");
        assert!(tap.finished());
    }

    #[test]
    fn crlf_events_are_filtered_too() {
        let body = "data: {\"choices\":[{\"delta\":{}}],\"usage\":null}\r\n\r\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":2,\"completion_tokens\":3}}\r\n\r\ndata: [DONE]\r\n\r\n";
        let mut tap = UsageTap::sse(Dialect::Chat, true);
        let out = run(&mut tap, body.as_bytes(), 3);
        assert_eq!(String::from_utf8_lossy(&out), "data: {\"choices\":[{\"delta\":{}}]}\r\n\r\ndata: [DONE]\r\n\r\n");
        assert_eq!(tap.usage().map(|u| (u.input, u.output)), Some((2, 3)));
        assert!(tap.finished());
    }

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
    fn an_anthropic_stream_has_its_final_usage_only_from_message_delta() {
        let start = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"m\",\"usage\":{\"input_tokens\":300,\"output_tokens\":1}}}\n\n";
        let bare_start = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"m\"}}\n\n";
        let delta = "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{},\"usage\":{\"output_tokens\":40}}\n\n";
        let stop = "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
        let mut tap = UsageTap::sse(Dialect::Messages, false);
        run(&mut tap, format!("{bare_start}{stop}").as_bytes(), 16);
        assert_eq!(tap.usage(), None, "no usage member, no usage");
        let mut tap = UsageTap::sse(Dialect::Messages, false);
        run(&mut tap, start.as_bytes(), 16);
        assert_eq!(tap.usage().map(|u| (u.input, u.output)), Some((300, 1)));
        assert!(!tap.usage_final(), "message_start's output count is where the stream began");
        run(&mut tap, format!("{delta}{stop}").as_bytes(), 16);
        assert_eq!(tap.usage().map(|u| (u.input, u.output)), Some((300, 40)));
        assert!(tap.usage_final() && tap.finished());
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
    fn a_usage_chunk_after_done_is_still_hidden_from_a_caller_that_never_asked() {
        let usage =
            |n| format!("data: {{\"choices\":[],\"usage\":{{\"prompt_tokens\":{n},\"completion_tokens\":{n}}}}}\n\n");
        let body = format!("data: {{\"choices\":[]}}\n\n{}data: [DONE]\n\n{}", usage(2), usage(9));
        let mut tap = UsageTap::sse(Dialect::Chat, true);
        let out = run(&mut tap, body.as_bytes(), body.len());
        assert_eq!(String::from_utf8_lossy(&out), "data: {\"choices\":[]}\n\ndata: [DONE]\n\n");
        assert_eq!(tap.usage().map(|u| u.output), Some(2));
    }

    #[test]
    fn chat_stream_without_done_is_not_finished() {
        let cut = &CHAT_STREAM[..CHAT_STREAM.find("data: [DONE]").expect("done")];
        let mut tap = UsageTap::sse(Dialect::Chat, false);
        run(&mut tap, cut.as_bytes(), 16);
        assert_eq!(tap.usage().map(|u| u.output), Some(7));
        assert!(!tap.finished());
    }

    #[test]
    fn responses_stream_terminal_events() {
        for terminal in ["response.completed", "response.incomplete", "response.failed"] {
            let body = format!(
                "event: response.created\ndata: {{\"type\":\"response.created\",\"response\":{{\"model\":\"openai.gpt-5.4\",\"usage\":null}}}}\n\n\
                 event: response.output_text.delta\ndata: {{\"type\":\"response.output_text.delta\",\"delta\":\"response.completed\"}}\n\n\
                 event: {terminal}\ndata: {{\"type\":\"{terminal}\",\"response\":{{\"model\":\"openai.gpt-5.4\",\"usage\":{{\"input_tokens\":100,\
                 \"input_tokens_details\":{{\"cached_tokens\":60}},\"output_tokens\":40,\"output_tokens_details\":{{\"reasoning_tokens\":25}}}}}}}}\n\n"
            );
            let mut tap = UsageTap::sse(Dialect::Responses, false);
            assert_eq!(run(&mut tap, body.as_bytes(), 9), body.as_bytes());
            assert_eq!(
                tap.usage(),
                Some(Usage { input: 100, output: 40, cached_input: 60, reasoning: 25 }),
                "{terminal}"
            );
            assert_eq!(tap.model(), Some("openai.gpt-5.4"));
            assert!(tap.finished());
        }
    }

    #[test]
    fn responses_usage_survives_a_huge_terminal_event() {
        let instructions = "x".repeat(3 * 1024 * 1024);
        let body = format!(
            "event: response.completed\ndata: {{\"type\":\"response.completed\",\"response\":{{\"model\":\"openai.gpt-5.4\",\
             \"instructions\":\"{instructions}\",\"usage\":{{\"input_tokens\":900000,\"output_tokens\":12}},\"metadata\":{{}}}}}}\n\n"
        );
        let mut tap = UsageTap::sse(Dialect::Responses, false);
        let out = run(&mut tap, body.as_bytes(), 16 * 1024);
        assert_eq!(out.len(), body.len(), "forwarded untouched");
        assert_eq!(tap.usage().map(|u| (u.input, u.output)), Some((900_000, 12)));
        assert_eq!(tap.model(), Some("openai.gpt-5.4"));
        assert!(tap.finished() && tap.stream_over());
        assert!(matches!(&tap.state, State::Sse { pending } if pending.capacity() < 2 * 1024 * 1024), "bounded");
    }

    #[test]
    fn a_huge_event_is_terminal_by_its_type_and_its_usage_is_the_one_that_parses() {
        // A `response.created` echoing instructions that name the terminal events is not the end.
        let instructions = format!("Handle response.completed and response.failed events. {}", "x".repeat(2 << 20));
        let created = format!(
            "event: response.created\ndata: {{\"type\":\"response.created\",\"response\":{{\"model\":\"openai.gpt-5.4\",\
             \"instructions\":\"{instructions}\",\"usage\":null}}}}\n\n"
        );
        // The terminal event: metadata (string values) after the usage names a "usage" too.
        let completed = format!(
            "event: response.completed\ndata: {{\"type\":\"response.completed\",\"response\":{{\"model\":\"openai.gpt-5.4\",\
             \"instructions\":\"{instructions}\",\"usage\":{{\"input_tokens\":300000,\"output_tokens\":7}},\"user\":null,\
             \"metadata\":{{\"usage\":\"x\"}}}}}}\n\n"
        );
        let mut tap = UsageTap::sse(Dialect::Responses, false);
        run(&mut tap, created.as_bytes(), 64 * 1024);
        assert!(!tap.finished() && !tap.stream_over(), "ended by a mention in the instructions");
        run(&mut tap, completed.as_bytes(), 64 * 1024);
        assert!(tap.finished() && tap.stream_over());
        assert_eq!(tap.usage().map(|u| (u.input, u.output)), Some((300_000, 7)));
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
    fn messages_usage_sums_saturate() {
        let body = format!(
            "{{\"model\":\"anthropic.claude-sonnet-4-5\",\"content\":[],\"usage\":{{\"input_tokens\":{},\
             \"cache_read_input_tokens\":1,\"output_tokens\":2}}}}",
            u64::MAX
        );
        let mut tap = UsageTap::json(Dialect::Messages);
        run(&mut tap, body.as_bytes(), 64);
        assert_eq!(tap.usage().map(|u| (u.input, u.output)), Some((u64::MAX, 2)));
    }

    #[test]
    fn messages_stream_cumulative_usage() {
        let body = concat!(
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"anthropic.claude-sonnet-4-5\",",
            "\"usage\":{\"input_tokens\":20,\"cache_read_input_tokens\":30,\"cache_creation_input_tokens\":5,\"output_tokens\":1}}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"text\":\"message_delta\"}}\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{},\"usage\":{\"output_tokens\":9}}\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{},\"usage\":{\"output_tokens\":15}}\n\n",
            "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
        );
        let mut tap = UsageTap::sse(Dialect::Messages, false);
        run(&mut tap, body.as_bytes(), 11);
        assert_eq!(tap.usage(), Some(Usage { input: 55, output: 15, cached_input: 30, reasoning: 0 }));
        assert_eq!(tap.model(), Some("anthropic.claude-sonnet-4-5"));
        assert!(tap.finished());
    }

    #[test]
    fn the_last_usage_key_is_found_wherever_it_is() {
        let bodies: [&[u8]; 9] = [
            b"",
            b"\"usage\"",
            b"usage\"usage",
            b"{\"usage\":1,\"x\":{\"usage\":2},\"u\":\"uuu\"}",
            b"\"uusage\"\"usage\"u",
            b"{\"content\":\"busy queue\",\"usage\":{\"prompt_tokens\":1}}",
            b"{\"u\":\"usage\"}",
            b"\"usag\"",
            b"uuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuu\"usage\"uuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuu",
        ];
        for body in bodies {
            assert_eq!(
                last_usage_key(body),
                memchr::memmem::rfind(body, USAGE_KEY),
                "{}",
                String::from_utf8_lossy(body)
            );
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
