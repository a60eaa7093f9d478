//! The counters the hub and the runtime add to between two metric flushes.
//!
//! Plain `u64`s, no atomics: one loop owns one [`Counts`], and the runtime
//! flushes it to the metrics facade once per batch (`runtime::metrics`).
//! Two invariants make "nothing is lost silently" checkable from a scrape:
//!
//! - every datagram read is a heartbeat, a quit, a message, or a drop with a
//!   [`DropReason`];
//! - every delivery a fan-out attempts is delivered, or dropped with a
//!   [`DeliveryDrop`] reason.

use crate::core::admission::DropReason;

labelled_enum! {
    /// Why a delivery was not handed to the kernel
    /// (`udphub_delivery_dropped_total{reason}`).
    pub enum DeliveryDrop {
        /// The socket's send buffer (or the device queue) was full:
        /// `EAGAIN`/`ENOBUFS`. The rest of that message is dropped.
        BufferFull => "buffer_full",
        /// Sending to that destination failed otherwise.
        SendError => "send_error",
        /// With `--threads`: another loop's queue was full, so that loop's
        /// members missed the message (counted once per loop, not per
        /// member: the sender's loop cannot know how many there are).
        ShardQueueFull => "shard_queue_full",
    }
}

labelled_enum! {
    /// Why a `^join^` was refused (`udphub_room_join_refused_total{reason}`,
    /// and the `^denied^REASON` reply).
    pub enum Refusal {
        /// No token where one is needed, or one that does not check out.
        Token => "token",
        /// `--max-rooms` or `--max-room-clients` reached.
        Full => "full",
        /// Not a valid room name.
        Name => "name",
    }
}

/// Counts gathered between two flushes.
#[derive(Debug, Default, Clone)]
pub struct Counts {
    /// Heartbeats and empty keepalives.
    pub heartbeats: u64,
    /// `quit`s (also from senders that were not clients).
    pub quits: u64,
    /// Messages fanned out.
    pub messages: u64,
    /// `^join^` requests, accepted or refused.
    pub joins: u64,
    /// Joins accepted.
    pub room_joins: u64,
    /// Joins refused, indexed by [`Refusal::index`].
    pub room_refused: [u64; Refusal::COUNT],
    /// Datagram drops, indexed by [`DropReason::index`].
    pub dropped: [u64; DropReason::COUNT],
    /// Deliveries the fan-outs attempted.
    pub recipients: u64,
    /// Deliveries handed to the kernel.
    pub delivered: u64,
    /// Deliveries dropped, indexed by [`DeliveryDrop::index`].
    pub delivery_dropped: [u64; DeliveryDrop::COUNT],
    /// Clients that joined.
    pub joined: u64,
    /// Clients expired by the wheel.
    pub expired: u64,
    /// Clients that sent `quit`.
    pub left: u64,
    /// Datagrams the kernel dropped before we read them (SO_RXQ_OVFL delta).
    pub kernel_rx_dropped: u64,
    /// `recvmmsg` calls that failed with something other than `WouldBlock`.
    pub recv_errors: u64,
    /// Datagrams to a local address the loop's table of them had no room
    /// for (on a wildcard address): their replies leave from whatever
    /// address the route picks.
    pub local_addr_overflow: u64,
    /// Fan-out durations (seconds) since the last flush.
    pub fanout_seconds: Vec<f64>,
    /// recvmmsg batch sizes since the last flush.
    pub batch_sizes: Vec<f64>,
    /// Loop iteration durations (seconds) since the last flush.
    pub loop_seconds: Vec<f64>,
}

impl Counts {
    /// Counts one dropped datagram.
    pub fn drop(&mut self, reason: DropReason) {
        self.dropped[reason.index()] += 1;
    }

    /// Datagrams accounted for: heartbeats + quits + messages + joins + drops.
    pub fn received(&self) -> u64 {
        self.heartbeats + self.quits + self.messages + self.joins + self.dropped.iter().sum::<u64>()
    }
}
