//! Batched datagram syscalls (`recvmmsg`, `sendmmsg`) and the kernel's
//! receive-drop counter (`SO_RXQ_OVFL`, `SO_MEMINFO`).
//!
//! This is the only module of udphub with `unsafe` code. It hides the raw
//! `mmsghdr`/`iovec`/`cmsghdr` arrays behind two plain, safe types:
//!
//! - [`RecvBatch`] reads up to `capacity` datagrams with one `recvmmsg` and
//!   hands them out as [`Datagram`]s (bytes, source, truncation, kernel drop
//!   counter);
//! - [`SendBatch`] sends *one* payload to many [`RawAddr`]s with one
//!   `sendmmsg`: every header points at the same `iovec`, so a fan-out of one
//!   pre-rendered buffer to 256 clients costs one syscall and no copies;
//! - [`ReplyBatch`] sends different payloads to different destinations
//!   (an echo server's replies) with one `sendmmsg`.
//!
//! A separate section at the end holds the one unsafe call that is not a
//! batched syscall: [`attach_reuseport_cbpf`], the setsockopt that gives
//! the loops' SO_REUSEPORT group its steering program.
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
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr;

use crate::core::addr::{RawAddr, SOCKADDR_MAX};

/// Room for one control message carrying a `u32` (SO_RXQ_OVFL): a 16-byte
/// `cmsghdr` plus the payload, padded: `CMSG_SPACE(4)` = 24 bytes. 64 leaves
/// room should the kernel attach another message (it then sets
/// `MSG_CTRUNC` rather than overflow, and we ignore what was cut).
const CONTROL_WORDS: usize = 8;

// The control buffers are arrays of `u64` so that each starts aligned for
// a `cmsghdr`, as `CMSG_FIRSTHDR` assumes.
const _: () = assert!(mem::align_of::<u64>() >= mem::align_of::<libc::cmsghdr>());
const _: () = assert!(
    CONTROL_WORDS * 8 >= mem::size_of::<libc::cmsghdr>() + mem::size_of::<u32>(),
    "control buffer too small for SO_RXQ_OVFL"
);

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
}

/// Reusable buffers for `recvmmsg`.
pub struct RecvBatch {
    /// Bytes per datagram slot; longer datagrams come back `truncated`.
    slot_len: usize,
    /// `capacity * slot_len` bytes of datagram payload.
    bufs: Vec<u8>,
    /// Source address per slot, written by the kernel.
    names: Vec<libc::sockaddr_storage>,
    /// Control-message buffer per slot (for SO_RXQ_OVFL).
    control: Vec<[u64; CONTROL_WORDS]>,
    /// One `iovec` per slot, pointing into `bufs`.
    iovs: Vec<libc::iovec>,
    /// The header array handed to the kernel.
    hdrs: Vec<libc::mmsghdr>,
    /// Kernel drop counter parsed per slot after each call.
    drops: Vec<Option<u32>>,
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
            // A control message cut short (MSG_CTRUNC) is not trusted; the
            // drop counter is read again with SO_MEMINFO within a second.
            self.drops[i] = if msg.msg_flags & libc::MSG_CTRUNC != 0 {
                None
            } else {
                parse_rxq_ovfl(msg)
            };
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

/// Finds the SO_RXQ_OVFL control message, if the kernel attached one.
fn parse_rxq_ovfl(msg: &libc::msghdr) -> Option<u32> {
    if msg.msg_controllen == 0 || msg.msg_control.is_null() {
        return None;
    }
    // SAFETY: `msg` is the header the kernel just filled: `msg_control`
    // points at our control buffer and `msg_controllen` is the length the
    // kernel wrote (never more than we offered). CMSG_FIRSTHDR/NXTHDR only
    // return headers that lie wholly inside that range, or null.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(msg);
        while !cmsg.is_null() {
            let c = &*cmsg;
            if c.cmsg_level == libc::SOL_SOCKET
                && c.cmsg_type == libc::SO_RXQ_OVFL
                && c.cmsg_len as usize >= libc::CMSG_LEN(mem::size_of::<u32>() as u32) as usize
            {
                // The payload may not be 4-aligned relative to our buffer's
                // view of it; read unaligned.
                return Some(ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<u32>()));
            }
            cmsg = libc::CMSG_NXTHDR(msg, cmsg);
        }
    }
    None
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
    /// used) in one `sendmmsg`, without blocking.
    ///
    /// Returns how many leading destinations were handed to the kernel. When
    /// that is fewer than asked, the next one failed; sending from it again
    /// returns its error. An error means `dests[0]` failed and nothing was
    /// sent. `Interrupted` is retried here.
    pub fn send(
        &mut self,
        fd: BorrowedFd<'_>,
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
        // SAFETY: `hdrs[..n]` were all set above. Their `msg_name`s point
        // into `dests` and their `msg_iov` at `iov`, which points at
        // `payload`; `dests`, `iov` and `payload` are borrowed for this
        // whole function, so all outlive the call.
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
/// buffers of their lengths, all valid for the duration of the call.
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
    /// `capacity` of them) in one `sendmmsg`, without blocking. Returns how
    /// many leading messages were sent, like [`SendBatch::send`].
    /// A range outside `arena` is an `InvalidInput` error, before any send.
    pub fn send(
        &mut self,
        fd: BorrowedFd<'_>,
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
        // SAFETY: `hdrs[..n]` were all set above. Each `msg_name` points
        // into `msgs` and each `msg_iov` at `iovs[i]`, which points at a
        // checked sub-slice of `arena`; `msgs` and `arena` are borrowed for
        // this whole function and `iovs` is owned by `self` and not touched
        // during the call, so all outlive it.
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

    #[test]
    fn send_fans_one_payload_out_to_v4_and_v6_destinations() {
        let server = bound("[::]:0");
        let v4 = bound("127.0.0.1:0");
        let v6 = bound("[::1]:0");
        let mapped: SocketAddr = format!("[::ffff:127.0.0.1]:{}", v4.local_addr().unwrap().port())
            .parse()
            .unwrap();
        let dests = [
            RawAddr::from(mapped),
            RawAddr::from(v6.local_addr().unwrap()),
        ];
        let mut batch = SendBatch::new(16);
        let sent = batch.send(server.as_fd(), b"hello all", &dests).unwrap();
        assert_eq!(sent, 2);
        let mut buf = [0u8; 64];
        for s in [&v4, &v6] {
            let (n, from) = s.recv_from(&mut buf).unwrap();
            assert_eq!(&buf[..n], b"hello all");
            assert_eq!(from.port(), server.local_addr().unwrap().port());
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
        assert_eq!(batch.send(server.as_fd(), b"x", &dests).unwrap(), 3);
        assert_eq!(batch.send(server.as_fd(), b"x", &dests[3..]).unwrap(), 2);
        assert_eq!(batch.send(server.as_fd(), b"x", &[]).unwrap(), 0);
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
        assert_eq!(batch.send(server.as_fd(), arena, &msgs).unwrap(), 2);
        let mut buf = [0u8; 16];
        let n = a.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"first");
        let n = b.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"second");
        // A range outside the arena is refused before anything is sent.
        let bad = [(0..5, msgs[0].1), (8..40, msgs[1].1)];
        let err = batch.send(server.as_fd(), arena, &bad).unwrap_err();
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
            .send(server.as_fd(), b"x", &[dest])
            .unwrap_err();
        assert_ne!(err.kind(), io::ErrorKind::WouldBlock);
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
