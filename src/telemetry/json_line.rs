//! One JSON object written field by field into a `String`, for the lines written once per request (the access
//! line and the usage ledger line). serde's derive spent a few thousand instructions per line, most of it
//! escaping strings a byte at a time; here a string with nothing to escape (nearly all of them) is checked in
//! one pass the compiler vectorizes and copied whole, and only the rest goes through serde_json, so every
//! value is written exactly as serde_json writes it (numbers by the same `itoa` and `zmij` it uses).

use std::fmt::Write as _;

/// A JSON object being written at the end of a caller's buffer, so that a line per request can reuse one
/// buffer rather than allocate its own. Keys are the caller's constants and are written as they are.
pub struct JsonLine<'a> {
    text: &'a mut String,
    empty: bool,
}

impl<'a> JsonLine<'a> {
    /// Starts an object (`{`) at the end of `text`.
    pub fn open(text: &'a mut String) -> Self {
        text.push('{');
        Self { text, empty: true }
    }

    fn key(&mut self, key: &str) {
        debug_assert!(needs_no_escape(key.as_bytes()), "JSON keys here are plain constants: {key}");
        if !std::mem::take(&mut self.empty) {
            self.text.push(',');
        }
        self.text.push('"');
        self.text.push_str(key);
        self.text.push_str("\":");
    }

    /// A string member.
    pub fn str(&mut self, key: &str, value: &str) -> &mut Self {
        self.key(key);
        push_string(self.text, value);
        self
    }

    /// A number member.
    pub fn u64(&mut self, key: &str, value: u64) -> &mut Self {
        self.key(key);
        self.text.push_str(itoa::Buffer::new().format(value));
        self
    }

    /// A number member; `null` if it is not finite, as serde_json writes it.
    pub fn f64(&mut self, key: &str, value: f64) -> &mut Self {
        self.key(key);
        if value.is_finite() {
            self.text.push_str(zmij::Buffer::new().format_finite(value));
        } else {
            self.text.push_str("null");
        }
        self
    }

    /// A boolean member.
    pub fn bool(&mut self, key: &str, value: bool) -> &mut Self {
        self.key(key);
        self.text.push_str(if value { "true" } else { "false" });
        self
    }

    /// A string member, or `null`.
    pub fn str_or_null(&mut self, key: &str, value: Option<&str>) -> &mut Self {
        match value {
            Some(value) => self.str(key, value),
            None => self.null(key),
        }
    }

    /// A number member, or `null`.
    pub fn f64_or_null(&mut self, key: &str, value: Option<f64>) -> &mut Self {
        match value {
            Some(value) => self.f64(key, value),
            None => self.null(key),
        }
    }

    /// A `null` member.
    pub fn null(&mut self, key: &str) -> &mut Self {
        self.key(key);
        self.text.push_str("null");
        self
    }

    /// Members already rendered as JSON (`"a":1,"b":2`), written as they are.
    pub fn members(&mut self, members: &str) -> &mut Self {
        if !members.is_empty() {
            if !std::mem::take(&mut self.empty) {
                self.text.push(',');
            }
            self.text.push_str(members);
        }
        self
    }

    /// Closes the object.
    pub fn close(self) {
        self.text.push('}');
    }
}

/// Whether a string can be written between quotes as it is: no quote, backslash or control character.
/// (serde_json escapes nothing else.) A byte-wide OR with no early exit, so that the loop is vectorized.
fn needs_no_escape(bytes: &[u8]) -> bool {
    bytes.iter().fold(0u8, |found, &b| found | u8::from((b < 0x20) | (b == b'"') | (b == b'\\'))) == 0
}

fn push_string(text: &mut String, value: &str) {
    if needs_no_escape(value.as_bytes()) {
        text.reserve(value.len() + 2);
        text.push('"');
        text.push_str(value);
        text.push('"');
    } else {
        // Serializing a str to JSON cannot fail.
        let _ = write!(text, "{}", serde_json::Value::from(value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_written_as_serde_json_writes_them() {
        let mut tricky: Vec<String> =
            ["", "plain", "quote\"d", "back\\slash", "tab\tnew\nline\r", "\u{0}\u{1f}\u{7f}", "émoji 🦀", "</script>"]
                .map(String::from)
                .to_vec();
        // Every byte value that is a whole character, at every position a 32-byte vector sees.
        for c in (0u8..0x80).map(char::from) {
            for at in [0, 15, 31, 32, 40] {
                tricky.push(format!("{}{c}{}", "a".repeat(at), "b".repeat(3)));
            }
        }
        for s in &tricky {
            let expected = serde_json::json!({ "k": s }).to_string();
            assert_eq!(
                written(|line| {
                    line.str("k", s);
                }),
                expected,
                "{s:?}"
            );
        }
    }

    /// The object `fill` writes.
    fn written(fill: impl FnOnce(&mut JsonLine<'_>)) -> String {
        let mut text = String::new();
        let mut line = JsonLine::open(&mut text);
        fill(&mut line);
        line.close();
        text
    }

    #[test]
    fn an_object_is_written_after_what_the_buffer_holds() {
        let mut text = String::from("{\"a\":1}\n");
        let mut line = JsonLine::open(&mut text);
        line.u64("b", 2);
        line.close();
        assert_eq!(text, "{\"a\":1}\n{\"b\":2}");
    }

    #[test]
    fn members_are_written_in_order_and_numbers_as_serde_json_writes_them() {
        let text = written(|line| {
            line.str("a", "x")
                .u64("n", u64::MAX)
                .f64("f", 0.000_123_4)
                .f64("big", 1.5e300)
                .f64("whole", 2.0)
                .f64("nan", f64::NAN)
                .f64_or_null("none", None)
                .str_or_null("s", None)
                .bool("t", true)
                .bool("u", false)
                .members("")
                .members("\"p\":\"q\",\"tags\":{}");
        });
        let value: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
        let expected = serde_json::json!({
            "a": "x", "n": u64::MAX, "f": 0.000_123_4, "big": 1.5e300, "whole": 2.0, "nan": null, "none": null,
            "s": null, "t": true, "u": false, "p": "q", "tags": {}
        });
        assert_eq!(value, expected);
        // The same text serde_json writes for the same members in the same order.
        assert_eq!(
            text,
            r#"{"a":"x","n":18446744073709551615,"f":0.0001234,"big":1.5e+300,"whole":2.0,"nan":null,"none":null,"s":null,"t":true,"u":false,"p":"q","tags":{}}"#
        );
        for n in [0.0, -0.0, 1e-7, 0.1 + 0.2, 123_456.789, 1e21, f64::MAX, f64::MIN_POSITIVE, f64::INFINITY] {
            let expected = format!("{{\"n\":{}}}", serde_json::to_string(&n).expect("number"));
            assert_eq!(
                written(|line| {
                    line.f64("n", n);
                }),
                expected
            );
        }
        assert_eq!(written(|_| ()), "{}");
        assert_eq!(
            written(|line| {
                line.members("\"p\":1");
            }),
            "{\"p\":1}"
        );
    }
}
