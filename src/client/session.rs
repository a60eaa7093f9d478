//! The client's protocol state without I/O: what to send and what a
//! datagram from the relay means. [`Session`] takes bytes and `now` and
//! returns datagrams to send and [`Event`]s; the blocking
//! [`Client`](super::Client) drives it over a socket, and so can any
//! other loop (a nonblocking one with many sessions on one thread).

use std::time::{Duration, Instant};

use crate::core::protocol;

/// Joins are padded to this, so that any refusal (`^denied^token` is 14
/// bytes) fits in the answer: the relay never answers with more bytes
/// than it got.
pub const JOIN_LEN: usize = protocol::TIMEOUT_QUERY_LEN;

/// The seeds' heartbeat: every 5 s against their 10 s timeout.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(5);

/// In verify mode the relay does not tell a member its timeout (a
/// member's `^timeout^` proves nothing and is ignored), so without an
/// asked-for interval a verified client heartbeats this often: 64 bytes a
/// second keeps it alive on any sane `--timeout`.
pub const VERIFIED_HEARTBEAT: Duration = Duration::from_secs(1);

/// A cookie is good for two to four minutes; one older than this is
/// renewed (`^hello^`) before it is used to leave.
pub const COOKIE_FRESH: Duration = Duration::from_secs(100);

/// What one datagram from the relay means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer<'a> {
    /// A message for us (as the relay rendered it).
    Message(&'a [u8]),
    /// `bye`: the relay is shutting down.
    Bye,
    /// `^cookie^C`: verify mode's proof of address (C, 22 base64url bytes).
    Cookie(&'a [u8]),
    /// `^timeout^MS`: the relay's `--timeout`.
    Timeout(Duration),
    /// `^room^ROOM`: we are in ROOM (empty: the lobby).
    Room(&'a [u8]),
    /// `^denied^REASON`: a join was refused.
    Denied(&'a [u8]),
}

/// Tells a relay's control answer from a message. Strict about forms, so
/// that a peer's text under `--format raw` that happens to start with
/// `^cookie^` is still a message.
pub fn classify(datagram: &[u8]) -> Answer<'_> {
    if datagram == protocol::BYE {
        return Answer::Bye;
    }
    if let Some(c) = datagram.strip_prefix(protocol::COOKIE) {
        if c.len() == 22
            && c.iter()
                .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
        {
            return Answer::Cookie(c);
        }
    }
    if let Some(t) = protocol::parse_timeout_answer(datagram) {
        return Answer::Timeout(t);
    }
    if let Some(room) = datagram.strip_prefix(protocol::ROOM_REPLY) {
        if room.is_empty() || crate::core::rooms::valid_name(room) {
            return Answer::Room(room);
        }
    }
    if let Some(reason) = datagram.strip_prefix(protocol::DENIED_REPLY) {
        if (1..=32).contains(&reason.len())
            && reason.iter().all(|b| b.is_ascii_lowercase() || *b == b'_')
        {
            return Answer::Denied(reason);
        }
    }
    Answer::Message(datagram)
}

/// What a session tells its driver, besides datagrams to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A message for the caller.
    Message(Vec<u8>),
    /// The relay said `bye`: the end of the stream.
    Bye,
    /// The relay said we are in this room (empty: the lobby).
    Joined(String),
    /// The relay refused a join with this reason (`token`, `full`, `name`).
    Denied(String),
    /// The relay's timeout is short: heartbeats now go out this often.
    HeartbeatLowered {
        /// The relay's `--timeout`.
        timeout: Duration,
        /// The heartbeat interval now.
        every: Duration,
    },
    /// The kernel said nothing listens at the relay's address (an ICMP
    /// port unreachable); heartbeats keep asking.
    Unreachable,
    /// The relay answers again after [`Event::Unreachable`].
    Reachable,
    /// A control answer the session handled by itself (a cookie, the
    /// timeout).
    Handled,
}

/// One client's protocol state: its room, token, cookie and heartbeat.
/// No socket and no clock: every method that needs the time takes `now`.
#[derive(Debug, Clone)]
pub struct Session {
    /// The room we are in or asked for (`None`: the lobby).
    room: Option<String>,
    /// Its token, if any.
    token: Option<String>,
    /// The interval the caller asked for, or `None` for "choose".
    heartbeat_wanted: Option<Duration>,
    /// Verify mode: the latest cookie, and when it came.
    cookie: Option<(Vec<u8>, Instant)>,
    /// The relay's `--timeout`, once it said.
    relay_timeout: Option<Duration>,
    /// Whether the relay has answered anything: until then we do not know
    /// whether it is in verify mode, so heartbeats ask again.
    answered: bool,
    /// The kernel said "connection refused" and nothing has come since.
    unreachable: bool,
    /// When the next heartbeat is due.
    next_beat: Instant,
    /// Control answers received (cookies, timeouts, rooms, refusals): a
    /// relay counts them as deliveries, so load tests want the number.
    answers: u64,
}

impl Session {
    /// A session for the lobby, heartbeating every `heartbeat` (`None`:
    /// choose: 5 s, less if the relay's timeout is short).
    pub fn new(heartbeat: Option<Duration>, now: Instant) -> Session {
        let mut s = Session {
            room: None,
            token: None,
            heartbeat_wanted: heartbeat.filter(|h| !h.is_zero()),
            cookie: None,
            relay_timeout: None,
            answered: false,
            unreachable: false,
            next_beat: now,
            answers: 0,
        };
        s.next_beat = now + s.heartbeat_every();
        s
    }

    /// The first datagram: `^timeout^` padded to 64 bytes. A udphub relay
    /// answers `^timeout^MS` (and registers us in the lobby), or in verify
    /// mode `^cookie^C` (registering nobody yet).
    pub fn probe(&self) -> Vec<u8> {
        padded(protocol::TIMEOUT_QUERY, protocol::HELLO_LEN)
    }

    /// Verify mode: asks for a fresh cookie (`^hello^` padded to 64 bytes).
    pub fn hello(&self) -> Vec<u8> {
        padded(protocol::HELLO, protocol::HELLO_LEN)
    }

    /// Sets the room (`None`: the lobby) and token that joins, rejoins
    /// after a new cookie and the proven heartbeat's answers are about.
    pub fn set_room(&mut self, room: Option<&str>, token: Option<&str>) {
        self.room = room.filter(|r| !r.is_empty()).map(str::to_string);
        self.token = token
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty());
    }

    /// The room asked for (`None`: the lobby).
    pub fn room(&self) -> Option<&str> {
        self.room.as_deref()
    }

    /// The token asked with.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// `^join^ROOM[^TOKEN]` for our room, or `^join^` for the lobby.
    fn join_suffix(&self) -> Vec<u8> {
        let mut out = protocol::JOIN.to_vec();
        if let Some(room) = &self.room {
            out.extend_from_slice(room.as_bytes());
            if let Some(t) = &self.token {
                out.push(b'^');
                out.extend_from_slice(t.as_bytes());
            }
        }
        out
    }

    /// `[^cookie^C]^join^ROOM[^TOKEN]` for our room (or the lobby),
    /// padded so that a refusal fits: to 32 bytes, or to 64 while the
    /// relay has not answered, so that one in verify mode answers with a
    /// cookie.
    pub fn join(&self) -> Vec<u8> {
        let len = if self.answered {
            JOIN_LEN
        } else {
            protocol::HELLO_LEN
        };
        padded(&[self.proof(), self.join_suffix()].concat(), len)
    }

    /// Verify mode, lobby: the bare proof `^cookie^C`, which registers us.
    pub fn register(&self) -> Option<Vec<u8>> {
        self.cookie.as_ref().map(|_| self.proof())
    }

    /// `^cookie^C`, or nothing outside verify mode.
    fn proof(&self) -> Vec<u8> {
        match &self.cookie {
            Some((c, _)) => [protocol::COOKIE, c].concat(),
            None => Vec::new(),
        }
    }

    /// The heartbeat: `^hb^`, or in verify mode `^cookie^C` padded to 64
    /// (only the cookie proves a member alive there; padded, so a relay
    /// that no longer knows it, or has a newer one, answers with a fresh
    /// cookie). While the relay has not answered, or is unreachable, the
    /// probe instead, so we hear as soon as it is there.
    pub fn heartbeat(&self) -> Vec<u8> {
        if self.cookie.is_some() {
            padded(&self.proof(), protocol::HELLO_LEN)
        } else if !self.answered || self.unreachable {
            self.probe()
        } else {
            protocol::HEARTBEAT.to_vec()
        }
    }

    /// Leaving: `quit`, or in verify mode the proven `^cookie^C^quit`.
    pub fn quit(&self) -> Vec<u8> {
        match &self.cookie {
            Some(_) => [self.proof().as_slice(), b"^quit"].concat(),
            None => protocol::QUIT.to_vec(),
        }
    }

    /// Whether the relay is in verify mode (we hold its cookie).
    pub fn verified(&self) -> bool {
        self.cookie.is_some()
    }

    /// Whether our cookie is too old to leave with (ask `^hello^` first).
    pub fn cookie_stale(&self, now: Instant) -> bool {
        self.cookie
            .as_ref()
            .is_some_and(|(_, at)| now.saturating_duration_since(*at) >= COOKIE_FRESH)
    }

    /// Whether the relay has answered anything yet.
    pub fn answered(&self) -> bool {
        self.answered
    }

    /// The relay's `--timeout`, if it said.
    pub fn relay_timeout(&self) -> Option<Duration> {
        self.relay_timeout
    }

    /// Control answers received so far.
    pub fn answers(&self) -> u64 {
        self.answers
    }

    /// The interval between heartbeats: asked-for, or 5 s (1 s in verify
    /// mode, where the relay does not say its timeout); lowered to a third
    /// of the relay's timeout when it is more than half of it, so one lost
    /// heartbeat never gets us expired.
    pub fn heartbeat_every(&self) -> Duration {
        let mut every = self.heartbeat_wanted.unwrap_or(
            if self.cookie.is_some() && self.relay_timeout.is_none() {
                VERIFIED_HEARTBEAT
            } else {
                DEFAULT_HEARTBEAT
            },
        );
        if let Some(t) = self.relay_timeout {
            if every > t / 2 {
                every = (t / 3).max(Duration::from_millis(10));
            }
        }
        every
    }

    /// When [`Session::poll_transmit`] next has something to send.
    pub fn next_deadline(&self) -> Instant {
        self.next_beat
    }

    /// The heartbeat, if one is due at `now`.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Vec<u8>> {
        if now < self.next_beat {
            return None;
        }
        self.next_beat = now + self.heartbeat_every();
        Some(self.heartbeat())
    }

    /// The kernel said "connection refused": nothing listens at the
    /// relay's address. [`Event::Unreachable`] the first time.
    pub fn handle_unreachable(&mut self) -> Option<Event> {
        (!std::mem::replace(&mut self.unreachable, true)).then_some(Event::Unreachable)
    }

    /// What `datagram` from the relay means at `now`, and what to answer
    /// it with, if anything. A cookie is kept and answered with the proof
    /// and our room's join: a renewed cookie or a relay that does not know
    /// us (it restarted, or expired us) both end with us proven and back in
    /// our room. (Call [`Session::heard`] first to learn whether the relay
    /// answers again after [`Event::Unreachable`].)
    pub fn handle(&mut self, now: Instant, datagram: &[u8]) -> (Event, Option<Vec<u8>>) {
        self.unreachable = false;
        let answer = classify(datagram);
        if !matches!(answer, Answer::Message(_) | Answer::Bye) {
            self.answers += 1;
        }
        let (event, reply) = match answer {
            Answer::Message(m) => (Event::Message(m.to_vec()), None),
            Answer::Bye => (Event::Bye, None),
            Answer::Cookie(c) => {
                self.answered = true;
                self.cookie = Some((c.to_vec(), now));
                // Verify mode heartbeats more often (the relay does not
                // say its timeout): from now, not from the first guess.
                self.next_beat = self.next_beat.min(now + self.heartbeat_every());
                // Proven at once, whether the cookie is the first, a
                // renewal, or the relay no longer knows us (it restarted,
                // or a NAT gave us a new port): in a room, a proven join
                // of it (of one's own room, answered with the room and
                // changing nothing); in the lobby, the bare proof (a
                // proven heartbeat, or a registration).
                let reply = if self.room.is_some() {
                    Some(self.join())
                } else {
                    self.register()
                };
                (Event::Handled, reply)
            }
            Answer::Timeout(t) => {
                self.answered = true;
                let before = self.heartbeat_every();
                self.relay_timeout = Some(t);
                let every = self.heartbeat_every();
                if every < before {
                    self.next_beat = self.next_beat.min(now + every);
                    (Event::HeartbeatLowered { timeout: t, every }, None)
                } else {
                    (Event::Handled, None)
                }
            }
            Answer::Room(r) => {
                self.answered = true;
                (Event::Joined(String::from_utf8_lossy(r).into_owned()), None)
            }
            Answer::Denied(reason) => {
                self.answered = true;
                (
                    Event::Denied(String::from_utf8_lossy(reason).into_owned()),
                    None,
                )
            }
        };
        (event, reply)
    }

    /// A datagram came from the relay: [`Event::Reachable`] if it had been
    /// unreachable. (Also cleared by [`Session::handle`].)
    pub fn heard(&mut self) -> Option<Event> {
        std::mem::replace(&mut self.unreachable, false).then_some(Event::Reachable)
    }
}

/// `data` with trailing spaces up to `len` bytes (the relay trims them).
pub fn padded(data: &[u8], len: usize) -> Vec<u8> {
    let mut out = data.to_vec();
    if out.len() < len {
        out.resize(len, b' ');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const C: &[u8] = b"AAAAAAAAAAAAAAAAAAAAAA";

    #[test]
    fn control_answers_are_told_from_messages() {
        assert_eq!(classify(b"bye"), Answer::Bye);
        assert_eq!(classify(&[b"^cookie^", C].concat()), Answer::Cookie(C));
        assert_eq!(
            classify(b"^cookie^short"),
            Answer::Message(b"^cookie^short")
        );
        assert_eq!(
            classify(b"^timeout^1500"),
            Answer::Timeout(Duration::from_millis(1500))
        );
        assert_eq!(classify(b"^room^red"), Answer::Room(b"red"));
        assert_eq!(classify(b"^room^"), Answer::Room(b""));
        assert_eq!(classify(b"^room^no way"), Answer::Message(b"^room^no way"));
        assert_eq!(classify(b"^denied^full"), Answer::Denied(b"full"));
        assert_eq!(
            classify(b"hi. from 1.2.3.4:5"),
            Answer::Message(b"hi. from 1.2.3.4:5")
        );
    }

    #[test]
    fn a_session_pads_proves_and_heartbeats_in_time() {
        let t0 = Instant::now();
        let mut s = Session::new(None, t0);
        assert_eq!(s.probe().len(), 64);
        assert_eq!(s.heartbeat(), s.probe(), "no answer yet: ask again");
        s.set_room(Some("red"), Some(" tok\n"));
        assert_eq!(s.join().trim_ascii(), b"^join^red^tok");
        let (event, reply) = s.handle(t0, &[b"^cookie^", C].concat());
        assert_eq!(event, Event::Handled);
        let reply = reply.unwrap();
        assert!(reply.len() >= JOIN_LEN);
        assert!(reply.starts_with(&[b"^cookie^", C, b"^join^red^tok"].concat()));
        assert_eq!(s.heartbeat().len(), 64);
        assert!(s.heartbeat().starts_with(b"^cookie^"));
        assert_eq!(s.heartbeat_every(), VERIFIED_HEARTBEAT);
        assert_eq!(
            s.next_deadline(),
            t0 + VERIFIED_HEARTBEAT,
            "the first proven heartbeat is not left on the lobby's 5 s"
        );
        assert_eq!(s.quit(), [b"^cookie^", C, b"^quit"].concat());
        assert!(!s.cookie_stale(t0));
        assert!(s.cookie_stale(t0 + COOKIE_FRESH));
        assert_eq!(s.answers(), 1);
    }

    #[test]
    fn a_short_relay_timeout_lowers_the_heartbeat_at_once() {
        let t0 = Instant::now();
        let mut s = Session::new(Some(Duration::from_secs(5)), t0);
        assert_eq!(s.poll_transmit(t0), None);
        let (event, _) = s.handle(t0, b"^timeout^600");
        assert_eq!(
            event,
            Event::HeartbeatLowered {
                timeout: Duration::from_millis(600),
                every: Duration::from_millis(200)
            }
        );
        assert_eq!(s.next_deadline(), t0 + Duration::from_millis(200));
        assert_eq!(
            s.poll_transmit(t0 + Duration::from_millis(200)).unwrap(),
            b"^hb^"
        );
        let (event, _) = s.handle(t0, b"^timeout^10000");
        assert_eq!(event, Event::Handled, "a long timeout changes nothing");
    }

    #[test]
    fn unreachable_is_said_once_and_cleared_by_an_answer() {
        let t0 = Instant::now();
        let mut s = Session::new(None, t0);
        assert_eq!(s.handle_unreachable(), Some(Event::Unreachable));
        assert_eq!(s.handle_unreachable(), None);
        assert_eq!(s.heartbeat(), s.probe());
        assert_eq!(s.heard(), Some(Event::Reachable));
        assert_eq!(s.heard(), None);
        s.handle(t0, b"^timeout^10000");
        assert_eq!(s.heartbeat(), b"^hb^");
    }
}
