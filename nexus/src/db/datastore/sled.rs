//! Sleds: registered (and re-registered) by their sled agents.

use super::{DataStore, DataStoreError, InDoubt};
use crate::db::model::{Sled, SledRegistration};
use crate::db::schema::sled;
use chrono::Utc;
use diesel::prelude::*;
use diesel::upsert::excluded;
use diesel_async::RunQueryDsl;
use scoped_futures::ScopedFutureExt;
use uuid::Uuid;

impl DataStore {
    /// Records a sled agent's registration: inserts the sled, or updates its
    /// address if it moved. An expunged sled is refused: expunged is final,
    /// and a replacement registers under a new id. A serial is unique among
    /// sleds in service: another id with the serial of a sled in service is
    /// refused (two agents claiming one piece of hardware), while the serial
    /// of an expunged sled may come back under a new id (repaired hardware).
    pub async fn sled_upsert(&self, registration: &SledRegistration) -> Result<Sled, DataStoreError> {
        let now = Utc::now();
        let row = Sled {
            id: registration.id,
            time_created: now,
            time_modified: now,
            serial: registration.serial.clone(),
            ip: registration.ip.to_string(),
            port: i32::from(registration.port),
            repo_depot_port: i32::from(registration.repo_depot_port),
            time_expunged: None,
        };
        self.transaction_retry("sled_upsert", InDoubt::Rerun, |conn| {
            let row = row.clone();
            async move {
                let existing: Option<Sled> =
                    sled::table.find(row.id).select(Sled::as_select()).first(conn).await.optional()?;
                if let Some(time_expunged) = existing.and_then(|sled| sled.time_expunged) {
                    return Err(DataStoreError::Conflict(format!(
                        "sled {} was expunged at {}; expunged is final: a replacement must register as a \
                         new sled (with a new id)",
                        row.id,
                        time_expunged.to_rfc3339()
                    ))
                    .into());
                }
                let holder: Option<Uuid> = sled::table
                    .filter(
                        sled::serial
                            .eq(&row.serial)
                            .and(sled::time_expunged.is_null())
                            .and(sled::id.ne(row.id)),
                    )
                    .select(sled::id)
                    .first(conn)
                    .await
                    .optional()?;
                if let Some(holder) = holder {
                    return Err(DataStoreError::Conflict(format!(
                        "sled serial {:?} is already registered by sled {holder}, in service; sled {} cannot \
                         register with it (expunge {holder} first if it was replaced)",
                        row.serial, row.id
                    ))
                    .into());
                }
                Ok(diesel::insert_into(sled::table)
                    .values(&row)
                    .on_conflict(sled::id)
                    .do_update()
                    .set((
                        sled::time_modified.eq(excluded(sled::time_modified)),
                        sled::serial.eq(excluded(sled::serial)),
                        sled::ip.eq(excluded(sled::ip)),
                        sled::port.eq(excluded(sled::port)),
                        sled::repo_depot_port.eq(excluded(sled::repo_depot_port)),
                    ))
                    .returning(Sled::as_returning())
                    .get_result(conn)
                    .await?)
            }
            .scope_boxed()
        })
        .await
    }

    /// Marks a sled expunged (idempotent): from then on no Nexus sends it
    /// requests, its copies no longer count, and its registration is refused.
    pub async fn sled_expunge(&self, id: Uuid) -> Result<Sled, DataStoreError> {
        self.transaction_retry("sled_expunge", InDoubt::Rerun, |conn| {
            async move {
                let found: Sled = sled::table
                    .find(id)
                    .select(Sled::as_select())
                    .first(conn)
                    .await
                    .optional()?
                    .ok_or_else(|| DataStoreError::NotFound { kind: "sled", key: id.to_string() })?;
                if found.time_expunged.is_some() {
                    return Ok(found);
                }
                Ok(diesel::update(sled::table.find(id))
                    .set((sled::time_expunged.eq(Some(Utc::now())), sled::time_modified.eq(Utc::now())))
                    .returning(Sled::as_returning())
                    .get_result(conn)
                    .await?)
            }
            .scope_boxed()
        })
        .await
    }

    /// Every sled ever registered, expunged ones included, ordered by id.
    pub async fn sled_list_all(&self) -> Result<Vec<Sled>, DataStoreError> {
        self.statement_retry("sled_list_all", InDoubt::Read, |conn| {
            sled::table.order(sled::id).select(Sled::as_select()).load(conn).scope_boxed()
        })
        .await
    }

    /// Sleds in service (not expunged), ordered by id.
    pub async fn sled_list(&self) -> Result<Vec<Sled>, DataStoreError> {
        self.statement_retry("sled_list", InDoubt::Read, |conn| {
            sled::table
                .filter(sled::time_expunged.is_null())
                .order(sled::id)
                .select(Sled::as_select())
                .load(conn)
                .scope_boxed()
        })
        .await
    }

    pub async fn sled_get(&self, id: Uuid) -> Result<Sled, DataStoreError> {
        self.statement_retry("sled_get", InDoubt::Read, |conn| {
            async move { sled::table.find(id).select(Sled::as_select()).first(conn).await.optional() }
                .scope_boxed()
        })
        .await?
        .ok_or_else(|| DataStoreError::NotFound { kind: "sled", key: id.to_string() })
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::datastore;
    use super::*;

    fn registration(serial: &str, port: u16) -> SledRegistration {
        SledRegistration {
            id: Uuid::new_v4(),
            serial: serial.to_string(),
            ip: "127.0.0.1".parse().unwrap(),
            port,
            repo_depot_port: port + 1,
        }
    }

    #[tokio::test]
    async fn sled_upsert_inserts_then_updates_address() {
        let (_db, datastore) = datastore().await;
        let mut first = registration("serial-a", 9000);
        let inserted = datastore.sled_upsert(&first).await.unwrap();
        assert_eq!(inserted.port, 9000);
        datastore.sled_upsert(&registration("serial-b", 9100)).await.unwrap();

        first.port = 9200;
        first.ip = "::1".parse().unwrap();
        let updated = datastore.sled_upsert(&first).await.unwrap();
        assert_eq!((updated.port, updated.ip.as_str()), (9200, "::1"));
        assert_eq!(updated.time_created, inserted.time_created);
        assert!(updated.time_modified >= inserted.time_modified);

        assert_eq!(datastore.sled_get(first.id).await.unwrap(), updated);
        let listed = datastore.sled_list().await.unwrap();
        assert_eq!(listed.len(), 2);
        assert!(listed.windows(2).all(|pair| pair[0].id < pair[1].id));
    }

    #[tokio::test]
    async fn sled_serial_taken_by_another_id_is_a_conflict() {
        let (_db, datastore) = datastore().await;
        datastore.sled_upsert(&registration("serial-a", 9000)).await.unwrap();
        let error = datastore.sled_upsert(&registration("serial-a", 9300)).await.unwrap_err();
        assert!(matches!(error, DataStoreError::Conflict(_)), "{error:?}");
        assert!(error.to_string().contains("serial-a"), "{error}");
        assert_eq!(datastore.sled_list().await.unwrap().len(), 1);
    }

    /// Expunged is final; the serial of an expunged sled may come back
    /// under a new id (a second id claiming the serial of a sled in service
    /// is refused, above).
    #[tokio::test]
    async fn an_expunged_sled_cannot_register_and_its_serial_can_be_reused() {
        let (_db, datastore) = datastore().await;
        let old = registration("serial-a", 9000);
        datastore.sled_upsert(&old).await.unwrap();
        let expunged = datastore.sled_expunge(old.id).await.unwrap();
        assert!(expunged.time_expunged.is_some());
        assert_eq!(datastore.sled_expunge(old.id).await.unwrap(), expunged, "idempotent");
        let error = datastore.sled_upsert(&old).await.unwrap_err();
        assert!(
            error.to_string().contains("was expunged") && error.to_string().contains("new sled"),
            "{error}"
        );
        assert!(datastore.sled_list().await.unwrap().is_empty());
        let replacement = registration("serial-a", 9400);
        datastore.sled_upsert(&replacement).await.unwrap();
        let all = datastore.sled_list_all().await.unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(datastore.sled_list().await.unwrap()[0].id, replacement.id);
        let error = datastore.sled_expunge(Uuid::new_v4()).await.unwrap_err();
        assert!(matches!(error, DataStoreError::NotFound { .. }), "{error:?}");
    }

    #[tokio::test]
    async fn sled_get_unknown_is_not_found() {
        let (_db, datastore) = datastore().await;
        let id = Uuid::new_v4();
        let error = datastore.sled_get(id).await.unwrap_err();
        assert_eq!(error.to_string(), format!("sled {id} not found"));
    }
}
