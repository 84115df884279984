//! The SA-1B caption index: build, lookups, resume after interruption, bad input.

use std::io::{self, Read, Write};

use tensorbake_ingest::caption::index::{
    BuildOptions, CaptionIndex, IndexError, build_index, caption_id, open_or_build,
};

/// Seeded captions for `n` samples, some with non-ASCII text.
fn captions(n: usize) -> Vec<(String, Vec<u8>)> {
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let words = [
        "a", "dog", "café", "on", "the", "beach", "🌅", "under", "trees", "red", "car",
    ];
    (0..n)
        .map(|i| {
            let len = 3 + (next() % 20) as usize;
            let text: Vec<&str> = (0..len)
                .map(|_| words[(next() % words.len() as u64) as usize])
                .collect();
            (format!("sa_{}", 1000 + i * 3), text.join(" ").into_bytes())
        })
        .collect()
}

/// A tar like SA1B_caption.tar.gz: a directory entry, the `.txt` members, and a
/// stray non-caption file.
fn tar_bytes(items: &[(String, Vec<u8>)], extra: &[(&str, &[u8])]) -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    let mut dir = tar::Header::new_gnu();
    dir.set_entry_type(tar::EntryType::Directory);
    dir.set_size(0);
    dir.set_mode(0o755);
    dir.set_cksum();
    tar.append_data(&mut dir, "SA1B_caption/", io::empty())
        .unwrap();
    for (id, body) in items {
        let mut h = tar::Header::new_gnu();
        h.set_size(body.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        tar.append_data(&mut h, format!("SA1B_caption/{id}.txt"), body.as_slice())
            .unwrap();
    }
    for (name, body) in extra {
        let mut h = tar::Header::new_gnu();
        h.set_size(body.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        tar.append_data(&mut h, name, *body).unwrap();
    }
    tar.into_inner().unwrap()
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(bytes).unwrap();
    gz.finish().unwrap()
}

/// A reader that fails with an I/O error after `limit` bytes.
struct FailAfter<'a> {
    data: &'a [u8],
    pos: usize,
    limit: usize,
}

impl Read for FailAfter<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos >= self.limit {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "connection reset",
            ));
        }
        let n = buf
            .len()
            .min(self.limit - self.pos)
            .min(self.data.len() - self.pos)
            .min(4096);
        buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// A reader that must not be read.
struct MustNotRead;

impl Read for MustNotRead {
    fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
        panic!("a complete index must not read its source again")
    }
}

#[test]
fn caption_ids_from_member_names() {
    assert_eq!(caption_id("SA1B_caption/sa_1234.txt"), Some("sa_1234"));
    assert_eq!(caption_id("./sa_7.txt"), Some("sa_7"));
    assert_eq!(caption_id("sa_7.json"), None);
    assert_eq!(caption_id("dir/.txt"), None);
}

#[test]
fn builds_from_gzip_and_looks_up_every_caption() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("captions.redb");
    let items = captions(3000);
    let tgz = gzip(&tar_bytes(
        &items,
        &[("SA1B_caption/README.md", b"not a caption")],
    ));
    let mut batches = 0;
    let report = build_index(
        &db,
        tgz.as_slice(),
        &BuildOptions {
            label: "SA1B_caption.tar.gz".into(),
            commit_every: 500,
        },
        |_| batches += 1,
    )
    .unwrap();
    assert!(!report.already_complete);
    let p = &report.progress;
    assert_eq!(p.captions, 3000);
    assert_eq!(p.entries, 3002);
    assert_eq!(p.skipped, 2, "the directory and README.md");
    assert_eq!(p.source_bytes, tgz.len() as u64);
    assert_eq!(batches, 7, "6 full batches and the final commit");

    let index = CaptionIndex::open(&db).unwrap();
    assert_eq!(index.len(), 3000);
    for (id, body) in &items {
        assert_eq!(
            index.get(id).unwrap().as_deref(),
            Some(std::str::from_utf8(body).unwrap())
        );
    }
    assert_eq!(index.get("sa_1").unwrap(), None);
    assert_eq!(index.get("README").unwrap(), None);
}

#[test]
fn plain_tar_is_accepted_and_opens_are_shared() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("captions.redb");
    let items = captions(50);
    build_index(
        &db,
        tar_bytes(&items, &[]).as_slice(),
        &BuildOptions::new("plain.tar"),
        |_| {},
    )
    .unwrap();
    // Two readers at once (as two workers on one node would): no lock conflict.
    let a = CaptionIndex::open(&db).unwrap();
    let b = CaptionIndex::open(&db).unwrap();
    assert_eq!(a.get(&items[7].0).unwrap(), b.get(&items[7].0).unwrap());
    assert!(a.get(&items[7].0).unwrap().is_some());
}

#[test]
fn an_interrupted_build_resumes_without_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("captions.redb");
    let items = captions(4000);
    let tgz = gzip(&tar_bytes(&items, &[]));
    let options = BuildOptions {
        label: "SA1B_caption.tar.gz".into(),
        commit_every: 300,
    };
    // The stream breaks halfway.
    let broken = FailAfter {
        data: &tgz,
        pos: 0,
        limit: tgz.len() / 2,
    };
    let err = build_index(&db, broken, &options, |_| {}).unwrap_err();
    assert!(matches!(err, IndexError::Read { .. }), "{err}");
    assert!(err.to_string().contains("SA1B_caption.tar.gz"), "{err}");

    // Not usable for lookups yet, and the error says how to continue.
    let err = CaptionIndex::open(&db).unwrap_err();
    let IndexError::Incomplete { entries, .. } = &err else {
        panic!("{err}")
    };
    let committed = *entries;
    assert!(
        committed > 0 && committed % 300 == 0,
        "committed {committed}"
    );
    assert!(err.to_string().contains("resume"), "{err}");

    // Resuming with another source is refused.
    let err = build_index(
        &db,
        tgz.as_slice(),
        &BuildOptions::new("other.tar.gz"),
        |_| {},
    )
    .unwrap_err();
    assert!(matches!(err, IndexError::SourceMismatch { .. }), "{err}");

    // Resume: skips what was committed, finishes, counts each caption once.
    let report = build_index(&db, tgz.as_slice(), &options, |_| {}).unwrap();
    assert_eq!(report.progress.resumed_from, committed);
    assert_eq!(report.progress.captions, 4000);
    assert_eq!(report.progress.entries, 4001);

    let index = CaptionIndex::open(&db).unwrap();
    assert_eq!(index.len(), 4000);
    for (id, body) in items.iter().step_by(37) {
        assert_eq!(
            index.get_bytes(id).unwrap().as_deref(),
            Some(body.as_slice())
        );
    }
    drop(index);

    // Complete: another build reads nothing.
    let report = build_index(&db, MustNotRead, &options, |_| {}).unwrap();
    assert!(report.already_complete);
    assert_eq!(report.progress.captions, 4000);
}

#[test]
fn bad_captions_in_the_tar_are_stored_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("captions.redb");
    let mut items = captions(10);
    items.push(("sa_bad".into(), b"caf\xe9".to_vec()));
    items.push(("sa_empty".into(), Vec::new()));
    items.push(("sa_nul".into(), b"a\0b".to_vec()));
    items.push(("sa_big".into(), vec![b'x'; 1 << 20]));
    let report = build_index(
        &db,
        gzip(&tar_bytes(&items, &[])).as_slice(),
        &BuildOptions::new("t"),
        |_| {},
    )
    .unwrap();
    assert_eq!(report.progress.invalid_utf8, 1);
    assert_eq!(report.progress.captions, 14);
    let index = CaptionIndex::open(&db).unwrap();
    let err = index.get("sa_bad").unwrap_err();
    assert!(
        matches!(err, IndexError::InvalidUtf8 { ref id, .. } if id == "sa_bad"),
        "{err}"
    );
    assert_eq!(index.get_bytes("sa_bad").unwrap().unwrap(), b"caf\xe9");
    assert_eq!(index.get("sa_empty").unwrap().as_deref(), Some(""));
    assert_eq!(index.get("sa_nul").unwrap().as_deref(), Some("a\0b"));
    assert_eq!(index.get_bytes("sa_big").unwrap().unwrap().len(), 1 << 20);
}

#[test]
fn open_or_build_builds_on_first_use_only() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("sub/captions.redb");
    let items = captions(20);
    let tgz = gzip(&tar_bytes(&items, &[]));
    let index = open_or_build(
        &db,
        &BuildOptions::new("c.tar.gz"),
        || Ok(tgz.as_slice()),
        |_| {},
    )
    .unwrap();
    assert_eq!(index.len(), 20);
    drop(index);
    let index = open_or_build(
        &db,
        &BuildOptions::new("c.tar.gz"),
        || -> io::Result<MustNotRead> { panic!("must not open the source again") },
        |_| {},
    )
    .unwrap();
    assert_eq!(
        index.get(&items[3].0).unwrap().map(|s| s.len()),
        Some(items[3].1.len())
    );
}

#[test]
fn a_file_that_is_not_an_index_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.redb");
    std::fs::write(&junk, b"this is not a database").unwrap();
    let err = CaptionIndex::open(&junk).unwrap_err();
    assert!(err.to_string().contains("junk.redb"), "{err}");
    let missing = dir.path().join("missing.redb");
    let err = CaptionIndex::open(&missing).unwrap_err();
    assert!(err.to_string().contains("missing.redb"), "{err}");
}
