//! Reading an uploaded zip with exactly one possible interpretation.
//!
//! The zip is untrusted until TUF has verified what is inside. Zip leaves
//! room for readers to disagree (which end record, which name, where an
//! entry's data is), and an attacker who can make the verifier and the stager
//! see different archives can get unverified bytes staged. So this module is
//! the only reader of an upload, it is strict, and it refuses every archive
//! on which two reasonable readers could disagree:
//!
//! - the end-of-central-directory record is the last 22 bytes of the file
//!   (no archive comment, nothing after it), and no other plausible end
//!   record lies where a reader searching backwards could find one;
//! - ZIP64 records, when present, sit exactly between the central directory
//!   and the end record, and agree with it;
//! - the central directory fills exactly the space its end record claims;
//! - entries tile the file from byte 0 up to the central directory: nothing
//!   before the first local header, no gap, no overlap;
//! - each local header repeats its central-directory name byte for byte and
//!   agrees on method and flags (and sizes, unless a data descriptor follows,
//!   which must then agree too);
//! - no extra field renames an entry (Info-ZIP Unicode Path, 0x7075), no
//!   entry is encrypted, a symbolic link, or compressed with anything but
//!   store or deflate;
//! - every name is UTF-8, at most [`MAX_NAME_BYTES`], a plain file directly
//!   under `repo/metadata/` or `repo/targets/` (or one of those
//!   directories), without `..`, absolute paths, backslashes or empty
//!   components, and appears once.
//!
//! Bounds come before allocation: the entry count is checked before any
//! per-entry structure is built, the central directory's size is bounded
//! (by the file, and by the count times the largest header) before it is
//! read, and all offset arithmetic is checked. Entries are never extracted:
//! [`Archive::reader`] streams one entry's bytes (inflating them), yields at
//! most its declared size, and fails on any size or CRC mismatch.
//! `tests/tests/zip_differential.rs` feeds mutated archives to this reader
//! and to the `zip` crate: whatever this one accepts, the other must read
//! the same way.

use camino::{Utf8Path, Utf8PathBuf};
use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

const METADATA_PREFIX: &str = "repo/metadata/";
const TARGETS_PREFIX: &str = "repo/targets/";
/// Entries smaller than this are not held to the compression ratio: small
/// JSON files legitimately compress very well.
const RATIO_EXEMPT_BYTES: u64 = 1 << 20;
/// The longest entry name accepted.
pub const MAX_NAME_BYTES: usize = 1024;
/// The most extra-field bytes one header may carry.
const MAX_EXTRA_BYTES: usize = 1024;

const EOCD_SIGNATURE: u32 = 0x0605_4b50;
const EOCD_LEN: u64 = 22;
const ZIP64_LOCATOR_SIGNATURE: u32 = 0x0706_4b50;
const ZIP64_LOCATOR_LEN: u64 = 20;
const ZIP64_EOCD_SIGNATURE: u32 = 0x0606_4b50;
const ZIP64_EOCD_LEN: u64 = 56;
const CENTRAL_SIGNATURE: u32 = 0x0201_4b50;
const CENTRAL_LEN: usize = 46;
const LOCAL_SIGNATURE: u32 = 0x0403_4b50;
const LOCAL_LEN: u64 = 30;
const DESCRIPTOR_SIGNATURE: u32 = 0x0807_4b50;
/// Extra field ids.
const ZIP64_EXTRA: u16 = 0x0001;
const UNICODE_PATH_EXTRA: u16 = 0x7075;
/// General-purpose flags.
const FLAG_ENCRYPTED: u16 = 1;
const FLAG_DATA_DESCRIPTOR: u16 = 1 << 3;
const FLAG_STRONG_ENCRYPTION: u16 = 1 << 6;
const FLAG_MASKED_HEADERS: u16 = 1 << 13;

#[derive(Clone, Debug)]
pub struct ZipLimits {
    pub max_entries: usize,
    pub max_total_bytes: u64,
    pub max_compression_ratio: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ZipError {
    #[error("the upload is not a readable zip archive: {message}")]
    NotAZip { message: String },
    #[error("the upload has {bytes} bytes after the zip archive's end record")]
    TrailingData { bytes: u64 },
    #[error("the upload has {bytes} bytes of data before the zip archive's first entry")]
    LeadingData { bytes: u64 },
    #[error("the zip archive has a comment ({bytes} bytes); archives with comments are not accepted")]
    ArchiveComment { bytes: u64 },
    #[error(
        "the zip archive has a second end-of-central-directory record at byte {offset}: \
         readers could disagree about its contents"
    )]
    SecondEndRecord { offset: u64 },
    #[error("the zip archive's central directory is malformed: {message}")]
    BadDirectory { message: String },
    #[error("zip entry {name:?} is not a safe relative path (absolute, `..`, backslash or empty component)")]
    UnsafePath { name: String },
    #[error("zip entry {name:?} is outside {METADATA_PREFIX} and {TARGETS_PREFIX}")]
    OutsideRepo { name: String },
    #[error("zip entry #{index} has a name of {bytes} bytes; at most {MAX_NAME_BYTES} are accepted")]
    NameTooLong { index: usize, bytes: usize },
    #[error("zip entry #{index} has a name that is not UTF-8")]
    NameNotUtf8 { index: usize },
    #[error("zip entry {name:?} appears more than once")]
    Duplicate { name: String },
    #[error("zip entry {name:?} overlaps the data of the entry before it")]
    Overlapping { name: String },
    #[error("the zip archive has {bytes} bytes that belong to no entry, before entry {name:?}")]
    Gap { name: String, bytes: u64 },
    #[error("zip entry {name:?}: its local header disagrees with the central directory ({what})")]
    HeaderMismatch { name: String, what: &'static str },
    #[error("zip entry {name:?} carries a Unicode Path extra field, which would rename it for some readers")]
    RenamingExtraField { name: String },
    #[error("zip entry {name:?} is a {kind}, not a plain file")]
    Unsupported { name: String, kind: &'static str },
    #[error("the zip has {count} entries, more than the limit of {max}")]
    TooManyEntries { count: u64, max: usize },
    #[error("the zip's entries declare {total} bytes in all, more than the limit of {max}")]
    TooLarge { total: u64, max: u64 },
    #[error(
        "zip entry {name:?} inflates {compressed} bytes to {declared}, a ratio over the limit of \
         {max_ratio}: refusing a likely decompression bomb"
    )]
    Bomb { name: String, compressed: u64, declared: u64, max_ratio: u64 },
    #[error("zip entry {name:?} inflates to more than the {declared} bytes it declares")]
    SizeMismatch { name: String, declared: u64 },
    #[error("zip entry {name:?} cannot be read: {message}")]
    Corrupt { name: String, message: String },
    /// A server-side failure to read the stored upload; the path is for the
    /// log, not for the client.
    #[error("reading the stored upload")]
    Io {
        path: Utf8PathBuf,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Method {
    Stored,
    Deflated,
}

/// One file entry, as the central directory and its local header agree.
#[derive(Clone, Debug)]
pub struct Entry {
    pub name: String,
    /// Uncompressed size.
    pub size: u64,
    compressed: u64,
    method: Method,
    crc32: u32,
    data_start: u64,
}

/// A checked archive: its file entries by name.
pub struct Archive {
    file: Arc<std::fs::File>,
    path: Utf8PathBuf,
    entries: BTreeMap<String, Entry>,
}

/// The raw fields of one central-directory header.
struct Central {
    name: String,
    flags: u16,
    method: u16,
    crc32: u32,
    compressed: u64,
    size: u64,
    offset: u64,
    is_dir: bool,
}

impl Archive {
    /// Checks the archive at `path` (see the module doc).
    pub fn open(path: &Utf8Path, limits: &ZipLimits) -> Result<Archive, ZipError> {
        let io = |source| ZipError::Io { path: path.to_owned(), source };
        let file = std::fs::File::open(path).map_err(io)?;
        let length = file.metadata().map_err(io)?.len();
        let reader = Reader { file: &file, length, path };
        let (directory_offset, directory_size, count) = reader.end_records(limits)?;
        let headers = reader.central_directory(directory_offset, directory_size, count)?;
        let entries = reader.tile(headers, directory_offset, limits)?;
        Ok(Archive { file: Arc::new(file), path: path.to_owned(), entries })
    }

    pub fn entry(&self, name: &str) -> Option<&Entry> {
        self.entries.get(name)
    }

    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries.values()
    }

    /// The entry's bytes, inflated. Yields at most its declared size and
    /// fails at the end on a size or CRC mismatch.
    pub fn reader(&self, entry: &Entry) -> EntryReader {
        let raw = RangeReader {
            file: self.file.clone(),
            position: entry.data_start,
            end: entry.data_start + entry.compressed,
        };
        let inner: Box<dyn Read + Send> = match entry.method {
            Method::Stored => Box::new(raw),
            Method::Deflated => Box::new(flate2::read::DeflateDecoder::new(raw)),
        };
        EntryReader {
            inner,
            entry: entry.clone(),
            path: self.path.clone(),
            produced: 0,
            crc: crc32fast::Hasher::new(),
            done: false,
        }
    }
}

/// Reads little-endian fields of the archive by absolute offset.
struct Reader<'a> {
    file: &'a std::fs::File,
    length: u64,
    path: &'a Utf8Path,
}

impl Reader<'_> {
    fn read(&self, offset: u64, len: u64) -> Result<Vec<u8>, ZipError> {
        let end = offset.checked_add(len).filter(|&end| end <= self.length).ok_or_else(|| {
            ZipError::NotAZip { message: format!("a record at byte {offset} runs past the end of the file") }
        })?;
        let mut bytes = vec![0u8; (end - offset) as usize];
        self.file
            .read_exact_at(&mut bytes, offset)
            .map_err(|source| ZipError::Io { path: self.path.to_owned(), source })?;
        Ok(bytes)
    }

    /// Finds the end records; returns the central directory's offset and
    /// size and the entry count.
    fn end_records(&self, limits: &ZipLimits) -> Result<(u64, u64, u64), ZipError> {
        if self.length < EOCD_LEN {
            return Err(ZipError::NotAZip { message: format!("{} bytes is too short", self.length) });
        }
        let eocd_at = self.length - EOCD_LEN;
        let eocd = self.read(eocd_at, EOCD_LEN)?;
        if le32(&eocd, 0) != EOCD_SIGNATURE {
            return Err(self.misplaced_end_record(eocd_at)?);
        }
        let comment = u64::from(le16(&eocd, 20));
        if comment > 0 {
            return Err(ZipError::ArchiveComment { bytes: comment });
        }
        self.no_second_end_record(eocd_at)?;
        if le16(&eocd, 4) != 0 || le16(&eocd, 6) != 0 || le16(&eocd, 8) != le16(&eocd, 10) {
            return Err(ZipError::NotAZip { message: "multi-disk archives are not accepted".into() });
        }
        let (mut count, mut size, mut offset) =
            (u64::from(le16(&eocd, 10)), u64::from(le32(&eocd, 12)), u64::from(le32(&eocd, 16)));
        let mut directory_end = eocd_at;
        if let Some(locator_at) = eocd_at.checked_sub(ZIP64_LOCATOR_LEN) {
            let locator = self.read(locator_at, ZIP64_LOCATOR_LEN)?;
            if le32(&locator, 0) == ZIP64_LOCATOR_SIGNATURE {
                let record_at = le64(&locator, 8);
                if le32(&locator, 4) != 0 || le32(&locator, 16) != 1 {
                    return Err(ZipError::NotAZip { message: "multi-disk archives are not accepted".into() });
                }
                if record_at.checked_add(ZIP64_EOCD_LEN) != Some(locator_at) {
                    return Err(ZipError::NotAZip {
                        message: "the ZIP64 end record is not right before its locator".into(),
                    });
                }
                let record = self.read(record_at, ZIP64_EOCD_LEN)?;
                if le32(&record, 0) != ZIP64_EOCD_SIGNATURE || le64(&record, 4) != ZIP64_EOCD_LEN - 12 {
                    return Err(ZipError::NotAZip { message: "malformed ZIP64 end record".into() });
                }
                if le32(&record, 16) != 0 || le32(&record, 20) != 0 || le64(&record, 24) != le64(&record, 32)
                {
                    return Err(ZipError::NotAZip { message: "multi-disk archives are not accepted".into() });
                }
                let zip64 = (le64(&record, 32), le64(&record, 40), le64(&record, 48));
                // Where the classic record has a real value, both must agree.
                let agree = (count == 0xffff || count == zip64.0)
                    && (size == 0xffff_ffff || size == zip64.1)
                    && (offset == 0xffff_ffff || offset == zip64.2);
                if !agree {
                    return Err(ZipError::NotAZip {
                        message: "the ZIP64 and classic end records disagree".into(),
                    });
                }
                (count, size, offset) = zip64;
                directory_end = record_at;
            }
        }
        if count > limits.max_entries as u64 {
            return Err(ZipError::TooManyEntries { count, max: limits.max_entries });
        }
        if offset.checked_add(size) != Some(directory_end) {
            return Err(ZipError::BadDirectory {
                message: format!(
                    "it claims bytes {offset}..{} but the end records start at byte {directory_end}",
                    offset.saturating_add(size)
                ),
            });
        }
        let largest_header = (CENTRAL_LEN + MAX_NAME_BYTES + MAX_EXTRA_BYTES + u16::MAX as usize) as u64;
        if size > count.saturating_mul(largest_header) {
            return Err(ZipError::BadDirectory {
                message: format!("{size} bytes is more than {count} entries can take"),
            });
        }
        Ok((offset, size, count))
    }

    /// The last 22 bytes are no end record: say why, naming trailing data
    /// if an end record lies earlier.
    fn misplaced_end_record(&self, eocd_at: u64) -> Result<ZipError, ZipError> {
        let window = self.length.min(EOCD_LEN + u64::from(u16::MAX));
        let tail = self.read(self.length - window, window)?;
        Ok(match tail.windows(4).rposition(|w| le32(w, 0) == EOCD_SIGNATURE) {
            Some(position) => {
                let at = self.length - window + position as u64;
                let comment =
                    tail.get(position + 20..position + 22).map_or(0, |bytes| u64::from(le16(bytes, 0)));
                if at + EOCD_LEN + comment == self.length {
                    ZipError::ArchiveComment { bytes: comment }
                } else {
                    ZipError::TrailingData { bytes: eocd_at.saturating_sub(at) }
                }
            }
            None => ZipError::NotAZip { message: "no end-of-central-directory record".into() },
        })
    }

    /// A reader that searches backwards from the end (through a possible
    /// comment) could stop at any end-record signature in the last 64 KiB.
    /// Any other plausible one there is refused.
    fn no_second_end_record(&self, eocd_at: u64) -> Result<(), ZipError> {
        let start = eocd_at.saturating_sub(u64::from(u16::MAX));
        let region = self.read(start, eocd_at - start)?;
        for (position, window) in region.windows(EOCD_LEN as usize).enumerate() {
            let at = start + position as u64;
            let plausible = le32(window, 0) == EOCD_SIGNATURE
                && le16(window, 4) == 0
                && le16(window, 6) == 0
                && u64::from(le32(window, 16))
                    .checked_add(u64::from(le32(window, 12)))
                    .is_some_and(|end| end <= at)
                && at + EOCD_LEN + u64::from(le16(window, 20)) <= self.length;
            if plausible {
                return Err(ZipError::SecondEndRecord { offset: at });
            }
        }
        Ok(())
    }

    fn central_directory(&self, offset: u64, size: u64, count: u64) -> Result<Vec<Central>, ZipError> {
        let directory = self.read(offset, size)?;
        let bad = |message: String| ZipError::BadDirectory { message };
        let mut headers = Vec::with_capacity(count as usize);
        let mut at = 0usize;
        for index in 0..count as usize {
            let fixed = directory
                .get(at..at + CENTRAL_LEN)
                .ok_or_else(|| bad(format!("entry #{index} runs past its end")))?;
            if le32(fixed, 0) != CENTRAL_SIGNATURE {
                return Err(bad(format!("entry #{index} has no header signature")));
            }
            let (name_len, extra_len, comment_len) =
                (usize::from(le16(fixed, 28)), usize::from(le16(fixed, 30)), usize::from(le16(fixed, 32)));
            if name_len > MAX_NAME_BYTES {
                return Err(ZipError::NameTooLong { index, bytes: name_len });
            }
            if extra_len > MAX_EXTRA_BYTES {
                return Err(bad(format!("entry #{index} has {extra_len} bytes of extra fields")));
            }
            let variable = directory
                .get(at + CENTRAL_LEN..at + CENTRAL_LEN + name_len + extra_len + comment_len)
                .ok_or_else(|| bad(format!("entry #{index} runs past its end")))?;
            let name = std::str::from_utf8(&variable[..name_len])
                .map_err(|_| ZipError::NameNotUtf8 { index })?
                .to_string();
            let extra = &variable[name_len..name_len + extra_len];
            let header = central_header(fixed, name, extra)?;
            if le16(fixed, 34) != 0 {
                return Err(ZipError::Unsupported { name: header.name, kind: "multi-disk entry" });
            }
            headers.push(header);
            at += CENTRAL_LEN + name_len + extra_len + comment_len;
        }
        if at != directory.len() {
            return Err(bad(format!("{} bytes follow its last entry", directory.len() - at)));
        }
        Ok(headers)
    }

    /// Checks every local header against its central header and that the
    /// entries tile the file from byte 0 to the central directory.
    fn tile(
        &self,
        mut headers: Vec<Central>,
        directory_offset: u64,
        limits: &ZipLimits,
    ) -> Result<BTreeMap<String, Entry>, ZipError> {
        let mut entries = BTreeMap::new();
        let mut names = std::collections::BTreeSet::new();
        for header in &headers {
            if !names.insert(header.name.as_str()) {
                return Err(ZipError::Duplicate { name: header.name.clone() });
            }
        }
        headers.sort_by_key(|header| header.offset);
        let mut next = 0u64;
        let mut total = 0u64;
        for header in headers {
            let name = header.name.clone();
            if header.offset > next {
                return Err(if next == 0 {
                    ZipError::LeadingData { bytes: header.offset }
                } else {
                    ZipError::Gap { name, bytes: header.offset - next }
                });
            }
            if header.offset < next {
                return Err(ZipError::Overlapping { name });
            }
            let (data_start, end) = self.local_header(&header)?;
            next = end;
            if next > directory_offset {
                return Err(ZipError::Overlapping { name });
            }
            if header.is_dir {
                continue;
            }
            let method = match header.method {
                0 => Method::Stored,
                8 => Method::Deflated,
                _ => {
                    return Err(ZipError::Unsupported {
                        name,
                        kind: "compression method other than store or deflate",
                    });
                }
            };
            let compressed = header.compressed.max(1);
            if header.size > RATIO_EXEMPT_BYTES && header.size / compressed > limits.max_compression_ratio {
                return Err(ZipError::Bomb {
                    name,
                    compressed,
                    declared: header.size,
                    max_ratio: limits.max_compression_ratio,
                });
            }
            total = total.saturating_add(header.size);
            if total > limits.max_total_bytes {
                return Err(ZipError::TooLarge { total, max: limits.max_total_bytes });
            }
            entries.insert(
                name.clone(),
                Entry {
                    name,
                    size: header.size,
                    compressed: header.compressed,
                    method,
                    crc32: header.crc32,
                    data_start,
                },
            );
        }
        if next != directory_offset {
            return Err(ZipError::BadDirectory {
                message: format!(
                    "{} bytes between the last entry and the directory",
                    directory_offset - next
                ),
            });
        }
        Ok(entries)
    }

    /// Checks one local header; returns where its data starts and where the
    /// entry (data descriptor included) ends.
    fn local_header(&self, header: &Central) -> Result<(u64, u64), ZipError> {
        let mismatch = |what| ZipError::HeaderMismatch { name: header.name.clone(), what };
        let fixed = self.read(header.offset, LOCAL_LEN)?;
        if le32(&fixed, 0) != LOCAL_SIGNATURE {
            return Err(mismatch("no local header signature"));
        }
        let (name_len, extra_len) = (u64::from(le16(&fixed, 26)), u64::from(le16(&fixed, 28)));
        if name_len as usize != header.name.len() || extra_len as usize > MAX_EXTRA_BYTES {
            return Err(mismatch("name length"));
        }
        let variable = self.read(header.offset + LOCAL_LEN, name_len + extra_len)?;
        if variable[..name_len as usize] != *header.name.as_bytes() {
            return Err(mismatch("name"));
        }
        let local_extra = parse_extra(&variable[name_len as usize..], &header.name)?;
        let flags = le16(&fixed, 6);
        if flags != header.flags {
            return Err(mismatch("flags"));
        }
        if le16(&fixed, 8) != header.method {
            return Err(mismatch("compression method"));
        }
        let data_start = header.offset + LOCAL_LEN + name_len + extra_len;
        let data_end = data_start.checked_add(header.compressed).ok_or_else(|| mismatch("size"))?;
        let descriptor = flags & FLAG_DATA_DESCRIPTOR != 0;
        if !descriptor {
            let crc = le32(&fixed, 14);
            let (compressed, size) = sizes(le32(&fixed, 18), le32(&fixed, 22), &local_extra, &header.name)?;
            if crc != header.crc32 || compressed != header.compressed || size != header.size {
                return Err(mismatch("CRC or sizes"));
            }
            return Ok((data_start, data_end));
        }
        // A data descriptor follows the data: optional signature, CRC, then
        // sizes of 4 bytes each, or 8 for entries too large for that.
        let wide = header.compressed >= 0xffff_ffff || header.size >= 0xffff_ffff;
        let sizes_len: u64 = if wide { 16 } else { 8 };
        let probe = self.read(data_end, 4)?;
        let signed = le32(&probe, 0) == DESCRIPTOR_SIGNATURE;
        let descriptor_len = if signed { 8 + sizes_len } else { 4 + sizes_len };
        let bytes = self.read(data_end, descriptor_len)?;
        let fields = if signed { &bytes[4..] } else { &bytes[..] };
        let (crc, compressed, size) = if wide {
            (le32(fields, 0), le64(fields, 4), le64(fields, 12))
        } else {
            (le32(fields, 0), u64::from(le32(fields, 4)), u64::from(le32(fields, 8)))
        };
        if crc != header.crc32 || compressed != header.compressed || size != header.size {
            return Err(mismatch("data descriptor"));
        }
        Ok((data_start, data_end + descriptor_len))
    }
}

fn central_header(fixed: &[u8], name: String, extra: &[u8]) -> Result<Central, ZipError> {
    let flags = le16(fixed, 8);
    if flags & (FLAG_ENCRYPTED | FLAG_STRONG_ENCRYPTION | FLAG_MASKED_HEADERS) != 0 {
        return Err(ZipError::Unsupported { name, kind: "encrypted entry" });
    }
    check_name(&name)?;
    let fields = parse_extra(extra, &name)?;
    let (compressed, size) = sizes(le32(fixed, 20), le32(fixed, 24), &fields, &name)?;
    let mut offset = u64::from(le32(fixed, 42));
    if offset == 0xffff_ffff {
        let skip = [le32(fixed, 24), le32(fixed, 20)].iter().filter(|&&v| v == 0xffff_ffff).count();
        offset = zip64_value(&fields, skip, &name)?;
    }
    let made_by_unix = le16(fixed, 4) >> 8 == 3;
    let file_type = le32(fixed, 38) >> 28;
    if made_by_unix && file_type == 0o12 {
        return Err(ZipError::Unsupported { name, kind: "symbolic link" });
    }
    let is_dir = name.ends_with('/');
    if is_dir && size != 0 {
        return Err(ZipError::Unsupported { name, kind: "directory with contents" });
    }
    Ok(Central {
        name,
        flags,
        method: le16(fixed, 10),
        crc32: le32(fixed, 16),
        compressed,
        size,
        offset,
        is_dir,
    })
}

/// An entry's extra fields by id. A Unicode Path field is refused: it would
/// rename the entry for the readers that honour it.
fn parse_extra(extra: &[u8], name: &str) -> Result<BTreeMap<u16, Vec<u8>>, ZipError> {
    let bad = || ZipError::BadDirectory { message: format!("entry {name:?} has malformed extra fields") };
    let mut fields = BTreeMap::new();
    let mut at = 0;
    while at < extra.len() {
        let head = extra.get(at..at + 4).ok_or_else(bad)?;
        let (id, len) = (le16(head, 0), usize::from(le16(head, 2)));
        let data = extra.get(at + 4..at + 4 + len).ok_or_else(bad)?;
        if id == UNICODE_PATH_EXTRA {
            return Err(ZipError::RenamingExtraField { name: name.to_string() });
        }
        if fields.insert(id, data.to_vec()).is_some() {
            return Err(bad());
        }
        at += 4 + len;
    }
    Ok(fields)
}

/// The compressed and uncompressed sizes, from the ZIP64 extra field where
/// the 32-bit fields say so (uncompressed first, as the format orders them).
fn sizes(
    compressed: u32,
    size: u32,
    fields: &BTreeMap<u16, Vec<u8>>,
    name: &str,
) -> Result<(u64, u64), ZipError> {
    let size_wide = size == 0xffff_ffff;
    let size = if size_wide { zip64_value(fields, 0, name)? } else { u64::from(size) };
    let compressed = if compressed == 0xffff_ffff {
        zip64_value(fields, usize::from(size_wide), name)?
    } else {
        u64::from(compressed)
    };
    Ok((compressed, size))
}

fn zip64_value(fields: &BTreeMap<u16, Vec<u8>>, index: usize, name: &str) -> Result<u64, ZipError> {
    fields
        .get(&ZIP64_EXTRA)
        .and_then(|data| data.get(index * 8..index * 8 + 8))
        .map(|bytes| le64(bytes, 0))
        .ok_or_else(|| ZipError::BadDirectory { message: format!("entry {name:?} lacks its ZIP64 sizes") })
}

fn check_name(name: &str) -> Result<(), ZipError> {
    let unsafe_path = name.starts_with('/')
        || name.contains('\\')
        || name.contains('\0')
        || name.trim_end_matches('/').split('/').any(|part| part.is_empty() || part == "." || part == "..");
    if unsafe_path {
        return Err(ZipError::UnsafePath { name: name.to_string() });
    }
    let allowed_dirs = ["repo/", METADATA_PREFIX, TARGETS_PREFIX];
    if allowed_dirs.contains(&name) {
        return Ok(());
    }
    let inside = [METADATA_PREFIX, TARGETS_PREFIX]
        .iter()
        .any(|prefix| name.strip_prefix(prefix).is_some_and(|rest| !rest.is_empty() && !rest.contains('/')));
    if inside { Ok(()) } else { Err(ZipError::OutsideRepo { name: name.to_string() }) }
}

fn le16(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([bytes[at], bytes[at + 1]])
}

fn le32(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

fn le64(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

/// Raw bytes of one entry's data, by absolute offset (so several readers
/// can share the file).
struct RangeReader {
    file: Arc<std::fs::File>,
    position: u64,
    end: u64,
}

impl Read for RangeReader {
    fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        let wanted = buffer.len().min((self.end - self.position) as usize);
        if wanted == 0 {
            return Ok(0);
        }
        let read = self.file.read_at(&mut buffer[..wanted], self.position)?;
        self.position += read as u64;
        Ok(read)
    }
}

/// One entry's inflated bytes; see [`Archive::reader`].
pub struct EntryReader {
    inner: Box<dyn Read + Send>,
    entry: Entry,
    path: Utf8PathBuf,
    produced: u64,
    crc: crc32fast::Hasher,
    done: bool,
}

impl EntryReader {
    /// Reads the next chunk; `Ok(0)` at the verified end.
    pub fn read_chunk(&mut self, buffer: &mut [u8]) -> Result<usize, ZipError> {
        if self.done {
            return Ok(0);
        }
        let name = &self.entry.name;
        // One byte beyond the declared size is enough to catch a liar.
        let room = (self.entry.size + 1 - self.produced).min(buffer.len() as u64) as usize;
        let read = self.inner.read(&mut buffer[..room]).map_err(|error| match error.kind() {
            std::io::ErrorKind::InvalidInput
            | std::io::ErrorKind::InvalidData
            | std::io::ErrorKind::UnexpectedEof => {
                ZipError::Corrupt { name: name.clone(), message: error.to_string() }
            }
            _ => ZipError::Io { path: self.path.clone(), source: error },
        })?;
        self.produced += read as u64;
        if self.produced > self.entry.size {
            return Err(ZipError::SizeMismatch { name: name.clone(), declared: self.entry.size });
        }
        self.crc.update(&buffer[..read]);
        if read == 0 {
            self.done = true;
            if self.produced != self.entry.size {
                return Err(ZipError::Corrupt {
                    name: name.clone(),
                    message: format!("it ends after {} of its {} bytes", self.produced, self.entry.size),
                });
            }
            if self.crc.clone().finalize() != self.entry.crc32 {
                return Err(ZipError::Corrupt { name: name.clone(), message: "CRC-32 mismatch".into() });
            }
        }
        Ok(read)
    }
}

#[cfg(test)]
mod tests;
