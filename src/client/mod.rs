//! The client library: connect to a relay, join rooms, send, receive,
//! heartbeat and verify mode's cookie handshake, in one place. `udphub
//! chat`, `udphub send` and loadtest's members are written on it; so can
//! any Rust program be. (The Python package in `clients/python` is the
//! same for Python; docs/CLIENTS.md shows both, docs/PROTOCOL.md has the
//! bytes.)
//!
//! - [`Session`] (in [`session`]): the protocol state without I/O — takes
//!   datagrams and `now`, returns datagrams to send and [`Event`]s.
//! - [`Client`] (in [`blocking`]): a session over a std `UdpSocket`,
//!   blocking with timeouts, no threads of its own: heartbeats go out from
//!   inside [`Client::recv`], [`Client::next_event`] and [`Client::tick`].
//! - [`ClientError`] (in [`error`]): what went wrong, and what fixes it.
//!
//! What the client does by itself: asks the relay's `--timeout`
//! (`^timeout^`) and heartbeats below it; in verify mode (`--public`)
//! proves its address with the relay's cookie, heartbeats with it, takes
//! the renewed cookies, and rejoins its room if the relay forgot it;
//! refuses to talk into a closed lobby; turns a refused join into an
//! error that says why (for a token, from its own claims); treats `bye` as
//! the end of the stream; leaves with a (proven) `quit` when dropped.
//!
//! ```
//! use std::time::Duration;
//! use udphub::client::{Client, ClientError, Options};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # // A relay in this process, on a port of its own choosing.
//! # let config = udphub::Config {
//! #     bind: "127.0.0.1:0".parse()?,
//! #     ..udphub::Config::default()
//! # };
//! # let relay = udphub::bind(&config)?.pop().ok_or("no loop")?;
//! # let addr = relay.local_addr();
//! # let stop = relay.shutdown_handle();
//! # let running = std::thread::spawn(move || relay.run());
//! let alice = Client::connect_with(addr, &Options::room("red", None))?;
//! let bob = Client::connect_with(addr, &Options::room("red", None))?;
//! alice.send(b"hello")?;
//! let got = bob.recv(Duration::from_secs(5))?.ok_or("nothing came")?;
//! assert!(got.starts_with(b"hello. from 127.0.0.1:"));
//! # stop.shutdown();
//! // The relay's `bye` ends the stream.
//! loop {
//!     match bob.recv(Duration::from_secs(5)) {
//!         Err(ClientError::RelayClosed(_)) => break,
//!         Ok(Some(_)) => continue, // alice's own echo, say
//!         other => panic!("{other:?}"),
//!     }
//! }
//! # running.join().map_err(|_| "relay panicked")??;
//! # Ok(())
//! # }
//! ```

pub mod blocking;
pub mod error;
pub mod session;

pub use blocking::{Client, Options};
pub use error::{ClientError, Refusal};
pub use session::{Event, Session};
