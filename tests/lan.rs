//! `udphub chat --lan` between three hosts: network namespaces this test
//! creates, joined by veth pairs to a bridge in a namespace of its own.
//!
//! Broadcasts never touch the machine's own network: every member runs
//! inside its namespace (`ip netns exec`), on 198.18.77.0/24 (the range
//! set aside for benchmarking, RFC 2544), and the namespaces are deleted
//! afterwards. Where namespaces are not permitted the test says so and
//! skips.

mod util;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use util::{udphub_bin, PATIENCE};

/// The namespaces of one test run, deleted on drop.
struct Lab {
    names: Vec<String>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in &self.names {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Builds the bridge namespace and one namespace per member; returns the
/// lab and the members' namespace names. `Err` when namespaces are not
/// permitted here.
fn build_lab(members: &[&str]) -> Result<(Lab, Vec<String>), String> {
    let id = std::process::id();
    let bridge = format!("udphub-br-{id}");
    let mut lab = Lab { names: Vec::new() };
    ip(&["netns", "add", &bridge])?;
    lab.names.push(bridge.clone());
    ip(&["-n", &bridge, "link", "add", "br0", "type", "bridge"])?;
    ip(&["-n", &bridge, "link", "set", "br0", "up"])?;
    let mut spaces = Vec::new();
    for (i, m) in members.iter().enumerate() {
        let ns = format!("udphub-{m}-{id}");
        ip(&["netns", "add", &ns])?;
        lab.names.push(ns.clone());
        let peer = format!("p{i}");
        ip(&[
            "-n", &ns, "link", "add", "eth0", "type", "veth", "peer", "name", &peer, "netns",
            &bridge,
        ])?;
        ip(&["-n", &bridge, "link", "set", &peer, "master", "br0"])?;
        ip(&["-n", &bridge, "link", "set", &peer, "up"])?;
        let addr = format!("198.18.77.{}/24", i + 1);
        ip(&["-n", &ns, "addr", "add", &addr, "brd", "+", "dev", "eth0"])?;
        ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        spaces.push(ns);
    }
    Ok((lab, spaces))
}

/// A LAN member running inside its namespace.
struct Member {
    child: Child,
    out: mpsc::Receiver<String>,
    err: mpsc::Receiver<String>,
}

fn lines_of<R: std::io::Read + Send + 'static>(r: R) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(r).split(b'\n') {
            let Ok(line) = line else { break };
            if tx
                .send(String::from_utf8_lossy(&line).into_owned())
                .is_err()
            {
                break;
            }
        }
    });
    rx
}

impl Member {
    fn start(ns: &str, name: &str) -> Member {
        let mut child = Command::new("ip")
            .args([
                "netns",
                "exec",
                ns,
                udphub_bin(),
                "chat",
                "--lan",
                "--port",
                "7788",
            ])
            .args(["--name", name, "--linger", "0s"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn a LAN member");
        let out = lines_of(child.stdout.take().unwrap());
        let err = lines_of(child.stderr.take().unwrap());
        let m = Member { child, out, err };
        m.wait(&m.err, "LAN room on port 7788");
        m
    }

    fn wait(&self, rx: &mpsc::Receiver<String>, needle: &str) -> String {
        let deadline = Instant::now() + PATIENCE;
        let mut seen = Vec::new();
        while Instant::now() < deadline {
            if let Ok(line) = rx.recv_timeout(Duration::from_millis(50)) {
                if line.contains(needle) {
                    return line;
                }
                seen.push(line);
            }
        }
        panic!("no line with {needle:?}; saw {seen:?}");
    }

    fn say(&mut self, line: &str) {
        let stdin = self.child.stdin.as_mut().unwrap();
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A line typed in one namespace reaches the members in the others, as
/// `[time] ip:port: text`; joining and leaving are announced.
#[test]
fn lan_room_across_three_namespaces() {
    if !util::require_tool("ip") {
        return;
    }
    let (_lab, ns) = match build_lab(&["a", "b", "c"]) {
        Ok(lab) => lab,
        Err(e) => {
            eprintln!("skipping: network namespaces are not permitted here ({e})");
            return;
        }
    };
    let mut a = Member::start(&ns[0], "ann");
    let b = Member::start(&ns[1], "bo");
    let c = Member::start(&ns[2], "cy");
    // c's join announcement reaches the members already there.
    a.wait(&a.out, "198.18.77.3:");
    b.wait(&b.out, "*** joined the room");

    a.say("hello from a");
    for m in [&b, &c] {
        let line = m.wait(&m.out, "ann: hello from a");
        assert!(line.starts_with('['), "{line}");
        assert!(line.contains("] 198.18.77.1:"), "{line}");
    }

    drop(a.child.stdin.take());
    let deadline = Instant::now() + PATIENCE;
    let status = loop {
        if let Some(s) = a.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "member a did not exit");
        thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status.code(), Some(0));
    let left = c.wait(&c.out, "*** left the room");
    assert!(left.contains("198.18.77.1:"), "{left}");
}
