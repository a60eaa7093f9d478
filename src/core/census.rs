//! What several loops of one relay (`--threads`) must count together: the
//! clients in all (for `--max-clients`), the clients per IP address (for
//! `--max-clients-per-ip`), and the members of each named room (for
//! `--max-room-clients` and `--max-rooms`). Everything else about a client
//! is its own loop's.
//!
//! Updated only when a client joins or leaves (never per message): an
//! atomic for the total, a mutex-guarded map per IP. A check and the join
//! it allows are two steps, so loops joining clients at the same instant
//! can overshoot a cap by at most one client per other loop.

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use hashbrown::HashMap;

/// Client counts shared by the loops of one relay.
#[derive(Debug, Default)]
pub struct Census {
    /// Clients in every loop's table.
    clients: AtomicUsize,
    /// Clients per IP address, while any loop counts them.
    per_ip: Mutex<HashMap<IpAddr, u32>>,
    /// Members of each named room, every loop's together.
    rooms: Mutex<HashMap<Box<[u8]>, u32>>,
}

impl Census {
    /// Clients in all.
    pub fn clients(&self) -> usize {
        self.clients.load(Ordering::Relaxed)
    }

    /// Clients at `ip`, in all.
    pub fn at(&self, ip: &IpAddr) -> u32 {
        self.map().get(ip).copied().unwrap_or(0)
    }

    /// A client joined; `ip` is given when clients per IP are counted.
    pub fn joined(&self, ip: Option<IpAddr>) {
        self.clients.fetch_add(1, Ordering::Relaxed);
        if let Some(ip) = ip {
            self.add_ip(ip, 1);
        }
    }

    /// A client left (see [`joined`](Self::joined)).
    pub fn left(&self, ip: Option<IpAddr>) {
        let _ = self
            .clients
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(1))
            });
        if let Some(ip) = ip {
            self.sub_ip(ip, 1);
        }
    }

    /// Adds `n` clients at `ip` (a loop starts counting per IP).
    pub fn add_ip(&self, ip: IpAddr, n: u32) {
        *self.map().entry(ip).or_insert(0) += n;
    }

    /// Takes `n` clients at `ip` away (a loop stops counting per IP).
    pub fn sub_ip(&self, ip: IpAddr, n: u32) {
        let mut map = self.map();
        if let Some(count) = map.get_mut(&ip) {
            *count = count.saturating_sub(n);
            if *count == 0 {
                map.remove(&ip);
            }
        }
    }

    /// Members of room `name` in all.
    pub fn members(&self, name: &[u8]) -> usize {
        self.room_map().get(name).map_or(0, |&n| n as usize)
    }

    /// Named rooms with members in some loop.
    pub fn rooms(&self) -> usize {
        self.room_map().len()
    }

    /// A member joined room `name`.
    pub fn member_added(&self, name: &[u8]) {
        let mut map = self.room_map();
        match map.get_mut(name) {
            Some(n) => *n += 1,
            None => {
                map.insert(name.into(), 1);
            }
        }
    }

    /// A member left room `name`.
    pub fn member_removed(&self, name: &[u8]) {
        let mut map = self.room_map();
        if let Some(n) = map.get_mut(name) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(name);
            }
        }
    }

    fn room_map(&self) -> std::sync::MutexGuard<'_, HashMap<Box<[u8]>, u32>> {
        self.rooms.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The per-IP map. A loop that panicked while holding it left the
    /// counts as they were (each update is one entry): carry on.
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, u32>> {
        self.per_ip.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_go_up_and_down_and_never_below_zero() {
        let c = Census::default();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        c.joined(Some(ip));
        c.joined(Some(ip));
        c.joined(None);
        assert_eq!((c.clients(), c.at(&ip)), (3, 2));
        c.left(Some(ip));
        c.left(None);
        c.left(None);
        c.left(None);
        assert_eq!((c.clients(), c.at(&ip)), (0, 1));
        c.sub_ip(ip, 5);
        assert_eq!(c.at(&ip), 0);
        c.member_added(b"red");
        c.member_added(b"red");
        c.member_added(b"blue");
        assert_eq!((c.members(b"red"), c.rooms()), (2, 2));
        c.member_removed(b"blue");
        c.member_removed(b"blue");
        assert_eq!((c.members(b"blue"), c.rooms()), (0, 1));
    }
}
