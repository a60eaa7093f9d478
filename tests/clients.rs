//! The people side: `udphub chat` (in tmux, as a person types, and as a
//! pipe), `udphub send`, and `udphub echo`, through the real binary.

mod util;

use std::io::{BufRead, BufReader, Write};
use std::net::UdpSocket;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use util::proc::Proc;
use util::{seed_format, spawn_relay, udphub_bin, Client, PATIENCE};

/// Pipe mode: a line on stdin is relayed; what the relay sends is printed,
/// one per line; end of input sends `quit` and exits 0.
#[test]
fn chat_in_a_pipe_sends_lines_and_prints_messages() {
    let relay = spawn_relay(&[]);
    let server = relay.addr.to_string();
    let mut alice = Proc::spawn(&[
        "chat", "--server", &server, "--name", "alice", "--linger", "0s",
    ]);
    let bob = Proc::spawn(&["chat", "--server", &server]);
    relay.wait_metric("udphub_clients", 2.0);
    alice.write_line("hello bob");
    let line = bob.expect_line("alice: hello bob. from 127.0.0.1:");
    assert!(line.starts_with("alice: hello bob. from "), "{line}");
    alice.expect_line("alice: hello bob");
    let (code, _) = alice.wait();
    assert_eq!(code, Some(0));
    assert_eq!(relay.wait_metric("udphub_clients_left_total", 1.0), 1.0);
}

/// The chat client heartbeats on its own: a silent member outlives the
/// relay's timeout.
#[test]
fn chat_heartbeats_keep_a_quiet_member_alive() {
    outlives_a_300ms_timeout(&["--heartbeat", "50ms"]);
}

/// Starts `udphub chat` (plus `extra`) against a relay with a 300 ms
/// timeout, lets more than a timeout pass while it says nothing, and checks
/// it still receives.
fn outlives_a_300ms_timeout(extra: &[&str]) {
    let relay = spawn_relay(&["--timeout", "300ms"]);
    let server = relay.addr.to_string();
    let mut args = vec!["chat", "--server", &server];
    args.extend_from_slice(extra);
    let quiet = Proc::spawn(&args);
    relay.wait_metric("udphub_clients", 1.0);
    // A silent client that joined after `quiet`: once it has expired, more
    // than a timeout has passed since `quiet` last said anything but
    // heartbeats.
    let _control = Client::joined(&relay);
    relay.wait_metric("udphub_clients_expired_total", 1.0);
    let talker = Client::new(relay.addr);
    talker.send(b"still there?");
    quiet.expect_line("still there?. from");
    assert_eq!(relay.metric("udphub_clients_expired_total"), 1.0);
}

/// When the relay shuts down, the chat client says so and exits 0.
#[test]
fn chat_exits_when_the_relay_says_bye() {
    let relay = spawn_relay(&[]);
    let member = Proc::spawn(&["chat", "--server", &relay.addr.to_string()]);
    relay.wait_metric("udphub_clients", 1.0);
    relay.signal("TERM");
    let (code, stderr) = member.wait_with_stdin_open();
    assert_eq!(code, Some(0));
    assert!(stderr.contains("said bye"), "{stderr}");
}

/// A person at a terminal (tmux): typed lines are sent, an incoming
/// message is shown without garbling the half-typed line, `quit` exits 0.
#[test]
fn chat_in_a_terminal() {
    if !util::require_tool("tmux") {
        return;
    }
    let relay = spawn_relay(&[]);
    let chat = TmuxChat::start("typing", &relay, &["--name", "alice"]);
    chat.wait_screen("alice>");
    relay.wait_metric("udphub_clients", 1.0);
    let bob = Client::joined(&relay);

    // A half-typed line, then a message arrives.
    chat.tmux(&["send-keys", "-t", "chat", "half a thou"]);
    chat.wait_screen("alice> half a thou");
    bob.send(b"interrupting");
    let s = chat.wait_screen("interrupting. from 127.0.0.1:");
    let lines: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
    let msg = lines
        .iter()
        .position(|l| l.starts_with("interrupting. from"))
        .unwrap();
    assert_eq!(
        lines.get(msg + 1).map(|l| l.trim_end()),
        Some("alice> half a thou"),
        "{s}"
    );

    // Finish the line: bob receives it, attributed to alice.
    chat.tmux(&["send-keys", "-t", "chat", "ght", "Enter"]);
    let got = loop {
        let d = bob.recv();
        if !d.starts_with(b"interrupting") {
            break d;
        }
    };
    let text = String::from_utf8(got).unwrap();
    assert!(
        text.starts_with("alice: half a thought. from 127.0.0.1:"),
        "{text}"
    );

    chat.tmux(&["send-keys", "-t", "chat", "quit", "Enter"]);
    chat.wait_screen("EXIT=0");
    assert_eq!(relay.wait_metric("udphub_clients_left_total", 1.0), 1.0);
}

/// `udphub send`: prints the reply; `--expect-reply` makes silence exit 1.
#[test]
fn send_prints_replies_and_can_require_one() {
    let echo = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = echo.local_addr().unwrap();
    let responder = thread::spawn(move || {
        echo.set_read_timeout(Some(PATIENCE)).unwrap();
        let mut buf = [0u8; 64];
        let (n, from) = echo.recv_from(&mut buf).unwrap();
        echo.send_to(&buf[..n], from).unwrap();
        echo.send_to(b"second", from).unwrap();
    });
    let out = Command::new(udphub_bin())
        .args([
            "send",
            "--server",
            &addr.to_string(),
            "ping",
            "--wait",
            "500ms",
            "--expect-reply",
        ])
        .output()
        .unwrap();
    responder.join().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ping\nsecond\n");

    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let out = Command::new(udphub_bin())
        .args([
            "send",
            "--server",
            &silent.local_addr().unwrap().to_string(),
            "x",
        ])
        .args(["--wait", "200ms", "--expect-reply"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
}

/// `udphub echo --upper`: replies like seed 001, is counted like the relay,
/// and shuts down on SIGTERM with exit 0.
#[test]
fn echo_server_replies_and_counts() {
    let ready = util::temp_path("echo-ready");
    let mut cmd = Command::new(udphub_bin());
    cmd.args(["echo", "--bind", "127.0.0.1:0", "--upper"])
        .args(["--metrics", "127.0.0.1:0", "--ready-file"])
        .arg(&ready);
    let (mut child, _log, addrs) = util::spawn_until_ready(cmd, &ready);
    let bind = addrs.udp;
    let metrics = addrs.metrics.expect("metrics on");
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut buf = [0u8; 2048];
    client.send_to(b"hello, World \xff", bind).unwrap();
    let (n, _) = client.recv_from(&mut buf).expect("echo answers");
    assert_eq!(&buf[..n], b"HELLO, WORLD \xff");
    client.send_to(b"quit", bind).unwrap();
    let (n, _) = client.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"QUIT", "quit is echoed, not obeyed");
    client.send_to(&[b'x'; 1500], bind).unwrap();
    client.send_to(b"last", bind).unwrap();
    let (n, _) = client.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"LAST", "oversize was not echoed");

    // The reply can overtake the loop's flush: wait for the counters.
    util::wait_metric(metrics, "udphub_deliveries_total", 3.0);
    util::wait_metric(metrics, "udphub_dropped_total{reason=\"oversize\"}", 1.0);
    let scrape = util::scrape(metrics);
    let received = util::metric(&scrape, "udphub_datagrams_received_total{kind=\"message\"}");
    assert_eq!(received, 3.0, "{scrape}");
    assert_eq!(util::metric(&scrape, "udphub_deliveries_total"), 3.0);

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + PATIENCE;
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        assert!(Instant::now() < deadline, "echo did not exit");
        thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(code, Some(0));
}

/// A server address that doesn't parse or resolve is a usage error.
#[test]
fn chat_and_send_reject_bad_addresses() {
    for args in [
        vec!["chat", "--server", "nowhere"],
        vec!["send", "--server", "127.0.0.1", "x"],
        vec!["chat"],
        vec!["chat", "--lan", "--server", "127.0.0.1:1"],
    ] {
        let out = Command::new(udphub_bin())
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr}");
    }
}

/// `seed_format` is what the chat client prints for a relayed message.
#[test]
fn chat_prints_relayed_messages_verbatim() {
    let relay = spawn_relay(&["--no-echo"]);
    let member = Proc::spawn(&["chat", "--server", &relay.addr.to_string()]);
    relay.wait_metric("udphub_clients", 1.0);
    let other = Client::new(relay.addr);
    other.send(b"verbatim \xffbytes");
    let want =
        String::from_utf8_lossy(&seed_format("verbatim \u{fffd}bytes", other.addr())).into_owned();
    let line = member.expect_line("verbatim");
    assert_eq!(line, want);
}

/// A chat client in a tmux session of its own, killed on drop.
struct TmuxChat {
    socket: String,
}

impl TmuxChat {
    fn start(tag: &str, relay: &util::RelayProc, extra: &[&str]) -> TmuxChat {
        let socket = format!("udphub-{tag}-{}", std::process::id());
        // After the client exits, show its status and whether the terminal
        // is back in canonical (cooked) mode: `stty` prints `icanon` then.
        let cmd = format!(
            "{} chat --server {} {}; echo EXIT=$?; stty -a | tr ' ' '\\n' | grep -x icanon; sleep 30",
            udphub_bin(),
            relay.addr,
            extra.join(" ")
        );
        let t = TmuxChat { socket };
        t.tmux(&[
            "new-session",
            "-d",
            "-s",
            "chat",
            "-x",
            "100",
            "-y",
            "20",
            &cmd,
        ]);
        t.wait_screen(">");
        t
    }

    fn tmux(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .args(["-L", &self.socket])
            .args(args)
            .output()
            .expect("run tmux");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn wait_screen(&self, needle: &str) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let s = self.tmux(&["capture-pane", "-p", "-t", "chat"]);
            if s.contains(needle) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "screen never showed {needle:?}:\n{s}"
            );
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for TmuxChat {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .output();
    }
}

/// Ctrl-C and Ctrl-D at the prompt both send `quit` and exit 0.
#[test]
fn chat_in_a_terminal_leaves_on_ctrl_c_and_ctrl_d() {
    if !util::require_tool("tmux") {
        return;
    }
    let relay = spawn_relay(&[]);
    for (n, key) in [(1.0, "C-c"), (2.0, "C-d")] {
        let chat = TmuxChat::start(&format!("key{n}"), &relay, &[]);
        relay.wait_metric("udphub_clients", 1.0);
        chat.tmux(&["send-keys", "-t", "chat", key]);
        chat.wait_screen("EXIT=0");
        assert_eq!(relay.wait_metric("udphub_clients_left_total", n), n);
    }
}

/// When the relay shuts down, the terminal client says so, exits 0, and
/// leaves the terminal usable (not in raw mode).
#[test]
fn chat_in_a_terminal_exits_on_bye() {
    if !util::require_tool("tmux") {
        return;
    }
    let mut relay = spawn_relay(&[]);
    let chat = TmuxChat::start("bye", &relay, &[]);
    relay.wait_metric("udphub_clients", 1.0);
    chat.tmux(&["send-keys", "-t", "chat", "typing"]);
    chat.wait_screen("> typing");
    relay.signal("TERM");
    chat.wait_screen("EXIT=0");
    let screen = chat.wait_screen("icanon");
    assert!(screen.contains("the relay said bye"), "{screen}");
    assert!(
        screen.lines().any(|l| l.trim() == "icanon"),
        "terminal left raw:\n{screen}"
    );
    assert_eq!(relay.wait_exit().code(), Some(0));
}

/// `udphub send` to an address where nothing listens says so (exit 1);
/// `--expect-reply` without a reply says so too.
#[test]
fn send_says_when_nothing_listens_or_nothing_answers() {
    let port = UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = Command::new(udphub_bin())
        .args(["send", "--server", &format!("127.0.0.1:{port}"), "hi"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("nothing is listening at 127.0.0.1:"),
        "{stderr}"
    );

    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let out = Command::new(udphub_bin())
        .args([
            "send",
            "--server",
            &silent.local_addr().unwrap().to_string(),
        ])
        .args(["x", "--wait", "100ms", "--expect-reply"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.contains("no reply from") && stderr.contains("100ms"),
        "{stderr}"
    );
}

/// Bodies are bytes: `send` takes a non-UTF-8 argument, `--hex` and `--stdin`.
#[test]
fn send_sends_any_bytes() {
    use std::os::unix::ffi::OsStrExt;
    let sink = UdpSocket::bind("127.0.0.1:0").unwrap();
    sink.set_read_timeout(Some(PATIENCE)).unwrap();
    let server = sink.local_addr().unwrap().to_string();
    let run = |extra: &[&std::ffi::OsStr], stdin: &[u8]| {
        let mut child = Command::new(udphub_bin())
            .args(["send", "--server", &server, "--wait", "0s"])
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        assert!(child.wait().unwrap().success());
        let mut buf = [0u8; 64];
        let (n, _) = sink.recv_from(&mut buf).unwrap();
        buf[..n].to_vec()
    };
    let raw = std::ffi::OsStr::from_bytes(b"\xff\xfeok");
    assert_eq!(run(&[raw], b""), b"\xff\xfeok");
    let hex = [
        std::ffi::OsStr::new("--hex"),
        std::ffi::OsStr::new("00ff 41"),
    ];
    assert_eq!(run(&hex, b""), b"\x00\xffA");
    assert_eq!(
        run(&[std::ffi::OsStr::new("--stdin")], b"line\nand \x00 more"),
        b"line\nand \x00 more"
    );
}

/// `udphub chat` against an address where nothing listens says so, keeps
/// trying, and says when the relay answers again.
#[test]
fn chat_says_when_nothing_listens_and_when_the_relay_is_back() {
    let port = UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let server = format!("127.0.0.1:{port}");
    let mut chat = Command::new(udphub_bin())
        .args(["chat", "--server", &server, "--heartbeat", "100ms"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = chat.stderr.take().unwrap();
    let (tx, lines) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let expect = |needle: &str| {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(l) if l.contains(needle) => return l,
                Ok(_) => {}
                Err(_) => panic!("chat never said {needle:?}"),
            }
        }
    };
    expect("nothing is listening at 127.0.0.1:");
    // A relay appears on that port: it answers the probe chat keeps sending.
    let relay = UdpSocket::bind(&server).expect("the port is still free");
    relay.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut buf = [0u8; 64];
    let (n, from) = relay.recv_from(&mut buf).unwrap();
    assert_eq!(buf[..n].trim_ascii(), b"^timeout^", "the probe");
    assert_eq!(n, 64, "padded so any answer fits (a cookie too)");
    relay.send_to(b"^timeout^150", from).unwrap();
    expect("answers again");
    expect("heartbeating every 50ms");
    let _ = chat.kill();
    let _ = chat.wait();
}

/// Against a relay whose timeout is shorter than chat's heartbeat, chat
/// learns the timeout and heartbeats in time: it is never cut off.
#[test]
fn chat_follows_a_short_relay_timeout() {
    // The default heartbeat (5 s) is far longer than the relay's timeout.
    outlives_a_300ms_timeout(&[]);
}

/// `udphub chat --room`: the room is in the prompt, and only the room hears.
#[test]
fn chat_joins_a_room_and_shows_it() {
    if !util::require_tool("tmux") {
        return;
    }
    let relay = spawn_relay(&[]);
    let chat = TmuxChat::start("room", &relay, &["--room", "blue", "--name", "al"]);
    chat.wait_screen("al@blue>"); // (capture-pane drops the trailing space)
    let lobby = Client::joined(&relay);
    let blue = Client::new(relay.addr);
    blue.send(b"^join^blue");
    assert_eq!(blue.recv(), b"^room^blue");
    chat.tmux(&["send-keys", "-t", "chat", "hi blue", "Enter"]);
    let got = blue.recv();
    assert!(got.starts_with(b"al: hi blue. from 127.0.0.1:"), "{got:?}");
    lobby.expect_silence();
    blue.send(b"back at you");
    chat.wait_screen("back at you. from");
}

/// A refused join ends chat with the reason in words.
#[test]
fn chat_says_why_a_room_refused_it() {
    let relay = spawn_relay(&["--max-room-clients", "1"]);
    let first = Client::new(relay.addr);
    first.send(b"^join^solo");
    assert_eq!(first.recv(), b"^room^solo");
    let out = Command::new(udphub_bin())
        .args([
            "chat",
            "--server",
            &relay.addr.to_string(),
            "--room",
            "solo",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("room \"solo\" is full"), "{stderr}");
}

/// A relay in verify mode answers a plain datagram with silence: `send`
/// says it is verify mode and names `--verify`; `chat` says so and does the
/// handshake itself, and its line is relayed.
#[test]
fn send_and_chat_name_verify_mode() {
    let relay = spawn_relay(&["--verify-sources"]);
    let server = relay.addr.to_string();
    let out = Command::new(udphub_bin())
        .args(["send", "--server", &server, "hi", "--wait", "200ms"])
        .arg("--expect-reply")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("no reply from") && stderr.contains("verify mode"),
        "{stderr}"
    );
    assert!(stderr.contains("add --verify"), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");

    let out = Command::new(udphub_bin())
        .args(["send", "--server", &server, "hi", "--verify"])
        .args(["--expect-reply", "--wait", "2s"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("hi. from 127.0.0.1:"), "{stdout}");

    let mut chat = Command::new(udphub_bin())
        .args(["chat", "--server", &server, "--linger", "2s"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    chat.stdin.take().unwrap().write_all(b"proven\n").unwrap();
    let out = chat.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("is in verify mode") && stderr.contains("nc"),
        "{stderr}"
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("proven. from"),
        "{stderr}"
    );
}

/// Three silent drops made audible: `chat` without `--room` against a
/// closed lobby stops with a line naming `--lobby closed` and `--room`;
/// `send --expect-reply` there says after its silence that the lobby is
/// closed and to pass `--room`; an unpadded `^join^` refused in silence
/// (`^denied^token` is longer than it) gets `send` to say why and what to
/// do.
#[test]
fn a_closed_lobby_and_a_short_join_are_explained() {
    let secret = util::temp_path("secret");
    std::fs::write(&secret, "a room secret of thirty-two bytes or more!").unwrap();
    let secret = secret.to_string_lossy().to_string();
    let relay = spawn_relay(&["--room-secret-file", &secret, "--lobby", "closed"]);
    let server = relay.addr.to_string();
    let out = Command::new(udphub_bin())
        .args(["chat", "--server", &server])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("closed lobby")
            && stderr.contains("--lobby closed")
            && stderr.contains("--room ROOM --token"),
        "{stderr}"
    );

    let out = Command::new(udphub_bin())
        .args(["send", "--server", &server, "hello", "--expect-reply"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("no reply from {server} within 1s"))
            && stderr.contains("closed lobby")
            && stderr.contains("--room ROOM --token TOKEN"),
        "{stderr}"
    );

    let out = Command::new(udphub_bin())
        .args(["send", "--server", &server, "^join^red", "--wait", "200ms"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("refused in silence")
            && stderr.contains("--room ROOM")
            && stderr.contains("pad the join"),
        "{stderr}"
    );
}
