//! Creating the relay's UDP socket: bind, buffer sizes, drop reporting.
//!
//! socket2 sets the options std doesn't expose; the result is handed to mio.
//! Large buffers matter more for a relay than for most services: one
//! scheduling hiccup of the loop must not overflow the receive queue, and
//! one fan-out queues a datagram per recipient in the send queue.

use std::net::SocketAddr;
use std::os::fd::AsFd;

use socket2::{Domain, Protocol, Socket, Type};

use crate::error::Error;
use crate::net::batch_io;

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
}

/// Binds a server's UDP socket at `addr`, asking for the given buffer
/// sizes; `what` names it in errors ("relay socket", "echo socket").
/// With `reuse_port`, SO_REUSEPORT is set first, so that several loops can
/// bind the same address (`--threads`); without it, a taken address is an
/// error, as it should be for a lone server.
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
        reason: e.to_string(),
    };
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))
        .map_err(bind_error)?;
    socket
        .set_nonblocking(true)
        .map_err(|e| Error::io("set O_NONBLOCK", e))?;
    if reuse_port {
        socket.set_reuse_port(true).map_err(bind_error)?;
    }
    // Best effort: the kernel caps these at net.core.{r,w}mem_max.
    let _ = socket.set_recv_buffer_size(recv_buffer);
    let _ = socket.set_send_buffer_size(send_buffer);
    socket.bind(&addr.into()).map_err(bind_error)?;
    if let Err(e) = batch_io::enable_rxq_ovfl(socket.as_fd()) {
        tracing::warn!("SO_RXQ_OVFL unavailable ({e}): udphub_kernel_rx_dropped_total will stay 0");
    }
    let got_recv = socket.recv_buffer_size().unwrap_or(0);
    let got_send = socket.send_buffer_size().unwrap_or(0);
    for (name, sysctl, asked, got) in [
        ("SO_RCVBUF", "net.core.rmem_max", recv_buffer, got_recv),
        ("SO_SNDBUF", "net.core.wmem_max", send_buffer, got_send),
    ] {
        // Linux grants min(asked, cap) and reports double that.
        if got / 2 < asked {
            tracing::warn!(
                "{name} capped at {} bytes (asked for {asked}); raise the cap with `sysctl -w {sysctl}={asked}`",
                got / 2
            );
        }
    }
    let local_addr = socket
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .unwrap_or(addr);
    let std_socket: std::net::UdpSocket = socket.into();
    Ok(Bound {
        socket: mio::net::UdpSocket::from_std(std_socket),
        local_addr,
        recv_buffer: got_recv / 2,
        send_buffer: got_send / 2,
    })
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
}
