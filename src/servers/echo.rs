//! `udphub echo`: the echo server of the seeds (004's plain echo, 001's
//! upper-casing one), as a [`Service`] on the same [`EventLoop`] as the
//! relay — so it has the same batching, drop accounting, metrics and signal
//! handling, and makes an honest round-trip baseline for load tests.
//!
//! Every datagram is sent back to its sender (ASCII-upper-cased with
//! `--upper`, like Python's `bytes.upper()`). Unlike seed 004, `quit` is
//! echoed, not obeyed: no datagram from the network may stop a server.
//! With `--tcp`, seed 001's TCP server instead ([`crate::servers::tcp_echo`]).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;

use crate::config::{self, MetricsAddr, DEFAULT_SEND_BACKLOG, DEFAULT_SOCKET_BUFFER};
use crate::core::admission::{Admission, Arrival};
use crate::core::reply_backlog;
use crate::error::Error;
use crate::net::socket;
use crate::runtime::event_loop::{EventLoop, Io, Pending, RateLimitedLog, Service};
use crate::runtime::exporter;
use crate::runtime::replies::Replies;
use crate::runtime::supervisor::{self, Supervisor};
use crate::servers::tcp_echo;

/// `udphub echo` flags.
#[derive(Debug, Clone, Args)]
pub struct EchoArgs {
    /// Address to answer on (seed 004 used port 50007) [default: 127.0.0.1:50007]
    #[arg(
        long,
        env = "UDPHUB_ECHO_BIND",
        value_name = "ADDR",
        default_value = "127.0.0.1:50007",
        hide_default_value = true,
        value_parser = |s: &str| config::parse_addr(s, 50007)
    )]
    pub bind: SocketAddr,

    /// Reply in upper case (ASCII letters), like seed 001
    #[arg(long)]
    pub upper: bool,

    /// Echo over TCP instead (seed 001's ThreadingTCPServer, as one loop): each read sent back, the connection closed at EOF
    #[arg(long)]
    pub tcp: bool,

    /// With --tcp: most connections at once; more are accepted and closed at once (and counted)
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    pub max_connections: usize,

    /// With --tcp: close a connection that sent nothing for this long (reading alone does not keep it open)
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = config::parse_duration)]
    pub idle_timeout: std::time::Duration,

    /// With --tcp: most bytes all connections' buffers hold together (what their clients have not read back yet); at the cap, connections are not read until memory frees (counted, nothing dropped)
    #[arg(long, value_name = "BYTES", default_value_t = tcp_echo::DEFAULT_BUFFER_BYTES)]
    pub max_buffer_bytes: usize,

    /// Prometheus endpoint address, or `off` [default: off]
    #[arg(long, env = "UDPHUB_ECHO_METRICS", value_name = "ADDR|off", default_value = "off", hide_default_value = true, value_parser = config::parse_metrics)]
    pub metrics: MetricsAddr,

    /// Drop (and count) datagrams longer than this many bytes
    #[arg(long, value_name = "BYTES", default_value_t = config::DEFAULT_MAX_DATAGRAM)]
    pub max_datagram: usize,

    /// Log filter: error, warn, info, debug, trace, or target=level directives [default: info]
    #[arg(
        long,
        env = "UDPHUB_LOG_LEVEL",
        value_name = "FILTER",
        default_value = "info",
        hide_default_value = true
    )]
    pub log_level: String,

    /// Log lines as `text` or `json` (one object per line)
    #[arg(
        long,
        env = "UDPHUB_LOG_FORMAT",
        value_name = "text|json",
        default_value = "text"
    )]
    pub log_format: config::LogFormat,

    /// Once bound, write the addresses to this file (`udp=ADDR`, `metrics=ADDR|off`)
    #[arg(long, value_name = "FILE")]
    pub ready_file: Option<PathBuf>,
}

/// The echo server's state: this batch's replies.
pub struct Echo {
    /// `--upper`.
    upper: bool,
    /// This batch's replies, sent together at its end; and those waiting
    /// for room in the send buffer (up to the relay's default share of
    /// `--send-backlog`, which the echo server has no flag for).
    replies: Replies,
    /// Throttles send-error logging.
    send_errors: RateLimitedLog,
}

impl Echo {
    /// An echo service; `upper` upper-cases replies.
    pub fn new(upper: bool, max_datagram: usize) -> Echo {
        Echo {
            upper,
            replies: Replies::new(max_datagram, reply_backlog::share_of(DEFAULT_SEND_BACKLOG)),
            send_errors: RateLimitedLog::default(),
        }
    }
}

impl Service for Echo {
    fn handle(&mut self, arrival: Arrival<'_>, io: &mut Io<'_>) {
        let (source, data) = match Admission::envelope(&arrival) {
            Ok(admitted) => admitted,
            Err(reason) => {
                io.counts.drop(reason);
                return;
            }
        };
        io.counts.messages += 1;
        let queued = self.replies.push(source, data, io, &mut self.send_errors);
        if self.upper {
            queued.make_ascii_uppercase();
        }
    }

    /// Sends the batch's replies with one `sendmmsg` (or a few).
    fn end_batch(&mut self, io: &mut Io<'_>) {
        let elapsed = io.received_at.elapsed().as_secs_f64();
        io.counts
            .fanout_seconds
            .extend(std::iter::repeat_n(elapsed, self.replies.len()));
        self.replies.flush(io, &mut self.send_errors);
    }

    /// Sends the echoes that waited for room in the send buffer.
    fn resume(&mut self, io: &mut Io<'_>) -> Pending {
        self.replies.resume(io, &mut self.send_errors)
    }

    /// Drops the echoes still waiting, counted `shutdown`.
    fn shutdown(&mut self, io: &mut Io<'_>) {
        let dropped = self.replies.abandon(io.counts);
        if dropped > 0 {
            tracing::info!(
                event = "backlog_dropped",
                replies = dropped,
                "dropped {dropped} parked replies at shutdown"
            );
        }
    }
}

/// Runs `udphub echo` until SIGINT/SIGTERM.
pub fn run(args: &EchoArgs) -> Result<(), Error> {
    config::validate::max_datagram(&args.max_datagram)
        .map_err(|why| Error::Config(format!("--max-datagram {why}")))?;
    if args.tcp {
        return run_tcp(args);
    }
    let supervisor = Supervisor::new()?;
    let metrics = match args.metrics {
        MetricsAddr::At(addr) => Some(exporter::start(addr)?.local_addr),
        MetricsAddr::Off => None,
    };
    let bound = socket::bind(
        args.bind,
        "echo socket",
        DEFAULT_SOCKET_BUFFER,
        DEFAULT_SOCKET_BUFFER,
        false,
    )?;
    socket::report_buffers(&bound, DEFAULT_SOCKET_BUFFER, DEFAULT_SOCKET_BUFFER, false);
    tracing::info!(
        event = "start",
        addr = %bound.local_addr,
        upper = args.upper,
        "udphub echo on {}{}",
        bound.local_addr,
        if args.upper { " (upper-casing)" } else { "" }
    );
    if let Some(addr) = metrics {
        tracing::info!(event = "metrics", addr = %addr, "metrics on http://{addr}/metrics");
    }
    if let Some(path) = &args.ready_file {
        supervisor::write_ready_file(path, "udp", bound.local_addr, metrics)?;
    }
    let server = EventLoop::new(
        bound,
        args.max_datagram,
        Echo::new(args.upper, args.max_datagram),
    )?;
    supervisor.run(vec![server])
}

/// `udphub echo --tcp`.
fn run_tcp(args: &EchoArgs) -> Result<(), Error> {
    if args.max_connections == 0 {
        return Err(Error::Config("--max-connections must be at least 1".into()));
    }
    if args.idle_timeout.is_zero() {
        return Err(Error::Config("--idle-timeout must be more than 0".into()));
    }
    if args.max_buffer_bytes < tcp_echo::MIN_BUFFER_BYTES {
        return Err(Error::Config(format!(
            "--max-buffer-bytes must be at least {} (one connection's full buffer), got {}",
            tcp_echo::MIN_BUFFER_BYTES,
            args.max_buffer_bytes
        )));
    }
    let metrics = match args.metrics {
        MetricsAddr::At(addr) => Some(exporter::start(addr)?.local_addr),
        MetricsAddr::Off => None,
    };
    if let Some(addr) = metrics {
        tracing::info!(event = "metrics", addr = %addr, "metrics on http://{addr}/metrics");
    }
    let config = tcp_echo::TcpEchoConfig {
        bind: args.bind,
        upper: args.upper,
        max_connections: args.max_connections,
        idle_timeout: args.idle_timeout,
        max_buffer_bytes: args.max_buffer_bytes,
    };
    tcp_echo::run(&config, metrics, args.ready_file.as_deref())
}
