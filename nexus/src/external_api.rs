//! The external API's implementation. Every handler first checks the
//! operator's bearer token; a missing or wrong token gets 401 and no detail.

use crate::app::Nexus;
use crate::app::update::UploadError;
use crate::app::update::zip_intake::ZipError;
use crate::db::datastore::TufRepoPage;
use crate::db::model::{
    Sled, TargetRelease, TufRepo, TufRepoInsertStatus, TufRepoWithArtifacts, TufTrustRoot,
};
use common::api::external::{
    ExternalApi, RepoPageSelector, SledPath, SledState, SledView, SystemVersionPath, TargetReleaseRequest,
    TargetReleaseStatus, TargetReleaseView, TrustRootPath, TrustRootView, TufArtifactView,
    TufRepoUploadResponse, TufRepoUploadStatus, TufRepoView, UploadQuery,
};
use common::error::server_error;
use common::error_chain;
use dropshot::{
    ClientErrorStatusCode, EmptyScanParams, HttpError, HttpResponseCreated, HttpResponseDeleted,
    HttpResponseOk, PaginationParams, Path, Query, RequestContext, ResultsPage, StreamingBody, TypedBody,
    WhichPage,
};
use http::StatusCode;
use std::sync::Arc;

pub enum ExternalApiImpl {}

/// How much of an unauthenticated upload is read before the 401: enough for
/// small bodies, too little to be worth abusing.
const UNAUTHORIZED_DRAIN_BYTES: u64 = 1 << 20;

/// Refuses requests without the operator's token.
fn authorize(rqctx: &RequestContext<Arc<Nexus>>) -> Result<(), HttpError> {
    let header =
        rqctx.request.headers().get(http::header::AUTHORIZATION).and_then(|value| value.to_str().ok());
    if rqctx.context().operator_token.accepts(header) {
        return Ok(());
    }
    Err(HttpError::for_client_error(
        Some("UNAUTHORIZED".into()),
        ClientErrorStatusCode::UNAUTHORIZED,
        "missing or invalid bearer token".into(),
    )
    .with_header(http::header::WWW_AUTHENTICATE, "Bearer")
    .expect("a valid header"))
}

/// How long a client refused for a full hand-off queue should wait: about
/// one replication round on a small rack.
const HANDOFF_RETRY_AFTER_SECS: u64 = 10;

/// How long a client refused for too many concurrent uploads should wait.
const BUSY_RETRY_AFTER_SECS: u64 = 5;

fn retry_after(error: HttpError, seconds: u64) -> HttpError {
    error.with_header(http::header::RETRY_AFTER, seconds.to_string()).expect("a valid header")
}

impl From<UploadError> for HttpError {
    fn from(error: UploadError) -> HttpError {
        let message = error_chain(&error);
        let out_of_space = error.is_out_of_space();
        match error {
            UploadError::Database(error) => error.into(),
            UploadError::HandoffFull { .. } => retry_after(
                server_error(StatusCode::SERVICE_UNAVAILABLE, "HANDOFF_FULL", message),
                HANDOFF_RETRY_AFTER_SECS,
            ),
            UploadError::TooManyUploads { .. } => retry_after(
                server_error(StatusCode::SERVICE_UNAVAILABLE, "TOO_MANY_UPLOADS", message),
                BUSY_RETRY_AFTER_SECS,
            ),
            // The server's own storage failed: never the client's fault.
            UploadError::Storage { .. } | UploadError::Zip(ZipError::Io { .. }) if out_of_space => {
                server_error(StatusCode::INSUFFICIENT_STORAGE, "OUT_OF_SPACE", message)
            }
            UploadError::Storage { .. } | UploadError::Zip(ZipError::Io { .. }) => {
                server_error(StatusCode::SERVICE_UNAVAILABLE, "STORAGE", message)
            }
            UploadError::TooLarge { .. } => HttpError::for_client_error(
                Some("TOO_LARGE".into()),
                ClientErrorStatusCode::PAYLOAD_TOO_LARGE,
                message,
            ),
            UploadError::BodyIdle { .. } => HttpError::for_client_error(
                Some("UPLOAD_STALLED".into()),
                ClientErrorStatusCode::REQUEST_TIMEOUT,
                message,
            ),
            UploadError::BadFileName(_)
            | UploadError::Body { .. }
            | UploadError::Zip(_)
            | UploadError::NoTrustRoots
            | UploadError::Untrusted { .. }
            | UploadError::Expired(_)
            | UploadError::InvalidMetadata(_)
            | UploadError::MissingArtifactsJson
            | UploadError::ArtifactsJson(_)
            | UploadError::MissingTarget { .. }
            | UploadError::TargetNotInArchive { .. }
            | UploadError::UnfetchableTarget { .. }
            | UploadError::TargetMismatch { .. } => {
                HttpError::for_bad_request(Some("BAD_REPOSITORY".into()), message)
            }
        }
    }
}

/// A repository as the API shows it, with its recorded health.
pub async fn repo_view(nexus: &Nexus, recorded: TufRepoWithArtifacts) -> Result<TufRepoView, HttpError> {
    let health = nexus.datastore.repo_health_get(&[recorded.repo.id]).await?;
    let TufRepoWithArtifacts { repo, artifacts } = recorded;
    Ok(TufRepoView {
        health: health.get(&repo.id).and_then(|row| row.view()),
        replication: nexus.replication_progress(repo.id),
        id: repo.id,
        system_version: repo.system_version,
        sha256: repo.sha256.0,
        file_name: repo.file_name,
        time_created: repo.time_created,
        time_last_uploaded: repo.time_last_uploaded,
        time_pruned: repo.time_pruned,
        artifacts: artifacts
            .into_iter()
            .map(|artifact| TufArtifactView {
                name: artifact.name,
                version: artifact.version,
                kind: artifact.kind,
                sha256: artifact.sha256.0,
                size: u64::try_from(artifact.size).unwrap_or(0),
            })
            .collect(),
    })
}

fn target_release_view((release, repo): (TargetRelease, TufRepo)) -> TargetReleaseView {
    TargetReleaseView {
        generation: u64::try_from(release.generation).unwrap_or(0),
        system_version: repo.system_version,
        repo_id: repo.id,
        time_requested: release.time_requested,
        requested_by: release.requested_by,
    }
}

fn sled_view(sled: Sled) -> SledView {
    SledView {
        id: sled.id,
        serial: sled.serial,
        ip: sled.ip,
        port: u16::try_from(sled.port).unwrap_or(0),
        repo_depot_port: u16::try_from(sled.repo_depot_port).unwrap_or(0),
        state: if sled.time_expunged.is_some() { SledState::Expunged } else { SledState::InService },
        time_created: sled.time_created,
        time_expunged: sled.time_expunged,
    }
}

fn trust_root_view(root: TufTrustRoot) -> TrustRootView {
    TrustRootView { id: root.id, time_created: root.time_created, root_role: root.root_role }
}

impl ExternalApi for ExternalApiImpl {
    type Context = Arc<Nexus>;

    async fn repository_upload(
        rqctx: RequestContext<Self::Context>,
        query: Query<UploadQuery>,
        body: StreamingBody,
    ) -> Result<HttpResponseOk<TufRepoUploadResponse>, HttpError> {
        if let Err(refusal) = authorize(&rqctx) {
            // A little, so that a client that forgot its token reads the 401.
            common::api::drain_body(body.into_stream(), UNAUTHORIZED_DRAIN_BYTES).await;
            return Err(refusal);
        }
        let nexus = rqctx.context();
        let result = nexus.uploader.upload(&query.into_inner().file_name, body.into_stream()).await?;
        let status = match result.status {
            TufRepoInsertStatus::Inserted => TufRepoUploadStatus::Inserted,
            TufRepoInsertStatus::AlreadyExists => TufRepoUploadStatus::AlreadyExists,
        };
        Ok(HttpResponseOk(TufRepoUploadResponse { repo: repo_view(nexus, result.recorded).await?, status }))
    }

    async fn repository_list(
        rqctx: RequestContext<Self::Context>,
        query: Query<PaginationParams<EmptyScanParams, RepoPageSelector>>,
    ) -> Result<HttpResponseOk<ResultsPage<TufRepoView>>, HttpError> {
        authorize(&rqctx)?;
        let nexus = rqctx.context();
        let query = query.into_inner();
        let limit = rqctx.page_limit(&query)?.get();
        let after = match query.page {
            WhichPage::First(_) => None,
            WhichPage::Next(selector) => Some((selector.time_created, selector.id)),
        };
        let repos = nexus.datastore.tuf_repo_list(&TufRepoPage { limit, after }).await?;
        let mut views = Vec::with_capacity(repos.len());
        for repo in repos {
            let recorded = nexus.datastore.tuf_repo_get_by_version(&repo.system_version).await?;
            views.push(repo_view(nexus, recorded).await?);
        }
        let page = ResultsPage::new(views, &EmptyScanParams {}, |view, _| RepoPageSelector {
            time_created: view.time_created,
            id: view.id,
        })?;
        Ok(HttpResponseOk(page))
    }

    async fn repository_view(
        rqctx: RequestContext<Self::Context>,
        path: Path<SystemVersionPath>,
    ) -> Result<HttpResponseOk<TufRepoView>, HttpError> {
        authorize(&rqctx)?;
        let nexus = rqctx.context();
        let recorded = nexus.datastore.tuf_repo_get_by_version(&path.into_inner().system_version).await?;
        Ok(HttpResponseOk(repo_view(nexus, recorded).await?))
    }

    async fn target_release_view(
        rqctx: RequestContext<Self::Context>,
    ) -> Result<HttpResponseOk<TargetReleaseStatus>, HttpError> {
        authorize(&rqctx)?;
        let releases = rqctx.context().datastore.target_releases().await?;
        Ok(HttpResponseOk(TargetReleaseStatus {
            current: releases.current.map(target_release_view),
            previous: releases.previous.map(target_release_view),
        }))
    }

    async fn target_release_set(
        rqctx: RequestContext<Self::Context>,
        body: TypedBody<TargetReleaseRequest>,
    ) -> Result<HttpResponseOk<TargetReleaseView>, HttpError> {
        authorize(&rqctx)?;
        let nexus = rqctx.context();
        let request = body.into_inner();
        // One token for all operators: the API cannot say which one.
        let set =
            nexus.datastore.target_release_set(&request.system_version, "operator (external API)").await?;
        slog::info!(nexus.log, "target release set"; "system_version" => &request.system_version,
            "generation" => set.0.generation);
        Ok(HttpResponseOk(target_release_view(set)))
    }

    async fn sled_list(
        rqctx: RequestContext<Self::Context>,
    ) -> Result<HttpResponseOk<Vec<SledView>>, HttpError> {
        authorize(&rqctx)?;
        let sleds = rqctx.context().datastore.sled_list_all().await?;
        Ok(HttpResponseOk(sleds.into_iter().map(sled_view).collect()))
    }

    async fn sled_expunge(
        rqctx: RequestContext<Self::Context>,
        path: Path<SledPath>,
    ) -> Result<HttpResponseOk<SledView>, HttpError> {
        authorize(&rqctx)?;
        let nexus = rqctx.context();
        let sled = nexus.datastore.sled_expunge(path.into_inner().sled_id).await?;
        slog::warn!(nexus.log, "sled expunged"; "sled_id" => %sled.id, "serial" => &sled.serial);
        // Replication restores what the sled held on the others.
        nexus.background.activate(&["tuf_artifact_replication"])?;
        Ok(HttpResponseOk(sled_view(sled)))
    }

    async fn trust_root_list(
        rqctx: RequestContext<Self::Context>,
    ) -> Result<HttpResponseOk<Vec<TrustRootView>>, HttpError> {
        authorize(&rqctx)?;
        let roots = rqctx.context().datastore.trust_root_list().await?;
        Ok(HttpResponseOk(roots.into_iter().map(trust_root_view).collect()))
    }

    async fn trust_root_create(
        rqctx: RequestContext<Self::Context>,
        body: TypedBody<serde_json::Value>,
    ) -> Result<HttpResponseCreated<TrustRootView>, HttpError> {
        authorize(&rqctx)?;
        let root_role = body.into_inner();
        let bad = |message: String| HttpError::for_bad_request(Some("BAD_TRUST_ROOT".into()), message);
        let root: tough::schema::Signed<tough::schema::Root> = serde_json::from_value(root_role.clone())
            .map_err(|error| bad(format!("the trust root is not a signed TUF root role: {error}")))?;
        root.signed.verify_role(&root).map_err(|error| {
            bad(format!(
                "the trust root's signatures do not verify against its own root keys: {}",
                error_chain(&error)
            ))
        })?;
        // An expired root could verify nothing: uploads enforce expiry.
        if root.signed.expires <= jiff::Timestamp::now() {
            return Err(bad(format!("the trust root expired at {}", root.signed.expires)));
        }
        let created = rqctx.context().datastore.trust_root_add(root_role).await?;
        Ok(HttpResponseCreated(trust_root_view(created)))
    }

    async fn trust_root_view(
        rqctx: RequestContext<Self::Context>,
        path: Path<TrustRootPath>,
    ) -> Result<HttpResponseOk<TrustRootView>, HttpError> {
        authorize(&rqctx)?;
        let root = rqctx.context().datastore.trust_root_get(path.into_inner().trust_root_id).await?;
        Ok(HttpResponseOk(trust_root_view(root)))
    }

    async fn trust_root_delete(
        rqctx: RequestContext<Self::Context>,
        path: Path<TrustRootPath>,
    ) -> Result<HttpResponseDeleted, HttpError> {
        authorize(&rqctx)?;
        rqctx.context().datastore.trust_root_delete(path.into_inner().trust_root_id).await?;
        Ok(HttpResponseDeleted())
    }
}
