//! Every setting of `udphub serve`, declared once: this is where a new
//! setting goes. Its flag (`--NAME`), environment variable, config-file key
//! (`NAME`), help, default, check and reloadability all come from its
//! declaration here ([`super::declare`] says how); what remains is to use
//! it (most go into [`Config::hub`](super::Config::hub)).
//!
//! The doc comment is the help: its first paragraph is `-h`'s line, all
//! of it `--help`'s and the docs table's (docs/OPERATIONS.md, which a test
//! keeps equal to [`ALL`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::cluster_key::ClusterKey;
use super::declare::declare_settings;
use super::logging::LogFormat;
use super::tls::ClusterTls;
use super::validate::{
    any, at_least_one, between, cluster_credentials, cluster_name, log_level, max_datagram,
    node_id, positive, threads,
};
use super::values::{
    parse_bind, parse_bool, parse_cluster_urls, parse_duration, parse_lobby, parse_metrics,
    parse_number, parse_path, parse_template, parse_text, parse_threads, parse_whole, Lobby,
    MetricsAddr, NatsUrls, Threads, DEFAULT_FANOUT_SLICE, DEFAULT_MAX_DATAGRAM,
    DEFAULT_SEND_BACKLOG, DEFAULT_SOCKET_BUFFER, MAX_SOCKET_BUFFER,
};
use crate::core::admission::COOKIE_PREFIX_RATE;
use crate::core::protocol::Template;
use crate::core::token::RoomSecret;

declare_settings! {
    /// The settings `udphub serve` runs with: each resolved from its flag,
    /// its environment variable, the `--config` file, or its default, in
    /// that order, and checked ([`Config::from_args`]).
    pub struct Config {
        /// Address to relay on: `IP:PORT`, `[IPv6]:PORT` or `HOST:PORT`.
        ///
        /// A host name is resolved once, at start; the first address wins.
        bind: SocketAddr {
            env: "UDPHUB_BIND",
            value: "ADDR",
            parse: parse_bind,
            default: value(SocketAddr::from(([127, 0, 0, 1], 9999))),
            check: any,
            reload: Restart,
        }
        /// Prometheus endpoint (`/metrics`) address, or `off`.
        metrics: MetricsAddr {
            env: "UDPHUB_METRICS",
            value: "ADDR|off",
            parse: parse_metrics,
            default: value(MetricsAddr::At(SocketAddr::from(([127, 0, 0, 1], 9898)))),
            check: any,
            reload: Restart,
        }
        /// Expire a client after this much silence.
        ///
        /// `10s`, `500ms`, `2m`, `1h 30m`; a bare number is seconds, fractions
        /// allowed (`0.5`). From 1 ms to 30 days.
        timeout: Duration {
            env: "UDPHUB_TIMEOUT",
            value: "DURATION",
            parse: parse_duration,
            default: value(Duration::from_secs(10)),
            check: between(Duration::from_millis(1), Duration::from_secs(30 * 86_400)),
            reload: Live,
        }
        /// What recipients get: a template with `{body}`, `{ip}` and
        /// `{port}`, or `raw` (the body unchanged).
        ///
        /// See docs/PROTOCOL.md.
        format: Template {
            env: "UDPHUB_FORMAT",
            value: "TEMPLATE",
            parse: parse_template,
            default: value(Template::default()),
            check: any,
            reload: Live,
        }
        /// Do not send a message back to its sender.
        no_echo: bool {
            env: "UDPHUB_NO_ECHO",
            value: "BOOL",
            parse: parse_bool,
            default: value(false),
            check: any,
            reload: Live,
        }
        /// Drop (and count) datagrams longer than this many bytes (1 to
        /// 65507).
        max_datagram: usize {
            env: "UDPHUB_MAX_DATAGRAM",
            value: "BYTES",
            parse: parse_whole::<usize>,
            default: value(DEFAULT_MAX_DATAGRAM),
            check: max_datagram,
            reload: Restart,
        }
        /// Refuse (and count) joins beyond this many clients.
        max_clients: usize {
            env: "UDPHUB_MAX_CLIENTS",
            value: "N",
            parse: parse_whole::<usize>,
            default: value(1_000_000),
            check: between(1, u32::MAX as usize - 1),
            reload: Live,
        }
        /// Reserve table room for this many clients at start (at most
        /// `--max-clients`), so the table never pauses to grow on the way
        /// there.
        ///
        /// Growing a table of ~1M pauses the loop for up to ~100 ms (rehash
        /// and copy), long enough to overflow the receive buffer. Reserved
        /// memory becomes resident only as clients arrive (a client costs
        /// ~135 B of RSS in all); with several loops it is split between
        /// them. A process taking over (`--takeover`) writes it once before
        /// it asks for the hand-over, so that registering the members faults
        /// in no page while the old relay is paused: there it is resident
        /// from the start.
        expect_clients: usize {
            env: "UDPHUB_EXPECT_CLIENTS",
            value: "N",
            parse: parse_whole::<usize>,
            default: value(0),
            check: any,
            reload: Restart,
        }
        /// SO_RCVBUF to request, in bytes. Left at 8 MiB, each loop asks
        /// for 4 B per client it expects (--expect-clients) when that is
        /// more: 40 MB for ten million on one loop. The kernel caps it at
        /// net.core.rmem_max unless the relay has CAP_NET_ADMIN (root),
        /// which forces it past the cap (SO_RCVBUFFORCE).
        recv_buffer: usize {
            env: "UDPHUB_RECV_BUFFER",
            value: "BYTES",
            parse: parse_whole::<usize>,
            default: value(DEFAULT_SOCKET_BUFFER),
            check: between(1, MAX_SOCKET_BUFFER),
            reload: Restart,
        }
        /// SO_SNDBUF to request, in bytes. Capped at net.core.wmem_max, and
        /// never forced past it: a send queue the kernel pushes back on is
        /// what parks a fan-out before a NIC's queue drops it unreported.
        send_buffer: usize {
            env: "UDPHUB_SEND_BUFFER",
            value: "BYTES",
            parse: parse_whole::<usize>,
            default: value(DEFAULT_SOCKET_BUFFER),
            check: between(1, MAX_SOCKET_BUFFER),
            reload: Restart,
        }
        /// Bytes of unfinished fan-outs and replies each loop may park (at
        /// least 65536): what a full send buffer or a sliced big room
        /// waits in.
        ///
        /// A fan-out the kernel's send buffer cannot take at once waits
        /// here for the socket to be writable, and a message to a room
        /// whose fan-out is parked waits behind it, so nothing is dropped
        /// for a momentarily full buffer; only when this is full are the
        /// deliveries a message had left dropped, counted `backlog_full`.
        /// A parked message costs its size plus ~100 bytes. Replies
        /// (`^room^`, `^denied^`, …) wait the same way, first, in a
        /// sixteenth of this (at most 1 MiB: ~10,000 answers; a reply costs
        /// its size plus ~50 bytes); the fan-outs get the rest.
        send_backlog: usize {
            env: "UDPHUB_SEND_BACKLOG",
            value: "BYTES",
            parse: parse_whole::<usize>,
            default: value(DEFAULT_SEND_BACKLOG),
            check: between(1 << 16, 1 << 40),
            reload: Restart,
        }
        /// Members one fan-out sends to before the loop reads again (1 to
        /// 16777216).
        ///
        /// A message to a bigger room is sent in slices of this many,
        /// between reads, so heartbeats and other rooms never wait for a
        /// huge room (4096 take 1–2 ms); its room's next messages wait
        /// behind it, in order. A slice also ends after 1 ms, whatever its
        /// size, where deliveries cost more.
        fanout_slice: usize {
            env: "UDPHUB_FANOUT_SLICE",
            value: "N",
            parse: parse_whole::<usize>,
            default: value(DEFAULT_FANOUT_SLICE),
            check: between(1, 1 << 24),
            reload: Restart,
        }
        /// Log filter: `error`, `warn`, `info`, `debug`, `trace`, `off`, or
        /// `target=level` directives such as `udphub=debug`.
        ///
        /// Release builds compile `debug` and `trace` out of the loop:
        /// asking for them there logs at `info`, with one note saying so.
        log_level: String {
            env: "UDPHUB_LOG_LEVEL",
            value: "FILTER",
            parse: parse_text,
            default: value("info".to_string()),
            check: log_level,
            reload: Live,
        }
        /// Log lines as `text` or `json` (one object per line).
        log_format: LogFormat {
            env: "UDPHUB_LOG_FORMAT",
            value: "text|json",
            parse: LogFormat::parse,
            default: value(LogFormat::Text),
            check: any,
            reload: Restart,
        }
        /// Refuse (and count, `full`) joins that would make more named rooms
        /// than this.
        max_rooms: usize {
            env: "UDPHUB_MAX_ROOMS",
            value: "N",
            parse: parse_whole::<usize>,
            default: value(100_000),
            check: any,
            reload: Live,
        }
        /// Refuse (and count, `full`) joins to a named room that has this
        /// many members.
        max_room_clients: usize {
            env: "UDPHUB_MAX_ROOM_CLIENTS",
            value: "N",
            parse: parse_whole::<usize>,
            default: value(100_000),
            check: any,
            reload: Live,
        }
        /// File holding the room secret: every named room then needs a
        /// token.
        ///
        /// The HS256 key is the file's bytes less a trailing newline, at
        /// least 32 (e.g. `openssl rand -hex 32 > FILE`); see
        /// docs/PROTOCOL.md. The secret itself is never taken on the command
        /// line and never logged. A reload reads the file again: that is
        /// how to rotate the secret.
        room_secret_file: PathBuf {
            env: "UDPHUB_ROOM_SECRET_FILE",
            value: "FILE",
            parse: parse_path,
            default: none("none"),
            check: any,
            reload: Live,
        }
        /// With a room secret: whether clients outside any room may talk
        /// (`open`) or must join one first (`closed`, which needs
        /// `--room-secret-file`).
        lobby: Lobby {
            env: "UDPHUB_LOBBY",
            value: "open|closed",
            parse: parse_lobby,
            default: value(Lobby::Open),
            check: any,
            reload: Live,
        }
        /// Verify mode: a source must prove its address with a cookie before
        /// it is registered or relayed to.
        ///
        /// See docs/SECURITY.md.
        verify_sources: bool {
            env: "UDPHUB_VERIFY_SOURCES",
            value: "BOOL",
            parse: parse_bool,
            default: value(false),
            check: any,
            reload: Restart,
        }
        /// Verify mode: cookie replies per second to one /24 (IPv4) or /56
        /// (IPv6).
        ///
        /// At least 100 at once, all loops together; under a flood from many
        /// prefixes each gets a fair share of 20,000/s (docs/SECURITY.md).
        /// Raise it when many clients share one prefix (a big NAT, a load
        /// test).
        cookie_rate: f64 {
            env: "UDPHUB_COOKIE_RATE",
            value: "PER_SEC",
            parse: parse_number,
            default: value(COOKIE_PREFIX_RATE),
            check: positive,
            reload: Live,
        }
        /// Drop (and count, `rate_limited`) a client's datagrams beyond this
        /// many per second.
        client_rate: f64 {
            env: "UDPHUB_CLIENT_RATE",
            value: "PER_SEC",
            parse: parse_number,
            default: none("no limit"),
            check: positive,
            reload: Live,
        }
        /// How many datagrams a client may send at once above
        /// `--client-rate`.
        client_burst: f64 {
            env: "UDPHUB_CLIENT_BURST",
            value: "N",
            parse: parse_number,
            default: none("twice the rate"),
            check: at_least_one,
            reload: Live,
        }
        /// Refuse (and count, `ip_full`) new clients from an IP address that
        /// has this many.
        max_clients_per_ip: u32 {
            env: "UDPHUB_MAX_CLIENTS_PER_IP",
            value: "N",
            parse: parse_whole::<u32>,
            default: none("no limit"),
            check: between(1, u32::MAX),
            reload: Live,
        }
        /// For an internet-facing relay: `--verify-sources`, `--client-rate
        /// 200` and `--max-clients-per-ip 64`, each unless set otherwise.
        ///
        /// A flag, variable or key of its own wins over the preset: `public
        /// = true` with `verify-sources = false` keeps the limits without
        /// verify mode.
        public: bool {
            env: "UDPHUB_PUBLIC",
            value: "BOOL",
            parse: parse_bool,
            default: value(false),
            check: any,
            reload: Live,
        }
        /// Share rooms with other relays through these NATS servers:
        /// comma-separated `nats://HOST:PORT`, or `tls://HOST:PORT` for TLS.
        ///
        /// A NATS user logs in with `nats://USER:PASSWORD@HOST:PORT`: put
        /// that in `UDPHUB_CLUSTER` or the `--config` file, not on the
        /// command line (which any local user can read); the password is
        /// never logged or shown. See docs/CLUSTER.md. Without it no
        /// cluster thread runs.
        cluster: NatsUrls {
            env: "UDPHUB_CLUSTER",
            value: "URLS",
            parse: parse_cluster_urls,
            default: none("none"),
            check: any,
            reload: Restart,
        }
        /// With `--cluster`: the subject prefix (not ending in `.room`);
        /// relays with the same cluster name share rooms.
        cluster_name: String {
            env: "UDPHUB_CLUSTER_NAME",
            value: "NAME",
            parse: parse_text,
            default: value("udphub".to_string()),
            check: cluster_name,
            reload: Restart,
        }
        /// With `--cluster`: this relay's name on the bus (its NATS
        /// connection name).
        node_id: String {
            env: "UDPHUB_NODE_ID",
            value: "ID",
            parse: parse_text,
            default: computed(default_node_id, "HOSTNAME-PID"),
            check: node_id,
            reload: Restart,
        }
        /// With `--cluster`: a NATS credentials file (`.creds`), if the
        /// servers require one (the credentials stay in the file, never on
        /// the command line).
        cluster_credentials: PathBuf {
            env: "UDPHUB_CLUSTER_CREDENTIALS",
            value: "FILE",
            parse: parse_path,
            default: none("none"),
            check: cluster_credentials,
            reload: Restart,
        }
        /// With `--cluster`: the CA certificates (PEM) that sign the NATS
        /// servers' certificates; TLS is then required.
        ///
        /// Without it, `tls://` URLs trust the system's CAs. Read once, at
        /// start (at most 1 MiB); see docs/CLUSTER.md.
        cluster_ca: PathBuf {
            env: "UDPHUB_CLUSTER_CA",
            value: "FILE",
            parse: parse_path,
            default: none("the system's CAs"),
            check: any,
            reload: Restart,
        }
        /// With `--cluster`: this relay's certificate (PEM, the chain from
        /// it up), for NATS servers that verify clients (mutual TLS); needs
        /// `--cluster-cert-key`.
        cluster_cert: PathBuf {
            env: "UDPHUB_CLUSTER_CERT",
            value: "FILE",
            parse: parse_path,
            default: none("none"),
            check: any,
            reload: Restart,
        }
        /// With `--cluster-cert`: its private key (PEM: PKCS#8, RSA or EC).
        ///
        /// Read once, at start; never logged.
        cluster_cert_key: PathBuf {
            env: "UDPHUB_CLUSTER_CERT_KEY",
            value: "FILE",
            parse: parse_path,
            default: none("none"),
            check: any,
            reload: Restart,
        }
        /// With `--cluster`: file holding the cluster key; every message on
        /// the bus is then tagged with it, and untagged or wrongly tagged
        /// ones are dropped and counted.
        ///
        /// The key is the file's bytes less a trailing newline, at least 32
        /// (e.g. `openssl rand -hex 32 > FILE`), the same on every relay of
        /// the cluster; never taken on the command line, never logged. A
        /// reload reads the file again: the new key signs at once, the old
        /// one is still accepted for 60 s (docs/CLUSTER.md).
        cluster_key_file: PathBuf {
            env: "UDPHUB_CLUSTER_KEY_FILE",
            value: "FILE",
            parse: parse_path,
            default: none("none"),
            check: any,
            reload: Live,
        }
        /// Loops relaying on the address, each on its own thread with its
        /// own SO_REUSEPORT socket and its own clients (1 to 64); `auto` =
        /// the CPUs this process may use.
        ///
        /// More loops send more deliveries a second on more cores (2 loops:
        /// 1.9x one, docs/BENCHMARKS.md); docs/ARCHITECTURE.md says what is
        /// per loop.
        threads: Threads {
            env: "UDPHUB_THREADS",
            value: "N|auto",
            parse: parse_threads,
            default: value(Threads::Count(1)),
            check: threads,
            reload: Restart,
        }
        /// Pin loop *i* to the *i*-th CPU this process may use.
        pin_threads: bool {
            env: "UDPHUB_PIN_THREADS",
            value: "BOOL",
            parse: parse_bool,
            default: value(false),
            check: any,
            reload: Restart,
        }
        /// Once bound, write the addresses to this file (`udp=ADDR` and
        /// `metrics=ADDR` or `metrics=off`), for scripts and tests.
        ///
        /// Written once both sockets are bound and signals are handled,
        /// atomically (aside, then renamed). With `--bind 127.0.0.1:0
        /// --metrics 127.0.0.1:0` this is how a script learns the ports the
        /// kernel chose.
        ready_file: PathBuf {
            env: "UDPHUB_READY_FILE",
            value: "FILE",
            parse: parse_path,
            default: none("none"),
            check: any,
            reload: Restart,
        }
        /// Unix socket a new udphub process takes this one over through
        /// (`udphub serve --takeover PATH`), or none.
        ///
        /// Created mode 0600: only the relay's user can take it over. A
        /// stale socket a crashed relay left at PATH is replaced; anything
        /// else there is refused. A hand-over passes the UDP sockets and
        /// every member to the new process, which may be a newer binary;
        /// SIGUSR2 makes the relay start it itself, as its child, with
        /// the same binary path and arguments (docs/OPERATIONS.md,
        /// "Upgrading without a restart").
        control: PathBuf {
            env: "UDPHUB_CONTROL",
            value: "PATH",
            parse: parse_path,
            default: none("none"),
            check: any,
            reload: Restart,
        }
    }
    loaded {
        /// The room secret, read from `room_secret_file` when the settings
        /// are resolved (at start and on each reload). Never shown.
        room_secret: Option<RoomSecret>,
        /// TLS to NATS, read from `cluster_ca`, `cluster_cert` and
        /// `cluster_cert_key` at start (a reload keeps the running one).
        cluster_tls: Option<ClusterTls>,
        /// The cluster key, read from `cluster_key_file` when the settings
        /// are resolved (at start and on each reload). Never shown.
        cluster_key: Option<ClusterKey>,
    }
}

/// What `--public` sets, unless given otherwise: datagrams per second per
/// client (a chat at a few messages a second, with room for bursts).
pub const PUBLIC_CLIENT_RATE: f64 = 200.0;
/// What `--public` sets: clients per IP (a NAT of a few dozen people).
pub const PUBLIC_CLIENTS_PER_IP: u32 = 64;

impl Layer {
    /// What `--public` sets: a layer between the config file and the
    /// defaults, so that anything set explicitly wins over it.
    pub fn public_preset() -> Layer {
        Layer {
            verify_sources: Some(true),
            client_rate: Some(PUBLIC_CLIENT_RATE),
            max_clients_per_ip: Some(PUBLIC_CLIENTS_PER_IP),
            ..Layer::default()
        }
    }
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
