//! Configuration: defaults, then the TOML file, then `MANTLEGATE__SECTION__KEY` environment overrides,
//! deserialized into [`raw::RawConfig`] and validated into [`Config`], whose types leave no room for the
//! mistakes the file can hold (unknown projects, bad hashes, durations that do not parse).

pub mod limits;
pub mod lock;
mod raw;
pub mod reconcile;
mod schema;
mod validate;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::uri::{Authority, Scheme};

pub use raw::RawConfig;
pub use validate::ConfigErrors;
pub(crate) use validate::{check_name, is_project_id};

/// Where `serve` and `check` look when no `--config` is given and `MANTLEGATE_CONFIG` is unset.
pub const DEFAULT_PATH: &str = "config/mantlegate.toml";

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Listeners and limits.
    pub server: Server,
    /// The upstream and how to authenticate to it.
    pub upstream: Upstream,
    /// How callers authenticate.
    pub callers: CallerAuth,
    /// Fallbacks for requests no key, header or route attributes.
    pub attribution: AttributionPolicy,
    /// Tag rules (already checked against every project).
    pub taxonomy: Taxonomy,
    /// All projects, each name unique.
    pub projects: Vec<Project>,
    /// All gateway keys.
    pub keys: Vec<Key>,
    /// All route prefixes.
    pub routes: Vec<Route>,
    /// Usage metering.
    pub metering: Metering,
    /// Rate limits and budgets.
    pub limits: limits::Limits,
    /// The ledger compared with CloudWatch on a schedule.
    pub reconcile: reconcile::Reconcile,
    /// SHA-256 (hex) of the file text it was loaded from: `mantlegate_config_info{sha256}` says which config is in
    /// force, and a reload of an unchanged file changes nothing.
    pub sha256: String,
    /// What the lock file beside the config (`projects.lock.toml`) gave it.
    pub lock: lock::LockUse,
}

/// `[metering]` and `[[prices]]`, validated.
#[derive(Debug, Clone)]
pub struct Metering {
    /// Whether responses are tapped for usage.
    pub enabled: bool,
    /// Where the usage ledger goes, if anywhere.
    pub ledger_path: Option<PathBuf>,
    /// Price overrides.
    pub prices: Vec<(String, crate::metering::prices::Price)>,
}

/// `[server]`, validated.
#[derive(Debug, Clone)]
pub struct Server {
    /// Traffic listener.
    pub listen: SocketAddr,
    /// Admin listener (health, readiness).
    pub admin_listen: SocketAddr,
    /// Largest accepted request body, in bytes.
    pub max_body_bytes: u64,
    /// How long in-flight requests may run after SIGTERM.
    pub shutdown_grace: Duration,
    /// How long a caller may take to send a request head, counted from when its connection is ready for one
    /// (so also the longest a keep-alive connection stays idle between requests).
    pub header_read_timeout: Duration,
    /// How long a write to a caller may wait for the caller to read (between two writes that make progress);
    /// then the connection is closed.
    pub send_timeout: Duration,
    /// Caller connections open at once, across traffic threads; beyond it, new ones wait in the listen backlog.
    pub max_connections: Option<usize>,
    /// Traffic threads, each with its own event loop and upstream connections.
    pub workers: usize,
    /// Whether `workers` is "one per CPU" (configured as 0).
    pub workers_per_cpu: bool,
    /// The bearer token the admin listener requires, if one is configured.
    pub admin_token: Option<AdminToken>,
}

/// Where the admin listener's bearer token is read from (`server.admin_token_env` or `server.admin_token_file`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminToken {
    /// An environment variable.
    Env(String),
    /// A file (a mounted Kubernetes Secret): read for each request that presents a token, so a rotated Secret
    /// is in force as soon as the kubelet has written it.
    File(PathBuf),
}

/// The shortest admin token taken: a bearer token is all that stands between the network and the spend data.
pub const MIN_ADMIN_TOKEN: usize = 16;

impl AdminToken {
    /// Reads the token; the error names the setting and the source, never the value.
    pub fn read(&self) -> anyhow::Result<Secret> {
        let value = match self {
            Self::Env(name) => std::env::var(name)
                .map_err(|_| anyhow::anyhow!("server.admin_token_env: environment variable {name} is not set"))?,
            Self::File(path) => std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("server.admin_token_file: cannot read {}: {e}", path.display()))?,
        };
        let value = value.trim();
        if value.len() < MIN_ADMIN_TOKEN {
            anyhow::bail!(
                "the admin token from {self} is shorter than {MIN_ADMIN_TOKEN} characters: use a long random one \
                 (openssl rand -hex 32)"
            );
        }
        // Sent as `Authorization: Bearer <token>`: one header word.
        if !value.bytes().all(|b| b.is_ascii_graphic()) {
            anyhow::bail!("the admin token from {self} holds spaces or characters a header cannot carry");
        }
        Ok(Secret::new(value.to_owned()))
    }
}

impl fmt::Display for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Env(name) => write!(f, "environment variable {name}"),
            Self::File(path) => write!(f, "file {}", path.display()),
        }
    }
}

/// `[upstream]`, validated.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// `http` or `https`.
    pub scheme: Scheme,
    /// Host and port of bedrock-mantle.
    pub authority: Authority,
    /// The gateway's own credential.
    pub auth: UpstreamAuth,
    /// The AWS region requests are signed for (`upstream.region`, else the one the host names); set whenever
    /// `auth` uses AWS credentials.
    pub region: Option<String>,
    /// Longest wait for a connection.
    pub connect_timeout: Duration,
    /// Longest wait for the response head.
    pub response_timeout: Duration,
    /// Longest silence inside a response body.
    pub idle_timeout: Duration,
    /// How long an upstream connection is kept idle for the next request.
    pub pool_idle_timeout: Duration,
    /// How often the configured projects are compared with the Projects API while serving; none never.
    pub projects_check_interval: Option<Duration>,
}

impl Upstream {
    /// `Host` for the upstream: its host, and its port unless that is the scheme's default.
    pub fn host_header(&self) -> anyhow::Result<http::HeaderValue> {
        let authority = &self.authority;
        let default_port = if self.scheme == http::uri::Scheme::HTTPS { 443 } else { 80 };
        Ok(match authority.port_u16() {
            Some(port) if port != default_port => http::HeaderValue::from_str(&format!("{}:{port}", authority.host()))?,
            _ => http::HeaderValue::from_str(authority.host())?,
        })
    }
}

/// How the gateway authenticates to bedrock-mantle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamAuth {
    /// A Bedrock API key sent as `Authorization: Bearer`.
    ApiKey(KeySource),
    /// Each request signed with AWS Signature Version 4 (service `bedrock-mantle`), credentials from the AWS chain.
    SigV4,
    /// Short-term Bedrock API keys, minted from the AWS chain's credentials and renewed before they expire.
    AwsToken,
    /// The caller's own `Authorization` / `x-api-key` is forwarded (only with `callers.auth = "none"`).
    Passthrough,
}

impl UpstreamAuth {
    /// Whether the credential comes from the AWS credential chain.
    pub fn is_aws(&self) -> bool {
        matches!(self, Self::SigV4 | Self::AwsToken)
    }
}

/// Where the Bedrock API key is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// An environment variable, read at start-up.
    Env(String),
    /// A file (a mounted Kubernetes secret), read at start-up and again whenever its directory changes.
    File(PathBuf),
}

/// `[callers] auth`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallerAuth {
    /// Every caller presents a gateway key.
    Keys,
    /// Callers are trusted (sidecar); their credentials are dropped.
    None,
}

/// `[attribution]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttributionPolicy {
    /// Project for requests nothing else attributes (sidecar mode), by name.
    pub default_project: Option<String>,
    /// What happens when even that is absent.
    pub unattributed: Unattributed,
}

/// The unattributed policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unattributed {
    /// 403 `project_required`.
    Reject,
    /// Send to this project (by name), counted and logged as rerouted.
    Reroute(String),
}

/// `[taxonomy]`.
#[derive(Debug, Clone, Default)]
pub struct Taxonomy {
    /// Tags every project must carry.
    pub required_tags: Vec<String>,
    /// Allowed values per tag.
    pub allowed_values: BTreeMap<String, Vec<String>>,
}

impl Taxonomy {
    /// How `tags` break the taxonomy, as (tag, problem) pairs: a required tag missing or empty, a value not among
    /// the allowed ones. Shared by config validation and by `projects import`, which flags upstream projects that
    /// would not pass it.
    pub fn violations(&self, tags: &BTreeMap<String, String>) -> Vec<(String, String)> {
        let mut found = Vec::new();
        for tag in &self.required_tags {
            match tags.get(tag) {
                None => found.push((tag.clone(), "missing".to_owned())),
                Some(v) if v.trim().is_empty() => found.push((tag.clone(), "empty".to_owned())),
                Some(_) => {}
            }
        }
        for (tag, allowed) in &self.allowed_values {
            if let Some(value) = tags.get(tag).filter(|v| !allowed.contains(v)) {
                found.push((tag.clone(), format!("{value:?} is not one of {}", allowed.join(", "))));
            }
        }
        found
    }
}

/// A project requests can be attributed to.
#[derive(Debug, Clone)]
pub struct Project {
    /// Unique name.
    pub name: String,
    /// bedrock-mantle id, once provisioned.
    pub id: Option<String>,
    /// Cost allocation tags.
    pub tags: BTreeMap<String, String>,
    /// Allowed model ids; empty allows any.
    pub models: Vec<String>,
    /// To be archived upstream (`archived = true`): not routable, and `projects apply` archives it.
    pub archived: bool,
}

impl Project {
    /// Whether this project may use `model`.
    pub fn allows_model(&self, model: &str) -> bool {
        self.models.is_empty() || self.models.iter().any(|m| m == model)
    }
}

/// A gateway key, known only by its hash.
#[derive(Debug, Clone)]
pub struct Key {
    /// Name for logs and metrics.
    pub name: String,
    /// SHA-256 of the key.
    pub sha256: [u8; 32],
    /// The key's own project, by name.
    pub project: Option<String>,
    /// Other projects the key may ask for, by name.
    pub may_select: Vec<String>,
}

/// A path prefix bound to a project.
#[derive(Debug, Clone)]
pub struct Route {
    /// `/name`, no trailing slash.
    pub prefix: String,
    /// The route's project, by name.
    pub project: String,
}

impl Config {
    /// Loads defaults, the file at `path` and `MANTLEGATE__` environment overrides, then validates; projects
    /// without an `id` get the one the lock file beside it records (see [`lock`]).
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let mut config = Self::load_without_lock(path)?;
        lock::apply(&mut config, lock::read_beside(path)?)?;
        Ok(config)
    }

    /// [`Config::load`] without the lock file: the projects commands match by name what has no `id` in the file.
    pub fn load_without_lock(path: &Path) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let text = read_file(path)?;
        Self::parse(&text, true).with_context(|| format!("reading {}", path.display()))
    }

    /// Parses a TOML string with no environment overrides (tests, the demo).
    pub fn from_toml(text: &str) -> anyhow::Result<Self> {
        Self::parse(text, false)
    }

    /// Defaults, then `text`, then (if `env`) the environment's overrides, validated; hashed as `text`. Invalid
    /// settings come back as [`ConfigErrors`], all of them.
    pub fn parse(text: &str, env: bool) -> anyhow::Result<Self> {
        let mut builder = config::Config::builder().add_source(config::File::from_str(text, config::FileFormat::Toml));
        if env {
            builder = builder.add_source(config::Environment::with_prefix("MANTLEGATE").separator("__"));
        }
        let mut root = builder.build().map_err(|e| anyhow::anyhow!(shown_error(&e.to_string())))?.cache;
        // Unknown keys are named and dropped first, so they hide none of the other problems.
        let mut problems = schema::remove_unknown(&mut root);
        let raw: RawConfig = match root.try_deserialize() {
            Ok(raw) => raw,
            Err(e) => {
                problems.push(shown_error(&e.to_string()));
                return Err(ConfigErrors(problems).into());
            }
        };
        let mut config = match Self::from_raw(raw) {
            Ok(config) if problems.is_empty() => config,
            Ok(_) => return Err(ConfigErrors(problems).into()),
            Err(ConfigErrors(more)) => {
                problems.extend(more);
                return Err(ConfigErrors(problems).into());
            }
        };
        config.sha256 = sha256(text);
        Ok(config)
    }

    /// Validates a raw config, reporting every problem at once.
    pub fn from_raw(raw: RawConfig) -> Result<Self, ConfigErrors> {
        validate::validate(raw)
    }

    /// The project named `name`.
    pub fn project(&self, name: &str) -> Option<&Project> {
        self.projects.iter().find(|p| p.name == name)
    }
}

/// `server.admin_listen`, and where the admin token is read from (`server.admin_token_env` or `_file`), as the file
/// at `path` (and the environment) sets them, read without checking the rest, for `mantlegate reload` to reach a
/// running gateway whose file may have changed since.
pub fn admin_access(path: &Path) -> anyhow::Result<(String, Option<AdminToken>)> {
    let text = read_file(path)?;
    let read = config::Config::builder()
        .add_source(config::File::from_str(&text, config::FileFormat::Toml))
        .add_source(config::Environment::with_prefix("MANTLEGATE").separator("__"))
        .build()
        .map_err(|e| anyhow::anyhow!("reading {}: {}", path.display(), shown_error(&e.to_string())))?;
    let listen = read.get_string("server.admin_listen").unwrap_or_else(|_| RawConfig::default().server.admin_listen);
    let token = match (read.get_string("server.admin_token_env"), read.get_string("server.admin_token_file")) {
        (Ok(file_too), Ok(_)) if !file_too.is_empty() => {
            anyhow::bail!(
                "{}: server.admin_token_file: set either admin_token_env or admin_token_file, not both",
                path.display()
            )
        }
        (Ok(env), _) if !env.is_empty() => Some(AdminToken::Env(env)),
        (_, Ok(file)) if !file.is_empty() => Some(AdminToken::File(PathBuf::from(file))),
        _ => None,
    };
    Ok((listen, token))
}

/// The SHA-256 of a config file's text, in hex.
pub fn sha256(text: &str) -> String {
    hex::encode(<sha2::Sha256 as sha2::Digest>::digest(text.as_bytes()))
}

/// The text of the config file at `path`.
pub fn read_file(path: &Path) -> anyhow::Result<String> {
    if !path.is_file() {
        anyhow::bail!("config file {} not found", path.display());
    }
    std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("cannot read config file {}: {e}", path.display()))
}

/// The config path from `--config`, else `MANTLEGATE_CONFIG`, else [`DEFAULT_PATH`].
pub fn resolve_path(flag: Option<PathBuf>) -> PathBuf {
    flag.or_else(|| std::env::var_os("MANTLEGATE_CONFIG").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_PATH))
}

/// A secret string whose `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(value: String) -> Self {
        Self(value)
    }

    /// The secret itself; call only where it is sent on.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl KeySource {
    /// Reads the key; the error names the source, never the value.
    pub fn read(&self) -> anyhow::Result<Secret> {
        let value = match self {
            Self::Env(name) => std::env::var(name)
                .map_err(|_| anyhow::anyhow!("upstream.api_key_env: environment variable {name} is not set"))?,
            Self::File(path) => std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("upstream.api_key_file: cannot read {}: {e}", path.display()))?,
        };
        let value = value.trim();
        if value.is_empty() {
            anyhow::bail!("upstream API key from {self} is empty");
        }
        if http::HeaderValue::from_str(value).is_err() {
            anyhow::bail!("upstream API key from {self} contains characters not allowed in a header");
        }
        Ok(Secret::new(value.to_owned()))
    }
}

impl fmt::Display for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Env(name) => write!(f, "environment variable {name}"),
            Self::File(path) => write!(f, "file {}", path.display()),
        }
    }
}

/// A config error from the `config` crate or the TOML parser as it may be shown: [`without_source_lines`] and
/// [`without_quoted_strings`].
fn shown_error(error: &str) -> String {
    without_quoted_strings(&without_source_lines(error))
}

/// serde's and the `config` crate's type errors quote the string they got (`invalid type: string "sk-...",
/// expected a boolean`), which may be a key put in the wrong setting: each `string "..."` becomes `a string`.
fn without_quoted_strings(error: &str) -> String {
    let mut out = String::with_capacity(error.len());
    let mut rest = error;
    while let Some(at) = rest.find("string \"") {
        out.push_str(&rest[..at]);
        out.push_str("a string");
        // The quoted text is Rust's `{:?}` of the string: it ends at the first quote not escaped.
        let quoted = &rest[at + "string \"".len()..];
        let mut end = quoted.len();
        let mut escaped = false;
        for (i, c) in quoted.char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => {
                    end = i + 1;
                    break;
                }
                _ => {}
            }
        }
        rest = &quoted[end..];
    }
    out.push_str(rest);
    out
}

/// A TOML error without the source lines it quotes (`2 | base_url = "https://user:secret@...`): the line at
/// fault may hold a credential. The line and column it names, and what is wrong, are kept.
fn without_source_lines(error: &str) -> String {
    let is_quote =
        |line: &str| line.trim_start().trim_start_matches(|c: char| c.is_ascii_digit()).trim_start().starts_with('|');
    error.lines().filter(|line| !is_quote(line)).map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_toml_error_names_the_line_but_never_quotes_it() {
        for text in [
            "[upstream]\nbase_url = \"https://user:hunter2@host\n",
            "[[keys]]\nname = \"k\" sha256=\"hunter2\" project=\"P\"\n",
        ] {
            let error = Config::from_toml(text).map(|_| ()).expect_err("not TOML").to_string();
            assert!(!error.contains("hunter2"), "{error}");
            assert!(error.contains("line 2"), "{error}");
        }
        assert_eq!(
            without_source_lines("at line 2, column 3\n  |\n2 | a = \"x\n  |   ^\nexpected `\"`"),
            "at line 2, column 3: expected `\"`"
        );
    }

    #[test]
    fn a_type_error_never_quotes_the_string_it_got() {
        for text in [
            "[metering]\nenabled = \"sk-hunter2\"\n",
            "[[prices]]\nmodel = \"m\"\ninput = \"sk-hun\\\"ter2\"\noutput = 1.0\n",
            "[server]\nlisten = \"0.0.0.0:1\"\n[taxonomy]\nrequired_tags = \"sk-hunter2\"\n",
        ] {
            let error = Config::from_toml(text).map(|_| ()).expect_err("wrong type").to_string();
            assert!(!error.contains("hunter2") && !error.contains("ter2"), "{error}");
            assert!(error.contains("a string"), "{error}");
        }
        assert_eq!(
            without_quoted_strings(r#"invalid type: string "a\"b", expected a boolean; string "c""#),
            "invalid type: a string, expected a boolean; a string"
        );
    }
}
