//! `upstream.auth = "aws_token"`: short-term Bedrock API keys minted from the AWS chain's credentials, in the form
//! AWS's token generators (`aws-bedrock-token-generator` for Python, JavaScript and Java) produce: a SigV4
//! presigned `POST https://bedrock.amazonaws.com/?Action=CallWithBearerToken` (service `bedrock`, the region)
//! without its scheme, `&Version=1` appended, base64-encoded, prefixed `bedrock-api-key-`. A key lives at most
//! 12 hours and never past its credentials' own expiry.
//!
//! Minting is a signature made here, with no call to AWS, so keys are minted as requests need them: a request
//! finding the key in hand due for renewal ([`REFRESH_MARGIN`] before it expires, as the generators' refreshing
//! providers renew), or made from credentials that have since been refreshed, mints the next one itself.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::{ArcSwap, Guard};
use aws_sigv4::http_request::{SignableBody, SignableRequest, SignatureLocation, SigningSettings, sign};
use aws_sigv4::sign::v4;
use base64::Engine as _;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

use super::credentials::{AwsCredentials, Current, refresh_in};
use crate::config::Secret;
use crate::proxy::credential::KeyHeaders;

/// The longest a short-term key may live.
pub const MAX_LIFETIME: Duration = Duration::from_secs(12 * 3600);

const HOST: &str = "bedrock.amazonaws.com";
const SERVICE: &str = "bedrock";
const PREFIX: &str = "bedrock-api-key-";

/// What a query value keeps unescaped: RFC 3986's unreserved characters, as botocore's presigned URLs do.
const QUERY_VALUE: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~');

/// The presigned parameters, in the order the token generators write them.
const PARAMS: [&str; 7] = [
    "X-Amz-Algorithm",
    "X-Amz-Credential",
    "X-Amz-Date",
    "X-Amz-Expires",
    "X-Amz-SignedHeaders",
    "X-Amz-Security-Token",
    "X-Amz-Signature",
];

/// The short-term key `credentials` sign at `now`, living `lifetime` (whole seconds, at least one).
pub fn mint(current: &Current, region: &str, now: SystemTime, lifetime: Duration) -> anyhow::Result<Secret> {
    let mut settings = SigningSettings::default();
    settings.signature_location = SignatureLocation::QueryParams;
    settings.expires_in = Some(Duration::from_secs(lifetime.as_secs().max(1)));
    let params = v4::SigningParams::builder()
        .identity(&current.identity)
        .region(region)
        .name(SERVICE)
        .time(now)
        .settings(settings)
        .build()?
        .into();
    let request = SignableRequest::new(
        "POST",
        format!("https://{HOST}/?Action=CallWithBearerToken"),
        [("host", HOST)].into_iter(),
        SignableBody::UnsignedPayload,
    )?;
    let (instructions, _signature) = sign(request, &params)?.into_parts();
    let signed = instructions.params();
    let mut url = format!("{HOST}/?Action=CallWithBearerToken");
    for name in PARAMS {
        if let Some((_, value)) = signed.iter().find(|(n, _)| *n == name) {
            url.push('&');
            url.push_str(name);
            url.push('=');
            url.extend(utf8_percent_encode(value, QUERY_VALUE));
        }
    }
    url.push_str("&Version=1");
    Ok(Secret::new(format!("{PREFIX}{}", base64::engine::general_purpose::STANDARD.encode(url))))
}

/// Short-term keys, minted as requests need them.
pub struct AwsToken {
    credentials: AwsCredentials,
    region: String,
    minted: ArcSwap<Minted>,
}

/// A key in hand.
pub struct Minted {
    /// The key, as headers.
    pub headers: KeyHeaders,
    /// When the next one is due.
    renew_at: SystemTime,
    /// The credentials it was made from.
    from: Arc<Current>,
}

impl AwsToken {
    /// Mints the first key from `credentials`.
    pub fn new(credentials: AwsCredentials, region: String) -> anyhow::Result<Self> {
        let first = Minted::new(&credentials.current(), &region, SystemTime::now())?;
        Ok(Self { credentials, region, minted: ArcSwap::from_pointee(first) })
    }

    /// The credentials keys are minted from.
    pub fn credentials(&self) -> &AwsCredentials {
        &self.credentials
    }

    /// The key to send now: the one in hand, or a new one if it is due for renewal or its credentials have been
    /// refreshed since.
    pub fn key(&self) -> Guard<Arc<Minted>> {
        let minted = self.minted.load();
        let current = self.credentials.current();
        let now = SystemTime::now();
        if now < minted.renew_at && Arc::ptr_eq(&minted.from, &current) {
            return minted;
        }
        match Minted::new(&current, &self.region, now) {
            Ok(next) => {
                self.minted.store(Arc::new(next));
                self.minted.load()
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "minting a short-term Bedrock API key failed; the one in hand stays");
                minted
            }
        }
    }
}

impl Minted {
    fn new(current: &Arc<Current>, region: &str, now: SystemTime) -> anyhow::Result<Self> {
        let left = current.credentials.expiry().map(|at| at.duration_since(now).unwrap_or_default());
        let lifetime = left.map_or(MAX_LIFETIME, |left| left.min(MAX_LIFETIME));
        let key = mint(current, region, now, lifetime)?;
        let renew_at = now + refresh_in(Some(now + lifetime), now).unwrap_or(lifetime);
        Ok(Self { headers: KeyHeaders::new(&key)?, renew_at, from: current.clone() })
    }
}
