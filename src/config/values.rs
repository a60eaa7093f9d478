//! The types of `udphub serve`'s settings, and one parser for each: a
//! flag, its environment variable and the config file's value all go
//! through the same function, so they accept the same things and say the
//! same thing about a mistake. [`Value`] adds, per type, how the config
//! file writes it and how it is shown (`--check-config`, reload's log
//! lines, the settings table in docs/OPERATIONS.md).

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::config::logging::LogFormat;
use crate::core::protocol::Template;

/// The largest UDP payload over IPv4 (65535 − 20 IP − 8 UDP header bytes).
pub const MAX_UDP_PAYLOAD: usize = 65_507;
/// Default `--max-datagram`: the payload that fits a 1500-byte Ethernet MTU
/// (1500 − 20 IPv4 − 8 UDP), so a relayed body is never IP-fragmented.
pub const DEFAULT_MAX_DATAGRAM: usize = 1472;
/// Default socket buffer request: 8 MiB holds ~4 ms of a 10 Gbit/s burst or
/// ~10k small datagrams, enough to ride out a scheduling hiccup.
pub const DEFAULT_SOCKET_BUFFER: usize = 8 << 20;
/// The most a socket buffer setting may ask for: Linux grants at most
/// `i32::MAX / 2` (it doubles what it grants for its bookkeeping).
pub const MAX_SOCKET_BUFFER: usize = (i32::MAX / 2) as usize;
/// Receive buffer asked for per client a loop expects (`--expect-clients`)
/// when `--recv-buffer` is left at its default and this comes to more: a
/// big table's heartbeats arrive at a rate that grows with it, and the
/// queue must hold them while the loop is busy. A small datagram takes
/// ~1.2 KB of the buffer on loopback, so ten million clients on one loop
/// get 40 MB: ~33,000 datagrams, 200 ms of heartbeats every 60 s.
pub const RECV_BUFFER_PER_EXPECTED_CLIENT: usize = 4;
/// Default `--fanout-slice`: 4096 member-list positions take a loop about
/// 1–2 ms to send (16 `sendmmsg` calls of 256), so it reads again well
/// within 5 ms however big the room.
pub const DEFAULT_FANOUT_SLICE: usize = 4096;
/// Default `--send-backlog`: 16 MiB of parked fan-outs per loop, about
/// 13,000 full-size messages, or the bursts of tens of thousands of rooms.
pub const DEFAULT_SEND_BACKLOG: usize = 16 << 20;

/// A setting's type, as the config file and the operator see it.
pub trait Value: Clone + PartialEq + fmt::Debug + Send + Sync + 'static {
    /// What the config file must hold, in words, for "KEY must be …, not …".
    const IN_FILE: &'static str;
    /// Whether the flag may stand alone: `--no-echo` is `--no-echo=true`.
    const SWITCH: bool = false;
    /// The text of a TOML value, for the setting's parser; `None` if the
    /// value has the wrong TOML type (a number in quotes, a bare word).
    fn file_text(value: &toml::Value) -> Option<String>;
    /// The value in words.
    fn show(&self) -> String;
}

/// A TOML string's text.
fn text(value: &toml::Value) -> Option<String> {
    value.as_str().map(str::to_string)
}

/// A TOML integer that is not negative, as text.
fn whole(value: &toml::Value) -> Option<String> {
    value
        .as_integer()
        .filter(|n| *n >= 0)
        .map(|n| n.to_string())
}

/// A TOML integer or float, as text.
fn number(value: &toml::Value) -> Option<String> {
    match value {
        toml::Value::Integer(n) => Some(n.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        _ => None,
    }
}

impl Value for bool {
    const IN_FILE: &'static str = "true or false (no quotes)";
    const SWITCH: bool = true;
    fn file_text(value: &toml::Value) -> Option<String> {
        value.as_bool().map(|b| b.to_string())
    }
    fn show(&self) -> String {
        self.to_string()
    }
}

impl Value for usize {
    const IN_FILE: &'static str = "a whole number, not negative, without quotes";
    fn file_text(value: &toml::Value) -> Option<String> {
        whole(value)
    }
    fn show(&self) -> String {
        self.to_string()
    }
}

impl Value for u32 {
    const IN_FILE: &'static str = "a whole number, not negative, without quotes";
    fn file_text(value: &toml::Value) -> Option<String> {
        whole(value)
    }
    fn show(&self) -> String {
        self.to_string()
    }
}

impl Value for f64 {
    const IN_FILE: &'static str = "a number, without quotes";
    fn file_text(value: &toml::Value) -> Option<String> {
        number(value)
    }
    fn show(&self) -> String {
        self.to_string()
    }
}

impl Value for Duration {
    const IN_FILE: &'static str = "a duration like \"10s\" or \"500ms\", or a number of seconds";
    fn file_text(value: &toml::Value) -> Option<String> {
        text(value).or_else(|| number(value))
    }
    fn show(&self) -> String {
        humantime::format_duration(*self).to_string()
    }
}

impl Value for String {
    const IN_FILE: &'static str = "a quoted string";
    fn file_text(value: &toml::Value) -> Option<String> {
        text(value)
    }
    fn show(&self) -> String {
        self.clone()
    }
}

impl Value for PathBuf {
    const IN_FILE: &'static str = "a quoted file path";
    fn file_text(value: &toml::Value) -> Option<String> {
        text(value)
    }
    fn show(&self) -> String {
        self.display().to_string()
    }
}

impl Value for SocketAddr {
    const IN_FILE: &'static str = "a quoted address like \"127.0.0.1:9999\"";
    fn file_text(value: &toml::Value) -> Option<String> {
        text(value)
    }
    fn show(&self) -> String {
        self.to_string()
    }
}

impl Value for MetricsAddr {
    const IN_FILE: &'static str = "a quoted address like \"127.0.0.1:9898\", or \"off\"";
    fn file_text(value: &toml::Value) -> Option<String> {
        text(value)
    }
    fn show(&self) -> String {
        match self {
            MetricsAddr::Off => "off".into(),
            MetricsAddr::At(addr) => addr.to_string(),
        }
    }
}

impl Value for Template {
    const IN_FILE: &'static str = "a quoted template like \"{body}. from {ip}:{port}\", or \"raw\"";
    fn file_text(value: &toml::Value) -> Option<String> {
        text(value)
    }
    /// Quoted: a template may begin or end with spaces.
    fn show(&self) -> String {
        format!("{:?}", self.spec())
    }
}

impl Value for LogFormat {
    const IN_FILE: &'static str = "\"text\" or \"json\"";
    fn file_text(value: &toml::Value) -> Option<String> {
        text(value)
    }
    fn show(&self) -> String {
        match self {
            LogFormat::Text => "text".into(),
            LogFormat::Json => "json".into(),
        }
    }
}

impl Value for Lobby {
    const IN_FILE: &'static str = "\"open\" or \"closed\"";
    fn file_text(value: &toml::Value) -> Option<String> {
        text(value)
    }
    fn show(&self) -> String {
        match self {
            Lobby::Open => "open".into(),
            Lobby::Closed => "closed".into(),
        }
    }
}

impl Value for NatsUrls {
    const IN_FILE: &'static str = "a quoted list, \"nats://HOST:PORT[,…]\"";
    fn file_text(value: &toml::Value) -> Option<String> {
        text(value)
    }
    fn show(&self) -> String {
        // The password never: this is what --check-config and reload print.
        match &self.login {
            Some(login) => format!("{} as user {:?}", self.servers.join(","), login.user),
            None => self.servers.join(","),
        }
    }
}

impl Value for Threads {
    const IN_FILE: &'static str = "a number of loops, or \"auto\"";
    fn file_text(value: &toml::Value) -> Option<String> {
        whole(value).or_else(|| text(value))
    }
    /// `auto` says what it comes to on this machine.
    fn show(&self) -> String {
        match self {
            Threads::Count(n) => n.to_string(),
            Threads::Auto => format!("auto ({})", self.resolve()),
        }
    }
}

/// Parses a whole number (`--max-clients`, byte counts).
pub fn parse_whole<T: FromStr>(s: &str) -> Result<T, String> {
    s.trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a whole number (0 or more, no sign or unit)"))
}

/// Parses a number, fractions allowed (rates).
pub fn parse_number(s: &str) -> Result<f64, String> {
    s.trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number"))
}

/// Parses a yes or no: `true`/`false`, `1`/`0`, `yes`/`no`, `on`/`off`
/// (what an environment variable is likely to hold).
pub fn parse_bool(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "y" | "on" => Ok(true),
        "false" | "0" | "no" | "n" | "off" => Ok(false),
        _ => Err(format!(
            "{s:?}: expected true or false (or 1/0, yes/no, on/off)"
        )),
    }
}

/// Takes any text (checked later, where there is one rule to check).
pub fn parse_text(s: &str) -> Result<String, String> {
    Ok(s.to_string())
}

/// Takes a file path.
pub fn parse_path(s: &str) -> Result<PathBuf, String> {
    if s.is_empty() {
        return Err("expected a file path, got nothing".into());
    }
    Ok(PathBuf::from(s))
}

/// Parses `--format` (see [`Template::parse`]).
pub fn parse_template(s: &str) -> Result<Template, String> {
    Template::parse(s).map_err(|e| e.to_string())
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

/// NATS server URLs (`--cluster`), with the user and password that
/// `nats://USER:PASSWORD@HOST:PORT` names kept apart: the URLs here are
/// what logs and `--check-config` show, so a password is never printed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsUrls {
    /// `nats://HOST:PORT` or `tls://HOST:PORT`, less any `USER:PASSWORD@`.
    pub servers: Vec<String>,
    /// The user the URLs name (every URL that names one names the same).
    pub login: Option<NatsLogin>,
}

impl NatsUrls {
    /// Whether any server is to be reached over TLS (`tls://`).
    pub fn wants_tls(&self) -> bool {
        self.servers.iter().any(|u| u.starts_with("tls://"))
    }
}

/// A NATS user and password (from `nats://USER:PASSWORD@…`). Its `Debug`
/// leaves the password out.
#[derive(Clone, PartialEq, Eq)]
pub struct NatsLogin {
    /// The user.
    pub user: String,
    /// The password (never shown).
    pub password: String,
}

impl fmt::Debug for NatsLogin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsLogin")
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// `--cluster`: comma-separated `nats://host:port` or `tls://host:port`
/// URLs (`host:port` gets `nats://`), each optionally with `USER:PASSWORD@`
/// (percent-encoded, as in any URL).
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
    let mut servers = Vec::with_capacity(urls.len());
    let mut login: Option<NatsLogin> = None;
    for u in &urls {
        let (scheme, rest) = u
            .split_once("://")
            .filter(|(scheme, _)| matches!(*scheme, "nats" | "tls"))
            .ok_or_else(|| format!("{}: only nats:// and tls:// URLs", without_login(u)))?;
        let (userinfo, hostport) = match rest.rsplit_once('@') {
            Some((userinfo, hostport)) => (Some(userinfo), hostport),
            None => (None, rest),
        };
        let shown = format!("{scheme}://{hostport}");
        let port = hostport
            .rsplit_once(':')
            .map(|(_, p)| p)
            .ok_or_else(|| format!("{shown}: expected a port, as in nats://127.0.0.1:4222"))?;
        port.parse::<u16>()
            .map_err(|_| format!("{shown}: {port:?} is not a port number"))?;
        if let Some(userinfo) = userinfo {
            let (user, password) = userinfo.split_once(':').ok_or_else(|| {
                format!("{shown}: a user needs a password, as in nats://USER:PASSWORD@HOST:PORT")
            })?;
            let this = NatsLogin {
                user: percent_decode(user).map_err(|why| format!("{shown}: the user {why}"))?,
                password: percent_decode(password)
                    .map_err(|why| format!("{shown}: the password {why}"))?,
            };
            if this.user.is_empty() {
                return Err(format!("{shown}: the user is empty"));
            }
            if login.as_ref().is_some_and(|l| *l != this) {
                return Err(format!(
                    "{shown}: every URL that names a user must name the same user and password (NATS has one login per connection)"
                ));
            }
            login = Some(this);
        }
        servers.push(shown);
    }
    Ok(NatsUrls { servers, login })
}

/// A URL with any `USER:PASSWORD@` cut out, for an error message.
fn without_login(url: &str) -> String {
    match (url.split_once("://"), url.rsplit_once('@')) {
        (Some((scheme, _)), Some((_, hostport))) => format!("{scheme}://{hostport}"),
        _ => url.to_string(),
    }
}

/// Decodes a URL's `%XX` escapes (a user or password with `@`, `:` or `%`
/// in it is written so); the result must be UTF-8.
fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or("has a % not followed by two hex digits (write % as %25)")?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "is not UTF-8 once decoded".to_string())
}

/// `--lobby`: with a room secret, whether clients outside any room may
/// talk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lobby {
    /// They may (v1 clients keep working).
    Open,
    /// They must join a room, with a token, first.
    Closed,
}

/// Parses `--lobby`: `open` or `closed`.
pub fn parse_lobby(s: &str) -> Result<Lobby, String> {
    match s.trim() {
        "open" => Ok(Lobby::Open),
        "closed" => Ok(Lobby::Closed),
        other => Err(format!("{other:?}: the lobby is `open` or `closed`")),
    }
}

/// Where to serve `/metrics`, or nowhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricsAddr {
    /// `--metrics off`.
    Off,
    /// Listen here.
    At(SocketAddr),
}

impl MetricsAddr {
    /// The address to listen on, if any.
    pub fn addr(self) -> Option<SocketAddr> {
        match self {
            MetricsAddr::Off => None,
            MetricsAddr::At(addr) => Some(addr),
        }
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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn yes_and_no_and_numbers_parse() {
        for yes in ["true", "1", "yes", "ON", " y "] {
            assert_eq!(parse_bool(yes), Ok(true), "{yes}");
        }
        for no in ["false", "0", "no", "Off", "n"] {
            assert_eq!(parse_bool(no), Ok(false), "{no}");
        }
        assert!(parse_bool("maybe").unwrap_err().contains("true or false"));
        assert_eq!(parse_whole::<usize>("42"), Ok(42));
        assert!(parse_whole::<u32>("-1").is_err());
        assert!(parse_whole::<usize>("1e3").is_err());
        assert_eq!(parse_number("0.5"), Ok(0.5));
        assert!(parse_path("").is_err());
        assert_eq!(parse_lobby("closed"), Ok(Lobby::Closed));
    }

    #[test]
    fn cluster_flags_are_checked() {
        let urls = parse_cluster_urls("nats://127.0.0.1:4222, 10.0.0.2:4222").unwrap();
        assert_eq!(
            urls.servers,
            ["nats://127.0.0.1:4222", "nats://10.0.0.2:4222"]
        );
        assert!(urls.login.is_none() && !urls.wants_tls());
        for bad in ["", " , ", "http://x:1", "nats://nohost", "nats://h:99999"] {
            assert!(parse_cluster_urls(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_password_in_a_cluster_url_is_kept_apart_and_never_shown() {
        let urls = parse_cluster_urls(
            "tls://eu:s%40cret:x@10.0.0.5:4222,tls://eu:s%40cret:x@10.0.0.6:4222",
        )
        .unwrap();
        assert_eq!(urls.servers, ["tls://10.0.0.5:4222", "tls://10.0.0.6:4222"]);
        let login = urls.login.clone().unwrap();
        assert_eq!(
            (login.user.as_str(), login.password.as_str()),
            ("eu", "s@cret:x")
        );
        assert!(urls.wants_tls());
        for shown in [urls.show(), format!("{urls:?}")] {
            assert!(!shown.contains("cret"), "{shown}");
        }
        for bad in [
            "nats://eu@h:1",
            "nats://eu:p%4@h:1",
            "nats://eu:a@h:1,nats://us:a@h:2",
            "http://eu:hush@h:1",
        ] {
            let e = parse_cluster_urls(bad).unwrap_err();
            assert!(!e.contains("hush") && !e.contains(":a@"), "{e}");
        }
    }
}
