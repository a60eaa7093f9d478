//! The client table: who is live, since when, and where to send.
//!
//! A hashbrown table of slab slots, hashed by the sender's [`RawAddr`]. The
//! slab keeps clients densely in one allocation (fan-out walks it in order),
//! and the table finds a sender in O(1) straight from the bytes `recvmmsg`
//! wrote. The table stores only the 4-byte slot number and reads the address
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

use std::hash::BuildHasher;

use hashbrown::{DefaultHashBuilder, HashTable};
use slab::Slab;

use crate::addr::RawAddr;
use crate::wheel::Entry;

/// One live client.
#[derive(Debug, Clone, Copy)]
pub struct Client {
    /// Where to send, already in `sockaddr` form for `sendmmsg`.
    pub addr: RawAddr,
    /// The tick of the last datagram from this client.
    pub last_seen: u64,
    /// Distinguishes this occupant of the slot from earlier ones.
    pub generation: u32,
}

/// What [`Table::touch`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Touch {
    /// A new client: schedule `due` for slot `key` at `generation`.
    Joined {
        /// The new client's slot.
        key: u32,
        /// Its generation.
        generation: u32,
        /// When it expires unless heard from again.
        due: u64,
    },
    /// A known client; its `last_seen` was refreshed.
    Refreshed {
        /// The client's slot.
        key: u32,
    },
    /// A new client, but the table is at `--max-clients`.
    Full,
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
    /// `--max-clients`: joins beyond it are refused.
    max_clients: usize,
    /// `--timeout` in ticks.
    timeout: u64,
    /// Generation given to the next join; wraps (a stale wheel entry lives
    /// at most one timeout, far shorter than 2^32 joins).
    next_generation: u32,
}

impl Table {
    /// An empty table admitting up to `max_clients`, expiring clients after
    /// `timeout` ticks of silence.
    pub fn new(max_clients: usize, timeout: u64) -> Table {
        Table::with_capacity(max_clients, timeout, 0)
    }

    /// Like [`Table::new`], with room for `reserve` clients allocated now,
    /// so that joining up to that many never pauses to grow the table
    /// (growing a big one rehashes every entry and copies the slab).
    pub fn with_capacity(max_clients: usize, timeout: u64, reserve: usize) -> Table {
        let reserve = reserve.min(max_clients);
        Table {
            index: HashTable::with_capacity(reserve),
            hasher: DefaultHashBuilder::default(),
            clients: Slab::with_capacity(reserve),
            max_clients: max_clients.min(u32::MAX as usize),
            timeout,
            next_generation: 0,
        }
    }

    /// Live clients in the table (some may be past their deadline until
    /// their wheel entry comes due; [`Table::recipients`] skips those).
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

    /// Registers `addr` or refreshes it, at tick `now`.
    pub fn touch(&mut self, addr: RawAddr, now: u64) -> Touch {
        let hash = self.hasher.hash_one(addr);
        let clients = &self.clients;
        let found = self
            .index
            .find(hash, |&k| {
                clients.get(k as usize).is_some_and(|c| c.addr == addr)
            })
            .copied();
        if let Some(key) = found {
            if let Some(c) = self.clients.get_mut(key as usize) {
                c.last_seen = now;
                return Touch::Refreshed { key };
            }
        }
        if self.clients.len() >= self.max_clients {
            return Touch::Full;
        }
        let generation = self.next_generation;
        self.next_generation = self.next_generation.wrapping_add(1);
        let key = self.clients.insert(Client {
            addr,
            last_seen: now,
            generation,
        }) as u32;
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
        Touch::Joined {
            key,
            generation,
            due: self.deadline(now),
        }
    }

    /// Removes `addr` (a `quit`). Returns whether it was a client.
    pub fn remove(&mut self, addr: &RawAddr) -> bool {
        let hash = self.hasher.hash_one(addr);
        let clients = &self.clients;
        match self.index.find_entry(hash, |&k| {
            clients.get(k as usize).is_some_and(|c| c.addr == *addr)
        }) {
            Ok(entry) => {
                let (key, _) = entry.remove();
                self.clients.try_remove(key as usize);
                true
            }
            Err(_) => false,
        }
    }

    /// Settles a wheel entry that came due at tick `now`.
    pub fn settle(&mut self, entry: Entry, now: u64) -> Due {
        let client = match self.clients.get(entry.key as usize) {
            Some(c) if c.generation == entry.generation => *c,
            _ => return Due::Stale,
        };
        let deadline = self.deadline(client.last_seen);
        if deadline > now {
            return Due::Reschedule(deadline);
        }
        let hash = self.hasher.hash_one(client.addr);
        if let Ok(found) = self.index.find_entry(hash, |&k| k == entry.key) {
            found.remove();
        }
        self.clients.remove(entry.key as usize);
        Due::Expired(client.addr)
    }

    /// The client in slot `key`, if any.
    pub fn get(&self, key: u32) -> Option<&Client> {
        self.clients.get(key as usize)
    }

    /// Every client live at tick `now`, with its slot, in slot order.
    pub fn recipients(&self, now: u64) -> impl Iterator<Item = (u32, &RawAddr)> + '_ {
        let timeout = self.timeout;
        self.clients
            .iter()
            .filter(move |(_, c)| c.last_seen.saturating_add(timeout).saturating_add(1) > now)
            .map(|(k, c)| (k as u32, &c.addr))
    }

    /// Drops every client (shutdown). Returns how many there were.
    pub fn clear(&mut self) -> usize {
        let n = self.clients.len();
        self.index.clear();
        self.clients.clear();
        n
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

    #[test]
    fn join_refresh_quit() {
        let mut t = Table::new(10, 5);
        let Touch::Joined { key, due, .. } = t.touch(addr(1), 100) else {
            panic!("expected a join");
        };
        assert_eq!(due, 106);
        assert_eq!(t.touch(addr(1), 102), Touch::Refreshed { key });
        assert_eq!(t.get(key).unwrap().last_seen, 102);
        assert_eq!(t.len(), 1);
        assert!(t.remove(&addr(1)));
        assert!(!t.remove(&addr(1)));
        assert!(t.is_empty());
    }

    #[test]
    fn reserved_room_is_there_up_front() {
        let t = Table::with_capacity(1000, 5, 500);
        assert!(t.clients.capacity() >= 500);
        assert!(t.index.capacity() >= 500);
        assert!(Table::with_capacity(10, 5, 500).clients.capacity() < 500);
    }

    #[test]
    fn full_table_refuses_joins_but_refreshes_members() {
        let mut t = Table::new(2, 5);
        assert!(matches!(t.touch(addr(1), 0), Touch::Joined { .. }));
        assert!(matches!(t.touch(addr(2), 0), Touch::Joined { .. }));
        assert_eq!(t.touch(addr(3), 0), Touch::Full);
        assert!(matches!(t.touch(addr(2), 1), Touch::Refreshed { .. }));
        t.remove(&addr(1));
        assert!(matches!(t.touch(addr(3), 1), Touch::Joined { .. }));
    }

    #[test]
    fn settle_expires_reschedules_or_ignores() {
        let mut t = Table::new(10, 5);
        let Touch::Joined {
            key,
            generation,
            due,
        } = t.touch(addr(1), 0)
        else {
            panic!()
        };
        let entry = Entry {
            key,
            generation,
            due,
        };
        t.touch(addr(1), 3);
        assert_eq!(t.settle(entry, 6), Due::Reschedule(9));
        assert_eq!(
            t.settle(Entry { due: 9, ..entry }, 9),
            Due::Expired(addr(1))
        );
        assert!(t.is_empty());
        // The slot is reused by a new client: the old entry is stale.
        let Touch::Joined {
            key: k2,
            generation: g2,
            ..
        } = t.touch(addr(2), 10)
        else {
            panic!()
        };
        assert_eq!(k2, key);
        assert_ne!(g2, generation);
        assert_eq!(t.settle(entry, 100), Due::Stale);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn recipients_skip_clients_past_their_deadline() {
        let mut t = Table::new(10, 5);
        t.touch(addr(1), 0);
        t.touch(addr(2), 4);
        let live: Vec<u16> = t.recipients(5).map(|(_, a)| a.port()).collect();
        assert_eq!(live, vec![1, 2]);
        let live: Vec<u16> = t.recipients(6).map(|(_, a)| a.port()).collect();
        assert_eq!(live, vec![2]);
    }

    proptest! {
        /// The map and the slab always agree, whatever the sequence.
        #[test]
        fn index_and_slab_agree(ops in proptest::collection::vec((0u16..20, 0u8..3), 1..200)) {
            let mut t = Table::new(12, 3);
            let mut now = 0;
            for (port, op) in ops {
                now += 1;
                match op {
                    0 => { t.touch(addr(port), now); }
                    1 => { t.remove(&addr(port)); }
                    _ => {
                        let found = t.clients.iter().find(|(_, c)| c.addr == addr(port)).map(|(k, _)| k as u32);
                        if let Some(key) = found {
                            let c = *t.get(key).unwrap();
                            let _ = t.settle(Entry { key, generation: c.generation, due: now }, now);
                        }
                    }
                }
                prop_assert_eq!(t.index.len(), t.clients.len());
                prop_assert!(t.len() <= 12);
                for &k in t.index.iter() {
                    let a = t.get(k).unwrap().addr;
                    prop_assert_eq!(t.index.find(t.hasher.hash_one(a), |&x| x == k), Some(&k));
                }
            }
        }
    }
}
