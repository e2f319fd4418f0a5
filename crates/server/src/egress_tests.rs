use serde_json::json;

use super::*;

fn net(s: &str) -> Ipv4Net {
    s.parse().unwrap()
}

fn update(v: serde_json::Value) -> SandboxNetworkUpdate {
    serde_json::from_value(v).unwrap()
}

fn parsed(v: serde_json::Value) -> Result<Option<Egress>, EgressError> {
    parse(&update(v))
}

fn policy(v: serde_json::Value) -> EgressPolicy {
    parsed(v).unwrap().expect("a policy").policy().clone()
}

fn refusal(v: serde_json::Value) -> String {
    parsed(v).unwrap_err().to_string()
}

#[test]
fn nothing_or_only_allows_restricts_nothing() {
    assert_eq!(parsed(json!({})).unwrap(), None);
    assert_eq!(
        parsed(json!({"allowOut": [], "denyOut": [], "egressProxy": null, "rules": {}})).unwrap(),
        None
    );
    assert_eq!(
        parsed(json!({"allow_internet_access": true})).unwrap(),
        None
    );
    // Allow entries over an allow-everything default open nothing new.
    assert_eq!(
        parsed(json!({"allowOut": ["1.2.3.4", "example.com"], "dnsServers": ["1.1.1.1"]})).unwrap(),
        None
    );
    assert_eq!(from_create(None, None).unwrap(), None);
    assert_eq!(from_create(Some(true), Some(&json!(null))).unwrap(), None);
    assert_eq!(
        from_create(None, Some(&json!({"allowPublicTraffic": false}))).unwrap(),
        None
    );
}

#[test]
fn no_internet_access_denies_everything() {
    let p = policy(json!({"allow_internet_access": false}));
    assert_eq!(p, EgressPolicy::deny_all());
    let from_create = from_create(Some(false), None).unwrap().unwrap();
    assert_eq!(from_create.policy(), &EgressPolicy::deny_all());
    assert_eq!(
        from_create.request().allow_internet_access,
        Some(false),
        "kept for the detail view"
    );
    assert!(!internet_access(Some(&from_create)));
    assert!(internet_access(None));
}

#[test]
fn allow_beats_deny_is_preserved() {
    let p = policy(json!({
        "allowOut": ["10.1.2.3", "192.0.2.0/24"],
        "denyOut": ["0.0.0.0/0", "192.0.2.7"],
    }));
    assert_eq!(p.allow, vec![net("10.1.2.3/32"), net("192.0.2.0/24")]);
    assert_eq!(p.deny, vec![net("0.0.0.0/0"), net("192.0.2.7/32")]);
    // The default stays allow: what denyOut does not name is reachable, and the runtime lets
    // allow entries win over deny entries.
    assert_eq!(p.default, Verdict::Allow);
    assert!(p.allow_domains.is_empty());
}

#[test]
fn domains_are_normalised_and_open_the_dns_servers() {
    let e = parsed(json!({
        "allowOut": ["Example.COM.", "*.PyPI.org", "1.1.1.1"],
        "allow_internet_access": false,
    }))
    .unwrap()
    .unwrap();
    let p = e.policy();
    assert_eq!(p.allow_domains, vec!["example.com", "*.pypi.org"]);
    // Absent dnsServers means E2B's default resolver.
    assert_eq!(p.allow, vec![net("1.1.1.1/32"), net("8.8.8.8/32")]);
    assert_eq!(p.default, Verdict::Deny);
    assert_eq!(
        e.request().egress.allow_out.as_deref().unwrap(),
        ["example.com", "*.pypi.org", "1.1.1.1"]
    );

    let p = policy(json!({
        "allowOut": ["example.com"],
        "denyOut": ["0.0.0.0/0"],
        "dnsServers": ["9.9.9.9", "1.0.0.1"],
    }));
    assert_eq!(p.allow, vec![net("9.9.9.9/32"), net("1.0.0.1/32")]);

    // `[]`: no resolver is opened.
    let p = policy(json!({"allowOut": ["example.com"], "dnsServers": [],
        "allow_internet_access": false}));
    assert!(p.allow.is_empty());
}

#[test]
fn dns_servers_without_a_domain_open_nothing() {
    let p = policy(json!({
        "allowOut": ["1.2.3.4"],
        "dnsServers": ["9.9.9.9"],
        "allow_internet_access": false,
    }));
    assert_eq!(p.allow, vec![net("1.2.3.4/32")]);
    assert!(p.allow_domains.is_empty());
}

#[test]
fn bad_addresses_are_named() {
    for (entry, list) in [
        ("300.1.1.1", "allowOut"),
        ("1.2.3.4/33", "allowOut"),
        ("1.2.3/8", "allowOut"),
        ("", "allowOut"),
        ("10.0.0.0/x", "denyOut"),
        ("", "denyOut"),
    ] {
        let msg = refusal(json!({ (list): [entry] }));
        assert_eq!(
            msg,
            format!("{list}[0] {entry:?} is not an IPv4 address or CIDR (a.b.c.d or a.b.c.d/n)")
        );
    }
    let msg = refusal(json!({"denyOut": ["0.0.0.0/0", "1.2.3.4/40"]}));
    assert!(msg.starts_with("denyOut[1] \"1.2.3.4/40\""), "{msg}");
}

#[test]
fn ipv6_entries_are_refused_as_unsupported() {
    for (list, entry) in [
        ("allowOut", "2001:db8::1"),
        ("allowOut", "::/0"),
        ("denyOut", "fe80::/10"),
        ("dnsServers", "2606:4700:4700::1111"),
    ] {
        let msg = refusal(json!({ (list): [entry] }));
        assert!(
            msg.contains("IPv6 egress rules are not supported (sandboxes have no IPv6)")
                && msg.contains(entry),
            "{msg}"
        );
    }
}

#[test]
fn domains_in_deny_out_are_refused() {
    let msg = refusal(json!({"denyOut": ["1.1.1.1", "evil.example"]}));
    assert!(
        msg.starts_with("denyOut[1] \"evil.example\"") && msg.contains("not domains"),
        "{msg}"
    );
}

#[test]
fn invalid_domains_are_refused_with_a_reason() {
    for (entry, reason) in [
        ("*", "a bare `*`"),
        ("*.", "wildcard is allowed only once"),
        ("*.*.example.com", "wildcard is allowed only once"),
        ("a.*.example.com", "wildcard is allowed only once"),
        ("ex*ample.com", "wildcard is allowed only once"),
        ("example..com", "empty label"),
        (".example.com", "empty label"),
        ("-bad.example.com", "starts or ends with '-'"),
        ("exa mple.com", "letters, digits"),
        ("example.com:443", "letters, digits"),
        ("http://example.com", "letters, digits"),
        ("bücher.example", "punycode"),
        ("host.123", "last label is numeric"),
    ] {
        let msg = refusal(json!({"allowOut": [entry]}));
        assert!(
            msg.starts_with(&format!("allowOut[0] {entry:?} is not a valid domain"))
                && msg.contains(reason),
            "{entry}: {msg}"
        );
    }
    let long_label = format!("{}.com", "a".repeat(64));
    assert!(refusal(json!({"allowOut": [long_label]})).contains("longer than 63"));
    let long_name = vec!["abcdefghi"; 26].join(".");
    assert!(refusal(json!({"allowOut": [long_name]})).contains("longer than 253"));
    // Valid edge cases.
    let p = policy(
        json!({"allowOut": ["localhost", "_srv.x-y.example", "xn--bcher-kva.example"],
        "allow_internet_access": false}),
    );
    assert_eq!(
        p.allow_domains,
        vec!["localhost", "_srv.x-y.example", "xn--bcher-kva.example"]
    );
}

#[test]
fn lists_are_bounded() {
    let many: Vec<String> = (0..=MAX_ENTRIES)
        .map(|i| format!("10.0.{}.{}", i / 256, i % 256))
        .collect();
    let msg = refusal(json!({"allowOut": many}));
    assert_eq!(msg, "allowOut has 513 entries; at most 512 are allowed");
    let msg = refusal(json!({"denyOut": many}));
    assert_eq!(msg, "denyOut has 513 entries; at most 512 are allowed");
    // Exactly the bound is fine.
    assert!(parsed(json!({"denyOut": many[..MAX_ENTRIES]})).is_ok());
    let dns: Vec<String> = (0..11).map(|i| format!("10.0.0.{i}")).collect();
    let msg = refusal(json!({"dnsServers": dns}));
    assert_eq!(msg, "dnsServers has 11 entries; at most 10 are allowed");
}

#[test]
fn dns_servers_must_be_ipv4_addresses() {
    for entry in ["dns.google", "8.8.8.0/24", "8.8.8"] {
        let msg = refusal(json!({"dnsServers": ["1.1.1.1", entry]}));
        assert_eq!(
            msg,
            format!("dnsServers[1] {entry:?} is not an IPv4 address"),
            "{entry}"
        );
    }
}

#[test]
fn egress_proxy_and_rules_are_refused_as_not_implemented() {
    let msg = refusal(json!({"egressProxy": {"address": "proxy:1080"}}));
    assert!(
        msg.starts_with("egressProxy") && msg.ends_with("is not implemented by this firkin server"),
        "{msg}"
    );
    let msg = refusal(json!({"rules": {"api.example.com": [{"transform": {"headers": {}}}]}}));
    assert!(msg.starts_with("rules"), "{msg}");
    let msg = from_create(None, Some(&json!({"egressProxy": {"address": "p:1"}})))
        .unwrap_err()
        .to_string();
    assert!(msg.starts_with("egressProxy"), "{msg}");
}

#[test]
fn malformed_shapes_are_refused() {
    let msg = from_create(None, Some(&json!({"allowOut": "1.2.3.4"})))
        .unwrap_err()
        .to_string();
    assert!(msg.starts_with("network: "), "{msg}");
    assert!(from_create(None, Some(&json!(["x"]))).is_err());
    assert!(from_create(None, Some(&json!({"denyOut": [1]}))).is_err());
}

/// A PUT replaces everything: what its body omits is gone, however the sandbox was created.
#[test]
fn an_update_replaces_the_whole_policy() {
    let created = from_create(
        Some(false),
        Some(&json!({"allowOut": ["example.com"], "dnsServers": ["9.9.9.9"]})),
    )
    .unwrap()
    .unwrap();
    assert_eq!(created.policy().default, Verdict::Deny);

    // Only denyOut now: internet access is back (omitted = default), the domain and its
    // resolver are gone.
    let replaced = parsed(json!({"denyOut": ["203.0.113.0/24"]}))
        .unwrap()
        .unwrap();
    assert_eq!(
        replaced.policy(),
        &EgressPolicy {
            deny: vec![net("203.0.113.0/24")],
            ..EgressPolicy::default()
        }
    );
    assert_eq!(
        replaced.request(),
        &update(json!({"denyOut": ["203.0.113.0/24"]}))
    );
    // An empty body clears it.
    assert_eq!(parsed(json!({})).unwrap(), None);
}

#[test]
fn the_stored_form_round_trips() {
    for body in [
        json!({"allow_internet_access": false}),
        json!({"allowOut": ["A.example.", "*.b.example", "10.0.0.0/8"], "denyOut": ["0.0.0.0/0"],
            "dnsServers": []}),
        json!({"allowOut": ["a.example"], "denyOut": ["0.0.0.0/0"]}),
    ] {
        let e = parsed(body.clone()).unwrap().unwrap();
        let back = Egress::from_json(&e.to_json()).unwrap().unwrap();
        assert_eq!(back, e, "{body}");
    }
    assert!(Egress::from_json("{\"allowOut\": 5}").is_err());
    assert!(Egress::from_json("{\"denyOut\": [\"bad\"]}").is_err());
}

#[test]
fn the_detail_view_shows_the_request_and_the_traffic_setting() {
    assert_eq!(detail_network(None, false), None);
    let offline = parsed(json!({"allow_internet_access": false})).unwrap();
    assert_eq!(detail_network(offline.as_ref(), false), None);
    let private = detail_network(None, true).unwrap();
    assert_eq!(
        serde_json::to_value(private).unwrap(),
        json!({"allowPublicTraffic": false})
    );
    let e = parsed(
        json!({"allowOut": ["Example.com"], "denyOut": ["0.0.0.0/0"],
        "dnsServers": ["1.1.1.1"]}),
    )
    .unwrap()
    .unwrap();
    assert_eq!(
        serde_json::to_value(detail_network(Some(&e), false)).unwrap(),
        json!({"allowOut": ["example.com"], "denyOut": ["0.0.0.0/0"], "dnsServers": ["1.1.1.1"]})
    );
}
