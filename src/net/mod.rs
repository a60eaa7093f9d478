//! The network layer: the system calls and what they need. What a
//! datagram means and who receives it is decided in [`crate::core`]; what
//! is decided here is only how bytes move: batching, which deliveries to
//! drop when the kernel will take no more, which loop the kernel hands a
//! source to, which local address a reply leaves from.
//!
//! - [`batch_io`]: `recvmmsg`/`sendmmsg`, the kernel's drop counter and
//!   each datagram's local address — the only `unsafe` code in udphub.
//! - [`fanout`]: one buffer to many destinations in `sendmmsg` batches,
//!   and the drop policy when the kernel won't take more.
//! - [`local_addrs`]: on a wildcard socket, the relay's own addresses
//!   clients talk to, so that what is sent to each leaves from the one it
//!   used.
//! - [`activation`]: the socket(s) a service manager passes
//!   (`LISTEN_FDS`), checked, instead of binding.
//! - [`socket`]: creating and binding the UDP socket(s), buffer sizes; a
//!   group of loops on one address, and its claim on it.
//! - [`steering`]: the classic BPF program that pins each source to one
//!   of the group's loops (attached by [`batch_io`]).
//! - [`holders`]: who else holds a UDP address (`/proc/net/udp*`), for the
//!   messages and the check that nobody joined the group.

pub mod activation;
#[allow(unsafe_code)]
pub mod batch_io;
pub mod fanout;
pub mod holders;
pub mod local_addrs;
pub mod socket;
pub mod steering;
