//! The command line: `serve`, `check`, `reload`, `keys new`, `projects plan|apply|import`, `usage report`,
//! `usage reconcile`, `limits status`, `demo`.

mod check;
mod keys;
mod limits;
mod projects;
mod reconcile;
mod reload;
pub mod usage;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::{self, Config};

/// mantlegate: every Bedrock request attributed to the right project.
#[derive(Debug, Parser)]
#[command(name = "mantlegate", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        /// Config file (default: $MANTLEGATE_CONFIG, else config/mantlegate.toml).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Validate a config and print its attribution table.
    Check {
        /// Config file (default: $MANTLEGATE_CONFIG, else config/mantlegate.toml).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Also ask upstream whether it accepts the gateway's credential (one `GET /v1/models`).
        #[arg(long)]
        probe_upstream: bool,
    },
    /// Make a running gateway reload its config file (as SIGHUP does), and say what happened.
    Reload {
        /// The gateway's admin address (default: `server.admin_listen` of the config).
        #[arg(long)]
        admin: Option<String>,
        /// Config file, for the admin address (default: $MANTLEGATE_CONFIG, else config/mantlegate.toml).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Manage gateway keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Projects as code: the config's projects compared with those upstream.
    Projects {
        #[command(subcommand)]
        command: ProjectsCommand,
    },
    /// Report metered usage.
    Usage {
        #[command(subcommand)]
        command: UsageCommand,
    },
    /// Rate limits and budgets.
    Limits {
        #[command(subcommand)]
        command: LimitsCommand,
    },
    /// Run the gateway in front of a built-in stub upstream on loopback: no AWS account needed.
    Demo {
        /// Traffic address.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
        /// Admin address.
        #[arg(long, default_value = "127.0.0.1:9091")]
        admin_listen: std::net::SocketAddr,
    },
}

#[derive(Debug, Subcommand)]
enum UsageCommand {
    /// Spend and tokens per group, from the usage ledger.
    Report {
        /// The ledger file (rotated siblings are read too); default: `[metering] ledger_path` of the config.
        #[arg(long)]
        ledger: Option<PathBuf>,
        /// Config file, for the default ledger path.
        #[arg(long)]
        config: Option<PathBuf>,
        /// `project`, `model`, `key`, or a tag name such as `CostCenter`.
        #[arg(long, default_value = "project")]
        group_by: String,
        #[arg(long, help = usage::SINCE_HELP)]
        since: Option<String>,
        #[arg(long, help = usage::UNTIL_HELP)]
        until: Option<String>,
        /// `table`, `csv` or `json`.
        #[arg(long, default_value = "table")]
        format: String,
    },
    /// The gateway's ledgers against the tokens AWS counted (CloudWatch `AWS/BedrockMantle`), per project and
    /// model, over the same whole hours. Exit status: 0 every row ok, 2 something is off (bypass, missing,
    /// unattributed), 3 CloudWatch could not be read, 1 any other error.
    Reconcile {
        /// Start of the window: a duration back from now (`6h`, `7d`) or a time (`2026-12-01T08:00:00Z`); rounded
        /// down to the hour.
        #[arg(long)]
        since: String,
        /// End of the window, in the same forms, rounded down to the hour; default: 15 minutes ago (metrics reach
        /// CloudWatch minutes late).
        #[arg(long)]
        until: Option<String>,
        /// Ledger files, one per replica (`--ledger a b` or `--ledger a --ledger b`; rotated siblings are read
        /// too); default: `[metering] ledger_path` of the config.
        #[arg(long, num_args = 1..)]
        ledger: Vec<PathBuf>,
        /// Config file, for the projects' names and ids (and projects.lock.toml beside it); default:
        /// $MANTLEGATE_CONFIG, else config/mantlegate.toml if there is one; without one, the ledgers name them.
        #[arg(long)]
        config: Option<PathBuf>,
        /// AWS region whose CloudWatch is read; default: the config's upstream region (or its host's), else the
        /// AWS SDK's own (AWS_REGION, the profile).
        #[arg(long)]
        region: Option<String>,
        /// How far apart the two counts may be, in percent of the larger, and be `ok`; default: the config's
        /// `[reconcile] tolerance`, else 2.
        #[arg(long)]
        tolerance: Option<f64>,
        /// `text`, `json` or `csv`.
        #[arg(long, default_value = "text")]
        format: String,
    },
}

#[derive(Debug, Subcommand)]
enum ProjectsCommand {
    /// Print what applying the config's projects would change upstream. Exit status: 0 nothing to do, 2 changes
    /// pending, 1 an error or a problem no apply can fix (a configured id missing or archived upstream, a name
    /// two upstream projects share).
    Plan {
        /// Config file (default: $MANTLEGATE_CONFIG, else config/mantlegate.toml).
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long, value_enum, default_value = "text")]
        format: projects::Format,
        /// An environment variable holding a Bedrock API key for the Projects API (an admin key), used in place
        /// of the `[upstream]` credential.
        #[arg(long, value_name = "NAME")]
        api_key_env: Option<String>,
        /// Plan to remove tags upstream that the config does not list (by default they are reported and kept).
        #[arg(long)]
        remove_unlisted_tags: bool,
        /// Plan to rename projects matched by id whose upstream name differs (by default it is reported).
        #[arg(long)]
        rename: bool,
    },
    /// Carry out the plan: create missing projects with their tags, add and correct tags, remove unlisted tags
    /// (only with --remove-unlisted-tags), rename (only with --rename), archive projects marked `archived = true`.
    /// Prints the plan and asks for confirmation on a terminal (or --yes); writes the ids of projects without an
    /// `id` to projects.lock.toml beside the config. Exit status: 0 done or nothing to do, 1 otherwise.
    Apply {
        /// Config file (default: $MANTLEGATE_CONFIG, else config/mantlegate.toml).
        #[arg(long)]
        config: Option<PathBuf>,
        /// An environment variable holding a Bedrock API key for the Projects API (an admin key), used in place
        /// of the `[upstream]` credential.
        #[arg(long, value_name = "NAME")]
        api_key_env: Option<String>,
        /// Remove tags upstream that the config does not list (by default they are kept).
        #[arg(long)]
        remove_unlisted_tags: bool,
        /// Rename projects matched by id whose upstream name differs (by default they keep it).
        #[arg(long)]
        rename: bool,
        /// Apply without asking (required when stdin is not a terminal).
        #[arg(long)]
        yes: bool,
    },
    /// Print `[[projects]]` stanzas for the upstream projects the config does not have, ready to paste; those
    /// the config would refuse (the tag taxonomy, a name taken) are flagged with a `# FIX:` comment.
    Import {
        /// Config file (default: $MANTLEGATE_CONFIG, else config/mantlegate.toml).
        #[arg(long)]
        config: Option<PathBuf>,
        /// An environment variable holding a Bedrock API key for the Projects API, used in place of the
        /// `[upstream]` credential.
        #[arg(long, value_name = "NAME")]
        api_key_env: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum LimitsCommand {
    /// Every configured limit with what its current window has used (asks the running gateway; with the Redis
    /// backend and no gateway answering, reads Redis).
    Status {
        /// Config file (default: $MANTLEGATE_CONFIG, else config/mantlegate.toml).
        #[arg(long)]
        config: Option<PathBuf>,
        /// The gateway's admin address (default: `server.admin_listen` of the config).
        #[arg(long)]
        admin: Option<String>,
        /// `text` or `json`.
        #[arg(long, default_value = "text")]
        format: String,
    },
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Print a fresh random key and the `[[keys]]` stanza holding its hash.
    New {
        /// The key's name, as it will appear in logs and metrics.
        #[arg(long)]
        name: String,
        /// The project the key's requests belong to.
        #[arg(long)]
        project: Option<String>,
        /// A config to check the key against: the project must be one of its projects, and the name new.
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

/// Parses the command line and runs the command.
pub fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<std::process::ExitCode> {
    match cli.command {
        Command::Serve { config } => {
            let path = config::resolve_path(config);
            let config = Config::load(&path)?;
            crate::telemetry::init();
            runtime()?.block_on(crate::server::run(path, config))?;
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Check { config, probe_upstream } => check::run(&config::resolve_path(config), probe_upstream),
        Command::Reload { admin, config } => {
            let path = config::resolve_path(config);
            // The admin token, if the config names one, read here as the gateway reads it (run this in the pod).
            let (listen, token) = match (&admin, path.is_file()) {
                (Some(_), false) => (String::new(), None),
                _ => config::admin_access(&path)?,
            };
            let token = token.map(|t| t.read()).transpose()?;
            runtime()?.block_on(reload::run(&admin.unwrap_or(listen), token.as_ref()))
        }
        Command::Keys { command: KeysCommand::New { name, project, config } } => {
            if let Some(path) = config {
                keys::check_against(&Config::load(&path)?, &name, project.as_deref())
                    .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            }
            print!("{}", keys::new_key(&name, project.as_deref())?);
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Projects {
            command: ProjectsCommand::Plan { config, format, api_key_env, remove_unlisted_tags, rename },
        } => {
            let options = crate::projects::plan::Options { remove_unlisted_tags, rename };
            projects::plan(&config::resolve_path(config), format, api_key_env.as_deref(), options)
        }
        Command::Projects {
            command: ProjectsCommand::Apply { config, api_key_env, remove_unlisted_tags, rename, yes },
        } => {
            let options = crate::projects::plan::Options { remove_unlisted_tags, rename };
            projects::apply(&config::resolve_path(config), api_key_env.as_deref(), options, yes)
        }
        Command::Projects { command: ProjectsCommand::Import { config, api_key_env } } => {
            projects::import(&config::resolve_path(config), api_key_env.as_deref())
        }
        Command::Usage { command: UsageCommand::Report { ledger, config, group_by, since, until, format } } => {
            let ledger = match ledger {
                Some(path) => path,
                None => Config::load(&config::resolve_path(config))?.metering.ledger_path.ok_or_else(|| {
                    anyhow::anyhow!("no --ledger given and the config sets no [metering] ledger_path")
                })?,
            };
            print!("{}", usage::run(&ledger, &group_by, since.as_deref(), until.as_deref(), &format)?);
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Usage {
            command: UsageCommand::Reconcile { since, until, ledger, config, region, tolerance, format },
        } => reconcile::run(reconcile::Args { since, until, ledgers: ledger, config, region, tolerance, format }),
        Command::Limits { command: LimitsCommand::Status { config, admin, format } } => {
            runtime()?.block_on(limits::status(&config::resolve_path(config), admin, &format))
        }
        Command::Demo { listen, admin_listen } => {
            crate::telemetry::init();
            runtime()?.block_on(crate::demo::run(listen, admin_listen))?;
            Ok(std::process::ExitCode::SUCCESS)
        }
    }
}

/// The control runtime: admin server, signals, the drain. Traffic runs on threads of its own (`server`).
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}
