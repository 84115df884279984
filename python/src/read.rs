//! Reads of many (sample, array) pairs in one call, on scoped threads.
//!
//! Every pair is one job: one inner chunk decoded by tensorbake-store and copied into
//! its place in the batch buffer of its array (or, for a single sample, the decoded
//! buffer itself is the result). Jobs are handed out one at a time from a shared
//! queue, so threads that draw small jobs take more of them. Scoped threads, started
//! per call, rather than a pool: nothing survives into a forked DataLoader worker, and
//! starting two or four threads costs tens of microseconds against the milliseconds a
//! batch takes (small calls stay on the calling thread).

use std::sync::{Mutex, OnceLock};

use tensorbake_store::layout::ArrayKind;
use tensorbake_store::{StoreError, StoreReader};

/// The result for one array.
pub(crate) enum Out {
    /// The samples' little-endian bytes, one after another.
    Bytes(Vec<u8>),
    /// One string per sample.
    Strings(Vec<String>),
    /// Written into the buffer the caller gave.
    Written,
}

/// Where one job puts its result.
enum Slot<'a> {
    /// The whole result of a one-sample read (the decoded buffer, no copy) and the
    /// length it must have.
    Whole(&'a mut Vec<u8>, usize),
    /// One sample's place in a batch buffer.
    Row(&'a mut [u8]),
    /// One string.
    Str(&'a mut String),
}

struct Job<'a> {
    index: u64,
    array: &'a str,
    slot: Slot<'a>,
}

/// Rough cost of a job in microseconds on one core: a fixed part (index lookup, read
/// call, decoder setup) and ~1 GB/s of zstd + crc32c + copy.
fn job_cost_us(sample_bytes: u64) -> u64 {
    8 + sample_bytes / 1000
}

/// Threads worth starting for `jobs` costing `cost_us` in total, at most `limit`.
fn auto_threads(jobs: usize, cost_us: u64, limit: usize) -> usize {
    // A thread is worth it for ~100 us of work or more.
    let by_work = usize::try_from(cost_us / 100).unwrap_or(usize::MAX).max(1);
    by_work.min(jobs).min(limit).max(1)
}

fn size_mismatch(
    reader: &StoreReader,
    index: u64,
    array: &str,
    got: usize,
    want: usize,
) -> StoreError {
    StoreError::Metadata {
        location: reader.location().to_string(),
        key: array.to_string(),
        reason: format!(
            "sample {index} decoded to {got} bytes, the array's dtype and shape say {want}"
        ),
    }
}

fn run(reader: &StoreReader, job: Job<'_>) -> Result<(), StoreError> {
    let Job { index, array, slot } = job;
    match slot {
        Slot::Whole(out, want) => {
            let bytes = reader.read_bytes(index, array)?;
            if bytes.len() != want {
                return Err(size_mismatch(reader, index, array, bytes.len(), want));
            }
            *out = bytes;
        }
        Slot::Row(out) => reader.read_bytes_into(index, array, out)?,
        Slot::Str(out) => *out = reader.read_string(index, array)?,
    }
    Ok(())
}

/// The cores this process may use, looked up once: `available_parallelism` reads the
/// cgroup quota files, ~50 us a call.
fn cores() -> usize {
    static CORES: OnceLock<usize> = OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, std::num::NonZero::get))
}

/// Reads `arrays` (with their kinds) of every sample in `indices`, on up to `threads`
/// threads (0: as many as the work is worth, up to the available cores). Results are
/// in the order of `arrays`; samples in the order of `indices`. A numeric array whose
/// `into` entry is a buffer (of `indices.len()` samples' bytes, checked by the caller)
/// is written there and comes back as [`Out::Written`].
///
/// # Errors
/// The first error any job met (naming the store, part and array); the other jobs
/// stop early.
pub(crate) fn read_many(
    reader: &StoreReader,
    indices: &[u64],
    arrays: &[(String, ArrayKind)],
    mut into: Vec<Option<&mut [u8]>>,
    threads: usize,
) -> Result<Vec<Out>, StoreError> {
    let n = indices.len();
    into.resize_with(arrays.len(), || None);
    let sample_bytes: Vec<u64> = arrays.iter().map(|(_, k)| k.sample_bytes()).collect();
    let mut outs: Vec<Out> = arrays
        .iter()
        .zip(&sample_bytes)
        .zip(&into)
        .map(|(((_, kind), &bytes), dst)| match kind {
            ArrayKind::Fixed { .. } if dst.is_some() => Out::Written,
            ArrayKind::Fixed { .. } if n == 1 => Out::Bytes(Vec::new()),
            ArrayKind::Fixed { .. } => {
                Out::Bytes(vec![0u8; usize::try_from(bytes).unwrap_or(0) * n])
            }
            ArrayKind::Str => Out::Strings(vec![String::new(); n]),
        })
        .collect();

    // Jobs sample-major: the arrays of one sample are read together.
    let mut per_array: Vec<Vec<Slot<'_>>> = Vec::with_capacity(arrays.len());
    for ((out, &bytes), dst) in outs.iter_mut().zip(&sample_bytes).zip(into) {
        let row = usize::try_from(bytes).unwrap_or(usize::MAX);
        per_array.push(match out {
            Out::Written => dst
                .map(|buf| buf.chunks_exact_mut(row.max(1)).map(Slot::Row).collect())
                .unwrap_or_default(),
            Out::Bytes(v) => {
                if n == 1 {
                    vec![Slot::Whole(v, row)]
                } else {
                    v.chunks_exact_mut(row.max(1)).map(Slot::Row).collect()
                }
            }
            Out::Strings(v) => v.iter_mut().map(Slot::Str).collect(),
        });
    }
    let mut columns: Vec<_> = per_array.into_iter().map(Vec::into_iter).collect();
    let mut jobs = Vec::with_capacity(n * arrays.len());
    let mut cost_us = 0u64;
    for &index in indices {
        for ((column, (name, _)), &bytes) in columns.iter_mut().zip(arrays).zip(&sample_bytes) {
            if let Some(slot) = column.next() {
                jobs.push(Job {
                    index,
                    array: name.as_str(),
                    slot,
                });
                cost_us += job_cost_us(bytes);
            }
        }
    }

    let cores = cores();
    let threads = if threads == 0 {
        auto_threads(jobs.len(), cost_us, cores)
    } else {
        threads.min(jobs.len()).max(1)
    };
    if threads == 1 {
        for job in jobs {
            run(reader, job)?;
        }
        return Ok(outs);
    }

    let queue = Mutex::new(jobs.into_iter());
    let failed: Mutex<Option<StoreError>> = Mutex::new(None);
    let work = || {
        loop {
            if failed.lock().map_or(true, |f| f.is_some()) {
                return;
            }
            let Some(job) = queue.lock().ok().and_then(|mut q| q.next()) else {
                return;
            };
            if let Err(e) = run(reader, job)
                && let Ok(mut f) = failed.lock()
            {
                f.get_or_insert(e);
            }
        }
    };
    std::thread::scope(|s| {
        for _ in 1..threads {
            s.spawn(work);
        }
        work();
    });
    drop(queue);
    match failed.into_inner() {
        Ok(Some(e)) => Err(e),
        Ok(None) => Ok(outs),
        Err(_) => Err(StoreError::InvalidLoader("a read thread panicked".into())),
    }
}
