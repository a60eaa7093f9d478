//! The relay's state as bytes, for a hand-over to a new process
//! (`udphub serve --takeover`): what each loop's hub exports, and the
//! bounded decoder the new process reads it back with.
//!
//! Fixed little-endian records behind a versioned header, hand-written
//! rather than serde: every length and count is checked against the
//! header and the receiver's `--max-clients` before anything is allocated,
//! and a checksum over the body refuses a snapshot damaged anywhere.
//! [`Received::check`] (and [`decode`], which also makes a [`Member`] of
//! each record) either accepts a snapshot checked in full, every record
//! of it, or refuses it; the caller builds fresh hubs from it and swaps
//! them in, so a corrupt snapshot is never half-applied.
//!
//! At a million members this all happens while no process reads the
//! relay's sockets, so the hot paths avoid a value per member: a loop
//! exports straight into its records ([`EncodedLoop`], in its own
//! thread), and the new process registers members from the checked bytes
//! ([`Received::members_of`], borrowed [`MemberRef`]s).
//!
//! Layout (version 2; version 1, still read, summed the same bytes with
//! byte-wise FNV-1a):
//!
//! ```text
//! header   magic "UDPHUBSN" | version u16 | loops u16 | flags u32
//!          | members u64 | body_len u64 | checksum u64 (word-wise FNV-1a)
//! body     [cookie: key [32] | age_ms u64]   (flags bit 0)
//!          [streams: rooms u32, then per room:  (flags bit 1)
//!            room_len u8 | room [room_len] | count u16, then count of
//!            epoch u64 | stream u32 | last u64 | verified u8 (0|1)]
//!          per loop: count u32 | kernel_drops u32, then count members:
//!            family u8 (4|6) | ip [4|16] | port u16 | [scope_id u32 (v6)]
//!            | silent_ms u32 | tokens f32 | room_len u8 | room [room_len]
//! ```
//!
//! The streams section is a clustered relay's receiving positions: per
//! room it is subscribed to, the last seq it delivered of each origin
//! stream, so that the process taking over drops what was delivered
//! already and delivers the rest (no gap, no duplicate: docs/CLUSTER.md,
//! "Hand-over"). A relay without `--cluster` writes none, and its snapshot
//! is the version-2 one the release before this reads.
//!
//! Pure: no I/O, no clock (ages are durations the caller measured).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::time::Duration;

use crate::core::rooms::{valid_name, MAX_NAME_LEN};

/// The first bytes of every snapshot.
pub const MAGIC: &[u8; 8] = b"UDPHUBSN";
/// The format written here (a new binary that changes the layout bumps
/// it, and an old one then refuses it, saying so).
pub const VERSION: u16 = 2;
/// The older format still read: the same layout summed byte by byte, so a
/// relay of the release before this one hands over to this one.
const VERSION_1: u16 = 1;
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
/// Flag: the body holds a streams section (a clustered relay's positions).
const FLAG_STREAMS: u32 = 2;
/// The most origin streams one room's positions hold: the cluster's own
/// bound per room (`cluster::frame::MAX_STREAMS`, 256) and the old
/// process's own streams, one per loop ([`MAX_LOOPS`]).
pub const MAX_ROOM_STREAMS: usize = 256 + MAX_LOOPS;
/// The most rooms a streams section holds (a relay subscribed to more
/// hands over the first this many; the rest start afresh).
pub const MAX_STREAM_ROOMS: usize = 1 << 20;
/// The most positions a streams section holds in all rooms together.
pub const MAX_STREAM_POSITIONS: usize = 1 << 20;
/// Bytes of one position record.
const POSITION_LEN: usize = 8 + 4 + 8 + 1;
/// Bytes of the smallest room entry in a streams section (the lobby, no
/// streams).
const MIN_ROOM_ENTRY: usize = 1 + 2;
/// The most bytes a streams section can take.
const MAX_STREAMS_SECTION: u64 = 4
    + (MAX_STREAM_ROOMS * (MIN_ROOM_ENTRY + MAX_NAME_LEN)) as u64
    + (MAX_STREAM_POSITIONS * POSITION_LEN) as u64;

/// Where a clustered relay is in one origin stream of one room: the last
/// seq it delivered (the cluster's dedup state, handed over).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamPosition {
    /// The origin process's epoch.
    pub epoch: u64,
    /// The stream (one room's life at the origin).
    pub stream: u32,
    /// The highest seq delivered.
    pub last: u64,
    /// Whether `last` came in a batch a cluster key verified.
    pub verified: bool,
}

/// One room's positions ([`StreamPosition`]), at most
/// [`MAX_ROOM_STREAMS`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RoomStreams {
    /// The room (empty: the lobby).
    pub room: Box<[u8]>,
    /// Its origin streams' positions.
    pub streams: Vec<StreamPosition>,
}

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

/// A [`Member`] borrowed: what a checked snapshot hands out without an
/// allocation per member ([`Received::members_of`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemberRef<'a> {
    /// See [`Member::addr`].
    pub addr: SocketAddr,
    /// See [`Member::room`].
    pub room: &'a [u8],
    /// See [`Member::silent`].
    pub silent: Duration,
    /// See [`Member::tokens`].
    pub tokens: f32,
}

impl MemberRef<'_> {
    /// The member, owned.
    pub fn to_owned(self) -> Member {
        Member {
            addr: self.addr,
            room: self.room.into(),
            silent: self.silent,
            tokens: self.tokens,
        }
    }
}

impl Member {
    /// The member, borrowed.
    pub fn as_ref(&self) -> MemberRef<'_> {
        MemberRef {
            addr: self.addr,
            room: &self.room,
            silent: self.silent,
            tokens: self.tokens,
        }
    }
}

impl LoopState {
    /// Its members, borrowed (what [`crate::core::hub::Hub::restore`] takes).
    pub fn iter(&self) -> impl Iterator<Item = MemberRef<'_>> + '_ {
        self.members.iter().map(Member::as_ref)
    }
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
    /// A clustered relay's receiving positions (none without `--cluster`).
    pub streams: Vec<RoomStreams>,
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

/// FNV-1a's step over 64-bit little-endian words (the last one padded
/// with zeros), across the header's first 32 bytes (all but the checksum)
/// and the body: a word per multiply, eight times the bytes a second of
/// version 1's byte-wise FNV-1a (which cost 25–30 ms a side at a million
/// members, inside the pause). Any damage confined to one word changes
/// it (each step is a bijection of the running value, and for a given
/// value, of the word); lengths are checked apart. The channel is a
/// local socket only the relay's user can open: this catches damage, it
/// is no defence against a forger.
fn checksum(head: &[u8], body: &[u8]) -> u64 {
    let mut h = Checksum::new();
    h.update(head);
    h.update(body);
    h.finish()
}

/// Version 1's checksum: FNV-1a byte by byte over the same bytes.
fn checksum_v1(head: &[u8], body: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in head.iter().chain(body) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// [`checksum`] fed in pieces of any size (a receiver sums the bytes as
/// they arrive).
#[derive(Debug, Clone)]
pub struct Checksum {
    /// The running value.
    h: u64,
    /// Bytes of a word not yet complete.
    pending: [u8; 8],
    /// How many of `pending` are filled.
    filled: usize,
}

impl Default for Checksum {
    fn default() -> Checksum {
        Checksum::new()
    }
}

impl Checksum {
    const PRIME: u64 = 0x0100_0000_01b3;

    /// Nothing summed yet.
    pub fn new() -> Checksum {
        Checksum {
            h: 0xcbf2_9ce4_8422_2325,
            pending: [0; 8],
            filled: 0,
        }
    }

    fn word(&mut self, w: [u8; 8]) {
        // A multiply only carries changes upward (bit k of the product
        // depends on bits 0..=k alone), so the high half is folded back
        // down each step: otherwise the same top-bit flip in two words
        // would cancel. Each step stays a bijection of the running value.
        let h = (self.h ^ u64::from_le_bytes(w)).wrapping_mul(Self::PRIME);
        self.h = h ^ (h >> 32);
    }

    /// Adds `bytes`.
    pub fn update(&mut self, mut bytes: &[u8]) {
        if self.filled > 0 {
            let n = (8 - self.filled).min(bytes.len());
            self.pending[self.filled..self.filled + n].copy_from_slice(&bytes[..n]);
            self.filled += n;
            bytes = &bytes[n..];
            if self.filled < 8 {
                return;
            }
            self.word(self.pending);
            self.filled = 0;
        }
        let mut words = bytes.chunks_exact(8);
        for w in &mut words {
            let mut a = [0u8; 8];
            a.copy_from_slice(w);
            self.word(a);
        }
        let rest = words.remainder();
        self.pending[..rest.len()].copy_from_slice(rest);
        self.filled = rest.len();
    }

    /// The checksum of everything added.
    pub fn finish(&self) -> u64 {
        let mut h = self.clone();
        if h.filled > 0 {
            let mut last = [0u8; 8];
            last[..h.filled].copy_from_slice(&h.pending[..h.filled]);
            h.word(last);
        }
        h.h
    }
}

/// Where the checksum sits in the header.
const CHECKSUM_AT: usize = HEADER_LEN - 8;

/// Encodes `snapshot`. Ages are stored in whole milliseconds (saturating);
/// a room name longer than [`MAX_NAME_LEN`] cannot occur in a hub.
pub fn encode(snapshot: &Snapshot) -> Vec<u8> {
    let loops: Vec<EncodedLoop> = snapshot.loops.iter().map(EncodedLoop::from).collect();
    let encoded = Encoded::with_streams(snapshot.cookie.as_ref(), &snapshot.streams, &loops);
    let mut out = Vec::with_capacity(encoded.len());
    for piece in encoded.pieces() {
        out.extend_from_slice(piece);
    }
    out
}

/// One loop's state encoded as a snapshot carries it: what a loop exports
/// in its own thread, straight from its table, with no [`Member`] made on
/// the way (72 bytes apiece, 72 MB to fault in and fill at a million).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EncodedLoop {
    /// The member records, back to back.
    records: Vec<u8>,
    /// How many.
    count: u32,
    /// See [`LoopState::kernel_drops`].
    pub kernel_drops: u32,
}

impl EncodedLoop {
    /// None yet, with room for `members` records of the smallest kind
    /// (IPv4, the lobby: what most are).
    pub fn with_capacity(members: usize) -> EncodedLoop {
        EncodedLoop {
            records: Vec::with_capacity(members.saturating_mul(MIN_MEMBER_LEN)),
            count: 0,
            kernel_drops: 0,
        }
    }

    /// Adds `m`'s record.
    pub fn push(&mut self, m: MemberRef<'_>) {
        put_member(&mut self.records, m);
        self.count = self.count.saturating_add(1);
    }

    /// Members recorded.
    pub fn members(&self) -> usize {
        self.count as usize
    }
}

impl From<&LoopState> for EncodedLoop {
    fn from(state: &LoopState) -> EncodedLoop {
        let mut out = EncodedLoop::with_capacity(state.members.len());
        for m in state.iter() {
            out.push(m);
        }
        out.kernel_drops = state.kernel_drops;
        out
    }
}

/// Encodes a snapshot of `loops` (in loop order) and verify mode's
/// `cookie` into one buffer ([`Encoded::pieces`], joined).
pub fn encode_loops(cookie: Option<&CookieState>, loops: &[EncodedLoop]) -> Vec<u8> {
    let encoded = Encoded::new(cookie, loops);
    let mut out = Vec::with_capacity(encoded.len());
    for piece in encoded.pieces() {
        out.extend_from_slice(piece);
    }
    out
}

/// A snapshot of the loops' records, encoded in pieces: the header and
/// cookie, then each loop's count and its records where the loop wrote
/// them. A hand-over writes the pieces to the socket one after another,
/// so 16 MB of records are not first copied into one buffer (and its
/// pages faulted in) while nobody reads.
#[derive(Debug)]
pub struct Encoded<'a> {
    /// The header (checksum included) and the cookie.
    head: Vec<u8>,
    /// Each loop's count and kernel drops.
    loop_heads: Vec<[u8; 8]>,
    /// The loops.
    loops: &'a [EncodedLoop],
}

impl<'a> Encoded<'a> {
    /// The snapshot of `loops` (in loop order) and verify mode's `cookie`.
    pub fn new(cookie: Option<&CookieState>, loops: &'a [EncodedLoop]) -> Encoded<'a> {
        Encoded::with_streams(cookie, &[], loops)
    }

    /// [`new`](Self::new), with a clustered relay's positions (`streams`;
    /// none writes no section). Beyond [`MAX_STREAM_ROOMS`] rooms,
    /// [`MAX_ROOM_STREAMS`] streams a room or [`MAX_STREAM_POSITIONS`] in
    /// all, the rest is left out (those streams start afresh at the
    /// receiver); a room name longer than [`MAX_NAME_LEN`] cannot occur.
    pub fn with_streams(
        cookie: Option<&CookieState>,
        streams: &[RoomStreams],
        loops: &'a [EncodedLoop],
    ) -> Encoded<'a> {
        let members: u64 = loops.iter().map(|l| u64::from(l.count)).sum();
        let mut head = vec![0u8; HEADER_LEN];
        if let Some(c) = cookie {
            head.extend_from_slice(&c.key);
            head.extend_from_slice(&millis(c.age).to_le_bytes());
        }
        if !streams.is_empty() {
            put_streams(&mut head, streams);
        }
        let loop_heads: Vec<[u8; 8]> = loops
            .iter()
            .map(|l| {
                let mut h = [0u8; 8];
                h[..4].copy_from_slice(&l.count.to_le_bytes());
                h[4..].copy_from_slice(&l.kernel_drops.to_le_bytes());
                h
            })
            .collect();
        let records: usize = loops.iter().map(|l| l.records.len()).sum();
        let body_len = (head.len() - HEADER_LEN + loops.len() * 8 + records) as u64;
        let mut flags = if cookie.is_some() { FLAG_COOKIE } else { 0 };
        if !streams.is_empty() {
            flags |= FLAG_STREAMS;
        }
        head[..8].copy_from_slice(MAGIC);
        head[8..10].copy_from_slice(&VERSION.to_le_bytes());
        head[10..12].copy_from_slice(&(loops.len() as u16).to_le_bytes());
        head[12..16].copy_from_slice(&flags.to_le_bytes());
        head[16..24].copy_from_slice(&members.to_le_bytes());
        head[24..32].copy_from_slice(&body_len.to_le_bytes());
        let mut sum = Checksum::new();
        sum.update(&head[..CHECKSUM_AT]);
        sum.update(&head[HEADER_LEN..]);
        for (h, l) in loop_heads.iter().zip(loops) {
            sum.update(h);
            sum.update(&l.records);
        }
        head[CHECKSUM_AT..HEADER_LEN].copy_from_slice(&sum.finish().to_le_bytes());
        Encoded {
            head,
            loop_heads,
            loops,
        }
    }

    /// Bytes in all.
    pub fn len(&self) -> usize {
        self.pieces().map(<[u8]>::len).sum()
    }

    /// Whether there are none (never: there is a header).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The snapshot's bytes, in order, in pieces.
    pub fn pieces(&self) -> impl Iterator<Item = &[u8]> + '_ {
        std::iter::once(&self.head[..]).chain(
            self.loop_heads
                .iter()
                .zip(self.loops)
                .flat_map(|(h, l)| [&h[..], &l.records[..]]),
        )
    }
}

/// Appends a streams section (see the module's layout), bounded.
fn put_streams(out: &mut Vec<u8>, streams: &[RoomStreams]) {
    let count_at = out.len();
    out.extend_from_slice(&0u32.to_le_bytes());
    let (mut rooms, mut positions) = (0u32, 0usize);
    for r in streams.iter().take(MAX_STREAM_ROOMS) {
        if r.room.len() > MAX_NAME_LEN {
            continue;
        }
        let n = r
            .streams
            .len()
            .min(MAX_ROOM_STREAMS)
            .min(MAX_STREAM_POSITIONS - positions);
        out.push(r.room.len() as u8);
        out.extend_from_slice(&r.room);
        out.extend_from_slice(&(n as u16).to_le_bytes());
        // The last ones: the most recently heard from, and the old
        // process's own streams, come last.
        for p in &r.streams[r.streams.len() - n..] {
            out.extend_from_slice(&p.epoch.to_le_bytes());
            out.extend_from_slice(&p.stream.to_le_bytes());
            out.extend_from_slice(&p.last.to_le_bytes());
            out.push(u8::from(p.verified));
        }
        positions += n;
        rooms += 1;
    }
    out[count_at..count_at + 4].copy_from_slice(&rooms.to_le_bytes());
}

/// Appends `m`'s record, built on the stack and copied in once.
fn put_member(out: &mut Vec<u8>, m: MemberRef<'_>) {
    let mut rec = [0u8; MAX_MEMBER_LEN];
    let mut at = 0;
    let mut put = |bytes: &[u8]| {
        rec[at..at + bytes.len()].copy_from_slice(bytes);
        at += bytes.len();
    };
    match m.addr {
        SocketAddr::V4(a) => {
            put(&[4]);
            put(&a.ip().octets());
            put(&a.port().to_le_bytes());
        }
        SocketAddr::V6(a) => {
            put(&[6]);
            put(&a.ip().octets());
            put(&a.port().to_le_bytes());
            put(&a.scope_id().to_le_bytes());
        }
    }
    let silent = u32::try_from(millis(m.silent)).unwrap_or(u32::MAX);
    put(&silent.to_le_bytes());
    put(&m.tokens.to_le_bytes());
    let room = &m.room[..m.room.len().min(MAX_NAME_LEN)];
    put(&[room.len() as u8]);
    put(room);
    out.extend_from_slice(&rec[..at]);
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
    /// The format's version ([`VERSION`], or the older one still read).
    pub version: u16,
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
    if version != VERSION && version != VERSION_1 {
        return Err(SnapshotError::Format(format!(
            "version {version}, this udphub reads versions {VERSION_1} and {VERSION}: take over with a binary that reads it (the same release or a newer one), or restart"
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
    if flags & !(FLAG_COOKIE | FLAG_STREAMS) != 0 {
        return Err(SnapshotError::Format(format!("unknown flags {flags:#x}")));
    }
    if members > max_members as u64 {
        return Err(SnapshotError::TooBig(format!(
            "{members} members, more than --max-clients {max_members}: start the new process with --max-clients {members} or more"
        )));
    }
    // (In u64: a crafted count must not overflow a 32-bit usize.)
    let streams = if flags & FLAG_STREAMS != 0 {
        MAX_STREAMS_SECTION
    } else {
        0
    };
    let most = 40 + streams + loops as u64 * 8 + members.saturating_mul(MAX_MEMBER_LEN as u64);
    if body_len > most {
        return Err(SnapshotError::Length(format!(
            "a body of {body_len} bytes for {members} members (at most {most})"
        )));
    }
    let total_len = usize::try_from(HEADER_LEN as u64 + body_len).map_err(|_| {
        SnapshotError::TooBig(format!(
            "a body of {body_len} bytes, more than this machine can hold"
        ))
    })?;
    Ok(Header {
        loops,
        members,
        total_len,
        version,
    })
}

/// Decodes a whole snapshot, refusing anything that does not add up:
/// see the module's layout. Never panics, whatever `bytes` holds; nothing
/// is allocated beyond what the bytes present can fill.
pub fn decode(bytes: &[u8], max_members: usize) -> Result<Snapshot, SnapshotError> {
    let Checked {
        cookie,
        streams,
        parts,
    } = check(bytes, max_members)?;
    let loops = parts
        .iter()
        .map(|p| LoopState {
            members: part_members(bytes, p).map(MemberRef::to_owned).collect(),
            kernel_drops: p.kernel_drops,
        })
        .collect();
    Ok(Snapshot {
        cookie,
        streams,
        loops,
    })
}

/// A snapshot checked in full, every record of it, and kept as the bytes
/// it came as (the default: none, no loops): what a process taking over registers its members from,
/// one loop at a time ([`Received::members_of`]), without first making a
/// [`Member`] of each (72 bytes apiece: 72 MB more to fault in and fill
/// at a million, inside the pause). As safe as [`decode`]: nothing is
/// handed out before all of it was checked.
#[derive(Debug, Default)]
pub struct Received {
    /// The whole snapshot, header included.
    bytes: Vec<u8>,
    /// The cookie key, in verify mode.
    cookie: Option<CookieState>,
    /// A clustered relay's receiving positions.
    streams: Vec<RoomStreams>,
    /// Where each loop's records lie in `bytes`.
    parts: Vec<Part>,
}

/// One loop's records in a checked snapshot.
#[derive(Debug, Clone)]
struct Part {
    /// Their bytes' range.
    records: std::ops::Range<usize>,
    /// How many.
    count: usize,
    /// The loop's kernel drop counter.
    kernel_drops: u32,
}

impl Received {
    /// Checks `bytes` as [`decode`] does, and keeps them.
    pub fn check(bytes: Vec<u8>, max_members: usize) -> Result<Received, SnapshotError> {
        let Checked {
            cookie,
            streams,
            parts,
        } = check(&bytes, max_members)?;
        Ok(Received {
            bytes,
            cookie,
            streams,
            parts,
        })
    }

    /// A clustered relay's receiving positions (none from a relay without
    /// `--cluster`).
    pub fn streams(&self) -> &[RoomStreams] {
        &self.streams
    }

    /// The cookie key, in verify mode.
    pub fn cookie(&self) -> Option<&CookieState> {
        self.cookie.as_ref()
    }

    /// Loops.
    pub fn loops(&self) -> usize {
        self.parts.len()
    }

    /// Members in every loop.
    pub fn members(&self) -> usize {
        self.parts.iter().map(|p| p.count).sum()
    }

    /// The snapshot's size in bytes.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Whether the snapshot is empty (never: a checked one has a header).
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Loop `i`'s kernel drop counter (see [`LoopState::kernel_drops`]).
    pub fn kernel_drops(&self, i: usize) -> u32 {
        self.parts.get(i).map_or(0, |p| p.kernel_drops)
    }

    /// Loop `i`'s members, in the order they were written.
    pub fn members_of(&self, i: usize) -> impl Iterator<Item = MemberRef<'_>> + '_ {
        let part = self.parts.get(i).cloned().unwrap_or(Part {
            records: 0..0,
            count: 0,
            kernel_drops: 0,
        });
        part_members(&self.bytes, &part)
    }
}

/// The members of `part` of the checked snapshot `bytes`. (Checked: the
/// records parse; were one not to, the iterator would stop there.)
fn part_members<'a>(bytes: &'a [u8], part: &Part) -> impl Iterator<Item = MemberRef<'a>> + 'a {
    let mut r = Reader {
        bytes: bytes.get(part.records.clone()).unwrap_or_default(),
        at: 0,
    };
    (0..part.count).map_while(move |_| r.member().ok())
}

/// What [`check`] found.
struct Checked {
    cookie: Option<CookieState>,
    streams: Vec<RoomStreams>,
    parts: Vec<Part>,
}

/// Checks a whole snapshot, every record of it (see [`decode`]), and
/// returns its cookie, its positions and where each loop's records lie.
fn check(bytes: &[u8], max_members: usize) -> Result<Checked, SnapshotError> {
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
    let summed = if head.version == VERSION_1 {
        checksum_v1(&bytes[..CHECKSUM_AT], body)
    } else {
        checksum(&bytes[..CHECKSUM_AT], body)
    };
    if summed != sum {
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
    let streams = if flags & FLAG_STREAMS != 0 {
        r.streams()?
    } else {
        Vec::new()
    };
    let mut parts = Vec::with_capacity(head.loops);
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
        let start = r.at;
        for _ in 0..count {
            r.member()?;
        }
        parts.push(Part {
            records: HEADER_LEN + start..HEADER_LEN + r.at,
            count,
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
    Ok(Checked {
        cookie,
        streams,
        parts,
    })
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

    #[inline]
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

    fn u16(&mut self) -> Result<u16, SnapshotError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, SnapshotError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, SnapshotError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// A streams section, checked: counts within the bounds and the bytes
    /// present, valid room names, each room once, flags 0 or 1.
    fn streams(&mut self) -> Result<Vec<RoomStreams>, SnapshotError> {
        let rooms = self.u32()? as usize;
        if rooms > MAX_STREAM_ROOMS || rooms.saturating_mul(MIN_ROOM_ENTRY) > self.left() {
            return Err(SnapshotError::Length(format!(
                "{rooms} rooms of positions in {} bytes (at most {MAX_STREAM_ROOMS})",
                self.left()
            )));
        }
        let mut out: Vec<RoomStreams> = Vec::with_capacity(rooms);
        let mut seen = std::collections::HashSet::with_capacity(rooms);
        let mut positions = 0usize;
        for _ in 0..rooms {
            let len = usize::from(self.array::<1>()?[0]);
            let room = self.take(len)?;
            if !room.is_empty() && !valid_name(room) {
                return Err(bad_record(format_args!("a bad room name in the positions")));
            }
            if !seen.insert(room) {
                return Err(bad_record(format_args!("a room twice in the positions")));
            }
            let count = usize::from(self.u16()?);
            positions += count;
            if count > MAX_ROOM_STREAMS || positions > MAX_STREAM_POSITIONS {
                return Err(SnapshotError::TooBig(format!(
                    "{count} streams in a room (at most {MAX_ROOM_STREAMS}), {positions} in all (at most {MAX_STREAM_POSITIONS})"
                )));
            }
            if count * POSITION_LEN > self.left() {
                return Err(SnapshotError::Length("positions cut short".into()));
            }
            let mut streams = Vec::with_capacity(count);
            for _ in 0..count {
                let epoch = self.u64()?;
                let stream = self.u32()?;
                let last = self.u64()?;
                let verified = match self.array::<1>()?[0] {
                    0 => false,
                    1 => true,
                    v => return Err(bad_record(format_args!("a position flag {v}"))),
                };
                streams.push(StreamPosition {
                    epoch,
                    stream,
                    last,
                    verified,
                });
            }
            out.push(RoomStreams {
                room: room.into(),
                streams,
            });
        }
        Ok(out)
    }

    /// One member record. Read twice a hand-over (checked, then
    /// registered) for each of up to a million members: the fixed part is
    /// taken in one piece and read at fixed offsets, and the errors are
    /// made out of line.
    #[inline]
    fn member(&mut self) -> Result<MemberRef<'a>, SnapshotError> {
        let family = *self
            .bytes
            .get(self.at)
            .ok_or_else(|| SnapshotError::Length("cut short".into()))?;
        // family | ip | port | [scope_id] | silent_ms | tokens | room_len
        let (addr, rest) = match family {
            4 => {
                let f = self.take(1 + 4 + 2 + 4 + 4 + 1)?;
                let ip = Ipv4Addr::new(f[1], f[2], f[3], f[4]);
                let port = u16::from_le_bytes([f[5], f[6]]);
                (SocketAddr::V4(SocketAddrV4::new(ip, port)), &f[7..])
            }
            6 => {
                let f = self.take(1 + 16 + 2 + 4 + 4 + 4 + 1)?;
                let mut ip = [0u8; 16];
                ip.copy_from_slice(&f[1..17]);
                let port = u16::from_le_bytes([f[17], f[18]]);
                let scope = u32::from_le_bytes([f[19], f[20], f[21], f[22]]);
                let addr = SocketAddrV6::new(Ipv6Addr::from(ip), port, 0, scope);
                (SocketAddr::V6(addr), &f[23..])
            }
            f => return Err(bad_record(format_args!("address family {f}"))),
        };
        if addr.port() == 0 {
            return Err(bad_record(format_args!("{addr}: port 0")));
        }
        let silent = Duration::from_millis(u64::from(u32::from_le_bytes([
            rest[0], rest[1], rest[2], rest[3],
        ])));
        let tokens = f32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
        if !tokens.is_finite() || tokens < 0.0 {
            return Err(bad_record(format_args!("{addr}: tokens {tokens}")));
        }
        let room = self.take(usize::from(rest[8]))?;
        if !room.is_empty() && !valid_name(room) {
            return Err(bad_record(format_args!("{addr}: a bad room name")));
        }
        Ok(MemberRef {
            addr,
            room,
            silent,
            tokens,
        })
    }
}

/// A record that cannot be right (out of line: never on the fast path).
#[cold]
fn bad_record(why: std::fmt::Arguments<'_>) -> SnapshotError {
    SnapshotError::Record(why.to_string())
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
            streams: vec![
                RoomStreams {
                    room: Box::from(&b""[..]),
                    streams: vec![StreamPosition {
                        epoch: u64::MAX,
                        stream: 3,
                        last: 99,
                        verified: true,
                    }],
                },
                RoomStreams {
                    room: Box::from(&b"general"[..]),
                    streams: vec![],
                },
            ],
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
            streams: vec![],
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

    /// A version 1 snapshot (the release before: the same layout, summed
    /// byte by byte) is still read, and damage to it still refused.
    #[test]
    fn a_version_1_snapshot_is_read() {
        let s = sample();
        let mut bytes = encode(&s);
        bytes[8..10].copy_from_slice(&VERSION_1.to_le_bytes());
        let sum = checksum_v1(&bytes[..CHECKSUM_AT], &bytes[HEADER_LEN..]);
        bytes[CHECKSUM_AT..HEADER_LEN].copy_from_slice(&sum.to_le_bytes());
        assert_eq!(decode(&bytes, 2).unwrap(), s);
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        assert_eq!(decode(&bytes, 2), Err(SnapshotError::Checksum));
    }

    /// The checksum fed in pieces of any size is the checksum of the whole.
    #[test]
    fn a_checksum_in_pieces_is_the_whole_one() {
        let bytes: Vec<u8> = (0..100u8).collect();
        let whole = checksum(&bytes[..CHECKSUM_AT], &bytes[CHECKSUM_AT..]);
        for cut in [1, 3, 7, 8, 9, 15] {
            let mut c = Checksum::new();
            for piece in bytes.chunks(cut) {
                c.update(piece);
            }
            assert_eq!(c.finish(), whole, "pieces of {cut}");
        }
    }

    /// The same bit flipped in two words is refused (a multiply alone
    /// would let the two cancel).
    #[test]
    fn the_same_damage_in_two_words_is_refused() {
        // Bit 63 flipped in two words (a multiply alone lets that cancel).
        let bytes = encode(&sample());
        for a in (HEADER_LEN..bytes.len() - 16).step_by(8) {
            for bit in [7u8, 6] {
                let mut b = bytes.clone();
                b[a + 7] ^= 1 << bit;
                b[a + 15] ^= 1 << bit;
                assert!(decode(&b, 100).is_err(), "at {a}, bit {bit}");
            }
        }
    }

    /// Several bytes of one 8-byte word damaged at once are refused too.
    #[test]
    fn a_damaged_word_is_refused() {
        let bytes = encode(&sample());
        for at in HEADER_LEN..bytes.len() - 3 {
            let mut b = bytes.clone();
            b[at] ^= 0x55;
            b[at + 1] ^= 0xaa;
            b[at + 3] ^= 0x01;
            assert!(decode(&b, 100).is_err(), "at {at}");
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

    /// A streams section that does not add up is refused, whatever its
    /// checksum: a bad position flag, a room twice, a bad room name, more
    /// streams than a room may have. A relay without `--cluster` writes
    /// no section (the flag clear), as the release before this did.
    #[test]
    fn bad_positions_are_refused() {
        let reseal = |bytes: &mut Vec<u8>| {
            let sum = checksum(&bytes[..CHECKSUM_AT], &bytes[HEADER_LEN..]);
            bytes[CHECKSUM_AT..HEADER_LEN].copy_from_slice(&sum.to_le_bytes());
        };
        let s = sample();
        let good = encode(&s);
        // The section starts after the cookie (40 bytes): rooms u32, then
        // the lobby: len 0 | count 1 | epoch | stream | last | verified.
        let at = HEADER_LEN + 40;
        assert_eq!(&good[at..at + 4], &2u32.to_le_bytes());
        let flag = at + 4 + 1 + 2 + 20;
        assert_eq!(good[flag], 1);
        let mut bytes = good.clone();
        bytes[flag] = 2;
        reseal(&mut bytes);
        assert!(decode(&bytes, 100)
            .unwrap_err()
            .to_string()
            .contains("position flag 2"));
        // The second room renamed to the first's name (the lobby: len 0 is
        // shorter, so rename the lobby's entry instead: "general" twice).
        let twice = Snapshot {
            streams: vec![s.streams[1].clone(), s.streams[1].clone()],
            ..s.clone()
        };
        let err = decode(&encode(&twice), 100).unwrap_err();
        assert!(err.to_string().contains("room twice"), "{err}");
        let bad_name = Snapshot {
            streams: vec![RoomStreams {
                room: Box::from(&b"a b"[..]),
                streams: vec![],
            }],
            ..s.clone()
        };
        let err = decode(&encode(&bad_name), 100).unwrap_err();
        assert!(err.to_string().contains("bad room name"), "{err}");
        let mut bytes = good.clone();
        bytes[at + 5..at + 7].copy_from_slice(&(MAX_ROOM_STREAMS as u16 + 1).to_le_bytes());
        reseal(&mut bytes);
        assert!(decode(&bytes, 100).is_err());
        let none = Snapshot {
            streams: vec![],
            ..s
        };
        let bytes = encode(&none);
        assert_eq!(bytes[12] & FLAG_STREAMS as u8, 0);
        assert_eq!(decode(&bytes, 100).unwrap(), none);
    }

    /// A snapshot from another version is refused, saying so.
    #[test]
    fn another_version_is_refused() {
        let mut bytes = encode(&sample());
        for other in [0, 3] {
            bytes[8] = other;
            let err = decode(&bytes, 100).unwrap_err();
            assert!(
                err.to_string().contains(&format!("version {other}")),
                "{err}"
            );
        }
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

    fn room_streams() -> impl Strategy<Value = Vec<RoomStreams>> {
        let position = (any::<u64>(), any::<u32>(), any::<u64>(), any::<bool>()).prop_map(
            |(epoch, stream, last, verified)| StreamPosition {
                epoch,
                stream,
                last,
                verified,
            },
        );
        prop::collection::vec(prop::collection::vec(position, 0..4), 0..4).prop_map(|rooms| {
            rooms
                .into_iter()
                .enumerate()
                .map(|(i, streams)| RoomStreams {
                    room: if i == 0 {
                        Box::from(&b""[..])
                    } else {
                        format!("r{i}").into_bytes().into()
                    },
                    streams,
                })
                .collect()
        })
    }

    fn snapshot() -> impl Strategy<Value = Snapshot> {
        (
            prop::option::of((any::<[u8; 32]>(), 0u64..1 << 40)),
            room_streams(),
            prop::collection::vec((prop::collection::vec(member(), 0..8), any::<u32>()), 1..4),
        )
            .prop_map(|(cookie, streams, loops)| Snapshot {
                cookie: cookie.map(|(key, ms)| CookieState {
                    key,
                    age: Duration::from_millis(ms),
                }),
                streams,
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

        /// A snapshot checked in place hands out what [`decode`] makes,
        /// and a loop encoded in its own thread ([`EncodedLoop`]) is what
        /// the whole encoder writes.
        #[test]
        fn checked_in_place_is_decoded(s in snapshot()) {
            let bytes = encode(&s);
            let received = Received::check(bytes.clone(), 100).unwrap();
            prop_assert_eq!(received.len(), bytes.len());
            prop_assert_eq!(received.loops(), s.loops.len());
            prop_assert_eq!(received.members(), s.members());
            for (i, l) in s.loops.iter().enumerate() {
                let members: Vec<Member> = received.members_of(i).map(MemberRef::to_owned).collect();
                prop_assert_eq!(&members, &l.members);
                prop_assert_eq!(received.kernel_drops(i), l.kernel_drops);
            }
            prop_assert_eq!(received.streams(), &s.streams[..]);
            let parts: Vec<EncodedLoop> = s.loops.iter().map(EncodedLoop::from).collect();
            let pieces = Encoded::with_streams(s.cookie.as_ref(), &s.streams, &parts);
            prop_assert_eq!(pieces.pieces().collect::<Vec<_>>().concat(), bytes);
            if s.streams.is_empty() {
                prop_assert_eq!(encode_loops(s.cookie.as_ref(), &parts), encode(&s));
            }
        }

        /// A damaged snapshot is refused by the in-place check too.
        #[test]
        fn a_damaged_snapshot_is_refused_in_place(s in snapshot(), at in any::<prop::sample::Index>(), x in 1u8..) {
            let mut bytes = encode(&s);
            let i = at.index(bytes.len());
            bytes[i] ^= x;
            prop_assert!(Received::check(bytes, 100).is_err());
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
