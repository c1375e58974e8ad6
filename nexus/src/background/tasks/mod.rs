//! One module per background task; each module's doc explains its algorithm
//! and the races it defends against.

pub mod tuf_repo_pruner;
