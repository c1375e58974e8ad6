//! Zips written byte by byte, for tests of what careful zip writers refuse
//! to produce: duplicate or unsafe names, renaming extra fields, local
//! headers that disagree with the central directory, ZIP64 end records,
//! data before the archive with its offsets fixed up, a second end record.
//! Entries are stored (not compressed).

const LOCAL_SIGNATURE: u32 = 0x0403_4b50;
const CENTRAL_SIGNATURE: u32 = 0x0201_4b50;
const EOCD_SIGNATURE: u32 = 0x0605_4b50;
const ZIP64_EOCD_SIGNATURE: u32 = 0x0606_4b50;
const ZIP64_LOCATOR_SIGNATURE: u32 = 0x0706_4b50;
const ZIP64_EOCD_LEN: u64 = 56;
/// The Info-ZIP Unicode Path extra field: renames an entry for readers that
/// honour it.
pub const UNICODE_PATH_EXTRA: u16 = 0x7075;

#[derive(Clone, Debug, Default)]
pub struct RawEntry {
    pub name: String,
    pub data: Vec<u8>,
    /// Extra-field bytes, in both headers.
    pub extra: Vec<u8>,
    /// A different name for the local header only.
    pub local_name: Option<String>,
}

impl RawEntry {
    pub fn new(name: &str, data: &[u8]) -> RawEntry {
        RawEntry { name: name.to_string(), data: data.to_vec(), ..RawEntry::default() }
    }

    /// Adds an extra field with this id and contents.
    pub fn with_extra(mut self, id: u16, contents: &[u8]) -> RawEntry {
        self.extra.extend_from_slice(&id.to_le_bytes());
        self.extra.extend_from_slice(&(contents.len() as u16).to_le_bytes());
        self.extra.extend_from_slice(contents);
        self
    }

    /// A Unicode Path extra field renaming the entry to `name`.
    pub fn renamed_to(self, name: &str) -> RawEntry {
        let contents = [&[1u8][..], &crc32(self.name.as_bytes()).to_le_bytes(), name.as_bytes()].concat();
        self.with_extra(UNICODE_PATH_EXTRA, &contents)
    }
}

/// Stored entries, the central directory, and the end record; `zip64` adds
/// ZIP64 end records (the classic record then says 0xffff / 0xffffffff).
pub fn build(entries: &[RawEntry], zip64: bool) -> Vec<u8> {
    let mut out = Vec::new();
    let mut central = Vec::new();
    for entry in entries {
        let offset = out.len() as u32;
        let crc = crc32(&entry.data);
        let local_name = entry.local_name.as_deref().unwrap_or(&entry.name);
        let sizes = [crc, entry.data.len() as u32, entry.data.len() as u32];
        out.extend(LOCAL_SIGNATURE.to_le_bytes());
        out.extend([20, 0, 0, 0, 0, 0, 0, 0, 0, 0]); // version, flags, stored, time, date
        out.extend(sizes.iter().flat_map(|v| v.to_le_bytes()));
        out.extend((local_name.len() as u16).to_le_bytes());
        out.extend((entry.extra.len() as u16).to_le_bytes());
        out.extend(local_name.as_bytes());
        out.extend(&entry.extra);
        out.extend(&entry.data);
        central.extend(CENTRAL_SIGNATURE.to_le_bytes());
        central.extend([20, 0, 20, 0, 0, 0, 0, 0, 0, 0, 0, 0]); // made by, needed, flags, stored, time, date
        central.extend(sizes.iter().flat_map(|v| v.to_le_bytes()));
        central.extend((entry.name.len() as u16).to_le_bytes());
        central.extend((entry.extra.len() as u16).to_le_bytes());
        central.extend([0u8; 10]); // comment length, disk, internal and external attributes
        central.extend(offset.to_le_bytes());
        central.extend(entry.name.as_bytes());
        central.extend(&entry.extra);
    }
    let directory_offset = out.len() as u64;
    out.extend(&central);
    let count = entries.len() as u64;
    if zip64 {
        let record_at = out.len() as u64;
        out.extend(ZIP64_EOCD_SIGNATURE.to_le_bytes());
        out.extend((ZIP64_EOCD_LEN - 12).to_le_bytes());
        out.extend([45, 0, 45, 0, 0, 0, 0, 0, 0, 0, 0, 0]); // made by, needed, disks
        for value in [count, count, central.len() as u64, directory_offset] {
            out.extend(value.to_le_bytes());
        }
        out.extend(ZIP64_LOCATOR_SIGNATURE.to_le_bytes());
        out.extend(0u32.to_le_bytes());
        out.extend(record_at.to_le_bytes());
        out.extend(1u32.to_le_bytes());
    }
    let (count16, size32, offset32) = if zip64 {
        (0xffff, 0xffff_ffff, 0xffff_ffff)
    } else {
        (count as u16, central.len() as u32, directory_offset as u32)
    };
    out.extend(EOCD_SIGNATURE.to_le_bytes());
    out.extend([0u8; 4]);
    out.extend(count16.to_le_bytes());
    out.extend(count16.to_le_bytes());
    out.extend(size32.to_le_bytes());
    out.extend(offset32.to_le_bytes());
    out.extend([0u8; 2]);
    out
}

/// An archive from [`build`] with `bytes` of junk before it and every
/// offset fixed up to match (for ZIP64, the locator's and the ZIP64 end
/// record's too): self-consistent for readers that trust the offsets, with
/// data no entry owns.
pub fn prepend(archive: &[u8], bytes: usize) -> Vec<u8> {
    let mut out = vec![0xaa; bytes];
    out.extend_from_slice(archive);
    let shift = bytes as u64;
    let eocd = out.len() - 22;
    let u64_at = |out: &[u8], at: usize| u64::from_le_bytes(out[at..at + 8].try_into().expect("8 bytes"));
    let (directory, count) = if out[eocd + 16..eocd + 20] == [0xff; 4] {
        // The locator, just before the end record, points at the ZIP64 end
        // record, which holds the count (byte 24) and the directory's
        // offset (byte 48).
        let locator = eocd - 20;
        let record = u64_at(&out, locator + 8) + shift;
        out[locator + 8..locator + 16].copy_from_slice(&record.to_le_bytes());
        let record = record as usize;
        let directory = u64_at(&out, record + 48) + shift;
        out[record + 48..record + 56].copy_from_slice(&directory.to_le_bytes());
        (directory as usize, u64_at(&out, record + 24))
    } else {
        let directory =
            u32::from_le_bytes(out[eocd + 16..eocd + 20].try_into().expect("4 bytes")) + bytes as u32;
        out[eocd + 16..eocd + 20].copy_from_slice(&directory.to_le_bytes());
        (directory as usize, u64::from(u16::from_le_bytes([out[eocd + 10], out[eocd + 11]])))
    };
    let mut at = directory;
    for _ in 0..count {
        let offset = u32::from_le_bytes(out[at + 42..at + 46].try_into().expect("4 bytes"));
        out[at + 42..at + 46].copy_from_slice(&(offset + bytes as u32).to_le_bytes());
        let field = |at: usize| usize::from(u16::from_le_bytes([out[at], out[at + 1]]));
        at += 46 + field(at + 28) + field(at + 30) + field(at + 32);
    }
    out
}

/// A ZIP64 archive from [`build`] whose ZIP64 end record claims `count`
/// entries (both of its counts); the directory itself is left as it is.
pub fn claim_zip64_entries(archive: &[u8], count: u64) -> Vec<u8> {
    let mut out = archive.to_vec();
    // The ZIP64 end record (56 bytes), its locator (20), the end record
    // (22); the two counts are bytes 24..40 of the ZIP64 end record.
    let counts = out.len() - 22 - 20 - 56 + 24;
    out[counts..counts + 8].copy_from_slice(&count.to_le_bytes());
    out[counts + 8..counts + 16].copy_from_slice(&count.to_le_bytes());
    out
}

/// A one-entry archive whose central header defers its sizes to a ZIP64
/// extra field that declares 2^64 - 1 bytes, compressed and not: arithmetic
/// on them overflows unless it is checked.
pub fn zip64_sizes_near_the_limit(name: &str, data: &[u8]) -> Vec<u8> {
    const ZIP64_EXTRA: u16 = 0x0001;
    let huge = RawEntry::new(name, data).with_extra(ZIP64_EXTRA, &[0xff; 16]);
    let mut out = build(&[huge], false);
    let central = out.len() - 22 - (46 + name.len() + 4 + 16);
    // The central header's 32-bit sizes (bytes 20..28) say "see ZIP64".
    out[central + 20..central + 28].copy_from_slice(&[0xff; 8]);
    out
}

/// The archive with an empty end record appended: readers that take the
/// last end record see no entries, the others see the real ones.
pub fn append_end_record(archive: &[u8]) -> Vec<u8> {
    let mut out = archive.to_vec();
    out.extend(EOCD_SIGNATURE.to_le_bytes());
    out.extend([0u8; 18]);
    out
}

pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for byte in data {
        crc ^= u32::from(*byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
        }
    }
    !crc
}
