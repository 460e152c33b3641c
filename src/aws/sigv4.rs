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
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

use super::credentials::AwsCredentials;

/// The signing service name of bedrock-mantle (the IAM action namespace; `bedrock` is another service).
pub const SERVICE: &str = "bedrock-mantle";

const SECURITY_TOKEN: HeaderName = HeaderName::from_static("x-amz-security-token");

/// What a query component keeps unescaped in a canonical request: RFC 3986's unreserved characters.
const UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~');

/// The query a signature can cover exactly, if `query` is not already it. The signer reads a query as a form
/// (`+` a space, a bad escape replaced) and escapes each name and value anew; AWS does the same to the query it
/// receives. Where the two spellings differ (`q=a+b`, `x=%7e`, `a=b:c`, `a=%FF`), what is signed and what AWS
/// canonicalizes could differ, so the request is sent with the signer's spelling instead: its parameters in
/// their order, each escaped as the canonical request escapes it.
pub fn canonical_query(query: &str) -> Option<String> {
    let escape = |text: &str| utf8_percent_encode(text, UNRESERVED).to_string();
    let canonical = form_urlencoded::parse(query.as_bytes())
        .map(|(name, value)| format!("{}={}", escape(&name), escape(&value)))
        .collect::<Vec<_>>()
        .join("&");
    (canonical != query).then_some(canonical)
}

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
    /// `headers`; `Host` and `Content-Length` are set first, as they will be sent, so that they are signed. The
    /// query must be its [`canonical_query`].
    pub fn sign(
        &self,
        method: &Method,
        path_and_query: &str,
        headers: &mut HeaderMap,
        body: &[u8],
    ) -> anyhow::Result<()> {
        self.sign_at(method, path_and_query, headers, body, SystemTime::now())
    }

    fn sign_at(
        &self,
        method: &Method,
        path_and_query: &str,
        headers: &mut HeaderMap,
        body: &[u8],
        time: SystemTime,
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
            .time(time)
            .settings(self.settings.clone())
            .build()?
            .into();
        // Some headers go unsigned, as AWS allows for any but `host` and `x-amz-*` (which the gateway alone sets):
        // one with a value that is not text (obs-text bytes) cannot be signed, and one with a value holding a tab
        // is canonicalized differently by the SDKs (botocore folds it into a space, the Rust SDK keeps it), so
        // AWS's reading of it cannot be known. A repeated header goes unsigned whole if any of its values does:
        // AWS joins them all into one signed value.
        let signable = |value: &HeaderValue| value.to_str().is_ok_and(|text| !text.contains('\t'));
        let signed = headers.keys().filter(|name| headers.get_all(*name).iter().all(signable)).flat_map(|name| {
            headers.get_all(name).iter().filter_map(move |value| Some((name.as_str(), value.to_str().ok()?)))
        });
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use aws_credential_types::Credentials;

    use super::*;

    #[test]
    fn queries_are_sent_as_they_are_signed() {
        for canonical in ["", "a=1", "b=2&a=1&a=0&empty=&sp%20ace=x%2Fy", "limit=20&after=resp_a.b-c_d~e"] {
            assert_eq!(canonical_query(canonical), None, "{canonical}");
        }
        let cases = [
            ("q=a+b", "q=a%20b"),
            ("x=%7e&y=%2f", "x=~&y=%2F"),
            ("a=b:c,d[0]", "a=b%3Ac%2Cd%5B0%5D"),
            ("flag&a=1&&b", "flag=&a=1&b="),
            ("a=%FF", "a=%EF%BF%BD"),
        ];
        for (query, sent) in cases {
            assert_eq!(canonical_query(query).as_deref(), Some(sent), "{query}");
            assert_eq!(canonical_query(sent), None, "{sent} is its own canonical form");
        }
    }

    /// 2026-12-02T12:26:06Z.
    const AT: u64 = 1_796_214_366;

    /// The `Authorization` the gateway gives a chat request, and that botocore's `SigV4Auth` gives the same request
    /// with the same credentials at the same time (tests/sdk/aws.py's credentials; the values were printed by
    /// botocore 1.44). The SDK suite checks the same against botocore live, for many more requests.
    #[test]
    fn signatures_equal_botocores() {
        let body = br#"{"model":"openai.gpt-oss-120b","messages":[]}"#;
        let authorization = |credentials: Credentials| {
            let host = HeaderValue::from_static("bedrock-mantle.us-west-2.api.aws");
            let signer = Signer::new(AwsCredentials::fixed(credentials), "us-west-2".into(), host);
            let mut headers = HeaderMap::new();
            headers.insert("content-type", HeaderValue::from_static("application/json"));
            headers.insert("openai-project", HeaderValue::from_static("proj_workload"));
            headers.insert("x-spaced", HeaderValue::from_static("a   b"));
            headers.insert("user-agent", HeaderValue::from_static("left/unsigned"));
            headers.insert("x-tabbed", HeaderValue::from_static("a\tb"));
            headers.append("x-tabbed-twice", HeaderValue::from_static("plain"));
            headers.append("x-tabbed-twice", HeaderValue::from_static("a\tb"));
            headers.append("x-binary", HeaderValue::from_static("plain"));
            headers.append("x-binary", HeaderValue::from_bytes(b"caf\xe9").expect("obs-text"));
            let at = SystemTime::UNIX_EPOCH + Duration::from_secs(AT);
            signer.sign_at(&Method::POST, "/v1/chat/completions?b=2&a=1", &mut headers, body, at).expect("signs");
            assert!(headers["authorization"].is_sensitive());
            assert_eq!(headers["x-amz-date"], "20261202T122606Z");
            headers["authorization"].to_str().expect("text").to_owned()
        };
        let static_ =
            Credentials::new("AKIDMANTLEGATETEST01", "mantlegate/test+secret/0123456789abcdefghij", None, None, "t");
        assert_eq!(
            authorization(static_),
            "AWS4-HMAC-SHA256 Credential=AKIDMANTLEGATETEST01/20261202/us-west-2/bedrock-mantle/aws4_request, \
             SignedHeaders=content-length;content-type;host;openai-project;x-amz-content-sha256;x-amz-date;x-spaced, \
             Signature=7732160ac7c8bafb8a56e46f92e0db0ac8aa518bbbea30b86a57e65246df3fa2"
        );
        let token = Some("IQoJb3JpZ2luX2VjE/session+token==".to_owned());
        let session =
            Credentials::new("ASIAMANTLEGATETEST02", "mantlegate/session+secret/abcdefghij0123", token, None, "t");
        assert_eq!(
            authorization(session),
            "AWS4-HMAC-SHA256 Credential=ASIAMANTLEGATETEST02/20261202/us-west-2/bedrock-mantle/aws4_request, \
             SignedHeaders=content-length;content-type;host;openai-project;x-amz-content-sha256;x-amz-date;\
             x-amz-security-token;x-spaced, \
             Signature=373a4a4b35072fb91ff3e26dfed45a44c3f24003ff431b33b98fcfa18e89e190"
        );
    }
}
