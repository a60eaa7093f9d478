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

    // Wait (bounded) until the relay has read everything or counted its loss.
    let deadline = Instant::now() + Duration::from_secs(20);
    let text = loop {
        let text = relay.scrape();
        let seen = metric_sum(&text, "udphub_datagrams_received_total")
            + metric(&text, "udphub_kernel_rx_dropped_total");
        if seen >= sent || Instant::now() > deadline {
            // Counters are flushed one after another; let the last flush finish.
            thread::sleep(Duration::from_millis(100));
            break relay.scrape();
        }
        thread::sleep(Duration::from_millis(50));
    };
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
    assert_eq!(
        received + kernel,
        sent,
        "datagrams unaccounted for:\n{text}"
    );
    assert_eq!(
        received,
        kind("heartbeat") + kind("quit") + kind("message") + dropped,
        "received != heartbeats + quits + messages + dropped\n{text}"
    );
    assert_eq!(kind("dropped"), dropped);
    if kernel == 0.0 {
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
    assert_eq!(
        metric(&text, "udphub_fanout_duration_seconds_count"),
        kind("message"),
        "one fan-out sample per message"
    );
}
