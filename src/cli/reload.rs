//! `mantlegate reload`: asks a running gateway, on its admin listener, to reload its config file
//! (`POST /reload`, what SIGHUP does), and prints what happened: the config in force, or every problem that
//! kept the file out.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

use crate::config::Secret;
use crate::live::Outcome;

/// How long the gateway may take to answer.
const TIMEOUT: Duration = Duration::from_secs(30);

/// Reloads the gateway whose admin listener is at `admin` (`host:port`), presenting `token` if it needs one; exit
/// status 0 when the file is the config in force, 1 when it was refused.
pub async fn run(admin: &str, token: Option<&Secret>) -> anyhow::Result<ExitCode> {
    let outcome = tokio::time::timeout(TIMEOUT, ask(admin, token))
        .await
        .map_err(|_| anyhow::anyhow!("{admin} did not answer within {TIMEOUT:?}"))??;
    Ok(match outcome {
        Outcome::Applied { sha256 } => {
            println!("reloaded: config {sha256} is in force");
            ExitCode::SUCCESS
        }
        Outcome::Unchanged { sha256 } => {
            println!("unchanged: config {sha256} was already in force");
            ExitCode::SUCCESS
        }
        Outcome::Rejected { problems } => {
            eprintln!("refused; the config in force stays ({} problem{}):", problems.len(), plural(problems.len()));
            for problem in problems {
                eprintln!("  {problem}");
            }
            ExitCode::FAILURE
        }
    })
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

async fn ask(admin: &str, token: Option<&Secret>) -> anyhow::Result<Outcome> {
    let (status, body, addr) = call(admin, http::Method::POST, "/reload", token).await?;
    serde_json::from_slice(&body).map_err(|_| {
        anyhow::anyhow!("{addr} answered {status}, not a reload outcome: {}", String::from_utf8_lossy(&body))
    })
}

/// Sends `method path` to the admin listener at `admin`, with the admin `token` if there is one: its status and
/// body, and the address it was sent to.
pub(super) async fn call(
    admin: &str,
    method: http::Method,
    path: &str,
    token: Option<&Secret>,
) -> anyhow::Result<(http::StatusCode, bytes::Bytes, String)> {
    // An unspecified address (a listener on all interfaces) is reached on loopback.
    let addr = admin.replace("0.0.0.0:", "127.0.0.1:").replace("[::]:", "[::1]:");
    let tcp = tokio::net::TcpStream::connect(&addr).await.with_context(|| {
        format!(
            "cannot reach the gateway's admin listener at {addr} (a changed server.admin_listen takes effect \
                 only at a restart: give the running one with --admin)"
        )
    })?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(connection);
    let mut request = http::Request::builder().method(method).uri(path).header(http::header::HOST, &addr);
    if let Some(token) = token {
        let mut value = http::HeaderValue::from_str(&format!("Bearer {}", token.expose()))?;
        value.set_sensitive(true);
        request = request.header(http::header::AUTHORIZATION, value);
    }
    let request = request.body(Empty::<bytes::Bytes>::new())?;
    let response = sender.send_request(request).await.with_context(|| format!("sending {path}"))?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, body, addr))
}
