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

    /// The relay is in verify mode (udphub --verify-sources): the members
    /// this scenario needs register with the cookie handshake
    #[arg(long)]
    pub verify: bool,

    /// Instead of the cases: forge N datagrams from 127.0.0.0/8 sources
    /// (raw socket: root or CAP_NET_RAW) and report the amplification
    /// factor, table slots gained and RSS growth. Without N: as many as the
    /// raw socket takes, for --duration
    #[arg(long, value_name = "N")]
    pub spoof: Option<Option<u64>>,

    /// With --spoof: distinct forged sources (the first --victims are bound
    /// listeners that count what they get)
    #[arg(long, default_value_t = 1, requires = "spoof")]
    pub sources: u64,

    /// With --spoof: spread the sources round robin over this many /24
    /// prefixes (127.1.0.0/24 upwards, hosts .1-.254, then more ports);
    /// without it they are consecutive addresses from 127.78.0.0
    #[arg(long, value_name = "P", requires = "spoof")]
    pub prefixes: Option<u32>,

    /// With --spoof: bound victims (127.77.0.1 upwards, at most 250)
    #[arg(long, default_value_t = 1, requires = "spoof")]
    pub victims: usize,

    /// With --spoof: a real member speaks once per this many forged
    /// datagrams (0: never)
    #[arg(long, default_value_t = 10, requires = "spoof")]
    pub talk_every: u64,

    /// With --spoof: what to forge [default: mix; hello with --newcomers]
    #[arg(long, value_enum, requires = "spoof")]
    pub forge: Option<crate::spoof::Forge>,

    /// With --spoof: forged datagrams per second (default: as fast as the
    /// raw socket takes them)
    #[arg(long, requires = "spoof")]
    pub rate: Option<f64>,

    /// With --spoof (no N) and --verify: during a flood of forged 64-byte
    /// `^hello^`s lasting --duration, K real newcomers on 127.0.0.1, their
    /// starts spread over the flood, do the cookie handshake; reports how
    /// many got in and how fast (the flood lasts until the last is done)
    #[arg(
        long,
        value_name = "K",
        requires = "spoof",
        conflicts_with = "talk_every"
    )]
    pub newcomers: Option<u32>,

    /// With --newcomers: a newcomer repeats its `^hello^` (or its proof)
    /// when nothing came back within this long (udphub chat asks again
    /// every 250ms)
    #[arg(long, default_value = "250ms", value_parser = crate::duration::parse, requires = "newcomers")]
    pub retry: Duration,

    /// With --newcomers: a newcomer not admitted this long after its first
    /// `^hello^` gives up and is counted as not admitted
    #[arg(long, default_value = "5s", value_parser = crate::duration::parse, requires = "newcomers")]
    pub give_up: Duration,
}

impl AbuseArgs {
    /// Refuses flag combinations that cannot be run, saying which flag
    /// makes it right (a usage error: exit code 2).
    pub fn check(&self) -> Result<(), String> {
        let Some(count) = self.spoof else {
            return Ok(());
        };
        crate::spoof::Sources::new(self.sources, self.prefixes)?;
        if self.newcomers.is_none() {
            return Ok(());
        }
        if let Some(n) = count {
            return Err(format!(
                "--newcomers floods for --duration (and until the last newcomer is done); drop the count from --spoof {n}"
            ));
        }
        if !self.verify {
            return Err(
                "--newcomers measures the cookie handshake of a relay in verify mode: add --verify (and run udphub with --verify-sources)".into(),
            );
        }
        if self.forge.is_some_and(|f| f != crate::spoof::Forge::Hello) {
            return Err(
                "--newcomers floods with `^hello^`s: drop --forge or use --forge hello".into(),
            );
        }
        if self.newcomers == Some(0) {
            return Err("--newcomers 0: measure at least one newcomer".into());
        }
        if self.retry.is_zero() {
            return Err(
                "--retry 0: a newcomer needs a moment between tries (udphub chat asks again every 250ms)"
                    .into(),
            );
        }
        Ok(())
    }

    /// The `--spoof` plan, if asked for (after [`AbuseArgs::check`]).
    pub fn spoof_plan(&self) -> Option<crate::spoof::Plan> {
        let datagrams = self.spoof?;
        let newcomers = self.newcomers.map(|count| crate::spoof::NewcomerPlan {
            count,
            retry: self.retry,
            give_up: self.give_up,
        });
        let default = if newcomers.is_some() {
            crate::spoof::Forge::Hello
        } else {
            crate::spoof::Forge::Mix
        };
        Some(crate::spoof::Plan {
            datagrams: datagrams.filter(|n| *n > 0),
            duration: self.common.duration,
            sources: self.sources,
            prefixes: self.prefixes,
            victims: self.victims,
            verify: self.verify,
            talk_every: self.talk_every,
            rate: self.rate,
            wait: self.wait,
            forge: self.forge.unwrap_or(default),
            newcomers,
        })
    }
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
    let alive_after = alive(relay, args.verify);
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
pub fn changed(delta: &Scrape) -> Vec<(String, f64)> {
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

/// A member (verify-aware) still gets the room's messages: it registers,
/// and a second member's message reaches it.
fn alive(relay: SocketAddr, verify: bool) -> bool {
    use crate::member::Member;
    let limit = Duration::from_secs(3);
    let (Ok(a), Ok(b)) = (
        Member::join(relay, verify, limit),
        Member::join(relay, verify, limit),
    ) else {
        return false;
    };
    let nonce = format!("are you alive? {}", std::process::id());
    let mut buf = vec![0u8; 65_536];
    let mut got = false;
    for _ in 0..3 {
        if b.send(nonce.as_bytes()).is_err() {
            break;
        }
        let contains = |d: &[u8]| d.windows(nonce.len()).any(|w| w == nonce.as_bytes());
        if a.recv_matching(&mut buf, Duration::from_millis(500), contains)
            .is_some()
        {
            got = true;
            break;
        }
    }
    a.leave();
    b.leave();
    got
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
