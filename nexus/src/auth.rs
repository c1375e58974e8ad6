//! The operator's bearer token for the external API.
//!
//! The token lives in a file (mode 0600). If the file does not exist at
//! start-up, a random token is generated and written there durably (temp
//! file, fsync, link into place, directory fsync: a crash never leaves an
//! empty token file), and Nexus prints it once; several Nexus instances
//! share a token by sharing the file's contents.

use camino::{Utf8Path, Utf8PathBuf};

#[derive(Clone)]
pub struct OperatorToken(String);

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("{what} operator token file {path}")]
    Io {
        what: &'static str,
        path: Utf8PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("operator token file {path} is empty or has characters other than printable ASCII")]
    Invalid { path: Utf8PathBuf },
}

impl OperatorToken {
    /// Reads the token, or creates it. Returns whether it was created.
    pub fn load_or_create(path: &Utf8Path) -> Result<(OperatorToken, bool), TokenError> {
        let io = |what, source| TokenError::Io { what, path: path.to_owned(), source };
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let token = text.trim();
                if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
                    return Err(TokenError::Invalid { path: path.to_owned() });
                }
                Ok((OperatorToken(token.to_string()), false))
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent)
                        .map_err(|source| io("creating the directory of", source))?;
                }
                let token = hex::encode(rand::random::<[u8; 32]>());
                match common::durable::create_file(path, token.as_bytes(), 0o600) {
                    Ok(()) => Ok((OperatorToken(token), true)),
                    // Another Nexus sharing the file created it first.
                    Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {
                        Self::load_or_create(path)
                    }
                    Err(source) => Err(io("creating", source)),
                }
            }
            Err(error) => Err(io("reading", error)),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether an `Authorization` header value carries this token. Compares
    /// in time independent of where the first difference is.
    pub fn accepts(&self, authorization: Option<&str>) -> bool {
        let Some(presented) = authorization.and_then(|value| value.strip_prefix("Bearer ")) else {
            return false;
        };
        let (a, b) = (presented.trim().as_bytes(), self.0.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_token_is_created_once_with_private_permissions() {
        let dir = camino_tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/operator-token");
        let (token, created) = OperatorToken::load_or_create(&path).unwrap();
        assert!(created);
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let (again, created) = OperatorToken::load_or_create(&path).unwrap();
        assert!(!created);
        assert_eq!(again.as_str(), token.as_str());

        assert!(token.accepts(Some(&format!("Bearer {}", token.as_str()))));
        assert!(!token.accepts(None));
        assert!(!token.accepts(Some(token.as_str())), "the scheme is required");
        assert!(!token.accepts(Some("Bearer wrong")));
        std::fs::write(&path, "\n").unwrap();
        assert!(matches!(OperatorToken::load_or_create(&path), Err(TokenError::Invalid { .. })));
    }
}
