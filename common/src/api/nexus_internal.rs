//! Nexus's internal API: background tasks, sled registration, and the
//! artifacts Nexus has staged, served like a sled's repo depot. Listens on
//! an internal address only; operators use the external API.

use crate::api::sled_agent::ArtifactPathParam;
use crate::bgtask::{BackgroundTask, TaskMode};
use dropshot::{
    Body, HttpError, HttpResponseOk, HttpResponseUpdatedNoContent, Path, RequestContext, TypedBody,
};
use http::Response;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use uuid::Uuid;

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
pub struct BackgroundTaskPathParam {
    pub bgtask_name: String,
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
pub struct BackgroundTasksActivateRequest {
    pub bgtask_names: BTreeSet<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
pub struct BackgroundTaskSwitchRequest {
    pub mode: TaskMode,
    /// Who is setting the switch, for the record (omdb sends user@host).
    pub changed_by: String,
    /// Why, for the record. Must not be empty.
    pub reason: String,
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
pub struct SledAgentPathParam {
    pub sled_id: Uuid,
}

/// What a sled agent tells Nexus about itself when it registers.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
pub struct SledAgentInfo {
    pub serial: String,
    pub ip: IpAddr,
    /// Port of the sled-agent API.
    pub port: u16,
    /// Port of the repo depot.
    pub repo_depot_port: u16,
}

#[dropshot::api_description]
pub trait NexusInternalApi {
    type Context;

    /// Every background task, by name.
    #[endpoint { method = GET, path = "/bgtasks" }]
    async fn bgtask_list(
        rqctx: RequestContext<Self::Context>,
    ) -> Result<HttpResponseOk<BTreeMap<String, BackgroundTask>>, HttpError>;

    /// One background task.
    #[endpoint { method = GET, path = "/bgtasks/view/{bgtask_name}" }]
    async fn bgtask_view(
        rqctx: RequestContext<Self::Context>,
        path: Path<BackgroundTaskPathParam>,
    ) -> Result<HttpResponseOk<BackgroundTask>, HttpError>;

    /// Activates the named tasks. If any name is unknown, the answer is 404
    /// and no task is activated.
    #[endpoint { method = POST, path = "/bgtasks/activate" }]
    async fn bgtask_activate(
        rqctx: RequestContext<Self::Context>,
        body: TypedBody<BackgroundTasksActivateRequest>,
    ) -> Result<HttpResponseUpdatedNoContent, HttpError>;

    /// Sets a task's mode for every Nexus (the switch is stored in the
    /// database, and wins over each Nexus's config file): `enabled`,
    /// `manual` (periodic activations are skipped, explicit and dependency
    /// ones run) or `disabled`. Skipped activations do no work and say so in
    /// their details. An empty `changed_by` or `reason` is refused (400).
    #[endpoint { method = PUT, path = "/bgtasks/switch/{bgtask_name}" }]
    async fn bgtask_switch(
        rqctx: RequestContext<Self::Context>,
        path: Path<BackgroundTaskPathParam>,
        body: TypedBody<BackgroundTaskSwitchRequest>,
    ) -> Result<HttpResponseOk<BackgroundTask>, HttpError>;

    /// Registers a sled agent, or updates its addresses.
    #[endpoint { method = PUT, path = "/sled-agents/{sled_id}" }]
    async fn sled_agent_put(
        rqctx: RequestContext<Self::Context>,
        path: Path<SledAgentPathParam>,
        body: TypedBody<SledAgentInfo>,
    ) -> Result<HttpResponseUpdatedNoContent, HttpError>;

    /// Streams an artifact this Nexus has staged, as a sled's repo depot
    /// does (`Content-Length`; a single `Range: bytes=START-[END]` gets
    /// 206). A sled's copy falls back to it when every sled it could read
    /// from is slow or gone. 404 if it is not staged here; 503 with
    /// `Retry-After` while as many such reads run as Nexus allows.
    #[endpoint { method = GET, path = "/artifact/sha256/{sha256}" }]
    async fn artifact_get_by_sha256(
        rqctx: RequestContext<Self::Context>,
        path: Path<ArtifactPathParam>,
    ) -> Result<Response<Body>, HttpError>;
}
