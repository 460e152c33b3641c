//! Watching one file for a new version: the upstream key file (a mounted Secret) and the config file (a mounted
//! ConfigMap). The file's directory is watched, not the file: Kubernetes updates a mounted volume by swapping
//! the directory's `..data` symlink, which a watch on the old file would never see. A rename, a file closed
//! after writing or a symlink made in that directory leads to a re-read ([`reaction`]); the reader decides
//! whether what it reads is new.

use std::os::unix::fs::MetadataExt as _;
use std::path::Path;

use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
use notify::{RecommendedWatcher, RecursiveMode, Watcher};

/// Calls its handler whenever the watched file may hold a new version, for as long as it is kept.
pub struct FileWatch {
    _watcher: RecommendedWatcher,
}

impl std::fmt::Debug for FileWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FileWatch")
    }
}

impl FileWatch {
    /// Watches the directory of `path`, calling `changed` (on the watcher's own thread) whenever the file may
    /// hold a new version; `what` names the file in warnings (`upstream.api_key_file`).
    pub fn start(path: &Path, what: &'static str, changed: impl Fn() + Send + 'static) -> anyhow::Result<Self> {
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        // Absolute, as notify reports the paths of its events.
        let dir = std::path::absolute(dir)?;
        let file = dir.join(path.file_name().unwrap_or_default());
        let shown = path.display().to_string();
        let handler = {
            let dir = dir.clone();
            move |event: notify::Result<notify::Event>| match event.map(|e| reaction(&e, &dir, &file)) {
                Ok(Reaction::Read) => changed(),
                Ok(Reaction::Ignore) => {}
                Ok(Reaction::WatchEnded) => tracing::warn!(
                    file = %shown,
                    "the {what}'s directory was removed; what was read stays in use, but is no longer re-read"
                ),
                Err(e) => tracing::warn!(error = %e, file = %shown, "watching the {what} failed"),
            }
        };
        let mut watcher = notify::recommended_watcher(handler)?;
        watcher
            .watch(&dir, RecursiveMode::NonRecursive)
            .map_err(|e| anyhow::anyhow!("cannot watch {} for {what} changes: {e}", dir.display()))?;
        Ok(Self { _watcher: watcher })
    }
}

/// What an event in the watched file's directory calls for.
#[derive(Debug, PartialEq, Eq)]
enum Reaction {
    Read,
    Ignore,
    WatchEnded,
}

/// Reads follow what can bring a whole new version of the file, and only events that name it (or a `..` entry:
/// how Kubernetes swaps a mounted volume's `..data`), so other files in the directory set nothing off: a rename
/// (the `..data` swap, an editor's save), the file closed after writing, a link made to a file that already
/// exists (`ln -sf`, `ln`), and anything the watcher cannot describe (after its queue overflowed, say). A
/// regular file just created is read once it is closed, not while it is still empty or half-written; writes in
/// progress, attribute changes and the gateway's own reads (opens, closes without writing) are ignored. The file
/// itself removed is read too (the read fails, and the reader says what that means).
fn reaction(event: &notify::Event, dir: &Path, file: &Path) -> Reaction {
    if matches!(event.kind, EventKind::Remove(_)) && event.paths.iter().any(|p| p == dir) {
        return Reaction::WatchEnded;
    }
    if matches!(event.kind, EventKind::Any | EventKind::Other) {
        return Reaction::Read;
    }
    let volume_entry =
        |p: &Path| p.parent() == Some(dir) && p.file_name().is_some_and(|n| n.as_encoded_bytes().starts_with(b".."));
    if !event.paths.iter().any(|p| p == file || volume_entry(p)) {
        return Reaction::Ignore;
    }
    match event.kind {
        EventKind::Modify(ModifyKind::Name(_) | ModifyKind::Any)
        | EventKind::Access(AccessKind::Close(AccessMode::Write)) => Reaction::Read,
        EventKind::Create(_) if event.paths.iter().any(|p| p.symlink_metadata().is_ok_and(|m| is_link(&m))) => {
            Reaction::Read
        }
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
        std::os::unix::fs::symlink("file", dir.join("key")).expect("symlink");
        std::fs::hard_link(dir.join("file"), dir.join("hard")).expect("hard link");
        std::fs::write(dir.join("fresh"), "").expect("file");
        let event = |kind: EventKind, path: &str| notify::Event::new(kind).add_path(dir.join(path));
        let read = [
            event(EventKind::Modify(ModifyKind::Name(RenameMode::To)), "..data"),
            event(EventKind::Modify(ModifyKind::Name(RenameMode::To)), "key"),
            event(EventKind::Access(AccessKind::Close(AccessMode::Write)), "key"),
            event(EventKind::Create(CreateKind::File), "key"),
            event(EventKind::Other, ""),
            event(EventKind::Remove(RemoveKind::File), "key"),
        ];
        let key = dir.join("key");
        for e in &read {
            assert_eq!(reaction(e, &dir, &key), Reaction::Read, "{e:?}");
        }
        let hard = event(EventKind::Create(CreateKind::File), "hard");
        assert_eq!(reaction(&hard, &dir, &dir.join("hard")), Reaction::Read);
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
            // Other files in the directory: a ledger, an editor's backup, a log.
            event(EventKind::Access(AccessKind::Close(AccessMode::Write)), "usage.jsonl"),
            event(EventKind::Modify(ModifyKind::Name(RenameMode::From)), "key~"),
            event(EventKind::Create(CreateKind::File), "hard"),
        ];
        for e in &ignored {
            assert_eq!(reaction(e, &dir, &key), Reaction::Ignore, "{e:?}");
        }
        let gone = notify::Event::new(EventKind::Remove(RemoveKind::Folder)).add_path(dir.clone());
        assert_eq!(reaction(&gone, &dir, &key), Reaction::WatchEnded);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
