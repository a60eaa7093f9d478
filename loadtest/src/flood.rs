//! `loadtest fanout --flood RATE`: one more member of the lobby that sends
//! RATE datagrams per second on its own thread while the measured clients
//! run, so a run shows what a flooding member costs everyone else (with
//! `udphub --client-rate`, nothing beyond its allowance).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::member::Member;

/// What the flood did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FloodReport {
    /// The asked rate, datagrams/s.
    pub rate: f64,
    /// Datagrams the flooder sent.
    pub sent: u64,
    /// The rate it reached.
    pub sent_per_s: f64,
    /// Heartbeats it sent besides (one a second): a relay in open mode
    /// charges them to the same allowance, so one may count as
    /// rate-limited too.
    pub heartbeats: u64,
    /// Datagrams the flooder itself received (it is a member: the room's
    /// messages, its own echoes, the answers while it registered).
    pub received: u64,
    /// The flooder's datagrams the measured clients received (what the
    /// relay let through, times the recipients).
    pub deliveries_to_others: u64,
    /// `udphub_dropped_total{reason="rate_limited"}` growth (with `--metrics-url`).
    pub relay_rate_limited: Option<f64>,
}

/// The running flooder.
pub struct Flood {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    thread: Option<JoinHandle<Result<(u64, u64), String>>>,
    started: Instant,
    rate: f64,
}

/// What the flooder sends: not a loadtest stamp, so receivers tell it apart.
pub const FLOOD_PAYLOAD: &[u8] = b"flood flood flood flood flood flood flood flood flood flood!!";

impl Flood {
    /// Registers the flooder (verify-aware) and starts it.
    pub fn start(relay: SocketAddr, rate: f64, verify: bool) -> Result<Flood, String> {
        if !(rate > 0.0 && rate.is_finite()) {
            return Err(format!(
                "--flood {rate}: a positive rate, datagrams per second"
            ));
        }
        let member = Member::join(relay, verify, Duration::from_secs(5))?;
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let (stop2, sent2) = (Arc::clone(&stop), Arc::clone(&sent));
        let started = Instant::now();
        let thread = std::thread::spawn(move || {
            let mut n = 0u64;
            let mut received = member.answers;
            let mut buf = vec![0u8; 65_536];
            let mut beat = Instant::now();
            let mut heartbeats = 0u64;
            while !stop2.load(Ordering::Relaxed) {
                // Its messages keep no member alive in verify mode: its
                // cookie does, once a second.
                if beat.elapsed() >= Duration::from_secs(1) {
                    member.heartbeat()?;
                    heartbeats += 1;
                    beat = Instant::now();
                }
                // Pace in 1 ms steps: whatever is due by now goes out.
                let due = (started.elapsed().as_secs_f64() * rate) as u64;
                while n < due {
                    member.send(FLOOD_PAYLOAD)?;
                    n += 1;
                }
                sent2.store(n, Ordering::Relaxed);
                received += member.drain(&mut buf);
                std::thread::sleep(Duration::from_millis(1));
            }
            // The last deliveries to the flooder, then leave.
            std::thread::sleep(Duration::from_millis(100));
            received += member.drain(&mut buf);
            member.leave();
            Ok((received, heartbeats))
        });
        Ok(Flood {
            stop,
            sent,
            thread: Some(thread),
            started,
            rate,
        })
    }

    /// Stops the flooder and reports; `deliveries_to_others` and
    /// `relay_rate_limited` are filled in by the caller.
    pub fn finish(mut self) -> Result<FloodReport, String> {
        self.stop.store(true, Ordering::Relaxed);
        let (received, heartbeats) = match self.thread.take() {
            Some(t) => t.join().map_err(|_| "the flooder panicked".to_string())??,
            None => (0, 0),
        };
        let sent = self.sent.load(Ordering::Relaxed);
        Ok(FloodReport {
            rate: self.rate,
            sent,
            sent_per_s: sent as f64 / self.started.elapsed().as_secs_f64().max(1e-9),
            heartbeats,
            received,
            deliveries_to_others: 0,
            relay_rate_limited: None,
        })
    }
}
