//! TUF trust roots: the root roles an uploaded repository may be signed under.
//! Deletion is soft, so that what was trusted when stays visible in the
//! database.

use super::{DataStore, DataStoreError, InDoubt};
use crate::db::model::TufTrustRoot;
use crate::db::schema::tuf_trust_root;
use chrono::Utc;
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use scoped_futures::ScopedFutureExt;
use uuid::Uuid;

impl DataStore {
    /// Adds a trust root, unless an identical one is already trusted.
    pub async fn trust_root_add(&self, root_role: serde_json::Value) -> Result<TufTrustRoot, DataStoreError> {
        let row =
            TufTrustRoot { id: Uuid::new_v4(), time_created: Utc::now(), time_deleted: None, root_role };
        self.transaction_retry("trust_root_add", InDoubt::Report, |conn| {
            let row = row.clone();
            async move {
                let live: Vec<TufTrustRoot> = tuf_trust_root::table
                    .filter(tuf_trust_root::time_deleted.is_null())
                    .select(TufTrustRoot::as_select())
                    .load(conn)
                    .await?;
                if let Some(same) = live.iter().find(|root| root.root_role == row.root_role) {
                    return Err(DataStoreError::Conflict(format!(
                        "this trust root is already trusted, as {}",
                        same.id
                    ))
                    .into());
                }
                Ok(diesel::insert_into(tuf_trust_root::table)
                    .values(&row)
                    .returning(TufTrustRoot::as_returning())
                    .get_result(conn)
                    .await?)
            }
            .scope_boxed()
        })
        .await
    }

    /// Live trust roots, oldest first.
    pub async fn trust_root_list(&self) -> Result<Vec<TufTrustRoot>, DataStoreError> {
        self.statement_retry("trust_root_list", InDoubt::Read, |conn| {
            tuf_trust_root::table
                .filter(tuf_trust_root::time_deleted.is_null())
                .order((tuf_trust_root::time_created, tuf_trust_root::id))
                .select(TufTrustRoot::as_select())
                .load(conn)
                .scope_boxed()
        })
        .await
    }

    pub async fn trust_root_get(&self, id: Uuid) -> Result<TufTrustRoot, DataStoreError> {
        self.statement_retry("trust_root_get", InDoubt::Read, |conn| {
            async move {
                tuf_trust_root::table
                    .find(id)
                    .filter(tuf_trust_root::time_deleted.is_null())
                    .select(TufTrustRoot::as_select())
                    .first(conn)
                    .await
                    .optional()
            }
            .scope_boxed()
        })
        .await?
        .ok_or_else(|| DataStoreError::NotFound { kind: "trust root", key: id.to_string() })
    }

    pub async fn trust_root_delete(&self, id: Uuid) -> Result<(), DataStoreError> {
        // Run twice, the second would find nothing to delete: report instead.
        let deleted = self
            .statement_retry("trust_root_delete", InDoubt::Report, |conn| {
                diesel::update(tuf_trust_root::table)
                    .filter(tuf_trust_root::id.eq(id).and(tuf_trust_root::time_deleted.is_null()))
                    .set(tuf_trust_root::time_deleted.eq(Utc::now()))
                    .execute(conn)
                    .scope_boxed()
            })
            .await?;
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

    async fn live_ids(datastore: &DataStore) -> Vec<Uuid> {
        let roots = datastore.trust_root_list().await.unwrap();
        roots.iter().map(|r| r.id).filter(|id| *id != super::super::test_support::TEST_TRUST_ROOT).collect()
    }

    #[tokio::test]
    async fn trust_roots_add_list_get_delete() {
        let (_db, datastore) = datastore().await;
        let first = datastore.trust_root_add(serde_json::json!({"signed": {"version": 1}})).await.unwrap();
        let second = datastore.trust_root_add(serde_json::json!({"signed": {"version": 2}})).await.unwrap();
        assert_eq!(live_ids(&datastore).await, vec![first.id, second.id]);
        let error =
            datastore.trust_root_add(serde_json::json!({"signed": {"version": 2}})).await.unwrap_err();
        assert_eq!(error.to_string(), format!("this trust root is already trusted, as {}", second.id));
        assert_eq!(datastore.trust_root_get(second.id).await.unwrap().root_role["signed"]["version"], 2);

        datastore.trust_root_delete(first.id).await.unwrap();
        assert_eq!(live_ids(&datastore).await, vec![second.id]);
        let error = datastore.trust_root_get(first.id).await.unwrap_err();
        assert_eq!(error.to_string(), format!("trust root {} not found", first.id));
        let error = datastore.trust_root_delete(first.id).await.unwrap_err();
        assert!(matches!(error, DataStoreError::NotFound { .. }), "{error:?}");
    }
}
