//! The companions: clients for people and scripts. None of them is part
//! of the relay; the relay's tests and users drive it with them. (The
//! seeds' echo servers are in [`crate::servers`].)
//!
//! - [`chat`]: `udphub chat`, the terminal/pipe client; [`lan`]: its
//!   `--lan` serverless broadcast room (seed 003).
//! - [`send`]: `udphub send`, one datagram and its replies (seed 004's client).
//! - [`room`]: the `--room`, `--token` flags `chat` and `send` share, as
//!   the client library's options, and its errors said with those flags.
//!
//! `chat` and `send` talk to a relay through [`crate::client`], the
//! client library, which owns the handshake, heartbeats and verify mode.

pub mod chat;
pub mod lan;
pub mod room;
pub mod send;
