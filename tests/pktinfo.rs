//! A relay bound to a wildcard address on a host with several addresses
//! answers each client from the address that client sent to.
//!
//! Everything runs inside a network namespace this test creates (never the
//! host's network), deleted afterwards even on failure: its loopback gets
//! two more IPv4 addresses (127.0.0.2, 127.0.0.3) and two IPv6 ones
//! (fd00:7a::2, fd00:7a::3, unique local), and the relay binds the
//! namespace's wildcard address — allowed only there. Clients are Python
//! sockets bound to 127.0.0.1 / ::1 and *connected* to one of the extra
//! addresses, so the kernel drops anything that does not come from exactly
//! that address and the relay's port: a relay answering from whatever
//! address the route picks (127.0.0.1 / ::1 here) reaches none of them.

mod util;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use util::{udphub_bin, RelayProc, PATIENCE};

/// A network namespace, deleted on drop (so also when a test fails).
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A namespace with loopback up and the extra addresses on it; `None`
/// (skip) where namespaces or the tools are missing, except under CI,
/// where that fails the test.
fn namespace(tag: &str) -> Option<Netns> {
    for tool in ["ip", "python3"] {
        if !util::require_tool(tool) {
            return None;
        }
    }
    let ns = Netns(format!("udphub-pkt-{tag}-{}", std::process::id()));
    if let Err(e) = ip(&["netns", "add", &ns.0]) {
        if std::env::var_os("CI").is_some() {
            panic!("network namespaces are required under CI: {e}");
        }
        eprintln!("skipping: cannot create a network namespace ({e})");
        return None;
    }
    ip(&["-n", &ns.0, "link", "set", "lo", "up"]).unwrap();
    for addr in ["127.0.0.2/8", "127.0.0.3/8"] {
        ip(&["-n", &ns.0, "addr", "add", addr, "dev", "lo"]).unwrap();
    }
    for addr in ["fd00:7a::2/128", "fd00:7a::3/128"] {
        ip(&["-n", &ns.0, "addr", "add", addr, "dev", "lo", "nodad"]).unwrap();
    }
    Some(ns)
}

/// Starts `udphub ARGS --ready-file F` inside `ns` and waits (bounded)
/// until it is bound.
fn spawn_in(ns: &Netns, args: &[&str]) -> RelayProc {
    let ready = util::temp_path("pkt-ready");
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.0, udphub_bin()])
        .args(args)
        .arg("--ready-file")
        .arg(&ready)
        .env_remove("RUST_LOG");
    // `ip netns exec` execs the program: the child is the server itself,
    // so signals reach it directly.
    let (child, log, addrs) = util::spawn_until_ready(cmd, &ready);
    RelayProc {
        child,
        addr: addrs.udp,
        metrics: addrs.metrics,
        log,
    }
}

/// The clients, run inside the namespace. argv: the server's port, then
/// which clients ("4": two IPv4, "46": two IPv4 and two IPv6), then what
/// to do ("relay", "echo", or "overflow" with the metrics address).
/// Prints progress lines; `waiting for bye` when the relay may be stopped;
/// exits non-zero with `FAIL: …` on the first thing missing.
const DRIVER: &str = r#"
import socket, sys, time, urllib.request
port, families, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3]
V4 = [("127.0.0.1", "127.0.0.2"), ("127.0.0.1", "127.0.0.3")]
V6 = [("::1", "fd00:7a::2"), ("::1", "fd00:7a::3")]
pairs = {"4": V4, "46": V4 + V6}[families]

def fail(msg):
    sys.exit("FAIL: " + msg)

def family(addr):
    return socket.AF_INET6 if ":" in addr else socket.AF_INET

def client(src, dst, to_port):
    s = socket.socket(family(src), socket.SOCK_DGRAM)
    s.bind((src, 0))
    s.connect((dst, to_port))
    s.settimeout(5)
    return s

def expect(s, want, what):
    try:
        got = s.recv(2048)
    except socket.timeout:
        fail("%s: nothing came (a datagram from the wrong source address is dropped by a connected socket)" % what)
    if not got.startswith(want):
        fail("%s: got %r, want %r..." % (what, got, want))

if mode == "overflow":
    # 70 local addresses (all of 127/8 is local), one client each, in
    # order: the first 64 are answered from the address they used, the
    # rest from the one the route picks, and each of those is counted.
    for i in range(70):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        s.settimeout(5)
        dst = "127.0.1.%d" % (i + 1)
        s.sendto(b"^join^r", (dst, port))
        try:
            got, frm = s.recvfrom(64)
        except socket.timeout:
            fail("no ^room^ reply for the client of %s" % dst)
        want = dst if i < 64 else "127.0.0.1"
        if got != b"^room^r" or frm != (want, port):
            fail("client of %s: got %r from %r, want it from %s" % (dst, got, frm, want))
    print("tags ok", flush=True)
    series = "udphub_local_address_overflow_total "
    deadline = time.time() + 10
    while True:
        text = urllib.request.urlopen("http://%s/metrics" % sys.argv[4], timeout=5).read().decode()
        value = [float(l.split()[-1]) for l in text.splitlines() if l.startswith(series)]
        if value == [6.0]:
            break
        if time.time() > deadline:
            fail("%s is %r, want 6:\n%s" % (series, value, text))
        time.sleep(0.02)
    print("overflow counted", flush=True)
    sys.exit(0)

# The setup itself: a connected socket takes a datagram from the address
# it is connected to, and drops the same from the address a route picks.
for src, dst in pairs[::2]:
    right = socket.socket(family(dst), socket.SOCK_DGRAM)
    right.bind((dst, 0))
    probe_port = right.getsockname()[1]
    c = client(src, dst, probe_port)
    c.settimeout(0.3)
    wrong = socket.socket(family(src), socket.SOCK_DGRAM)
    wrong.bind((src, probe_port))
    wrong.sendto(b"wrong", c.getsockname()[:2])
    right.sendto(b"right", c.getsockname()[:2])
    if c.recv(64) != b"right":
        fail("the namespace does not tell sources apart")
    print("setup ok: %s" % dst, flush=True)

clients = [client(src, dst, port) for src, dst in pairs]
if mode == "echo":
    for i, c in enumerate(clients):
        c.send(b"ping %d" % i)
        expect(c, b"ping %d" % i, "client %d's echo" % i)
    print("echo ok", flush=True)
    sys.exit(0)

for i, c in enumerate(clients):
    c.send(b"^join^r")
    expect(c, b"^room^r", "client %d's ^room^ reply" % i)
print("replies ok", flush=True)
for i, c in enumerate(clients):
    c.send(b"from %d" % i)
    for j, d in enumerate(clients):
        expect(d, b"from %d" % i, "client %d's copy of client %d's message" % (j, i))
print("fan-out ok", flush=True)

# Client 0 now talks to the relay at client 1's address (same source
# address and port: the same member): what it gets comes from there.
clients[0].connect((pairs[1][1], port))
clients[0].send(b"^join^r")
expect(clients[0], b"^room^r", "client 0's ^room^ reply at its new address")
clients[1].send(b"moved")
for j, d in enumerate(clients):
    expect(d, b"moved", "client %d's copy after client 0 moved" % j)
print("move ok", flush=True)

print("waiting for bye", flush=True)
for i, c in enumerate(clients):
    expect(c, b"bye", "client %d's bye" % i)
print("bye ok", flush=True)
"#;

/// The driver, running inside `ns` against `port`.
struct Driver {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Driver {
    fn start(ns: &Netns, port: u16, families: &str, mode: &str) -> Driver {
        Driver::start_with(ns, port, families, mode, &[])
    }

    fn start_with(ns: &Netns, port: u16, families: &str, mode: &str, more: &[&str]) -> Driver {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &ns.0, "python3", "-c", DRIVER])
            .args([&port.to_string(), families, mode])
            .args(more)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the driver");
        let (tx, rx) = mpsc::channel();
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        Driver {
            child,
            lines: rx,
            seen: Vec::new(),
        }
    }

    /// Waits (bounded) for a line saying `needle`; fails with everything
    /// the driver said if it fails first or says nothing of the sort.
    fn expect(&mut self, needle: &str, relay: &RelayProc) {
        let deadline = Instant::now() + PATIENCE * 4;
        while Instant::now() < deadline {
            match self.lines.recv_timeout(Duration::from_millis(50)) {
                Ok(line) => {
                    let found = line.contains(needle);
                    let failed = line.starts_with("FAIL");
                    self.seen.push(line);
                    if found {
                        return;
                    }
                    if failed {
                        break;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        let relay_log: Vec<String> = relay.log.try_iter().collect();
        panic!(
            "the driver never said {needle:?}; it said:\n{}\nthe server logged:\n{}",
            self.seen.join("\n"),
            relay_log.join("\n")
        );
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the relay on `bind` in a fresh namespace with the `families`
/// clients: each gets its `^room^` reply, every message (its own and the
/// others', whichever address they used), then, after moving, what is sent
/// from its new address, and `bye` at SIGTERM.
fn relay_answers_from_the_address_used(tag: &str, bind: &str, families: &str) {
    let Some(ns) = namespace(tag) else { return };
    let mut relay = spawn_in(&ns, &["serve", "--bind", bind, "--metrics", "off"]);
    assert!(relay.addr.ip().is_unspecified(), "{}", relay.addr);
    let mut driver = Driver::start(&ns, relay.addr.port(), families, "relay");
    for step in [
        "setup ok",
        "replies ok",
        "fan-out ok",
        "move ok",
        "waiting for bye",
    ] {
        driver.expect(step, &relay);
    }
    relay.signal("TERM");
    assert!(relay.wait_exit().success());
    driver.expect("bye ok", &relay);
}

/// IPv4: a relay on 0.0.0.0 answers two clients, each connected to a
/// different address of the host, from that address.
#[test]
fn a_relay_on_the_ipv4_wildcard_answers_from_the_address_each_client_used() {
    relay_answers_from_the_address_used("v4", "0.0.0.0:0", "4");
}

/// Dual stack: a relay on [::] does the same for IPv4 clients (whose
/// addresses the kernel reports IPv4-mapped) and IPv6 clients, all in one
/// room.
#[test]
fn a_relay_on_the_ipv6_wildcard_answers_ipv4_and_ipv6_clients_from_the_address_each_used() {
    relay_answers_from_the_address_used("v6", "[::]:0", "46");
}

/// `udphub echo` shares the relay's loop and replies: on 0.0.0.0 it also
/// echoes from the address each client used.
#[test]
fn the_echo_server_on_the_wildcard_echoes_from_the_address_each_client_used() {
    let Some(ns) = namespace("echo") else { return };
    let echo = spawn_in(&ns, &["echo", "--bind", "0.0.0.0:0"]);
    let mut driver = Driver::start(&ns, echo.addr.port(), "4", "echo");
    driver.expect("setup ok", &echo);
    driver.expect("echo ok", &echo);
}

/// The table of local addresses is bounded: past 64 addresses a loop
/// tags no more (their clients are answered from the address the route
/// picks, as before) and counts each such datagram; the first 64 keep
/// theirs.
#[test]
fn past_64_local_addresses_the_rest_are_answered_untagged_and_counted() {
    let Some(ns) = namespace("many") else { return };
    let relay = spawn_in(
        &ns,
        &[
            "serve",
            "--bind",
            "0.0.0.0:0",
            "--metrics",
            "127.0.0.1:0",
            // The table is per loop: one loop, whatever UDPHUB_THREADS says.
            "--threads",
            "1",
        ],
    );
    let metrics = relay.metrics.expect("metrics on").to_string();
    let mut driver = Driver::start_with(&ns, relay.addr.port(), "4", "overflow", &[&metrics]);
    driver.expect("tags ok", &relay);
    driver.expect("overflow counted", &relay);
}
