//! The core replays: a recorded run of datagrams and timer calls, fed to
//! two fresh hubs with the same settings and key, gives the same effects
//! (kind, bytes, recipients in order, the next timer) and the same counts.
//!
//! Nothing here opens a socket: the hub is sans-I/O, and this is the
//! property that makes it so (no lock, no shared state, no clock of its
//! own). A recording is 10,000 datagrams from a seeded generator, with
//! their times: heartbeats, messages, timeout questions, joins with good,
//! wrong and expired tokens, cookies good and stale, hellos, quits, cut and
//! unanswerable datagrams, messages from elsewhere, and expiry calls.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use udphub::core::addr::RawAddr;
use udphub::core::admission::{Arrival, DropReason};
use udphub::core::cookie::CookieKey;
use udphub::core::counts::{Counts, Refusal};
use udphub::core::hub::{Effect, Hub, HubConfig};
use udphub::core::protocol::{self, Template};
use udphub::core::token::{self, Claims, RoomSecret};

/// Datagrams in a recording.
const DATAGRAMS: usize = 10_000;
/// The wall clock at the recording's start (unix seconds), for tokens.
const UNIX0: u64 = 1_700_000_000;
/// Rooms the generator joins (more than `--max-rooms` allows).
const ROOMS: [&str; 5] = ["r0", "r1", "r2", "ops.eu", "x"];

/// SplitMix64: a seeded generator, so a failing recording can be made again.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One recorded input, at `at_ms` after the start.
#[derive(Debug, Clone)]
struct Recorded {
    at_ms: u64,
    input: Input,
}

#[derive(Debug, Clone)]
enum Input {
    /// A datagram as the runtime reads it.
    Datagram {
        source: Option<RawAddr>,
        data: Vec<u8>,
        truncated: bool,
    },
    /// The runtime's timer: settle up to `budget` due entries.
    Expire { budget: usize },
    /// A message rendered at another loop or node, for a room.
    Elsewhere { room: Vec<u8>, payload: Vec<u8> },
}

fn secret() -> RoomSecret {
    RoomSecret::new(vec![b's'; 32]).expect("32 bytes")
}

/// Sources: 40 ports on each of three IPv4 addresses and one IPv6
/// address, each talking to one of two local addresses of the relay; a
/// quarter of the datagrams come from four chatty ones (over their rate).
fn source(rng: &mut Rng) -> RawAddr {
    let chatty = rng.below(4) == 0;
    let port = 4000 + rng.below(if chatty { 4 } else { 40 }) as u16;
    let addr: SocketAddr = match if chatty { 1 } else { rng.below(4) } {
        0 => (std::net::Ipv6Addr::LOCALHOST, port).into(),
        ip => ([127, 0, 0, ip as u8], port).into(),
    };
    RawAddr::from(addr).with_local(rng.below(2) as u8)
}

/// `^join^ROOM[^TOKEN]` with a token that is good, for another room,
/// expired, not valid yet, garbage, or missing.
fn join(rng: &mut Rng, unix: u64) -> Vec<u8> {
    let room = ROOMS[rng.below(ROOMS.len() as u64) as usize];
    let mut claims = Claims {
        room: room.into(),
        exp: unix + 30,
        nbf: None,
    };
    let token = match rng.below(10) {
        0 => Some(b"not.a.token".to_vec()),
        1 => None,
        2 => {
            claims.room = "elsewhere".into();
            Some(token::mint(&secret(), &claims).into_bytes())
        }
        3 => {
            claims.exp = unix.saturating_sub(120);
            Some(token::mint(&secret(), &claims).into_bytes())
        }
        4 => {
            claims.nbf = Some(unix + 600);
            Some(token::mint(&secret(), &claims).into_bytes())
        }
        _ => Some(token::mint(&secret(), &claims).into_bytes()),
    };
    let mut out = format!("^join^{room}").into_bytes();
    if let Some(t) = token {
        out.push(b'^');
        out.extend_from_slice(&t);
    }
    out
}

/// Pads `data` to a hello's length (so an unverified sender is answered).
fn padded(mut data: Vec<u8>) -> Vec<u8> {
    if data.len() < protocol::HELLO_LEN {
        data.resize(protocol::HELLO_LEN, b' ');
    }
    data
}

/// A recording of [`DATAGRAMS`] datagrams (and the timer calls between
/// them), from `seed`. Cookies are made with `key` at the instant they are
/// sent, as a client holding a fresh one would; some are another key's.
fn record(seed: u64, key: &CookieKey, t0: Instant) -> Vec<Recorded> {
    let mut rng = Rng(seed);
    let stranger = CookieKey::new([0xee; 32], t0);
    let mut out = Vec::with_capacity(DATAGRAMS * 11 / 10);
    let mut at_ms = 0u64;
    let mut datagrams = 0;
    while datagrams < DATAGRAMS {
        at_ms += rng.below(25);
        let now = t0 + Duration::from_millis(at_ms);
        let unix = UNIX0 + at_ms / 1000;
        let roll = rng.below(100);
        if roll < 6 {
            let budget = [1, 8, 64, usize::MAX][rng.below(4) as usize];
            out.push(Recorded {
                at_ms,
                input: Input::Expire { budget },
            });
            continue;
        }
        if roll < 8 {
            let room = ["", "r0", "r1", "nowhere"][rng.below(4) as usize];
            out.push(Recorded {
                at_ms,
                input: Input::Elsewhere {
                    room: room.as_bytes().to_vec(),
                    payload: format!("from elsewhere {at_ms}").into_bytes(),
                },
            });
            continue;
        }
        let from = source(&mut rng);
        let cookie = |k: &CookieKey| [protocol::COOKIE, &k.make(&from, now)[..]].concat();
        let data = match rng.below(20) {
            0..=3 => cookie(key),
            4 => [cookie(key), b"^quit".to_vec()].concat(),
            5 | 6 => [cookie(key), join(&mut rng, unix)].concat(),
            7 => join(&mut rng, unix),
            8 => padded(cookie(&stranger)),
            9 => padded(protocol::HELLO.to_vec()),
            10 => b"^hb^".to_vec(),
            11 => Vec::new(),
            12 => b"quit\n".to_vec(),
            13 => padded(protocol::TIMEOUT_QUERY.to_vec()),
            14 => (0..rng.below(80)).map(|_| rng.below(256) as u8).collect(),
            _ => format!("message {datagrams} at {at_ms}\n").into_bytes(),
        };
        let odd = rng.below(200);
        out.push(Recorded {
            at_ms,
            input: Input::Datagram {
                source: (odd != 0).then_some(from),
                data,
                truncated: odd == 1,
            },
        });
        datagrams += 1;
    }
    out
}

/// Feeds `recording` to a fresh hub made from `config` at `t0`; returns
/// every effect, written out, and the counts.
fn replay(config: &HubConfig, t0: Instant, recording: &[Recorded]) -> (String, Counts) {
    let mut hub = Hub::new(config, t0);
    let mut counts = Counts::default();
    let mut log = String::new();
    let addr = |a: &RawAddr| format!("{}/{}", a.to_socket_addr(), a.local());
    for (i, r) in recording.iter().enumerate() {
        let now = t0 + Duration::from_millis(r.at_ms);
        hub.set_unix_time(UNIX0 + r.at_ms / 1000);
        let _ = write!(log, "{i} @{}: ", r.at_ms);
        match &r.input {
            Input::Datagram {
                source,
                data,
                truncated,
            } => {
                let arrival = Arrival {
                    data,
                    source: *source,
                    truncated: *truncated,
                };
                match hub.handle(now, arrival, &mut counts) {
                    Effect::Nothing => log.push_str("nothing"),
                    Effect::Reply { to, bytes } => {
                        let _ = write!(log, "reply to {} {:?}", addr(&to), bytes);
                    }
                    Effect::Fanout(out) => {
                        let to: Vec<String> = out.recipients.map(addr).collect();
                        let _ = write!(
                            log,
                            "fanout {:?} {:?} to {to:?}",
                            out.room_name, out.payload
                        );
                    }
                }
            }
            Input::Expire { budget } => {
                let more = hub.expire(now, *budget, &mut counts);
                let _ = write!(log, "expire {budget}: more {more}");
            }
            Input::Elsewhere { room, payload } => match hub.find_room(room) {
                None => log.push_str("elsewhere: no such room here"),
                Some(id) => {
                    let out = hub.relay_from_elsewhere(now, id, payload);
                    let to: Vec<String> = out.recipients.map(addr).collect();
                    let _ = write!(log, "elsewhere {:?} to {to:?}", out.room_name);
                }
            },
        }
        let next = hub.next_timer().map(|t| t.duration_since(t0).as_nanos());
        let _ = writeln!(
            log,
            "; next timer {next:?}; {} clients, {} rooms",
            hub.clients(),
            hub.rooms()
        );
    }
    (log, counts)
}

/// The first line where two replays differ, for the failure message.
fn first_difference(a: &str, b: &str) -> String {
    a.lines().zip(b.lines()).find(|(x, y)| x != y).map_or_else(
        || "one log is a prefix of the other".into(),
        |(x, y)| format!("\n  {x}\n  {y}"),
    )
}

/// Records a run from `seed`, replays it twice, and checks that the two
/// agree; returns the counts.
fn replays_identically(config: &HubConfig, key: &CookieKey, t0: Instant, seed: u64) -> Counts {
    let recording = record(seed, key, t0);
    let (log_a, counts_a) = replay(config, t0, &recording);
    let (log_b, counts_b) = replay(config, t0, &recording);
    assert!(
        log_a == log_b,
        "two replays differ: {}",
        first_difference(&log_a, &log_b)
    );
    assert_eq!(counts_a, counts_b, "two replays count differently");
    assert_eq!(
        counts_a.received(),
        DATAGRAMS as u64,
        "each datagram counted once"
    );
    counts_a
}

/// The settings of both replays: verify mode with `key`, and the caps.
fn config(key: Option<CookieKey>, max_clients: usize, per_ip: u32) -> HubConfig {
    HubConfig {
        timeout: Duration::from_secs(2),
        format: Template::default(),
        echo: true,
        max_clients,
        expect_clients: 16,
        max_datagram: 1472,
        max_rooms: 3,
        max_room_clients: 8,
        room_secret: Some(secret()),
        lobby_open: true,
        cookie_key: key,
        cookie_rate: 5.0,
        client_rate: Some((2.0, 4.0)),
        max_clients_per_ip: Some(per_ip),
    }
}

/// Verify mode, with `--client-rate`, a room secret and every cap low
/// enough to be reached: 10,000 datagrams, replayed twice, agree to the
/// byte, and the run went through every path that matters.
#[test]
fn a_recorded_run_in_verify_mode_replays_identically() {
    let t0 = Instant::now();
    let key = CookieKey::new([7; 32], t0);
    let c = replays_identically(&config(Some(key.clone()), 100, 8), &key, t0, 0x5eed_0001);
    let dropped = |r: DropReason| c.dropped[r.index()];
    let refused = |r: Refusal| c.joins_refused[r.index()];
    for (what, n) in [
        ("messages", c.messages),
        ("heartbeats", c.heartbeats),
        ("joins accepted", c.joins_accepted),
        ("joins refused: token", refused(Refusal::Token)),
        ("joins refused: full", refused(Refusal::Full)),
        ("clients joined", c.clients_joined),
        ("clients expired", c.clients_expired),
        ("clients left", c.clients_left),
        ("unverified", dropped(DropReason::Unverified)),
        ("bad cookie", dropped(DropReason::BadCookie)),
        ("unproven", dropped(DropReason::Unproven)),
        ("rate limited", dropped(DropReason::RateLimited)),
        ("cookie budget", dropped(DropReason::CookieBudget)),
        ("over the per-IP cap", dropped(DropReason::IpFull)),
        ("oversize", dropped(DropReason::Oversize)),
        ("bad source", dropped(DropReason::BadSource)),
    ] {
        assert!(n > 0, "the recording never reached {what}: {c:?}");
    }
}

/// Without verify mode (v1 clients and rooms with tokens): the same.
#[test]
fn a_recorded_run_without_verify_mode_replays_identically() {
    let t0 = Instant::now();
    let key = CookieKey::new([7; 32], t0);
    let c = replays_identically(&config(None, 60, 20), &key, t0, 0x5eed_0002);
    let dropped = |r: DropReason| c.dropped[r.index()];
    for (what, n) in [
        ("messages", c.messages),
        ("joins accepted", c.joins_accepted),
        (
            "joins refused: full",
            c.joins_refused[Refusal::Full.index()],
        ),
        ("clients expired", c.clients_expired),
        ("clients left", c.clients_left),
        ("table full", dropped(DropReason::TableFull)),
        ("over the per-IP cap", dropped(DropReason::IpFull)),
        ("rate limited", dropped(DropReason::RateLimited)),
    ] {
        assert!(n > 0, "the recording never reached {what}: {c:?}");
    }
}
