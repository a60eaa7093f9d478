//! `loadtest`: how much can a relay take, and what happens past that?
//!
//! A black box: it talks to the relay only over the wire and, optionally,
//! its Prometheus endpoint and `/proc`, so it measures udphub, the bare
//! baseline loop and the seeds' Python server alike.
//!
//! # Layout
//! - `fanout` (default): stamped messages fanned out to N clients; `sink`:
//!   `fanout --sink`, receivers that never read (the relay's send capacity).
//! - `workers`: `fanout --threads N`, the clients dealt over N threads;
//!   `limits`: when loadtest itself, not the relay, was the bottleneck.
//! - `join_storm`: millions of distinct sources heartbeating; memory per client; mass expiry.
//! - `soak`: a long mixed load, sampling growth.
//! - `abuse`: nasty datagrams, one by one; `spoof`: `abuse --spoof`, forged sources.
//! - `admission`: `abuse --spoof --newcomers`, real newcomers during a forged
//!   `^hello^` flood; `newcomer`: their handshake; `tap`: what the relay sends.
//! - `member`: a real (verify-aware) member, for the scenarios that need one.
//! - `payload`, `tracker`: message stamps; loss/duplicate/reorder bookkeeping.
//! - `report`, `plot`: reports (table, JSON, SVG); `histogram`: latency
//!   histograms, losslessly in a report; `merge`: several reports, one.
//! - `metrics`, `procfs`: what the relay (and `/proc`) says.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod abuse;
mod admission;
mod duration;
mod fanout;
mod flood;
mod histogram;
mod join_storm;
mod limits;
mod member;
mod merge;
mod metrics;
mod newcomer;
mod payload;
mod plot;
mod procfs;
mod report;
mod sink;
mod soak;
mod spoof;
mod tap;
mod tracker;
mod workers;

/// Flood generator and benchmark driver for UDP chat relays.
#[derive(Debug, Parser)]
#[command(
    name = "loadtest",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    /// (no subcommand: `fanout`)
    #[command(flatten)]
    fanout: fanout::FanoutArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Messages from S senders fanned out to N clients (the default)
    Fanout(fanout::FanoutArgs),
    /// Many distinct sources register and heartbeat
    JoinStorm(join_storm::JoinStormArgs),
    /// A long mixed load, sampling relay memory and counters
    Soak(soak::SoakArgs),
    /// Nasty datagrams, and what the relay did with each
    Abuse(abuse::AbuseArgs),
    /// Several `fanout --json` reports (several load machines) as one
    Merge(merge::MergeArgs),
}

fn emit<T: serde::Serialize>(json: bool, report: &T, table: impl FnOnce(&T)) -> Result<(), String> {
    if json {
        use std::io::Write;
        let text = serde_json::to_string_pretty(report).map_err(|e| e.to_string())?;
        // A closed pipe (`| head`) is the reader's choice, not an error.
        let _ = writeln!(std::io::stdout(), "{text}");
    } else {
        table(report);
    }
    Ok(())
}

fn run(cli: Cli) -> Result<(), String> {
    match cli.command.unwrap_or(Command::Fanout(cli.fanout)) {
        Command::Fanout(args) if args.sink => {
            emit(args.common.json, &sink::run(&args)?, |r| r.print_table())
        }
        Command::Fanout(args) => {
            let r = fanout::run(&args)?;
            if let Some(path) = &args.common.plot {
                let title = format!("fanout: {} clients, {}", r.clients, r.mode);
                plot::write(path, &title, &r.timeline)?;
            }
            emit(args.common.json, &r, |r| r.print_table())?;
            if r.cross_room_deliveries > 0 {
                return Err(format!(
                    "isolation broken: {} deliveries reached a client in another room",
                    r.cross_room_deliveries
                ));
            }
            Ok(())
        }
        Command::JoinStorm(args) => emit(args.common.json, &join_storm::run(&args)?, |r| {
            r.print_table()
        }),
        Command::Soak(args) => emit(args.common.json, &soak::run(&args)?, |r| r.print_table()),
        Command::Abuse(args) => match args.spoof_plan() {
            Some(plan) => match plan.newcomers {
                Some(n) => emit(
                    args.common.json,
                    &admission::run(&args.common, &plan, n)?,
                    |r| r.print_table(),
                ),
                None => emit(args.common.json, &spoof::run(&args.common, &plan)?, |r| {
                    r.print_table()
                }),
            },
            None => emit(args.common.json, &abuse::run(&args)?, |r| r.print_table()),
        },
        // Handled in `main`: its errors are usage errors.
        Command::Merge(_) => Ok(()),
    }
}

/// `loadtest … | head` closes the pipe early: `println!` then panics with
/// "failed printing to stdout: Broken pipe". That is the reader's choice,
/// not an error of ours: end quietly, as a program killed by SIGPIPE
/// would (ripgrep does the same), instead of printing a panic.
fn quiet_on_broken_pipe() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let text = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if text.starts_with("failed printing to stdout") && text.contains("Broken pipe") {
            std::process::exit(0);
        }
        default(info);
    }));
}

fn main() -> ExitCode {
    quiet_on_broken_pipe();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() => {
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or("invalid command line");
            eprintln!(
                "loadtest: {} (see `loadtest --help`)",
                first.trim_start_matches("error: ")
            );
            return ExitCode::from(2);
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    // Flags that clap cannot check alone: a usage error, like clap's.
    if let Some(Command::Abuse(args)) = &cli.command {
        if let Err(e) = args.check() {
            eprintln!("loadtest: {e}");
            return ExitCode::from(2);
        }
    }
    if let Some(Command::Merge(args)) = &cli.command {
        // Unreadable or mismatched reports are the user's to fix: exit 2.
        return match merge::run(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("loadtest merge: {e}");
                ExitCode::from(2)
            }
        };
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loadtest: {e}");
            ExitCode::from(1)
        }
    }
}
