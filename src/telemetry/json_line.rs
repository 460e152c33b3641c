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

    /// A duration in milliseconds with microsecond resolution, as `f64` [`Self::f64`] writes
    /// `d.as_micros() as f64 / 1000.0`, but from integer digits: a float's shortest form costs more than the
    /// rest of the member. Below 10^12 ms (some 31 years) the three-decimal value has at most 15 significant
    /// digits, so it survives the trip through the float, and the float's spacing is under 0.001, so no shorter
    /// decimal maps to the same float: its shortest form is those decimals without trailing zeros.
    pub fn millis(&mut self, key: &str, d: std::time::Duration) -> &mut Self {
        const EXACT: u128 = 1_000_000_000_000_000;
        let micros = d.as_micros();
        if micros >= EXACT {
            return self.f64(key, micros as f64 / 1000.0);
        }
        self.key(key);
        let micros = micros as u64;
        self.text.push_str(itoa::Buffer::new().format(micros / 1000));
        let fraction = micros % 1000;
        if fraction == 0 {
            self.text.push_str(".0");
        } else {
            // `.5`, `.25`, `.125`: the digits down to the last that is not zero.
            self.text.push('.');
            let mut scale = 100;
            let mut rest = fraction;
            while rest != 0 {
                self.text.push(char::from(b'0' + (rest / scale) as u8));
                rest %= scale;
                scale /= 10;
            }
        }
        self
    }

    /// [`Self::millis`], or `null`.
    pub fn millis_or_null(&mut self, key: &str, d: Option<std::time::Duration>) -> &mut Self {
        match d {
            Some(d) => self.millis(key, d),
            None => self.null(key),
        }
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
    fn milliseconds_are_written_as_the_float_would_be() {
        use std::time::Duration;
        let float = |micros: u64| {
            written(|line| {
                line.f64("ms", micros as f64 / 1000.0);
            })
        };
        let exact = |micros: u64| {
            written(|line| {
                line.millis("ms", Duration::from_micros(micros));
            })
        };
        // Every fraction, over whole values with one to many digits, and the edge of exactness.
        let wholes = [0, 1, 9, 10, 999, 1_000, 123_456, 86_400_000, 99_999_999_999, 999_999_999_999, 1 << 43];
        for whole in wholes {
            for fraction in 0..1000 {
                let micros = whole * 1000 + fraction;
                assert_eq!(exact(micros), float(micros), "{micros} us");
            }
        }
        // From 10^12 ms on, the float itself is written.
        for micros in [1_000_000_000_000_000, (1 << 53) + 1, u64::MAX] {
            assert_eq!(exact(micros), float(micros), "{micros} us");
        }
        assert_eq!(exact(1_500), r#"{"ms":1.5}"#);
        assert_eq!(exact(2_000), r#"{"ms":2.0}"#);
        assert_eq!(exact(7), r#"{"ms":0.007}"#);
        assert_eq!(
            written(|line| {
                line.millis_or_null("ms", None);
            }),
            r#"{"ms":null}"#
        );
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
