//! A cluster of real relays over Debian's nats-server, all on loopback:
//! rooms span the relays, every recipient gets every message exactly once
//! and in order, rooms stay isolated, and a NATS failure is local and
//! counted (local delivery never stops; the gap shows in the counters).

mod util;

use std::collections::HashMap;
use std::thread;
use std::time::{Duration, Instant};

use util::cluster::{member, until_connected};
use util::nats::Nats;
use util::{metric, metric_sum, spawn_relay, Client, RelayProc, PATIENCE};

/// A relay in the cluster reached through `url`.
fn node(url: &str, id: &str) -> RelayProc {
    let relay = spawn_relay(&["--cluster", url, "--node-id", id, "--format", "raw"]);
    relay.wait_metric("udphub_cluster_connected", 1.0);
    relay
}

/// Everything `c` receives until it is quiet for `quiet`.
fn drain(c: &Client, quiet: Duration) -> Vec<String> {
    let mut got = Vec::new();
    let deadline = Instant::now() + PATIENCE * 4;
    while let Some(d) = c.recv_within(quiet) {
        got.push(String::from_utf8_lossy(&d).into_owned());
        assert!(Instant::now() < deadline, "never quiet");
    }
    got
}

/// Three relays on one NATS server: a room spans them; each of its
/// members gets each member's messages exactly once, in the order sent;
/// another room with members on the same relays hears nothing of it; the
/// lobby spans the cluster too; and each relay publishes each message
/// once, whatever the number of nodes.
#[test]
fn three_relays_share_rooms_exactly_once_in_order_and_isolated() {
    let nats = Nats::start();
    let relays: Vec<RelayProc> = ["a", "b", "c"]
        .iter()
        .map(|id| node(&nats.url(), id))
        .collect();
    let red: Vec<Client> = relays.iter().map(|r| member(r, "red")).collect();
    let blue: Vec<Client> = relays.iter().map(|r| member(r, "blue")).collect();
    let lobby: Vec<Client> = relays.iter().map(Client::joined).collect();
    until_connected(&red[0], &[&red[1], &red[2]]);
    until_connected(&red[1], &[&red[0], &red[2]]);
    until_connected(&red[2], &[&red[0], &red[1]]);
    until_connected(&blue[0], &[&blue[1], &blue[2]]);
    until_connected(&lobby[2], &[&lobby[0], &lobby[1]]);
    let published_before: Vec<f64> = relays
        .iter()
        .map(|r| r.metric("udphub_cluster_published_total"))
        .collect();

    const EACH: usize = 50;
    for i in 0..EACH {
        for (s, c) in red.iter().enumerate() {
            c.send(format!("red {s} {i:03}").as_bytes());
        }
        if i % 10 == 0 {
            thread::sleep(Duration::from_millis(2));
        }
    }
    lobby[0].send(b"lobby hello");
    for (k, c) in red.iter().enumerate() {
        let got = drain(c, Duration::from_millis(500));
        let mut per_sender: HashMap<usize, Vec<usize>> = HashMap::new();
        for line in &got {
            let parts: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(parts[0], "red", "member {k} got {line:?}");
            let (s, i) = (parts[1].parse().unwrap(), parts[2].parse().unwrap());
            per_sender.entry(s).or_default().push(i);
        }
        for s in 0..red.len() {
            let seq = per_sender.remove(&s).unwrap_or_default();
            assert_eq!(
                seq,
                (0..EACH).collect::<Vec<_>>(),
                "member {k} from sender {s}: every message once, in order"
            );
        }
    }
    for c in &blue {
        assert_eq!(drain(c, Duration::from_millis(100)), Vec::<String>::new());
    }
    for c in &lobby {
        assert_eq!(drain(c, Duration::from_millis(300)), vec!["lobby hello"]);
    }
    for (r, before) in relays.iter().zip(published_before) {
        let text = r.scrape();
        let own = if std::ptr::eq(r, &relays[0]) {
            1.0
        } else {
            0.0
        };
        assert_eq!(
            metric(&text, "udphub_cluster_published_total") - before,
            EACH as f64 + own,
            "published once per message:\n{text}"
        );
        assert_eq!(metric(&text, "udphub_cluster_gap_total"), 0.0, "{text}");
        assert_eq!(
            metric_sum(&text, "udphub_cluster_dropped_total"),
            0.0,
            "{text}"
        );
    }
}

/// A sender on relay A streams into a room with members on A and B while
/// NATS is killed and restarted: the member on A gets every message (local
/// delivery never stops); the member on B gets no duplicate and nothing
/// out of order, and every message it missed is counted (dropped while
/// disconnected at A, or a gap in the stream at B).
#[test]
fn nats_down_and_back_loses_only_what_it_counts() {
    let mut nats = Nats::start();
    let a = node(&nats.url(), "a");
    let b = node(&nats.url(), "b");
    let sender = member(&a, "red");
    let local = member(&a, "red");
    let remote = member(&b, "red");
    until_connected(&sender, &[&local, &remote]);
    let remote_reader = thread::spawn(move || {
        let mut got = Vec::new();
        let deadline = Instant::now() + PATIENCE * 4;
        while Instant::now() < deadline {
            match remote.recv_within(Duration::from_millis(3000)) {
                Some(d) => got.push(String::from_utf8_lossy(&d).into_owned()),
                None if !got.is_empty() => break,
                None => {}
            }
        }
        got
    });
    let local_reader = thread::spawn(move || drain(&local, Duration::from_millis(3000)));
    const TOTAL: usize = 800;
    for i in 0..TOTAL {
        sender.send(format!("m {i:04}").as_bytes());
        thread::sleep(Duration::from_millis(5));
        if i == 150 {
            nats.kill();
        }
        if i == 300 {
            nats.restart();
        }
    }
    let local_got = local_reader.join().unwrap();
    let remote_got = remote_reader.join().unwrap();
    let numbers = |got: &[String]| -> Vec<usize> {
        got.iter()
            .filter_map(|l| l.strip_prefix("m ")?.parse().ok())
            .collect()
    };
    assert_eq!(
        numbers(&local_got),
        (0..TOTAL).collect::<Vec<_>>(),
        "local delivery stopped"
    );
    let remote_n = numbers(&remote_got);
    assert!(
        remote_n.windows(2).all(|w| w[0] < w[1]),
        "duplicates or reordering across the outage: {remote_n:?}"
    );
    assert!(
        remote_n.last() == Some(&(TOTAL - 1)),
        "the room never recovered: {remote_n:?}"
    );
    let missed = (TOTAL - remote_n.len()) as f64;
    assert!(missed > 0.0, "an outage with nothing lost? {remote_n:?}");
    let (ta, tb) = (a.scrape(), b.scrape());
    let counted = metric(&ta, "udphub_cluster_dropped_total{reason=\"disconnected\"}")
        + metric(&ta, "udphub_cluster_dropped_total{reason=\"queue_full\"}")
        + metric(
            &ta,
            "udphub_cluster_dropped_total{reason=\"publish_error\"}",
        )
        + metric(&tb, "udphub_cluster_gap_total");
    assert_eq!(missed, counted, "every miss counted\nA:\n{ta}\nB:\n{tb}");
    assert_eq!(metric(&tb, "udphub_cluster_connected"), 1.0);
}

/// Three relays, each on its own server of a routed three-server NATS
/// cluster. The server under relay C dies: C reconnects to another (it
/// learnt them from the cluster) and the room recovers; what C missed
/// meanwhile shows in the counters.
#[test]
fn a_relay_fails_over_to_another_nats_server() {
    let s1 = Nats::start_routed(&[]);
    let r1 = s1.route_port.unwrap();
    let s2 = Nats::start_routed(&[r1]);
    let mut s3 = Nats::start_routed(&[r1]);
    let a = node(&s1.url(), "a");
    let _b = node(&s2.url(), "b");
    let c = node(&s3.url(), "c");
    let sender = member(&a, "red");
    let far = member(&c, "red");
    until_connected(&sender, &[&far]);
    s3.kill();
    // C notices, reconnects elsewhere, resubscribes: the room recovers.
    let deadline = Instant::now() + PATIENCE * 4;
    let mut n = 0;
    loop {
        assert!(
            Instant::now() < deadline,
            "C never recovered:\n{}",
            c.scrape()
        );
        sender.send(format!("after {n}").as_bytes());
        n += 1;
        if far
            .recv_within(Duration::from_millis(100))
            .is_some_and(|d| d.starts_with(b"after"))
        {
            break;
        }
    }
    assert_eq!(c.metric("udphub_cluster_connected"), 1.0);
    // Every "after" message C's member did not get is counted somewhere.
    let got = 1 + drain(&far, Duration::from_millis(300))
        .iter()
        .filter(|d| d.starts_with("after"))
        .count();
    let (ta, tc) = (a.scrape(), c.scrape());
    let counted =
        metric_sum(&ta, "udphub_cluster_dropped_total") + metric(&tc, "udphub_cluster_gap_total");
    let missed = (n - got) as f64;
    assert_eq!(missed, counted, "A:\n{ta}\nC:\n{tc}");
}

/// A relay in the cluster with `--threads 2`: one bridge for both loops.
fn two_loop_node(url: &str, id: &str) -> RelayProc {
    let relay = spawn_relay(&[
        "--cluster",
        url,
        "--node-id",
        id,
        "--format",
        "raw",
        "--threads",
        "2",
        "--timeout",
        "60s",
    ]);
    relay.wait_metric("udphub_cluster_connected", 1.0);
    relay
}

/// Clients on each loop of a two-loop relay, per its per-loop gauge.
fn loop_clients(relay: &RelayProc) -> [f64; 2] {
    let text = relay.scrape();
    [0, 1].map(|i| metric(&text, &format!("udphub_shard_clients{{shard=\"{i}\"}}")))
}

/// Members of `room` ("" is the lobby) on `relay` (two loops), joined one
/// at a time until each loop has at least `per_loop`; each with the index
/// of the loop the kernel steered it to (seen on the per-loop gauge).
fn members_on_each_loop(relay: &RelayProc, room: &str, per_loop: usize) -> Vec<(Client, usize)> {
    let mut out: Vec<(Client, usize)> = Vec::new();
    for _ in 0..64 {
        if (0..2).all(|l| out.iter().filter(|(_, i)| *i == l).count() >= per_loop) {
            return out;
        }
        let before = loop_clients(relay);
        let c = member(relay, room);
        let deadline = Instant::now() + PATIENCE;
        let index = loop {
            let now = loop_clients(relay);
            if let Some(i) = (0..2).find(|&i| now[i] > before[i]) {
                break i;
            }
            assert!(Instant::now() < deadline, "no loop counted the new member");
            thread::sleep(Duration::from_millis(20));
        };
        out.push((c, index));
    }
    panic!("64 clients never landed on both loops");
}

/// Each of `senders` sends `each` numbered messages (interleaved), then an
/// end marker; every one of `members` must get every sender's messages
/// exactly once and in order, and nothing else. The markers make the end
/// observable: a sender's datagrams reach each member through FIFO queues
/// (a loop's socket, the shard queue, the NATS subject, the bridge's queue
/// to a loop), so a duplicate or stray would come before its marker.
fn exactly_once_in_order(tag: &str, senders: &[&Client], members: &[&Client], each: usize) {
    for i in 0..each {
        for (s, c) in senders.iter().enumerate() {
            c.send(format!("{tag} {s} {i:03}").as_bytes());
        }
        if i % 10 == 0 {
            thread::sleep(Duration::from_millis(2));
        }
    }
    for (s, c) in senders.iter().enumerate() {
        c.send(format!("end {s}").as_bytes());
    }
    for (k, m) in members.iter().enumerate() {
        let mut per_sender: HashMap<usize, Vec<usize>> = HashMap::new();
        let mut ends = 0;
        while ends < senders.len() {
            let d = m.recv();
            let line = String::from_utf8_lossy(&d).into_owned();
            let parts: Vec<&str> = line.split_whitespace().collect();
            if parts.first() == Some(&"end") {
                ends += 1;
                continue;
            }
            assert_eq!(parts.first(), Some(&tag), "member {k} got {line:?}");
            let (s, i) = (parts[1].parse().unwrap(), parts[2].parse().unwrap());
            per_sender.entry(s).or_default().push(i);
        }
        for s in 0..senders.len() {
            assert_eq!(
                per_sender.remove(&s).unwrap_or_default(),
                (0..each).collect::<Vec<_>>(),
                "member {k} from sender {s}: every message once, in order"
            );
        }
    }
}

/// Two relays with `--threads 2` on one NATS server, with members of a
/// room on both loops of both relays: every member gets every other
/// member's messages exactly once and in order, whichever loop of which
/// relay each is on (every pair of nodes and loops is a sender and a
/// recipient); another room on the same loops hears nothing of it; the
/// lobby spans every loop of every node; each relay publishes each of its
/// messages once (one bridge, not one per loop), and nothing is lost,
/// duplicated or dropped.
#[test]
fn rooms_span_every_loop_of_every_node_exactly_once_in_order() {
    let nats = Nats::start();
    let relays = [
        two_loop_node(&nats.url(), "a"),
        two_loop_node(&nats.url(), "b"),
    ];
    // One room at a time, so the per-loop gauge tells each member's loop.
    let red: Vec<(Client, usize, usize)> = relays
        .iter()
        .enumerate()
        .flat_map(|(r, relay)| {
            members_on_each_loop(relay, "red", 2)
                .into_iter()
                .map(move |(c, l)| (c, r, l))
        })
        .collect();
    let blue: Vec<(Client, usize)> = relays
        .iter()
        .flat_map(|relay| members_on_each_loop(relay, "blue", 1))
        .collect();
    let lobby: Vec<(Client, usize)> = relays
        .iter()
        .flat_map(|relay| members_on_each_loop(relay, "", 1))
        .collect();
    // A sender on each loop of each relay: (relay, loop) 0/0, 0/1, 1/0, 1/1.
    let senders: Vec<&Client> = (0..2)
        .flat_map(|r| (0..2).map(move |l| (r, l)))
        .map(|(r, l)| {
            &red.iter()
                .find(|(_, rr, ll)| (*rr, *ll) == (r, l))
                .expect("a member on every loop")
                .0
        })
        .collect();
    let all_red: Vec<&Client> = red.iter().map(|(c, _, _)| c).collect();
    for s in &senders {
        let others: Vec<&Client> = all_red
            .iter()
            .copied()
            .filter(|c| !std::ptr::eq(*c, *s))
            .collect();
        until_connected(s, &others);
    }
    let all_blue: Vec<&Client> = blue.iter().map(|(c, _)| c).collect();
    until_connected(all_blue[0], &all_blue[1..]);
    until_connected(
        all_blue[all_blue.len() - 1],
        &all_blue[..all_blue.len() - 1],
    );
    let all_lobby: Vec<&Client> = lobby.iter().map(|(c, _)| c).collect();
    until_connected(all_lobby[0], &all_lobby[1..]);
    until_connected(
        all_lobby[all_lobby.len() - 1],
        &all_lobby[..all_lobby.len() - 1],
    );
    let published_before: Vec<f64> = relays
        .iter()
        .map(|r| r.metric("udphub_cluster_published_total"))
        .collect();

    const EACH: usize = 50;
    exactly_once_in_order("red", &senders, &all_red, EACH);
    // Blue heard nothing of red: its next datagram is its own marker.
    let marker = b"blue marker";
    all_blue[0].send(marker);
    for (k, c) in all_blue.iter().enumerate() {
        assert_eq!(c.recv(), marker, "blue member {k} heard another room");
    }
    exactly_once_in_order(
        "lobby",
        &[all_lobby[0], all_lobby[all_lobby.len() - 1]],
        &all_lobby,
        5,
    );

    for (r, (relay, before)) in relays.iter().zip(published_before).enumerate() {
        let text = relay.scrape();
        // Its two red senders (messages and markers), blue's marker on
        // relay A, the lobby's sender on it (messages and marker).
        let own = 2.0 * (EACH as f64 + 1.0) + if r == 0 { 1.0 } else { 0.0 } + 6.0;
        assert_eq!(
            metric(&text, "udphub_cluster_published_total") - before,
            own,
            "relay {r} published each message once:\n{text}"
        );
        assert_eq!(metric(&text, "udphub_cluster_gap_total"), 0.0, "{text}");
        assert_eq!(
            metric_sum(&text, "udphub_cluster_dropped_total"),
            0.0,
            "{text}"
        );
        assert_eq!(
            metric_sum(&text, "udphub_delivery_dropped_total"),
            0.0,
            "{text}"
        );
    }
}

/// A node stays subscribed to a room while any of its loops has members:
/// the members on one loop of relay B leave, and those on its other loop
/// still get every message from relay A, once and in order; when the room
/// opens again on the first loop, its new member hears the room too.
#[test]
fn a_room_stays_subscribed_while_any_loop_has_members() {
    let nats = Nats::start();
    let a = two_loop_node(&nats.url(), "a");
    let b = two_loop_node(&nats.url(), "b");
    let sender = member(&a, "red");
    let on_b = members_on_each_loop(&b, "red", 1);
    let all: Vec<&Client> = on_b.iter().map(|(c, _)| c).collect();
    until_connected(&sender, &all);
    // Everyone on B's loop 0 leaves: the room closes there, not on loop 1.
    let (gone, stay): (Vec<_>, Vec<_>) = on_b.iter().partition(|(_, l)| *l == 0);
    let left_before = b.metric("udphub_clients_left_total");
    for (c, _) in &gone {
        c.send(b"quit");
    }
    b.wait_metric("udphub_clients_left_total", left_before + gone.len() as f64);
    let stay: Vec<&Client> = stay.iter().map(|(c, _)| c).collect();
    exactly_once_in_order("red", &[&sender], &stay, 30);
    // A newcomer on loop 0 opens the room there again and hears it (with
    // whoever else joined on loop 1 on the way).
    let newcomers = members_on_each_loop(&b, "red", 1);
    let mut now: Vec<&Client> = stay.clone();
    now.extend(newcomers.iter().map(|(c, _)| c));
    until_connected(&sender, &now);
    exactly_once_in_order("red", &[&sender], &now, 30);
    let tb = b.scrape();
    assert_eq!(metric(&tb, "udphub_cluster_gap_total"), 0.0, "{tb}");
    assert_eq!(metric_sum(&tb, "udphub_cluster_dropped_total"), 0.0, "{tb}");
}
