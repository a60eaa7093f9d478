//! The hashed timer wheel that expires silent clients.
//!
//! Time is counted in *ticks* (the loop picks the tick length from
//! `--timeout`). The wheel is a ring of slots; an entry due at tick `t` sits in
//! slot `t % slots`, and each visit to a slot hands out only the entries whose
//! tick has come, so timeouts longer than one turn of the ring still work.
//!
//! Costs: `schedule` is O(1); `advance` is O(entries due + slots visited),
//! never a scan of every client. A heartbeat does not touch the wheel at all:
//! the client table records `last_seen`, and when a client's entry comes due
//! the loop either expires it or schedules it again at its new deadline. So
//! each client has one entry, however often it speaks.
//!
//! `advance` takes a budget: expiring a million clients at once is done a
//! slice per loop iteration, so the loop keeps serving datagrams meanwhile.
//!
//! An occupancy bitmap (one bit per slot) lets `next_wakeup` — asked before
//! every idle poll — skip 64 empty slots per word instead of visiting each:
//! a 1-hour timeout is 36,000 ticks of 100 ms, so the hub asks for 36,002
//! slots, rounded up here to 65,536 (the hub's cap), 1,024 words.

/// A deadline in the wheel: a client's table slot, the generation that slot
/// had when scheduled (a reused slot is never mistaken), and the due tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// The client table slot.
    pub key: u32,
    /// The slot's generation when this entry was made.
    pub generation: u32,
    /// The tick at (or after) which the entry is handed out.
    pub due: u64,
}

/// A hashed timer wheel over ticks. Sans-I/O: the caller says what tick it is.
#[derive(Debug)]
pub struct Wheel {
    /// The ring; entry `e` lives in `slots[e.due.max(scheduled_at) & mask]`.
    slots: Vec<Vec<Entry>>,
    /// `slots.len() - 1`; the length is a power of two.
    mask: u64,
    /// Bit `i` is set while `slots[i]` is non-empty.
    occupied: Vec<u64>,
    /// The first tick not yet fully processed.
    next_tick: u64,
    /// Entries in the wheel.
    len: usize,
}

impl Wheel {
    /// A wheel of at least `slots` slots (rounded up to a power of two),
    /// whose first unprocessed tick is `start`.
    pub fn new(slots: usize, start: u64) -> Wheel {
        let n = slots.max(1).next_power_of_two();
        Wheel {
            slots: (0..n).map(|_| Vec::new()).collect(),
            mask: (n - 1) as u64,
            occupied: vec![0; n.div_ceil(64)],
            next_tick: start,
            len: 0,
        }
    }

    /// Number of entries waiting.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no entries are waiting.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds an entry. One already due (`due` earlier than the next tick to
    /// process) is handed out by the next [`advance`](Self::advance).
    pub fn schedule(&mut self, key: u32, generation: u32, due: u64) {
        let at = due.max(self.next_tick);
        let slot = (at & self.mask) as usize;
        self.occupied[slot / 64] |= 1 << (slot % 64);
        self.slots[slot].push(Entry {
            key,
            generation,
            due,
        });
        self.len += 1;
    }

    /// Moves the wheel to `now`, appending every entry with `due <= now` to
    /// `out`, but stopping once `out` holds `budget` entries.
    ///
    /// Returns `true` when it stopped for the budget and due entries may
    /// remain (call again soon), `false` when every due entry was handed out.
    pub fn advance(&mut self, now: u64, budget: usize, out: &mut Vec<Entry>) -> bool {
        if now < self.next_tick {
            // Only entries scheduled already overdue can be due: they sit in
            // the next tick's slot.
            let slot = (self.next_tick & self.mask) as usize;
            return self.drain_slot(slot, now, budget, out);
        }
        // Past one full turn every slot has been visited once; visiting more
        // would find nothing new, since each visit takes all due entries.
        let span = (now - self.next_tick + 1).min(self.slots.len() as u64);
        for _ in 0..span {
            let slot = (self.next_tick & self.mask) as usize;
            if self.drain_slot(slot, now, budget, out) {
                return true;
            }
            self.next_tick += 1;
        }
        self.next_tick = now + 1;
        false
    }

    /// Moves the entries of `slot` due by `now` to `out`, up to `budget`
    /// entries in `out`. Returns `true` if it stopped for the budget.
    fn drain_slot(&mut self, slot: usize, now: u64, budget: usize, out: &mut Vec<Entry>) -> bool {
        let entries = &mut self.slots[slot];
        let mut i = 0;
        while i < entries.len() {
            if entries[i].due <= now {
                if out.len() >= budget {
                    return true;
                }
                out.push(entries.swap_remove(i));
                self.len -= 1;
            } else {
                i += 1;
            }
        }
        if entries.is_empty() {
            self.occupied[slot / 64] &= !(1 << (slot % 64));
        }
        false
    }

    /// The earliest tick at which an entry may be handed out, looking at
    /// most one turn of the ring ahead; `None` when the wheel is empty.
    /// (An entry a full turn away reports the tick of its slot, which is
    /// early but safe: the caller just wakes and finds nothing due.)
    ///
    /// O(slots / 64): it reads the occupancy bitmap, not the slots.
    pub fn next_wakeup(&self) -> Option<u64> {
        if self.len == 0 {
            return None;
        }
        let n = self.slots.len();
        let from = (self.next_tick & self.mask) as usize;
        let found = first_set_bit_from(&self.occupied, from)?;
        // Distance around the ring from `from` to `found`.
        let distance = (found + n - from) % n;
        Some(self.next_tick + distance as u64)
    }
}

/// The first set bit of `bits` at or after position `from`, wrapping
/// around to the start.
fn first_set_bit_from(bits: &[u64], from: usize) -> Option<usize> {
    let words = bits.len();
    let (w0, b0) = (from / 64, from % 64);
    // The first word, from bit `b0` up.
    let head = bits[w0] & (!0u64 << b0);
    if head != 0 {
        return Some(w0 * 64 + head.trailing_zeros() as usize);
    }
    // The words after it, wrapping around, then the first word's low bits.
    for step in 1..=words {
        let w = (w0 + step) % words;
        let word = if w == w0 {
            bits[w] & !(!0u64 << b0)
        } else {
            bits[w]
        };
        if word != 0 {
            return Some(w * 64 + word.trailing_zeros() as usize);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    #[test]
    fn hands_out_in_time_and_not_before() {
        let mut w = Wheel::new(8, 0);
        w.schedule(1, 0, 3);
        w.schedule(2, 0, 20); // beyond one turn of 8 slots
        let mut out = Vec::new();
        assert!(!w.advance(2, 100, &mut out));
        assert!(out.is_empty());
        assert!(!w.advance(3, 100, &mut out));
        assert_eq!(out.iter().map(|e| e.key).collect::<Vec<_>>(), vec![1]);
        out.clear();
        assert!(!w.advance(19, 100, &mut out));
        assert!(out.is_empty());
        assert!(!w.advance(25, 100, &mut out));
        assert_eq!(out[0].key, 2);
        assert!(w.is_empty());
        assert_eq!(w.next_wakeup(), None);
    }

    #[test]
    fn a_past_deadline_fires_on_the_next_advance() {
        let mut w = Wheel::new(8, 100);
        w.schedule(7, 1, 5);
        assert_eq!(w.next_wakeup(), Some(100));
        let mut out = Vec::new();
        w.advance(100, 10, &mut out);
        assert_eq!(
            out,
            vec![Entry {
                key: 7,
                generation: 1,
                due: 5
            }]
        );
    }

    #[test]
    fn budget_spreads_a_mass_expiry_over_calls() {
        let mut w = Wheel::new(16, 0);
        for k in 0..1000 {
            w.schedule(k, 0, 5);
        }
        let mut out = Vec::new();
        let mut calls = 0;
        while w.advance(5, out.len() + 128, &mut out) {
            calls += 1;
            assert!(calls < 100);
        }
        assert_eq!(out.len(), 1000);
        assert_eq!(calls, 7);
        assert!(w.is_empty());
    }

    #[test]
    fn a_jump_longer_than_the_ring_finds_everything() {
        let mut w = Wheel::new(4, 0);
        for k in 0..10u32 {
            w.schedule(k, 0, u64::from(k) * 3);
        }
        let mut out = Vec::new();
        w.advance(1_000, usize::MAX, &mut out);
        assert_eq!(out.len(), 10);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Schedule { delay: u64 },
        Advance { by: u64, budget: usize },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0u64..200).prop_map(|delay| Op::Schedule { delay }),
            1 => (0u64..60, 1usize..20).prop_map(|(by, budget)| Op::Advance { by, budget }),
        ]
    }

    proptest! {
        /// Against a BTreeMap model: the wheel never hands out an entry
        /// early, and once `advance` says it is done nothing due is left.
        #[test]
        fn never_early_never_lost(slots in 1usize..64, ops in proptest::collection::vec(op(), 1..300)) {
            let mut w = Wheel::new(slots, 0);
            let mut model: BTreeMap<u32, u64> = BTreeMap::new();
            let mut now = 0u64;
            let mut next_key = 0u32;
            let mut out = Vec::new();
            for op in ops {
                match op {
                    Op::Schedule { delay } => {
                        w.schedule(next_key, 0, now + delay);
                        model.insert(next_key, now + delay);
                        next_key += 1;
                    }
                    Op::Advance { by, budget } => {
                        now += by;
                        out.clear();
                        let more = w.advance(now, budget, &mut out);
                        prop_assert!(out.len() <= budget);
                        for e in &out {
                            let due = model.remove(&e.key);
                            prop_assert_eq!(due, Some(e.due), "handed out twice or never scheduled");
                            prop_assert!(e.due <= now, "early: due {} at {}", e.due, now);
                        }
                        if !more {
                            prop_assert!(model.values().all(|&d| d > now), "lost a due entry");
                        }
                    }
                }
                prop_assert_eq!(w.len(), model.len());
            }
            // Finally everything comes out.
            out.clear();
            while w.advance(now + 1_000, usize::MAX, &mut out) {}
            prop_assert_eq!(out.len(), model.len());
        }

        /// `next_wakeup` (bitmap) finds exactly the first non-empty slot a
        /// scan of the ring finds, through schedules and advances.
        #[test]
        fn next_wakeup_matches_a_slot_scan(slots in 1usize..300, ops in proptest::collection::vec(op(), 1..200)) {
            let mut w = Wheel::new(slots, 0);
            let mut now = 0u64;
            let mut out = Vec::new();
            for (k, op) in ops.into_iter().enumerate() {
                match op {
                    Op::Schedule { delay } => w.schedule(k as u32, 0, now + delay),
                    Op::Advance { by, budget } => {
                        now += by;
                        out.clear();
                        w.advance(now, budget, &mut out);
                    }
                }
                let scan = (w.len > 0).then(|| {
                    (0..w.slots.len() as u64)
                        .map(|d| w.next_tick + d)
                        .find(|t| !w.slots[(t & w.mask) as usize].is_empty())
                }).flatten();
                prop_assert_eq!(w.next_wakeup(), scan);
            }
        }

        /// `next_wakeup` is never later than the earliest due entry.
        #[test]
        fn next_wakeup_is_never_late(dues in proptest::collection::vec(0u64..500, 1..50), slots in 1usize..64) {
            let mut w = Wheel::new(slots, 0);
            for (k, d) in dues.iter().enumerate() {
                w.schedule(k as u32, 0, *d);
            }
            let earliest = *dues.iter().min().unwrap();
            let wake = w.next_wakeup().unwrap();
            prop_assert!(wake <= earliest);
        }
    }
}
