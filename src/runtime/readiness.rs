//! What the relay is doing, for the probes: `/healthz` (are the loops
//! running?) and `/readyz` (is it serving?) on the metrics listener, and
//! systemd's `READY=1`/`STOPPING=1` ([`crate::runtime::notify`]).
//!
//! One small shared state per process, set by whoever knows: the
//! supervisor (loops started, loops ended, shutting down), each loop (its
//! first pass is done), and the hand-over (it starts, it ends). Everything
//! in it is an atomic read by the metrics thread, so a probe never waits
//! on a loop nor a loop on a probe.
//!
//! The phases, in order:
//!
//! | phase | `/healthz` | `/readyz` |
//! | --- | --- | --- |
//! | [`Phase::Starting`]: bound, loops not yet through their first pass | 200 once every loop thread runs | 503 |
//! | [`Phase::Serving`]: every loop has polled and drained once | 200 | 200 |
//! | [`Phase::HandingOver`]: a `--takeover` is under way | 200 | 503 |
//! | [`Phase::ShuttingDown`]: a signal, or the hand-over succeeded | 200 until the loops end | 503 |
//!
//! `/healthz` is 503 whenever a loop thread has ended (or none started):
//! a liveness probe then restarts a relay whose loop died.

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;

use crate::runtime::notify::Notifier;

/// Where the relay is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// Started, not yet serving: the loops have not all made their first
    /// pass.
    Starting = 0,
    /// Every loop is reading its socket.
    Serving = 1,
    /// The sockets and state are being handed to a new process
    /// (`--takeover`): the loops stopped reading at a batch boundary.
    HandingOver = 2,
    /// Going away: saying `bye`, or exiting after a hand-over.
    ShuttingDown = 3,
}

impl Phase {
    fn from_u8(v: u8) -> Phase {
        match v {
            0 => Phase::Starting,
            1 => Phase::Serving,
            2 => Phase::HandingOver,
            _ => Phase::ShuttingDown,
        }
    }

    /// The phase in one word, as `/readyz` says it.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Serving => "serving",
            Phase::HandingOver => "handing_over",
            Phase::ShuttingDown => "shutting_down",
        }
    }
}

/// The shared state (cheap to clone: one `Arc`).
#[derive(Debug, Clone)]
pub struct Readiness(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    /// A [`Phase`].
    phase: AtomicU8,
    /// Loops the relay runs (`--threads`); 0 until the supervisor knows.
    loops: AtomicUsize,
    /// Loops through their first pass (poll, drain).
    polled: AtomicUsize,
    /// Loop threads started.
    started: AtomicUsize,
    /// Loop threads ended (returned, failed or panicked).
    ended: AtomicUsize,
    /// systemd, told `READY=1` on serving, `STOPPING=1` on a shutdown and
    /// `MAINPID=` on a hand-over.
    notifier: Notifier,
}

impl Default for Readiness {
    fn default() -> Readiness {
        Readiness::new(Notifier::none())
    }
}

impl Readiness {
    /// A relay that is starting and runs no loop yet; `notifier` is told
    /// when it serves and when it goes away.
    pub fn new(notifier: Notifier) -> Readiness {
        Readiness(Arc::new(Inner {
            phase: AtomicU8::new(Phase::Starting as u8),
            loops: AtomicUsize::new(0),
            polled: AtomicUsize::new(0),
            started: AtomicUsize::new(0),
            ended: AtomicUsize::new(0),
            notifier,
        }))
    }

    /// The phase now.
    pub fn phase(&self) -> Phase {
        Phase::from_u8(self.0.phase.load(Ordering::Acquire))
    }

    /// The supervisor is about to start `n` loops.
    pub fn expect_loops(&self, n: usize) {
        self.0.loops.store(n, Ordering::Release);
    }

    /// A loop thread started (the supervisor, as it spawns it).
    pub fn loop_started(&self) {
        self.0.started.fetch_add(1, Ordering::AcqRel);
    }

    /// A loop thread ended, however (the supervisor's exit guard).
    pub fn loop_ended(&self) {
        self.0.ended.fetch_add(1, Ordering::AcqRel);
    }

    /// A loop finished its first pass (it polled and drained its socket
    /// once). The last of them moves [`Phase::Starting`] to
    /// [`Phase::Serving`], tells systemd `READY=1` and returns true (once
    /// per process).
    pub fn loop_polled(&self) -> bool {
        let polled = self.0.polled.fetch_add(1, Ordering::AcqRel) + 1;
        let serving = polled >= self.0.loops.load(Ordering::Acquire)
            && self.move_phase(Phase::Starting, Phase::Serving);
        if serving {
            tracing::info!(
                event = "serving",
                "serving: every loop is reading its socket"
            );
            self.0.notifier.ready();
        }
        serving
    }

    /// **The hand-over starts** (call it before the loops stop reading):
    /// `/readyz` says 503 from now on. Returns false, changing nothing,
    /// unless the relay was serving (a hand-over needs one that serves,
    /// and never undoes a shutdown).
    pub fn hand_over_started(&self) -> bool {
        self.move_phase(Phase::Serving, Phase::HandingOver)
    }

    /// **The hand-over ended**: `resumed` — it failed or was refused, the
    /// loops read again: serving; otherwise the new process serves and
    /// this one is going away: shutting down (systemd is told nothing:
    /// see [`handed_over`](Self::handed_over)). Does nothing unless a
    /// hand-over was under way.
    pub fn hand_over_ended(&self, resumed: bool) {
        let to = if resumed {
            Phase::Serving
        } else {
            Phase::ShuttingDown
        };
        self.move_phase(Phase::HandingOver, to);
    }

    /// The sockets and members went to `successor` (its pid, if known),
    /// which serves now: this process is going away, not ready from now
    /// on. systemd is told `MAINPID=<successor>` — before this process
    /// exits, so that it follows the service's new main process rather
    /// than take the service for ended — and never `STOPPING=1` (that
    /// would stop the service, the successor with it).
    pub fn handed_over(&self, successor: Option<u32>) {
        self.0
            .phase
            .store(Phase::ShuttingDown as u8, Ordering::Release);
        if let Some(pid) = successor {
            self.0.notifier.notify(&format!("MAINPID={pid}"));
        }
    }

    /// The relay is shutting down (a signal): not ready from now on;
    /// systemd is told `STOPPING=1` (once).
    pub fn shutting_down(&self) {
        let was = self
            .0
            .phase
            .swap(Phase::ShuttingDown as u8, Ordering::AcqRel);
        if was != Phase::ShuttingDown as u8 {
            self.0.notifier.notify("STOPPING=1");
        }
    }

    /// `/healthz`: every loop thread the relay runs has started and none
    /// has ended.
    pub fn healthy(&self) -> bool {
        let loops = self.0.loops.load(Ordering::Acquire);
        loops > 0
            && self.0.started.load(Ordering::Acquire) >= loops
            && self.0.ended.load(Ordering::Acquire) == 0
    }

    /// `/readyz`: serving, healthy, and no hand-over under way
    /// ([`crate::runtime::handover::in_progress`]: the old process's loops
    /// are paused, or the new one has not confirmed yet).
    pub fn ready(&self) -> bool {
        self.phase() == Phase::Serving && self.healthy() && !crate::runtime::handover::in_progress()
    }

    fn move_phase(&self, from: Phase, to: Phase) -> bool {
        self.0
            .phase
            .compare_exchange(from as u8, to as u8, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_once_every_loop_has_polled() {
        let r = Readiness::default();
        assert!(!r.healthy() && !r.ready());
        r.expect_loops(2);
        r.loop_started();
        assert!(!r.healthy());
        r.loop_started();
        assert!(r.healthy() && !r.ready());
        assert!(!r.loop_polled());
        assert_eq!(r.phase(), Phase::Starting);
        assert!(r.loop_polled());
        assert!(r.ready());
        // Told once.
        assert!(!r.loop_polled());
    }

    #[test]
    fn a_hand_over_is_not_ready_and_ends_in_either_phase() {
        let r = Readiness::default();
        r.expect_loops(1);
        r.loop_started();
        assert!(!r.hand_over_started(), "not serving yet");
        r.loop_polled();
        assert!(r.hand_over_started());
        assert_eq!(r.phase(), Phase::HandingOver);
        assert!(!r.ready() && r.healthy());
        r.hand_over_ended(true);
        assert!(r.ready());
        assert!(r.hand_over_started());
        r.hand_over_ended(false);
        assert_eq!(r.phase(), Phase::ShuttingDown);
        // A late "resumed" never undoes a shutdown.
        r.hand_over_ended(true);
        assert_eq!(r.phase(), Phase::ShuttingDown);
        assert!(!r.hand_over_started());
    }

    /// After a hand-over systemd hears the successor's pid, and never
    /// STOPPING=1 (not even from a signal while this process exits).
    #[test]
    fn a_hand_over_names_the_successor_and_never_says_stopping() {
        let dir = std::env::temp_dir().join(format!("udphub-readiness-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        let r = Readiness::new(Notifier::at(&path));
        r.expect_loops(1);
        r.loop_started();
        assert!(r.loop_polled());
        assert!(r.hand_over_started());
        r.handed_over(Some(4242));
        assert_eq!(r.phase(), Phase::ShuttingDown);
        assert!(!r.ready());
        r.shutting_down();
        listener.set_nonblocking(true).unwrap();
        let mut notes = Vec::new();
        let mut buf = [0u8; 64];
        while let Ok(n) = listener.recv(&mut buf) {
            notes.push(String::from_utf8_lossy(&buf[..n]).to_string());
        }
        assert_eq!(notes, ["READY=1", "MAINPID=4242"]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_loop_that_ends_makes_the_relay_unhealthy() {
        let r = Readiness::default();
        r.expect_loops(1);
        r.loop_started();
        r.loop_polled();
        assert!(r.ready());
        r.shutting_down();
        assert!(!r.ready() && r.healthy());
        r.loop_ended();
        assert!(!r.healthy());
    }
}
