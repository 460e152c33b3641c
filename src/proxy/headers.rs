//! Header rules, both directions. Upstream gets the caller's headers minus hop-by-hop headers and minus
//! everything that identifies the caller to AWS (its credential, its project and organization headers),
//! plus the resolved project and the gateway's credential. Callers get upstream's headers minus hop-by-hop.

use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue, StatusCode};

use crate::attribution::PROJECT_HEADERS;
use crate::auth::X_API_KEY;
use crate::endpoint::Api;
use crate::proxy::credential::Credential;

/// Hop-by-hop headers (RFC 9110 section 7.6.1), plus `proxy-*` relatives and `expect`, which this hop answers.
// A `static`, not a `const`: a const array of names is built and dropped again at every use.
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// The request id header, taken from the caller or made here, sent upstream and returned to the caller.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

const OPENAI_ORGANIZATION: HeaderName = HeaderName::from_static("openai-organization");
const OPENAI_PROJECT: HeaderName = HeaderName::from_static("openai-project");
const ANTHROPIC_WORKSPACE: HeaderName = HeaderName::from_static("anthropic-workspace-id");

/// Turns the caller's request headers, in place, into the headers sent upstream. `Host` is left to the
/// upstream client, which sets upstream's own on every request.
pub fn to_upstream(
    headers: &mut HeaderMap,
    api: Api,
    project_id: &HeaderValue,
    credential: &Credential,
    request_id: &HeaderValue,
) {
    let key = credential.bearer();
    let replaces = credential.replaces_callers();
    let project_header = match api {
        Api::OpenAi => &OPENAI_PROJECT,
        Api::Anthropic => &ANTHROPIC_WORKSPACE,
    };
    let sends_x_api_key = key.is_some() && api == Api::Anthropic;
    retain(headers, |name| {
        // Set below: `insert` replaces whatever the caller sent, so these need not be removed first.
        let replaced = name == project_header
            || name == REQUEST_ID
            || (key.is_some() && name == header::AUTHORIZATION)
            || (sends_x_api_key && name == X_API_KEY);
        replaced
            || !(is_hop_by_hop(name)
                || name == header::EXPECT
                || name == OPENAI_ORGANIZATION
                || PROJECT_HEADERS.contains(name)
                || (replaces && is_caller_credential(name))
                || is_underscore_spelling(name.as_str()))
    });
    if let Some(key) = key {
        headers.insert(header::AUTHORIZATION, key.bearer.clone());
        if sends_x_api_key {
            headers.insert(X_API_KEY, key.raw.clone());
        }
    }
    headers.insert(project_header, project_id.clone());
    headers.insert(REQUEST_ID, request_id.clone());
}

/// Turns upstream's response headers, in place, into the headers sent to the caller.
pub fn to_caller(headers: &mut HeaderMap, status: StatusCode, request_id: &HeaderValue) {
    // Upstream's framing is not passed on, and hyper frames the caller's response from its body. A
    // `Content-Length` beside `Transfer-Encoding` is wrong (RFC 9112 section 6.3: a proxy must drop it), a 204
    // may carry none (RFC 9110 section 8.6), and a 304's (the length a 200 would have had, which it may carry)
    // would trip hyper's check that a header length matches the empty body it sends.
    let stale_length = matches!(status, StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED)
        || headers.contains_key(header::TRANSFER_ENCODING);
    // Upstream's own request id, if it sent one, is replaced by the insert.
    retain(headers, |name| !(is_hop_by_hop(name) || (stale_length && name == header::CONTENT_LENGTH)));
    headers.insert(REQUEST_ID, request_id.clone());
}

/// Keeps the headers `keep` says yes to, and drops the hop-by-hop headers that `Connection` names. The map is
/// changed in place: most requests lose no name at all (those about to be replaced are kept for the
/// replacing `insert`), and then nothing is allocated or removed.
fn retain(headers: &mut HeaderMap, keep: impl Fn(&HeaderName) -> bool) {
    // Headers named in `Connection` are hop-by-hop too (RFC 9110 section 7.6.1).
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    let unwanted = |name: &HeaderName| !keep(name) || listed.contains(name);
    if !headers.keys().any(unwanted) {
        return;
    }
    let unwanted: Vec<HeaderName> = headers.keys().filter(|name| unwanted(name)).cloned().collect();
    for name in &unwanted {
        headers.remove(name);
    }
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(name)
}

/// A header that carries the caller's own credential: its key, or what an AWS client signs with (`x-amz-date`,
/// `x-amz-security-token`, ...), none of which may reach AWS beside the gateway's own.
fn is_caller_credential(name: &HeaderName) -> bool {
    name == header::AUTHORIZATION || name == X_API_KEY || name.as_str().starts_with("x-amz-")
}

/// A header that identifies the caller to AWS, spelled with `_` for `-` (`openai_project`, `x_amz_date`): some
/// servers and proxies treat the two alike, so these never pass either.
fn is_underscore_spelling(name: &str) -> bool {
    const GUARDED: [&str; 5] =
        ["openai-project", "anthropic-workspace-id", "openai-organization", "authorization", "x-api-key"];
    let same = |guarded: &str, n: usize| {
        name.len() >= n && guarded.bytes().zip(name.bytes()).take(n).all(|(g, n)| g == n || (g == b'-' && n == b'_'))
    };
    name.contains('_') && (GUARDED.iter().any(|g| g.len() == name.len() && same(g, g.len())) || same("x-amz-", 6))
}

/// The caller's query without the parameters that carry a credential, so that a key pasted into a URL never
/// reaches AWS; none when it holds none. The rest is kept as sent, separators (`&` or `;`) included. A parameter
/// carries a credential when its name is one that does ([`CREDENTIAL_PARAMS`]: compared after percent-decoding,
/// without case, without `-`, `_` and `.`, and without a `[...]` suffix, so `apiKey`, `API-KEY`, `api_key[]` and
/// `api%5Fkey` are all `api_key`; and SigV4's `X-Amz-*`), or when its name or value holds a gateway key
/// (`mg_` and 64 hex digits).
pub fn query_without_credentials(query: &str) -> Option<String> {
    let mut kept = String::with_capacity(query.len());
    let (mut dropped, mut any_kept) = (false, false);
    // The separator after the previous parameter, which goes before the next one kept.
    let mut separator = None;
    for piece in query.split_inclusive(['&', ';']) {
        let (param, after) = match piece.strip_suffix(['&', ';']) {
            Some(param) => (param, piece[param.len()..].chars().next()),
            None => (piece, None),
        };
        if carries_credential(param) {
            dropped = true;
        } else {
            if any_kept {
                kept.extend(separator);
            }
            kept.push_str(param);
            any_kept = true;
        }
        separator = after;
    }
    dropped.then_some(kept)
}

/// Parameter names that carry a credential, as [`query_without_credentials`] compares them.
const CREDENTIAL_PARAMS: [&str; 17] = [
    "apikey",
    "key",
    "accesstoken",
    "token",
    "auth",
    "authorization",
    "xapikey",
    "openaiapikey",
    "anthropicapikey",
    "apitoken",
    "bearer",
    "sessiontoken",
    "securitytoken",
    "idtoken",
    "clientsecret",
    "secret",
    "password",
];

fn carries_credential(param: &str) -> bool {
    let (name, value) = param.split_once('=').unwrap_or((param, ""));
    let name = percent_decoded(name);
    let bare: String = name
        .split(|&b| b == b'[')
        .next()
        .unwrap_or_default()
        .iter()
        .filter(|b| !matches!(b, b'-' | b'_' | b'.' | b' '))
        .map(|b| char::from(b.to_ascii_lowercase()))
        .collect();
    CREDENTIAL_PARAMS.contains(&bare.as_str())
        || bare.starts_with("xamz")
        || holds_gateway_key(&name)
        || holds_gateway_key(&percent_decoded(value))
}

/// `text` with its percent escapes decoded and `+` read as a space, as a server reading a query would.
fn percent_decoded(text: &str) -> Vec<u8> {
    let mut decoded = Vec::with_capacity(text.len());
    let mut bytes = text.bytes();
    while let Some(b) = bytes.next() {
        let hex = |b: Option<u8>| b.and_then(|b| char::from(b).to_digit(16));
        match b {
            b'%' => {
                let (hi, lo) = (bytes.clone().next(), bytes.clone().nth(1));
                match (hex(hi), hex(lo)) {
                    (Some(hi), Some(lo)) => {
                        decoded.push((hi * 16 + lo) as u8);
                        bytes.nth(1);
                    }
                    _ => decoded.push(b'%'),
                }
            }
            b'+' => decoded.push(b' '),
            b => decoded.push(b),
        }
    }
    decoded
}

/// Whether `bytes` hold a gateway key: `mg_` and 64 hex digits.
fn holds_gateway_key(bytes: &[u8]) -> bool {
    const HEX: usize = 64;
    bytes.windows(3 + HEX).any(|w| w.starts_with(b"mg_") && w[3..].iter().all(u8::is_ascii_hexdigit))
}

/// The caller's request id if it is a sane one, else a fresh UUID (version 4, from a thread-local generator
/// seeded from the OS: unique, not secret).
pub fn request_id(headers: &HeaderMap) -> HeaderValue {
    headers
        .get(REQUEST_ID)
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.as_bytes().iter().all(|b| b.is_ascii_graphic()))
        .cloned()
        .unwrap_or_else(|| {
            let mut buf = uuid::Uuid::encode_buffer();
            let id = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buf);
            HeaderValue::from_str(id).unwrap_or(HeaderValue::from_static("unknown"))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller_headers() -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("host", "gateway:8080"),
            ("authorization", "Bearer caller-key"),
            ("x-api-key", "caller-key"),
            ("openai-project", "proj_evil"),
            ("anthropic-workspace-id", "proj_evil"),
            ("openai-organization", "org_x"),
            ("connection", "keep-alive, x-hop"),
            ("x-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("proxy-authorization", "Basic x"),
            ("expect", "100-continue"),
            ("content-type", "application/json"),
            ("openai-beta", "assistants=v2"),
            ("anthropic-version", "2023-06-01"),
            ("x-custom", "kept"),
            ("x-custom", "kept-too"),
            ("openai-organization", "org_y"),
            ("openai_project", "proj_evil"),
            ("x_api_key", "caller-key"),
            ("anthropic_workspace_id", "proj_evil"),
            ("x_amz_date", "20200101T000000Z"),
            ("x-amz_security_token", "caller-token"),
        ] {
            h.append(k, HeaderValue::from_static(v));
        }
        h
    }

    fn credential() -> Credential {
        Credential::api_key(&crate::config::Secret::new("upstream-key".into())).expect("credential")
    }

    #[test]
    fn openai_request_headers() {
        let mut h = caller_headers();
        let rid = HeaderValue::from_static("rid-1");
        to_upstream(&mut h, Api::OpenAi, &HeaderValue::from_static("proj_ok"), &credential(), &rid);
        assert_eq!(h["authorization"], "Bearer upstream-key");
        assert_eq!(h["openai-project"], "proj_ok");
        assert_eq!(h["x-request-id"], "rid-1");
        assert_eq!(h["host"], "gateway:8080", "left for the upstream client to replace");
        for gone in [
            "x-api-key",
            "anthropic-workspace-id",
            "openai-organization",
            "connection",
            "x-hop",
            "keep-alive",
            "te",
            "transfer-encoding",
            "proxy-authorization",
            "expect",
            "openai_project",
            "x_api_key",
            "anthropic_workspace_id",
            "x_amz_date",
            "x-amz_security_token",
        ] {
            assert!(!h.contains_key(gone), "{gone} must not reach upstream");
        }
        for kept in ["content-type", "openai-beta", "anthropic-version", "x-custom"] {
            assert!(h.contains_key(kept), "{kept} must reach upstream");
        }
        assert_eq!(h.get_all("openai-project").iter().count(), 1);
        let custom: Vec<_> = h.get_all("x-custom").iter().collect();
        assert_eq!(custom, ["kept", "kept-too"], "every value of a kept header, in order");
    }

    #[test]
    fn anthropic_request_headers() {
        let mut h = caller_headers();
        let rid = HeaderValue::from_static("rid-1");
        to_upstream(&mut h, Api::Anthropic, &HeaderValue::from_static("proj_ok"), &credential(), &rid);
        assert_eq!(h["anthropic-workspace-id"], "proj_ok");
        assert_eq!(h["x-api-key"], "upstream-key");
        assert_eq!(h["authorization"], "Bearer upstream-key");
        assert!(!h.contains_key("openai-project"));
    }

    #[test]
    fn passthrough_keeps_the_callers_credential_only() {
        let mut h = caller_headers();
        let rid = HeaderValue::from_static("rid-1");
        to_upstream(&mut h, Api::OpenAi, &HeaderValue::from_static("proj_ok"), &Credential::Passthrough, &rid);
        assert_eq!(h["authorization"], "Bearer caller-key");
        assert_eq!(h["openai-project"], "proj_ok");
    }

    #[test]
    fn response_headers() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("close"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("content-type", HeaderValue::from_static("text/event-stream"));
        h.insert("x-request-id", HeaderValue::from_static("upstreams-own"));
        h.insert("content-length", HeaderValue::from_static("3"));
        to_caller(&mut h, StatusCode::OK, &HeaderValue::from_static("rid-1"));
        assert_eq!(h.len(), 2, "{h:?}");
        assert_eq!(h["x-request-id"], "rid-1");
        assert_eq!(h["content-type"], "text/event-stream");

        let mut h = HeaderMap::new();
        h.insert("content-length", HeaderValue::from_static("5"));
        to_caller(&mut h, StatusCode::OK, &HeaderValue::from_static("rid-1"));
        assert_eq!(h["content-length"], "5", "a length alone is the body's");
        to_caller(&mut h, StatusCode::NO_CONTENT, &HeaderValue::from_static("rid-1"));
        assert!(!h.contains_key("content-length"), "a 204 carries no length");
        h.insert("content-length", HeaderValue::from_static("5"));
        to_caller(&mut h, StatusCode::NOT_MODIFIED, &HeaderValue::from_static("rid-1"));
        assert!(!h.contains_key("content-length"), "nor does a 304 here");
    }

    #[test]
    fn credentials_in_the_query_never_go_upstream() {
        let q = query_without_credentials;
        assert_eq!(q("include=a&starting_after=3"), None);
        assert_eq!(q("include=a&api_key=SECRET"), Some("include=a".into()));
        assert_eq!(q("API-KEY=SECRET&x=1&Token=t&x=2"), Some("x=1&x=2".into()));
        assert_eq!(q("api%5Fkey=SECRET&key"), Some(String::new()));
        assert_eq!(q("X-Amz-Signature=s&X-Amz-Credential=c&stream=true"), Some("stream=true".into()));
        assert_eq!(q("access_token=t"), Some(String::new()));
        assert_eq!(q("keys=1&monkey=2"), None, "only whole names");
        assert_eq!(q("include[]=a&limit=2;order=asc"), None);
    }

    #[test]
    fn credential_parameters_are_found_however_they_are_spelled() {
        let q = query_without_credentials;
        for name in [
            "apiKey",
            "ApiKey",
            "api-key",
            "api.key",
            "accessToken",
            "access-token",
            "x-api-key",
            "X_API_KEY",
            "Authorization",
            "x-amz-signature",
            "X-AMZ-CREDENTIAL",
            "X-Amz-Security-Token",
            "api_key[0]",
            "api_key[]",
            "apiKey%5B%5D",
            "token[value]",
            "%61pi_key",
        ] {
            assert_eq!(q(&format!("a=1&{name}=SECRET&b=2")), Some("a=1&b=2".into()), "{name}");
            assert_eq!(q(&format!("{name}=SECRET")), Some(String::new()), "{name}");
        }
    }

    #[test]
    fn semicolons_separate_parameters_too_and_are_kept() {
        let q = query_without_credentials;
        assert_eq!(q("a=1;api_key=SECRET;b=2"), Some("a=1;b=2".into()));
        assert_eq!(q("api_key=SECRET;b=2&c=3"), Some("b=2&c=3".into()));
        assert_eq!(q("a=1&b=2;token=SECRET"), Some("a=1&b=2".into()));
        assert_eq!(q("a=1;key=SECRET&b=2"), Some("a=1&b=2".into()));
    }

    #[test]
    fn a_gateway_key_in_any_parameter_never_goes_upstream() {
        let key = format!("mg_{}", "0123456789abcdef".repeat(4));
        let q = query_without_credentials;
        assert_eq!(q(&format!("a=1&note={key}&b=2")), Some("a=1&b=2".into()));
        assert_eq!(q(&format!("a=1&x=Bearer%20{key}")), Some("a=1".into()));
        assert_eq!(q(&format!("{key}&b=2")), Some("b=2".into()));
        assert_eq!(q(&format!("{}=1&b=2", key.replace('_', "%5F"))), Some("b=2".into()));
        // Not a gateway key: too short, or not hex.
        assert_eq!(q(&format!("a={}", &key[..40])), None);
        assert_eq!(q(&format!("a={}", key.replace('a', "g"))), None);
    }

    #[test]
    fn request_ids_are_kept_or_made() {
        let mut h = HeaderMap::new();
        h.insert("x-request-id", HeaderValue::from_static("abc-123"));
        assert_eq!(request_id(&h), "abc-123");
        h.insert("x-request-id", HeaderValue::from_static("has space"));
        let made = request_id(&h);
        assert_eq!(made.len(), 36);
        assert_ne!(made, request_id(&HeaderMap::new()));
        let made: std::collections::HashSet<HeaderValue> = (0..10_000).map(|_| request_id(&HeaderMap::new())).collect();
        assert_eq!(made.len(), 10_000, "made ids are distinct");
        assert!(made.iter().all(|id| {
            id.to_str().ok().and_then(|id| uuid::Uuid::parse_str(id).ok()).is_some_and(|id| id.get_version_num() == 4)
        }));
        assert!(format!("{:?}", credential()).contains("redacted"));
    }
}
