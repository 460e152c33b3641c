//! The one pooled upstream client every request shares: HTTP/1.1 keep-alive over TLS (or plain TCP for a
//! local upstream), no Nagle delay, and the configured connect timeout.

use std::time::Duration;

use axum::body::Body;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::config::Upstream;

/// The shared upstream client.
pub type UpstreamClient = Client<HttpsConnector<HttpConnector>, Body>;

/// Builds the client. TLS trusts the system's CA store (so a corporate CA works); a plain-HTTP upstream
/// needs none.
pub fn build(upstream: &Upstream) -> anyhow::Result<UpstreamClient> {
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
    let connector = tls.https_or_http().enable_http1().wrap_connector(http);

    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(256)
        .build(connector))
}
