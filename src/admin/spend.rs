//! The spend page and its API on the admin listener, served from the spend index (`metering::spend`):
//!
//! - `GET /`: the page (HTML, script and stylesheet embedded in the binary; nothing is fetched from elsewhere);
//! - `GET /api/spend?group_by=project|model|key|tag:NAME&since=&until=&format=json|csv` (and `/api/spend.csv`):
//!   totals per group, sorted as `usage report` sorts them, with their sum;
//! - `GET /api/spend/daily?since=&until=&format=`: each UTC day's totals;
//! - `GET /api/status`: the index's state, what it covers, the tags to group by;
//! - `GET /api/live`: requests answered (and 4xx, 5xx) and unattributed since the start, for rates.
//!
//! `since` and `until` are UTC dates (`2026-12-01`) or RFC 3339 times on the hour; `since` is inclusive, `until`
//! exclusive (as Cost Explorer's end date). A parameter the API cannot use is a 400 in OpenAI's error shape.

use std::sync::Arc;
use std::time::SystemTime;

use axum::extract::{RawQuery, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use http::{HeaderValue, header};
use serde::Serialize;

use super::error::AdminError;
use crate::cli::usage::{self, GroupBy, Row};
use crate::limits::window::rfc3339;
use crate::live::Live;
use crate::metering::spend::{Hours, IndexState, Spend, hour_text};

const HOUR_SECS: u64 = 3600;

/// What the handlers share.
#[derive(Clone)]
pub struct Api {
    /// The index.
    pub spend: Arc<Spend>,
    /// The config in force (tags, the reroute project, the replica's name).
    pub live: Arc<Live>,
}

/// The page, its assets and the API.
pub fn routes(api: Api) -> Router {
    Router::new()
        .route("/", get(|| async { page(PAGE, "text/html; charset=utf-8") }))
        .route("/assets/spend.js", get(|| async { page(SCRIPT, "text/javascript; charset=utf-8") }))
        .route("/assets/spend.css", get(|| async { page(STYLE, "text/css; charset=utf-8") }))
        .route("/api/spend", get(spend))
        .route("/api/spend.csv", get(spend_csv))
        .route("/api/spend/daily", get(daily))
        .route("/api/status", get(status))
        .route("/api/live", get(live))
        .with_state(api)
}

const PAGE: &str = include_str!("page/index.html");
const SCRIPT: &str = include_str!("page/spend.js");
const STYLE: &str = include_str!("page/spend.css");

/// An embedded asset. The page loads nothing but its own script and stylesheet, and talks to nothing but this
/// listener: the policy says so to the browser too.
fn page(body: &'static str, content_type: &'static str) -> Response {
    let mut res = body.into_response();
    let headers = res.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; \
             base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        ),
    );
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    res
}

/// The query parameters of a spend request, checked.
#[derive(Debug, PartialEq)]
struct Params {
    group_by: GroupBy,
    hours: Hours,
    csv: bool,
}

fn invalid(param: &'static str, message: impl Into<String>) -> AdminError {
    AdminError::InvalidParam { param, message: message.into() }
}

/// A value as an error may show it: short, and as a string literal.
fn shown(value: &str) -> String {
    let cut: String = value.chars().take(40).collect();
    format!("{cut:?}")
}

/// `group_by`, strictly: `project`, `model`, `key` or `tag:NAME`.
fn parse_group_by(value: &str) -> Result<GroupBy, AdminError> {
    match value {
        "project" => Ok(GroupBy::Project),
        "model" => Ok(GroupBy::Model),
        "key" => Ok(GroupBy::Key),
        _ => match value.strip_prefix("tag:") {
            Some(tag) if !tag.is_empty() => Ok(GroupBy::Tag(tag.to_owned())),
            _ => Err(invalid("group_by", format!("{} is not one of project, model, key, tag:NAME", shown(value)))),
        },
    }
}

/// `since` or `until`: a date or a time on the hour, as an hour since the epoch.
fn parse_hour(param: &'static str, value: &str) -> Result<u32, AdminError> {
    let time = usage::parse_time(value).map_err(|e| invalid(param, e))?;
    let secs = time.duration_since(std::time::UNIX_EPOCH).map_err(|_| invalid(param, "is before 1970"))?.as_secs();
    if secs % HOUR_SECS != 0 {
        return Err(invalid(param, format!("{} is not on the hour: the spend index counts by UTC hour", shown(value))));
    }
    u32::try_from(secs / HOUR_SECS).map_err(|_| invalid(param, "is too far ahead"))
}

/// Reads `query` (`group_by`, `since`, `until`, `format`; anything else is refused, so a misspelt parameter is
/// not silently ignored). Without `since`, from `default_since`; without `until`, `default_until`.
fn parse(
    query: Option<&str>,
    grouped: bool,
    first_hour: u32,
    default_since: u32,
    default_until: Option<u32>,
) -> Result<Params, AdminError> {
    let mut params =
        Params { group_by: GroupBy::Project, hours: Hours { since: default_since, until: default_until }, csv: false };
    for (name, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match &*name {
            "group_by" if grouped => params.group_by = parse_group_by(&value)?,
            "since" => params.hours.since = parse_hour("since", &value)?,
            "until" => params.hours.until = Some(parse_hour("until", &value)?),
            "format" => {
                params.csv = match &*value {
                    "json" => false,
                    "csv" => true,
                    other => return Err(invalid("format", format!("{} is not one of json, csv", shown(other)))),
                }
            }
            _ => {
                let known = if grouped { "group_by, since, until, format" } else { "since, until, format" };
                return Err(invalid("query", format!("unknown parameter {}: use {known}", shown(&name))));
            }
        }
    }
    if params.hours.since < first_hour {
        return Err(invalid(
            "since",
            format!(
                "the spend index holds this replica's ledger from {} on: for earlier spend, run `mantlegate usage \
                 report` on the ledger",
                hour_text(first_hour)
            ),
        ));
    }
    if params.hours.until.is_some_and(|until| until <= params.hours.since) {
        return Err(invalid("until", "must be later than since"));
    }
    Ok(params)
}

/// The hour of `now`, and the first hours of its month and the next.
fn calendar(now: SystemTime) -> (u32, u32, u32) {
    let windows = crate::limits::Windows::at(
        now.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
    );
    let hour = |ms: u64| u32::try_from(ms / (HOUR_SECS * 1000)).unwrap_or(u32::MAX);
    (hour(windows.now_ms), hour(windows.month_start_ms()), hour(windows.month_end_ms()))
}

/// The index's sums can be shown only once the ledger is read.
fn ready(spend: &Spend) -> Result<(), AdminError> {
    match spend.state() {
        IndexState::Ready { .. } => Ok(()),
        IndexState::NoLedger => Err(AdminError::NoLedger),
        IndexState::Reading { lines } => Err(AdminError::Indexing { lines }),
        IndexState::Failed { .. } => Err(AdminError::IndexFailed),
    }
}

#[derive(Serialize)]
struct SpendBody {
    group_by: String,
    since: String,
    until: Option<String>,
    rows: Vec<Row>,
    totals: serde_json::Value,
}

fn group_by_name(group_by: &GroupBy) -> String {
    match group_by {
        GroupBy::Project => "project".into(),
        GroupBy::Model => "model".into(),
        GroupBy::Key => "key".into(),
        GroupBy::Tag(tag) => format!("tag:{tag}"),
    }
}

async fn spend(State(api): State<Api>, RawQuery(query): RawQuery) -> Result<Response, AdminError> {
    grouped(&api, query.as_deref(), false)
}

async fn spend_csv(State(api): State<Api>, RawQuery(query): RawQuery) -> Result<Response, AdminError> {
    grouped(&api, query.as_deref(), true)
}

fn grouped(api: &Api, query: Option<&str>, csv: bool) -> Result<Response, AdminError> {
    let now = SystemTime::now();
    let (_, month, _) = calendar(now);
    let params = parse(query, true, api.spend.first_hour(now), month, None)?;
    ready(&api.spend)?;
    let (rows, total) = api.spend.rows(&params.group_by, params.hours, now);
    let (since, until) = (hour_text(params.hours.since), params.hours.until.map(hour_text));
    if csv || params.csv {
        let text = usage::render(&rows, &params.group_by, "csv").map_err(|_| AdminError::IndexFailed)?;
        let name = format!("spend-{}-{}.csv", group_by_name(&params.group_by), &since[..13]);
        return Ok(csv_response(text, &name));
    }
    let mut totals = serde_json::to_value(total).unwrap_or_default();
    if let Some(totals) = totals.as_object_mut() {
        totals.remove("group");
    }
    let body = SpendBody { group_by: group_by_name(&params.group_by), since, until, rows, totals };
    Ok(no_store(Json(body).into_response()))
}

async fn daily(State(api): State<Api>, RawQuery(query): RawQuery) -> Result<Response, AdminError> {
    let now = SystemTime::now();
    let (_, month, next_month) = calendar(now);
    let params = parse(query.as_deref(), false, api.spend.first_hour(now), month, None)?;
    // The index holds nothing past this month: a range is cut there (the answer has a row per day asked for).
    let until = params.hours.until.unwrap_or(next_month).min(next_month);
    if until <= params.hours.since {
        return Err(invalid("since", format!("must be before {}: nothing later has happened", hour_text(next_month))));
    }
    ready(&api.spend)?;
    let days = api.spend.daily(Hours { since: params.hours.since, until: Some(until) }, now);
    if params.csv {
        let mut text = String::from("day,requests,input_tokens,output_tokens,cost_usd\n");
        for d in &days {
            text.push_str(&format!("{},{},{},{},{}\n", d.day, d.requests, d.input_tokens, d.output_tokens, d.cost_usd));
        }
        return Ok(csv_response(text, &format!("spend-daily-{}.csv", &hour_text(params.hours.since)[..10])));
    }
    let body = serde_json::json!({
        "since": hour_text(params.hours.since),
        "until": hour_text(until),
        "days": days,
    });
    Ok(no_store(Json(body).into_response()))
}

fn csv_response(text: String, name: &str) -> Response {
    let mut res = no_store(text.into_response());
    res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/csv; charset=utf-8"));
    // The name is made here of dates and a group name: keep only what needs no quoting.
    let name: String =
        name.chars().map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '_' }).collect();
    if let Ok(value) = HeaderValue::from_str(&format!("attachment; filename=\"{name}\"")) {
        res.headers_mut().insert(header::CONTENT_DISPOSITION, value);
    }
    res
}

/// Spend is read anew on each request: never from a cache.
fn no_store(mut res: Response) -> Response {
    res.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

async fn status(State(api): State<Api>) -> Response {
    let now = SystemTime::now();
    let (hour, month, next_month) = calendar(now);
    let snapshot = api.live.load();
    let config = &snapshot.config;
    // The tags to group by: the taxonomy's, then any other a configured project carries.
    let mut tags = config.taxonomy.required_tags.clone();
    let mut others: Vec<&String> = config.projects.iter().flat_map(|p| p.tags.keys()).collect();
    others.sort();
    others.dedup();
    tags.extend(others.into_iter().filter(|t| !config.taxonomy.required_tags.contains(t)).cloned());
    let ledger_in_force = config.metering.ledger_path.as_ref().map(|p| p.display().to_string());
    let body = serde_json::json!({
        "replica": config.limits.instance,
        "ledger": api.spend.path().map(|p| p.display().to_string()),
        "ledger_in_force": ledger_in_force,
        "index": api.spend.state(),
        "started": rfc3339(millis(api.spend.started)),
        "now": rfc3339(millis(now)),
        "today": hour_text(hour - hour % 24),
        "month": hour_text(month),
        "next_month": hour_text(next_month),
        "covers_since": hour_text(api.spend.first_hour(now)),
        "tags": tags,
        "reroute_to": match &config.attribution.unattributed {
            crate::config::Unattributed::Reroute(project) => Some(project.as_str()),
            crate::config::Unattributed::Reject => None,
        },
    });
    no_store(Json(body).into_response())
}

async fn live(State(api): State<Api>) -> Response {
    let now = SystemTime::now();
    let (since_start, today) = api.spend.unattributed(now);
    let body = serde_json::json!({
        "now_ms": millis(now),
        "answered": api.spend.answered(),
        "unattributed": { "today": today, "since_start": since_start },
    });
    no_store(Json(body).into_response())
}

fn millis(time: SystemTime) -> u64 {
    time.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hour(text: &str) -> u32 {
        parse_hour("since", text).expect("hour")
    }

    /// What `query` asks for, as of 2026-12-15T12:00Z with the index holding December on.
    fn asked(query: &str) -> Result<Params, AdminError> {
        parse(Some(query), true, hour("2026-12-01"), hour("2026-12-01"), None)
    }

    fn refused(query: &str) -> (&'static str, String) {
        match asked(query) {
            Err(AdminError::InvalidParam { param, message }) => (param, message),
            other => panic!("{query}: {other:?}"),
        }
    }

    #[test]
    fn groupings_and_ranges_are_read() {
        let month = Hours { since: hour("2026-12-01"), until: None };
        assert_eq!(asked(""), Ok(Params { group_by: GroupBy::Project, hours: month, csv: false }));
        for (query, group_by) in [
            ("group_by=model", GroupBy::Model),
            ("group_by=key", GroupBy::Key),
            ("group_by=tag:Team", GroupBy::Tag("Team".into())),
            ("group_by=tag%3ACost%20Center", GroupBy::Tag("Cost Center".into())),
        ] {
            assert_eq!(asked(query).map(|p| p.group_by), Ok(group_by), "{query}");
        }
        let day = asked("since=2026-12-02&until=2026-12-03&format=csv").expect("day");
        assert_eq!(day.hours, Hours { since: hour("2026-12-02"), until: Some(hour("2026-12-03")) });
        assert!(day.csv);
        let hours = asked("since=2026-12-02T15:00:00Z&until=2026-12-02T18:00:00Z").expect("hours");
        assert_eq!(hours.hours.until.map(|u| u - hours.hours.since), Some(3));
    }

    #[test]
    fn a_bad_parameter_is_a_400_naming_it() {
        for (query, param, says) in [
            ("group_by=team", "group_by", "\"team\" is not one of project, model, key, tag:NAME"),
            ("group_by=tag:", "group_by", "is not one of"),
            ("since=yesterday", "since", "is not a UTC date (2026-12-01) or an RFC 3339 time"),
            ("since=2026-12-1", "since", "is not a UTC date"),
            ("until=2026-12-02T15:30:00Z", "until", "is not on the hour"),
            ("since=2026-11-30", "since", "holds this replica's ledger from 2026-12-01T00:00:00Z on"),
            ("since=2026-12-03&until=2026-12-02", "until", "must be later than since"),
            ("since=2026-12-03&until=2026-12-03", "until", "must be later than since"),
            ("format=xml", "format", "\"xml\" is not one of json, csv"),
            ("groupby=project", "query", "unknown parameter \"groupby\""),
        ] {
            let (got, message) = refused(query);
            assert_eq!(got, param, "{query}: {message}");
            assert!(message.contains(says), "{query}: {message}");
        }
        // The daily series takes no grouping.
        let daily = parse(Some("group_by=project"), false, 0, 0, None);
        assert!(matches!(daily, Err(AdminError::InvalidParam { param: "query", .. })), "{daily:?}");
    }

    #[tokio::test]
    async fn a_bad_parameter_is_answered_in_openais_error_shape() {
        let api = Api {
            spend: Spend::start(None, SystemTime::now()),
            live: Arc::new(Live::new(crate::snapshot::tests::snapshot(
                "[callers]\nauth = \"none\"\n[[projects]]\nname = \"A\"\nid = \"proj_a\"",
            ))),
        };
        let app = routes(api);
        let call = |uri: &'static str| {
            let app = app.clone();
            async move {
                let req = http::Request::get(uri).body(axum::body::Body::empty()).expect("request");
                let res = tower_service::Service::call(&mut app.into_service(), req).await.expect("response");
                let status = res.status();
                let body = axum::body::to_bytes(res.into_body(), 1 << 20).await.expect("body");
                (status, serde_json::from_slice::<serde_json::Value>(&body).unwrap_or_default())
            }
        };
        let (status, body) = call("/api/spend?group_by=nonsense").await;
        assert_eq!(status, 400);
        assert_eq!(
            body,
            serde_json::json!({"error": {
                "message": "\"nonsense\" is not one of project, model, key, tag:NAME",
                "type": "invalid_request_error", "param": "group_by", "code": "invalid_request"
            }})
        );
        let (status, body) = call("/api/spend/daily?since=tomorrow").await;
        assert_eq!((status.as_u16(), &body["error"]["param"]), (400, &serde_json::json!("since")));
        let (status, body) = call("/api/spend/daily?since=9999-01-01").await;
        assert_eq!((status.as_u16(), &body["error"]["param"]), (400, &serde_json::json!("since")), "{body}");
        assert!(body["error"]["message"].as_str().is_some_and(|m| m.contains("nothing later")), "{body}");
        // A good question, with no ledger to answer it from.
        let (status, body) = call("/api/spend?group_by=tag:Team").await;
        assert_eq!((status.as_u16(), &body["error"]["code"]), (404, &serde_json::json!("no_ledger")));
        let (status, body) = call("/api/status").await;
        assert_eq!((status.as_u16(), &body["index"]["state"]), (200, &serde_json::json!("no_ledger")));
    }

    #[tokio::test]
    async fn a_daily_series_ends_with_the_month_however_far_it_is_asked_for() {
        let dir = std::env::temp_dir().join(format!("mantlegate-admin-daily-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let ledger = dir.join("usage.jsonl");
        std::fs::write(&ledger, "").expect("ledger");
        let spend = Spend::start(Some(&ledger), SystemTime::now());
        crate::metering::spend::tests::ready(&spend).await;
        let live = Live::new(crate::snapshot::tests::snapshot(
            "[callers]\nauth = \"none\"\n[[projects]]\nname = \"A\"\nid = \"proj_a\"",
        ));
        let app = routes(Api { spend, live: Arc::new(live) });
        let req =
            http::Request::get("/api/spend/daily?until=9999-12-31").body(axum::body::Body::empty()).expect("request");
        let res = tower_service::Service::call(&mut app.into_service(), req).await.expect("response");
        assert_eq!(res.status(), 200);
        let body: serde_json::Value =
            serde_json::from_slice(&axum::body::to_bytes(res.into_body(), 1 << 20).await.expect("body")).expect("json");
        let (_, month, next_month) = calendar(SystemTime::now());
        assert_eq!(body["days"].as_array().map(Vec::len), Some(((next_month - month) / 24) as usize), "{body}");
        assert_eq!(body["until"], hour_text(next_month));
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
