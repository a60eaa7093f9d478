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

    /// How long the token is valid from now, e.g. `1h`, `30m` (at least 1s)
    #[arg(long, value_name = "DURATION", value_parser = parse_ttl, allow_hyphen_values = true)]
    pub ttl: Duration,

    /// The file with the relay's room secret (as for `serve --room-secret-file`)
    #[arg(long, env = "UDPHUB_ROOM_SECRET_FILE", value_name = "FILE")]
    pub secret_file: PathBuf,

    /// Not valid until this long from now (an `nbf` claim)
    #[arg(
        long,
        value_name = "DURATION",
        value_parser = parse_not_before,
        allow_hyphen_values = true
    )]
    pub not_before: Option<Duration>,
}

/// `--ttl`: a duration of at least a second (a token's times are whole
/// seconds; 0 or less would mint a token that is dead on arrival). Hyphen
/// values reach here (`allow_hyphen_values`) so that `--ttl -5m` is told
/// what is wrong instead of "unexpected argument '-5'".
fn parse_ttl(s: &str) -> Result<Duration, String> {
    if s.trim_start().starts_with('-') {
        return Err(format!(
            "{s:?} is negative: the token would be expired when minted; give how long it lives, e.g. --ttl 5m (for a token valid only later, add --not-before 5m)"
        ));
    }
    let ttl = parse_duration(s)?;
    if ttl < Duration::from_secs(1) {
        return Err(format!(
            "{s:?} would mint a token that is already expired (its times are whole seconds); give it at least 1s, e.g. --ttl 1h"
        ));
    }
    Ok(ttl)
}

/// `--not-before`: a duration from now, never negative (a token valid
/// since the past is simply one without `--not-before`).
fn parse_not_before(s: &str) -> Result<Duration, String> {
    if s.trim_start().starts_with('-') {
        return Err(format!(
            "{s:?} is negative: a token is valid from when it is minted without --not-before; leave it out, or give a time to come, e.g. --not-before 5m"
        ));
    }
    parse_duration(s)
}

/// The last unix second of year 9999: the latest `exp` a relay accepts.
const LATEST_EXP: u64 = 253_402_300_799;

/// Prints a token for `args`.
pub fn run(args: &TokenArgs) -> Result<(), Error> {
    if !rooms::valid_name(args.room.as_bytes()) {
        return Err(Error::Config(format!(
            "--room {:?}: a room name is 1 to 64 of A-Z a-z 0-9 _ . : -",
            args.room
        )));
    }
    let secret = read_secret(&args.secret_file, "--secret-file")?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let claims = Claims {
        room: args.room.clone(),
        exp: now.saturating_add(args.ttl.as_secs()),
        nbf: args.not_before.map(|d| now.saturating_add(d.as_secs())),
    };
    if claims.nbf.is_some_and(|nbf| nbf > LATEST_EXP) {
        return Err(Error::Config(format!(
            "--not-before {}: the token would be valid only after year 9999, which no relay accepts; give a shorter one, e.g. --not-before 1h",
            humantime::format_duration(args.not_before.unwrap_or_default())
        )));
    }
    if claims.exp > LATEST_EXP {
        return Err(Error::Config(format!(
            "--ttl {}: the token would expire after year 9999, which no relay accepts; give a shorter one, e.g. --ttl 30d",
            humantime::format_duration(args.ttl)
        )));
    }
    if claims.nbf.is_some_and(|nbf| nbf >= claims.exp) {
        return Err(Error::Config(
            "--not-before is as late as --ttl or later: the token would expire before it is valid; --ttl counts from now, so make it longer than --not-before".into(),
        ));
    }
    super::print_out(format!("{}\n", token::mint(&secret, &claims)).as_bytes())?;
    Ok(())
}
