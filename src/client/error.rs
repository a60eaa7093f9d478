//! What can go wrong for a client, in words that say why and what to do:
//! [`ClientError`], and a refused join's [`Refusal`] explained from the
//! token's own claims.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use crate::core::token::{self, TokenError};

/// Why the relay refused a join (`^denied^REASON`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// `token`: the room needs a token and this one is missing, wrong or
    /// stale (or the lobby is closed).
    Token,
    /// `full`: the room has `--max-room-clients` members, or the relay
    /// `--max-rooms` rooms.
    Full,
    /// `name`: the relay does not accept the room's name.
    Name,
    /// A reason this client does not know (a newer relay).
    Other(String),
}

impl Refusal {
    /// The reason as the relay said it.
    pub fn parse(reason: &[u8]) -> Refusal {
        match reason {
            b"token" => Refusal::Token,
            b"full" => Refusal::Full,
            b"name" => Refusal::Name,
            other => Refusal::Other(String::from_utf8_lossy(other).into_owned()),
        }
    }

    /// The reason's wire word: `token`, `full`, `name`, or the other one.
    pub fn as_str(&self) -> &str {
        match self {
            Refusal::Token => "token",
            Refusal::Full => "full",
            Refusal::Name => "name",
            Refusal::Other(s) => s,
        }
    }
}

/// Everything a [`Client`](super::Client) can fail with. Each message
/// says what is wrong and what fixes it.
#[derive(Debug)]
pub enum ClientError {
    /// The relay's address cannot be used: the text says why.
    Address(String),
    /// A room name the relay would refuse: 1 to 64 of `A-Z a-z 0-9 _ . : -`.
    RoomName(String),
    /// A token was given without a room: tokens are for rooms.
    TokenWithoutRoom,
    /// A message longer than a datagram the relay accepts.
    TooLong {
        /// Its length.
        len: usize,
        /// The most the client sends (the relay's `--max-datagram`).
        max: usize,
    },
    /// The relay refused to let us into a room.
    Refused {
        /// The room (empty: the lobby).
        room: String,
        /// Why, as the relay said.
        reason: Refusal,
        /// Why, in words (for a token, what is wrong with it as far as its
        /// claims tell), with what fixes it.
        why: String,
    },
    /// The relay's lobby is closed (`serve --lobby closed`): a client
    /// outside a room would be dropped in silence.
    LobbyClosed(SocketAddr),
    /// The relay never answered a join.
    NoAnswer {
        /// The relay.
        relay: SocketAddr,
        /// The room asked for.
        room: String,
        /// How long we asked.
        wait: Duration,
    },
    /// Nothing listens at the relay's address (the kernel said
    /// "connection refused").
    NotListening(SocketAddr),
    /// The relay said `bye`: it is shutting down. The end of the stream.
    RelayClosed(SocketAddr),
    /// The client was closed.
    Closed,
    /// The operating system refused a socket operation.
    Io {
        /// What the client was doing.
        doing: &'static str,
        /// What the OS said.
        source: io::Error,
    },
}

impl ClientError {
    /// Whether the caller's own input is at fault (an address, a room
    /// name, a message too long): a usage error, not the relay's answer.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            ClientError::Address(_)
                | ClientError::RoomName(_)
                | ClientError::TokenWithoutRoom
                | ClientError::TooLong { .. }
        )
    }

    /// A refusal of `room` for `reason`, explained (with `token`, what was
    /// sent, read at unix time `now`).
    pub(crate) fn refused(room: &str, token: Option<&str>, reason: &[u8], now: f64) -> ClientError {
        let refusal = Refusal::parse(reason);
        let why = explain_refusal(room, token, &refusal, now);
        ClientError::Refused {
            room: room.to_string(),
            reason: refusal,
            why,
        }
    }

    pub(crate) fn io(doing: &'static str, source: io::Error) -> ClientError {
        ClientError::Io { doing, source }
    }
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Address(why) => f.write_str(why),
            ClientError::RoomName(room) => write!(
                f,
                "room {room:?}: a room name is 1 to 64 of A-Z a-z 0-9 _ . : -"
            ),
            ClientError::TokenWithoutRoom => {
                f.write_str("a token is for a room: give the room it admits to as well")
            }
            ClientError::TooLong { len, max } => write!(
                f,
                "the message is {len} bytes; a datagram holds at most {max} (the relay's --max-datagram): send it in parts"
            ),
            ClientError::Refused { why, .. } => f.write_str(why),
            ClientError::LobbyClosed(relay) => write!(
                f,
                "the relay at {relay} has a closed lobby (serve --lobby closed): lines sent outside a room are dropped; join a room with its token (whoever runs the relay mints tokens with `udphub token`)"
            ),
            ClientError::NoAnswer { relay, room, wait } => write!(
                f,
                "no answer from {relay} to joining room {room:?} within {}: is it a udphub relay that knows rooms?",
                humantime::format_duration(*wait)
            ),
            ClientError::NotListening(relay) => {
                write!(f, "nothing is listening at {relay}: is the relay running?")
            }
            ClientError::RelayClosed(relay) => {
                write!(f, "the relay at {relay} said bye: it is shutting down")
            }
            ClientError::Closed => f.write_str("the client is closed: connect again"),
            ClientError::Io { doing, source } => write!(f, "{doing}: {source}"),
        }
    }
}

impl std::error::Error for ClientError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ClientError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// A refusal of `room`, in words; for a token, what is wrong with it as
/// far as its holder can tell (its header and claims are readable, its
/// signature is not checkable here).
fn explain_refusal(room: &str, token: Option<&str>, reason: &Refusal, now: f64) -> String {
    if room.is_empty() {
        return match reason {
            Refusal::Token => {
                "the relay's lobby is closed (serve --lobby closed): join a room with its token"
                    .to_string()
            }
            other => format!(
                "the relay refused to take us back into the lobby ({})",
                other.as_str()
            ),
        };
    }
    match (reason, token) {
        (Refusal::Full, _) => format!(
            "room {room:?} is full (or the relay has as many rooms as it allows); try again later"
        ),
        (Refusal::Name, _) => format!("the relay does not accept {room:?} as a room name"),
        (Refusal::Token, None) => format!(
            "room {room:?} needs a token: join with the room's token (from `udphub token` or whoever runs the relay)"
        ),
        (Refusal::Token, Some(t)) => explain_token(room, t, now),
        (Refusal::Other(other), _) => {
            format!("the relay refused to let you into room {room:?} ({other})")
        }
    }
}

/// Why the relay refused `token` for `room` at unix time `now`, as far as
/// its claims tell, with what fixes it.
pub(crate) fn explain_token(room: &str, token: &str, now: f64) -> String {
    let fresh = "ask whoever runs the relay for a fresh one";
    let minter = "whoever mints it must fix that";
    let ago = |secs: f64| humantime::format_duration(Duration::from_secs(secs.max(0.0) as u64));
    let claims = match token::peek(token.as_bytes()) {
        Ok(claims) => claims,
        Err(e) => {
            let fix = match e {
                TokenError::Malformed => "check that it was copied whole (no quotes or spaces)",
                TokenError::Algorithm => "it must be minted with HS256 (e.g. PyJWT algorithm=\"HS256\", jsonwebtoken {algorithm: 'HS256'})",
                TokenError::Crit => "it must be minted without a `crit` header",
                TokenError::Milliseconds => {
                    "mint it with seconds: Python int(time.time()) + 3600, JavaScript Math.floor(Date.now() / 1000) + 3600"
                }
                _ => minter,
            };
            return format!("the token for room {room:?} {e}; {fix}");
        }
    };
    let now_secs = if now.is_finite() { now as u64 } else { 0 };
    match claims.check(room.as_bytes(), now_secs) {
        Err(TokenError::Room) => format!(
            "the token is for room {:?}, not {room:?}; use that room's token",
            claims.room
        ),
        Err(TokenError::Expired) => format!(
            "the token for room {room:?} expired {} ago; {fresh}",
            ago(now - claims.exp)
        ),
        Err(TokenError::NotYet) => format!(
            "the token for room {room:?} is not valid for another {} (its `nbf`); wait, or {fresh}",
            ago(claims.nbf.unwrap_or(now) - now)
        ),
        Err(e @ TokenError::NeverValid) => format!("the token for room {room:?} {e}; {minter}"),
        Err(e) => format!("the token for room {room:?} {e}; {fresh}"),
        Ok(()) => format!(
            "the relay refused the token for room {room:?}: it {}. If you minted it, does the secret end in a newline? The relay drops one trailing newline from --room-secret-file, so a minter must too (Python .rstrip(\"\\n\"), shell $(cat FILE)); otherwise {fresh}",
            TokenError::Signature
        ),
    }
}
