//! The companions: clients for people and scripts, and the seeds' echo
//! server. None of them is part of the relay; the relay's tests and users
//! drive it with them.
//!
//! - [`chat`]: `udphub chat`, the terminal/pipe client; [`lan`]: its
//!   `--lan` serverless broadcast room (seed 003).
//! - [`send`]: `udphub send`, one datagram and its replies (seed 004's client).
//! - [`room`]: joining a room from `chat` and `send` (`--room`, `--token`).
//! - [`echo`]: `udphub echo`, the seeds' echo server, on the relay's loop.

pub mod chat;
pub mod echo;
pub mod lan;
pub mod room;
pub mod send;
pub mod tcp_echo;
