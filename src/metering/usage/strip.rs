//! Taking the `"usage":null` members out of forwarded events: asking for usage on a caller's behalf makes
//! upstream add one to every chunk, and a caller that never asked should get the stream it would have had.

use bytes::BytesMut;

use super::NEEDLES;
use super::json::USAGE_KEY;

/// The `"usage":null` members `include_usage` adds, with the comma that goes with them.
const NULL_USAGE: [&[u8]; 4] = [b",\"usage\":null", b", \"usage\": null", b"\"usage\":null,", b"\"usage\": null, "];

/// Appends `event` to `out` without the `"usage":null` members that `include_usage` adds to every chunk; `first`
/// is where the event first names `"usage"` and `more` whether it does again (both found while reading it, so
/// not searched for again).
pub(super) fn strip_null_usage(out: &mut BytesMut, event: &[u8], first: usize, more: bool) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metering::usage::json::usage_mentions;
    use crate::metering::usage::testing::run;
    use crate::metering::usage::{Dialect, UsageTap};

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
}
