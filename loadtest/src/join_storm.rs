//! The `join-storm` scenario: as many distinct sources as asked (up to
//! millions) register and keep heartbeating. It measures the heartbeat rate
//! the relay ingests and, with `--relay-pid`, the relay's memory per client;
//! with `--expire`, it then falls silent and watches the relay expire them
//! all, reporting the relay's longest loop iterations meanwhile.
//!
//! Sources are `127.x.y.z:port`: a few sockets bound to ephemeral ports on
//! 127.0.0.1, each sending from many loopback addresses chosen per datagram
//! with IP_PKTINFO (every 127/8 address is local on Linux, and the kernel
//! takes a PKTINFO source even on a bound socket). Heartbeats get no reply.
//! Only in verify mode (`--verify`) must the cookies that come back to
//! those addresses be read: then the sockets are bound on 0.0.0.0 (the
//! only bind that receives for every 127/8 address), and IP_PKTINFO on
//! receive says which source each is for.
//!
//! At the end every source leaves with a `quit` (in verify mode the proven
//! `^cookie^C^quit`, with the cookie kept from its handshake: 16 bytes a
//! source), paced as the joins were, so the relay is left as it was found;
//! except with `--expire`, which measures the relay expiring them all.

use std::io::{IoSlice, IoSliceMut};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use clap::Args;
use nix::sys::socket::{
    recvmsg, sendmsg, setsockopt, sockopt, ControlMessage, ControlMessageOwned, MsgFlags,
    SockaddrIn,
};
use serde::Serialize;

use crate::metrics::Scrape;
use crate::procfs;
use crate::report::{row, Common, Progress};

/// `loadtest join-storm` flags.
#[derive(Debug, Clone, Args)]
pub struct JoinStormArgs {
    /// Shared flags.
    #[command(flatten)]
    pub common: Common,

    /// Distinct sources to register
    #[arg(long, default_value_t = 100_000)]
    pub clients: u32,

    /// Sending sockets (ports); sources are spread over them
    #[arg(long, default_value_t = 16)]
    pub ports: u32,

    /// Each source heartbeats this often (0 = as fast as possible)
    #[arg(long, default_value = "1s", value_parser = crate::duration::parse)]
    pub heartbeat: Duration,

    /// Afterwards, go silent and wait (up to this long) for the relay to
    /// expire every client (needs --metrics-url)
    #[arg(long, value_parser = crate::duration::parse)]
    pub expire: Option<Duration>,

    /// Each source's first datagram joins room `r{k mod K}` (wire protocol
    /// v2) instead of heartbeating into the lobby
    #[arg(long, value_name = "K", default_value_t = 0)]
    pub rooms: u32,

    /// Pace the first datagrams (the joins) to this many per second
    /// [default: as fast as possible]
    #[arg(long, value_name = "N")]
    pub join_rate: Option<f64>,

    /// Send 64-byte `^hello^`s instead of heartbeats: against a relay in
    /// verify mode, a million sources that never prove their address (what
    /// a spoofer's flood costs the relay)
    #[arg(long, conflicts_with = "rooms")]
    pub hello: bool,

    /// The relay is in verify mode (udphub --verify-sources): every source
    /// asks for a cookie, then registers (or joins) with it; hellos are
    /// repeated for sources without one, within --verify-timeout
    #[arg(long, conflicts_with = "hello")]
    pub verify: bool,

    /// With --verify: how long the handshake phase may take (the relay
    /// budgets cookies per /24: raise it with udphub --cookie-rate for a
    /// storm from a few prefixes)
    #[arg(long, default_value = "60s", value_parser = crate::duration::parse)]
    pub verify_timeout: Duration,

    /// How long to wait, after the joins are sent, for the relay to count
    /// every source (needs --metrics-url); the wait ends early when the
    /// relay's kernel drops account for the sources still missing
    #[arg(long, default_value = "60s", value_parser = crate::duration::parse)]
    pub register_timeout: Duration,

    /// Worker threads for the joins and the heartbeats, the --ports sockets
    /// dealt over them (at most one per socket; `auto`: one per core). The
    /// verify handshake stays on one thread
    #[arg(long, value_name = "N|auto", default_value = "1", value_parser = crate::fanout::parse_threads)]
    pub threads: usize,
}

/// The `join-storm` report.
#[derive(Debug, Clone, Serialize)]
pub struct JoinStormReport {
    /// "join-storm".
    pub scenario: String,
    /// Sources.
    pub clients: u32,
    /// Seconds to send one heartbeat from every source.
    pub join_seconds: f64,
    /// Seconds from the first join until the relay counted every source
    /// (`udphub_clients`, with --metrics-url); `None` if it never did within
    /// --register-timeout.
    pub registered_seconds: Option<f64>,
    /// Heartbeats loadtest sent during the steady phase, per second.
    pub heartbeats_sent_per_s: f64,
    /// Heartbeats the relay counted in the steady phase, per second.
    pub heartbeats_ingested_per_s: Option<f64>,
    /// Relay CPU nanoseconds per heartbeat ingested in the steady phase
    /// (`--relay-pid` and `--metrics-url`).
    pub relay_cpu_ns_per_heartbeat: Option<f64>,
    /// Heartbeats/s one core would ingest at that cost: the relay's
    /// capacity even when loadtest can't send that fast.
    pub relay_capacity_per_s: Option<f64>,
    /// Datagrams the relay's kernel queue dropped during the run.
    pub kernel_rx_dropped: Option<f64>,
    /// `udphub_clients` at the end of the steady phase.
    pub relay_clients: Option<f64>,
    /// Relay RSS before any source joined.
    pub rss_before_bytes: Option<u64>,
    /// Relay RSS with every source registered.
    pub rss_after_bytes: Option<u64>,
    /// `(after - before) / clients`.
    pub rss_bytes_per_client: Option<f64>,
    /// With `--expire`: what the mass expiry did.
    pub expiry: Option<ExpiryReport>,
    /// With `--verify`: sources that got a cookie and proved their address.
    pub verified: Option<u32>,
    /// `quit`s sent at the end (proven with each source's cookie in verify
    /// mode), so the relay is left as it was found; 0 with `--expire`.
    pub quits_sent: u64,
    /// With `--metrics-url`: sources of this run the relay still had when
    /// loadtest stopped waiting for the quits to land (they expire after
    /// its `--timeout`); absent when every one left.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clients_left_behind: Option<u64>,
}

/// How the relay handled every client expiring at once.
#[derive(Debug, Clone, Serialize)]
pub struct ExpiryReport {
    /// Seconds from the last heartbeat until `udphub_clients` reached 0.
    pub seconds_to_empty: Option<f64>,
    /// Clients the relay expired meanwhile.
    pub expired: f64,
    /// Loop iterations during the expiry.
    pub loop_iterations: f64,
    /// Of those, longer than 5 ms.
    pub iterations_over_5ms: f64,
    /// The smallest histogram bound the longest iteration fits under, seconds.
    pub longest_iteration_at_most_s: Option<f64>,
}

/// The source address of client `k`: 127.x.y.z, skipping 127.0.0.0/16.
fn source_ip(k: u32, ports: u32) -> Ipv4Addr {
    let a = k / ports + 65_536;
    Ipv4Addr::from((127u32 << 24) | (a & 0x00ff_ffff))
}

/// The client whose source is `ip` on socket `port_index`: the inverse
/// of [`source_ip`].
fn source_index(ip: Ipv4Addr, ports: u32, port_index: u32) -> Option<u32> {
    let a = (u32::from(ip) & 0x00ff_ffff).checked_sub(65_536)?;
    a.checked_mul(ports)?.checked_add(port_index)
}

/// Bytes of a cookie's MAC: the relay's 22 base64url characters, decoded.
/// Kept that way (16 bytes a source, not 22) because a storm may have
/// millions of sources.
const COOKIE_TAG: usize = 16;

/// Verify mode: each source's cookie, kept for its proven `quit`.
struct Cookies {
    /// Source `k`'s cookie, decoded; meaningful only where `proven[k]`.
    tags: Vec<[u8; COOKIE_TAG]>,
    /// Whether source `k` proved its address (holds a cookie).
    proven: Vec<bool>,
    /// When the handshake began: every cookie is younger. A cookie is
    /// accepted through the epoch after the one it was made in, so for at
    /// least one epoch (two minutes) after it was sent.
    since: Instant,
}

impl Cookies {
    fn new(clients: u32) -> Cookies {
        Cookies {
            tags: vec![[0; COOKIE_TAG]; clients as usize],
            proven: vec![false; clients as usize],
            since: Instant::now(),
        }
    }

    /// Whether every kept cookie is still accepted (with a margin for the
    /// quits' own sending time).
    fn fresh(&self) -> bool {
        self.since.elapsed() + Duration::from_secs(20)
            < Duration::from_secs(udphub::core::cookie::EPOCH_SECS)
    }

    /// Source `k`'s proven quit, `^cookie^C^quit`, if it holds a cookie.
    fn quit(&self, k: u32) -> Option<Vec<u8>> {
        let mut q = self.heartbeat(k)?;
        q.extend_from_slice(b"^quit");
        Some(q)
    }

    /// Source `k`'s proven heartbeat, `^cookie^C`, if it holds a cookie.
    /// (The relay answers one that carries last epoch's cookie with a
    /// fresh one, which the steady phase does not read: a storm's
    /// heartbeats prove their sources for at least one epoch, two minutes.)
    fn heartbeat(&self, k: u32) -> Option<Vec<u8>> {
        let k = k as usize;
        if !self.proven.get(k).copied().unwrap_or(false) {
            return None;
        }
        let mut q = b"^cookie^".to_vec();
        q.extend_from_slice(URL_SAFE_NO_PAD.encode(self.tags[k]).as_bytes());
        Some(q)
    }
}

/// The MAC in the relay's `^cookie^C`, decoded; `None` if it is not one.
fn cookie_tag(datagram: &[u8]) -> Option<[u8; COOKIE_TAG]> {
    let text = datagram.strip_prefix(b"^cookie^")?;
    let bytes = URL_SAFE_NO_PAD.decode(text).ok()?;
    bytes.try_into().ok()
}

/// What a source sends with its cookie when the relay answers its hello.
#[derive(Debug, Clone, Copy)]
enum Proof {
    /// Register: `^cookie^C`, or `^cookie^C^join^r{k mod rooms}`.
    Register { rooms: u32 },
    /// Leave: `^cookie^C^quit` (when the kept cookies have aged out).
    Quit,
}

struct Storm {
    socks: Vec<UdpSocket>,
    dest: SockaddrIn,
    clients: u32,
    /// What each source sends: a heartbeat, or a padded hello.
    beat: Vec<u8>,
}

impl Storm {
    fn new(relay: SocketAddr, clients: u32, ports: u32, receive: bool) -> Result<Storm, String> {
        let SocketAddr::V4(v4) = relay else {
            return Err("join-storm needs an IPv4 relay address (sources are 127.x.y.z)".into());
        };
        if u64::from(clients) > u64::from(ports) * 0xfe_0000 {
            return Err("too many clients for the loopback range; add --ports".into());
        }
        let mut socks = Vec::new();
        // Sending from any 127/8 address works from a socket bound to
        // 127.0.0.1; receiving what comes back to them needs the wildcard.
        let local = if receive { "0.0.0.0:0" } else { "127.0.0.1:0" };
        for _ in 0..ports {
            let s = UdpSocket::bind(local).map_err(|e| format!("bind {local}: {e}"))?;
            let _ = socket2::SockRef::from(&s).set_send_buffer_size(4 << 20);
            let _ = socket2::SockRef::from(&s).set_recv_buffer_size(4 << 20);
            if receive {
                // Which of our 127.x addresses a reply (a cookie) went to.
                setsockopt(&s, sockopt::Ipv4PacketInfo, &true)
                    .map_err(|e| format!("IP_PKTINFO: {e}"))?;
            }
            s.set_nonblocking(true).map_err(|e| e.to_string())?;
            socks.push(s);
        }
        Ok(Storm {
            socks,
            dest: SockaddrIn::from(v4),
            clients,
            beat: b"^hb^".to_vec(),
        })
    }

    /// Verify mode: every source asks for a cookie (`^hello^`), and
    /// answers it as `then` says, keeping the cookie in `cookies`; hellos
    /// are repeated for the sources still without one, until all are
    /// proven or `limit` passes. Returns how many were proven.
    fn verify(
        &self,
        then: Proof,
        cookies: &mut Cookies,
        rate: Option<f64>,
        limit: Duration,
    ) -> Result<u32, String> {
        cookies.proven.fill(false);
        cookies.since = Instant::now();
        let mut left = self.clients;
        let hello = crate::member::hello();
        let t0 = Instant::now();
        let mut buf = [0u8; 512];
        let mut proof = Vec::with_capacity(64);
        while left > 0 && t0.elapsed() < limit {
            let round = Instant::now();
            let mut asked = 0u64;
            for k in 0..self.clients {
                if cookies.proven[k as usize] {
                    continue;
                }
                if let Some(rate) = rate.filter(|r| *r > 0.0) {
                    if asked % 256 == 0 {
                        let due = Duration::from_secs_f64(asked as f64 / rate);
                        if let Some(wait) = due.checked_sub(round.elapsed()) {
                            std::thread::sleep(wait);
                        }
                    }
                }
                self.send(k, &hello)?;
                asked += 1;
                if asked % 64 == 0 {
                    left -= self.prove(cookies, &mut buf, &mut proof, then)?;
                }
            }
            // Keep the proven alive while the others wait for a cookie.
            for k in 0..self.clients {
                if cookies.proven[k as usize] && matches!(then, Proof::Register { .. }) {
                    self.heartbeat(k)?;
                }
            }
            // Let the last answers arrive (and a starved cookie budget refill).
            let settle = Instant::now();
            while settle.elapsed() < Duration::from_millis(500) {
                let got = self.prove(cookies, &mut buf, &mut proof, then)?;
                left -= got;
                if got == 0 {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
        Ok(self.clients - left)
    }

    /// Reads the cookies waiting on every socket and answers each (once
    /// per source) as `then` says, keeping it. Returns how many sources
    /// were newly proven.
    fn prove(
        &self,
        cookies: &mut Cookies,
        buf: &mut [u8],
        proof: &mut Vec<u8>,
        then: Proof,
    ) -> Result<u32, String> {
        let ports = self.socks.len() as u32;
        let mut got = 0;
        for (i, sock) in self.socks.iter().enumerate() {
            loop {
                let mut iov = [IoSliceMut::new(buf)];
                let mut space = nix::cmsg_space!(libc::in_pktinfo);
                let msg = match recvmsg::<SockaddrIn>(
                    sock.as_raw_fd(),
                    &mut iov,
                    Some(&mut space),
                    MsgFlags::empty(),
                ) {
                    Ok(m) => m,
                    Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => break,
                    Err(e) => return Err(format!("receive a cookie: {e}")),
                };
                let n = msg.bytes;
                let mut to = None;
                for c in msg.cmsgs().map_err(|e| e.to_string())? {
                    if let ControlMessageOwned::Ipv4PacketInfo(info) = c {
                        to = Some(Ipv4Addr::from(u32::from_be(info.ipi_addr.s_addr)));
                    }
                }
                let (Some(ip), true) = (to, buf[..n].starts_with(b"^cookie^")) else {
                    continue;
                };
                let Some(k) = source_index(ip, ports, i as u32) else {
                    continue;
                };
                if k >= self.clients || cookies.proven[k as usize] {
                    continue;
                }
                let cookie = buf[..n].trim_ascii_end();
                let Some(tag) = cookie_tag(cookie) else {
                    continue;
                };
                proof.clear();
                proof.extend_from_slice(cookie);
                match then {
                    Proof::Register { rooms } if rooms > 0 => {
                        proof.extend_from_slice(format!("^join^r{}", k % rooms).as_bytes())
                    }
                    Proof::Register { .. } => {}
                    Proof::Quit => proof.extend_from_slice(b"^quit"),
                }
                self.send(k, proof)?;
                cookies.tags[k as usize] = tag;
                cookies.proven[k as usize] = true;
                got += 1;
            }
        }
        Ok(got)
    }

    /// Sends one heartbeat from client `k`; retries briefly if the socket
    /// buffer is full.
    fn heartbeat(&self, k: u32) -> Result<(), String> {
        self.send(k, &self.beat)
    }

    /// Sends `data` from client `k`, as [`heartbeat`](Self::heartbeat) does.
    fn send(&self, k: u32, data: &[u8]) -> Result<(), String> {
        let ports = self.socks.len() as u32;
        let sock = &self.socks[(k % ports) as usize];
        let ip = source_ip(k, ports);
        let info = libc::in_pktinfo {
            ipi_ifindex: 0,
            ipi_spec_dst: libc::in_addr {
                s_addr: u32::from(ip).to_be(),
            },
            ipi_addr: libc::in_addr { s_addr: 0 },
        };
        let iov = [IoSlice::new(data)];
        let cmsg = [ControlMessage::Ipv4PacketInfo(&info)];
        for _ in 0..10_000 {
            match sendmsg(
                sock.as_raw_fd(),
                &iov,
                &cmsg,
                MsgFlags::empty(),
                Some(&self.dest),
            ) {
                Ok(_) => return Ok(()),
                Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::ENOBUFS) => {
                    std::thread::sleep(Duration::from_micros(20))
                }
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(format!("send from {ip}: {e}")),
            }
        }
        Err("send buffer stayed full".into())
    }
}

/// Runs the scenario.
pub fn run(args: &JoinStormArgs) -> Result<JoinStormReport, String> {
    let c = &args.common;
    let mut storm = Storm::new(
        c.relay_addr()?,
        args.clients,
        args.ports.max(1),
        args.verify,
    )?;
    if args.hello {
        storm.beat = b"^hello^".to_vec();
        storm.beat.resize(64, b' ');
    }
    let rss_before = c.relay_pid.and_then(procfs::rss_bytes);
    let scrape0 = c.scrape_optional()?;
    if let Some(before) = &scrape0 {
        crate::report::warn_occupied(
            before,
            "they count in this run's relay clients and RSS per client",
        );
    }

    // Phase 1: every source joins once, as fast as the relay takes it.
    let t0 = Instant::now();
    let mut cookies = args.verify.then(|| Cookies::new(args.clients));
    let verified = match &mut cookies {
        Some(cookies) => Some(storm.verify(
            Proof::Register { rooms: args.rooms },
            cookies,
            args.join_rate,
            args.verify_timeout,
        )?),
        None => None,
    };
    // Each worker sends for the sources of its own sockets.
    let threads = args.threads.clamp(1, storm.socks.len());
    let share = |t: usize| {
        let (ports, n) = (storm.socks.len() as u32, threads as u32);
        (0..storm.clients).filter(move |k| (k % ports) % n == t as u32)
    };
    if !args.verify {
        storm.each_source(threads, args.join_rate, |k| {
            if args.rooms > 0 {
                let join = format!("^join^r{}", k % args.rooms);
                storm.send(k, join.as_bytes())?;
            } else {
                storm.heartbeat(k)?;
            }
            Ok(0)
        })?;
    }
    let join_seconds = t0.elapsed().as_secs_f64();
    // (In verify mode the handshake already waited for every proof.)
    let registered_seconds = match (&scrape0, args.verify) {
        (Some(before), false) => {
            wait_registered(c, before, args.clients, args.register_timeout, t0)?
        }
        _ => None,
    };

    // Phase 2: keep every source alive for --duration.
    let progress = Progress::new(c, c.duration);
    let scrape1 = c.scrape_optional()?;
    let cpu1 = c.relay_pid.and_then(procfs::cpu_seconds);
    let t1 = Instant::now();
    let per_heartbeat = args.heartbeat;
    let total = std::sync::atomic::AtomicU64::new(0);
    let kept = cookies.as_ref();
    let sent = on_threads(threads, |t| {
        let mut sent = 0u64;
        let mut round_start = Instant::now();
        let mut ks = share(t);
        // Each round is spread over the interval (a chunk of 256 at a
        // time), as real clients' heartbeats are, not sent as one burst.
        let per_round = share(t).count().max(1) as f64;
        let mut in_round = 0u64;
        while t1.elapsed() < c.duration {
            if !per_heartbeat.is_zero() && in_round % 256 == 0 {
                let due = per_heartbeat.mul_f64(in_round as f64 / per_round);
                if let Some(wait) = due.checked_sub(round_start.elapsed()) {
                    std::thread::sleep(wait.min(c.duration.saturating_sub(t1.elapsed())));
                }
            }
            let Some(k) = ks.next() else {
                in_round = 0;
                ks = share(t);
                total.fetch_add(sent, std::sync::atomic::Ordering::Relaxed);
                sent = 0;
                if t == 0 {
                    let all = total.load(std::sync::atomic::Ordering::Relaxed);
                    progress.tick(t1.elapsed(), all);
                }
                // Pace to one heartbeat per source per interval.
                let spent = round_start.elapsed();
                if spent < per_heartbeat {
                    std::thread::sleep(
                        (per_heartbeat - spent).min(c.duration.saturating_sub(t1.elapsed())),
                    );
                }
                round_start = Instant::now();
                continue;
            };
            // In verify mode only the cookie keeps a member alive: its
            // proven heartbeat is `^cookie^C` (a source without one sends
            // nothing: it was never registered).
            match kept.map(|kept| kept.heartbeat(k)) {
                None => storm.heartbeat(k)?,
                Some(Some(beat)) => storm.send(k, &beat)?,
                Some(None) => continue,
            }
            sent += 1;
            in_round += 1;
        }
        Ok(sent)
    })? + total.load(std::sync::atomic::Ordering::Relaxed);
    let steady = t1.elapsed().as_secs_f64();
    progress.finish();
    // Let the relay's counters catch up with the last datagrams.
    std::thread::sleep(Duration::from_millis(1500));
    let scrape2 = c.scrape_optional()?;
    let cpu2 = c.relay_pid.and_then(procfs::cpu_seconds);
    let rss_after = c.relay_pid.and_then(procfs::rss_bytes);

    let heartbeats = |s: &Scrape| s.get("udphub_datagrams_received_total{kind=\"heartbeat\"}");
    let ingested = match (&scrape1, &scrape2) {
        (Some(a), Some(b)) => Some((heartbeats(b) - heartbeats(a)) / steady),
        _ => None,
    };
    let cpu_ns_per_heartbeat = match (cpu1, cpu2, ingested) {
        (Some(a), Some(b), Some(rate)) if rate > 0.0 => Some((b - a) * 1e9 / (rate * steady)),
        _ => None,
    };
    let kernel = match (&scrape0, &scrape2) {
        (Some(a), Some(b)) => {
            Some(b.get("udphub_kernel_rx_dropped_total") - a.get("udphub_kernel_rx_dropped_total"))
        }
        _ => None,
    };
    let expiry = match (args.expire, &c.metrics_url) {
        (Some(limit), Some(url)) => Some(watch_expiry(url, limit, scrape2.as_ref())?),
        (Some(_), None) => return Err("--expire needs --metrics-url".into()),
        _ => None,
    };
    // Phase 3 (not with --expire, which watched the relay expire them):
    // every source leaves, so the relay is left as it was found.
    let (quits_sent, clients_left_behind) = if args.expire.is_some() {
        (0, None)
    } else {
        let sent = storm.leave_all(cookies.as_mut(), args, threads)?;
        let left = c
            .metrics_url
            .as_ref()
            .and_then(|_| crate::fanout::wait_left(c, &scrape0, QUIT_SETTLE));
        (sent, left)
    };
    Ok(JoinStormReport {
        scenario: "join-storm".into(),
        clients: args.clients,
        join_seconds,
        registered_seconds,
        heartbeats_sent_per_s: sent as f64 / steady.max(1e-9),
        heartbeats_ingested_per_s: ingested,
        relay_cpu_ns_per_heartbeat: cpu_ns_per_heartbeat,
        relay_capacity_per_s: cpu_ns_per_heartbeat.map(|ns| 1e9 / ns.max(1e-9)),
        kernel_rx_dropped: kernel,
        relay_clients: scrape2.as_ref().map(|s| s.get("udphub_clients")),
        rss_before_bytes: rss_before,
        rss_after_bytes: rss_after,
        rss_bytes_per_client: match (rss_before, rss_after) {
            (Some(a), Some(b)) => Some((b as f64 - a as f64) / f64::from(args.clients.max(1))),
            _ => None,
        },
        expiry,
        verified,
        quits_sent,
        clients_left_behind,
    })
}

/// How long to wait, after the last quit, for the relay to count them.
const QUIT_SETTLE: Duration = Duration::from_secs(5);

impl Storm {
    /// Every source leaves: `quit`, or in verify mode `^cookie^C^quit`
    /// with the cookie kept from its handshake (an unproven quit is
    /// ignored there). Paced as the joins were (`--join-rate`), on the
    /// same threads, each send retried while the socket buffer is full.
    /// Cookies that may have aged out (a run longer than a cookie epoch)
    /// are not used: each source then asks for a fresh cookie and quits
    /// with it, as it registered. Returns how many quits were sent.
    fn leave_all(
        &self,
        cookies: Option<&mut Cookies>,
        args: &JoinStormArgs,
        threads: usize,
    ) -> Result<u64, String> {
        if let Some(cookies) = cookies {
            if !cookies.fresh() {
                let quit = Proof::Quit;
                return self
                    .verify(quit, cookies, args.join_rate, args.verify_timeout)
                    .map(u64::from);
            }
            return self.each_source(threads, args.join_rate, |k| match cookies.quit(k) {
                Some(q) => self.send(k, &q).map(|()| 1),
                None => Ok(0),
            });
        }
        self.each_source(threads, args.join_rate, |k| {
            self.send(k, b"quit").map(|()| 1)
        })
    }

    /// Runs `one(k)` for every source, the sources of each socket on
    /// thread `socket mod threads`, paced to `rate` a second in all (in
    /// chunks of 256); sums what it returns.
    fn each_source(
        &self,
        threads: usize,
        rate: Option<f64>,
        one: impl Fn(u32) -> Result<u64, String> + Sync,
    ) -> Result<u64, String> {
        let threads = threads.clamp(1, self.socks.len());
        let rate = rate.filter(|r| *r > 0.0).map(|r| r / threads as f64);
        let (ports, n) = (self.socks.len() as u32, threads as u32);
        let t0 = Instant::now();
        on_threads(threads, |t| {
            let mut sum = 0;
            let mine = (0..self.clients).filter(|k| (k % ports) % n == t as u32);
            for (i, k) in mine.enumerate() {
                if let Some(rate) = rate {
                    if i % 256 == 0 {
                        let due = Duration::from_secs_f64(i as f64 / rate);
                        if let Some(wait) = due.checked_sub(t0.elapsed()) {
                            std::thread::sleep(wait);
                        }
                    }
                }
                sum += one(k)?;
            }
            Ok(sum)
        })
    }
}

/// Waits (up to `limit`) for the relay to register `clients` more
/// clients than `before` (`udphub_clients_joined_total`: registrations,
/// not the clients there now, since a storm's first sources may expire
/// before its last one joins), and returns the seconds since `t0` when it
/// did. The steady phase's count starts only then: otherwise the last
/// joins, still queued, count as steady heartbeats. The wait ends early
/// (`None`) when the relay's kernel queue dropped at least as many
/// datagrams as sources are missing: those joins will not come.
fn wait_registered(
    c: &Common,
    before: &Scrape,
    clients: u32,
    limit: Duration,
    t0: Instant,
) -> Result<Option<f64>, String> {
    let want = before.get("udphub_clients_joined_total") + f64::from(clients);
    let dropped0 = before.get("udphub_kernel_rx_dropped_total");
    let until = Instant::now() + limit;
    loop {
        let Some(now) = c.scrape_optional()? else {
            return Ok(None);
        };
        let missing = want - now.get("udphub_clients_joined_total");
        if missing <= 0.0 {
            return Ok(Some(t0.elapsed().as_secs_f64()));
        }
        let dropped = now.get("udphub_kernel_rx_dropped_total") - dropped0;
        if dropped >= missing || Instant::now() >= until {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `work(t)` for `t` in `0..threads`, each on a thread of its own
/// (the calling one when there is one), and sums what they return.
fn on_threads(
    threads: usize,
    work: impl Fn(usize) -> Result<u64, String> + Sync,
) -> Result<u64, String> {
    if threads <= 1 {
        return work(0);
    }
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn({
                    let work = &work;
                    move || work(t)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("a worker thread panicked".into()))
            })
            .sum()
    })
}

/// Waits (bounded) for `udphub_clients` to reach 0, then reads the loop
/// iteration histogram's growth.
fn watch_expiry(
    url: &str,
    limit: Duration,
    before: Option<&Scrape>,
) -> Result<ExpiryReport, String> {
    let start = Instant::now();
    let before = match before {
        Some(s) => s.clone(),
        None => crate::metrics::scrape_all(url)?,
    };
    let mut emptied = None;
    while start.elapsed() < limit {
        let s = crate::metrics::scrape_all(url)?;
        if s.get("udphub_clients") == 0.0 {
            emptied = Some(start.elapsed().as_secs_f64());
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let after = crate::metrics::scrape_all(url)?;
    let d = Scrape::delta(&before, &after);
    let count = d.get("udphub_loop_iteration_seconds_count");
    let under_5ms = d.get("udphub_loop_iteration_seconds_bucket{le=\"0.005\"}");
    // The longest iteration is at most the first bucket holding them all.
    let mut bounds: Vec<(f64, f64)> = d
        .series
        .iter()
        .filter_map(|(k, v)| {
            let le = k
                .strip_prefix("udphub_loop_iteration_seconds_bucket{le=\"")?
                .strip_suffix("\"}")?;
            Some((le.parse().ok()?, *v))
        })
        .collect();
    bounds.sort_by(|a, b| a.0.total_cmp(&b.0));
    let longest = bounds.iter().find(|(_, v)| *v >= count).map(|(le, _)| *le);
    Ok(ExpiryReport {
        seconds_to_empty: emptied,
        expired: d.get("udphub_clients_expired_total"),
        loop_iterations: count,
        iterations_over_5ms: count - under_5ms,
        longest_iteration_at_most_s: longest,
    })
}

impl JoinStormReport {
    /// The human-readable table.
    pub fn print_table(&self) {
        println!("join-storm: {} sources", self.clients);
        row(
            "join",
            format!(
                "{:.2} s ({:.0} joins/s sent)",
                self.join_seconds,
                f64::from(self.clients) / self.join_seconds.max(1e-9)
            ),
        );
        if self.relay_clients.is_some() && self.verified.is_none() {
            row(
                "registered",
                self.registered_seconds.map_or_else(
                    || "not every source (see kernel rx drops)".into(),
                    |s| format!("{s:.2} s until the relay counted every source"),
                ),
            );
        }
        row(
            "heartbeats sent",
            format!("{:.0}/s", self.heartbeats_sent_per_s),
        );
        if let Some(r) = self.heartbeats_ingested_per_s {
            row("relay ingested", format!("{r:.0} heartbeats/s"));
        }
        if let (Some(ns), Some(cap)) = (self.relay_cpu_ns_per_heartbeat, self.relay_capacity_per_s)
        {
            row(
                "relay CPU",
                format!("{ns:.0} ns per heartbeat: one core ingests ~{cap:.0}/s"),
            );
        }
        if let Some(k) = self.kernel_rx_dropped {
            row("kernel rx drops", format!("{k}"));
        }
        if let Some(v) = self.verified {
            row("verified", format!("{v} sources proved their address"));
        }
        if let Some(n) = self.relay_clients {
            row("relay clients", format!("{n}"));
        }
        if let (Some(a), Some(b)) = (self.rss_before_bytes, self.rss_after_bytes) {
            row(
                "relay RSS",
                format!(
                    "{:.1} MiB -> {:.1} MiB",
                    a as f64 / 1048576.0,
                    b as f64 / 1048576.0
                ),
            );
        }
        if let Some(p) = self.rss_bytes_per_client {
            row("RSS per client", format!("{p:.0} bytes"));
        }
        if self.expiry.is_none() {
            crate::report::left_row(self.quits_sent, self.clients_left_behind);
        }
        if let Some(e) = &self.expiry {
            row(
                "expiry",
                format!(
                    "{} expired, empty after {}; {} loop iterations, {} over 5 ms, longest <= {}",
                    e.expired,
                    e.seconds_to_empty
                        .map_or("(not yet)".into(), |s| format!("{s:.1} s")),
                    e.loop_iterations,
                    e.iterations_over_5ms,
                    e.longest_iteration_at_most_s
                        .map_or("?".into(), |s| format!("{:.1} ms", s * 1e3)),
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_distinct_loopback_addresses() {
        let mut seen = std::collections::HashSet::new();
        for k in 0..200_000u32 {
            let ip = source_ip(k, 16);
            assert!(ip.is_loopback());
            assert_ne!(ip.octets()[1], 0, "127.0.x.x is left alone");
            assert!(seen.insert((ip, k % 16)));
            assert_eq!(source_index(ip, 16, k % 16), Some(k));
        }
    }

    /// A cookie kept in 16 bytes is the relay's cookie again in the quit.
    #[test]
    fn a_kept_cookie_quits_with_the_relays_own_bytes() {
        use udphub::core::addr::RawAddr;
        use udphub::core::cookie::CookieKey;
        let key = CookieKey::new([7; 32], Instant::now());
        let addr = RawAddr::from_socket_addr("127.1.2.3:4000".parse().unwrap());
        let c = key.make(&addr, Instant::now());
        let datagram = [&b"^cookie^"[..], &c].concat();
        let mut cookies = Cookies::new(3);
        cookies.tags[1] = cookie_tag(&datagram).expect("a cookie");
        cookies.proven[1] = true;
        assert_eq!(cookies.quit(1), Some([&datagram[..], b"^quit"].concat()));
        assert_eq!(cookies.quit(0), None, "no cookie, no quit");
        assert_eq!(cookies.quit(9), None);
        assert!(cookie_tag(b"^cookie^short").is_none());
        assert!(cookie_tag(b"^room^x").is_none());
        assert!(cookies.fresh());
    }
}
