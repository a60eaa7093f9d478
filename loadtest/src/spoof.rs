//! `loadtest abuse --spoof N`: an off-path attacker forging source
//! addresses. A raw socket (`IPPROTO_RAW`, so the IP header is ours: root
//! or CAP_NET_RAW) sends datagrams "from" victims bound on 127.77.0.x and
//! from unbound 127.78.0.0+ sources, while a real member keeps talking.
//! It reports the amplification factor (bytes the victims received / bytes
//! sent in their names), the table slots the attacker got, the relay's RSS
//! growth, and whether a forged `quit` evicted a member.
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

/// What to forge.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Forged datagrams to send.
    pub datagrams: u64,
    /// Distinct forged sources (the first `victims` are bound listeners).
    pub sources: u64,
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

struct Raw {
    sock: socket2::Socket,
    dest: socket2::SockAddr,
    relay: SocketAddrV4,
    packet: Vec<u8>,
}

impl Raw {
    fn open(relay: SocketAddr) -> Result<Raw, String> {
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

    /// Sends `payload` as if from `from`, retrying while the socket is full.
    fn send(&mut self, from: SocketAddrV4, payload: &[u8]) -> Result<(), String> {
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
struct Victims {
    socks: Vec<UdpSocket>,
    addrs: Vec<SocketAddrV4>,
    bytes: u64,
    datagrams: u64,
    buf: Vec<u8>,
}

impl Victims {
    fn bind(n: usize) -> Result<Victims, String> {
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

    fn drain(&mut self) {
        for s in &self.socks {
            while let Ok(n) = s.recv(&mut self.buf) {
                self.bytes += n as u64;
                self.datagrams += 1;
            }
        }
    }
}

/// Runs the attack.
pub fn run(c: &Common, plan: &Plan) -> Result<SpoofReport, String> {
    let relay = c.relay_addr()?;
    let mut raw = Raw::open(relay)?;
    let victims_n = plan.victims.clamp(1, MAX_VICTIMS);
    let sources = plan.sources.clamp(victims_n as u64, MAX_SOURCES);
    let register = Duration::from_secs(5);
    let speaker = Member::join(relay, plan.verify, register)?;
    let witness = Member::join(relay, plan.verify, register)?;
    let mut victims = Victims::bind(victims_n)?;
    let before = c.scrape_optional()?;
    let rss_before = c.relay_pid.and_then(procfs::rss_bytes);

    let mix = plan.forge.payloads();
    let said = b"the conversation a victim must not get; long enough to be worth stealing";
    let t0 = Instant::now();
    let (mut forged_bytes, mut as_victims, mut member_messages) = (0u64, 0u64, 0u64);
    for i in 0..plan.datagrams {
        let k = i % sources;
        let payload = &mix[(i % mix.len() as u64) as usize];
        let from = if (k as usize) < victims_n {
            as_victims += payload.len() as u64;
            victims.addrs[k as usize]
        } else {
            source(k - victims_n as u64)
        };
        raw.send(from, payload)?;
        forged_bytes += payload.len() as u64;
        if plan.talk_every > 0 && i % plan.talk_every == 0 {
            speaker.send(said)?;
            member_messages += 1;
        }
        if i % 256 == 0 {
            victims.drain();
            if let Some(rate) = plan.rate.filter(|r| *r > 0.0) {
                let due = Duration::from_secs_f64(i as f64 / rate);
                if let Some(ahead) = due.checked_sub(t0.elapsed()) {
                    std::thread::sleep(ahead);
                }
            }
        }
    }
    // One last message, so a victim registered at the very end hears it.
    speaker.send(said)?;
    member_messages += 1;
    settle(c, plan.wait)?;
    let deadline = Instant::now() + plan.wait;
    while Instant::now() < deadline {
        victims.drain();
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
    raw.send(speaker_addr, b"quit")?;
    raw.send(speaker_addr, b"^join^elsewhere")?;
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
        forged_datagrams: plan.datagrams,
        forged_bytes,
        sources,
        victims: victims_n,
        bytes_sent_as_victims: as_victims,
        victim_bytes_received: victims.bytes,
        victim_datagrams_received: victims.datagrams,
        amplification: if as_victims == 0 {
            0.0
        } else {
            victims.bytes as f64 / as_victims as f64
        },
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

/// Waits (bounded) until the relay has taken everything: its datagram
/// counters stop moving for 200 ms. Without `--metrics-url`, waits `wait`.
fn settle(c: &Common, wait: Duration) -> Result<(), String> {
    let Some(url) = &c.metrics_url else {
        std::thread::sleep(wait);
        return Ok(());
    };
    let seen = |s: &Scrape| {
        s.sum("udphub_datagrams_received_total")
            + s.sum("udphub_dropped_total")
            + s.get("udphub_kernel_rx_dropped_total")
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = seen(&crate::metrics::scrape_all(url)?);
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        let now = seen(&crate::metrics::scrape_all(url)?);
        if now == last {
            break;
        }
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
    fn sources_stay_in_127_8() {
        assert!(source(0).ip().is_loopback());
        let last = *source(MAX_SOURCES - 1).ip();
        assert!(last.is_loopback() && last < Ipv4Addr::new(127, 255, 255, 255));
    }
}
