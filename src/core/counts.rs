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
use crate::core::token::TokenError;

labelled_enum! {
    /// Why a delivery was not handed to the kernel
    /// (`udphub_delivery_dropped_total{reason}`).
    pub enum DeliveryDrop {
        /// The socket's send buffer (or the device queue) was full:
        /// `EAGAIN`/`ENOBUFS`, where nothing can wait for it (the shutdown
        /// `bye` after its patience). Fan-outs and replies park and wait
        /// instead, see `BacklogFull`.
        BufferFull => "buffer_full",
        /// Sending to that destination failed otherwise.
        SendError => "send_error",
        /// With `--threads`: another loop's queue was full, so that loop's
        /// members missed the message (counted once per loop, not per
        /// member: the sender's loop cannot know how many there are).
        ShardQueueFull => "shard_queue_full",
        /// A fan-out had to wait (a full send buffer, or a slice of a big
        /// room's) and the loop's backlog (`--send-backlog` bytes) had no
        /// room for it: the deliveries it had left are dropped. Likewise a
        /// reply that had to wait for the send buffer when the replies'
        /// share of the backlog was full.
        BacklogFull => "backlog_full",
        /// Still parked in the backlog (a fan-out's deliveries, or a
        /// reply) when the server stopped: dropped so that the `bye` goes
        /// out at once.
        Shutdown => "shutdown",
    }
}

labelled_enum! {
    /// Why a `^join^` was refused (`udphub_room_join_refused_total{reason}`,
    /// and the `^denied^REASON` reply).
    pub enum Refusal {
        /// No token where one is needed, or one that does not check out
        /// (which of the two, and why, is in
        /// `udphub_room_token_refused_total{reason}`: [`TokenError`]).
        Token => "token",
        /// `--max-rooms` or `--max-room-clients` reached.
        Full => "full",
        /// Not a valid room name.
        Name => "name",
    }
}

/// Counts gathered between two flushes. Each field names what it counts;
/// the metric it is added to is in its doc (the metric names are the
/// contract, see docs/OPERATIONS.md).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Counts {
    /// Heartbeats and empty keepalives
    /// (`udphub_datagrams_received_total{kind="heartbeat"}`).
    pub heartbeats: u64,
    /// `quit`s, also from senders that were not clients
    /// (`{kind="quit"}`).
    pub quits: u64,
    /// Messages fanned out (`{kind="message"}`).
    pub messages: u64,
    /// `^join^` requests that passed admission, accepted or refused
    /// (`{kind="join"}`).
    pub join_requests: u64,
    /// Join requests accepted: answered `^room^`
    /// (`udphub_room_joins_total`).
    pub joins_accepted: u64,
    /// Join requests refused, indexed by [`Refusal::index`]
    /// (`udphub_room_join_refused_total{reason}`).
    pub joins_refused: [u64; Refusal::COUNT],
    /// Joins refused for their token, indexed by [`TokenError::index`]
    /// (`udphub_room_token_refused_total{reason}`; their sum is
    /// `joins_refused[Refusal::Token]`).
    pub token_refused: [u64; TokenError::COUNT],
    /// Joins that carried a token to a relay without a room secret: not
    /// looked at, the room is open (`udphub_room_tokens_ignored_total`).
    pub tokens_ignored: u64,
    /// Datagram drops, indexed by [`DropReason::index`]
    /// (`udphub_dropped_total{reason}`).
    pub dropped: [u64; DropReason::COUNT],
    /// Deliveries the fan-outs attempted.
    pub recipients: u64,
    /// Deliveries handed to the kernel.
    pub delivered: u64,
    /// Deliveries dropped, indexed by [`DeliveryDrop::index`].
    pub delivery_dropped: [u64; DeliveryDrop::COUNT],
    /// Clients registered in the table, by any datagram that registers
    /// one (a heartbeat, a message, a join) (`udphub_clients_joined_total`).
    pub clients_joined: u64,
    /// Clients expired by the wheel (`udphub_clients_expired_total`).
    pub clients_expired: u64,
    /// Clients that sent `quit` (`udphub_clients_left_total`).
    pub clients_left: u64,
    /// Datagrams the kernel dropped before we read them (SO_RXQ_OVFL delta).
    pub kernel_rx_dropped: u64,
    /// `recvmmsg` calls that failed with something other than `WouldBlock`.
    pub recv_errors: u64,
    /// Datagrams to a local address the loop's table of them had no room
    /// for (on a wildcard address): their replies leave from whatever
    /// address the route picks.
    pub local_addr_overflow: u64,
    /// Fan-outs parked to finish on later passes: sliced, behind their
    /// room's parked one, or stopped by a full send buffer
    /// (`udphub_fanouts_parked_total`).
    pub fanouts_parked: u64,
    /// Times the send buffer was full mid fan-out or mid reply batch and
    /// the loop waited for it to be writable
    /// (`udphub_send_buffer_full_total`).
    pub send_buffer_full: u64,
    /// Replies (and echoes) parked to go out when the send buffer has
    /// room: stopped by a full buffer, or queued behind parked ones
    /// (`udphub_replies_parked_total`).
    pub replies_parked: u64,
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

    /// Datagrams accounted for: heartbeats + quits + messages + join
    /// requests + drops.
    pub fn received(&self) -> u64 {
        self.heartbeats
            + self.quits
            + self.messages
            + self.join_requests
            + self.dropped.iter().sum::<u64>()
    }
}
