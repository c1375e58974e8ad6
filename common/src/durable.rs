//! Writing files so that what an answer acknowledged survives a power cut
//! (DESIGN §11).
//!
//! The rule is the same everywhere: write a temp file in the destination's
//! directory, fsync it, rename it into place, then fsync the directory. Before
//! the rename nothing under the final name changed; after the directory fsync
//! the final name holds all of the new bytes, whatever happens next. Without
//! the first fsync a power cut can leave the new name pointing at an empty or
//! partial file; without the second, at nothing.
//!
//! `tests/tests/power_cut_ordering.rs` checks this order in the system calls of the
//! real `nexus` and `sled-agent` binaries.

use camino::{Utf8Path, Utf8PathBuf};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;

/// Flushes a directory's entries (a rename or unlink in it) to disk.
pub fn sync_dir(dir: &Utf8Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Creates `dir` and its missing parents, each new directory fsynced into
/// its parent: a power cut cannot take away a directory, and with it
/// everything later written durably inside it. The parent of an existing
/// `dir` is fsynced too, in case a crash came between an earlier run's
/// mkdir and its fsync.
pub fn create_dir_all(dir: &Utf8Path) -> std::io::Result<()> {
    let parent_dir = parent(dir);
    if !parent_dir.is_dir() {
        create_dir_all(parent_dir)?;
    }
    match std::fs::create_dir(dir) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => {}
        Err(error) => return Err(error),
    }
    sync_dir(parent_dir)
}

/// Renames an already-fsynced file into place and makes the rename durable.
pub fn rename_and_sync(from: &Utf8Path, to: &Utf8Path) -> std::io::Result<()> {
    std::fs::rename(from, to)?;
    sync_dir(parent(to))
}

/// Replaces `path` with `bytes`: afterwards the path holds all of the new
/// contents or, after a crash, all of the old ones.
pub fn replace_file(path: &Utf8Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let tmp = write_temp(path, bytes, mode)?;
    rename_and_sync(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// Creates `path` with `bytes` unless it exists (`AlreadyExists` then, and
/// the existing file is untouched): several processes racing to create one
/// file agree on one winner, and nobody ever sees it partly written.
pub fn create_file(path: &Utf8Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let tmp = write_temp(path, bytes, mode)?;
    // A hard link, unlike rename, refuses to replace an existing name.
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    linked?;
    sync_dir(parent(path))
}

/// Writes and fsyncs a new temp file beside `path`.
fn write_temp(path: &Utf8Path, bytes: &[u8], mode: u32) -> std::io::Result<Utf8PathBuf> {
    let name = path.file_name().unwrap_or("file");
    let tmp = parent(path).join(format!(".{name}.tmp-{:016x}", rand::random::<u64>()));
    let written = (|| {
        let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()
    })();
    match written {
        Ok(()) => Ok(tmp),
        Err(error) => {
            let _ = std::fs::remove_file(&tmp);
            Err(error)
        }
    }
}

fn parent(path: &Utf8Path) -> &Utf8Path {
    match path.parent() {
        Some(parent) if !parent.as_str().is_empty() => parent,
        _ => Utf8Path::new("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn create_refuses_to_replace_and_replace_does() {
        let dir = camino_tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        create_file(&path, b"first", 0o600).unwrap();
        let error = create_file(&path, b"second", 0o600).unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&path).unwrap(), b"first");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        replace_file(&path, b"third", 0o644).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"third");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["token"], "no temp file is left behind");
    }

    #[test]
    fn create_dir_all_makes_missing_parents_and_accepts_existing_ones() {
        let dir = camino_tempfile::tempdir().unwrap();
        let nested = dir.path().join("a/b/c");
        create_dir_all(&nested).unwrap();
        assert!(nested.is_dir());
        create_dir_all(&nested).unwrap();
        std::fs::write(dir.path().join("file"), b"").unwrap();
        let error = create_dir_all(&dir.path().join("file")).unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::AlreadyExists);
    }
}
