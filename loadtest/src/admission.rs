//! `loadtest abuse --spoof --newcomers K --verify`: does admission hold
//! under a flood? A raw socket forges 64-byte `^hello^`s (what a client
//! sends for a cookie) from `--sources` addresses spread over `--prefixes`
//! /24s of 127/8, as fast as it takes them, for `--duration`; meanwhile K
//! real newcomers on 127.0.0.1 (the `newcomer` module) arrive, their starts
//! spread over that window, and do the cookie handshake. The flood goes on
//! until the last newcomer is in or has given up, so every try happens
//! under it.
//!
//! It reports how many newcomers got in and how fast, what the forged
//! sources got back (every byte the relay sent them, through the `tap`,
//! against the bytes forged: the amplification factor; and the bound
//! victims' count, as `abuse --spoof` measures it), the relay's RSS growth,
//! and its counters: drops by reason, and every datagram loadtest sent
//! either counted by the relay, dropped in its socket queue, or lost before
//! it (the host's backlog).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::metrics::Scrape;
use crate::newcomer::{Arrivals, Schedule};
use crate::procfs;
use crate::report::{row, Common};
use crate::spoof::{ratio, settle, Flood, NewcomerPlan, Plan};
use crate::tap::{Tap, TapCounts};

/// Where the newcomers live; forged sources never use its /24.
const NEWCOMER_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);

/// "Admitted within 2 s": the line the issue draws for a newcomer.
const PROMPT: Duration = Duration::from_secs(2);

/// Time to admit, over the admitted newcomers, in milliseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct AdmitTimes {
    /// Median.
    pub p50_ms: f64,
    /// 99th percentile (nearest rank).
    pub p99_ms: f64,
    /// The slowest.
    pub max_ms: f64,
}

impl AdmitTimes {
    /// Nearest-rank percentiles of `times`; None if empty.
    pub fn of(times: &[Duration]) -> Option<AdmitTimes> {
        if times.is_empty() {
            return None;
        }
        let mut ms: Vec<f64> = times.iter().map(|t| t.as_secs_f64() * 1e3).collect();
        ms.sort_by(f64::total_cmp);
        let rank = |q: f64| ms[((q * ms.len() as f64).ceil() as usize).clamp(1, ms.len()) - 1];
        Some(AdmitTimes {
            p50_ms: rank(0.5),
            p99_ms: rank(0.99),
            max_ms: *ms.last()?,
        })
    }
}

/// One newcomer in the report.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct NewcomerRow {
    /// Its first `^hello^`, after the flood's start, ms.
    pub started_ms: f64,
    /// Its time to admit, ms (null: not admitted).
    pub admit_ms: Option<f64>,
    /// `^hello^`s it sent.
    pub hellos: u32,
}

/// The report.
#[derive(Debug, Clone, Serialize)]
pub struct AdmissionReport {
    /// "spoof-newcomers".
    pub scenario: String,
    /// The relay.
    pub relay: String,
    /// How long the flood ran (`--duration`, or until the last newcomer
    /// was done).
    pub flood_seconds: f64,
    /// Forged `^hello^`s sent.
    pub forged_datagrams: u64,
    /// Their payload bytes (64 each).
    pub forged_bytes: u64,
    /// Forged datagrams per second.
    pub forged_per_s: f64,
    /// `--sources` (bound victims included).
    pub sources: u64,
    /// Distinct sources the flood used.
    pub sources_used: u64,
    /// /24 prefixes they span.
    pub prefixes_used: u64,
    /// Bound victims among the sources.
    pub victims: usize,
    /// `--newcomers`.
    pub newcomers: u32,
    /// Newcomers that got in (the relay answered their proven join).
    pub admitted: u32,
    /// `admitted / newcomers`.
    pub admitted_fraction: f64,
    /// Newcomers that got in within 2 s of their first `^hello^`.
    pub admitted_within_2s: u32,
    /// Newcomers that gave up.
    pub not_admitted: u32,
    /// First `^hello^` to admission, over the admitted.
    pub admit_ms: Option<AdmitTimes>,
    /// Each newcomer, in order of arrival.
    pub each: Vec<NewcomerRow>,
    /// `--retry`, ms.
    pub retry_ms: f64,
    /// `--give-up`, ms.
    pub give_up_ms: f64,
    /// `^hello^`s the newcomers sent.
    pub newcomer_hellos: u64,
    /// Cookies they received.
    pub newcomer_cookies: u64,
    /// Proven joins (`^cookie^C^join^`) they sent.
    pub newcomer_proofs: u64,
    /// Proven heartbeats the admitted sent (one a second) while the flood
    /// lasted, so that they stay members.
    pub newcomer_heartbeats: u64,
    /// Datagrams they sent in all.
    pub newcomer_datagrams_sent: u64,
    /// Payload bytes the relay sent to forged sources (the tap).
    pub relay_bytes_to_forged: u64,
    /// Datagrams the relay sent to forged sources (the tap).
    pub relay_datagrams_to_forged: u64,
    /// `relay_bytes_to_forged / forged_bytes`.
    pub amplification: f64,
    /// Everything the tap saw the relay send, and what it missed.
    pub tap: TapCounts,
    /// Payload bytes forged in the victims' names.
    pub bytes_sent_as_victims: u64,
    /// Payload bytes the victims received.
    pub victim_bytes_received: u64,
    /// `victim_bytes_received / bytes_sent_as_victims` (as `abuse --spoof`).
    pub victim_amplification: f64,
    /// `udphub_clients` growth over the flood (`--metrics-url`): the
    /// admitted newcomers, and nothing forged.
    pub relay_clients_gained: Option<f64>,
    /// Relay RSS before the flood (`--relay-pid`).
    pub rss_before_bytes: Option<u64>,
    /// Relay RSS after it.
    pub rss_after_bytes: Option<u64>,
    /// The growth.
    pub rss_growth_bytes: Option<i64>,
    /// `udphub_dropped_total` growth by reason (`--metrics-url`).
    pub relay_dropped: BTreeMap<String, f64>,
    /// `udphub_datagrams_received_total` growth by kind (`--metrics-url`;
    /// kind `dropped` is the sum of `relay_dropped`).
    pub relay_received: BTreeMap<String, f64>,
    /// `udphub_deliveries_total` growth: what the relay handed the kernel
    /// (cookies, answers), against which `tap.datagrams` is counted.
    pub relay_deliveries: Option<f64>,
    /// `udphub_kernel_rx_dropped_total` growth: loadtest's datagrams
    /// dropped in the relay's full socket queue.
    pub relay_kernel_rx_dropped: Option<f64>,
    /// Datagrams loadtest sent the relay (forged and newcomers').
    pub loadtest_sent: u64,
    /// Sent, but neither counted by the relay nor dropped in its queue:
    /// lost before it (see `host_backlog_drops`).
    pub lost_before_relay: Option<f64>,
    /// Packets this host's per-CPU backlogs dropped meanwhile
    /// (`/proc/net/softnet_stat`, every sender on the machine).
    pub host_backlog_drops: u64,
}

/// Runs the scenario: `plan.newcomers` must be set.
pub fn run(c: &Common, plan: &Plan, newcomers: NewcomerPlan) -> Result<AdmissionReport, String> {
    let relay = c.relay_addr()?;
    let mut flood = Flood::new(relay, plan)?;
    let relay_v4 = flood.raw().relay();
    let tap = Tap::start(relay_v4, |ip| ip != NEWCOMER_IP)?;
    let before = c.scrape_optional()?;
    let rss_before = c.relay_pid.and_then(procfs::rss_bytes);
    let backlog_before = crate::sink::backlog_drops();

    let schedule = Schedule {
        count: newcomers.count,
        window: plan.duration,
        retry: newcomers.retry,
        give_up: newcomers.give_up,
    };
    let t0 = Instant::now();
    let mut arrivals = Arrivals::bind(SocketAddr::V4(relay_v4), schedule, t0)?;
    let (done, stop) = (AtomicBool::new(false), AtomicBool::new(false));
    let (flooded, newcomers_ran) = std::thread::scope(|s| {
        let thread = s.spawn(|| {
            let r = arrivals.run(&done, &stop);
            // Ends the flood if the newcomers failed.
            done.store(true, Ordering::Relaxed);
            r
        });
        let flooded = flood_until(&mut flood, t0, plan, &done);
        stop.store(true, Ordering::Relaxed);
        let ran = thread
            .join()
            .unwrap_or_else(|_| Err("the newcomers' thread panicked".into()));
        (flooded, ran)
    });
    let flood_seconds = flooded?;
    newcomers_ran?;

    let synced = sync_kernel_drops(relay)?;
    settle(c, plan.wait)?;
    let deadline = Instant::now() + plan.wait;
    while Instant::now() < deadline {
        flood.victims.drain();
        std::thread::sleep(Duration::from_millis(10));
    }
    // The tap stops before the last scrape: the relay counts a delivery as
    // soon as `sendmmsg` returns, by when the tap has seen it, so what the
    // tap saw is in the scrape taken after it (under load a straggling
    // reply after the scrape would otherwise be seen but not counted).
    let tap = tap.stop();
    crate::spoof::passes_after(c, 2)?;
    settle(c, plan.wait)?;
    // A loop publishes its counts in batches (and, starved of CPU, late):
    // the last scrape is the first, within a bound, whose deliveries
    // account for every datagram the tap saw. One that never does (a
    // datagram sent but not counted) is reported as it is.
    let seen = tap.datagrams + tap.dropped;
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut after = c.scrape_optional()?;
    while let (Some(b), Some(a)) = (&before, &after) {
        let counted = Scrape::delta(b, a).get("udphub_deliveries_total");
        if counted >= seen as f64 || Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
        after = c.scrape_optional()?;
    }
    let rss_after = c.relay_pid.and_then(procfs::rss_bytes);
    let host_backlog_drops = crate::sink::backlog_drops().saturating_sub(backlog_before);
    arrivals.leave();

    let outcomes = arrivals.outcomes();
    let times: Vec<Duration> = outcomes.iter().filter_map(|o| o.admitted_after).collect();
    let admitted = times.len() as u32;
    let sum = |f: fn(&crate::newcomer::Outcome) -> u64| outcomes.iter().map(f).sum::<u64>();
    let newcomer_datagrams_sent = sum(|o| o.datagrams_sent);
    let loadtest_sent = flood.sent + newcomer_datagrams_sent + synced;
    let delta = match (&before, &after) {
        (Some(b), Some(a)) => Some(Scrape::delta(b, a)),
        _ => None,
    };
    let d = delta.as_ref();
    let relay_received = d.map_or_else(BTreeMap::new, |d| {
        by_label(d, "udphub_datagrams_received_total", "kind")
    });
    let relay_kernel_rx_dropped = d.map(|d| d.get("udphub_kernel_rx_dropped_total"));
    let layout = flood.layout();
    Ok(AdmissionReport {
        scenario: "spoof-newcomers".into(),
        relay: relay.to_string(),
        flood_seconds,
        forged_datagrams: flood.sent,
        forged_bytes: flood.bytes,
        forged_per_s: flood.sent as f64 / flood_seconds.max(1e-9),
        sources: flood.sources,
        sources_used: flood.sources_used(),
        prefixes_used: layout.prefixes_used(
            flood
                .sources_used()
                .saturating_sub(flood.victims.addrs.len() as u64),
        ),
        victims: flood.victims.addrs.len(),
        newcomers: newcomers.count,
        admitted,
        admitted_fraction: f64::from(admitted) / f64::from(newcomers.count.max(1)),
        admitted_within_2s: times.iter().filter(|t| **t <= PROMPT).count() as u32,
        not_admitted: newcomers.count - admitted,
        admit_ms: AdmitTimes::of(&times),
        each: outcomes
            .iter()
            .map(|o| NewcomerRow {
                started_ms: o.started_after.as_secs_f64() * 1e3,
                admit_ms: o.admitted_after.map(|t| t.as_secs_f64() * 1e3),
                hellos: o.hellos,
            })
            .collect(),
        retry_ms: newcomers.retry.as_secs_f64() * 1e3,
        give_up_ms: newcomers.give_up.as_secs_f64() * 1e3,
        newcomer_hellos: sum(|o| u64::from(o.hellos)),
        newcomer_cookies: sum(|o| u64::from(o.cookies)),
        newcomer_proofs: sum(|o| u64::from(o.proofs)),
        newcomer_heartbeats: sum(|o| u64::from(o.heartbeats)),
        newcomer_datagrams_sent,
        relay_bytes_to_forged: tap.to_forged_bytes,
        relay_datagrams_to_forged: tap.to_forged_datagrams,
        amplification: ratio(tap.to_forged_bytes, flood.bytes),
        tap,
        bytes_sent_as_victims: flood.as_victims,
        victim_bytes_received: flood.victims.bytes,
        victim_amplification: ratio(flood.victims.bytes, flood.as_victims),
        relay_clients_gained: d.map(|d| d.get("udphub_clients")),
        rss_before_bytes: rss_before,
        rss_after_bytes: rss_after,
        rss_growth_bytes: match (rss_before, rss_after) {
            (Some(a), Some(b)) => Some(b as i64 - a as i64),
            _ => None,
        },
        relay_dropped: d.map_or_else(BTreeMap::new, |d| {
            by_label(d, "udphub_dropped_total", "reason")
        }),
        relay_deliveries: d.map(|d| d.get("udphub_deliveries_total")),
        lost_before_relay: relay_kernel_rx_dropped
            .map(|k| loadtest_sent as f64 - relay_received.values().sum::<f64>() - k),
        relay_received,
        relay_kernel_rx_dropped,
        loadtest_sent,
        host_backlog_drops,
    })
}

/// Forges `^hello^`s as fast as the raw socket takes them (or at
/// `--rate`) until `--duration` has passed and every newcomer is done;
/// returns the seconds it ran.
fn flood_until(
    flood: &mut Flood,
    t0: Instant,
    plan: &Plan,
    done: &AtomicBool,
) -> Result<f64, String> {
    loop {
        // The clock and the flag are read once per 256 datagrams: a clock
        // read costs about as much as building a datagram.
        for _ in 0..256 {
            flood.send_next(t0, plan.rate)?;
        }
        let elapsed = t0.elapsed();
        if elapsed >= plan.duration && done.load(Ordering::Relaxed) {
            return Ok(elapsed.as_secs_f64());
        }
    }
}

/// Datagrams [`sync_kernel_drops`] sends: from this many sources, every
/// loop of a relay with `--threads` up to 8 gets one (the kernel picks a
/// loop's socket by a hash of the source; a loop missed by all 32 has odds
/// of 8 × (7/8)^32, under 2 %, and then a few drops go unreported).
const SYNC_SOURCES: u64 = 32;

/// The relay learns its socket queue's drop count (`SO_RXQ_OVFL`) from
/// the next datagram it reads, and datagrams dropped after the last one
/// queued are not yet told: after the flood, one small datagram from each
/// of a few fresh sockets brings every loop's count up to date. Each is
/// counted as sent (the relay drops them as unverified).
fn sync_kernel_drops(relay: SocketAddr) -> Result<u64, String> {
    for _ in 0..SYNC_SOURCES {
        let sock = std::net::UdpSocket::bind((NEWCOMER_IP, 0))
            .map_err(|e| format!("bind {NEWCOMER_IP}: {e}"))?;
        sock.send_to(b"sync", relay)
            .map_err(|e| format!("send to {relay}: {e}"))?;
    }
    Ok(SYNC_SOURCES)
}

/// A family's series summed by one label's value (`name{label="v"}` → v).
fn by_label(delta: &Scrape, family: &str, label: &str) -> BTreeMap<String, f64> {
    let key = format!("{label}=\"");
    let mut out = BTreeMap::new();
    for (series, v) in &delta.series {
        if series.split('{').next() != Some(family) {
            continue;
        }
        let value = series
            .split_once(key.as_str())
            .and_then(|(_, rest)| rest.split_once('"'))
            .map_or("", |(v, _)| v);
        *out.entry(value.to_string()).or_insert(0.0) += v;
    }
    out
}

impl AdmissionReport {
    /// The human-readable table.
    pub fn print_table(&self) {
        println!(
            "spoof-newcomers: {} newcomers during a forged ^hello^ flood at {}",
            self.newcomers, self.relay
        );
        row(
            "flood",
            format!(
                "{} datagrams ({} bytes) in {:.2} s ({:.0}/s)",
                self.forged_datagrams, self.forged_bytes, self.flood_seconds, self.forged_per_s
            ),
        );
        row(
            "forged sources",
            format!(
                "{} of {} used, over {} /24s ({} bound victims)",
                self.sources_used, self.sources, self.prefixes_used, self.victims
            ),
        );
        row(
            "admitted",
            format!(
                "{} of {} ({:.1}%); {} within 2 s; {} gave up after {:.1} s",
                self.admitted,
                self.newcomers,
                self.admitted_fraction * 100.0,
                self.admitted_within_2s,
                self.not_admitted,
                self.give_up_ms / 1e3
            ),
        );
        row(
            "time to admit",
            self.admit_ms.map_or("- (nobody got in)".into(), |t| {
                format!(
                    "p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms",
                    t.p50_ms, t.p99_ms, t.max_ms
                )
            }),
        );
        row(
            "newcomers sent",
            format!(
                "{} hellos (retry every {:.0} ms), got {} cookies, sent {} proofs",
                self.newcomer_hellos, self.retry_ms, self.newcomer_cookies, self.newcomer_proofs
            ),
        );
        row(
            "amplification",
            format!(
                "{:.4}x: the relay sent forged sources {} bytes in {} datagrams{}",
                self.amplification,
                self.relay_bytes_to_forged,
                self.relay_datagrams_to_forged,
                if self.tap.dropped > 0 {
                    format!(" (at least: the tap missed {})", self.tap.dropped)
                } else {
                    String::new()
                }
            ),
        );
        row(
            "victims",
            format!(
                "{:.4}x: got {} of {} bytes sent in their names",
                self.victim_amplification, self.victim_bytes_received, self.bytes_sent_as_victims
            ),
        );
        row(
            "table slots gained",
            self.relay_clients_gained
                .map_or("? (add --metrics-url)".into(), |s| s.to_string()),
        );
        row(
            "relay RSS growth",
            self.rss_growth_bytes
                .map_or("? (add --relay-pid)".into(), |b| {
                    format!("{:.2} MiB", b as f64 / 1048576.0)
                }),
        );
        if let Some(k) = self.relay_kernel_rx_dropped {
            let counted: f64 = self.relay_received.values().sum();
            row(
                "accounting",
                format!(
                    "{} sent = {} counted by the relay + {} dropped in its queue + {} lost before it (host backlog drops: {})",
                    self.loadtest_sent,
                    counted,
                    k,
                    self.lost_before_relay.unwrap_or(0.0),
                    self.host_backlog_drops
                ),
            );
            row(
                "relay sent",
                format!(
                    "{} deliveries; the tap saw {} (+{} it missed)",
                    self.relay_deliveries.unwrap_or(0.0),
                    self.tap.datagrams,
                    self.tap.dropped
                ),
            );
        } else {
            row("relay counters", "? (add --metrics-url)".into());
        }
        for (reason, v) in &self.relay_dropped {
            row(&format!("dropped {reason}"), v.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let ms = |v: u64| Duration::from_millis(v);
        let t = AdmitTimes::of(&(1..=100).map(ms).collect::<Vec<_>>()).unwrap();
        assert_eq!((t.p50_ms, t.p99_ms, t.max_ms), (50.0, 99.0, 100.0));
        let t = AdmitTimes::of(&[ms(7)]).unwrap();
        assert_eq!((t.p50_ms, t.p99_ms, t.max_ms), (7.0, 7.0, 7.0));
        assert!(AdmitTimes::of(&[]).is_none());
    }

    #[test]
    fn series_are_summed_by_label() {
        let d = Scrape::parse(
            "udphub_dropped_total{reason=\"cookie_budget\"} 5\nudphub_dropped_total{reason=\"unverified\"} 2\nudphub_deliveries_total 9\n",
        );
        let m = by_label(&d, "udphub_dropped_total", "reason");
        assert_eq!(m.get("cookie_budget"), Some(&5.0));
        assert_eq!(m.get("unverified"), Some(&2.0));
        assert_eq!(m.len(), 2);
    }
}
