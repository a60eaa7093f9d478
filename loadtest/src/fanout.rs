//! The `fanout` scenario: N clients register and heartbeat, S of them send
//! stamped messages (closed loop with a window, or open loop at a rate),
//! and every client counts what it receives.
//!
//! By default one thread, one mio poll over all client sockets: on a 2-core
//! machine the relay gets the other core. With `--threads N` the clients
//! are dealt over N workers ([`crate::workers`]), each an [`Engine`] of its
//! own; the report merges them and says when loadtest itself was the
//! bottleneck ([`crate::limits`]).

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use clap::Args;
use hdrhistogram::Histogram;
use mio::{Events, Interest, Poll, Token};

use crate::payload::{self, Stamp};
use crate::report::{
    Common, FanoutReport, Latency, LoadtestUsage, Progress, RelayUsage, TimelinePoint,
};
use crate::tracker::{Arrival, Stream};
use crate::{limits, metrics, procfs, workers};

/// `loadtest fanout` flags.
#[derive(Debug, Clone, Args)]
pub struct FanoutArgs {
    /// Shared flags.
    #[command(flatten)]
    pub common: Common,

    /// Clients (each its own socket), senders included
    #[arg(long, default_value_t = 64)]
    pub clients: usize,

    /// How many of the clients send
    #[arg(long, default_value_t = 1)]
    pub senders: usize,

    /// Message size in bytes (at least 46, the stamp)
    #[arg(long, default_value_t = 64, value_parser = parse_payload)]
    pub payload: usize,

    /// Open loop: total messages per second, whatever happens
    #[arg(long, conflicts_with = "window")]
    pub rate: Option<f64>,

    /// Closed loop: messages in flight per sender (the default mode, window 8)
    #[arg(long)]
    pub window: Option<u64>,

    /// Stop after this many messages (besides --duration)
    #[arg(long)]
    pub messages: Option<u64>,

    /// How often every client sends a heartbeat
    #[arg(long, default_value = "2s", value_parser = crate::duration::parse)]
    pub heartbeat: Duration,

    /// The relay does not echo to the sender (udphub --no-echo)
    #[arg(long)]
    pub no_echo: bool,

    /// How long to wait for every client to be registered (probe received)
    #[arg(long, default_value = "10s", value_parser = crate::duration::parse)]
    pub register_timeout: Duration,

    /// Spread the clients over this many rooms (client i joins room `r{i mod K}`,
    /// wire protocol v2) and check isolation: a delivery from another room is an error
    #[arg(long, value_name = "K", default_value_t = 0)]
    pub rooms: usize,

    /// The relay is in verify mode (udphub --verify-sources): each client
    /// asks for a cookie and registers (or joins) with it
    #[arg(long)]
    pub verify: bool,

    /// One more member of the lobby floods at this many datagrams/s while
    /// the clients run: what does a flooding member cost the others?
    #[arg(long, value_name = "RATE")]
    pub flood: Option<f64>,

    /// Receivers that never read: the relay's send capacity, deliveries
    /// counted by the kernel (/proc/net/snmp), with almost no receiver
    /// CPU. Needs --rate (set it above what the relay can fan out)
    #[arg(long, requires = "rate")]
    pub sink: bool,

    /// Worker threads, each with its own share of the clients (and of the
    /// senders), sockets and poll loop: `auto` is one per core. Past one
    /// core's worth of deliveries a single thread measures itself, not the relay
    #[arg(long, value_name = "N|auto", default_value = "1", value_parser = parse_threads, conflicts_with = "sink")]
    pub threads: usize,

    /// Pin worker thread t to the t-th core this process may run on
    /// (wrapping around), as `udphub --pin-threads` pins its loops
    #[arg(long, conflicts_with = "sink")]
    pub pin_threads: bool,

    /// With --rooms: put this before each room's name (`{P}r0`, `{P}r1`, …), so
    /// that concurrent runs against one relay (several load machines, one
    /// `loadtest merge`) keep to rooms of their own
    #[arg(long, value_name = "P", value_parser = parse_room_prefix)]
    pub room_prefix: Option<String>,
}

/// The most worker threads `--threads` takes.
const MAX_THREADS: usize = 256;

/// Parses `--threads`: a count from 1 to [`MAX_THREADS`], or `auto` (the
/// cores this process may run on).
pub fn parse_threads(s: &str) -> Result<usize, String> {
    if s.trim() == "auto" {
        return Ok(std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(MAX_THREADS));
    }
    match s.trim().parse::<usize>() {
        Ok(n) if (1..=MAX_THREADS).contains(&n) => Ok(n),
        _ => Err(format!(
            "{s:?} is not a thread count: use 1 to {MAX_THREADS}, or auto (one per core)"
        )),
    }
}

/// Parses `--room-prefix`: up to 16 letters, digits, `-` or `_` (room
/// names travel in every join).
pub fn parse_room_prefix(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 16
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!(
            "{s:?}: a room prefix is 1 to 16 letters, digits, '-' or '_' (e.g. m1-)"
        ))
    }
}

/// How the clients register with the relay.
#[derive(Debug, Clone, Default)]
pub struct Joining {
    /// The relay does not echo to the sender.
    pub no_echo: bool,
    /// Rooms to spread the clients over (0: the lobby).
    pub rooms: usize,
    /// The relay is in verify mode: register with cookies.
    pub verify: bool,
    /// Put before each room's name (`{prefix}r3`), so that concurrent runs
    /// against one relay keep to rooms of their own.
    pub room_prefix: String,
    /// This run's tag ([`run_tag`]), shared by its workers.
    pub run_tag: u16,
}

/// The most senders a run can have: a stamp's sender field carries the
/// run's tag in its upper 16 bits and the sender in the lower 16.
pub const MAX_SENDERS: usize = 0xffff;

/// A random tag for this run: its stamps carry it, so a delivery of
/// another (concurrent) loadtest run's message is told apart and counted
/// as such, never taken for one of ours.
pub fn run_tag() -> u16 {
    use std::io::Read;
    let mut b = [0u8; 2];
    match std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b)) {
        Ok(()) => u16::from_le_bytes(b),
        // Without /dev/urandom: the clock's nanoseconds and our pid.
        Err(_) => {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
            (t ^ std::process::id().rotate_left(16)) as u16
        }
    }
}

/// Which share of the clients an [`Engine`] owns: with `--threads N`,
/// worker `index` of `of` owns clients `index, index + of, index + 2 of, …`,
/// so senders and rooms spread over the workers.
#[derive(Debug, Clone, Copy)]
pub struct Part {
    /// This worker.
    pub index: usize,
    /// Workers in all.
    pub of: usize,
}

/// One client socket.
struct ClientSock {
    sock: mio::net::UdpSocket,
}

/// The live state of a fan-out run.
pub struct Engine {
    poll: Poll,
    events: Events,
    /// This engine's clients; local index `i` is client `ids[i]` of the run.
    clients: Vec<ClientSock>,
    /// Each local client's index in the whole run: the identity that rooms,
    /// relays and message stamps use (see [`Part`]).
    ids: Vec<usize>,
    /// Local indices of the clients that send (run index below `senders`).
    local_senders: Vec<usize>,
    /// Put before each room's name.
    room_prefix: String,
    /// This run's tag, in the upper 16 bits of every stamp's sender field.
    run_tag: u32,
    /// The relays; see [`Engine::node_of`].
    relays: Vec<SocketAddr>,
    /// The relay does not echo to the sender.
    no_echo: bool,
    /// Latency of deliveries between clients of one relay (several relays).
    pub latency_local: Histogram<u64>,
    /// Latency of deliveries that crossed from one relay to another.
    pub latency_cross: Histogram<u64>,
    /// Recipients per message (the largest, with rooms).
    expect: u64,
    /// Recipients of each sender's messages.
    expect_of: Vec<u64>,
    /// Rooms the clients are spread over (0: all in the lobby).
    rooms: usize,
    /// The relay is in verify mode: register with cookies.
    verify: bool,
    /// Verify mode: each client's latest cookie and when it came. Its
    /// heartbeats carry it (only the cookie proves a member alive), and a
    /// `^hello^` renews it before it ages out.
    cookies: Vec<Option<(Vec<u8>, Instant)>>,
    /// Senders in the whole run.
    senders: usize,
    /// `streams[local receiver * senders + sender]`.
    streams: Vec<Stream>,
    /// Messages sent, per sender of the run (only this engine's are non-zero).
    sent: Vec<u64>,
    /// Run start: the zero of every timestamp.
    start: Instant,
    /// New deliveries so far.
    pub delivered: u64,
    /// Duplicate deliveries.
    pub duplicates: u64,
    /// Reordered deliveries.
    pub reordered: u64,
    /// Datagrams that were not loadtest messages (e.g. relay notices).
    pub other: u64,
    /// Deliveries of a `--flood` member's datagrams.
    pub flood_deliveries: u64,
    /// The relay said `bye`.
    pub bye: bool,
    /// Registration probes sent (messages the relay counts too).
    pub probes_sent: u64,
    /// Probe copies received (deliveries the relay counts too).
    pub probe_deliveries: u64,
    /// Joins sent, with rooms (the relay counts them as `join`).
    pub joins_sent: u64,
    /// `^room^` answers received (deliveries the relay counts too).
    pub join_replies: u64,
    /// Deliveries from a sender in another room: isolation broken.
    pub cross_room: u64,
    /// Deliveries of another loadtest run's messages (a concurrent run in
    /// the same rooms).
    pub foreign: u64,
    /// Latency of every delivery.
    pub latency: Histogram<u64>,
    /// Latency since the last timeline point.
    interval_latency: Histogram<u64>,
    interval_delivered: u64,
    buf: Vec<u8>,
    out: Vec<u8>,
    payload: usize,
    /// Start of the current heartbeat round.
    round_start: Instant,
    /// Next client to heartbeat in this round.
    round_next: usize,
    heartbeat: Duration,
    /// Next of `local_senders` to send.
    next_sender: usize,
}

/// How old a cookie may get before a client asks for a fresh one with a
/// `^hello^`. The relay renews a cookie by itself, answering a proven
/// heartbeat that carries last epoch's cookie with a fresh one (kept when it
/// arrives); this is the fallback should those answers be lost (cookies last
/// two to four minutes).
const COOKIE_RENEW: Duration = Duration::from_secs(100);

impl Engine {
    /// Which relay client `id` (of the run) talks to: consecutive runs of
    /// `rooms` clients (one per room) go to one relay, so every room spans
    /// every relay.
    fn node_of(&self, id: usize) -> usize {
        (id / self.rooms.max(1)) % self.relays.len()
    }

    /// The relay local client `i` talks to.
    fn relay_of(&self, i: usize) -> SocketAddr {
        self.relays[self.node_of(self.ids[i])]
    }

    /// The room local client `i` is in (with rooms).
    fn room_of(&self, i: usize) -> usize {
        self.ids[i] % self.rooms.max(1)
    }

    /// Opens sockets for worker `part`'s share of the run's `clients`,
    /// next to the relay's address family, and registers them with a
    /// heartbeat each.
    pub fn new_part(
        relays: &[SocketAddr],
        clients: usize,
        part: Part,
        senders: usize,
        payload: usize,
        heartbeat: Duration,
        joining: Joining,
    ) -> io::Result<Engine> {
        let Joining {
            no_echo,
            rooms,
            verify,
            room_prefix,
            run_tag,
        } = joining;
        if senders > MAX_SENDERS {
            return Err(io::Error::other(format!(
                "--senders {senders}: at most {MAX_SENDERS}"
            )));
        }
        let ids: Vec<usize> = (part.index..clients).step_by(part.of.max(1)).collect();
        let poll = Poll::new()?;
        let relay = *relays
            .first()
            .ok_or_else(|| io::Error::other("no relay address"))?;
        let local: SocketAddr = if relay.is_ipv6() {
            "[::1]:0"
                .parse()
                .map_err(|_| io::Error::other("bad address"))?
        } else {
            "127.0.0.1:0"
                .parse()
                .map_err(|_| io::Error::other("bad address"))?
        };
        let mut socks = Vec::with_capacity(ids.len());
        for i in 0..ids.len() {
            let s = UdpSocket::bind(local)?;
            s.set_nonblocking(true)?;
            // Room for bursts of fan-out while this one thread is busy.
            let _ = socket2::SockRef::from(&s).set_recv_buffer_size(1 << 20);
            let mut sock = mio::net::UdpSocket::from_std(s);
            poll.registry()
                .register(&mut sock, Token(i), Interest::READABLE)?;
            socks.push(ClientSock { sock });
        }
        let senders = senders.clamp(1, clients.max(1));
        let expect_of: Vec<u64> = (0..senders)
            .map(|s| {
                let members = if rooms == 0 {
                    clients
                } else {
                    (0..clients).filter(|i| i % rooms == s % rooms).count()
                };
                (members as u64).saturating_sub(u64::from(no_echo))
            })
            .collect();
        let local_senders = (0..ids.len()).filter(|&i| ids[i] < senders).collect();
        let streams = vec![Stream::default(); ids.len() * senders];
        let mut e = Engine {
            poll,
            events: Events::with_capacity(1024),
            clients: socks,
            ids,
            local_senders,
            room_prefix,
            run_tag: u32::from(run_tag) << 16,
            relays: relays.to_vec(),
            no_echo,
            latency_local: crate::histogram::latency(),
            latency_cross: crate::histogram::latency(),
            expect: expect_of.iter().copied().max().unwrap_or(0),
            expect_of,
            rooms,
            verify,
            senders,
            streams,
            sent: vec![0; senders],
            start: Instant::now(),
            delivered: 0,
            duplicates: 0,
            reordered: 0,
            other: 0,
            flood_deliveries: 0,
            bye: false,
            probes_sent: 0,
            probe_deliveries: 0,
            joins_sent: 0,
            join_replies: 0,
            cross_room: 0,
            foreign: 0,
            latency: crate::histogram::latency(),
            interval_latency: crate::histogram::latency(),
            interval_delivered: 0,
            buf: vec![0; 65_536],
            out: Vec::with_capacity(payload),
            payload: payload.max(payload::HEADER_LEN),
            round_start: Instant::now(),
            round_next: 0,
            heartbeat,
            next_sender: 0,
            cookies: Vec::new(),
        };
        e.cookies = vec![None; e.clients.len()];
        e.register_all()?;
        Ok(e)
    }

    /// Recipients per message.
    pub fn expect(&self) -> u64 {
        self.expect
    }

    /// Messages sent so far, all senders.
    pub fn messages_sent(&self) -> u64 {
        self.sent.iter().sum()
    }

    /// Deliveries the messages sent so far call for.
    pub fn expected(&self) -> u64 {
        self.sent
            .iter()
            .zip(&self.expect_of)
            .map(|(sent, each)| sent * each)
            .sum()
    }

    /// How many clients must be seen registered before the run starts.
    pub fn registration_target(&self) -> u64 {
        if self.rooms == 0 {
            // Every client hears a lobby probe but (with --no-echo) its sender.
            (self.clients.len() as u64).saturating_sub(u64::from(self.no_echo))
        } else {
            self.clients.len() as u64
        }
    }

    /// Client `i`'s join, padded so that any answer fits.
    fn join_request(&self, i: usize) -> Vec<u8> {
        let mut j = format!("^join^{}r{}", self.room_prefix, self.room_of(i)).into_bytes();
        j.resize(32, b' ');
        j
    }

    /// Client `i`'s first datagram: a heartbeat, a join, or (verify mode)
    /// a 64-byte hello that the relay answers with a cookie.
    fn first_datagram(&self, i: usize) -> Vec<u8> {
        if self.verify {
            let mut hello = b"^hello^".to_vec();
            hello.resize(64, b' ');
            hello
        } else if self.rooms > 0 {
            self.join_request(i)
        } else {
            b"^hb^".to_vec()
        }
    }

    /// Verify mode: what client `i` sends with its cookie to register.
    fn proven(&self, i: usize, cookie: &[u8]) -> Vec<u8> {
        let mut d = [&b"^cookie^"[..], cookie].concat();
        if self.rooms > 0 {
            d.extend_from_slice(
                format!("^join^{}r{}", self.room_prefix, self.room_of(i)).as_bytes(),
            );
        }
        d
    }

    /// Every client leaves: `quit`, or in verify mode the proven
    /// `^cookie^C^quit` (an unproven one is ignored there), paced as
    /// registration is. Without it the relay keeps this run's clients for
    /// its `--timeout`, and a second run within it counts their deliveries
    /// as its own losses. Returns how many quits were sent.
    pub fn leave_all(&mut self) -> u64 {
        let mut sent = 0;
        for (n, c) in self.clients.iter().enumerate() {
            let quit = match (&self.cookies[n], self.verify) {
                (Some((cookie, _)), true) => [&b"^cookie^"[..], cookie, b"^quit"].concat(),
                _ => b"quit".to_vec(),
            };
            if send_retrying(&c.sock, &quit, self.relay_of(n)).is_ok() {
                sent += 1;
            }
            if n % 64 == 63 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        sent
    }

    /// The first heartbeat of every client, paced (64 per millisecond) so
    /// that a relay with a small receive buffer isn't flooded into
    /// dropping the same late-comers every time.
    fn register_all(&mut self) -> io::Result<()> {
        for (n, c) in self.clients.iter().enumerate() {
            send_retrying(&c.sock, &self.first_datagram(n), self.relay_of(n))?;
            if self.rooms > 0 || self.verify {
                self.joins_sent += 1;
            }
            if n % 64 == 63 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        self.round_start = Instant::now();
        self.round_next = 0;
        Ok(())
    }

    /// Client `i`'s heartbeat: `^hb^`, or in verify mode `^cookie^C` (the
    /// member's proof of life, which keeps it in its room, and which the
    /// relay answers with a fresh cookie when it is due), or a 64-byte
    /// `^hello^` if no fresh cookie came for [`COOKIE_RENEW`].
    fn heartbeat_of(&self, i: usize) -> Vec<u8> {
        if !self.verify {
            return b"^hb^".to_vec();
        }
        match &self.cookies[i] {
            Some((cookie, at)) if at.elapsed() < COOKIE_RENEW => {
                [&b"^cookie^"[..], cookie].concat()
            }
            _ => crate::member::hello(),
        }
    }

    /// Verify mode: keeps a cookie the relay sent client `i`.
    fn keep_cookie(&mut self, i: usize, cookie: &[u8]) {
        if let Some(slot) = self.cookies.get_mut(i) {
            *slot = Some((cookie.to_vec(), Instant::now()));
        }
    }

    /// Heartbeats spread evenly over each interval: the clients whose turn
    /// has come since the last call.
    fn heartbeat_due(&mut self) -> io::Result<()> {
        let n = self.clients.len();
        let elapsed = self.round_start.elapsed();
        let due = if elapsed >= self.heartbeat {
            n
        } else {
            (n as f64 * elapsed.as_secs_f64() / self.heartbeat.as_secs_f64().max(1e-9)) as usize
        };
        while self.round_next < due.min(n) {
            let i = self.round_next;
            let beat = self.heartbeat_of(i);
            send_retrying(&self.clients[i].sock, &beat, self.relay_of(i))?;
            self.round_next += 1;
        }
        if self.round_next >= n {
            self.round_start += self.heartbeat.max(Duration::from_millis(1));
            self.round_next = 0;
        }
        Ok(())
    }

    /// Sends the probe until every client has received one (the relay
    /// knows them all), or `limit` passes. Returns how many got it.
    pub fn wait_registered(&mut self, limit: Duration) -> io::Result<u64> {
        let deadline = Instant::now() + limit;
        let mut got = vec![false; self.clients.len()];
        let mut cookie_got = vec![false; self.clients.len()];
        let mut count = 0u64;
        let need = self.registration_target();
        let mut next_probe =
            Instant::now() + Duration::from_millis(300 * u64::from(self.rooms > 0));
        while count < need && Instant::now() < deadline {
            if Instant::now() >= next_probe {
                if self.verify {
                    // Ask again for a cookie for those without one yet.
                    for i in (0..self.clients.len()).filter(|&i| !cookie_got[i]) {
                        send_retrying(
                            &self.clients[i].sock,
                            &self.first_datagram(i),
                            self.relay_of(i),
                        )?;
                        self.joins_sent += 1;
                    }
                }
                if self.rooms == 0 && (!self.verify || cookie_got[0]) {
                    send_retrying(&self.clients[0].sock, b"loadtest probe", self.relay_of(0))?;
                    self.probes_sent += 1;
                } else if self.rooms > 0 && !self.verify {
                    // With rooms each client's own `^room^` answer shows it
                    // registered: ask again for those still unanswered.
                    for i in (0..self.clients.len()).filter(|&i| !got[i]) {
                        send_retrying(
                            &self.clients[i].sock,
                            &self.join_request(i),
                            self.relay_of(i),
                        )?;
                        self.joins_sent += 1;
                    }
                }
                next_probe = Instant::now() + Duration::from_millis(300);
            }
            self.poll
                .poll(&mut self.events, Some(Duration::from_millis(20)))?;
            let ready: Vec<usize> = self.events.iter().map(|e| e.token().0).collect();
            for i in ready {
                while let Ok((n, _)) = self.clients[i].sock.recv_from(&mut self.buf) {
                    let answer = &self.buf[..n];
                    if let Some(cookie) = answer.strip_prefix(b"^cookie^") {
                        self.join_replies += 1;
                        let cookie = cookie.to_vec();
                        self.keep_cookie(i, &cookie);
                        if !cookie_got[i] {
                            cookie_got[i] = true;
                            let proven = self.proven(i, &cookie);
                            send_retrying(&self.clients[i].sock, &proven, self.relay_of(i))?;
                            self.joins_sent += 1;
                        }
                        continue;
                    }
                    let registered = if answer.starts_with(b"^room^") {
                        self.join_replies += 1;
                        true
                    } else if answer.starts_with(b"loadtest probe") {
                        self.probe_deliveries += 1;
                        true
                    } else {
                        false
                    };
                    if registered && !got[i] {
                        got[i] = true;
                        count += 1;
                    }
                }
            }
        }
        // Let stragglers' extra probe copies drain before measuring.
        self.start = Instant::now();
        Ok(count)
    }

    /// Several relays (a cluster): a relay learns that another has members
    /// of a room only when that one's subscription reaches the bus, a
    /// moment after the join. Sends a probe into every room, every 100 ms,
    /// until every client has heard its room's; returns whether all did
    /// within `limit`. Probes count as messages and their copies as
    /// deliveries, as the relays count them.
    pub fn wait_spanning(&mut self, limit: Duration) -> io::Result<bool> {
        let n = self.clients.len();
        // This engine's members of each room; the first of them probes it.
        let mut members: Vec<Vec<usize>> = vec![Vec::new(); self.rooms.max(1)];
        for i in 0..n {
            members[self.room_of(i)].push(i);
        }
        members.retain(|m| !m.is_empty());
        let deadline = Instant::now() + limit;
        let mut got = vec![false; n];
        if self.no_echo {
            // A probe's sender never hears it.
            for m in &members {
                got[m[0]] = true;
            }
        }
        let mut next = Instant::now();
        let mut all = false;
        while Instant::now() < deadline {
            if got.iter().all(|&g| g) {
                all = true;
                break;
            }
            if Instant::now() >= next {
                for m in &members {
                    if m.iter().any(|&i| !got[i]) {
                        let p = m[0];
                        send_retrying(&self.clients[p].sock, b"loadtest probe", self.relay_of(p))?;
                        self.probes_sent += 1;
                    }
                }
                next = Instant::now() + Duration::from_millis(100);
            }
            self.collect_probes(&mut got)?;
        }
        // The last probes' copies, before measuring.
        let settle = Instant::now() + Duration::from_millis(300);
        while Instant::now() < settle {
            self.collect_probes(&mut got)?;
        }
        self.start = Instant::now();
        Ok(all)
    }

    fn collect_probes(&mut self, got: &mut [bool]) -> io::Result<()> {
        self.poll
            .poll(&mut self.events, Some(Duration::from_millis(20)))?;
        let ready: Vec<usize> = self.events.iter().map(|e| e.token().0).collect();
        for i in ready {
            while let Ok((n, _)) = self.clients[i].sock.recv_from(&mut self.buf) {
                let data = &self.buf[..n];
                if data.starts_with(b"loadtest probe") {
                    self.probe_deliveries += 1;
                    got[i] = true;
                } else if let Some(cookie) = data.strip_prefix(b"^cookie^") {
                    self.join_replies += 1;
                    let cookie = cookie.to_vec();
                    self.keep_cookie(i, &cookie);
                } else if data.starts_with(b"^room^") {
                    self.join_replies += 1;
                } else {
                    self.other += 1;
                }
            }
        }
        Ok(())
    }

    /// Sends the next message, from the next sender in turn.
    pub fn send_one(&mut self) -> io::Result<()> {
        let Some(&local) = self.local_senders.get(self.next_sender) else {
            // No sender among this engine's clients.
            return Ok(());
        };
        self.next_sender = (self.next_sender + 1) % self.local_senders.len();
        let sender = self.ids[local];
        let stamp = Stamp {
            sender: self.run_tag | sender as u32,
            seq: self.sent[sender],
            sent_ns: self.start.elapsed().as_nanos() as u64,
        };
        payload::encode(&mut self.out, stamp, self.payload);
        send_retrying(&self.clients[local].sock, &self.out, self.relay_of(local))?;
        self.sent[sender] += 1;
        Ok(())
    }

    /// Heartbeats when due; polls for up to `wait` and counts arrivals.
    pub fn step(&mut self, wait: Duration) -> io::Result<()> {
        self.heartbeat_due()?;
        match self.poll.poll(&mut self.events, Some(wait)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
            Err(e) => return Err(e),
        }
        let ready: Vec<usize> = self.events.iter().map(|e| e.token().0).collect();
        for receiver in ready {
            loop {
                let n = match self.clients[receiver].sock.recv_from(&mut self.buf) {
                    Ok((n, _)) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    // ICMP errors surface here; they are not deliveries.
                    Err(_) => break,
                };
                self.arrive(receiver, n);
            }
        }
        Ok(())
    }

    fn arrive(&mut self, receiver: usize, n: usize) {
        let data = &self.buf[..n];
        let Some(stamp) = payload::decode(data) else {
            if data == b"bye" {
                self.bye = true;
            }
            if data.starts_with(b"loadtest probe") {
                // A late copy of a registration probe.
                self.probe_deliveries += 1;
                return;
            }
            let flood = crate::flood::FLOOD_PAYLOAD;
            if data.windows(flood.len()).any(|w| w == flood) {
                self.flood_deliveries += 1;
                return;
            }
            if let Some(cookie) = data.strip_prefix(b"^cookie^") {
                // A renewed cookie, or a late answer to a repeated hello.
                self.join_replies += 1;
                let cookie = cookie.to_vec();
                self.keep_cookie(receiver, &cookie);
                return;
            }
            if data.starts_with(b"^room^") {
                // A late answer to a repeated join.
                self.join_replies += 1;
                return;
            }
            self.other += 1;
            return;
        };
        if stamp.sender & 0xffff_0000 != self.run_tag {
            // Another run's message: counted, never taken for ours.
            self.foreign += 1;
            return;
        }
        let sender = (stamp.sender & 0xffff) as usize;
        if sender >= self.senders {
            self.other += 1;
            return;
        }
        if self.rooms > 0 && self.room_of(receiver) != sender % self.rooms {
            self.cross_room += 1;
            return;
        }
        match self.streams[receiver * self.senders + sender].arrive(stamp.seq) {
            Arrival::Duplicate => {
                self.duplicates += 1;
                return;
            }
            Arrival::Reordered | Arrival::TooOld => self.reordered += 1,
            Arrival::New => {}
        }
        self.delivered += 1;
        self.interval_delivered += 1;
        let now = self.start.elapsed().as_nanos() as u64;
        let latency = now.saturating_sub(stamp.sent_ns).max(1_000);
        let _ = self.latency.record(latency);
        let _ = self.interval_latency.record(latency);
        if self.relays.len() > 1 {
            let _ = if self.node_of(self.ids[receiver]) == self.node_of(sender) {
                self.latency_local.record(latency)
            } else {
                self.latency_cross.record(latency)
            };
        }
    }

    /// Nanoseconds since the run's start.
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// Sets the zero of every timestamp: the workers of one run share it,
    /// as a message stamped by one is timed by another.
    pub fn set_start(&mut self, start: Instant) {
        self.start = start;
    }

    /// How many of the run's senders are this engine's.
    pub fn local_senders(&self) -> usize {
        self.local_senders.len()
    }

    /// This engine's share of `--messages` (`u64::MAX`: none): sender `s`
    /// of `S` sends `m / S` of them, the first `m % S` senders one more.
    pub fn share_of(&self, messages: u64) -> u64 {
        if messages == u64::MAX {
            return u64::MAX;
        }
        let n = self.senders as u64;
        self.local_senders
            .iter()
            .map(|&i| messages / n + u64::from((self.ids[i] as u64) < messages % n))
            .sum()
    }

    /// Closes the current timeline interval: its new deliveries and their
    /// latencies (for the main thread to merge with the other workers').
    pub fn take_interval(&mut self) -> (u64, Histogram<u64>) {
        let h = self.interval_latency.clone();
        self.interval_latency.reset();
        (std::mem::take(&mut self.interval_delivered), h)
    }

    /// The local ports of this engine's client sockets (to find their
    /// receive-buffer drops in `/proc/net/udp`).
    pub fn local_ports(&self) -> Vec<u16> {
        self.clients
            .iter()
            .filter_map(|c| c.sock.local_addr().ok())
            .map(|a| a.port())
            .collect()
    }
}

/// Sends, retrying a full buffer briefly (bounded) rather than losing the
/// datagram on our side, which would be counted as the relay's loss.
fn send_retrying(sock: &mio::net::UdpSocket, data: &[u8], to: SocketAddr) -> io::Result<()> {
    for _ in 0..1000 {
        match sock.send_to(data, to) {
            Ok(_) => return Ok(()),
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.raw_os_error() == Some(libc::ENOBUFS) =>
            {
                std::thread::sleep(Duration::from_micros(50));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::WouldBlock,
        "send buffer stayed full",
    ))
}

/// Parses `--payload`, refusing a size too small for the stamp every
/// message carries (rather than silently sending more than asked).
pub fn parse_payload(s: &str) -> Result<usize, String> {
    let payload: usize = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number of bytes"))?;
    if payload < payload::HEADER_LEN {
        return Err(format!(
            "{payload} is smaller than the {} bytes of stamp (sequence, time, sender) every message carries; use {} or more",
            payload::HEADER_LEN,
            payload::HEADER_LEN
        ));
    }
    Ok(payload)
}

/// With `--metrics-url`, after the quits: waits (bounded by `limit`,
/// polling the relay's gauge) until `udphub_clients` is back where it was
/// before the run; returns how many of ours it still has then, if any
/// (`None` when it is back, or cannot be read).
pub(crate) fn wait_left(
    c: &crate::report::Common,
    before: &Option<metrics::Scrape>,
    limit: Duration,
) -> Option<u64> {
    let base = before.as_ref().map_or(0.0, |b| b.get("udphub_clients"));
    let deadline = Instant::now() + limit;
    loop {
        let now = c.scrape_optional().ok().flatten()?.get("udphub_clients");
        if now <= base {
            return None;
        }
        if Instant::now() >= deadline {
            return Some((now - base) as u64);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs the scenario and reports.
pub fn run(args: &FanoutArgs) -> Result<FanoutReport, String> {
    let c = &args.common;
    let relays = c.relay_addrs()?;
    let relay = relays[0];
    if args.clients == 0 {
        return Err("--clients must be at least 1".into());
    }
    let threads = args.threads.min(args.clients);
    if args.room_prefix.is_some() && args.rooms == 0 {
        return Err("--room-prefix names rooms: add --rooms K".into());
    }
    let before = c.scrape_optional()?;
    if let Some(before) = &before {
        crate::report::warn_occupied(
            before,
            "their share of the fan-out shows up here as relay deliveries \"lost after the relay\"",
        );
    }
    // One engine per worker, registered one after the other (a worker's
    // clients hear the later workers' probes: counted as probe copies).
    let tag = run_tag();
    let mut engines = Vec::with_capacity(threads);
    for index in 0..threads {
        let mut e = Engine::new_part(
            &relays,
            args.clients,
            Part { index, of: threads },
            args.senders,
            args.payload,
            args.heartbeat,
            Joining {
                no_echo: args.no_echo,
                rooms: args.rooms,
                verify: args.verify,
                room_prefix: args.room_prefix.clone().unwrap_or_default(),
                run_tag: tag,
            },
        )
        .map_err(|e| format!("open client sockets: {e}"))?;
        let registered = e
            .wait_registered(args.register_timeout)
            .map_err(|e| e.to_string())?;
        if registered < e.registration_target() {
            let what = if args.rooms > 0 {
                "got an answer to their ^join^ (does the relay know rooms?)"
            } else {
                "received the probe"
            };
            return Err(format!(
                "only {registered} of {} clients {what}: is the relay at {relay} running (and --no-echo right)?",
                e.registration_target()
            ));
        }
        engines.push(e);
    }
    for e in engines.iter_mut().filter(|_| relays.len() > 1) {
        if !e
            .wait_spanning(args.register_timeout)
            .map_err(|e| e.to_string())?
        {
            return Err(format!(
                "the rooms never spanned the {} relays within {:?}: are they in one cluster (udphub --cluster, same --cluster-name)?",
                relays.len(),
                args.register_timeout
            ));
        }
    }
    let window = args.window.unwrap_or(8);
    let mode = match args.rate {
        Some(r) => format!("open loop, {r} msgs/s"),
        None => format!("closed loop, window {window}"),
    };
    let flood = match args.flood {
        Some(rate) => Some(crate::flood::Flood::start(relay, rate, args.verify)?),
        None => None,
    };
    let cpu0 = c.relay_pid.and_then(procfs::cpu_seconds);
    let own_cpu0 = procfs::cpu_seconds(std::process::id());
    let ports: Vec<u16> = engines.iter().flat_map(|e| e.local_ports()).collect();
    let queues0 = procfs::socket_queues(&ports, relay.is_ipv6());
    let progress = Progress::new(c, c.duration);
    let interval = Duration::from_millis(if c.duration < Duration::from_secs(5) {
        100
    } else {
        500
    });
    let plan = workers::Plan {
        rate: args.rate,
        window,
        per_message: engines[0].expect(),
        senders: engines[0].senders as u64,
        send_until: c.duration,
        max_messages: args.messages.unwrap_or(u64::MAX),
        interval,
        flood: flood.is_some(),
        drain: Duration::from_secs(1),
        pin: args.pin_threads,
    };
    let start = Instant::now();
    for e in &mut engines {
        e.set_start(start);
    }
    let shared = workers::Shared::new(threads);
    let mut timeline = Timeline::new(threads, interval);
    let mut flood_end = None;
    let finished = workers::run_all(
        engines,
        &plan,
        &shared,
        |iv| {
            if let Some(t) = timeline.add(iv) {
                progress.tick(t, shared.delivered());
            }
        },
        |_| {},
        || flood_end = flood.map(|f| f.finish()),
    );
    let mut finished = finished?;
    let flood = flood_end.transpose()?;
    progress.finish();
    let own_cpu1 = procfs::cpu_seconds(std::process::id());
    let queues1 = procfs::socket_queues(&ports, relay.is_ipv6());
    let cpu1 = c.relay_pid.and_then(procfs::cpu_seconds);
    if c.metrics_url.is_some() {
        // The relay publishes its counters after each batch; let the last
        // batch's flush land before reading them.
        std::thread::sleep(Duration::from_millis(100));
    }
    let after = c.scrape_optional()?;
    // After the last scrape (quits are the relay's datagrams too, and are
    // no part of the run): leave the relay as we found it.
    let quits_sent: u64 = finished.iter_mut().map(|f| f.engine.leave_all()).sum();
    let left = c
        .metrics_url
        .as_ref()
        .and_then(|_| wait_left(c, &before, Duration::from_secs(2)));
    let sending_time = finished
        .iter()
        .map(|f| f.sending_time)
        .max()
        .unwrap_or_default();
    let secs = sending_time.as_secs_f64().max(1e-9);
    let delivered_while_sending: u64 = finished.iter().map(|f| f.delivered_while_sending).sum();
    let t = Totals::of(&finished);
    let e0 = &finished[0].engine;
    let relay_usage = c.relay_pid.map(|pid| {
        let cpu = match (cpu0, cpu1) {
            (Some(a), Some(b)) => Some(b - a),
            _ => None,
        };
        RelayUsage {
            pid,
            cpu_seconds: cpu,
            cpu_ns_per_delivery: cpu.map(|s| s * 1e9 / t.delivered.max(1) as f64),
            rss_bytes: procfs::rss_bytes(pid),
        }
    });
    let delta = match (&before, &after) {
        (Some(b), Some(a)) => Some(metrics::Scrape::delta(b, a)),
        _ => None,
    };
    let flood = flood.map(|mut f| {
        f.deliveries_to_others = t.flood_deliveries;
        f.relay_rate_limited = delta
            .as_ref()
            .map(|d| d.get("udphub_dropped_total{reason=\"rate_limited\"}"));
        f
    });
    let metrics_check = delta.as_ref().map(|d| {
        crate::report::MetricsCheck::new(
            d,
            t.messages_sent + t.probes_sent,
            t.delivered
                + t.duplicates
                + t.probe_deliveries
                + t.join_replies
                + t.flood_deliveries
                + t.foreign
                + flood.as_ref().map_or(0, |f| f.received),
        )
    });
    let own_cpu = match (own_cpu0, own_cpu1) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let usage = LoadtestUsage {
        threads,
        cpu_seconds: own_cpu,
        cpu_ns_per_delivery: own_cpu.map(|s| s * 1e9 / t.delivered.max(1) as f64),
        thread_busy: finished.iter().filter_map(|f| f.busy).collect(),
        thread_waiting: finished.iter().filter_map(|f| f.waiting).collect(),
        socket_drops: match (queues0, queues1) {
            (Some(a), Some(b)) => Some(b.drops.saturating_sub(a.drops)),
            _ => None,
        },
        socket_backlog_bytes: queues1.map(|q| q.rx_queue_bytes),
        rate_reached: args.rate.map(|_| t.messages_sent as f64 / secs),
    };
    let scheduled = args
        .rate
        .map(|r| ((r * secs) as u64).min(plan.max_messages));
    let limited = limits::judge(
        &usage,
        args.rate,
        scheduled,
        t.messages_sent,
        t.bye,
        t.expected.saturating_sub(t.delivered),
    );
    Ok(FanoutReport {
        scenario: "fanout".into(),
        relay: c.relay.clone(),
        clients: args.clients,
        senders: e0.senders,
        payload_bytes: args.payload,
        mode,
        seconds: secs,
        messages_sent: t.messages_sent,
        deliveries_expected: t.expected,
        deliveries: t.delivered,
        lost: t.expected.saturating_sub(t.delivered),
        loss_ratio: if t.expected == 0 {
            0.0
        } else {
            t.expected.saturating_sub(t.delivered) as f64 / t.expected as f64
        },
        duplicates: t.duplicates,
        reordered: t.reordered,
        rooms: args.rooms,
        cross_room_deliveries: t.cross_room,
        foreign_deliveries: t.foreign,
        latency_local_us: (relays.len() > 1).then(|| Latency::from(&t.latency_local)),
        latency_cross_node_us: (relays.len() > 1).then(|| Latency::from(&t.latency_cross)),
        messages_per_s: t.messages_sent as f64 / secs,
        deliveries_per_s: delivered_while_sending as f64 / secs,
        latency_us: Latency::from(&t.latency),
        relay_said_bye: t.bye,
        quits_sent,
        clients_left_behind: left,
        relay_usage,
        metrics_check,
        timeline: timeline.points,
        flood,
        latency_histogram: Some(crate::histogram::encode(&t.latency)?),
        loadtest: Some(usage),
        loadtest_limited: limited,
        merged_from: Vec::new(),
    })
}

/// The workers' counters, summed; their latency histograms, merged.
struct Totals {
    messages_sent: u64,
    probes_sent: u64,
    expected: u64,
    delivered: u64,
    duplicates: u64,
    reordered: u64,
    cross_room: u64,
    foreign: u64,
    probe_deliveries: u64,
    join_replies: u64,
    flood_deliveries: u64,
    bye: bool,
    latency: Histogram<u64>,
    latency_local: Histogram<u64>,
    latency_cross: Histogram<u64>,
}

impl Totals {
    fn of(finished: &[workers::Finished]) -> Totals {
        let mut t = Totals {
            messages_sent: 0,
            probes_sent: 0,
            expected: 0,
            delivered: 0,
            duplicates: 0,
            reordered: 0,
            cross_room: 0,
            foreign: 0,
            probe_deliveries: 0,
            join_replies: 0,
            flood_deliveries: 0,
            bye: false,
            latency: crate::histogram::latency(),
            latency_local: crate::histogram::latency(),
            latency_cross: crate::histogram::latency(),
        };
        for e in finished.iter().map(|f| &f.engine) {
            t.messages_sent += e.messages_sent();
            t.probes_sent += e.probes_sent;
            t.expected += e.expected();
            t.delivered += e.delivered;
            t.duplicates += e.duplicates;
            t.reordered += e.reordered;
            t.cross_room += e.cross_room;
            t.foreign += e.foreign;
            t.probe_deliveries += e.probe_deliveries;
            t.join_replies += e.join_replies;
            t.flood_deliveries += e.flood_deliveries;
            t.bye |= e.bye;
            // Same bounds on every worker: adding cannot fail.
            let _ = t.latency.add(&e.latency);
            let _ = t.latency_local.add(&e.latency_local);
            let _ = t.latency_cross.add(&e.latency_cross);
        }
        t
    }
}

/// The timeline, from the workers' intervals: a point once every worker
/// has closed that interval (the deliveries summed, the latencies merged).
struct Timeline {
    workers: usize,
    interval: Duration,
    /// Intervals some workers have closed: how many, the latest close,
    /// the deliveries and latencies so far. Bounded by the workers' skew
    /// (a few intervals).
    open: std::collections::BTreeMap<u64, (usize, Duration, u64, Histogram<u64>)>,
    points: Vec<TimelinePoint>,
}

impl Timeline {
    fn new(workers: usize, interval: Duration) -> Timeline {
        Timeline {
            workers,
            interval,
            open: std::collections::BTreeMap::new(),
            points: Vec::new(),
        }
    }

    /// Adds one worker's interval; returns the point's time when that
    /// completed it.
    fn add(&mut self, iv: workers::Interval) -> Option<Duration> {
        let slot = self
            .open
            .entry(iv.index)
            .or_insert_with(|| (0, Duration::ZERO, 0, crate::histogram::latency()));
        slot.0 += 1;
        slot.1 = slot.1.max(iv.t);
        slot.2 += iv.delivered;
        let _ = slot.3.add(&iv.latency);
        if slot.0 < self.workers {
            return None;
        }
        let (_, t, delivered, h) = self.open.remove(&iv.index)?;
        let secs = self.interval.as_secs_f64().max(1e-9);
        self.points.push(TimelinePoint {
            t_s: t.as_secs_f64(),
            deliveries_per_s: delivered as f64 / secs,
            p50_us: h.value_at_quantile(0.5) as f64 / 1e3,
            p99_us: h.value_at_quantile(0.99) as f64 / 1e3,
        });
        Some(t)
    }
}
