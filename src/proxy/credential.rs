//! The credential the gateway presents upstream, and the watch that re-reads `upstream.api_key_file` when it
//! changes, so that a rotated key (a Kubernetes Secret update, an edited file) takes effect without a restart.
//!
//! The file's directory is watched, not the file: Kubernetes updates a mounted Secret by swapping the
//! directory's `..data` symlink, which a watch on the old file would never see. Any file created, renamed or
//! closed after writing in that directory leads to a re-read; a key that reads back the same changes nothing,
//! and one that cannot be read (missing, empty, not a header value) leaves the previous key in use.

use std::sync::Arc;

use arc_swap::{ArcSwap, Guard};
use http::HeaderValue;
use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
use notify::{RecommendedWatcher, RecursiveMode, Watcher};

use crate::config::{KeySource, Secret};
use crate::metering::Meter;

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
        Ok(Self::ApiKey(ApiKey(Arc::new(ArcSwap::from_pointee(KeyHeaders::new(key)?)))))
    }
}

/// A Bedrock API key, replaceable while requests use it.
#[derive(Clone)]
pub struct ApiKey(Arc<ArcSwap<KeyHeaders>>);

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
        self.0.load()
    }

    /// Reads `source` and, if it holds a different key, puts it in use.
    fn reload(&self, source: &KeySource, meter: &Meter) {
        match source.read().and_then(|key| KeyHeaders::new(&key)) {
            Ok(new) if new.raw == self.0.load().raw => {}
            Ok(new) => {
                self.0.store(Arc::new(new));
                meter.upstream_key_reload("changed");
                tracing::info!(source = %source, "upstream API key re-read; new requests use it");
            }
            Err(e) => {
                meter.upstream_key_reload("failed");
                tracing::warn!(error = %e, "upstream API key could not be re-read; the previous key stays in use");
            }
        }
    }
}

/// Re-reads a key file whenever its directory changes, for as long as it is kept.
pub struct KeyFileWatch {
    _watcher: RecommendedWatcher,
}

impl KeyFileWatch {
    /// Starts watching the directory of `source` (a [`KeySource::File`]) on behalf of `key`.
    pub fn start(source: KeySource, key: ApiKey, meter: Arc<Meter>) -> anyhow::Result<Self> {
        let KeySource::File(path) = &source else {
            anyhow::bail!("only a key file can be watched");
        };
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
            _ => std::path::PathBuf::from("."),
        };
        let handler = {
            let source = source.clone();
            move |event: notify::Result<notify::Event>| match event {
                Ok(event) if may_change_content(event.kind) => key.reload(&source, &meter),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, source = %source, "watching the upstream API key file failed"),
            }
        };
        let mut watcher = notify::recommended_watcher(handler)?;
        watcher
            .watch(&dir, RecursiveMode::NonRecursive)
            .map_err(|e| anyhow::anyhow!("cannot watch {} for upstream.api_key_file changes: {e}", dir.display()))?;
        Ok(Self { _watcher: watcher })
    }
}

/// Whether an event in the key's directory can mean new content: a file made, renamed (the Kubernetes symlink
/// swap, an editor's save) or closed after writing. Writes still in progress, attribute changes and the
/// watcher's own reads (opens and closes without writing) do not.
fn may_change_content(kind: EventKind) -> bool {
    matches!(
        kind,
        EventKind::Create(_)
            | EventKind::Modify(ModifyKind::Name(_) | ModifyKind::Any)
            | EventKind::Access(AccessKind::Close(AccessMode::Write))
    )
}

#[cfg(test)]
mod tests {
    use notify::event::{CreateKind, DataChange, MetadataKind, RenameMode};

    use super::*;

    #[test]
    fn only_events_that_can_bring_new_content_lead_to_a_read() {
        assert!(may_change_content(EventKind::Create(CreateKind::File)));
        assert!(may_change_content(EventKind::Modify(ModifyKind::Name(RenameMode::To))));
        assert!(may_change_content(EventKind::Access(AccessKind::Close(AccessMode::Write))));
        // Its own read of the file must not set off another read.
        assert!(!may_change_content(EventKind::Access(AccessKind::Open(AccessMode::Any))));
        assert!(!may_change_content(EventKind::Access(AccessKind::Close(AccessMode::Read))));
        assert!(!may_change_content(EventKind::Modify(ModifyKind::Data(DataChange::Any))));
        assert!(!may_change_content(EventKind::Modify(ModifyKind::Metadata(MetadataKind::Any))));
    }

    #[test]
    fn the_credential_never_shows_its_key() {
        let credential = Credential::api_key(&Secret::new("upstream-key".into())).expect("credential");
        assert!(!format!("{credential:?}").contains("upstream-key"));
        let Credential::ApiKey(key) = credential else { panic!("an API key") };
        assert!(key.headers().bearer.is_sensitive() && key.headers().raw.is_sensitive());
    }
}
