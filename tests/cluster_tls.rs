//! The cluster across a network: relays reach Debian's nats-server over
//! TLS (`tls://`, `--cluster-ca`, a client certificate for mutual TLS)
//! with a PKI made by the openssl CLI, and without a cluster key a NATS
//! user per cluster keeps other publishers out of its rooms
//! (deploy/nats/cluster-users.conf, the config docs/CLUSTER.md shows). All
//! on loopback.

mod util;

use std::io::Write;
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use util::cluster::{member, until_connected};
use util::nats::Nats;
use util::pki::{repo_file, Pki};
use util::{spawn_relay, spawn_relay_with, temp_path, udphub_bin, RelayProc, PATIENCE};

/// A nats-server with deploy/nats/tls.conf (clients verified) and `pki`'s
/// server certificate.
fn tls_server(pki: &Pki) -> Nats {
    let env = pki.server_env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Nats::start_with(&repo_file("deploy/nats/tls.conf"), &env)
}

/// A relay in the cluster at `url` with `tls` flags (not waited for).
fn relay(url: &str, id: &str, tls: &[String]) -> RelayProc {
    let mut args = vec!["--cluster", url, "--node-id", id, "--format", "raw"];
    args.extend(tls.iter().map(String::as_str));
    spawn_relay(&args)
}

/// `--cluster-ca CA [--cluster-cert client.pem --cluster-cert-key client.key]`.
fn tls_flags(pki: &Pki, ca: &str, client: bool) -> Vec<String> {
    let mut f = vec!["--cluster-ca".to_string(), pki.arg(ca)];
    if client {
        f.extend([
            "--cluster-cert".into(),
            pki.arg("client.pem"),
            "--cluster-cert-key".into(),
            pki.arg("client.key"),
        ]);
    }
    f
}

/// Every log line the relay has written so far (bounded: what is queued).
fn log_lines(relay: &RelayProc) -> Vec<String> {
    relay.log.try_iter().collect()
}

/// Two relays with the CA and a client certificate, on a nats-server that
/// verifies clients: a room spans them over TLS, every message once and
/// in order.
#[test]
fn two_relays_share_a_room_over_mutual_tls() {
    let pki = Pki::new();
    let nats = tls_server(&pki);
    let flags = tls_flags(&pki, "ca.pem", true);
    let a = relay(&nats.tls_url(), "a", &flags);
    let b = relay(&nats.tls_url(), "b", &flags);
    a.wait_metric("udphub_cluster_connected", 1.0);
    b.wait_metric("udphub_cluster_connected", 1.0);
    let (ma, mb) = (member(&a, "red"), member(&b, "red"));
    until_connected(&ma, &[&mb]);
    until_connected(&mb, &[&ma]);
    for i in 0..20 {
        ma.send(format!("over tls {i:02}").as_bytes());
    }
    for i in 0..20 {
        assert_eq!(mb.recv(), format!("over tls {i:02}").into_bytes());
    }
    mb.expect_silence();
}

/// A relay that trusts another CA refuses the server's certificate: it
/// never connects (`udphub_cluster_connected` stays 0), says why in one
/// line, and its local room goes on.
#[test]
fn a_relay_trusting_another_ca_does_not_connect_and_says_why() {
    let pki = Pki::new();
    let nats = tls_server(&pki);
    let r = relay(
        &nats.tls_url(),
        "wrong-ca",
        &tls_flags(&pki, "other-ca.pem", true),
    );
    let line = r.expect_log("cannot connect to NATS");
    assert!(
        line.contains("not signed by a CA of --cluster-ca"),
        "{line}"
    );
    assert_eq!(r.metric("udphub_cluster_connected"), 0.0);
    // Local delivery does not wait for the bus.
    let (x, y) = (member(&r, "red"), member(&r, "red"));
    x.send(b"local");
    assert_eq!(y.recv(), b"local");
    assert_eq!(r.metric("udphub_cluster_connected"), 0.0);
}

/// A server that verifies clients refuses a relay without a client
/// certificate; the relay says which flags it lacks.
#[test]
fn a_relay_without_a_client_certificate_is_refused_by_a_verifying_server() {
    let pki = Pki::new();
    let nats = tls_server(&pki);
    let r = relay(
        &nats.tls_url(),
        "no-cert",
        &tls_flags(&pki, "ca.pem", false),
    );
    let line = r.expect_log("cannot connect to NATS");
    assert!(line.contains("--cluster-cert"), "{line}");
    assert_eq!(r.metric("udphub_cluster_connected"), 0.0);
}

/// Runs `udphub serve ARGS` that must fail at start: its exit code and
/// what it printed (bounded in time).
fn fails_at_start(args: &[&str]) -> (Option<i32>, String) {
    let mut child = Command::new(udphub_bin())
        .args(["serve", "--bind", "127.0.0.1:0", "--metrics", "off"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn udphub");
    let deadline = Instant::now() + PATIENCE;
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("udphub {args:?} did not exit at start");
        }
        thread::sleep(Duration::from_millis(10));
    };
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut err);
    }
    (status.code(), err)
}

/// A wrong path, a file that is not PEM, a file too big to be one, a
/// key that is not the certificate's: each a one-line error naming the
/// flag, exit 2, before anything is bound; the key's bytes never shown.
#[test]
fn bad_tls_files_stop_the_relay_at_start_naming_the_flag() {
    let pki = Pki::new();
    let url = "tls://127.0.0.1:4222";
    let not_pem = temp_path("not-pem");
    std::fs::write(&not_pem, "just some text\n").unwrap();
    let huge = temp_path("huge");
    std::fs::write(&huge, vec![b'-'; 2 << 20]).unwrap();
    let (not_pem, huge) = (
        not_pem.to_string_lossy().into_owned(),
        huge.to_string_lossy().into_owned(),
    );
    let key = std::fs::read_to_string(pki.path("server.key")).unwrap();
    let key_body = key.lines().nth(1).unwrap().to_string();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--cluster-ca".into(), "/nonexistent/ca.pem".into()],
            "--cluster-ca /nonexistent/ca.pem: ",
        ),
        (
            vec!["--cluster-ca".into(), not_pem.clone()],
            "no certificate in it",
        ),
        (
            vec!["--cluster-ca".into(), huge.clone()],
            "larger than 1024 KiB",
        ),
        (
            vec!["--cluster-cert".into(), pki.arg("client.pem")],
            "no private key in it: give the certificate's key with --cluster-cert-key",
        ),
        (
            vec![
                "--cluster-cert".into(),
                pki.arg("client.pem"),
                "--cluster-cert-key".into(),
                pki.arg("server.key"),
            ],
            "the key cannot be used with --cluster-cert",
        ),
        (
            vec![
                "--cluster-cert".into(),
                pki.arg("client.pem"),
                "--cluster-cert-key".into(),
                pki.arg("client.pem"),
            ],
            "no private key in it",
        ),
    ];
    for (flags, expect) in cases {
        let mut args = vec!["--cluster", url];
        args.extend(flags.iter().map(String::as_str));
        let (code, err) = fails_at_start(&args);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: one line: {err}");
        assert!(err.contains(expect), "{args:?}: {err}");
        assert!(!err.contains(&key_body), "{args:?}: the key leaked: {err}");
    }
    let (code, err) = fails_at_start(&["--cluster-ca", &pki.arg("ca.pem")]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("need --cluster"), "{err}");
    for p in [not_pem, huge] {
        let _ = std::fs::remove_file(p);
    }
}

/// A "server" that answers with garbage lines (over plain TCP, and where
/// a `tls://` URL expects NATS' INFO first): the relay is refused, says
/// so, keeps trying at most once a second, and its local rooms go on.
#[test]
fn a_server_that_sends_garbage_is_refused_and_the_relay_goes_on() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let port = listener.local_addr().expect("addr").port();
    let stop = Arc::new(AtomicBool::new(false));
    let served = {
        let stop = Arc::clone(&stop);
        thread::spawn(move || {
            let deadline = Instant::now() + PATIENCE * 4;
            let mut served = 0;
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline && served < 200 {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        served += 1;
                        let _ = s.set_nonblocking(false);
                        let _ =
                            s.write_all(b"\x16\x03\x01 not nats at all\r\nINFO {broken json\r\n");
                        let _ = s.write_all(&[0xAB; 4096]);
                        let _ = s.write_all(b"\r\n");
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
            served
        })
    };
    for url in [
        format!("nats://127.0.0.1:{port}"),
        format!("tls://127.0.0.1:{port}"),
    ] {
        let r = relay(&url, "garbage", &[]);
        let line = r.expect_log("cannot connect to NATS");
        assert!(line.contains(&format!("127.0.0.1:{port}")), "{line}");
        assert_eq!(r.metric("udphub_cluster_connected"), 0.0);
        let (x, y) = (member(&r, "red"), member(&r, "red"));
        x.send(b"still here");
        assert_eq!(y.recv(), b"still here");
    }
    stop.store(true, Ordering::Relaxed);
    assert!(served.join().expect("garbage server") >= 2);
}

/// A relay in the cluster `name`, logging in through `UDPHUB_CLUSTER`
/// (the password kept off the command line) with `url`.
fn user_relay(url: &str, name: &str, id: &str) -> RelayProc {
    spawn_relay_with(
        "127.0.0.1:0",
        true,
        &[("UDPHUB_CLUSTER", url)],
        &["--cluster-name", name, "--node-id", id, "--format", "raw"],
    )
}

/// deploy/nats/cluster-users.conf, as docs/CLUSTER.md shows it: relays of
/// cluster `eu` logged in as `eu` share a room; a relay logged in as `us`
/// (a user of another cluster) that claims to be of `eu` can neither
/// inject into its rooms nor hear them; a wrong password is refused; no
/// relay ever logs a password.
#[test]
fn a_user_of_another_cluster_cannot_inject_into_a_clusters_rooms() {
    let (eu_pw, us_pw) = ("eu-Secret-4f1c", "us-Secret-9b2e");
    let nats = Nats::start_with(
        &repo_file("deploy/nats/cluster-users.conf"),
        &[("EU_PASSWORD", eu_pw), ("US_PASSWORD", us_pw)],
    );
    let eu_url = format!("nats://eu:{eu_pw}@127.0.0.1:{}", nats.port);
    let a = user_relay(&eu_url, "eu", "eu-a");
    let b = user_relay(&eu_url, "eu", "eu-b");
    let intruder = user_relay(
        &format!("nats://us:{us_pw}@127.0.0.1:{}", nats.port),
        "eu",
        "us-x",
    );
    let wrong = user_relay(
        &format!("nats://eu:not-it@127.0.0.1:{}", nats.port),
        "eu",
        "eu-w",
    );
    for r in [&a, &b, &intruder] {
        r.wait_metric("udphub_cluster_connected", 1.0);
    }
    let (ma, mb, mx) = (
        member(&a, "red"),
        member(&b, "red"),
        member(&intruder, "red"),
    );
    until_connected(&ma, &[&mb]);
    until_connected(&mb, &[&ma]);
    // The server refuses the intruder's subscriptions (and publishes).
    intruder.expect_log("Permissions Violation");
    // The intruder's member talks while a's member probes b's: every probe
    // arrives, no injection ever does (each round gives an injection sent
    // before a probe the time of a probe's trip to arrive first).
    for i in 0..20 {
        mx.send(format!("injected {i}").as_bytes());
        ma.send(format!("probe {i}").as_bytes());
        assert_eq!(mb.recv(), format!("probe {i}").into_bytes(), "round {i}");
        assert_eq!(ma.recv(), format!("probe {i}").into_bytes(), "echo {i}");
    }
    mb.expect_silence();
    // Nor does the intruder hear the room: only its own member's echo.
    let heard: Vec<Vec<u8>> = std::iter::from_fn(|| mx.recv_within(Duration::from_millis(200)))
        .take(100)
        .collect();
    assert!(
        heard.iter().all(|d| d.starts_with(b"injected")),
        "the intruder heard {:?}",
        heard
            .iter()
            .map(|d| String::from_utf8_lossy(d).into_owned())
            .collect::<Vec<_>>()
    );
    let line = wrong.expect_log("cannot connect to NATS");
    assert!(line.contains("authorization violation"), "{line}");
    assert_eq!(wrong.metric("udphub_cluster_connected"), 0.0);
    for r in [&a, &b, &intruder, &wrong] {
        for l in log_lines(r) {
            assert!(
                !l.contains(eu_pw) && !l.contains(us_pw) && !l.contains("not-it"),
                "{l}"
            );
        }
    }
}

/// The permissions config docs/CLUSTER.md shows is the file the test
/// above runs nats-server with, byte for byte; the same for TLS.
#[test]
fn the_nats_configs_in_the_docs_are_the_tested_ones() {
    let doc = std::fs::read_to_string(repo_file("docs/CLUSTER.md")).expect("CLUSTER.md");
    for file in ["deploy/nats/cluster-users.conf", "deploy/nats/tls.conf"] {
        let conf = std::fs::read_to_string(repo_file(file)).expect(file);
        assert!(
            doc.contains(&format!("```text\n{conf}```")),
            "docs/CLUSTER.md must show {file} verbatim in a ```text block"
        );
    }
}
