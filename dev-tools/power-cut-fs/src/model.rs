//! The file system's state: what a process sees now, and what a disk would
//! hold after a power cut.
//!
//! The durability rules are POSIX's, taken strictly (no journal that happens
//! to commit more than was asked for):
//! - a regular file's bytes are durable as of its last `fsync` or
//!   `fdatasync`;
//! - a directory's set of names (creates, renames, links, unlinks, mkdirs in
//!   it) is durable as of its last `fsync`;
//! - after a cut every file and directory is back to its durable state, and
//!   whatever no durable name reaches from the root is gone.
//!
//! So a rename into a directory that was never fsynced is undone, and a file
//! renamed into place before its own fsync comes back with the bytes of its
//! last fsync (empty, for a new file): exactly the two losses that
//! `common::durable` exists to prevent.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::time::SystemTime;

pub const ROOT: u64 = 1;

#[derive(Debug)]
pub enum Content {
    File { now: Vec<u8>, durable: Vec<u8> },
    Dir { now: BTreeMap<OsString, u64>, durable: BTreeMap<OsString, u64> },
}

#[derive(Debug)]
pub struct Inode {
    pub content: Content,
    pub mode: u16,
    pub mtime: SystemTime,
}

impl Inode {
    fn new(content: Content, mode: u32) -> Inode {
        Inode { content, mode: (mode & 0o7777) as u16, mtime: SystemTime::now() }
    }

    pub fn is_dir(&self) -> bool {
        matches!(self.content, Content::Dir { .. })
    }

    pub fn size(&self) -> u64 {
        match &self.content {
            Content::File { now, .. } => now.len() as u64,
            Content::Dir { now, .. } => now.len() as u64,
        }
    }
}

/// What a cut threw away, so a test can show that its cut was a real one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CutReport {
    /// Files whose bytes went back to an older fsync.
    pub files_reverted: usize,
    /// Directories whose names went back to an older fsync.
    pub dirs_reverted: usize,
    /// Files and directories no durable name reaches any more.
    pub inodes_lost: usize,
}

#[derive(Debug)]
pub struct State {
    inodes: HashMap<u64, Inode>,
    next_ino: u64,
    /// Bytes of file content held (current and durable): the whole file
    /// system lives in the test process's memory, so writes past
    /// `capacity` fail with ENOSPC.
    used: u64,
    pub capacity: u64,
}

pub type Errno = i32;

impl State {
    pub fn new(capacity: u64) -> State {
        let root = Inode::new(Content::Dir { now: BTreeMap::new(), durable: BTreeMap::new() }, 0o755);
        State { inodes: HashMap::from([(ROOT, root)]), next_ino: ROOT + 1, used: 0, capacity }
    }

    /// Bytes of file content held, now and durable copies counted apart.
    pub fn used(&self) -> u64 {
        self.used
    }

    pub fn get(&self, ino: u64) -> Result<&Inode, Errno> {
        self.inodes.get(&ino).ok_or(libc::ENOENT)
    }

    fn get_mut(&mut self, ino: u64) -> Result<&mut Inode, Errno> {
        self.inodes.get_mut(&ino).ok_or(libc::ENOENT)
    }

    /// Links to an inode from current directory entries (what `stat` shows).
    pub fn nlink(&self, ino: u64) -> u32 {
        if self.inodes.get(&ino).is_some_and(Inode::is_dir) {
            return 2;
        }
        let links = self.inodes.values().map(|inode| match &inode.content {
            Content::Dir { now, .. } => now.values().filter(|&&target| target == ino).count(),
            Content::File { .. } => 0,
        });
        links.sum::<usize>() as u32
    }

    fn entries(&self, dir: u64) -> Result<&BTreeMap<OsString, u64>, Errno> {
        match &self.get(dir)?.content {
            Content::Dir { now, .. } => Ok(now),
            Content::File { .. } => Err(libc::ENOTDIR),
        }
    }

    fn entries_mut(&mut self, dir: u64) -> Result<&mut BTreeMap<OsString, u64>, Errno> {
        match &mut self.get_mut(dir)?.content {
            Content::Dir { now, .. } => Ok(now),
            Content::File { .. } => Err(libc::ENOTDIR),
        }
    }

    pub fn lookup(&self, dir: u64, name: &OsStr) -> Result<u64, Errno> {
        self.entries(dir)?.get(name).copied().ok_or(libc::ENOENT)
    }

    pub fn list(&self, dir: u64) -> Result<Vec<(OsString, u64, bool)>, Errno> {
        let entries = self.entries(dir)?;
        Ok(entries.iter().map(|(name, &ino)| (name.clone(), ino, self.inodes[&ino].is_dir())).collect())
    }

    /// Creates a file or directory named `name` in `dir`.
    pub fn create(&mut self, dir: u64, name: &OsStr, mode: u32, is_dir: bool) -> Result<u64, Errno> {
        if self.entries(dir)?.contains_key(name) {
            return Err(libc::EEXIST);
        }
        let content = if is_dir {
            Content::Dir { now: BTreeMap::new(), durable: BTreeMap::new() }
        } else {
            Content::File { now: Vec::new(), durable: Vec::new() }
        };
        let ino = self.next_ino;
        self.next_ino += 1;
        self.inodes.insert(ino, Inode::new(content, mode));
        self.entries_mut(dir)?.insert(name.to_owned(), ino);
        self.touch(dir);
        Ok(ino)
    }

    pub fn link(&mut self, ino: u64, dir: u64, name: &OsStr) -> Result<(), Errno> {
        if self.get(ino)?.is_dir() {
            return Err(libc::EPERM);
        }
        if self.entries(dir)?.contains_key(name) {
            return Err(libc::EEXIST);
        }
        self.entries_mut(dir)?.insert(name.to_owned(), ino);
        self.touch(dir);
        Ok(())
    }

    /// Removes a name. The inode stays while a durable entry could bring it
    /// back; `power_cut` drops what nothing reaches.
    pub fn unlink(&mut self, dir: u64, name: &OsStr, want_dir: bool) -> Result<(), Errno> {
        let ino = self.lookup(dir, name)?;
        let target = self.get(ino)?;
        match (want_dir, target.is_dir()) {
            (false, true) => return Err(libc::EISDIR),
            (true, false) => return Err(libc::ENOTDIR),
            (true, true) if target.size() > 0 => return Err(libc::ENOTEMPTY),
            _ => {}
        }
        self.entries_mut(dir)?.remove(name);
        self.touch(dir);
        Ok(())
    }

    pub fn rename(
        &mut self,
        dir: u64,
        name: &OsStr,
        new_dir: u64,
        new_name: &OsStr,
        no_replace: bool,
    ) -> Result<(), Errno> {
        let ino = self.lookup(dir, name)?;
        self.entries(new_dir)?;
        if let Ok(existing) = self.lookup(new_dir, new_name) {
            if existing == ino {
                return Ok(());
            }
            if no_replace {
                return Err(libc::EEXIST);
            }
            let existing = self.get(existing)?;
            match (self.get(ino)?.is_dir(), existing.is_dir()) {
                (true, false) => return Err(libc::ENOTDIR),
                (false, true) => return Err(libc::EISDIR),
                (true, true) if existing.size() > 0 => return Err(libc::ENOTEMPTY),
                _ => {}
            }
        }
        self.entries_mut(dir)?.remove(name);
        self.entries_mut(new_dir)?.insert(new_name.to_owned(), ino);
        self.touch(dir);
        self.touch(new_dir);
        Ok(())
    }

    pub fn read(&self, ino: u64, offset: u64, size: u32) -> Result<&[u8], Errno> {
        match &self.get(ino)?.content {
            Content::File { now, .. } => {
                let start = (offset as usize).min(now.len());
                let end = start.saturating_add(size as usize).min(now.len());
                Ok(&now[start..end])
            }
            Content::Dir { .. } => Err(libc::EISDIR),
        }
    }

    pub fn write(&mut self, ino: u64, offset: u64, bytes: &[u8]) -> Result<(), Errno> {
        let end = offset.checked_add(bytes.len() as u64).ok_or(libc::EFBIG)?;
        self.resize_to_at_least(ino, end)?;
        let Content::File { now, .. } = &mut self.get_mut(ino)?.content else { return Err(libc::EISDIR) };
        now[offset as usize..end as usize].copy_from_slice(bytes);
        self.touch(ino);
        Ok(())
    }

    fn resize_to_at_least(&mut self, ino: u64, len: u64) -> Result<(), Errno> {
        let current = self.get(ino)?.size();
        if len > current { self.truncate(ino, len) } else { Ok(()) }
    }

    pub fn truncate(&mut self, ino: u64, len: u64) -> Result<(), Errno> {
        let current = self.get(ino)?.size();
        let (used, capacity) = (self.used, self.capacity);
        let Content::File { now, .. } = &mut self.get_mut(ino)?.content else { return Err(libc::EISDIR) };
        let grown = len.saturating_sub(current);
        if used + grown > capacity {
            return Err(libc::ENOSPC);
        }
        now.resize(len as usize, 0);
        self.used = used + grown - current.saturating_sub(len);
        self.touch(ino);
        Ok(())
    }

    pub fn set_mode(&mut self, ino: u64, mode: u32) -> Result<(), Errno> {
        self.get_mut(ino)?.mode = (mode & 0o7777) as u16;
        Ok(())
    }

    /// `fsync` (or `fdatasync`) on a file or a directory.
    pub fn sync(&mut self, ino: u64) -> Result<(), Errno> {
        let (old, new) = match &mut self.get_mut(ino)?.content {
            Content::File { now, durable } => {
                let old = durable.len() as u64;
                durable.clone_from(now);
                (old, durable.len() as u64)
            }
            Content::Dir { now, durable } => {
                durable.clone_from(now);
                (0, 0)
            }
        };
        self.used = self.used + new - old;
        Ok(())
    }

    /// What `sync(1)` would do: everything written so far is durable.
    pub fn sync_everything(&mut self) {
        let inodes: Vec<u64> = self.inodes.keys().copied().collect();
        for ino in inodes {
            self.sync(ino).expect("the inode exists");
        }
    }

    /// Every file and directory goes back to its durable state; what no
    /// durable name reaches from the root is gone.
    pub fn power_cut(&mut self) -> CutReport {
        let mut report = CutReport::default();
        for inode in self.inodes.values_mut() {
            match &mut inode.content {
                Content::File { now, durable } if now != durable => {
                    now.clone_from(durable);
                    report.files_reverted += 1;
                }
                Content::Dir { now, durable } if now != durable => {
                    now.clone_from(durable);
                    report.dirs_reverted += 1;
                }
                _ => {}
            }
        }
        let mut reachable = HashSet::from([ROOT]);
        let mut pending = vec![ROOT];
        while let Some(ino) = pending.pop() {
            if let Content::Dir { now, .. } = &self.inodes[&ino].content {
                pending.extend(now.values().filter(|&&child| reachable.insert(child)));
            }
        }
        let before = self.inodes.len();
        self.inodes.retain(|ino, _| reachable.contains(ino));
        report.inodes_lost = before - self.inodes.len();
        self.used = self
            .inodes
            .values()
            .map(|inode| match &inode.content {
                Content::File { now, durable } => (now.len() + durable.len()) as u64,
                Content::Dir { .. } => 0,
            })
            .sum();
        report
    }

    fn touch(&mut self, ino: u64) {
        if let Some(inode) = self.inodes.get_mut(&ino) {
            inode.mtime = SystemTime::now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(text: &str) -> &OsStr {
        OsStr::new(text)
    }

    fn file_with(state: &mut State, dir: u64, file: &str, bytes: &[u8]) -> u64 {
        let ino = state.create(dir, name(file), 0o644, false).unwrap();
        state.write(ino, 0, bytes).unwrap();
        ino
    }

    #[test]
    fn a_file_never_fsynced_nor_its_directory_is_gone() {
        let mut state = State::new(1 << 20);
        file_with(&mut state, ROOT, "a", b"bytes");
        let report = state.power_cut();
        assert_eq!(state.lookup(ROOT, name("a")), Err(libc::ENOENT));
        assert_eq!(report, CutReport { files_reverted: 1, dirs_reverted: 1, inodes_lost: 1 });
    }

    #[test]
    fn a_file_named_durably_but_never_fsynced_comes_back_empty() {
        let mut state = State::new(1 << 20);
        file_with(&mut state, ROOT, "a", b"bytes");
        state.sync(ROOT).unwrap();
        state.power_cut();
        let ino = state.lookup(ROOT, name("a")).unwrap();
        assert_eq!(state.read(ino, 0, 100).unwrap(), b"");
    }

    #[test]
    fn fsync_then_rename_then_directory_fsync_survives() {
        let mut state = State::new(1 << 20);
        let ino = file_with(&mut state, ROOT, "tmp", b"new");
        state.sync(ino).unwrap();
        state.rename(ROOT, name("tmp"), ROOT, name("final"), false).unwrap();
        state.sync(ROOT).unwrap();
        state.write(ino, 0, b"NEW, unsynced").unwrap();
        state.power_cut();
        assert_eq!(state.lookup(ROOT, name("tmp")), Err(libc::ENOENT));
        let ino = state.lookup(ROOT, name("final")).unwrap();
        assert_eq!(state.read(ino, 0, 100).unwrap(), b"new");
    }

    #[test]
    fn a_rename_without_the_directory_fsync_is_undone() {
        let mut state = State::new(1 << 20);
        let old = file_with(&mut state, ROOT, "final", b"old");
        state.sync(old).unwrap();
        state.sync(ROOT).unwrap();
        let new = file_with(&mut state, ROOT, "tmp", b"new");
        state.sync(new).unwrap();
        state.rename(ROOT, name("tmp"), ROOT, name("final"), false).unwrap();
        let report = state.power_cut();
        let ino = state.lookup(ROOT, name("final")).unwrap();
        assert_eq!(state.read(ino, 0, 100).unwrap(), b"old");
        assert_eq!(report.inodes_lost, 1);
    }

    #[test]
    fn a_directory_created_but_not_fsynced_into_its_parent_takes_its_files_along() {
        let mut state = State::new(1 << 20);
        let dir = state.create(ROOT, name("artifacts"), 0o755, true).unwrap();
        let ino = file_with(&mut state, dir, "a", b"bytes");
        state.sync(ino).unwrap();
        state.sync(dir).unwrap();
        state.power_cut();
        assert_eq!(state.lookup(ROOT, name("artifacts")), Err(libc::ENOENT));
    }

    #[test]
    fn an_unlink_not_fsynced_is_undone_and_a_hard_link_survives_its_source() {
        let mut state = State::new(1 << 20);
        let ino = file_with(&mut state, ROOT, "tmp", b"token");
        state.sync(ino).unwrap();
        state.link(ino, ROOT, name("token")).unwrap();
        state.unlink(ROOT, name("tmp"), false).unwrap();
        assert_eq!(state.nlink(ino), 1);
        state.sync(ROOT).unwrap();
        state.unlink(ROOT, name("token"), false).unwrap();
        state.power_cut();
        assert_eq!(state.lookup(ROOT, name("tmp")), Err(libc::ENOENT));
        assert_eq!(state.read(state.lookup(ROOT, name("token")).unwrap(), 0, 9).unwrap(), b"token");
    }

    #[test]
    fn names_follow_posix_errors() {
        let mut state = State::new(1 << 20);
        let dir = state.create(ROOT, name("d"), 0o755, true).unwrap();
        file_with(&mut state, dir, "f", b"");
        file_with(&mut state, ROOT, "g", b"");
        assert_eq!(state.create(ROOT, name("d"), 0o644, false), Err(libc::EEXIST));
        assert_eq!(state.unlink(ROOT, name("d"), true), Err(libc::ENOTEMPTY));
        assert_eq!(state.unlink(ROOT, name("d"), false), Err(libc::EISDIR));
        assert_eq!(state.unlink(dir, name("f"), true), Err(libc::ENOTDIR));
        assert_eq!(state.rename(ROOT, name("g"), ROOT, name("d"), false), Err(libc::EISDIR));
        assert_eq!(state.rename(dir, name("f"), ROOT, name("g"), true), Err(libc::EEXIST));
        state.rename(dir, name("f"), ROOT, name("g"), false).unwrap();
        state.unlink(ROOT, name("d"), true).unwrap();
        assert_eq!(state.list(ROOT).unwrap().len(), 1);
    }

    #[test]
    fn content_is_bounded_by_the_capacity() {
        let mut state = State::new(10);
        let ino = file_with(&mut state, ROOT, "a", b"12345");
        assert_eq!(state.write(ino, 5, b"678901"), Err(libc::ENOSPC));
        state.truncate(ino, 0).unwrap();
        state.write(ino, 0, b"1234567890").unwrap();
        assert_eq!(state.read(ino, 8, 10).unwrap(), b"90");
    }
}
