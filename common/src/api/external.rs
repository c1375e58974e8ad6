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
    /// As the last replication activation of any Nexus found it; `None`
    /// until one has looked.
    pub health: Option<RepoHealthView>,
}

/// A repository's replication health (DESIGN §12), worst artifact first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RepoHealth {
    /// On every in-service sled, on each of its healthy M.2s.
    Replicated,
    /// Not yet on every in-service sled, but safe: on at least
    /// `min_sled_replication` sleds, or still staged by a Nexus.
    Replicating,
    /// An artifact is on fewer than `min_sled_replication` sleds and staged
    /// nowhere.
    Degraded,
    /// An artifact has no copy on any in-service sled and is staged nowhere.
    Lost,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
pub struct RepoHealthView {
    pub state: RepoHealth,
    /// The artifact config generation it was judged at.
    pub generation: Generation,
    pub time_checked: DateTime<Utc>,
    /// Which Nexus judged it.
    pub checked_by: String,
    pub sleds_in_service: usize,
    pub artifacts: Vec<ArtifactHealth>,
}

/// One artifact's copies: where, how many, and who has it staged.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
pub struct ArtifactHealth {
    pub name: String,
    pub version: String,
    pub kind: String,
    pub sha256: ArtifactHash,
    pub state: RepoHealth,
    /// Copies (M.2s) per in-service sled holding it.
    pub sleds: std::collections::BTreeMap<Uuid, usize>,
    /// Nexus instances holding it staged.
    pub staged_by: Vec<Uuid>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SledState {
    InService,
    /// Final: no requests, its copies do not count, its registration is
    /// refused.
    Expunged,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
pub struct SledView {
    pub id: Uuid,
    pub serial: String,
    pub ip: String,
    pub port: u16,
    pub repo_depot_port: u16,
    pub state: SledState,
    pub time_created: DateTime<Utc>,
    pub time_expunged: Option<DateTime<Utc>>,
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
pub struct SledPath {
    pub sled_id: Uuid,
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
pub struct TargetReleaseRequest {
    /// The system version of an uploaded repository, which must be
    /// `replicated`.
    pub system_version: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
pub struct TargetReleaseView {
    /// Increases with every target release set.
    pub generation: u64,
    pub system_version: String,
    pub repo_id: Uuid,
    pub time_requested: DateTime<Utc>,
    pub requested_by: String,
}

/// The rack's target release and the one before it (both kept from pruning).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
pub struct TargetReleaseStatus {
    pub current: Option<TargetReleaseView>,
    pub previous: Option<TargetReleaseView>,
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

    /// The target release and the one before it.
    #[endpoint { method = GET, path = "/v1/system/update/target-release" }]
    async fn target_release_view(
        rqctx: RequestContext<Self::Context>,
    ) -> Result<HttpResponseOk<TargetReleaseStatus>, HttpError>;

    /// Sets the rack's target release. Refused (409) unless the repository
    /// is `replicated`; the message says what is missing.
    #[endpoint { method = PUT, path = "/v1/system/update/target-release" }]
    async fn target_release_set(
        rqctx: RequestContext<Self::Context>,
        body: TypedBody<TargetReleaseRequest>,
    ) -> Result<HttpResponseOk<TargetReleaseView>, HttpError>;

    /// Every sled ever registered, with its state.
    #[endpoint { method = GET, path = "/v1/system/hardware/sleds" }]
    async fn sled_list(
        rqctx: RequestContext<Self::Context>,
    ) -> Result<HttpResponseOk<Vec<SledView>>, HttpError>;

    /// Expunges a sled: final. No Nexus sends it requests any more, its
    /// copies no longer count, and its registration is refused; replication
    /// restores what it held on the others. Idempotent.
    #[endpoint { method = POST, path = "/v1/system/hardware/sleds/{sled_id}/expunge" }]
    async fn sled_expunge(
        rqctx: RequestContext<Self::Context>,
        path: Path<SledPath>,
    ) -> Result<HttpResponseOk<SledView>, HttpError>;

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
