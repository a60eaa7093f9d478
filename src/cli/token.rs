//! `udphub token`: mints a room token, for operators, scripts and tests.
//! A backend that knows the users would mint them with its own JWT library;
//! this is the same HS256 JWT (`core::token`).

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Args;

use crate::config::{parse_duration, read_secret};
use crate::core::rooms;
use crate::core::token::{self, Claims};
use crate::error::Error;

/// `udphub token` flags.
#[derive(Debug, Clone, Args)]
pub struct TokenArgs {
    /// The room the token admits to (1–64 of A-Z a-z 0-9 _ . : -)
    #[arg(long, value_name = "ROOM")]
    pub room: String,

    /// How long the token is valid from now, e.g. `1h`, `30m`
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub ttl: Duration,

    /// The file with the relay's room secret (as for `serve --room-secret-file`)
    #[arg(long, env = "UDPHUB_ROOM_SECRET_FILE", value_name = "FILE")]
    pub secret_file: PathBuf,

    /// Not valid until this long from now (an `nbf` claim)
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub not_before: Option<Duration>,
}

/// Prints a token for `args`.
pub fn run(args: &TokenArgs) -> Result<(), Error> {
    if !rooms::valid_name(args.room.as_bytes()) {
        return Err(Error::Config(format!(
            "--room {:?}: a room name is 1 to 64 of A-Z a-z 0-9 _ . : -",
            args.room
        )));
    }
    let secret = read_secret(&args.secret_file)?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let claims = Claims {
        room: args.room.clone(),
        exp: now.saturating_add(args.ttl.as_secs().max(1)),
        nbf: args.not_before.map(|d| now.saturating_add(d.as_secs())),
    };
    println!("{}", token::mint(&secret, &claims));
    Ok(())
}
