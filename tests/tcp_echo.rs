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
        TcpEcho::start_with(Command::new(udphub_bin()), extra)
    }

    /// Starts it with `cmd` (the binary, or a wrapper that runs it).
    fn start_with(mut cmd: Command, extra: &[&str]) -> TcpEcho {
        let ready = temp_path("tcp-ready");
        if cmd.get_program() != udphub_bin() {
            cmd.arg(udphub_bin());
        }
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

    /// Waits (bounded) until the scrape satisfies `ok`; returns it.
    fn wait_scrape(&self, what: &str, ok: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let text = scrape(self.metrics);
            if ok(&text) {
                return text;
            }
            assert!(Instant::now() < deadline, "never {what}:\n{text}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The server's resident memory, in bytes.
    fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS");
        kb * 1024
    }

    /// A connection with small TCP buffers and segments (set before the
    /// handshake), so the kernel holds little of the echo and the rest
    /// waits in the server.
    fn connect_small(&self) -> TcpStream {
        use socket2::{Domain, Socket, Type};
        let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        s.set_tcp_mss(536).unwrap();
        s.set_recv_buffer_size(4096).unwrap();
        s.set_send_buffer_size(16 * 1024).unwrap();
        s.connect(&self.addr.into()).expect("connect");
        let s: TcpStream = s.into();
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        s.set_write_timeout(Some(PATIENCE)).unwrap();
        s
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

/// Byte `i` of a test stream: a 251-byte cycle, so a byte lost, doubled or
/// out of order shows.
fn pattern(from: usize, len: usize) -> Vec<u8> {
    (from..from + len).map(|i| (i % 251) as u8).collect()
}

/// A network namespace, deleted on drop.
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// Runs `ip ARGS`; its stdout, or what went wrong.
fn ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The client of the idle test, run inside the namespace: sends 64 KiB,
/// waits (bounded) until the server has read it all, then reads its echo
/// slowly (512 bytes every 30 ms, ~17 KB/s) until the server closes the
/// connection for idleness, then reads the rest. Prints what it saw.
const ONLY_READS: &str = r#"
import socket, sys, time, urllib.request
host, port = sys.argv[1].rsplit(":", 1)
metrics = "http://%s/metrics" % sys.argv[2]
SENT = 65536

def value(series):
    text = urllib.request.urlopen(metrics, timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return 0.0

s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
s.settimeout(5)
s.connect((host, int(port)))
s.sendall(bytes(i % 251 for i in range(SENT)))
deadline = time.time() + 5
while value("udphub_tcp_received_bytes_total") < SENT:
    if time.time() > deadline:
        sys.exit("the server never read it all")
    time.sleep(0.01)
got = bytearray()
written = None
deadline = time.time() + 5
reads = 0
while time.time() < deadline:
    if reads % 8 == 0 and value('udphub_tcp_closed_total{reason="idle"}') == 1:
        written = value("udphub_tcp_sent_bytes_total")
        break
    data = s.recv(512)
    if not data:
        break
    got += data
    reads += 1
    time.sleep(0.03)
while True:
    data = s.recv(65536)
    if not data:
        break
    got += data
ordered = got == bytes(i % 251 for i in range(len(got)))
print("written=%s got=%d ordered=%s" % (written, len(got), ordered))
"#;

/// Idleness counts from the last bytes received, not from any event: a
/// client that has sent everything and only reads its echo, slowly (so the
/// server's socket turns writable again and again, and nothing arrives),
/// is closed after --idle-timeout while its echo is still owed; it gets
/// exactly what was written before the close. In a network namespace whose
/// TCP send buffers cannot grow past 16 KiB: on the host's loopback they
/// grow to megabytes, and the server would have written everything into
/// the kernel before it could go idle.
#[test]
fn a_client_that_only_reads_is_closed_when_idle() {
    for tool in ["ip", "python3"] {
        if !util::require_tool(tool) {
            return;
        }
    }
    let ns = Netns(format!("udphub-idle-{}", std::process::id()));
    if let Err(e) = ip(&["netns", "add", &ns.0]) {
        if std::env::var_os("CI").is_some() {
            panic!("network namespaces are required under CI: {e}");
        }
        eprintln!("skipping: cannot create a network namespace ({e})");
        return;
    }
    ip(&["-n", &ns.0, "link", "set", "lo", "up"]).unwrap();
    ip(&[
        "netns",
        "exec",
        &ns.0,
        "sysctl",
        "-q",
        "-w",
        "net.ipv4.tcp_wmem=4096 16384 16384",
    ])
    .unwrap();
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.0]);
    let echo = TcpEcho::start_with(cmd, &["--idle-timeout", "1s"]);
    let out = ip(&[
        "netns",
        "exec",
        &ns.0,
        "python3",
        "-c",
        ONLY_READS,
        &echo.addr.to_string(),
        &echo.metrics.to_string(),
    ])
    .unwrap();
    let field = |key: &str| {
        out.split_whitespace()
            .find_map(|f| f.strip_prefix(key))
            .unwrap_or_else(|| panic!("{key} missing: {out}"))
            .to_string()
    };
    let written: f64 = field("written=")
        .parse()
        .unwrap_or_else(|_| panic!("not closed for idleness while reading: {out}"));
    assert!(
        written < 65536.0,
        "closed only once everything was written, not for idleness: {out}"
    );
    assert_eq!(field("got=").parse::<f64>().unwrap(), written, "{out}");
    assert_eq!(field("ordered="), "True", "{out}");
}

/// A client that sends and reads as fast as it can gets a share of each
/// pass of the loop, not all of it: a second client's echo comes back
/// while the flood goes on (it goes on for 3 s at most), and the flood's
/// own echo is whole and in order.
#[test]
fn a_flooding_client_does_not_starve_the_others() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    const BLOCK: usize = 251 * 4096;
    const FLOOD_FOR: Duration = Duration::from_secs(3);
    // Upper-casing makes the server the slower side (more so in a debug
    // build), so the flood's socket never runs dry.
    let echo = TcpEcho::start(&["--upper"]);
    let flood = echo.connect();
    let stop = Arc::new(AtomicBool::new(false));
    let flooding = Arc::new(AtomicBool::new(true));
    let echoed = Arc::new(AtomicUsize::new(0));
    let writer = {
        let mut w = flood.try_clone().unwrap();
        let (stop, flooding) = (Arc::clone(&stop), Arc::clone(&flooding));
        std::thread::spawn(move || {
            let block = pattern(0, BLOCK);
            let mut sent = 0;
            let started = Instant::now();
            while !stop.load(Ordering::Relaxed) && started.elapsed() < FLOOD_FOR {
                w.write_all(&block).unwrap();
                sent += BLOCK;
            }
            flooding.store(false, Ordering::Relaxed);
            w.shutdown(Shutdown::Write).unwrap();
            sent
        })
    };
    let reader = {
        let mut r = flood;
        let echoed = Arc::clone(&echoed);
        std::thread::spawn(move || {
            let mut expect = pattern(0, 251 + BLOCK);
            expect.make_ascii_uppercase();
            let mut buf = vec![0u8; BLOCK];
            let mut total = 0;
            loop {
                let n = r.read(&mut buf).expect("the flood's echo");
                if n == 0 {
                    return total;
                }
                let at = total % 251;
                assert!(
                    buf[..n] == expect[at..at + n],
                    "the flood's echo at {total}"
                );
                total += n;
                echoed.store(total, Ordering::Relaxed);
            }
        })
    };
    let deadline = Instant::now() + PATIENCE;
    while echoed.load(Ordering::Relaxed) < BLOCK {
        assert!(Instant::now() < deadline, "the flood's echo never flowed");
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut other = echo.connect();
    other.write_all(b"ping").unwrap();
    assert_eq!(read_n(&mut other, 4), b"PING");
    assert!(
        flooding.load(Ordering::Relaxed),
        "the ping's echo waited for the flood to end"
    );
    stop.store(true, Ordering::Relaxed);
    let sent = writer.join().unwrap();
    let got = reader.join().unwrap();
    assert_eq!(got, sent);
    other.write_all(b"pong").unwrap();
    assert_eq!(read_n(&mut other, 4), b"PONG");
}

/// --max-buffer-bytes: clients that send and never read fill the shared
/// buffers up to the cap and no further (the server's memory stays
/// bounded); hitting it is counted; a client that arrives then is not read
/// (its bytes wait in the kernel, none lost) until the others read; then
/// every byte of every client comes back, in order.
#[test]
fn the_shared_buffer_cap_holds_readers_back_and_loses_nothing() {
    const CAP: usize = 128 * 1024;
    const HOGS: usize = 64;
    const CHUNK: usize = 16 * 1024;
    let echo = TcpEcho::start(&["--max-buffer-bytes", &CAP.to_string()]);
    let mut hogs: Vec<TcpStream> = (0..HOGS).map(|_| echo.connect_small()).collect();
    echo.wait_metric("udphub_tcp_connections", HOGS as f64);
    let rss_before = echo.rss();
    // Each hog writes until its writes block for good.
    for h in &hogs {
        h.set_nonblocking(true).unwrap();
    }
    let mut sent = vec![0usize; HOGS];
    let block = pattern(0, 251 + CHUNK);
    let mut quiet_since = Instant::now();
    let deadline = Instant::now() + PATIENCE;
    while quiet_since.elapsed() < Duration::from_millis(300) {
        assert!(Instant::now() < deadline, "the hogs' writes never blocked");
        let mut wrote = false;
        for (h, sent) in hogs.iter_mut().zip(&mut sent) {
            let at = *sent % 251;
            match h.write(&block[at..at + CHUNK]) {
                Ok(n) => {
                    *sent += n;
                    wrote = true;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
        }
        if wrote {
            quiet_since = Instant::now();
        } else {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let text = echo.wait_scrape("full", |t| {
        metric(t, "udphub_tcp_buffered_bytes") == CAP as f64
            && metric(t, "udphub_tcp_buffer_limit_total") >= 1.0
    });
    let limited = metric(&text, "udphub_tcp_buffer_limit_total");
    let grown = echo.rss().saturating_sub(rss_before);
    assert!(
        grown < (HOGS * 64 * 1024 / 2) as u64,
        "the server grew by {grown} bytes with a {CAP}-byte cap"
    );
    // A newcomer is not read while the memory is spent; that is counted.
    let mut late = echo.connect();
    late.write_all(b"patience").unwrap();
    echo.wait_scrape("counted the newcomer", |t| {
        metric(t, "udphub_tcp_buffer_limit_total") > limited
    });
    late.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 8];
    assert!(
        late.read(&mut buf).is_err(),
        "read while the memory is spent"
    );
    // The hogs read at last (all at once: the memory goes round), and get
    // back every byte they sent.
    let readers: Vec<_> = hogs
        .into_iter()
        .zip(sent)
        .map(|(mut h, sent)| {
            std::thread::spawn(move || {
                h.set_nonblocking(false).unwrap();
                h.shutdown(Shutdown::Write).unwrap();
                let mut back = Vec::new();
                h.read_to_end(&mut back).expect("the hog's echo");
                (back, sent)
            })
        })
        .collect();
    for r in readers {
        let (back, sent) = r.join().unwrap();
        assert_eq!(back.len(), sent);
        assert!(back == pattern(0, sent), "a hog's echo out of order");
    }
    late.set_read_timeout(Some(PATIENCE)).unwrap();
    assert_eq!(read_n(&mut late, 8), b"patience");
    late.write_all(b"and again").unwrap();
    assert_eq!(read_n(&mut late, 9), b"and again");
    echo.wait_metric("udphub_tcp_closed_total{reason=\"eof\"}", HOGS as f64);
    echo.wait_metric("udphub_tcp_buffered_bytes", 0.0);
}
