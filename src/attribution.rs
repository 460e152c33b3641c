//! Which project a request belongs to: the attribution order of DESIGN.md as one pure function over the
//! caller's key, the project the caller asked for, and the route prefix. Nothing here does I/O; the proxy
//! feeds it facts and acts on its answer.
//!
//! 1. A project the caller asks for (`OpenAI-Project` / `anthropic-workspace-id`, by id or by name) is used
//!    only if the caller may use it. Asking for `default` is asking for nothing.
//! 2. Else the route prefix's project, if the caller may use it.
//! 3. Else the key's own project. 4. Else `attribution.default_project`.
//! 5. Else the unattributed policy: reject, or reroute.

use std::collections::HashMap;
use std::sync::Arc;

use http::{HeaderMap, HeaderName};

use crate::error::GatewayError;
use crate::snapshot::{Key, Project};

/// Request headers that name a project. Both are read (and both stripped) on every route, so a caller cannot
/// slip one past the gateway by using the other API family's spelling.
pub static PROJECT_HEADERS: [HeaderName; 2] =
    [HeaderName::from_static("openai-project"), HeaderName::from_static("anthropic-workspace-id")];

/// How a request's project was decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The caller's own project header.
    Header,
    /// The `[[routes]]` prefix.
    Route,
    /// The key's `project`.
    Key,
    /// `attribution.default_project`.
    Default,
    /// Nothing attributed it; the policy rerouted it.
    Rerouted,
}

impl Source {
    /// Name for logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Self::Header => "header",
            Self::Route => "route",
            Self::Key => "key",
            Self::Default => "default",
            Self::Rerouted => "rerouted",
        }
    }
}

/// The answer: a project (of the snapshot the attributor belongs to) and why.
#[derive(Debug, Clone, Copy)]
pub struct Attribution<'s> {
    /// The project the request is sent to.
    pub project: &'s Arc<Project>,
    /// Which rule chose it.
    pub source: Source,
}

/// What the caller asked for in its project headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requested<'a> {
    /// No header, empty headers, or `default`.
    Nothing,
    /// One project, by name or id (every header that names one names the same project, perhaps one by its
    /// name and another by its id).
    Project(&'a str),
    /// Headers that name different projects.
    Conflict,
}

/// The project lookups and policy of one snapshot.
#[derive(Debug, Clone)]
pub struct Attributor {
    by_name_or_id: HashMap<String, Arc<Project>>,
    default_project: Option<Arc<Project>>,
    /// Where the unattributed policy sends what nothing attributes; none rejects it.
    reroute: Option<Arc<Project>>,
}

impl Attributor {
    /// Indexes `projects` by name and by id (validation guarantees the two never collide).
    pub fn new(
        projects: &[Arc<Project>],
        default_project: Option<Arc<Project>>,
        reroute: Option<Arc<Project>>,
    ) -> Self {
        let mut by_name_or_id = HashMap::new();
        for p in projects {
            by_name_or_id.insert(p.name.clone(), p.clone());
            by_name_or_id.insert(p.id.clone(), p.clone());
        }
        Self { by_name_or_id, default_project, reroute }
    }

    /// Reads every project header value. Values agree when they are the same text or name the same configured
    /// project (one by name, one by id). Values that are not text can name no project, so they are kept as a
    /// request for an unknown project (and refused) rather than dropped.
    pub fn requested<'a>(&self, headers: &'a HeaderMap) -> Requested<'a> {
        let mut found = Requested::Nothing;
        for value in PROJECT_HEADERS.iter().flat_map(|name| headers.get_all(name)) {
            let asked = std::str::from_utf8(value.as_bytes()).map_or("\u{fffd}", str::trim);
            if asked.is_empty() || asked.eq_ignore_ascii_case("default") {
                continue;
            }
            found = match found {
                Requested::Nothing => Requested::Project(asked),
                Requested::Project(prev) if prev == asked || self.same_project(prev, asked) => found,
                Requested::Project(_) | Requested::Conflict => return Requested::Conflict,
            };
        }
        found
    }

    /// Whether `a` and `b` both name the same configured project.
    fn same_project(&self, a: &str, b: &str) -> bool {
        matches!((self.by_name_or_id.get(a), self.by_name_or_id.get(b)), (Some(a), Some(b)) if Arc::ptr_eq(a, b))
    }

    /// Applies the attribution order. `key` is `None` for trusted callers (`callers.auth = "none"`), who may
    /// use any configured project; `route` is the project of the route prefix the request came under.
    pub fn resolve<'s>(
        &'s self,
        key: Option<&'s Key>,
        requested: Requested<'_>,
        route: Option<&'s Arc<Project>>,
    ) -> Result<Attribution<'s>, GatewayError> {
        let allowed = |p: &Project| key.is_none_or(|k| k.may_use(p));
        match requested {
            Requested::Conflict => {
                return Err(GatewayError::InvalidRequest(
                    "project headers name different projects: send one OpenAI-Project (or anthropic-workspace-id)"
                        .into(),
                ));
            }
            Requested::Project(asked) => {
                // Refused the same way whether or not the project is configured: the answer says nothing of
                // the projects the caller may not use.
                return match self.by_name_or_id.get(asked) {
                    Some(project) if allowed(project) => Ok(Attribution { project, source: Source::Header }),
                    _ => Err(GatewayError::ProjectNotAllowed(id_shaped(asked))),
                };
            }
            Requested::Nothing => {}
        }
        if let Some(project) = route {
            return if allowed(project) {
                Ok(Attribution { project, source: Source::Route })
            } else {
                Err(GatewayError::ProjectNotAllowed(None))
            };
        }
        if let Some(project) = key.and_then(|k| k.project.as_ref()) {
            return Ok(Attribution { project, source: Source::Key });
        }
        if let Some(project) = &self.default_project {
            return Ok(Attribution { project, source: Source::Default });
        }
        match &self.reroute {
            None => Err(GatewayError::ProjectRequired),
            Some(project) => Ok(Attribution { project, source: Source::Rerouted }),
        }
    }
}

/// What the caller asked for, as a refusal may echo it: only if it has a project id's shape (`proj_` and at most 59
/// letters, digits, `_` or `-`). Anything else (a key pasted into the project header, a project's name) is not
/// sent back.
fn id_shaped(asked: &str) -> Option<String> {
    let shaped = asked.len() <= 64
        && asked.strip_prefix("proj_").is_some_and(|rest| {
            !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        });
    shaped.then(|| asked.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    use crate::snapshot::Snapshot;

    const CONFIG: &str = r#"
        [[projects]]
        name = "Chat-Prod"
        id = "proj_chat"
        [[projects]]
        name = "Chat-Dev"
        id = "proj_dev"
        [[projects]]
        name = "Search"
        id = "proj_search"
        [[projects]]
        name = "Unattributed"
        id = "proj_unattr"
        [[keys]]
        name = "chat"
        sha256 = "0000000000000000000000000000000000000000000000000000000000000000"
        project = "Chat-Prod"
        may_select = ["Chat-Dev"]
        [[keys]]
        name = "floating"
        sha256 = "1111111111111111111111111111111111111111111111111111111111111111"
    "#;

    const PROD: &str = "Chat-Prod";
    const DEV: &str = "Chat-Dev";
    const SEARCH: &str = "Search";
    const UNATTR: &str = "Unattributed";

    fn setup(extra: &str) -> Snapshot {
        crate::snapshot::tests::snapshot(&format!("{extra}\n{CONFIG}"))
    }

    /// The project (by name) and source of an attribution.
    fn named(result: Result<Attribution<'_>, GatewayError>) -> Result<(&str, Source), GatewayError> {
        result.map(|a| (a.project.name.as_str(), a.source))
    }

    fn ok(project: &str, source: Source) -> Result<(&str, Source), GatewayError> {
        Ok((project, source))
    }

    fn key<'s>(s: &'s Snapshot, name: &str) -> Option<&'s Key> {
        Some(&**s.key(name).expect("key"))
    }

    fn project<'s>(s: &'s Snapshot, name: &str) -> Option<&'s Arc<Project>> {
        Some(s.project(name).expect("project"))
    }

    #[test]
    fn header_by_name_or_id_when_allowed() {
        let s = setup("");
        let a = &s.attributor;
        let chat = key(&s, "chat");
        assert_eq!(named(a.resolve(chat, Requested::Project("proj_dev"), None)), ok(DEV, Source::Header));
        assert_eq!(named(a.resolve(chat, Requested::Project("Chat-Dev"), None)), ok(DEV, Source::Header));
        assert_eq!(named(a.resolve(chat, Requested::Project("Chat-Prod"), None)), ok(PROD, Source::Header));
    }

    #[test]
    fn header_for_a_forbidden_or_unknown_project_is_refused() {
        let s = setup("");
        let a = &s.attributor;
        let chat = key(&s, "chat");
        // Only what has a project id's shape is named; anything else (a configured project's name, a pasted key)
        // is not echoed.
        for (asked, said) in [
            ("proj_search", Some("proj_search")),
            ("proj_unknown", Some("proj_unknown")),
            ("Search", None),
            ("Unattributed", None),
            ("chat-prod", None),
            ("proj_chat ", None),
            ("\u{fffd}", None),
            ("mg_0123456789abcdef", None),
            ("proj_a.b", None),
            (&format!("proj_{}", "a".repeat(60)), None),
        ] {
            let refused = named(a.resolve(chat, Requested::Project(asked), None));
            assert_eq!(refused, Err(GatewayError::ProjectNotAllowed(said.map(str::to_owned))), "{asked}");
            let message = refused.expect_err("refused").to_string();
            match said {
                Some(id) => assert_eq!(message, format!("project \"{id}\" is not allowed for this caller")),
                None => {
                    assert_eq!(message, "the project the request names is not allowed for this caller");
                }
            }
        }
    }

    #[test]
    fn header_beats_route_and_key() {
        let s = setup("");
        let a = &s.attributor;
        assert_eq!(
            named(a.resolve(key(&s, "chat"), Requested::Project("Chat-Dev"), project(&s, PROD))),
            ok(DEV, Source::Header)
        );
    }

    #[test]
    fn route_needs_permission() {
        let s = setup("");
        let a = &s.attributor;
        assert_eq!(named(a.resolve(key(&s, "chat"), Requested::Nothing, project(&s, DEV))), ok(DEV, Source::Route));
        assert_eq!(
            named(a.resolve(key(&s, "chat"), Requested::Nothing, project(&s, SEARCH))),
            Err(GatewayError::ProjectNotAllowed(None))
        );
        assert_eq!(
            named(a.resolve(key(&s, "floating"), Requested::Nothing, project(&s, SEARCH))),
            Err(GatewayError::ProjectNotAllowed(None))
        );
    }

    #[test]
    fn key_project_then_default_then_policy() {
        let s = setup("");
        let a = &s.attributor;
        assert_eq!(named(a.resolve(key(&s, "chat"), Requested::Nothing, None)), ok(PROD, Source::Key));
        assert_eq!(named(a.resolve(key(&s, "floating"), Requested::Nothing, None)), Err(GatewayError::ProjectRequired));

        let s = setup("[attribution]\ndefault_project = \"Search\"");
        let a = &s.attributor;
        assert_eq!(named(a.resolve(key(&s, "chat"), Requested::Nothing, None)), ok(PROD, Source::Key));
        assert_eq!(named(a.resolve(key(&s, "floating"), Requested::Nothing, None)), ok(SEARCH, Source::Default));

        let s = setup("[attribution]\nunattributed = \"reroute\"\nreroute_to = \"Unattributed\"");
        let a = &s.attributor;
        assert_eq!(named(a.resolve(key(&s, "floating"), Requested::Nothing, None)), ok(UNATTR, Source::Rerouted));
        // Rerouting never widens what a key may ask for.
        assert_eq!(
            named(a.resolve(key(&s, "floating"), Requested::Project("Search"), None)),
            Err(GatewayError::ProjectNotAllowed(None))
        );
    }

    #[test]
    fn trusted_callers_may_pick_any_configured_project() {
        let s = setup("");
        let a = &s.attributor;
        assert_eq!(named(a.resolve(None, Requested::Project("Search"), None)), ok(SEARCH, Source::Header));
        assert_eq!(named(a.resolve(None, Requested::Nothing, project(&s, DEV))), ok(DEV, Source::Route));
        assert_eq!(named(a.resolve(None, Requested::Nothing, None)), Err(GatewayError::ProjectRequired));
        assert_eq!(
            named(a.resolve(None, Requested::Project("proj_other"), None)),
            Err(GatewayError::ProjectNotAllowed(Some("proj_other".into())))
        );
    }

    fn requested(pairs: &[(&'static str, &'static [u8])]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_bytes(v).expect("value"));
        }
        h
    }

    #[test]
    fn project_headers_are_read_strictly() {
        let s = setup("");
        let a = &s.attributor;
        let h = requested(&[]);
        assert_eq!(a.requested(&h), Requested::Nothing);
        let h = requested(&[("openai-project", b"default")]);
        assert_eq!(a.requested(&h), Requested::Nothing);
        let h = requested(&[("openai-project", b" ")]);
        assert_eq!(a.requested(&h), Requested::Nothing);
        let h = requested(&[("openai-project", b"proj_a"), ("openai-project", b"proj_a")]);
        assert_eq!(a.requested(&h), Requested::Project("proj_a"));
        let h = requested(&[("openai-project", b"proj_a"), ("openai-project", b"proj_b")]);
        assert_eq!(a.requested(&h), Requested::Conflict);
        let h = requested(&[("openai-project", b"proj_a"), ("anthropic-workspace-id", b"proj_b")]);
        assert_eq!(a.requested(&h), Requested::Conflict);
        let h = requested(&[("anthropic-workspace-id", b"proj_b"), ("openai-project", b"Default")]);
        assert_eq!(a.requested(&h), Requested::Project("proj_b"));
        let h = requested(&[("openai-project", b"proj_\xff")]);
        assert_eq!(a.requested(&h), Requested::Project("\u{fffd}"));
        // One project by name and by id is one project, in either order and across both headers.
        let h = requested(&[("openai-project", b"Chat-Dev"), ("anthropic-workspace-id", b"proj_dev")]);
        assert_eq!(a.requested(&h), Requested::Project("Chat-Dev"));
        let h = requested(&[("openai-project", b"proj_dev"), ("openai-project", b"Chat-Dev")]);
        assert_eq!(a.requested(&h), Requested::Project("proj_dev"));
        // Two different projects, or a project and an unknown name, still conflict.
        let h = requested(&[("openai-project", b"Chat-Dev"), ("openai-project", b"proj_chat")]);
        assert_eq!(a.requested(&h), Requested::Conflict);
        let h = requested(&[("openai-project", b"Chat-Dev"), ("openai-project", b"chat-dev")]);
        assert_eq!(a.requested(&h), Requested::Conflict);
    }

    #[test]
    fn conflicting_headers_are_refused() {
        let s = setup("");
        let a = &s.attributor;
        assert!(matches!(
            named(a.resolve(key(&s, "chat"), Requested::Conflict, None)),
            Err(GatewayError::InvalidRequest(_))
        ));
    }
}
