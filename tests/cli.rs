//! A new user's mistakes, through the real binary: each one gets one line
//! on stderr that names what is wrong and how to fix it, and exit code 2.

mod util;

use std::process::{Command, Stdio};

use util::{spawn_relay, udphub_bin, Client};

/// Runs `udphub args…` and returns (exit code, stderr).
fn udphub(args: &[&str]) -> (Option<i32>, String) {
    let (code, _, stderr) = udphub_out(args);
    (code, stderr)
}

/// Asserts a usage error: exit 2, one line, containing every needle.
fn usage_error(args: &[&str], needles: &[&str]) {
    let (code, stderr) = udphub(args);
    assert_eq!(code, Some(2), "{args:?}: {stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}:\n{stderr}");
    for n in needles {
        assert!(stderr.contains(n), "{args:?}: {stderr:?} lacks {n:?}");
    }
}

/// A missing argument is named, with the usage line of that subcommand and
/// a pointer to that subcommand's --help.
#[test]
fn missing_arguments_are_named_with_the_subcommands_usage() {
    usage_error(
        &["send", "hello"],
        &[
            "--server <ADDR>",
            "usage: udphub send",
            "`udphub send --help`",
        ],
    );
    usage_error(&["chat"], &["--server <ADDR>", "`udphub chat --help`"]);
    usage_error(&["send", "--server", "127.0.0.1:9"], &["<MESSAGE>"]);
    usage_error(&["serve", "--bind"], &["--bind", "`udphub serve --help`"]);
}

/// `udphub` alone lists the commands; a near miss gets "did you mean".
#[test]
fn no_command_lists_the_commands_and_a_typo_gets_a_suggestion() {
    let (code, stderr) = udphub(&[]);
    assert_eq!(code, Some(2));
    for cmd in ["serve", "echo", "chat", "send"] {
        assert!(stderr.contains(&format!("  {cmd} ")), "{stderr}");
    }
    usage_error(&["server"], &["'serve'"]);
    usage_error(&["serve", "--bnd", "x"], &["'--bind'"]);
}

/// A log filter that is not a level or a directive is refused.
#[test]
fn a_bad_log_level_is_refused() {
    usage_error(
        &["serve", "--log-level", "loud", "--metrics", "off"],
        &["\"loud\" is not a level", "debug"],
    );
    usage_error(
        &["echo", "--log-level", "udphub=noisy"],
        &["\"noisy\" is not a level"],
    );
}

/// Each wrong part of an address is named.
#[test]
fn bind_addresses_say_which_part_is_wrong() {
    usage_error(
        &["serve", "--bind", "127.0.0.1"],
        &["no port", "127.0.0.1:9999"],
    );
    usage_error(&["serve", "--bind", "127.0.0.1:99999"], &["out of range"]);
    usage_error(
        &["serve", "--bind", "::1:9730"],
        &["brackets", "[::1]:9730"],
    );
    usage_error(&["serve", "--metrics", "127.0.0.1"], &["no port", "off"]);
    usage_error(&["echo", "--bind", "localhost"], &["no port", "50007"]);
    usage_error(
        &["send", "--server", "127.0.0.1", "x"],
        &["--server", "no port"],
    );
}

/// Host names are resolved for --bind, like the clients do.
#[test]
fn a_host_name_binds() {
    let relay = spawn_relay_with_bind("localhost:0");
    assert!(relay.addr.ip().is_loopback(), "{}", relay.addr);
}

fn spawn_relay_with_bind(bind: &str) -> util::RelayProc {
    util::spawn_relay_on(bind, true, &[])
}

/// Durations: a bare number is seconds, fractions too.
#[test]
fn fractional_seconds_are_a_duration() {
    let relay = spawn_relay(&["--timeout", "0.3"]);
    let _a = Client::joined(&relay);
    relay.wait_metric("udphub_clients_expired_total", 1.0);
    usage_error(&["serve", "--timeout", "soon"], &["not a duration", "0.5"]);
}

/// The config file: numbers of seconds work; wrong types and unquoted text
/// name the line, the key and what is expected.
#[test]
fn config_file_mistakes_name_the_line_and_key() {
    let dir = util::temp_path("cfg");
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_string()
    };
    let ok = write("ok.toml", "timeout = 30\nmetrics = \"off\"\n");
    let relay = util::spawn_relay_with("127.0.0.1:0", true, &[], &["--config", &ok]);
    drop(relay);

    let f = write("num.toml", "# limits\nmax-clients = \"200000\"\n");
    usage_error(
        &["serve", "--config", &f],
        &["line 2", "max-clients must be a whole number", "\"200000\""],
    );
    let f = write("bind.toml", "timeout = \"3s\"\nbind = 127.0.0.1:9740\n");
    usage_error(
        &["serve", "--config", &f],
        &["line 2", "bind = \"127.0.0.1:9740\""],
    );
    let f = write("key.toml", "max_clients = 5\n");
    usage_error(
        &["serve", "--config", &f],
        &["line 1", "unknown key `max_clients`", "max-clients"],
    );
}

/// Cluster flags: a bad URL or a cluster setting without `--cluster` is a
/// one-line error and exit 2, before anything is bound.
#[test]
fn cluster_mistakes_are_one_line() {
    usage_error(
        &["serve", "--cluster", "http://127.0.0.1:4222"],
        &["--cluster", "nats://"],
    );
    usage_error(&["serve", "--cluster", "127.0.0.1"], &["port"]);
    usage_error(
        &["serve", "--cluster-name", "eu", "--metrics", "off"],
        &["need --cluster"],
    );
    usage_error(
        &[
            "serve",
            "--cluster",
            "127.0.0.1:4222",
            "--cluster-name",
            "a.*",
            "--metrics",
            "off",
        ],
        &["--cluster-name"],
    );
}

/// Runs `udphub args…` and returns (exit code, stdout, stderr).
fn udphub_out(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(udphub_bin())
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("run udphub");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `serve --check-config` resolves flags, environment, file and secrets
/// like a start would, says so in one line, and exits without binding.
#[test]
fn check_config_validates_and_exits() {
    let file = util::temp_path("check.toml");
    std::fs::write(&file, "timeout = \"3s\"\nformat = \"raw\"\n").unwrap();
    let path = file.to_str().unwrap();
    // The default port may be taken by another test: nothing is bound.
    let (code, out, err) = udphub_out(&["serve", "--check-config", "--config", path]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(
        out.contains("valid") && out.contains("timeout 3s") && out.contains("format \"{body}\""),
        "{out}"
    );
    std::fs::write(&file, "timeout = \"3s\"\nmax-clients = 0\n").unwrap();
    usage_error(
        &["serve", "--check-config", "--config", path],
        &["--max-clients must be between 1"],
    );
    usage_error(
        &[
            "serve",
            "--check-config",
            "--room-secret-file",
            "/nonexistent/secret",
        ],
        &["cannot read --room-secret-file"],
    );
}

/// `serve --check-config` shows the warning a start would log: a bind
/// other hosts can reach, without `--public`, is named with the flag that
/// fixes it (nothing is bound: the check never binds). Loopback and
/// `--public` check quietly.
#[test]
fn check_config_shows_the_exposure_warning() {
    let (code, out, err) = udphub_out(&["serve", "--check-config", "--bind", "0.0.0.0:9999"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("valid"), "{out}");
    assert!(
        err.contains("warning")
            && err.contains("0.0.0.0:9999")
            && err.contains("other hosts can reach")
            && err.contains("--public"),
        "{err}"
    );
    for quiet in [
        &["--bind", "127.0.0.1:9999"][..],
        &["--bind", "0.0.0.0:9999", "--public"][..],
    ] {
        let mut args = vec!["serve", "--check-config"];
        args.extend_from_slice(quiet);
        let (code, _, err) = udphub_out(&args);
        assert_eq!(code, Some(0), "{quiet:?}: {err}");
        assert!(!err.contains("warning"), "{quiet:?}: {err}");
    }
}

/// `--log-format json`: every stderr line is one JSON object with named
/// fields.
#[test]
fn json_logs_are_one_object_per_line() {
    let relay = util::spawn_relay(&["--log-format", "json"]);
    let line = relay.expect_log("relaying on");
    let v: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
    assert_eq!(v["level"], "INFO", "{line}");
    assert!(v["timestamp"].is_string(), "{line}");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("udphub relaying on"),
        "{line}"
    );
    // The event's values as fields by name, not only in the message.
    assert_eq!(v["event"], "start", "{line}");
    assert_eq!(v["addr"], relay.addr.to_string(), "{line}");
    assert_eq!(v["timeout_ms"], 10_000, "{line}");
    assert_eq!(v["threads"], 1, "{line}");
    assert!(v["recv_buffer"].as_u64().unwrap() > 0, "{line}");
    assert_eq!(v["verify_sources"], false, "{line}");
    let line = relay.expect_log("metrics on");
    let v: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
    assert_eq!(v["event"], "metrics", "{line}");
    assert_eq!(v["addr"], relay.metrics.unwrap().to_string(), "{line}");
    relay.signal("HUP");
    let line = relay.expect_log("SIGHUP");
    let v: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
    assert!(v["message"].is_string(), "{line}");
    assert_eq!(v["event"], "reload", "{line}");
    let line = relay.expect_log("reload: nothing to change");
    let v: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
    assert_eq!(v["event"], "reload_applied", "{line}");
    relay.signal("TERM");
    let line = relay.expect_log("received signal");
    let v: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
    assert_eq!(v["signal"], 15, "{line}");
    let line = relay.expect_log("said bye");
    let v: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
    assert_eq!(
        (v["event"].as_str(), v["delivered"].as_u64()),
        (Some("bye"), Some(0)),
        "{line}"
    );
    usage_error(
        &["serve", "--log-format", "yaml"],
        &["--log-format", "text"],
    );
}

/// `--log-format json` lines beyond the start carry their values as
/// fields too, not only in `message`: the NATS server it cannot reach
/// (`url`, `reason`), the token a relay without a secret ignored, and a
/// reload's notes (each setting by name, with its running and wanted
/// values).
#[test]
fn json_logs_carry_each_events_values_as_fields() {
    let json = |line: &str| -> serde_json::Value {
        serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"))
    };
    let url = closed_nats_url();
    let config = util::temp_path("json.toml");
    std::fs::write(&config, "timeout = \"3s\"\n").unwrap();
    let relay = util::spawn_relay(&[
        "--log-format",
        "json",
        "--cluster",
        &url,
        "--config",
        config.to_str().unwrap(),
    ]);
    let line = relay.expect_log("cannot connect to NATS");
    let v = json(&line);
    assert_eq!(v["level"], "WARN", "{line}");
    assert_eq!(v["event"], "cluster_unreachable", "{line}");
    assert_eq!(v["url"], url.as_str(), "{line}");
    assert!(
        v["reason"]
            .as_str()
            .is_some_and(|r| r.contains("is nats-server running")),
        "{line}"
    );
    assert!(v["message"].as_str().unwrap().contains(&url), "{line}");

    let c = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    c.send_to(b"^join^red^not.checked.here                 ", relay.addr)
        .unwrap();
    let line = relay.expect_log("tokens are not checked");
    assert_eq!(json(&line)["event"], "tokens_ignored", "{line}");

    std::fs::write(&config, "timeout = \"5s\"\nmax-datagram = 512\n").unwrap();
    relay.signal("HUP");
    let line = relay.expect_log("needs a restart");
    let v = json(&line);
    assert_eq!(
        (v["event"].as_str(), v["setting"].as_str()),
        (Some("reload_refused"), Some("max-datagram")),
        "{line}"
    );
    assert_eq!(
        (v["running"].as_str(), v["wanted"].as_str()),
        (Some("1472"), Some("512")),
        "{line}"
    );
    let line = relay.expect_log("reload: applied");
    let v = json(&line);
    assert_eq!(v["event"], "reload_applied", "{line}");
    assert_eq!(v["settings"], "timeout", "{line}");
    assert_eq!(v["changed"], "timeout 3s → 5s", "{line}");
}

/// Shell completions and the man page come from the same definitions as
/// `--help`: every subcommand and flag is in them.
#[test]
fn completions_and_man_page_cover_every_command() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let (code, out, err) = udphub_out(&["completions", shell]);
        assert_eq!(code, Some(0), "{shell}: {err}");
        for word in ["serve", "check-config", "log-format", "completions"] {
            assert!(out.contains(word), "{shell} completion lacks {word}");
        }
    }
    let (_, bash, _) = udphub_out(&["completions", "bash"]);
    let file = util::temp_path("completion.bash");
    std::fs::write(&file, bash).unwrap();
    let syntax = Command::new("bash").arg("-n").arg(&file).status().unwrap();
    assert!(syntax.success(), "the bash completion does not parse");
    usage_error(&["completions", "tcsh"], &["tcsh", "bash"]);

    let (code, man, err) = udphub_out(&["man"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        man.starts_with(".ie") || man.starts_with(".TH"),
        "{man:.80}"
    );
    assert!(man.contains(".TH udphub 1"), "{man:.200}");
    for section in [
        "UDPHUB SERVE",
        "UDPHUB ECHO",
        "UDPHUB CHAT",
        "UDPHUB SEND",
        "UDPHUB TOKEN",
    ] {
        assert!(man.contains(section), "man page lacks {section}");
    }
    for flag in ["check\\-config", "UDPHUB_TIMEOUT", "room\\-secret\\-file"] {
        assert!(man.contains(flag), "man page lacks {flag}");
    }
}

/// `udphub token` refuses to mint a dead token and says how to mint a
/// live one; its errors name its own flag, `--secret-file`.
#[test]
fn token_refuses_lifetimes_that_mint_dead_tokens() {
    let secret = util::temp_path("token-secret");
    std::fs::write(&secret, format!("{}\n", "k".repeat(32))).unwrap();
    let secret = secret.to_str().unwrap();
    fn mint<'a>(ttl: &'a str, secret: &'a str) -> [&'a str; 7] {
        [
            "token",
            "--room",
            "red",
            "--ttl",
            ttl,
            "--secret-file",
            secret,
        ]
    }
    usage_error(
        &mint("-5m", secret),
        &["--ttl", "negative", "--ttl 5m", "--not-before"],
    );
    usage_error(
        &mint("0", secret),
        &["--ttl", "already expired", "at least 1s"],
    );
    usage_error(&mint("0s", secret), &["--ttl", "already expired"]);
    usage_error(&mint("400ms", secret), &["--ttl", "at least 1s"]);
    usage_error(&mint("100000y", secret), &["--ttl", "year 9999"]);
    usage_error(
        &[
            "token",
            "--room",
            "red",
            "--ttl",
            "1m",
            "--not-before",
            "1h",
            "--secret-file",
            secret,
        ],
        &["--not-before", "--ttl", "longer"],
    );
    // A --not-before past year 9999 is blamed on itself, not on --ttl
    // (found in review).
    let (code, err) = udphub(&[
        "token",
        "--room",
        "red",
        "--ttl",
        "1h",
        "--not-before",
        "100000y",
        "--secret-file",
        secret,
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("--not-before") && !err.contains("--ttl 1h"),
        "{err}"
    );
    usage_error(
        &[
            "token",
            "--room",
            "red",
            "--ttl",
            "1h",
            "--secret-file",
            "/nonexistent/secret",
        ],
        &["cannot read --secret-file /nonexistent/secret"],
    );
    let short = util::temp_path("short-secret");
    std::fs::write(&short, "short\n").unwrap();
    let (code, err) = udphub(&[
        "token",
        "--room",
        "red",
        "--ttl",
        "1h",
        "--secret-file",
        short.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("--secret-file") && !err.contains("--room-secret-file"),
        "{err}"
    );
    let (code, err) = udphub(&mint("1s", secret));
    assert_eq!(code, Some(0), "{err}");
}

/// A duplicate key in the config file is named with both lines, not
/// taken for a quoting mistake.
#[test]
fn a_duplicate_config_key_names_both_lines() {
    let f = util::temp_path("dup.toml");
    std::fs::write(&f, "timeout = 30\nmetrics = \"off\"\ntimeout = 5\n").unwrap();
    let f = f.to_str().unwrap();
    usage_error(
        &["serve", "--config", f],
        &["duplicate key `timeout`", "line 3, first on line 1"],
    );
    let (_, stderr) = udphub(&["serve", "--config", f]);
    assert!(!stderr.contains("need quotes"), "{stderr}");
}

/// Every subcommand that prints to stdout exits quietly when its reader
/// has gone (`udphub completions fish | head -3`): status 0, nothing on
/// stderr, no panic. The reader is a socket whose peer is closed, so
/// every write is refused (EPIPE), whatever the timing.
#[test]
fn printing_into_a_closed_pipe_exits_quietly() {
    use std::os::fd::OwnedFd;
    use std::os::unix::net::UnixStream;
    let secret = util::temp_path("pipe-secret");
    std::fs::write(&secret, "k".repeat(32)).unwrap();
    let secret = secret.to_str().unwrap();
    let runs: [&[&str]; 6] = [
        &["completions", "fish"],
        &["completions", "bash"],
        &["man"],
        &["serve", "--check-config", "--metrics", "off"],
        &[
            "token",
            "--room",
            "red",
            "--ttl",
            "1h",
            "--secret-file",
            secret,
        ],
        &["--help"],
    ];
    for args in runs {
        let (ours, theirs) = UnixStream::pair().unwrap();
        drop(theirs);
        let out = Command::new(udphub_bin())
            .args(args)
            .stdout(Stdio::from(OwnedFd::from(ours)))
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
        assert!(stderr.is_empty(), "{args:?}: {stderr}");
    }
}

/// The start log: private rooms announced with the lobby's state; capped
/// socket buffers at their default sizes are no WARN line.
#[test]
fn the_start_log_says_private_rooms_and_no_buffer_warnings() {
    let secret = util::temp_path("start-secret");
    std::fs::write(&secret, "k".repeat(32)).unwrap();
    let secret = secret.to_str().unwrap();
    let relay = spawn_relay(&["--room-secret-file", secret, "--lobby", "closed"]);
    let mut before = Vec::new();
    loop {
        let line = relay
            .log
            .recv_timeout(util::PATIENCE)
            .expect("a start line");
        if line.contains("relaying on") {
            break;
        }
        before.push(line);
    }
    for line in &before {
        assert!(!line.contains("WARN"), "{line}");
    }
    let note = relay.expect_log("private rooms");
    assert!(
        note.contains(secret) && note.contains("lobby is closed") && note.contains("udphub token"),
        "{note}"
    );
}

/// Starts `udphub serve` through `wrapper` (none, or setpriv) asking for
/// `asked` bytes of both buffers; returns the log lines up to and with the
/// start line.
fn start_lines(wrapper: &[&str], asked: usize) -> Vec<String> {
    let ready = util::temp_path("buffers-ready");
    let asked = asked.to_string();
    let mut cmd = Command::new(wrapper.first().copied().unwrap_or(udphub_bin()));
    if !wrapper.is_empty() {
        cmd.args(&wrapper[1..]).arg("--").arg(udphub_bin());
    }
    cmd.args(["serve", "--bind", "127.0.0.1:0", "--metrics", "off"])
        .args(["--log-level", "info", "--recv-buffer", &asked])
        .args(["--send-buffer", &asked, "--ready-file"])
        .arg(&ready)
        .env_remove("RUST_LOG");
    let (mut child, log, _) = util::spawn_until_ready(cmd, &ready);
    let mut lines = Vec::new();
    loop {
        let line = log.recv_timeout(util::PATIENCE).expect("a start line");
        let last = line.contains("relaying on");
        lines.push(line);
        if last {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    lines
}

/// Socket buffers past net.core.{r,w}mem_max: a relay with CAP_NET_ADMIN
/// gets the receive buffer it asked for (SO_RCVBUFFORCE); its send buffer
/// stays at the cap, never forced. One without the capability (setpriv
/// drops it) is capped on both. Each says at WARN what the kernel capped
/// and names the sysctl that lifts the cap.
#[test]
fn the_receive_buffer_is_forced_with_cap_net_admin_and_capped_without() {
    if !util::require_tool("setpriv") {
        return;
    }
    let (rmem, wmem) = (util::core_sysctl("rmem_max"), util::core_sysctl("wmem_max"));
    let asked = rmem.max(wmem) + (1 << 20);
    let capped_line = |lines: &[String]| {
        lines
            .iter()
            .find(|l| l.contains("WARN") && l.contains("capped by the kernel"))
            .cloned()
            .unwrap_or_else(|| panic!("no WARN line on capped buffers: {lines:#?}"))
    };
    if util::has_net_admin() {
        let lines = start_lines(&[], asked);
        let start = lines.last().unwrap();
        assert!(
            start.contains(&format!("SO_RCVBUF {asked} B, SO_SNDBUF {wmem} B")),
            "{lines:#?}"
        );
        let capped = capped_line(&lines);
        assert!(
            capped.contains("net.core.wmem_max") && !capped.contains("rmem_max"),
            "{capped}"
        );
    }
    let lines = start_lines(
        &[
            "setpriv",
            "--inh-caps=-net_admin",
            "--bounding-set=-net_admin",
        ],
        asked,
    );
    let start = lines.last().unwrap();
    assert!(
        start.contains(&format!("SO_RCVBUF {rmem} B, SO_SNDBUF {wmem} B")),
        "{lines:#?}"
    );
    let capped = capped_line(&lines);
    assert!(capped.contains("net.core.rmem_max"), "{capped}");
}

/// A NATS URL on a loopback port nothing listens on (bound, then closed).
fn closed_nats_url() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("nats://127.0.0.1:{port}")
}

/// `--cluster` to a NATS that is not running: the line names the URL and
/// asks whether nats-server runs there and whether the URL is right.
#[test]
fn a_cluster_without_nats_says_where_and_what_to_check() {
    let url = closed_nats_url();
    let relay = spawn_relay(&["--cluster", &url]);
    let line = relay.expect_log("cannot connect to NATS");
    assert!(
        line.contains(&url)
            && line.contains("is nats-server running")
            && line.contains("--cluster"),
        "{line}"
    );
}
