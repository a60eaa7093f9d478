//! A lossy, duplicating, reordering, delaying middlebox between clients and
//! the relay, in user space: what `tc netem` would do on a veth, for
//! kernels without sch_netem (this machine's has neither netem nor the tc
//! actions that drop at random). It is also a NAT: each client gets its
//! own upstream socket, and [`Impair::rebind`] moves every client to a new
//! upstream port, as a NAT does when its mapping times out.
//!
//! Faults are decided by a seeded PRNG, per datagram and per direction;
//! every datagram is counted, so a test can hold the relay's accounting to
//! what actually reached it. Loopback only; every loop is bounded by the
//! stop flag set on drop.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

/// What the middlebox does to each datagram, in each direction.
#[derive(Clone, Copy, Debug)]
pub struct Faults {
    /// Probability a datagram is dropped.
    pub loss: f64,
    /// Probability a (kept) datagram is sent twice.
    pub duplicate: f64,
    /// Probability a datagram skips most of the delay, overtaking others.
    pub reorder: f64,
    /// One-way delay.
    pub delay: Duration,
    /// PRNG seed.
    pub seed: u64,
}

impl Faults {
    /// No fault at all (a plain NAT).
    pub fn none() -> Faults {
        Faults {
            loss: 0.0,
            duplicate: 0.0,
            reorder: 0.0,
            delay: Duration::ZERO,
            seed: 1,
        }
    }
}

/// Datagram counts, per direction (`up`: towards the relay).
#[derive(Default, Debug)]
pub struct Counts {
    /// Received from clients.
    pub up_in: AtomicU64,
    /// Dropped on purpose on the way up.
    pub up_lost: AtomicU64,
    /// Sent to the relay (duplicates included).
    pub up_out: AtomicU64,
    /// Received from the relay.
    pub down_in: AtomicU64,
    /// Dropped on purpose on the way down.
    pub down_lost: AtomicU64,
    /// Sent to clients (duplicates included).
    pub down_out: AtomicU64,
}

impl Counts {
    /// Reads one counter.
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::SeqCst)
    }
}

/// The running middlebox; stopped on drop.
pub struct Impair {
    /// Where clients send (it forwards to the relay).
    pub addr: SocketAddr,
    /// What it did.
    pub counts: Arc<Counts>,
    rebind: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

/// A datagram waiting for its time.
struct Pending {
    due: Instant,
    seq: u64,
    /// `Some(client)`: towards the relay from that client's upstream
    /// socket; `None` with `to`: towards a client.
    up_from: Option<SocketAddr>,
    to: SocketAddr,
    data: Vec<u8>,
}

impl PartialEq for Pending {
    fn eq(&self, o: &Self) -> bool {
        (self.due, self.seq) == (o.due, o.seq)
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Pending {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.due, self.seq).cmp(&(o.due, o.seq))
    }
}

/// xorshift64*: enough randomness for fault injection, and repeatable.
struct Rng(u64);

impl Rng {
    fn chance(&mut self, p: f64) -> bool {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
        ((x >> 11) as f64 / (1u64 << 53) as f64) < p
    }
}

impl Impair {
    /// Starts a middlebox in front of `relay` (loopback only).
    pub fn start(relay: SocketAddr, faults: Faults) -> Impair {
        assert!(relay.ip().is_loopback(), "the middlebox is for loopback");
        let front = UdpSocket::bind("127.0.0.1:0").expect("bind the middlebox");
        front.set_nonblocking(true).unwrap();
        let addr = front.local_addr().unwrap();
        let counts = Arc::new(Counts::default());
        let rebind = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (c, r, s) = (Arc::clone(&counts), Arc::clone(&rebind), Arc::clone(&stop));
        let thread = thread::spawn(move || run(front, relay, faults, &c, &r, &s));
        Impair {
            addr,
            counts,
            rebind,
            stop,
            thread: Some(thread),
        }
    }

    /// Gives every client a new upstream port (a NAT rebinding).
    pub fn rebind(&self) {
        self.rebind.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + super::PATIENCE;
        while self.rebind.load(Ordering::SeqCst) {
            assert!(Instant::now() < deadline, "the middlebox never rebound");
            thread::sleep(Duration::from_millis(1));
        }
    }

    /// Waits until nothing is in flight through the middlebox for `quiet`.
    pub fn settle(&self, quiet: Duration) {
        let total = || Counts::get(&self.counts.up_out) + Counts::get(&self.counts.down_out);
        let deadline = Instant::now() + super::PATIENCE * 2;
        let mut last = total();
        loop {
            thread::sleep(quiet);
            let now = total();
            if now == last {
                return;
            }
            assert!(Instant::now() < deadline, "traffic never settled");
            last = now;
        }
    }
}

impl Drop for Impair {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn upstream() -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").expect("bind an upstream socket");
    s.set_nonblocking(true).unwrap();
    s
}

fn run(
    front: UdpSocket,
    relay: SocketAddr,
    f: Faults,
    counts: &Counts,
    rebind: &AtomicBool,
    stop: &AtomicBool,
) {
    let mut rng = Rng(f.seed.max(1));
    let mut ups: HashMap<SocketAddr, UdpSocket> = HashMap::new();
    let mut queue: BinaryHeap<Reverse<Pending>> = BinaryHeap::new();
    let mut seq = 0u64;
    let mut buf = vec![0u8; 65_536];
    // Lose, duplicate, delay or reorder one datagram.
    let mut admit = |rng: &mut Rng,
                     queue: &mut BinaryHeap<Reverse<Pending>>,
                     up_from: Option<SocketAddr>,
                     to: SocketAddr,
                     data: &[u8]|
     -> bool {
        if rng.chance(f.loss) {
            return false;
        }
        let copies = if rng.chance(f.duplicate) { 2 } else { 1 };
        for _ in 0..copies {
            let delay = if rng.chance(f.reorder) {
                f.delay / 4
            } else {
                f.delay
            };
            seq += 1;
            queue.push(Reverse(Pending {
                due: Instant::now() + delay,
                seq,
                up_from,
                to,
                data: data.to_vec(),
            }));
        }
        true
    };
    while !stop.load(Ordering::SeqCst) {
        if rebind.load(Ordering::SeqCst) {
            for sock in ups.values_mut() {
                *sock = upstream();
            }
            rebind.store(false, Ordering::SeqCst);
        }
        while let Ok((n, client)) = front.recv_from(&mut buf) {
            counts.up_in.fetch_add(1, Ordering::SeqCst);
            ups.entry(client).or_insert_with(upstream);
            if !admit(&mut rng, &mut queue, Some(client), relay, &buf[..n]) {
                counts.up_lost.fetch_add(1, Ordering::SeqCst);
            }
        }
        let clients: Vec<SocketAddr> = ups.keys().copied().collect();
        for client in clients {
            while let Ok((n, _)) = ups[&client].recv_from(&mut buf) {
                counts.down_in.fetch_add(1, Ordering::SeqCst);
                if !admit(&mut rng, &mut queue, None, client, &buf[..n]) {
                    counts.down_lost.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
        let now = Instant::now();
        while queue.peek().is_some_and(|p| p.0.due <= now) {
            let Some(Reverse(p)) = queue.pop() else { break };
            match p.up_from {
                Some(client) => {
                    if let Some(sock) = ups.get(&client) {
                        if sock.send_to(&p.data, p.to).is_ok() {
                            counts.up_out.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                }
                None => {
                    if front.send_to(&p.data, p.to).is_ok() {
                        counts.down_out.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        }
        thread::sleep(Duration::from_micros(300));
    }
}
