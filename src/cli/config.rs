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
use serde::Deserialize;

use crate::core::hub::HubConfig;
use crate::core::protocol::Template;
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

    /// Address to relay on, IPv4 or IPv6 (e.g. `[::1]:9999`) [default: 127.0.0.1:9999]
    #[arg(long, env = "UDPHUB_BIND", value_name = "ADDR")]
    pub bind: Option<SocketAddr>,

    /// Prometheus endpoint address, or `off` [default: 127.0.0.1:9898]
    #[arg(long, env = "UDPHUB_METRICS", value_name = "ADDR|off", value_parser = parse_metrics)]
    pub metrics: Option<MetricsAddr>,

    /// Expire a client after this much silence, e.g. `10s`, `500ms`, `2m` [default: 10s]
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

    /// Once bound, write the addresses to this file (`udp=ADDR`, `metrics=ADDR|off`), for scripts and tests using port 0
    #[arg(long, env = "UDPHUB_READY_FILE", value_name = "FILE")]
    pub ready_file: Option<PathBuf>,
}

/// Where to serve `/metrics`, or nowhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricsAddr {
    /// `--metrics off`.
    Off,
    /// Listen here.
    At(SocketAddr),
}

/// The `--config` file. Keys are the flag names.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileConfig {
    bind: Option<String>,
    metrics: Option<String>,
    timeout: Option<String>,
    format: Option<String>,
    no_echo: Option<bool>,
    max_datagram: Option<usize>,
    max_clients: Option<usize>,
    expect_clients: Option<usize>,
    recv_buffer: Option<usize>,
    send_buffer: Option<usize>,
    log_level: Option<String>,
    ready_file: Option<PathBuf>,
}

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
    /// Where to write the bound addresses once ready, if anywhere.
    pub ready_file: Option<PathBuf>,
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
            ready_file: None,
        }
    }
}

impl Config {
    /// What the hub needs of these settings.
    pub fn hub(&self) -> HubConfig {
        HubConfig {
            timeout: self.timeout,
            format: self.format.clone(),
            echo: self.echo,
            max_clients: self.max_clients,
            expect_clients: self.expect_clients,
            max_datagram: self.max_datagram,
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
        let ctx = |key: &str, e: String| Error::Config(format!("config file: {key}: {e}"));

        let bind = match (args.bind, &file.bind) {
            (Some(b), _) => b,
            (None, Some(s)) => s
                .parse()
                .map_err(|_| ctx("bind", format!("invalid socket address {s:?}")))?,
            (None, None) => d.bind,
        };
        let metrics = match (args.metrics, &file.metrics) {
            (Some(m), _) => m,
            (None, Some(s)) => parse_metrics(s).map_err(|e| ctx("metrics", e))?,
            (None, None) => d.metrics.map_or(MetricsAddr::Off, MetricsAddr::At),
        };
        let timeout = match (args.timeout, &file.timeout) {
            (Some(t), _) => t,
            (None, Some(s)) => parse_duration(s).map_err(|e| ctx("timeout", e))?,
            (None, None) => d.timeout,
        };
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
            ready_file: args.ready_file.clone().or(file.ready_file),
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks the limits every setting must respect (run by
    /// [`from_args`](Self::from_args); call it yourself only for a
    /// `Config` built by hand).
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |m: String| Err(Error::Config(m));
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
        if let Some(m) = self.metrics {
            if m == self.bind && m.port() != 0 {
                // Different protocols could share the port, but it is almost
                // certainly a typo, and confusing to operate.
                return bad(format!("--metrics and --bind are both {m}"));
            }
        }
        tracing_subscriber::EnvFilter::try_new(&self.log_level)
            .map_err(|e| Error::Config(format!("--log-level {:?}: {e}", self.log_level)))?;
        Ok(())
    }
}

fn read_file(path: &Path) -> Result<FileConfig, Error> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Config(format!("cannot read config file {}: {e}", path.display())))?;
    toml::from_str(&text).map_err(|e| {
        // toml's messages span several lines (with a source excerpt); keep
        // the error to one line.
        let msg = e.message().replace('\n', " ");
        let at = e
            .span()
            .map(|s| format!(" (at byte {})", s.start))
            .unwrap_or_default();
        Error::Config(format!("config file {}: {msg}{at}", path.display()))
    })
}

/// Parses `--metrics`: `off` or a socket address.
pub fn parse_metrics(s: &str) -> Result<MetricsAddr, String> {
    if s.eq_ignore_ascii_case("off") {
        return Ok(MetricsAddr::Off);
    }
    s.parse()
        .map(MetricsAddr::At)
        .map_err(|_| format!("expected a socket address like 127.0.0.1:9898, or `off`; got {s:?}"))
}

/// Parses a human duration (`10s`, `500ms`, `1m 30s`); a bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(s).map_err(|e| format!("{e} in {s:?} (try e.g. 10s, 500ms, 2m)"))
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
        assert_eq!(parse_duration("1m 30s").unwrap(), Duration::from_secs(90));
        assert!(parse_duration("ten").is_err());
        assert_eq!(parse_metrics("OFF").unwrap(), MetricsAddr::Off);
        assert!(parse_metrics("localhost").is_err());
    }
}
