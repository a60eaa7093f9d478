//! `loadtest merge A.json B.json …`: several `fanout --json` reports (from
//! several load machines, run at the same time) as one.
//!
//! Counts are summed; percentiles are recomputed from the merged latency
//! histogram each report carries (HdrHistogram V2, see
//! [`crate::histogram`]), never averaged; the relay's own counters
//! (`metrics_check`) are taken once per relay address (every machine
//! scraped the same relay, and each scrape saw the others' traffic too),
//! from the report whose scrape saw the most, and summed over distinct
//! relays. Timelines are left out: the machines' clocks differ.

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::Args;
use hdrhistogram::Histogram;

use crate::report::{FanoutReport, Latency, LoadtestLimited, LoadtestUsage, MetricsCheck};

/// `loadtest merge` flags.
#[derive(Debug, Clone, Args)]
pub struct MergeArgs {
    /// Reports written by `loadtest fanout --json`
    #[arg(required = true, value_name = "REPORT.json")]
    pub files: Vec<PathBuf>,

    /// Print the merged report as JSON on stdout (no table)
    #[arg(long)]
    pub json: bool,
}

/// One report read back, with its histogram decoded.
struct Read {
    name: String,
    report: FanoutReport,
    latency: Histogram<u64>,
}

/// Reads, merges and prints. Every error is one line naming the file.
pub fn run(args: &MergeArgs) -> Result<(), String> {
    let values = args.files.iter().map(load).collect::<Result<Vec<_>, _>>()?;
    let scenario = |v: &serde_json::Value| v["scenario"].as_str().unwrap_or("unknown").to_string();
    if let Some((first, v0)) = values.first() {
        if let Some((other, v)) = values.iter().find(|(_, v)| scenario(v) != scenario(v0)) {
            return Err(format!(
                "{first} is a {} report and {other} a {} report: merge reports of one scenario (fanout)",
                scenario(v0),
                scenario(v)
            ));
        }
    }
    let reports = values
        .into_iter()
        .map(|(name, v)| read(name, v))
        .collect::<Result<Vec<_>, _>>()?;
    let merged = merge(reports)?;
    if args.json {
        use std::io::Write;
        let text = serde_json::to_string_pretty(&merged).map_err(|e| e.to_string())?;
        // A closed pipe (`| head`) is the reader's choice, not an error.
        let _ = writeln!(std::io::stdout(), "{text}");
    } else {
        merged.print_table();
    }
    Ok(())
}

/// A report file as JSON, with its name.
fn load(path: &PathBuf) -> Result<(String, serde_json::Value), String> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| format!("{name}: {e}"))?;
    let value = serde_json::from_str(&text).map_err(|e| {
        format!("{name}: not a loadtest JSON report ({e}); write one with `loadtest fanout --json > {name}`")
    })?;
    Ok((name, value))
}

/// A fanout report, its histogram decoded.
fn read(name: String, value: serde_json::Value) -> Result<Read, String> {
    let scenario = value["scenario"].as_str().unwrap_or("unknown").to_string();
    if scenario != "fanout" {
        return Err(format!(
            "{name} is a {scenario} report: merge reads fanout reports (`loadtest fanout --json`)"
        ));
    }
    if value["latency_histogram"].as_str().is_none() {
        return Err(format!(
            "{name} has no latency_histogram (an older loadtest wrote it?): rerun that machine's fanout --json with this loadtest"
        ));
    }
    let report: FanoutReport = serde_json::from_value(value)
        .map_err(|e| format!("{name}: not a whole fanout report ({e})"))?;
    let encoded = report.latency_histogram.as_deref().unwrap_or_default();
    let latency =
        crate::histogram::decode(encoded).map_err(|e| format!("{name}: latency_histogram: {e}"))?;
    Ok(Read {
        name,
        report,
        latency,
    })
}

/// The merged report.
fn merge(reads: Vec<Read>) -> Result<FanoutReport, String> {
    let first = reads.first().ok_or("no reports to merge")?;
    let mut latency = crate::histogram::latency();
    for r in &reads {
        latency
            .add(&r.latency)
            .map_err(|e| format!("{}: latency_histogram: {e:?}", r.name))?;
    }
    let sum = |f: fn(&FanoutReport) -> u64| reads.iter().map(|r| f(&r.report)).sum::<u64>();
    let sum_f = |f: fn(&FanoutReport) -> f64| reads.iter().map(|r| f(&r.report)).sum::<f64>();
    let expected = sum(|r| r.deliveries_expected);
    let delivered = sum(|r| r.deliveries);
    let lost = sum(|r| r.lost);
    let mut modes: Vec<String> = Vec::new();
    let mut relays: Vec<String> = Vec::new();
    for r in &reads {
        if !modes.contains(&r.report.mode) {
            modes.push(r.report.mode.clone());
        }
        if !relays.contains(&r.report.relay) {
            relays.push(r.report.relay.clone());
        }
    }
    let usage = merge_usage(&reads, delivered);
    let limited = merge_limited(&reads);
    let relay_usage = reads
        .iter()
        .filter_map(|r| r.report.relay_usage.clone())
        .max_by(|a, b| {
            a.cpu_seconds
                .unwrap_or(0.0)
                .total_cmp(&b.cpu_seconds.unwrap_or(0.0))
        })
        // Several relay processes: no one of them is the run's.
        .filter(|u| {
            reads
                .iter()
                .filter_map(|r| r.report.relay_usage.as_ref())
                .all(|o| o.pid == u.pid)
        });
    Ok(FanoutReport {
        scenario: "fanout".into(),
        relay: relays.join(","),
        clients: reads.iter().map(|r| r.report.clients).sum(),
        senders: reads.iter().map(|r| r.report.senders).sum(),
        payload_bytes: first.report.payload_bytes,
        mode: modes.join(" + "),
        seconds: reads.iter().map(|r| r.report.seconds).fold(0.0, f64::max),
        messages_sent: sum(|r| r.messages_sent),
        deliveries_expected: expected,
        deliveries: delivered,
        lost,
        loss_ratio: if expected == 0 {
            0.0
        } else {
            lost as f64 / expected as f64
        },
        duplicates: sum(|r| r.duplicates),
        reordered: sum(|r| r.reordered),
        // Concurrent machines: their rates add up.
        messages_per_s: sum_f(|r| r.messages_per_s),
        deliveries_per_s: sum_f(|r| r.deliveries_per_s),
        latency_us: Latency::from(&latency),
        relay_said_bye: reads.iter().any(|r| r.report.relay_said_bye),
        relay_usage,
        metrics_check: merge_checks(&reads),
        timeline: Vec::new(),
        rooms: reads.iter().map(|r| r.report.rooms).sum(),
        cross_room_deliveries: sum(|r| r.cross_room_deliveries),
        foreign_deliveries: sum(|r| r.foreign_deliveries),
        latency_local_us: None,
        latency_cross_node_us: None,
        quits_sent: sum(|r| r.quits_sent),
        clients_left_behind: reads
            .iter()
            .filter_map(|r| r.report.clients_left_behind)
            .reduce(|a, b| a + b),
        flood: None,
        latency_histogram: Some(crate::histogram::encode(&latency)?),
        loadtest: Some(usage),
        loadtest_limited: limited,
        merged_from: reads.iter().map(|r| r.name.clone()).collect(),
    })
}

/// The relay's counters once per relay address (the report whose scrape
/// saw the most deliveries: the widest window), summed over distinct
/// relays; loadtest's side summed over every report.
fn merge_checks(reads: &[Read]) -> Option<MetricsCheck> {
    let mut per_relay: BTreeMap<&str, &MetricsCheck> = BTreeMap::new();
    for r in reads {
        let Some(m) = &r.report.metrics_check else {
            continue;
        };
        let slot = per_relay.entry(r.report.relay.as_str()).or_insert(m);
        if m.relay_deliveries > slot.relay_deliveries {
            *slot = m;
        }
    }
    if per_relay.is_empty() {
        return None;
    }
    let checks = || reads.iter().filter_map(|r| r.report.metrics_check.as_ref());
    let loadtest_messages = checks().map(|m| m.loadtest_messages).sum();
    let loadtest_deliveries: u64 = checks().map(|m| m.loadtest_deliveries).sum();
    let by_reason = |f: fn(&MetricsCheck) -> &Vec<(String, f64)>| {
        let mut total: BTreeMap<String, f64> = BTreeMap::new();
        for m in per_relay.values() {
            for (k, v) in f(m) {
                *total.entry(k.clone()).or_insert(0.0) += v;
            }
        }
        total.into_iter().collect::<Vec<_>>()
    };
    let relay_sum = |f: fn(&MetricsCheck) -> f64| per_relay.values().map(|m| f(m)).sum::<f64>();
    let relay_deliveries = relay_sum(|m| m.relay_deliveries);
    Some(MetricsCheck {
        relay_received: relay_sum(|m| m.relay_received),
        relay_messages: relay_sum(|m| m.relay_messages),
        loadtest_messages,
        relay_deliveries,
        loadtest_deliveries,
        relay_dropped: by_reason(|m| &m.relay_dropped),
        relay_delivery_dropped: by_reason(|m| &m.relay_delivery_dropped),
        relay_kernel_rx_dropped: relay_sum(|m| m.relay_kernel_rx_dropped),
        lost_after_relay: relay_deliveries - loadtest_deliveries as f64,
    })
}

fn merge_usage(reads: &[Read], delivered: u64) -> LoadtestUsage {
    let usages = || reads.iter().filter_map(|r| r.report.loadtest.as_ref());
    let opt_sum = |f: fn(&LoadtestUsage) -> Option<f64>| {
        usages().map(f).try_fold(0.0, |a, b| b.map(|b| a + b))
    };
    let cpu = opt_sum(|u| u.cpu_seconds);
    LoadtestUsage {
        threads: usages().map(|u| u.threads).sum(),
        cpu_seconds: cpu,
        cpu_ns_per_delivery: cpu.map(|s| s * 1e9 / delivered.max(1) as f64),
        thread_busy: usages().flat_map(|u| u.thread_busy.clone()).collect(),
        thread_waiting: usages().flat_map(|u| u.thread_waiting.clone()).collect(),
        socket_backlog_bytes: usages()
            .map(|u| u.socket_backlog_bytes)
            .try_fold(0u64, |a, b| b.map(|b| a + b)),
        socket_drops: usages()
            .map(|u| u.socket_drops)
            .try_fold(0u64, |a, b| b.map(|b| a + b)),
        rate_reached: opt_sum(|u| u.rate_reached),
    }
}

/// Every machine's verdict, each line naming its report.
fn merge_limited(reads: &[Read]) -> Option<LoadtestLimited> {
    let mut reason: Vec<String> = Vec::new();
    let mut detail = Vec::new();
    for r in reads {
        let Some(l) = &r.report.loadtest_limited else {
            continue;
        };
        for why in &l.reason {
            if !reason.contains(why) {
                reason.push(why.clone());
            }
        }
        detail.extend(l.detail.iter().map(|d| format!("{}: {d}", r.name)));
    }
    (!reason.is_empty()).then_some(LoadtestLimited { reason, detail })
}
