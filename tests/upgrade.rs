//! The in-place upgrade through the real binary on loopback: SIGUSR2 makes
//! a relay serving `--control` start its successor itself (same binary
//! path, same command line, `--takeover`), as its child, which takes over
//! through the ordinary hand-over. Under a closed-loop load nothing is
//! lost and only the UDP sockets pass (nothing is inherited past exec);
//! the successor rebinds the old metrics address and reads the config
//! file again; under systemd's notify protocol the successor says
//! `MAINPID=`/`READY=1` and the old process never `STOPPING=1`; a second
//! SIGUSR2 meanwhile is ignored, a successor that fails is reaped and its
//! status logged; a binary gone is said so; under systemd
//! (`INVOCATION_ID`) a `--takeover` from another cgroup is refused while
//! the successor in the same one is not.

mod util;

use std::collections::BTreeSet;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use util::closed_loop::{closed_loop, members, wait_rounds};
use util::{spawn_until_ready, udphub_bin, Client, RelayProc, PATIENCE};

/// How a relay is started here.
struct Start<'a> {
    /// `--ready-file`: the successor writes it again (same command line).
    ready: &'a Path,
    /// Extra environment.
    env: &'a [(&'a str, &'a str)],
    /// Extra flags.
    extra: &'a [&'a str],
    /// A cgroup (v2 directory) to run in from the first instruction.
    cgroup: Option<&'a Path>,
    /// The path to start udphub as (its `argv[0]`), if not the build's.
    program: Option<&'a Path>,
    /// `--metrics 127.0.0.1:0` on the command line (else the file says).
    metrics_flag: bool,
}

/// Starts `udphub serve` on 127.0.0.1:0 with metrics, raw format, and
/// `start`'s additions; ready once it serves.
fn spawn(start: &Start<'_>) -> RelayProc {
    let mut args: Vec<String> = [
        "serve",
        "--bind",
        "127.0.0.1:0",
        "--log-level",
        "info",
        "--format",
        "raw",
        "--ready-file",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.push(start.ready.to_str().unwrap().to_string());
    if start.metrics_flag {
        args.extend(["--metrics".to_string(), "127.0.0.1:0".to_string()]);
    }
    args.extend(start.extra.iter().map(|s| s.to_string()));
    let program = start.program.unwrap_or(Path::new(udphub_bin()));
    let mut cmd = match start.cgroup {
        // The shell moves itself into the cgroup, then becomes udphub: the
        // relay never runs anywhere else.
        Some(cg) => {
            let mut cmd = Command::new("sh");
            cmd.arg("-c")
                .arg(format!(
                    "echo $$ > {}/cgroup.procs && exec \"$0\" \"$@\"",
                    cg.display()
                ))
                .arg(program)
                .args(&args);
            cmd
        }
        None => {
            let mut cmd = Command::new(program);
            cmd.args(&args);
            cmd
        }
    };
    cmd.env_remove("RUST_LOG")
        .env_remove("INVOCATION_ID")
        .env_remove("NOTIFY_SOCKET")
        .envs(start.env.iter().copied());
    let (child, log, addrs) = spawn_until_ready(cmd, start.ready);
    RelayProc {
        child,
        addr: addrs.udp,
        metrics: addrs.metrics,
        log,
    }
}

/// The process SIGUSR2 started: not this test's child (the relay's, then
/// re-parented), so it is signalled and waited for by pid. Killed on drop.
struct Successor {
    pid: u32,
    /// Where it serves metrics (from the ready file it wrote again).
    metrics: SocketAddr,
}

impl Successor {
    /// Whether it still runs (a zombie does not).
    fn alive(&self) -> bool {
        alive(self.pid)
    }

    /// SIGTERM, and waits (bounded) until it has exited.
    fn stop(&self) {
        signal(self.pid, "TERM");
        let deadline = Instant::now() + PATIENCE;
        while self.alive() {
            assert!(Instant::now() < deadline, "the successor did not exit");
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Successor {
    fn drop(&mut self) {
        if self.alive() {
            signal(self.pid, "KILL");
        }
    }
}

fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{sig} {pid} failed");
}

/// Whether `pid` runs: it exists and is not a zombie.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X']))
    })
}

/// The pid in the old relay's "SIGUSR2: upgrading" line.
fn upgrade_pid(old: &RelayProc) -> u32 {
    let line = old.expect_log("SIGUSR2: upgrading");
    line.split("as process ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {line:?}"))
}

/// Waits (bounded) for `ready` to be written again (by the successor) and
/// returns its relay and metrics addresses.
fn wait_ready_again(ready: &Path) -> (SocketAddr, SocketAddr) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Ok(text) = std::fs::read_to_string(ready) {
            let field = |key: &str| -> SocketAddr {
                text.lines()
                    .find_map(|l| l.strip_prefix(key))
                    .and_then(|a| a.parse().ok())
                    .unwrap_or_else(|| panic!("ready file lacks {key}: {text:?}"))
            };
            return (field("udp="), field("metrics="));
        }
        assert!(
            Instant::now() < deadline,
            "the successor never wrote its ready file"
        );
        thread::sleep(Duration::from_millis(10));
    }
}

/// SIGUSR2 to `old`; returns its successor once the old one has exited 0
/// and the successor serves (its ready file written).
fn upgrade(old: &mut RelayProc, ready: &Path) -> Successor {
    old.signal("USR2");
    let pid = upgrade_pid(old);
    old.expect_log("handed over to the new process");
    assert_eq!(old.wait_exit().code(), Some(0), "the old process exits 0");
    let (udp, metrics) = wait_ready_again(ready);
    assert_eq!(udp, old.addr, "the successor relays on the same address");
    Successor { pid, metrics }
}

/// The socket inodes among `pid`'s descriptors.
fn socket_inodes(pid: u32) -> BTreeSet<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read the process's descriptors")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|l| l.to_string_lossy().to_string())
        .filter(|l| l.starts_with("socket:"))
        .collect()
}

/// SIGUSR2 during a closed-loop load (two loops): every message of every
/// round reaches every member exactly once and in order; the old process
/// exits 0; the successor it started relays to every member without them
/// registering again, is ready, has the old process's two UDP sockets and
/// none of its other sockets (nothing inherited past exec), and is no
/// longer the old one's child.
#[test]
fn sigusr2_upgrades_under_load_losing_nothing() {
    let n = 24;
    let ready = util::temp_path("ready-load");
    let ctl = util::temp_path("ctl-load");
    let ctl_arg = ctl.to_str().unwrap();
    let mut old = spawn(&Start {
        ready: &ready,
        env: &[],
        extra: &["--control", ctl_arg, "--threads", "2"],
        cgroup: None,
        program: None,
        metrics_flag: true,
    });
    old.expect_log("hand-over control socket");
    let old_pid = old.child.id();
    let old_sockets = socket_inodes(old_pid);
    let clients = members(old.addr, n);
    old.wait_metric("udphub_clients", n as f64);
    let stop = Arc::new(AtomicBool::new(false));
    let round = Arc::new(AtomicUsize::new(0));
    let driver = {
        let (stop, round, addr) = (Arc::clone(&stop), Arc::clone(&round), old.addr);
        thread::spawn(move || closed_loop(addr, clients, stop, round, 3))
    };
    wait_rounds(&round, 3);
    let new = upgrade(&mut old, &ready);
    util::wait_metric(new.metrics, "udphub_clients", n as f64);
    let scrape = util::scrape(new.metrics);
    assert_eq!(util::metric(&scrape, "udphub_clients_joined_total"), 0.0);
    assert_eq!(
        util::metric(&scrape, "udphub_handovers_total{result=\"received\"}"),
        1.0
    );
    util::http::wait_status(new.metrics, "/readyz", 200);
    let shared: Vec<_> = socket_inodes(new.pid)
        .intersection(&old_sockets)
        .cloned()
        .collect();
    assert_eq!(shared.len(), 2, "only the two UDP sockets pass: {shared:?}");
    let status = std::fs::read_to_string(format!("/proc/{}/status", new.pid)).unwrap();
    assert!(
        !status.contains(&format!("\nPPid:\t{old_pid}\n")),
        "re-parented: {status}"
    );
    let before = round.load(Ordering::SeqCst);
    wait_rounds(&round, before + 3);
    stop.store(true, Ordering::SeqCst);
    let tally = driver.join().expect("the closed loop held");
    assert_eq!(tally.received, tally.rounds * n * n, "{tally:?}");
    assert_eq!(
        util::metric_sum(&util::scrape(new.metrics), "udphub_dropped_total"),
        0.0
    );
    new.stop();
}

/// Reads notify datagrams until one satisfies `want` (bounded); returns
/// every one read.
fn notes_until(socket: &UnixDatagram, want: impl Fn(&str) -> bool) -> Vec<String> {
    let deadline = Instant::now() + PATIENCE;
    let mut seen = Vec::new();
    let mut buf = [0u8; 512];
    while Instant::now() < deadline {
        if let Ok(n) = socket.recv(&mut buf) {
            let note = String::from_utf8_lossy(&buf[..n]).to_string();
            let done = want(&note);
            seen.push(note);
            if done {
                return seen;
            }
        }
    }
    panic!("no such notification; got {seen:?}");
}

/// Under systemd's notify protocol (NOTIFY_SOCKET, INVOCATION_ID): the
/// first process says READY=1; on SIGUSR2 it names its successor as
/// MAINPID= and exits 0 without STOPPING=1; the successor says
/// `MAINPID=<its pid>` and READY=1 once serving, and STOPPING=1 when it
/// is stopped in turn.
#[test]
fn sigusr2_tells_systemd_the_new_main_pid() {
    let dir = util::temp_path("notify");
    std::fs::create_dir_all(&dir).unwrap();
    let notify_path = dir.join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let ready = dir.join("ready");
    let ctl = dir.join("ctl");
    let mut old = spawn(&Start {
        ready: &ready,
        env: &[
            ("NOTIFY_SOCKET", notify_path.to_str().unwrap()),
            ("INVOCATION_ID", "0123456789abcdef0123456789abcdef"),
        ],
        extra: &["--control", ctl.to_str().unwrap()],
        cgroup: None,
        program: None,
        metrics_flag: true,
    });
    let first = notes_until(&notify, |n| n == "READY=1");
    assert_eq!(first, ["READY=1"]);
    let new = upgrade(&mut old, &ready);
    let main = format!("MAINPID={}", new.pid);
    let mut notes = notes_until(&notify, |n| n == format!("{main}\nREADY=1"));
    // Whatever the old process sent came before it exited (waited for).
    notify.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 512];
    while let Ok(n) = notify.recv(&mut buf) {
        notes.push(String::from_utf8_lossy(&buf[..n]).to_string());
    }
    // The two may cross: the old process names the successor as it lets
    // go, the successor itself once it serves.
    notes.sort();
    assert_eq!(notes, [main.clone(), format!("{main}\nREADY=1")]);
    notify.set_nonblocking(false).unwrap();
    new.stop();
    assert_eq!(notes_until(&notify, |n| n == "STOPPING=1"), ["STOPPING=1"]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// SIGUSR2 without --control: one warning naming --control, and the relay
/// serves on (SIGUSR2's default action, ending the process, is not taken).
#[test]
fn sigusr2_without_control_warns_and_serves_on() {
    let ready = util::temp_path("ready-noctl");
    let mut relay = spawn(&Start {
        ready: &ready,
        env: &[],
        extra: &[],
        cgroup: None,
        program: None,
        metrics_flag: true,
    });
    relay.signal("USR2");
    let line = relay.expect_log("SIGUSR2");
    assert!(line.contains("--control"), "{line}");
    let c = Client::new(relay.addr);
    c.send(b"still here");
    assert_eq!(c.recv(), b"still here");
    relay.signal("TERM");
    assert_eq!(relay.wait_exit().code(), Some(0));
}

/// The binary the relay was started as is gone (here: the symlink it was
/// started through): SIGUSR2 says so, naming the path, starts nothing,
/// and the relay serves on.
#[test]
fn sigusr2_with_the_binary_gone_says_so_and_serves_on() {
    let dir = util::temp_path("gone");
    std::fs::create_dir_all(&dir).unwrap();
    let link = dir.join("udphub");
    std::os::unix::fs::symlink(udphub_bin(), &link).unwrap();
    let ready = dir.join("ready");
    let ctl = dir.join("ctl");
    let mut relay = spawn(&Start {
        ready: &ready,
        env: &[],
        extra: &["--control", ctl.to_str().unwrap()],
        cgroup: None,
        program: Some(&link),
        metrics_flag: true,
    });
    std::fs::remove_file(&link).unwrap();
    relay.signal("USR2");
    let line = relay.expect_log("no longer exists");
    assert!(line.contains(link.to_str().unwrap()), "{line}");
    let c = Client::new(relay.addr);
    c.send(b"still here");
    assert_eq!(c.recv(), b"still here");
    relay.signal("TERM");
    assert_eq!(relay.wait_exit().code(), Some(0));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Under a service manager the metrics address is fixed: the successor
/// binds the very address the old process lets go of as it exits, and
/// reads the `--config` file again, so a setting changed there applies.
#[test]
fn the_successor_rebinds_the_metrics_address_and_reads_the_config_again() {
    let dir = util::temp_path("rebind");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("udphub.toml");
    std::fs::write(&file, "metrics = \"127.0.0.1:0\"\nmax-clients = 100\n").unwrap();
    let ready = dir.join("ready");
    let ctl = dir.join("ctl");
    let mut old = spawn(&Start {
        ready: &ready,
        env: &[],
        extra: &[
            "--config",
            file.to_str().unwrap(),
            "--control",
            ctl.to_str().unwrap(),
        ],
        cgroup: None,
        program: None,
        metrics_flag: false,
    });
    let metrics = old.metrics.expect("metrics from the file");
    assert_eq!(old.metric("udphub_max_clients"), 100.0);
    let c = Client::new(old.addr);
    c.send(b"^join^r");
    assert_eq!(c.recv(), b"^room^r");
    // The address the kernel gave, fixed from now on.
    std::fs::write(
        &file,
        format!("metrics = \"{metrics}\"\nmax-clients = 200\n"),
    )
    .unwrap();
    let new = upgrade(&mut old, &ready);
    assert_eq!(new.metrics, metrics, "the same metrics address");
    util::http::wait_status(metrics, "/readyz", 200);
    let scrape = util::scrape(metrics);
    assert_eq!(
        util::metric(&scrape, "udphub_handovers_total{result=\"received\"}"),
        1.0
    );
    assert_eq!(util::metric(&scrape, "udphub_max_clients"), 200.0);
    assert_eq!(util::metric(&scrape, "udphub_clients"), 1.0);
    c.send(b"served by the successor");
    assert_eq!(c.recv(), b"served by the successor");
    new.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Writes `text` to the FIFO at `path` once a reader opens it (on a
/// thread: opening blocks until then).
fn feed_fifo(path: &Path, text: &'static str) -> thread::JoinHandle<()> {
    let path = path.to_path_buf();
    thread::spawn(move || {
        let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all(text.as_bytes()).unwrap();
    })
}

/// While a successor is under way (here: blocked reading its --config, a
/// FIFO), a second SIGUSR2 is ignored with a log line; a successor that
/// then cannot take over (its config file asks for another --threads)
/// exits 2, and the old relay logs its status, reaps it (no zombie) and
/// serves on with every member.
#[test]
fn a_second_sigusr2_is_ignored_and_a_failed_successor_is_reaped() {
    let dir = util::temp_path("fifo");
    std::fs::create_dir_all(&dir).unwrap();
    let fifo = dir.join("udphub.toml");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    let ready = dir.join("ready");
    let ctl = dir.join("ctl");
    let feeder = feed_fifo(&fifo, "threads = 1\n");
    let mut old = spawn(&Start {
        ready: &ready,
        env: &[],
        extra: &[
            "--config",
            fifo.to_str().unwrap(),
            "--control",
            ctl.to_str().unwrap(),
        ],
        cgroup: None,
        program: None,
        metrics_flag: true,
    });
    feeder.join().unwrap();
    let c = Client::new(old.addr);
    c.send(b"^join^r");
    assert_eq!(c.recv(), b"^room^r");
    old.signal("USR2");
    let pid = upgrade_pid(&old);
    assert!(alive(pid));
    // The successor waits on the FIFO: an upgrade is under way.
    old.signal("USR2");
    old.expect_log("already under way");
    let feeder = feed_fifo(&fifo, "threads = 2\n");
    let refused = old.expect_log(&format!("process {pid} exited"));
    assert!(refused.contains("exit status: 2"), "{refused}");
    feeder.join().unwrap();
    assert!(!Path::new(&format!("/proc/{pid}")).exists(), "reaped");
    c.send(b"still here");
    assert_eq!(c.recv(), b"still here");
    assert_eq!(old.metric("udphub_clients"), 1.0);
    old.signal("TERM");
    assert_eq!(old.wait_exit().code(), Some(0));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The cgroup v2 hierarchy, if this test may make cgroups in it (root, a
/// writable cgroup2 mount).
fn cgroup2_root() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    let root = mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (path, kind) = (f.nth(1)?, f.next()?);
        (kind == "cgroup2").then(|| PathBuf::from(path))
    })?;
    let probe = root.join(format!("udphub-probe-{}", std::process::id()));
    std::fs::create_dir(&probe).ok()?;
    let _ = std::fs::remove_dir(&probe);
    Some(root)
}

/// A cgroup made for one test, removed (bounded) on drop once empty.
struct Cgroup(PathBuf);

impl Drop for Cgroup {
    fn drop(&mut self) {
        let deadline = Instant::now() + PATIENCE;
        while std::fs::remove_dir(&self.0).is_err() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Under systemd (INVOCATION_ID set), with the relay in cgroup A: a
/// `--takeover` from cgroup B is refused — the old relay says why and
/// serves on, the new process exits 2 naming the cgroup — while SIGUSR2's
/// successor, started in A, takes over. Runs for real where cgroup v2 is
/// writable (as root); says so and returns where it is not.
#[test]
fn the_cgroup_guard_refuses_a_peer_outside_the_service_only() {
    let Some(root) = cgroup2_root() else {
        eprintln!(
            "skipped: no writable cgroup v2 hierarchy here (run as root with cgroup2 mounted)"
        );
        return;
    };
    let tag = format!("udphub-test-{}", std::process::id());
    let a = Cgroup(root.join(format!("{tag}-service")));
    let b = Cgroup(root.join(format!("{tag}-elsewhere")));
    std::fs::create_dir(&a.0).unwrap();
    std::fs::create_dir(&b.0).unwrap();
    let dir = util::temp_path("cgroup");
    std::fs::create_dir_all(&dir).unwrap();
    let (ready, ctl) = (dir.join("ready"), dir.join("ctl"));
    let ctl_arg = ctl.to_str().unwrap();
    let mut old = spawn(&Start {
        ready: &ready,
        env: &[("INVOCATION_ID", "0123456789abcdef0123456789abcdef")],
        extra: &["--control", ctl_arg],
        cgroup: Some(&a.0),
        program: None,
        metrics_flag: true,
    });
    let own = std::fs::read_to_string(format!("/proc/{}/cgroup", old.child.id())).unwrap();
    assert!(own.contains(&format!("{tag}-service")), "{own}");
    let c = Client::new(old.addr);
    c.send(b"^join^r");
    assert_eq!(c.recv(), b"^room^r");
    let mut outsider = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > {}/cgroup.procs && exec \"$0\" \"$@\"",
            b.0.display()
        ))
        .arg(udphub_bin())
        .args([
            "serve",
            "--bind",
            &old.addr.to_string(),
            "--metrics",
            "off",
            "--takeover",
            ctl_arg,
        ])
        .env_remove("INVOCATION_ID")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Bounded: an outsider let in would serve on, not exit.
    let deadline = Instant::now() + PATIENCE;
    while outsider.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = outsider.kill();
            let _ = outsider.wait();
            panic!("the process outside the service's cgroup took the relay over");
        }
        thread::sleep(Duration::from_millis(10));
    }
    let outsider = outsider.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&outsider.stderr);
    assert_eq!(outsider.status.code(), Some(2), "{said}");
    assert!(said.contains("outside its cgroup"), "{said}");
    let refusal = old.expect_log("hand-over refused");
    assert!(refusal.contains("outside its cgroup"), "{refusal}");
    c.send(b"still here");
    assert_eq!(c.recv(), b"still here");
    // SIGUSR2's successor is the relay's child: in A.
    let new = upgrade(&mut old, &ready);
    let cg = std::fs::read_to_string(format!("/proc/{}/cgroup", new.pid)).unwrap();
    assert!(cg.contains(&format!("{tag}-service")), "{cg}");
    util::wait_metric(new.metrics, "udphub_clients", 1.0);
    c.send(b"served by the successor");
    assert_eq!(c.recv(), b"served by the successor");
    new.stop();
    drop(new);
    let _ = std::fs::remove_dir_all(&dir);
}
