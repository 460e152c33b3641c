//! `mantlegate keys new`: a fresh key, shown once, and the stanza that stores only its hash.

use crate::auth::{generate_key, hash_key};

/// The text `keys new` prints.
pub fn new_key(name: &str, project: Option<&str>) -> anyhow::Result<String> {
    if name.trim().is_empty() || name.trim() != name || name.contains('"') || name.chars().any(char::is_control) {
        anyhow::bail!("--name must be a non-empty name without quotes or surrounding spaces");
    }
    if project.is_some_and(|p| p.contains('"') || p.chars().any(char::is_control)) {
        anyhow::bail!("--project must be a project name without quotes");
    }
    let key = generate_key()?;
    let digest = hex::encode(hash_key(key.as_bytes()));
    let project = project.map_or_else(
        || "# project = \"<project name>\"   # the project this key's requests belong to\n".to_owned(),
        |p| format!("project = \"{p}\"\n"),
    );
    Ok(format!(
        "# Key for {name:?}. Give it to the caller now: it is shown only once and stored nowhere.\n\
         {key}\n\n\
         # Add this to the config:\n\
         [[keys]]\n\
         name = \"{name}\"\n\
         sha256 = \"{digest}\"\n\
         {project}\
         may_select = []\n"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn bad_names_are_refused() {
        assert!(new_key("", None).is_err());
        assert!(new_key("a\"b", None).is_err());
    }
}
