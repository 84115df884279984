//! The SA-1B caption index: `SA1B_caption.tar.gz` (PixArt's SAM-LLaVA captions, one
//! `sa_<id>.txt` per image) streamed once into a redb database keyed by sample id.
//!
//! Building is resumable: entries are committed in batches together with the count
//! of tar entries consumed, so an interrupted build (a dropped stream, a killed
//! process) continues on the next call where the last commit left off: the stream
//! is read again from the start (a gzip stream cannot be entered in the middle) but
//! the entries already committed are skipped, not rewritten. The last commit marks
//! the index complete. [`CaptionIndex::open`] refuses an incomplete index.
//!
//! A complete index is opened read-only without taking redb's file lock (the file
//! is immutable from then on), so any number of worker processes on a node can
//! share one index file.

use std::cell::Cell;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Mutex;

use redb::{Database, ReadOnlyTable, ReadableTableMetadata, StorageBackend, TableDefinition};

const CAPTIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("captions");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const SOURCE: TableDefinition<&str, &str> = TableDefinition::new("source");

const KEY_FORMAT: &str = "format_version";
const KEY_ENTRIES: &str = "entries_done";
const KEY_CAPTIONS: &str = "captions";
const KEY_SKIPPED: &str = "skipped";
const KEY_INVALID: &str = "invalid_utf8";
const KEY_COMPLETE: &str = "complete";
const KEY_SOURCE: &str = "source";
const FORMAT_VERSION: u64 = 1;

/// Errors of the caption index.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// The database file could not be created, opened, read or written.
    #[error("caption index {path}: {source}")]
    Db {
        /// The database file.
        path: PathBuf,
        /// What redb reported (boxed: redb's error is large).
        #[source]
        source: Box<redb::Error>,
    },
    /// The caption tar could not be read.
    #[error("caption index {path}: reading {label} at tar entry {entry}: {source}")]
    Read {
        /// The database file being built.
        path: PathBuf,
        /// The source label (file name or URL).
        label: String,
        /// Index of the tar entry being read.
        entry: u64,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// [`CaptionIndex::open`] on an index whose build has not finished.
    #[error(
        "caption index {path} is incomplete ({entries} tar entries of {label} indexed); run `tensorbake captions index` again to resume it"
    )]
    Incomplete {
        /// The database file.
        path: PathBuf,
        /// Source label recorded by the build.
        label: String,
        /// Tar entries indexed so far.
        entries: u64,
    },
    /// Resuming a build with a different source than the one it started with.
    #[error(
        "caption index {path} was started from {existing}, not {given}; delete it or pass the same source"
    )]
    SourceMismatch {
        /// The database file.
        path: PathBuf,
        /// Source label recorded by the interrupted build.
        existing: String,
        /// Source label given now.
        given: String,
    },
    /// The file is a redb database, but not a caption index of this version.
    #[error(
        "{path} is not a tensorbake caption index (format version {found:?}, expected {FORMAT_VERSION})"
    )]
    NotAnIndex {
        /// The database file.
        path: PathBuf,
        /// The format version found, if any.
        found: Option<u64>,
    },
    /// A stored caption is not UTF-8 (use [`CaptionIndex::get_bytes`] to count it).
    #[error("caption index {path}: caption of {id} is not UTF-8")]
    InvalidUtf8 {
        /// The database file.
        path: PathBuf,
        /// The sample id.
        id: String,
    },
}

fn db_err(path: &Path, e: impl Into<redb::Error>) -> IndexError {
    IndexError::Db {
        path: path.to_path_buf(),
        source: Box::new(e.into()),
    }
}

/// Options of [`build_index`].
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Names the source (its file name or URL); recorded, and checked on resume.
    pub label: String,
    /// Tar entries per committed batch (a resumed build redoes at most this many).
    pub commit_every: u64,
}

impl BuildOptions {
    /// Options for a source named `label`, committing every 100,000 entries.
    #[must_use]
    pub fn new(label: impl Into<String>) -> Self {
        Self {
            label: label.into(),
            commit_every: 100_000,
        }
    }
}

/// Where a build is, reported to the progress callback after each batch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BuildProgress {
    /// Tar entries consumed (including those skipped on resume).
    pub entries: u64,
    /// Captions stored.
    pub captions: u64,
    /// Entries that are not `.txt` files (directories, other files).
    pub skipped: u64,
    /// `.txt` members that are not UTF-8 (stored anyway; counted at lookup).
    pub invalid_utf8: u64,
    /// Bytes read from the source (compressed, as streamed).
    pub source_bytes: u64,
    /// Tar entries that a previous, interrupted build had already committed.
    pub resumed_from: u64,
}

/// What a finished build did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildReport {
    /// Final counters.
    pub progress: BuildProgress,
    /// The index was already complete: nothing was read.
    pub already_complete: bool,
}

/// The sample id of a caption member: its file name without `.txt`
/// (`SA1B_caption/sa_1234.txt` -> `sa_1234`); `None` for anything else.
#[must_use]
pub fn caption_id(member: &str) -> Option<&str> {
    let name = member.rsplit('/').next()?;
    let id = name.strip_suffix(".txt")?;
    (!id.is_empty() && !id.starts_with('.')).then_some(id)
}

struct Counting<R> {
    inner: R,
    count: Rc<Cell<u64>>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.set(self.count.get() + n as u64);
        Ok(n)
    }
}

/// Wraps `reader` in a gzip decoder if it starts with the gzip magic bytes.
fn sniff_gzip<'a, R: Read + 'a>(reader: R) -> io::Result<Box<dyn Read + 'a>> {
    let mut buf = BufReader::with_capacity(1 << 20, reader);
    let head = buf.fill_buf()?;
    if head.starts_with(&[0x1F, 0x8B]) {
        Ok(Box::new(flate2::bufread::MultiGzDecoder::new(buf)))
    } else {
        Ok(Box::new(buf))
    }
}

fn read_meta(path: &Path, db: &Database) -> Result<Meta, IndexError> {
    let txn = db.begin_read().map_err(|e| db_err(path, e))?;
    let meta = match txn.open_table(META) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Meta::default()),
        Err(e) => return Err(db_err(path, e)),
    };
    let get = |k: &str| -> Result<Option<u64>, IndexError> {
        Ok(meta.get(k).map_err(|e| db_err(path, e))?.map(|v| v.value()))
    };
    let label = match txn.open_table(SOURCE) {
        Ok(t) => t
            .get(KEY_SOURCE)
            .map_err(|e| db_err(path, e))?
            .map(|v| v.value().to_string()),
        Err(redb::TableError::TableDoesNotExist(_)) => None,
        Err(e) => return Err(db_err(path, e)),
    };
    Ok(Meta {
        format: get(KEY_FORMAT)?,
        entries: get(KEY_ENTRIES)?.unwrap_or(0),
        captions: get(KEY_CAPTIONS)?.unwrap_or(0),
        skipped: get(KEY_SKIPPED)?.unwrap_or(0),
        invalid_utf8: get(KEY_INVALID)?.unwrap_or(0),
        complete: get(KEY_COMPLETE)?.unwrap_or(0) == 1,
        label,
    })
}

#[derive(Debug, Default)]
struct Meta {
    format: Option<u64>,
    entries: u64,
    captions: u64,
    skipped: u64,
    invalid_utf8: u64,
    complete: bool,
    label: Option<String>,
}

/// Streams a caption tar (gzip or plain, sniffed) into the index at `db_path`,
/// creating it, resuming it, or returning at once if it is already complete.
///
/// # Errors
/// [`IndexError::Read`] when the stream fails (what was committed stays, and the
/// next call resumes from there), [`IndexError::SourceMismatch`] when resuming
/// with another source, [`IndexError::Db`] / [`IndexError::NotAnIndex`] for the file.
pub fn build_index<R: Read>(
    db_path: &Path,
    reader: R,
    options: &BuildOptions,
    mut progress: impl FnMut(&BuildProgress),
) -> Result<BuildReport, IndexError> {
    let path = db_path;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| db_err(path, redb::StorageError::Io(e)))?;
    }
    let db = Database::create(path).map_err(|e| db_err(path, e))?;
    let meta = read_meta(path, &db)?;
    if meta.format.is_some_and(|v| v != FORMAT_VERSION) {
        return Err(IndexError::NotAnIndex {
            path: path.to_path_buf(),
            found: meta.format,
        });
    }
    let mut state = BuildProgress {
        entries: meta.entries,
        captions: meta.captions,
        skipped: meta.skipped,
        invalid_utf8: meta.invalid_utf8,
        source_bytes: 0,
        resumed_from: meta.entries,
    };
    if meta.complete {
        return Ok(BuildReport {
            progress: state,
            already_complete: true,
        });
    }
    if let Some(existing) = meta.label.filter(|l| *l != options.label) {
        return Err(IndexError::SourceMismatch {
            path: path.to_path_buf(),
            existing,
            given: options.label.clone(),
        });
    }
    {
        let txn = db.begin_write().map_err(|e| db_err(path, e))?;
        {
            let mut m = txn.open_table(META).map_err(|e| db_err(path, e))?;
            m.insert(KEY_FORMAT, FORMAT_VERSION)
                .map_err(|e| db_err(path, e))?;
            let mut s = txn.open_table(SOURCE).map_err(|e| db_err(path, e))?;
            s.insert(KEY_SOURCE, options.label.as_str())
                .map_err(|e| db_err(path, e))?;
            txn.open_table(CAPTIONS).map_err(|e| db_err(path, e))?;
        }
        txn.commit().map_err(|e| db_err(path, e))?;
    }

    let count = Rc::new(Cell::new(0u64));
    let read_err = |entry: u64, source: io::Error| IndexError::Read {
        path: path.to_path_buf(),
        label: options.label.clone(),
        entry,
        source,
    };
    let counting = Counting {
        inner: reader,
        count: Rc::clone(&count),
    };
    let stream = sniff_gzip(counting).map_err(|e| read_err(0, e))?;
    let mut archive = tar::Archive::new(stream);
    let entries = archive.entries().map_err(|e| read_err(0, e))?;

    let skip = meta.entries;
    let mut seen: u64 = 0;
    let commit_every = options.commit_every.max(1);
    let mut txn = db.begin_write().map_err(|e| db_err(path, e))?;
    let mut in_batch: u64 = 0;
    let mut body = Vec::new();
    for entry in entries {
        let mut entry = entry.map_err(|e| read_err(seen, e))?;
        seen += 1;
        if seen <= skip {
            continue;
        }
        let name = entry
            .path()
            .map_err(|e| read_err(seen - 1, e))?
            .to_string_lossy()
            .into_owned();
        let is_file = entry.header().entry_type().is_file();
        match caption_id(&name).filter(|_| is_file) {
            Some(id) => {
                body.clear();
                entry
                    .read_to_end(&mut body)
                    .map_err(|e| read_err(seen - 1, e))?;
                if std::str::from_utf8(&body).is_err() {
                    state.invalid_utf8 += 1;
                }
                let mut t = txn.open_table(CAPTIONS).map_err(|e| db_err(path, e))?;
                let fresh = t
                    .insert(id, body.as_slice())
                    .map_err(|e| db_err(path, e))?
                    .is_none();
                if fresh {
                    state.captions += 1;
                }
            }
            None => state.skipped += 1,
        }
        state.entries = seen;
        in_batch += 1;
        if in_batch >= commit_every {
            write_counters(path, &txn, &state, false)?;
            txn.commit().map_err(|e| db_err(path, e))?;
            state.source_bytes = count.get();
            progress(&state);
            txn = db.begin_write().map_err(|e| db_err(path, e))?;
            in_batch = 0;
        }
    }
    if seen < skip {
        return Err(read_err(
            seen,
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "the source has {seen} tar entries but {skip} were already indexed from it"
                ),
            ),
        ));
    }
    write_counters(path, &txn, &state, true)?;
    txn.commit().map_err(|e| db_err(path, e))?;
    state.source_bytes = count.get();
    progress(&state);
    Ok(BuildReport {
        progress: state,
        already_complete: false,
    })
}

fn write_counters(
    path: &Path,
    txn: &redb::WriteTransaction,
    s: &BuildProgress,
    complete: bool,
) -> Result<(), IndexError> {
    let mut m = txn.open_table(META).map_err(|e| db_err(path, e))?;
    for (k, v) in [
        (KEY_ENTRIES, s.entries),
        (KEY_CAPTIONS, s.captions),
        (KEY_SKIPPED, s.skipped),
        (KEY_INVALID, s.invalid_utf8),
        (KEY_COMPLETE, u64::from(complete)),
    ] {
        m.insert(k, v).map_err(|e| db_err(path, e))?;
    }
    Ok(())
}

/// A read-only view of a finished file: reads come from the file (no lock taken),
/// the few writes redb makes while opening go to memory and are never persisted.
#[derive(Debug)]
struct ReadOnlyFile {
    file: Mutex<File>,
    len: Mutex<u64>,
    overlay: Mutex<Vec<(u64, Vec<u8>)>>,
}

impl StorageBackend for ReadOnlyFile {
    fn len(&self) -> io::Result<u64> {
        Ok(*self.len.lock().map_err(|_| io::Error::other("poisoned"))?)
    }

    fn read(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        {
            use std::io::{Seek, SeekFrom};
            let mut f = self.file.lock().map_err(|_| io::Error::other("poisoned"))?;
            let file_len = f.metadata()?.len();
            if offset < file_len {
                let avail = usize::try_from(file_len - offset)
                    .unwrap_or(usize::MAX)
                    .min(len);
                f.seek(SeekFrom::Start(offset))?;
                f.read_exact(&mut buf[..avail])?;
            }
        }
        let overlay = self
            .overlay
            .lock()
            .map_err(|_| io::Error::other("poisoned"))?;
        for (woff, data) in overlay.iter() {
            let (start, end) = (
                offset.max(*woff),
                (offset + len as u64).min(woff + data.len() as u64),
            );
            if start < end {
                let dst = usize::try_from(start - offset).map_err(io::Error::other)?;
                let src = usize::try_from(start - woff).map_err(io::Error::other)?;
                let n = usize::try_from(end - start).map_err(io::Error::other)?;
                buf[dst..dst + n].copy_from_slice(&data[src..src + n]);
            }
        }
        Ok(buf)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        *self.len.lock().map_err(|_| io::Error::other("poisoned"))? = len;
        Ok(())
    }

    fn sync_data(&self, _eventual: bool) -> io::Result<()> {
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.overlay
            .lock()
            .map_err(|_| io::Error::other("poisoned"))?
            .push((offset, data.to_vec()));
        Ok(())
    }
}

/// A complete caption index, open for lookups.
pub struct CaptionIndex {
    path: PathBuf,
    table: ReadOnlyTable<&'static str, &'static [u8]>,
    len: u64,
}

impl std::fmt::Debug for CaptionIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaptionIndex")
            .field("path", &self.path)
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl CaptionIndex {
    /// Opens a complete index for lookups (read-only, without locking the file).
    ///
    /// # Errors
    /// [`IndexError::Incomplete`] if its build has not finished,
    /// [`IndexError::NotAnIndex`] / [`IndexError::Db`] for other files.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, IndexError> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|e| db_err(path, redb::StorageError::Io(e)))?;
        let len = file
            .metadata()
            .map_err(|e| db_err(path, redb::StorageError::Io(e)))?
            .len();
        let backend = ReadOnlyFile {
            file: Mutex::new(file),
            len: Mutex::new(len),
            overlay: Mutex::new(Vec::new()),
        };
        let db = Database::builder()
            .create_with_backend(backend)
            .map_err(|e| db_err(path, e))?;
        let meta = read_meta(path, &db)?;
        if meta.format != Some(FORMAT_VERSION) {
            return Err(IndexError::NotAnIndex {
                path: path.to_path_buf(),
                found: meta.format,
            });
        }
        if !meta.complete {
            return Err(IndexError::Incomplete {
                path: path.to_path_buf(),
                label: meta.label.unwrap_or_default(),
                entries: meta.entries,
            });
        }
        let txn = db.begin_read().map_err(|e| db_err(path, e))?;
        let table = txn.open_table(CAPTIONS).map_err(|e| db_err(path, e))?;
        let len = table.len().map_err(|e| db_err(path, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            table,
            len,
        })
    }

    /// Number of captions.
    #[must_use]
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the index holds no caption.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The raw caption bytes of `id` (e.g. `sa_1234`), as stored in the tar.
    ///
    /// # Errors
    /// [`IndexError::Db`] if the file cannot be read.
    pub fn get_bytes(&self, id: &str) -> Result<Option<Vec<u8>>, IndexError> {
        Ok(self
            .table
            .get(id)
            .map_err(|e| db_err(&self.path, e))?
            .map(|v| v.value().to_vec()))
    }

    /// The raw caption of `id` (e.g. `sa_1234`).
    ///
    /// # Errors
    /// [`IndexError::InvalidUtf8`] if the stored caption is not UTF-8,
    /// [`IndexError::Db`] if the file cannot be read.
    pub fn get(&self, id: &str) -> Result<Option<String>, IndexError> {
        match self.get_bytes(id)? {
            None => Ok(None),
            Some(b) => String::from_utf8(b)
                .map(Some)
                .map_err(|_| IndexError::InvalidUtf8 {
                    path: self.path.clone(),
                    id: id.to_string(),
                }),
        }
    }
}

/// Opens the index at `db_path`, building (or resuming) it first from the source
/// `open_source` returns if it is not complete: what `ingest` and `run` call.
///
/// # Errors
/// As [`build_index`] and [`CaptionIndex::open`]; `open_source` errors are
/// reported as [`IndexError::Read`].
pub fn open_or_build<R: Read>(
    db_path: &Path,
    options: &BuildOptions,
    open_source: impl FnOnce() -> io::Result<R>,
    progress: impl FnMut(&BuildProgress),
) -> Result<CaptionIndex, IndexError> {
    match CaptionIndex::open(db_path) {
        Ok(index) => return Ok(index),
        Err(IndexError::Incomplete { .. }) => {}
        Err(IndexError::Db { .. }) if !db_path.exists() => {}
        Err(e) => return Err(e),
    }
    let reader = open_source().map_err(|source| IndexError::Read {
        path: db_path.to_path_buf(),
        label: options.label.clone(),
        entry: 0,
        source,
    })?;
    build_index(db_path, reader, options, progress)?;
    CaptionIndex::open(db_path)
}
