//! What goes on the bus: a rendered message with a small header that
//! lets every receiver deliver each message once, in order, and count what
//! the bus lost.
//!
//! ```text
//! version (1 byte, 1) | origin epoch (u64 BE) | stream (u32 BE) | seq (u64 BE) | rendered bytes
//! ```
//!
//! The origin epoch is random per relay process; a stream is one room's
//! life at the origin (a room that empties and fills again is a new
//! stream); seq counts from 1 within a stream. A receiver that sees seq
//! jump counts the gap (messages the bus lost: a NATS server died, a slow
//! consumer was cut off); a seq it has already passed is a duplicate and is
//! dropped. Pure functions and a small state machine: no I/O.

use std::collections::HashMap;

/// The header's length.
pub const HEADER_LEN: usize = 1 + 8 + 4 + 8;
/// The only version so far.
pub const VERSION: u8 = 1;

/// Who sent a message and where it sits in its stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// The origin process's random epoch.
    pub epoch: u64,
    /// The room's life at the origin.
    pub stream: u32,
    /// Position in the stream, from 1.
    pub seq: u64,
}

/// Writes the header and `body` into `out` (cleared first).
pub fn encode(stamp: Stamp, body: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.reserve(HEADER_LEN + body.len());
    out.push(VERSION);
    out.extend_from_slice(&stamp.epoch.to_be_bytes());
    out.extend_from_slice(&stamp.stream.to_be_bytes());
    out.extend_from_slice(&stamp.seq.to_be_bytes());
    out.extend_from_slice(body);
}

/// The stamp and body of a frame, or `None` if it is not one of ours.
pub fn decode(frame: &[u8]) -> Option<(Stamp, &[u8])> {
    if frame.len() < HEADER_LEN || frame[0] != VERSION {
        return None;
    }
    let u64_at = |i: usize| u64::from_be_bytes(frame[i..i + 8].try_into().unwrap_or_default());
    let stream = u32::from_be_bytes(frame[9..13].try_into().unwrap_or_default());
    Some((
        Stamp {
            epoch: u64_at(1),
            stream,
            seq: u64_at(13),
        },
        &frame[HEADER_LEN..],
    ))
}

/// What a receiver should do with a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// The next one (or the first seen of its stream): deliver.
    Next,
    /// Deliver; `missed` earlier messages of the stream never came.
    After {
        /// How many were skipped.
        missed: u64,
    },
    /// Seen already: drop.
    Duplicate,
}

/// The last seq seen per stream, for one room at one receiver.
#[derive(Debug, Default)]
pub struct Streams {
    last: HashMap<(u64, u32), u64>,
}

impl Streams {
    /// Checks `stamp` against what was seen and remembers it.
    pub fn check(&mut self, stamp: Stamp) -> Order {
        let last = self.last.entry((stamp.epoch, stamp.stream)).or_insert(0);
        if *last == 0 {
            // A stream joined midway (we subscribed late): no history.
            *last = stamp.seq;
            return Order::Next;
        }
        if stamp.seq <= *last {
            return Order::Duplicate;
        }
        let missed = stamp.seq - *last - 1;
        *last = stamp.seq;
        if missed == 0 {
            Order::Next
        } else {
            Order::After { missed }
        }
    }

    /// Streams tracked.
    pub fn len(&self) -> usize {
        self.last.len()
    }

    /// Whether none is tracked.
    pub fn is_empty(&self) -> bool {
        self.last.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_strangers_are_refused() {
        let stamp = Stamp {
            epoch: 0x0102_0304_0506_0708,
            stream: 9,
            seq: 42,
        };
        let mut out = Vec::new();
        encode(stamp, b"hello. from 127.0.0.1:5000", &mut out);
        assert_eq!(out.len(), HEADER_LEN + 26);
        assert_eq!(
            decode(&out),
            Some((stamp, &b"hello. from 127.0.0.1:5000"[..]))
        );
        assert_eq!(decode(b"short"), None);
        out[0] = 2;
        assert_eq!(decode(&out), None, "another version");
    }

    #[test]
    fn streams_deliver_once_in_order_and_count_gaps() {
        let mut s = Streams::default();
        let st = |stream, seq| Stamp {
            epoch: 7,
            stream,
            seq,
        };
        assert_eq!(s.check(st(1, 5)), Order::Next, "joined midway");
        assert_eq!(s.check(st(1, 6)), Order::Next);
        assert_eq!(s.check(st(1, 6)), Order::Duplicate);
        assert_eq!(s.check(st(1, 4)), Order::Duplicate);
        assert_eq!(s.check(st(1, 9)), Order::After { missed: 2 });
        assert_eq!(s.check(st(2, 1)), Order::Next, "another stream");
        assert_eq!(s.len(), 2);
    }
}
