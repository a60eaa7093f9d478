//! The configuration of `udphub serve`: every setting from its flag, its
//! `UDPHUB_*` environment variable, the `--config` TOML file, or its
//! default — in that order, for every setting — checked once, here, into a
//! [`Config`] the runtime uses without further checks.
//!
//! It sits below the runtime (it may use the core, never the runtime or
//! net), so the supervisor, the relay and the reload can all take a
//! `Config` without reaching up into the command line.
//!
//! - [`settings`]: **every setting, declared once** — where a new one goes.
//! - [`declare`]: what a declaration turns into (the macro).
//! - [`values`]: the settings' types and their parsers (one per type, shared
//!   by flag, environment and file).
//! - [`cluster_key`]: the cluster key (`--cluster-key-file`), never shown.
//! - [`file`](mod@file): reading the `--config` file and the room secret file, with
//!   errors that name the line, the key and what was expected.
//! - [`tls`]: the TLS files for NATS (`--cluster-ca`, `--cluster-cert`),
//!   read and checked at start.
//! - [`validate`]: each setting's check and the rules between settings.
//! - [`summary`]: `--check-config`'s line and the docs' settings table.
//! - [`logging`]: the log settings' rules (installing the logger is the
//!   runtime's).

use std::path::PathBuf;

pub mod cluster_key;
pub mod declare;
pub mod file;
pub mod logging;
pub mod settings;
pub mod summary;
pub mod tls;
pub mod validate;
pub mod values;

pub use cluster_key::{read_cluster_key, ClusterKey};
pub use file::read_secret;
pub use logging::LogFormat;
pub use settings::{Config, Layer};
pub use tls::ClusterTls;
pub use validate::MAX_THREADS;
pub use values::{
    parse_addr, parse_duration, parse_metrics, Lobby, MetricsAddr, NatsLogin, Threads,
    DEFAULT_FANOUT_SLICE, DEFAULT_MAX_DATAGRAM, DEFAULT_SEND_BACKLOG, DEFAULT_SOCKET_BUFFER,
    MAX_SOCKET_BUFFER, MAX_UDP_PAYLOAD, RECV_BUFFER_PER_EXPECTED_CLIENT,
};

use crate::core::hub::HubConfig;
use crate::error::Error;

/// `udphub serve`'s command line: the config file, `--check-config`, and a
/// flag for every setting (each optional, so that the environment, the file
/// and the defaults can fill what the flags leave out).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServeArgs {
    /// TOML file with any of the settings below (keys are the flag names).
    #[arg(long, env = "UDPHUB_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Check the settings (flags, environment, --config file, secret files), print them in one line and exit: 0 if the relay would start with them, 2 and the reason if not
    #[arg(long)]
    pub check_config: bool,

    /// Take over from the udphub serving on this --control socket: its UDP sockets and members pass to this process, which then serves with its own settings (the same --bind and --threads) while the other exits without a goodbye
    #[arg(long, value_name = "PATH")]
    pub takeover: Option<PathBuf>,

    /// The settings the flags and their environment variables give.
    #[command(flatten)]
    pub settings: Layer,
}

/// The cluster settings together (`--cluster` and its companions), for
/// the cluster bridge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// NATS servers (`nats://host:port`, `tls://host:port`), tried in
    /// turn; never with a password in them (see `login`).
    pub servers: Vec<String>,
    /// The user and password the URLs named, if any.
    pub login: Option<NatsLogin>,
    /// TLS, if a URL is `tls://` or a TLS file was given: then the
    /// connection must be TLS, to every server, learnt ones included.
    pub tls: Option<ClusterTls>,
    /// Subject prefix: relays with the same name share rooms.
    pub name: String,
    /// This node's name on the bus (the NATS connection name).
    pub node_id: String,
    /// A NATS credentials file, if the servers need one.
    pub credentials: Option<PathBuf>,
    /// The key batches are tagged with, if any (a reload rotates it
    /// through [`crate::cluster::keys::Keys`], not through this).
    pub key: Option<ClusterKey>,
    /// `--max-datagram`: bounds the rendered messages on the bus.
    pub max_datagram: usize,
}

impl Config {
    /// Resolves every setting — flag (or its environment variable), else
    /// the `--config` file, else what `--public` presets, else the default
    /// — reads the room secret, and validates the result: the one place
    /// settings are checked. Run again on each reload.
    pub fn from_args(args: &ServeArgs) -> Result<Config, Error> {
        let file = match &args.config {
            Some(path) => file::read_file(path)?,
            None => Layer::default(),
        };
        let given = args.settings.clone().or(file);
        if given.cluster.is_none()
            && (given.cluster_name.is_some()
                || given.node_id.is_some()
                || given.cluster_credentials.is_some()
                || given.cluster_ca.is_some()
                || given.cluster_cert.is_some()
                || given.cluster_cert_key.is_some()
                || given.cluster_key_file.is_some())
        {
            return Err(Error::Config(
                "--cluster-name, --node-id, --cluster-credentials, --cluster-ca, --cluster-cert, --cluster-cert-key and --cluster-key-file need --cluster nats://HOST:PORT".into(),
            ));
        }
        let preset = if given.public == Some(true) {
            Layer::public_preset()
        } else {
            Layer::default()
        };
        let mut config = Config::from_layer(given.or(preset));
        config.room_secret = config
            .room_secret_file
            .as_deref()
            .map(|path| read_secret(path, "--room-secret-file"))
            .transpose()?;
        if let Some(urls) = &config.cluster {
            config.cluster_tls = ClusterTls::read(
                config.cluster_ca.as_ref(),
                config.cluster_cert.as_ref(),
                config.cluster_cert_key.as_ref(),
                urls.wants_tls(),
            )?;
        }
        config.cluster_key = config
            .cluster_key_file
            .as_deref()
            .map(read_cluster_key)
            .transpose()?;
        config.validate()?;
        Ok(config)
    }

    /// How many loops `--threads` comes to on this machine.
    pub fn loops(&self) -> usize {
        self.threads.resolve().max(1)
    }

    /// The SO_RCVBUF each loop's socket asks for: `--recv-buffer`, or,
    /// left at its default, [`RECV_BUFFER_PER_EXPECTED_CLIENT`] bytes per
    /// client the loop expects (`--expect-clients` split over the loops)
    /// when that is more.
    pub fn loop_recv_buffer(&self) -> usize {
        if self.recv_buffer != DEFAULT_SOCKET_BUFFER {
            return self.recv_buffer;
        }
        let expected = self.expect_clients.div_ceil(self.loops());
        expected
            .saturating_mul(RECV_BUFFER_PER_EXPECTED_CLIENT)
            .clamp(DEFAULT_SOCKET_BUFFER, MAX_SOCKET_BUFFER)
    }

    /// `--client-rate` with its burst (twice the rate unless
    /// `--client-burst` says), if clients are rate limited.
    pub fn client_rate(&self) -> Option<(f64, f64)> {
        self.client_rate
            .map(|rate| (rate, self.client_burst.unwrap_or(2.0 * rate)))
    }

    /// The cluster settings, if the relay is in a cluster.
    pub fn cluster(&self) -> Option<ClusterConfig> {
        self.cluster.as_ref().map(|servers| ClusterConfig {
            servers: servers.servers.clone(),
            login: servers.login.clone(),
            tls: self.cluster_tls.clone(),
            name: self.cluster_name.clone(),
            node_id: self.node_id.clone(),
            credentials: self.cluster_credentials.clone(),
            key: self.cluster_key.clone(),
            max_datagram: self.max_datagram,
        })
    }

    /// What each loop's hub needs of these settings. With several loops
    /// the table reservation is split between them evenly, rounded up (a
    /// loop's clients are its own); the caps are the relay's, counted
    /// across loops (see [`crate::core::census`]).
    pub fn hub(&self) -> HubConfig {
        HubConfig {
            timeout: self.timeout,
            format: self.format.clone(),
            echo: !self.no_echo,
            max_clients: self.max_clients,
            expect_clients: self.expect_clients.div_ceil(self.loops()),
            max_datagram: self.max_datagram,
            max_rooms: self.max_rooms,
            max_room_clients: self.max_room_clients,
            room_secret: self.room_secret.clone(),
            lobby_open: self.lobby == Lobby::Open,
            // Drawn from the OS by the runtime when verify mode is on.
            cookie_key: None,
            cookie_rate: self.cookie_rate,
            client_rate: self.client_rate(),
            max_clients_per_ip: self.max_clients_per_ip,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::protocol::Template;
    use clap::Parser;
    use std::time::Duration;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn args(a: &[&str]) -> ServeArgs {
        T::try_parse_from(std::iter::once("t").chain(a.iter().copied()))
            .unwrap()
            .serve
    }

    fn file(name: &str, text: &str) -> String {
        let dir = std::env::temp_dir().join(format!("udphub-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_string()
    }

    #[test]
    fn defaults_match_the_design() {
        let c = Config::from_args(&ServeArgs::default()).unwrap();
        assert_eq!(c.bind.to_string(), "127.0.0.1:9999");
        assert_eq!(c.metrics.addr().unwrap().to_string(), "127.0.0.1:9898");
        assert_eq!(c.timeout, Duration::from_secs(10));
        assert_eq!(c.format, Template::default());
        assert!(c.hub().echo);
        assert_eq!(c.max_datagram, 1472);
        assert_eq!(c.max_clients, 1_000_000);
        assert_eq!(c.loops(), 1);
        assert!(c.cluster().is_none() && c.client_rate().is_none());
    }

    /// The receive buffer grows with the clients a loop expects, only
    /// while `--recv-buffer` is left at its default.
    #[test]
    fn the_receive_buffer_follows_the_expected_clients() {
        let buffer = |a: &[&str]| Config::from_args(&args(a)).unwrap().loop_recv_buffer();
        assert_eq!(buffer(&[]), 8 << 20);
        assert_eq!(buffer(&["--expect-clients", "1000000"]), 8 << 20);
        let big = ["--expect-clients", "10000000", "--max-clients", "12000000"];
        assert_eq!(buffer(&big), 40_000_000);
        let two: Vec<&str> = big.iter().copied().chain(["--threads", "2"]).collect();
        assert_eq!(buffer(&two), 20_000_000);
        let set: Vec<&str> = big
            .iter()
            .copied()
            .chain(["--recv-buffer", "65536"])
            .collect();
        assert_eq!(buffer(&set), 65536);
    }

    /// A cluster node may use every core: `--cluster` with `--threads`
    /// is accepted (it was refused before one bridge served every loop).
    #[test]
    fn a_cluster_node_may_have_several_loops() {
        let c = Config::from_args(&args(&[
            "--cluster",
            "nats://127.0.0.1:4222",
            "--threads",
            "2",
        ]))
        .unwrap();
        assert_eq!(c.loops(), 2);
        assert!(c.cluster().is_some());
    }

    #[test]
    fn flags_beat_the_file_which_beats_defaults() {
        let p = file(
            "a.toml",
            "bind = \"[::1]:7000\"\ntimeout = \"3s\"\nmetrics = \"off\"\nno-echo = true\nmax-clients = 5\n",
        );
        let c = Config::from_args(&args(&["--config", &p, "--timeout", "250ms"])).unwrap();
        assert_eq!(c.bind.to_string(), "[::1]:7000");
        assert_eq!(c.timeout, Duration::from_millis(250));
        assert_eq!(c.metrics, MetricsAddr::Off);
        assert!(c.no_echo);
        assert_eq!(c.max_clients, 5);
        assert_eq!(c.max_datagram, 1472);
        // An explicit false wins over the file's true, bare means true.
        let c = Config::from_args(&args(&["--config", &p, "--no-echo=false"])).unwrap();
        assert!(!c.no_echo);
        let c = Config::from_args(&args(&["--no-echo"])).unwrap();
        assert!(c.no_echo);
    }

    #[test]
    fn public_presets_only_what_is_not_set() {
        let c = Config::from_args(&args(&["--public"])).unwrap();
        assert!(c.verify_sources);
        assert_eq!(c.client_rate(), Some((200.0, 400.0)));
        assert_eq!(c.max_clients_per_ip, Some(64));
        let p = file("public.toml", "public = true\nverify-sources = false\n");
        let c = Config::from_args(&args(&["--config", &p, "--client-rate", "10"])).unwrap();
        assert!(!c.verify_sources);
        assert_eq!(c.client_rate(), Some((10.0, 20.0)));
        assert_eq!(c.max_clients_per_ip, Some(64));
    }

    #[test]
    fn bad_values_get_one_line_reasons() {
        let bogus = file("bad.toml", "bogus = 1\n");
        let cases: Vec<(ServeArgs, &str)> = vec![
            (args(&["--max-datagram", "0"]), "--max-datagram"),
            (args(&["--max-datagram", "70000"]), "--max-datagram"),
            (args(&["--max-clients", "0"]), "--max-clients"),
            (
                args(&["--max-clients", "10", "--expect-clients", "11"]),
                "--expect-clients",
            ),
            (args(&["--timeout", "0s"]), "--timeout"),
            (args(&["--log-level", "=="]), "--log-level"),
            (args(&["--client-rate", "0.2"]), "--client-burst"),
            (args(&["--lobby", "closed"]), "--room-secret-file"),
            (args(&["--threads", "65"]), "--threads"),
            (args(&["--cluster-name", "eu"]), "need --cluster"),
            (
                args(&["--config", "/nonexistent/udphub.toml"]),
                "cannot read config file",
            ),
            (args(&["--config", &bogus]), "bogus"),
            (
                args(&["--bind", "127.0.0.1:9", "--metrics", "127.0.0.1:9"]),
                "both",
            ),
        ];
        for (a, needle) in cases {
            let err = Config::from_args(&a).unwrap_err();
            let msg = err.to_string();
            assert!(err.is_usage(), "{msg}");
            assert!(msg.contains(needle), "{msg:?} lacks {needle:?}");
            assert!(!msg.contains('\n'), "multi-line: {msg:?}");
        }
        // What the parser refuses, clap refuses (one line, by the CLI).
        for bad in [
            ["--format", "{nope}"],
            ["--no-echo", "maybe"],
            ["--threads", "many"],
        ] {
            let parsed = T::try_parse_from(std::iter::once("t").chain(bad));
            assert!(parsed.is_err(), "{bad:?}");
        }
    }

    #[test]
    fn every_setting_has_its_flag_and_variable() {
        use clap::CommandFactory;
        let cmd = T::command();
        for s in settings::ALL {
            let arg = cmd
                .get_arguments()
                .find(|a| a.get_long() == Some(s.key().as_str()))
                .unwrap_or_else(|| panic!("no flag --{}", s.key()));
            let env = format!("UDPHUB_{}", s.name.to_ascii_uppercase());
            assert_eq!(s.env, env, "{}", s.key());
            assert_eq!(arg.get_env().and_then(|e| e.to_str()), Some(s.env));
            assert!(!s.paragraphs().is_empty(), "{} has no help", s.key());
        }
        let flags = cmd.get_arguments().filter_map(|a| a.get_long()).count();
        // The settings, --config, --check-config and --takeover.
        assert_eq!(flags, settings::ALL.len() + 3);
    }

    #[test]
    fn every_default_is_valid() {
        Config::default().validate().unwrap();
    }
}
