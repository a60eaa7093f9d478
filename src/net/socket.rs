//! Creating the relay's UDP socket(s): bind, buffer sizes, drop reporting,
//! and the group of sockets several loops share one address with.
//!
//! socket2 sets the options std doesn't expose; the result is handed to mio.
//! Large buffers matter more for a relay than for most services: one
//! scheduling hiccup of the loop must not overflow the receive queue, and
//! one fan-out queues a datagram per recipient in the send queue.
//!
//! One address, one relay: an address another socket holds is an error
//! that names the holder, whatever the number of loops ([`bind_group`]);
//! the loops' SO_REUSEPORT group is steered by a program that never picks
//! a socket that joins it later ([`crate::net::steering`]).

use std::net::SocketAddr;
use std::os::fd::AsFd;

use socket2::{Domain, Protocol, Socket, Type};

use crate::error::Error;
use crate::net::holders::{self, Claim};
use crate::net::{batch_io, steering};

/// A bound, non-blocking relay socket and what the kernel granted.
#[derive(Debug)]
pub struct Bound {
    /// The socket, ready to register with mio.
    pub socket: mio::net::UdpSocket,
    /// The address actually bound (port 0 resolved).
    pub local_addr: SocketAddr,
    /// SO_RCVBUF granted (Linux reports twice this, the doubled part
    /// being its bookkeeping overhead).
    pub recv_buffer: usize,
    /// SO_SNDBUF granted.
    pub send_buffer: usize,
    /// Bound to a wildcard address, the kernel reports each datagram's
    /// local address (IP_PKTINFO / IPV6_RECVPKTINFO), so that replies can
    /// leave from it ([`crate::net::local_addrs`]).
    pub pktinfo: bool,
}

/// Binds a server's UDP socket at `addr`, asking for the given buffer
/// sizes; `what` names it in errors ("relay socket", "echo socket").
/// With `reuse_port`, SO_REUSEPORT is set first, so that the sockets of
/// several loops can share the address: [`bind_group`] uses it for all but
/// its first socket. Without it, a taken address is an error, as it should
/// be for a lone server, and the error names who holds it.
///
/// A buffer the kernel caps below the request is not an error: it is logged
/// with the sysctl that lifts the cap.
pub fn bind(
    addr: SocketAddr,
    what: &'static str,
    recv_buffer: usize,
    send_buffer: usize,
    reuse_port: bool,
) -> Result<Bound, Error> {
    let bind_error = |e: std::io::Error| Error::Bind {
        what,
        addr,
        reason: if e.kind() == std::io::ErrorKind::AddrInUse {
            format!("{e}; {}", holders::address_in_use(addr))
        } else {
            e.to_string()
        },
    };
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))
        .map_err(bind_error)?;
    socket
        .set_nonblocking(true)
        .map_err(|e| Error::io("set O_NONBLOCK", e))?;
    if reuse_port {
        socket.set_reuse_port(true).map_err(bind_error)?;
    }
    ask_buffers(&socket, recv_buffer, send_buffer, false);
    socket.bind(&addr.into()).map_err(bind_error)?;
    Ok(prepare(socket, addr))
}

/// Asks for socket buffers of `recv` and `send` bytes, best effort.
///
/// The kernel caps both at net.core.{r,w}mem_max. The receive buffer is
/// forced past its cap where the process may (CAP_NET_ADMIN), as systemd's
/// `ReceiveBuffer=` does: it is what rides out a loop's stall, and an
/// operator who asked for a size gets it. The send buffer is not forced:
/// a queue the kernel pushes back on (EAGAIN) is what parks a fan-out,
/// where a bigger one would let a NIC's queue overflow, and UDP does not
/// report those drops to the sender.
///
/// With `keep_bigger` (a socket a service manager or the previous process
/// set up) nothing is lowered: a buffer bigger than asked is left as it is,
/// and the plain option, which would cap a forced buffer at the sysctl, is
/// used only where that grows it. Otherwise (a socket just made) the sizes
/// asked for are set, smaller ones too.
pub(crate) fn ask_buffers(socket: &Socket, recv: usize, send: usize, keep_bigger: bool) {
    use nix::sys::socket::{setsockopt, sockopt};
    let recv_now = granted(socket.recv_buffer_size());
    if !keep_bigger {
        let _ = socket.set_recv_buffer_size(recv);
        if granted(socket.recv_buffer_size()) < recv {
            let _ = setsockopt(socket, sockopt::RcvBufForce, &recv);
        }
        let _ = socket.set_send_buffer_size(send);
    } else {
        if recv_now < recv
            && setsockopt(socket, sockopt::RcvBufForce, &recv).is_err()
            && recv.min(core_cap("rmem_max")) > recv_now
        {
            let _ = socket.set_recv_buffer_size(recv);
        }
        let send_now = granted(socket.send_buffer_size());
        if send.min(core_cap("wmem_max")) > send_now {
            let _ = socket.set_send_buffer_size(send);
        }
    }
}

/// `net.core.NAME` (rmem_max, wmem_max): what a plain SO_RCVBUF/SO_SNDBUF
/// grants at most; 0 if it cannot be read (then nothing is re-asked).
fn core_cap(name: &str) -> usize {
    std::fs::read_to_string(format!("/proc/sys/net/core/{name}"))
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(0)
}

/// What the kernel granted, from what it reports (twice the size, the
/// doubled part being its bookkeeping), or 0 if it cannot say.
fn granted(reported: std::io::Result<usize>) -> usize {
    reported.unwrap_or(0) / 2
}

/// Makes a bound, non-blocking socket a [`Bound`]: asks for the kernel's
/// drop counter, and on a wildcard address for each datagram's local
/// address, and reads what the kernel granted. `addr` stands in for the
/// socket's address if the kernel cannot say it.
pub(crate) fn prepare(socket: Socket, addr: SocketAddr) -> Bound {
    if let Err(e) = batch_io::enable_rxq_ovfl(socket.as_fd()) {
        tracing::warn!(event = "rxq_ovfl_unavailable", error = %e, "SO_RXQ_OVFL unavailable ({e}): udphub_kernel_rx_dropped_total will stay 0");
    }
    // On a wildcard address the kernel would answer from whatever address
    // the route picks; bound to one address, the source is right already
    // and the datagrams carry nothing more.
    let pktinfo = addr.ip().to_canonical().is_unspecified()
        && match batch_io::enable_pktinfo(socket.as_fd(), addr.is_ipv6()) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(
                    event = "pktinfo_unavailable",
                    error = %e,
                    "cannot learn each datagram's local address ({e}): on a host with several addresses, replies leave from whatever address the route picks; bind a specific address with --bind"
                );
                false
            }
        };
    let got_recv = granted(socket.recv_buffer_size());
    let got_send = granted(socket.send_buffer_size());
    let local_addr = socket
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .unwrap_or(addr);
    let std_socket: std::net::UdpSocket = socket.into();
    Bound {
        socket: mio::net::UdpSocket::from_std(std_socket),
        local_addr,
        recv_buffer: got_recv,
        send_buffer: got_send,
        pktinfo,
    }
}

/// Says once per process (not per loop) when the kernel granted smaller
/// socket buffers than asked (it caps them at `net.core.{r,w}mem_max`;
/// Linux grants min(asked, cap)). With the default sizes that is an info
/// line: the relay runs well on the kernel's cap, and a newcomer can do
/// nothing about it at start; the sysctl is there for whoever sees kernel
/// drops (`udphub_kernel_rx_dropped_total`). Sizes the operator asked for
/// (`explicit`) and did not get are a warning.
pub fn report_buffers(bound: &Bound, asked_recv: usize, asked_send: usize, explicit: bool) {
    let mut capped = Vec::new();
    let mut sysctl = Vec::new();
    for (name, knob, asked, got) in [
        (
            "SO_RCVBUF",
            "net.core.rmem_max",
            asked_recv,
            bound.recv_buffer,
        ),
        (
            "SO_SNDBUF",
            "net.core.wmem_max",
            asked_send,
            bound.send_buffer,
        ),
    ] {
        if got < asked {
            capped.push(format!("{name} {got} B of {asked} B asked"));
            sysctl.push(format!("{knob}={asked}"));
        }
    }
    if capped.is_empty() {
        return;
    }
    let line = format!(
        "socket buffers capped by the kernel: {}; if udphub_kernel_rx_dropped_total grows under bursts, raise the cap with `sysctl -w {}`",
        capped.join(", "),
        sysctl.join(" ")
    );
    let (recv, send) = (bound.recv_buffer, bound.send_buffer);
    if explicit {
        tracing::warn!(
            event = "buffers_capped",
            recv_buffer = recv,
            send_buffer = send,
            asked_recv,
            asked_send,
            "{line}"
        );
    } else {
        tracing::info!(
            event = "buffers_capped",
            recv_buffer = recv,
            send_buffer = send,
            asked_recv,
            asked_send,
            "{line}"
        );
    }
}

/// The sockets of `n` loops on one address, and the relay's claim on it.
#[derive(Debug)]
pub struct Group {
    /// One socket per loop, in the order they joined the group (loop `i`
    /// gets the clients the steering program sends to index `i`).
    pub members: Vec<Bound>,
    /// The address and the sockets' inodes, to check that no foreign
    /// socket shares the address (at start, and later from the runtime).
    pub claim: Claim,
}

/// The sockets another udphub process handed over (`serve --takeover`),
/// as the group it bound: each must be a UDP socket bound to `addr` (the
/// same port, or any port when `addr`'s is 0). They keep every option the
/// old process set (buffers, SO_RXQ_OVFL, packet info, the group's
/// steering program), and their queues: nothing that waited in them is
/// lost. Buffers are asked for as this process's settings say
/// (`recv_buffer`, `send_buffer`), never lowered.
pub fn adopt_group(
    addr: SocketAddr,
    fds: Vec<std::os::fd::OwnedFd>,
    recv_buffer: usize,
    send_buffer: usize,
) -> Result<Group, Error> {
    let what = "relay socket";
    let mut members = Vec::with_capacity(fds.len());
    for fd in fds {
        let socket = Socket::from(fd);
        let fail = |reason: String| Error::Bind { what, addr, reason };
        match socket.r#type() {
            Ok(Type::DGRAM) => {}
            _ => return Err(fail("a descriptor handed over is not a UDP socket".into())),
        }
        let local_addr = socket
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .ok_or_else(|| fail("a socket handed over is not bound to an IP address".into()))?;
        if local_addr.ip() != addr.ip() || (addr.port() != 0 && local_addr.port() != addr.port()) {
            return Err(fail(format!(
                "the socket handed over is bound to {local_addr}: start the new process with --bind {local_addr}"
            )));
        }
        socket
            .set_nonblocking(true)
            .map_err(|e| Error::io("set O_NONBLOCK", e))?;
        ask_buffers(&socket, recv_buffer, send_buffer, true);
        let recv_granted = granted(socket.recv_buffer_size());
        let send_granted = granted(socket.send_buffer_size());
        let std_socket: std::net::UdpSocket = socket.into();
        members.push(Bound {
            socket: mio::net::UdpSocket::from_std(std_socket),
            local_addr,
            recv_buffer: recv_granted,
            send_buffer: send_granted,
            pktinfo: local_addr.ip().to_canonical().is_unspecified(),
        });
    }
    let first = members.first().map_or(addr, |m| m.local_addr);
    let v6only = first.is_ipv6()
        && members
            .first()
            .is_some_and(|m| socket2::SockRef::from(&m.socket).only_v6().unwrap_or(false));
    let inodes = members
        .iter()
        .map(|m| holders::socket_inode(m.socket.as_fd()))
        .collect::<Result<Vec<u64>, _>>();
    Ok(Group {
        members,
        claim: Claim::new(first, v6only, inodes.ok()),
    })
}

/// Binds `n` sockets for `n` loops on `addr` (see [`bind`] for the rest).
///
/// The first socket is bound *without* SO_REUSEPORT, so a socket that
/// already holds the address — another relay, whatever its `--threads`,
/// or anything else — makes it fail with a message naming the holder;
/// only then is SO_REUSEPORT turned on for it and the others join it
/// (the kernel makes the first the group's first member when the second
/// joins). The group then gets a steering program that only ever picks
/// its first `n` sockets, by a hash of the source alone, so a same-user
/// socket that joins it later gets none of the relay's datagrams and
/// moves no client to another loop. Last, the kernel's table is read to
/// check that nobody joined during the few microseconds the address was
/// open to joiners before the program was in place: if someone did, the
/// group is closed and the error names them.
pub fn bind_group(
    addr: SocketAddr,
    what: &'static str,
    recv_buffer: usize,
    send_buffer: usize,
    n: usize,
) -> Result<Group, Error> {
    let n = n.clamp(1, steering::MAX_LOOPS as usize);
    let first = bind(addr, what, recv_buffer, send_buffer, false)?;
    let addr = first.local_addr;
    let fail = |reason: String| Error::Bind { what, addr, reason };
    let first_ref = socket2::SockRef::from(&first.socket);
    let v6only = addr.is_ipv6() && first_ref.only_v6().unwrap_or(false);
    if n > 1 {
        first_ref
            .set_reuse_port(true)
            .map_err(|e| fail(format!("cannot set SO_REUSEPORT: {e}")))?;
    }
    let mut members = vec![first];
    for _ in 1..n {
        members.push(bind(addr, what, recv_buffer, send_buffer, true)?);
    }
    if n > 1 {
        batch_io::attach_reuseport_cbpf(members[0].socket.as_fd(), &steering::program(n as u32))
            .map_err(|e| {
                Error::io(
                    "attach the loops' steering program (SO_ATTACH_REUSEPORT_CBPF, Linux 4.5+)",
                    e,
                )
            })?;
    }
    // Without /proc the relay runs, unchecked: the address is still held
    // against other relays and steered past joiners.
    let inodes = members
        .iter()
        .map(|m| holders::socket_inode(m.socket.as_fd()))
        .collect::<Result<Vec<u64>, _>>();
    let claim = Claim::new(addr, v6only, inodes.ok());
    if n > 1 {
        match claim.foreign() {
            Ok(foreign) if !foreign.is_empty() => {
                return Err(fail(format!(
                    "another socket joined the address while udphub was binding it: {}; stop that process and start udphub again",
                    holders::describe(&foreign, true)
                )));
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(event = "holders_unreadable", addr = %addr, error = %e, "udphub cannot check that no other process shares {addr}: {e}")
            }
        }
    }
    Ok(Group { members, claim })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binds_port_zero_and_reports_buffers() {
        let b = bind(
            "127.0.0.1:0".parse().unwrap(),
            "test socket",
            1 << 16,
            1 << 16,
            false,
        )
        .unwrap();
        assert_ne!(b.local_addr.port(), 0);
        assert!(b.recv_buffer >= 1 << 15);
        assert!(b.send_buffer > 0);
        // One address: the source is right without PKTINFO.
        assert!(!b.pktinfo);
    }

    #[test]
    fn a_taken_address_is_a_usage_error() {
        let first = bind(
            "127.0.0.1:0".parse().unwrap(),
            "relay socket",
            4096,
            4096,
            false,
        )
        .unwrap();
        let err = bind(first.local_addr, "relay socket", 4096, 4096, false).unwrap_err();
        assert!(err.is_usage());
        assert!(
            err.to_string().contains("cannot bind relay socket"),
            "{err}"
        );
    }

    #[test]
    fn reuse_port_lets_loops_share_an_address_and_nobody_else() {
        let a = bind(
            "127.0.0.1:0".parse().unwrap(),
            "relay socket",
            4096,
            4096,
            true,
        )
        .unwrap();
        let b = bind(a.local_addr, "relay socket", 4096, 4096, true).unwrap();
        assert_eq!(a.local_addr, b.local_addr);
        // A socket without SO_REUSEPORT cannot join the group.
        assert!(bind(a.local_addr, "relay socket", 4096, 4096, false).is_err());
    }

    /// Datagrams waiting on a member, drained without blocking.
    fn waiting(b: &Bound) -> usize {
        let mut buf = [0u8; 16];
        std::iter::from_fn(|| b.socket.recv(&mut buf).ok()).count()
    }

    #[test]
    fn a_group_holds_its_address_against_any_other_bind() {
        let here = format!("held by pid {}", std::process::id());
        let group = bind_group(
            "127.0.0.1:0".parse().unwrap(),
            "relay socket",
            4096,
            4096,
            3,
        )
        .unwrap();
        let addr = group.claim.addr();
        assert_eq!(group.members.len(), 3);
        assert!(group.members.iter().all(|m| m.local_addr == addr));
        // A second relay, whatever its number of loops, is told who holds it.
        for n in [1, 2, 4] {
            let err = bind_group(addr, "relay socket", 4096, 4096, n).unwrap_err();
            assert!(err.is_usage(), "{err}");
            let said = err.to_string();
            assert!(
                said.contains(&addr.to_string()) && said.contains(&here),
                "{said}"
            );
            assert!(said.contains("--bind"), "{said}");
        }
        // And a lone relay's address is just as taken.
        let lone = bind_group(
            "127.0.0.1:0".parse().unwrap(),
            "relay socket",
            4096,
            4096,
            1,
        )
        .unwrap();
        let err = bind_group(lone.claim.addr(), "relay socket", 4096, 4096, 2).unwrap_err();
        assert!(err.to_string().contains(&here), "{err}");
    }

    #[test]
    fn a_socket_that_joins_the_group_later_gets_nothing() {
        let group = bind_group(
            "127.0.0.1:0".parse().unwrap(),
            "relay socket",
            1 << 16,
            4096,
            2,
        )
        .unwrap();
        let addr = group.claim.addr();
        assert!(group.claim.foreign().unwrap().is_empty());
        let stranger = Socket::new(Domain::IPV4, Type::DGRAM, None).unwrap();
        stranger.set_reuse_port(true).unwrap();
        stranger.bind(&addr.into()).unwrap();
        stranger.set_nonblocking(true).unwrap();
        let stranger: std::net::UdpSocket = stranger.into();
        let per_member = spread(&group, "127.0.0.1:0", addr, 100);
        assert_eq!(per_member.iter().sum::<usize>(), 100, "{per_member:?}");
        assert!(per_member.iter().all(|&n| n > 20), "{per_member:?}");
        let mut buf = [0u8; 16];
        assert!(
            stranger.recv(&mut buf).is_err(),
            "the stranger got a datagram"
        );
        // The claim sees it.
        let foreign = group.claim.foreign().unwrap();
        assert_eq!(foreign.len(), 1);
        assert_eq!(foreign[0].local, addr);
    }

    /// Sends one datagram from each of `n` fresh sockets bound to `local`
    /// to `to`, and counts what each member of `group` got.
    fn spread(group: &Group, local: &str, to: SocketAddr, n: usize) -> Vec<usize> {
        let clients: Vec<std::net::UdpSocket> = (0..n)
            .map(|_| std::net::UdpSocket::bind(local).unwrap())
            .collect();
        for c in &clients {
            c.send_to(b"x", to).unwrap();
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        let mut per_member = vec![0usize; group.members.len()];
        while per_member.iter().sum::<usize>() < n && std::time::Instant::now() < deadline {
            for (i, m) in group.members.iter().enumerate() {
                per_member[i] += waiting(m);
            }
        }
        per_member
    }

    #[test]
    fn ipv6_and_ipv4_mapped_sources_are_steered_too() {
        // IPv6 datagrams: the program reads an IPv6 header.
        let v6 = bind_group("[::1]:0".parse().unwrap(), "relay socket", 1 << 16, 4096, 2).unwrap();
        let got = spread(&v6, "[::1]:0", v6.claim.addr(), 100);
        assert_eq!(got.iter().sum::<usize>(), 100, "{got:?}");
        assert!(got.iter().all(|&n| n > 20), "{got:?}");
        // IPv4 datagrams reaching IPv6 sockets (`::ffff:127.0.0.1`): the
        // program reads the IPv4 header they arrive with.
        let mapped = bind_group(
            "[::ffff:127.0.0.1]:0".parse().unwrap(),
            "relay socket",
            1 << 16,
            4096,
            2,
        )
        .unwrap();
        let port = mapped.claim.addr().port();
        let to: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let got = spread(&mapped, "127.0.0.1:0", to, 100);
        assert_eq!(got.iter().sum::<usize>(), 100, "{got:?}");
        assert!(got.iter().all(|&n| n > 20), "{got:?}");
    }
}
