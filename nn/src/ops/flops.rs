//! Counting the multiply-adds the seam's matrix ops perform, for benchmarks that
//! report a fraction of the FLOP ceiling ([`count`]).
//!
//! [`super::linear`], [`super::conv2d`] and [`super::attention`] add `2·m·n·k` (one
//! multiply and one add per term) for the products they run, forward only, while a
//! [`count`] is open on the calling thread. Every matrix product of the model files
//! goes through those three, so the count is the model's: norms, activations and
//! softmax are left out, as the usual FLOP figures of these models leave them out.
//! Counting is shape arithmetic and costs nothing measurable; outside [`count`] it is
//! one thread-local read.

use std::cell::Cell;

thread_local! {
    static COUNTER: Cell<Option<u64>> = const { Cell::new(None) };
}

/// Runs `f` and returns its result with the FLOPs the seam's matrix ops performed
/// on this thread meanwhile. Nested counts each see their own part; the outer one
/// includes the inner.
pub fn count<R>(f: impl FnOnce() -> R) -> (R, u64) {
    let outer = COUNTER.with(|c| c.replace(Some(0)));
    let r = f();
    let inner = COUNTER.with(|c| c.replace(outer)).unwrap_or(0);
    if let Some(o) = outer {
        COUNTER.with(|c| c.set(Some(o + inner)));
    }
    (r, inner)
}

/// Adds `flops` to the open count, if any.
pub(crate) fn add(flops: u64) {
    COUNTER.with(|c| {
        if let Some(n) = c.get() {
            c.set(Some(n.saturating_add(flops)));
        }
    });
}

/// `2·m·n·k` as u64.
pub(crate) fn matmul(m: usize, n: usize, k: usize) -> u64 {
    2 * (m as u64) * (n as u64) * (k as u64)
}
