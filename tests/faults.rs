//! The relay under conditions loopback alone cannot make.
//!
//! - A full send buffer: a network namespace this test creates (never the
//!   host's network), whose loopback gets a slow queueing discipline:
//!   the relay's fan-outs, and its answers to a join storm, wait for it.
//! - A bad network between `udphub chat` and the relay: 20 % loss,
//!   duplication, reordering, 200 ms delay, and a NAT that changes the
//!   client's port. This kernel has no `sch_netem` (nor the tc actions that
//!   drop at random), so the impairment is a user-space middlebox
//!   (`util::impair`) doing what netem would, seeded and counted.
//! - Duplicated handshakes, and SIGTERM in the middle of a fan-out.

mod util;

use std::collections::HashSet;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use util::impair::{Counts, Faults, Impair};
use util::proc::Proc;
use util::{metric, metric_sum, spawn_relay, udphub_bin, Client, PATIENCE};

/// A network namespace, deleted on drop.
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

fn run(cmd: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{cmd} {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A network namespace of the test's own whose loopback sends UDP through
/// `rate` with a deep queue (sent datagrams wait in the qdisc, still
/// charged to the sender's socket, as on a NIC), everything else at
/// 1 Gbit/s; `None` (a skip) only outside CI.
fn shaped_netns(tag: &str, rate: &str) -> Option<Netns> {
    let ns = Netns(format!("udphub-{tag}-{}", std::process::id()));
    if let Err(e) = run("ip", &["netns", "add", &ns.0]) {
        if std::env::var_os("CI").is_some() {
            panic!("network namespaces are required under CI: {e}");
        }
        eprintln!("skipping: cannot create a network namespace ({e})");
        return None;
    }
    run("ip", &["-n", &ns.0, "link", "set", "lo", "up"]).unwrap();
    let tc = |args: &str| {
        let mut all = vec!["-n", &ns.0];
        all.extend(args.split_whitespace());
        run("tc", &all).unwrap();
    };
    // (htb and u32: the qdiscs a container's kernel is most likely to have.)
    tc("qdisc add dev lo root handle 1: htb default 20");
    tc(&format!(
        "class add dev lo parent 1: classid 1:10 htb rate {rate} burst 4kb"
    ));
    tc("class add dev lo parent 1: classid 1:20 htb rate 1gbit quantum 60000");
    tc("qdisc add dev lo parent 1:10 handle 10: pfifo limit 10000");
    tc("filter add dev lo parent 1: protocol ip u32 match ip protocol 17 0xff flowid 1:10");
    Some(ns)
}

/// Drives the relay from inside the namespace: registers `CLIENTS` sockets
/// that do not read until the end, has one send `MESSAGES` messages, waits
/// (bounded) for the relay to have delivered them all, prints the final
/// scrape, and then what each socket received, in order.
const DRIVER: &str = r#"
import os, signal, socket, sys, time, urllib.request
udp_host, udp_port = sys.argv[1].rsplit(":", 1)
relay = (udp_host, int(udp_port))
metrics = "http://%s/metrics" % sys.argv[2]
relay_pid = int(sys.argv[3])
CLIENTS, MESSAGES = 20, 60

def scrape():
    return urllib.request.urlopen(metrics, timeout=5).read().decode()

def value(text, series):
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return 0.0

def wait(series, at_least):
    deadline = time.time() + 30
    while True:
        text = scrape()
        if value(text, series) >= at_least:
            return text
        if time.time() > deadline:
            sys.exit("%s never reached %s:\n%s" % (series, at_least, text))
        time.sleep(0.005)

socks = []
for _ in range(CLIENTS):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    s.bind(("127.0.0.1", 0))
    s.sendto(b"^hb^", relay)
    socks.append(s)
wait("udphub_clients_joined_total", CLIENTS)
for i in range(MESSAGES):
    socks[0].sendto(b"m%04d" % i + b"x" * 1000, relay)
wait('udphub_datagrams_received_total{kind="message"}', MESSAGES)
wait("udphub_deliveries_total", CLIENTS * MESSAGES)
# One more scrape after the loop is idle, so every counter of the last
# batch is in.
time.sleep(0.2)
print(scrape())
print("---")
want = [b"m%04d" % i + b"x" * 1000 for i in range(MESSAGES)]
in_order = 0
for s in socks:
    got = []
    s.settimeout(2)
    try:
        while len(got) < MESSAGES:
            got.append(s.recv(2048))
    except socket.timeout:
        pass
    if got == want:
        in_order += 1
    else:
        print("out of order or missing: %s" % [g[:5] for g in got])
print("in order %d" % in_order)
# Fill the buffer again and stop the relay while it is full: the queue
# ahead of the byes takes a quarter of a second to drain.
for i in range(MESSAGES):
    socks[0].sendto(b"n%04d" % i + b"x" * 1000, relay)
wait('udphub_datagrams_received_total{kind="message"}', 2 * MESSAGES)
os.kill(relay_pid, signal.SIGTERM)
byes = 0
deadline = time.time() + 10
for s in socks:
    try:
        while True:
            s.settimeout(max(0.01, deadline - time.time()))
            if s.recv(2048) == b"bye":
                byes += 1
                break
    except socket.timeout:
        pass
print("---")
print("byes %d" % byes)
"#;

/// A full send buffer loses nothing: the fan-outs it stops are parked and
/// resumed when the socket is writable, so every member gets every message,
/// in order, with no delivery dropped (and the buffer did fill, many
/// times). Stopped while its buffer is full, the relay drops what is still
/// parked (counted `shutdown`), waits for room and says `bye` to every
/// member.
#[test]
fn a_full_send_buffer_parks_and_every_member_gets_every_message_in_order() {
    for tool in ["ip", "tc", "python3", "taskset"] {
        if !util::require_tool(tool) {
            return;
        }
    }
    // UDP only (the metrics scrape is TCP and must not queue behind it)
    // through 8 Mbit/s with a deep queue: sent datagrams wait in the
    // qdisc, still charged to the relay's socket, so its small send buffer
    // fills every few datagrams (1.2 MB of fan-out take a second and a
    // half).
    let Some(ns) = shaped_netns("bf", "8mbit") else {
        return;
    };

    let ready = util::temp_path("bf-ready");
    // Relay and driver on one CPU: loopback hands each datagram the qdisc
    // releases to the backlog of the CPU that released it, and htb
    // releases from timers on either CPU, so across two CPUs the kernel
    // itself can swap two datagrams the relay sent in order (seen once in
    // a loaded suite run). The order checked here is the relay's.
    let on_cpu0 = ["-c", "0", "ip", "netns", "exec", &ns.0];
    let mut cmd = Command::new("taskset");
    // (`taskset` and `ip netns exec` exec the relay: the child's pid is
    // the relay's.)
    cmd.args(on_cpu0)
        .args([udphub_bin(), "serve"])
        .args(["--bind", "127.0.0.1:0", "--metrics", "127.0.0.1:0"])
        .args(["--send-buffer", "4096", "--format", "raw", "--ready-file"])
        .arg(&ready);
    let (mut relay, log, addrs) = util::spawn_until_ready(cmd, &ready);
    let metrics = addrs.metrics.expect("metrics on").to_string();
    let out = run(
        "taskset",
        &[
            &on_cpu0[..],
            &[
                "python3",
                "-c",
                DRIVER,
                &addrs.udp.to_string(),
                &metrics,
                &relay.id().to_string(),
            ],
        ]
        .concat(),
    );
    let deadline = Instant::now() + PATIENCE;
    let status = loop {
        match relay.try_wait().expect("try_wait") {
            Some(status) => break Some(status),
            None if Instant::now() > deadline => break None,
            None => thread::sleep(Duration::from_millis(10)),
        }
    };
    let _ = relay.kill();
    let _ = relay.wait();
    let log: Vec<String> = log.try_iter().collect();
    let log = log.join("\n");
    let out = out.unwrap();
    let parts: Vec<&str> = out.split("---").collect();
    let [text, order, byes] = parts[..] else {
        panic!("the driver's three parts:\n{out}\n{log}");
    };

    let recipients = metric(text, "udphub_fanout_recipients_total");
    let delivered = metric(text, "udphub_deliveries_total");
    assert_eq!(recipients, 60.0 * 20.0, "{text}");
    assert_eq!(delivered, recipients, "{text}");
    assert_eq!(
        metric_sum(text, "udphub_delivery_dropped_total"),
        0.0,
        "{text}"
    );
    assert!(
        metric(text, "udphub_send_buffer_full_total") > 0.0,
        "the send buffer never filled:\n{text}"
    );
    assert!(order.trim().ends_with("in order 20"), "{order}");
    assert!(status.is_some_and(|s| s.success()), "{status:?}\n{log}");
    assert_eq!(byes.trim(), "byes 20", "{log}");
}

/// Joins `CLIENTS` sockets at once (to eight rooms, none reading until
/// all are sent), then reads each one's answer; waits (bounded) for the
/// relay to have counted every answer, and prints the scrape and how many
/// were answered right.
const JOIN_DRIVER: &str = r#"
import socket, sys, time, urllib.request
udp_host, udp_port = sys.argv[1].rsplit(":", 1)
relay = (udp_host, int(udp_port))
metrics = "http://%s/metrics" % sys.argv[2]
CLIENTS = 400

def scrape():
    return urllib.request.urlopen(metrics, timeout=5).read().decode()

def value(text, series):
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return 0.0

socks = []
for _ in range(CLIENTS):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    socks.append(s)
for i, s in enumerate(socks):
    s.sendto(b"^join^r%d" % (i % 8), relay)
answered = 0
deadline = time.time() + 30
for i, s in enumerate(socks):
    s.settimeout(max(0.01, deadline - time.time()))
    try:
        got = s.recv(2048)
        if got == b"^room^r%d" % (i % 8):
            answered += 1
        else:
            print("client %d got %r" % (i, got))
    except socket.timeout:
        print("client %d got no answer" % i)
# The relay counts an answer after handing it to the kernel: wait for the
# count, so the scrape has them all.
deadline = time.time() + 10
text = scrape()
while value(text, "udphub_fanout_recipients_total") < CLIENTS and time.time() < deadline:
    time.sleep(0.005)
    text = scrape()
print(text)
print("---")
print("answered %d" % answered)
"#;

/// Replies wait for a full send buffer too: 400 clients join at once
/// through a slow loopback, so the relay's answers fill its 4 KiB send
/// buffer; every join is answered (`^room^`, from the address it was sent
/// to), none dropped, and the answers did wait (parked, and the buffer
/// was full).
#[test]
fn a_full_send_buffer_parks_replies_and_every_join_is_answered() {
    for tool in ["ip", "tc", "python3"] {
        if !util::require_tool(tool) {
            return;
        }
    }
    // UDP only through 4 Mbit/s with a deep queue (as above): the joins
    // wait in the qdisc, and the answers queue behind them, still charged
    // to the relay's small send buffer, which fills every few answers.
    let Some(ns) = shaped_netns("rf", "4mbit") else {
        return;
    };

    let ready = util::temp_path("rf-ready");
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.0, udphub_bin(), "serve"])
        .args(["--bind", "127.0.0.1:0", "--metrics", "127.0.0.1:0"])
        .args(["--send-buffer", "4096", "--ready-file"])
        .arg(&ready);
    let (mut relay, log, addrs) = util::spawn_until_ready(cmd, &ready);
    let metrics = addrs.metrics.expect("metrics on").to_string();
    let out = run(
        "ip",
        &[
            "netns",
            "exec",
            &ns.0,
            "python3",
            "-c",
            JOIN_DRIVER,
            &addrs.udp.to_string(),
            &metrics,
        ],
    );
    let _ = relay.kill();
    let _ = relay.wait();
    let log: Vec<String> = log.try_iter().collect();
    let out = out.unwrap_or_else(|e| panic!("{e}\n{}", log.join("\n")));
    let Some((text, answered)) = out.split_once("---") else {
        panic!("the driver's two parts:\n{out}");
    };

    assert_eq!(answered.trim(), "answered 400", "{out}");
    assert_eq!(metric(text, "udphub_room_joins_total"), 400.0, "{text}");
    assert_eq!(
        metric(text, "udphub_fanout_recipients_total"),
        400.0,
        "{text}"
    );
    assert_eq!(metric(text, "udphub_deliveries_total"), 400.0, "{text}");
    assert_eq!(
        metric_sum(text, "udphub_delivery_dropped_total"),
        0.0,
        "{text}"
    );
    assert!(
        metric(text, "udphub_replies_parked_total") > 0.0
            && metric(text, "udphub_send_buffer_full_total") > 0.0,
        "the answers never waited for the send buffer:\n{text}"
    );
}

/// Every datagram `c` receives until it has been quiet for `quiet`.
fn drain(c: &Client, quiet: Duration) -> Vec<String> {
    let mut got = Vec::new();
    let deadline = Instant::now() + PATIENCE * 2;
    while let Some(d) = c.recv_within(quiet) {
        got.push(String::from_utf8_lossy(&d).into_owned());
        assert!(Instant::now() < deadline, "the relay never went quiet");
    }
    got
}

/// Distinct `PREFIX N` numbers among `lines`.
fn distinct(lines: &[String], prefix: &str) -> usize {
    lines
        .iter()
        .filter_map(|l| l.find(prefix).map(|i| &l[i..]))
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .collect::<HashSet<_>>()
        .len()
}

/// `udphub chat` behind 20 % loss, 10 % duplication, 10 % reordering and
/// 200 ms of delay each way stays a member (its heartbeats, every 500 ms
/// against a 3 s timeout, get through), talks both ways, and the relay's
/// accounting stays exact: it received exactly what the middlebox and the
/// direct client sent it, and delivered exactly what they received.
#[test]
fn chat_stays_a_member_through_loss_duplication_reordering_and_delay() {
    let relay = spawn_relay(&["--timeout", "3s", "--format", "raw"]);
    let net = Impair::start(
        relay.addr,
        Faults {
            loss: 0.2,
            duplicate: 0.1,
            reorder: 0.1,
            delay: Duration::from_millis(200),
            seed: 7,
        },
    );
    let observer = Client::joined(&relay);
    let mut observer_sent = 1u64;
    let server = net.addr.to_string();
    let mut chat = Proc::spawn(&["chat", "--server", &server, "--heartbeat", "500ms"]);
    relay.wait_metric("udphub_clients_joined_total", 2.0);
    let mut observer_got = Vec::new();
    for i in 0..30 {
        chat.write_line(&format!("from chat {i}"));
        observer.send(format!("from observer {i}").as_bytes());
        observer_sent += 1;
        observer_got.extend(drain(&observer, Duration::from_millis(200)));
    }
    // Six timeouts' worth of lossy heartbeats later, still a member.
    assert_eq!(relay.metric("udphub_clients_expired_total"), 0.0);
    assert_eq!(relay.metric("udphub_clients"), 2.0);
    observer_got.extend(drain(&observer, Duration::from_millis(500)));
    let chat_got: Vec<String> = chat.lines.try_iter().collect();
    // 20 % loss each way: about 80 % arrive; 50 % is far outside chance.
    let heard = distinct(&observer_got, "from chat");
    assert!(
        heard >= 15,
        "observer heard {heard} of 30: {observer_got:?}"
    );
    let heard = distinct(&chat_got, "from observer");
    assert!(heard >= 15, "chat heard {heard} of 30: {chat_got:?}");

    // Leave (the quit may be lost: then the relay expires it), let the
    // middlebox drain, and hold the relay to what really crossed it.
    let (code, _) = chat.wait();
    assert_eq!(code, Some(0));
    net.settle(Duration::from_millis(400));
    observer_got.extend(drain(&observer, Duration::from_millis(300)));
    let text = relay.scrape();
    let c = &net.counts;
    assert!(Counts::get(&c.up_lost) > 0 && Counts::get(&c.down_lost) > 0);
    assert!(Counts::get(&c.up_out) > Counts::get(&c.up_in) - Counts::get(&c.up_lost));
    assert_eq!(
        metric_sum(&text, "udphub_datagrams_received_total"),
        (Counts::get(&c.up_out) + observer_sent) as f64,
        "{c:?}\n{text}"
    );
    assert_eq!(
        metric(&text, "udphub_deliveries_total"),
        (Counts::get(&c.down_in) + observer_got.len() as u64) as f64,
        "{c:?}\n{text}"
    );
}

/// A NAT gives the chat client a new port mid-conversation. Without verify
/// mode the next datagram from the new port registers it; in verify mode
/// the relay answers the chat's padded heartbeat with a cookie and the
/// chat proves itself again by itself. Either way the conversation goes
/// on, and the stale mapping expires (counted).
#[test]
fn chat_survives_a_nat_port_change() {
    for verify in [false, true] {
        let mut flags = vec!["--timeout", "1s", "--format", "raw"];
        if verify {
            flags.push("--verify-sources");
        }
        let relay = spawn_relay(&flags);
        let net = Impair::start(relay.addr, Faults::none());
        let observer = if verify {
            Client::verified(&relay)
        } else {
            Client::joined(&relay)
        };
        let server = net.addr.to_string();
        let mut chat = Proc::spawn(&["chat", "--server", &server, "--heartbeat", "200ms"]);
        relay.wait_metric("udphub_clients_joined_total", 2.0);
        chat.write_line("before the NAT moved us");
        // The observer heartbeats while it listens (the timeout is 1 s).
        let heard = |needle: &str| {
            observer.heartbeat();
            drain(&observer, Duration::from_millis(150))
                .iter()
                .any(|d| d.contains(needle))
        };
        let deadline = Instant::now() + PATIENCE;
        while !heard("before") {
            assert!(Instant::now() < deadline, "never heard 'before'");
        }
        net.rebind();
        let deadline = Instant::now() + PATIENCE;
        let mut n = 0;
        loop {
            assert!(
                Instant::now() < deadline,
                "verify={verify}: nothing from the new port got through"
            );
            chat.write_line(&format!("after {n}"));
            n += 1;
            if heard("after") {
                break;
            }
        }
        relay.wait_metric("udphub_clients_joined_total", 3.0);
        // The old mapping falls silent and expires; the new one stays.
        relay.wait_metric("udphub_clients_expired_total", 1.0);
        chat.write_line("still here");
        let deadline = Instant::now() + PATIENCE;
        while !heard("still here") {
            assert!(
                Instant::now() < deadline,
                "verify={verify}: lost after expiry"
            );
        }
        assert_eq!(relay.metric("udphub_clients"), 2.0, "verify={verify}");
    }
}

/// Duplicated `^cookie^C`, `^cookie^C^join^ROOM` and `^cookie^C^quit`
/// (a network that duplicates, or a client that retries) are idempotent:
/// one registration, one room membership (each join answered), one leave;
/// every datagram is still counted once.
#[test]
fn duplicated_handshakes_are_idempotent() {
    let relay = spawn_relay(&["--verify-sources"]);
    let c = Client::new(relay.addr);
    let cookie = c.cookie();
    let proof = [&b"^cookie^"[..], &cookie].concat();
    c.send(&proof);
    c.send(&proof);
    let mut join = [&proof[..], b"^join^red"].concat();
    join.resize(48, b' ');
    c.send(&join);
    c.send(&join);
    assert_eq!(c.recv(), b"^room^red");
    assert_eq!(c.recv(), b"^room^red");
    // (Counters are published after the batch that sent the answers.)
    relay.wait_metric("udphub_datagrams_received_total{kind=\"join\"}", 2.0);
    let text = relay.scrape();
    assert_eq!(metric(&text, "udphub_clients_joined_total"), 1.0, "{text}");
    assert_eq!(metric(&text, "udphub_clients"), 1.0, "{text}");
    // Both joins were answered (and counted as answered); one membership.
    assert_eq!(metric(&text, "udphub_room_joins_total"), 2.0, "{text}");
    assert_eq!(metric(&text, "udphub_rooms"), 1.0, "{text}");
    let quit = [&proof[..], b"^quit"].concat();
    c.send(&quit);
    c.send(&quit);
    // hello + 2 proofs + 2 joins + 2 quits, each counted once.
    relay.wait_metric("udphub_datagrams_received_total{kind=\"quit\"}", 1.0);
    let deadline = Instant::now() + PATIENCE;
    while metric_sum(&relay.scrape(), "udphub_datagrams_received_total") < 7.0 {
        assert!(Instant::now() < deadline, "{}", relay.scrape());
        thread::sleep(Duration::from_millis(10));
    }
    let text = relay.scrape();
    assert_eq!(
        metric_sum(&text, "udphub_datagrams_received_total"),
        7.0,
        "{text}"
    );
    assert_eq!(metric(&text, "udphub_clients_left_total"), 1.0, "{text}");
    assert_eq!(metric(&text, "udphub_clients_joined_total"), 1.0, "{text}");
    assert_eq!(metric(&text, "udphub_clients"), 0.0, "{text}");
}

/// SIGTERM while a fan-out is in full flow: the relay finishes promptly
/// with exit 0, and every member gets exactly one `bye`, as the last thing
/// it receives.
#[test]
fn sigterm_in_the_middle_of_a_fanout_says_bye_once_to_everyone() {
    const MEMBERS: usize = 20;
    let mut relay = spawn_relay(&["--format", "raw"]);
    let members: Vec<Client> = (0..MEMBERS).map(|_| Client::joined(&relay)).collect();
    // Room for a few thousand datagrams each, so a reader the scheduler
    // keeps waiting (2 busy cores) does not make its kernel drop the bye;
    // the kernel's own drop count for the socket is in the failure message.
    for m in &members {
        let _ = socket2::SockRef::from(&m.sock).set_recv_buffer_size(4 << 20);
    }
    let flowing = Arc::new(AtomicBool::new(true));
    // Each member reads on its own thread, so no buffer overflows and a
    // bye is never lost behind the flood.
    let readers: Vec<_> = members
        .into_iter()
        .map(|m| {
            thread::spawn(move || {
                let (mut byes, mut after_bye, mut got) = (0, 0, 0u64);
                let deadline = Instant::now() + PATIENCE * 2;
                while Instant::now() < deadline {
                    match m.recv_within(Duration::from_millis(300)) {
                        Some(d) if d == b"bye" => byes += 1,
                        Some(_) if byes > 0 => after_bye += 1,
                        Some(_) => got += 1,
                        None if byes > 0 => break,
                        None => {}
                    }
                }
                (byes, after_bye, got, m)
            })
        })
        .collect();
    let sender = Client::new(relay.addr);
    let flow = Arc::clone(&flowing);
    let flood = thread::spawn(move || {
        let mut sent = 0u64;
        while flow.load(Ordering::SeqCst) && sent < 1_000_000 {
            let _ = sender.sock.send_to(&[b'm'; 500], sender.relay);
            sent += 1;
            if sent % 200 == 0 {
                thread::sleep(Duration::from_millis(1));
            }
        }
    });
    relay.wait_metric("udphub_deliveries_total", 2_000.0);
    relay.signal("TERM");
    let status = relay.wait_exit();
    flowing.store(false, Ordering::SeqCst);
    flood.join().unwrap();
    assert!(status.success(), "{status}");
    for r in readers {
        let (byes, after_bye, got, m) = r.join().unwrap();
        assert!(got > 0, "{} got no fan-out before the bye", m.addr());
        assert_eq!(
            byes,
            1,
            "{}: {byes} byes ({} datagrams dropped by its kernel socket)",
            m.addr(),
            util::socket_drops(m.addr()).map_or("?".into(), |d| d.to_string())
        );
        assert_eq!(after_bye, 0, "{}: datagrams after the bye", m.addr());
    }
}

/// The diagnostic the bye test prints: the kernel's drop count for one
/// socket, read from /proc/net/udp.
#[test]
fn socket_drops_reads_the_kernels_count_for_one_socket() {
    let full = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    socket2::SockRef::from(&full)
        .set_recv_buffer_size(4096)
        .unwrap();
    let quiet = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for _ in 0..200 {
        sender
            .send_to(&[0u8; 1000], full.local_addr().unwrap())
            .unwrap();
    }
    let dropped = util::socket_drops(full.local_addr().unwrap()).expect("listed");
    assert!(dropped > 0, "{dropped}");
    assert_eq!(util::socket_drops(quiet.local_addr().unwrap()), Some(0));
}
