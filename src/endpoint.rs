//! Which inference endpoint a request is for, and under which configured route prefix. Only the paths listed
//! here are ever forwarded; anything else (above all the admin-only `/v1/organization/...` Projects API, however
//! it is spelled) is `unknown_route` before upstream is contacted. Matching is exact, segment by segment, on the
//! path exactly as received: no decoding, no normalisation, so there is no spelling that means one thing here
//! and another upstream.

use http::Method;

use crate::config::{ProjectIdx, Route};
use crate::error::GatewayError;

/// The API family, which decides the project header and credential header upstream expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// `/v1/...` and `/openai/v1/...`: project in `OpenAI-Project`.
    OpenAi,
    /// `/anthropic/v1/...`: project in `anthropic-workspace-id`.
    Anthropic,
}

/// An inference endpoint the gateway forwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /v1/chat/completions`
    ChatCompletions,
    /// `POST /v1/responses`
    ResponsesCreate,
    /// `GET /v1/responses/{id}`
    ResponsesGet,
    /// `DELETE /v1/responses/{id}`
    ResponsesDelete,
    /// `POST /v1/responses/{id}/cancel`
    ResponsesCancel,
    /// `GET /v1/models`
    ModelsList,
    /// `GET /v1/models/{id}`
    ModelsGet,
    /// `POST /anthropic/v1/messages`
    Messages,
}

impl Endpoint {
    /// Every endpoint, in [`Self::index`] order.
    pub const ALL: [Self; 8] = [
        Self::ChatCompletions,
        Self::ResponsesCreate,
        Self::ResponsesGet,
        Self::ResponsesDelete,
        Self::ResponsesCancel,
        Self::ModelsList,
        Self::ModelsGet,
        Self::Messages,
    ];

    /// Position in [`Self::ALL`], for tables indexed by endpoint.
    pub fn index(self) -> usize {
        self as usize
    }

    /// Stable name for logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Self::ChatCompletions => "chat.completions",
            Self::ResponsesCreate => "responses.create",
            Self::ResponsesGet => "responses.get",
            Self::ResponsesDelete => "responses.delete",
            Self::ResponsesCancel => "responses.cancel",
            Self::ModelsList => "models.list",
            Self::ModelsGet => "models.get",
            Self::Messages => "messages",
        }
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Matched<'a> {
    /// The endpoint.
    pub endpoint: Endpoint,
    /// Its API family.
    pub api: Api,
    /// The project of the `[[routes]]` prefix the path came under, if any.
    pub route_project: Option<ProjectIdx>,
    /// The path to send upstream: the request path with the route prefix removed.
    pub upstream_path: &'a str,
}

/// Route prefixes, longest first so that `/a/b` wins over `/a`.
#[derive(Debug, Clone, Default)]
pub struct RouteTable(Vec<Route>);

impl RouteTable {
    /// Builds the table from configured routes.
    pub fn new(routes: &[Route]) -> Self {
        let mut routes = routes.to_vec();
        routes.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
        Self(routes)
    }

    /// Classifies `path` (no query) for `method`.
    pub fn classify<'a>(&self, method: &Method, path: &'a str) -> Result<Matched<'a>, GatewayError> {
        let (route_project, rest) = self
            .0
            .iter()
            .find_map(|r| {
                path.strip_prefix(r.prefix.as_str())
                    .filter(|rest| rest.starts_with('/'))
                    .map(|rest| (Some(r.project), rest))
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

    fn table() -> RouteTable {
        RouteTable::new(&[
            Route { prefix: "/team".into(), project: ProjectIdx(0) },
            Route { prefix: "/team/chat".into(), project: ProjectIdx(1) },
        ])
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
            let m = t.classify(&method, path).unwrap_or_else(|e| panic!("{path}: {e}"));
            assert_eq!((m.endpoint, m.api, m.upstream_path, m.route_project), (endpoint, api, path, None), "{path}");
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
            assert_eq!(t.classify(&method, path), Err(GatewayError::UnknownRoute), "{method} {path}");
        }
    }

    #[test]
    fn longest_route_prefix_wins_and_is_stripped() {
        let t = table();
        let m = t.classify(&Method::POST, "/team/chat/v1/chat/completions").expect("match");
        assert_eq!((m.route_project, m.upstream_path), (Some(ProjectIdx(1)), "/v1/chat/completions"));
        let m = t.classify(&Method::GET, "/team/openai/v1/models").expect("match");
        assert_eq!((m.route_project, m.upstream_path), (Some(ProjectIdx(0)), "/openai/v1/models"));
    }
}
