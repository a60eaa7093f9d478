//! udphub: a production UDP group-chat relay.
//!
//! Clients send datagrams to one socket; `^hb^` (or an empty datagram) is a
//! heartbeat, `quit` leaves, anything else is relayed to every live client,
//! and clients silent for `--timeout` expire. The protocol is the classic
//! Python UDP chat server's, kept byte-compatible (see `docs/PROTOCOL.md`).
//!
//! One thread runs a mio poll loop: datagrams are read in `recvmmsg`
//! batches, classified, looked up in a hashbrown + slab client table, and
//! each message is rendered once and fanned out in `sendmmsg` batches.
//! Expiry runs on a hashed timer wheel. Everything is counted in Prometheus
//! metrics. See `docs/ARCHITECTURE.md`.
//!
//! # Layout
//!
//! - [`event_loop`]: the mio loop shared by every server, and its [`event_loop::Service`] trait.
//! - [`relay`]: the chat relay service, and [`serve`], what `udphub serve` runs.
//! - [`echo`]: `udphub echo`, the seeds' echo server as a service on the same loop.
//! - [`chat`]: `udphub chat`, the terminal/pipe client; [`lan`]: its `--lan` broadcast room.
//! - [`send`]: `udphub send`, one datagram and its replies.
//! - [`protocol`]: classifying datagrams and rendering the `--format` template.
//! - [`table`]: the client table (address → slab slot, with generations).
//! - [`wheel`]: the hashed timer wheel for heartbeat expiry.
//! - [`fanout`]: one buffer to many destinations, and the drop policy.
//! - [`batch_io`]: `recvmmsg`/`sendmmsg`, the only `unsafe` code.
//! - [`addr`]: client addresses kept in kernel `sockaddr` layout.
//! - [`socket`]: binding the socket, buffer sizes.
//! - [`metrics`]: local counts flushed per batch to the Prometheus exporter.
//! - [`config`]: flags, environment, TOML file, defaults, validation.
//! - [`cli`]: the `udphub` command line.
//! - [`error`]: the typed start-up error.

#![deny(missing_docs, rust_2018_idioms)]
#![warn(unreachable_pub)]

pub mod addr;
pub mod batch_io;
pub mod chat;
pub mod cli;
pub mod config;
pub mod echo;
pub mod error;
pub mod event_loop;
pub mod fanout;
pub mod lan;
pub mod metrics;
pub mod protocol;
pub mod relay;
pub mod send;
pub mod socket;
pub mod table;
pub mod wheel;

pub use config::Config;
pub use error::Error;
pub use relay::{serve, Relay, ShutdownHandle};
