//! The external API: what operators use. Every request must carry
//! `Authorization: Bearer <token>`.

use crate::{ArtifactHash, Generation};
use chrono::{DateTime, Utc};
use dropshot::{
    EmptyScanParams, HttpError, HttpResponseCreated, HttpResponseDeleted, HttpResponseOk, PaginationParams,
    Path, Query, RequestContext, ResultsPage, StreamingBody, TypedBody,
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// dropshot's cap on an upload body. Nexus enforces its configured limit
/// (`external_api.request_body_max_bytes`) itself, as the body streams, so
/// that the other endpoints keep a small limit for their JSON bodies.
pub const UPLOAD_BODY_MAX_BYTES: usize = 1 << 40;

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
pub struct UploadQuery {
    /// The name of the file being uploaded, recorded with the repository.
    pub file_name: String,
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
pub struct SystemVersionPath {
    pub system_version: String,
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
pub struct TrustRootPath {
    pub trust_root_id: Uuid,
}

/// The page token of the repository list: where the previous page ended.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
pub struct RepoPageSelector {
    pub time_created: DateTime<Utc>,
    pub id: Uuid,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
pub struct TufArtifactView {
    pub name: String,
    pub version: String,
    pub kind: String,
    pub sha256: ArtifactHash,
    pub size: u64,
}

/// How far replication of a repository has come.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
pub struct ReplicationProgress {
    /// In-service sleds that hold every artifact of the repository.
    pub sleds_complete: usize,
    pub sleds_in_service: usize,
    /// The generation of the artifact config the sleds were last checked at.
    pub generation: Generation,
    pub time_checked: DateTime<Utc>,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
pub struct TufRepoView {
    pub id: Uuid,
    pub system_version: String,
    /// The sha256 of the uploaded zip file.
    pub sha256: ArtifactHash,
    pub file_name: String,
    pub time_created: DateTime<Utc>,
    /// The latest upload of this repository (first upload, re-upload or
    /// unprune). The pruner keeps the most recently uploaded repositories,
    /// ranked by this time, so a re-uploaded old repository counts as new.
    pub time_last_uploaded: DateTime<Utc>,
    pub time_pruned: Option<DateTime<Utc>>,
    pub artifacts: Vec<TufArtifactView>,
    /// Known once a `tuf_artifact_replication` activation of the Nexus that
    /// answers has looked at the sleds since the repository was recorded.
    pub replication: Option<ReplicationProgress>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum TufRepoUploadStatus {
    Inserted,
    /// The same version with the same contents was already recorded (if it
    /// had been pruned, it is live again).
    AlreadyExists,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
pub struct TufRepoUploadResponse {
    pub repo: TufRepoView,
    pub status: TufRepoUploadStatus,
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize, JsonSchema)]
pub struct TrustRootView {
    pub id: Uuid,
    pub time_created: DateTime<Utc>,
    /// The signed TUF root role (a `root.json` document).
    pub root_role: serde_json::Value,
}

#[dropshot::api_description]
pub trait ExternalApi {
    type Context;

    /// Uploads a TUF repository (a zip of `repo/metadata/` and
    /// `repo/targets/`). The body streams; its size is limited by the
    /// server's `request_body_max_bytes`.
    #[endpoint {
        method = PUT,
        path = "/v1/system/update/repositories",
        request_body_max_bytes = UPLOAD_BODY_MAX_BYTES,
    }]
    async fn repository_upload(
        rqctx: RequestContext<Self::Context>,
        query: Query<UploadQuery>,
        body: StreamingBody,
    ) -> Result<HttpResponseOk<TufRepoUploadResponse>, HttpError>;

    /// Repositories, newest first (pruned ones included).
    #[endpoint { method = GET, path = "/v1/system/update/repositories" }]
    async fn repository_list(
        rqctx: RequestContext<Self::Context>,
        query: Query<PaginationParams<EmptyScanParams, RepoPageSelector>>,
    ) -> Result<HttpResponseOk<ResultsPage<TufRepoView>>, HttpError>;

    #[endpoint { method = GET, path = "/v1/system/update/repositories/{system_version}" }]
    async fn repository_view(
        rqctx: RequestContext<Self::Context>,
        path: Path<SystemVersionPath>,
    ) -> Result<HttpResponseOk<TufRepoView>, HttpError>;

    #[endpoint { method = GET, path = "/v1/system/update/trust-roots" }]
    async fn trust_root_list(
        rqctx: RequestContext<Self::Context>,
    ) -> Result<HttpResponseOk<Vec<TrustRootView>>, HttpError>;

    /// Adds a trust root: the body is a signed TUF `root.json`.
    #[endpoint { method = POST, path = "/v1/system/update/trust-roots" }]
    async fn trust_root_create(
        rqctx: RequestContext<Self::Context>,
        body: TypedBody<serde_json::Value>,
    ) -> Result<HttpResponseCreated<TrustRootView>, HttpError>;

    #[endpoint { method = GET, path = "/v1/system/update/trust-roots/{trust_root_id}" }]
    async fn trust_root_view(
        rqctx: RequestContext<Self::Context>,
        path: Path<TrustRootPath>,
    ) -> Result<HttpResponseOk<TrustRootView>, HttpError>;

    #[endpoint { method = DELETE, path = "/v1/system/update/trust-roots/{trust_root_id}" }]
    async fn trust_root_delete(
        rqctx: RequestContext<Self::Context>,
        path: Path<TrustRootPath>,
    ) -> Result<HttpResponseDeleted, HttpError>;
}
