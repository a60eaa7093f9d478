//! `--threads N`: several loops on one port, through the real binary. The
//! protocol is the same whichever loop a client lands on: every member
//! gets every message of its room exactly once and in order, rooms stay
//! isolated, `bye` reaches everyone, verify mode works, and the metrics
//! add up across loops.

mod util;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use util::{metric, metric_sum, spawn_relay, Client, RelayProc};

/// `n` clients registered with the relay (heartbeats), checked by the
/// joined counter.
fn members(relay: &RelayProc, n: usize) -> Vec<Client> {
    let before = relay.metric("udphub_clients_joined_total");
    let clients: Vec<Client> = (0..n).map(|_| Client::new(relay.addr)).collect();
    for c in &clients {
        c.send(b"^hb^");
    }
    relay.wait_metric("udphub_clients_joined_total", before + n as f64);
    clients
}

/// Reads `count` datagrams from each client, in order.
fn received(clients: &[Client], count: usize) -> Vec<Vec<Vec<u8>>> {
    clients
        .iter()
        .map(|c| (0..count).map(|_| c.recv()).collect())
        .collect()
}

/// Sends a last message `end` from each of `senders`, and checks that every
/// client then receives nothing but those markers before it has all of
/// them: a sender's datagrams reach a loop through one FIFO queue, so a
/// duplicate of anything it sent earlier would arrive before its marker.
/// An observable end to "nothing more", instead of a sleep.
fn nothing_more(clients: &[Client], senders: &[usize]) {
    for &s in senders {
        clients[s].send(format!("end{s}").as_bytes());
    }
    for (n, c) in clients.iter().enumerate() {
        let mut ends = 0;
        while ends < senders.len() {
            let d = c.recv();
            assert!(
                d.starts_with(b"end"),
                "client {n}: a stray or duplicate datagram {:?}",
                String::from_utf8_lossy(&d)
            );
            ends += 1;
        }
    }
}

/// Both shards got clients, per the per-shard gauge.
fn shards_in_use(relay: &RelayProc) -> usize {
    let text = relay.scrape();
    text.lines()
        .filter(|l| l.starts_with("udphub_shard_clients{"))
        .filter(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) > Some(0.0))
        .count()
}

fn lobby_exactly_once_in_order(threads: &str) {
    let relay = spawn_relay(&["--threads", threads, "--format", "raw", "--timeout", "60s"]);
    let clients = members(&relay, 64);
    relay.wait_metric("udphub_clients", 64.0);
    assert!(shards_in_use(&relay) >= 2, "{}", relay.scrape());
    // Two senders, on whatever loops they landed on, interleaved.
    for i in 0..20 {
        clients[0].send(format!("a{i}").as_bytes());
        clients[63].send(format!("b{i}").as_bytes());
    }
    for (n, got) in received(&clients, 40).into_iter().enumerate() {
        let a: Vec<&Vec<u8>> = got.iter().filter(|m| m[0] == b'a').collect();
        let b: Vec<&Vec<u8>> = got.iter().filter(|m| m[0] == b'b').collect();
        let want = |p: char| {
            (0..20)
                .map(|i| format!("{p}{i}").into_bytes())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            a.into_iter().cloned().collect::<Vec<_>>(),
            want('a'),
            "client {n}"
        );
        assert_eq!(
            b.into_iter().cloned().collect::<Vec<_>>(),
            want('b'),
            "client {n}"
        );
    }
    // Nothing more (no duplicate) for anyone.
    nothing_more(&clients, &[0, 63]);
    // The accounting adds up across loops.
    relay.wait_metric("udphub_deliveries_total", 42.0 * 64.0);
    let text = relay.scrape();
    assert_eq!(metric(&text, "udphub_clients"), 64.0);
    assert_eq!(
        metric(&text, "udphub_datagrams_received_total{kind=\"message\"}"),
        42.0
    );
    assert_eq!(metric(&text, "udphub_deliveries_total"), 42.0 * 64.0);
    assert_eq!(
        metric(&text, "udphub_fanout_recipients_total"),
        metric(&text, "udphub_deliveries_total")
            + metric_sum(&text, "udphub_delivery_dropped_total")
    );
}

#[test]
fn two_loops_deliver_the_lobby_exactly_once_in_order() {
    lobby_exactly_once_in_order("2");
}

#[test]
fn four_loops_on_two_cores_do_too() {
    lobby_exactly_once_in_order("4");
}

/// Ten rooms of twelve, spread over the loops by the kernel: each room
/// hears exactly its own messages.
#[test]
fn rooms_span_loops_and_stay_isolated() {
    let relay = spawn_relay(&["--threads", "2", "--format", "raw", "--timeout", "60s"]);
    let clients: Vec<Client> = (0..120).map(|_| Client::new(relay.addr)).collect();
    for (i, c) in clients.iter().enumerate() {
        let mut join = format!("^join^r{}", i % 10).into_bytes();
        join.resize(16, b' ');
        c.send(&join);
    }
    for (i, c) in clients.iter().enumerate() {
        assert_eq!(c.recv(), format!("^room^r{}", i % 10).into_bytes());
    }
    assert!(shards_in_use(&relay) == 2);
    // No wait here: a loop announces a room before it answers the join, and
    // reads the others' news before every hand-off, so once every `^room^`
    // is in, every loop knows which rooms the others have.
    for (room, sender) in clients.iter().take(10).enumerate() {
        for k in 0..5 {
            sender.send(format!("r{room}-{k}").as_bytes());
        }
    }
    for (i, c) in clients.iter().enumerate() {
        let want: Vec<Vec<u8>> = (0..5)
            .map(|k| format!("r{}-{k}", i % 10).into_bytes())
            .collect();
        let got: Vec<Vec<u8>> = (0..5).map(|_| c.recv()).collect();
        assert_eq!(got, want, "client {i}");
    }
    // Nothing stray: each room's sender ends with a marker, and the next
    // thing every member gets is its own room's marker (a stray datagram
    // from that sender would come before it, through the same queue).
    for (room, sender) in clients.iter().take(10).enumerate() {
        sender.send(format!("end{room}").as_bytes());
    }
    for (i, c) in clients.iter().enumerate() {
        assert_eq!(
            c.recv(),
            format!("end{}", i % 10).into_bytes(),
            "client {i}"
        );
    }
    relay.wait_metric(
        "udphub_deliveries_total",
        120.0 + 10.0 * 5.0 * 12.0 + 10.0 * 12.0,
    );
    assert_eq!(
        relay.metric("udphub_deliveries_total"),
        120.0 + 10.0 * 5.0 * 12.0 + 10.0 * 12.0
    );
}

/// SIGTERM: every loop says bye to its own clients, once each.
#[test]
fn every_loop_says_bye() {
    let mut relay = spawn_relay(&["--threads", "2"]);
    let clients = members(&relay, 32);
    relay.signal("TERM");
    for c in &clients {
        assert_eq!(c.recv(), b"bye");
    }
    assert!(relay.wait_exit().success());
    for c in &clients {
        assert!(c.recv_within(Duration::from_millis(100)).is_none());
    }
}

/// Verify mode on several loops: one key, each client's handshake works
/// on whichever loop its address hashes to.
#[test]
fn verify_mode_works_on_every_loop() {
    let relay = spawn_relay(&["--threads", "2", "--verify-sources", "--format", "raw"]);
    let clients: Vec<Client> = (0..24).map(|_| Client::verified(&relay)).collect();
    assert_eq!(shards_in_use(&relay), 2);
    clients[5].send(b"hello all");
    for c in &clients {
        assert_eq!(c.recv(), b"hello all");
    }
    let by_addr: HashMap<SocketAddr, usize> = clients
        .iter()
        .enumerate()
        .map(|(i, c)| (c.addr(), i))
        .collect();
    assert_eq!(by_addr.len(), 24);
}

/// A bad value is one line and exit 2; threads cannot change on reload.
#[test]
fn threads_flag_is_checked() {
    let out = std::process::Command::new(util::udphub_bin())
        .args(["serve", "--threads", "0", "--check-config"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--threads must be between 1 and 64"), "{err}");
    let out = std::process::Command::new(util::udphub_bin())
        .args(["serve", "--threads", "auto", "--check-config"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("threads "));
}
