//! What a NATS publisher can do to a keyed cluster (real relays, Debian's
//! nats-server, a publisher speaking raw NATS protocol over TCP): relays
//! with the same `--cluster-key-file` share rooms; a replayed, altered,
//! misrouted, unsigned, foreign-keyed, stale or oversized batch reaches no
//! member, and the counters say why; relays with different keys share
//! nothing; a key rotated by SIGHUP signs at once while the old one is
//! still accepted.

mod util;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use udphub::cluster::frame::{self, BatchWriter, Stamp};
use udphub::config::ClusterKey;
use util::cluster::{member, until_connected};
use util::nats::Nats;
use util::{spawn_relay, temp_path, RelayProc, PATIENCE};

const KEY1: &[u8] = b"0123456789abcdef0123456789abcdef-one";
const KEY2: &[u8] = b"0123456789abcdef0123456789abcdef-two";

/// A key file holding `key` (with a trailing newline, as `openssl rand
/// -hex 32 > FILE` writes it).
fn key_file(key: &[u8]) -> std::path::PathBuf {
    let path = temp_path("cluster-key");
    let mut text = key.to_vec();
    text.push(b'\n');
    std::fs::write(&path, text).expect("write the key file");
    path
}

/// A relay in the cluster at `url` whose key is in `key`.
fn node(url: &str, id: &str, key: &std::path::Path) -> RelayProc {
    let key = key.to_str().expect("a UTF-8 temp path");
    let relay = spawn_relay(&[
        "--cluster",
        url,
        "--node-id",
        id,
        "--format",
        "raw",
        "--cluster-key-file",
        key,
    ]);
    relay.wait_metric("udphub_cluster_connected", 1.0);
    relay
}

/// A NATS client in a few lines of the text protocol: enough to capture
/// what relays publish and to publish anything.
struct RawNats {
    writer: TcpStream,
    reader: BufReader<TcpStream>,
}

impl RawNats {
    fn connect(port: u16) -> RawNats {
        let writer = TcpStream::connect(("127.0.0.1", port)).expect("connect to NATS");
        writer
            .set_read_timeout(Some(PATIENCE))
            .expect("a read timeout");
        let mut reader = BufReader::new(writer.try_clone().expect("clone the stream"));
        let mut info = String::new();
        reader.read_line(&mut info).expect("INFO");
        assert!(info.starts_with("INFO"), "{info}");
        let mut nats = RawNats { writer, reader };
        nats.write(b"CONNECT {\"verbose\":false,\"pedantic\":false}\r\n");
        nats.sync();
        nats
    }

    fn write(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).expect("write to NATS");
    }

    /// PING, and wait for its PONG: the server has handled everything
    /// before it.
    fn sync(&mut self) {
        self.write(b"PING\r\n");
        let deadline = Instant::now() + PATIENCE;
        loop {
            assert!(Instant::now() < deadline, "no PONG");
            let line = self.line();
            if line == "PONG" {
                return;
            }
            assert!(!line.starts_with("-ERR"), "{line}");
        }
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("a line from NATS");
        line.trim_end().to_string()
    }

    fn subscribe(&mut self, subject: &str) {
        self.write(format!("SUB {subject} 1\r\n").as_bytes());
        self.sync();
    }

    fn publish(&mut self, subject: &str, payload: &[u8]) {
        self.write(format!("PUB {subject} {}\r\n", payload.len()).as_bytes());
        self.write(payload);
        self.write(b"\r\n");
        self.sync();
    }

    /// The next message's payload.
    fn next_message(&mut self) -> Vec<u8> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            assert!(Instant::now() < deadline, "no message");
            let line = self.line();
            if line == "PING" {
                self.write(b"PONG\r\n");
                continue;
            }
            let Some(rest) = line.strip_prefix("MSG ") else {
                continue;
            };
            let len: usize = rest
                .rsplit(' ')
                .next()
                .and_then(|n| n.parse().ok())
                .expect("a MSG length");
            let mut payload = vec![0; len + 2];
            self.reader.read_exact(&mut payload).expect("the payload");
            payload.truncate(len);
            return payload;
        }
    }
}

fn unix_now() -> u32 {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs();
    u32::try_from(secs).expect("before 2106")
}

/// A batch of `bodies` from a made-up origin, signed with `key` (if any)
/// for `subject`, sent at `time`.
fn forge(key: Option<&[u8]>, subject: &str, time: u32, bodies: &[&[u8]]) -> Vec<u8> {
    let key = key.map(|k| ClusterKey::new(k.to_vec()).expect("a valid key"));
    let mut w = BatchWriter::default();
    let stamp = Stamp {
        epoch: 0xbad,
        stream: 1,
        seq: 1,
    };
    w.begin(time, stamp, key.is_some());
    for b in bodies {
        w.push(b);
    }
    w.finish(key.as_ref(), subject)
}

fn dropped(relay: &RelayProc, reason: &str) -> f64 {
    relay.metric(&format!(
        "udphub_cluster_dropped_total{{reason=\"{reason}\"}}"
    ))
}

/// Two relays with the same key share a room; what a NATS publisher
/// replays (into the same or another room), alters, forges unsigned or
/// with another key, sends stale or oversized, reaches no member: each is
/// counted with its reason, and the members' next datagram is the next
/// real message.
#[test]
fn a_nats_publisher_cannot_inject_replay_or_misroute() {
    let nats = Nats::start();
    let key = key_file(KEY1);
    let a = node(&nats.url(), "a", &key);
    let b = node(&nats.url(), "b", &key);
    let mut capture = RawNats::connect(nats.port);
    capture.subscribe("udphub.room.red");
    let mut raw = RawNats::connect(nats.port);
    let (a_red, b_red) = (member(&a, "red"), member(&b, "red"));
    let (a_blue, b_blue) = (member(&a, "blue"), member(&b, "blue"));
    until_connected(&a_red, &[&b_red]);
    until_connected(&a_blue, &[&b_blue]);
    // Capture a real batch on its way.
    a_red.send(b"the secret plan");
    assert_eq!(b_red.recv(), b"the secret plan");
    let captured = loop {
        let m = capture.next_message();
        if m.windows(15).any(|w| w == b"the secret plan") {
            break m;
        }
    };
    let batch = frame::parse(&captured).expect("a batch of ours");
    assert!(batch.tag.is_some(), "signed");
    let bodies = batch.bodies.len() as f64;
    let before = |r: &str| dropped(&b, r);
    let (dup, bad, unsigned, stale, oversized) = (
        before("duplicate"),
        before("bad_mac"),
        before("unsigned"),
        before("stale"),
        before("oversized"),
    );

    raw.publish("udphub.room.red", &captured);
    raw.publish("udphub.room.blue", &captured);
    let mut altered = captured.clone();
    let at = altered.len() - frame::TAG_LEN - 3;
    altered[at] ^= 0x20;
    raw.publish("udphub.room.red", &altered);
    let now = unix_now();
    raw.publish(
        "udphub.room.red",
        &forge(None, "udphub.room.red", now, &[b"unsigned"]),
    );
    raw.publish(
        "udphub.room.red",
        &forge(Some(KEY2), "udphub.room.red", now, &[b"other key"]),
    );
    raw.publish(
        "udphub.room.red",
        &forge(Some(KEY1), "udphub.room.red", now - 3_600, &[b"stale"]),
    );
    let huge = vec![b'x'; 1472 + 512 + 1];
    raw.publish(
        "udphub.room.red",
        &forge(Some(KEY1), "udphub.room.red", now, &[&huge]),
    );

    b.wait_metric(
        "udphub_cluster_dropped_total{reason=\"duplicate\"}",
        dup + bodies,
    );
    b.wait_metric(
        "udphub_cluster_dropped_total{reason=\"bad_mac\"}",
        bad + 3.0,
    );
    b.wait_metric(
        "udphub_cluster_dropped_total{reason=\"unsigned\"}",
        unsigned + 1.0,
    );
    b.wait_metric(
        "udphub_cluster_dropped_total{reason=\"stale\"}",
        stale + 1.0,
    );
    b.wait_metric(
        "udphub_cluster_dropped_total{reason=\"oversized\"}",
        oversized + 1.0,
    );
    assert_eq!(before("bad_mac"), bad + 3.0, "exactly three bad tags");
    // Nothing of it reached a member: their next datagrams are the next
    // real messages.
    a_red.send(b"after red");
    a_blue.send(b"after blue");
    assert_eq!(b_red.recv(), b"after red");
    assert_eq!(b_blue.recv(), b"after blue");
    // Batches are what NATS carries: never more NATS messages than
    // messages.
    let scrape = a.scrape();
    let out = util::metric(
        &scrape,
        "udphub_cluster_nats_messages_total{direction=\"out\"}",
    );
    let published = util::metric(&scrape, "udphub_cluster_published_total");
    assert!(out >= 1.0 && out <= published, "{out} > {published}");
}

/// Relays with different keys share nothing: each refuses the other's
/// batches as `bad_mac`, and its members hear nothing of them.
#[test]
fn relays_with_different_keys_do_not_share_rooms() {
    let nats = Nats::start();
    let a = node(&nats.url(), "a", &key_file(KEY1));
    let c = node(&nats.url(), "c", &key_file(KEY2));
    let a_red = member(&a, "red");
    let c_red = member(&c, "red");
    // NATS delivers (C subscribed), C refuses: wait for the refusals.
    let deadline = Instant::now() + PATIENCE * 2;
    let mut n = 0;
    while dropped(&c, "bad_mac") < 3.0 {
        assert!(Instant::now() < deadline, "C never heard A's batches");
        a_red.send(format!("to c {n}").as_bytes());
        n += 1;
        assert_eq!(c_red.recv_within(Duration::from_millis(50)), None);
    }
    assert_eq!(c.metric("udphub_cluster_received_total"), 0.0);
    assert_eq!(c_red.recv_within(Duration::from_millis(100)), None);
}

/// SIGHUP with a new key in the file: the relay signs with it at once and
/// still accepts the old one (grace period); its peer, still on the old
/// key, refuses the new one until it is rotated too.
#[test]
fn a_reloaded_key_signs_at_once_and_the_old_one_is_still_accepted() {
    let nats = Nats::start();
    let (key_a, key_b) = (key_file(KEY1), key_file(KEY1));
    let a = node(&nats.url(), "a", &key_a);
    let b = node(&nats.url(), "b", &key_b);
    let (a_red, b_red) = (member(&a, "red"), member(&b, "red"));
    until_connected(&a_red, &[&b_red]);

    std::fs::write(&key_b, KEY2).expect("rotate B's key");
    b.signal("HUP");
    b.wait_metric("udphub_config_reloads_total{result=\"applied\"}", 1.0);
    b.expect_log("cluster key: replaced");
    // Old key → B: still accepted.
    a_red.send(b"old key");
    assert_eq!(b_red.recv(), b"old key");
    assert_eq!(a_red.recv(), b"old key", "A's echo");
    // New key → A (not rotated yet): refused.
    let bad = dropped(&a, "bad_mac");
    b_red.send(b"new key");
    assert_eq!(b_red.recv(), b"new key", "B's echo");
    a.wait_metric(
        "udphub_cluster_dropped_total{reason=\"bad_mac\"}",
        bad + 1.0,
    );
    // A rotates too: B's batches pass again.
    std::fs::write(&key_a, KEY2).expect("rotate A's key");
    a.signal("HUP");
    a.wait_metric("udphub_config_reloads_total{result=\"applied\"}", 1.0);
    b_red.send(b"both new");
    assert_eq!(a_red.recv(), b"both new");
    let log = a.expect_log("cluster key: replaced");
    assert!(!log.contains("0123456789abcdef"), "the key is never logged");
}
