//! SplitMix64: the one small generator of the workspace.
//!
//! Everything in tensorbake that must give the same numbers on every machine and in
//! every version uses it: the loader's epoch order, tiny random-weight models, seeded
//! fresh weights, synthetic images. `rand`'s generators are not used for these because
//! their output may change between versions; SplitMix64's never does.
//!
//! Reference: Steele, Lea, Flood, "Fast Splittable Pseudorandom Number Generators"
//! (OOPSLA 2014); constants as in Vigna's `splitmix64.c`.
//!
//! ```
//! use tensorbake_kit::rng::SplitMix64;
//! let mut a = SplitMix64::new(7);
//! let mut b = SplitMix64::new(7);
//! assert_eq!(a.next_u64(), b.next_u64());
//! assert!(a.below(10) < 10);
//! ```

/// SplitMix64 state. `Clone` to fork a stream, `state()`/`new()` to save and restore it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator whose first output is `mix(seed)`.
    #[must_use]
    pub const fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// A generator for one named stream: FNV-1a of `name` mixed with `seed`, so that
    /// each name (a tensor, a purpose) draws its own numbers, independent of the order
    /// in which names are visited.
    #[must_use]
    pub fn for_name(seed: u64, name: &str) -> Self {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in name.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        Self(h ^ seed.wrapping_mul(0xD1B5_4A32_D192_ED03))
    }

    /// The current state (what [`SplitMix64::new`] takes to resume the stream).
    #[must_use]
    pub const fn state(&self) -> u64 {
        self.0
    }

    /// The SplitMix64 finaliser alone: a fast, well-mixed 64-bit hash.
    #[must_use]
    pub const fn mix(z: u64) -> u64 {
        let z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        let z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let out = Self::mix(self.0);
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        out
    }

    /// Uniform in `0..n` (Lemire's multiply-shift with rejection; `n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        let threshold = n.wrapping_neg() % n;
        loop {
            let m = u128::from(self.next_u64()) * u128::from(n);
            if (m as u64) >= threshold {
                return (m >> 64) as u64;
            }
        }
    }

    /// Uniform in (0, 1], 53 bits.
    pub fn unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box-Muller, one value per two draws).
    pub fn normal(&mut self) -> f64 {
        let (u, v) = (self.unit(), self.unit());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_reference_sequence() {
        // splitmix64.c with x = 0: the first outputs.
        let mut r = SplitMix64::new(0);
        assert_eq!(r.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(r.next_u64(), 0x6E78_9E6A_A1B9_65F4);
        assert_eq!(r.next_u64(), 0x06C4_5D18_8009_454F);
    }

    #[test]
    fn below_is_in_range_and_covers_it() {
        let mut rng = SplitMix64::new(1);
        let mut seen = [false; 5];
        for _ in 0..200 {
            let v = rng.below(5);
            assert!(v < 5);
            seen[v as usize] = true;
        }
        assert!(seen.iter().all(|&s| s));
    }

    #[test]
    fn normal_has_unit_moments_and_streams_differ_by_name() {
        let mut r = SplitMix64::for_name(3, "a.weight");
        let v: Vec<f64> = (0..20_000).map(|_| r.normal()).collect();
        let m = v.iter().sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / v.len() as f64;
        assert!(m.abs() < 0.03 && (var - 1.0).abs() < 0.05, "{m} {var}");
        let a = SplitMix64::for_name(3, "a.weight").next_u64();
        let b = SplitMix64::for_name(3, "b.weight").next_u64();
        let c = SplitMix64::for_name(4, "a.weight").next_u64();
        assert!(a != b && a != c);
    }
}
