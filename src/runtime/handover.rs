//! Hand-over: a running relay passes its UDP sockets and its members to a
//! new process (`udphub serve --takeover PATH`, possibly a newer binary)
//! over its control socket (`--control PATH`), so that an upgrade drops
//! no client and loses no datagram.
//!
//! The conversation, over one Unix stream connection, in frames of a tag
//! byte, a little-endian u64 length and that many bytes:
//!
//! 1. new → old `H` hello: protocol version, `--threads`, `--bind`. The
//!    old relay refuses (`R`, a message naming the flag) what a hand-over
//!    cannot change: the sockets are passed on as they are.
//! 2. The old relay's loops stop reading at a batch boundary (datagrams
//!    wait in the kernel's queues), finish what they handed each other,
//!    and export their members; old → new `O` offer: the snapshot
//!    ([`crate::core::snapshot`]) with every socket attached (SCM_RIGHTS,
//!    in loop order).
//! 3. The new process decodes the snapshot in full, builds its loops and
//!    registers every member, then new → old `S` serving (or `F` and why).
//! 4. old → new `A`: the old relay lets go; it exits 0 without `bye`, and
//!    only then does the new one read. Without `S` within
//!    [`STEP_TIMEOUT`] (the new process failed, died or hangs) the old
//!    loops resume with everything they had: nobody is ever left reading
//!    nothing, and never two processes at once.
//!
//! [`in_progress`] says whether a hand-over is under way in this process
//! (from the pause to the exit or the resumption), for a readiness probe.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::core::snapshot::{self, Received};
use crate::error::Error;
use crate::net::batch_io;
use crate::runtime::event_loop::{PauseCommand, PauseHandle, PauseReport};

/// The conversation's version: a hello with another is refused, saying so.
pub const PROTOCOL: u16 = 1;
/// What a hello starts with.
const HELLO_MAGIC: &[u8; 8] = b"UDPHUBHO";
/// How long either side waits for the other's next step: a hello, the
/// loops to pause and export, the new process to build its table and say
/// it serves. Building a million members takes well under a second
/// (docs/BENCHMARKS.md, "Hand-over"); a process that takes longer is
/// taken as failed, and the old relay resumes. It also bounds how long a
/// connection that says nothing holds the supervisor (signals wait).
pub const STEP_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest hello, refusal or failure message.
const MAX_TEXT: u64 = 4096;

const HELLO: u8 = b'H';
const REFUSE: u8 = b'R';
const OFFER: u8 = b'O';
const SERVING: u8 = b'S';
const FAILED: u8 = b'F';
const ACK: u8 = b'A';
/// Bytes of a frame's tag and length.
const FRAME_HEAD: usize = 9;

/// Set from the pause until the process exits or resumes.
static HANDING_OVER: AtomicBool = AtomicBool::new(false);

/// Whether a hand-over is under way in this process: its loops are paused
/// (the old side), or it is not yet serving (the new side, until it has
/// confirmed). A readiness probe says "not ready" meanwhile.
pub fn in_progress() -> bool {
    HANDING_OVER.load(Ordering::SeqCst)
}

fn set_in_progress(on: bool) {
    HANDING_OVER.store(on, Ordering::SeqCst);
}

/// `udphub_handovers_total{result}`: its help, and every series at 0.
pub fn describe_metrics() {
    metrics::describe_counter!(
        "udphub_handovers_total",
        "Hand-overs, by result: sent (this process passed its sockets and members on and exits), received (this process took them over), refused (a setting a hand-over cannot change: nothing paused), failed (the new process failed or went silent: the old one resumed)"
    );
    for result in ["sent", "received", "refused", "failed"] {
        metrics::counter!("udphub_handovers_total", "result" => result).increment(0);
    }
}

fn count(result: &'static str) {
    metrics::counter!("udphub_handovers_total", "result" => result).increment(1);
}

/// What the new process says it will be: what must match the old one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// `--bind`.
    pub bind: SocketAddr,
    /// Loops (`--threads`, resolved).
    pub threads: usize,
}

impl Identity {
    /// The identity `config` asks for.
    pub fn of(config: &Config) -> Identity {
        Identity {
            bind: config.bind,
            threads: config.loops(),
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = HELLO_MAGIC.to_vec();
        out.extend_from_slice(&PROTOCOL.to_le_bytes());
        out.extend_from_slice(&(self.threads as u16).to_le_bytes());
        out.extend_from_slice(self.bind.to_string().as_bytes());
        out
    }

    fn decode(bytes: &[u8]) -> Result<Identity, String> {
        let head = HELLO_MAGIC.len() + 4;
        if bytes.len() < head || &bytes[..HELLO_MAGIC.len()] != HELLO_MAGIC {
            return Err("not a udphub hand-over hello".into());
        }
        let version = u16::from_le_bytes([bytes[8], bytes[9]]);
        if version != PROTOCOL {
            return Err(format!(
                "hand-over protocol {version}, this relay speaks {PROTOCOL}: take over with a binary of the same hand-over protocol (or restart)"
            ));
        }
        let threads = usize::from(u16::from_le_bytes([bytes[10], bytes[11]]));
        let bind = std::str::from_utf8(&bytes[head..])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or("a hello with no address in it")?;
        Ok(Identity { bind, threads })
    }
}

/// Writes a frame, all of it by `deadline`.
fn write_frame(
    stream: &mut UnixStream,
    tag: u8,
    payload: &[u8],
    deadline: Instant,
) -> io::Result<()> {
    let mut frame = Vec::with_capacity(FRAME_HEAD + payload.len());
    frame.push(tag);
    frame.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    frame.extend_from_slice(payload);
    write_all_by(stream, &frame, deadline)
}

/// Reads a frame of at most `max` bytes, all of it by `deadline`.
fn read_frame(stream: &mut UnixStream, max: u64, deadline: Instant) -> io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; FRAME_HEAD];
    read_exact_by(stream, &mut head, deadline)?;
    let len = u64::from_le_bytes([
        head[1], head[2], head[3], head[4], head[5], head[6], head[7], head[8],
    ]);
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a frame of {len} bytes (at most {max})"),
        ));
    }
    let mut payload = vec![0u8; len as usize];
    read_exact_by(stream, &mut payload, deadline)?;
    Ok((head[0], payload))
}

/// The time left until `deadline`, or a timeout error once it passed.
fn left(deadline: Instant) -> io::Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the peer took longer than its step allows",
        ));
    }
    Ok(left)
}

/// `read_exact`, done by `deadline`: the socket's timeout bounds each
/// read, so a peer that trickles a byte at a time would otherwise hold
/// the reader (the old relay's supervisor: signals wait, and the loops
/// stay paused) for as many timeouts as it has bytes to send.
fn read_exact_by(stream: &mut UnixStream, buf: &mut [u8], deadline: Instant) -> io::Result<()> {
    let mut got = 0;
    while got < buf.len() {
        stream.set_read_timeout(Some(left(deadline)?))?;
        match stream.read(&mut buf[got..]) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer closed the connection",
                ))
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `write_all`, done by `deadline` (a peer that reads a little at a time
/// holds the writer no longer than one that reads nothing).
fn write_all_by(stream: &mut UnixStream, buf: &[u8], deadline: Instant) -> io::Result<()> {
    let mut sent = 0;
    while sent < buf.len() {
        stream.set_write_timeout(Some(left(deadline)?))?;
        match stream.write(&buf[sent..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Checks that the process at the other end of `stream` runs as this
/// process's user. The control socket's mode 0600 is the first guard, but
/// it is set just after the bind (for that moment the socket follows the
/// umask) and an operator may loosen it or its directory; and the new
/// process connects to whatever listens at `--takeover PATH`. Another
/// user's process would otherwise get the relay's sockets, its members
/// and its cookie key, or feed a new process members and a key of its
/// choosing.
fn same_user(stream: &UnixStream) -> Result<(), String> {
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
    let peer = getsockopt(stream, PeerCredentials)
        .map_err(|e| format!("cannot tell which user the other end runs as: {e}"))?;
    let me = nix::unistd::geteuid().as_raw();
    if peer.uid() == me {
        Ok(())
    } else {
        Err(format!(
            "the process at the other end runs as uid {}, this one as uid {me}: hand over only between processes of one user (run the new process as the relay's user)",
            peer.uid()
        ))
    }
}

/// Under systemd (this process was started as a service: `INVOCATION_ID`
/// is set), checks that the process at the other end runs in this
/// service's cgroup. A new process started by hand outside it would be
/// unknown to systemd: when this one exits 0, systemd takes the service
/// for stopped, removes its runtime directory (the new control socket with
/// it), no longer reaches the relay with `systemctl stop`, and with
/// udphub.socket starts a second relay on the next datagram.
/// A child this relay started on SIGUSR2 ([`crate::runtime::upgrade`])
/// shares the cgroup. The peer's pid is noted for systemd's `MAINPID=`.
fn same_service(stream: &UnixStream) -> Result<(), String> {
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
    let peer = getsockopt(stream, PeerCredentials)
        .map_err(|e| format!("cannot tell which process is at the other end: {e}"))?;
    crate::runtime::upgrade::note_peer(peer.pid().unsigned_abs());
    if std::env::var_os("INVOCATION_ID").is_none() {
        return Ok(());
    }
    let cgroup =
        |pid: &str| std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    let (mine, theirs) = (cgroup("self"), cgroup(&peer.pid().to_string()));
    if crate::runtime::upgrade::same_cgroup(&mine, &theirs) {
        return Ok(());
    }
    Err(format!(
        "this relay runs as a systemd service and process {} is outside its cgroup: systemd would take the service for stopped once this process exits; upgrade with `systemctl kill -s SIGUSR2 --kill-whom=main udphub` instead (the relay starts its successor inside the service; see OPERATIONS.md, \"Upgrade under systemd\")",
        peer.pid()
    ))
}

fn timeouts(stream: &UnixStream, step: Duration) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(step))?;
    stream.set_write_timeout(Some(step))
}

// ---------------------------------------------------------------------------
// The old process: the control socket.

/// The control socket a running relay hands over through.
#[derive(Debug)]
pub struct Control {
    /// The listener, for the supervisor's poll.
    listener: mio::net::UnixListener,
    /// Its path, removed at a normal exit (not after a hand-over: the new
    /// process binds it again).
    path: PathBuf,
    /// What this relay runs: the configured and the bound address, loops.
    bind: SocketAddr,
    /// The address actually bound (port 0 resolved).
    local: SocketAddr,
    /// Loops.
    threads: usize,
    /// With `--cluster`, the bridge's side of a hand-over
    /// ([`crate::cluster::handover`]).
    cluster: Option<crate::cluster::handover::HandoverPort>,
    /// More connections may be waiting: [`Control::accept`] serves one
    /// at a time, and the supervisor comes back for the next.
    pending: bool,
}

/// How a hand-over attempt ended, for the supervisor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing changed (refused, or a connection that was no hand-over).
    Refused,
    /// The new process failed: the loops resumed.
    Resumed,
    /// The new process serves: the loops are exiting; so is this process.
    HandedOver,
}

/// Binds a Unix stream socket at `path`, mode 0600. A stale socket (one
/// nobody listens on) is replaced, so a relay that crashed does not block
/// its successor; a live one, or anything that is not a socket, is an
/// error that says what to do. With `replace_live`, a live socket is
/// replaced too (the process taking over rebinds the path of the one
/// that is exiting).
pub fn bind_control(path: &Path, replace_live: bool) -> Result<mio::net::UnixListener, Error> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(Error::Config(format!(
                "--control {}: the path exists and is not a socket; remove it or choose another path",
                path.display()
            )));
        }
        if !replace_live && UnixStream::connect(path).is_ok() {
            return Err(Error::Config(format!(
                "--control {}: another process is listening on it (a running udphub?): take it over with `udphub serve --takeover {}`, or choose another path",
                path.display(),
                path.display()
            )));
        }
        std::fs::remove_file(path).map_err(|e| {
            Error::Config(format!(
                "--control {}: cannot remove the stale socket: {e}",
                path.display()
            ))
        })?;
    }
    let listener = mio::net::UnixListener::bind(path)
        .map_err(|e| Error::Config(format!("--control {}: cannot bind: {e}", path.display())))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|e| {
        Error::Config(format!(
            "--control {}: cannot make it mode 0600: {e}",
            path.display()
        ))
    })?;
    Ok(listener)
}

impl Control {
    /// The control socket at `path` for a relay running `config`, bound to
    /// `local`; `replace_live` as for [`bind_control`].
    pub fn bind(
        path: &Path,
        config: &Config,
        local: SocketAddr,
        replace_live: bool,
    ) -> Result<Control, Error> {
        let listener = bind_control(path, replace_live)?;
        describe_metrics();
        tracing::info!(event = "control", path = %path.display(), "hand-over control socket at {}", path.display());
        Ok(Control {
            listener,
            path: path.to_path_buf(),
            bind: config.bind,
            local,
            threads: config.loops(),
            cluster: None,
            pending: false,
        })
    }

    /// With `--cluster`: hand-overs take the bus's messages across too
    /// ([`crate::cluster::handover`]).
    pub fn with_cluster(mut self, port: Option<crate::cluster::handover::HandoverPort>) -> Control {
        self.cluster = port;
        self
    }

    /// The listener, to register with a poll.
    pub fn listener_mut(&mut self) -> &mut mio::net::UnixListener {
        &mut self.listener
    }

    /// Removes the socket's path (a normal exit).
    pub fn remove(&self) {
        let _ = std::fs::remove_file(&self.path);
    }

    /// Why a process that is `peer` cannot take this one over, if it can't.
    fn refusal(&self, peer: &Identity) -> Option<String> {
        if peer.threads != self.threads {
            return Some(format!(
                "--threads: this relay runs {} loop(s), the new process asks for {}; the sockets are handed over as they are: start it with --threads {} (a restart changes the count)",
                self.threads, peer.threads, self.threads
            ));
        }
        if peer.bind != self.bind && peer.bind != self.local {
            return Some(format!(
                "--bind: this relay is on {}, the new process asks for {}; the bound sockets are handed over: start it with --bind {} (a restart moves the relay)",
                self.local, peer.bind, self.local
            ));
        }
        None
    }

    /// Serves the next connection waiting on the control socket, if any.
    /// One per call, so that the supervisor looks at its signals between
    /// two (each may take up to [`STEP_TIMEOUT`]): peers that keep
    /// connecting cannot hold a SIGTERM back. [`Control::pending`] says
    /// whether to call again without waiting for the listener's next
    /// readiness (edge-triggered: it comes only with a new connection).
    pub fn accept(&mut self, loops: &[PauseHandle], reports: &Receiver<PauseReport>) -> Outcome {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    self.pending = true;
                    return self.hand_over(UnixStream::from(stream), loops, reports);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.pending = false;
                    return Outcome::Refused;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // Tried again at the next wake-up, not in a busy loop.
                    self.pending = false;
                    tracing::warn!(event = "control_failed", error = %e, "control socket: accept failed: {e}");
                    return Outcome::Refused;
                }
            }
        }
    }

    /// Whether more connections may be waiting (see [`Control::accept`]).
    pub fn pending(&self) -> bool {
        self.pending
    }

    fn hand_over(
        &self,
        mut stream: UnixStream,
        loops: &[PauseHandle],
        reports: &Receiver<PauseReport>,
    ) -> Outcome {
        if let Err(e) = timeouts(&stream, STEP_TIMEOUT) {
            tracing::warn!(event = "control_failed", error = %e, "control socket: {e}");
            return Outcome::Refused;
        }
        // The whole hello within one step, however it is sliced. Read
        // even from a peer that is refused (bounded, and only parsed): a
        // refusal sent before the peer wrote its hello would meet a closed
        // connection there (EPIPE), and the peer would never read why.
        let deadline = Instant::now() + STEP_TIMEOUT;
        let checked = same_user(&stream).and_then(|()| same_service(&stream));
        let hello = match read_frame(&mut stream, MAX_TEXT, deadline) {
            Ok((HELLO, hello)) => Identity::decode(&hello),
            Ok(_) => Err("not a hand-over hello".to_string()),
            Err(e) => Err(format!("no hello within {STEP_TIMEOUT:?}: {e}")),
        };
        let peer = checked.and(hello);
        let refusal = match &peer {
            Ok(peer) => self.refusal(peer),
            Err(why) => Some(why.clone()),
        };
        if let Some(why) = refusal {
            count("refused");
            tracing::warn!(event = "handover_refused", reason = %why, "hand-over refused, still serving: {why}");
            let _ = write_frame(&mut stream, REFUSE, why.as_bytes(), deadline);
            return Outcome::Refused;
        }
        set_in_progress(true);
        let paused_at = Instant::now();
        match self.offer(&mut stream, loops, reports, paused_at) {
            Ok((members, bytes, stopped)) => {
                let pause = stopped.elapsed();
                let finishing = stopped.saturating_duration_since(paused_at);
                count("sent");
                tracing::info!(
                    event = "handed_over",
                    members,
                    snapshot_bytes = bytes,
                    pause_ms = pause.as_secs_f64() * 1e3,
                    finishing_ms = finishing.as_secs_f64() * 1e3,
                    "handed over to the new process: {members} member(s), a {bytes}-byte snapshot, reading paused {:.1} ms here (after {:.1} ms finishing the batch in hand); exiting without bye",
                    pause.as_secs_f64() * 1e3,
                    finishing.as_secs_f64() * 1e3
                );
                for l in loops {
                    l.command(PauseCommand::Exit);
                }
                Outcome::HandedOver
            }
            Err(why) => {
                for l in loops {
                    l.command(PauseCommand::Resume);
                }
                if let Some(port) = &self.cluster {
                    // What waited in the subscriptions goes out now.
                    port.thaw();
                }
                set_in_progress(false);
                count("failed");
                tracing::warn!(
                    event = "handover_failed",
                    reason = %why,
                    "hand-over failed ({why}); resumed serving after {:.1} ms, every member kept",
                    paused_at.elapsed().as_secs_f64() * 1e3
                );
                // Short: serving again, and the peer may read nothing.
                let deadline = Instant::now() + Duration::from_millis(100);
                let _ = write_frame(&mut stream, REFUSE, why.as_bytes(), deadline);
                Outcome::Resumed
            }
        }
    }

    /// Pauses the loops, sends their state and sockets, waits for the new
    /// process to serve and lets go. Returns the members and snapshot
    /// bytes sent and when the first loop stopped reading, or why the
    /// loops must resume.
    fn offer(
        &self,
        stream: &mut UnixStream,
        loops: &[PauseHandle],
        reports: &Receiver<PauseReport>,
        started: Instant,
    ) -> Result<(usize, usize, Instant), String> {
        let deadline = started + STEP_TIMEOUT;
        // Leftovers of an earlier attempt that timed out mean nothing now.
        while reports.try_recv().is_ok() {}
        // With --cluster, the bus stops first: from here on what other
        // nodes publish is the new process's to deliver (it subscribed
        // before its hello), and the loops fan out what came before.
        let mut positions = match &self.cluster {
            Some(port) => port.freeze()?,
            None => Vec::new(),
        };
        for l in loops {
            l.pause();
        }
        let mut paused = 0;
        let mut stopped = None;
        while paused < loops.len() {
            match recv_until(reports, deadline)? {
                PauseReport::Paused(_) => {
                    stopped.get_or_insert_with(Instant::now);
                    paused += 1;
                }
                PauseReport::Exported(..) => {}
            }
        }
        let stopped = stopped.unwrap_or(started);
        for l in loops {
            l.command(PauseCommand::Export);
        }
        let mut exported: Vec<Option<_>> = (0..loops.len()).map(|_| None).collect();
        let mut got = 0;
        while got < loops.len() {
            if let PauseReport::Exported(i, state) = recv_until(reports, deadline)? {
                let state = state.ok_or("a loop could not export its state")?;
                if let Some(slot) = exported.get_mut(i) {
                    if slot.replace(state).is_none() {
                        got += 1;
                    }
                }
            }
        }
        if let Some(port) = &self.cluster {
            // What the loops published is at the server before the new
            // process can publish anything.
            port.flush()?;
        }
        let mut cookie = None;
        let mut states = Vec::with_capacity(loops.len());
        let mut fds: Vec<OwnedFd> = Vec::with_capacity(loops.len());
        let mut published = Vec::new();
        for (e, fd) in exported.into_iter().flatten() {
            cookie = cookie.or(e.cookie);
            states.push(e.state);
            fds.push(fd);
            published.extend(e.published);
        }
        merge_positions(&mut positions, published);
        let exported = started.elapsed();
        let members = states.iter().map(snapshot::EncodedLoop::members).sum();
        // The loops' records go out where the loops wrote them.
        let encoded = snapshot::Encoded::with_streams(cookie.as_ref(), &positions, &states);
        let bytes = encoded.len();
        widen_send_buffer(stream, bytes);
        let mut head = vec![OFFER];
        head.extend_from_slice(&(bytes as u64).to_le_bytes());
        let borrowed: Vec<_> = fds.iter().map(AsFd::as_fd).collect();
        let sent = batch_io::send_with_fds(stream.as_fd(), &head, &borrowed)
            .map_err(|e| format!("cannot pass the sockets: {e}"))?;
        drop(borrowed);
        drop(fds);
        write_all_by(stream, &head[sent..], deadline)
            .and_then(|()| {
                encoded
                    .pieces()
                    .try_for_each(|piece| write_all_by(stream, piece, deadline))
            })
            .map_err(|e| format!("cannot send the snapshot: {e}"))?;
        drop(encoded);
        drop(states);
        tracing::info!(
            event = "handover_sent",
            "hand-over: loops paused and exported in {:.1} ms, snapshot encoded and sent in {:.1} ms; waiting for the new process",
            exported.as_secs_f64() * 1e3,
            (started.elapsed() - exported).as_secs_f64() * 1e3
        );
        match read_frame(stream, MAX_TEXT, deadline) {
            Ok((SERVING, _)) => {}
            Ok((FAILED, why)) => {
                return Err(format!(
                    "the new process failed: {}",
                    String::from_utf8_lossy(&why)
                ))
            }
            Ok((tag, _)) => return Err(format!("the new process said {:?}", tag as char)),
            Err(e) => {
                return Err(format!(
                    "the new process did not say it serves within {STEP_TIMEOUT:?}: {e}"
                ))
            }
        }
        // A stop asked for meanwhile is this relay's to obey (it resumes,
        // then shuts down as asked): the successor, told no, never reads.
        if crate::runtime::supervisor::stop_asked() {
            return Err("a stop signal arrived during the hand-over; shutting down as asked instead of handing over".into());
        }
        write_frame(stream, ACK, &[], deadline)
            .map_err(|e| format!("the new process is gone: {e}"))?;
        Ok((members, bytes, stopped))
    }
}

/// Adds a loop's own streams (`published`) to the bridge's positions, in
/// each room's entry (made if the bridge had none for it), after the
/// bridge's streams (the receiver keeps the last ones). One pass over
/// each, indexed by room: the loops are paused while this runs.
fn merge_positions(
    positions: &mut Vec<snapshot::RoomStreams>,
    published: Vec<snapshot::RoomStreams>,
) {
    let mut at: std::collections::HashMap<Box<[u8]>, usize> = positions
        .iter()
        .enumerate()
        .map(|(i, r)| (r.room.clone(), i))
        .collect();
    for p in published {
        match at.get(&p.room) {
            Some(&i) => positions[i].streams.extend(p.streams),
            None => {
                at.insert(p.room.clone(), positions.len());
                positions.push(p);
            }
        }
    }
}

/// The most send buffer asked for the snapshot: a million members' 16 MB
/// and room to spare.
const MAX_SEND_BUFFER: usize = 64 << 20;

/// Makes `stream`'s send buffer big enough for `bytes` at once (up to
/// [`MAX_SEND_BUFFER`]), so the snapshot leaves in a few large writes
/// instead of ~80 turns of a 208 KB default buffer, each waiting for the
/// new process to be scheduled and read (on a busy machine, most of the
/// time spent sending). As root the system's cap (`net.core.wmem_max`)
/// is passed over (SO_SNDBUFFORCE), otherwise the buffer is as big as that
/// cap allows. Best effort: a smaller buffer only makes the send slower.
fn widen_send_buffer(stream: &UnixStream, bytes: usize) {
    use nix::sys::socket::{setsockopt, sockopt};
    // A quarter more than the bytes: each queued buffer is charged its
    // own overhead as well. Bounded, and held only while handing over.
    let want = bytes.saturating_add(bytes / 4).min(MAX_SEND_BUFFER);
    if setsockopt(stream, sockopt::SndBufForce, &want).is_err() {
        let _ = setsockopt(stream, sockopt::SndBuf, &want);
    }
}

fn recv_until(reports: &Receiver<PauseReport>, deadline: Instant) -> Result<PauseReport, String> {
    let left = deadline.saturating_duration_since(Instant::now());
    reports
        .recv_timeout(left)
        .map_err(|_| format!("the loops did not pause and export within {STEP_TIMEOUT:?}"))
}

// ---------------------------------------------------------------------------
// The new process: `serve --takeover PATH`.

/// What the running relay offered: its sockets and its members, checked.
#[derive(Debug)]
pub struct Offer {
    /// The connection, to confirm or fail on.
    stream: UnixStream,
    /// One socket per loop, in loop order.
    pub fds: Vec<OwnedFd>,
    /// The members, checked in full.
    pub snapshot: Received,
}

/// Connects to the relay serving on the control socket `path`, asks to
/// take it over as `identity`, and returns its offer: sockets and a
/// snapshot decoded in full and checked against `max_clients`. A refusal
/// is a usage error naming the flag; anything else an I/O error. Either
/// way the old relay keeps (or resumes) serving.
pub fn request(path: &Path, identity: &Identity, max_clients: usize) -> Result<Offer, Error> {
    describe_metrics();
    let mut stream = UnixStream::connect(path).map_err(|e| {
        Error::Config(format!(
            "--takeover {}: cannot connect ({e}); is a udphub serving with --control {}?",
            path.display(),
            path.display()
        ))
    })?;
    same_user(&stream).map_err(|why| {
        Error::Config(format!(
            "--takeover {}: not taking over: {why}",
            path.display()
        ))
    })?;
    let fail = |context: &'static str| move |e: io::Error| Error::io(context, e);
    timeouts(&stream, STEP_TIMEOUT).map_err(fail("hand-over"))?;
    set_in_progress(true);
    let deadline = Instant::now() + STEP_TIMEOUT;
    write_frame(&mut stream, HELLO, &identity.encode(), deadline)
        .map_err(fail("hand-over hello"))?;
    // The sockets come with the offer's first bytes.
    let mut head = [0u8; FRAME_HEAD];
    let mut got = 0;
    let mut fds = Vec::new();
    while got < FRAME_HEAD {
        let (n, more) = batch_io::recv_with_fds(stream.as_fd(), &mut head[got..])
            .map_err(fail("hand-over: waiting for the offer"))?;
        fds.extend(more);
        if n == 0 {
            return Err(Error::Refused(
                "the running relay closed the control connection before offering anything".into(),
            ));
        }
        got += n;
    }
    let len = u64::from_le_bytes([
        head[1], head[2], head[3], head[4], head[5], head[6], head[7], head[8],
    ]);
    if head[0] == REFUSE {
        let mut text = vec![0u8; len.min(MAX_TEXT) as usize];
        stream
            .read_exact(&mut text)
            .map_err(fail("hand-over refusal"))?;
        count("refused");
        return Err(Error::Config(format!(
            "the running relay refused the hand-over and keeps serving: {}",
            String::from_utf8_lossy(&text)
        )));
    }
    if head[0] != OFFER {
        return Err(Error::Refused(format!(
            "the running relay answered {:?}, not an offer",
            head[0] as char
        )));
    }
    match read_snapshot(&mut stream, len, max_clients) {
        Ok(snapshot) => Ok(Offer {
            stream,
            fds,
            snapshot,
        }),
        Err(e) => {
            let why = e.to_string();
            Offer {
                stream,
                fds,
                snapshot: Received::default(),
            }
            .fail(&why);
            Err(e)
        }
    }
}

/// Reads the snapshot of `len` bytes the offer carries, and checks it.
fn read_snapshot(stream: &mut UnixStream, len: u64, max_clients: usize) -> Result<Received, Error> {
    let mut bytes = vec![0u8; snapshot::HEADER_LEN];
    if len < bytes.len() as u64 {
        return Err(Error::Refused(format!("a snapshot of {len} bytes")));
    }
    stream
        .read_exact(&mut bytes)
        .map_err(|e| Error::io("hand-over snapshot", e))?;
    // Too many members for this process's settings is the user's to
    // fix (exit 2); anything else is a damaged or foreign snapshot.
    let refused = |e: snapshot::SnapshotError| match e {
        snapshot::SnapshotError::TooBig(_) => Error::Config(format!("cannot take over: {e}")),
        e => Error::Refused(format!("snapshot refused: {e}")),
    };
    let head = snapshot::header(&bytes, max_clients).map_err(refused)?;
    if head.total_len as u64 != len {
        return Err(Error::Refused(format!(
            "snapshot refused: the frame says {len} bytes, the snapshot {}",
            head.total_len
        )));
    }
    // Read into reserved room, not a zero-filled buffer: 16 MB less to
    // write at a million members.
    let rest = (head.total_len - snapshot::HEADER_LEN) as u64;
    // The header's count is bounded by --max-clients only: a room that
    // cannot be had is a refusal, not an abort.
    bytes.try_reserve_exact(rest as usize).map_err(|e| {
        Error::Refused(format!(
            "snapshot refused: cannot set aside {rest} bytes for it ({e})"
        ))
    })?;
    let got = (&mut *stream)
        .take(rest)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io("hand-over snapshot", e))?;
    if got as u64 != rest {
        return Err(Error::io(
            "hand-over snapshot",
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the running relay closed the connection {got} bytes into a {rest}-byte snapshot"),
            ),
        ));
    }
    Received::check(bytes, max_clients).map_err(refused)
}

impl Offer {
    /// Tells the old relay this process cannot serve (it resumes).
    pub fn fail(mut self, why: &str) {
        count("failed");
        set_in_progress(false);
        let deadline = Instant::now() + STEP_TIMEOUT;
        let _ = write_frame(&mut self.stream, FAILED, why.as_bytes(), deadline);
    }

    /// Tells the old relay this process is ready to serve, and waits for
    /// it to let go: from then on this process reads the sockets.
    pub fn confirm(mut self) -> Result<(), Error> {
        let deadline = Instant::now() + STEP_TIMEOUT;
        write_frame(&mut self.stream, SERVING, &[], deadline)
            .map_err(|e| Error::io("hand-over", e))?;
        match read_frame(&mut self.stream, MAX_TEXT, deadline) {
            Ok((ACK, _)) => {
                count("received");
                set_in_progress(false);
                Ok(())
            }
            Ok((_, why)) => Err(Error::Refused(format!(
                "the running relay resumed instead: {}",
                String::from_utf8_lossy(&why)
            ))),
            Err(e) => Err(Error::Refused(format!(
                "the running relay did not let go ({e}); it serves on"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hello round-trips; another protocol version is refused, saying so.
    #[test]
    fn hellos() {
        let id = Identity {
            bind: "127.0.0.1:9999".parse().unwrap(),
            threads: 2,
        };
        assert_eq!(Identity::decode(&id.encode()), Ok(id.clone()));
        let mut other = id.encode();
        other[8] = 9;
        assert!(Identity::decode(&other).unwrap_err().contains("protocol 9"));
        assert!(Identity::decode(b"garbage").is_err());
        assert!(Identity::decode(&id.encode()[..12]).is_err());
    }

    /// A path that exists and is not a socket is refused, naming the flag;
    /// a stale socket is replaced; the socket is mode 0600.
    #[test]
    fn the_control_path() {
        let dir = std::env::temp_dir().join(format!("udphub-control-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("file");
        std::fs::write(&file, b"x").unwrap();
        let err = bind_control(&file, false).unwrap_err();
        assert!(
            err.to_string().contains("--control") && err.is_usage(),
            "{err}"
        );
        let sock = dir.join("sock");
        drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
        let live = bind_control(&sock, false).unwrap();
        let mode = std::fs::metadata(&sock).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let err = bind_control(&sock, false).unwrap_err();
        assert!(err.to_string().contains("--takeover"), "{err}");
        drop(live);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
