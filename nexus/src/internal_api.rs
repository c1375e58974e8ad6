//! The internal API's implementation: thin adapters from HTTP to the
//! background task driver, the datastore and the staging area.

use crate::app::Nexus;
use crate::app::StagedReadError;
use crate::db::model::SledRegistration;
use common::api::nexus_internal::{
    BackgroundTaskPathParam, BackgroundTaskSwitchRequest, BackgroundTasksActivateRequest, NexusInternalApi,
    SledAgentInfo, SledAgentPathParam,
};
use common::api::sled_agent::ArtifactPathParam;
use common::bgtask::BackgroundTask;
use common::error::server_error;
use common::{depot, error_chain};
use dropshot::{
    Body, ClientErrorStatusCode, HttpError, HttpResponseOk, HttpResponseUpdatedNoContent, Path,
    RequestContext, TypedBody,
};
use http::{Response, StatusCode, header};
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

    async fn artifact_get_by_sha256(
        rqctx: RequestContext<Self::Context>,
        path: Path<ArtifactPathParam>,
    ) -> Result<Response<Body>, HttpError> {
        let hash = path.into_inner().sha256;
        let (file, length, permit) = rqctx.context().open_staged(&hash).await.map_err(|error| {
            let message = error_chain(&error);
            match error {
                StagedReadError::NotStaged { .. } => HttpError::for_client_error(
                    Some("NOT_STAGED".into()),
                    ClientErrorStatusCode::NOT_FOUND,
                    message,
                ),
                StagedReadError::Busy { .. } => {
                    server_error(StatusCode::SERVICE_UNAVAILABLE, "BUSY", message)
                        .with_header(header::RETRY_AFTER, "1")
                        .expect("a valid header")
                }
                StagedReadError::Io { .. } => HttpError::for_internal_error(message),
            }
        })?;
        let range_header = rqctx.request.headers().get(header::RANGE).and_then(|value| value.to_str().ok());
        let span = depot::span(&hash, range_header, length)?;
        let body = depot::file_body(&hash, file, span, permit).await?;
        depot::respond(&hash, span, body)
    }
}
