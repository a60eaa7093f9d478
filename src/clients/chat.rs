//! `udphub chat`: the people side — a terminal chat client for a relay
//! (seeds 000/002's client), or with `--lan` a serverless broadcast room
//! (seed 003, see [`crate::lan`]).
//!
//! On a terminal it runs a line editor (rustyline) whose external printer
//! shows incoming messages above the line being typed, without garbling it.
//! With stdin not a terminal it is a filter: each input line is sent, each
//! received message is written to stdout as one line, so it scripts well.
//!
//! Three threads: the input (the main thread), a receiver, and — for a
//! relay — a heartbeat sender, so a quiet user is never expired.

use std::io::{self, BufRead, IsTerminal, Write};
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use clap::Args;
use rustyline::error::ReadlineError;
use rustyline::ExternalPrinter as _;

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

/// What the receiver learns about the relay, shared with the heartbeat
/// thread.
#[derive(Debug)]
pub(crate) struct Link {
    /// The heartbeat interval now, in milliseconds (lowered to a third of
    /// the relay's timeout when the relay says it is shorter).
    heartbeat_ms: AtomicU64,
    /// The kernel said "connection refused": nothing listens at the relay's
    /// address. Cleared by the next datagram from it.
    unreachable: AtomicBool,
    /// Verify mode: the latest cookie, and when it came.
    cookie: std::sync::Mutex<Option<(Vec<u8>, Instant)>>,
    /// Verify mode: what follows `^cookie^C` to register again (a room's
    /// `^join^…`, or nothing for the lobby) if the relay asks anew.
    rejoin: Vec<u8>,
}

impl Link {
    /// For a LAN room, which has no relay to learn about.
    pub(crate) fn new_unused() -> Arc<Link> {
        Link::new(Duration::from_secs(1))
    }

    fn new(heartbeat: Duration) -> Arc<Link> {
        Link::with_cookie(heartbeat, None, Vec::new())
    }

    fn with_cookie(heartbeat: Duration, cookie: Option<Vec<u8>>, rejoin: Vec<u8>) -> Arc<Link> {
        Arc::new(Link {
            heartbeat_ms: AtomicU64::new(heartbeat.as_millis().max(1) as u64),
            unreachable: AtomicBool::new(false),
            cookie: std::sync::Mutex::new(cookie.map(|c| (c, Instant::now()))),
            rejoin,
        })
    }

    /// Verify mode: the next heartbeat, `^cookie^C` padded to 64 bytes: the
    /// proof of life that keeps us in our room. The relay answers it with a
    /// fresh cookie when ours is from its last epoch (so it never ages
    /// out), and with a new one when it does not know ours (it restarted,
    /// or expired us); the receiver keeps either and proves itself again.
    fn proven_heartbeat(&self) -> Option<Vec<u8>> {
        let (cookie, _) = self.cookie.lock().ok().and_then(|c| c.clone())?;
        let mut beat = Link::proven(&cookie, b"");
        beat.resize(beat.len().max(protocol::HELLO_LEN), b' ');
        Some(beat)
    }

    /// The cookie, if it is fresh enough to prove something now (cookies
    /// are good for at least two minutes).
    fn fresh_cookie(&self) -> Option<Vec<u8>> {
        let held = self.cookie.lock().ok()?;
        held.as_ref()
            .filter(|(_, at)| at.elapsed() < Duration::from_secs(100))
            .map(|(c, _)| c.clone())
    }

    /// Verify mode: whether a cookie was ever given.
    fn verified(&self) -> bool {
        self.cookie.lock().map(|c| c.is_some()).unwrap_or(false)
    }

    /// Keeps a cookie the relay sent.
    fn keep(&self, cookie: &[u8]) {
        if let Ok(mut held) = self.cookie.lock() {
            *held = Some((cookie.to_vec(), Instant::now()));
        }
    }

    /// `^cookie^C` followed by `then` (`^quit`, `^join^…`, or nothing).
    /// Already longer than any answer to it.
    fn proven(cookie: &[u8], then: &[u8]) -> Vec<u8> {
        [protocol::COOKIE, cookie, then].concat()
    }
}

/// A heartbeat that asks the relay's timeout, padded to 64 bytes so any
/// answer fits — `^timeout^MS`, or in verify mode (for a client the relay
/// no longer knows) `^cookie^C`. The heartbeat thread sends it while the
/// relay is unreachable, to hear as soon as it is back.
fn timeout_probe() -> Vec<u8> {
    let mut probe = protocol::TIMEOUT_QUERY.to_vec();
    probe.resize(protocol::HELLO_LEN, b' ');
    probe
}

/// One chat conversation, relay or LAN: how to send, what to show.
pub(crate) struct Session {
    /// Where datagrams are read from.
    pub(crate) recv: UdpSocket,
    /// Where datagrams are sent from (the same socket for a relay).
    pub(crate) send: UdpSocket,
    /// Where typed lines go.
    pub(crate) dest: SocketAddr,
    /// `--name`.
    pub(crate) name: Option<String>,
    /// The room joined, for the prompt.
    pub(crate) room: Option<String>,
    /// Heartbeat interval, for a relay.
    pub(crate) heartbeat: Option<Duration>,
    /// What is known of the relay (unused in a LAN room).
    pub(crate) link: Arc<Link>,
    /// Sent first (a heartbeat to register, or a LAN join announcement).
    pub(crate) hello: Vec<u8>,
    /// Sent last (`quit`, or a LAN leave announcement).
    pub(crate) goodbye: Vec<u8>,
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
    let local: SocketAddr = if server.is_ipv6() {
        "[::]:0"
            .parse()
            .map_err(|_| Error::Config("bad local address".into()))?
    } else {
        SocketAddr::from(([0, 0, 0, 0], 0))
    };
    let socket = UdpSocket::bind(local).map_err(|e| Error::io("bind the chat socket", e))?;
    // Connected: the kernel then drops datagrams from anyone but the relay.
    socket
        .connect(server)
        .map_err(|e| Error::io("connect to the relay", e))?;
    let send = socket
        .try_clone()
        .map_err(|e| Error::io("clone the chat socket", e))?;
    let probe = crate::clients::room::probe(&socket, PROBE_WAIT);
    if probe.cookie.is_some() {
        eprintln!(
            "udphub: the relay at {server} is in verify mode (--public): proving our address with its cookie (plain clients such as nc get no answer there; see docs/PROTOCOL.md)"
        );
    }
    // A closed lobby drops a roomless client's lines in silence: a relay
    // that did not answer the probe (or answered only with a cookie) is
    // asked whether its lobby is open.
    if args.room.room.is_none()
        && probe.timeout.is_none()
        && crate::clients::room::lobby_closed(&socket, probe.cookie.as_deref(), PROBE_WAIT)
    {
        return Err(Error::Refused(format!(
            "the relay at {server} has a closed lobby (serve --lobby closed): lines sent outside a room are dropped; pass --room ROOM --token TOKEN (whoever runs the relay mints tokens with `udphub token`)"
        )));
    }
    let link = Link::with_cookie(
        args.heartbeat,
        probe.cookie.clone(),
        args.room.rejoin_suffix()?,
    );
    if let Some(notice) = probe.timeout.and_then(|t| adapt_heartbeat(&link, t)) {
        eprintln!("udphub: {notice}");
    }
    if let Some(warning) =
        args.room
            .open_without_token(&socket, server, probe.cookie.as_deref(), PROBE_WAIT)
    {
        eprintln!("udphub: {warning}");
    }
    args.room
        .join(&socket, server, probe.cookie.as_deref(), JOIN_WAIT)?;
    // Verify mode without a room: the cookie itself registers us.
    let hello = match (&probe.cookie, &args.room.room) {
        (Some(c), None) => [protocol::COOKIE, c].concat(),
        _ => protocol::HEARTBEAT.to_vec(),
    };
    Session {
        recv: socket,
        send,
        dest: server,
        name: args.name.clone(),
        room: args.room.room.clone(),
        heartbeat: Some(args.heartbeat),
        link,
        hello,
        goodbye: protocol::QUIT.to_vec(),
        linger: args.linger,
        render: |data, _from| {
            if data == protocol::BYE {
                Incoming::Bye
            } else {
                Incoming::Line(data.to_vec())
            }
        },
    }
    .run()
}

/// How long to wait for the relay to answer the first datagram.
const PROBE_WAIT: Duration = Duration::from_millis(500);

/// Resolves `--server` (`host:port` or an address literal) to its first
/// address, saying which part is wrong if it can't.
pub(crate) fn resolve(spec: &str) -> Result<SocketAddr, Error> {
    crate::config::parse_addr(spec, 9999).map_err(|why| Error::Config(format!("--server: {why}")))
}

impl Session {
    /// Runs the conversation until the user leaves or the relay says bye.
    pub(crate) fn run(self) -> Result<(), Error> {
        let tty = io::stdin().is_terminal() && io::stdout().is_terminal();
        self.send_raw(&self.hello);
        let stop = Arc::new(AtomicBool::new(false));
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let heartbeat = self.heartbeat.map(|_| {
            let sock = self.send.try_clone();
            let dest = self.dest;
            let link = Arc::clone(&self.link);
            thread::spawn(move || {
                let Ok(sock) = sock else { return };
                let probe = timeout_probe();
                let every = || Duration::from_millis(link.heartbeat_ms.load(Ordering::Relaxed));
                let mut last = Instant::now();
                loop {
                    // A stoppable sleep (the sender side is dropped at exit),
                    // in short steps, so a shorter interval learnt from the
                    // relay applies at once, not after the old one ran out.
                    let wait = (last + every())
                        .saturating_duration_since(Instant::now())
                        .min(Duration::from_millis(50));
                    if stop_rx.recv_timeout(wait) != Err(mpsc::RecvTimeoutError::Timeout) {
                        break;
                    }
                    if last.elapsed() < every() {
                        continue;
                    }
                    last = Instant::now();
                    // Verify mode: only the cookie proves we are alive (a
                    // plain heartbeat could be anyone's). Otherwise, while
                    // nothing listens, ask a question a relay answers, so
                    // the user hears as soon as it is back.
                    let proven = link.proven_heartbeat();
                    let beat = if let Some(proven) = &proven {
                        &proven[..]
                    } else if link.unreachable.load(Ordering::Relaxed) {
                        &probe[..]
                    } else {
                        protocol::HEARTBEAT
                    };
                    let _ = sock.send_to(beat, dest);
                }
            })
        });
        let result = if tty {
            self.run_terminal(&stop)
        } else {
            self.run_pipe(&stop)
        };
        if self.heartbeat.is_some() && self.link.verified() {
            // Verify mode: a quit must carry a cookie.
            match self.link.fresh_cookie().or_else(|| self.fresh_cookie()) {
                Some(c) => self.send_raw(&Link::proven(&c, b"^quit")),
                None => eprintln!("udphub: no cookie to leave with; the relay will expire you"),
            }
        } else {
            self.send_raw(&self.goodbye);
        }
        stop.store(true, Ordering::SeqCst);
        drop(stop_tx);
        if let Some(h) = heartbeat {
            let _ = h.join();
        }
        result
    }

    /// Verify mode: asks for a fresh cookie (`^hello^`, 64 bytes) and waits
    /// briefly for it, reading the socket directly (the receiver has
    /// stopped by now).
    fn fresh_cookie(&self) -> Option<Vec<u8>> {
        let mut hello = protocol::HELLO.to_vec();
        hello.resize(protocol::HELLO_LEN, b' ');
        self.send_raw(&hello);
        let deadline = Instant::now() + Duration::from_millis(500);
        let mut buf = [0u8; 2048];
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            self.recv
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .ok()?;
            let n = self.recv.recv(&mut buf).ok()?;
            if let Some(c) = buf[..n].strip_prefix(protocol::COOKIE) {
                return Some(c.to_vec());
            }
        }
        None
    }

    fn send_raw(&self, data: &[u8]) {
        if let Err(e) = self.send.send_to(data, self.dest) {
            eprintln!("udphub: send to {}: {e}", self.dest);
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
    fn spawn_receiver<F>(
        &self,
        stop: &Arc<AtomicBool>,
        mut show: F,
    ) -> Result<thread::JoinHandle<()>, Error>
    where
        F: FnMut(Incoming) + Send + 'static,
    {
        let sock = self
            .recv
            .try_clone()
            .map_err(|e| Error::io("clone the chat socket", e))?;
        // Wake up now and then to notice `stop`.
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .map_err(|e| Error::io("set a read timeout", e))?;
        let render = self.render;
        let stop = Arc::clone(stop);
        let relay = self.heartbeat.is_some();
        let link = Arc::clone(&self.link);
        let dest = self.dest;
        let answer = self
            .send
            .try_clone()
            .map_err(|e| Error::io("clone the chat socket", e))?;
        Ok(thread::spawn(move || {
            let mut buf = vec![0u8; 65_536];
            while !stop.load(Ordering::SeqCst) {
                match sock.recv_from(&mut buf) {
                    Ok((n, from)) => {
                        let data = &buf[..n];
                        if !relay {
                            show(render(data, from));
                            continue;
                        }
                        if link.unreachable.swap(false, Ordering::Relaxed) {
                            show(Incoming::Notice(format!(
                                "the relay at {dest} answers again"
                            )));
                        }
                        if let Some(cookie) = data.strip_prefix(protocol::COOKIE) {
                            // Verify mode: a renewed cookie, or the relay
                            // does not know us (it restarted, or expired
                            // us). Either way, prove and rejoin: for a
                            // member that is a join of its own room,
                            // answered with the room and nothing more.
                            link.keep(cookie);
                            let _ = answer.send_to(&Link::proven(cookie, &link.rejoin), dest);
                            continue;
                        }
                        if data.starts_with(protocol::ROOM_REPLY) {
                            // The answer to a rejoin: nothing to show.
                            continue;
                        }
                        match protocol::parse_timeout_answer(data) {
                            Some(timeout) => {
                                if let Some(notice) = adapt_heartbeat(&link, timeout) {
                                    show(Incoming::Notice(notice));
                                }
                            }
                            None => show(render(data, from)),
                        }
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                        ) => {}
                    // ICMP "port unreachable" on a connected socket: nothing
                    // listens there (yet). Say so once, and keep trying.
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                        if relay && !link.unreachable.swap(true, Ordering::Relaxed) {
                            show(Incoming::Notice(format!(
                                "nothing is listening at {dest}; your lines are not delivered. Still trying…"
                            )));
                        }
                    }
                    Err(e) => {
                        eprintln!("udphub: receive: {e}");
                        thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        }))
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

/// If the heartbeat is longer than half the relay's `timeout` (so that
/// one lost heartbeat would get us expired), lowers it to a third of the
/// timeout; returns what to tell the user, if anything changed. (The seeds'
/// 5 s heartbeat against their 10 s timeout is left alone.)
fn adapt_heartbeat(link: &Link, timeout: Duration) -> Option<String> {
    let now = Duration::from_millis(link.heartbeat_ms.load(Ordering::Relaxed));
    if now <= timeout / 2 {
        return None;
    }
    let want = Duration::from_millis((timeout.as_millis() / 3).max(10) as u64);
    link.heartbeat_ms
        .store(want.as_millis() as u64, Ordering::Relaxed);
    Some(format!(
        "the relay expires clients after {} of silence; heartbeating every {}",
        humantime::format_duration(timeout),
        humantime::format_duration(want)
    ))
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
    fn the_heartbeat_follows_a_short_timeout_only() {
        let link = Link::new(Duration::from_secs(5));
        assert_eq!(adapt_heartbeat(&link, Duration::from_secs(10)), None);
        let said = adapt_heartbeat(&link, Duration::from_secs(2)).unwrap();
        assert!(said.ends_with("heartbeating every 666ms"), "{said}");
        assert_eq!(link.heartbeat_ms.load(Ordering::Relaxed), 666);
        assert_eq!(adapt_heartbeat(&link, Duration::from_secs(2)), None);
    }

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
