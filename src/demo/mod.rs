//! `mantlegate demo`: the real gateway, configured with a few projects, keys and a route, in front of the
//! built-in [`stub`] upstream on loopback, so attribution can be tried with curl or an OpenAI SDK and no AWS
//! account. The demo keys are fixed and printed: this configuration is for trying things, never for traffic.

pub mod stub;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;

use crate::auth::hash_key;
use crate::config::{Config, Secret};
use crate::proxy::Credential;

/// The upstream key the gateway presents to the stub (stands in for a Bedrock API key).
const UPSTREAM_KEY: &str = "demo-upstream-bedrock-key";

/// Demo gateway keys: (name, key, project, may_select).
pub const DEMO_KEYS: [(&str, &str, &str, &str); 3] = [
    ("chatbot-backend", "demo-chatbot-key", "CustomerChatbot-Prod", "\"CustomerChatbot-Dev\""),
    ("search-batch", "demo-search-key", "Search-Research", ""),
    ("ops-scripts", "demo-ops-key", "", ""),
];

/// The demo configuration, with `base_url` pointing at the stub and the usage ledger at `ledger`.
pub fn config_toml(upstream: SocketAddr, listen: SocketAddr, admin_listen: SocketAddr, ledger: &Path) -> String {
    // A TOML basic string: Rust's escapes of `"` and `\` are TOML's.
    let ledger = format!("{:?}", ledger.display().to_string());
    let mut toml = format!(
        r#"
[server]
listen = "{listen}"
admin_listen = "{admin_listen}"
shutdown_grace = "2s"

[upstream]
base_url = "http://{upstream}"

[metering]
ledger_path = {ledger}

[attribution]
unattributed = "reject"

[taxonomy]
required_tags = ["Application", "Environment", "Team", "CostCenter"]
[taxonomy.allowed_values]
Environment = ["Production", "Development", "Staging", "Research"]

[[projects]]
name = "CustomerChatbot-Prod"
id = "proj_demo_chatbot_prod"
tags = {{ Application = "CustomerChatbot", Environment = "Production", Team = "CustomerExperience", CostCenter = "CC-1001" }}

[[projects]]
name = "CustomerChatbot-Dev"
id = "proj_demo_chatbot_dev"
tags = {{ Application = "CustomerChatbot", Environment = "Development", Team = "CustomerExperience", CostCenter = "CC-1001" }}

[[projects]]
name = "Search-Research"
id = "proj_demo_search"
tags = {{ Application = "Search", Environment = "Research", Team = "Discovery", CostCenter = "CC-2040" }}
models = ["openai.gpt-oss-20b"]

[[routes]]
prefix = "/chatbot"
project = "CustomerChatbot-Prod"
"#
    );
    for (name, key, project, may_select) in DEMO_KEYS {
        let project = if project.is_empty() { String::new() } else { format!("project = \"{project}\"\n") };
        toml.push_str(&format!(
            "\n[[keys]]\nname = \"{name}\"\nsha256 = \"{}\"\n{project}may_select = [{may_select}]\n",
            hex::encode(hash_key(key.as_bytes()))
        ));
    }
    toml
}

/// Starts the stub and the gateway, prints how to try them, and runs until Ctrl-C.
pub async fn run(listen: SocketAddr, admin_listen: SocketAddr) -> anyhow::Result<()> {
    let stub_listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await.context("binding the stub upstream")?;
    let stub_addr = stub_listener.local_addr()?;
    // The demo's own ledger, for its spend page and `usage report`; gone when it stops.
    let dir = std::env::temp_dir().join(format!("mantlegate-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let ledger = dir.join("usage.jsonl");
    let config = Config::from_toml(&config_toml(stub_addr, listen, admin_listen, &ledger))?;
    let stub = stub::router(stub::StubConfig {
        api_key: UPSTREAM_KEY.into(),
        project_ids: config.projects.iter().filter_map(|p| p.id.clone()).collect(),
        event_delay: Duration::from_millis(40),
    });
    let stub_listener = axum::serve::ListenerExt::tap_io(stub_listener, |tcp| drop(tcp.set_nodelay(true)));
    let stub_task = tokio::spawn(axum::serve(stub_listener, stub).into_future());

    let credential = Credential::api_key(&Secret::new(UPSTREAM_KEY.into()))?;
    let signal = crate::shutdown::signal();
    let running = crate::server::start(config, credential, Default::default())
        .await
        .context("starting the gateway (is something else on that port? try --listen 127.0.0.1:0)")?;
    println!("{}", instructions(running.addr, running.admin_addr, stub_addr, &ledger));

    let shutdown = running.shutdown.clone();
    tokio::select! {
        () = signal => running.stop().await,
        () = shutdown.wait() => running.stopped().await,
    }
    stub_task.abort();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn instructions(gw: SocketAddr, admin: SocketAddr, stub: SocketAddr, ledger: &Path) -> String {
    let ledger = ledger.display();
    let chat = r#"'{"model":"openai.gpt-oss-120b","messages":[{"role":"user","content":"Hi"}]}'"#;
    format!(
        r#"
mantlegate demo: the gateway on http://{gw}, in front of a stub upstream on http://{stub}.
Admin: http://{admin}/healthz  http://{admin}/readyz   Logs: one JSON line per request, below.
Spend: http://{admin}/ (the spend page: open it in a browser)   Ledger: {ledger}

Projects: CustomerChatbot-Prod (proj_demo_chatbot_prod), CustomerChatbot-Dev (proj_demo_chatbot_dev),
          Search-Research (proj_demo_search, only openai.gpt-oss-20b)
Keys:     demo-chatbot-key -> CustomerChatbot-Prod, may also select CustomerChatbot-Dev
          demo-search-key  -> Search-Research
          demo-ops-key     -> no project (unattributed: rejected)
Route:    http://{gw}/chatbot/v1 -> CustomerChatbot-Prod

Try it (the stub's answer names the project it was billed to):

  # attributed by key
  curl -s http://{gw}/v1/chat/completions -H 'Authorization: Bearer demo-chatbot-key' \
    -H 'Content-Type: application/json' -d {chat}

  # the key may select its Dev project by name or id
  curl -s http://{gw}/v1/chat/completions -H 'Authorization: Bearer demo-chatbot-key' \
    -H 'OpenAI-Project: CustomerChatbot-Dev' -H 'Content-Type: application/json' -d {chat}

  # ...but not someone else's: 403 project_not_allowed
  curl -s http://{gw}/v1/chat/completions -H 'Authorization: Bearer demo-chatbot-key' \
    -H 'OpenAI-Project: Search-Research' -H 'Content-Type: application/json' -d {chat}

  # a model outside the project's allowlist: 403 model_not_allowed
  curl -s http://{gw}/v1/chat/completions -H 'Authorization: Bearer demo-search-key' \
    -H 'Content-Type: application/json' -d {chat}

  # nothing attributes it: 403 project_required; no key: 401; admin API: 404
  curl -s http://{gw}/v1/models -H 'Authorization: Bearer demo-ops-key'
  curl -s http://{gw}/v1/models
  curl -s http://{gw}/v1/organization/projects -H 'Authorization: Bearer demo-chatbot-key'

  # streaming, through the route prefix
  curl -sN http://{gw}/chatbot/v1/chat/completions -H 'Authorization: Bearer demo-chatbot-key' \
    -H 'Content-Type: application/json' \
    -d '{{"model":"openai.gpt-oss-120b","stream":true,"messages":[{{"role":"user","content":"Hi"}}]}}'

  # any OpenAI client: only base_url changes (pip install openai)
  python3 -c 'from openai import OpenAI
c = OpenAI(base_url="http://{gw}/v1", api_key="demo-chatbot-key")
print(c.chat.completions.create(model="openai.gpt-oss-120b", messages=[{{"role": "user", "content": "Hi"}}]).choices[0].message.content)'

  # what was spent, by team (as the spend page shows it)
  mantlegate usage report --ledger {ledger} --group-by Team

Ctrl-C stops the demo (and removes its ledger).
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_config_is_valid() {
        let addr: SocketAddr = "127.0.0.1:1".parse().expect("addr");
        let ledger = Path::new("/tmp/mantlegate \"demo\"/usage.jsonl");
        let config =
            Config::from_toml(&config_toml(addr, "127.0.0.1:0".parse().expect("addr"), addr, ledger)).expect("valid");
        assert_eq!(config.metering.ledger_path.as_deref(), Some(ledger));
        assert_eq!(config.keys.len(), DEMO_KEYS.len());
        assert!(config.projects.iter().all(|p| p.id.is_some()));
    }
}
