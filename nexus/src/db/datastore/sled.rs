//! Sleds: registered (and re-registered) by their sled agents.

use super::{DataStore, DataStoreError, violated_constraint};
use crate::db::model::{Sled, SledRegistration};
use crate::db::schema::sled;
use chrono::Utc;
use diesel::prelude::*;
use diesel::upsert::excluded;
use diesel_async::RunQueryDsl;
use uuid::Uuid;

impl DataStore {
    /// Records a sled agent's registration: inserts the sled, or updates its
    /// address if it moved. An expunged sled stays expunged.
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
        let mut conn = self.connection().await?;
        diesel::insert_into(sled::table)
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
            .get_result(&mut conn)
            .await
            .map_err(|source| match violated_constraint(&source) {
                Some("sled_serial_key") => DataStoreError::Conflict(format!(
                    "sled serial {:?} is already registered by another sled id than {}",
                    registration.serial, registration.id
                )),
                _ => DataStoreError::Query { operation: "sled_upsert", source },
            })
    }

    /// Sleds in service (not expunged), ordered by id.
    pub async fn sled_list(&self) -> Result<Vec<Sled>, DataStoreError> {
        let mut conn = self.connection().await?;
        sled::table
            .filter(sled::time_expunged.is_null())
            .order(sled::id)
            .select(Sled::as_select())
            .load(&mut conn)
            .await
            .map_err(|source| DataStoreError::Query { operation: "sled_list", source })
    }

    pub async fn sled_get(&self, id: Uuid) -> Result<Sled, DataStoreError> {
        let mut conn = self.connection().await?;
        sled::table
            .find(id)
            .select(Sled::as_select())
            .first(&mut conn)
            .await
            .optional()
            .map_err(|source| DataStoreError::Query { operation: "sled_get", source })?
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

    #[tokio::test]
    async fn sled_get_unknown_is_not_found() {
        let (_db, datastore) = datastore().await;
        let id = Uuid::new_v4();
        let error = datastore.sled_get(id).await.unwrap_err();
        assert_eq!(error.to_string(), format!("sled {id} not found"));
    }
}
