//! Rooms and room tokens (wire protocol v2), through the real binary:
//! isolation, the replies byte for byte, caps, and tokens minted by a JWT
//! library nobody here wrote (Python's PyJWT).

mod util;

use std::process::Command;

use util::{metric, seed_format, spawn_relay, Client};

/// The secret every token test uses (32 bytes, the HS256 minimum).
const SECRET: &str = "0123456789abcdef0123456789abcdef";

impl Client {
    /// Sends `datagram` and returns the relay's answer.
    fn ask(&self, datagram: &[u8]) -> Vec<u8> {
        self.send(datagram);
        self.recv()
    }
}

/// Two rooms and the lobby: each hears only its own; the replies are
/// `^room^ROOM`, exactly.
#[test]
fn rooms_are_isolated_and_the_lobby_is_v1() {
    let relay = spawn_relay(&[]);
    let a = Client::new(relay.addr);
    let b = Client::new(relay.addr);
    let c = Client::new(relay.addr);
    let lobby = Client::joined(&relay);
    assert_eq!(a.ask(b"^join^red\n"), b"^room^red");
    assert_eq!(b.ask(b"^join^red"), b"^room^red");
    assert_eq!(c.ask(b"^join^blue"), b"^room^blue");
    a.send(b"for red");
    assert_eq!(b.recv(), seed_format("for red", a.addr()));
    assert_eq!(a.recv(), seed_format("for red", a.addr()));
    lobby.send(b"for the lobby");
    assert_eq!(lobby.recv(), seed_format("for the lobby", lobby.addr()));
    c.expect_silence();
    b.expect_silence();
    assert_eq!(relay.wait_metric("udphub_rooms", 2.0), 2.0);
    // Back to the lobby: blue empties and is freed.
    assert_eq!(c.ask(b"^join^"), b"^room^");
    lobby.send(b"hello c");
    assert_eq!(c.recv(), seed_format("hello c", lobby.addr()));
    relay.wait_metric("udphub_room_joins_total", 4.0);
    let text = relay.scrape();
    assert_eq!(metric(&text, "udphub_rooms"), 1.0, "{text}");
    assert_eq!(
        metric(&text, "udphub_datagrams_received_total{kind=\"join\"}"),
        4.0
    );
}

/// Caps and names: refusals answered `^denied^REASON` when that fits, the
/// sender left where it was, every refusal counted.
#[test]
fn refusals_are_answered_and_counted() {
    let relay = spawn_relay(&["--max-rooms", "1", "--max-room-clients", "1"]);
    let a = Client::new(relay.addr);
    let b = Client::joined(&relay);
    assert_eq!(a.ask(b"^join^one"), b"^room^one");
    assert_eq!(b.ask(b"^join^one      "), b"^denied^full");
    assert_eq!(b.ask(b"^join^two      "), b"^denied^full");
    assert_eq!(b.ask(b"^join^no way   "), b"^denied^name");
    // Too short for the answer: no answer (never more than was sent).
    b.send(b"^join^x/y");
    b.send(b"still lobby");
    assert_eq!(b.recv(), seed_format("still lobby", b.addr()));
    relay.wait_metric("udphub_room_join_refused_total{reason=\"name\"}", 2.0);
    assert_eq!(
        relay.metric("udphub_room_join_refused_total{reason=\"full\"}"),
        2.0
    );
    a.expect_silence();
    // The answer to a's join was lost, say, and it asks again: the room is
    // full of a itself, so the answer is the room, not a refusal.
    assert_eq!(a.ask(b"^join^one"), b"^room^one");
    assert_eq!(a.ask(b"^join^one"), b"^room^one");
    assert_eq!(
        relay.metric("udphub_room_join_refused_total{reason=\"full\"}"),
        2.0
    );
}

/// Mints a token with PyJWT.
fn pyjwt(claims: &str, key: &str, alg: &str) -> String {
    let script = format!(
        "import jwt, time, sys\nnow = int(time.time())\nprint(jwt.encode({claims}, {key:?}, algorithm={alg:?}))"
    );
    let out = Command::new("python3")
        .args(["-c", &script])
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "PyJWT failed (tests/run.sh installs it): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn secret_file() -> String {
    let path = util::temp_path("secret");
    std::fs::write(&path, format!("{SECRET}\n")).unwrap();
    path.to_str().unwrap().to_string()
}

/// A PyJWT token is accepted; wrong room, expired, nbf in the future, bad
/// signature, `alg: none` and garbage are each refused and counted.
#[test]
fn tokens_from_pyjwt_are_checked() {
    if !util::require_tool("python3") {
        return;
    }
    let secret = secret_file();
    let relay = spawn_relay(&["--room-secret-file", &secret]);
    let good = pyjwt(r#"{"room": "vip", "exp": now + 3600}"#, SECRET, "HS256");
    let a = Client::new(relay.addr);
    assert_eq!(a.ask(format!("^join^vip^{good}").as_bytes()), b"^room^vip");

    let bad = [
        pyjwt(r#"{"room": "other", "exp": now + 3600}"#, SECRET, "HS256"),
        pyjwt(r#"{"room": "vip", "exp": now - 3600}"#, SECRET, "HS256"),
        pyjwt(
            r#"{"room": "vip", "exp": now + 7200, "nbf": now + 3600}"#,
            SECRET,
            "HS256",
        ),
        pyjwt(
            r#"{"room": "vip", "exp": now + 3600}"#,
            "another-secret-another-secret-32",
            "HS256",
        ),
        pyjwt(r#"{"room": "vip", "exp": now + 3600}"#, "", "none"),
        "not.a.jwt".to_string(),
    ];
    let b = Client::joined(&relay);
    for t in &bad {
        assert_eq!(
            b.ask(format!("^join^vip^{t}").as_bytes()),
            b"^denied^token",
            "{t}"
        );
    }
    // No token at all, padded so the answer fits.
    assert_eq!(b.ask(b"^join^vip      "), b"^denied^token");
    relay.wait_metric("udphub_room_join_refused_total{reason=\"token\"}", 7.0);
    // b is still in the lobby, a alone in vip.
    a.send(b"private");
    assert_eq!(a.recv(), seed_format("private", a.addr()));
    b.expect_silence();
}

/// `udphub token` mints what the relay accepts, and PyJWT can read it.
#[test]
fn udphub_token_is_a_standard_jwt() {
    if !util::require_tool("python3") {
        return;
    }
    let secret = secret_file();
    let out = Command::new(util::udphub_bin())
        .args([
            "token",
            "--room",
            "ops",
            "--ttl",
            "1h",
            "--secret-file",
            &secret,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let check = Command::new("python3")
        .args([
            "-c",
            "import jwt, sys; print(jwt.decode(sys.argv[1], sys.argv[2], algorithms=['HS256'])['room'])",
            &token,
            SECRET,
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&check.stdout).trim(), "ops");
    let relay = spawn_relay(&["--room-secret-file", &secret]);
    let a = Client::new(relay.addr);
    assert_eq!(a.ask(format!("^join^ops^{token}").as_bytes()), b"^room^ops");
}

/// A closed lobby: nothing is relayed outside a room, and that is counted.
#[test]
fn a_closed_lobby_relays_only_inside_rooms() {
    let secret = secret_file();
    let relay = spawn_relay(&["--room-secret-file", &secret, "--lobby", "closed"]);
    let a = Client::new(relay.addr);
    a.send(b"anyone?");
    relay.wait_metric("udphub_dropped_total{reason=\"lobby_closed\"}", 1.0);
    a.expect_silence();
    let out = Command::new(util::udphub_bin())
        .args([
            "token",
            "--room",
            "r",
            "--ttl",
            "10m",
            "--secret-file",
            &secret,
        ])
        .output()
        .unwrap();
    let token = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        a.ask(format!("^join^r^{}", token.trim()).as_bytes()),
        b"^room^r"
    );
    a.send(b"inside");
    assert_eq!(a.recv(), seed_format("inside", a.addr()));
}

/// `udphub send --room` joins first; a refusal is said in words (exit 1).
#[test]
fn send_joins_a_room_and_says_why_it_cannot() {
    let secret = secret_file();
    let relay = spawn_relay(&["--room-secret-file", &secret]);
    let member = Client::new(relay.addr);
    let token = |room: &str, ttl: &str| {
        let out = Command::new(util::udphub_bin())
            .args([
                "token",
                "--room",
                room,
                "--ttl",
                ttl,
                "--secret-file",
                &secret,
            ])
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let ops = token("ops", "1h");
    assert_eq!(
        member.ask(format!("^join^ops^{ops}").as_bytes()),
        b"^room^ops"
    );
    let send = |extra: &[&str]| {
        Command::new(util::udphub_bin())
            .args([
                "send",
                "--server",
                &relay.addr.to_string(),
                "--wait",
                "300ms",
            ])
            .args(extra)
            .output()
            .unwrap()
    };
    let out = send(&["--room", "ops", "--token", &ops, "hello ops"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = member.recv();
    assert!(got.starts_with(b"hello ops. from 127.0.0.1:"), "{got:?}");
    for (args, needle) in [
        (vec!["--room", "ops", "x"], "needs a token"),
        (vec!["--room", "ops", "--token", "a.b.c", "x"], "not a JWT"),
        (
            vec!["--room", "ops", "--token", &token("dev", "1h"), "x"],
            "is for room \"dev\"",
        ),
    ] {
        let out = send(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
    member.expect_silence();
}

/// A join answered and a message sent right after it arrive in that order,
/// though answers are batched (queued answers go out before any fan-out);
/// many joins at once are all answered.
#[test]
fn batched_answers_keep_their_order() {
    let relay = spawn_relay(&["--no-echo"]);
    let a = Client::new(relay.addr);
    let b = Client::new(relay.addr);
    b.send(b"^join^r");
    assert_eq!(b.recv(), b"^room^r");
    a.send(b"^join^r");
    a.send(b"after the join");
    assert_eq!(a.recv(), b"^room^r");
    assert_eq!(b.recv(), seed_format("after the join", a.addr()));
    let many: Vec<Client> = (0..200).map(|_| Client::new(relay.addr)).collect();
    for c in &many {
        c.send(b"^join^crowd");
    }
    for c in &many {
        assert_eq!(c.recv(), b"^room^crowd");
    }
    a.expect_silence();
}
