//! `inventory_collection`: asks every in-service sled agent for its inventory
//! (M.2 slots, their state and usage, artifact config generation) and
//! records one collection, keeping the newest `keep` collections.
//!
//! A sled that cannot be asked is recorded with the error, so that an
//! operator sees it as missing rather than not seeing it at all. Collections
//! from several Nexus instances interleave harmlessly: each is a complete,
//! self-contained snapshot with its collector's name.

use crate::background::driver::BackgroundTask;
use crate::db::DataStore;
use crate::db::model::{InvCollection, InvM2, InvSled, Inventory};
use common::bgtask::details::InventoryCollectionStatus;
use common::clients::sled_agent::Client as SledClient;
use common::error_chain;
use futures::StreamExt;
use futures::future::BoxFuture;
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

pub struct InventoryCollector {
    datastore: Arc<DataStore>,
    collector: String,
    keep: usize,
    concurrency: usize,
    http: reqwest::Client,
}

impl InventoryCollector {
    pub fn new(
        datastore: Arc<DataStore>,
        collector: String,
        keep: usize,
        concurrency: usize,
        timeout: Duration,
    ) -> Self {
        let http = reqwest::Client::builder().timeout(timeout).build().expect("a plain HTTP client builds");
        InventoryCollector { datastore, collector, keep, concurrency, http }
    }

    async fn collect(&self) -> Result<InventoryCollectionStatus, crate::db::DataStoreError> {
        let time_started = chrono::Utc::now();
        let id = Uuid::new_v4();
        let sleds = self.datastore.sled_list().await?;
        let asked: Vec<_> = sleds
            .iter()
            .map(|sled| {
                let client = SledClient::new_with_client(
                    &format!("http://{}:{}", sled.ip, sled.port),
                    self.http.clone(),
                );
                async move { (sled.id, client.inventory().await.map(|r| r.into_inner())) }
            })
            .collect();
        let answers: Vec<_> = futures::stream::iter(asked).buffered(self.concurrency).collect().await;
        let mut inventory = Inventory {
            collection: InvCollection {
                id,
                time_started,
                time_done: time_started,
                collector: self.collector.clone(),
            },
            sleds: Vec::new(),
            m2s: Vec::new(),
        };
        let mut errors = Vec::new();
        for (sled_id, answer) in answers {
            let time_collected = chrono::Utc::now();
            match answer {
                Ok(reported) => {
                    inventory.sleds.push(InvSled {
                        inv_collection_id: id,
                        sled_id,
                        time_collected,
                        artifact_generation: i64::try_from(reported.artifact_generation.get()).ok(),
                        error: None,
                        ledger_damage: (!reported.ledger_damage.is_empty())
                            .then(|| reported.ledger_damage.join("\n")),
                    });
                    inventory.m2s.extend(reported.m2.iter().map(|m2| {
                        InvM2 {
                            inv_collection_id: id,
                            sled_id,
                            slot: m2.slot as i32,
                            state: serde_json::to_value(m2.state)
                                .ok()
                                .and_then(|v| v.as_str().map(String::from))
                                .unwrap_or_default(),
                            used_bytes: i64::try_from(m2.used_bytes).unwrap_or(i64::MAX),
                            quota_bytes: i64::try_from(m2.quota_bytes).unwrap_or(i64::MAX),
                        }
                    }));
                }
                Err(error) => {
                    let message = error_chain(&error);
                    errors.push(format!("sled {sled_id}: {message}"));
                    inventory.sleds.push(InvSled {
                        inv_collection_id: id,
                        sled_id,
                        time_collected,
                        artifact_generation: None,
                        error: Some(message),
                        ledger_damage: None,
                    });
                }
            }
        }
        inventory.collection.time_done = chrono::Utc::now();
        self.datastore.inventory_insert(&inventory, self.keep).await?;
        Ok(InventoryCollectionStatus {
            collection_id: Some(id),
            sleds_ok: inventory.sleds.len() - errors.len(),
            errors,
        })
    }
}

impl BackgroundTask for InventoryCollector {
    fn activate<'a>(
        &'a mut self,
        log: &'a slog::Logger,
        _reason: common::bgtask::ActivationReason,
    ) -> BoxFuture<'a, serde_json::Value> {
        Box::pin(async move {
            let status = self.collect().await.unwrap_or_else(|error| {
                let message = error_chain(&error);
                slog::warn!(log, "inventory collection failed"; "error" => &message);
                InventoryCollectionStatus { collection_id: None, sleds_ok: 0, errors: vec![message] }
            });
            serde_json::to_value(status).expect("statuses serialize")
        })
    }
}
