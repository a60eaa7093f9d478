//! Fan-out: one pre-rendered buffer to every recipient, in `sendmmsg` batches.
//!
//! The payload is rendered once per message by the caller; here it is handed
//! to the kernel with up to [`SEND_BATCH`] destinations per syscall. A full
//! socket buffer never stalls or spins the loop. A fan-out
//! ([`FanoutSender::send_slice`]) sends at most one slice of its room and
//! stops where the kernel's buffer filled, saying where it got to: the
//! runtime parks the rest and resumes there when the socket is writable
//! (`runtime::relay`). [`FanoutSender::send`] drops what a full buffer
//! would not take; only the shutdown `bye`
//! ([`FanoutSender::send_patiently`]) waits for the buffer in place.

use std::io;
use std::os::fd::BorrowedFd;
use std::thread;
use std::time::{Duration, Instant};

use crate::core::addr::RawAddr;
use crate::core::counts::{Counts, DeliveryDrop};
use crate::core::table::Recipients;
use crate::net::batch_io::{SendBatch, SourceControl};

/// Destinations per `sendmmsg`. 256 × 64-byte headers is 16 KiB, small
/// enough to stay in L1/L2; it divides the syscalls of a 1000-client
/// fan-out by 256 and the kernel allows up to 1024 (`UIO_MAXIOV`).
pub const SEND_BATCH: usize = 256;

/// What happened to one fan-out's deliveries.
#[derive(Debug, Default)]
pub struct Report {
    /// Deliveries attempted: `delivered` + every `dropped`.
    pub recipients: u64,
    /// Handed to the kernel.
    pub delivered: u64,
    /// Not handed to the kernel, by [`DeliveryDrop::index`].
    pub dropped: [u64; DeliveryDrop::COUNT],
    /// The first error that was not a full buffer, for a rate-limited log.
    pub first_error: Option<io::Error>,
}

impl Report {
    /// Drops `n` deliveries for `reason`.
    fn drop(&mut self, reason: DeliveryDrop, n: u64) {
        self.dropped[reason.index()] += n;
    }

    /// Adds this report's deliveries to `counts`; returns the first error
    /// (to log, rate-limited).
    pub fn add_to(self, counts: &mut Counts) -> Option<io::Error> {
        counts.recipients += self.recipients;
        counts.delivered += self.delivered;
        for (total, n) in counts.delivery_dropped.iter_mut().zip(self.dropped) {
            *total += n;
        }
        self.first_error
    }
}

/// How a run of [`deliver`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchEnd {
    /// Every message was delivered or dropped alone; go on.
    Done,
    /// The socket buffer was full: the rest was dropped, and the caller
    /// should drop whatever else it had queued for now too.
    BufferFull,
}

/// Reusable state for fanning messages out: the `sendmmsg` machinery
/// that carries out a hub's [`Fanout`](crate::core::hub::Fanout) (what to
/// send to whom).
pub struct FanoutSender {
    /// The `sendmmsg` header array.
    batch: SendBatch,
    /// Destinations of the batch being sent, copied out of the table so the
    /// table's iterator can be consumed lazily (32 bytes each).
    staging: Vec<RawAddr>,
    /// The member-list position of each staged destination (sliced sends:
    /// where to resume if the kernel stops taking them).
    positions: Vec<u32>,
}

/// Where a [`FanoutSender::send_slice`] stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SliceEnd {
    /// Every recipient was delivered to (or dropped for its own error).
    Done,
    /// The kernel's buffer was full: resume at this position of the
    /// member list once the socket is writable.
    Full(u32),
    /// The slice was used up: resume at this position on a later pass.
    Sliced(u32),
}

impl Default for FanoutSender {
    fn default() -> FanoutSender {
        FanoutSender::new(SEND_BATCH)
    }
}

impl FanoutSender {
    /// Fan-out with `batch` destinations per syscall.
    pub fn new(batch: usize) -> FanoutSender {
        let batch = SendBatch::new(batch);
        FanoutSender {
            staging: Vec::with_capacity(batch.capacity()),
            positions: Vec::with_capacity(batch.capacity()),
            batch,
        }
    }

    /// Sends `payload` to the recipients `dests` has left, visiting at
    /// most `slice` positions of the member list, and says where it
    /// stopped. A full buffer stops it with nothing dropped: the
    /// deliveries not taken are not counted here (they are still owed).
    /// Any other error drops just that destination and the slice goes on.
    pub fn send_slice(
        &mut self,
        fd: BorrowedFd<'_>,
        sources: &[SourceControl],
        payload: &[u8],
        dests: &mut Recipients<'_>,
        slice: usize,
        deadline: Instant,
    ) -> (Report, SliceEnd) {
        let FanoutSender {
            batch,
            staging,
            positions,
        } = self;
        let capacity = batch.capacity();
        drive_slice(
            staging,
            positions,
            capacity,
            SliceLimit {
                start: dests.next_position(),
                slice,
                deadline,
            },
            std::iter::from_fn(|| dests.next_at()),
            |chunk| batch.send(fd, sources, payload, chunk),
        )
    }

    /// Sends `payload` to every address `dests` yields, each from the
    /// local address its tag names in `sources` (empty: from whatever
    /// address the route picks; see [`crate::net::local_addrs`]).
    ///
    /// When the kernel reports its buffer full, the rest of this message's
    /// deliveries are dropped at once (retrying now would only spin); any
    /// other error drops just that destination and the fan-out continues.
    pub fn send<'a, I>(
        &mut self,
        fd: BorrowedFd<'_>,
        sources: &[SourceControl],
        payload: &[u8],
        dests: I,
    ) -> Report
    where
        I: IntoIterator<Item = &'a RawAddr>,
    {
        self.send_with(fd, sources, payload, dests, Impatient)
    }

    /// Like [`send`](Self::send), but a full buffer is waited out: the
    /// sender sleeps [`PATIENT_PAUSE`] and tries again, and gives up on
    /// the rest only after `patience` without the kernel taking anything.
    ///
    /// For the shutdown `bye`: the loop reads nothing any more, so there is
    /// nothing to starve, and a fan-out that was in full flow when the
    /// signal came has just filled the buffer the goodbye needs.
    pub fn send_patiently<'a, I>(
        &mut self,
        fd: BorrowedFd<'_>,
        sources: &[SourceControl],
        payload: &[u8],
        dests: I,
        patience: Duration,
    ) -> Report
    where
        I: IntoIterator<Item = &'a RawAddr>,
    {
        self.send_with(fd, sources, payload, dests, Patient::new(patience))
    }

    /// [`send`](Self::send) with what to do when the buffer is full.
    fn send_with<'a, I, W>(
        &mut self,
        fd: BorrowedFd<'_>,
        sources: &[SourceControl],
        payload: &[u8],
        dests: I,
        on_full: W,
    ) -> Report
    where
        I: IntoIterator<Item = &'a RawAddr>,
        W: OnFull,
    {
        let FanoutSender { batch, staging, .. } = self;
        let capacity = batch.capacity();
        drive(
            staging,
            capacity,
            dests,
            |chunk| batch.send(fd, sources, payload, chunk),
            on_full,
        )
    }
}

/// How long [`FanoutSender::send_patiently`] sleeps before trying a full
/// buffer again: long enough not to spin, short against the time a
/// loopback or NIC queue takes to drain.
pub const PATIENT_PAUSE: Duration = Duration::from_millis(1);

/// What a sender does when the kernel says its buffer is full.
pub trait OnFull {
    /// Called with the deliveries handed to the kernel so far; returns
    /// whether to try the same destination again (after waiting) rather
    /// than drop the rest.
    fn wait(&mut self, delivered: u64) -> bool;
}

/// Never waits: the rest is dropped at once (the relay's normal path,
/// where waiting would stop the loop from reading).
pub struct Impatient;

impl OnFull for Impatient {
    fn wait(&mut self, _: u64) -> bool {
        false
    }
}

/// Waits while the kernel keeps taking deliveries: gives up only after
/// `patience` with no progress.
pub struct Patient {
    patience: Duration,
    delivered: u64,
    since: Instant,
}

impl Patient {
    /// Gives up after `patience` without progress.
    pub fn new(patience: Duration) -> Patient {
        Patient {
            patience,
            delivered: 0,
            since: Instant::now(),
        }
    }
}

impl OnFull for Patient {
    fn wait(&mut self, delivered: u64) -> bool {
        if delivered != self.delivered {
            self.delivered = delivered;
            self.since = Instant::now();
        }
        if self.since.elapsed() >= self.patience {
            return false;
        }
        thread::sleep(PATIENT_PAUSE);
        true
    }
}

/// The fan-out policy, apart from the syscall so it can be tested with a
/// fake kernel: `send(chunk)` sends a leading part of `chunk` and says how
/// much, or fails on `chunk[0]`.
fn drive<'a, I, S, W>(
    staging: &mut Vec<RawAddr>,
    capacity: usize,
    dests: I,
    mut send: S,
    mut on_full: W,
) -> Report
where
    I: IntoIterator<Item = &'a RawAddr>,
    S: FnMut(&[RawAddr]) -> io::Result<usize>,
    W: OnFull,
{
    let mut out = Report::default();
    let mut dests = dests.into_iter();
    loop {
        staging.clear();
        staging.extend(dests.by_ref().take(capacity).copied());
        if staging.is_empty() {
            return out;
        }
        out.recipients += staging.len() as u64;
        let end = deliver(
            staging.len(),
            &mut out,
            |i| send(&staging[i..]),
            &mut on_full,
        );
        if end == BatchEnd::BufferFull {
            let rest = dests.count() as u64;
            out.recipients += rest;
            out.drop(DeliveryDrop::BufferFull, rest);
            return out;
        }
    }
}

/// Where a slice stops: `slice` member-list positions past `start`, or at
/// `deadline` once it has made progress, whichever comes first.
#[derive(Debug, Clone, Copy)]
struct SliceLimit {
    start: u32,
    slice: usize,
    deadline: Instant,
}

/// The sliced fan-out policy, apart from the syscall so it can be tested
/// with a fake kernel: stages up to `capacity` of the `(position,
/// address)` pairs `dests` yields, in order, while their positions are
/// within `slice` of `start`, and hands them to `send` (as [`drive`]).
/// Stops at the first full buffer, reporting the position of the first
/// destination the kernel did not take; those are neither recipients nor
/// drops yet.
fn drive_slice<'a, I, S>(
    staging: &mut Vec<RawAddr>,
    positions: &mut Vec<u32>,
    capacity: usize,
    limit: SliceLimit,
    dests: I,
    mut send: S,
) -> (Report, SliceEnd)
where
    I: Iterator<Item = (u32, &'a RawAddr)>,
    S: FnMut(&[RawAddr]) -> io::Result<usize>,
{
    let SliceLimit {
        start,
        slice,
        deadline,
    } = limit;
    let mut out = Report::default();
    let mut dests = dests.peekable();
    let end = u64::from(start) + slice as u64;
    loop {
        // Bounded in time too (once it has made progress): a delivery's
        // cost varies with the path (from ~1 µs to several where the
        // kernel answers an unreachable port), so a slice's size alone
        // does not bound how long the loop goes without reading.
        if out.recipients > 0 && Instant::now() >= deadline {
            return match dests.peek() {
                Some(&(at, _)) => (out, SliceEnd::Sliced(at)),
                None => (out, SliceEnd::Done),
            };
        }
        staging.clear();
        positions.clear();
        while staging.len() < capacity {
            match dests.peek() {
                Some(&(at, addr)) if u64::from(at) < end => {
                    staging.push(*addr);
                    positions.push(at);
                    dests.next();
                }
                _ => break,
            }
        }
        if staging.is_empty() {
            return match dests.peek() {
                Some(&(at, _)) => (out, SliceEnd::Sliced(at)),
                None => (out, SliceEnd::Done),
            };
        }
        let mut i = 0;
        while i < staging.len() {
            match send(&staging[i..]) {
                Ok(0) => {
                    out.recipients += 1;
                    out.drop(DeliveryDrop::SendError, 1);
                    i += 1;
                }
                Ok(n) => {
                    let n = n.min(staging.len() - i);
                    out.recipients += n as u64;
                    out.delivered += n as u64;
                    i += n;
                }
                Err(e) if is_buffer_full(&e) => {
                    return (out, SliceEnd::Full(positions[i]));
                }
                Err(e) => {
                    out.recipients += 1;
                    out.drop(DeliveryDrop::SendError, 1);
                    out.first_error.get_or_insert(e);
                    i += 1;
                }
            }
        }
    }
}

/// The send policy over `len` queued messages, shared by fan-out and the
/// echo server's replies: `send(i)` hands the kernel messages `i..` and says
/// how many it took, or fails on message `i`.
///
/// A full buffer is offered to `on_full`; unless it waits and asks for a
/// retry, everything from `i` on is dropped (and the result is
/// [`BatchEnd::BufferFull`]: the caller drops whatever else it had queued
/// too). Any other error drops message `i` alone and goes on. Adds to
/// `out`'s delivered/dropped counts, so that `len` = delivered + dropped
/// afterwards.
pub fn deliver<S, W>(len: usize, out: &mut Report, mut send: S, on_full: &mut W) -> BatchEnd
where
    S: FnMut(usize) -> io::Result<usize>,
    W: OnFull,
{
    let mut from = 0;
    while let Some(stopped) = deliver_until_full(len - from, out, |i| send(from + i)) {
        from += stopped;
        if !on_full.wait(out.delivered) {
            out.drop(DeliveryDrop::BufferFull, (len - from) as u64);
            return BatchEnd::BufferFull;
        }
    }
    BatchEnd::Done
}

/// [`deliver`] for messages that can wait (the replies,
/// `runtime::replies`): stops at the first full buffer and returns the
/// index of the first message the kernel did not take, which is neither
/// delivered nor dropped (still owed: the caller parks it and the rest).
/// `None`: every message was delivered or dropped alone. Like `deliver`,
/// adds to `out`'s delivered/dropped counts only.
pub fn deliver_until_full<S>(len: usize, out: &mut Report, mut send: S) -> Option<usize>
where
    S: FnMut(usize) -> io::Result<usize>,
{
    let mut i = 0;
    while i < len {
        match send(i) {
            Ok(0) => {
                out.drop(DeliveryDrop::SendError, 1);
                i += 1;
            }
            Ok(n) => {
                let n = n.min(len - i);
                out.delivered += n as u64;
                i += n;
            }
            Err(e) if is_buffer_full(&e) => return Some(i),
            Err(e) => {
                out.drop(DeliveryDrop::SendError, 1);
                out.first_error.get_or_insert(e);
                i += 1;
            }
        }
    }
    None
}

/// `EAGAIN`/`EWOULDBLOCK` (socket send buffer full) or `ENOBUFS` (device
/// queue full): both mean "not now", not "not to this destination".
fn is_buffer_full(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock || e.raw_os_error() == Some(libc::ENOBUFS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{SocketAddr, UdpSocket};
    use std::os::fd::AsFd;
    use std::time::Duration;

    const FULL: usize = DeliveryDrop::BufferFull as usize;
    const ERR: usize = DeliveryDrop::SendError as usize;

    #[test]
    fn delivers_to_every_destination_across_several_batches() {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        let sinks: Vec<UdpSocket> = (0..7)
            .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
            .collect();
        let dests: Vec<RawAddr> = sinks
            .iter()
            .map(|s| s.local_addr().unwrap().into())
            .collect();
        let mut f = FanoutSender::new(3);
        let out = f.send(server.as_fd(), &[], b"m", &dests);
        assert_eq!(
            (
                out.recipients,
                out.delivered,
                out.dropped[FULL],
                out.dropped[ERR]
            ),
            (7, 7, 0, 0)
        );
        for s in &sinks {
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let mut b = [0u8; 4];
            assert_eq!(s.recv(&mut b).unwrap(), 1);
        }
    }

    #[test]
    fn a_bad_destination_is_counted_and_the_rest_still_delivered() {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        let good = UdpSocket::bind("127.0.0.1:0").unwrap();
        good.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        // An IPv6 destination on an IPv4 socket fails (EAFNOSUPPORT/EINVAL).
        let bad: RawAddr = "[::1]:9".parse::<SocketAddr>().unwrap().into();
        let dests = [bad, good.local_addr().unwrap().into(), bad];
        let out = FanoutSender::new(8).send(server.as_fd(), &[], b"m", &dests);
        assert_eq!((out.recipients, out.delivered, out.dropped[ERR]), (3, 1, 2));
        assert!(out.first_error.is_some());
        let mut b = [0u8; 4];
        assert_eq!(good.recv(&mut b).unwrap(), 1);
    }

    fn addrs(n: u16) -> Vec<RawAddr> {
        (1..=n)
            .map(|p| SocketAddr::from(([127, 0, 0, 1], p)).into())
            .collect()
    }

    #[test]
    fn a_full_buffer_drops_the_rest_of_the_message_without_retrying() {
        let dests = addrs(10);
        let mut calls = 0;
        let out = drive(
            &mut Vec::new(),
            4,
            &dests,
            |chunk| {
                calls += 1;
                match calls {
                    1 => Ok(chunk.len()), // first 4
                    2 => Ok(1),           // partial: 1 of the next 4
                    _ => Err(io::Error::from_raw_os_error(libc::EAGAIN)),
                }
            },
            Impatient,
        );
        assert_eq!(calls, 3, "must not retry after EAGAIN");
        assert_eq!(
            (
                out.recipients,
                out.delivered,
                out.dropped[FULL],
                out.dropped[ERR]
            ),
            (10, 5, 5, 0)
        );
    }

    #[test]
    fn enobufs_counts_as_a_full_buffer() {
        let dests = addrs(3);
        let out = drive(
            &mut Vec::new(),
            8,
            &dests,
            |_| Err(io::Error::from_raw_os_error(libc::ENOBUFS)),
            Impatient,
        );
        assert_eq!((out.recipients, out.dropped[FULL]), (3, 3));
    }

    /// Messages that can wait: a full buffer stops the send at the first
    /// message not taken, which is neither delivered nor dropped; other
    /// errors drop their message alone, as in `deliver`.
    #[test]
    fn delivering_until_full_leaves_the_rest_owed() {
        let mut out = Report::default();
        let mut calls = 0;
        let stopped = deliver_until_full(10, &mut out, |i| {
            calls += 1;
            match calls {
                1 => Ok(3),                                          // 0..3
                2 => Err(io::Error::from_raw_os_error(libc::EPERM)), // 3 fails
                3 => Ok(0),                                          // 4 dropped
                4 => Ok(10 - i),                                     // 5.. clamped below
                _ => unreachable!(),
            }
        });
        assert_eq!(stopped, None);
        assert_eq!((out.delivered, out.dropped[ERR], calls), (8, 2, 4));
        let mut out = Report::default();
        let mut calls = 0;
        let stopped = deliver_until_full(10, &mut out, |_| {
            calls += 1;
            match calls {
                1 => Ok(4),
                _ => Err(io::Error::from_raw_os_error(libc::ENOBUFS)),
            }
        });
        assert_eq!(stopped, Some(4));
        assert_eq!(calls, 2, "no retry after a full buffer");
        assert_eq!((out.delivered, out.dropped.iter().sum::<u64>()), (4, 0));
    }

    #[test]
    fn accounting_always_adds_up() {
        // A fake kernel that cycles through every behaviour.
        let dests = addrs(50);
        let mut step = 0u32;
        let out = drive(
            &mut Vec::new(),
            7,
            &dests,
            |chunk| {
                step += 1;
                match step % 4 {
                    0 => Err(io::Error::from_raw_os_error(libc::EPERM)),
                    1 => Ok(chunk.len().min(3)),
                    2 => Ok(0),
                    _ => Ok(chunk.len()),
                }
            },
            Impatient,
        );
        assert_eq!(out.recipients, 50);
        assert_eq!(out.delivered + out.dropped.iter().sum::<u64>(), 50);
        let mut counts = Counts::default();
        assert!(out.add_to(&mut counts).is_some());
        assert_eq!(
            counts.recipients,
            counts.delivered + counts.delivery_dropped.iter().sum::<u64>()
        );
    }

    /// `(position, address)` pairs at the given positions.
    fn at(positions: &[u32], dests: &[RawAddr]) -> Vec<(u32, RawAddr)> {
        positions
            .iter()
            .copied()
            .zip(dests.iter().copied())
            .collect()
    }

    fn slice_with(
        dests: &[(u32, RawAddr)],
        start: u32,
        slice: usize,
        send: impl FnMut(&[RawAddr]) -> io::Result<usize>,
    ) -> (Report, SliceEnd) {
        drive_slice(
            &mut Vec::new(),
            &mut Vec::new(),
            4,
            SliceLimit {
                start,
                slice,
                deadline: Instant::now() + Duration::from_secs(3600),
            },
            dests.iter().map(|(p, a)| (*p, a)),
            send,
        )
    }

    #[test]
    fn a_slice_past_its_deadline_sends_one_batch_and_says_where_to_resume() {
        let pos: Vec<u32> = (0..10).collect();
        let dests = at(&pos, &addrs(10));
        let mut sent = Vec::new();
        let (out, end) = drive_slice(
            &mut Vec::new(),
            &mut Vec::new(),
            4,
            SliceLimit {
                start: 0,
                slice: 100,
                deadline: Instant::now(),
            },
            dests.iter().map(|(p, a)| (*p, a)),
            |chunk| {
                sent.push(chunk.len());
                Ok(chunk.len())
            },
        );
        // Progress first (one batch of 4), then the time is up.
        assert_eq!(end, SliceEnd::Sliced(4));
        assert_eq!((out.recipients, out.delivered), (4, 4));
        assert_eq!(sent, vec![4]);
    }

    #[test]
    fn a_slice_stops_at_its_size_and_says_where_to_resume() {
        // Positions 5..15, one dead member (9) skipped by the iterator.
        let pos: Vec<u32> = (5..15).filter(|&p| p != 9).collect();
        let dests = at(&pos, &addrs(10));
        let mut sent = Vec::new();
        let (out, end) = slice_with(&dests, 5, 6, |chunk| {
            sent.push(chunk.len());
            Ok(chunk.len())
        });
        // Positions 5, 6, 7, 8, 10 are within 6 of 5; 11 is where to go on.
        assert_eq!(end, SliceEnd::Sliced(11));
        assert_eq!((out.recipients, out.delivered), (5, 5));
        assert_eq!(sent, vec![4, 1]);
        let (out, end) = slice_with(&dests[5..], 11, 100, |chunk| Ok(chunk.len()));
        assert_eq!(end, SliceEnd::Done);
        assert_eq!(out.delivered, 4);
    }

    #[test]
    fn a_full_buffer_parks_the_rest_without_dropping_or_counting_it() {
        let pos: Vec<u32> = (0..10).collect();
        let dests = at(&pos, &addrs(10));
        let mut calls = 0;
        let (out, end) = slice_with(&dests, 0, 100, |chunk| {
            calls += 1;
            match calls {
                1 => Ok(chunk.len()),                                // 0..4
                2 => Ok(1),                                          // 4
                3 => Err(io::Error::from_raw_os_error(libc::EPERM)), // 5 fails
                _ => Err(io::Error::from_raw_os_error(libc::EAGAIN)),
            }
        });
        assert_eq!(end, SliceEnd::Full(6));
        assert_eq!(calls, 4, "no retry after EAGAIN");
        assert_eq!(
            (
                out.recipients,
                out.delivered,
                out.dropped[ERR],
                out.dropped[FULL]
            ),
            (6, 5, 1, 0)
        );
    }

    #[test]
    fn enobufs_parks_too() {
        let dests = at(&[3, 4], &addrs(2));
        let (out, end) = slice_with(&dests, 3, 10, |_| {
            Err(io::Error::from_raw_os_error(libc::ENOBUFS))
        });
        assert_eq!((out.recipients, end), (0, SliceEnd::Full(3)));
    }

    #[test]
    fn a_sliced_send_reaches_real_sockets() {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        let sinks: Vec<UdpSocket> = (0..5)
            .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
            .collect();
        let dests: Vec<(u32, RawAddr)> = sinks
            .iter()
            .enumerate()
            .map(|(i, s)| (i as u32, s.local_addr().unwrap().into()))
            .collect();
        let mut f = FanoutSender::new(2);
        let (out, end) = drive_slice(
            &mut f.staging,
            &mut f.positions,
            2,
            SliceLimit {
                start: 0,
                slice: 3,
                deadline: Instant::now() + Duration::from_secs(3600),
            },
            dests.iter().map(|(p, a)| (*p, a)),
            |chunk| f.batch.send(server.as_fd(), &[], b"m", chunk),
        );
        assert_eq!((out.delivered, end), (3, SliceEnd::Sliced(3)));
        for s in &sinks[..3] {
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let mut b = [0u8; 4];
            assert_eq!(s.recv(&mut b).unwrap(), 1);
        }
    }

    #[test]
    fn no_destinations_is_nothing() {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        let out = FanoutSender::default().send(server.as_fd(), &[], b"m", &[]);
        assert_eq!(out.recipients, 0);
    }

    #[test]
    fn a_patient_sender_retries_a_full_buffer_while_the_kernel_takes_more() {
        let dests = addrs(10);
        let mut calls = 0;
        let out = drive(
            &mut Vec::new(),
            4,
            &dests,
            |chunk| {
                calls += 1;
                // Full on every other call: the kernel drains between.
                if calls % 2 == 0 {
                    Err(io::Error::from_raw_os_error(libc::EAGAIN))
                } else {
                    Ok(chunk.len().min(2))
                }
            },
            Patient::new(Duration::from_secs(5)),
        );
        assert_eq!(
            (out.recipients, out.delivered, out.dropped[FULL]),
            (10, 10, 0)
        );
    }

    #[test]
    fn a_patient_sender_gives_up_when_nothing_moves_for_its_patience() {
        let dests = addrs(6);
        let mut calls = 0;
        let started = Instant::now();
        let out = drive(
            &mut Vec::new(),
            4,
            &dests,
            |_| {
                calls += 1;
                match calls {
                    1 => Ok(1),
                    _ => Err(io::Error::from_raw_os_error(libc::EAGAIN)),
                }
            },
            Patient::new(Duration::from_millis(20)),
        );
        assert_eq!(
            (out.recipients, out.delivered, out.dropped[FULL]),
            (6, 1, 5)
        );
        // It waited (several retries), and not for ever.
        assert!(calls > 2, "{calls} calls");
        assert!(started.elapsed() >= Duration::from_millis(20));
    }
}
