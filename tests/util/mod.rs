//! Shared helpers for the integration tests: start the real `udphub` binary
//! on loopback, talk to it with real UDP sockets, scrape its metrics.
//!
//! Every wait here is bounded; nothing ever targets an address off this
//! machine.

#![allow(dead_code)]

pub mod closed_loop;
pub mod cluster;
pub mod http;
pub mod impair;
pub mod nats;
pub mod pki;
pub mod proc;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// How long any single expected event may take before a test fails. Long,
/// because CI machines are shared; only failures ever wait this long.
pub const PATIENCE: Duration = Duration::from_secs(5);

/// A `udphub serve` child process, killed on drop.
pub struct RelayProc {
    /// The child.
    pub child: Child,
    /// Where it relays.
    pub addr: SocketAddr,
    /// Where it serves metrics, if enabled.
    pub metrics: Option<SocketAddr>,
    /// Its stderr lines, as they arrive.
    pub log: mpsc::Receiver<String>,
}

/// The path of the built `udphub` binary.
pub fn udphub_bin() -> &'static str {
    env!("CARGO_BIN_EXE_udphub")
}

/// A fresh path in the temp dir, unique to this process and call.
pub fn temp_path(tag: &str) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("udphub-test-{}-{tag}-{n}", std::process::id()))
}

/// Starts `udphub serve --bind 127.0.0.1:0` with metrics on a port of its
/// own choosing.
pub fn spawn_relay(extra: &[&str]) -> RelayProc {
    spawn_relay_on("127.0.0.1:0", true, extra)
}

/// Starts `udphub serve` on `bind`, with or without metrics, plus `extra`
/// flags, and waits (bounded) until it says where it relays.
pub fn spawn_relay_on(bind: &str, metrics: bool, extra: &[&str]) -> RelayProc {
    spawn_relay_with(bind, metrics, &[], extra)
}

/// [`spawn_relay_on`] with extra environment variables for the child.
///
/// Both sockets are bound to port 0 by the relay itself (no port is picked
/// here and handed over, so nothing can take it in between), and the relay
/// reports what it got through `--ready-file`.
pub fn spawn_relay_with(
    bind: &str,
    metrics: bool,
    env: &[(&str, &str)],
    extra: &[&str],
) -> RelayProc {
    let ready = temp_path("ready");
    let metrics_arg = if metrics { "127.0.0.1:0" } else { "off" };
    let mut cmd = Command::new(udphub_bin());
    cmd.args([
        "serve",
        "--bind",
        bind,
        "--metrics",
        metrics_arg,
        "--log-level",
        "info",
    ])
    .arg("--ready-file")
    .arg(&ready)
    .args(extra)
    .env_remove("RUST_LOG")
    .envs(env.iter().copied());
    let (child, log, addrs) = spawn_until_ready(cmd, &ready);
    RelayProc {
        child,
        addr: addrs.udp,
        metrics: addrs.metrics,
        log,
    }
}

/// What a server wrote to its `--ready-file`.
#[derive(Debug, Clone, Copy)]
pub struct ReadyAddrs {
    /// Its socket: `udp=`, or `tcp=` for `udphub echo --tcp`.
    pub udp: SocketAddr,
    /// Its metrics endpoint, unless off.
    pub metrics: Option<SocketAddr>,
}

/// Spawns `cmd` (which must write `ready`) with stderr captured line by
/// line, and waits (bounded) for the ready file. Fails loudly, with what the
/// server printed, if it exits or takes longer than [`PATIENCE`].
pub fn spawn_until_ready(
    mut cmd: Command,
    ready: &Path,
) -> (Child, mpsc::Receiver<String>, ReadyAddrs) {
    let _ = std::fs::remove_file(ready);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn udphub");
    let stderr = child.stderr.take().expect("stderr piped");
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Ok(text) = std::fs::read_to_string(ready) {
            let field = |key: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(key))
                    .unwrap_or_else(|| panic!("ready file lacks {key}: {text:?}"))
                    .to_string()
            };
            let udp = text
                .lines()
                .find_map(|l| l.strip_prefix("udp=").or_else(|| l.strip_prefix("tcp=")))
                .unwrap_or_else(|| panic!("ready file lacks udp= or tcp=: {text:?}"))
                .parse()
                .expect("socket address");
            let metrics = match field("metrics=").as_str() {
                "off" => None,
                a => Some(a.parse().expect("metrics address")),
            };
            let _ = std::fs::remove_file(ready);
            return (child, rx, ReadyAddrs { udp, metrics });
        }
        let exited = child.try_wait().expect("try_wait");
        if exited.is_some() || Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let said: Vec<String> = rx.try_iter().collect();
            panic!(
                "udphub did not become ready ({}):\n{}",
                exited.map_or("timed out".to_string(), |s| s.to_string()),
                said.join("\n")
            );
        }
        thread::sleep(Duration::from_millis(10));
    }
}

impl RelayProc {
    /// Sends a signal to the relay.
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{sig} failed");
    }

    /// Waits (bounded) for the relay to exit.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "relay did not exit");
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits (bounded) for a stderr line containing `needle` and returns
    /// it; fails with every line seen meanwhile if none comes.
    pub fn expect_log(&self, needle: &str) -> String {
        let deadline = Instant::now() + PATIENCE;
        let mut seen = Vec::new();
        while Instant::now() < deadline {
            if let Ok(line) = self.log.recv_timeout(Duration::from_millis(20)) {
                if line.contains(needle) {
                    return line;
                }
                seen.push(line);
            }
        }
        panic!("no log line with {needle:?}; saw:\n{}", seen.join("\n"));
    }

    /// The relay's metrics page.
    pub fn scrape(&self) -> String {
        scrape(self.metrics.expect("metrics enabled"))
    }

    /// One sample from the metrics page (0 when absent).
    pub fn metric(&self, series: &str) -> f64 {
        metric(&self.scrape(), series)
    }

    /// Waits (bounded) until `series` reaches `at_least`; returns its
    /// value. Fails the test, with the whole scrape, if it never does.
    pub fn wait_metric(&self, series: &str, at_least: f64) -> f64 {
        wait_metric(self.metrics.expect("metrics enabled"), series, at_least)
    }
}

impl Drop for RelayProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits (bounded) until `series` on the metrics page at `addr` reaches
/// `at_least`; returns its value. Fails the test if it never does.
pub fn wait_metric(addr: SocketAddr, series: &str, at_least: f64) -> f64 {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let text = scrape(addr);
        let v = metric(&text, series);
        if v >= at_least {
            return v;
        }
        if Instant::now() > deadline {
            panic!("{series} stayed at {v}, below {at_least}, for {PATIENCE:?}:\n{text}");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// GET /metrics over plain HTTP/1.0.
pub fn scrape(addr: SocketAddr) -> String {
    let mut stream = TcpStream::connect_timeout(&addr, PATIENCE).expect("connect to metrics");
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read metrics");
    let (head, body) = response.split_once("\r\n\r\n").expect("HTTP response");
    assert!(
        head.starts_with("HTTP/1.") && head.contains(" 200 "),
        "{head}"
    );
    body.to_string()
}

/// The value of one series (`name` or `name{labels}`) in a scrape; 0 if absent.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok()).flatten()
        })
        .unwrap_or(0.0)
}

/// The sum of every series of a metric family (all label values).
pub fn metric_sum(text: &str, family: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            let base = name.split('{').next()?;
            (base == family)
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

/// A chat client: a UDP socket on loopback.
pub struct Client {
    /// The socket.
    pub sock: UdpSocket,
    /// The relay.
    pub relay: SocketAddr,
    /// Verify mode: `^cookie^C`, the client's proof of life.
    pub proof: Option<Vec<u8>>,
}

impl Client {
    /// A client of `relay`, bound to the matching loopback address.
    pub fn new(relay: SocketAddr) -> Client {
        let local = if relay.is_ipv6() {
            "[::1]:0"
        } else {
            "127.0.0.1:0"
        };
        let sock = UdpSocket::bind(local).expect("bind client");
        Client {
            sock,
            relay,
            proof: None,
        }
    }

    /// A client that has registered with a heartbeat, and been seen to: the
    /// relay's joined counter went up (it fails the test otherwise). Needs
    /// the relay's metrics.
    pub fn joined(relay: &RelayProc) -> Client {
        assert!(
            relay.metrics.is_some(),
            "Client::joined checks the relay's metrics: start it with metrics on"
        );
        let c = Client::new(relay.addr);
        let before = relay.metric("udphub_clients_joined_total");
        c.send(b"^hb^");
        relay.wait_metric("udphub_clients_joined_total", before + 1.0);
        c
    }

    /// The client's own address.
    pub fn addr(&self) -> SocketAddr {
        self.sock.local_addr().unwrap()
    }

    /// Sends one datagram to the relay.
    pub fn send(&self, data: &[u8]) {
        self.sock.send_to(data, self.relay).expect("send");
    }

    /// The next datagram within `wait`, if any.
    pub fn recv_within(&self, wait: Duration) -> Option<Vec<u8>> {
        self.sock.set_read_timeout(Some(wait)).unwrap();
        let mut buf = vec![0u8; 70_000];
        match self.sock.recv_from(&mut buf) {
            Ok((n, from)) => {
                assert_eq!(from, self.relay, "datagram from a stranger");
                buf.truncate(n);
                Some(buf)
            }
            Err(_) => None,
        }
    }

    /// The next datagram; fails the test if none comes within [`PATIENCE`].
    pub fn recv(&self) -> Vec<u8> {
        self.recv_within(PATIENCE)
            .expect("expected a datagram from the relay")
    }

    /// Asserts nothing arrives for a short while. Used only after a later
    /// datagram proved the relay has already handled the earlier ones.
    pub fn expect_silence(&self) {
        if let Some(d) = self.recv_within(Duration::from_millis(200)) {
            panic!("unexpected datagram {:?}", String::from_utf8_lossy(&d));
        }
    }
}

/// Verify mode (`--verify-sources`).
impl Client {
    /// Asks for a cookie (`^hello^` padded to 64 bytes) and returns it.
    pub fn cookie(&self) -> Vec<u8> {
        let mut hello = b"^hello^".to_vec();
        hello.resize(64, b' ');
        self.send(&hello);
        let answer = self.recv();
        let cookie = answer
            .strip_prefix(b"^cookie^")
            .unwrap_or_else(|| panic!("not a cookie: {:?}", String::from_utf8_lossy(&answer)));
        assert_eq!(cookie.len(), 22, "{answer:?}");
        cookie.to_vec()
    }

    /// Registers through the cookie handshake.
    pub fn verified(relay: &RelayProc) -> Client {
        let mut c = Client::new(relay.addr);
        let cookie = c.cookie();
        let before = relay.metric("udphub_clients_joined_total");
        let proof = [&b"^cookie^"[..], &cookie].concat();
        c.send(&proof);
        c.proof = Some(proof);
        relay.wait_metric("udphub_clients_joined_total", before + 1.0);
        c
    }

    /// A heartbeat: `^hb^`, or in verify mode the client's `^cookie^C`
    /// (only the cookie keeps a member alive there).
    pub fn heartbeat(&self) {
        match &self.proof {
            Some(p) => self.send(p),
            None => self.send(b"^hb^"),
        }
    }
}

/// `text. from ip:port` for a client, the seed's format.
pub fn seed_format(text: &str, from: SocketAddr) -> Vec<u8> {
    format!("{text}. from {}:{}", from.ip(), from.port()).into_bytes()
}

/// Whether `tool` is on PATH; under CI a missing tool fails the test.
pub fn require_tool(tool: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !found {
        if std::env::var_os("CI").is_some() {
            panic!("{tool} is required under CI (install it in .ci/run)");
        }
        eprintln!("skipping: {tool} not installed (tests/run.sh installs it)");
    }
    found
}

/// How many datagrams the kernel dropped at the local UDP socket bound to
/// `addr` (the `drops` column of /proc/net/udp or udp6): a full receive
/// buffer, for diagnosing a datagram a test did not get.
pub fn socket_drops(addr: SocketAddr) -> Option<u64> {
    let (file, local) = match addr {
        SocketAddr::V4(a) => (
            "/proc/net/udp",
            format!(
                "{:08X}:{:04X}",
                u32::from_le_bytes(a.ip().octets()),
                a.port()
            ),
        ),
        SocketAddr::V6(a) => {
            let o = a.ip().octets();
            let words: String = o
                .chunks(4)
                .map(|w| format!("{:08X}", u32::from_le_bytes([w[0], w[1], w[2], w[3]])))
                .collect();
            ("/proc/net/udp6", format!("{words}:{:04X}", a.port()))
        }
    };
    let text = std::fs::read_to_string(file).ok()?;
    text.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.get(1) == Some(&local.as_str()))
        .and_then(|f| f.last()?.parse().ok())
}

/// One of net.core's buffer caps, in bytes.
pub fn core_sysctl(name: &str) -> usize {
    let path = format!("/proc/sys/net/core/{name}");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    text.trim()
        .parse()
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Whether this process has CAP_NET_ADMIN (bit 12 of CapEff).
pub fn has_net_admin() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .expect("CapEff in /proc/self/status")
        .trim();
    u64::from_str_radix(hex, 16).unwrap() & (1 << 12) != 0
}
