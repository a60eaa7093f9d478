//! `loadtest abuse --spoof N`: an off-path attacker forging source
//! addresses. A raw socket (`IPPROTO_RAW`, so the IP header is ours: root
//! or CAP_NET_RAW) sends datagrams "from" victims bound on 127.77.0.x and
//! from unbound 127.78.0.0+ sources, while a real member keeps talking.
//! It reports the amplification factor (bytes the victims received / bytes
//! sent in their names), the table slots the attacker got, the relay's RSS
//! growth, and whether a forged `quit` evicted a member.
//!
//! With `--newcomers` the question is admission instead (the `admission`
//! module): this module gives it the raw socket and the source layout.
//!
//! Only 127.0.0.0/8 sources are forged, and only at a relay on
//! 127.0.0.0/8: the tool refuses anything else.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::member::{hello, Member};
use crate::metrics::Scrape;
use crate::procfs;
use crate::report::{row, Common};

/// Victims are bound here, one address each.
const VICTIM_BASE: Ipv4Addr = Ipv4Addr::new(127, 77, 0, 1);
/// Sources beyond the victims: unbound addresses from here up.
const SOURCE_BASE: Ipv4Addr = Ipv4Addr::new(127, 78, 0, 0);
/// Their port.
const SOURCE_PORT: u16 = 40_000;
/// The most bound victims.
pub const MAX_VICTIMS: usize = 250;
/// The most sources: what fits between 127.78.0.0 and 127.255.255.255.
pub const MAX_SOURCES: u64 = (0x7fff_ffff - 0x7f4e_0000) as u64;
/// `--prefixes`: the first /24 (as a 24-bit number, 127.1.0.0/24). Below
/// it is 127.0.0.0/24, where the real clients (newcomers, members) live:
/// forged traffic never shares their prefix's cookie budget.
const FIRST_PREFIX: u32 = 0x7f_01_00;
/// `--prefixes`: the most /24s, 127.1.0.0/24 to 127.255.255.0/24.
pub const MAX_PREFIXES: u32 = 0x80_00_00 - FIRST_PREFIX;
/// `--prefixes`: hosts .1 to .254 of each /24 (no .0 or .255, which look
/// like network and broadcast addresses even where they are not).
const HOSTS_PER_PREFIX: u64 = 254;
/// `--prefixes`: the first source port; when a /24's hosts run out, the
/// next port. Above Linux's ephemeral range (32768-60999), so a cookie to a
/// forged source does not land in some other program's socket.
const SPREAD_PORT: u16 = 61_000;
/// `--prefixes`: ports per host, 61000 to 65535.
const PORTS_PER_HOST: u64 = (u16::MAX - SPREAD_PORT) as u64 + 1;

/// What to forge.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Forged datagrams to send (None: for `duration`).
    pub datagrams: Option<u64>,
    /// How long to forge when `datagrams` is None.
    pub duration: Duration,
    /// Distinct forged sources (the first `victims` are bound listeners).
    pub sources: u64,
    /// Spread the sources over this many /24s (None: consecutive).
    pub prefixes: Option<u32>,
    /// Bound victims.
    pub victims: usize,
    /// The relay is in verify mode: the members register with cookies.
    pub verify: bool,
    /// A member speaks once per this many forged datagrams (0: never).
    pub talk_every: u64,
    /// Forged datagrams per second (None: as fast as the socket takes them).
    pub rate: Option<f64>,
    /// How long to wait for stragglers.
    pub wait: Duration,
    /// What to forge.
    pub forge: Forge,
    /// Real newcomers to admit during the flood (the `admission` scenario).
    pub newcomers: Option<NewcomerPlan>,
}

/// `--newcomers`: the real clients that try to get in during the flood.
#[derive(Debug, Clone, Copy)]
pub struct NewcomerPlan {
    /// How many.
    pub count: u32,
    /// Each repeats its unanswered `^hello^` (or proof) this often.
    pub retry: Duration,
    /// Each gives up this long after its first `^hello^`.
    pub give_up: Duration,
}

/// Where forged source `k` is, for `--sources` and `--prefixes`.
#[derive(Debug, Clone, Copy)]
pub struct Sources {
    /// Distinct sources.
    pub count: u64,
    /// Spread over this many /24s, round robin (None: consecutive
    /// addresses from 127.78.0.0, one port).
    pub prefixes: Option<u32>,
}

impl Sources {
    /// The layout, or what is wrong with the flags.
    pub fn new(count: u64, prefixes: Option<u32>) -> Result<Sources, String> {
        if count == 0 {
            return Err("--sources 0: forge from at least one source".into());
        }
        match prefixes {
            None if count > MAX_SOURCES => Err(format!(
                "--sources {count}: at most {MAX_SOURCES} consecutive addresses fit in 127.78.0.0-127.255.255.254; add --prefixes P to use more ports"
            )),
            None => Ok(Sources { count, prefixes }),
            Some(p) if p == 0 || p > MAX_PREFIXES => Err(format!(
                "--prefixes {p}: 127.1.0.0/8 holds 1 to {MAX_PREFIXES} /24s"
            )),
            Some(p) if count < p as u64 => Err(format!(
                "--prefixes {p} with --sources {count}: every prefix needs a source; raise --sources or lower --prefixes"
            )),
            Some(p) if count > p as u64 * HOSTS_PER_PREFIX * PORTS_PER_HOST => Err(format!(
                "--sources {count}: {p} prefixes hold at most {} (254 hosts x {PORTS_PER_HOST} ports each); raise --prefixes",
                p as u64 * HOSTS_PER_PREFIX * PORTS_PER_HOST
            )),
            Some(_) => Ok(Sources { count, prefixes }),
        }
    }

    /// Source `k` (`k < count`): with prefixes, consecutive `k` are in
    /// consecutive /24s (round robin), so a flood touches every prefix
    /// before it repeats one.
    pub fn addr(&self, k: u64) -> SocketAddrV4 {
        match self.prefixes {
            None => source(k),
            Some(p) => {
                let p = p as u64;
                let prefix = FIRST_PREFIX + (k % p) as u32;
                let nth = k / p;
                let host = 1 + (nth % HOSTS_PER_PREFIX) as u32;
                let port = SPREAD_PORT + (nth / HOSTS_PER_PREFIX) as u16;
                SocketAddrV4::new(Ipv4Addr::from((prefix << 8) | host), port)
            }
        }
    }

    /// How many /24s the first `used` sources span.
    pub fn prefixes_used(&self, used: u64) -> u64 {
        let used = used.min(self.count);
        match self.prefixes {
            Some(p) => used.min(p as u64),
            None if used == 0 => 0,
            None => {
                let first = u32::from(SOURCE_BASE) >> 8;
                let last = u32::from(*source(used - 1).ip()) >> 8;
                (last - first + 1) as u64
            }
        }
    }
}

/// What the attack got.
#[derive(Debug, Clone, Serialize)]
pub struct SpoofReport {
    /// "spoof".
    pub scenario: String,
    /// What was forged.
    pub forge: Forge,
    /// Forged datagrams sent.
    pub forged_datagrams: u64,
    /// Their payload bytes.
    pub forged_bytes: u64,
    /// Distinct forged sources.
    pub sources: u64,
    /// Bound victims among them.
    pub victims: usize,
    /// Payload bytes sent in the victims' names.
    pub bytes_sent_as_victims: u64,
    /// Payload bytes the victims received.
    pub victim_bytes_received: u64,
    /// Datagrams the victims received.
    pub victim_datagrams_received: u64,
    /// victim_bytes_received / bytes_sent_as_victims.
    pub amplification: f64,
    /// Messages the real member sent meanwhile.
    pub member_messages: u64,
    /// `udphub_clients` growth during the attack (with `--metrics-url`).
    pub table_slots_gained: Option<f64>,
    /// Relay RSS growth during the attack (with `--relay-pid`).
    pub rss_growth_bytes: Option<i64>,
    /// The relay's counters that moved (with `--metrics-url`).
    pub relay_counters: Vec<(String, f64)>,
    /// After a forged `quit` and `^join^elsewhere` in its name, the member
    /// still got the room's next message.
    pub member_kept_after_forged_quit: bool,
}

/// An IPv4+UDP datagram with a forged source, for an `IPPROTO_RAW` socket.
/// The kernel fills in the IP checksum and id; the UDP checksum is 0
/// ("none", allowed over IPv4).
pub fn forged(from: SocketAddrV4, to: SocketAddrV4, payload: &[u8], out: &mut Vec<u8>) {
    let total = 20 + 8 + payload.len();
    let udp_len = 8 + payload.len();
    out.clear();
    out.extend_from_slice(&[0x45, 0]);
    out.extend_from_slice(&(total as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]);
    out.extend_from_slice(&from.ip().octets());
    out.extend_from_slice(&to.ip().octets());
    out.extend_from_slice(&from.port().to_be_bytes());
    out.extend_from_slice(&to.port().to_be_bytes());
    out.extend_from_slice(&(udp_len as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(payload);
}

/// Forged source `k` (not a victim): 127.78.0.0 + k.
fn source(k: u64) -> SocketAddrV4 {
    SocketAddrV4::new(
        Ipv4Addr::from(u32::from(SOURCE_BASE) + k as u32),
        SOURCE_PORT,
    )
}

/// What the attacker forges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Forge {
    /// Everything that would register, ask for a cookie, relay or move
    /// someone if the relay let it, in turn.
    Mix,
    /// Only `^hb^`: the cheapest registration, what an amplification
    /// attacker sends against a relay that trusts sources.
    Heartbeat,
    /// Only 64-byte `^hello^`s: the most a relay in verify mode answers.
    Hello,
}

impl Forge {
    /// The datagrams, used in turn.
    fn payloads(self) -> Vec<Vec<u8>> {
        match self {
            Forge::Mix => vec![
                hello(),
                b"^hb^".to_vec(),
                b"register me and send me everything".to_vec(),
                vec![b'x'; 200],
                b"^cookie^AAAAAAAAAAAAAAAAAAAAAA^join^lobby".to_vec(),
                b"^join^lobby".to_vec(),
            ],
            Forge::Heartbeat => vec![b"^hb^".to_vec()],
            Forge::Hello => vec![hello()],
        }
    }
}

/// The forging socket, aimed at one relay on 127.0.0.0/8.
pub struct Raw {
    sock: socket2::Socket,
    dest: socket2::SockAddr,
    relay: SocketAddrV4,
    packet: Vec<u8>,
}

impl Raw {
    /// Opens the raw socket, refusing a relay outside 127.0.0.0/8.
    pub fn open(relay: SocketAddr) -> Result<Raw, String> {
        let relay = match relay {
            SocketAddr::V4(v4) if v4.ip().is_loopback() => v4,
            other => {
                return Err(format!(
                    "--spoof forges 127.0.0.0/8 sources at a relay on 127.0.0.0/8 only; --relay {other} is not"
                ))
            }
        };
        let sock = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::RAW,
            Some(socket2::Protocol::from(libc::IPPROTO_RAW)),
        )
        .map_err(|e| format!("--spoof needs a raw socket (root or CAP_NET_RAW): {e}"))?;
        Ok(Raw {
            sock,
            dest: SocketAddr::V4(relay).into(),
            relay,
            packet: Vec::with_capacity(2048),
        })
    }

    /// The relay it aims at.
    pub fn relay(&self) -> SocketAddrV4 {
        self.relay
    }

    /// Sends `payload` as if from `from`, retrying while the socket is full.
    pub fn send(&mut self, from: SocketAddrV4, payload: &[u8]) -> Result<(), String> {
        assert!(from.ip().is_loopback(), "only loopback sources are forged");
        forged(from, self.relay, payload, &mut self.packet);
        for _ in 0..10_000 {
            match self.sock.send_to(&self.packet, &self.dest) {
                Ok(_) => return Ok(()),
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::ENOBUFS | libc::EAGAIN | libc::EINTR)
                    ) =>
                {
                    std::thread::sleep(Duration::from_micros(20))
                }
                Err(e) => return Err(format!("forged send from {from}: {e}")),
            }
        }
        Err("the raw socket stayed full".into())
    }
}

/// Counts what reached the victims.
pub struct Victims {
    socks: Vec<UdpSocket>,
    /// Their addresses: forged sources 0..n.
    pub addrs: Vec<SocketAddrV4>,
    /// Payload bytes they received.
    pub bytes: u64,
    /// Datagrams they received.
    pub datagrams: u64,
    buf: Vec<u8>,
}

impl Victims {
    /// Binds `n` victims on 127.77.0.1 upwards, ports from the kernel.
    pub fn bind(n: usize) -> Result<Victims, String> {
        let mut socks = Vec::new();
        let mut addrs = Vec::new();
        for i in 0..n {
            let ip = Ipv4Addr::from(u32::from(VICTIM_BASE) + i as u32);
            let s = UdpSocket::bind((ip, 0)).map_err(|e| format!("bind victim {ip}: {e}"))?;
            s.set_nonblocking(true).map_err(|e| e.to_string())?;
            let SocketAddr::V4(a) = s.local_addr().map_err(|e| e.to_string())? else {
                unreachable!("bound on IPv4")
            };
            socks.push(s);
            addrs.push(a);
        }
        Ok(Victims {
            socks,
            addrs,
            bytes: 0,
            datagrams: 0,
            buf: vec![0; 65_536],
        })
    }

    /// Counts what is waiting, without blocking.
    pub fn drain(&mut self) {
        for s in &self.socks {
            while let Ok(n) = s.recv(&mut self.buf) {
                self.bytes += n as u64;
                self.datagrams += 1;
            }
        }
    }
}

/// The forged datagrams: which source each is from (victims first, then
/// the layout's), what it says, and the tally.
pub struct Flood {
    raw: Raw,
    layout: Sources,
    /// Distinct sources, victims included.
    pub sources: u64,
    /// The bound victims (sources 0..n).
    pub victims: Victims,
    payloads: Vec<Vec<u8>>,
    /// Datagrams forged so far.
    pub sent: u64,
    /// Their payload bytes.
    pub bytes: u64,
    /// Payload bytes forged in the victims' names.
    pub as_victims: u64,
}

impl Flood {
    /// Opens the raw socket and binds the victims.
    pub fn new(relay: SocketAddr, plan: &Plan) -> Result<Flood, String> {
        let raw = Raw::open(relay)?;
        let victims_n = plan.victims.clamp(1, MAX_VICTIMS);
        let sources = plan.sources.max(victims_n as u64);
        let layout = Sources::new(sources, plan.prefixes)?;
        Ok(Flood {
            raw,
            layout,
            sources,
            victims: Victims::bind(victims_n)?,
            payloads: plan.forge.payloads(),
            sent: 0,
            bytes: 0,
            as_victims: 0,
        })
    }

    /// The source layout.
    pub fn layout(&self) -> Sources {
        self.layout
    }

    /// Forges the next datagram; every 256th, counts what reached the
    /// victims and, with a `rate`, sleeps until it is due.
    pub fn send_next(&mut self, t0: Instant, rate: Option<f64>) -> Result<(), String> {
        let i = self.sent;
        let k = i % self.sources;
        let payload = &self.payloads[(i % self.payloads.len() as u64) as usize];
        let victims_n = self.victims.addrs.len() as u64;
        let from = if k < victims_n {
            self.as_victims += payload.len() as u64;
            self.victims.addrs[k as usize]
        } else {
            self.layout.addr(k - victims_n)
        };
        self.raw.send(from, payload)?;
        self.bytes += payload.len() as u64;
        self.sent += 1;
        if i % 256 == 0 {
            self.victims.drain();
            if let Some(rate) = rate.filter(|r| *r > 0.0) {
                let due = Duration::from_secs_f64(i as f64 / rate);
                if let Some(ahead) = due.checked_sub(t0.elapsed()) {
                    std::thread::sleep(ahead);
                }
            }
        }
        Ok(())
    }

    /// Distinct sources used so far.
    pub fn sources_used(&self) -> u64 {
        self.sent.min(self.sources)
    }

    /// The raw socket, for single forged datagrams.
    pub fn raw(&mut self) -> &mut Raw {
        &mut self.raw
    }
}

/// Runs the attack.
pub fn run(c: &Common, plan: &Plan) -> Result<SpoofReport, String> {
    let relay = c.relay_addr()?;
    let mut flood = Flood::new(relay, plan)?;
    let register = Duration::from_secs(5);
    let speaker = Member::join(relay, plan.verify, register)?;
    let witness = Member::join(relay, plan.verify, register)?;
    // A member hears its answer before the relay has flushed that batch's
    // counts (the gauge of clients among them): wait until they are still,
    // so the members' own slots are not taken for the attack's.
    settle(c, plan.wait)?;
    let before = c.scrape_optional()?;
    let rss_before = c.relay_pid.and_then(procfs::rss_bytes);

    let said = b"the conversation a victim must not get; long enough to be worth stealing";
    let t0 = Instant::now();
    let mut member_messages = 0u64;
    loop {
        let i = flood.sent;
        let more = match plan.datagrams {
            Some(n) => i < n,
            // Time is checked every 256 datagrams: a clock read costs as
            // much as building a datagram.
            None => i % 256 != 0 || t0.elapsed() < plan.duration,
        };
        if !more {
            break;
        }
        flood.send_next(t0, plan.rate)?;
        if plan.talk_every > 0 && i % plan.talk_every == 0 {
            speaker.send(said)?;
            member_messages += 1;
        }
    }
    // One last message, so a victim registered at the very end hears it.
    speaker.send(said)?;
    member_messages += 1;
    settle(c, plan.wait)?;
    let deadline = Instant::now() + plan.wait;
    while Instant::now() < deadline {
        flood.victims.drain();
        std::thread::sleep(Duration::from_millis(10));
    }
    let after = c.scrape_optional()?;
    let rss_after = c.relay_pid.and_then(procfs::rss_bytes);
    let (slots, counters) = match (&before, &after) {
        (Some(b), Some(a)) => (
            Some(a.get("udphub_clients") - b.get("udphub_clients")),
            crate::abuse::changed(&Scrape::delta(b, a)),
        ),
        _ => (None, Vec::new()),
    };

    // The forged leave: a `quit` and a `^join^` in the speaker's name.
    let SocketAddr::V4(speaker_addr) = speaker.addr()? else {
        unreachable!("the relay is IPv4, so is its member")
    };
    flood.raw().send(speaker_addr, b"quit")?;
    flood.raw().send(speaker_addr, b"^join^elsewhere")?;
    std::thread::sleep(Duration::from_millis(50));
    let nonce = format!("still there? {}", std::process::id());
    let mut buf = vec![0u8; 65_536];
    let mut kept = false;
    for _ in 0..3 {
        witness.send(nonce.as_bytes())?;
        if speaker
            .recv_matching(&mut buf, plan.wait.max(Duration::from_millis(300)), |d| {
                d.windows(nonce.len()).any(|w| w == nonce.as_bytes())
            })
            .is_some()
        {
            kept = true;
            break;
        }
    }
    speaker.leave();
    witness.leave();

    Ok(SpoofReport {
        scenario: "spoof".into(),
        forge: plan.forge,
        forged_datagrams: flood.sent,
        forged_bytes: flood.bytes,
        sources: flood.sources,
        victims: flood.victims.addrs.len(),
        bytes_sent_as_victims: flood.as_victims,
        victim_bytes_received: flood.victims.bytes,
        victim_datagrams_received: flood.victims.datagrams,
        amplification: ratio(flood.victims.bytes, flood.as_victims),
        member_messages,
        table_slots_gained: slots,
        rss_growth_bytes: match (rss_before, rss_after) {
            (Some(a), Some(b)) => Some(b as i64 - a as i64),
            _ => None,
        },
        relay_counters: counters,
        member_kept_after_forged_quit: kept,
    })
}

/// `got / sent`, 0 when nothing was sent.
pub fn ratio(got: u64, sent: u64) -> f64 {
    if sent == 0 {
        0.0
    } else {
        got as f64 / sent as f64
    }
}

/// Waits (up to 5 s) until the relay has ended `n` more loop passes than
/// now (`udphub_loop_iteration_seconds_count`, summed over loops): a pass
/// publishes its counts before its own sample, so every datagram the relay
/// sent before this call is in its counters afterwards, however long the
/// scheduler kept the loop from its flush. (An idle loop still ends a pass
/// at least every second.)
pub fn passes_after(c: &Common, n: u64) -> Result<(), String> {
    let Some(url) = &c.metrics_url else {
        return Ok(());
    };
    let passes = |s: &Scrape| s.sum("udphub_loop_iteration_seconds_count");
    let want = passes(&crate::metrics::scrape_all(url)?) + n as f64;
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if passes(&crate::metrics::scrape_all(url)?) >= want {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Waits (bounded) until the relay has taken everything: its datagram
/// and delivery counters stay unchanged over two 200 ms looks. Without
/// `--metrics-url`, waits `wait`.
pub fn settle(c: &Common, wait: Duration) -> Result<(), String> {
    let Some(url) = &c.metrics_url else {
        std::thread::sleep(wait);
        return Ok(());
    };
    // What it read and what it sent (a loop starved of CPU publishes its
    // counts late: the sends count too, and twice unchanged in a row).
    let seen = |s: &Scrape| {
        (
            s.sum("udphub_datagrams_received_total")
                + s.sum("udphub_dropped_total")
                + s.get("udphub_kernel_rx_dropped_total"),
            s.sum("udphub_deliveries_total") + s.sum("udphub_delivery_dropped_total"),
        )
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = seen(&crate::metrics::scrape_all(url)?);
    let mut unchanged = 0;
    while Instant::now() < deadline && unchanged < 2 {
        std::thread::sleep(Duration::from_millis(200));
        let now = seen(&crate::metrics::scrape_all(url)?);
        unchanged = if now == last { unchanged + 1 } else { 0 };
        last = now;
    }
    Ok(())
}

impl SpoofReport {
    /// The human-readable table.
    pub fn print_table(&self) {
        println!(
            "spoof: {} forged datagrams from {} sources ({} bound victims)",
            self.forged_datagrams, self.sources, self.victims
        );
        row(
            "sent as the victims",
            format!("{} bytes", self.bytes_sent_as_victims),
        );
        row(
            "victims received",
            format!(
                "{} bytes in {} datagrams",
                self.victim_bytes_received, self.victim_datagrams_received
            ),
        );
        row("amplification", format!("{:.3}x", self.amplification));
        row(
            "table slots gained",
            self.table_slots_gained
                .map_or("? (add --metrics-url)".into(), |s| s.to_string()),
        );
        row(
            "relay RSS growth",
            self.rss_growth_bytes
                .map_or("? (add --relay-pid)".into(), |b| format!("{b} bytes")),
        );
        row(
            "member kept after a forged quit",
            self.member_kept_after_forged_quit.to_string(),
        );
        for (k, v) in &self.relay_counters {
            row(k, format!("+{v}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_forged_header_is_ipv4_udp_from_the_given_source() {
        let from = SocketAddrV4::new(Ipv4Addr::new(127, 77, 0, 1), 5000);
        let to = SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 1), 9999);
        let mut p = Vec::new();
        forged(from, to, b"hi", &mut p);
        assert_eq!(p.len(), 30);
        assert_eq!(p[0], 0x45);
        assert_eq!(u16::from_be_bytes([p[2], p[3]]), 30);
        assert_eq!(p[9], 17, "UDP");
        assert_eq!(&p[12..16], &[127, 77, 0, 1]);
        assert_eq!(&p[16..20], &[127, 0, 0, 1]);
        assert_eq!(u16::from_be_bytes([p[20], p[21]]), 5000);
        assert_eq!(u16::from_be_bytes([p[22], p[23]]), 9999);
        assert_eq!(u16::from_be_bytes([p[24], p[25]]), 10);
        assert_eq!(&p[28..], b"hi");
    }

    #[test]
    fn spread_sources_are_distinct_round_robin_and_never_in_127_0_0() {
        let s = Sources::new(3 * 254 * 2 + 5, Some(3)).unwrap();
        let mut seen = std::collections::HashSet::new();
        for k in 0..s.count {
            let a = s.addr(k);
            let o = a.ip().octets();
            assert!(a.ip().is_loopback() && (o[1], o[2]) != (0, 0), "{a}");
            assert!((1..=254).contains(&o[3]) && a.port() >= SPREAD_PORT, "{a}");
            assert_eq!(u32::from(*a.ip()) >> 8, FIRST_PREFIX + (k % 3) as u32);
            assert!(seen.insert(a), "{a} twice");
        }
        assert_eq!(s.addr(0), "127.1.0.1:61000".parse().unwrap());
        assert_eq!(s.addr(3 * 254), "127.1.0.1:61001".parse().unwrap());
        assert_eq!(s.prefixes_used(2), 2);
        assert_eq!(s.prefixes_used(s.count), 3);
        let last = Sources::new(u64::from(MAX_PREFIXES), Some(MAX_PREFIXES)).unwrap();
        assert_eq!(
            *last.addr(last.count - 1).ip(),
            Ipv4Addr::new(127, 255, 255, 1)
        );
    }

    #[test]
    fn impossible_layouts_say_which_flag_fixes_them() {
        assert!(Sources::new(0, None).unwrap_err().contains("--sources"));
        assert!(Sources::new(MAX_SOURCES + 1, None)
            .unwrap_err()
            .contains("--prefixes"));
        assert!(Sources::new(10, Some(0))
            .unwrap_err()
            .contains("--prefixes 0"));
        assert!(Sources::new(10, Some(MAX_PREFIXES + 1)).is_err());
        assert!(Sources::new(10, Some(20))
            .unwrap_err()
            .contains("raise --sources"));
        let full = 254 * PORTS_PER_HOST;
        assert!(Sources::new(full, Some(1)).is_ok());
        assert!(Sources::new(full + 1, Some(1))
            .unwrap_err()
            .contains("raise --prefixes"));
        let consecutive = Sources::new(600, None).unwrap();
        assert_eq!(consecutive.prefixes_used(600), 3);
    }

    #[test]
    fn sources_stay_in_127_8() {
        assert!(source(0).ip().is_loopback());
        let last = *source(MAX_SOURCES - 1).ip();
        assert!(last.is_loopback() && last < Ipv4Addr::new(127, 255, 255, 255));
    }
}
