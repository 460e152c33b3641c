//! Property tests, over generated configs, requests and streams:
//!
//! - attribution (DESIGN.md, "Attribution, in order") never gives a caller a project its key may not use, and
//!   its answer is the documented order step for step, whatever the headers' order or spelling;
//! - the SSE usage tap forwards a stream byte for byte, less exactly what it is meant to strip, however the
//!   stream is cut into chunks, and reads the same usage from every cutting.
//!
//! Each property is checked against an oracle written here from the documented rules (DESIGN.md, README.md,
//! the stripping rules of `src/metering/usage/strip.rs`), never by asking the code under test twice.
//!
//! Runs are reproducible: a fixed seed unless `PROPTEST_RNG_SEED` is set, `PROPTEST_CASES` to run more (or
//! fewer) cases, and no `proptest-regressions/` files: a failure prints its minimal input instead.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use proptest::sample::{Index, select, subsequence};
use proptest::test_runner::RngSeed;
use sha2::{Digest, Sha256};

use mantlegate::GatewayError;
use mantlegate::attribution::Source;
use mantlegate::config::Config;
use mantlegate::metering::metrics::Metrics;
use mantlegate::metering::usage::{Dialect, Usage, UsageTap};
use mantlegate::proxy::Credential;
use mantlegate::snapshot::Snapshot;

/// The seed every run starts from unless `PROPTEST_RNG_SEED` says otherwise: CI and a developer re-running a
/// failure see the same cases.
const SEED: u64 = 0x6d61_6e74_6c65_6761;

/// `cases` cases (unless `PROPTEST_CASES` is set), the fixed seed (unless `PROPTEST_RNG_SEED` is set), and no
/// failure persistence files written into the tree.
fn settings(cases: u32) -> ProptestConfig {
    // `default()` has already read the PROPTEST_* environment variables; those set there win.
    let mut config = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = cases;
    }
    if std::env::var_os("PROPTEST_RNG_SEED").is_none() {
        config.rng_seed = RngSeed::Fixed(SEED);
    }
    // Shrinking past the automatic 4 x cases: a failure is worth a smaller example.
    if std::env::var_os("PROPTEST_MAX_SHRINK_ITERS").is_none() {
        config.max_shrink_iters = 10_000;
    }
    config.failure_persistence = None;
    config
}

// ---------------------------------------------------------------------------------------------------------
// Attribution: generated configs.

/// Project names drawn from: two that differ only in case, one with a space, one not ASCII.
static NAMES: [&str; 6] = ["Chat", "chat", "Search", "Team A", "Équipe", "Unattributed"];
/// Route prefixes a config may hold, some inside others.
static PREFIXES: [&str; 5] = ["/a", "/a/b", "/team", "/team/chat", "/x.y"];
/// Prefixes no config routes; a request may also come under one of [`PREFIXES`] that its config does not route.
static UNROUTED_PREFIXES: [&str; 3] = ["/teamx", "/b", "/a/b/c"];
/// API paths after the prefix, and whether the gateway forwards them (the route table's own list).
const API: [(&str, &str, bool); 10] = [
    ("POST", "/v1/chat/completions", true),
    ("POST", "/openai/v1/chat/completions", true),
    ("POST", "/v1/responses", true),
    ("GET", "/v1/responses/resp_1", true),
    ("GET", "/v1/models", true),
    ("POST", "/anthropic/v1/messages", true),
    ("GET", "/v1/organization/projects", false),
    ("POST", "/v1/chat/completions/", false),
    ("GET", "/v1/chat/completions", false),
    ("POST", "/v1//chat/completions", false),
];
/// Project header values other than a configured name or id: `default` in some spellings, blanks, unknown
/// projects, a configured name in the wrong case or spacing, text that is not UTF-8 and the text it is read as.
static OTHER_ASKED: [&[u8]; 14] = [
    b"default",
    b"Default",
    b"DEFAULT",
    b" default\t",
    b"",
    b"  ",
    b"proj_unknown",
    b"PROJ_P0",
    b"proj_p9",
    b"CHAT",
    b"Team  A",
    b"chat ",
    b"proj_\xff",
    "\u{fffd}".as_bytes(),
];
/// Configs hold up to this many keys; key `i`'s secret is `key-i`, and `key-N` for N past the config's keys is
/// a well-formed key it does not know.
const MAX_KEYS: usize = 4;

#[derive(Debug, Clone)]
struct ProjectSpec {
    name: String,
    id: String,
}

#[derive(Debug, Clone)]
struct KeySpec {
    /// Index into the projects.
    project: Option<usize>,
    may_select: Vec<usize>,
}

#[derive(Debug, Clone)]
struct Setup {
    projects: Vec<ProjectSpec>,
    /// `None`: `callers.auth = "none"` (which allows no `[[keys]]`); else `"keys"` with these.
    keys: Option<Vec<KeySpec>>,
    /// Prefix and project index.
    routes: Vec<(&'static str, usize)>,
    default_project: Option<usize>,
    /// `unattributed = "reroute"` to this project; `None` is `"reject"`.
    reroute_to: Option<usize>,
}

fn setup() -> impl Strategy<Value = Setup> {
    (1..=NAMES.len()).prop_flat_map(|n| {
        // Some projects are named by their own id (allowed: the name means no other project).
        let projects = (subsequence(NAMES.to_vec(), n).prop_shuffle(), vec(prop::bool::weighted(0.15), n)).prop_map(
            |(names, named_by_id)| {
                names
                    .into_iter()
                    .zip(named_by_id)
                    .enumerate()
                    .map(|(i, (name, by_id))| {
                        let id = format!("proj_p{i}");
                        ProjectSpec { name: if by_id { id.clone() } else { name.to_owned() }, id }
                    })
                    .collect::<Vec<_>>()
            },
        );
        let key =
            (option::of(0..n), vec(0..n, 0..=3)).prop_map(|(project, may_select)| KeySpec { project, may_select });
        let keys = option::weighted(0.75, vec(key, 1..=MAX_KEYS));
        let routes = (subsequence(PREFIXES.to_vec(), 0..=3), vec(0..n, 3))
            .prop_map(|(prefixes, projects)| prefixes.into_iter().zip(projects).collect::<Vec<_>>());
        (projects, keys, routes, option::of(0..n), option::of(0..n)).prop_map(
            |(projects, keys, routes, default_project, reroute_to)| Setup {
                projects,
                keys,
                routes,
                default_project,
                reroute_to,
            },
        )
    })
}

fn quoted(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

fn secret(i: usize) -> String {
    format!("key-{i}")
}

impl Setup {
    fn name(&self, project: usize) -> &str {
        &self.projects[project].name
    }

    fn toml(&self) -> String {
        let mut t =
            format!("[callers]\nauth = \"{}\"\n[attribution]\n", if self.keys.is_some() { "keys" } else { "none" });
        if let Some(p) = self.default_project {
            t += &format!("default_project = {}\n", quoted(self.name(p)));
        }
        if let Some(p) = self.reroute_to {
            t += &format!("unattributed = \"reroute\"\nreroute_to = {}\n", quoted(self.name(p)));
        }
        for p in &self.projects {
            t += &format!("[[projects]]\nname = {}\nid = {}\n", quoted(&p.name), quoted(&p.id));
        }
        for (i, k) in self.keys.iter().flatten().enumerate() {
            t += &format!("[[keys]]\nname = \"k{i}\"\nsha256 = \"{}\"\n", hex::encode(Sha256::digest(secret(i))));
            if let Some(p) = k.project {
                t += &format!("project = {}\n", quoted(self.name(p)));
            }
            let may_select: Vec<String> = k.may_select.iter().map(|&p| quoted(self.name(p))).collect();
            t += &format!("may_select = [{}]\n", may_select.join(", "));
        }
        for (prefix, p) in &self.routes {
            t += &format!("[[routes]]\nprefix = \"{prefix}\"\nproject = {}\n", quoted(self.name(*p)));
        }
        t
    }

    fn snapshot(&self) -> Snapshot {
        let config = Config::from_toml(&self.toml()).unwrap_or_else(|e| panic!("{e:#}\n{}", self.toml()));
        Snapshot::build(config, Credential::Passthrough, None, &Metrics::new()).unwrap()
    }

    /// Whether key `key` (trusted callers: `None`) may use project `p`: its `project` or `may_select`.
    fn may_use(&self, key: Option<usize>, p: usize) -> bool {
        match (key, &self.keys) {
            (Some(k), Some(keys)) => keys[k].project == Some(p) || keys[k].may_select.contains(&p),
            _ => true,
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Attribution: generated requests.

/// A gateway key as presented.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Secret {
    /// `key-i`: configured if `i` is below the config's key count.
    Key(usize),
    Unknown,
    Empty,
}

impl Secret {
    fn text(self) -> String {
        match self {
            Self::Key(i) => secret(i),
            Self::Unknown => "mg_unknown".into(),
            Self::Empty => String::new(),
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Cred {
    Authorization { scheme: &'static str, secret: Secret, padded: bool },
    ApiKey { secret: Secret, padded: bool },
}

impl Cred {
    fn secret(self) -> Secret {
        match self {
            Self::Authorization { secret, .. } | Self::ApiKey { secret, .. } => secret,
        }
    }

    fn header(self) -> (HeaderName, Vec<u8>) {
        let pad = |s: Secret, padded: bool| if padded { format!(" {} ", s.text()) } else { s.text() };
        match self {
            Self::Authorization { scheme, secret, padded } => {
                (http::header::AUTHORIZATION, format!("{scheme} {}", pad(secret, padded)).into_bytes())
            }
            Self::ApiKey { secret, padded } => (HeaderName::from_static("x-api-key"), pad(secret, padded).into_bytes()),
        }
    }
}

/// A project header value.
#[derive(Debug, Clone, Copy)]
enum Asked {
    /// A configured project's name (the index scaled to the config's projects), padded.
    Name(Index, &'static str),
    /// A configured project's id, padded.
    Id(Index, &'static str),
    /// Anything else, as bytes: `default` in some spelling, blanks, unknown names, names in the wrong case,
    /// text that is not UTF-8.
    Other(&'static [u8]),
}

#[derive(Debug, Clone)]
struct Request {
    prefix: &'static str,
    api: usize,
    creds: Vec<Cred>,
    /// Header (`true`: `anthropic-workspace-id`, else `OpenAI-Project`) and value.
    asked: Vec<(bool, Asked)>,
}

/// A request for `setup`: mostly under no prefix or one of its routes, mostly with one of its keys.
fn request(setup: &Setup) -> impl Strategy<Value = Request> + use<> {
    let mut routed = vec!["", ""];
    routed.extend(setup.routes.iter().map(|(prefix, _)| *prefix));
    let unrouted: Vec<&str> =
        PREFIXES.iter().chain(&UNROUTED_PREFIXES).copied().filter(|p| !routed.contains(p)).collect();
    let prefix = prop_oneof![10 => select(routed), 1 => select(unrouted)];
    let api = prop_oneof![10 => 0..6usize, 1 => 6..API.len()];
    let keys = setup.keys.as_ref().map_or(0, Vec::len);
    let secret = prop_oneof![
        10 => (0..keys.max(1)).prop_map(Secret::Key),
        1 => Just(Secret::Key(keys)),
        1 => Just(Secret::Unknown),
        1 => Just(Secret::Empty),
    ];
    // Mostly one credential header, the scheme mostly spelt `Bearer`; sometimes none, or several.
    let cred = prop_oneof![
        (select(vec!["Bearer", "Bearer", "Bearer", "bearer", "BEARER", "Basic"]), secret.clone(), any::<bool>())
            .prop_map(|(scheme, secret, padded)| Cred::Authorization { scheme, secret, padded }),
        (secret, any::<bool>()).prop_map(|(secret, padded)| Cred::ApiKey { secret, padded }),
    ];
    let creds = prop_oneof![6 => vec(cred.clone(), 1..=1), 1 => vec(cred, 0..=3)];
    let pad = select(vec!["", "", " ", "\t", "  "]);
    let asked = prop_oneof![
        2 => (any::<Index>(), pad.clone()).prop_map(|(i, pad)| Asked::Name(i, pad)),
        2 => (any::<Index>(), pad).prop_map(|(i, pad)| Asked::Id(i, pad)),
        1 => select(&OTHER_ASKED[..]).prop_map(Asked::Other),
    ];
    // No project header, one, or several (repeated, across both names, agreeing or not).
    let asked = prop_oneof![
        2 => vec((any::<bool>(), asked.clone()), 0..=0),
        4 => vec((any::<bool>(), asked.clone()), 1..=1),
        2 => vec((any::<bool>(), asked), 2..=3),
    ];
    (prefix, api, creds, asked).prop_map(|(prefix, api, creds, asked)| Request { prefix, api, creds, asked })
}

/// A config and a request to it.
fn case() -> impl Strategy<Value = (Setup, Request)> {
    setup().prop_flat_map(|setup| {
        let request = request(&setup);
        (Just(setup), request)
    })
}

impl Request {
    fn method(&self) -> Method {
        Method::from_bytes(API[self.api].0.as_bytes()).unwrap()
    }

    fn path(&self) -> String {
        format!("{}{}", self.prefix, API[self.api].1)
    }

    fn value(setup: &Setup, asked: Asked) -> Vec<u8> {
        match asked {
            Asked::Name(i, pad) => {
                format!("{pad}{}{pad}", setup.projects[i.index(setup.projects.len())].name).into_bytes()
            }
            Asked::Id(i, pad) => format!("{pad}{}{pad}", setup.projects[i.index(setup.projects.len())].id).into_bytes(),
            Asked::Other(bytes) => bytes.to_vec(),
        }
    }

    /// Every header, credentials first.
    fn headers(&self, setup: &Setup) -> Vec<(HeaderName, Vec<u8>)> {
        let project = |anthropic: bool| {
            HeaderName::from_static(if anthropic { "anthropic-workspace-id" } else { "openai-project" })
        };
        self.creds
            .iter()
            .map(|c| c.header())
            .chain(self.asked.iter().map(|&(anthropic, asked)| (project(anthropic), Self::value(setup, asked))))
            .collect()
    }
}

fn header_map(headers: &[(HeaderName, Vec<u8>)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in headers {
        map.append(name.clone(), HeaderValue::from_bytes(value).unwrap());
    }
    map
}

// ---------------------------------------------------------------------------------------------------------
// Attribution: the oracle, and what the code does.

#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    /// Forwarded to this project (by name), for this reason.
    Attributed(String, Source),
    /// 404 `unknown_route`.
    UnknownRoute,
    /// 401 `invalid_api_key`.
    InvalidApiKey,
    /// 400: the headers name different projects.
    Conflict,
    /// 403 `project_not_allowed`.
    NotAllowed,
    /// 403 `project_required`.
    Required,
}

/// What a project header value names, for the oracle.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Named {
    Project(usize),
    Unknown(String),
}

/// The project the request's path comes under: the longest configured prefix followed by `/`.
fn expected_route(setup: &Setup, path: &str) -> Option<(&'static str, usize)> {
    setup
        .routes
        .iter()
        .copied()
        .filter(|(prefix, _)| path.strip_prefix(prefix).is_some_and(|rest| rest.starts_with('/')))
        .max_by_key(|(prefix, _)| prefix.len())
}

/// The one key a request presents: at most one `Authorization` (a Bearer one) and one `x-api-key`, and the
/// same key in both if both are there; none if it is empty.
fn presented(creds: &[Cred]) -> Option<Secret> {
    let authorization = creds.iter().filter(|c| matches!(c, Cred::Authorization { .. })).count();
    if authorization > 1 || creds.len() - authorization > 1 {
        return None;
    }
    if creds.iter().any(|c| matches!(c, Cred::Authorization { scheme, .. } if !scheme.eq_ignore_ascii_case("bearer"))) {
        return None;
    }
    let secrets: BTreeSet<Secret> = creds.iter().map(|c| c.secret()).collect();
    match secrets.into_iter().collect::<Vec<_>>()[..] {
        [Secret::Empty] | [] => None,
        [one] => Some(one),
        _ => None,
    }
}

/// What each project header names; blank values and `default` name nothing.
fn expected_named(setup: &Setup, req: &Request) -> BTreeSet<Named> {
    req.asked
        .iter()
        .filter_map(|&(_, asked)| {
            let value = Request::value(setup, asked);
            let text = std::str::from_utf8(&value).map_or("\u{fffd}", str::trim).to_owned();
            if text.is_empty() || text.eq_ignore_ascii_case("default") {
                return None;
            }
            Some(match setup.projects.iter().position(|p| p.name == text || p.id == text) {
                Some(p) => Named::Project(p),
                None => Named::Unknown(text),
            })
        })
        .collect()
}

/// DESIGN.md's order: only known routes; the caller's key; the asked-for project if the key may use it; the
/// route's project if the key may use it; the key's project; `default_project`; the unattributed policy.
fn expected(setup: &Setup, req: &Request) -> Outcome {
    let path = req.path();
    let route = expected_route(setup, &path);
    let rest = route.map_or(&path[..], |(prefix, _)| &path[prefix.len()..]);
    if !API.iter().any(|&(method, api, forwarded)| forwarded && method == API[req.api].0 && api == rest) {
        return Outcome::UnknownRoute;
    }
    let key = match &setup.keys {
        None => None,
        Some(keys) => match presented(&req.creds) {
            Some(Secret::Key(i)) if i < keys.len() => Some(i),
            _ => return Outcome::InvalidApiKey,
        },
    };
    let attributed = |p: usize, source| Outcome::Attributed(setup.name(p).to_owned(), source);
    let named = expected_named(setup, req);
    match named.iter().collect::<Vec<_>>()[..] {
        [] => {}
        [Named::Project(p)] if setup.may_use(key, *p) => return attributed(*p, Source::Header),
        [_] => return Outcome::NotAllowed,
        _ => return Outcome::Conflict,
    }
    if let Some((_, p)) = route {
        return if setup.may_use(key, p) { attributed(p, Source::Route) } else { Outcome::NotAllowed };
    }
    let key_project = key.and_then(|k| setup.keys.as_ref().and_then(|keys| keys[k].project));
    match (key_project, setup.default_project, setup.reroute_to) {
        (Some(p), _, _) => attributed(p, Source::Key),
        (None, Some(p), _) => attributed(p, Source::Default),
        (None, None, Some(p)) => attributed(p, Source::Rerouted),
        (None, None, None) => Outcome::Required,
    }
}

/// What the gateway decided, phase by phase as the proxy runs them, and which key and route it saw.
#[derive(Debug)]
struct Observed {
    key: Option<String>,
    route: Option<String>,
    outcome: Outcome,
}

fn observe(snapshot: &Snapshot, method: &Method, path: &str, headers: &HeaderMap) -> Observed {
    let mut seen = Observed { key: None, route: None, outcome: Outcome::UnknownRoute };
    let matched = match snapshot.routes.classify(method, path) {
        Ok(matched) => matched,
        Err(GatewayError::UnknownRoute) => return seen,
        Err(e) => panic!("classify: {e:?}"),
    };
    seen.route = matched.route_project.map(|p| p.name.clone());
    let key = match snapshot.callers.authenticate(headers) {
        Ok(key) => key,
        Err(GatewayError::InvalidApiKey) => {
            seen.outcome = Outcome::InvalidApiKey;
            return seen;
        }
        Err(e) => panic!("authenticate: {e:?}"),
    };
    seen.key = key.map(|k| k.name.clone());
    let requested = snapshot.attributor.requested(headers);
    seen.outcome = match snapshot.attributor.resolve(key.map(|k| &**k), requested, matched.route_project) {
        Ok(a) => Outcome::Attributed(a.project.name.clone(), a.source),
        Err(GatewayError::InvalidRequest(_)) => Outcome::Conflict,
        Err(GatewayError::ProjectNotAllowed(_)) => Outcome::NotAllowed,
        Err(GatewayError::ProjectRequired) => Outcome::Required,
        Err(e) => panic!("resolve: {e:?}"),
    };
    seen
}

/// The config and the request as text, for failure messages.
fn describe(setup: &Setup, req: &Request) -> String {
    let headers: Vec<String> = req
        .headers(setup)
        .iter()
        .map(|(name, value)| format!("{name}: {:?}", String::from_utf8_lossy(value)))
        .collect();
    format!("\n{}\n{} {}\n{}\n", setup.toml(), req.method(), req.path(), headers.join("\n"))
}

fn observe_request(snapshot: &Snapshot, setup: &Setup, req: &Request) -> Observed {
    observe(snapshot, &req.method(), &req.path(), &header_map(&req.headers(setup)))
}

/// A shuffle of `items` decided by `seed` (xorshift, Fisher-Yates).
fn shuffle<T>(items: &mut [T], mut seed: u64) {
    for i in (1..items.len()).rev() {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        items.swap(i, (seed % (i as u64 + 1)) as usize);
    }
}

proptest! {
    #![proptest_config(settings(512))]

    /// The decision is DESIGN.md's order, step for step: the route table's own paths only, the caller's key,
    /// the asked-for project if the key may use it, else the route's project if the key may use it, else the
    /// key's project, else `default_project`, else reroute or reject.
    #[test]
    fn attribution_follows_the_documented_order((setup, req) in case()) {
        let snapshot = setup.snapshot();
        let seen = observe_request(&snapshot, &setup, &req);
        prop_assert_eq!(&seen.outcome, &expected(&setup, &req), "{:?}{}", seen, describe(&setup, &req));
        if seen.outcome != Outcome::UnknownRoute {
            let route = expected_route(&setup, &req.path()).map(|(_, p)| setup.name(p));
            prop_assert_eq!(seen.route.as_deref(), route, "{}", describe(&setup, &req));
        }
    }

    /// The same, stated as the safety rule alone: a keyed caller is attributed only to a project its key may
    /// use (`project` or `may_select`), except through `default_project` or the reroute target, and those
    /// only when it asked for no project, no route prefix matched and its key has no project. A missing,
    /// unknown or ambiguous key never gets a project, nor gets as far as a 403.
    #[test]
    fn a_key_never_gets_a_project_it_may_not_use((setup, req) in case()) {
        let snapshot = setup.snapshot();
        let seen = observe_request(&snapshot, &setup, &req);
        let Some(keys) = &setup.keys else {
            // Trusted callers: any configured project, and never a key.
            prop_assert!(seen.key.is_none(), "{}", describe(&setup, &req));
            if let Outcome::Attributed(name, _) = &seen.outcome {
                prop_assert!(setup.projects.iter().any(|p| &p.name == name), "{}", describe(&setup, &req));
            }
            return Ok(());
        };
        // The key that authenticated is the one every credential header carries, and a configured one.
        let carried: BTreeSet<Secret> = req.creds.iter().map(|c| c.secret()).collect();
        let valid = match carried.iter().collect::<Vec<_>>()[..] {
            [Secret::Key(i)] if *i < keys.len() => Some(*i),
            _ => None,
        };
        if let Some(name) = &seen.key {
            prop_assert_eq!(Some(name.clone()), valid.map(|i| format!("k{i}")), "{}", describe(&setup, &req));
        }
        if valid.is_none() {
            let refused = matches!(seen.outcome, Outcome::UnknownRoute | Outcome::InvalidApiKey);
            prop_assert!(refused, "{:?}{}", seen, describe(&setup, &req));
        }
        let Outcome::Attributed(name, source) = &seen.outcome else { return Ok(()) };
        let key = seen.key.as_ref().and_then(|k| k[1..].parse::<usize>().ok());
        prop_assert!(key.is_some(), "attributed without a key: {:?}{}", seen, describe(&setup, &req));
        let k = key.unwrap();
        let p = setup.projects.iter().position(|p| &p.name == name).unwrap();
        let asked_nothing = req.asked.iter().all(|&(_, asked)| {
            let value = Request::value(&setup, asked);
            let text = String::from_utf8_lossy(&value);
            text.trim().is_empty() || text.trim().eq_ignore_ascii_case("default")
        });
        let routed = expected_route(&setup, &req.path()).is_some();
        match source {
            Source::Header | Source::Route | Source::Key => {
                prop_assert!(setup.may_use(Some(k), p), "{name} ({source:?}) is not k{k}'s{}", describe(&setup, &req));
            }
            Source::Default | Source::Rerouted => {
                let fallback_allowed = asked_nothing && !routed && keys[k].project.is_none();
                prop_assert!(fallback_allowed, "{name} ({source:?}) for k{k}{}", describe(&setup, &req));
                let fallback = if *source == Source::Default { setup.default_project } else { setup.reroute_to };
                prop_assert_eq!(Some(p), fallback, "{}", describe(&setup, &req));
            }
        }
        let chosen_for_its_reason = match source {
            Source::Key => keys[k].project == Some(p),
            Source::Route => expected_route(&setup, &req.path()).map(|(_, p)| p) == Some(p),
            Source::Header => expected_named(&setup, &req).contains(&Named::Project(p)),
            Source::Default | Source::Rerouted => true,
        };
        prop_assert!(chosen_for_its_reason, "{name} ({source:?}){}", describe(&setup, &req));
    }

    /// The answer does not depend on the order of the headers, on naming a project by its name or its id, or
    /// on which build of the same config answers (the lookups are hash maps, seeded anew for each): the
    /// request again, its headers shuffled and every project they name named by its id (or every one by its
    /// name), to a second snapshot, gets the same answer.
    #[test]
    fn attribution_ignores_header_order_and_name_or_id((setup, req) in case(), seed in any::<u64>()) {
        let first = observe_request(&setup.snapshot(), &setup, &req);
        let mut other = req.clone();
        let by_id = seed & 1 == 0;
        for (_, asked) in &mut other.asked {
            *asked = match *asked {
                Asked::Name(i, pad) | Asked::Id(i, pad) if by_id => Asked::Id(i, pad),
                Asked::Name(i, pad) | Asked::Id(i, pad) => Asked::Name(i, pad),
                asked @ Asked::Other(_) => asked,
            };
        }
        let mut headers = other.headers(&setup);
        shuffle(&mut headers, seed);
        let second = observe(&setup.snapshot(), &other.method(), &other.path(), &header_map(&headers));
        prop_assert_eq!(&first.outcome, &second.outcome, "reordered: {:?}{}", headers, describe(&setup, &req));
    }
}

// ---------------------------------------------------------------------------------------------------------
// SSE tap: generated streams.

/// A JSON value, rendered compact (`{"a":1,"b":2}`) or spaced (`{"a": 1, "b": 2}`) as upstreams write them.
#[derive(Debug, Clone)]
enum Json {
    Str(String),
    Num(u64),
    Null,
    Arr(Vec<Json>),
    Obj(Vec<(&'static str, Json)>),
}

use Json::{Arr, Null, Num, Obj, Str};

impl Json {
    /// The text; with `strip`, as the gateway forwards it when it asked for usage itself: without each
    /// `"usage": null` member that has a sibling (a lone one is left, the object staying valid JSON).
    fn render(&self, spaced: bool, strip: bool, out: &mut String) {
        let (comma, colon) = if spaced { (", ", ": ") } else { (",", ":") };
        match self {
            Str(s) => out.push_str(&quoted(s)),
            Num(n) => out.push_str(&n.to_string()),
            Null => out.push_str("null"),
            Arr(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(comma);
                    }
                    item.render(spaced, strip, out);
                }
                out.push(']');
            }
            Obj(members) => {
                let stripped =
                    |(k, v): &&(&str, Json)| strip && members.len() > 1 && *k == "usage" && matches!(v, Null);
                out.push('{');
                for (i, (k, v)) in members.iter().filter(|m| !stripped(m)).enumerate() {
                    if i > 0 {
                        out.push_str(comma);
                    }
                    out.push_str(&quoted(k));
                    out.push_str(colon);
                    v.render(spaced, strip, out);
                }
                out.push('}');
            }
        }
    }
}

/// One line of a stream, with its line end.
#[derive(Clone)]
struct Line {
    raw: Vec<u8>,
    /// As forwarded when usage is stripped, if its event is forwarded at all.
    stripped: Vec<u8>,
    /// It is the usage-only chat chunk (`choices: []` and a usage object): its whole event is hidden.
    usage_only: bool,
    /// The chat usage it carries.
    usage: Option<Usage>,
    /// `data: [DONE]`.
    done: bool,
}

impl Line {
    fn plain(text: &str, eol: &str) -> Self {
        let raw = format!("{text}{eol}").into_bytes();
        let done = matches!(text, "data: [DONE]" | "data:[DONE]");
        Self { stripped: raw.clone(), raw, usage_only: false, usage: None, done }
    }

    fn data(chunk: &Chunk, prefix: &str, spaced: bool, eol: &str) -> Self {
        let (mut raw, mut stripped) = (prefix.to_owned(), prefix.to_owned());
        chunk.json.render(spaced, false, &mut raw);
        chunk.json.render(spaced, true, &mut stripped);
        Self {
            raw: format!("{raw}{eol}").into_bytes(),
            stripped: format!("{stripped}{eol}").into_bytes(),
            usage_only: chunk.usage_only,
            usage: chunk.usage,
            done: false,
        }
    }

    fn blank(&self) -> bool {
        self.raw == b"\n" || self.raw == b"\r\n"
    }
}

impl std::fmt::Debug for Line {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut line = f.debug_struct("Line");
        line.field("raw", &shown(&self.raw));
        if self.stripped != self.raw {
            line.field("stripped", &shown(&self.stripped));
        }
        line.field("usage_only", &self.usage_only).field("usage", &self.usage).field("done", &self.done).finish()
    }
}

/// A data line's JSON and what the tap should make of it.
#[derive(Debug, Clone)]
struct Chunk {
    json: Json,
    usage_only: bool,
    usage: Option<Usage>,
}

fn chunk(json: Json) -> Chunk {
    Chunk { json, usage_only: false, usage: None }
}

/// String values that look like what the tap searches for, which JSON escapes.
static LOOKALIKES: [&str; 10] =
    ["\"usage\":null", ", \"usage\": null", "\"usage\"", "usage", "null", "data: [DONE]", "\n\n", "\r\n", "\\", "é✓"];

/// Text for string values: plain, or looking like what the tap searches for.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[a-zA-Z0-9 ,:{}\\[\\]]{0,12}",
        1 => select(&LOOKALIKES[..]).prop_map(String::from),
        1 => ".{0,6}",
    ]
}

/// Model ids.
const MODEL: &str = "[a-z0-9.-]{1,16}";

fn tokens() -> impl Strategy<Value = u64> {
    prop_oneof![0..1000u64, Just(u64::MAX)]
}

/// An object's members in any order.
fn shuffled<T: Clone + std::fmt::Debug + 'static>(
    members: Vec<(&'static str, Json)>,
    with: T,
) -> impl Strategy<Value = (Json, T)> {
    (Just(members).prop_shuffle(), Just(with)).prop_map(|(members, with)| (Obj(members), with))
}

/// Members a chat chunk may open with, among them decoys that spell `"choices"` where it is not the chunk's
/// own member (nested, empty or not, or as a string): the usage-only chunk is told by its top-level `choices`
/// alone (an early tap went by the first `"choices"` in the text, and hid a chunk with content).
fn chat_head() -> impl Strategy<Value = Vec<(&'static str, Json)>> {
    (option::of(text()), option::of(MODEL), any::<bool>(), 0..4u8).prop_map(|(id, model, object, decoy)| {
        let mut members = Vec::new();
        members.extend(id.map(|id| ("id", Str(id))));
        members.extend(model.map(|m| ("model", Str(m))));
        if object {
            members.push(("object", Str("chat.completion.chunk".into())));
        }
        match decoy {
            1 => members.push(("x", Obj(vec![("choices", Arr(vec![]))]))),
            2 => members.push(("x", Obj(vec![("choices", Arr(vec![Num(1)]))]))),
            3 => members.push(("note", Str("choices".into()))),
            _ => {}
        }
        members
    })
}

/// A usage object in Chat Completions' shape, and what the tap must count of it.
fn chat_usage() -> impl Strategy<Value = (Json, Option<Usage>)> {
    (option::of(tokens()), option::of(tokens()), option::of(tokens()), option::of(tokens()), option::of(tokens()))
        .prop_map(|(prompt, completion, total, cached, reasoning)| {
            let mut members = Vec::new();
            members.extend(prompt.map(|n| ("prompt_tokens", Num(n))));
            members.extend(completion.map(|n| ("completion_tokens", Num(n))));
            members.extend(total.map(|n| ("total_tokens", Num(n))));
            members.extend(cached.map(|n| ("prompt_tokens_details", Obj(vec![("cached_tokens", Num(n))]))));
            members.extend(reasoning.map(|n| ("completion_tokens_details", Obj(vec![("reasoning_tokens", Num(n))]))));
            let usage = (prompt.is_some() || completion.is_some()).then(|| Usage {
                input: prompt.unwrap_or(0),
                output: completion.unwrap_or(0),
                cached_input: cached.unwrap_or(0),
                reasoning: reasoning.unwrap_or(0),
            });
            (Obj(members), usage)
        })
}

/// One choice of a chat chunk, perhaps with `"usage":null` members of its own.
fn choice() -> impl Strategy<Value = Json> {
    (text(), option::of(select(vec!["stop", "length"])), any::<bool>(), any::<bool>()).prop_flat_map(
        |(content, finish, null_in_delta, null_in_choice)| {
            let mut delta = vec![("content", Str(content))];
            if null_in_delta {
                delta.push(("usage", Null));
            }
            let mut members = vec![
                ("index", Num(0)),
                ("delta", Obj(delta)),
                ("finish_reason", finish.map_or(Null, |f| Str(f.into()))),
            ];
            if null_in_choice {
                members.push(("usage", Null));
            }
            shuffled(members, ()).prop_map(|(json, ())| json)
        },
    )
}

/// A Chat Completions data chunk.
fn chat_chunk() -> impl Strategy<Value = Chunk> {
    prop_oneof![
        // Content, with the `"usage":null` that include_usage adds (or without).
        4 => (chat_head(), vec(choice(), 1..=2), any::<bool>()).prop_flat_map(|(mut members, choices, null)| {
            members.push(("choices", Arr(choices)));
            if null {
                members.push(("usage", Null));
            }
            shuffled(members, ()).prop_map(|(json, ())| chunk(json))
        }),
        // The usage-only chunk.
        2 => (chat_head(), chat_usage()).prop_flat_map(|(mut members, (usage, counted))| {
            members.push(("choices", Arr(vec![])));
            members.push(("usage", usage));
            shuffled(members, counted).prop_map(|(json, usage)| Chunk { json, usage_only: true, usage })
        }),
        // Usage beside choices: counted, and kept.
        1 => (chat_head(), choice(), chat_usage()).prop_flat_map(|(mut members, choice, (usage, counted))| {
            members.push(("choices", Arr(vec![choice])));
            members.push(("usage", usage));
            shuffled(members, counted).prop_map(|(json, usage)| Chunk { json, usage_only: false, usage })
        }),
        // No choices and no usage object: kept.
        1 => (chat_head(), any::<bool>()).prop_flat_map(|(mut members, null)| {
            members.push(("choices", Arr(vec![])));
            if null {
                members.push(("usage", Null));
            }
            shuffled(members, ()).prop_map(|(json, ())| chunk(json))
        }),
        // A lone `"usage":null`, and one nested beside another member.
        1 => Just(chunk(Obj(vec![("usage", Null)]))),
        1 => (text(), any::<bool>()).prop_map(|(t, first)| {
            let inner = if first { vec![("usage", Null), ("t", Str(t))] } else { vec![("t", Str(t)), ("usage", Null)] };
            chunk(Obj(vec![("x", Obj(inner)), ("choices", Arr(vec![]))]))
        }),
    ]
}

/// A Responses stream data chunk.
fn responses_chunk() -> impl Strategy<Value = Chunk> {
    let terminal = select(vec!["response.completed", "response.incomplete", "response.failed"]);
    prop_oneof![
        3 => text().prop_map(|t| {
            chunk(Obj(vec![("type", Str("response.output_text.delta".into())), ("delta", Str(t))]))
        }),
        1 => MODEL.prop_map(|m| chunk(Obj(vec![
            ("type", Str("response.created".into())),
            ("response", Obj(vec![("id", Str("resp_1".into())), ("model", Str(m)), ("usage", Null)])),
        ]))),
        1 => (terminal, MODEL, tokens(), tokens(), option::of(tokens())).prop_map(|(kind, m, i, o, cached)| {
            let mut usage = vec![("input_tokens", Num(i)), ("output_tokens", Num(o))];
            usage.extend(cached.map(|c| ("input_tokens_details", Obj(vec![("cached_tokens", Num(c))]))));
            chunk(Obj(vec![
                ("type", Str(kind.into())),
                ("response", Obj(vec![("model", Str(m)), ("usage", Obj(usage)), ("metadata", Obj(vec![]))])),
            ]))
        }),
    ]
}

/// An Anthropic Messages stream data chunk.
fn messages_chunk() -> impl Strategy<Value = Chunk> {
    let kind = |k: &str| ("type", Str(k.into()));
    prop_oneof![
        1 => (MODEL, tokens(), option::of(tokens())).prop_map(move |(m, i, cache)| {
            let mut usage = vec![("input_tokens", Num(i)), ("output_tokens", Num(1))];
            usage.extend(cache.map(|c| ("cache_read_input_tokens", Num(c))));
            chunk(Obj(vec![kind("message_start"), ("message", Obj(vec![("model", Str(m)), ("usage", Obj(usage))]))]))
        }),
        3 => text().prop_map(move |t| chunk(Obj(vec![
            kind("content_block_delta"),
            ("index", Num(0)),
            ("delta", Obj(vec![kind("text_delta"), ("text", Str(t))])),
        ]))),
        1 => tokens().prop_map(move |o| chunk(Obj(vec![
            kind("message_delta"),
            ("delta", Obj(vec![("stop_reason", Str("end_turn".into()))])),
            ("usage", Obj(vec![("output_tokens", Num(o))])),
        ]))),
        1 => Just(chunk(Obj(vec![kind("message_stop")]))),
        1 => Just(chunk(Obj(vec![kind("ping")]))),
    ]
}

fn eol() -> impl Strategy<Value = &'static str> {
    prop_oneof![3 => Just("\n"), 1 => Just("\r\n")]
}

/// A line of a stream: data (JSON of the dialect's shapes), or anything else SSE allows.
fn line(dialect: Dialect) -> BoxedStrategy<Line> {
    let data = match dialect {
        Dialect::Chat => chat_chunk().boxed(),
        Dialect::Responses => responses_chunk().boxed(),
        Dialect::Messages => messages_chunk().boxed(),
    };
    // Lines other than data never name "usage" (the tap strips `"usage":null` from a whole event's text once
    // its data lines name usage twice, and would then take it out of a comment too; upstreams send none).
    let other = prop_oneof![
        "event: [a-z_.]{1,24}",
        "id: [0-9]{1,6}",
        ":[ a-zA-Z0-9_.-]{0,20}",
        "retry: [0-9]{1,4}",
        "data: ?[a-zA-Z0-9 ]{0,16}",
        select(vec!["data: [DONE]", "data:[DONE]"]).prop_map(String::from),
    ];
    prop_oneof![
        3 => (data, select(vec!["data: ", "data:"]), any::<bool>(), eol())
            .prop_map(|(chunk, prefix, spaced, eol)| Line::data(&chunk, prefix, spaced, eol)),
        1 => (other, eol()).prop_map(|(text, eol)| Line::plain(&text, eol)),
    ]
    .boxed()
}

/// How a stream ends after its last whole line.
#[derive(Clone)]
enum Tail {
    /// On a line end.
    Nothing,
    /// With a whole line but its `\n`.
    NoNewline(Line),
    /// Inside a line.
    Cut(Vec<u8>),
}

impl std::fmt::Debug for Tail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Nothing => f.write_str("Nothing"),
            Self::NoNewline(line) => f.debug_tuple("NoNewline").field(line).finish(),
            Self::Cut(bytes) => f.debug_tuple("Cut").field(&shown(bytes)).finish(),
        }
    }
}

#[derive(Debug, Clone)]
struct Stream {
    /// Whole lines: events (each ended by a blank line), extra blank lines, and perhaps an event never ended.
    lines: Vec<Line>,
    tail: Tail,
}

impl Stream {
    fn bytes(&self) -> Vec<u8> {
        let mut out: Vec<u8> = self.lines.iter().flat_map(|l| l.raw.iter().copied()).collect();
        match &self.tail {
            Tail::Nothing => {}
            Tail::NoNewline(line) => out.extend_from_slice(&line.raw),
            Tail::Cut(bytes) => out.extend_from_slice(bytes),
        }
        out
    }
}

fn stream(dialect: Dialect) -> impl Strategy<Value = Stream> {
    let event = (vec(line(dialect), 1..=3), eol(), prop_oneof![4 => Just(0usize), 1 => 1..=2usize]).prop_map(
        |(mut lines, end, extra_blank)| {
            lines.push(Line::plain("", end));
            lines.extend(std::iter::repeat_n(Line::plain("", "\n"), extra_blank));
            lines
        },
    );
    let tail = prop_oneof![
        3 => Just(Tail::Nothing),
        1 => line(dialect).prop_map(|mut l| {
            l.raw.pop();
            Tail::NoNewline(l)
        }),
        1 => (line(dialect), any::<Index>()).prop_map(|(l, at)| Tail::Cut(l.raw[..at.index(l.raw.len())].to_vec())),
    ];
    (vec(event, 0..=6), option::weighted(0.2, vec(line(dialect), 1..=2)), tail).prop_map(|(events, unended, tail)| {
        Stream { lines: events.into_iter().flatten().chain(unended.into_iter().flatten()).collect(), tail }
    })
}

fn any_stream() -> impl Strategy<Value = (Dialect, Stream)> {
    prop_oneof![
        stream(Dialect::Chat).prop_map(|s| (Dialect::Chat, s)),
        stream(Dialect::Responses).prop_map(|s| (Dialect::Responses, s)),
        stream(Dialect::Messages).prop_map(|s| (Dialect::Messages, s)),
    ]
}

/// Where to cut a stream into chunks: anywhere, twice in one place (an empty chunk) included.
fn cuts() -> impl Strategy<Value = Vec<Index>> {
    vec(any::<Index>(), 0..24)
}

// ---------------------------------------------------------------------------------------------------------
// SSE tap: the oracle, and what the tap does.

/// The complete events of `lines` (each ended by a blank line that is not its first line), and the lines
/// after the last one.
fn events(lines: &[Line]) -> (Vec<&[Line]>, &[Line]) {
    let (mut events, mut start) = (Vec::new(), 0);
    for (i, line) in lines.iter().enumerate() {
        if line.blank() && i > start {
            events.push(&lines[start..=i]);
            start = i + 1;
        }
    }
    (events, &lines[start..])
}

/// What a Chat Completions tap that strips usage forwards: each complete event unless it holds the
/// usage-only chunk, without its `"usage":null` members; then what follows the last complete event, as it is.
fn expected_stripped(stream: &Stream) -> Vec<u8> {
    let (events, open) = events(&stream.lines);
    let mut out = Vec::new();
    for event in events.into_iter().filter(|e| !e.iter().any(|l| l.usage_only)) {
        event.iter().for_each(|l| out.extend_from_slice(&l.stripped));
    }
    open.iter().for_each(|l| out.extend_from_slice(&l.raw));
    match &stream.tail {
        Tail::Nothing => {}
        Tail::NoNewline(line) => out.extend_from_slice(&line.raw),
        Tail::Cut(bytes) => out.extend_from_slice(bytes),
    }
    out
}

/// The usage a Chat Completions tap reads from `lines`: the last counted usage chunk before `[DONE]`, and
/// whether `[DONE]` came.
fn expected_chat_reading<'a>(lines: impl IntoIterator<Item = &'a Line>) -> (Option<Usage>, bool) {
    let mut usage = None;
    for line in lines {
        if line.done {
            return (usage, true);
        }
        usage = line.usage.or(usage);
    }
    (usage, false)
}

/// What a tap read from a stream.
#[derive(Debug, PartialEq, Eq)]
struct Reading {
    usage: Option<Usage>,
    model: Option<String>,
    finished: bool,
    usage_final: bool,
    stream_over: bool,
}

/// Feeds `bytes` to a fresh SSE tap cut at `cuts`, and returns what it forwarded (finish included) and read.
fn feed(dialect: Dialect, strip: bool, bytes: &[u8], cuts: &[usize]) -> (Vec<u8>, Reading) {
    let mut tap = UsageTap::sse(dialect, strip);
    let mut out = Vec::new();
    let mut from = 0;
    for &to in cuts.iter().chain(std::iter::once(&bytes.len())) {
        out.extend_from_slice(&tap.on_chunk(Bytes::copy_from_slice(&bytes[from..to])));
        from = to;
    }
    out.extend_from_slice(&tap.finish());
    let reading = Reading {
        usage: tap.usage(),
        model: tap.model().map(str::to_owned),
        finished: tap.finished(),
        usage_final: tap.usage_final(),
        stream_over: tap.stream_over(),
    };
    (out, reading)
}

/// The cuttings every stream is fed in: one chunk, one byte at a time, and the generated cuts.
fn cuttings(len: usize, cuts: &[Index]) -> [(&'static str, Vec<usize>); 3] {
    let mut at: Vec<usize> = cuts.iter().map(|i| i.index(len + 1)).collect();
    at.sort_unstable();
    [("one chunk", vec![]), ("bytes", (1..len).collect()), ("generated", at)]
}

/// Shows bytes as text in a failure message.
fn shown(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Bytes compared as bytes, shown as text.
#[derive(PartialEq, Eq)]
struct Text<'a>(&'a [u8]);

impl std::fmt::Debug for Text<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", shown(self.0))
    }
}

proptest! {
    #![proptest_config(settings(256))]

    /// `strip_usage = false`, every dialect: the tap forwards the stream exactly as it came, for every
    /// cutting, and reads the same usage, model and end of stream from each; in Chat Completions that usage
    /// is the last usage chunk before `[DONE]`.
    #[test]
    fn an_unstripped_stream_passes_byte_for_byte((dialect, stream) in any_stream(), cuts in cuts()) {
        let bytes = stream.bytes();
        let mut readings = Vec::new();
        for (name, at) in cuttings(bytes.len(), &cuts) {
            let (out, reading) = feed(dialect, false, &bytes, &at);
            prop_assert_eq!(Text(&out), Text(&bytes), "{:?} in {}", dialect, name);
            readings.push((name, reading));
        }
        for (name, reading) in &readings[1..] {
            prop_assert_eq!(reading, &readings[0].1, "{:?}: {} against one chunk", dialect, name);
        }
        if dialect == Dialect::Chat && !matches!(stream.tail, Tail::Cut(_)) {
            let last = match &stream.tail { Tail::NoNewline(line) => Some(line), _ => None };
            let expected = expected_chat_reading(stream.lines.iter().chain(last));
            prop_assert_eq!((readings[0].1.usage, readings[0].1.finished), expected);
        }
    }

    /// `strip_usage = true`, Chat Completions: the tap forwards the stream less every complete event that
    /// holds the usage-only chunk and less every `"usage":null` member that has a sibling, the same for every
    /// cutting; an event the stream never ends is forwarded as it came. Usage is read from complete events.
    #[test]
    fn a_stripped_chat_stream_loses_exactly_the_usage_it_did_not_ask_for(
        stream in stream(Dialect::Chat),
        cuts in cuts(),
    ) {
        let bytes = stream.bytes();
        let expected = expected_stripped(&stream);
        let (events, _) = events(&stream.lines);
        let reading = expected_chat_reading(events.into_iter().flatten());
        let mut readings = Vec::new();
        for (name, at) in cuttings(bytes.len(), &cuts) {
            let (out, read) = feed(Dialect::Chat, true, &bytes, &at);
            prop_assert_eq!(Text(&out), Text(&expected), "in {} of {:?}", name, Text(&bytes));
            prop_assert_eq!((read.usage, read.finished), reading, "in {}", name);
            readings.push(read);
        }
        prop_assert!(readings.iter().all(|r| r == &readings[0]), "{:?}", readings);
    }

    /// `strip_usage = true` in the other dialects has nothing to strip: every cutting forwards the stream as
    /// it came.
    #[test]
    fn other_dialects_have_nothing_to_strip(
        (dialect, stream) in prop_oneof![
            stream(Dialect::Responses).prop_map(|s| (Dialect::Responses, s)),
            stream(Dialect::Messages).prop_map(|s| (Dialect::Messages, s)),
        ],
        cuts in cuts(),
    ) {
        let bytes = stream.bytes();
        for (name, at) in cuttings(bytes.len(), &cuts) {
            let (out, _) = feed(dialect, true, &bytes, &at);
            prop_assert_eq!(Text(&out), Text(&bytes), "{:?} in {}", dialect, name);
        }
    }
}
