//! Rate limits: token buckets, and a bounded table of them per address
//! prefix for the cookie replies of verify mode.
//!
//! The per-prefix table follows WireGuard's ratelimiter: a fixed capacity
//! (a flood of spoofed prefixes can't grow it), entries keyed by the /24 of
//! an IPv4 source or the /56 of an IPv6 one, and a periodic sweep that
//! forgets prefixes whose bucket has refilled (they owe nothing). Times are
//! nanoseconds the caller passes in.

use hashbrown::HashMap;

use crate::core::addr::RawAddr;

/// A token bucket: `rate` tokens per second, at most `burst` saved.
#[derive(Debug, Clone, Copy)]
pub struct Bucket {
    /// Tokens now (fractional).
    tokens: f64,
    /// When `tokens` was last brought up to date, in nanoseconds.
    at_ns: u64,
}

/// A bucket's refill rate and depth.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Tokens per second.
    pub per_sec: f64,
    /// The most tokens a bucket holds (the burst it allows).
    pub burst: f64,
}

impl Bucket {
    /// A full bucket at `now_ns`.
    pub fn full(rate: Rate, now_ns: u64) -> Bucket {
        Bucket {
            tokens: rate.burst,
            at_ns: now_ns,
        }
    }

    /// Takes one token if there is one.
    pub fn take(&mut self, rate: Rate, now_ns: u64) -> bool {
        self.refill(rate, now_ns);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn refill(&mut self, rate: Rate, now_ns: u64) {
        let elapsed = now_ns.saturating_sub(self.at_ns) as f64 / 1e9;
        self.tokens = (self.tokens + elapsed * rate.per_sec).min(rate.burst);
        self.at_ns = now_ns.max(self.at_ns);
    }

    /// Takes up to `most` tokens, as many as there are; returns how many.
    pub fn take_up_to(&mut self, rate: Rate, most: f64, now_ns: u64) -> f64 {
        self.refill(rate, now_ns);
        let taken = self.tokens.clamp(0.0, most);
        self.tokens -= taken;
        taken
    }

    /// Whether the bucket would be full by `now_ns` (nothing owed).
    fn is_full(&self, rate: Rate, now_ns: u64) -> bool {
        let elapsed = now_ns.saturating_sub(self.at_ns) as f64 / 1e9;
        self.tokens + elapsed * rate.per_sec >= rate.burst
    }
}

/// How often the per-prefix table is swept.
const SWEEP_NS: u64 = 1_000_000_000;
/// How soon a full table may be swept again, early, to make room.
const EARLY_SWEEP_NS: u64 = 100_000_000;

/// Buckets per address prefix, in a table of fixed capacity, sharing one
/// total rate fairly.
///
/// Three rules keep it fair under a flood from many prefixes, so that a
/// prefix nobody floods still gets its replies at once:
///
/// - **Fair share, not first come**: each prefix refills at its own rate or
///   at an equal share of the total (`total / prefixes tracked`), whichever
///   is less. A flood from many prefixes slows each of them down; it cannot
///   spend the replies of a prefix it does not send from.
/// - **Bursts from a pool**: a newly seen prefix starts with up to its burst,
///   drawn from a pool that refills at the total rate. A flood that sweeps
///   thousands of new prefixes at once drains the pool in its first moments
///   (its later prefixes start empty and get only their share), and once
///   its prefixes are all tracked the pool fills again, so a prefix that
///   turns up later (a real newcomer behind a NAT) gets its whole burst.
///   Replies stay below twice the total a second, bursts included.
/// - **No lock-out when full**: a prefix that finds the table full first
///   triggers an early sweep (forgetting prefixes that owe nothing), then
///   shares one overflow bucket with the other latecomers.
/// - **Nothing spent on a refusal**: a bucket is only charged when the
///   reply will be sent (there is no second gate after it).
#[derive(Debug)]
pub struct PrefixLimiter {
    /// One bucket per prefix seen lately.
    buckets: HashMap<[u8; 8], Bucket>,
    /// The most prefixes tracked; a new one beyond it shares `overflow`.
    capacity: usize,
    /// Each prefix's rate and burst.
    rate: Rate,
    /// Tokens per second for all prefixes together.
    total: f64,
    /// The bucket prefixes share while the table is full.
    overflow: Bucket,
    /// Where a new prefix's first tokens come from (refills at `total`).
    pool: Bucket,
    /// When the table was last swept.
    swept_ns: u64,
}

impl PrefixLimiter {
    /// A limiter of `rate` per prefix and `total` a second in all, tracking
    /// at most `capacity` prefixes.
    ///
    /// The map starts small and grows on demand: most relays never see
    /// more than a few hundred prefixes, and a spoofing flood that does is
    /// bounded by `capacity` anyway (a few rehashes of at most `capacity`
    /// entries, each well under a millisecond).
    pub fn new(rate: Rate, total: f64, capacity: usize) -> PrefixLimiter {
        PrefixLimiter {
            buckets: HashMap::with_capacity(capacity.min(256)),
            capacity,
            rate,
            total,
            overflow: Bucket::full(rate, 0),
            pool: Bucket::full(PrefixLimiter::pool_rate(total), 0),
            swept_ns: 0,
        }
    }

    /// The pool's rate: the total a second, as much at once.
    fn pool_rate(total: f64) -> Rate {
        Rate {
            per_sec: total,
            burst: total.max(1.0),
        }
    }

    /// Changes the rates from now on (buckets keep their tokens, capped to
    /// the new burst as they refill).
    pub fn set_rate(&mut self, rate: Rate, total: f64) {
        self.rate = rate;
        self.total = total;
    }

    /// Prefixes tracked now.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// Whether no prefix is tracked.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// The rate each tracked prefix refills at now: its own, or its fair
    /// share of the total.
    fn share(&self) -> Rate {
        let prefixes = self.buckets.len().max(1) as f64;
        Rate {
            per_sec: self.rate.per_sec.min(self.total / prefixes),
            burst: self.rate.burst,
        }
    }

    /// Forgets the prefixes whose bucket has refilled (they owe nothing).
    fn sweep(&mut self, now_ns: u64) {
        let share = self.share();
        self.buckets.retain(|_, b| !b.is_full(share, now_ns));
        self.swept_ns = now_ns;
    }

    /// Whether `addr`'s prefix may have one more (and takes it).
    pub fn allow(&mut self, addr: &RawAddr, now_ns: u64) -> bool {
        if now_ns.saturating_sub(self.swept_ns) >= SWEEP_NS {
            self.sweep(now_ns);
        }
        let key = prefix(addr);
        let share = self.share();
        if let Some(bucket) = self.buckets.get_mut(&key) {
            return bucket.take(share, now_ns);
        }
        if self.buckets.len() >= self.capacity
            && now_ns.saturating_sub(self.swept_ns) >= EARLY_SWEEP_NS
        {
            self.sweep(now_ns);
        }
        if self.buckets.len() >= self.capacity {
            return self.overflow.take(share, now_ns);
        }
        let granted =
            self.pool
                .take_up_to(PrefixLimiter::pool_rate(self.total), share.burst, now_ns);
        let mut bucket = Bucket {
            tokens: granted,
            at_ns: now_ns,
        };
        let ok = bucket.take(share, now_ns);
        self.buckets.insert(key, bucket);
        ok
    }
}

/// Where verify mode's cookie replies are budgeted: an interface the core
/// owns, so that the loops of one relay (`--threads`) can share one budget
/// (the runtime implements it over a lock) while one loop, the tests and
/// the fuzzer keep a plain [`LocalBudget`] and the hub stays free of locks.
pub trait CookieBudget: std::fmt::Debug + Send {
    /// Whether a cookie reply to `addr` fits the budget at `now` (and
    /// spends it).
    fn allow(&mut self, addr: &RawAddr, now: std::time::Instant) -> bool;
    /// Changes the per-prefix rate and the total (a reload).
    fn set_rate(&mut self, rate: Rate, total: f64);
}

/// A [`PrefixLimiter`] of one's own, on a clock from `origin`.
#[derive(Debug)]
pub struct LocalBudget {
    /// The budget.
    limiter: PrefixLimiter,
    /// Instant zero of the limiter's nanoseconds.
    origin: std::time::Instant,
}

impl LocalBudget {
    /// A budget of `rate` per prefix and `total` a second, tracking at most
    /// `capacity` prefixes, counting time from `origin`.
    pub fn new(rate: Rate, total: f64, capacity: usize, origin: std::time::Instant) -> LocalBudget {
        LocalBudget {
            limiter: PrefixLimiter::new(rate, total, capacity),
            origin,
        }
    }
}

impl CookieBudget for LocalBudget {
    fn allow(&mut self, addr: &RawAddr, now: std::time::Instant) -> bool {
        let ns = now.saturating_duration_since(self.origin).as_nanos() as u64;
        self.limiter.allow(addr, ns)
    }

    fn set_rate(&mut self, rate: Rate, total: f64) {
        self.limiter.set_rate(rate, total);
    }
}

/// The /24 of an IPv4 (or v4-mapped) address, or the /56 of an IPv6 one.
fn prefix(addr: &RawAddr) -> [u8; 8] {
    let mut key = [0u8; 8];
    match addr.display_ip() {
        std::net::IpAddr::V4(v4) => {
            key[0] = 4;
            key[1..4].copy_from_slice(&v4.octets()[..3]);
        }
        std::net::IpAddr::V6(v6) => {
            key[0] = 6;
            key[1..8].copy_from_slice(&v6.octets()[..7]);
        }
    }
    key
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    const SEC: u64 = 1_000_000_000;

    fn addr(s: &str) -> RawAddr {
        s.parse::<SocketAddr>().unwrap().into()
    }

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let rate = Rate {
            per_sec: 10.0,
            burst: 3.0,
        };
        let mut b = Bucket::full(rate, 0);
        assert!((0..3).all(|_| b.take(rate, 0)));
        assert!(!b.take(rate, 0));
        assert!(b.take(rate, SEC / 10), "one token per 100 ms");
        assert!(!b.take(rate, SEC / 10));
        assert_eq!(
            (0..100).filter(|_| b.take(rate, 10 * SEC)).count(),
            3,
            "never more than the burst"
        );
    }

    #[test]
    fn prefixes_share_a_bucket_and_the_table_is_bounded() {
        let rate = Rate {
            per_sec: 1.0,
            burst: 2.0,
        };
        let mut l = PrefixLimiter::new(rate, 100.0, 2);
        assert!(l.allow(&addr("10.0.0.1:1"), 0));
        assert!(l.allow(&addr("10.0.0.200:9"), 0), "same /24");
        assert!(!l.allow(&addr("10.0.0.7:1"), 0), "the /24 spent its burst");
        assert!(
            l.allow(&addr("[::ffff:10.0.1.1]:1"), 0),
            "another /24, v4-mapped"
        );
        assert!(l.allow(&addr("10.0.2.1:1"), 0), "table full: the overflow");
        assert!(l.allow(&addr("10.0.3.1:1"), 0), "the overflow's burst");
        assert!(!l.allow(&addr("10.0.4.1:1"), 0), "the overflow is spent");
        assert_eq!(l.len(), 2);
        assert!(
            l.allow(&addr("[2001:db8:0:1::1]:1"), 5 * SEC),
            "swept: room again"
        );
        assert_eq!(l.len(), 1);
        assert!(
            l.allow(&addr("[2001:db8:0:1:ffff::9]:1"), 5 * SEC),
            "same /56"
        );
        assert!(
            !l.allow(&addr("[2001:db8:0:1::2]:1"), 5 * SEC),
            "the /56 spent its burst"
        );
    }

    /// A flood from many prefixes, each asking far more than its share,
    /// while one quiet prefix asks now and then: the quiet one is answered
    /// every time, the total stays near its rate, and nothing is locked
    /// out when the table is full.
    #[test]
    fn a_flood_from_many_prefixes_cannot_starve_a_quiet_one() {
        let rate = Rate {
            per_sec: 20.0,
            burst: 20.0,
        };
        let total = 1_000.0;
        let mut l = PrefixLimiter::new(rate, total, 1_000);
        let flooder = |i: u32| {
            let ip = std::net::Ipv4Addr::from(0x0a00_0000 + (i % 900) * 256);
            RawAddr::from(SocketAddr::from((ip, 1)))
        };
        let quiet = addr("192.168.7.1:9");
        let (mut flood_ok, mut quiet_ok) = (0u32, 0u32);
        // 10 s of 900 prefixes × 100 hellos/s; the quiet one asks every 500 ms.
        for step in 0..900_000u64 {
            let now = step * 10_000 + SEC;
            if l.allow(&flooder(step as u32), now) {
                flood_ok += 1;
            }
            if step % 50_000 == 0 && l.allow(&quiet, now) {
                quiet_ok += 1;
            }
        }
        assert_eq!(quiet_ok, 18, "the quiet prefix is answered every time");
        // At most the pool (the total at once, then the total a second) and
        // the prefixes' refills (the total a second), over 9 s.
        let most = total + 2.0 * total * 9.0 * 1.05;
        assert!(f64::from(flood_ok) <= most, "{flood_ok} > {most}");
        // A prefix that turns up once the flood's are all tracked gets its
        // whole burst from the refilled pool.
        let late = addr("172.16.9.1:9");
        let at = 900_000 * 10_000 + 2 * SEC;
        assert_eq!((0..20).filter(|_| l.allow(&late, at)).count(), 20);
        // A table full of flooders: a new prefix still gets through.
        let mut small = PrefixLimiter::new(rate, total, 100);
        for i in 0..100 {
            small.allow(&flooder(i), 0);
        }
        assert_eq!(small.len(), 100);
        assert!(small.allow(&quiet, 50 * 1_000_000), "the overflow bucket");
    }
}
