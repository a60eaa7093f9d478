//! The blocking [`Client`]: a [`Session`] over a std `UdpSocket`,
//! connected to the relay. No threads of its own: heartbeats go out from
//! inside [`Client::recv`], [`Client::next_event`] and [`Client::tick`],
//! so a caller that calls one of them at least every
//! [`Client::heartbeat_interval`] stays alive (and proven, in verify mode).
//! `&self` everywhere: one thread may read while another sends.

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs, UdpSocket};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::error::ClientError;
use super::session::{Answer, Event, Session};
use crate::config::DEFAULT_MAX_DATAGRAM;
use crate::core::protocol;

/// How long to wait for an answer before asking again: a lost datagram
/// (a flood filling the relay's queue, a lossy link) costs this much, not
/// the whole wait.
pub const RETRY: Duration = Duration::from_millis(250);

/// How long the first steps (the timeout question, whether the lobby is
/// open) wait for an answer: silence there is not an error (an older
/// relay, or one not up yet), so it should not cost long.
pub const PROBE_WAIT: Duration = Duration::from_millis(500);

/// The most messages held for [`Client::recv`] that arrived while the
/// client waited for something else (a join's answer); beyond it the
/// oldest is dropped and counted in [`Client::dropped`].
pub const DEFAULT_QUEUE: usize = 1024;

/// The most notices ([`Event::Unreachable`], …) held for
/// [`Client::next_event`]; they are few, and only the latest matter.
const NOTICE_QUEUE: usize = 16;

/// The largest datagram a client reads (UDP over IPv4's largest payload).
const RECV_BUF: usize = 65_536;

/// How to connect: the room, its token, the heartbeat, the patience.
#[derive(Debug, Clone)]
pub struct Options {
    /// Join this room (`None`: stay in the lobby).
    pub room: Option<String>,
    /// The room's token (an HS256 JWT), for a relay with a room secret.
    pub token: Option<String>,
    /// The heartbeat interval (`None`: 5 s, 1 s in verify mode, a third of
    /// the relay's timeout if that is shorter).
    pub heartbeat: Option<Duration>,
    /// How long a join waits for the relay's answer.
    pub wait: Duration,
    /// The longest message [`Client::send`] sends (the relay's
    /// `--max-datagram`; it drops longer ones).
    pub max_datagram: usize,
    /// How many messages to hold while waiting for something else.
    pub queue: usize,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            room: None,
            token: None,
            heartbeat: None,
            wait: Duration::from_secs(2),
            max_datagram: DEFAULT_MAX_DATAGRAM,
            queue: DEFAULT_QUEUE,
        }
    }
}

impl Options {
    /// The lobby with defaults, in `room` (with `token`, if any).
    pub fn room(room: &str, token: Option<&str>) -> Options {
        Options {
            room: Some(room.to_string()),
            token: token.map(str::to_string),
            ..Options::default()
        }
    }
}

/// What became of the first datagram, the timeout question.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Probed {
    /// A udphub relay answered it (its timeout, or its cookie).
    Answered,
    /// A v1 relay relayed it as a message.
    Relayed,
}

/// What the client holds between calls, behind one lock.
#[derive(Debug)]
struct State {
    /// The protocol state.
    session: Session,
    /// Messages that arrived while the client waited for something else.
    inbox: VecDeque<Vec<u8>>,
    /// Notices for [`Client::next_event`] from inside the handshake.
    notices: VecDeque<Event>,
    /// Messages dropped because `inbox` was full.
    dropped: u64,
    /// The relay said `bye`: every later read says so.
    bye: bool,
    /// [`Client::close`] ran.
    closed: bool,
    /// The relay confirmed our membership during the handshake.
    confirmed: bool,
}

/// A member of a udphub relay, in the lobby or a room: asks the relay's
/// timeout, does verify mode's cookie handshake when the relay asks for
/// it, joins rooms, heartbeats below the relay's timeout, renews its
/// cookie, and leaves with a (proven) `quit` when closed or dropped.
///
/// See the [module docs](super) for an example.
#[derive(Debug)]
pub struct Client {
    /// Connected to the relay: the kernel drops datagrams from anyone else.
    sock: UdpSocket,
    /// The relay.
    relay: SocketAddr,
    /// How long a join waits for its answer.
    wait: Duration,
    /// The longest message sent.
    max_datagram: usize,
    /// The most messages held in the inbox.
    queue: usize,
    /// Everything that changes.
    state: Mutex<State>,
}

impl Client {
    /// Connects to the relay at `addr` (`"127.0.0.1:9999"`, `"[::1]:9999"`,
    /// `"relay.example:9999"`, a `SocketAddr`) and stays in the lobby.
    pub fn connect(addr: impl ToSocketAddrs) -> Result<Client, ClientError> {
        Client::connect_with(addr, &Options::default())
    }

    /// Connects and joins `options.room`, if any. Fails with
    /// [`ClientError::Refused`] (saying why) when the relay refuses the
    /// room, [`ClientError::LobbyClosed`] for the lobby of a relay that
    /// closed it, [`ClientError::NoAnswer`] when a join is never answered.
    /// Silence in the lobby is not an error (the relay may not be up
    /// yet): [`Client::next_event`] says [`Event::Unreachable`] then.
    pub fn connect_with(
        addr: impl ToSocketAddrs,
        options: &Options,
    ) -> Result<Client, ClientError> {
        let relay = resolve(addr)?;
        match (&options.room, &options.token) {
            (Some(room), _) => check_room(room)?,
            (None, Some(_)) => return Err(ClientError::TokenWithoutRoom),
            (None, None) => {}
        }
        let sock = UdpSocket::bind(local_for(relay.ip()))
            .map_err(|e| ClientError::io("bind the client's socket", e))?;
        sock.connect(relay)
            .map_err(|e| ClientError::io("connect to the relay", e))?;
        let mut session = Session::new(options.heartbeat, Instant::now());
        session.set_room(options.room.as_deref(), options.token.as_deref());
        let client = Client {
            sock,
            relay,
            wait: options.wait,
            max_datagram: options.max_datagram,
            queue: options.queue.max(1),
            state: Mutex::new(State {
                session,
                inbox: VecDeque::new(),
                notices: VecDeque::new(),
                dropped: 0,
                bye: false,
                closed: false,
                confirmed: false,
            }),
        };
        match client.handshake() {
            Ok(()) => Ok(client),
            Err(e) => {
                // Registered by the probe, perhaps: leave rather than
                // linger as a member nobody reads.
                client.close();
                Err(e)
            }
        }
    }

    /// The timeout question (or, in verify mode, the cookie), then the
    /// room or the lobby.
    fn handshake(&self) -> Result<(), ClientError> {
        let probe = self.lock().session.probe();
        let answer = self.ask(&|_| probe.clone(), PROBE_WAIT, |a| match a {
            Answer::Timeout(_) | Answer::Cookie(_) => Some(Probed::Answered),
            // A relay that does not know the question (the seeds', v1)
            // relays it, to us too: we are a member of its one room.
            Answer::Message(m) if m.starts_with(protocol::TIMEOUT_QUERY) => Some(Probed::Relayed),
            _ => None,
        })?;
        let room = self.lock().session.room().map(str::to_string);
        if answer == Some(Probed::Relayed) && room.is_none() {
            self.lock().confirmed = true;
            return Ok(());
        }
        match room {
            Some(room) => {
                self.join_asked(&room)?;
                self.lock().confirmed = true;
                Ok(())
            }
            None => {
                let told_timeout = {
                    let mut s = self.lock();
                    // The timeout question is a heartbeat: answered, it
                    // registered us.
                    s.confirmed = s.session.relay_timeout().is_some();
                    s.confirmed
                };
                // No timeout answer: verify mode, or a closed lobby (which
                // answers non-members nothing), or silence. A proven join
                // of the lobby registers us in verify mode and says
                // whether the lobby is open.
                if !told_timeout {
                    let open = self.ask(&|s| s.join(), PROBE_WAIT, |a| match a {
                        Answer::Denied(_) => Some(false),
                        Answer::Room(_) => Some(true),
                        _ => None,
                    })?;
                    if open == Some(false) {
                        return Err(ClientError::LobbyClosed(self.relay));
                    }
                    self.lock().confirmed = open == Some(true);
                    let register = self.lock().session.register();
                    if let (Some(r), None) = (register, open) {
                        self.send_raw(&r);
                    }
                }
                Ok(())
            }
        }
    }

    /// Joins `room` (empty: the lobby) with `token`, waiting for the
    /// relay's answer. On a refusal the client stays where it was, and
    /// the error says why.
    pub fn join(&self, room: &str, token: Option<&str>) -> Result<(), ClientError> {
        if !room.is_empty() {
            check_room(room)?;
        }
        let before = {
            let mut s = self.live()?;
            let before = (
                s.session.room().map(str::to_string),
                s.session.token().map(str::to_string),
            );
            s.session.set_room(Some(room), token);
            before
        };
        let result = self.join_asked(room);
        if result.is_err() {
            self.lock()
                .session
                .set_room(before.0.as_deref(), before.1.as_deref());
        }
        result
    }

    /// Sends the session's join of `room` until the relay answers it.
    fn join_asked(&self, room: &str) -> Result<(), ClientError> {
        let token = self.lock().session.token().map(str::to_string);
        let mut refused_by_kernel = false;
        let answer = self.ask_noting(
            &|s| s.join(),
            self.wait,
            &mut refused_by_kernel,
            |a| match a {
                Answer::Room(r) if *r == room.as_bytes() => Some(Ok(())),
                Answer::Denied(reason) => Some(Err(reason.to_vec())),
                _ => None,
            },
        )?;
        match answer {
            Some(Ok(())) => Ok(()),
            Some(Err(reason)) => Err(ClientError::refused(
                room,
                token.as_deref(),
                &reason,
                unix_now(),
            )),
            None if refused_by_kernel => Err(ClientError::NotListening(self.relay)),
            None => Err(ClientError::NoAnswer {
                relay: self.relay,
                room: room.to_string(),
                wait: self.wait,
            }),
        }
    }

    /// [`Client::ask_noting`], forgetting whether the kernel refused.
    fn ask<T>(
        &self,
        request: &dyn Fn(&Session) -> Vec<u8>,
        wait: Duration,
        understood: impl FnMut(&Answer<'_>) -> Option<T>,
    ) -> Result<Option<T>, ClientError> {
        let mut refused = false;
        self.ask_noting(request, wait, &mut refused, understood)
    }

    /// Sends `request` (made afresh each time, so a cookie that came
    /// meanwhile goes with it) every [`RETRY`] until `understood` makes
    /// something of an answer, for at most `wait`; `None` on silence.
    /// Messages that arrive meanwhile are queued; `bye` ends it.
    fn ask_noting<T>(
        &self,
        request: &dyn Fn(&Session) -> Vec<u8>,
        wait: Duration,
        refused: &mut bool,
        mut understood: impl FnMut(&Answer<'_>) -> Option<T>,
    ) -> Result<Option<T>, ClientError> {
        let deadline = Instant::now() + wait;
        let mut ask_at = Instant::now();
        let mut buf = vec![0u8; RECV_BUF];
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            if now >= ask_at {
                let datagram = request(&self.lock().session);
                self.send_raw(&datagram);
                ask_at = now + RETRY;
            }
            let left = deadline.min(ask_at).saturating_duration_since(now);
            self.sock
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .map_err(|e| ClientError::io("set a read timeout", e))?;
            match self.sock.recv(&mut buf) {
                Ok(n) => {
                    let data = &buf[..n];
                    let event = {
                        let mut s = self.lock();
                        s.session.heard();
                        let (event, _) = s.session.handle(Instant::now(), data);
                        match event {
                            Event::Bye => {
                                s.bye = true;
                                return Err(ClientError::RelayClosed(self.relay));
                            }
                            Event::HeartbeatLowered { .. } => {
                                s.notice(event);
                                None
                            }
                            Event::Message(m) => Some(m),
                            _ => None,
                        }
                    };
                    if let Some(t) = understood(&super::session::classify(data)) {
                        return Ok(Some(t));
                    }
                    if let Some(m) = event {
                        self.lock().queue_message(m, self.queue);
                    }
                }
                Err(e) if is_timeout(&e) => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    *refused = true;
                    let mut s = self.lock();
                    if let Some(event) = s.session.handle_unreachable() {
                        s.notice(event);
                    }
                }
                Err(e) => return Err(ClientError::io("receive from the relay", e)),
            }
        }
    }

    /// Sends one message to our room. Fails if it is longer than the
    /// relay accepts ([`Options::max_datagram`]) or the client is closed;
    /// "connection refused" from an earlier datagram is not an error
    /// (UDP promises nothing; [`Client::next_event`] reports it).
    pub fn send(&self, message: &[u8]) -> Result<(), ClientError> {
        if message.len() > self.max_datagram {
            return Err(ClientError::TooLong {
                len: message.len(),
                max: self.max_datagram,
            });
        }
        drop(self.live()?);
        self.send_raw(message);
        Ok(())
    }

    /// Sends a datagram as it is (a control word, or a message unchecked).
    fn send_raw(&self, data: &[u8]) {
        // An error here is an ICMP from an earlier datagram ("connection
        // refused") or a full buffer: the heartbeat keeps trying.
        let _ = self.sock.send(data);
    }

    /// The next message (as the relay rendered it, `--format`), or `None`
    /// after `timeout`. Heartbeats go out meanwhile. The relay's `bye` is
    /// the end of the stream: [`ClientError::RelayClosed`], on this call
    /// and every later one. A rejoin the relay refused later (after it
    /// restarted, say) is [`ClientError::Refused`].
    pub fn recv(&self, timeout: Duration) -> Result<Option<Vec<u8>>, ClientError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_event(left)? {
                None => return Ok(None),
                Some(Event::Message(m)) => return Ok(Some(m)),
                Some(Event::Bye) => return Err(ClientError::RelayClosed(self.relay)),
                Some(Event::Denied(reason)) => {
                    let s = self.lock();
                    let room = s.session.room().unwrap_or("").to_string();
                    let token = s.session.token().map(str::to_string);
                    return Err(ClientError::refused(
                        &room,
                        token.as_deref(),
                        reason.as_bytes(),
                        unix_now(),
                    ));
                }
                Some(_) => {}
            }
            if left.is_zero() {
                return Ok(None);
            }
        }
    }

    /// The next thing worth telling: a message, `bye` (once; then
    /// [`ClientError::RelayClosed`]), a refusal, a lowered heartbeat, the
    /// relay unreachable or reachable again; `None` after `timeout`.
    /// Heartbeats go out meanwhile, and cookies are renewed.
    pub fn next_event(&self, timeout: Duration) -> Result<Option<Event>, ClientError> {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; RECV_BUF];
        loop {
            let next_beat = {
                let mut s = self.live()?;
                if let Some(m) = s.inbox.pop_front() {
                    return Ok(Some(Event::Message(m)));
                }
                if let Some(n) = s.notices.pop_front() {
                    return Ok(Some(n));
                }
                if let Some(beat) = s.session.poll_transmit(Instant::now()) {
                    self.send_raw(&beat);
                }
                s.session.next_deadline()
            };
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            let left = deadline.min(next_beat).saturating_duration_since(now);
            self.sock
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .map_err(|e| ClientError::io("set a read timeout", e))?;
            match self.sock.recv(&mut buf) {
                Ok(n) => {
                    if let Some(event) = self.absorb(&buf[..n]) {
                        return Ok(Some(event));
                    }
                }
                Err(e) if is_timeout(&e) => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    if let Some(event) = self.lock().session.handle_unreachable() {
                        return Ok(Some(event));
                    }
                }
                Err(e) => return Err(ClientError::io("receive from the relay", e)),
            }
        }
    }

    /// Hands one datagram to the session, sends its answer, and says what
    /// the caller should hear of it.
    fn absorb(&self, data: &[u8]) -> Option<Event> {
        let mut s = self.lock();
        let again = s.session.heard();
        let (event, reply) = s.session.handle(Instant::now(), data);
        if let Some(r) = reply {
            self.send_raw(&r);
        }
        if event == Event::Bye {
            s.bye = true;
        }
        let event = match event {
            // The answer to a rejoin after a new cookie: nothing to say.
            Event::Handled | Event::Joined(_) => None,
            other => Some(other),
        };
        match (again, event) {
            (Some(again), Some(event)) => {
                s.notice(event);
                Some(again)
            }
            (again, event) => again.or(event),
        }
    }

    /// Without blocking: sends a heartbeat if one is due, and handles what
    /// has arrived (messages are kept for [`Client::recv`], notices for
    /// [`Client::next_event`]). For loops that drive many clients from one
    /// thread; it makes the socket nonblocking for a moment, so do not
    /// call it while another thread blocks in [`Client::recv`].
    pub fn tick(&self) -> Result<(), ClientError> {
        let mut buf = vec![0u8; RECV_BUF];
        if let Some(beat) = self.live()?.session.poll_transmit(Instant::now()) {
            self.send_raw(&beat);
        }
        self.sock
            .set_nonblocking(true)
            .map_err(|e| ClientError::io("make the socket nonblocking", e))?;
        let result = loop {
            match self.sock.recv(&mut buf) {
                Ok(n) => {
                    if let Some(event) = self.absorb(&buf[..n]) {
                        let mut s = self.lock();
                        match event {
                            Event::Message(m) => s.queue_message(m, self.queue),
                            other => s.notice(other),
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Ok(()),
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    let mut s = self.lock();
                    if let Some(event) = s.session.handle_unreachable() {
                        s.notice(event);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(ClientError::io("receive from the relay", e)),
            }
        };
        let _ = self.sock.set_nonblocking(false);
        result
    }

    /// Sends a heartbeat now (`^hb^`, or the proven `^cookie^C`), whether
    /// or not one is due.
    pub fn heartbeat(&self) -> Result<(), ClientError> {
        let beat = self.live()?.session.heartbeat();
        self.send_raw(&beat);
        Ok(())
    }

    /// Leaves the relay: `quit`, or in verify mode the proven
    /// `^cookie^C^quit` (renewing a cookie too old to prove it first).
    /// Later calls do nothing; dropping the client closes it.
    pub fn close(&self) {
        let stale = {
            let mut s = self.lock();
            if std::mem::replace(&mut s.closed, true) {
                return;
            }
            s.session.cookie_stale(Instant::now())
        };
        if stale {
            let hello = self.lock().session.hello();
            let _ = self.ask(&|_| hello.clone(), PROBE_WAIT, |a| {
                matches!(a, Answer::Cookie(_)).then_some(())
            });
        }
        let quit = self.lock().session.quit();
        self.send_raw(&quit);
    }

    /// The relay's address.
    pub fn relay_addr(&self) -> SocketAddr {
        self.relay
    }

    /// Our address, as the relay sees it (on this host).
    pub fn local_addr(&self) -> Result<SocketAddr, ClientError> {
        self.sock
            .local_addr()
            .map_err(|e| ClientError::io("read the socket's address", e))
    }

    /// Whether the relay runs in verify mode (we hold its cookie).
    pub fn verified(&self) -> bool {
        self.lock().session.verified()
    }

    /// Whether the relay confirmed our membership while connecting (it
    /// answered the timeout question, or our join). A lobby client that
    /// heard nothing is connected all the same (the relay may not be up
    /// yet) but not confirmed.
    pub fn confirmed(&self) -> bool {
        self.lock().confirmed
    }

    /// The relay's `--timeout`, if it said.
    pub fn relay_timeout(&self) -> Option<Duration> {
        self.lock().session.relay_timeout()
    }

    /// The room we are in (`None`: the lobby).
    pub fn room(&self) -> Option<String> {
        self.lock().session.room().map(str::to_string)
    }

    /// The interval between heartbeats, as now chosen: call
    /// [`Client::recv`], [`Client::next_event`] or [`Client::tick`] at
    /// least this often to stay alive.
    pub fn heartbeat_interval(&self) -> Duration {
        self.lock().session.heartbeat_every()
    }

    /// Control answers received so far (cookies, the timeout, rooms,
    /// refusals): the relay counts each as a delivery.
    pub fn answers(&self) -> u64 {
        self.lock().session.answers()
    }

    /// Messages dropped because the inbox was full.
    pub fn dropped(&self) -> u64 {
        self.lock().dropped
    }

    /// The next heartbeat datagram, without sending it (for a caller that
    /// sends on its own socket path).
    pub fn heartbeat_datagram(&self) -> Vec<u8> {
        self.lock().session.heartbeat()
    }

    /// The datagram that leaves (`quit` or `^cookie^C^quit`), without
    /// sending it.
    pub fn quit_datagram(&self) -> Vec<u8> {
        self.lock().session.quit()
    }

    /// The socket, connected to the relay, for a caller that reads or
    /// writes raw datagrams itself (a load generator). What it reads that
    /// way bypasses the session: a renewed cookie is missed, so keep to
    /// runs shorter than a cookie's two minutes or call [`Client::tick`].
    pub fn socket(&self) -> &UdpSocket {
        &self.sock
    }

    /// The state, for a moment. A poisoned lock (a panic elsewhere while
    /// holding it) still holds consistent data: every change is one
    /// assignment.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The state, or why the client can no longer be used.
    fn live(&self) -> Result<MutexGuard<'_, State>, ClientError> {
        let s = self.lock();
        if s.closed {
            return Err(ClientError::Closed);
        }
        if s.bye && s.inbox.is_empty() {
            return Err(ClientError::RelayClosed(self.relay));
        }
        Ok(s)
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.close();
    }
}

impl State {
    /// Keeps a message for later, dropping the oldest beyond `limit`.
    fn queue_message(&mut self, message: Vec<u8>, limit: usize) {
        if self.inbox.len() >= limit {
            self.inbox.pop_front();
            self.dropped += 1;
        }
        self.inbox.push_back(message);
    }

    /// Keeps a notice for [`Client::next_event`], dropping the oldest
    /// beyond [`NOTICE_QUEUE`].
    fn notice(&mut self, event: Event) {
        if self.notices.len() >= NOTICE_QUEUE {
            self.notices.pop_front();
        }
        self.notices.push_back(event);
    }
}

/// The relay's first address.
fn resolve(addr: impl ToSocketAddrs) -> Result<SocketAddr, ClientError> {
    addr.to_socket_addrs()
        .map_err(|e| {
            ClientError::Address(format!(
                "cannot resolve the relay's address: {e} (give IP:PORT, [IPv6]:PORT or host:port)"
            ))
        })?
        .next()
        .ok_or_else(|| ClientError::Address("the relay's address resolves to nothing".into()))
}

/// Where to bind for a relay at `ip`: the same loopback for a loopback
/// relay (nothing else needs to reach us), any address otherwise.
fn local_for(ip: IpAddr) -> SocketAddr {
    let local = match ip {
        IpAddr::V4(v4) if v4.is_loopback() => IpAddr::V4(v4),
        IpAddr::V6(v6) if v6.is_loopback() => IpAddr::V6(v6),
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    SocketAddr::new(local, 0)
}

/// A room name the relay accepts, or the error that says what one is.
fn check_room(room: &str) -> Result<(), ClientError> {
    if crate::core::rooms::valid_name(room.as_bytes()) {
        Ok(())
    } else {
        Err(ClientError::RoomName(room.to_string()))
    }
}

/// Whether a read error is only a timeout.
fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

/// Unix time in seconds, to read a refused token's claims against.
fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
