//! The real binary, as an operator runs it: `serve` with a config file (and an https upstream), its JSON
//! request log, SIGTERM, `check`, `keys new`, and `demo`.
#![allow(clippy::unwrap_used)]

mod common;

use common::binary::*;
use common::*;
use futures_util::StreamExt;
use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

#[tokio::test]
async fn serve_logs_one_json_line_per_request_and_never_a_secret() {
    let mock = Mock::ok_json().await;
    let dir = temp_dir("serve");
    let key_file = dir.join("api-key");
    std::fs::write(&key_file, format!("{UPSTREAM_KEY}\n")).unwrap();
    let config = config_text(mock.addr, &Opts::default()).replace(
        "connect_timeout = \"2s\"",
        &format!("connect_timeout = \"2s\"\napi_key_file = \"{}\"", key_file.display()),
    );
    let config_path = dir.join("gateway.toml");
    std::fs::write(&config_path, config).unwrap();

    let mut served = serve(&config_path, &[]).await;
    let client = reqwest::Client::new();
    let prompt = "PROMPT-TEXT-THAT-MUST-NOT-BE-LOGGED";
    let body = format!(r#"{{"model":"openai.gpt-oss-20b","messages":[{{"role":"user","content":"{prompt}"}}]}}"#);
    let ok = client
        .post(format!("http://{}/v1/chat/completions?api_key=QUERY-SECRET", served.addr))
        .bearer_auth(SEARCH_KEY)
        .header("x-request-id", "rid-logged")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    ok.bytes().await.unwrap();
    let denied =
        client.get(format!("http://{}/v1/models", served.addr)).bearer_auth("wrong-key-secret").send().await.unwrap();
    assert_eq!(denied.status(), 401);
    assert_eq!(mock.next().await.header("authorization"), Some(format!("Bearer {UPSTREAM_KEY}").as_str()));
    let ready = client.get(format!("http://{}/readyz", served.admin)).send().await.unwrap();
    assert_eq!(ready.status(), 200);

    sigterm(&served.child).await;
    let status = tokio::time::timeout(WAIT, served.child.wait()).await.expect("no exit after SIGTERM").unwrap();
    assert!(status.success(), "{status:?}");
    let mut output: Vec<String> = Vec::new();
    while let Some(line) = served.lines.next_line().await.unwrap() {
        output.push(line);
    }
    let all = output.join("\n");
    for secret in [SEARCH_KEY, UPSTREAM_KEY, "wrong-key-secret", prompt, "QUERY-SECRET"] {
        assert!(!all.contains(secret), "{secret} leaked into the log:\n{all}");
    }
    let access: Vec<serde_json::Value> = output
        .iter()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("JSON line"))
        .filter(|v| v["target"] == "mantlegate::access")
        .collect();
    assert_eq!(access.len(), 2, "one line per request:\n{all}");
    let ok = &access[0];
    assert_eq!((ok["level"].as_str(), ok["message"].as_str()), (Some("INFO"), Some("request")));
    assert!(humantime::parse_rfc3339(ok["timestamp"].as_str().unwrap()).is_ok(), "{ok}");
    assert_eq!(ok["request_id"], "rid-logged");
    assert_eq!(ok["key"], "search-service");
    assert_eq!(ok["project"], "Search");
    assert_eq!(ok["project_id"], "proj_search");
    assert_eq!(ok["endpoint"], "chat.completions");
    assert_eq!(ok["path"], "/v1/chat/completions");
    assert_eq!(ok["model"], "openai.gpt-oss-20b");
    assert_eq!(ok["status"], 200);
    assert_eq!(ok["complete"], true);
    // The mock's `{"ok":true}` names no usage, and the line says so.
    assert_eq!(ok["unmetered"], "no_usage");
    assert!(ok["duration_ms"].as_f64().unwrap() >= ok["ttfb_ms"].as_f64().unwrap());
    let denied = &access[1];
    assert_eq!((denied["status"].as_u64(), denied["error"].as_str()), (Some(401), Some("invalid_api_key")));
    assert!(denied.get("key").is_none());
    assert!(denied.get("unmetered").is_none(), "a refusal bills nothing: {denied}");
    assert!(output.iter().any(|l| l.contains("traffic listener drained")), "{all}");
}

/// `serve` with `grace`, and one stream in flight (request id `rid-held`) that upstream never ends.
struct Holding {
    served: Served,
    /// Upstream's side of the stream: dropped, it ends.
    script: ScriptedBody,
    /// The caller's side, its first event read.
    stream: std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<axum::body::Bytes>>>>,
    _mock: std::sync::Arc<Mock>,
}

async fn serve_holding_a_stream(name: &str, grace: &'static str) -> Holding {
    let (mock, mut scripts) = Mock::scripted().await;
    let dir = temp_dir(name);
    let config_path = dir.join("gateway.toml");
    std::fs::write(&config_path, config_text(mock.addr, &Opts { grace, ..Opts::default() })).unwrap();
    let served = serve(&config_path, &[("MANTLE_API_KEY", UPSTREAM_KEY)]).await;
    let res = reqwest::Client::new()
        .post(format!("http://{}/v1/responses", served.addr))
        .bearer_auth(CHAT_KEY)
        .header("x-request-id", "rid-held")
        .body(r#"{"model":"openai.gpt-5.4","stream":true}"#)
        .send()
        .await
        .unwrap();
    let script = scripts.recv().await.unwrap();
    let created = b"event: response.created\ndata: {\"type\":\"response.created\",\"response\":{}}\n\n";
    script.tx.send(axum::body::Bytes::from_static(created)).await.unwrap();
    let mut stream = Box::pin(res.bytes_stream());
    stream.next().await.unwrap().unwrap();
    Holding { served, script, stream, _mock: mock }
}

#[tokio::test]
async fn a_stream_cut_at_the_end_of_the_grace_is_logged_as_cut_by_the_gateway() {
    let Holding { mut served, script, stream, _mock } = serve_holding_a_stream("grace-cut", "300ms").await;
    // The caller keeps reading and upstream keeps the stream open: only the end of the grace cuts it.
    sigterm(&served.child).await;
    let status = tokio::time::timeout(WAIT, served.child.wait()).await.expect("no exit after the grace").unwrap();
    assert!(status.success(), "{status:?}");
    let mut access = None;
    while let Some(line) = served.lines.next_line().await.unwrap() {
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        if v["request_id"] == "rid-held" {
            access = Some(v);
        }
    }
    let access = access.expect("the cut request has its line");
    assert_eq!(
        (access["complete"].as_bool(), access["incomplete_reason"].as_str()),
        (Some(false), Some("the gateway shut down before the response ended")),
        "{access}"
    );
    drop((script, stream));
}

#[tokio::test]
async fn an_access_line_is_written_as_soon_as_its_thread_is_idle() {
    // Traffic threads batch their access lines; a quiet gateway must not sit on them until the batch fills.
    let mock = Mock::ok_json().await;
    let dir = temp_dir("idle-flush");
    let config_path = dir.join("gateway.toml");
    std::fs::write(&config_path, config_text(mock.addr, &Opts { server: "workers = 1", ..Opts::default() })).unwrap();
    let mut served = serve(&config_path, &[("MANTLE_API_KEY", UPSTREAM_KEY)]).await;
    let client = reqwest::Client::new();
    for request_id in ["rid-first", "rid-second"] {
        let response = client
            .get(format!("http://{}/v1/models", served.addr))
            .bearer_auth(CHAT_KEY)
            .header("x-request-id", request_id)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.bytes().await.unwrap();
        let line = loop {
            let line = tokio::time::timeout(WAIT, served.lines.next_line())
                .await
                .expect("no access line while the gateway runs")
                .unwrap()
                .expect("exited");
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            if v["target"] == "mantlegate::access" {
                break v;
            }
        };
        assert_eq!(line["request_id"], request_id);
    }
}

/// The names of a process's threads.
fn thread_names(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|task| std::fs::read_to_string(task.unwrap().path().join("comm")).unwrap().trim().to_owned())
        .collect()
}

#[tokio::test]
async fn serve_runs_the_configured_traffic_threads() {
    let mock = Mock::ok_json().await;
    let dir = temp_dir("workers");
    let config_path = dir.join("gateway.toml");
    std::fs::write(&config_path, config_text(mock.addr, &Opts { server: "workers = 1", ..Opts::default() })).unwrap();
    // The count from an environment override: a number given as text.
    let mut served =
        serve(&config_path, &[("MANTLE_API_KEY", UPSTREAM_KEY), ("MANTLEGATE__SERVER__WORKERS", "3")]).await;
    assert_eq!(served.workers, 3);
    let mut traffic: Vec<String> =
        thread_names(served.child.id().unwrap()).into_iter().filter(|n| n.starts_with("traffic-")).collect();
    traffic.sort();
    assert_eq!(traffic, ["traffic-0", "traffic-1", "traffic-2"]);

    // Concurrent connections, whichever thread takes each, are all served.
    let requests = (0..24).map(|_| {
        // A client per request: a connection per request.
        let client = reqwest::Client::new();
        let url = format!("http://{}/v1/models", served.addr);
        async move { client.get(url).bearer_auth(CHAT_KEY).send().await.unwrap().status() }
    });
    let statuses = futures_util::future::join_all(requests).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(mock.hits(), 24);

    sigterm(&served.child).await;
    let status = tokio::time::timeout(WAIT, served.child.wait()).await.expect("no exit after SIGTERM").unwrap();
    assert!(status.success(), "{status:?}");
    let mut output = Vec::new();
    while let Some(line) = served.lines.next_line().await.unwrap() {
        output.push(line);
    }
    assert!(output.iter().any(|l| l.contains("traffic listener drained")), "{output:?}");
    // Threads write their lines at once without a lock between them: each is still a whole line.
    let lines: Vec<serde_json::Value> =
        output.iter().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect();
    assert_eq!(lines.iter().filter(|l| l["target"] == "mantlegate::access").count(), 24);
}

#[tokio::test]
async fn a_second_signal_ends_the_grace() {
    // A stream upstream never ends holds the drain for the whole grace.
    let Holding { mut served, script, stream: _stream, _mock } = serve_holding_a_stream("second-signal", "1h").await;
    sigterm(&served.child).await;
    loop {
        let line = tokio::time::timeout(WAIT, served.lines.next_line()).await.expect("no log line").unwrap().unwrap();
        if line.contains("shutdown signal received") {
            break;
        }
    }
    sigterm(&served.child).await;
    let status = tokio::time::timeout(WAIT, served.child.wait()).await.expect("still waiting out the grace").unwrap();
    assert!(status.success(), "{status:?}");
    drop(script);
}

#[tokio::test]
async fn serve_reads_the_upstream_key_from_the_environment() {
    let mock = Mock::ok_json().await;
    let dir = temp_dir("env");
    let config = config_text(mock.addr, &Opts::default())
        .replace("connect_timeout = \"2s\"", "connect_timeout = \"2s\"\napi_key_env = \"TEST_MANTLE_KEY\"");
    let config_path = dir.join("gateway.toml");
    std::fs::write(&config_path, config).unwrap();
    let served = serve(&config_path, &[("TEST_MANTLE_KEY", "key-from-env")]).await;
    let res =
        reqwest::Client::new().get(format!("http://{}/v1/models", served.addr)).bearer_auth(CHAT_KEY).send().await;
    assert_eq!(res.unwrap().status(), 200);
    assert_eq!(mock.next().await.header("authorization"), Some("Bearer key-from-env"));
}

#[tokio::test]
async fn the_access_log_can_be_turned_off_by_target() {
    let mock = Mock::ok_json().await;
    let dir = temp_dir("quiet");
    let config_path = dir.join("gateway.toml");
    std::fs::write(&config_path, config_text(mock.addr, &Opts::default())).unwrap();
    let mut served =
        serve(&config_path, &[("MANTLE_API_KEY", UPSTREAM_KEY), ("MANTLEGATE_LOG", "info,mantlegate::access=off")])
            .await;
    let res =
        reqwest::Client::new().get(format!("http://{}/v1/models", served.addr)).bearer_auth(CHAT_KEY).send().await;
    assert_eq!(res.unwrap().status(), 200);
    sigterm(&served.child).await;
    tokio::time::timeout(WAIT, served.child.wait()).await.expect("no exit after SIGTERM").unwrap();
    let mut output = Vec::new();
    while let Some(line) = served.lines.next_line().await.unwrap() {
        output.push(line);
    }
    assert!(output.iter().any(|l| l.contains("traffic listener drained")), "{output:?}");
    assert!(!output.iter().any(|l| l.contains("mantlegate::access")), "{output:?}");
}

#[tokio::test]
async fn serve_refuses_to_start_without_what_it_needs() {
    let dir = temp_dir("refuse");
    let base = config_text("127.0.0.1:9".parse().unwrap(), &Opts::default());
    let cases = [
        (
            "sigv4",
            base.replace("connect_timeout = \"2s\"", "connect_timeout = \"2s\"\nauth = \"sigv4\""),
            "upstream.region: must be set: auth = \"sigv4\" signs for a region",
        ),
        (
            "no-env",
            base.replace("connect_timeout = \"2s\"", "connect_timeout = \"2s\"\napi_key_env = \"SURELY_UNSET_VAR\""),
            "SURELY_UNSET_VAR is not set",
        ),
        (
            "no-id",
            base.replace("id = \"proj_unattr\"\n", ""),
            "projects without an id cannot receive traffic: Unattributed",
        ),
    ];
    for (name, config, expected) in cases {
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(&path, config).unwrap();
        let out =
            Command::new(BIN).args(["serve", "--config"]).arg(&path).env("MANTLE_API_KEY", "k").output().await.unwrap();
        assert!(!out.status.success(), "{name}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expected), "{name}: {stderr}");
    }
}

#[tokio::test]
async fn check_prints_the_attribution_table_and_names_bad_keys() {
    let out = Command::new(BIN).args(["check", "--config", "config/mantlegate.toml"]).output().await.unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("config/mantlegate.toml: valid"), "{text}");
    let row = |first: &str| {
        text.lines().find(|l| l.starts_with(first)).unwrap_or_else(|| panic!("no row {first}:\n{text}")).to_owned()
    };
    assert!(row("chatbot-backend").contains("CustomerChatbot-Prod"));
    assert!(row("chatbot-backend").contains("CustomerChatbot-Dev"));
    assert!(row("/docsearch").contains("DocSearch-Research"));
    assert!(text.contains("unattributed requests: reroute to Unattributed"));

    let dir = temp_dir("check");
    let bad = std::fs::read_to_string("config/mantlegate.toml")
        .unwrap()
        .replace("CostCenter = \"CC-2040\"", "Owner = \"x\"")
        .replace("Environment = \"Development\"", "Environment = \"Dev\"")
        .replace("project = \"DocSearch-Research\"\n\n[[keys]]", "project = \"Nope\"\n\n[[keys]]");
    let path = dir.join("bad.toml");
    std::fs::write(&path, bad).unwrap();
    let out = Command::new(BIN).args(["check", "--config"]).arg(&path).output().await.unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("projects[2].tags.CostCenter: missing"), "{err}");
    assert!(
        err.contains("projects[1].tags.Environment: \"Dev\" is not one of Production, Development, Staging, Research"),
        "{err}"
    );
    assert!(err.contains("keys[1].project: no project named \"Nope\""), "{err}");

    let out = Command::new(BIN).args(["check", "--config", "does/not/exist.toml"]).output().await.unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"));

    // MANTLEGATE_CONFIG names the file when --config is absent; env overrides apply.
    let out = Command::new(BIN)
        .arg("check")
        .env("MANTLEGATE_CONFIG", "config/sidecar.toml")
        .env("MANTLEGATE__UPSTREAM__BASE_URL", "http://127.0.0.1:7777")
        .output()
        .await
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("config/sidecar.toml: valid") && text.contains("upstream: http://127.0.0.1:7777"), "{text}");

    // Overrides are text until the key's type says otherwise: "007" stays a name, "1.9" is no byte count.
    for (key, value, expected) in [
        ("MANTLEGATE__ATTRIBUTION__REROUTE_TO", "007", "no project named \"007\""),
        ("MANTLEGATE__SERVER__MAX_BODY_BYTES", "1.9", "server.max_body_bytes"),
    ] {
        let out = Command::new(BIN)
            .args(["check", "--config", "config/mantlegate.toml"])
            .env(key, value)
            .output()
            .await
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{key}={value}");
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(err.contains(expected), "{key}={value}: {err}");
    }

    // A misspelled override is named as the environment variable it is, beside the file's own problems.
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&path)
        .env("MANTLEGATE__SERVER__LISTN", "0.0.0.0:9000")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("MANTLEGATE__SERVER__LISTN: environment variable for server.listn, which is not a setting"),
        "{err}"
    );
    assert!(err.contains("keys[1].project: no project named \"Nope\""), "{err}");

    // A ledger the gateway could not open fails the check, as it would fail `serve`.
    let blocked = dir.join("not-a-dir");
    std::fs::write(&blocked, "").unwrap();
    let out = Command::new(BIN)
        .args(["check", "--config", "config/mantlegate.toml"])
        .env("MANTLEGATE__METERING__LEDGER_PATH", blocked.join("usage.jsonl"))
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("metering.ledger_path: cannot create") && err.contains("is not a directory"), "{err}");
}

#[tokio::test]
async fn keys_new_prints_a_key_whose_stanza_lets_it_in() {
    let out = Command::new(BIN)
        .args(["keys", "new", "--name", "new-service", "--project", "Chat-Prod"])
        .output()
        .await
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let key = text.lines().find(|l| l.starts_with("mg_")).unwrap().to_owned();
    let stanza = &text[text.find("[[keys]]").unwrap()..];
    assert!(!stanza.contains(&key), "the stanza holds only the hash");

    let mock = Mock::ok_json().await;
    let mut config = config_text(mock.addr, &Opts { keys: false, ..Opts::default() });
    config.push_str(stanza);
    let config = mantlegate::Config::from_toml(&config).unwrap();
    let credential =
        mantlegate::proxy::Credential::api_key(&mantlegate::config::Secret::new(UPSTREAM_KEY.into())).unwrap();
    let running = mantlegate::server::start(config, credential, Default::default()).await.unwrap();
    let res = reqwest::Client::new()
        .get(format!("http://{}/v1/models", running.addr))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(mock.next().await.header("openai-project"), Some("proj_chat"));
    running.stop().await;
}

#[tokio::test]
async fn demo_runs_with_no_aws_account() {
    let mut child = Command::new(BIN)
        .args(["demo", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = loop {
        let line = tokio::time::timeout(WAIT, lines.next_line()).await.expect("demo printed nothing").unwrap().unwrap();
        if let Some(rest) = line.strip_prefix("mantlegate demo: the gateway on http://") {
            break rest.split(',').next().unwrap().to_owned();
        }
    };
    let (admin, ledger) = loop {
        let line = tokio::time::timeout(WAIT, lines.next_line()).await.expect("no spend line").unwrap().unwrap();
        if let Some(rest) = line.strip_prefix("Spend: http://") {
            let (admin, ledger) = rest.split_once("/ ").unwrap();
            break (admin.to_owned(), std::path::PathBuf::from(ledger.rsplit_once("Ledger: ").unwrap().1));
        }
    };
    let client = reqwest::Client::new();
    let res = client
        .post(format!("http://{addr}/v1/chat/completions"))
        .bearer_auth("demo-chatbot-key")
        .header("OpenAI-Project", "CustomerChatbot-Dev")
        .body(r#"{"model":"openai.gpt-oss-120b","messages":[{"role":"user","content":"Hi"}]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let body: serde_json::Value = res.json().await.unwrap();
    let text = body["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(text.contains("proj_demo_chatbot_dev"), "{text}");
    let res = client.get(format!("http://{addr}/v1/models")).bearer_auth("demo-ops-key").send().await.unwrap();
    assert_eq!(error_code(res).await, (403, "project_required".into()));
    // The spend page has it, from the demo's own ledger.
    let page = client.get(format!("http://{admin}/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    // (503 until the index has read the ledger it started with: an empty one.)
    let deadline = tokio::time::Instant::now() + WAIT;
    let spend: serde_json::Value = loop {
        let res = client.get(format!("http://{admin}/api/spend?group_by=project")).send().await.unwrap();
        if res.status() == 200 {
            break res.json().await.unwrap();
        }
        assert!(tokio::time::Instant::now() < deadline, "the demo's spend index was never ready");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    };
    assert_eq!(spend["rows"][0]["group"], "CustomerChatbot-Dev", "{spend}");
    assert_eq!(spend["rows"][0]["requests"], 1, "{spend}");
    assert!(ledger.exists(), "{}", ledger.display());
    sigterm(&child).await;
    let status = tokio::time::timeout(WAIT, child.wait()).await.unwrap().unwrap();
    assert!(status.success());
    assert!(!ledger.exists(), "the demo's ledger outlived it");
}

/// A certificate authority, and servers with certificates it signed.
struct TestCa {
    key: rcgen::KeyPair,
    cert: rcgen::Certificate,
}

impl TestCa {
    fn new() -> Self {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        Self { key, cert }
    }

    /// TLS with a certificate for `name`.
    fn server(&self, name: &str) -> tokio_rustls::TlsAcceptor {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let config =
            rustls::ServerConfig::builder().with_no_client_auth().with_single_cert(vec![cert.der().clone()], key);
        tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config.unwrap()))
    }
}

/// Terminates TLS on a port of its own and relays each connection to `backend` in plain HTTP.
async fn tls_front(acceptor: tokio_rustls::TlsAcceptor, backend: std::net::SocketAddr) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let (Ok(mut tls), Ok(mut plain)) =
                    (acceptor.accept(tcp).await, tokio::net::TcpStream::connect(backend).await)
                else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    port
}

#[tokio::test]
async fn serve_reaches_an_https_upstream_it_trusts_and_refuses_one_it_does_not() {
    let mock = Mock::ok_json().await;
    let (ca, other_ca) = (TestCa::new(), TestCa::new());
    let dir = temp_dir("tls");
    let trusted = dir.join("trusted-ca.pem");
    std::fs::write(&trusted, ca.cert.pem()).unwrap();
    // The CA store is the system's, which SSL_CERT_FILE and an empty SSL_CERT_DIR stand in for here.
    let no_dir = dir.join("no-certs");
    std::fs::create_dir_all(&no_dir).unwrap();
    let env = [
        ("MANTLE_API_KEY", UPSTREAM_KEY),
        ("SSL_CERT_FILE", trusted.to_str().unwrap()),
        ("SSL_CERT_DIR", no_dir.to_str().unwrap()),
    ];
    // One gateway per upstream certificate; the answer is its status and error code, if any.
    let answer = async |server: tokio_rustls::TlsAcceptor| {
        let port = tls_front(server, mock.addr).await;
        let config = config_text(mock.addr, &Opts::default())
            .replace(&format!("http://{}", mock.addr), &format!("https://localhost:{port}"));
        let config_path = dir.join(format!("gateway-{port}.toml"));
        std::fs::write(&config_path, config).unwrap();
        let served = serve(&config_path, &env).await;
        let res = reqwest::Client::new()
            .post(format!("http://{}/v1/chat/completions", served.addr))
            .bearer_auth(CHAT_KEY)
            .header("content-type", "application/json")
            .body(CHAT_BODY)
            .send()
            .await
            .unwrap();
        (port, error_code(res).await)
    };

    let (port, (status, _)) = answer(ca.server("localhost")).await;
    assert_eq!(status, 200);
    let seen = mock.next().await;
    assert_eq!(seen.header("authorization"), Some(format!("Bearer {UPSTREAM_KEY}").as_str()));
    assert_eq!(seen.header("openai-project"), Some("proj_chat"));
    assert_eq!(seen.header("host"), Some(format!("localhost:{port}").as_str()));

    // Signed by a CA the gateway does not trust, or for another name: nothing reaches upstream.
    for server in [other_ca.server("localhost"), ca.server("example.invalid")] {
        let (_, answer) = answer(server).await;
        assert_eq!(answer, (502, "upstream_unreachable".to_owned()));
    }
    assert_eq!(mock.hits(), 1);
}

#[tokio::test]
async fn a_refused_gateway_credential_is_logged_once_per_burst_and_check_can_probe_for_it() {
    let key_ok = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mock = Mock::start({
        let key_ok = key_ok.clone();
        move |seen| {
            let ok = key_ok.load(std::sync::atomic::Ordering::SeqCst)
                && seen.header("authorization") == Some(&format!("Bearer {UPSTREAM_KEY}"));
            async move {
                if ok {
                    json_response(http::StatusCode::OK, r#"{"object":"list","data":[]}"#)
                } else {
                    json_response(
                        http::StatusCode::UNAUTHORIZED,
                        r#"{"error":{"message":"bad key sk-123","code":"invalid_api_key"}}"#,
                    )
                }
            }
        }
    })
    .await;
    let dir = temp_dir("upstream-auth");
    let config_path = dir.join("gateway.toml");
    std::fs::write(&config_path, config_text(mock.addr, &Opts::default())).unwrap();

    let probe = || async {
        Command::new(BIN)
            .args(["check", "--probe-upstream", "--config"])
            .arg(&config_path)
            .env("MANTLE_API_KEY", UPSTREAM_KEY)
            .output()
            .await
            .unwrap()
    };
    let out = probe().await;
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refused the gateway's credential (GET /v1/models: 401 Unauthorized)"), "{err}");

    let mut served = serve(&config_path, &[("MANTLE_API_KEY", UPSTREAM_KEY)]).await;
    let client = reqwest::Client::new();
    for id in ["rid-refused-1", "rid-refused-2", "rid-refused-3"] {
        let res = client
            .get(format!("http://{}/v1/models", served.addr))
            .bearer_auth(CHAT_KEY)
            .header("x-request-id", id)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 502);
    }
    // Upstream takes the key again, and then refuses it again: a new burst, logged at once.
    let models = |id: &'static str| {
        client.get(format!("http://{}/v1/models", served.addr)).bearer_auth(CHAT_KEY).header("x-request-id", id).send()
    };
    key_ok.store(true, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(models("rid-accepted").await.unwrap().status(), 200);
    key_ok.store(false, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(models("rid-refused-again").await.unwrap().status(), 502);
    sigterm(&served.child).await;
    assert!(tokio::time::timeout(WAIT, served.child.wait()).await.unwrap().unwrap().success());
    served.rest().await;
    let errors: Vec<&serde_json::Value> = served.seen.iter().filter(|l| l["level"] == "ERROR").collect();
    assert_eq!(errors.len(), 2, "one line for each burst: {errors:?}");
    assert_eq!(errors[0]["upstream_status"], 401);
    assert_eq!(errors[0]["upstream_code"], "invalid_api_key");
    assert_eq!(errors[0]["span"]["request_id"], "rid-refused-1");
    assert_eq!(errors[1]["span"]["request_id"], "rid-refused-again");
    assert!(!errors[0].to_string().contains("sk-123"), "upstream's message is not logged: {}", errors[0]);
    let recovered: Vec<&serde_json::Value> = served
        .seen
        .iter()
        .filter(|l| l["message"].as_str().is_some_and(|m| m.contains("accepts the gateway's credential again")))
        .collect();
    assert_eq!(recovered.len(), 1, "{recovered:?}");
    assert_eq!((recovered[0]["level"].as_str(), recovered[0]["unlogged_refusals"].as_u64()), (Some("INFO"), Some(2)));
    let access: Vec<&serde_json::Value> = served.seen.iter().filter(|l| l["target"] == "mantlegate::access").collect();
    assert!(
        access
            .iter()
            .filter(|l| l["request_id"] != "rid-accepted")
            .all(|l| l["status"] == 502 && l["error"] == "upstream_auth_failed"),
        "{access:?}"
    );

    key_ok.store(true, std::sync::atomic::Ordering::SeqCst);
    let out = probe().await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("accepts the gateway's credential (GET /v1/models: 200 OK)"));
}
