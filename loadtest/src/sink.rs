//! `loadtest fanout --sink`: the relay's send capacity, with receivers that
//! never read.
//!
//! In closed loop on a small machine the load generator's receivers need a
//! core of their own, so they, not the relay, set the pace. Here the
//! clients register, prove it by reading one probe each, shrink their
//! receive buffers to the minimum and never read again. After a warm-up
//! that fills every receive queue, each delivery ends in the kernel as a
//! receive-buffer drop, at almost no cost to loadtest, and is counted by
//! the kernel: `/proc/net/snmp`'s `Udp: RcvbufErrors`, plus `InDatagrams`
//! (which counts datagrams *read*: the relay reading what loadtest sent),
//! less what loadtest itself sent to the relay in the window. So the
//! figure is what reached the receivers' sockets, whoever the relay is. The senders send open loop
//! at `--rate`; set it above what the relay can fan out, so the relay is
//! the bottleneck throughout.
//!
//! Other UDP traffic in the same network namespace during the run would be
//! counted too: run it on a quiet machine (or namespace).

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::fanout::FanoutArgs;
use crate::report::RelayUsage;

/// What a sink run measured.
#[derive(Debug, Clone, Serialize)]
pub struct SinkReport {
    /// The relay under test.
    pub relay: String,
    /// Clients registered (each a receiver that stopped reading).
    pub clients: usize,
    /// Clients that sent.
    pub senders: usize,
    /// Messages per second asked of the senders, in all.
    pub rate: f64,
    /// The measured window, in seconds.
    pub seconds: f64,
    /// Messages sent in the window.
    pub messages_sent: u64,
    /// Heartbeats sent in the window (to stay registered).
    pub heartbeats_sent: u64,
    /// Deliveries that reached the receivers' sockets, per the kernel.
    pub kernel_deliveries: u64,
    /// The same, per second.
    pub kernel_deliveries_per_s: f64,
    /// Of those, dropped at a full receive queue (RcvbufErrors).
    pub kernel_rcvbuf_errors: u64,
    /// Datagrams the kernel dropped on the way, before any socket: the
    /// per-CPU backlog was full (`/proc/net/softnet_stat`; on loopback
    /// every datagram passes it). Sent by the relay, received by no one.
    pub kernel_backlog_drops: u64,
    /// What the relay counted as delivered (`udphub_deliveries_total`), if
    /// its metrics were given.
    pub relay_deliveries: Option<f64>,
    /// Deliveries the relay dropped (`udphub_delivery_dropped_total`).
    pub relay_delivery_dropped: Option<f64>,
    /// Datagrams the kernel dropped before the relay read them.
    pub relay_kernel_rx_dropped: Option<f64>,
    /// The relay's CPU and memory, with `--relay-pid`.
    pub relay_usage: Option<RelayUsage>,
    /// Relay CPU nanoseconds per kernel-counted delivery.
    pub relay_cpu_ns_per_delivery: Option<f64>,
}

impl SinkReport {
    /// The human-readable table.
    pub fn print_table(&self) {
        println!(
            "sink against {} ({}, {} at {:.0} msgs/s, {:.2} s)",
            self.relay,
            crate::report::plural(self.clients, "client"),
            crate::report::plural(self.senders, "sender"),
            self.rate,
            self.seconds
        );
        println!(
            "  deliveries (kernel)   {} ({:.0}/s; {} at full receive queues)",
            self.kernel_deliveries, self.kernel_deliveries_per_s, self.kernel_rcvbuf_errors
        );
        println!("  messages sent         {}", self.messages_sent);
        println!("  kernel backlog drops  {}", self.kernel_backlog_drops);
        if let Some(d) = self.relay_deliveries {
            println!("  relay deliveries      {d:.0}");
        }
        if let Some(d) = self.relay_delivery_dropped {
            println!("  relay delivery drops  {d:.0}");
        }
        if let Some(d) = self.relay_kernel_rx_dropped {
            println!("  relay kernel rx drops {d:.0}");
        }
        if let Some(ns) = self.relay_cpu_ns_per_delivery {
            println!("  relay CPU / delivery  {ns:.0} ns");
        }
    }
}

/// The load runs this long before the window opens, to fill the queues.
const WARM_UP: Duration = Duration::from_millis(700);

/// What was read when the window opened.
struct Window {
    relay: Option<crate::metrics::Scrape>,
    cpu: Option<f64>,
    kernel: UdpCounters,
    backlog: u64,
}

/// Packets dropped at a full per-CPU backlog, all CPUs
/// (`/proc/net/softnet_stat`, second column, hexadecimal).
pub fn backlog_drops() -> u64 {
    std::fs::read_to_string("/proc/net/softnet_stat")
        .map(|t| {
            t.lines()
                .filter_map(|l| l.split_whitespace().nth(1))
                .filter_map(|h| u64::from_str_radix(h, 16).ok())
                .sum()
        })
        .unwrap_or(0)
}

/// `Udp:` counters of `/proc/net/snmp` (this network namespace).
#[derive(Debug, Clone, Copy, Default)]
struct UdpCounters {
    in_datagrams: u64,
    rcvbuf_errors: u64,
}

fn udp_counters() -> Result<UdpCounters, String> {
    let text =
        std::fs::read_to_string("/proc/net/snmp").map_err(|e| format!("/proc/net/snmp: {e}"))?;
    parse_snmp(&text).ok_or_else(|| "/proc/net/snmp: no Udp counters".to_string())
}

/// The `Udp:` header and value lines, by column name.
fn parse_snmp(text: &str) -> Option<UdpCounters> {
    let mut udp = text.lines().filter(|l| l.starts_with("Udp:"));
    let names: Vec<&str> = udp.next()?.split_whitespace().collect();
    let values: Vec<&str> = udp.next()?.split_whitespace().collect();
    let get = |name: &str| -> Option<u64> {
        let i = names.iter().position(|n| *n == name)?;
        values.get(i)?.parse().ok()
    };
    Some(UdpCounters {
        in_datagrams: get("InDatagrams")?,
        rcvbuf_errors: get("RcvbufErrors")?,
    })
}

/// Runs the sink measurement.
pub fn run(args: &FanoutArgs) -> Result<SinkReport, String> {
    let c = &args.common;
    let relay = c.relay_addr()?;
    if args.verify || args.rooms > 0 || args.flood.is_some() {
        return Err(
            "--sink measures the lobby's fan-out: leave out --verify, --rooms and --flood".into(),
        );
    }
    let rate = args
        .rate
        .ok_or("--sink needs --rate: messages per second, more than the relay can fan out")?;
    if !(rate > 0.0 && rate.is_finite()) {
        return Err("--rate must be more than 0".into());
    }
    let n = args.clients.max(1);
    let senders = args.senders.clamp(1, n);
    let local: SocketAddr = if relay.is_ipv6() {
        "[::1]:0".parse().map_err(|_| "bad address")?
    } else {
        "127.0.0.1:0".parse().map_err(|_| "bad address")?
    };
    let socks: Vec<UdpSocket> = (0..n)
        .map(|_| UdpSocket::bind(local))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("open client sockets: {e}"))?;
    // Register, then prove it: every client reads one probe.
    for s in &socks {
        s.send_to(b"^hb^", relay)
            .map_err(|e| format!("send: {e}"))?;
    }
    std::thread::sleep(Duration::from_millis(200));
    let probe = b"loadtest sink probe";
    socks[0]
        .send_to(probe, relay)
        .map_err(|e| format!("send: {e}"))?;
    let mut buf = vec![0u8; 65_536];
    let mut registered = 0;
    // One deadline for them all: a relay that is not there costs
    // --register-timeout (at most 2 s), not that much per client.
    let deadline = Instant::now() + args.register_timeout.min(Duration::from_secs(2));
    for s in &socks {
        let left = deadline.saturating_duration_since(Instant::now());
        // (A zero read timeout means "block forever": keep a millisecond.)
        s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .map_err(|e| e.to_string())?;
        // The probe, rendered by the relay: it contains the text.
        while let Ok((len, _)) = s.recv_from(&mut buf) {
            if buf[..len].windows(probe.len()).any(|w| w == probe) {
                registered += 1;
                break;
            }
        }
    }
    if registered < n {
        return Err(format!(
            "only {registered} of {n} clients received the probe: is the relay at {relay} running?"
        ));
    }
    for s in &socks {
        // The kernel rounds this up to its minimum (a couple of datagrams).
        let _ = socket2::SockRef::from(s).set_recv_buffer_size(1);
    }

    let payload = vec![b'x'; args.payload.max(1)];
    let hb_every = args.heartbeat.max(Duration::from_millis(10));
    let mut hb_round = Instant::now();
    let mut next_hb = 0usize;
    // Warm-up: the same load for WARM_UP, so every receive queue is full
    // (and stays full) when the window opens.
    let mut window: Option<Window> = None;
    let warm_start = Instant::now();
    let mut start = warm_start;
    let (mut sent, mut heartbeats) = (0u64, 0u64);
    loop {
        if window.is_none() && warm_start.elapsed() >= WARM_UP {
            window = Some(Window {
                relay: c.scrape_optional()?,
                cpu: c.relay_pid.and_then(crate::procfs::cpu_seconds),
                kernel: udp_counters()?,
                backlog: backlog_drops(),
            });
            start = Instant::now();
            (sent, heartbeats) = (0, 0);
        }
        let elapsed = start.elapsed();
        if window.is_some() && elapsed >= c.duration {
            break;
        }
        // Open loop: whatever is due by now, whatever the relay does.
        let due = (elapsed.as_secs_f64() * rate) as u64;
        while sent < due {
            let s = &socks[(sent as usize) % senders];
            // A full send queue on our side would only delay us: count
            // what was handed to the kernel.
            if s.send_to(&payload, relay).is_ok() {
                sent += 1;
            } else {
                break;
            }
        }
        // Heartbeats spread over each round so every client stays live.
        let round = hb_round.elapsed();
        let hb_due = ((round.as_secs_f64() / hb_every.as_secs_f64()) * n as f64) as usize;
        while next_hb < hb_due.min(n) {
            if socks[next_hb].send_to(b"^hb^", relay).is_ok() {
                heartbeats += 1;
            }
            next_hb += 1;
        }
        if round >= hb_every {
            hb_round = Instant::now();
            next_hb = 0;
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    let seconds = start.elapsed().as_secs_f64();
    let kernel_after = udp_counters()?;
    let backlog_after = backlog_drops();
    let Window {
        relay: before_relay,
        cpu: cpu_before,
        kernel: kernel_before,
        backlog: backlog_before,
    } = window.ok_or("no measurement window")?;
    let cpu_after = c.relay_pid.and_then(crate::procfs::cpu_seconds);
    let after_relay = c.scrape_optional()?;

    let arrived = (kernel_after.in_datagrams - kernel_before.in_datagrams)
        + (kernel_after.rcvbuf_errors - kernel_before.rcvbuf_errors);
    let kernel_deliveries = arrived.saturating_sub(sent + heartbeats);
    let delta = match (&before_relay, &after_relay) {
        (Some(b), Some(a)) => Some(crate::metrics::Scrape::delta(b, a)),
        _ => None,
    };
    let cpu = match (cpu_before, cpu_after) {
        (Some(b), Some(a)) if kernel_deliveries > 0 => {
            Some((a - b) * 1e9 / kernel_deliveries as f64)
        }
        _ => None,
    };
    let relay_usage = c.relay_pid.map(|pid| RelayUsage {
        pid,
        cpu_seconds: match (cpu_before, cpu_after) {
            (Some(b), Some(a)) => Some(a - b),
            _ => None,
        },
        cpu_ns_per_delivery: cpu,
        rss_bytes: crate::procfs::rss_bytes(pid),
    });
    Ok(SinkReport {
        relay: relay.to_string(),
        clients: n,
        senders,
        rate,
        seconds,
        messages_sent: sent,
        heartbeats_sent: heartbeats,
        kernel_deliveries,
        kernel_deliveries_per_s: kernel_deliveries as f64 / seconds,
        kernel_rcvbuf_errors: kernel_after.rcvbuf_errors - kernel_before.rcvbuf_errors,
        kernel_backlog_drops: backlog_after.saturating_sub(backlog_before),
        relay_deliveries: delta.as_ref().map(|d| d.get("udphub_deliveries_total")),
        relay_delivery_dropped: delta
            .as_ref()
            .map(|d| d.sum("udphub_delivery_dropped_total")),
        relay_kernel_rx_dropped: delta
            .as_ref()
            .map(|d| d.get("udphub_kernel_rx_dropped_total")),
        relay_usage,
        relay_cpu_ns_per_delivery: cpu,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_udp_counters_by_name() {
        let text = "Ip: Forwarding\nIp: 1\nUdp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors\nUdp: 100 2 3 40 5 0\nUdpLite: InDatagrams\nUdpLite: 0\n";
        let c = parse_snmp(text).unwrap();
        assert_eq!((c.in_datagrams, c.rcvbuf_errors), (100, 5));
        assert!(udp_counters().is_ok(), "this machine has /proc/net/snmp");
    }
}
