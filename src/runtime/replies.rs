//! Replies of one batch, sent together: one `sendmmsg` for up to a
//! batch's worth of different payloads to different destinations, instead
//! of one syscall each. The relay's answers (`^room^`, `^denied^`,
//! `^timeout^`, `^cookie^`) and the echo server's echoes both go this way,
//! each from the local address its request was sent to.
//!
//! A send buffer full for a moment loses none of them: what the kernel
//! would not take waits in a [`ReplyBacklog`] (bounded in bytes, a share
//! of `--send-backlog`), in order, and later replies queue behind it; the
//! service sends it first on its next [`resume`](Replies::resume), which
//! reports [`Pending::Blocked`] while some still wait, so the loop waits
//! for WRITABLE rather than spin. Only a reply the backlog has no room for
//! is dropped (`backlog_full`), and those still waiting when the server
//! stops (`shutdown`).

use std::io;
use std::ops::Range;

use crate::core::addr::RawAddr;
use crate::core::counts::{Counts, DeliveryDrop};
use crate::core::reply_backlog::ReplyBacklog;
use crate::net::batch_io::ReplyBatch;
use crate::net::fanout::{self, Report};
use crate::runtime::event_loop::{Io, Pending, RateLimitedLog, RECV_BATCH};

/// Queued replies.
pub(crate) struct Replies {
    /// Their bytes, back to back.
    bytes: Vec<u8>,
    /// Each: its bytes in `bytes`, and where it goes.
    queued: Vec<(Range<usize>, RawAddr)>,
    /// `sendmmsg` headers.
    batch: ReplyBatch,
    /// Replies a full send buffer would not take, and those queued behind
    /// them: sent first on the next [`resume`](Replies::resume).
    parked: ReplyBacklog,
}

impl Replies {
    /// Room for a batch of replies of about `typical_len` bytes each, and
    /// for up to `parked_limit` bytes of replies waiting for the send
    /// buffer ([`crate::core::reply_backlog::share_of`] `--send-backlog`).
    pub(crate) fn new(typical_len: usize, parked_limit: usize) -> Replies {
        Replies {
            bytes: Vec::with_capacity(RECV_BATCH * typical_len),
            queued: Vec::with_capacity(RECV_BATCH),
            batch: ReplyBatch::new(RECV_BATCH),
            parked: ReplyBacklog::new(parked_limit),
        }
    }

    /// How many are queued.
    pub(crate) fn len(&self) -> usize {
        self.queued.len()
    }

    /// Whether replies wait for room in the send buffer (then anything
    /// else sent to their destinations should wait behind them).
    pub(crate) fn parked(&self) -> bool {
        !self.parked.is_empty()
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
    /// counts every delivery. If the send buffer fills, the rest is
    /// parked; while replies are parked, the queue goes behind them
    /// without a syscall (the loop tries them again when the socket is
    /// writable: [`resume`](Self::resume)).
    pub(crate) fn flush(&mut self, io: &mut Io<'_>, log: &mut RateLimitedLog) {
        let (fd, sources) = (io.fd, io.sources);
        self.flush_with(io.counts, log, |batch, arena, msgs| {
            batch.send(fd, sources, arena, msgs)
        });
    }

    /// [`flush`](Self::flush) with the `sendmmsg` passed in (tests pass a
    /// fake kernel): `send(batch, arena, msgs)` sends a leading part of
    /// `msgs` and says how many, or fails on the first.
    fn flush_with<S>(&mut self, counts: &mut Counts, log: &mut RateLimitedLog, mut send: S)
    where
        S: FnMut(&mut ReplyBatch, &[u8], &[(Range<usize>, RawAddr)]) -> io::Result<usize>,
    {
        if self.queued.is_empty() {
            return;
        }
        let mut from = 0;
        if self.parked.is_empty() {
            let mut report = Report::default();
            let Replies {
                bytes,
                queued,
                batch,
                ..
            } = self;
            let stopped = fanout::deliver_until_full(queued.len(), &mut report, |i| {
                send(batch, bytes, &queued[i..])
            });
            from = stopped.unwrap_or(queued.len());
            report.recipients = from as u64;
            if let Some(e) = report.add_to(counts) {
                log.warn("sendmmsg", &e);
            }
            if stopped.is_some() {
                counts.send_buffer_full += 1;
            }
        }
        for (range, to) in &self.queued[from..] {
            park(&mut self.parked, *to, &self.bytes[range.clone()], counts);
        }
        self.bytes.clear();
        self.queued.clear();
    }

    /// Sends the parked replies, oldest first, until the buffer is full
    /// again: [`Pending::Blocked`] if some still wait (the loop then
    /// waits for WRITABLE, or [`BLOCKED_RETRY`](crate::runtime::event_loop::BLOCKED_RETRY)),
    /// [`Pending::Idle`] when none do.
    pub(crate) fn resume(&mut self, io: &mut Io<'_>, log: &mut RateLimitedLog) -> Pending {
        let (fd, sources) = (io.fd, io.sources);
        self.resume_with(io.counts, log, |batch, arena, msgs| {
            batch.send(fd, sources, arena, msgs)
        })
    }

    /// [`resume`](Self::resume) with the `sendmmsg` passed in, as
    /// [`flush_with`](Self::flush_with).
    fn resume_with<S>(
        &mut self,
        counts: &mut Counts,
        log: &mut RateLimitedLog,
        mut send: S,
    ) -> Pending
    where
        S: FnMut(&mut ReplyBatch, &[u8], &[(Range<usize>, RawAddr)]) -> io::Result<usize>,
    {
        if self.parked.is_empty() {
            return Pending::Idle;
        }
        let mut report = Report::default();
        let (arena, waiting) = self.parked.waiting();
        let batch = &mut self.batch;
        let stopped = fanout::deliver_until_full(waiting.len(), &mut report, |i| {
            send(batch, arena, &waiting[i..])
        });
        let done = stopped.unwrap_or(waiting.len());
        self.parked.sent(done);
        report.recipients = done as u64;
        if let Some(e) = report.add_to(counts) {
            log.warn("sendmmsg", &e);
        }
        if stopped.is_some() {
            counts.send_buffer_full += 1;
            Pending::Blocked
        } else {
            Pending::Idle
        }
    }

    /// Drops every parked reply (the server is stopping), counting each
    /// as `shutdown`; returns how many.
    pub(crate) fn abandon(&mut self, counts: &mut Counts) -> u64 {
        let n = self.parked.clear() as u64;
        counts.recipients += n;
        counts.delivery_dropped[DeliveryDrop::Shutdown.index()] += n;
        n
    }
}

/// Parks one reply, counting it parked, or, with the backlog full,
/// dropped (`backlog_full`).
fn park(parked: &mut ReplyBacklog, to: RawAddr, bytes: &[u8], counts: &mut Counts) {
    if parked.push(to, bytes) {
        counts.replies_parked += 1;
    } else {
        counts.recipients += 1;
        counts.delivery_dropped[DeliveryDrop::BacklogFull.index()] += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    const BACKLOG_FULL: usize = DeliveryDrop::BacklogFull as usize;
    const SHUTDOWN: usize = DeliveryDrop::Shutdown as usize;
    const SEND_ERROR: usize = DeliveryDrop::SendError as usize;

    fn addr(port: u16) -> RawAddr {
        RawAddr::from(SocketAddr::from(([127, 0, 0, 1], port))).with_local(2)
    }

    /// A fake kernel: takes up to `room` messages in all, then says
    /// EAGAIN; records what it took as (port, local tag, payload).
    struct Kernel {
        room: usize,
        got: Vec<(u16, u8, Vec<u8>)>,
        calls: usize,
    }

    impl Kernel {
        fn new(room: usize) -> Kernel {
            Kernel {
                room,
                got: Vec::new(),
                calls: 0,
            }
        }

        fn send(&mut self, arena: &[u8], msgs: &[(Range<usize>, RawAddr)]) -> io::Result<usize> {
            self.calls += 1;
            if self.room == 0 {
                return Err(io::Error::from_raw_os_error(libc::EAGAIN));
            }
            let n = msgs.len().min(self.room).min(RECV_BATCH);
            for (range, to) in &msgs[..n] {
                self.got
                    .push((to.port(), to.local(), arena[range.clone()].to_vec()));
            }
            self.room -= n;
            Ok(n)
        }
    }

    fn queue(r: &mut Replies, ports: std::ops::Range<u16>) {
        for p in ports {
            r.bytes.extend_from_slice(format!("^room^{p}").as_bytes());
            let end = r.bytes.len();
            r.queued
                .push((end - format!("^room^{p}").len()..end, addr(p)));
        }
    }

    fn flush(r: &mut Replies, counts: &mut Counts, k: &mut Kernel) {
        r.flush_with(counts, &mut RateLimitedLog::default(), |_, a, m| {
            k.send(a, m)
        });
    }

    fn resume(r: &mut Replies, counts: &mut Counts, k: &mut Kernel) -> Pending {
        r.resume_with(counts, &mut RateLimitedLog::default(), |_, a, m| {
            k.send(a, m)
        })
    }

    fn dropped(c: &Counts) -> u64 {
        c.delivery_dropped.iter().sum()
    }

    /// A full buffer parks the rest of the batch; the next batch goes
    /// behind it without a syscall; a resume sends them in order, from
    /// their local address, until the buffer is full again (Blocked), and
    /// then the rest (Idle). Every reply is delivered once, none dropped.
    #[test]
    fn a_full_buffer_parks_replies_in_order_until_there_is_room() {
        let mut r = Replies::new(16, 1 << 20);
        let mut c = Counts::default();
        let mut k = Kernel::new(3);
        queue(&mut r, 0..5);
        flush(&mut r, &mut c, &mut k);
        assert!(r.parked());
        assert_eq!(
            (c.delivered, c.replies_parked, c.send_buffer_full),
            (3, 2, 1)
        );
        let calls = k.calls;
        queue(&mut r, 5..8);
        flush(&mut r, &mut c, &mut k);
        assert_eq!(k.calls, calls, "no syscall while replies are parked");
        assert_eq!(c.replies_parked, 5);
        k.room = 2;
        assert_eq!(resume(&mut r, &mut c, &mut k), Pending::Blocked);
        assert_eq!(c.send_buffer_full, 2);
        k.room = 100;
        assert_eq!(resume(&mut r, &mut c, &mut k), Pending::Idle);
        assert_eq!(resume(&mut r, &mut c, &mut k), Pending::Idle);
        assert!(!r.parked());
        let ports: Vec<u16> = k.got.iter().map(|g| g.0).collect();
        assert_eq!(ports, (0..8).collect::<Vec<_>>());
        assert!(k
            .got
            .iter()
            .all(|(p, local, body)| *local == 2 && body == format!("^room^{p}").as_bytes()));
        assert_eq!((c.recipients, c.delivered, dropped(&c)), (8, 8, 0));
    }

    /// Beyond its bound a reply is dropped and counted `backlog_full`;
    /// at shutdown those still parked are counted `shutdown`; send errors
    /// drop their own reply only. Every reply is counted exactly once.
    #[test]
    fn replies_beyond_the_bound_and_at_shutdown_are_counted_once() {
        let one = crate::core::reply_backlog::cost("^room^10".len());
        let mut r = Replies::new(16, 3 * one);
        let mut c = Counts::default();
        let mut k = Kernel::new(0);
        queue(&mut r, 10..15);
        flush(&mut r, &mut c, &mut k);
        assert_eq!(c.replies_parked, 3);
        assert_eq!(c.delivery_dropped[BACKLOG_FULL], 2);
        // One parked reply's destination fails for good.
        let mut first = true;
        let mut got = Vec::new();
        let pending = r.resume_with(&mut c, &mut RateLimitedLog::default(), |_, a, m| {
            if std::mem::take(&mut first) {
                return Err(io::Error::from_raw_os_error(libc::EPERM));
            }
            got.push(a[m[0].0.clone()].to_vec());
            Ok(1)
        });
        assert_eq!(pending, Pending::Idle);
        assert_eq!(got, vec![b"^room^11".to_vec(), b"^room^12".to_vec()]);
        assert_eq!(c.delivery_dropped[SEND_ERROR], 1);
        // Parked again, then stopped.
        queue(&mut r, 20..22);
        flush(&mut r, &mut c, &mut k);
        assert_eq!(r.abandon(&mut c), 2);
        assert_eq!(c.delivery_dropped[SHUTDOWN], 2);
        assert!(!r.parked());
        assert_eq!(c.recipients, 7);
        assert_eq!(c.recipients, c.delivered + dropped(&c));
    }

    /// A batch that fits is sent at once and parks nothing.
    #[test]
    fn a_batch_that_fits_is_not_parked() {
        let mut r = Replies::new(16, 1 << 20);
        let mut c = Counts::default();
        let mut k = Kernel::new(1000);
        queue(&mut r, 0..100);
        flush(&mut r, &mut c, &mut k);
        assert_eq!(
            (c.delivered, c.replies_parked, c.send_buffer_full),
            (100, 0, 0)
        );
        assert_eq!(k.calls, 2, "64 per sendmmsg");
        assert_eq!(r.len(), 0);
        assert!(!r.parked());
    }
}
