//! What a run reports: the shared flags, the report structs (JSON via
//! serde), the human table, and the live progress bar.

use std::io::IsTerminal;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::metrics::{self, Scrape};

/// Flags every scenario takes.
#[derive(Debug, Clone, Args)]
pub struct Common {
    /// The relay under test; fanout and soak take several, comma-separated
    /// (a cluster): clients are spread so that every room spans every relay
    #[arg(long, default_value = "127.0.0.1:9999")]
    pub relay: String,

    /// How long to send
    #[arg(long, default_value = "10s", value_parser = crate::duration::parse)]
    pub duration: Duration,

    /// The relay's Prometheus endpoint: scraped before and after, and its
    /// counters cross-checked against what loadtest saw (several,
    /// comma-separated, are summed: a cluster's accounting)
    #[arg(long, value_name = "URL")]
    pub metrics_url: Option<String>,

    /// The relay's process id: its CPU time (/proc/PID/stat) and RSS are reported
    #[arg(long, value_name = "PID")]
    pub relay_pid: Option<u32>,

    /// Print the report as JSON on stdout (no table, no progress bar)
    #[arg(long)]
    pub json: bool,

    /// Write a latency/throughput-over-time chart (SVG)
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
}

impl Common {
    /// `--relay`, resolved (the first, if several).
    pub fn relay_addr(&self) -> Result<SocketAddr, String> {
        self.relay_addrs()?
            .first()
            .copied()
            .ok_or_else(|| format!("--relay {}: no address", self.relay))
    }

    /// Every `--relay` address, resolved.
    pub fn relay_addrs(&self) -> Result<Vec<SocketAddr>, String> {
        self.relay
            .split(',')
            .map(str::trim)
            .filter(|r| !r.is_empty())
            .map(|r| {
                r.to_socket_addrs()
                    .map_err(|e| format!("--relay {r}: {e}"))?
                    .next()
                    .ok_or_else(|| format!("--relay {r}: no address"))
            })
            .collect::<Result<Vec<_>, _>>()
            .and_then(|v| {
                if v.is_empty() {
                    Err("--relay: no address".to_string())
                } else {
                    Ok(v)
                }
            })
    }

    /// Scrapes `--metrics-url`, if given (several are summed).
    pub fn scrape_optional(&self) -> Result<Option<Scrape>, String> {
        self.metrics_url
            .as_deref()
            .map(metrics::scrape_all)
            .transpose()
    }
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Latency {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Maximum.
    pub max: f64,
}

impl From<&Histogram<u64>> for Latency {
    fn from(h: &Histogram<u64>) -> Latency {
        let us = |q: f64| h.value_at_quantile(q) as f64 / 1e3;
        Latency {
            p50: us(0.5),
            p90: us(0.9),
            p99: us(0.99),
            p999: us(0.999),
            max: h.max() as f64 / 1e3,
        }
    }
}

/// The relay process's resource use over the run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RelayUsage {
    /// Its pid.
    pub pid: u32,
    /// User + system CPU seconds during the run.
    pub cpu_seconds: Option<f64>,
    /// CPU nanoseconds per delivery received.
    pub cpu_ns_per_delivery: Option<f64>,
    /// Resident memory at the end.
    pub rss_bytes: Option<u64>,
}

/// The relay's own counters against what loadtest saw.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MetricsCheck {
    /// `udphub_datagrams_received_total` growth, all kinds.
    pub relay_received: f64,
    /// `udphub_datagrams_received_total{kind="message"}` growth.
    pub relay_messages: f64,
    /// Messages loadtest sent (plus probes).
    pub loadtest_messages: u64,
    /// `udphub_deliveries_total` growth.
    pub relay_deliveries: f64,
    /// Deliveries loadtest received (new + duplicates + probe copies +
    /// other runs' messages).
    pub loadtest_deliveries: u64,
    /// `udphub_dropped_total` growth by reason (non-zero only).
    pub relay_dropped: Vec<(String, f64)>,
    /// `udphub_delivery_dropped_total` growth by reason (non-zero only).
    pub relay_delivery_dropped: Vec<(String, f64)>,
    /// `udphub_kernel_rx_dropped_total` growth.
    pub relay_kernel_rx_dropped: f64,
    /// Deliveries the relay handed the kernel that never reached loadtest.
    pub lost_after_relay: f64,
}

impl MetricsCheck {
    /// Compares a scrape delta with loadtest's own counts.
    pub fn new(delta: &Scrape, messages: u64, deliveries: u64) -> MetricsCheck {
        let by_reason = |family: &str| -> Vec<(String, f64)> {
            delta
                .series
                .iter()
                .filter(|(k, v)| k.split('{').next() == Some(family) && **v != 0.0)
                .map(|(k, v)| (k.clone(), *v))
                .collect()
        };
        let relay_deliveries = delta.get("udphub_deliveries_total");
        MetricsCheck {
            relay_received: delta.sum("udphub_datagrams_received_total"),
            relay_messages: delta.get("udphub_datagrams_received_total{kind=\"message\"}"),
            loadtest_messages: messages,
            relay_deliveries,
            loadtest_deliveries: deliveries,
            relay_dropped: by_reason("udphub_dropped_total"),
            relay_delivery_dropped: by_reason("udphub_delivery_dropped_total"),
            relay_kernel_rx_dropped: delta.get("udphub_kernel_rx_dropped_total"),
            lost_after_relay: relay_deliveries - deliveries as f64,
        }
    }
}

/// One point of the timeline.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TimelinePoint {
    /// Seconds since the start.
    pub t_s: f64,
    /// Deliveries per second in the interval.
    pub deliveries_per_s: f64,
    /// Median latency in the interval, µs.
    pub p50_us: f64,
    /// 99th percentile latency in the interval, µs.
    pub p99_us: f64,
}

/// The `fanout` report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FanoutReport {
    /// "fanout".
    pub scenario: String,
    /// The relay address.
    pub relay: String,
    /// Clients.
    pub clients: usize,
    /// Senders.
    pub senders: usize,
    /// Bytes per message.
    pub payload_bytes: usize,
    /// Closed or open loop.
    pub mode: String,
    /// Sending time.
    pub seconds: f64,
    /// Messages sent.
    pub messages_sent: u64,
    /// Deliveries those messages call for.
    pub deliveries_expected: u64,
    /// Distinct deliveries received.
    pub deliveries: u64,
    /// Expected deliveries never received.
    pub lost: u64,
    /// `lost / deliveries_expected`.
    pub loss_ratio: f64,
    /// Deliveries received more than once.
    pub duplicates: u64,
    /// Deliveries received after a later message from the same sender.
    pub reordered: u64,
    /// Messages per second.
    pub messages_per_s: f64,
    /// Deliveries per second.
    pub deliveries_per_s: f64,
    /// Send-to-receive latency.
    pub latency_us: Latency,
    /// The relay shut down during the run.
    pub relay_said_bye: bool,
    /// With `--relay-pid`.
    pub relay_usage: Option<RelayUsage>,
    /// With `--metrics-url`.
    pub metrics_check: Option<MetricsCheck>,
    /// Per-interval throughput and latency.
    pub timeline: Vec<TimelinePoint>,
    /// Rooms the clients were spread over (0: the lobby).
    pub rooms: usize,
    /// Deliveries from a sender in another room (must be 0).
    pub cross_room_deliveries: u64,
    /// Deliveries of another loadtest run's messages: a concurrent run in
    /// the same rooms (give each `--rooms K --room-prefix P` of its own).
    /// Counted apart, and as deliveries in `metrics_check`.
    #[serde(default)]
    pub foreign_deliveries: u64,
    /// Several relays: latency between clients of the same relay.
    pub latency_local_us: Option<Latency>,
    /// Several relays: latency of deliveries that crossed relays.
    pub latency_cross_node_us: Option<Latency>,
    /// `quit`s sent at the end (proven with the cookie in verify mode), so
    /// the relay is left as it was found.
    pub quits_sent: u64,
    /// With `--metrics-url`: clients of this run the relay still had when
    /// loadtest stopped waiting (2 s) for the quits to land; absent when
    /// every one left.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clients_left_behind: Option<u64>,
    /// With `--flood`: what the flooding member did and got through.
    pub flood: Option<crate::flood::FloodReport>,
    /// Every delivery's latency in nanoseconds, losslessly: HdrHistogram's
    /// compressed V2 encoding in base64 (what `loadtest merge` reads).
    #[serde(default)]
    pub latency_histogram: Option<String>,
    /// loadtest's own resource use.
    #[serde(default)]
    pub loadtest: Option<LoadtestUsage>,
    /// Present when loadtest itself, not the relay, was (or may have been)
    /// the bottleneck: its figures are then a floor for the relay.
    #[serde(default)]
    pub loadtest_limited: Option<LoadtestLimited>,
    /// A merged report: the reports it was merged from.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub merged_from: Vec<String>,
}

/// What loadtest itself used during a run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LoadtestUsage {
    /// Worker threads (`--threads`), each with its own clients and poll loop.
    pub threads: usize,
    /// User + system CPU seconds of the whole loadtest process, from the
    /// start of sending to the end of the drain.
    pub cpu_seconds: Option<f64>,
    /// Those CPU nanoseconds per delivery received.
    pub cpu_ns_per_delivery: Option<f64>,
    /// Each worker's CPU while sending, as a fraction of one core (absent
    /// for runs too short for the kernel's 10 ms CPU clock).
    pub thread_busy: Vec<f64>,
    /// Each worker's time runnable but waiting for a core while sending,
    /// as a fraction (`/proc/thread-self/schedstat`): a machine too busy to
    /// give loadtest the CPU it wanted.
    #[serde(default)]
    pub thread_waiting: Vec<f64>,
    /// Datagrams the kernel dropped at loadtest's own full receive buffers
    /// (`/proc/net/udp` drops of its sockets): deliveries the relay made
    /// that loadtest could not take.
    pub socket_drops: Option<u64>,
    /// Bytes still unread in loadtest's sockets when it stopped reading
    /// (`/proc/net/udp` rx_queue): deliveries it had not caught up with.
    #[serde(default)]
    pub socket_backlog_bytes: Option<u64>,
    /// Open loop: the rate reached (msgs/s), against `--rate`.
    pub rate_reached: Option<f64>,
}

/// Why loadtest, not the relay, limited the run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoadtestLimited {
    /// `cpu` (a worker thread wanted a core at least 90 % of the time:
    /// running, or runnable and waiting for one), `rcvbuf` (its sockets'
    /// receive buffers overflowed), `backlog` (deliveries still unread in
    /// its sockets when it stopped, counted as loss), `rate` (an open-loop
    /// rate not reached).
    pub reason: Vec<String>,
    /// The same in words, one line each.
    pub detail: Vec<String>,
}

impl FanoutReport {
    /// The human-readable table.
    pub fn print_table(&self) {
        println!(
            "fanout against {} ({}; {}, {}, {} B)",
            self.relay,
            self.mode,
            plural(self.clients, "client"),
            plural(self.senders, "sender"),
            self.payload_bytes
        );
        if !self.merged_from.is_empty() {
            row(
                "merged",
                format!(
                    "{}: {}",
                    plural(self.merged_from.len(), "report"),
                    self.merged_from.join(", ")
                ),
            );
        }
        row(
            "sent",
            format!(
                "{} messages in {:.2} s ({:.0} msgs/s)",
                self.messages_sent, self.seconds, self.messages_per_s
            ),
        );
        row(
            "deliveries",
            format!(
                "{} of {} ({:.0}/s)",
                self.deliveries, self.deliveries_expected, self.deliveries_per_s
            ),
        );
        row(
            "loss",
            format!("{} ({:.4}%)", self.lost, self.loss_ratio * 100.0),
        );
        row("duplicates", self.duplicates.to_string());
        row("reordered", self.reordered.to_string());
        if self.rooms > 0 {
            row(
                "rooms",
                format!(
                    "{} ({} deliveries crossed rooms{})",
                    self.rooms,
                    self.cross_room_deliveries,
                    if self.cross_room_deliveries == 0 {
                        ": isolated"
                    } else {
                        ": ISOLATION BROKEN"
                    }
                ),
            );
        }
        if self.foreign_deliveries > 0 {
            row(
                "other runs",
                format!(
                    "{} deliveries of another loadtest run's messages (a concurrent run in the same rooms: give each --rooms K --room-prefix P)",
                    self.foreign_deliveries
                ),
            );
        }
        if let (Some(l), Some(x)) = (&self.latency_local_us, &self.latency_cross_node_us) {
            row(
                "latency µs local",
                format!("p50 {:.1}  p99 {:.1}", l.p50, l.p99),
            );
            row(
                "latency µs cross-node",
                format!(
                    "p50 {:.1}  p99 {:.1} (added at p50: {:.1})",
                    x.p50,
                    x.p99,
                    x.p50 - l.p50
                ),
            );
        }
        if let Some(f) = &self.flood {
            row(
                "flooding member",
                format!(
                    "{} sent ({:.0}/s); {} reached the clients; relay rate-limited {}",
                    f.sent,
                    f.sent_per_s,
                    f.deliveries_to_others,
                    f.relay_rate_limited
                        .map_or("? (add --metrics-url)".into(), |n| n.to_string())
                ),
            );
        }
        let l = &self.latency_us;
        row(
            "latency µs",
            format!(
                "p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}",
                l.p50, l.p90, l.p99, l.p999, l.max
            ),
        );
        if let Some(u) = &self.relay_usage {
            row(
                "relay",
                format!(
                    "pid {}: {} CPU, {} per delivery, RSS {}",
                    u.pid,
                    u.cpu_seconds.map_or("?".into(), |s| format!("{s:.2} s")),
                    u.cpu_ns_per_delivery
                        .map_or("?".into(), |n| format!("{n:.0} ns")),
                    u.rss_bytes
                        .map_or("?".into(), |b| format!("{:.1} MiB", b as f64 / 1048576.0)),
                ),
            );
        }
        if let Some(m) = &self.metrics_check {
            row(
                "relay messages",
                format!(
                    "{} counted by the relay, {} sent",
                    m.relay_messages, m.loadtest_messages
                ),
            );
            row(
                "relay deliveries",
                format!(
                    "{} handed to the kernel, {} received ({} lost after the relay)",
                    m.relay_deliveries, m.loadtest_deliveries, m.lost_after_relay
                ),
            );
            row("relay drops", reasons(&m.relay_dropped));
            row("delivery drops", reasons(&m.relay_delivery_dropped));
            row("kernel rx drops", format!("{}", m.relay_kernel_rx_dropped));
        }
        if let Some(u) = &self.loadtest {
            // The worker that wanted a core most: running, or waiting for one.
            let busiest = (0..u.thread_busy.len())
                .map(|t| {
                    let w = u.thread_waiting.get(t).copied().unwrap_or(0.0);
                    (u.thread_busy[t], w)
                })
                .max_by(|a, b| (a.0 + a.1).total_cmp(&(b.0 + b.1)));
            row(
                "loadtest",
                format!(
                    "{}: {} CPU, {} per delivery{}; {} socket drops",
                    plural(u.threads, "thread"),
                    u.cpu_seconds.map_or("?".into(), |s| format!("{s:.2} s")),
                    u.cpu_ns_per_delivery
                        .map_or("?".into(), |n| format!("{n:.0} ns")),
                    busiest.map_or(String::new(), |(b, w)| format!(
                        ", busiest thread ran {:.0}% (waited for a core {:.0}%)",
                        b * 100.0,
                        w * 100.0
                    )),
                    u.socket_drops.map_or("?".into(), |d| d.to_string()),
                ),
            );
        }
        if let Some(l) = &self.loadtest_limited {
            for d in &l.detail {
                row("LOADTEST LIMITED", d.clone());
            }
        }
        left_row(self.quits_sent, self.clients_left_behind);
        if self.relay_said_bye {
            row(
                "note",
                "the relay said bye (shut down) during the run".into(),
            );
        }
    }
}

/// The `left` row: the quits sent at the end, and how many of this run's
/// clients the relay still had when loadtest stopped waiting for them.
pub fn left_row(quits_sent: u64, left_behind: Option<u64>) {
    match left_behind {
        Some(n) => row(
            "left",
            format!(
                "{quits_sent} quits sent; the relay still has {n} of this run's clients (they expire after its --timeout)"
            ),
        ),
        None => row("left", format!("{quits_sent} quits sent")),
    }
}

/// Warns (on stderr) when the relay already has clients before a run
/// starts: a previous run's, within the relay's `--timeout`, or someone
/// else's. `skews` says what they do to this run's figures.
pub fn warn_occupied(before: &metrics::Scrape, skews: &str) {
    let already = before.get("udphub_clients");
    if already > 0.0 {
        eprintln!(
            "loadtest: warning: the relay already has {} (udphub_clients) before this run: a previous run's (within the relay's --timeout) or someone else's; {skews}. Wait for them to expire, or restart the relay, for a clean measurement",
            plural(already as usize, "client")
        );
    }
}

/// `1 sender`, `2 senders`.
pub fn plural(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// Drops by reason, `none` when there were none: `rate_limited 12,
/// unverified 3` (the reason label alone, from
/// `udphub_dropped_total{reason="rate_limited"}`).
pub fn reasons(drops: &[(String, f64)]) -> String {
    if drops.is_empty() {
        return "none".into();
    }
    drops
        .iter()
        .map(|(series, n)| {
            let reason = series
                .split("reason=\"")
                .nth(1)
                .and_then(|r| r.split('"').next())
                .unwrap_or(series);
            format!("{reason} {n}")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// One `label: value` line of a table.
pub fn row(label: &str, value: String) {
    println!("  {label:<18} {value}");
}

/// A progress bar on a terminal (stderr), nothing otherwise.
pub struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    /// A bar over `duration`, unless `--json` or stderr is not a terminal.
    pub fn new(common: &Common, duration: Duration) -> Progress {
        if common.json || !std::io::stderr().is_terminal() {
            return Progress { bar: None };
        }
        let bar = ProgressBar::new(duration.as_millis() as u64);
        if let Ok(style) = ProgressStyle::with_template("{bar:40} {elapsed}/{duration} {msg}") {
            bar.set_style(style);
        }
        Progress { bar: Some(bar) }
    }

    /// Moves the bar to `t`, showing the running totals.
    pub fn tick(&self, t: Duration, deliveries: u64) {
        if let Some(b) = &self.bar {
            b.set_position(t.as_millis() as u64);
            b.set_message(format!(
                "{deliveries} deliveries ({:.0}/s)",
                deliveries as f64 / t.as_secs_f64().max(1e-9)
            ));
        }
    }

    /// Removes the bar.
    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
