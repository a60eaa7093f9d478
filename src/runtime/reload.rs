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

use crate::cluster::keys::KEY_GRACE;
use crate::config::declare::Reload;
use crate::config::Config;
use crate::core::hub::HubConfig;

/// What a reload does: the configuration to run from now on, what changes
/// live, and what was refused (kept at its running value).
#[derive(Debug)]
pub struct Plan {
    /// The running configuration with the live changes applied.
    pub config: Config,
    /// The live changes (`timeout 10s → 5s`).
    pub changed: Vec<Change>,
    /// The changes that need a restart, each kept at its running value.
    pub refused: Vec<Change>,
}

/// One setting a reload changes or refuses: in words for the text log,
/// and by name and values for the JSON log's fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The setting's key (`timeout`, `room-secret-file`).
    pub key: String,
    /// Its running value, in words (never a secret: `set`, `unset`).
    pub from: String,
    /// The value the reload read, in words.
    pub to: String,
    /// The whole note (`timeout 10s → 5s`).
    pub text: String,
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// A [`Change`] of a secret (the room secret, the cluster key): never the
/// secret itself, nor anything derived from it; only whether it is set.
fn secret_change(key: &str, from: bool, to: bool, text: String) -> Change {
    let said = |set: bool| if set { "set" } else { "unset" };
    Change {
        key: key.to_string(),
        from: said(from).to_string(),
        to: if from && to { "replaced" } else { said(to) }.to_string(),
        text,
    }
}

impl Plan {
    /// Whether the log filter changes.
    pub fn log_level_changed(&self, running: &Config) -> bool {
        self.config.log_level != running.log_level
    }
}

/// Compares the running configuration with the one just read and says what
/// a reload does: each setting's declaration says whether it may change
/// live ([`Reload`]); the others keep their running values.
pub fn plan(running: &Config, wanted: Config) -> Plan {
    let mut changed = Vec::new();
    let mut refused = Vec::new();
    for d in running.differences(&wanted) {
        let change = |text: String| Change {
            key: d.key.to_string(),
            from: d.from.to_string(),
            to: d.to.to_string(),
            text,
        };
        match d.reload {
            Reload::Live => changed.push(change(format!("{} {} → {}", d.key, d.from, d.to))),
            Reload::Restart => refused.push(change(format!(
                "{} {} → {} needs a restart; keeping {}",
                d.key, d.from, d.to, d.from
            ))),
        }
    }
    let mut config = wanted;
    config.keep_restart_only(running);
    let (was, is) = (&running.room_secret, &config.room_secret);
    let secret =
        |text: &str| secret_change("room-secret-file", was.is_some(), is.is_some(), text.into());
    match (was, is) {
        (None, None) => {}
        (Some(a), Some(b)) if a.same_as(b) => {}
        // Never the secret itself, nor anything derived from it.
        (None, Some(_)) => changed.push(secret("room secret: set (named rooms now need a token)")),
        (Some(_), None) => changed.push(secret(
            "room secret: removed (named rooms are open to anyone)",
        )),
        (Some(_), Some(_)) => changed.push(secret(
            "room secret: replaced (tokens signed with the old one are refused from now on)",
        )),
    }
    let (was, is) = (&running.cluster_key, &config.cluster_key);
    let key = |text: String| secret_change("cluster-key-file", was.is_some(), is.is_some(), text);
    match (was, is) {
        (None, None) => {}
        (Some(a), Some(b)) if a.same_as(b) => {}
        (None, Some(_)) => changed.push(key(format!(
            "cluster key: set (batches are signed from now on; unsigned ones are still accepted for {}s)",
            KEY_GRACE.as_secs()
        ))),
        (Some(_), None) => changed.push(key(format!(
            "cluster key: removed (batches go unsigned; signed ones are still checked for {}s, then taken unchecked)",
            KEY_GRACE.as_secs()
        ))),
        (Some(_), Some(_)) => changed.push(key(format!(
            "cluster key: replaced (the new one signs; the old one is still accepted for {}s)",
            KEY_GRACE.as_secs()
        ))),
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
            client_rate: Some(50.0),
            log_level: "warn".into(),
            ..Config::default()
        };
        let plan = plan(&running, wanted);
        let text = |c: &[Change]| c.iter().map(ToString::to_string).collect::<Vec<_>>();
        assert_eq!(
            text(&plan.changed),
            vec![
                "timeout 10s → 5s".to_string(),
                "max-clients 1000000 → 10".to_string(),
                "log-level info → warn".to_string(),
                "client-rate no limit → 50".to_string(),
            ]
        );
        assert_eq!(plan.refused.len(), 2, "{:?}", plan.refused);
        assert!(plan.refused[0]
            .text
            .starts_with("bind 127.0.0.1:9999 → 127.0.0.1:1234 needs a restart"));
        assert!(plan.refused[1].text.contains("max-datagram 1472 → 512"));
        // By name and values too, for the JSON log's fields.
        let bind = &plan.refused[0];
        assert_eq!(
            (bind.key.as_str(), bind.from.as_str(), bind.to.as_str()),
            ("bind", "127.0.0.1:9999", "127.0.0.1:1234")
        );
        assert_eq!(plan.config.bind, running.bind);
        assert_eq!(plan.config.max_datagram, 1472);
        assert_eq!(plan.config.timeout, Duration::from_secs(5));
        assert!(plan.log_level_changed(&running));
        // The number of loops is fixed: the kernel would move clients.
        let plan = super::plan(
            &running,
            Config {
                threads: crate::config::Threads::Count(4),
                ..Config::default()
            },
        );
        assert_eq!(plan.config.loops(), 1);
        assert_eq!(
            text(&plan.refused),
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
        let c = &rotated.changed[0];
        assert!(c.text.starts_with("room secret: replaced"));
        assert_eq!(
            (c.key.as_str(), c.from.as_str(), c.to.as_str()),
            ("room-secret-file", "set", "replaced")
        );
        assert!(!format!("{c:?}").contains("bbbb"));
    }
}
