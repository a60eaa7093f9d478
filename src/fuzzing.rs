//! Fuzzing entry points: what `fuzz/` (cargo-fuzz, libFuzzer) runs, and
//! what the stable corpus-replay test (`tests/fuzz_corpus.rs`) runs on the
//! committed corpus, so every CI run replays what the fuzzer found.
//!
//! Both take arbitrary bytes and must never panic; each checks the
//! invariants that should hold whatever the input.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::core::addr::RawAddr;
use crate::core::admission::Arrival;
use crate::core::cookie::CookieKey;
use crate::core::counts::Counts;
use crate::core::hub::{Effect, Hub, HubConfig};
use crate::core::protocol::{self, Kind, Template};
use crate::core::rooms;
use crate::core::token::{self, RoomSecret};

/// The datagram path's pure parts: classify, the control grammar, the
/// template, token and cookie parsing.
pub fn datagram(data: &[u8]) {
    let kind = protocol::classify(data);
    let body = protocol::body(data);
    match kind {
        Kind::Message(b) => assert_eq!(b, body),
        Kind::Join { room, .. } => {
            let _ = rooms::valid_name(room);
        }
        Kind::Cookie { body: b, .. } | Kind::Hello(b) => assert_eq!(b, body),
        Kind::Heartbeat | Kind::Quit | Kind::TimeoutQuery => {}
    }
    let _ = protocol::parse_timeout_answer(data);
    // The first bytes as a template, the rest as a body.
    let split = data.first().map_or(0, |&n| usize::from(n).min(data.len()));
    if let Ok(spec) = std::str::from_utf8(&data[..split]) {
        if let Ok(t) = Template::parse(spec) {
            let mut out = Vec::new();
            let from: RawAddr = SocketAddr::from(([127, 0, 0, 1], 9)).into();
            t.render(&data[split..], &from, &mut out);
            let from6: RawAddr = "[::1]:9"
                .parse::<SocketAddr>()
                .unwrap_or(SocketAddr::from(([0; 4], 0)))
                .into();
            t.render(&data[split..], &from6, &mut out);
        }
    }
    let secret = secret();
    let _ = token::verify(&secret, data, b"r", 1_000);
    let _ = token::peek(data);
    let born = Instant::now();
    let key = CookieKey::new([7; 32], born);
    let from: RawAddr = SocketAddr::from(([127, 0, 0, 1], 5)).into();
    assert!(!key.check(data, &from, born) || data == key.make(&from, born));
}

fn secret() -> RoomSecret {
    match RoomSecret::new(vec![b's'; 32]) {
        Ok(s) => s,
        Err(e) => unreachable!("a 32-byte secret is valid: {e}"),
    }
}

/// The whole hub, driven by a script: each step is `[what, source, len,
/// bytes…]` — a datagram from one of 16 sources (some with a valid cookie
/// or token prefixed), or time passing and expiry. Checks after each step
/// that every datagram was counted exactly once, that the table respects
/// its cap, and that every fan-out goes only to clients.
pub fn hub(script: &[u8]) {
    let t0 = Instant::now();
    let key = CookieKey::new([7; 32], t0);
    let verify = script.first().is_some_and(|b| b & 1 == 1);
    let config = HubConfig {
        timeout: Duration::from_millis(200),
        format: Template::default(),
        echo: script.first().is_some_and(|b| b & 2 == 0),
        max_clients: 8,
        expect_clients: 0,
        max_datagram: 1472,
        max_rooms: 3,
        max_room_clients: 4,
        room_secret: script.first().filter(|b| *b & 4 == 4).map(|_| secret()),
        lobby_open: script.first().is_none_or(|b| b & 8 == 0),
        cookie_key: verify.then(|| key.clone()),
        cookie_rate: 20.0,
        client_rate: script
            .first()
            .filter(|b| *b & 16 == 16)
            .map(|_| (50.0, 5.0)),
        max_clients_per_ip: script.first().filter(|b| *b & 32 == 32).map(|_| 6),
    };
    let mut hub = Hub::new(&config, t0);
    let unix = 1_000_000;
    hub.set_unix_time(unix);
    let mut counts = Counts::default();
    let mut now = t0;
    let mut datagrams = 0u64;
    let mut rest = script.get(1..).unwrap_or_default();
    let mut buf = Vec::new();
    while rest.len() >= 3 {
        let (what, port, len) = (rest[0], rest[1] % 16, usize::from(rest[2]));
        let take = len.min(rest.len() - 3);
        let bytes = &rest[3..3 + take];
        rest = &rest[3 + take..];
        let source: RawAddr =
            SocketAddr::from(([127, 0, 0, 1 + port / 8], 1000 + u16::from(port))).into();
        buf.clear();
        match what % 8 {
            0 => {
                now += Duration::from_millis(u64::from(port) * 20);
                hub.expire(now, 64, &mut counts);
                continue;
            }
            1 => {
                buf.extend_from_slice(protocol::COOKIE);
                buf.extend_from_slice(&key.make(&source, now));
            }
            2 => {
                let room = ["r0", "r1", "r2", "r3"][usize::from(port) % 4];
                buf.extend_from_slice(format!("^join^{room}^").as_bytes());
                let claims = token::Claims {
                    room: room.into(),
                    exp: unix + 60,
                    nbf: None,
                };
                buf.extend_from_slice(token::mint(&secret(), &claims).as_bytes());
            }
            _ => {}
        }
        buf.extend_from_slice(bytes);
        let arrival = Arrival {
            data: &buf,
            source: (what & 8 == 0).then_some(source),
            truncated: what & 16 == 16,
        };
        datagrams += 1;
        if let Effect::Fanout(out) = hub.handle(now, arrival, &mut counts) {
            assert!(out.payload.len() <= 1472 + 64);
            assert!(out.recipients.count() <= 8);
        }
        assert_eq!(
            counts.received(),
            datagrams,
            "a datagram not counted exactly once"
        );
        assert!(hub.clients() <= 8, "over --max-clients");
        assert!(hub.rooms() <= 3, "over --max-rooms");
    }
    let goodbye = hub.everyone(now).count();
    assert!(goodbye <= hub.clients());
}

/// The cluster's receiving side: batches taken apart, checked under a key
/// (or none) and run through one room's stream state ([`Inbox`]). The
/// script's first byte picks the receiver (bit 0: keyed); then each step is
/// `[what, len, bytes…]`: the bytes as a NATS message as they are (`what`
/// % 4 = 0), with a valid tag appended (1), or a batch built from them
/// (2: epoch, stream, seq and bodies from the bytes, signed when the
/// receiver is keyed; 3: the same with one byte flipped). Checks that
/// every body is delivered, a duplicate or oversized — exactly one of
/// them — that a built batch reads back as it was written, that a keyed
/// receiver takes nothing unsigned or altered, and that the stream state
/// stays bounded.
///
/// [`Inbox`]: crate::cluster::inbox::Inbox
pub fn cluster(script: &[u8]) {
    use crate::cluster::frame::{self, BatchWriter, Stamp};
    use crate::cluster::inbox::Inbox;
    use crate::cluster::keys::Keys;
    use crate::cluster::BusDrop;
    use crate::config::ClusterKey;

    let Ok(key) = ClusterKey::new(vec![b'k'; 32]) else {
        unreachable!("a 32-byte key is valid")
    };
    let keyed = script.first().is_some_and(|b| b & 1 == 1);
    let keys = Keys::new(keyed.then(|| key.clone()));
    let subject = "udphub.room.r";
    let mut inbox = Inbox::new(subject.into(), 64);
    let now = Instant::now();
    let unix = 1_000_000u64;
    let mut rest = script.get(1..).unwrap_or_default();
    while rest.len() >= 2 {
        let (what, len) = (rest[0], usize::from(rest[1]));
        let take = len.min(rest.len() - 2);
        let bytes = &rest[2..2 + take];
        rest = &rest[2 + take..];
        let mut msg = bytes.to_vec();
        let mut built: Option<Vec<Vec<u8>>> = None;
        match what % 4 {
            0 => {}
            1 => msg.extend_from_slice(&frame::tag(&key, subject, bytes)),
            _ => {
                let at = |i: usize| bytes.get(i).copied().unwrap_or(0);
                let stamp = Stamp {
                    epoch: u64::from(at(0) % 4),
                    stream: u32::from(at(1) % 4),
                    // Mostly small seqs (duplicates, gaps), sometimes far.
                    seq: if at(2) & 0x80 == 0 {
                        u64::from(at(2)) + 1
                    } else {
                        u64::MAX - u64::from(at(3)) * 4096
                    },
                };
                let bodies: Vec<Vec<u8>> = bytes
                    .get(4..)
                    .unwrap_or_default()
                    .chunks(usize::from(at(3) % 80) + 1)
                    .map(<[u8]>::to_vec)
                    .collect();
                let mut w = BatchWriter::default();
                w.begin(unix as u32, stamp, keyed);
                let mut st = stamp;
                let mut n = 0;
                for b in &bodies {
                    if !w.is_empty() && !w.fits(st, b.len()) {
                        break;
                    }
                    w.push(b);
                    st.seq = st.seq.wrapping_add(1);
                    n += 1;
                }
                if n == 0 {
                    continue;
                }
                msg = w.finish(keyed.then_some(&key), subject);
                let fits = stamp.seq.checked_add(n as u64).is_some();
                match frame::parse(&msg) {
                    Some(b) if fits => {
                        let read: Vec<&[u8]> = b.bodies.iter().map(|r| &msg[r.clone()]).collect();
                        assert_eq!(
                            read,
                            bodies[..n].iter().map(Vec::as_slice).collect::<Vec<_>>()
                        );
                    }
                    Some(_) => unreachable!("a batch running past u64::MAX parsed"),
                    None => assert!(!fits, "a built batch did not parse"),
                }
                if what % 4 == 3 && !msg.is_empty() {
                    let i = usize::from(at(0)) * 7 % msg.len();
                    msg[i] ^= 1 << (at(1) % 8);
                    built = None;
                } else {
                    built = Some(bodies[..n].to_vec());
                }
            }
        }
        let parsed = frame::parse(&msg).map(|b| b.bodies.len());
        let mut delivered = 0u64;
        let result = inbox.accept(&msg, &keys, now, unix, |r| {
            assert!(r.end <= msg.len() && r.len() <= 64);
            delivered += 1;
        });
        match result {
            Ok(t) => {
                let n = parsed.unwrap_or_else(|| unreachable!("an unparsable batch taken"));
                assert_eq!(t.delivered, delivered);
                assert_eq!(t.delivered + t.duplicate + t.oversized, n as u64);
                if keyed {
                    assert!(
                        built.is_some() || what % 4 == 1,
                        "a keyed receiver took an unsigned or altered batch"
                    );
                }
            }
            Err(BusDrop::Malformed) => assert!(parsed.is_none()),
            Err(_) => assert!(keyed, "a receiver without a key refused a batch"),
        }
        assert!(inbox.streams() <= frame::MAX_STREAMS);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn harnesses_take_anything() {
        datagram(b"");
        datagram(b"^join^r^x.y.z");
        datagram(b"\x05{body}hello");
        hub(b"");
        hub(&[
            0xff, 1, 3, 0, 2, 1, 0, 3, 2, 5, b'h', b'e', b'l', b'l', b'o', 0, 9, 0,
        ]);
    }
}
