//! The configuration file as written: plain strings and numbers, every field documented, unknown keys
//! rejected. Nothing here is trusted yet; [`super::validate`] turns it into the typed [`super::Config`].
//! (`Serialize` is for [`super::schema`], which learns the known keys from the defaults.)

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A whole number as written. Anything else (`1.5`, `-1`, `"ten"`) is kept as written, for validation to report
/// with every other problem, rather than rounded (a `max_body_bytes` of 1.5 would be 2 bytes) or allowed to
/// stop the whole file's checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Whole {
    /// A whole number, 0 or more.
    Number(u64),
    /// Something else, as written.
    Not(String),
}

impl Whole {
    /// The number, or what was written instead.
    pub fn number(&self) -> Result<u64, &str> {
        match self {
            Self::Number(n) => Ok(*n),
            Self::Not(written) => Err(written),
        }
    }
}

impl Serialize for Whole {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Number(n) => serializer.serialize_u64(*n),
            Self::Not(written) => serializer.serialize_str(written),
        }
    }
}

impl<'de> Deserialize<'de> for Whole {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Whole;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a whole number")
            }
            fn visit_u64<E>(self, n: u64) -> Result<Whole, E> {
                Ok(Whole::Number(n))
            }
            fn visit_i64<E>(self, n: i64) -> Result<Whole, E> {
                Ok(u64::try_from(n).map_or_else(|_| Whole::Not(n.to_string()), Whole::Number))
            }
            // `{:?}`, so that 2.0 shows as written, not as the whole number 2 it is not.
            fn visit_f64<E>(self, n: f64) -> Result<Whole, E> {
                Ok(Whole::Not(format!("{n:?}")))
            }
            fn visit_bool<E>(self, b: bool) -> Result<Whole, E> {
                Ok(Whole::Not(b.to_string()))
            }
            // An environment override is text: digits only, as written.
            fn visit_str<E>(self, s: &str) -> Result<Whole, E> {
                let digits = !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
                Ok(match s.parse() {
                    Ok(n) if digits => Whole::Number(n),
                    _ => Whole::Not(super::validate::shown(s)),
                })
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// The whole file. Each section has defaults, so an empty file is a (useless but) parseable config.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    /// Listeners and request limits.
    pub server: RawServer,
    /// Where and how requests are forwarded.
    pub upstream: RawUpstream,
    /// How callers prove who they are.
    pub callers: RawCallers,
    /// What happens to requests no rule attributes.
    pub attribution: RawAttribution,
    /// Tag rules every project must satisfy.
    pub taxonomy: RawTaxonomy,
    /// The projects requests are attributed to.
    pub projects: Vec<RawProject>,
    /// Gateway keys callers present, stored as SHA-256 hashes.
    pub keys: Vec<RawKey>,
    /// Path prefixes that select a project.
    pub routes: Vec<RawRoute>,
    /// Usage metering.
    pub metering: RawMetering,
    /// Price overrides per model.
    pub prices: Vec<RawPrice>,
    /// Rate limits and budgets.
    pub limits: RawLimits,
    /// The gateway's ledger compared with AWS's own counts, on a schedule.
    pub reconcile: RawReconcile,
}

/// `[reconcile]`
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawReconcile {
    /// How often `serve` compares its ledger with CloudWatch's `AWS/BedrockMantle` counts; `0s` never.
    pub interval: String,
    /// How far back each comparison looks: whole hours, ending at the last whole hour before 15 minutes ago.
    pub lookback: String,
    /// How far apart the gateway's and AWS's counts may be, in percent of the larger, and still be `ok`.
    pub tolerance: f64,
}

impl Default for RawReconcile {
    fn default() -> Self {
        Self { interval: "0s".into(), lookback: "6h".into(), tolerance: super::reconcile::DEFAULT_TOLERANCE }
    }
}

/// `[limits]`
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLimits {
    /// Where the counters live: `memory` (this process) or `redis` (shared by every replica).
    pub backend: String,
    /// The Redis URL (`redis://host:6379/0`, `rediss://` for TLS), without a password.
    pub redis_url: Option<String>,
    /// Environment variable holding the Redis URL (which may hold a password).
    pub redis_url_env: Option<String>,
    /// What a request gets while the backend cannot be reached: `allow` or `deny`.
    pub on_backend_error: String,
    /// The output tokens reserved for a request that sets no cap of its own.
    pub default_max_output_tokens: Whole,
    /// Input tokens are estimated as the request body's bytes divided by this.
    pub bytes_per_input_token: Whole,
    /// A reservation still unsettled after this long is released (its request's replica died).
    pub reservation_ttl: String,
    /// Longest wait for the backend before `on_backend_error` applies.
    pub backend_timeout: String,
    /// This replica's name, under which it rebuilds its share of spend from its ledger; default: the host name.
    pub instance: String,
    /// The limits, each on a project, a key or a tag value.
    pub rules: Vec<RawLimitRule>,
}

impl Default for RawLimits {
    fn default() -> Self {
        Self {
            backend: "memory".into(),
            redis_url: None,
            redis_url_env: None,
            on_backend_error: "allow".into(),
            default_max_output_tokens: Whole::Number(4096),
            bytes_per_input_token: Whole::Number(1),
            reservation_ttl: "15m".into(),
            backend_timeout: "250ms".into(),
            instance: String::new(),
            rules: Vec::new(),
        }
    }
}

/// One `[[limits.rules]]` entry: what one project, key or tag value may use. Every limit set must admit a request.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimitRule {
    /// A project's name.
    #[serde(default)]
    pub project: Option<String>,
    /// A key's name.
    #[serde(default)]
    pub key: Option<String>,
    /// One tag and its value (`{ CostCenter = "CC-1001" }`): every project carrying it, together.
    #[serde(default)]
    pub tag: BTreeMap<String, String>,
    /// Requests per UTC minute.
    #[serde(default)]
    pub requests_per_minute: Option<Whole>,
    /// Input tokens per UTC minute.
    #[serde(default)]
    pub input_tokens_per_minute: Option<Whole>,
    /// Output tokens per UTC minute.
    #[serde(default)]
    pub output_tokens_per_minute: Option<Whole>,
    /// USD per UTC day.
    #[serde(default)]
    pub usd_per_day: Option<f64>,
    /// USD per UTC calendar month.
    #[serde(default)]
    pub usd_per_month: Option<f64>,
}

/// `[metering]`
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawMetering {
    /// Read token usage from responses (and ask for it on chat streams).
    pub enabled: bool,
    /// JSON-lines usage ledger; none when unset.
    pub ledger_path: Option<String>,
}

impl Default for RawMetering {
    fn default() -> Self {
        Self { enabled: true, ledger_path: None }
    }
}

/// One `[[prices]]` entry: USD per 1M tokens.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawPrice {
    /// Model id as callers send it.
    pub model: String,
    /// Uncached input.
    pub input: f64,
    /// Output.
    pub output: f64,
    /// Cached input; defaults to `input`.
    #[serde(default)]
    pub cached_input: Option<f64>,
}

/// `[server]`
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawServer {
    /// Address for OpenAI-compatible traffic.
    pub listen: String,
    /// Address for `/healthz`, `/readyz` (never the traffic port).
    pub admin_listen: String,
    /// Request bodies larger than this get 413.
    pub max_body_bytes: Whole,
    /// On SIGTERM, how long in-flight requests may take to finish.
    pub shutdown_grace: String,
    /// How long a caller may take to send a request head, or leave a connection idle between requests.
    pub header_read_timeout: String,
    /// How long a write to a caller may wait for the caller to read, before the connection is closed.
    pub send_timeout: String,
    /// Caller connections open at once, across traffic threads; 0 means no cap.
    pub max_connections: Whole,
    /// Traffic threads; 0 means one per CPU the process may use.
    pub workers: Whole,
    /// Environment variable holding the bearer token the admin listener requires (all but `/healthz`, `/readyz`).
    pub admin_token_env: Option<String>,
    /// File holding that token (a mounted Secret), read again for each request that presents one.
    pub admin_token_file: Option<String>,
}

impl Default for RawServer {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:8080".into(),
            admin_listen: "127.0.0.1:9091".into(),
            max_body_bytes: Whole::Number(32 * 1024 * 1024),
            shutdown_grace: "30s".into(),
            header_read_timeout: "75s".into(),
            send_timeout: "60s".into(),
            max_connections: Whole::Number(0),
            workers: Whole::Number(0),
            admin_token_env: None,
            admin_token_file: None,
        }
    }
}

/// `[upstream]`
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawUpstream {
    /// Scheme and authority of bedrock-mantle, no path.
    pub base_url: String,
    /// `api_key`, `sigv4`, `aws_token` or `passthrough`.
    pub auth: String,
    /// Environment variable holding the Bedrock API key (`auth = "api_key"`).
    pub api_key_env: Option<String>,
    /// File holding the Bedrock API key (`auth = "api_key"`); takes precedence over `api_key_env`.
    pub api_key_file: Option<String>,
    /// AWS region, for `sigv4` and `aws_token` (else the one the host names).
    pub region: Option<String>,
    /// Longest wait for the TCP (and TLS) connection.
    pub connect_timeout: String,
    /// Longest wait for the response head.
    pub response_timeout: String,
    /// Longest silence inside a streamed response body.
    pub idle_timeout: String,
    /// How long an idle upstream connection is kept for the next request.
    pub pool_idle_timeout: String,
    /// How often the configured projects are compared with the Projects API while serving; `0s` never.
    pub projects_check_interval: String,
}

impl Default for RawUpstream {
    fn default() -> Self {
        Self {
            base_url: "https://bedrock-mantle.us-east-1.api.aws".into(),
            auth: "api_key".into(),
            api_key_env: None,
            api_key_file: None,
            region: None,
            connect_timeout: "5s".into(),
            response_timeout: "300s".into(),
            idle_timeout: "120s".into(),
            pool_idle_timeout: "50s".into(),
            projects_check_interval: "0s".into(),
        }
    }
}

/// `[callers]`
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawCallers {
    /// `keys` or `none`.
    pub auth: String,
}

impl Default for RawCallers {
    fn default() -> Self {
        Self { auth: "keys".into() }
    }
}

/// `[attribution]`
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAttribution {
    /// `reject` or `reroute`.
    pub unattributed: String,
    /// Project name that unattributed requests go to when `unattributed = "reroute"`.
    pub reroute_to: String,
    /// Project every otherwise unattributed request on this gateway belongs to (sidecar mode).
    pub default_project: String,
}

impl Default for RawAttribution {
    fn default() -> Self {
        Self { unattributed: "reject".into(), reroute_to: String::new(), default_project: String::new() }
    }
}

/// `[taxonomy]`
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawTaxonomy {
    /// Tags every project must carry, with a non-empty value.
    pub required_tags: Vec<String>,
    /// For the tags named here, the only values a project may use.
    pub allowed_values: BTreeMap<String, Vec<String>>,
}

/// One `[[projects]]` entry.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawProject {
    /// Unique name, used by keys, routes and callers.
    pub name: String,
    /// bedrock-mantle project id (`proj_...`); absent until the project is provisioned.
    #[serde(default)]
    pub id: Option<String>,
    /// Cost allocation tags.
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// Model ids this project may use; empty means any.
    #[serde(default)]
    pub models: Vec<String>,
    /// To be archived upstream by `mantlegate projects apply`. An archived project takes no traffic: no key,
    /// route or fallback may name it, and the gateway does not route to it.
    #[serde(default)]
    pub archived: bool,
}

/// One `[[keys]]` entry.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawKey {
    /// Name shown in logs and metrics.
    pub name: String,
    /// Lower- or upper-case hex SHA-256 of the key.
    pub sha256: String,
    /// The project this key's requests belong to by default.
    #[serde(default)]
    pub project: Option<String>,
    /// Other projects this key may ask for with its own project header.
    #[serde(default)]
    pub may_select: Vec<String>,
}

/// One `[[routes]]` entry.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    /// Path prefix such as `/chatbot`; stripped before forwarding.
    pub prefix: String,
    /// Project of every request under this prefix.
    pub project: String,
}
