//! Client addresses kept in the kernel's own `sockaddr` byte layout.
//!
//! The relay sends every message to many destinations with `sendmmsg`, which
//! wants a `sockaddr_in`/`sockaddr_in6` per destination. Converting a
//! [`SocketAddr`] for every delivery would be wasted work, so each client's
//! address is stored once, already in the layout the kernel reads, and that
//! same value is the client table's key: an address read by `recvmmsg` is
//! looked up without any conversion at all.
//!
//! Beside the peer's address, a [`RawAddr`] carries a one-byte tag the
//! runtime gives it: which of the relay's own addresses the peer sent to
//! (see [`RawAddr::local`]). It lives in what would otherwise be padding,
//! so it costs no memory, and it is not part of the address's identity.
//!
//! Everything here is safe byte manipulation; the batched-syscall module only
//! ever borrows the bytes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

/// Size of `struct sockaddr_in6`, the larger of the two address families.
pub const SOCKADDR_MAX: usize = 28;
/// Size of `struct sockaddr_in`.
const SOCKADDR_IN_LEN: usize = 16;

const AF_INET: u16 = libc::AF_INET as u16;
const AF_INET6: u16 = libc::AF_INET6 as u16;

/// A socket address in the kernel's `sockaddr_in` / `sockaddr_in6` layout.
///
/// 32 bytes, 4-aligned, `Copy`, with `Eq` and `Hash` over the normalized bytes
/// (padding and IPv6 flow labels zeroed), so two datagrams from the same source
/// always map to the same table entry. The [`local`](RawAddr::local) tag
/// is left out of both.
#[derive(Clone, Copy)]
#[repr(C, align(4))]
pub struct RawAddr {
    /// `sockaddr_in` (first 16 bytes) or `sockaddr_in6` (all 28), rest zero.
    bytes: [u8; SOCKADDR_MAX],
    /// How many of `bytes` are the address: 16 or 28.
    len: u8,
    /// Which of the relay's own addresses the peer sent to: an index the
    /// runtime assigns and reads (0: none known), opaque to the core. It
    /// fills a byte of the padding after `len`, so a client costs nothing
    /// more for it.
    local: u8,
}

impl PartialEq for RawAddr {
    fn eq(&self, other: &RawAddr) -> bool {
        self.bytes == other.bytes && self.len == other.len
    }
}

impl Eq for RawAddr {}

impl std::hash::Hash for RawAddr {
    /// The same bytes `eq` compares, as two 128-bit words: the table's
    /// hasher (foldhash) takes a word in one multiply, where a 28-byte
    /// slice goes its long path behind a length prefix (a quarter of the
    /// time a hand-over spent registering a million members).
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let b = &self.bytes;
        let mut lo = [0u8; 16];
        lo.copy_from_slice(&b[..16]);
        let mut hi = [0u8; 16];
        hi[..12].copy_from_slice(&b[16..]);
        hi[12] = self.len;
        state.write_u128(u128::from_ne_bytes(lo));
        state.write_u128(u128::from_ne_bytes(hi));
    }
}

impl RawAddr {
    /// Encodes a std socket address.
    pub fn from_socket_addr(addr: SocketAddr) -> RawAddr {
        let mut bytes = [0u8; SOCKADDR_MAX];
        match addr {
            SocketAddr::V4(v4) => {
                bytes[0..2].copy_from_slice(&AF_INET.to_ne_bytes());
                bytes[2..4].copy_from_slice(&v4.port().to_be_bytes());
                bytes[4..8].copy_from_slice(&v4.ip().octets());
                RawAddr {
                    bytes,
                    len: SOCKADDR_IN_LEN as u8,
                    local: 0,
                }
            }
            SocketAddr::V6(v6) => {
                bytes[0..2].copy_from_slice(&AF_INET6.to_ne_bytes());
                bytes[2..4].copy_from_slice(&v6.port().to_be_bytes());
                // bytes[4..8]: flow info, deliberately left zero (not part of identity).
                bytes[8..24].copy_from_slice(&v6.ip().octets());
                bytes[24..28].copy_from_slice(&v6.scope_id().to_ne_bytes());
                RawAddr {
                    bytes,
                    len: SOCKADDR_MAX as u8,
                    local: 0,
                }
            }
        }
    }

    /// Decodes what the kernel wrote into a `msg_name` buffer.
    ///
    /// Returns `None` for a family other than IPv4/IPv6 or a short buffer;
    /// a UDP socket never produces either, but this is input from outside.
    pub fn from_kernel(name: &[u8]) -> Option<RawAddr> {
        if name.len() < 2 {
            return None;
        }
        let family = u16::from_ne_bytes([name[0], name[1]]);
        let mut bytes = [0u8; SOCKADDR_MAX];
        match family {
            AF_INET if name.len() >= SOCKADDR_IN_LEN => {
                // family, port, address; sin_zero stays zero.
                bytes[0..8].copy_from_slice(&name[0..8]);
                Some(RawAddr {
                    bytes,
                    len: SOCKADDR_IN_LEN as u8,
                    local: 0,
                })
            }
            AF_INET6 if name.len() >= SOCKADDR_MAX => {
                bytes[0..4].copy_from_slice(&name[0..4]);
                // skip flow info (4..8): it may differ between datagrams of one peer.
                bytes[8..28].copy_from_slice(&name[8..28]);
                Some(RawAddr {
                    bytes,
                    len: SOCKADDR_MAX as u8,
                    local: 0,
                })
            }
            _ => None,
        }
    }

    /// The address as a std [`SocketAddr`].
    pub fn to_socket_addr(&self) -> SocketAddr {
        let b = &self.bytes;
        let port = u16::from_be_bytes([b[2], b[3]]);
        if usize::from(self.len) == SOCKADDR_IN_LEN {
            let ip = Ipv4Addr::new(b[4], b[5], b[6], b[7]);
            SocketAddr::V4(SocketAddrV4::new(ip, port))
        } else {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&b[8..24]);
            let scope = u32::from_ne_bytes([b[24], b[25], b[26], b[27]]);
            SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::from(octets), port, 0, scope))
        }
    }

    /// The IP address, with IPv4-mapped IPv6 addresses shown as IPv4
    /// (a dual-stack socket reports IPv4 peers that way).
    pub fn display_ip(&self) -> IpAddr {
        self.to_socket_addr().ip().to_canonical()
    }

    /// The port.
    pub fn port(&self) -> u16 {
        u16::from_be_bytes([self.bytes[2], self.bytes[3]])
    }

    /// The `sockaddr` bytes the kernel reads (16 or 28 of them).
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    /// Which of the relay's own addresses the peer sent to, as the
    /// runtime tagged it (0: none known; then replies leave from whatever
    /// address the route picks). The core only carries it: from a
    /// datagram's source into the client table, and from there into the
    /// effects, so a reply or fan-out leaves from the address the client
    /// talks to.
    pub fn local(&self) -> u8 {
        self.local
    }

    /// The same address, tagged with the relay's local address `local`.
    pub fn with_local(mut self, local: u8) -> RawAddr {
        self.local = local;
        self
    }

    /// Tags this address with the relay's local address `local`, in place.
    pub fn set_local(&mut self, local: u8) {
        self.local = local;
    }
}

impl From<SocketAddr> for RawAddr {
    fn from(addr: SocketAddr) -> RawAddr {
        RawAddr::from_socket_addr(addr)
    }
}

impl std::fmt::Debug for RawAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.local {
            0 => write!(f, "RawAddr({})", self.to_socket_addr()),
            local => write!(f, "RawAddr({} via #{local})", self.to_socket_addr()),
        }
    }
}

impl std::fmt::Display for RawAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.to_socket_addr().fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn size_is_32_bytes() {
        assert_eq!(std::mem::size_of::<RawAddr>(), 32);
        // The local tag took padding: a client costs what it did.
        assert_eq!(std::mem::size_of::<crate::core::table::Client>(), 56);
    }

    #[test]
    fn the_local_tag_is_carried_but_is_not_identity() {
        use std::hash::BuildHasher;
        let sa: SocketAddr = "10.0.0.1:7".parse().unwrap();
        let plain = RawAddr::from(sa);
        let tagged = plain.with_local(3);
        assert_eq!((plain.local(), tagged.local()), (0, 3));
        assert_eq!(plain, tagged);
        let h = std::collections::hash_map::RandomState::new();
        assert_eq!(h.hash_one(plain), h.hash_one(tagged));
        // The kernel never sees it.
        assert_eq!(plain.as_bytes(), tagged.as_bytes());
        assert_eq!(tagged.to_string(), "10.0.0.1:7");
    }

    #[test]
    fn v4_uses_the_sockaddr_in_layout() {
        let sa: SocketAddr = "127.0.0.1:9999".parse().unwrap();
        let raw = RawAddr::from(sa);
        let mut want = [0u8; 16];
        want[0..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        want[2..4].copy_from_slice(&9999u16.to_be_bytes());
        want[4..8].copy_from_slice(&[127, 0, 0, 1]);
        assert_eq!(raw.as_bytes(), &want[..]);
        assert_eq!(raw.to_socket_addr(), sa);
        assert_eq!(raw.port(), 9999);
    }

    #[test]
    fn flow_info_is_not_identity() {
        let a: SocketAddr = SocketAddrV6::new(Ipv6Addr::LOCALHOST, 5, 7, 0).into();
        let b: SocketAddr = SocketAddrV6::new(Ipv6Addr::LOCALHOST, 5, 0, 0).into();
        assert_eq!(RawAddr::from(a), RawAddr::from(b));
    }

    #[test]
    fn kernel_garbage_is_rejected_not_panicked() {
        assert!(RawAddr::from_kernel(&[]).is_none());
        assert!(RawAddr::from_kernel(&[1]).is_none());
        assert!(RawAddr::from_kernel(&[0xff; 28]).is_none());
        let v4 = RawAddr::from("1.2.3.4:5".parse::<SocketAddr>().unwrap());
        assert!(RawAddr::from_kernel(&v4.as_bytes()[..10]).is_none());
    }

    #[test]
    fn mapped_v4_displays_as_v4() {
        let sa: SocketAddr = "[::ffff:10.1.2.3]:80".parse().unwrap();
        assert_eq!(RawAddr::from(sa).display_ip().to_string(), "10.1.2.3");
    }

    proptest! {
        #[test]
        fn round_trips_through_kernel_bytes(v6 in any::<bool>(), ip in any::<[u8; 16]>(), port in any::<u16>(), scope in any::<u32>()) {
            let sa: SocketAddr = if v6 {
                SocketAddrV6::new(Ipv6Addr::from(ip), port, 0, scope).into()
            } else {
                SocketAddrV4::new(Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3]), port).into()
            };
            let raw = RawAddr::from(sa);
            prop_assert_eq!(raw.to_socket_addr(), sa);
            prop_assert_eq!(RawAddr::from_kernel(raw.as_bytes()), Some(raw));
        }
    }
}
