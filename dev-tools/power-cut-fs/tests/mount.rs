//! The file system through the kernel: real system calls on a real mount,
//! then a cut.

use power_cut_fs::PowerCutFs;
use std::io::Write;

fn write(path: &std::path::Path, bytes: &[u8], fsync: bool) {
    let mut file = std::fs::File::create(path).unwrap();
    file.write_all(bytes).unwrap();
    if fsync {
        file.sync_all().unwrap();
    }
}

fn fsync_dir(path: &std::path::Path) {
    std::fs::File::open(path).unwrap().sync_all().unwrap();
}

#[test]
fn only_what_was_fsynced_survives_a_cut() {
    let dir = tempfile::tempdir().unwrap();
    let mut fs = PowerCutFs::mount(dir.path(), 64 << 20).unwrap();
    let root = fs.mountpoint().to_owned();
    std::fs::create_dir(root.join("data")).unwrap();
    fsync_dir(&root);
    let data = root.join("data");

    // A big file through several FUSE writes, read back before the cut.
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    write(&data.join("big"), &big, true);
    fsync_dir(&data);
    // The durable way: fsync, rename, fsync the directory.
    write(&data.join("durable.tmp"), b"durable", true);
    std::fs::rename(data.join("durable.tmp"), data.join("durable")).unwrap();
    fsync_dir(&data);
    // Renamed durably, never fsynced itself.
    write(&data.join("empty.tmp"), b"lost bytes", false);
    std::fs::rename(data.join("empty.tmp"), data.join("empty")).unwrap();
    fsync_dir(&data);
    // Fsynced, renamed, directory never fsynced again.
    write(&data.join("unnamed.tmp"), b"unnamed", true);
    std::fs::rename(data.join("unnamed.tmp"), data.join("unnamed")).unwrap();
    assert_eq!(std::fs::read(data.join("big")).unwrap(), big);
    assert_eq!(std::fs::read(data.join("empty")).unwrap(), b"lost bytes");

    let report = fs.power_cut().unwrap();
    assert_eq!(report.files_reverted, 1, "{report:?}");
    assert_eq!(report.dirs_reverted, 1, "{report:?}");
    assert_eq!(report.inodes_lost, 1, "{report:?}");
    assert_eq!(std::fs::read(data.join("durable")).unwrap(), b"durable");
    assert_eq!(std::fs::read(data.join("empty")).unwrap(), b"", "no fsync: the bytes are gone");
    assert!(!data.join("unnamed").exists(), "no directory fsync: the name is gone");
    assert!(!data.join("unnamed.tmp").exists(), "nor the old one, which was never durable");
    assert_eq!(std::fs::read(data.join("big")).unwrap(), big);

    // Still a working file system after the cut.
    std::fs::write(data.join("after"), b"x").unwrap();
    assert_eq!(std::fs::read(data.join("after")).unwrap(), b"x");
}

#[test]
fn hard_links_set_len_and_modes_behave() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let mut fs = PowerCutFs::mount(dir.path(), 64 << 20).unwrap();
    let root = fs.mountpoint().to_owned();
    write(&root.join("tmp"), b"token", true);
    std::fs::set_permissions(root.join("tmp"), std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::hard_link(root.join("tmp"), root.join("token")).unwrap();
    assert_eq!(
        std::fs::hard_link(root.join("tmp"), root.join("token")).unwrap_err().kind(),
        std::io::ErrorKind::AlreadyExists
    );
    std::fs::remove_file(root.join("tmp")).unwrap();
    fsync_dir(&root);
    let file = std::fs::OpenOptions::new().write(true).open(root.join("token")).unwrap();
    file.set_len(2).unwrap();
    drop(file);
    assert_eq!(std::fs::read(root.join("token")).unwrap(), b"to");
    fs.power_cut().unwrap();
    assert_eq!(std::fs::read(root.join("token")).unwrap(), b"token", "set_len was never fsynced");
    assert_eq!(std::fs::metadata(root.join("token")).unwrap().permissions().mode() & 0o777, 0o600);
    let names: Vec<_> = std::fs::read_dir(&root).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, ["token"]);
}
