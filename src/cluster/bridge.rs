//! The bridge thread: the only place that talks to NATS.
//!
//! A current-thread tokio runtime runs the async-nats client (reconnects
//! and resubscribes by itself), one task per subscribed room that forwards
//! its messages to the loops with members in it, and a loop over the
//! publish and control queues. One bridge serves every loop of the process
//! (`--threads`): a room is subscribed to while any loop has it open, and
//! each of its messages is queued for each such loop, in the order NATS
//! delivered them. Nothing here can stall a relay loop: a loop only ever
//! `try_send`s to the bridge, and the bridge only `try_send`s back (a full
//! inbound queue drops and counts, for that loop) and rings each loop's
//! waker once per burst.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;

use super::{BusDrop, ClusterConfig, ClusterMetrics, Control, Inbound, LoopInbox, Publish};
use crate::error::Error;

/// What the bridge thread owns.
pub struct Bridge {
    /// Where to connect, and as whom.
    pub config: ClusterConfig,
    /// Messages to publish, from the loop.
    pub publish: tokio::sync::mpsc::Receiver<Publish>,
    /// Subscriptions to make and drop, from the loops.
    pub control: Arc<Control>,
    /// Messages from the bus, to each loop (by index).
    pub loops: Arc<[LoopInbox]>,
    /// Whether NATS is connected (read by the loops before publishing).
    pub connected: Arc<AtomicBool>,
    /// Counters.
    pub metrics: ClusterMetrics,
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

impl ChangeLog {
    fn log(&mut self, connected: bool, what: &str) {
        let Some(held) = self.0.admit(Instant::now()) else {
            return;
        };
        let note = if held > 0 {
            format!(" ({held} more since the last line)")
        } else {
            String::new()
        };
        if connected {
            tracing::info!("cluster: {what}{note}");
        } else {
            tracing::warn!("cluster: {what}{note}");
        }
    }
}

async fn run(mut b: Bridge) {
    let log = Arc::new(Mutex::new(ChangeLog(crate::throttle::Throttle::new(
        Duration::from_secs(1),
    ))));
    let connected = Arc::clone(&b.connected);
    let gauge = b.metrics.connected.clone();
    // Never a password: the configuration keeps it out of the URLs.
    let servers = b.config.servers.join(",");
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
                            let what = if up {
                                format!("connected to NATS ({servers})")
                            } else {
                                format!("lost NATS ({servers}); local rooms go on, publishes are dropped and counted until it is back")
                            };
                            l.log(up, &what);
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
                            l.log(
                                false,
                                &format!("cannot connect to NATS at {servers}: {why}"),
                            );
                        }
                    }
                    // The server's complaints (a permissions violation comes
                    // once per refused publish): rate-limited on their own,
                    // so neither kind of line hides the other.
                    None => {
                        if let Ok(mut l) = said.lock() {
                            l.log(false, &format!("NATS says {event}"));
                        }
                    }
                }
            }
        }
    };
    let mut options = async_nats::ConnectOptions::new()
        .name(&b.config.node_id)
        .no_echo()
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
    if let Some(login) = &b.config.login {
        options = options.user_and_password(login.user.clone(), login.password.clone());
    }
    if let Some(tls) = &b.config.tls {
        match super::tls::client_config(tls, &trouble) {
            // Required, to every server: one learnt from the cluster
            // (announced as a bare HOST:PORT) is never tried in the clear.
            Ok(client) => options = options.tls_client_config(client).require_tls(true),
            Err(e) => {
                tracing::error!("cluster: {e}; the cluster is off");
                return;
            }
        }
    }
    if let Some(path) = &b.config.credentials {
        options = match options.credentials_file(path).await {
            Ok(o) => o,
            Err(e) => {
                tracing::error!(
                    "cluster: cannot read the credentials file {}: {e}; the cluster is off",
                    path.display()
                );
                return;
            }
        };
    }
    let client = match options.connect(b.config.servers.clone()).await {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(
                "cluster: cannot use {servers}: {e}; the cluster is off",
                servers = b.config.servers.join(",")
            );
            return;
        }
    };
    let mut subscriptions: HashMap<String, Subscription> = HashMap::new();
    loop {
        tokio::select! {
            biased;
            () = b.control.changed.notified() => {
                let mut changes = Vec::new();
                for (index, rooms) in b.control.rooms.iter().enumerate() {
                    rooms.take(|room, open| changes.push((index, room, open)));
                }
                // Opens first: a room that closed on one loop and opened on
                // another since the last look keeps its subscription.
                changes.sort_by_key(|&(_, _, open)| !open);
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
                                s.task.abort();
                            }
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
                            let room: Arc<[u8]> = room.into();
                            let loops = Arc::new(AtomicU64::new(bit));
                            let task = tokio::spawn(forward(sub, room, Arc::clone(&b.loops), Arc::clone(&loops), b.metrics.clone()));
                            subscriptions.insert(subject, Subscription { task, loops });
                        }
                        Err(e) => tracing::warn!("cluster: cannot subscribe to {subject}: {e}"),
                    }
                }
            },
            message = b.publish.recv() => match message {
                Some(m) => match client.publish(m.subject, m.frame).await {
                    Ok(()) => b.metrics.published.increment(1),
                    Err(_) => b.metrics.drop_one(BusDrop::PublishError),
                },
                None => break,
            },
        }
    }
    // The loop is gone: hand NATS what was published, then stop.
    let _ = tokio::time::timeout(Duration::from_secs(1), client.flush()).await;
}

/// One subscribed room.
struct Subscription {
    /// The task forwarding its messages (aborting it unsubscribes).
    task: tokio::task::JoinHandle<()>,
    /// The loops with members in it: bit `i` for loop `i` (at most 64
    /// loops, `--threads`' limit). Read by the task per message.
    loops: Arc<AtomicU64>,
}

/// Forwards one room's messages to the loops with members in it.
async fn forward(
    mut sub: async_nats::Subscriber,
    room: Arc<[u8]>,
    loops: Arc<[LoopInbox]>,
    mask: Arc<AtomicU64>,
    metrics: ClusterMetrics,
) {
    while let Some(message) = sub.next().await {
        let mask = mask.load(Ordering::SeqCst);
        if !fan(&loops, mask, &room, &message.payload, &metrics) {
            return;
        }
    }
}

/// Queues one message from the bus for each loop in `mask` (the same
/// bytes, shared), ringing each once per burst; a full queue drops it for
/// that loop, counted. Returns `false` once the loops are gone.
fn fan(
    loops: &[LoopInbox],
    mask: u64,
    room: &Arc<[u8]>,
    frame: &bytes::Bytes,
    metrics: &ClusterMetrics,
) -> bool {
    let mut alive = false;
    for (i, inbox) in loops.iter().enumerate() {
        if mask & (1 << i) == 0 {
            continue;
        }
        let m = Inbound {
            room: Arc::clone(room),
            frame: frame.clone(),
        };
        alive |= inbox.offer(m, metrics);
    }
    alive || mask == 0
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
            let got: Vec<bytes::Bytes> = rx[i].try_iter().map(|m| m.frame).collect();
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
}
