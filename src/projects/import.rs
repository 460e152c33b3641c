//! `mantlegate projects import`: `[[projects]]` stanzas (name, id, tags) for the upstream projects the config does
//! not have, ready to paste into it. A stanza the config would refuse as it is (a tag the taxonomy requires
//! missing, a value it does not allow, a name already taken) is printed all the same, under a `# FIX:` comment
//! that says why, so the operator sees every project and decides; archived projects take no requests and are
//! only named.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;

use super::UpstreamProject;
use crate::config::Config;

/// The stanzas for `upstream` (the plan's projects not in `config`), with a comment heading them.
pub fn stanzas(config: &Config, upstream: &[UpstreamProject]) -> String {
    let (archived, live): (Vec<&UpstreamProject>, Vec<&UpstreamProject>) =
        upstream.iter().partition(|u| u.is_archived());
    let mut out = String::new();
    if live.is_empty() {
        out.push_str("# Every active upstream project is in the config: nothing to import.\n");
    } else {
        let _ = writeln!(
            out,
            "# {} upstream project{} not in the config: paste the stanzas below into it.\n\
             # A stanza under a `# FIX:` comment would not pass `mantlegate check` until fixed.",
            live.len(),
            if live.len() == 1 { "" } else { "s" }
        );
    }
    for u in &archived {
        let _ = writeln!(out, "# Not imported: {:?} ({}) is archived.", u.name, u.id);
    }
    let mut names: HashSet<&str> = config.projects.iter().map(|p| p.name.as_str()).collect();
    for u in live {
        out.push('\n');
        let mut fixes = Vec::new();
        if let Err(why) = crate::config::check_name(&u.name) {
            fixes.push(format!("name {why}"));
        } else if !names.insert(&u.name) {
            fixes.push("name: another project in the config (or above) has this name".to_owned());
        }
        if !crate::config::is_project_id(&u.id) {
            fixes.push("id: not a project id".to_owned());
        }
        fixes.extend(config.taxonomy.violations(&u.tags).into_iter().map(|(tag, why)| format!("tags.{tag}: {why}")));
        for fix in fixes {
            let _ = writeln!(out, "# FIX: {}", one_line(&fix));
        }
        let _ = writeln!(out, "[[projects]]\nname = {}\nid = {}", string(&u.name), string(&u.id));
        let _ = writeln!(out, "tags = {}", inline_table(&u.tags));
    }
    out
}

/// `{ Key = "value", "odd key" = "..." }`.
fn inline_table(tags: &BTreeMap<String, String>) -> String {
    if tags.is_empty() {
        return "{}".to_owned();
    }
    let pairs: Vec<String> = tags.iter().map(|(k, v)| format!("{} = {}", key(k), string(v))).collect();
    format!("{{ {} }}", pairs.join(", "))
}

/// A TOML key: bare when it can be, else quoted.
fn key(key: &str) -> String {
    let bare = !key.is_empty() && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if bare { key.to_owned() } else { string(key) }
}

/// A TOML basic string.
fn string(text: &str) -> String {
    crate::config::lock::toml_string(text)
}

/// A comment stays one line whatever upstream's names hold.
fn one_line(text: &str) -> String {
    text.chars().map(|c| if c.is_control() { ' ' } else { c }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config::from_toml(
            "[callers]\nauth = \"none\"\n[taxonomy]\nrequired_tags = [\"Team\"]\n\
             [taxonomy.allowed_values]\nEnvironment = [\"Production\"]\n\
             [[projects]]\nname = \"Known\"\ntags = { Team = \"t\" }\n",
        )
        .expect("valid")
    }

    fn project(id: &str, name: &str, status: &str, tags: &[(&str, &str)]) -> UpstreamProject {
        let tags = tags.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        UpstreamProject { id: id.into(), name: name.into(), status: status.into(), tags }
    }

    #[test]
    fn stanzas_flag_what_the_config_would_refuse() {
        let upstream = [
            project("proj_ok", "Good", "active", &[("Team", "a"), ("Environment", "Production")]),
            project("proj_bad", "Bad", "active", &[("Environment", "prod")]),
            project("proj_dup", "Known", "active", &[("Team", "b")]),
            project("proj_old", "Old", "archived", &[]),
        ];
        let out = stanzas(&config(), &upstream);
        assert!(out.starts_with("# 3 upstream projects not in the config"), "{out}");
        assert!(out.contains("# Not imported: \"Old\" (proj_old) is archived."), "{out}");
        assert!(out.contains(
            "\n[[projects]]\nname = \"Good\"\nid = \"proj_ok\"\ntags = { Environment = \"Production\", Team = \"a\" }\n"
        ));
        assert!(out.contains(
            "# FIX: tags.Team: missing\n# FIX: tags.Environment: \"prod\" is not one of Production\n[[projects]]\nname = \"Bad\""
        ), "{out}");
        assert!(out.contains(
            "# FIX: name: another project in the config (or above) has this name\n[[projects]]\nname = \"Known\""
        ));
        assert!(!out.contains("FIX: tags.Team: missing\n[[projects]]\nname = \"Good\""));
    }

    #[test]
    fn names_and_tags_are_escaped_as_toml() {
        assert_eq!(string("a\"b\\c\nd"), r#""a\"b\\c\u000Ad""#);
        assert_eq!(key("Cost-Center_1"), "Cost-Center_1");
        assert_eq!(key("cost center"), "\"cost center\"");
        assert_eq!(key(""), "\"\"");
        assert_eq!(inline_table(&BTreeMap::new()), "{}");
        assert_eq!(one_line("a\nb"), "a b");
    }

    #[test]
    fn nothing_to_import_says_so() {
        assert!(stanzas(&config(), &[]).starts_with("# Every active upstream project is in the config"));
    }
}
