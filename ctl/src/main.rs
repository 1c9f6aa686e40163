//! `roostctl`: the operator's command line (DESIGN.md, "Command-line contract").
//!
//! This file holds the arguments and the dispatch, and maps failures to exit codes:
//! 0 ok, 1 operator error (bad input, not found, conflict), 2 usage (clap),
//! 3 etcd (or, for `site logs`, the node's agent) unreachable. Every failure is one line on stderr that says what to do.

mod aliases;
mod catalog;
mod locate;
mod logs;
mod nodes;
mod output;
mod sites;
mod spec;
mod store;
mod table;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, CommandFactory, Parser, Subcommand};
use roost_proto::etcd::{EtcdAccess, DEFAULT_ENDPOINTS};
use roost_proto::etcd_security::EtcdSecurityArgs;
use roost_proto::keys::DEFAULT_PREFIX;

use crate::spec::{parse_command, Argv, Program, SiteFlags, SitePatch};
use crate::store::{Store, Unreachable};

#[derive(Parser, Debug)]
#[command(
    name = "roostctl",
    version,
    about = "Register, change and inspect Roost sites and nodes"
)]
struct Cli {
    /// etcd endpoints, comma separated.
    #[arg(long, global = true, help_heading = GLOBAL, value_name = "URLS",
          env = "ROOST_ETCD", default_value = DEFAULT_ENDPOINTS)]
    etcd: String,
    /// TLS and credentials for a secured etcd (deploy/etcd/README.md).
    #[command(flatten)]
    etcd_security: EtcdSecurityArgs,
    /// Key prefix every Roost key lives under.
    #[arg(long, global = true, help_heading = GLOBAL, value_name = "PREFIX",
          env = "ROOST_PREFIX", default_value = DEFAULT_PREFIX)]
    prefix: String,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true, help_heading = GLOBAL)]
    json: bool,
    /// Give up on etcd (and on an agent, for `site logs`) after this many seconds (exit code 3).
    #[arg(long, global = true, help_heading = GLOBAL, value_name = "SECS", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..=600))]
    timeout: u64,
    #[command(subcommand)]
    command: Command,
}

/// Help heading of the flags every subcommand accepts, kept apart from its own.
const GLOBAL: &str = "Global options";

#[derive(Subcommand, Debug)]
enum Command {
    /// Sites: add, set, rm, ls, show, logs.
    #[command(subcommand)]
    Site(SiteCommand),
    /// Nodes: ls.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Which nodes serve HOST (a site or an alias), best first.
    Where {
        /// Host name of a site or of one of its aliases.
        host: String,
    },
}

#[derive(Subcommand, Debug)]
enum SiteCommand {
    /// Register a new site (refuses to overwrite; see `site set`).
    Add(Box<AddArgs>),
    /// Change some settings of an existing site.
    Set(Box<SetArgs>),
    /// Remove a site.
    #[command(alias = "remove")]
    Rm {
        /// The site's host name (or the exact name `site ls` shows for a malformed record).
        host: String,
    },
    /// List every site, malformed records included (streamed a page at a time).
    #[command(alias = "list")]
    Ls,
    /// Show one site's record and placement.
    Show {
        /// The site's host name.
        host: String,
    },
    /// Show the end of a site's worker output (stdout and stderr), from the node running it.
    Logs(LogsArgs),
}

#[derive(Args, Debug)]
struct LogsArgs {
    /// The site's host name (or one of its aliases).
    host: String,
    /// How many lines to show, counted from the end (the agent reads its last 256 KiB).
    #[arg(long, short = 'n', value_name = "N", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    lines: u32,
    /// Read the log on this node instead of the one the site is placed on.
    #[arg(long, value_name = "ID")]
    node: Option<String>,
    /// The secret the agents were given [default: /etc/roost/secret, when it exists].
    #[arg(long, value_name = "FILE", env = "ROOST_SECRET_FILE")]
    secret_file: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum NodeCommand {
    /// List the live nodes.
    #[command(alias = "list")]
    Ls,
}

#[derive(Args, Debug)]
struct AddArgs {
    /// The site's host name (canonicalised: lower case, no port, punycode).
    host: String,
    /// Unix user the site runs as.
    #[arg(long)]
    user: String,
    /// WSGI application to serve.
    #[arg(
        long,
        value_name = "MODULE:CALLABLE",
        required_unless_present = "command",
        conflicts_with = "command"
    )]
    app: Option<String>,
    /// Program that serves HTTP on the socket passed as LISTEN_FDS (split like a shell would).
    #[arg(long, value_name = "\"PROG ARGS...\"", value_parser = parse_command)]
    command: Option<Argv>,
    /// The site's directory (absolute).
    #[arg(long)]
    dir: String,
    #[command(flatten)]
    flags: SiteFlags,
}

#[derive(Args, Debug)]
struct SetArgs {
    /// The site's host name.
    host: String,
    /// Unix user the site runs as.
    #[arg(long)]
    user: Option<String>,
    /// Serve this WSGI application (replaces a command).
    #[arg(long, value_name = "MODULE:CALLABLE", conflicts_with = "command")]
    app: Option<String>,
    /// Run this program (replaces an app).
    #[arg(long, value_name = "\"PROG ARGS...\"", value_parser = parse_command)]
    command: Option<Argv>,
    /// The site's directory (absolute).
    #[arg(long)]
    dir: Option<String>,
    #[command(flatten)]
    flags: SiteFlags,
    /// Remove the node pin.
    #[arg(long, conflicts_with = "node")]
    clear_node: bool,
    /// Remove the memory limit.
    #[arg(long, conflicts_with = "memory_limit_mb")]
    clear_memory_limit: bool,
    /// Remove the CPU limit (the node's default applies).
    #[arg(long, conflicts_with = "cpu_limit")]
    clear_cpu_limit: bool,
    /// Remove the I/O weight (the node's default applies).
    #[arg(long, conflicts_with = "io_weight")]
    clear_io_weight: bool,
    /// Remove the limit of concurrent requests (the node's default applies).
    #[arg(long, conflicts_with = "max_concurrent_requests")]
    clear_max_concurrent_requests: bool,
    /// Go back to the default interpreter.
    #[arg(long, conflicts_with = "python")]
    clear_python: bool,
    /// Stop using a virtualenv.
    #[arg(long, conflicts_with = "virtualenv")]
    clear_virtualenv: bool,
    /// Remove an alias (repeatable).
    #[arg(long, value_name = "NAME")]
    remove_alias: Vec<String>,
    /// Remove an environment variable (repeatable).
    #[arg(long, value_name = "K")]
    unset_env: Vec<String>,
}

impl AddArgs {
    fn program(&self) -> Program {
        match (&self.app, &self.command) {
            (_, Some(argv)) => Program::Command(argv.0.clone()),
            (Some(app), None) => Program::App(app.clone()),
            // clap requires one of the two.
            (None, None) => unreachable!("clap enforces --app or --command"),
        }
    }
}

impl SetArgs {
    fn patch(&self) -> SitePatch {
        SitePatch {
            user: self.user.clone(),
            program: match (&self.app, &self.command) {
                (_, Some(argv)) => Some(Program::Command(argv.0.clone())),
                (Some(app), None) => Some(Program::App(app.clone())),
                (None, None) => None,
            },
            dir: self.dir.clone(),
            flags: self.flags.clone(),
            clear_node: self.clear_node,
            clear_memory_limit: self.clear_memory_limit,
            clear_cpu_limit: self.clear_cpu_limit,
            clear_io_weight: self.clear_io_weight,
            clear_max_concurrent_requests: self.clear_max_concurrent_requests,
            clear_python: self.clear_python,
            clear_virtualenv: self.clear_virtualenv,
            remove_aliases: self.remove_alias.clone(),
            unset_env: self.unset_env.clone(),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Site(SiteCommand::Set(args)) = &cli.command {
        if args.patch().is_empty() {
            let mut cli_cmd = Cli::command();
            cli_cmd.build();
            let set = cli_cmd
                .find_subcommand_mut("site")
                .and_then(|site| site.find_subcommand_mut("set"))
                .expect("`site set` is defined");
            set.error(
                clap::error::ErrorKind::MissingRequiredArgument,
                "`site set` needs at least one setting to change (see `roostctl site set --help`)",
            )
            .exit();
        }
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("roostctl: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` joins the context chain on one line.
            eprintln!("roostctl: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::from(exit_code(&e))
        }
    }
}

/// 3 when etcd or a node could not be reached, else 1 (usage errors exit 2 inside clap).
fn exit_code(e: &anyhow::Error) -> u8 {
    if e.downcast_ref::<Unreachable>().is_some()
        || e.downcast_ref::<logs::NodeUnreachable>().is_some()
    {
        3
    } else {
        1
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let access = EtcdAccess::new(&cli.etcd, &cli.etcd_security)?;
    match run_with(&cli, &access).await {
        // With TLS 1.3, etcd refusing our client certificate reads as a closed connection:
        // a handshake of our own tells that apart from an etcd that is down.
        Err(e) if e.downcast_ref::<Unreachable>().is_some() && access.security().uses_tls() => {
            let unreachable = roost_proto::etcd::AccessError {
                fatal: false,
                message: String::new(),
            };
            let probed = access.with_tls_cause(unreachable).await;
            if probed.fatal {
                Err(anyhow::anyhow!("etcd: {probed}"))
            } else {
                Err(e)
            }
        }
        other => other,
    }
}

async fn run_with(cli: &Cli, access: &EtcdAccess) -> anyhow::Result<()> {
    let store = Store::connect(access, &cli.prefix, Duration::from_secs(cli.timeout)).await?;
    let json = cli.json;
    match &cli.command {
        Command::Site(SiteCommand::Add(a)) => {
            sites::add(
                &store,
                &a.host,
                &a.user,
                a.program(),
                &a.dir,
                &a.flags,
                json,
            )
            .await
        }
        Command::Site(SiteCommand::Set(a)) => sites::set(&store, &a.host, &a.patch(), json).await,
        Command::Site(SiteCommand::Rm { host }) => sites::rm(&store, host, json).await,
        Command::Site(SiteCommand::Ls) => sites::ls(&store, json).await,
        Command::Site(SiteCommand::Show { host }) => sites::show(&store, host, json).await,
        Command::Site(SiteCommand::Logs(a)) => {
            let request = logs::LogsRequest {
                host: &a.host,
                lines: a.lines,
                node: a.node.as_deref(),
                secret_file: a.secret_file.as_deref(),
                timeout: Duration::from_secs(cli.timeout),
            };
            logs::logs(&store, &request, json).await
        }
        Command::Node(NodeCommand::Ls) => nodes::ls(&store, json).await,
        Command::Where { host } => locate::where_(&store, host, json).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("roostctl").chain(args.iter().copied()))
    }

    #[test]
    fn the_argument_definitions_are_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn add_needs_exactly_one_of_app_and_command() {
        let base = ["site", "add", "a.example", "--user", "alice", "--dir", "/x"];
        assert!(parse(&base).is_err());
        let both = [&base[..], &["--app", "a:b", "--command", "/bin/x"]].concat();
        assert!(parse(&both).is_err());
        let app = [&base[..], &["--app", "a:b"]].concat();
        let Command::Site(SiteCommand::Add(a)) = parse(&app).unwrap().command else {
            panic!()
        };
        assert_eq!(a.program(), Program::App("a:b".into()));
        let cmd = [&base[..], &["--command", "/bin/srv 'a b'"]].concat();
        let Command::Site(SiteCommand::Add(a)) = parse(&cmd).unwrap().command else {
            panic!()
        };
        assert_eq!(
            a.program(),
            Program::Command(vec!["/bin/srv".into(), "a b".into()])
        );
    }

    #[test]
    fn global_flags_go_anywhere_and_repeatable_flags_collect() {
        let cli = parse(&[
            "site",
            "add",
            "a.example",
            "--user",
            "alice",
            "--app",
            "a:b",
            "--dir",
            "/x",
            "--env",
            "A=1",
            "--env",
            "B=2",
            "--alias",
            "www.a.example",
            "--json",
            "--etcd",
            "http://h:1,http://h:2",
        ])
        .unwrap();
        assert!(cli.json);
        assert_eq!(cli.etcd, "http://h:1,http://h:2");
        let Command::Site(SiteCommand::Add(a)) = cli.command else {
            panic!()
        };
        assert_eq!(
            a.flags.env,
            [("A".into(), "1".into()), ("B".into(), "2".into())]
        );
        assert_eq!(a.flags.aliases, ["www.a.example"]);
    }

    #[test]
    fn bad_env_and_command_values_are_usage_errors() {
        let base = ["site", "add", "a.example", "--user", "alice", "--dir", "/x"];
        let e = parse(&[&base[..], &["--app", "a:b", "--env", "NOEQUALS"]].concat()).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        let e = parse(&[&base[..], &["--command", "'unterminated"]].concat()).unwrap_err();
        assert_eq!(e.exit_code(), 2);
    }

    #[test]
    fn logs_takes_lines_node_and_a_secret_file() {
        let Command::Site(SiteCommand::Logs(l)) =
            parse(&["site", "logs", "a.example"]).unwrap().command
        else {
            panic!()
        };
        assert_eq!((l.lines, l.node), (100, None));
        let Command::Site(SiteCommand::Logs(l)) = parse(&[
            "site",
            "logs",
            "a.example",
            "--lines",
            "5",
            "--node",
            "n2",
            "--secret-file",
            "/s",
        ])
        .unwrap()
        .command
        else {
            panic!()
        };
        assert_eq!(
            (l.lines, l.node.as_deref(), l.secret_file),
            (5, Some("n2"), Some(PathBuf::from("/s")))
        );
        assert!(parse(&["site", "logs", "a.example", "--lines", "0"]).is_err());
    }

    #[test]
    fn set_builds_a_patch_and_an_empty_set_is_detected() {
        let Command::Site(SiteCommand::Set(s)) =
            parse(&["site", "set", "a.example"]).unwrap().command
        else {
            panic!()
        };
        assert!(s.patch().is_empty());
        let Command::Site(SiteCommand::Set(s)) = parse(&[
            "site",
            "set",
            "a.example",
            "--clear-node",
            "--unset-env",
            "A",
        ])
        .unwrap()
        .command
        else {
            panic!()
        };
        let p = s.patch();
        assert!(p.clear_node && p.unset_env == ["A"] && !p.is_empty());
        assert!(parse(&["site", "set", "a.example", "--node", "n1", "--clear-node"]).is_err());
    }
}
