//! A real member of the relay on a blocking socket: registers (with the
//! verify-mode cookie handshake when asked), talks, listens. The spoofing
//! and abuse scenarios use it as the conversation a victim must not get,
//! and as the witness that a member survives forged `quit`s.
//!
//! The handshake is the client library's (`udphub::client`), the same
//! one `udphub chat` and `send` use; a member then talks and listens on
//! the library's socket directly, so a scenario sees every datagram.

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use udphub::client::{Client, ClientError, Options};
use udphub::core::protocol;

/// The 64-byte `^hello^` that asks a relay in verify mode for a cookie.
pub fn hello() -> Vec<u8> {
    udphub::client::session::padded(protocol::HELLO, protocol::HELLO_LEN)
}

/// One registered client.
pub struct Member {
    /// The library's client: its socket, cookie and quit.
    client: Client,
    relay: SocketAddr,
    /// Answers the relay sent while registering (cookies, the timeout,
    /// the lobby's `^room^`): the relay counts them as deliveries.
    pub answers: u64,
}

/// How long one registration attempt waits for its answers before the
/// next: a flood filling the relay's queue may eat some.
const ATTEMPT: Duration = Duration::from_millis(500);

impl Member {
    /// Binds a socket (loopback for a loopback relay; port from the
    /// kernel) and registers within `limit`: an answered timeout question
    /// or, in verify mode, the cookie and an answered proven join of the
    /// lobby. `verify` says which the caller expects; the other is an
    /// error that names the flag.
    pub fn join(relay: SocketAddr, verify: bool, limit: Duration) -> Result<Member, String> {
        let deadline = Instant::now() + limit;
        let options = Options {
            wait: ATTEMPT,
            // The scenarios heartbeat themselves ([`Member::heartbeat`]).
            heartbeat: Some(Duration::from_secs(3600)),
            ..Options::default()
        };
        let mut last = String::new();
        while Instant::now() < deadline {
            match Client::connect_with(relay, &options) {
                Ok(client) if client.verified() != verify => {
                    return Err(if verify {
                        format!("the relay at {relay} is not in verify mode: drop --verify")
                    } else {
                        format!("the relay at {relay} is in verify mode: add --verify")
                    });
                }
                Ok(client) if client.confirmed() => {
                    return Ok(Member {
                        answers: client.answers(),
                        client,
                        relay,
                    })
                }
                Ok(_) => last = "no answer".into(),
                Err(e @ (ClientError::Address(_) | ClientError::LobbyClosed(_))) => {
                    return Err(e.to_string())
                }
                Err(e) => last = e.to_string(),
            }
        }
        Err(format!(
            "could not register with the relay at {relay} within {limit:?} ({last}){}",
            if verify {
                ""
            } else {
                " (in verify mode? add --verify)"
            }
        ))
    }

    /// This member's address, as the relay sees it.
    pub fn addr(&self) -> Result<SocketAddr, String> {
        self.client.local_addr().map_err(|e| e.to_string())
    }

    /// Sends one datagram to the relay. ("Connection refused" from an
    /// earlier datagram is not an error: UDP promises nothing.)
    pub fn send(&self, data: &[u8]) -> Result<(), String> {
        match self.client.socket().send(data) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Ok(()),
            Err(e) => Err(format!("send to {}: {e}", self.relay)),
        }
    }

    /// Waits up to `wait` for a datagram that `want` accepts, skipping
    /// others; returns its length in `buf`.
    pub fn recv_matching(
        &self,
        buf: &mut [u8],
        wait: Duration,
        want: impl Fn(&[u8]) -> bool,
    ) -> Option<usize> {
        let sock = self.client.socket();
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || sock.set_read_timeout(Some(left)).is_err() {
                return None;
            }
            match sock.recv(buf) {
                Ok(n) if want(&buf[..n]) => return Some(n),
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionRefused
                    ) => {}
                Err(_) => return None,
            }
        }
    }

    /// A heartbeat: `^hb^`, or in verify mode the member's `^cookie^C`
    /// (only the cookie keeps a member alive there; its messages do not).
    pub fn heartbeat(&self) -> Result<(), String> {
        self.send(&self.client.heartbeat_datagram())
    }

    /// Reads and counts whatever is waiting, without blocking.
    pub fn drain(&self, buf: &mut [u8]) -> u64 {
        let sock = self.client.socket();
        let mut n = 0;
        if sock.set_nonblocking(true).is_ok() {
            loop {
                match sock.recv(buf) {
                    Ok(_) => n += 1,
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
                    Err(_) => break,
                }
            }
            let _ = sock.set_nonblocking(false);
        }
        n
    }

    /// Leaves: `quit`, or in verify mode the proven `^cookie^C^quit`
    /// (a cookie lasts 2-4 minutes; the library renews an older one
    /// first).
    pub fn leave(&self) {
        self.client.close();
    }
}
