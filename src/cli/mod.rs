//! The `udphub` command line: subcommands, logging set-up, and turning a
//! clap error into one line; [`config`] resolves `serve`'s settings.

use clap::{Parser, Subcommand};

pub mod config;
pub mod token;

use crate::cli::config::{Config, ServeArgs};
use crate::clients::send::Sent;
use crate::error::Error;

/// udphub: a fast, observable UDP group-chat relay.
#[derive(Debug, Parser)]
#[command(
    name = "udphub",
    version,
    about = "A UDP group-chat relay: whatever one client sends, every client receives; every datagram counted in Prometheus metrics.",
    long_about = None
)]
pub struct Cli {
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Relay datagrams between clients (the chat server).
    Serve(Box<ServeArgs>),
    /// Send every datagram back to its sender (an echo server).
    Echo(crate::clients::echo::EchoArgs),
    /// Chat through a relay from a terminal or a pipe (or a LAN room with --lan).
    Chat(crate::clients::chat::ChatArgs),
    /// Send one datagram and print the replies.
    Send(crate::clients::send::SendArgs),
    /// Print a room token (an HS256 JWT) for `serve --room-secret-file`.
    Token(token::TokenArgs),
}

/// How a command ended, when it ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Exit 0.
    Done,
    /// `send` found nothing listening, or `--expect-reply` got nothing: exit 1.
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
        Command::Token(args) => token::run(&args).map(|()| Exit::Done),
        Command::Chat(args) => crate::clients::chat::run(&args).map(|()| Exit::Done),
        Command::Send(args) => match crate::clients::send::run(&args)? {
            Sent::NotListening(addr) => {
                eprintln!(
                    "udphub: nothing is listening at {addr} (the kernel answered \"connection refused\"); is the relay running?"
                );
                Ok(Exit::NoReply)
            }
            Sent::Replies(0) if args.expect_reply => {
                eprintln!(
                    "udphub: no reply from {} within {}",
                    args.server,
                    humantime::format_duration(args.wait)
                );
                Ok(Exit::NoReply)
            }
            Sent::Replies(_) => Ok(Exit::Done),
        },
    }
}

/// Logs to stderr with the given `tracing` filter (see [`log_filter`]).
pub fn init_logging(filter: &str) -> Result<(), Error> {
    let (filter, note) = log_filter(filter)?;
    if let Some(note) = note {
        eprintln!("udphub: note: {note}");
    }
    // The NATS client narrates every (re)connection at info; the cluster
    // bridge says what matters in its own rate-limited lines. Its debug
    // output is one `async_nats=debug` away.
    let filter = if filter.contains("async_nats") {
        filter
    } else {
        format!("{filter},async_nats=warn")
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&filter)
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

/// The level names a filter may use.
const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// Checks a `--log-level` filter and returns the one to use, with a note
/// to show once if it had to be changed.
///
/// tracing's own parser takes any bare word as a target name (`loud` would
/// mean "everything from target `loud`", which hides every udphub line), so
/// each comma-separated directive must be a level (`debug`) or end in
/// `=LEVEL` (`udphub=debug`). Levels a release build compiled out
/// (`release_max_level_info`) are lowered to what it has, with one note in
/// our words instead of tracing's repeated warning.
pub fn log_filter(spec: &str) -> Result<(String, Option<String>), Error> {
    use tracing::level_filters::{LevelFilter, STATIC_MAX_LEVEL};
    let bad = |why: String| {
        Error::Config(format!(
            "--log-level {spec:?}: {why}; use one of {} or target=level directives such as udphub=debug",
            LEVELS.join(", ")
        ))
    };
    let mut out = Vec::new();
    let mut lowered = false;
    for directive in spec.split(',').map(str::trim) {
        if directive.is_empty() {
            continue;
        }
        let (target, level) = match directive.rsplit_once('=') {
            Some((target, level)) if !target.is_empty() => (Some(target), level),
            _ if directive.contains('=') => {
                return Err(bad(format!("{directive:?} has no target before '='")))
            }
            _ => (None, directive),
        };
        let level_name = level.to_ascii_lowercase();
        if !LEVELS.contains(&level_name.as_str()) {
            return Err(bad(format!("{level:?} is not a level")));
        }
        let wanted: LevelFilter = level_name
            .parse()
            .map_err(|_| bad(format!("{level:?} is not a level")))?;
        let level_name = if wanted > STATIC_MAX_LEVEL {
            lowered = true;
            STATIC_MAX_LEVEL.to_string().to_ascii_lowercase()
        } else {
            level_name
        };
        out.push(match target {
            Some(t) => format!("{t}={level_name}"),
            None => level_name,
        });
    }
    if out.is_empty() {
        return Err(bad("it is empty".into()));
    }
    let filter = out.join(",");
    tracing_subscriber::EnvFilter::try_new(&filter).map_err(|e| bad(e.to_string()))?;
    let note = lowered.then(|| {
        format!(
            "this release build logs at most at {} level (debug and trace are compiled out for speed); build without --release to see them",
            STATIC_MAX_LEVEL.to_string().to_ascii_lowercase()
        )
    });
    Ok((filter, note))
}

/// A clap error as one line that says what is wrong and how to fix it:
/// the error, what it names (the missing arguments), clap's "did you mean"
/// tip, the usage line of the subcommand at fault, and which `--help` to
/// read. `args` is the command line (to tell which subcommand was meant).
pub fn one_line_usage_error(err: &clap::Error, args: &[std::ffi::OsString]) -> String {
    let rendered = err.render().to_string();
    let mut lines = rendered.lines().map(str::trim).filter(|l| !l.is_empty());
    let first = lines.next().unwrap_or("error: invalid command line");
    let mut msg = first.strip_prefix("error: ").unwrap_or(first).to_string();
    let mut named = Vec::new();
    let mut tip = None;
    let mut usage = None;
    for line in lines {
        if let Some(t) = line.strip_prefix("tip: ") {
            tip = Some(t.to_string());
        } else if let Some(u) = line.strip_prefix("Usage: ") {
            usage = Some(u.to_string());
        } else if !line.starts_with("For more information") {
            named.push(line.to_string());
        }
    }
    if !named.is_empty() {
        let sep = if msg.ends_with(':') { " " } else { ": " };
        msg = format!("{msg}{sep}{}", named.join(", "));
    }
    if let Some(tip) = tip {
        msg = format!("{msg} ({tip})");
    }
    let help = match subcommand_in(args) {
        Some(sub) => format!("udphub {sub} --help"),
        None => "udphub --help".to_string(),
    };
    match usage {
        Some(u) => format!("udphub: {msg}; usage: {u} (see `{help}`)"),
        None => format!("udphub: {msg} (see `{help}`)"),
    }
}

/// The subcommand named on the command line, if a known one is.
fn subcommand_in(args: &[std::ffi::OsString]) -> Option<String> {
    use clap::CommandFactory;
    let cmd = Cli::command();
    let names: Vec<&str> = cmd.get_subcommands().map(|c| c.get_name()).collect();
    args.iter()
        .skip(1)
        .filter_map(|a| a.to_str())
        .find(|a| !a.starts_with('-'))
        .filter(|a| names.contains(a))
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(args: &[&str]) -> String {
        let args: Vec<std::ffi::OsString> = args.iter().map(Into::into).collect();
        let err = Cli::try_parse_from(&args).unwrap_err();
        let line = one_line_usage_error(&err, &args);
        assert!(!line.contains('\n'), "{line}");
        line
    }

    #[test]
    fn usage_errors_fit_on_one_line_and_say_how_to_fix_them() {
        assert!(line(&["udphub", "serve", "--bind", "nope"]).contains("--bind"));
        let l = line(&["udphub", "serve", "--frobnicate"]);
        assert!(
            l.contains("--frobnicate") && l.contains("`udphub serve --help`"),
            "{l}"
        );
        let l = line(&["udphub", "send", "hello"]);
        assert!(l.contains("--server <ADDR>"), "{l}");
        assert!(l.contains("usage: udphub send"), "{l}");
        assert!(l.contains("`udphub send --help`"), "{l}");
        let l = line(&["udphub", "server"]);
        assert!(l.contains("'serve'"), "{l}");
        assert!(l.contains("`udphub --help`"), "{l}");
    }

    #[test]
    fn log_filters_are_levels_or_directives() {
        assert_eq!(log_filter("info").unwrap().0, "info");
        assert_eq!(
            log_filter("WARN, udphub=error").unwrap().0,
            "warn,udphub=error"
        );
        for bad in ["loud", "", "=info", "udphub=loud", "info,,nope"] {
            let err = log_filter(bad).unwrap_err().to_string();
            assert!(
                err.contains("--log-level") && err.contains("debug"),
                "{bad}: {err}"
            );
        }
        let (filter, note) = log_filter("trace").unwrap();
        if tracing::level_filters::STATIC_MAX_LEVEL < tracing::level_filters::LevelFilter::TRACE {
            assert_ne!(filter, "trace");
            assert!(note.unwrap().contains("release build"));
        } else {
            assert_eq!((filter.as_str(), note), ("trace", None));
        }
    }

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
