//! `loadtest soak`: a mixed load for a long time — clients heartbeating,
//! senders at a steady rate — sampling the relay's RSS and counters every
//! few seconds, to show growth that a short run can't. At the end every
//! client quits (proven with its cookie in verify mode), so the relay is
//! left as it was found.

use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;

use crate::fanout::{Engine, Part};
use crate::report::{row, Common, Progress};
use crate::{metrics, procfs, workers};

/// `loadtest soak` flags.
#[derive(Debug, Clone, Args)]
pub struct SoakArgs {
    /// Shared flags (`--duration` is the soak's length).
    #[command(flatten)]
    pub common: Common,

    /// Clients
    #[arg(long, default_value_t = 200)]
    pub clients: usize,

    /// Senders among them
    #[arg(long, default_value_t = 4)]
    pub senders: usize,

    /// Total messages per second (open loop)
    #[arg(long, default_value_t = 200.0)]
    pub rate: f64,

    /// How often to sample
    #[arg(long, default_value = "5s", value_parser = crate::duration::parse)]
    pub sample_every: Duration,

    /// Spread the clients over this many rooms (wire protocol v2)
    #[arg(long, value_name = "K", default_value_t = 0)]
    pub rooms: usize,

    /// The relay is in verify mode (udphub --verify-sources): clients
    /// register with the cookie handshake
    #[arg(long)]
    pub verify: bool,

    /// Worker threads, each with its own share of the clients, sockets and
    /// poll loop (`auto`: one per core)
    #[arg(long, value_name = "N|auto", default_value = "1", value_parser = crate::fanout::parse_threads)]
    pub threads: usize,

    /// Pin worker thread t to the t-th core this process may run on
    #[arg(long)]
    pub pin_threads: bool,
}

/// One sample.
#[derive(Debug, Clone, Serialize)]
pub struct SoakSample {
    /// Seconds since the start.
    pub t_s: f64,
    /// Relay RSS.
    pub rss_bytes: Option<u64>,
    /// `udphub_clients`.
    pub relay_clients: Option<f64>,
    /// Deliveries loadtest received so far.
    pub deliveries: u64,
    /// Deliveries missing so far (sent messages × recipients − received).
    pub missing: u64,
}

/// The `soak` report.
#[derive(Debug, Clone, Serialize)]
pub struct SoakReport {
    /// "soak".
    pub scenario: String,
    /// The samples.
    pub samples: Vec<SoakSample>,
    /// RSS growth from the first sample to the last.
    pub rss_growth_bytes: Option<i64>,
    /// Final loss ratio.
    pub loss_ratio: f64,
    /// `quit`s sent at the end (proven with the cookie in verify mode).
    pub quits_sent: u64,
    /// With `--metrics-url`: clients of this run the relay still had when
    /// loadtest stopped waiting (2 s) for the quits to land; absent when
    /// every one left.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clients_left_behind: Option<u64>,
}

/// Runs the soak.
pub fn run(args: &SoakArgs) -> Result<SoakReport, String> {
    let c = &args.common;
    let relays = c.relay_addrs()?;
    let relay = c.relay.clone();
    let threads = args.threads.min(args.clients.max(1));
    let tag = crate::fanout::run_tag();
    let before = c.scrape_optional()?;
    if let Some(before) = &before {
        crate::report::warn_occupied(before, "they count in the samples' relay clients and RSS");
    }
    let mut engines = Vec::with_capacity(threads);
    for index in 0..threads {
        let mut e = Engine::new_part(
            &relays,
            args.clients.max(1),
            Part { index, of: threads },
            args.senders,
            64,
            Duration::from_secs(2),
            crate::fanout::Joining {
                no_echo: false,
                rooms: args.rooms,
                verify: args.verify,
                room_prefix: String::new(),
                run_tag: tag,
            },
        )
        .map_err(|e| e.to_string())?;
        let registered = e
            .wait_registered(Duration::from_secs(10))
            .map_err(|e| e.to_string())?;
        if registered < e.registration_target() {
            return Err(format!(
                "only {registered} of {} clients registered with the relay at {relay} (verify mode? add --verify)",
                e.registration_target()
            ));
        }
        engines.push(e);
    }
    let plan = workers::Plan {
        rate: Some(args.rate),
        window: 0,
        per_message: engines[0].expect(),
        senders: args.senders.clamp(1, args.clients.max(1)) as u64,
        send_until: c.duration,
        max_messages: u64::MAX,
        // A timeline the soak does not keep: its samples are its own.
        interval: Duration::from_secs(3600),
        flood: false,
        // Missing means not delivered by the end of sending, as always.
        drain: Duration::ZERO,
        pin: args.pin_threads,
    };
    let progress = Progress::new(c, c.duration);
    let start = Instant::now();
    for e in &mut engines {
        e.set_start(start);
    }
    let shared = workers::Shared::new(threads);
    let mut next_sample = Duration::ZERO;
    let mut samples = Vec::new();
    let mut failed = None;
    let mut sample = |shared: &workers::Shared, last: bool| {
        let t = start.elapsed();
        if failed.is_some() || !(last || (t >= next_sample && !shared.all_done_sending())) {
            return;
        }
        let relay_clients = match &c.metrics_url {
            Some(url) => match metrics::scrape_all(url) {
                Ok(s) => Some(s.get("udphub_clients")),
                Err(e) => {
                    failed = Some(e);
                    return;
                }
            },
            None => None,
        };
        let (delivered, expected) = (shared.delivered(), shared.expected());
        samples.push(SoakSample {
            t_s: t.as_secs_f64(),
            rss_bytes: c.relay_pid.and_then(procfs::rss_bytes),
            relay_clients,
            deliveries: delivered,
            missing: expected.saturating_sub(delivered),
        });
        progress.tick(t, delivered);
        next_sample += args.sample_every;
    };
    // The first sample before any message, as the workers start.
    sample(&shared, false);
    let mut last_taken = false;
    let mut finished = workers::run_all(
        engines,
        &plan,
        &shared,
        |_| {},
        |shared| {
            // The last sample when every worker has stopped sending.
            let last = shared.all_done_sending() && !last_taken;
            last_taken |= last;
            sample(shared, last);
        },
        || {},
    )?;
    // After the last sample: leave the relay as we found it.
    let quits_sent: u64 = finished.iter_mut().map(|f| f.engine.leave_all()).sum();
    let clients_left_behind = c
        .metrics_url
        .as_ref()
        .and_then(|_| crate::fanout::wait_left(c, &before, Duration::from_secs(2)));
    if let Some(e) = failed {
        return Err(e);
    }
    progress.finish();
    let rss = |s: &SoakSample| s.rss_bytes.map(|b| b as i64);
    let growth = match (samples.first().and_then(rss), samples.last().and_then(rss)) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let (missing, expected) = samples
        .last()
        .map_or((0, 0), |s| (s.missing, s.missing + s.deliveries));
    Ok(SoakReport {
        scenario: "soak".into(),
        rss_growth_bytes: growth,
        loss_ratio: if expected == 0 {
            0.0
        } else {
            missing as f64 / expected as f64
        },
        samples,
        quits_sent,
        clients_left_behind,
    })
}

impl SoakReport {
    /// The human-readable table.
    pub fn print_table(&self) {
        println!("soak: {} samples", self.samples.len());
        for s in &self.samples {
            row(
                &format!("{:.0} s", s.t_s),
                format!(
                    "RSS {}  clients {}  deliveries {}  missing {}",
                    s.rss_bytes
                        .map_or("?".into(), |b| format!("{:.1} MiB", b as f64 / 1048576.0)),
                    s.relay_clients.map_or("?".into(), |n| n.to_string()),
                    s.deliveries,
                    s.missing
                ),
            );
        }
        if let Some(g) = self.rss_growth_bytes {
            row("RSS growth", format!("{g} bytes"));
        }
        row("loss", format!("{:.4}%", self.loss_ratio * 100.0));
        crate::report::left_row(self.quits_sent, self.clients_left_behind);
    }
}
