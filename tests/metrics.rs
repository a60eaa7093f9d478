//! The metrics endpoint: lint-clean, complete, and every datagram accounted.

mod util;

use std::io::Write;
use std::net::UdpSocket;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use util::{metric, metric_sum, spawn_relay, Client, PATIENCE};

/// Every metric named in DESIGN.md is exported, with HELP and TYPE.
#[test]
fn all_design_metrics_are_exported() {
    let relay = spawn_relay(&[]);
    let a = Client::joined(&relay);
    a.send(b"m");
    a.recv();
    relay.wait_metric("udphub_fanout_duration_seconds_count", 1.0);
    let text = relay.scrape();
    for (name, kind) in [
        ("udphub_datagrams_received_total", "counter"),
        ("udphub_deliveries_total", "counter"),
        ("udphub_dropped_total", "counter"),
        ("udphub_clients", "gauge"),
        ("udphub_clients_joined_total", "counter"),
        ("udphub_clients_expired_total", "counter"),
        ("udphub_clients_left_total", "counter"),
        ("udphub_fanout_duration_seconds", "histogram"),
        ("udphub_recv_batch_size", "histogram"),
        ("udphub_kernel_rx_dropped_total", "counter"),
        ("udphub_delivery_dropped_total", "counter"),
        ("udphub_fanout_recipients_total", "counter"),
        ("udphub_loop_iteration_seconds", "histogram"),
        ("udphub_recv_errors_total", "counter"),
        ("udphub_local_address_overflow_total", "counter"),
        ("udphub_rooms", "gauge"),
        ("udphub_room_joins_total", "counter"),
        ("udphub_room_join_refused_total", "counter"),
    ] {
        assert!(
            text.contains(&format!("# TYPE {name} {kind}")),
            "{name} missing:\n{text}"
        );
        assert!(
            text.contains(&format!("# HELP {name} ")),
            "{name} has no HELP"
        );
    }
}

/// `promtool check metrics` accepts a live scrape.
#[test]
fn promtool_accepts_a_live_scrape() {
    if !util::require_tool("promtool") {
        return;
    }
    let relay = spawn_relay(&[]);
    let a = Client::joined(&relay);
    a.send(b"m");
    a.recv();
    a.send(&[0u8; 2000]);
    relay.wait_metric("udphub_dropped_total{reason=\"oversize\"}", 1.0);
    let text = relay.scrape();
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn promtool");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Datagrams the kernel drops while the relay is stalled show up in
/// udphub_kernel_rx_dropped_total (SO_RXQ_OVFL).
#[test]
fn kernel_receive_drops_are_counted() {
    let relay = spawn_relay(&["--recv-buffer", "4096"]);
    relay.signal("STOP");
    let flood = UdpSocket::bind("127.0.0.1:0").unwrap();
    // A 4 KiB receive buffer holds a handful of these; 2000 overflow it.
    for _ in 0..2000 {
        let _ = flood.send_to(&[b'x'; 512], relay.addr);
    }
    relay.signal("CONT");
    // The counter rides on the next datagram queued after the drops.
    let deadline = Instant::now() + PATIENCE;
    let mut dropped = 0.0;
    while dropped == 0.0 && Instant::now() < deadline {
        flood.send_to(b"^hb^", relay.addr).unwrap();
        thread::sleep(Duration::from_millis(50));
        dropped = relay.metric("udphub_kernel_rx_dropped_total");
    }
    assert!(dropped > 0.0, "no kernel drops counted");
    let received = metric_sum(&relay.scrape(), "udphub_datagrams_received_total");
    assert!(received + dropped <= 2000.0 + 100.0);
}

/// A mixed flood: every datagram the relay read is counted exactly once, and
/// every delivery attempt is either delivered or dropped with a reason.
#[test]
fn accounting_invariant_holds_under_a_flood() {
    let relay = spawn_relay(&["--timeout", "60s"]);
    let receivers: Vec<Client> = (0..16).map(|_| Client::joined(&relay)).collect();
    let joined = relay.metric("udphub_clients_joined_total");
    assert_eq!(joined, 16.0);

    const SENDERS: usize = 4;
    const PER_SENDER: usize = 5000;
    let addr = relay.addr;
    let softnet_before = softnet_drops();
    let senders: Vec<_> = (0..SENDERS)
        .map(|s| {
            thread::spawn(move || {
                let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
                for i in 0..PER_SENDER {
                    let d: Vec<u8> = match i % 20 {
                        0 => b"^hb^".to_vec(),
                        1 => Vec::new(),
                        2 => vec![b'o'; 1500],
                        3 => b"quit".to_vec(),
                        4 => b"\xff\xfe".to_vec(),
                        _ => format!("s{s} m{i}").into_bytes(),
                    };
                    sock.send_to(&d, addr).unwrap();
                    // Pace a little so loopback's per-CPU backlog (which the
                    // relay can't see or count) never overflows.
                    if i % 100 == 99 {
                        thread::sleep(Duration::from_millis(1));
                    }
                }
            })
        })
        .collect();
    for s in senders {
        s.join().unwrap();
    }
    let sent = (SENDERS * PER_SENDER + 16) as f64;

    // Wait (bounded, failing loudly) until the relay has read or counted
    // every datagram. The one loss it cannot see is loopback's per-CPU
    // backlog overflowing before the socket; the kernel counts that in
    // /proc/net/softnet_stat, so it is admitted only as far as counted there.
    let deadline = Instant::now() + Duration::from_secs(20);
    let backlog_lost = loop {
        let text = relay.scrape();
        let seen = metric_sum(&text, "udphub_datagrams_received_total")
            + metric(&text, "udphub_kernel_rx_dropped_total");
        let backlog_lost = softnet_drops() - softnet_before;
        if seen == sent || (seen < sent && seen + backlog_lost >= sent) {
            break backlog_lost;
        }
        assert!(
            Instant::now() < deadline,
            "{seen} of {sent} datagrams accounted for ({backlog_lost} lost before the socket):\n{text}"
        );
        thread::sleep(Duration::from_millis(50));
    };
    // Counters of one flush are published one after another: read until
    // two scrapes agree.
    let text = stable_scrape(&relay);
    drop(receivers);

    let kind = |k: &str| {
        metric(
            &text,
            &format!("udphub_datagrams_received_total{{kind=\"{k}\"}}"),
        )
    };
    let received = metric_sum(&text, "udphub_datagrams_received_total");
    let dropped = metric_sum(&text, "udphub_dropped_total");
    let kernel = metric(&text, "udphub_kernel_rx_dropped_total");
    assert!(
        received + kernel <= sent && received + kernel + backlog_lost >= sent,
        "datagrams unaccounted for ({backlog_lost} lost in the backlog):\n{text}"
    );
    // The invariant `received = heartbeats + quits + messages + joins +
    // dropped{reason}`: the kinds are exactly these five (a sixth would
    // escape it), and the datagrams counted as dropped by kind are the
    // drops counted by reason (two counters, kept in two places).
    let mut kinds: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("udphub_datagrams_received_total{kind=\""))
        .filter_map(|rest| rest.split('"').next())
        .collect();
    kinds.sort_unstable();
    assert_eq!(kinds, ["dropped", "heartbeat", "join", "message", "quit"]);
    assert_eq!(kind("dropped"), dropped, "{text}");
    if kernel == 0.0 && backlog_lost == 0.0 {
        // Then the split by kind is exact too.
        let per = (SENDERS * PER_SENDER / 20) as f64;
        assert_eq!(kind("heartbeat"), 2.0 * per + 16.0);
        assert_eq!(kind("quit"), per);
        assert_eq!(kind("message"), 16.0 * per);
        assert_eq!(
            metric(&text, "udphub_dropped_total{reason=\"oversize\"}"),
            per
        );
    }
    let recipients = metric(&text, "udphub_fanout_recipients_total");
    let delivered = metric(&text, "udphub_deliveries_total");
    let delivery_dropped = metric_sum(&text, "udphub_delivery_dropped_total");
    assert!(recipients > 0.0);
    assert_eq!(
        recipients,
        delivered + delivery_dropped,
        "recipients != delivered + dropped\n{text}"
    );
    // One fan-out sample per message. Histogram samples reach the
    // exporter's buckets later than counters (its upkeep drains them), so
    // two equal scrapes may still show one short: wait for it, bounded.
    let deadline = Instant::now() + PATIENCE;
    let mut samples = metric(&text, "udphub_fanout_duration_seconds_count");
    while samples != kind("message") && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
        samples = metric(&relay.scrape(), "udphub_fanout_duration_seconds_count");
    }
    assert_eq!(samples, kind("message"), "one fan-out sample per message");
}

/// Packets the kernel dropped from its per-CPU input backlogs, all CPUs
/// (the second column of /proc/net/softnet_stat, in hex).
fn softnet_drops() -> f64 {
    let text = std::fs::read_to_string("/proc/net/softnet_stat").expect("read softnet_stat");
    text.lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter_map(|h| u64::from_str_radix(h, 16).ok())
        .sum::<u64>() as f64
}

/// A scrape taken once two in a row agree (bounded).
fn stable_scrape(relay: &util::RelayProc) -> String {
    let deadline = Instant::now() + PATIENCE;
    let mut last = relay.scrape();
    loop {
        thread::sleep(Duration::from_millis(50));
        let next = relay.scrape();
        // Counters and histogram counts (whose samples may land a flush
        // later), sorted: the exporter renders in hash order.
        let counters = |t: &str| -> Vec<String> {
            let mut v: Vec<String> = t
                .lines()
                .filter(|l| !l.starts_with('#') && (l.contains("_total") || l.contains("_count")))
                .map(String::from)
                .collect();
            v.sort();
            v
        };
        if counters(&next) == counters(&last) {
            return next;
        }
        assert!(
            Instant::now() < deadline,
            "the counters never settled:\n{:?}\n{:?}",
            counters(&last),
            counters(&next)
        );
        last = next;
    }
}

/// The endpoint answers other paths and methods with a status, and a
/// scraper that connects and says nothing does not hold up the next one.
#[test]
fn the_endpoint_is_plain_http_and_a_stalled_scraper_blocks_no_one() {
    use std::io::Read;
    use std::net::TcpStream;
    let relay = spawn_relay(&[]);
    let addr = relay.metrics.unwrap();
    let ask = |request: &[u8]| {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        s.write_all(request).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    let _stalled = TcpStream::connect(addr).unwrap();
    assert!(ask(b"GET /nope HTTP/1.0\r\n\r\n").starts_with("HTTP/1.0 404"));
    assert!(ask(b"POST /metrics HTTP/1.0\r\n\r\n").starts_with("HTTP/1.0 405"));
    let ok = ask(b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n\r\n");
    assert!(ok.starts_with("HTTP/1.0 200"), "{ok}");
    assert!(ok.contains("udphub_clients"), "{ok}");
}

/// Slow clients that dribble a request a byte at a time (each byte well
/// inside any per-read timeout) hold up no one: a scrape is answered while
/// ten of them hang, and each is cut off at its whole-request deadline
/// (5 s), answered 408 and counted.
#[test]
fn slow_scrapers_hold_up_no_one_and_meet_their_deadline() {
    use std::io::Read;
    use std::net::TcpStream;
    const SLOW: usize = 10;
    let relay = spawn_relay(&[]);
    let addr = relay.metrics.unwrap();
    let request = b"GET /metrics HTTP/1.0\r\nHost: a\r\n\r\n";
    let opened = Instant::now();
    let mut slow: Vec<Option<TcpStream>> = (0..SLOW)
        .map(|_| {
            let mut s = TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(10))).unwrap();
            s.write_all(&request[..1]).unwrap();
            Some(s)
        })
        .collect();
    let text = util::scrape(addr);
    assert!(text.contains("udphub_clients"), "{text}");
    // They go on, a byte each every 500 ms, until the relay closes them.
    let mut sent = 1;
    let mut answers = Vec::new();
    let deadline = opened + Duration::from_secs(10);
    while slow.iter().any(Option::is_some) {
        assert!(Instant::now() < deadline, "slow clients were never cut off");
        thread::sleep(Duration::from_millis(500));
        for slot in slow.iter_mut() {
            let Some(s) = slot else { continue };
            let _ = s.write_all(&request[sent..sent + 1]);
            let mut out = String::new();
            match s.read_to_string(&mut out) {
                Ok(_) => answers.push(out),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => answers.push(e.to_string()),
            }
            *slot = None;
        }
        sent = (sent + 1).min(request.len() - 3);
    }
    assert!(
        opened.elapsed() >= Duration::from_millis(4500),
        "cut off before the deadline: {:?}",
        opened.elapsed()
    );
    assert_eq!(answers.len(), SLOW);
    for answer in &answers {
        assert!(answer.starts_with("HTTP/1.0 408"), "{answer}");
    }
    let text = util::scrape(addr);
    assert_eq!(
        metric(
            &text,
            "udphub_metrics_connections_dropped_total{reason=\"deadline\"}"
        ),
        SLOW as f64,
        "{text}"
    );
}

/// The endpoint holds at most 32 connections: with all of them taken by
/// clients that say nothing, a scrape still gets in (the oldest is closed
/// with a 503 to make room, and counted).
#[test]
fn a_full_house_of_silent_clients_makes_room_for_a_scrape() {
    use std::io::Read;
    use std::net::TcpStream;
    const MAX: usize = 32;
    let relay = spawn_relay(&[]);
    let addr = relay.metrics.unwrap();
    let mut silent: Vec<TcpStream> = Vec::new();
    for _ in 0..MAX {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        silent.push(s);
    }
    let text = util::scrape(addr);
    assert_eq!(
        metric(
            &text,
            "udphub_metrics_connections_dropped_total{reason=\"max_connections\"}"
        ),
        1.0,
        "{text}"
    );
    let mut oldest = String::new();
    silent[0].read_to_string(&mut oldest).unwrap();
    assert!(oldest.starts_with("HTTP/1.0 503"), "{oldest}");
}
