//! The cluster: relays sharing rooms over NATS core pub/sub.
//!
//! A message from a local member is rendered once here, fanned out to the
//! local members, and published once on its room's subject
//! (`NAME.lobby`, `NAME.room.ROOM`); every other node subscribed to that
//! subject fans it out to its own members through the hub's second way in
//! ([`Hub::relay_from_elsewhere`](crate::core::hub::Hub::relay_from_elsewhere)).
//! A node subscribes to a room's subject while the room has members here,
//! and to the lobby always. The connection has `no_echo`, so a node never
//! hears itself: each recipient in the cluster gets each message once.
//!
//! - [`frame`]: the bytes on the bus (a batch of one room's messages, a
//!   stamp for order, dedup and gaps, a tag under the cluster key).
//! - [`keys`]: the cluster keys a node signs and accepts with, rotated by
//!   a reload.
//! - [`inbox`]: a subscribed room's receiving side (check, dedup, bounds).
//! - [`bridge`]: the thread that talks to NATS (async-nats on a small
//!   current-thread runtime); it batches what waits for the same subject
//!   into one NATS message.
//! - [`Bus`] (here): the loop's side of the bus: bounded queues to and
//!   from the bridge, and a mio `Waker` the bridge rings once per burst.
//!   ([`BusDrop`]: why a message to or from the bus was dropped.)
//!
//! Failure stays local: the loop never waits for the bus. A publish that
//! does not fit the queue, or finds NATS down, is dropped and counted
//! (`udphub_cluster_dropped_total{reason}`); local fan-out goes on.

pub mod bridge;
pub mod frame;
pub mod inbox;
pub mod interest;
pub mod keys;

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
/// The most messages the loop hands the bridge at once: what one of its
/// passes published ([`Bus::flush`]), cut at this (a receive batch is 64
/// datagrams). One queue operation, and one wake-up of the bridge, per
/// pass rather than per message.
pub const PUBLISH_PASS: usize = 64;
/// Messages from the bus waiting for the loop; a full queue drops.
pub const INBOUND_QUEUE: usize = 65_536;
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

/// Which rooms the loop wants the bridge subscribed to: an [`Interest`](interest::Interest)
/// (coalesced per room, bounded by the rooms open, nothing lost) and the
/// bridge's wake-up.
#[derive(Debug, Default)]
pub struct Control {
    /// Rooms opened (subscribe) and closed (unsubscribe) here.
    pub rooms: interest::Interest,
    /// Rung when `rooms` changed.
    pub changed: tokio::sync::Notify,
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

/// The inbound queue's size in bytes, shared by the bridge (adds before
/// it sends) and the loop (subtracts what it took).
#[derive(Debug, Default)]
pub struct InboundBytes(AtomicUsize);

impl InboundBytes {
    /// What a message of `len` bytes costs.
    pub fn cost(len: usize) -> usize {
        len + INBOUND_OVERHEAD
    }

    /// Reserves room for a message of `len` bytes; false (nothing
    /// reserved) if the queue would go over [`INBOUND_BYTES`].
    pub fn reserve(&self, len: usize) -> bool {
        let cost = InboundBytes::cost(len);
        let before = self.0.fetch_add(cost, Ordering::AcqRel);
        if before + cost > INBOUND_BYTES {
            self.0.fetch_sub(cost, Ordering::AcqRel);
            return false;
        }
        true
    }

    /// Gives back what a message of `len` bytes reserved.
    pub fn release(&self, len: usize) {
        self.0.fetch_sub(InboundBytes::cost(len), Ordering::AcqRel);
    }

    /// Bytes queued now.
    pub fn queued(&self) -> usize {
        self.0.load(Ordering::Acquire)
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
            "Cluster messages dropped, by reason: queue_full, disconnected, publish_error, oversized (outgoing); inbound_full, duplicate, oversized (incoming messages); malformed, unsigned, bad_mac, stale (incoming NATS messages, refused whole)."
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
    epoch: u64,
    next_stream: u32,
    outgoing: HashMap<Box<[u8]>, Outgoing>,
    /// What this pass of the loop published, handed on by [`Bus::flush`].
    pending: Vec<Publish>,
    publish: tokio::sync::mpsc::Sender<Vec<Publish>>,
    control: Arc<Control>,
    inbound: mpsc::Receiver<Inbound>,
    inbound_bytes: Arc<InboundBytes>,
    wake_pending: Arc<AtomicBool>,
    connected: Arc<AtomicBool>,
    metrics: ClusterMetrics,
    /// The longest rendered message published (`--max-datagram` plus
    /// [`RENDER_ALLOWANCE`]).
    max_body: usize,
    /// The keys the bridge signs and checks with (a reload rotates them).
    keys: keys::Keys,
}

impl Bus {
    /// Starts the bridge thread for `config`; it rings `waker` when
    /// messages from the bus wait. `epoch` is random per process.
    pub fn start(config: &ClusterConfig, waker: Arc<mio::Waker>, epoch: u64) -> Result<Bus, Error> {
        let metrics = ClusterMetrics::register();
        let (publish, publish_rx) = tokio::sync::mpsc::channel(PUBLISH_QUEUE / PUBLISH_PASS);
        let control = Arc::new(Control::default());
        let (inbound_tx, inbound) = mpsc::sync_channel(INBOUND_QUEUE);
        let inbound_bytes = Arc::new(InboundBytes::default());
        let wake_pending = Arc::new(AtomicBool::new(false));
        let connected = Arc::new(AtomicBool::new(false));
        let keys = keys::Keys::new(config.key.clone());
        let max_body = config.max_datagram + RENDER_ALLOWANCE;
        bridge::spawn(bridge::Bridge {
            config: config.clone(),
            publish: publish_rx,
            control: Arc::clone(&control),
            inbound: inbound_tx,
            inbound_bytes: Arc::clone(&inbound_bytes),
            keys: keys.clone(),
            max_body,
            waker,
            wake_pending: Arc::clone(&wake_pending),
            connected: Arc::clone(&connected),
            metrics: metrics.clone(),
        })?;
        let mut bus = Bus {
            cluster: config.name.clone(),
            epoch,
            next_stream: 1,
            outgoing: HashMap::new(),
            pending: Vec::with_capacity(PUBLISH_PASS),
            publish,
            control,
            inbound,
            inbound_bytes,
            wake_pending,
            connected,
            metrics,
            max_body,
            keys,
        };
        // The lobby spans the cluster: always subscribed.
        bus.room_opened(b"");
        Ok(bus)
    }

    /// The keys the bridge signs and checks with: a reload rotates them
    /// ([`keys::Keys::rotate`]).
    pub fn keys(&self) -> keys::Keys {
        self.keys.clone()
    }

    /// A room got its first member here: subscribe to it.
    pub fn room_opened(&mut self, room: &[u8]) {
        self.control.rooms.tell(room, true);
        self.control.changed.notify_one();
    }

    /// Its last member here left: unsubscribe (the bridge forgets its
    /// streams with the subscription).
    pub fn room_closed(&mut self, room: &[u8]) {
        self.outgoing.remove(room);
        self.control.rooms.tell(room, false);
        self.control.changed.notify_one();
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
        if let Err(e) = self.publish.try_send(pass) {
            let lost = match e {
                tokio::sync::mpsc::error::TrySendError::Full(p)
                | tokio::sync::mpsc::error::TrySendError::Closed(p) => p.len(),
            };
            // The receivers will see the gap in these streams.
            self.metrics.drop_n(BusDrop::QueueFull, lost as u64);
        }
    }

    /// Takes the messages waiting from the bus (checked, deduplicated
    /// and ordered by the bridge) and hands each to `deliver(room, body)`.
    pub fn drain(&mut self, mut deliver: impl FnMut(&[u8], &[u8])) {
        // Cleared before draining: a message queued after this will ring
        // again, so none waits for the next datagram.
        self.wake_pending.store(false, Ordering::SeqCst);
        while let Ok(m) = self.inbound.try_recv() {
            self.inbound_bytes.release(m.body.len());
            // A room closed here a moment ago has no members: the message
            // reaches nobody, which is right.
            self.metrics.received.increment(1);
            deliver(&m.room, &m.body);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
