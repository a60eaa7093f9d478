//! The cluster: relays sharing rooms over NATS core pub/sub.
//!
//! A message from a local member is rendered once here, fanned out to the
//! local members, and published once on its room's subject
//! (`NAME.lobby`, `NAME.room.ROOM`); every other node subscribed to that
//! subject fans it out to its own members through the hub's second way in
//! ([`Hub::relay_from_elsewhere`](crate::core::hub::Hub::relay_from_elsewhere)).
//! A node subscribes to a room's subject while the room has members on
//! any of its loops, and to the lobby always. The connection has `no_echo`,
//! so a node never hears itself: each recipient in the cluster gets each
//! message once.
//!
//! With `--threads N` there is still one bridge (one NATS connection) per
//! process, and one [`Bus`] per loop: every loop publishes through the
//! bridge (clones of one bounded queue's sender), stamping its own streams
//! (an epoch per loop, so stream numbers are unique in the process), and the
//! bridge hands each message from the bus to every loop with members in its
//! room, through that loop's own bounded queue, in the order NATS delivered
//! it. Members on the origin's other loops get a local message through the
//! shard hand-off ([`crate::runtime::shards`]), never through NATS.
//!
//! - [`frame`]: the bytes on the bus (a stamp for order, dedup and gaps).
//! - [`bridge`]: the thread that talks to NATS (async-nats on a small
//!   current-thread runtime).
//! - [`tls`]: the bridge's TLS client (`tls://`, `--cluster-ca`, mutual
//!   TLS), which says why a handshake failed.
//! - [`Bus`] (here): one loop's side of the bus: bounded queues to and
//!   from the bridge, and a mio `Waker` the bridge rings once per burst;
//!   its drain is budgeted per wake-up ([`DRAIN_BUDGET`]).
//!   ([`BusDrop`]: why a message to or from the bus was dropped.)
//!
//! Failure stays local: the loop never waits for the bus. A publish that
//! does not fit the queue, or finds NATS down, is dropped and counted
//! (`udphub_cluster_dropped_total{reason}`); local fan-out goes on.

pub mod bridge;
pub mod frame;
pub mod interest;
pub mod tls;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;

use bytes::Bytes;
use metrics::Counter;

use crate::error::Error;

/// `--cluster` and friends, resolved (the configuration owns them).
pub use crate::config::ClusterConfig;

/// Messages waiting for the bridge to publish; a full queue drops.
pub const PUBLISH_QUEUE: usize = 65_536;
/// Messages from the bus waiting for the loops, all loops' queues together
/// (each loop's queue gets its share, see [`inbound_capacity`]); a full
/// queue drops. A queue's slots are allocated up front, so the total, not
/// each, is what is bounded.
pub const INBOUND_QUEUE: usize = 65_536;

/// Messages from the bus a loop fans out per wake-up, before it goes back
/// to its own socket, timers and shutdown (a message to a big room is
/// thousands of deliveries: a full queue drained at once would stall the
/// loop for seconds). What is left wakes the loop again at once. The same
/// cap as the shards' hand-offs ([`crate::runtime::shards`] cannot be
/// named here: the runtime sits above the cluster).
pub const DRAIN_BUDGET: usize = 64;

/// Each loop's inbound queue with `loops` loops: its share of
/// [`INBOUND_QUEUE`], never under 4,096 (a few bursts' worth).
pub fn inbound_capacity(loops: usize) -> usize {
    (INBOUND_QUEUE / loops.max(1)).max(4_096)
}

/// The subject of a room (the empty name is the lobby). Room names may
/// hold `.`, which separates NATS tokens: it is written `~2E` (`~` is
/// never in a room name, so this cannot collide).
pub fn subject(cluster: &str, room: &[u8]) -> String {
    if room.is_empty() {
        return format!("{cluster}.lobby");
    }
    let mut s = String::with_capacity(cluster.len() + 6 + room.len() + 8);
    s.push_str(cluster);
    s.push_str(".room.");
    for &b in room {
        if b == b'.' {
            s.push_str("~2E");
        } else {
            s.push(char::from(b));
        }
    }
    s
}

/// Which rooms the loops want the bridge subscribed to: an
/// [`Interest`](interest::Interest) per loop (coalesced per room, bounded by
/// the rooms open, nothing lost) and the bridge's wake-up. The bridge
/// subscribes to a room while any loop has it open.
#[derive(Debug, Default)]
pub struct Control {
    /// Rooms opened (subscribe) and closed (unsubscribe), by loop index.
    pub rooms: Vec<interest::Interest>,
    /// Rung when one of `rooms` changed.
    pub changed: tokio::sync::Notify,
}

impl Control {
    /// Interest for `loops` loops, none told yet.
    pub fn new(loops: usize) -> Control {
        Control {
            rooms: (0..loops).map(|_| interest::Interest::new()).collect(),
            changed: tokio::sync::Notify::new(),
        }
    }
}

/// One loop's way in from the bridge: its bounded queue and its waker.
pub struct LoopInbox {
    /// Messages from the bus for this loop.
    pub queue: mpsc::SyncSender<Inbound>,
    /// Rings the loop.
    pub waker: Arc<mio::Waker>,
    /// Set when the loop has been rung and has not drained yet: the bridge
    /// rings once per burst, not per message.
    pub wake_pending: Arc<AtomicBool>,
}

impl LoopInbox {
    /// Queues `message` for this loop without waiting, ringing the loop
    /// unless it was rung already; a full queue drops it, counted. Returns
    /// `false` if the loop is gone.
    pub fn offer(&self, message: Inbound, metrics: &ClusterMetrics) -> bool {
        match self.queue.try_send(message) {
            Ok(()) => {}
            Err(mpsc::TrySendError::Full(_)) => {
                metrics.drop_one(BusDrop::InboundFull);
                return true;
            }
            Err(mpsc::TrySendError::Disconnected(_)) => return false,
        }
        if !self.wake_pending.swap(true, Ordering::SeqCst) {
            if let Err(e) = self.waker.wake() {
                tracing::warn!("cluster: cannot wake a loop: {e}");
            }
        }
        true
    }
}

/// A message for the bridge to publish.
#[derive(Debug)]
pub struct Publish {
    /// Where.
    pub subject: async_nats::Subject,
    /// A [`frame`].
    pub frame: Bytes,
}

/// A message from the bus for the loop.
#[derive(Debug)]
pub struct Inbound {
    /// Its room.
    pub room: Arc<[u8]>,
    /// A [`frame`] (checked by the loop).
    pub frame: Bytes,
}

crate::core::labelled_enum! {
    /// Why a message between this node and the bus was dropped
    /// (`udphub_cluster_dropped_total{reason}`). Not a datagram's
    /// [`DropReason`](crate::core::DropReason): these are cluster frames.
    pub enum BusDrop {
        /// The publish queue to the bridge was full (NATS slow).
        QueueFull => "queue_full",
        /// NATS was not connected.
        Disconnected => "disconnected",
        /// The NATS client refused the publish.
        PublishError => "publish_error",
        /// The queue from the bridge to the loop was full (the loop slow).
        InboundFull => "inbound_full",
        /// Not a frame of ours.
        Malformed => "malformed",
        /// Seen already (the stamp said so).
        Duplicate => "duplicate",
    }
}

/// The cluster's metric handles, shared by the loop and the bridge.
#[derive(Clone)]
pub struct ClusterMetrics {
    /// Messages handed to NATS.
    pub published: Counter,
    /// Messages from the bus the loop fanned out.
    pub received: Counter,
    /// Messages the bus lost, from the gaps in the stamps.
    pub gap: Counter,
    /// Drops, indexed by [`BusDrop::index`].
    dropped: [Counter; BusDrop::COUNT],
    /// 1 while connected.
    pub connected: metrics::Gauge,
}

impl ClusterMetrics {
    /// Registers the cluster metrics (only a node with `--cluster` has them).
    pub fn register() -> ClusterMetrics {
        use metrics::{describe_counter, describe_gauge, Unit};
        describe_counter!(
            "udphub_cluster_published_total",
            Unit::Count,
            "Messages from local members published to the cluster (once each, whatever the number of nodes)."
        );
        describe_counter!(
            "udphub_cluster_received_total",
            Unit::Count,
            "Messages from other nodes fanned out to local members."
        );
        describe_counter!(
            "udphub_cluster_gap_total",
            Unit::Count,
            "Messages of other nodes the bus lost (gaps in their sequence numbers)."
        );
        describe_counter!(
            "udphub_cluster_dropped_total",
            Unit::Count,
            "Cluster messages dropped, by reason: queue_full, disconnected, publish_error (outgoing); inbound_full, malformed, duplicate (incoming)."
        );
        describe_gauge!(
            "udphub_cluster_connected",
            Unit::Count,
            "1 while connected to a NATS server, else 0."
        );
        let connected = metrics::gauge!("udphub_cluster_connected");
        connected.set(0.0);
        ClusterMetrics {
            published: metrics::counter!("udphub_cluster_published_total"),
            received: metrics::counter!("udphub_cluster_received_total"),
            gap: metrics::counter!("udphub_cluster_gap_total"),
            dropped: std::array::from_fn(
                |i| metrics::counter!("udphub_cluster_dropped_total", "reason" => BusDrop::ALL[i].label()),
            ),
            connected,
        }
    }

    /// Counts one drop.
    pub fn drop_one(&self, reason: BusDrop) {
        self.dropped[reason.index()].increment(1);
    }
}

/// One room's outgoing stream here.
struct Outgoing {
    subject: async_nats::Subject,
    stream: u32,
    seq: u64,
}

/// One loop's side of the cluster: what it publishes, what it receives,
/// and which rooms it wants.
pub struct Bus {
    cluster: String,
    /// This loop's epoch: the process's random one plus the loop's index,
    /// so that no two loops of a process stamp the same stream.
    epoch: u64,
    /// This loop's index: which of [`Control::rooms`] it tells.
    index: usize,
    next_stream: u32,
    outgoing: HashMap<Box<[u8]>, Outgoing>,
    incoming: HashMap<Arc<[u8]>, frame::Streams>,
    publish: tokio::sync::mpsc::Sender<Publish>,
    control: Arc<Control>,
    inbound: mpsc::Receiver<Inbound>,
    wake_pending: Arc<AtomicBool>,
    /// This loop's own waker: messages left after a drain's budget.
    own_waker: Arc<mio::Waker>,
    connected: Arc<AtomicBool>,
    metrics: ClusterMetrics,
    scratch: Vec<u8>,
}

impl Bus {
    /// Starts the one bridge thread for `config` and returns one `Bus` per
    /// loop: the bridge rings `wakers[i]` when messages from the bus wait
    /// for loop `i`. `epoch` is random per process; loop `i` stamps with
    /// `epoch + i`.
    pub fn start(
        config: &ClusterConfig,
        wakers: &[Arc<mio::Waker>],
        epoch: u64,
    ) -> Result<Vec<Bus>, Error> {
        let metrics = ClusterMetrics::register();
        let (publish, publish_rx) = tokio::sync::mpsc::channel(PUBLISH_QUEUE);
        let control = Arc::new(Control::new(wakers.len()));
        let connected = Arc::new(AtomicBool::new(false));
        let capacity = inbound_capacity(wakers.len());
        let mut inboxes = Vec::with_capacity(wakers.len());
        let mut buses = Vec::with_capacity(wakers.len());
        for (index, waker) in wakers.iter().enumerate() {
            let (queue, inbound) = mpsc::sync_channel(capacity);
            let wake_pending = Arc::new(AtomicBool::new(false));
            inboxes.push(LoopInbox {
                queue,
                waker: Arc::clone(waker),
                wake_pending: Arc::clone(&wake_pending),
            });
            buses.push(Bus {
                cluster: config.name.clone(),
                epoch: epoch.wrapping_add(index as u64),
                index,
                next_stream: 1,
                outgoing: HashMap::new(),
                incoming: HashMap::new(),
                publish: publish.clone(),
                control: Arc::clone(&control),
                inbound,
                wake_pending,
                own_waker: Arc::clone(waker),
                connected: Arc::clone(&connected),
                metrics: metrics.clone(),
                scratch: Vec::new(),
            });
        }
        bridge::spawn(bridge::Bridge {
            config: config.clone(),
            publish: publish_rx,
            control,
            loops: inboxes.into(),
            connected,
            metrics,
        })?;
        for bus in &mut buses {
            // The lobby spans the cluster and every loop: always subscribed.
            bus.room_opened(b"");
        }
        Ok(buses)
    }

    /// A room got its first member on this loop: subscribe to it (if no
    /// other loop had).
    pub fn room_opened(&mut self, room: &[u8]) {
        let room: Arc<[u8]> = room.into();
        self.incoming
            .insert(Arc::clone(&room), frame::Streams::default());
        self.tell(&room, true);
    }

    /// Its last member on this loop left: forget its streams here, and
    /// unsubscribe if no other loop has it open.
    pub fn room_closed(&mut self, room: &[u8]) {
        self.incoming.remove(room);
        self.outgoing.remove(room);
        self.tell(room, false);
    }

    fn tell(&self, room: &[u8], open: bool) {
        if let Some(rooms) = self.control.rooms.get(self.index) {
            rooms.tell(room, open);
            self.control.changed.notify_one();
        }
    }

    /// Publishes a message a local member sent to `room`, already rendered
    /// (`body`); never waits: a full queue or a disconnected bus drops it,
    /// counted.
    pub fn publish(&mut self, room: &[u8], body: &[u8]) {
        if !self.connected.load(Ordering::Relaxed) {
            self.metrics.drop_one(BusDrop::Disconnected);
            return;
        }
        if !self.outgoing.contains_key(room) {
            let stream = self.next_stream;
            self.next_stream = self.next_stream.wrapping_add(1);
            self.outgoing.insert(
                room.into(),
                Outgoing {
                    subject: subject(&self.cluster, room).into(),
                    stream,
                    seq: 0,
                },
            );
        }
        let Some(out) = self.outgoing.get_mut(room) else {
            return;
        };
        out.seq += 1;
        let stamp = frame::Stamp {
            epoch: self.epoch,
            stream: out.stream,
            seq: out.seq,
        };
        frame::encode(stamp, body, &mut self.scratch);
        let message = Publish {
            subject: out.subject.clone(),
            frame: Bytes::copy_from_slice(&self.scratch),
        };
        if self.publish.try_send(message).is_err() {
            // The receivers will see the gap in this stream.
            self.metrics.drop_one(BusDrop::QueueFull);
        }
    }

    /// Takes up to [`DRAIN_BUDGET`] messages waiting from the bus and hands
    /// each one that is new, in order, to `deliver(room, body)`; counts
    /// duplicates, gaps and strangers. If the budget ran out, wakes this
    /// loop again, so the rest is drained on its next pass, after its own
    /// socket and timers have had a turn.
    pub fn drain(&mut self, deliver: impl FnMut(&[u8], &[u8])) {
        if self.drain_up_to(DRAIN_BUDGET, deliver) {
            if let Err(e) = self.own_waker.wake() {
                tracing::error!("cluster: cannot wake loop {}: {e}", self.index);
            }
        }
    }

    /// [`drain`](Self::drain) with a budget; returns whether it ran out
    /// (messages may be left).
    fn drain_up_to(&mut self, budget: usize, mut deliver: impl FnMut(&[u8], &[u8])) -> bool {
        // Cleared before draining: a message queued after this will ring
        // again, so none waits for the next datagram.
        self.wake_pending.store(false, Ordering::SeqCst);
        for _ in 0..budget {
            let Ok(m) = self.inbound.try_recv() else {
                return false;
            };
            let Some((stamp, body)) = frame::decode(&m.frame) else {
                self.metrics.drop_one(BusDrop::Malformed);
                continue;
            };
            // A room closed here a moment ago has no streams (and no
            // members): the message reaches nobody, which is right.
            if let Some(streams) = self.incoming.get_mut(&m.room) {
                match streams.check(stamp) {
                    frame::Order::Duplicate => {
                        self.metrics.drop_one(BusDrop::Duplicate);
                        continue;
                    }
                    frame::Order::After { missed } => self.metrics.gap.increment(missed),
                    frame::Order::Next => {}
                }
            }
            self.metrics.received.increment(1);
            deliver(&m.room, body);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use mio::{Poll, Token};

    /// A loop's `Bus` with no bridge behind it: its inbound queue is fed by
    /// the test.
    fn fake_bus(poll: &Poll) -> (Bus, mpsc::SyncSender<Inbound>) {
        let waker = Arc::new(mio::Waker::new(poll.registry(), Token(1)).unwrap());
        let (publish, _) = tokio::sync::mpsc::channel(1);
        let (queue, inbound) = mpsc::sync_channel(1024);
        let bus = Bus {
            cluster: "t".into(),
            epoch: 1,
            index: 0,
            next_stream: 1,
            outgoing: HashMap::new(),
            incoming: HashMap::new(),
            publish,
            control: Arc::new(Control::new(1)),
            inbound,
            wake_pending: Arc::new(AtomicBool::new(true)),
            own_waker: waker,
            connected: Arc::new(AtomicBool::new(true)),
            metrics: ClusterMetrics::register(),
            scratch: Vec::new(),
        };
        (bus, queue)
    }

    fn rung(poll: &mut Poll) -> bool {
        let mut events = mio::Events::with_capacity(4);
        poll.poll(&mut events, Some(std::time::Duration::ZERO))
            .unwrap();
        !events.is_empty()
    }

    /// A full inbound queue is drained [`DRAIN_BUDGET`] messages a wake-up,
    /// each drain that leaves some ringing the loop again, in order and
    /// each once, until it is empty.
    #[test]
    fn a_full_queue_is_drained_over_several_wakes_in_order() {
        let mut poll = Poll::new().unwrap();
        let (mut bus, queue) = fake_bus(&poll);
        bus.room_opened(b"red");
        let room: Arc<[u8]> = Arc::from(&b"red"[..]);
        const QUEUED: u64 = 1000;
        let mut frame = Vec::new();
        for seq in 1..=QUEUED {
            let stamp = frame::Stamp {
                epoch: 9,
                stream: 1,
                seq,
            };
            frame::encode(stamp, format!("m{seq}").as_bytes(), &mut frame);
            queue
                .try_send(Inbound {
                    room: Arc::clone(&room),
                    frame: Bytes::copy_from_slice(&frame),
                })
                .unwrap();
        }
        let mut got = Vec::new();
        let mut wakes = 0;
        loop {
            let before = got.len();
            bus.drain(|r, body| {
                assert_eq!(r, b"red");
                got.push(String::from_utf8(body.to_vec()).unwrap());
            });
            assert!(got.len() - before <= DRAIN_BUDGET, "over budget");
            if !rung(&mut poll) {
                break;
            }
            wakes += 1;
            assert!(wakes <= QUEUED as usize, "never done");
        }
        let want: Vec<String> = (1..=QUEUED).map(|s| format!("m{s}")).collect();
        assert_eq!(got, want);
        // Every drain but the last used its whole budget and rang again.
        assert_eq!(wakes, QUEUED as usize / DRAIN_BUDGET);
        assert!(!bus.wake_pending.load(Ordering::SeqCst), "cleared");
    }

    #[test]
    fn inbound_queues_share_one_bound() {
        assert_eq!(inbound_capacity(1), INBOUND_QUEUE);
        assert_eq!(inbound_capacity(2), INBOUND_QUEUE / 2);
        assert_eq!(inbound_capacity(64), 4_096);
    }

    #[test]
    fn subjects_are_nats_tokens() {
        assert_eq!(subject("udphub", b""), "udphub.lobby");
        assert_eq!(subject("udphub", b"red"), "udphub.room.red");
        assert_eq!(subject("eu.chat", b"a.b:c-d_e"), "eu.chat.room.a~2Eb:c-d_e");
        // A room called "lobby" is not the lobby.
        assert_ne!(subject("u", b"lobby"), subject("u", b""));
    }
}
