//! `loadtest abuse`: the nasty cases, one by one, and what the relay did
//! with each — what came back to the sender, and which of the relay's
//! counters moved (with `--metrics-url`). Ends with a liveness check.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;

use crate::metrics::Scrape;
use crate::report::{row, Common};

/// `loadtest abuse` flags.
#[derive(Debug, Clone, Args)]
pub struct AbuseArgs {
    /// Shared flags.
    #[command(flatten)]
    pub common: Common,

    /// How long to wait for replies to each case
    #[arg(long, default_value = "300ms", value_parser = crate::duration::parse)]
    pub wait: Duration,
}

/// What the relay did with one case.
#[derive(Debug, Clone, Serialize)]
pub struct CaseResult {
    /// The case.
    pub case: String,
    /// Bytes sent.
    pub sent_bytes: usize,
    /// Datagrams that came back to the sender.
    pub replies: usize,
    /// The first reply, lossy UTF-8, cut to 60 characters.
    pub first_reply: Option<String>,
    /// Relay counters that changed (with `--metrics-url`).
    pub counters: Vec<(String, f64)>,
}

/// The `abuse` report.
#[derive(Debug, Clone, Serialize)]
pub struct AbuseReport {
    /// "abuse".
    pub scenario: String,
    /// Each case.
    pub cases: Vec<CaseResult>,
    /// A normal message still got its echo afterwards.
    pub alive_after: bool,
}

/// The cases: a name and the datagram.
pub fn cases() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("empty datagram", Vec::new()),
        ("heartbeat ^hb^", b"^hb^".to_vec()),
        ("heartbeat with CRLF", b"^hb^\r\n".to_vec()),
        ("heartbeat padded", b"   ^hb^ \t".to_vec()),
        ("only a newline", b"\n".to_vec()),
        ("quit from a stranger", b"quit".to_vec()),
        ("QUIT in capitals", b"QUIT".to_vec()),
        ("non-UTF-8", b"\xff\xfe\xfd broken".to_vec()),
        ("NUL bytes", b"a\x00b\x00".to_vec()),
        ("terminal escape", b"\x1b[2J\x1b[Hcleared?".to_vec()),
        ("template injection", b"{body}{ip}{port}{{".to_vec()),
        ("pretend bye", b"bye".to_vec()),
        ("1472 bytes (the limit)", vec![b'x'; 1472]),
        ("1473 bytes (one over)", vec![b'y'; 1473]),
        ("65507 bytes (UDP max)", vec![b'z'; 65_507]),
        ("many newlines", vec![b'\n'; 500]),
    ]
}

/// Runs every case from a fresh socket (a stranger to the relay).
pub fn run(args: &AbuseArgs) -> Result<AbuseReport, String> {
    let c = &args.common;
    let relay = c.relay_addr()?;
    let local = if relay.is_ipv6() {
        "[::1]:0"
    } else {
        "127.0.0.1:0"
    };
    let mut results = Vec::new();
    let mut buf = vec![0u8; 65_536];
    for (name, data) in cases() {
        let before = c.scrape_optional()?;
        let sock = UdpSocket::bind(local).map_err(|e| e.to_string())?;
        sock.send_to(&data, relay)
            .map_err(|e| format!("{name}: {e}"))?;
        let (replies, first) = collect(&sock, args.wait, &mut buf);
        let counters = match (before, c.scrape_optional()?) {
            (Some(b), Some(a)) => changed(&Scrape::delta(&b, &a)),
            _ => Vec::new(),
        };
        // Leave, so later cases don't fan out to this socket, and give the
        // relay a moment so the leave isn't counted in the next case.
        let _ = sock.send_to(b"quit", relay);
        std::thread::sleep(Duration::from_millis(30));
        results.push(CaseResult {
            case: name.to_string(),
            sent_bytes: data.len(),
            replies,
            first_reply: first,
            counters,
        });
    }
    let alive_after = alive(relay, local, &mut buf);
    Ok(AbuseReport {
        scenario: "abuse".into(),
        cases: results,
        alive_after,
    })
}

fn collect(sock: &UdpSocket, wait: Duration, buf: &mut [u8]) -> (usize, Option<String>) {
    let deadline = Instant::now() + wait;
    let mut replies = 0;
    let mut first = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || sock.set_read_timeout(Some(left)).is_err() {
            break;
        }
        match sock.recv_from(buf) {
            Ok((n, _)) => {
                replies += 1;
                first.get_or_insert_with(|| {
                    String::from_utf8_lossy(&buf[..n])
                        .chars()
                        .take(60)
                        .collect()
                });
            }
            Err(_) => break,
        }
    }
    (replies, first)
}

/// The udphub counters that moved, without histogram internals.
fn changed(delta: &Scrape) -> Vec<(String, f64)> {
    delta
        .series
        .iter()
        .filter(|(k, v)| {
            **v != 0.0
                && k.starts_with("udphub_")
                && !k.contains("_bucket")
                && !k.contains("_sum")
                && !k.contains("_count")
                && !k.contains("loop_iteration")
        })
        .map(|(k, v)| (k.clone(), *v))
        .collect()
}

fn alive(relay: SocketAddr, local: &str, buf: &mut [u8]) -> bool {
    let Ok(sock) = UdpSocket::bind(local) else {
        return false;
    };
    for _ in 0..3 {
        let _ = sock.send_to(b"are you alive?", relay);
        let (n, first) = collect(&sock, Duration::from_millis(500), buf);
        if n > 0 && first.is_some_and(|f| f.starts_with("are you alive?")) {
            let _ = sock.send_to(b"quit", relay);
            return true;
        }
    }
    false
}

impl AbuseReport {
    /// The human-readable table.
    pub fn print_table(&self) {
        println!("abuse: what the relay did with each nasty datagram");
        for r in &self.cases {
            let reply = match (&r.first_reply, r.replies) {
                (_, 0) => "no reply".to_string(),
                (Some(f), n) => format!("{n} reply: {f:?}"),
                (None, n) => format!("{n} replies"),
            };
            let counters: Vec<String> = r
                .counters
                .iter()
                .map(|(k, v)| format!("{k} +{v}"))
                .collect();
            row(
                &r.case,
                format!(
                    "{reply}; {}",
                    if counters.is_empty() {
                        "-".into()
                    } else {
                        counters.join(", ")
                    }
                ),
            );
        }
        row("alive afterwards", self.alive_after.to_string());
    }
}
