//! `udphub chat`: the people side — a terminal chat client for a relay
//! (seeds 000/002's client), or with `--lan` a serverless broadcast room
//! (seed 003, see [`crate::clients::lan`]).
//!
//! On a terminal it runs a line editor (rustyline) whose external printer
//! shows incoming messages above the line being typed, without garbling it.
//! With stdin not a terminal it is a filter: each input line is sent, each
//! received message is written to stdout as one line, so it scripts well.
//!
//! Two threads: the input (the main thread) and a receiver. For a relay
//! the receiver reads through the client library ([`crate::client`]),
//! whose reads also send the heartbeats (so a quiet user is never
//! expired), answer verify mode's cookies and rejoin the room.

use std::io::{self, BufRead, IsTerminal, Write};
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use clap::Args;
use rustyline::error::ReadlineError;
use rustyline::ExternalPrinter as _;

use crate::client::{Client, ClientError, Event};
use crate::clients::room::{RoomArgs, JOIN_WAIT};
use crate::config::{parse_duration, MAX_UDP_PAYLOAD};
use crate::core::protocol;
use crate::error::Error;

/// `udphub chat` flags.
#[derive(Debug, Clone, Args)]
pub struct ChatArgs {
    /// The relay to join, e.g. 127.0.0.1:9999 or localhost:9999 (required, unless --lan)
    #[arg(
        long,
        env = "UDPHUB_SERVER",
        value_name = "ADDR",
        required_unless_present = "lan"
    )]
    pub server: Option<String>,

    /// The room to join, if any.
    #[command(flatten)]
    pub room: RoomArgs,

    /// How often to send a heartbeat to the relay (below its --timeout)
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    pub heartbeat: Duration,

    /// Prefix your messages with `NAME: `
    #[arg(long, env = "UDPHUB_NAME", value_name = "NAME")]
    pub name: Option<String>,

    /// In pipe mode, after input ends, keep printing what arrives this long
    #[arg(long, value_name = "DURATION", default_value = "500ms", value_parser = parse_duration)]
    pub linger: Duration,

    /// Serverless LAN room over UDP broadcast (seed 003), no relay needed
    #[arg(long, conflicts_with_all = ["server", "room"])]
    pub lan: bool,

    /// The LAN room's port
    #[arg(long, value_name = "PORT", default_value_t = 7788, requires = "lan")]
    pub port: u16,

    /// The LAN broadcast address [default: the first interface's subnet broadcast, else 255.255.255.255]
    #[arg(long, value_name = "IPV4", requires = "lan")]
    pub broadcast: Option<std::net::Ipv4Addr>,
}

/// What the receiver makes of a datagram.
pub(crate) enum Incoming {
    /// A line to show (raw bytes; a terminal gets them sanitised).
    Line(Vec<u8>),
    /// The relay said `bye`: it is shutting down.
    Bye,
    /// Something the user should know about the connection, in words.
    Notice(String),
}

/// Who a chat talks to.
pub(crate) enum Peer {
    /// A relay, through the client library (which heartbeats, proves,
    /// rejoins and leaves by itself).
    Relay(Arc<Client>),
    /// A LAN room: broadcast to everyone on its port.
    Lan {
        /// Where datagrams are read from (the room's shared port).
        recv: UdpSocket,
        /// Where datagrams are sent from.
        send: UdpSocket,
        /// The broadcast address and room port.
        dest: SocketAddr,
        /// Sent first: the join announcement.
        hello: Vec<u8>,
        /// Sent last: the leave announcement.
        goodbye: Vec<u8>,
    },
}

/// One chat conversation, relay or LAN: how to send, what to show.
pub(crate) struct Session {
    /// Who we talk to.
    pub(crate) peer: Peer,
    /// `--name`.
    pub(crate) name: Option<String>,
    /// The room joined, for the prompt.
    pub(crate) room: Option<String>,
    /// Pipe mode: how long to keep printing after input ends.
    pub(crate) linger: Duration,
    /// Turns a received datagram into something to show.
    pub(crate) render: fn(&[u8], SocketAddr) -> Incoming,
}

/// Runs `udphub chat`.
pub fn run(args: &ChatArgs) -> Result<(), Error> {
    if args.lan {
        return crate::clients::lan::run(args);
    }
    let spec = args.server.as_deref().unwrap_or_default();
    let server = resolve(spec)?;
    if args.heartbeat.is_zero() {
        return Err(Error::Config("--heartbeat must be longer than 0".into()));
    }
    let client = connect(args, server)?;
    if client.verified() {
        eprintln!(
            "udphub: the relay at {server} is in verify mode (--public): proving our address with its cookie (plain clients such as nc get no answer there; see docs/PROTOCOL.md)"
        );
    }
    Session {
        peer: Peer::Relay(Arc::new(client)),
        name: args.name.clone(),
        room: args.room.room.clone(),
        linger: args.linger,
        render: |data, _from| Incoming::Line(data.to_vec()),
    }
    .run()
}

/// Connects to the relay and joins `--room` (warning when the relay
/// does not check the token: [`RoomArgs::connect`]).
fn connect(args: &ChatArgs, server: SocketAddr) -> Result<Client, Error> {
    let options = args.room.options(Some(args.heartbeat), JOIN_WAIT)?;
    args.room.connect(server, &options)
}

/// Resolves `--server` (`host:port` or an address literal) to its first
/// address, saying which part is wrong if it can't.
pub(crate) fn resolve(spec: &str) -> Result<SocketAddr, Error> {
    crate::config::parse_addr(spec, 9999).map_err(|why| Error::Config(format!("--server: {why}")))
}

impl Session {
    /// Runs the conversation until the user leaves or the relay says bye.
    pub(crate) fn run(self) -> Result<(), Error> {
        let tty = io::stdin().is_terminal() && io::stdout().is_terminal();
        if let Peer::Lan { hello, .. } = &self.peer {
            self.send_raw(hello);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let result = if tty {
            self.run_terminal(&stop)
        } else {
            self.run_pipe(&stop)
        };
        match &self.peer {
            // `quit`, proven with the cookie in verify mode.
            Peer::Relay(client) => client.close(),
            Peer::Lan { goodbye, .. } => self.send_raw(goodbye),
        }
        result
    }

    /// Sends one datagram as it is; trouble is said, not fatal.
    fn send_raw(&self, data: &[u8]) {
        match &self.peer {
            Peer::Relay(client) => {
                if let Err(e) = client.send(data) {
                    eprintln!("udphub: send to {}: {e}", client.relay_addr());
                }
            }
            Peer::Lan { send, dest, .. } => {
                if let Err(e) = send.send_to(data, dest) {
                    eprintln!("udphub: send to {dest}: {e}");
                }
            }
        }
    }

    /// Sends a typed line, with the name prefix.
    fn send_line(&self, line: &[u8]) {
        let mut msg = Vec::with_capacity(line.len() + 16);
        if let Some(name) = &self.name {
            msg.extend_from_slice(name.as_bytes());
            msg.extend_from_slice(b": ");
        }
        msg.extend_from_slice(line);
        if msg.len() > MAX_UDP_PAYLOAD {
            eprintln!(
                "udphub: line not sent: {} bytes is more than a datagram holds ({MAX_UDP_PAYLOAD})",
                msg.len()
            );
            return;
        }
        self.send_raw(&msg);
    }

    /// Starts the receiver thread, which hands each datagram to `show`.
    /// For a relay it reads through the client library, whose reads also
    /// send the heartbeats and answer the relay's cookies.
    fn spawn_receiver<F>(
        &self,
        stop: &Arc<AtomicBool>,
        show: F,
    ) -> Result<thread::JoinHandle<()>, Error>
    where
        F: FnMut(Incoming) + Send + 'static,
    {
        let stop = Arc::clone(stop);
        match &self.peer {
            Peer::Relay(client) => {
                let client = Arc::clone(client);
                Ok(thread::spawn(move || relay_receiver(&client, &stop, show)))
            }
            Peer::Lan { recv, .. } => {
                let sock = recv
                    .try_clone()
                    .map_err(|e| Error::io("clone the chat socket", e))?;
                // Wake up now and then to notice `stop`.
                sock.set_read_timeout(Some(Duration::from_millis(100)))
                    .map_err(|e| Error::io("set a read timeout", e))?;
                let render = self.render;
                Ok(thread::spawn(move || {
                    lan_receiver(&sock, render, &stop, show)
                }))
            }
        }
    }

    /// Interactive: a line editor, with incoming messages printed above it.
    fn run_terminal(&self, stop: &Arc<AtomicBool>) -> Result<(), Error> {
        let term_err = |e: ReadlineError| Error::io("terminal", io::Error::other(e.to_string()));
        let mut editor = rustyline::DefaultEditor::new().map_err(term_err)?;
        let mut printer = editor.create_external_printer().map_err(term_err)?;
        // Saved before the editor enters raw mode, to restore it if the
        // relay's `bye` ends the program while a line is being edited.
        let saved = nix::sys::termios::tcgetattr(io::stdin()).ok();
        let receiver = self.spawn_receiver(stop, move |incoming| match incoming {
            Incoming::Line(bytes) => {
                let _ = printer.print(sanitize(&bytes));
            }
            Incoming::Notice(text) => {
                let _ = printer.print(format!("*** {text}"));
            }
            Incoming::Bye => {
                if let Some(t) = &saved {
                    let _ = nix::sys::termios::tcsetattr(
                        io::stdin(),
                        nix::sys::termios::SetArg::TCSANOW,
                        t,
                    );
                }
                let mut out = io::stdout();
                let _ = write!(out, "\r\n*** the relay said bye: it is shutting down\r\n");
                let _ = out.flush();
                std::process::exit(0);
            }
        })?;
        let prompt = match (&self.name, &self.room) {
            (Some(n), Some(r)) => format!("{n}@{r}> "),
            (None, Some(r)) => format!("{r}> "),
            (Some(n), None) => format!("{n}> "),
            (None, None) => "> ".to_string(),
        };
        loop {
            match editor.readline(&prompt) {
                Ok(line) => {
                    if line.trim() == "quit" {
                        break;
                    }
                    if line.is_empty() {
                        continue;
                    }
                    let _ = editor.add_history_entry(line.as_str());
                    self.send_line(line.as_bytes());
                }
                // Ctrl-C and Ctrl-D both leave, politely.
                Err(ReadlineError::Interrupted | ReadlineError::Eof) => break,
                Err(e) => return Err(term_err(e)),
            }
        }
        stop.store(true, Ordering::SeqCst);
        let _ = receiver.join();
        Ok(())
    }

    /// Pipe mode: lines in, messages out.
    fn run_pipe(&self, stop: &Arc<AtomicBool>) -> Result<(), Error> {
        let receiver = self.spawn_receiver(stop, |incoming| match incoming {
            Incoming::Line(mut bytes) => {
                bytes.push(b'\n');
                let mut out = io::stdout().lock();
                // A closed stdout (e.g. `| head`) is not our problem to report.
                let _ = out.write_all(&bytes).and_then(|()| out.flush());
            }
            Incoming::Notice(text) => eprintln!("udphub: {text}"),
            Incoming::Bye => {
                eprintln!("udphub: the relay said bye: it is shutting down");
                let _ = io::stdout().flush();
                std::process::exit(0);
            }
        })?;
        let stdin = io::stdin();
        for line in stdin.lock().split(b'\n') {
            let mut line = line.map_err(|e| Error::io("read stdin", e))?;
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            if line.trim_ascii() == protocol::QUIT {
                break;
            }
            if line.is_empty() {
                continue;
            }
            self.send_line(&line);
        }
        // Input is done; give replies a moment to arrive before leaving.
        let until = Instant::now() + self.linger;
        while Instant::now() < until {
            thread::sleep(
                Duration::from_millis(10).min(until.saturating_duration_since(Instant::now())),
            );
        }
        stop.store(true, Ordering::SeqCst);
        let _ = receiver.join();
        Ok(())
    }
}

/// How often a receiver wakes to notice that the chat is ending.
const WAKE: Duration = Duration::from_millis(100);

/// A relay's receiver: messages and notices from the client library
/// until `stop`, or `bye`.
fn relay_receiver(client: &Client, stop: &AtomicBool, mut show: impl FnMut(Incoming)) {
    let dest = client.relay_addr();
    while !stop.load(Ordering::SeqCst) {
        match client.next_event(WAKE) {
            Ok(Some(Event::Message(m))) => show(Incoming::Line(m)),
            Ok(Some(Event::Bye)) | Err(ClientError::RelayClosed(_)) => {
                show(Incoming::Bye);
                return;
            }
            Ok(Some(Event::Unreachable)) => show(Incoming::Notice(format!(
                "nothing is listening at {dest}; your lines are not delivered. Still trying…"
            ))),
            Ok(Some(Event::Reachable)) => show(Incoming::Notice(format!(
                "the relay at {dest} answers again"
            ))),
            Ok(Some(Event::HeartbeatLowered { timeout, every })) => {
                show(Incoming::Notice(format!(
                    "the relay expires clients after {} of silence; heartbeating every {}",
                    humantime::format_duration(timeout),
                    humantime::format_duration(every)
                )))
            }
            Ok(Some(Event::Denied(reason))) => show(Incoming::Notice(format!(
                "the relay refused to take us back into our room ({reason}); see docs/CLIENTS.md"
            ))),
            Ok(_) => {}
            Err(ClientError::Closed) => return,
            Err(e) => {
                eprintln!("udphub: receive: {e}");
                thread::sleep(WAKE);
            }
        }
    }
}

/// A LAN room's receiver: every datagram on the room's port, rendered,
/// until `stop`.
fn lan_receiver(
    sock: &UdpSocket,
    render: fn(&[u8], SocketAddr) -> Incoming,
    stop: &AtomicBool,
    mut show: impl FnMut(Incoming),
) {
    let mut buf = vec![0u8; 65_536];
    while !stop.load(Ordering::SeqCst) {
        match sock.recv_from(&mut buf) {
            Ok((n, from)) => show(render(&buf[..n], from)),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => {
                eprintln!("udphub: receive: {e}");
                thread::sleep(WAKE);
            }
        }
    }
}

/// Makes received bytes safe to show on a terminal: lossy UTF-8, and
/// control characters (which could move the cursor or recolour the screen)
/// escaped, e.g. `\u{1b}`.
pub(crate) fn sanitize(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() && c != '\t' {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitize_escapes_terminal_control() {
        assert_eq!(sanitize(b"hi\x1b[2Jthere"), "hi\\u{1b}[2Jthere");
        assert_eq!(sanitize(b"tab\there"), "tab\there");
        assert_eq!(sanitize(b"\xff ok"), "\u{fffd} ok");
        assert_eq!(sanitize("héllo".as_bytes()), "héllo");
    }

    #[test]
    fn resolve_reports_bad_addresses_as_usage_errors() {
        assert_eq!(resolve("127.0.0.1:9").unwrap().port(), 9);
        let err = resolve("no-port-here").unwrap_err();
        assert!(err.is_usage());
        assert!(err.to_string().contains("--server"));
    }
}
