//! Types shared by every crate of the rack control plane: Nexus, the sled
//! agent, omdb and the dev tools. Anything that crosses a process boundary
//! (HTTP bodies, database rows shown by omdb) is defined here once.

pub mod artifact;
pub mod generation;

pub use artifact::{ArtifactConfig, ArtifactHash, ArtifactHashParseError, ArtifactId};
pub use generation::Generation;
