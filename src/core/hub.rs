//! The hub: the relay's state machine, with no I/O.
//!
//! It takes `(now, datagram)` and returns what must happen as an
//! [`Effect`]; the runtime carries that out with the batched syscalls and
//! counts the deliveries. The hub never holds a file descriptor and never
//! reads the clock: every instant is an argument. (quinn-proto's
//! `Connection` is the model: the state machine says what to send, the
//! runtime sends it.)
//!
//! Two ways in:
//!
//! - [`Hub::handle`]: a datagram from a client. [`Admission`] checks it
//!   first (every drop happens there); then it is a heartbeat, a quit or a
//!   message for the sender's room.
//! - [`Hub::relay_from_elsewhere`]: a message already rendered at another
//!   loop or node, fanned out to this hub's members of its room.
//!
//! And the timers: [`Hub::expire`] settles due wheel entries, within a
//! budget the runtime chooses; [`Hub::next_timer`] says when to call it.

use std::time::{Duration, Instant};

use crate::core::addr::RawAddr;
use crate::core::admission::{Admission, Admitted, Arrival, Verdict, Verify, When};
use crate::core::clock::Clock;
use crate::core::cookie::CookieKey;
use crate::core::counts::{Counts, Refusal};
use crate::core::protocol::{self, Kind, Proven, Template};
use crate::core::rooms::{self, RoomId, Rooms, LOBBY};
use crate::core::snapshot::{CookieState, EncodedLoop, LoopState, MemberRef};
use crate::core::table::{Due, NotRestored, Recipients, Restored, Table};
use crate::core::token::{self, RoomSecret, TokenError};
use crate::core::wheel::{Entry, Wheel};

/// What the hub needs to know, from the relay's settings.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// Silence after which a client expires.
    pub timeout: Duration,
    /// What recipients receive.
    pub format: Template,
    /// Whether a sender receives its own messages (the seeds' behaviour).
    pub echo: bool,
    /// Most clients in the table at once.
    pub max_clients: usize,
    /// Clients to reserve table room for at start.
    pub expect_clients: usize,
    /// Longest datagram accepted, in bytes (sizes the render buffer).
    pub max_datagram: usize,
    /// Most named rooms at once.
    pub max_rooms: usize,
    /// Most members of one named room.
    pub max_room_clients: usize,
    /// The room secret: with one, every named room needs a token.
    pub room_secret: Option<RoomSecret>,
    /// With a secret: whether clients outside any room may talk.
    pub lobby_open: bool,
    /// Verify mode's cookie key (`--verify-sources`), if on.
    pub cookie_key: Option<CookieKey>,
    /// Verify mode: cookie replies a second per /24 or /56 (`--cookie-rate`).
    pub cookie_rate: f64,
    /// `--client-rate`: datagrams per second per client, and the burst.
    pub client_rate: Option<(f64, f64)>,
    /// `--max-clients-per-ip`.
    pub max_clients_per_ip: Option<u32>,
}

/// What the runtime must do about one datagram.
#[derive(Debug)]
pub enum Effect<'a> {
    /// Nothing to send: a heartbeat, a quit, or a drop (the counts say
    /// which).
    Nothing,
    /// Send one rendered message to the live members of a room.
    Fanout(Fanout<'a>),
    /// Answer the sender: `bytes` to `to`. Never longer than the datagram
    /// that caused it, so a spoofed source gains no amplification.
    Reply {
        /// Where the answer goes (the datagram's source).
        to: RawAddr,
        /// The answer.
        bytes: &'a [u8],
    },
}

/// One message to fan out: the bytes, rendered once, and who gets them.
#[derive(Debug)]
pub struct Fanout<'a> {
    /// The name of the room it is for (empty for the lobby): what names
    /// the room to other loops and nodes, which fan it out to their own
    /// members ([`Hub::relay_from_elsewhere`], after [`Hub::find_room`]).
    /// A [`RoomId`] is this hub's own and means nothing elsewhere.
    pub room_name: &'a [u8],
    /// The bytes every recipient receives.
    pub payload: &'a [u8],
    /// The live members of the room that receive it.
    pub recipients: Recipients<'a>,
    /// The fan-out's room here and whom it leaves out, for a fan-out that
    /// has to continue later ([`Hub::resume_fanout`]).
    pub id: FanoutId,
}

/// Where a fan-out that continues over several loop passes is: its room
/// (and the room's incarnation, so a room closed and its id reused is
/// never mistaken for it) and whom it leaves out. The position in the
/// room's member list is the room's cursor, kept by [`Hub`] (see
/// [`crate::core::rooms`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FanoutId {
    /// The room.
    pub room: RoomId,
    /// Its incarnation when the message was sent.
    pub incarnation: u32,
    /// The member left out (the sender under `--no-echo`): slot and
    /// generation, so a later part of the fan-out never leaves out a new
    /// client in a reused slot.
    pub skip: Option<(u32, u32)>,
}

/// The relay's state: clients, their rooms and deadlines, and the format.
#[derive(Debug)]
pub struct Hub {
    /// Checks every datagram before anything else; owns every drop.
    admission: Admission,
    /// Live clients and their rooms.
    table: Table,
    /// Their expiry deadlines.
    wheel: Wheel,
    /// Instants → ticks.
    clock: Clock,
    /// `--format`.
    template: Template,
    /// Whether senders get their own messages.
    echo: bool,
    /// Reused buffer each message is rendered into, once for all recipients.
    rendered: Vec<u8>,
    /// Reused buffer of wheel entries that came due.
    due: Vec<Entry>,
    /// The answer to a timeout query, made once.
    timeout_answer: Vec<u8>,
    /// Reused buffer for `^room^`/`^denied^` answers.
    reply: Vec<u8>,
    /// The room secret, if rooms need tokens.
    room_secret: Option<RoomSecret>,
    /// With a secret: whether the lobby is open (`^join^` back to it allowed).
    lobby_open: bool,
    /// Wall-clock time in unix seconds, for token expiry; set by the
    /// runtime ([`Hub::set_unix_time`]), since the hub reads no clock.
    unix_now: u64,
}

impl Hub {
    /// An empty hub whose clock starts at `now`.
    pub fn new(config: &HubConfig, now: Instant) -> Hub {
        Hub::with_table(config, now, Hub::table_for(config))
    }

    /// The empty table a hub for `config` starts with (room for
    /// `--expect-clients`): what a process taking over makes, and
    /// [prefaults](Table::prefault), before it asks for the hand-over.
    pub fn table_for(config: &HubConfig) -> Table {
        let (_, timeout_ticks) = Clock::for_timeout(config.timeout, Instant::now());
        let reserve = config.expect_clients.min(config.max_clients);
        Table::with_rooms(
            timeout_ticks,
            reserve,
            Rooms::new(config.max_rooms, config.max_room_clients, reserve),
        )
    }

    /// An empty hub whose clock starts at `now`, around `table` (empty,
    /// made by [`table_for`](Self::table_for) with the same `config`).
    pub fn with_table(config: &HubConfig, now: Instant, mut table: Table) -> Hub {
        let (clock, timeout_ticks) = Clock::for_timeout(config.timeout, now);
        // One turn of the ring covers the timeout, so an entry is looked at
        // about once per timeout; capped to bound the ring's memory.
        let slots = (timeout_ticks as usize + 2).min(1 << 16);
        let lobby_open = config.lobby_open || config.room_secret.is_none();
        let mut admission = Admission::new(config.max_clients, lobby_open);
        if let Some(key) = &config.cookie_key {
            admission = admission.verify_sources(Verify::new(
                key.clone(),
                Box::new(Verify::local_budget(config.cookie_rate, now)),
            ));
        }
        if let Some((per_sec, burst)) = config.client_rate {
            let per_tick = (per_sec * clock.tick().as_secs_f64()) as f32;
            admission = admission.client_rate(per_tick, burst as f32);
            table.set_burst(burst.max(1.0) as f32);
        }
        if let Some(max) = config.max_clients_per_ip {
            admission = admission.max_clients_per_ip(max);
            table.count_per_ip();
        }
        Hub {
            admission,
            table,
            wheel: Wheel::new(slots, 0),
            clock,
            template: config.format.clone(),
            echo: config.echo,
            rendered: Vec::with_capacity(config.max_datagram + 64),
            due: Vec::new(),
            timeout_answer: protocol::timeout_answer(config.timeout),
            reply: Vec::with_capacity(64),
            room_secret: config.room_secret.clone(),
            lobby_open,
            unix_now: 0,
        }
    }

    /// Applies what can change while the relay runs (a reload): the
    /// timeout, the format, echo, the client, room and per-IP caps, the
    /// rate limits, the room secret and the lobby. Clients, rooms and
    /// deadlines stay; what `config` says of the rest (`expect_clients`,
    /// `max_datagram`, `cookie_key`) is ignored: those are fixed at start.
    ///
    /// The clock keeps its tick length, so a timeout far from the one the
    /// hub started with is kept at that resolution (1/256 of the first
    /// timeout, 1–100 ms).
    pub fn reconfigure(&mut self, config: &HubConfig) {
        let per_tick = |per_sec: f64| (per_sec * self.clock.tick().as_secs_f64()) as f32;
        let client_rate = config
            .client_rate
            .map(|(per_sec, burst)| (per_tick(per_sec), burst as f32));
        let lobby_open = config.lobby_open || config.room_secret.is_none();
        let was_limited = self.admission.limits_clients();
        self.admission.reconfigure(
            config.max_clients,
            lobby_open,
            client_rate,
            config.max_clients_per_ip,
            config.cookie_rate,
        );
        if let Some((_, burst)) = client_rate {
            self.table.set_burst(burst.max(1.0));
            if !was_limited {
                // Clients that joined unlimited start with a full bucket,
                // as a new one does.
                self.table.fill_buckets();
            }
        }
        if config.max_clients_per_ip.is_some() {
            self.table.count_per_ip();
        } else {
            self.table.stop_counting_per_ip();
        }
        self.table.set_timeout(self.clock.ticks_for(config.timeout));
        self.table
            .rooms_mut()
            .set_limits(config.max_rooms, config.max_room_clients);
        self.template = config.format.clone();
        self.echo = config.echo;
        self.timeout_answer = protocol::timeout_answer(config.timeout);
        self.room_secret = config.room_secret.clone();
        self.lobby_open = lobby_open;
    }

    /// Tells the hub the wall-clock time (unix seconds), for token expiry.
    /// The runtime calls it once per batch.
    pub fn set_unix_time(&mut self, unix_secs: u64) {
        self.unix_now = unix_secs;
    }

    /// Handles one datagram that arrived at `now`. Counts it exactly once
    /// (heartbeat, quit, message or drop) in `counts`; the deliveries of a
    /// returned [`Fanout`] are the runtime's to count.
    pub fn handle<'a>(
        &'a mut self,
        now: Instant,
        arrival: Arrival<'a>,
        counts: &mut Counts,
    ) -> Effect<'a> {
        let tick = self.clock.tick_at(now);
        let when = When {
            tick,
            nanos: self.clock.nanos_at(now),
            at: now,
        };
        let admitted = match self.admission.admit(&arrival, &mut self.table, when) {
            Verdict::Admit(admitted) => admitted,
            Verdict::Drop(reason) => {
                counts.drop(reason);
                return Effect::Nothing;
            }
            Verdict::Challenge(reason) => {
                counts.drop(reason);
                return self.send_cookie(arrival.source, arrival.data.len(), now);
            }
        };
        let verify = self.admission.cookie_key().is_some();
        let Admitted {
            source,
            kind,
            client,
            proves_liveness: proves,
            cookie_aging,
        } = admitted;
        // Verify mode: admission has checked the cookie, so a proven
        // request is simply that request.
        let kind = match kind {
            Kind::Cookie { then, .. } if verify => match then {
                Proven::Register => Kind::Heartbeat,
                Proven::Join { room, token } => Kind::Join { room, token },
                Proven::Quit => Kind::Quit,
            },
            other => other,
        };
        match kind {
            Kind::Heartbeat => {
                counts.heartbeats += 1;
                self.join_or_refresh(source, client, tick, proves, counts);
                if cookie_aging && client.is_some() {
                    // A member's proven heartbeat with last epoch's cookie:
                    // the fresh one rides on the answer (as long as the
                    // heartbeat, so no amplification), so a member renews
                    // by heartbeating, with no `^hello^` a spoofer could
                    // get rate-limited in its name.
                    return self.send_cookie(Some(source), arrival.data.len(), now);
                }
                Effect::Nothing
            }
            Kind::TimeoutQuery => {
                counts.heartbeats += 1;
                self.join_or_refresh(source, client, tick, proves, counts);
                if self.timeout_answer.len() <= arrival.data.len() {
                    Effect::Reply {
                        to: source,
                        bytes: &self.timeout_answer,
                    }
                } else {
                    Effect::Nothing
                }
            }
            Kind::Join { room, token } => {
                counts.join_requests += 1;
                self.join(
                    source,
                    client,
                    room,
                    token,
                    tick,
                    arrival.data.len(),
                    counts,
                )
            }
            // Verify mode: a member asks for a fresh cookie (to heartbeat,
            // quit or move with). Anyone can send it in the member's name,
            // so it proves nothing and extends nothing; the cookie goes to
            // the member's address, where only the member reads it.
            Kind::Hello(_) if verify => {
                counts.heartbeats += 1;
                self.send_cookie(Some(source), arrival.data.len(), now)
            }
            // Not in verify mode, these are v1 messages like any other.
            Kind::Hello(body) | Kind::Cookie { body, .. } => {
                self.message(source, client, body, tick, proves, counts)
            }
            Kind::Quit => {
                counts.quits += 1;
                if client.is_some() && self.table.remove(&source) {
                    counts.clients_left += 1;
                }
                Effect::Nothing
            }
            Kind::Message(body) => self.message(source, client, body, tick, proves, counts),
        }
    }

    /// A message: registers or refreshes the sender (in verify mode a
    /// member's message extends nothing: it carries no proof), renders the
    /// body once and fans it out to the sender's room.
    fn message<'a>(
        &'a mut self,
        source: RawAddr,
        client: Option<u32>,
        body: &'a [u8],
        tick: u64,
        proves: bool,
        counts: &mut Counts,
    ) -> Effect<'a> {
        counts.messages += 1;
        let sender = self.join_or_refresh(source, client, tick, proves, counts);
        let room = self.table.get(sender).map_or(LOBBY, |c| c.room);
        let payload: &[u8] = if self.template.is_raw() {
            body
        } else {
            self.template.render(body, &source, &mut self.rendered);
            &self.rendered
        };
        let skip = (!self.echo).then_some(sender);
        let id = self.fanout_id(
            room,
            skip.and_then(|k| self.table.get(k).map(|c| (k, c.generation))),
        );
        Effect::Fanout(Fanout {
            room_name: self.table.rooms().name(room),
            payload,
            recipients: self.table.recipients(room, tick, skip),
            id,
        })
    }

    /// Verify mode: `^cookie^C` for `to`, if it is no longer than the
    /// datagram (`asked` bytes) that asked.
    fn send_cookie(&mut self, to: Option<RawAddr>, asked: usize, now: Instant) -> Effect<'_> {
        let (Some(to), Some(key)) = (to, self.admission.cookie_key()) else {
            return Effect::Nothing;
        };
        let cookie = key.make(&to, now);
        self.reply.clear();
        self.reply.extend_from_slice(protocol::COOKIE);
        self.reply.extend_from_slice(&cookie);
        if self.reply.len() <= asked {
            Effect::Reply {
                to,
                bytes: &self.reply,
            }
        } else {
            Effect::Nothing
        }
    }

    /// Fans out a message that arrived from elsewhere (another loop, another
    /// node), already rendered at its origin, to this hub's live members of
    /// `room`. Nothing here is its sender, so nobody is left out.
    pub fn relay_from_elsewhere<'a>(
        &'a self,
        now: Instant,
        room: RoomId,
        payload: &'a [u8],
    ) -> Fanout<'a> {
        let tick = self.clock.tick_at(now);
        Fanout {
            room_name: self.table.rooms().name(room),
            payload,
            recipients: self.table.recipients(room, tick, None),
            id: self.fanout_id(room, None),
        }
    }

    /// Names a fan-out of `room` leaving out `skip`, to continue later.
    pub fn fanout_id(&self, room: RoomId, skip: Option<(u32, u32)>) -> FanoutId {
        FanoutId {
            room,
            incarnation: self.table.rooms().incarnation(room),
            skip,
        }
    }

    /// The recipients a parked fan-out has left at `now`: the live members
    /// of its room from the room's cursor on (from the start if it has
    /// none yet), or `None` if the room has closed since (nobody is owed
    /// anything then: every member left).
    pub fn resume_fanout(&self, now: Instant, id: FanoutId) -> Option<Recipients<'_>> {
        let rooms = self.table.rooms();
        if rooms.incarnation(id.room) != id.incarnation {
            return None;
        }
        if id.room != rooms::LOBBY && rooms.members(id.room).is_empty() {
            return None;
        }
        let skip = id.skip.and_then(|(key, generation)| {
            self.table
                .get(key)
                .is_some_and(|c| c.generation == generation)
                .then_some(key)
        });
        let from = rooms.cursor(id.room).unwrap_or(0);
        let tick = self.clock.tick_at(now);
        Some(self.table.recipients_from(id.room, from, tick, skip))
    }

    /// Starts or moves (`Some(position)`) the cursor of the fan-out in
    /// progress in `room`, or ends it (`None`).
    pub fn set_fanout_cursor(&mut self, room: RoomId, at: Option<u32>) {
        self.table.rooms_mut().set_cursor(room, at);
    }

    /// The room called `name` here (empty: the lobby), if it has members.
    pub fn find_room(&self, name: &[u8]) -> Option<RoomId> {
        self.table.rooms().find(name)
    }

    /// Budgets cookie replies together with the relay's other loops
    /// (`--threads`), so that the relay's budget is one, whichever loop a
    /// source lands on. Call before any datagram; nothing without verify
    /// mode.
    pub fn share_cookie_budget(&mut self, budget: Box<dyn crate::core::limits::CookieBudget>) {
        if let Some(verify) = self.admission.verify_mut() {
            verify.share_budget(budget);
        }
    }

    /// Counts clients and room members together with the relay's other
    /// loops (`--threads`), so that `--max-clients`,
    /// `--max-clients-per-ip`, `--max-rooms` and `--max-room-clients` cap
    /// the relay, not each loop. Call before any datagram; without it the
    /// hub keeps a [`LocalCensus`](crate::core::census::LocalCensus) of its
    /// own.
    pub fn share_census(&mut self, census: Box<dyn crate::core::census::Census>) {
        self.table.share_census(census);
    }

    /// Starts recording named rooms opened and closed (a cluster node
    /// subscribes to a room's subject while the room has members here).
    pub fn track_room_changes(&mut self) {
        self.table.track_room_changes();
    }

    /// Rooms opened and closed since the last call, in order.
    pub fn take_room_changes(&mut self) -> Vec<rooms::RoomChange> {
        self.table.take_room_changes()
    }

    /// A `^join^`: checks the name, the token and the caps, and only then
    /// registers the sender (if new) and moves it. A refused sender stays
    /// where it was. Answers `^room^ROOM` or `^denied^REASON`, each only if
    /// no longer than the request (`asked` bytes), and each from what the
    /// move actually did: a cap another loop filled since the check is a
    /// `^denied^full`, never a `^room^` for a room the sender is not in.
    /// Joining the room one is already in is always `^room^ROOM`, full or
    /// not, its token expired or not (an honest retry after a lost answer
    /// must not be told otherwise; tokens are checked on joining).
    #[allow(clippy::too_many_arguments)]
    fn join(
        &mut self,
        source: RawAddr,
        client: Option<u32>,
        name: &[u8],
        token: Option<&[u8]>,
        tick: u64,
        asked: usize,
        counts: &mut Counts,
    ) -> Effect<'_> {
        let already_there = client
            .and_then(|key| self.table.get(key))
            .is_some_and(|c| self.table.rooms().name(c.room) == name);
        let mut refusal = if already_there {
            // Where it is already: nothing to check (tokens are checked on
            // joining, not while one stays; the room's cap counts it).
            None
        } else if !name.is_empty() && !rooms::valid_name(name) {
            Some(Refusal::Name)
        } else if let Err(why) = self.check_token(name, token, counts) {
            counts.token_refused[why.index()] += 1;
            tracing::debug!("{source}: join refused: token {}", why.label());
            Some(Refusal::Token)
        } else {
            None
        };
        // Admission let this through, so it proves liveness: a `^join^`
        // outside verify mode, or one with the cookie in it. A member is
        // refreshed even when the move is refused (a proven join with a
        // token that has since expired still shows the member is there;
        // tokens are checked on joining, not while one stays).
        if let Some(key) = client {
            self.table.refresh(key, tick, source.local());
        }
        if refusal.is_none() {
            let moved = match client {
                Some(key) => {
                    if already_there {
                        Ok(())
                    } else {
                        self.table.move_to(key, name).map(|_| ())
                    }
                }
                None => match self.table.insert_into(source, tick, name) {
                    Ok(joined) => {
                        self.wheel
                            .schedule(joined.key, joined.generation, joined.due);
                        counts.clients_joined += 1;
                        tracing::debug!("{source} joined");
                        Ok(())
                    }
                    Err(full) => Err(full),
                },
            };
            match moved {
                Ok(()) => counts.joins_accepted += 1,
                Err(_) => refusal = Some(Refusal::Full),
            }
        }
        self.reply.clear();
        match refusal {
            Some(reason) => {
                counts.joins_refused[reason.index()] += 1;
                self.reply.extend_from_slice(protocol::DENIED_REPLY);
                self.reply.extend_from_slice(reason.label().as_bytes());
            }
            None => {
                self.reply.extend_from_slice(protocol::ROOM_REPLY);
                self.reply.extend_from_slice(name);
            }
        }
        if self.reply.len() <= asked {
            Effect::Reply {
                to: source,
                bytes: &self.reply,
            }
        } else {
            Effect::Nothing
        }
    }

    /// Whether `token` lets its holder into the room called `name`.
    fn check_token(
        &self,
        name: &[u8],
        token: Option<&[u8]>,
        counts: &mut Counts,
    ) -> Result<(), TokenError> {
        let Some(secret) = &self.room_secret else {
            // No secret: every room is open, and tokens are not looked at.
            // Counted, because whoever sent one believes the room private.
            if token.is_some() {
                counts.tokens_ignored += 1;
            }
            return Ok(());
        };
        if name.is_empty() {
            // The lobby takes no token: it is open or closed.
            return if self.lobby_open {
                Ok(())
            } else {
                Err(TokenError::LobbyClosed)
            };
        }
        // `^join^ROOM^` (an empty token file) carries none either.
        let token = token.filter(|t| !t.is_empty()).ok_or(TokenError::Missing)?;
        token::verify(secret, token, name, self.unix_now)
    }

    /// Named rooms now (for the `udphub_rooms` gauge).
    pub fn rooms(&self) -> usize {
        self.table.rooms().len()
    }

    /// Refreshes a known client (if the datagram `proves` it alive) or
    /// registers a new one (admission has already checked there is room);
    /// returns its slot.
    fn join_or_refresh(
        &mut self,
        source: RawAddr,
        client: Option<u32>,
        tick: u64,
        proves: bool,
        counts: &mut Counts,
    ) -> u32 {
        match client {
            Some(key) => {
                if proves {
                    // It may reach the relay on another of its addresses
                    // now: what it is sent leaves from that one.
                    self.table.refresh(key, tick, source.local());
                }
                key
            }
            None => {
                let joined = self.table.insert(source, tick);
                self.wheel
                    .schedule(joined.key, joined.generation, joined.due);
                counts.clients_joined += 1;
                tracing::debug!("{source} joined");
                joined.key
            }
        }
    }

    /// Settles up to `budget` due wheel entries at `now`: expires the
    /// silent, reschedules those heard from since. Returns whether due
    /// entries remain (call again; the runtime decides when).
    pub fn expire(&mut self, now: Instant, budget: usize, counts: &mut Counts) -> bool {
        let tick = self.clock.tick_at(now);
        self.due.clear();
        let more = self.wheel.advance(tick, budget, &mut self.due);
        for entry in self.due.drain(..) {
            match self.table.settle(entry, tick) {
                Due::Stale => {}
                Due::Expired(addr) => {
                    counts.clients_expired += 1;
                    tracing::debug!("{addr} expired");
                }
                Due::Reschedule(at) => self.wheel.schedule(entry.key, entry.generation, at),
            }
        }
        more
    }

    /// When [`expire`](Self::expire) next has work, if ever.
    pub fn next_timer(&self) -> Option<Instant> {
        self.wheel
            .next_wakeup()
            .map(|tick| self.clock.instant_of(tick))
    }

    /// Every client live at `now`, in every room: who gets `bye`.
    pub fn everyone(&self, now: Instant) -> impl Iterator<Item = &RawAddr> + '_ {
        self.table.everyone(self.clock.tick_at(now))
    }

    /// What every live client receives at shutdown.
    pub fn goodbye(&self) -> &'static [u8] {
        protocol::BYE
    }

    /// Forgets every client (after the goodbye).
    pub fn clear(&mut self) -> usize {
        self.table.clear()
    }

    /// Clients in the table now.
    pub fn clients(&self) -> usize {
        self.table.len()
    }

    /// The members live at `now`, for a hand-over: address, room, how long
    /// since each last proved itself alive, its rate-limit tokens.
    pub fn export(&self, now: Instant) -> LoopState {
        LoopState {
            members: self.live_members(now).map(MemberRef::to_owned).collect(),
            kernel_drops: 0,
        }
    }

    /// [`export`](Self::export), encoded as a snapshot carries it (what a
    /// hand-over sends: no [`Member`](crate::core::snapshot::Member) made
    /// on the way).
    pub fn export_encoded(&self, now: Instant) -> EncodedLoop {
        let mut out = EncodedLoop::with_capacity(self.table.len());
        for m in self.live_members(now) {
            out.push(m);
        }
        out
    }

    /// The members live at `now`, as a hand-over passes them on.
    fn live_members(&self, now: Instant) -> impl Iterator<Item = MemberRef<'_>> + '_ {
        let tick = self.clock.tick_at(now);
        let unit = self.clock.tick();
        // Unlimited here: a full bucket wherever it goes (the receiver
        // caps it at its burst), as a reload that turns limits on gives.
        let limited = self.admission.limits_clients();
        self.table
            .live_with_rooms(tick)
            .map(move |(c, silent, room)| MemberRef {
                addr: c.addr.to_socket_addr(),
                room,
                silent: unit.saturating_mul(u32::try_from(silent).unwrap_or(u32::MAX)),
                tokens: if limited { c.tokens } else { f32::MAX },
            })
    }

    /// Verify mode's cookie key as a hand-over passes it on, if on.
    pub fn export_cookie(&self, now: Instant) -> Option<CookieState> {
        self.admission.cookie_key().map(|k| {
            let (key, age) = k.export(now);
            CookieState { key, age }
        })
    }

    /// The instant a hub that will [`restore`](Self::restore) members
    /// handed over at `now` should start its clock at: one timeout (and a
    /// tick) back, so that every live member's last-seen tick is a tick of
    /// this clock. `now` itself if the monotonic clock is younger.
    pub fn resume_start(config: &HubConfig, now: Instant) -> Instant {
        let back = config.timeout.saturating_add(Duration::from_millis(200));
        now.checked_sub(back).unwrap_or(now)
    }

    /// Registers the members another process handed over (a fresh hub
    /// made with [`resume_start`](Self::resume_start), before it reads a
    /// datagram): each in its room, seen as long ago as it was there, with
    /// its tokens. Members silent past this hub's timeout are left out.
    /// Returns how many were registered, or why the state does not fit
    /// (then this hub must be dropped, never used).
    pub fn restore<'m>(
        &mut self,
        members: impl IntoIterator<Item = MemberRef<'m>>,
        now: Instant,
    ) -> Result<usize, String> {
        if !self.table.is_empty() {
            return Err("restore into a hub that already has clients".into());
        }
        let tick = self.clock.tick_at(now);
        // u64 nanoseconds: a u128 division per member is measurable at a
        // million (a tick is 1–100 ms; a member's silence is < 2^32 ms).
        let tick_ns = (self.clock.tick().as_nanos() as u64).max(1);
        let members = members.into_iter().map(|m| {
            let silent_ns = m
                .silent
                .as_secs()
                .saturating_mul(1_000_000_000)
                .saturating_add(u64::from(m.silent.subsec_nanos()));
            let last_seen = tick.saturating_sub(silent_ns / tick_ns);
            Restored {
                addr: RawAddr::from_socket_addr(m.addr),
                last_seen,
                room: m.room,
                tokens: m.tokens,
            }
        });
        let wheel = &mut self.wheel;
        let restored = self
            .table
            .restore(members, tick, |j| {
                wheel.schedule(j.key, j.generation, j.due)
            })
            .map_err(|e| match e {
                NotRestored::Twice(Some(addr)) => format!("{addr} is in the snapshot twice"),
                NotRestored::Twice(None) => "a member is in the snapshot twice".into(),
                NotRestored::Full(room) => format!(
                    "room {:?} does not fit this relay's --max-rooms / --max-room-clients",
                    String::from_utf8_lossy(&room)
                ),
            })?;
        Ok(restored)
    }
}

#[cfg(test)]
mod tests {
    //! The hub without a socket: datagrams in, effects and counts out.

    use super::*;
    use crate::core::admission::DropReason;
    use crate::core::census::{Census, LocalCensus};
    use proptest::prelude::*;
    use std::net::SocketAddr;

    fn config() -> HubConfig {
        HubConfig {
            timeout: Duration::from_secs(10),
            format: Template::default(),
            echo: true,
            max_clients: 100,
            expect_clients: 0,
            max_datagram: 1472,
            max_rooms: 1000,
            max_room_clients: 1000,
            room_secret: None,
            lobby_open: true,
            cookie_key: None,
            cookie_rate: crate::core::admission::COOKIE_PREFIX_RATE,
            client_rate: None,
            max_clients_per_ip: None,
        }
    }

    fn addr(port: u16) -> RawAddr {
        SocketAddr::from(([127, 0, 0, 1], port)).into()
    }

    fn from(port: u16, data: &[u8]) -> Arrival<'_> {
        Arrival {
            data,
            source: Some(addr(port)),
            truncated: false,
        }
    }

    /// What an effect asks for, owned: (payload, sorted recipient ports).
    fn fanout(effect: Effect<'_>) -> Option<(Vec<u8>, Vec<u16>)> {
        match effect {
            Effect::Nothing => None,
            Effect::Reply { to, bytes } => Some((bytes.to_vec(), vec![to.port()])),
            Effect::Fanout(f) => {
                let mut ports: Vec<u16> = f.recipients.map(|a| a.port()).collect();
                ports.sort();
                Some((f.payload.to_vec(), ports))
            }
        }
    }

    struct Fixture {
        hub: Hub,
        t0: Instant,
        counts: Counts,
    }

    impl Fixture {
        fn new(config: HubConfig) -> Fixture {
            let t0 = Instant::now();
            Fixture {
                hub: Hub::new(&config, t0),
                t0,
                counts: Counts::default(),
            }
        }

        fn at(&mut self, ms: u64, arrival: Arrival<'_>) -> Option<(Vec<u8>, Vec<u16>)> {
            let now = self.t0 + Duration::from_millis(ms);
            fanout(self.hub.handle(now, arrival, &mut self.counts))
        }
    }

    /// A hub's members, exported and restored into a fresh hub (a hand-over),
    /// keep their rooms and their deadlines: the new hub relays to them at
    /// once, and expires each when the old one would have.
    #[test]
    fn exported_members_are_restored_with_their_rooms_and_deadlines() {
        let mut f = Fixture::new(config());
        f.at(0, from(1, b"^join^red"));
        f.at(0, from(2, b"^join^red"));
        f.at(4_000, from(3, b"^hb^"));
        let handed = f.t0 + Duration::from_millis(5_000);
        let state = f.hub.export(handed);
        assert_eq!(state.members.len(), 3);
        assert_eq!(f.hub.export_cookie(handed), None);

        let start = Hub::resume_start(&config(), handed);
        let mut hub = Hub::new(&config(), start);
        assert_eq!(hub.restore(state.iter(), handed), Ok(3));
        assert_eq!(
            hub.restore(state.iter(), handed),
            Err("restore into a hub that already has clients".into())
        );
        let mut counts = Counts::default();
        let (_, to) = fanout(hub.handle(handed, from(1, b"hi"), &mut counts)).unwrap();
        assert_eq!(to, vec![1, 2], "room kept, no re-registration");
        assert_eq!(counts.clients_joined, 0);
        // Port 2 was last seen at 0 ms: it expires at 10 s, port 1 spoke at
        // 5 s and port 3 at 4 s.
        hub.expire(
            f.t0 + Duration::from_millis(10_500),
            usize::MAX,
            &mut counts,
        );
        assert_eq!((hub.clients(), counts.clients_expired), (2, 1));
        hub.expire(
            f.t0 + Duration::from_millis(14_500),
            usize::MAX,
            &mut counts,
        );
        assert_eq!((hub.clients(), counts.clients_expired), (1, 2));
    }

    /// A member's rate-limit bucket passes over: one that spent its burst
    /// is still limited in the new hub, not handed a fresh one.
    #[test]
    fn rate_buckets_pass_over() {
        let mut limited = config();
        limited.client_rate = Some((1.0, 2.0));
        let mut f = Fixture::new(limited.clone());
        for _ in 0..5 {
            f.at(0, from(1, b"m"));
        }
        let dropped = |c: &Counts| c.dropped[DropReason::RateLimited.index()];
        assert!(dropped(&f.counts) >= 1);
        let state = f.hub.export(f.t0);
        let mut hub = Hub::new(&limited, Hub::resume_start(&limited, f.t0));
        hub.restore(state.iter(), f.t0).unwrap();
        let mut counts = Counts::default();
        hub.handle(f.t0, from(1, b"m"), &mut counts);
        assert_eq!(dropped(&counts), 1, "still limited");
    }

    /// A state that does not fit the new settings is refused as a whole.
    #[test]
    fn a_state_that_does_not_fit_is_refused() {
        let mut f = Fixture::new(config());
        f.at(0, from(1, b"^join^red"));
        f.at(0, from(2, b"^join^blue"));
        let mut state = f.hub.export(f.t0);
        let mut small = config();
        small.max_rooms = 1;
        let mut hub = Hub::new(&small, Hub::resume_start(&small, f.t0));
        assert!(hub
            .restore(state.iter(), f.t0)
            .unwrap_err()
            .contains("--max-rooms"));
        state.members.push(state.members[0].clone());
        let mut hub = Hub::new(&config(), Hub::resume_start(&config(), f.t0));
        assert!(hub
            .restore(state.iter(), f.t0)
            .unwrap_err()
            .contains("twice"));
    }

    #[test]
    fn a_message_fans_out_to_everyone_in_seed_format() {
        let mut f = Fixture::new(config());
        assert_eq!(f.at(0, from(1, b"^hb^")), None);
        assert_eq!(f.at(0, from(2, b"")), None);
        let (payload, to) = f.at(1, from(3, b"123abc\n")).unwrap();
        assert_eq!(payload, b"123abc. from 127.0.0.1:3");
        assert_eq!(to, vec![1, 2, 3]);
        assert_eq!(
            (
                f.counts.heartbeats,
                f.counts.messages,
                f.counts.clients_joined
            ),
            (2, 1, 3)
        );
    }

    #[test]
    fn a_timeout_query_registers_and_is_answered_only_if_the_answer_fits() {
        let mut f = Fixture::new(HubConfig {
            timeout: Duration::from_millis(2500),
            ..config()
        });
        let padded = [&b"^timeout^"[..], &[b' '; 23]].concat();
        let (answer, to) = f.at(0, from(1, &padded)).unwrap();
        assert_eq!((answer.as_slice(), to), (&b"^timeout^2500"[..], vec![1]));
        // Unpadded, the answer would be longer than the question: silence.
        assert_eq!(f.at(0, from(2, b"^timeout^")), None);
        assert_eq!((f.counts.heartbeats, f.counts.clients_joined), (2, 2));
    }

    #[test]
    fn a_reload_changes_the_rules_and_keeps_everyone() {
        let mut f = Fixture::new(config());
        for port in 1..=3 {
            f.at(0, from(port, b"^hb^"));
        }
        f.at(0, from(1, b"^join^red"));
        f.at(0, from(2, b"^join^red"));
        f.hub.reconfigure(&HubConfig {
            timeout: Duration::from_secs(2),
            format: Template::parse("<{body}>").unwrap(),
            echo: false,
            max_clients: 3,
            max_room_clients: 2,
            client_rate: Some((1.0, 1.0)),
            max_clients_per_ip: Some(4),
            ..config()
        });
        assert_eq!(f.hub.clients(), 3, "nobody is dropped by a reload");
        // The new format and no echo; red kept both members.
        let (payload, to) = f.at(1_000, from(1, b"hi")).unwrap();
        assert_eq!((payload.as_slice(), to), (&b"<hi>"[..], vec![2]));
        // The caps bind new arrivals only: a fourth client and a third
        // member of red are refused; the per-IP count includes the three.
        assert_eq!(f.at(1_000, from(4, b"^hb^")), None);
        assert_eq!(f.counts.dropped[DropReason::TableFull as usize], 1);
        // The client rate: one a second, burst 1.
        assert!(f.at(1_100, from(2, b"one")).is_some());
        assert_eq!(f.at(1_200, from(2, b"two")), None);
        // The shorter timeout: client 3 (silent since 0) is not sent to
        // after 2 s, though the wheel has yet to reach its old deadline.
        let (_, to) = f.at(2_500, from(1, b"^join^")).unwrap();
        assert_eq!(to, vec![1]);
        let (_, to) = f.at(2_600, from(2, b"^join^")).unwrap();
        assert_eq!(to, vec![2]);
        let (_, to) = f.at(3_700, from(1, b"lobby")).unwrap();
        assert_eq!(to, vec![2], "3 is silent for longer than the new timeout");
        let padded = [&b"^timeout^"[..], &[b' '; 23]].concat();
        let (answer, _) = f.at(3_700, from(2, &padded)).unwrap();
        assert_eq!(answer, b"^timeout^2000");
    }

    #[test]
    fn rooms_isolate_and_the_lobby_stays_v1() {
        let mut f = Fixture::new(config());
        assert_eq!(
            f.at(0, from(1, b"^join^red")).unwrap(),
            (b"^room^red".to_vec(), vec![1])
        );
        f.at(0, from(2, b"^join^red\n"));
        f.at(0, from(3, b"^join^blue"));
        f.at(0, from(4, b"^hb^")); // a v1 client: the lobby
        let (_, to) = f.at(1, from(1, b"hi red")).unwrap();
        assert_eq!(to, vec![1, 2]);
        let (_, to) = f.at(1, from(3, b"hi blue")).unwrap();
        assert_eq!(to, vec![3]);
        let (_, to) = f.at(1, from(4, b"hi lobby")).unwrap();
        assert_eq!(to, vec![4]);
        assert_eq!(f.hub.rooms(), 2);
        // Back to the lobby: blue is empty and freed.
        assert_eq!(
            f.at(2, from(3, b"^join^")).unwrap(),
            (b"^room^".to_vec(), vec![3])
        );
        assert_eq!(f.hub.rooms(), 1);
        let (_, to) = f.at(3, from(4, b"lobby again")).unwrap();
        assert_eq!(to, vec![3, 4]);
        // A quit frees red once both are gone.
        f.at(4, from(1, b"quit"));
        f.at(4, from(2, b"quit"));
        assert_eq!(f.hub.rooms(), 0);
        assert_eq!((f.counts.join_requests, f.counts.joins_accepted), (4, 4));
    }

    #[test]
    fn refusals_are_counted_and_answered_only_when_the_answer_fits() {
        let mut f = Fixture::new(HubConfig {
            max_rooms: 1,
            max_room_clients: 1,
            ..config()
        });
        f.at(0, from(1, b"^join^one"));
        // Full room, then no room left for a second one (padded, so the
        // answer fits).
        let (reply, _) = f.at(0, from(2, b"^join^one      ")).unwrap();
        assert_eq!(reply, b"^denied^full");
        let (reply, _) = f.at(0, from(2, b"^join^two      ")).unwrap();
        assert_eq!(reply, b"^denied^full");
        // A bad name; unpadded, the answer would be longer: silence.
        assert_eq!(f.at(0, from(2, b"^join^a b")), None);
        let (reply, _) = f.at(0, from(2, b"^join^a/b       ")).unwrap();
        assert_eq!(reply, b"^denied^name");
        use crate::core::counts::Refusal;
        assert_eq!(f.counts.joins_refused[Refusal::Full.index()], 2);
        assert_eq!(f.counts.joins_refused[Refusal::Name.index()], 2);
        // Refused newcomers were not registered.
        assert_eq!(f.hub.clients(), 1);
    }

    #[test]
    fn rejoining_ones_own_full_room_is_answered_with_the_room() {
        let mut f = Fixture::new(HubConfig {
            max_room_clients: 1,
            ..config()
        });
        let (reply, _) = f.at(0, from(1, b"^join^one   ")).unwrap();
        assert_eq!(reply, b"^room^one");
        // The answer was lost; the client asks again. The room is full,
        // but of the client itself.
        let (reply, _) = f.at(1, from(1, b"^join^one   ")).unwrap();
        assert_eq!(reply, b"^room^one");
        let (reply, _) = f.at(2, from(2, b"^join^one      ")).unwrap();
        assert_eq!(reply, b"^denied^full");
        use crate::core::counts::Refusal;
        assert_eq!(f.counts.joins_refused[Refusal::Full.index()], 1);
        assert_eq!(f.counts.joins_accepted, 2);
    }

    #[test]
    fn a_join_is_answered_from_what_the_move_did() {
        // Another loop fills the room between any check and the move (here:
        // before the join; the census is what the loops share, and this one
        // counts that loop's member): the answer is the refusal, and the
        // client stays where it was.
        let mut elsewhere = LocalCensus::default();
        elsewhere.member_added(b"one");
        let mut f = Fixture::new(HubConfig {
            max_room_clients: 1,
            ..config()
        });
        f.hub.share_census(Box::new(elsewhere));
        f.at(0, from(1, b"^hb^"));
        let (reply, _) = f.at(1, from(1, b"^join^one      ")).unwrap();
        assert_eq!(reply, b"^denied^full");
        let (reply, _) = f.at(1, from(2, b"^join^one      ")).unwrap();
        assert_eq!(reply, b"^denied^full", "a newcomer too");
        assert_eq!(f.hub.clients(), 1, "the refused newcomer left no trace");
        let (_, to) = f.at(2, from(1, b"still in the lobby")).unwrap();
        assert_eq!(to, vec![1]);
    }

    /// A hub in verify mode with `config`, its cookie key and its start.
    fn verifying(config: HubConfig) -> (Fixture, CookieKey, Instant) {
        let t0 = Instant::now();
        let key = CookieKey::new([4; 32], t0);
        let mut f = Fixture::new(HubConfig {
            cookie_key: Some(key.clone()),
            ..config
        });
        f.t0 = t0;
        (f, key, t0)
    }

    /// The hub in verify mode, and a client at `port` registered with its
    /// cookie at `ms`; returns the cookie.
    fn verified(f: &mut Fixture, key: &CookieKey, port: u16, ms: u64) -> Vec<u8> {
        let now = f.t0 + Duration::from_millis(ms);
        let cookie = [&b"^cookie^"[..], &key.make(&addr(port), now)].concat();
        assert_eq!(f.at(ms, from(port, &cookie)), None);
        cookie
    }

    #[test]
    fn in_verify_mode_only_the_cookie_keeps_a_member_alive() {
        let (mut f, key, t0) = verifying(HubConfig {
            timeout: Duration::from_millis(1_000),
            ..config()
        });
        let silent = verified(&mut f, &key, 1, 0);
        let talker = verified(&mut f, &key, 2, 0);
        let hello = [&b"^hello^"[..], &[b' '; 57]].concat();
        // An off-path spoofer forges everything but the cookie from the
        // silent member's address, every 100 ms for 3 s: heartbeats,
        // keepalives, timeout questions, hellos and messages.
        let padded_question = [&b"^timeout^"[..], &[b' '; 55]].concat();
        let forged: [&[u8]; 5] = [b"^hb^", b"", &padded_question, &hello, b"forged"];
        let mut reached_silent_after_timeout = 0;
        for step in 1..=30u64 {
            let ms = step * 100;
            let _ = f.at(ms, from(1, forged[(step % 5) as usize]));
            // The talker proves itself as a client does, and speaks.
            if step % 3 == 0 {
                let _ = f.at(ms, from(2, &talker));
            }
            f.hub
                .expire(t0 + Duration::from_millis(ms), 1_000, &mut f.counts);
            if let Some((_, to)) = f.at(ms, from(2, b"news")) {
                if ms > 1_050 && to.contains(&1) {
                    reached_silent_after_timeout += 1;
                }
            }
        }
        assert_eq!(
            reached_silent_after_timeout, 0,
            "nothing reaches the silent member"
        );
        assert_eq!(f.counts.clients_expired, 1, "the silent member expired");
        assert_eq!(f.hub.clients(), 1, "the talker, proving itself, stayed");
        // Before it expired, the forged heartbeats, keepalives and timeout
        // questions were unproven; after, everything from its address is
        // a stranger's (unverified, answered at most with a cookie).
        assert!(f.counts.dropped[DropReason::Unproven as usize] >= 6);
        assert!(f.counts.dropped[DropReason::Unverified as usize] >= 10);
        // Its own cookie, from its own address, brings it back.
        assert_eq!(f.at(3_100, from(1, &silent)), None);
        assert_eq!(f.hub.clients(), 2);
    }

    #[test]
    fn in_verify_mode_a_proven_heartbeat_keeps_a_member_in_its_room() {
        let (mut f, key, t0) = verifying(HubConfig {
            timeout: Duration::from_millis(1_000),
            ..config()
        });
        let c1 = verified(&mut f, &key, 1, 0);
        let join = [&c1[..], b"^join^red"].concat();
        let (reply, _) = f.at(0, from(1, &join)).unwrap();
        assert_eq!(reply, b"^room^red");
        let c2 = verified(&mut f, &key, 2, 0);
        let join2 = [&c2[..], b"^join^red"].concat();
        f.at(0, from(2, &join2));
        for step in 1..=20u64 {
            let ms = step * 200;
            f.at(ms, from(1, &c1));
            f.at(ms, from(2, &c2));
            f.hub
                .expire(t0 + Duration::from_millis(ms), 1_000, &mut f.counts);
        }
        let (_, to) = f.at(4_000, from(2, b"still here?")).unwrap();
        assert_eq!(to, vec![1, 2], "both alive, both in red");
        assert_eq!(f.counts.clients_expired, 0);
        // A stale cookie (another key's) from a member: a fresh cookie comes
        // back if the datagram is long enough, and nothing is extended.
        let other = CookieKey::new([5; 32], t0);
        let stale = [&b"^cookie^"[..], &other.make(&addr(1), t0), &[b' '; 40][..]].concat();
        let (reply, to) = f.at(4_000, from(1, &stale)).unwrap();
        assert!(reply.starts_with(b"^cookie^") && to == vec![1]);
        assert_eq!(f.counts.dropped[DropReason::BadCookie as usize], 1);
    }

    /// `udphub chat` in a room heartbeats with `^cookie^C^join^ROOM…` (a
    /// proof that also brings it back into its room if the relay forgot
    /// it). A spoofer spending the member's rate budget with messages in
    /// its name must not get those heartbeats refused, or the member
    /// expires: re-joining one's own room with the cookie is a heartbeat.
    #[test]
    fn in_verify_mode_a_spoofer_cannot_rate_limit_a_proven_rejoin_of_ones_own_room() {
        let (mut f, key, t0) = verifying(HubConfig {
            timeout: Duration::from_millis(1_000),
            client_rate: Some((10.0, 20.0)),
            ..config()
        });
        let c1 = verified(&mut f, &key, 1, 0);
        let beat = [&c1[..], b"^join^red"].concat();
        assert_eq!(f.at(0, from(1, &beat)).unwrap().0, b"^room^red");
        for step in 1..=30u64 {
            let ms = step * 100;
            // The spoofer: 50 messages per 100 ms in the member's name.
            for _ in 0..50 {
                f.at(ms, from(1, b"forged"));
            }
            if step % 3 == 0 {
                f.at(ms, from(1, &beat));
            }
            f.hub
                .expire(t0 + Duration::from_millis(ms), 1_000, &mut f.counts);
        }
        assert_eq!(
            f.counts.clients_expired, 0,
            "the member heartbeating with its cookie stays"
        );
        assert_eq!(f.hub.clients(), 1);
        // A move to another room is still rate-limited.
        let moving = [&c1[..], b"^join^blue"].concat();
        for _ in 0..50 {
            f.at(3_000, from(1, b"forged"));
        }
        assert_eq!(f.at(3_000, from(1, &moving)), None);
    }

    fn secret() -> RoomSecret {
        RoomSecret::new(vec![b'k'; 32]).unwrap()
    }

    fn token(room: &str, exp: u64, nbf: Option<u64>) -> Vec<u8> {
        token::mint(
            &secret(),
            &token::Claims {
                room: room.into(),
                exp,
                nbf,
            },
        )
        .into_bytes()
    }

    /// A client heartbeating with `^cookie^C^join^ROOM^TOKEN` (as chat did
    /// in a room) stays after the token's `exp`, as one heartbeating `^hb^`
    /// without verify mode does: tokens are checked on joining, in both
    /// modes (found in review: the membership used to end with the token).
    #[test]
    fn in_verify_mode_a_member_outlives_its_tokens_expiry_as_without() {
        let (mut f, key, t0) = verifying(HubConfig {
            timeout: Duration::from_millis(1_000),
            room_secret: Some(secret()),
            ..config()
        });
        f.hub.set_unix_time(1_000);
        let cookie = [&b"^cookie^"[..], &key.make(&addr(1), t0)].concat();
        let beat = [&cookie[..], b"^join^vip^", &token("vip", 1_001, None)].concat();
        assert_eq!(f.at(0, from(1, &beat)).unwrap().0, b"^room^vip");
        f.hub.set_unix_time(1_100);
        for step in 1..=10u64 {
            f.at(step * 300, from(1, &beat));
            f.hub
                .expire(t0 + Duration::from_millis(step * 300), 1_000, &mut f.counts);
        }
        assert_eq!(
            f.counts.clients_expired, 0,
            "the member heartbeating with its cookie stays"
        );
    }

    #[test]
    fn a_proven_heartbeat_with_last_epochs_cookie_is_answered_with_a_fresh_one() {
        // Renewal rides on the proven heartbeat (never rate-limited), not on
        // a `^hello^` a spoofer could get refused in the member's name.
        use crate::core::cookie::EPOCH_SECS;
        let (mut f, key, _) = verifying(HubConfig {
            timeout: Duration::from_secs(600),
            client_rate: Some((1.0, 1.0)),
            ..config()
        });
        let old = verified(&mut f, &key, 1, 0);
        assert_eq!(
            f.at(1_000, from(1, &old)),
            None,
            "this epoch's: nothing to say"
        );
        let next = EPOCH_SECS * 1_000 + 500;
        let (reply, to) = f.at(next, from(1, &old)).unwrap();
        assert_eq!(to, vec![1]);
        assert_eq!(reply.len(), old.len(), "no longer than the heartbeat");
        let fresh = reply.clone();
        assert_ne!(fresh, old);
        assert_eq!(f.at(next + 1, from(1, &fresh)), None);
        // Two epochs on, the old one proves nothing; the fresh one still does.
        let later = 2 * EPOCH_SECS * 1_000 + 500;
        assert_eq!(f.at(later, from(1, &old)), None);
        assert_eq!(f.counts.dropped[DropReason::BadCookie as usize], 1);
        let (renewed, _) = f.at(later, from(1, &fresh)).unwrap();
        assert!(renewed.starts_with(b"^cookie^"));
    }

    #[test]
    fn a_proven_join_with_an_expired_token_still_proves_the_member_alive() {
        // Tokens are checked on joining, not while one stays: a member whose
        // token expired since, re-sending its proven join, is answered with
        // its room (it is in it), is still alive, and stays.
        let (mut f, key, t0) = verifying(HubConfig {
            timeout: Duration::from_millis(1_000),
            room_secret: Some(secret()),
            ..config()
        });
        f.hub.set_unix_time(1_000);
        let c = verified(&mut f, &key, 1, 0);
        let join = [&c[..], b"^join^vip^", &token("vip", 1_001, None)[..]].concat();
        assert_eq!(f.at(0, from(1, &join)).unwrap().0, b"^room^vip");
        f.hub.set_unix_time(2_000);
        for step in 1..=10u64 {
            let (reply, _) = f.at(step * 300, from(1, &join)).unwrap();
            assert_eq!(reply, b"^room^vip");
            f.hub
                .expire(t0 + Duration::from_millis(step * 300), 1_000, &mut f.counts);
        }
        assert_eq!(f.counts.clients_expired, 0);
        verified(&mut f, &key, 2, 2_900);
        let (_, to) = f.at(3_000, from(1, b"still in vip")).unwrap();
        assert_eq!(to, vec![1], "not the lobby's member");
    }

    #[test]
    fn with_a_secret_named_rooms_need_a_valid_token() {
        let mut f = Fixture::new(HubConfig {
            room_secret: Some(secret()),
            ..config()
        });
        f.hub.set_unix_time(1_000);
        let join = |room: &str, t: &[u8]| [format!("^join^{room}^").as_bytes(), t].concat();
        let ok = join("vip", &token("vip", 2_000, None));
        assert_eq!(f.at(0, from(1, &ok)).unwrap().0, b"^room^vip");
        for (n, bad) in [
            join("vip", &token("other", 2_000, None)),
            join("vip", &token("vip", 10, None)),
            join("vip", &token("vip", 2_000, Some(1_500))),
            join("vip", b"garbage.garbage.garbage"),
            b"^join^vip            ".to_vec(),
        ]
        .into_iter()
        .enumerate()
        {
            let (reply, _) = f.at(0, from(2, &bad)).unwrap();
            assert_eq!(reply, b"^denied^token", "case {n}");
        }
        use crate::core::counts::Refusal;
        assert_eq!(f.counts.joins_refused[Refusal::Token.index()], 5);
        // Each for its own reason, in the finer count.
        for why in [
            TokenError::Room,
            TokenError::Expired,
            TokenError::NotYet,
            TokenError::Malformed,
            TokenError::Missing,
        ] {
            assert_eq!(f.counts.token_refused[why.index()], 1, "{why:?}");
        }
        assert_eq!(f.counts.token_refused.iter().sum::<u64>(), 5);
        // The open lobby needs no token.
        assert_eq!(f.at(0, from(3, b"^join^")).unwrap().0, b"^room^");
    }

    /// An empty token (`^join^vip^`, from an empty `--token-file`) is
    /// counted as `missing`, not `malformed` (found in review).
    #[test]
    fn an_empty_token_is_counted_as_missing() {
        let mut f = Fixture::new(HubConfig {
            room_secret: Some(secret()),
            ..config()
        });
        f.hub.set_unix_time(1_000);
        let (reply, _) = f.at(0, from(1, b"^join^vip^          ")).unwrap();
        assert_eq!(reply, b"^denied^token");
        assert_eq!(f.counts.token_refused[TokenError::Missing.index()], 1);
        assert_eq!(f.counts.token_refused.iter().sum::<u64>(), 1);
    }

    /// Without a secret a token is not looked at, and the room is open:
    /// counted, because whoever sent it believes otherwise.
    #[test]
    fn without_a_secret_a_token_is_counted_as_ignored() {
        let mut f = Fixture::new(config());
        let join = [&b"^join^vip^"[..], &token("vip", 2_000, None)].concat();
        assert_eq!(f.at(0, from(1, &join)).unwrap().0, b"^room^vip");
        assert_eq!(
            f.at(0, from(2, b"^join^vip           ")).unwrap().0,
            b"^room^vip"
        );
        assert_eq!(f.counts.tokens_ignored, 1);
        // Already in the room: the rejoin checks nothing and counts nothing.
        assert_eq!(f.at(0, from(1, &join)).unwrap().0, b"^room^vip");
        assert_eq!(f.counts.tokens_ignored, 1);
        assert_eq!(f.counts.token_refused.iter().sum::<u64>(), 0);
    }

    #[test]
    fn a_closed_lobby_relays_nothing_and_cannot_be_joined() {
        let mut f = Fixture::new(HubConfig {
            room_secret: Some(secret()),
            lobby_open: false,
            ..config()
        });
        f.hub.set_unix_time(1_000);
        assert_eq!(f.at(0, from(1, b"hello")), None);
        assert_eq!(f.hub.clients(), 0);
        let ok = [&b"^join^vip^"[..], &token("vip", 2_000, None)].concat();
        f.at(0, from(1, &ok)).unwrap();
        let (_, to) = f.at(0, from(1, b"inside")).unwrap();
        assert_eq!(to, vec![1]);
        let (reply, _) = f.at(0, from(1, b"^join^              ")).unwrap();
        assert_eq!(reply, b"^denied^token");
        use crate::core::admission::DropReason;
        assert_eq!(f.counts.dropped[DropReason::LobbyClosed.index()], 1);
    }

    #[test]
    fn no_echo_leaves_the_sender_out() {
        let mut f = Fixture::new(HubConfig {
            echo: false,
            ..config()
        });
        f.at(0, from(1, b"^hb^"));
        let (_, to) = f.at(0, from(2, b"hi")).unwrap();
        assert_eq!(to, vec![1]);
    }

    #[test]
    fn raw_format_relays_the_body_itself() {
        let mut f = Fixture::new(HubConfig {
            format: Template::parse("raw").unwrap(),
            ..config()
        });
        let (payload, _) = f.at(0, from(1, b"\xff\x00bin\r\n")).unwrap();
        assert_eq!(payload, b"\xff\x00bin");
    }

    #[test]
    fn quit_leaves_and_a_strangers_quit_is_harmless() {
        let mut f = Fixture::new(config());
        f.at(0, from(1, b"^hb^"));
        f.at(0, from(2, b"^hb^"));
        assert_eq!(f.at(0, from(9, b"quit")), None);
        assert_eq!(f.at(0, from(1, b" quit\n")), None);
        let (_, to) = f.at(0, from(2, b"left?")).unwrap();
        assert_eq!(to, vec![2]);
        assert_eq!((f.counts.quits, f.counts.clients_left), (2, 1));
        assert_eq!(f.hub.clients(), 1);
    }

    #[test]
    fn admission_drops_are_counted_and_change_nothing() {
        let mut f = Fixture::new(HubConfig {
            max_clients: 1,
            ..config()
        });
        f.at(0, from(1, b"^hb^"));
        assert_eq!(f.at(0, from(2, b"let me in")), None);
        let cut = Arrival {
            truncated: true,
            ..from(1, b"xxxx")
        };
        assert_eq!(f.at(0, cut), None);
        let nowhere = Arrival {
            source: None,
            ..from(1, b"x")
        };
        assert_eq!(f.at(0, nowhere), None);
        use crate::core::admission::DropReason;
        for r in [
            DropReason::TableFull,
            DropReason::Oversize,
            DropReason::BadSource,
        ] {
            assert_eq!(f.counts.dropped[r.index()], 1, "{r:?}");
        }
        assert_eq!((f.counts.messages, f.hub.clients()), (0, 1));
        // A member still gets through a full table.
        assert!(f.at(0, from(1, b"still me")).is_some());
    }

    #[test]
    fn silent_clients_expire_on_time_and_speakers_do_not() {
        let mut f = Fixture::new(HubConfig {
            timeout: Duration::from_millis(100),
            ..config()
        });
        f.at(0, from(1, b"^hb^"));
        f.at(0, from(2, b"^hb^"));
        f.at(60, from(2, b"^hb^"));
        let wake = f.hub.next_timer().unwrap();
        assert!(wake >= f.t0 + Duration::from_millis(100), "early wake-up");
        // At 99 ms nobody is due; at 101 ms client 1 is expired and 2 rescheduled.
        assert!(!f
            .hub
            .expire(f.t0 + Duration::from_millis(99), 64, &mut f.counts));
        assert_eq!(f.counts.clients_expired, 0);
        f.hub
            .expire(f.t0 + Duration::from_millis(101), 64, &mut f.counts);
        assert_eq!((f.counts.clients_expired, f.hub.clients()), (1, 1));
        // A message at 120 ms reaches only client 2 (and the sender, 3).
        let (_, to) = f.at(120, from(3, b"who?")).unwrap();
        assert_eq!(to, vec![2, 3]);
        f.hub
            .expire(f.t0 + Duration::from_millis(162), 64, &mut f.counts);
        assert_eq!(f.counts.clients_expired, 2);
    }

    #[test]
    fn a_client_past_its_deadline_gets_nothing_before_the_wheel_runs() {
        let mut f = Fixture::new(HubConfig {
            timeout: Duration::from_millis(100),
            ..config()
        });
        f.at(0, from(1, b"^hb^"));
        let (_, to) = f.at(500, from(2, b"late")).unwrap();
        assert_eq!(to, vec![2]);
    }

    #[test]
    fn expiry_respects_the_budget() {
        let mut f = Fixture::new(HubConfig {
            timeout: Duration::from_millis(10),
            ..config()
        });
        for p in 0..50 {
            f.at(0, from(p, b"^hb^"));
        }
        let later = f.t0 + Duration::from_secs(1);
        let mut calls = 1;
        while f.hub.expire(later, 8, &mut f.counts) {
            calls += 1;
        }
        assert_eq!(f.counts.clients_expired, 50);
        assert_eq!(calls, 7);
        assert_eq!(f.hub.next_timer(), None);
    }

    #[test]
    fn a_message_from_elsewhere_reaches_every_local_member() {
        let mut f = Fixture::new(HubConfig {
            echo: false,
            ..config()
        });
        f.at(0, from(1, b"^hb^"));
        f.at(0, from(2, b"^hb^"));
        let now = f.t0 + Duration::from_millis(5);
        let out = f.hub.relay_from_elsewhere(now, LOBBY, b"rendered there");
        assert_eq!(out.payload, b"rendered there");
        let mut to: Vec<u16> = out.recipients.map(|a| a.port()).collect();
        to.sort();
        assert_eq!(to, vec![1, 2]);
        // It is not a datagram: nothing is counted as received.
        assert_eq!(f.counts.received(), 2);
    }

    /// The runtime's tag of the local address a datagram came in on rides
    /// through the hub untouched: a reply goes back via the address the
    /// request used, fan-out and `bye` via each member's latest one.
    #[test]
    fn replies_and_deliveries_leave_from_the_address_each_client_used() {
        let mut f = Fixture::new(config());
        let via = |port: u16, local: u8, data: &'static [u8]| Arrival {
            source: Some(addr(port).with_local(local)),
            ..from(port, data)
        };
        let t0 = f.t0;
        let locals = |e: Effect<'_>| -> Vec<(u16, u8)> {
            let mut v: Vec<(u16, u8)> = match e {
                Effect::Reply { to, .. } => vec![(to.port(), to.local())],
                Effect::Fanout(out) => out.recipients.map(|a| (a.port(), a.local())).collect(),
                Effect::Nothing => vec![],
            };
            v.sort();
            v
        };
        assert_eq!(
            locals(f.hub.handle(t0, via(1, 1, b"^join^r"), &mut f.counts)),
            vec![(1, 1)]
        );
        f.hub.handle(t0, via(2, 2, b"^join^r"), &mut f.counts);
        let out = f.hub.handle(t0, via(1, 1, b"hi"), &mut f.counts);
        assert_eq!(locals(out), vec![(1, 1), (2, 2)]);
        // Client 1 now reaches the relay on local address 3.
        let out = f.hub.handle(t0, via(1, 3, b"moved"), &mut f.counts);
        assert_eq!(locals(out), vec![(1, 3), (2, 2)]);
        let out = f
            .hub
            .relay_from_elsewhere(t0, f.hub.find_room(b"r").unwrap(), b"x");
        assert_eq!(locals(Effect::Fanout(out)), vec![(1, 3), (2, 2)]);
        let mut bye: Vec<(u16, u8)> = f.hub.everyone(t0).map(|a| (a.port(), a.local())).collect();
        bye.sort();
        assert_eq!(bye, vec![(1, 3), (2, 2)]);
    }

    /// In verify mode a forged datagram "from" a member to another of the
    /// relay's addresses does not move it there (its connected socket
    /// would then drop everything); its own cookie does.
    #[test]
    fn in_verify_mode_only_a_proven_datagram_moves_a_member_to_another_local_address() {
        let (mut f, key, t0) = verifying(HubConfig { ..config() });
        fn via(port: u16, local: u8, data: &[u8]) -> Arrival<'_> {
            Arrival {
                source: Some(addr(port).with_local(local)),
                ..from(port, data)
            }
        }
        let cookie = [&b"^cookie^"[..], &key.make(&addr(1), t0)].concat();
        f.hub.handle(t0, via(1, 1, &cookie), &mut f.counts);
        let tag_of_1 = |f: &mut Fixture| {
            let out = f.hub.relay_from_elsewhere(t0, LOBBY, b"x");
            out.recipients.map(|a| a.local()).collect::<Vec<u8>>()
        };
        assert_eq!(tag_of_1(&mut f), vec![1]);
        for forged in [&b"^hb^"[..], b"", b"forged message"] {
            f.hub.handle(t0, via(1, 2, forged), &mut f.counts);
        }
        assert_eq!(tag_of_1(&mut f), vec![1], "unproven: not moved");
        f.hub.handle(t0, via(1, 2, &cookie), &mut f.counts);
        assert_eq!(tag_of_1(&mut f), vec![2], "its cookie moves it");
    }

    #[test]
    fn goodbye_goes_to_every_live_client() {
        let mut f = Fixture::new(config());
        for p in 1..=3 {
            f.at(0, from(p, b"^hb^"));
        }
        let now = f.t0 + Duration::from_millis(1);
        assert_eq!(f.hub.everyone(now).count(), 3);
        assert_eq!(f.hub.goodbye(), b"bye");
        assert_eq!(f.hub.clear(), 3);
        assert_eq!(f.hub.everyone(now).count(), 0);
    }

    proptest! {
        /// Whatever arrives, each datagram is counted exactly once, the
        /// table never exceeds its cap, and a fan-out only ever goes to
        /// clients (never to a stranger who was refused or has quit).
        #[test]
        fn every_datagram_is_counted_once(
            ops in proptest::collection::vec((0u16..12, 0u8..6, 0u64..40), 1..300)
        ) {
            let mut f = Fixture::new(HubConfig {
                timeout: Duration::from_millis(50),
                max_clients: 6,
                ..config()
            });
            let mut ms = 0;
            for (n, (port, what, dt)) in ops.into_iter().enumerate() {
                ms += dt;
                let data: &[u8] = match what {
                    0 => b"^hb^",
                    1 => b"quit",
                    2 => b"",
                    _ => b"msg",
                };
                let arrival = Arrival { truncated: what == 5, ..from(port, data) };
                let now = f.t0 + Duration::from_millis(ms);
                f.hub.expire(now, usize::MAX, &mut f.counts);
                if let Some((_, to)) = f.at(ms, arrival) {
                    for p in &to {
                        prop_assert!(f.hub.table.find(&addr(*p)).is_some());
                    }
                }
                prop_assert_eq!(f.counts.received(), n as u64 + 1);
                prop_assert!(f.hub.clients() <= 6);
            }
        }
    }
}
