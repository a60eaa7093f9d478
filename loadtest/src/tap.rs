//! A tap on everything the relay sends: a raw `IPPROTO_UDP` socket (root or
//! CAP_NET_RAW) gets a copy of every UDP datagram delivered on this host,
//! and a socket filter keeps only those from the relay's address and port.
//! So loadtest counts the bytes the relay sent to every forged source —
//! millions of addresses nobody listens on — not just to the few bound
//! victims. Black box: it reads the wire, not the relay.
//!
//! On loopback every 127/8 address is local, so the relay's datagrams to
//! forged sources are delivered (and then find no socket): the tap sees
//! them all, unless the host's backlog dropped them first, in which case
//! they never left for anyone. Datagrams the tap itself had no room for are
//! counted (`SO_RXQ_OVFL`), so a full tap makes the figures a lower bound
//! that says so.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use serde::Serialize;

/// Receive buffer asked for (with `SO_RCVBUFFORCE`, as root): a second of
/// the most cookie replies a relay sends (tens of thousands) fits.
const TAP_BUFFER: usize = 32 << 20;

/// What the tap saw the relay send.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct TapCounts {
    /// Datagrams from the relay, to anyone.
    pub datagrams: u64,
    /// Their UDP payload bytes.
    pub bytes: u64,
    /// Datagrams to the forged sources (bound victims included).
    pub to_forged_datagrams: u64,
    /// Their UDP payload bytes.
    pub to_forged_bytes: u64,
    /// Datagrams the tap had no room for (the figures above miss them).
    pub dropped: u64,
}

/// The tap's thread; [`Tap::stop`] ends it and returns the counts.
pub struct Tap {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<TapCounts>,
}

impl Tap {
    /// Starts counting what `relay` sends; a destination for which
    /// `forged` is true counts as a forged source.
    pub fn start(
        relay: SocketAddrV4,
        forged: impl Fn(Ipv4Addr) -> bool + Send + 'static,
    ) -> Result<Tap, String> {
        let sock = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::RAW,
            Some(socket2::Protocol::UDP),
        )
        .map_err(|e| format!("the tap needs a raw socket (root or CAP_NET_RAW): {e}"))?;
        sock.attach_filter(&filter(relay))
            .map_err(|e| format!("the tap's socket filter: {e}"))?;
        // As root the limit (net.core.rmem_max) does not apply; otherwise
        // the default buffer, and drops are counted.
        let _ = nix::sys::socket::setsockopt(
            &sock,
            nix::sys::socket::sockopt::RcvBufForce,
            &TAP_BUFFER,
        );
        nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::RxqOvfl, &1)
            .map_err(|e| format!("SO_RXQ_OVFL on the tap: {e}"))?;
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .map_err(|e| e.to_string())?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || read(&sock, &flag, forged));
        Ok(Tap { stop, thread })
    }

    /// Stops the tap (within its 50 ms read timeout) and returns the counts.
    pub fn stop(self) -> TapCounts {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

fn read(sock: &socket2::Socket, stop: &AtomicBool, forged: impl Fn(Ipv4Addr) -> bool) -> TapCounts {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, SockaddrIn};
    let mut counts = TapCounts::default();
    let mut buf = vec![0u8; 65_536];
    let mut cmsg = nix::cmsg_space!(u32);
    while !stop.load(Ordering::Relaxed) {
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let (n, overflow) = match recvmsg::<SockaddrIn>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::empty(),
        ) {
            Ok(msg) => {
                let overflow = msg.cmsgs().ok().and_then(|mut c| {
                    c.find_map(|m| match m {
                        ControlMessageOwned::RxqOvfl(d) => Some(d),
                        _ => None,
                    })
                });
                (msg.bytes, overflow)
            }
            // Timeouts (EAGAIN) and interruptions: look at the flag again.
            Err(_) => continue,
        };
        if let Some(d) = overflow {
            // The kernel's count since the socket opened.
            counts.dropped = u64::from(d);
        }
        let Some((dest, payload)) = parse(&buf[..n]) else {
            continue;
        };
        counts.datagrams += 1;
        counts.bytes += payload as u64;
        if forged(dest) {
            counts.to_forged_datagrams += 1;
            counts.to_forged_bytes += payload as u64;
        }
    }
    counts
}

/// An IPv4+UDP packet's destination address and UDP payload length, if it
/// is one (the tap's own filter already chose the source).
pub fn parse(packet: &[u8]) -> Option<(Ipv4Addr, usize)> {
    let ihl = usize::from(*packet.first()? & 0x0f) * 4;
    if packet.first()? >> 4 != 4 || ihl < 20 || *packet.get(9)? != 17 {
        return None;
    }
    let dest: [u8; 4] = packet.get(16..20)?.try_into().ok()?;
    let udp = packet.get(ihl..ihl + 8)?;
    let udp_len = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
    Some((Ipv4Addr::from(dest), udp_len.checked_sub(8)?))
}

/// Classic BPF: accept IPv4 packets whose source is `relay`'s address and
/// whose UDP source port is `relay`'s port; drop everything else in the
/// kernel (the flood itself passes this host a million times a second).
fn filter(relay: SocketAddrV4) -> [socket2::SockFilter; 7] {
    // Opcodes from linux/filter.h.
    const LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
    const LDX_B_MSH: u16 = 0xb1; // BPF_LDX | BPF_B | BPF_MSH
    const LD_H_IND: u16 = 0x48; // BPF_LD | BPF_H | BPF_IND
    const JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
    const RET_K: u16 = 0x06; // BPF_RET | BPF_K
    use socket2::SockFilter as F;
    [
        F::new(LD_W_ABS, 0, 0, 12),                   // A = source address
        F::new(JEQ_K, 0, 4, u32::from(*relay.ip())),  // not the relay's: drop
        F::new(LDX_B_MSH, 0, 0, 0),                   // X = IP header length
        F::new(LD_H_IND, 0, 0, 0),                    // A = UDP source port
        F::new(JEQ_K, 0, 1, u32::from(relay.port())), // not the relay's: drop
        F::new(RET_K, 0, 0, 0x0004_0000),             // keep (whole packet)
        F::new(RET_K, 0, 0, 0),                       // drop
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_destination_and_payload_length() {
        let mut p = Vec::new();
        crate::spoof::forged(
            SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 1), 9999),
            SocketAddrV4::new(Ipv4Addr::new(127, 1, 2, 3), 61_000),
            b"^cookie^abc",
            &mut p,
        );
        assert_eq!(parse(&p), Some((Ipv4Addr::new(127, 1, 2, 3), 11)));
        assert_eq!(parse(&p[..25]), None, "cut inside the UDP header");
        assert_eq!(parse(&[]), None);
        p[9] = 6;
        assert_eq!(parse(&p), None, "not UDP");
    }
}
