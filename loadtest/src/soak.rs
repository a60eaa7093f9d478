//! `loadtest soak`: a mixed load for a long time — clients heartbeating,
//! senders at a steady rate — sampling the relay's RSS and counters every
//! few seconds, to show growth that a short run can't.

use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;

use crate::fanout::Engine;
use crate::report::{row, Common, Progress};
use crate::{metrics, procfs};

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
}

/// Runs the soak.
pub fn run(args: &SoakArgs) -> Result<SoakReport, String> {
    let c = &args.common;
    let relays = c.relay_addrs()?;
    let relay = c.relay.clone();
    let mut e = Engine::new(
        &relays,
        args.clients.max(1),
        args.senders,
        64,
        Duration::from_secs(2),
        crate::fanout::Joining {
            no_echo: false,
            rooms: args.rooms,
            verify: args.verify,
            room_prefix: String::new(),
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
    let progress = Progress::new(c, c.duration);
    let start = Instant::now();
    let mut next_sample = Duration::ZERO;
    let mut samples = Vec::new();
    loop {
        let t = start.elapsed();
        if t >= next_sample || t >= c.duration {
            let relay_clients = match &c.metrics_url {
                Some(url) => Some(metrics::scrape_all(url)?.get("udphub_clients")),
                None => None,
            };
            samples.push(SoakSample {
                t_s: t.as_secs_f64(),
                rss_bytes: c.relay_pid.and_then(procfs::rss_bytes),
                relay_clients,
                deliveries: e.delivered,
                missing: e.expected().saturating_sub(e.delivered),
            });
            progress.tick(t, e.delivered);
            next_sample += args.sample_every;
        }
        if t >= c.duration || e.bye {
            break;
        }
        let due = (t.as_secs_f64() * args.rate) as u64;
        while e.messages_sent() < due {
            e.send_one().map_err(|e| e.to_string())?;
        }
        e.step(Duration::from_millis(1))
            .map_err(|e| e.to_string())?;
    }
    progress.finish();
    let rss = |s: &SoakSample| s.rss_bytes.map(|b| b as i64);
    let growth = match (samples.first().and_then(rss), samples.last().and_then(rss)) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let expected = e.expected();
    Ok(SoakReport {
        scenario: "soak".into(),
        rss_growth_bytes: growth,
        loss_ratio: if expected == 0 {
            0.0
        } else {
            expected.saturating_sub(e.delivered) as f64 / expected as f64
        },
        samples,
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
    }
}
