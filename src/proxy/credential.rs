//! The credential the gateway presents upstream: a Bedrock API key, AWS credentials (SigV4 signatures or
//! short-term keys minted from them, see [`crate::aws`]), or none of its own. For a key read from a file, the watch
//! that re-reads `upstream.api_key_file` when it changes (see `watch`), so that a rotated key (a Kubernetes Secret
//! update, an edited file) takes effect without a restart. A key that reads back the same changes nothing, and one
//! that cannot be used (missing, empty, not a header value) leaves the previous key in use.

use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::{ArcSwap, Guard};
use http::HeaderValue;

use anyhow::Context as _;

use crate::aws::AwsCredentials;
use crate::aws::sigv4::Signer;
use crate::aws::token::{AwsToken, Minted};
use crate::config::{KeySource, Secret, Upstream, UpstreamAuth};
use crate::metering::metrics::Metrics;
use crate::watch::FileWatch;

/// The credential the gateway presents upstream.
#[derive(Clone)]
pub enum Credential {
    /// `Authorization: Bearer <key>` (and `x-api-key: <key>` on the Anthropic route, as Anthropic clients send).
    ApiKey(ApiKey),
    /// Short-term keys minted from AWS credentials, sent as an API key is.
    AwsToken(Arc<AwsToken>),
    /// Every request signed with AWS credentials.
    SigV4(Arc<Signer>),
    /// The caller's own `Authorization` / `x-api-key` go through untouched.
    Passthrough,
}

/// The key to send as `Authorization: Bearer` (and `x-api-key`).
pub enum Bearer {
    /// The configured key.
    Static(Guard<Arc<KeyHeaders>>),
    /// A short-term key.
    Minted(Guard<Arc<Minted>>),
}

impl std::ops::Deref for Bearer {
    type Target = KeyHeaders;

    fn deref(&self) -> &KeyHeaders {
        match self {
            Self::Static(key) => key,
            Self::Minted(minted) => &minted.headers,
        }
    }
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::ApiKey(_) => "ApiKey([redacted])",
            Self::AwsToken(_) => "AwsToken([redacted])",
            Self::SigV4(_) => "SigV4([redacted])",
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

    /// The credential `upstream` configures, ready to use: its key read, or AWS credentials fetched (and kept
    /// fresh from then on), whose metrics go to `metrics`.
    pub async fn connect(upstream: &Upstream, metrics: &Metrics) -> anyhow::Result<Self> {
        let region = || upstream.region.clone().context("upstream.region is not set");
        match &upstream.auth {
            UpstreamAuth::ApiKey(source) => Self::api_key(&source.read()?),
            UpstreamAuth::Passthrough => Ok(Self::Passthrough),
            UpstreamAuth::SigV4 => {
                let region = region()?;
                let credentials = AwsCredentials::connect(&region, metrics.aws_credentials()).await?;
                Ok(Self::SigV4(Arc::new(Signer::new(credentials, region, upstream.host_header()?))))
            }
            UpstreamAuth::AwsToken => {
                let region = region()?;
                let credentials = AwsCredentials::connect(&region, metrics.aws_credentials()).await?;
                Ok(Self::AwsToken(Arc::new(AwsToken::new(credentials, region)?)))
            }
        }
    }

    /// The key to send as a bearer key, if the gateway sends one.
    pub fn bearer(&self) -> Option<Bearer> {
        match self {
            Self::ApiKey(key) => Some(Bearer::Static(key.headers())),
            Self::AwsToken(token) => Some(Bearer::Minted(token.key())),
            Self::SigV4(_) | Self::Passthrough => None,
        }
    }

    /// Upstream refused this credential: AWS credentials are fetched anew soon (and a short-term key minted
    /// anew); a static key can only be replaced by its operator.
    pub fn refused(&self) {
        match self {
            Self::SigV4(signer) => signer.credentials().refused(),
            Self::AwsToken(token) => token.refused(),
            Self::ApiKey(_) | Self::Passthrough => {}
        }
    }

    /// Whether the gateway presents a credential of its own, in place of the caller's.
    pub fn replaces_callers(&self) -> bool {
        !matches!(self, Self::Passthrough)
    }

    /// What the credential is, for `mantlegate check` and the start-up log: never the secret.
    pub fn describe(&self, upstream: &Upstream) -> String {
        let region = upstream.region.as_deref().unwrap_or("");
        match (self, &upstream.auth) {
            (Self::ApiKey(_), UpstreamAuth::ApiKey(source)) => format!("api_key from {source}"),
            (Self::AwsToken(token), _) => format!(
                "aws_token (short-term Bedrock API keys for {region}, renewed before they expire) from {}",
                token.credentials().describe()
            ),
            (Self::SigV4(signer), _) => format!(
                "sigv4 (every request signed for bedrock-mantle in {region}) with {}",
                signer.credentials().describe()
            ),
            _ => "passthrough (the caller's own credential)".into(),
        }
    }

    /// What to check when upstream refuses this credential.
    pub fn refusal_hint(&self) -> &'static str {
        match self {
            Self::ApiKey(_) => "check upstream.api_key_env / api_key_file",
            Self::AwsToken(_) | Self::SigV4(_) => {
                "check the gateway's AWS credentials (`mantlegate check` names their source), their role's \
                 bedrock-mantle permissions, and that the host's clock is right"
            }
            Self::Passthrough => "the caller's own credential was refused",
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
    /// The headers of `key`.
    pub fn new(key: &Secret) -> anyhow::Result<Self> {
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
