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
//! - [`frame`]: the bytes on the bus (a stamp for order, dedup and gaps).
//! - [`bridge`]: the thread that talks to NATS (async-nats on a small
//!   current-thread runtime).
//! - [`tls`]: the bridge's TLS client (`tls://`, `--cluster-ca`, mutual
//!   TLS), which says why a handshake failed.
//! - [`Bus`] (here): the loop's side of the bus: bounded queues to and
//!   from the bridge, and a mio `Waker` the bridge rings once per burst.
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
/// Messages from the bus waiting for the loop; a full queue drops.
pub const INBOUND_QUEUE: usize = 65_536;

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

/// The loop's side of the cluster: what it publishes, what it receives,
/// and which rooms it wants.
pub struct Bus {
    cluster: String,
    epoch: u64,
    next_stream: u32,
    outgoing: HashMap<Box<[u8]>, Outgoing>,
    incoming: HashMap<Arc<[u8]>, frame::Streams>,
    publish: tokio::sync::mpsc::Sender<Publish>,
    control: Arc<Control>,
    inbound: mpsc::Receiver<Inbound>,
    wake_pending: Arc<AtomicBool>,
    connected: Arc<AtomicBool>,
    metrics: ClusterMetrics,
    scratch: Vec<u8>,
}

impl Bus {
    /// Starts the bridge thread for `config`; it rings `waker` when
    /// messages from the bus wait. `epoch` is random per process.
    pub fn start(config: &ClusterConfig, waker: Arc<mio::Waker>, epoch: u64) -> Result<Bus, Error> {
        let metrics = ClusterMetrics::register();
        let (publish, publish_rx) = tokio::sync::mpsc::channel(PUBLISH_QUEUE);
        let control = Arc::new(Control::default());
        let (inbound_tx, inbound) = mpsc::sync_channel(INBOUND_QUEUE);
        let wake_pending = Arc::new(AtomicBool::new(false));
        let connected = Arc::new(AtomicBool::new(false));
        bridge::spawn(bridge::Bridge {
            config: config.clone(),
            publish: publish_rx,
            control: Arc::clone(&control),
            inbound: inbound_tx,
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
            incoming: HashMap::new(),
            publish,
            control,
            inbound,
            wake_pending,
            connected,
            metrics,
            scratch: Vec::new(),
        };
        // The lobby spans the cluster: always subscribed.
        bus.room_opened(b"");
        Ok(bus)
    }

    /// A room got its first member here: subscribe to it.
    pub fn room_opened(&mut self, room: &[u8]) {
        let room: Arc<[u8]> = room.into();
        self.incoming
            .insert(Arc::clone(&room), frame::Streams::default());
        self.control.rooms.tell(&room, true);
        self.control.changed.notify_one();
    }

    /// Its last member here left: unsubscribe, forget its streams.
    pub fn room_closed(&mut self, room: &[u8]) {
        self.incoming.remove(room);
        self.outgoing.remove(room);
        self.control.rooms.tell(room, false);
        self.control.changed.notify_one();
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

    /// Takes the messages waiting from the bus and hands each one that is
    /// new, in order, to `deliver(room, body)`; counts duplicates, gaps and
    /// strangers.
    pub fn drain(&mut self, mut deliver: impl FnMut(&[u8], &[u8])) {
        // Cleared before draining: a message queued after this will ring
        // again, so none waits for the next datagram.
        self.wake_pending.store(false, Ordering::SeqCst);
        while let Ok(m) = self.inbound.try_recv() {
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_are_nats_tokens() {
        assert_eq!(subject("udphub", b""), "udphub.lobby");
        assert_eq!(subject("udphub", b"red"), "udphub.room.red");
        assert_eq!(subject("eu.chat", b"a.b:c-d_e"), "eu.chat.room.a~2Eb:c-d_e");
        // A room called "lobby" is not the lobby.
        assert_ne!(subject("u", b"lobby"), subject("u", b""));
    }
}
