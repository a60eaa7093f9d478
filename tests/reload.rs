//! SIGHUP through the real binary: the live settings change without
//! dropping a client or a message, restart-only ones are refused and
//! named, a bad file keeps the running configuration, and a rotated room
//! secret takes effect.

mod util;

use std::process::Command;
use std::time::{Duration, Instant};
use util::{seed_format, spawn_until_ready, temp_path, udphub_bin, Client, RelayProc, PATIENCE};

/// Starts `udphub serve --config FILE` with only the addresses and the
/// ready file on the command line, so that everything else may be
/// reloaded from the file.
fn spawn_with_file(file: &std::path::Path) -> RelayProc {
    let ready = temp_path("reload-ready");
    let mut cmd = Command::new(udphub_bin());
    cmd.args(["serve", "--bind", "127.0.0.1:0", "--metrics", "127.0.0.1:0"])
        .arg("--config")
        .arg(file)
        .arg("--ready-file")
        .arg(&ready)
        .env_remove("RUST_LOG")
        .env_remove("UDPHUB_LOG_LEVEL");
    let (child, log, addrs) = spawn_until_ready(cmd, &ready);
    RelayProc {
        child,
        addr: addrs.udp,
        metrics: addrs.metrics,
        log,
    }
}

/// Waits until a reload has reached the loop: `a` sends `probe` until `b`
/// receives exactly `want` (the supervisor logs a reload when it hands it
/// over; the loop applies it between two batches, a moment later), then
/// drains both of what is left. Bounded by [`PATIENCE`].
fn until_applied(a: &Client, b: &Client, probe: &[u8], want: &[u8]) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        a.send(probe);
        if b.recv_within(Duration::from_millis(200)).as_deref() == Some(want) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the reload never reached the loop: no {want:?} for {probe:?}"
        );
    }
    for c in [a, b] {
        while c.recv_within(Duration::from_millis(300)).is_some() {}
    }
}

/// Writes the config file and sends SIGHUP.
fn reload(relay: &RelayProc, file: &std::path::Path, text: &str) {
    std::fs::write(file, text).unwrap();
    relay.signal("HUP");
}

#[test]
fn sighup_applies_live_settings_and_keeps_everyone() {
    let file = temp_path("reload.toml");
    std::fs::write(&file, "timeout = \"30s\"\nlog-level = \"info\"\n").unwrap();
    let relay = spawn_with_file(&file);
    let (a, b) = (Client::joined(&relay), Client::joined(&relay));

    // Live: format and max-clients; restart-only: the send buffer
    // (refused, kept).
    reload(
        &relay,
        &file,
        "timeout = \"20s\"\nformat = \"raw\"\nmax-clients = 2\nsend-buffer = 65536\nlog-level = \"info\"\n",
    );
    let refused = relay.expect_log("send-buffer 8388608 → 65536");
    assert!(
        refused.contains("needs a restart; keeping 8388608"),
        "{refused}"
    );
    let applied = relay.expect_log("reload: applied");
    assert!(
        applied.contains("timeout 30s → 20s") && applied.contains("max-clients 1000000 → 2"),
        "{applied}"
    );
    // Both are still members and get the new format.
    until_applied(&a, &b, b"after reload", b"after reload");
    a.send(b"after reload");
    assert_eq!(b.recv(), b"after reload");
    assert_eq!(a.recv(), b"after reload");
    // The lowered cap refuses a third client, and counts it.
    let c = Client::new(relay.addr);
    c.send(b"^hb^");
    relay.wait_metric("udphub_dropped_total{reason=\"table_full\"}", 1.0);
    a.send(b"two only");
    assert_eq!(b.recv(), b"two only");
    c.expect_silence();

    // A bad file: the running configuration stays, and the log says why.
    reload(&relay, &file, "timeout = \"never\"\n");
    let failed = relay.expect_log("reload failed, keeping the running configuration");
    assert!(failed.contains("timeout"), "{failed}");
    assert_eq!(relay.metric("udphub_config_last_reload_successful"), 0.0);
    assert_eq!(
        relay.metric("udphub_config_reloads_total{result=\"failed\"}"),
        1.0
    );
    a.send(b"still raw");
    assert_eq!(b.recv(), b"still raw");

    // The log level is live too: at warn, the next reload's info lines
    // are gone, its warnings are not.
    reload(
        &relay,
        &file,
        "timeout = \"20s\"\nformat = \"raw\"\nmax-clients = 2\nlog-level = \"warn\"\n",
    );
    relay.expect_log("log-level info → warn");
    reload(
        &relay,
        &file,
        "timeout = \"20s\"\nformat = \"<{body}>\"\nmax-clients = 2\nlog-level = \"warn\"\nrecv-buffer = 65536\n",
    );
    let line = relay.expect_log("recv-buffer");
    assert!(line.contains("needs a restart"), "{line}");
    until_applied(&a, &b, b"x", b"<x>");
    a.send(b"y");
    assert_eq!(b.recv(), b"<y>");
    let seen: Vec<String> = relay.log.try_iter().collect();
    assert!(
        !seen.iter().any(|l| l.contains("reload: applied")),
        "info lines at warn: {seen:?}"
    );
    assert_eq!(relay.metric("udphub_config_last_reload_successful"), 1.0);
    assert_eq!(
        relay.metric("udphub_config_reloads_total{result=\"applied\"}"),
        3.0
    );
    assert_eq!(relay.metric("udphub_clients"), 2.0);
}

/// A token for room `red`, signed with the secret in `path`.
fn token(path: &std::path::Path) -> String {
    let out = Command::new(udphub_bin())
        .args(["token", "--room", "red", "--ttl", "1h", "--secret-file"])
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[test]
fn a_rotated_room_secret_takes_effect_on_sighup() {
    let secret = temp_path("secret");
    std::fs::write(&secret, "a".repeat(32)).unwrap();
    let file = temp_path("reload-secret.toml");
    let config = format!("room-secret-file = {:?}\n", secret.display().to_string());
    std::fs::write(&file, &config).unwrap();
    let relay = spawn_with_file(&file);
    let old = token(&secret);
    let member = Client::new(relay.addr);
    member.send(format!("^join^red^{old}").as_bytes());
    assert_eq!(member.recv(), b"^room^red");

    // Rotate: a new secret in the same file.
    std::fs::write(&secret, "b".repeat(32)).unwrap();
    let new = token(&secret);
    reload(&relay, &file, &config);
    let applied = relay.expect_log("room secret: replaced");
    assert!(!applied.contains("bbbb"), "{applied}");
    let late = Client::new(relay.addr);
    late.send(format!("^join^red^{old}").as_bytes());
    assert_eq!(late.recv(), b"^denied^token");
    late.send(format!("^join^red^{new}").as_bytes());
    assert_eq!(late.recv(), b"^room^red");
    // Who joined before stays a member.
    late.send(b"hello red");
    assert_eq!(member.recv(), seed_format("hello red", late.addr()));

    // A secret file that became too short: refused, the running one kept.
    std::fs::write(&secret, "short").unwrap();
    reload(&relay, &file, &config);
    let failed = relay.expect_log("reload failed");
    assert!(failed.contains("room-secret-file"), "{failed}");
    let third = Client::new(relay.addr);
    third.send(format!("^join^red^{new}").as_bytes());
    assert_eq!(third.recv(), b"^room^red");
}
