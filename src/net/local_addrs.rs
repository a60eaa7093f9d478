//! The relay's own addresses that clients talk to: a small table per loop,
//! so that replies and fan-out leave from the address each client used.
//!
//! On a socket bound to a wildcard address (`0.0.0.0`, `[::]`), the kernel
//! sends from whatever address the route to the client picks. On a host
//! with several addresses that need not be the one the client sent to, and
//! a client with a connected socket (like many NATs and firewalls) drops a
//! datagram from any other. So on such a socket the kernel is asked for
//! each datagram's local address (`IP_PKTINFO` / `IPV6_PKTINFO`, see
//! [`enable_pktinfo`]); this table turns it into a one-byte tag
//! that rides on the source address ([`RawAddr::local`]) through the core
//! into the client table and back out in the effects; and every send to a
//! tagged destination carries that address's control message, encoded once
//! here ([`SourceControl`]).
//!
//! A host has few addresses, so the table is small and bounded
//! ([`MAX_LOCAL_ADDRS`]); an address beyond that is not tagged (its clients
//! are answered from whatever address the route picks, as without this
//! table) and each such datagram is counted
//! (`udphub_local_address_overflow_total`). Entries are never evicted: a
//! client's tag must keep meaning the same address while it is a member.
//!
//! On a socket bound to one address there is no table: nothing is parsed,
//! tagged or attached, and the source is right by construction.
//!
//! [`RawAddr::local`]: crate::core::addr::RawAddr::local
//! [`enable_pktinfo`]: crate::net::batch_io::enable_pktinfo

use crate::net::batch_io::{LocalAddr, SourceControl};

/// Most local addresses one loop tells apart. A multi-homed host or one
/// with a handful of service addresses has a few; 64 covers far more while
/// a lookup stays a short scan (and the last hit is checked first). The tag
/// is a byte, so this could go up to 255.
pub const MAX_LOCAL_ADDRS: usize = 64;

const _: () = assert!(MAX_LOCAL_ADDRS < u8::MAX as usize);

/// One loop's table of local addresses (tag `i + 1` is entry `i`).
#[derive(Debug)]
pub struct LocalAddrs {
    /// Whether the socket is IPv6 (it then sends IPv4 sources as mapped).
    v6_socket: bool,
    /// The addresses seen, in the order first seen.
    addrs: Vec<LocalAddr>,
    /// Their control messages, at the same positions: what sends attach.
    sources: Vec<SourceControl>,
    /// The tag of the last address looked up (0: none yet): almost every
    /// datagram goes to the same address as the one before.
    last: u8,
    /// Whether the table filled up and it was logged.
    warned: bool,
}

impl LocalAddrs {
    /// An empty table for an IPv6 (`v6_socket`) or IPv4 socket.
    pub fn new(v6_socket: bool) -> LocalAddrs {
        LocalAddrs {
            v6_socket,
            addrs: Vec::with_capacity(4),
            sources: Vec::with_capacity(4),
            last: 0,
            warned: false,
        }
    }

    /// The tag for `local`, added to the table if new: 1 ..=
    /// [`MAX_LOCAL_ADDRS`], or 0 for an address this socket cannot send
    /// from (an IPv6 one on an IPv4 socket). `None` when the table is full
    /// (for the caller to count): the datagram goes untagged.
    pub fn tag(&mut self, local: LocalAddr) -> Option<u8> {
        let last = usize::from(self.last);
        if last > 0 && self.addrs.get(last - 1) == Some(&local) {
            return Some(self.last);
        }
        if let Some(i) = self.addrs.iter().position(|a| *a == local) {
            self.last = i as u8 + 1;
            return Some(self.last);
        }
        if self.addrs.len() >= MAX_LOCAL_ADDRS {
            if !self.warned {
                self.warned = true;
                tracing::warn!(
                    event = "local_addresses_overflow",
                    max = MAX_LOCAL_ADDRS,
                    local = %local.ip,
                    "clients talk to more than {MAX_LOCAL_ADDRS} local addresses; those to {} and later ones are answered from whatever address the route picks (counted in udphub_local_address_overflow_total); bind a specific address with --bind to avoid this",
                    local.ip
                );
            }
            return None;
        }
        let Some(source) = SourceControl::new(&local, self.v6_socket) else {
            return Some(0);
        };
        self.addrs.push(local);
        self.sources.push(source);
        self.last = self.addrs.len() as u8;
        Some(self.last)
    }

    /// The control message of each tag, tag `i + 1` at index `i`: what
    /// [`SendBatch::send`](crate::net::batch_io::SendBatch::send) attaches.
    pub fn sources(&self) -> &[SourceControl] {
        &self.sources
    }

    /// How many addresses the table holds.
    pub fn len(&self) -> usize {
        self.addrs.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.addrs.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    fn local(i: u32) -> LocalAddr {
        LocalAddr {
            ip: IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i)),
            ifindex: 0,
        }
    }

    #[test]
    fn each_address_gets_one_tag_for_good() {
        let mut t = LocalAddrs::new(false);
        assert_eq!(t.tag(local(1)), Some(1));
        assert_eq!(t.tag(local(2)), Some(2));
        assert_eq!(t.tag(local(2)), Some(2));
        assert_eq!(t.tag(local(1)), Some(1));
        assert_eq!((t.len(), t.sources().len()), (2, 2));
    }

    #[test]
    fn a_full_table_tags_nothing_more_and_says_so() {
        let mut t = LocalAddrs::new(true);
        for i in 0..MAX_LOCAL_ADDRS as u32 {
            assert_eq!(t.tag(local(i)), Some(i as u8 + 1));
        }
        assert_eq!(t.tag(local(1_000)), None);
        assert_eq!(t.tag(local(1_001)), None);
        // Those already in keep their tags.
        assert_eq!(t.tag(local(7)), Some(8));
        assert_eq!(t.len(), MAX_LOCAL_ADDRS);
    }

    #[test]
    fn an_address_the_socket_cannot_send_from_is_left_untagged() {
        let mut t = LocalAddrs::new(false);
        let v6 = LocalAddr {
            ip: "2001:db8::1".parse().unwrap(),
            ifindex: 0,
        };
        assert_eq!(t.tag(v6), Some(0));
        assert!(t.is_empty());
    }
}
