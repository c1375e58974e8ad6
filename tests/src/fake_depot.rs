//! A repo depot that misbehaves on purpose: it speaks just enough HTTP/1.1
//! (one request per connection) to serve an artifact wrongly in the ways a
//! real network or a broken sled can.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Clone, Debug)]
pub enum Behavior {
    NotFound,
    /// Serves these bytes instead of the artifact's.
    WrongBytes(Vec<u8>),
    /// On the first request, sends this many bytes and closes the
    /// connection; honours Range requests afterwards.
    ResetAfter(usize),
    /// On the first request, sends this many bytes and closes the
    /// connection; answers every later request 404, like a sled that lost
    /// the artifact.
    ResetThenGone(usize),
    /// Sends this many bytes, then nothing, keeping the connection open.
    StallAfter(usize),
    /// Sends every byte as one chunk of a chunked body, then closes the
    /// connection without the final chunk: the stream breaks after its last
    /// byte. A Range request for what follows gets 416, as from a real
    /// depot.
    CutAfterLastByte,
    /// Honours Range requests like a real depot, but sends the body slowly:
    /// [`THROTTLE_CHUNK`] bytes at a time, pausing between chunks so as to
    /// send `bytes_per_sec` on average, as over a capped link.
    /// [`FakeDepot::served_bytes`] counts each chunk once it is written.
    Throttled {
        bytes_per_sec: u64,
    },
    /// Always sends the whole artifact with 200, whatever the Range.
    IgnoreRange,
}

/// The size of the chunks a [`Behavior::Throttled`] depot sends.
pub const THROTTLE_CHUNK: usize = 64 << 10;

pub struct FakeDepot {
    pub address: SocketAddr,
    served: Arc<AtomicU64>,
    requests: Arc<Mutex<Vec<Option<String>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeDepot {
    /// Serves `artifact` (the correct bytes) with `behavior`.
    pub async fn start(artifact: Vec<u8>, behavior: Behavior) -> FakeDepot {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let served = Arc::new(AtomicU64::new(0));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let state = (served.clone(), requests.clone());
        let artifact = Arc::new(artifact);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (served, requests) = state.clone();
                let artifact = artifact.clone();
                let behavior = behavior.clone();
                tokio::spawn(async move {
                    let _ = serve(stream, &artifact, &behavior, &served, &requests).await;
                });
            }
        });
        FakeDepot { address, served, requests, task }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Body bytes sent so far, over all requests.
    pub fn served_bytes(&self) -> u64 {
        self.served.load(Ordering::SeqCst)
    }

    /// The Range header of each request received, in order.
    pub fn ranges(&self) -> Vec<Option<String>> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for FakeDepot {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(
    mut stream: TcpStream,
    artifact: &[u8],
    behavior: &Behavior,
    served: &AtomicU64,
    requests: &Mutex<Vec<Option<String>>>,
) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).await? == 0 {
            return Ok(());
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let range = head.lines().find_map(|line| {
        line.to_ascii_lowercase().strip_prefix("range:").map(|value| value.trim().to_string())
    });
    let first = {
        let mut requests = requests.lock().unwrap();
        requests.push(range.clone());
        requests.len() == 1
    };
    let start: usize = range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.trim_end_matches('-').parse().ok())
        .unwrap_or(0);
    let (status, body, limit) = match behavior {
        Behavior::NotFound => ("404 Not Found", &[][..], 0),
        Behavior::ResetThenGone(count) if first => ("200 OK", artifact, *count),
        Behavior::ResetThenGone(_) => ("404 Not Found", &[][..], 0),
        Behavior::WrongBytes(bytes) => ("200 OK", &bytes[..], bytes.len()),
        Behavior::ResetAfter(count) if first => ("200 OK", artifact, *count),
        Behavior::ResetAfter(_) => {
            (if start > 0 { "206 Partial Content" } else { "200 OK" }, &artifact[start..], artifact.len())
        }
        Behavior::StallAfter(count) => ("200 OK", artifact, *count),
        Behavior::CutAfterLastByte => {
            return serve_cut_after_last_byte(stream, artifact, start, served).await;
        }
        Behavior::Throttled { bytes_per_sec } => {
            return serve_throttled(stream, artifact, start, *bytes_per_sec, served).await;
        }
        Behavior::IgnoreRange => ("200 OK", artifact, artifact.len()),
    };
    let mut response =
        format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n", body.len());
    if status.starts_with("206") {
        response.push_str(&format!(
            "Content-Range: bytes {start}-{}/{}\r\n",
            artifact.len() - 1,
            artifact.len()
        ));
    }
    response.push_str("\r\n");
    stream.write_all(response.as_bytes()).await?;
    let sent = &body[..limit.min(body.len())];
    stream.write_all(sent).await?;
    served.fetch_add(sent.len() as u64, Ordering::SeqCst);
    stream.flush().await?;
    if let Behavior::StallAfter(_) = behavior {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
    Ok(())
}

async fn serve_cut_after_last_byte(
    mut stream: TcpStream,
    artifact: &[u8],
    start: usize,
    served: &AtomicU64,
) -> std::io::Result<()> {
    if start >= artifact.len() && start > 0 {
        return range_not_satisfiable(&mut stream, artifact.len()).await;
    }
    let head = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(format!("{:x}\r\n", artifact.len()).as_bytes()).await?;
    stream.write_all(artifact).await?;
    stream.write_all(b"\r\n").await?;
    served.fetch_add(artifact.len() as u64, Ordering::SeqCst);
    stream.flush().await
}

async fn serve_throttled(
    mut stream: TcpStream,
    artifact: &[u8],
    start: usize,
    bytes_per_sec: u64,
    served: &AtomicU64,
) -> std::io::Result<()> {
    if start >= artifact.len() && start > 0 {
        return range_not_satisfiable(&mut stream, artifact.len()).await;
    }
    let body = &artifact[start..];
    let mut head = format!("Content-Length: {}\r\nConnection: close\r\n", body.len());
    if start > 0 {
        head = format!(
            "HTTP/1.1 206 Partial Content\r\n{head}Content-Range: bytes {start}-{}/{}\r\n\r\n",
            artifact.len() - 1,
            artifact.len()
        );
    } else {
        head = format!("HTTP/1.1 200 OK\r\n{head}\r\n");
    }
    stream.write_all(head.as_bytes()).await?;
    let pause = Duration::from_secs_f64(THROTTLE_CHUNK as f64 / bytes_per_sec as f64);
    for chunk in body.chunks(THROTTLE_CHUNK) {
        stream.write_all(chunk).await?;
        stream.flush().await?;
        served.fetch_add(chunk.len() as u64, Ordering::SeqCst);
        tokio::time::sleep(pause).await;
    }
    Ok(())
}

/// 416 for a Range starting at or past the end: the whole length, so that a
/// copy holding every byte knows it is complete.
async fn range_not_satisfiable(stream: &mut TcpStream, length: usize) -> std::io::Result<()> {
    let response = format!(
        "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{length}\r\nContent-Length: 0\r\n\
         Connection: close\r\n\r\n"
    );
    stream.write_all(response.as_bytes()).await
}
