//! `fanout --threads N` against the real udphub: counts exact across
//! worker threads; reports from concurrent runs merged with `loadtest
//! merge`; loadtest naming itself as the bottleneck; merge's usage errors.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

/// udphub on loopback, killed on drop.
struct Relay {
    child: Child,
    udp: String,
    metrics: String,
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the real udphub (built by `cargo test --workspace`) with both
/// ports from its ready file; `None` (skip) when it is not built, outside CI.
fn relay(flags: &[&str]) -> Option<Relay> {
    let bin = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/udphub");
    if !bin.exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{} missing: CI builds it",
            bin.display()
        );
        eprintln!("skipping: build udphub first (cargo test --workspace does)");
        return None;
    }
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ready = std::env::temp_dir().join(format!(
        "loadtest-threads-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_file(&ready);
    let child = Command::new(bin)
        .args(["serve", "--bind", "127.0.0.1:0", "--metrics", "127.0.0.1:0"])
        .args(["--log-level", "warn"])
        .args(flags)
        .arg("--ready-file")
        .arg(&ready)
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn udphub");
    let mut relay = Relay {
        child,
        udp: String::new(),
        metrics: String::new(),
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    let text = loop {
        if let Ok(text) = std::fs::read_to_string(&ready) {
            if text.contains("metrics=") {
                break text;
            }
        }
        assert!(relay.child.try_wait().unwrap().is_none(), "udphub exited");
        assert!(Instant::now() < deadline, "udphub never got ready");
        std::thread::sleep(Duration::from_millis(10));
    };
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .expect("ready file field")
            .to_string()
    };
    relay.udp = field("udp=");
    relay.metrics = format!("http://{}/metrics", field("metrics="));
    let _ = std::fs::remove_file(&ready);
    Some(relay)
}

fn loadtest(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_loadtest"))
        .args(args)
        .output()
        .expect("run loadtest")
}

/// A `--json` report, the run having succeeded.
fn report(out: &Output) -> Value {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("JSON: {e}\n{stderr}"))
}

/// One series of the relay's metrics (0 when absent).
fn scrape(url: &str, series: &str) -> f64 {
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_once('/').unwrap();
    let mut s = TcpStream::connect(host).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

const MESSAGES: &str = "datagrams_received_total{kind=\"message\"}";

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

/// `--threads 2` at a fixed rate and count: every message sent once, every
/// delivery received once and in order across the workers, and the
/// relay's counters equal loadtest's exactly; the same deliveries and loss
/// with 1 and 4 threads.
#[test]
fn a_fixed_rate_run_on_two_threads_matches_the_relays_counters() {
    let Some(r) = relay(&[]) else {
        return;
    };
    for threads in ["2", "1", "4"] {
        let out = loadtest(&[
            "fanout",
            "--relay",
            &r.udp,
            "--metrics-url",
            &r.metrics,
            "--clients",
            "24",
            "--senders",
            "3",
            "--rate",
            "1000",
            "--messages",
            "600",
            "--duration",
            "5s",
            "--threads",
            threads,
            "--json",
        ]);
        let j = report(&out);
        assert_eq!(
            u(&j["loadtest"]["threads"]),
            threads.parse::<u64>().unwrap()
        );
        assert_eq!(u(&j["messages_sent"]), 600, "{j}");
        assert_eq!(u(&j["deliveries_expected"]), 600 * 24, "{j}");
        assert_eq!(
            (
                u(&j["deliveries"]),
                u(&j["lost"]),
                u(&j["duplicates"]),
                u(&j["reordered"])
            ),
            (600 * 24, 0, 0, 0),
            "threads {threads}: {j}"
        );
        let m = &j["metrics_check"];
        assert_eq!(
            m["relay_messages"].as_f64(),
            m["loadtest_messages"].as_f64(),
            "{m}"
        );
        assert_eq!(
            m["relay_deliveries"].as_f64(),
            m["loadtest_deliveries"].as_f64(),
            "{m}"
        );
        assert_eq!(m["lost_after_relay"].as_f64(), Some(0.0), "{m}");
        assert!(j["latency_histogram"].as_str().unwrap().len() > 16, "{j}");
        assert!(j["loadtest_limited"].is_null(), "{j}");
    }
}

/// Two runs at once against one relay, each in rooms of its own, merged:
/// the counts are their sums, the percentiles come from the merged
/// histogram, and the sums equal the relay's own counters over both runs.
#[test]
fn two_concurrent_runs_merge_to_their_sums_and_the_relays_counters() {
    let Some(r) = relay(&[]) else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("loadtest-merge-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let messages0 = scrape(&r.metrics, &format!("udphub_{MESSAGES}"));
    let deliveries0 = scrape(&r.metrics, "udphub_deliveries_total");
    let run = |prefix: &str, threads: &str| {
        Command::new(env!("CARGO_BIN_EXE_loadtest"))
            .args(["fanout", "--relay", &r.udp, "--metrics-url", &r.metrics])
            .args(["--clients", "16", "--senders", "2", "--rooms", "2"])
            .args(["--room-prefix", prefix, "--threads", threads])
            .args(["--rate", "800", "--messages", "400", "--duration", "5s"])
            .arg("--json")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn loadtest")
    };
    let (a, b) = (run("a-", "2"), run("b-", "1"));
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    let (ra, rb) = (report(&a), report(&b));
    let (fa, fb) = (dir.join("a.json"), dir.join("b.json"));
    std::fs::write(&fa, &a.stdout).unwrap();
    std::fs::write(&fb, &b.stdout).unwrap();
    let merged = report(&loadtest(&[
        "merge",
        fa.to_str().unwrap(),
        fb.to_str().unwrap(),
        "--json",
    ]));
    for key in [
        "messages_sent",
        "deliveries_expected",
        "deliveries",
        "lost",
        "duplicates",
        "clients",
        "quits_sent",
    ] {
        assert_eq!(
            u(&merged[key]),
            u(&ra[key]) + u(&rb[key]),
            "{key}: {merged}"
        );
    }
    assert_eq!(u(&merged["deliveries"]), 2 * 400 * 8, "{merged}");
    assert_eq!(u(&merged["lost"]), 0);
    let l = &merged["latency_us"];
    let p = |v: &Value, q: &str| v[q].as_f64().unwrap();
    assert!(p(l, "p50") > 0.0 && p(l, "p50") <= p(l, "p99") && p(l, "p99") <= p(l, "max"));
    let lo = p(&ra["latency_us"], "p50").min(p(&rb["latency_us"], "p50"));
    let hi = p(&ra["latency_us"], "p50").max(p(&rb["latency_us"], "p50"));
    assert!(lo <= p(l, "p50") && p(l, "p50") <= hi, "{l}");
    assert_eq!(
        p(l, "max"),
        p(&ra["latency_us"], "max").max(p(&rb["latency_us"], "max"))
    );
    assert_eq!(merged["merged_from"].as_array().unwrap().len(), 2);
    // The relay's own count over both runs: the sums, exactly.
    let m = &merged["metrics_check"];
    let messages = scrape(&r.metrics, &format!("udphub_{MESSAGES}")) - messages0;
    let deliveries = scrape(&r.metrics, "udphub_deliveries_total") - deliveries0;
    assert_eq!(m["loadtest_messages"].as_f64(), Some(messages), "{m}");
    assert_eq!(m["loadtest_deliveries"].as_f64(), Some(deliveries), "{m}");
    // The table reads the same report.
    let table = loadtest(&["merge", fa.to_str().unwrap(), fb.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(
        text.contains("merged") && text.contains("2 reports"),
        "{text}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A rate no single thread can send (50 million messages a second) is
/// reported as loadtest's own limit, in words and in the JSON.
#[test]
fn a_rate_loadtest_cannot_reach_is_its_own_limit() {
    let Some(r) = relay(&[]) else {
        return;
    };
    let args = [
        "fanout",
        "--relay",
        &r.udp,
        "--clients",
        "4",
        "--rate",
        "50000000",
        "--duration",
        "300ms",
        "--threads",
        "1",
    ];
    let j = report(&loadtest(&[&args[..], &["--json"]].concat()));
    let reasons: Vec<&str> = j["loadtest_limited"]["reason"]
        .as_array()
        .unwrap_or_else(|| panic!("no verdict: {j}"))
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(reasons.contains(&"rate"), "{j}");
    assert!(j["loadtest"]["rate_reached"].as_f64().unwrap() < 50e6);
    let out = loadtest(&args);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("LOADTEST LIMITED") && text.contains("fell behind its own schedule"),
        "{text}"
    );
}

/// `loadtest merge`'s mistakes: one line naming the file and the fix, exit 2.
#[test]
fn merge_errors_are_one_line_and_exit_2() {
    let dir = std::env::temp_dir().join(format!("loadtest-merge-err-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_string()
    };
    let garbage = file("garbage.json", "not json {");
    let old = file("old.json", r#"{"scenario": "fanout", "deliveries": 3}"#);
    let soak = file("soak.json", r#"{"scenario": "soak", "samples": []}"#);
    let missing = dir.join("missing.json").to_str().unwrap().to_string();
    for (args, says) in [
        (vec![missing.as_str()], "missing.json: No such file"),
        (vec![garbage.as_str()], "not a loadtest JSON report"),
        (vec![old.as_str()], "has no latency_histogram"),
        (
            vec![old.as_str(), soak.as_str()],
            "a soak report: merge reports of one scenario",
        ),
        (
            vec![soak.as_str()],
            "is a soak report: merge reads fanout reports",
        ),
        (vec![], "required"),
    ] {
        let out = loadtest(&[&["merge"][..], &args].concat());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--threads` takes a count or `auto`, and says so.
#[test]
fn a_bad_thread_count_names_the_fix() {
    for bad in ["0", "many", "100000"] {
        let out = loadtest(&["fanout", "--threads", bad]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains("or auto"), "{stderr}");
    }
}

/// `soak --threads 2`: the clients dealt over two workers all register
/// with the relay, and the samples add up both workers' deliveries.
#[test]
fn soak_runs_on_two_threads() {
    let Some(r) = relay(&[]) else {
        return;
    };
    let j = report(&loadtest(&[
        "soak",
        "--relay",
        &r.udp,
        "--metrics-url",
        &r.metrics,
        "--clients",
        "30",
        "--senders",
        "3",
        "--rate",
        "300",
        "--duration",
        "1s",
        "--sample-every",
        "400ms",
        "--threads",
        "2",
        "--json",
    ]));
    let samples = j["samples"].as_array().unwrap();
    assert!(samples.len() >= 2, "{j}");
    assert_eq!(u(&samples[0]["deliveries"]), 0, "{j}");
    let last = samples.last().unwrap();
    assert_eq!(last["relay_clients"].as_f64(), Some(30.0), "{j}");
    // Both workers' receivers count: 30 recipients per message.
    assert!(
        u(&last["deliveries"]) + u(&last["missing"]) >= 30 * 250,
        "{j}"
    );
}

/// Two runs at once in the same lobby: each hears the other's messages,
/// counts them apart (`foreign_deliveries`) and never takes them for its
/// own, so neither sees loss, duplicates or reordering; merged, the
/// messages equal the relay's count.
#[test]
fn concurrent_runs_in_one_lobby_keep_their_own_counts() {
    let Some(r) = relay(&[]) else {
        return;
    };
    let messages0 = scrape(&r.metrics, &format!("udphub_{MESSAGES}"));
    let run = |threads: &str| {
        Command::new(env!("CARGO_BIN_EXE_loadtest"))
            .args(["fanout", "--relay", &r.udp, "--metrics-url", &r.metrics])
            .args(["--clients", "8", "--senders", "2", "--threads", threads])
            .args(["--rate", "500", "--messages", "300", "--duration", "5s"])
            .arg("--json")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn loadtest")
    };
    let (a, b) = (run("2"), run("1"));
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    let dir = std::env::temp_dir().join(format!("loadtest-lobby-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (fa, fb) = (dir.join("a.json"), dir.join("b.json"));
    let mut foreign = 0;
    for (out, file) in [(&a, &fa), (&b, &fb)] {
        let j = report(out);
        assert_eq!(
            (
                u(&j["deliveries"]),
                u(&j["lost"]),
                u(&j["duplicates"]),
                u(&j["reordered"])
            ),
            (300 * 8, 0, 0, 0),
            "{j}"
        );
        foreign += u(&j["foreign_deliveries"]);
        std::fs::write(file, &out.stdout).unwrap();
    }
    // The later of the two hears the earlier's messages at the least.
    assert!(foreign > 0);
    let merged = report(&loadtest(&[
        "merge",
        fa.to_str().unwrap(),
        fb.to_str().unwrap(),
        "--json",
    ]));
    assert_eq!(u(&merged["deliveries"]), 2 * 300 * 8, "{merged}");
    let messages = scrape(&r.metrics, &format!("udphub_{MESSAGES}")) - messages0;
    assert_eq!(
        merged["metrics_check"]["loadtest_messages"].as_f64(),
        Some(messages),
        "{merged}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
