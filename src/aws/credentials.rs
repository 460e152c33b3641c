//! AWS credentials from the standard chain, as the AWS SDKs find them: environment variables, the shared profile,
//! a web identity token (EKS IRSA), the container credentials endpoint (ECS task roles, EKS Pod Identity), EC2
//! instance metadata. They are fetched before the gateway starts (which refuses to start without them) and then
//! refreshed in the background before they expire, so a request only ever reads the credentials in hand.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use arc_swap::{ArcSwap, Guard};
use aws_config::default_provider::credentials::DefaultCredentialsChain;
use aws_config::provider_config::ProviderConfig;
use aws_credential_types::Credentials;
use aws_credential_types::credential_feature::AwsCredentialFeature;
use aws_credential_types::provider::ProvideCredentials as _;
use aws_credential_types::provider::error::CredentialsError;
use aws_smithy_http_client::tls;
use aws_smithy_runtime_api::client::identity::Identity;
use aws_smithy_types::error::display::DisplayErrorContext;
use tokio::sync::Notify;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::metering::metrics::AwsCredentialMetrics;

/// How far ahead of their expiry credentials are refreshed (as the AWS SDKs' token providers do), or, for
/// credentials that live less than twice this long, halfway to it.
pub const REFRESH_MARGIN: Duration = Duration::from_secs(300);

/// The shortest wait before a refresh, and the first wait after a failed one (doubled on each further failure, up
/// to [`RETRY_MAX`]).
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);

/// The longest the chain may take to answer: each of its sources has timeouts of its own (instance metadata's are
/// about a second each), this bounds them all.
const FETCH_LIMIT: Duration = Duration::from_secs(30);

/// The soonest credentials are fetched again, ahead of their time, after the last fetch: however many requests
/// are refused, the chain (STS, say) is asked at most this often.
const EARLY_FETCH_MIN: Duration = Duration::from_secs(5);

/// Credentials from the AWS chain, kept fresh. Clones share them; the refresh stops when the last clone is gone.
#[derive(Clone)]
pub struct AwsCredentials(Arc<Shared>);

struct Shared {
    current: Arc<ArcSwap<Current>>,
    /// Wakes the refresher ahead of its time: upstream refused the credentials, or they are past their expiry.
    fetch_now: Arc<Notify>,
    _refresher: DropGuard,
}

/// Credentials in hand.
pub struct Current {
    /// The credentials themselves (their `Debug` redacts the secret).
    pub credentials: Credentials,
    /// The same, as the signer takes them.
    pub identity: Identity,
}

impl AwsCredentials {
    /// Fetches credentials from the chain (its STS calls go to `region`'s endpoint) and starts refreshing them.
    /// Fails when no source in the chain has credentials to give.
    pub async fn connect(region: &str, metrics: AwsCredentialMetrics) -> anyhow::Result<Self> {
        let chain = chain(region).await;
        let credentials = fetch(&chain).await.context(
            "no AWS credentials: the chain looks in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, the shared profile \
             (AWS_PROFILE), a web identity token (AWS_WEB_IDENTITY_TOKEN_FILE with AWS_ROLE_ARN, as EKS IRSA sets \
             them), the container credentials endpoint (ECS task roles, EKS Pod Identity) and EC2 instance metadata",
        )?;
        metrics.refreshed(credentials.expiry());
        let first = refresh_in(credentials.expiry(), SystemTime::now());
        let current = Arc::new(ArcSwap::from_pointee(Current::new(credentials)));
        let (stop, fetch_now) = (CancellationToken::new(), Arc::new(Notify::new()));
        let refresher = Refresher { chain, current: current.clone(), metrics, fetch_now: fetch_now.clone() };
        tokio::spawn(refresher.run(stop.clone(), first));
        Ok(Self(Arc::new(Shared { current, fetch_now, _refresher: stop.drop_guard() })))
    }

    /// `credentials`, never refreshed: for tests.
    #[cfg(test)]
    pub(crate) fn fixed(credentials: Credentials) -> Self {
        let current = Arc::new(ArcSwap::from_pointee(Current::new(credentials)));
        let fetch_now = Arc::new(Notify::new());
        Self(Arc::new(Shared { current, fetch_now, _refresher: CancellationToken::new().drop_guard() }))
    }

    /// The credentials in hand. Ones past their expiry (the refresh was late: the machine was suspended, or
    /// the chain failed until now) are still given, and new ones fetched at once.
    pub fn current(&self) -> Guard<Arc<Current>> {
        let current = self.0.current.load();
        if current.credentials.expiry().is_some_and(|at| at <= SystemTime::now()) {
            self.0.fetch_now.notify_one();
        }
        current
    }

    /// Upstream refused these credentials (revoked, say, or their role's trust changed): fetch new ones now,
    /// rather than at their scheduled refresh, which may be an hour away.
    pub fn refused(&self) {
        self.0.fetch_now.notify_one();
    }

    /// Where the credentials in hand came from, their access key's last four characters and when they expire:
    /// for `mantlegate check` and the start-up log, never the secret.
    pub fn describe(&self) -> String {
        let current = self.current();
        let credentials = &current.credentials;
        let key = credentials.access_key_id();
        let tail = key.get(key.len().saturating_sub(4)..).unwrap_or("");
        let expiry = match credentials.expiry() {
            Some(at) => format!("expiring {}", humantime::format_rfc3339_seconds(at)),
            None => "not expiring".into(),
        };
        format!("AWS credentials from {}, access key ending {tail}, {expiry}", source(credentials))
    }
}

impl Current {
    fn new(credentials: Credentials) -> Self {
        let identity = Identity::from(credentials.clone());
        Self { credentials, identity }
    }
}

/// The SDK's default chain, its HTTP client (for STS, the container endpoint and instance metadata) on ring.
async fn chain(region: &str) -> DefaultCredentialsChain {
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(tls::rustls_provider::CryptoMode::Ring))
        .build_https();
    DefaultCredentialsChain::builder()
        .configure(ProviderConfig::default().with_http_client(http))
        .region(aws_config::Region::new(region.to_owned()))
        .build()
        .await
}

async fn fetch(chain: &DefaultCredentialsChain) -> anyhow::Result<Credentials> {
    match tokio::time::timeout(FETCH_LIMIT, chain.provide_credentials()).await {
        Ok(Ok(credentials)) => Ok(credentials),
        Ok(Err(CredentialsError::CredentialsNotLoaded(_))) => anyhow::bail!("none of them has any"),
        // A source that has some but failed to give them (an STS refusal, say): its whole story.
        Ok(Err(e)) => Err(anyhow::anyhow!("{}", DisplayErrorContext(&e))),
        Err(_) => anyhow::bail!("the AWS credential chain did not answer within {FETCH_LIMIT:?}"),
    }
}

/// The background refresh of one set of credentials.
struct Refresher {
    chain: DefaultCredentialsChain,
    current: Arc<ArcSwap<Current>>,
    metrics: AwsCredentialMetrics,
    fetch_now: Arc<Notify>,
}

impl Refresher {
    /// Refreshes the credentials in `current` when `wait` says, or sooner when woken (at most every
    /// [`EARLY_FETCH_MIN`]), until `stop`. Credentials that never expire (static keys in the environment or a
    /// profile) are fetched again only when woken.
    async fn run(self, stop: CancellationToken, mut wait: Option<Duration>) {
        let mut retry = RETRY_MIN;
        let mut fetched = Instant::now();
        loop {
            let scheduled = async {
                match wait {
                    Some(pause) => tokio::time::sleep(pause).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = scheduled => {}
                () = self.fetch_now.notified() => {
                    let soonest = fetched + EARLY_FETCH_MIN;
                    tokio::select! {
                        () = tokio::time::sleep_until(soonest.into()) => {}
                        () = stop.cancelled() => return,
                    }
                    tracing::warn!("fetching new AWS credentials ahead of time: upstream refused the ones in hand, or they expired");
                }
                () = stop.cancelled() => return,
            }
            fetched = Instant::now();
            match fetch(&self.chain).await {
                Ok(credentials) => {
                    self.metrics.refreshed(credentials.expiry());
                    wait = refresh_in(credentials.expiry(), SystemTime::now());
                    retry = RETRY_MIN;
                    tracing::info!(
                        source = source(&credentials),
                        expiry = ?credentials.expiry().map(humantime::format_rfc3339_seconds),
                        "AWS credentials refreshed"
                    );
                    self.current.store(Arc::new(Current::new(credentials)));
                }
                Err(e) => {
                    self.metrics.failed();
                    let held = self.current.load().credentials.expiry();
                    tracing::warn!(
                        error = %format!("{e:#}"),
                        retry_in = ?retry,
                        held_expiry = ?held.map(humantime::format_rfc3339_seconds),
                        "refreshing the AWS credentials failed; the ones in hand stay in use until they expire"
                    );
                    wait = Some(retry);
                    retry = (retry * 2).min(RETRY_MAX);
                }
            }
        }
    }
}

/// How long until credentials expiring at `expiry` are refreshed, `now` being now: [`REFRESH_MARGIN`] ahead of
/// their expiry, or halfway there if they live less than twice that; never if they do not expire.
pub fn refresh_in(expiry: Option<SystemTime>, now: SystemTime) -> Option<Duration> {
    let left = expiry?.duration_since(now).unwrap_or_default();
    let wait = if left > 2 * REFRESH_MARGIN { left - REFRESH_MARGIN } else { left / 2 };
    Some(wait.max(RETRY_MIN))
}

/// Which source of the chain `credentials` came from.
fn source(credentials: &Credentials) -> &'static str {
    use AwsCredentialFeature as F;
    let features = credentials.get_property::<Vec<AwsCredentialFeature>>().map(Vec::as_slice).unwrap_or_default();
    let has = |feature: F| features.contains(&feature);
    if has(F::CredentialsEnvVars) {
        "the environment (AWS_ACCESS_KEY_ID)"
    } else if has(F::CredentialsProfileStsWebIdToken) {
        "a web identity token (AWS_WEB_IDENTITY_TOKEN_FILE and AWS_ROLE_ARN: EKS IRSA)"
    } else if has(F::CredentialsHttp) {
        if std::env::var("AWS_CONTAINER_CREDENTIALS_FULL_URI")
            .is_ok_and(|uri| uri.contains("169.254.170.23") || uri.contains("[fd00:ec2::23]"))
        {
            "the EKS Pod Identity agent"
        } else {
            "the container credentials endpoint (ECS task role)"
        }
    } else if has(F::CredentialsImds) {
        "EC2 instance metadata (the instance profile's role)"
    } else if has(F::CredentialsProfile) || has(F::CredentialsProcess) || has(F::CredentialsStsAssumeRole) {
        "the shared profile (AWS_PROFILE, else default)"
    } else {
        "the AWS credential chain"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refreshes_come_ahead_of_expiry() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let at = |secs| Some(now + Duration::from_secs(secs));
        assert_eq!(refresh_in(None, now), None, "static credentials are never refreshed");
        assert_eq!(refresh_in(at(3600), now), Some(Duration::from_secs(3300)), "an hour's: five minutes ahead");
        assert_eq!(refresh_in(at(43_200), now), Some(Duration::from_secs(42_900)));
        assert_eq!(refresh_in(at(600), now), Some(Duration::from_secs(300)), "short-lived: halfway");
        assert_eq!(refresh_in(at(20), now), Some(Duration::from_secs(10)));
        assert_eq!(refresh_in(at(1), now), Some(RETRY_MIN), "never sooner than a second");
        assert_eq!(refresh_in(Some(now - Duration::from_secs(5)), now), Some(RETRY_MIN), "already expired");
    }

    #[test]
    fn sources_are_named_from_what_the_chain_marks() {
        let marked = |feature: Option<AwsCredentialFeature>| {
            let mut credentials = Credentials::new("AKIDEXAMPLE", "secret", None, None, "test");
            if let Some(feature) = feature {
                credentials.get_property_mut_or_default::<Vec<AwsCredentialFeature>>().push(feature);
            }
            source(&credentials)
        };
        assert!(marked(Some(AwsCredentialFeature::CredentialsEnvVars)).contains("AWS_ACCESS_KEY_ID"));
        assert!(marked(Some(AwsCredentialFeature::CredentialsProfileStsWebIdToken)).contains("IRSA"));
        assert!(marked(Some(AwsCredentialFeature::CredentialsImds)).contains("instance metadata"));
        assert!(marked(Some(AwsCredentialFeature::CredentialsProfile)).contains("profile"));
        assert_eq!(marked(None), "the AWS credential chain");
    }
}
