//! The sled agent's API (one per sled, internal address) and its repo depot
//! (a separate server on its own port, from which other sleds copy).

use crate::{ArtifactConfig, ArtifactHash, Generation};
use dropshot::{
    Body, HttpError, HttpResponseAccepted, HttpResponseOk, HttpResponseUpdatedNoContent, Path, Query,
    RequestContext, StreamingBody, TypedBody,
};
use http::Response;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use uuid::Uuid;

/// The `error_code` of a 409 from a sled agent that holds a different
/// artifact config generation than the request assumed.
pub const CONFIG_GENERATION: &str = "CONFIG_GENERATION";

/// The `error_code` of a 503 from a sled agent whose newest config ledger
/// copy is damaged: it knows that copy's generation but not its artifacts,
/// and acts on nothing until a Nexus pushes a config at least that new.
pub const LEDGER_DAMAGED: &str = "LEDGER_DAMAGED";

/// The `error_code` of a 400 from a sled agent whose PUT body did not hash
/// to the artifact's name: the sender's copy may be corrupt.
pub const HASH_MISMATCH: &str = "HASH_MISMATCH";

/// The most artifacts one config may list. It bounds the config's body
/// (see [`ARTIFACT_CONFIG_BODY_MAX_BYTES`]) and the ledger written per M.2.
pub const MAX_CONFIG_ARTIFACTS: usize = 100_000;

/// The body limit of `PUT /artifacts-config`, derived from
/// [`MAX_CONFIG_ARTIFACTS`]: each hash is 64 hex digits, quotes and a comma
/// (67 bytes compact), with room for whitespace around each and the rest of
/// the document.
pub const ARTIFACT_CONFIG_BODY_MAX_BYTES: usize = MAX_CONFIG_ARTIFACTS * 96 + 4096;

/// The body limit of an artifact PUT. The body streams to disk and each
/// M.2's quota bounds it (507 when full); this only keeps dropshot's own cap
/// out of the way. Other endpoints keep the server's small default.
pub const ARTIFACT_BODY_MAX_BYTES: usize = 1 << 40;

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
pub struct ArtifactPathParam {
    pub sha256: ArtifactHash,
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
pub struct ArtifactQueryParam {
    /// The artifact config generation the caller based this request on; it
    /// must be the sled's current one.
    pub generation: Generation,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
pub struct ArtifactListResponse {
    pub generation: Generation,
    /// For each artifact of the current config that the sled holds, on how
    /// many healthy M.2 devices.
    pub list: BTreeMap<ArtifactHash, usize>,
    /// Artifacts being copied to this sled right now: a planner should not
    /// ask for them again.
    #[serde(default)]
    pub copies_in_flight: BTreeSet<ArtifactHash>,
    /// Artifacts whose last copies to this sled failed after the copy was
    /// accepted (202), with how often and why. An entry goes when a copy
    /// succeeds or the artifact leaves the config.
    #[serde(default)]
    pub copy_failures: BTreeMap<ArtifactHash, CopyFailure>,
    /// How many copies this sled runs at once (`copy.max_concurrent`); more
    /// wait in its queue. Absent from older sleds: no known limit.
    #[serde(default)]
    pub max_concurrent_copies: Option<usize>,
    /// How many more copies it queues (`copy.max_queued`), started in the
    /// order they came as slots free; one more is refused as busy. A
    /// planner sends at most the two limits' sum minus `copies_in_flight`
    /// (which counts the queued ones). Absent: none.
    #[serde(default)]
    pub max_queued_copies: Option<usize>,
    /// The best total rate of this sled's copies over half a second in the
    /// last 5 minutes (or when copies last ran), bytes/s: what its link has
    /// shown it can take. Absent until a copy has been measured. A planner
    /// compares sleds by it, to find one far slower than the rest.
    #[serde(default)]
    pub copy_bytes_per_sec: Option<u64>,
    /// Non-empty when the newest config ledger copy is damaged: `generation`
    /// is then the one its file name claims, `list` is empty (the sled no
    /// longer knows its config's artifacts) and every PUT and copy is
    /// refused until a config at least that new arrives.
    #[serde(default)]
    pub ledger_damage: Vec<String>,
}

/// Copies of one artifact to a sled that failed in the background.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
pub struct CopyFailure {
    /// Consecutive failed copies.
    pub failures: u32,
    pub last_error: String,
    /// The depot the last failed copy read from.
    pub last_source: String,
    pub time_last_failed: chrono::DateTime<chrono::Utc>,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
pub struct ArtifactPutResponse {
    /// Healthy M.2 datasets the write was attempted on.
    pub datasets: usize,
    pub successful_writes: usize,
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
pub struct ArtifactCopyFromDepotBody {
    /// Base URL of another sled's repo depot, e.g. `http://127.0.0.1:12346`.
    pub depot_base_url: String,
    /// Other depots that hold the artifact or are receiving it: tried in
    /// order if `depot_base_url` cannot be used, or to resume from if it
    /// breaks off mid-copy.
    #[serde(default)]
    pub alternates: Vec<String>,
    /// Nexus's own depot, where it has the artifact staged: tried after
    /// every sled; a copy that is merely slow moves there only when no
    /// sled source looks better, and only one such copy per sled at once
    /// (every PUT of a release shares Nexus's link, and a copy slow because
    /// its own sled's link is slow gains nothing there).
    #[serde(default)]
    pub fallback: Option<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
pub struct ArtifactCopyFromDepotResponse {}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum M2State {
    Healthy,
    /// Present but unusable: skipped by reads and writes.
    Failed,
    /// Pulled from the sled: skipped by reads and writes.
    Removed,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
pub struct M2Inventory {
    pub slot: u32,
    pub state: M2State,
    pub path: String,
    pub used_bytes: u64,
    pub quota_bytes: u64,
    /// Artifact files on the device (of the current config or not).
    pub artifacts: usize,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
pub struct SledInventory {
    pub sled_id: Uuid,
    pub serial: String,
    pub artifact_generation: Generation,
    pub m2: Vec<M2Inventory>,
    /// Problems with config ledger copies found at start-up or when a device
    /// came back; see [`ArtifactListResponse::ledger_damage`]. Cleared once a
    /// config is accepted and written.
    #[serde(default)]
    pub ledger_damage: Vec<String>,
    /// How the stored artifacts were checked when the sled agent started.
    #[serde(default)]
    pub startup_verification: StartupVerification,
    /// The background scrub, which re-hashes every stored artifact at a
    /// bounded rate and removes corrupt copies.
    #[serde(default)]
    pub scrub: ScrubStatus,
    /// Copies that could not be read when last checked (an I/O error, not a
    /// hash mismatch). They are kept, not counted as held, and checked again
    /// by the next scrub pass; a verified copy written over one clears it.
    #[serde(default)]
    pub unreadable: Vec<UnreadableCopy>,
}

/// A stored copy whose check failed for a reason other than its contents:
/// the file was kept.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
pub struct UnreadableCopy {
    pub slot: u32,
    pub sha256: ArtifactHash,
    /// The error, naming the file.
    pub problem: String,
    pub since: chrono::DateTime<chrono::Utc>,
}

/// The check of every stored artifact at start-up: a file whose metadata
/// (size, inode, mtime, ctime) is what it was when it was last verified is
/// trusted without being read; any other is re-hashed, and deleted if its
/// contents do not match its name.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
pub struct StartupVerification {
    /// Files trusted by their metadata.
    pub trusted: u64,
    /// Files re-hashed, and the bytes read to do so.
    pub rehashed: u64,
    pub bytes_read: u64,
    /// Files deleted because their contents did not match their name.
    pub removed: u64,
    /// Files that could not be read (kept; see [`SledInventory::unreadable`]).
    #[serde(default)]
    pub unreadable: u64,
    pub elapsed_millis: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
pub struct ScrubStatus {
    /// The configured rate; 0 means the scrub is off.
    pub rate_limit_bytes_per_sec: u64,
    /// Passes finished since the sled agent started.
    pub passes_finished: u64,
    /// The pass in progress, if one is.
    pub current: Option<ScrubPass>,
    /// The last finished pass.
    pub last: Option<ScrubPass>,
}

/// One scrub pass over every artifact file on every healthy M.2.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
pub struct ScrubPass {
    pub started: chrono::DateTime<chrono::Utc>,
    /// Not set while the pass runs.
    pub finished: Option<chrono::DateTime<chrono::Utc>>,
    pub files_checked: u64,
    pub bytes_checked: u64,
    /// Copies whose contents did not match their name, deleted so that
    /// replication restores them.
    pub corrupt_removed: u64,
    /// Copies that could not be read: kept, and checked again next pass.
    #[serde(default)]
    pub unreadable: u64,
    /// Bytes re-hashed per second over the pass (so far).
    pub bytes_per_sec: u64,
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
pub struct M2PathParam {
    pub slot: u32,
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
pub struct M2StateRequest {
    pub state: M2State,
}

#[dropshot::api_description]
pub trait SledAgentApi {
    type Context;

    /// The artifact config this sled enforces. A sled that never received
    /// one reports generation 0 and no artifacts.
    #[endpoint { method = GET, path = "/artifacts-config" }]
    async fn artifact_config_get(
        rqctx: RequestContext<Self::Context>,
    ) -> Result<HttpResponseOk<ArtifactConfig>, HttpError>;

    /// Replaces the artifact config if its generation is newer; the same
    /// generation with the same artifacts is a no-op. Anything else is 409
    /// `CONFIG_GENERATION`. Artifacts outside the new config are deleted.
    #[endpoint {
        method = PUT,
        path = "/artifacts-config",
        request_body_max_bytes = ARTIFACT_CONFIG_BODY_MAX_BYTES,
    }]
    async fn artifact_config_put(
        rqctx: RequestContext<Self::Context>,
        body: TypedBody<ArtifactConfig>,
    ) -> Result<HttpResponseUpdatedNoContent, HttpError>;

    /// The artifacts of the current config that this sled holds.
    #[endpoint { method = GET, path = "/artifacts" }]
    async fn artifact_list(
        rqctx: RequestContext<Self::Context>,
    ) -> Result<HttpResponseOk<ArtifactListResponse>, HttpError>;

    /// Stores an artifact on every healthy M.2. The body's SHA-256 must be
    /// the one in the path; otherwise nothing is stored.
    #[endpoint {
        method = PUT,
        path = "/artifacts/{sha256}",
        request_body_max_bytes = ARTIFACT_BODY_MAX_BYTES,
    }]
    async fn artifact_put(
        rqctx: RequestContext<Self::Context>,
        path: Path<ArtifactPathParam>,
        query: Query<ArtifactQueryParam>,
        body: StreamingBody,
    ) -> Result<HttpResponseOk<ArtifactPutResponse>, HttpError>;

    /// Starts copying an artifact from another sled's repo depot. Answers 202
    /// once the source has answered; the copy goes on in the background.
    /// Beyond the sled's copy concurrency limit: 503 with `Retry-After`.
    #[endpoint { method = POST, path = "/artifacts/{sha256}/copy-from-depot" }]
    async fn artifact_copy_from_depot(
        rqctx: RequestContext<Self::Context>,
        path: Path<ArtifactPathParam>,
        query: Query<ArtifactQueryParam>,
        body: TypedBody<ArtifactCopyFromDepotBody>,
    ) -> Result<HttpResponseAccepted<ArtifactCopyFromDepotResponse>, HttpError>;

    #[endpoint { method = GET, path = "/inventory" }]
    async fn inventory(
        rqctx: RequestContext<Self::Context>,
    ) -> Result<HttpResponseOk<SledInventory>, HttpError>;

    /// Simulation only: fail, remove or restore an M.2 device.
    #[endpoint { method = PUT, path = "/sim/m2/{slot}" }]
    async fn sim_m2_set_state(
        rqctx: RequestContext<Self::Context>,
        path: Path<M2PathParam>,
        body: TypedBody<M2StateRequest>,
    ) -> Result<HttpResponseUpdatedNoContent, HttpError>;
}

#[dropshot::api_description]
pub trait RepoDepotApi {
    type Context;

    /// Streams an artifact, with `Content-Length`; honours a single
    /// `Range: bytes=START-[END]` with 206.
    #[endpoint { method = GET, path = "/artifact/sha256/{sha256}" }]
    async fn artifact_get_by_sha256(
        rqctx: RequestContext<Self::Context>,
        path: Path<ArtifactPathParam>,
    ) -> Result<Response<Body>, HttpError>;

    /// A peer's copy of this artifact from here did not match its hash:
    /// re-hash the stored copies now, not at the next scrub pass (a corrupt
    /// one is deleted, so replication replaces it). Answers 202 at once; a
    /// check of the same artifact already under way is not repeated. 404 if
    /// no copy is stored here.
    #[endpoint { method = POST, path = "/artifact/sha256/{sha256}/reverify" }]
    async fn artifact_reverify(
        rqctx: RequestContext<Self::Context>,
        path: Path<ArtifactPathParam>,
    ) -> Result<HttpResponseAccepted<ArtifactReverifyResponse>, HttpError>;
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
pub struct ArtifactReverifyResponse {}
