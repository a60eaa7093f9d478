//! Who else holds a UDP address: the kernel's socket tables
//! (`/proc/net/udp`, `/proc/net/udp6`) and the processes' descriptors
//! (`/proc/<pid>/fd`), read to name a process when an address is taken,
//! and to tell the relay's own sockets from foreign ones ([`Claim`]).
//!
//! These are this network namespace's sockets, the relay's own. A process
//! is named only where this user may read its descriptors (root: all);
//! otherwise the socket's owner uid is what is known. Nothing here is on a
//! hot path: it runs when a bind fails, once after the loops' group is
//! bound, and every few seconds from the supervisor.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::Path;

/// The kernel's UDP socket tables for this namespace.
const TABLES: [(&str, bool); 2] = [("/proc/net/udp", false), ("/proc/net/udp6", true)];
/// Holders named in one message, at most (an address is rarely held by
/// more than one process).
const NAMED: usize = 3;
/// Sockets whose processes are looked up for one message, at most (a
/// relay with 64 loops holds 64).
const LOOKED_UP: usize = 64;

/// One UDP socket, as the kernel lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpEntry {
    /// Its local address (for an IPv6 socket, possibly `::ffff:a.b.c.d`).
    pub local: SocketAddr,
    /// The peer, if the socket is connected (a connected socket wins every
    /// datagram from that peer over unconnected ones on its address).
    pub remote: Option<SocketAddr>,
    /// The uid that created it (a SO_REUSEPORT group admits only its own).
    pub uid: u32,
    /// Its inode, as in `/proc/<pid>/fd/* -> socket:[inode]`.
    pub inode: u64,
}

/// Parses one of the kernel's tables (`v6`: `/proc/net/udp6`). Lines it
/// cannot read are skipped.
pub fn parse_table(text: &str, v6: bool) -> Vec<UdpEntry> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let local = parse_addr(f.get(1)?, v6)?;
            let remote = parse_addr(f.get(2)?, v6)?;
            Some(UdpEntry {
                local,
                remote: (remote.port() != 0).then_some(remote),
                uid: f.get(7)?.parse().ok()?,
                inode: f.get(9)?.parse().ok()?,
            })
        })
        .collect()
}

/// `0100007F:1F90`: the address as the kernel prints it (each 32-bit word
/// of the network-order bytes as a host-order hex number), then the port.
fn parse_addr(s: &str, v6: bool) -> Option<SocketAddr> {
    let (addr, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let words = if v6 { 4 } else { 1 };
    if addr.len() != 8 * words {
        return None;
    }
    let mut bytes = [0u8; 16];
    for w in 0..words {
        let word = u32::from_str_radix(addr.get(8 * w..8 * w + 8)?, 16).ok()?;
        bytes[4 * w..4 * w + 4].copy_from_slice(&word.to_ne_bytes());
    }
    let ip = if v6 {
        IpAddr::V6(Ipv6Addr::from(bytes))
    } else {
        IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
    };
    Some(SocketAddr::new(ip, port))
}

/// Every UDP socket in this namespace. A missing `/proc/net/udp6` (IPv6
/// disabled) is not an error.
pub fn udp_sockets() -> io::Result<Vec<UdpEntry>> {
    let mut all = Vec::new();
    for (path, v6) in TABLES {
        match std::fs::read_to_string(path) {
            Ok(text) => all.extend(parse_table(&text, v6)),
            Err(e) if v6 && e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(all)
}

/// Whether a socket on `theirs` can be why a bind to `ours` fails: the
/// same port, and the same address or a wildcard on either side.
pub fn in_conflict(ours: SocketAddr, theirs: SocketAddr) -> bool {
    let (o, t) = (ours.ip().to_canonical(), theirs.ip().to_canonical());
    ours.port() == theirs.port() && (o == t || o.is_unspecified() || t.is_unspecified())
}

/// Whether a socket on `theirs` gets datagrams meant for a relay bound to
/// `ours`, by the kernel's choice of the best match: the same port, and
/// the same address, or a more specific address the relay's wildcard
/// covers. (Beside a dual-stack `[::]`, an IPv4 `0.0.0.0` counts too: the
/// kernel prefers an IPv4 socket for IPv4 datagrams.) A wildcard beside a
/// relay on a specific address does not: the relay's socket wins.
pub fn competes(ours: SocketAddr, ours_v6only: bool, theirs: SocketAddr) -> bool {
    let (o, t) = (ours.ip().to_canonical(), theirs.ip().to_canonical());
    if ours.port() != theirs.port() {
        return false;
    }
    if o == t {
        return true;
    }
    match o {
        IpAddr::V4(o) => o.is_unspecified() && t.is_ipv4() && !t.is_unspecified(),
        IpAddr::V6(o) => o.is_unspecified() && !(ours_v6only && t.is_ipv4()),
    }
}

/// The inode of a socket of this process (`/proc/self/fd/N -> socket:[inode]`).
pub fn socket_inode(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
    inode_of(&link).ok_or_else(|| io::Error::other(format!("{} is not a socket", link.display())))
}

/// `socket:[12345]` → 12345: what a descriptor of a socket links to.
fn inode_of(link: &Path) -> Option<u64> {
    link.to_str()?
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// A process (pid and command name) holding each of `inodes`, as far as
/// this user can see: one pass over `/proc/*/fd`, stopping once all are
/// found.
pub fn processes_of(inodes: &[u64]) -> HashMap<u64, (u32, String)> {
    let mut found = HashMap::new();
    if inodes.is_empty() {
        return found;
    }
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Some(inode) = std::fs::read_link(fd.path())
                .ok()
                .and_then(|link| inode_of(&link))
            else {
                continue;
            };
            if inodes.contains(&inode) && !found.contains_key(&inode) {
                let comm = std::fs::read_to_string(entry.path().join("comm"))
                    .map(|c| c.trim_end().to_string())
                    .unwrap_or_else(|_| "?".into());
                found.insert(inode, (pid, comm));
            }
        }
        if found.len() == inodes.len() {
            break;
        }
    }
    found
}

/// Names who holds `entries`, once per process (at most three
/// names): `pid 4242 (udphub)`, or the owner's uid when the process is
/// not visible to this user. With `with_address`, each name follows the
/// socket's address (and its peer, if connected).
pub fn describe(entries: &[UdpEntry], with_address: bool) -> String {
    describe_with(entries, with_address, &processes_of(&looked_up(entries)))
}

/// The inodes whose processes are looked up: enough to name [`NAMED`]
/// processes even behind a relay's 64 sockets.
fn looked_up(entries: &[UdpEntry]) -> Vec<u64> {
    entries.iter().take(LOOKED_UP).map(|e| e.inode).collect()
}

fn describe_with(
    entries: &[UdpEntry],
    with_address: bool,
    procs: &HashMap<u64, (u32, String)>,
) -> String {
    let mut names: Vec<String> = Vec::new();
    for e in entries.iter().take(LOOKED_UP) {
        let who = match procs.get(&e.inode) {
            Some((pid, comm)) => format!("pid {pid} ({comm})"),
            None => format!(
                "a socket of uid {} whose process this user cannot see",
                e.uid
            ),
        };
        let name = match (with_address, e.remote) {
            (false, _) => who,
            (true, None) => format!("{} held by {who}", e.local),
            (true, Some(peer)) => format!("{} connected to {peer} held by {who}", e.local),
        };
        if !names.contains(&name) {
            names.push(name);
        }
    }
    let left_out = names.len() > NAMED || entries.len() > LOOKED_UP;
    names.truncate(NAMED);
    let mut out = names.join(", ");
    if left_out {
        out.push_str(", and others");
    }
    out
}

/// Why a bind to `addr` found it in use, in words: who holds it, if the
/// kernel's tables show a socket in the way, and what to do.
pub fn address_in_use(addr: SocketAddr) -> String {
    let mut holders: Vec<UdpEntry> = udp_sockets()
        .unwrap_or_default()
        .into_iter()
        .filter(|e| in_conflict(addr, e.local))
        .collect();
    // The exact address first: the likeliest culprit.
    holders.sort_by_key(|e| e.local.ip().to_canonical() != addr.ip().to_canonical());
    let fix = "choose another address (--bind) or stop that process";
    let ss = format!("`ss -ulpn 'sport = :{}'` names it", addr.port());
    if holders.is_empty() {
        return format!("another socket holds it ({ss}): {fix}");
    }
    let inodes = looked_up(&holders);
    let procs = processes_of(&inodes);
    let who = describe_with(&holders, false, &procs);
    if inodes.iter().all(|i| procs.contains_key(i)) {
        format!("held by {who}: {fix}")
    } else {
        format!("held by {who} ({ss} as root): {fix}")
    }
}

/// The relay's hold on its address: the address it bound, and its
/// sockets' inodes, to tell its own sockets from foreign ones.
#[derive(Debug, Clone)]
pub struct Claim {
    /// The address bound (port resolved).
    addr: SocketAddr,
    /// Whether the relay's IPv6 socket takes IPv6 only (then IPv4 sockets
    /// on the port are no competition).
    v6only: bool,
    /// The relay's sockets (`None`: unknown, without /proc).
    inodes: Option<Vec<u64>>,
}

impl Claim {
    /// A claim on `addr` by the sockets with these inodes (`None` if they
    /// could not be read: then nothing can be told apart).
    pub fn new(addr: SocketAddr, v6only: bool, inodes: Option<Vec<u64>>) -> Claim {
        Claim {
            addr,
            v6only,
            inodes,
        }
    }

    /// The address claimed.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sockets that are not the relay's and may get datagrams meant for
    /// it (see [`competes`]): a same-user process that joined the loops'
    /// group, connected a socket on the address, or bound a more specific
    /// address on the port.
    pub fn foreign(&self) -> io::Result<Vec<UdpEntry>> {
        let ours = self.inodes.as_ref().ok_or_else(|| {
            io::Error::other("its own sockets' inodes could not be read from /proc/self/fd")
        })?;
        Ok(udp_sockets()
            .map_err(|e| io::Error::new(e.kind(), format!("cannot read /proc/net/udp: {e}")))?
            .into_iter()
            .filter(|e| !ours.contains(&e.inode))
            .filter(|e| competes(self.addr, self.v6only, e.local))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn reads_the_kernels_tables() {
        let v4 = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
 3644: 0100007F:15B5 0200007F:0009 01 00000000:00000000 00:00000000 00000000  1000        0 18394 2 00000000397f1c40 0
 3645: 00000000:25E5 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 18395 2 00000000397f1c40 0
 garbage
";
        let got = parse_table(v4, false);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].local, a("127.0.0.1:5557"));
        assert_eq!(got[0].remote, Some(a("127.0.0.2:9")));
        assert_eq!((got[0].uid, got[0].inode), (1000, 18394));
        assert_eq!(got[1].local, a("0.0.0.0:9701"));
        assert_eq!(got[1].remote, None);
        let v6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
 3642: 00000000000000000000000001000000:15B3 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 18392 2 00000000b40f0e67 0
 3643: 0000000000000000FFFF00000100007F:15B4 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 18393 2 00000000749a8ce8 0
";
        let got = parse_table(v6, true);
        assert_eq!(got[0].local, a("[::1]:5555"));
        assert_eq!(got[1].local, a("[::ffff:127.0.0.1]:5556"));
    }

    #[test]
    fn finds_a_live_socket_and_its_process() {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let inode = socket_inode(s.as_fd()).unwrap();
        let addr = s.local_addr().unwrap();
        let all = udp_sockets().unwrap();
        let me = all.iter().find(|e| e.inode == inode).expect("listed");
        assert_eq!(me.local, addr);
        let procs = processes_of(&[inode]);
        assert_eq!(procs.get(&inode).map(|p| p.0), Some(std::process::id()));
        let said = address_in_use(addr);
        assert!(
            said.contains(&format!("held by pid {}", std::process::id())),
            "{said}"
        );
        assert!(said.contains("--bind"), "{said}");
    }

    #[test]
    fn conflicts_are_the_same_port_and_overlapping_addresses() {
        let ours = a("127.0.0.1:9701");
        assert!(in_conflict(ours, a("127.0.0.1:9701")));
        assert!(in_conflict(ours, a("0.0.0.0:9701")));
        assert!(in_conflict(ours, a("[::]:9701")));
        assert!(in_conflict(ours, a("[::ffff:127.0.0.1]:9701")));
        assert!(!in_conflict(ours, a("127.0.0.2:9701")));
        assert!(!in_conflict(ours, a("127.0.0.1:9702")));
    }

    #[test]
    fn competition_follows_the_kernels_best_match() {
        // A specific relay: only its exact address competes.
        let ours = a("127.0.0.1:9701");
        assert!(competes(ours, false, a("127.0.0.1:9701")));
        assert!(competes(ours, false, a("[::ffff:127.0.0.1]:9701")));
        assert!(!competes(ours, false, a("0.0.0.0:9701")));
        assert!(!competes(ours, false, a("[::]:9701")));
        assert!(!competes(ours, false, a("127.0.0.1:9702")));
        // An IPv4 wildcard: any IPv4 address on the port, not IPv6's.
        let any4 = a("0.0.0.0:9701");
        assert!(competes(any4, false, a("0.0.0.0:9701")));
        assert!(competes(any4, false, a("10.0.0.5:9701")));
        assert!(!competes(any4, false, a("[::]:9701")));
        assert!(!competes(any4, false, a("[::1]:9701")));
        // A dual-stack wildcard: everything on the port, IPv4's wildcard
        // included; IPv6 only: IPv6 addresses.
        let any6 = a("[::]:9701");
        assert!(competes(any6, false, a("0.0.0.0:9701")));
        assert!(competes(any6, false, a("127.0.0.1:9701")));
        assert!(competes(any6, false, a("[::1]:9701")));
        assert!(!competes(any6, true, a("127.0.0.1:9701")));
        assert!(competes(any6, true, a("[::1]:9701")));
    }

    #[test]
    fn a_claim_sees_only_foreign_sockets() {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = s.local_addr().unwrap();
        let mine = Claim::new(addr, false, Some(vec![socket_inode(s.as_fd()).unwrap()]));
        assert!(mine.foreign().unwrap().is_empty());
        assert!(Claim::new(addr, false, None).foreign().is_err());
        let theirs = Claim::new(addr, false, Some(vec![]));
        let foreign = theirs.foreign().unwrap();
        assert_eq!(foreign.len(), 1);
        let said = describe(&foreign, true);
        assert!(
            said.starts_with(&format!("{addr} held by pid {}", std::process::id())),
            "{said}"
        );
    }
}
