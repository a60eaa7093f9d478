//! The client library (`udphub::client`) against the real relay binary:
//! the lobby, rooms with minted tokens, each refusal the relay gives,
//! verify mode kept alive past the relay's timeout, `bye` as the end of
//! the stream, IPv6.

mod util;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use udphub::client::{Client, ClientError, Event, Options, Refusal};
use udphub::core::token::{mint, Claims, RoomSecret};
use util::{spawn_relay, spawn_relay_on, temp_path, PATIENCE};

const SECRET: &str = "client-api-test-secret-0123456789abcdef";

/// A secret file for `--room-secret-file`, and a token for `room` from it
/// that expires `ttl_secs` from now (negative: already expired).
fn secret_file() -> String {
    let path = temp_path("client-secret");
    std::fs::write(&path, format!("{SECRET}\n")).unwrap();
    path.to_str().unwrap().to_string()
}

fn token(room: &str, ttl_secs: i64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let secret = RoomSecret::new(SECRET.as_bytes().to_vec()).unwrap();
    mint(
        &secret,
        &Claims {
            room: room.to_string(),
            exp: (now + ttl_secs) as u64,
            nbf: None,
        },
    )
}

/// Reads until a message that `want` accepts, bounded by [`PATIENCE`].
fn recv_until(client: &Client, want: impl Fn(&[u8]) -> bool) -> Vec<u8> {
    let deadline = Instant::now() + PATIENCE;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        if let Some(m) = client.recv(left).unwrap() {
            if want(&m) {
                return m;
            }
        }
    }
    panic!("no such message within {PATIENCE:?}");
}

/// Two clients in the lobby talk; the relay's timeout is learnt.
#[test]
fn lobby_clients_talk() {
    let relay = spawn_relay(&[]);
    let a = Client::connect(relay.addr).unwrap();
    let b = Client::connect(relay.addr.to_string()).unwrap();
    assert_eq!(a.relay_timeout(), Some(Duration::from_secs(10)));
    assert!(!a.verified());
    assert_eq!(a.room(), None);
    a.send(b"hello lobby").unwrap();
    let got = recv_until(&b, |m| m.starts_with(b"hello lobby"));
    let from = a.local_addr().unwrap();
    assert_eq!(got, format!("hello lobby. from {from}").into_bytes());
    let err = a.send(&vec![b'x'; 1473]).unwrap_err();
    assert!(
        err.is_usage() && err.to_string().contains("1473 bytes"),
        "{err}"
    );
}

/// A room with a minted token admits its holder; messages stay in it.
#[test]
fn a_room_with_a_minted_token() {
    let secret = secret_file();
    let relay = spawn_relay(&["--room-secret-file", &secret, "--no-echo"]);
    let tok = token("red", 3600);
    let a = Client::connect_with(relay.addr, &Options::room("red", Some(&tok))).unwrap();
    let b = Client::connect_with(relay.addr, &Options::room("red", Some(&tok))).unwrap();
    let outside = Client::connect(relay.addr).unwrap();
    assert_eq!(a.room().as_deref(), Some("red"));
    a.send(b"in red").unwrap();
    recv_until(&b, |m| m.starts_with(b"in red. from"));
    assert_eq!(outside.recv(Duration::from_millis(300)).unwrap(), None);
    // Moving to the lobby and back is a join each.
    b.join("", None).unwrap();
    b.join("red", Some(&tok)).unwrap();
}

/// Each refusal the relay gives is an error that says why, and the client
/// stays where it was: a missing, expired or other room's token; a full
/// room; a closed lobby. A bad name never leaves the client.
#[test]
fn refused_joins_say_why() {
    let secret = secret_file();
    let relay = spawn_relay(&["--room-secret-file", &secret, "--max-room-clients", "1"]);
    let refused = |options: Options| match Client::connect_with(relay.addr, &options) {
        Err(ClientError::Refused { reason, why, .. }) => (reason, why),
        other => panic!("{other:?}"),
    };
    let (reason, why) = refused(Options::room("red", None));
    assert_eq!(reason, Refusal::Token);
    assert!(why.contains("needs a token"), "{why}");
    let (reason, why) = refused(Options::room("red", Some(&token("red", -3600))));
    assert_eq!(reason, Refusal::Token);
    assert!(why.contains("expired") && why.contains("fresh"), "{why}");
    let (_, why) = refused(Options::room("red", Some(&token("blue", 3600))));
    assert!(why.contains("is for room \"blue\""), "{why}");
    let (_, why) = refused(Options::room("red", Some("a.b.c")));
    assert!(
        why.contains("not a JWT") || why.contains("copied whole"),
        "{why}"
    );

    let first = Client::connect_with(relay.addr, &Options::room("red", Some(&token("red", 60))));
    let _first = first.unwrap();
    let (reason, why) = refused(Options::room("red", Some(&token("red", 60))));
    assert_eq!(reason, Refusal::Full);
    assert!(why.contains("is full"), "{why}");

    // A client in the lobby refused a room stays in the lobby.
    let c = Client::connect(relay.addr).unwrap();
    let err = c.join("red", None).unwrap_err();
    assert!(matches!(
        err,
        ClientError::Refused {
            reason: Refusal::Token,
            ..
        }
    ));
    assert_eq!(c.room(), None);
    let stray = Options {
        token: Some(token("red", 60)),
        ..Options::default()
    };
    let err = Client::connect_with(relay.addr, &stray).unwrap_err();
    assert!(
        err.is_usage() && err.to_string().contains("a token is for a room"),
        "{err}"
    );
    let err = c.join("no spaces", None).unwrap_err();
    assert!(
        err.is_usage() && err.to_string().contains("1 to 64"),
        "{err}"
    );

    let closed = spawn_relay(&["--room-secret-file", &secret, "--lobby", "closed"]);
    match Client::connect(closed.addr) {
        Err(e @ ClientError::LobbyClosed(_)) => {
            assert!(e.to_string().contains("--lobby closed"), "{e}")
        }
        other => panic!("{other:?}"),
    }
    Client::connect_with(closed.addr, &Options::room("ops", Some(&token("ops", 60)))).unwrap();
}

/// Verify mode: a client that says nothing for more than twice the
/// relay's timeout is kept alive (and proven) by the library's heartbeats
/// while it reads, and still receives in its room; it leaves with a
/// proven quit. (In verify mode the relay does not tell members its
/// timeout, so the library heartbeats every second: 2 s here.)
#[test]
fn verify_mode_keeps_a_silent_client_alive() {
    let relay = spawn_relay(&["--verify-sources", "--timeout", "2s", "--format", "raw"]);
    let quiet = Client::connect_with(relay.addr, &Options::room("v", None)).unwrap();
    assert!(quiet.verified());
    let lobby = Client::connect(relay.addr).unwrap();
    assert!(lobby.verified());
    let talker = Client::connect_with(relay.addr, &Options::room("v", None)).unwrap();
    // Silent for 5 s against a 2 s timeout: only reading.
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        let _ = quiet.recv(Duration::from_millis(200)).unwrap();
        let _ = lobby.recv(Duration::from_millis(1)).unwrap();
        talker.tick().unwrap();
    }
    talker.send(b"still there?").unwrap();
    recv_until(&quiet, |m| m == b"still there?");
    relay.wait_metric("udphub_clients", 3.0);
    assert_eq!(relay.metric("udphub_clients_expired_total"), 0.0);
    drop(quiet);
    util::wait_metric(relay.metrics.unwrap(), "udphub_clients_left_total", 1.0);
}

/// The relay's `bye` is the end of the stream, on every later call too.
#[test]
fn bye_ends_the_stream() {
    let relay = spawn_relay(&[]);
    let c = Client::connect(relay.addr).unwrap();
    relay.signal("TERM");
    let deadline = Instant::now() + PATIENCE;
    let mut saw_bye = false;
    while Instant::now() < deadline {
        match c.next_event(Duration::from_millis(200)) {
            Ok(Some(Event::Bye)) => {
                saw_bye = true;
                break;
            }
            Ok(_) => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert!(saw_bye);
    let err = c.recv(Duration::from_millis(10)).unwrap_err();
    assert!(matches!(err, ClientError::RelayClosed(_)), "{err}");
    assert!(err.to_string().contains("said bye"), "{err}");
    assert!(matches!(c.send(b"x"), Err(ClientError::RelayClosed(_))));
}

/// IPv6: a relay on ::1, clients in a room, the sender shown bracketed.
#[test]
fn ipv6_loopback() {
    let relay = spawn_relay_on("[::1]:0", false, &[]);
    let a = Client::connect_with(relay.addr, &Options::room("six", None)).unwrap();
    let b = Client::connect_with(relay.addr, &Options::room("six", None)).unwrap();
    assert!(a.local_addr().unwrap().is_ipv6());
    a.send(b"over v6").unwrap();
    let got = recv_until(&b, |m| m.starts_with(b"over v6"));
    assert!(got.starts_with(b"over v6. from [::1]:"), "{got:?}");
}

/// Nothing listening: a lobby client connects anyway (the relay may come
/// later) and says so; a room join fails, saying nothing listens.
#[test]
fn nothing_listening_is_said() {
    let port = {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap()
    };
    let c = Client::connect(port).unwrap();
    assert_eq!(c.next_event(PATIENCE).unwrap(), Some(Event::Unreachable));
    let options = Options {
        wait: Duration::from_millis(600),
        ..Options::room("r", None)
    };
    let err = Client::connect_with(port, &options).unwrap_err();
    assert!(matches!(err, ClientError::NotListening(_)), "{err}");
}

/// A v1 relay (the seeds' server: every datagram relayed to every sender,
/// no control words) has one room: a client is a member of it (its
/// question is relayed back, which shows it), and a room join gets no
/// answer, said as such.
#[test]
fn a_v1_relay_is_joined_in_its_one_room() {
    let relay = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = relay.local_addr().unwrap();
    relay
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopped = std::sync::Arc::clone(&stop);
    let seed = std::thread::spawn(move || {
        let mut members = Vec::new();
        let mut buf = [0u8; 2048];
        let until = Instant::now() + Duration::from_secs(20);
        while !stopped.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < until {
            let Ok((n, from)) = relay.recv_from(&mut buf) else {
                continue;
            };
            if !members.contains(&from) {
                members.push(from);
            }
            let body = buf[..n].strip_suffix(b"\n").unwrap_or(&buf[..n]);
            let out = [body, format!(". from {from}").as_bytes()].concat();
            for m in &members {
                let _ = relay.send_to(&out, m);
            }
        }
    });
    let a = Client::connect(addr).unwrap();
    assert!(a.confirmed() && !a.verified());
    assert_eq!(a.relay_timeout(), None);
    let b = Client::connect(addr).unwrap();
    b.send(b"hi v1").unwrap();
    recv_until(&a, |m| m.starts_with(b"hi v1. from"));
    let options = Options {
        wait: Duration::from_millis(600),
        ..Options::room("red", None)
    };
    let err = Client::connect_with(addr, &options).unwrap_err();
    assert!(
        matches!(err, ClientError::NoAnswer { .. }) && err.to_string().contains("knows rooms"),
        "{err}"
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    seed.join().unwrap();
}

/// Many clients on one thread: `tick` never blocks, heartbeats each in
/// time (the relay's 1 s timeout, told to them, passes twice), and keeps
/// what arrives for `recv`.
#[test]
fn many_clients_on_one_thread_tick() {
    let relay = spawn_relay(&["--timeout", "1s", "--format", "raw"]);
    let clients: Vec<Client> = (0..20)
        .map(|_| Client::connect_with(relay.addr, &Options::room("many", None)).unwrap())
        .collect();
    assert!(clients[0].heartbeat_interval() < Duration::from_millis(500));
    let until = Instant::now() + Duration::from_millis(2500);
    while Instant::now() < until {
        for c in &clients {
            c.tick().unwrap();
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    clients[0].send(b"all here?").unwrap();
    for c in &clients {
        recv_until(c, |m| m == b"all here?");
    }
    assert_eq!(relay.metric("udphub_clients_expired_total"), 0.0);
}
