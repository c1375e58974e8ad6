//! The artifact config ledger: one JSON file per M.2, written atomically
//! (temp file, fsync, rename, fsync of the directory). At start-up the copy
//! with the highest generation that parses wins, so a torn or corrupt ledger
//! on one device never hides a good one on another.

use crate::storage::M2;
use camino::Utf8Path;
use common::{ArtifactConfig, Generation};
use std::io::Write;
use std::sync::Arc;

/// What a sled that never received a config enforces.
pub fn empty_config() -> ArtifactConfig {
    ArtifactConfig { generation: Generation::new(0), artifacts: Default::default() }
}

/// The newest valid ledger among the healthy devices, and a note for each
/// device whose ledger was unreadable.
pub fn load(m2s: &[Arc<M2>]) -> (ArtifactConfig, Vec<String>) {
    let mut best = empty_config();
    let mut problems = Vec::new();
    for m2 in m2s.iter().filter(|m2| m2.is_healthy()) {
        let path = m2.ledger_path();
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
            Err(error) => {
                problems.push(format!("reading ledger {path}: {error}"));
                continue;
            }
        };
        match serde_json::from_str::<ArtifactConfig>(&text) {
            Ok(config) if config.generation > best.generation => best = config,
            Ok(_) => {}
            Err(error) => problems.push(format!("ledger {path} is corrupt and was ignored: {error}")),
        }
    }
    (best, problems)
}

/// Writes the config to one device's ledger.
pub fn write_one(m2: &M2, config: &ArtifactConfig) -> std::io::Result<()> {
    let path = m2.ledger_path();
    let tmp = path.with_extension(format!("json.tmp-{:016x}", rand::random::<u64>()));
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&serde_json::to_vec(config).expect("configs serialize"))?;
        file.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        sync_dir(m2.root())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

pub fn sync_dir(dir: &Utf8Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::ArtifactHash;

    fn devices(dir: &Utf8Path, count: u32) -> Vec<Arc<M2>> {
        (0..count)
            .map(|slot| {
                let m2 = M2::new(slot, dir.join(format!("m2-{slot}")), 1 << 20);
                m2.prepare().unwrap();
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

    #[test]
    fn the_highest_valid_generation_wins_and_corruption_is_reported() {
        let dir = camino_tempfile::tempdir().unwrap();
        let m2s = devices(dir.path(), 3);
        assert_eq!(load(&m2s).0, empty_config());

        write_one(&m2s[0], &config(5)).unwrap();
        write_one(&m2s[1], &config(7)).unwrap();
        std::fs::write(m2s[2].ledger_path(), b"{\"generation\": 9, \"artifa").unwrap();
        let (loaded, problems) = load(&m2s);
        assert_eq!(loaded, config(7));
        assert_eq!(problems.len(), 1);
        assert!(problems[0].contains("m2-2") && problems[0].contains("corrupt"), "{problems:?}");

        m2s[1].set_state(common::api::sled_agent::M2State::Failed);
        assert_eq!(load(&m2s).0, config(5), "a failed device is not read");
    }
}
