//! `udphub echo --tcp`: seed 001's TCP echo server, through the real
//! binary — with the seed's own client, with 1,000 connections at once,
//! and with the connections a server meets in production (one that never
//! reads, one that resets, one that goes silent, one too many).

mod util;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use util::{metric, scrape, spawn_until_ready, temp_path, udphub_bin, PATIENCE};

/// A running `udphub echo --tcp`, killed on drop.
struct TcpEcho {
    child: Child,
    addr: SocketAddr,
    metrics: SocketAddr,
    _log: mpsc::Receiver<String>,
}

impl Drop for TcpEcho {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl TcpEcho {
    fn start(extra: &[&str]) -> TcpEcho {
        let ready = temp_path("tcp-ready");
        let mut cmd = Command::new(udphub_bin());
        cmd.args([
            "echo",
            "--tcp",
            "--bind",
            "127.0.0.1:0",
            "--metrics",
            "127.0.0.1:0",
        ])
        .arg("--ready-file")
        .arg(&ready)
        .args(extra)
        .env_remove("RUST_LOG");
        let (child, log, addrs) = spawn_until_ready(cmd, &ready);
        TcpEcho {
            child,
            addr: addrs.udp,
            metrics: addrs.metrics.expect("metrics on"),
            _log: log,
        }
    }

    fn metric(&self, series: &str) -> f64 {
        metric(&scrape(self.metrics), series)
    }

    /// Waits (bounded) until `series` equals `want`.
    fn wait_metric(&self, series: &str, want: f64) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let text = scrape(self.metrics);
            if metric(&text, series) == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{series} never reached {want}:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(self.addr).expect("connect");
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        s.set_write_timeout(Some(PATIENCE)).unwrap();
        s
    }
}

/// Reads exactly `n` bytes (bounded by the stream's timeout).
fn read_n(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0; n];
    s.read_exact(&mut buf).expect("the echo");
    buf
}

/// Seed 001's client, run as the seed wrote it, against `udphub echo --tcp
/// --upper`: what it prints is its input upper-cased (ASCII only, like
/// Python's `bytes.upper()`).
#[test]
fn seed_001s_tcp_client_gets_its_lines_upper_cased() {
    assert!(util::require_tool("python3"));
    let echo = TcpEcho::start(&["--upper"]);
    let client = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/seeds/seed001_tcp_client.py"
    );
    let mut py = Command::new("python3")
        .arg(client)
        .arg(echo.addr.ip().to_string())
        .arg(echo.addr.port().to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    py.stdin
        .take()
        .unwrap()
        .write_all("hello\n\nworld, 你好 1\n".as_bytes())
        .unwrap();
    let deadline = Instant::now() + PATIENCE;
    while py.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the seed client did not finish");
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = py.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout, ">>: HELLO\n>>: >>: WORLD, 你好 1\n>>: ");
    echo.wait_metric("udphub_tcp_closed_total{reason=\"eof\"}", 1.0);
    assert_eq!(echo.metric("udphub_tcp_accepted_total"), 1.0);
    assert_eq!(echo.metric("udphub_tcp_received_bytes_total"), 20.0);
    assert_eq!(echo.metric("udphub_tcp_sent_bytes_total"), 20.0);
}

/// Raises this test process's open-file limit (CI shells often start at
/// 1,024) for `n` client sockets.
fn allow_open_files(n: u64) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    if soft < n {
        setrlimit(Resource::RLIMIT_NOFILE, n.min(hard), hard).unwrap();
    }
    let (soft, _) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    assert!(soft >= n, "open files limited to {soft}, need {n}");
}

/// 1,000 connections open at once, in one loop: each gets its own bytes
/// back; a hundred reset mid-way and the rest go on; every byte and every
/// connection is accounted for.
#[test]
fn a_thousand_connections_at_once() {
    const N: usize = 1000;
    allow_open_files(2 * N as u64 + 200);
    let echo = TcpEcho::start(&[]);
    let mut conns: Vec<TcpStream> = (0..N).map(|_| echo.connect()).collect();
    echo.wait_metric("udphub_tcp_connections", N as f64);
    for (i, c) in conns.iter_mut().enumerate() {
        c.write_all(format!("conn {i:04};").as_bytes()).unwrap();
    }
    for (i, c) in conns.iter_mut().enumerate() {
        assert_eq!(read_n(c, 10), format!("conn {i:04};").as_bytes());
    }
    // A hundred reset (SO_LINGER 0, then close: an RST, not a FIN).
    for c in conns.drain(..100) {
        socket2::SockRef::from(&c)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
    }
    for (i, c) in conns.iter_mut().enumerate() {
        c.write_all(format!("again {i:03};").as_bytes()).unwrap();
        assert_eq!(read_n(c, 10), format!("again {i:03};").as_bytes());
    }
    for c in &conns {
        c.shutdown(Shutdown::Write).unwrap();
    }
    for c in &mut conns {
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
    }
    echo.wait_metric("udphub_tcp_connections", 0.0);
    let eof = echo.metric("udphub_tcp_closed_total{reason=\"eof\"}");
    let error = echo.metric("udphub_tcp_closed_total{reason=\"error\"}");
    assert_eq!(eof + error, N as f64, "eof {eof}, error {error}");
    assert!(eof >= (N - 100) as f64);
    assert_eq!(echo.metric("udphub_tcp_accepted_total"), N as f64);
    let bytes = (N * 10 + (N - 100) * 10) as f64;
    assert_eq!(echo.metric("udphub_tcp_received_bytes_total"), bytes);
    assert_eq!(echo.metric("udphub_tcp_sent_bytes_total"), bytes);
}

/// A client that sends and never reads stops being read once 64 KiB are
/// owed to it; another client is served meanwhile, at once.
#[test]
fn a_client_that_never_reads_costs_the_others_nothing() {
    let echo = TcpEcho::start(&["--upper"]);
    let hog = echo.connect();
    hog.set_nonblocking(true).unwrap();
    let mut sent = 0usize;
    let chunk = vec![b'x'; 64 * 1024];
    let deadline = Instant::now() + PATIENCE;
    // Fill both directions' buffers until the hog's writes block.
    let mut blocked_since = None;
    while Instant::now() < deadline {
        match (&hog).write(&chunk) {
            Ok(n) => {
                sent += n;
                blocked_since = None;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let since = *blocked_since.get_or_insert_with(Instant::now);
                if since.elapsed() > Duration::from_millis(300) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(
        blocked_since.is_some(),
        "the hog's writes never blocked ({sent} B)"
    );
    let mut other = echo.connect();
    other.write_all(b"still here").unwrap();
    assert_eq!(read_n(&mut other, 10), b"STILL HERE");
    // The server holds at most its cap for the hog (the rest waits in
    // kernel buffers, where TCP's flow control pushes back on the hog).
    let received = {
        drop(hog);
        echo.wait_metric("udphub_tcp_connections", 1.0);
        echo.metric("udphub_tcp_received_bytes_total")
    };
    assert!(received < sent as f64, "read {received} of {sent}");
}

/// --max-connections: one too many is accepted and closed at once, and
/// counted; --idle-timeout closes a silent connection; SIGTERM closes the
/// rest and exits 0.
#[test]
fn caps_idle_timeout_and_shutdown() {
    let mut echo = TcpEcho::start(&["--max-connections", "2", "--idle-timeout", "1s"]);
    let mut a = echo.connect();
    let mut b = echo.connect();
    echo.wait_metric("udphub_tcp_connections", 2.0);
    let mut c = echo.connect();
    let mut buf = [0u8; 8];
    match c.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("one too many was served: {other:?}"),
    }
    assert_eq!(
        echo.metric("udphub_tcp_refused_total{reason=\"max_connections\"}"),
        1.0
    );
    a.write_all(b"a").unwrap();
    assert_eq!(read_n(&mut a, 1), b"a");
    // b stays silent past the idle timeout; a keeps talking.
    let deadline = Instant::now() + Duration::from_millis(1600);
    while Instant::now() < deadline {
        a.write_all(b"k").unwrap();
        assert_eq!(read_n(&mut a, 1), b"k");
        std::thread::sleep(Duration::from_millis(100));
    }
    echo.wait_metric("udphub_tcp_closed_total{reason=\"idle\"}", 1.0);
    assert_eq!(b.read(&mut buf).unwrap_or(0), 0, "b was closed");
    let status = Command::new("kill")
        .args(["-TERM", &echo.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + PATIENCE;
    let exit = loop {
        if let Some(s) = echo.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "did not exit");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(exit.success(), "{exit}");
    assert_eq!(a.read(&mut buf).unwrap_or(0), 0, "a was closed at shutdown");
}
