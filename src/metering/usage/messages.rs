//! Anthropic Messages: `message_start` (input, cache reads) and `message_delta` (cumulative output), then
//! `message_stop`. A stream's counts come spread over its events, so they are gathered in `AnthropicCounters`
//! rather than read from one usage object as in the other dialects.

use serde::Deserialize;

use super::{LineSeen, NEEDLES, Usage, UsageTap};

impl UsageTap {
    /// A Messages stream line's data.
    pub(super) fn read_messages_data(&mut self, data: &[u8]) -> LineSeen {
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

#[derive(Deserialize)]
struct MessagesEvent {
    message: Option<MessagesObject>,
    usage: Option<MessagesUsage>,
}

#[derive(Deserialize)]
pub(super) struct MessagesObject {
    pub(super) model: Option<String>,
    pub(super) usage: Option<MessagesUsage>,
}

/// Anthropic's usage object: cache reads and writes are counted apart from `input_tokens`.
#[derive(Deserialize)]
pub(super) struct MessagesUsage {
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
}

/// Anthropic's counters as last reported. Events repeat cumulative counts, so a field present replaces the
/// previous value and a field absent keeps it.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct AnthropicCounters {
    input: u64,
    output: u64,
    cache_read: u64,
    cache_creation: u64,
    /// Whether any usage object counted input or output tokens.
    counted: bool,
    /// Whether the final count arrived (a body's usage, or a stream's `message_delta`): `message_start`'s
    /// output count is only where the stream began.
    pub(super) settled: bool,
}

impl AnthropicCounters {
    /// Takes in a usage object; `settles` for one that carries the final counts.
    pub(super) fn apply(&mut self, usage: Option<MessagesUsage>, settles: bool) {
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
    pub(super) fn usage(&self) -> Option<Usage> {
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
    use crate::metering::usage::Dialect;
    use crate::metering::usage::testing::run;

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
}
