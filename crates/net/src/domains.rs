//! The names of an [`crate::EgressPolicy`]'s `allow_domains`, matched against what a guest
//! asked its slot's DNS server. Matching is on the *question's* name: a guest that asks for
//! `api.example.com` and gets a CNAME chain ending elsewhere is granted the chain's addresses
//! because it asked for an allowed name, which is what the policy's author wrote down.

/// One entry of `allow_domains`.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Pattern {
    /// `example.com`: that name only.
    Exact(String),
    /// `*.example.com`, kept as `.example.com`: any name ending in it, so any depth of
    /// subdomain, and not the apex (`example.com` does not end in `.example.com`).
    Below(String),
}

/// A compiled `allow_domains` list.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DomainSet {
    patterns: Vec<Pattern>,
}

/// Lowercases and drops one trailing dot: DNS names are case-insensitive and a question's
/// name arrives fully qualified (`example.com.`).
fn normalise(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

impl DomainSet {
    /// Compiles `allow_domains`. Entries that cannot match anything (empty, a bare `*`, a `*`
    /// other than one leading `*.` label) are skipped with a warning: a policy is applied as
    /// far as it makes sense rather than refused, and a skipped entry only grants less.
    pub fn new(entries: &[String]) -> Self {
        let mut patterns = Vec::with_capacity(entries.len());
        for entry in entries {
            let e = normalise(entry.trim());
            let pattern = match e.strip_prefix("*.") {
                Some(rest) if !rest.is_empty() && !rest.contains('*') => {
                    Some(Pattern::Below(format!(".{rest}")))
                }
                Some(_) => None,
                None if !e.is_empty() && !e.contains('*') => Some(Pattern::Exact(e)),
                None => None,
            };
            match pattern {
                Some(p) => patterns.push(p),
                None => tracing::warn!(entry = %entry, "allow_domains entry ignored"),
            }
        }
        Self { patterns }
    }

    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// Whether `name` (a question's name, with or without the trailing dot, any case) is
    /// allowed.
    pub fn matches(&self, name: &str) -> bool {
        if self.patterns.is_empty() {
            return false;
        }
        let name = normalise(name);
        self.patterns.iter().any(|p| match p {
            Pattern::Exact(e) => name == *e,
            Pattern::Below(suffix) => name.len() > suffix.len() && name.ends_with(suffix.as_str()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(entries: &[&str]) -> DomainSet {
        DomainSet::new(&entries.iter().map(|e| (*e).to_owned()).collect::<Vec<_>>())
    }

    #[test]
    fn exact_names_match_only_themselves() {
        let s = set(&["example.com"]);
        assert!(s.matches("example.com"));
        assert!(s.matches("example.com."));
        assert!(s.matches("EXAMPLE.Com."));
        assert!(!s.matches("www.example.com"));
        assert!(!s.matches("example.co"));
        assert!(!s.matches("notexample.com"));
        assert!(!s.matches("example.com.evil"));
    }

    #[test]
    fn a_wildcard_matches_any_depth_below_but_not_the_apex() {
        let s = set(&["*.example.com"]);
        assert!(s.matches("a.example.com"));
        assert!(s.matches("a.b.example.com."));
        assert!(!s.matches("example.com"));
        assert!(!s.matches("example.com."));
        // A suffix match on labels, not on characters.
        assert!(!s.matches("badexample.com"));
        assert!(!s.matches(".example.com"));
    }

    #[test]
    fn entries_that_cannot_match_are_dropped() {
        let s = set(&["", "*", "*.", "a.*.com", "**.x.com", "*.*.x.com"]);
        assert!(s.is_empty());
        assert!(!s.matches("a.b.com"));
        assert!(!s.matches("x.com"));
        // Entries are normalised like names.
        let s = set(&["Example.COM.", " *.Test. "]);
        assert!(s.matches("example.com"));
        assert!(s.matches("a.test"));
        assert!(!set(&[]).matches("example.com"));
    }
}
