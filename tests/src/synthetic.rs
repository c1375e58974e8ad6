//! Artifacts made up on the spot, for tests that talk to sled agents
//! directly (no repository, no Nexus).

use common::{ArtifactConfig, ArtifactHash, Generation};
use sha2::Digest;

/// A Nexus URL where nothing listens: sleds started with it retry their
/// registration quietly in the background.
pub const NO_NEXUS: &str = "http://127.0.0.1:1";

pub struct Artifact {
    pub bytes: Vec<u8>,
    pub hash: ArtifactHash,
}

/// `size` bytes that differ by `seed`, and their hash.
pub fn artifact(seed: u8, size: usize) -> Artifact {
    let bytes: Vec<u8> = (0..size).map(|i| ((i * 7919) as u8).wrapping_add(seed)).collect();
    let hash = ArtifactHash(sha2::Sha256::digest(&bytes).into());
    Artifact { bytes, hash }
}

pub fn config(generation: u64, artifacts: &[&Artifact]) -> ArtifactConfig {
    ArtifactConfig {
        generation: Generation::new(generation),
        artifacts: artifacts.iter().map(|a| a.hash).collect(),
    }
}
