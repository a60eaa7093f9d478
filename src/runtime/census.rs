//! The census the loops of one relay (`--threads`) share: the runtime's
//! implementation of the core's [`Census`] interface, so that
//! `--max-clients`, `--max-clients-per-ip`, `--max-rooms` and
//! `--max-room-clients` cap the relay, not each loop. Everything else
//! about a client is its own loop's.
//!
//! Updated only when a client or a room member comes or goes (never per
//! message): an atomic for the total, a mutex-guarded map per IP and one
//! per room. The number of named rooms is also kept in an atomic, so that
//! the `udphub_rooms` gauge, read at every metrics flush, takes no lock.

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use hashbrown::HashMap;

use crate::core::census::{self, Census};

/// Client and member counts shared by the loops of one relay; each loop's
/// hub holds a clone.
#[derive(Debug, Clone, Default)]
pub struct SharedCensus(Arc<Tally>);

/// What the clones of a [`SharedCensus`] share.
#[derive(Debug, Default)]
struct Tally {
    /// Clients in every loop's table.
    clients: AtomicUsize,
    /// Clients per IP address, while any loop counts them.
    per_ip: Mutex<HashMap<IpAddr, u32>>,
    /// Members of each named room, every loop's together.
    rooms: Mutex<HashMap<Box<[u8]>, u32>>,
    /// `rooms.len()`, written under its lock: what the gauge reads.
    open_rooms: AtomicUsize,
}

impl SharedCensus {
    /// Named rooms with members on some loop, without taking a lock (for
    /// the `udphub_rooms` gauge at every flush).
    pub fn open_rooms(&self) -> usize {
        self.0.open_rooms.load(Ordering::Relaxed)
    }

    /// The per-IP map. A loop that panicked while holding it left the
    /// counts as they were (each update is one entry): carry on.
    fn per_ip(&self) -> MutexGuard<'_, HashMap<IpAddr, u32>> {
        self.0.per_ip.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The per-room map (see [`per_ip`](Self::per_ip)).
    fn rooms_map(&self) -> MutexGuard<'_, HashMap<Box<[u8]>, u32>> {
        self.0.rooms.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes the per-room map with `change`, keeping the room count.
    fn change_rooms(&self, change: impl FnOnce(&mut HashMap<Box<[u8]>, u32>)) {
        let mut map = self.rooms_map();
        change(&mut map);
        self.0.open_rooms.store(map.len(), Ordering::Relaxed);
    }
}

impl Census for SharedCensus {
    fn clients(&self) -> usize {
        self.0.clients.load(Ordering::Relaxed)
    }

    fn clients_at(&self, ip: &IpAddr) -> u32 {
        self.per_ip().get(ip).copied().unwrap_or(0)
    }

    fn client_joined(&mut self, ip: Option<IpAddr>) {
        self.0.clients.fetch_add(1, Ordering::Relaxed);
        if let Some(ip) = ip {
            self.count_ip(ip, 1);
        }
    }

    fn client_left(&mut self, ip: Option<IpAddr>) {
        let _ = self
            .0
            .clients
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(1))
            });
        if let Some(ip) = ip {
            self.uncount_ip(ip, 1);
        }
    }

    fn count_ip(&mut self, ip: IpAddr, n: u32) {
        census::add(&mut self.per_ip(), ip, n);
    }

    fn uncount_ip(&mut self, ip: IpAddr, n: u32) {
        census::sub(&mut self.per_ip(), &ip, n);
    }

    fn members(&self, name: &[u8]) -> usize {
        self.rooms_map().get(name).map_or(0, |&n| n as usize)
    }

    fn rooms(&self) -> usize {
        self.open_rooms()
    }

    fn member_added(&mut self, name: &[u8]) {
        self.change_rooms(|map| census::add_member(map, name));
    }

    fn member_removed(&mut self, name: &[u8]) {
        self.change_rooms(|map| census::sub(map, name, 1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two loops' clones count together, and never below zero.
    #[test]
    fn clones_count_together() {
        let mut a = SharedCensus::default();
        let mut b = a.clone();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        a.client_joined(Some(ip));
        b.client_joined(Some(ip));
        b.client_joined(None);
        assert_eq!((a.clients(), a.clients_at(&ip)), (3, 2));
        for _ in 0..4 {
            a.client_left(None);
        }
        assert_eq!(b.clients(), 0);
        b.uncount_ip(ip, 5);
        assert_eq!(a.clients_at(&ip), 0);
        a.member_added(b"red");
        b.member_added(b"red");
        b.member_added(b"blue");
        assert_eq!((b.members(b"red"), a.rooms(), a.open_rooms()), (2, 2, 2));
        a.member_removed(b"blue");
        b.member_removed(b"blue");
        assert_eq!((a.members(b"blue"), b.open_rooms()), (0, 1));
    }
}
