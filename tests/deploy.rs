//! The deployment kit against the real tools: promtool checks and
//! unit-tests the alert rules, systemd-analyze verifies the unit, and a
//! real Prometheus (Debian's) scrapes a live relay, evaluates the alerts,
//! and answers every query of the Grafana dashboard with data.

mod util;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use util::{require_tool, spawn_relay, temp_path, Client, PATIENCE};

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(path)
}

/// Runs a command, failing the test with its output unless it succeeds.
fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run the tool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

#[test]
fn promtool_checks_and_unit_tests_the_alert_rules() {
    assert!(require_tool("promtool"));
    let out = run_ok(
        Command::new("promtool")
            .args(["check", "rules"])
            .arg(deploy("prometheus/udphub-alerts.yml")),
    );
    assert!(out.contains("SUCCESS: 12 rules found"), "{out}");
    let out = run_ok(
        Command::new("promtool")
            .args(["test", "rules", "udphub-alerts.test.yml"])
            .current_dir(deploy("prometheus")),
    );
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn the_systemd_unit_is_sandboxed_and_verifies() {
    let unit = std::fs::read_to_string(deploy("systemd/udphub.service")).unwrap();
    for directive in [
        "DynamicUser=yes",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "CapabilityBoundingSet=\n",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
        "LimitNOFILE=",
        "SystemCallFilter=@system-service",
        "ExecReload=/bin/kill -HUP $MAINPID",
    ] {
        assert!(unit.contains(directive), "the unit lacks {directive:?}");
    }
    assert!(require_tool("systemd-analyze"));
    // verify wants ExecStart's binary to exist: point it at this build.
    let dir = temp_path("unit");
    std::fs::create_dir_all(&dir).unwrap();
    let copy = dir.join("udphub.service");
    std::fs::write(
        &copy,
        unit.replace("/usr/local/bin/udphub", util::udphub_bin()),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify:\n{text}");
    assert!(
        !text.contains("udphub.service:"),
        "warnings about the unit:\n{text}"
    );
}

/// The socket unit sits beside the service: systemd-analyze verifies the
/// pair without a warning, the socket is a datagram socket on the relay's
/// default address (so enabling it changes nothing but who holds the
/// socket), and the service says READY=1 (Type=notify) and keeps its
/// control socket in its own runtime directory.
#[test]
fn the_socket_unit_verifies_beside_the_service() {
    let socket = std::fs::read_to_string(deploy("systemd/udphub.socket")).unwrap();
    let service = std::fs::read_to_string(deploy("systemd/udphub.service")).unwrap();
    for directive in ["ReusePort=yes", "Accept=no", "WantedBy=sockets.target"] {
        assert!(
            socket.contains(directive),
            "the socket unit lacks {directive:?}"
        );
    }
    assert!(!socket.contains("\nListenStream="));
    assert!(
        !socket.contains("PartOf="),
        "a restart of the service must keep the socket"
    );
    for directive in [
        "Type=notify",
        // The successor of an in-place upgrade (SIGUSR2) says MAINPID=.
        "NotifyAccess=all",
        "RuntimeDirectory=udphub",
        "RuntimeDirectoryMode=0700",
        "--control /run/udphub/control",
    ] {
        assert!(
            service.contains(directive),
            "the service lacks {directive:?}"
        );
    }
    // The relay's default --bind, from its own summary.
    let out = Command::new(util::udphub_bin())
        .args(["serve", "--check-config"])
        .env_remove("UDPHUB_BIND")
        .output()
        .unwrap();
    let summary = String::from_utf8_lossy(&out.stdout);
    let bind = summary
        .split(", ")
        .find_map(|s| s.split("bind ").nth(1))
        .unwrap_or_else(|| panic!("no bind in {summary}"));
    assert!(
        socket.contains(&format!("\nListenDatagram={bind}\n")),
        "the socket unit listens elsewhere than --bind's default {bind}"
    );
    assert!(require_tool("systemd-analyze"));
    let dir = temp_path("units");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("udphub.socket"), &socket).unwrap();
    std::fs::write(
        dir.join("udphub.service"),
        service.replace("/usr/local/bin/udphub", util::udphub_bin()),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.join("udphub.socket"))
        .arg(dir.join("udphub.service"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify:\n{text}");
    assert!(
        !text.contains("udphub."),
        "warnings about the units:\n{text}"
    );
}

/// A Prometheus server on loopback, killed on drop.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Starts Debian's `prometheus` scraping `targets` every second, with
    /// udphub's alert rules, and waits until it is ready.
    fn start(targets: &[SocketAddr]) -> Prometheus {
        let dir = temp_path("prometheus");
        std::fs::create_dir_all(&dir).unwrap();
        let targets: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {:?}\nscrape_configs:\n  - job_name: udphub\n    static_configs:\n      - targets: [{}]\n",
            deploy("prometheus/udphub-alerts.yml").display().to_string(),
            targets.join(", ")
        );
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        for _ in 0..3 {
            // A free port: taken by the OS, released, given to Prometheus
            // (which cannot report a port 0 back); retried if lost.
            let port = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let addr: SocketAddr = ([127, 0, 0, 1], port).into();
            let mut child = Command::new("prometheus")
                .arg(format!(
                    "--config.file={}",
                    dir.join("prometheus.yml").display()
                ))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.join("data").display()
                ))
                .arg(format!("--web.listen-address={addr}"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start prometheus");
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if child.try_wait().unwrap().is_some() {
                    break;
                }
                if http_get(addr, "/-/ready").is_some_and(|(code, _)| code == 200) {
                    return Prometheus { child, addr };
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("prometheus did not start");
    }

    /// Runs an instant query (at `time`, unix seconds, if given) and
    /// returns `data.result`, failing on any error.
    fn query(&self, expr: &str, time: Option<f64>) -> Vec<Value> {
        let mut path = format!("/api/v1/query?query={}", encode(expr));
        if let Some(t) = time {
            path.push_str(&format!("&time={t:.3}"));
        }
        let (code, body) = http_get(self.addr, &path).expect("prometheus answers");
        let v: Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("{expr}: not JSON ({e}): {body}"));
        assert_eq!(
            (code, v["status"].as_str()),
            (200, Some("success")),
            "{expr}: {body}"
        );
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// The value of a query that returns one series.
    fn scalar(&self, expr: &str, time: Option<f64>) -> Option<f64> {
        let result = self.query(expr, time);
        let first = result.first()?;
        first["value"][1].as_str()?.parse().ok()
    }

    /// Waits (bounded) until `expr` returns exactly `want`.
    fn wait_for(&self, expr: &str, want: f64) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let got = self.scalar(expr, None);
            if got == Some(want) {
                return;
            }
            assert!(Instant::now() < deadline, "{expr} = {got:?}, want {want}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Percent-encodes a query parameter.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A plain HTTP/1.0 GET (no chunking, the server closes): status and body.
fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(PATIENCE)).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let code = text.split(' ').nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n")?.1.to_string();
    Some((code, body))
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// The test the issue asks for: Prometheus scrapes a relay under a known
/// load; its counters arrive exactly; `rate()` over the load matches what
/// was sent; the alert rules evaluate without error and do not fire on a
/// healthy relay; and every query of the Grafana dashboard parses and
/// returns data.
#[test]
fn a_real_prometheus_scrapes_the_relay_and_answers_the_dashboard() {
    assert!(require_tool("prometheus") && require_tool("nats-server"));
    // A relay in a (one-node) cluster, so the cluster panels have data.
    let nats = util::nats::Nats::start();
    let relay = spawn_relay(&["--cluster", &nats.url(), "--timeout", "60s"]);
    relay.wait_metric("udphub_cluster_connected", 1.0);
    let prom = Prometheus::start(&[relay.metrics.unwrap()]);
    prom.wait_for("up{job=\"udphub\"}", 1.0);

    // The load: one sender at 100 msgs/s for 12 s to 4 members, paced by
    // deadlines so the average is exact whatever the scheduler does.
    let members: Vec<Client> = (0..4).map(|_| Client::joined(&relay)).collect();
    const RATE: u32 = 100;
    const SECS: u32 = 12;
    let before = relay.metric("udphub_deliveries_total");
    let start = Instant::now();
    let started_at = unix_now();
    for i in 0..RATE * SECS {
        let due = start + Duration::from_secs_f64(f64::from(i) / f64::from(RATE));
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        members[0].send(format!("m{i}").as_bytes());
    }
    let ended_at = unix_now();
    let sent = f64::from(RATE * SECS) * members.len() as f64;
    relay.wait_metric("udphub_deliveries_total", before + sent);
    assert_eq!(relay.metric("udphub_deliveries_total"), before + sent);

    // Prometheus has the exact count once it has scraped after the load.
    prom.wait_for("udphub_deliveries_total", before + sent);
    // rate() over the middle of the load is the load's rate, within what
    // 1 s scrapes resolve over an 8 s window (about one sample's worth,
    // ±12 %; ±20 % allowed).
    let mid = started_at + 2.0 + 8.0;
    let rate = prom
        .scalar("rate(udphub_deliveries_total[8s])", Some(mid))
        .expect("a rate");
    let want = f64::from(RATE) * members.len() as f64;
    assert!(
        (rate - want).abs() <= want * 0.2,
        "rate(udphub_deliveries_total[8s]) at {mid} = {rate}, sent {want}/s (load {started_at}..{ended_at})"
    );

    // A reload, so its series exist too.
    relay.signal("HUP");
    relay.expect_log("reload: nothing to change");
    prom.wait_for("udphub_config_reloads_total{result=\"applied\"}", 1.0);

    // The alert rules load and evaluate cleanly, and none fires.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (_, body) = http_get(prom.addr, "/api/v1/rules").unwrap();
        let v: Value = serde_json::from_str(&body).unwrap();
        let rules: Vec<Value> = v["data"]["groups"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        assert_eq!(rules.len(), 12, "{body}");
        let evaluated = rules
            .iter()
            .all(|r| r["lastEvaluation"].as_str() != Some("0001-01-01T00:00:00Z"));
        if evaluated {
            for r in &rules {
                assert_eq!(r["health"], "ok", "{}: {}", r["name"], r["lastError"]);
                // The two latency alerts measure this machine's timing (a
                // debug build on 2 cores shared with a compiler: a CI run
                // saw the loop's p99 pass 5 ms, "pending"). That is no
                // error of the relay's: they must evaluate cleanly, and
                // promtool's rule tests (deploy/prometheus/*.test.yml) check
                // when they fire. Every other rule must stay quiet.
                let timing = matches!(
                    r["name"].as_str(),
                    Some("UdphubLoopStalls" | "UdphubFanoutSlow")
                );
                if !timing {
                    assert_eq!(
                        r["state"], "inactive",
                        "{} fires on a healthy relay",
                        r["name"]
                    );
                }
            }
            break;
        }
        assert!(Instant::now() < deadline, "rules not evaluated: {body}");
        std::thread::sleep(Duration::from_millis(200));
    }

    // Every dashboard query, with Grafana's variables filled in as Grafana
    // would for "all relays", returns data.
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(deploy("grafana/udphub.json")).unwrap())
            .expect("the dashboard is JSON");
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            exprs.push((
                panel["title"].as_str().unwrap().to_string(),
                target["expr"].as_str().unwrap().to_string(),
            ));
        }
    }
    assert!(exprs.len() >= 20, "{} queries", exprs.len());
    for (title, expr) in &exprs {
        let q = expr
            .replace("$__rate_interval", "30s")
            .replace("$instance", ".*");
        let result = prom.query(&q, None);
        assert!(!result.is_empty(), "panel {title:?}: {q} returned nothing");
    }
    let instance = dashboard["templating"]["list"][1]["query"]["query"]
        .as_str()
        .unwrap();
    assert_eq!(instance, "label_values(udphub_clients, instance)");
    assert!(!prom.query("udphub_clients", None).is_empty());
}

/// A file of the repository, as text.
fn repo_text(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap()
}

/// One answer for the room secret under `DynamicUser=yes`: the unit's
/// `LoadCredential=` lines (which verify once uncommented), the same in
/// OPERATIONS.md and SECURITY.md, and no doc left suggesting a mode the
/// dynamic user could not read (0640) or everyone could (0644).
#[test]
fn the_room_secret_has_one_answer_under_dynamic_user() {
    let unit = std::fs::read_to_string(deploy("systemd/udphub.service")).unwrap();
    let load = "LoadCredential=room.secret:/etc/udphub/room.secret";
    let env = "Environment=UDPHUB_ROOM_SECRET_FILE=%d/room.secret";
    for line in [load, env] {
        assert!(
            unit.contains(&format!("#{line}\n")),
            "the unit lacks {line:?}"
        );
    }
    let operations = repo_text("docs/OPERATIONS.md");
    let security = repo_text("docs/SECURITY.md");
    for (name, text) in [("OPERATIONS.md", &operations), ("SECURITY.md", &security)] {
        assert!(
            text.contains("LoadCredential="),
            "{name} lacks LoadCredential="
        );
    }
    assert!(operations.contains(load) && operations.contains(env));
    for (name, text) in [
        ("the unit", &unit),
        ("OPERATIONS.md", &operations),
        ("SECURITY.md", &security),
        ("README.md", &repo_text("README.md")),
    ] {
        for line in text.lines().filter(|l| l.contains("secret")) {
            assert!(
                !line.contains("0640") && !line.contains("0644"),
                "{name}: {line}"
            );
        }
    }
    // Uncommented, the unit still verifies.
    assert!(require_tool("systemd-analyze"));
    let dir = temp_path("unit-cred");
    std::fs::create_dir_all(&dir).unwrap();
    let copy = dir.join("udphub.service");
    let enabled = unit
        .replace(&format!("#{load}"), load)
        .replace(&format!("#{env}"), env)
        .replace("/usr/local/bin/udphub", util::udphub_bin());
    std::fs::write(&copy, enabled).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify:\n{text}");
    assert!(!text.contains("udphub.service:"), "warnings:\n{text}");
}

/// README, SECURITY.md and the unit each say in one paragraph what a plain
/// client must do in verify mode (padded `^hello^`, `^cookie^C` back,
/// prefix with it) and point to our clients; PROTOCOL.md no longer calls
/// verify mode something v1 clients need not know about.
#[test]
fn plain_clients_are_told_the_handshake() {
    for (name, text) in [
        ("README.md", repo_text("README.md")),
        ("docs/SECURITY.md", repo_text("docs/SECURITY.md")),
        ("the unit", repo_text("deploy/systemd/udphub.service")),
        ("docs/PROTOCOL.md", repo_text("docs/PROTOCOL.md")),
    ] {
        let flat = text.replace("\n# ", " ").replace('\n', " ");
        for needle in [
            "`^hello^` padded with spaces to 64 bytes",
            "`^cookie^C`",
            "udphub send --verify",
        ] {
            assert!(flat.contains(needle), "{name} lacks {needle:?}");
        }
    }
    let protocol = repo_text("docs/PROTOCOL.md").replace('\n', " ");
    assert!(
        !protocol.contains("and verify mode above: additions v1 clients need not know about"),
        "PROTOCOL.md still says v1 clients need not know about verify mode"
    );
    assert!(protocol.contains("Verify mode is not one of them"));
}

/// The Prometheus example scrapes what the install binds: every target in
/// OPERATIONS.md's scrape config is a `metrics =` address of the install
/// example, or loopback (a Prometheus on the relay's own host).
#[test]
fn the_prometheus_example_scrapes_what_the_relay_binds() {
    let ops = repo_text("docs/OPERATIONS.md");
    let bound: Vec<String> = ops
        .split("metrics = \"")
        .skip(1)
        .filter_map(|rest| rest.split('"').next().map(str::to_string))
        .collect();
    assert!(!bound.is_empty(), "no `metrics =` in the install example");
    let targets_line = ops
        .lines()
        .find(|l| l.trim_start().starts_with("- targets:"))
        .expect("a scrape config");
    let targets: Vec<&str> = targets_line.split('"').skip(1).step_by(2).collect();
    assert!(!targets.is_empty(), "{targets_line}");
    let private = |t: &str| {
        t.parse::<SocketAddr>().is_ok_and(|a| match a.ip() {
            std::net::IpAddr::V4(ip) => ip.is_private() || ip.is_loopback(),
            std::net::IpAddr::V6(ip) => ip.is_loopback(),
        })
    };
    for t in &targets {
        assert!(
            private(t),
            "target {t} is not a private or loopback address"
        );
    }
    assert!(
        bound.iter().any(|b| targets.contains(&b.as_str())),
        "the install binds metrics to {bound:?}, the scrape config targets {targets:?}"
    );
}
