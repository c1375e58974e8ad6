//! Rows as Nexus reads and writes them.

use super::schema::{sled, tuf_artifact, tuf_repo, tuf_repo_artifact, tuf_trust_root};
use chrono::{DateTime, Utc};
use common::{ArtifactHash, ArtifactId};
use diesel::deserialize::{self, FromSql, FromSqlRow};
use diesel::expression::AsExpression;
use diesel::pg::{Pg, PgValue};
use diesel::prelude::*;
use diesel::serialize::{self, Output, ToSql};
use diesel::sql_types::Text;
use std::net::IpAddr;
use uuid::Uuid;

/// An [`ArtifactHash`] stored as its 64-hex-digit text form.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, AsExpression, FromSqlRow)]
#[diesel(sql_type = Text)]
pub struct DbArtifactHash(pub ArtifactHash);

impl ToSql<Text, Pg> for DbArtifactHash {
    fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, Pg>) -> serialize::Result {
        <String as ToSql<Text, Pg>>::to_sql(&self.0.to_string(), &mut out.reborrow())
    }
}

impl FromSql<Text, Pg> for DbArtifactHash {
    fn from_sql(bytes: PgValue<'_>) -> deserialize::Result<Self> {
        let text = <String as FromSql<Text, Pg>>::from_sql(bytes)?;
        Ok(DbArtifactHash(text.parse()?))
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Queryable, Selectable, Insertable)]
#[diesel(table_name = sled, check_for_backend(Pg))]
pub struct Sled {
    pub id: Uuid,
    pub time_created: DateTime<Utc>,
    pub time_modified: DateTime<Utc>,
    pub serial: String,
    pub ip: String,
    pub port: i32,
    pub repo_depot_port: i32,
    pub time_expunged: Option<DateTime<Utc>>,
}

/// What a sled agent says about itself when it registers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SledRegistration {
    pub id: Uuid,
    pub serial: String,
    pub ip: IpAddr,
    pub port: u16,
    pub repo_depot_port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, Queryable, Selectable, Insertable)]
#[diesel(table_name = tuf_repo, check_for_backend(Pg))]
pub struct TufRepo {
    pub id: Uuid,
    pub time_created: DateTime<Utc>,
    pub sha256: DbArtifactHash,
    pub system_version: String,
    pub file_name: String,
    pub time_pruned: Option<DateTime<Utc>>,
    /// The latest upload: insert, re-upload or unprune.
    pub time_last_uploaded: DateTime<Utc>,
}

#[derive(Clone, Debug, PartialEq, Eq, Queryable, Selectable, Insertable)]
#[diesel(table_name = tuf_artifact, check_for_backend(Pg))]
pub struct TufArtifact {
    pub id: Uuid,
    pub name: String,
    pub version: String,
    pub kind: String,
    pub sha256: DbArtifactHash,
    pub size: i64,
    pub time_created: DateTime<Utc>,
    pub generation_added: i64,
}

impl TufArtifact {
    pub fn artifact_id(&self) -> ArtifactId {
        ArtifactId { name: self.name.clone(), version: self.version.clone(), kind: self.kind.clone() }
    }
}

#[derive(Clone, Debug, Insertable)]
#[diesel(table_name = tuf_repo_artifact, check_for_backend(Pg))]
pub struct TufRepoArtifact {
    pub tuf_repo_id: Uuid,
    pub tuf_artifact_id: Uuid,
}

#[derive(Clone, Debug, PartialEq, Queryable, Selectable, Insertable)]
#[diesel(table_name = tuf_trust_root, check_for_backend(Pg))]
pub struct TufTrustRoot {
    pub id: Uuid,
    pub time_created: DateTime<Utc>,
    pub time_deleted: Option<DateTime<Utc>>,
    pub root_role: serde_json::Value,
}

/// One target release set by the operator; the highest generation is
/// current.
#[derive(Clone, Debug, PartialEq, Eq, Queryable, Selectable, Insertable)]
#[diesel(table_name = super::schema::target_release, check_for_backend(Pg))]
pub struct TargetRelease {
    pub generation: i64,
    pub tuf_repo_id: Uuid,
    pub time_requested: DateTime<Utc>,
    pub requested_by: String,
}

/// A repository's health as the last replication activation judged it;
/// `artifacts` is a list of `common::api::external::ArtifactHealth`.
#[derive(Clone, Debug, PartialEq, Queryable, Selectable, Insertable)]
#[diesel(table_name = super::schema::tuf_repo_health, check_for_backend(Pg))]
pub struct TufRepoHealth {
    pub tuf_repo_id: Uuid,
    pub state: String,
    pub generation: i64,
    pub time_checked: DateTime<Utc>,
    pub checked_by: String,
    pub artifacts: serde_json::Value,
}

#[derive(Clone, Debug, Insertable)]
#[diesel(table_name = super::schema::nexus_staged_artifact, check_for_backend(Pg))]
pub struct NexusStagedArtifact {
    pub nexus_id: Uuid,
    pub sha256: DbArtifactHash,
    pub time_staged: DateTime<Utc>,
}

/// A verified repository, as the upload path hands it to the datastore.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TufRepoDescription {
    pub system_version: String,
    /// The hash of the uploaded zip file.
    pub sha256: ArtifactHash,
    pub file_name: String,
    /// The trust root the upload verified against: the insert fails if it
    /// stopped being trusted meanwhile.
    pub trust_root_id: Uuid,
    pub artifacts: Vec<TufArtifactDescription>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TufArtifactDescription {
    pub id: ArtifactId,
    pub sha256: ArtifactHash,
    pub size: u64,
}

/// A repository with the artifacts it links to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TufRepoWithArtifacts {
    pub repo: TufRepo,
    pub artifacts: Vec<TufArtifact>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TufRepoInsertStatus {
    Inserted,
    /// The same version with the same contents was already recorded. If it
    /// had been pruned, it is live again (and the generation was bumped).
    AlreadyExists,
}

#[derive(Clone, Debug, PartialEq, Eq, Queryable, Selectable, Insertable)]
#[diesel(table_name = super::schema::inv_collection, check_for_backend(Pg))]
pub struct InvCollection {
    pub id: Uuid,
    pub time_started: DateTime<Utc>,
    pub time_done: DateTime<Utc>,
    /// Which Nexus collected it.
    pub collector: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Queryable, Selectable, Insertable)]
#[diesel(table_name = super::schema::inv_sled, check_for_backend(Pg))]
pub struct InvSled {
    pub inv_collection_id: Uuid,
    pub sled_id: Uuid,
    pub time_collected: DateTime<Utc>,
    pub artifact_generation: Option<i64>,
    /// Why the sled could not be asked, if it could not.
    pub error: Option<String>,
    /// Damaged config ledger copies the sled reported, one per line.
    pub ledger_damage: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Queryable, Selectable, Insertable)]
#[diesel(table_name = super::schema::inv_m2, check_for_backend(Pg))]
pub struct InvM2 {
    pub inv_collection_id: Uuid,
    pub sled_id: Uuid,
    pub slot: i32,
    pub state: String,
    pub used_bytes: i64,
    pub quota_bytes: i64,
}

/// One inventory collection with everything it found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inventory {
    pub collection: InvCollection,
    pub sleds: Vec<InvSled>,
    pub m2s: Vec<InvM2>,
}

/// A [`common::bgtask::TaskMode`] stored as its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, AsExpression, FromSqlRow)]
#[diesel(sql_type = Text)]
pub struct DbTaskMode(pub common::bgtask::TaskMode);

impl ToSql<Text, Pg> for DbTaskMode {
    fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, Pg>) -> serialize::Result {
        <str as ToSql<Text, Pg>>::to_sql(self.0.as_str(), &mut out.reborrow())
    }
}

impl FromSql<Text, Pg> for DbTaskMode {
    fn from_sql(bytes: PgValue<'_>) -> deserialize::Result<Self> {
        let text = <String as FromSql<Text, Pg>>::from_sql(bytes)?;
        Ok(DbTaskMode(text.parse()?))
    }
}

/// A [`common::bgtask::ActivationReason`] stored as its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, AsExpression, FromSqlRow)]
#[diesel(sql_type = Text)]
pub struct DbActivationReason(pub common::bgtask::ActivationReason);

impl ToSql<Text, Pg> for DbActivationReason {
    fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, Pg>) -> serialize::Result {
        <str as ToSql<Text, Pg>>::to_sql(self.0.as_str(), &mut out.reborrow())
    }
}

impl FromSql<Text, Pg> for DbActivationReason {
    fn from_sql(bytes: PgValue<'_>) -> deserialize::Result<Self> {
        let text = <String as FromSql<Text, Pg>>::from_sql(bytes)?;
        Ok(DbActivationReason(text.parse()?))
    }
}

/// A background task's cluster-wide switch.
#[derive(Clone, Debug, PartialEq, Eq, Queryable, Selectable, Insertable)]
#[diesel(table_name = super::schema::bgtask_switch, check_for_backend(Pg))]
pub struct BgtaskSwitch {
    pub name: String,
    pub mode: DbTaskMode,
    pub changed_by: String,
    pub reason: String,
    pub time_changed: DateTime<Utc>,
}

/// One Nexus's last activation of one background task that did work.
#[derive(Clone, Debug, PartialEq, Eq, Queryable, Selectable, Insertable)]
#[diesel(table_name = super::schema::bgtask_activation, check_for_backend(Pg))]
pub struct BgtaskActivation {
    pub nexus_id: Uuid,
    pub name: String,
    pub iteration: i64,
    pub reason: DbActivationReason,
    pub time_started: DateTime<Utc>,
    /// `None` while the activation runs.
    pub time_done: Option<DateTime<Utc>>,
}
