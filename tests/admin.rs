//! The admin listener's bounds: what reaches the admin port (probes, scrapes, or anything that can open a
//! connection to it) cannot hold connections for ever, cannot take every file descriptor, and so cannot starve
//! traffic; and `POST /reload` is for the operator only.
#![allow(clippy::unwrap_used)]

mod common;

use common::binary::*;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The process's open file descriptors.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
}

#[tokio::test]
async fn idle_and_half_sent_admin_connections_are_capped_and_closed_and_traffic_is_served() {
    let mock = Mock::ok_json().await;
    let dir = temp_dir("admin-bounds");
    let config = dir.join("gateway.toml");
    let opts = Opts { server: "header_read_timeout = \"500ms\"\nworkers = 1", ..Opts::default() };
    std::fs::write(&config, config_text(mock.addr, &opts)).unwrap();
    // 128 descriptors: without a cap, the admin connections below would take every one left.
    let served = serve_with_nofile(&config, &[("MANTLE_API_KEY", UPSTREAM_KEY)], 128).await;
    let pid = served.child.id().unwrap();
    let client = reqwest::Client::builder().timeout(WAIT).build().unwrap();
    let models = || client.get(format!("http://{}/v1/models", served.addr)).bearer_auth(CHAT_KEY).send();
    assert_eq!(models().await.unwrap().status(), 200);
    let baseline = open_fds(pid);

    // 150 connections to the admin port: half send nothing, half half a request head.
    let mut held = Vec::new();
    for i in 0..150 {
        let mut conn = tokio::net::TcpStream::connect(&served.admin).await.unwrap();
        if i % 2 == 1 {
            conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n").await.unwrap();
        }
        held.push(conn);
    }
    // Traffic is served all the while, on a connection of its own.
    let res = reqwest::Client::new().get(format!("http://{}/v1/models", served.addr)).bearer_auth(CHAT_KEY).send();
    assert_eq!(res.await.unwrap().status(), 200);
    // The cap's worth of admin connections, and the traffic request's own connection and the one upstream.
    assert!(
        open_fds(pid) <= baseline + mantlegate::admin::MAX_CONNECTIONS + 2,
        "{} descriptors open, {baseline} before",
        open_fds(pid)
    );

    // Every one of them is closed by the gateway: past the cap at once, the rest after the head timeout.
    for mut conn in held {
        let mut buf = [0u8; 256];
        let read = tokio::time::timeout(WAIT, conn.read(&mut buf)).await.expect("an admin connection held open");
        // Closed with nothing sent, or with hyper's 408 to a half-sent head.
        assert!(matches!(read, Ok(0) | Err(_)) || buf.starts_with(b"HTTP/1.1 408"), "{read:?}");
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    while open_fds(pid) > baseline + 2 {
        assert!(tokio::time::Instant::now() < deadline, "{} descriptors open, {baseline} before", open_fds(pid));
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(client.get(format!("http://{}/healthz", served.admin)).send().await.unwrap().status(), 200);
    assert_eq!(models().await.unwrap().status(), 200);
}

#[tokio::test]
async fn reload_is_a_post_from_this_host() {
    let mock = Mock::ok_json().await;
    let dir = temp_dir("admin-reload");
    let config = dir.join("gateway.toml");
    std::fs::write(&config, config_text(mock.addr, &Opts::default())).unwrap();
    let served = serve(&config, &[("MANTLE_API_KEY", UPSTREAM_KEY)]).await;
    let client = reqwest::Client::new();
    let url = format!("http://{}/reload", served.admin);
    assert_eq!(client.get(&url).send().await.unwrap().status(), 405);
    let res = client.post(&url).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let outcome: serde_json::Value = res.json().await.unwrap();
    assert_eq!(outcome["result"], "unchanged");
}

#[tokio::test]
async fn an_admin_connection_serves_one_request_and_is_closed() {
    let gw = Gw::start(Mock::ok_json().await, Opts::default()).await;
    let mut conn = tokio::net::TcpStream::connect(gw.admin).await.unwrap();
    // Two requests at once on one connection: the first is answered, and the connection closed after it.
    conn.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\nGET /metrics HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, conn.read_to_end(&mut answer)).await.expect("the connection was held open").unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert_eq!(answer.matches("HTTP/1.1 ").count(), 1, "{answer}");
    assert!(
        answer.starts_with("HTTP/1.1 200 ") && answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
}

#[tokio::test]
async fn a_configured_admin_token_guards_all_but_the_probes_and_a_rotated_token_is_in_force_at_once() {
    let mock = Mock::ok_json().await;
    let dir = temp_dir("admin-token");
    let token_file = dir.join("admin-token");
    let (first, second) = ("first-admin-token-0123456789", "second-admin-token-0123456789");
    std::fs::write(&token_file, format!("{first}\n")).unwrap();
    let config = dir.join("gateway.toml");
    let server = format!("admin_token_file = \"{}\"", token_file.display());
    let opts = Opts { server: Box::leak(server.into_boxed_str()), ..Opts::default() };
    std::fs::write(&config, config_text(mock.addr, &opts)).unwrap();
    let served = serve(&config, &[("MANTLE_API_KEY", UPSTREAM_KEY)]).await;
    let client = reqwest::Client::new();
    let get = |path: &str, token: Option<&str>| {
        let mut req = client.get(format!("http://{}{path}", served.admin));
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        req.send()
    };

    for probe in ["/healthz", "/readyz"] {
        assert_eq!(get(probe, None).await.unwrap().status(), 200, "{probe}");
    }
    for path in ["/metrics", "/limits", "/api/spend", "/no-such-page"] {
        for token in [None, Some("wrong-admin-token-0123456789"), Some(&first[..first.len() - 1])] {
            let res = get(path, token).await.unwrap();
            assert_eq!(res.status(), 401, "{path} {token:?}");
            assert_eq!(res.headers()["www-authenticate"], "Bearer realm=\"mantlegate admin\"");
            let body: serde_json::Value = res.json().await.unwrap();
            assert_eq!(body["error"]["code"], "invalid_admin_token", "{path}");
        }
    }
    let metrics = get("/metrics", Some(first)).await.unwrap();
    assert_eq!(metrics.status(), 200);
    assert!(metrics.text().await.unwrap().contains("mantlegate_requests"));
    let reload = |token: Option<&str>| {
        let mut req = client.post(format!("http://{}/reload", served.admin));
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        req.send()
    };
    assert_eq!(reload(None).await.unwrap().status(), 401);
    assert_eq!(reload(Some(first)).await.unwrap().status(), 200);
    // `mantlegate reload` presents the token the config names.
    let cli = tokio::process::Command::new(BIN)
        .args(["reload", "--admin", &served.admin, "--config"])
        .arg(&config)
        .env("MANTLE_API_KEY", UPSTREAM_KEY)
        .output()
        .await
        .unwrap();
    let said = String::from_utf8_lossy(&cli.stdout).to_string() + &String::from_utf8_lossy(&cli.stderr);
    assert!(cli.status.success() && said.starts_with("unchanged: config"), "{said}");

    // A rotated Secret: the new token at once, the old one no more.
    std::fs::write(&token_file, second).unwrap();
    assert_eq!(get("/metrics", Some(first)).await.unwrap().status(), 401);
    assert_eq!(get("/metrics", Some(second)).await.unwrap().status(), 200);
    // A token that cannot be read lets nothing through; the probes still answer.
    std::fs::remove_file(&token_file).unwrap();
    let res = get("/metrics", Some(second)).await.unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(res.json::<serde_json::Value>().await.unwrap()["error"]["code"], "admin_token_unreadable");
    assert_eq!(get("/readyz", None).await.unwrap().status(), 200);
}

#[tokio::test]
async fn a_gateway_whose_admin_token_cannot_be_read_does_not_start() {
    let mock = Mock::ok_json().await;
    let dir = temp_dir("admin-token-unset");
    let config = dir.join("gateway.toml");
    let opts = Opts { server: "admin_token_env = \"MANTLEGATE_TEST_ADMIN_TOKEN\"", ..Opts::default() };
    std::fs::write(&config, config_text(mock.addr, &opts)).unwrap();
    let out = tokio::process::Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .env("MANTLE_API_KEY", UPSTREAM_KEY)
        .env_remove("MANTLEGATE_TEST_ADMIN_TOKEN")
        .output();
    let out = tokio::time::timeout(WAIT, out).await.expect("serve never exited").unwrap();
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("server.admin_token_env: environment variable MANTLEGATE_TEST_ADMIN_TOKEN is not set"),
        "{said}"
    );
    let short = tokio::process::Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .env("MANTLE_API_KEY", UPSTREAM_KEY)
        .env("MANTLEGATE_TEST_ADMIN_TOKEN", "hunter2")
        .output();
    let out = tokio::time::timeout(WAIT, short).await.expect("serve never exited").unwrap();
    let said = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && said.contains("shorter than 16") && !said.contains("hunter2"), "{said}");
}
