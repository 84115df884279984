//! Helpers shared by the pipeline-parity tests.

use candle_core::Tensor;

/// Max |ours - diffusers| between decoded images `[B, 3, H, W]` (about [-1, 1]) and a
/// pipeline's `output_type="np"` output `[B, H, W, 3]`: ours mapped as the pipeline
/// maps them, `(x / 2 + 0.5).clamp(0, 1)`, channels last.
pub fn max_diff_np(img: &Tensor, reference: &Tensor) -> f32 {
    let img = ((img / 2.0).unwrap() + 0.5)
        .unwrap()
        .clamp(0f32, 1f32)
        .unwrap()
        .permute((0, 2, 3, 1))
        .unwrap();
    assert_eq!(img.dims(), reference.dims());
    (img - reference)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}
