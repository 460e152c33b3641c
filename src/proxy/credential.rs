//! The credential the gateway presents upstream, and the watch that re-reads `upstream.api_key_file` when it
//! changes, so that a rotated key (a Kubernetes Secret update, an edited file) takes effect without a restart.
//!
//! The file's directory is watched, not the file: Kubernetes updates a mounted Secret by swapping the
//! directory's `..data` symlink, which a watch on the old file would never see. A rename, a file closed after
//! writing or a symlink made in that directory leads to a re-read ([`reaction`]); a key that reads back the
//! same changes nothing, and one that cannot be used (missing, empty, not a header value) leaves the previous
//! key in use.

use std::os::unix::fs::MetadataExt as _;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

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
        let current = ArcSwap::from_pointee(KeyHeaders::new(key)?);
        Ok(Self::ApiKey(ApiKey(Arc::new(KeyState { current, reloading: Mutex::new(()) }))))
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
    fn reload(&self, source: &KeySource, meter: &Meter) {
        let _one_at_a_time = self.0.reloading.lock().unwrap_or_else(PoisonError::into_inner);
        match source.read().and_then(|key| KeyHeaders::new(&key)) {
            Ok(new) if new.raw == self.0.current.load().raw => {}
            Ok(new) => {
                self.0.current.store(Arc::new(new));
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
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        // Absolute, as notify reports the paths of its events.
        let dir = std::path::absolute(dir)?;
        let file = dir.join(path.file_name().unwrap_or_default());
        let handler = {
            let (source, dir, key) = (source.clone(), dir.clone(), key.clone());
            let meter = meter.clone();
            move |event: notify::Result<notify::Event>| match event.map(|e| reaction(&e, &dir, &file)) {
                Ok(Reaction::Read) => key.reload(&source, &meter),
                Ok(Reaction::Ignore) => {}
                Ok(Reaction::WatchEnded) => tracing::warn!(
                    source = %source,
                    "the upstream API key file's directory was removed; the key in use stays, but is no longer re-read"
                ),
                Err(e) => tracing::warn!(error = %e, source = %source, "watching the upstream API key file failed"),
            }
        };
        let mut watcher = notify::recommended_watcher(handler)?;
        watcher
            .watch(&dir, RecursiveMode::NonRecursive)
            .map_err(|e| anyhow::anyhow!("cannot watch {} for upstream.api_key_file changes: {e}", dir.display()))?;
        // A change between the first read at start-up and the watch would otherwise wait for the next one.
        key.reload(&source, &meter);
        Ok(Self { _watcher: watcher })
    }
}

/// What an event in the key's directory calls for.
#[derive(Debug, PartialEq, Eq)]
enum Reaction {
    Read,
    Ignore,
    WatchEnded,
}

/// Reads follow what can bring a whole new key: a rename (the Kubernetes `..data` swap, an editor's save), a
/// file closed after writing, a link made to a file that already exists (`ln -sf`, `ln`), and anything the
/// watcher cannot describe (after its queue overflowed, say). A regular file just created is read once it is
/// closed, not while it is still empty or half-written; writes in progress, attribute changes and the
/// gateway's own reads (opens, closes without writing) are ignored. The key file itself removed is read too:
/// the read fails, and is logged and counted as failed (the key in use stays).
fn reaction(event: &notify::Event, dir: &Path, file: &Path) -> Reaction {
    match event.kind {
        EventKind::Modify(ModifyKind::Name(_) | ModifyKind::Any)
        | EventKind::Access(AccessKind::Close(AccessMode::Write))
        | EventKind::Any
        | EventKind::Other => Reaction::Read,
        EventKind::Create(_) if event.paths.iter().any(|p| p.symlink_metadata().is_ok_and(|m| is_link(&m))) => {
            Reaction::Read
        }
        EventKind::Remove(_) if event.paths.iter().any(|p| p == dir) => Reaction::WatchEnded,
        EventKind::Remove(_) if event.paths.iter().any(|p| p == file) => Reaction::Read,
        _ => Reaction::Ignore,
    }
}

/// A symlink, or a second name for a file (a hard link): either way its content was written before.
fn is_link(metadata: &std::fs::Metadata) -> bool {
    metadata.is_symlink() || (metadata.is_file() && metadata.nlink() > 1)
}

#[cfg(test)]
mod tests {
    use notify::event::{CreateKind, DataChange, MetadataKind, RemoveKind, RenameMode};

    use super::*;

    #[test]
    fn only_events_that_can_bring_a_whole_new_key_lead_to_a_read() {
        let dir = std::env::temp_dir().join(format!("mantlegate-credential-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("file"), "").expect("file");
        std::os::unix::fs::symlink("file", dir.join("link")).expect("symlink");
        std::fs::hard_link(dir.join("file"), dir.join("hard")).expect("hard link");
        std::fs::write(dir.join("fresh"), "").expect("file");
        let event = |kind: EventKind, path: &str| notify::Event::new(kind).add_path(dir.join(path));
        let read = [
            event(EventKind::Modify(ModifyKind::Name(RenameMode::To)), "..data"),
            event(EventKind::Access(AccessKind::Close(AccessMode::Write)), "key"),
            event(EventKind::Create(CreateKind::File), "link"),
            event(EventKind::Create(CreateKind::File), "hard"),
            event(EventKind::Other, ""),
            event(EventKind::Remove(RemoveKind::File), "key"),
        ];
        let key = dir.join("key");
        for e in &read {
            assert_eq!(reaction(e, &dir, &key), Reaction::Read, "{e:?}");
        }
        let ignored = [
            // Just created, still empty or half-written: read when it is closed.
            event(EventKind::Create(CreateKind::File), "fresh"),
            // The gateway's own read must not set off another read.
            event(EventKind::Access(AccessKind::Open(AccessMode::Any)), "key"),
            event(EventKind::Access(AccessKind::Close(AccessMode::Read)), "key"),
            event(EventKind::Modify(ModifyKind::Data(DataChange::Any)), "key"),
            event(EventKind::Modify(ModifyKind::Metadata(MetadataKind::Any)), "key"),
            // Kubernetes removing the previous secret's directory after its swap.
            event(EventKind::Remove(RemoveKind::Folder), "..2026_11_27_10_00_00.1"),
            event(EventKind::Remove(RemoveKind::File), "other"),
        ];
        for e in &ignored {
            assert_eq!(reaction(e, &dir, &key), Reaction::Ignore, "{e:?}");
        }
        let gone = notify::Event::new(EventKind::Remove(RemoveKind::Folder)).add_path(dir.clone());
        assert_eq!(reaction(&gone, &dir, &key), Reaction::WatchEnded);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_credential_never_shows_its_key() {
        let credential = Credential::api_key(&Secret::new("upstream-key".into())).expect("credential");
        assert!(!format!("{credential:?}").contains("upstream-key"));
        let Credential::ApiKey(key) = credential else { panic!("an API key") };
        assert!(key.headers().bearer.is_sensitive() && key.headers().raw.is_sensitive());
    }
}
