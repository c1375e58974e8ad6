//! TUF trust roots: the root roles an uploaded repository may be signed under.
//! Deletion is soft, so that what was trusted when stays visible in the
//! database.

use super::{DataStore, DataStoreError};
use crate::db::model::TufTrustRoot;
use crate::db::schema::tuf_trust_root;
use chrono::Utc;
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use uuid::Uuid;

impl DataStore {
    pub async fn trust_root_add(&self, root_role: serde_json::Value) -> Result<TufTrustRoot, DataStoreError> {
        let row =
            TufTrustRoot { id: Uuid::new_v4(), time_created: Utc::now(), time_deleted: None, root_role };
        let mut conn = self.connection().await?;
        diesel::insert_into(tuf_trust_root::table)
            .values(&row)
            .returning(TufTrustRoot::as_returning())
            .get_result(&mut conn)
            .await
            .map_err(|source| DataStoreError::Query { operation: "trust_root_add", source })
    }

    /// Live trust roots, oldest first.
    pub async fn trust_root_list(&self) -> Result<Vec<TufTrustRoot>, DataStoreError> {
        let mut conn = self.connection().await?;
        tuf_trust_root::table
            .filter(tuf_trust_root::time_deleted.is_null())
            .order((tuf_trust_root::time_created, tuf_trust_root::id))
            .select(TufTrustRoot::as_select())
            .load(&mut conn)
            .await
            .map_err(|source| DataStoreError::Query { operation: "trust_root_list", source })
    }

    pub async fn trust_root_get(&self, id: Uuid) -> Result<TufTrustRoot, DataStoreError> {
        let mut conn = self.connection().await?;
        tuf_trust_root::table
            .find(id)
            .filter(tuf_trust_root::time_deleted.is_null())
            .select(TufTrustRoot::as_select())
            .first(&mut conn)
            .await
            .optional()
            .map_err(|source| DataStoreError::Query { operation: "trust_root_get", source })?
            .ok_or_else(|| DataStoreError::NotFound { kind: "trust root", key: id.to_string() })
    }

    pub async fn trust_root_delete(&self, id: Uuid) -> Result<(), DataStoreError> {
        let mut conn = self.connection().await?;
        let deleted = diesel::update(tuf_trust_root::table)
            .filter(tuf_trust_root::id.eq(id).and(tuf_trust_root::time_deleted.is_null()))
            .set(tuf_trust_root::time_deleted.eq(Utc::now()))
            .execute(&mut conn)
            .await
            .map_err(|source| DataStoreError::Query { operation: "trust_root_delete", source })?;
        match deleted {
            0 => Err(DataStoreError::NotFound { kind: "trust root", key: id.to_string() }),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::datastore;
    use super::*;

    #[tokio::test]
    async fn trust_roots_add_list_get_delete() {
        let (_db, datastore) = datastore().await;
        let first = datastore.trust_root_add(serde_json::json!({"signed": {"version": 1}})).await.unwrap();
        let second = datastore.trust_root_add(serde_json::json!({"signed": {"version": 2}})).await.unwrap();
        let ids: Vec<Uuid> = datastore.trust_root_list().await.unwrap().iter().map(|r| r.id).collect();
        assert_eq!(ids, vec![first.id, second.id]);
        assert_eq!(datastore.trust_root_get(second.id).await.unwrap().root_role["signed"]["version"], 2);

        datastore.trust_root_delete(first.id).await.unwrap();
        let ids: Vec<Uuid> = datastore.trust_root_list().await.unwrap().iter().map(|r| r.id).collect();
        assert_eq!(ids, vec![second.id]);
        let error = datastore.trust_root_get(first.id).await.unwrap_err();
        assert_eq!(error.to_string(), format!("trust root {} not found", first.id));
        let error = datastore.trust_root_delete(first.id).await.unwrap_err();
        assert!(matches!(error, DataStoreError::NotFound { .. }), "{error:?}");
    }
}
