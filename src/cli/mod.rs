//! The `udphub` command line: subcommands, and turning a clap error into
//! one line. `serve`'s settings are [`crate::config`]'s.

use clap::{Parser, Subcommand};

pub mod token;

use crate::clients::send::Sent;
use crate::config::{Config, ServeArgs};
use crate::error::Error;
use crate::runtime::logging::init_logging;

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
    /// Send every datagram back to its sender (an echo server); with --tcp, seed 001's TCP echo.
    Echo(crate::servers::echo::EchoArgs),
    /// Chat through a relay from a terminal or a pipe (or a LAN room with --lan).
    Chat(crate::clients::chat::ChatArgs),
    /// Send one datagram and print the replies.
    Send(crate::clients::send::SendArgs),
    /// Print a room token (an HS256 JWT) for `serve --room-secret-file`.
    Token(token::TokenArgs),
    /// Print a shell completion script (e.g. `udphub completions bash > /etc/bash_completion.d/udphub`).
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff), e.g. `udphub man > udphub.1; man ./udphub.1`.
    Man,
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
            if args.check_config {
                // A check shows what a start would warn about (on stderr:
                // stdout stays the one summary line scripts read).
                if let Some(warning) = config.exposure_warning() {
                    eprintln!("udphub: warning: {warning}");
                }
                print_out(format!("{}\n", config.summary()).as_bytes())?;
                return Ok(Exit::Done);
            }
            init_logging(&config.log_level, config.log_format)?;
            crate::runtime::supervisor::serve(*args, config).map(|()| Exit::Done)
        }
        Command::Echo(args) => {
            init_logging(&args.log_level, args.log_format)?;
            crate::servers::echo::run(&args).map(|()| Exit::Done)
        }
        Command::Token(args) => token::run(&args).map(|()| Exit::Done),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            let mut cmd = Cli::command();
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut cmd, "udphub", &mut script);
            print_out(&script)?;
            Ok(Exit::Done)
        }
        Command::Man => {
            use clap::CommandFactory;
            let mut page = Vec::new();
            man_page(Cli::command(), &mut page).map_err(|e| Error::io("write the man page", e))?;
            print_out(&page)?;
            Ok(Exit::Done)
        }
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
            Sent::Silent(why) => {
                eprintln!(
                    "udphub: no reply from {} within {}: {why}",
                    args.server,
                    humantime::format_duration(args.wait)
                );
                Ok(if args.expect_reply {
                    Exit::NoReply
                } else {
                    Exit::Done
                })
            }
            Sent::Replies(_) => Ok(Exit::Done),
        },
    }
}

/// Writes `bytes` to stdout. A reader that has gone (`udphub completions
/// fish | head -3`) is not an error: what it wanted it read, and the rest
/// is nobody's (a quiet exit 0, as `cat` would exit quietly by SIGPIPE).
pub fn print_out(bytes: &[u8]) -> Result<(), Error> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(Error::io("write to stdout", e))
        }
        _ => Ok(()),
    }
}

/// Writes the man page: `udphub(1)`, with a section per subcommand (its
/// synopsis, its flags and their environment variables), generated from
/// the same clap definitions as `--help`.
pub fn man_page(cmd: clap::Command, out: &mut dyn std::io::Write) -> std::io::Result<()> {
    let cmd = cmd.about("a fast, observable UDP group-chat relay");
    let man = clap_mangen::Man::new(cmd.clone());
    man.render_title(out)?;
    man.render_name_section(out)?;
    man.render_synopsis_section(out)?;
    man.render_description_section(out)?;
    for sub in cmd.get_subcommands() {
        if sub.is_hide_set() || sub.get_name() == "help" {
            continue;
        }
        let name = format!("udphub {}", sub.get_name());
        writeln!(out, ".SH \"{}\"", name.to_ascii_uppercase())?;
        let man = clap_mangen::Man::new(sub.clone().bin_name(name));
        // Its sections become subsections of this one.
        let mut section = Vec::new();
        man.render_synopsis_section(&mut section)?;
        man.render_description_section(&mut section)?;
        man.render_options_section(&mut section)?;
        let section = String::from_utf8_lossy(&section).replace(".SH ", ".SS ");
        out.write_all(section.as_bytes())?;
    }
    writeln!(
        out,
        ".SH SIGNALS\nSIGTERM, SIGINT: say bye to every client and exit 0 (a second one exits at once, 130). SIGHUP: re-read the settings. SIGUSR2 (with \\fB\\-\\-control\\fR): upgrade in place: start the binary at the path the relay was started from, with the same arguments and \\fB\\-\\-takeover\\fR, which takes the sockets and members over.\n.SH FILES\nA TOML file for \\fBudphub serve \\-\\-config\\fR: its keys are the flag names. SIGHUP re-reads it.\n.SH \"SEE ALSO\"\ndocs/OPERATIONS.md, docs/PROTOCOL.md, docs/SECURITY.md, docs/CLUSTER.md"
    )?;
    man.render_version_section(out)
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
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
