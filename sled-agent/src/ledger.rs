//! The artifact config ledger: the config this sled enforces, kept on every
//! M.2 so that it survives restarts and the loss of a device.
//!
//! Each copy is a file named after its generation,
//! `artifact-config.g<generation, 20 digits>.json`, written durably (temp
//! file, fsync, rename, fsync of the directory; see [`common::durable`]).
//! Older generations are removed only after the new one is durable.
//!
//! # Damage is not absence (DESIGN §11)
//!
//! A ledger file that exists but cannot be read or parsed, or whose contents
//! disagree with its name, is *damage*. Because the generation is in the file
//! name, it stays known even when the contents are lost. [`load`] therefore
//! reports two things: the newest copy whose contents are intact, and the
//! highest generation any copy's name claims. If the latter is higher, the
//! sled knows it once accepted a config it can no longer read: it must not
//! fall back to the older one (that would move it back a generation, accept a
//! stale Nexus's config, and delete whatever the newer config added). The
//! store then enforces only the generation and deletes nothing until a Nexus
//! pushes a config at least that new.
//!
//! A device whose ledger directory cannot even be listed is damage too: it
//! may hold a newer generation than any copy read. The store then enforces
//! the newest generation it could see, deleting nothing, until a Nexus
//! pushes a config at least that new (the unreadable device's own copies
//! stay unknown; Nexus's push is the best evidence of what is current).
//!
//! So is a sled with no ledger on any device that holds artifacts (or a
//! ledger under the name older sled agents used, `artifact-config.json`):
//! it once accepted a config, and the device that held the ledger is
//! unmounted, wiped or from an older release. Starting from generation 0
//! would delete every artifact; instead nothing is deleted until a push
//! (any generation, as none is known) repairs the ledger.

use crate::storage::M2;
use camino::{Utf8Path, Utf8PathBuf};
use common::{ArtifactConfig, ArtifactHash, Generation};
use std::sync::Arc;

const PREFIX: &str = "artifact-config.g";
const SUFFIX: &str = ".json";
/// The single ledger file older sled agents wrote, never read now.
const OLDER_NAME: &str = "artifact-config.json";

/// What a sled that never received a config enforces.
pub fn empty_config() -> ArtifactConfig {
    ArtifactConfig { generation: Generation::new(0), artifacts: Default::default() }
}

/// The ledger copies found on the healthy devices.
#[derive(Debug, PartialEq, Eq)]
pub struct Loaded {
    /// The newest copy whose contents are intact (generation 0 if none).
    pub newest_intact: ArtifactConfig,
    /// The highest generation any copy's file name claims.
    pub newest_named: Generation,
    /// One line per damaged copy, naming the file and the problem.
    pub damage: Vec<String>,
    /// A healthy device's ledger directory could not be listed: the
    /// generations it holds, possibly newer than any seen, are unknown.
    pub unlisted: bool,
    /// No device holds a ledger, yet a device holds artifacts or an older
    /// sled agent's ledger: some config was accepted and its record lost.
    pub unledgered: bool,
}

impl Loaded {
    /// Whether the newest generation this sled accepted may be unreadable:
    /// a copy named newer than every intact one, or a device whose copies
    /// could not even be listed.
    pub fn is_damaged(&self) -> bool {
        self.newest_named > self.newest_intact.generation || self.unlisted || self.unledgered
    }
}

pub fn path_for(m2: &M2, generation: Generation) -> Utf8PathBuf {
    m2.root().join(format!("{PREFIX}{:020}{SUFFIX}", generation.get()))
}

/// The generation a ledger file name claims, if it is one.
fn named_generation(name: &str) -> Option<Generation> {
    let digits = name.strip_prefix(PREFIX)?.strip_suffix(SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(Generation::new(digits.parse().ok()?))
}

/// The ledger files on one device, newest first.
fn ledger_files(m2: &M2) -> std::io::Result<Vec<(Generation, Utf8PathBuf)>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(m2.root())? {
        let entry = entry?;
        if let Some(generation) = entry.file_name().to_str().and_then(named_generation) {
            files.push((generation, m2.root().join(entry.file_name().to_str().expect("checked UTF-8"))));
        }
    }
    files.sort_by_key(|(generation, _)| std::cmp::Reverse(*generation));
    Ok(files)
}

/// Reads every ledger copy on the healthy devices.
pub fn load(m2s: &[Arc<M2>]) -> Loaded {
    let mut loaded = Loaded {
        newest_intact: empty_config(),
        newest_named: Generation::new(0),
        damage: Vec::new(),
        unlisted: false,
        unledgered: false,
    };
    for m2 in m2s.iter().filter(|m2| m2.is_healthy()) {
        let files = match ledger_files(m2) {
            Ok(files) => files,
            Err(error) => {
                loaded.damage.push(format!("listing the ledger directory {}: {error}", m2.root()));
                loaded.unlisted = true;
                continue;
            }
        };
        for (generation, path) in files {
            loaded.newest_named = loaded.newest_named.max(generation);
            if generation <= loaded.newest_intact.generation {
                continue;
            }
            match read_copy(&path, generation) {
                Ok(config) => loaded.newest_intact = config,
                Err(problem) => loaded.damage.push(format!("ledger {path}: {problem}")),
            }
        }
    }
    if loaded.newest_named == Generation::new(0) && !loaded.unlisted {
        for m2 in m2s.iter().filter(|m2| m2.is_healthy()) {
            let evidence = evidence_of_a_lost_ledger(m2);
            loaded.unledgered |= !evidence.is_empty();
            loaded.damage.extend(evidence);
        }
    }
    loaded
}

/// What on a device with no ledger shows that the sled had a config: an
/// older sled agent's ledger, or stored artifacts.
fn evidence_of_a_lost_ledger(m2: &M2) -> Vec<String> {
    let mut evidence = Vec::new();
    let older = m2.root().join(OLDER_NAME);
    if older.exists() {
        evidence.push(format!(
            "ledger {older}: an older sled agent's ledger name, not read by this one; no current \
             ledger on any M.2"
        ));
    }
    let artifacts = std::fs::read_dir(m2.dataset())
        .map(|entries| {
            entries
                .flatten()
                .filter(|entry| {
                    entry.file_name().to_str().is_some_and(|name| name.parse::<ArtifactHash>().is_ok())
                })
                .count()
        })
        .unwrap_or(0);
    if artifacts > 0 {
        evidence.push(format!(
            "{} holds {artifacts} artifacts but no M.2 holds a config ledger (a device unmounted, \
             wiped or replaced?)",
            m2.dataset()
        ));
    }
    evidence
}

fn read_copy(path: &Utf8Path, generation: Generation) -> Result<ArtifactConfig, String> {
    let text = std::fs::read(path).map_err(|error| format!("cannot be read: {error}"))?;
    let config: ArtifactConfig =
        serde_json::from_slice(&text).map_err(|error| format!("cannot be parsed: {error}"))?;
    if config.generation != generation {
        return Err(format!(
            "holds generation {} under the name of generation {generation}",
            config.generation
        ));
    }
    Ok(config)
}

/// Writes `config` to one device's ledger, durably, then removes that
/// device's older copies.
pub fn write_one(m2: &M2, config: &ArtifactConfig) -> std::io::Result<()> {
    let path = path_for(m2, config.generation);
    let bytes = serde_json::to_vec(config).expect("configs serialize");
    fail::fail_point!("sled_agent::ledger::before_write", |_| std::process::abort());
    common::durable::replace_file(&path, &bytes, 0o644)?;
    fail::fail_point!("sled_agent::ledger::after_write", |_| std::process::abort());
    let mut removed = false;
    for (generation, old) in ledger_files(m2)? {
        if generation < config.generation {
            std::fs::remove_file(&old)?;
            removed = true;
        }
    }
    match std::fs::remove_file(m2.root().join(OLDER_NAME)) {
        Ok(()) => removed = true,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(error),
    }
    if removed {
        common::durable::sync_dir(m2.root())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn devices(dir: &Utf8Path, count: u32) -> Vec<Arc<M2>> {
        (0..count)
            .map(|slot| {
                let m2 = M2::new(slot, dir.join(format!("m2-{slot}")), 1 << 20);
                m2.prepare(|_| false).unwrap();
                Arc::new(m2)
            })
            .collect()
    }

    fn config(generation: u64) -> ArtifactConfig {
        ArtifactConfig {
            generation: Generation::new(generation),
            artifacts: [ArtifactHash([generation as u8; 32])].into(),
        }
    }

    fn names(m2: &M2) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(m2.root())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|name| name.starts_with("artifact-config"))
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_write_replaces_older_copies_and_the_newest_wins() {
        let dir = camino_tempfile::tempdir().unwrap();
        let m2s = devices(dir.path(), 2);
        let nothing = load(&m2s);
        assert_eq!(nothing.newest_intact, empty_config());
        assert!(!nothing.is_damaged());

        write_one(&m2s[0], &config(5)).unwrap();
        write_one(&m2s[0], &config(7)).unwrap();
        write_one(&m2s[1], &config(5)).unwrap();
        assert_eq!(names(&m2s[0]), ["artifact-config.g00000000000000000007.json"]);
        let loaded = load(&m2s);
        assert_eq!((loaded.newest_intact, loaded.damage.len()), (config(7), 0));
        m2s[0].set_state(common::api::sled_agent::M2State::Failed);
        assert_eq!(load(&m2s).newest_intact, config(5), "a failed device is not read");
    }

    #[test]
    fn damage_to_the_newest_copy_keeps_its_generation_known() {
        let dir = camino_tempfile::tempdir().unwrap();
        let m2s = devices(dir.path(), 3);
        write_one(&m2s[0], &config(5)).unwrap();
        write_one(&m2s[1], &config(7)).unwrap();
        // Torn contents on one device, an unreadable file (a directory in
        // its place: EISDIR) on another, each claiming a newer generation.
        std::fs::write(path_for(&m2s[1], Generation::new(8)), b"{\"generation\": 8, \"artifa").unwrap();
        std::fs::create_dir(path_for(&m2s[2], Generation::new(9))).unwrap();
        let loaded = load(&m2s);
        assert_eq!(loaded.newest_intact, config(7));
        assert_eq!(loaded.newest_named, Generation::new(9));
        assert!(loaded.is_damaged());
        assert_eq!(loaded.damage.len(), 2, "{:?}", loaded.damage);
        assert!(loaded.damage.iter().any(|d| d.contains("m2-1") && d.contains("cannot be parsed")));
        assert!(loaded.damage.iter().any(|d| d.contains("m2-2") && d.contains("cannot be read")));
    }

    #[test]
    fn a_device_whose_ledger_cannot_be_listed_is_damage_not_absence() {
        let dir = camino_tempfile::tempdir().unwrap();
        let m2s = devices(dir.path(), 2);
        write_one(&m2s[0], &config(5)).unwrap();
        write_one(&m2s[1], &config(7)).unwrap();
        // Device 1's directory becomes unlistable (ENOTDIR): its generation
        // 7 is out of sight, and generation 5 must not pass for the newest.
        std::fs::remove_dir_all(m2s[1].root()).unwrap();
        std::fs::write(m2s[1].root(), b"not a directory").unwrap();
        let loaded = load(&m2s);
        assert_eq!(loaded.newest_intact, config(5));
        assert!(loaded.is_damaged());
        assert!(
            loaded.damage.iter().any(|d| d.contains("listing the ledger directory")),
            "{:?}",
            loaded.damage
        );
    }

    #[test]
    fn contents_that_disagree_with_the_name_are_damage() {
        let dir = camino_tempfile::tempdir().unwrap();
        let m2s = devices(dir.path(), 1);
        write_one(&m2s[0], &config(3)).unwrap();
        std::fs::write(path_for(&m2s[0], Generation::new(6)), serde_json::to_vec(&config(2)).unwrap())
            .unwrap();
        let loaded = load(&m2s);
        assert_eq!((loaded.newest_intact, loaded.newest_named), (config(3), Generation::new(6)));
        assert!(
            loaded.damage[0].contains("holds generation 2 under the name of generation 6"),
            "{:?}",
            loaded.damage
        );
    }
}
