//! Reading one member of a JSON text without parsing the rest: usage and model are all the tap wants of a
//! body or an event, and parsing only their values is what keeps metering cheap on large ones.

use serde::Deserialize;

use super::NEEDLES;

/// The key of a usage member.
pub(super) const USAGE_KEY: &[u8] = b"\"usage\"";

/// How `data` mentions `"usage"` members.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct UsageMentions {
    /// Where the first is.
    pub(super) first: Option<usize>,
    /// How many there are, counted up to 2.
    pub(super) count: u8,
    /// Whether one holds an object (not `null`).
    pub(super) object: bool,
}

/// Where and how often `data` names `"usage"`, and whether one of those members holds an object.
pub(super) fn usage_mentions(data: &[u8]) -> UsageMentions {
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

/// The members read from a JSON text without parsing all of it.
#[derive(Clone, Copy)]
pub(super) enum Member {
    /// The last `"usage"` member.
    LastUsage,
    /// The first `"model"` member.
    FirstModel,
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
pub(super) fn member<'a, T: Deserialize<'a>>(body: &'a [u8], which: Member) -> Option<T> {
    let n = &*NEEDLES;
    let (at, key) = match which {
        Member::LastUsage => (last_usage_key(body)?, USAGE_KEY),
        Member::FirstModel => (n.model.find(body)?, n.model.needle()),
        Member::FirstType => (n.kind.find(body)?, n.kind.needle()),
    };
    member_at(body, at, key)
}

/// The value of the top-level member named `key` (quoted) of the JSON object `body`: the text is walked once,
/// minding strings (with their escapes) and nesting, so a key of a nested object, or a string that spells the
/// key, never matches. For decisions a member found by its text alone could get wrong: whether a chat chunk is
/// the usage-only one, which the gateway hides (a nested `"choices":[]` must not hide a chunk with content).
pub(super) fn top_level_member<'a, T: Deserialize<'a>>(body: &'a [u8], key: &[u8]) -> Option<T> {
    let mut depth = 0usize;
    let mut i = 0;
    while let Some(&b) = body.get(i) {
        match b {
            b'"' => {
                let start = i;
                i += 1;
                while let Some(&c) = body.get(i) {
                    match c {
                        b'\\' => i += 2,
                        b'"' => break,
                        _ => i += 1,
                    }
                }
                // A key (not a value) of the object itself: a member's value follows its colon.
                if depth == 1
                    && body[start..].starts_with(key)
                    && i == start + key.len() - 1
                    && body.get(i + 1..).is_some_and(|rest| rest.trim_ascii_start().starts_with(b":"))
                {
                    return member_at(body, start, key);
                }
            }
            b'{' | b'[' => depth += 1,
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    None
}

/// The last `"usage"` member of `body` whose value parses as a `T`, looking back past those that do not.
pub(super) fn last_member_that_parses<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Option<T> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_top_level_member_is_found_only_at_the_top_level() {
        let choices = |body: &str| top_level_member::<Vec<u8>>(body.as_bytes(), b"\"choices\"");
        assert_eq!(choices(r#"{"choices":[1]}"#), Some(vec![1]));
        assert_eq!(choices(r#"{"x":{"choices":[]},"choices":[2]}"#), Some(vec![2]));
        assert_eq!(choices(r#"{"id":"choices","choices":[3]}"#), Some(vec![3]));
        assert_eq!(choices(r#"{"id":"a\"choices\":[]","choices" : [4]}"#), Some(vec![4]));
        assert_eq!(choices(r#"{"x":[{"choices":[]}]}"#), None);
        assert_eq!(choices(r#"{"note":"\\","choices":[5]}"#), Some(vec![5]));
        assert_eq!(choices(r#"{"choices""#), None);
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
}
