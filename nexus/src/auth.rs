//! The operator's bearer token for the external API.
//!
//! The token lives in a file (mode 0600). If the file does not exist at
//! start-up, a random token is generated and written there durably (temp
//! file, fsync, link into place, directory fsync: a crash never leaves an
//! empty token file), and Nexus prints it once if stdout is a terminal;
//! several Nexus instances share a token by sharing the file's contents.
//!
//! An existing file is used only if it is a regular file owned by the user
//! Nexus runs as, with mode exactly 0600. Anyone else who could read it
//! could use the token; anyone else who could write it (or who owns it and
//! so can chmod it) could choose the token.

use camino::{Utf8Path, Utf8PathBuf};
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};

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
    #[error("refusing operator token file {path}: {problem}")]
    Unsafe { path: Utf8PathBuf, problem: String },
}

impl OperatorToken {
    /// Reads the token, or creates it. Returns whether it was created.
    pub fn load_or_create(path: &Utf8Path) -> Result<(OperatorToken, bool), TokenError> {
        let io = |what, source| TokenError::Io { what, path: path.to_owned(), source };
        // The checks below are on the open file, so the file checked is the
        // file read. O_NOFOLLOW: not a link someone could point elsewhere.
        // O_NONBLOCK: a FIFO put there cannot hang start-up (it is then
        // refused as not a regular file); it changes nothing for a file.
        let opened = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(path);
        match opened {
            Ok(mut file) => {
                let metadata = file.metadata().map_err(|source| io("inspecting", source))?;
                check_ownership_and_mode(path, &metadata)?;
                let mut text = String::new();
                file.read_to_string(&mut text).map_err(|source| io("reading", source))?;
                let token = text.trim();
                if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
                    return Err(TokenError::Invalid { path: path.to_owned() });
                }
                Ok((OperatorToken(token.to_string()), false))
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                if let Some(parent) = path.parent() {
                    common::durable::create_dir_all(parent)
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
            // ELOOP is what O_NOFOLLOW answers for a symbolic link (and for
            // a loop in the directories above it, hence the check).
            Err(error)
                if error.raw_os_error() == Some(libc::ELOOP)
                    && std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) =>
            {
                Err(TokenError::Unsafe {
                    path: path.to_owned(),
                    problem: "it is a symbolic link; put the token in a regular file at this path instead \
                              (owned by the user nexus runs as, mode 0600)"
                        .into(),
                })
            }
            Err(error) => Err(io("opening", error)),
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

/// Refuses a token file that is not a regular file owned by this process's
/// effective user with mode exactly 0600.
fn check_ownership_and_mode(path: &Utf8Path, metadata: &std::fs::Metadata) -> Result<(), TokenError> {
    let refuse = |problem: String| Err(TokenError::Unsafe { path: path.to_owned(), problem });
    if !metadata.file_type().is_file() {
        return refuse("it is not a regular file; remove it and nexus generates a new token".into());
    }
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if metadata.uid() != euid {
        return refuse(format!(
            "it is owned by uid {}, not uid {euid} that nexus runs as; fix with `chown {euid} {path}`",
            metadata.uid()
        ));
    }
    let mode = metadata.mode() & 0o7777;
    if mode != 0o600 {
        return refuse(format!(
            "its mode is {mode:04o}, not 0600 (readable and writable by its owner only); \
             fix with `chmod 600 {path}`"
        ));
    }
    Ok(())
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

    /// Writes `text` to a new file at `path` with `mode` (umask aside).
    fn write_with_mode(path: &Utf8Path, text: &str, mode: u32) {
        std::fs::write(path, text).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    fn refusal(path: &Utf8Path) -> String {
        match OperatorToken::load_or_create(path) {
            Err(error @ TokenError::Unsafe { .. }) => error.to_string(),
            Err(other) => panic!("expected a refusal of {path}, got {other}"),
            Ok(_) => panic!("{path} was accepted"),
        }
    }

    #[test]
    fn a_private_token_file_is_accepted() {
        let dir = camino_tempfile::tempdir().unwrap();
        let path = dir.path().join("operator-token");
        write_with_mode(&path, "chosen-by-the-operator\n", 0o600);
        let (token, created) = OperatorToken::load_or_create(&path).unwrap();
        assert!(!created);
        assert_eq!(token.as_str(), "chosen-by-the-operator");
    }

    #[test]
    fn a_token_file_others_can_read_is_refused() {
        let dir = camino_tempfile::tempdir().unwrap();
        let path = dir.path().join("operator-token");
        for mode in [0o644, 0o640, 0o400, 0o700, 0o4600] {
            write_with_mode(&path, "secret", mode);
            let message = refusal(&path);
            let found = format!("{mode:04o}");
            assert!(
                message.contains(path.as_str()) && message.contains(&found) && message.contains("chmod 600"),
                "{message}"
            );
        }
    }

    #[test]
    fn a_token_file_that_is_a_symbolic_link_is_refused() {
        let dir = camino_tempfile::tempdir().unwrap();
        let target = dir.path().join("elsewhere");
        write_with_mode(&target, "secret", 0o600);
        let link = dir.path().join("operator-token");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let message = refusal(&link);
        assert!(message.contains(link.as_str()) && message.contains("a symbolic link"), "{message}");

        // A dangling link is refused too, rather than a token created
        // wherever it points.
        std::fs::remove_file(&target).unwrap();
        let message = refusal(&link);
        assert!(message.contains("a symbolic link"), "{message}");
        assert!(!target.exists());
    }

    #[test]
    fn a_token_file_owned_by_another_user_is_refused() {
        let dir = camino_tempfile::tempdir().unwrap();
        let path = dir.path().join("operator-token");
        write_with_mode(&path, "secret", 0o600);
        const NOBODY: u32 = 65534;
        match std::os::unix::fs::chown(&path, Some(NOBODY), None) {
            Ok(()) => {}
            // Only root can give a file away.
            Err(error) if error.raw_os_error() == Some(libc::EPERM) => {
                eprintln!("skipped: cannot chown a file to uid {NOBODY} without root");
                return;
            }
            Err(error) => panic!("chown {path}: {error}"),
        }
        let message = refusal(&path);
        // SAFETY: geteuid(2) has no preconditions and cannot fail.
        let euid = unsafe { libc::geteuid() };
        assert!(
            message.contains(path.as_str())
                && message.contains(&format!("owned by uid {NOBODY}, not uid {euid}"))
                && message.contains("chown"),
            "{message}"
        );
    }

    #[test]
    fn a_token_path_that_is_a_directory_is_refused() {
        let dir = camino_tempfile::tempdir().unwrap();
        let message = refusal(dir.path());
        assert!(message.contains("not a regular file"), "{message}");
    }
}
