//! What the relay-wide caps are checked against: the clients in all (for
//! `--max-clients`), the clients per IP address (for
//! `--max-clients-per-ip`), and the members of each named room (for
//! `--max-room-clients` and `--max-rooms`).
//!
//! The core owns the interface, [`Census`], and its plain implementation,
//! [`LocalCensus`]: one loop is the whole relay (one loop, the tests, the
//! fuzzer, a replay). The loops of one relay (`--threads`) share one
//! census instead, which the runtime implements over its locks
//! (`runtime::census::SharedCensus`), so the hub itself never takes a lock
//! and a run through a [`LocalCensus`] replays identically.
//!
//! The table and the rooms tell the census of every client and member
//! that comes and goes (never per message), and ask it before a join.

use std::net::IpAddr;

use hashbrown::HashMap;

/// The relay's counts of clients and room members, as the hub's table and
/// rooms see them: updated on joins and leaves, read before a join.
///
/// With a shared census, a check and the join it allows are two steps, so
/// loops joining clients at the same instant can overshoot a cap by at
/// most one client per other loop; the hub answers a join from what the
/// move actually did, never from the check.
pub trait Census: std::fmt::Debug + Send {
    /// Clients in the relay.
    fn clients(&self) -> usize;
    /// Clients at `ip` in the relay (0 while clients per IP are not counted).
    fn clients_at(&self, ip: &IpAddr) -> u32;
    /// A client joined; `ip` is given when clients per IP are counted.
    fn client_joined(&mut self, ip: Option<IpAddr>);
    /// A client left (see [`client_joined`](Self::client_joined)).
    fn client_left(&mut self, ip: Option<IpAddr>);
    /// Adds `n` clients at `ip` (a table starts counting per IP).
    fn count_ip(&mut self, ip: IpAddr, n: u32);
    /// Takes `n` clients at `ip` away (a table stops counting per IP).
    fn uncount_ip(&mut self, ip: IpAddr, n: u32);
    /// Members of the room called `name` in the relay.
    fn members(&self, name: &[u8]) -> usize;
    /// Named rooms with members in the relay.
    fn rooms(&self) -> usize;
    /// A member joined the room called `name`.
    fn member_added(&mut self, name: &[u8]);
    /// A member left the room called `name`.
    fn member_removed(&mut self, name: &[u8]);
}

/// Counts of a relay that is one loop: plain numbers and maps.
#[derive(Debug, Default, Clone)]
pub struct LocalCensus {
    /// Clients in the table.
    clients: usize,
    /// Clients per IP address, while they are counted.
    per_ip: HashMap<IpAddr, u32>,
    /// Members of each named room.
    rooms: HashMap<Box<[u8]>, u32>,
}

impl Census for LocalCensus {
    fn clients(&self) -> usize {
        self.clients
    }

    fn clients_at(&self, ip: &IpAddr) -> u32 {
        self.per_ip.get(ip).copied().unwrap_or(0)
    }

    fn client_joined(&mut self, ip: Option<IpAddr>) {
        self.clients += 1;
        if let Some(ip) = ip {
            self.count_ip(ip, 1);
        }
    }

    fn client_left(&mut self, ip: Option<IpAddr>) {
        self.clients = self.clients.saturating_sub(1);
        if let Some(ip) = ip {
            self.uncount_ip(ip, 1);
        }
    }

    fn count_ip(&mut self, ip: IpAddr, n: u32) {
        add(&mut self.per_ip, ip, n);
    }

    fn uncount_ip(&mut self, ip: IpAddr, n: u32) {
        sub(&mut self.per_ip, &ip, n);
    }

    fn members(&self, name: &[u8]) -> usize {
        self.rooms.get(name).map_or(0, |&n| n as usize)
    }

    fn rooms(&self) -> usize {
        self.rooms.len()
    }

    fn member_added(&mut self, name: &[u8]) {
        add_member(&mut self.rooms, name);
    }

    fn member_removed(&mut self, name: &[u8]) {
        sub(&mut self.rooms, name, 1);
    }
}

/// Adds `n` to `key`'s count.
pub fn add(map: &mut HashMap<IpAddr, u32>, key: IpAddr, n: u32) {
    *map.entry(key).or_insert(0) += n;
}

/// Adds a member to the room called `name` (its name is copied only when
/// it is new).
pub fn add_member(map: &mut HashMap<Box<[u8]>, u32>, name: &[u8]) {
    match map.get_mut(name) {
        Some(n) => *n += 1,
        None => {
            map.insert(name.into(), 1);
        }
    }
}

/// Takes `n` from `key`'s count, never below zero; a count that reaches
/// zero is forgotten, so the maps hold only what is there.
pub fn sub<K, Q>(map: &mut HashMap<K, u32>, key: &Q, n: u32)
where
    K: std::borrow::Borrow<Q> + std::hash::Hash + Eq,
    Q: std::hash::Hash + Eq + ?Sized,
{
    if let Some(count) = map.get_mut(key) {
        *count = count.saturating_sub(n);
        if *count == 0 {
            map.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_go_up_and_down_and_never_below_zero() {
        let mut c = LocalCensus::default();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        c.client_joined(Some(ip));
        c.client_joined(Some(ip));
        c.client_joined(None);
        assert_eq!((c.clients(), c.clients_at(&ip)), (3, 2));
        c.client_left(Some(ip));
        c.client_left(None);
        c.client_left(None);
        c.client_left(None);
        assert_eq!((c.clients(), c.clients_at(&ip)), (0, 1));
        c.uncount_ip(ip, 5);
        assert_eq!(c.clients_at(&ip), 0);
        c.member_added(b"red");
        c.member_added(b"red");
        c.member_added(b"blue");
        assert_eq!((c.members(b"red"), c.rooms()), (2, 2));
        c.member_removed(b"blue");
        c.member_removed(b"blue");
        assert_eq!((c.members(b"blue"), c.rooms()), (0, 1));
    }
}
