//! `udphub send`: one datagram, then print whatever replies arrive within
//! `--wait` (seed 004's client). Handy for scripts and health checks:
//! `udphub send --server 127.0.0.1:50007 ping --expect-reply`.

use std::io::{self, Write};
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use clap::Args;

use crate::cli::config::{parse_duration, MAX_UDP_PAYLOAD};
use crate::clients::chat::resolve;
use crate::error::Error;

/// `udphub send` flags.
#[derive(Debug, Clone, Args)]
pub struct SendArgs {
    /// Where to send, e.g. 127.0.0.1:9999
    #[arg(long, env = "UDPHUB_SERVER", value_name = "ADDR")]
    pub server: String,

    /// The datagram's contents (sent as is, no newline added)
    pub message: String,

    /// How long to wait for replies
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    pub wait: Duration,

    /// Exit with status 1 if no reply arrived within --wait
    #[arg(long)]
    pub expect_reply: bool,
}

/// Sends the message; prints replies, one per line. Returns how many came.
pub fn run(args: &SendArgs) -> Result<usize, Error> {
    let server = resolve(&args.server)?;
    if args.message.len() > MAX_UDP_PAYLOAD {
        return Err(Error::Config(format!(
            "the message is {} bytes; a datagram holds at most {MAX_UDP_PAYLOAD}",
            args.message.len()
        )));
    }
    let local: SocketAddr = if server.is_ipv6() {
        SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0))
    } else {
        SocketAddr::from(([0, 0, 0, 0], 0))
    };
    let sock = UdpSocket::bind(local).map_err(|e| Error::io("bind", e))?;
    sock.connect(server).map_err(|e| Error::io("connect", e))?;
    sock.send(args.message.as_bytes())
        .map_err(|e| Error::io("send", e))?;
    let deadline = Instant::now() + args.wait;
    let mut buf = vec![0u8; 65_536];
    let mut replies = 0;
    let mut out = io::stdout().lock();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        sock.set_read_timeout(Some(left))
            .map_err(|e| Error::io("set a read timeout", e))?;
        match sock.recv(&mut buf) {
            Ok(n) => {
                replies += 1;
                let _ = out.write_all(&buf[..n]);
                let _ = out.write_all(b"\n");
                let _ = out.flush();
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                break
            }
            // Nothing listens there (ICMP port unreachable): no reply will come.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => break,
            Err(e) => return Err(Error::io("receive", e)),
        }
    }
    Ok(replies)
}
