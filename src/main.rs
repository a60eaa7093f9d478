//! The `udphub` binary: parse the command line, run, map errors to exit codes
//! (2 for anything the user can fix, 1 otherwise or when `send
//! --expect-reply` got no reply).

use std::process::ExitCode;

use clap::Parser;
use udphub::cli::{self, Cli};

fn main() -> ExitCode {
    let parsed = match Cli::try_parse() {
        Ok(parsed) => parsed,
        Err(err) if err.use_stderr() => {
            eprintln!("{}", cli::one_line_usage_error(&err));
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
