//! Small helpers the benchmarks share.

/// The median of `v`: the middle value, the mean of the middle two for an even count,
/// 0 for none.
///
/// ```
/// use tensorbake_kit::measure::median;
/// assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
/// assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
/// assert_eq!(median(&[]), 0.0);
/// ```
#[must_use]
pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => 0.0,
        n if n % 2 == 1 => s[n / 2],
        n => 0.5 * (s[n / 2 - 1] + s[n / 2]),
    }
}
