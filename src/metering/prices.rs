//! What tokens cost: public Bedrock prices per 1M tokens as built-in defaults, overridden or extended by
//! `[[prices]]` in the config. A model with no price is metered in tokens and counted as unpriced.

use std::collections::HashMap;

use super::usage::Usage;

/// USD per 1M tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Price {
    /// Uncached input.
    pub input: f64,
    /// Output (reasoning included).
    pub output: f64,
    /// Input served from the prompt cache.
    pub cached_input: f64,
}

impl Price {
    /// The cost of `usage`, in USD, to the nearest millionth of a cent: finer than any price, and coarse
    /// enough that binary floating point's residue (`0.000013199999999999999` for 12 input and 19 output
    /// tokens at 0.15 and 0.60) does not reach the ledger and the logs.
    pub fn cost(&self, usage: &Usage) -> f64 {
        let cached = usage.cached_input.min(usage.input);
        let uncached = usage.input - cached;
        let per_million =
            uncached as f64 * self.input + cached as f64 * self.cached_input + usage.output as f64 * self.output;
        (per_million * 1e6).round() / 1e12
    }
}

/// Public on-demand prices (us-east-1) for the models DESIGN.md names. No cached-input discount is assumed
/// unless configured, so the default never under-reports.
const DEFAULTS: [(&str, f64, f64); 4] = [
    ("openai.gpt-oss-120b", 0.15, 0.60),
    ("openai.gpt-oss-20b", 0.075, 0.30),
    ("openai.gpt-5.4", 2.75, 16.50),
    ("openai.gpt-5.5", 5.50, 33.00),
];

/// Prices by model id.
#[derive(Debug, Clone)]
pub struct PriceTable(HashMap<String, Price>);

impl PriceTable {
    /// The defaults, with `overrides` replacing or adding models.
    pub fn new(overrides: &[(String, Price)]) -> Self {
        let mut table: HashMap<String, Price> = DEFAULTS
            .iter()
            .map(|(model, input, output)| {
                ((*model).to_owned(), Price { input: *input, output: *output, cached_input: *input })
            })
            .collect();
        table.extend(overrides.iter().cloned());
        Self(table)
    }

    /// The price of `model`, if known.
    pub fn get(&self, model: &str) -> Option<&Price> {
        self.0.get(model)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_counts_cached_input_at_its_own_price() {
        let p = Price { input: 2.0, output: 10.0, cached_input: 0.5 };
        let u = Usage { input: 1_000_000, output: 200_000, cached_input: 400_000, reasoning: 50_000 };
        assert!((p.cost(&u) - (0.6 * 2.0 + 0.4 * 0.5 + 0.2 * 10.0)).abs() < 1e-12);
    }

    #[test]
    fn costs_are_written_without_floating_point_residue() {
        let p = Price { input: 0.15, output: 0.60, cached_input: 0.15 };
        let cost = |input, output| p.cost(&Usage { input, output, cached_input: 0, reasoning: 0 });
        assert_eq!(serde_json::to_string(&cost(12, 19)).expect("number"), "0.0000132");
        assert_eq!(cost(12, 16), 0.0000114);
        assert_eq!(cost(1, 0), 0.00000015);
        assert_eq!(cost(3_000_000_000, 1_000_000_000), 1050.0);
    }

    #[test]
    fn defaults_and_overrides() {
        let t = PriceTable::new(&[("custom.model".into(), Price { input: 1.0, output: 2.0, cached_input: 0.1 })]);
        let u = Usage { input: 1000, output: 500, cached_input: 0, reasoning: 0 };
        let cost = t.get("openai.gpt-oss-120b").expect("default").cost(&u);
        assert!((cost - (1000.0 * 0.15 + 500.0 * 0.60) / 1e6).abs() < 1e-15);
        assert_eq!(t.get("custom.model").map(|p| p.cached_input), Some(0.1));
        assert!(t.get("unknown.model").is_none());
    }
}
