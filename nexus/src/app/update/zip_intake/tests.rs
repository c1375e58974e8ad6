use super::*;
use proptest::prelude::*;
use std::io::{Read, Write};
use tuf_forge::raw_zip::{
    RawEntry, append_end_record, build, claim_zip64_entries, prepend, zip64_sizes_near_the_limit,
};

fn limits() -> ZipLimits {
    ZipLimits { max_entries: 100, max_total_bytes: 1 << 20, max_compression_ratio: 50 }
}

/// A small valid repository-shaped zip, written by the `zip` crate.
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

fn raw(name: &str, data: &[u8]) -> RawEntry {
    RawEntry::new(name, data)
}

/// Opens `bytes` as an upload and reads every entry through the verified
/// reader. Whatever it says, it must not panic, and no entry may yield more
/// than it declares.
fn intake(bytes: &[u8]) -> Result<BTreeMap<String, Vec<u8>>, ZipError> {
    let dir = camino_tempfile::tempdir().unwrap();
    let path = dir.path().join("upload.zip");
    std::fs::write(&path, bytes).unwrap();
    let archive = Archive::open(&path, &limits())?;
    let mut contents = BTreeMap::new();
    for entry in archive.entries() {
        let mut reader = archive.reader(entry);
        let mut data = Vec::new();
        let mut buffer = [0u8; 4096];
        loop {
            let read = reader.read_chunk(&mut buffer)?;
            if read == 0 {
                break;
            }
            data.extend_from_slice(&buffer[..read]);
            assert!(data.len() as u64 <= entry.size, "{} yielded more than it declares", entry.name);
        }
        contents.insert(entry.name.clone(), data);
    }
    Ok(contents)
}

#[test]
fn a_valid_zip_reads_back_exactly() {
    let contents = intake(&valid_zip()).unwrap();
    assert_eq!(contents["repo/metadata/1.root.json"], b"{\"a\": 1}");
    assert_eq!(contents["repo/targets/x"], [7u8; 300]);
    let handmade = intake(&build(&[raw("repo/targets/a", b"hello")], false)).unwrap();
    assert_eq!(handmade["repo/targets/a"], b"hello");
    let zip64 = intake(&build(&[raw("repo/targets/a", b"hello")], true)).unwrap();
    assert_eq!(zip64["repo/targets/a"], b"hello");
}

#[test]
fn an_end_record_appended_after_the_real_one_is_refused() {
    // The trick: a second, empty end record at the very end hides the real
    // archive from readers that take the last one, and shows it to others.
    let bytes = append_end_record(&build(&[raw("repo/targets/a", b"hello")], false));
    let error = intake(&bytes).unwrap_err();
    assert!(matches!(error, ZipError::SecondEndRecord { .. } | ZipError::BadDirectory { .. }), "{error}");
}

#[test]
fn trailing_data_and_comments_are_refused() {
    let mut bytes = build(&[raw("repo/targets/a", b"hello")], false);
    bytes.extend_from_slice(b"junk");
    assert!(matches!(intake(&bytes).unwrap_err(), ZipError::TrailingData { bytes: 4 }));
    let mut commented = build(&[raw("repo/targets/a", b"hello")], false);
    let at = commented.len() - 2;
    commented[at] = 3;
    commented.extend_from_slice(b"hi!");
    assert!(matches!(intake(&commented).unwrap_err(), ZipError::ArchiveComment { bytes: 3 }));
}

#[test]
fn data_before_the_first_entry_is_refused_even_with_adjusted_offsets() {
    // Prepending shifts every offset; a writer that also fixed the offsets
    // produces a self-consistent archive with bytes no entry owns.
    let shifted = prepend(&build(&[raw("repo/targets/a", b"hello")], false), 100);
    assert!(matches!(intake(&shifted).unwrap_err(), ZipError::LeadingData { bytes: 100 }));
}

#[test]
fn a_unicode_path_field_and_a_differing_local_name_are_refused() {
    let renamed = raw("repo/targets/a", b"hello").renamed_to("repo/targets/b");
    assert!(matches!(intake(&build(&[renamed], false)).unwrap_err(), ZipError::RenamingExtraField { .. }));
    let mut other = raw("repo/targets/a", b"hello");
    other.local_name = Some("repo/targets/b".into());
    let error = intake(&build(&[other], false)).unwrap_err();
    assert!(matches!(error, ZipError::HeaderMismatch { what: "name", .. }), "{error}");
}

/// Data prepended with every offset fixed up, ZIP64 records included: the
/// `zip` crate reads the archive (so the trick is real), the intake refuses
/// the bytes no entry owns.
#[test]
fn prepended_data_is_refused_in_zip64_archives_too() {
    for zip64 in [false, true] {
        let bytes = prepend(&build(&[raw("repo/targets/a", b"hello")], zip64), 100);
        let view = zip_crate_view(&bytes).expect("self-consistent for the zip crate");
        assert_eq!(view["repo/targets/a"], b"hello", "zip64 {zip64}");
        let error = intake(&bytes).unwrap_err();
        assert!(error.to_string().contains("100 bytes of data before"), "zip64 {zip64}: {error}");
    }
}

#[test]
fn duplicates_are_refused_in_zip64_archives_too() {
    let entries = [raw("repo/targets/a", b"one"), raw("repo/targets/a", b"two")];
    for zip64 in [false, true] {
        let error = intake(&build(&entries, zip64)).unwrap_err();
        assert!(matches!(error, ZipError::Duplicate { .. }), "zip64 {zip64}: {error}");
    }
}

#[test]
fn bounds_are_checked_before_anything_is_allocated() {
    // An end record claiming 2^64-1 entries and a directory as large as the
    // file: refused on the count, without reading the directory.
    let bytes = claim_zip64_entries(&build(&[raw("repo/targets/a", b"hello")], true), u64::MAX);
    assert!(matches!(intake(&bytes).unwrap_err(), ZipError::TooManyEntries { .. }));
    let long = "repo/targets/".to_string() + &"n".repeat(MAX_NAME_BYTES);
    assert!(matches!(intake(&build(&[raw(&long, b"x")], false)).unwrap_err(), ZipError::NameTooLong { .. }));
    // Sizes near 2^64 in a ZIP64 extra field: checked arithmetic, no panic.
    assert!(intake(&zip64_sizes_near_the_limit("repo/targets/a", b"hello")).is_err());
}

/// What the `zip` crate, an independent reader, sees: file names and
/// contents, or nothing if it refuses the archive.
fn zip_crate_view(bytes: &[u8]) -> Option<BTreeMap<String, Vec<u8>>> {
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes)).ok()?;
    let mut contents = BTreeMap::new();
    for index in 0..archive.len() {
        let mut file = archive.by_index(index).ok()?;
        if file.is_dir() {
            continue;
        }
        let mut data = Vec::new();
        file.read_to_end(&mut data).ok()?;
        // A name twice: this reader keeps one, so it sees something else.
        if contents.insert(file.name().ok()?.to_string(), data).is_some() {
            return None;
        }
    }
    Some(contents)
}

/// Ways to make an archive that readers may read differently.
#[derive(Clone, Debug)]
enum Mutation {
    AppendEndRecord,
    Prepend(usize),
    RenameExtraField(prop::sample::Index),
    OtherLocalName(prop::sample::Index),
    Duplicate(prop::sample::Index),
    Flip(prop::sample::Index, u8),
    Truncate(prop::sample::Index),
    Junk(Vec<u8>),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        Just(Mutation::AppendEndRecord),
        (1..300usize).prop_map(Mutation::Prepend),
        any::<prop::sample::Index>().prop_map(Mutation::RenameExtraField),
        any::<prop::sample::Index>().prop_map(Mutation::OtherLocalName),
        any::<prop::sample::Index>().prop_map(Mutation::Duplicate),
        (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(at, value)| Mutation::Flip(at, value)),
        any::<prop::sample::Index>().prop_map(Mutation::Truncate),
        proptest::collection::vec(any::<u8>(), 1..40).prop_map(Mutation::Junk),
    ]
}

/// A hand-made archive of `entries` with structural `mutations` applied.
fn mutated(mut entries: Vec<RawEntry>, zip64: bool, mutations: &[Mutation]) -> Vec<u8> {
    for mutation in mutations {
        match mutation {
            Mutation::RenameExtraField(at) => {
                let at = at.index(entries.len());
                entries[at] = entries[at].clone().renamed_to("repo/targets/renamed");
            }
            Mutation::OtherLocalName(at) => {
                let at = at.index(entries.len());
                entries[at].local_name = Some("repo/targets/other".into());
            }
            Mutation::Duplicate(at) => {
                let mut copy = entries[at.index(entries.len())].clone();
                copy.data.push(b'!');
                entries.push(copy);
            }
            _ => {}
        }
    }
    let mut bytes = build(&entries, zip64);
    // Prepending fixes up offsets, so it needs the archive as built.
    if let Some(Mutation::Prepend(count)) = mutations.iter().find(|m| matches!(m, Mutation::Prepend(_))) {
        bytes = prepend(&bytes, *count);
    }
    for mutation in mutations {
        match mutation {
            Mutation::AppendEndRecord => bytes = append_end_record(&bytes),
            Mutation::Flip(at, value) => {
                let at = at.index(bytes.len());
                bytes[at] = *value;
            }
            Mutation::Truncate(at) => bytes.truncate(at.index(bytes.len())),
            Mutation::Junk(junk) => bytes.extend_from_slice(junk),
            _ => {}
        }
    }
    bytes
}

fn entries() -> impl Strategy<Value = Vec<RawEntry>> {
    let names = vec![
        "repo/metadata/1.root.json",
        "repo/metadata/timestamp.json",
        "repo/targets/a",
        "repo/targets/b b",
    ];
    proptest::collection::vec(
        (prop::sample::select(names), proptest::collection::vec(any::<u8>(), 0..300)),
        1..4,
    )
    .prop_map(|entries| entries.into_iter().map(|(name, data)| RawEntry::new(name, &data)).collect())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Whatever the intake accepts, an independent reader reads the same
    /// way: same entries, same bytes. So no archive on which two readers
    /// disagree gets through.
    #[test]
    fn what_the_intake_accepts_the_zip_crate_reads_the_same(
        entries in entries(),
        zip64 in any::<bool>(),
        mutations in proptest::collection::vec(mutation(), 0..4),
    ) {
        let bytes = mutated(entries, zip64, &mutations);
        if let Ok(ours) = intake(&bytes) {
            prop_assert_eq!(Some(ours), zip_crate_view(&bytes), "mutations {:?}", mutations);
        }
    }

    /// Each structural trick alone is refused.
    #[test]
    fn each_disagreement_trick_is_refused(entries in entries(), zip64 in any::<bool>(), trick in mutation()) {
        let refused = match &trick {
            Mutation::Flip(..) | Mutation::Truncate(_) => return Ok(()),
            _ => true,
        };
        let distinct = entries.iter().map(|e| &e.name).collect::<std::collections::BTreeSet<_>>().len() == entries.len();
        let bytes = mutated(entries, zip64, std::slice::from_ref(&trick));
        if distinct || matches!(trick, Mutation::Duplicate(_)) {
            prop_assert_eq!(intake(&bytes).is_err(), refused, "{:?}", trick);
        }
    }
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
                                cut in any::<prop::sample::Index>(), truncate in any::<bool>(),
                                zip64 in any::<bool>(), handmade in any::<bool>()) {
        let mut bytes = if handmade {
            build(&[raw("repo/metadata/1.root.json", b"{}"), raw("repo/targets/a", &[9; 200])], zip64)
        } else {
            valid_zip()
        };
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
