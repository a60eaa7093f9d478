//! The settings in words: `serve --check-config`'s one line (every
//! setting's key and resolved value), and the settings table of
//! docs/OPERATIONS.md, both written from the declarations.

use super::settings::{Config, ALL};

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
}
