//! udphub against a bare `recvmmsg`/`sendmmsg` relay, in one run.
//!
//! `cargo bench --bench baseline_relay` (see docs/BENCHMARKS.md). It runs,
//! in this process, alternately:
//!
//! - **baseline**: the least a relay can do — read a batch, remember each new
//!   source in a `Vec`, and hand every datagram unchanged to every known
//!   source with `sendmmsg`. No classification beyond `^hb^`, no template,
//!   no expiry, no metrics;
//! - **udphub**: the real relay loop ([`udphub::RelayLoop`]) with every feature on: default
//!   `{body}. from {ip}:{port}` format, the timer wheel, and the Prometheus
//!   exporter installed and serving.
//!
//! Each relay runs on its own thread; one load thread registers `N` client
//! sockets, and client 0 sends sequence-numbered messages closed-loop (at
//! most `WINDOW` messages' deliveries outstanding). It measures deliveries/s,
//! loss, latency, and the relay thread's own CPU time per delivery (from
//! `/proc/self/task/TID/schedstat`, nanosecond precision).
//!
//! With `--serve ADDR` it runs only the baseline relay, as its own process,
//! for `loadtest/compare.sh`.
//!
//! Environment knobs: `UDPHUB_BENCH_CLIENTS` (default `64,1000`),
//! `UDPHUB_BENCH_SECS` (per round, default 4), `UDPHUB_BENCH_ROUNDS` (3).

use std::collections::HashSet;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mio::{Events, Interest, Poll, Token, Waker};
use udphub::core::addr::RawAddr;
use udphub::net::batch_io::{RecvBatch, SendBatch};

/// Messages outstanding per client in the closed loop.
const WINDOW: u64 = 8;
/// Body bytes of each message (sequence number, timestamp, padding).
const PAYLOAD: usize = 64;

/// A relay running on its own thread.
struct Running {
    addr: SocketAddr,
    tid: u32,
    stop: Box<dyn Fn() + Send>,
    thread: thread::JoinHandle<()>,
}

fn current_tid() -> u32 {
    // "/proc/thread-self" links to "PID/task/TID".
    let link = std::fs::read_link("/proc/thread-self").expect("read /proc/thread-self");
    link.file_name()
        .and_then(|s| s.to_str())
        .and_then(|s| s.parse().ok())
        .expect("thread id")
}

/// Nanoseconds the thread has run on a CPU.
fn thread_cpu_ns(tid: u32) -> u64 {
    let text =
        std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")).expect("schedstat");
    text.split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .expect("schedstat field")
}

fn start_udphub() -> Running {
    let (tx, rx) = mpsc::channel();
    let thread = thread::spawn(move || {
        let config = udphub::Config {
            bind: "127.0.0.1:0".parse().unwrap(),
            timeout: Duration::from_secs(60),
            ..udphub::Config::default()
        };
        let relay = udphub::bind(&config)
            .expect("bind udphub")
            .pop()
            .expect("one loop");
        let handle = relay.shutdown_handle();
        tx.send((relay.local_addr(), current_tid(), handle))
            .unwrap();
        relay.run().expect("udphub run");
    });
    let (addr, tid, handle) = rx.recv().unwrap();
    Running {
        addr,
        tid,
        stop: Box::new(move || handle.shutdown()),
        thread,
    }
}

fn start_baseline() -> Running {
    let (tx, rx) = mpsc::channel();
    let thread = thread::spawn(move || {
        let std_sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        std_sock.set_nonblocking(true).unwrap();
        // Same buffer sizes udphub asks for, so only the loop differs.
        let s2 = socket2::SockRef::from(&std_sock);
        s2.set_recv_buffer_size(8 << 20).unwrap();
        s2.set_send_buffer_size(8 << 20).unwrap();
        let mut sock = mio::net::UdpSocket::from_std(std_sock);
        let mut poll = Poll::new().unwrap();
        poll.registry()
            .register(&mut sock, Token(0), Interest::READABLE)
            .unwrap();
        let waker = Arc::new(Waker::new(poll.registry(), Token(1)).unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        tx.send((
            sock.local_addr().unwrap(),
            current_tid(),
            Arc::clone(&waker),
            Arc::clone(&stop),
        ))
        .unwrap();
        baseline_loop(&mut poll, &sock, &stop);
    });
    let (addr, tid, waker, stop) = rx.recv().unwrap();
    Running {
        addr,
        tid,
        stop: Box::new(move || {
            stop.store(true, Ordering::SeqCst);
            let _ = waker.wake();
        }),
        thread,
    }
}

/// The baseline relay alone, on `addr`, until killed.
fn serve(addr: &str) {
    let std_sock = UdpSocket::bind(addr).unwrap_or_else(|e| {
        eprintln!("baseline_relay: cannot bind {addr}: {e}");
        std::process::exit(2);
    });
    std_sock.set_nonblocking(true).unwrap();
    let s2 = socket2::SockRef::from(&std_sock);
    let _ = s2.set_recv_buffer_size(8 << 20);
    let _ = s2.set_send_buffer_size(8 << 20);
    let mut sock = mio::net::UdpSocket::from_std(std_sock);
    let mut poll = Poll::new().unwrap();
    poll.registry()
        .register(&mut sock, Token(0), Interest::READABLE)
        .unwrap();
    eprintln!("baseline_relay: relaying on {addr}");
    baseline_loop(&mut poll, &sock, &AtomicBool::new(false));
}

/// The bare relay loop.
fn baseline_loop(poll: &mut Poll, sock: &mio::net::UdpSocket, stop: &AtomicBool) {
    let mut events = Events::with_capacity(16);
    let mut recv = RecvBatch::new(64, 1472);
    let mut send = SendBatch::new(256);
    let mut known = HashSet::new();
    let mut clients: Vec<RawAddr> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        match poll.poll(&mut events, None) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => panic!("poll: {e}"),
        }
        loop {
            let n = match recv.recv(sock.as_fd()) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("recvmmsg: {e}"),
            };
            for i in 0..n {
                let d = recv.get(i);
                let Some(src) = d.source else { continue };
                if known.insert(src) {
                    clients.push(src);
                }
                if d.data.starts_with(b"^hb^") {
                    continue;
                }
                let mut at = 0;
                while at < clients.len() {
                    let end = (at + send.capacity()).min(clients.len());
                    match send.send(sock.as_fd(), &[], d.data, &clients[at..end]) {
                        Ok(k) => at += k.max(1),
                        Err(_) => at += 1,
                    }
                }
            }
        }
    }
}

/// What one load run saw.
struct Sample {
    /// Deliveries during the measured window.
    deliveries: u64,
    /// Deliveries that never arrived, over the whole run.
    lost: u64,
    /// Deliveries the whole run asked for.
    expected: u64,
    secs: f64,
    cpu_ns: u64,
    latency: Histogram<u64>,
}

/// Registers `clients` sockets, then has client 0 send closed-loop for
/// `secs` seconds (after a warm-up), counting deliveries to everyone.
fn drive(relay: &Running, clients: usize, secs: f64) -> Sample {
    let mut poll = Poll::new().unwrap();
    let mut socks = Vec::with_capacity(clients);
    for i in 0..clients {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_nonblocking(true).unwrap();
        let _ = socket2::SockRef::from(&s).set_recv_buffer_size(1 << 20);
        let mut s = mio::net::UdpSocket::from_std(s);
        poll.registry()
            .register(&mut s, Token(i), Interest::READABLE)
            .unwrap();
        s.send_to(b"^hb^", relay.addr).unwrap();
        socks.push(s);
    }
    let mut events = Events::with_capacity(1024);
    let mut batch = RecvBatch::new(64, 2048);
    let start = Instant::now();
    let n = clients as u64;
    let mut sent = 0u64;
    let mut delivered = 0u64;
    let mut latency = Histogram::<u64>::new_with_bounds(1, 10_000_000_000, 3).unwrap();
    let mut payload = [b'.'; PAYLOAD];

    // Phases: warm-up until `measure_at`, measured until `end_at`, then
    // drain (no sends) until everything arrived or 1 s passed.
    let measure_at = start + Duration::from_millis(500);
    let end_at = measure_at + Duration::from_secs_f64(secs);
    let mut at_measure: Option<(u64, u64, u64, Instant)> = None;
    let mut at_end: Option<(u64, u64, u64, Instant)> = None;
    let mut last_progress = Instant::now();
    loop {
        let now = Instant::now();
        if at_measure.is_none() && now >= measure_at {
            at_measure = Some((sent, delivered, thread_cpu_ns(relay.tid), now));
        }
        if at_end.is_none() && now >= end_at {
            at_end = Some((sent, delivered, thread_cpu_ns(relay.tid), now));
        }
        let sending = at_end.is_none();
        if !sending && (delivered >= sent * n || now > end_at + Duration::from_secs(1)) {
            break;
        }
        // Closed loop; a lost delivery would stall it, so after 100 ms
        // without progress the window is reopened (the loss still shows).
        let stalled = now.duration_since(last_progress) > Duration::from_millis(100);
        if sending && (sent * n - delivered.min(sent * n) < WINDOW * n || stalled) {
            let t = start.elapsed().as_nanos() as u64;
            payload[..8].copy_from_slice(&sent.to_le_bytes());
            payload[8..16].copy_from_slice(&t.to_le_bytes());
            socks[0].send_to(&payload, relay.addr).unwrap();
            sent += 1;
            if stalled {
                last_progress = now;
            }
        }
        let timeout = if sending {
            Some(Duration::ZERO)
        } else {
            Some(Duration::from_millis(5))
        };
        poll.poll(&mut events, timeout).unwrap();
        for ev in events.iter() {
            let s = &socks[ev.token().0];
            while let Ok(k) = batch.recv(s.as_fd()) {
                let now_ns = start.elapsed().as_nanos() as u64;
                for j in 0..k {
                    let d = batch.get(j);
                    if d.data.len() >= 16 {
                        let t = u64::from_le_bytes(d.data[8..16].try_into().unwrap());
                        let _ = latency.record(now_ns.saturating_sub(t).max(1));
                        delivered += 1;
                        last_progress = Instant::now();
                    }
                }
            }
        }
    }
    let (_, d0, c0, t0) = at_measure.expect("measured");
    let (_, d1, c1, t1) = at_end.expect("ended");
    Sample {
        deliveries: d1 - d0,
        secs: t1.duration_since(t0).as_secs_f64(),
        cpu_ns: c1 - c0,
        lost: sent * n - delivered.min(sent * n),
        expected: sent * n,
        latency,
    }
}

impl Sample {
    fn rate(&self) -> f64 {
        self.deliveries as f64 / self.secs
    }
    fn cpu_per_delivery_ns(&self) -> f64 {
        self.cpu_ns as f64 / self.deliveries.max(1) as f64
    }
}

/// Per relay over the rounds: rates, CPU per delivery, lost, expected, latency.
type Totals = (Vec<f64>, Vec<f64>, u64, u64, Histogram<u64>);

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    // `--serve ADDR`: run only the bare relay, as a process of its own, for
    // loadtest/compare.sh to measure like any other relay. Stop it with a
    // signal (no goodbyes: it is the baseline).
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--serve") {
        let addr = args
            .get(i + 1)
            .map(String::as_str)
            .unwrap_or("127.0.0.1:9999");
        serve(addr);
        return;
    }
    // `cargo test --benches` runs bench targets with no `--bench` flag:
    // there, only check that this builds and starts.
    if !args.iter().any(|a| a == "--bench") {
        println!("baseline_relay: run with `cargo bench --bench baseline_relay`");
        return;
    }
    let clients_list: Vec<usize> = std::env::var("UDPHUB_BENCH_CLIENTS")
        .unwrap_or_else(|_| "64,1000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let secs: f64 = env_or("UDPHUB_BENCH_SECS", 4.0);
    let rounds: usize = env_or("UDPHUB_BENCH_ROUNDS", 3);

    // udphub with metrics on, as deployed: install the exporter once.
    udphub::runtime::exporter::start("127.0.0.1:0".parse().unwrap()).expect("metrics exporter");

    println!("| clients | relay | deliveries/s | CPU ns/delivery | loss | p50 µs | p99 µs | deliveries/s vs baseline | CPU/delivery vs baseline |");
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|");
    for &clients in &clients_list {
        let mut results: [Totals; 2] = std::array::from_fn(|_| {
            (
                Vec::new(),
                Vec::new(),
                0,
                0,
                Histogram::new_with_bounds(1, 10_000_000_000, 3).unwrap(),
            )
        });
        for _ in 0..rounds {
            // Alternate, so drift in the machine's load hits both alike.
            for (k, start) in [start_baseline as fn() -> Running, start_udphub]
                .iter()
                .enumerate()
            {
                let relay = start();
                let s = drive(&relay, clients, secs);
                (relay.stop)();
                relay.thread.join().unwrap();
                let r = &mut results[k];
                r.0.push(s.rate());
                r.1.push(s.cpu_per_delivery_ns());
                r.2 += s.lost;
                r.3 += s.expected;
                r.4.add(&s.latency).unwrap();
            }
        }
        let base_rate = median(results[0].0.clone());
        let base_cpu = median(results[0].1.clone());
        for (k, name) in ["baseline", "udphub"].iter().enumerate() {
            let r = &results[k];
            let rate = median(r.0.clone());
            let cpu = median(r.1.clone());
            println!(
                "| {clients} | {name} | {rate:.0} | {cpu:.0} | {:.4}% | {:.1} | {:.1} | {:.3}x | {:.3}x |",
                100.0 * r.2 as f64 / r.3.max(1) as f64,
                r.4.value_at_quantile(0.5) as f64 / 1000.0,
                r.4.value_at_quantile(0.99) as f64 / 1000.0,
                rate / base_rate,
                cpu / base_cpu,
            );
        }
    }
}
