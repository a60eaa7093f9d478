//! A cluster of real relays over Debian's nats-server, all on loopback:
//! rooms span the relays, every recipient gets every message exactly once
//! and in order, rooms stay isolated, and a NATS failure is local and
//! counted (local delivery never stops; the gap shows in the counters).

mod util;

use std::collections::HashMap;
use std::thread;
use std::time::{Duration, Instant};

use util::nats::Nats;
use util::{metric, metric_sum, spawn_relay, Client, RelayProc, PATIENCE};

/// A relay in the cluster reached through `url`.
fn node(url: &str, id: &str) -> RelayProc {
    let relay = spawn_relay(&["--cluster", url, "--node-id", id, "--format", "raw"]);
    relay.wait_metric("udphub_cluster_connected", 1.0);
    relay
}

/// A client of `relay` in `room` (the answer checked).
fn member(relay: &RelayProc, room: &str) -> Client {
    let c = Client::new(relay.addr);
    c.send(format!("^join^{room}").as_bytes());
    assert_eq!(c.recv(), format!("^room^{room}").into_bytes());
    c
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

/// Subscriptions travel through NATS asynchronously: `sender` sends
/// probes until every one of `members` has heard one, then everyone's
/// inbox is emptied.
fn until_connected(sender: &Client, members: &[&Client]) {
    let deadline = Instant::now() + PATIENCE * 2;
    let mut heard = vec![false; members.len()];
    let mut n = 0;
    while heard.iter().any(|h| !h) {
        assert!(
            Instant::now() < deadline,
            "the room never spanned the nodes"
        );
        sender.send(format!("probe {n}").as_bytes());
        n += 1;
        for (i, m) in members.iter().enumerate() {
            if m.recv_within(Duration::from_millis(50)).is_some() {
                heard[i] = true;
            }
        }
    }
    // Empty every inbox up to a last probe: the sender's datagrams reach
    // each member exactly once and in order, so once its last probe is
    // in, no earlier one is still on its way (an observable end, not a
    // sleep).
    let last = format!("probe end {n}");
    sender.send(last.as_bytes());
    let deadline = Instant::now() + PATIENCE * 2;
    for m in members.iter().copied().chain([sender]) {
        while m
            .recv_within(PATIENCE)
            .is_some_and(|d| d != last.as_bytes())
        {
            assert!(Instant::now() < deadline, "the last probe never came");
        }
    }
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
