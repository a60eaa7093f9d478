//! Logging: the `--log-level` filter (checked in our words), text or JSON
//! lines on stderr (`--log-format`), and changing the filter while the
//! server runs (a reload). Nothing logs per datagram: the counters do that.

use std::sync::OnceLock;

use tracing_subscriber::{reload, EnvFilter};

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

/// Changes the filter of the installed logger (a reload); set once by
/// [`init_logging`].
static RELOAD: OnceLock<SetFilter> = OnceLock::new();

/// Replaces the installed logger's filter.
type SetFilter = Box<dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync>;

/// The filter for `spec`, with the NATS client kept at `warn` unless
/// `spec` says otherwise: it narrates every (re)connection at info; the
/// cluster bridge says what matters in its own rate-limited lines.
fn env_filter(spec: &str) -> Result<(EnvFilter, Option<String>), Error> {
    let (filter, note) = log_filter(spec)?;
    let filter = if filter.contains("async_nats") {
        filter
    } else {
        format!("{filter},async_nats=warn")
    };
    let filter = EnvFilter::try_new(&filter)
        .map_err(|e| Error::Config(format!("--log-level {filter:?}: {e}")))?;
    Ok((filter, note))
}

/// Logs to stderr with the given `tracing` filter (see [`log_filter`]),
/// as text or JSON lines. The filter can be changed later with
/// [`set_log_level`].
pub fn init_logging(spec: &str, format: LogFormat) -> Result<(), Error> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let (filter, note) = env_filter(spec)?;
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    // A second initialisation (tests in one process) is harmless.
    let installed = match format {
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                    .with_target(false),
            )
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_span_list(false)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
    if installed.is_ok() {
        let _ = RELOAD.set(Box::new(move |f| {
            handle.reload(f).map_err(|e| e.to_string())
        }));
    }
    if let Some(note) = note {
        tracing::warn!("{note}");
    }
    Ok(())
}

/// Replaces the log filter of the running process (SIGHUP). Returns a
/// note to log if the filter had to be lowered (see [`log_filter`]).
pub fn set_log_level(spec: &str) -> Result<Option<String>, Error> {
    let (filter, note) = env_filter(spec)?;
    if let Some(reload) = RELOAD.get() {
        reload(filter).map_err(|e| Error::Config(format!("--log-level {spec:?}: {e}")))?;
    }
    Ok(note)
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
    use tracing::level_filters::{LevelFilter, STATIC_MAX_LEVEL};
    let bad = |why: String| {
        Error::Config(format!(
            "--log-level {spec:?}: {why}; use one of {} or target=level directives such as udphub=debug",
            LEVELS.join(", ")
        ))
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
