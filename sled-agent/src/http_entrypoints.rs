//! The sled-agent API and the repo depot: thin adapters from HTTP to the
//! artifact store.

use crate::store::{ArtifactStore, DepotArtifact, StoreError};
use common::api::sled_agent::{
    ArtifactCopyFromDepotBody, ArtifactCopyFromDepotResponse, ArtifactListResponse, ArtifactPathParam,
    ArtifactPutResponse, ArtifactQueryParam, ArtifactReverifyResponse, CONFIG_GENERATION, HASH_MISMATCH,
    LEDGER_DAMAGED, M2PathParam, M2StateRequest, RepoDepotApi, SledAgentApi, SledInventory,
};
use common::error::server_error;
use common::{ArtifactConfig, depot, error_chain};
use dropshot::{
    Body, ClientErrorStatusCode, HttpError, HttpResponseAccepted, HttpResponseOk,
    HttpResponseUpdatedNoContent, Path, Query, RequestContext, StreamingBody, TypedBody,
};
use http::{Response, StatusCode, header};
use http_body::Frame;
use std::sync::Arc;
use uuid::Uuid;

/// What the handlers share.
pub struct SledContext {
    pub sled_id: Uuid,
    pub serial: String,
    pub store: Arc<ArtifactStore>,
}

/// Seconds a caller refused for a concurrency limit should wait.
const BUSY_RETRY_AFTER_SECS: u64 = 1;

fn retry_after(error: HttpError, seconds: u64) -> HttpError {
    error.with_header(header::RETRY_AFTER, seconds.to_string()).expect("a valid header")
}

impl From<StoreError> for HttpError {
    fn from(error: StoreError) -> HttpError {
        let message = error_chain(&error);
        let client =
            |code: &str, status| HttpError::for_client_error(Some(code.to_string()), status, message.clone());
        let server = |code: &str, status: StatusCode| server_error(status, code, message.clone());
        match error {
            StoreError::GenerationMismatch { .. }
            | StoreError::ConfigRefused { .. }
            | StoreError::ConfigChanged { .. } => client(CONFIG_GENERATION, ClientErrorStatusCode::CONFLICT),
            StoreError::NotInConfig { .. } => client("NOT_IN_CONFIG", ClientErrorStatusCode::BAD_REQUEST),
            StoreError::ConfigTooLarge { .. } => {
                client("CONFIG_TOO_LARGE", ClientErrorStatusCode::BAD_REQUEST)
            }
            StoreError::LedgerDamaged { .. } => server(LEDGER_DAMAGED, StatusCode::SERVICE_UNAVAILABLE),
            StoreError::HashMismatch { .. } => client(HASH_MISMATCH, ClientErrorStatusCode::BAD_REQUEST),
            StoreError::Body { .. } => client("BAD_BODY", ClientErrorStatusCode::BAD_REQUEST),
            StoreError::NotFound { .. } | StoreError::NoSuchSlot { .. } => {
                client("NOT_FOUND", ClientErrorStatusCode::NOT_FOUND)
            }
            StoreError::NotYetHere { .. } => {
                retry_after(server("NOT_YET_HERE", StatusCode::SERVICE_UNAVAILABLE), BUSY_RETRY_AFTER_SECS)
            }
            StoreError::QuotaExceeded { .. } => server("QUOTA_EXCEEDED", StatusCode::INSUFFICIENT_STORAGE),
            StoreError::Busy { .. } => {
                retry_after(server("BUSY", StatusCode::SERVICE_UNAVAILABLE), BUSY_RETRY_AFTER_SECS)
            }
            StoreError::SourceBusy { retry_after_secs, .. } => {
                retry_after(server("DEPOT_BUSY", StatusCode::SERVICE_UNAVAILABLE), retry_after_secs)
            }
            StoreError::NoHealthyM2 { .. } => server("NO_HEALTHY_M2", StatusCode::SERVICE_UNAVAILABLE),
            StoreError::SourceUnreachable { .. }
            | StoreError::SourceStatus { .. }
            | StoreError::SourceResume { .. } => server("DEPOT", StatusCode::BAD_GATEWAY),
            StoreError::AllWritesFailed { .. } | StoreError::Io { .. } => {
                server("STORAGE", StatusCode::INTERNAL_SERVER_ERROR)
            }
        }
    }
}

pub enum SledAgentImpl {}

impl SledAgentApi for SledAgentImpl {
    type Context = Arc<SledContext>;

    async fn artifact_config_get(
        rqctx: RequestContext<Self::Context>,
    ) -> Result<HttpResponseOk<ArtifactConfig>, HttpError> {
        Ok(HttpResponseOk(rqctx.context().store.config().await?))
    }

    async fn artifact_config_put(
        rqctx: RequestContext<Self::Context>,
        body: TypedBody<ArtifactConfig>,
    ) -> Result<HttpResponseUpdatedNoContent, HttpError> {
        rqctx.context().store.put_config(body.into_inner()).await?;
        Ok(HttpResponseUpdatedNoContent())
    }

    async fn artifact_list(
        rqctx: RequestContext<Self::Context>,
    ) -> Result<HttpResponseOk<ArtifactListResponse>, HttpError> {
        Ok(HttpResponseOk(rqctx.context().store.list().await))
    }

    async fn artifact_put(
        rqctx: RequestContext<Self::Context>,
        path: Path<ArtifactPathParam>,
        query: Query<ArtifactQueryParam>,
        body: StreamingBody,
    ) -> Result<HttpResponseOk<ArtifactPutResponse>, HttpError> {
        let hash = path.into_inner().sha256;
        let generation = query.into_inner().generation;
        let length = rqctx
            .request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok()?.parse::<u64>().ok());
        let response = rqctx.context().store.put(hash, generation, length, body.into_stream()).await?;
        Ok(HttpResponseOk(response))
    }

    async fn artifact_copy_from_depot(
        rqctx: RequestContext<Self::Context>,
        path: Path<ArtifactPathParam>,
        query: Query<ArtifactQueryParam>,
        body: TypedBody<ArtifactCopyFromDepotBody>,
    ) -> Result<HttpResponseAccepted<ArtifactCopyFromDepotResponse>, HttpError> {
        let hash = path.into_inner().sha256;
        let generation = query.into_inner().generation;
        let body = body.into_inner();
        rqctx
            .context()
            .store
            .copy_from_depot(
                hash,
                generation,
                &body.depot_base_url,
                &body.alternates,
                body.fallback.as_deref(),
            )
            .await?;
        Ok(HttpResponseAccepted(ArtifactCopyFromDepotResponse {}))
    }

    async fn inventory(
        rqctx: RequestContext<Self::Context>,
    ) -> Result<HttpResponseOk<SledInventory>, HttpError> {
        let context = rqctx.context();
        Ok(HttpResponseOk(SledInventory {
            sled_id: context.sled_id,
            serial: context.serial.clone(),
            artifact_generation: context.store.generation().await,
            m2: context.store.m2s().iter().map(|m2| m2.inventory()).collect(),
            ledger_damage: context.store.ledger_problems(),
            startup_verification: context.store.startup_verification(),
            scrub: context.store.scrub_status(),
            unreadable: context.store.unreadable(),
        }))
    }

    async fn sim_m2_set_state(
        rqctx: RequestContext<Self::Context>,
        path: Path<M2PathParam>,
        body: TypedBody<M2StateRequest>,
    ) -> Result<HttpResponseUpdatedNoContent, HttpError> {
        rqctx.context().store.set_m2_state(path.into_inner().slot, body.into_inner().state).await?;
        Ok(HttpResponseUpdatedNoContent())
    }
}

pub enum RepoDepotImpl {}

impl RepoDepotApi for RepoDepotImpl {
    type Context = Arc<SledContext>;

    async fn artifact_get_by_sha256(
        rqctx: RequestContext<Self::Context>,
        path: Path<ArtifactPathParam>,
    ) -> Result<Response<Body>, HttpError> {
        let hash = path.into_inner().sha256;
        let (artifact, permit) = rqctx.context().store.open_for_depot(&hash).await?;
        let range_header = rqctx.request.headers().get(header::RANGE).and_then(|value| value.to_str().ok());
        let span = depot::span(&hash, range_header, artifact.length())?;
        let hops = artifact.hops();
        // The permit is released when the body is done (or dropped).
        let body = match artifact {
            DepotArtifact::Stored { file, .. } => depot::file_body(&hash, file, span, permit).await?,
            // An error mid-stream breaks the response off short of its
            // Content-Length: the receiver sees a broken body, never a
            // short artifact.
            DepotArtifact::Writing(follower) => {
                let follower =
                    follower.range(span.start, span.start + span.count).await.map_err(|error| {
                        HttpError::for_internal_error(format!("seeking in artifact {hash}: {error}"))
                    })?;
                let stream =
                    futures::stream::try_unfold((follower, permit), |(mut follower, permit)| async {
                        let chunk = follower.next_chunk().await?;
                        Ok::<_, std::io::Error>(chunk.map(|bytes| (Frame::data(bytes), (follower, permit))))
                    });
                Body::wrap(http_body_util::StreamBody::new(stream))
            }
        };
        let mut response = depot::respond(&hash, span, body)?;
        if hops > 0 {
            response.headers_mut().insert(depot::HOPS_HEADER, hops.into());
        }
        Ok(response)
    }

    async fn artifact_reverify(
        rqctx: RequestContext<Self::Context>,
        path: Path<ArtifactPathParam>,
    ) -> Result<HttpResponseAccepted<ArtifactReverifyResponse>, HttpError> {
        let hash = path.into_inner().sha256;
        if rqctx.context().store.reverify(hash) {
            Ok(HttpResponseAccepted(ArtifactReverifyResponse {}))
        } else {
            Err(StoreError::NotFound { hash }.into())
        }
    }
}
