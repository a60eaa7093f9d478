//! The wire protocol: what a datagram means, and what recipients receive.
//!
//! Both halves are pure functions of bytes, so they are unit- and
//! property-tested here and benchmarked in `benches/hot_paths.rs`:
//!
//! - [`classify`] turns a datagram into a [`Kind`] (heartbeat, quit, message),
//!   exactly as the seed servers did with `data.strip()`;
//! - [`Template`] is the `--format`, parsed once at start-up and rendered
//!   once per message into a buffer that every recipient then shares.

use std::fmt;
use std::io::Write as _;

use crate::core::addr::RawAddr;

/// The heartbeat control word (seed 002's `^hb^`).
pub const HEARTBEAT: &[u8] = b"^hb^";
/// The leave control word.
pub const QUIT: &[u8] = b"quit";
/// What every live client receives when the relay shuts down.
pub const BYE: &[u8] = b"bye";
/// A heartbeat that also asks the relay's `--timeout` (a udphub extension:
/// clients pad it so the answer, `^timeout^<milliseconds>`, fits).
pub const TIMEOUT_QUERY: &[u8] = b"^timeout^";
/// The join control word (wire protocol v2): `^join^ROOM[^TOKEN]`.
pub const JOIN: &[u8] = b"^join^";
/// The answer to an accepted join: `^room^ROOM`.
pub const ROOM_REPLY: &[u8] = b"^room^";
/// The answer to a refused join: `^denied^REASON`.
pub const DENIED_REPLY: &[u8] = b"^denied^";
/// Verify mode: asks the relay for a cookie (padded to [`HELLO_LEN`]).
pub const HELLO: &[u8] = b"^hello^";
/// Verify mode: how long a datagram from an unverified source must be to
/// be answered with a cookie (the answer is shorter, so no amplification).
pub const HELLO_LEN: usize = 64;
/// Verify mode: the cookie control word, `^cookie^C[^join^…|^quit]`, and
/// the answer that carries one.
pub const COOKIE: &[u8] = b"^cookie^";
/// How long a padded [`TIMEOUT_QUERY`] should be so that any answer fits
/// (`^timeout^` + up to 23 digits).
pub const TIMEOUT_QUERY_LEN: usize = 32;

/// The relay's answer to a [`TIMEOUT_QUERY`]: `^timeout^` and the timeout
/// in whole milliseconds.
pub fn timeout_answer(timeout: std::time::Duration) -> Vec<u8> {
    let mut out = TIMEOUT_QUERY.to_vec();
    out.extend_from_slice(timeout.as_millis().to_string().as_bytes());
    out
}

/// Reads a [`timeout_answer`]: the relay's timeout, if `datagram` is one.
pub fn parse_timeout_answer(datagram: &[u8]) -> Option<std::time::Duration> {
    let digits = datagram.strip_prefix(TIMEOUT_QUERY)?;
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let ms: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(std::time::Duration::from_millis(ms))
}

/// What a datagram asks of the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind<'a> {
    /// `^hb^` or an empty body: register or refresh the sender, relay nothing.
    Heartbeat,
    /// `quit`: the sender leaves now.
    Quit,
    /// `^timeout^`: a heartbeat that asks for the relay's timeout.
    TimeoutQuery,
    /// `^join^ROOM` or `^join^ROOM^TOKEN`: move into ROOM (the empty name
    /// is the lobby). The name is not checked here.
    Join {
        /// The room asked for.
        room: &'a [u8],
        /// The token, if one came.
        token: Option<&'a [u8]>,
    },
    /// `^hello^`: in verify mode, a request for a cookie; otherwise a
    /// message with this body.
    Hello(&'a [u8]),
    /// `^cookie^C`, `^cookie^C^join^ROOM[^TOKEN]`, `^cookie^C^quit`: in
    /// verify mode, a request proven by cookie C; otherwise a message with
    /// this body.
    Cookie {
        /// The cookie.
        cookie: &'a [u8],
        /// What it proves the sender asks.
        then: Proven<'a>,
        /// The body, for relays not in verify mode.
        body: &'a [u8],
    },
    /// Anything else: relay this body to every live client.
    Message(&'a [u8]),
}

/// What a cookie-carrying datagram asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proven<'a> {
    /// `^cookie^C`: register (into the lobby) or refresh.
    Register,
    /// `^cookie^C^join^ROOM[^TOKEN]`.
    Join {
        /// The room asked for.
        room: &'a [u8],
        /// The token, if one came.
        token: Option<&'a [u8]>,
    },
    /// `^cookie^C^quit`.
    Quit,
}

/// Splits `ROOM[^TOKEN]`.
fn join_parts(rest: &[u8]) -> (&[u8], Option<&[u8]>) {
    match rest.iter().position(|&b| b == b'^') {
        Some(i) => (&rest[..i], Some(&rest[i + 1..])),
        None => (rest, None),
    }
}

/// A datagram's body: its bytes with one trailing `\n` or `\r\n` removed
/// (what `echo text | nc -u` adds).
pub fn body(datagram: &[u8]) -> &[u8] {
    let without_lf = match datagram.strip_suffix(b"\n") {
        Some(rest) => rest,
        None => return datagram,
    };
    without_lf.strip_suffix(b"\r").unwrap_or(without_lf)
}

/// Classifies a datagram. Control words are matched on the body trimmed of
/// ASCII whitespace; a message keeps its body untrimmed.
pub fn classify(datagram: &[u8]) -> Kind<'_> {
    let body = body(datagram);
    match body.trim_ascii() {
        b"" | HEARTBEAT => Kind::Heartbeat,
        QUIT => Kind::Quit,
        TIMEOUT_QUERY => Kind::TimeoutQuery,
        HELLO => Kind::Hello(body),
        trimmed => {
            if let Some(rest) = trimmed.strip_prefix(JOIN) {
                let (room, token) = join_parts(rest);
                return Kind::Join { room, token };
            }
            if let Some(rest) = trimmed.strip_prefix(COOKIE) {
                let (cookie, after) = match rest.iter().position(|&b| b == b'^') {
                    Some(i) => (&rest[..i], Some(&rest[i + 1..])),
                    None => (rest, None),
                };
                let then = match after {
                    None => Some(Proven::Register),
                    Some(b"quit") => Some(Proven::Quit),
                    Some(a) => a.strip_prefix(b"join^").map(|r| {
                        let (room, token) = join_parts(r);
                        Proven::Join { room, token }
                    }),
                };
                if let Some(then) = then {
                    return Kind::Cookie { cookie, then, body };
                }
            }
            Kind::Message(body)
        }
    }
}

/// One piece of a parsed [`Template`].
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    /// Bytes copied as they are.
    Literal(Vec<u8>),
    /// The message body.
    Body,
    /// The sender's IP address.
    Ip,
    /// The sender's IP address where a `:` and the port follow: an IPv6
    /// address is put in brackets (`[::1]:7`), so address and port can be
    /// told apart; IPv4 (and v4-mapped) is shown as is, as in the seeds.
    IpBeforePort,
    /// The sender's port.
    Port,
}

/// The `--format` template: what each recipient receives for a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    /// The template split at its placeholders.
    segments: Vec<Segment>,
}

/// Why a `--format` string was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateError {
    /// What was wrong, for a one-line message.
    reason: String,
}

impl fmt::Display for TemplateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)
    }
}

impl std::error::Error for TemplateError {}

impl Template {
    /// The default template, seed 002's `'{}. from {}:{}'`.
    pub const DEFAULT: &'static str = "{body}. from {ip}:{port}";

    /// The template written out again (`raw` comes back as `{body}`,
    /// which means the same), for logs.
    pub fn spec(&self) -> String {
        let mut out = String::new();
        for segment in &self.segments {
            match segment {
                Segment::Body => out.push_str("{body}"),
                Segment::Ip | Segment::IpBeforePort => out.push_str("{ip}"),
                Segment::Port => out.push_str("{port}"),
                Segment::Literal(bytes) => {
                    let text = String::from_utf8_lossy(bytes);
                    out.push_str(&text.replace('{', "{{").replace('}', "}}"));
                }
            }
        }
        out
    }

    /// Parses a template. `raw` means the body unchanged; otherwise
    /// `{body}`, `{ip}` and `{port}` are placeholders and `{{`/`}}` are
    /// literal braces.
    pub fn parse(spec: &str) -> Result<Template, TemplateError> {
        if spec == "raw" {
            return Ok(Template {
                segments: vec![Segment::Body],
            });
        }
        let mut segments = Vec::new();
        let mut literal = Vec::new();
        let mut rest = spec;
        while let Some(c) = rest.chars().next() {
            if rest.starts_with("{{") || rest.starts_with("}}") {
                literal.push(rest.as_bytes()[0]);
                rest = &rest[2..];
            } else if c == '{' {
                let close = rest.find('}').ok_or_else(|| TemplateError {
                    reason: format!(
                        "unclosed '{{' in format {spec:?} (use '{{{{' for a literal brace)"
                    ),
                })?;
                let segment = match &rest[1..close] {
                    "body" => Segment::Body,
                    "ip" => Segment::Ip,
                    "port" => Segment::Port,
                    other => {
                        return Err(TemplateError {
                            reason: format!(
                                "unknown placeholder {{{other}}} in format {spec:?} (known: {{body}}, {{ip}}, {{port}})"
                            ),
                        })
                    }
                };
                if !literal.is_empty() {
                    segments.push(Segment::Literal(std::mem::take(&mut literal)));
                }
                segments.push(segment);
                rest = &rest[close + 1..];
            } else if c == '}' {
                return Err(TemplateError {
                    reason: format!(
                        "unmatched '}}' in format {spec:?} (use '}}}}' for a literal brace)"
                    ),
                });
            } else {
                literal.extend_from_slice(&rest.as_bytes()[..c.len_utf8()]);
                rest = &rest[c.len_utf8()..];
            }
        }
        if !literal.is_empty() {
            segments.push(Segment::Literal(literal));
        }
        for i in 1..segments.len() {
            if segments[i - 1] == Segment::Ip
                && matches!(&segments[i], Segment::Literal(l) if l.starts_with(b":"))
            {
                segments[i - 1] = Segment::IpBeforePort;
            }
        }
        Ok(Template { segments })
    }

    /// Whether this template relays the body unchanged (`raw`), so the
    /// received bytes can be sent without rendering.
    pub fn is_raw(&self) -> bool {
        self.segments == [Segment::Body]
    }

    /// Renders a message from `from` into `out` (cleared first). Bodies are
    /// bytes: non-UTF-8 passes through untouched.
    pub fn render(&self, body: &[u8], from: &RawAddr, out: &mut Vec<u8>) {
        out.clear();
        for segment in &self.segments {
            match segment {
                Segment::Literal(bytes) => out.extend_from_slice(bytes),
                Segment::Body => out.extend_from_slice(body),
                Segment::Ip => push_ip(out, from.display_ip()),
                Segment::IpBeforePort => match from.display_ip() {
                    ip @ std::net::IpAddr::V4(_) => push_ip(out, ip),
                    ip @ std::net::IpAddr::V6(_) => {
                        out.push(b'[');
                        push_ip(out, ip);
                        out.push(b']');
                    }
                },
                Segment::Port => push_decimal(out, from.port()),
            }
        }
    }
}

/// Appends `n` in decimal: what `write!(out, "{n}")` writes, without the
/// formatting machinery (this runs for every message; caching the text
/// per client instead would cost ~22 B of every client's memory).
fn push_decimal(out: &mut Vec<u8>, mut n: u16) {
    let mut digits = [0u8; 5];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// Appends `ip` as `Display` writes it: an IPv4 address by hand (the common
/// case, per message), an IPv6 one through `fmt` (its `::` compression).
fn push_ip(out: &mut Vec<u8>, ip: std::net::IpAddr) {
    match ip {
        std::net::IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                push_decimal(out, u16::from(octet));
            }
        }
        // Writing to a Vec cannot fail.
        std::net::IpAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
}

impl Default for Template {
    fn default() -> Template {
        match Template::parse(Template::DEFAULT) {
            Ok(t) => t,
            Err(e) => unreachable!("the default template is valid: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::SocketAddr;

    proptest! {
        /// The hand-written address text is `Display`'s, for every IPv4
        /// address and port, and for IPv6 (through `fmt`).
        #[test]
        fn addresses_render_as_display_writes_them(ip: u32, port: u16, v6: u128) {
            let t = Template::parse("{ip} {port} {ip}:{port}").unwrap();
            for ip in [
                std::net::IpAddr::from(std::net::Ipv4Addr::from(ip)),
                std::net::IpAddr::from(std::net::Ipv6Addr::from(v6)),
            ] {
                let from = SocketAddr::new(ip, port);
                let mut out = Vec::new();
                t.render(b"", &RawAddr::from(from), &mut out);
                let shown = RawAddr::from(from).display_ip();
                let want = match shown {
                    std::net::IpAddr::V4(_) => format!("{shown} {port} {shown}:{port}"),
                    std::net::IpAddr::V6(_) => format!("{shown} {port} [{shown}]:{port}"),
                };
                prop_assert_eq!(String::from_utf8(out).unwrap(), want);
            }
        }
    }

    fn from(s: &str) -> RawAddr {
        s.parse::<SocketAddr>().unwrap().into()
    }

    #[test]
    fn heartbeat_variants() {
        for d in [
            &b"^hb^"[..],
            b"^hb^\n",
            b"^hb^\r\n",
            b"  ^hb^  ",
            b"\t^hb^\n",
            b"",
            b"\n",
            b"\r\n",
            b"   ",
        ] {
            assert_eq!(classify(d), Kind::Heartbeat, "{d:?}");
        }
    }

    #[test]
    fn quit_variants() {
        for d in [&b"quit"[..], b"quit\n", b"quit\r\n", b" quit "] {
            assert_eq!(classify(d), Kind::Quit, "{d:?}");
        }
        assert_eq!(classify(b"QUIT"), Kind::Message(b"QUIT"));
        assert_eq!(classify(b"quitting"), Kind::Message(b"quitting"));
    }

    #[test]
    fn join_forms() {
        let j = |room: &'static [u8], token: Option<&'static [u8]>| Kind::Join { room, token };
        assert_eq!(classify(b"^join^ops"), j(b"ops", None));
        assert_eq!(classify(b"^join^ops\n"), j(b"ops", None));
        assert_eq!(classify(b"  ^join^ops^a.b.c  "), j(b"ops", Some(b"a.b.c")));
        assert_eq!(classify(b"^join^"), j(b"", None));
        assert_eq!(classify(b"^join^ops^"), j(b"ops", Some(b"")));
        assert_eq!(classify(b"^join"), Kind::Message(b"^join"));
        assert_eq!(classify(b"x^join^ops"), Kind::Message(b"x^join^ops"));
    }

    #[test]
    fn cookie_forms() {
        let c = |d: &'static [u8]| match classify(d) {
            Kind::Cookie { cookie, then, .. } => Some((cookie, then)),
            _ => None,
        };
        assert_eq!(c(b"^cookie^abc"), Some((&b"abc"[..], Proven::Register)));
        assert_eq!(c(b"^cookie^abc^quit\n"), Some((&b"abc"[..], Proven::Quit)));
        assert_eq!(
            c(b"^cookie^abc^join^ops^t.t.t"),
            Some((
                &b"abc"[..],
                Proven::Join {
                    room: b"ops",
                    token: Some(b"t.t.t")
                }
            ))
        );
        assert_eq!(
            c(b"^cookie^abc^join^"),
            Some((
                &b"abc"[..],
                Proven::Join {
                    room: b"",
                    token: None
                }
            ))
        );
        assert_eq!(c(b"^cookie^abc^dance"), None, "not a form: a message");
        assert_eq!(
            classify(b"^cookie^abc^dance"),
            Kind::Message(b"^cookie^abc^dance")
        );
        let hello = [&b"^hello^"[..], &[b' '; 57]].concat();
        assert!(matches!(classify(&hello), Kind::Hello(_)));
    }

    #[test]
    fn timeout_query_and_answer() {
        let padded = format!("{:<32}", "^timeout^");
        assert_eq!(classify(padded.as_bytes()), Kind::TimeoutQuery);
        assert_eq!(classify(b"^timeout^\n"), Kind::TimeoutQuery);
        assert_eq!(classify(b"^timeout^5"), Kind::Message(b"^timeout^5"));
        let a = timeout_answer(std::time::Duration::from_millis(2500));
        assert_eq!(a, b"^timeout^2500");
        assert_eq!(
            parse_timeout_answer(&a),
            Some(std::time::Duration::from_millis(2500))
        );
        assert_eq!(parse_timeout_answer(b"^timeout^"), None);
        assert_eq!(parse_timeout_answer(b"^timeout^12x"), None);
        assert_eq!(parse_timeout_answer(b"hello"), None);
    }

    #[test]
    fn message_loses_exactly_one_trailing_newline() {
        assert_eq!(classify(b"123abc\n"), Kind::Message(b"123abc"));
        assert_eq!(classify(b"123abc\r\n"), Kind::Message(b"123abc"));
        assert_eq!(classify(b"a\n\n"), Kind::Message(b"a\n"));
        assert_eq!(classify(b" a "), Kind::Message(b" a "));
        assert_eq!(classify(b"\xff\xfe\n"), Kind::Message(b"\xff\xfe"));
    }

    #[test]
    fn default_template_is_seed_002_format() {
        let mut out = Vec::new();
        Template::default().render(b"123abc", &from("127.0.0.1:5555"), &mut out);
        assert_eq!(out, b"123abc. from 127.0.0.1:5555");
    }

    #[test]
    fn ipv6_senders_are_bracketed_before_a_port() {
        let mut out = Vec::new();
        let t = Template::default();
        t.render(b"hi", &from("[::1]:34920"), &mut out);
        assert_eq!(out, b"hi. from [::1]:34920");
        t.render(b"hi", &from("[::ffff:127.0.0.1]:5"), &mut out);
        assert_eq!(out, b"hi. from 127.0.0.1:5");
        // A bare {ip} (not followed by ':') is the address alone.
        Template::parse("{ip} {port}")
            .unwrap()
            .render(b"", &from("[::1]:7"), &mut out);
        assert_eq!(out, b"::1 7");
    }

    #[test]
    fn template_placeholders_and_escapes() {
        let t = Template::parse("[{ip}]:{port} {{says}} {body}!").unwrap();
        let mut out = Vec::new();
        t.render(b"hi", &from("[::1]:7"), &mut out);
        assert_eq!(out, b"[::1]:7 {says} hi!");
        t.render(b"\xff", &from("[::ffff:10.0.0.1]:8"), &mut out);
        assert_eq!(out, b"[10.0.0.1]:8 {says} \xff!");
    }

    #[test]
    fn raw_template_is_the_body() {
        let t = Template::parse("raw").unwrap();
        assert!(t.is_raw());
        assert!(!Template::default().is_raw());
        let mut out = vec![1, 2, 3];
        t.render(b"\x00bin", &from("1.2.3.4:5"), &mut out);
        assert_eq!(out, b"\x00bin");
    }

    #[test]
    fn bad_templates_are_rejected_with_a_reason() {
        for (spec, needle) in [
            ("{body", "unclosed"),
            ("{name}", "unknown placeholder {name}"),
            ("a}b", "unmatched"),
        ] {
            let err = Template::parse(spec).unwrap_err().to_string();
            assert!(err.contains(needle), "{spec}: {err}");
        }
        assert_eq!(Template::parse("").unwrap().segments, vec![]);
        assert_eq!(
            Template::parse("héllo {body}").unwrap().segments[0],
            Segment::Literal("héllo ".as_bytes().to_vec())
        );
    }

    proptest! {
        #[test]
        fn classify_never_panics_and_messages_are_bodies(d in proptest::collection::vec(any::<u8>(), 0..64)) {
            match classify(&d) {
                Kind::Message(b) => {
                    prop_assert_eq!(b, body(&d));
                    prop_assert!(!b.trim_ascii().is_empty());
                }
                Kind::Heartbeat => prop_assert!(matches!(body(&d).trim_ascii(), b"" | b"^hb^")),
                Kind::Quit => prop_assert_eq!(body(&d).trim_ascii(), b"quit"),
                Kind::TimeoutQuery => prop_assert_eq!(body(&d).trim_ascii(), TIMEOUT_QUERY),
                Kind::Join { .. } => prop_assert!(body(&d).trim_ascii().starts_with(JOIN)),
                Kind::Hello(b) => prop_assert_eq!(b.trim_ascii(), HELLO),
                Kind::Cookie { body: b, .. } => prop_assert!(b.trim_ascii().starts_with(COOKIE)),
            }
        }

        #[test]
        fn template_parse_never_panics(spec in "\\PC{0,24}") {
            let _ = Template::parse(&spec);
        }
    }
}
