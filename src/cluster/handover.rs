//! The cluster's side of a hand-over (`serve --takeover` with `--cluster`):
//! how the old process stops taking messages from the bus at a known
//! point, and how the new one picks them up from exactly there, so that
//! no member misses a message of another node and none gets one twice.
//!
//! The order of events, and why it leaves no gap:
//!
//! 1. The new process connects to NATS and subscribes to every subject
//!    of the cluster (`NAME.>`) before it says hello ([`Early::connect`]);
//!    a PING/PONG proves the server has the subscription. From then on
//!    every message any node publishes reaches it, and it keeps them
//!    (bounded: [`CATCHUP_MESSAGES`], [`CATCHUP_BYTES`]).
//! 2. The old process's bridge freezes ([`HandoverPort::freeze`]): a
//!    PING/PONG of its own first, so every message the server sent it
//!    before is in its subscriptions; each room hands those on to the
//!    loops, then stops. What each room's [`Inbox`](super::inbox::Inbox)
//!    has seen is then exactly what was handed to the loops: its
//!    positions (per origin stream, the last seq).
//! 3. The loops pause; each first fans out everything the bus queued for
//!    it. The bridge publishes what the loops published and flushes it to
//!    the server ([`HandoverPort::flush`]), so the old process's last
//!    messages are at the server before the new one can send anything.
//! 4. The positions go to the new process in the snapshot's streams
//!    section. Its bridge subscribes to the rooms its members are in,
//!    seeds each room's inbox with them, proves the subscriptions with a
//!    PING/PONG, drops the catch-all subscription and replays what it
//!    kept through the inboxes ([`HandoverPort::catch_up`]): what the old
//!    process delivered is a duplicate and dropped, the rest is delivered,
//!    in order. Its loops read from the moment the old process lets go;
//!    the bus's messages reach them once this is done.
//!
//! A message published during the overlap of the catch-all and a room's
//! own subscription arrives twice; the second is dropped as `duplicate`
//! (`udphub_cluster_dropped_total`), never delivered twice. The positions
//! hold only through the replay (and only for each room's first
//! subscription): then they are any other last seq, with the usual
//! windows. If the hand-over fails, the old bridge thaws
//! ([`HandoverPort::thaw`]) and forwards what its frozen rooms kept
//! meanwhile (bounded), in order.

use std::sync::atomic::AtomicBool;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};

use super::bridge::{self, Bridge};
use super::{BusDrop, ClusterConfig, ClusterMetrics};
use crate::core::snapshot::RoomStreams;
use crate::error::Error;

/// The most NATS messages the new process keeps from the catch-all
/// subscription before it has its members (every room of the cluster's,
/// so a bound, not just a room's share). Beyond it they are dropped and
/// counted (`inbound_full`).
pub const CATCHUP_MESSAGES: usize = 65_536;
/// The most bytes of NATS messages kept from the catch-all subscription.
pub const CATCHUP_BYTES: usize = 16 << 20;
/// How long, after a PING/PONG proved a subscription, messages that were
/// matched before it may still arrive on the old way (the NATS server
/// matches and queues a message in its publisher's goroutine, so the PONG
/// on another connection is no strict barrier): the old process forwards
/// for this long before it freezes, the new one reads both ways this long
/// before it drops the catch-all subscription.
pub const GRACE: Duration = Duration::from_millis(50);
/// How long a request to the bridge may take (each is a NATS round trip,
/// or a few).
pub const REQUEST_PATIENCE: Duration = Duration::from_secs(2);

/// What the supervisor asks of the bridge during a hand-over.
#[derive(Debug)]
pub enum Request {
    /// Old process: stop handing messages to the loops after those the
    /// server sent so far; answer each room's positions.
    Freeze(mpsc::Sender<Result<Vec<RoomStreams>, String>>),
    /// Old process: publish what waits and flush it to the server.
    Flush(mpsc::Sender<Result<(), String>>),
    /// New process: the members are registered; subscribe to their rooms
    /// and replay what the catch-all subscription kept.
    CatchUp(mpsc::Sender<Result<CaughtUp, String>>),
}

/// What a catch-up did, for the log.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CaughtUp {
    /// NATS messages the catch-all subscription kept.
    pub kept: usize,
    /// Messages delivered from them (new to this node's members).
    pub delivered: u64,
    /// Messages the old process had delivered already.
    pub duplicate: u64,
    /// NATS messages of rooms with no member here.
    pub elsewhere: usize,
    /// NATS messages dropped for the bound.
    pub dropped: u64,
}

/// The supervisor's way to the bridge during a hand-over. Never blocks
/// longer than [`REQUEST_PATIENCE`] a request.
#[derive(Debug, Clone)]
pub struct HandoverPort {
    pub(super) requests: tokio::sync::mpsc::Sender<Request>,
    /// A thaw, apart from the queue (never lost behind other requests).
    pub(super) thaw: Arc<Thaw>,
}

/// A thaw asked for: a flag and the bridge's wake-up.
#[derive(Debug, Default)]
pub struct Thaw {
    /// Set by [`HandoverPort::thaw`], taken by the bridge.
    pub(super) pending: AtomicBool,
    /// Wakes the bridge.
    pub(super) wanted: tokio::sync::Notify,
}

impl HandoverPort {
    fn ask<T>(
        &self,
        make: impl FnOnce(mpsc::Sender<Result<T, String>>) -> Request,
    ) -> Result<T, String> {
        let (tx, rx) = mpsc::channel();
        self.requests
            .try_send(make(tx))
            .map_err(|e| format!("the cluster bridge is not answering ({e})"))?;
        rx.recv_timeout(REQUEST_PATIENCE + Duration::from_millis(500))
            .map_err(|_| format!("the cluster bridge did not answer within {REQUEST_PATIENCE:?}"))?
    }

    /// Freezes the bus's way in and returns every subscribed room's
    /// positions (step 2 of the module's order).
    pub fn freeze(&self) -> Result<Vec<RoomStreams>, String> {
        self.ask(Request::Freeze)
    }

    /// Publishes what the loops published and waits for the server to
    /// have it (step 3).
    pub fn flush(&self) -> Result<(), String> {
        self.ask(Request::Flush)
    }

    /// The hand-over failed: forward again, starting with what waited.
    pub fn thaw(&self) {
        self.thaw
            .pending
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.thaw.wanted.notify_one();
    }

    /// New process: picks the bus up where the old process left it
    /// (step 4). Call once, after every loop registered its members and
    /// before any reads (the rooms replayed are those they opened). It
    /// does not wait: the loops may serve meanwhile (the bus's messages
    /// reach them once it is done); the answer comes on the receiver.
    pub fn start_catch_up(&self) -> mpsc::Receiver<Result<CaughtUp, String>> {
        let (tx, rx) = mpsc::channel();
        if let Err(e) = self.requests.try_send(Request::CatchUp(tx.clone())) {
            let _ = tx.send(Err(format!("the cluster bridge is not answering ({e})")));
        }
        rx
    }
}

/// What the catch-all subscription kept, in arrival order, bounded.
#[derive(Debug, Default)]
pub(super) struct Kept {
    /// The NATS messages: subject and payload.
    pub(super) messages: Vec<(async_nats::Subject, Bytes)>,
    /// Their payloads' bytes.
    bytes: usize,
    /// Dropped for the bound.
    pub(super) dropped: u64,
}

impl Kept {
    /// Keeps `message` if the bound allows, else counts it.
    pub(super) fn keep(&mut self, message: async_nats::Message, metrics: &ClusterMetrics) {
        let len = message.payload.len();
        if self.messages.len() >= CATCHUP_MESSAGES || self.bytes + len > CATCHUP_BYTES {
            self.dropped += 1;
            metrics.drop_one(BusDrop::InboundFull);
            return;
        }
        self.bytes += len;
        self.messages.push((message.subject, message.payload));
    }
}

/// The catch-all subscription of a process taking over, read by a task of
/// its own into a bounded [`Kept`] until the catch-up ends it.
pub(super) struct Catchup {
    /// What was kept (the task's and the catch-up's).
    kept: Arc<std::sync::Mutex<Kept>>,
    /// Ends the reading task, which returns the subscription.
    stop: tokio::sync::oneshot::Sender<()>,
    /// The reading task.
    reader: tokio::task::JoinHandle<Option<async_nats::Subscriber>>,
}

impl Catchup {
    /// Starts reading `subscription` (`NAME.>`) into a bounded buffer.
    fn start(mut subscription: async_nats::Subscriber, metrics: ClusterMetrics) -> Catchup {
        let kept = Arc::new(std::sync::Mutex::new(Kept::default()));
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let into = Arc::clone(&kept);
        let reader = tokio::spawn(async move {
            loop {
                tokio::select! {
                    biased;
                    _ = &mut stopped => return Some(subscription),
                    message = subscription.next() => match message {
                        Some(message) => {
                            if let Ok(mut k) = into.lock() {
                                k.keep(message, &metrics);
                            }
                        }
                        None => return None,
                    },
                }
            }
        });
        Catchup { kept, stop, reader }
    }

    /// Keeps a message of a room's own subscription with the catch-all's
    /// (the same bound).
    pub(super) fn keep(&self, message: async_nats::Message, metrics: &ClusterMetrics) {
        if let Ok(mut k) = self.kept.lock() {
            k.keep(message, metrics);
        }
    }

    /// Stops reading, takes what the subscription still holds, drops it
    /// (unsubscribes) and returns everything kept.
    pub(super) async fn finish(self, metrics: &ClusterMetrics) -> Kept {
        let Catchup { kept, stop, reader } = self;
        let _ = stop.send(());
        if let Ok(Some(mut subscription)) = reader.await {
            while let Some(Some(message)) = subscription.next().now_or_never() {
                if let Ok(mut k) = kept.lock() {
                    k.keep(message, metrics);
                }
            }
        }
        kept.lock()
            .map(|mut k| std::mem::take(&mut *k))
            .unwrap_or_default()
    }
}

/// A process taking over, connected to NATS and subscribed to the whole
/// cluster before it asks for the hand-over: the bridge thread, started
/// early, waiting for its loops ([`super::Bus::start`]).
pub struct Early {
    /// Hands the bridge its loops.
    bridge: tokio::sync::oneshot::Sender<Bridge>,
    /// The counters the bridge registered.
    pub(super) metrics: ClusterMetrics,
    /// Whether NATS is connected.
    pub(super) connected: Arc<AtomicBool>,
}

impl std::fmt::Debug for Early {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Early")
    }
}

impl Early {
    /// Connects to NATS for `config`, subscribes to `NAME.>` and waits (at
    /// most `patience`) for the server to confirm it. An error says why
    /// and that the running relay keeps serving (nothing was asked of it).
    pub fn connect(config: &ClusterConfig, patience: Duration) -> Result<Early, Error> {
        let metrics = ClusterMetrics::register();
        let connected = Arc::new(AtomicBool::new(false));
        let (ready, answer) = mpsc::channel::<Result<(), String>>();
        let (bridge_tx, bridge_rx) = tokio::sync::oneshot::channel::<Bridge>();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::io("start the cluster runtime", e))?;
        let (cfg, m, c) = (config.clone(), metrics.clone(), Arc::clone(&connected));
        std::thread::Builder::new()
            .name("udphub-cluster".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let Some(client) = bridge::connect(&cfg, &m, &c).await else {
                        let _ = ready.send(Err("the cluster is off (see the line above)".into()));
                        return;
                    };
                    let all = format!("{}.>", cfg.name);
                    let subscription = match client.subscribe(all.clone()).await {
                        Ok(s) => s,
                        Err(e) => {
                            let _ = ready.send(Err(format!("cannot subscribe to {all}: {e}")));
                            return;
                        }
                    };
                    match tokio::time::timeout(patience, client.flush()).await {
                        Ok(Ok(())) => {
                            let _ = ready.send(Ok(()));
                        }
                        Ok(Err(e)) => {
                            let _ = ready.send(Err(format!("NATS did not confirm: {e}")));
                            return;
                        }
                        Err(_) => {
                            let _ = ready.send(Err(format!(
                                "no answer from NATS ({}) within {patience:?}",
                                cfg.servers.join(",")
                            )));
                            return;
                        }
                    }
                    let catchup = Catchup::start(subscription, m.clone());
                    // The take-over failed (the sender dropped): nothing
                    // to serve.
                    let Ok(bridge) = bridge_rx.await else {
                        return;
                    };
                    bridge::serve(bridge, client, Some(catchup)).await;
                });
            })
            .map_err(|e| Error::io("start the cluster thread", e))?;
        let why = match answer.recv_timeout(patience + Duration::from_secs(1)) {
            Ok(Ok(())) => {
                return Ok(Early {
                    bridge: bridge_tx,
                    metrics,
                    connected,
                })
            }
            Ok(Err(why)) => why,
            Err(_) => format!("no answer from NATS within {patience:?}"),
        };
        Err(Error::Config(format!(
            "--takeover with --cluster: the new process must be subscribed on NATS before it takes over, and it is not: {why}; the running relay keeps serving (is NATS up, and is --cluster the same as the running relay's?)"
        )))
    }

    /// Hands the early bridge its loops: it serves from now on.
    pub(super) fn start(self, bridge: Bridge) -> Result<(), Error> {
        self.bridge.send(bridge).map_err(|_| {
            Error::Refused("the cluster bridge stopped before the loops were ready".into())
        })
    }
}
