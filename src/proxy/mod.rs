//! The forwarding path, in pingora's phase order: request filter (route, caller, attribution, body, model
//! allowlist) -> upstream request filter (headers, URI) -> upstream peer (the shared client, with timeouts) ->
//! response filter (headers) -> response body filter ([`body::Observed`]) -> logging ([`access_log`]).

pub mod access_log;
pub mod body;
pub mod client;
pub mod headers;

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use http::uri::PathAndQuery;
use http::{HeaderValue, Uri, Version};
use hyper::body::Incoming;

use crate::attribution::{Attributor, Requested};
use crate::auth::KeyTable;
use crate::config::{Config, Project};
use crate::endpoint::RouteTable;
use crate::error::GatewayError;
use crate::shutdown::Shutdown;
use access_log::AccessLog;
pub use headers::Credential;

/// Everything a request needs, built once per config and shared read-only by every request.
pub struct Gateway {
    config: Config,
    keys: KeyTable,
    attributor: Attributor,
    routes: RouteTable,
    /// Each project's id as a ready header value, by project index.
    project_ids: Vec<HeaderValue>,
    credential: Credential,
    client: client::UpstreamClient,
    shutdown: Shutdown,
}

impl Gateway {
    /// Builds the gateway. Every project must have an id: a request can be attributed to any of them.
    pub fn new(config: Config, credential: Credential, shutdown: Shutdown) -> anyhow::Result<Self> {
        let missing: Vec<&str> = config.projects.iter().filter(|p| p.id.is_none()).map(|p| p.name.as_str()).collect();
        if !missing.is_empty() {
            anyhow::bail!(
                "projects without an id cannot receive traffic: {} (set `id`, or run `mantlegate projects sync`)",
                missing.join(", ")
            );
        }
        let project_ids = config
            .projects
            .iter()
            .map(|p| HeaderValue::from_str(p.id.as_deref().unwrap_or_default()))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            keys: KeyTable::new(config.callers, &config.keys),
            attributor: Attributor::new(&config),
            routes: RouteTable::new(&config.routes),
            project_ids,
            client: client::build(&config.upstream)?,
            credential,
            shutdown,
            config,
        })
    }

    /// The request filter and upstream phases. Errors are the gateway's own answers; upstream's error
    /// responses are `Ok` and pass through unchanged.
    async fn forward(&self, req: Request, log: &mut AccessLog) -> Result<Response<Incoming>, GatewayError> {
        if self.shutdown.is_draining() {
            return Err(GatewayError::ShuttingDown);
        }
        let (mut parts, body) = req.into_parts();

        // Request filter: which endpoint, who is calling, which project.
        let matched = self.routes.classify(&parts.method, parts.uri.path())?;
        log.endpoint = Some(matched.endpoint.name());
        let key = self.keys.authenticate(&parts.headers)?.map(|k| &self.config.keys[k.0]);
        log.key = key.map(|k| k.name.clone());
        let attribution =
            self.attributor.resolve(key, Requested::from_headers(&parts.headers), matched.route_project)?;
        let project = self.config.project(attribution.project);
        log.project = Some(project.name.clone());
        log.project_id = project.id.clone();
        log.attribution = Some(attribution.source.name());
        if attribution.source == crate::attribution::Source::Rerouted {
            tracing::warn!(request_id = ?log.request_id(), project = %project.name, "unattributed request rerouted");
        }

        let upstream_uri = self.upstream_uri(matched.upstream_path, parts.uri.query())?;
        let body = self.request_body(&parts.headers, body, matched.endpoint.has_model(), project, log).await?;

        // Upstream request filter.
        headers::to_upstream(
            &mut parts.headers,
            matched.api,
            &self.project_ids[attribution.project.0],
            &self.credential,
            log.request_id(),
        );
        parts.uri = upstream_uri;
        parts.version = Version::HTTP_11;

        // Upstream peer.
        let upstream = &self.config.upstream;
        match tokio::time::timeout(upstream.response_timeout, self.client.request(Request::from_parts(parts, body)))
            .await
        {
            Err(_) => Err(GatewayError::UpstreamTimeout),
            Ok(Ok(res)) => Ok(res),
            Ok(Err(e)) if body::is_over_limit(&e) => {
                Err(GatewayError::RequestTooLarge(self.config.server.max_body_bytes))
            }
            Ok(Err(e)) => {
                tracing::warn!(request_id = ?log.request_id(), error = %access_log::error_chain(&e), "upstream request failed");
                Err(GatewayError::UpstreamUnreachable)
            }
        }
    }

    /// The body to send upstream: read whole only when the project's model allowlist needs the model.
    async fn request_body(
        &self,
        headers: &http::HeaderMap,
        body: Body,
        has_model: bool,
        project: &Project,
        log: &mut AccessLog,
    ) -> Result<Body, GatewayError> {
        let limit = self.config.server.max_body_bytes;
        body::check_declared_length(headers, limit)?;
        if !has_model || project.models.is_empty() {
            return Ok(body::streamed(body, limit));
        }
        let (bytes, model) = body::read_json(body, limit).await?;
        let model = model.ok_or_else(|| GatewayError::InvalidRequest("request body names no \"model\"".into()))?;
        if !project.allows_model(&model) {
            return Err(GatewayError::ModelNotAllowed { model, project: project.name.clone() });
        }
        log.model = Some(model);
        Ok(Body::from(bytes))
    }

    fn upstream_uri(&self, path: &str, query: Option<&str>) -> Result<Uri, GatewayError> {
        let path_and_query = match query {
            Some(q) => PathAndQuery::try_from(format!("{path}?{q}")),
            None => PathAndQuery::try_from(path),
        }
        .map_err(|_| GatewayError::UnknownRoute)?;
        let upstream = &self.config.upstream;
        Uri::builder()
            .scheme(upstream.scheme.clone())
            .authority(upstream.authority.clone())
            .path_and_query(path_and_query)
            .build()
            .map_err(|_| GatewayError::UnknownRoute)
    }
}

/// The traffic handler: every request on the traffic listener comes here.
pub async fn handle(State(gateway): State<Arc<Gateway>>, req: Request) -> Response {
    let request_id = headers::request_id(req.headers());
    let mut log = AccessLog::start(request_id.clone(), req.method(), req.uri().path());
    match gateway.forward(req, &mut log).await {
        Ok(res) => {
            let (mut parts, incoming) = res.into_parts();
            headers::to_caller(&mut parts.headers, &request_id);
            log.status = Some(parts.status);
            let body = body::Observed::new(incoming, gateway.config.upstream.idle_timeout, log);
            Response::from_parts(parts, Body::new(body))
        }
        Err(e) => {
            log.status = Some(e.status());
            log.error = Some(e.code());
            log.complete();
            let mut res = e.into_response();
            res.headers_mut().insert(headers::REQUEST_ID, request_id);
            res
        }
    }
}
