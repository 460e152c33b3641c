//! `mantlegate keys new`: a fresh key, shown once, and the stanza that stores only its hash.

use crate::auth::{generate_key, hash_key};
use crate::config::{Config, check_name};

/// `text` as a TOML basic string: JSON's escapes are a subset of TOML's.
fn toml_string(text: &str) -> String {
    serde_json::Value::from(text).to_string()
}

/// Whether a key named `name` for `project` fits `config`: the project is one of its projects, and no key has
/// the name already.
pub fn check_against(config: &Config, name: &str, project: Option<&str>) -> Result<(), String> {
    if config.keys.iter().any(|k| k.name == name) {
        return Err(format!("a key named {name:?} is already configured"));
    }
    match project {
        Some(project) if config.project(project).is_none() => {
            let names: Vec<&str> = config.projects.iter().map(|p| p.name.as_str()).collect();
            Err(format!("no project named {project:?} (the projects are: {})", names.join(", ")))
        }
        _ => Ok(()),
    }
}

/// The text `keys new` prints.
pub fn new_key(name: &str, project: Option<&str>) -> anyhow::Result<String> {
    // The rules `check` holds the config's names to, so that the stanza always loads.
    check_name(name).map_err(|why| anyhow::anyhow!("--name {why}"))?;
    if let Some(project) = project {
        check_name(project).map_err(|why| anyhow::anyhow!("--project {why}"))?;
    }
    let key = generate_key()?;
    let digest = hex::encode(hash_key(key.as_bytes()));
    let project = project.map_or_else(
        || "# project = \"<project name>\"   # the project this key's requests belong to\n".to_owned(),
        |p| format!("project = {}\n", toml_string(p)),
    );
    let name_text = toml_string(name);
    Ok(format!(
        "# Key for {name:?}. Give it to the caller now: it is shown only once and stored nowhere.\n\
         {key}\n\n\
         # Add this to the config:\n\
         [[keys]]\n\
         name = {name_text}\n\
         sha256 = \"{digest}\"\n\
         {project}\
         may_select = []\n"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_key_is_checked_against_the_config_when_given_one() {
        let config = Config::from_toml(
            "[callers]\nauth = \"none\"\n[[projects]]\nname = \"A\"\nid = \"proj_a\"\n[[projects]]\nname = \"B\"\nid = \"proj_b\"",
        )
        .expect("config");
        assert_eq!(check_against(&config, "k", Some("A")), Ok(()));
        assert_eq!(check_against(&config, "k", None), Ok(()));
        assert_eq!(
            check_against(&config, "k", Some("Typo")),
            Err("no project named \"Typo\" (the projects are: A, B)".into())
        );
    }

    #[test]
    fn stanza_holds_the_hash_of_the_printed_key() {
        let out = new_key("svc", Some("P")).expect("key");
        let key = out.lines().find(|l| l.starts_with("mg_")).expect("key line");
        let stanza = &out[out.find("[[keys]]").expect("stanza")..];
        assert!(stanza.contains(&hex::encode(hash_key(key.as_bytes()))));
        assert!(!stanza.contains(key));
        assert!(stanza.contains("project = \"P\""));
        let parsed: toml::Value = toml::from_str(stanza).expect("stanza is TOML");
        assert_eq!(parsed["keys"][0]["name"].as_str(), Some("svc"));
    }

    #[test]
    fn bad_names_are_refused_and_odd_ones_load_as_given() {
        assert!(new_key("", None).is_err());
        assert!(new_key(" a", None).is_err());
        assert!(new_key(&"x".repeat(129), None).is_err());
        assert!(new_key("a\u{8}", None).is_err());
        assert!(new_key("a", Some("")).is_err());
        for (name, project) in [("a\\q", "P\\u00e9"), ("a\\b", "Pé"), ("say \"hi\"", "p'q")] {
            let out = new_key(name, Some(project)).expect("key");
            let parsed: toml::Value = toml::from_str(&out[out.find("[[keys]]").expect("stanza")..]).expect("TOML");
            assert_eq!(parsed["keys"][0]["name"].as_str(), Some(name));
            assert_eq!(parsed["keys"][0]["project"].as_str(), Some(project));
        }
    }
}
