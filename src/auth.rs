//! Who is calling: finds the caller's gateway key in `Authorization: Bearer` or `x-api-key` and looks it up
//! by SHA-256. Keys are never stored or logged, only their hashes and configured names.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use http::{HeaderMap, HeaderName, header};
use sha2::{Digest, Sha256};

use crate::config::CallerAuth;
use crate::error::GatewayError;
use crate::snapshot::Key;

/// The header an Anthropic client sends its key in.
pub const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");

/// Gateway keys by hash.
#[derive(Debug, Clone, Default)]
pub struct KeyTable {
    mode: Option<HashMap<[u8; 32], Arc<Key>, BuildHasherDefault<DigestHasher>>>,
}

/// Hashes a SHA-256 digest by folding its words: a digest is already evenly spread, and no caller can choose
/// one, so the SipHash a `HashMap` defaults to (against keys chosen to collide) would only cost time.
#[derive(Debug, Default)]
struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn write(&mut self, bytes: &[u8]) {
        for word in bytes.chunks(8) {
            let mut buf = [0u8; 8];
            buf[..word.len()].copy_from_slice(word);
            self.0 = self.0.rotate_left(5) ^ u64::from_ne_bytes(buf);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

impl KeyTable {
    /// Builds the lookup for `mode`; with [`CallerAuth::None`] every caller is anonymous and trusted.
    pub fn new(mode: CallerAuth, keys: &[Arc<Key>]) -> Self {
        let mode = match mode {
            CallerAuth::None => None,
            CallerAuth::Keys => Some(keys.iter().map(|k| (k.sha256, k.clone())).collect()),
        };
        Self { mode }
    }

    /// Authenticates a request: `Ok(None)` for a trusted anonymous caller, `Ok(Some(key))` for a known key.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Option<&Arc<Key>>, GatewayError> {
        let Some(table) = &self.mode else {
            return Ok(None);
        };
        let presented = presented_key(headers).ok_or(GatewayError::InvalidApiKey)?;
        table.get(&hash_key(presented)).map(Some).ok_or(GatewayError::InvalidApiKey)
    }
}

/// SHA-256 of a key, as configured in `[[keys]] sha256`.
pub fn hash_key(key: &[u8]) -> [u8; 32] {
    Sha256::digest(key).into()
}

/// The one key the request presents. Two different keys, or the same header twice, is no key at all:
/// which one "wins" must never depend on a proxy's or a library's header order.
fn presented_key(headers: &HeaderMap) -> Option<&[u8]> {
    // By `HeaderName`, not `&str`: a name given as text is parsed again at every lookup.
    let bearer = match single(headers, &header::AUTHORIZATION)? {
        Some(v) => Some(v.get(..7).filter(|s| s.eq_ignore_ascii_case(b"bearer ")).map(|_| &v[7..])?),
        None => None,
    };
    let api_key = single(headers, &X_API_KEY)?;
    let key = match (bearer, api_key) {
        (Some(a), Some(b)) if a.trim_ascii() != b.trim_ascii() => return None,
        (Some(k), _) | (None, Some(k)) => k.trim_ascii(),
        (None, None) => return None,
    };
    (!key.is_empty()).then_some(key)
}

/// `Some(None)` when the header is absent, `Some(Some(value))` when it is there once, `None` when repeated.
fn single<'h>(headers: &'h HeaderMap, name: &HeaderName) -> Option<Option<&'h [u8]>> {
    let mut values = headers.get_all(name).iter();
    match (values.next(), values.next()) {
        (None, _) => Some(None),
        (Some(v), None) => Some(Some(v.as_bytes())),
        (Some(_), Some(_)) => None,
    }
}

/// A fresh random gateway key: `mg_` and 64 hex digits (256 bits).
pub fn generate_key() -> anyhow::Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("no randomness available: {e}"))?;
    Ok(format!("mg_{}", hex::encode(bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn table() -> KeyTable {
        let key = |name: &str, key: &[u8]| {
            Arc::new(Key {
                name: name.into(),
                sha256: hash_key(key),
                project: None,
                may_select: vec![],
                member: String::new(),
                counted: None,
                counted_with_project: Arc::new([]),
            })
        };
        KeyTable::new(CallerAuth::Keys, &[key("a", b"key-a"), key("b", b"key-b")])
    }

    /// The name of the key a request authenticates as.
    fn name(result: Result<Option<&Arc<Key>>, GatewayError>) -> Result<Option<&str>, GatewayError> {
        result.map(|k| k.map(|k| k.name.as_str()))
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn bearer_and_x_api_key_both_work() {
        let t = table();
        assert_eq!(name(t.authenticate(&headers(&[("authorization", "Bearer key-a")]))), Ok(Some("a")));
        assert_eq!(name(t.authenticate(&headers(&[("authorization", "bearer key-b")]))), Ok(Some("b")));
        assert_eq!(name(t.authenticate(&headers(&[("x-api-key", "key-b")]))), Ok(Some("b")));
        assert_eq!(
            name(t.authenticate(&headers(&[("x-api-key", "key-a"), ("authorization", "Bearer key-a")]))),
            Ok(Some("a"))
        );
    }

    #[test]
    fn missing_unknown_or_ambiguous_keys_are_rejected() {
        let t = table();
        for h in [
            headers(&[]),
            headers(&[("authorization", "Bearer nope")]),
            headers(&[("authorization", "Basic a2V5LWE=")]),
            headers(&[("authorization", "Bearer ")]),
            headers(&[("authorization", "Bearer key-a"), ("authorization", "Bearer key-a")]),
            headers(&[("authorization", "Bearer key-a"), ("x-api-key", "key-b")]),
            headers(&[("x-api-key", "key-a"), ("x-api-key", "key-b")]),
        ] {
            assert_eq!(name(t.authenticate(&h)), Err(GatewayError::InvalidApiKey), "{h:?}");
        }
    }

    #[test]
    fn trusted_mode_needs_no_key() {
        let t = KeyTable::new(CallerAuth::None, &[]);
        assert_eq!(name(t.authenticate(&headers(&[]))), Ok(None));
    }

    #[test]
    fn generated_keys_are_distinct_and_well_formed() {
        let a = generate_key().expect("key");
        let b = generate_key().expect("key");
        assert_ne!(a, b);
        assert!(a.starts_with("mg_") && a.len() == 67);
    }
}
