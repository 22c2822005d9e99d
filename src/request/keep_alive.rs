//! How long a model stays loaded after a request: Ollama's `keep_alive` (a request field, and
//! the server's default in the config file).

use std::time::{Duration, Instant};

/// How long a model stays loaded after a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeepAlive {
    /// Until the server stops (a negative `keep_alive`).
    Forever,
    /// This long after the request ends (0: unload as soon as it is idle).
    For(Duration),
}

impl KeepAlive {
    /// Ollama's default: five minutes.
    pub const DEFAULT: KeepAlive = KeepAlive::For(Duration::from_secs(300));

    /// Ollama's `keep_alive`: seconds as a number, or a duration string (`"5m"`, `"1h30m"`,
    /// `"10s"`, `"-1"`); negative keeps the model loaded.
    pub fn parse(value: &serde_json::Value) -> Result<Self, String> {
        let seconds = match value {
            serde_json::Value::Number(n) => n.as_f64().ok_or("not a number")?,
            serde_json::Value::String(s) => match s.trim().parse::<f64>() {
                Ok(v) => v,
                Err(_) => parse_go_duration(s.trim())?,
            },
            other => return Err(format!("must be a duration string or seconds, got {other}")),
        };
        // A century or more is for good too (and keeps `Duration` in range).
        match seconds {
            s if s.is_nan() => Err(format!("must be a duration, got {value}")),
            s if !(0.0..MAX_KEEP_ALIVE_SECONDS).contains(&s) => Ok(KeepAlive::Forever),
            s => Ok(KeepAlive::For(Duration::from_secs_f64(s))),
        }
    }

    /// When a model idle since `from` is unloaded (None: never).
    pub fn deadline(self, from: Instant) -> Option<Instant> {
        match self {
            KeepAlive::Forever => None,
            KeepAlive::For(d) => Some(from + d),
        }
    }
}

/// Keep-alives this long or longer mean "for good".
const MAX_KEEP_ALIVE_SECONDS: f64 = 100.0 * 365.0 * 86400.0;

/// Seconds of a Go duration string (`1h2m3.5s`, `300ms`, `-5m`).
fn parse_go_duration(s: &str) -> Result<f64, String> {
    let bad = || format!("'{s}' is not a duration (use e.g. 5m, 1h30m, 30s or seconds)");
    let (sign, mut rest) = match s.strip_prefix('-') {
        Some(r) => (-1.0, r),
        None => (1.0, s),
    };
    if rest.is_empty() {
        return Err(bad());
    }
    let mut total = 0.0;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).ok_or_else(bad)?;
        let value: f64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return Err(bad()),
        };
        total += value * unit;
        rest = &rest[unit_len..];
    }
    Ok(sign * total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keep_alive_reads_ollama_durations() {
        let secs = |v| match KeepAlive::parse(&v) {
            Ok(KeepAlive::For(d)) => d.as_secs_f64(),
            Ok(KeepAlive::Forever) => -1.0,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(secs(json!("5m")), 300.0);
        assert_eq!(secs(json!("1h30m")), 5400.0);
        assert_eq!(secs(json!("1.5s")), 1.5);
        assert_eq!(secs(json!(0)), 0.0);
        assert_eq!(secs(json!("300")), 300.0);
        assert_eq!(secs(json!(-1)), -1.0);
        assert_eq!(secs(json!("-1m")), -1.0);
        assert!(KeepAlive::parse(&json!("soon")).is_err());
        assert!(KeepAlive::parse(&json!("NaN")).is_err());
        assert_eq!(KeepAlive::parse(&json!(1e300)), Ok(KeepAlive::Forever));
        assert_eq!(KeepAlive::parse(&json!("99999999999h")), Ok(KeepAlive::Forever));
        assert!(KeepAlive::parse(&json!(true)).is_err());
    }
}
