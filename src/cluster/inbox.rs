//! One room's receiving side, in the bridge: what it does with each NATS
//! message on the room's subject before anything reaches a loop. It takes
//! the batch apart ([`frame::parse`]), has the [`Keys`] check its tag and
//! time, and hands on each body that is new (in stream order, once) and
//! not over the size bound; everything else is tallied with its reason.
//!
//! Kept in the bridge, one per subscribed room (the lobby too), so the
//! dedup state is the process's, whichever loop delivers; it dies with the
//! subscription. No I/O, no clock of its own: the fuzzer drives it
//! ([`crate::fuzzing::cluster`]).

use std::ops::Range;
use std::time::Instant;

use super::frame::{self, Order, Streams};
use super::keys::{Keys, Refusal};
use super::BusDrop;
use crate::core::snapshot::StreamPosition;

/// What became of one NATS message's bodies.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    /// Bodies handed on.
    pub delivered: u64,
    /// Bodies seen already (the stamp said so).
    pub duplicate: u64,
    /// Bodies over the bound.
    pub oversized: u64,
    /// Messages of the stream the bus lost before these.
    pub gap: u64,
    /// Stream states started again (a seq jump beyond the window, or an
    /// eviction): what was missed there is unknown.
    pub resets: u64,
}

/// A subscribed room's receiving state.
#[derive(Debug)]
pub struct Inbox {
    /// The subject the room's batches arrive on (what their tags bind).
    subject: String,
    /// Dedup and order per stream.
    streams: Streams,
    /// The longest body handed on: a longer one is dropped (`oversized`).
    max_body: usize,
}

impl Inbox {
    /// The inbox of the room whose subject is `subject`.
    pub fn new(subject: String, max_body: usize) -> Inbox {
        Inbox {
            subject,
            streams: Streams::default(),
            max_body,
        }
    }

    /// Takes one NATS message: `Err` names why it was refused whole (its
    /// contents are not to be trusted, so it counts once); else each body
    /// that is new and small enough goes to `deliver` as its range in
    /// `msg`, in order, and the rest is tallied.
    pub fn accept(
        &mut self,
        msg: &[u8],
        keys: &Keys,
        now: Instant,
        unix: u64,
        mut deliver: impl FnMut(Range<usize>),
    ) -> Result<Tally, BusDrop> {
        let Some(batch) = frame::parse(msg) else {
            return Err(BusDrop::Malformed);
        };
        let verified = keys
            .check(&batch, &self.subject, now, unix)
            .map_err(|r| match r {
                Refusal::Unsigned => BusDrop::Unsigned,
                Refusal::BadMac => BusDrop::BadMac,
                Refusal::Stale => BusDrop::Stale,
            })?;
        let mut tally = Tally::default();
        let mut stamp = batch.first;
        for body in batch.bodies {
            let order = self.streams.check(stamp, verified);
            stamp.seq = stamp.seq.wrapping_add(1);
            match order {
                Order::Duplicate => {
                    tally.duplicate += 1;
                    continue;
                }
                Order::After { missed } => tally.gap += missed,
                Order::Restarted => tally.resets += 1,
                Order::Next => {}
            }
            if body.len() > self.max_body {
                tally.oversized += 1;
                continue;
            }
            tally.delivered += 1;
            deliver(body);
        }
        Ok(tally)
    }

    /// The inbox of a room a hand-over passed on: what the old process
    /// delivered (`positions`) is a duplicate here.
    pub fn resumed(subject: String, max_body: usize, positions: &[StreamPosition]) -> Inbox {
        Inbox {
            subject,
            streams: Streams::from_positions(positions),
            max_body,
        }
    }

    /// A hand-over's replay is over ([`Streams::end_replay`]).
    pub fn end_replay(&mut self) {
        self.streams.end_replay();
    }

    /// Where each stream is, for a hand-over.
    pub fn positions(&self) -> Vec<StreamPosition> {
        self.streams.positions()
    }

    /// Streams tracked.
    pub fn streams(&self) -> usize {
        self.streams.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::frame::{BatchWriter, Stamp};
    use crate::config::ClusterKey;

    fn key() -> ClusterKey {
        ClusterKey::new(vec![9; 32]).unwrap()
    }

    fn msg(seq: u64, bodies: &[&[u8]]) -> Vec<u8> {
        let mut w = BatchWriter::default();
        w.begin(
            100,
            Stamp {
                epoch: 1,
                stream: 2,
                seq,
            },
            true,
        );
        for b in bodies {
            w.push(b);
        }
        w.finish(Some(&key()), "u.room.r")
    }

    #[test]
    fn new_small_bodies_pass_once_and_the_rest_is_tallied() {
        let keys = Keys::new(Some(key()));
        let mut inbox = Inbox::new("u.room.r".into(), 4);
        let now = Instant::now();
        let mut got = Vec::new();
        let m = msg(1, &[b"a", b"toolong", b"b"]);
        let t = inbox
            .accept(&m, &keys, now, 100, |r| got.push(m[r].to_vec()))
            .unwrap();
        assert_eq!(got, [b"a".to_vec(), b"b".to_vec()]);
        assert_eq!((t.delivered, t.oversized), (2, 1));
        // The same again (a replay), then one overlapping and a gap.
        let t = inbox.accept(&m, &keys, now, 100, |_| {}).unwrap();
        assert_eq!((t.delivered, t.duplicate), (0, 3));
        let m = msg(3, &[b"b", b"c"]);
        let t = inbox.accept(&m, &keys, now, 100, |_| {}).unwrap();
        assert_eq!((t.delivered, t.duplicate, t.gap), (1, 1, 0));
        let m = msg(10, &[b"d"]);
        let t = inbox.accept(&m, &keys, now, 100, |_| {}).unwrap();
        assert_eq!((t.delivered, t.gap), (1, 5));
        assert_eq!(
            inbox.accept(b"junk", &keys, now, 100, |_| {}),
            Err(BusDrop::Malformed)
        );
        let mut other = Inbox::new("u.room.s".into(), 4);
        assert_eq!(
            other.accept(&msg(20, &[b"e"]), &keys, now, 100, |_| {}),
            Err(BusDrop::BadMac),
            "another room's batch"
        );
        assert_eq!(inbox.streams(), 1);
    }
}
