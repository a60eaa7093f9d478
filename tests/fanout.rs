//! Sliced fan-out, through the real binary: a message to a big room is sent
//! a slice at a time between reads, so another room's message overtakes it,
//! and its own room's next messages still arrive in order, nothing dropped.

mod util;

use std::net::UdpSocket;
use std::time::{Duration, Instant};

use util::{metric_sum, spawn_relay, Client, PATIENCE};

/// Members of the big room: sockets of this process, each its own source.
const MEMBERS: usize = 4000;
/// Positions per slice: the big room's fan-out takes MEMBERS / SLICE
/// passes of the loop, each of which reads first.
const SLICE: &str = "32";

/// Registers `n` lobby members, each a socket that never reads (the kernel
/// drops what overflows its queue: that is not the relay's count).
fn members(relay: &util::RelayProc, n: usize) -> Vec<UdpSocket> {
    let before = relay.metric("udphub_clients_joined_total");
    let socks: Vec<UdpSocket> = (0..n)
        .map(|_| {
            let s = UdpSocket::bind("127.0.0.1:0").expect("bind a member");
            s.send_to(b"^hb^", relay.addr).expect("register a member");
            s
        })
        .collect();
    relay.wait_metric("udphub_clients_joined_total", before + n as f64);
    socks
}

/// While a message to a 4,000-member room is being fanned out 32 at a time,
/// a member of another room who speaks just after gets its echo before the
/// big room's last member gets the big message: the loop read it between
/// two slices. The big room's messages reach its last member in order, and
/// the relay drops no delivery.
#[test]
fn another_rooms_echo_overtakes_a_big_rooms_fanout() {
    let relay = spawn_relay(&["--format", "raw", "--fanout-slice", SLICE]);
    let big = members(&relay, MEMBERS);
    // The last to join is last in the lobby's member list: the fan-out's
    // last delivery.
    let last = Client::joined(&relay);
    let other = Client::new(relay.addr);
    other.send(b"^join^other");
    assert_eq!(other.recv(), b"^room^other");

    big[0].send_to(b"big 1", relay.addr).unwrap();
    other.send(b"small");
    big[0].send_to(b"big 2", relay.addr).unwrap();
    assert_eq!(last.recv(), b"big 1");
    // By the time the last member has the big message, the other room's
    // echo was sent: it is already waiting (no blocking read).
    other.sock.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 64];
    let echo = other.sock.recv(&mut buf).map(|n| buf[..n].to_vec());
    other.sock.set_nonblocking(false).unwrap();
    assert_eq!(
        echo.ok().as_deref(),
        Some(&b"small"[..]),
        "the other room's echo waited for the big room's fan-out"
    );
    assert_eq!(last.recv(), b"big 2", "the big room's messages in order");

    // Two big messages to every lobby member, the small one's echo, and
    // the `^room^` answer.
    let all = 2.0 * (MEMBERS as f64 + 1.0) + 1.0 + 1.0;
    relay.wait_metric("udphub_fanout_recipients_total", all);
    let deadline = Instant::now() + PATIENCE;
    let text = loop {
        let text = relay.scrape();
        if util::metric(&text, "udphub_deliveries_total") >= all || Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(
        util::metric(&text, "udphub_deliveries_total"),
        all,
        "{text}"
    );
    assert_eq!(
        metric_sum(&text, "udphub_delivery_dropped_total"),
        0.0,
        "{text}"
    );
    assert!(
        util::metric(&text, "udphub_fanouts_parked_total") >= 2.0,
        "{text}"
    );
}
