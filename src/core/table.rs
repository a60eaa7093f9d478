//! The client table: who is live, since when, and where to send.
//!
//! A hashbrown table of slab slots, hashed by the sender's [`RawAddr`]. The
//! slab keeps clients densely in one allocation, the table finds a sender
//! in O(1) straight from the bytes `recvmmsg` wrote, and each client's room
//! keeps a member list ([`Rooms`]) that fan-out walks, so a message costs
//! O(room), never O(table). The table stores only the 4-byte slot number and reads the address
//! from the slab to compare, so a million clients cost ~10 bytes each of
//! index, not ~75 (a map keyed by the 32-byte address at hashbrown's load
//! factor).
//! Each slot carries a generation, so a wheel entry made for a client that
//! has since left can never be mistaken for the slot's new occupant.
//!
//! Sans-I/O: times are ticks passed in by the caller. Liveness has one rule,
//! used both by fan-out and by expiry: a client seen at tick `s` is live at
//! tick `t` while `t < s + timeout + 1` (the `+ 1` because `s` was rounded
//! down to its tick, so expiry is never early).
//!
//! A client keeps two instants, each as the low 32 bits of a tick: when it
//! was last *seen* (what liveness reads; in verify mode only a datagram
//! carrying the client's cookie counts) and when it was last *charged* (what
//! its rate-limit bucket refills from; every datagram counts). 32 bits are
//! enough because both are read only while the client is in the table,
//! never more than a timeout plus a wheel turn after they were written, and
//! the timeout is capped at [`MAX_TIMEOUT_TICKS`]; elapsed ticks are the
//! wrapping difference, read as signed so an instant a moment ahead of the
//! caller's `now` counts as zero ticks ago.

use std::hash::BuildHasher;

use hashbrown::{DefaultHashBuilder, HashTable};
use slab::Slab;

use crate::core::addr::RawAddr;
use crate::core::census::{Census, LocalCensus};
use crate::core::rooms::{Full, RoomId, Rooms, LOBBY};
use crate::core::wheel::Entry;

/// One live client.
#[derive(Debug, Clone, Copy)]
pub struct Client {
    /// Where to send, already in `sockaddr` form for `sendmmsg`.
    pub addr: RawAddr,
    /// The tick (low 32 bits) of the last datagram that proved this client
    /// alive: any datagram, or in verify mode one with its cookie.
    pub last_seen: u32,
    /// The tick (low 32 bits) its rate-limit bucket was last charged at.
    pub charged: u32,
    /// Distinguishes this occupant of the slot from earlier ones.
    pub generation: u32,
    /// The room the client is in.
    pub room: RoomId,
    /// Its position in that room's member list (kept in step by the table).
    pub position: u32,
    /// Its rate-limit bucket's tokens (with `--client-rate`), refilled from
    /// `charged`.
    pub tokens: f32,
}

/// A client that [`Table::insert`] just registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Joined {
    /// The new client's slot.
    pub key: u32,
    /// Its generation.
    pub generation: u32,
    /// When it expires unless heard from again.
    pub due: u64,
}

/// A member handed over from another process, for [`Table::restore`].
#[derive(Debug, Clone, Copy)]
pub struct Restored<'m> {
    /// Its address.
    pub addr: RawAddr,
    /// The tick it was last seen at.
    pub last_seen: u64,
    /// Its room's name (empty: the lobby).
    pub room: &'m [u8],
    /// Its rate-limit bucket's tokens.
    pub tokens: f32,
}

/// Why [`Table::restore`] could not register a snapshot's members.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotRestored {
    /// This address is listed twice.
    Twice(Option<RawAddr>),
    /// This room does not fit the caps (`--max-rooms`,
    /// `--max-room-clients`).
    Full(Box<[u8]>),
}

/// `hashed` (hash, slot) pairs in the order of the index's buckets, near
/// enough: a counting sort on the high bits of the bucket a hash starts
/// probing at (hashbrown takes the hash's low bits, masked to the bucket
/// count: a power of two above `capacity`, which is 7/8 of it), into
/// stretches of about 1,024 buckets, a few KB of index each. (Sorting in
/// place instead, swapping each pair into its stretch, saves the second
/// buffer but took three times as long: each swap waits for the last.)
fn in_bucket_order(hashed: Vec<(u64, u32)>, capacity: usize) -> Vec<(u64, u32)> {
    const STRETCH_BITS: u32 = 10;
    let buckets = (capacity.saturating_mul(8) / 7).max(1).next_power_of_two();
    let bits = buckets.trailing_zeros();
    if bits <= STRETCH_BITS || hashed.len() < 4096 {
        return hashed;
    }
    let part = |h: u64| ((h as usize) & (buckets - 1)) >> STRETCH_BITS;
    let mut next = vec![0usize; (1usize << (bits - STRETCH_BITS)) + 1];
    for &(h, _) in &hashed {
        next[part(h) + 1] += 1;
    }
    for i in 1..next.len() {
        next[i] += next[i - 1];
    }
    let mut out = vec![(0u64, 0u32); hashed.len()];
    for &(h, k) in &hashed {
        let at = &mut next[part(h)];
        out[*at] = (h, k);
        *at += 1;
    }
    out
}

/// What a wheel entry turned out to mean when it came due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    /// The client left (or the slot was reused) since: nothing to do.
    Stale,
    /// The client was silent for the timeout and has been removed.
    Expired(RawAddr),
    /// The client spoke since: schedule it again at this tick.
    Reschedule(u64),
}

/// The client table.
#[derive(Debug)]
pub struct Table {
    /// Slab slots, hashed by their client's address.
    index: HashTable<u32>,
    /// The (randomly seeded) hash of addresses.
    hasher: DefaultHashBuilder,
    /// The clients, densely.
    clients: Slab<Client>,
    /// Who is in which room; kept in step with `clients`.
    rooms: Rooms,
    /// `--timeout` in ticks.
    timeout: u64,
    /// Generation given to the next join; wraps (a stale wheel entry lives
    /// at most one timeout, far shorter than 2^32 joins).
    next_generation: u32,
    /// Whether clients per IP address are counted (only with
    /// `--max-clients-per-ip`: a hash per join and leave).
    per_ip: bool,
    /// Tokens a new client's bucket starts with.
    burst: f32,
    /// The relay's counts, told of every client and member that comes and
    /// goes: this table's own, or every loop's (`--threads`).
    census: Box<dyn Census>,
}

impl Table {
    /// An empty table expiring clients after `timeout` ticks of silence.
    /// (How many clients may join is admission's business, not the table's.)
    pub fn new(timeout: u64) -> Table {
        Table::with_capacity(timeout, 0)
    }

    /// Like [`Table::new`], with room for `reserve` clients allocated now,
    /// so that joining up to that many never pauses to grow the table
    /// (growing a big one rehashes every entry and copies the slab).
    pub fn with_capacity(timeout: u64, reserve: usize) -> Table {
        Table::with_rooms(
            timeout,
            reserve,
            Rooms::new(usize::MAX, usize::MAX, reserve),
        )
    }

    /// Like [`Table::with_capacity`], with these rooms (and their caps).
    pub fn with_rooms(timeout: u64, reserve: usize, rooms: Rooms) -> Table {
        Table {
            index: HashTable::with_capacity(reserve),
            hasher: DefaultHashBuilder::default(),
            clients: Slab::with_capacity(reserve),
            rooms,
            timeout: timeout.clamp(1, MAX_TIMEOUT_TICKS),
            next_generation: 0,
            per_ip: false,
            burst: 0.0,
            census: Box::new(LocalCensus::default()),
        }
    }

    /// Writes once over the memory set aside for clients (the slab, the
    /// index and the lobby's member list, up to their capacity), so that
    /// filling them later takes no page fault: what a process taking over
    /// does before it asks for the hand-over, so that registering a
    /// million members while the old relay is paused does not also fault
    /// in a hundred megabytes. Only on an empty table (else nothing).
    pub fn prefault(&mut self) {
        if !self.clients.is_empty() || !self.index.is_empty() {
            return;
        }
        let placeholder = Client {
            addr: RawAddr::from_socket_addr(std::net::SocketAddr::from(([0, 0, 0, 0], 0))),
            last_seen: 0,
            charged: 0,
            generation: 0,
            room: LOBBY,
            position: 0,
            tokens: 0.0,
        };
        let slots = self.clients.capacity();
        for _ in 0..slots {
            self.clients.insert(placeholder);
        }
        self.clients.clear();
        // Spread over the buckets in order (a multiplicative hash of the
        // count): the whole index is written, a stretch at a time.
        let buckets = self.index.capacity();
        for i in 0..buckets as u64 {
            let hash = i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            self.index.insert_unique(hash, 0, |_| hash);
        }
        self.index.clear();
        self.rooms.prefault_lobby();
    }

    /// Counts clients and room members in `census` from now on, instead
    /// of in a census of the table's own: shared with the relay's other
    /// loops (`--threads`), the caps apply to the relay, not to this loop.
    /// Call it while the table is empty.
    pub fn share_census(&mut self, census: Box<dyn Census>) {
        self.census = census;
    }

    /// Clients in the relay: this table's, or every loop's with a shared
    /// census.
    pub fn total_len(&self) -> usize {
        self.census.clients()
    }

    /// Counts clients per IP address from now on, starting from the
    /// clients already here.
    pub fn count_per_ip(&mut self) {
        if !self.per_ip {
            for (ip, n) in self.clients_per_ip() {
                self.census.count_ip(ip, n);
            }
            self.per_ip = true;
        }
    }

    /// Stops counting clients per IP address.
    pub fn stop_counting_per_ip(&mut self) {
        if self.per_ip {
            for (ip, n) in self.clients_per_ip() {
                self.census.uncount_ip(ip, n);
            }
            self.per_ip = false;
        }
    }

    /// This table's clients per IP address, gathered so that the census
    /// is told once per address, not once per client.
    fn clients_per_ip(&self) -> hashbrown::HashMap<std::net::IpAddr, u32> {
        let mut counts = hashbrown::HashMap::new();
        for (_, c) in &self.clients {
            crate::core::census::add(&mut counts, c.addr.display_ip(), 1);
        }
        counts
    }

    /// The IP address the census counts `addr` under, if it counts them.
    fn counted_ip(&self, addr: &RawAddr) -> Option<std::net::IpAddr> {
        self.per_ip.then(|| addr.display_ip())
    }

    /// Changes the timeout (in ticks) of a running table. Liveness follows
    /// the new value at once (a shorter timeout stops deliveries to clients
    /// silent for longer); wheel entries already scheduled are settled
    /// against it when they come due (a longer one reschedules them; after
    /// a shorter one they leave the table at their old deadline).
    pub fn set_timeout(&mut self, timeout: u64) {
        self.timeout = timeout.clamp(1, MAX_TIMEOUT_TICKS);
    }

    /// Mutable access to the rooms, for their caps.
    pub fn rooms_mut(&mut self) -> &mut Rooms {
        &mut self.rooms
    }

    /// Clients at `addr`'s IP address (0 unless counted), in the relay.
    pub fn clients_at(&self, addr: &RawAddr) -> u32 {
        match self.counted_ip(addr) {
            Some(ip) => self.census.clients_at(&ip),
            None => 0,
        }
    }

    /// Sets the tokens a new client's bucket starts with.
    pub fn set_burst(&mut self, burst: f32) {
        self.burst = burst;
    }

    /// Fills every client's bucket to the burst (rate limits turned on
    /// while clients are here).
    pub fn fill_buckets(&mut self) {
        let burst = self.burst;
        for (_, c) in &mut self.clients {
            c.tokens = burst;
        }
    }

    /// The client in slot `key` spoke at tick `now`: refills its bucket by
    /// `per_tick` tokens for each tick since it last did (up to `burst`),
    /// and takes a token if there is one. Liveness is not touched: that is
    /// [`refresh`](Self::refresh)'s, for the datagrams that prove it.
    pub fn charge(&mut self, key: u32, now: u64, per_tick: f32, burst: f32) -> bool {
        let Some(c) = self.clients.get_mut(key as usize) else {
            return true;
        };
        let ticks = ticks_since(now, c.charged);
        // A full bucket owes nothing to the past: its clock restarts now.
        // (After a reload turned rate limits on, `charged` may be from
        // the client's join, 2^31 ticks or more ago: read as "ahead", it
        // would refill nothing until the ticks wrapped around again.)
        let full = c.tokens >= burst;
        c.tokens = (c.tokens + ticks as f32 * per_tick).min(burst);
        if ticks > 0 || full {
            c.charged = now as u32;
        }
        if c.tokens >= 1.0 {
            c.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// The rooms.
    pub fn rooms(&self) -> &Rooms {
        &self.rooms
    }

    /// Starts recording rooms opened and closed ([`Rooms::track_changes`]).
    pub fn track_room_changes(&mut self) {
        self.rooms.track_changes();
    }

    /// Rooms opened and closed since the last call ([`Rooms::take_changes`]).
    pub fn take_room_changes(&mut self) -> Vec<crate::core::rooms::RoomChange> {
        self.rooms.take_changes()
    }

    /// Moves the client in slot `key` into the room called `name` (made if
    /// new; the empty name is the lobby). A room left empty is freed.
    pub fn move_to(&mut self, key: u32, name: &[u8]) -> Result<RoomId, Full> {
        let Some(client) = self.clients.get(key as usize).copied() else {
            return Ok(LOBBY);
        };
        if self.rooms.name(client.room) == name {
            return Ok(client.room);
        }
        let room = self.rooms.open(name, &*self.census)?;
        let moved = self
            .rooms
            .remove(client.room, client.position, &mut *self.census);
        self.reposition(moved);
        let position = self.rooms.add(room, key, &mut *self.census);
        if let Some(c) = self.clients.get_mut(key as usize) {
            c.room = room;
            c.position = position;
        }
        Ok(room)
    }

    /// Clients in the table (some may be past their deadline until their
    /// wheel entry comes due; [`Table::recipients`] skips those).
    pub fn len(&self) -> usize {
        self.clients.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }

    /// The tick at which a client last seen at `last_seen` expires.
    pub fn deadline(&self, last_seen: u64) -> u64 {
        last_seen.saturating_add(self.timeout).saturating_add(1)
    }

    /// The slot of the client at `addr`, if it is one.
    pub fn find(&self, addr: &RawAddr) -> Option<u32> {
        let hash = self.hasher.hash_one(addr);
        let clients = &self.clients;
        self.index
            .find(hash, |&k| {
                clients.get(k as usize).is_some_and(|c| c.addr == *addr)
            })
            .copied()
    }

    /// Marks the client in slot `key` as heard from at tick `now`, talking
    /// to the relay's local address `local` (the runtime's tag,
    /// [`RawAddr::local`]): what is sent to it from now on leaves from
    /// there. One call for both, so that only what proves a client alive
    /// can move it to another of the relay's addresses.
    pub fn refresh(&mut self, key: u32, now: u64, local: u8) {
        if let Some(c) = self.clients.get_mut(key as usize) {
            c.last_seen = now as u32;
            c.addr.set_local(local);
        }
    }

    /// Registers `addr` (not yet a client: see [`Table::find`]) at tick
    /// `now`, in the lobby.
    pub fn insert(&mut self, addr: RawAddr, now: u64) -> Joined {
        self.insert_in(addr, now, LOBBY)
    }

    /// Registers `addr` (not yet a client) at tick `now` straight into the
    /// room called `name`, if that room has room: otherwise nothing is
    /// registered at all (a refused newcomer leaves no trace).
    pub fn insert_into(&mut self, addr: RawAddr, now: u64, name: &[u8]) -> Result<Joined, Full> {
        let room = self.rooms.open(name, &*self.census)?;
        Ok(self.insert_in(addr, now, room))
    }

    fn insert_in(&mut self, addr: RawAddr, now: u64, room: RoomId) -> Joined {
        let generation = self.next_generation;
        self.next_generation = self.next_generation.wrapping_add(1);
        let entry = self.clients.vacant_entry();
        let key = entry.key() as u32;
        let position = self.rooms.add(room, key, &mut *self.census);
        entry.insert(Client {
            addr,
            last_seen: now as u32,
            charged: now as u32,
            generation,
            room,
            position,
            tokens: self.burst,
        });
        let ip = self.counted_ip(&addr);
        self.census.client_joined(ip);
        let hash = self.hasher.hash_one(addr);
        let Table {
            index,
            hasher,
            clients,
            ..
        } = self;
        index.insert_unique(hash, key, |&k| match clients.get(k as usize) {
            Some(c) => hasher.hash_one(c.addr),
            None => 0,
        });
        Joined {
            key,
            generation,
            due: self.deadline(now),
        }
    }

    /// Registers the members another process handed over, in one go: each
    /// at its address, last seen at its tick, in its room, its bucket
    /// holding its tokens as charged at tick `now`; those past their
    /// deadline at `now` are left out. `joined` is told of each (for the
    /// wheel). Returns the clients registered. Call it on an empty table;
    /// on an error the table is half-built and must be dropped, never used.
    ///
    /// Why not [`Table::insert_into`] a million times: each insert lands
    /// on a random line of a 10 MB index, two cache misses a member, most
    /// of a hand-over's pause on a busy machine. Here the slab, the rooms
    /// and the wheel are filled in the snapshot's order (sequential
    /// writes), and the index last, in the order of its buckets (a
    /// counting sort of the hashes by their bucket's high bits), so each
    /// stretch of the index is touched while it is in cache.
    pub fn restore<'m>(
        &mut self,
        members: impl Iterator<Item = Restored<'m>>,
        now: u64,
        mut joined: impl FnMut(Joined),
    ) -> Result<usize, NotRestored> {
        let most = members.size_hint().1.unwrap_or(0);
        let mut hashed = Vec::with_capacity(most);
        self.clients.reserve(most);
        for m in members {
            if self.deadline(m.last_seen) <= now {
                continue;
            }
            let room = self
                .rooms
                .open(m.room, &*self.census)
                .map_err(|_| NotRestored::Full(m.room.into()))?;
            let generation = self.next_generation;
            self.next_generation = generation.wrapping_add(1);
            let slot = self.clients.vacant_entry();
            let key = slot.key() as u32;
            let position = self.rooms.add(room, key, &mut *self.census);
            slot.insert(Client {
                addr: m.addr,
                last_seen: m.last_seen as u32,
                charged: now as u32,
                generation,
                room,
                position,
                // Unlimited here (no burst), the tokens mean nothing
                // until a reload turns limits on, which fills every bucket.
                tokens: m.tokens.min(self.burst),
            });
            self.census
                .client_joined(self.per_ip.then(|| m.addr.display_ip()));
            hashed.push((self.hasher.hash_one(m.addr), key));
            joined(Joined {
                key,
                generation,
                due: self.deadline(m.last_seen),
            });
        }
        let Table {
            index,
            hasher,
            clients,
            ..
        } = self;
        let rehash = |&k: &u32| match clients.get(k as usize) {
            Some(c) => hasher.hash_one(c.addr),
            None => 0,
        };
        index.reserve(hashed.len(), rehash);
        for (hash, key) in in_bucket_order(hashed, index.capacity()) {
            // The slab is read only when a bucket's tag matches (rarely):
            // in bucket order, the slots are in random order.
            let addr = |k: u32| clients.get(k as usize).map(|c| c.addr);
            let same = |&k: &u32| addr(k) == addr(key);
            match index.entry(hash, same, rehash) {
                hashbrown::hash_table::Entry::Occupied(_) => {
                    return Err(NotRestored::Twice(addr(key)));
                }
                hashbrown::hash_table::Entry::Vacant(v) => {
                    v.insert(key);
                }
            }
        }
        Ok(clients.len())
    }

    /// Every client live at tick `now`, with the ticks since it was last
    /// seen and its room's name: what a hand-over exports.
    pub fn live_with_rooms(&self, now: u64) -> impl Iterator<Item = (&Client, u64, &[u8])> + '_ {
        let timeout = self.timeout;
        self.clients
            .iter()
            .filter(move |(_, c)| live(c, timeout, now))
            .map(move |(_, c)| (c, ticks_since(now, c.last_seen), self.rooms.name(c.room)))
    }

    /// Removes the client at `addr` (a `quit`). Returns whether it was one.
    pub fn remove(&mut self, addr: &RawAddr) -> bool {
        let hash = self.hasher.hash_one(addr);
        let clients = &self.clients;
        match self.index.find_entry(hash, |&k| {
            clients.get(k as usize).is_some_and(|c| c.addr == *addr)
        }) {
            Ok(entry) => {
                let (key, _) = entry.remove();
                self.forget(key);
                true
            }
            Err(_) => false,
        }
    }

    /// Takes slot `key` out of the slab and its room (the index entry is
    /// already gone).
    fn forget(&mut self, key: u32) -> Option<Client> {
        let client = self.clients.try_remove(key as usize)?;
        let ip = self.counted_ip(&client.addr);
        self.census.client_left(ip);
        let moved = self
            .rooms
            .remove(client.room, client.position, &mut *self.census);
        self.reposition(moved);
        Some(client)
    }

    /// Stores the new positions of members a removal moved.
    fn reposition(&mut self, moved: crate::core::rooms::Moved) {
        for (key, at) in moved.into_iter().flatten() {
            if let Some(m) = self.clients.get_mut(key as usize) {
                m.position = at;
            }
        }
    }

    /// Settles a wheel entry that came due at tick `now`.
    pub fn settle(&mut self, entry: Entry, now: u64) -> Due {
        let client = match self.clients.get(entry.key as usize) {
            Some(c) if c.generation == entry.generation => *c,
            _ => return Due::Stale,
        };
        let seen = now.saturating_sub(ticks_since(now, client.last_seen));
        let deadline = self.deadline(seen);
        if deadline > now {
            return Due::Reschedule(deadline);
        }
        let hash = self.hasher.hash_one(client.addr);
        if let Ok(found) = self.index.find_entry(hash, |&k| k == entry.key) {
            found.remove();
        }
        self.forget(entry.key);
        Due::Expired(client.addr)
    }

    /// The client in slot `key`, if any.
    pub fn get(&self, key: u32) -> Option<&Client> {
        self.clients.get(key as usize)
    }

    /// Members of `room` live at tick `now`, leaving out slot `skip` (the
    /// sender, under `--no-echo`). Costs O(members of the room).
    pub fn recipients(&self, room: RoomId, now: u64, skip: Option<u32>) -> Recipients<'_> {
        self.recipients_from(room, 0, now, skip)
    }

    /// [`recipients`](Self::recipients) from position `from` of the room's
    /// member list on (a fan-out resumed at its cursor).
    pub fn recipients_from(
        &self,
        room: RoomId,
        from: u32,
        now: u64,
        skip: Option<u32>,
    ) -> Recipients<'_> {
        let members = self.rooms.members(room);
        let from = (from as usize).min(members.len());
        Recipients {
            members: members[from..].iter(),
            end: members.len(),
            clients: &self.clients,
            timeout: self.timeout,
            now,
            skip,
        }
    }

    /// Every client live at tick `now`, in every room (for `bye`).
    pub fn everyone(&self, now: u64) -> impl Iterator<Item = &RawAddr> + '_ {
        let timeout = self.timeout;
        self.clients
            .iter()
            .filter(move |(_, c)| live(c, timeout, now))
            .map(|(_, c)| &c.addr)
    }

    /// Drops every client (shutdown). Returns how many there were.
    pub fn clear(&mut self) -> usize {
        let n = self.clients.len();
        for (_, c) in &self.clients {
            let ip = self.per_ip.then(|| c.addr.display_ip());
            self.census.client_left(ip);
        }
        self.index.clear();
        self.clients.clear();
        self.rooms.clear(&mut *self.census);
        n
    }
}

/// The longest timeout, in ticks, the table keeps: 2^30, half of what a
/// wrapping 32-bit instant can tell apart, so an entry settled late is
/// still read right (at the coarsest tick, 100 ms, over three years).
pub const MAX_TIMEOUT_TICKS: u64 = 1 << 30;

/// Ticks from `then` (the low 32 bits of a tick) to `now`: the wrapping
/// difference, 0 if `then` is a moment ahead of `now`.
fn ticks_since(now: u64, then: u32) -> u64 {
    ((now as u32).wrapping_sub(then) as i32).max(0) as u64
}

/// Whether `c` is live at tick `now`: the one liveness rule.
fn live(c: &Client, timeout: u64, now: u64) -> bool {
    ticks_since(now, c.last_seen) <= timeout
}

/// The live members of one room: what a fan-out sends to.
#[derive(Debug, Clone)]
pub struct Recipients<'a> {
    /// The room's member slots, yet to visit.
    members: std::slice::Iter<'a, u32>,
    /// The length of the room's member list: positions count back from it.
    end: usize,
    /// The table's clients.
    clients: &'a Slab<Client>,
    /// `--timeout` in ticks.
    timeout: u64,
    /// The tick the fan-out happens at.
    now: u64,
    /// A slot to leave out (the sender under `--no-echo`).
    skip: Option<u32>,
}

impl<'a> Recipients<'a> {
    /// The position in the room's member list of the next member to visit.
    pub fn next_position(&self) -> u32 {
        (self.end - self.members.len()) as u32
    }

    /// Members left to visit, live or not (an upper bound on the
    /// recipients left, known without walking them).
    pub fn remaining(&self) -> usize {
        self.members.len()
    }

    /// Members from position `from` on, live or not, less the one left
    /// out if it is among them: what a fan-out that stopped at `from` still
    /// owes at most, known without walking them (to count them dropped).
    pub fn owed_from(&self, from: u32) -> u64 {
        let rest = self.end.saturating_sub(from as usize) as u64;
        let skipped = self
            .skip
            .and_then(|skip| self.clients.get(skip as usize))
            .is_some_and(|c| c.position >= from && (c.position as usize) < self.end);
        rest - u64::from(skipped && rest > 0)
    }

    /// The next recipient, with its position in the member list.
    pub fn next_at(&mut self) -> Option<(u32, &'a RawAddr)> {
        while let Some(&key) = self.members.next() {
            if Some(key) == self.skip {
                continue;
            }
            match self.clients.get(key as usize) {
                Some(c) if live(c, self.timeout, self.now) => {
                    return Some(((self.end - self.members.len() - 1) as u32, &c.addr))
                }
                _ => {}
            }
        }
        None
    }
}

impl<'a> Iterator for Recipients<'a> {
    type Item = &'a RawAddr;

    fn next(&mut self) -> Option<&'a RawAddr> {
        self.next_at().map(|(_, addr)| addr)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (0, Some(self.members.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::SocketAddr;

    fn addr(port: u16) -> RawAddr {
        SocketAddr::from(([127, 0, 0, 1], port)).into()
    }

    fn ports<'a>(it: impl Iterator<Item = &'a RawAddr>) -> Vec<u16> {
        let mut v: Vec<u16> = it.map(|a| a.port()).collect();
        v.sort();
        v
    }

    fn restored(addr: RawAddr, last_seen: u64, room: &[u8]) -> Restored<'_> {
        Restored {
            addr,
            last_seen,
            room,
            tokens: 1.0,
        }
    }

    /// A hand-over's bulk registration (enough members for the index to
    /// be filled in bucket order): every live member findable, in its
    /// room, with a wheel entry each; the expired left out.
    #[test]
    fn restore_registers_every_live_member_findable_in_its_room() {
        for prefaulted in [false, true] {
            restore_into(prefaulted);
        }
    }

    /// A prefaulted table is empty, keeps its room, and takes the same
    /// members the same way; a table with clients is left alone.
    #[test]
    fn a_prefaulted_table_is_empty_and_keeps_its_room() {
        let mut t = Table::with_capacity(50, 1_000);
        let (slots, buckets) = (t.clients.capacity(), t.index.capacity());
        t.prefault();
        assert_eq!(t.len(), 0);
        assert_eq!((t.clients.capacity(), t.index.capacity()), (slots, buckets));
        assert!(t.rooms().members(LOBBY).is_empty());
        assert!(t.find(&addr(1)).is_none());
        t.restore([restored(addr(1), 90, b"")].into_iter(), 100, |_| {})
            .unwrap();
        t.prefault();
        assert_eq!(t.len(), 1, "a table with a client is left alone");
        assert!(t.find(&addr(1)).is_some());
    }

    fn restore_into(prefaulted: bool) {
        let mut t = Table::with_capacity(50, 6_000);
        if prefaulted {
            t.prefault();
        }
        let members: Vec<RawAddr> = (1..=6_000u16).map(addr).collect();
        let mut wheel = 0;
        let n = t
            .restore(
                members.iter().enumerate().map(|(i, &a)| {
                    // Every tenth is long silent: past its deadline at 100.
                    let seen = if i % 10 == 0 { 10 } else { 90 };
                    restored(a, seen, if i % 2 == 0 { b"" } else { b"r" })
                }),
                100,
                |j| {
                    assert_eq!(j.due, 141);
                    wheel += 1;
                },
            )
            .unwrap();
        assert_eq!((n, wheel, t.len()), (5_400, 5_400, 5_400));
        for (i, a) in members.iter().enumerate() {
            let found = t.find(a);
            if i % 10 == 0 {
                assert_eq!(found, None, "{a} expired");
                continue;
            }
            let c = t.get(found.expect("registered")).unwrap();
            assert_eq!(c.addr, *a);
            let room = if i % 2 == 0 {
                LOBBY
            } else {
                t.rooms().find(b"r").unwrap()
            };
            assert_eq!(c.room, room);
        }
        // The expired (every tenth) are all even: in the lobby.
        assert_eq!(t.rooms().members(LOBBY).len(), 2_400);
        let r = t.rooms().find(b"r").unwrap();
        assert_eq!(t.rooms().members(r).len(), 3_000);
    }

    /// A snapshot listing a member twice is refused, naming it.
    #[test]
    fn restore_refuses_a_member_listed_twice() {
        for n in [3u16, 5_000] {
            let mut t = Table::new(50);
            let twice = (1..=n).chain([2]).map(|p| restored(addr(p), 90, b""));
            assert_eq!(
                t.restore(twice, 100, |_| {}),
                Err(NotRestored::Twice(Some(addr(2)))),
                "{n} members"
            );
        }
    }

    /// Bucket order is a permutation of the pairs, grouped by stretch.
    #[test]
    fn bucket_order_keeps_every_pair() {
        let hashed: Vec<(u64, u32)> = (0..10_000u32)
            .map(|k| (u64::from(k).wrapping_mul(0x9e37_79b9_7f4a_7c15), k))
            .collect();
        let capacity = 14_336; // 16,384 buckets: 16 stretches of 1,024
        let sorted = in_bucket_order(hashed.clone(), capacity);
        let stretch = |h: u64| (h as usize & 16_383) >> 10;
        assert!(sorted
            .windows(2)
            .all(|w| stretch(w[0].0) <= stretch(w[1].0)));
        let (mut a, mut b) = (hashed, sorted);
        a.sort_unstable();
        b.sort_unstable();
        assert_eq!(a, b);
    }

    #[test]
    fn join_refresh_quit() {
        let mut t = Table::new(5);
        assert_eq!(t.find(&addr(1)), None);
        let j = t.insert(addr(1), 100);
        assert_eq!(j.due, 106);
        assert_eq!(t.find(&addr(1)), Some(j.key));
        t.refresh(j.key, 102, 0);
        assert_eq!(t.get(j.key).unwrap().last_seen, 102);
        assert_eq!(
            t.get(j.key).unwrap().charged,
            100,
            "a refresh is not a charge"
        );
        assert_eq!(t.len(), 1);
        assert!(t.remove(&addr(1)));
        assert!(!t.remove(&addr(1)));
        assert!(t.is_empty());
        assert_eq!(t.recipients(LOBBY, 102, None).count(), 0);
    }

    /// Rate limits turned on by a reload, for a client that joined 2^31
    /// ticks or more before: its bucket refills from the reload on.
    #[test]
    fn a_bucket_filled_long_after_the_join_refills() {
        let mut t = Table::new(5);
        let j = t.insert(addr(1), 0);
        let later = (1u64 << 31) + 10;
        t.refresh(j.key, later, 0);
        t.set_burst(2.0);
        t.fill_buckets();
        assert!(t.charge(j.key, later, 1.0, 2.0));
        assert!(t.charge(j.key, later, 1.0, 2.0));
        assert!(!t.charge(j.key, later, 1.0, 2.0), "the burst is spent");
        assert!(t.charge(j.key, later + 100, 1.0, 2.0), "and refills");
    }

    #[test]
    fn a_client_follows_its_local_address() {
        let mut t = Table::new(5);
        let j = t.insert(addr(1).with_local(1), 0);
        assert_eq!(t.recipients(LOBBY, 1, None).next().unwrap().local(), 1);
        // Found whatever local address it uses now; sent to from the new one.
        assert_eq!(t.find(&addr(1).with_local(2)), Some(j.key));
        t.refresh(j.key, 1, 2);
        assert_eq!(t.recipients(LOBBY, 1, None).next().unwrap().local(), 2);
        assert_eq!(t.everyone(1).next().unwrap().local(), 2);
    }

    /// Counting per IP (a reload may turn it on and off) starts from the
    /// clients already here and stops without a trace.
    #[test]
    fn per_ip_counts_start_and_stop_with_the_clients_already_here() {
        let mut t = Table::new(5);
        t.insert(addr(1), 0);
        t.insert(addr(2), 0);
        assert_eq!(t.clients_at(&addr(1)), 0, "not counted");
        t.count_per_ip();
        assert_eq!(t.clients_at(&addr(9)), 2, "same IP, any port");
        t.insert(addr(3), 0);
        assert!(t.remove(&addr(1)));
        assert_eq!(t.clients_at(&addr(1)), 2);
        t.stop_counting_per_ip();
        assert_eq!(t.clients_at(&addr(1)), 0);
        t.count_per_ip();
        assert_eq!((t.clients_at(&addr(1)), t.total_len()), (2, 2));
        assert_eq!(t.clear(), 2);
        assert_eq!((t.clients_at(&addr(1)), t.total_len()), (0, 0));
    }

    #[test]
    fn reserved_room_is_there_up_front() {
        let t = Table::with_capacity(5, 500);
        assert!(t.clients.capacity() >= 500);
        assert!(t.index.capacity() >= 500);
    }

    #[test]
    fn settle_expires_reschedules_or_ignores() {
        let mut t = Table::new(5);
        let Joined {
            key,
            generation,
            due,
        } = t.insert(addr(1), 0);
        let entry = Entry {
            key,
            generation,
            due,
        };
        t.refresh(key, 3, 0);
        assert_eq!(t.settle(entry, 6), Due::Reschedule(9));
        assert_eq!(
            t.settle(Entry { due: 9, ..entry }, 9),
            Due::Expired(addr(1))
        );
        assert!(t.is_empty());
        assert_eq!(t.recipients(LOBBY, 9, None).count(), 0);
        // The slot is reused by a new client: the old entry is stale.
        let j2 = t.insert(addr(2), 10);
        assert_eq!(j2.key, key);
        assert_ne!(j2.generation, generation);
        assert_eq!(t.settle(entry, 100), Due::Stale);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn recipients_skip_the_expired_and_the_skipped() {
        let mut t = Table::new(5);
        let a = t.insert(addr(1), 0);
        t.insert(addr(2), 4);
        t.insert(addr(3), 4);
        assert_eq!(ports(t.recipients(LOBBY, 5, None)), vec![1, 2, 3]);
        assert_eq!(ports(t.recipients(LOBBY, 6, None)), vec![2, 3]);
        assert_eq!(ports(t.recipients(LOBBY, 5, Some(a.key))), vec![2, 3]);
        assert_eq!(ports(t.everyone(6)), vec![2, 3]);
    }

    proptest! {
        /// The index, the slab, the census and the member lists always agree, whatever
        /// the sequence of joins, refreshes, quits and expiries.
        #[test]
        fn index_slab_and_rooms_agree(ops in proptest::collection::vec((0u16..20, 0u8..3), 1..200)) {
            let mut t = Table::new(3);
            let mut now = 0;
            for (port, op) in ops {
                now += 1;
                match op {
                    0 => match t.find(&addr(port)) {
                        Some(k) => t.refresh(k, now, 0),
                        None => { t.insert(addr(port), now); }
                    },
                    1 => { t.remove(&addr(port)); }
                    _ => {
                        if let Some(key) = t.find(&addr(port)) {
                            let c = *t.get(key).unwrap();
                            let _ = t.settle(Entry { key, generation: c.generation, due: now }, now);
                        }
                    }
                }
                prop_assert_eq!(t.index.len(), t.clients.len());
                prop_assert_eq!(t.census.clients(), t.clients.len());
                let members = t.rooms.members(LOBBY);
                prop_assert_eq!(members.len(), t.clients.len());
                for (pos, &k) in members.iter().enumerate() {
                    let c = t.get(k).unwrap();
                    prop_assert_eq!(c.position as usize, pos);
                    prop_assert_eq!(c.room, LOBBY);
                }
                for &k in t.index.iter() {
                    let a = t.get(k).unwrap().addr;
                    prop_assert_eq!(t.find(&a), Some(k));
                }
            }
        }
    }
}
