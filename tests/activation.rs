//! Socket activation through the real tool: `systemd-socket-activate
//! --datagram` holds the UDP socket, starts `udphub serve` on the first
//! datagram and passes the socket (`LISTEN_FDS`); the relay serves on it
//! without binding, and refuses a socket it cannot use with exit 2 and a
//! message naming the fix.

mod util;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use util::http;
use util::{
    metric, require_tool, spawn_until_ready, temp_path, udphub_bin, Client, RelayProc, PATIENCE,
};

/// `systemd-socket-activate` listening on a few loopback ports, with
/// `udphub serve ARGS` to start on the first datagram (or connection).
struct Activator {
    /// The tool, then (exec'd) udphub; taken by [`Activator::into_relay`].
    child: Option<Child>,
    log: mpsc::Receiver<String>,
    /// Where it listens, in order (descriptor 3, 4, …).
    ports: Vec<u16>,
}

/// A loopback port free a moment ago (the tool takes no port 0; a port
/// taken in between fails its start, and [`Activator::start`] tries again).
fn free_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl Activator {
    /// Starts the tool with `sockets` listening sockets (`datagram`: UDP,
    /// else TCP) and `udphub serve` with `args` behind it; waits (bounded)
    /// until it listens.
    fn start(sockets: usize, datagram: bool, args: &[&str]) -> Activator {
        assert!(require_tool("systemd-socket-activate"));
        for _attempt in 0..5 {
            let ports: Vec<u16> = (0..sockets).map(|_| free_port()).collect();
            let mut cmd = Command::new("systemd-socket-activate");
            if datagram {
                cmd.arg("--datagram");
            }
            for p in &ports {
                cmd.arg(format!("--listen=127.0.0.1:{p}"));
            }
            cmd.arg(udphub_bin())
                .arg("serve")
                .args(args)
                .env_remove("RUST_LOG")
                .env_remove("NOTIFY_SOCKET")
                .env_remove("UDPHUB_THREADS")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped());
            let mut child = cmd.spawn().expect("spawn systemd-socket-activate");
            let stderr = child.stderr.take().expect("stderr piped");
            let (tx, log) = mpsc::channel();
            thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
            let mut activator = Activator {
                child: Some(child),
                log,
                ports,
            };
            if activator.listening() {
                return activator;
            }
        }
        panic!("systemd-socket-activate never listened");
    }

    /// Waits (bounded) until the tool says it listens on every port;
    /// false if it failed (a port taken meanwhile).
    fn listening(&mut self) -> bool {
        let deadline = Instant::now() + PATIENCE;
        let mut seen = 0;
        while Instant::now() < deadline {
            match self.log.recv_timeout(Duration::from_millis(20)) {
                Ok(line) if line.starts_with("Listening on") => {
                    seen += 1;
                    if seen == self.ports.len() {
                        return true;
                    }
                }
                Ok(line) if line.contains("Failed") => {
                    self.kill();
                    return false;
                }
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return false,
            }
        }
        false
    }

    fn addr(&self, i: usize) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.ports[i]))
    }

    /// Waits (bounded) for the process (udphub, once exec'd) to exit; its
    /// status and everything it printed.
    fn wait_exit(mut self) -> (ExitStatus, String) {
        let deadline = Instant::now() + PATIENCE;
        let child = self.child.as_mut().expect("running");
        let status = loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                break status;
            }
            assert!(Instant::now() < deadline, "udphub did not exit");
            thread::sleep(Duration::from_millis(10));
        };
        let mut said = Vec::new();
        while let Ok(line) = self.log.recv_timeout(Duration::from_millis(200)) {
            said.push(line);
        }
        (status, said.join("\n"))
    }
}

impl Activator {
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The relay the tool became, relaying on `addr`.
    fn into_relay(mut self, addr: SocketAddr, metrics: SocketAddr) -> RelayProc {
        let (_, log) = mpsc::channel();
        RelayProc {
            child: self.child.take().expect("running"),
            addr,
            metrics: Some(metrics),
            log: std::mem::replace(&mut self.log, log),
        }
    }
}

impl Drop for Activator {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A client's first datagram starts the relay on the socket the tool
/// holds: it waits in the socket's queue meanwhile, and is relayed (not
/// lost) once the relay runs; the relay reports the socket's own address
/// (ready file, logs) and serves the probes; SIGTERM still says bye.
#[test]
fn a_client_is_relayed_through_the_activated_socket() {
    let ready = temp_path("activated-ready");
    let _ = std::fs::remove_file(&ready);
    let ready_arg = ready.to_string_lossy().to_string();
    // The file's bind is not the socket's: not used, and no reload
    // calls it a change.
    let config = temp_path("activated.toml");
    std::fs::write(&config, "bind = \"127.0.0.1:9\"\n").unwrap();
    let config_arg = config.to_string_lossy().to_string();
    let activator = Activator::start(
        1,
        true,
        &[
            "--config",
            &config_arg,
            "--metrics",
            "127.0.0.1:0",
            "--log-level",
            "info",
            "--ready-file",
            &ready_arg,
        ],
    );
    let addr = activator.addr(0);
    let client = Client::new(addr);
    client.send(b"first\n");
    // The datagram that started the relay is relayed back to its sender.
    let got = client.recv();
    assert_eq!(got, util::seed_format("first", client.addr()));

    // The ready file names the inherited socket's address.
    let deadline = Instant::now() + PATIENCE;
    let text = loop {
        if let Ok(text) = std::fs::read_to_string(&ready) {
            break text;
        }
        assert!(Instant::now() < deadline, "no ready file");
        thread::sleep(Duration::from_millis(10));
    };
    assert!(text.contains(&format!("udp={addr}\n")), "{text}");
    let metrics: SocketAddr = text
        .lines()
        .find_map(|l| l.strip_prefix("metrics="))
        .and_then(|a| a.parse().ok())
        .expect("metrics address");

    let mut relay = activator.into_relay(addr, metrics);
    let said = relay.expect_log("socket activation");
    assert!(
        said.contains(&addr.to_string()) && said.contains("--bind 127.0.0.1:9 is not used"),
        "{said}"
    );
    relay.expect_log(&format!("udphub relaying on {addr}"));
    http::wait_status(metrics, "/readyz", 200);
    http::wait_status(metrics, "/healthz", 200);
    assert_eq!(
        metric(
            &relay.scrape(),
            &format!(
                "udphub_build_info{{version=\"{}\"}}",
                env!("CARGO_PKG_VERSION")
            )
        ),
        1.0
    );
    // A second client talks to the first through the same socket.
    let other = Client::new(addr);
    other.send(b"hello\n");
    assert_eq!(other.recv(), util::seed_format("hello", other.addr()));
    assert_eq!(client.recv(), util::seed_format("hello", other.addr()));

    relay.signal("HUP");
    let deadline = Instant::now() + PATIENCE;
    loop {
        assert!(Instant::now() < deadline, "no reload line");
        let Ok(line) = relay.log.recv_timeout(Duration::from_millis(20)) else {
            continue;
        };
        assert!(!line.contains("needs a restart"), "{line}");
        if line.contains("reload: nothing to change") {
            break;
        }
    }

    relay.signal("TERM");
    assert!(relay.wait_exit().success());
    assert_eq!(client.recv(), b"bye");
    let _ = std::fs::remove_file(&config);
}

/// More sockets than loops, one socket for two loops, and a TCP socket
/// where a UDP one belongs: each a one-line error, exit 2, naming the
/// `.socket` unit's line or the flag that fixes it.
#[test]
fn a_wrong_count_or_type_of_socket_is_a_clear_error() {
    // Two sockets, one loop.
    let two = Activator::start(2, true, &["--threads", "1"]);
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .send_to(b"x", two.addr(0))
        .unwrap();
    let (status, said) = two.wait_exit();
    assert_eq!(status.code(), Some(2), "{said}");
    assert!(
        said.contains("socket activation passed 2 sockets (LISTEN_FDS=2) but --threads is 1")
            && said.contains("set --threads 2"),
        "{said}"
    );

    // One socket, two loops.
    let one = Activator::start(1, true, &["--threads", "2"]);
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .send_to(b"x", one.addr(0))
        .unwrap();
    let (status, said) = one.wait_exit();
    assert_eq!(status.code(), Some(2), "{said}");
    assert!(
        said.contains("passed 1 socket")
            && said.contains("run --threads 1")
            && said.contains("ReusePort=yes"),
        "{said}"
    );

    // A stream socket (the tool without --datagram).
    let stream = Activator::start(1, false, &[]);
    let conn = TcpStream::connect_timeout(&stream.addr(0), PATIENCE);
    let (status, said) = stream.wait_exit();
    drop(conn);
    assert_eq!(status.code(), Some(2), "{said}");
    assert!(
        said.contains("inherited descriptor 3 is a stream (TCP) socket")
            && said.contains("ListenDatagram=")
            && said.contains("--datagram"),
        "{said}"
    );
    // One line from udphub itself.
    let ours: Vec<&str> = said.lines().filter(|l| l.starts_with("udphub:")).collect();
    assert_eq!(ours.len(), 1, "{said}");
}

/// Launches its arguments (udphub) the way a service manager does with
/// two sockets: both SO_REUSEPORT on one loopback address, as
/// descriptors 3 and 4, with `LISTEN_PID` (its own pid, kept by exec),
/// `LISTEN_FDS=2` and their names. (systemd does this for a `.socket`
/// unit with the address twice and `ReusePort=yes`;
/// `systemd-socket-activate` cannot: it sets no SO_REUSEPORT.)
const TWO_SOCKETS: &str = r#"
import fcntl, os, socket, sys
socks = []
for _ in range(2):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", socks[0].getsockname()[1] if socks else 0))
    socks.append(s)
high = [fcntl.fcntl(s.fileno(), fcntl.F_DUPFD, 100) for s in socks]
for s in socks:
    s.close()
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i)
    os.close(fd)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="2", LISTEN_FDNAMES="udphub:udphub")
os.execv(sys.argv[1], sys.argv[1:])
"#;

/// `udphub serve` with `serve`'s flags (and info logs, a ready file)
/// behind `launcher`, a Python script that sets up the sockets and execs
/// its arguments: `wrapper` (e.g. setpriv), then udphub. Ready once it
/// serves.
fn launched(launcher: &str, wrapper: &[&str], serve: &[&str]) -> RelayProc {
    assert!(require_tool("python3"));
    let ready = temp_path("launched-ready");
    let mut cmd = Command::new("python3");
    cmd.arg("-c")
        .arg(launcher)
        .args(wrapper)
        .arg(udphub_bin())
        .arg("serve")
        .args(serve)
        .args(["--log-level", "info", "--ready-file"])
        .arg(&ready)
        .env_remove("RUST_LOG")
        .env_remove("UDPHUB_THREADS");
    let (child, log, addrs) = spawn_until_ready(cmd, &ready);
    RelayProc {
        child,
        addr: addrs.udp,
        metrics: addrs.metrics,
        log,
    }
}

/// Two inherited sockets on one address run two loops (`--threads 2`):
/// clients spread over both, and a message reaches every member
/// whichever loop it landed on.
#[test]
fn two_inherited_sockets_run_two_loops() {
    let relay = launched(
        TWO_SOCKETS,
        &[],
        &["--threads", "2", "--metrics", "127.0.0.1:0"],
    );
    relay.expect_log("socket activation: relaying on the sockets the service manager passed");
    relay.expect_log("2 loops on SO_REUSEPORT sockets");
    let clients: Vec<Client> = (0..20).map(|_| Client::joined(&relay)).collect();
    let text = relay.scrape();
    for shard in ["0", "1"] {
        let here = metric(&text, &format!("udphub_shard_clients{{shard=\"{shard}\"}}"));
        assert!(here > 0.0, "no client on loop {shard}:\n{text}");
    }
    clients[0].send(b"to all\n");
    let want = util::seed_format("to all", clients[0].addr());
    for c in &clients {
        assert_eq!(c.recv(), want);
    }
}

/// Launches its arguments (udphub) with one inherited UDP socket whose
/// receive buffer the "service manager" set big: forced to 12 MiB past
/// net.core.rmem_max where it may (as systemd does for `ReceiveBuffer=`),
/// else 1 MiB. It says what it set on stderr before the exec.
const ONE_BIG_BUFFER: &str = r#"
import fcntl, os, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:
    s.setsockopt(socket.SOL_SOCKET, 33, 12 << 20)  # SO_RCVBUFFORCE
except PermissionError:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
s.bind(("127.0.0.1", 0))
print("inherited SO_RCVBUF", s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2, file=sys.stderr, flush=True)
high = fcntl.fcntl(s.fileno(), fcntl.F_DUPFD, 100)
s.close()
os.dup2(high, 3)
os.close(high)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1")
os.execv(sys.argv[1], sys.argv[1:])
"#;

/// A receive buffer the service manager made bigger than udphub asks for
/// is kept, not lowered (systemd forces `ReceiveBuffer=8M` past a 4 MiB
/// net.core.rmem_max; asking for the size again without force would cap
/// it). So is one that udphub, without CAP_NET_ADMIN (setpriv drops it),
/// asks to grow past the cap: the plain option would shrink it to the cap.
#[test]
fn an_inherited_bigger_buffer_is_kept() {
    assert!(require_tool("setpriv"));
    let no_net_admin = [
        "/usr/bin/setpriv",
        "--inh-caps=-net_admin",
        "--bounding-set=-net_admin",
    ];
    let bigger = (16usize << 20).to_string();
    for (wrapper, asked) in [(&[][..], "65536"), (&no_net_admin[..], bigger.as_str())] {
        let serve = ["--threads", "1", "--metrics", "off", "--recv-buffer", asked];
        let relay = launched(ONE_BIG_BUFFER, wrapper, &serve);
        let set = relay.expect_log("inherited SO_RCVBUF");
        let set: usize = set.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(set >= 1 << 20, "{set}");
        let start = relay.expect_log("udphub relaying on");
        assert!(
            start.contains(&format!("SO_RCVBUF {set} B,")),
            "{asked}: {start}"
        );
    }
}
