//! A sandbox's network settings: `network` of a create (and of the detail view) and the body
//! of `PUT /sandboxes/{id}/network`, spelled as the Python SDK's `SandboxNetworkConfig` and
//! `SandboxNetworkUpdateConfig` models spell them.
//!
//! Entries stay strings here: which are CIDRs, addresses or domains, and which are refused, is
//! the server's decision. The parts firkin does not interpret (`egressProxy`, `rules`,
//! `maskRequestHost`, `httpsPorts`) are kept as raw JSON so that an unexpected shape still
//! reaches the server's validation and gets its message, not a generic parse error.

use serde::{Deserialize, Serialize};

/// The egress fields that create's `network` and the update body share.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressRules {
    /// CIDRs, bare IPv4 addresses, domains or `*.domain`; allow beats deny.
    #[serde(rename = "allowOut", default, skip_serializing_if = "Option::is_none")]
    pub allow_out: Option<Vec<String>>,
    /// CIDRs and bare IPv4 addresses only.
    #[serde(rename = "denyOut", default, skip_serializing_if = "Option::is_none")]
    pub deny_out: Option<Vec<String>>,
    /// IPv4 resolvers opened when `allowOut` names a domain.
    #[serde(
        rename = "dnsServers",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub dns_servers: Option<Vec<String>>,
    #[serde(
        rename = "egressProxy",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub egress_proxy: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<serde_json::Value>,
}

/// `network` of `NewSandboxV2`, and `network` of `SandboxDetail` ("same shape as in create").
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxNetworkConfig {
    /// `false`: the sandbox's port URLs require its `trafficAccessToken`.
    #[serde(
        rename = "allowPublicTraffic",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub allow_public_traffic: Option<bool>,
    #[serde(flatten)]
    pub egress: EgressRules,
    #[serde(
        rename = "maskRequestHost",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub mask_request_host: Option<serde_json::Value>,
    #[serde(
        rename = "httpsPorts",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub https_ports: Option<serde_json::Value>,
}

/// `PUT /sandboxes/{id}/network` body (E2B's `SandboxNetworkUpdateConfig`). It replaces the
/// sandbox's whole egress configuration: an omitted field is cleared.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxNetworkUpdate {
    #[serde(flatten)]
    pub egress: EgressRules,
    /// The one snake_case key, as in create: `false` is `denyOut: ["0.0.0.0/0"]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_internet_access: Option<bool>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn update_body_uses_the_sdk_keys() {
        let body = r#"{"allowOut":["1.1.1.1","example.com"],"denyOut":["0.0.0.0/0"],
            "dnsServers":["9.9.9.9"],"egressProxy":null,"allow_internet_access":true,"x":1}"#;
        let u: SandboxNetworkUpdate = serde_json::from_str(body).unwrap();
        assert_eq!(
            u.egress.allow_out.as_deref(),
            Some(&["1.1.1.1".to_owned(), "example.com".to_owned()][..])
        );
        assert_eq!(
            u.egress.deny_out.as_deref(),
            Some(&["0.0.0.0/0".to_owned()][..])
        );
        assert_eq!(
            u.egress.dns_servers.as_deref(),
            Some(&["9.9.9.9".to_owned()][..])
        );
        assert_eq!(u.egress.egress_proxy, None);
        assert_eq!(u.allow_internet_access, Some(true));
        let back = serde_json::to_value(&u).unwrap();
        assert_eq!(back["allowOut"][1], "example.com");
        assert!(back.get("allowInternetAccess").is_none());
        assert_eq!(back["allow_internet_access"], true);
    }

    #[test]
    fn create_network_keeps_unknown_shapes_for_the_server_to_judge() {
        let n: SandboxNetworkConfig = serde_json::from_str(
            r#"{"allowPublicTraffic":false,"egressProxy":{"address":"h:1"},"rules":{"a.b":[]},
                "httpsPorts":[443],"maskRequestHost":"${PORT}-x.example.com"}"#,
        )
        .unwrap();
        assert_eq!(n.allow_public_traffic, Some(false));
        assert!(
            n.egress.egress_proxy.is_some() && n.egress.rules.is_some() && n.https_ports.is_some()
        );
        assert_eq!(
            serde_json::to_string(&SandboxNetworkConfig::default()).unwrap(),
            "{}"
        );
    }
}
