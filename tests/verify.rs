//! Verify mode (`--verify-sources`), through the real binary: stateless
//! cookies byte for byte, unproven quits ignored, and a spoofing attack
//! with forged sources (a raw socket, 127.0.0.0/8 only, aimed only at the
//! relay under test) that gains no amplification and no table slot.

mod util;

use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use util::{metric, seed_format, spawn_relay, Client, PATIENCE};

impl Client {
    /// Asks for a cookie (`^hello^` padded to 64 bytes) and returns it.
    fn cookie(&self) -> Vec<u8> {
        let mut hello = b"^hello^".to_vec();
        hello.resize(64, b' ');
        self.send(&hello);
        let answer = self.recv();
        let cookie = answer
            .strip_prefix(b"^cookie^")
            .unwrap_or_else(|| panic!("not a cookie: {:?}", String::from_utf8_lossy(&answer)));
        assert_eq!(cookie.len(), 22, "{answer:?}");
        cookie.to_vec()
    }

    /// Registers through the cookie handshake.
    fn verified(relay: &util::RelayProc) -> Client {
        let c = Client::new(relay.addr);
        let cookie = c.cookie();
        let before = relay.metric("udphub_clients_joined_total");
        c.send(&[&b"^cookie^"[..], &cookie].concat());
        relay.wait_metric("udphub_clients_joined_total", before + 1.0);
        c
    }
}

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

/// An IPv4+UDP datagram with a forged source, for a raw socket.
fn forged(from: SocketAddrV4, to: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let total = 20 + 8 + payload.len();
    let mut p = Vec::with_capacity(total);
    // IPv4 header: the kernel fills in the checksum (and the id when 0).
    p.extend_from_slice(&[
        0x45,
        0,
        (total >> 8) as u8,
        total as u8,
        0,
        0,
        0x40,
        0,
        64,
        17,
        0,
        0,
    ]);
    p.extend_from_slice(&from.ip().octets());
    p.extend_from_slice(&to.ip().octets());
    // UDP header; checksum 0 = none (allowed over IPv4).
    let udp_len = 8 + payload.len();
    p.extend_from_slice(&from.port().to_be_bytes());
    p.extend_from_slice(&to.port().to_be_bytes());
    p.extend_from_slice(&(udp_len as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(payload);
    p
}

/// An off-path attacker forging a victim's address: what the victim gets
/// for what the attacker sends, and whether it got a table slot.
struct Attack {
    sent: usize,
    victim_got: usize,
    clients: f64,
}

fn spoof(extra: &[&str]) -> Attack {
    let relay = spawn_relay(extra);
    let SocketAddr::V4(relay_v4) = relay.addr else {
        panic!("IPv4 relay expected")
    };
    // A real member who keeps talking, so a registered victim would hear it.
    let member = if extra.contains(&"--verify-sources") {
        Client::verified(&relay)
    } else {
        Client::joined(&relay)
    };
    let victim = UdpSocket::bind("127.0.0.77:0").expect("bind the victim on 127.0.0.77");
    victim.set_nonblocking(true).unwrap();
    let SocketAddr::V4(victim_addr) = victim.local_addr().unwrap() else {
        unreachable!()
    };
    assert!(
        victim_addr.ip().is_loopback(),
        "only loopback sources are forged"
    );
    let raw = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::RAW,
        Some(socket2::Protocol::from(libc::IPPROTO_RAW)),
    );
    let raw = match raw {
        Ok(s) => s,
        Err(e) if std::env::var_os("CI").is_some() => {
            panic!("raw sockets are required under CI (run as root): {e}")
        }
        Err(e) => panic!("raw socket unavailable ({e}); run as root"),
    };
    let dest: socket2::SockAddr = SocketAddr::V4(relay_v4).into();
    let mut sent = 0;
    let mut victim_got = 0;
    let mut buf = [0u8; 2048];
    let mut hello = b"^hello^".to_vec();
    hello.resize(64, b' ');
    let attacks: [&[u8]; 4] = [
        &hello,
        b"^hb^",
        b"register me and send me everything",
        &[b'x'; 200],
    ];
    for round in 0..200 {
        let payload = attacks[round % attacks.len()];
        raw.send_to(&forged(victim_addr, relay_v4, payload), &dest)
            .expect("send a forged datagram");
        sent += payload.len();
        if round % 10 == 0 {
            member.send(b"the conversation the victim must not get");
        }
        while let Ok(n) = victim.recv(&mut buf) {
            victim_got += n;
        }
    }
    // Let the relay finish, then count what reached the victim.
    relay.wait_metric(
        "udphub_datagrams_received_total{kind=\"message\"}",
        if extra.contains(&"--verify-sources") {
            20.0
        } else {
            1.0
        },
    );
    let deadline = Instant::now() + Duration::from_millis(300);
    while Instant::now() < deadline {
        while let Ok(n) = victim.recv(&mut buf) {
            victim_got += n;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let text = relay.scrape();
    Attack {
        sent,
        victim_got,
        clients: metric(&text, "udphub_clients"),
    }
}

/// Verify mode: the victim gets at most as many bytes as the attacker
/// sends (only cookies, each shorter than the hello that asked), and the
/// attacker gets no table slot. Without verify mode the same attack
/// registers the victim and it receives the conversation.
#[test]
fn forged_sources_gain_no_amplification_and_no_slot() {
    let open = spoof(&[]);
    let safe = spoof(&["--verify-sources"]);
    let factor = |a: &Attack| a.victim_got as f64 / a.sent as f64;
    eprintln!(
        "amplification: default {:.2} ({} of {} bytes, {} clients); verify {:.2} ({} of {} bytes, {} clients)",
        factor(&open), open.victim_got, open.sent, open.clients,
        factor(&safe), safe.victim_got, safe.sent, safe.clients
    );
    assert!(
        factor(&safe) <= 1.0,
        "amplification {:.2} in verify mode",
        factor(&safe)
    );
    assert_eq!(safe.clients, 1.0, "the spoofed source got a slot");
    assert!(
        open.victim_got > 0 && open.clients == 2.0,
        "the default mode should show the problem"
    );
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
