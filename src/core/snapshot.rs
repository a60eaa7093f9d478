//! The relay's state as bytes, for a hand-over to a new process
//! (`udphub serve --takeover`): what each loop's hub exports, and the
//! bounded decoder the new process reads it back with.
//!
//! Fixed little-endian records behind a versioned header, hand-written
//! rather than serde: every length and count is checked against the
//! header and the receiver's `--max-clients` before anything is allocated,
//! and a checksum over the body refuses a snapshot damaged anywhere.
//! [`decode`] either returns a complete [`Snapshot`] or an error; the
//! caller builds fresh hubs from it and swaps them in, so a corrupt
//! snapshot is never half-applied.
//!
//! Layout (version 1):
//!
//! ```text
//! header   magic "UDPHUBSN" | version u16 | loops u16 | flags u32
//!          | members u64 | body_len u64 | checksum u64 (FNV-1a of the body)
//! body     [cookie: key [32] | age_ms u64]   (flags bit 0)
//!          per loop: count u32 | kernel_drops u32, then count members:
//!            family u8 (4|6) | ip [4|16] | port u16 | [scope_id u32 (v6)]
//!            | silent_ms u32 | tokens f32 | room_len u8 | room [room_len]
//! ```
//!
//! Pure: no I/O, no clock (ages are durations the caller measured).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::time::Duration;

use crate::core::rooms::{valid_name, MAX_NAME_LEN};

/// The first bytes of every snapshot.
pub const MAGIC: &[u8; 8] = b"UDPHUBSN";
/// The format written here; a decoder refuses any other (a new binary
/// that changes the layout bumps it, and an old one then refuses).
pub const VERSION: u16 = 1;
/// Bytes of the fixed header.
pub const HEADER_LEN: usize = 8 + 2 + 2 + 4 + 8 + 8 + 8;
/// The most loops a snapshot may carry (the relay's `--threads` cap).
pub const MAX_LOOPS: usize = 64;
/// The smallest member record (IPv4, lobby): what bounds a count against
/// the bytes that are really there before any allocation.
const MIN_MEMBER_LEN: usize = 1 + 4 + 2 + 4 + 4 + 1;
/// The largest member record (IPv6, a 64-byte room name).
pub const MAX_MEMBER_LEN: usize = 1 + 16 + 2 + 4 + 4 + 4 + 1 + MAX_NAME_LEN;
/// Flag: the body starts with verify mode's cookie key.
const FLAG_COOKIE: u32 = 1;

/// One member, as the new process needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    /// Its address (flow info is not part of a client's identity).
    pub addr: SocketAddr,
    /// Its room's name (empty: the lobby).
    pub room: Box<[u8]>,
    /// How long since it last proved itself alive (millisecond precision).
    pub silent: Duration,
    /// Its rate-limit bucket's tokens (finite, at least 0).
    pub tokens: f32,
}

/// Verify mode's cookie key, so cookies handed out stay valid.
#[derive(Clone, PartialEq, Eq)]
pub struct CookieState {
    /// The secret.
    pub key: [u8; 32],
    /// How long ago epoch 0 began (millisecond precision).
    pub age: Duration,
}

impl std::fmt::Debug for CookieState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CookieState(<redacted>, age {:?})", self.age)
    }
}

/// What one loop hands over.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LoopState {
    /// Its live members.
    pub members: Vec<Member>,
    /// The socket's cumulative kernel drop counter (SO_RXQ_OVFL) as this
    /// loop last counted it: the new process counts from there, so drops
    /// are neither counted twice nor missed across the hand-over.
    pub kernel_drops: u32,
}

/// Everything a relay hands over: one [`LoopState`] per loop, in socket
/// order (the loops' steering picks a loop by source, so loop *i*'s
/// members belong with socket *i*).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Snapshot {
    /// The cookie key, in verify mode.
    pub cookie: Option<CookieState>,
    /// Each loop's state.
    pub loops: Vec<LoopState>,
}

impl Snapshot {
    /// Members in every loop.
    pub fn members(&self) -> usize {
        self.loops.iter().map(|l| l.members.len()).sum()
    }
}

/// Why a snapshot was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotError {
    /// Shorter than its header says, or longer.
    Length(String),
    /// Not a snapshot (wrong magic) or another version.
    Format(String),
    /// The body does not match its checksum.
    Checksum,
    /// More members or loops than this relay takes.
    TooBig(String),
    /// A record that cannot be right (a bad family, room name, count).
    Record(String),
}

impl std::fmt::Display for SnapshotError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SnapshotError::Length(s) => write!(f, "snapshot length: {s}"),
            SnapshotError::Format(s) => write!(f, "not a snapshot this udphub reads: {s}"),
            SnapshotError::Checksum => f.write_str("snapshot checksum mismatch (damaged)"),
            SnapshotError::TooBig(s) => write!(f, "snapshot too big: {s}"),
            SnapshotError::Record(s) => write!(f, "bad snapshot record: {s}"),
        }
    }
}

impl std::error::Error for SnapshotError {}

/// FNV-1a, 64 bits, over the header's first 32 bytes (all but the
/// checksum) and the body: cheap enough for a million members inside the
/// pause, and any one damaged byte changes it (each step is a bijection).
/// The channel is a local socket only the relay's user can open: this
/// catches damage, it is no defence against a forger.
fn checksum(head: &[u8], body: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in head.iter().chain(body) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Where the checksum sits in the header.
const CHECKSUM_AT: usize = HEADER_LEN - 8;

/// Encodes `snapshot`. Ages are stored in whole milliseconds (saturating);
/// a room name longer than [`MAX_NAME_LEN`] cannot occur in a hub.
pub fn encode(snapshot: &Snapshot) -> Vec<u8> {
    let members = snapshot.members();
    let mut body = Vec::with_capacity(40 + snapshot.loops.len() * 8 + members * 32);
    if let Some(c) = &snapshot.cookie {
        body.extend_from_slice(&c.key);
        body.extend_from_slice(&millis(c.age).to_le_bytes());
    }
    for l in &snapshot.loops {
        body.extend_from_slice(&(l.members.len() as u32).to_le_bytes());
        body.extend_from_slice(&l.kernel_drops.to_le_bytes());
        for m in &l.members {
            match m.addr {
                SocketAddr::V4(a) => {
                    body.push(4);
                    body.extend_from_slice(&a.ip().octets());
                    body.extend_from_slice(&a.port().to_le_bytes());
                }
                SocketAddr::V6(a) => {
                    body.push(6);
                    body.extend_from_slice(&a.ip().octets());
                    body.extend_from_slice(&a.port().to_le_bytes());
                    body.extend_from_slice(&a.scope_id().to_le_bytes());
                }
            }
            let silent = u32::try_from(millis(m.silent)).unwrap_or(u32::MAX);
            body.extend_from_slice(&silent.to_le_bytes());
            body.extend_from_slice(&m.tokens.to_le_bytes());
            let room = &m.room[..m.room.len().min(MAX_NAME_LEN)];
            body.push(room.len() as u8);
            body.extend_from_slice(room);
        }
    }
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(snapshot.loops.len() as u16).to_le_bytes());
    let flags = if snapshot.cookie.is_some() {
        FLAG_COOKIE
    } else {
        0
    };
    out.extend_from_slice(&flags.to_le_bytes());
    out.extend_from_slice(&(members as u64).to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    let sum = checksum(&out, &body);
    out.extend_from_slice(&sum.to_le_bytes());
    out.extend_from_slice(&body);
    out
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// What a header says, read before the body arrives: the receiver checks
/// `total_len` against its own bound before reading that many bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Loops.
    pub loops: usize,
    /// Members in all.
    pub members: u64,
    /// Header and body together.
    pub total_len: usize,
}

/// Reads and checks the header alone: magic, version, at most
/// `max_members` members and [`MAX_LOOPS`] loops, and a body length that
/// such a count of members could need.
pub fn header(bytes: &[u8], max_members: usize) -> Result<Header, SnapshotError> {
    let mut r = Reader { bytes, at: 0 };
    let magic = r.take(MAGIC.len())?;
    if magic != MAGIC {
        return Err(SnapshotError::Format("wrong magic".into()));
    }
    let version = r.u16()?;
    if version != VERSION {
        return Err(SnapshotError::Format(format!(
            "version {version}, this udphub reads version {VERSION}: take over with a binary of the same snapshot version"
        )));
    }
    let loops = usize::from(r.u16()?);
    let flags = r.u32()?;
    let members = r.u64()?;
    let body_len = r.u64()?;
    if loops == 0 || loops > MAX_LOOPS {
        return Err(SnapshotError::TooBig(format!(
            "{loops} loops (1 to {MAX_LOOPS})"
        )));
    }
    if flags & !FLAG_COOKIE != 0 {
        return Err(SnapshotError::Format(format!("unknown flags {flags:#x}")));
    }
    if members > max_members as u64 {
        return Err(SnapshotError::TooBig(format!(
            "{members} members, more than --max-clients {max_members}: start the new process with --max-clients {members} or more"
        )));
    }
    let most = 40 + loops * 8 + (members as usize).saturating_mul(MAX_MEMBER_LEN);
    if body_len > most as u64 {
        return Err(SnapshotError::Length(format!(
            "a body of {body_len} bytes for {members} members (at most {most})"
        )));
    }
    Ok(Header {
        loops,
        members,
        total_len: HEADER_LEN + body_len as usize,
    })
}

/// Decodes a whole snapshot, refusing anything that does not add up:
/// see the module's layout. Never panics, whatever `bytes` holds; nothing
/// is allocated beyond what the bytes present can fill.
pub fn decode(bytes: &[u8], max_members: usize) -> Result<Snapshot, SnapshotError> {
    let head = header(bytes, max_members)?;
    if bytes.len() != head.total_len {
        return Err(SnapshotError::Length(format!(
            "{} bytes, the header says {}",
            bytes.len(),
            head.total_len
        )));
    }
    let flags = u32::from_le_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]);
    let sum = u64::from_le_bytes(
        bytes[CHECKSUM_AT..HEADER_LEN]
            .try_into()
            .map_err(|_| SnapshotError::Length("short header".into()))?,
    );
    let body = &bytes[HEADER_LEN..];
    if checksum(&bytes[..CHECKSUM_AT], body) != sum {
        return Err(SnapshotError::Checksum);
    }
    let mut r = Reader { bytes: body, at: 0 };
    let cookie = if flags & FLAG_COOKIE != 0 {
        let mut key = [0u8; 32];
        key.copy_from_slice(r.take(32)?);
        Some(CookieState {
            key,
            age: Duration::from_millis(r.u64()?),
        })
    } else {
        None
    };
    let mut loops = Vec::with_capacity(head.loops);
    let mut total = 0u64;
    for _ in 0..head.loops {
        let count = r.u32()? as usize;
        let kernel_drops = r.u32()?;
        total += count as u64;
        if total > head.members {
            return Err(SnapshotError::Record(format!(
                "more members in the loops than the header's {}",
                head.members
            )));
        }
        if count.saturating_mul(MIN_MEMBER_LEN) > r.left() {
            return Err(SnapshotError::Length(format!(
                "{count} members in {} bytes",
                r.left()
            )));
        }
        let mut members = Vec::with_capacity(count);
        for _ in 0..count {
            members.push(r.member()?);
        }
        loops.push(LoopState {
            members,
            kernel_drops,
        });
    }
    if total != head.members {
        return Err(SnapshotError::Record(format!(
            "{total} members in the loops, the header says {}",
            head.members
        )));
    }
    if r.left() != 0 {
        return Err(SnapshotError::Length(format!(
            "{} bytes after the last member",
            r.left()
        )));
    }
    Ok(Snapshot { cookie, loops })
}

/// A bounds-checked cursor.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn left(&self) -> usize {
        self.bytes.len() - self.at
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], SnapshotError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| SnapshotError::Length("cut short".into()))?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], SnapshotError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, SnapshotError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, SnapshotError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, SnapshotError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, SnapshotError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn member(&mut self) -> Result<Member, SnapshotError> {
        let addr = match self.u8()? {
            4 => {
                let ip = Ipv4Addr::from(self.array::<4>()?);
                SocketAddr::V4(SocketAddrV4::new(ip, self.u16()?))
            }
            6 => {
                let ip = Ipv6Addr::from(self.array::<16>()?);
                let port = self.u16()?;
                SocketAddr::V6(SocketAddrV6::new(ip, port, 0, self.u32()?))
            }
            f => return Err(SnapshotError::Record(format!("address family {f}"))),
        };
        if addr.port() == 0 {
            return Err(SnapshotError::Record(format!("{addr}: port 0")));
        }
        let silent = Duration::from_millis(u64::from(self.u32()?));
        let tokens = f32::from_le_bytes(self.array()?);
        if !tokens.is_finite() || tokens < 0.0 {
            return Err(SnapshotError::Record(format!("{addr}: tokens {tokens}")));
        }
        let len = usize::from(self.u8()?);
        let room = self.take(len)?;
        if !room.is_empty() && !valid_name(room) {
            return Err(SnapshotError::Record(format!("{addr}: a bad room name")));
        }
        Ok(Member {
            addr,
            room: room.into(),
            silent,
            tokens,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Snapshot {
        Snapshot {
            cookie: Some(CookieState {
                key: [7; 32],
                age: Duration::from_millis(123_456),
            }),
            loops: vec![
                LoopState {
                    members: vec![
                        Member {
                            addr: "127.0.0.1:4000".parse().unwrap(),
                            room: Box::from(&b""[..]),
                            silent: Duration::from_millis(5),
                            tokens: 3.5,
                        },
                        Member {
                            addr: "[::1%3]:4001".parse().unwrap(),
                            room: Box::from(&b"general"[..]),
                            silent: Duration::from_millis(9_999),
                            tokens: 0.0,
                        },
                    ],
                    kernel_drops: 7,
                },
                LoopState::default(),
            ],
        }
    }

    /// What is encoded decodes to the same snapshot.
    #[test]
    fn a_snapshot_round_trips() {
        let s = sample();
        let bytes = encode(&s);
        assert_eq!(decode(&bytes, 2).unwrap(), s);
        let empty = Snapshot {
            cookie: None,
            loops: vec![LoopState::default()],
        };
        assert_eq!(decode(&encode(&empty), 0).unwrap(), empty);
    }

    /// More members than the receiver's --max-clients is refused from the
    /// header alone, with the flag that fixes it.
    #[test]
    fn too_many_members_are_refused_naming_the_flag() {
        let err = decode(&encode(&sample()), 1).unwrap_err();
        assert!(err.to_string().contains("--max-clients"), "{err}");
    }

    /// Every single-bit flip and every truncation is refused.
    #[test]
    fn any_flipped_bit_or_cut_is_refused() {
        let bytes = encode(&sample());
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut b = bytes.clone();
                b[i] ^= 1 << bit;
                assert!(decode(&b, 100).is_err(), "byte {i} bit {bit}");
            }
            assert!(decode(&bytes[..i], 100).is_err(), "cut at {i}");
        }
    }

    /// A body that checks out but lies about its counts is refused.
    #[test]
    fn consistent_checksums_over_wrong_counts_are_refused() {
        let s = sample();
        let mut bytes = encode(&s);
        // Members in the header: 2 → 3 (the body still holds 2), the
        // checksum made again to match.
        bytes[16] = 3;
        let sum = checksum(&bytes[..CHECKSUM_AT], &bytes[HEADER_LEN..]);
        bytes[CHECKSUM_AT..HEADER_LEN].copy_from_slice(&sum.to_le_bytes());
        let err = decode(&bytes, 100).unwrap_err();
        assert!(err.to_string().contains("header says 3"), "{err}");
    }

    /// A snapshot from another version is refused, saying so.
    #[test]
    fn another_version_is_refused() {
        let mut bytes = encode(&sample());
        bytes[8] = 2;
        let err = decode(&bytes, 100).unwrap_err();
        assert!(err.to_string().contains("version 2"), "{err}");
    }

    fn member() -> impl Strategy<Value = Member> {
        (
            any::<bool>(),
            any::<[u8; 16]>(),
            1u16..,
            any::<u32>(),
            0u32..,
            0.0f32..1e6,
            prop::sample::select(vec!["", "a", "room-1", "x.y:z_"]),
        )
            .prop_map(|(v6, ip, port, scope, ms, tokens, room)| Member {
                addr: if v6 {
                    SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::from(ip), port, 0, scope))
                } else {
                    SocketAddr::V4(SocketAddrV4::new(
                        Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3]),
                        port,
                    ))
                },
                room: room.as_bytes().into(),
                silent: Duration::from_millis(u64::from(ms)),
                tokens,
            })
    }

    fn snapshot() -> impl Strategy<Value = Snapshot> {
        (
            prop::option::of((any::<[u8; 32]>(), 0u64..1 << 40)),
            prop::collection::vec((prop::collection::vec(member(), 0..8), any::<u32>()), 1..4),
        )
            .prop_map(|(cookie, loops)| Snapshot {
                cookie: cookie.map(|(key, ms)| CookieState {
                    key,
                    age: Duration::from_millis(ms),
                }),
                loops: loops
                    .into_iter()
                    .map(|(members, kernel_drops)| LoopState {
                        members,
                        kernel_drops,
                    })
                    .collect(),
            })
    }

    proptest! {
        /// Random snapshots round-trip.
        #[test]
        fn random_snapshots_round_trip(s in snapshot()) {
            prop_assert_eq!(decode(&encode(&s), 100).unwrap(), s);
        }

        /// Random bytes never panic the decoder and are refused (a valid
        /// snapshot needs the magic, the version and a matching checksum).
        #[test]
        fn random_bytes_are_refused(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            prop_assert!(decode(&bytes, 1_000_000).is_err());
        }

        /// Random bytes after a valid header never panic the decoder.
        #[test]
        fn a_valid_header_over_garbage_never_panics(
            garbage in prop::collection::vec(any::<u8>(), 0..512),
            members in 0u64..1000,
            loops in 0u16..70,
        ) {
            let mut bytes = Vec::new();
            bytes.extend_from_slice(MAGIC);
            bytes.extend_from_slice(&VERSION.to_le_bytes());
            bytes.extend_from_slice(&loops.to_le_bytes());
            bytes.extend_from_slice(&0u32.to_le_bytes());
            bytes.extend_from_slice(&members.to_le_bytes());
            bytes.extend_from_slice(&(garbage.len() as u64).to_le_bytes());
            let sum = checksum(&bytes, &garbage);
            bytes.extend_from_slice(&sum.to_le_bytes());
            bytes.extend_from_slice(&garbage);
            let _ = decode(&bytes, 1_000_000);
        }

        /// A damaged valid snapshot (any byte changed) is refused.
        #[test]
        fn a_damaged_snapshot_is_refused(s in snapshot(), at in any::<prop::sample::Index>(), x in 1u8..) {
            let mut bytes = encode(&s);
            let i = at.index(bytes.len());
            bytes[i] ^= x;
            prop_assert!(decode(&bytes, 100).is_err());
        }
    }
}
