//! The `--config` file: TOML whose keys are the flag names, read into a
//! [`Layer`] (each key through its setting's own parser, so the file takes
//! what the flag takes), and the room secret file. Every problem is one
//! line naming the file, the line, the key and what was expected, in words:
//! `config file relay.toml, line 2: max-clients must be a whole number, not
//! negative, without quotes, not the text "200000"`. Unknown keys are an
//! error (a typo must not be ignored).

use std::path::Path;

use super::settings::{Layer, ALL};
use super::values::Value;
use crate::core::token::RoomSecret;
use crate::error::Error;

/// Why a file value was not taken.
#[derive(Debug)]
pub(crate) enum FileError {
    /// The TOML type is wrong (a number in quotes): what it must be.
    WrongType(&'static str),
    /// The setting's parser refused it, and why.
    Invalid(String),
}

/// Reads one setting's value from the file: its text for the setting's
/// `parse` (the flag's parser), if it has the TOML type the setting's
/// [`Value`] type takes.
pub(crate) fn read<T: Value>(
    value: &toml::Value,
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<T, FileError> {
    let text = T::file_text(value).ok_or(FileError::WrongType(T::IN_FILE))?;
    parse(&text).map_err(FileError::Invalid)
}

/// Reads the `--config` file.
pub fn read_file(path: &Path) -> Result<Layer, Error> {
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

/// The key set twice, when TOML says the line at fault (`timeout = 5`)
/// repeats one (its message is "duplicate key", the key not named).
fn duplicate_key<'a>(msg: &str, line: &'a str) -> Option<&'a str> {
    if !msg.starts_with("duplicate key") {
        return None;
    }
    let (key, _) = line.split_once('=')?;
    Some(key.trim().trim_matches(['"', '\''])).filter(|k| !k.is_empty())
}

/// Parses the file's text; errors start with ", line N: " (or ": ").
fn parse_file(text: &str) -> Result<Layer, String> {
    let table: toml::Table = toml::from_str(text).map_err(|e| {
        let msg = e.message().replace('\n', " ");
        match e.span() {
            Some(span) => {
                let (n, line) = line_at(text, span.start);
                if let Some(key) = duplicate_key(&msg, line) {
                    // Not a quoting problem: say which two lines collide.
                    let first = line_of_key(text, key);
                    return format!(
                        ", line {n}: duplicate key `{key}` (line {n}, first on line {first}); keep one of them"
                    );
                }
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
    let mut layer = Layer::default();
    for (key, value) in &table {
        let at = match line_of_key(text, key) {
            0 => String::new(),
            n => format!(", line {n}"),
        };
        match layer.set_from_file(key, value) {
            Some(Ok(())) => {}
            Some(Err(FileError::WrongType(expected))) => {
                return Err(format!(
                    "{at}: {key} must be {expected}, not {}",
                    describe(value)
                ))
            }
            Some(Err(FileError::Invalid(why))) => return Err(format!("{at}: {key}: {why}")),
            None => {
                let keys: Vec<String> = ALL.iter().map(|s| s.key()).collect();
                return Err(format!(
                    "{at}: unknown key `{key}` (the keys are the flag names: {})",
                    keys.join(", ")
                ));
            }
        }
    }
    Ok(layer)
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

/// Reads a room secret file: its bytes, less one trailing newline. `flag`
/// is the flag that named the file, for the errors (`--room-secret-file`
/// for the relay, `--secret-file` for `udphub token`).
pub fn read_secret(path: &Path, flag: &str) -> Result<RoomSecret, Error> {
    let mut bytes = std::fs::read(path)
        .map_err(|e| Error::Config(format!("cannot read {flag} {}: {e}", path.display())))?;
    if bytes.ends_with(b"\n") {
        bytes.pop();
        if bytes.ends_with(b"\r") {
            bytes.pop();
        }
    }
    RoomSecret::new(bytes).map_err(|e| Error::Config(format!("{flag} {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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
}
