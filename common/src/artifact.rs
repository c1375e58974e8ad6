//! Artifact identity: the content hash every store is keyed by, and the
//! (name, version, kind) triple operators know artifacts by.

use crate::Generation;
use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

/// The SHA-256 of an artifact's bytes. Displayed, parsed and serialized as 64
/// lowercase hex digits, which is also the artifact's file name on a sled.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ArtifactHash(pub [u8; 32]);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArtifactHashParseError {
    #[error("artifact hash {input:?} must be 64 hex digits, found {len} characters")]
    Length { input: String, len: usize },
    #[error("artifact hash {input:?} must be lowercase hex digits (0-9, a-f)")]
    NotLowercaseHex { input: String },
}

impl FromStr for ArtifactHash {
    type Err = ArtifactHashParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 64 {
            return Err(ArtifactHashParseError::Length {
                input: s.chars().take(80).collect(),
                len: s.chars().count(),
            });
        }
        // Uppercase is refused rather than folded: the hash is a file name on
        // the sleds, and two spellings of one name would be two files.
        if !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(ArtifactHashParseError::NotLowercaseHex { input: s.to_string() });
        }
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(s, &mut bytes).expect("validated as 64 lowercase hex digits above");
        Ok(ArtifactHash(bytes))
    }
}

impl fmt::Display for ArtifactHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for ArtifactHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ArtifactHash({self})")
    }
}

impl Serialize for ArtifactHash {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for ArtifactHash {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for ArtifactHash {
    fn schema_name() -> String {
        "ArtifactHash".to_string()
    }

    fn json_schema(_: &mut schemars::r#gen::SchemaGenerator) -> schemars::schema::Schema {
        schemars::schema::SchemaObject {
            instance_type: Some(schemars::schema::InstanceType::String.into()),
            string: Some(Box::new(schemars::schema::StringValidation {
                max_length: Some(64),
                min_length: Some(64),
                pattern: Some("^[0-9a-f]{64}$".to_string()),
            })),
            ..Default::default()
        }
        .into()
    }
}

/// How operators name an artifact. Unique across all repositories: the same
/// triple must always mean the same bytes.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema)]
pub struct ArtifactId {
    pub name: String,
    pub version: String,
    pub kind: String,
}

impl fmt::Display for ArtifactId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} ({})", self.name, self.version, self.kind)
    }
}

/// The set of artifacts every sled must hold, at a generation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ArtifactConfig {
    pub generation: Generation,
    pub artifacts: BTreeSet<ArtifactHash>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    #[test]
    fn hash_round_trips_through_text_and_json() {
        let hash: ArtifactHash = HASH.parse().unwrap();
        assert_eq!(hash.to_string(), HASH);
        let json = serde_json::to_string(&hash).unwrap();
        assert_eq!(json, format!("\"{HASH}\""));
        assert_eq!(serde_json::from_str::<ArtifactHash>(&json).unwrap(), hash);
    }

    #[test]
    fn hash_rejects_wrong_length_and_case() {
        assert_eq!(
            "abc".parse::<ArtifactHash>().unwrap_err(),
            ArtifactHashParseError::Length { input: "abc".into(), len: 3 }
        );
        let upper = HASH.to_uppercase();
        let err = upper.parse::<ArtifactHash>().unwrap_err();
        assert!(err.to_string().contains("lowercase"), "{err}");
        let traversal = format!("../{}", &HASH[3..]);
        assert!(traversal.parse::<ArtifactHash>().is_err());
        assert!(serde_json::from_str::<ArtifactHash>("\"xyz\"").is_err());
    }
}
