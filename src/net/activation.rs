//! Socket activation: the relay's UDP socket(s) passed by a service
//! manager (a systemd `.socket` unit, `systemd-socket-activate
//! --datagram`) instead of bound by the relay.
//!
//! The protocol (`sd_listen_fds(3)`): `LISTEN_PID` names the process the
//! sockets are for, `LISTEN_FDS` says how many, starting at descriptor 3,
//! and `LISTEN_FDNAMES` (optional) names them, `:`-separated. The
//! variables are removed once read, so no child inherits them.
//!
//! Every inherited socket is checked before it is used: a UDP socket, on
//! an IPv4 or IPv6 address, one per loop (`--threads`), all on one
//! address. Anything else is a one-line error that says which line of the
//! `.socket` unit (or which flag) fixes it; the relay never runs on a
//! socket it did not mean to. The sockets stay in the service manager's
//! hands too, so a restart keeps the address and the datagrams queued on
//! it (docs/OPERATIONS.md, "Upgrade under systemd").

use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};

use socket2::{Domain, Protocol, Socket, Type};

use crate::error::Error;
use crate::net::holders::{self, Claim};
use crate::net::socket::{self, Bound, Group};
use crate::net::{batch_io, steering};

/// The variables of the protocol, removed once read.
const VARIABLES: [&str; 3] = ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"];

/// The sockets a service manager passed, owned.
#[derive(Debug)]
pub struct Inherited {
    /// Descriptors 3, 4, … in order.
    pub fds: Vec<OwnedFd>,
    /// Their names from `LISTEN_FDNAMES` (systemd's `FileDescriptorName=`,
    /// by default the socket unit's name), or empty.
    pub names: Vec<String>,
}

/// What the environment says, before anything is adopted.
#[derive(Debug, PartialEq, Eq)]
enum Passed {
    /// No socket for this process.
    Nothing,
    /// `LISTEN_PID` names another process (a parent's leftover).
    ForAnother(String),
    /// This many sockets, with these names.
    Sockets(usize, Vec<String>),
}

/// Reads the protocol's variables (`pid` is this process's).
fn parse(
    pid: u32,
    listen_pid: Option<&str>,
    fds: Option<&str>,
    names: Option<&str>,
) -> Result<Passed, Error> {
    let (Some(listen_pid), Some(fds)) = (listen_pid, fds) else {
        return Ok(Passed::Nothing);
    };
    if listen_pid.trim().parse::<u32>().ok() != Some(pid) {
        return Ok(Passed::ForAnother(listen_pid.to_string()));
    }
    let n: usize = fds.trim().parse().map_err(|_| {
        Error::Config(format!(
            "LISTEN_FDS={fds:?} is not a number of sockets: it is set by systemd's socket activation (udphub.socket) or systemd-socket-activate; unset it to let udphub bind --bind itself"
        ))
    })?;
    if n == 0 {
        return Ok(Passed::Nothing);
    }
    let names = names
        .map(|s| s.split(':').map(str::to_string).collect())
        .unwrap_or_default();
    Ok(Passed::Sockets(n, names))
}

/// Takes the sockets passed to this process, if any, and removes the
/// protocol's variables from the environment. Call it first thing at
/// start, before the process opens descriptors of its own and before it
/// starts threads (the environment is changed).
pub fn take_from_env() -> Result<Option<Inherited>, Error> {
    let var = |name| std::env::var(name).ok();
    let passed = parse(
        std::process::id(),
        var("LISTEN_PID").as_deref(),
        var("LISTEN_FDS").as_deref(),
        var("LISTEN_FDNAMES").as_deref(),
    );
    for name in VARIABLES {
        std::env::remove_var(name);
    }
    match passed? {
        Passed::Nothing => Ok(None),
        Passed::ForAnother(pid) => {
            tracing::info!(
                event = "activation_ignored",
                listen_pid = pid,
                "LISTEN_PID={pid} names another process: ignoring LISTEN_FDS and binding --bind"
            );
            Ok(None)
        }
        Passed::Sockets(n, names) => {
            if n > batch_io::MAX_LISTEN_FDS {
                return Err(Error::Config(format!(
                    "socket activation passed {n} sockets (LISTEN_FDS={n}); udphub runs one loop per socket and at most {}: give udphub.socket fewer ListenDatagram= lines",
                    batch_io::MAX_LISTEN_FDS
                )));
            }
            let fds = batch_io::adopt_listen_fds(n).map_err(|e| {
                Error::Config(format!(
                    "socket activation (LISTEN_FDS={n}): {e}; start udphub from its .socket unit or systemd-socket-activate, or unset LISTEN_FDS and LISTEN_PID"
                ))
            })?;
            Ok(Some(Inherited { fds, names }))
        }
    }
}

/// How descriptor `i` is named in messages: `inherited descriptor 3
/// ("udphub.socket")`.
fn describe(i: usize, names: &[String]) -> String {
    let fd = i as i32 + batch_io::LISTEN_FDS_START;
    match names.get(i).filter(|n| !n.is_empty()) {
        Some(name) => format!("inherited descriptor {fd} ({name:?})"),
        None => format!("inherited descriptor {fd}"),
    }
}

impl Inherited {
    /// Checks the sockets and makes them the loops' group: exactly
    /// `loops` UDP sockets on one IPv4 or IPv6 address (several need
    /// SO_REUSEPORT, which systemd's `ReusePort=yes` sets). Buffer sizes
    /// are asked for as when binding; with several sockets the steering
    /// program is attached as [`socket::bind_group`] does.
    pub fn into_group(
        self,
        loops: usize,
        recv_buffer: usize,
        send_buffer: usize,
    ) -> Result<Group, Error> {
        let n = self.fds.len();
        if n != loops {
            let fix = if n == 1 {
                format!(
                    "run --threads 1 (one socket, one loop), or give udphub.socket {loops} ListenDatagram= lines with the same address and ReusePort=yes"
                )
            } else {
                format!(
                    "set --threads {n}, or give udphub.socket {loops} ListenDatagram= line{} (the same address, ReusePort=yes)",
                    if loops == 1 { "" } else { "s" }
                )
            };
            return Err(Error::Config(format!(
                "socket activation passed {n} socket{} (LISTEN_FDS={n}) but --threads is {loops}: udphub runs one loop per socket; {fix}",
                if n == 1 { "" } else { "s" }
            )));
        }
        let Inherited { fds, names } = self;
        let mut sockets = Vec::with_capacity(n);
        for (i, fd) in fds.into_iter().enumerate() {
            sockets.push(check(Socket::from(fd), &describe(i, &names))?);
        }
        let mut members: Vec<Bound> = Vec::with_capacity(n);
        for (socket, addr) in sockets {
            if let Some(first) = members.first() {
                if first.local_addr != addr {
                    return Err(Error::Config(format!(
                        "socket activation passed sockets on different addresses ({} and {addr}): udphub's loops share one address; give every ListenDatagram= line of udphub.socket the same one",
                        first.local_addr
                    )));
                }
            }
            socket
                .set_nonblocking(true)
                .map_err(|e| Error::io("set O_NONBLOCK on an inherited socket", e))?;
            // Not passed on to anything udphub starts.
            let _ = socket.set_cloexec(true);
            // Never below what the service manager set (systemd forces
            // ReceiveBuffer= past net.core.rmem_max).
            socket::ask_buffers(&socket, recv_buffer, send_buffer, true);
            members.push(socket::prepare(socket, addr));
        }
        let addr = members
            .first()
            .map(|m| m.local_addr)
            .ok_or_else(|| Error::Config("socket activation passed no socket".into()))?;
        if n > 1 {
            batch_io::attach_reuseport_cbpf(
                members[0].socket.as_fd(),
                &steering::program(n as u32),
            )
            .map_err(|e| {
                Error::Config(format!(
                    "cannot steer the {n} inherited sockets on {addr} ({e}): they must share the address as one SO_REUSEPORT group; set ReusePort=yes in udphub.socket"
                ))
            })?;
        }
        let v6only = addr.is_ipv6()
            && socket2::SockRef::from(&members[0].socket)
                .only_v6()
                .unwrap_or(false);
        let inodes = members
            .iter()
            .map(|m| holders::socket_inode(m.socket.as_fd()))
            .collect::<Result<Vec<u64>, _>>();
        Ok(Group {
            members,
            claim: Claim::new(addr, v6only, inodes.ok()),
        })
    }
}

/// `socket` if it is a UDP socket bound to an IP address and port, with
/// that address; `what` names it in the error.
fn check(socket: Socket, what: &str) -> Result<(Socket, SocketAddr), Error> {
    let wrong = |is: &str| {
        Error::Config(format!(
                "{what} is {is}, not a UDP socket: udphub.socket needs ListenDatagram=ADDR:PORT (systemd-socket-activate needs --datagram)"
            ))
    };
    let kind = socket.r#type().map_err(|_| wrong("not a socket"))?;
    if kind == Type::STREAM {
        return Err(wrong("a stream (TCP) socket, from ListenStream="));
    }
    if kind != Type::DGRAM {
        return Err(wrong("a socket of another type"));
    }
    let domain = socket.domain().map_err(|_| wrong("not a socket"))?;
    if domain != Domain::IPV4 && domain != Domain::IPV6 {
        return Err(wrong("a Unix or non-IP datagram socket"));
    }
    if let Ok(Some(protocol)) = socket.protocol() {
        if protocol != Protocol::UDP {
            return Err(wrong("a datagram socket of another protocol"));
        }
    }
    let addr = socket
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .filter(|a| a.port() != 0)
        .ok_or_else(|| wrong("not bound to an address and port"))?;
    Ok((socket, addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_variables_are_read_for_this_process_only() {
        assert_eq!(parse(7, None, Some("1"), None).unwrap(), Passed::Nothing);
        assert_eq!(parse(7, Some("7"), None, None).unwrap(), Passed::Nothing);
        assert_eq!(
            parse(7, Some("8"), Some("1"), None).unwrap(),
            Passed::ForAnother("8".into())
        );
        assert_eq!(
            parse(7, Some("7"), Some("0"), None).unwrap(),
            Passed::Nothing
        );
        assert_eq!(
            parse(7, Some("7"), Some("2"), Some("udphub.socket:udphub.socket")).unwrap(),
            Passed::Sockets(2, vec!["udphub.socket".into(), "udphub.socket".into()])
        );
        let err = parse(7, Some("7"), Some("two"), None).unwrap_err();
        assert!(
            err.is_usage() && err.to_string().contains("LISTEN_FDS"),
            "{err}"
        );
    }

    fn inherited(fds: Vec<OwnedFd>) -> Inherited {
        Inherited {
            names: vec!["udphub.socket".into(); fds.len()],
            fds,
        }
    }

    fn udp(addr: &str, reuse: bool) -> OwnedFd {
        let addr: SocketAddr = addr.parse().unwrap();
        let s = Socket::new(Domain::for_address(addr), Type::DGRAM, None).unwrap();
        s.set_reuse_port(reuse).unwrap();
        s.bind(&addr.into()).unwrap();
        s.into()
    }

    #[test]
    fn a_udp_socket_becomes_the_group_and_anything_else_is_refused() {
        let one = inherited(vec![udp("127.0.0.1:0", false)]);
        let group = one.into_group(1, 1 << 16, 1 << 16).unwrap();
        assert_eq!(group.members.len(), 1);
        assert_ne!(group.claim.addr().port(), 0);

        let err = inherited(vec![udp("127.0.0.1:0", false)])
            .into_group(2, 4096, 4096)
            .unwrap_err();
        let said = err.to_string();
        assert!(err.is_usage(), "{said}");
        assert!(
            said.contains("--threads 1") && said.contains("ReusePort=yes"),
            "{said}"
        );

        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let err = inherited(vec![OwnedFd::from(tcp)])
            .into_group(1, 4096, 4096)
            .unwrap_err();
        let said = err.to_string();
        assert!(
            said.contains("stream") && said.contains("ListenDatagram="),
            "{said}"
        );
        assert!(said.contains("\"udphub.socket\""), "{said}");

        let unix = std::os::unix::net::UnixDatagram::unbound().unwrap();
        let err = inherited(vec![OwnedFd::from(unix)])
            .into_group(1, 4096, 4096)
            .unwrap_err();
        assert!(err.to_string().contains("Unix"), "{err}");

        let err = inherited(vec![udp("127.0.0.1:0", true), udp("127.0.0.1:0", true)])
            .into_group(2, 4096, 4096)
            .unwrap_err();
        assert!(err.to_string().contains("different addresses"), "{err}");
    }

    #[test]
    fn two_sockets_on_one_address_become_two_steered_loops() {
        let a = udp("127.0.0.1:0", true);
        let addr = Socket::from(a.try_clone().unwrap())
            .local_addr()
            .unwrap()
            .as_socket()
            .unwrap();
        let b = udp(&addr.to_string(), true);
        let group = inherited(vec![a, b]).into_group(2, 4096, 4096).unwrap();
        assert_eq!(group.members.len(), 2);
        assert!(group.members.iter().all(|m| m.local_addr == addr));
        assert!(group.claim.foreign().unwrap().is_empty());
    }
}
