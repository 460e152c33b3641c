//! `mantlegate projects plan` and `mantlegate projects import`: the config's projects against the Projects API.
//! The config is loaded (and so the taxonomy checked, every violation listed) before any call is made.

use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;

use crate::config::Config;
use crate::projects::plan::{Action, MatchedBy, Options, Plan};
use crate::projects::{UpstreamProject, client, import, plan};

/// How `plan` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// For a person.
    Text,
    /// For a program: the plan as one JSON document.
    Json,
}

/// `projects plan`: prints the plan; exits 0 with nothing to do, 2 with changes, 1 with problems.
pub fn plan(path: &Path, format: Format, api_key_env: Option<&str>, options: Options) -> anyhow::Result<ExitCode> {
    let config = Config::load(path)?;
    crate::telemetry::init_stderr();
    let plan = runtime()?.block_on(async {
        let client = client::connect(&config.upstream, api_key_env).await?;
        let mut upstream = client.list().await?;
        let listed = upstream.len();
        for id in plan::ids_to_get(&config.projects, &upstream) {
            upstream.extend(client.get(id).await?);
        }
        Ok::<_, anyhow::Error>((plan::plan(&config.projects, &upstream, options), listed))
    });
    let (plan, listed) = plan?;
    match format {
        Format::Text => print!("{}", text(path, &config, &plan, listed)),
        Format::Json => println!("{}", serde_json::to_string_pretty(&plan)?),
    }
    if plan.problems() > 0 {
        eprintln!("error: {} problem(s) no apply can fix (the `problem:` lines of the plan)", plan.problems());
    }
    Ok(ExitCode::from(plan.exit_code()))
}

/// `projects import`: prints `[[projects]]` stanzas for the upstream projects the config does not have.
pub fn import(path: &Path, api_key_env: Option<&str>) -> anyhow::Result<ExitCode> {
    let config = Config::load(path)?;
    crate::telemetry::init_stderr();
    let upstream = runtime()?.block_on(async {
        let client = client::connect(&config.upstream, api_key_env).await?;
        client.list().await
    })?;
    let plan = plan::plan(&config.projects, &upstream, Options::default());
    print!("{}", import::stanzas(&config, &plan.not_in_config));
    Ok(ExitCode::SUCCESS)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

/// The plan for a person: one block per configured project, then upstream's projects the config lacks.
fn text(path: &Path, config: &Config, plan: &Plan, listed: usize) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Projects in {} against {} ({listed} listed upstream)\n",
        path.display(),
        config.upstream.authority
    );
    for p in &plan.projects {
        let (mark, what) = match p.action {
            Action::Create => ('+', "create"),
            Action::Update => ('~', "update"),
            Action::Unchanged => ('=', "nothing to do"),
            Action::Blocked => ('!', "blocked"),
        };
        let matched = match (&p.id, p.matched_by) {
            (Some(id), Some(MatchedBy::Id)) => format!(" ({id}, matched by id)"),
            (Some(id), Some(MatchedBy::Name)) => format!(" ({id}, matched by name)"),
            (Some(id), None) => format!(" ({id})"),
            (None, _) => String::new(),
        };
        let _ = writeln!(out, "{mark} {}{matched}: {what}", p.name);
        if p.action == Action::Create {
            let _ = writeln!(out, "    with tags {}", tags(p.add_tags.iter()));
        } else {
            for (tag, value) in &p.add_tags {
                let _ = writeln!(out, "    add tag {tag} = {value:?}");
            }
        }
        for (tag, c) in &p.correct_tags {
            let _ = writeln!(out, "    correct tag {tag}: {:?} -> {:?}", c.from, c.to);
        }
        for tag in &p.remove_tag_keys {
            let _ = writeln!(out, "    remove tag {tag} (not in the config)");
        }
        for (tag, value) in &p.unlisted_tags_kept {
            let _ = writeln!(
                out,
                "    tag {tag} = {value:?} is not in the config: unlisted, kept (--remove-unlisted-tags)"
            );
        }
        if let Some(c) = &p.rename {
            let _ = writeln!(out, "    rename {:?} -> {:?}", c.from, c.to);
        }
        if let Some(name) = &p.upstream_name {
            let _ = writeln!(out, "    named {name:?} upstream: kept (--rename)");
        }
        if let (Some(id), Some(MatchedBy::Name), true) = (&p.id, p.matched_by, p.problems.is_empty()) {
            let _ = writeln!(out, "    note: set id = {id:?} in the config to keep this match");
        }
        for problem in &p.problems {
            let _ = writeln!(out, "    problem: {problem}");
        }
    }
    if !plan.not_in_config.is_empty() {
        let _ = writeln!(
            out,
            "\nUpstream projects not in the config ({}; `mantlegate projects import` prints them as config):",
            plan.not_in_config.len()
        );
        for u in &plan.not_in_config {
            let _ = writeln!(out, "  {} {:?} {}{}", u.id, u.name, status(u), tags(u.tags.iter()));
        }
    }
    let count = |action| plan.projects.iter().filter(|p| p.action == action).count();
    let _ = writeln!(
        out,
        "\n{} to create, {} to update, {} unchanged, {} blocked ({} problem{}).",
        count(Action::Create),
        count(Action::Update),
        count(Action::Unchanged),
        count(Action::Blocked),
        plan.problems(),
        if plan.problems() == 1 { "" } else { "s" }
    );
    out
}

fn status(u: &UpstreamProject) -> String {
    if u.status.is_empty() { String::new() } else { format!("{} ", u.status) }
}

fn tags<'a>(tags: impl Iterator<Item = (&'a String, &'a String)>) -> String {
    let shown: Vec<String> = tags.map(|(k, v)| format!("{k}={v:?}")).collect();
    if shown.is_empty() { "(no tags)".into() } else { shown.join(" ") }
}
