//! Knowing its own limit: whether loadtest, not the relay, was the
//! bottleneck of a run. Three signs, each a reason in the report:
//! - `cpu`: a worker thread wanted a core [`BUSY`] of the time or more
//!   while sending — running, or runnable and waiting for one on a machine
//!   busy with others — so it may have received (or sent) all it could,
//!   not all the relay could;
//! - `rcvbuf`: the kernel dropped datagrams at loadtest's own full receive
//!   buffers, deliveries the relay made and loadtest lost (counted as loss);
//! - `backlog`: deliveries were still unread in loadtest's sockets when it
//!   stopped reading, with some missing: it had not caught up, and what it
//!   had not read counts as loss;
//! - `rate`: an open-loop `--rate` that loadtest did not reach.
//!
//! Any of them makes the figures a floor for the relay, not its measure:
//! more `--threads` (or load machines and `loadtest merge`) is the fix.

use crate::report::{LoadtestLimited, LoadtestUsage};

/// A worker that wanted a core (running or waiting for one) at least this
/// share of its sending time counts as saturated.
pub const BUSY: f64 = 0.90;

/// How far short of an open-loop schedule counts as not reaching it: 5 %
/// of it, and at least one send burst (64) per worker, for the last poll.
const RATE_SHORTFALL: f64 = 0.05;

/// The verdict, or `None` when loadtest kept up. `scheduled` is how many
/// messages the open-loop schedule called for over the sending time;
/// `missing` the deliveries that never arrived.
pub fn judge(
    usage: &LoadtestUsage,
    rate: Option<f64>,
    scheduled: Option<u64>,
    sent: u64,
    bye: bool,
    missing: u64,
) -> Option<LoadtestLimited> {
    let mut reason = Vec::new();
    let mut detail = Vec::new();
    let busy: Vec<String> = usage
        .thread_busy
        .iter()
        .enumerate()
        .filter_map(|(t, &b)| {
            let w = usage.thread_waiting.get(t).copied().unwrap_or(0.0);
            (b + w >= BUSY).then(|| {
                format!(
                    "thread {t} ran {:.0}% of the time and waited for a core {:.0}%",
                    b * 100.0,
                    w * 100.0
                )
            })
        })
        .collect();
    if !busy.is_empty() {
        reason.push("cpu".to_string());
        detail.push(format!(
            "loadtest's own CPU: {} while sending; the relay may have had more to give (add --threads if cores are free; on a busy machine, a load machine of its own)",
            busy.join("; ")
        ));
    }
    if let Some(d) = usage.socket_drops.filter(|d| *d > 0) {
        reason.push("rcvbuf".to_string());
        detail.push(format!(
            "loadtest's sockets dropped {d} datagrams at full receive buffers (/proc/net/udp): deliveries the relay made that loadtest could not take, counted as loss (add --threads)"
        ));
    }
    if let Some(b) = usage.socket_backlog_bytes.filter(|b| *b > 0 && missing > 0) {
        reason.push("backlog".to_string());
        detail.push(format!(
            "{b} bytes of deliveries were still unread in loadtest's sockets when it stopped reading: it had not caught up, and the {missing} missing deliveries are at least partly its own (add --threads)"
        ));
    }
    if let (Some(rate), Some(scheduled)) = (rate, scheduled) {
        let slack = (scheduled as f64 * RATE_SHORTFALL).max(64.0 * usage.threads.max(1) as f64);
        if !bye && (sent as f64) + slack < scheduled as f64 {
            reason.push("rate".to_string());
            detail.push(format!(
                "loadtest sent {sent} of the {scheduled} messages --rate {rate} called for ({:.0} msgs/s reached): the open loop fell behind its own schedule (add --threads, or lower --rate)",
                usage.rate_reached.unwrap_or(0.0)
            ));
        }
    }
    (!reason.is_empty()).then_some(LoadtestLimited { reason, detail })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage() -> LoadtestUsage {
        LoadtestUsage {
            threads: 1,
            thread_busy: vec![0.3],
            socket_drops: Some(0),
            rate_reached: Some(1000.0),
            ..LoadtestUsage::default()
        }
    }

    #[test]
    fn keeping_up_is_no_verdict() {
        assert!(judge(&usage(), Some(1000.0), Some(1000), 1000, false, 0).is_none());
        // The last burst's worth short is no shortfall.
        assert!(judge(&usage(), Some(1000.0), Some(1000), 940, false, 0).is_none());
    }

    #[test]
    fn each_sign_is_a_reason() {
        let mut u = usage();
        u.thread_busy = vec![0.2, 0.37];
        u.thread_waiting = vec![0.1, 0.6];
        u.socket_drops = Some(12);
        u.socket_backlog_bytes = Some(640);
        let l = judge(&u, Some(1e6), Some(1_000_000), 300_000, false, 50).unwrap();
        assert_eq!(l.reason, ["cpu", "rcvbuf", "backlog", "rate"]);
        assert!(
            l.detail[0].contains("thread 1 ran 37% of the time and waited for a core 60%"),
            "{:?}",
            l.detail
        );
        assert!(!l.detail[0].contains("thread 0"));
        assert!(l.detail[1].contains("12 datagrams"));
        assert!(l.detail[2].contains("640 bytes"));
        assert!(l.detail[3].contains("300000 of the 1000000"));
        // A backlog with nothing missing is stragglers, not a limit.
        u.thread_busy = vec![0.2];
        u.socket_drops = Some(0);
        assert!(judge(&u, None, None, 10, false, 0).is_none());
        // A relay that said bye stopped the schedule, not loadtest.
        assert!(judge(&usage(), Some(1e6), Some(1_000_000), 10, true, 0).is_none());
    }
}
