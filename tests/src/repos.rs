//! Signed test repositories (built with tuf-forge's library) and ways to
//! upload and break them.

use camino::{Utf8Path, Utf8PathBuf};
use camino_tempfile::Utf8TempDir;
use jiff::{Timestamp, ToSpan};
use tuf_forge::{ArtifactSpec, Contents, RepoSpec};

/// A signing key and its root, in a temp directory, that make repositories.
pub struct RepoFactory {
    pub dir: Utf8TempDir,
    pub key: Utf8PathBuf,
    pub root: Utf8PathBuf,
}

impl RepoFactory {
    pub async fn new() -> RepoFactory {
        let dir = camino_tempfile::tempdir().unwrap();
        let key = dir.path().join("key.der");
        std::fs::write(&key, tuf_forge::generate_key().unwrap()).unwrap();
        let root = dir.path().join("root.json");
        std::fs::write(&root, tuf_forge::make_root(&key, in_days(30)).await.unwrap()).unwrap();
        RepoFactory { dir, key, root }
    }

    pub fn root_json(&self) -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(&self.root).unwrap()).unwrap()
    }

    /// A repository with random artifacts of the given sizes, named
    /// `<prefix>-<i>`; the seed fixes the bytes.
    pub fn spec(system_version: &str, artifacts: &[(&str, u64)], seed: u64) -> RepoSpec {
        RepoSpec {
            system_version: system_version.to_string(),
            artifacts: artifacts
                .iter()
                .map(|(name, size)| ArtifactSpec {
                    name: name.to_string(),
                    version: "1.0.0".to_string(),
                    kind: "zone".to_string(),
                    contents: Contents::Random(*size),
                })
                .collect(),
            expires: in_days(7),
            seed,
        }
    }

    /// Builds `spec` into a zip in this factory's directory.
    pub async fn build(&self, spec: &RepoSpec) -> Utf8PathBuf {
        let out = self.dir.path().join(format!("{}-{}.zip", spec.system_version, rand::random::<u32>()));
        tuf_forge::make_repo(&self.key, &self.root, spec, &out).await.unwrap();
        out
    }

    /// Builds a repository whose targets directory `edit` may change after
    /// the artifacts (and artifacts.json) are written and before signing.
    pub async fn build_with_targets(&self, spec: &RepoSpec, edit: impl FnOnce(&Utf8Path)) -> Utf8PathBuf {
        let work = camino_tempfile::tempdir_in(self.dir.path()).unwrap();
        let targets = work.path().join("targets-in");
        tuf_forge::write_targets(spec, &targets).unwrap();
        edit(&targets);
        let repo = work.path().join("repo");
        tuf_forge::sign_repo(&self.key, &self.root, &targets, spec.expires, &repo).await.unwrap();
        let out = self.dir.path().join(format!("edited-{}.zip", rand::random::<u32>()));
        tuf_forge::zip_repo(&repo, &out).unwrap();
        out
    }

    /// Builds a signed repository, then lets `edit` change the signed
    /// directory (metadata/, targets/) before zipping: for tampering.
    pub async fn build_then_tamper(&self, spec: &RepoSpec, edit: impl FnOnce(&Utf8Path)) -> Utf8PathBuf {
        let work = camino_tempfile::tempdir_in(self.dir.path()).unwrap();
        let targets = work.path().join("targets-in");
        tuf_forge::write_targets(spec, &targets).unwrap();
        let repo = work.path().join("repo");
        tuf_forge::sign_repo(&self.key, &self.root, &targets, spec.expires, &repo).await.unwrap();
        edit(&repo);
        let out = self.dir.path().join(format!("tampered-{}.zip", rand::random::<u32>()));
        tuf_forge::zip_repo(&repo, &out).unwrap();
        out
    }
}

pub fn in_days(days: i64) -> Timestamp {
    Timestamp::now().checked_add((days * 24).hours()).unwrap()
}

/// Uploads a file with a streamed body. Returns the status and the body.
pub async fn upload(external_url: &str, token: Option<&str>, file: &Utf8Path) -> (u16, serde_json::Value) {
    try_upload(external_url, token, file).await.unwrap()
}

/// [`upload`], or the transport error when no answer came (the server died
/// before it answered).
pub async fn try_upload(
    external_url: &str,
    token: Option<&str>,
    file: &Utf8Path,
) -> Result<(u16, serde_json::Value), reqwest::Error> {
    let body = tokio::fs::File::open(file).await.unwrap();
    let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(body));
    let mut request = reqwest::Client::new()
        .put(format!("{external_url}/v1/system/update/repositories"))
        .query(&[("file_name", file.file_name().unwrap())])
        .body(body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await?;
    let status = response.status().as_u16();
    let text = response.text().await?;
    Ok((status, serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text))))
}

/// A zip of stored entries written by hand (see [`tuf_forge::raw_zip`]), so
/// that it can hold what a well-behaved zip writer refuses: duplicate names,
/// `..`, absolute paths.
pub fn raw_zip(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let entries: Vec<_> =
        entries.iter().map(|(name, data)| tuf_forge::raw_zip::RawEntry::new(name, data)).collect();
    tuf_forge::raw_zip::build(&entries, false)
}
