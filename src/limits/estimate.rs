//! A request's worst case, reserved before it is forwarded. The gateway has no tokenizer: input tokens are
//! estimated from the body's size (with the default of one byte per token, an upper bound for text, since every
//! token covers at least one byte of it and the JSON around a message is longer than the few tokens its template
//! adds), output tokens are the request's own cap (times the answers it asks for), or a configured default when it
//! sets none; the spend is their price.

use crate::config::limits::Limits;
use crate::metering::prices::PriceTable;
use crate::metering::usage::Usage;
use crate::proxy::body::Facts;

use super::{Amounts, Demand};

/// Most answers one request may ask for (`n`) that the estimate believes; more is upstream's to refuse.
const MAX_CHOICES: u64 = 128;
/// The largest output cap the estimate believes (no model writes more): a caller's `max_tokens: 3e14` must not
/// make a reservation the counters cannot hold.
const MAX_OUTPUT: u64 = 10_000_000;

/// The demand of a request that bills tokens, from its body's `facts` and length.
pub fn billed(facts: &Facts, body_len: usize, limits: &Limits, prices: &PriceTable) -> Demand {
    let input = (body_len as u64).div_ceil(limits.bytes_per_input_token);
    let cap = facts.max_output.unwrap_or(limits.default_max_output_tokens).min(MAX_OUTPUT);
    let output = cap.saturating_mul(facts.choices.unwrap_or(1).clamp(1, MAX_CHOICES));
    let usage = Usage { input, output, cached_input: 0, reasoning: 0 };
    let price = facts.model.as_deref().and_then(|m| prices.get(m));
    let cost = price.map_or(0.0, |p| p.cost(&usage));
    Demand {
        amounts: Amounts { requests: 1, input, output, nanos: super::nanos(cost) },
        billed: true,
        priced: price.is_some(),
    }
}

/// The demand of a request that bills no tokens (a model list, a stored response fetched): one request.
pub fn unbilled() -> Demand {
    Demand { amounts: Amounts { requests: 1, ..Amounts::default() }, billed: false, priced: true }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        crate::config::Config::parse("[callers]\nauth = \"none\"", false).expect("defaults").limits
    }

    #[test]
    fn the_worst_case_is_the_body_the_cap_and_their_price() {
        let prices = PriceTable::new(&[]);
        let facts = |max_output, choices| Facts {
            model: Some("openai.gpt-oss-120b".into()),
            max_output,
            choices,
            ..Facts::default()
        };
        let d = billed(&facts(Some(100), None), 1000, &limits(), &prices);
        // 1000 input at $0.15/M and 100 output at $0.60/M.
        assert_eq!(d.amounts, Amounts { requests: 1, input: 1000, output: 100, nanos: 150_000 + 60_000 });
        // No cap: the default; three answers: three times the cap.
        assert_eq!(billed(&facts(None, None), 10, &limits(), &prices).amounts.output, 4096);
        assert_eq!(billed(&facts(Some(50), Some(3)), 10, &limits(), &prices).amounts.output, 150);
        // An unpriced model costs nothing, is still billed, and says it is unpriced (a budget refuses it).
        let unpriced = Facts { model: Some("someone.else".into()), ..facts(Some(1), None) };
        let d = billed(&unpriced, 10, &limits(), &prices);
        assert_eq!((d.amounts.nanos, d.billed, d.priced), (0, true, false));
        // A cap no model writes is held at the most any does, so the counters can hold it.
        assert_eq!(
            billed(&facts(Some(300_000_000_000_000), Some(1000)), 10, &limits(), &prices).amounts.output,
            1_280_000_000
        );
        let mut coarse = limits();
        coarse.bytes_per_input_token = 4;
        assert_eq!(billed(&facts(Some(1), None), 1001, &coarse, &prices).amounts.input, 251);
    }
}
