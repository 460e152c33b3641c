//! Which inference endpoint a request is for, and under which configured route prefix. Only the paths listed
//! here are ever forwarded; anything else (above all the admin-only `/v1/organization/...` Projects API, however
//! it is spelled) is `unknown_route` before upstream is contacted. Matching is exact, segment by segment, on the
//! path exactly as received: no decoding, no normalisation, so there is no spelling that means one thing here
//! and another upstream.

use std::sync::Arc;

use http::Method;

use crate::error::GatewayError;
use crate::snapshot::Project;

/// The API family, which decides the project header and credential header upstream expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// `/v1/...` and `/openai/v1/...`: project in `OpenAI-Project`.
    OpenAi,
    /// `/anthropic/v1/...`: project in `anthropic-workspace-id`.
    Anthropic,
}

/// Defines [`Endpoint`] and its [`Endpoint::ALL`] from one list, so that no variant can be left out of `ALL` (and
/// out of the tables indexed by it).
macro_rules! endpoints {
    ($($(#[$doc:meta])* $variant:ident => $name:literal,)*) => {
        /// An inference endpoint the gateway forwards.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Endpoint {
            $($(#[$doc])* $variant,)*
        }

        impl Endpoint {
            /// Every endpoint, in [`Self::index`] order.
            pub const ALL: &'static [Self] = &[$(Self::$variant,)*];

            /// Stable name for logs and metrics.
            pub fn name(self) -> &'static str {
                match self {
                    $(Self::$variant => $name,)*
                }
            }
        }
    };
}

endpoints! {
    /// `POST /v1/chat/completions`
    ChatCompletions => "chat.completions",
    /// `POST /v1/responses`
    ResponsesCreate => "responses.create",
    /// `GET /v1/responses/{id}`
    ResponsesGet => "responses.get",
    /// `DELETE /v1/responses/{id}`
    ResponsesDelete => "responses.delete",
    /// `POST /v1/responses/{id}/cancel`
    ResponsesCancel => "responses.cancel",
    /// `GET /v1/models`
    ModelsList => "models.list",
    /// `GET /v1/models/{id}`
    ModelsGet => "models.get",
    /// `POST /anthropic/v1/messages`
    Messages => "messages",
}

impl Endpoint {
    /// Position in [`Self::ALL`], for tables indexed by endpoint: the variants are declared in `ALL`'s order, with
    /// no explicit discriminants.
    pub fn index(self) -> usize {
        self as usize
    }

    /// Whether the request body is JSON naming a `model`.
    pub fn has_model(self) -> bool {
        match self {
            Self::ChatCompletions | Self::ResponsesCreate | Self::Messages => true,
            Self::ResponsesGet | Self::ResponsesDelete | Self::ResponsesCancel | Self::ModelsList | Self::ModelsGet => {
                false
            }
        }
    }
}

/// A request path the gateway will forward.
#[derive(Debug, Clone, Copy)]
pub struct Matched<'t, 'p> {
    /// The endpoint.
    pub endpoint: Endpoint,
    /// Its API family.
    pub api: Api,
    /// The project of the `[[routes]]` prefix the path came under, if any.
    pub route_project: Option<&'t Arc<Project>>,
    /// The path to send upstream: the request path with the route prefix removed.
    pub upstream_path: &'p str,
}

/// Route prefixes, longest first so that `/a/b` wins over `/a`.
#[derive(Debug, Clone, Default)]
pub struct RouteTable(Vec<(String, Arc<Project>)>);

impl RouteTable {
    /// Builds the table from (prefix, project) pairs.
    pub fn new(mut routes: Vec<(String, Arc<Project>)>) -> Self {
        routes.sort_by_key(|(prefix, _)| std::cmp::Reverse(prefix.len()));
        Self(routes)
    }

    /// Classifies `path` (no query) for `method`.
    pub fn classify<'t, 'p>(&'t self, method: &Method, path: &'p str) -> Result<Matched<'t, 'p>, GatewayError> {
        let (route_project, rest) = self
            .0
            .iter()
            .find_map(|(prefix, project)| {
                path.strip_prefix(prefix.as_str())
                    .filter(|rest| rest.starts_with('/'))
                    .map(|rest| (Some(project), rest))
            })
            .unwrap_or((None, path));
        let (endpoint, api) = classify_api_path(method, rest).ok_or(GatewayError::UnknownRoute)?;
        Ok(Matched { endpoint, api, route_project, upstream_path: rest })
    }
}

fn classify_api_path(method: &Method, path: &str) -> Option<(Endpoint, Api)> {
    // Split on bytes (a `char` pattern searches through a general-purpose searcher); every literal below is
    // ASCII, and `is_id` checks the rest byte by byte.
    let mut segments = path.as_bytes().strip_prefix(b"/")?.split(|b| *b == b'/');
    let api = match segments.next()? {
        b"v1" => Api::OpenAi,
        b"openai" if segments.next()? == b"v1" => Api::OpenAi,
        b"anthropic" if segments.next()? == b"v1" => Api::Anthropic,
        _ => return None,
    };
    // No endpoint has more than three segments after the version: they are gathered in an array, not a `Vec`
    // allocated per request.
    let mut tail: [&[u8]; 3] = [b""; 3];
    let mut len = 0;
    for segment in segments {
        *tail.get_mut(len)? = segment;
        len += 1;
    }
    let endpoint = match (api, method, &tail[..len]) {
        (Api::OpenAi, &Method::POST, [b"chat", b"completions"]) => Endpoint::ChatCompletions,
        (Api::OpenAi, &Method::POST, [b"responses"]) => Endpoint::ResponsesCreate,
        (Api::OpenAi, &Method::GET, [b"responses", id]) if is_id(id) => Endpoint::ResponsesGet,
        (Api::OpenAi, &Method::DELETE, [b"responses", id]) if is_id(id) => Endpoint::ResponsesDelete,
        (Api::OpenAi, &Method::POST, [b"responses", id, b"cancel"]) if is_id(id) => Endpoint::ResponsesCancel,
        (Api::OpenAi, &Method::GET, [b"models"]) => Endpoint::ModelsList,
        (Api::OpenAi, &Method::GET, [b"models", id]) if is_id(id) => Endpoint::ModelsGet,
        (Api::Anthropic, &Method::POST, [b"messages"]) => Endpoint::Messages,
        _ => return None,
    };
    Some((endpoint, api))
}

/// An id segment (`resp_...`, `openai.gpt-oss-120b`): a strict alphabet with no `%`, so nothing decodes into
/// a slash or a dot segment, and no segment made only of dots.
fn is_id(segment: &[u8]) -> bool {
    !segment.is_empty()
        && segment.len() <= 256
        && segment.iter().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'))
        && !segment.iter().all(|b| *b == b'.')
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROUTES: &str = r#"
        [callers]
        auth = "none"
        [[projects]]
        name = "Team"
        id = "proj_team"
        [[projects]]
        name = "Chat"
        id = "proj_chat"
        [[routes]]
        prefix = "/team"
        project = "Team"
        [[routes]]
        prefix = "/team/chat"
        project = "Chat"
    "#;

    fn table() -> RouteTable {
        crate::snapshot::tests::snapshot(ROUTES).routes
    }

    /// The result, with the route's project by name.
    fn classified<'p>(
        t: &RouteTable,
        method: &Method,
        path: &'p str,
    ) -> Result<(Endpoint, Api, &'p str, Option<String>), GatewayError> {
        t.classify(method, path).map(|m| (m.endpoint, m.api, m.upstream_path, m.route_project.map(|p| p.name.clone())))
    }

    #[test]
    fn all_lists_every_endpoint_at_its_index() {
        for (i, endpoint) in Endpoint::ALL.iter().enumerate() {
            assert_eq!(endpoint.index(), i, "{endpoint:?}");
        }
        let names: std::collections::HashSet<_> = Endpoint::ALL.iter().map(|e| e.name()).collect();
        assert_eq!(names.len(), Endpoint::ALL.len(), "names are distinct");
    }

    #[test]
    fn inference_paths_are_classified() {
        let t = RouteTable::default();
        let cases = [
            (Method::POST, "/v1/chat/completions", Endpoint::ChatCompletions, Api::OpenAi),
            (Method::POST, "/openai/v1/chat/completions", Endpoint::ChatCompletions, Api::OpenAi),
            (Method::POST, "/v1/responses", Endpoint::ResponsesCreate, Api::OpenAi),
            (Method::GET, "/v1/responses/resp_1", Endpoint::ResponsesGet, Api::OpenAi),
            (Method::DELETE, "/openai/v1/responses/resp_1", Endpoint::ResponsesDelete, Api::OpenAi),
            (Method::POST, "/v1/responses/resp_1/cancel", Endpoint::ResponsesCancel, Api::OpenAi),
            (Method::GET, "/v1/models", Endpoint::ModelsList, Api::OpenAi),
            (Method::GET, "/v1/models/openai.gpt-oss-120b", Endpoint::ModelsGet, Api::OpenAi),
            (Method::POST, "/anthropic/v1/messages", Endpoint::Messages, Api::Anthropic),
        ];
        for (method, path, endpoint, api) in cases {
            let m = classified(&t, &method, path).unwrap_or_else(|e| panic!("{path}: {e}"));
            assert_eq!(m, (endpoint, api, path, None), "{path}");
        }
    }

    #[test]
    fn everything_else_is_unknown() {
        let t = table();
        let blocked = [
            (Method::GET, "/v1/organization/projects"),
            (Method::POST, "/v1/organization/projects"),
            (Method::POST, "/v1/chat/completions/../../organization/projects"),
            (Method::POST, "/v1/./chat/completions"),
            (Method::POST, "//v1/chat/completions"),
            (Method::POST, "/v1//chat/completions"),
            (Method::POST, "/v1/chat/completions/"),
            (Method::POST, "/v1/chat%2Fcompletions"),
            (Method::POST, "/v1/%63hat/completions"),
            (Method::GET, "/v1/responses/.."),
            (Method::GET, "/v1/responses/%2e%2e"),
            (Method::GET, "/v1/responses/..%2forganization"),
            (Method::GET, "/v1/models/../organization"),
            (Method::POST, "/v1/responses/resp_1/cancel/x"),
            (Method::GET, "/v1/chat/completions"),
            (Method::PUT, "/v1/responses"),
            (Method::POST, "/anthropic/v1/chat/completions"),
            (Method::POST, "/openai/v2/chat/completions"),
            (Method::POST, "/V1/chat/completions"),
            (Method::GET, "/team/v1/organization/projects"),
            (Method::GET, "/teamx/v1/models"),
            (Method::GET, "/"),
            (Method::GET, ""),
        ];
        for (method, path) in blocked {
            assert_eq!(classified(&t, &method, path), Err(GatewayError::UnknownRoute), "{method} {path}");
        }
    }

    #[test]
    fn longest_route_prefix_wins_and_is_stripped() {
        let t = table();
        let m = classified(&t, &Method::POST, "/team/chat/v1/chat/completions").expect("match");
        assert_eq!((m.3.as_deref(), m.2), (Some("Chat"), "/v1/chat/completions"));
        let m = classified(&t, &Method::GET, "/team/openai/v1/models").expect("match");
        assert_eq!((m.3.as_deref(), m.2), (Some("Team"), "/openai/v1/models"));
    }
}
