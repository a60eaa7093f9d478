//! The `udphub` command line: subcommands, logging set-up, and turning a
//! clap error into one line; [`config`] resolves `serve`'s settings.

use clap::{Parser, Subcommand};

pub mod config;

use crate::cli::config::{Config, ServeArgs};
use crate::error::Error;

/// udphub: a fast, observable UDP group-chat relay.
#[derive(Debug, Parser)]
#[command(name = "udphub", version, about, long_about = None)]
pub struct Cli {
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Relay datagrams between clients (the chat server).
    Serve(ServeArgs),
    /// Send every datagram back to its sender (an echo server).
    Echo(crate::clients::echo::EchoArgs),
    /// Chat through a relay from a terminal or a pipe (or a LAN room with --lan).
    Chat(crate::clients::chat::ChatArgs),
    /// Send one datagram and print the replies.
    Send(crate::clients::send::SendArgs),
}

/// How a command ended, when it ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Exit 0.
    Done,
    /// `send --expect-reply` got nothing: exit 1.
    NoReply,
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<Exit, Error> {
    match cli.command {
        Command::Serve(args) => {
            let config = Config::from_args(&args)?;
            init_logging(&config.log_level)?;
            crate::runtime::supervisor::serve(&config).map(|()| Exit::Done)
        }
        Command::Echo(args) => {
            init_logging(&args.log_level)?;
            crate::clients::echo::run(&args).map(|()| Exit::Done)
        }
        Command::Chat(args) => crate::clients::chat::run(&args).map(|()| Exit::Done),
        Command::Send(args) => {
            let replies = crate::clients::send::run(&args)?;
            Ok(if replies == 0 && args.expect_reply {
                Exit::NoReply
            } else {
                Exit::Done
            })
        }
    }
}

/// Logs to stderr with the given `tracing` filter.
pub fn init_logging(filter: &str) -> Result<(), Error> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .map_err(|e| Error::Config(format!("--log-level {filter:?}: {e}")))?;
    // A second initialisation (tests in one process) is harmless.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
    Ok(())
}

/// The first line of a clap error ("error: invalid value ..."), without
/// the usage block clap appends, plus a pointer to `--help`.
pub fn one_line_usage_error(err: &clap::Error) -> String {
    let rendered = err.render().to_string();
    let first = rendered
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("error: invalid command line")
        .trim();
    let first = first.strip_prefix("error: ").unwrap_or(first);
    format!("udphub: {first} (see `udphub --help`)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_errors_fit_on_one_line() {
        let err = Cli::try_parse_from(["udphub", "serve", "--bind", "nope"]).unwrap_err();
        let line = one_line_usage_error(&err);
        assert!(!line.contains('\n'));
        assert!(line.contains("--bind"), "{line}");
        let err = Cli::try_parse_from(["udphub", "serve", "--frobnicate"]).unwrap_err();
        assert!(one_line_usage_error(&err).contains("--frobnicate"));
    }

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
