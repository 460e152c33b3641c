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
use std::sync::atomic::{AtomicBool, Ordering};
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
        // The empty body's hash, as botocore's query signer (under the Python generator) puts in the canonical
        // request: not `UNSIGNED-PAYLOAD`, which S3's presigned URLs use.
        SignableBody::Bytes(&[]),
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
    /// Upstream refused the key in hand: the next request mints another.
    refused: AtomicBool,
}

/// A key in hand.
pub struct Minted {
    /// The key, as headers.
    pub headers: KeyHeaders,
    /// When it was minted, and when the next one is due.
    minted_at: SystemTime,
    renew_at: SystemTime,
    /// The credentials it was made from.
    from: Arc<Current>,
}

impl AwsToken {
    /// Mints the first key from `credentials`.
    pub fn new(credentials: AwsCredentials, region: String) -> anyhow::Result<Self> {
        let first = Minted::new(&credentials.current(), &region, SystemTime::now())?;
        Ok(Self { credentials, region, minted: ArcSwap::from_pointee(first), refused: AtomicBool::new(false) })
    }

    /// The credentials keys are minted from.
    pub fn credentials(&self) -> &AwsCredentials {
        &self.credentials
    }

    /// Upstream refused the key in hand: the next request mints another, from credentials fetched anew.
    pub fn refused(&self) {
        self.refused.store(true, Ordering::Relaxed);
        self.credentials.refused();
    }

    /// The key to send now: the one in hand, or a new one if it is due for renewal, its credentials have been
    /// refreshed since, upstream refused it, or the clock has gone back past its minting (its date would be in
    /// the future).
    pub fn key(&self) -> Guard<Arc<Minted>> {
        let minted = self.minted.load();
        let current = self.credentials.current();
        let now = SystemTime::now();
        let refused = self.refused.load(Ordering::Relaxed);
        if (minted.minted_at..minted.renew_at).contains(&now) && Arc::ptr_eq(&minted.from, &current) && !refused {
            return minted;
        }
        match Minted::new(&current, &self.region, now) {
            Ok(next) => {
                self.minted.store(Arc::new(next));
                self.refused.store(false, Ordering::Relaxed);
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
        Ok(Self { headers: KeyHeaders::new(&key)?, minted_at: now, renew_at, from: current.clone() })
    }
}

#[cfg(test)]
mod tests {
    use aws_credential_types::Credentials;

    use super::*;
    use crate::aws::credentials::AwsCredentials;

    /// The keys the gateway mints equal those `aws-bedrock-token-generator` (1.1) printed for the same credentials
    /// (tests/sdk/aws.py's) at 2026-12-02T12:26:06Z; the SDK suite checks the same against it live.
    #[test]
    fn keys_equal_the_token_generators() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_214_366);
        let key = |credentials: Credentials, region: &str, lifetime: u64| {
            let credentials = AwsCredentials::fixed(credentials);
            mint(&credentials.current(), region, at, Duration::from_secs(lifetime)).expect("mints").expose().to_owned()
        };
        let static_ =
            Credentials::new("AKIDMANTLEGATETEST01", "mantlegate/test+secret/0123456789abcdefghij", None, None, "t");
        assert_eq!(
            key(static_, "us-west-2", 43_200),
            "bedrock-api-key-YmVkcm9jay5hbWF6b25hd3MuY29tLz9BY3Rpb249Q2FsbFdpdGhCZWFyZXJUb2tlbiZYLUFtei1BbGdvcml0aG09QVdTNC1ITUFDLVNIQTI1NiZYLUFtei1DcmVkZW50aWFsPUFLSURNQU5UTEVHQVRFVEVTVDAxJTJGMjAyNjEyMDIlMkZ1cy13ZXN0LTIlMkZiZWRyb2NrJTJGYXdzNF9yZXF1ZXN0JlgtQW16LURhdGU9MjAyNjEyMDJUMTIyNjA2WiZYLUFtei1FeHBpcmVzPTQzMjAwJlgtQW16LVNpZ25lZEhlYWRlcnM9aG9zdCZYLUFtei1TaWduYXR1cmU9ZmU2OTc2NzZmYTFjZTc2N2ZiNjJkYTExN2FlMzAyYTc4MWQzZWNmOWMxZGU4OWQzMDU3YjY3OGM0NzZjMjZkYiZWZXJzaW9uPTE="
        );
        let token = Some("IQoJb3JpZ2luX2VjE/session+token==".to_owned());
        let session =
            Credentials::new("ASIAMANTLEGATETEST02", "mantlegate/session+secret/abcdefghij0123", token, None, "t");
        assert_eq!(
            key(session, "eu-central-1", 900),
            "bedrock-api-key-YmVkcm9jay5hbWF6b25hd3MuY29tLz9BY3Rpb249Q2FsbFdpdGhCZWFyZXJUb2tlbiZYLUFtei1BbGdvcml0aG09QVdTNC1ITUFDLVNIQTI1NiZYLUFtei1DcmVkZW50aWFsPUFTSUFNQU5UTEVHQVRFVEVTVDAyJTJGMjAyNjEyMDIlMkZldS1jZW50cmFsLTElMkZiZWRyb2NrJTJGYXdzNF9yZXF1ZXN0JlgtQW16LURhdGU9MjAyNjEyMDJUMTIyNjA2WiZYLUFtei1FeHBpcmVzPTkwMCZYLUFtei1TaWduZWRIZWFkZXJzPWhvc3QmWC1BbXotU2VjdXJpdHktVG9rZW49SVFvSmIzSnBaMmx1WDJWakUlMkZzZXNzaW9uJTJCdG9rZW4lM0QlM0QmWC1BbXotU2lnbmF0dXJlPWViNDNjYWQwYjE5NDg3Zjc3MTZkZTdiZWM3YmFkYTg2MGY2MTBhZGI0NGUyYzFlM2U1OTFiM2JiNTA2ZTU5ZmEmVmVyc2lvbj0x"
        );
    }
}
