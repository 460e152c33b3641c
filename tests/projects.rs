//! `mantlegate projects plan`, `apply` and `import` against a mock Projects API: the real binary for what an
//! operator sees (output, exit status, logs, the lock file), the library's client for retries and endless pages
//! with fast, injected limits.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::response::{IntoResponse, Response};
use common::binary::{BIN, temp_dir};
use common::{Mock, Seen};
use http::StatusCode;
use mantlegate::config::Secret;
use mantlegate::projects::UpstreamProject;
use mantlegate::projects::client::{Paging, ProjectsClient, Retry};
use mantlegate::proxy::Credential;
use tokio::process::Command;

/// The key the mock accepts, in the environment variable the test configs name.
const KEY: &str = "projects-admin-secret";
const KEY_ENV: &str = "MANTLEGATE_TEST_PROJECTS_KEY";

/// How the mock pages its list.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Pages {
    /// As OpenAI does: `after` honoured.
    Honest,
    /// `after` ignored: the first page again and again, always with more.
    Repeating,
    /// A page of new projects every time, always with more.
    Endless,
    /// After the first page, empty pages that say there is more after the same project.
    Stuck,
}

/// What a request must carry to be let in.
#[derive(Clone)]
enum Expect {
    Bearer(&'static str),
    /// A SigV4 signature by this access key id.
    SigV4(&'static str),
}

/// A mock Projects API: a paginated list (archived projects left out, as OpenAI's list does by default), get by
/// id (archived ones included), create (ids `proj_<n>`), update (`add_tags`, `remove_tag_keys`, `name`) and
/// archive; statuses scripted ahead of the real answers or on a chosen call, and a record of every call.
struct Api {
    listed: Vec<UpstreamProject>,
    /// Only `get` finds these.
    archived: Vec<UpstreamProject>,
    page_size: usize,
    pages: Pages,
    expect: Expect,
    /// Statuses answered, one per call, before any real answer.
    fail_first: VecDeque<u16>,
    /// A status answered to the nth (from 1) call of this `METHOD /path`, in place of the real answer.
    fail_on: Option<(String, usize, u16)>,
    /// `METHOD /path?query` of every call, in order.
    calls: Vec<String>,
    endless_next: usize,
    /// The number in the next created project's id.
    next_id: usize,
}

struct MockApi {
    mock: Arc<Mock>,
    api: Arc<Mutex<Api>>,
}

impl MockApi {
    async fn start(listed: Vec<UpstreamProject>) -> Self {
        let api = Arc::new(Mutex::new(Api {
            listed,
            archived: Vec::new(),
            page_size: 100,
            pages: Pages::Honest,
            expect: Expect::Bearer(KEY),
            fail_first: VecDeque::new(),
            fail_on: None,
            calls: Vec::new(),
            endless_next: 0,
            next_id: 1,
        }));
        let state = api.clone();
        let mock = Mock::start(move |seen| {
            let answer = answer(&mut state.lock().unwrap(), &seen);
            async move { answer }
        })
        .await;
        Self { mock, api }
    }

    fn with(self, change: impl FnOnce(&mut Api)) -> Self {
        change(&mut self.api.lock().unwrap());
        self
    }

    fn calls(&self) -> Vec<String> {
        self.api.lock().unwrap().calls.clone()
    }

    /// The calls that are not reads.
    fn writes(&self) -> Vec<String> {
        self.calls().into_iter().filter(|c| !c.starts_with("GET ")).collect()
    }

    /// Every project upstream, listed or archived, by id.
    fn upstream(&self) -> BTreeMap<String, UpstreamProject> {
        let api = self.api.lock().unwrap();
        api.listed.iter().chain(&api.archived).map(|p| (p.id.clone(), p.clone())).collect()
    }
}

fn json(status: u16, body: serde_json::Value) -> Response {
    let status = StatusCode::from_u16(status).unwrap();
    (status, [(http::header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

fn error(status: u16, code: &str) -> Response {
    json(status, serde_json::json!({"error": {"message": format!("mock says {code}"), "type": code, "code": code}}))
}

fn answer(api: &mut Api, seen: &Seen) -> Response {
    api.calls.push(format!("{} {}", seen.method, seen.uri));
    let authorization = seen.header("authorization").unwrap_or("");
    let let_in = match &api.expect {
        Expect::Bearer(key) => authorization == format!("Bearer {key}"),
        Expect::SigV4(access_key) => {
            authorization.starts_with(&format!("AWS4-HMAC-SHA256 Credential={access_key}/"))
                && authorization.contains("/bedrock-mantle/aws4_request")
                && seen.header("x-amz-content-sha256").is_some()
        }
    };
    if !let_in {
        return error(401, "invalid_api_key");
    }
    if let Some(status) = api.fail_first.pop_front() {
        return error(status, if status == 403 { "AccessDeniedException" } else { "mock_failure" });
    }
    let path = seen.uri.path();
    let call = format!("{} {path}", seen.method);
    if let Some((on, nth, status)) = &api.fail_on {
        let made = api.calls.iter().filter(|c| c.split('?').next() == Some(&call)).count();
        if *on == call && made == *nth {
            return error(*status, "mock_failure");
        }
    }
    let query: BTreeMap<String, String> =
        form_urlencoded::parse(seen.uri.query().unwrap_or("").as_bytes()).into_owned().collect();
    if seen.method == http::Method::POST {
        return write(api, path, &seen.body);
    }
    if seen.method != http::Method::GET {
        return error(405, "method_not_allowed");
    }
    if path == "/v1/organization/projects" {
        let limit = query.get("limit").and_then(|l| l.parse().ok()).unwrap_or(20).min(api.page_size);
        let (page, has_more) = match api.pages {
            Pages::Honest => {
                let start = match query.get("after") {
                    Some(after) => api.listed.iter().position(|p| &p.id == after).map_or(api.listed.len(), |i| i + 1),
                    None => 0,
                };
                let end = (start + limit).min(api.listed.len());
                (api.listed[start..end].to_vec(), end < api.listed.len())
            }
            Pages::Repeating => (api.listed[..limit.min(api.listed.len())].to_vec(), true),
            Pages::Stuck if query.contains_key("after") => (Vec::new(), true),
            Pages::Stuck => (api.listed[..limit.min(api.listed.len())].to_vec(), true),
            Pages::Endless => {
                let page = (0..limit)
                    .map(|i| project(&format!("proj_gen{}", api.endless_next + i), "Generated", &[]))
                    .collect();
                api.endless_next += limit;
                (page, true)
            }
        };
        let (first_id, last_id) = (page.first().map(|p| p.id.clone()), page.last().map(|p| p.id.clone()));
        let last_id = last_id.or_else(|| query.get("after").cloned());
        return json(
            200,
            serde_json::json!({"object": "list", "data": page, "first_id": first_id, "last_id": last_id, "has_more": has_more}),
        );
    }
    if let Some(id) = path.strip_prefix("/v1/organization/projects/") {
        return match api.listed.iter().chain(&api.archived).find(|p| p.id == id) {
            Some(p) => json(200, serde_json::to_value(p).unwrap()),
            None => error(404, "not_found"),
        };
    }
    error(404, "unknown_route")
}

/// Create, update and archive, as the Projects API documents them.
fn write(api: &mut Api, path: &str, body: &[u8]) -> Response {
    let Ok(body) = serde_json::from_slice::<serde_json::Value>(if body.is_empty() { b"{}" } else { body }) else {
        return error(400, "invalid_json");
    };
    let described = |p: &UpstreamProject| {
        let mut value = serde_json::to_value(p).unwrap();
        value["object"] = "organization.project".into();
        value["arn"] = format!("arn:aws:bedrock-mantle:us-east-1:123456789012:project/{}", p.id).into();
        value["created_at"] = 1_700_000_000.into();
        json(200, value)
    };
    if path == "/v1/organization/projects" {
        let (Some(name), Ok(tags)) =
            (body["name"].as_str(), serde_json::from_value::<BTreeMap<String, String>>(body["tags"].clone()))
        else {
            return error(400, "invalid_request");
        };
        let created =
            UpstreamProject { id: format!("proj_{}", api.next_id), name: name.into(), status: "active".into(), tags };
        api.next_id += 1;
        api.listed.push(created.clone());
        return described(&created);
    }
    let Some(rest) = path.strip_prefix("/v1/organization/projects/") else { return error(404, "unknown_route") };
    if let Some(id) = rest.strip_suffix("/archive") {
        let Some(at) = api.listed.iter().position(|p| p.id == id) else {
            return match api.archived.iter().find(|p| p.id == id) {
                Some(p) => described(p),
                None => error(404, "not_found"),
            };
        };
        let mut archived = api.listed.remove(at);
        archived.status = "archived".into();
        api.archived.push(archived.clone());
        return described(&archived);
    }
    let Some(p) = api.listed.iter_mut().find(|p| p.id == rest) else { return error(404, "not_found") };
    let fields = body.as_object().map(|o| o.len()).unwrap_or(0);
    if fields != 1 {
        return error(400, "one_change_per_call");
    }
    if let Some(add) = body.get("add_tags") {
        let Ok(add) = serde_json::from_value::<BTreeMap<String, String>>(add.clone()) else {
            return error(400, "invalid_tags");
        };
        p.tags.extend(add);
    } else if let Some(keys) = body["remove_tag_keys"].as_array() {
        for key in keys {
            p.tags.remove(key.as_str().unwrap_or(""));
        }
    } else if let Some(name) = body["name"].as_str() {
        p.name = name.into();
    } else {
        return error(400, "unknown_change");
    }
    let p = p.clone();
    described(&p)
}

fn project(id: &str, name: &str, tags: &[(&str, &str)]) -> UpstreamProject {
    UpstreamProject {
        id: id.into(),
        name: name.into(),
        status: "active".into(),
        tags: tags.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
    }
}

/// Tags that satisfy the test taxonomy.
const TEAM_A: &[(&str, &str)] = &[("Team", "a"), ("CostCenter", "CC-1")];

/// A config whose upstream is the mock, with a taxonomy, and `projects` (TOML) appended.
fn config(name: &str, mock: &MockApi, projects: &str) -> PathBuf {
    let dir = temp_dir(&format!("projects-{name}"));
    let path = dir.join("gateway.toml");
    let text = format!(
        r#"
[upstream]
base_url = "http://{addr}"
auth = "api_key"
api_key_env = "{KEY_ENV}"
connect_timeout = "2s"
response_timeout = "10s"

[callers]
auth = "none"

[taxonomy]
required_tags = ["Team", "CostCenter"]
[taxonomy.allowed_values]
Environment = ["Production", "Development"]
{projects}
"#,
        addr = mock.mock.addr
    );
    std::fs::write(&path, text).unwrap();
    path
}

struct Ran {
    code: i32,
    stdout: String,
    stderr: String,
}

async fn mantlegate(args: &[&str], config: &Path, env: &[(&str, &str)]) -> Ran {
    let mut command = Command::new(BIN);
    command.args(args).arg("--config").arg(config).env(KEY_ENV, KEY).env_remove("MANTLEGATE_LOG");
    for (name, value) in env {
        command.env(name, value);
    }
    let out = tokio::time::timeout(Duration::from_secs(30), command.output()).await.expect("it ends").unwrap();
    let ran = Ran {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    };
    assert!(!ran.stdout.contains(KEY) && !ran.stderr.contains(KEY), "the key leaked:\n{}\n{}", ran.stdout, ran.stderr);
    ran
}

async fn plan(config: &Path, extra: &[&str]) -> Ran {
    mantlegate(&[&["projects", "plan"], extra].concat(), config, &[]).await
}

#[tokio::test]
async fn from_empty_every_project_is_to_be_created() {
    let api = MockApi::start(vec![]).await;
    let path = config(
        "empty",
        &api,
        r#"
[[projects]]
name = "Chat"
tags = { Team = "chat", CostCenter = "CC-1" }
[[projects]]
name = "Search"
tags = { Team = "search", CostCenter = "CC-2" }
"#,
    );
    let ran = plan(&path, &[]).await;
    assert_eq!(ran.code, 2, "{}{}", ran.stdout, ran.stderr);
    assert!(ran.stdout.contains("+ Chat: create\n    with tags CostCenter=\"CC-1\" Team=\"chat\""), "{}", ran.stdout);
    assert!(ran.stdout.contains("+ Search: create"), "{}", ran.stdout);
    assert!(ran.stdout.contains("2 to create, 0 to update, 0 to archive, 0 unchanged, 0 blocked"), "{}", ran.stdout);
    assert_eq!(api.calls(), ["GET /v1/organization/projects?limit=100"]);
    // The configured credential, and every call logged on stderr (never the key: `mantlegate` checks).
    assert_eq!(api.mock.next().await.header("authorization"), Some(format!("Bearer {KEY}").as_str()));
    assert!(
        ran.stderr.contains("projects API call method=GET path=/v1/organization/projects?limit=100 status=200"),
        "{}",
        ran.stderr
    );
}

#[tokio::test]
async fn when_upstream_matches_there_is_nothing_to_do() {
    let api =
        MockApi::start(vec![project("proj_chat", "Chat", TEAM_A), project("proj_search", "Search", TEAM_A)]).await;
    let path = config(
        "matches",
        &api,
        r#"
[[projects]]
name = "Chat"
id = "proj_chat"
tags = { Team = "a", CostCenter = "CC-1" }
[[projects]]
name = "Search"
tags = { Team = "a", CostCenter = "CC-1" }
"#,
    );
    let ran = plan(&path, &[]).await;
    assert_eq!(ran.code, 0, "{}{}", ran.stdout, ran.stderr);
    assert!(ran.stdout.contains("= Chat (proj_chat, matched by id): nothing to do"), "{}", ran.stdout);
    assert!(ran.stdout.contains("= Search (proj_search, matched by name): nothing to do"), "{}", ran.stdout);
    assert!(ran.stdout.contains("note: set id = \"proj_search\""), "{}", ran.stdout);
    assert!(!ran.stdout.contains("not in the config"), "{}", ran.stdout);
}

#[tokio::test]
async fn tag_drift_is_added_and_corrected_and_unlisted_tags_are_kept_unless_asked() {
    let drifted = project("proj_chat", "Chat", &[("Team", "old"), ("Owner", "bob")]);
    let api = MockApi::start(vec![drifted, project("proj_other", "Other", &[("Team", "x")])]).await;
    let path = config(
        "drift",
        &api,
        r#"
[[projects]]
name = "Chat"
id = "proj_chat"
tags = { Team = "a", CostCenter = "CC-1" }
"#,
    );
    let ran = plan(&path, &[]).await;
    assert_eq!(ran.code, 2, "{}{}", ran.stdout, ran.stderr);
    for line in [
        "~ Chat (proj_chat, matched by id): update",
        "    add tag CostCenter = \"CC-1\"",
        "    correct tag Team: \"old\" -> \"a\"",
        "    tag Owner = \"bob\" is not in the config: unlisted, kept",
        "Upstream projects not in the config (1;",
        "  proj_other \"Other\" active Team=\"x\"",
    ] {
        assert!(ran.stdout.contains(line), "{line:?} in\n{}", ran.stdout);
    }
    assert!(!ran.stdout.contains("remove tag"), "{}", ran.stdout);

    // The same as JSON, and with the removal asked for.
    let ran = plan(&path, &["--format", "json", "--remove-unlisted-tags"]).await;
    assert_eq!(ran.code, 2, "{}{}", ran.stdout, ran.stderr);
    let json: serde_json::Value = serde_json::from_str(&ran.stdout).expect("the plan is JSON");
    let chat = &json["projects"][0];
    assert_eq!(chat["action"], "update");
    assert_eq!(chat["matched_by"], "id");
    assert_eq!(chat["add_tags"], serde_json::json!({"CostCenter": "CC-1"}));
    assert_eq!(chat["correct_tags"], serde_json::json!({"Team": {"from": "old", "to": "a"}}));
    assert_eq!(chat["remove_tag_keys"], serde_json::json!(["Owner"]));
    assert_eq!(chat["unlisted_tags_kept"], serde_json::json!({}));
    assert_eq!(json["not_in_config"][0]["id"], "proj_other");
}

#[tokio::test]
async fn two_upstream_projects_of_one_name_are_refused_naming_both() {
    let api = MockApi::start(vec![project("proj_one", "Chat", TEAM_A), project("proj_two", "Chat", TEAM_A)]).await;
    let path =
        config("duplicate", &api, "[[projects]]\nname = \"Chat\"\ntags = { Team = \"a\", CostCenter = \"CC-1\" }\n");
    let ran = plan(&path, &[]).await;
    assert_eq!(ran.code, 1, "{}{}", ran.stdout, ran.stderr);
    assert!(
        ran.stdout.contains("problem: upstream has 2 projects named \"Chat\" (proj_one, proj_two)"),
        "{}",
        ran.stdout
    );
}

#[tokio::test]
async fn archived_and_missing_ids_are_reported() {
    let mut archived = project("proj_old", "Old", TEAM_A);
    archived.status = "archived".into();
    let api = MockApi::start(vec![]).await.with(|api| api.archived = vec![archived]);
    let path = config(
        "archived",
        &api,
        r#"
[[projects]]
name = "Old"
id = "proj_old"
tags = { Team = "a", CostCenter = "CC-1" }
[[projects]]
name = "Gone"
id = "proj_gone"
tags = { Team = "a", CostCenter = "CC-1" }
"#,
    );
    let ran = plan(&path, &[]).await;
    assert_eq!(ran.code, 1, "{}{}", ran.stdout, ran.stderr);
    assert!(
        ran.stdout.contains("! Old (proj_old, matched by id): blocked\n    problem: proj_old is archived"),
        "{}",
        ran.stdout
    );
    assert!(
        ran.stdout.contains("! Gone (proj_gone): blocked\n    problem: proj_gone does not exist upstream"),
        "{}",
        ran.stdout
    );
    assert!(ran.stderr.contains("error: 2 problem(s) no apply can fix"), "{}", ran.stderr);
    // Not in the list, so each was asked for by id.
    assert_eq!(
        api.calls(),
        [
            "GET /v1/organization/projects?limit=100",
            "GET /v1/organization/projects/proj_old",
            "GET /v1/organization/projects/proj_gone"
        ]
    );
}

#[tokio::test]
async fn a_taxonomy_violation_stops_before_any_call() {
    let api = MockApi::start(vec![]).await;
    let path = config(
        "taxonomy",
        &api,
        r#"
[[projects]]
name = "Chat"
tags = { Team = "a", Environment = "prod" }
[[projects]]
name = "Search"
tags = { CostCenter = "CC-1" }
"#,
    );
    for command in ["plan", "import"] {
        let ran = mantlegate(&["projects", command], &path, &[]).await;
        assert_eq!(ran.code, 1, "{}{}", ran.stdout, ran.stderr);
        for violation in [
            "projects[0].tags.CostCenter: missing",
            "projects[0].tags.Environment: \"prod\" is not one of Production, Development",
            "projects[1].tags.Team: missing",
        ] {
            assert!(ran.stderr.contains(violation), "{violation:?} in\n{}", ran.stderr);
        }
    }
    assert_eq!(api.mock.hits(), 0, "nothing may be sent: {:?}", api.calls());
}

#[tokio::test]
async fn the_list_is_read_across_pages() {
    let listed: Vec<UpstreamProject> =
        (1..=5).map(|i| project(&format!("proj_{i}"), &format!("P{i}"), TEAM_A)).collect();
    let api = MockApi::start(listed).await.with(|api| api.page_size = 2);
    let projects: String = (1..=5)
        .map(|i| format!("[[projects]]\nname = \"P{i}\"\ntags = {{ Team = \"a\", CostCenter = \"CC-1\" }}\n"))
        .collect();
    let path = config("pages", &api, &projects);
    let ran = plan(&path, &[]).await;
    assert_eq!(ran.code, 0, "{}{}", ran.stdout, ran.stderr);
    assert!(ran.stdout.contains("(5 listed upstream)") && ran.stdout.contains("= P5 (proj_5, matched by name)"));
    assert_eq!(
        api.calls(),
        [
            "GET /v1/organization/projects?limit=100",
            "GET /v1/organization/projects?limit=100&after=proj_2",
            "GET /v1/organization/projects?limit=100&after=proj_4"
        ]
    );
}

#[tokio::test]
async fn a_repeated_page_stops_the_listing_with_a_clear_error() {
    let api = MockApi::start(vec![project("proj_1", "P1", TEAM_A), project("proj_2", "P2", TEAM_A)])
        .await
        .with(|api| api.pages = Pages::Repeating);
    let path = config("repeat", &api, "[[projects]]\nname = \"P1\"\ntags = { Team = \"a\", CostCenter = \"CC-1\" }\n");
    let ran = plan(&path, &[]).await;
    assert_eq!(ran.code, 1, "{}{}", ran.stdout, ran.stderr);
    assert!(
        ran.stderr.contains("page 2 of the project list repeats proj_1, already listed")
            && ran.stderr.contains("does not seem to honour `after`"),
        "{}",
        ran.stderr
    );
    assert_eq!(api.mock.hits(), 2);
    assert!(ran.stdout.is_empty(), "no plan from a broken listing: {}", ran.stdout);
}

#[tokio::test]
async fn a_page_that_moves_the_listing_on_by_nothing_stops_it() {
    let api = MockApi::start(vec![project("proj_1", "P1", TEAM_A)]).await.with(|api| api.pages = Pages::Stuck);
    let path = config("stuck", &api, "[[projects]]\nname = \"P1\"\ntags = { Team = \"a\", CostCenter = \"CC-1\" }\n");
    let ran = plan(&path, &[]).await;
    assert_eq!(ran.code, 1, "{}{}", ran.stdout, ran.stderr);
    assert!(ran.stderr.contains("continues after proj_1 again"), "{}", ran.stderr);
    assert_eq!(api.mock.hits(), 2, "the first page, then one that stays after proj_1");
}

#[tokio::test]
async fn a_403_names_the_iam_action_likely_missing_and_is_not_retried() {
    let api = MockApi::start(vec![]).await.with(|api| api.fail_first = [403].into());
    let path =
        config("forbidden", &api, "[[projects]]\nname = \"P1\"\ntags = { Team = \"a\", CostCenter = \"CC-1\" }\n");
    let ran = plan(&path, &[]).await;
    assert_eq!(ran.code, 1, "{}{}", ran.stdout, ran.stderr);
    assert!(
        ran.stderr.contains(
            "403 Forbidden: \"mock says AccessDeniedException\": the credential may not list projects; \
                             likely missing: bedrock-mantle:ListProjects"
        ),
        "{}",
        ran.stderr
    );
    assert_eq!(api.mock.hits(), 1);
}

#[tokio::test]
async fn the_mock_takes_only_the_configured_key_and_api_key_env_replaces_it() {
    let api = MockApi::start(vec![]).await;
    let path =
        config("admin-key", &api, "[[projects]]\nname = \"P1\"\ntags = { Team = \"a\", CostCenter = \"CC-1\" }\n");
    // Another key: refused, and the message says where the key came from.
    let ran =
        mantlegate(&["projects", "plan", "--api-key-env", "OTHER_KEY"], &path, &[("OTHER_KEY", "wrong-key")]).await;
    assert_eq!(ran.code, 1, "{}{}", ran.stdout, ran.stderr);
    assert!(ran.stderr.contains("upstream refused the credential (401 Unauthorized"), "{}", ran.stderr);
    assert!(ran.stderr.contains("check the admin key in the environment variable OTHER_KEY"), "{}", ran.stderr);
    assert!(!ran.stderr.contains("wrong-key"), "{}", ran.stderr);
    // The admin key, with the gateway's own unset.
    let ran = mantlegate(
        &["projects", "plan", "--api-key-env", "ADMIN_KEY"],
        &path,
        &[("ADMIN_KEY", KEY), (KEY_ENV, "not-the-key")],
    )
    .await;
    assert_eq!(ran.code, 2, "{}{}", ran.stdout, ran.stderr);
    let ran = mantlegate(&["projects", "plan", "--api-key-env", "UNSET_KEY"], &path, &[]).await;
    assert!(ran.code == 1 && ran.stderr.contains("environment variable UNSET_KEY is not set"), "{}", ran.stderr);
}

#[tokio::test]
async fn with_sigv4_every_call_is_signed() {
    let api = MockApi::start(vec![project("proj_1", "P1", TEAM_A)]).await.with(|api| {
        api.expect = Expect::SigV4("AKIDPROJECTSMOCK");
        api.page_size = 1;
    });
    let path = config("sigv4", &api, "[[projects]]\nname = \"P1\"\ntags = { Team = \"a\", CostCenter = \"CC-1\" }\n");
    let text = std::fs::read_to_string(&path).unwrap().replace(
        &format!("auth = \"api_key\"\napi_key_env = \"{KEY_ENV}\""),
        "auth = \"sigv4\"\nregion = \"us-east-1\"",
    );
    std::fs::write(&path, text).unwrap();
    let env = [
        ("AWS_ACCESS_KEY_ID", "AKIDPROJECTSMOCK"),
        ("AWS_SECRET_ACCESS_KEY", "projects-mock-secret"),
        ("AWS_CONFIG_FILE", "/nonexistent"),
        ("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ];
    let ran = mantlegate(&["projects", "plan"], &path, &env).await;
    assert_eq!(ran.code, 0, "{}{}", ran.stdout, ran.stderr);
    assert!(!ran.stderr.contains("projects-mock-secret"));
}

#[tokio::test]
async fn import_prints_stanzas_that_load_as_config_and_flags_taxonomy_breaks() {
    let api = MockApi::start(vec![
        project("proj_known", "Known", TEAM_A),
        project(
            "proj_mkt",
            "Marketing \"EU\"",
            &[("Team", "mkt"), ("CostCenter", "CC-9"), ("Environment", "Production")],
        ),
        project("proj_data", "Data", &[("Team", "data"), ("CostCenter", "CC-7"), ("cost center", "x")]),
    ])
    .await;
    let known = "[[projects]]\nname = \"Known\"\nid = \"proj_known\"\ntags = { Team = \"a\", CostCenter = \"CC-1\" }\n";
    let path = config("import", &api, known);
    let ran = mantlegate(&["projects", "import"], &path, &[]).await;
    assert_eq!(ran.code, 0, "{}{}", ran.stdout, ran.stderr);
    assert!(!ran.stdout.contains("# FIX: "), "{}", ran.stdout);
    let parsed: toml::Value = toml::from_str(&ran.stdout).expect("import prints TOML");
    let projects = parsed["projects"].as_array().unwrap();
    assert_eq!(projects.len(), 2, "{}", ran.stdout);
    assert_eq!(projects[0]["name"].as_str(), Some("Marketing \"EU\""));
    assert_eq!(projects[1]["tags"]["cost center"].as_str(), Some("x"));

    // Pasted into the config, it passes `check`, and the plan then has nothing to do.
    let text = std::fs::read_to_string(&path).unwrap() + &ran.stdout;
    std::fs::write(&path, text).unwrap();
    let checked = mantlegate(&["check"], &path, &[]).await;
    assert_eq!(checked.code, 0, "{}{}", checked.stdout, checked.stderr);
    assert!(checked.stdout.contains("proj_mkt") && checked.stdout.contains("proj_data"), "{}", checked.stdout);
    let ran = plan(&path, &[]).await;
    assert_eq!(ran.code, 0, "{}{}", ran.stdout, ran.stderr);

    // An upstream project that breaks the taxonomy is printed, flagged.
    api.api.lock().unwrap().listed.push(project("proj_bad", "Bad", &[("Team", "x"), ("Environment", "prod")]));
    let ran = mantlegate(&["projects", "import"], &path, &[]).await;
    assert!(
        ran.stdout.contains(
            "# FIX: tags.CostCenter: missing\n# FIX: tags.Environment: \"prod\" is not one of Production, Development\n\
             [[projects]]\nname = \"Bad\"\nid = \"proj_bad\""
        ),
        "{}",
        ran.stdout
    );
    toml::from_str::<toml::Value>(&ran.stdout).expect("flagged stanzas are TOML too");
}

/// A client of the mock, with `retry` and `paging` as a test needs them.
fn client(api: &MockApi, retry: Retry, paging: Paging) -> ProjectsClient {
    let config = mantlegate::Config::from_toml(&format!(
        "[upstream]\nbase_url = \"http://{}\"\n[callers]\nauth = \"none\"\n[[projects]]\nname = \"A\"\ntags = {{}}\n",
        api.mock.addr
    ))
    .unwrap();
    let credential = Credential::api_key(&Secret::new(KEY.into())).unwrap();
    let mut client = ProjectsClient::new(&config.upstream, credential, "check the key").unwrap();
    client.retry = retry;
    client.paging = paging;
    client
}

const FAST: Retry = Retry { attempts: 3, base: Duration::from_millis(1), max: Duration::from_millis(4) };

#[tokio::test]
async fn a_5xx_or_429_is_retried_with_backoff_a_bounded_number_of_times() {
    let api =
        MockApi::start(vec![project("proj_1", "P1", TEAM_A)]).await.with(|api| api.fail_first = [500, 429].into());
    let listed = client(&api, FAST, Paging::default()).list().await.expect("the third attempt succeeds");
    assert_eq!(listed, [project("proj_1", "P1", TEAM_A)]);
    assert_eq!(api.mock.hits(), 3);

    let api = MockApi::start(vec![]).await.with(|api| api.fail_first = [503, 503, 503, 503].into());
    let error = client(&api, FAST, Paging::default()).list().await.expect_err("it gives up");
    assert_eq!(
        error.to_string(),
        "GET /v1/organization/projects?limit=100: 503 Service Unavailable: \"mock says mock_failure\" \
         (gave up after 3 attempts)"
    );
    assert_eq!(api.mock.hits(), 3);

    // A get answered 404 is not retried: the project does not exist.
    let api = MockApi::start(vec![]).await;
    assert_eq!(client(&api, FAST, Paging::default()).get("proj_none").await.unwrap(), None);
    assert_eq!(api.mock.hits(), 1);
}

#[tokio::test]
async fn pages_that_never_end_are_stopped() {
    let api = MockApi::start(vec![]).await.with(|api| {
        api.pages = Pages::Endless;
        api.page_size = 3;
    });
    let error = client(&api, FAST, Paging { limit: 3, max_pages: 5 }).list().await.expect_err("stopped");
    assert!(
        error.to_string().contains("still had more after 5 pages (15 projects; an account holds at most 1,000)"),
        "{error:#}"
    );
    assert_eq!(api.mock.hits(), 5);
}

async fn apply(config: &Path, extra: &[&str]) -> Ran {
    mantlegate(&[&["projects", "apply"], extra].concat(), config, &[]).await
}

/// Three projects without ids: the config of the apply tests.
const THREE: &str = r#"
[[projects]]
name = "Chat"
tags = { Team = "chat", CostCenter = "CC-1" }
[[projects]]
name = "Search"
tags = { Team = "search", CostCenter = "CC-2" }
[[projects]]
name = "Docs"
tags = { Team = "docs", CostCenter = "CC-3", Environment = "Production" }
"#;

fn tags(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn lock_beside(config: &Path) -> toml::Value {
    let text = std::fs::read_to_string(config.with_file_name("projects.lock.toml")).expect("a lock file");
    toml::from_str(&text).expect("the lock file is TOML")
}

#[tokio::test]
async fn apply_from_empty_creates_every_project_with_its_tags_and_a_second_run_has_nothing_to_do() {
    let api = MockApi::start(vec![]).await;
    let path = config("apply-empty", &api, THREE);
    let ran = apply(&path, &["--yes"]).await;
    assert_eq!(ran.code, 0, "{}{}", ran.stdout, ran.stderr);
    assert_eq!(
        api.writes(),
        ["POST /v1/organization/projects", "POST /v1/organization/projects", "POST /v1/organization/projects"]
    );
    let upstream = api.upstream();
    assert_eq!(upstream["proj_1"].name, "Chat");
    assert_eq!(upstream["proj_1"].tags, tags(&[("Team", "chat"), ("CostCenter", "CC-1")]));
    assert_eq!(upstream["proj_3"].tags["Environment"], "Production");
    assert!(ran.stdout.contains("done: Chat: created proj_1 with 2 tags"), "{}", ran.stdout);
    assert!(ran.stdout.contains("Applied: 3 projects changed."), "{}", ran.stdout);
    // Every call logged, the create's body never.
    assert!(ran.stderr.contains("method=POST path=/v1/organization/projects status=200"), "{}", ran.stderr);

    // The lock file beside the config: each name's id, for this upstream.
    let lock = lock_beside(&path);
    assert_eq!(lock["upstream"].as_str(), Some(api.mock.addr.to_string().as_str()));
    let entries: Vec<(&str, &str)> = lock["projects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap(), e["id"].as_str().unwrap()))
        .collect();
    assert_eq!(entries, [("Chat", "proj_1"), ("Search", "proj_2"), ("Docs", "proj_3")]);

    // Again: nothing to do, and not one write.
    let before = api.calls().len();
    let ran = apply(&path, &["--yes"]).await;
    assert_eq!(ran.code, 0, "{}{}", ran.stdout, ran.stderr);
    assert!(ran.stdout.contains("Nothing to do"), "{}", ran.stdout);
    assert_eq!(api.calls()[before..], ["GET /v1/organization/projects?limit=100"]);
    assert_eq!(plan(&path, &[]).await.code, 0);

    // `check` reads the ids from the lock file.
    let checked = mantlegate(&["check"], &path, &[]).await;
    assert_eq!(checked.code, 0, "{}{}", checked.stdout, checked.stderr);
    assert!(checked.stdout.contains("proj_2 (from projects.lock.toml)"), "{}", checked.stdout);
    assert!(!checked.stdout.contains("no id yet"), "{}", checked.stdout);
}

#[tokio::test]
async fn a_project_keeps_the_id_its_lock_records_whatever_its_name_since() {
    let api = MockApi::start(vec![]).await;
    let path = config("apply-renamed", &api, THREE);
    assert_eq!(apply(&path, &["--yes"]).await.code, 0);
    let before = api.writes().len();

    // Renamed in the config: the same upstream project (the lock's id), renamed only when asked; never a second one.
    let text = std::fs::read_to_string(&path).unwrap().replace("name = \"Chat\"", "name = \"Chat2\"");
    std::fs::write(&path, text).unwrap();
    std::fs::write(
        path.with_file_name("projects.lock.toml"),
        std::fs::read_to_string(path.with_file_name("projects.lock.toml")).unwrap().replace("\"Chat\"", "\"Chat2\""),
    )
    .unwrap();
    let planned = plan(&path, &[]).await;
    assert!(!planned.stdout.contains(": create"), "{}", planned.stdout);
    let ran = apply(&path, &["--yes", "--rename"]).await;
    assert_eq!(ran.code, 0, "{}{}", ran.stdout, ran.stderr);
    assert_eq!(api.writes()[before..], ["POST /v1/organization/projects/proj_1"], "a rename, not a create");
    assert_eq!(api.upstream()["proj_1"].name, "Chat2");
    assert_eq!(api.upstream().len(), 3);

    // Renamed upstream, and another project made under the old name: the lock's id still wins.
    {
        let mut upstream = api.api.lock().unwrap();
        let search = upstream.listed.iter_mut().find(|p| p.id == "proj_2").expect("proj_2");
        search.name = "Search (old)".into();
        upstream.listed.push(project("proj_9", "Search", &[("Team", "someone-else")]));
    }
    let planned = plan(&path, &["--format", "json"]).await;
    let planned: serde_json::Value = serde_json::from_str(&planned.stdout).expect("JSON");
    let ids: Vec<&str> = planned["projects"].as_array().unwrap().iter().map(|p| p["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["proj_1", "proj_2", "proj_3"], "{planned}");
    let ran = apply(&path, &["--yes", "--remove-unlisted-tags"]).await;
    assert_eq!(ran.code, 0, "{}{}", ran.stdout, ran.stderr);
    assert_eq!(api.upstream()["proj_9"].tags, tags(&[("Team", "someone-else")]), "another's project untouched");

    // A lock file written for another upstream is neither used nor overwritten.
    let lock = path.with_file_name("projects.lock.toml");
    let foreign = std::fs::read_to_string(&lock).unwrap().replace(&api.mock.addr.to_string(), "elsewhere.example:443");
    std::fs::write(&lock, &foreign).unwrap();
    let ran = apply(&path, &["--yes"]).await;
    assert_eq!(ran.code, 1, "{}{}", ran.stdout, ran.stderr);
    assert!(ran.stderr.contains("was written for elsewhere.example:443"), "{}", ran.stderr);
    assert_eq!(std::fs::read_to_string(&lock).unwrap(), foreign);
}

#[tokio::test]
async fn serve_takes_ids_from_the_lock_file_and_refuses_to_start_without_one() {
    let api = MockApi::start(vec![]).await;
    let path = config("apply-serve", &api, THREE);
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, format!("[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n{text}"))
        .unwrap();

    let refused = mantlegate(&["serve"], &path, &[]).await;
    assert_eq!(refused.code, 1, "{}{}", refused.stdout, refused.stderr);
    assert!(
        refused.stderr.contains("projects without an id cannot receive traffic: Chat, Search, Docs")
            && refused.stderr.contains("run `mantlegate projects apply`"),
        "{}",
        refused.stderr
    );

    assert_eq!(apply(&path, &["--yes"]).await.code, 0);
    let mut served = common::binary::serve(&path, &[(KEY_ENV, KEY)]).await;
    let search_goes_as = async |served: &common::binary::Served| {
        let response = reqwest::Client::new()
            .post(format!("http://{}/v1/chat/completions", served.addr))
            .header("openai-project", "Search")
            .body(r#"{"model":"m","messages":[]}"#)
            .send()
            .await
            .unwrap();
        let _ = response.bytes().await;
        loop {
            let seen = api.mock.next().await;
            if seen.uri.path() == "/v1/chat/completions" {
                return seen.header("openai-project").map(str::to_owned);
            }
        }
    };
    // The request went upstream with the id the lock file gave Search.
    assert_eq!(search_goes_as(&served).await.as_deref(), Some("proj_2"));

    // A new lock file alone (written as apply writes it: a file renamed over it) is reloaded.
    let lock = path.with_file_name("projects.lock.toml");
    let text = std::fs::read_to_string(&lock).unwrap().replace("\"proj_2\"", "\"proj_9\"");
    let temp = path.with_file_name(".projects.lock.toml.test.tmp");
    std::fs::write(&temp, text).unwrap();
    std::fs::rename(&temp, &lock).unwrap();
    served.wait_for("config reloaded", |v| v["message"] == "config reloaded; new requests use it").await;
    assert_eq!(search_goes_as(&served).await.as_deref(), Some("proj_9"));
    drop(served);
}

#[tokio::test]
async fn tag_drift_is_corrected_and_unlisted_tags_are_kept_unless_asked() {
    let api = MockApi::start(vec![project("proj_chat", "Chat", &[("Team", "old"), ("Owner", "bob")])]).await;
    let path = config(
        "apply-drift",
        &api,
        "[[projects]]\nname = \"Chat\"\nid = \"proj_chat\"\ntags = { Team = \"chat\", CostCenter = \"CC-1\" }\n",
    );
    let ran = apply(&path, &["--yes"]).await;
    assert_eq!(ran.code, 0, "{}{}", ran.stdout, ran.stderr);
    assert_eq!(api.writes(), ["POST /v1/organization/projects/proj_chat"]);
    assert_eq!(api.upstream()["proj_chat"].tags, tags(&[("Team", "chat"), ("CostCenter", "CC-1"), ("Owner", "bob")]));
    assert!(!path.with_file_name("projects.lock.toml").exists(), "every project has its id in the config");

    assert!(apply(&path, &["--yes"]).await.stdout.contains("Nothing to do"));
    let ran = apply(&path, &["--yes", "--remove-unlisted-tags"]).await;
    assert_eq!(ran.code, 0, "{}{}", ran.stdout, ran.stderr);
    assert_eq!(api.upstream()["proj_chat"].tags, tags(&[("Team", "chat"), ("CostCenter", "CC-1")]));
    assert!(ran.stdout.contains("done: Chat: proj_chat: removed tag Owner"), "{}", ran.stdout);
    assert_eq!(api.writes().len(), 2);
}

#[tokio::test]
async fn a_rename_only_with_the_flag_and_archived_projects_are_archived() {
    let api = MockApi::start(vec![project("proj_a", "Old name", TEAM_A), project("proj_b", "Retired", TEAM_A)]).await;
    let path = config(
        "apply-archive",
        &api,
        r#"
[[projects]]
name = "A"
id = "proj_a"
tags = { Team = "a", CostCenter = "CC-1" }
[[projects]]
name = "Retired"
id = "proj_b"
archived = true
tags = { Team = "a", CostCenter = "CC-1" }
"#,
    );
    // Matched only by name, a project is never archived: it may be another's of the same name.
    let by_name = std::fs::read_to_string(&path).unwrap().replace("id = \"proj_b\"\n", "");
    let guessed = path.with_file_name("by-name.toml");
    std::fs::write(&guessed, by_name).unwrap();
    let ran = apply(&guessed, &["--yes"]).await;
    assert_eq!(ran.code, 1, "{}{}", ran.stdout, ran.stderr);
    assert!(ran.stdout.contains("proj_b matches only by name: set its `id` to archive it"), "{}", ran.stdout);
    assert_eq!(api.writes(), Vec::<String>::new());

    let ran = apply(&path, &["--yes"]).await;
    assert_eq!(ran.code, 0, "{}{}", ran.stdout, ran.stderr);
    assert!(ran.stdout.contains("- Retired (proj_b, matched by id): archive"), "{}", ran.stdout);
    assert_eq!(api.writes(), ["POST /v1/organization/projects/proj_b/archive"]);
    assert_eq!(api.upstream()["proj_b"].status, "archived");
    assert_eq!(api.upstream()["proj_a"].name, "Old name");

    let ran = apply(&path, &["--yes", "--rename"]).await;
    assert_eq!(ran.code, 0, "{}{}", ran.stdout, ran.stderr);
    assert_eq!(api.upstream()["proj_a"].name, "A");
    assert_eq!(api.writes().len(), 2, "the archived project is left alone: {:?}", api.writes());
    assert!(apply(&path, &["--yes", "--rename"]).await.stdout.contains("Nothing to do"));
}

#[tokio::test]
async fn a_500_mid_run_is_reported_precisely_and_the_lock_holds_what_was_done() {
    let api =
        MockApi::start(vec![]).await.with(|api| api.fail_on = Some(("POST /v1/organization/projects".into(), 2, 500)));
    let path = config("apply-partial", &api, THREE);
    let ran = apply(&path, &["--yes"]).await;
    assert_eq!(ran.code, 1, "{}{}", ran.stdout, ran.stderr);
    for line in [
        "Apply stopped at a failure: 1 of 3 projects done, 1 failed, 1 not attempted.",
        "  done: Chat: created proj_1 with 2 tags",
        "  failed: Search: it may or may not have been created: `mantlegate projects plan` shows whether: POST \
         /v1/organization/projects: 500 Internal Server Error: \"mock says mock_failure\"",
        "  not attempted: Docs",
    ] {
        assert!(ran.stdout.contains(line), "{line:?} in\n{}", ran.stdout);
    }
    assert!(
        ran.stderr.contains("error: apply stopped at a failure: 1 done, 1 failed, 1 not attempted"),
        "{}",
        ran.stderr
    );
    // The create was not sent again after the 500.
    assert_eq!(api.writes(), ["POST /v1/organization/projects", "POST /v1/organization/projects"]);
    let lock = lock_beside(&path);
    assert_eq!(lock["projects"].as_array().unwrap().len(), 1, "{lock}");
    assert_eq!(
        (lock["projects"][0]["name"].as_str(), lock["projects"][0]["id"].as_str()),
        (Some("Chat"), Some("proj_1"))
    );

    // The next run does the rest.
    let ran = apply(&path, &["--yes"]).await;
    assert_eq!(ran.code, 0, "{}{}", ran.stdout, ran.stderr);
    assert!(ran.stdout.contains("= Chat (proj_1, matched by id): nothing to do"), "the lock's id: {}", ran.stdout);
    assert_eq!(lock_beside(&path)["projects"].as_array().unwrap().len(), 3);
}

#[tokio::test]
async fn without_yes_and_no_terminal_apply_refuses_and_writes_nothing() {
    let api = MockApi::start(vec![]).await;
    let path = config("apply-no-tty", &api, THREE);
    let ran = apply(&path, &[]).await;
    assert_eq!(ran.code, 1, "{}{}", ran.stdout, ran.stderr);
    assert!(ran.stdout.contains("+ Chat: create"), "the plan is shown: {}", ran.stdout);
    assert!(ran.stderr.contains("stdin is not a terminal") && ran.stderr.contains("--yes"), "{}", ran.stderr);
    assert!(api.writes().is_empty(), "{:?}", api.writes());
    assert!(!path.with_file_name("projects.lock.toml").exists());
}

#[tokio::test]
async fn a_blocked_plan_is_not_applied() {
    let api = MockApi::start(vec![project("proj_one", "Chat", TEAM_A), project("proj_two", "Chat", TEAM_A)]).await;
    let path = config("apply-blocked", &api, THREE);
    let ran = apply(&path, &["--yes"]).await;
    assert_eq!(ran.code, 1, "{}{}", ran.stdout, ran.stderr);
    assert!(ran.stdout.contains("problem: upstream has 2 projects named \"Chat\""), "{}", ran.stdout);
    assert!(ran.stderr.contains("error: not applied: 1 problem(s)"), "{}", ran.stderr);
    assert!(api.writes().is_empty(), "{:?}", api.writes());
}

/// The config `config` writes, served on port 0, with `upstream` (TOML lines) added to its `[upstream]`.
fn served_config(name: &str, api: &MockApi, upstream: &str, projects: &str) -> PathBuf {
    let path = config(name, api, projects);
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("response_timeout = \"10s\"\n", &format!("response_timeout = \"10s\"\n{upstream}"));
    std::fs::write(&path, format!("[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n{text}"))
        .unwrap();
    path
}

/// Reads the admin listener's `/metrics` until every one of `lines` is in it, for at most 10 s.
async fn metrics_showing(served: &common::binary::Served, lines: &[&str]) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = reqwest::get(format!("http://{}/metrics", served.admin)).await.unwrap().text().await.unwrap();
        if lines.iter().all(|line| text.lines().any(|l| l == *line)) {
            return text;
        }
        assert!(tokio::time::Instant::now() < deadline, "{lines:?} never all appeared in:\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn upstream_status(project: &str, status: &str, value: u8) -> String {
    format!(r#"mantlegate_project_upstream_status{{project="{project}",status="{status}"}} {value}"#)
}

const CHAT_AND_SEARCH: &str = r#"
[[projects]]
name = "Chat"
id = "proj_chat"
tags = { Team = "a", CostCenter = "CC-1" }

[[projects]]
name = "Search"
id = "proj_search"
tags = { Team = "a", CostCenter = "CC-1" }
"#;

#[tokio::test]
async fn the_drift_metric_follows_an_upstream_change() {
    let api = MockApi::start(vec![
        project("proj_chat", "Chat", TEAM_A),
        // Drifted: CostCenter changed upstream.
        project("proj_search", "Search", &[("Team", "a"), ("CostCenter", "CC-9")]),
    ])
    .await;
    let path = served_config("drift", &api, "projects_check_interval = \"200ms\"\n", CHAT_AND_SEARCH);
    let mut served = common::binary::serve(&path, &[(KEY_ENV, KEY)]).await;
    let status = |p: &str, s: &str, v: u8| upstream_status(p, s, v);
    let shown = [
        status("Chat", "active", 1),
        status("Chat", "archived", 0),
        status("Chat", "missing", 0),
        status("Chat", "tags_drifted", 0),
        status("Search", "active", 0),
        status("Search", "tags_drifted", 1),
    ];
    metrics_showing(&served, &shown.iter().map(String::as_str).collect::<Vec<_>>()).await;

    // Someone archives Chat upstream, which the gateway still routes to.
    {
        let mut upstream = api.api.lock().unwrap();
        let at = upstream.listed.iter().position(|p| p.id == "proj_chat").unwrap();
        let mut chat = upstream.listed.remove(at);
        chat.status = "archived".into();
        upstream.archived.push(chat);
    }
    let text = metrics_showing(&served, &[&status("Chat", "archived", 1), &status("Chat", "active", 0)]).await;
    assert!(text.lines().any(|l| l == status("Search", "tags_drifted", 1)), "{text}");
    let warning = served.wait_for("the archived warning", |v| v["level"] == "WARN" && v["project"] == "Chat").await;
    assert_eq!(warning["status"], "archived", "{warning}");
    assert!(warning["message"].as_str().unwrap().contains("not active upstream"), "{warning}");
    // The check found Chat by id once the list no longer showed it, and never went through the proxy.
    let calls = api.calls();
    assert!(calls.iter().any(|c| c == "GET /v1/organization/projects/proj_chat"), "{calls:?}");
    assert!(calls.iter().all(|c| c.starts_with("GET /v1/organization/projects")), "{calls:?}");

    // Warned once per change, not at every check: later checks find Chat still archived and say nothing.
    metrics_showing(&served, &[&status("Chat", "archived", 1)]).await;
    let gets = |calls: &[String]| calls.iter().filter(|c| c.ends_with("/proj_chat")).count();
    let before = gets(&api.calls());
    while gets(&api.calls()) < before + 2 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    served.signal("-TERM").await;
    let rest = served.rest().await;
    let again = rest.iter().filter(|v| v["level"] == "WARN" && v["project"] == "Chat").count();
    assert_eq!(again, 0, "{rest:?}");
}

#[tokio::test]
async fn with_the_check_off_the_projects_api_is_never_called_and_a_reload_turns_it_on_and_off() {
    let api =
        MockApi::start(vec![project("proj_chat", "Chat", TEAM_A), project("proj_search", "Search", TEAM_A)]).await;
    let path = served_config("drift-off", &api, "", CHAT_AND_SEARCH);
    let mut served = common::binary::serve(&path, &[(KEY_ENV, KEY)]).await;
    // A window longer than the task's look at the config (1 s) in which nothing may happen: there is no event
    // to wait for when the point is that none comes.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(api.calls(), Vec::<String>::new());
    let text = reqwest::get(format!("http://{}/metrics", served.admin)).await.unwrap().text().await.unwrap();
    assert!(!text.contains("mantlegate_project_upstream_status"), "{text}");

    // Turned on by a reload: checked at once.
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("[upstream]\n", "[upstream]\nprojects_check_interval = \"1h\"\n");
    std::fs::write(&path, text).unwrap();
    served.wait_for("config reloaded", |v| v["message"] == "config reloaded; new requests use it").await;
    metrics_showing(&served, &[&upstream_status("Chat", "active", 1), &upstream_status("Search", "active", 1)]).await;
    assert!(api.calls().iter().any(|c| c.starts_with("GET /v1/organization/projects?")), "{:?}", api.calls());

    // And off again: the statuses it no longer checks are no longer exported, without waiting out the hour.
    let text = std::fs::read_to_string(&path).unwrap().replace("\"1h\"", "\"0s\"");
    std::fs::write(&path, text).unwrap();
    served.wait_for("config reloaded", |v| v["message"] == "config reloaded; new requests use it").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = reqwest::get(format!("http://{}/metrics", served.admin)).await.unwrap().text().await.unwrap();
        if !text.contains("mantlegate_project_upstream_status") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "still exported:\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
