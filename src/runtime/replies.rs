//! Replies of one batch, sent together: one `sendmmsg` for up to a
//! batch's worth of different payloads to different destinations, instead
//! of one syscall each. The relay's answers (`^room^`, `^denied^`,
//! `^timeout^`, `^cookie^`) and the echo server's echoes both go this way,
//! each from the local address its request was sent to.

use std::ops::Range;

use crate::core::addr::RawAddr;
use crate::net::batch_io::ReplyBatch;
use crate::net::fanout::{self, Report};
use crate::runtime::event_loop::{Io, RateLimitedLog, RECV_BATCH};

/// Queued replies.
pub(crate) struct Replies {
    /// Their bytes, back to back.
    bytes: Vec<u8>,
    /// Each: its bytes in `bytes`, and where it goes.
    queued: Vec<(Range<usize>, RawAddr)>,
    /// `sendmmsg` headers.
    batch: ReplyBatch,
}

impl Replies {
    /// Room for a batch of replies of about `typical_len` bytes each.
    pub(crate) fn new(typical_len: usize) -> Replies {
        Replies {
            bytes: Vec::with_capacity(RECV_BATCH * typical_len),
            queued: Vec::with_capacity(RECV_BATCH),
            batch: ReplyBatch::new(RECV_BATCH),
        }
    }

    /// How many are queued.
    pub(crate) fn len(&self) -> usize {
        self.queued.len()
    }

    /// Queues `bytes` for `to`, returning the queued copy (to edit in
    /// place); sends the queue first if it is a full batch.
    pub(crate) fn push(
        &mut self,
        to: RawAddr,
        bytes: &[u8],
        io: &mut Io<'_>,
        log: &mut RateLimitedLog,
    ) -> &mut [u8] {
        if self.queued.len() >= self.batch.capacity() {
            self.flush(io, log);
        }
        let start = self.bytes.len();
        self.bytes.extend_from_slice(bytes);
        self.queued.push((start..self.bytes.len(), to));
        &mut self.bytes[start..]
    }

    /// Sends what is queued, with as few `sendmmsg` calls as fit, and
    /// counts every delivery.
    pub(crate) fn flush(&mut self, io: &mut Io<'_>, log: &mut RateLimitedLog) {
        if self.queued.is_empty() {
            return;
        }
        let mut report = Report {
            recipients: self.queued.len() as u64,
            ..Report::default()
        };
        let Replies {
            bytes,
            queued,
            batch,
        } = self;
        fanout::deliver(
            queued.len(),
            &mut report,
            |i| batch.send(io.fd, io.sources, bytes, &queued[i..]),
            &mut fanout::Impatient,
        );
        if let Some(e) = report.add_to(io.counts) {
            log.warn("sendmmsg", &e);
        }
        self.bytes.clear();
        self.queued.clear();
    }
}
