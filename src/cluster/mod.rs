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
//! - [`frame`]: the bytes on the bus (a batch of one room's messages, a
//!   stamp for order, dedup and gaps, a tag under the cluster key).
//! - [`keys`]: the cluster keys a node signs and accepts with, rotated by
//!   a reload.
//! - [`inbox`]: a subscribed room's receiving side (check, dedup, bounds).
//! - [`bridge`]: the thread that talks to NATS (async-nats on a small
//!   current-thread runtime); it batches what waits for the same subject
//!   into one NATS message.
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
pub mod handover;
pub mod inbox;
pub mod interest;
pub mod keys;
pub mod tls;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;

use bytes::Bytes;
use metrics::Counter;

use crate::error::Error;

/// `--cluster` and friends, resolved (the configuration owns them).
pub use crate::config::ClusterConfig;

/// Messages waiting for the bridge to publish; a full queue drops.
pub const PUBLISH_QUEUE: usize = 65_536;
/// Bytes of messages waiting for the bridge to publish, every loop's
/// together (bodies plus [`INBOUND_OVERHEAD`] each), until the bridge has
/// handed them to NATS; beyond it a loop's pass is dropped (`queue_full`).
/// A NATS server that reads slowly (or on purpose not at all) must cost a
/// relay a bounded, small amount of memory: 65,536 messages of 1.5 kB
/// would be 100 MB, and of `--max-datagram 65507` 4 GB.
pub const PUBLISH_BYTES: usize = 16 << 20;
/// The most messages the loop hands the bridge at once: what one of its
/// passes published ([`Bus::flush`]), cut at this (a receive batch is 64
/// datagrams). One queue operation, and one wake-up of the bridge, per
/// pass rather than per message.
pub const PUBLISH_PASS: usize = 64;
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

/// Bytes of messages from the bus waiting for the loop (bodies plus
/// [`INBOUND_OVERHEAD`] each); beyond it the bridge drops (`inbound_full`).
/// 65,536 messages of 1.5 kB would be 100 MB: a receiver that falls behind
/// should cost a bounded, small amount of memory, not that.
pub const INBOUND_BYTES: usize = 16 << 20;
/// What a queued message costs besides its body (the queue slot, the
/// room and buffer handles), for [`INBOUND_BYTES`].
pub const INBOUND_OVERHEAD: usize = 64;
/// How much longer than `--max-datagram` a rendered message may be: what
/// the `--format` template adds (`. from [IPv6]:port` is 50 bytes). A
/// longer one is neither published nor delivered (`oversized`).
pub const RENDER_ALLOWANCE: usize = 512;
/// The longest body a batch can carry: its length is a u16 on the bus.
pub const MAX_BODY: usize = u16::MAX as usize;

/// The longest rendered message published and delivered with
/// `--max-datagram` `max_datagram`: that plus [`RENDER_ALLOWANCE`], but
/// never more than a batch's length field holds ([`MAX_BODY`]); a longer
/// one would go out cut short, not whole.
pub fn max_body(max_datagram: usize) -> usize {
    max_datagram.saturating_add(RENDER_ALLOWANCE).min(MAX_BODY)
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
    /// The bytes in `queue` (bounded too).
    pub bytes: Arc<InboundBytes>,
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
        let len = message.body.len();
        if !self.bytes.reserve(len) {
            metrics.drop_one(BusDrop::InboundFull);
            return true;
        }
        match self.queue.try_send(message) {
            Ok(()) => {}
            Err(mpsc::TrySendError::Full(_)) => {
                self.bytes.release(len);
                metrics.drop_one(BusDrop::InboundFull);
                return true;
            }
            Err(mpsc::TrySendError::Disconnected(_)) => {
                self.bytes.release(len);
                return false;
            }
        }
        if !self.wake_pending.swap(true, Ordering::SeqCst) {
            if let Err(e) = self.waker.wake() {
                tracing::warn!(event = "wake_failed", error = %e, "cluster: cannot wake a loop: {e}");
            }
        }
        true
    }
}

/// A message for the bridge to publish (it batches and signs).
#[derive(Debug)]
pub struct Publish {
    /// Where.
    pub subject: async_nats::Subject,
    /// Its place in its stream.
    pub stamp: frame::Stamp,
    /// The rendered message.
    pub body: Bytes,
}

/// A message from the bus for the loop: checked, new, in order.
#[derive(Debug)]
pub struct Inbound {
    /// Its room.
    pub room: Arc<[u8]>,
    /// The rendered message (a slice of the NATS message it came in).
    pub body: Bytes,
}

/// A loop's inbound queue's size in bytes, shared by the bridge (adds
/// before it sends) and the loop (subtracts what it took).
#[derive(Debug)]
pub struct InboundBytes {
    queued: AtomicUsize,
    limit: usize,
}

impl Default for InboundBytes {
    /// The whole [`INBOUND_BYTES`] (one loop).
    fn default() -> InboundBytes {
        InboundBytes::with_limit(INBOUND_BYTES)
    }
}

impl InboundBytes {
    /// A queue of at most `limit` bytes.
    pub fn with_limit(limit: usize) -> InboundBytes {
        InboundBytes {
            queued: AtomicUsize::new(0),
            limit,
        }
    }

    /// Each loop's byte budget with `loops` loops: its share of
    /// [`INBOUND_BYTES`], never under 1 MiB.
    pub fn share(loops: usize) -> usize {
        (INBOUND_BYTES / loops.max(1)).max(1 << 20)
    }

    /// What a message of `len` bytes costs.
    pub fn cost(len: usize) -> usize {
        len + INBOUND_OVERHEAD
    }

    /// Reserves room for a message of `len` bytes; false (nothing
    /// reserved) if the queue would go over its limit.
    pub fn reserve(&self, len: usize) -> bool {
        self.reserve_cost(InboundBytes::cost(len))
    }

    /// Reserves `cost` bytes (several messages' [`cost`](Self::cost));
    /// false (nothing reserved) if the queue would go over its limit.
    pub fn reserve_cost(&self, cost: usize) -> bool {
        let before = self.queued.fetch_add(cost, Ordering::AcqRel);
        if before + cost > self.limit {
            self.queued.fetch_sub(cost, Ordering::AcqRel);
            return false;
        }
        true
    }

    /// Gives back what a message of `len` bytes reserved.
    pub fn release(&self, len: usize) {
        self.release_cost(InboundBytes::cost(len));
    }

    /// Gives back `cost` bytes reserved by [`reserve_cost`](Self::reserve_cost).
    pub fn release_cost(&self, cost: usize) {
        self.queued.fetch_sub(cost, Ordering::AcqRel);
    }

    /// What the messages of a pass cost, together.
    pub fn pass_cost(pass: &[Publish]) -> usize {
        pass.iter().map(|p| InboundBytes::cost(p.body.len())).sum()
    }

    /// Bytes queued now.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }
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
        /// The queue from the bridge to the loop was full, in messages or
        /// bytes (the loop slow).
        InboundFull => "inbound_full",
        /// Not a batch of this frame version (counted per NATS message).
        Malformed => "malformed",
        /// Seen already (the stamp said so).
        Duplicate => "duplicate",
        /// A rendered message longer than `--max-datagram` plus
        /// [`RENDER_ALLOWANCE`] (outgoing or incoming).
        Oversized => "oversized",
        /// No tag, at a node with a cluster key (per NATS message).
        Unsigned => "unsigned",
        /// A tag that no accepted cluster key made for this room and these
        /// bytes: forged, altered, replayed into another room, or another
        /// cluster's key (per NATS message).
        BadMac => "bad_mac",
        /// Tagged correctly but sent more than `frame::FRESHNESS` from
        /// this node's clock: an old capture replayed, or clocks apart
        /// (per NATS message).
        Stale => "stale",
        /// The NATS client dropped it before the bridge saw it: the room's
        /// subscription already held `bridge::SUBSCRIPTION_CAPACITY` NATS
        /// messages (a flood, or the bridge too slow). Per NATS message,
        /// as the client reports them (its reports can be lost in a burst).
        SlowConsumer => "slow_consumer",
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
    /// NATS messages published (each a batch of `published`).
    pub nats_out: Counter,
    /// NATS messages received on the room subjects.
    pub nats_in: Counter,
    /// Bytes of the NATS messages published.
    pub bytes_out: Counter,
    /// Bytes of the NATS messages received.
    pub bytes_in: Counter,
    /// Stream states started again (seq jump, eviction).
    pub stream_resets: Counter,
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
            "Cluster messages dropped, by reason: queue_full, disconnected, publish_error, oversized (outgoing); inbound_full, duplicate, oversized (incoming messages); malformed, unsigned, bad_mac, stale (incoming NATS messages, refused whole); slow_consumer (incoming NATS messages the client dropped, its subscription full)."
        );
        describe_counter!(
            "udphub_cluster_nats_messages_total",
            Unit::Count,
            "NATS messages, by direction (out: published, in: received on room subjects); each carries a batch of one room's messages."
        );
        describe_counter!(
            "udphub_cluster_bytes_total",
            Unit::Bytes,
            "Payload bytes of the NATS messages, by direction (out, in)."
        );
        describe_counter!(
            "udphub_cluster_stream_resets_total",
            Unit::Count,
            "Stream states started again at this receiver (a sequence jump beyond the window, or evicted by newer streams in a full room)."
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
            nats_out: metrics::counter!("udphub_cluster_nats_messages_total", "direction" => "out"),
            nats_in: metrics::counter!("udphub_cluster_nats_messages_total", "direction" => "in"),
            bytes_out: metrics::counter!("udphub_cluster_bytes_total", "direction" => "out"),
            bytes_in: metrics::counter!("udphub_cluster_bytes_total", "direction" => "in"),
            stream_resets: metrics::counter!("udphub_cluster_stream_resets_total"),
        }
    }

    /// Counts one drop.
    pub fn drop_one(&self, reason: BusDrop) {
        self.drop_n(reason, 1);
    }

    /// Counts `n` drops.
    pub fn drop_n(&self, reason: BusDrop, n: u64) {
        if n > 0 {
            self.dropped[reason.index()].increment(n);
        }
    }
}

/// One room's outgoing stream here.
struct Outgoing {
    subject: async_nats::Subject,
    stream: u32,
    seq: u64,
}

/// The loop's side of the cluster: what it publishes, what it receives,
/// and which rooms it wants.
pub struct Bus {
    cluster: String,
    /// This loop's epoch: the process's random one plus the loop's index,
    /// so no two loops of a process stamp the same stream.
    epoch: u64,
    /// This loop's index: which of [`Control::rooms`] it tells.
    index: usize,
    next_stream: u32,
    outgoing: HashMap<Box<[u8]>, Outgoing>,
    /// What this pass of the loop published, handed on by [`Bus::flush`].
    pending: Vec<Publish>,
    publish: tokio::sync::mpsc::Sender<Vec<Publish>>,
    /// The bytes waiting in `publish` or in the bridge (every loop's).
    publish_bytes: Arc<InboundBytes>,
    control: Arc<Control>,
    inbound: mpsc::Receiver<Inbound>,
    inbound_bytes: Arc<InboundBytes>,
    wake_pending: Arc<AtomicBool>,
    /// Rings this loop (a drain that ran out of budget wakes it again).
    own_waker: Arc<mio::Waker>,
    connected: Arc<AtomicBool>,
    metrics: ClusterMetrics,
    /// The longest rendered message published (`--max-datagram` plus
    /// [`RENDER_ALLOWANCE`]).
    max_body: usize,
    /// The keys the bridge signs and checks with (a reload rotates them).
    keys: keys::Keys,
    /// The bridge's side of a hand-over.
    handover: handover::HandoverPort,
}

impl Bus {
    /// Starts the one bridge thread of the process for `config`, and
    /// returns one `Bus` per loop, in the order of `wakers` (loop `i`'s
    /// waker, rung when messages from the bus wait for it). `epoch` is
    /// random per process. A process taking over passes the bridge it
    /// started early and the positions the old process handed over
    /// ([`handover`]).
    pub fn start(
        config: &ClusterConfig,
        wakers: &[Arc<mio::Waker>],
        epoch: u64,
        resume: Option<(handover::Early, &[crate::core::snapshot::RoomStreams])>,
    ) -> Result<Vec<Bus>, Error> {
        let (early, positions) = match resume {
            Some((early, positions)) => (Some(early), positions),
            None => (None, &[][..]),
        };
        let metrics = match &early {
            Some(e) => e.metrics.clone(),
            None => ClusterMetrics::register(),
        };
        let (requests, requests_rx) = tokio::sync::mpsc::channel(4);
        let thaw = Arc::new(handover::Thaw::default());
        let port = handover::HandoverPort {
            requests,
            thaw: Arc::clone(&thaw),
        };
        let (publish, publish_rx) = tokio::sync::mpsc::channel(PUBLISH_QUEUE / PUBLISH_PASS);
        let publish_bytes = Arc::new(InboundBytes::with_limit(PUBLISH_BYTES));
        let control = Arc::new(Control::new(wakers.len()));
        let connected = match &early {
            Some(e) => Arc::clone(&e.connected),
            None => Arc::new(AtomicBool::new(false)),
        };
        let keys = keys::Keys::new(config.key.clone());
        let max_body = max_body(config.max_datagram);
        let capacity = inbound_capacity(wakers.len());
        let byte_share = InboundBytes::share(wakers.len());
        let mut inboxes = Vec::with_capacity(wakers.len());
        let mut buses = Vec::with_capacity(wakers.len());
        for (index, waker) in wakers.iter().enumerate() {
            let (queue, inbound) = mpsc::sync_channel(capacity);
            let bytes = Arc::new(InboundBytes::with_limit(byte_share));
            let wake_pending = Arc::new(AtomicBool::new(false));
            inboxes.push(LoopInbox {
                queue,
                bytes: Arc::clone(&bytes),
                waker: Arc::clone(waker),
                wake_pending: Arc::clone(&wake_pending),
            });
            buses.push(Bus {
                cluster: config.name.clone(),
                epoch: epoch.wrapping_add(index as u64),
                index,
                next_stream: 1,
                outgoing: HashMap::new(),
                pending: Vec::with_capacity(PUBLISH_PASS),
                publish: publish.clone(),
                publish_bytes: Arc::clone(&publish_bytes),
                control: Arc::clone(&control),
                inbound,
                inbound_bytes: bytes,
                wake_pending,
                own_waker: Arc::clone(waker),
                connected: Arc::clone(&connected),
                metrics: metrics.clone(),
                max_body,
                keys: keys.clone(),
                handover: port.clone(),
            });
        }
        let bridge = bridge::Bridge {
            config: config.clone(),
            publish: publish_rx,
            publish_bytes,
            control,
            loops: inboxes.into(),
            keys,
            max_body,
            connected,
            metrics,
            requests: requests_rx,
            resumed: positions
                .iter()
                .map(|r| (r.room.clone(), r.streams.clone()))
                .collect(),
            thaw,
        };
        match early {
            Some(early) => early.start(bridge)?,
            None => bridge::spawn(bridge)?,
        }
        for bus in &mut buses {
            // The lobby spans the cluster and every loop: always subscribed.
            bus.room_opened(b"");
        }
        Ok(buses)
    }

    /// The keys the bridge signs and checks with: a reload rotates them
    /// ([`keys::Keys::rotate`]).
    pub fn keys(&self) -> keys::Keys {
        self.keys.clone()
    }

    /// The bridge's side of a hand-over ([`handover`]).
    pub fn handover(&self) -> handover::HandoverPort {
        self.handover.clone()
    }

    /// Where this loop's own streams are: per room, the last seq it
    /// published (a hand-over passes them on, [`handover`]).
    pub fn published_positions(&self) -> Vec<crate::core::snapshot::RoomStreams> {
        self.outgoing
            .iter()
            .map(|(room, out)| crate::core::snapshot::RoomStreams {
                room: room.clone(),
                streams: vec![crate::core::snapshot::StreamPosition {
                    epoch: self.epoch,
                    stream: out.stream,
                    last: out.seq,
                    // This process's own word, not a stranger's frame.
                    verified: true,
                }],
            })
            .collect()
    }

    /// Whether the bus queued messages this loop has not fanned out yet.
    pub fn has_inbound(&self) -> bool {
        self.inbound_bytes.queued() > 0
    }

    /// A room got its first member on this loop: subscribe to it (if no
    /// other loop had).
    pub fn room_opened(&mut self, room: &[u8]) {
        self.tell(room, true);
    }

    /// Its last member on this loop left: unsubscribe if no other loop has
    /// it open (the bridge forgets its streams with the subscription).
    pub fn room_closed(&mut self, room: &[u8]) {
        self.outgoing.remove(room);
        self.tell(room, false);
    }

    /// Tells the bridge this loop's interest in `room` changed.
    fn tell(&self, room: &[u8], open: bool) {
        if let Some(rooms) = self.control.rooms.get(self.index) {
            rooms.tell(room, open);
            self.control.changed.notify_one();
        }
    }

    /// Publishes a message a local member sent to `room`, already rendered
    /// (`body`); never waits: a full queue or a disconnected bus drops it,
    /// counted. It goes to the bridge with the rest of the loop's pass, at
    /// [`flush`](Self::flush).
    pub fn publish(&mut self, room: &[u8], body: &[u8]) {
        if !self.connected.load(Ordering::Relaxed) {
            self.metrics.drop_one(BusDrop::Disconnected);
            return;
        }
        if body.len() > self.max_body {
            // Every receiver would drop it: say so here, once.
            self.metrics.drop_one(BusDrop::Oversized);
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
        self.pending.push(Publish {
            subject: out.subject.clone(),
            stamp,
            body: Bytes::copy_from_slice(body),
        });
        if self.pending.len() >= PUBLISH_PASS {
            self.flush();
        }
    }

    /// Hands the bridge what was published since the last flush: the loop
    /// calls it at the end of each pass, so nothing waits longer than the
    /// pass it was published in.
    pub fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let pass = std::mem::replace(&mut self.pending, Vec::with_capacity(PUBLISH_PASS));
        let cost = InboundBytes::pass_cost(&pass);
        if !self.publish_bytes.reserve_cost(cost) {
            // NATS is slow: the receivers will see the gap in these streams.
            self.metrics.drop_n(BusDrop::QueueFull, pass.len() as u64);
            return;
        }
        if let Err(e) = self.publish.try_send(pass) {
            self.publish_bytes.release_cost(cost);
            let lost = match e {
                tokio::sync::mpsc::error::TrySendError::Full(p)
                | tokio::sync::mpsc::error::TrySendError::Closed(p) => p.len(),
            };
            // The receivers will see the gap in these streams.
            self.metrics.drop_n(BusDrop::QueueFull, lost as u64);
        }
    }

    /// Takes up to [`DRAIN_BUDGET`] messages waiting from the bus
    /// (checked, deduplicated and ordered by the bridge) and hands each to
    /// `deliver(room, body)`. If the budget ran out, wakes this loop again,
    /// so the rest is drained on its next pass, after its own socket and
    /// timers have had a turn.
    pub fn drain(&mut self, deliver: impl FnMut(&[u8], &[u8])) {
        if self.drain_up_to(DRAIN_BUDGET, deliver) {
            if let Err(e) = self.own_waker.wake() {
                tracing::error!(event = "wake_failed", loop_index = self.index, error = %e, "cluster: cannot wake loop {}: {e}", self.index);
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
            self.inbound_bytes.release(m.body.len());
            // A room closed here a moment ago has no members: the message
            // reaches nobody, which is right.
            self.metrics.received.increment(1);
            deliver(&m.room, &m.body);
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
            pending: Vec::new(),
            publish,
            publish_bytes: Arc::new(InboundBytes::with_limit(PUBLISH_BYTES)),
            control: Arc::new(Control::new(1)),
            inbound,
            inbound_bytes: Arc::new(InboundBytes::default()),
            wake_pending: Arc::new(AtomicBool::new(true)),
            own_waker: waker,
            connected: Arc::new(AtomicBool::new(true)),
            metrics: ClusterMetrics::register(),
            max_body: 2048,
            keys: keys::Keys::new(None),
            handover: handover::HandoverPort {
                requests: tokio::sync::mpsc::channel(1).0,
                thaw: Arc::default(),
            },
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
        for seq in 1..=QUEUED {
            let body = Bytes::from(format!("m{seq}"));
            assert!(bus.inbound_bytes.reserve(body.len()));
            queue
                .try_send(Inbound {
                    room: Arc::clone(&room),
                    body,
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
        assert_eq!(bus.inbound_bytes.queued(), 0, "every byte given back");
    }

    /// With the largest `--max-datagram`, a rendered message can pass the
    /// u16 a batch gives its length: it is dropped as oversized, never
    /// published cut short.
    #[test]
    fn a_body_over_what_a_batch_holds_is_oversized_not_cut() {
        assert_eq!(max_body(1472), 1472 + RENDER_ALLOWANCE);
        assert_eq!(max_body(crate::config::MAX_UDP_PAYLOAD), MAX_BODY);
        let poll = Poll::new().unwrap();
        let (mut bus, _queue) = fake_bus(&poll);
        bus.max_body = max_body(crate::config::MAX_UDP_PAYLOAD);
        bus.publish(b"red", &vec![b'x'; MAX_BODY + 1]);
        assert!(bus.pending.is_empty(), "not published");
        bus.publish(b"red", &vec![b'x'; MAX_BODY]);
        let pass = std::mem::take(&mut bus.pending);
        let packed = bridge::pack(pass, None, 0);
        let batch = frame::parse(&packed[0].msg).unwrap();
        assert_eq!(batch.bodies[0].len(), MAX_BODY, "whole");
    }

    /// A NATS server that does not read: what waits for the bridge stays
    /// within [`PUBLISH_BYTES`], whatever the messages' count; the rest is
    /// dropped as `queue_full`, and what the bridge publishes is given back.
    #[test]
    fn the_publish_queue_is_bounded_in_bytes() {
        let poll = Poll::new().unwrap();
        let (mut bus, _queue) = fake_bus(&poll);
        let (publish, mut bridge) = tokio::sync::mpsc::channel(PUBLISH_QUEUE / PUBLISH_PASS);
        bus.publish = publish;
        bus.max_body = MAX_BODY;
        let body = vec![b'x'; 60_000];
        for _ in 0..PUBLISH_QUEUE {
            bus.publish(b"red", &body);
            bus.flush();
        }
        let queued = bus.publish_bytes.queued();
        assert!(queued <= PUBLISH_BYTES, "{queued} bytes held");
        let mut held = 0;
        while let Ok(pass) = bridge.try_recv() {
            // What the bridge does once it has published a pass.
            bus.publish_bytes
                .release_cost(InboundBytes::pass_cost(&pass));
            held += pass.len();
        }
        assert_eq!(held, PUBLISH_BYTES / InboundBytes::cost(body.len()));
        assert_eq!(bus.publish_bytes.queued(), 0, "every byte given back");
    }

    #[test]
    fn inbound_queues_share_one_bound() {
        assert_eq!(inbound_capacity(1), INBOUND_QUEUE);
        assert_eq!(inbound_capacity(2), INBOUND_QUEUE / 2);
        assert_eq!(inbound_capacity(64), 4_096);
        assert_eq!(InboundBytes::share(1), INBOUND_BYTES);
        assert_eq!(InboundBytes::share(2), INBOUND_BYTES / 2);
        assert_eq!(InboundBytes::share(64), 1 << 20);
    }

    #[test]
    fn the_inbound_queue_is_bounded_in_bytes() {
        let q = InboundBytes::default();
        let big = INBOUND_BYTES / 4 - INBOUND_OVERHEAD;
        for _ in 0..4 {
            assert!(q.reserve(big));
        }
        assert!(!q.reserve(0), "full: not even an empty message");
        assert_eq!(q.queued(), INBOUND_BYTES, "a refusal reserves nothing");
        q.release(big);
        assert!(q.reserve(big - 1));
        assert!(!q.reserve(1));
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
