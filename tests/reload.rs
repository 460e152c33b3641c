//! Live configuration: a reload under traffic changes what new requests get, never what requests already in
//! flight get; a bad config changes nothing; what was removed is gone at once; and a storm of reloads loses no
//! request and writes one access line and one ledger line for each.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Bytes;
use axum::response::IntoResponse;
use common::binary::*;
use common::*;
use futures_util::StreamExt;
use http::StatusCode;
use mantlegate::live::Outcome;
use serde_json::Value;

const MODEL: &str = "openai.gpt-oss-120b";
const USAGE: &str = r#"{"prompt_tokens":1000,"completion_tokens":0,"total_tokens":1000}"#;

/// An upstream that answers chat requests with 1,000 input tokens: a JSON body, or a stream (whole, or, for a
/// request whose `user` is `hold`, one the test scripts and hands over through `held`).
async fn upstream() -> (Arc<Mock>, tokio::sync::mpsc::UnboundedReceiver<ScriptedBody>) {
    let (held_tx, held) = tokio::sync::mpsc::unbounded_channel();
    let mock = Mock::start(move |seen| {
        let held_tx = held_tx.clone();
        async move {
            let req: Value = serde_json::from_slice(&seen.body).unwrap_or(Value::Null);
            if !seen.uri.path().ends_with("/chat/completions") {
                return json_response(StatusCode::OK, r#"{"object":"list","data":[]}"#);
            }
            if req["user"] == "hold" {
                let (script, res) = scripted_sse();
                held_tx.send(script).unwrap();
                return res;
            }
            if req["stream"] == true {
                let events = [
                    format!("data: {{\"model\":\"{MODEL}\",\"choices\":[{{\"delta\":{{\"content\":\"Hi\"}}}}],\"usage\":null}}\n\n"),
                    format!("data: {{\"model\":\"{MODEL}\",\"choices\":[],\"usage\":{USAGE}}}\n\n"),
                    "data: [DONE]\n\n".to_owned(),
                ];
                let stream = futures_util::stream::iter(events.map(|e| Ok::<_, std::convert::Infallible>(Bytes::from(e))));
                return ([(http::header::CONTENT_TYPE, "text/event-stream")], axum::body::Body::from_stream(stream))
                    .into_response();
            }
            let body = format!(r#"{{"object":"chat.completion","model":"{MODEL}","choices":[],"usage":{USAGE}}}"#);
            (StatusCode::OK, [(http::header::CONTENT_TYPE, "application/json")], body).into_response()
        }
    })
    .await;
    (mock, held)
}

/// A fresh directory for one test, with the path of its ledger.
fn fresh(name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("mantlegate-reload-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let ledger = dir.join("usage.jsonl");
    (dir, ledger)
}

/// The standard test config, with a ledger and a price of `input` USD per 1M input tokens for [`MODEL`].
fn opts(ledger: &std::path::Path, input: f64) -> Opts {
    let extra = format!(
        "\n[metering]\nledger_path = \"{}\"\n\n[[prices]]\nmodel = \"{MODEL}\"\ninput = {input}\noutput = 0\n",
        ledger.display()
    );
    Opts { extra, ..Opts::default() }
}

fn chat(stream: bool, user: &str) -> String {
    format!(r#"{{"model":"{MODEL}","stream":{stream},"user":"{user}","messages":[{{"role":"user","content":"hi"}}]}}"#)
}

/// Writes `text` as the gateway's config file and reloads it; it is in force once this returns. (The file watch
/// may have reloaded it first, in which case the explicit reload finds it unchanged.)
async fn reload_to(gw: &Gw, path: &std::path::Path, text: &str) {
    replace_file(path, text);
    let sha256 = mantlegate::config::sha256(text);
    match gw.reload().await {
        Outcome::Applied { sha256: sha } | Outcome::Unchanged { sha256: sha } if sha == sha256 => {}
        other => panic!("not in force: {other:?}"),
    }
    gw.metric_line(&format!("mantlegate_config_info{{sha256=\"{sha256}\"}} 1")).await;
}

fn read_ledger(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[tokio::test]
async fn a_stream_opened_before_a_reload_keeps_its_project_and_prices_while_new_requests_get_the_new_ones() {
    let (mock, mut held) = upstream().await;
    let (dir, ledger) = fresh("in-flight");
    let path = dir.join("gateway.toml");
    let mut gw = Gw::start_from_file(mock, opts(&ledger, 1.0), &path).await;

    // A stream in flight: its head and first event are through.
    let res = gw
        .post("/v1/chat/completions", CHAT_KEY)
        .header("x-request-id", "rid-old")
        .body(chat(true, "hold"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(gw.mock.next().await.header("openai-project"), Some("proj_chat"));
    let script = held.recv().await.unwrap();
    let first = format!("data: {{\"model\":\"{MODEL}\",\"choices\":[{{\"delta\":{{\"content\":\"Hi\"}}}}]}}\n\n");
    script.tx.send(Bytes::from(first.clone())).await.unwrap();
    let mut old = Box::pin(res.bytes_stream());
    assert_eq!(old.next().await.unwrap().unwrap(), first.as_bytes());

    // The project gets a new id and tags, and the model a new price.
    let text = std::fs::read_to_string(&path).unwrap();
    let new_text = text
        .replace(
            "id = \"proj_chat\"\ntags = { Team = \"chat\" }",
            "id = \"proj_chat_v2\"\ntags = { Team = \"chat-v2\" }",
        )
        .replace("input = 1\n", "input = 2\n");
    assert_ne!(new_text, text);
    reload_to(&gw, &path, &new_text).await;

    // New requests, on a new connection or on the stream's own client, get the new config.
    let res = gw
        .post("/v1/chat/completions", CHAT_KEY)
        .header("x-request-id", "rid-new")
        .body(chat(false, ""))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    res.bytes().await.unwrap();
    assert_eq!(gw.mock.next().await.header("openai-project"), Some("proj_chat_v2"));

    // The old stream ends now, with its usage.
    let usage = format!("data: {{\"model\":\"{MODEL}\",\"choices\":[],\"usage\":{USAGE}}}\n\ndata: [DONE]\n\n");
    script.tx.send(Bytes::from(usage)).await.unwrap();
    drop(script);
    while let Some(chunk) = old.next().await {
        chunk.unwrap();
    }

    gw.running.take().unwrap().stop().await;
    let lines: HashMap<String, Value> =
        read_ledger(&ledger).into_iter().map(|l| (l["request_id"].as_str().unwrap().to_owned(), l)).collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    let (old, new) = (&lines["rid-old"], &lines["rid-new"]);
    assert_eq!((old["project_id"].as_str(), old["tags"]["Team"].as_str()), (Some("proj_chat"), Some("chat")));
    assert_eq!((new["project_id"].as_str(), new["tags"]["Team"].as_str()), (Some("proj_chat_v2"), Some("chat-v2")));
    // 1,000 input tokens at 1 and at 2 USD per 1M.
    assert_eq!((old["cost_usd"].as_f64(), new["cost_usd"].as_f64()), (Some(0.001), Some(0.002)));
    assert_eq!((old["complete"].as_bool(), new["complete"].as_bool()), (Some(true), Some(true)));
}

#[tokio::test]
async fn a_key_removed_by_a_reload_is_refused_on_its_next_request_on_the_same_connection() {
    let (mock, _held) = upstream().await;
    let (dir, ledger) = fresh("key-removed");
    let path = dir.join("gateway.toml");
    let gw = Gw::start_from_file(mock, opts(&ledger, 1.0), &path).await;
    let models = |key: &'static str| gw.get("/v1/models", key).send();
    assert_eq!(models(SEARCH_KEY).await.unwrap().status(), 200);

    let text = std::fs::read_to_string(&path).unwrap();
    let search_key =
        format!("\n[[keys]]\nname = \"search-service\"\nsha256 = \"{}\"\nproject = \"Search\"\n", sha(SEARCH_KEY));
    assert!(text.contains(&search_key));
    reload_to(&gw, &path, &text.replace(&search_key, "")).await;

    // The same client, so the same keep-alive connection: the key is looked up per request, not per connection.
    let refused = models(SEARCH_KEY).await.unwrap();
    assert_eq!(error_code(refused).await, (401, "invalid_api_key".to_owned()));
    assert_eq!(models(CHAT_KEY).await.unwrap().status(), 200);
    assert_eq!(gw.mock.connections(), 1, "one upstream connection, kept alive across the reload");
}

#[tokio::test]
async fn an_invalid_config_is_refused_whole_and_the_one_in_force_keeps_serving() {
    let (mock, _held) = upstream().await;
    let (dir, ledger) = fresh("invalid");
    let path = dir.join("gateway.toml");
    let gw = Gw::start_from_file(mock, opts(&ledger, 1.0), &path).await;
    let good = std::fs::read_to_string(&path).unwrap();
    let good_sha = mantlegate::config::sha256(&good);
    gw.metric_line(&format!("mantlegate_config_info{{sha256=\"{good_sha}\"}} 1")).await;

    // Two problems, and a change that would have been fine: none of it takes effect.
    let search_key = format!("sha256 = \"{}\"\nproject = \"Search\"", sha(SEARCH_KEY));
    let bad = good
        .replace("connect_timeout = \"2s\"", "connect_timeout = \"2s\"\nresponse_timeout = \"soon\"")
        .replace(&search_key, &search_key.replace("Search", "Nowhere"))
        .replace("prefix = \"/chatbot\"", "prefix = \"/chatbot2\"");
    std::fs::write(&path, &bad).unwrap();
    let Outcome::Rejected { problems } = gw.reload().await else { panic!("accepted") };
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(problems[0].starts_with("upstream.response_timeout: \"soon\" is not a duration"), "{problems:?}");
    assert_eq!(problems[1], "keys[1].project: no project named \"Nowhere\"");
    // (The file watch may have refused it too.)
    let metrics = gw.metric_prefix("mantlegate_config_reloads_total{result=\"rejected\"}").await;
    assert!(metrics.contains(&format!("mantlegate_config_info{{sha256=\"{good_sha}\"}} 1")), "{metrics}");
    // The route in force is still the old one, and the search key still works.
    let res = gw.post("/chatbot/v1/chat/completions", CHAT_KEY).body(chat(false, "")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(gw.get("/v1/models", SEARCH_KEY).send().await.unwrap().status(), 200);

    // The good file back: it is the config in force, so nothing changes.
    std::fs::write(&path, &good).unwrap();
    assert_eq!(gw.reload().await, Outcome::Unchanged { sha256: good_sha });
    gw.metric_prefix("mantlegate_config_reloads_total{result=\"unchanged\"}").await;
}

#[tokio::test]
async fn a_removed_projects_metrics_go_at_once_and_new_tags_show_at_once() {
    let (mock, _held) = upstream().await;
    let (dir, ledger) = fresh("metrics");
    let path = dir.join("gateway.toml");
    let gw = Gw::start_from_file(mock, opts(&ledger, 1.0), &path).await;
    for key in [CHAT_KEY, SEARCH_KEY] {
        let res = gw.post("/v1/chat/completions", key).body(chat(false, "")).send().await.unwrap();
        assert_eq!(res.status(), if key == SEARCH_KEY { 403 } else { 200 }, "Search allows another model only");
        res.bytes().await.unwrap();
    }
    let before = gw.metric_prefix("mantlegate_requests_total{project=\"Search\"").await;
    assert!(before.contains(r#"mantlegate_project_info{project="Search",project_id="proj_search",Team="search"} 1"#));

    // Search goes (with its key and route); Chat-Prod is retagged.
    let text = std::fs::read_to_string(&path).unwrap();
    let text = text
        .replace("[[projects]]\nname = \"Search\"\nid = \"proj_search\"\ntags = { Team = \"search\" }\nmodels = [\"openai.gpt-oss-20b\"]\n", "")
        .replace("[[routes]]\nprefix = \"/search\"\nproject = \"Search\"\n", "")
        .replace(&format!("\n[[keys]]\nname = \"search-service\"\nsha256 = \"{}\"\nproject = \"Search\"\n", sha(SEARCH_KEY)), "")
        .replace("id = \"proj_chat\"\ntags = { Team = \"chat\" }", "id = \"proj_chat\"\ntags = { Team = \"chatbots\" }");
    reload_to(&gw, &path, &text).await;

    let after = gw.metrics().await;
    assert!(!after.contains("project=\"Search\""), "{after}");
    assert!(
        after.contains(r#"mantlegate_project_info{project="Chat-Prod",project_id="proj_chat",Team="chatbots"} 1"#),
        "{after}"
    );
    assert!(!after.contains(r#"project="Chat-Prod",project_id="proj_chat",Team="chat""#), "{after}");
    // Chat-Prod's counts carry over.
    assert!(
        after.contains(r#"mantlegate_requests_total{project="Chat-Prod",route="chat.completions",status="200"} 1"#),
        "{after}"
    );
    assert!(
        after.contains(&format!("mantlegate_config_info{{sha256=\"{}\"}} 1", mantlegate::config::sha256(&text))),
        "{after}"
    );
    assert!(after.contains("mantlegate_config_reloads_total{result=\"applied\"} 1"), "one reload applied it: {after}");
}

#[tokio::test]
async fn settings_only_a_restart_changes_keep_their_running_values_and_the_rest_change_at_once() {
    let (mock, _held) = upstream().await;
    let (dir, ledger) = fresh("restart-only");
    let path = dir.join("gateway.toml");
    let gw = Gw::start_from_file(mock, opts(&ledger, 1.0), &path).await;
    let text = std::fs::read_to_string(&path).unwrap();
    // A new listener (restart only: the gateway goes on where it was, as the binary test's warning says) and a
    // smaller body limit (at once).
    let text = text
        .replace("listen = \"127.0.0.1:0\"\nadmin_listen", "listen = \"127.0.0.1:1\"\nadmin_listen")
        .replace("max_body_bytes = 4096", "max_body_bytes = 64");
    reload_to(&gw, &path, &text).await;
    let res = gw.post("/v1/chat/completions", CHAT_KEY).body(chat(false, "")).send().await.unwrap();
    assert_eq!(error_code(res).await, (413, "request_too_large".to_owned()));
}

/// Writes `text` over `path` as an atomic rename, as Kubernetes and editors do, so a reload never reads half a file.
fn replace_file(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The value of the metric line `series`, once it appears.
async fn metric_value(client: &reqwest::Client, admin: &str, series: &str) -> f64 {
    let text = client.get(format!("http://{admin}/metrics")).send().await.unwrap().text().await.unwrap();
    text.lines().find_map(|l| l.strip_prefix(series)?.trim().parse().ok()).unwrap_or(0.0)
}

#[tokio::test]
async fn a_reload_storm_under_mixed_traffic_loses_no_request_and_writes_one_line_of_each_per_request() {
    let (mock, _held) = upstream().await;
    let (dir, ledger) = fresh("storm");
    let path = dir.join("gateway.toml");
    // Two configs that differ in prices, tags and keys; the traffic uses keys both have. What the floating key
    // sends is rerouted.
    let reroute = "unattributed = \"reroute\"\nreroute_to = \"Unattributed\"";
    let a = config_text(mock.addr, &Opts { attribution: reroute, ..opts(&ledger, 1.0) });
    let b =
        a.replace("input = 1\n", "input = 3\n").replace("tags = { Team = \"chat\" }", "tags = { Team = \"chat-b\" }")
            + &format!(
                "\n[[keys]]\nname = \"storm-extra\"\nsha256 = \"{}\"\nproject = \"Chat-Dev\"\n",
                sha("storm-extra-key")
            );
    std::fs::write(&path, &a).unwrap();
    let served = serve(&path, &[("MANTLE_API_KEY", UPSTREAM_KEY), ("MANTLEGATE__SERVER__WORKERS", "2")]).await;
    let (addr, admin) = (served.addr.clone(), served.admin.clone());
    let (mut child, log) = served.read_all();

    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let traffic: Vec<_> = (0..6)
        .map(|t| {
            let (done, sent, addr) = (done.clone(), sent.clone(), addr.clone());
            tokio::spawn(async move {
                let client = reqwest::Client::builder().timeout(WAIT).build().unwrap();
                let mut ids = Vec::new();
                let mut n = 0;
                while !done.load(Ordering::SeqCst) {
                    let id = format!("rid-{t}-{n}");
                    let key = if n % 2 == 0 { CHAT_KEY } else { FLOATING_KEY };
                    let request = match n % 3 {
                        0 => client.get(format!("http://{addr}/v1/models")),
                        k => client.post(format!("http://{addr}/v1/chat/completions")).body(chat(k == 2, "")),
                    };
                    // The chat key picks its other project; the floating key names none.
                    let request = if key == CHAT_KEY { request.header("openai-project", "Chat-Dev") } else { request };
                    let res = request.bearer_auth(key).header("x-request-id", &id).send().await.unwrap();
                    let status = res.status();
                    let body = res.bytes().await.unwrap();
                    assert_eq!(status, 200, "{id}: {}", String::from_utf8_lossy(&body));
                    if n % 3 == 2 {
                        assert!(body.ends_with(b"data: [DONE]\n\n"), "{id}: a whole stream");
                    }
                    sent.fetch_add(1, Ordering::SeqCst);
                    ids.push((id, n % 3 != 0));
                    n += 1;
                }
                ids
            })
        })
        .collect();
    let ready = {
        let (done, admin) = (done.clone(), admin.clone());
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut checks = 0;
            while !done.load(Ordering::SeqCst) {
                let status = client.get(format!("http://{admin}/readyz")).send().await.unwrap().status();
                assert_eq!(status, 200, "not ready during a reload");
                checks += 1;
            }
            checks
        })
    };

    // 50 reloads, each a new file (rewritten by rename, which the file watch sees), half also asked for by
    // SIGHUP and half by POST /reload; each waits for the reload to be in force before the next.
    let client = reqwest::Client::new();
    let applied = "mantlegate_config_reloads_total{result=\"applied\"}";
    for i in 0..50 {
        replace_file(&path, if i % 2 == 0 { &b } else { &a });
        let sha256 = mantlegate::config::sha256(if i % 2 == 0 { &b } else { &a });
        if i % 2 == 0 {
            kill(&child, "-HUP").await;
        } else {
            // The file watch may have applied it first.
            let res = client.post(format!("http://{admin}/reload")).send().await.unwrap();
            assert_eq!(res.status(), 200);
            let outcome: Outcome = res.json().await.unwrap();
            assert!(
                outcome == Outcome::Applied { sha256: sha256.clone() } || outcome == Outcome::Unchanged { sha256 },
                "{outcome:?}"
            );
        }
        let deadline = tokio::time::Instant::now() + WAIT;
        while metric_value(&client, &admin, applied).await < f64::from(i + 1) {
            assert!(tokio::time::Instant::now() < deadline, "reload {i} never applied");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    done.store(true, Ordering::SeqCst);
    let mut requests = Vec::new();
    for t in traffic {
        requests.extend(t.await.unwrap());
    }
    assert!(ready.await.unwrap() > 0);
    assert_eq!(requests.len(), sent.load(Ordering::SeqCst));
    assert!(requests.len() >= 50, "{} requests", requests.len());
    assert_eq!(metric_value(&client, &admin, applied).await, 50.0);
    assert_eq!(metric_value(&client, &admin, "mantlegate_config_reloads_total{result=\"rejected\"}").await, 0.0);

    kill(&child, "-TERM").await;
    let status = tokio::time::timeout(WAIT, child.wait()).await.expect("no exit after SIGTERM").unwrap();
    assert!(status.success(), "{status:?}");
    let log = tokio::time::timeout(WAIT, log).await.expect("the log never ended").unwrap();
    let hangups = log.iter().filter(|l| l["message"] == "SIGHUP: reloading the config").count();
    assert_eq!(hangups, 25, "every SIGHUP reloaded");
    let mut access: HashMap<String, usize> = HashMap::new();
    for line in log.iter().filter(|l| l["target"] == "mantlegate::access") {
        *access.entry(line["request_id"].as_str().unwrap().to_owned()).or_default() += 1;
    }
    let mut ledgered: HashMap<String, usize> = HashMap::new();
    let mut teams = std::collections::HashSet::new();
    for line in read_ledger(&ledger) {
        *ledgered.entry(line["request_id"].as_str().unwrap().to_owned()).or_default() += 1;
        teams.insert(line["tags"]["Team"].as_str().unwrap_or_default().to_owned());
    }
    for (id, chat) in &requests {
        assert_eq!(access.get(id), Some(&1), "{id}: one access line");
        // Models requests are forwarded too, and so in the ledger.
        assert_eq!(ledgered.get(id), Some(&1), "{id} (chat: {chat}): one ledger line");
    }
    assert_eq!((access.len(), ledgered.len()), (requests.len(), requests.len()), "no line for a request never sent");
    assert!(teams.contains("chat") && teams.contains("chat-b"), "both configs served: {teams:?}");
    eprintln!("{} requests under 50 reloads", requests.len());
}

/// A config directory as Kubernetes mounts a ConfigMap: `gateway.toml -> ..data/gateway.toml`,
/// `..data -> ..<version>`; a new version is written beside the old and `..data` renamed over.
struct ConfigMap {
    dir: std::path::PathBuf,
    versions: usize,
}

impl ConfigMap {
    fn new(name: &str, text: &str) -> Self {
        let (dir, _) = fresh(name);
        let mut map = Self { dir, versions: 0 };
        map.update(text);
        std::os::unix::fs::symlink("..data/gateway.toml", map.path()).unwrap();
        map
    }

    fn path(&self) -> std::path::PathBuf {
        self.dir.join("gateway.toml")
    }

    fn update(&mut self, text: &str) {
        self.versions += 1;
        let version = format!("..2026_12_02_{:02}", self.versions);
        std::fs::create_dir(self.dir.join(&version)).unwrap();
        std::fs::write(self.dir.join(&version).join("gateway.toml"), text).unwrap();
        std::os::unix::fs::symlink(&version, self.dir.join("..data_tmp")).unwrap();
        std::fs::rename(self.dir.join("..data_tmp"), self.dir.join("..data")).unwrap();
        if self.versions > 1 {
            std::fs::remove_dir_all(self.dir.join(format!("..2026_12_02_{:02}", self.versions - 1))).unwrap();
        }
    }
}

fn is(message: &'static str) -> impl Fn(&Value) -> bool {
    move |v| v["message"] == message
}

#[tokio::test]
async fn the_binary_reloads_on_a_configmap_swap_on_sighup_and_on_mantlegate_reload() {
    let (mock, _held) = upstream().await;
    let (_, ledger) = fresh("configmap-ledger");
    let v1 = config_text(mock.addr, &opts(&ledger, 1.0));
    let mut map = ConfigMap::new("configmap", &v1);
    let mut served = serve(&map.path(), &[("MANTLE_API_KEY", UPSTREAM_KEY)]).await;
    let client = reqwest::Client::builder().timeout(WAIT).build().unwrap();
    let addr = served.addr.clone();
    let models = |key: &str| client.get(format!("http://{addr}/v1/models")).bearer_auth(key).send();

    // A new key, a retagged project, a removed route, the reroute policy, and a new listener address (restart
    // only): picked up from the swap alone, and named in the log.
    let v2 = v1
        .replace("tags = { Team = \"search\" }", "tags = { Team = \"discovery\" }")
        .replace("[[routes]]\nprefix = \"/search\"\nproject = \"Search\"\n", "")
        .replace(
            "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"",
            "listen = \"127.0.0.1:1\"\nadmin_listen = \"127.0.0.1:2\"\nmax_connections = 9",
        )
        .replace("[attribution]\n", "[attribution]\nunattributed = \"reroute\"\nreroute_to = \"Unattributed\"\n")
        + &format!("\n[[keys]]\nname = \"new-service\"\nsha256 = \"{}\"\nproject = \"Search\"\n", sha("new-key"));
    assert_eq!(models("new-key").await.unwrap().status(), 401);
    map.update(&v2);
    let reloaded = served.wait_for("config reloaded", is("config reloaded; new requests use it")).await;
    assert_eq!(reloaded["sha256"], mantlegate::config::sha256(&v2));
    assert_eq!(reloaded["keys_added"], "new-service");
    assert_eq!(reloaded["projects_retagged"], "Search");
    assert_eq!(reloaded["routes_removed"], "/search -> Search");
    assert_eq!(reloaded["level"], "INFO");
    let kept = served.wait_for("the restart-only warning", |v| v["level"] == "WARN").await;
    assert_eq!(kept["settings"], "server.listen, server.admin_listen, server.max_connections", "{kept}");
    assert_eq!(models("new-key").await.unwrap().status(), 200);

    // A warning logged while a request is served carries its request id, as the access line does.
    let res = client
        .get(format!("http://{addr}/v1/models"))
        .bearer_auth(FLOATING_KEY)
        .header("x-request-id", "rid-rerouted")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let rerouted = served.wait_for("the reroute warning", is("unattributed request rerouted")).await;
    assert_eq!(rerouted["span"]["request_id"], "rid-rerouted", "{rerouted}");
    let access = served.wait_for("its access line", |v| v["request_id"] == "rid-rerouted").await;
    assert_eq!(access["attribution"], "rerouted");

    // SIGHUP with nothing new: the process lives on, and says so.
    served.signal("-HUP").await;
    served.wait_for("the SIGHUP line", is("SIGHUP: reloading the config")).await;
    let unchanged = served.wait_for("the unchanged line", |v| v["level"] != "DEBUG").await;
    assert_eq!(unchanged["message"], "config reload: the file is the config in force", "{unchanged}");
    assert_eq!(models(CHAT_KEY).await.unwrap().status(), 200);

    // A broken version is refused, by the watch and by `mantlegate reload`, which lists every problem.
    map.update(&v2.replace("response_timeout", "x").replace("connect_timeout = \"2s\"", "connect_timeout = \"2\""));
    let refused = served.wait_for("the refusal", is("config reload refused; the config in force stays")).await;
    assert_eq!(refused["level"], "ERROR");
    assert!(refused["problem"].as_str().unwrap().starts_with("upstream.connect_timeout"), "{refused}");
    let out = tokio::process::Command::new(BIN).args(["reload", "--admin", &served.admin]).output().await.unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.starts_with("refused; the config in force stays (1 problem):"), "{stderr}");
    assert!(stderr.contains("upstream.connect_timeout: \"2\" is not a duration"), "{stderr}");
    assert_eq!(models("new-key").await.unwrap().status(), 200, "v2 still serves");

    // Fixed: `mantlegate reload` (given the config, it finds the admin address there... which here is port 0,
    // so by address) applies it.
    map.update(&v1);
    let out = tokio::process::Command::new(BIN).args(["reload", "--admin", &served.admin]).output().await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout} {}", String::from_utf8_lossy(&out.stderr));
    let sha = mantlegate::config::sha256(&v1);
    // The watch may have got there first.
    assert!(
        stdout == format!("reloaded: config {sha} is in force\n")
            || stdout == format!("unchanged: config {sha} was already in force\n"),
        "{stdout}"
    );
    assert_eq!(models("new-key").await.unwrap().status(), 401);
    let metrics = client.get(format!("http://{}/metrics", served.admin)).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains(&format!("mantlegate_config_info{{sha256=\"{sha}\"}} 1")), "{metrics}");
    assert!(metrics.contains("mantlegate_config_reloads_total{result=\"applied\"} 2"), "{metrics}");
    served.signal("-TERM").await;
    assert!(tokio::time::timeout(WAIT, served.child.wait()).await.unwrap().unwrap().success());
}

/// Reads the named thread count of process `pid`.
fn threads_named(pid: u32, name: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter(|t| std::fs::read_to_string(t.as_ref().unwrap().path().join("comm")).is_ok_and(|c| c.trim() == name))
        .count()
}

#[tokio::test]
async fn a_moved_ledger_takes_new_requests_while_the_old_one_finishes_earlier_ones_with_one_writer_per_file() {
    let (mock, mut held) = upstream().await;
    let (dir, ledger_a) = fresh("ledger-move");
    let ledger_b = dir.join("usage-b.jsonl");
    let path = dir.join("conf").join("gateway.toml");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let a = config_text(mock.addr, &opts(&ledger_a, 1.0));
    let b = a.replace(&ledger_a.display().to_string(), &ledger_b.display().to_string());
    std::fs::write(&path, &a).unwrap();
    let mut served = serve(&path, &[("MANTLE_API_KEY", UPSTREAM_KEY)]).await;
    let pid = served.child.id().unwrap();
    let client = reqwest::Client::builder().timeout(WAIT).build().unwrap();
    let url = format!("http://{}/v1/chat/completions", served.addr);
    let post = |id: &'static str, user: &'static str| {
        client.post(&url).bearer_auth(CHAT_KEY).header("x-request-id", id).body(chat(user == "hold", user)).send()
    };
    let first = format!("data: {{\"model\":\"{MODEL}\",\"choices\":[{{\"delta\":{{\"content\":\"Hi\"}}}}]}}\n\n");
    let end = format!("data: {{\"model\":\"{MODEL}\",\"choices\":[],\"usage\":{USAGE}}}\n\ndata: [DONE]\n\n");

    // A stream under the config writing to A.
    let old = post("rid-a-held", "hold").await.unwrap();
    let old_script = held.recv().await.unwrap();
    old_script.tx.send(Bytes::from(first.clone())).await.unwrap();
    let mut old = Box::pin(old.bytes_stream());
    old.next().await.unwrap().unwrap();

    // Moved to B: new requests go there; a stream held under B.
    replace_file(&path, &b);
    served.wait_for("the move to B", is("config reloaded; new requests use it")).await;
    post("rid-b", "").await.unwrap().bytes().await.unwrap();
    let held_b = post("rid-b-held", "hold").await.unwrap();
    let b_script = held.recv().await.unwrap();
    b_script.tx.send(Bytes::from(first.clone())).await.unwrap();
    let mut held_b = Box::pin(held_b.bytes_stream());
    held_b.next().await.unwrap().unwrap();
    assert_eq!(threads_named(pid, "usage-ledger"), 2);

    // Back to A while A's writer still finishes the first stream: it is taken up again, not opened twice.
    replace_file(&path, &a);
    served.wait_for("the move back to A", is("config reloaded; new requests use it")).await;
    assert_eq!(threads_named(pid, "usage-ledger"), 2, "one writer per file");
    post("rid-a-again", "").await.unwrap().bytes().await.unwrap();

    // The held streams end; B's writer, with nothing left to write for, stops.
    for (script, mut stream) in [(old_script, old), (b_script, held_b)] {
        script.tx.send(Bytes::from(end.clone())).await.unwrap();
        drop(script);
        while let Some(chunk) = stream.next().await {
            chunk.unwrap();
        }
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    while threads_named(pid, "usage-ledger") > 1 {
        assert!(tokio::time::Instant::now() < deadline, "B's writer never stopped");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    served.signal("-TERM").await;
    assert!(tokio::time::timeout(WAIT, served.child.wait()).await.unwrap().unwrap().success());
    let ids = |path: &std::path::Path| {
        let mut ids: Vec<String> =
            read_ledger(path).iter().map(|l| l["request_id"].as_str().unwrap().to_owned()).collect();
        ids.sort();
        ids
    };
    assert_eq!(ids(&ledger_a), ["rid-a-again", "rid-a-held"]);
    assert_eq!(ids(&ledger_b), ["rid-b", "rid-b-held"]);
}

#[tokio::test]
async fn a_reload_to_a_new_upstream_key_file_uses_it_and_follows_its_changes() {
    let (mock, _held) = upstream().await;
    let (dir, ledger) = fresh("key-file");
    let path = dir.join("gateway.toml");
    let gw = Gw::start_from_file(mock, opts(&ledger, 1.0), &path).await;
    let upstream_key = || async {
        let res = gw.get("/v1/models", CHAT_KEY).send().await.unwrap();
        assert_eq!(res.status(), 200);
        gw.mock.next().await.header("authorization").unwrap().to_owned()
    };
    assert_eq!(upstream_key().await, format!("Bearer {UPSTREAM_KEY}"));

    let secrets = dir.join("secrets");
    std::fs::create_dir_all(&secrets).unwrap();
    let key_file = secrets.join("api-key");
    let text = std::fs::read_to_string(&path).unwrap();
    let with_file = text.replace(
        "connect_timeout = \"2s\"",
        &format!("connect_timeout = \"2s\"\napi_key_file = \"{}\"", key_file.display()),
    );
    // A key file that is not there refuses the reload; the key in use stays.
    replace_file(&path, &with_file);
    let Outcome::Rejected { problems } = gw.reload().await else { panic!("accepted a missing key file") };
    assert!(problems[0].starts_with("upstream.api_key_file: cannot read"), "{problems:?}");
    assert_eq!(upstream_key().await, format!("Bearer {UPSTREAM_KEY}"));

    std::fs::write(&key_file, "key-from-file\n").unwrap();
    reload_to(&gw, &path, &with_file).await;
    assert_eq!(upstream_key().await, "Bearer key-from-file");
    // The new file is watched from now on.
    replace_file(&key_file, "key-rotated\n");
    gw.metric_line("mantlegate_upstream_key_reloads_total{result=\"changed\"} 1").await;
    assert_eq!(upstream_key().await, "Bearer key-rotated");
}
