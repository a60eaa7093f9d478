//! Wall-clock instants to timer-wheel ticks, and back.
//!
//! Pure arithmetic: the clock never reads the time itself. Its tick 0 is an
//! instant the caller gives when the hub is made, and every question is
//! asked with an instant the caller read.

use std::time::{Duration, Instant};

/// Maps instants to wheel ticks.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    /// Tick 0.
    start: Instant,
    /// Length of one tick.
    tick: Duration,
}

impl Clock {
    /// A tick of 1/256 of the timeout (so expiry is at most 0.4 % late),
    /// but no finer than 1 ms (pointless wake-ups) and no coarser than
    /// 100 ms. Returns the clock and the timeout in ticks.
    pub fn for_timeout(timeout: Duration, start: Instant) -> (Clock, u64) {
        let tick = (timeout / 256).clamp(Duration::from_millis(1), Duration::from_millis(100));
        let ticks = timeout.as_nanos().div_ceil(tick.as_nanos()).max(1) as u64;
        (Clock { start, tick }, ticks)
    }

    /// The tick `t` falls in. Runs once per datagram: plain u64 division
    /// (u128 would be a library call); u64 nanoseconds last 584 years.
    pub fn tick_at(&self, t: Instant) -> u64 {
        let elapsed = t.saturating_duration_since(self.start).as_nanos() as u64;
        elapsed / (self.tick.as_nanos() as u64).max(1)
    }

    /// Nanoseconds from tick 0 to `t` (for rate limits finer than a tick).
    pub fn nanos_at(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.start).as_nanos() as u64
    }

    /// `timeout` in this clock's ticks (at least 1): what a reload uses,
    /// since a running clock keeps its tick length.
    pub fn ticks_for(&self, timeout: Duration) -> u64 {
        (timeout.as_nanos().div_ceil(self.tick.as_nanos().max(1)) as u64).max(1)
    }

    /// The length of one tick.
    pub fn tick(&self) -> Duration {
        self.tick
    }

    /// The instant tick `tick` starts.
    pub fn instant_of(&self, tick: u64) -> Instant {
        let nanos = u128::from(tick) * self.tick.as_nanos();
        self.start + Duration::from_nanos(nanos.min(u128::from(u64::MAX)) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_scale_with_the_timeout() {
        let t0 = Instant::now();
        let (c, t) = Clock::for_timeout(Duration::from_secs(10), t0);
        assert_eq!(c.tick, Duration::from_nanos(39_062_500));
        assert_eq!(t, 256);
        let (c, t) = Clock::for_timeout(Duration::from_millis(50), t0);
        assert_eq!(c.tick, Duration::from_millis(1));
        assert_eq!(t, 50);
        let (c, t) = Clock::for_timeout(Duration::from_secs(3600), t0);
        assert_eq!(c.tick, Duration::from_millis(100));
        assert_eq!(t, 36_000);
        assert_eq!(c.tick_at(c.instant_of(1234)), 1234);
        assert_eq!(c.tick_at(t0 - Duration::from_secs(1)), 0);
    }
}
