//! Which keys a config may hold, learned from the raw config's own defaults, so that every unknown key (a typo
//! in the file, or a misspelled `MANTLEGATE__...` environment variable) is named, each where it came from, and
//! removed before the rest is read: one unknown key does not hide the file's other problems.

use config::{Map, Value, ValueKind};

use super::raw::{RawConfig, RawKey, RawLimitRule, RawLimits, RawPrice, RawProject, RawRoute};

/// Where the `config` crate says an environment override came from.
const FROM_ENV: &str = "the environment";

/// The known keys: the defaults, with one default entry in each list to stand for all of its entries.
fn known() -> serde_json::Value {
    let example = RawConfig {
        projects: vec![RawProject::default()],
        keys: vec![RawKey::default()],
        routes: vec![RawRoute::default()],
        prices: vec![RawPrice::default()],
        limits: RawLimits { rules: vec![RawLimitRule::default()], ..RawLimits::default() },
        ..RawConfig::default()
    };
    serde_json::to_value(example).unwrap_or_default()
}

/// Removes every key of `root` that is not a setting, and describes each one.
pub(super) fn remove_unknown(root: &mut Value) -> Vec<String> {
    let mut problems = Vec::new();
    if let ValueKind::Table(table) = &mut root.kind {
        prune(table, &known(), "", &mut problems);
    }
    problems
}

fn prune(table: &mut Map<String, Value>, known: &serde_json::Value, at: &str, problems: &mut Vec<String>) {
    let mut keys: Vec<String> = table.keys().cloned().collect();
    keys.sort();
    for key in keys {
        let path = if at.is_empty() { key.clone() } else { format!("{at}.{key}") };
        let Some(schema) = known.get(&key) else {
            if let Some(value) = table.remove(&key) {
                problems.push(unknown(&path, &value));
            }
            continue;
        };
        let Some(value) = table.get_mut(&key) else { continue };
        match (&mut value.kind, schema) {
            // An empty map in the defaults holds names of the user's choosing (tags, allowed values).
            (ValueKind::Table(inner), serde_json::Value::Object(fields)) if !fields.is_empty() => {
                prune(inner, schema, &path, problems);
            }
            (ValueKind::Array(items), serde_json::Value::Array(example)) => {
                let Some(item_schema @ serde_json::Value::Object(fields)) = example.first() else { continue };
                if fields.is_empty() {
                    continue;
                }
                for (i, item) in items.iter_mut().enumerate() {
                    if let ValueKind::Table(inner) = &mut item.kind {
                        prune(inner, item_schema, &format!("{path}[{i}]"), problems);
                    }
                }
            }
            _ => {}
        }
    }
}

/// What to say of the unknown key at `path`: an environment variable is named as one.
fn unknown(path: &str, value: &Value) -> String {
    if from_env(value) {
        let var = format!("MANTLEGATE__{}", path.replace('.', "__").to_uppercase());
        format!("{var}: environment variable for {path}, which is not a setting (is it misspelled?)")
    } else {
        format!("{path}: not a setting (is it misspelled? the settings are listed in README.md)")
    }
}

/// Whether `value`, or everything in it, came from the environment.
fn from_env(value: &Value) -> bool {
    match &value.kind {
        ValueKind::Table(table) if !table.is_empty() => table.values().all(from_env),
        _ => value.origin() == Some(FROM_ENV),
    }
}
