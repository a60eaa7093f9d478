//! Verify mode (`--verify-sources`), through the real binary: stateless
//! cookies byte for byte, unproven quits ignored, limits. The attack with
//! forged sources (a raw socket) is `loadtest abuse --spoof`, tested in
//! loadtest/tests/loadtest.rs against this binary.

mod util;

use std::time::Instant;

use util::{seed_format, spawn_relay, Client, PATIENCE};

/// Nothing registers or is relayed without a cookie; a short datagram gets
/// no answer; a 64-byte one gets `^cookie^C` (30 bytes); the cookie
/// registers, and then the client talks as in v1.
#[test]
fn only_a_cookie_registers() {
    let relay = spawn_relay(&["--verify-sources"]);
    let a = Client::verified(&relay);
    let stranger = Client::new(relay.addr);
    stranger.send(b"let me in");
    stranger.send(b"^hb^");
    relay.wait_metric("udphub_dropped_total{reason=\"unverified\"}", 2.0);
    a.send(b"members only");
    assert_eq!(a.recv(), seed_format("members only", a.addr()));
    stranger.expect_silence();
    assert_eq!(relay.metric("udphub_clients"), 1.0);
    // A wrong cookie is refused and counted.
    stranger.send(b"^cookie^AAAAAAAAAAAAAAAAAAAAAA");
    relay.wait_metric("udphub_dropped_total{reason=\"bad_cookie\"}", 1.0);
    // Another address's cookie is worthless here.
    let c = a.cookie();
    stranger.send(&[&b"^cookie^"[..], &c].concat());
    relay.wait_metric("udphub_dropped_total{reason=\"bad_cookie\"}", 2.0);
    assert_eq!(relay.metric("udphub_clients"), 1.0);
}

/// A member's `quit` and `^join^` need its cookie; proven, they work.
#[test]
fn membership_changes_need_the_cookie() {
    let relay = spawn_relay(&["--verify-sources"]);
    let a = Client::verified(&relay);
    let b = Client::verified(&relay);
    a.send(b"quit");
    a.send(b"^join^elsewhere");
    relay.wait_metric("udphub_dropped_total{reason=\"unproven\"}", 2.0);
    b.send(b"still two?");
    assert_eq!(a.recv(), seed_format("still two?", b.addr()));
    assert_eq!(b.recv(), seed_format("still two?", b.addr()));
    let cookie = a.cookie();
    let mut join = [&b"^cookie^"[..], &cookie, b"^join^red"].concat();
    join.resize(48, b' ');
    a.send(&join);
    assert_eq!(a.recv(), b"^room^red");
    a.send(&[&b"^cookie^"[..], &cookie, b"^quit"].concat());
    relay.wait_metric("udphub_clients_left_total", 1.0);
    assert_eq!(relay.metric("udphub_clients"), 1.0);
}

/// `--client-rate`: a member flooding is cut to its rate; the others keep
/// talking.
#[test]
fn a_flooding_member_is_rate_limited() {
    let relay = spawn_relay(&[
        "--client-rate",
        "10",
        "--client-burst",
        "5",
        "--format",
        "raw",
    ]);
    let flood = Client::joined(&relay);
    let calm = Client::joined(&relay);
    for _ in 0..200 {
        flood.send(b"x");
    }
    relay.wait_metric("udphub_dropped_total{reason=\"rate_limited\"}", 150.0);
    calm.send(b"still here");
    // Whatever of the flood got through comes first; then the calm message.
    let deadline = Instant::now() + PATIENCE;
    loop {
        assert!(Instant::now() < deadline, "the calm message never came");
        if calm.recv() == b"still here" {
            break;
        }
    }
}

/// `--max-clients-per-ip`.
#[test]
fn clients_per_ip_are_capped() {
    let relay = spawn_relay(&["--max-clients-per-ip", "2"]);
    let _a = Client::joined(&relay);
    let _b = Client::joined(&relay);
    let c = Client::new(relay.addr);
    c.send(b"^hb^");
    relay.wait_metric("udphub_dropped_total{reason=\"ip_full\"}", 1.0);
    assert_eq!(relay.metric("udphub_clients"), 2.0);
}

/// The clients do the handshake themselves: `udphub chat` (a pipe) in
/// verify mode is registered, talks, and leaves with a proven quit;
/// `udphub send --verify` gets its message through.
#[test]
fn chat_and_send_speak_verify_mode() {
    use std::io::{BufRead, BufReader, Write};
    use std::process::{Command, Stdio};
    let relay = spawn_relay(&["--verify-sources"]);
    let member = Client::verified(&relay);
    let mut chat = Command::new(util::udphub_bin())
        .args([
            "chat",
            "--server",
            &relay.addr.to_string(),
            "--name",
            "v",
            "--linger",
            "300ms",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    relay.wait_metric("udphub_clients", 2.0);
    let mut stdin = chat.stdin.take().unwrap();
    writeln!(stdin, "verified hello").unwrap();
    let got = member.recv();
    assert!(
        got.starts_with(b"v: verified hello. from 127.0.0.1:"),
        "{got:?}"
    );
    drop(stdin);
    let out = chat.wait_with_output().unwrap();
    assert!(out.status.success());
    let first = BufReader::new(&out.stdout[..]).lines().next();
    assert!(first.is_some_and(|l| l.unwrap().contains("verified hello")));
    relay.wait_metric("udphub_clients_left_total", 1.0);
    assert_eq!(
        relay.metric("udphub_dropped_total{reason=\"unproven\"}"),
        0.0
    );

    let out = Command::new(util::udphub_bin())
        .args([
            "send",
            "--server",
            &relay.addr.to_string(),
            "--verify",
            "--wait",
            "300ms",
            "sent proven",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = member.recv();
    assert!(got.starts_with(b"sent proven. from 127.0.0.1:"), "{got:?}");
}

/// The forged-liveness attack: a member goes silent after its handshake
/// while someone who knows its address (the default format prints it)
/// forges heartbeats, keepalives, timeout questions, hellos and messages
/// from that address. Only the cookie proves a member alive, so the silent
/// member expires on time and nothing sent after its timeout reaches it.
///
/// The forger is a second socket bound to the member's very address and
/// port (SO_REUSEPORT on both): on loopback that sends datagrams the relay
/// cannot tell from the member's, as a spoofer's would be, without a raw
/// socket. Both sockets are read, so whichever the kernel hands the
/// relay's datagrams to, they are counted.
#[test]
fn forged_heartbeats_do_not_keep_a_silent_member_alive() {
    use socket2::{Domain, Protocol, Socket, Type};
    use std::net::{SocketAddr, UdpSocket};
    use std::time::Duration;

    let relay = spawn_relay(&["--verify-sources", "--timeout", "1s", "--format", "raw"]);
    let shared = || {
        let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).unwrap();
        s.set_reuse_port(true).unwrap();
        s
    };
    let member = shared();
    member
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    let member: UdpSocket = member.into();
    let at = member.local_addr().unwrap();
    let mut silent = Client {
        sock: member,
        relay: relay.addr,
        proof: None,
    };
    let cookie = silent.cookie();
    let proof = [&b"^cookie^"[..], &cookie].concat();
    silent.send(&proof);
    silent.proof = Some(proof);
    relay.wait_metric("udphub_clients_joined_total", 1.0);
    let forger = shared();
    forger.bind(&at.into()).unwrap();
    let forger: UdpSocket = forger.into();
    forger.set_nonblocking(true).unwrap();
    silent.sock.set_nonblocking(true).unwrap();
    let talker = Client::verified(&relay);

    let padded = |word: &[u8]| {
        let mut d = word.to_vec();
        d.resize(64, b' ');
        d
    };
    let forged = [
        b"^hb^".to_vec(),
        Vec::new(),
        padded(b"^timeout^"),
        padded(b"^hello^"),
        b"forged words".to_vec(),
    ];
    let silent_since = Instant::now();
    let mut late = Vec::new();
    let mut first_late = None;
    let mut buf = [0u8; 2048];
    for step in 0..40u32 {
        forger
            .send_to(&forged[step as usize % forged.len()], relay.addr)
            .unwrap();
        if step % 3 == 0 {
            talker.heartbeat();
        }
        // Messages numbered from the moment the silent member's timeout
        // (1 s, plus a tick) is past: none of those may reach it.
        let past = silent_since.elapsed() > Duration::from_millis(1_200);
        if past && first_late.is_none() {
            first_late = Some(step);
        }
        talker.send(format!("news {step}").as_bytes());
        std::thread::sleep(Duration::from_millis(100));
        for sock in [&silent.sock, &forger] {
            while let Ok((n, _)) = sock.recv_from(&mut buf) {
                if let Some(k) = std::str::from_utf8(&buf[..n])
                    .ok()
                    .and_then(|t| t.strip_prefix("news "))
                    .and_then(|k| k.parse::<u32>().ok())
                {
                    if first_late.is_some_and(|first| k >= first) {
                        late.push(k);
                    }
                }
            }
        }
        // The talker keeps draining its own echoes.
        while talker.recv_within(Duration::from_millis(1)).is_some() {}
    }
    assert!(first_late.is_some(), "the run outlasted the timeout");
    assert!(
        late.is_empty(),
        "messages sent after the silent member's timeout reached it: {late:?}"
    );
    relay.wait_metric("udphub_clients_expired_total", 1.0);
    assert_eq!(relay.metric("udphub_clients"), 1.0, "only the talker");
    assert!(relay.metric("udphub_dropped_total{reason=\"unproven\"}") >= 3.0);
    // Its own cookie, from its own address, brings it back at once.
    silent.heartbeat();
    relay.wait_metric("udphub_clients", 2.0);
}
