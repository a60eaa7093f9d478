//! The `udphub` binary: parse the command line, run, map errors to exit codes
//! (2 for anything the user can fix, 1 otherwise or when `send
//! --expect-reply` got no reply).

use std::process::ExitCode;

use clap::Parser;
use udphub::cli::{self, Cli};

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let parsed = match Cli::try_parse_from(&args) {
        Ok(parsed) => parsed,
        // `udphub` alone: the command list, not a one-liner.
        Err(err)
            if err.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand =>
        {
            let _ = err.print();
            return ExitCode::from(2);
        }
        Err(err) if err.use_stderr() => {
            eprintln!("{}", cli::one_line_usage_error(&err, &args));
            return ExitCode::from(2);
        }
        Err(help_or_version) => {
            let _ = help_or_version.print();
            return ExitCode::SUCCESS;
        }
    };
    match cli::run(parsed) {
        Ok(cli::Exit::Done) => ExitCode::SUCCESS,
        Ok(cli::Exit::NoReply) => ExitCode::from(1),
        Err(err) => {
            eprintln!("udphub: {err}");
            ExitCode::from(err.exit_code())
        }
    }
}
