//! Reading an uploaded zip safely.
//!
//! The zip is untrusted until TUF has verified what is inside, so before a
//! single byte is extracted the whole central directory is checked:
//! - the file is exactly one zip archive: nothing before it, nothing after it;
//! - every entry is a plain file (or directory) directly under
//!   `repo/metadata/` or `repo/targets/`, with no `..`, no absolute path, no
//!   backslash, and no name used twice;
//! - entries do not overlap in the file (a known zip-bomb construction);
//! - there are at most `max_entries`, their declared sizes add up to at most
//!   `max_total_bytes`, and no large entry compresses better than
//!   `max_compression_ratio`.
//!
//! Extraction then writes at most the declared size of each entry and fails
//! if an entry inflates to more, so a lying header cannot fill the disk.

use camino::{Utf8Path, Utf8PathBuf};
use std::collections::BTreeSet;
use std::io::{Read, Seek, SeekFrom};

const METADATA_PREFIX: &str = "repo/metadata/";
const TARGETS_PREFIX: &str = "repo/targets/";
/// Entries smaller than this are not held to the compression ratio: small
/// JSON files legitimately compress very well.
const RATIO_EXEMPT_BYTES: u64 = 1 << 20;

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
    #[error("the upload has {bytes} bytes of trailing data after the zip archive")]
    TrailingData { bytes: u64 },
    #[error("the upload has {bytes} bytes of data before the zip archive")]
    LeadingData { bytes: u64 },
    #[error("zip entry {name:?} is not a safe relative path (absolute, `..`, backslash or empty component)")]
    UnsafePath { name: String },
    #[error("zip entry {name:?} is outside {METADATA_PREFIX} and {TARGETS_PREFIX}")]
    OutsideRepo { name: String },
    #[error("zip entry {name:?} appears more than once")]
    Duplicate { name: String },
    #[error("zip entry {name:?} overlaps the data of the entry before it")]
    Overlapping { name: String },
    #[error("zip entry {name:?} is a {kind}, not a plain file")]
    Unsupported { name: String, kind: &'static str },
    #[error("the zip has {count} entries, more than the limit of {max}")]
    TooManyEntries { count: usize, max: usize },
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
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: Utf8PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Where the repository was extracted.
pub struct ExtractedRepo {
    pub metadata_dir: Utf8PathBuf,
    pub targets_dir: Utf8PathBuf,
}

struct EntryPlan {
    index: usize,
    name: String,
    declared: u64,
}

/// Checks the archive at `zip_path` and extracts it under `dest`.
pub fn extract(zip_path: &Utf8Path, dest: &Utf8Path, limits: &ZipLimits) -> Result<ExtractedRepo, ZipError> {
    let io = |what, source| ZipError::Io { what, path: zip_path.to_owned(), source };
    let mut file = std::fs::File::open(zip_path).map_err(|source| io("opening", source))?;
    check_no_trailing_data(&mut file).map_err(|source| io("reading", source))??;
    let mut archive =
        zip::ZipArchive::new(file).map_err(|error| ZipError::NotAZip { message: error.to_string() })?;
    if archive.offset() > 0 {
        return Err(ZipError::LeadingData { bytes: archive.offset() });
    }
    if archive.len() > limits.max_entries {
        return Err(ZipError::TooManyEntries { count: archive.len(), max: limits.max_entries });
    }

    let mut names = BTreeSet::new();
    let mut spans = Vec::new();
    let mut plan = Vec::new();
    let mut total: u64 = 0;
    for index in 0..archive.len() {
        let entry = archive
            .by_index_raw(index)
            .map_err(|error| ZipError::Corrupt { name: format!("#{index}"), message: error.to_string() })?;
        let name = entry
            .name()
            .map_err(|error| ZipError::Corrupt { name: format!("#{index}"), message: error.to_string() })?
            .to_string();
        check_name(&name)?;
        if !names.insert(name.clone()) {
            return Err(ZipError::Duplicate { name });
        }
        spans.push((
            entry.header_start(),
            entry.data_start().unwrap_or(entry.header_start()) + entry.compressed_size(),
            name.clone(),
        ));
        if entry.is_dir() {
            continue;
        }
        if entry.is_symlink() {
            return Err(ZipError::Unsupported { name, kind: "symbolic link" });
        }
        if entry.encrypted() {
            return Err(ZipError::Unsupported { name, kind: "encrypted entry" });
        }
        let declared = entry.size();
        let compressed = entry.compressed_size().max(1);
        if declared > RATIO_EXEMPT_BYTES && declared / compressed > limits.max_compression_ratio {
            return Err(ZipError::Bomb {
                name,
                compressed,
                declared,
                max_ratio: limits.max_compression_ratio,
            });
        }
        total = total.saturating_add(declared);
        if total > limits.max_total_bytes {
            return Err(ZipError::TooLarge { total, max: limits.max_total_bytes });
        }
        plan.push(EntryPlan { index, name, declared });
    }
    spans.sort();
    for pair in spans.windows(2) {
        if pair[1].0 < pair[0].1 {
            return Err(ZipError::Overlapping { name: pair[1].2.clone() });
        }
    }

    let repo = ExtractedRepo { metadata_dir: dest.join("metadata"), targets_dir: dest.join("targets") };
    for dir in [&repo.metadata_dir, &repo.targets_dir] {
        std::fs::create_dir_all(dir).map_err(|source| ZipError::Io {
            what: "creating",
            path: dir.clone(),
            source,
        })?;
    }
    for entry_plan in plan {
        extract_entry(&mut archive, &entry_plan, dest)?;
    }
    Ok(repo)
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

fn extract_entry<R: Read + Seek>(
    archive: &mut zip::ZipArchive<R>,
    plan: &EntryPlan,
    dest: &Utf8Path,
) -> Result<(), ZipError> {
    let corrupt = |error: &dyn std::fmt::Display| ZipError::Corrupt {
        name: plan.name.clone(),
        message: error.to_string(),
    };
    let mut entry = archive.by_index(plan.index).map_err(|e| corrupt(&e))?;
    let path = dest.join(plan.name.strip_prefix("repo/").expect("checked by check_name"));
    let mut out = std::fs::File::create_new(&path).map_err(|source| ZipError::Io {
        what: "creating",
        path: path.clone(),
        source,
    })?;
    let written =
        std::io::copy(&mut (&mut entry).take(plan.declared + 1), &mut out).map_err(|e| corrupt(&e))?;
    if written > plan.declared {
        return Err(ZipError::SizeMismatch { name: plan.name.clone(), declared: plan.declared });
    }
    Ok(())
}

/// The end-of-central-directory record must end exactly at the end of the
/// file (allowing for its own comment), and no name may appear twice in the
/// central directory (the zip crate keeps only one entry per name, so this
/// is checked on the raw directory).
fn check_no_trailing_data(file: &mut std::fs::File) -> std::io::Result<Result<(), ZipError>> {
    const EOCD_SIGNATURE: &[u8; 4] = b"PK\x05\x06";
    const EOCD_LEN: u64 = 22;
    let length = file.metadata()?.len();
    let window = length.min(EOCD_LEN + u64::from(u16::MAX) + 64 * 1024);
    file.seek(SeekFrom::Start(length - window))?;
    let mut tail = vec![0u8; window as usize];
    file.read_exact(&mut tail)?;
    file.seek(SeekFrom::Start(0))?;
    let Some(position) = tail.windows(4).rposition(|w| w == EOCD_SIGNATURE) else {
        return Ok(Err(ZipError::NotAZip { message: "no end-of-central-directory record".into() }));
    };
    let Some(record) = tail.get(position..position + EOCD_LEN as usize) else {
        return Ok(Err(ZipError::NotAZip { message: "truncated end-of-central-directory record".into() }));
    };
    let comment = u64::from(u16::from_le_bytes([record[20], record[21]]));
    let end = (length - window) + position as u64 + EOCD_LEN + comment;
    match end.cmp(&length) {
        std::cmp::Ordering::Less => return Ok(Err(ZipError::TrailingData { bytes: length - end })),
        std::cmp::Ordering::Greater => {
            return Ok(Err(ZipError::NotAZip { message: "the archive is truncated".into() }));
        }
        std::cmp::Ordering::Equal => {}
    }
    let directory_size = u32::from_le_bytes([record[12], record[13], record[14], record[15]]);
    let directory_offset = u32::from_le_bytes([record[16], record[17], record[18], record[19]]);
    // ZIP64 archives keep the real values elsewhere; the zip crate's own
    // reading of them is relied on.
    if directory_size == u32::MAX || directory_offset == u32::MAX {
        return Ok(Ok(()));
    }
    if u64::from(directory_offset) + u64::from(directory_size) > length {
        return Ok(Err(ZipError::NotAZip { message: "the central directory lies beyond the file".into() }));
    }
    let mut directory = vec![0u8; directory_size as usize];
    file.seek(SeekFrom::Start(u64::from(directory_offset)))?;
    file.read_exact(&mut directory)?;
    file.seek(SeekFrom::Start(0))?;
    Ok(find_duplicate(&directory))
}

/// Walks the raw central directory for a name that appears twice.
fn find_duplicate(directory: &[u8]) -> Result<(), ZipError> {
    const HEADER_LEN: usize = 46;
    let mut names = BTreeSet::new();
    let mut at = 0;
    while at + HEADER_LEN <= directory.len() && directory[at..at + 4] == *b"PK\x01\x02" {
        let field = |offset: usize| {
            usize::from(u16::from_le_bytes([directory[at + offset], directory[at + offset + 1]]))
        };
        let (name_len, extra_len, comment_len) = (field(28), field(30), field(32));
        let Some(name) = directory.get(at + HEADER_LEN..at + HEADER_LEN + name_len) else { break };
        let name = String::from_utf8_lossy(name).into_owned();
        if !names.insert(name.clone()) {
            return Err(ZipError::Duplicate { name });
        }
        at += HEADER_LEN + name_len + extra_len + comment_len;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io::Write;

    fn limits() -> ZipLimits {
        ZipLimits { max_entries: 100, max_total_bytes: 1 << 20, max_compression_ratio: 50 }
    }

    /// A small valid repository-shaped zip.
    fn valid_zip() -> Vec<u8> {
        let mut cursor = std::io::Cursor::new(Vec::new());
        let mut zip = zip::ZipWriter::new(&mut cursor);
        let options =
            zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
        for (name, body) in
            [("repo/metadata/1.root.json", &b"{\"a\": 1}"[..]), ("repo/targets/x", &[7u8; 300][..])]
        {
            zip.start_file(name, options).unwrap();
            zip.write_all(body).unwrap();
        }
        zip.finish().unwrap();
        cursor.into_inner()
    }

    /// Runs the intake on `bytes`; whatever it says, it must not panic, and
    /// it must not write anything outside its destination.
    fn intake(bytes: &[u8]) -> Result<(), ZipError> {
        let dir = camino_tempfile::tempdir().unwrap();
        let zip_path = dir.path().join("upload.zip");
        std::fs::write(&zip_path, bytes).unwrap();
        let dest = dir.path().join("out");
        let outcome = extract(&zip_path, &dest, &limits()).map(|_| ());
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert!(
            names == ["upload.zip"] || names == ["out", "upload.zip"],
            "wrote outside its destination: {names:?}"
        );
        outcome
    }

    #[test]
    fn a_valid_zip_extracts() {
        intake(&valid_zip()).unwrap();
    }

    proptest! {
        // Longer runs: PROPTEST_CASES=100000 cargo test -p nexus zip_intake
        // (dev-tools/fuzz-intake does that for a bounded time).
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let _ = intake(&bytes);
        }

        #[test]
        fn mutated_zips_never_panic(flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..16),
                                    cut in any::<prop::sample::Index>(), truncate in any::<bool>()) {
            let mut bytes = valid_zip();
            for (index, value) in flips {
                let at = index.index(bytes.len());
                bytes[at] = value;
            }
            if truncate {
                bytes.truncate(cut.index(bytes.len()));
            }
            let _ = intake(&bytes);
        }
    }
}
