//! SSE framing: which bytes make a line, and, when usage is stripped, an event. A line is read as soon as it
//! is whole, so nothing is held back; one too long to keep is read from its start and end, since a Responses
//! terminal event can be megabytes of echoed request with its usage at the very end. When stripping, whole
//! events are held instead, because what to forward depends on every line of one.

use bytes::Bytes;

use super::json::{Member, last_member_that_parses, member};
use super::responses::ResponsesUsage;
use super::strip::strip_null_usage;
use super::{Dialect, LONG_LINE_HEAD, LONG_LINE_TAIL, MAX_KEPT_OUT, MAX_SSE_LINE, State, UsageTap};

impl UsageTap {
    pub(super) fn scan_lines(&mut self, chunk: &[u8]) {
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
    pub(super) fn filter_events(&mut self, chunk: Bytes) -> Bytes {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metering::usage::testing::{CHAT_STREAM, run};

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
}
