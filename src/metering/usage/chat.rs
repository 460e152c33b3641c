//! Chat Completions: usage comes in the final chunk (`choices: []`), then `data: [DONE]`. It is the chunk the
//! gateway may have asked for on the caller's behalf, so reading a line also tells the stripping whether it
//! is that usage-only chunk and where it names usage.

use serde::Deserialize;

use super::json::{Member, member, top_level_member, usage_mentions};
use super::{CachedDetails, LineSeen, ReasoningDetails, Usage, UsageTap, counted};

impl UsageTap {
    /// A Chat Completions line's data. `line` is the line it was cut from, since the stripping wants to know
    /// where in the line usage is named; `counting` is false past the stream's end, where a line may still
    /// need hiding but counts for nothing.
    pub(super) fn read_chat_data(&mut self, line: &[u8], data: &[u8], counting: bool) -> LineSeen {
        if data == b"[DONE]" || !counting && !self.strip_usage {
            self.finished = true;
            return LineSeen::default();
        }
        let usage = usage_mentions(data);
        // `data` is a part of `line`: where it starts in it, to say where usage is named.
        let data_start = data.as_ptr() as usize - line.as_ptr() as usize;
        let mut seen =
            LineSeen { usage_only: false, usage_at: usage.first.map(|at| data_start + at), usage_count: usage.count };
        if counting && self.model.is_none() && (self.need_model || usage.object) {
            self.model = member::<String>(data, Member::FirstModel);
        }
        // The usage chunk: its usage, read from its `usage` member alone as in a JSON body (should that not
        // work, from the whole chunk parsed). Whether it is the usage-only chunk to hide is told by its top-level
        // `choices`, never by the first `"choices"` in its text: hiding a chunk that carries content would lose it.
        if usage.object {
            if let Some(u) = member::<ChatUsage>(data, Member::LastUsage) {
                if counting {
                    self.usage = u.counted().or(self.usage);
                }
                seen.usage_only = self.strip_usage
                    && top_level_member::<Vec<serde::de::IgnoredAny>>(data, b"\"choices\"")
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
}

#[derive(Deserialize)]
pub(super) struct ChatBody {
    pub(super) model: Option<String>,
    choices: Option<Vec<serde::de::IgnoredAny>>,
    pub(super) usage: Option<ChatUsage>,
}

#[derive(Deserialize)]
pub(super) struct ChatUsage {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    prompt_tokens_details: Option<CachedDetails>,
    completion_tokens_details: Option<ReasoningDetails>,
}

impl ChatUsage {
    pub(super) fn counted(self) -> Option<Usage> {
        counted(self.prompt_tokens, self.completion_tokens, self.prompt_tokens_details, self.completion_tokens_details)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metering::usage::Dialect;
    use crate::metering::usage::testing::{CHAT_STREAM, run};

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
}
