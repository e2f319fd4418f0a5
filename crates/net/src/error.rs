//! Errors name the slot (its namespace) and the step that failed, so a leak or a refusal in
//! a log points at one kernel object.

/// The step of a slot's life that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Config,
    CreateNamespace,
    EnterNamespace,
    CreateVeth,
    MoveIntoNamespace,
    CreateTap,
    Address,
    LinkUp,
    Route,
    Sysctl,
    Firewall,
    Policy,
    GuestStandIn,
    Dns,
    Proxy,
    Recycle,
    Destroy,
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

/// What went wrong underneath.
#[derive(Debug, thiserror::Error)]
pub enum Cause {
    #[error("netlink: {0}")]
    Netlink(#[from] rtnetlink::Error),
    #[error("nftables: {0}")]
    Nft(#[from] nftables::helper::NftablesError),
    #[error("system call: {0}")]
    Sys(#[from] nix::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("dns: {0}")]
    Upstream(#[from] crate::dns::UpstreamError),
    #[error("dns: {0}")]
    Grant(#[from] crate::dns::GrantError),
    #[error("{0}")]
    Other(String),
}

#[derive(Debug, thiserror::Error)]
#[error("network slot {slot}: {step} failed: {cause}")]
pub struct NetError {
    pub slot: String,
    pub step: Step,
    /// Boxed: netlink errors carry the whole offending message, and a large `Err` would be
    /// copied through every `?` of the happy path.
    #[source]
    pub cause: Box<Cause>,
}

impl NetError {
    pub fn new(slot: impl Into<String>, step: Step, cause: impl Into<Cause>) -> Self {
        Self {
            slot: slot.into(),
            step,
            cause: Box::new(cause.into()),
        }
    }
}

/// Attaches the slot and step to a lower error: `op().at(&slot, Step::Route)?`.
pub(crate) trait At<T> {
    fn at(self, slot: &str, step: Step) -> Result<T, NetError>;
}

impl<T, E: Into<Cause>> At<T> for Result<T, E> {
    fn at(self, slot: &str, step: Step) -> Result<T, NetError> {
        self.map_err(|e| NetError::new(slot, step, e))
    }
}
