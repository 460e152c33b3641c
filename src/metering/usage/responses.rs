//! The Responses API: a stream's usage is in its terminal event (`response.completed`, `.incomplete` or
//! `.failed`), under `response.usage`; `response.created` names the model before any of it.

use serde::Deserialize;

use super::{CachedDetails, LineSeen, NEEDLES, ReasoningDetails, Usage, UsageTap, counted};

impl UsageTap {
    /// A Responses stream line's data.
    pub(super) fn read_responses_data(&mut self, data: &[u8]) -> LineSeen {
        let n = &*NEEDLES;
        if [&n.completed, &n.incomplete, &n.failed].iter().any(|f| f.find(data).is_some()) {
            if let Ok(event) = serde_json::from_slice::<ResponsesEvent>(data)
                && matches!(event.kind.as_str(), "response.completed" | "response.incomplete" | "response.failed")
            {
                self.finished = true;
                if let Some(r) = event.response {
                    self.model = r.model.or(self.model.take());
                    self.usage = r.usage.and_then(ResponsesUsage::counted).or(self.usage);
                }
            }
        } else if self.model.is_none()
            && NEEDLES.created.find(data).is_some()
            && let Ok(ResponsesEvent { response: Some(r), .. }) = serde_json::from_slice(data)
        {
            self.model = r.model;
        }
        LineSeen::default()
    }
}

#[derive(Deserialize)]
struct ResponsesEvent {
    #[serde(rename = "type", default)]
    kind: String,
    response: Option<ResponsesObject>,
}

#[derive(Deserialize)]
pub(super) struct ResponsesObject {
    pub(super) model: Option<String>,
    pub(super) usage: Option<ResponsesUsage>,
}

#[derive(Deserialize)]
pub(super) struct ResponsesUsage {
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    input_tokens_details: Option<CachedDetails>,
    output_tokens_details: Option<ReasoningDetails>,
}

impl ResponsesUsage {
    pub(super) fn counted(self) -> Option<Usage> {
        counted(self.input_tokens, self.output_tokens, self.input_tokens_details, self.output_tokens_details)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metering::usage::Dialect;
    use crate::metering::usage::testing::run;

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
}
