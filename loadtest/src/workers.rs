//! `fanout --threads N`: the worker threads.
//!
//! Each worker owns one [`Engine`]: its share of the clients (their
//! sockets, one mio poll) and its receivers' stream state, so loss,
//! duplicates, reordering and cross-room deliveries are counted exactly
//! where they arrive, and it sends for the senders among its clients.
//! What the workers must agree on crosses in atomics: the run's totals,
//! which the closed-loop window and the drain read, and the phase (sending,
//! then the drain once the main thread says go). Each worker closes its
//! timeline intervals itself and hands their histograms to the main thread,
//! which merges them into the timeline and the progress bar.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::fanout::Engine;
use crate::procfs;

/// What every worker is told to do.
pub struct Plan {
    /// Open loop: the run's total messages per second.
    pub rate: Option<f64>,
    /// Closed loop: messages in flight per sender.
    pub window: u64,
    /// Recipients per message (the largest, with rooms).
    pub per_message: u64,
    /// Senders in the run.
    pub senders: u64,
    /// How long to send, from the shared start.
    pub send_until: Duration,
    /// `--messages` for the whole run (`u64::MAX`: none).
    pub max_messages: u64,
    /// Timeline interval.
    pub interval: Duration,
    /// A `--flood` member ran: read its last deliveries before the drain.
    pub flood: bool,
    /// How long to wait for stragglers after sending (zero: none).
    pub drain: Duration,
    /// `--pin-threads`: worker `t` runs on the `t`-th core this process may
    /// use (wrapping around).
    pub pin: bool,
}

/// One worker's running counters, published for the others.
#[derive(Default)]
struct Slot {
    delivered: AtomicU64,
    expected: AtomicU64,
    sent: AtomicU64,
}

/// What the workers and the main thread share.
pub struct Shared {
    slots: Vec<Slot>,
    /// Workers past their sending phase (finished or failed).
    pub done_sending: AtomicUsize,
    /// The main thread's go for the drain (after a `--flood` member's end).
    pub drain: AtomicBool,
    /// A worker failed: the others stop sending.
    stop: AtomicBool,
    /// Some worker's client heard the relay's `bye`.
    bye: AtomicBool,
}

impl Shared {
    /// Counters for `workers` workers.
    pub fn new(workers: usize) -> Shared {
        Shared {
            slots: (0..workers).map(|_| Slot::default()).collect(),
            done_sending: AtomicUsize::new(0),
            drain: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            bye: AtomicBool::new(false),
        }
    }

    /// Deliveries received so far, all workers.
    pub fn delivered(&self) -> u64 {
        self.sum(|s| &s.delivered)
    }

    /// Deliveries the messages sent so far call for, all workers.
    pub fn expected(&self) -> u64 {
        self.sum(|s| &s.expected)
    }

    /// Whether every worker has stopped sending.
    pub fn all_done_sending(&self) -> bool {
        self.done_sending.load(Ordering::SeqCst) >= self.slots.len()
    }

    fn sum(&self, field: impl Fn(&Slot) -> &AtomicU64) -> u64 {
        self.slots
            .iter()
            .map(|s| field(s).load(Ordering::Relaxed))
            .sum()
    }

    fn publish(&self, me: usize, e: &Engine) {
        let slot = &self.slots[me];
        slot.delivered.store(e.delivered, Ordering::Relaxed);
        slot.expected.store(e.expected(), Ordering::Relaxed);
        slot.sent.store(e.messages_sent(), Ordering::Relaxed);
        if e.bye {
            self.bye.store(true, Ordering::Relaxed);
        }
    }
}

/// One closed timeline interval of one worker.
pub struct Interval {
    /// Which interval (0, 1, …): the same schedule on every worker.
    pub index: u64,
    /// When the worker closed it, since the shared start.
    pub t: Duration,
    /// New deliveries in it.
    pub delivered: u64,
    /// Their latencies.
    pub latency: Histogram<u64>,
}

/// A worker's engine and figures, once it is done.
pub struct Finished {
    /// Its clients (for the quits) and counters.
    pub engine: Engine,
    /// When it stopped sending, since the shared start.
    pub sending_time: Duration,
    /// Its deliveries by then.
    pub delivered_while_sending: u64,
    /// Its CPU while sending as a fraction of one core (`None`: too short
    /// a phase for the kernel's 10 ms CPU clock, or no `/proc`).
    pub busy: Option<f64>,
    /// The fraction of its sending time it was runnable but waited for a
    /// core (a machine busy with others, or the relay).
    pub waiting: Option<f64>,
}

/// Runs one worker: sends and receives until the run's end, then drains.
/// On failure the others are told to stop sending.
pub fn drive(
    mut e: Engine,
    me: usize,
    plan: &Plan,
    shared: &Shared,
    intervals: &Sender<Interval>,
) -> Result<Finished, String> {
    if plan.pin {
        if let Err(err) = pin(me) {
            // The run is still worth having, unpinned: say so.
            eprintln!("loadtest: warning: --pin-threads: worker {me} not pinned: {err}");
        }
    }
    let sending = send_phase(&mut e, me, plan, shared, intervals);
    // Counted whatever happened: the main thread waits for every worker.
    shared.done_sending.fetch_add(1, Ordering::SeqCst);
    let Sent {
        time: sending_time,
        delivered: delivered_while_sending,
        busy,
        waiting,
    } = match sending {
        Ok(s) => s,
        Err(err) => {
            shared.stop.store(true, Ordering::SeqCst);
            return Err(err);
        }
    };
    drain_phase(&mut e, me, plan, shared).inspect_err(|_| {
        shared.stop.store(true, Ordering::SeqCst);
    })?;
    Ok(Finished {
        engine: e,
        sending_time,
        delivered_while_sending,
        busy,
        waiting,
    })
}

/// Pins the calling thread to the `t`-th of the cores this process may
/// run on (wrapping around), as `udphub --pin-threads` pins its loops.
fn pin(t: usize) -> Result<usize, String> {
    use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
    use nix::unistd::Pid;
    let allowed = sched_getaffinity(Pid::from_raw(0)).map_err(|e| e.to_string())?;
    let cores: Vec<usize> = (0..CpuSet::count())
        .filter(|&c| allowed.is_set(c).unwrap_or(false))
        .collect();
    let core = *cores
        .get(t % cores.len().max(1))
        .ok_or("no core in this process's affinity mask")?;
    let mut set = CpuSet::new();
    set.set(core).map_err(|e| e.to_string())?;
    sched_setaffinity(Pid::from_raw(0), &set).map_err(|e| e.to_string())?;
    Ok(core)
}

/// The shortest sending phase whose CPU share is worth reporting: the
/// kernel's CPU clock ticks every 10 ms.
const BUSY_MIN_WALL: Duration = Duration::from_millis(500);

/// A worker's sending phase, as [`Finished`] reports it.
struct Sent {
    time: Duration,
    delivered: u64,
    busy: Option<f64>,
    waiting: Option<f64>,
}

fn send_phase(
    e: &mut Engine,
    me: usize,
    plan: &Plan,
    shared: &Shared,
    intervals: &Sender<Interval>,
) -> Result<Sent, String> {
    let wall0 = Instant::now();
    let cpu0 = procfs::thread_cpu_seconds();
    let delay0 = procfs::thread_run_delay_seconds();
    let my_max = e.share_of(plan.max_messages);
    let my_rate = plan
        .rate
        .map(|r| r * e.local_senders() as f64 / plan.senders.max(1) as f64);
    let mut next_point = plan.interval;
    let mut index = 0u64;
    let mut last_progress = (Instant::now(), 0u64);
    loop {
        let t = e.elapsed();
        if t >= next_point {
            let (delivered, latency) = e.take_interval();
            // The main thread gone means the run is over anyway.
            let _ = intervals.send(Interval {
                index,
                t,
                delivered,
                latency,
            });
            index += 1;
            next_point += plan.interval;
        }
        shared.publish(me, e);
        let sending = t < plan.send_until
            && shared.sum(|s| &s.sent) < plan.max_messages
            && !shared.bye.load(Ordering::Relaxed)
            && !shared.stop.load(Ordering::Relaxed);
        if !sending {
            break;
        }
        let wait = match my_rate {
            Some(rate) => {
                // Open loop: the schedule says how many should be out by now.
                let due = (t.as_secs_f64() * rate) as u64;
                let mut n = 0;
                while e.messages_sent() < due.min(my_max) && n < 64 {
                    e.send_one().map_err(|e| e.to_string())?;
                    n += 1;
                }
                Duration::from_micros(200)
            }
            None => {
                let expected = shared.sum(|s| &s.expected);
                let delivered = shared.delivered();
                let outstanding = expected - delivered.min(expected);
                let stalled = last_progress.0.elapsed() > Duration::from_millis(200);
                if e.local_senders() > 0
                    && e.messages_sent() < my_max
                    && (outstanding < plan.window * plan.per_message * plan.senders || stalled)
                {
                    e.send_one().map_err(|e| e.to_string())?;
                    if stalled {
                        last_progress = (Instant::now(), delivered);
                    }
                    Duration::ZERO
                } else {
                    Duration::from_millis(5)
                }
            }
        };
        e.step(wait).map_err(|e| e.to_string())?;
        shared.publish(me, e);
        let delivered = shared.delivered();
        if delivered != last_progress.1 {
            last_progress = (Instant::now(), delivered);
        }
    }
    let wall = wall0.elapsed();
    let share = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if wall >= BUSY_MIN_WALL => Some((b - a) / wall.as_secs_f64()),
        _ => None,
    };
    let busy = share(cpu0, procfs::thread_cpu_seconds());
    let waiting = share(delay0, procfs::thread_run_delay_seconds());
    Ok(Sent {
        time: e.elapsed(),
        delivered: e.delivered,
        busy,
        waiting,
    })
}

/// With another run's messages arriving (a concurrent run in our rooms),
/// the drain goes on until none came for this long, so that the relay's
/// deliveries to us are read and counted (within the drain's bound).
const FOREIGN_SETTLE: Duration = Duration::from_millis(100);

/// How long a worker waits for the main thread's go (it ends a `--flood`
/// member first, a fraction of a second) before giving up.
const DRAIN_GO_LIMIT: Duration = Duration::from_secs(30);

fn drain_phase(e: &mut Engine, me: usize, plan: &Plan, shared: &Shared) -> Result<(), String> {
    let give_up = Instant::now() + DRAIN_GO_LIMIT;
    while !shared.drain.load(Ordering::SeqCst) {
        if shared.stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        if Instant::now() >= give_up {
            return Err("the other workers never finished sending".into());
        }
        e.step(Duration::from_millis(10))
            .map_err(|e| e.to_string())?;
        shared.publish(me, e);
    }
    if plan.flood {
        // The flood's last deliveries to the clients are no message of
        // ours: read them here, as the drain below stops at our own.
        let until = Instant::now() + Duration::from_millis(200);
        while Instant::now() < until {
            e.step(Duration::from_millis(10))
                .map_err(|e| e.to_string())?;
        }
        shared.publish(me, e);
    }
    // Stragglers for up to `plan.drain`, until the run has all it expects
    // and (with a concurrent run in our rooms) that run's messages stopped
    // coming (a solo run never hears one, and drains exactly as before).
    let drain_until = Instant::now() + plan.drain;
    let mut foreign = (e.foreign, Instant::now());
    while (shared.delivered() < shared.expected()
        || (e.foreign > 0 && foreign.1.elapsed() < FOREIGN_SETTLE))
        && Instant::now() < drain_until
        && !e.bye
    {
        e.step(Duration::from_millis(10))
            .map_err(|e| e.to_string())?;
        shared.publish(me, e);
        if e.foreign != foreign.0 {
            foreign = (e.foreign, Instant::now());
        }
    }
    Ok(())
}

/// Runs `engines` (whose start is already set), one worker thread each, to
/// the end of the drain. Meanwhile the calling thread hands each closed
/// interval to `interval`, calls `tick` every few milliseconds (sampling,
/// progress), and once every worker has stopped sending calls
/// `before_drain` (e.g. ends a `--flood` member) and lets them drain.
/// Returns the workers in order, or the first failure.
pub fn run_all(
    engines: Vec<Engine>,
    plan: &Plan,
    shared: &Shared,
    mut interval: impl FnMut(Interval),
    mut tick: impl FnMut(&Shared),
    before_drain: impl FnOnce(),
) -> Result<Vec<Finished>, String> {
    let (tx, rx) = mpsc::channel::<Interval>();
    let results: Vec<Result<Finished, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = engines
            .into_iter()
            .enumerate()
            .map(|(me, e)| {
                let tx = tx.clone();
                std::thread::Builder::new()
                    .name(format!("loadtest-{me}"))
                    .spawn_scoped(s, move || drive(e, me, plan, shared, &tx))
            })
            .collect();
        drop(tx);
        let mut before_drain = Some(before_drain);
        // The channel closes when the last worker ends.
        loop {
            match rx.recv_timeout(Duration::from_millis(20)) {
                Ok(iv) => interval(iv),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            tick(shared);
            if shared.all_done_sending() {
                if let Some(f) = before_drain.take() {
                    f();
                    shared.drain.store(true, Ordering::SeqCst);
                }
            }
        }
        handles
            .into_iter()
            .map(|h| match h {
                Ok(h) => h
                    .join()
                    .unwrap_or_else(|_| Err("a worker thread panicked".into())),
                Err(e) => Err(format!("start a worker thread: {e}")),
            })
            .collect()
    });
    results.into_iter().collect()
}
