//! Joining a room from the command line (wire protocol v2): the `--room`,
//! `--token`, `--token-file` flags `chat` and `send` share, turned into
//! the client library's [`Options`], and its errors said with the flags
//! that fix them; a token a relay does not check is said to be no
//! privacy. (The join itself is [`crate::client`]'s.)

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::client::{Client, ClientError, Options, Refusal};
use crate::config::MAX_UDP_PAYLOAD;
use crate::error::Error;

/// The room flags.
#[derive(Debug, Clone, Default, Args)]
pub struct RoomArgs {
    /// Join this room first (wire protocol v2) instead of staying in the lobby
    #[arg(long, value_name = "ROOM")]
    pub room: Option<String>,

    /// The room's token (an HS256 JWT from whoever runs the relay)
    #[arg(
        long,
        value_name = "TOKEN",
        requires = "room",
        conflicts_with = "token_file"
    )]
    pub token: Option<String>,

    /// Read the room's token from this file
    #[arg(long, value_name = "FILE", requires = "room")]
    pub token_file: Option<PathBuf>,
}

impl RoomArgs {
    /// The token from `--token` or `--token-file` (trimmed), if any.
    pub(crate) fn token(&self) -> Result<Option<String>, Error> {
        token_arg(self.token.as_deref(), self.token_file.as_deref())
    }

    /// The client library's options for these flags: the room and its
    /// token, heartbeating every `heartbeat` (`None`: the library's
    /// choice), waiting up to `wait` for a join's answer. Messages up to
    /// the largest UDP payload go out: a relay with a larger
    /// `--max-datagram` takes them, and a default one counts the drop.
    pub(crate) fn options(
        &self,
        heartbeat: Option<Duration>,
        wait: Duration,
    ) -> Result<Options, Error> {
        Ok(Options {
            room: self.room.clone(),
            token: self.token()?,
            heartbeat,
            wait,
            max_datagram: MAX_UDP_PAYLOAD,
            ..Options::default()
        })
    }

    /// Connects to the relay at `server` with `options` (these flags'),
    /// joining the room. With a token, first asks to join without it: a
    /// relay that lets us in has no room secret, so the token is not
    /// checked and the room is open to anyone, which the user must hear
    /// (a relay that does check tokens counts that first ask as one
    /// refusal, `missing`). `chat` and `send` both connect this way.
    pub(crate) fn connect(&self, server: SocketAddr, options: &Options) -> Result<Client, Error> {
        if let (Some(room), Some(token)) = (&options.room, &options.token) {
            let without = Options {
                token: None,
                wait: PROBE_WAIT,
                ..options.clone()
            };
            if let Ok(client) = Client::connect_with(server, &without) {
                eprintln!(
                    "udphub: warning: the relay let us into room {room:?} without the token: it has no --room-secret-file, so tokens are not checked and anyone can join {room:?}; the room is not private (whoever runs the relay: set --room-secret-file)"
                );
                client.join(room, Some(token)).map_err(|e| self.error(e))?;
                return Ok(client);
            }
        }
        Client::connect_with(server, options).map_err(|e| self.error(e))
    }

    /// A client library error as the command line says it: the same
    /// words, with the flags that fix it (`--token`, `--room`), as a usage
    /// error (exit 2), a refusal (exit 1) or an I/O error.
    pub(crate) fn error(&self, e: ClientError) -> Error {
        let no_token = self.token.is_none() && self.token_file.is_none();
        match e {
            ClientError::Refused {
                room,
                reason: Refusal::Token,
                ..
            } if no_token && !room.is_empty() => Error::Refused(format!(
                "room {room:?} needs a token: pass --token or --token-file"
            )),
            ClientError::LobbyClosed(relay) => Error::Refused(format!(
                "the relay at {relay} has a closed lobby (serve --lobby closed): lines sent outside a room are dropped; pass --room ROOM --token TOKEN (whoever runs the relay mints tokens with `udphub token`)"
            )),
            ClientError::RoomName(room) => Error::Config(format!(
                "--room {room:?}: a room name is 1 to 64 of A-Z a-z 0-9 _ . : -"
            )),
            ClientError::Io { doing, source } => Error::Io {
                context: doing,
                source,
            },
            e if e.is_usage() => Error::Config(e.to_string()),
            e => Error::Refused(e.to_string()),
        }
    }
}

/// How long the token-less first ask of [`RoomArgs::connect`] waits.
const PROBE_WAIT: Duration = Duration::from_millis(500);

/// How long to wait for the relay to answer a join.
pub(crate) const JOIN_WAIT: Duration = Duration::from_secs(2);

/// The token from `--token` or `--token-file` (trimmed), if any.
fn token_arg(token: Option<&str>, file: Option<&std::path::Path>) -> Result<Option<String>, Error> {
    if let Some(path) = file {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::Config(format!("cannot read --token-file {}: {e}", path.display()))
        })?;
        let token = text.trim();
        if token.is_empty() {
            return Err(Error::Config(format!(
                "--token-file {} is empty: put the room's token in it (from `udphub token` or whoever runs the relay)",
                path.display()
            )));
        }
        return Ok(Some(token.to_string()));
    }
    match token.map(str::trim) {
        Some("") => Err(Error::Config(
            "--token is empty: give the room's token (from `udphub token` or whoever runs the relay)".into(),
        )),
        t => Ok(t.map(str::to_string)),
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    /// An empty `--token` or `--token-file` is the user's mistake, said so
    /// by flag before anything is sent (found in review: it went out as
    /// `^join^ROOM^` and came back as "not a JWT").
    #[test]
    fn an_empty_token_is_refused_by_its_flag() {
        let err = token_arg(Some("  "), None).unwrap_err().to_string();
        assert!(err.contains("--token") && err.contains("empty"), "{err}");
        let path = std::env::temp_dir().join(format!("udphub-empty-token-{}", std::process::id()));
        std::fs::write(&path, "\n").unwrap();
        let err = token_arg(None, Some(&path)).unwrap_err().to_string();
        let _ = std::fs::remove_file(&path);
        assert!(
            err.contains("--token-file") && err.contains("empty"),
            "{err}"
        );
        assert_eq!(
            token_arg(Some(" a.b.c\n"), None).unwrap().as_deref(),
            Some("a.b.c")
        );
        assert_eq!(token_arg(None, None).unwrap(), None);
    }
}
