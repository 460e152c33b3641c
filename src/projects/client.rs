//! The Projects API client: the upstream's `base_url`, reached the way the proxy reaches it (the same connector,
//! its CA store and timeouts), with the gateway's own credential (a bearer key, or each request signed with
//! SigV4) or a separate admin key (`--api-key-env`), since a long-term key's default policy may only list and get.
//!
//! Every call is logged (method, path, status, attempt; never a header or a body). 429 and 5xx, and a connection
//! that fails, are retried with exponential backoff, a bounded number of times: AWS advises backoff from 1 s,
//! doubling, up to 6 attempts. That holds for every call that may be sent twice with the same effect: reads,
//! updates (setting a tag or a name, removing a tag) and archive. A create may not: after a 5xx or a timeout the
//! project may exist, and a second create would make a second project of the name. So a create is retried only
//! on 429 (refused before anything was done); any other failure stops the run and is reported, and the next
//! plan (which matches by name) shows whether the project was created.
//!
//! Whether the list takes OpenAI's `after` and `limit` is not documented, so the list is paged with them while
//! `has_more` says so, and stopped with an error, never a loop, when a page repeats a project already listed or
//! the pages never end.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, USER_AGENT};
use http::{HeaderValue, Method, Request, StatusCode};
use serde::Deserialize;

use super::UpstreamProject;
use crate::config::{Secret, Upstream};
use crate::metering::metrics::Metrics;
use crate::proxy::{Credential, UpstreamClient, body};

/// Where the Projects API lives on the upstream host.
pub const PROJECTS_PATH: &str = "/v1/organization/projects";

/// The largest answer read: a page of 100 projects with their tags is a few tens of KiB.
const MAX_ANSWER_BYTES: u64 = 8 * 1024 * 1024;

/// How failed calls are tried again.
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    /// Attempts in all, the first included.
    pub attempts: u32,
    /// The wait before the second attempt; each later wait doubles it.
    pub base: Duration,
    /// The longest wait between two attempts.
    pub max: Duration,
}

impl Default for Retry {
    /// AWS's advice for bedrock-mantle's 429 and 503: from 1 s, doubling, up to 6 attempts.
    fn default() -> Self {
        Self { attempts: 6, base: Duration::from_secs(1), max: Duration::from_secs(20) }
    }
}

impl Retry {
    /// The wait after failed attempt number `attempt` (1 for the first).
    pub fn delay(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.saturating_sub(1));
        self.base.saturating_mul(factor).min(self.max)
    }
}

/// How the list is paged.
#[derive(Debug, Clone, Copy)]
pub struct Paging {
    /// `limit`, asked of each page (OpenAI's largest).
    pub limit: u32,
    /// The most pages read before the listing is taken to never end. Every page must bring projects not listed
    /// before (one that repeats any is an error), and an account holds at most 1,000 projects, so even at one
    /// project a page a real listing ends well within this.
    pub max_pages: usize,
}

impl Default for Paging {
    fn default() -> Self {
        Self { limit: 100, max_pages: 1_000 }
    }
}

/// One of the API's operations: what a call does, for messages and for the IAM action a 403 likely lacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// `GET /v1/organization/projects`.
    List,
    /// `GET /v1/organization/projects/{id}`.
    Get,
    /// `POST /v1/organization/projects`: not idempotent.
    Create,
    /// `POST /v1/organization/projects/{id}`: a name, tags to add or tag keys to remove.
    Update,
    /// `POST /v1/organization/projects/{id}/archive`.
    Archive,
}

impl Operation {
    /// The IAM action it needs, as the bedrock-mantle action namespace names its operations (AWS documents the
    /// write actions; these read actions follow the same pattern and are not confirmed).
    pub fn iam_action(self) -> &'static str {
        match self {
            Self::List => "bedrock-mantle:ListProjects",
            Self::Get => "bedrock-mantle:GetProject",
            Self::Create => "bedrock-mantle:CreateProject (and bedrock-mantle:TagResource for its tags)",
            Self::Update => {
                "bedrock-mantle:UpdateProject (bedrock-mantle:TagResource and ListTagsForResource to add tags, \
                 UntagResource to remove them)"
            }
            Self::Archive => "bedrock-mantle:ArchiveProject",
        }
    }

    /// Its HTTP method.
    pub fn method(self) -> Method {
        match self {
            Self::List | Self::Get => Method::GET,
            Self::Create | Self::Update | Self::Archive => Method::POST,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Self::List => "list projects",
            Self::Get => "get a project",
            Self::Create => "create a project",
            Self::Update => "update a project",
            Self::Archive => "archive a project",
        }
    }

    /// Whether a call that failed with `status` (or with no answer, `None`) may be sent again: any but a create,
    /// which only on 429, as after a 5xx or a timeout the project may exist.
    fn retryable(self, status: Option<StatusCode>) -> bool {
        let throttled = status == Some(StatusCode::TOO_MANY_REQUESTS);
        match self {
            Self::Create => throttled,
            Self::List | Self::Get | Self::Update | Self::Archive => {
                throttled || status.is_none_or(|s| s.is_server_error())
            }
        }
    }
}

/// An answer, after however many attempts it took.
struct Answer {
    status: StatusCode,
    body: Bytes,
    attempts: u32,
}

/// A page of the list.
#[derive(Deserialize)]
struct Page {
    data: Vec<UpstreamProject>,
    #[serde(default)]
    has_more: bool,
    #[serde(default)]
    last_id: Option<String>,
}

/// A client of the Projects API.
pub struct ProjectsClient {
    http: UpstreamClient,
    upstream: Upstream,
    credential: Credential,
    /// What to check when upstream refuses the credential.
    refusal_hint: String,
    /// How failed calls are tried again.
    pub retry: Retry,
    /// How the list is paged.
    pub paging: Paging,
}

/// The credential the projects commands use: the admin key in the environment variable `api_key_env` if given,
/// else the gateway's own (`[upstream]`), fetched as `serve` fetches it.
pub async fn connect(upstream: &Upstream, api_key_env: Option<&str>) -> anyhow::Result<ProjectsClient> {
    let (credential, hint) = match api_key_env {
        Some(name) => {
            let key = std::env::var(name)
                .ok()
                .map(|key| key.trim().to_owned())
                .filter(|key| !key.is_empty())
                .with_context(|| format!("--api-key-env: environment variable {name} is not set or empty"))?;
            let credential = Credential::api_key(&Secret::new(key))
                .with_context(|| format!("--api-key-env: the key in {name} is not a valid header value"))?;
            (credential, format!("check the admin key in the environment variable {name}"))
        }
        None => {
            let credential = Credential::connect(upstream, &Metrics::new()).await?;
            let hint = credential.refusal_hint().to_owned();
            (credential, hint)
        }
    };
    ProjectsClient::new(upstream, credential, hint)
}

impl ProjectsClient {
    /// A client of the API on `upstream`'s host, presenting `credential`; `refusal_hint` says what to check when
    /// upstream refuses it.
    pub fn new(upstream: &Upstream, credential: Credential, refusal_hint: impl Into<String>) -> anyhow::Result<Self> {
        if !credential.replaces_callers() {
            anyhow::bail!(
                "upstream.auth = \"passthrough\": the gateway has no credential of its own for the Projects API; \
                 give one with --api-key-env NAME"
            );
        }
        let http = UpstreamClient::new(crate::proxy::client::connector(upstream)?, upstream)?;
        Ok(Self {
            http,
            upstream: upstream.clone(),
            credential,
            refusal_hint: refusal_hint.into(),
            retry: Retry::default(),
            paging: Paging::default(),
        })
    }

    /// Every project the list gives, all pages of it.
    pub async fn list(&self) -> anyhow::Result<Vec<UpstreamProject>> {
        let mut projects = Vec::new();
        let mut listed = HashSet::new();
        let mut after: Option<String> = None;
        for page_number in 1..=self.paging.max_pages {
            let mut path = format!("{PROJECTS_PATH}?limit={}", self.paging.limit);
            if let Some(after) = &after {
                path.push_str("&after=");
                path.push_str(after);
            }
            let body = self.expect_ok(Operation::List, &path).await?;
            let page: Page = serde_json::from_slice(&body)
                .with_context(|| format!("GET {path}: the answer is not a list of projects"))?;
            let last = page.data.last().map(|p| p.id.clone());
            for project in page.data {
                if !listed.insert(project.id.clone()) {
                    anyhow::bail!(
                        "GET {path}: page {page_number} of the project list repeats {}, already listed; upstream \
                         does not seem to honour `after`, so the listing was stopped rather than read in a loop",
                        project.id
                    );
                }
                projects.push(project);
            }
            if !page.has_more {
                return Ok(projects);
            }
            let next = page.last_id.filter(|id| !id.is_empty()).or(last).with_context(|| {
                format!("GET {path}: page {page_number} says it has more, but names no project to continue after")
            })?;
            // The id goes into the next URL: only an id of the documented shape does.
            if !crate::config::is_project_id(&next) {
                anyhow::bail!("GET {path}: page {page_number} ends with {next:?}, which is not a project id");
            }
            // A page that moves the listing on by nothing would be asked for again and again.
            if after.as_ref() == Some(&next) {
                anyhow::bail!(
                    "GET {path}: page {page_number} says it has more, but continues after {next} again: stopped, \
                     as the listing does not move on"
                );
            }
            after = Some(next);
        }
        anyhow::bail!(
            "the project list still had more after {} pages ({} projects; an account holds at most 1,000): \
             stopped, as the listing does not end",
            self.paging.max_pages,
            projects.len()
        )
    }

    /// The project `id`, or `None` if upstream has no such project (in this region).
    pub async fn get(&self, id: &str) -> anyhow::Result<Option<UpstreamProject>> {
        if !crate::config::is_project_id(id) {
            anyhow::bail!("{id:?} is not a project id");
        }
        let path = format!("{PROJECTS_PATH}/{id}");
        let answer = self.call(Operation::Get, &path, Bytes::new()).await?;
        if answer.status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let body = self.check(Operation::Get, &path, answer)?;
        let project = serde_json::from_slice(&body).with_context(|| format!("GET {path}: not a project"))?;
        Ok(Some(project))
    }

    /// Creates the project `name` with `tags`: the project upstream made.
    pub async fn create(&self, name: &str, tags: &BTreeMap<String, String>) -> anyhow::Result<UpstreamProject> {
        let body = serde_json::to_vec(&serde_json::json!({ "name": name, "tags": tags }))?;
        let answer = self.call(Operation::Create, PROJECTS_PATH, body.into()).await?;
        let body = self.check(Operation::Create, PROJECTS_PATH, answer)?;
        let project: UpstreamProject = serde_json::from_slice(&body)
            .with_context(|| format!("POST {PROJECTS_PATH}: the answer is not a project"))?;
        if !crate::config::is_project_id(&project.id) {
            anyhow::bail!(
                "POST {PROJECTS_PATH}: the project made has the id {:?}, which is not a project id",
                project.id
            );
        }
        Ok(project)
    }

    /// Updates the project `id`: `change` is one of `{"name"}`, `{"add_tags"}`, `{"remove_tag_keys"}`.
    pub async fn update(&self, id: &str, change: &serde_json::Value) -> anyhow::Result<()> {
        if !crate::config::is_project_id(id) {
            anyhow::bail!("{id:?} is not a project id");
        }
        let path = format!("{PROJECTS_PATH}/{id}");
        let body = serde_json::to_vec(change)?;
        let answer = self.call(Operation::Update, &path, body.into()).await?;
        self.check(Operation::Update, &path, answer).map(drop)
    }

    /// Archives the project `id`.
    pub async fn archive(&self, id: &str) -> anyhow::Result<()> {
        if !crate::config::is_project_id(id) {
            anyhow::bail!("{id:?} is not a project id");
        }
        let path = format!("{PROJECTS_PATH}/{id}/archive");
        let answer = self.call(Operation::Archive, &path, Bytes::new()).await?;
        self.check(Operation::Archive, &path, answer).map(drop)
    }

    /// The body of a call that must succeed.
    async fn expect_ok(&self, operation: Operation, path: &str) -> anyhow::Result<Bytes> {
        let answer = self.call(operation, path, Bytes::new()).await?;
        self.check(operation, path, answer)
    }

    /// The body of a successful answer, or an error that says what failed and what to do about it.
    fn check(&self, operation: Operation, path: &str, answer: Answer) -> anyhow::Result<Bytes> {
        let Answer { status, body, attempts } = answer;
        if status.is_success() {
            return Ok(body);
        }
        let method = operation.method();
        let mut said = upstream_message(&body);
        if attempts > 1 {
            let _ = write!(said, " (gave up after {attempts} attempts)");
        }
        let codes = crate::proxy::error_codes(&http::HeaderMap::new(), &body);
        match status {
            StatusCode::UNAUTHORIZED => {
                anyhow::bail!(
                    "{method} {path}: upstream refused the credential ({status}{said}): {}",
                    self.refusal_hint
                )
            }
            StatusCode::FORBIDDEN if crate::proxy::credential_code(&codes).is_some() => {
                anyhow::bail!(
                    "{method} {path}: upstream refused the credential ({status}{said}): {}",
                    self.refusal_hint
                )
            }
            StatusCode::FORBIDDEN => anyhow::bail!(
                "{method} {path}: {status}{said}: the credential may not {}; likely missing: {}",
                operation.describe(),
                operation.iam_action()
            ),
            _ => anyhow::bail!("{method} {path}: {status}{said}"),
        }
    }

    /// One call, tried again as [`Operation::retryable`] and [`Retry`] allow: the last answer's status and body,
    /// or the last failure.
    async fn call(&self, operation: Operation, path: &str, body: Bytes) -> anyhow::Result<Answer> {
        let method = operation.method();
        let mut attempt = 1;
        loop {
            let outcome = self.send(&method, path, body.clone()).await;
            let retryable = match &outcome {
                Ok((status, _)) => {
                    tracing::info!(method = %method, path = %path, status = status.as_u16(), attempt, "projects API call");
                    !status.is_success() && operation.retryable(Some(*status))
                }
                Err(e) => {
                    tracing::warn!(method = %method, path = %path, attempt, error = %format!("{e:#}"), "projects API call failed");
                    operation.retryable(None)
                }
            };
            if !retryable || attempt >= self.retry.attempts.max(1) {
                return match outcome {
                    Ok((status, body)) => Ok(Answer { status, body, attempts: attempt }),
                    Err(e) => Err(e.context(format!(
                        "{method} {path} ({}): gave up after {attempt} attempts",
                        operation.describe()
                    ))),
                };
            }
            tokio::time::sleep(self.retry.delay(attempt)).await;
            attempt += 1;
        }
    }

    /// Sends one request and reads its answer whole, within `upstream.response_timeout`.
    async fn send(&self, method: &Method, path: &str, body: Bytes) -> anyhow::Result<(StatusCode, Bytes)> {
        let request = self.request(method, path, body)?;
        let u = &self.upstream;
        let exchange = async {
            let response = self.http.request(request, u).await.map_err(|e| {
                anyhow::anyhow!("{} could not be reached: {}", u.authority, crate::proxy::access_log::error_chain(&*e))
            })?;
            let status = response.status();
            let body = body::read(response.into_body(), MAX_ANSWER_BYTES)
                .await
                .map_err(|_| anyhow::anyhow!("the answer could not be read (or is over {MAX_ANSWER_BYTES} bytes)"))?;
            Ok::<_, anyhow::Error>((status, body))
        };
        tokio::time::timeout(u.response_timeout, exchange)
            .await
            .map_err(|_| anyhow::anyhow!("{} did not answer within {:?}", u.authority, u.response_timeout))?
    }

    /// The request as it goes upstream: the credential's bearer key, or a SigV4 signature over the whole request
    /// as sent (its query spelled as it is signed).
    fn request(&self, method: &Method, path: &str, body: Bytes) -> anyhow::Result<Request<body::Outgoing>> {
        let path = match path.split_once('?') {
            Some((route, query)) => match crate::aws::sigv4::canonical_query(query) {
                Some(canonical) => format!("{route}?{canonical}"),
                None => path.to_owned(),
            },
            None => path.to_owned(),
        };
        let mut request = Request::builder().method(method.clone()).uri(&path).body(body::whole(body.clone()))?;
        let headers = request.headers_mut();
        headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
        if !body.is_empty() {
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        }
        headers.insert(USER_AGENT, HeaderValue::from_static(concat!("mantlegate/", env!("CARGO_PKG_VERSION"))));
        if let Some(bearer) = self.credential.bearer() {
            headers.insert(AUTHORIZATION, bearer.bearer.clone());
        }
        if let Credential::SigV4(signer) = &self.credential {
            signer.sign(method, &path, headers, &body)?;
        }
        Ok(request)
    }
}

/// `: "<message>"` from an OpenAI-shaped error body, kept short; empty when there is none.
fn upstream_message(body: &[u8]) -> String {
    let value: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let message = value["error"]["message"].as_str().or_else(|| value["message"].as_str()).unwrap_or("");
    if message.is_empty() {
        return String::new();
    }
    let short: String = message.chars().take(200).collect();
    format!(": {short:?}")
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use aws_credential_types::Credentials;

    use super::*;
    use crate::aws::AwsCredentials;
    use crate::aws::sigv4::Signer;

    fn upstream() -> Upstream {
        let config = crate::Config::from_toml(
            "[upstream]\nbase_url = \"http://127.0.0.1:9\"\n[callers]\nauth = \"none\"\n\
             [[projects]]\nname = \"A\"\ntags = {}\n",
        )
        .expect("valid");
        config.upstream
    }

    #[test]
    fn backoff_doubles_and_is_bounded() {
        let retry = Retry::default();
        let delays: Vec<u64> = (1..=6).map(|a| retry.delay(a).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 20]);
        assert_eq!(retry.delay(u32::MAX), retry.max);
    }

    #[tokio::test]
    async fn a_bearer_key_is_sent_and_never_shown() {
        let key = Credential::api_key(&Secret::new("admin-secret".into())).expect("key");
        let client = ProjectsClient::new(&upstream(), key, "hint").expect("client");
        let request = client.request(&Method::GET, "/v1/organization/projects?limit=100", Bytes::new()).expect("req");
        assert_eq!(request.headers()[AUTHORIZATION], "Bearer admin-secret");
        assert!(request.headers()[AUTHORIZATION].is_sensitive());
        assert!(!format!("{request:?}").contains("admin-secret"));
    }

    #[tokio::test]
    async fn with_sigv4_each_request_is_signed_as_sent() {
        let credentials = Credentials::new("AKIDPROJECTSTEST", "secret", None, None, "t");
        let host = HeaderValue::from_static("127.0.0.1:9");
        let signer = Signer::new(AwsCredentials::fixed(credentials), "us-east-1".into(), host);
        let client = ProjectsClient::new(&upstream(), Credential::SigV4(Arc::new(signer)), "hint").expect("client");
        // A query the signer would spell otherwise is sent as it is signed.
        let request = client.request(&Method::GET, "/v1/organization/projects?a=b+c", Bytes::new()).expect("req");
        assert_eq!(request.uri(), "/v1/organization/projects?a=b%20c");
        let authorization = request.headers()[AUTHORIZATION].to_str().expect("text");
        assert!(
            authorization.starts_with("AWS4-HMAC-SHA256 Credential=AKIDPROJECTSTEST/")
                && authorization.contains("/us-east-1/bedrock-mantle/aws4_request"),
            "{authorization}"
        );
        // The hash of the empty body.
        assert_eq!(
            request.headers()["x-amz-content-sha256"],
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn a_create_is_sent_again_only_when_throttled() {
        let (throttled, failed) = (Some(StatusCode::TOO_MANY_REQUESTS), Some(StatusCode::INTERNAL_SERVER_ERROR));
        assert!(Operation::Create.retryable(throttled));
        assert!(!Operation::Create.retryable(failed) && !Operation::Create.retryable(None));
        for op in [Operation::List, Operation::Get, Operation::Update, Operation::Archive] {
            assert!(op.retryable(throttled) && op.retryable(failed) && op.retryable(None));
            assert!(!op.retryable(Some(StatusCode::NOT_FOUND)));
        }
    }

    #[test]
    fn passthrough_has_no_credential_to_call_with() {
        let error = ProjectsClient::new(&upstream(), Credential::Passthrough, "hint").err().expect("refused");
        assert!(error.to_string().contains("--api-key-env"), "{error}");
    }

    #[test]
    fn upstream_messages_are_quoted_short() {
        assert_eq!(upstream_message(br#"{"error":{"message":"nope"}}"#), ": \"nope\"");
        assert_eq!(upstream_message(b"not json"), "");
        assert_eq!(upstream_message("{\"message\":\"".to_owned().as_bytes()), "");
        let long = format!(r#"{{"error":{{"message":"{}"}}}}"#, "x".repeat(500));
        assert_eq!(upstream_message(long.as_bytes()).len(), 200 + 4);
    }
}
