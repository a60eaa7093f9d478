//! Hand-over through the real binary on loopback: `serve --control PATH`
//! hands its sockets and members to `serve --takeover PATH`; under a
//! closed-loop load nothing is lost, duplicated or reordered and no member
//! registers again; a new process that fails leaves the old one serving
//! with everything; a changed `--bind` or `--threads` is refused.

mod util;

use std::io::{Read, Write};
use std::net::{SocketAddr, UdpSocket};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use util::closed_loop::{closed_loop, members, wait_rounds};
use util::{spawn_relay_on, udphub_bin, RelayProc, PATIENCE};

/// A control socket path of this test's own.
fn control_path(tag: &str) -> PathBuf {
    util::temp_path(&format!("ctl-{tag}"))
}

/// The old relay: raw format (bodies arrive as sent), a control socket.
fn old_relay(ctl: &Path, extra: &[&str]) -> RelayProc {
    let mut args = vec!["--format", "raw", "--control", ctl.to_str().unwrap()];
    args.extend_from_slice(extra);
    let relay = spawn_relay_on("127.0.0.1:0", true, &args);
    relay.expect_log("hand-over control socket");
    relay
}

/// A new process taking `old` over through `ctl` (and serving hand-overs
/// on it in turn); ready once it serves.
fn take_over(old: &RelayProc, ctl: &Path, extra: &[&str]) -> RelayProc {
    let ctl = ctl.to_str().unwrap();
    let mut args = vec!["--format", "raw", "--takeover", ctl, "--control", ctl];
    args.extend_from_slice(extra);
    spawn_relay_on(&old.addr.to_string(), true, &args)
}

/// `handovers` hand-overs under a closed-loop load of `n` members, with
/// `extra` settings on every process.
fn hand_overs_under_load(tag: &str, n: usize, handovers: usize, extra: &[&str]) {
    let ctl = control_path(tag);
    let mut relay = old_relay(&ctl, extra);
    let clients = members(relay.addr, n);
    relay.wait_metric("udphub_clients", n as f64);
    let stop = Arc::new(AtomicBool::new(false));
    let round = Arc::new(AtomicUsize::new(0));
    let driver = {
        let (stop, round, addr) = (Arc::clone(&stop), Arc::clone(&round), relay.addr);
        thread::spawn(move || closed_loop(addr, clients, stop, round, 3))
    };
    for h in 0..handovers {
        wait_rounds(&round, 3 * (h + 1));
        let new = take_over(&relay, &ctl, extra);
        relay.expect_log("handed over to the new process");
        let status = relay.wait_exit();
        assert_eq!(status.code(), Some(0), "the old process exits 0");
        new.expect_log("took over from");
        // Every member came across; none registered again.
        new.wait_metric("udphub_clients", n as f64);
        assert_eq!(new.metric("udphub_clients_joined_total"), 0.0);
        assert_eq!(
            new.metric("udphub_handovers_total{result=\"received\"}"),
            1.0
        );
        relay = new;
    }
    let before = round.load(Ordering::SeqCst);
    wait_rounds(&round, before + 3);
    stop.store(true, Ordering::SeqCst);
    let tally = driver.join().expect("the closed loop held");
    assert!(tally.rounds >= 3 * handovers + 3, "{tally:?}");
    assert_eq!(tally.received, tally.rounds * n * n, "{tally:?}");
    assert_eq!(
        util::metric_sum(&relay.scrape(), "udphub_dropped_total"),
        0.0
    );
    relay.signal("TERM");
    assert_eq!(relay.wait_exit().code(), Some(0));
}

/// Three hand-overs during a closed-loop load: every message of every
/// round reaches every member exactly once and in order, each new process
/// relays to members registered with an earlier one without them
/// registering again, and each old process exits 0 without `bye`.
#[test]
fn hand_overs_under_load_lose_nothing_and_keep_every_member() {
    hand_overs_under_load("load", 24, 3, &[]);
}

/// The same with `--threads 2`: both sockets pass over, in order, so each
/// member stays with the loop that has it, and room interest crosses loops
/// from the first datagram.
#[test]
fn hand_overs_with_two_threads() {
    // With --expect-clients: the new processes make and prefault their
    // tables before they ask for the hand-over.
    hand_overs_under_load(
        "threads",
        24,
        2,
        &["--threads", "2", "--expect-clients", "64"],
    );
}

/// A hello frame as `serve --takeover` sends it.
fn hello(bind: SocketAddr, threads: u16) -> Vec<u8> {
    let mut payload = b"UDPHUBHO".to_vec();
    payload.extend_from_slice(&1u16.to_le_bytes());
    payload.extend_from_slice(&threads.to_le_bytes());
    payload.extend_from_slice(bind.to_string().as_bytes());
    let mut frame = vec![b'H'];
    frame.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    frame.extend_from_slice(&payload);
    frame
}

/// A new process that dies after the old one paused and sent it
/// everything, before it confirmed: the old one resumes with every member,
/// and what was sent during the pause (waiting in the kernel's queue) is
/// relayed then.
#[test]
fn a_new_process_that_dies_mid_hand_over_leaves_the_old_one_serving() {
    let ctl = control_path("dies");
    let relay = old_relay(&ctl, &[]);
    let clients = members(relay.addr, 3);
    // The offer: the loops are paused once it is sent.
    let conn = paused_by_hand(&ctl, relay.addr);
    // Paused for a hand-over: alive, but not ready.
    let probes = relay.metrics.expect("a metrics listener");
    util::http::wait_status(probes, "/readyz", 503);
    util::http::wait_status(probes, "/healthz", 200);
    clients[0]
        .send_to(b"sent while paused", relay.addr)
        .unwrap();
    drop(conn);
    relay.expect_log("hand-over failed");
    util::http::wait_status(probes, "/readyz", 200);
    for c in &clients {
        let mut buf = [0u8; 64];
        let (n, _) = c.recv_from(&mut buf).expect("relayed after resuming");
        assert_eq!(&buf[..n], b"sent while paused");
    }
    assert_eq!(
        relay.metric("udphub_handovers_total{result=\"failed\"}"),
        1.0
    );
    assert_eq!(relay.metric("udphub_clients"), 3.0);
    assert_eq!(relay.metric("udphub_clients_joined_total"), 3.0);
}

/// A real new process that cannot take the members (its --max-clients is
/// below their number) says so, exits 2 naming the flag, and the old one
/// resumes with everyone.
#[test]
fn a_new_process_that_cannot_take_the_members_leaves_the_old_one_serving() {
    let ctl = control_path("small");
    let relay = old_relay(&ctl, &[]);
    let clients = members(relay.addr, 3);
    let out = Command::new(udphub_bin())
        .args(["serve", "--metrics", "off", "--max-clients", "2", "--bind"])
        .arg(relay.addr.to_string())
        .arg("--takeover")
        .arg(&ctl)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--max-clients 3"), "{stderr}");
    relay.expect_log("hand-over failed");
    clients[1].send_to(b"still here", relay.addr).unwrap();
    for c in &clients {
        let mut buf = [0u8; 64];
        let (n, _) = c.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"still here");
    }
}

/// A new process asking for another --threads or --bind is refused before
/// anything pauses: it exits 2 with a message naming the flag, and the old
/// one serves on.
#[test]
fn a_changed_bind_or_thread_count_is_refused() {
    let ctl = control_path("refused");
    let relay = old_relay(&ctl, &[]);
    let clients = members(relay.addr, 2);
    let other = UdpSocket::bind("127.0.0.1:0").unwrap();
    let elsewhere = other.local_addr().unwrap().to_string();
    let here = relay.addr.to_string();
    let cases: [(Vec<&str>, &str); 2] = [
        (vec!["--bind", &here, "--threads", "2"], "--threads 1"),
        (vec!["--bind", &elsewhere], "--bind"),
    ];
    for (args, flag) in &cases {
        let out = Command::new(udphub_bin())
            .args(["serve", "--metrics", "off", "--takeover"])
            .arg(&ctl)
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains("refused the hand-over") && stderr.contains(flag),
            "{stderr}"
        );
    }
    assert_eq!(
        relay.metric("udphub_handovers_total{result=\"refused\"}"),
        2.0
    );
    clients[0].send_to(b"serving on", relay.addr).unwrap();
    for c in &clients {
        let mut buf = [0u8; 64];
        let (n, _) = c.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"serving on");
    }
}

/// `--control` refuses a path that exists and is not a socket, naming the
/// flag; --takeover (with --cluster too) names the path nobody serves on.
#[test]
fn control_and_takeover_misuse_get_clear_messages() {
    let file = util::temp_path("not-a-socket");
    std::fs::write(&file, b"x").unwrap();
    let out = Command::new(udphub_bin())
        .args([
            "serve",
            "--bind",
            "127.0.0.1:0",
            "--metrics",
            "off",
            "--control",
        ])
        .arg(&file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--control") && stderr.contains("not a socket"),
        "{stderr}"
    );
    let _ = std::fs::remove_file(&file);
    let out = Command::new(udphub_bin())
        .args([
            "serve",
            "--bind",
            "127.0.0.1:0",
            "--metrics",
            "off",
            "--cluster",
            "nats://127.0.0.1:1",
            "--takeover",
            "/nonexistent/ctl",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--takeover /nonexistent/ctl") && stderr.contains("--control"),
        "{stderr}"
    );
}

/// In verify mode the cookie key passes over: a cookie handed out by the
/// old process registers its holder with the new one, and the members
/// verified with the old one are members of the new one.
#[test]
fn verify_mode_cookies_stay_valid_across_a_hand_over() {
    let ctl = control_path("verify");
    let mut relay = old_relay(&ctl, &["--verify-sources"]);
    let a = util::Client::verified(&relay);
    let b = util::Client::new(relay.addr);
    let cookie = b.cookie();
    let new = take_over(&relay, &ctl, &["--verify-sources"]);
    assert_eq!(relay.wait_exit().code(), Some(0));
    new.wait_metric("udphub_clients", 1.0);
    b.send(&[&b"^cookie^"[..], &cookie].concat());
    new.wait_metric("udphub_clients_joined_total", 1.0);
    a.send(b"hi");
    assert_eq!(a.recv(), b"hi");
    assert_eq!(b.recv(), b"hi");
}

/// A new process whose own --control path is unusable says so before it
/// asks for anything: the old one is never paused and serves on.
#[test]
fn a_bad_control_path_for_the_new_process_is_refused_before_the_hand_over() {
    let ctl = control_path("badnew");
    let relay = old_relay(&ctl, &[]);
    let clients = members(relay.addr, 1);
    let file = util::temp_path("not-a-socket-new");
    std::fs::write(&file, b"x").unwrap();
    let out = Command::new(udphub_bin())
        .args(["serve", "--metrics", "off", "--bind"])
        .arg(relay.addr.to_string())
        .arg("--takeover")
        .arg(&ctl)
        .arg("--control")
        .arg(&file)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&file);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--control"), "{stderr}");
    clients[0].send_to(b"still mine", relay.addr).unwrap();
    let mut buf = [0u8; 64];
    let (n, _) = clients[0].recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"still mine");
    assert_eq!(relay.metric("udphub_handovers_total{result=\"sent\"}"), 0.0);
    assert_eq!(
        relay.metric("udphub_handovers_total{result=\"refused\"}"),
        0.0
    );
}

/// After a hand-over the new process answers the probes: healthy and
/// ready, its build announced, the hand-over counted.
#[test]
fn the_new_process_is_healthy_and_ready_after_a_hand_over() {
    let ctl = control_path("probes");
    let mut old = old_relay(&ctl, &[]);
    util::http::wait_status(old.metrics.expect("metrics"), "/readyz", 200);
    let _clients = members(old.addr, 2);
    let new = take_over(&old, &ctl, &[]);
    let deadline = Instant::now() + PATIENCE;
    while old.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the old relay did not exit");
        thread::sleep(Duration::from_millis(10));
    }
    let probes = new.metrics.expect("metrics");
    util::http::wait_status(probes, "/readyz", 200);
    util::http::wait_status(probes, "/healthz", 200);
    let text = util::http::wait_status(probes, "/metrics", 200);
    assert!(text.contains("udphub_build_info{version="), "{text}");
    assert!(
        text.contains("udphub_handovers_total{result=\"received\"} 1"),
        "{text}"
    );
    assert_eq!(new.metric("udphub_clients"), 2.0);
}

/// The process taking over asks for its own socket buffers: a bigger
/// receive buffer is granted on the sockets handed over (forced past
/// net.core.rmem_max with CAP_NET_ADMIN), and a smaller one never lowers
/// them (the start line says what each process has).
#[test]
fn the_new_process_asks_for_its_own_buffers_and_never_lowers_them() {
    let ctl = control_path("buffers");
    let old = old_relay(&ctl, &[]);
    let bigger = 12usize << 20;
    let want = if util::has_net_admin() {
        bigger
    } else {
        bigger.min(util::core_sysctl("rmem_max"))
    };
    let new = take_over(&old, &ctl, &["--recv-buffer", &bigger.to_string()]);
    let start = new.expect_log("udphub relaying on");
    assert!(start.contains(&format!("SO_RCVBUF {want} B,")), "{start}");
    let newer = take_over(&new, &ctl, &["--recv-buffer", "65536"]);
    let start = newer.expect_log("udphub relaying on");
    assert!(start.contains(&format!("SO_RCVBUF {want} B,")), "{start}");
}

/// How long the old relay gives a peer for one step (the hello):
/// `udphub::runtime::handover::STEP_TIMEOUT`.
const STEP: Duration = Duration::from_secs(5);

/// A peer on the control socket that trickles its hello a byte at a
/// time, each within the step's timeout, holds the old relay's supervisor
/// no longer than one step: a SIGTERM sent meanwhile is honoured within
/// it, not once the peer is done.
#[test]
fn a_hello_trickled_a_byte_at_a_time_holds_the_relay_one_step_at_most() {
    let ctl = control_path("trickle");
    let mut relay = old_relay(&ctl, &[]);
    let stop = Arc::new(AtomicBool::new(false));
    let trickler = {
        let (ctl, stop) = (ctl.clone(), Arc::clone(&stop));
        thread::spawn(move || {
            let mut conn = UnixStream::connect(&ctl).unwrap();
            // A hello of 200 bytes, one every 300 ms: a minute in all.
            let mut frame = vec![b'H'];
            frame.extend_from_slice(&200u64.to_le_bytes());
            frame.extend(std::iter::repeat_n(b'x', 200));
            for b in frame {
                if stop.load(Ordering::SeqCst) || conn.write_all(&[b]).is_err() {
                    return;
                }
                thread::sleep(Duration::from_millis(300));
            }
        })
    };
    thread::sleep(Duration::from_millis(500));
    relay.signal("TERM");
    let deadline = Instant::now() + STEP + PATIENCE;
    let status = loop {
        if let Some(status) = relay.child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            stop.store(true, Ordering::SeqCst);
            panic!("a trickled hello kept the relay from honouring SIGTERM");
        }
        thread::sleep(Duration::from_millis(20));
    };
    stop.store(true, Ordering::SeqCst);
    assert!(status.success(), "{status}");
    trickler.join().unwrap();
}

/// Peers that keep the control socket busy (each connects, says nothing
/// until the relay gives up on it, and connects again) cannot hold a
/// SIGTERM back: the relay looks at its signals between two of them.
#[test]
fn peers_that_keep_connecting_cannot_hold_a_sigterm_back() {
    let ctl = control_path("busy");
    let mut relay = old_relay(&ctl, &[]);
    let stop = Arc::new(AtomicBool::new(false));
    let connected = Arc::new(AtomicUsize::new(0));
    let peers: Vec<_> = (0..3)
        .map(|_| {
            let (ctl, stop) = (ctl.clone(), Arc::clone(&stop));
            let connected = Arc::clone(&connected);
            thread::spawn(move || {
                for _ in 0..20 {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(mut conn) = UnixStream::connect(&ctl) else {
                        return;
                    };
                    connected.fetch_add(1, Ordering::SeqCst);
                    conn.set_read_timeout(Some(STEP + PATIENCE)).unwrap();
                    // Silent until the relay refuses and closes.
                    let _ = conn.read_to_end(&mut Vec::new());
                }
            })
        })
        .collect();
    // Every peer waiting (the relay busy with the first) when it is told.
    let deadline = Instant::now() + PATIENCE;
    while connected.load(Ordering::SeqCst) < 3 {
        assert!(Instant::now() < deadline, "the peers never connected");
        thread::sleep(Duration::from_millis(10));
    }
    relay.signal("TERM");
    let deadline = Instant::now() + STEP + PATIENCE;
    let status = loop {
        if let Some(status) = relay.child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            stop.store(true, Ordering::SeqCst);
            panic!("peers on the control socket kept the relay from honouring SIGTERM");
        }
        thread::sleep(Duration::from_millis(20));
    };
    stop.store(true, Ordering::SeqCst);
    assert!(status.success(), "{status}");
    for p in peers {
        p.join().unwrap();
    }
}

/// Another user's process cannot take the relay over, even where the
/// control socket's mode lets it connect (an operator loosened it, or the
/// moment between the bind and the chmod under a permissive umask): the
/// old relay refuses it, naming its uid, and serves on; the new process
/// (which checks the old one the same way) exits 2 saying why.
#[test]
fn another_users_process_cannot_take_the_relay_over() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root to run a process as another user");
        return;
    }
    let ctl = control_path("uid");
    let relay = old_relay(&ctl, &[]);
    let clients = members(relay.addr, 2);
    std::fs::set_permissions(&ctl, std::fs::Permissions::from_mode(0o666)).unwrap();
    let mut other = Command::new(udphub_bin())
        .args(["serve", "--metrics", "off", "--bind"])
        .arg(relay.addr.to_string())
        .arg("--takeover")
        .arg(&ctl)
        .uid(65534)
        .gid(65534)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + PATIENCE;
    let status = loop {
        if let Some(status) = other.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = other.kill();
            let _ = other.wait();
            panic!("another user's process took the relay over and serves");
        }
        thread::sleep(Duration::from_millis(10));
    };
    let mut stderr = String::new();
    other
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("uid 0"), "{stderr}");
    let refused = relay.expect_log("hand-over refused");
    assert!(refused.contains("uid 65534"), "{refused}");
    clients[0].send_to(b"still ours", relay.addr).unwrap();
    for c in &clients {
        let mut buf = [0u8; 64];
        let (n, _) = c.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"still ours");
    }
}

/// An offer whose sockets and loop states do not match (here: no socket
/// at all for one loop) is refused as broken, without advice to change a
/// setting that would not help (`--threads 0`); the old side is told.
#[test]
fn an_offer_without_sockets_is_refused_as_broken() {
    use std::os::unix::net::UnixListener;
    use udphub::core::snapshot::{encode, LoopState, Snapshot};
    let ctl = control_path("broken");
    let listener = UnixListener::bind(&ctl).unwrap();
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut new = Command::new(udphub_bin())
        .args(["serve", "--metrics", "off", "--bind"])
        .arg(udp.local_addr().unwrap().to_string())
        .arg("--takeover")
        .arg(&ctl)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (mut conn, _) = listener.accept().unwrap();
    conn.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut head = [0u8; 9];
    conn.read_exact(&mut head).unwrap();
    assert_eq!(head[0], b'H');
    let len = u64::from_le_bytes(head[1..].try_into().unwrap());
    conn.read_exact(&mut vec![0u8; len as usize]).unwrap();
    let snapshot = encode(&Snapshot {
        cookie: None,
        streams: vec![],
        loops: vec![LoopState::default()],
    });
    let mut offer = vec![b'O'];
    offer.extend_from_slice(&(snapshot.len() as u64).to_le_bytes());
    offer.extend_from_slice(&snapshot);
    conn.write_all(&offer).unwrap();
    conn.read_exact(&mut head).unwrap();
    assert_eq!(head[0], b'F', "the old side is told the new one failed");
    let deadline = Instant::now() + PATIENCE;
    let status = loop {
        if let Some(status) = new.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the new process did not exit");
        thread::sleep(Duration::from_millis(10));
    };
    let mut stderr = String::new();
    new.stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("broken offer") && !stderr.contains("--threads 0"),
        "{stderr}"
    );
    let _ = std::fs::remove_file(&ctl);
}

/// Says hello to the relay at `ctl` by hand (a new process that is only
/// this test) and reads its offer: once it is in, the relay's loops are
/// paused and, with `--cluster`, its bus frozen, until the connection
/// says serving (or fails, or closes).
fn paused_by_hand(ctl: &Path, relay: SocketAddr) -> UnixStream {
    let mut conn = UnixStream::connect(ctl).unwrap();
    conn.set_read_timeout(Some(PATIENCE)).unwrap();
    conn.write_all(&hello(relay, 1)).unwrap();
    let mut head = [0u8; 9];
    conn.read_exact(&mut head).unwrap();
    assert_eq!(head[0], b'O');
    let len = u64::from_le_bytes(head[1..].try_into().unwrap());
    let mut snapshot = vec![0u8; len as usize];
    conn.read_exact(&mut snapshot).unwrap();
    assert!(snapshot.starts_with(b"UDPHUBSN"));
    conn
}

/// A two-node cluster for the hand-over tests: NATS, node a, and node b
/// with a control socket and `more` settings, both connected.
struct TwoNodes {
    /// Kept alive for the test.
    _nats: util::nats::Nats,
    a: RelayProc,
    b: RelayProc,
    ctl: PathBuf,
    /// b's settings, for a process taking it over.
    b_args: Vec<String>,
}

impl TwoNodes {
    fn start(tag: &str, more: &[&str]) -> TwoNodes {
        let nats = util::nats::Nats::start();
        let url = nats.url();
        let a = util::spawn_relay(&["--cluster", &url, "--node-id", "a", "--format", "raw"]);
        a.wait_metric("udphub_cluster_connected", 1.0);
        let ctl = control_path(tag);
        let mut b_args: Vec<String> = ["--cluster", url.as_str(), "--node-id", "b"]
            .iter()
            .map(ToString::to_string)
            .collect();
        b_args.extend(more.iter().map(ToString::to_string));
        let b = old_relay(&ctl, &b_args.iter().map(String::as_str).collect::<Vec<_>>());
        b.wait_metric("udphub_cluster_connected", 1.0);
        TwoNodes {
            _nats: nats,
            a,
            b,
            ctl,
            b_args,
        }
    }

    /// A new process taking b over (and serving hand-overs in turn).
    fn take_b_over(&self) -> RelayProc {
        let args: Vec<&str> = self.b_args.iter().map(String::as_str).collect();
        take_over(&self.b, &self.ctl, &args)
    }
}

/// What one member heard: each sender's numbers, in arrival order, until
/// every sender's end marker (bounded in time).
fn hear(c: util::Client, senders: usize) -> std::collections::HashMap<String, Vec<usize>> {
    let mut heard: std::collections::HashMap<String, Vec<usize>> = Default::default();
    let mut ends = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while ends < senders {
        assert!(Instant::now() < deadline, "the end markers never came");
        let Some(d) = c.recv_within(PATIENCE) else {
            continue;
        };
        let line = String::from_utf8_lossy(&d).into_owned();
        match line.split_once(' ') {
            Some(("end", _)) => ends += 1,
            Some((who, n)) => heard
                .entry(who.to_string())
                .or_default()
                .push(n.parse().unwrap_or_else(|_| panic!("unexpected {line:?}"))),
            None => panic!("unexpected {line:?}"),
        }
    }
    heard
}

/// With `--cluster`: node b hands over three times while a member of
/// node a and a member of node b each send a numbered message every
/// millisecond or two to a room spanning both nodes. Every member of
/// either node gets every message of both senders exactly once and in
/// order: nothing published by a while b changes process is missed (the
/// new process subscribes before the old stops), nothing b's old process
/// delivered comes again (its positions pass over), and what b's members
/// sent reaches a across the change. No gap is seen on either node.
#[test]
fn cluster_hand_overs_lose_and_repeat_nothing_across_nodes() {
    cluster_hand_overs("cluster", &[]);
}

/// The same with `--threads 2` on node b: one bridge for both loops, its
/// positions and both loops' own streams pass over.
#[test]
fn cluster_hand_overs_with_two_threads() {
    cluster_hand_overs("cluster-threads", &["--threads", "2"]);
}

fn cluster_hand_overs(tag: &str, more: &[&str]) {
    use util::cluster::{member, until_connected};
    let mut nodes = TwoNodes::start(tag, more);
    let from_a = member(&nodes.a, "r");
    let from_b = member(&nodes.b, "r");
    let on_a: Vec<util::Client> = (0..2).map(|_| member(&nodes.a, "r")).collect();
    let on_b: Vec<util::Client> = (0..4).map(|_| member(&nodes.b, "r")).collect();
    for (sender, other) in [(&from_a, &from_b), (&from_b, &from_a)] {
        let everyone: Vec<&util::Client> = on_a.iter().chain(&on_b).chain([other]).collect();
        until_connected(sender, &everyone);
    }
    let listeners: Vec<_> = on_a
        .into_iter()
        .chain(on_b)
        .map(|c| thread::spawn(move || hear(c, 2)))
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let sender = {
        let (stop, sent) = (Arc::clone(&stop), Arc::clone(&sent));
        thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(90);
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                from_a.send(format!("a {n}").as_bytes());
                from_b.send(format!("b {n}").as_bytes());
                n += 1;
                sent.store(n, Ordering::SeqCst);
                // The senders' own sockets are not read: what they are
                // sent back is of no interest, and the kernel drops it.
                thread::sleep(Duration::from_millis(1));
            }
            from_a.send(b"end a");
            from_b.send(b"end b");
            n
        })
    };
    let wait_sent = |at_least: usize| {
        let deadline = Instant::now() + PATIENCE * 4;
        while sent.load(Ordering::SeqCst) < at_least {
            assert!(Instant::now() < deadline, "the senders stalled");
            thread::sleep(Duration::from_millis(5));
        }
    };
    for h in 0..3 {
        wait_sent(100 * (h + 1) + sent.load(Ordering::SeqCst));
        let new = nodes.take_b_over();
        nodes.b.expect_log("handed over to the new process");
        assert_eq!(
            nodes.b.wait_exit().code(),
            Some(0),
            "the old process exits 0"
        );
        let caught = new.expect_log("caught up with the cluster");
        eprintln!("hand-over {h}: {caught}");
        new.wait_metric("udphub_cluster_connected", 1.0);
        nodes.b = new;
    }
    wait_sent(sent.load(Ordering::SeqCst) + 200);
    stop.store(true, Ordering::SeqCst);
    let n = sender.join().expect("the senders");
    let mut wrong = Vec::new();
    for (k, l) in listeners.into_iter().enumerate() {
        let heard = l.join().expect("a member");
        for who in ["a", "b"] {
            let got = heard.get(who).cloned().unwrap_or_default();
            if got != (0..n).collect::<Vec<_>>() {
                let missing: Vec<usize> = (0..n).filter(|i| !got.contains(i)).take(8).collect();
                let mut seen = std::collections::HashSet::new();
                let twice: Vec<usize> = got
                    .iter()
                    .filter(|v| !seen.insert(**v))
                    .take(8)
                    .copied()
                    .collect();
                wrong.push(format!(
                    "member {k} from {who}: {} of {n} heard, missing {missing:?}, twice {twice:?}",
                    got.len()
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
    for relay in [&nodes.a, &nodes.b] {
        assert_eq!(relay.metric("udphub_cluster_gap_total"), 0.0);
        assert_eq!(
            relay.metric("udphub_cluster_dropped_total{reason=\"inbound_full\"}"),
            0.0
        );
    }
    nodes.b.signal("TERM");
    assert_eq!(nodes.b.wait_exit().code(), Some(0));
}

/// A hand-over with `--cluster` that fails after the old relay froze its
/// bus and paused: what node a published meanwhile (1,500 messages, far
/// more than a subscription's 256) waits in the frozen rooms and reaches
/// the old relay's member once it resumes, none dropped.
#[test]
fn a_failed_cluster_hand_over_delivers_what_waited() {
    use util::cluster::{member, until_connected};
    let TwoNodes {
        _nats: _alive,
        a,
        b,
        ctl,
        ..
    } = TwoNodes::start("failed-cluster", &[]);
    let from_a = member(&a, "r");
    let on_b = member(&b, "r");
    until_connected(&from_a, &[&on_b]);
    let conn = paused_by_hand(&ctl, b.addr);
    // b is frozen and paused now, waiting for SERVING (5 s at most).
    let n = 1500;
    for i in 0..n {
        from_a.send(format!("a {i}").as_bytes());
        thread::sleep(Duration::from_micros(700));
    }
    let received = b.metric("udphub_cluster_received_total");
    drop(conn);
    b.expect_log("hand-over failed");
    // Counted at the relay: the member's own socket buffer is no bound
    // of the relay's.
    b.wait_metric("udphub_cluster_received_total", received + n as f64);
    for reason in ["slow_consumer", "inbound_full"] {
        assert_eq!(
            b.metric(&format!(
                "udphub_cluster_dropped_total{{reason=\"{reason}\"}}"
            )),
            0.0,
            "{reason}"
        );
    }
    assert_eq!(b.metric("udphub_cluster_gap_total"), 0.0);
}

/// In a cluster without a key, a stranger who may publish sends one frame
/// with a seq far ahead on node a's stream: b delivers a's next messages
/// anyway (the stream starts again, as without a hand-over), and does so
/// after a hand-over too: the positions passed over silence nothing once
/// the new process's replay is over.
#[test]
fn a_strangers_frame_silences_no_stream_across_a_hand_over() {
    use std::io::{BufRead, BufReader};
    use std::net::TcpStream;
    use udphub::cluster::frame::{parse, Stamp, SEQ_WINDOW};
    use util::cluster::{member, until_connected};
    let mut nodes = TwoNodes::start("floor", &[]);
    let url = nodes._nats.url();
    let from_a = member(&nodes.a, "r");
    let on_b = member(&nodes.b, "r");
    until_connected(&from_a, &[&on_b]);
    // The stranger: a raw NATS client.
    let port: u16 = url.rsplit(':').next().unwrap().parse().unwrap();
    let tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut w = tcp.try_clone().unwrap();
    let mut r = BufReader::new(tcp);
    let mut line = String::new();
    r.read_line(&mut line).unwrap(); // INFO
    w.write_all(b"CONNECT {\"verbose\":false,\"pedantic\":false}\r\nSUB > 1\r\nPING\r\n")
        .unwrap();
    // Subscribed once the server answers the PING (in order).
    loop {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        if line.starts_with("PONG") {
            break;
        }
    }
    let next_msg = |r: &mut BufReader<TcpStream>| -> (String, Vec<u8>) {
        loop {
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            let parts: Vec<&str> = line.trim_end().split(' ').collect();
            if parts[0] == "MSG" {
                let len: usize = parts.last().unwrap().parse().unwrap();
                let mut p = vec![0u8; len + 2];
                r.read_exact(&mut p).unwrap();
                p.truncate(len);
                return (parts[1].to_string(), p);
            }
        }
    };
    let drain = |c: &util::Client| {
        let mut n = 0;
        while c.recv_within(Duration::from_millis(300)).is_some() {
            n += 1;
        }
        n
    };
    // Learn a's stream.
    from_a.send(b"learn");
    let (subject, payload) = loop {
        let (s, p) = next_msg(&mut r);
        if s.ends_with(".room.r") {
            break (s, p);
        }
    };
    let first = parse(&payload).unwrap().first;
    drain(&on_b);
    let stranger = |seq: u64, w: &mut TcpStream| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as u32;
        let packed = udphub::cluster::bridge::pack(
            vec![udphub::cluster::Publish {
                subject: subject.clone().into(),
                stamp: Stamp {
                    epoch: first.epoch,
                    stream: first.stream,
                    seq,
                },
                body: bytes::Bytes::from_static(b"stranger"),
            }],
            None,
            now,
        );
        for p in packed {
            w.write_all(format!("PUB {} {}\r\n", subject, p.msg.len()).as_bytes())
                .unwrap();
            w.write_all(&p.msg).unwrap();
            w.write_all(b"\r\n").unwrap();
        }
    };
    let send_real = |tag: &str| {
        for i in 0..50 {
            from_a.send(format!("{tag} {i}").as_bytes());
            thread::sleep(Duration::from_millis(3));
        }
    };
    // Without a hand-over.
    stranger(first.seq + 100 + SEQ_WINDOW - 1_000, &mut w);
    assert_eq!(
        on_b.recv_within(PATIENCE).as_deref(),
        Some(&b"stranger"[..])
    );
    send_real("plain");
    let plain = drain(&on_b);
    // Right before a hand-over.
    stranger(first.seq + 200 + SEQ_WINDOW - 1_000, &mut w);
    assert_eq!(
        on_b.recv_within(PATIENCE).as_deref(),
        Some(&b"stranger"[..])
    );
    let new = nodes.take_b_over();
    assert_eq!(nodes.b.wait_exit().code(), Some(0));
    new.expect_log("caught up with the cluster");
    new.wait_metric("udphub_cluster_connected", 1.0);
    nodes.b = new;
    send_real("after");
    let after = drain(&on_b);
    assert_eq!(plain, 50, "without a hand-over");
    assert_eq!(after, 50, "after a hand-over");
    nodes.b.signal("TERM");
    assert_eq!(nodes.b.wait_exit().code(), Some(0));
}

/// A SIGTERM that arrives while a hand-over is under way (the supervisor
/// reads signals only between two) is obeyed: the old relay does not let
/// go when the new process says it serves, but tells it no, resumes and
/// shuts down as asked, every member told `bye`; the stop is never lost
/// to a successor serving on unasked.
#[test]
fn a_stop_during_a_hand_over_is_obeyed_not_handed_on() {
    let ctl = control_path("stop");
    let mut relay = old_relay(&ctl, &[]);
    let clients = members(relay.addr, 2);
    let mut conn = paused_by_hand(&ctl, relay.addr);
    relay.signal("TERM");
    // The relay's log cannot show it yet (the supervisor is busy with this
    // connection): wait until the kernel no longer holds SIGTERM pending
    // for it, i.e. its handler ran.
    let status = format!("/proc/{}/status", relay.child.id());
    let deadline = Instant::now() + PATIENCE;
    loop {
        let text = std::fs::read_to_string(&status).unwrap_or_default();
        let pending = text
            .lines()
            .filter(|l| l.starts_with("SigPnd:") || l.starts_with("ShdPnd:"))
            .filter_map(|l| u64::from_str_radix(l.split_whitespace().nth(1)?, 16).ok())
            .any(|mask| mask & (1 << (15 - 1)) != 0);
        if !pending {
            break;
        }
        assert!(Instant::now() < deadline, "SIGTERM stayed pending");
        thread::sleep(Duration::from_millis(2));
    }
    let mut serving = vec![b'S'];
    serving.extend_from_slice(&0u64.to_le_bytes());
    conn.write_all(&serving).unwrap();
    let mut head = [0u8; 9];
    conn.read_exact(&mut head).unwrap();
    assert_eq!(head[0], b'R', "the new process is told no");
    let len = u64::from_le_bytes(head[1..].try_into().unwrap());
    let mut why = vec![0u8; len as usize];
    conn.read_exact(&mut why).unwrap();
    assert!(
        String::from_utf8_lossy(&why).contains("stop signal"),
        "{}",
        String::from_utf8_lossy(&why)
    );
    assert_eq!(relay.wait_exit().code(), Some(0));
    for c in &clients {
        let mut buf = [0u8; 64];
        let (n, _) = c.recv_from(&mut buf).expect("a bye");
        assert_eq!(&buf[..n], b"bye");
    }
}
