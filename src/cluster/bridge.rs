//! The bridge thread: the only place that talks to NATS.
//!
//! A current-thread tokio runtime runs the async-nats client (reconnects
//! and resubscribes by itself), one task per subscribed room that checks
//! its batches ([`Inbox`]) and forwards their new messages to the loops
//! with members in it, and a loop over the publish and control queues.
//! One bridge serves every loop of the process (`--threads`): a room is
//! subscribed to while any loop has it open, and each of its messages is
//! queued for each such loop, in the order NATS delivered them. Nothing
//! here can stall a relay loop: a loop only ever `try_send`s to the
//! bridge, and the bridge only `try_send`s back (a queue full in messages
//! or bytes drops and counts, for that loop) and rings each loop's waker
//! once per burst.
//!
//! **Batching**: the loop hands over what each of its passes published
//! in one piece ([`super::Bus::flush`]); each time the publish queue wakes
//! the bridge, it takes what is waiting (up to [`PASS_LIMIT`] messages,
//! give or take one loop pass) and packs the messages
//! of each room's stream into as few NATS messages as the batch limits
//! allow ([`super::frame::MAX_BATCH_FRAMES`], [`super::frame::MAX_BATCH_BYTES`]). It never
//! waits for more: a lone message goes out at once, alone; under load the
//! queue fills while the bridge publishes, and the next pass takes many.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{FutureExt, StreamExt};

use super::frame::BatchWriter;
use super::handover::Request;
use super::inbox::Inbox;
use super::keys::Keys;
use super::{
    BusDrop, ClusterConfig, ClusterMetrics, Control, Inbound, InboundBytes, LoopInbox, Publish,
};
use crate::config::ClusterKey;
use crate::core::snapshot::{RoomStreams, StreamPosition};
use crate::error::Error;

/// The most messages one pass takes from the publish queue before it
/// publishes: a bound on the batches held open at once (and on the time
/// before the control queue is looked at again).
pub const PASS_LIMIT: usize = 4096;

/// The most NATS messages the client holds for one room's subscription
/// before the bridge has checked them; beyond it the client drops them
/// (`slow_consumer`). The client's default (65,536) would let anyone who
/// may publish on a subject, key or not (nothing is checked yet), make
/// every relay hold 65,536 messages of up to the server's `max_payload`
/// (1 MB by default) per room: 64 GB. A room's batches are few (one per
/// sender's pass), so a few hundred is a burst's worth.
pub const SUBSCRIPTION_CAPACITY: usize = 256;

/// The most NATS messages the client holds on their way to the server
/// (its default is 2,048): with batches of up to 64 KiB, 16 MiB for a
/// server that reads slowly, on top of [`super::PUBLISH_BYTES`].
pub const CLIENT_CAPACITY: usize = 256;

/// What the bridge thread owns.
pub struct Bridge {
    /// Where to connect, and as whom.
    pub config: ClusterConfig,
    /// Messages to publish, from the loops, a pass of one at a time.
    pub publish: tokio::sync::mpsc::Receiver<Vec<Publish>>,
    /// What the passes waiting in `publish` (or being published) cost:
    /// given back once NATS has them ([`super::PUBLISH_BYTES`]).
    pub publish_bytes: Arc<InboundBytes>,
    /// Subscriptions to make and drop, from the loops.
    pub control: Arc<Control>,
    /// Messages from the bus, to each loop (by index).
    pub loops: Arc<[LoopInbox]>,
    /// Signs what is published, checks what is received.
    pub keys: Keys,
    /// The longest rendered message delivered.
    pub max_body: usize,
    /// Whether NATS is connected (read by the loops before publishing).
    pub connected: Arc<AtomicBool>,
    /// Counters.
    pub metrics: ClusterMetrics,
    /// A hand-over's requests ([`super::handover`]).
    pub requests: tokio::sync::mpsc::Receiver<Request>,
    /// The positions a hand-over passed on, by room: each such room's
    /// first inbox starts from them.
    pub resumed: HashMap<Box<[u8]>, Vec<StreamPosition>>,
    /// A failed hand-over's thaw ([`super::handover::HandoverPort::thaw`]).
    pub thaw: Arc<super::handover::Thaw>,
}

/// Starts the bridge thread. It ends when every loop has dropped its side.
pub fn spawn(bridge: Bridge) -> Result<(), Error> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::io("start the cluster runtime", e))?;
    std::thread::Builder::new()
        .name("udphub-cluster".into())
        .spawn(move || runtime.block_on(run(bridge)))
        .map_err(|e| Error::io("start the cluster thread", e))?;
    Ok(())
}

/// Logs connection changes (or, a second one, what the server says), at
/// most one line a second (a flapping link or a stream of refused
/// publishes must not flood the log), saying how many were held back.
struct ChangeLog(crate::throttle::Throttle);

/// One line of a [`ChangeLog`]: its text, and the values it names as
/// fields (for `--log-format json`).
struct Line<'a> {
    /// The `event` field: what happened.
    event: &'static str,
    /// The NATS URL(s) of `--cluster` (never a password).
    url: &'a str,
    /// Why, when the line says why.
    reason: Option<&'a str>,
    /// The human text, after `cluster: `.
    text: &'a str,
}

impl ChangeLog {
    fn log(&mut self, connected: bool, line: Line<'_>) {
        let Some(held) = self.0.admit(Instant::now()) else {
            return;
        };
        let note = if held > 0 {
            format!(" ({held} more since the last line)")
        } else {
            String::new()
        };
        let Line {
            event,
            url,
            reason,
            text,
        } = line;
        macro_rules! say {
            ($level:ident) => {
                match reason {
                    Some(reason) => tracing::$level!(
                        event,
                        url,
                        reason,
                        held_back = held,
                        "cluster: {text}{note}"
                    ),
                    None => tracing::$level!(event, url, held_back = held, "cluster: {text}{note}"),
                }
            };
        }
        if connected {
            say!(info);
        } else {
            say!(warn);
        }
    }
}

async fn run(b: Bridge) {
    let Some(client) = connect(&b.config, &b.metrics, &b.connected).await else {
        return;
    };
    serve(b, client, None).await;
}

/// Makes the NATS client for `config` (it connects, and reconnects, by
/// itself; `connected` and the gauge follow it). `None` if the settings
/// cannot work (TLS files, credentials), said in the log.
pub(super) async fn connect(
    config: &ClusterConfig,
    metrics: &ClusterMetrics,
    connected: &Arc<AtomicBool>,
) -> Option<async_nats::Client> {
    let log = Arc::new(Mutex::new(ChangeLog(crate::throttle::Throttle::new(
        Duration::from_secs(1),
    ))));
    let connected = Arc::clone(connected);
    let gauge = metrics.connected.clone();
    // Never a password: the configuration keeps it out of the URLs.
    let servers = config.servers.join(",");
    let trouble = super::tls::TlsTrouble::default();
    let said = Arc::new(Mutex::new(ChangeLog(crate::throttle::Throttle::new(
        Duration::from_secs(1),
    ))));
    let failed = Arc::new(Mutex::new(ChangeLog(crate::throttle::Throttle::new(
        Duration::from_secs(60),
    ))));
    let events = {
        let log = Arc::clone(&log);
        let trouble = trouble.clone();
        let metrics = metrics.clone();
        move |event: async_nats::Event| {
            let (connected, log, failed, said, gauge, servers, trouble) = (
                Arc::clone(&connected),
                Arc::clone(&log),
                Arc::clone(&failed),
                Arc::clone(&said),
                gauge.clone(),
                servers.clone(),
                trouble.clone(),
            );
            if matches!(event, async_nats::Event::SlowConsumer(_)) {
                // One per NATS message the client dropped, unseen.
                metrics.drop_one(BusDrop::SlowConsumer);
            }
            async move {
                let change = match &event {
                    async_nats::Event::Connected => Some(true),
                    async_nats::Event::Disconnected | async_nats::Event::Closed => Some(false),
                    _ => None,
                };
                match change {
                    Some(up) => {
                        if up {
                            // What went wrong before this connection is moot.
                            trouble.take();
                        }
                        connected.store(up, Ordering::SeqCst);
                        gauge.set(if up { 1.0 } else { 0.0 });
                        if let Ok(mut l) = log.lock() {
                            let (event, text) = if up {
                                (
                                    "cluster_connected",
                                    format!("connected to NATS ({servers})"),
                                )
                            } else {
                                ("cluster_lost", format!("lost NATS ({servers}); local rooms go on, publishes are dropped and counted until it is back"))
                            };
                            l.log(
                                up,
                                Line {
                                    event,
                                    url: &servers,
                                    reason: None,
                                    text: &text,
                                },
                            );
                        }
                    }
                    // A failed attempt (retried every second at most): with
                    // the connection changes, with the reason TLS left if it
                    // was TLS (async-nats itself only says "IO error").
                    // async-nats says only "IO error" for a refused or
                    // unreachable server: the line says where it tried and
                    // what to check, once, then at most once a minute
                    // while it keeps failing (attempts go on every second).
                    None if matches!(event, async_nats::Event::ClientError(_)) => {
                        let why = trouble.take().unwrap_or_else(|| {
                            format!("{event}; is nats-server running there, and is the --cluster URL right? Retrying every second; local rooms go on")
                        });
                        if let Ok(mut l) = failed.lock() {
                            let text = format!("cannot connect to NATS at {servers}: {why}");
                            let reason = Some(why.as_str());
                            l.log(
                                false,
                                Line {
                                    event: "cluster_unreachable",
                                    url: &servers,
                                    reason,
                                    text: &text,
                                },
                            );
                        }
                    }
                    // The server's complaints (a permissions violation comes
                    // once per refused publish): rate-limited on their own,
                    // so neither kind of line hides the other.
                    None => {
                        if let Ok(mut l) = said.lock() {
                            let what = event.to_string();
                            let text = format!("NATS says {what}");
                            l.log(
                                false,
                                Line {
                                    event: "cluster_nats_says",
                                    url: &servers,
                                    reason: Some(&what),
                                    text: &text,
                                },
                            );
                        }
                    }
                }
            }
        }
    };
    let mut options = async_nats::ConnectOptions::new()
        .name(&config.node_id)
        .no_echo()
        .subscription_capacity(SUBSCRIPTION_CAPACITY)
        .client_capacity(CLIENT_CAPACITY)
        .retry_on_initial_connect()
        .max_reconnects(None)
        .ping_interval(Duration::from_secs(5))
        .connection_timeout(Duration::from_secs(2))
        .reconnect_delay_callback(|attempt| {
            // 100 ms, doubling to 1 s: a dead server costs one attempt a
            // second, and a restarted one is back within a second.
            Duration::from_millis((100u64 << attempt.min(4)).min(1_000))
        })
        .event_callback(events);
    if let Some(login) = &config.login {
        options = options.user_and_password(login.user.clone(), login.password.clone());
    }
    if let Some(tls) = &config.tls {
        match super::tls::client_config(tls, &trouble) {
            // Required, to every server: one learnt from the cluster
            // (announced as a bare HOST:PORT) is never tried in the clear.
            Ok(client) => options = options.tls_client_config(client).require_tls(true),
            Err(e) => {
                tracing::error!(event = "cluster_off", error = %e, "cluster: {e}; the cluster is off");
                return None;
            }
        }
    }
    if let Some(path) = &config.credentials {
        options = match options.credentials_file(path).await {
            Ok(o) => o,
            Err(e) => {
                tracing::error!(
                    event = "cluster_off",
                    path = %path.display(),
                    error = %e,
                    "cluster: cannot read the credentials file {}: {e}; the cluster is off",
                    path.display()
                );
                return None;
            }
        };
    }
    match options.connect(config.servers.clone()).await {
        Ok(c) => Some(c),
        Err(e) => {
            let url = config.servers.join(",");
            tracing::error!(
                event = "cluster_off",
                url = %url,
                error = %e,
                "cluster: cannot use {url}: {e}; the cluster is off"
            );
            None
        }
    }
}

/// Whether the rooms hand messages to the loops ([`super::handover`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    /// They do.
    Running,
    /// A hand-over froze them (its attempt's number): each hands on what
    /// its subscription holds, says so, and keeps what comes after
    /// (bounded) until the flow changes.
    Frozen(u64),
}

/// The most bytes of NATS messages frozen rooms keep together, for a
/// hand-over that fails (they are handed on when the rooms thaw); beyond
/// it they are dropped and counted (`inbound_full`).
const FROZEN_BYTES: usize = 16 << 20;

/// What a frozen room keeps, charged to every room's [`FROZEN_BYTES`]
/// (each message its payload, its subject and [`super::INBOUND_OVERHEAD`],
/// so that empty ones are not free), given back as they are handed on or
/// when the room's task ends (aborted with its subscription, say).
struct Waiting {
    /// The NATS messages' payloads, each with its charge.
    messages: std::collections::VecDeque<(bytes::Bytes, usize)>,
    /// The charges of every frozen room.
    bytes: Arc<std::sync::atomic::AtomicUsize>,
}

impl Waiting {
    /// Keeps `payload` (of a subject `subject_len` long) if the budget
    /// allows; false if not.
    fn push(&mut self, payload: bytes::Bytes, subject_len: usize) -> bool {
        let cost = payload.len() + subject_len + super::INBOUND_OVERHEAD;
        let held = self.bytes.fetch_add(cost, Ordering::SeqCst);
        if held + cost > FROZEN_BYTES {
            self.bytes.fetch_sub(cost, Ordering::SeqCst);
            return false;
        }
        self.messages.push_back((payload, cost));
        true
    }

    /// The oldest kept, its charge given back.
    fn pop(&mut self) -> Option<bytes::Bytes> {
        let (payload, cost) = self.messages.pop_front()?;
        self.bytes.fetch_sub(cost, Ordering::SeqCst);
        Some(payload)
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        let held: usize = self.messages.iter().map(|(_, cost)| cost).sum();
        self.bytes.fetch_sub(held, Ordering::SeqCst);
    }
}

/// What every room's task shares.
#[derive(Clone)]
struct Shared {
    keys: Keys,
    metrics: ClusterMetrics,
    flow: tokio::sync::watch::Receiver<Flow>,
    /// Where a frozen room says it stopped (the attempt's number).
    stopped: tokio::sync::mpsc::UnboundedSender<u64>,
    /// Bytes the frozen rooms keep, together ([`FROZEN_BYTES`]).
    frozen_bytes: Arc<std::sync::atomic::AtomicUsize>,
}

/// Runs the bridge with a connected `client` until every loop is gone;
/// `catchup` when this process is taking over ([`super::handover`]).
pub(super) async fn serve(
    mut b: Bridge,
    client: async_nats::Client,
    mut catchup: Option<super::handover::Catchup>,
) {
    let mut subscriptions: HashMap<String, Subscription> = HashMap::new();
    let (flow, flow_rx) = tokio::sync::watch::channel(Flow::Running);
    let (stopped_tx, mut stopped) = tokio::sync::mpsc::unbounded_channel();
    let shared = Shared {
        keys: b.keys.clone(),
        metrics: b.metrics.clone(),
        flow: flow_rx,
        stopped: stopped_tx,
        frozen_bytes: Arc::default(),
    };
    let thaw = Arc::clone(&b.thaw);
    let mut attempt = 0u64;
    let mut requests_open = true;
    loop {
        tokio::select! {
            biased;
            // A failed hand-over: the rooms thaw (a flag, not a queued
            // request, so that it is never lost behind others).
            () = thaw.wanted.notified() => {
                if thaw.pending.swap(false, Ordering::SeqCst) {
                    flow.send_replace(Flow::Running);
                }
            }
            request = b.requests.recv(), if requests_open => match request {
                Some(Request::Freeze(reply)) => {
                    attempt += 1;
                    // A thaw asked for before this freeze is moot.
                    thaw.pending.store(false, Ordering::SeqCst);
                    let patience = super::handover::REQUEST_PATIENCE;
                    let answer = tokio::time::timeout(
                        patience,
                        freeze(&client, &b.connected, &subscriptions, &flow, &mut stopped, attempt),
                    )
                    .await
                    .unwrap_or_else(|_| Err(format!("cluster: the bus did not stop within {patience:?}")));
                    let failed = answer.is_err();
                    // Nobody waiting any more (the supervisor gave up):
                    // thaw, or the rooms would stay frozen.
                    if reply.send(answer).is_err() || failed {
                        flow.send_replace(Flow::Running);
                    }
                }
                Some(Request::Flush(reply)) => {
                    while let Ok(pass) = b.publish.try_recv() {
                        let cost = InboundBytes::pass_cost(&pass);
                        publish_pass(&client, pass, &b.keys, &b.metrics).await;
                        b.publish_bytes.release_cost(cost);
                    }
                    let answer = match tokio::time::timeout(super::handover::REQUEST_PATIENCE, client.flush()).await {
                        Ok(Ok(())) => Ok(()),
                        Ok(Err(e)) => Err(format!("cannot flush to NATS: {e}")),
                        Err(_) => Err("NATS did not confirm the last publishes in time".to_string()),
                    };
                    let _ = reply.send(answer);
                }
                Some(Request::CatchUp(reply)) => {
                    let answer = match catchup.take() {
                        Some(c) => catch_up(&mut b, &client, &mut subscriptions, &shared, c).await,
                        None => Ok(super::handover::CaughtUp::default()),
                    };
                    let _ = reply.send(answer);
                }
                None => requests_open = false,
            },
            // (Not while taking over: the rooms opened meanwhile are
            // subscribed to, and replayed, by the catch-up.)
            // Nor while frozen: a room opened meanwhile is the new
            // process's (it has the member), or subscribed at the thaw.
            () = b.control.changed.notified(), if catchup.is_none() && *flow.borrow() == Flow::Running => {
                for (subject, sub) in apply_changes(&mut b, &client, &mut subscriptions).await {
                    if let Some(s) = subscriptions.get_mut(&subject) {
                        s.start(sub, &shared);
                    }
                }
            },
            message = b.publish.recv() => match message {
                Some(mut pass) => {
                    while pass.len() < PASS_LIMIT {
                        match b.publish.try_recv() {
                            Ok(more) => pass.extend(more),
                            Err(_) => break,
                        }
                    }
                    let cost = InboundBytes::pass_cost(&pass);
                    publish_pass(&client, pass, &b.keys, &b.metrics).await;
                    b.publish_bytes.release_cost(cost);
                }
                None => break,
            },
        }
    }
    // The loop is gone: hand NATS what was published, then stop.
    let _ = tokio::time::timeout(Duration::from_secs(1), client.flush()).await;
}

/// Applies the loops' interest changes: subscribes to rooms newly open on
/// some loop (returning their subscribers, not yet read: the caller starts
/// their tasks), unsubscribes from rooms no loop has open any more. A
/// room a hand-over passed positions for starts from them, once.
async fn apply_changes(
    b: &mut Bridge,
    client: &async_nats::Client,
    subscriptions: &mut HashMap<String, Subscription>,
) -> Vec<(String, async_nats::Subscriber)> {
    let mut changes = Vec::new();
    for (index, rooms) in b.control.rooms.iter().enumerate() {
        rooms.take(|room, open| changes.push((index, room, open)));
    }
    // Opens first: a room that closed on one loop and opened on
    // another since the last look keeps its subscription.
    changes.sort_by_key(|&(_, _, open)| !open);
    let mut fresh = Vec::new();
    for (index, room, open) in changes {
        let subject = super::subject(&b.config.name, &room);
        let bit = 1u64 << index;
        if !open {
            let left = subscriptions
                .get(&subject)
                .map(|s| s.loops.fetch_and(!bit, Ordering::SeqCst) & !bit);
            if left == Some(0) {
                // No loop has it open: dropping the subscriber
                // (with its task) unsubscribes.
                if let Some(s) = subscriptions.remove(&subject) {
                    if let Some(task) = s.task {
                        task.abort();
                    }
                }
                fresh.retain(|(s, _)| s != &subject);
            }
            continue;
        }
        if let Some(s) = subscriptions.get(&subject) {
            // Subscribed for another loop already: from the
            // next message on, this one gets them too.
            s.loops.fetch_or(bit, Ordering::SeqCst);
            continue;
        }
        match client.subscribe(subject.clone()).await {
            Ok(sub) => {
                let loops = Arc::new(AtomicU64::new(bit));
                // The positions are the first subscription's only: a room
                // that empties and fills again later starts afresh.
                let inbox = match b.resumed.remove(&room[..]) {
                    Some(positions) => Inbox::resumed(subject.clone(), b.max_body, &positions),
                    None => Inbox::new(subject.clone(), b.max_body),
                };
                let room: Arc<[u8]> = room.into();
                let to_loops = ToLoops {
                    room,
                    loops: Arc::clone(&b.loops),
                    mask: Arc::clone(&loops),
                };
                subscriptions.insert(
                    subject.clone(),
                    Subscription {
                        task: None,
                        loops,
                        inbox: Arc::new(Mutex::new(inbox)),
                        to_loops: Arc::new(to_loops),
                    },
                );
                fresh.push((subject, sub));
            }
            Err(e) => {
                tracing::warn!(event = "cluster_subscribe_failed", subject = %subject, error = %e, "cluster: cannot subscribe to {subject}: {e}")
            }
        }
    }
    fresh
}

/// Old process, step 2 of [`super::handover`]: proves with a PING/PONG
/// that every message the server sent is in the subscriptions, forwards
/// for a grace period, has each room hand on what it holds and stop, and
/// returns where each room is.
async fn freeze(
    client: &async_nats::Client,
    connected: &AtomicBool,
    subscriptions: &HashMap<String, Subscription>,
    flow: &tokio::sync::watch::Sender<Flow>,
    stopped: &mut tokio::sync::mpsc::UnboundedReceiver<u64>,
    attempt: u64,
) -> Result<Vec<RoomStreams>, String> {
    let patience = super::handover::REQUEST_PATIENCE;
    if !connected.load(Ordering::SeqCst) {
        return Err("cluster: this relay is not connected to NATS, so its bus cannot be handed over without a gap; try again once udphub_cluster_connected is 1, or restart it (its rooms live on in the other nodes)".into());
    }
    match tokio::time::timeout(patience, client.flush()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(format!("cluster: cannot reach NATS to hand over ({e}); try again once udphub_cluster_connected is 1")),
        Err(_) => return Err("cluster: NATS did not answer in time to hand over; try again".into()),
    }
    // A message another connection's publish matched before the new
    // process's subscription existed may still be on its way here after
    // the PONG (the server matches and queues it in the publisher's
    // goroutine): forwarded as usual for a moment more.
    tokio::time::sleep(super::handover::GRACE).await;
    flow.send_replace(Flow::Frozen(attempt));
    let mut waiting = subscriptions
        .values()
        .filter(|s| s.task.as_ref().is_some_and(|t| !t.is_finished()))
        .count();
    while waiting > 0 {
        match stopped.recv().await {
            Some(a) if a == attempt => waiting -= 1,
            Some(_) => {}
            None => return Err("cluster: the rooms are gone".into()),
        }
    }
    // Bounded as the snapshot is (beyond, the rest would be cut anyway).
    let mut left = crate::core::snapshot::MAX_STREAM_POSITIONS;
    let mut positions = Vec::new();
    for s in subscriptions.values() {
        if positions.len() >= crate::core::snapshot::MAX_STREAM_ROOMS {
            break;
        }
        let mut streams = s.inbox.lock().map(|i| i.positions()).unwrap_or_default();
        let cut = streams.len().saturating_sub(left);
        streams.drain(..cut);
        left -= streams.len();
        positions.push(RoomStreams {
            room: s.to_loops.room.as_ref().into(),
            streams,
        });
    }
    Ok(positions)
}

/// New process, step 4 of [`super::handover`]: subscribes to the rooms the
/// members are in, proves it, reads both those and the catch-all for a
/// grace period, drops the catch-all, replays what it kept through the
/// rooms' inboxes (each stream in seq order) and only then starts the
/// rooms.
async fn catch_up(
    b: &mut Bridge,
    client: &async_nats::Client,
    subscriptions: &mut HashMap<String, Subscription>,
    shared: &Shared,
    c: super::handover::Catchup,
) -> Result<super::handover::CaughtUp, String> {
    let mut fresh = apply_changes(b, client, subscriptions).await;
    let proven = tokio::time::timeout(super::handover::REQUEST_PATIENCE, client.flush()).await;
    // Whatever happens, the rooms start: this process serves on.
    let result = match proven {
        Ok(Ok(())) => {
            // Every message published from now on reaches the rooms'
            // subscriptions; one published before may still come on the
            // catch-all after the PONG (the server matches and queues it
            // in the publisher's goroutine), so both are read for a grace
            // period, and each stream is replayed in order of its seqs
            // from both: the copies are duplicates, nothing is missed.
            let until = tokio::time::Instant::now() + super::handover::GRACE;
            loop {
                for (_, sub) in &mut fresh {
                    while let Some(Some(message)) = sub.next().now_or_never() {
                        c.keep(message, &b.metrics);
                    }
                }
                if tokio::time::Instant::now() >= until {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let kept = c.finish(&b.metrics).await;
            let mut done = super::handover::CaughtUp {
                kept: kept.messages.len(),
                dropped: kept.dropped,
                ..Default::default()
            };
            let mut all = kept.messages;
            // Within a stream, by seq (what cannot be parsed sorts first,
            // and is refused by the inbox).
            all.sort_by_cached_key(|(subject, payload)| {
                super::frame::parse(payload).map(|b| {
                    (
                        subject.to_string(),
                        b.first.epoch,
                        b.first.stream,
                        b.first.seq,
                    )
                })
            });
            for (subject, payload) in all {
                match subscriptions.get(subject.as_str()) {
                    Some(s) => {
                        let t = take(&payload, &s.inbox, &s.to_loops, &shared.keys, &b.metrics);
                        done.delivered += t.delivered;
                        done.duplicate += t.duplicate;
                    }
                    None => done.elsewhere += 1,
                }
            }
            Ok(done)
        }
        Ok(Err(e)) => Err(format!("cannot confirm the subscriptions with NATS: {e}")),
        Err(_) => Err("NATS did not confirm the subscriptions in time".into()),
    };
    for s in subscriptions.values() {
        if let Ok(mut inbox) = s.inbox.lock() {
            inbox.end_replay();
        }
    }
    // Positions of rooms nobody here is in any more are moot: a later
    // subscription to one starts afresh.
    b.resumed = HashMap::new();
    for (subject, sub) in fresh {
        if let Some(s) = subscriptions.get_mut(&subject) {
            s.start(sub, shared);
        }
    }
    result
}

/// One subscribed room.
struct Subscription {
    /// The task forwarding its messages (aborting it unsubscribes); none
    /// until it is started.
    task: Option<tokio::task::JoinHandle<()>>,
    /// The loops with members in it: bit `i` for loop `i` (at most 64
    /// loops, `--threads`' limit). Read by the task per message.
    loops: Arc<AtomicU64>,
    /// Its receiving state (the task's; a hand-over reads it while the
    /// task is frozen).
    inbox: Arc<Mutex<Inbox>>,
    /// Where its messages go.
    to_loops: Arc<ToLoops>,
}

impl Subscription {
    /// Starts the task that reads `sub`.
    fn start(&mut self, sub: async_nats::Subscriber, shared: &Shared) {
        self.task = Some(tokio::spawn(forward(
            sub,
            Arc::clone(&self.inbox),
            Arc::clone(&self.to_loops),
            shared.clone(),
        )));
    }
}

/// The open batch of one subject in a pass.
struct Open {
    /// Its subject.
    subject: async_nats::Subject,
    /// The NATS message being built.
    writer: BatchWriter,
}

/// A NATS message ready to publish.
#[derive(Debug)]
pub struct Packed {
    /// Where.
    pub subject: async_nats::Subject,
    /// A batch ([`super::frame`]).
    pub msg: Vec<u8>,
    /// The messages in it.
    pub frames: u64,
}

/// Packs one pass's messages, each room stream's consecutive ones into one
/// NATS message, signed with `key` at `time`; returned in the order they
/// must be published (a batch that cannot take the next message of its
/// subject comes before the batch that does).
pub fn pack(pass: Vec<Publish>, key: Option<&ClusterKey>, time: u32) -> Vec<Packed> {
    let mut packed = Vec::new();
    let mut open: Vec<Open> = Vec::new();
    // A pass may hold thousands of rooms: find each one's batch by name.
    let mut index: HashMap<String, usize> = HashMap::new();
    let finish = |o: &mut Open, packed: &mut Vec<Packed>| {
        let frames = o.writer.count() as u64;
        if frames > 0 {
            packed.push(Packed {
                subject: o.subject.clone(),
                msg: o.writer.finish(key, &o.subject),
                frames,
            });
        }
    };
    for m in pass {
        let at = match index.get(m.subject.as_str()) {
            Some(&at) => at,
            None => {
                index.insert(m.subject.as_str().to_owned(), open.len());
                open.push(Open {
                    subject: m.subject.clone(),
                    writer: BatchWriter::default(),
                });
                open.len() - 1
            }
        };
        let o = &mut open[at];
        if !o.writer.is_empty() && !o.writer.fits(m.stamp, m.body.len()) {
            finish(o, &mut packed);
        }
        if o.writer.is_empty() {
            o.writer.begin(time, m.stamp, key.is_some());
        }
        o.writer.push(&m.body);
    }
    for o in &mut open {
        finish(o, &mut packed);
    }
    packed
}

/// Publishes one pass's messages, packed ([`pack`]), and counts them.
async fn publish_pass(
    client: &async_nats::Client,
    pass: Vec<Publish>,
    keys: &Keys,
    metrics: &ClusterMetrics,
) {
    let key = keys.signing();
    let time = u32::try_from(unix_now()).unwrap_or(u32::MAX);
    for p in pack(pass, key.as_ref(), time) {
        let len = p.msg.len() as u64;
        match client.publish(p.subject, p.msg.into()).await {
            Ok(()) => {
                metrics.published.increment(p.frames);
                metrics.nats_out.increment(1);
                metrics.bytes_out.increment(len);
            }
            Err(_) => metrics.drop_n(BusDrop::PublishError, p.frames),
        }
    }
}

/// Seconds since the Unix epoch by the wall clock (0 if it is before).
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Where one room's checked messages go: the queues of the loops with
/// members in it.
struct ToLoops {
    /// The room.
    room: Arc<[u8]>,
    /// Every loop's way in.
    loops: Arc<[LoopInbox]>,
    /// The loops with members in the room (see [`Subscription::loops`]).
    mask: Arc<AtomicU64>,
}

impl ToLoops {
    /// Queues `body` for each loop with members in the room; false once
    /// the loops are gone.
    fn send(&self, body: &bytes::Bytes, metrics: &ClusterMetrics) -> bool {
        let mask = self.mask.load(Ordering::SeqCst);
        fan(&self.loops, mask, &self.room, body, metrics)
    }
}

/// Queues one message from the bus for each loop in `mask` (the same
/// bytes, shared), ringing each once per burst; a full queue drops it for
/// that loop, counted. Returns `false` once the loops are gone.
fn fan(
    loops: &[LoopInbox],
    mask: u64,
    room: &Arc<[u8]>,
    body: &bytes::Bytes,
    metrics: &ClusterMetrics,
) -> bool {
    let mut alive = false;
    for (i, inbox) in loops.iter().enumerate() {
        if mask & (1 << i) == 0 {
            continue;
        }
        let m = Inbound {
            room: Arc::clone(room),
            body: body.clone(),
        };
        alive |= inbox.offer(m, metrics);
    }
    alive || mask == 0
}

/// Checks one NATS message of a room ([`Inbox`]) and forwards its new
/// messages to the loops with members in the room; counts the rest.
/// Returns the tally (`delivered` 0 and `open` false once the loops are
/// gone).
fn take(
    payload: &bytes::Bytes,
    inbox: &Mutex<Inbox>,
    to_loops: &ToLoops,
    keys: &Keys,
    metrics: &ClusterMetrics,
) -> Taken {
    metrics.nats_in.increment(1);
    metrics.bytes_in.increment(payload.len() as u64);
    let mut open = true;
    let Ok(mut inbox) = inbox.lock() else {
        return Taken::default();
    };
    let checked = inbox.accept(payload, keys, Instant::now(), unix_now(), |body| {
        open = open && to_loops.send(&payload.slice(body), metrics);
    });
    let mut taken = Taken {
        open,
        ..Taken::default()
    };
    match checked {
        Ok(t) => {
            metrics.drop_n(BusDrop::Duplicate, t.duplicate);
            metrics.drop_n(BusDrop::Oversized, t.oversized);
            metrics.gap.increment(t.gap);
            metrics.stream_resets.increment(t.resets);
            taken.delivered = t.delivered;
            taken.duplicate = t.duplicate;
        }
        Err(reason) => metrics.drop_one(reason),
    }
    taken
}

/// What [`take`] did with one NATS message.
#[derive(Debug, Default)]
struct Taken {
    /// Messages handed to the loops.
    delivered: u64,
    /// Messages seen already.
    duplicate: u64,
    /// False once the loops are gone.
    open: bool,
}

/// Reads one room's subscription, hands each NATS message to [`take`].
/// When a hand-over freezes the rooms it hands on what the subscription
/// holds, says so, and keeps what comes after (bounded by
/// [`FROZEN_BYTES`] for all rooms) until the flow changes: a thaw (the
/// hand-over failed) hands those on first, in order; a successful
/// hand-over ends the process with them (the new one delivers them).
async fn forward(
    mut sub: async_nats::Subscriber,
    inbox: Arc<Mutex<Inbox>>,
    to_loops: Arc<ToLoops>,
    mut shared: Shared,
) {
    let handle = |payload: &bytes::Bytes, shared: &Shared| {
        take(payload, &inbox, &to_loops, &shared.keys, &shared.metrics).open
    };
    let mut waiting = Waiting {
        messages: Default::default(),
        bytes: Arc::clone(&shared.frozen_bytes),
    };
    loop {
        let state = *shared.flow.borrow_and_update();
        // What waited while frozen goes first, in order (thawed, or frozen
        // again: then it is handed on before this room says it stopped).
        while let Some(payload) = waiting.pop() {
            if !handle(&payload, &shared) {
                return;
            }
        }
        if let Flow::Frozen(attempt) = state {
            while let Some(Some(message)) = sub.next().now_or_never() {
                if !handle(&message.payload, &shared) {
                    return;
                }
            }
            let _ = shared.stopped.send(attempt);
            loop {
                tokio::select! {
                    biased;
                    changed = shared.flow.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        break;
                    }
                    message = sub.next() => match message {
                        Some(message) => {
                            if !waiting.push(message.payload, message.subject.len()) {
                                shared.metrics.drop_one(BusDrop::InboundFull);
                            }
                        }
                        None => return,
                    },
                }
            }
            continue;
        }
        tokio::select! {
            biased;
            changed = shared.flow.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            message = sub.next() => match message {
                Some(message) => {
                    if !handle(&message.payload, &shared) {
                        return;
                    }
                }
                None => return,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    use mio::{Poll, Token};

    /// Loop inboxes with their receiving ends and polls.
    fn inboxes(
        n: usize,
        capacity: usize,
    ) -> (Vec<Poll>, Arc<[LoopInbox]>, Vec<mpsc::Receiver<Inbound>>) {
        let mut polls = Vec::new();
        let mut inboxes = Vec::new();
        let mut receivers = Vec::new();
        for _ in 0..n {
            let poll = Poll::new().unwrap();
            let waker = Arc::new(mio::Waker::new(poll.registry(), Token(1)).unwrap());
            let (queue, rx) = mpsc::sync_channel(capacity);
            inboxes.push(LoopInbox {
                queue,
                bytes: Arc::new(super::super::InboundBytes::default()),
                waker,
                wake_pending: Arc::new(AtomicBool::new(false)),
            });
            receivers.push(rx);
            polls.push(poll);
        }
        (polls, inboxes.into(), receivers)
    }

    fn rung(poll: &mut Poll) -> bool {
        let mut events = mio::Events::with_capacity(4);
        poll.poll(&mut events, Some(Duration::ZERO)).unwrap();
        !events.is_empty()
    }

    #[test]
    fn a_message_reaches_each_loop_with_the_room_in_order_ringing_once() {
        let (mut polls, loops, rx) = inboxes(3, 16);
        let metrics = ClusterMetrics::register();
        let room: Arc<[u8]> = Arc::from(&b"red"[..]);
        for m in [&b"one"[..], b"two", b"three"] {
            assert!(fan(&loops, 0b101, &room, &bytes::Bytes::from(m), &metrics));
        }
        for (i, want) in [(0, true), (1, false), (2, true)] {
            let got: Vec<bytes::Bytes> = rx[i].try_iter().map(|m| m.body).collect();
            if want {
                assert_eq!(got, vec!["one", "two", "three"], "loop {i}");
            } else {
                assert!(got.is_empty(), "loop {i} has no member in the room");
            }
            assert_eq!(rung(&mut polls[i]), want, "loop {i} rung once");
            assert!(!rung(&mut polls[i]));
        }
    }

    #[test]
    fn a_full_loop_drops_for_itself_only() {
        let (_polls, loops, rx) = inboxes(2, 2);
        let metrics = ClusterMetrics::register();
        let room: Arc<[u8]> = Arc::from(&b""[..]);
        for i in 0..3 {
            let frame = bytes::Bytes::from(format!("{i}"));
            assert!(fan(&loops, 0b01, &room, &frame, &metrics));
        }
        assert_eq!(rx[0].try_iter().count(), 2, "the third did not fit");
        assert!(fan(&loops, 0b11, &room, &bytes::Bytes::from("x"), &metrics));
        assert_eq!(rx[0].try_iter().count(), 1);
        assert_eq!(rx[1].try_iter().count(), 1);
        drop(rx);
        assert!(
            !fan(&loops, 0b11, &room, &bytes::Bytes::from("y"), &metrics),
            "gone"
        );
    }

    use crate::cluster::frame::{parse, Stamp};

    fn publish(subject: &str, stream: u32, seq: u64, body: &str) -> Publish {
        Publish {
            subject: subject.to_string().into(),
            stamp: Stamp {
                epoch: 1,
                stream,
                seq,
            },
            body: bytes::Bytes::copy_from_slice(body.as_bytes()),
        }
    }

    fn read(p: &Packed) -> (String, u64, Vec<String>) {
        let b = parse(&p.msg).unwrap();
        let bodies = b
            .bodies
            .iter()
            .map(|r| String::from_utf8_lossy(&p.msg[r.clone()]).into_owned())
            .collect();
        (p.subject.to_string(), b.first.seq, bodies)
    }

    #[test]
    fn a_pass_becomes_one_nats_message_per_room_stream_in_order() {
        let pass = vec![
            publish("u.room.a", 1, 1, "a1"),
            publish("u.room.b", 2, 7, "b7"),
            publish("u.room.a", 1, 2, "a2"),
            publish("u.room.b", 2, 8, "b8"),
            publish("u.room.a", 1, 3, "a3"),
        ];
        let packed = pack(pass, None, 0);
        let got: Vec<_> = packed.iter().map(read).collect();
        assert_eq!(
            got,
            vec![
                (
                    "u.room.a".into(),
                    1,
                    vec!["a1".into(), "a2".into(), "a3".into()]
                ),
                ("u.room.b".into(), 7, vec!["b7".into(), "b8".into()]),
            ]
        );
        assert_eq!(packed.iter().map(|p| p.frames).sum::<u64>(), 5);
    }

    #[test]
    fn a_hole_or_a_new_stream_starts_a_new_batch_published_after_the_old() {
        let pass = vec![
            publish("u.lobby", 1, 1, "x1"),
            // seq 2 was dropped (queue_full): the receivers see the gap.
            publish("u.lobby", 1, 3, "x3"),
            publish("u.lobby", 2, 1, "y1"),
        ];
        let got: Vec<_> = pack(pass, None, 0).iter().map(read).collect();
        assert_eq!(
            got,
            vec![
                ("u.lobby".into(), 1, vec!["x1".into()]),
                ("u.lobby".into(), 3, vec!["x3".into()]),
                ("u.lobby".into(), 1, vec!["y1".into()]),
            ]
        );
        // A lone message goes out alone, signed when there is a key.
        let key = ClusterKey::new(vec![1; 32]).unwrap();
        let one = pack(vec![publish("u.lobby", 1, 1, "z")], Some(&key), 5);
        assert_eq!(one.len(), 1);
        assert!(parse(&one[0].msg).unwrap().tag.is_some());
    }
}
