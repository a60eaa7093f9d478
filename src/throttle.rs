//! A log line at most once per interval, saying how many were held back:
//! what keeps a flapping link or a failing socket from flooding the log.
//! Used by the loops (send and receive errors) and the cluster bridge
//! (connection changes); it logs nothing itself, so each caller keeps its
//! own words and level.

use std::time::{Duration, Instant};

/// Lets one line through per `interval`, counting the ones it holds back.
#[derive(Debug)]
pub struct Throttle {
    /// The least time between two lines.
    interval: Duration,
    /// When the last line went through.
    last: Option<Instant>,
    /// Lines held back since.
    held: u64,
}

impl Throttle {
    /// At most one line per `interval`.
    pub fn new(interval: Duration) -> Throttle {
        Throttle {
            interval,
            last: None,
            held: 0,
        }
    }

    /// Whether a line may go out at `now`: `Some(held)` (how many were held
    /// back since the last one) if so, `None` if it is held back too.
    pub fn admit(&mut self, now: Instant) -> Option<u64> {
        if self
            .last
            .is_some_and(|t| now.saturating_duration_since(t) < self.interval)
        {
            self.held += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.held))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_and_a_count_of_the_rest() {
        let t0 = Instant::now();
        let mut t = Throttle::new(Duration::from_secs(60));
        assert_eq!(t.admit(t0), Some(0));
        assert_eq!(t.admit(t0 + Duration::from_secs(1)), None);
        assert_eq!(t.admit(t0 + Duration::from_secs(59)), None);
        assert_eq!(t.admit(t0 + Duration::from_secs(60)), Some(2));
        assert_eq!(t.admit(t0 + Duration::from_secs(61)), None);
    }
}
