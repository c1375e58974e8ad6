//! Registration with Nexus: at start-up and then periodically, so that a
//! Nexus that lost track of the sled (or a new Nexus) learns of it again.
//! Failures are retried with capped exponential back-off and never stop the
//! sled agent; they are logged at the first failure and every tenth after,
//! so an absent Nexus does not flood the log.

use common::api::nexus_internal::SledAgentInfo;
use common::clients::nexus_internal::Client;
use common::error_chain;
use std::time::Duration;
use uuid::Uuid;

const MAX_BACKOFF: Duration = Duration::from_secs(30);

pub fn spawn(
    log: slog::Logger,
    nexus_internal_url: &str,
    sled_id: Uuid,
    info: SledAgentInfo,
    period: Duration,
) -> tokio::task::JoinHandle<()> {
    let client = Client::new_with_client(
        nexus_internal_url,
        reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("a plain HTTP client builds"),
    );
    tokio::spawn(async move {
        let mut failures: u32 = 0;
        loop {
            match client.sled_agent_put(&sled_id, &info).await {
                Ok(_) => {
                    if failures > 0 {
                        slog::info!(log, "registered with Nexus"; "after_failures" => failures);
                    } else {
                        slog::debug!(log, "registered with Nexus");
                    }
                    failures = 0;
                    tokio::time::sleep(period).await;
                }
                Err(error) => {
                    failures += 1;
                    if failures == 1 || failures.is_multiple_of(10) {
                        slog::warn!(log, "registering with Nexus failed; retrying";
                            "failures" => failures, "error" => error_chain(&error));
                    }
                    let backoff =
                        Duration::from_millis(100).saturating_mul(1 << failures.min(10)).min(MAX_BACKOFF);
                    tokio::time::sleep(backoff).await;
                }
            }
        }
    })
}
