//! Inventory collections: what each sled agent reported, kept for the last
//! few collections only.

use super::{DataStore, DataStoreError, InDoubt};
use crate::db::model::{InvCollection, InvM2, InvSled, Inventory};
use crate::db::schema::{inv_collection, inv_m2, inv_sled};
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use scoped_futures::ScopedFutureExt;

impl DataStore {
    /// Records a collection and deletes all but the newest `keep`.
    pub async fn inventory_insert(&self, inventory: &Inventory, keep: usize) -> Result<(), DataStoreError> {
        self.transaction_retry("inventory_insert", InDoubt::Report, |conn| {
            async move {
                diesel::insert_into(inv_collection::table)
                    .values(&inventory.collection)
                    .execute(conn)
                    .await?;
                diesel::insert_into(inv_sled::table).values(&inventory.sleds).execute(conn).await?;
                diesel::insert_into(inv_m2::table).values(&inventory.m2s).execute(conn).await?;
                let old: Vec<uuid::Uuid> = inv_collection::table
                    .order((inv_collection::time_started.desc(), inv_collection::id.desc()))
                    .offset(keep as i64)
                    .select(inv_collection::id)
                    .load(conn)
                    .await?;
                if !old.is_empty() {
                    diesel::delete(inv_m2::table.filter(inv_m2::inv_collection_id.eq_any(&old)))
                        .execute(conn)
                        .await?;
                    diesel::delete(inv_sled::table.filter(inv_sled::inv_collection_id.eq_any(&old)))
                        .execute(conn)
                        .await?;
                    diesel::delete(inv_collection::table.filter(inv_collection::id.eq_any(&old)))
                        .execute(conn)
                        .await?;
                }
                Ok(())
            }
            .scope_boxed()
        })
        .await
    }

    /// The newest collection, if any.
    pub async fn inventory_latest(&self) -> Result<Option<Inventory>, DataStoreError> {
        self.transaction_retry("inventory_latest", InDoubt::Read, |conn| {
            async move {
                let Some(collection) = inv_collection::table
                    .order((inv_collection::time_started.desc(), inv_collection::id.desc()))
                    .select(InvCollection::as_select())
                    .first(conn)
                    .await
                    .optional()?
                else {
                    return Ok(None);
                };
                let sleds = inv_sled::table
                    .filter(inv_sled::inv_collection_id.eq(collection.id))
                    .order(inv_sled::sled_id)
                    .select(InvSled::as_select())
                    .load(conn)
                    .await?;
                let m2s = inv_m2::table
                    .filter(inv_m2::inv_collection_id.eq(collection.id))
                    .order((inv_m2::sled_id, inv_m2::slot))
                    .select(InvM2::as_select())
                    .load(conn)
                    .await?;
                Ok(Some(Inventory { collection, sleds, m2s }))
            }
            .scope_boxed()
        })
        .await
    }
}
