//! A FUSE file system for power-cut tests: it keeps every write, rename and
//! unlink in memory, remembers what was last fsynced, and on a "power cut"
//! throws away everything that was not (see [`model`] for the rules).
//!
//! Killing a process cannot test durability: the kernel's page cache
//! outlives it, so a missing or misordered fsync is invisible. Here the
//! test process is the disk. A crash test mounts a [`PowerCutFs`], runs
//! the real binaries with their data directories on it, kills them
//! (SIGKILL), calls [`PowerCutFs::power_cut`] (unmount, revert to the
//! durable state, mount again, so no kernel cache survives either) and
//! restarts them.
//!
//! Mounting needs `/dev/fuse` and `fusermount3` (Debian's `fuse3`, which
//! `dev-tools/install-prerequisites` installs).

pub mod model;

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, MountOption,
    OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};
pub use model::CutReport;
use model::State;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

/// No kernel caching of names or attributes: the state changes under the
/// kernel at a cut, and tests care more about truth than speed.
const TTL: Duration = Duration::ZERO;
const BLOCK: u32 = 4096;

/// A mounted power-cut file system. Dropping it unmounts it.
pub struct PowerCutFs {
    state: Arc<Mutex<State>>,
    mountpoint: PathBuf,
    session: Option<fuser::BackgroundSession>,
}

impl PowerCutFs {
    /// Mounts an empty file system at `mountpoint` (an existing empty
    /// directory) that holds at most `capacity` bytes of file content, now
    /// and durable copies counted apart.
    pub fn mount(mountpoint: &Path, capacity: u64) -> std::io::Result<PowerCutFs> {
        let state = Arc::new(Mutex::new(State::new(capacity)));
        let session = spawn(&state, mountpoint)?;
        Ok(PowerCutFs { state, mountpoint: mountpoint.to_owned(), session: Some(session) })
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Makes everything written so far durable, as `sync(1)` would: for
    /// set-up that happened "long before" the test's cut (config files).
    pub fn sync_everything(&self) {
        lock(&self.state).sync_everything();
    }

    /// Cuts the power: unmounts (every process using the file system must
    /// be dead by now, or the unmount fails), reverts every file and
    /// directory to its last fsync, and mounts again.
    pub fn power_cut(&mut self) -> std::io::Result<CutReport> {
        if let Some(session) = self.session.take() {
            session.umount_and_join()?;
        }
        let report = lock(&self.state).power_cut();
        self.session = Some(spawn(&self.state, &self.mountpoint)?);
        Ok(report)
    }
}

fn spawn(state: &Arc<Mutex<State>>, mountpoint: &Path) -> std::io::Result<fuser::BackgroundSession> {
    let mut config = fuser::Config::default();
    // No AutoUnmount: fusermount3 then unmounts asynchronously, after the
    // session was told it is gone, and a cut would wait for it forever.
    config.mount_options = vec![MountOption::FSName("power-cut-fs".into()), MountOption::RW];
    fuser::spawn_mount(Adapter { state: state.clone() }, mountpoint, &config)
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // A panic in one request must not take the whole file system down.
    state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Turns FUSE requests into [`State`] operations.
struct Adapter {
    state: Arc<Mutex<State>>,
}

fn attr(state: &State, ino: u64) -> Result<FileAttr, i32> {
    let inode = state.get(ino)?;
    let size = inode.size();
    Ok(FileAttr {
        ino: INodeNo(ino),
        size,
        blocks: size.div_ceil(512),
        atime: inode.mtime,
        mtime: inode.mtime,
        ctime: inode.mtime,
        crtime: inode.mtime,
        kind: if inode.is_dir() { FileType::Directory } else { FileType::RegularFile },
        perm: inode.mode,
        nlink: state.nlink(ino),
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: BLOCK,
        flags: 0,
    })
}

fn errno(code: i32) -> Errno {
    Errno::from_i32(code)
}

impl Adapter {
    fn entry(&self, reply: ReplyEntry, operation: impl FnOnce(&mut State) -> Result<u64, i32>) {
        let mut state = lock(&self.state);
        match operation(&mut state).and_then(|ino| attr(&state, ino)) {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(code) => reply.error(errno(code)),
        }
    }

    fn empty(&self, reply: ReplyEmpty, operation: impl FnOnce(&mut State) -> Result<(), i32>) {
        match operation(&mut lock(&self.state)) {
            Ok(()) => reply.ok(),
            Err(code) => reply.error(errno(code)),
        }
    }
}

impl Filesystem for Adapter {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.entry(reply, |state| state.lookup(parent.0, name));
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match attr(&lock(&self.state), ino.0) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(code) => reply.error(errno(code)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut state = lock(&self.state);
        let changed = (|| {
            if let Some(mode) = mode {
                state.set_mode(ino.0, mode)?;
            }
            if let Some(size) = size {
                state.truncate(ino.0, size)?;
            }
            attr(&state, ino.0)
        })();
        match changed {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(code) => reply.error(errno(code)),
        }
    }

    fn mkdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        self.entry(reply, |state| state.create(parent.0, name, mode & !umask, true));
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.empty(reply, |state| state.unlink(parent.0, name, false));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.empty(reply, |state| state.unlink(parent.0, name, true));
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if flags.contains(RenameFlags::RENAME_EXCHANGE) || flags.contains(RenameFlags::RENAME_WHITEOUT) {
            return reply.error(Errno::EINVAL);
        }
        let no_replace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        self.empty(reply, |state| state.rename(parent.0, name, newparent.0, newname, no_replace));
    }

    fn link(&self, _req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        self.entry(reply, |state| state.link(ino.0, newparent.0, newname).map(|()| ino.0));
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let mut state = lock(&self.state);
        let opened = match state.get(ino.0) {
            Ok(_) if flags.0 & libc::O_TRUNC != 0 => state.truncate(ino.0, 0),
            Ok(_) => Ok(()),
            Err(code) => Err(code),
        };
        match opened {
            Ok(()) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Err(code) => reply.error(errno(code)),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let mut state = lock(&self.state);
        let created = match state.lookup(parent.0, name) {
            Ok(_) if flags & libc::O_EXCL != 0 => Err(libc::EEXIST),
            Ok(ino) if flags & libc::O_TRUNC != 0 => state.truncate(ino, 0).map(|()| ino),
            Ok(ino) => Ok(ino),
            Err(_) => state.create(parent.0, name, mode & !umask, false),
        };
        match created.and_then(|ino| attr(&state, ino)) {
            Ok(attr) => reply.created(&TTL, &attr, Generation(0), FileHandle(0), FopenFlags::empty()),
            Err(code) => reply.error(errno(code)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        match lock(&self.state).read(ino.0, offset, size) {
            Ok(bytes) => reply.data(bytes),
            Err(code) => reply.error(errno(code)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyWrite,
    ) {
        match lock(&self.state).write(ino.0, offset, data) {
            Ok(()) => reply.written(data.len() as u32),
            Err(code) => reply.error(errno(code)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _owner: fuser::LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        self.empty(reply, |state| state.sync(ino.0));
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let entries = match lock(&self.state).list(ino.0) {
            Ok(entries) => entries,
            Err(code) => return reply.error(errno(code)),
        };
        let dots = [(".".into(), ino.0, true), ("..".into(), ino.0, true)];
        let all = dots.into_iter().chain(entries);
        for (index, (name, child, is_dir)) in all.enumerate().skip(offset as usize) {
            let kind = if is_dir { FileType::Directory } else { FileType::RegularFile };
            if reply.add(INodeNo(child), index as u64 + 1, kind, &name) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        self.empty(reply, |state| state.sync(ino.0));
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let state = lock(&self.state);
        let blocks = state.capacity / u64::from(BLOCK);
        let free = blocks.saturating_sub(state.used() / u64::from(BLOCK));
        reply.statfs(blocks, free, free, 1 << 20, 1 << 20, BLOCK, 255, BLOCK);
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        reply.ok();
    }
}
