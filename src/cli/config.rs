//! Settings for `udphub serve`: flags, `UDPHUB_*` environment variables, an
//! optional TOML file, and defaults — in that order of precedence.
//!
//! clap already ranks a flag above its environment variable; every setting
//! is optional there, so a value missing from both falls through to the
//! `--config` file and then to [`Config::default`]. The result is validated
//! once, here, into a [`Config`] the relay can use without further checks.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;

use crate::core::hub::HubConfig;
use crate::core::protocol::Template;
use crate::core::token::RoomSecret;
use crate::error::Error;

/// The largest UDP payload over IPv4 (65535 − 20 IP − 8 UDP header bytes).
pub const MAX_UDP_PAYLOAD: usize = 65_507;
/// Default `--max-datagram`: the payload that fits a 1500-byte Ethernet MTU
/// (1500 − 20 IPv4 − 8 UDP), so a relayed body is never IP-fragmented.
pub const DEFAULT_MAX_DATAGRAM: usize = 1472;
/// Default socket buffer request: 8 MiB holds ~4 ms of a 10 Gbit/s burst or
/// ~10k small datagrams, enough to ride out a scheduling hiccup.
pub const DEFAULT_SOCKET_BUFFER: usize = 8 << 20;

/// `udphub serve` flags. Every value is optional so that the config file and
/// defaults can fill what flags and the environment leave out.
#[derive(Debug, Clone, Default, Args)]
pub struct ServeArgs {
    /// TOML file with any of the settings below (keys are the flag names).
    #[arg(long, env = "UDPHUB_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Address to relay on: IP:PORT, [IPv6]:PORT, or HOST:PORT (resolved once at start) [default: 127.0.0.1:9999]
    #[arg(long, env = "UDPHUB_BIND", value_name = "ADDR", value_parser = parse_bind)]
    pub bind: Option<SocketAddr>,

    /// Prometheus endpoint address, or `off` [default: 127.0.0.1:9898]
    #[arg(long, env = "UDPHUB_METRICS", value_name = "ADDR|off", value_parser = parse_metrics)]
    pub metrics: Option<MetricsAddr>,

    /// Expire a client after this much silence, e.g. `10s`, `500ms`, `2m`, or seconds (`0.5`) [default: 10s]
    #[arg(long, env = "UDPHUB_TIMEOUT", value_name = "DURATION", value_parser = parse_duration)]
    pub timeout: Option<Duration>,

    /// What recipients get: a template with {body}, {ip}, {port}, or `raw` [default: "{body}. from {ip}:{port}"]
    #[arg(long, env = "UDPHUB_FORMAT", value_name = "TEMPLATE")]
    pub format: Option<String>,

    /// Do not send a message back to its sender (env: 1/0, true/false, yes/no, on/off).
    #[arg(long, env = "UDPHUB_NO_ECHO", value_parser = clap::builder::BoolishValueParser::new())]
    pub no_echo: bool,

    /// Drop (and count) datagrams longer than this many bytes [default: 1472]
    #[arg(long, env = "UDPHUB_MAX_DATAGRAM", value_name = "BYTES")]
    pub max_datagram: Option<usize>,

    /// Refuse (and count) joins beyond this many clients [default: 1000000]
    #[arg(long, env = "UDPHUB_MAX_CLIENTS", value_name = "N")]
    pub max_clients: Option<usize>,

    /// Reserve table room for this many clients at start, so the table never
    /// pauses to grow on the way there (reserved memory becomes resident as clients arrive; a client costs ~135 B of RSS in all) [default: 0]
    #[arg(long, env = "UDPHUB_EXPECT_CLIENTS", value_name = "N")]
    pub expect_clients: Option<usize>,

    /// SO_RCVBUF to request, in bytes [default: 8388608]
    #[arg(long, env = "UDPHUB_RECV_BUFFER", value_name = "BYTES")]
    pub recv_buffer: Option<usize>,

    /// SO_SNDBUF to request, in bytes [default: 8388608]
    #[arg(long, env = "UDPHUB_SEND_BUFFER", value_name = "BYTES")]
    pub send_buffer: Option<usize>,

    /// Log filter: error, warn, info, debug, trace, or tracing directives [default: info]
    #[arg(long, env = "UDPHUB_LOG_LEVEL", value_name = "FILTER")]
    pub log_level: Option<String>,

    /// Log lines as `text` or `json` (one object per line) [default: text]
    #[arg(long, env = "UDPHUB_LOG_FORMAT", value_name = "text|json")]
    pub log_format: Option<crate::cli::LogFormat>,

    /// Once bound, write the addresses to this file (`udp=ADDR`, `metrics=ADDR|off`), for scripts and tests using port 0
    #[arg(long, env = "UDPHUB_READY_FILE", value_name = "FILE")]
    pub ready_file: Option<PathBuf>,

    /// Check the settings (flags, environment, --config file, secret files) and exit: 0 if the relay would start with them, 2 and the reason if not
    #[arg(long)]
    pub check_config: bool,

    /// Refuse (and count) joins that would make more rooms than this [default: 100000]
    #[arg(long, env = "UDPHUB_MAX_ROOMS", value_name = "N")]
    pub max_rooms: Option<usize>,

    /// Refuse (and count) joins to a room that has this many members [default: 100000]
    #[arg(long, env = "UDPHUB_MAX_ROOM_CLIENTS", value_name = "N")]
    pub max_room_clients: Option<usize>,

    /// File holding the room secret (HS256 key, at least 32 bytes; a trailing newline is ignored): every named room then needs a token
    #[arg(long, env = "UDPHUB_ROOM_SECRET_FILE", value_name = "FILE")]
    pub room_secret_file: Option<PathBuf>,

    /// With a room secret: whether clients outside any room may talk (`open`) or must join one first (`closed`) [default: open]
    #[arg(long, env = "UDPHUB_LOBBY", value_name = "open|closed", value_parser = parse_lobby)]
    pub lobby: Option<bool>,

    /// Verify mode: a source must prove its address with a cookie before it is registered or relayed to (see docs/SECURITY.md)
    #[arg(long, env = "UDPHUB_VERIFY_SOURCES", value_parser = clap::builder::BoolishValueParser::new())]
    pub verify_sources: bool,

    /// Verify mode: cookie replies per second to one /24 (IPv4) or /56 (IPv6) [default: 20]
    #[arg(long, env = "UDPHUB_COOKIE_RATE", value_name = "PER_SEC")]
    pub cookie_rate: Option<f64>,

    /// Drop (and count) a client's datagrams beyond this many per second [default: no limit]
    #[arg(long, env = "UDPHUB_CLIENT_RATE", value_name = "PER_SEC")]
    pub client_rate: Option<f64>,

    /// How many datagrams a client may send at once above --client-rate [default: twice the rate]
    #[arg(long, env = "UDPHUB_CLIENT_BURST", value_name = "N")]
    pub client_burst: Option<f64>,

    /// Refuse (and count) new clients from an IP address that has this many [default: no limit]
    #[arg(long, env = "UDPHUB_MAX_CLIENTS_PER_IP", value_name = "N")]
    pub max_clients_per_ip: Option<u32>,

    /// For a public address: --verify-sources, --client-rate 200, --max-clients-per-ip 64 (each can still be set)
    #[arg(long, env = "UDPHUB_PUBLIC", value_parser = clap::builder::BoolishValueParser::new())]
    pub public: bool,

    /// Share rooms with other relays through these NATS servers (comma-separated nats://HOST:PORT; see docs/CLUSTER.md) [default: no cluster]
    #[arg(long, env = "UDPHUB_CLUSTER", value_name = "URLS", value_parser = parse_cluster_urls)]
    pub cluster: Option<NatsUrls>,

    /// Subject prefix: relays with the same cluster name share rooms [default: udphub]
    #[arg(long, env = "UDPHUB_CLUSTER_NAME", value_name = "NAME")]
    pub cluster_name: Option<String>,

    /// This relay's name on the bus [default: HOSTNAME-PID]
    #[arg(long, env = "UDPHUB_NODE_ID", value_name = "ID")]
    pub node_id: Option<String>,

    /// NATS credentials file (.creds), if the servers require one
    #[arg(long, env = "UDPHUB_CLUSTER_CREDENTIALS", value_name = "FILE")]
    pub cluster_credentials: Option<PathBuf>,

    /// Loops relaying on the address, each on its own thread with its own SO_REUSEPORT socket and clients; `auto` = the CPUs this process may use [default: 1]
    #[arg(long, env = "UDPHUB_THREADS", value_name = "N|auto", value_parser = parse_threads)]
    pub threads: Option<Threads>,

    /// Pin loop i to the i-th CPU this process may use
    #[arg(long, env = "UDPHUB_PIN_THREADS", value_parser = clap::builder::BoolishValueParser::new())]
    pub pin_threads: bool,
}

/// `--threads`: a number of loops, or one per CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Threads {
    /// As many as the CPUs this process may run on.
    Auto,
    /// This many.
    Count(usize),
}

impl Threads {
    /// How many loops this means on this machine.
    pub fn resolve(self) -> usize {
        match self {
            Threads::Count(n) => n,
            Threads::Auto => std::thread::available_parallelism().map_or(1, usize::from),
        }
    }
}

/// Parses `--threads`: a whole number, or `auto`.
pub fn parse_threads(s: &str) -> Result<Threads, String> {
    match s.trim() {
        "auto" => Ok(Threads::Auto),
        n => n
            .parse::<usize>()
            .map(Threads::Count)
            .map_err(|_| format!("{n:?}: expected a number of loops, or `auto`")),
    }
}

/// NATS server URLs (`--cluster`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsUrls(pub Vec<String>);

/// `--cluster`: comma-separated `nats://host:port` URLs (`host:port` gets
/// `nats://`).
pub fn parse_cluster_urls(s: &str) -> Result<NatsUrls, String> {
    let urls: Vec<String> = s
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|u| {
            if u.contains("://") {
                u.to_string()
            } else {
                format!("nats://{u}")
            }
        })
        .collect();
    if urls.is_empty() {
        return Err("expected nats://HOST:PORT[,nats://HOST:PORT…]".into());
    }
    for u in &urls {
        let rest = u
            .strip_prefix("nats://")
            .or_else(|| u.strip_prefix("tls://"))
            .ok_or_else(|| format!("{u}: only nats:// and tls:// URLs"))?;
        let hostport = rest.rsplit('@').next().unwrap_or(rest);
        let port = hostport
            .rsplit_once(':')
            .map(|(_, p)| p)
            .ok_or_else(|| format!("{u}: expected a port, as in nats://127.0.0.1:4222"))?;
        port.parse::<u16>()
            .map_err(|_| format!("{u}: {port:?} is not a port number"))?;
    }
    Ok(NatsUrls(urls))
}

/// What `--public` sets, unless given otherwise: datagrams per second per
/// client (a chat at a few messages a second, with room for bursts).
pub const PUBLIC_CLIENT_RATE: f64 = 200.0;
/// What `--public` sets: clients per IP (a NAT of a few dozen people).
pub const PUBLIC_CLIENTS_PER_IP: u32 = 64;

/// Parses `--lobby`: `open` (true) or `closed` (false).
pub fn parse_lobby(s: &str) -> Result<bool, String> {
    match s.trim() {
        "open" => Ok(true),
        "closed" => Ok(false),
        other => Err(format!("{other:?}: the lobby is `open` or `closed`")),
    }
}

/// Reads a room secret file: its bytes, less one trailing newline.
pub fn read_secret(path: &Path) -> Result<RoomSecret, Error> {
    let mut bytes = std::fs::read(path).map_err(|e| {
        Error::Config(format!(
            "cannot read --room-secret-file {}: {e}",
            path.display()
        ))
    })?;
    if bytes.ends_with(b"\n") {
        bytes.pop();
        if bytes.ends_with(b"\r") {
            bytes.pop();
        }
    }
    RoomSecret::new(bytes)
        .map_err(|e| Error::Config(format!("--room-secret-file {}: {e}", path.display())))
}

/// Where to serve `/metrics`, or nowhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricsAddr {
    /// `--metrics off`.
    Off,
    /// Listen here.
    At(SocketAddr),
}

/// The `--config` file's settings. Keys are the flag names.
#[derive(Debug, Default)]
struct FileConfig {
    bind: Option<SocketAddr>,
    metrics: Option<MetricsAddr>,
    timeout: Option<Duration>,
    format: Option<String>,
    no_echo: Option<bool>,
    max_datagram: Option<usize>,
    max_clients: Option<usize>,
    expect_clients: Option<usize>,
    recv_buffer: Option<usize>,
    send_buffer: Option<usize>,
    log_level: Option<String>,
    log_format: Option<crate::cli::LogFormat>,
    ready_file: Option<PathBuf>,
    max_rooms: Option<usize>,
    max_room_clients: Option<usize>,
    room_secret_file: Option<PathBuf>,
    lobby: Option<bool>,
    verify_sources: Option<bool>,
    client_rate: Option<f64>,
    client_burst: Option<f64>,
    max_clients_per_ip: Option<usize>,
    public: Option<bool>,
    cookie_rate: Option<f64>,
    cluster: Option<NatsUrls>,
    cluster_name: Option<String>,
    node_id: Option<String>,
    cluster_credentials: Option<PathBuf>,
    threads: Option<Threads>,
    pin_threads: Option<bool>,
}

/// Every key the file may have.
const FILE_KEYS: [&str; 29] = [
    "threads",
    "pin-threads",
    "log-format",
    "cluster",
    "cluster-name",
    "node-id",
    "cluster-credentials",
    "cookie-rate",
    "verify-sources",
    "client-rate",
    "client-burst",
    "max-clients-per-ip",
    "public",
    "max-rooms",
    "max-room-clients",
    "room-secret-file",
    "lobby",
    "bind",
    "metrics",
    "timeout",
    "format",
    "no-echo",
    "max-datagram",
    "max-clients",
    "expect-clients",
    "recv-buffer",
    "send-buffer",
    "log-level",
    "ready-file",
];

/// The validated relay settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Relay socket address.
    pub bind: SocketAddr,
    /// Metrics listener, if any.
    pub metrics: Option<SocketAddr>,
    /// Silence after which a client expires.
    pub timeout: Duration,
    /// What recipients receive.
    pub format: Template,
    /// Whether a sender receives its own messages (the seeds' behaviour).
    pub echo: bool,
    /// Longest datagram accepted, in bytes.
    pub max_datagram: usize,
    /// Most clients in the table at once.
    pub max_clients: usize,
    /// Clients to reserve table room for at start.
    pub expect_clients: usize,
    /// SO_RCVBUF requested.
    pub recv_buffer: usize,
    /// SO_SNDBUF requested.
    pub send_buffer: usize,
    /// tracing filter directives.
    pub log_level: String,
    /// Text or JSON log lines.
    pub log_format: crate::cli::LogFormat,
    /// Where to write the bound addresses once ready, if anywhere.
    pub ready_file: Option<PathBuf>,
    /// Most named rooms at once.
    pub max_rooms: usize,
    /// Most members of one named room.
    pub max_room_clients: usize,
    /// The room secret (read from `--room-secret-file`), if rooms need tokens.
    pub room_secret: Option<RoomSecret>,
    /// With a secret: whether the lobby is open.
    pub lobby_open: bool,
    /// Verify mode.
    pub verify_sources: bool,
    /// Verify mode: cookie replies per second per /24 or /56.
    pub cookie_rate: f64,
    /// Per-client datagrams per second and burst, if limited.
    pub client_rate: Option<(f64, f64)>,
    /// Clients per IP, if limited.
    pub max_clients_per_ip: Option<u32>,
    /// The cluster, if any.
    pub cluster: Option<crate::cluster::ClusterConfig>,
    /// Loops (threads) on the address.
    pub threads: usize,
    /// Pin each loop to a CPU.
    pub pin_threads: bool,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            bind: SocketAddr::from(([127, 0, 0, 1], 9999)),
            metrics: Some(SocketAddr::from(([127, 0, 0, 1], 9898))),
            timeout: Duration::from_secs(10),
            format: Template::default(),
            echo: true,
            max_datagram: DEFAULT_MAX_DATAGRAM,
            max_clients: 1_000_000,
            expect_clients: 0,
            recv_buffer: DEFAULT_SOCKET_BUFFER,
            send_buffer: DEFAULT_SOCKET_BUFFER,
            log_level: "info".to_string(),
            log_format: crate::cli::LogFormat::Text,
            ready_file: None,
            max_rooms: 100_000,
            max_room_clients: 100_000,
            room_secret: None,
            lobby_open: true,
            verify_sources: false,
            cookie_rate: crate::core::admission::COOKIE_PREFIX_RATE,
            client_rate: None,
            max_clients_per_ip: None,
            cluster: None,
            threads: 1,
            pin_threads: false,
        }
    }
}

impl Config {
    /// What each loop's hub needs of these settings. With several loops
    /// the table reservation is split between them evenly, rounded up (a
    /// loop's clients are its own); the caps are the relay's, counted
    /// across loops (see [`crate::core::census`]).
    pub fn hub(&self) -> HubConfig {
        let loops = self.threads.max(1);
        HubConfig {
            timeout: self.timeout,
            format: self.format.clone(),
            echo: self.echo,
            max_clients: self.max_clients,
            expect_clients: self.expect_clients.div_ceil(loops),
            max_datagram: self.max_datagram,
            max_rooms: self.max_rooms,
            max_room_clients: self.max_room_clients,
            room_secret: self.room_secret.clone(),
            lobby_open: self.lobby_open,
            // Drawn from the OS by the runtime when verify mode is on.
            cookie_key: None,
            cookie_rate: self.cookie_rate,
            client_rate: self.client_rate,
            max_clients_per_ip: self.max_clients_per_ip,
        }
    }

    /// Resolves flags/env, then the `--config` file, then defaults, and
    /// validates the result: the one place settings are checked.
    pub fn from_args(args: &ServeArgs) -> Result<Config, Error> {
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let d = Config::default();

        let bind = args.bind.or(file.bind).unwrap_or(d.bind);
        let metrics = args
            .metrics
            .or(file.metrics)
            .unwrap_or(d.metrics.map_or(MetricsAddr::Off, MetricsAddr::At));
        let timeout = args.timeout.or(file.timeout).unwrap_or(d.timeout);
        let format = match args.format.as_ref().or(file.format.as_ref()) {
            Some(spec) => {
                Template::parse(spec).map_err(|e| Error::Config(format!("--format: {e}")))?
            }
            None => d.format,
        };
        let config = Config {
            bind,
            metrics: match metrics {
                MetricsAddr::Off => None,
                MetricsAddr::At(a) => Some(a),
            },
            timeout,
            format,
            echo: !(args.no_echo || file.no_echo.unwrap_or(false)),
            max_datagram: args
                .max_datagram
                .or(file.max_datagram)
                .unwrap_or(d.max_datagram),
            max_clients: args
                .max_clients
                .or(file.max_clients)
                .unwrap_or(d.max_clients),
            expect_clients: args
                .expect_clients
                .or(file.expect_clients)
                .unwrap_or(d.expect_clients),
            recv_buffer: args
                .recv_buffer
                .or(file.recv_buffer)
                .unwrap_or(d.recv_buffer),
            send_buffer: args
                .send_buffer
                .or(file.send_buffer)
                .unwrap_or(d.send_buffer),
            log_level: args
                .log_level
                .clone()
                .or(file.log_level)
                .unwrap_or(d.log_level),
            log_format: args.log_format.or(file.log_format).unwrap_or(d.log_format),
            ready_file: args.ready_file.clone().or(file.ready_file),
            max_rooms: args.max_rooms.or(file.max_rooms).unwrap_or(d.max_rooms),
            max_room_clients: args
                .max_room_clients
                .or(file.max_room_clients)
                .unwrap_or(d.max_room_clients),
            room_secret: match args
                .room_secret_file
                .as_ref()
                .or(file.room_secret_file.as_ref())
            {
                Some(path) => Some(read_secret(path)?),
                None => None,
            },
            lobby_open: args.lobby.or(file.lobby).unwrap_or(d.lobby_open),
            verify_sources: false,
            cookie_rate: args
                .cookie_rate
                .or(file.cookie_rate)
                .unwrap_or(d.cookie_rate),
            client_rate: None,
            max_clients_per_ip: None,
            cluster: None,
            threads: args
                .threads
                .or(file.threads)
                .map_or(d.threads, Threads::resolve),
            pin_threads: args.pin_threads || file.pin_threads.unwrap_or(false),
        };
        let public = args.public || file.public.unwrap_or(false);
        let config = Config {
            verify_sources: public || args.verify_sources || file.verify_sources.unwrap_or(false),
            client_rate: args
                .client_rate
                .or(file.client_rate)
                .or(public.then_some(PUBLIC_CLIENT_RATE))
                .map(|rate| {
                    let burst = args
                        .client_burst
                        .or(file.client_burst)
                        .unwrap_or(2.0 * rate);
                    (rate, burst)
                }),
            max_clients_per_ip: args
                .max_clients_per_ip
                .or(file
                    .max_clients_per_ip
                    .map(|n| n.min(u32::MAX as usize) as u32))
                .or(public.then_some(PUBLIC_CLIENTS_PER_IP)),
            cluster: args.cluster.clone().or(file.cluster).map(|servers| {
                crate::cluster::ClusterConfig {
                    servers: servers.0,
                    name: args
                        .cluster_name
                        .clone()
                        .or(file.cluster_name.clone())
                        .unwrap_or_else(|| "udphub".into()),
                    node_id: args
                        .node_id
                        .clone()
                        .or(file.node_id.clone())
                        .unwrap_or_else(default_node_id),
                    credentials: args
                        .cluster_credentials
                        .clone()
                        .or(file.cluster_credentials.clone()),
                }
            }),
            ..config
        };
        if config.cluster.is_none()
            && (args.cluster_name.is_some()
                || file.cluster_name.is_some()
                || args.node_id.is_some()
                || file.node_id.is_some()
                || args.cluster_credentials.is_some()
                || file.cluster_credentials.is_some())
        {
            return Err(Error::Config(
                "--cluster-name, --node-id and --cluster-credentials need --cluster nats://HOST:PORT".into(),
            ));
        }
        config.validate()?;
        Ok(config)
    }

    /// The settings in one line, for `serve --check-config`.
    pub fn summary(&self) -> String {
        let opt = |v: Option<String>| v.unwrap_or_else(|| "off".into());
        format!(
            "udphub: the configuration is valid: bind {}, threads {}, metrics {}, timeout {}, format {:?}, echo {}, max-datagram {}, max-clients {}, max-rooms {}, max-room-clients {}, room secret {}, lobby {}, verify-sources {}, client-rate {}, max-clients-per-ip {}, cluster {}, log-level {}, log-format {}",
            self.bind,
            self.threads,
            opt(self.metrics.map(|m| m.to_string())),
            humantime::format_duration(self.timeout),
            self.format.spec(),
            self.echo,
            self.max_datagram,
            self.max_clients,
            self.max_rooms,
            self.max_room_clients,
            if self.room_secret.is_some() { "set" } else { "none" },
            if self.lobby_open { "open" } else { "closed" },
            self.verify_sources,
            opt(self.client_rate.map(|(r, b)| format!("{r}/s burst {b}"))),
            opt(self.max_clients_per_ip.map(|n| n.to_string())),
            opt(self.cluster.as_ref().map(|c| c.servers.join(","))),
            self.log_level,
            format!("{:?}", self.log_format).to_lowercase(),
        )
    }

    /// Checks the limits every setting must respect (run by
    /// [`from_args`](Self::from_args); call it yourself only for a
    /// `Config` built by hand).
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |m: String| Err(Error::Config(m));
        let most = crate::runtime::shards::MAX_SHARDS;
        if self.threads == 0 || self.threads > most {
            return bad(format!(
                "--threads must be between 1 and {most} (or auto), got {}",
                self.threads
            ));
        }
        if self.threads > 1 && self.cluster.is_some() {
            return bad(
                "--cluster with --threads above 1 is not supported yet: run one relay per core, each with --cluster".into(),
            );
        }
        if let Some(c) = &self.cluster {
            if !crate::cluster::valid_cluster_name(&c.name) {
                return bad(format!(
                    "--cluster-name {:?}: letters, digits, '_' and '-', in dot-separated parts (it prefixes NATS subjects)",
                    c.name
                ));
            }
            if c.node_id.is_empty() || c.node_id.chars().any(char::is_control) {
                return bad("--node-id must be a non-empty printable name".into());
            }
            if let Some(path) = &c.credentials {
                if let Err(e) = std::fs::metadata(path) {
                    return bad(format!("--cluster-credentials {}: {e}", path.display()));
                }
            }
        }
        if self.max_datagram == 0 || self.max_datagram > MAX_UDP_PAYLOAD {
            return bad(format!(
                "--max-datagram must be between 1 and {MAX_UDP_PAYLOAD} bytes, got {}",
                self.max_datagram
            ));
        }
        if self.max_clients == 0 || self.max_clients >= u32::MAX as usize {
            return bad(format!(
                "--max-clients must be between 1 and {}, got {}",
                u32::MAX - 1,
                self.max_clients
            ));
        }
        if self.expect_clients > self.max_clients {
            return bad(format!(
                "--expect-clients ({}) is more than --max-clients ({})",
                self.expect_clients, self.max_clients
            ));
        }
        if self.timeout < Duration::from_millis(1)
            || self.timeout > Duration::from_secs(30 * 86_400)
        {
            return bad(format!(
                "--timeout must be between 1ms and 30days, got {}",
                humantime::format_duration(self.timeout)
            ));
        }
        for (flag, v) in [
            ("--recv-buffer", self.recv_buffer),
            ("--send-buffer", self.send_buffer),
        ] {
            if v == 0 || v > i32::MAX as usize {
                return bad(format!(
                    "{flag} must be between 1 and {} bytes, got {v}",
                    i32::MAX
                ));
            }
        }
        if let Some((rate, burst)) = self.client_rate {
            if !(rate > 0.0 && rate.is_finite() && burst >= 1.0 && burst.is_finite()) {
                return bad(format!(
                    "--client-rate must be more than 0 and --client-burst at least 1, got {rate} and {burst}"
                ));
            }
        }
        if !(self.cookie_rate > 0.0 && self.cookie_rate.is_finite()) {
            return bad(format!(
                "--cookie-rate must be more than 0, got {}",
                self.cookie_rate
            ));
        }
        if self.max_clients_per_ip == Some(0) {
            return bad("--max-clients-per-ip must be at least 1".into());
        }
        if !self.lobby_open && self.room_secret.is_none() {
            return bad(
                "--lobby closed needs --room-secret-file: without a secret there are no tokens to join rooms with".into(),
            );
        }
        if let Some(m) = self.metrics {
            if m == self.bind && m.port() != 0 {
                // Different protocols could share the port, but it is almost
                // certainly a typo, and confusing to operate.
                return bad(format!("--metrics and --bind are both {m}"));
            }
        }
        crate::cli::log_filter(&self.log_level)?;
        Ok(())
    }
}

/// Reads the `--config` file. Every problem is one line naming the file,
/// the line, the key, and what was expected, in words.
fn read_file(path: &Path) -> Result<FileConfig, Error> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Config(format!("cannot read config file {}: {e}", path.display())))?;
    parse_file(&text).map_err(|e| Error::Config(format!("config file {}{e}", path.display())))
}

/// The 1-based line of byte `at` in `text`, and that line.
fn line_at(text: &str, at: usize) -> (usize, &str) {
    let at = at.min(text.len());
    let start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    let end = text[at..].find('\n').map_or(text.len(), |i| at + i);
    (
        text[..at].matches('\n').count() + 1,
        text[start..end].trim(),
    )
}

/// The line where `key` is set, for messages.
fn line_of_key(text: &str, key: &str) -> usize {
    text.lines()
        .position(|l| {
            l.trim_start()
                .strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        })
        .map_or(0, |i| i + 1)
}

/// Parses the file's text; errors start with ", line N: " (or ": ").
fn parse_file(text: &str) -> Result<FileConfig, String> {
    let table: toml::Table = toml::from_str(text).map_err(|e| {
        let msg = e.message().replace('\n', " ");
        match e.span() {
            Some(span) => {
                let (n, line) = line_at(text, span.start);
                let hint = match line.split_once('=') {
                    Some((key, value))
                        if !value.trim().starts_with(['"', '\''])
                            && value.trim().parse::<f64>().is_err() =>
                    {
                        format!(
                            "; text values need quotes: {} = \"{}\"",
                            key.trim(),
                            value.trim()
                        )
                    }
                    _ => String::new(),
                };
                format!(", line {n}: `{line}` is not valid TOML ({msg}){hint}")
            }
            None => format!(": not valid TOML ({msg})"),
        }
    })?;
    let mut file = FileConfig::default();
    for (key, value) in &table {
        let at = match line_of_key(text, key) {
            0 => String::new(),
            n => format!(", line {n}"),
        };
        let fail =
            |expected: &str| format!("{at}: {key} must be {expected}, not {}", describe(value));
        match key.as_str() {
            "bind" => {
                let s = value
                    .as_str()
                    .ok_or_else(|| fail("a quoted address like \"127.0.0.1:9999\""))?;
                file.bind = Some(parse_bind(s).map_err(|e| format!("{at}: bind: {e}"))?);
            }
            "metrics" => {
                let s = value
                    .as_str()
                    .ok_or_else(|| fail("a quoted address like \"127.0.0.1:9898\", or \"off\""))?;
                file.metrics = Some(parse_metrics(s).map_err(|e| format!("{at}: metrics: {e}"))?);
            }
            "timeout" => {
                let d = match value {
                    toml::Value::String(s) => parse_duration(s),
                    toml::Value::Integer(n) => parse_duration(&n.to_string()),
                    toml::Value::Float(f) => parse_duration(&f.to_string()),
                    _ => Err(String::new()),
                };
                file.timeout = Some(d.map_err(|_| {
                    fail("a duration like \"10s\" or \"500ms\", or a number of seconds")
                })?);
            }
            "format" | "log-level" => {
                let s = value
                    .as_str()
                    .ok_or_else(|| fail("a quoted string"))?
                    .to_string();
                if key == "format" {
                    file.format = Some(s);
                } else {
                    file.log_level = Some(s);
                }
            }
            "ready-file" | "room-secret-file" | "cluster-credentials" => {
                let s = value.as_str().ok_or_else(|| fail("a quoted file path"))?;
                match key.as_str() {
                    "ready-file" => file.ready_file = Some(PathBuf::from(s)),
                    "room-secret-file" => file.room_secret_file = Some(PathBuf::from(s)),
                    _ => file.cluster_credentials = Some(PathBuf::from(s)),
                }
            }
            "cluster" => {
                let s = value
                    .as_str()
                    .ok_or_else(|| fail("a quoted list, \"nats://HOST:PORT[,…]\""))?;
                file.cluster =
                    Some(parse_cluster_urls(s).map_err(|e| format!("{at}: cluster: {e}"))?);
            }
            "cluster-name" | "node-id" => {
                let s = value
                    .as_str()
                    .ok_or_else(|| fail("a quoted string"))?
                    .to_string();
                if key == "cluster-name" {
                    file.cluster_name = Some(s);
                } else {
                    file.node_id = Some(s);
                }
            }
            "threads" => {
                let t = match value {
                    toml::Value::Integer(n) => usize::try_from(*n).ok().map(Threads::Count),
                    toml::Value::String(s) => parse_threads(s).ok(),
                    _ => None,
                };
                file.threads = Some(t.ok_or_else(|| fail("a number of loops, or \"auto\""))?);
            }
            "pin-threads" => {
                file.pin_threads = Some(
                    value
                        .as_bool()
                        .ok_or_else(|| fail("true or false (no quotes)"))?,
                );
            }
            "verify-sources" | "public" => {
                let b = value
                    .as_bool()
                    .ok_or_else(|| fail("true or false (no quotes)"))?;
                if key == "public" {
                    file.public = Some(b);
                } else {
                    file.verify_sources = Some(b);
                }
            }
            "client-rate" | "client-burst" | "cookie-rate" => {
                let n = value
                    .as_float()
                    .or_else(|| value.as_integer().map(|i| i as f64))
                    .ok_or_else(|| fail("a number (per second), without quotes"))?;
                match key.as_str() {
                    "client-rate" => file.client_rate = Some(n),
                    "cookie-rate" => file.cookie_rate = Some(n),
                    _ => file.client_burst = Some(n),
                }
            }
            "log-format" => {
                let s = value.as_str().ok_or_else(|| fail("\"text\" or \"json\""))?;
                file.log_format = Some(
                    crate::cli::LogFormat::parse(s)
                        .map_err(|e| format!("{at}: log-format: {e}"))?,
                );
            }
            "lobby" => {
                let s = value
                    .as_str()
                    .ok_or_else(|| fail("\"open\" or \"closed\""))?;
                file.lobby = Some(parse_lobby(s).map_err(|e| format!("{at}: lobby: {e}"))?);
            }
            "no-echo" => {
                file.no_echo = Some(
                    value
                        .as_bool()
                        .ok_or_else(|| fail("true or false (no quotes)"))?,
                );
            }
            "max-datagram" | "max-clients" | "expect-clients" | "recv-buffer" | "send-buffer"
            | "max-rooms" | "max-room-clients" | "max-clients-per-ip" => {
                let n = value
                    .as_integer()
                    .and_then(|n| usize::try_from(n).ok())
                    .ok_or_else(|| fail("a whole number, not negative, without quotes"))?;
                let slot = match key.as_str() {
                    "max-datagram" => &mut file.max_datagram,
                    "max-clients" => &mut file.max_clients,
                    "expect-clients" => &mut file.expect_clients,
                    "recv-buffer" => &mut file.recv_buffer,
                    "max-rooms" => &mut file.max_rooms,
                    "max-room-clients" => &mut file.max_room_clients,
                    "max-clients-per-ip" => &mut file.max_clients_per_ip,
                    _ => &mut file.send_buffer,
                };
                *slot = Some(n);
            }
            other => {
                return Err(format!(
                    "{at}: unknown key `{other}` (the keys are the flag names: {})",
                    FILE_KEYS.join(", ")
                ))
            }
        }
    }
    Ok(file)
}

/// A TOML value in words, for "must be X, not Y".
fn describe(value: &toml::Value) -> String {
    match value {
        toml::Value::String(s) => format!("the text {s:?}"),
        toml::Value::Integer(n) => format!("the number {n}"),
        toml::Value::Float(f) => format!("the number {f}"),
        toml::Value::Boolean(b) => format!("{b}"),
        toml::Value::Datetime(d) => format!("the date {d}"),
        toml::Value::Array(_) => "a list".into(),
        toml::Value::Table(_) => "a table".into(),
    }
}

/// Parses a socket address to bind, saying which part is wrong. Host names
/// are resolved (once, now; the first address wins). `example_port`
/// completes the suggestion when the port is missing.
pub fn parse_addr(s: &str, example_port: u16) -> Result<SocketAddr, String> {
    use std::net::{IpAddr, ToSocketAddrs};
    let s = s.trim();
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(addr);
    }
    if let Ok(v6) = s.parse::<std::net::Ipv6Addr>() {
        // "::1:9730" is itself an IPv6 address; the user most likely meant
        // a port after "::1".
        let guess = s
            .rsplit_once(':')
            .filter(|(h, p)| h.parse::<std::net::Ipv6Addr>().is_ok() && p.parse::<u16>().is_ok());
        return Err(match guess {
            Some((h, p)) => format!("{s:?}: an IPv6 address needs brackets around it: [{h}]:{p}"),
            None => format!("{s:?} has no port; an IPv6 address goes in brackets before it, e.g. [{v6}]:{example_port}"),
        });
    }
    if let Ok(ip) = s.trim_matches(['[', ']']).parse::<IpAddr>() {
        let with_port = SocketAddr::new(ip, example_port);
        return Err(format!("{s:?} has no port; add one, e.g. {with_port}"));
    }
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err(format!(
            "{s:?} has no port; add one, e.g. {s}:{example_port}"
        ));
    };
    if !host.starts_with('[') && host.contains(':') {
        if let Ok(ip) = host.parse::<std::net::Ipv6Addr>() {
            return Err(format!(
                "{s:?}: an IPv6 address needs brackets around it: [{ip}]:{port}"
            ));
        }
    }
    let port: u16 = match port.parse::<u64>() {
        Ok(p) if p <= u64::from(u16::MAX) => p as u16,
        Ok(p) => return Err(format!("{s:?}: port {p} is out of range (0 to 65535)")),
        Err(_) => return Err(format!("{s:?}: {port:?} is not a port number")),
    };
    let host = host.trim_matches(['[', ']']);
    if host.is_empty() {
        return Err(format!(
            "{s:?} has no address before the port; e.g. 127.0.0.1:{port}"
        ));
    }
    match (host, port).to_socket_addrs() {
        Ok(mut found) => found
            .next()
            .ok_or_else(|| format!("{s:?}: host {host:?} has no address")),
        Err(e) => Err(format!("{s:?}: cannot resolve host {host:?} ({e})")),
    }
}

/// Parses `--bind` (see [`parse_addr`]).
pub fn parse_bind(s: &str) -> Result<SocketAddr, String> {
    parse_addr(s, 9999)
}

/// Parses `--metrics`: `off` or a socket address (see [`parse_addr`]).
pub fn parse_metrics(s: &str) -> Result<MetricsAddr, String> {
    if s.trim().eq_ignore_ascii_case("off") {
        return Ok(MetricsAddr::Off);
    }
    parse_addr(s, 9898)
        .map(MetricsAddr::At)
        .map_err(|e| format!("{e} (or `off` for no metrics)"))
}

/// Parses a duration, the one rule for every duration udphub takes: a
/// bare number is seconds, fractions allowed (`0.5`); otherwise a human
/// duration (`10s`, `500ms`, `1m 30s`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<f64>() {
        return Duration::try_from_secs_f64(secs)
            .map_err(|_| format!("{s:?} is not a duration (seconds must be 0 or more)"));
    }
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration ({e}); try e.g. 10s, 500ms, 2m or 0.5"))
}

/// `HOSTNAME-PID`: unique enough on a bus, and says where to look.
fn default_node_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    let host = if host.is_empty() {
        "udphub".into()
    } else {
        host
    };
    format!("{host}-{}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

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

    #[test]
    fn defaults_match_the_design() {
        let c = Config::from_args(&ServeArgs::default()).unwrap();
        assert_eq!(c.bind.to_string(), "127.0.0.1:9999");
        assert_eq!(c.metrics.unwrap().to_string(), "127.0.0.1:9898");
        assert_eq!(c.timeout, Duration::from_secs(10));
        assert_eq!(c.format, Template::default());
        assert!(c.echo);
        assert_eq!(c.max_datagram, 1472);
        assert_eq!(c.max_clients, 1_000_000);
    }

    #[test]
    fn flags_beat_the_file_which_beats_defaults() {
        let dir = std::env::temp_dir().join(format!("udphub-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.toml");
        std::fs::write(
            &path,
            "bind = \"[::1]:7000\"\ntimeout = \"3s\"\nmetrics = \"off\"\nno-echo = true\nmax-clients = 5\n",
        )
        .unwrap();
        let p = path.to_str().unwrap();
        let c = Config::from_args(&args(&["--config", p, "--timeout", "250ms"])).unwrap();
        assert_eq!(c.bind.to_string(), "[::1]:7000");
        assert_eq!(c.timeout, Duration::from_millis(250));
        assert_eq!(c.metrics, None);
        assert!(!c.echo);
        assert_eq!(c.max_clients, 5);
        assert_eq!(c.max_datagram, 1472);
    }

    #[test]
    fn bad_values_get_one_line_reasons() {
        let dir = std::env::temp_dir().join(format!("udphub-cfg2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bad.toml");
        std::fs::write(&path, "bogus = 1\n").unwrap();
        let cases: Vec<(ServeArgs, &str)> = vec![
            (args(&["--max-datagram", "0"]), "--max-datagram"),
            (args(&["--max-datagram", "70000"]), "--max-datagram"),
            (args(&["--max-clients", "0"]), "--max-clients"),
            (
                args(&["--max-clients", "10", "--expect-clients", "11"]),
                "--expect-clients",
            ),
            (args(&["--format", "{nope}"]), "unknown placeholder"),
            (args(&["--timeout", "0s"]), "--timeout"),
            (args(&["--log-level", "=="]), "--log-level"),
            (
                args(&["--config", "/nonexistent/udphub.toml"]),
                "cannot read config file",
            ),
            (args(&["--config", path.to_str().unwrap()]), "bogus"),
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
    }

    #[test]
    fn durations_and_metrics_parse() {
        assert_eq!(parse_duration("10").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("0.5").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1m 30s").unwrap(), Duration::from_secs(90));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("-1").is_err());
        assert_eq!(parse_metrics("OFF").unwrap(), MetricsAddr::Off);
        assert!(parse_metrics("localhost").unwrap_err().contains("no port"));
    }

    #[test]
    fn addresses_say_which_part_is_wrong() {
        let err = |s: &str| parse_bind(s).unwrap_err();
        assert!(err("127.0.0.1").contains("no port; add one, e.g. 127.0.0.1:9999"));
        assert!(err("127.0.0.1:99999").contains("out of range"));
        assert!(err("::1:9730").contains("brackets around it: [::1]:9730"));
        assert!(err("127.0.0.1:http").contains("not a port number"));
        assert!(err(":9").contains("no address"));
        assert!(err("no-such-host.invalid:9").contains("cannot resolve"));
        assert_eq!(parse_bind("[::1]:9").unwrap().to_string(), "[::1]:9");
        assert!(parse_bind("localhost:9701").unwrap().ip().is_loopback());
    }

    #[test]
    fn file_errors_name_the_line_the_key_and_what_is_expected() {
        let err = |text: &str| parse_file(text).unwrap_err();
        let e = err("# relay\nmax-clients = \"200000\"\n");
        assert!(
            e.contains("line 2") && e.contains("max-clients must be a whole number"),
            "{e}"
        );
        let e = err("timeout = \"3s\"\nbind = 127.0.0.1:9740\n");
        assert!(
            e.contains("line 2") && e.contains("bind = \"127.0.0.1:9740\""),
            "{e}"
        );
        let e = err("no-echo = \"yes\"\n");
        assert!(e.contains("true or false"), "{e}");
        let e = err("bogus = 1\n");
        assert!(
            e.contains("unknown key `bogus`") && e.contains("max-clients"),
            "{e}"
        );
        let e = err("bind = \"127.0.0.1\"\n");
        assert!(e.contains("line 1: bind:") && e.contains("no port"), "{e}");
        // A bare number of seconds, whole or not, is a timeout.
        assert_eq!(
            parse_file("timeout = 30").unwrap().timeout,
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_file("timeout = 0.25").unwrap().timeout,
            Some(Duration::from_millis(250))
        );
    }

    #[test]
    fn cluster_flags_are_checked() {
        let urls = parse_cluster_urls("nats://127.0.0.1:4222, 10.0.0.2:4222").unwrap();
        assert_eq!(urls.0, ["nats://127.0.0.1:4222", "nats://10.0.0.2:4222"]);
        for bad in ["", " , ", "http://x:1", "nats://nohost", "nats://h:99999"] {
            assert!(parse_cluster_urls(bad).is_err(), "{bad:?}");
        }
    }
}
