//! The newcomers of `abuse --spoof --newcomers K`: real clients on
//! 127.0.0.1 that arrive while the flood runs and try to get into a relay
//! in verify mode the way a client does, all driven by one mio poll loop on
//! their own thread.
//!
//! Each one, from its start: sends the 64-byte `^hello^`; when the cookie
//! (`^cookie^C`) comes, sends back at once the proven join to the lobby,
//! `^cookie^C^join^` padded to 32 bytes: it registers the newcomer, and
//! the relay answers it `^room^` — the answer is the proof it got in, and
//! the moment it arrives is when the newcomer counts as admitted. (Not the
//! `^timeout^` question: in verify mode a member's question carries no
//! proof and goes unanswered.) Whatever is unanswered is repeated every
//! `--retry`: the `^hello^` while it has no cookie, the proven join once it
//! has one (a join of the room one is in is answered again). A newcomer still outside `--give-up` after its
//! first `^hello^` gives up. An admitted newcomer stays a member while the
//! flood lasts: it sends its proof, the proven heartbeat, every second.
//!
//! Not an echoed message as the proof: a message fans out to every
//! admitted newcomer (K² deliveries), and a relay with `--no-echo` sends
//! none back.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token};

use crate::member::hello;

/// An admitted newcomer's proven heartbeat (`^cookie^C`) interval: well
/// inside any `--timeout` (10 s by default), so that even a flood that
/// drops most of them in the relay's queue does not expire it.
const HEARTBEAT: Duration = Duration::from_secs(1);

/// When the newcomers come and how patient they are.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    /// How many.
    pub count: u32,
    /// Their starts are spread evenly over this window from the flood's
    /// start (newcomer i of K at (i+1)/(K+1) of it).
    pub window: Duration,
    /// An unanswered `^hello^` or proof is repeated after this long.
    pub retry: Duration,
    /// A newcomer not admitted this long after its first `^hello^` gives up.
    pub give_up: Duration,
}

/// What happened to one newcomer.
#[derive(Debug, Clone, Copy, Default)]
pub struct Outcome {
    /// When it started, after the flood's start.
    pub started_after: Duration,
    /// Its first `^hello^` to the relay's `^timeout^` answer; None: it gave
    /// up (or the run ended first).
    pub admitted_after: Option<Duration>,
    /// `^hello^`s sent.
    pub hellos: u32,
    /// Cookies received.
    pub cookies: u32,
    /// Proven joins (`^cookie^C^join^`) sent.
    pub proofs: u32,
    /// Proven heartbeats sent after admission.
    pub heartbeats: u32,
    /// Datagrams sent in all (the leave not included).
    pub datagrams_sent: u64,
    /// Sends the kernel refused.
    pub send_errors: u64,
}

/// One newcomer.
struct Newcomer {
    sock: mio::net::UdpSocket,
    /// Its first `^hello^` is due then.
    start: Instant,
    /// The next repeat (or, once admitted, heartbeat) is due then.
    next: Instant,
    /// `^cookie^C` as the relay gave it.
    proof: Option<Vec<u8>>,
    outcome: Outcome,
    /// Admitted or given up.
    finished: bool,
}

impl Newcomer {
    fn send(&mut self, data: &[u8]) {
        self.outcome.datagrams_sent += 1;
        if self.sock.send(data).is_err() {
            // A full socket buffer or a refusal (the relay gone): the
            // repeat tries again, as a client's would.
            self.outcome.send_errors += 1;
        }
    }

    /// The next try: the `^hello^`, or the proven join to the lobby.
    fn try_again(&mut self, now: Instant, retry: Duration) {
        match self.proof.take() {
            None => {
                self.send(&hello());
                self.outcome.hellos += 1;
            }
            Some(proof) => {
                let mut join = [proof.as_slice(), b"^join^"].concat();
                join.resize(join.len().max(32), b' ');
                self.send(&join);
                self.outcome.proofs += 1;
                self.proof = Some(proof);
            }
        }
        self.next = now + retry;
    }

    fn on_datagram(&mut self, data: &[u8], now: Instant, retry: Duration) {
        if self.finished {
            return;
        }
        if data.starts_with(b"^cookie^") {
            self.outcome.cookies += 1;
            self.proof = Some(data.to_vec());
            self.try_again(now, retry);
        } else if data.starts_with(b"^room^") {
            self.outcome.admitted_after = Some(now.saturating_duration_since(self.start));
            self.finished = true;
            self.next = now + HEARTBEAT;
        }
    }

    /// Admitted: the proven heartbeat, when due; returns when the next is.
    fn heartbeat(&mut self, now: Instant) -> Option<Instant> {
        self.outcome.admitted_after?;
        if now >= self.next {
            if let Some(proof) = self.proof.take() {
                self.send(&proof);
                self.outcome.heartbeats += 1;
                self.proof = Some(proof);
            }
            self.next = now + HEARTBEAT;
        }
        Some(self.next)
    }
}

/// The newcomers, bound and waiting for their starts.
pub struct Arrivals {
    poll: Poll,
    newcomers: Vec<Newcomer>,
    schedule: Schedule,
}

impl Arrivals {
    /// Binds the newcomers' sockets (127.0.0.1, ports from the kernel,
    /// connected to the relay as udphub's own clients are) and schedules
    /// their starts from `t0`.
    pub fn bind(relay: SocketAddr, schedule: Schedule, t0: Instant) -> Result<Arrivals, String> {
        let poll = Poll::new().map_err(|e| format!("mio poll: {e}"))?;
        let mut newcomers = Vec::with_capacity(schedule.count as usize);
        for i in 0..schedule.count {
            let mut sock = mio::net::UdpSocket::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
                .map_err(|e| format!("bind a newcomer on 127.0.0.1: {e}"))?;
            sock.connect(relay)
                .map_err(|e| format!("connect a newcomer to {relay}: {e}"))?;
            poll.registry()
                .register(&mut sock, Token(i as usize), Interest::READABLE)
                .map_err(|e| format!("mio register: {e}"))?;
            let start = t0
                + schedule
                    .window
                    .mul_f64(f64::from(i + 1) / f64::from(schedule.count + 1));
            newcomers.push(Newcomer {
                sock,
                start,
                next: start,
                proof: None,
                outcome: Outcome {
                    started_after: start - t0,
                    ..Outcome::default()
                },
                finished: false,
            });
        }
        Ok(Arrivals {
            poll,
            newcomers,
            schedule,
        })
    }

    /// Runs the newcomers until `stop` is set: each tries until it is
    /// admitted (then heartbeats) or gives up; `done` is set once every
    /// one has.
    pub fn run(&mut self, done: &AtomicBool, stop: &AtomicBool) -> Result<(), String> {
        let retry = self.schedule.retry;
        let give_up = self.schedule.give_up;
        let mut events = Events::with_capacity(256);
        let mut buf = vec![0u8; 2048];
        while !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            let mut wake: Option<Instant> = None;
            let mut trying = false;
            for n in &mut self.newcomers {
                let due = if n.finished {
                    n.heartbeat(now)
                } else if now >= n.start + give_up {
                    n.finished = true;
                    None
                } else {
                    if now >= n.next {
                        n.try_again(now, retry);
                    }
                    trying = true;
                    Some(n.next.min(n.start + give_up))
                };
                if let Some(due) = due {
                    wake = Some(wake.map_or(due, |w| w.min(due)));
                }
            }
            if !trying {
                done.store(true, Ordering::Relaxed);
            }
            let wake = wake.unwrap_or(now + Duration::from_millis(50));
            // Wake at least every 50 ms to see `stop`.
            let timeout = wake
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(50));
            match self.poll.poll(&mut events, Some(timeout)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(format!("mio poll: {e}")),
            }
            for event in &events {
                let Some(n) = self.newcomers.get_mut(event.token().0) else {
                    continue;
                };
                // Edge-triggered: drain until WouldBlock (bounded, in case
                // an error repeats).
                for _ in 0..1024 {
                    match n.sock.recv(&mut buf) {
                        Ok(len) => n.on_datagram(&buf[..len], Instant::now(), retry),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        // A refusal (ICMP) from an earlier send, or EINTR.
                        Err(_) => {}
                    }
                }
            }
        }
        Ok(())
    }

    /// What happened to each newcomer.
    pub fn outcomes(&self) -> Vec<Outcome> {
        self.newcomers.iter().map(|n| n.outcome).collect()
    }

    /// Every newcomer with a cookie leaves with the proven
    /// `^cookie^C^quit` (the others were never members).
    pub fn leave(&mut self) {
        for n in &mut self.newcomers {
            if let Some(proof) = n.proof.take() {
                let _ = n.sock.send(&[proof.as_slice(), b"^quit"].concat());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::net::UdpSocket;

    /// Runs the newcomers until every one is admitted or has given up
    /// (within 10 s).
    fn run_until_done(arrivals: &mut Arrivals) {
        let (done, stop) = (AtomicBool::new(false), AtomicBool::new(false));
        std::thread::scope(|s| {
            let t = s.spawn(|| arrivals.run(&done, &stop));
            let deadline = Instant::now() + Duration::from_secs(10);
            while !done.load(Ordering::Relaxed) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            stop.store(true, Ordering::Relaxed);
            t.join().unwrap().unwrap();
        });
        assert!(done.load(Ordering::Relaxed), "the newcomers never finished");
    }

    /// A fake relay in verify mode on loopback: a cookie for every
    /// `^hello^`, `^room^` for a proven join.
    #[test]
    fn a_newcomer_is_admitted_after_hello_cookie_proof_and_answer() {
        let relay = UdpSocket::bind("127.0.0.1:0").unwrap();
        relay
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let addr = relay.local_addr().unwrap();
        let schedule = Schedule {
            count: 3,
            window: Duration::from_millis(30),
            retry: Duration::from_millis(100),
            give_up: Duration::from_secs(5),
        };
        let mut arrivals = Arrivals::bind(addr, schedule, Instant::now()).unwrap();
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut buf = [0u8; 256];
                let mut answered = HashSet::new();
                let deadline = Instant::now() + Duration::from_secs(5);
                while answered.len() < 3 && Instant::now() < deadline {
                    let Ok((n, from)) = relay.recv_from(&mut buf) else {
                        continue;
                    };
                    let d = &buf[..n];
                    if d.starts_with(b"^hello^") && n == 64 {
                        relay.send_to(b"^cookie^K1", from).unwrap();
                    } else if d.trim_ascii() == b"^cookie^K1^join^" {
                        relay.send_to(b"^room^", from).unwrap();
                        answered.insert(from);
                    }
                }
            });
            run_until_done(&mut arrivals);
        });
        for o in arrivals.outcomes() {
            assert!(o.admitted_after.is_some(), "{o:?}");
            assert_eq!((o.hellos, o.cookies, o.proofs), (1, 1, 1), "{o:?}");
            assert_eq!(o.datagrams_sent, 2);
        }
    }

    /// Nobody answers: each newcomer repeats its `^hello^` every retry and
    /// gives up after `give_up`.
    #[test]
    fn an_unanswered_newcomer_repeats_and_gives_up() {
        let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
        let schedule = Schedule {
            count: 1,
            window: Duration::ZERO,
            retry: Duration::from_millis(40),
            give_up: Duration::from_millis(300),
        };
        let mut arrivals =
            Arrivals::bind(silent.local_addr().unwrap(), schedule, Instant::now()).unwrap();
        run_until_done(&mut arrivals);
        let o = arrivals.outcomes()[0];
        assert_eq!(o.admitted_after, None);
        // At 0, 40, ..., 280 ms at most; at least twice unless the thread
        // slept 260 ms.
        assert!((2..=8).contains(&o.hellos), "{o:?}");
        assert_eq!(o.proofs, 0);
    }
}
