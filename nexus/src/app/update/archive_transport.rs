//! A tough [`Transport`](tough::Transport) that reads straight out of an
//! uploaded zip ([`Archive`]): tough fetches the metadata and the targets it
//! verifies from the archive's entries, and nothing is extracted first. What
//! tough streams (and verifies) is exactly what the upload stages.
//!
//! URLs are `zip-archive:///repo/metadata/<name>` and
//! `zip-archive:///repo/targets/<name>`; the percent-decoded path names the
//! entry. [`fetchable`] tells whether a target file name survives that round
//! trip (tough builds the URL with `Url::join`, which would cut a name at `#`
//! or `?`); names that do not are refused before tough is asked, so tough
//! can never verify one entry while the upload meant another.

use super::zip_intake::Archive;
use bytes::Bytes;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tough::{TransportError, TransportErrorKind, TransportStream};
use url::Url;

const SCHEME: &str = "zip-archive";
/// Chunks handed to tough at a time, and how many may wait unread: the
/// memory one fetch holds.
const CHUNK_BYTES: usize = 256 << 10;
const CHUNKS_AHEAD: usize = 4;

pub fn metadata_url() -> Url {
    Url::parse(&format!("{SCHEME}:///repo/metadata/")).expect("a valid URL")
}

pub fn targets_url() -> Url {
    Url::parse(&format!("{SCHEME}:///repo/targets/")).expect("a valid URL")
}

/// Whether tough, asked for target file `file_name`, fetches exactly the
/// entry `repo/targets/<file_name>`.
pub fn fetchable(file_name: &str) -> bool {
    targets_url().join(file_name).ok().is_some_and(|url| {
        url.query().is_none()
            && url.fragment().is_none()
            && entry_name(&url).as_deref() == Some(&format!("repo/targets/{file_name}"))
    })
}

fn entry_name(url: &Url) -> Option<String> {
    if url.scheme() != SCHEME || url.query().is_some() || url.fragment().is_some() {
        return None;
    }
    let path = percent_encoding::percent_decode_str(url.path()).decode_utf8().ok()?;
    path.strip_prefix('/').map(str::to_string)
}

#[derive(Clone)]
pub struct ArchiveTransport {
    archive: Arc<Archive>,
}

impl std::fmt::Debug for ArchiveTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ArchiveTransport")
    }
}

impl ArchiveTransport {
    pub fn new(archive: Arc<Archive>) -> ArchiveTransport {
        ArchiveTransport { archive }
    }
}

#[tough::async_trait]
impl tough::Transport for ArchiveTransport {
    async fn fetch(&self, url: Url) -> Result<TransportStream, TransportError> {
        if url.scheme() != SCHEME {
            return Err(TransportError::new(TransportErrorKind::UnsupportedUrlScheme, url));
        }
        let entry = entry_name(&url)
            .and_then(|name| self.archive.entry(&name).cloned())
            .ok_or_else(|| TransportError::new(TransportErrorKind::FileNotFound, &url))?;
        let (sender, receiver) = tokio::sync::mpsc::channel(CHUNKS_AHEAD);
        let archive = self.archive.clone();
        // Reading and inflating block; the channel bounds what is read ahead
        // of tough, and the reader stops when tough drops the stream.
        tokio::task::spawn_blocking(move || {
            let mut reader = archive.reader(&entry);
            loop {
                let mut chunk = vec![0u8; CHUNK_BYTES];
                let item = match reader.read_chunk(&mut chunk) {
                    Ok(0) => return,
                    Ok(read) => {
                        chunk.truncate(read);
                        Ok(Bytes::from(chunk))
                    }
                    Err(error) => Err(TransportError::new_with_cause(TransportErrorKind::Other, &url, error)),
                };
                let failed = item.is_err();
                if sender.blocking_send(item).is_err() || failed {
                    return;
                }
            }
        });
        Ok(Box::pin(ChunkStream { receiver }))
    }
}

struct ChunkStream {
    receiver: tokio::sync::mpsc::Receiver<Result<Bytes, TransportError>>,
}

impl futures::Stream for ChunkStream {
    type Item = Result<Bytes, TransportError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.receiver.poll_recv(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_change_in_a_url_are_not_fetchable() {
        for plain in ["os.zone", "os image.zone", "ünïcode.bin", "a+b=c.tar", "100%pure"] {
            assert!(fetchable(plain), "{plain}");
        }
        for changed in ["a#b", "a?b", "a%20b", "../escape", "dir/../x", "%2e%2e"] {
            assert!(!fetchable(changed), "{changed}");
        }
    }
}
