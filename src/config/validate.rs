//! Turns a [`RawConfig`] into a [`Config`], collecting every problem with the key that holds it
//! (`projects[2].tags.CostCenter: missing`) so one run of `mantlegate check` shows them all.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use http::Uri;

use super::raw::{RawConfig, RawKey, RawProject, RawRoute};
use super::{
    AdminToken, AttributionPolicy, CallerAuth, Config, Key, KeySource, Metering, Project, Route, Server, Taxonomy,
    Unattributed, Upstream, UpstreamAuth,
};
use crate::metering::prices::Price;

/// More traffic threads than this is a typo, not a machine.
const MAX_WORKERS: usize = 1024;
/// More connections than any one process could hold file descriptors for.
const MAX_CONNECTIONS: usize = 1 << 24;

/// Path prefixes a route may not take, because the API itself lives there.
const RESERVED_ROUTE_SEGMENTS: &[&str] = &["v1", "openai", "anthropic"];

/// Every problem found in a config, one line each.
#[derive(Debug)]
pub struct ConfigErrors(pub Vec<String>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "invalid configuration ({} problem{}):", self.0.len(), if self.0.len() == 1 { "" } else { "s" })?;
        for line in &self.0 {
            writeln!(f, "  {line}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

#[derive(Default)]
pub(super) struct Errors(Vec<String>);

impl Errors {
    pub(super) fn push(&mut self, key: impl fmt::Display, message: impl fmt::Display) {
        self.0.push(format!("{key}: {message}"));
    }
}

pub(super) fn validate(raw: RawConfig) -> Result<Config, ConfigErrors> {
    let mut errs = Errors::default();

    let max_connections = whole(&mut errs, "server.max_connections", &raw.server.max_connections);
    let workers = whole(&mut errs, "server.workers", &raw.server.workers);
    let server = Server {
        listen: parse_addr(&mut errs, "server.listen", &raw.server.listen),
        admin_listen: parse_addr(&mut errs, "server.admin_listen", &raw.server.admin_listen),
        max_body_bytes: whole(&mut errs, "server.max_body_bytes", &raw.server.max_body_bytes).unwrap_or(1),
        shutdown_grace: parse_duration(&mut errs, "server.shutdown_grace", &raw.server.shutdown_grace, true),
        header_read_timeout: parse_duration(
            &mut errs,
            "server.header_read_timeout",
            &raw.server.header_read_timeout,
            false,
        ),
        send_timeout: parse_duration(&mut errs, "server.send_timeout", &raw.server.send_timeout, false),
        max_connections: max_connections.filter(|n| *n > 0).map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
        workers: match workers {
            // available_parallelism honours CPU affinity and a cgroup CPU quota (a pod's limit).
            Some(0) | None => std::thread::available_parallelism().map_or(1, usize::from),
            Some(n) => usize::try_from(n).unwrap_or(usize::MAX),
        },
        workers_per_cpu: matches!(workers, Some(0) | None),
        admin_token: admin_token(&mut errs, &raw.server.admin_token_env, &raw.server.admin_token_file),
    };
    if workers.is_some_and(|n| n > MAX_WORKERS as u64) {
        errs.push("server.workers", format!("{} is more than {MAX_WORKERS}", server.workers));
    }
    if let Some(n) = max_connections.filter(|n| *n > MAX_CONNECTIONS as u64) {
        errs.push("server.max_connections", format!("{n} is more than {MAX_CONNECTIONS}"));
    }
    if server.max_body_bytes == 0 {
        errs.push("server.max_body_bytes", "must be greater than 0");
    }
    if server.listen == server.admin_listen && server.listen.port() != 0 {
        errs.push(
            "server.admin_listen",
            "must differ from server.listen (admin endpoints never share the traffic port)",
        );
    }

    let callers = match raw.callers.auth.as_str() {
        "keys" => CallerAuth::Keys,
        "none" => CallerAuth::None,
        other => {
            errs.push("callers.auth", format!("{} is not one of \"keys\", \"none\"", shown(other)));
            CallerAuth::Keys
        }
    };

    let upstream = validate_upstream(&mut errs, &raw, callers);
    let taxonomy = Taxonomy { required_tags: raw.taxonomy.required_tags, allowed_values: raw.taxonomy.allowed_values };
    validate_taxonomy(&mut errs, &taxonomy);
    let projects = validate_projects(&mut errs, raw.projects, &taxonomy);

    // An archived project takes no new inference upstream: nothing may send traffic to it.
    let lookup = |errs: &mut Errors, key: &str, name: &str| -> Option<String> {
        match projects.iter().find(|p| p.name == name) {
            None => errs.push(key, format!("no project named {name:?}")),
            Some(p) if p.archived => errs.push(key, format!("project {name:?} is archived (archived = true)")),
            Some(_) => return Some(name.to_owned()),
        }
        None
    };

    let keys = validate_keys(&mut errs, raw.keys, callers, &lookup);
    let routes = validate_routes(&mut errs, raw.routes, &lookup);

    let default_project = match raw.attribution.default_project.as_str() {
        "" => None,
        name => lookup(&mut errs, "attribution.default_project", name),
    };
    let unattributed = match raw.attribution.unattributed.as_str() {
        "reject" => Unattributed::Reject,
        "reroute" if raw.attribution.reroute_to.is_empty() => {
            errs.push("attribution.reroute_to", "required when attribution.unattributed = \"reroute\"");
            Unattributed::Reject
        }
        "reroute" => lookup(&mut errs, "attribution.reroute_to", &raw.attribution.reroute_to)
            .map_or(Unattributed::Reject, Unattributed::Reroute),
        other => {
            errs.push("attribution.unattributed", format!("{} is not one of \"reject\", \"reroute\"", shown(other)));
            Unattributed::Reject
        }
    };

    let metering = validate_metering(&mut errs, &raw.metering, raw.prices);
    // Tokens and spend are settled from the usage metering reads: without it every reservation would settle
    // to nothing, and those limits would never fill.
    if !metering.enabled {
        for (i, rule) in raw.limits.rules.iter().enumerate() {
            let counts_usage = rule.input_tokens_per_minute.is_some()
                || rule.output_tokens_per_minute.is_some()
                || rule.usd_per_day.is_some()
                || rule.usd_per_month.is_some();
            if counts_usage {
                errs.push(
                    format!("limits.rules[{i}]"),
                    "token and spend limits need [metering] enabled = true (they count the usage it reads)",
                );
            }
        }
    }
    let reconcile = super::reconcile::validate(&mut errs, &raw.reconcile, &upstream, &metering);
    let names = |names: Vec<&String>| names.into_iter().cloned().collect::<Vec<_>>();
    let limits = super::limits::validate(
        &mut errs,
        raw.limits,
        &names(projects.iter().map(|p| &p.name).collect()),
        &names(keys.iter().map(|k| &k.name).collect()),
    );

    if errs.0.is_empty() {
        Ok(Config {
            server,
            upstream,
            callers,
            attribution: AttributionPolicy { default_project, unattributed },
            taxonomy,
            projects,
            keys,
            routes,
            metering,
            limits,
            reconcile,
            sha256: String::new(),
            lock: super::lock::LockUse::default(),
        })
    } else {
        Err(ConfigErrors(errs.0))
    }
}

/// Where credentials (`user:password@`) in `url` start and their `@` is: everything from the scheme to the last
/// `@`, since a password may itself hold `/`, `?` or `#` (a URL parser then ends the authority early and never
/// sees the `@`).
fn credentials(url: &str) -> Option<(usize, usize)> {
    let start = url.find("://").map_or(0, |at| at + 3);
    url[start..].rfind('@').map(|at| (start, start + at))
}

/// `url` as it may be shown in an error: its [`credentials`] replaced by `***`, and its query and fragment (where a
/// token is as likely) by `?...`.
fn shown_url(url: &str) -> String {
    let shown = match credentials(url) {
        Some((start, at)) => format!("{}***{}", &url[..start], &url[at..]),
        None => url.to_owned(),
    };
    match shown.find(['?', '#']) {
        Some(at) => format!("{}?...", &shown[..at]),
        None => shown,
    }
}

/// `server.admin_token_env` or `server.admin_token_file`: names only here (the token is read by `serve`, where
/// the secret is, not by `check`, which may run where it is not). A value that may be the token itself, put in
/// the wrong setting, is refused without being shown.
fn admin_token(errs: &mut Errors, env: &Option<String>, file: &Option<String>) -> Option<AdminToken> {
    match (env, file) {
        (None, None) => None,
        (Some(_), Some(_)) => {
            errs.push("server.admin_token_file", "set either admin_token_env or admin_token_file, not both");
            None
        }
        (Some(env), None) if env.is_empty() => {
            errs.push("server.admin_token_env", "must not be empty");
            None
        }
        (Some(env), None) if !is_env_name(env) || looks_like_key(env, &['_']) => {
            errs.push(
                "server.admin_token_env",
                "is not an environment variable name (letters, digits and _, at most 64): it names the variable \
                 that holds the token, never the token itself",
            );
            None
        }
        (Some(env), None) => Some(AdminToken::Env(env.clone())),
        (None, Some(file)) if file.is_empty() => {
            errs.push("server.admin_token_file", "must not be empty");
            None
        }
        (None, Some(file)) if looks_like_key(file, &['/', '\\']) => {
            errs.push(
                "server.admin_token_file",
                "looks like a token, not a path (the value is not shown): it must be the path of the file that \
                 holds the token, never the token itself",
            );
            None
        }
        (None, Some(file)) => Some(AdminToken::File(PathBuf::from(file))),
    }
}

fn validate_upstream(errs: &mut Errors, raw: &RawConfig, callers: CallerAuth) -> Upstream {
    let u = &raw.upstream;
    // Echoed in errors, so without any credentials it carries (which are themselves refused below).
    let url = shown_url(&u.base_url);
    let (scheme, authority) = match u.base_url.parse::<Uri>() {
        Ok(uri) => {
            let scheme = uri.scheme().filter(|s| matches!(s.as_str(), "http" | "https")).cloned();
            if scheme.is_none() {
                errs.push("upstream.base_url", format!("{url:?} must start with https:// or http://"));
            }
            if u.base_url.contains(['?', '#']) {
                errs.push(
                    "upstream.base_url",
                    format!(
                        "{url:?} must have no query or fragment: the gateway's upstream key goes in \
                         upstream.api_key_env or upstream.api_key_file, never in the URL"
                    ),
                );
            } else if !matches!(uri.path(), "" | "/") {
                errs.push(
                    "upstream.base_url",
                    format!("{url:?} must have no path: the caller's /v1, /openai/v1 or /anthropic/v1 path is kept"),
                );
            }
            (scheme.unwrap_or(http::uri::Scheme::HTTPS), uri.authority().cloned())
        }
        Err(e) => {
            errs.push("upstream.base_url", format!("{url:?} is not a URL: {e}"));
            (http::uri::Scheme::HTTPS, None)
        }
    };
    // The raw text, parsed or not: a password holding `/` ends the parsed authority early.
    if credentials(&u.base_url).is_some() {
        errs.push("upstream.base_url", "must not carry credentials");
    }
    if authority.is_none() && errs.0.iter().all(|e| !e.starts_with("upstream.base_url")) {
        errs.push("upstream.base_url", format!("{url:?} has no host"));
    }

    let auth = match u.auth.as_str() {
        "api_key" => match (&u.api_key_env, &u.api_key_file) {
            (Some(_), Some(_)) => {
                errs.push("upstream.api_key_file", "set either api_key_env or api_key_file, not both");
                UpstreamAuth::Passthrough
            }
            (_, Some(file)) if file.is_empty() => {
                errs.push("upstream.api_key_file", "must not be empty");
                UpstreamAuth::Passthrough
            }
            // Not echoed: a key pasted where its file's path belongs.
            (_, Some(file)) if looks_like_key(file, &['/', '\\']) => {
                errs.push(
                    "upstream.api_key_file",
                    "looks like a key, not a path (the value is not shown): it must be the path of the file that \
                     holds the key, never the key itself",
                );
                UpstreamAuth::Passthrough
            }
            (_, Some(file)) => UpstreamAuth::ApiKey(KeySource::File(PathBuf::from(file))),
            (Some(env), None) if env.is_empty() => {
                errs.push("upstream.api_key_env", "must not be empty");
                UpstreamAuth::Passthrough
            }
            // Not echoed: a value that is no variable name may be the key itself, put here by mistake.
            (Some(env), None) if !is_env_name(env) || looks_like_key(env, &['_']) => {
                errs.push(
                    "upstream.api_key_env",
                    "is not an environment variable name (letters, digits and _, at most 64): it names the \
                     variable that holds the key, never the key itself",
                );
                UpstreamAuth::Passthrough
            }
            (env, None) => UpstreamAuth::ApiKey(KeySource::Env(env.clone().unwrap_or_else(|| "MANTLE_API_KEY".into()))),
        },
        "passthrough" => {
            if callers == CallerAuth::Keys {
                errs.push(
                    "upstream.auth",
                    "\"passthrough\" forwards the caller's own credential, so it needs callers.auth = \"none\" \
                     (with callers.auth = \"keys\" the caller's credential is a gateway key)",
                );
            }
            UpstreamAuth::Passthrough
        }
        "sigv4" => UpstreamAuth::SigV4,
        "aws_token" => UpstreamAuth::AwsToken,
        other => {
            errs.push(
                "upstream.auth",
                format!("{} is not one of \"api_key\", \"sigv4\", \"aws_token\", \"passthrough\"", shown(other)),
            );
            UpstreamAuth::Passthrough
        }
    };
    if u.auth != "api_key" {
        for (name, set) in [("upstream.api_key_env", &u.api_key_env), ("upstream.api_key_file", &u.api_key_file)] {
            if set.is_some() {
                errs.push(
                    name,
                    format!("applies only to auth = \"api_key\" (this config has auth = {})", shown(&u.auth)),
                );
            }
        }
    }
    let region = match &authority {
        Some(authority) if auth.is_aws() => aws_region(errs, u.region.as_deref(), authority, &u.auth),
        _ => u.region.clone().filter(|r| !r.is_empty()),
    };

    if auth == UpstreamAuth::Passthrough
        && !matches!(humantime::parse_duration(&u.projects_check_interval), Ok(d) if d.is_zero())
    {
        errs.push(
            "upstream.projects_check_interval",
            "needs the gateway's own credential to call the Projects API with; upstream.auth = \"passthrough\" has none",
        );
    }
    Upstream {
        scheme,
        authority: authority.unwrap_or_else(|| http::uri::Authority::from_static("invalid")),
        auth,
        region,
        connect_timeout: parse_duration(errs, "upstream.connect_timeout", &u.connect_timeout, false),
        response_timeout: parse_duration(errs, "upstream.response_timeout", &u.response_timeout, false),
        idle_timeout: parse_duration(errs, "upstream.idle_timeout", &u.idle_timeout, false),
        pool_idle_timeout: parse_duration(errs, "upstream.pool_idle_timeout", &u.pool_idle_timeout, false),
        projects_check_interval: Some(parse_duration(
            errs,
            "upstream.projects_check_interval",
            &u.projects_check_interval,
            true,
        ))
        .filter(|d| !d.is_zero()),
    }
}

fn validate_projects(errs: &mut Errors, raw: Vec<RawProject>, taxonomy: &Taxonomy) -> Vec<Project> {
    let mut names: HashMap<String, usize> = HashMap::new();
    let mut ids: HashMap<String, usize> = HashMap::new();
    let mut projects = Vec::with_capacity(raw.len());
    for (i, p) in raw.into_iter().enumerate() {
        let at = format!("projects[{i}]");
        if let Err(why) = check_name(&p.name) {
            errs.push(format!("{at}.name"), format!("{:?} {why}", p.name));
        } else if p.name.eq_ignore_ascii_case("default") {
            errs.push(
                format!("{at}.name"),
                "\"default\" is the account's unattributed project and cannot be configured",
            );
        } else if let Some(j) = names.insert(p.name.clone(), i) {
            errs.push(format!("{at}.name"), format!("{:?} is also the name of projects[{j}]", p.name));
        }
        let id = p.id.filter(|id| !id.is_empty());
        if let Some(id) = &id {
            if !is_project_id(id) {
                errs.push(
                    format!("{at}.id"),
                    format!("{id:?} is not a project id (proj_ followed by letters, digits, - or _)"),
                );
            } else if let Some(j) = ids.insert(id.clone(), i) {
                errs.push(format!("{at}.id"), format!("{id:?} is also the id of projects[{j}]"));
            }
        }
        for (tag, problem) in taxonomy.violations(&p.tags) {
            errs.push(format!("{at}.tags.{tag}"), problem);
        }
        // Each tag is a label of the project's `mantlegate_project_info` series: two that make the same label
        // name would make Prometheus refuse the whole scrape.
        let mut labels: BTreeMap<String, &str> = BTreeMap::new();
        for (tag, value) in &p.tags {
            if tag.is_empty() || tag.chars().count() > 128 {
                errs.push(format!("{at}.tags"), format!("tag key {tag:?} must be 1 to 128 characters"));
            }
            if let Some(other) = labels.insert(crate::metering::metrics::tag_label(tag), tag) {
                errs.push(format!("{at}.tags.{tag}"), format!("makes the same metric label as the tag {other:?}"));
            }
            if value.chars().count() > 256 {
                errs.push(format!("{at}.tags.{tag}"), "value longer than 256 characters");
            }
        }
        if p.models.iter().any(String::is_empty) {
            errs.push(format!("{at}.models"), "empty model id");
        }
        projects.push(Project { name: p.name, id, tags: p.tags, models: p.models, archived: p.archived });
    }
    // A caller may name a project by name or by id: neither may mean two different projects.
    for (id, i) in &ids {
        if let Some(j) = names.get(id).filter(|j| *j != i) {
            errs.push(format!("projects[{i}].id"), format!("{id:?} is the name of projects[{j}]"));
        }
    }
    projects
}

fn validate_keys(
    errs: &mut Errors,
    raw: Vec<RawKey>,
    callers: CallerAuth,
    lookup: &dyn Fn(&mut Errors, &str, &str) -> Option<String>,
) -> Vec<Key> {
    if callers == CallerAuth::None && !raw.is_empty() {
        errs.push(
            "keys",
            "callers.auth = \"none\" ignores gateway keys; remove [[keys]] or set callers.auth = \"keys\"",
        );
    }
    if callers == CallerAuth::Keys && raw.is_empty() {
        errs.push("keys", "callers.auth = \"keys\" but no [[keys]] are configured: every request would get 401");
    }
    let mut names = HashMap::new();
    let mut hashes = HashMap::new();
    let mut keys = Vec::with_capacity(raw.len());
    for (i, k) in raw.into_iter().enumerate() {
        let at = format!("keys[{i}]");
        if let Err(why) = check_name(&k.name) {
            errs.push(format!("{at}.name"), format!("{:?} {why}", k.name));
        } else if let Some(j) = names.insert(k.name.clone(), i) {
            errs.push(format!("{at}.name"), format!("{:?} is also the name of keys[{j}]", k.name));
        }
        let mut sha256 = [0u8; 32];
        if hex::decode_to_slice(&k.sha256, &mut sha256).is_err() {
            // The value is a hash, but one pasted in the wrong field might be a key: never echo it.
            errs.push(format!("{at}.sha256"), "must be 64 hex digits (the SHA-256 of the key, not the key)");
        } else if let Some(j) = hashes.insert(sha256, i) {
            errs.push(format!("{at}.sha256"), format!("same hash as keys[{j}]"));
        }
        let project = k.project.filter(|p| !p.is_empty()).and_then(|p| lookup(errs, &format!("{at}.project"), &p));
        let may_select = k
            .may_select
            .iter()
            .enumerate()
            .filter_map(|(j, p)| lookup(errs, &format!("{at}.may_select[{j}]"), p))
            .collect();
        keys.push(Key { name: k.name, sha256, project, may_select });
    }
    keys
}

fn validate_routes(
    errs: &mut Errors,
    raw: Vec<RawRoute>,
    lookup: &dyn Fn(&mut Errors, &str, &str) -> Option<String>,
) -> Vec<Route> {
    let mut seen = HashSet::new();
    let mut routes = Vec::with_capacity(raw.len());
    for (i, r) in raw.into_iter().enumerate() {
        let at = format!("routes[{i}]");
        if let Err(why) = check_prefix(&r.prefix) {
            errs.push(format!("{at}.prefix"), format!("{:?} {why}", r.prefix));
        } else if !seen.insert(r.prefix.clone()) {
            errs.push(format!("{at}.prefix"), format!("{:?} is configured twice", r.prefix));
        }
        if let Some(project) = lookup(errs, &format!("{at}.project"), &r.project) {
            routes.push(Route { prefix: r.prefix, project });
        }
    }
    routes
}

fn validate_metering(errs: &mut Errors, raw: &super::raw::RawMetering, prices: Vec<super::raw::RawPrice>) -> Metering {
    let ledger_path = match raw.ledger_path.as_deref() {
        None | Some("") => None,
        Some(path) if path.ends_with('/') => {
            errs.push("metering.ledger_path", format!("{path:?} must name a file, not a directory"));
            None
        }
        Some(path) => Some(PathBuf::from(path)),
    };
    let mut seen = HashSet::new();
    let prices = prices
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            let at = format!("prices[{i}]");
            if p.model.is_empty() {
                errs.push(format!("{at}.model"), "must not be empty");
            } else if !seen.insert(p.model.clone()) {
                errs.push(format!("{at}.model"), format!("{:?} is priced twice", p.model));
            }
            let cached_input = p.cached_input.unwrap_or(p.input);
            for (field, v) in [("input", p.input), ("output", p.output), ("cached_input", cached_input)] {
                if !v.is_finite() || v < 0.0 {
                    errs.push(format!("{at}.{field}"), format!("{v} is not a price (USD per 1M tokens, 0 or more)"));
                }
            }
            (p.model, Price { input: p.input, output: p.output, cached_input })
        })
        .collect();
    Metering { enabled: raw.enabled, ledger_path, prices }
}

pub(crate) fn check_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        Err("must not be empty")
    } else if name.chars().count() > 128 {
        Err("is longer than 128 characters")
    } else if name.trim() != name || name.chars().any(char::is_control) {
        Err("must not have leading or trailing spaces or control characters")
    } else {
        Ok(())
    }
}

/// Project ids go into a header and into upstream URLs, so they are held to a strict alphabet.
pub(crate) fn is_project_id(id: &str) -> bool {
    id.len() > 5
        && id.len() <= 128
        && id.starts_with("proj_")
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The taxonomy itself, before the projects are held to it: each error once, here, rather than once per project.
fn validate_taxonomy(errs: &mut Errors, taxonomy: &Taxonomy) {
    let mut seen = HashSet::new();
    for tag in &taxonomy.required_tags {
        if tag.is_empty() {
            errs.push("taxonomy.required_tags", "holds an empty tag name");
        } else if !seen.insert(tag) {
            errs.push("taxonomy.required_tags", format!("names {tag:?} twice"));
        }
    }
    for (tag, allowed) in &taxonomy.allowed_values {
        if allowed.is_empty() {
            errs.push(format!("taxonomy.allowed_values.{tag}"), "is empty: no project could carry the tag");
        }
    }
}

/// The region requests are signed for with AWS credentials: `upstream.region`, which must agree with the region
/// the host names (`bedrock-mantle.<region>.api.aws`, or a VPC endpoint's `....bedrock-mantle.<region>.vpce.
/// amazonaws.com`), else that region; one of the two is needed.
fn aws_region(
    errs: &mut Errors,
    configured: Option<&str>,
    authority: &http::uri::Authority,
    auth: &str,
) -> Option<String> {
    let named = region_of_host(authority.host());
    match (configured.filter(|r| !r.is_empty()), named) {
        (Some(region), _) if !is_region(region) => {
            errs.push("upstream.region", "is not an AWS region name (like us-east-1)");
            None
        }
        (Some(region), Some(named)) if region != named => {
            errs.push(
                "upstream.region",
                format!(
                    "{region:?} is not the region upstream.base_url names ({named:?}): bedrock-mantle refuses a \
                     signature made for another region"
                ),
            );
            None
        }
        (Some(region), _) => Some(region.to_owned()),
        (None, Some(named)) => Some(named),
        (None, None) => {
            errs.push(
                "upstream.region",
                format!(
                    "must be set: auth = {auth:?} signs for a region, and the host of upstream.base_url ({}) names none",
                    authority.host()
                ),
            );
            None
        }
    }
}

/// The region in a bedrock-mantle host name, if it names one.
pub(super) fn region_of_host(host: &str) -> Option<String> {
    // Host names are case-insensitive.
    let host = host.to_ascii_lowercase();
    let labels: Vec<&str> = host.strip_suffix('.').unwrap_or(&host).split('.').collect();
    let region = match labels.as_slice() {
        ["bedrock-mantle" | "bedrock-mantle-fips", region, "api", "aws"] => region,
        [.., "bedrock-mantle", region, "vpce", "amazonaws", "com"] => region,
        _ => return None,
    };
    is_region(region).then(|| (*region).to_owned())
}

/// Whether `name` has an AWS region's shape (`us-east-1`, `eu-central-2`, `us-gov-west-1`).
fn is_region(name: &str) -> bool {
    let mut parts = name.split('-');
    let first = parts.next().unwrap_or("");
    let last = parts.next_back().unwrap_or("");
    name.len() <= 32
        && first.len() == 2
        && first.bytes().all(|b| b.is_ascii_lowercase())
        && !last.is_empty()
        && last.bytes().all(|b| b.is_ascii_digit())
        && parts.clone().count() >= 1
        && parts.all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_lowercase()))
}

/// Whether `name` can be an environment variable's name.
pub(super) fn is_env_name(name: &str) -> bool {
    name.len() <= 64
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Whether `value`, given where a name or path belongs, looks like a key itself: it starts as keys do (OpenAI's
/// `sk-`, Bedrock's `ABSK` and short-term `bedrock-api-key-`, a gateway key's `mg_` and hex digits), or it is long
/// and holds none of the `separators` such a name or path would have (`/` in a path, `_` in a variable name).
fn looks_like_key(value: &str, separators: &[char]) -> bool {
    let gateway_key =
        value.strip_prefix("mg_").is_some_and(|rest| rest.len() >= 16 && rest.bytes().all(|b| b.is_ascii_hexdigit()));
    gateway_key
        || ["sk-", "ABSK", "bedrock-api-key-"].iter().any(|p| value.starts_with(p))
        || (value.len() >= 32 && !value.contains(separators))
}

/// `value` as an error may show it: quoted if it is a short word (letters, digits, `_ - . : [ ]`) and no key;
/// otherwise (a key pasted into the wrong setting, say) not at all.
pub(super) fn shown(value: &str) -> String {
    let word = !value.is_empty()
        && value.len() <= 40
        && value.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.:[]".contains(&b));
    if word && !looks_like_key(value, &[]) { format!("{value:?}") } else { "the value given".to_owned() }
}

fn check_prefix(prefix: &str) -> Result<(), &'static str> {
    let Some(rest) = prefix.strip_prefix('/') else {
        return Err("must start with /");
    };
    if rest.is_empty() || rest.ends_with('/') {
        return Err("must name at least one path segment and not end with /");
    }
    for segment in rest.split('/') {
        if segment.is_empty() || segment == "." || segment == ".." {
            return Err("must not contain empty, . or .. segments");
        }
        if !segment.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~')) {
            return Err("may only use letters, digits, -, _, . and ~");
        }
    }
    // In any segment, not only the first: with `/team` routed to one project, `/team/v1` (or `/team/openai`)
    // routed to another would take the first route's API paths, and its traffic, by the longest match.
    if rest.split('/').any(|segment| RESERVED_ROUTE_SEGMENTS.iter().any(|r| segment.eq_ignore_ascii_case(r))) {
        return Err("must not use v1, openai or anthropic as a segment: it would shadow the API's own paths");
    }
    Ok(())
}

/// A whole number setting's value; none (reported) if it is not one.
pub(super) fn whole(errs: &mut Errors, key: &str, value: &super::raw::Whole) -> Option<u64> {
    match value.number() {
        Ok(n) => Some(n),
        Err(written) => {
            errs.push(key, format!("{written} is not a whole number"));
            None
        }
    }
}

fn parse_addr(errs: &mut Errors, key: &str, value: &str) -> std::net::SocketAddr {
    value.parse().unwrap_or_else(|e| {
        errs.push(key, format!("{} is not an address like 0.0.0.0:8080: {e}", shown(value)));
        std::net::SocketAddr::from(([127, 0, 0, 1], 0))
    })
}

pub(super) fn parse_duration(errs: &mut Errors, key: &str, value: &str, zero_ok: bool) -> Duration {
    match humantime::parse_duration(value) {
        Ok(d) if d.is_zero() && !zero_ok => {
            errs.push(key, "must be greater than 0");
            d
        }
        // hyper adds `header_read_timeout` to the clock itself, which panics past what an `Instant` can hold.
        Ok(d) if std::time::Instant::now().checked_add(d).is_none() => {
            errs.push(key, format!("{} is too long", shown(value)));
            Duration::from_secs(1)
        }
        Ok(d) => d,
        // humantime's message quotes the part it could not read: shown only with the value.
        Err(e) => {
            let shown = shown(value);
            let why = if shown.starts_with('"') { format!(": {e}") } else { String::new() };
            errs.push(key, format!("{shown} is not a duration like \"30s\" or \"5m\"{why}"));
            Duration::from_secs(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::limits::{Kind, Subject};

    fn errors(toml: &str) -> Vec<String> {
        match crate::Config::from_toml(toml) {
            Ok(_) => Vec::new(),
            Err(e) => e.downcast::<ConfigErrors>().map(|e| e.0).unwrap_or_else(|e| vec![e.to_string()]),
        }
    }

    const BASE: &str = r#"
        [[projects]]
        name = "A"
        id = "proj_a"
        tags = { Team = "t" }
        [[keys]]
        name = "k"
        sha256 = "0000000000000000000000000000000000000000000000000000000000000000"
        project = "A"
    "#;

    #[test]
    fn nothing_may_send_traffic_to_an_archived_project() {
        let old = "[[projects]]\nname = \"Old\"\narchived = true\n";
        assert!(errors(&format!("{BASE}\n{old}")).is_empty());
        let errs = errors(&format!(
            "[attribution]\ndefault_project = \"Old\"\n{BASE}\n{old}[[routes]]\nprefix = \"/old\"\nproject = \"Old\""
        ));
        assert_eq!(
            errs,
            [
                "routes[0].project: project \"Old\" is archived (archived = true)",
                "attribution.default_project: project \"Old\" is archived (archived = true)"
            ]
        );
    }

    #[test]
    fn limits_name_one_subject_and_real_numbers() {
        let rules = |rules: &str| errors(&format!("{BASE}\n[limits]\n{rules}"));
        let ok = "[[limits.rules]]\nproject = \"A\"\nrequests_per_minute = 10\nusd_per_month = 100.5\n\
                  [[limits.rules]]\nkey = \"k\"\ninput_tokens_per_minute = 1000\n\
                  [[limits.rules]]\ntag = { CostCenter = \"CC-1\" }\nusd_per_day = 0\n";
        assert_eq!(rules(ok), Vec::<String>::new());
        let config = crate::Config::from_toml(&format!("{BASE}\n[limits]\n{ok}")).expect("config");
        assert_eq!(
            config.limits.rules[0].limits,
            [(Kind::RequestsPerMinute, 10), (Kind::UsdPerMonth, 100_500_000_000)]
        );
        assert_eq!(config.limits.rules[2].subject, Subject::Tag("CostCenter".into(), "CC-1".into()));
        assert_eq!(
            rules(
                "[[limits.rules]]\nproject = \"Nope\"\nrequests_per_minute = 1\n\
                 [[limits.rules]]\nproject = \"A\"\nkey = \"k\"\nrequests_per_minute = 1\n\
                 [[limits.rules]]\ntag = { A = \"1\", B = \"2\" }\nrequests_per_minute = 1\n\
                 [[limits.rules]]\nkey = \"k\"\n\
                 [[limits.rules]]\nkey = \"k\"\nrequests_per_minute = 1.5\nusd_per_day = -1\n\
                 [[limits.rules]]\nproject = \"A\"\nrequests_per_minute = 1\n\
                 [[limits.rules]]\nproject = \"A\"\noutput_tokens_per_minute = 1\n"
            ),
            [
                "limits.rules[0].project: no project named \"Nope\"",
                "limits.rules[1]: names exactly one of project, key, or tag (one tag = value)",
                "limits.rules[2]: names exactly one of project, key, or tag (one tag = value)",
                "limits.rules[3]: sets no limit (requests_per_minute, input_tokens_per_minute, ..., usd_per_month)",
                "limits.rules[4].requests_per_minute: 1.5 is not a whole number",
                "limits.rules[4].usd_per_day: -1 is not an amount from 0 to 9000000",
                "limits.rules[6]: project:A already has a rule: put all its limits in one",
            ]
        );
    }

    #[test]
    fn the_limits_store_is_named_and_its_password_never_shown() {
        let limits = |text: &str| errors(&format!("{BASE}\n[limits]\n{text}"));
        assert_eq!(
            limits("backend = \"redis\""),
            ["limits.redis_url: required when backend = \"redis\" (or redis_url_env)"]
        );
        assert_eq!(limits("backend = \"redis\"\nredis_url = \"redis://127.0.0.1:6379/0\""), Vec::<String>::new());
        let with_password = limits("backend = \"redis\"\nredis_url = \"redis://:hunter2-secret@redis:6379/0\"");
        assert_eq!(with_password.len(), 1);
        assert!(
            with_password[0].contains("redis_url_env") && !with_password[0].contains("hunter2"),
            "{with_password:?}"
        );
        let not_a_url = limits("backend = \"redis\"\nredis_url = \"http://user:hunter2@x\"");
        assert!(!not_a_url.concat().contains("hunter2"), "{not_a_url:?}");
        // A variable unset where the config is checked is `serve`'s to need (`check` warns).
        assert_eq!(
            limits("backend = \"redis\"\nredis_url_env = \"MANTLEGATE_TEST_UNSET_REDIS_URL\""),
            Vec::<String>::new()
        );
        let config = crate::Config::from_toml(&format!(
            "{BASE}\n[limits]\nbackend = \"redis\"\nredis_url_env = \"MANTLEGATE_TEST_UNSET_REDIS_URL\""
        ))
        .expect("config");
        let crate::config::limits::Backend::Redis(url) = &config.limits.backend else { panic!("redis") };
        let unset = url.resolve().expect_err("unset").to_string();
        assert_eq!(unset, "limits.redis_url_env: environment variable MANTLEGATE_TEST_UNSET_REDIS_URL is not set");
        assert_eq!(limits("redis_url = \"redis://x\""), ["limits.redis_url: applies only to backend = \"redis\""]);
        assert_eq!(
            errors(&format!("[metering]\nenabled = false\n{BASE}\n[[limits.rules]]\nkey = \"k\"\nusd_per_day = 1\n")),
            ["limits.rules[0]: token and spend limits need [metering] enabled = true (they count the usage it reads)"]
        );
        let rate_only =
            format!("[metering]\nenabled = false\n{BASE}\n[[limits.rules]]\nkey = \"k\"\nrequests_per_minute = 1\n");
        assert_eq!(errors(&rate_only), Vec::<String>::new());
        assert_eq!(
            limits(
                "backend = \"etcd\"\non_backend_error = \"maybe\"\nbytes_per_input_token = 0\nreservation_ttl = \"0s\""
            ),
            [
                "limits.backend: \"etcd\" is not one of \"memory\", \"redis\"",
                "limits.on_backend_error: \"maybe\" is not one of \"allow\", \"deny\"",
                "limits.bytes_per_input_token: must be greater than 0",
                "limits.reservation_ttl: must be greater than 0",
            ]
        );
    }

    #[test]
    fn base_is_valid() {
        assert_eq!(errors(BASE), Vec::<String>::new());
    }

    #[test]
    fn taxonomy_errors_name_the_key() {
        let errs = errors(&format!(
            "[taxonomy]\nrequired_tags = [\"Team\", \"CostCenter\"]\n[taxonomy.allowed_values]\nTeam = [\"x\"]\n{BASE}"
        ));
        assert!(errs.contains(&"projects[0].tags.CostCenter: missing".to_string()), "{errs:?}");
        assert!(errs.contains(&"projects[0].tags.Team: \"t\" is not one of x".to_string()), "{errs:?}");
        // The taxonomy's own mistakes, each reported once.
        let errs = errors(&format!(
            "[taxonomy]\nrequired_tags = [\"Team\", \"Team\", \"\"]\n[taxonomy.allowed_values]\nTeam = []\n{BASE}"
        ));
        for expected in [
            "taxonomy.required_tags: names \"Team\" twice",
            "taxonomy.required_tags: holds an empty tag name",
            "taxonomy.allowed_values.Team: is empty: no project could carry the tag",
        ] {
            assert_eq!(errs.iter().filter(|e| *e == expected).count(), 1, "{expected}: {errs:?}");
        }
        // Tags that would make one label twice in the project's info series.
        let errs = errors(&format!(
            "{BASE}\n[[projects]]\nname = \"B\"\nid = \"proj_b\"\n\
             tags = {{ \"Cost-Center\" = \"a\", Cost_Center = \"b\", project = \"c\", tag_project = \"d\" }}"
        ));
        assert!(
            errs.contains(
                &"projects[1].tags.Cost_Center: makes the same metric label as the tag \"Cost-Center\"".to_string()
            ),
            "{errs:?}"
        );
        assert!(
            errs.contains(
                &"projects[1].tags.tag_project: makes the same metric label as the tag \"project\"".to_string()
            ),
            "{errs:?}"
        );
    }

    #[test]
    fn whole_number_settings_take_whole_numbers_only() {
        let errs = errors(&format!("[server]\nmax_body_bytes = 1.5\nworkers = 2.0\nmax_connections = -1\n{BASE}"));
        assert_eq!(
            errs,
            [
                "server.max_connections: -1 is not a whole number",
                "server.workers: 2.0 is not a whole number",
                "server.max_body_bytes: 1.5 is not a whole number",
            ]
        );
        let valid = crate::Config::from_toml(&format!("[server]\nmax_body_bytes = 10\n{BASE}")).expect("valid");
        assert_eq!(valid.server.max_body_bytes, 10);
    }

    #[test]
    fn unknown_keys_are_named_with_every_other_problem() {
        let errs = errors(&format!(
            "[server]\nlistn = \"0.0.0.0:1\"\nmax_body_bytes = 0\n[nope]\nx = 1\n{BASE}\n[[projects]]\nname = \"B\"\nid = \"proj_b\"\ntgs = {{}}\ntags = {{ Anything = \"goes\" }}"
        ));
        assert_eq!(
            errs,
            [
                "nope: not a setting (is it misspelled? the settings are listed in README.md)",
                "projects[1].tgs: not a setting (is it misspelled? the settings are listed in README.md)",
                "server.listn: not a setting (is it misspelled? the settings are listed in README.md)",
                "server.max_body_bytes: must be greater than 0",
            ]
        );
    }

    #[test]
    fn unknown_project_reference_is_named() {
        let errs = errors(&format!("{BASE}\n[[routes]]\nprefix = \"/x\"\nproject = \"Nope\""));
        assert_eq!(errs, vec!["routes[0].project: no project named \"Nope\"".to_string()]);
    }

    #[test]
    fn bad_hash_is_rejected_without_echo() {
        let errs =
            errors(&BASE.replace("0000000000000000000000000000000000000000000000000000000000000000", "mg_secretkey"));
        assert_eq!(errs.len(), 1);
        assert!(errs[0].starts_with("keys[0].sha256"));
        assert!(!errs[0].contains("mg_secretkey"));
    }

    #[test]
    fn aws_auth_signs_for_the_region_the_host_names() {
        let config = |upstream: &str| crate::Config::from_toml(&format!("[upstream]\n{upstream}\n{BASE}"));
        let sigv4 = config("auth = \"sigv4\"").expect("the default host names us-east-1");
        assert_eq!((sigv4.upstream.auth, sigv4.upstream.region.as_deref()), (UpstreamAuth::SigV4, Some("us-east-1")));
        let token = config(
            "auth = \"aws_token\"\nbase_url = \"https://bedrock-mantle.eu-west-1.api.aws\"\nregion = \"eu-west-1\"",
        )
        .expect("agreeing region");
        assert_eq!(
            (token.upstream.auth, token.upstream.region.as_deref()),
            (UpstreamAuth::AwsToken, Some("eu-west-1"))
        );
        let vpce = config(
            "auth = \"sigv4\"\nbase_url = \"https://vpce-0a1b-x2y3.bedrock-mantle.ap-southeast-2.vpce.amazonaws.com\"",
        )
        .expect("a VPC endpoint names its region");
        assert_eq!(vpce.upstream.region.as_deref(), Some("ap-southeast-2"));
        let local =
            config("auth = \"sigv4\"\nbase_url = \"http://127.0.0.1:9000\"\nregion = \"us-west-2\"").expect("local");
        assert_eq!(local.upstream.region.as_deref(), Some("us-west-2"));

        assert_eq!(
            errors(&format!("[upstream]\nauth = \"sigv4\"\nregion = \"us-west-2\"\n{BASE}")),
            [
                "upstream.region: \"us-west-2\" is not the region upstream.base_url names (\"us-east-1\"): bedrock-mantle \
              refuses a signature made for another region"
            ]
        );
        assert_eq!(
            errors(&format!("[upstream]\nauth = \"aws_token\"\nbase_url = \"http://127.0.0.1:9000\"\n{BASE}")),
            ["upstream.region: must be set: auth = \"aws_token\" signs for a region, and the host of \
              upstream.base_url (127.0.0.1) names none"]
        );
        assert_eq!(
            errors(&format!("[upstream]\nauth = \"sigv4\"\nregion = \"ABSK-not-a-region\"\n{BASE}")),
            ["upstream.region: is not an AWS region name (like us-east-1)"]
        );
        assert_eq!(
            errors(&format!("[upstream]\nauth = \"sigv4\"\napi_key_env = \"KEY\"\n{BASE}")),
            ["upstream.api_key_env: applies only to auth = \"api_key\" (this config has auth = \"sigv4\")"]
        );
        // With a static key the region is not used, and not checked.
        assert!(config("region = \"us-west-2\"").is_ok());
    }

    #[test]
    fn region_shapes() {
        for region in ["us-east-1", "eu-central-2", "us-gov-west-1", "ap-southeast-5"] {
            assert!(is_region(region), "{region}");
        }
        for not in ["", "us", "us-east", "US-EAST-1", "us-east-x", "us--1", "useast-1", "us-east-1-", "-us-east-1"] {
            assert!(!is_region(not), "{not}");
        }
        assert_eq!(region_of_host("bedrock-mantle.us-east-1.api.aws").as_deref(), Some("us-east-1"));
        assert_eq!(region_of_host("bedrock-mantle.us-east-1.api.aws.").as_deref(), Some("us-east-1"));
        assert_eq!(region_of_host("bedrock-mantle-fips.us-gov-west-1.api.aws").as_deref(), Some("us-gov-west-1"));
        assert_eq!(region_of_host("Bedrock-Mantle.US-WEST-2.api.aws").as_deref(), Some("us-west-2"));
        assert_eq!(region_of_host("bedrock-mantlefoo.us-east-1.api.aws"), None);
        assert_eq!(region_of_host("mantle.example.com"), None);
        assert_eq!(region_of_host("bedrock-mantle.api.aws"), None);
    }

    #[test]
    fn passthrough_needs_trusted_callers() {
        let errs = errors(&format!("[upstream]\nauth = \"passthrough\"\n{BASE}"));
        assert!(errs[0].starts_with("upstream.auth:"), "{errs:?}");
    }

    #[test]
    fn workers_default_to_the_cpus_and_workers_and_connections_are_bounded() {
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        assert_eq!(crate::Config::from_toml(BASE).expect("valid").server.workers, cpus);
        let three = crate::Config::from_toml(&format!("[server]\nworkers = 3\n{BASE}")).expect("valid");
        assert_eq!(three.server.workers, 3);
        let errs = errors(&format!("[server]\nmax_connections = 100000000\n{BASE}"));
        assert_eq!(errs, vec!["server.max_connections: 100000000 is more than 16777216".to_string()]);
        let capped = crate::Config::from_toml(&format!("[server]\nmax_connections = 5\n{BASE}")).expect("valid");
        assert_eq!((capped.server.max_connections, three.server.max_connections), (Some(5), None));
        let errs = errors(&format!("[server]\nworkers = 5000\n{BASE}"));
        assert_eq!(errs, vec!["server.workers: 5000 is more than 1024".to_string()]);
    }

    #[test]
    fn base_url_credentials_are_refused_and_never_echoed() {
        for (url, secret) in [
            ("https://user:hunter2@bedrock.example/x", "hunter2"),
            ("ftp://user:hunter2@bedrock.example", "hunter2"),
            ("https://user:hunter2@", "hunter2"),
            ("https://user:hunter2@bad host", "hunter2"),
            ("https://user:hunter2@h.example?q=1#x@y", "hunter2"),
            // A password holding what ends an authority.
            ("https://user:hun/ter2@h.example", "hun/ter2"),
            ("https://user:hun?ter2@h.example", "hun?ter2"),
            ("https://user:hun#ter2@h.example", "hun#ter2"),
            ("https://user:hun+ter2/x=@h.example", "ter2/x="),
        ] {
            let errs = errors(&format!("[upstream]\nbase_url = \"{url}\"\n{BASE}"));
            assert!(errs.iter().any(|e| e.ends_with("must not carry credentials")), "{url}: {errs:?}");
            assert!(errs.iter().all(|e| !e.contains(secret)), "{errs:?}");
        }
        assert_eq!(shown_url("https://u:p/q@h.example"), "https://***@h.example");
        assert_eq!(shown_url("https://h.example/v1"), "https://h.example/v1");
        assert_eq!(shown_url("u:p@h.example"), "***@h.example");
        for odd in ["", "://", "@", "ü@x", "https://日本:パス@ホスト/x", "https://[::1"] {
            assert!(!shown_url(odd).contains("パス"), "{odd}");
        }
    }

    #[test]
    fn a_token_in_the_base_urls_query_is_refused_and_never_echoed() {
        for url in [
            "https://h.example/?api_key=hunter2",
            "https://h.example?api-key=hunter2",
            "https://h.example/v1?x=1&token=hunter2",
            "https://h.example#hunter2",
            "https://u:p@h.example/?k=hunter2",
        ] {
            let errs = errors(&format!("[upstream]\nbase_url = \"{url}\"\n{BASE}"));
            assert!(errs.iter().any(|e| e.contains("must have no query or fragment")), "{url}: {errs:?}");
            assert!(errs.iter().all(|e| !e.contains("hunter2")), "{errs:?}");
        }
    }

    #[test]
    fn base_url_must_not_have_a_path() {
        let errs = errors(&format!("[upstream]\nbase_url = \"https://h.example/v1\"\n{BASE}"));
        assert!(errs[0].starts_with("upstream.base_url:"), "{errs:?}");
    }

    #[test]
    fn route_prefixes_are_strict() {
        for bad in ["chat", "/", "/v1", "/a/", "/a//b", "/a/../b", "/a%2f"] {
            assert!(check_prefix(bad).is_err(), "{bad}");
        }
        // A segment that would take another route's API paths (`/team` and `/team/v1`), in any case.
        for bad in ["/team/v1", "/x/openai", "/x/Anthropic", "/a/b/V1"] {
            assert!(check_prefix(bad).is_err(), "{bad}");
        }
        assert!(check_prefix("/team-a/chat").is_ok());
        assert!(check_prefix("/team/v1beta").is_ok());
    }

    #[test]
    fn api_key_env_names_a_variable_and_is_never_echoed() {
        let errs = errors(&format!(
            "[upstream]\napi_key_env = \"ABSKQmVkcm9ja0FQSUtleS1hYmNk+ZWZnaGlqa2xtbm9wcXJz=\"\n{BASE}"
        ));
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(errs[0].starts_with("upstream.api_key_env: is not an environment variable name"), "{errs:?}");
        assert!(!errs[0].contains("ABSK"), "{errs:?}");
        assert!(errors(&format!("[upstream]\napi_key_env = \"MY_KEY_2\"\n{BASE}")).is_empty());
    }

    #[test]
    fn a_key_given_for_the_key_file_or_variable_is_refused_and_never_echoed() {
        let gateway_key = format!("mg_{}", "0123456789abcdef".repeat(4));
        for (setting, value) in [
            ("api_key_file", "sk-proj-hunter2abc"),
            ("api_key_file", "ABSKQmVkcm9ja0FQSUtleS1hunter2"),
            ("api_key_file", "bedrock-api-key-YmVkcm9ja2h1bnter2"),
            ("api_key_file", gateway_key.as_str()),
            ("api_key_file", "Qm9ja0FQSUtleS1hYmNkZWZnaGlqa2hunter2xtbm9w"),
            // Shaped like a variable name, but a key all the same.
            ("api_key_env", "ABSKQmVkcm9ja0FQSUtleShunter2"),
            ("api_key_env", "Qm9ja0FQSUtleS1hYmNkZWZnaGlqa2hunter2xtbm9w"),
        ] {
            let errs = errors(&format!("[upstream]\n{setting} = \"{value}\"\n{BASE}"));
            assert_eq!(errs.len(), 1, "{value}: {errs:?}");
            assert!(errs[0].starts_with(&format!("upstream.{setting}: ")), "{errs:?}");
            assert!(errs[0].contains("never the key itself"), "{errs:?}");
            assert!(!errs[0].contains("hunter2") && !errs[0].contains("0123456789abcdef"), "{errs:?}");
        }
        for (setting, value) in [
            ("api_key_file", "/var/run/secrets/mantle/api-key"),
            ("api_key_file", "api-key"),
            ("api_key_file", "/var/run/secrets/a-rather-long-directory-name/and-a-long-file-name"),
            ("api_key_env", "MANTLE_API_KEY"),
            ("api_key_env", "A_RATHER_LONG_NAME_FOR_THE_VARIABLE_WITH_THE_KEY"),
        ] {
            assert_eq!(
                errors(&format!("[upstream]\n{setting} = \"{value}\"\n{BASE}")),
                Vec::<String>::new(),
                "{value}"
            );
        }
    }

    #[test]
    fn the_admin_token_is_named_never_given_and_read_by_serve() {
        let with = |settings: &str| crate::Config::from_toml(&format!("[server]\n{settings}\n{BASE}"));
        assert_eq!(with("").expect("valid").server.admin_token, None);
        assert_eq!(
            with("admin_token_env = \"ADMIN_TOKEN\"").expect("valid").server.admin_token,
            Some(AdminToken::Env("ADMIN_TOKEN".into()))
        );
        // Only named: the variable need not be set for the config to be valid (`check` runs where secrets are not).
        assert_eq!(
            with("admin_token_file = \"/var/run/secrets/admin/token\"").expect("valid").server.admin_token,
            Some(AdminToken::File("/var/run/secrets/admin/token".into()))
        );
        for (settings, error) in [
            ("admin_token_env = \"A\"\nadmin_token_file = \"/t\"", "server.admin_token_file: set either"),
            ("admin_token_env = \"\"", "server.admin_token_env: must not be empty"),
            ("admin_token_file = \"\"", "server.admin_token_file: must not be empty"),
            ("admin_token_env = \"hunter2-hunter2-hunter2\"", "server.admin_token_env: is not an environment variable"),
            ("admin_token_file = \"sk-hunter2hunter2hunter2\"", "server.admin_token_file: looks like a token"),
        ] {
            let errs = errors(&format!("[server]\n{settings}\n{BASE}"));
            assert!(errs.len() == 1 && errs[0].starts_with(error), "{settings}: {errs:?}");
            assert!(!errs[0].contains("hunter2"), "{errs:?}");
        }
    }

    #[test]
    fn an_admin_token_is_read_whole_and_must_be_long_and_one_word() {
        let dir = std::env::temp_dir().join(format!("mantlegate-admin-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("token");
        let read = |text: &str| {
            std::fs::write(&file, text).expect("write");
            AdminToken::File(file.clone()).read().map(|s| s.expose().to_owned()).map_err(|e| e.to_string())
        };
        assert_eq!(read("0123456789abcdef0123\n"), Ok("0123456789abcdef0123".to_owned()));
        let short = read("hunter2").expect_err("short");
        assert!(short.contains("shorter than 16") && !short.contains("hunter2"), "{short}");
        let spaced = read("hunter2 hunter2 hunter2").expect_err("spaces");
        assert!(spaced.contains("spaces") && !spaced.contains("hunter2"), "{spaced}");
        std::fs::remove_file(&file).expect("remove");
        let missing = AdminToken::File(file.clone()).read().expect_err("missing").to_string();
        assert!(missing.starts_with("server.admin_token_file: cannot read"), "{missing}");
        let unset = AdminToken::Env("MANTLEGATE_TEST_UNSET_ADMIN_TOKEN".into()).read().expect_err("unset");
        assert!(unset.to_string().starts_with("server.admin_token_env: environment variable"), "{unset}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_value_that_is_no_word_is_not_echoed_in_errors() {
        for (section, setting) in [
            ("callers", "auth"),
            ("upstream", "auth"),
            ("attribution", "unattributed"),
            ("server", "listen"),
            ("server", "admin_listen"),
            ("server", "shutdown_grace"),
            ("upstream", "idle_timeout"),
            ("server", "max_body_bytes"),
        ] {
            for secret in ["sk-hunter2", "ABSKhunter2", "Bearer hunter2", "hunter2/hunter2=="] {
                let errs = errors(&format!("[{section}]\n{setting} = \"{secret}\"\n{BASE}"));
                let line = errs.iter().find(|e| e.starts_with(&format!("{section}.{setting}: "))).expect("an error");
                assert!(line.contains("the value given"), "{line}");
                assert!(errs.iter().all(|e| !e.contains("hunter2")), "{errs:?}");
            }
        }
        // A plain word is named, so a typo can be seen.
        let errs = errors(&format!("[callers]\nauth = \"key\"\n{BASE}"));
        assert_eq!(errs, ["callers.auth: \"key\" is not one of \"keys\", \"none\""]);
        let errs = errors(&format!("[server]\nlisten = \"0.0.0.0:80800\"\n{BASE}"));
        assert!(errs[0].starts_with("server.listen: \"0.0.0.0:80800\" is not an address"), "{errs:?}");
        let errs = errors(&format!("[upstream]\nidle_timeout = \"5x\"\n{BASE}"));
        assert!(errs[0].starts_with("upstream.idle_timeout: \"5x\" is not a duration"), "{errs:?}");
    }

    #[test]
    fn names_and_ids_are_unique_and_unambiguous() {
        let toml = format!(
            "{BASE}\n[[projects]]\nname = \"proj_a\"\ntags = {{}}\n[[projects]]\nname = \"A\"\nid = \"proj_a\""
        );
        let errs = errors(&toml);
        assert!(errs.iter().any(|e| e.starts_with("projects[2].name: \"A\" is also")), "{errs:?}");
        assert!(errs.iter().any(|e| e.starts_with("projects[2].id: \"proj_a\" is also")), "{errs:?}");
        assert!(errs.iter().any(|e| e.contains("is the name of projects[1]")), "{errs:?}");
    }

    #[test]
    fn default_cannot_be_configured() {
        let errs = errors(&BASE.replace("name = \"A\"", "name = \"default\"").replace("project = \"A\"", ""));
        assert!(errs.iter().any(|e| e.starts_with("projects[0].name")), "{errs:?}");
    }

    #[test]
    fn reroute_needs_a_target() {
        let errs = errors(&format!("[attribution]\nunattributed = \"reroute\"\n{BASE}"));
        assert_eq!(
            errs,
            vec!["attribution.reroute_to: required when attribution.unattributed = \"reroute\"".to_string()]
        );
    }

    #[test]
    fn durations_parse() {
        let errs = errors(&format!("[server]\nheader_read_timeout = \"0s\"\n{BASE}"));
        assert_eq!(errs, vec!["server.header_read_timeout: must be greater than 0".to_string()]);
        let errs = errors(&format!("[upstream]\nidle_timeout = \"soon\"\n{BASE}"));
        assert!(errs[0].starts_with("upstream.idle_timeout:"), "{errs:?}");
        // Past what the clock can hold (2^63 seconds): refused here, not a panic per connection.
        let errs = errors(&format!("[server]\nheader_read_timeout = \"292271023046y\"\n{BASE}"));
        assert_eq!(errs, vec!["server.header_read_timeout: \"292271023046y\" is too long".to_string()]);
        assert_eq!(errors(&format!("[upstream]\nresponse_timeout = \"100y\"\n{BASE}")), Vec::<String>::new());
    }

    #[test]
    fn the_projects_check_is_off_unless_set_and_needs_the_gateways_own_credential() {
        let check = |upstream: &str| {
            crate::Config::from_toml(&format!("[upstream]\n{upstream}\n{BASE}"))
                .map(|c| c.upstream.projects_check_interval)
        };
        assert_eq!(check("").expect("valid"), None);
        assert_eq!(check("projects_check_interval = \"0s\"").expect("valid"), None);
        assert_eq!(check("projects_check_interval = \"5m\"").expect("valid"), Some(Duration::from_secs(300)));
        let passthrough =
            "[upstream]\nauth = \"passthrough\"\nprojects_check_interval = \"5m\"\n[callers]\nauth = \"none\"\n";
        let errs = errors(&format!("{passthrough}[[projects]]\nname = \"A\"\nid = \"proj_a\"\n"));
        assert!(
            errs.iter().any(|e| e.starts_with("upstream.projects_check_interval: needs the gateway's own credential")),
            "{errs:?}"
        );
    }
}
