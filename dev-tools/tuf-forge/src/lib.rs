//! tuf-forge: builds signed TUF repositories for tests and demos, with the
//! same library calls (`tough`'s `RepositoryEditor`) and the same layout as
//! `tuftool create`: `repo/metadata/{1.root.json, 1.snapshot.json,
//! 1.targets.json, timestamp.json}` and consistent-snapshot targets
//! `repo/targets/<sha256>.<name>`, zipped.
//!
//! Keys are Ed25519 in PKCS#8 DER, which `tuftool` reads too.

pub mod raw_zip;

use anyhow::{Context, bail};
use camino::{Utf8Path, Utf8PathBuf};
use jiff::Timestamp;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::io::Write;
use std::num::NonZeroU64;
use tough::editor::RepositoryEditor;
use tough::editor::signed::{PathExists, SignedRole};
use tough::key_source::{KeySource, LocalKeySource};
use tough::schema::{KeyHolder, RoleKeys, RoleType, Root, Target};

/// A new Ed25519 private key, PKCS#8 DER.
pub fn generate_key() -> anyhow::Result<Vec<u8>> {
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let document = aws_lc_rs::signature::Ed25519KeyPair::generate_pkcs8(&rng)
        .map_err(|_| anyhow::anyhow!("generating an Ed25519 key failed"))?;
    Ok(document.as_ref().to_vec())
}

fn key_source(path: &Utf8Path) -> Vec<Box<dyn KeySource>> {
    vec![Box::new(LocalKeySource { path: path.into() })]
}

/// A root role (version 1, consistent snapshots) in which `key` holds every
/// role with threshold 1, signed by `key`.
pub async fn make_root(key: &Utf8Path, expires: Timestamp) -> anyhow::Result<Vec<u8>> {
    let keys = key_source(key);
    let public = keys[0]
        .as_sign()
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("reading key {key}"))?
        .tuf_key();
    let key_id = public.key_id().context("computing the key id")?;
    let one = NonZeroU64::new(1).expect("1 is not zero");
    let role = || RoleKeys { keyids: vec![key_id.clone()], threshold: one, _extra: HashMap::new() };
    let root = Root {
        spec_version: "1.0.0".to_string(),
        consistent_snapshot: true,
        version: one,
        expires: round_to_second(expires),
        keys: HashMap::from([(key_id.clone(), public)]),
        roles: HashMap::from([
            (RoleType::Root, role()),
            (RoleType::Snapshot, role()),
            (RoleType::Targets, role()),
            (RoleType::Timestamp, role()),
        ]),
        _extra: HashMap::new(),
    };
    let signed =
        SignedRole::new(root.clone(), &KeyHolder::Root(root), &keys, &aws_lc_rs::rand::SystemRandom::new())
            .await
            .context("signing the root role")?;
    Ok(signed.buffer().clone())
}

/// Where an artifact's bytes come from.
#[derive(Clone, Debug)]
pub enum Contents {
    /// This many pseudo-random bytes.
    Random(u64),
    File(Utf8PathBuf),
}

#[derive(Clone, Debug)]
pub struct ArtifactSpec {
    pub name: String,
    pub version: String,
    pub kind: String,
    pub contents: Contents,
}

impl std::str::FromStr for ArtifactSpec {
    type Err = anyhow::Error;

    /// `name:version:kind:SIZE_OR_PATH`, where a size is a number of bytes
    /// with an optional `KiB`/`MiB`/`GiB` suffix.
    fn from_str(text: &str) -> anyhow::Result<ArtifactSpec> {
        let parts: Vec<&str> = text.splitn(4, ':').collect();
        let [name, version, kind, source] = parts[..] else {
            bail!("artifact {text:?} must be name:version:kind:SIZE_OR_PATH");
        };
        if [name, version, kind, source].iter().any(|part| part.is_empty()) {
            bail!("artifact {text:?} has an empty field");
        }
        let contents =
            parse_size(source).map(Contents::Random).unwrap_or_else(|| Contents::File(source.into()));
        Ok(ArtifactSpec { name: name.into(), version: version.into(), kind: kind.into(), contents })
    }
}

fn parse_size(text: &str) -> Option<u64> {
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(index) => text.split_at(index),
        None => (text, ""),
    };
    let number: u64 = number.parse().ok()?;
    let multiplier = match unit {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => return None,
    };
    number.checked_mul(multiplier)
}

#[derive(Clone, Debug)]
pub struct RepoSpec {
    pub system_version: String,
    pub artifacts: Vec<ArtifactSpec>,
    /// Expiry of the targets, snapshot and timestamp roles.
    pub expires: Timestamp,
    /// Seeds the random contents, so equal specs give equal bytes.
    pub seed: u64,
}

/// The target name of an artifact: its fields, made safe for a file name.
pub fn target_name(artifact: &ArtifactSpec) -> String {
    let raw = format!("{}-{}.{}", artifact.name, artifact.version, artifact.kind);
    raw.chars().map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '_' }).collect()
}

/// The `artifacts.json` that describes `spec`.
pub fn artifacts_json(spec: &RepoSpec) -> serde_json::Value {
    let artifacts: Vec<serde_json::Value> = spec
        .artifacts
        .iter()
        .map(|a| serde_json::json!({"name": a.name, "version": a.version, "kind": a.kind, "target": target_name(a)}))
        .collect();
    serde_json::json!({"system_version": spec.system_version, "artifacts": artifacts})
}

/// Writes the targets of `spec` (artifacts and `artifacts.json`) into `dir`.
pub fn write_targets(spec: &RepoSpec, dir: &Utf8Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {dir}"))?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(spec.seed);
    for artifact in &spec.artifacts {
        let path = dir.join(target_name(artifact));
        match &artifact.contents {
            Contents::Random(size) => {
                let mut file = std::io::BufWriter::new(
                    std::fs::File::create(&path).with_context(|| format!("creating {path}"))?,
                );
                let mut buffer = vec![0u8; 1 << 16];
                let mut left = *size;
                while left > 0 {
                    let chunk = left.min(buffer.len() as u64) as usize;
                    rng.fill(&mut buffer[..chunk]);
                    file.write_all(&buffer[..chunk])?;
                    left -= chunk as u64;
                }
                file.flush()?;
            }
            Contents::File(source) => {
                std::fs::copy(source, &path).with_context(|| format!("copying {source}"))?;
            }
        }
    }
    let document = serde_json::to_vec_pretty(&artifacts_json(spec)).expect("JSON values serialize");
    std::fs::write(dir.join("artifacts.json"), document).context("writing artifacts.json")?;
    Ok(())
}

/// Signs the targets in `targets_dir` into a repository at `out_dir`
/// (`metadata/` and `targets/`), exactly as `tuftool create` does.
pub async fn sign_repo(
    key: &Utf8Path,
    root: &Utf8Path,
    targets_dir: &Utf8Path,
    expires: Timestamp,
    out_dir: &Utf8Path,
) -> anyhow::Result<()> {
    let one = NonZeroU64::new(1).expect("1 is not zero");
    let expires = round_to_second(expires);
    let mut editor = RepositoryEditor::new(root).await.with_context(|| format!("loading root {root}"))?;
    editor
        .targets_version(one)?
        .targets_expires(expires)?
        .snapshot_version(one)
        .snapshot_expires(expires)
        .timestamp_version(one)
        .timestamp_expires(expires);
    let mut names: Vec<_> = std::fs::read_dir(targets_dir)?.collect::<Result<Vec<_>, _>>()?;
    names.sort_by_key(|entry| entry.file_name());
    for entry in names {
        let name =
            entry.file_name().into_string().map_err(|_| anyhow::anyhow!("target names must be UTF-8"))?;
        let target =
            Target::from_path(entry.path()).await.with_context(|| format!("hashing target {name}"))?;
        editor.add_target(name, target)?;
    }
    let signed = editor.sign(&key_source(key)).await.context("signing the repository")?;
    signed
        .copy_targets(targets_dir, out_dir.join("targets"), PathExists::Fail)
        .await
        .context("writing targets")?;
    signed.write(out_dir.join("metadata")).await.context("writing metadata")?;
    Ok(())
}

/// Zips a repository directory (with `metadata/` and `targets/`) as
/// `repo/...`, entries sorted and timestamps fixed so equal inputs give
/// equal zips.
pub fn zip_repo(repo_dir: &Utf8Path, out: &Utf8Path) -> anyhow::Result<()> {
    let file = std::fs::File::create(out).with_context(|| format!("creating {out}"))?;
    let mut zip = zip::ZipWriter::new(file);
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated)
        .last_modified_time(zip::DateTime::default());
    for sub in ["metadata", "targets"] {
        let dir = repo_dir.join(sub);
        let mut entries: Vec<_> = std::fs::read_dir(&dir)
            .with_context(|| format!("reading {dir}"))?
            .collect::<Result<Vec<_>, _>>()?;
        entries.sort_by_key(|entry| entry.file_name());
        for entry in entries {
            let name =
                entry.file_name().into_string().map_err(|_| anyhow::anyhow!("file names must be UTF-8"))?;
            zip.start_file(format!("repo/{sub}/{name}"), options)?;
            // Follows symbolic links (tuftool links its targets).
            let mut source = std::fs::File::open(entry.path())?;
            std::io::copy(&mut source, &mut zip)?;
        }
    }
    zip.finish()?;
    Ok(())
}

/// Builds the whole repository zip for `spec`.
pub async fn make_repo(
    key: &Utf8Path,
    root: &Utf8Path,
    spec: &RepoSpec,
    out: &Utf8Path,
) -> anyhow::Result<()> {
    let work = camino_tempfile::tempdir().context("creating a work directory")?;
    let targets = work.path().join("targets-in");
    write_targets(spec, &targets)?;
    let repo = work.path().join("repo");
    sign_repo(key, root, &targets, spec.expires, &repo).await?;
    zip_repo(&repo, out)
}

/// TUF timestamps have whole seconds.
fn round_to_second(time: Timestamp) -> Timestamp {
    Timestamp::from_second(time.as_second()).expect("seconds of a valid timestamp are valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn artifact_specs_parse_sizes_and_paths() {
        let random: ArtifactSpec = "os:1.0:host:4MiB".parse().unwrap();
        assert!(matches!(random.contents, Contents::Random(n) if n == 4 << 20));
        let file: ArtifactSpec = "os:1.0:host:/tmp/image.bin".parse().unwrap();
        assert!(matches!(file.contents, Contents::File(ref p) if p == "/tmp/image.bin"));
        assert!("os:1.0:host".parse::<ArtifactSpec>().is_err());
        assert_eq!(target_name(&"a b:1/2:k:1".parse().unwrap()), "a_b-1_2.k");
    }
}
