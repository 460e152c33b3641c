//! `projects.lock.toml`, beside the config file: the ids `mantlegate projects apply` created or found by name for
//! the projects the config lists without an `id`, with the upstream host (and region) they belong to. `check`,
//! `serve` and reload read it, so such a project gets its id from the lock, but only when the lock was written
//! for the config's upstream host: projects are regional, and another region's id is a 404.
//!
//! The file is small TOML written whole by apply (a temporary file renamed over it, so a reader never sees half
//! of one); it is meant to be committed next to the config and shipped with it (a second key of the same
//! Kubernetes ConfigMap).

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::Deserialize;

/// The lock file's name, in the config file's directory.
pub const FILE_NAME: &str = "projects.lock.toml";

/// What the lock file says.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lock {
    /// The upstream host (and port) the ids belong to.
    pub upstream: String,
    /// The AWS region, when the config names one.
    #[serde(default)]
    pub region: Option<String>,
    /// One entry per project, by name.
    #[serde(default)]
    pub projects: Vec<Entry>,
}

/// A project's id, by its configured name.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// The configured name.
    pub name: String,
    /// Its `proj_...` id upstream.
    pub id: String,
}

/// The lock file as read: where, what it says, and the hash of its text.
#[derive(Debug, Clone)]
pub struct Read {
    /// The file.
    pub path: PathBuf,
    /// Its contents.
    pub lock: Lock,
    /// SHA-256 of its text: a reload finding neither file changed changes nothing.
    pub sha256: String,
}

/// What the lock file gave a config.
#[derive(Debug, Clone, Default)]
pub struct LockUse {
    /// SHA-256 of the lock file's text, when there is one beside the config.
    pub sha256: Option<String>,
    /// The projects whose id came from it, by name.
    pub ids: Vec<String>,
    /// Why it was not used, when it was not (written for another upstream host).
    pub ignored: Option<String>,
}

impl Lock {
    /// The id recorded for the project `name`.
    pub fn id(&self, name: &str) -> Option<&str> {
        self.projects.iter().find(|e| e.name == name).map(|e| e.id.as_str())
    }

    /// The file's text.
    pub fn to_toml(&self) -> String {
        let mut out = String::from(
            "# Written by `mantlegate projects apply`: the ids of the projects the config lists without an `id`.\n\
             # Commit it next to the config and ship it beside it; edit the config, not this file.\n",
        );
        let _ = writeln!(out, "upstream = {}", toml_string(&self.upstream));
        if let Some(region) = &self.region {
            let _ = writeln!(out, "region = {}", toml_string(region));
        }
        for e in &self.projects {
            let _ = write!(out, "\n[[projects]]\nname = {}\nid = {}\n", toml_string(&e.name), toml_string(&e.id));
        }
        out
    }
}

/// Where the lock file of the config at `config` is.
pub fn path_beside(config: &Path) -> PathBuf {
    config.parent().unwrap_or_else(|| Path::new("")).join(FILE_NAME)
}

/// The lock file beside the config at `config`, if there is one.
pub fn read_beside(config: &Path) -> anyhow::Result<Option<Read>> {
    let path = path_beside(config);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => anyhow::bail!("cannot read {}: {e}", path.display()),
    };
    let lock = config::Config::builder()
        .add_source(config::File::from_str(&text, config::FileFormat::Toml))
        .build()
        .and_then(config::Config::try_deserialize::<Lock>)
        .map_err(|e| anyhow::anyhow!("{}: not a lock file: {e}", path.display()))?;
    Ok(Some(Read { path, sha256: super::sha256(&text), lock }))
}

/// Writes `lock` to `path` whole: a temporary file beside it, renamed over it.
pub fn write(path: &Path, lock: &Lock) -> anyhow::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or_else(|| Path::new("."));
    let temp = dir.join(format!(".{FILE_NAME}.{}.tmp", std::process::id()));
    let written = (|| {
        let mut file = std::fs::File::create(&temp)?;
        file.write_all(lock.to_toml().as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&temp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    written.with_context(|| format!("cannot write {}", path.display()))
}

/// A TOML basic string: `"` and `\` escaped, and every control character as `\uXXXX`.
pub(crate) fn toml_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Gives the projects of `config` without an `id` the ids `read` records, if it was written for the config's
/// upstream host. An id that is not a project id, or that another project already has, is an error.
pub fn apply(config: &mut super::Config, read: Option<Read>) -> anyhow::Result<()> {
    let Some(Read { path, lock, sha256 }) = read else {
        config.lock = LockUse::default();
        return Ok(());
    };
    let mut used = LockUse { sha256: Some(sha256), ..LockUse::default() };
    let host = config.upstream.authority.to_string();
    let region = config.upstream.region.clone();
    if lock.upstream != host || (lock.region.is_some() && region.is_some() && lock.region != region) {
        let of = |host: &str, region: &Option<String>| match region {
            Some(region) => format!("{host} ({region})"),
            None => host.to_owned(),
        };
        used.ignored = Some(format!(
            "{} was written for {}, not this config's upstream {}: not used",
            path.display(),
            of(&lock.upstream, &lock.region),
            of(&host, &region)
        ));
        config.lock = used;
        return Ok(());
    }
    let mut problems = Vec::new();
    let mut taken: Vec<String> =
        config.projects.iter().flat_map(|p| p.id.iter().cloned().chain([p.name.clone()])).collect();
    for (i, e) in lock.projects.iter().enumerate() {
        let Some(project) = config.projects.iter_mut().find(|p| p.name == e.name && p.id.is_none()) else { continue };
        if !super::is_project_id(&e.id) {
            problems.push(format!("projects[{i}].id: {:?} is not a project id", e.id));
        } else if taken.contains(&e.id) {
            problems.push(format!("projects[{i}].id: {:?} is already the id or name of a configured project", e.id));
        } else {
            project.id = Some(e.id.clone());
            used.ids.push(e.name.clone());
            taken.push(e.id.clone());
        }
    }
    if !problems.is_empty() {
        anyhow::bail!("{}: {}", path.display(), problems.join("; "));
    }
    config.lock = used;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_reads_back_as_written() {
        let lock = Lock {
            upstream: "bedrock-mantle.us-east-1.api.aws".into(),
            region: Some("us-east-1".into()),
            projects: vec![Entry { name: "Chat \"EU\".v2".into(), id: "proj_1".into() }],
        };
        let dir = std::env::temp_dir().join(format!("mantlegate-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let config = dir.join("gateway.toml");
        write(&path_beside(&config), &lock).expect("written");
        let read = read_beside(&config).expect("read").expect("there");
        assert_eq!(read.lock, lock);
        assert_eq!(read.lock.id("Chat \"EU\".v2"), Some("proj_1"));
        assert!(
            std::fs::read_dir(&dir).expect("dir").all(|e| !e
                .expect("entry")
                .file_name()
                .to_string_lossy()
                .ends_with(".tmp"))
        );
        std::fs::remove_dir_all(&dir).expect("cleaned");
    }

    fn config() -> super::super::Config {
        super::super::Config::from_toml(
            "[upstream]\nbase_url = \"http://127.0.0.1:9\"\n[callers]\nauth = \"none\"\n\
             [[projects]]\nname = \"A\"\ntags = {}\n[[projects]]\nname = \"B\"\nid = \"proj_b\"\ntags = {}\n",
        )
        .expect("valid")
    }

    fn read(upstream: &str, entries: &[(&str, &str)]) -> Option<Read> {
        let projects = entries.iter().map(|(n, i)| Entry { name: (*n).into(), id: (*i).into() }).collect();
        Some(Read {
            path: FILE_NAME.into(),
            lock: Lock { upstream: upstream.into(), region: None, projects },
            sha256: "x".into(),
        })
    }

    #[test]
    fn ids_are_taken_only_for_projects_without_one_and_only_for_the_same_host() {
        let mut c = config();
        apply(&mut c, read("127.0.0.1:9", &[("A", "proj_a"), ("B", "proj_other"), ("Gone", "proj_g")])).expect("ok");
        assert_eq!(c.project("A").and_then(|p| p.id.as_deref()), Some("proj_a"));
        assert_eq!(c.project("B").and_then(|p| p.id.as_deref()), Some("proj_b"), "the config's id wins");
        assert_eq!(c.lock.ids, ["A"]);

        let mut c = config();
        apply(&mut c, read("elsewhere:443", &[("A", "proj_a")])).expect("ok");
        assert_eq!(c.project("A").and_then(|p| p.id.as_deref()), None);
        assert!(c.lock.ignored.as_deref().is_some_and(|why| why.contains("written for elsewhere:443")));

        let error = apply(&mut config(), read("127.0.0.1:9", &[("A", "proj_b")])).expect_err("taken");
        assert!(error.to_string().contains("\"proj_b\" is already the id or name"), "{error}");
        let mut c = config();
        c.projects.push(c.projects[0].clone());
        c.projects[2].name = "C".into();
        let error = apply(&mut c, read("127.0.0.1:9", &[("A", "proj_x"), ("C", "proj_x")])).expect_err("twice");
        assert!(error.to_string().contains("projects[1].id: \"proj_x\" is already"), "{error}");
        assert!(apply(&mut config(), read("127.0.0.1:9", &[("A", "nope")])).is_err());
    }
}
