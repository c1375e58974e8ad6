//! The repo depot's one request, `GET /artifact/sha256/{hash}`, answered
//! alike by every sled's depot and, for the artifacts it has staged, by
//! Nexus (a copy's last resort, see `tuf_artifact_replication`).
//!
//! It honours the one form of HTTP `Range` the depot needs: a single byte
//! range, `bytes=START-` or `bytes=START-END` (RFC 9110 §14.1.2). Other
//! forms (suffix ranges, multiple ranges) are ignored, which RFC 9110
//! allows: the whole file is sent with 200.

use crate::ArtifactHash;
use dropshot::{Body, ClientErrorStatusCode, HttpError};
use futures::TryStreamExt;
use http::{Response, StatusCode, header};
use http_body::Frame;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

/// What to send for a file of `length` bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum RangeDecision {
    Whole,
    /// Inclusive byte positions.
    Partial {
        start: u64,
        end: u64,
    },
    Unsatisfiable,
}

pub fn decide(header: Option<&str>, length: u64) -> RangeDecision {
    let Some(spec) = header.and_then(|value| value.trim().strip_prefix("bytes=")) else {
        return RangeDecision::Whole;
    };
    let Some((start, end)) = spec.split_once('-') else {
        return RangeDecision::Whole;
    };
    if spec.contains(',') {
        return RangeDecision::Whole;
    }
    let Ok(start) = start.trim().parse::<u64>() else {
        return RangeDecision::Whole;
    };
    let end = match end.trim() {
        "" => length.saturating_sub(1),
        end => match end.parse::<u64>() {
            Ok(end) if end >= start => end.min(length.saturating_sub(1)),
            _ => return RangeDecision::Whole,
        },
    };
    if start >= length {
        return RangeDecision::Unsatisfiable;
    }
    RangeDecision::Partial { start, end }
}

/// What a depot response carries of an artifact.
#[derive(Clone, Copy, Debug)]
pub struct Span {
    pub status: StatusCode,
    pub start: u64,
    /// Inclusive.
    pub end: u64,
    /// The bytes in the body.
    pub count: u64,
    /// The whole artifact's.
    pub length: u64,
}

/// The span to send of `hash`, `length` bytes long, for the request's
/// `Range` header; 416 (naming the artifact, with `Content-Range: bytes
/// */length`) for a range that starts past the end.
pub fn span(hash: &ArtifactHash, range_header: Option<&str>, length: u64) -> Result<Span, HttpError> {
    let (status, start, end) = match decide(range_header, length) {
        RangeDecision::Whole => (StatusCode::OK, 0, length.saturating_sub(1)),
        RangeDecision::Partial { start, end } => (StatusCode::PARTIAL_CONTENT, start, end),
        RangeDecision::Unsatisfiable => {
            return Err(HttpError::for_client_error(
                Some("RANGE_NOT_SATISFIABLE".into()),
                ClientErrorStatusCode::RANGE_NOT_SATISFIABLE,
                format!("artifact {hash} has {length} bytes; the requested range starts beyond them"),
            )
            .with_header(header::CONTENT_RANGE, format!("bytes */{length}"))
            .expect("a valid header"));
        }
    };
    let count = if length == 0 { 0 } else { end - start + 1 };
    Ok(Span { status, start, end, count, length })
}

/// Response header of a depot serving an artifact it is still receiving:
/// how many in-flight writes stood between these bytes and a complete copy
/// when the write began (1 for a sled receiving a PUT, or copying from a
/// complete copy; one more per sled in a pipelined chain). Absent for a
/// complete copy. A copier
/// far down a chain gives the sleds above it time to move off a slow
/// source first (see the sled agent's `store::rate`).
pub const HOPS_HEADER: &str = "x-artifact-hops";

/// The response for `span` of `hash`, with `body` (exactly `span.count`
/// bytes, or broken off short of them on an error: the receiver then sees
/// a broken body, never a short artifact).
pub fn respond(hash: &ArtifactHash, span: Span, body: Body) -> Result<Response<Body>, HttpError> {
    let mut response = Response::builder()
        .status(span.status)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, span.count);
    if span.status == StatusCode::PARTIAL_CONTENT {
        response = response
            .header(header::CONTENT_RANGE, format!("bytes {}-{}/{}", span.start, span.end, span.length));
    }
    response
        .body(body)
        .map_err(|error| HttpError::for_internal_error(format!("building the response for {hash}: {error}")))
}

/// `span` of a complete file of `hash`, streamed; `held` (a permit) lives
/// until the body is done or dropped.
pub async fn file_body(
    hash: &ArtifactHash,
    mut file: tokio::fs::File,
    span: Span,
    held: impl Send + Sync + 'static,
) -> Result<Body, HttpError> {
    file.seek(std::io::SeekFrom::Start(span.start))
        .await
        .map_err(|error| HttpError::for_internal_error(format!("seeking in artifact {hash}: {error}")))?;
    let stream = tokio_util::io::ReaderStream::new(file.take(span.count)).map_ok(move |bytes| {
        let _held = &held;
        Frame::data(bytes)
    });
    Ok(Body::wrap(http_body_util::StreamBody::new(stream)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_ranges_are_honoured_and_the_rest_ignored() {
        assert_eq!(decide(None, 100), RangeDecision::Whole);
        assert_eq!(decide(Some("bytes=10-"), 100), RangeDecision::Partial { start: 10, end: 99 });
        assert_eq!(decide(Some("bytes=10-19"), 100), RangeDecision::Partial { start: 10, end: 19 });
        assert_eq!(decide(Some("bytes=90-500"), 100), RangeDecision::Partial { start: 90, end: 99 });
        assert_eq!(decide(Some("bytes=100-"), 100), RangeDecision::Unsatisfiable);
        assert_eq!(decide(Some("bytes=-10"), 100), RangeDecision::Whole, "suffix ranges are not used");
        assert_eq!(decide(Some("bytes=0-1,5-6"), 100), RangeDecision::Whole);
        assert_eq!(decide(Some("items=1-2"), 100), RangeDecision::Whole);
        assert_eq!(decide(Some("bytes=5-2"), 100), RangeDecision::Whole);
    }
}
