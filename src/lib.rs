//! udphub: a production UDP group-chat relay.
//!
//! Clients send datagrams to one socket; `^hb^` (or an empty datagram) is a
//! heartbeat, `quit` leaves, anything else is relayed to every live client,
//! and clients silent for `--timeout` expire. The protocol is the classic
//! Python UDP chat server's, kept byte-compatible (see `docs/PROTOCOL.md`).
//!
//! A thread runs a mio poll loop (one per core with `--threads`, each on
//! its own socket of one port): datagrams are read in `recvmmsg`
//! batches, admitted, and handed to the hub — a state machine with no I/O —
//! whose decisions (fan this message out to these members) the loop carries
//! out in `sendmmsg` batches. Expiry runs on a hashed timer wheel.
//! Everything is counted in Prometheus metrics. See `docs/ARCHITECTURE.md`.
//!
//! # Layout
//!
//! The folders are the layers, and imports point one way: core ← net ←
//! runtime ← programs (`clients`, `servers`, `cli`), with `config` below
//! the runtime (docs/ARCHITECTURE.md's layer table, which
//! `tests/layers.rs` checks every `crate::` path against).
//!
//! - [`error`]: the typed start-up error.
//! - [`throttle`]: a log line at most once per interval, for the loops and
//!   the cluster bridge.
//! - [`core`]: no I/O, no locks, no threads — [`core::admission`] (every
//!   drop reason), [`core::hub`] (the state machine), [`core::protocol`],
//!   [`core::table`], [`core::rooms`], [`core::wheel`], [`core::clock`],
//!   [`core::addr`], [`core::counts`], [`core::cookie`] and
//!   [`core::limits`] (verify mode's cookies and their budget),
//!   [`core::token`] (room tokens), [`core::census`] (what the relay-wide
//!   caps are checked against), [`core::backlog`] (fan-outs sliced or
//!   waiting for the send buffer), [`core::reply_backlog`] (replies waiting
//!   for it), [`core::snapshot`] (the members a hand-over passes on).
//! - [`net`]: the system calls — [`net::batch_io`] (`recvmmsg`/`sendmmsg`,
//!   the only `unsafe` code), [`net::fanout`], [`net::local_addrs`] (which
//!   of the relay's addresses a reply leaves from), [`net::socket`] (one
//!   socket, or the loops' group), [`net::activation`] (the sockets a
//!   service manager passes), [`net::steering`] (which loop a source
//!   goes to), [`net::holders`] (who else holds an address).
//! - [`config`]: `udphub serve`'s settings — [`config::settings`] declares
//!   each one once (where a new setting goes); flags, environment, the
//!   TOML file, defaults, checks, reload and the docs table follow;
//!   [`config::tls`] reads the TLS files for NATS at start.
//! - [`runtime`]: threads and loops — [`runtime::supervisor`] (signals,
//!   metrics endpoint, ready file; `udphub serve`), [`runtime::event_loop`]
//!   (the mio loop and its `Service` trait), [`runtime::relay`] (the relay
//!   service that executes the hub's effects), `runtime::replies` (the
//!   replies of a batch, sent together), [`runtime::shards`] (several
//!   loops on one port) and [`runtime::census`] (the counts they share),
//!   [`runtime::handover`] (passing sockets and members to a new process),
//!   [`runtime::upgrade`] (SIGUSR2: the relay starts its successor),
//!   [`runtime::reload`] (SIGHUP), [`runtime::metrics`],
//!   [`runtime::exporter`] (`/metrics`, `/healthz`, `/readyz`),
//!   [`runtime::readiness`] (the phase the probes and systemd read),
//!   [`runtime::notify`] (`READY=1`), [`runtime::logging`] and
//!   [`runtime::watch`] (no stranger on the relay's address).
//! - [`cluster`]: relays sharing rooms over NATS — the loop's
//!   [`cluster::Bus`], the [`cluster::bridge`] thread, the
//!   [`cluster::frame`]s on the bus (batches, tags), the [`cluster::keys`]
//!   that sign them, each room's [`cluster::inbox`], the
//!   [`cluster::interest`] in rooms, and the bridge's [`cluster::tls`]
//!   client.
//! - [`client`]: the client library — connect, join, send, receive,
//!   heartbeats and verify mode's handshake ([`client::Client`] over a
//!   sans-I/O [`client::Session`]).
//! - [`clients`]: `chat`, `chat --lan`, `send`, written on [`client`].
//! - [`servers`]: `echo` and `echo --tcp`, the seeds' echo servers.
//! - [`cli`]: the `udphub` command line, which runs all of the above.
//! - `fuzzing`: the entry points `fuzz/` and the corpus-replay test run.

#![deny(missing_docs, rust_2018_idioms, unsafe_code)]
#![warn(unreachable_pub)]

pub mod cli;
pub mod client;
pub mod clients;
pub mod cluster;
pub mod config;
pub mod core;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod net;
pub mod runtime;
pub mod servers;
pub mod throttle;

pub use config::Config;
pub use error::Error;
pub use runtime::relay::{bind, Relay, RelayLoop};
pub use runtime::supervisor::serve;
