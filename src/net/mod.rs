//! The network layer: the system calls, and nothing that decides.
//!
//! - [`batch_io`]: `recvmmsg`/`sendmmsg` and the kernel's drop counter —
//!   the only `unsafe` code in udphub.
//! - [`fanout`]: one buffer to many destinations in `sendmmsg` batches,
//!   and the drop policy when the kernel won't take more.
//! - [`socket`]: creating and binding the UDP socket, buffer sizes.
//! - [`steering`]: the classic BPF program that pins each source to one
//!   of the group's loops (attached by [`batch_io`]).

#[allow(unsafe_code)]
pub mod batch_io;
pub mod fanout;
pub mod socket;
pub mod steering;
