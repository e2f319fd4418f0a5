//! `--network`: a network of its own per sandbox (slots: namespace, TAP, NAT, nftables), or
//! QEMU's user-mode network as the fallback for hosts where firkin may not configure networks.

use std::net::SocketAddr;

use anyhow::{Context, Result, bail};
use firkin_net::{PoolConfig, SlotPool};

/// How sandboxes reach the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum NetworkMode {
    /// `tap` where firkin can set up networks (root: CAP_NET_ADMIN, /dev/net/tun, nft),
    /// otherwise `user`, with a warning.
    Auto,
    /// A network namespace per sandbox with a TAP, NAT and nftables isolation: no sandbox
    /// reaches the host or another sandbox, any guest port is reachable through the sandbox
    /// plane, egress policies are enforced.
    Tap,
    /// QEMU's user-mode network (slirp): works unprivileged, but a guest reaches the host's
    /// loopback, only forwarded ports are reachable, and egress policies are refused.
    User,
}

/// The slot pool's settings from the command line.
#[derive(Debug, Clone, clap::Args)]
pub struct NetworkArgs {
    /// Sandbox networking.
    #[arg(long, value_enum, env = "FIRKIN_NETWORK", default_value_t = NetworkMode::Auto)]
    pub network: NetworkMode,

    /// Name prefix of this server's slot namespaces (`/run/netns/<prefix>-<n>`), host veths
    /// and nftables table: two servers on one host need different ones. At most 6 characters.
    #[arg(long, env = "FIRKIN_NET_PREFIX", default_value = "fk")]
    pub net_prefix: String,

    /// Address range the slots' host links are numbered from (a /30 each); must not be used
    /// elsewhere on the host.
    #[arg(long, env = "FIRKIN_NET_RANGE", default_value = "198.18.0.0/16")]
    pub net_range: String,

    /// DNS servers the sandboxes' resolver (at 10.0.2.3 in every guest) asks, as IP:PORT;
    /// repeatable [default: the host's /etc/resolv.conf].
    #[arg(
        long = "dns-upstream",
        env = "FIRKIN_DNS_UPSTREAM",
        value_delimiter = ','
    )]
    pub dns_upstream: Vec<SocketAddr>,
}

/// Why this host cannot give sandboxes networks of their own, if it cannot.
pub fn tap_unavailable() -> Option<String> {
    firkin_net::missing_requirements()
}

/// Starts the slot pool the mode asks for; `None`: user-mode networking.
pub fn start(args: &NetworkArgs) -> Result<Option<SlotPool>> {
    let missing = tap_unavailable();
    match (args.network, missing) {
        (NetworkMode::User, _) => {
            tracing::warn!(
                "--network user: sandboxes can reach this host's loopback and get no egress \
                 policies (`firkin doctor` lists the limits)"
            );
            return Ok(None);
        }
        (NetworkMode::Auto, Some(missing)) => {
            tracing::warn!(
                %missing,
                "per-sandbox networks need what is missing; falling back to user-mode \
                 networking (sandboxes can reach this host's loopback, no egress policies)"
            );
            return Ok(None);
        }
        (NetworkMode::Tap, Some(missing)) => {
            bail!("--network tap needs {missing}; use --network user on this host")
        }
        (_, None) => {}
    }
    if args.net_prefix.is_empty()
        || args.net_prefix.len() > 6
        || !args.net_prefix.chars().all(|c| c.is_ascii_alphanumeric())
    {
        bail!(
            "--net-prefix {:?}: 1 to 6 letters or digits (interface names are at most 15 \
             bytes and carry the slot number)",
            args.net_prefix
        );
    }
    let range = args
        .net_range
        .parse()
        .with_context(|| format!("--net-range {:?}", args.net_range))?;
    let config = PoolConfig {
        prefix: args.net_prefix.clone(),
        range,
        host_table: format!("firkin-{}", args.net_prefix),
        dns_upstream: args.dns_upstream.clone(),
        ..PoolConfig::default()
    };
    // The error's text already carries its cause; a context chain would print it twice.
    let pool = SlotPool::start(config)
        .map_err(|e| anyhow::anyhow!("setting up per-sandbox networks: {e}"))?;
    tracing::info!(prefix = %args.net_prefix, range = %args.net_range, "per-sandbox networks");
    Ok(Some(pool))
}
