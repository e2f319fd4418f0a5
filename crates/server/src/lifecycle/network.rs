//! `PUT /sandboxes/{id}/network`: replacing a sandbox's egress policy.

use firkin_e2b_wire::SandboxNetworkUpdate;
use firkin_net::EgressPolicy;
use firkin_types::SandboxId;

use crate::app::{App, store_err};
use crate::egress;
use crate::error::ApiError;
use crate::store::RecordState;

impl App {
    /// Replaces the whole egress configuration (what the body omits is cleared). A running
    /// sandbox gets the policy at once and then the record; a paused one only the record,
    /// applied when it resumes. Holds the sandbox's lock so that a pause or resume cannot run
    /// between applying and recording.
    pub(crate) async fn update_network(
        &self,
        id: &SandboxId,
        req: &SandboxNetworkUpdate,
    ) -> Result<(), ApiError> {
        let egress = egress::parse(req)?;
        let _guard = self.locks.lock(id).await;
        let record = self.visible(id)?;
        if egress.is_some() && !self.config.egress_control {
            return Err(egress::unenforceable());
        }
        if record.egress == egress {
            // Nothing changes, so nothing is applied: in particular clearing a policy that was
            // never set does not ask a backend without networks of its own to enforce anything.
            return Ok(());
        }
        if record.state == RecordState::Running {
            // Clearing means the allow-everything default, not "keep what is applied".
            let policy = egress
                .as_ref()
                .map_or_else(EgressPolicy::default, |e| e.policy().clone());
            self.rt.set_egress(id, &policy).await.map_err(|err| {
                tracing::warn!(sandbox = %id, %err, "egress policy not applied");
                crate::error::from_runtime(&err)
            })?;
        }
        if !self
            .store
            .set_egress(id, egress.as_ref())
            .map_err(store_err)?
        {
            return Err(ApiError::sandbox_not_found(id.as_str()));
        }
        tracing::info!(
            sandbox = %id,
            restricted = egress.is_some(),
            paused = record.state == RecordState::Paused,
            "egress policy replaced"
        );
        Ok(())
    }
}
