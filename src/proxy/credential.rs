//! The credential the gateway presents upstream, and the watch that re-reads `upstream.api_key_file` when it
//! changes (see `watch`), so that a rotated key (a Kubernetes Secret update, an edited file) takes effect
//! without a restart. A key that reads back the same changes nothing, and one that cannot be used (missing,
//! empty, not a header value) leaves the previous key in use.

use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::{ArcSwap, Guard};
use http::HeaderValue;

use crate::config::{KeySource, Secret, UpstreamAuth};
use crate::metering::metrics::Metrics;
use crate::watch::FileWatch;

/// The credential the gateway presents upstream.
#[derive(Clone)]
pub enum Credential {
    /// `Authorization: Bearer <key>` (and `x-api-key: <key>` on the Anthropic route, as Anthropic clients send).
    ApiKey(ApiKey),
    /// The caller's own `Authorization` / `x-api-key` go through untouched.
    Passthrough,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::ApiKey(_) => "ApiKey([redacted])",
            Self::Passthrough => "Passthrough",
        })
    }
}

impl Credential {
    /// A Bedrock API key credential.
    pub fn api_key(key: &Secret) -> anyhow::Result<Self> {
        let current = ArcSwap::from_pointee(KeyHeaders::new(key)?);
        Ok(Self::ApiKey(ApiKey(Arc::new(KeyState { current, reloading: Mutex::new(()) }))))
    }

    /// The credential `auth` configures, its key read now.
    pub fn read(auth: &UpstreamAuth) -> anyhow::Result<Self> {
        match auth {
            UpstreamAuth::ApiKey(source) => Self::api_key(&source.read()?),
            UpstreamAuth::Passthrough => Ok(Self::Passthrough),
        }
    }

    /// Starts re-reading `upstream.api_key_file` on change, when `auth` reads the key from a file. A watch that
    /// cannot be set up (no inotify instances left, say) is logged, and the key read stays in use.
    pub fn watch(&self, auth: &UpstreamAuth, metrics: &Arc<Metrics>) -> Option<FileWatch> {
        let (UpstreamAuth::ApiKey(source @ KeySource::File(path)), Self::ApiKey(key)) = (auth, self) else {
            return None;
        };
        let started = FileWatch::start(path, "upstream.api_key_file", {
            let (source, key, metrics) = (source.clone(), key.clone(), metrics.clone());
            move || key.reload(&source, &metrics)
        });
        match started {
            Ok(watch) => {
                // A change between the first read and the watch would otherwise wait for the next one.
                key.reload(source, metrics);
                Some(watch)
            }
            Err(e) => {
                tracing::warn!(error = %e, "upstream.api_key_file will not be re-read when it changes");
                None
            }
        }
    }
}

/// A Bedrock API key, replaceable while requests use it.
#[derive(Clone)]
pub struct ApiKey(Arc<KeyState>);

struct KeyState {
    current: ArcSwap<KeyHeaders>,
    /// Held through each re-read, so that a slower read of an older key cannot replace a newer one.
    reloading: Mutex<()>,
}

/// The key as ready header values, both marked sensitive.
pub struct KeyHeaders {
    /// `Bearer <key>`.
    pub bearer: HeaderValue,
    /// `<key>`.
    pub raw: HeaderValue,
}

impl KeyHeaders {
    fn new(key: &Secret) -> anyhow::Result<Self> {
        let invalid = || anyhow::anyhow!("upstream API key is not a valid header value");
        let mut bearer = HeaderValue::try_from(format!("Bearer {}", key.expose())).map_err(|_| invalid())?;
        let mut raw = HeaderValue::try_from(key.expose()).map_err(|_| invalid())?;
        bearer.set_sensitive(true);
        raw.set_sensitive(true);
        Ok(Self { bearer, raw })
    }
}

impl ApiKey {
    /// The key in use now.
    pub fn headers(&self) -> Guard<Arc<KeyHeaders>> {
        self.0.current.load()
    }

    /// Reads `source` and, if it holds a different key, puts it in use.
    fn reload(&self, source: &KeySource, metrics: &Metrics) {
        let _one_at_a_time = self.0.reloading.lock().unwrap_or_else(PoisonError::into_inner);
        match source.read().and_then(|key| KeyHeaders::new(&key)) {
            Ok(new) if new.raw == self.0.current.load().raw => {}
            Ok(new) => {
                self.0.current.store(Arc::new(new));
                metrics.upstream_key_reload("changed");
                tracing::info!(source = %source, "upstream API key re-read; new requests use it");
            }
            Err(e) => {
                metrics.upstream_key_reload("failed");
                tracing::warn!(error = %e, "upstream API key could not be re-read; the previous key stays in use");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_credential_never_shows_its_key() {
        let credential = Credential::api_key(&Secret::new("upstream-key".into())).expect("credential");
        assert!(!format!("{credential:?}").contains("upstream-key"));
        let Credential::ApiKey(key) = credential else { panic!("an API key") };
        assert!(key.headers().bearer.is_sensitive() && key.headers().raw.is_sensitive());
    }
}
