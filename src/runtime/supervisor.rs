//! The supervisor: what a server process owns once, however many loops it
//! runs — signals, the metrics endpoint, the ready file — and the threads
//! the loops run on.
//!
//! A loop knows nothing of signals: the supervisor turns SIGINT/SIGTERM
//! into each loop's [`ShutdownHandle`], waits for every loop to say goodbye
//! and return, and reports the first error. A second signal during that
//! shutdown exits the process at once with status 130. SIGHUP reloads the
//! settings ([`crate::runtime::reload`]): the supervisor reads and checks
//! them, and hands each loop its new hub settings through a channel and
//! its waker. Between signals it runs what must happen every few seconds
//! outside the loops ([`Supervisor::every`]: the relay's address watch).
//! With `--control` it also serves hand-overs ([`Supervisor::control`],
//! [`crate::runtime::handover`]): it pauses the loops, passes their sockets
//! and state on, and lets them return without `bye` (or resume); SIGUSR2
//! starts the process that takes over ([`crate::runtime::upgrade`]).

use std::io::{self, Write};
use std::net::SocketAddr;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::{mpsc, Arc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token, Waker};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR2};
use signal_hook_mio::v1_0::Signals;

use crate::config::{Config, ServeArgs};
use crate::error::Error;
use crate::net::activation;
use crate::runtime::event_loop::{EventLoop, Service, ShutdownHandle};
use crate::runtime::handover::{self, Control, Identity, Outcome};
use crate::runtime::notify::Notifier;
use crate::runtime::readiness::Readiness;
use crate::runtime::reload::{self, ReloadSender};
use crate::runtime::upgrade::{self, Upgrade};
use crate::runtime::watch::{self, AddressWatch};
use crate::runtime::{exporter, relay};

/// SIGINT/SIGTERM/SIGHUP/SIGUSR2, through signal-hook-mio's self-pipe.
const SIGNALS: Token = Token(0);
/// A loop thread ended (returned, failed or panicked).
const EXITED: Token = Token(1);
/// A connection on the hand-over control socket.
const CONTROL: Token = Token(2);

/// Exit status when a second signal interrupts a graceful shutdown
/// (128 + SIGINT, what shells report for an interrupted command).
pub const SECOND_SIGNAL_EXIT: i32 = 130;

/// Runs `udphub serve` with `config` (resolved from `args`): starts the
/// metrics endpoint, binds, writes the ready file, and relays until a
/// signal stops it. SIGHUP resolves `args` again (re-reading the
/// `--config` file and the room secret) and applies what can change live.
pub fn serve(args: ServeArgs, mut config: Config) -> Result<(), Error> {
    // Sockets a service manager passed, first: before the process opens a
    // descriptor of its own or starts a thread (the environment changes).
    let inherited = activation::take_from_env()?;
    // Signals next: from the moment the ready file says so, a SIGTERM
    // must mean a graceful shutdown, not the default kill.
    let mut supervisor = Supervisor::new()?;
    // SIGUSR2's successor runs the binary at the path this one was
    // started from: resolved now, before an upgrade replaces the file.
    let upgrade = Upgrade::prepare(config.control.as_deref());
    let notifier = match args.takeover {
        Some(_) => Notifier::from_env().successor(),
        None => Notifier::from_env(),
    };
    let readiness = Readiness::new(notifier);
    supervisor.report_to(readiness.clone());
    let activated = inherited.is_some();
    let (mut relays, claim, metrics) = match (&args.takeover, inherited) {
        (Some(_), Some(_)) => {
            return Err(Error::Config(
                "--takeover under socket activation: the sockets come from the running relay, not from the service manager; start the new process without the .socket unit's descriptors (or restart the service: the socket unit keeps the socket)".into(),
            ))
        }
        (Some(path), None) => take_over(path, &config, &readiness)?,
        (None, inherited) => {
            // The recorder must exist before the loop registers its metrics.
            let metrics = config
                .metrics
                .addr()
                .map(|addr| exporter::start_with(addr, Some(readiness.clone())))
                .transpose()?;
            let (relays, claim) = match inherited {
                Some(inherited) => {
                    let group = inherited.into_group(
                        config.loops(),
                        config.loop_recv_buffer(),
                        config.send_buffer,
                    )?;
                    let addr = group.claim.addr();
                    tracing::info!(
                        event = "socket_activation",
                        addr = %addr,
                        sockets = group.members.len(),
                        "socket activation: relaying on the socket{} the service manager passed, bound to {addr} (--bind {} is not used)",
                        if group.members.len() == 1 { "" } else { "s" },
                        config.bind
                    );
                    // What the logs, the ready file and the exposure check
                    // report from here on: the socket's own address.
                    config.bind = addr;
                    relay::on_group(&config, group)?
                }
                None => relay::bind_claimed(&config)?,
            };
            (relays, claim, metrics)
        }
    };
    for lp in &mut relays {
        lp.report_readiness(readiness.clone());
    }
    let mut address = AddressWatch::new(claim);
    // A lone socket (no SO_REUSEPORT) shares its address with nobody: the
    // kernel refuses every other bind to it.
    if relays.len() > 1 {
        supervisor.every(watch::CHECK_INTERVAL, Box::new(move || address.check()));
    }
    let cluster_keys = relays
        .first_mut()
        .and_then(|lp| lp.service_mut().cluster_keys());
    let loops: Vec<ReloadSender> = relays
        .iter_mut()
        .map(|lp| {
            let waker = lp.waker();
            lp.service_mut().reloads(waker)
        })
        .collect();
    let local = relays
        .first()
        .map(EventLoop::local_addr)
        .unwrap_or(config.bind);
    let metrics = metrics.map(|m| m.local_addr);
    // Once a process has taken over, the old one is gone: nothing but a
    // signal may stop this one now, whatever else fails.
    let taken_over = args.takeover.is_some();
    if let Some(path) = &config.control {
        let cluster = relays
            .first_mut()
            .and_then(|lp| lp.service_mut().cluster_handover());
        match Control::bind(path, &config, local, taken_over) {
            Ok(control) => supervisor.control(control.with_cluster(cluster)),
            Err(e) if taken_over => {
                tracing::error!(event = "control_failed", error = %e, "serving on without a control socket: {e}")
            }
            Err(e) => return Err(e),
        }
    }
    if let Some(addr) = metrics {
        tracing::info!(event = "metrics", addr = %addr, "metrics on http://{addr}/metrics");
    }
    if let Some(path) = &config.ready_file {
        match write_ready_file(path, "udp", local, metrics) {
            Ok(()) => {}
            Err(e) if taken_over => {
                tracing::error!(event = "ready_file_failed", error = %e, "serving on: {e}")
            }
            Err(e) => return Err(e),
        }
    }
    metrics::describe_counter!(
        "udphub_config_reloads_total",
        "SIGHUP reloads, by result: applied (the file was valid; restart-only changes were kept at their running values) or failed (the running configuration was kept)"
    );
    metrics::describe_gauge!(
        "udphub_config_last_reload_successful",
        "1 if the last reload (or the start) read a valid configuration, 0 if it failed"
    );
    metrics::gauge!("udphub_config_last_reload_successful").set(1.0);
    // Both series from the start, so that rate() and increase() see the
    // first reload.
    for result in ["applied", "failed"] {
        metrics::counter!("udphub_config_reloads_total", "result" => result).absolute(0);
    }
    publish_limits(&config);
    supervisor.upgrade(upgrade);
    let mut running = config;
    let on_hup = move || {
        reload_now(
            &args,
            &mut running,
            &loops,
            cluster_keys.as_ref(),
            activated,
        )
    };
    supervisor.run_reloading(relays, Some(Box::new(on_hup)))
}

/// How long a process that took over waits for the metrics address to be
/// free (the old process lets go of it as it exits, a moment after the
/// hand-over).
const METRICS_PATIENCE: Duration = Duration::from_secs(3);

/// `serve --takeover PATH`: the running relay's sockets and members,
/// taken over with `config`'s settings. The old relay resumes if anything
/// here fails before the confirmation; after it, this process serves
/// whatever else goes wrong (a metrics address still taken is logged).
fn take_over(
    path: &Path,
    config: &Config,
    readiness: &Readiness,
) -> Result<
    (
        Vec<relay::RelayLoop>,
        crate::net::holders::Claim,
        Option<exporter::Exporter>,
    ),
    Error,
> {
    if let Some(control) = config.control.as_deref() {
        // Refused now, while the old relay can still serve on.
        if std::fs::symlink_metadata(control).is_ok_and(|m| !m.file_type().is_socket()) {
            return Err(Error::Config(format!(
                "--control {}: the path exists and is not a socket; remove it or choose another path",
                control.display()
            )));
        }
    }
    let started = Instant::now();
    // The recorder before the loops register their metrics; the endpoint
    // once the old process has let go of its address.
    let recorder = config
        .metrics
        .addr()
        .map(|addr| exporter::install(addr).map(|r| (addr, r)))
        .transpose()?;
    // With --cluster, subscribed to the whole cluster before the old
    // relay stops taking messages from it: nothing published meanwhile is
    // missed (crate::cluster::handover).
    let early = match config.cluster() {
        Some(c) => {
            // Not worth a NATS connection if nobody serves there.
            if !std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
                return Err(Error::Config(format!(
                    "--takeover {}: no control socket there; is a udphub serving with --control {}?",
                    path.display(),
                    path.display()
                )));
            }
            Some(crate::cluster::handover::Early::connect(
                &c,
                handover::STEP_TIMEOUT,
            )?)
        }
        None => None,
    };
    // With --expect-clients, the tables are made and their memory written
    // now, before the old relay pauses: at a million members a third of
    // the registration's time was page faults.
    let warm = relay::warm_tables(config);
    let mut offer = handover::request(path, &Identity::of(config), config.max_clients)?;
    let fds = std::mem::take(&mut offer.fds);
    let received = started.elapsed();
    let (mut relays, claim, restored) =
        match relay::adopt(config, fds, &offer.snapshot, early, warm) {
            Ok(adopted) => adopted,
            Err(e) => {
                offer.fail(&e.to_string());
                return Err(e);
            }
        };
    // Subscribed on NATS since before the hello; the catch-up (the
    // rooms' own subscriptions, the replay) runs in the bridge while the
    // confirmation goes out and the loops start: it is not in the pause.
    let catch_up = relays
        .first_mut()
        .and_then(|lp| lp.service_mut().cluster_handover())
        .map(|port| port.start_catch_up());
    let (members, bytes) = (offer.snapshot.members(), offer.snapshot.len());
    let built = started.elapsed();
    offer.confirm()?;
    if let Some(answer) = catch_up {
        log_catch_up(answer);
    }
    tracing::info!(
        event = "took_over_steps",
        "take-over: offer received and decoded after {:.1} ms, loops built and members registered in {:.1} ms",
        received.as_secs_f64() * 1e3,
        (built - received).as_secs_f64() * 1e3
    );
    tracing::info!(
        event = "took_over",
        members = restored,
        handed = members,
        snapshot_bytes = bytes,
        took_ms = started.elapsed().as_secs_f64() * 1e3,
        "took over from {}: {restored} member(s) of {members} handed over (the rest had timed out), a {bytes}-byte snapshot, in {:.1} ms",
        path.display(),
        started.elapsed().as_secs_f64() * 1e3
    );
    let metrics = match recorder {
        Some((addr, recorder)) => {
            match exporter::serve_at(addr, recorder, METRICS_PATIENCE, Some(readiness.clone())) {
                Ok(m) => Some(m),
                Err(e) => {
                    tracing::error!(event = "metrics_failed", error = %e, "serving on without /metrics: {e}");
                    None
                }
            }
        }
        None => None,
    };
    Ok((relays, claim, metrics))
}

/// Logs how the cluster catch-up of a process that took over went, from a
/// thread of its own (the loops serve meanwhile).
fn log_catch_up(answer: mpsc::Receiver<Result<crate::cluster::handover::CaughtUp, String>>) {
    let patience = crate::cluster::handover::REQUEST_PATIENCE * 2;
    let spawned = std::thread::Builder::new()
        .name("udphub-catchup".into())
        .spawn(move || match answer.recv_timeout(patience) {
            Ok(Ok(c)) => tracing::info!(
                event = "cluster_caught_up",
                kept = c.kept,
                delivered = c.delivered,
                duplicate = c.duplicate,
                elsewhere = c.elsewhere,
                dropped = c.dropped,
                "take-over: caught up with the cluster: {} NATS message(s) kept while taking over, {} message(s) new to the members delivered, {} the old relay had delivered dropped, {} of rooms with no member here, {} over the bound dropped",
                c.kept, c.delivered, c.duplicate, c.elsewhere, c.dropped
            ),
            Ok(Err(why)) => tracing::error!(event = "cluster_catch_up_failed", reason = %why, "take-over: the cluster catch-up failed ({why}); serving on, messages of other nodes from before the rooms' subscriptions may be missed (counted as gaps)"),
            Err(_) => tracing::error!(event = "cluster_catch_up_failed", "take-over: the cluster bridge did not report its catch-up within {patience:?}; serving on"),
        });
    if let Err(e) = spawned {
        tracing::warn!(event = "cluster_catch_up_failed", error = %e, "take-over: cannot watch the cluster catch-up: {e}");
    }
}

/// Exports the caps the saturation alerts divide by (`udphub_clients /
/// udphub_max_clients`), at start and after each reload.
fn publish_limits(config: &Config) {
    metrics::describe_gauge!(
        "udphub_max_clients",
        "--max-clients: the most clients the table takes (saturation = udphub_clients / this)"
    );
    metrics::describe_gauge!(
        "udphub_max_rooms",
        "--max-rooms: the most named rooms at once (saturation = udphub_rooms / this)"
    );
    metrics::gauge!("udphub_max_clients").set(config.max_clients as f64);
    metrics::gauge!("udphub_max_rooms").set(config.max_rooms as f64);
}

/// SIGHUP: resolves the settings again and applies the live changes; a bad
/// file or secret keeps everything as it runs, and says why.
fn reload_now(
    args: &ServeArgs,
    running: &mut Config,
    loops: &[ReloadSender],
    cluster_keys: Option<&crate::cluster::keys::Keys>,
    activated: bool,
) {
    let source = match &args.config {
        Some(path) => format!("config file {}", path.display()),
        None => "flags and environment (no --config file: nothing can change)".to_string(),
    };
    tracing::info!(event = "reload", source = %source, "SIGHUP: reloading from {source}");
    let wanted = match Config::from_args(args) {
        // Socket activation: the address is the passed socket's, whatever
        // the file says (not a change a restart would make either).
        Ok(config) if activated => Config {
            bind: running.bind,
            ..config
        },
        Ok(config) => config,
        Err(e) => {
            metrics::counter!("udphub_config_reloads_total", "result" => "failed").increment(1);
            metrics::gauge!("udphub_config_last_reload_successful").set(0.0);
            tracing::error!(event = "reload_failed", error = %e, "reload failed, keeping the running configuration: {e}");
            return;
        }
    };
    let plan = reload::plan(running, wanted);
    for refused in &plan.refused {
        tracing::warn!(
            event = "reload_refused",
            setting = %refused.key,
            running = %refused.from,
            wanted = %refused.to,
            "reload: {refused}"
        );
    }
    if let Some(keys) = cluster_keys {
        keys.rotate(plan.config.cluster_key.clone(), Instant::now());
    }
    if !plan.changed.is_empty() {
        let hub = plan.config.hub();
        for lp in loops {
            lp.send(hub.clone());
        }
    }
    metrics::counter!("udphub_config_reloads_total", "result" => "applied").increment(1);
    metrics::gauge!("udphub_config_last_reload_successful").set(1.0);
    if plan.changed.is_empty() {
        tracing::info!(
            event = "reload_applied",
            changed = "",
            settings = "",
            "reload: nothing to change"
        );
    } else {
        let text: Vec<String> = plan.changed.iter().map(ToString::to_string).collect();
        let changed = text.join("; ");
        let settings: Vec<&str> = plan.changed.iter().map(|c| c.key.as_str()).collect();
        let settings = settings.join(",");
        tracing::info!(
            event = "reload_applied",
            changed = %changed,
            settings = %settings,
            "reload: applied {changed}"
        );
    }
    // Last, so that the lines above are logged at the level they were
    // asked at.
    if plan.log_level_changed(running) {
        match crate::runtime::logging::set_log_level(&plan.config.log_level) {
            Ok(Some(note)) => tracing::warn!(
                event = "log_level_lowered",
                log_level = %plan.config.log_level,
                "{note}"
            ),
            Ok(None) => {}
            Err(e) => tracing::error!(event = "reload_failed", error = %e, "reload: {e}"),
        }
    }
    publish_limits(&plan.config);
    *running = plan.config;
}

/// Writes where a server listens, once everything is bound: its socket as
/// `PROTO=ADDR` (`udp=…` for the relay and `udphub echo`, `tcp=…` for
/// `echo --tcp`) and `metrics=ADDR` (or `metrics=off`), one per line.
/// Written to a temporary file and renamed, so a reader never sees half of
/// it.
pub fn write_ready_file(
    path: &Path,
    proto: &str,
    addr: SocketAddr,
    metrics: Option<SocketAddr>,
) -> Result<(), Error> {
    let metrics = metrics.map_or("off".to_string(), |a| a.to_string());
    let text = format!("{proto}={addr}\nmetrics={metrics}\n");
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let fail =
        |e: io::Error| Error::Config(format!("cannot write --ready-file {}: {e}", path.display()));
    let mut file = std::fs::File::create(&tmp).map_err(fail)?;
    file.write_all(text.as_bytes()).map_err(fail)?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(fail)
}

/// One loop on its thread.
struct Running {
    /// Stops the loop.
    shutdown: ShutdownHandle,
    /// The thread; `None` once joined.
    thread: Option<JoinHandle<Result<(), Error>>>,
}

/// Tells the supervisor which loop thread is ending, however it ends (a
/// drop guard, so a panic tells it too). The thread is then a moment from
/// finished, so the supervisor joins it rather than asking
/// `is_finished()`, which may still be false when the wake-up arrives.
struct NotifyOnExit {
    /// The loop's index.
    index: usize,
    /// Where the index goes.
    ended: mpsc::Sender<usize>,
    /// Wakes the supervisor's poll.
    waker: Arc<Waker>,
    /// Told the loop ended (`/healthz` turns 503).
    readiness: Option<Readiness>,
}

impl Drop for NotifyOnExit {
    fn drop(&mut self) {
        if let Some(r) = &self.readiness {
            r.loop_ended();
        }
        let _ = self.ended.send(self.index);
        let _ = self.waker.wake();
    }
}

/// Signal handling, installed; the loops' threads, once running.
pub struct Supervisor {
    /// Waits for signals and loop exits.
    poll: Poll,
    /// SIGINT/SIGTERM/SIGHUP.
    signals: Signals,
    /// A periodic task, if any (the poll's timeout is its next run).
    periodic: Option<Periodic>,
    /// Told when loops start and end and when a signal stops them, if
    /// the server has probes.
    readiness: Option<Readiness>,
    /// The hand-over control socket (`--control`), if any.
    control: Option<Control>,
    /// What SIGUSR2 starts (`udphub serve` only; other servers log it).
    upgrade: Option<Upgrade>,
}

/// Something the supervisor runs every `interval` on its own thread.
struct Periodic {
    interval: Duration,
    next: Instant,
    run: Box<dyn FnMut()>,
}

impl Supervisor {
    /// Installs the signal handlers. Do this before telling anyone the
    /// server is ready.
    pub fn new() -> Result<Supervisor, Error> {
        let poll = Poll::new().map_err(|e| Error::io("create poll", e))?;
        let mut signals = install_signals()?;
        poll.registry()
            .register(&mut signals, SIGNALS, Interest::READABLE)
            .map_err(|e| Error::io("register signals", e))?;
        Ok(Supervisor {
            poll,
            signals,
            periodic: None,
            readiness: None,
            control: None,
            upgrade: None,
        })
    }

    /// Tells `readiness` how many loops run, when each starts and ends,
    /// and when a signal stops them (the probes and systemd read it).
    pub fn report_to(&mut self, readiness: Readiness) {
        self.readiness = Some(readiness);
    }

    /// Serves hand-overs on `control` while the loops run: a new process
    /// that takes over pauses them, and they exit (or resume if it fails).
    pub fn control(&mut self, control: Control) {
        self.control = Some(control);
    }

    /// Starts `upgrade` on each SIGUSR2 (a successor that takes over
    /// through the control socket, or a log line saying why not).
    pub fn upgrade(&mut self, upgrade: Upgrade) {
        self.upgrade = Some(upgrade);
    }

    /// Runs `task` every `interval` (first after one interval) on the
    /// supervisor's thread while the loops run; a second call replaces
    /// the first. It must be quick: signals wait while it runs.
    pub fn every(&mut self, interval: Duration, task: Box<dyn FnMut()>) {
        self.periodic = Some(Periodic {
            interval,
            next: Instant::now() + interval,
            run: task,
        });
    }

    /// Runs each loop on its own thread until a signal stops them all (or
    /// one fails, which stops the rest). Returns the first error. SIGHUP
    /// is logged and otherwise ignored (there is nothing to reload).
    pub fn run<S: Service + Send + 'static>(self, loops: Vec<EventLoop<S>>) -> Result<(), Error> {
        supervise(self, loops, None)
    }

    /// Like [`run`](Self::run), calling `on_hup` on each SIGHUP (on the
    /// supervisor's thread: the loops go on meanwhile).
    pub fn run_reloading<S: Service + Send + 'static>(
        self,
        loops: Vec<EventLoop<S>>,
        on_hup: Option<OnHup>,
    ) -> Result<(), Error> {
        supervise(self, loops, on_hup)
    }
}

/// What SIGHUP does.
pub type OnHup = Box<dyn FnMut()>;

fn supervise<S: Service + Send + 'static>(
    sup: Supervisor,
    loops: Vec<EventLoop<S>>,
    mut on_hup: Option<OnHup>,
) -> Result<(), Error> {
    let Supervisor {
        mut poll,
        mut signals,
        mut periodic,
        readiness,
        mut control,
        mut upgrade,
    } = sup;
    if let Some(r) = &readiness {
        r.expect_loops(loops.len());
    }
    let exited =
        Arc::new(Waker::new(poll.registry(), EXITED).map_err(|e| Error::io("create waker", e))?);
    let (ended_tx, ended) = mpsc::channel();
    let (reports_tx, reports) = mpsc::channel();
    let mut pauses = Vec::new();
    if let Some(c) = control.as_mut() {
        poll.registry()
            .register(c.listener_mut(), CONTROL, Interest::READABLE)
            .map_err(|e| Error::io("register the control socket", e))?;
    }

    let mut running = Vec::with_capacity(loops.len());
    for (i, mut lp) in loops.into_iter().enumerate() {
        if control.is_some() {
            pauses.push(lp.pause_handle(i, reports_tx.clone()));
        }
        let shutdown = lp.shutdown_handle();
        let guard = NotifyOnExit {
            index: i,
            ended: ended_tx.clone(),
            waker: Arc::clone(&exited),
            readiness: readiness.clone(),
        };
        let thread = thread::Builder::new()
            .name(format!("udphub-loop-{i}"))
            .spawn(move || {
                if let Some(r) = &guard.readiness {
                    r.loop_started();
                }
                let _guard = guard;
                lp.run()
            })
            .map_err(|e| Error::io("start a loop thread", e))?;
        running.push(Running {
            shutdown,
            thread: Some(thread),
        });
    }

    let mut events = Events::with_capacity(8);
    let mut stopping = false;
    let mut handed_over = false;
    let mut signals_seen = 0u32;
    let mut first_error = None;
    while running.iter().any(|r| r.thread.is_some()) {
        let mut timeout = periodic
            .as_ref()
            .map(|p| p.next.saturating_duration_since(Instant::now()));
        if control.as_ref().is_some_and(Control::pending) && !stopping {
            // Another connection may be waiting: look, after the signals.
            timeout = Some(Duration::ZERO);
        }
        match poll.poll(&mut events, timeout) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::io("poll", e)),
        }
        if let Some(p) = periodic.as_mut().filter(|p| Instant::now() >= p.next) {
            (p.run)();
            p.next = Instant::now() + p.interval;
        }
        let mut stop = false;
        let mut control_ready = false;
        for event in events.iter() {
            if event.token() == CONTROL {
                control_ready = true;
            }
            if event.token() == SIGNALS {
                for sig in signals.pending() {
                    if sig == SIGHUP {
                        match on_hup.as_mut() {
                            Some(reload) if !stopping => reload(),
                            Some(_) => tracing::info!("SIGHUP while shutting down: ignored"),
                            None => tracing::info!("SIGHUP: this server has no settings to reload"),
                        }
                        continue;
                    }
                    if sig == SIGUSR2 {
                        match upgrade.as_mut() {
                            Some(u) if !stopping => u.start(),
                            Some(_) => tracing::info!(
                                event = "upgrade_ignored",
                                "SIGUSR2 while shutting down: ignored"
                            ),
                            None => tracing::info!(
                                event = "upgrade_ignored",
                                "SIGUSR2: this server cannot hand over; ignored"
                            ),
                        }
                        continue;
                    }
                    signals_seen += 1;
                    if signals_seen >= 2 {
                        // The handlers' own check (see install_signals) can
                        // miss when two signals land on two threads at the
                        // same instant; this count cannot.
                        tracing::warn!(event = "signal", signal = %sig, "second signal ({sig}): exiting at once");
                        std::process::exit(SECOND_SIGNAL_EXIT);
                    }
                    tracing::info!(
                        event = "signal",
                        signal = sig,
                        "received signal {sig}; shutting down (again to exit at once)"
                    );
                    stop = true;
                }
            }
        }
        // A hand-over, after the signals: a stop asked for comes first.
        if let Some(c) = control.as_mut().filter(|_| !stop && !stopping) {
            if (control_ready || c.pending()) && c.accept(&pauses, &reports) == Outcome::HandedOver
            {
                // The loops are returning without a goodbye; the service
                // goes on in the successor (no STOPPING=1).
                handed_over = true;
                stopping = true;
                if let Some(r) = &readiness {
                    r.handed_over(upgrade::successor());
                }
            }
        }
        // Join whatever ended; an error (or panic) stops the others.
        for i in ended.try_iter() {
            if let Some(r) = running.get_mut(i) {
                let result = match r.thread.take().map(JoinHandle::join) {
                    Some(Ok(result)) => result,
                    Some(Err(_)) => Err(Error::io(
                        "relay loop",
                        io::Error::other("the loop thread panicked"),
                    )),
                    None => Ok(()),
                };
                if let Err(e) = result {
                    tracing::error!(event = "loop_failed", error = %e, "{e}");
                    first_error.get_or_insert(e);
                    stop = true;
                }
            }
        }
        if stop && !stopping {
            stopping = true;
            if let Some(r) = &readiness {
                r.shutting_down();
            }
            for r in &running {
                r.shutdown.shutdown();
            }
        }
    }
    // The loops can finish before the poll above saw a second signal that
    // came with the first (both pending when a stopped relay resumes, their
    // handlers on two threads at once): one last look before saying all
    // went well.
    if signals.pending().filter(|&sig| is_stop(sig)).any(|_| {
        signals_seen += 1;
        signals_seen >= 2
    }) {
        tracing::warn!("second signal: exiting at once");
        std::process::exit(SECOND_SIGNAL_EXIT);
    }
    if let Some(c) = control.as_ref().filter(|_| !handed_over) {
        c.remove();
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Whether `sig` asks the process to stop (SIGHUP and SIGUSR2 do not).
fn is_stop(sig: i32) -> bool {
    sig != SIGHUP && sig != SIGUSR2
}

/// Set by the first SIGINT/SIGTERM (in the handler, before the poll sees
/// it): what the second-signal escape hatch checks, and what a hand-over
/// checks before it lets go ([`stop_asked`]).
fn stop_flag() -> &'static Arc<AtomicBool> {
    static STOP: std::sync::OnceLock<Arc<AtomicBool>> = std::sync::OnceLock::new();
    STOP.get_or_init(|| Arc::new(AtomicBool::new(false)))
}

/// Whether a SIGINT/SIGTERM has arrived: a hand-over under way when it
/// does (the supervisor reads signals only between two) must not hand
/// the relay on to a successor that would serve on unasked.
pub(crate) fn stop_asked() -> bool {
    stop_flag().load(std::sync::atomic::Ordering::SeqCst)
}

/// SIGINT/SIGTERM/SIGHUP/SIGUSR2 for the poll, and the second-signal
/// escape hatch (SIGINT/SIGTERM only).
pub(crate) fn install_signals() -> Result<Signals, Error> {
    let fail = |e| Error::io("install signal handler", e);
    let second = Arc::clone(stop_flag());
    for sig in [SIGINT, SIGTERM] {
        // Exits at once if `second` is already set when the signal arrives…
        signal_hook::flag::register_conditional_shutdown(
            sig,
            SECOND_SIGNAL_EXIT,
            Arc::clone(&second),
        )
        .map_err(fail)?;
        // …which the first signal does (handlers run in registration order).
        signal_hook::flag::register(sig, Arc::clone(&second)).map_err(fail)?;
    }
    Signals::new([SIGINT, SIGTERM, SIGHUP, SIGUSR2]).map_err(fail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ready_file_names_both_addresses() {
        let dir = std::env::temp_dir().join(format!("udphub-ready-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ready");
        let udp: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        write_ready_file(&path, "udp", udp, Some("[::1]:9".parse().unwrap())).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "udp=127.0.0.1:4000\nmetrics=[::1]:9\n"
        );
        write_ready_file(&path, "tcp", udp, None).unwrap();
        assert!(std::fs::read_to_string(&path)
            .unwrap()
            .starts_with("tcp=127.0.0.1:4000\n"));
        assert!(std::fs::read_to_string(&path)
            .unwrap()
            .ends_with("metrics=off\n"));
        let err = write_ready_file(&dir.join("no/such/dir/ready"), "udp", udp, None).unwrap_err();
        assert!(
            err.is_usage() && err.to_string().contains("--ready-file"),
            "{err}"
        );
    }
}
