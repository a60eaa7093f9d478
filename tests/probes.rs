//! The probes on the metrics listener (`/healthz`, `/readyz`), the
//! `udphub_build_info` gauge, and systemd's readiness protocol
//! (`NOTIFY_SOCKET`), through the real binary; and every phase of the
//! readiness state through a real HTTP listener.

mod util;

use std::io::Write;
use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use util::http::{self, wait_status};
use util::{spawn_relay, spawn_relay_with, temp_path, Client, PATIENCE};

/// While the relay serves, both probes say 200 (with `--threads 2`
/// too) and the build's version is exported; an idle connection holding
/// a slot does not keep a probe waiting; after SIGTERM `/readyz` never
/// says 200 again, until the listener goes with the process.
#[test]
fn the_probes_answer_while_serving_and_readiness_ends_at_shutdown() {
    for threads in ["1", "2"] {
        let mut relay = spawn_relay(&["--threads", threads]);
        let metrics = relay.metrics.expect("metrics");
        // Ready first: `/healthz` says 200 while the loops start too
        // ("ok: starting"), so asking it first would race the start.
        assert_eq!(wait_status(metrics, "/readyz", 200), "ok: serving\n");
        assert_eq!(wait_status(metrics, "/healthz", 200), "ok: serving\n");
        let version = env!("CARGO_PKG_VERSION");
        assert_eq!(
            relay.metric(&format!("udphub_build_info{{version=\"{version}\"}}")),
            1.0
        );
        // Clients that connect and say nothing hold a slot each, not the
        // listener.
        let idle: Vec<TcpStream> = (0..3)
            .map(|_| TcpStream::connect_timeout(&metrics, PATIENCE).unwrap())
            .collect();
        let asked = Instant::now();
        assert_eq!(http::get(metrics, "/readyz").map(|(c, _)| c), Some(200));
        assert!(asked.elapsed() < PATIENCE);
        drop(idle);

        let client = Client::joined(&relay);
        client.send(b"hi\n");
        assert_eq!(client.recv(), util::seed_format("hi", client.addr()));

        relay.signal("TERM");
        let deadline = Instant::now() + PATIENCE;
        let mut answers = Vec::new();
        while relay.child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "the relay did not exit");
            if let Some((code, body)) = http::get(metrics, "/readyz") {
                answers.push((code, body));
            }
        }
        assert!(relay.wait_exit().success());
        // Ready until the signal is seen, then never again.
        let first_not_ready = answers.iter().position(|(c, _)| *c != 200);
        if let Some(i) = first_not_ready {
            assert!(
                answers[i..]
                    .iter()
                    .all(|(c, b)| *c == 503 && b.starts_with("not")),
                "{answers:?}"
            );
        }
    }
}

/// Under systemd's `Type=notify` the relay says `READY=1` once it serves
/// and `STOPPING=1` when a signal stops it, through `NOTIFY_SOCKET`.
#[test]
fn systemd_is_told_ready_and_stopping() {
    let path = temp_path("notify");
    let _ = std::fs::remove_file(&path);
    let socket = UnixDatagram::bind(&path).unwrap();
    socket.set_read_timeout(Some(PATIENCE)).unwrap();
    let notify = path.to_string_lossy().to_string();
    let mut relay = spawn_relay_with("127.0.0.1:0", true, &[("NOTIFY_SOCKET", &notify)], &[]);
    let mut buf = [0u8; 256];
    let n = socket.recv(&mut buf).expect("READY=1 within PATIENCE");
    assert_eq!(&buf[..n], b"READY=1");
    // Ready for systemd is ready for the probe.
    let metrics = relay.metrics.expect("metrics");
    assert_eq!(http::get(metrics, "/readyz").map(|(c, _)| c), Some(200));
    relay.signal("TERM");
    let n = socket.recv(&mut buf).expect("STOPPING=1 within PATIENCE");
    assert_eq!(&buf[..n], b"STOPPING=1");
    assert!(relay.wait_exit().success());
    let _ = std::fs::remove_file(&path);
}

/// Every phase, as the probes say it over a real listener: nothing runs
/// (both 503), loops started but not through their first pass (alive,
/// not ready), serving, handing over (alive, not ready), resumed,
/// shutting down, and a loop that ended (not alive). The other tests of
/// this file start the binary; this one installs the recorder in this
/// process, once.
#[test]
fn every_phase_is_told_by_the_probes() {
    use udphub::runtime::exporter;
    use udphub::runtime::readiness::Readiness;

    let r = Readiness::default();
    let exporter = exporter::start_with("127.0.0.1:0".parse().unwrap(), Some(r.clone())).unwrap();
    let at = exporter.local_addr;
    let ask = |path: &str| http::get(at, path).expect("an answer");
    assert_eq!(ask("/healthz").0, 503);
    assert_eq!(
        ask("/readyz"),
        (
            503,
            "not running: starting, the loops are not all running\n".into()
        )
    );
    r.expect_loops(2);
    r.loop_started();
    r.loop_started();
    assert_eq!(ask("/healthz"), (200, "ok: starting\n".into()));
    assert_eq!(ask("/readyz"), (503, "not ready: starting\n".into()));
    r.loop_polled();
    assert_eq!(ask("/readyz").0, 503, "one loop of two has polled");
    r.loop_polled();
    assert_eq!(ask("/readyz"), (200, "ok: serving\n".into()));
    assert!(r.hand_over_started());
    assert_eq!(ask("/readyz"), (503, "not ready: handing_over\n".into()));
    assert_eq!(ask("/healthz").0, 200);
    r.hand_over_ended(true);
    assert_eq!(ask("/readyz").0, 200);
    r.shutting_down();
    assert_eq!(ask("/readyz"), (503, "not ready: shutting_down\n".into()));
    assert_eq!(ask("/healthz").0, 200);
    r.loop_ended();
    assert_eq!(ask("/healthz").0, 503);
    // Anything else is still refused politely, and a request that never
    // ends is cut at the listener's bound, not waited on.
    assert_eq!(ask("/nope").0, 404);
    let mut slow = TcpStream::connect_timeout(&at, PATIENCE).unwrap();
    slow.write_all(b"GET /readyz HTTP/1.0\r\n").unwrap();
    assert_eq!(ask("/healthz").0, 503);
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut text = String::new();
    let _ = std::io::Read::read_to_string(&mut slow, &mut text);
    assert!(text.starts_with("HTTP/1.0 408"), "{text:?}");
}
