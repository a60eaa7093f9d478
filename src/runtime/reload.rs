//! Reloading `udphub serve` on SIGHUP: which settings a running relay can
//! take, which need a restart, and the plan that says which is which.
//!
//! The plan is pure: reading the files again is [`Config::from_args`]'s
//! job, applying the plan is the loops' ([`crate::core::hub::Hub::reconfigure`],
//! through [`ReloadSender`]) and the logger's. A setting that cannot change
//! live keeps its running value and is named in a warning, so the relay
//! never half-applies a file: what it runs is always a valid [`Config`].
//!
//! Flags and environment variables were read once, at start, and still
//! rank above the file: to change a setting by reload, set it in the file
//! only.

use std::sync::mpsc;
use std::sync::Arc;

use mio::Waker;

use crate::cli::config::Config;
use crate::core::hub::HubConfig;

/// What a reload does: the configuration to run from now on, what changes
/// live, and what was refused (kept at its running value).
#[derive(Debug)]
pub struct Plan {
    /// The running configuration with the live changes applied.
    pub config: Config,
    /// The live changes, in words (`timeout 10s → 5s`).
    pub changed: Vec<String>,
    /// The changes that need a restart, in words, each kept at its running
    /// value.
    pub refused: Vec<String>,
}

impl Plan {
    /// Whether the log filter changes.
    pub fn log_level_changed(&self, running: &Config) -> bool {
        self.config.log_level != running.log_level
    }
}

/// Compares the running configuration with the one just read and says what
/// a reload does.
pub fn plan(running: &Config, wanted: Config) -> Plan {
    let mut changed = Vec::new();
    let mut refused = Vec::new();
    let mut config = wanted;

    // Restart-only: the socket, its buffers and receive batch, the
    // endpoints, verify mode's key and the cluster link are made once.
    macro_rules! restart_only {
        ($field:ident, $name:literal, $show:expr) => {
            if config.$field != running.$field {
                let show = $show;
                refused.push(format!(
                    "{} {} → {} needs a restart; keeping {}",
                    $name,
                    show(&running.$field),
                    show(&config.$field),
                    show(&running.$field)
                ));
                config.$field = running.$field.clone();
            }
        };
    }
    let addr = |a: &std::net::SocketAddr| a.to_string();
    let opt_addr = |a: &Option<std::net::SocketAddr>| a.map_or("off".into(), |a| a.to_string());
    let num = |n: &usize| n.to_string();
    restart_only!(bind, "bind", addr);
    restart_only!(metrics, "metrics", opt_addr);
    restart_only!(recv_buffer, "recv-buffer", num);
    restart_only!(send_buffer, "send-buffer", num);
    restart_only!(max_datagram, "max-datagram", num);
    restart_only!(expect_clients, "expect-clients", num);
    restart_only!(threads, "threads", num);
    restart_only!(pin_threads, "pin-threads", |b: &bool| b.to_string());
    restart_only!(verify_sources, "verify-sources", |b: &bool| b.to_string());
    restart_only!(log_format, "log-format", |f: &crate::cli::LogFormat| {
        format!("{f:?}").to_lowercase()
    });
    restart_only!(ready_file, "ready-file", |p: &Option<
        std::path::PathBuf,
    >| p
        .as_ref()
        .map_or("none".into(), |p| p.display().to_string()));
    restart_only!(cluster, "cluster", |c: &Option<
        crate::cluster::ClusterConfig,
    >| c.as_ref().map_or(
        "off".into(),
        |c| format!(
            "{} (name {}, node {})",
            c.servers.join(","),
            c.name,
            c.node_id
        )
    ));

    // Live.
    macro_rules! live {
        ($field:ident, $name:literal, $show:expr) => {
            if config.$field != running.$field {
                let show = $show;
                changed.push(format!(
                    "{} {} → {}",
                    $name,
                    show(&running.$field),
                    show(&config.$field)
                ));
            }
        };
    }
    let dur = |d: &std::time::Duration| humantime::format_duration(*d).to_string();
    live!(timeout, "timeout", dur);
    live!(format, "format", |t: &crate::core::protocol::Template| {
        format!("{:?}", t.spec())
    });
    live!(echo, "echo", |b: &bool| b.to_string());
    live!(max_clients, "max-clients", num);
    live!(max_rooms, "max-rooms", num);
    live!(max_room_clients, "max-room-clients", num);
    live!(lobby_open, "lobby", |b: &bool| if *b {
        "open"
    } else {
        "closed"
    }
    .to_string());
    live!(cookie_rate, "cookie-rate", |r: &f64| r.to_string());
    live!(client_rate, "client-rate", |r: &Option<(f64, f64)>| r
        .map_or("off".into(), |(rate, burst)| format!(
            "{rate}/s burst {burst}"
        )));
    live!(max_clients_per_ip, "max-clients-per-ip", |n: &Option<
        u32,
    >| n
        .map_or("off".into(), |n| n.to_string()));
    live!(log_level, "log-level", |s: &String| s.clone());
    match (&running.room_secret, &config.room_secret) {
        (None, None) => {}
        (Some(a), Some(b)) if a.same_as(b) => {}
        // Never the secret itself, nor anything derived from it.
        (None, Some(_)) => changed.push("room secret: set (named rooms now need a token)".into()),
        (Some(_), None) => {
            changed.push("room secret: removed (named rooms are open to anyone)".into())
        }
        (Some(_), Some(_)) => changed.push(
            "room secret: replaced (tokens signed with the old one are refused from now on)".into(),
        ),
    }
    Plan {
        config,
        changed,
        refused,
    }
}

/// Hands a loop its new hub settings and wakes it (it applies them
/// between two batches, so no datagram sees half a change).
#[derive(Debug, Clone)]
pub struct ReloadSender {
    /// To the loop's [`ReloadReceiver`].
    tx: mpsc::Sender<HubConfig>,
    /// The loop's waker.
    waker: Arc<Waker>,
}

/// A loop's end of its [`ReloadSender`].
#[derive(Debug)]
pub struct ReloadReceiver {
    /// From the supervisor.
    rx: mpsc::Receiver<HubConfig>,
}

/// A channel for one loop's reloads; `waker` wakes that loop.
pub fn channel(waker: Arc<Waker>) -> (ReloadSender, ReloadReceiver) {
    let (tx, rx) = mpsc::channel();
    (ReloadSender { tx, waker }, ReloadReceiver { rx })
}

impl ReloadSender {
    /// Sends `config` to the loop and wakes it. Returns false if the loop
    /// has ended.
    pub fn send(&self, config: HubConfig) -> bool {
        self.tx.send(config).is_ok() && self.waker.wake().is_ok()
    }
}

impl ReloadReceiver {
    /// The newest settings sent since the last look, if any.
    pub fn latest(&self) -> Option<HubConfig> {
        self.rx.try_iter().last()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn live_settings_change_and_the_rest_is_kept_and_named() {
        let running = Config::default();
        let wanted = Config {
            timeout: Duration::from_secs(5),
            bind: "127.0.0.1:1234".parse().unwrap(),
            max_datagram: 512,
            max_clients: 10,
            client_rate: Some((50.0, 100.0)),
            log_level: "warn".into(),
            ..Config::default()
        };
        let plan = plan(&running, wanted);
        assert_eq!(
            plan.changed,
            vec![
                "timeout 10s → 5s".to_string(),
                "max-clients 1000000 → 10".to_string(),
                "client-rate off → 50/s burst 100".to_string(),
                "log-level info → warn".to_string(),
            ]
        );
        assert_eq!(plan.refused.len(), 2, "{:?}", plan.refused);
        assert!(plan.refused[0].starts_with("bind 127.0.0.1:9999 → 127.0.0.1:1234 needs a restart"));
        assert!(plan.refused[1].contains("max-datagram 1472 → 512"));
        assert_eq!(plan.config.bind, running.bind);
        assert_eq!(plan.config.max_datagram, 1472);
        assert_eq!(plan.config.timeout, Duration::from_secs(5));
        assert!(plan.log_level_changed(&running));
        // The number of loops is fixed: the kernel would move clients.
        let plan = super::plan(
            &running,
            Config {
                threads: 4,
                ..Config::default()
            },
        );
        assert_eq!(plan.config.threads, 1);
        assert_eq!(
            plan.refused,
            vec!["threads 1 → 4 needs a restart; keeping 1".to_string()]
        );
    }

    #[test]
    fn a_new_room_secret_is_named_but_never_shown() {
        use crate::core::token::RoomSecret;
        let secret = |b: u8| RoomSecret::new(vec![b; 32]).unwrap();
        let running = Config {
            room_secret: Some(secret(b'a')),
            ..Config::default()
        };
        let same = plan(
            &running,
            Config {
                room_secret: Some(secret(b'a')),
                ..Config::default()
            },
        );
        assert!(same.changed.is_empty() && same.refused.is_empty());
        let rotated = plan(
            &running,
            Config {
                room_secret: Some(secret(b'b')),
                ..Config::default()
            },
        );
        assert_eq!(rotated.changed.len(), 1);
        assert!(rotated.changed[0].starts_with("room secret: replaced"));
        assert!(!rotated.changed[0].contains("bbbb"));
    }
}
