//! Durations on the command line: the same rule as udphub's (its
//! docs/OPERATIONS.md): a bare number is seconds, fractions allowed
//! (`5`, `0.5`); otherwise a human duration (`10s`, `500ms`, `1m 30s`).
//! loadtest is a black box to the relay, so the rule is restated here
//! rather than imported.

use std::time::Duration;

/// Parses a duration by the rule above.
pub fn parse(s: &str) -> Result<Duration, String> {
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
    fn bare_numbers_are_seconds() {
        assert_eq!(parse("5").unwrap(), Duration::from_secs(5));
        assert_eq!(parse("0.5").unwrap(), Duration::from_millis(500));
        assert_eq!(parse("1m 30s").unwrap(), Duration::from_secs(90));
        assert!(parse("-1").is_err());
        assert!(parse("soon").is_err());
    }
}
