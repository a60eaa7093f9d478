//! Joining a room from a client (wire protocol v2): the `--room`,
//! `--token`, `--token-file` flags `chat` and `send` share, the padded
//! `^join^`, and a refusal explained in words.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;

use crate::core::protocol;
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
    /// Joins the room, if one was asked for, through `sock` (connected to
    /// the relay at `server`), proving the address with `cookie` if the
    /// relay is in verify mode, waiting up to `wait` for the answer.
    pub(crate) fn join(
        &self,
        sock: &UdpSocket,
        server: SocketAddr,
        cookie: Option<&[u8]>,
        wait: Duration,
    ) -> Result<(), Error> {
        let Some(room) = &self.room else {
            return Ok(());
        };
        let token = token_arg(self.token.as_deref(), self.token_file.as_deref())?;
        join_room(sock, server, room, token.as_deref(), cookie, wait)
    }

    /// With a token: whether the relay lets us into the room without it
    /// (then it has no room secret, and the room is open to anyone). Asks
    /// with a plain `^join^ROOM` first, so a relay that does check tokens
    /// counts one refusal (`missing`) for it. `None` when there is no token
    /// to worry about, or no answer within `wait`.
    pub(crate) fn open_without_token(
        &self,
        sock: &UdpSocket,
        server: SocketAddr,
        cookie: Option<&[u8]>,
        wait: Duration,
    ) -> Option<String> {
        let room = self.room.as_ref()?;
        if self.token.is_none() && self.token_file.is_none() {
            return None;
        }
        join_room(sock, server, room, None, cookie, wait).ok()?;
        Some(format!(
            "warning: the relay let us into room {room:?} without the token: it has no --room-secret-file, so tokens are not checked and anyone can join {room:?}; the room is not private (whoever runs the relay: set --room-secret-file)"
        ))
    }

    /// What follows `^cookie^C` to (re)join this room: `^join^ROOM[^TOKEN]`,
    /// or nothing for the lobby.
    pub(crate) fn rejoin_suffix(&self) -> Result<Vec<u8>, Error> {
        let Some(room) = &self.room else {
            return Ok(Vec::new());
        };
        let token = token_arg(self.token.as_deref(), self.token_file.as_deref())?;
        Ok(join_request(room, token.as_deref(), Some(b"")).split_off(b"^cookie^".len()))
    }
}

/// What the relay said to the first datagram.
#[derive(Debug, Default)]
pub(crate) struct Probe {
    /// Verify mode: the cookie it sent.
    pub(crate) cookie: Option<Vec<u8>>,
    /// Its `--timeout`, if it said.
    pub(crate) timeout: Option<Duration>,
}

/// How long a client waits for an answer before it asks again: a lost
/// datagram (a flood filling the relay's queue, a lossy link) costs this
/// much, not the whole wait.
const RETRY: Duration = Duration::from_millis(250);

/// The first datagram: `^timeout^` padded to 64 bytes. A udphub relay
/// answers `^timeout^MS` (and registers the sender), or, in verify mode,
/// `^cookie^C` (and registers nobody yet). Asks again every [`RETRY`] and
/// waits up to `wait` in all; silence is an empty answer (an older relay,
/// or none listening).
pub(crate) fn probe(sock: &UdpSocket, wait: Duration) -> Probe {
    let mut question = protocol::TIMEOUT_QUERY.to_vec();
    question.resize(protocol::HELLO_LEN, b' ');
    let mut out = Probe::default();
    ask(sock, &question, wait, |answer| {
        if let Some(c) = answer.strip_prefix(protocol::COOKIE) {
            out.cookie = Some(c.to_vec());
            return Some(());
        }
        protocol::parse_timeout_answer(answer).map(|t| out.timeout = Some(t))
    });
    out
}

/// Whether the relay's lobby is closed (`serve --lobby closed`): asks to
/// join the lobby (`[^cookie^C]^join^`, padded so a refusal fits) and
/// hears `^denied^token`. Without a room a client's lines would then be
/// dropped (`lobby_closed`) in silence. `false` on an answer of `^room^`,
/// on silence, or when nothing listens.
pub(crate) fn lobby_closed(sock: &UdpSocket, cookie: Option<&[u8]>, wait: Duration) -> bool {
    let mut request = join_request("", None, cookie);
    request.resize(request.len().max(protocol::TIMEOUT_QUERY_LEN), b' ');
    ask(sock, &request, wait, |answer| {
        if answer.starts_with(protocol::DENIED_REPLY) {
            Some(true)
        } else if answer.starts_with(protocol::ROOM_REPLY) {
            Some(false)
        } else {
            None
        }
    })
    .unwrap_or(false)
}

/// Sends `request` every [`RETRY`] until `understood` makes something of
/// an answer, for at most `wait`; `None` on silence, or when sending or
/// receiving fails (nothing listens).
fn ask<T>(
    sock: &UdpSocket,
    request: &[u8],
    wait: Duration,
    mut understood: impl FnMut(&[u8]) -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + wait;
    let mut ask_at = Instant::now();
    let mut buf = [0u8; 256];
    loop {
        let now = Instant::now();
        if now >= ask_at {
            sock.send(request).ok()?;
            ask_at = now + RETRY;
        }
        let left = deadline.saturating_duration_since(now).min(ask_at - now);
        if deadline <= now {
            return None;
        }
        sock.set_read_timeout(Some(left)).ok()?;
        match sock.recv(&mut buf) {
            Ok(n) => {
                if let Some(t) = understood(&buf[..n]) {
                    return Some(t);
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return None,
        }
    }
}

/// `[^cookie^C]^join^ROOM[^TOKEN]`, padded so that any answer fits.
fn join_request(room: &str, token: Option<&str>, cookie: Option<&[u8]>) -> Vec<u8> {
    let mut request = Vec::new();
    if let Some(c) = cookie {
        request.extend_from_slice(protocol::COOKIE);
        request.extend_from_slice(c);
    }
    request.extend_from_slice(protocol::JOIN);
    request.extend_from_slice(room.as_bytes());
    if let Some(t) = token {
        request.push(b'^');
        request.extend_from_slice(t.as_bytes());
    }
    request
}

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

/// Joins `room` on the relay at `server` through `sock` (connected to it),
/// waiting up to `wait` for `^room^ROOM`. A refusal, or silence, is an
/// error that says why in words.
fn join_room(
    sock: &UdpSocket,
    server: SocketAddr,
    room: &str,
    token: Option<&str>,
    cookie: Option<&[u8]>,
    wait: Duration,
) -> Result<(), Error> {
    if !crate::core::rooms::valid_name(room.as_bytes()) {
        return Err(Error::Config(format!(
            "--room {room:?}: a room name is 1 to 64 of A-Z a-z 0-9 _ . : -"
        )));
    }
    let mut request = join_request(room, token, cookie);
    // Padded (a join is matched trimmed) so that a refusal's answer fits:
    // the relay never answers with more bytes than it was sent.
    if request.len() < protocol::TIMEOUT_QUERY_LEN {
        request.resize(protocol::TIMEOUT_QUERY_LEN, b' ');
    }
    let deadline = Instant::now() + wait;
    let mut buf = vec![0u8; 2048];
    let accepted = [protocol::ROOM_REPLY, room.as_bytes()].concat();
    // Asked again every RETRY: a join of the room one is in is answered
    // with the room, so a retry after a lost answer is safe.
    let mut ask_at = Instant::now();
    loop {
        let now = Instant::now();
        if now >= ask_at {
            sock.send(&request)
                .map_err(|e| Error::io("send the join", e))?;
            ask_at = now + RETRY;
        }
        let left = deadline.saturating_duration_since(now).min(ask_at - now);
        if deadline <= now {
            return Err(Error::Refused(format!(
                "no answer from {server} to joining room {room:?} within {}: is it a udphub relay that knows rooms?",
                humantime::format_duration(wait)
            )));
        }
        sock.set_read_timeout(Some(left))
            .map_err(|e| Error::io("set a read timeout", e))?;
        match sock.recv(&mut buf) {
            Ok(n) if buf[..n] == accepted[..] => return Ok(()),
            Ok(n) => {
                if let Some(reason) = buf[..n].strip_prefix(protocol::DENIED_REPLY) {
                    return Err(Error::Refused(explain_refusal(room, token, reason)));
                }
                // Anything else (a message already on its way) is not the answer.
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                return Err(Error::Refused(format!(
                    "nothing is listening at {server}: is the relay running?"
                )))
            }
            Err(e) => return Err(Error::io("receive the join answer", e)),
        }
    }
}

/// A `^denied^REASON` for `room`, in words; for a token, what is wrong with
/// it as far as its holder can tell (its header and claims are readable,
/// its signature is not checkable here).
fn explain_refusal(room: &str, token: Option<&str>, reason: &[u8]) -> String {
    match (reason, token) {
        (b"full", _) => format!(
            "room {room:?} is full (or the relay has as many rooms as it allows); try again later"
        ),
        (b"name", _) => format!("the relay does not accept {room:?} as a room name"),
        (b"token", None) => {
            format!("room {room:?} needs a token: pass --token or --token-file")
        }
        (b"token", Some(t)) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            explain_token(room, t, now)
        }
        (other, _) => format!(
            "the relay refused to let you into room {room:?} ({})",
            String::from_utf8_lossy(other)
        ),
    }
}

/// Why the relay refused `token` for `room` at unix time `now`, as far as
/// its claims tell, with what fixes it.
fn explain_token(room: &str, token: &str, now: f64) -> String {
    use crate::core::token::{self, TokenError};
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
