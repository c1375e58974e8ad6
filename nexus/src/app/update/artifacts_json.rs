//! `artifacts.json`, the target that says which other targets are artifacts
//! and what operators call them (DESIGN §8):
//!
//! ```json
//! {"system_version": "1.2.3",
//!  "artifacts": [{"name": "...", "version": "...", "kind": "...", "target": "..."}]}
//! ```

use common::ArtifactId;
use serde::Deserialize;
use std::collections::BTreeSet;

/// The name of the target that describes the others.
pub const TARGET_NAME: &str = "artifacts.json";
/// artifacts.json is read into memory; it is a short list.
pub const MAX_BYTES: u64 = 1 << 20;

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ArtifactsDocument {
    pub system_version: String,
    pub artifacts: Vec<ArtifactEntry>,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ArtifactEntry {
    pub name: String,
    pub version: String,
    pub kind: String,
    /// The target name in targets.json.
    pub target: String,
}

impl ArtifactEntry {
    pub fn id(&self) -> ArtifactId {
        ArtifactId { name: self.name.clone(), version: self.version.clone(), kind: self.kind.clone() }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArtifactsJsonError {
    #[error("{TARGET_NAME} is not valid: {0}")]
    Malformed(String),
    #[error("{TARGET_NAME} lists no artifacts")]
    Empty,
    #[error("{TARGET_NAME} has an empty {field}")]
    EmptyField { field: &'static str },
    #[error("{TARGET_NAME} lists artifact {0} more than once")]
    Duplicate(ArtifactId),
}

pub fn parse(bytes: &[u8]) -> Result<ArtifactsDocument, ArtifactsJsonError> {
    let document: ArtifactsDocument =
        serde_json::from_slice(bytes).map_err(|error| ArtifactsJsonError::Malformed(error.to_string()))?;
    if document.system_version.trim().is_empty() {
        return Err(ArtifactsJsonError::EmptyField { field: "system_version" });
    }
    if document.artifacts.is_empty() {
        return Err(ArtifactsJsonError::Empty);
    }
    let mut seen = BTreeSet::new();
    for entry in &document.artifacts {
        for (field, value) in [
            ("name", &entry.name),
            ("version", &entry.version),
            ("kind", &entry.kind),
            ("target", &entry.target),
        ] {
            if value.trim().is_empty() {
                return Err(ArtifactsJsonError::EmptyField { field });
            }
        }
        if !seen.insert(entry.id()) {
            return Err(ArtifactsJsonError::Duplicate(entry.id()));
        }
    }
    Ok(document)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_good_document_parses() {
        let document = parse(
            br#"{"system_version": "1.0.0", "artifacts": [
                {"name": "os", "version": "1", "kind": "host", "target": "os.img"}]}"#,
        )
        .unwrap();
        assert_eq!(document.artifacts[0].target, "os.img");
    }

    #[test]
    fn bad_documents_say_what_is_wrong() {
        let error = |text: &str| parse(text.as_bytes()).unwrap_err().to_string();
        assert!(error("not json").starts_with("artifacts.json is not valid"));
        assert!(
            error(r#"{"system_version": "1", "artifacts": [], "extra": 1}"#)
                .contains("unknown field `extra`")
        );
        assert_eq!(error(r#"{"system_version": "1", "artifacts": []}"#), "artifacts.json lists no artifacts");
        assert_eq!(
            error(
                r#"{"system_version": " ", "artifacts": [{"name":"a","version":"1","kind":"k","target":"t"}]}"#
            ),
            "artifacts.json has an empty system_version"
        );
        let twice = r#"{"system_version": "1", "artifacts": [
            {"name":"a","version":"1","kind":"k","target":"t1"},
            {"name":"a","version":"1","kind":"k","target":"t2"}]}"#;
        assert_eq!(error(twice), "artifacts.json lists artifact a 1 (k) more than once");
        let missing_field =
            r#"{"system_version": "1", "artifacts": [{"name":"a","version":"1","kind":"k"}]}"#;
        assert!(error(missing_field).contains("missing field `target`"));
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn arbitrary_documents_never_panic(text in ".{0,400}") {
            let _ = parse(text.as_bytes());
        }

        #[test]
        fn near_valid_documents_are_checked(name in "[a-z ]{0,8}", target in "[a-z.]{0,8}", twice in any::<bool>()) {
            let entry = serde_json::json!({"name": name, "version": "1", "kind": "k", "target": target});
            let entries = if twice { vec![entry.clone(), entry] } else { vec![entry] };
            let text = serde_json::json!({"system_version": "1.0.0", "artifacts": entries}).to_string();
            let parsed = parse(text.as_bytes());
            let valid = !name.trim().is_empty() && !target.trim().is_empty() && !twice;
            prop_assert_eq!(parsed.is_ok(), valid, "{:?}", parsed);
        }
    }
}
