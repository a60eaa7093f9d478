//! The seeds' echo servers: programs beside the relay, built on its
//! runtime, that load tests and users measure the relay against.
//!
//! - [`echo`]: `udphub echo`, the UDP echo server of seeds 004 and 001, as a
//!   [`Service`](crate::runtime::event_loop::Service) on the relay's loop
//!   (same batching, drop accounting, metrics and signals).
//! - [`tcp_echo`]: `udphub echo --tcp`, seed 001's TCP echo server as its
//!   own mio loop.

pub mod echo;
pub mod tcp_echo;
