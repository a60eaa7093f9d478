//! The runtime: the threads, the poll loops and the system calls' callers.
//!
//! - [`event_loop`]: one mio loop over one UDP socket, shared by every
//!   server through its [`event_loop::Service`] trait.
//! - [`relay`]: the chat relay as a service — executes the hub's effects.
//! - [`census`]: the client and room counts the loops of one relay share
//!   (the caps are the relay's).
//! - [`supervisor`]: signals, the ready file, and the loop threads;
//!   [`supervisor::serve`] is `udphub serve`.
//! - [`handover`]: passing the sockets and the members to a new process
//!   (`--control`, `serve --takeover`).
//! - [`shards`]: several loops on one port (`--threads`): the queues and
//!   wake-ups between them.
//! - [`reload`]: what SIGHUP changes in a running relay, and what it
//!   refuses.
//! - [`logging`]: the process's logger (text or JSON lines), and its
//!   filter changed on reload.
//! - [`metrics`]: per-loop counts flushed to the metrics facade.
//! - [`exporter`]: the Prometheus recorder and its `/metrics` endpoint,
//!   with the probes `/healthz` and `/readyz`.
//! - [`readiness`]: what the relay is doing (starting, serving, handing
//!   over, shutting down), for the probes and systemd.
//! - [`notify`]: systemd's `READY=1`/`STOPPING=1`/`MAINPID=`
//!   (`NOTIFY_SOCKET`).
//! - [`upgrade`]: SIGUSR2 — the relay starts the process that takes it
//!   over, as its child (inside a systemd service's cgroup).
//! - [`watch`]: the periodic check that no other process shares the
//!   relay's address.

pub mod census;
pub mod event_loop;
pub mod exporter;
pub mod handover;
pub mod logging;
pub mod metrics;
pub mod notify;
pub mod readiness;
pub mod relay;
pub mod reload;
pub(crate) mod replies;
pub mod shards;
pub mod supervisor;
pub mod upgrade;
pub mod watch;

// The configuration's cap on loops is the runtime's and net's: a room's
// interest across shards is a 64-bit mask, and the steering program picks
// among that many sockets.
const _: () = assert!(
    crate::config::MAX_THREADS == shards::MAX_SHARDS
        && crate::config::MAX_THREADS == crate::net::steering::MAX_LOOPS as usize
);
