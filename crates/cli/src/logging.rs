//! Where `firkin`'s logs go and in which format: coloured text for a person at a terminal,
//! plain text for a file or a pipe (journald, `docker logs`, `tee`), JSON lines for machines.
//! Colour codes in a captured log are noise to every tool that reads it afterwards.

use std::io::IsTerminal;

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tracing_subscriber::EnvFilter;

/// `--log-format`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Text, coloured when stderr is a terminal and NO_COLOR is unset or empty.
    #[default]
    Auto,
    /// Plain text, never coloured.
    Text,
    /// One JSON object per line (timestamp, level, target, fields, spans).
    Json,
}

impl LogFormat {
    /// Whether text logs get ANSI colours, given whether stderr is a terminal and the value
    /// of NO_COLOR (<https://no-color.org>: set and non-empty disables colour).
    pub fn colour(self, stderr_is_terminal: bool, no_color: Option<&str>) -> bool {
        match self {
            LogFormat::Auto => stderr_is_terminal && no_color.is_none_or(str::is_empty),
            LogFormat::Text | LogFormat::Json => false,
        }
    }
}

/// Installs the global subscriber: logs to stderr, filtered by `filter`, in `format`.
pub fn init(filter: EnvFilter, format: LogFormat) {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().with_ansi(false).init(),
        LogFormat::Auto | LogFormat::Text => {
            let no_color = std::env::var("NO_COLOR").ok();
            let ansi = format.colour(std::io::stderr().is_terminal(), no_color.as_deref());
            builder.with_ansi(ansi).init();
        }
    }
}

/// Reports the error that ends the process. In JSON mode it is a log event's object, so that
/// stderr stays one JSON object per line; it is written directly rather than through the
/// subscriber so that no `--log` filter can hide why the process failed.
pub fn fatal(format: LogFormat, err: &anyhow::Error) {
    match format {
        LogFormat::Json => eprintln!("{}", fatal_json(err, OffsetDateTime::now_utc())),
        LogFormat::Auto | LogFormat::Text => eprintln!("firkin: {err:#}"),
    }
}

/// The shape of tracing-subscriber's JSON events.
fn fatal_json(err: &anyhow::Error, now: OffsetDateTime) -> serde_json::Value {
    serde_json::json!({
        "timestamp": now.format(&Rfc3339).unwrap_or_default(),
        "level": "ERROR",
        "fields": { "message": "firkin failed", "error": format!("{err:#}") },
        "target": "firkin",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(LogFormat::Auto.colour(true, None));
        assert!(LogFormat::Auto.colour(true, Some("")));
        assert!(!LogFormat::Auto.colour(true, Some("1")));
        assert!(!LogFormat::Auto.colour(false, None));
        for format in [LogFormat::Text, LogFormat::Json] {
            assert!(!format.colour(true, None), "{format:?}");
        }
    }

    #[test]
    fn a_fatal_error_in_json_is_one_line_with_its_whole_chain() {
        let err = anyhow::anyhow!("no such file\nsecond line").context("opening the state");
        let line = fatal_json(&err, OffsetDateTime::UNIX_EPOCH).to_string();
        assert!(!line.contains('\n'), "{line}");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        assert_eq!(v["level"], "ERROR");
        assert_eq!(v["timestamp"], "1970-01-01T00:00:00Z");
        assert_eq!(
            v["fields"]["error"],
            "opening the state: no such file\nsecond line"
        );
    }
}
