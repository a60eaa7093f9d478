//! The chat relay as a [`Service`]: the runtime half of the hub.
//!
//! The [`Hub`] decides; this carries its decisions out. For each datagram
//! it asks the hub for an [`Effect`] and executes it with the batched
//! sends ([`FanoutSender`]), counting every delivery; it runs the hub's expiry in
//! time slices; it says `bye` at shutdown.
//!
//! A fan-out sends at most `--fanout-slice` positions of its room's member
//! list at once; the rest, and whatever a full send buffer would not take,
//! is parked in the loop's [`Backlog`] (at most `--send-backlog` bytes)
//! and resumed on the next passes, between reads — at once after a slice,
//! when the socket is writable after a full buffer. A message to a room
//! with a parked fan-out queues behind it, so each member gets its room's
//! messages in order; other rooms, heartbeats and joins never wait for it.
//! Who a parked fan-out reaches: the live members of the room when the
//! fan-out reaches them (a member who left is not; one who joined meanwhile
//! may be; nobody twice: the room's cursor, [`crate::core::rooms`]). Its
//! deliveries are counted as they are sent; only when the backlog is full
//! are the ones left dropped, counted `backlog_full` (or `shutdown`, for
//! those still parked when the relay stops).
//!
//! Answers (`^room^`, `^denied^`, …) that a full send buffer would not take
//! wait the same way ([`Replies`], in a share of `--send-backlog`), and go
//! first when the socket has room: while some wait, new fan-outs park
//! behind them, so a client told `^room^R` never gets R's messages before
//! that answer.
//!
//! Data flows one way: socket → batch → admission → hub → effect → socket.

use std::time::{Duration, Instant};

use crate::cluster::Bus;
use crate::config::Config;
use crate::core::admission::Arrival;
use crate::core::backlog::{Backlog, Parked};
use crate::core::counts::{Counts, DeliveryDrop};
use crate::core::hub::{Effect, FanoutId, Hub, HubConfig};
use crate::core::reply_backlog;
use crate::core::rooms::RoomChange;
use crate::core::snapshot::Received;
use crate::core::table::Recipients;
use crate::error::Error;
use crate::net::fanout::{FanoutSender, Report, SliceEnd};
use crate::net::holders::Claim;
use crate::net::socket;
use crate::runtime::census::SharedCensus;
use crate::runtime::event_loop::{EventLoop, Exported, Io, Pending, RateLimitedLog, Service};
use crate::runtime::reload::{ReloadReceiver, ReloadSender};
use crate::runtime::replies::Replies;
use crate::runtime::shards::{self, Siblings};

/// Wheel entries the hub settles per call, between two looks at the clock.
pub const EXPIRY_CHUNK: usize = 256;
/// The longest a loop pass spends expiring clients before it goes back to
/// datagrams. Settling one costs 0.1–1 µs (cache misses in a big table), so
/// a million expiring at once take many passes, none of them long.
pub const EXPIRY_SLICE: Duration = Duration::from_millis(1);
/// How long the shutdown `bye` waits on a send buffer that takes nothing
/// before it gives up on the rest (counted `buffer_full`). Measured from
/// the last delivery the kernel took, so a big table is never cut short
/// while the buffer drains; a peer that cannot drain it costs at most this.
pub const BYE_PATIENCE: Duration = Duration::from_secs(1);
/// The longest one slice of a fan-out runs (besides `--fanout-slice`
/// deliveries), so the loop reads again within a few milliseconds whatever
/// a delivery costs.
pub const SLICE_TIME: Duration = Duration::from_millis(1);
/// How long a hand-over's export waits for the send buffer to take what
/// the loops' last hand-offs parked (within the supervisor's step timeout).
const EXPORT_PATIENCE: Duration = Duration::from_millis(500);

/// The relay's loop: an [`EventLoop`] running a [`Relay`].
pub type RelayLoop = EventLoop<Relay>;

/// How a loop paces its fan-outs (`--fanout-slice`, `--send-backlog`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FanoutLimits {
    /// Member-list positions one fan-out visits before the loop reads
    /// again.
    pub slice: usize,
    /// Bytes a loop may park (`--send-backlog`): replies waiting for the
    /// send buffer get [`reply_backlog::share_of`] it, fan-outs the rest.
    pub backlog: usize,
}

impl Default for FanoutLimits {
    fn default() -> FanoutLimits {
        FanoutLimits {
            slice: crate::config::DEFAULT_FANOUT_SLICE,
            backlog: crate::config::DEFAULT_SEND_BACKLOG,
        }
    }
}

/// The relay service: a hub, and the means to carry out what it decides.
pub struct Relay {
    /// The state machine.
    hub: Hub,
    /// Fan-outs: the syscalls, the backlog, the pacing.
    sending: Sending,
    /// Answers queued in this batch (`^room^`, `^denied^`, `^timeout^`),
    /// sent together: a join storm answers 64 joins per syscall; and those
    /// waiting for room in the send buffer.
    replies: Replies,
    /// The cluster bridge, with `--cluster`.
    cluster: Option<Bus>,
    /// New settings from a reload (SIGHUP), once asked for.
    reloads: Option<ReloadReceiver>,
    /// The other loops, with `--threads` above 1.
    siblings: Option<Siblings>,
    /// Counts shared with them (the caps are the relay's).
    census: Option<SharedCensus>,
}

impl Relay {
    /// A relay service around a new hub whose clock starts now.
    pub fn new(config: &HubConfig) -> Relay {
        Relay::starting_at(config, Instant::now())
    }

    /// A relay service around a new hub whose clock starts at `start`
    /// (earlier than now for one that takes over members:
    /// [`Hub::resume_start`]).
    pub fn starting_at(config: &HubConfig, start: Instant) -> Relay {
        Relay::around(Hub::new(config, start))
    }

    /// A relay service around `hub` (new, empty).
    fn around(hub: Hub) -> Relay {
        Relay {
            hub,
            sending: Sending::new(FanoutLimits::default()),
            replies: Replies::new(
                64,
                reply_backlog::share_of(crate::config::DEFAULT_SEND_BACKLOG),
            ),
            cluster: None,
            reloads: None,
            siblings: None,
            census: None,
        }
    }

    /// Paces fan-outs by `limits` (call before any datagram).
    pub fn set_fanout_limits(&mut self, limits: FanoutLimits) {
        self.sending = Sending::new(limits);
        self.replies = Replies::new(64, reply_backlog::share_of(limits.backlog));
    }

    /// While replies wait for the send buffer, fan-outs wait behind them
    /// (parked, as for a full buffer): a member must not get a room's
    /// messages before the `^room^` that told it it is in the room. Called
    /// after every send of replies; [`Service::resume`] resumes the
    /// fan-outs only once every reply is out.
    fn fanouts_behind_replies(&mut self) {
        self.sending.blocked |= self.replies.parked();
    }

    /// Counts clients together with the other loops (the caps are the
    /// relay's).
    pub fn share_census(&mut self, census: &SharedCensus) {
        self.hub.share_census(Box::new(census.clone()));
        self.census = Some(census.clone());
    }

    /// Budgets cookie replies together with the other loops (verify mode:
    /// the budget is the relay's).
    pub fn share_cookie_budget(&mut self, budget: &super::shards::SharedBudget) {
        self.hub.share_cookie_budget(Box::new(budget.clone()));
    }

    /// Runs as one of several loops on one port: messages for rooms with
    /// members on other loops are handed to them, and theirs fanned out
    /// here; the hub reports rooms opening and closing so the others know
    /// where to send.
    pub fn attach_siblings(&mut self, siblings: Siblings) {
        self.hub.track_room_changes();
        self.siblings = Some(siblings);
    }

    /// Makes the channel a reload sends this relay's new settings through;
    /// `waker` is its loop's.
    pub fn reloads(&mut self, waker: std::sync::Arc<mio::Waker>) -> ReloadSender {
        let (tx, rx) = crate::runtime::reload::channel(waker);
        self.reloads = Some(rx);
        tx
    }

    /// Joins the cluster through `bus`: local messages are published,
    /// the bus's are fanned out here, and the hub reports rooms opening
    /// and closing so the bridge subscribes to just those.
    pub fn attach_cluster(&mut self, bus: Bus) {
        self.hub.track_room_changes();
        self.cluster = Some(bus);
    }

    /// Registers the members a hand-over passed this loop (before it
    /// reads a datagram), and tells the other loops which rooms now have
    /// members here, so that their first messages reach them. Returns how
    /// many were registered.
    pub fn restore<'m>(
        &mut self,
        members: impl IntoIterator<Item = crate::core::snapshot::MemberRef<'m>>,
        now: Instant,
    ) -> Result<usize, String> {
        let restored = self.hub.restore(members, now)?;
        if self.siblings.is_some() || self.cluster.is_some() {
            for change in self.hub.take_room_changes() {
                if let RoomChange::Opened(name) = change {
                    if let Some(siblings) = &mut self.siblings {
                        siblings.room_opened(&name);
                    }
                    // The lobby is always subscribed.
                    if let Some(bus) = self.cluster.as_mut().filter(|_| !name.is_empty()) {
                        bus.room_opened(&name);
                    }
                }
            }
        }
        Ok(restored)
    }

    /// The cluster bridge's side of a hand-over, with `--cluster`.
    pub fn cluster_handover(&self) -> Option<crate::cluster::handover::HandoverPort> {
        self.cluster.as_ref().map(Bus::handover)
    }

    /// The cluster keys, with `--cluster`: a reload rotates them.
    pub fn cluster_keys(&self) -> Option<crate::cluster::keys::Keys> {
        self.cluster.as_ref().map(Bus::keys)
    }
}

/// Adds a fan-out's deliveries to the counts; logs its first error.
fn count(report: Report, counts: &mut Counts, send_errors: &mut RateLimitedLog) {
    if let Some(e) = report.add_to(counts) {
        send_errors.warn("sendmmsg", &e);
    }
}

/// Counts `n` deliveries a fan-out owed as dropped for `reason`.
fn drop_owed(counts: &mut Counts, reason: DeliveryDrop, n: u64) {
    counts.recipients += n;
    counts.delivery_dropped[reason.index()] += n;
}

/// What fans messages out: the syscalls, the backlog of fan-outs not yet
/// finished, and how they are paced. Apart from the hub, so the cluster's
/// and the other loops' messages can be fanned out while the hub is
/// borrowed for their recipients.
struct Sending {
    /// `sendmmsg` state.
    fanout: FanoutSender,
    /// Fan-outs parked: sliced, or stopped by a full buffer.
    backlog: Backlog,
    /// `--fanout-slice`.
    slice: usize,
    /// The kernel said its send buffer was full and the socket has not
    /// been tried since: new fan-outs park at once rather than make a
    /// syscall sure to fail. Also set while replies wait for the buffer,
    /// so that fan-outs go behind them (`Relay::fanouts_behind_replies`).
    blocked: bool,
    /// Throttles send-error logging.
    errors: RateLimitedLog,
}

impl Sending {
    fn new(limits: FanoutLimits) -> Sending {
        Sending {
            fanout: FanoutSender::default(),
            // Replies get their share first (`FanoutLimits::backlog`).
            backlog: Backlog::new(limits.backlog - reply_backlog::share_of(limits.backlog)),
            slice: limits.slice.max(1),
            blocked: false,
            errors: RateLimitedLog::default(),
        }
    }

    /// A new fan-out of `payload` to `recipients`: its first slice now,
    /// unless its room has one parked (then it queues behind, in order) or
    /// the buffer is known full; what is left is parked. Returns the
    /// position to set the room's cursor to, if it was parked part-way.
    /// `local`: this loop read the message (one fan-out sample a message:
    /// the loop that read it records it, not every loop that fans it out).
    fn start(
        &mut self,
        io: &mut Io<'_>,
        id: FanoutId,
        payload: &[u8],
        recipients: &mut Recipients<'_>,
        local: bool,
    ) -> Option<u32> {
        let received_at = local.then_some(io.received_at);
        let parked = |started| Parked {
            id,
            payload: Box::from(payload),
            received_at,
            started,
        };
        if self.blocked || self.backlog.has(id.room) {
            io.counts.fanouts_parked += 1;
            if let Err(refused) = self.backlog.push(parked(false)) {
                let owed = recipients.owed_from(recipients.next_position());
                drop_owed(io.counts, DeliveryDrop::BacklogFull, owed);
                drop(refused);
            }
            return None;
        }
        let deadline = Instant::now() + SLICE_TIME;
        let (report, end) = self
            .fanout
            .send_slice(io.fd, io.sources, payload, recipients, self.slice, deadline);
        count(report, io.counts, &mut self.errors);
        let at = match end {
            SliceEnd::Done => {
                if let Some(t) = received_at {
                    io.counts.fanout_seconds.push(t.elapsed().as_secs_f64());
                }
                return None;
            }
            SliceEnd::Full(at) => {
                self.blocked = true;
                io.counts.send_buffer_full += 1;
                at
            }
            SliceEnd::Sliced(at) => at,
        };
        io.counts.fanouts_parked += 1;
        match self.backlog.push(parked(true)) {
            Ok(()) => Some(at),
            Err(_) => {
                drop_owed(
                    io.counts,
                    DeliveryDrop::BacklogFull,
                    recipients.owed_from(at),
                );
                None
            }
        }
    }

    /// Continues the parked fan-outs, rooms in turn, for up to one slice
    /// of member-list positions in all.
    fn resume(&mut self, hub: &mut Hub, io: &mut Io<'_>) -> Pending {
        // The socket is tried now (or, with nothing parked, by the next
        // fan-out).
        self.blocked = false;
        if self.backlog.is_empty() {
            return Pending::Idle;
        }
        let now = Instant::now();
        let deadline = now + SLICE_TIME;
        let mut budget = self.slice;
        while budget > 0 && Instant::now() < deadline {
            let Some(head) = self.backlog.front() else {
                break;
            };
            head.started = true;
            let (id, received_at) = (head.id, head.received_at);
            let Some(mut recipients) = hub.resume_fanout(now, id) else {
                // The room closed since: every member left, nobody is owed.
                self.backlog.pop_front();
                continue;
            };
            let visiting = recipients.remaining();
            let (report, end) = self.fanout.send_slice(
                io.fd,
                io.sources,
                &head.payload,
                &mut recipients,
                budget,
                deadline,
            );
            count(report, io.counts, &mut self.errors);
            match end {
                SliceEnd::Done => {
                    if let Some(t) = received_at {
                        io.counts.fanout_seconds.push(t.elapsed().as_secs_f64());
                    }
                    hub.set_fanout_cursor(id.room, None);
                    self.backlog.pop_front();
                    budget = budget.saturating_sub(visiting.max(1));
                }
                SliceEnd::Full(at) => {
                    hub.set_fanout_cursor(id.room, Some(at));
                    self.blocked = true;
                    io.counts.send_buffer_full += 1;
                    return Pending::Blocked;
                }
                SliceEnd::Sliced(at) => {
                    hub.set_fanout_cursor(id.room, Some(at));
                    self.backlog.next_turn();
                    break;
                }
            }
        }
        if self.backlog.is_empty() {
            Pending::Idle
        } else {
            Pending::More
        }
    }

    /// Drops every parked fan-out (the relay is stopping), counting what
    /// each still owed as `shutdown`. Returns how many deliveries.
    fn abandon(&mut self, hub: &mut Hub, counts: &mut Counts) -> u64 {
        let now = Instant::now();
        let mut total = 0;
        while let Some(parked) = self.backlog.pop_front() {
            if let Some(recipients) = hub.resume_fanout(now, parked.id) {
                let owed = recipients.owed_from(recipients.next_position());
                drop_owed(counts, DeliveryDrop::Shutdown, owed);
                total += owed;
            }
            hub.set_fanout_cursor(parked.id.room, None);
        }
        total
    }
}

/// Binds the relay's socket(s) for `config` and prepares its loop(s): one,
/// or with `--threads N` N loops, each with its own SO_REUSEPORT socket on
/// the same address, wired to each other (see [`crate::runtime::shards`]).
///
/// All N sockets are bound here, before any datagram is read, and stay
/// open until the process ends. An address another socket holds is an
/// error naming the holder, whatever N ([`socket::bind_group`]); the
/// group's steering program picks a loop by a hash of the source alone
/// and only ever one of these N sockets, so every client stays on one
/// loop for the relay's life, and a socket another process adds to the
/// group later gets nothing. (udphub never closes one of its own while
/// running: a loop that fails stops the whole relay.)
pub fn bind(config: &Config) -> Result<Vec<RelayLoop>, Error> {
    Ok(bind_claimed(config)?.0)
}

/// [`bind`], and the relay's [`Claim`] on its address, for the
/// supervisor's periodic check that nobody else shares it.
pub fn bind_claimed(config: &Config) -> Result<(Vec<RelayLoop>, Claim), Error> {
    let group = socket::bind_group(
        config.bind,
        "relay socket",
        config.loop_recv_buffer(),
        config.send_buffer,
        config.loops(),
    )?;
    on_group(config, group)
}

/// [`bind_claimed`] on sockets bound already: the group a service manager
/// passed ([`crate::net::activation`]), one socket per loop.
pub fn on_group(config: &Config, group: socket::Group) -> Result<(Vec<RelayLoop>, Claim), Error> {
    let socket::Group { members, claim } = group;
    if let Some(first) = members.first() {
        report_buffers(first, config);
    }
    Ok((build(config, members, None, None, Vec::new())?, claim))
}

/// Says (once a process) if the kernel granted less buffer than
/// `config` asks for; a size set other than the default is a warning.
fn report_buffers(first: &socket::Bound, config: &Config) {
    socket::report_buffers(
        first,
        config.loop_recv_buffer(),
        config.send_buffer,
        config.recv_buffer != crate::config::DEFAULT_SOCKET_BUFFER
            || config.send_buffer != crate::config::DEFAULT_SOCKET_BUFFER,
    );
}

/// Takes over from another udphub process (`serve --takeover`): its
/// sockets (`fds`, one per loop, in loop order) and its members
/// (`snapshot`, already decoded and checked), with `config`'s settings.
/// Every loop's members are registered before any loop reads; an error
/// leaves nothing running. Returns the loops, the claim, and how many
/// members were taken over.
pub fn adopt(
    config: &Config,
    fds: Vec<std::os::fd::OwnedFd>,
    snapshot: &Received,
    early: Option<crate::cluster::handover::Early>,
    warm: Vec<crate::core::table::Table>,
) -> Result<(Vec<RelayLoop>, Claim, usize), Error> {
    let threads = config.loops();
    if fds.len() != snapshot.loops() {
        // Not a setting to change: the offer itself does not add up.
        return Err(Error::Refused(format!(
            "the running relay handed over {} socket(s) for {} loop state(s), one per loop expected: a broken offer, nothing taken over",
            fds.len(),
            snapshot.loops()
        )));
    }
    if fds.len() != threads {
        return Err(Error::Config(format!(
            "--threads: the relay handed over {} socket(s), one per loop, this process runs {threads} loop(s): start it with --threads {}",
            fds.len(),
            fds.len()
        )));
    }
    let socket::Group { members, claim } = socket::adopt_group(
        config.bind,
        fds,
        config.loop_recv_buffer(),
        config.send_buffer,
    )?;
    if let Some(first) = members.first() {
        report_buffers(first, config);
    }
    let now = Instant::now();
    let mut loops = build(config, members, Some((snapshot, now)), early, warm)?;
    let built = now.elapsed();
    // Each loop registers its own members, on a thread of its own with
    // `--threads` (every loop is paused in the old process meanwhile: the
    // registration is most of the pause at a million members).
    let register = |i: usize, lp: &mut RelayLoop| {
        lp.kernel_drops_counted(snapshot.kernel_drops(i));
        lp.service_mut().restore(snapshot.members_of(i), now)
    };
    let counts: Vec<Result<usize, String>> = if loops.len() == 1 {
        loops
            .iter_mut()
            .enumerate()
            .map(|(i, lp)| register(i, lp))
            .collect()
    } else {
        std::thread::scope(|scope| {
            let running: Vec<_> = loops
                .iter_mut()
                .enumerate()
                .map(|(i, lp)| scope.spawn(move || register(i, lp)))
                .collect();
            running
                .into_iter()
                .map(|t| {
                    t.join().unwrap_or_else(|_| {
                        Err("a loop failed while registering its members".into())
                    })
                })
                .collect()
        })
    };
    let mut restored = 0;
    for count in counts {
        restored +=
            count.map_err(|e| Error::Config(format!("cannot take the members over: {e}")))?;
    }
    tracing::debug!(
        "take-over: loops built in {:.1} ms, {restored} members registered in {:.1} ms",
        built.as_secs_f64() * 1e3,
        (now.elapsed() - built).as_secs_f64() * 1e3
    );
    Ok((loops, claim, restored))
}

/// Empty tables for the loops of `config`, each with room for its share
/// of `--expect-clients` and that memory written once ([`Table::prefault`]):
/// what a process taking over makes before it asks for the hand-over, so
/// that registering the members (while the old relay is paused) faults in
/// no page. None without `--expect-clients`.
///
/// [`Table::prefault`]: crate::core::table::Table::prefault
pub fn warm_tables(config: &Config) -> Vec<crate::core::table::Table> {
    if config.expect_clients == 0 {
        return Vec::new();
    }
    let hub = config.hub();
    (0..config.loops())
        .map(|_| {
            let mut table = Hub::table_for(&hub);
            table.prefault();
            table
        })
        .collect()
}

/// The loops over bound sockets: a fresh relay, or one resuming a
/// snapshot taken at the instant given (its clock and cookie key set for
/// the members it will restore).
fn build(
    config: &Config,
    members: Vec<socket::Bound>,
    resume: Option<(&Received, Instant)>,
    early: Option<crate::cluster::handover::Early>,
    mut warm: Vec<crate::core::table::Table>,
) -> Result<Vec<RelayLoop>, Error> {
    let threads = config.loops();
    let reuse = threads > 1;
    let (addr, recv_buffer, send_buffer) = match members.first() {
        Some(b) => (b.local_addr, b.recv_buffer, b.send_buffer),
        None => (config.bind, 0, 0),
    };
    tracing::info!(
        event = "start",
        addr = %addr,
        timeout_ms = config.timeout.as_millis() as u64,
        echo = !config.no_echo,
        max_datagram = config.max_datagram,
        max_clients = config.max_clients,
        threads,
        recv_buffer,
        send_buffer,
        verify_sources = config.verify_sources,
        private_rooms = config.room_secret_file.is_some(),
        "udphub relaying on {} (timeout {}, echo {}, max datagram {} B, max clients {}){}; SO_RCVBUF {} B, SO_SNDBUF {} B",
        addr,
        humantime::format_duration(config.timeout),
        !config.no_echo,
        config.max_datagram,
        config.max_clients,
        if reuse {
            format!(", {threads} loops on SO_REUSEPORT sockets, steered by source")
        } else {
            String::new()
        },
        recv_buffer,
        send_buffer,
    );
    let mut hub = config.hub();
    let handed_key = resume.and_then(|(snapshot, now)| {
        let c = snapshot.cookie()?;
        Some(crate::core::cookie::CookieKey::new(
            c.key,
            now.checked_sub(c.age).unwrap_or(now),
        ))
    });
    if config.verify_sources {
        // One key for every loop: a cookie is valid whichever loop sees it
        // (and, handed over, whichever process).
        hub.cookie_key = Some(match handed_key {
            Some(key) => key,
            None => random_cookie_key()?,
        });
        tracing::info!(
            event = "verify_mode",
            "verify mode: sources must prove their address with a cookie"
        );
    }
    if let Some(warning) = config.exposure_warning() {
        tracing::warn!(event = "exposed", bind = %config.bind, "{warning}");
    }
    if let Some(note) = config.private_rooms_note() {
        tracing::info!(
            event = "private_rooms",
            lobby_open = config.lobby == crate::config::Lobby::Open,
            "{note}"
        );
    }
    let start = match resume {
        Some((_, now)) => Hub::resume_start(&hub, now),
        None => Instant::now(),
    };
    let mut loops = Vec::with_capacity(threads);
    let limits = FanoutLimits {
        slice: config.fanout_slice,
        backlog: config.send_backlog,
    };
    for b in members {
        // A table made (and written once) before the hand-over, if any.
        let mut relay = match warm.pop() {
            Some(table) => Relay::around(Hub::with_table(&hub, start, table)),
            None => Relay::starting_at(&hub, start),
        };
        relay.set_fanout_limits(limits);
        loops.push(EventLoop::new(b, config.max_datagram, relay)?);
    }
    if threads > 1 {
        let census = SharedCensus::default();
        let budget = shards::SharedBudget::new(config.cookie_rate);
        for lp in &mut loops {
            lp.service_mut().share_census(&census);
            lp.service_mut().share_cookie_budget(&budget);
        }
        let wakers: Vec<_> = loops.iter().map(EventLoop::waker).collect();
        for (i, (lp, part)) in loops.iter_mut().zip(shards::queues(threads)).enumerate() {
            lp.service_mut().attach_siblings(part.wire(&wakers));
            lp.set_shard(i);
        }
    }
    if config.pin_threads {
        let cpus = allowed_cpus();
        for (i, lp) in loops.iter_mut().enumerate() {
            if let Some(&cpu) = cpus.get(i % cpus.len().max(1)) {
                lp.pin_to_cpu(cpu);
            }
        }
    }
    if let Some(cluster) = config.cluster() {
        // One bridge (one NATS connection) for the process; each loop
        // publishes through it and gets the bus's messages for its rooms.
        let epoch = u64::from_be_bytes(random_bytes::<8>()?);
        let wakers: Vec<_> = loops.iter().map(EventLoop::waker).collect();
        let positions = resume.map_or(&[][..], |(snapshot, _)| snapshot.streams());
        let buses = Bus::start(&cluster, &wakers, epoch, early.map(|e| (e, positions)))?;
        tracing::info!(
            event = "cluster",
            cluster = %cluster.name,
            node = %cluster.node_id,
            servers = %cluster.servers.join(","),
            "cluster {:?}: node {:?}, NATS {} (rooms are shared with every relay of the cluster{})",
            cluster.name,
            cluster.node_id,
            cluster.servers.join(","),
            if threads > 1 {
                format!("; one bridge for the {threads} loops")
            } else {
                String::new()
            }
        );
        for (lp, bus) in loops.iter_mut().zip(buses) {
            lp.service_mut().attach_cluster(bus);
        }
    }
    Ok(loops)
}

/// The CPUs this process may run on, in order (`--pin-threads` pins loop
/// `i` to the `i`-th, wrapping around).
pub fn allowed_cpus() -> Vec<usize> {
    use nix::sched::{sched_getaffinity, CpuSet};
    use nix::unistd::Pid;
    match sched_getaffinity(Pid::from_raw(0)) {
        Ok(set) => (0..CpuSet::count())
            .filter(|&c| set.is_set(c).unwrap_or(false))
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// `N` bytes from the OS's random source.
fn random_bytes<const N: usize>() -> Result<[u8; N], Error> {
    use std::io::Read;
    let mut bytes = [0u8; N];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| Error::io("read /dev/urandom", e))?;
    Ok(bytes)
}

/// A cookie key from the OS's random source (`getrandom` through
/// /dev/urandom), drawn once at start and never written anywhere.
fn random_cookie_key() -> Result<crate::core::cookie::CookieKey, Error> {
    Ok(crate::core::cookie::CookieKey::new(
        random_bytes::<32>()?,
        std::time::Instant::now(),
    ))
}

impl Service for Relay {
    /// One datagram: the hub counts it once; a fan-out's deliveries are
    /// counted here.
    fn handle(&mut self, arrival: Arrival<'_>, io: &mut Io<'_>) {
        self.hub.set_unix_time(io.unix_secs);
        match self.hub.handle(io.received_at, arrival, io.counts) {
            Effect::Nothing => {}
            Effect::Fanout(mut out) => {
                // Replies queued earlier in this batch go first, so none is
                // overtaken by a later message to the same client.
                self.replies.flush(io, &mut self.sending.errors);
                // (Not the method: the hub is borrowed for `out`.)
                self.sending.blocked |= self.replies.parked();
                let (room, payload, id) = (out.room_name, out.payload, out.id);
                let cursor = self
                    .sending
                    .start(io, id, payload, &mut out.recipients, true);
                // Rendered once, here; every other loop and node fans out
                // these bytes.
                if let Some(siblings) = &mut self.siblings {
                    siblings.hand_off(room, payload, io.counts);
                }
                if let Some(bus) = &mut self.cluster {
                    bus.publish(room, payload);
                }
                if let Some(at) = cursor {
                    self.hub.set_fanout_cursor(id.room, Some(at));
                }
            }
            Effect::Reply { to, bytes } => {
                self.replies.push(to, bytes, io, &mut self.sending.errors);
                self.fanouts_behind_replies();
            }
        }
    }

    /// Tells the other loops and the cluster which rooms opened and closed
    /// here; wakes each loop this batch handed messages to, once; sends
    /// the batch's replies.
    fn end_batch(&mut self, io: &mut Io<'_>) {
        // Rooms first, replies after: a client told `^room^R` may at once
        // get a friend on another loop to talk in R, and that loop must
        // already be able to know R has a member here.
        if self.cluster.is_some() || self.siblings.is_some() {
            for change in self.hub.take_room_changes() {
                match change {
                    // The lobby's news is for the other loops only: the
                    // bridge subscribes to the lobby always.
                    RoomChange::Opened(name) => {
                        if let Some(s) = &mut self.siblings {
                            s.room_opened(&name);
                        }
                        if let Some(bus) = self.cluster.as_mut().filter(|_| !name.is_empty()) {
                            bus.room_opened(&name);
                        }
                    }
                    RoomChange::Closed(name) => {
                        if let Some(s) = &mut self.siblings {
                            s.room_closed(&name);
                        }
                        if let Some(bus) = self.cluster.as_mut().filter(|_| !name.is_empty()) {
                            bus.room_closed(&name);
                        }
                    }
                }
            }
        }
        if let Some(siblings) = &mut self.siblings {
            siblings.wake();
        }
        // What this batch published goes to the bridge in one piece.
        if let Some(bus) = &mut self.cluster {
            bus.flush();
        }
        self.replies.flush(io, &mut self.sending.errors);
        self.fanouts_behind_replies();
    }

    /// New settings from a reload, applied between two batches; then
    /// messages from the other loops and from other nodes: each fanned out
    /// to this loop's members of its room (none if it has none here).
    fn on_wake(&mut self, io: &mut Io<'_>) {
        if let Some(config) = self.reloads.as_ref().and_then(ReloadReceiver::latest) {
            self.hub.reconfigure(&config);
        }
        let now = Instant::now();
        let (hub, sending) = (&mut self.hub, &mut self.sending);
        let mut fan_out = |room: &[u8], body: &[u8]| {
            let Some(room) = hub.find_room(room) else {
                return;
            };
            let mut out = hub.relay_from_elsewhere(now, room, body);
            let id = out.id;
            if let Some(at) = sending.start(io, id, out.payload, &mut out.recipients, false) {
                hub.set_fanout_cursor(id.room, Some(at));
            }
        };
        if let Some(siblings) = &mut self.siblings {
            siblings.drain(&mut fan_out);
        }
        if let Some(bus) = &mut self.cluster {
            bus.drain(&mut fan_out);
        }
    }

    /// Lets the hub expire clients in chunks of [`EXPIRY_CHUNK`], for at
    /// most [`EXPIRY_SLICE`]. Returns whether due entries remain.
    fn on_timer(&mut self, now: Instant, counts: &mut Counts) -> bool {
        let started = Instant::now();
        while self.hub.expire(now, EXPIRY_CHUNK, counts) {
            if started.elapsed() >= EXPIRY_SLICE {
                return true;
            }
        }
        false
    }

    fn next_timer(&self) -> Option<Instant> {
        self.hub.next_timer()
    }

    /// Sends the replies waiting for the send buffer, then, once none
    /// waits, continues the parked fan-outs for one slice.
    fn resume(&mut self, io: &mut Io<'_>) -> Pending {
        if self.replies.resume(io, &mut self.sending.errors) == Pending::Blocked {
            // The fan-outs stay behind them (`blocked` is still set).
            return Pending::Blocked;
        }
        self.sending.resume(&mut self.hub, io)
    }

    /// Sends `bye` to every live client and empties the table. A send
    /// buffer left full by the fan-out the signal interrupted is waited out
    /// (up to [`BYE_PATIENCE`] without progress): nothing is read any more,
    /// and every member is owed its one `bye`.
    fn shutdown(&mut self, io: &mut Io<'_>) {
        let abandoned = self.sending.abandon(&mut self.hub, io.counts);
        let replies = self.replies.abandon(io.counts);
        if abandoned + replies > 0 {
            tracing::info!(
                event = "backlog_dropped",
                deliveries = abandoned,
                replies,
                "dropped {abandoned} parked deliveries and {replies} parked replies to say bye at once"
            );
        }
        let now = Instant::now();
        let report = self.sending.fanout.send_patiently(
            io.fd,
            io.sources,
            self.hub.goodbye(),
            self.hub.everyone(now),
            BYE_PATIENCE,
        );
        tracing::info!(
            event = "bye",
            delivered = report.delivered,
            undelivered = report.dropped.iter().sum::<u64>(),
            "said bye to {} client{} ({} not delivered)",
            report.delivered,
            if report.delivered == 1 { "" } else { "s" },
            report.dropped.iter().sum::<u64>()
        );
        count(report, io.counts, &mut self.sending.errors);
        self.hub.clear();
    }

    /// A hand-over: fans out what the other loops handed this one before
    /// they paused (so nothing is left in the queues between loops), then
    /// exports the hub's members and the cookie key.
    fn export(&mut self, io: &mut Io<'_>) -> Option<Exported> {
        self.on_wake(io);
        // With --cluster the bridge is frozen by now: what it queued here
        // is all there is, and every message of it is fanned out before
        // the export (the new process takes the bus up after it).
        // (Bounded: a full queue is this many wake-ups' worth.)
        let most = crate::cluster::INBOUND_QUEUE / crate::cluster::DRAIN_BUDGET + 1;
        for _ in 0..most {
            if !self.cluster.as_ref().is_some_and(Bus::has_inbound) {
                break;
            }
            self.on_wake(io);
        }
        // What that fan-out parked (a full send buffer) goes out now, with
        // a little patience; what still cannot is counted as dropped, never
        // lost uncounted with this process.
        let until = Instant::now() + EXPORT_PATIENCE;
        loop {
            match self.resume(io) {
                Pending::Idle => break,
                _ if Instant::now() >= until => {
                    let deliveries = self.sending.abandon(&mut self.hub, io.counts);
                    let replies = self.replies.abandon(io.counts);
                    tracing::warn!(
                        event = "backlog_dropped",
                        deliveries,
                        replies,
                        "hand-over: dropped {deliveries} parked deliveries and {replies} parked replies the send buffer would not take"
                    );
                    break;
                }
                Pending::More => {}
                Pending::Blocked => std::thread::sleep(Duration::from_millis(1)),
            }
        }
        let now = Instant::now();
        Some(Exported {
            state: self.hub.export_encoded(now),
            cookie: self.hub.export_cookie(now),
            published: self
                .cluster
                .as_ref()
                .map(Bus::published_positions)
                .unwrap_or_default(),
        })
    }

    fn clients(&self) -> usize {
        self.hub.clients()
    }

    /// This loop's share of the `udphub_rooms` gauge. With several loops
    /// a room may have members on each: the first loop reports the
    /// relay's distinct rooms (from the shared census, an atomic read),
    /// the others none.
    fn rooms(&self) -> usize {
        match (&self.siblings, &self.census) {
            (Some(s), Some(census)) if s.index() == 0 => census.open_rooms(),
            (Some(_), Some(_)) => 0,
            _ => self.hub.rooms(),
        }
    }
}
