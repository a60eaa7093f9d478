//! The bridge thread: the only place that talks to NATS.
//!
//! A current-thread tokio runtime runs the async-nats client (reconnects
//! and resubscribes by itself), one task per subscribed room that forwards
//! its messages to the loop, and a loop over the publish and control
//! queues. Nothing here can stall the relay's loop: the loop only ever
//! `try_send`s to it, and the bridge only `try_send`s back (a full inbound
//! queue drops and counts) and rings the loop's waker once per burst.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;

use super::{BusDrop, ClusterConfig, ClusterMetrics, Control, Inbound, Publish};
use crate::error::Error;

/// What the bridge thread owns.
pub struct Bridge {
    /// Where to connect, and as whom.
    pub config: ClusterConfig,
    /// Messages to publish, from the loop.
    pub publish: tokio::sync::mpsc::Receiver<Publish>,
    /// Subscriptions to make and drop, from the loop.
    pub control: Arc<Control>,
    /// Messages from the bus, to the loop.
    pub inbound: mpsc::SyncSender<Inbound>,
    /// Rings the loop.
    pub waker: Arc<mio::Waker>,
    /// Set when the loop has been rung and has not drained yet.
    pub wake_pending: Arc<AtomicBool>,
    /// Whether NATS is connected (read by the loop before publishing).
    pub connected: Arc<AtomicBool>,
    /// Counters.
    pub metrics: ClusterMetrics,
}

/// Starts the bridge thread. It ends when the loop drops its side.
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
    let events = {
        let log = Arc::clone(&log);
        let trouble = trouble.clone();
        move |event: async_nats::Event| {
            let (connected, log, said, gauge, servers, trouble) = (
                Arc::clone(&connected),
                Arc::clone(&log),
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
                    None if matches!(event, async_nats::Event::ClientError(_)) => {
                        let why = trouble.take().unwrap_or_else(|| event.to_string());
                        if let Ok(mut l) = log.lock() {
                            l.log(false, &format!("cannot connect to NATS ({servers}): {why}"));
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
    let mut subscriptions: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
    loop {
        tokio::select! {
            biased;
            () = b.control.changed.notified() => {
                let mut changes = Vec::new();
                b.control.rooms.take(|room, open| changes.push((room, open)));
                for (room, open) in changes {
                    let subject = super::subject(&b.config.name, &room);
                    if !open {
                        // Dropping the subscriber (with its task) unsubscribes.
                        if let Some(task) = subscriptions.remove(&subject) {
                            task.abort();
                        }
                        continue;
                    }
                    match client.subscribe(subject.clone()).await {
                        Ok(sub) => {
                            let room: Arc<[u8]> = room.into();
                            let task = tokio::spawn(forward(sub, room, b.inbound.clone(), Arc::clone(&b.waker), Arc::clone(&b.wake_pending), b.metrics.clone()));
                            if let Some(old) = subscriptions.insert(subject, task) {
                                old.abort();
                            }
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

/// Forwards one room's messages to the loop, ringing it when it was not
/// rung already.
async fn forward(
    mut sub: async_nats::Subscriber,
    room: Arc<[u8]>,
    inbound: mpsc::SyncSender<Inbound>,
    waker: Arc<mio::Waker>,
    wake_pending: Arc<AtomicBool>,
    metrics: ClusterMetrics,
) {
    while let Some(message) = sub.next().await {
        let m = Inbound {
            room: Arc::clone(&room),
            frame: message.payload,
        };
        match inbound.try_send(m) {
            Ok(()) => {}
            Err(mpsc::TrySendError::Full(_)) => {
                metrics.drop_one(BusDrop::InboundFull);
                continue;
            }
            Err(mpsc::TrySendError::Disconnected(_)) => return,
        }
        if !wake_pending.swap(true, Ordering::SeqCst) {
            if let Err(e) = waker.wake() {
                tracing::warn!("cluster: cannot wake the loop: {e}");
            }
        }
    }
}
