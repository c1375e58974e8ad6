//! Background tasks' cluster-wide switches, and each Nexus's last activation
//! of each task (DESIGN §12).
//!
//! A switch is one row per task, replaced whole by whoever sets it: the last
//! writer wins, and its who, when and why are what every Nexus reports. An
//! activation is one row per (Nexus, task), replaced by every activation
//! that does work: when it starts (no `time_done`) and when it ends.

use super::{DataStore, DataStoreError, InDoubt};
use crate::db::model::{BgtaskActivation, BgtaskSwitch, DbActivationReason, DbTaskMode};
use crate::db::schema::{bgtask_activation, bgtask_switch};
use common::bgtask::{NexusActivation, TaskSwitch};
use diesel::prelude::*;
use diesel::upsert::excluded;
use diesel_async::RunQueryDsl;
use scoped_futures::ScopedFutureExt;

impl DataStore {
    /// The task's switch, or `None` if nobody has set it.
    pub async fn bgtask_switch_get(&self, name: &str) -> Result<Option<TaskSwitch>, DataStoreError> {
        let row = self
            .statement_retry("bgtask_switch_get", InDoubt::Read, |conn| {
                async move {
                    bgtask_switch::table
                        .find(name)
                        .select(BgtaskSwitch::as_select())
                        .first(conn)
                        .await
                        .optional()
                }
                .scope_boxed()
            })
            .await?;
        Ok(row.map(|row| TaskSwitch {
            mode: row.mode.0,
            changed_by: row.changed_by,
            reason: row.reason,
            time_changed: row.time_changed,
        }))
    }

    /// Sets the task's switch, replacing whatever was there.
    pub async fn bgtask_switch_set(&self, name: &str, switch: &TaskSwitch) -> Result<(), DataStoreError> {
        let row = BgtaskSwitch {
            name: name.to_string(),
            mode: DbTaskMode(switch.mode),
            changed_by: switch.changed_by.clone(),
            reason: switch.reason.clone(),
            time_changed: switch.time_changed,
        };
        // An upsert of the whole row: running it twice leaves the same row.
        self.statement_retry("bgtask_switch_set", InDoubt::Rerun, |conn| {
            diesel::insert_into(bgtask_switch::table)
                .values(&row)
                .on_conflict(bgtask_switch::name)
                .do_update()
                .set((
                    bgtask_switch::mode.eq(excluded(bgtask_switch::mode)),
                    bgtask_switch::changed_by.eq(excluded(bgtask_switch::changed_by)),
                    bgtask_switch::reason.eq(excluded(bgtask_switch::reason)),
                    bgtask_switch::time_changed.eq(excluded(bgtask_switch::time_changed)),
                ))
                .execute(conn)
                .scope_boxed()
        })
        .await?;
        Ok(())
    }

    /// Records a Nexus's activation of the task, replacing that Nexus's
    /// previous one: at the start (`time_done` is `None`) and again at the
    /// end.
    pub async fn bgtask_activation_record(
        &self,
        name: &str,
        activation: &NexusActivation,
    ) -> Result<(), DataStoreError> {
        let iteration = i64::try_from(activation.iteration).map_err(|_| {
            DataStoreError::InvalidInput(format!(
                "iteration {} of background task {name} does not fit the database",
                activation.iteration
            ))
        })?;
        let row = BgtaskActivation {
            nexus_id: activation.nexus_id,
            name: name.to_string(),
            iteration,
            reason: DbActivationReason(activation.reason),
            time_started: activation.time_started,
            time_done: activation.time_done,
        };
        // An upsert of the whole row, like the switch.
        self.statement_retry("bgtask_activation_record", InDoubt::Rerun, |conn| {
            diesel::insert_into(bgtask_activation::table)
                .values(&row)
                .on_conflict((bgtask_activation::nexus_id, bgtask_activation::name))
                .do_update()
                .set((
                    bgtask_activation::iteration.eq(excluded(bgtask_activation::iteration)),
                    bgtask_activation::reason.eq(excluded(bgtask_activation::reason)),
                    bgtask_activation::time_started.eq(excluded(bgtask_activation::time_started)),
                    bgtask_activation::time_done.eq(excluded(bgtask_activation::time_done)),
                ))
                .execute(conn)
                .scope_boxed()
        })
        .await?;
        Ok(())
    }

    /// Every Nexus's last recorded activation of the task, by Nexus id.
    /// Nexus instances that stopped keep their last row.
    pub async fn bgtask_activation_list(&self, name: &str) -> Result<Vec<NexusActivation>, DataStoreError> {
        let rows: Vec<BgtaskActivation> = self
            .statement_retry("bgtask_activation_list", InDoubt::Read, |conn| {
                bgtask_activation::table
                    .filter(bgtask_activation::name.eq(name))
                    .order(bgtask_activation::nexus_id)
                    .select(BgtaskActivation::as_select())
                    .load(conn)
                    .scope_boxed()
            })
            .await?;
        Ok(rows
            .into_iter()
            .map(|row| NexusActivation {
                nexus_id: row.nexus_id,
                // Written from a u64 by bgtask_activation_record.
                iteration: row.iteration.unsigned_abs(),
                reason: row.reason.0,
                time_started: row.time_started,
                time_done: row.time_done,
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::datastore;
    use super::*;
    use chrono::Utc;
    use common::bgtask::{ActivationReason, TaskMode};
    use uuid::Uuid;

    fn switch(mode: TaskMode, reason: &str) -> TaskSwitch {
        // Microseconds: what PostgreSQL keeps of a timestamp.
        let time_changed = chrono::DateTime::from_timestamp_micros(Utc::now().timestamp_micros()).unwrap();
        TaskSwitch { mode, changed_by: "alice@console".into(), reason: reason.into(), time_changed }
    }

    #[tokio::test]
    async fn a_switch_is_absent_until_set_and_the_last_setting_wins() {
        let (_db, datastore) = datastore().await;
        assert_eq!(datastore.bgtask_switch_get("tuf_repo_pruner").await.unwrap(), None);
        let manual = switch(TaskMode::Manual, "investigating a pruning bug");
        datastore.bgtask_switch_set("tuf_repo_pruner", &manual).await.unwrap();
        assert_eq!(datastore.bgtask_switch_get("tuf_repo_pruner").await.unwrap(), Some(manual));
        let disabled = switch(TaskMode::Disabled, "stop it entirely");
        datastore.bgtask_switch_set("tuf_repo_pruner", &disabled).await.unwrap();
        assert_eq!(datastore.bgtask_switch_get("tuf_repo_pruner").await.unwrap(), Some(disabled));
        assert_eq!(datastore.bgtask_switch_get("inventory_collection").await.unwrap(), None, "per task");
    }

    #[tokio::test]
    async fn activations_are_kept_per_nexus_and_replaced_by_the_next() {
        let (_db, datastore) = datastore().await;
        let (first, second) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let started = chrono::DateTime::from_timestamp_micros(Utc::now().timestamp_micros()).unwrap();
        let mut activation = NexusActivation {
            nexus_id: first,
            iteration: 7,
            reason: ActivationReason::Explicit,
            time_started: started,
            time_done: None,
        };
        datastore.bgtask_activation_record("tuf_repo_pruner", &activation).await.unwrap();
        assert_eq!(datastore.bgtask_activation_list("tuf_repo_pruner").await.unwrap(), [activation.clone()]);

        activation.time_done = Some(started);
        datastore.bgtask_activation_record("tuf_repo_pruner", &activation).await.unwrap();
        let other = NexusActivation {
            nexus_id: second,
            iteration: 1,
            reason: ActivationReason::Periodic,
            time_started: started,
            time_done: None,
        };
        datastore.bgtask_activation_record("tuf_repo_pruner", &other).await.unwrap();
        datastore.bgtask_activation_record("inventory_collection", &other).await.unwrap();
        assert_eq!(
            datastore.bgtask_activation_list("tuf_repo_pruner").await.unwrap(),
            [activation.clone(), other.clone()]
        );

        activation.iteration = 8;
        activation.reason = ActivationReason::Dependency;
        activation.time_done = None;
        datastore.bgtask_activation_record("tuf_repo_pruner", &activation).await.unwrap();
        assert_eq!(datastore.bgtask_activation_list("tuf_repo_pruner").await.unwrap(), [activation, other]);
    }
}
