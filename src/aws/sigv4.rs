//! `upstream.auth = "sigv4"`: each request upstream signed with AWS Signature Version 4 by the AWS SDK's signer,
//! for the service `bedrock-mantle` in the configured region. Signing comes last, once the request is as it will
//! be sent (its project header set, its body read whole): every header sent is signed, but those the SDKs leave
//! unsigned because proxies change them (`user-agent`, `x-amzn-trace-id`; `transfer-encoding` and `expect` never
//! go upstream), and `x-amz-content-sha256` carries the body's hash, as botocore and openai-python sign.

use std::time::SystemTime;

use aws_sigv4::http_request::{PayloadChecksumKind, SignableBody, SignableRequest, SigningSettings, sign};
use aws_sigv4::sign::v4;
use http::header::{AUTHORIZATION, CONTENT_LENGTH, HOST};
use http::{HeaderMap, HeaderName, HeaderValue, Method};

use super::credentials::AwsCredentials;

/// The signing service name of bedrock-mantle (the IAM action namespace; `bedrock` is another service).
pub const SERVICE: &str = "bedrock-mantle";

const SECURITY_TOKEN: HeaderName = HeaderName::from_static("x-amz-security-token");

/// Signs requests for upstream.
pub struct Signer {
    credentials: AwsCredentials,
    region: String,
    /// `Host`, as the upstream client sends it.
    host: HeaderValue,
    settings: SigningSettings,
}

impl Signer {
    /// A signer for `region`, of requests sent to `host`.
    pub fn new(credentials: AwsCredentials, region: String, host: HeaderValue) -> Self {
        let mut settings = SigningSettings::default();
        settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
        Self { credentials, region, host, settings }
    }

    /// The credentials signed with.
    pub fn credentials(&self) -> &AwsCredentials {
        &self.credentials
    }

    /// Signs the request `method` `path_and_query` with `headers` and `body`, adding `x-amz-date`,
    /// `x-amz-content-sha256`, `x-amz-security-token` (for temporary credentials) and `authorization` to
    /// `headers`; `Host` and `Content-Length` are set first, as they will be sent, so that they are signed.
    pub fn sign(
        &self,
        method: &Method,
        path_and_query: &str,
        headers: &mut HeaderMap,
        body: &[u8],
    ) -> anyhow::Result<()> {
        headers.insert(HOST, self.host.clone());
        // What hyper would send: a length for any body, and for an empty one where the method has a body.
        if !body.is_empty() || !matches!(*method, Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS) {
            headers.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
        } else {
            headers.remove(CONTENT_LENGTH);
        }
        let current = self.credentials.current();
        let params = v4::SigningParams::builder()
            .identity(&current.identity)
            .region(&self.region)
            .name(SERVICE)
            .time(SystemTime::now())
            .settings(self.settings.clone())
            .build()?
            .into();
        // A header value that is not text (obs-text bytes) cannot be signed, and goes unsigned, as AWS allows.
        let signed = headers.iter().filter_map(|(name, value)| Some((name.as_str(), value.to_str().ok()?)));
        let uri = format!("https://{}{path_and_query}", self.host.to_str().unwrap_or_default());
        let request = SignableRequest::new(method.as_str(), uri, signed, SignableBody::Bytes(body))?;
        let (instructions, _signature) = sign(request, &params)?.into_parts();
        let (added, _) = instructions.into_parts();
        for header in added {
            let mut value = HeaderValue::try_from(header.value())?;
            value
                .set_sensitive(header.sensitive() || header.name() == AUTHORIZATION || header.name() == SECURITY_TOKEN);
            headers.insert(header.name(), value);
        }
        Ok(())
    }
}
