//! The event loop: one thread, one UDP socket, one mio `Poll`, shared by
//! every udphub server (the chat relay, the echo server).
//!
//! What differs between servers is a [`Service`]: what to do with each
//! datagram, what timers it has, what to say at shutdown. Everything else is
//! here, once: batched reads, the kernel's drop counter, metrics flushing.
//! Process-wide things — signals, the metrics endpoint — belong to the
//! supervisor that starts the loops (`runtime::supervisor`), so several
//! loops can run in one process; a loop is stopped through its
//! [`ShutdownHandle`].
//!
//! Each pass of [`EventLoop::run`]:
//!
//! 1. polls, with a timeout of the service's next timer (at most
//!    [`KERNEL_DROPS_INTERVAL`]), zero when work is left over, or a
//!    back-off after a failed read;
//! 2. drains the socket with `recvmmsg` batches until `WouldBlock` — mio is
//!    edge-triggered, so a socket left undrained would never be reported
//!    readable again (mio's `Poll` docs, "Draining readiness") — but at most
//!    [`MAX_BATCHES_PER_PASS`] batches, so a flood can't starve timers and
//!    shutdown; the rest is read on the next pass, which then doesn't wait;
//! 3. hands each datagram to the service, which admits, counts and acts
//!    (on a wildcard address, its source first tagged with the local
//!    address it was sent to, see [`crate::net::local_addrs`]);
//! 4. runs the service's timers;
//! 5. lets the service resume work it parked (fan-outs sliced, or waiting
//!    for room in the send buffer: [`Service::resume`]); while it waits for
//!    the buffer, the socket is registered for WRITABLE too, and only then
//!    (a UDP socket's write-space wake-ups would otherwise wake the loop for
//!    every datagram the kernel sends);
//! 6. flushes the counts to the metrics facade (also after every batch).
//!
//! A hand-over pauses the loop between two passes ([`PauseHandle`]): it
//! reads nothing until the supervisor says to export its state, resume, or
//! return without a goodbye.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token, Waker};

use crate::core::admission::Arrival;
use crate::core::counts::Counts;
use crate::error::Error;
use crate::net::batch_io::{self, RecvBatch, SourceControl};
use crate::net::local_addrs::LocalAddrs;
use crate::net::socket::Bound;
use crate::runtime::metrics::Metrics;
use crate::runtime::readiness::Readiness;

/// The UDP socket's token.
const SOCKET: Token = Token(0);
/// A [`ShutdownHandle`] was triggered.
const WAKER: Token = Token(1);

/// Datagrams per `recvmmsg`. 64 amortises the syscall well (the gain
/// flattens past ~32) while the buffers (64 × 1472 B ≈ 94 KiB) stay cache-sized.
pub const RECV_BATCH: usize = 64;
/// `recvmmsg` calls per loop pass before timers and shutdown get a turn
/// (64 × 64 = 4096 datagrams, about a millisecond of work).
pub const MAX_BATCHES_PER_PASS: usize = 64;
/// Consecutive failed `recvmmsg` calls (across passes, with back-off between
/// them: about 10 s of nothing but failures) after which the loop gives up
/// and the process exits non-zero for its supervisor to restart it.
pub const MAX_RECV_ERRORS: u32 = 100;
/// The longest back-off between two failed reads.
const MAX_RECV_BACKOFF: Duration = Duration::from_millis(100);
/// How often the loop reads the kernel's drop counter with SO_MEMINFO
/// (besides what SO_RXQ_OVFL reports with each datagram), and the longest
/// it sleeps, so a flood's final drops are counted within a second.
pub const KERNEL_DROPS_INTERVAL: Duration = Duration::from_secs(1);
/// At most one log line per this interval for per-datagram errors.
const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(60);
/// While parked work waits for the send buffer, the longest the loop waits
/// for WRITABLE before trying again anyway: a device queue full (`ENOBUFS`)
/// may never make the socket report writable. Long enough not to spin.
pub const BLOCKED_RETRY: Duration = Duration::from_millis(5);

/// What a service has left after [`Service::resume`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pending {
    /// Nothing parked.
    Idle,
    /// Work left that can go on now: the next pass does not wait.
    More,
    /// Work left that waits for room in the socket's send buffer.
    Blocked,
}

/// What a server does with its datagrams. The loop calls it; it never
/// polls or reads by itself.
pub trait Service {
    /// Handles one datagram as read: the service admits it (and counts a
    /// drop) or acts on it, counting it exactly once.
    fn handle(&mut self, arrival: Arrival<'_>, io: &mut Io<'_>);

    /// Called after each batch, e.g. to send replies gathered in `handle`.
    fn end_batch(&mut self, _io: &mut Io<'_>) {}

    /// Runs due timers at `now`. Returns `true` if work is left for the
    /// next pass.
    fn on_timer(&mut self, _now: Instant, _counts: &mut Counts) -> bool {
        false
    }

    /// When the next timer is due, if any.
    fn next_timer(&self) -> Option<Instant> {
        None
    }

    /// Continues work parked on an earlier pass (a fan-out sliced, or
    /// stopped by a full send buffer), once per pass, after the reads.
    fn resume(&mut self, _io: &mut Io<'_>) -> Pending {
        Pending::Idle
    }

    /// The loop's waker rang for something other than shutdown (e.g. the
    /// cluster bridge has messages waiting).
    fn on_wake(&mut self, _io: &mut Io<'_>) {}

    /// Says goodbye at shutdown.
    fn shutdown(&mut self, _io: &mut Io<'_>) {}

    /// A hand-over: every loop has stopped reading; finishes what other
    /// loops handed this one and returns the state the new process takes
    /// over, or `None` if this service has none to hand over.
    fn export(&mut self, _io: &mut Io<'_>) -> Option<Exported> {
        None
    }

    /// Clients now, this loop's share of the `udphub_clients` gauge.
    fn clients(&self) -> usize {
        0
    }

    /// Named rooms now, this loop's share of the `udphub_rooms` gauge.
    fn rooms(&self) -> usize {
        0
    }
}

/// Now, in unix seconds (0 if the clock is before 1970).
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What a [`Service`] may use while handling datagrams.
pub struct Io<'a> {
    /// The socket, for sending.
    pub fd: BorrowedFd<'a>,
    /// The local addresses to send from, by tag ([`LocalAddrs::sources`]):
    /// what every send passes on, so that each destination's datagram
    /// leaves from the address it talks to. Empty unless the socket is
    /// bound to a wildcard address.
    pub sources: &'a [SourceControl],
    /// The counts to add to.
    pub counts: &'a mut Counts,
    /// When the current batch was read.
    pub received_at: Instant,
    /// The wall-clock time then, in unix seconds (for token expiry).
    pub unix_secs: u64,
}

/// What a loop's service hands over ([`Service::export`]).
#[derive(Debug)]
pub struct Exported {
    /// Its members, encoded in the loop's own thread.
    pub state: crate::core::snapshot::EncodedLoop,
    /// Verify mode's cookie key (the same in every loop).
    pub cookie: Option<crate::core::snapshot::CookieState>,
    /// With `--cluster`, where this loop's own streams are (the last seq
    /// it published per room): the process taking over hears those
    /// messages from its catch-all subscription and must not deliver
    /// them again.
    pub published: Vec<crate::core::snapshot::RoomStreams>,
}

/// What the supervisor tells a loop paused for a hand-over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PauseCommand {
    /// Every loop has paused: finish the work between loops, then report
    /// the service's state and a duplicate of the socket.
    Export,
    /// The hand-over failed: read again, with everything kept.
    Resume,
    /// The new process serves: return without a goodbye.
    Exit,
}

/// What a loop tells the supervisor during a hand-over.
#[derive(Debug)]
pub enum PauseReport {
    /// Loop `index` stopped reading, at a batch boundary.
    Paused(usize),
    /// Loop `index`'s state and its socket (a duplicate descriptor, for
    /// the new process), or `None` if its service hands nothing over.
    Exported(usize, Option<(Exported, std::os::fd::OwnedFd)>),
}

/// The supervisor's end of a loop's hand-over pause.
///
/// Each pause is an attempt with a number of its own, and every command
/// carries it: a loop that paused late (after its attempt timed out and
/// was resumed) skips the commands of an attempt it no longer serves, so
/// a stale `Resume` can never set it reading while a later attempt hands
/// its socket on.
#[derive(Debug)]
pub struct PauseHandle {
    /// The attempt the loop is asked to pause for (0: none), set before
    /// waking the loop.
    requested: Arc<AtomicU64>,
    /// The latest attempt's number.
    attempt: std::cell::Cell<u64>,
    /// Wakes the loop's poll.
    waker: Arc<Waker>,
    /// Commands to the paused loop, with their attempt.
    commands: std::sync::mpsc::Sender<(u64, PauseCommand)>,
}

impl PauseHandle {
    /// Asks the loop to stop reading at its next batch boundary (a new
    /// attempt); it reports [`PauseReport::Paused`] and waits for commands.
    pub fn pause(&self) {
        let attempt = self.attempt.get().wrapping_add(1).max(1);
        self.attempt.set(attempt);
        self.requested.store(attempt, Ordering::SeqCst);
        if let Err(e) = self.waker.wake() {
            tracing::error!(event = "wake_failed", error = %e, "cannot wake the loop: {e}");
        }
    }

    /// Sends a command of the latest attempt to the paused loop (ignored
    /// if it has ended). A `Resume` also withdraws the request if the loop
    /// has not taken it yet: a loop still finishing its parked work for a
    /// hand-over that has since failed (its send buffer stayed full) reads
    /// again, rather than waiting for that work to drain.
    pub fn command(&self, command: PauseCommand) {
        let attempt = self.attempt.get();
        if matches!(command, PauseCommand::Resume) {
            let _ = self
                .requested
                .compare_exchange(attempt, 0, Ordering::SeqCst, Ordering::SeqCst);
        }
        let _ = self.commands.send((attempt, command));
    }
}

/// The loop's end of it.
#[derive(Debug)]
struct PausePort {
    /// This loop's index, in its reports.
    index: usize,
    /// Set by [`PauseHandle::pause`]: the attempt (0: none).
    requested: Arc<AtomicU64>,
    /// From the supervisor, with their attempt.
    commands: std::sync::mpsc::Receiver<(u64, PauseCommand)>,
    /// To the supervisor.
    reports: std::sync::mpsc::Sender<PauseReport>,
}

/// How a pause ended.
enum Unpaused {
    /// Read again.
    Resume,
    /// Return from `run` without a goodbye.
    Exit,
}

/// Stops a running loop from another thread.
#[derive(Clone)]
pub struct ShutdownHandle {
    /// Set before waking the loop.
    requested: Arc<AtomicBool>,
    /// Wakes the loop's poll.
    waker: Arc<Waker>,
}

impl ShutdownHandle {
    /// Asks the loop to run the service's shutdown and return from `run`.
    pub fn shutdown(&self) {
        self.requested.store(true, Ordering::SeqCst);
        if let Err(e) = self.waker.wake() {
            tracing::error!(event = "wake_failed", error = %e, "cannot wake the loop: {e}");
        }
    }
}

/// Logs an error at most once per [`ERROR_LOG_INTERVAL`], saying how many
/// were suppressed in between.
#[derive(Debug)]
pub(crate) struct RateLimitedLog(crate::throttle::Throttle);

impl Default for RateLimitedLog {
    fn default() -> RateLimitedLog {
        RateLimitedLog(crate::throttle::Throttle::new(ERROR_LOG_INTERVAL))
    }
}

impl RateLimitedLog {
    /// Logs `err` unless a line was logged within the interval.
    pub(crate) fn warn(&mut self, what: &str, err: &io::Error) {
        if let Some(suppressed) = self.0.admit(Instant::now()) {
            tracing::warn!(
                event = "io_error",
                doing = what,
                error = %err,
                suppressed,
                "{what}: {err} ({suppressed} similar errors suppressed since the last report)"
            );
        }
    }
}

/// Failed reads, remembered across passes: each one backs the loop off
/// (no busy spin, no log flood), and a long unbroken run ends the loop.
#[derive(Debug, Default)]
struct RecvErrors {
    /// Failures since the last successful read.
    consecutive: u32,
    /// Throttles the warning.
    log: RateLimitedLog,
}

impl RecvErrors {
    /// A read succeeded (or found nothing): the run of failures is over.
    fn success(&mut self) {
        self.consecutive = 0;
    }

    /// A read failed: how long to wait before the next, or the error that
    /// ends the loop after [`MAX_RECV_ERRORS`] in a row.
    fn failure(&mut self, e: io::Error) -> Result<Duration, Error> {
        self.consecutive += 1;
        if self.consecutive >= MAX_RECV_ERRORS {
            return Err(Error::io("recvmmsg keeps failing", e));
        }
        self.log.warn("recvmmsg", &e);
        // 1, 2, 4 … 64 ms, then 100 ms.
        let backoff = Duration::from_millis(1 << (self.consecutive - 1).min(7));
        Ok(backoff.min(MAX_RECV_BACKOFF))
    }
}

/// Pins the calling thread to `cpu`; a failure (a CPU outside the
/// process's cgroup, a sandbox without `sched_setaffinity`) is logged and
/// the loop runs unpinned.
fn pin_current_thread(cpu: usize) {
    use nix::sched::{sched_setaffinity, CpuSet};
    use nix::unistd::Pid;
    let mut set = CpuSet::new();
    let pinned = set
        .set(cpu)
        .and_then(|()| sched_setaffinity(Pid::from_raw(0), &set));
    match pinned {
        Ok(()) => tracing::info!(event = "pinned", cpu, "loop pinned to CPU {cpu}"),
        Err(e) => {
            tracing::warn!(event = "pin_failed", cpu, error = %e, "cannot pin the loop to CPU {cpu} ({e}); it runs unpinned")
        }
    }
}

/// What a drain left behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Drained {
    /// The socket is empty: wait for readiness.
    Empty,
    /// The per-pass cap was reached: read again without waiting.
    More,
    /// A read failed: read again after this long.
    Backoff(Duration),
}

/// A bound socket, a [`Service`], and the loop that joins them.
pub struct EventLoop<S> {
    /// The loop's own poll: the socket and the shutdown waker.
    poll: Poll,
    /// Reused event buffer.
    events: Events,
    /// The UDP socket.
    socket: mio::net::UdpSocket,
    /// Where it is bound.
    local_addr: SocketAddr,
    /// How to stop the loop from elsewhere.
    shutdown: ShutdownHandle,
    /// `recvmmsg` buffers.
    recv: RecvBatch,
    /// On a wildcard address, the local addresses clients talk to (each
    /// datagram's source is tagged with its own); `None` when bound to one
    /// address, which then costs nothing per datagram.
    locals: Option<LocalAddrs>,
    /// Failed reads, across passes.
    recv_errors: RecvErrors,
    /// This loop's counts and metric handles.
    metrics: Metrics,
    /// Last value of the kernel's cumulative drop counter seen.
    kernel_drops_seen: u32,
    /// When the drop counter was last read with SO_MEMINFO.
    kernel_drops_checked: Instant,
    /// The server.
    service: S,
    /// The CPU to pin the loop's thread to (`--pin-threads`), if any.
    pin: Option<usize>,
    /// Told once, after the first pass (polled and drained): `/readyz`
    /// waits for every loop's.
    readiness: Option<Readiness>,
    /// How the supervisor pauses this loop for a hand-over, if it can.
    pause: Option<PausePort>,
    /// Whether the socket is registered for WRITABLE too (only while the
    /// service's parked work waits for the send buffer).
    writable: bool,
}

impl<S: Service> EventLoop<S> {
    /// Wraps a bound socket. Datagrams longer than `max_datagram` arrive
    /// `truncated` (for admission to drop). Metrics go to whatever recorder
    /// is installed.
    pub fn new(bound: Bound, max_datagram: usize, service: S) -> Result<EventLoop<S>, Error> {
        let poll = Poll::new().map_err(|e| Error::io("create poll", e))?;
        let mut socket = bound.socket;
        poll.registry()
            .register(&mut socket, SOCKET, Interest::READABLE)
            .map_err(|e| Error::io("register socket", e))?;
        let waker = Waker::new(poll.registry(), WAKER).map_err(|e| Error::io("create waker", e))?;
        Ok(EventLoop {
            poll,
            events: Events::with_capacity(64),
            socket,
            local_addr: bound.local_addr,
            shutdown: ShutdownHandle {
                requested: Arc::new(AtomicBool::new(false)),
                waker: Arc::new(waker),
            },
            recv: RecvBatch::new(RECV_BATCH, max_datagram),
            locals: bound
                .pktinfo
                .then(|| LocalAddrs::new(bound.local_addr.is_ipv6())),
            recv_errors: RecvErrors::default(),
            metrics: Metrics::register(),
            kernel_drops_seen: 0,
            kernel_drops_checked: Instant::now(),
            service,
            pin: None,
            readiness: None,
            pause: None,
            writable: false,
        })
    }

    /// Counts the socket's kernel drops from `seen` on (the value the
    /// process that handed the socket over had counted up to).
    pub fn kernel_drops_counted(&mut self, seen: u32) {
        self.kernel_drops_seen = seen;
    }

    /// Lets the supervisor pause this loop (loop `index`) for a hand-over:
    /// the loop reports to `reports`, and takes commands through the
    /// returned handle.
    pub fn pause_handle(
        &mut self,
        index: usize,
        reports: std::sync::mpsc::Sender<PauseReport>,
    ) -> PauseHandle {
        let requested = Arc::new(AtomicU64::new(0));
        let (commands_tx, commands) = std::sync::mpsc::channel();
        self.pause = Some(PausePort {
            index,
            requested: Arc::clone(&requested),
            commands,
            reports,
        });
        PauseHandle {
            requested,
            attempt: std::cell::Cell::new(0),
            waker: Arc::clone(&self.shutdown.waker),
            commands: commands_tx,
        }
    }

    /// Whether a hand-over is waiting for this loop (without taking the
    /// request: [`pause_requested`](Self::pause_requested) does).
    fn pause_pending(&self) -> bool {
        self.pause
            .as_ref()
            .is_some_and(|p| p.requested.load(Ordering::Relaxed) != 0)
    }

    /// The attempt a hand-over asked this loop to pause for, taken.
    fn pause_requested(&self) -> Option<u64> {
        self.pause
            .as_ref()
            .map(|p| p.requested.swap(0, Ordering::SeqCst))
            .filter(|&attempt| attempt != 0)
    }

    /// Paused at a batch boundary: nothing is read (datagrams wait in the
    /// kernel's queue) until the supervisor says to resume or to exit.
    fn paused(&mut self, attempt: u64) -> Unpaused {
        let Some(port) = self.pause.take() else {
            return Unpaused::Resume;
        };
        let _ = port.reports.send(PauseReport::Paused(port.index));
        let outcome = loop {
            match port.commands.recv() {
                // An earlier attempt's, which this loop paused too late for.
                Ok((of, _)) if of != attempt => {}
                Ok((_, PauseCommand::Export)) => {
                    let mut io = io_now(&self.socket, &self.locals, &mut self.metrics.counts);
                    let mut exported = self.service.export(&mut io);
                    // Counted up to now here; the new process counts on.
                    if let Ok(total) = batch_io::socket_drops(self.socket.as_fd()) {
                        observe_kernel_drops(
                            &mut self.kernel_drops_seen,
                            total,
                            &mut self.metrics.counts,
                        );
                    }
                    if let Some(e) = exported.as_mut() {
                        e.state.kernel_drops = self.kernel_drops_seen;
                    }
                    self.flush_all();
                    let exported = match (exported, self.socket.as_fd().try_clone_to_owned()) {
                        (Some(e), Ok(fd)) => Some((e, fd)),
                        (_, Err(e)) => {
                            tracing::error!(event = "handover_failed", error = %e, "hand-over: cannot duplicate the socket: {e}");
                            None
                        }
                        (None, _) => None,
                    };
                    let _ = port
                        .reports
                        .send(PauseReport::Exported(port.index, exported));
                }
                Ok((_, PauseCommand::Resume)) => break Unpaused::Resume,
                Ok((_, PauseCommand::Exit)) => break Unpaused::Exit,
                // The supervisor is gone: keep serving.
                Err(_) => break Unpaused::Resume,
            }
        };
        self.pause = Some(port);
        outcome
    }

    /// The address the socket is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// A handle that stops [`run`](EventLoop::run) from another thread.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.shutdown.clone()
    }

    /// The loop's waker, for another thread with work for the service
    /// (it then gets [`Service::on_wake`]).
    pub fn waker(&self) -> Arc<Waker> {
        Arc::clone(&self.shutdown.waker)
    }

    /// Marks this loop as shard `index` of several (for its per-shard
    /// metrics).
    pub fn set_shard(&mut self, index: usize) {
        self.metrics.set_shard(index);
    }

    /// Pins the thread that will [`run`](Self::run) the loop to `cpu`.
    pub fn pin_to_cpu(&mut self, cpu: usize) {
        self.pin = Some(cpu);
    }

    /// Tells `readiness` when the loop has made its first pass (polled and
    /// drained its socket once): what `/readyz` and systemd's `READY=1`
    /// wait for.
    pub fn report_readiness(&mut self, readiness: Readiness) {
        self.readiness = Some(readiness);
    }

    /// The service, to attach things to it before the loop runs.
    pub fn service_mut(&mut self) -> &mut S {
        &mut self.service
    }

    /// Runs until a [`ShutdownHandle`] stops it; then lets the service say
    /// goodbye, flushes the metrics and returns.
    pub fn run(mut self) -> Result<(), Error> {
        if let Some(cpu) = self.pin {
            pin_current_thread(cpu);
        }
        self.flush();
        // Datagrams may have arrived before registration: drain first.
        let mut drained = Drained::More;
        let mut timers_pending = false;
        let mut pending = Pending::Idle;
        loop {
            let timeout = match drained {
                Drained::More => Duration::ZERO,
                _ if timers_pending || pending == Pending::More => Duration::ZERO,
                Drained::Backoff(wait) => wait.min(self.sleep_limit()),
                Drained::Empty => self.sleep_limit(),
            };
            let timeout = match pending {
                Pending::Blocked => timeout.min(BLOCKED_RETRY),
                _ => timeout,
            };
            match self.poll.poll(&mut self.events, Some(timeout)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::io("poll", e)),
            }
            let busy_since = Instant::now();
            let mut stop = false;
            let mut woken = false;
            for event in self.events.iter() {
                match event.token() {
                    // Writable alone means nothing to read: the resume
                    // below runs on every pass anyway.
                    SOCKET if event.is_readable() || !event.is_writable() => {
                        drained = Drained::More;
                    }
                    SOCKET => {}
                    WAKER => {
                        woken = true;
                        stop |= self.shutdown.requested.load(Ordering::SeqCst);
                    }
                    // Spurious events are allowed by mio's contract.
                    token => tracing::debug!("event for unknown token {token:?}"),
                }
            }
            // The wake first: a reload sent before a datagram arrived
            // applies to that datagram.
            if woken {
                let mut io = io_now(&self.socket, &self.locals, &mut self.metrics.counts);
                self.service.on_wake(&mut io);
            }
            if drained != Drained::Empty {
                drained = self.drain()?;
            }
            timers_pending = self
                .service
                .on_timer(Instant::now(), &mut self.metrics.counts);
            pending = self.resume()?;
            self.check_kernel_drops();
            let counts = &mut self.metrics.counts;
            counts.loop_seconds.push(busy_since.elapsed().as_secs_f64());
            // A loop about to sleep publishes every sample it holds (a busy
            // one, every few milliseconds: see `Metrics::flush`).
            let about_to_sleep =
                drained != Drained::More && !timers_pending && pending != Pending::More;
            if about_to_sleep {
                self.flush_all();
            } else {
                self.flush();
            }
            if let Some(readiness) = self.readiness.take() {
                readiness.loop_polled();
            }
            // A hand-over waits for the fan-outs parked here (sliced, or
            // for room in the send buffer): they go out before the state is
            // exported, or they would be lost with this process, or overtaken
            // by the new one. Nothing is read meanwhile; if the buffer stays
            // full the hand-over times out and this loop resumes.
            let finishing = pending != Pending::Idle && self.pause_pending();
            if finishing {
                drained = Drained::Empty;
            } else if let Some(attempt) = self.pause_requested() {
                match self.paused(attempt) {
                    Unpaused::Resume => {
                        // Whatever arrived meanwhile is in the queue, and
                        // its readiness edge may be gone: read.
                        drained = Drained::More;
                        continue;
                    }
                    Unpaused::Exit => {
                        self.flush_all();
                        return Ok(());
                    }
                }
            }
            if stop {
                let mut io = io_now(&self.socket, &self.locals, &mut self.metrics.counts);
                self.service.shutdown(&mut io);
                self.flush_all();
                return Ok(());
            }
        }
    }

    /// Lets the service resume its parked work, and registers WRITABLE
    /// interest exactly while that work waits for the send buffer.
    /// Re-registering also re-arms the edge: a socket writable by then is
    /// reported at once, so no wake-up is lost between EAGAIN and here.
    fn resume(&mut self) -> Result<Pending, Error> {
        let mut io = io_now(&self.socket, &self.locals, &mut self.metrics.counts);
        let pending = self.service.resume(&mut io);
        let want = pending == Pending::Blocked;
        if want != self.writable {
            let interest = if want {
                Interest::READABLE | Interest::WRITABLE
            } else {
                Interest::READABLE
            };
            self.poll
                .registry()
                .reregister(&mut self.socket, SOCKET, interest)
                .map_err(|e| Error::io("register socket", e))?;
            self.writable = want;
        }
        Ok(pending)
    }

    /// How long poll may sleep: until the next timer or drop-counter check.
    fn sleep_limit(&self) -> Duration {
        let check = KERNEL_DROPS_INTERVAL.saturating_sub(self.kernel_drops_checked.elapsed());
        match self.service.next_timer() {
            Some(at) => at.saturating_duration_since(Instant::now()).min(check),
            None => check,
        }
    }

    /// Reads and handles datagrams until `WouldBlock`, the per-pass cap,
    /// or a failed read.
    fn drain(&mut self) -> Result<Drained, Error> {
        self.drain_with(|batch, fd| batch.recv(fd))
    }

    /// [`drain`](Self::drain) with the read itself passed in, so the error
    /// path can be tested with a failing one.
    fn drain_with(
        &mut self,
        mut read: impl FnMut(&mut RecvBatch, BorrowedFd<'_>) -> io::Result<usize>,
    ) -> Result<Drained, Error> {
        for _ in 0..MAX_BATCHES_PER_PASS {
            // A hand-over waits for no more than the batch in hand: a
            // pass of big fan-outs under a closed loop can last seconds.
            if self.pause_pending() {
                return Ok(Drained::More);
            }
            match read(&mut self.recv, self.socket.as_fd()) {
                Ok(n) => {
                    self.recv_errors.success();
                    self.handle_batch(n);
                    self.flush();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.recv_errors.success();
                    return Ok(Drained::Empty);
                }
                Err(e) => {
                    self.metrics.counts.recv_errors += 1;
                    return self.recv_errors.failure(e).map(Drained::Backoff);
                }
            }
        }
        Ok(Drained::More)
    }

    fn handle_batch(&mut self, n: usize) {
        let EventLoop {
            recv,
            locals,
            metrics,
            service,
            socket,
            kernel_drops_seen,
            ..
        } = self;
        // On a wildcard address: each datagram's local address as a tag,
        // first, since the sends below borrow the table.
        let mut tags = [0u8; RECV_BATCH];
        if let Some(locals) = locals.as_mut() {
            for (i, tag) in tags.iter_mut().enumerate().take(n) {
                if let Some(local) = recv.get(i).local {
                    *tag = locals.tag(local).unwrap_or_else(|| {
                        metrics.counts.local_addr_overflow += 1;
                        0
                    });
                }
            }
        }
        let tagged = locals.is_some();
        let mut io = io_now(socket, locals, &mut metrics.counts);
        io.counts.batch_sizes.push(n as f64);
        for i in 0..n {
            let d = recv.get(i);
            if let Some(total) = d.kernel_drops {
                observe_kernel_drops(kernel_drops_seen, total, io.counts);
            }
            let source = match (d.source, tagged) {
                (Some(source), true) => Some(source.with_local(tags.get(i).copied().unwrap_or(0))),
                (source, _) => source,
            };
            let arrival = Arrival {
                data: d.data,
                source,
                truncated: d.truncated,
            };
            service.handle(arrival, &mut io);
        }
        service.end_batch(&mut io);
    }

    /// Reads the drop counter with SO_MEMINFO, at most once per interval.
    fn check_kernel_drops(&mut self) {
        if self.kernel_drops_checked.elapsed() < KERNEL_DROPS_INTERVAL {
            return;
        }
        self.kernel_drops_checked = Instant::now();
        if let Ok(total) = batch_io::socket_drops(self.socket.as_fd()) {
            observe_kernel_drops(&mut self.kernel_drops_seen, total, &mut self.metrics.counts);
        }
    }

    fn flush(&mut self) {
        self.metrics
            .flush(self.service.clients(), self.service.rooms());
    }

    /// [`flush`](Self::flush), histogram samples included whatever their
    /// age: before the loop sleeps, hands over or stops.
    fn flush_all(&mut self) {
        self.metrics
            .flush_all(self.service.clients(), self.service.rooms());
    }
}

/// What a service call gets: the socket, the send sources, the counts,
/// and the time now.
fn io_now<'a>(
    socket: &'a mio::net::UdpSocket,
    locals: &'a Option<LocalAddrs>,
    counts: &'a mut Counts,
) -> Io<'a> {
    Io {
        fd: socket.as_fd(),
        sources: sources(locals),
        counts,
        received_at: Instant::now(),
        unix_secs: unix_now(),
    }
}

/// The control messages sends attach: none without a table.
fn sources(locals: &Option<LocalAddrs>) -> &[SourceControl] {
    locals.as_ref().map_or(&[], LocalAddrs::sources)
}

/// Counts the growth of the kernel's cumulative (wrapping u32) drop counter.
/// A value older than one already seen (a datagram stamped before the last
/// SO_MEMINFO read) looks like a huge jump: ignored.
fn observe_kernel_drops(seen: &mut u32, total: u32, counts: &mut Counts) {
    let new = total.wrapping_sub(*seen);
    if new > 0 && new < 1 << 31 {
        counts.kernel_rx_dropped += u64::from(new);
        *seen = total;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::socket;

    /// A service that counts every datagram as a message.
    struct Counter;

    impl Service for Counter {
        fn handle(&mut self, _arrival: Arrival<'_>, io: &mut Io<'_>) {
            io.counts.messages += 1;
        }
    }

    fn test_loop() -> EventLoop<Counter> {
        let bound = socket::bind(
            "127.0.0.1:0".parse().unwrap(),
            "test socket",
            4096,
            4096,
            false,
        )
        .unwrap();
        EventLoop::new(bound, 64, Counter).unwrap()
    }

    /// A read that keeps failing backs the loop off (never "more work, don't
    /// wait"), counts each failure, keeps the count across passes, and ends
    /// the loop after MAX_RECV_ERRORS in a row.
    #[test]
    fn persistent_read_errors_back_off_and_eventually_stop_the_loop() {
        let mut lp = test_loop();
        let failing =
            |_: &mut RecvBatch, _: BorrowedFd<'_>| Err(io::Error::from_raw_os_error(libc::ENOMEM));
        let mut waits = Vec::new();
        for _ in 1..MAX_RECV_ERRORS {
            match lp.drain_with(failing) {
                Ok(Drained::Backoff(d)) => waits.push(d),
                other => panic!("expected a back-off, got {other:?}"),
            }
        }
        assert!(waits.iter().all(|d| *d >= Duration::from_millis(1)));
        assert_eq!(waits.last(), Some(&MAX_RECV_BACKOFF));
        assert_eq!(
            lp.metrics.counts.recv_errors,
            u64::from(MAX_RECV_ERRORS) - 1
        );
        let err = lp.drain_with(failing).unwrap_err();
        assert!(err.to_string().contains("recvmmsg keeps failing"), "{err}");
    }

    /// A successful read ends a run of failures.
    #[test]
    fn a_successful_read_resets_the_failure_run() {
        let mut lp = test_loop();
        let failing =
            |_: &mut RecvBatch, _: BorrowedFd<'_>| Err(io::Error::from_raw_os_error(libc::ENOMEM));
        for _ in 1..MAX_RECV_ERRORS {
            lp.drain_with(failing).unwrap();
        }
        let empty =
            |_: &mut RecvBatch, _: BorrowedFd<'_>| Err(io::Error::from(io::ErrorKind::WouldBlock));
        assert_eq!(lp.drain_with(empty).unwrap(), Drained::Empty);
        assert_eq!(
            lp.drain_with(failing).unwrap(),
            Drained::Backoff(Duration::from_millis(1))
        );
    }

    /// The per-pass cap leaves work for the next pass instead of starving
    /// timers.
    #[test]
    fn a_flood_is_read_in_capped_passes() {
        let mut lp = test_loop();
        let mut calls = 0;
        let endless = |_: &mut RecvBatch, _: BorrowedFd<'_>| {
            calls += 1;
            Ok(0)
        };
        assert_eq!(lp.drain_with(endless).unwrap(), Drained::More);
        assert_eq!(calls, MAX_BATCHES_PER_PASS);
    }

    /// A loop that pauses only after its attempt timed out and was told
    /// to resume skips that attempt's stale `Resume` and `Export`: it
    /// serves the later attempt it paused for, and resumes or exits on
    /// that attempt's word alone.
    #[test]
    fn a_late_pause_skips_an_earlier_attempts_commands() {
        let mut lp = test_loop();
        let (reports_tx, reports) = std::sync::mpsc::channel();
        let handle = lp.pause_handle(0, reports_tx);
        // Attempt 1: the loop never got to pause; the supervisor gave up.
        handle.pause();
        handle.command(PauseCommand::Export);
        handle.command(PauseCommand::Resume);
        // Attempt 2, before the loop looked.
        handle.pause();
        let attempt = lp.pause_requested().expect("a pause asked");
        handle.command(PauseCommand::Exit);
        assert!(matches!(lp.paused(attempt), Unpaused::Exit));
        // It reported its pause, and exported nothing for attempt 1.
        assert!(matches!(reports.try_recv(), Ok(PauseReport::Paused(0))));
        assert!(reports.try_recv().is_err());
        assert_eq!(lp.pause_requested(), None);
    }

    #[test]
    fn kernel_drop_counter_deltas() {
        let mut counts = Counts::default();
        let mut seen = 0;
        observe_kernel_drops(&mut seen, 5, &mut counts);
        observe_kernel_drops(&mut seen, 3, &mut counts); // stale stamp
        observe_kernel_drops(&mut seen, 5, &mut counts);
        observe_kernel_drops(&mut seen, 9, &mut counts);
        assert_eq!(counts.kernel_rx_dropped, 9);
        let mut seen = u32::MAX - 1;
        observe_kernel_drops(&mut seen, 2, &mut counts); // wrapped
        assert_eq!(counts.kernel_rx_dropped, 13);
    }
}
