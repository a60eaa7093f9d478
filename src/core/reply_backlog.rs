//! The reply backlog: the relay's answers (`^room^`, `^denied^`,
//! `^timeout^`, `^cookie^`) and the echo server's echoes that a full send
//! buffer would not take, kept in arrival order until the socket is
//! writable again, bounded in bytes.
//!
//! One queue, first in first out: a reply gathered while others wait goes
//! behind them, so each destination gets its answers in order. Each keeps
//! its destination as read, with the local-address tag that names where it
//! must leave from ([`RawAddr::local`]), so a parked reply leaves from the
//! same address it would have left from at once.
//!
//! Sans-I/O, like [`crate::core::backlog`]: this only keeps the queue, in
//! the shape a `sendmmsg` of different payloads takes (one arena of bytes,
//! and each reply's range in it); the runtime sends (`runtime::replies`).

use std::mem::size_of;
use std::ops::Range;

use crate::core::addr::RawAddr;

/// Arena bytes an emptied backlog keeps for the next full buffer.
const KEPT_BYTES: usize = 16 * 1024;
/// Entries an emptied backlog keeps.
const KEPT_ENTRIES: usize = 256;
/// What a parked reply costs the backlog besides its bytes: its entry (its
/// range and its destination), so that empty replies are bounded too.
pub const ENTRY_COST: usize = size_of::<(Range<usize>, RawAddr)>();

/// The most bytes of parked replies a loop keeps, whatever its
/// `--send-backlog`: 1 MiB holds about ten thousand answers (~50 bytes and
/// their entry each), more than a loop reads in one pass (4096 datagrams),
/// and answers are small next to fan-outs, which need the rest.
pub const MAX_SHARE: usize = 1 << 20;

/// The part of a loop's `--send-backlog` that parked replies may use: a
/// sixteenth, at most [`MAX_SHARE`] (the default 16 MiB gives 1 MiB; the
/// smallest, 64 KiB, 4 KiB, a few dozen answers). Taken out of the
/// fan-outs' share, so that `--send-backlog` stays the one bound on what a
/// loop parks: the fan-outs get the rest.
pub fn share_of(send_backlog: usize) -> usize {
    (send_backlog / 16).min(MAX_SHARE)
}

/// What a parked reply of `len` bytes costs the backlog.
pub fn cost(len: usize) -> usize {
    len + ENTRY_COST
}

/// The replies of one loop waiting for room in the send buffer.
#[derive(Debug, Default)]
pub struct ReplyBacklog {
    /// The parked replies' bytes, back to back (and, before `head`, those
    /// of replies already sent, until the next compaction).
    bytes: Vec<u8>,
    /// Each reply: its bytes in `bytes`, and where it goes (with its local
    /// tag).
    entries: Vec<(Range<usize>, RawAddr)>,
    /// The first entry not yet sent: entries before it are done and only
    /// wait to be compacted away (see [`sent`](Self::sent)).
    head: usize,
    /// Bytes parked: [`cost`] of each entry from `head` on.
    parked: usize,
    /// The most bytes that may be parked ([`share_of`] `--send-backlog`).
    limit: usize,
}

impl ReplyBacklog {
    /// An empty backlog holding up to `limit` bytes.
    pub fn new(limit: usize) -> ReplyBacklog {
        ReplyBacklog {
            limit,
            ..ReplyBacklog::default()
        }
    }

    /// Whether no reply waits.
    pub fn is_empty(&self) -> bool {
        self.head == self.entries.len()
    }

    /// Replies waiting.
    pub fn len(&self) -> usize {
        self.entries.len() - self.head
    }

    /// Bytes parked ([`cost`] summed).
    pub fn bytes(&self) -> usize {
        self.parked
    }

    /// Parks a copy of `payload` for `to` behind the others; returns
    /// `false`, parking nothing, if that would take the backlog over its
    /// limit (the caller drops the reply and counts it).
    pub fn push(&mut self, to: RawAddr, payload: &[u8]) -> bool {
        let cost = cost(payload.len());
        if self.parked + cost > self.limit {
            return false;
        }
        self.parked += cost;
        let start = self.bytes.len();
        self.bytes.extend_from_slice(payload);
        self.entries.push((start..self.bytes.len(), to));
        true
    }

    /// The waiting replies, oldest first, and the arena their ranges
    /// point into: what one `sendmmsg` of different payloads takes.
    pub fn waiting(&self) -> (&[u8], &[(Range<usize>, RawAddr)]) {
        (&self.bytes, &self.entries[self.head..])
    }

    /// The first `n` waiting replies are done with (handed to the kernel,
    /// or dropped for an error of their own). The space they held is
    /// reused once they are at least half of what is kept, so the arena
    /// never holds more than about twice what is parked, and compacting
    /// costs each reply a copy at most once.
    pub fn sent(&mut self, n: usize) {
        let n = n.min(self.len());
        for (range, _) in &self.entries[self.head..self.head + n] {
            self.parked -= cost(range.len());
        }
        self.head += n;
        if self.is_empty() {
            self.bytes.clear();
            self.entries.clear();
            self.head = 0;
            // After a spike, give back what the vectors grew to: an idle
            // loop keeps a little room, not the spike's high-water mark.
            self.bytes.shrink_to(KEPT_BYTES);
            self.entries.shrink_to(KEPT_ENTRIES);
        } else if self.head >= self.len() {
            let offset = self.entries[self.head].0.start;
            self.bytes.drain(..offset);
            self.entries.drain(..self.head);
            for (range, _) in &mut self.entries {
                *range = range.start - offset..range.end - offset;
            }
            self.head = 0;
        }
    }

    /// Drops every waiting reply (the server is stopping); returns how
    /// many, for the caller to count.
    pub fn clear(&mut self) -> usize {
        let n = self.len();
        self.bytes.clear();
        self.entries.clear();
        self.head = 0;
        self.parked = 0;
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    fn addr(port: u16, local: u8) -> RawAddr {
        RawAddr::from(SocketAddr::from(([127, 0, 0, 1], port))).with_local(local)
    }

    /// The waiting replies as (payload, port, local tag), oldest first.
    fn waiting(b: &ReplyBacklog) -> Vec<(Vec<u8>, u16, u8)> {
        let (arena, entries) = b.waiting();
        entries
            .iter()
            .map(|(range, to)| (arena[range.clone()].to_vec(), to.port(), to.local()))
            .collect()
    }

    #[test]
    fn replies_wait_in_order_with_their_destination_and_local_address() {
        let mut b = ReplyBacklog::new(1 << 20);
        assert!(b.push(addr(1, 3), b"^room^a"));
        assert!(b.push(addr(2, 0), b"^denied^full"));
        assert!(b.push(addr(1, 3), b"^timeout^"));
        assert_eq!(
            waiting(&b),
            vec![
                (b"^room^a".to_vec(), 1, 3),
                (b"^denied^full".to_vec(), 2, 0),
                (b"^timeout^".to_vec(), 1, 3),
            ]
        );
        b.sent(1);
        assert!(b.push(addr(2, 1), b"^room^b"));
        assert_eq!(
            waiting(&b),
            vec![
                (b"^denied^full".to_vec(), 2, 0),
                (b"^timeout^".to_vec(), 1, 3),
                (b"^room^b".to_vec(), 2, 1),
            ]
        );
        b.sent(3);
        assert_eq!(b.len(), 0);
        assert!(b.is_empty() && waiting(&b).is_empty());
        assert_eq!(b.bytes(), 0);
    }

    #[test]
    fn the_bound_is_in_bytes_and_a_refused_reply_parks_nothing() {
        let mut b = ReplyBacklog::new(2 * cost(10));
        assert!(b.push(addr(1, 0), &[1; 10]));
        assert!(b.push(addr(2, 0), &[2; 10]));
        assert_eq!(b.bytes(), 2 * cost(10));
        assert!(!b.push(addr(3, 0), b""), "an empty reply costs its entry");
        assert_eq!((b.len(), b.bytes()), (2, 2 * cost(10)));
        b.sent(1);
        assert!(b.push(addr(3, 0), &[3; 10]));
        assert!(!b.push(addr(4, 0), &[4; 1]));
        assert_eq!(
            waiting(&b).iter().map(|w| w.1).collect::<Vec<_>>(),
            vec![2, 3]
        );
    }

    #[test]
    fn empty_replies_are_bounded_too() {
        let mut b = ReplyBacklog::new(10 * ENTRY_COST);
        let parked = (0..100).filter(|_| b.push(addr(1, 0), b"")).count();
        assert_eq!(parked, 10);
    }

    /// Replies sent a few at a time while more arrive: every one comes
    /// out once, in order, the count of bytes parked always matches what
    /// waits, and the arena stays within about twice what is parked.
    #[test]
    fn accounting_and_order_hold_through_compaction() {
        let mut b = ReplyBacklog::new(1 << 16);
        let (mut pushed, mut out) = (0u32, Vec::new());
        for round in 0..200u32 {
            for _ in 0..(round % 7) {
                let payload = pushed.to_be_bytes();
                assert!(b.push(addr((pushed % 60_000) as u16, 0), &payload));
                pushed += 1;
            }
            let n = (round % 5) as usize;
            let (arena, entries) = b.waiting();
            for (range, _) in entries.iter().take(n) {
                out.push(u32::from_be_bytes(arena[range.clone()].try_into().unwrap()));
            }
            b.sent(n);
            let (_, entries) = b.waiting();
            let expected: usize = entries.iter().map(|(r, _)| cost(r.len())).sum();
            assert_eq!(b.bytes(), expected);
            assert!(b.bytes.len() <= 2 * 4 * b.len(), "{}", b.bytes.len());
        }
        let (arena, entries) = b.waiting();
        for (range, _) in entries {
            out.push(u32::from_be_bytes(arena[range.clone()].try_into().unwrap()));
        }
        assert_eq!(out, (0..pushed).collect::<Vec<_>>());
        let left = b.len();
        assert_eq!(b.clear(), left);
        assert!(b.is_empty() && b.bytes() == 0);
    }

    #[test]
    fn the_share_of_send_backlog() {
        assert_eq!(share_of(16 << 20), 1 << 20);
        assert_eq!(share_of(1 << 30), MAX_SHARE);
        assert_eq!(share_of(1 << 16), 4096);
    }
}
