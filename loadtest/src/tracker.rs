//! Per (receiver, sender) stream bookkeeping: new, reordered, duplicate.
//!
//! A stream remembers the highest sequence number seen and a 1024-message
//! window below it, so duplicates and late arrivals are told apart without
//! remembering every message.

/// How far below the highest sequence number arrivals are still tracked.
pub const WINDOW: u64 = 1024;

/// What one arrival was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// Not seen before, in order (or ahead: a gap means loss or reordering).
    New,
    /// Not seen before, but after a later one: reordered.
    Reordered,
    /// Seen before.
    Duplicate,
    /// Below the tracked window: counted as reordered, can't be checked.
    TooOld,
}

/// One stream's state.
#[derive(Debug, Clone, Default)]
pub struct Stream {
    /// Highest sequence number seen.
    highest: Option<u64>,
    /// Bit `s % WINDOW` set when `s` (within the window) was seen.
    seen: [u64; (WINDOW / 64) as usize],
}

impl Stream {
    fn bit(&mut self, seq: u64) -> (&mut u64, u64) {
        let i = (seq % WINDOW) as usize;
        (&mut self.seen[i / 64], 1u64 << (i % 64))
    }

    /// Records an arrival of `seq`.
    pub fn arrive(&mut self, seq: u64) -> Arrival {
        match self.highest {
            Some(h) if seq <= h => {
                if h - seq >= WINDOW {
                    return Arrival::TooOld;
                }
                let (word, mask) = self.bit(seq);
                if *word & mask != 0 {
                    Arrival::Duplicate
                } else {
                    *word |= mask;
                    Arrival::Reordered
                }
            }
            prev => {
                // Clear the bits of the sequence numbers skipped over.
                let from = prev.map_or(0, |h| h + 1);
                if seq - from >= WINDOW {
                    self.seen = [0; (WINDOW / 64) as usize];
                } else {
                    for s in from..seq {
                        let (word, mask) = self.bit(s);
                        *word &= !mask;
                    }
                }
                let (word, mask) = self.bit(seq);
                *word |= mask;
                self.highest = Some(seq);
                Arrival::New
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_arrivals() {
        let mut s = Stream::default();
        assert_eq!(s.arrive(0), Arrival::New);
        assert_eq!(s.arrive(2), Arrival::New);
        assert_eq!(s.arrive(1), Arrival::Reordered);
        assert_eq!(s.arrive(1), Arrival::Duplicate);
        assert_eq!(s.arrive(2), Arrival::Duplicate);
        assert_eq!(s.arrive(5000), Arrival::New);
        assert_eq!(s.arrive(4999), Arrival::Reordered);
        assert_eq!(s.arrive(3), Arrival::TooOld);
        // Bits from the previous lap are cleared when the window moves on.
        assert_eq!(s.arrive(5000 + WINDOW - 1), Arrival::New);
        assert_eq!(s.arrive(5000 + WINDOW - 2), Arrival::Reordered);
    }

    #[test]
    fn first_arrival_may_be_any_number() {
        let mut s = Stream::default();
        assert_eq!(s.arrive(10), Arrival::New);
        assert_eq!(s.arrive(3), Arrival::Reordered);
    }
}
