//! Reading the usage ledger back, for everything that does: `usage report`, the spend index, the limits'
//! rebuild and reconciliation. Its files (the one in force and those rotated beside it), its lines as bytes, and
//! the fields of a line they read, in one place, so that they all read a line the same way.
//!
//! Lines are split on newline bytes, not as UTF-8 text: a line torn inside a character (a crash mid-write) is one
//! unreadable line, and the lines after it are still read.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::Deserialize;

/// The ledger file and its rotated siblings (`usage.jsonl`, `usage.2026-11-25.jsonl`, ...: regular files only),
/// oldest first, the ledger itself last (whether or not it exists).
pub fn files(path: &Path) -> Vec<PathBuf> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut rotated: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|file| rotated_day(path, file).is_some() && file.is_file())
        .collect();
    rotated.sort();
    rotated.push(path.to_owned());
    rotated
}

/// The ledger's files that may hold lines from `first_day` (`2026-12-01`) on: the ledger itself, and the files
/// rotated from the day before it (a batch begun just before midnight goes to the old day's file).
pub fn files_from(path: &Path, first_day: &str) -> Vec<PathBuf> {
    let day_before = crate::metering::ledger::utc_day(
        humantime::parse_rfc3339_weak(&format!("{first_day}T00:00:00Z"))
            .ok()
            .and_then(|t| t.checked_sub(std::time::Duration::from_secs(86_400)))
            .unwrap_or(SystemTime::UNIX_EPOCH),
    );
    files(path)
        .into_iter()
        .filter(|file| rotated_day(path, file).is_none_or(|day| day >= day_before.as_str()))
        .collect()
}

/// The day a rotated file of `ledger` is named for (`usage.2026-11-25.jsonl` -> `2026-11-25`); none for the
/// ledger itself or a file that is not one of its rotated ones.
pub fn rotated_day<'a>(ledger: &Path, file: &'a Path) -> Option<&'a str> {
    if file == ledger {
        return None;
    }
    let name = file.file_name()?.to_str()?;
    let stem = ledger.file_stem()?.to_str()?;
    let ext = ledger.extension().map(|e| format!(".{}", e.to_string_lossy())).unwrap_or_default();
    let day = name.strip_prefix(stem)?.strip_prefix('.')?.strip_suffix(ext.as_str())?;
    (day.len() == 10 && day.bytes().all(|b| b.is_ascii_digit() || b == b'-')).then_some(day)
}

/// The lines of `files`, in order, each without its newline. A file that is not there is skipped (rotation may
/// have moved it since it was listed), and so is one that is no regular file (a ledger written to `/dev/stdout`
/// or a pipe has nothing to read back); one that cannot be read is an error naming it.
pub fn lines(files: &[PathBuf]) -> impl Iterator<Item = anyhow::Result<Vec<u8>>> + '_ {
    files.iter().flat_map(|path| {
        // Looked at before it is opened: opening a named pipe waits for a writer.
        let opened = std::fs::metadata(path).and_then(|m| m.is_file().then(|| File::open(path)).transpose());
        let (reader, error) = match opened {
            Ok(Some(file)) => (Some(BufReader::with_capacity(1 << 20, file)), None),
            Ok(None) => (None, None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (None, None),
            Err(e) => (None, Some(Err(anyhow::anyhow!("cannot read the ledger {}: {e}", path.display())))),
        };
        let read = reader.into_iter().flat_map(move |reader| {
            reader
                .split(b'\n')
                .map(move |line| line.map_err(|e| anyhow::anyhow!("reading the ledger {}: {e}", path.display())))
        });
        error.into_iter().chain(read)
    })
}

/// Whether a line holds nothing (an empty line is no request, and no unreadable one either).
pub fn is_blank(line: &[u8]) -> bool {
    line.iter().all(u8::is_ascii_whitespace)
}

/// The fields of a ledger line that its readers use, borrowed from the line where they need no unescaping.
#[derive(Debug, Deserialize)]
pub struct Line<'a> {
    /// When the request ended (RFC 3339, UTC).
    #[serde(borrow)]
    pub time: Text<'a>,
    /// The caller's key's name.
    #[serde(borrow, default)]
    pub key: Option<Text<'a>>,
    /// The project's name.
    #[serde(borrow)]
    pub project: Text<'a>,
    /// The project's id upstream.
    #[serde(borrow, default)]
    pub project_id: Option<Text<'a>>,
    /// The project's tags when the request was made.
    #[serde(borrow, default)]
    pub tags: BTreeMap<Text<'a>, Text<'a>>,
    /// The model the response named.
    #[serde(borrow, default)]
    pub model: Option<Text<'a>>,
    /// Input tokens, cached ones included.
    #[serde(default)]
    pub input_tokens: u64,
    /// Output tokens, reasoning included.
    #[serde(default)]
    pub output_tokens: u64,
    /// The cached part of the input.
    #[serde(default)]
    pub cached_input_tokens: u64,
    /// The reasoning part of the output.
    #[serde(default)]
    pub reasoning_tokens: u64,
    /// Its cost at configured prices; none for a model without a price.
    pub cost_usd: Option<f64>,
    /// Whether the response ended as it should.
    #[serde(default)]
    pub complete: bool,
    /// Why the gateway could not (fully) read the response's usage; only whether it is there counts (a JSON
    /// `null` is as good as absent).
    #[serde(borrow, default)]
    pub unmetered: Option<Text<'a>>,
    /// The limit that refused the request: it was never forwarded, used nothing, and is no request upstream
    /// billed.
    #[serde(borrow, default)]
    pub refused_by: Option<Text<'a>>,
}

impl<'a> Line<'a> {
    /// The line's fields; none if it is not a ledger line (torn, not JSON, without a time or project).
    pub fn parse(line: &'a [u8]) -> Option<Self> {
        serde_json::from_slice(line).ok()
    }

    /// When the request ended; none if the time cannot be read.
    pub fn time(&self) -> Option<SystemTime> {
        humantime::parse_rfc3339_weak(&self.time).ok()
    }

    /// Every subject a limit may be set on that this line counts against: its project, its key and each tag value
    /// (as `Subject`s name them).
    pub fn subjects(&self) -> impl Iterator<Item = crate::config::limits::Subject> + '_ {
        use crate::config::limits::Subject;
        std::iter::once(Subject::Project(self.project.to_string()))
            .chain(self.key.as_ref().map(|k| Subject::Key(k.to_string())))
            .chain(self.tags.iter().map(|(k, v)| Subject::Tag(k.to_string(), v.to_string())))
    }
}

/// A JSON string, borrowed from the line unless it had escapes to undo.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Text<'a>(pub Cow<'a, str>);

impl std::ops::Deref for Text<'_> {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

/// So that a line's tags can be looked up by name.
impl std::borrow::Borrow<str> for Text<'_> {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Text<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for Visitor<'a> {
            type Value = Text<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Text<'a>, E> {
                Ok(Text(Cow::Borrowed(s)))
            }
            fn visit_str<E>(self, s: &str) -> Result<Text<'a>, E> {
                Ok(Text(Cow::Owned(s.to_owned())))
            }
        }
        deserializer.deserialize_str(Visitor(std::marker::PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotated_files_are_known_by_their_day() {
        let ledger = Path::new("/v/usage.jsonl");
        assert_eq!(rotated_day(ledger, Path::new("/v/usage.2026-11-25.jsonl")), Some("2026-11-25"));
        assert_eq!(rotated_day(ledger, ledger), None);
        for other in
            ["/v/usage.2026-11-25.json", "/v/usage.backup.jsonl", "/v/usage.2026-11-2x.jsonl", "/v/other.jsonl"]
        {
            assert_eq!(rotated_day(ledger, Path::new(other)), None, "{other}");
        }
    }

    #[test]
    fn files_are_listed_oldest_first_and_from_a_day_on() {
        let dir = std::env::temp_dir().join(format!("mantlegate-ledger-read-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let ledger = dir.join("usage.jsonl");
        for day in ["2026-12-01", "2026-11-29", "2026-11-30"] {
            std::fs::write(dir.join(format!("usage.{day}.jsonl")), "").expect("write");
        }
        std::fs::write(dir.join("usage.notes.jsonl"), "").expect("write");
        let names = |files: Vec<PathBuf>| -> Vec<String> {
            files.iter().map(|f| f.file_name().expect("name").to_string_lossy().into_owned()).collect()
        };
        let all = ["usage.2026-11-29.jsonl", "usage.2026-11-30.jsonl", "usage.2026-12-01.jsonl", "usage.jsonl"];
        assert_eq!(names(files(&ledger)), all);
        // December's lines: from November 30th's file on (its last batch may hold December's first lines).
        assert_eq!(names(files_from(&ledger, "2026-12-01")), all[1..]);
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn lines_are_split_on_bytes_and_a_torn_one_spoils_only_itself() {
        let dir = std::env::temp_dir().join(format!("mantlegate-ledger-lines-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let (a, b) = (dir.join("a.jsonl"), dir.join("b.jsonl"));
        let good = r#"{"time":"2026-12-02T15:00:00Z","project":"Caf\u00e9","tags":{"Team":"T"},"input_tokens":3}"#;
        // A line torn inside a two-byte character, with no newline before the next line.
        let mut text = good.as_bytes()[..40].to_vec();
        text.extend(b"\xc3\n");
        text.extend(good.as_bytes());
        text.push(b'\n');
        std::fs::write(&a, &text).expect("write");
        std::fs::write(&b, format!("\n{good}")).expect("write");
        // A named pipe (a ledger written to a pipe, or to /dev/stdout) is not read: opening it would wait for a
        // writer. Nor is a directory.
        let fifo = dir.join("fifo.jsonl");
        assert!(std::process::Command::new("mkfifo").arg(&fifo).status().expect("mkfifo").success());
        let files = [a, dir.join("gone.jsonl"), fifo, dir.clone(), b];
        let read: Vec<Vec<u8>> = lines(&files).collect::<anyhow::Result<_>>().expect("lines");
        assert_eq!(read.len(), 4);
        assert!(Line::parse(&read[0]).is_none());
        assert!(is_blank(&read[2]));
        for line in [&read[1], &read[3]] {
            let line = Line::parse(line).expect("line");
            // Escaped text is unescaped (owned); the rest is borrowed.
            assert_eq!((&*line.project, line.input_tokens), ("Café", 3));
            assert!(matches!(line.time.0, Cow::Borrowed(_)));
            assert_eq!(line.subjects().map(|s| s.to_string()).collect::<Vec<_>>(), ["project:Café", "tag:Team=T"]);
        }
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
