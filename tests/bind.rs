//! One address, one relay, through the real binary: a second relay on a
//! busy address fails with exit 2 and names the holder, whatever its
//! `--threads`; a socket another process adds to the loops' SO_REUSEPORT
//! group gets none of the clients' datagrams and moves no client to
//! another loop, and the relay reports it; many clients of one loopback
//! address spread over every loop.

mod util;

use std::net::UdpSocket;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use socket2::{Domain, Socket, Type};
use util::{metric, spawn_relay, Client, RelayProc, PATIENCE};

/// Runs `udphub serve --bind ADDR --threads THREADS` (no metrics) and
/// waits, bounded, for it to exit; returns its code and stderr. A relay
/// that starts instead is killed and fails the test.
fn second_relay(addr: &str, threads: &str) -> (Option<i32>, String) {
    let mut child = Command::new(util::udphub_bin())
        .args(["serve", "--bind", addr, "--threads", threads])
        .args(["--metrics", "off"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn udphub");
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                use std::io::Read;
                let _ = e.read_to_string(&mut err);
            }
            return (status.code(), err);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("a second relay on {addr} (--threads {threads}) started");
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Asserts a second relay on `first`'s address fails with exit 2 and one
/// line naming the address, the first relay's pid, and what to do.
fn refused(first: &RelayProc, threads: &str) {
    let addr = first.addr.to_string();
    let (code, err) = second_relay(&addr, threads);
    assert_eq!(code, Some(2), "--threads {threads}: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.contains("cannot bind")).collect();
    assert_eq!(lines.len(), 1, "--threads {threads}: {err}");
    let line = lines[0];
    assert!(line.contains(&addr), "{line}");
    assert!(
        line.contains(&format!("held by pid {} (udphub)", first.child.id())),
        "{line}"
    );
    assert!(
        line.contains("choose another address (--bind) or stop that process"),
        "{line}"
    );
}

/// A relay with two loops holds its address against a second relay with
/// one, two, four or `auto` loops.
#[test]
fn a_second_relay_on_a_busy_address_fails_and_names_the_holder() {
    let first = spawn_relay(&["--threads", "2"]);
    for threads in ["1", "2", "4", "auto"] {
        refused(&first, threads);
    }
}

/// So does a relay with one loop (its socket has no SO_REUSEPORT at all).
#[test]
fn a_lone_relay_holds_its_address_too() {
    let first = spawn_relay(&[]);
    for threads in ["1", "2", "4"] {
        refused(&first, threads);
    }
}

/// A SO_REUSEPORT socket of the same user bound to the relay's address
/// once it runs joins the loops' group: it receives none of 200 clients'
/// datagrams, every client keeps its loop (none joins twice) and gets
/// exactly its own traffic back, and the relay reports the stranger.
#[test]
fn a_stranger_in_the_group_gets_nothing_and_moves_nobody() {
    let relay = spawn_relay(&["--threads", "2", "--format", "raw", "--timeout", "60s"]);
    let clients: Vec<Client> = (0..200).map(|_| Client::new(relay.addr)).collect();
    // Each client in a room of its own: `^room^` proves the relay heard it.
    for (i, c) in clients.iter().enumerate() {
        let mut join = format!("^join^r{i}").into_bytes();
        join.resize(16, b' ');
        c.send(&join);
    }
    for (i, c) in clients.iter().enumerate() {
        assert_eq!(c.recv(), format!("^room^r{i}").into_bytes());
    }
    assert_eq!(relay.metric("udphub_clients_joined_total"), 200.0);

    let stranger = Socket::new(Domain::IPV4, Type::DGRAM, None).unwrap();
    stranger.set_reuse_port(true).unwrap();
    stranger
        .bind(&relay.addr.into())
        .expect("a same-user SO_REUSEPORT socket joins the group");
    let stranger: UdpSocket = stranger.into();
    stranger.set_nonblocking(true).unwrap();

    // Every client talks in its room and hears exactly itself: its
    // datagrams still reach the loop that holds its membership.
    for (i, c) in clients.iter().enumerate() {
        c.send(format!("m{i}").as_bytes());
    }
    for (i, c) in clients.iter().enumerate() {
        assert_eq!(c.recv(), format!("m{i}").into_bytes(), "client {i}");
    }
    // Loopback hands a datagram to its socket within the send: by now
    // the stranger would hold anything meant for the relay.
    let mut buf = [0u8; 64];
    assert!(
        stranger.recv_from(&mut buf).is_err(),
        "the stranger received a client's datagram"
    );
    let text = relay.scrape();
    assert_eq!(
        metric(&text, "udphub_clients_joined_total"),
        200.0,
        "{text}"
    );
    assert_eq!(metric(&text, "udphub_clients"), 200.0);
    assert_eq!(
        metric(&text, "udphub_datagrams_received_total{kind=\"message\"}"),
        200.0
    );

    // The relay notices, and names this process.
    relay.wait_metric("udphub_foreign_sockets", 1.0);
    let warning = relay.expect_log("another process holds a socket on the relay's address");
    assert!(
        warning.contains(&format!("held by pid {}", std::process::id())),
        "{warning}"
    );
    for c in &clients {
        assert!(c.recv_within(Duration::from_millis(1)).is_none());
    }
}

/// 400 clients of 127.0.0.1 (one address, many ports, as in the loopback
/// benchmarks) spread over four loops: each gets a fair share.
#[test]
fn many_clients_of_one_address_spread_over_every_loop() {
    let relay = spawn_relay(&["--threads", "4", "--timeout", "60s"]);
    let clients: Vec<Client> = (0..400).map(|_| Client::new(relay.addr)).collect();
    for c in &clients {
        c.send(b"^hb^");
    }
    relay.wait_metric("udphub_clients", 400.0);
    let text = relay.scrape();
    let shares: Vec<f64> = (0..4)
        .map(|i| metric(&text, &format!("udphub_shard_clients{{shard=\"{i}\"}}")))
        .collect();
    assert_eq!(shares.iter().sum::<f64>(), 400.0, "{text}");
    // A fair share is 100; a loop under 50 means the steering is skewed
    // (about 6 standard deviations for a uniform hash).
    assert!(shares.iter().all(|&n| n >= 50.0), "{shares:?}");
}
