//! A real member of the relay on a blocking socket: registers (with the
//! verify-mode cookie handshake when asked), talks, listens. The spoofing
//! and abuse scenarios use it as the conversation a victim must not get,
//! and as the witness that a member survives forged `quit`s.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

/// The 64-byte `^hello^` that asks a relay in verify mode for a cookie.
pub fn hello() -> Vec<u8> {
    let mut h = b"^hello^".to_vec();
    h.resize(64, b' ');
    h
}

/// The 32-byte `^timeout^` question: answered only to members in verify
/// mode, so an answer after registering says the registration took.
pub fn timeout_query() -> Vec<u8> {
    let mut q = b"^timeout^".to_vec();
    q.resize(32, b' ');
    q
}

/// One registered client.
pub struct Member {
    sock: UdpSocket,
    relay: SocketAddr,
    /// `^cookie^C` as the relay gave it (verify mode).
    proof: Option<Vec<u8>>,
    /// Answers the relay sent while registering (cookies, the timeout):
    /// the relay counts them as deliveries.
    pub answers: u64,
}

impl Member {
    /// Binds a loopback socket (port from the kernel) and registers within
    /// `limit`.
    pub fn join(relay: SocketAddr, verify: bool, limit: Duration) -> Result<Member, String> {
        let local = if relay.is_ipv6() {
            "[::1]:0"
        } else {
            "127.0.0.1:0"
        };
        let sock = UdpSocket::bind(local).map_err(|e| format!("bind {local}: {e}"))?;
        let mut m = Member {
            sock,
            relay,
            proof: None,
            answers: 0,
        };
        let deadline = Instant::now() + limit;
        let mut buf = [0u8; 2048];
        while Instant::now() < deadline {
            if verify {
                m.send(&hello())?;
                let Some(n) = m.recv_matching(&mut buf, Duration::from_millis(200), |d| {
                    d.starts_with(b"^cookie^")
                }) else {
                    continue;
                };
                m.answers += 1;
                let proof = buf[..n].to_vec();
                m.send(&proof)?;
                m.proof = Some(proof);
                // A member's timeout question proves nothing in verify
                // mode (it goes unanswered); a proven join to the lobby is
                // answered `^room^`, which shows we are registered.
                let mut confirm = [&buf[..n], b"^join^"].concat();
                confirm.resize(confirm.len().max(32), b' ');
                m.send(&confirm)?;
                if m.recv_matching(&mut buf, Duration::from_millis(200), |d| {
                    d.starts_with(b"^room^")
                })
                .is_some()
                {
                    m.answers += 1;
                    return Ok(m);
                }
                continue;
            }
            m.send(b"^hb^")?;
            m.send(&timeout_query())?;
            if m.recv_matching(&mut buf, Duration::from_millis(200), |d| {
                d.starts_with(b"^timeout^")
            })
            .is_some()
            {
                m.answers += 1;
                return Ok(m);
            }
        }
        Err(format!(
            "could not register with the relay at {relay} within {limit:?}{}",
            if verify {
                ""
            } else {
                " (in verify mode? add --verify)"
            }
        ))
    }

    /// This member's address, as the relay sees it.
    pub fn addr(&self) -> Result<SocketAddr, String> {
        self.sock.local_addr().map_err(|e| e.to_string())
    }

    /// Sends one datagram to the relay.
    pub fn send(&self, data: &[u8]) -> Result<(), String> {
        self.sock
            .send_to(data, self.relay)
            .map(|_| ())
            .map_err(|e| format!("send to {}: {e}", self.relay))
    }

    /// Waits up to `wait` for a datagram that `want` accepts, skipping
    /// others; returns its length in `buf`.
    pub fn recv_matching(
        &self,
        buf: &mut [u8],
        wait: Duration,
        want: impl Fn(&[u8]) -> bool,
    ) -> Option<usize> {
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.sock.set_read_timeout(Some(left)).is_err() {
                return None;
            }
            match self.sock.recv(buf) {
                Ok(n) if want(&buf[..n]) => return Some(n),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return None,
            }
        }
    }

    /// A heartbeat: `^hb^`, or in verify mode the member's `^cookie^C`
    /// (only the cookie keeps a member alive there; its messages do not).
    pub fn heartbeat(&self) -> Result<(), String> {
        match &self.proof {
            Some(p) => self.send(p),
            None => self.send(b"^hb^"),
        }
    }

    /// Reads and counts whatever is waiting, without blocking.
    pub fn drain(&self, buf: &mut [u8]) -> u64 {
        let mut n = 0;
        if self.sock.set_nonblocking(true).is_ok() {
            while self.sock.recv(buf).is_ok() {
                n += 1;
            }
            let _ = self.sock.set_nonblocking(false);
        }
        n
    }

    /// Leaves: `quit`, or in verify mode the proven `^cookie^C^quit`
    /// (a cookie lasts 2-4 minutes; an older one is refused and the member
    /// simply expires).
    pub fn leave(&self) {
        let _ = match &self.proof {
            Some(p) => self.send(&[p.as_slice(), b"^quit"].concat()),
            None => self.send(b"quit"),
        };
    }
}
