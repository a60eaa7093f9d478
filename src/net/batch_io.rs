//! Batched datagram syscalls (`recvmmsg`, `sendmmsg`), the kernel's
//! receive-drop counter (`SO_RXQ_OVFL`, `SO_MEMINFO`), and the local
//! address of each datagram (`IP_PKTINFO`, `IPV6_PKTINFO`).
//!
//! This is the only module of udphub with `unsafe` code. It hides the raw
//! `mmsghdr`/`iovec`/`cmsghdr` arrays behind plain, safe types:
//!
//! - [`RecvBatch`] reads up to `capacity` datagrams with one `recvmmsg` and
//!   hands them out as [`Datagram`]s (bytes, source, truncation, kernel drop
//!   counter, and — once [`enable_pktinfo`] — the [`LocalAddr`] it was
//!   sent to);
//! - [`SendBatch`] sends *one* payload to many [`RawAddr`]s with one
//!   `sendmmsg`: every header points at the same `iovec`, so a fan-out of one
//!   pre-rendered buffer to 256 clients costs one syscall and no copies;
//! - [`ReplyBatch`] sends different payloads to different destinations
//!   (an echo server's replies) with one `sendmmsg`;
//! - [`SourceControl`] is one local address encoded once as the control
//!   message that makes a send leave from it: both batches attach it to
//!   each destination whose [`RawAddr::local`] tag names it (a socket
//!   bound to a wildcard address otherwise sends from whatever address the
//!   route picks, which a client with a connected socket drops).
//!
//! Sections at the end hold the unsafe calls that are not batched
//! syscalls: [`attach_reuseport_cbpf`], the setsockopt that gives the
//! loops' SO_REUSEPORT group its steering program; [`adopt_listen_fds`],
//! which takes ownership of the sockets a service manager passed (socket
//! activation); and [`send_with_fds`]/[`recv_with_fds`], which pass the
//! relay's sockets to a new process (SCM_RIGHTS) and adopt the
//! descriptors received.
//!
//! Why libc and not nix: nix's `MultiHeaders` re-encodes every destination
//! from a `SockaddrLike` on each call and its `recvmmsg` returns an iterator
//! that borrows the headers, which makes the "same buffer to every
//! destination" fan-out and the control-message parse awkward; the raw calls
//! are a few dozen lines and every pointer they take is documented below.
//!
//! Linux only: `recvmmsg`/`sendmmsg`/`SO_RXQ_OVFL` are Linux APIs.
//!
//! Pointer discipline: each buffer's base pointer is taken once per call
//! (`as_mut_ptr`) and offset with `.add(i)`. Indexing a `Vec` mutably in
//! the loop would re-borrow the whole `Vec` each time, which (under the
//! Stacked Borrows model) invalidates the pointers taken in earlier
//! iterations that the kernel and [`parse_rxq_ovfl`] later use.

#[cfg(not(target_os = "linux"))]
compile_error!("udphub needs Linux: recvmmsg, sendmmsg and SO_RXQ_OVFL are Linux system calls");

use std::io;
use std::mem;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::ptr;

use crate::core::addr::{RawAddr, SOCKADDR_MAX};

/// Room for the control messages of one datagram, in `u64`s: SO_RXQ_OVFL
/// (`CMSG_SPACE(4)` = 24 bytes), IPV6_PKTINFO (`CMSG_SPACE(20)` = 40) and
/// IP_PKTINFO (`CMSG_SPACE(12)` = 32; a dual-stack socket may get both
/// for an IPv4 datagram) = 96 bytes; 128 leaves room should the kernel
/// attach another (it then sets `MSG_CTRUNC` rather than overflow, and we
/// trust nothing of what it cut).
const CONTROL_WORDS: usize = 16;

/// `CMSG_SPACE(len)`, for the sizes checked at compile time below.
const fn cmsg_space(len: usize) -> usize {
    // SAFETY: CMSG_SPACE is pure arithmetic on its argument (libc marks
    // every CMSG_ macro unsafe, even the ones that dereference nothing).
    unsafe { libc::CMSG_SPACE(len as libc::c_uint) as usize }
}

/// Bytes of a control message carrying IPV6_PKTINFO, the larger of the
/// two a [`SourceControl`] holds.
const PKTINFO_SPACE: usize = cmsg_space(mem::size_of::<libc::in6_pktinfo>());
/// A [`SourceControl`]'s buffer, in `u64`s.
const SOURCE_WORDS: usize = PKTINFO_SPACE / 8;

// The control buffers are arrays of `u64` so that each starts aligned for
// a `cmsghdr`, as `CMSG_FIRSTHDR` assumes.
const _: () = assert!(mem::align_of::<u64>() >= mem::align_of::<libc::cmsghdr>());
const _: () = assert!(
    CONTROL_WORDS * 8
        >= cmsg_space(mem::size_of::<u32>())
            + cmsg_space(mem::size_of::<libc::in6_pktinfo>())
            + cmsg_space(mem::size_of::<libc::in_pktinfo>()),
    "control buffer too small for SO_RXQ_OVFL and both PKTINFOs"
);
const _: () = assert!(
    SOURCE_WORDS * 8 == PKTINFO_SPACE
        && PKTINFO_SPACE >= cmsg_space(mem::size_of::<libc::in_pktinfo>())
);

/// The relay's own address a datagram was sent to, from its `IP_PKTINFO`
/// or `IPV6_PKTINFO` control message: where a reply must come from for a
/// client with a connected socket to accept it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LocalAddr {
    /// The address (an IPv4-mapped one as IPv4).
    pub ip: IpAddr,
    /// The interface, where the address alone does not say which (an IPv6
    /// link-local address); 0 otherwise, so the route picks it.
    pub ifindex: u32,
}

impl LocalAddr {
    /// A local address from a PKTINFO, or `None` if it is no address to
    /// send from (unspecified, multicast, IPv4 broadcast).
    fn new(ip: IpAddr, ifindex: u32) -> Option<LocalAddr> {
        let ip = ip.to_canonical();
        let usable = match ip {
            IpAddr::V4(v4) => !(v4.is_unspecified() || v4.is_multicast() || v4.is_broadcast()),
            IpAddr::V6(v6) => !(v6.is_unspecified() || v6.is_multicast()),
        };
        let link_local = matches!(ip, IpAddr::V6(v6) if v6.is_unicast_link_local());
        usable.then_some(LocalAddr {
            ip,
            ifindex: if link_local { ifindex } else { 0 },
        })
    }
}

/// One datagram out of a [`RecvBatch`].
#[derive(Debug, Clone, Copy)]
pub struct Datagram<'a> {
    /// The bytes received (at most the batch's slot length).
    pub data: &'a [u8],
    /// Who sent it; `None` only if the kernel reported an unknown family.
    pub source: Option<RawAddr>,
    /// The datagram was longer than the slot and was cut (`MSG_TRUNC`).
    pub truncated: bool,
    /// The socket's cumulative kernel drop counter (`SO_RXQ_OVFL`), if the
    /// kernel attached it (it does once the counter is non-zero).
    pub kernel_drops: Option<u32>,
    /// The address it was sent to, once [`enable_pktinfo`] asked for it.
    pub local: Option<LocalAddr>,
}

/// Reusable buffers for `recvmmsg`.
pub struct RecvBatch {
    /// Bytes per datagram slot; longer datagrams come back `truncated`.
    slot_len: usize,
    /// `capacity * slot_len` bytes of datagram payload.
    bufs: Vec<u8>,
    /// Source address per slot, written by the kernel.
    names: Vec<libc::sockaddr_storage>,
    /// Control-message buffer per slot (SO_RXQ_OVFL, PKTINFO).
    control: Vec<[u64; CONTROL_WORDS]>,
    /// One `iovec` per slot, pointing into `bufs`.
    iovs: Vec<libc::iovec>,
    /// The header array handed to the kernel.
    hdrs: Vec<libc::mmsghdr>,
    /// Kernel drop counter parsed per slot after each call.
    drops: Vec<Option<u32>>,
    /// Local address parsed per slot after each call.
    locals: Vec<Option<LocalAddr>>,
    /// How many slots the last `recv` filled.
    filled: usize,
}

impl RecvBatch {
    /// Buffers for `capacity` datagrams of up to `slot_len` bytes each.
    pub fn new(capacity: usize, slot_len: usize) -> RecvBatch {
        let capacity = capacity.max(1);
        let slot_len = slot_len.max(1);
        RecvBatch {
            slot_len,
            bufs: vec![0; capacity * slot_len],
            // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
            names: vec![unsafe { mem::zeroed() }; capacity],
            control: vec![[0; CONTROL_WORDS]; capacity],
            iovs: empty_iovecs(capacity),
            hdrs: zeroed_headers(capacity),
            drops: vec![None; capacity],
            locals: vec![None; capacity],
            filled: 0,
        }
    }

    /// How many datagrams one call can return.
    pub fn capacity(&self) -> usize {
        self.hdrs.len()
    }

    /// Reads up to `capacity` datagrams without blocking.
    ///
    /// Returns how many were read; `WouldBlock` when none are waiting.
    /// `Interrupted` is retried here.
    pub fn recv(&mut self, fd: BorrowedFd<'_>) -> io::Result<usize> {
        self.filled = 0;
        let cap = self.capacity();
        let slot_len = self.slot_len;
        // Base pointers, taken once (see the module docs).
        let bufs = self.bufs.as_mut_ptr();
        let names = self.names.as_mut_ptr();
        let control = self.control.as_mut_ptr();
        let iovs = self.iovs.as_mut_ptr();
        let hdrs = self.hdrs.as_mut_ptr();
        for i in 0..cap {
            // SAFETY: `i < cap`, and every Vec here has `cap` elements
            // (`bufs` has `cap * slot_len` bytes), so each `.add` stays in
            // its allocation; the writes are of plain data into elements we
            // own, through pointers derived from the bases above.
            unsafe {
                *iovs.add(i) = libc::iovec {
                    iov_base: bufs.add(i * slot_len).cast(),
                    iov_len: slot_len,
                };
                let hdr = &mut *hdrs.add(i);
                hdr.msg_len = 0;
                hdr.msg_hdr.msg_name = names.add(i).cast();
                hdr.msg_hdr.msg_namelen =
                    mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
                hdr.msg_hdr.msg_iov = iovs.add(i);
                hdr.msg_hdr.msg_iovlen = 1;
                hdr.msg_hdr.msg_control = control.add(i).cast();
                hdr.msg_hdr.msg_controllen = mem::size_of::<[u64; CONTROL_WORDS]>() as _;
                hdr.msg_hdr.msg_flags = 0;
            }
        }
        let n = retry_if_interrupted(|| {
            // SAFETY: `hdrs[..cap]` are initialised above; every pointer in
            // them (name, iovec, iovec's buffer, control) points into a Vec
            // owned by `self` with the length given beside it, and none of
            // those Vecs is touched until the call returns. The kernel writes
            // at most those lengths. A null timeout means "no timeout".
            unsafe {
                libc::recvmmsg(
                    fd.as_raw_fd(),
                    hdrs,
                    cap as libc::c_uint,
                    libc::MSG_DONTWAIT,
                    ptr::null_mut(),
                )
            }
        })?;
        self.filled = n;
        for i in 0..n {
            // SAFETY: `i < n <= cap`: the header was initialised above and
            // filled by the kernel; its control pointer still points into
            // `self.control`, untouched since the base pointer was taken.
            let msg = unsafe { &(*hdrs.add(i)).msg_hdr };
            // Control messages cut short (MSG_CTRUNC) are not trusted: the
            // drop counter is read again with SO_MEMINFO within a second,
            // and a reply without a local address leaves from whatever
            // address the route picks, as it would without PKTINFO.
            let control = if msg.msg_flags & libc::MSG_CTRUNC != 0 {
                Control::default()
            } else {
                parse_control(msg)
            };
            self.drops[i] = control.drops;
            self.locals[i] = control.local;
        }
        Ok(n)
    }

    /// How many datagrams the last [`recv`](Self::recv) returned.
    pub fn len(&self) -> usize {
        self.filled
    }

    /// Whether the last [`recv`](Self::recv) returned nothing.
    pub fn is_empty(&self) -> bool {
        self.filled == 0
    }

    /// The `i`-th datagram of the last call.
    ///
    /// # Panics
    /// If `i >= self.len()` (a bug in the caller, not an input condition).
    pub fn get(&self, i: usize) -> Datagram<'_> {
        assert!(i < self.filled, "datagram index out of range");
        let hdr = &self.hdrs[i];
        let len = (hdr.msg_len as usize).min(self.slot_len);
        let start = i * self.slot_len;
        let name_len = (hdr.msg_hdr.msg_namelen as usize).min(SOCKADDR_MAX);
        let name = sockaddr_bytes(&self.names[i], name_len);
        Datagram {
            data: &self.bufs[start..start + len],
            source: RawAddr::from_kernel(name),
            truncated: hdr.msg_hdr.msg_flags & libc::MSG_TRUNC != 0,
            kernel_drops: self.drops[i],
            local: self.locals[i],
        }
    }
}

// SAFETY: the raw pointers inside a RecvBatch point only into its own
// heap buffers (which move with it) and are rewritten before every call;
// nothing is shared, so moving it to another thread is sound.
unsafe impl Send for RecvBatch {}

/// `n` zeroed `mmsghdr`s, to be filled before each call.
fn zeroed_headers(n: usize) -> Vec<libc::mmsghdr> {
    // SAFETY: mmsghdr is plain old data (integers and null pointers), for
    // which all-zero bytes are a valid value.
    vec![unsafe { mem::zeroed() }; n]
}

/// `n` empty `iovec`s, to be pointed at buffers before each call.
fn empty_iovecs(n: usize) -> Vec<libc::iovec> {
    vec![
        libc::iovec {
            iov_base: ptr::null_mut(),
            iov_len: 0
        };
        n
    ]
}

/// The first `len` bytes of a `sockaddr_storage`.
fn sockaddr_bytes(storage: &libc::sockaddr_storage, len: usize) -> &[u8] {
    let len = len.min(mem::size_of::<libc::sockaddr_storage>());
    // SAFETY: `storage` is a live, initialised (zeroed, then written by the
    // kernel) `sockaddr_storage`; any byte pattern is a valid `u8`, and `len`
    // is clamped to its size. The slice borrows `storage`.
    unsafe { std::slice::from_raw_parts((storage as *const libc::sockaddr_storage).cast(), len) }
}

/// What the control messages of one datagram said.
#[derive(Debug, Default, Clone, Copy)]
struct Control {
    /// SO_RXQ_OVFL's counter.
    drops: Option<u32>,
    /// The local address, from IP_PKTINFO or IPV6_PKTINFO.
    local: Option<LocalAddr>,
}

/// Reads the control messages the kernel attached: SO_RXQ_OVFL, and
/// IP_PKTINFO or IPV6_PKTINFO. A dual-stack socket reports an IPv4
/// datagram's address as an IPv4-mapped IPV6_PKTINFO, and also as
/// IP_PKTINFO if that was turned on; whichever comes, it is the same
/// address, except that IP_PKTINFO's `ipi_spec_dst` is already the one to
/// answer from (an interface address for a broadcast), so it wins.
fn parse_control(msg: &libc::msghdr) -> Control {
    let mut out = Control::default();
    if msg.msg_controllen == 0 || msg.msg_control.is_null() {
        return out;
    }
    let mut v4_info = None;
    let mut v6_info = None;
    // SAFETY: `msg` is the header the kernel just filled: `msg_control`
    // points at our control buffer and `msg_controllen` is the length the
    // kernel wrote (never more than we offered). CMSG_FIRSTHDR/NXTHDR only
    // return headers that lie wholly inside that range, or null, and each
    // payload is read only after checking `cmsg_len` covers it. Payloads
    // need not be aligned for their type relative to our buffer: read
    // unaligned.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(msg);
        while !cmsg.is_null() {
            let c = &*cmsg;
            let holds = |len: usize| c.cmsg_len as usize >= libc::CMSG_LEN(len as u32) as usize;
            let data = libc::CMSG_DATA(cmsg);
            match (c.cmsg_level, c.cmsg_type) {
                (libc::SOL_SOCKET, libc::SO_RXQ_OVFL) if holds(mem::size_of::<u32>()) => {
                    out.drops = Some(ptr::read_unaligned(data.cast::<u32>()));
                }
                (libc::IPPROTO_IP, libc::IP_PKTINFO)
                    if holds(mem::size_of::<libc::in_pktinfo>()) =>
                {
                    v4_info = Some(ptr::read_unaligned(data.cast::<libc::in_pktinfo>()));
                }
                (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO)
                    if holds(mem::size_of::<libc::in6_pktinfo>()) =>
                {
                    v6_info = Some(ptr::read_unaligned(data.cast::<libc::in6_pktinfo>()));
                }
                _ => {}
            }
            cmsg = libc::CMSG_NXTHDR(msg, cmsg);
        }
    }
    out.local = match (v4_info, v6_info) {
        (Some(info), _) => LocalAddr::new(
            IpAddr::V4(Ipv4Addr::from(info.ipi_spec_dst.s_addr.to_ne_bytes())),
            info.ipi_ifindex as u32,
        ),
        (None, Some(info)) => LocalAddr::new(
            IpAddr::V6(Ipv6Addr::from(info.ipi6_addr.s6_addr)),
            info.ipi6_ifindex,
        ),
        (None, None) => None,
    };
    out
}

/// One local address as the control message that makes a send leave from
/// it (`IP_PKTINFO` on an IPv4 socket, `IPV6_PKTINFO` on an IPv6 one),
/// encoded once and pointed at by every header that needs it: the kernel
/// only reads it.
#[derive(Clone, Copy)]
pub struct SourceControl {
    /// The `cmsghdr` and its payload, aligned as `CMSG_FIRSTHDR` assumes.
    buf: [u64; SOURCE_WORDS],
    /// How many bytes of `buf` are the message (`CMSG_SPACE` of it).
    len: usize,
}

impl SourceControl {
    /// The control message to send from `local` on an IPv6 (`v6_socket`)
    /// or IPv4 socket; `None` for an IPv6 address on an IPv4 socket.
    ///
    /// The interface index is left 0 (the route picks it, as for any
    /// send) except for an IPv6 link-local address, which needs it. An
    /// IPv4 address on an IPv6 socket (a dual-stack socket's IPv4 client)
    /// goes as its IPv4-mapped form, which the kernel's IPv4 path accepts.
    pub fn new(local: &LocalAddr, v6_socket: bool) -> Option<SourceControl> {
        let mut out = SourceControl {
            buf: [0; SOURCE_WORDS],
            len: 0,
        };
        let (level, kind, payload_len) = if v6_socket {
            let addr = match local.ip {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            let info = libc::in6_pktinfo {
                ipi6_addr: libc::in6_addr {
                    s6_addr: addr.octets(),
                },
                ipi6_ifindex: local.ifindex,
            };
            out.write_payload(&info);
            (
                libc::IPPROTO_IPV6,
                libc::IPV6_PKTINFO,
                mem::size_of_val(&info),
            )
        } else {
            let IpAddr::V4(v4) = local.ip else {
                return None;
            };
            let info = libc::in_pktinfo {
                ipi_ifindex: 0,
                ipi_spec_dst: libc::in_addr {
                    s_addr: u32::from_ne_bytes(v4.octets()),
                },
                ipi_addr: libc::in_addr { s_addr: 0 },
            };
            out.write_payload(&info);
            (libc::IPPROTO_IP, libc::IP_PKTINFO, mem::size_of_val(&info))
        };
        let header = libc::cmsghdr {
            // SAFETY: CMSG_LEN/CMSG_SPACE are arithmetic on their argument.
            cmsg_len: unsafe { libc::CMSG_LEN(payload_len as libc::c_uint) } as _,
            cmsg_level: level,
            cmsg_type: kind,
        };
        // SAFETY: `buf` is 8-aligned (an array of u64, checked above to
        // suffice for a cmsghdr) and at least a cmsghdr long; the header
        // goes at its start, where CMSG_FIRSTHDR would put it.
        unsafe { ptr::write(out.buf.as_mut_ptr().cast::<libc::cmsghdr>(), header) };
        // SAFETY: as above.
        out.len = unsafe { libc::CMSG_SPACE(payload_len as libc::c_uint) } as usize;
        Some(out)
    }

    /// Writes `payload` where `CMSG_DATA` of the first header points.
    fn write_payload<T: Copy>(&mut self, payload: &T) {
        // A PKTINFO always fits (checked at compile time above); this
        // keeps the write below in bounds for any `T` (and costs nothing:
        // both sides are constants).
        assert!(cmsg_space(mem::size_of::<T>()) <= mem::size_of_val(&self.buf));
        // SAFETY: a control message's data starts CMSG_LEN(0) bytes (the
        // aligned cmsghdr) into it, and the assert above keeps the
        // `size_of::<T>()` bytes written from there inside `buf`; written
        // unaligned, as a payload need not be aligned for `T`.
        unsafe {
            let at = (self.buf.as_mut_ptr().cast::<u8>()).add(libc::CMSG_LEN(0) as usize);
            ptr::write_unaligned(at.cast::<T>(), *payload);
        }
    }

    /// The encoded control message (for tests).
    #[cfg(test)]
    fn bytes(&self) -> &[u8] {
        // SAFETY: `buf` is plain integers; any `len <= size_of(buf)` bytes
        // of it are valid `u8`s, and the slice borrows `self`.
        unsafe { std::slice::from_raw_parts(self.buf.as_ptr().cast::<u8>(), self.len) }
    }
}

impl std::fmt::Debug for SourceControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SourceControl({} bytes)", self.len)
    }
}

/// Points each header at the control message of its destination's local
/// address (`dest.local()` = 1 is `sources[0]`); a tag of 0, or one
/// `sources` does not hold, leaves that header without one.
fn attach_sources<'a>(
    hdrs: &mut [libc::mmsghdr],
    dests: impl Iterator<Item = &'a RawAddr>,
    sources: &[SourceControl],
) {
    for (hdr, dest) in hdrs.iter_mut().zip(dests) {
        let source = usize::from(dest.local())
            .checked_sub(1)
            .and_then(|i| sources.get(i));
        if let Some(source) = source {
            // The kernel only reads the control message when sending;
            // `*mut` is the C type.
            hdr.msg_hdr.msg_control = source.buf.as_ptr() as *mut libc::c_void;
            hdr.msg_hdr.msg_controllen = source.len as _;
        }
    }
}

/// Reusable header array for `sendmmsg` of one payload to many destinations.
pub struct SendBatch {
    /// The header array handed to the kernel; pointers are refreshed per call.
    hdrs: Vec<libc::mmsghdr>,
}

impl SendBatch {
    /// Room for `capacity` destinations per syscall (the kernel caps one
    /// call at `UIO_MAXIOV` = 1024).
    pub fn new(capacity: usize) -> SendBatch {
        let capacity = capacity.clamp(1, 1024);
        SendBatch {
            hdrs: zeroed_headers(capacity),
        }
    }

    /// Destinations per syscall.
    pub fn capacity(&self) -> usize {
        self.hdrs.len()
    }

    /// Sends `payload` to each of `dests` (at most `capacity` of them are
    /// used) in one `sendmmsg`, without blocking; each from the local
    /// address its tag names in `sources` (see [`attach_sources`]; with
    /// `sources` empty, nothing is attached and nothing is looked at).
    ///
    /// Returns how many leading destinations were handed to the kernel. When
    /// that is fewer than asked, the next one failed; sending from it again
    /// returns its error. An error means `dests[0]` failed and nothing was
    /// sent. `Interrupted` is retried here.
    pub fn send(
        &mut self,
        fd: BorrowedFd<'_>,
        sources: &[SourceControl],
        payload: &[u8],
        dests: &[RawAddr],
    ) -> io::Result<usize> {
        let n = dests.len().min(self.capacity());
        if n == 0 {
            return Ok(0);
        }
        let mut iov = libc::iovec {
            // The kernel only reads through this pointer when sending.
            iov_base: payload.as_ptr() as *mut libc::c_void,
            iov_len: payload.len(),
        };
        for (hdr, dest) in self.hdrs.iter_mut().zip(&dests[..n]) {
            set_send_header(hdr, dest, &mut iov);
        }
        if !sources.is_empty() {
            attach_sources(&mut self.hdrs[..n], dests.iter(), sources);
        }
        // SAFETY: `hdrs[..n]` were all set above. Their `msg_name`s point
        // into `dests`, their `msg_iov` at `iov`, which points at
        // `payload`, and their `msg_control`s are null or point into
        // `sources`; `dests`, `iov`, `payload` and `sources` are borrowed
        // for this whole function, so all outlive the call.
        unsafe { send_headers(fd, &mut self.hdrs[..n]) }
    }
}

// SAFETY: between calls a SendBatch's headers hold no pointers (they are
// cleared after every send), so moving it to another thread is sound.
unsafe impl Send for SendBatch {}

/// Points one `sendmmsg` header at a destination and an `iovec`.
fn set_send_header(hdr: &mut libc::mmsghdr, dest: &RawAddr, iov: *mut libc::iovec) {
    let name = dest.as_bytes();
    hdr.msg_len = 0;
    // The kernel only reads the name when sending; `*mut` is the C type.
    hdr.msg_hdr.msg_name = name.as_ptr() as *mut libc::c_void;
    hdr.msg_hdr.msg_namelen = name.len() as libc::socklen_t;
    hdr.msg_hdr.msg_iov = iov;
    hdr.msg_hdr.msg_iovlen = 1;
    hdr.msg_hdr.msg_control = ptr::null_mut();
    hdr.msg_hdr.msg_controllen = 0;
    hdr.msg_hdr.msg_flags = 0;
}

/// One non-blocking `sendmmsg` of `hdrs` (retrying `EINTR`); then clears
/// the headers' pointers so none to borrowed data is left behind.
///
/// # Safety
/// Every header's `msg_name` must point at `msg_namelen` readable bytes,
/// its `msg_iov` at `msg_iovlen` live `iovec`s, and those at readable
/// buffers of their lengths, its `msg_control` (if not null) at
/// `msg_controllen` readable bytes, all valid for the duration of the call.
unsafe fn send_headers(fd: BorrowedFd<'_>, hdrs: &mut [libc::mmsghdr]) -> io::Result<usize> {
    let sent = retry_if_interrupted(|| {
        // SAFETY: the caller guarantees every pointer in `hdrs` is valid;
        // `hdrs` itself is a live slice of `hdrs.len()` headers. The kernel
        // only reads names and payloads on send and writes only `msg_len`.
        unsafe {
            libc::sendmmsg(
                fd.as_raw_fd(),
                hdrs.as_mut_ptr(),
                hdrs.len() as libc::c_uint,
                libc::MSG_DONTWAIT,
            )
        }
    });
    for hdr in hdrs.iter_mut() {
        hdr.msg_hdr.msg_name = ptr::null_mut();
        hdr.msg_hdr.msg_iov = ptr::null_mut();
        hdr.msg_hdr.msg_control = ptr::null_mut();
        hdr.msg_hdr.msg_controllen = 0;
    }
    sent
}

/// Reusable headers for `sendmmsg` of *different* payloads to different
/// destinations (an echo server's replies).
pub struct ReplyBatch {
    /// One `iovec` per message, pointing into the caller's arena.
    iovs: Vec<libc::iovec>,
    /// The header array handed to the kernel.
    hdrs: Vec<libc::mmsghdr>,
}

impl ReplyBatch {
    /// Room for `capacity` messages per syscall (at most 1024).
    pub fn new(capacity: usize) -> ReplyBatch {
        let capacity = capacity.clamp(1, 1024);
        ReplyBatch {
            iovs: empty_iovecs(capacity),
            hdrs: zeroed_headers(capacity),
        }
    }

    /// Messages per syscall.
    pub fn capacity(&self) -> usize {
        self.hdrs.len()
    }

    /// Sends `arena[range]` to `dest` for each of `msgs` (at most
    /// `capacity` of them) in one `sendmmsg`, without blocking, each from
    /// the local address its tag names in `sources`. Returns how many
    /// leading messages were sent, like [`SendBatch::send`].
    /// A range outside `arena` is an `InvalidInput` error, before any send.
    pub fn send(
        &mut self,
        fd: BorrowedFd<'_>,
        sources: &[SourceControl],
        arena: &[u8],
        msgs: &[(std::ops::Range<usize>, RawAddr)],
    ) -> io::Result<usize> {
        let n = msgs.len().min(self.capacity());
        if n == 0 {
            return Ok(0);
        }
        // Check every range before any header points anywhere, so an error
        // leaves no header pointing into `arena`.
        if msgs[..n]
            .iter()
            .any(|(range, _)| arena.get(range.clone()).is_none())
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "reply range outside the arena",
            ));
        }
        for (i, (range, dest)) in msgs[..n].iter().enumerate() {
            let payload = &arena[range.clone()];
            self.iovs[i] = libc::iovec {
                // The kernel only reads through this pointer when sending.
                iov_base: payload.as_ptr() as *mut libc::c_void,
                iov_len: payload.len(),
            };
            set_send_header(&mut self.hdrs[i], dest, &mut self.iovs[i]);
        }
        if !sources.is_empty() {
            let dests = msgs[..n].iter().map(|(_, dest)| dest);
            attach_sources(&mut self.hdrs[..n], dests, sources);
        }
        // SAFETY: `hdrs[..n]` were all set above. Each `msg_name` points
        // into `msgs`, each `msg_iov` at `iovs[i]`, which points at a
        // checked sub-slice of `arena`, and each `msg_control` is null or
        // points into `sources`; `msgs`, `arena` and `sources` are borrowed
        // for this whole function and `iovs` is owned by `self` and not
        // touched during the call, so all outlive it.
        let sent = unsafe { send_headers(fd, &mut self.hdrs[..n]) };
        for iov in &mut self.iovs[..n] {
            iov.iov_base = ptr::null_mut();
        }
        sent
    }
}

// SAFETY: between calls a ReplyBatch's headers and iovecs hold no
// pointers (they are cleared after every send and before any error return),
// so moving it to another thread is sound.
unsafe impl Send for ReplyBatch {}

/// Asks the kernel to report its receive-queue drop counter with each
/// datagram (`SO_RXQ_OVFL`).
pub fn enable_rxq_ovfl(fd: BorrowedFd<'_>) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: the option value is a live c_int and its exact size is passed.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RXQ_OVFL,
            (&on as *const libc::c_int).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Asks the kernel to report each datagram's local address
/// ([`Datagram::local`]): `IP_PKTINFO` on an IPv4 socket,
/// `IPV6_RECVPKTINFO` on an IPv6 one (which reports IPv4 datagrams of a
/// dual-stack socket as IPv4-mapped addresses).
pub fn enable_pktinfo(fd: BorrowedFd<'_>, v6_socket: bool) -> io::Result<()> {
    let (level, name) = if v6_socket {
        (libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO)
    } else {
        (libc::IPPROTO_IP, libc::IP_PKTINFO)
    };
    let on: libc::c_int = 1;
    // SAFETY: the option value is a live c_int and its exact size is passed.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&on as *const libc::c_int).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The socket's cumulative receive-drop counter (`sk_drops`, the same
/// counter SO_RXQ_OVFL reports), read on demand with `SO_MEMINFO`.
///
/// SO_RXQ_OVFL only reports it on a datagram queued *after* the drops, so
/// a flood that ends in drops would otherwise go uncounted until the next
/// datagram arrives.
pub fn socket_drops(fd: BorrowedFd<'_>) -> io::Result<u32> {
    // The kernel fills SK_MEMINFO_VARS (9 today) u32s, or fewer if we
    // offer fewer; 16 leaves room for growth.
    let mut info = [0u32; 16];
    let mut len = mem::size_of_val(&info) as libc::socklen_t;
    // SAFETY: `info` is a live buffer of exactly `len` bytes, and `len` is
    // a live socklen_t the kernel updates to the bytes written.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MEMINFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let index = libc::SK_MEMINFO_DROPS as usize;
    if (len as usize) < (index + 1) * mem::size_of::<u32>() {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "SO_MEMINFO lacks the drop counter",
        ));
    }
    Ok(info[index])
}

/// Runs a libc call returning `-1`/errno until it is not `EINTR`.
fn retry_if_interrupted<F>(mut call: F) -> io::Result<usize>
where
    F: FnMut() -> libc::c_int,
{
    loop {
        let rc = call();
        if rc >= 0 {
            return Ok(rc as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{SocketAddr, UdpSocket};
    use std::os::fd::AsFd;
    use std::time::{Duration, Instant};

    fn bound(addr: &str) -> UdpSocket {
        let s = UdpSocket::bind(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s
    }

    /// Waits (bounded) until `batch` holds at least one datagram.
    fn recv_some(batch: &mut RecvBatch, sock: &UdpSocket) -> usize {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            match batch.recv(sock.as_fd()) {
                Ok(n) => return n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(e) => panic!("recv failed: {e}"),
            }
        }
    }

    #[test]
    fn recv_reads_several_datagrams_with_their_sources() {
        let server = bound("127.0.0.1:0");
        let a = bound("127.0.0.1:0");
        let b = bound("127.0.0.1:0");
        a.send_to(b"one", server.local_addr().unwrap()).unwrap();
        b.send_to(b"two", server.local_addr().unwrap()).unwrap();
        a.send_to(b"three", server.local_addr().unwrap()).unwrap();
        let mut batch = RecvBatch::new(8, 64);
        let mut got = Vec::new();
        while got.len() < 3 {
            let n = recv_some(&mut batch, &server);
            for i in 0..n {
                let d = batch.get(i);
                assert!(!d.truncated);
                got.push((d.data.to_vec(), d.source.unwrap().to_socket_addr()));
            }
        }
        assert_eq!(got[0], (b"one".to_vec(), a.local_addr().unwrap()));
        assert_eq!(got[1], (b"two".to_vec(), b.local_addr().unwrap()));
        assert_eq!(got[2], (b"three".to_vec(), a.local_addr().unwrap()));
        // Drained: the next call says WouldBlock instead of blocking.
        let err = batch.recv(server.as_fd()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn recv_flags_truncation_instead_of_returning_a_cut_datagram_silently() {
        let server = bound("127.0.0.1:0");
        let c = bound("127.0.0.1:0");
        c.send_to(&[7u8; 100], server.local_addr().unwrap())
            .unwrap();
        c.send_to(&[8u8; 10], server.local_addr().unwrap()).unwrap();
        let mut batch = RecvBatch::new(4, 10);
        let mut seen = Vec::new();
        while seen.len() < 2 {
            let n = recv_some(&mut batch, &server);
            for i in 0..n {
                let d = batch.get(i);
                seen.push((d.data.len(), d.truncated));
            }
        }
        assert_eq!(seen, vec![(10, true), (10, false)]);
    }

    /// One payload to several destinations in one call. (Mixed IPv4-mapped
    /// and IPv6 destinations from one dual-stack socket need a wildcard
    /// bind: tests/pktinfo.rs fans out to both from `[::]` in a network
    /// namespace of its own; tests never bind the host's wildcard.)
    #[test]
    fn send_fans_one_payload_out_to_every_destination() {
        let server = bound("[::1]:0");
        let a = bound("[::1]:0");
        let b = bound("[::1]:0");
        let dests = [
            RawAddr::from(a.local_addr().unwrap()),
            RawAddr::from(b.local_addr().unwrap()),
        ];
        let mut batch = SendBatch::new(16);
        let sent = batch
            .send(server.as_fd(), &[], b"hello all", &dests)
            .unwrap();
        assert_eq!(sent, 2);
        let mut buf = [0u8; 64];
        for s in [&a, &b] {
            let (n, from) = s.recv_from(&mut buf).unwrap();
            assert_eq!(&buf[..n], b"hello all");
            assert_eq!(from, server.local_addr().unwrap());
        }
    }

    #[test]
    fn send_more_destinations_than_capacity_sends_only_capacity() {
        let server = bound("127.0.0.1:0");
        let sinks: Vec<UdpSocket> = (0..5).map(|_| bound("127.0.0.1:0")).collect();
        let dests: Vec<RawAddr> = sinks
            .iter()
            .map(|s| s.local_addr().unwrap().into())
            .collect();
        let mut batch = SendBatch::new(3);
        assert_eq!(batch.send(server.as_fd(), &[], b"x", &dests).unwrap(), 3);
        assert_eq!(
            batch.send(server.as_fd(), &[], b"x", &dests[3..]).unwrap(),
            2
        );
        assert_eq!(batch.send(server.as_fd(), &[], b"x", &[]).unwrap(), 0);
        let mut buf = [0u8; 8];
        for s in &sinks {
            assert_eq!(s.recv(&mut buf).unwrap(), 1);
        }
    }

    #[test]
    fn reply_batch_sends_each_its_own_payload() {
        let server = bound("127.0.0.1:0");
        let a = bound("127.0.0.1:0");
        let b = bound("127.0.0.1:0");
        let arena = b"firstsecond";
        let msgs = [
            (0..5, RawAddr::from(a.local_addr().unwrap())),
            (5..11, RawAddr::from(b.local_addr().unwrap())),
        ];
        let mut batch = ReplyBatch::new(8);
        assert_eq!(batch.send(server.as_fd(), &[], arena, &msgs).unwrap(), 2);
        let mut buf = [0u8; 16];
        let n = a.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"first");
        let n = b.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"second");
        // A range outside the arena is refused before anything is sent.
        let bad = [(0..5, msgs[0].1), (8..40, msgs[1].1)];
        let err = batch.send(server.as_fd(), &[], arena, &bad).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        // ...and leaves no header or iovec pointing into the arena.
        for (hdr, iov) in batch.hdrs.iter().zip(&batch.iovs) {
            assert!(hdr.msg_hdr.msg_name.is_null() && hdr.msg_hdr.msg_iov.is_null());
            assert!(iov.iov_base.is_null());
        }
        a.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        assert!(a.recv(&mut buf).is_err());
    }

    #[test]
    fn send_to_a_v6_destination_from_a_v4_socket_is_an_error_not_a_crash() {
        let server = bound("127.0.0.1:0");
        let dest = RawAddr::from("[::1]:9".parse::<SocketAddr>().unwrap());
        let err = SendBatch::new(4)
            .send(server.as_fd(), &[], b"x", &[dest])
            .unwrap_err();
        assert_ne!(err.kind(), io::ErrorKind::WouldBlock);
    }

    fn local(ip: &str) -> LocalAddr {
        LocalAddr {
            ip: ip.parse().unwrap(),
            ifindex: 0,
        }
    }

    /// The first datagram `batch` reads from `sock`, as (bytes, local).
    fn recv_one(batch: &mut RecvBatch, sock: &UdpSocket) -> (Vec<u8>, Option<LocalAddr>) {
        recv_some(batch, sock);
        let d = batch.get(0);
        (d.data.to_vec(), d.local)
    }

    #[test]
    fn pktinfo_reports_the_address_each_datagram_was_sent_to() {
        let mut batch = RecvBatch::new(4, 64);
        for (at, v6, want) in [
            ("127.0.0.1:0", false, "127.0.0.1"),
            ("[::1]:0", true, "::1"),
            // A dual-stack socket's IPv4 datagram: IPv4-mapped, shown as IPv4.
            ("[::ffff:127.0.0.1]:0", true, "127.0.0.1"),
        ] {
            let server = bound(at);
            let client = bound(if at == "[::1]:0" {
                "[::1]:0"
            } else {
                "127.0.0.1:0"
            });
            let to = server.local_addr().unwrap();
            let to = SocketAddr::new(to.ip().to_canonical(), to.port());
            client.send_to(b"before", to).unwrap();
            assert_eq!(recv_one(&mut batch, &server), (b"before".to_vec(), None));
            enable_pktinfo(server.as_fd(), v6).unwrap();
            client.send_to(b"after", to).unwrap();
            assert_eq!(
                recv_one(&mut batch, &server),
                (b"after".to_vec(), Some(local(want))),
                "{at}"
            );
        }
    }

    #[test]
    fn no_address_to_send_from_is_no_local_address() {
        assert_eq!(LocalAddr::new("0.0.0.0".parse().unwrap(), 1), None);
        assert_eq!(LocalAddr::new("255.255.255.255".parse().unwrap(), 1), None);
        assert_eq!(LocalAddr::new("224.0.0.1".parse().unwrap(), 1), None);
        assert_eq!(LocalAddr::new("ff02::1".parse().unwrap(), 1), None);
        assert_eq!(LocalAddr::new("::".parse().unwrap(), 1), None);
        // The interface matters only where the address is ambiguous.
        assert_eq!(
            LocalAddr::new("10.0.0.1".parse().unwrap(), 3),
            Some(local("10.0.0.1"))
        );
        assert_eq!(
            LocalAddr::new("::ffff:10.0.0.1".parse().unwrap(), 3),
            Some(local("10.0.0.1"))
        );
        let link = LocalAddr::new("fe80::1".parse().unwrap(), 3).unwrap();
        assert_eq!(link.ifindex, 3);
    }

    #[test]
    fn source_controls_are_the_pktinfo_the_kernel_expects() {
        let header = |c: &SourceControl| {
            let b = c.bytes();
            let len = usize::from_ne_bytes(b[0..8].try_into().unwrap());
            let level = i32::from_ne_bytes(b[8..12].try_into().unwrap());
            let kind = i32::from_ne_bytes(b[12..16].try_into().unwrap());
            (b.len(), len, level, kind, b[16..].to_vec())
        };
        let v4 = SourceControl::new(&local("10.1.2.3"), false).unwrap();
        let (space, len, level, kind, data) = header(&v4);
        assert_eq!((space, len), (32, 28));
        assert_eq!((level, kind), (libc::IPPROTO_IP, libc::IP_PKTINFO));
        // ipi_ifindex 0, ipi_spec_dst the address, ipi_addr 0.
        assert_eq!(&data[..12], &[0, 0, 0, 0, 10, 1, 2, 3, 0, 0, 0, 0]);
        let mapped = SourceControl::new(&local("10.1.2.3"), true).unwrap();
        let (space, len, level, kind, data) = header(&mapped);
        assert_eq!((space, len), (40, 36));
        assert_eq!((level, kind), (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO));
        let want: Ipv6Addr = "::ffff:10.1.2.3".parse().unwrap();
        assert_eq!(&data[..16], &want.octets());
        assert_eq!(&data[16..20], &0u32.to_ne_bytes());
        let link = LocalAddr::new("fe80::7".parse().unwrap(), 9).unwrap();
        let (_, _, _, _, data) = header(&SourceControl::new(&link, true).unwrap());
        assert_eq!(&data[16..20], &9u32.to_ne_bytes());
        // An IPv6 address cannot be sent from on an IPv4 socket.
        assert!(SourceControl::new(&local("::1"), false).is_none());
    }

    /// A destination tagged with a local address gets its datagram from
    /// that address, whatever the socket is bound to; an untagged one (or
    /// a tag `sources` does not hold) from the bound address, as before.
    /// (127.0.0.2 is this machine's loopback too: all of 127/8 is.)
    #[test]
    fn a_source_control_makes_the_send_leave_from_that_address() {
        for (at, v6) in [("127.0.0.1:0", false), ("[::ffff:127.0.0.1]:0", true)] {
            let server = bound(at);
            let port = server.local_addr().unwrap().port();
            let sink = bound("127.0.0.1:0");
            let to = |local: u8| {
                let sink = sink.local_addr().unwrap();
                let sink: SocketAddr = if v6 {
                    format!("[::ffff:127.0.0.1]:{}", sink.port())
                        .parse()
                        .unwrap()
                } else {
                    sink
                };
                RawAddr::from(sink).with_local(local)
            };
            let sources = [SourceControl::new(&local("127.0.0.2"), v6).unwrap()];
            let mut fan = SendBatch::new(4);
            let dests = [to(1), to(0), to(2)];
            assert_eq!(
                fan.send(server.as_fd(), &sources, b"fan", &dests).unwrap(),
                3
            );
            let mut replies = ReplyBatch::new(4);
            let msgs = [(0..5, to(1)), (0..5, to(0))];
            let sent = replies
                .send(server.as_fd(), &sources, b"reply", &msgs)
                .unwrap();
            assert_eq!(sent, 2);
            let mut got = Vec::new();
            let mut buf = [0u8; 16];
            for _ in 0..5 {
                let (n, from) = sink.recv_from(&mut buf).unwrap();
                assert_eq!(from.port(), port);
                got.push((buf[..n].to_vec(), from.ip().to_string()));
            }
            let want = [
                (&b"fan"[..], "127.0.0.2"),
                (b"fan", "127.0.0.1"),
                (b"fan", "127.0.0.1"),
                (b"reply", "127.0.0.2"),
                (b"reply", "127.0.0.1"),
            ];
            let want: Vec<(Vec<u8>, String)> = want
                .iter()
                .map(|(b, ip)| (b.to_vec(), ip.to_string()))
                .collect();
            assert_eq!(got, want, "{at}");
            // No header keeps a pointer to the sources.
            assert!(fan.hdrs.iter().all(|h| h.msg_hdr.msg_control.is_null()));
            assert!(replies.hdrs.iter().all(|h| h.msg_hdr.msg_control.is_null()));
        }
    }

    /// The IPv6 form of the control message is accepted for a native IPv6
    /// destination too.
    #[test]
    fn a_v6_source_control_is_accepted() {
        let server = bound("[::1]:0");
        let sink = bound("[::1]:0");
        let sources = [SourceControl::new(&local("::1"), true).unwrap()];
        let dest = RawAddr::from(sink.local_addr().unwrap()).with_local(1);
        let sent = SendBatch::new(1).send(server.as_fd(), &sources, b"six", &[dest]);
        assert_eq!(sent.unwrap(), 1);
        let mut buf = [0u8; 8];
        let (n, from) = sink.recv_from(&mut buf).unwrap();
        assert_eq!(
            (&buf[..n], from),
            (&b"six"[..], server.local_addr().unwrap())
        );
    }

    #[test]
    fn rxq_ovfl_reports_kernel_drops() {
        let server = bound("127.0.0.1:0");
        enable_rxq_ovfl(server.as_fd()).unwrap();
        let sock = socket2::SockRef::from(&server);
        sock.set_recv_buffer_size(4096).unwrap();
        let c = bound("127.0.0.1:0");
        // A small receive buffer overflows after a handful of datagrams;
        // 2000 sends is far beyond that and bounded.
        for _ in 0..2000 {
            let _ = c.send_to(&[1u8; 512], server.local_addr().unwrap());
        }
        // The counter rides on datagrams queued *after* the drops: drain
        // what was queued before, then send one more.
        let mut batch = RecvBatch::new(64, 1024);
        while batch.recv(server.as_fd()).is_ok() {}
        c.send_to(b"after", server.local_addr().unwrap()).unwrap();
        let n = recv_some(&mut batch, &server);
        let drops = (0..n).filter_map(|i| batch.get(i).kernel_drops).max();
        assert!(drops.unwrap_or(0) > 0, "kernel drop counter not reported");
        // SO_MEMINFO reads the same counter without waiting for a datagram.
        assert!(socket_drops(server.as_fd()).unwrap() >= drops.unwrap());
    }
}

// ---------------------------------------------------------------------
// Steering the loops' SO_REUSEPORT group (SO_ATTACH_REUSEPORT_CBPF).
//
// Not a batched syscall: it lives here because it is the one other
// setsockopt whose value is a pointer (to the program), and this is the
// module allowed `unsafe`. The program itself is plain data, built and
// tested in `net::steering`; its own tests are at the end of this file.
// ---------------------------------------------------------------------

/// Attaches a classic BPF program to the SO_REUSEPORT group `fd` belongs
/// to: from then on the kernel hands each datagram for the group's
/// address to the socket at the index the program returns (or, for an
/// index past the group's end, falls back to its own hash).
///
/// `fd` must already be bound with SO_REUSEPORT in the group (any member
/// will do: the program is the group's). An empty or over-long program is
/// an `InvalidInput` error; one the kernel's checker refuses is its error
/// (`EINVAL`).
pub fn attach_reuseport_cbpf(fd: BorrowedFd<'_>, program: &[libc::sock_filter]) -> io::Result<()> {
    let len = u16::try_from(program.len())
        .ok()
        .filter(|&n| n > 0 && i32::from(n) <= libc::BPF_MAXINSNS)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "a reuseport program needs 1 to BPF_MAXINSNS instructions",
            )
        })?;
    let fprog = libc::sock_fprog {
        len,
        // The kernel only reads the instructions (it copies them in).
        filter: program.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: the option value is a live `sock_fprog` of the exact size
    // passed; its `filter` points at `program`, `len` instructions, borrowed
    // for this whole call. The kernel copies the instructions before it
    // returns and keeps no pointer to them.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            (&fprog as *const libc::sock_fprog).cast(),
            mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod reuseport_tests {
    use super::*;
    use std::net::{SocketAddr, UdpSocket};
    use std::os::fd::AsFd;
    use std::time::{Duration, Instant};

    /// A non-blocking SO_REUSEPORT socket bound to `addr`.
    fn reuse_port(addr: SocketAddr) -> UdpSocket {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
        s.set_reuse_port(true).unwrap();
        s.bind(&addr.into()).unwrap();
        let s: UdpSocket = s.into();
        s.set_nonblocking(true).unwrap();
        s
    }

    /// A group of `n` SO_REUSEPORT sockets on one loopback address.
    fn group(n: usize) -> Vec<UdpSocket> {
        let first = reuse_port("127.0.0.1:0".parse().unwrap());
        let addr = first.local_addr().unwrap();
        let mut socks = vec![first];
        socks.extend((1..n).map(|_| reuse_port(addr)));
        socks
    }

    /// Datagrams waiting on `s`, drained without blocking.
    fn waiting(s: &UdpSocket) -> usize {
        let mut buf = [0u8; 16];
        std::iter::from_fn(|| s.recv(&mut buf).ok()).count()
    }

    fn ret(k: u32) -> libc::sock_filter {
        libc::sock_filter {
            code: (libc::BPF_RET | libc::BPF_K) as u16,
            jt: 0,
            jf: 0,
            k,
        }
    }

    #[test]
    fn a_reuseport_program_picks_the_socket_and_a_latecomer_gets_nothing() {
        let socks = group(2);
        let addr = socks[0].local_addr().unwrap();
        // `ret #1`: everything to the group's second socket.
        attach_reuseport_cbpf(socks[0].as_fd(), &[ret(1)]).unwrap();
        // A third socket joins the group after the program (index 2).
        let stranger = reuse_port(addr);
        let clients: Vec<UdpSocket> = (0..50)
            .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
            .collect();
        for c in &clients {
            c.send_to(b"x", addr).unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut got = 0;
        while got < 50 && Instant::now() < deadline {
            got += waiting(&socks[1]);
        }
        assert_eq!(got, 50);
        assert_eq!(waiting(&socks[0]), 0);
        assert_eq!(waiting(&stranger), 0);
    }

    #[test]
    fn a_bad_reuseport_program_is_an_error_not_a_crash() {
        let socks = group(1);
        let err = attach_reuseport_cbpf(socks[0].as_fd(), &[]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        // A jump past the end: the kernel's checker refuses it.
        let bad = libc::sock_filter {
            code: (libc::BPF_JMP | libc::BPF_JA) as u16,
            jt: 0,
            jf: 0,
            k: 10,
        };
        assert!(attach_reuseport_cbpf(socks[0].as_fd(), &[bad, ret(0)]).is_err());
        // A socket bound without SO_REUSEPORT has no group: refused too.
        let lone = UdpSocket::bind("127.0.0.1:0").unwrap();
        let steering = crate::net::steering::program(2);
        assert!(attach_reuseport_cbpf(lone.as_fd(), &steering).is_err());
        // udphub's own program passes the kernel's checker.
        attach_reuseport_cbpf(socks[0].as_fd(), &steering).unwrap();
    }
}

// ---------------------------------------------------------------------
// Sockets inherited from the service manager (socket activation).
//
// Not a batched syscall either: taking ownership of a descriptor number
// (`OwnedFd::from_raw_fd`) is unsafe, and this is the module allowed it.
// What the sockets must be (UDP, one address) is checked safely by
// `net::activation` once they are owned.
// ---------------------------------------------------------------------

/// The first descriptor a service manager passes (`SD_LISTEN_FDS_START`:
/// after stdin, stdout and stderr).
pub const LISTEN_FDS_START: RawFd = 3;

/// The most descriptors [`adopt_listen_fds`] takes: one per loop, and
/// udphub runs at most 64 loops. A larger `LISTEN_FDS` is refused before
/// anything is adopted.
pub const MAX_LISTEN_FDS: usize = 64;

/// Set by the first [`adopt_listen_fds`]: the inherited range is adopted
/// at most once per process, so no descriptor gets two owners.
static LISTEN_FDS_ADOPTED: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Takes ownership of the `count` descriptors a service manager passed
/// this process (`3 .. 3 + count`, the `LISTEN_FDS` protocol). Call it
/// once, at start, before the process opens descriptors of its own, and
/// only after checking that `LISTEN_PID` names this process (then the
/// descriptors were passed to it, open, by whoever exec'd it).
///
/// Each descriptor must be open (`fcntl(F_GETFD)`), or the call fails
/// with `EBADF` naming it (those adopted before it are closed). A second
/// call, or a `count` over [`MAX_LISTEN_FDS`], is an `InvalidInput` error
/// that adopts nothing.
pub fn adopt_listen_fds(count: usize) -> io::Result<Vec<OwnedFd>> {
    use std::sync::atomic::Ordering;
    if count > MAX_LISTEN_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{count} inherited descriptors; udphub takes at most {MAX_LISTEN_FDS}"),
        ));
    }
    if LISTEN_FDS_ADOPTED.swap(true, Ordering::SeqCst) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the inherited descriptors were already taken",
        ));
    }
    // SAFETY: the range 3 .. 3 + count is what the service manager passed
    // this process (the caller checked LISTEN_PID is ours), and nothing in
    // udphub owns those numbers: they were open before `main`, udphub never
    // wraps a raw number it did not create except here, and the flag above
    // makes this the only time per process. `adopt_range` checks each is
    // open before owning it.
    unsafe { adopt_range(LISTEN_FDS_START, count) }
}

/// Owns descriptors `first .. first + count`, each checked open first.
///
/// # Safety
///
/// Nothing else in the process may own (or later wrap, or close) any of
/// these numbers: each returned `OwnedFd` closes its descriptor on drop.
unsafe fn adopt_range(first: RawFd, count: usize) -> io::Result<Vec<OwnedFd>> {
    let mut owned = Vec::with_capacity(count);
    for i in 0..count {
        let fd = RawFd::try_from(i)
            .ok()
            .and_then(|i| first.checked_add(i))
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EBADF))?;
        // SAFETY: F_GETFD reads the descriptor's flags and touches no
        // memory; on a closed number it fails with EBADF.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("inherited descriptor {fd} is not open: {e}"),
            ));
        }
        // SAFETY: `fd` is open (checked just above) and, by this
        // function's contract, owned by nothing else: the OwnedFd becomes
        // its one owner.
        owned.push(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    Ok(owned)
}

#[cfg(test)]
mod inherited_tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::{AsRawFd, IntoRawFd};

    #[test]
    fn an_inherited_socket_is_owned_once_and_a_closed_number_refused() {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = socket.local_addr().unwrap();
        // Give the number up, as an exec does: nothing owns it now.
        let raw = socket.into_raw_fd();
        // SAFETY: `raw` was released by into_raw_fd just above and is
        // wrapped here once.
        let owned = unsafe { adopt_range(raw, 1) }.unwrap();
        assert_eq!(owned.len(), 1);
        assert_eq!(owned[0].as_raw_fd(), raw);
        let back = UdpSocket::from(owned.into_iter().next().unwrap());
        assert_eq!(back.local_addr().unwrap(), addr);
        // A number far above any open descriptor: EBADF, nothing owned.
        // SAFETY: nothing owns a descriptor that is not open.
        let err = unsafe { adopt_range(1 << 20, 1) }.unwrap_err();
        assert!(err.to_string().contains("not open"), "{err}");
        // Too many: refused before anything is touched.
        let err = adopt_listen_fds(MAX_LISTEN_FDS + 1).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }
}

// ---------------------------------------------------------------------------
// Passing sockets to another process (a hand-over, `serve --takeover`).
//
// nix builds and parses the SCM_RIGHTS control message; what it cannot do
// safely is the one step that makes a descriptor number the kernel just
// installed in this process into an owned descriptor: that is here.

/// The most descriptors one hand-over message carries: the loops' cap
/// (one socket per loop).
pub const MAX_PASSED_FDS: usize = 64;

/// Sends `bytes` over the Unix stream socket `sock` with `fds` attached
/// (SCM_RIGHTS): the receiver gets its own descriptors for the same open
/// sockets. Returns how many of `bytes` were sent (the descriptors go with
/// the first byte).
pub fn send_with_fds(
    sock: BorrowedFd<'_>,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<usize> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};
    if fds.len() > MAX_PASSED_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} descriptors, at most {MAX_PASSED_FDS}", fds.len()),
        ));
    }
    let raw: Vec<i32> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let iov = [io::IoSlice::new(bytes)];
    let cmsgs = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsgs };
    sendmsg::<UnixAddr>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None)
        .map_err(io::Error::from)
}

/// Receives into `buf` from the Unix stream socket `sock`, with any
/// descriptors attached (at most [`MAX_PASSED_FDS`], close-on-exec).
/// Returns the bytes read (0: the peer closed) and the descriptors, owned:
/// dropping them closes them. A message whose descriptors did not fit is
/// an error.
pub fn recv_with_fds(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
) -> io::Result<(usize, Vec<std::os::fd::OwnedFd>)> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixAddr};
    use std::os::fd::{FromRawFd, OwnedFd};
    let mut space = nix::cmsg_space!([i32; MAX_PASSED_FDS]);
    let mut iov = [io::IoSliceMut::new(buf)];
    let msg = recvmsg::<UnixAddr>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(io::Error::from)?;
    let n = msg.bytes;
    let mut owned = Vec::new();
    for cmsg in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            for fd in fds {
                // SAFETY: the kernel has just installed `fd` in this
                // process's table for this message (SCM_RIGHTS), and
                // nothing else in the process knows its number yet: it is
                // open and owned by no one, so one `OwnedFd` taking it is
                // the only owner, and closes it exactly once.
                owned.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    Ok((n, owned))
}

#[cfg(test)]
mod fd_passing_tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    /// A UDP socket passed over a Unix socket arrives as a working socket
    /// bound to the same address: a datagram sent to it is read through
    /// the received descriptor.
    #[test]
    fn a_passed_udp_socket_reads_what_was_sent_to_the_original() {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = udp.local_addr().unwrap();
        let (a, b) = UnixStream::pair().unwrap();
        assert_eq!(
            send_with_fds(a.as_fd(), b"sock", &[udp.as_fd(), udp.as_fd()]).unwrap(),
            4
        );
        let mut buf = [0u8; 16];
        let (n, fds) = recv_with_fds(b.as_fd(), &mut buf).unwrap();
        assert_eq!((&buf[..n], fds.len()), (&b"sock"[..], 2));
        drop(udp);
        let mut fds = fds.into_iter();
        let got = std::net::UdpSocket::from(fds.next().unwrap());
        assert_eq!(got.local_addr().unwrap(), addr);
        got.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        client.send_to(b"hello", addr).unwrap();
        let mut data = [0u8; 16];
        let (n, _) = got.recv_from(&mut data).unwrap();
        assert_eq!(&data[..n], b"hello");
    }

    /// Plain bytes carry no descriptors; a closed peer reads as 0 bytes;
    /// too many descriptors are refused before anything is sent.
    #[test]
    fn no_descriptors_and_a_closed_peer() {
        let (a, b) = UnixStream::pair().unwrap();
        send_with_fds(a.as_fd(), b"x", &[]).unwrap();
        let mut buf = [0u8; 4];
        let (n, fds) = recv_with_fds(b.as_fd(), &mut buf).unwrap();
        assert_eq!((n, fds.len()), (1, 0));
        let many: Vec<_> = (0..=MAX_PASSED_FDS).map(|_| a.as_fd()).collect();
        assert!(send_with_fds(a.as_fd(), b"x", &many).is_err());
        drop(a);
        assert_eq!(recv_with_fds(b.as_fd(), &mut buf).unwrap().0, 0);
    }
}
