//! The relay under conditions loopback alone cannot make: a network
//! namespace this test creates (never the host's network), whose loopback
//! device gets a slow queueing discipline, so the relay's socket send
//! buffer really fills.

mod util;

use std::process::Command;

use util::{metric, metric_sum, udphub_bin};

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

/// Drives the relay from inside the namespace: registers `CLIENTS` sockets
/// that never read, has one send `MESSAGES` messages, waits (bounded) for
/// the relay to have handled them all, and prints the final scrape.
const DRIVER: &str = r#"
import socket, sys, time, urllib.request
udp_host, udp_port = sys.argv[1].rsplit(":", 1)
relay = (udp_host, int(udp_port))
metrics = "http://%s/metrics" % sys.argv[2]
CLIENTS, MESSAGES = 20, 60

def scrape():
    return urllib.request.urlopen(metrics, timeout=5).read().decode()

def value(text, series):
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return 0.0

def wait(series, at_least):
    deadline = time.time() + 10
    while True:
        text = scrape()
        if value(text, series) >= at_least:
            return text
        if time.time() > deadline:
            sys.exit("%s never reached %s:\n%s" % (series, at_least, text))
        time.sleep(0.02)

socks = []
for _ in range(CLIENTS):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.sendto(b"^hb^", relay)
    socks.append(s)
wait("udphub_clients_joined_total", CLIENTS)
for i in range(MESSAGES):
    socks[0].sendto(b"m%04d" % i + b"x" * 1000, relay)
wait('udphub_datagrams_received_total{kind="message"}', MESSAGES)
# One more scrape after the loop is idle, so every counter of the last
# batch is in.
time.sleep(0.2)
print(scrape())
"#;

/// A full send buffer drops deliveries, counts them as buffer_full, and
/// never stalls the relay: every message is still handled, and recipients
/// = delivered + dropped.
#[test]
fn a_full_send_buffer_drops_and_counts_deliveries() {
    for tool in ["ip", "tc", "python3"] {
        if !util::require_tool(tool) {
            return;
        }
    }
    let ns = Netns(format!("udphub-bf-{}", std::process::id()));
    if let Err(e) = run("ip", &["netns", "add", &ns.0]) {
        if std::env::var_os("CI").is_some() {
            panic!("network namespaces are required under CI: {e}");
        }
        eprintln!("skipping: cannot create a network namespace ({e})");
        return;
    }
    run("ip", &["-n", &ns.0, "link", "set", "lo", "up"]).unwrap();
    // UDP only (the metrics scrape is TCP and must not queue behind it)
    // through 1 Mbit/s with a deep queue: sent datagrams wait in the qdisc,
    // still charged to the relay's socket, so its small send buffer fills.
    let tc = |args: &str| {
        let mut all = vec!["-n", &ns.0];
        all.extend(args.split_whitespace());
        run("tc", &all).unwrap();
    };
    // (htb and u32: the qdiscs a container's kernel is most likely to have.)
    tc("qdisc add dev lo root handle 1: htb default 20");
    tc("class add dev lo parent 1: classid 1:10 htb rate 1mbit burst 4kb");
    tc("class add dev lo parent 1: classid 1:20 htb rate 1gbit quantum 60000");
    tc("qdisc add dev lo parent 1:10 handle 10: pfifo limit 10000");
    tc("filter add dev lo parent 1: protocol ip u32 match ip protocol 17 0xff flowid 1:10");

    let ready = util::temp_path("bf-ready");
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.0, udphub_bin(), "serve"])
        .args(["--bind", "127.0.0.1:0", "--metrics", "127.0.0.1:0"])
        .args(["--send-buffer", "4096", "--format", "raw", "--ready-file"])
        .arg(&ready);
    let (mut relay, _log, addrs) = util::spawn_until_ready(cmd, &ready);
    let metrics = addrs.metrics.expect("metrics on").to_string();
    let scrape = run(
        "ip",
        &[
            "netns",
            "exec",
            &ns.0,
            "python3",
            "-c",
            DRIVER,
            &addrs.udp.to_string(),
            &metrics,
        ],
    );
    let _ = relay.kill();
    let _ = relay.wait();
    let text = scrape.unwrap();

    let full = metric(
        &text,
        "udphub_delivery_dropped_total{reason=\"buffer_full\"}",
    );
    let recipients = metric(&text, "udphub_fanout_recipients_total");
    let delivered = metric(&text, "udphub_deliveries_total");
    assert_eq!(recipients, 60.0 * 20.0, "{text}");
    assert!(full > 0.0, "the send buffer never filled:\n{text}");
    assert!(delivered > 0.0, "{text}");
    assert_eq!(
        recipients,
        delivered + metric_sum(&text, "udphub_delivery_dropped_total"),
        "{text}"
    );
}
