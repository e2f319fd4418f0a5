//! The lines of an `/execute` stream, as E2B's SDKs parse them, and the mapping of a Jupyter
//! MIME bundle onto a `result` line.

use serde::Serialize;
use serde_json::{Map, Value};

/// One NDJSON line of an `/execute` response.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum OutputLine {
    Stdout {
        text: String,
        timestamp: String,
    },
    Stderr {
        text: String,
        timestamp: String,
    },
    Result(Box<ResultData>),
    Error {
        name: String,
        value: String,
        traceback: String,
    },
    NumberOfExecutions {
        execution_count: usize,
    },
    EndOfExecution,
    UnexpectedEndOfExecution,
}

impl OutputLine {
    /// The line with its terminating newline. serde_json never writes a raw newline inside a
    /// value, so a line is exactly one JSON object and never blank.
    pub fn to_ndjson(&self) -> Vec<u8> {
        // Serializing these types cannot fail (string keys, no non-finite floats we create);
        // an error still yields a valid line rather than a broken stream.
        let mut out = serde_json::to_vec(self).unwrap_or_else(|e| {
            format!(
                r#"{{"type":"error","name":"SerializationError","value":{},"traceback":""}}"#,
                Value::String(e.to_string())
            )
            .into_bytes()
        });
        out.push(b'\n');
        out
    }

    pub fn error(name: &str, value: impl Into<String>) -> Self {
        Self::Error {
            name: name.to_owned(),
            value: value.into(),
            traceback: String::new(),
        }
    }
}

/// A `result` line's fields: one per well-known MIME type, the rest in `extra`.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct ResultData {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub html: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub markdown: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub svg: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub png: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jpeg: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pdf: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latex: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub json: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub javascript: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chart: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extra: Option<Map<String, Value>>,
    pub is_main_result: bool,
}

impl ResultData {
    /// Maps a MIME bundle (`{"text/plain": ..., "image/png": ...}`).
    pub fn from_bundle(bundle: Map<String, Value>, is_main_result: bool) -> Self {
        let mut r = Self {
            is_main_result,
            ..Self::default()
        };
        let mut extra = Map::new();
        for (mime, value) in bundle {
            let slot = match mime.as_str() {
                "text/plain" => &mut r.text,
                "text/html" => &mut r.html,
                "text/markdown" => &mut r.markdown,
                "image/svg+xml" => &mut r.svg,
                "image/png" => &mut r.png,
                "image/jpeg" => &mut r.jpeg,
                "application/pdf" => &mut r.pdf,
                "text/latex" => &mut r.latex,
                "application/javascript" => &mut r.javascript,
                "application/json" => {
                    r.json = Some(value);
                    continue;
                }
                "e2b/data" => {
                    r.data = Some(value);
                    continue;
                }
                "e2b/chart" => {
                    r.chart = Some(value);
                    continue;
                }
                _ => {
                    extra.insert(mime, value);
                    continue;
                }
            };
            match value {
                Value::String(s) => *slot = Some(s),
                // A kernel that sends a text type as something else: keep it rather than drop it.
                other => {
                    extra.insert(mime, other);
                }
            }
        }
        r.text = r.text.map(strip_quotes);
        if !extra.is_empty() {
            r.extra = Some(extra);
        }
        r
    }
}

/// E2B strips one pair of surrounding single quotes from `text/plain` (a Python `str` repr).
fn strip_quotes(s: String) -> String {
    match s.strip_prefix('\'').and_then(|t| t.strip_suffix('\'')) {
        Some(inner) => inner.to_owned(),
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn bundle(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }

    #[test]
    fn bundle_maps_to_fields() {
        let r = ResultData::from_bundle(
            bundle(json!({
                "text/plain": "'hi'",
                "text/html": "<b>x</b>",
                "image/png": "iVBOR",
                "e2b/chart": {"type": "line", "elements": []},
                "application/json": {"a": 1},
                "application/vnd.custom": "z",
            })),
            true,
        );
        assert_eq!(r.text.as_deref(), Some("hi"));
        assert_eq!(r.html.as_deref(), Some("<b>x</b>"));
        assert_eq!(r.png.as_deref(), Some("iVBOR"));
        assert_eq!(r.chart, Some(json!({"type": "line", "elements": []})));
        assert_eq!(r.json, Some(json!({"a": 1})));
        assert_eq!(
            r.extra,
            Some(bundle(json!({"application/vnd.custom": "z"})))
        );
    }

    #[test]
    fn lines_are_tagged_and_omit_empty_fields() {
        let line = OutputLine::Result(Box::new(ResultData::from_bundle(
            bundle(json!({"text/plain": "42"})),
            true,
        )));
        assert_eq!(
            line.to_ndjson(),
            b"{\"type\":\"result\",\"text\":\"42\",\"is_main_result\":true}\n"
        );
        assert_eq!(
            OutputLine::EndOfExecution.to_ndjson(),
            b"{\"type\":\"end_of_execution\"}\n"
        );
        assert_eq!(
            OutputLine::NumberOfExecutions { execution_count: 3 }.to_ndjson(),
            b"{\"type\":\"number_of_executions\",\"execution_count\":3}\n"
        );
    }

    #[test]
    fn only_one_pair_of_quotes_goes() {
        assert_eq!(strip_quotes("''a''".into()), "'a'");
        assert_eq!(strip_quotes("'".into()), "'");
        assert_eq!(strip_quotes("a'".into()), "a'");
    }
}
