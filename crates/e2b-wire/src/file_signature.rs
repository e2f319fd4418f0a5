//! E2B's signed `/files` URLs (protocol notes §4.3): the SDK's `download_url`/`upload_url` sign
//! `path:op:username:token[:expiration]` with the sandbox's envd access token. envd checks the
//! signature; `firkin serve` uses the same formula to find which sandbox a header-less signed
//! URL belongs to. One formula, here, so the two can never disagree.

use base64::Engine;
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// Which operation a signature authorizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SigningOp {
    /// `GET /files`.
    Read,
    /// `POST /files`.
    Write,
}

impl SigningOp {
    /// The word the SDK signs.
    pub fn as_str(self) -> &'static str {
        match self {
            SigningOp::Read => "read",
            SigningOp::Write => "write",
        }
    }

    /// The operation a `/files` request performs: a POST uploads, anything else reads.
    pub fn of_method(method: &str) -> Self {
        if method.eq_ignore_ascii_case("POST") {
            SigningOp::Write
        } else {
            SigningOp::Read
        }
    }
}

/// Why a signed `/files` request is refused.
#[derive(Debug, thiserror::Error)]
pub enum SignatureError {
    /// The query string does not parse (a 400, not an authentication failure).
    #[error("invalid query: {0}")]
    Query(#[from] serde_urlencoded::de::Error),
    #[error("missing access token or file signature")]
    Missing,
    #[error("invalid signature expiration {0:?}")]
    BadExpiration(String),
    #[error("signature expired")]
    Expired,
    #[error("invalid file signature")]
    Mismatch,
}

/// The `v1_` signature of a file URL: base64 (standard alphabet, no padding) of SHA-256 over
/// `path:op:username:token`, with `:expiration` appended when the URL expires.
pub fn sign(path: &str, op: SigningOp, username: &str, token: &str, exp: Option<&str>) -> String {
    let mut raw = format!("{path}:{}:{username}:{token}", op.as_str());
    if let Some(exp) = exp {
        raw.push(':');
        raw.push_str(exp);
    }
    let digest = Sha256::digest(raw.as_bytes());
    format!(
        "v1_{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest)
    )
}

/// Compares secrets in time that depends only on their lengths, so that a mismatch does not
/// tell an attacker how many leading bytes were right.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The signing fields of a `/files` query string. The path and username are the values as
/// sent, before any resolution: that is what the SDK signed.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct SignedQuery {
    path: Option<String>,
    username: Option<String>,
    signature: Option<String>,
    signature_expiration: Option<String>,
}

impl SignedQuery {
    /// Parses a raw (still percent-encoded) query string.
    pub fn parse(query: &str) -> Result<Self, SignatureError> {
        Ok(serde_urlencoded::from_str(query)?)
    }

    /// Whether the query carries a signature at all.
    pub fn is_signed(&self) -> bool {
        self.signature.is_some()
    }

    /// Whether `token` made this signature for `op`. Expiry is not looked at: a URL whose
    /// signature matches belongs to that token's sandbox even after it expired.
    pub fn signed_with(&self, op: SigningOp, token: &str) -> bool {
        let Some(signature) = self.signature.as_deref() else {
            return false;
        };
        let expected = sign(
            self.path.as_deref().unwrap_or(""),
            op,
            self.username.as_deref().unwrap_or(""),
            token,
            self.signature_expiration.as_deref(),
        );
        constant_time_eq(expected.as_bytes(), signature.as_bytes())
    }

    /// The whole check: a signature is present, has not expired at `now_unix` (seconds) and was
    /// made with `token` for `op`.
    pub fn verify(&self, op: SigningOp, token: &str, now_unix: i64) -> Result<(), SignatureError> {
        if !self.is_signed() {
            return Err(SignatureError::Missing);
        }
        if let Some(exp) = self.signature_expiration.as_deref() {
            let when: i64 = exp
                .parse()
                .map_err(|_| SignatureError::BadExpiration(exp.to_owned()))?;
            if now_unix > when {
                return Err(SignatureError::Expired);
            }
        }
        if self.signed_with(op, token) {
            Ok(())
        } else {
            Err(SignatureError::Mismatch)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_the_sdk() {
        // Values computed with e2b 2.63.0's `get_signature`.
        assert_eq!(
            sign("/tmp/a", SigningOp::Read, "", "tok", None),
            "v1_jRv7bf35peDXq059OOOyWD0PBnF4OWRLw0tBteoU7A4"
        );
        assert_eq!(
            sign("~/x y", SigningOp::Write, "user", "tok", None),
            "v1_3OG4eq00IBSU+D5o7mmMjNvtYfhK7LAYoffLsxWF0x0"
        );
    }

    fn query(path: &str, op: SigningOp, user: &str, token: &str, exp: Option<i64>) -> String {
        let exp = exp.map(|e| e.to_string());
        let sig = sign(path, op, user, token, exp.as_deref());
        let mut pairs = vec![("path", path.to_owned()), ("signature", sig)];
        if !user.is_empty() {
            pairs.push(("username", user.to_owned()));
        }
        if let Some(e) = exp {
            pairs.push(("signature_expiration", e));
        }
        serde_urlencoded::to_string(pairs).unwrap_or_default()
    }

    #[test]
    fn a_signed_query_verifies_only_for_its_token_and_operation() {
        let q = SignedQuery::parse(&query("/tmp/a b+c", SigningOp::Read, "user", "tok", None));
        let q = q.ok().unwrap_or_default();
        assert!(q.is_signed());
        assert!(q.signed_with(SigningOp::Read, "tok"));
        assert!(!q.signed_with(SigningOp::Write, "tok"));
        assert!(!q.signed_with(SigningOp::Read, "other"));
        assert!(q.verify(SigningOp::Read, "tok", 0).is_ok());
        assert!(matches!(
            q.verify(SigningOp::Read, "other", 0),
            Err(SignatureError::Mismatch)
        ));
    }

    #[test]
    fn expiry_is_part_of_the_signature_and_is_enforced() {
        let raw = query("/f", SigningOp::Write, "", "tok", Some(100));
        let q = SignedQuery::parse(&raw).ok().unwrap_or_default();
        assert!(q.verify(SigningOp::Write, "tok", 100).is_ok());
        assert!(matches!(
            q.verify(SigningOp::Write, "tok", 101),
            Err(SignatureError::Expired)
        ));
        // An expired URL still says whose it is.
        assert!(q.signed_with(SigningOp::Write, "tok"));
        let moved = raw.replace("signature_expiration=100", "signature_expiration=200");
        let q = SignedQuery::parse(&moved).ok().unwrap_or_default();
        assert!(matches!(
            q.verify(SigningOp::Write, "tok", 0),
            Err(SignatureError::Mismatch)
        ));
    }

    #[test]
    fn unsigned_queries_are_missing_a_signature() {
        let q = SignedQuery::parse("path=/f").ok().unwrap_or_default();
        assert!(!q.is_signed() && !q.signed_with(SigningOp::Read, "tok"));
        assert!(matches!(
            q.verify(SigningOp::Read, "tok", 0),
            Err(SignatureError::Missing)
        ));
    }
}
