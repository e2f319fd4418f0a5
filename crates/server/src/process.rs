//! The *process* backend (host-mode `firkin-envd` processes instead of VMs, without
//! isolation): the launcher is [`firkin_runtime::process`]'s; this adapts its template build to
//! the server's [`TemplateBuilder`].

use async_trait::async_trait;
use firkin_runtime::TemplateSnapshot;
pub use firkin_runtime::process::{ProcessError, ProcessLauncher, ProcessSession};

use crate::templates::{BuildProgress, TemplateBuildError, TemplateBuildRequest, TemplateBuilder};

/// Builds process-backend templates: a sealed descriptor with nothing to restore but a
/// marker. Build commands are not run (there is no image to prepare).
#[derive(Clone, Debug, Default)]
pub struct ProcessTemplateBuilder;

#[async_trait]
impl TemplateBuilder for ProcessTemplateBuilder {
    async fn build(
        &self,
        request: &TemplateBuildRequest,
        progress: &BuildProgress,
    ) -> Result<TemplateSnapshot, TemplateBuildError> {
        progress.phase("writing the template", 0.2);
        if !request.commands.is_empty() {
            progress.log(format!(
                "process backend: {} build command(s) not run (sandboxes share the host)",
                request.commands.len()
            ));
        }
        progress.phase("sealing", 0.8);
        let snapshot = firkin_runtime::process::build_template(
            &request.dir,
            &request.template_id,
            &request.build_id,
            request.budget,
        )
        .await
        .map_err(|e| TemplateBuildError::with_source("sealing the template", e))?;
        progress.log(format!("sealed {}", snapshot.descriptor.display()));
        Ok(snapshot)
    }
}
