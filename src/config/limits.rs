//! `[limits]`, validated: where the counters live, how a request's worst case is estimated, and the rules, each
//! on one project, key or tag value.

use std::fmt;
use std::time::Duration;

use super::Secret;
use super::raw::{RawLimitRule, RawLimits};
use super::validate::{Errors, parse_duration, shown, whole};

/// `[limits]`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Where the counters live. Changes only with a restart.
    pub backend: Backend,
    /// What a request gets while the backend cannot be reached.
    pub on_backend_error: OnBackendError,
    /// The output tokens reserved for a request that sets no cap.
    pub default_max_output_tokens: u64,
    /// Input tokens are estimated as body bytes divided by this.
    pub bytes_per_input_token: u64,
    /// An unsettled reservation is released after this long.
    pub reservation_ttl: Duration,
    /// Longest wait for the backend.
    pub backend_timeout: Duration,
    /// This replica's name for the spend it rebuilds from its ledger. Changes only with a restart.
    pub instance: String,
    /// The rules, in the config's order; at most one per subject.
    pub rules: Vec<Rule>,
}

/// Where the counters live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// In this process: nothing to run, nothing shared.
    Memory,
    /// In Redis, shared by every replica pointed at it.
    Redis(RedisUrl),
}

/// Where the Redis URL comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisUrl {
    /// `redis_url` (no password).
    Given(Secret),
    /// `redis_url_env`: read when the gateway starts (configs are checked where their secrets are not).
    Env(String),
}

impl RedisUrl {
    /// The URL; the error names the variable, never its value.
    pub fn resolve(&self) -> anyhow::Result<Secret> {
        match self {
            Self::Given(url) => Ok(url.clone()),
            Self::Env(name) => {
                let url = std::env::var(name)
                    .map_err(|_| anyhow::anyhow!("limits.redis_url_env: environment variable {name} is not set"))?;
                redis_url(&url).map_err(|why| anyhow::anyhow!("limits.redis_url_env: ${name} {why}"))?;
                Ok(Secret::new(url))
            }
        }
    }
}

/// What a request gets while the backend cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnBackendError {
    /// Forwarded, unreserved; its usage is counted once the backend is back.
    Allow,
    /// Refused with 503.
    Deny,
}

/// Whom a rule limits.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Subject {
    /// One project, by name.
    Project(String),
    /// One gateway key, by name.
    Key(String),
    /// Every project carrying this tag with this value, together.
    Tag(String, String),
}

impl fmt::Display for Subject {
    /// `project:Name`, `key:name`, `tag:CostCenter=CC-1001`: as metrics label it and messages name it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Project(name) => write!(f, "project:{name}"),
            Self::Key(name) => write!(f, "key:{name}"),
            Self::Tag(tag, value) => write!(f, "tag:{tag}={value}"),
        }
    }
}

/// One limit's kind: what it counts, over which window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// Requests per UTC minute.
    RequestsPerMinute,
    /// Input tokens per UTC minute.
    InputTokensPerMinute,
    /// Output tokens per UTC minute.
    OutputTokensPerMinute,
    /// Spend per UTC day, in nano-USD.
    UsdPerDay,
    /// Spend per UTC calendar month, in nano-USD.
    UsdPerMonth,
}

impl Kind {
    /// Every kind, in the order they are checked and shown.
    pub const ALL: [Self; 5] = [
        Self::RequestsPerMinute,
        Self::InputTokensPerMinute,
        Self::OutputTokensPerMinute,
        Self::UsdPerDay,
        Self::UsdPerMonth,
    ];

    /// The setting's name, as metrics label it.
    pub fn name(self) -> &'static str {
        match self {
            Self::RequestsPerMinute => "requests_per_minute",
            Self::InputTokensPerMinute => "input_tokens_per_minute",
            Self::OutputTokensPerMinute => "output_tokens_per_minute",
            Self::UsdPerDay => "usd_per_day",
            Self::UsdPerMonth => "usd_per_month",
        }
    }

    /// Whether it is a budget (spend) rather than a rate.
    pub fn is_budget(self) -> bool {
        matches!(self, Self::UsdPerDay | Self::UsdPerMonth)
    }
}

/// Nano-USD in one USD: spend is counted in whole nano-dollars, exact in every backend.
pub const NANOS_PER_USD: f64 = 1e9;

/// One rule: a subject and its limits (requests, tokens, or nano-USD), by kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Whom it limits.
    pub subject: Subject,
    /// The limits set, each with its kind; at least one.
    pub limits: Vec<(Kind, u64)>,
}

/// The largest budget: counters compare spend as nano-USD in Redis's Lua numbers (doubles), exact up to 2^53, a
/// little over nine million dollars.
const MAX_USD: f64 = 9e6;

/// `[limits]`, validated against the config's project and key names.
pub(super) fn validate(errs: &mut Errors, raw: RawLimits, projects: &[String], keys: &[String]) -> Limits {
    let backend = match (raw.backend.as_str(), &raw.redis_url, &raw.redis_url_env) {
        ("memory", None, None) => Backend::Memory,
        ("memory", ..) => {
            errs.push("limits.redis_url", "applies only to backend = \"redis\"");
            Backend::Memory
        }
        ("redis", Some(_), Some(_)) => {
            errs.push("limits.redis_url_env", "set either redis_url or redis_url_env, not both");
            Backend::Memory
        }
        ("redis", None, None) => {
            errs.push("limits.redis_url", "required when backend = \"redis\" (or redis_url_env)");
            Backend::Memory
        }
        ("redis", Some(url), None) => match redis_url(url) {
            Ok(()) if url_has_password(url) => {
                errs.push(
                    "limits.redis_url",
                    "holds a password: put the URL in an environment variable and name it in limits.redis_url_env",
                );
                Backend::Memory
            }
            Ok(()) => Backend::Redis(RedisUrl::Given(Secret::new(url.clone()))),
            Err(why) => {
                errs.push("limits.redis_url", why);
                Backend::Memory
            }
        },
        ("redis", None, Some(name)) => match std::env::var(name) {
            _ if !super::validate::is_env_name(name) => {
                errs.push("limits.redis_url_env", format!("{} is not an environment variable name", shown(name)));
                Backend::Memory
            }
            // Set here: it must be a URL the client can use. Unset: `serve` needs it, `check` warns.
            Ok(url) => match redis_url(&url) {
                Ok(()) => Backend::Redis(RedisUrl::Env(name.clone())),
                Err(why) => {
                    errs.push("limits.redis_url_env", format!("${name} {why}"));
                    Backend::Memory
                }
            },
            Err(_) => Backend::Redis(RedisUrl::Env(name.clone())),
        },
        (other, ..) => {
            errs.push("limits.backend", format!("{} is not one of \"memory\", \"redis\"", shown(other)));
            Backend::Memory
        }
    };
    let on_backend_error = match raw.on_backend_error.as_str() {
        "allow" => OnBackendError::Allow,
        "deny" => OnBackendError::Deny,
        other => {
            errs.push("limits.on_backend_error", format!("{} is not one of \"allow\", \"deny\"", shown(other)));
            OnBackendError::Allow
        }
    };
    let positive = |errs: &mut Errors, key: &str, value| match whole(errs, key, value) {
        Some(0) => {
            errs.push(key, "must be greater than 0");
            1
        }
        Some(n) => n,
        None => 1,
    };
    let default_max_output_tokens = positive(errs, "limits.default_max_output_tokens", &raw.default_max_output_tokens);
    let bytes_per_input_token = positive(errs, "limits.bytes_per_input_token", &raw.bytes_per_input_token);
    let reservation_ttl = parse_duration(errs, "limits.reservation_ttl", &raw.reservation_ttl, false);
    let backend_timeout = parse_duration(errs, "limits.backend_timeout", &raw.backend_timeout, false);
    let instance = match raw.instance.as_str() {
        "" => host_name(),
        name if name.len() <= 128 && !name.contains(char::is_whitespace) => name.to_owned(),
        name => {
            errs.push("limits.instance", format!("{} is not a name without spaces", shown(name)));
            host_name()
        }
    };
    let mut rules: Vec<Rule> = Vec::new();
    for (i, raw) in raw.rules.into_iter().enumerate() {
        let at = format!("limits.rules[{i}]");
        if let Some(rule) = validate_rule(errs, &at, raw, projects, keys) {
            if rules.iter().any(|r| r.subject == rule.subject) {
                errs.push(&at, format!("{} already has a rule: put all its limits in one", rule.subject));
            } else {
                rules.push(rule);
            }
        }
    }
    Limits {
        backend,
        on_backend_error,
        default_max_output_tokens,
        bytes_per_input_token,
        reservation_ttl,
        backend_timeout,
        instance,
        rules,
    }
}

fn validate_rule(errs: &mut Errors, at: &str, raw: RawLimitRule, projects: &[String], keys: &[String]) -> Option<Rule> {
    let subject = match (raw.project, raw.key, raw.tag.len()) {
        (Some(name), None, 0) if projects.contains(&name) => Subject::Project(name),
        (Some(name), None, 0) => {
            errs.push(format!("{at}.project"), format!("no project named {name:?}"));
            return None;
        }
        (None, Some(name), 0) if keys.contains(&name) => Subject::Key(name),
        (None, Some(name), 0) => {
            errs.push(format!("{at}.key"), format!("no key named {name:?}"));
            return None;
        }
        (None, None, 1) => {
            let (tag, value) = raw.tag.into_iter().next()?;
            if tag.is_empty() || value.is_empty() {
                errs.push(format!("{at}.tag"), "names a tag and a value, neither empty");
                return None;
            }
            Subject::Tag(tag, value)
        }
        _ => {
            errs.push(at, "names exactly one of project, key, or tag (one tag = value)");
            return None;
        }
    };
    let mut limits = Vec::new();
    let set = [&raw.requests_per_minute, &raw.input_tokens_per_minute, &raw.output_tokens_per_minute]
        .iter()
        .any(|v| v.is_some())
        || raw.usd_per_day.is_some()
        || raw.usd_per_month.is_some();
    let counts = [
        (Kind::RequestsPerMinute, raw.requests_per_minute),
        (Kind::InputTokensPerMinute, raw.input_tokens_per_minute),
        (Kind::OutputTokensPerMinute, raw.output_tokens_per_minute),
    ];
    for (kind, value) in counts {
        if let Some(n) = value.and_then(|v| whole(errs, &format!("{at}.{}", kind.name()), &v)) {
            limits.push((kind, n));
        }
    }
    for (kind, usd) in [(Kind::UsdPerDay, raw.usd_per_day), (Kind::UsdPerMonth, raw.usd_per_month)] {
        match usd {
            None => {}
            Some(usd) if usd.is_finite() && (0.0..=MAX_USD).contains(&usd) => {
                limits.push((kind, (usd * NANOS_PER_USD).round() as u64));
            }
            Some(usd) => {
                errs.push(format!("{at}.{}", kind.name()), format!("{usd} is not an amount from 0 to {MAX_USD}"))
            }
        }
    }
    if !set {
        errs.push(at, "sets no limit (requests_per_minute, input_tokens_per_minute, ..., usd_per_month)");
        return None;
    }
    (!limits.is_empty()).then_some(Rule { subject, limits })
}

/// Whether `url` is a Redis URL the client can use; the reason if not (never quoting it: it may hold a password).
fn redis_url(url: &str) -> Result<(), String> {
    if !(url.starts_with("redis://") || url.starts_with("rediss://") || url.starts_with("unix://")) {
        return Err("is not a redis://, rediss:// or unix:// URL".into());
    }
    redis::IntoConnectionInfo::into_connection_info(url)
        .map(|_| ())
        .map_err(|_| "is not a Redis URL the client can use".to_owned())
}

/// Whether `url` holds a password (`redis://:secret@host`, `redis://user:secret@host`).
fn url_has_password(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    authority.rsplit_once('@').is_some_and(|(userinfo, _)| userinfo.contains(':'))
}

/// The host's name: `$HOSTNAME` (a pod's name), else the kernel's, else `gateway`.
fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty() && !name.contains(char::is_whitespace))
        .unwrap_or_else(|| "gateway".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_in_urls_are_found() {
        assert!(url_has_password("redis://:pw@host:6379/0"));
        assert!(url_has_password("redis://user:pw@host"));
        assert!(!url_has_password("redis://user@host"));
        assert!(!url_has_password("redis://host:6379/0"));
        assert!(!url_has_password("redis://host/0?x=a:b@c"));
    }
}
