//! Every example in `config/` loads and validates, so the examples can never rot.
#![allow(clippy::unwrap_used)]

#[test]
fn every_example_config_is_valid() {
    let mut checked = 0;
    for entry in std::fs::read_dir("config").unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let config = mantlegate::Config::load(&path).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
            assert!(!config.projects.is_empty(), "{}", path.display());
            for p in &config.projects {
                for tag in ["Application", "Environment", "Team", "CostCenter"] {
                    assert!(p.tags.contains_key(tag), "{}: {} lacks {tag}", path.display(), p.name);
                }
            }
            checked += 1;
        }
    }
    assert!(checked >= 2, "expected the central and sidecar examples");
}
