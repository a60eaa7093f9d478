//! The relay's wire behaviour, through the real binary on loopback.

mod util;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use util::{seed_format, spawn_relay, spawn_relay_on, Client};

/// A message reaches every live client, the sender included, in seed 002's
/// `{body}. from {ip}:{port}` format.
#[test]
fn relays_to_everyone_including_the_sender_in_seed_format() {
    let relay = spawn_relay(&[]);
    let a = Client::joined(&relay);
    let b = Client::joined(&relay);
    let c = Client::joined(&relay);
    a.send(b"123abc");
    let want = seed_format("123abc", a.addr());
    for client in [&a, &b, &c] {
        assert_eq!(client.recv(), want);
    }
    assert_eq!(relay.wait_metric("udphub_deliveries_total", 3.0), 3.0);
    assert_eq!(relay.metric("udphub_clients"), 3.0);
}

/// One trailing `\n` or `\r\n` (what `nc` and `echo` add) is not relayed.
#[test]
fn one_trailing_newline_is_stripped() {
    let relay = spawn_relay(&["--format", "raw"]);
    let a = Client::joined(&relay);
    for (sent, want) in [
        (&b"hello\n"[..], &b"hello"[..]),
        (b"hello\r\n", b"hello"),
        (b"two\n\n", b"two\n"),
        (b" spaced ", b" spaced "),
    ] {
        a.send(sent);
        assert_eq!(a.recv(), want);
    }
}

/// Heartbeats in every spelling register the sender but are never relayed.
#[test]
fn heartbeat_variants_are_never_relayed() {
    let relay = spawn_relay(&[]);
    let listener = Client::joined(&relay);
    let talker = Client::new(relay.addr);
    for hb in [
        &b"^hb^"[..],
        b"^hb^\n",
        b"^hb^\r\n",
        b"  ^hb^ ",
        b"",
        b"\n",
        b" \t ",
    ] {
        talker.send(hb);
    }
    talker.send(b"real");
    // The first thing anyone hears is the message.
    assert_eq!(listener.recv(), seed_format("real", talker.addr()));
    assert_eq!(talker.recv(), seed_format("real", talker.addr()));
    listener.expect_silence();
    assert_eq!(
        relay.metric("udphub_datagrams_received_total{kind=\"heartbeat\"}"),
        8.0
    );
    assert_eq!(relay.metric("udphub_clients_joined_total"), 2.0);
}

/// `quit` removes the sender at once; a quit from a stranger is harmless.
#[test]
fn quit_leaves_immediately() {
    let relay = spawn_relay(&[]);
    let a = Client::joined(&relay);
    let b = Client::joined(&relay);
    Client::new(relay.addr).send(b"quit\n");
    a.send(b" quit ");
    relay.wait_metric("udphub_clients_left_total", 1.0);
    b.send(b"still here");
    assert_eq!(b.recv(), seed_format("still here", b.addr()));
    a.expect_silence();
    assert_eq!(relay.metric("udphub_clients_left_total"), 1.0);
    assert_eq!(
        relay.metric("udphub_datagrams_received_total{kind=\"quit\"}"),
        2.0
    );
    assert_eq!(relay.metric("udphub_clients"), 1.0);
}

/// Bodies are bytes: invalid UTF-8 is relayed exactly, never a crash.
#[test]
fn non_utf8_is_relayed_byte_for_byte() {
    let relay = spawn_relay(&[]);
    let a = Client::joined(&relay);
    a.send(b"\xff\xfe\x00bin\xc3");
    let mut want = b"\xff\xfe\x00bin\xc3".to_vec();
    want.extend_from_slice(&seed_format("", a.addr()));
    assert_eq!(a.recv(), want);
}

/// Longer than --max-datagram is dropped and counted, never truncated.
#[test]
fn oversize_datagrams_are_dropped_and_counted() {
    let relay = spawn_relay(&["--format", "raw"]);
    let a = Client::joined(&relay);
    a.send(&[b'x'; 1473]);
    a.send(&[b'y'; 65_507]);
    a.send(&[b'z'; 1472]);
    assert_eq!(a.recv(), vec![b'z'; 1472]);
    a.expect_silence();
    assert_eq!(
        relay.metric("udphub_dropped_total{reason=\"oversize\"}"),
        2.0
    );
    assert_eq!(
        relay.metric("udphub_datagrams_received_total{kind=\"dropped\"}"),
        2.0
    );
}

/// `--max-datagram` moves the limit.
#[test]
fn max_datagram_is_configurable() {
    let relay = spawn_relay(&["--format", "raw", "--max-datagram", "8"]);
    let a = Client::joined(&relay);
    a.send(b"123456789");
    a.send(b"12345678");
    assert_eq!(a.recv(), b"12345678");
}

/// `--format` templates, and `raw`.
#[test]
fn custom_and_raw_formats() {
    let relay = spawn_relay(&["--format", "<{ip}:{port}> {body}"]);
    let a = Client::joined(&relay);
    a.send(b"hi");
    let want = format!("<127.0.0.1:{}> hi", a.addr().port());
    assert_eq!(a.recv(), want.as_bytes());

    let raw = spawn_relay(&["--format", "raw"]);
    let b = Client::joined(&raw);
    b.send(b"as is\xff");
    assert_eq!(b.recv(), b"as is\xff");
}

/// `--no-echo` leaves the sender out of its own fan-out.
#[test]
fn no_echo_skips_the_sender() {
    let relay = spawn_relay(&["--no-echo"]);
    let a = Client::joined(&relay);
    let b = Client::joined(&relay);
    a.send(b"from a");
    assert_eq!(b.recv(), seed_format("from a", a.addr()));
    b.send(b"from b");
    assert_eq!(a.recv(), seed_format("from b", b.addr()));
    a.expect_silence();
}

/// A client silent for --timeout is expired and receives nothing more.
#[test]
fn silent_clients_expire() {
    let relay = spawn_relay(&["--timeout", "200ms"]);
    let quiet = Client::joined(&relay);
    assert_eq!(relay.wait_metric("udphub_clients_expired_total", 1.0), 1.0);
    let talker = Client::new(relay.addr);
    talker.send(b"anyone?");
    assert_eq!(talker.recv(), seed_format("anyone?", talker.addr()));
    quiet.expect_silence();
}

/// Heartbeats keep a client alive past the timeout.
#[test]
fn heartbeats_keep_a_client_alive() {
    let relay = spawn_relay(&["--timeout", "400ms"]);
    let a = Client::joined(&relay);
    // A silent client that joined after `a`: when it has expired, more than
    // a timeout has passed since `a` joined.
    let _control = Client::joined(&relay);
    let deadline = Instant::now() + util::PATIENCE;
    while relay.metric("udphub_clients_expired_total") < 1.0 {
        assert!(Instant::now() < deadline, "the silent client never expired");
        a.send(b"^hb^");
        std::thread::sleep(Duration::from_millis(50)); // the heartbeat cadence
    }
    let b = Client::new(relay.addr);
    b.send(b"still?");
    assert_eq!(a.recv(), seed_format("still?", b.addr()));
    assert_eq!(relay.metric("udphub_clients_expired_total"), 1.0);
}

/// SIGTERM: every live client gets `bye`, and the relay exits 0.
#[test]
fn sigterm_says_bye_and_exits_zero() {
    let mut relay = spawn_relay(&[]);
    let a = Client::joined(&relay);
    let b = Client::joined(&relay);
    relay.signal("TERM");
    assert_eq!(a.recv(), b"bye");
    assert_eq!(b.recv(), b"bye");
    let status = relay.wait_exit();
    assert_eq!(status.code(), Some(0));
}

/// SIGINT (Ctrl-C) does the same.
#[test]
fn sigint_says_bye_and_exits_zero() {
    let mut relay = spawn_relay_on("127.0.0.1:0", false, &[]);
    let a = Client::new(relay.addr);
    a.send(b"hello");
    assert_eq!(a.recv(), seed_format("hello", a.addr()));
    relay.signal("INT");
    assert_eq!(a.recv(), b"bye");
    assert_eq!(relay.wait_exit().code(), Some(0));
}

/// IPv6: bind `[::1]`, relay between IPv6 clients, format `[::1]:port`
/// (brackets, so the address and the port can be told apart).
#[test]
fn ipv6_loopback() {
    let relay = spawn_relay_on("[::1]:0", true, &[]);
    assert!(relay.addr.is_ipv6());
    let a = Client::joined(&relay);
    let b = Client::joined(&relay);
    a.send(b"v6");
    let want = format!("v6. from [::1]:{}", a.addr().port());
    assert_eq!(b.recv(), want.as_bytes());
    assert_eq!(a.recv(), want.as_bytes());
}

/// Settings come from UDPHUB_* variables and a --config file too.
#[test]
fn env_and_config_file_settings() {
    let dir = std::env::temp_dir().join(format!("udphub-it-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("relay.toml");
    std::fs::write(&file, "format = \"raw\"\nno-echo = true\n").unwrap();
    let relay = util::spawn_relay_with(
        "127.0.0.1:0",
        true,
        &[("UDPHUB_FORMAT", "[{body}]")],
        &["--config", file.to_str().unwrap()],
    );
    let a = Client::joined(&relay);
    let b = Client::joined(&relay);
    a.send(b"x");
    // The env var beats the file's format; the file's no-echo still applies.
    assert_eq!(b.recv(), b"[x]");
    a.expect_silence();
}

/// Bad flags and unbindable addresses: one line on stderr, exit code 2.
#[test]
fn usage_errors_exit_2_with_one_line() {
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let taken = taken.local_addr().unwrap().to_string();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["serve", "--bind", "not-an-address"], "--bind"),
        (
            vec!["serve", "--bind", &taken, "--metrics", "off"],
            "cannot bind relay socket",
        ),
        (
            vec!["serve", "--bind", "127.0.0.1:0", "--metrics", "nope"],
            "--metrics",
        ),
        (
            vec!["serve", "--max-datagram", "0", "--metrics", "off"],
            "--max-datagram",
        ),
        (vec!["serve", "--max-datagram", "x"], "--max-datagram"),
        (vec!["serve", "--timeout", "soon"], "--timeout"),
        (
            vec!["serve", "--format", "{who}", "--metrics", "off"],
            "unknown placeholder",
        ),
        (vec!["serve", "--no-such-flag"], "--no-such-flag"),
        (
            vec!["serve", "--config", "/nonexistent/udphub.toml"],
            "cannot read config file",
        ),
        (vec!["frobnicate"], "frobnicate"),
    ];
    for (args, needle) in cases {
        let out = Command::new(util::udphub_bin())
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .expect("run udphub");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(
            stderr.trim_end().lines().count(),
            1,
            "{args:?} printed:\n{stderr}"
        );
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

/// A taken metrics port is a usage error too.
#[test]
fn unbindable_metrics_port_exits_2() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = Command::new(util::udphub_bin())
        .args(["serve", "--bind", "127.0.0.1:0", "--metrics", &addr])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("cannot bind metrics listener"), "{stderr}");
}

/// `nc -u`, the seeds' own test client, works as a client.
#[test]
fn netcat_is_a_client() {
    if !util::require_tool("nc") {
        return;
    }
    let relay = spawn_relay(&[]);
    let listener = Client::joined(&relay);
    let mut nc = Command::new("nc")
        .args(["-u", "-w", "1", "127.0.0.1", &relay.addr.port().to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn nc");
    use std::io::Write;
    nc.stdin.take().unwrap().write_all(b"123abc\n").unwrap();
    let got = listener.recv();
    let text = String::from_utf8(got).unwrap();
    assert!(text.starts_with("123abc. from 127.0.0.1:"), "{text}");
    // nc received its own echo as well (the sender is a recipient).
    let out = nc.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), text);
}

/// Boolean environment variables take the usual spellings (`1`, `yes`…).
#[test]
fn no_echo_from_the_environment() {
    let relay = util::spawn_relay_with("127.0.0.1:0", true, &[("UDPHUB_NO_ECHO", "1")], &[]);
    let a = Client::joined(&relay);
    let b = Client::joined(&relay);
    a.send(b"quietly");
    assert_eq!(b.recv(), seed_format("quietly", a.addr()));
    a.expect_silence();
}

/// At --max-clients, a newcomer's datagrams are dropped as table_full and
/// relayed to no one; members still talk, and a freed slot admits it.
#[test]
fn a_full_table_refuses_newcomers_and_counts_them() {
    let relay = spawn_relay(&["--max-clients", "2"]);
    let a = Client::joined(&relay);
    let b = Client::joined(&relay);
    let c = Client::new(relay.addr);
    c.send(b"^hb^");
    c.send(b"let me in");
    relay.wait_metric("udphub_dropped_total{reason=\"table_full\"}", 2.0);
    a.send(b"members only");
    assert_eq!(b.recv(), seed_format("members only", a.addr()));
    assert_eq!(a.recv(), seed_format("members only", a.addr()));
    c.expect_silence();
    assert_eq!(relay.metric("udphub_clients"), 2.0);
    a.send(b"quit");
    relay.wait_metric("udphub_clients_left_total", 1.0);
    c.send(b"now?");
    assert_eq!(c.recv(), seed_format("now?", c.addr()));
    assert_eq!(b.recv(), seed_format("now?", c.addr()));
}

/// A second signal while the first one's shutdown is under way exits at
/// once with status 130. The relay is stopped while both signals are sent,
/// so both are pending when it resumes: no timing window to hit.
#[test]
fn a_second_signal_exits_at_once_with_130() {
    let mut relay = spawn_relay(&[]);
    let _a = Client::joined(&relay);
    relay.signal("STOP");
    relay.signal("TERM");
    relay.signal("INT");
    relay.signal("CONT");
    assert_eq!(relay.wait_exit().code(), Some(130));
}

/// IPv4 clients of an IPv6 socket (bound to the v4-mapped loopback, the
/// same path as `[::]` without leaving loopback): they are relayed to, and
/// shown in the seed's IPv4 form.
#[test]
fn ipv4_clients_on_an_ipv6_socket() {
    let relay = spawn_relay_on("[::ffff:127.0.0.1]:0", true, &[]);
    let v4 = std::net::SocketAddr::from(([127, 0, 0, 1], relay.addr.port()));
    let client = || Client {
        sock: std::net::UdpSocket::bind("127.0.0.1:0").unwrap(),
        relay: v4,
        proof: None,
    };
    let a = client();
    let b = client();
    b.send(b"^hb^");
    relay.wait_metric("udphub_clients_joined_total", 1.0);
    a.send(b"mapped");
    let want = seed_format("mapped", a.addr());
    assert_eq!(b.recv(), want);
    assert_eq!(a.recv(), want);
}
