//! `[reconcile]`, validated: whether and how often `serve` compares its own ledger with the token counts AWS
//! publishes in CloudWatch (`AWS/BedrockMantle`), how far back, and how close the two must be.

use std::time::Duration;

use super::raw::RawReconcile;
use super::validate::{Errors, parse_duration, shown};
use super::{Metering, Upstream};

/// The tolerance when none is configured: counts within 2% of the larger are `ok`. Request boundaries (a
/// request counted in the hour it ended on one side and in another hour on the other) stay well inside it on
/// any but a nearly idle project.
pub const DEFAULT_TOLERANCE: f64 = 2.0;

/// The shortest interval: CloudWatch's periods here are an hour, and each run reads the lookback's ledger again.
const MIN_INTERVAL: Duration = Duration::from_secs(5 * 60);

/// The longest lookback: each run reads that much of the ledger again.
const MAX_LOOKBACK: Duration = Duration::from_secs(14 * 24 * 3600);

/// `[reconcile]`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Reconcile {
    /// How often `serve` reconciles; none never.
    pub interval: Option<Duration>,
    /// How far back each run looks: whole hours.
    pub lookback: Duration,
    /// How far apart the two counts may be, in percent of the larger, and still be `ok`.
    pub tolerance: f64,
    /// The region whose CloudWatch is read: `upstream.region`, else the one `upstream.base_url`'s host names;
    /// none when neither says (the command line then takes the AWS SDK's own region settings).
    pub region: Option<String>,
}

pub(super) fn validate(errs: &mut Errors, raw: &RawReconcile, upstream: &Upstream, metering: &Metering) -> Reconcile {
    let interval = Some(parse_duration(errs, "reconcile.interval", &raw.interval, true)).filter(|d| !d.is_zero());
    let lookback = parse_duration(errs, "reconcile.lookback", &raw.lookback, false);
    if !lookback.as_secs().is_multiple_of(3600) || lookback.subsec_nanos() != 0 {
        errs.push(
            "reconcile.lookback",
            format!("{} is not whole hours (CloudWatch's period here is an hour)", shown(&raw.lookback)),
        );
    } else if lookback > MAX_LOOKBACK {
        errs.push("reconcile.lookback", "is more than 14d (each run reads that much of the ledger again)");
    }
    if !raw.tolerance.is_finite() || !(0.0..100.0).contains(&raw.tolerance) {
        errs.push("reconcile.tolerance", format!("{} is not a percentage from 0 to below 100", raw.tolerance));
    }
    let region = upstream.region.clone().or_else(|| super::validate::region_of_host(upstream.authority.host()));
    if let Some(interval) = interval {
        if interval < MIN_INTERVAL {
            errs.push("reconcile.interval", "must be 0s (off) or at least 5m (CloudWatch's periods here are an hour)");
        }
        if metering.ledger_path.is_none() {
            errs.push(
                "reconcile.interval",
                "needs metering.ledger_path: the gateway's side of the comparison is its ledger",
            );
        }
        if region.is_none() {
            errs.push(
                "reconcile.interval",
                format!(
                    "needs a region to read CloudWatch in: set upstream.region (the host of upstream.base_url, {}, names none)",
                    upstream.authority.host()
                ),
            );
        }
    }
    Reconcile { interval, lookback, tolerance: raw.tolerance, region }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    fn errors(toml: &str) -> Vec<String> {
        match crate::Config::from_toml(toml) {
            Ok(_) => Vec::new(),
            Err(e) => e.downcast::<super::super::ConfigErrors>().map(|e| e.0).unwrap_or_else(|e| vec![e.to_string()]),
        }
    }

    const BASE: &str = "[callers]\nauth = \"none\"\n[[projects]]\nname = \"A\"\nid = \"proj_a\"\n";
    const LEDGER: &str = "[metering]\nledger_path = \"/tmp/usage.jsonl\"\n";

    #[test]
    fn off_by_default_with_the_upstreams_region() {
        let config = crate::Config::from_toml(BASE).expect("valid");
        let r = config.reconcile;
        assert_eq!((r.interval, r.lookback, r.tolerance), (None, Duration::from_secs(6 * 3600), 2.0));
        assert_eq!(r.region.as_deref(), Some("us-east-1"), "the default host names its region");
        let on = crate::Config::from_toml(&format!(
            "{BASE}{LEDGER}[reconcile]\ninterval = \"1h\"\nlookback = \"24h\"\ntolerance = 0.5\n"
        ))
        .expect("valid");
        assert_eq!(on.reconcile.interval, Some(Duration::from_secs(3600)));
        assert_eq!((on.reconcile.lookback, on.reconcile.tolerance), (Duration::from_secs(86_400), 0.5));
    }

    #[test]
    fn a_schedule_needs_a_ledger_a_region_and_sane_numbers() {
        assert_eq!(
            errors(&format!("{BASE}[reconcile]\ninterval = \"1h\"\n")),
            ["reconcile.interval: needs metering.ledger_path: the gateway's side of the comparison is its ledger"]
        );
        let local = "[upstream]\nbase_url = \"http://127.0.0.1:9000\"\n";
        assert_eq!(
            errors(&format!("{BASE}{LEDGER}{local}[reconcile]\ninterval = \"1h\"\n")),
            ["reconcile.interval: needs a region to read CloudWatch in: set upstream.region (the host of \
              upstream.base_url, 127.0.0.1, names none)"]
        );
        assert!(
            errors(&format!("{BASE}{LEDGER}{local}region = \"eu-west-1\"\n[reconcile]\ninterval = \"1h\"\n"))
                .is_empty()
        );
        assert_eq!(
            errors(&format!("{BASE}{LEDGER}[reconcile]\ninterval = \"1m\"\nlookback = \"90m\"\ntolerance = 100.0\n")),
            [
                "reconcile.lookback: \"90m\" is not whole hours (CloudWatch's period here is an hour)",
                "reconcile.tolerance: 100 is not a percentage from 0 to below 100",
                "reconcile.interval: must be 0s (off) or at least 5m (CloudWatch's periods here are an hour)",
            ]
        );
        assert_eq!(
            errors(&format!("{BASE}[reconcile]\nlookback = \"15d\"\n")),
            ["reconcile.lookback: is more than 14d (each run reads that much of the ledger again)"]
        );
    }
}
