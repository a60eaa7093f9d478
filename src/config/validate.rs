//! What makes settings valid: the checks a declaration names (one value
//! each; the error goes on after the flag's name, `--max-datagram must be
//! …`), and [`Config::validate`], which runs them and then the rules that
//! span settings. Nothing here binds or connects: `--check-config` runs it
//! all.

use std::path::PathBuf;

use super::logging::check_filter;
use super::values::{Lobby, Threads, Value, MAX_UDP_PAYLOAD};
use super::Config;
use crate::error::Error;

/// Most loops (`--threads`): a room's interest across loops is a 64-bit
/// mask, and the steering program picks among at most 64 sockets. (The
/// runtime asserts that its `shards::MAX_SHARDS` and net's
/// `steering::MAX_LOOPS` agree with this.)
pub const MAX_THREADS: usize = 64;

/// No check beyond the parser's.
pub fn any<T>(_: &T) -> Result<(), String> {
    Ok(())
}

/// From `low` to `high`, both included.
pub fn between<T: PartialOrd + Value>(low: T, high: T) -> impl Fn(&T) -> Result<(), String> {
    move |value| {
        if *value < low || *value > high {
            Err(format!(
                "must be between {} and {}, got {}",
                low.show(),
                high.show(),
                value.show()
            ))
        } else {
            Ok(())
        }
    }
}

/// `--max-datagram`, for every server that takes it: a datagram is 1 byte
/// or more, and no UDP payload is longer than [`MAX_UDP_PAYLOAD`].
pub fn max_datagram(bytes: &usize) -> Result<(), String> {
    if (1..=MAX_UDP_PAYLOAD).contains(bytes) {
        Ok(())
    } else {
        Err(format!(
            "must be between 1 and {MAX_UDP_PAYLOAD} bytes, got {bytes}"
        ))
    }
}

/// A rate: more than 0, and a number.
pub fn positive(rate: &f64) -> Result<(), String> {
    if *rate > 0.0 && rate.is_finite() {
        Ok(())
    } else {
        Err(format!("must be more than 0, got {rate}"))
    }
}

/// A burst: at least one datagram, and a number.
pub fn at_least_one(burst: &f64) -> Result<(), String> {
    if *burst >= 1.0 && burst.is_finite() {
        Ok(())
    } else {
        Err(format!("must be at least 1, got {burst}"))
    }
}

/// `--threads`: 1 to [`MAX_THREADS`], or `auto`.
pub fn threads(threads: &Threads) -> Result<(), String> {
    let n = threads.resolve();
    if (1..=MAX_THREADS).contains(&n) {
        Ok(())
    } else {
        Err(format!(
            "must be between 1 and {MAX_THREADS} (or auto), got {n}"
        ))
    }
}

/// `--log-level`: levels or `target=level` directives (see
/// [`check_filter`]).
pub fn log_level(spec: &str) -> Result<(), String> {
    check_filter(spec).map(drop)
}

/// `--cluster-name`: usable as a NATS subject prefix.
pub fn cluster_name(name: &str) -> Result<(), String> {
    if let Some(parent) = name.strip_suffix(".room") {
        return Err(format!(
            "{name:?}: its lobby's subject would be {name}.lobby, that of the room `lobby` of a cluster named {parent:?}; use another last part"
        ));
    }
    if valid_cluster_name(name) {
        Ok(())
    } else {
        Err(format!(
            "{name:?}: letters, digits, '_' and '-', in dot-separated parts (it prefixes NATS subjects)"
        ))
    }
}

/// Whether `name` is usable as a subject prefix: NATS tokens, no wildcards.
pub fn valid_cluster_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.split('.').all(|t| {
            !t.is_empty()
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        })
}

/// `--node-id`: a name a person can read in NATS's monitoring.
pub fn node_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.chars().any(char::is_control) {
        Err("must be a non-empty printable name".into())
    } else {
        Ok(())
    }
}

/// `--cluster-credentials`: a file that is there.
pub fn cluster_credentials(path: &PathBuf) -> Result<(), String> {
    std::fs::metadata(path)
        .map(drop)
        .map_err(|e| format!("{}: {e}", path.display()))
}

impl Config {
    /// Checks every setting, then the rules between settings (run by
    /// [`from_args`](Self::from_args); call it yourself only for a `Config`
    /// built by hand).
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |m: String| Err(Error::Config(m));
        self.check_each().map_err(Error::Config)?;
        if self.expect_clients > self.max_clients {
            return bad(format!(
                "--expect-clients ({}) is more than --max-clients ({})",
                self.expect_clients, self.max_clients
            ));
        }
        if let Some((_, burst)) = self.client_rate() {
            at_least_one(&burst).map_err(|why| {
                Error::Config(format!(
                    "--client-burst (twice --client-rate unless set) {why}"
                ))
            })?;
        }
        if self.lobby == Lobby::Closed && self.room_secret_file.is_none() {
            return bad(
                "--lobby closed needs --room-secret-file: without a secret there are no tokens to join rooms with".into(),
            );
        }
        if let Some(m) = self.metrics.addr() {
            if m == self.bind && m.port() != 0 {
                // Different protocols could share the port, but it is almost
                // certainly a typo, and confusing to operate.
                return bad(format!("--metrics and --bind are both {m}"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn checks_say_what_is_wrong_after_the_flag() {
        assert_eq!(
            max_datagram(&0).unwrap_err(),
            "must be between 1 and 65507 bytes, got 0"
        );
        assert!(max_datagram(&1472).is_ok());
        assert_eq!(
            between(Duration::from_millis(1), Duration::from_secs(30 * 86_400))(&Duration::ZERO)
                .unwrap_err(),
            "must be between 1ms and 30days, got 0s"
        );
        assert!(positive(&f64::NAN).is_err());
        assert!(positive(&0.0).is_err());
        assert!(at_least_one(&0.5).is_err());
        assert!(threads(&Threads::Count(0))
            .unwrap_err()
            .contains("between 1 and 64"));
        assert!(threads(&Threads::Auto).is_ok());
        assert!(log_level("loud").unwrap_err().starts_with("\"loud\": "));
    }

    #[test]
    fn cluster_names_are_nats_tokens() {
        assert!(valid_cluster_name("udphub"));
        assert!(valid_cluster_name("eu-west.chat_1"));
        for bad in ["", "a.", ".a", "a..b", "a.*", "a >", &"x".repeat(65)] {
            assert!(!valid_cluster_name(bad), "{bad:?}");
        }
        // Cluster `eu.room`'s lobby would be cluster `eu`'s room `lobby`.
        let e = cluster_name("eu.room").unwrap_err();
        assert!(e.contains("eu.room.lobby") && e.contains("\"eu\""), "{e}");
        assert!(cluster_name("room").is_ok());
        assert!(cluster_name("eu.rooms").is_ok());
    }
}
