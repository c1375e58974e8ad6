//! The internal API's implementation: thin adapters from HTTP to the
//! background task driver and the datastore.

use crate::app::Nexus;
use crate::db::model::SledRegistration;
use common::api::nexus_internal::{
    BackgroundTaskPathParam, BackgroundTaskSwitchRequest, BackgroundTasksActivateRequest, NexusInternalApi,
    SledAgentInfo, SledAgentPathParam,
};
use common::bgtask::BackgroundTask;
use dropshot::{HttpError, HttpResponseOk, HttpResponseUpdatedNoContent, Path, RequestContext, TypedBody};
use std::collections::BTreeMap;
use std::sync::Arc;

pub enum NexusInternalApiImpl {}

impl NexusInternalApi for NexusInternalApiImpl {
    type Context = Arc<Nexus>;

    async fn bgtask_list(
        rqctx: RequestContext<Self::Context>,
    ) -> Result<HttpResponseOk<BTreeMap<String, BackgroundTask>>, HttpError> {
        Ok(HttpResponseOk(rqctx.context().background.views().await))
    }

    async fn bgtask_view(
        rqctx: RequestContext<Self::Context>,
        path: Path<BackgroundTaskPathParam>,
    ) -> Result<HttpResponseOk<BackgroundTask>, HttpError> {
        Ok(HttpResponseOk(rqctx.context().background.view(&path.into_inner().bgtask_name).await?))
    }

    async fn bgtask_activate(
        rqctx: RequestContext<Self::Context>,
        body: TypedBody<BackgroundTasksActivateRequest>,
    ) -> Result<HttpResponseUpdatedNoContent, HttpError> {
        let names: Vec<String> = body.into_inner().bgtask_names.into_iter().collect();
        rqctx.context().background.activate(&names)?;
        Ok(HttpResponseUpdatedNoContent())
    }

    async fn bgtask_switch(
        rqctx: RequestContext<Self::Context>,
        path: Path<BackgroundTaskPathParam>,
        body: TypedBody<BackgroundTaskSwitchRequest>,
    ) -> Result<HttpResponseOk<BackgroundTask>, HttpError> {
        let nexus = rqctx.context();
        let name = path.into_inner().bgtask_name;
        let request = body.into_inner();
        let view =
            nexus.background.set_switch(&name, request.mode, &request.changed_by, &request.reason).await?;
        slog::info!(nexus.log, "background task switch set";
            "task" => &name, "mode" => request.mode.as_str(), "changed_by" => &request.changed_by,
            "reason" => &request.reason);
        Ok(HttpResponseOk(view))
    }

    async fn sled_agent_put(
        rqctx: RequestContext<Self::Context>,
        path: Path<SledAgentPathParam>,
        body: TypedBody<SledAgentInfo>,
    ) -> Result<HttpResponseUpdatedNoContent, HttpError> {
        let info = body.into_inner();
        let registration = SledRegistration {
            id: path.into_inner().sled_id,
            serial: info.serial,
            ip: info.ip,
            port: info.port,
            repo_depot_port: info.repo_depot_port,
        };
        rqctx.context().datastore.sled_upsert(&registration).await?;
        Ok(HttpResponseUpdatedNoContent())
    }
}
