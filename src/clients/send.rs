//! `udphub send`: one datagram, then print whatever replies arrive within
//! `--wait` (seed 004's client). Handy for scripts and health checks:
//! `udphub send --server 127.0.0.1:50007 ping --expect-reply`.

use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, UdpSocket};
use std::os::unix::ffi::OsStrExt;
use std::time::{Duration, Instant};

use clap::Args;

use crate::client::{Client, ClientError, Event, Options};
use crate::clients::chat::resolve;
use crate::clients::room::RoomArgs;
use crate::config::{parse_duration, MAX_UDP_PAYLOAD};
use crate::core::protocol;
use crate::error::Error;

/// `udphub send` flags.
#[derive(Debug, Clone, Args)]
pub struct SendArgs {
    /// Where to send, e.g. 127.0.0.1:9999 or localhost:9999
    #[arg(long, env = "UDPHUB_SERVER", value_name = "ADDR")]
    pub server: String,

    /// The datagram's contents, sent as is (any bytes; no newline added)
    #[arg(required_unless_present_any = ["stdin", "hex"], conflicts_with_all = ["stdin", "hex"])]
    pub message: Option<OsString>,

    /// Send what stdin holds (up to end of input) as the datagram
    #[arg(long, conflicts_with = "hex")]
    pub stdin: bool,

    /// Send these bytes, written in hex (e.g. `ff00 41`; spaces ignored)
    #[arg(long, value_name = "HEX")]
    pub hex: Option<String>,

    /// The room to join before sending, if any.
    #[command(flatten)]
    pub room: RoomArgs,

    /// Prove the address first (the cookie handshake of a relay in verify
    /// mode); automatic with --room
    #[arg(long)]
    pub verify: bool,

    /// How long to wait for replies
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    pub wait: Duration,

    /// Exit with status 1 if no reply arrived within --wait
    #[arg(long)]
    pub expect_reply: bool,
}

/// What a send came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sent {
    /// This many replies arrived within `--wait`.
    Replies(usize),
    /// Nothing arrived, and this is why as far as we can tell (a relay in
    /// verify mode, a join too short for its refusal), with the fix.
    Silent(String),
    /// The kernel reported "connection refused": nothing listens there.
    NotListening(SocketAddr),
}

/// The datagram the arguments ask for.
fn payload(args: &SendArgs) -> Result<Vec<u8>, Error> {
    if args.stdin {
        let mut data = Vec::new();
        io::stdin()
            .read_to_end(&mut data)
            .map_err(|e| Error::io("read stdin", e))?;
        return Ok(data);
    }
    if let Some(hex) = &args.hex {
        return parse_hex(hex).map_err(|e| Error::Config(format!("--hex: {e}")));
    }
    Ok(args
        .message
        .as_ref()
        .map(|m| m.as_bytes().to_vec())
        .unwrap_or_default())
}

/// Hex digits (spaces and a leading `0x` ignored) to bytes.
fn parse_hex(text: &str) -> Result<Vec<u8>, String> {
    let digits: Vec<u8> = text
        .trim()
        .trim_start_matches("0x")
        .bytes()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    if digits.len() % 2 != 0 {
        return Err(format!("{text:?} has an odd number of hex digits"));
    }
    digits
        .chunks(2)
        .map(|pair| {
            std::str::from_utf8(pair)
                .ok()
                .and_then(|p| u8::from_str_radix(p, 16).ok())
                .ok_or_else(|| {
                    format!(
                        "{text:?}: {:?} is not a hex byte",
                        String::from_utf8_lossy(pair)
                    )
                })
        })
        .collect()
}

/// Sends the message; prints replies, one per line.
pub fn run(args: &SendArgs) -> Result<Sent, Error> {
    let server = resolve(&args.server)?;
    let message = payload(args)?;
    if message.len() > MAX_UDP_PAYLOAD {
        return Err(Error::Config(format!(
            "the message is {} bytes; a datagram holds at most {MAX_UDP_PAYLOAD}",
            message.len()
        )));
    }
    let proving = args.verify || args.room.room.is_some();
    let mut out = io::stdout().lock();
    let mut print = |reply: &[u8]| {
        let _ = out.write_all(reply);
        let _ = out.write_all(b"\n");
        let _ = out.flush();
    };
    let replies = if proving {
        // A member: the client library does the handshake (the relay's
        // cookie in verify mode, the room), and reads the replies.
        let wait = args.wait.max(Duration::from_secs(1));
        let options = args.room.options(None, wait)?;
        let client = args.room.connect(server, &options)?;
        client.send(&message).map_err(|e| args.room.error(e))?;
        match replies_as_member(&client, args.wait, &mut print)? {
            Some(n) => n,
            None => return Ok(Sent::NotListening(server)),
        }
    } else {
        // Anything that answers datagrams (an echo server, a seed's
        // relay): one datagram as it is, and whatever comes back.
        let local: SocketAddr = if server.is_ipv6() {
            SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0))
        } else {
            SocketAddr::from(([0, 0, 0, 0], 0))
        };
        let sock = UdpSocket::bind(local).map_err(|e| Error::io("bind", e))?;
        sock.connect(server).map_err(|e| Error::io("connect", e))?;
        sock.send(&message).map_err(|e| Error::io("send", e))?;
        match raw_replies(&sock, args.wait, &mut print)? {
            Some(n) => n,
            None => return Ok(Sent::NotListening(server)),
        }
    };
    // `--wait 0s` is fire and forget: no replies wanted, nothing to ask.
    if replies == 0 && !args.wait.is_zero() {
        if let Some(why) = why_silent(server, &message, proving) {
            return Ok(Sent::Silent(why));
        }
    }
    Ok(Sent::Replies(replies))
}

/// Prints each datagram that arrives on `sock` within `wait`; how many,
/// or `None` if the kernel said nothing listens before any came.
fn raw_replies(
    sock: &UdpSocket,
    wait: Duration,
    print: &mut impl FnMut(&[u8]),
) -> Result<Option<usize>, Error> {
    let deadline = Instant::now() + wait;
    let mut buf = vec![0u8; 65_536];
    let mut replies = 0;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(Some(replies));
        }
        sock.set_read_timeout(Some(left))
            .map_err(|e| Error::io("set a read timeout", e))?;
        match sock.recv(&mut buf) {
            Ok(n) => {
                replies += 1;
                print(&buf[..n]);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(Some(replies))
            }
            // ICMP "port unreachable": no reply will ever come.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused && replies == 0 => {
                return Ok(None)
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => return Ok(Some(replies)),
            Err(e) => return Err(Error::io("receive", e)),
        }
    }
}

/// Prints each message the relay sends `client` within `wait`; how many,
/// or `None` if the kernel said nothing listens before any came.
fn replies_as_member(
    client: &Client,
    wait: Duration,
    print: &mut impl FnMut(&[u8]),
) -> Result<Option<usize>, Error> {
    let deadline = Instant::now() + wait;
    let mut replies = 0;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match client.next_event(left) {
            Ok(Some(Event::Message(m))) => {
                replies += 1;
                print(&m);
            }
            Ok(Some(Event::Unreachable)) if replies == 0 => return Ok(None),
            Ok(Some(Event::Bye)) | Err(ClientError::RelayClosed(_)) => {
                print(crate::core::protocol::BYE);
                return Ok(Some(replies + 1));
            }
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(e) => return Err(Error::Refused(e.to_string())),
        }
    }
    Ok(Some(replies))
}

/// After silence: why, if the relay will tell. A relay in verify mode
/// answers nobody unproven except a padded question (its cookie, never
/// more bytes than it was sent), so one client library probe tells verify
/// mode apart from a relay that had nothing to say; the same probe hears
/// a closed lobby refuse it (that relay drops what non-members send
/// outside a room). A `^join^` shorter than its refusal (`^denied^token`
/// is 13 bytes) is refused in silence, by the same rule.
fn why_silent(server: SocketAddr, message: &[u8], proving: bool) -> Option<String> {
    let mut lobby_closed = false;
    if !proving {
        let options = Options {
            wait: PROBE_WAIT,
            ..Options::default()
        };
        match Client::connect_with(server, &options) {
            Ok(c) if c.verified() => {
                return Some(format!(
                    "the relay at {server} is in verify mode (--public / --verify-sources): it ignores every datagram until the sender proves its address with the cookie handshake; add --verify (or --room ROOM), or see docs/PROTOCOL.md \"Verify mode\" for a plain client"
                ));
            }
            Err(ClientError::LobbyClosed(_)) => lobby_closed = true,
            _ => {}
        }
    }
    let body = message.trim_ascii();
    if body.starts_with(protocol::JOIN) && message.len() < protocol::TIMEOUT_QUERY_LEN {
        return Some(format!(
            "a refused join is answered only when `^denied^REASON` fits in the request (the relay never sends more bytes than it got), so this {}-byte join may have been refused in silence; use --room ROOM [--token TOKEN], or pad the join with spaces to {} bytes",
            message.len(),
            protocol::TIMEOUT_QUERY_LEN
        ));
    }
    if lobby_closed {
        return Some(format!(
            "the relay at {server} has a closed lobby (serve --lobby closed): it drops what is sent outside a room; pass --room ROOM --token TOKEN (whoever runs the relay mints tokens with `udphub token`)"
        ));
    }
    None
}

/// How long to wait for the relay to answer a probe after silence.
const PROBE_WAIT: Duration = Duration::from_millis(500);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_is_bytes() {
        assert_eq!(parse_hex("ff00 41").unwrap(), vec![0xff, 0, 0x41]);
        assert_eq!(parse_hex("0x0a").unwrap(), vec![10]);
        assert!(parse_hex("abc").unwrap_err().contains("odd"));
        assert!(parse_hex("zz").unwrap_err().contains("not a hex byte"));
    }
}
