//! The settings in words: `serve --check-config`'s one line (every
//! setting's key and resolved value), the start log's notes on exposure
//! and private rooms, and the settings table of docs/OPERATIONS.md, all
//! written from the declarations.

use super::settings::{Config, ALL};
use super::values::Lobby;

impl Config {
    /// Every setting's key and value in one line, for `serve
    /// --check-config`: `udphub: the configuration is valid: bind
    /// 127.0.0.1:9999, metrics 127.0.0.1:9898, timeout 10s, …`.
    pub fn summary(&self) -> String {
        let settings: Vec<String> = self
            .shown()
            .into_iter()
            .map(|(key, value)| format!("{key} {value}"))
            .collect();
        format!(
            "udphub: the configuration is valid: {}",
            settings.join(", ")
        )
    }
}

impl Config {
    /// A warning for the start log when the relay listens where other
    /// hosts reach it (any address but loopback) without verify mode and
    /// without `--public`: there a spoofed source makes it send fan-out to
    /// an address that never asked (amplification) and fills its table.
    pub fn exposure_warning(&self) -> Option<String> {
        if self.verify_sources || self.public || self.bind.ip().to_canonical().is_loopback() {
            return None;
        }
        Some(format!(
            "listening on {}, which other hosts can reach, without verify mode: anyone can spoof a source address, making the relay send fan-out to hosts that never asked (amplification) and filling its table; on the internet pass --public (verify mode and per-client limits; plain clients then need the cookie handshake, see docs/SECURITY.md), on a trusted LAN this is fine",
            self.bind
        ))
    }

    /// A note for the start log when private rooms are on (a room secret
    /// is set): who gets in, and whether the lobby is open.
    pub fn private_rooms_note(&self) -> Option<String> {
        let path = self.room_secret_file.as_ref()?;
        Some(format!(
            "private rooms: joining a named room needs a token signed with the secret in {} (mint one with `udphub token --room ROOM --ttl 1h --secret-file {}`); the lobby is {}",
            path.display(),
            path.display(),
            match self.lobby {
                Lobby::Open => "open (--lobby open)",
                Lobby::Closed => "closed (--lobby closed): clients must join a room first",
            }
        ))
    }
}

/// The settings table of docs/OPERATIONS.md, in Markdown: each setting's
/// flag, environment variable, file key, default, whether a reload changes
/// it, and its help. A test keeps the docs equal to it.
pub fn markdown_table() -> String {
    let mut out = String::from(
        "| flag | environment | file key | default | on reload | meaning |\n| --- | --- | --- | --- | --- | --- |\n",
    );
    for s in ALL {
        let default = match s.default {
            super::declare::Shown::Value(_) => format!("`{}`", s.default.text()),
            super::declare::Shown::Words(words) => words.to_string(),
        };
        out.push_str(&format!(
            "| `{}` | `{}` | `{}` | {} | {} | {} |\n",
            cell(&s.flag()),
            s.env,
            s.key(),
            cell(&default),
            s.reload.word(),
            cell(&s.paragraphs().join(" ")),
        ));
    }
    out
}

/// Text for a table cell: a `|` would end it.
fn cell(text: &str) -> String {
    text.replace('|', "\\|")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_names_every_setting_once() {
        let line = Config::default().summary();
        assert!(!line.contains('\n'));
        for s in ALL {
            let key = format!(" {} ", s.key());
            assert_eq!(line.matches(&key).count(), 1, "{key:?} in {line}");
        }
        assert!(line.contains("timeout 10s, "), "{line}");
    }

    #[test]
    fn the_table_has_a_row_per_setting() {
        let table = markdown_table();
        assert_eq!(table.lines().count(), ALL.len() + 2);
        assert!(table
            .contains("| `--no-echo [<BOOL>]` | `UDPHUB_NO_ECHO` | `no-echo` | `false` | live |"));
        assert!(table.contains("| `--metrics <ADDR\\|off>` |"), "{table}");
    }

    /// Non-loopback without verify mode warns and names `--public`;
    /// loopback, `--public` and verify mode do not.
    #[test]
    fn an_exposed_bind_warns_naming_public() {
        let at = |bind: &str, verify: bool, public: bool| {
            Config {
                bind: bind.parse().unwrap(),
                verify_sources: verify,
                public,
                ..Config::default()
            }
            .exposure_warning()
        };
        let w = at("0.0.0.0:9999", false, false).unwrap();
        assert!(w.contains("0.0.0.0:9999") && w.contains("--public"), "{w}");
        assert!(at("[::]:9999", false, false).is_some());
        assert!(at("192.0.2.7:9999", false, false).is_some());
        assert!(at("127.0.0.1:9999", false, false).is_none());
        assert!(at("[::1]:9999", false, false).is_none());
        assert!(at("0.0.0.0:9999", true, false).is_none());
        assert!(at("0.0.0.0:9999", false, true).is_none());
    }

    /// The start log says when private rooms are on, and the lobby's state.
    #[test]
    fn private_rooms_are_announced() {
        let mut c = Config::default();
        assert!(c.private_rooms_note().is_none());
        c.room_secret_file = Some("/run/secret".into());
        c.lobby = Lobby::Closed;
        let n = c.private_rooms_note().unwrap();
        assert!(
            n.contains("private rooms") && n.contains("/run/secret") && n.contains("closed"),
            "{n}"
        );
    }
}
