//! nftables rulesets, built as typed JSON (the `nftables` crate) and applied by one
//! `nft -j -f -` run per change. A run is a single kernel transaction, so a table is replaced
//! (or a policy swapped) atomically: no packet ever sees half a ruleset.
//!
//! Two tables:
//! - the host's (`inet <host_table>` in the root namespace), shared by every slot: slots may
//!   not reach the host (input), each other or link-local (forward), and their traffic is
//!   masqueraded on its way out;
//! - each slot's (`inet firkin` in the slot namespace): the guest's address is NATed to the
//!   slot's veth address, the host's connections to that address are DNATed to the guest (the
//!   sandbox plane's path to guest ports), and the guest's new connections pass the
//!   always-denied ranges and then the slot's [`EgressPolicy`] chain, which is swapped at run
//!   time; with domains in the policy, the web connections that chain would refuse are DNATed
//!   to the slot's domain proxy instead (chain `domain_redirect`, swapped with the policy).

use std::borrow::Cow;

use nftables::batch::Batch;
use nftables::expr::{Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField, Prefix};
use std::collections::HashSet;

use nftables::schema::{
    Chain, FlushObject, NfCmd, NfListObject, Nftables, Rule, Set, SetFlag, SetType, SetTypeValue,
    Table,
};
use nftables::stmt::{JumpTarget, Match, NAT, NATFamily, Operator, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};

use crate::config::{EgressPolicy, Ipv4Net, PoolConfig, SlotConfig, Verdict};
use crate::domains::DomainSet;

/// The slot namespace's table (alone in its namespace, so a fixed name).
pub const SLOT_TABLE: &str = "firkin";
const POLICY_CHAIN: &str = "policy";
/// The addresses the slot's DNS server resolved for an allowed domain, each for its answer's
/// TTL (see [`crate::dns`]).
pub const ALLOW_DNS_SET: &str = "allow_dns";
/// The chain of the slot's NAT prerouting that sends a guest's new connections to ports 80 and
/// 443 to the slot's SNI/Host proxy (see [`crate::proxy`]); filled by the policy, empty
/// (so the pure-kernel path) when the policy has no domains.
const PROXY_CHAIN: &str = "domain_redirect";
/// The ports whose connections the proxy decides on by name (HTTP, TLS).
pub const PROXY_PORTS: [u16; 2] = [80, 443];
/// Where the proxy listens: this port of the guest's gateway address, reached only through
/// the redirect (a guest connecting there itself is refused by the input chain).
pub const PROXY_PORT: u16 = 10443;

/// Destinations a guest may never reach, whatever its policy: "this network", loopback,
/// link-local (cloud metadata lives at 169.254.169.254), multicast and reserved. The pool's own
/// range (the host's and every slot's veth addresses) is added per slot.
const ALWAYS_DENIED: &[(u8, u8, u8, u8, u8)] = &[
    (0, 0, 0, 0, 8),
    (127, 0, 0, 0, 8),
    (169, 254, 0, 0, 16),
    (224, 0, 0, 0, 4),
    (240, 0, 0, 0, 4),
];

fn s(v: impl Into<String>) -> Expression<'static> {
    Expression::String(Cow::Owned(v.into()))
}

fn meta(key: MetaKey) -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(Meta { key }))
}

fn ip(field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: "ip".into(),
            field: field.into(),
        },
    )))
}

/// A transport header field (`udp dport`); nft adds the protocol check itself.
fn l4(field: &'static str, proto: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: proto.into(),
            field: field.into(),
        },
    )))
}

fn ct(key: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::CT(nftables::expr::CT {
        key: key.into(),
        family: None,
        dir: None,
    }))
}

fn net(n: Ipv4Net) -> Expression<'static> {
    if n.prefix() == 32 {
        return s(n.addr().to_string());
    }
    Expression::Named(NamedExpression::Prefix(Prefix {
        addr: Box::new(s(n.network().to_string())),
        len: u32::from(n.prefix()),
    }))
}

fn matches(
    left: Expression<'static>,
    op: Operator,
    right: Expression<'static>,
) -> Statement<'static> {
    Statement::Match(Match { left, right, op })
}

fn iif(name: &str) -> Statement<'static> {
    matches(meta(MetaKey::Iifname), Operator::EQ, s(name))
}

fn oif(name: &str) -> Statement<'static> {
    matches(meta(MetaKey::Oifname), Operator::EQ, s(name))
}

fn established() -> Statement<'static> {
    matches(
        ct("state"),
        Operator::IN,
        Expression::List(vec![s("established"), s("related")]),
    )
}

fn accept() -> Statement<'static> {
    Statement::Accept(None)
}

fn drop_() -> Statement<'static> {
    Statement::Drop(None)
}

/// Refuse with an ICMP error so a blocked connect fails at once instead of timing out.
fn reject() -> Statement<'static> {
    Statement::Reject(None)
}

struct Builder {
    table: String,
    batch: Batch<'static>,
}

impl Builder {
    fn new(table: &str) -> Self {
        Self {
            table: table.to_owned(),
            batch: Batch::new(),
        }
    }

    fn table(&self) -> Table<'static> {
        Table {
            family: NfFamily::INet,
            name: Cow::Owned(self.table.clone()),
            handle: None,
        }
    }

    /// Add-then-delete makes the delete succeed whether or not the table existed.
    fn replace_table(&mut self) {
        self.batch.add(NfListObject::Table(self.table()));
        self.batch.delete(NfListObject::Table(self.table()));
        self.batch.add(NfListObject::Table(self.table()));
    }

    fn chain_def(&self, name: &str) -> Chain<'static> {
        Chain {
            family: NfFamily::INet,
            table: Cow::Owned(self.table.clone()),
            name: Cow::Owned(name.to_owned()),
            ..Chain::default()
        }
    }

    fn base_chain(
        &mut self,
        name: &str,
        ty: NfChainType,
        hook: NfHook,
        prio: i32,
        policy: NfChainPolicy,
    ) {
        let chain = Chain {
            _type: Some(ty),
            hook: Some(hook),
            prio: Some(prio),
            policy: Some(policy),
            ..self.chain_def(name)
        };
        self.batch.add(NfListObject::Chain(chain));
    }

    fn rule(&mut self, chain: &str, expr: Vec<Statement<'static>>) {
        self.batch.add(NfListObject::Rule(Rule {
            family: NfFamily::INet,
            table: Cow::Owned(self.table.clone()),
            chain: Cow::Owned(chain.to_owned()),
            expr: expr.into(),
            ..Rule::default()
        }));
    }

    fn build(self) -> Nftables<'static> {
        self.batch.to_nftables()
    }
}

/// The host's table for a pool: every slot's host-side veth is `<prefix>h<i>`.
pub fn host_ruleset(pool: &PoolConfig) -> Nftables<'static> {
    let slots = format!("{}h*", pool.prefix);
    let mut b = Builder::new(&pool.host_table);
    b.replace_table();
    // Input: a slot may answer what the host started (the proxy's connections to guest
    // ports), never start anything towards any address of the host.
    b.base_chain(
        "input",
        NfChainType::Filter,
        NfHook::Input,
        0,
        NfChainPolicy::Accept,
    );
    b.rule("input", vec![iif(&slots), established(), accept()]);
    b.rule("input", vec![iif(&slots), reject()]);
    // Forward: no slot to slot, no link-local, no pool address, no spoofed source.
    b.base_chain(
        "forward",
        NfChainType::Filter,
        NfHook::Forward,
        0,
        NfChainPolicy::Accept,
    );
    b.rule(
        "forward",
        vec![
            iif(&slots),
            matches(ip("saddr"), Operator::NEQ, net(pool.range)),
            drop_(),
        ],
    );
    b.rule("forward", vec![iif(&slots), oif(&slots), reject()]);
    for (a, b2, c, d, len) in ALWAYS_DENIED {
        let n = Ipv4Net::new([*a, *b2, *c, *d].into(), *len);
        if let Some(n) = n {
            b.rule(
                "forward",
                vec![
                    iif(&slots),
                    matches(ip("daddr"), Operator::EQ, net(n)),
                    reject(),
                ],
            );
        }
    }
    b.rule(
        "forward",
        vec![
            iif(&slots),
            matches(ip("daddr"), Operator::EQ, net(pool.range)),
            reject(),
        ],
    );
    // Out of the machine with the host's address (a slot's /30 means nothing elsewhere).
    b.base_chain(
        "postrouting",
        NfChainType::NAT,
        NfHook::Postrouting,
        100,
        NfChainPolicy::Accept,
    );
    b.rule(
        "postrouting",
        vec![
            matches(ip("saddr"), Operator::EQ, net(pool.range)),
            matches(meta(MetaKey::Oifname), Operator::NEQ, s(slots.clone())),
            Statement::Masquerade(None),
        ],
    );
    b.build()
}

/// Deletes a table whether or not it exists.
pub fn remove_table(table: &str) -> Nftables<'static> {
    let mut b = Builder::new(table);
    b.batch.add(NfListObject::Table(b.table()));
    b.batch.delete(NfListObject::Table(b.table()));
    b.build()
}

/// Every destination no guest connection may reach, whatever the policy: [`ALWAYS_DENIED`],
/// the pool's range (the host's and every slot's veth addresses) and the guest's own subnet
/// (the slot's local addresses). The proxy checks its upstream connections against it too.
pub fn always_denied(slot: &SlotConfig) -> Vec<Ipv4Net> {
    let mut denied: Vec<Ipv4Net> = ALWAYS_DENIED
        .iter()
        .filter_map(|(a, b2, c, d, len)| Ipv4Net::new([*a, *b2, *c, *d].into(), *len))
        .collect();
    denied.push(slot.range);
    denied.push(slot.guest.subnet());
    denied
}

/// The redirect chain's rules: nothing without domains; with them, a connection the policy
/// chain would not accept (not in `@allow_dns`, not in an `allow` CIDR, and denied by a
/// `deny` CIDR or the default) goes to the proxy instead, which decides by the name it
/// announces. Always-denied destinations are never redirected: the forward chain refuses them.
fn redirect_rules(b: &mut Builder, slot: &SlotConfig, policy: &EgressPolicy) {
    if DomainSet::new(&policy.allow_domains).is_empty() {
        return;
    }
    let ret = || Statement::Return(None);
    for n in always_denied(slot) {
        b.rule(
            PROXY_CHAIN,
            vec![matches(ip("daddr"), Operator::EQ, net(n)), ret()],
        );
    }
    b.rule(
        PROXY_CHAIN,
        vec![
            matches(ip("daddr"), Operator::EQ, s(format!("@{ALLOW_DNS_SET}"))),
            ret(),
        ],
    );
    for n in &policy.allow {
        b.rule(
            PROXY_CHAIN,
            vec![matches(ip("daddr"), Operator::EQ, net(*n)), ret()],
        );
    }
    let to_proxy = || {
        Statement::DNAT(Some(NAT {
            addr: Some(s(slot.guest.gateway.to_string())),
            family: Some(NATFamily::IP),
            port: Some(Expression::Number(u32::from(PROXY_PORT))),
            flags: None,
        }))
    };
    // nft maps a port only after a transport protocol match in the same rule.
    let tcp = || matches(meta(MetaKey::L4proto), Operator::EQ, s("tcp"));
    for n in &policy.deny {
        b.rule(
            PROXY_CHAIN,
            vec![
                matches(ip("daddr"), Operator::EQ, net(*n)),
                tcp(),
                to_proxy(),
            ],
        );
    }
    if policy.default == Verdict::Deny {
        b.rule(PROXY_CHAIN, vec![tcp(), to_proxy()]);
    }
}

fn policy_rules(b: &mut Builder, policy: &EgressPolicy) {
    // Domain grants are allows, and an allow beats a deny: first. The rule is there whatever
    // the policy; with no domains the set stays empty.
    b.rule(
        POLICY_CHAIN,
        vec![
            matches(ip("daddr"), Operator::EQ, s(format!("@{ALLOW_DNS_SET}"))),
            accept(),
        ],
    );
    // E2B's rule: an allowed destination is allowed even inside a denied range.
    for n in &policy.allow {
        b.rule(
            POLICY_CHAIN,
            vec![matches(ip("daddr"), Operator::EQ, net(*n)), accept()],
        );
    }
    for n in &policy.deny {
        b.rule(
            POLICY_CHAIN,
            vec![matches(ip("daddr"), Operator::EQ, net(*n)), reject()],
        );
    }
    let last = match policy.default {
        Verdict::Allow => accept(),
        Verdict::Deny => reject(),
    };
    b.rule(POLICY_CHAIN, vec![last]);
}

/// The slot namespace's whole table.
pub fn slot_ruleset(slot: &SlotConfig) -> Nftables<'static> {
    let guest = slot.guest.guest.to_string();
    let guest_if = slot.guest_if.as_str();
    let slot_if = slot.slot_if.as_str();
    let mut b = Builder::new(SLOT_TABLE);
    b.replace_table();

    // The sandbox plane's path to any guest TCP port: the host connects to the slot's veth
    // address, the port unchanged. Nothing of the sandbox listens on the host.
    b.base_chain(
        "prerouting",
        NfChainType::NAT,
        NfHook::Prerouting,
        -100,
        NfChainPolicy::Accept,
    );
    b.rule(
        "prerouting",
        vec![
            iif(slot_if),
            matches(ip("daddr"), Operator::EQ, s(slot.slot_addr.to_string())),
            matches(meta(MetaKey::L4proto), Operator::EQ, s("tcp")),
            Statement::DNAT(Some(NAT {
                addr: Some(s(guest.clone())),
                family: Some(NATFamily::IP),
                port: None,
                flags: None,
            })),
        ],
    );
    // A policy with domains sends some of the guest's web connections to the proxy.
    b.batch.add(NfListObject::Chain(b.chain_def(PROXY_CHAIN)));
    for port in PROXY_PORTS {
        b.rule(
            "prerouting",
            vec![
                iif(guest_if),
                matches(meta(MetaKey::Nfproto), Operator::EQ, s("ipv4")),
                matches(
                    l4("dport", "tcp"),
                    Operator::EQ,
                    Expression::Number(u32::from(port)),
                ),
                Statement::Jump(JumpTarget {
                    target: PROXY_CHAIN.into(),
                }),
            ],
        );
    }
    // Every slot's guest has the same address; leaving, it becomes the slot's.
    b.base_chain(
        "postrouting",
        NfChainType::NAT,
        NfHook::Postrouting,
        100,
        NfChainPolicy::Accept,
    );
    b.rule(
        "postrouting",
        vec![
            oif(slot_if),
            matches(ip("saddr"), Operator::EQ, s(guest.clone())),
            Statement::SNAT(Some(NAT {
                addr: Some(s(slot.slot_addr.to_string())),
                family: Some(NATFamily::IP),
                port: None,
                flags: None,
            })),
        ],
    );
    // Nothing in the slot namespace serves the guest (its gateway included) or the host.
    b.base_chain(
        "input",
        NfChainType::Filter,
        NfHook::Input,
        0,
        NfChainPolicy::Drop,
    );
    b.rule("input", vec![established(), accept()]);
    b.rule("input", vec![iif("lo"), accept()]);
    // The one service of the slot: DNS for its guest, on the DNS address only.
    for proto in ["udp", "tcp"] {
        b.rule(
            "input",
            vec![
                iif(guest_if),
                matches(ip("daddr"), Operator::EQ, s(slot.guest.dns.to_string())),
                matches(l4("dport", proto), Operator::EQ, Expression::Number(53)),
                accept(),
            ],
        );
    }
    // And the proxy, for the connections the redirect sent there (never a direct one).
    b.rule(
        "input",
        vec![
            iif(guest_if),
            matches(ip("daddr"), Operator::EQ, s(slot.guest.gateway.to_string())),
            matches(
                l4("dport", "tcp"),
                Operator::EQ,
                Expression::Number(u32::from(PROXY_PORT)),
            ),
            matches(ct("status"), Operator::IN, s("dnat")),
            accept(),
        ],
    );
    b.rule("input", vec![iif(guest_if), reject()]);

    b.base_chain(
        "forward",
        NfChainType::Filter,
        NfHook::Forward,
        0,
        NfChainPolicy::Drop,
    );
    // The slot has no IPv6 routes; a guest's IPv6 goes nowhere.
    b.rule(
        "forward",
        vec![
            matches(meta(MetaKey::Nfproto), Operator::EQ, s("ipv6")),
            drop_(),
        ],
    );
    b.rule("forward", vec![established(), accept()]);
    b.rule(
        "forward",
        vec![matches(ct("state"), Operator::IN, s("invalid")), drop_()],
    );
    b.rule(
        "forward",
        vec![
            iif(slot_if),
            oif(guest_if),
            matches(ct("status"), Operator::IN, s("dnat")),
            accept(),
        ],
    );
    b.rule(
        "forward",
        vec![
            iif(guest_if),
            matches(ip("saddr"), Operator::NEQ, s(guest)),
            drop_(),
        ],
    );
    for n in always_denied(slot) {
        b.rule(
            "forward",
            vec![
                iif(guest_if),
                matches(ip("daddr"), Operator::EQ, net(n)),
                reject(),
            ],
        );
    }
    b.batch.add(NfListObject::Chain(b.chain_def(POLICY_CHAIN)));
    b.batch.add(NfListObject::Set(Box::new(Set {
        family: NfFamily::INet,
        table: Cow::Borrowed(SLOT_TABLE),
        name: Cow::Borrowed(ALLOW_DNS_SET),
        set_type: SetTypeValue::Single(SetType::Ipv4Addr),
        flags: Some(HashSet::from([SetFlag::Timeout])),
        ..Set::default()
    })));
    b.rule(
        "forward",
        vec![
            iif(guest_if),
            oif(slot_if),
            Statement::Jump(JumpTarget {
                target: POLICY_CHAIN.into(),
            }),
        ],
    );
    policy_rules(&mut b, &slot.policy);
    redirect_rules(&mut b, slot, &slot.policy);
    b.build()
}

fn allow_dns_set() -> Set<'static> {
    Set {
        family: NfFamily::INet,
        table: Cow::Borrowed(SLOT_TABLE),
        name: Cow::Borrowed(ALLOW_DNS_SET),
        set_type: SetTypeValue::Single(SetType::Ipv4Addr),
        ..Set::default()
    }
}

/// Swaps a slot's policy chain in one transaction: connections already established keep
/// going (the forward chain accepts them before the policy), new ones see the new policy.
/// The domain grants go in the same transaction: they were made for the old policy's domains;
/// and so does the redirect to the proxy, on or off with the domains.
pub fn policy_update(slot: &SlotConfig, policy: &EgressPolicy) -> Nftables<'static> {
    let mut b = Builder::new(SLOT_TABLE);
    b.batch
        .add_cmd(NfCmd::Flush(FlushObject::Chain(b.chain_def(POLICY_CHAIN))));
    b.batch
        .add_cmd(NfCmd::Flush(FlushObject::Chain(b.chain_def(PROXY_CHAIN))));
    b.batch
        .add_cmd(NfCmd::Flush(FlushObject::Set(Box::new(allow_dns_set()))));
    policy_rules(&mut b, policy);
    redirect_rules(&mut b, slot, policy);
    b.build()
}

/// Runs `nft -j -f -` with `ruleset` in the calling thread's namespace.
pub fn apply(ruleset: &Nftables<'_>) -> Result<(), nftables::helper::NftablesError> {
    nftables::helper::apply_ruleset(ruleset)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn rulesets_serialise_to_the_json_nft_reads() {
        let pool = PoolConfig::default();
        let slot = pool.slot(3).unwrap();
        let json = serde_json::to_string(&slot_ruleset(&slot)).unwrap();
        assert!(
            json.contains(r#""dnat":{"addr":"10.0.2.15","family":"ip"}"#),
            "{json}"
        );
        assert!(json.contains(r#""right":{"prefix":{"addr":"169.254.0.0","len":16}}"#));
        // The DNS address's port 53, and the domain grants' set and rule.
        assert!(json.contains(r#""right":"10.0.2.3""#), "{json}");
        assert!(
            json.contains(r#""protocol":"udp","field":"dport""#),
            "{json}"
        );
        assert!(json.contains(r#""right":53"#), "{json}");
        assert!(json.contains(r#""right":"@allow_dns""#), "{json}");
        // A slot made with a policy without domains redirects nothing to the proxy; with
        // domains (and a default that denies), it does from the start.
        assert!(!json.contains(r#""port":10443"#), "{json}");
        let mut with_domains = slot.clone();
        with_domains.policy = EgressPolicy {
            allow_domains: vec!["allowed.test".into()],
            ..EgressPolicy::deny_all()
        };
        let made = serde_json::to_string(&slot_ruleset(&with_domains)).unwrap();
        assert!(made.contains(r#""port":10443"#), "{made}");
        let update =
            serde_json::to_string(&policy_update(&slot, &EgressPolicy::default())).unwrap();
        assert!(update.contains(r#"{"flush":{"set":"#), "{update}");
        // No domains: the redirect chain is flushed and left empty.
        assert!(update.contains(r#""name":"domain_redirect""#), "{update}");
        assert!(!update.contains("dnat"), "{update}");
        let domains = EgressPolicy {
            allow_domains: vec!["allowed.test".into()],
            ..EgressPolicy::deny_all()
        };
        let update = serde_json::to_string(&policy_update(&slot, &domains)).unwrap();
        assert!(
            update.contains(r#""dnat":{"addr":"10.0.2.2","family":"ip","port":10443}"#),
            "{update}"
        );
        let host = serde_json::to_string(&host_ruleset(&pool)).unwrap();
        assert!(host.contains(r#""right":"fkh*""#), "{host}");
    }
}
