use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize};

const MAX_ID_LEN: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{kind} id is empty")]
    Empty { kind: &'static str },
    #[error("{kind} id {value:?} is longer than {max} characters")]
    TooLong {
        kind: &'static str,
        value: String,
        max: usize,
    },
    #[error("{kind} id {value:?} has character {found:?}; allowed: {allowed}")]
    BadChar {
        kind: &'static str,
        value: String,
        found: char,
        allowed: &'static str,
    },
}

fn validate(
    kind: &'static str,
    value: &str,
    allowed: &'static str,
    first_ok: impl Fn(char) -> bool,
    rest_ok: impl Fn(char) -> bool,
) -> Result<(), IdError> {
    let mut chars = value.chars();
    let Some(first) = chars.next() else {
        return Err(IdError::Empty { kind });
    };
    if value.len() > MAX_ID_LEN {
        return Err(IdError::TooLong {
            kind,
            value: value.to_owned(),
            max: MAX_ID_LEN,
        });
    }
    let bad = if first_ok(first) {
        chars.find(|c| !rest_ok(*c))
    } else {
        Some(first)
    };
    match bad {
        Some(found) => Err(IdError::BadChar {
            kind,
            value: value.to_owned(),
            found,
            allowed,
        }),
        None => Ok(()),
    }
}

fn lower_alnum(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit()
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $allowed:literal, $first:expr, $rest:expr) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            pub fn new(value: impl Into<String>) -> Result<Self, IdError> {
                let value = value.into();
                validate($kind, &value, $allowed, $first, $rest)?;
                Ok(Self(value))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }

            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::new(s)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::new(s).map_err(serde::de::Error::custom)
            }
        }
    };
}

id_type!(
    /// A sandbox id: 1-64 lowercase ASCII letters and digits. No `-` and no `.`, so that the
    /// `{port}-{sandboxID}.{domain}` host grammar stays unambiguous.
    SandboxId,
    "sandbox",
    "a-z 0-9",
    lower_alnum,
    lower_alnum
);

id_type!(
    /// A template id or alias such as `base` or `code-interpreter-v1`: 1-64 characters of
    /// lowercase letters, digits, `-`, `_` and `.`, starting with a letter or digit. It names a
    /// directory on disk, so `/`, `..` and a leading dot are impossible by construction.
    TemplateId,
    "template",
    "a-z 0-9 - _ . (first: a-z 0-9)",
    lower_alnum,
    |c: char| lower_alnum(c) || matches!(c, '-' | '_' | '.')
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_ids_are_lowercase_alphanumeric() {
        assert!(SandboxId::new("i8x2kq0ab").is_ok());
        assert!(matches!(SandboxId::new(""), Err(IdError::Empty { .. })));
        assert!(matches!(
            SandboxId::new("abc-def"),
            Err(IdError::BadChar { found: '-', .. })
        ));
        assert!(matches!(
            SandboxId::new("ABC"),
            Err(IdError::BadChar { found: 'A', .. })
        ));
        assert!(matches!(
            SandboxId::new("a".repeat(65)),
            Err(IdError::TooLong { .. })
        ));
    }

    #[test]
    fn template_ids_cannot_escape_a_directory() {
        assert!(TemplateId::new("code-interpreter-v1").is_ok());
        assert!(TemplateId::new("repo_main.v2").is_ok());
        for bad in ["..", ".hidden", "a/b", "-x", "a b"] {
            assert!(TemplateId::new(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn ids_deserialize_through_validation() {
        let ok: Result<TemplateId, _> = serde_json::from_str("\"base\"");
        assert!(ok.is_ok());
        let bad: Result<TemplateId, _> = serde_json::from_str("\"../etc\"");
        assert!(bad.is_err());
    }
}
