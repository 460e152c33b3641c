//! The pooled upstream client: HTTP/1.1 keep-alive over TLS (or plain TCP for a local upstream), no Nagle
//! delay, and the configured connect timeout. Each traffic thread has a pool of its own around one shared
//! connector (and so one TLS configuration).

use std::time::Duration;

use axum::body::Body;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::config::Upstream;

/// How upstream connections are made.
pub type Connector = HttpsConnector<HttpConnector>;

/// One traffic thread's upstream client.
pub type UpstreamClient = Client<Connector, Body>;

/// Builds the connector. TLS trusts the system's CA store (so a corporate CA works); a plain-HTTP upstream
/// needs none.
pub fn connector(upstream: &Upstream) -> anyhow::Result<Connector> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(upstream.connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(60)));

    let tls = match hyper_rustls::HttpsConnectorBuilder::new().with_native_roots() {
        Ok(builder) => builder,
        Err(e) if upstream.scheme == http::uri::Scheme::HTTPS => {
            anyhow::bail!("no CA certificates to verify {} with (install ca-certificates): {e}", upstream.authority)
        }
        Err(_) => hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(
            rustls::ClientConfig::builder()
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth(),
        ),
    };
    Ok(tls.https_or_http().enable_http1().wrap_connector(http))
}

/// A client with a pool of its own. Its connections' tasks run on the runtime that makes them: the calling
/// thread's, for a traffic thread.
pub fn pool(connector: Connector) -> UpstreamClient {
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(256)
        .build(connector)
}
