//! The logging settings: `--log-format` (text or JSON lines) and what a
//! `--log-level` filter may say, checked in our words. Installing the
//! logger, and changing its filter on reload, is the runtime's
//! ([`crate::runtime::logging`]).

use crate::error::Error;

/// How log lines look (`--log-format`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event (colour on a terminal).
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`,
    /// `message`, and the event's fields by name.
    Json,
}

impl LogFormat {
    /// Parses `text` or `json` (the config file's `log-format`).
    pub fn parse(s: &str) -> Result<LogFormat, String> {
        match s.trim() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("{other:?}: the log format is `text` or `json`")),
        }
    }
}

/// The level names a filter may use.
const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// Checks a `--log-level` filter and returns the one to use, with a note
/// to show once if it had to be changed.
///
/// tracing's own parser takes any bare word as a target name (`loud` would
/// mean "everything from target `loud`", which hides every udphub line), so
/// each comma-separated directive must be a level (`debug`) or end in
/// `=LEVEL` (`udphub=debug`). Levels a release build compiled out
/// (`release_max_level_info`) are lowered to what it has, with one note in
/// our words instead of tracing's repeated warning.
pub fn log_filter(spec: &str) -> Result<(String, Option<String>), Error> {
    check_filter(spec).map_err(|why| Error::Config(format!("--log-level {why}")))
}

/// [`log_filter`], with the reason in words that follow the flag's name
/// (`"loud": "loud" is not a level; …`).
pub fn check_filter(spec: &str) -> Result<(String, Option<String>), String> {
    use tracing::level_filters::{LevelFilter, STATIC_MAX_LEVEL};
    let bad = |why: String| {
        format!(
            "{spec:?}: {why}; use one of {} or target=level directives such as udphub=debug",
            LEVELS.join(", ")
        )
    };
    let mut out = Vec::new();
    let mut lowered = false;
    for directive in spec.split(',').map(str::trim) {
        if directive.is_empty() {
            continue;
        }
        let (target, level) = match directive.rsplit_once('=') {
            Some((target, level)) if !target.is_empty() => (Some(target), level),
            _ if directive.contains('=') => {
                return Err(bad(format!("{directive:?} has no target before '='")))
            }
            _ => (None, directive),
        };
        let level_name = level.to_ascii_lowercase();
        if !LEVELS.contains(&level_name.as_str()) {
            return Err(bad(format!("{level:?} is not a level")));
        }
        let wanted: LevelFilter = level_name
            .parse()
            .map_err(|_| bad(format!("{level:?} is not a level")))?;
        let level_name = if wanted > STATIC_MAX_LEVEL {
            lowered = true;
            STATIC_MAX_LEVEL.to_string().to_ascii_lowercase()
        } else {
            level_name
        };
        out.push(match target {
            Some(t) => format!("{t}={level_name}"),
            None => level_name,
        });
    }
    if out.is_empty() {
        return Err(bad("it is empty".into()));
    }
    let filter = out.join(",");
    tracing_subscriber::EnvFilter::try_new(&filter).map_err(|e| bad(e.to_string()))?;
    let note = lowered.then(|| {
        format!(
            "this release build logs at most at {} level (debug and trace are compiled out for speed); build without --release to see them",
            STATIC_MAX_LEVEL.to_string().to_ascii_lowercase()
        )
    });
    Ok((filter, note))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_filters_are_levels_or_directives() {
        assert_eq!(log_filter("info").unwrap().0, "info");
        assert_eq!(
            log_filter("WARN, udphub=error").unwrap().0,
            "warn,udphub=error"
        );
        for bad in ["loud", "", "=info", "udphub=loud", "info,,nope"] {
            let err = log_filter(bad).unwrap_err().to_string();
            assert!(
                err.contains("--log-level") && err.contains("debug"),
                "{bad}: {err}"
            );
        }
        let (filter, note) = log_filter("trace").unwrap();
        if tracing::level_filters::STATIC_MAX_LEVEL < tracing::level_filters::LevelFilter::TRACE {
            assert_ne!(filter, "trace");
            assert!(note.unwrap().contains("release build"));
        } else {
            assert_eq!((filter.as_str(), note), ("trace", None));
        }
    }
}
