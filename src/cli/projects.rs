//! `mantlegate projects plan`, `apply` and `import`: the config's projects against the Projects API. The config is
//! loaded (and so the taxonomy checked, every violation listed) before any call is made. These commands read the
//! config without its lock file: a project without an `id` in the config is matched by name, and `apply` writes
//! the lock afresh from what it found and made.

use std::fmt::Write as _;
use std::io::{BufRead as _, IsTerminal as _, Write as _};
use std::path::Path;
use std::process::ExitCode;

use crate::config::Config;
use crate::config::lock;
use crate::projects::client::ProjectsClient;
use crate::projects::plan::{Action, MatchedBy, Options, Plan};
use crate::projects::{UpstreamProject, apply as applying, client, import, plan};

/// How `plan` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// For a person.
    Text,
    /// For a program: the plan as one JSON document.
    Json,
}

/// The config with the ids its lock file records (a project keeps the upstream project it was created or matched
/// as, whatever its name since), refused when a lock file beside it was written for another upstream: the ids in
/// it are not this upstream's, and `apply` would overwrite it.
fn load(path: &Path) -> anyhow::Result<Config> {
    let config = Config::load(path)?;
    if let Some(ignored) = &config.lock.ignored {
        anyhow::bail!("{ignored}; give each upstream's config a directory of its own");
    }
    Ok(config)
}

/// `projects plan`: prints the plan; exits 0 with nothing to do, 2 with changes, 1 with problems.
pub fn plan(path: &Path, format: Format, api_key_env: Option<&str>, options: Options) -> anyhow::Result<ExitCode> {
    let config = load(path)?;
    crate::telemetry::init_stderr();
    let (_, plan, listed) = runtime()?.block_on(fetch_plan(&config, api_key_env, options))?;
    match format {
        Format::Text => print!("{}", text(path, &config, &plan, listed)),
        Format::Json => println!("{}", serde_json::to_string_pretty(&plan)?),
    }
    if plan.problems() > 0 {
        eprintln!("error: {} problem(s) no apply can fix (the `problem:` lines of the plan)", plan.problems());
    }
    Ok(ExitCode::from(plan.exit_code()))
}

/// A client, and the plan for `config` against every project upstream (how many the list gave).
async fn fetch_plan(
    config: &Config,
    api_key_env: Option<&str>,
    options: Options,
) -> anyhow::Result<(ProjectsClient, Plan, usize)> {
    let client = client::connect(&config.upstream, api_key_env).await?;
    let mut upstream = client.list().await?;
    let listed = upstream.len();
    for id in plan::ids_to_get(&config.projects, &upstream) {
        upstream.extend(client.get(id).await?);
    }
    Ok((client, plan::plan(&config.projects, &upstream, options), listed))
}

/// `projects apply`: prints the plan, asks for confirmation (unless `yes`) and carries it out; writes the ids of
/// the projects without an `id` in the config to the lock file beside it. Exits 0 when everything was done (or
/// nothing was to do), 1 when the plan has problems, the confirmation was not given, or a call failed.
pub fn apply(path: &Path, api_key_env: Option<&str>, options: Options, yes: bool) -> anyhow::Result<ExitCode> {
    let config = load(path)?;
    crate::telemetry::init_stderr();
    let runtime = runtime()?;
    let (client, plan, listed) = runtime.block_on(fetch_plan(&config, api_key_env, options))?;
    print!("{}", text(path, &config, &plan, listed));
    if plan.problems() > 0 {
        eprintln!(
            "error: not applied: {} problem(s) no apply can fix (the `problem:` lines above); nothing was changed",
            plan.problems()
        );
        return Ok(ExitCode::FAILURE);
    }
    let lock_path = lock::path_beside(path);
    if plan.changes() == 0 {
        println!(
            "
Nothing to do: upstream matches the config."
        );
        write_lock(&lock_path, &applying::lock(&config, &plan, &Default::default()))?;
        return Ok(ExitCode::SUCCESS);
    }
    if !yes && !confirm(&config, plan.changes())? {
        return Ok(ExitCode::FAILURE);
    }
    let report = runtime.block_on(applying::apply(&client, &plan));
    print!("{}", report.text());
    // After the report, so a lock file that cannot be written hides nothing of what was done.
    if let Err(e) = write_lock(&lock_path, &applying::lock(&config, &plan, &report.created)) {
        eprintln!(
            "error: {e:#}: the ids of the projects created above are not recorded; set them as `id` in the config"
        );
        return Ok(ExitCode::FAILURE);
    }
    if report.failed.is_some() {
        eprintln!(
            "error: apply stopped at a failure: {} done, 1 failed, {} not attempted (see above)",
            report.done.len(),
            report.not_attempted.len()
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// Asks on the terminal whether to apply `changes` changes; refuses when stdin is not a terminal.
fn confirm(config: &Config, changes: usize) -> anyhow::Result<bool> {
    if !std::io::stdin().is_terminal() {
        eprintln!(
            "error: not applied: stdin is not a terminal to confirm on; review the plan above and run again with \
             --yes to apply it"
        );
        return Ok(false);
    }
    print!(
        "
Apply {changes} change(s) to {}? Only \"yes\" applies: ",
        config.upstream.authority
    );
    std::io::stdout().flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    if answer.trim() == "yes" {
        return Ok(true);
    }
    eprintln!("Not applied.");
    Ok(false)
}

/// Writes `new` to the lock file at `path` when it says something new: not when it is the same, nor an empty
/// one where there was none.
fn write_lock(path: &Path, new: &lock::Lock) -> anyhow::Result<()> {
    let old = std::fs::read_to_string(path).ok();
    if old.as_deref() == Some(new.to_toml().as_str()) || (old.is_none() && new.projects.is_empty()) {
        return Ok(());
    }
    lock::write(path, new)?;
    println!(
        "
wrote {} ({} project id{})",
        path.display(),
        new.projects.len(),
        if new.projects.len() == 1 { "" } else { "s" }
    );
    Ok(())
}

/// `projects import`: prints `[[projects]]` stanzas for the upstream projects the config does not have.
pub fn import(path: &Path, api_key_env: Option<&str>) -> anyhow::Result<ExitCode> {
    let config = load(path)?;
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
            Action::Archive => ('-', "archive"),
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
        "\n{} to create, {} to update, {} to archive, {} unchanged, {} blocked ({} problem{}).",
        count(Action::Create),
        count(Action::Update),
        count(Action::Archive),
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
