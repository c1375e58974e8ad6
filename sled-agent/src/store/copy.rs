//! Copies from another sled's repo depot.
//!
//! `copy_from_depot` answers once the source has answered (so a missing
//! artifact or an unreachable depot is the caller's error, not a background
//! one), then streams the body through the shared write path in the
//! background, bounded by `copy.max_concurrent`. A stream that breaks
//! resumes with a Range request from the bytes already written, up to
//! `copy.resume_attempts` times; the whole hash is verified before anything
//! is renamed into place.
//!
//! A copy that finds the partial a crashed one left (see [`super::write`])
//! asks the source for the rest at once (`Range: bytes=<offset>-`), before
//! the prefix is re-hashed: the re-hash reads the whole prefix, which the
//! request that Nexus waits on should not. The background task re-hashes it
//! first and, if the devices disagree, drops that response and fetches
//! everything. A source that does not honour the range (200, or a 206 that
//! does not start at the offset) makes the copy start over from byte 0: a
//! 200's body is used as it is, after the partials are emptied. A 416 for
//! exactly the bytes held means the partial is the whole artifact: it is
//! committed after the hash check. A request refused before a byte was
//! written (an unreachable or busy source, a quota refusal) hands the
//! partial back unchanged for the next attempt.
//!
//! A copy may name alternate depots besides its source: the sleds that Nexus
//! knows hold the artifact or are receiving it. If the source cannot be
//! used for the first request, or breaks off for good mid-stream (its
//! resume fails), the copy moves on to the next alternate and continues
//! from the bytes it has with a Range request there. Every source serves
//! the same bytes (they are named by their hash), so where each part came
//! from does not matter; the whole hash is still checked before the rename.
//!
//! Nexus may name its own depot as a *fallback*, tried after every sled.
//!
//! A copy that runs far below this sled's other copies (see [`super::rate`])
//! moves on to the next source too, at once, with a Range request from the
//! bytes it has: in a pipelined chain that is how the sleds behind a slow or
//! lossy one stop waiting for it. It prefers a source that no copy here
//! has moved off as slow lately: a sled first; the fallback next, but only for
//! [`FALLBACK_FOR_SPEED`] copies of this sled at once. On a sled whose own
//! link is slow every copy looks slow now and then, whatever its source:
//! without the bound, rotating those onto Nexus added most of a release to
//! Nexus's egress (issue #20), while a sled behind a slow one needs Nexus
//! for the one or two artifacts that slow sled was first to receive. A resume that is followed by a
//! megabyte of progress earns the copy a fresh resume budget, so a source
//! that breaks now and then but delivers is not given up on.
//!
//! A copy whose source said the artifact's length can be followed by other
//! sleds' depot requests while it runs (see [`super::serve`]).
//!
//! Each artifact is copied at most once at a time: it is "in flight" from
//! the request until its commit has finished (renamed and synced) or failed.
//! A copy that fails in the background is recorded with its error and a
//! count of consecutive failures, which `GET /artifacts` reports so that
//! Nexus can back off instead of asking again at once. A copy whose bytes
//! did not match the hash also tells the source it last read from, which
//! re-verifies its own copies at once ([`super::scrub`]).

use super::rate::{RateWatch, Slow};
use super::write::{PendingWrite, Temp};
use super::{ArtifactStore, StoreError};
use crate::storage::QuotaExceeded;
use common::api::sled_agent::{ArtifactPutResponse, CopyFailure};
use common::{ArtifactHash, Generation, error_chain};
use futures::StreamExt;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::OwnedSemaphorePermit;

/// The longest `Retry-After` of a busy depot honoured while resuming.
const MAX_SOURCE_RETRY_AFTER: Duration = Duration::from_secs(5);

/// Copies of one sled that may read from the fallback (Nexus's depot) at
/// once for speed; a copy whose sled sources fail uses it regardless.
pub(super) const FALLBACK_FOR_SPEED: usize = 1;

/// Moves off a slow source per copy: enough to try each alternate Nexus
/// names, not so many that copies with no better source churn.
const MAX_RATE_MOVES: u32 = 3;

/// Progress after a resume that earns the copy a fresh resume budget: a
/// source that keeps breaking but keeps delivering is still worth reading.
const RESUME_PROGRESS: u64 = 1 << 20;

/// How long telling a source its bytes were wrong may take.
const REPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// Takes an artifact out of the in-flight set when its copy ends, however
/// it ends.
pub(super) struct InFlight {
    set: Arc<std::sync::Mutex<BTreeSet<ArtifactHash>>>,
    hash: ArtifactHash,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.set.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.hash);
    }
}

impl ArtifactStore {
    /// Starts copying `hash` from another sled's depot, or from one of the
    /// alternates if that one cannot be used. With a free copy slot it
    /// returns once a source has answered; with every slot in use it queues
    /// the copy (up to `copy.max_queued`), which starts, in the order
    /// queued, when a slot frees, and fails in the background if it must.
    /// The copy finishes in the background.
    pub async fn copy_from_depot(
        self: &Arc<Self>,
        hash: ArtifactHash,
        generation: Generation,
        depot_base_url: &str,
        alternates: &[String],
        fallback: Option<&str>,
    ) -> Result<(), StoreError> {
        self.check_request(&hash, generation).await?;
        let in_flight = {
            let mut set = self.copies_in_flight.lock().unwrap_or_else(|e| e.into_inner());
            if !set.insert(hash) {
                slog::debug!(self.log, "copy already in flight"; "hash" => %hash);
                return Ok(());
            }
            InFlight { set: self.copies_in_flight.clone(), hash }
        };
        let artifact_url = |base: &str| format!("{}/artifact/sha256/{hash}", base.trim_end_matches('/'));
        let mut urls: Vec<String> = std::iter::once(depot_base_url)
            .chain(alternates.iter().map(String::as_str))
            .map(artifact_url)
            .collect();
        urls.dedup();
        let fallback = fallback.map(artifact_url).filter(|fallback| !urls.contains(fallback));
        urls.extend(fallback.clone());
        if let Ok(permit) = self.copy_permits.clone().try_acquire_owned() {
            return self.start_copy(hash, urls, fallback, in_flight, permit).await;
        }
        let queued = self.copy_queue_permits.clone().try_acquire_owned().map_err(|_| StoreError::Busy {
            activity: "running and queued copies",
            limit: self.copy.max_concurrent + self.copy.max_queued,
        })?;
        let store = self.clone();
        tokio::spawn(async move {
            // Tokio's semaphore is fair: queued copies start in the order
            // they came, which is the order Nexus sent them in.
            let Ok(permit) = store.copy_permits.clone().acquire_owned().await else { return };
            drop(queued);
            // A newer config may have come while it waited.
            if let Err(error) = store.check_request(&hash, generation).await {
                slog::info!(store.log, "queued copy dropped"; "hash" => %hash, "error" => error_chain(&error));
                return;
            }
            let source = urls[0].clone();
            if let Err(error) = store.start_copy(hash, urls, fallback, in_flight, permit).await {
                let message = error_chain(&error);
                slog::warn!(store.log, "queued copy failed to start"; "hash" => %hash, "error" => &message);
                store.record_copy_failure(hash, &source, message).await;
            }
        });
        Ok(())
    }

    /// Opens the first usable source of `urls` (the last of which is
    /// `fallback`, if any) and runs the copy in the background, holding
    /// `permit` (its copy slot) until it ends.
    async fn start_copy(
        self: &Arc<Self>,
        hash: ArtifactHash,
        mut urls: Vec<String>,
        fallback: Option<String>,
        in_flight: InFlight,
        permit: OwnedSemaphorePermit,
    ) -> Result<(), StoreError> {
        let mut write = self.begin_write(hash, Temp::Copy)?;
        write.in_flight = Some(in_flight);
        let mut first_error = None;
        let mut opened = None;
        for (index, url) in urls.iter().enumerate() {
            match self.open_source(&mut write, url).await {
                Ok(source) => {
                    opened = Some((index, source));
                    break;
                }
                // The artifact does not fit: no other source changes that.
                Err(error @ StoreError::QuotaExceeded { .. }) => {
                    first_error = Some(error);
                    break;
                }
                Err(error) => {
                    if index + 1 < urls.len() {
                        slog::info!(self.log, "copy source unusable; trying an alternate"; "hash" => %hash,
                            "from" => url, "error" => error_chain(&error));
                    }
                    first_error.get_or_insert(error);
                }
            }
        }
        let Some((index, source)) = opened else {
            write.hold_partials();
            return Err(first_error.expect("at least one source was tried"));
        };
        if let Some(length) = source.length {
            write.serve(&self.in_flight_writes, length, source.hops() + 1);
        }
        // The sources not yet tried come first if this one breaks, then the
        // ones that failed just now (they may have recovered).
        urls.rotate_left(index);
        let store = self.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match store.download(write, source, &urls, fallback.as_deref()).await {
                Ok((outcome, url)) => {
                    store.forget_copy_failures(&hash);
                    slog::info!(store.log, "copied artifact"; "hash" => %hash, "from" => url,
                        "successful_writes" => outcome.successful_writes)
                }
                Err((error, url)) => {
                    let message = error_chain(&error);
                    slog::warn!(store.log, "copy failed"; "hash" => %hash, "from" => url, "error" => &message);
                    if matches!(error, StoreError::HashMismatch { .. }) {
                        store.report_wrong_bytes(hash, url).await;
                    }
                    store.record_copy_failure(hash, url, message).await;
                }
            }
        });
        Ok(())
    }

    /// The first request of a copy: the whole artifact, or for a continued
    /// copy the rest of it (see the module doc). Refuses what cannot fit.
    async fn open_source(&self, write: &mut PendingWrite, url: &str) -> Result<Source, StoreError> {
        let offset = write.bytes;
        let source = if offset == 0 {
            Source::whole(self.fetch(url).await?)
        } else {
            match self.resume(url, offset).await? {
                Resumed::Rest { response, length } => {
                    slog::info!(self.log, "continuing a partial copy"; "hash" => %write.hash, "from" => url,
                        "offset" => offset);
                    Source { response: Some(response), length: Some(length) }
                }
                Resumed::AtEnd => Source { response: None, length: Some(offset) },
                Resumed::NotHonoured { response, detail } => {
                    slog::info!(self.log, "the source did not honour the range: starting the copy over";
                        "hash" => %write.hash, "from" => url, "offset" => offset, "answer" => &detail);
                    write.restart().await?;
                    if response.status().as_u16() == 200 {
                        Source::whole(response)
                    } else {
                        drop(response);
                        Source::whole(self.fetch(url).await?)
                    }
                }
            }
        };
        if let Some(length) = source.length {
            self.refuse_if_it_fits_nowhere(write.hash, length.saturating_sub(write.bytes))?;
        }
        Ok(source)
    }

    /// Refuses now, not after the download, what cannot fit anywhere:
    /// `length` more bytes.
    fn refuse_if_it_fits_nowhere(&self, hash: ArtifactHash, length: u64) -> Result<(), StoreError> {
        let healthy = self.healthy();
        if !healthy.is_empty() && healthy.iter().all(|m2| m2.available() < length) {
            let fullest = healthy.iter().min_by_key(|m2| m2.slot).expect("not empty");
            let source = QuotaExceeded {
                slot: fullest.slot,
                used: fullest.used(),
                quota: fullest.used() + fullest.available(),
                wanted: length,
            };
            return Err(StoreError::QuotaExceeded { hash, source });
        }
        Ok(())
    }

    /// Tells the depot at `url` (the artifact's URL there) that what it
    /// served did not match the hash, so that it re-verifies its copies now
    /// (see [`super::scrub`]). The copy's failure stands either way; a
    /// depot that cannot be told is logged, not retried.
    async fn report_wrong_bytes(&self, hash: ArtifactHash, url: &str) {
        let reverify = format!("{url}/reverify");
        let outcome = self.http.post(&reverify).timeout(REPORT_TIMEOUT).send().await;
        match outcome.map(|response| response.status()) {
            Ok(status) if status.is_success() => {
                slog::info!(self.log, "asked the source to re-verify its copies"; "hash" => %hash, "url" => &reverify)
            }
            Ok(status) => slog::warn!(self.log, "the source refused to re-verify"; "hash" => %hash,
                "url" => &reverify, "status" => status.as_u16()),
            Err(error) => slog::warn!(self.log, "telling the source to re-verify failed"; "hash" => %hash,
                "url" => &reverify, "error" => error_chain(&error)),
        }
    }

    pub(super) fn forget_copy_failures(&self, hash: &ArtifactHash) {
        self.copy_failures.lock().unwrap_or_else(|e| e.into_inner()).remove(hash);
    }

    async fn record_copy_failure(&self, hash: ArtifactHash, source: &str, last_error: String) {
        // Only for artifacts still wanted: the map stays within the config.
        let wanted = self.config.read().await.known().is_ok_and(|config| config.artifacts.contains(&hash));
        if !wanted {
            return;
        }
        let mut failures = self.copy_failures.lock().unwrap_or_else(|e| e.into_inner());
        let failure = failures.entry(hash).or_insert_with(|| CopyFailure {
            failures: 0,
            last_error: String::new(),
            last_source: String::new(),
            time_last_failed: chrono::Utc::now(),
        });
        failure.failures = failure.failures.saturating_add(1);
        failure.last_error = last_error;
        failure.last_source = source.to_string();
        failure.time_last_failed = chrono::Utc::now();
    }

    /// GETs the whole artifact.
    async fn fetch(&self, url: &str) -> Result<reqwest::Response, StoreError> {
        let response = self.send(url, None).await?;
        let status = response.status().as_u16();
        if status == 200 {
            Ok(response)
        } else {
            Err(StoreError::SourceStatus { url: url.to_string(), status })
        }
    }

    /// GETs the artifact from `offset` on.
    async fn resume(&self, url: &str, offset: u64) -> Result<Resumed, StoreError> {
        let response = self.send(url, Some(offset)).await?;
        let status = response.status().as_u16();
        let content_range = response
            .headers()
            .get(http::header::CONTENT_RANGE)
            .and_then(|value| value.to_str().ok())
            .unwrap_or("")
            .to_string();
        // `bytes <offset>-<last>/<length>`
        let length = content_range
            .strip_prefix(&format!("bytes {offset}-"))
            .and_then(|rest| rest.split_once('/'))
            .and_then(|(_, length)| length.parse::<u64>().ok());
        match (status, length) {
            (206, Some(length)) => return Ok(Resumed::Rest { response, length }),
            // There is nothing past the bytes already held (a stream that
            // broke after its last byte; a partial that is the whole
            // artifact). The hash decides.
            (416, _) if content_range == format!("bytes */{offset}") => return Ok(Resumed::AtEnd),
            (200 | 206 | 416, _) => {}
            _ => return Err(StoreError::SourceStatus { url: url.to_string(), status }),
        }
        Ok(Resumed::NotHonoured {
            response,
            detail: format!("answered {status} with Content-Range {content_range:?}"),
        })
    }

    async fn send(&self, url: &str, offset: Option<u64>) -> Result<reqwest::Response, StoreError> {
        let mut request = self.http.get(url);
        if let Some(offset) = offset {
            request = request.header(http::header::RANGE, format!("bytes={offset}-"));
        }
        let response = request
            .send()
            .await
            .map_err(|source| StoreError::SourceUnreachable { url: url.to_string(), source })?;
        let status = response.status().as_u16();
        if status == 503 || status == 429 {
            let retry_after_secs = response
                .headers()
                .get(http::header::RETRY_AFTER)
                .and_then(|value| value.to_str().ok()?.parse().ok())
                .unwrap_or(1);
            return Err(StoreError::SourceBusy { url: url.to_string(), retry_after_secs });
        }
        Ok(response)
    }

    /// Streams the source into the pending write, resuming with a Range
    /// request where the stream broke (at the next source in `urls` once
    /// this one's resume fails), then commits. A continued copy's prefix is
    /// re-hashed first. Returns the source used last, with the outcome.
    async fn download<'u>(
        &self,
        mut write: PendingWrite,
        source: Source,
        urls: &'u [String],
        fallback: Option<&str>,
    ) -> Result<(ArtifactPutResponse, &'u str), (StoreError, &'u str)> {
        let mut current = 0;
        let Source { mut response, mut length } = source;
        let url = |current: usize| urls[current % urls.len()].as_str();
        match write.verify_prefix().await {
            Ok(true) => {}
            Ok(false) => {
                slog::warn!(self.log, "partial copies disagree: starting the copy over"; "hash" => %write.hash);
                Source { response, length } =
                    Source::whole(self.fetch(url(current)).await.map_err(|e| (e, url(current)))?);
            }
            Err(error) => return Err((error, url(current))),
        }
        if let Some(length) = length {
            write.serve(&self.in_flight_writes, length, response.as_ref().map_or(0, hops_of) + 1);
        }
        let Some(mut response) = response else {
            return self
                .commit(write)
                .await
                .map(|outcome| (outcome, url(current)))
                .map_err(|e| (e, url(current)));
        };
        let mut resumes = 0;
        // Where the copy stood when it last resumed: a resume that moved it
        // on by `RESUME_PROGRESS` since has earned a fresh budget.
        let mut resumed_at = write.bytes;
        let mut moves = 0;
        let alternates = urls.len() > 1;
        let mut rate = RateWatch::new(self.copy_rates.clone(), write.hash);
        let mut fallback_permit = None;
        loop {
            rate.set_source_hops(hops_of(&response));
            if Some(url(current)) != fallback {
                fallback_permit = None;
            }
            let mut stream = response.bytes_stream();
            let interrupted = loop {
                match tokio::time::timeout_at(rate.window_end(), stream.next()).await {
                    Ok(None) => break None,
                    Ok(Some(Ok(chunk))) => {
                        write.write(&chunk).await.map_err(|e| (e, url(current)))?;
                        rate.add(chunk.len());
                    }
                    Ok(Some(Err(error))) => break Some(Interrupted::Broke(error)),
                    Err(_window_ended) => {}
                }
                if let Some(slow) = rate.judge(tokio::time::Instant::now())
                    && alternates
                    && moves < MAX_RATE_MOVES
                    && let Some(next) = self.next_fast_source(urls, current, fallback, &mut fallback_permit)
                {
                    break Some(Interrupted::Slow { slow, next });
                }
            };
            drop(stream);
            let pause_first = match interrupted {
                None => break,
                Some(Interrupted::Slow { slow, next }) => {
                    moves += 1;
                    let from = current;
                    self.copy_rates.mark_slow_source(url(from));
                    current = next;
                    slog::info!(self.log, "copy runs far below this sled's other copies; moving to another source";
                        "hash" => %write.hash, "from" => url(from), "next" => url(current), "offset" => write.bytes,
                        "bytes_per_sec" => slow.rate as u64, "peers_upper_quartile_bytes_per_sec" => slow.reference as u64,
                        "total_bytes_per_sec" => slow.total as u64, "typical_total_bytes_per_sec" => slow.typical_total as u64);
                    false
                }
                Some(Interrupted::Broke(error)) => {
                    if length == Some(write.bytes) {
                        // Every byte arrived before the stream broke: asking
                        // for `bytes=length-` could only be refused. The hash
                        // decides.
                        slog::info!(self.log, "copy stream broke after its last byte"; "from" => url(current),
                            "error" => error_chain(&error));
                        break;
                    }
                    if write.bytes >= resumed_at + RESUME_PROGRESS {
                        resumes = 0;
                    }
                    if resumes == self.copy.resume_attempts {
                        let message = format!("from {}: {}", url(current), error_chain(&error));
                        return Err((
                            StoreError::Body { hash: write.hash, bytes: write.bytes, message },
                            url(current),
                        ));
                    }
                    slog::info!(self.log, "copy interrupted; resuming"; "from" => url(current),
                        "offset" => write.bytes, "attempt" => resumes + 1, "error" => error_chain(&error));
                    true
                }
            };
            resumed_at = write.bytes;
            rate.restart();
            let mut pause = pause_first;
            let resumed = loop {
                // A move off a slow source asks the next one at once, and
                // only its failures count against the budget.
                if pause {
                    resumes += 1;
                    tokio::time::sleep(Duration::from_millis(100 * u64::from(resumes))).await;
                }
                pause = true;
                match self.resume(url(current), write.bytes).await {
                    // Another source may have room now; this one asked for
                    // time.
                    Err(error @ StoreError::SourceBusy { .. })
                        if alternates && resumes < self.copy.resume_attempts =>
                    {
                        current = self.next_source(urls, current, &error);
                    }
                    Err(StoreError::SourceBusy { retry_after_secs, .. })
                        if resumes < self.copy.resume_attempts =>
                    {
                        tokio::time::sleep(Duration::from_secs(retry_after_secs).min(MAX_SOURCE_RETRY_AFTER))
                            .await;
                    }
                    // Mid-stream, starting over would fetch again what this
                    // source already sent: this source failed, as before
                    // copies could be continued. Another may do.
                    Ok(Resumed::NotHonoured { detail, .. })
                        if alternates && resumes < self.copy.resume_attempts =>
                    {
                        let error = StoreError::SourceResume {
                            url: url(current).to_string(),
                            offset: write.bytes,
                            detail,
                        };
                        current = self.next_source(urls, current, &error);
                    }
                    Err(error) if alternates && resumes < self.copy.resume_attempts => {
                        current = self.next_source(urls, current, &error);
                    }
                    Ok(Resumed::NotHonoured { detail, .. }) => {
                        let error = StoreError::SourceResume {
                            url: url(current).to_string(),
                            offset: write.bytes,
                            detail,
                        };
                        return Err((error, url(current)));
                    }
                    Ok(resumed) => break resumed,
                    Err(error) => return Err((error, url(current))),
                }
            };
            match resumed {
                Resumed::Rest { response: rest, .. } => response = rest,
                Resumed::AtEnd => break,
                Resumed::NotHonoured { .. } => unreachable!("handled in the resume loop"),
            }
        }
        let last = url(current);
        self.commit(write).await.map(|outcome| (outcome, last)).map_err(|e| (e, last))
    }

    /// Where a slow copy reading `urls[current]` moves: the first sled
    /// source after it that no copy here has recently moved off as slow;
    /// else the `fallback`, if it is not such a source either and a
    /// [`FALLBACK_FOR_SPEED`] permit is free (taken into `permit`); else
    /// the next sled source, unless the copy reads from the fallback now
    /// (moving back to a sled found slow is how a copy behind a slow head
    /// ended its moves on that head). `None`: it stays.
    fn next_fast_source(
        &self,
        urls: &[String],
        current: usize,
        fallback: Option<&str>,
        permit: &mut Option<OwnedSemaphorePermit>,
    ) -> Option<usize> {
        let others = || (1..urls.len()).map(move |step| (current + step) % urls.len());
        let is_fallback = |next: usize| Some(urls[next].as_str()) == fallback;
        let fresh = |next: &usize| !self.copy_rates.recently_slow(&urls[*next]);
        if let Some(next) = others().filter(|&next| !is_fallback(next)).find(fresh) {
            return Some(next);
        }
        if let Some(next) = others().filter(|&next| is_fallback(next)).find(fresh) {
            if permit.is_none() {
                *permit = self.fallback_permits.clone().try_acquire_owned().ok();
            }
            if permit.is_some() {
                return Some(next);
            }
        }
        if is_fallback(current) {
            return None;
        }
        others().find(|&next| !is_fallback(next))
    }

    /// The source after `current` in `urls`, after `error` ruled `current`
    /// out for now (the same one if it is the only one).
    fn next_source(&self, urls: &[String], current: usize, error: &StoreError) -> usize {
        let next = (current + 1) % urls.len();
        if next != current {
            slog::info!(self.log, "copy source failed; resuming from an alternate";
                "from" => &urls[current], "next" => &urls[next], "error" => error_chain(error));
        }
        next
    }
}

/// Why a copy's stream stopped before its end.
enum Interrupted {
    Broke(reqwest::Error),
    /// It ran far below the sled's other copies ([`super::rate`]), and
    /// moves to `urls[next]`.
    Slow {
        slow: Slow,
        next: usize,
    },
}

/// A copy's source, as its first request found it.
struct Source {
    /// `None` when there is nothing left to fetch.
    response: Option<reqwest::Response>,
    /// The whole artifact's length, if the source said.
    length: Option<u64>,
}

impl Source {
    fn whole(response: reqwest::Response) -> Source {
        let length = response.content_length();
        Source { response: Some(response), length }
    }

    fn hops(&self) -> u32 {
        self.response.as_ref().map_or(0, hops_of)
    }
}

/// What a source said of its distance from a complete copy
/// (`common::depot::HOPS_HEADER`): 0 for a complete copy, or a source
/// that does not say (Nexus's depot).
fn hops_of(response: &reqwest::Response) -> u32 {
    response
        .headers()
        .get(common::depot::HOPS_HEADER)
        .and_then(|value| value.to_str().ok()?.parse().ok())
        .unwrap_or(0)
}

/// What a Range request found.
enum Resumed {
    /// The bytes from the offset on, of an artifact of `length` bytes.
    Rest { response: reqwest::Response, length: u64 },
    /// The source has no byte past the offset.
    AtEnd,
    /// The source answered, but not with the bytes from the offset on.
    NotHonoured { response: reqwest::Response, detail: String },
}
