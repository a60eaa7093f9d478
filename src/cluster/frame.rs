//! What goes on the bus: one NATS message carries a batch of rendered
//! messages of one room's stream, with a stamp that lets every receiver
//! deliver each once, in order, count what the bus lost, and (with a
//! cluster key) a tag that proves a relay of the cluster sent it, to this
//! room, lately.
//!
//! ```text
//! offset  size  field
//!      0     1  version (2)
//!      1     1  flags: bit 0 = a tag follows the bodies (keyed); others 0
//!      2     4  time: the origin's clock, unix seconds (u32 BE)
//!      6     8  origin epoch (u64 BE): random per relay process
//!     14     4  stream (u32 BE): one room's life at the origin
//!     18     8  first seq (u64 BE): the first body's place in the stream
//!     26     2  count (u16 BE, 1 to 1,024): bodies that follow, seq first..
//!     28        count x [ length (u16 BE) | body (length bytes) ]
//!      …    16  tag, if flags bit 0: HMAC-SHA-256 under the cluster key of
//!               "udphub-cluster-v2" | subject length (u16 BE) | subject |
//!               every byte above, truncated to its first 16 bytes
//! ```
//!
//! Nothing may follow the last body (or the tag). The origin epoch is
//! random per relay process; a stream is one room's life at the origin
//! (a room that empties and fills again is a new stream); seq counts from
//! 1 within a stream, and the bodies of a batch are consecutive. Version 1
//! (one body per message, no time, no tag) is refused as malformed: every
//! relay of a cluster must run the same frame version.
//!
//! The tag binds the subject (so a captured message cannot be replayed into
//! another room) and the whole batch (so nothing can be cut out or
//! spliced in). Replays into the same room are duplicates by their stamp
//! ([`Streams`]); a receiver that never saw a stream (it restarted, or
//! subscribed later) cannot tell a replay from a late join, so a keyed
//! receiver also refuses a batch whose time is more than [`FRESHNESS`]
//! away from its own clock: an old capture is worthless after that, and
//! the relays' clocks must agree to within it (NTP).
//!
//! Pure functions and a small state machine: no I/O, no clock.

use std::collections::HashMap;
use std::ops::Range;

use hmac::Mac;

use crate::config::ClusterKey;
use crate::core::snapshot::StreamPosition;

/// The header's length.
pub const HEADER_LEN: usize = 28;
/// This frame version.
pub const VERSION: u8 = 2;
/// Flag: a tag follows the bodies.
pub const FLAG_TAGGED: u8 = 1;
/// The tag's length: HMAC-SHA-256 truncated to 128 bits, as the source
/// cookies (a forger's chance per try is 2^-128).
pub const TAG_LEN: usize = 16;
/// Per body: its length.
pub const LEN_LEN: usize = 2;
/// What the tag's input starts with: a tag made for anything else (a
/// cookie, a token, another version) is never a valid one here.
const DOMAIN: &[u8] = b"udphub-cluster-v2";
/// How far (seconds) a keyed receiver's clock may be from a batch's time,
/// either way, before the batch is refused as `stale`. Bounds the replay
/// of a capture to a receiver that has no state for its stream; the relays'
/// clocks must agree to within this.
pub const FRESHNESS: u64 = 60;
/// The most bodies a sender puts in one NATS message.
pub const MAX_BATCH_FRAMES: usize = 1024;
/// The most bytes a sender puts in one NATS message: well under NATS's
/// default `max_payload` (1 MB), and small enough that a batch never
/// holds a receiver's queue for long.
pub const MAX_BATCH_BYTES: usize = 64 * 1024;
/// The longest NATS message a sender makes: a batch of
/// [`MAX_BATCH_BYTES`], or one body alone at the longest a length says
/// (65,535) with its header and tag. A receiver refuses anything longer
/// as malformed before it spends a MAC on it (the server's `max_payload`
/// is 1 MB by default, and anyone allowed to publish may fill it).
pub const MAX_MESSAGE: usize = {
    let one = HEADER_LEN + LEN_LEN + u16::MAX as usize + TAG_LEN;
    if one > MAX_BATCH_BYTES {
        one
    } else {
        MAX_BATCH_BYTES
    }
};

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

/// Builds one NATS message: a header, then bodies of consecutive seqs.
#[derive(Debug, Default)]
pub struct BatchWriter {
    /// The message so far.
    buf: Vec<u8>,
    /// The stamp of the next body that may join.
    next: Option<Stamp>,
    /// Bodies so far.
    count: u16,
}

impl BatchWriter {
    /// Starts a batch whose first body has `stamp`, sent at `time` (unix
    /// seconds), tagged or not.
    pub fn begin(&mut self, time: u32, stamp: Stamp, tagged: bool) {
        self.buf.clear();
        self.buf.push(VERSION);
        self.buf.push(if tagged { FLAG_TAGGED } else { 0 });
        self.buf.extend_from_slice(&time.to_be_bytes());
        self.buf.extend_from_slice(&stamp.epoch.to_be_bytes());
        self.buf.extend_from_slice(&stamp.stream.to_be_bytes());
        self.buf.extend_from_slice(&stamp.seq.to_be_bytes());
        self.buf.extend_from_slice(&0u16.to_be_bytes());
        self.next = Some(stamp);
        self.count = 0;
    }

    /// Whether a body with `stamp` and `len` bytes may join this batch:
    /// the next seq of the same stream, within the limits.
    pub fn fits(&self, stamp: Stamp, len: usize) -> bool {
        self.next == Some(stamp)
            && usize::from(self.count) < MAX_BATCH_FRAMES
            && self.buf.len() + LEN_LEN + len + TAG_LEN <= MAX_BATCH_BYTES
    }

    /// Adds a body (the caller checked [`fits`](Self::fits), or this is
    /// the first; a body over 65,535 bytes is cut off at the u16 length,
    /// which the sender's own bound already prevents).
    pub fn push(&mut self, body: &[u8]) {
        let len = body.len().min(usize::from(u16::MAX));
        self.buf
            .extend_from_slice(&u16::try_from(len).unwrap_or(u16::MAX).to_be_bytes());
        self.buf.extend_from_slice(&body[..len]);
        self.count = self.count.saturating_add(1);
        if let Some(next) = &mut self.next {
            next.seq = next.seq.wrapping_add(1);
        }
    }

    /// Bodies so far.
    pub fn count(&self) -> usize {
        usize::from(self.count)
    }

    /// Whether nothing was pushed since [`begin`](Self::begin).
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Finishes the message: writes the count and, with `key`, the tag
    /// binding it to `subject`. The writer is empty afterwards.
    pub fn finish(&mut self, key: Option<&ClusterKey>, subject: &str) -> Vec<u8> {
        self.buf[26..28].copy_from_slice(&self.count.to_be_bytes());
        if let Some(key) = key {
            let tag = tag(key, subject, &self.buf);
            self.buf.extend_from_slice(&tag);
        }
        self.next = None;
        self.count = 0;
        std::mem::take(&mut self.buf)
    }
}

/// The tag of `signed` (a message less its tag) sent on `subject`.
pub fn tag(key: &ClusterKey, subject: &str, signed: &[u8]) -> [u8; TAG_LEN] {
    let mut mac = key.mac();
    feed(&mut mac, subject, signed);
    let full = mac.finalize().into_bytes();
    let mut out = [0u8; TAG_LEN];
    out.copy_from_slice(&full[..TAG_LEN]);
    out
}

/// Whether `tag` is `signed`'s on `subject` under `key` (constant time).
pub fn verify(key: &ClusterKey, subject: &str, signed: &[u8], tag: &[u8]) -> bool {
    let mut mac = key.mac();
    feed(&mut mac, subject, signed);
    tag.len() == TAG_LEN && mac.verify_truncated_left(tag).is_ok()
}

fn feed(mac: &mut hmac::Hmac<sha2::Sha256>, subject: &str, signed: &[u8]) {
    mac.update(DOMAIN);
    let len = u16::try_from(subject.len()).unwrap_or(u16::MAX);
    mac.update(&len.to_be_bytes());
    mac.update(subject.as_bytes());
    mac.update(signed);
}

/// A NATS message taken apart (structure checked, nothing verified yet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch<'a> {
    /// The origin's clock when it sent the batch (unix seconds).
    pub time: u32,
    /// The first body's stamp.
    pub first: Stamp,
    /// The message less its tag: what the tag covers.
    pub signed: &'a [u8],
    /// The tag, if the flags say there is one.
    pub tag: Option<&'a [u8]>,
    /// Where each body is in the message, in seq order from `first`.
    pub bodies: Vec<Range<usize>>,
}

/// Takes a NATS message apart; `None` if it is not a well-formed batch of
/// this version (wrong version, unknown flags, a count of 0 or over
/// [`MAX_BATCH_FRAMES`], longer than [`MAX_MESSAGE`], a length running
/// past the end, bytes left over).
pub fn parse(msg: &[u8]) -> Option<Batch<'_>> {
    if msg.len() < HEADER_LEN
        || msg.len() > MAX_MESSAGE
        || msg[0] != VERSION
        || msg[1] & !FLAG_TAGGED != 0
    {
        return None;
    }
    let tagged = msg[1] & FLAG_TAGGED != 0;
    let be = |r: Range<usize>| msg[r].iter().fold(0u64, |n, &b| n << 8 | u64::from(b));
    let time = u32::try_from(be(2..6)).ok()?;
    let first = Stamp {
        epoch: be(6..14),
        stream: u32::try_from(be(14..18)).ok()?,
        seq: be(18..26),
    };
    let count = usize::try_from(be(26..28)).ok()?;
    if count == 0 || count > MAX_BATCH_FRAMES || first.seq.checked_add(count as u64).is_none() {
        return None;
    }
    let end = if tagged {
        msg.len().checked_sub(TAG_LEN)?
    } else {
        msg.len()
    };
    if end < HEADER_LEN {
        return None;
    }
    let mut bodies = Vec::with_capacity(count.min(MAX_BATCH_FRAMES));
    let mut at = HEADER_LEN;
    for _ in 0..count {
        let len_end = at.checked_add(LEN_LEN).filter(|&e| e <= end)?;
        let len = usize::try_from(be(at..len_end)).ok()?;
        let body_end = len_end.checked_add(len).filter(|&e| e <= end)?;
        bodies.push(len_end..body_end);
        at = body_end;
    }
    if at != end {
        return None;
    }
    Some(Batch {
        time,
        first,
        signed: &msg[..end],
        tag: tagged.then(|| &msg[end..]),
        bodies,
    })
}

/// Whether a batch sent at `time` is fresh at a receiver whose clock says
/// `now` (both unix seconds): within [`FRESHNESS`] either way.
pub fn fresh(time: u32, now: u64) -> bool {
    now.abs_diff(u64::from(time)) <= FRESHNESS
}

/// What a receiver should do with a body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// The next one (or the first seen of its stream): deliver.
    Next,
    /// Deliver; `missed` earlier messages of the stream never came.
    After {
        /// How many were skipped.
        missed: u64,
    },
    /// Deliver; the stream's state was started again (its seq jumped
    /// further than [`SEQ_WINDOW`] either way, or it had been evicted), so
    /// nothing is known of what was missed.
    Restarted,
    /// Seen already: drop.
    Duplicate,
}

/// The most streams one room keeps state for at one receiver; a new one
/// beyond it evicts the one heard from least recently. A room's streams
/// are one per origin loop and per life of the room there: a cluster of
/// 16 relays of 16 loops fits, and an origin that churns streams (rooms
/// emptying and filling) pushes out only its own old ones.
pub const MAX_STREAMS: usize = 256;
/// How far a stream's seq may move from the last seen before the stream's
/// state is started again. Further ahead is not a gap the bus could have
/// made (16 M messages of one room, within [`FRESHNESS`] with a key);
/// further behind is not a duplicate but a sender that started over. So
/// no single frame can silence a stream (a seq of u64::MAX would
/// otherwise make every later one a "duplicate"). Behind a seq no key
/// vouched for, the window is [`UNVERIFIED_WINDOW`].
pub const SEQ_WINDOW: u64 = 1 << 24;

/// How far behind the last seq a body is still a duplicate when that last
/// seq came in a batch no key verified (a node without a key, or a new
/// key's grace for unsigned batches); further behind starts the stream
/// again. Anyone may have sent it: with [`SEQ_WINDOW`] a stranger's one
/// frame at `last + 2^24 - 1` would make the next 16 M messages of the
/// stream "duplicates". Core NATS never delivers a message twice, so a
/// real duplicate is a replay, and a small window is all it needs; a
/// stranger's frame silences at most this many.
pub const UNVERIFIED_WINDOW: u64 = 64;

/// One stream's state.
#[derive(Debug, Clone, Copy)]
struct Seen {
    /// The highest seq delivered.
    last: u64,
    /// When it was last heard of ([`Streams::clock`]), for eviction.
    used: u64,
    /// Whether `last` came in a batch a key verified.
    verified: bool,
    /// Up to here (within [`SEQ_WINDOW`]) is a duplicate whatever
    /// `verified` says: what a hand-over said the old process delivered.
    /// Held only while the new process replays what it kept
    /// ([`Streams::end_replay`] drops it), so a stranger's frame that
    /// raised an unverified `last` in the old process silences no more
    /// than that replay. Never set by a frame of the bus.
    floor: u64,
}

/// The last seq seen per stream, for one room at one receiver, bounded
/// ([`MAX_STREAMS`]).
#[derive(Debug, Default)]
pub struct Streams {
    /// (epoch, stream) → its state.
    last: HashMap<(u64, u32), Seen>,
    /// Counts checks: orders streams by their last use.
    clock: u64,
}

impl Streams {
    /// Checks `stamp`, of a batch a key verified or not (`verified`),
    /// against what was seen and remembers it.
    pub fn check(&mut self, stamp: Stamp, verified: bool) -> Order {
        self.clock += 1;
        let now = self.clock;
        let key = (stamp.epoch, stamp.stream);
        let mut evicted = false;
        if !self.last.contains_key(&key) && self.last.len() >= MAX_STREAMS {
            if let Some(oldest) = self
                .last
                .iter()
                .min_by_key(|(_, s)| s.used)
                .map(|(k, _)| *k)
            {
                self.last.remove(&oldest);
                evicted = true;
            }
        }
        let Some(seen) = self.last.get_mut(&key) else {
            self.last.insert(
                key,
                Seen {
                    last: stamp.seq,
                    used: now,
                    verified,
                    floor: 0,
                },
            );
            // A stream joined midway (we subscribed late): no history.
            return if evicted {
                Order::Restarted
            } else {
                Order::Next
            };
        };
        seen.used = now;
        if stamp.seq <= seen.floor && seen.floor - stamp.seq < SEQ_WINDOW {
            return Order::Duplicate;
        }
        if stamp.seq <= seen.last {
            let window = if seen.verified {
                SEQ_WINDOW
            } else {
                UNVERIFIED_WINDOW
            };
            if seen.last - stamp.seq < window {
                return Order::Duplicate;
            }
            seen.last = stamp.seq;
            seen.verified = verified;
            return Order::Restarted;
        }
        let missed = stamp.seq - seen.last - 1;
        seen.last = stamp.seq;
        seen.verified = verified;
        if missed >= SEQ_WINDOW {
            Order::Restarted
        } else if missed == 0 {
            Order::Next
        } else {
            Order::After { missed }
        }
    }

    /// Streams tracked.
    pub fn len(&self) -> usize {
        self.last.len()
    }

    /// Where each stream is: what a hand-over passes on
    /// ([`crate::core::snapshot::RoomStreams`]), least recently heard
    /// from first.
    pub fn positions(&self) -> Vec<StreamPosition> {
        let mut seen: Vec<_> = self.last.iter().collect();
        seen.sort_by_key(|(_, s)| s.used);
        seen.into_iter()
            .map(|(&(epoch, stream), s)| StreamPosition {
                epoch,
                stream,
                last: s.last,
                verified: s.verified,
            })
            .collect()
    }

    /// The state a hand-over passed on ([`positions`](Self::positions),
    /// then the old process's own streams): what was delivered already is
    /// a duplicate here too, however far behind, until
    /// [`end_replay`](Self::end_replay). At most
    /// [`crate::core::snapshot::MAX_ROOM_STREAMS`], the last ones (the most
    /// recently heard from, and the old process's own, come last); the
    /// first new stream after that evicts as usual.
    pub fn from_positions(positions: &[StreamPosition]) -> Streams {
        let mut streams = Streams::default();
        let keep = positions
            .len()
            .saturating_sub(crate::core::snapshot::MAX_ROOM_STREAMS);
        for p in &positions[keep..] {
            streams.clock += 1;
            streams.last.insert(
                (p.epoch, p.stream),
                Seen {
                    last: p.last,
                    used: streams.clock,
                    verified: p.verified,
                    floor: p.last,
                },
            );
        }
        streams
    }

    /// The hand-over's replay is over: the positions passed on count as
    /// any other `last` from now on (the usual windows).
    pub fn end_replay(&mut self) {
        for seen in self.last.values_mut() {
            seen.floor = 0;
        }
    }

    /// Whether none is tracked.
    pub fn is_empty(&self) -> bool {
        self.last.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-over's positions carry the dedup state: what the old process
    /// delivered is a duplicate in the new one, the next one is next, and
    /// the bound per room is the snapshot's.
    #[test]
    fn positions_carry_what_was_delivered() {
        const _: () = assert!(
            MAX_STREAMS + crate::core::snapshot::MAX_LOOPS
                <= crate::core::snapshot::MAX_ROOM_STREAMS
        );
        let st = |stream, seq| Stamp {
            epoch: 5,
            stream,
            seq,
        };
        let mut old = Streams::default();
        for seq in 1..=10 {
            old.check(st(1, seq), true);
        }
        old.check(st(2, 4), false);
        let mut new = Streams::from_positions(&old.positions());
        assert_eq!(new.check(st(1, 10), true), Order::Duplicate);
        assert_eq!(new.check(st(1, 11), true), Order::Next);
        assert_eq!(new.check(st(2, 4), true), Order::Duplicate);
        assert_eq!(new.check(st(2, 6), true), Order::After { missed: 1 });
        assert_eq!(
            new.check(st(3, 1), true),
            Order::Next,
            "a stream not passed on"
        );
        // Unverified positions still hold far behind: the old process's
        // word, not a stranger's frame.
        let mut far = Streams::default();
        far.check(st(4, 1_000), false);
        let mut far = Streams::from_positions(&far.positions());
        assert_eq!(far.check(st(4, 1), false), Order::Duplicate);
        // Once the replay is over, an unverified position is any other
        // unverified `last`: a stranger's frame that raised it in the old
        // process silences no more than the usual window.
        far.end_replay();
        assert_eq!(far.check(st(4, 2), false), Order::Restarted);
        assert_eq!(far.check(st(4, 3), false), Order::Next);
        // A room's streams and the old process's own, past MAX_STREAMS:
        // the last ones (its own) are kept.
        let many: Vec<StreamPosition> = (0..crate::core::snapshot::MAX_ROOM_STREAMS as u32 + 5)
            .map(|i| StreamPosition {
                epoch: 9,
                stream: i,
                last: 10,
                verified: true,
            })
            .collect();
        let mut kept = Streams::from_positions(&many);
        let own = many.last().unwrap();
        assert_eq!(
            kept.check(st_of(own.epoch, own.stream, 10), true),
            Order::Duplicate
        );
    }

    fn st_of(epoch: u64, stream: u32, seq: u64) -> Stamp {
        Stamp { epoch, stream, seq }
    }

    fn key(b: u8) -> ClusterKey {
        ClusterKey::new(vec![b; 32]).unwrap()
    }

    const ST: Stamp = Stamp {
        epoch: 0x0102_0304_0506_0708,
        stream: 9,
        seq: 42,
    };

    fn batch(key: Option<&ClusterKey>, subject: &str, bodies: &[&[u8]]) -> Vec<u8> {
        let mut w = BatchWriter::default();
        w.begin(1_000, ST, key.is_some());
        let mut stamp = ST;
        for b in bodies {
            assert!(w.is_empty() || w.fits(stamp, b.len()));
            w.push(b);
            stamp.seq += 1;
        }
        w.finish(key, subject)
    }

    #[test]
    fn batches_round_trip_and_strangers_are_refused() {
        let msg = batch(None, "u.lobby", &[b"hello. from 127.0.0.1:5000", b"", b"x"]);
        assert_eq!(msg.len(), HEADER_LEN + 3 * LEN_LEN + 26 + 1);
        let b = parse(&msg).unwrap();
        assert_eq!((b.time, b.first, b.tag), (1_000, ST, None));
        let bodies: Vec<&[u8]> = b.bodies.iter().map(|r| &msg[r.clone()]).collect();
        assert_eq!(bodies, [&b"hello. from 127.0.0.1:5000"[..], b"", b"x"]);
        assert_eq!(parse(b"short"), None);
        let mut other = msg.clone();
        other[0] = 1;
        assert_eq!(parse(&other), None, "another version");
        let mut other = msg.clone();
        other[1] = 2;
        assert_eq!(parse(&other), None, "an unknown flag");
        let mut other = msg.clone();
        other.push(0);
        assert_eq!(parse(&other), None, "bytes left over");
        assert_eq!(parse(&msg[..msg.len() - 1]), None, "a body cut short");
        let mut other = msg.clone();
        other[26..28].copy_from_slice(&4u16.to_be_bytes());
        assert_eq!(parse(&other), None, "a count beyond the bodies");
        other[26..28].copy_from_slice(&0u16.to_be_bytes());
        assert_eq!(parse(&other[..HEADER_LEN]), None, "no body");
        let mut other = msg;
        other[18..26].copy_from_slice(&(u64::MAX - 1).to_be_bytes());
        assert_eq!(parse(&other), None, "seqs past u64::MAX");
    }

    #[test]
    fn the_tag_binds_key_subject_and_every_byte() {
        let (k, k2) = (key(1), key(2));
        let msg = batch(Some(&k), "u.room.red", &[b"a", b"bc"]);
        let b = parse(&msg).unwrap();
        let tag = b.tag.unwrap();
        assert!(verify(&k, "u.room.red", b.signed, tag));
        assert!(!verify(&k2, "u.room.red", b.signed, tag), "another key");
        assert!(!verify(&k, "u.room.blue", b.signed, tag), "another room");
        assert!(!verify(&k, "u.room.red", b.signed, &tag[..15]), "short tag");
        for i in 0..msg.len() {
            let mut bent = msg.clone();
            bent[i] ^= 0x10;
            if let Some(b) = parse(&bent) {
                let ok = b.tag.is_some_and(|t| verify(&k, "u.room.red", b.signed, t));
                assert!(!ok, "byte {i} altered and still valid");
            }
        }
        // Untagged with the flag cleared: parses, has no tag to verify.
        let plain = batch(None, "u.room.red", &[b"a"]);
        assert_eq!(parse(&plain).unwrap().tag, None);
    }

    #[test]
    fn a_batch_is_one_stream_consecutive_and_bounded() {
        let mut w = BatchWriter::default();
        w.begin(0, ST, false);
        w.push(b"a");
        let next = Stamp { seq: 43, ..ST };
        assert!(w.fits(next, 1));
        assert!(!w.fits(Stamp { seq: 44, ..ST }, 1), "a hole");
        assert!(!w.fits(Stamp { stream: 10, ..next }, 1), "another stream");
        assert!(!w.fits(next, MAX_BATCH_BYTES), "too big");
        let mut stamp = next;
        while w.fits(stamp, 1) {
            w.push(b"b");
            stamp.seq += 1;
        }
        assert_eq!(w.count(), MAX_BATCH_FRAMES);
        let msg = w.finish(None, "s");
        assert_eq!(parse(&msg).unwrap().bodies.len(), MAX_BATCH_FRAMES);
        assert!(w.is_empty());
    }

    /// What no sender makes is refused before any MAC is spent on it: a
    /// message longer than the longest batch, or more bodies than a batch
    /// holds (each would be a delivery to every member).
    #[test]
    fn a_receiver_refuses_what_no_sender_makes() {
        let mut w = BatchWriter::default();
        w.begin(0, ST, true);
        w.push(&vec![b'x'; usize::from(u16::MAX)]);
        let longest = w.finish(Some(&key(1)), "s");
        assert_eq!(longest.len(), MAX_MESSAGE);
        assert!(parse(&longest).is_some(), "the longest a sender makes");
        let mut over = longest.clone();
        over.push(0);
        assert_eq!(parse(&over), None);
        // 1,025 empty bodies, built by hand (a writer stops at 1,024).
        let mut many = BatchWriter::default();
        many.begin(0, ST, false);
        for _ in 0..=MAX_BATCH_FRAMES {
            many.push(b"");
        }
        let msg = many.finish(None, "s");
        assert_eq!(parse(&msg), None, "{} bodies", MAX_BATCH_FRAMES + 1);
        assert_eq!(parse(&msg[..msg.len() - LEN_LEN]).map(|_| ()), None);
        let mut fewer = msg[..msg.len() - LEN_LEN].to_vec();
        fewer[26..28].copy_from_slice(&(MAX_BATCH_FRAMES as u16).to_be_bytes());
        assert_eq!(parse(&fewer).unwrap().bodies.len(), MAX_BATCH_FRAMES);
    }

    #[test]
    fn freshness_is_symmetric() {
        assert!(fresh(1_000, 1_000 + FRESHNESS));
        assert!(fresh(1_000, 1_000 - FRESHNESS));
        assert!(!fresh(1_000, 1_001 + FRESHNESS));
        assert!(!fresh(1_000, 999 - FRESHNESS));
    }

    fn st(stream: u32, seq: u64) -> Stamp {
        Stamp {
            epoch: 7,
            stream,
            seq,
        }
    }

    #[test]
    fn streams_deliver_once_in_order_and_count_gaps() {
        let mut s = Streams::default();
        assert_eq!(s.check(st(1, 5), true), Order::Next, "joined midway");
        assert_eq!(s.check(st(1, 6), true), Order::Next);
        assert_eq!(s.check(st(1, 6), true), Order::Duplicate);
        assert_eq!(s.check(st(1, 4), true), Order::Duplicate);
        assert_eq!(s.check(st(1, 9), true), Order::After { missed: 2 });
        assert_eq!(s.check(st(2, 1), true), Order::Next, "another stream");
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn no_seq_can_silence_a_stream() {
        let mut s = Streams::default();
        assert_eq!(s.check(st(1, 5), true), Order::Next);
        assert_eq!(s.check(st(1, u64::MAX), true), Order::Restarted);
        // The sender goes on where it was: the far jump back restarts.
        assert_eq!(s.check(st(1, 6), true), Order::Restarted);
        assert_eq!(s.check(st(1, 7), true), Order::Next);
        assert_eq!(s.check(st(1, 8 + SEQ_WINDOW), true), Order::Restarted);
        assert_eq!(s.check(st(1, 9 + SEQ_WINDOW), true), Order::Next);
        assert_eq!(
            s.check(st(1, 9 + 2 * SEQ_WINDOW), true),
            Order::After {
                missed: SEQ_WINDOW - 1
            }
        );
    }

    /// Without a key anyone may send a frame: one just inside the window
    /// ahead must not make the stream's next messages "duplicates".
    #[test]
    fn an_unverified_jump_silences_no_more_than_its_window() {
        let mut s = Streams::default();
        assert_eq!(s.check(st(1, 5), false), Order::Next);
        let jump = 5 + SEQ_WINDOW - 1;
        assert_eq!(
            s.check(st(1, jump), false),
            Order::After { missed: jump - 6 }
        );
        // The sender goes on: started again at once, not dropped 16 M times.
        assert_eq!(s.check(st(1, 6), false), Order::Restarted);
        assert_eq!(s.check(st(1, 7), false), Order::Next);
        assert_eq!(s.check(st(1, 7), false), Order::Duplicate, "a replay");
        assert_eq!(
            s.check(st(1, 7 + UNVERIFIED_WINDOW), false),
            Order::After {
                missed: UNVERIFIED_WINDOW - 1
            }
        );
        assert_eq!(
            s.check(st(1, 8), false),
            Order::Duplicate,
            "within the small window"
        );
        // Behind a verified seq, the whole window holds (replays of a
        // keyed stream stay duplicates).
        assert_eq!(s.check(st(2, 1_000), true), Order::Next);
        assert_eq!(s.check(st(2, 1), true), Order::Duplicate);
        // An unverified jump over a verified stream (a new key's grace):
        // the verified sender is restarted, not silenced.
        assert_eq!(
            s.check(st(2, 1_000 + SEQ_WINDOW - 1), false),
            Order::After {
                missed: SEQ_WINDOW - 2
            }
        );
        assert_eq!(s.check(st(2, 1_001), true), Order::Restarted);
        assert_eq!(s.check(st(2, 1_002), true), Order::Next);
    }

    #[test]
    fn streams_per_room_are_bounded_evicting_the_least_recent() {
        let mut s = Streams::default();
        for n in 0..MAX_STREAMS as u32 {
            assert_eq!(s.check(st(n, 1), true), Order::Next);
        }
        // Stream 0 stays in use; a flood of new streams evicts the others.
        for n in 0..10 * MAX_STREAMS as u32 {
            assert_eq!(s.check(st(0, 2 + u64::from(n)), true), Order::Next);
            assert_eq!(s.check(st(1_000 + n, 1), true), Order::Restarted);
            assert!(s.len() <= MAX_STREAMS);
        }
        assert_eq!(
            s.check(st(0, 2), true),
            Order::Duplicate,
            "the busy one kept"
        );
    }
}
