//! `udphub chat --lan`: seed 003's serverless chat room over UDP broadcast.
//!
//! Every member binds the room's port with SO_REUSEADDR/SO_REUSEPORT (so
//! several members can share one host) and sends from a second socket with
//! SO_BROADCAST to the subnet's broadcast address, so each member shows as
//! its own `ip:port`. Lines are shown as `[time] ip:port: text`; members
//! announce joining and leaving.
//!
//! A broadcast leaves the host: run it on a LAN you mean to talk to (the
//! tests use network namespaces they create, never the host's own network).

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};

use socket2::{Domain, Protocol, Socket, Type};

use crate::clients::chat::{ChatArgs, Incoming, Peer, Session};
use crate::error::Error;

/// What a member sends when it joins (seed 003 sent "***加入了聊天室").
pub const JOINED: &[u8] = b"*** joined the room";
/// What a member sends when it leaves.
pub const LEFT: &[u8] = b"*** left the room";

/// Runs a LAN chat room member.
pub fn run(args: &ChatArgs) -> Result<(), Error> {
    let broadcast = args.broadcast.unwrap_or_else(default_broadcast);
    let recv = room_socket(args.port)?;
    let send = sender_socket()?;
    eprintln!(
        "udphub: LAN room on port {}, broadcasting to {broadcast}",
        args.port
    );
    Session {
        peer: Peer::Lan {
            recv,
            send,
            dest: SocketAddr::V4(SocketAddrV4::new(broadcast, args.port)),
            hello: JOINED.to_vec(),
            goodbye: LEFT.to_vec(),
        },
        name: args.name.clone(),
        room: None,
        linger: args.linger,
        render: |data, from| Incoming::Line(render(data, from, &clock())),
    }
    .run()
}

/// The room's receiving socket: `0.0.0.0:port`, shareable by members.
fn room_socket(port: u16) -> Result<UdpSocket, Error> {
    let addr = SocketAddr::from(([0, 0, 0, 0], port));
    let bind_error = |e: std::io::Error| Error::Bind {
        what: "LAN room socket",
        addr,
        reason: e.to_string(),
    };
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).map_err(bind_error)?;
    s.set_reuse_address(true).map_err(bind_error)?;
    s.set_reuse_port(true).map_err(bind_error)?;
    s.set_broadcast(true).map_err(bind_error)?;
    s.bind(&addr.into()).map_err(bind_error)?;
    Ok(s.into())
}

/// The sending socket: an ephemeral port with SO_BROADCAST.
fn sender_socket() -> Result<UdpSocket, Error> {
    let s = UdpSocket::bind("0.0.0.0:0").map_err(|e| Error::io("bind the LAN sender", e))?;
    s.set_broadcast(true)
        .map_err(|e| Error::io("enable SO_BROADCAST", e))?;
    Ok(s)
}

/// The subnet broadcast address of the first interface that is up, not
/// loopback and has one; else the limited broadcast 255.255.255.255.
pub fn default_broadcast() -> Ipv4Addr {
    use nix::net::if_::InterfaceFlags;
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Ipv4Addr::BROADCAST;
    };
    for ifa in addrs {
        let usable = ifa.flags.contains(InterfaceFlags::IFF_UP)
            && ifa.flags.contains(InterfaceFlags::IFF_BROADCAST)
            && !ifa.flags.contains(InterfaceFlags::IFF_LOOPBACK);
        if !usable {
            continue;
        }
        if let Some(b) = ifa.broadcast.as_ref().and_then(|a| a.as_sockaddr_in()) {
            return b.ip();
        }
    }
    Ipv4Addr::BROADCAST
}

/// The local wall-clock time, `HH:MM:SS`.
fn clock() -> String {
    chrono::Local::now().format("%H:%M:%S").to_string()
}

/// `[time] ip:port: text`, seed 003's line.
pub fn render(data: &[u8], from: SocketAddr, time: &str) -> Vec<u8> {
    let mut line = format!("[{time}] {}:{}: ", from.ip(), from.port()).into_bytes();
    line.extend_from_slice(data);
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_look_like_seed_003() {
        let from: SocketAddr = "198.18.77.2:40000".parse().unwrap();
        assert_eq!(
            render(b"hi", from, "12:00:00"),
            b"[12:00:00] 198.18.77.2:40000: hi"
        );
    }

    #[test]
    fn a_default_broadcast_address_is_always_found() {
        // Whatever the interfaces, the answer is a broadcast-capable v4 address.
        let b = default_broadcast();
        assert!(!b.is_loopback() && !b.is_unspecified());
    }
}
