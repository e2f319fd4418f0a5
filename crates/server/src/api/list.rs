//! `GET /v2/sandboxes`: query parsing (including the SDK's triple-encoded metadata filter),
//! filtering and cursor pagination.

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use firkin_e2b_wire::SandboxState;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::error::ApiError;
use crate::store::{RecordState, SandboxRecord};

pub const DEFAULT_LIMIT: usize = 100;
pub const MAX_LIMIT: usize = 100;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Order {
    Asc,
    /// Newest first.
    #[default]
    Desc,
}

/// A position in the list: the sort key of the last item returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Cursor {
    pub started_ms: i64,
    pub seq: i64,
}

impl Cursor {
    pub fn of(r: &SandboxRecord) -> Self {
        Self {
            started_ms: r.started_ms,
            seq: r.seq,
        }
    }

    /// Opaque to clients; versioned so a later format can be told apart.
    pub fn encode(self) -> String {
        URL_SAFE_NO_PAD.encode(format!("v1:{}:{}", self.started_ms, self.seq))
    }

    pub fn decode(token: &str) -> Result<Self, ApiError> {
        let bad = || ApiError::bad_request(format!("invalid nextToken {token:?}"));
        let raw = URL_SAFE_NO_PAD.decode(token).map_err(|_| bad())?;
        let text = String::from_utf8(raw).map_err(|_| bad())?;
        let mut parts = text.split(':');
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some("v1"), Some(started), Some(seq), None) => Ok(Self {
                started_ms: started.parse().map_err(|_| bad())?,
                seq: seq.parse().map_err(|_| bad())?,
            }),
            _ => Err(bad()),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListQuery {
    /// `None`: running and paused.
    pub states: Option<Vec<SandboxState>>,
    pub metadata: BTreeMap<String, String>,
    pub limit: usize,
    pub after: Option<Cursor>,
    pub order: Order,
    pub started_after_ms: Option<i64>,
    pub template: Option<String>,
}

/// Parses a raw query string the way the handler's `Query` extractor does (for unit tests).
#[cfg(test)]
pub fn parse_list_query(raw: Option<&str>) -> Result<ListQuery, ApiError> {
    let uri: axum::http::Uri = format!("/?{}", raw.unwrap_or(""))
        .parse()
        .map_err(|e| ApiError::bad_request(format!("invalid query string: {e}")))?;
    let axum::extract::Query(params) = axum::extract::Query::try_from_uri(&uri)
        .map_err(|e| ApiError::bad_request(format!("invalid query string: {e}")))?;
    ListQuery::from_params(params)
}

impl ListQuery {
    /// Reads a list request's query parameters, in order. Repeated `state` and `metadata`
    /// parameters add up, so they are taken as pairs rather than as a struct.
    pub fn from_params(params: Vec<(String, String)>) -> Result<Self, ApiError> {
        let mut q = ListQuery {
            limit: DEFAULT_LIMIT,
            ..ListQuery::default()
        };
        // Step 1 of the metadata decoding is `Query`'s one form-decoding of every parameter.
        for (key, value) in params {
            match key.as_str() {
                "state" => {
                    let mut states = q.states.take().unwrap_or_default();
                    for s in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                        states.push(match s {
                            "running" => SandboxState::Running,
                            "paused" => SandboxState::Paused,
                            other => {
                                return Err(ApiError::bad_request(format!(
                                    "invalid state {other:?}: expected running or paused"
                                )));
                            }
                        });
                    }
                    q.states = Some(states);
                }
                "metadata" => q.metadata.extend(decode_metadata_filter(&value)?),
                "limit" => {
                    let n: usize = value.parse().map_err(|_| {
                        ApiError::bad_request(format!(
                            "invalid limit {value:?}: expected 1-{MAX_LIMIT}"
                        ))
                    })?;
                    if !(1..=MAX_LIMIT).contains(&n) {
                        return Err(ApiError::bad_request(format!(
                            "invalid limit {n}: expected 1-{MAX_LIMIT}"
                        )));
                    }
                    q.limit = n;
                }
                "nextToken" if !value.is_empty() => q.after = Some(Cursor::decode(&value)?),
                "order" => {
                    q.order = match value.as_str() {
                        "asc" => Order::Asc,
                        "desc" => Order::Desc,
                        other => {
                            return Err(ApiError::bad_request(format!(
                                "invalid order {other:?}: expected asc or desc"
                            )));
                        }
                    }
                }
                "startedAfter" => {
                    let t = OffsetDateTime::parse(&value, &Rfc3339).map_err(|e| {
                        ApiError::bad_request(format!("invalid startedAfter {value:?}: {e}"))
                    })?;
                    q.started_after_ms = Some(unix_ms(t));
                }
                "template" if !value.is_empty() => q.template = Some(value),
                // Unknown parameters are ignored so that newer SDKs keep working.
                _ => {}
            }
        }
        Ok(q)
    }
}

fn unix_ms(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

/// Form decoding: `+` is a space, `%XX` a byte; the result must be UTF-8.
fn form_decode(s: &str) -> Result<String, ApiError> {
    let plus = s.replace('+', " ");
    percent_encoding::percent_decode_str(&plus)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| ApiError::bad_request(format!("query value {s:?} is not UTF-8")))
}

/// Steps 2 and 3 of the SDK's metadata encoding (protocol notes §2.2): the SDK percent-encodes
/// each key and value, joins them as a form string, and the HTTP layer encodes that once more.
/// `value` has been decoded once already; decode the whole string again, split it into
/// `k=v` pairs, and decode each key and value a last time.
pub fn decode_metadata_filter(value: &str) -> Result<BTreeMap<String, String>, ApiError> {
    let whole = form_decode(value)?;
    let mut out = BTreeMap::new();
    for pair in whole.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').ok_or_else(|| {
            ApiError::bad_request(format!(
                "invalid metadata filter {pair:?}: expected key=value"
            ))
        })?;
        out.insert(form_decode(k)?, form_decode(v)?);
    }
    Ok(out)
}

impl ListQuery {
    fn wants(&self, r: &SandboxRecord) -> bool {
        let state = match r.state {
            RecordState::Running => SandboxState::Running,
            RecordState::Paused => SandboxState::Paused,
            // Never shown: the SDK only knows running and paused.
            RecordState::Starting => return false,
        };
        if let Some(states) = &self.states
            && !states.contains(&state)
        {
            return false;
        }
        if self
            .started_after_ms
            .is_some_and(|after| r.started_ms < after)
        {
            return false;
        }
        if self.template.as_ref().is_some_and(|t| *t != r.template_id) {
            return false;
        }
        self.metadata
            .iter()
            .all(|(k, v)| r.metadata.get(k).is_some_and(|have| have == v))
    }

    /// One page of `records`, and the token of the next page if there is more.
    pub fn page<'a>(
        &self,
        records: &'a [SandboxRecord],
    ) -> (Vec<&'a SandboxRecord>, Option<String>) {
        let mut hits: Vec<&SandboxRecord> = records.iter().filter(|r| self.wants(r)).collect();
        hits.sort_by_key(|r| Cursor::of(r));
        if self.order == Order::Desc {
            hits.reverse();
        }
        let start = match self.after {
            None => 0,
            Some(c) => hits
                .iter()
                .position(|r| match self.order {
                    Order::Asc => Cursor::of(r) > c,
                    Order::Desc => Cursor::of(r) < c,
                })
                .unwrap_or(hits.len()),
        };
        let rest = &hits[start..];
        let page: Vec<&SandboxRecord> = rest.iter().take(self.limit).copied().collect();
        let next = (rest.len() > self.limit)
            .then(|| page.last().map(|r| Cursor::of(r).encode()))
            .flatten();
        (page, next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sdk_metadata_encoding_round_trips() {
        // What Python's quote + urlencode + httpx produce for {"k": "v w"} (protocol notes).
        let q = parse_list_query(Some("metadata=k%3Dv%252520w")).unwrap();
        assert_eq!(q.metadata.get("k").map(String::as_str), Some("v w"));
        // Generated by the SDK's own code path (urllib quote + urlencode, then httpx) for
        // {"a&b": "c=d", "e": "f/g+h", "sp ace": "v w"}.
        let q = parse_list_query(Some(
            "metadata=a%252526b%3Dc%25253Dd%26e%3Df%252Fg%25252Bh%26sp%252520ace%3Dv%252520w\
             &state=running%2Cpaused",
        ))
        .unwrap();
        assert_eq!(q.metadata.get("a&b").map(String::as_str), Some("c=d"));
        assert_eq!(q.metadata.get("e").map(String::as_str), Some("f/g+h"));
        assert_eq!(q.metadata.get("sp ace").map(String::as_str), Some("v w"));
        assert_eq!(q.metadata.len(), 3);
    }

    #[test]
    fn bad_parameters_are_400s() {
        for raw in [
            "limit=0",
            "limit=101",
            "limit=x",
            "state=killed",
            "order=up",
            "nextToken=%%%",
            "startedAfter=yesterday",
            "metadata=novalue",
        ] {
            let err = parse_list_query(Some(raw)).unwrap_err();
            assert_eq!(err.status, http::StatusCode::BAD_REQUEST, "{raw}");
        }
    }

    #[test]
    fn states_are_comma_joined() {
        let q = parse_list_query(Some("state=running%2Cpaused&limit=5&order=asc")).unwrap();
        assert_eq!(
            q.states,
            Some(vec![SandboxState::Running, SandboxState::Paused])
        );
        assert_eq!(q.limit, 5);
        assert_eq!(q.order, Order::Asc);
    }

    #[test]
    fn cursor_round_trips() {
        let c = Cursor {
            started_ms: 1_700_000_000_123,
            seq: 42,
        };
        assert_eq!(Cursor::decode(&c.encode()).unwrap(), c);
        assert!(Cursor::decode("djI6MTox").is_err());
    }
}
