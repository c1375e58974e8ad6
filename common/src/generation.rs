//! The artifact configuration generation.
//!
//! One counter, stored in the database (`tuf_generation`), orders every change
//! to the set of artifacts the rack must hold. Sled agents refuse configs and
//! requests from an older generation, which is what keeps a slow Nexus from
//! undoing a faster one's work.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::fmt;

/// A generation number: starts at 1 and only ever goes up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(transparent)]
pub struct Generation(u64);

impl Generation {
    pub const FIRST: Generation = Generation(1);

    pub const fn new(value: u64) -> Generation {
        Generation(value)
    }

    pub const fn get(self) -> u64 {
        self.0
    }

    #[must_use]
    pub const fn next(self) -> Generation {
        Generation(self.0 + 1)
    }
}

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}
