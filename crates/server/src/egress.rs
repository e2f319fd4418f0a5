//! E2B's egress settings (create's `allow_internet_access` and `network`, and the body of
//! `PUT /sandboxes/{id}/network`) turned into the runtime's [`EgressPolicy`], or refused with a
//! message naming the bad entry.
//!
//! Rules (E2B's, see the protocol notes): `allowOut` takes CIDRs, bare IPv4 addresses, domains
//! and `*.domain`; `denyOut` takes CIDRs and addresses only; allow always beats deny (the
//! runtime's policy has the same precedence); `allow_internet_access: false` denies
//! `0.0.0.0/0`; `dnsServers` (IPv4, at most 10; absent means `8.8.8.8`, `[]` none) are opened
//! only when `allowOut` names a domain, since only then does the guest need to resolve through
//! the firewall. `egressProxy` and `rules` are not implemented and are refused rather than
//! ignored: ignoring them would hand out a sandbox other than the one asked for.

use std::net::{Ipv4Addr, Ipv6Addr};

use firkin_e2b_wire::{ApiError, EgressRules, SandboxNetworkConfig, SandboxNetworkUpdate};
use firkin_net::{EgressPolicy, Ipv4Net, Verdict};

/// Most entries `allowOut` or `denyOut` may hold. Every entry becomes firewall state per
/// sandbox; real policies name a handful of hosts, and 512 leaves room for generated lists
/// (a cloud provider's ranges) without letting one request build an enormous rule set.
pub const MAX_ENTRIES: usize = 512;
/// E2B's limit on `dnsServers`.
pub const MAX_DNS_SERVERS: usize = 10;
/// The resolver E2B opens when `allowOut` names a domain and `dnsServers` is absent.
pub const DEFAULT_DNS_SERVER: Ipv4Addr = Ipv4Addr::new(8, 8, 8, 8);

/// Why an egress request was refused (400).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EgressError {
    #[error("{list} has {count} entries; at most {max} are allowed")]
    TooMany {
        list: &'static str,
        count: usize,
        max: usize,
    },
    #[error("{list}[{index}] {entry:?} is not an IPv4 address or CIDR (a.b.c.d or a.b.c.d/n)")]
    BadCidr {
        list: &'static str,
        index: usize,
        entry: String,
    },
    #[error(
        "{list}[{index}] {entry:?}: IPv6 egress rules are not supported (sandboxes have no IPv6)"
    )]
    Ipv6 {
        list: &'static str,
        index: usize,
        entry: String,
    },
    #[error(
        "denyOut[{index}] {entry:?}: denyOut takes CIDRs and IP addresses only, not domains \
         (deny everything with 0.0.0.0/0 and allow the domain in allowOut instead)"
    )]
    DomainInDeny { index: usize, entry: String },
    #[error("allowOut[{index}] {entry:?} is not a valid domain: {reason}")]
    BadDomain {
        index: usize,
        entry: String,
        reason: &'static str,
    },
    #[error("dnsServers[{index}] {entry:?} is not an IPv4 address")]
    BadDnsServer { index: usize, entry: String },
    #[error("{what} is not implemented by this firkin server")]
    Unsupported { what: &'static str },
    #[error("network: {0}")]
    Malformed(String),
}

impl From<EgressError> for ApiError {
    fn from(err: EgressError) -> Self {
        ApiError::bad_request(err.to_string())
    }
}

/// The 400 for an egress request on a server whose sandboxes share the host's network.
pub fn unenforceable() -> ApiError {
    ApiError::bad_request(
        "this firkin server runs without a network of its own per sandbox (`firkin serve \
         --network user`, or the process backend), so egress policies (allow_internet_access, \
         network.allowOut/denyOut) cannot be enforced",
    )
}

/// A validated egress request: what was asked for, in E2B's keys and normalised (what the
/// store keeps and the detail view shows), and the policy it means.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Egress {
    request: SandboxNetworkUpdate,
    policy: EgressPolicy,
}

impl Egress {
    pub fn policy(&self) -> &EgressPolicy {
        &self.policy
    }

    /// The request in E2B's keys: domains lowercased without a trailing dot, defaults
    /// (`allow_internet_access: true`, empty lists) left out. Parsing it again gives the same
    /// policy, which is how the store keeps it.
    pub fn request(&self) -> &SandboxNetworkUpdate {
        &self.request
    }

    /// The stored form (JSON of [`Egress::request`]).
    pub fn to_json(&self) -> String {
        // Strings, booleans and lists of strings always serialise.
        serde_json::to_string(&self.request).unwrap_or_else(|_| "{}".to_owned())
    }

    /// Reads the stored form back. `Ok(None)`: it restricts nothing.
    pub fn from_json(json: &str) -> Result<Option<Self>, EgressError> {
        let request: SandboxNetworkUpdate =
            serde_json::from_str(json).map_err(|e| EgressError::Malformed(e.to_string()))?;
        parse(&request)
    }
}

/// Create's egress fields: the top-level `allow_internet_access` and the `network` object
/// (whose `allowPublicTraffic` is the traffic token's business, not egress).
pub fn from_create(
    allow_internet_access: Option<bool>,
    network: Option<&serde_json::Value>,
) -> Result<Option<Egress>, EgressError> {
    let network: SandboxNetworkConfig = match network {
        None | Some(serde_json::Value::Null) => SandboxNetworkConfig::default(),
        Some(v) => {
            serde_json::from_value(v.clone()).map_err(|e| EgressError::Malformed(e.to_string()))?
        }
    };
    parse(&SandboxNetworkUpdate {
        egress: network.egress,
        allow_internet_access,
    })
}

/// The one parser of E2B's egress fields (a `PUT …/network` body, or create's fields put in
/// that shape). `Ok(None)`: the request restricts nothing (nothing denied and the default is
/// allow, so allow entries change nothing); such a PUT clears the sandbox's policy.
pub fn parse(req: &SandboxNetworkUpdate) -> Result<Option<Egress>, EgressError> {
    if is_set(req.egress.egress_proxy.as_ref()) {
        return Err(EgressError::Unsupported {
            what: "egressProxy (tunnelling egress through a SOCKS5 proxy)",
        });
    }
    if is_set(req.egress.rules.as_ref()) {
        return Err(EgressError::Unsupported {
            what: "rules (per-domain request transforms)",
        });
    }
    let allow_out = req.egress.allow_out.as_deref().unwrap_or_default();
    let deny_out = req.egress.deny_out.as_deref().unwrap_or_default();
    bounded("allowOut", allow_out.len(), MAX_ENTRIES)?;
    bounded("denyOut", deny_out.len(), MAX_ENTRIES)?;
    bounded(
        "dnsServers",
        req.egress.dns_servers.as_ref().map_or(0, Vec::len),
        MAX_DNS_SERVERS,
    )?;

    let mut allow = Vec::new();
    let mut allow_domains = Vec::new();
    let mut allow_shown = Vec::with_capacity(allow_out.len());
    for (index, raw) in allow_out.iter().enumerate() {
        match classify(raw) {
            Class::Ipv6 => return Err(ipv6("allowOut", index, raw)),
            Class::Net(Some(net)) => {
                allow.push(net);
                allow_shown.push(raw.clone());
            }
            Class::Net(None) => return Err(bad_cidr("allowOut", index, raw)),
            Class::Domain => {
                let name = normalize_domain(raw).map_err(|reason| EgressError::BadDomain {
                    index,
                    entry: raw.clone(),
                    reason,
                })?;
                allow_shown.push(name.clone());
                allow_domains.push(name);
            }
        }
    }
    let mut deny = Vec::with_capacity(deny_out.len());
    for (index, raw) in deny_out.iter().enumerate() {
        match classify(raw) {
            Class::Ipv6 => return Err(ipv6("denyOut", index, raw)),
            Class::Net(Some(net)) => deny.push(net),
            Class::Net(None) => return Err(bad_cidr("denyOut", index, raw)),
            Class::Domain => {
                return Err(EgressError::DomainInDeny {
                    index,
                    entry: raw.clone(),
                });
            }
        }
    }
    let dns = dns_servers(req.egress.dns_servers.as_deref())?;
    if !allow_domains.is_empty() {
        let servers = dns.unwrap_or_else(|| vec![DEFAULT_DNS_SERVER]);
        allow.extend(servers.into_iter().filter_map(|ip| Ipv4Net::new(ip, 32)));
    }
    let internet = req.allow_internet_access != Some(false);
    let default = if internet {
        Verdict::Allow
    } else {
        Verdict::Deny
    };
    if deny.is_empty() && default == Verdict::Allow {
        return Ok(None);
    }
    let request = SandboxNetworkUpdate {
        egress: EgressRules {
            allow_out: (!allow_shown.is_empty()).then_some(allow_shown),
            deny_out: (!deny_out.is_empty()).then(|| deny_out.to_vec()),
            dns_servers: req.egress.dns_servers.clone(),
            egress_proxy: None,
            rules: None,
        },
        allow_internet_access: (!internet).then_some(false),
    };
    Ok(Some(Egress {
        request,
        policy: EgressPolicy {
            allow,
            deny,
            allow_domains,
            default,
        },
    }))
}

/// The create-shaped `network` of the detail view: the stored request's lists plus the traffic
/// token's `allowPublicTraffic`. `None` when that says nothing (no internet access alone is
/// the top-level `allowInternetAccess`).
pub fn detail_network(egress: Option<&Egress>, private: bool) -> Option<SandboxNetworkConfig> {
    let req = egress.map(Egress::request);
    let network = SandboxNetworkConfig {
        allow_public_traffic: private.then_some(false),
        egress: EgressRules {
            allow_out: req.and_then(|r| r.egress.allow_out.clone()),
            deny_out: req.and_then(|r| r.egress.deny_out.clone()),
            dns_servers: req.and_then(|r| r.egress.dns_servers.clone()),
            ..EgressRules::default()
        },
        ..SandboxNetworkConfig::default()
    };
    (network != SandboxNetworkConfig::default()).then_some(network)
}

/// The detail view's `allowInternetAccess`.
pub fn internet_access(egress: Option<&Egress>) -> bool {
    egress.is_none_or(|e| e.request.allow_internet_access != Some(false))
}

/// Null, `{}` and `[]` say nothing; the SDK sends them for "none".
fn is_set(v: Option<&serde_json::Value>) -> bool {
    v.is_some_and(|v| match v {
        serde_json::Value::Null => false,
        serde_json::Value::Array(a) => !a.is_empty(),
        serde_json::Value::Object(o) => !o.is_empty(),
        _ => true,
    })
}

fn bounded(list: &'static str, count: usize, max: usize) -> Result<(), EgressError> {
    if count > max {
        return Err(EgressError::TooMany { list, count, max });
    }
    Ok(())
}

fn bad_cidr(list: &'static str, index: usize, raw: &str) -> EgressError {
    EgressError::BadCidr {
        list,
        index,
        entry: raw.to_owned(),
    }
}

fn ipv6(list: &'static str, index: usize, raw: &str) -> EgressError {
    EgressError::Ipv6 {
        list,
        index,
        entry: raw.to_owned(),
    }
}

enum Class {
    Ipv6,
    /// Meant as an IPv4 address or CIDR; `None` if it is not a valid one.
    Net(Option<Ipv4Net>),
    Domain,
}

/// What an entry is meant to be. Anything made only of digits and dots before an optional
/// `/prefix` (and the empty string) is meant as an address, since no valid domain ends in a
/// numeric label: `300.1.1.1` is reported as a bad address rather than a bad domain.
fn classify(raw: &str) -> Class {
    let addr = raw.split_once('/').map_or(raw, |(a, _)| a);
    if addr.parse::<Ipv6Addr>().is_ok() {
        return Class::Ipv6;
    }
    if addr.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Class::Net(raw.parse().ok());
    }
    Class::Domain
}

/// An `allowOut` domain as the runtime takes it: lowercase, no trailing dot, an exact name or
/// one leading `*.` (subdomains at any depth, not the apex).
fn normalize_domain(raw: &str) -> Result<String, &'static str> {
    if raw == "*" {
        return Err("a bare `*` is not a domain (allow every address with 0.0.0.0/0)");
    }
    if !raw.is_ascii() {
        return Err("internationalised names must be written in punycode (xn--…)");
    }
    let lower = raw.to_ascii_lowercase();
    let name = lower.strip_suffix('.').unwrap_or(&lower);
    let (wildcard, host) = match name.strip_prefix("*.") {
        Some(host) => (true, host),
        None => (false, name),
    };
    if host.contains('*') {
        return Err("a wildcard is allowed only once, as a leading `*.`");
    }
    if host.is_empty() {
        return Err("the name is empty");
    }
    if host.len() > 253 {
        return Err("the name is longer than 253 characters");
    }
    for label in host.split('.') {
        if label.is_empty() {
            return Err("it has an empty label");
        }
        if label.len() > 63 {
            return Err("a label is longer than 63 characters");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err("labels take only letters, digits, '-' and '_'");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("a label starts or ends with '-'");
        }
    }
    if host
        .rsplit('.')
        .next()
        .is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err("its last label is numeric");
    }
    Ok(if wildcard {
        format!("*.{host}")
    } else {
        host.to_owned()
    })
}

fn dns_servers(raw: Option<&[String]>) -> Result<Option<Vec<Ipv4Addr>>, EgressError> {
    let Some(raw) = raw else {
        return Ok(None);
    };
    raw.iter()
        .enumerate()
        .map(|(index, entry)| {
            if entry.parse::<Ipv6Addr>().is_ok() {
                return Err(ipv6("dnsServers", index, entry));
            }
            entry.parse().map_err(|_| EgressError::BadDnsServer {
                index,
                entry: entry.clone(),
            })
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

#[cfg(test)]
#[path = "egress_tests.rs"]
mod tests;
