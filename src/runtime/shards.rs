//! Several loops on one port (`--threads N`): what each loop holds of its
//! siblings, and the queues between them.
//!
//! Each loop (a *shard*) has its own SO_REUSEPORT socket on the relay's
//! address, its own hub, table, wheel and rooms: the kernel hashes each
//! source to one socket, so a client belongs to one shard and nothing
//! about it is shared. What crosses shards is a message for a room with
//! members elsewhere: the shard that received it renders it once into a
//! shared, immutable buffer ([`Handoff`], one copy whatever the
//! number of shards) and queues a reference to it for every other shard
//! that has members in that room, through a bounded single-producer queue
//! per pair of shards, waking each such shard once per batch, not per
//! message. The receiving shard fans the bytes out to its own members from
//! its own socket (same address and port, so clients see one relay), as
//! the cluster bridge's messages are: through [`crate::core::hub::Hub::relay_from_elsewhere`].
//!
//! Which shards have members in which room is told too: a shard whose
//! room opens or closes says so to every other shard before it answers the
//! joins, through an [`Interest`] per ordered pair (coalesced per room, so
//! it is bounded by the rooms open and never loses an "opened"); every
//! shard reads that news before each hand-off. The lobby is told the same
//! way, as it gets its first member on a shard and loses its last, so a
//! lobby message goes only to the shards with lobby members. The caps are
//! counted across shards by
//! [`crate::runtime::census::SharedCensus`].
//!
//! A full queue drops the message for that shard and counts it
//! (`udphub_delivery_dropped_total{reason="shard_queue_full"}`); a loop
//! never blocks on another. Order: one sender's messages reach one shard
//! through one FIFO queue, so they arrive in the order sent.

use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;

use hashbrown::HashMap;
use mio::Waker;

use crate::cluster::interest::Interest;
use crate::core::counts::{Counts, DeliveryDrop};

/// Messages a shard may have queued for one other shard, at most: a few
/// batches of fan-outs (each costs the receiver a `sendmmsg` per 256
/// members), enough to ride out a scheduling hiccup, bounded so a stuck
/// shard costs memory in proportion to this, not to the traffic. With many
/// shards it shrinks (see [`queue_capacity`]).
pub const SHARD_QUEUE: usize = 1024;

/// Slots of all of one shard's inbound queues together, past which each
/// queue is made smaller: there are N × (N − 1) queues, allocated up
/// front, so at 64 shards 1,024 slots each would be ~130 MB.
const INBOUND_SLOTS: usize = 16 * 1024;

/// The capacity of each queue between `n` shards: [`SHARD_QUEUE`], or
/// less with many shards (never under 64).
pub fn queue_capacity(n: usize) -> usize {
    (INBOUND_SLOTS / n.saturating_sub(1).max(1)).clamp(64, SHARD_QUEUE)
}

/// Messages from other shards fanned out per wake-up, before the loop goes
/// back to its own socket and timers (a message to a big room is
/// thousands of deliveries: a full queue drained at once would stall the
/// loop for seconds). What is left wakes the loop again at once.
pub const DRAIN_BUDGET: usize = 64;

/// Most shards: interest in a room is a 64-bit mask.
pub const MAX_SHARDS: usize = 64;

/// A message rendered once, shared by every shard that fans it out: the
/// room's name (empty: the lobby) followed by the payload.
#[derive(Debug, Clone)]
pub struct Handoff {
    /// `name ++ payload`, written once.
    bytes: Arc<Vec<u8>>,
    /// Where the name ends.
    name_len: usize,
}

impl Handoff {
    /// Copies `name` and `payload` into one shared buffer, once: the `Vec`
    /// moves into its `Arc` (24 bytes), where a `Vec` turned into an
    /// `Arc<[u8]>` would be copied again, and collecting the two slices
    /// straight into an `Arc<[u8]>` copies byte by byte (10x slower at
    /// 1,200 B, docs/BENCHMARKS.md).
    pub fn new(name: &[u8], payload: &[u8]) -> Handoff {
        let mut bytes = Vec::with_capacity(name.len() + payload.len());
        bytes.extend_from_slice(name);
        bytes.extend_from_slice(payload);
        Handoff {
            bytes: Arc::new(bytes),
            name_len: name.len(),
        }
    }

    /// The room's name.
    pub fn room(&self) -> &[u8] {
        &self.bytes[..self.name_len]
    }

    /// The bytes every recipient receives.
    pub fn payload(&self) -> &[u8] {
        &self.bytes[self.name_len..]
    }
}

/// Verify mode's cookie-reply budget, one for all the loops of a relay:
/// the relay's per-prefix and total rates hold whichever loop a source's
/// datagrams land on, and a prefix first seen by one loop is known to all
/// (a flood's first sweep over its prefixes ends as soon as with one
/// loop). Taken only for a datagram from an unverified source that is long
/// enough to be answered (never for a member's), for the ~100 ns of one
/// look-up.
#[derive(Debug, Clone)]
pub struct SharedBudget(Arc<std::sync::Mutex<crate::core::limits::LocalBudget>>);

impl SharedBudget {
    /// The relay's budget for `per_sec` cookie replies a second per prefix.
    pub fn new(per_sec: f64) -> SharedBudget {
        SharedBudget(Arc::new(std::sync::Mutex::new(
            crate::core::admission::Verify::local_budget(per_sec, std::time::Instant::now()),
        )))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, crate::core::limits::LocalBudget> {
        // A loop that panicked holding it left one bucket half-updated at
        // worst: carry on.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl crate::core::limits::CookieBudget for SharedBudget {
    fn allow(&mut self, addr: &crate::core::addr::RawAddr, now: std::time::Instant) -> bool {
        self.lock().allow(addr, now)
    }

    fn set_rate(&mut self, rate: crate::core::limits::Rate, total: f64) {
        self.lock().set_rate(rate, total);
    }
}

/// This shard's way to one other shard.
struct Peer {
    /// Its index.
    index: usize,
    /// Messages for it (bounded).
    data: SyncSender<Handoff>,
    /// Rooms opening and closing here, as it is to learn them.
    interest: Arc<Interest>,
    /// Its loop's waker.
    waker: Arc<Waker>,
    /// Something was queued for it in this batch: wake it at the end.
    wake: bool,
}

/// What one shard holds of the others.
pub struct Siblings {
    /// This shard's index.
    index: usize,
    /// The other shards.
    peers: Vec<Peer>,
    /// Messages from each other shard.
    inbox: Vec<Receiver<Handoff>>,
    /// Rooms opening and closing on each other shard (its index).
    news: Vec<(usize, Arc<Interest>)>,
    /// Named rooms with members on other shards: bit `j` for shard `j`.
    rooms: HashMap<Box<[u8]>, u64>,
    /// This shard's own waker: messages left after a drain's budget.
    own_waker: Option<Arc<Waker>>,
    /// Which inbox the next drain starts with (so that no sibling's queue
    /// waits behind another's).
    next_inbox: usize,
}

/// What a loop needs from the others before they all start: its own end
/// of every queue and every other loop's waker. Made by [`wire`](Unwired::wire).
pub struct Unwired {
    index: usize,
    data_tx: Vec<(usize, SyncSender<Handoff>)>,
    interest_tx: Vec<(usize, Arc<Interest>)>,
    inbox: Vec<Receiver<Handoff>>,
    news: Vec<(usize, Arc<Interest>)>,
}

/// Makes the queues between `n` shards (a bounded one for messages and an
/// [`Interest`] for rooms, per ordered pair). Each shard's part becomes its
/// [`Siblings`] once the wakers are known ([`Unwired::wire`]).
pub fn queues(n: usize) -> Vec<Unwired> {
    let mut parts: Vec<Unwired> = (0..n)
        .map(|index| Unwired {
            index,
            data_tx: Vec::new(),
            interest_tx: Vec::new(),
            inbox: Vec::new(),
            news: Vec::new(),
        })
        .collect();
    for from in 0..n {
        for to in 0..n {
            if from == to {
                continue;
            }
            let (tx, rx) = mpsc::sync_channel(queue_capacity(n));
            let interest = Arc::new(Interest::new());
            parts[from].data_tx.push((to, tx));
            parts[from].interest_tx.push((to, Arc::clone(&interest)));
            parts[to].inbox.push(rx);
            parts[to].news.push((from, interest));
        }
    }
    parts
}

impl Unwired {
    /// Joins this shard's queues with the other loops' wakers
    /// (`wakers[j]` wakes shard `j`).
    pub fn wire(self, wakers: &[Arc<Waker>]) -> Siblings {
        let interest: HashMap<usize, Arc<Interest>> = self.interest_tx.into_iter().collect();
        let peers = self
            .data_tx
            .into_iter()
            .filter_map(|(to, data)| {
                Some(Peer {
                    index: to,
                    interest: interest.get(&to)?.clone(),
                    waker: Arc::clone(wakers.get(to)?),
                    data,
                    wake: false,
                })
            })
            .collect();
        Siblings {
            index: self.index,
            peers,
            inbox: self.inbox,
            news: self.news,
            rooms: HashMap::new(),
            own_waker: wakers.get(self.index).cloned(),
            next_inbox: 0,
        }
    }
}

impl Siblings {
    /// This shard's index.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Queues `message` for every other shard with members in its room
    /// (the lobby included: only where it has members). A full queue drops
    /// it for that shard and counts the drop as one recipient dropped, so
    /// the delivery invariant still holds.
    pub fn hand_off(&mut self, room: &[u8], payload: &[u8], counts: &mut Counts) {
        // The latest news first (an empty channel costs a load): a room a
        // member just joined on another loop is sent to at once.
        self.take_news();
        let mask = match self.rooms.get(room) {
            Some(&mask) => mask,
            None => return,
        };
        let mut message = None;
        for peer in &mut self.peers {
            if mask & (1 << peer.index) == 0 {
                continue;
            }
            let m = message.get_or_insert_with(|| Handoff::new(room, payload));
            match peer.data.try_send(m.clone()) {
                Ok(()) => peer.wake = true,
                Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                    counts.recipients += 1;
                    counts.delivery_dropped[DeliveryDrop::ShardQueueFull as usize] += 1;
                }
            }
        }
    }

    /// Tells every other shard that a named room opened or closed here.
    pub fn room_opened(&mut self, name: &[u8]) {
        self.tell(name, true);
    }

    /// See [`room_opened`](Self::room_opened).
    pub fn room_closed(&mut self, name: &[u8]) {
        self.tell(name, false);
    }

    fn tell(&mut self, name: &[u8], open: bool) {
        for peer in &mut self.peers {
            peer.interest.tell(name, open);
            peer.wake = true;
        }
    }

    /// Wakes each shard that was sent something since the last call: once
    /// per batch, however many messages it got.
    pub fn wake(&mut self) {
        for peer in &mut self.peers {
            if std::mem::take(&mut peer.wake) {
                if let Err(e) = peer.waker.wake() {
                    tracing::error!(event = "wake_failed", loop_index = peer.index, error = %e, "cannot wake loop {}: {e}", peer.index);
                }
            }
        }
    }

    /// Takes in the news about rooms, then hands up to [`DRAIN_BUDGET`]
    /// queued messages to `fan_out` (room name, payload), oldest first per
    /// sending shard. If messages are left, wakes this loop again, so they
    /// are drained on its next pass, after its own socket has had a turn.
    pub fn drain(&mut self, fan_out: impl FnMut(&[u8], &[u8])) {
        if self.drain_up_to(DRAIN_BUDGET, fan_out) {
            if let Some(w) = &self.own_waker {
                if let Err(e) = w.wake() {
                    tracing::error!(event = "wake_failed", loop_index = self.index, error = %e, "cannot wake loop {}: {e}", self.index);
                }
            }
        }
    }

    /// Applies the other shards' news about their rooms.
    fn take_news(&mut self) {
        let rooms = &mut self.rooms;
        for (from, news) in &self.news {
            news.take(|name, open| {
                if open {
                    *rooms.entry(name).or_insert(0) |= 1 << from;
                } else if let Some(mask) = rooms.get_mut(&name) {
                    *mask &= !(1 << from);
                    if *mask == 0 {
                        rooms.remove(&name);
                    }
                }
            });
        }
    }

    /// [`drain`](Self::drain) with a budget; returns whether messages are
    /// left.
    fn drain_up_to(&mut self, budget: usize, mut fan_out: impl FnMut(&[u8], &[u8])) -> bool {
        self.take_news();
        let mut left = budget;
        let n = self.inbox.len();
        for k in 0..n {
            let inbox = &self.inbox[(self.next_inbox + k) % n];
            while left > 0 {
                match inbox.try_recv() {
                    Ok(message) => {
                        fan_out(message.room(), message.payload());
                        left -= 1;
                    }
                    Err(_) => break,
                }
            }
            if left == 0 {
                self.next_inbox = (self.next_inbox + k + 1) % n.max(1);
                return true;
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::limits::CookieBudget;
    use mio::{Poll, Token};

    /// The loops share one cookie budget: what one loop spends on a prefix
    /// another loop cannot spend again (a flood split over the loops' sockets
    /// gets the relay's allowance, not one per loop).
    #[test]
    fn loops_spend_one_cookie_budget() {
        let mut loop_a = SharedBudget::new(10.0);
        let mut loop_b = loop_a.clone();
        let now = std::time::Instant::now();
        let from =
            |port: u16| crate::core::addr::RawAddr::from_socket_addr(([127, 9, 9, 9], port).into());
        // Loop A spends the prefix's whole allowance at one instant.
        let mut allowed_a = 0;
        for port in 1..=1000 {
            allowed_a += usize::from(loop_a.allow(&from(port), now));
        }
        assert!(allowed_a > 0 && allowed_a < 1000, "{allowed_a}");
        // Loop B, same prefix, same instant: nothing left.
        let allowed_b = (1001..=2000)
            .filter(|&p| loop_b.allow(&from(p), now))
            .count();
        assert_eq!(allowed_b, 0);
        // Apart, each loop would have had its own allowance.
        let mut apart = SharedBudget::new(10.0);
        assert!(apart.allow(&from(1), now));
    }

    fn wired(n: usize) -> (Vec<Poll>, Vec<Siblings>) {
        let polls: Vec<Poll> = (0..n).map(|_| Poll::new().unwrap()).collect();
        let wakers: Vec<Arc<Waker>> = polls
            .iter()
            .map(|p| Arc::new(Waker::new(p.registry(), Token(1)).unwrap()))
            .collect();
        let sibs = queues(n).into_iter().map(|u| u.wire(&wakers)).collect();
        (polls, sibs)
    }

    fn drained(s: &mut Siblings) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut out = Vec::new();
        s.drain_up_to(usize::MAX, |room, payload| {
            out.push((room.to_vec(), payload.to_vec()))
        });
        out
    }

    #[test]
    fn lobby_messages_go_to_every_other_shard_with_lobby_members_in_order() {
        let (_polls, mut s) = wired(4);
        let mut counts = Counts::default();
        for other in [1, 2] {
            s[other].room_opened(b"");
        }
        for m in [&b"one"[..], b"two", b"three"] {
            s[0].hand_off(b"", m, &mut counts);
        }
        s[0].wake();
        assert!(drained(&mut s[0]).is_empty(), "never to itself");
        assert!(drained(&mut s[3]).is_empty(), "no lobby member there");
        for other in [1, 2] {
            let got: Vec<Vec<u8>> = drained(&mut s[other]).into_iter().map(|m| m.1).collect();
            assert_eq!(
                got,
                vec![b"one".to_vec(), b"two".to_vec(), b"three".to_vec()]
            );
        }
        assert_eq!(counts.recipients, 0);
    }

    #[test]
    fn named_rooms_go_only_where_they_have_members() {
        let (_polls, mut s) = wired(3);
        let mut counts = Counts::default();
        s[2].room_opened(b"red");
        drained(&mut s[0]);
        drained(&mut s[1]);
        s[0].hand_off(b"red", b"hi", &mut counts);
        s[0].hand_off(b"blue", b"nobody", &mut counts);
        assert!(drained(&mut s[1]).is_empty());
        assert_eq!(drained(&mut s[2]), vec![(b"red".to_vec(), b"hi".to_vec())]);
        s[2].room_closed(b"red");
        drained(&mut s[0]);
        s[0].hand_off(b"red", b"late", &mut counts);
        assert!(drained(&mut s[2]).is_empty());
    }

    #[test]
    fn a_full_queue_drops_and_counts_and_never_blocks() {
        let (_polls, mut s) = wired(2);
        let mut counts = Counts::default();
        s[1].room_opened(b"");
        for i in 0..SHARD_QUEUE + 10 {
            s[0].hand_off(b"", format!("{i}").as_bytes(), &mut counts);
        }
        assert_eq!(counts.recipients, 10);
        assert_eq!(
            counts.delivery_dropped[DeliveryDrop::ShardQueueFull as usize],
            10
        );
        assert_eq!(drained(&mut s[1]).len(), SHARD_QUEUE);
    }

    #[test]
    fn a_drain_stops_at_its_budget_and_takes_turns() {
        let (_polls, mut s) = wired(3);
        let mut counts = Counts::default();
        s[2].room_opened(b"");
        for i in 0..DRAIN_BUDGET {
            s[0].hand_off(b"", format!("a{i}").as_bytes(), &mut counts);
            s[1].hand_off(b"", format!("b{i}").as_bytes(), &mut counts);
        }
        let mut got = Vec::new();
        assert!(s[2].drain_up_to(DRAIN_BUDGET, |_, p| got.push(p.to_vec())));
        assert_eq!(got.len(), DRAIN_BUDGET);
        // The next drain starts with the other sibling's queue.
        let mut next = Vec::new();
        s[2].drain_up_to(DRAIN_BUDGET, |_, p| next.push(p.to_vec()));
        assert_eq!(next.len(), DRAIN_BUDGET);
        assert_ne!(got[0][0], next[0][0]);
        assert!(!s[2].drain_up_to(DRAIN_BUDGET, |_, _| panic!("all drained")));
    }

    #[test]
    fn queues_shrink_with_many_shards() {
        assert_eq!(queue_capacity(2), SHARD_QUEUE);
        assert_eq!(queue_capacity(8), SHARD_QUEUE);
        assert_eq!(queue_capacity(32), 528);
        assert_eq!(queue_capacity(64), 260);
    }

    #[test]
    fn a_handoff_is_one_shared_buffer() {
        let h = Handoff::new(b"room", b"payload");
        let copy = h.clone();
        assert!(Arc::ptr_eq(&h.bytes, &copy.bytes));
        assert_eq!(
            (copy.room(), copy.payload()),
            (&b"room"[..], &b"payload"[..])
        );
    }
}
