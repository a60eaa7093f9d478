//! The process's logger: text or JSON lines on stderr (`--log-format`),
//! filtered by `--log-level` (whose rules are [`crate::config::logging`]'s),
//! and changing the filter while the server runs (a reload). Nothing logs
//! per datagram: the counters do that.

use std::sync::OnceLock;

use tracing_subscriber::{reload, EnvFilter};

use crate::config::logging::{log_filter, LogFormat};
use crate::error::Error;

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

/// Text lines show an event's message alone: its fields (`event`,
/// `addr`, …) are for JSON lines and log shippers, and every message
/// already says their values in words.
fn message_only() -> impl for<'w> tracing_subscriber::fmt::FormatFields<'w> {
    tracing_subscriber::fmt::format::debug_fn(|writer, field, value| {
        if field.name() == "message" {
            write!(writer, "{value:?}")
        } else {
            Ok(())
        }
    })
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
                    .with_target(false)
                    .fmt_fields(message_only()),
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
        tracing::warn!(event = "log_level_lowered", log_level = spec, "{note}");
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
