//! The seam's contract: with no gradient needed each op is bit-for-bit what the
//! encoders computed before (candle's modules and fused kernels); on a gradient path
//! each op's gradient matches finite differences, where candle's fused kernels pass
//! none (the traps the trainer must avoid); a frozen weight costs no weight gradient.

use candle_core::{D, DType, Device, Module, Result, Tensor, Var};

use super::*;
use crate::testing::{rel_err, to_channels_last};

/// A seeded tensor of values in [-2, 2).
fn seeded(shape: &[usize], seed: u64, dtype: DType, dev: &Device) -> Result<Tensor> {
    let mut rng = tensorbake_kit::rng::SplitMix64::new(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| 4.0 * rng.unit() - 2.0).collect();
    Tensor::from_vec(v, shape, &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(dev)
}

/// Central finite differences of a scalar function of `x` (f64).
fn fd_grad(x: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    let base: Vec<f64> = x.flatten_all()?.to_vec1()?;
    let h = 1e-6;
    let mut g = Vec::with_capacity(base.len());
    for i in 0..base.len() {
        let mut up = base.clone();
        up[i] += h;
        let mut down = base.clone();
        down[i] -= h;
        let fu = f(&Tensor::from_vec(up, x.dims(), x.device())?)?.to_scalar::<f64>()?;
        let fd = f(&Tensor::from_vec(down, x.dims(), x.device())?)?.to_scalar::<f64>()?;
        g.push((fu - fd) / (2.0 * h));
    }
    Tensor::from_vec(g, x.dims(), x.device())
}

/// A loss that weighs every output differently (so a wrong gradient cannot cancel).
fn weighted_sum(y: &Tensor) -> Result<Tensor> {
    let w = seeded(y.dims(), 99, y.dtype(), y.device())?;
    (y * w)?.sum_all()
}

fn check_grad(x: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<()> {
    let var = Var::from_tensor(x)?;
    let loss = weighted_sum(&f(var.as_tensor())?)?;
    let grads = loss.backward()?;
    let got = grads
        .get(var.as_tensor())
        .expect("gradient reaches the input");
    let want = fd_grad(x, |t| weighted_sum(&f(t)?))?;
    let e = rel_err(got, &want)?;
    assert!(e < 1e-6, "gradient relative error {e}: {got} vs {want}");
    Ok(())
}

#[test]
fn candle_fused_kernels_silently_pass_no_gradient() -> Result<()> {
    let dev = Device::Cpu;
    let x = Var::from_tensor(&seeded(&[3, 8], 1, DType::F32, &dev)?)?;
    let w = Tensor::ones(8, DType::F32, &dev)?;
    let b = Tensor::zeros(8, DType::F32, &dev)?;
    let fused = [
        candle_nn::ops::softmax_last_dim(x.as_tensor())?,
        candle_nn::ops::rms_norm(x.as_tensor(), &w, 1e-6)?,
        candle_nn::ops::layer_norm(x.as_tensor(), &w, &b, 1e-6)?,
        candle_nn::LayerNorm::new(w.clone(), b.clone(), 1e-6).forward(x.as_tensor())?,
        candle_nn::RmsNorm::new(w.clone(), 1e-6).forward(x.as_tensor())?,
    ];
    for y in &fused {
        // the output does not even know it depends on x: no error, no gradient
        assert!(!y.track_op());
        let grads = y.sum_all()?.backward()?;
        assert!(grads.get(x.as_tensor()).is_none());
    }
    // the seam's ops on the same input do carry it
    let ours = [
        softmax_last_dim(x.as_tensor())?,
        rms_norm(x.as_tensor(), &w, 1e-6)?,
        layer_norm(x.as_tensor(), Some(&w), Some(&b), 1e-6)?,
    ];
    for y in &ours {
        assert!(y.track_op());
        let grads = weighted_sum(y)?.backward()?;
        assert!(grads.get(x.as_tensor()).is_some());
    }
    Ok(())
}

#[test]
fn seam_gradients_match_finite_differences() -> Result<()> {
    let dev = Device::Cpu;
    let x = seeded(&[2, 3, 6], 2, DType::F64, &dev)?;
    let w = seeded(&[6], 3, DType::F64, &dev)?;
    let b = seeded(&[6], 4, DType::F64, &dev)?;
    check_grad(&x, softmax_last_dim)?;
    check_grad(&x, |t| rms_norm(t, &w, 1e-6))?;
    check_grad(&x, |t| layer_norm(t, Some(&w), Some(&b), 1e-6))?;
    check_grad(&x, |t| layer_norm(t, None, None, 1e-6))?;
    let shift = seeded(&[2, 1, 6], 5, DType::F64, &dev)?;
    let scale = seeded(&[2, 1, 6], 6, DType::F64, &dev)?;
    check_grad(&x, |t| modulate(t, &shift, &scale))?;
    // attention: q, k, v from one input through different slices
    let qkv = seeded(&[1, 2, 4, 9], 7, DType::F64, &dev)?;
    let bias = seeded(&[1, 1, 4, 4], 8, DType::F64, &dev)?;
    check_grad(&qkv, |t| {
        let q = t.narrow(D::Minus1, 0, 3)?.contiguous()?;
        let k = t.narrow(D::Minus1, 3, 3)?.contiguous()?;
        let v = t.narrow(D::Minus1, 6, 3)?.contiguous()?;
        let opts = AttentionOpts {
            scale: Some(0.5),
            bias: Some(&bias),
            mask: None,
            softmax_f32: false,
        };
        attention(&q, &k, &v, &opts)
    })?;
    // group norm + silu over [B, C, H, W]
    let img = seeded(&[1, 4, 2, 3], 9, DType::F64, &dev)?;
    let gw = seeded(&[4], 10, DType::F64, &dev)?;
    let gb = seeded(&[4], 11, DType::F64, &dev)?;
    check_grad(&img, |t| group_norm(t, 2, &gw, &gb, 1e-6, true))?;
    // after a bias: the gradient reaches the input and a trainable bias both
    let cb = seeded(&[4], 12, DType::F64, &dev)?;
    check_grad(&img, |t| {
        group_norm_after_bias(t, Some(&cb), 2, &gw, &gb, 1e-6, true)
    })?;
    check_grad(&cb, |t| {
        group_norm_after_bias(&img, Some(t), 2, &gw, &gb, 1e-6, true)
    })?;
    Ok(())
}

/// A mask passed apart from the bias is added to it: the same attention as one bias
/// of their sum (or, alone, as the mask passed as the bias), and a padded key's value
/// reaches no output of its sample.
#[test]
fn a_mask_apart_is_added_to_the_bias() -> Result<()> {
    let dev = Device::Cpu;
    let q = seeded(&[2, 3, 4, 8], 40, DType::F32, &dev)?;
    let k = seeded(&[2, 3, 6, 8], 41, DType::F32, &dev)?;
    let v = seeded(&[2, 3, 6, 8], 42, DType::F32, &dev)?;
    let pos = seeded(&[1, 3, 4, 6], 43, DType::F32, &dev)?;
    // sample 1 pads its last two keys
    let mut m = vec![0f32; 12];
    m[10..].fill(f32::MIN);
    let mask = Tensor::from_vec(m, (2, 1, 1, 6), &dev)?;
    let opts = |bias, mask| AttentionOpts {
        scale: Some(0.3),
        bias,
        mask,
        softmax_f32: true,
    };
    let max_diff =
        |a: &Tensor, b: &Tensor| -> Result<f32> { (a - b)?.abs()?.max_all()?.to_scalar::<f32>() };
    let apart = attention(&q, &k, &v, &opts(Some(&pos), Some(&mask)))?;
    let summed = pos.broadcast_add(&mask)?;
    let one = attention(&q, &k, &v, &opts(Some(&summed), None))?;
    assert_eq!(max_diff(&apart, &one)?, 0.0, "apart vs summed");
    let alone = attention(&q, &k, &v, &opts(None, Some(&mask)))?;
    let as_bias = attention(&q, &k, &v, &opts(Some(&mask), None))?;
    assert_eq!(max_diff(&alone, &as_bias)?, 0.0, "mask alone");
    // the last key's value changed: sample 1 (padded there) does not see it, sample 0 does
    let bump = Tensor::from_vec(vec![0f32, 0., 0., 0., 0., 10.], (1, 1, 6, 1), &dev)?;
    let bumped = attention(
        &q,
        &k,
        &v.broadcast_add(&bump)?,
        &opts(Some(&pos), Some(&mask)),
    )?;
    assert_eq!(
        max_diff(&bumped.get(1)?, &apart.get(1)?)?,
        0.0,
        "padded key seen"
    );
    assert!(
        max_diff(&bumped.get(0)?, &apart.get(0)?)? > 1e-3,
        "real key unseen"
    );
    Ok(())
}

#[test]
fn a_frozen_weight_gets_no_gradient_and_the_input_the_right_one() -> Result<()> {
    let dev = Device::Cpu;
    let x = seeded(&[2, 3, 5], 12, DType::F64, &dev)?;
    let w = seeded(&[4, 5], 13, DType::F64, &dev)?;
    let b = seeded(&[4], 14, DType::F64, &dev)?;
    // frozen: the input gradient is right...
    check_grad(&x, |t| linear(t, &w, Some(&b)))?;
    // ...and nothing is computed for the weight
    let xv = Var::from_tensor(&x)?;
    let grads = weighted_sum(&linear(xv.as_tensor(), &w, Some(&b))?)?.backward()?;
    assert!(grads.get(&w).is_none());
    assert!(grads.get(&b).is_none());
    // where candle's own matmul computes (and holds) one for the constant operand
    let wt = w.t()?;
    let plain = xv.as_tensor().reshape((6, 5))?.matmul(&wt)?;
    let grads = weighted_sum(&plain)?.backward()?;
    assert!(
        grads.get(&wt).is_some(),
        "candle computes a frozen weight's gradient"
    );
    // a trainable weight gets its gradient, equal to finite differences
    check_grad(&w, |wt| linear(&x, wt, Some(&b)))?;
    Ok(())
}

#[test]
fn master_weights_in_f32_receive_gradients_through_a_cast() -> Result<()> {
    let dev = Device::Cpu;
    let w = Var::from_tensor(&seeded(&[4, 5], 15, DType::F32, &dev)?)?;
    let x = seeded(&[3, 5], 16, DType::F16, &dev)?;
    let y = linear(&x, w.as_tensor(), None)?;
    assert_eq!(y.dtype(), DType::F16);
    let grads = y.to_dtype(DType::F32)?.sum_all()?.backward()?;
    let g = grads
        .get(w.as_tensor())
        .expect("the f32 variable gets a gradient");
    assert_eq!(g.dtype(), DType::F32);
    Ok(())
}

/// Without a gradient, each op is exactly what candle's module computes.
fn inference_is_candle_bit_for_bit(dev: &Device) -> Result<()> {
    let x = seeded(&[2, 6, 8], 20, DType::F32, dev)?;
    let w = seeded(&[8], 21, DType::F32, dev)?;
    let b = seeded(&[8], 22, DType::F32, dev)?;
    let same = |a: &Tensor, b: &Tensor| -> Result<()> {
        let d = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert_eq!(d, 0.0);
        Ok(())
    };
    let ln = candle_nn::LayerNorm::new(w.clone(), b.clone(), 1e-5);
    same(&layer_norm(&x, Some(&w), Some(&b), 1e-5)?, &ln.forward(&x)?)?;
    let lw = seeded(&[5, 8], 23, DType::F32, dev)?;
    let lb = seeded(&[5], 24, DType::F32, dev)?;
    let lin = candle_nn::Linear::new(lw.clone(), Some(lb.clone()));
    same(&linear(&x, &lw, Some(&lb))?, &lin.forward(&x)?)?;
    let img = seeded(&[2, 4, 5, 5], 25, DType::F32, dev)?;
    let gw = seeded(&[4], 26, DType::F32, dev)?;
    let gb = seeded(&[4], 27, DType::F32, dev)?;
    let gn = candle_nn::GroupNorm::new(gw.clone(), gb.clone(), 4, 2, 1e-6)?;
    same(
        &group_norm(&img, 2, &gw, &gb, 1e-6, false)?,
        &gn.forward(&img)?,
    )?;
    same(
        &group_norm(&img, 2, &gw, &gb, 1e-6, true)?,
        &gn.forward(&img)?.silu()?,
    )?;
    let cw = seeded(&[3, 4, 3, 3], 28, DType::F32, dev)?;
    let cb = seeded(&[3], 29, DType::F32, dev)?;
    let cfg = candle_nn::Conv2dConfig {
        padding: 1,
        ..Default::default()
    };
    let conv = candle_nn::Conv2d::new(cw.clone(), Some(cb.clone()), cfg);
    same(&conv2d(&img, &cw, Some(&cb), &cfg)?, &conv.forward(&img)?)?;
    same(
        &softmax_last_dim(&x)?,
        &candle_nn::ops::softmax_last_dim(&x)?,
    )?;
    Ok(())
}

crate::test_device!(
    inference_is_candle_bit_for_bit,
    inference_is_candle_bit_for_bit_cpu,
    inference_is_candle_bit_for_bit_cuda
);

#[test]
fn upcast_rms_norm_is_t5s_in_f32_and_weights_before_the_cast_in_bf16() -> Result<()> {
    let dev = Device::Cpu;
    let x = seeded(&[2, 3, 16], 21, DType::F32, &dev)?;
    let w = seeded(&[16], 22, DType::F32, &dev)?;
    // f32: the same numbers as T5's
    let a = rms_norm_upcast(&x, &w, 1e-6)?;
    let b = rms_norm(&x, &w, 1e-6)?;
    assert!(rel_err(&a, &b)? < 1e-7);
    // bf16: one rounding, after the weight (torch.nn.RMSNorm)
    let xb = x.to_dtype(DType::BF16)?;
    let y = rms_norm_upcast(&xb, &w, 1e-6)?;
    assert_eq!(y.dtype(), DType::BF16);
    let want = rms_norm(&xb.to_dtype(DType::F32)?, &w, 1e-6)?.to_dtype(DType::BF16)?;
    assert_eq!(rel_err(&y, &want)?, 0.0);
    let x64 = seeded(&[2, 3, 6], 23, DType::F64, &dev)?;
    let w64 = seeded(&[6], 24, DType::F64, &dev)?;
    check_grad(&x64, |t| rms_norm_upcast(t, &w64, 1e-6))
}

/// The FLOP count is `2·m·n·k` per product: a linear layer, a padded convolution,
/// attention's two products; a nested count sees its own part, the outer one all.
#[test]
fn flops_counts_every_matrix_product_once() -> Result<()> {
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1., (3, 5, 7), &dev)?;
    let w = Tensor::randn(0f32, 1., (4, 7), &dev)?;
    let (y, n) = flops::count(|| linear(&x, &w, None));
    assert_eq!(y?.dims(), &[3, 5, 4]);
    assert_eq!(n, 2 * 15 * 4 * 7);

    let img = Tensor::randn(0f32, 1., (2, 3, 8, 8), &dev)?;
    let k = Tensor::randn(0f32, 1., (6, 3, 3, 3), &dev)?;
    let cfg = candle_nn::Conv2dConfig {
        padding: 1,
        ..Default::default()
    };
    let (y, n) = flops::count(|| conv2d(&img, &k, None, &cfg));
    assert_eq!(y?.dims(), &[2, 6, 8, 8]);
    assert_eq!(n, 2 * (2 * 6 * 8 * 8) * (3 * 3 * 3));

    let q = Tensor::randn(0f32, 1., (1, 2, 5, 4), &dev)?;
    let kv = Tensor::randn(0f32, 1., (1, 2, 6, 4), &dev)?;
    let ((out, inner), outer) = flops::count(|| {
        let lin = linear(&x, &w, None);
        let inner = flops::count(|| attention(&q, &kv, &kv, &AttentionOpts::default()));
        (lin.and(inner.0), inner.1)
    });
    assert_eq!(out?.dims(), &[1, 2, 5, 4]);
    assert_eq!(inner, 2 * 2 * (2 * 5 * 6 * 4));
    assert_eq!(outer, inner + 2 * 15 * 4 * 7);
    // nothing is counted outside a count
    let (_, after) = flops::count(|| ());
    assert_eq!(after, 0);
    Ok(())
}

/// The fused GroupNorm (+ SiLU) (the CUDA kernel's Rust transcription) against the
/// composite: f32 to rounding, bf16 within its rounding (the composite rounds twice,
/// the fused op once), rank 3 and 4, with and without SiLU; bad shapes refused.
#[test]
fn fused_group_norm_matches_the_composite() -> Result<()> {
    use super::group_norm::fused_group_norm;
    let dev = Device::Cpu;
    for (shape, groups) in [
        (vec![2, 8, 5, 3], 4),
        (vec![1, 6, 7], 3),
        (vec![3, 4, 2, 2], 1),
    ] {
        let c = shape[1];
        let x = seeded(&shape, 11, DType::F32, &dev)?.affine(3.0, 0.5)?;
        let w = seeded(&[c], 12, DType::F32, &dev)?;
        let b = seeded(&[c], 13, DType::F32, &dev)?;
        for silu in [false, true] {
            let want = group_norm(&x, groups, &w, &b, 1e-6, silu)?;
            let got = fused_group_norm(&x, groups, &w, &b, 1e-6, silu)?;
            assert_eq!(got.dims(), want.dims());
            let e = rel_err(&got, &want)?;
            assert!(e < 1e-5, "{shape:?} silu {silu}: {e}");
            let xb = x.to_dtype(DType::BF16)?;
            let got = fused_group_norm(&xb, groups, &w, &b, 1e-6, silu)?;
            assert_eq!(got.dtype(), DType::BF16);
            let e = rel_err(&got, &group_norm(&xb, groups, &w, &b, 1e-6, silu)?)?;
            assert!(e < 2e-2, "{shape:?} silu {silu} bf16: {e}");
        }
    }
    let x = seeded(&[1, 6, 4], 1, DType::F32, &dev)?;
    let w = seeded(&[6], 2, DType::F32, &dev)?;
    let e = fused_group_norm(&x, 4, &w, &w, 1e-6, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("6 channels") && e.contains("4 groups"), "{e}");
    let short = seeded(&[5], 2, DType::F32, &dev)?;
    let e = fused_group_norm(&x, 3, &short, &short, 1e-6, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("6 values"), "{e}");
    Ok(())
}

/// On a GPU the seam's GroupNorm is the kernel: it matches the CPU composite in f32
/// and bf16 (skipped, saying so, without one).
#[test]
fn group_norm_kernel_matches_the_cpu_on_cuda() -> Result<()> {
    crate::testing::on_cuda("group_norm_kernel_matches_the_cpu_on_cuda", |dev| {
        let cpu = Device::Cpu;
        // a VAE-like shape: 32 groups of 4 channels, 33x17 pixels (not a block multiple)
        let x = (seeded(&[2, 128, 33, 17], 21, DType::F32, &cpu)? * 2.0)?;
        let w = seeded(&[128], 22, DType::F32, &cpu)?;
        let b = seeded(&[128], 23, DType::F32, &cpu)?;
        for silu in [false, true] {
            let want = group_norm(&x, 32, &w, &b, 1e-6, silu)?;
            for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 2e-2)] {
                let xd = x.to_dtype(dtype)?.to_device(dev)?;
                let got = group_norm(&xd, 32, &w.to_device(dev)?, &b.to_device(dev)?, 1e-6, silu)?;
                assert_eq!(got.dtype(), dtype);
                let e = rel_err(&got, &want)?;
                assert!(e < tol, "{dtype:?} silu {silu}: {e}");
            }
        }
        Ok(())
    })
}

/// The kernel's source compiles (NVRTC alone, no GPU needed): a CUDA build's tests
/// catch a kernel that would only fail on the GPU machine.
#[cfg(feature = "cuda")]
#[test]
fn group_norm_kernel_compiles() {
    let ptx =
        candle_core::cuda_backend::cudarc::nvrtc::compile_ptx(super::group_norm::kernel_source())
            .unwrap();
    let src = ptx.to_src();
    for entry in [
        "tb_group_norm_f32",
        "tb_group_norm_bf16",
        "tb_gn_nhwc_stats_f32",
        "tb_gn_nhwc_stats_bf16",
        "tb_gn_nhwc_apply_f32",
        "tb_gn_nhwc_apply_bf16",
    ] {
        assert!(src.contains(entry), "{entry} missing from the PTX");
    }
}

/// On a GPU, T5's RMS norm without a gradient is candle's one kernel: the CPU
/// composite's result within the dtype's rounding (skipped, saying so, without one).
#[test]
fn rms_norm_kernel_matches_the_cpu_on_cuda() -> Result<()> {
    crate::testing::on_cuda("rms_norm_kernel_matches_the_cpu_on_cuda", |dev| {
        let cpu = Device::Cpu;
        let x = (seeded(&[3, 7, 4096], 31, DType::F32, &cpu)? * 5.0)?;
        let w = seeded(&[4096], 32, DType::F32, &cpu)?;
        let want = rms_norm(&x, &w, 1e-6)?;
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 2e-2)] {
            let got = rms_norm(
                &x.to_dtype(dtype)?.to_device(dev)?,
                &w.to_device(dev)?,
                1e-6,
            )?;
            assert_eq!(got.dtype(), dtype);
            let e = rel_err(&got, &want)?;
            assert!(e < tol, "{dtype:?}: {e}");
        }
        Ok(())
    })
}

/// The gated GELU kernel's transcription against the composite (f32 to rounding,
/// bf16 within its rounding); an odd last axis is refused.
#[test]
fn fused_gated_gelu_matches_the_composite() -> Result<()> {
    let dev = Device::Cpu;
    let h = seeded(&[2, 3, 10], 41, DType::F32, &dev)?.affine(2.0, 0.0)?;
    let want = gated_gelu_tanh(&h)?;
    assert_eq!(want.dims(), &[2, 3, 5]);
    // the composite is gelu(a) · g
    let by_hand = (h.narrow(2, 0, 5)?.gelu()? * h.narrow(2, 5, 5)?)?;
    assert_eq!(rel_err(&want, &by_hand)?, 0.0);
    let got = h.apply_op1_no_bwd(&super::gated::GatedGelu)?;
    assert!(rel_err(&got, &want)? < 1e-6);
    let hb = h.to_dtype(DType::BF16)?;
    let got = hb.apply_op1_no_bwd(&super::gated::GatedGelu)?;
    assert_eq!(got.dtype(), DType::BF16);
    assert!(rel_err(&got, &gated_gelu_tanh(&hb)?)? < 2e-2);
    let odd = seeded(&[2, 7], 1, DType::F32, &dev)?;
    assert!(
        gated_gelu_tanh(&odd)
            .unwrap_err()
            .to_string()
            .contains("two halves")
    );
    let e = odd
        .apply_op1_no_bwd(&super::gated::GatedGelu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("two halves"), "{e}");
    Ok(())
}

/// On a GPU the seam's gated GELU is the kernel: the CPU composite's result (skipped,
/// saying so, without one).
#[test]
fn gated_gelu_kernel_matches_the_cpu_on_cuda() -> Result<()> {
    crate::testing::on_cuda("gated_gelu_kernel_matches_the_cpu_on_cuda", |dev| {
        let h = seeded(&[3, 7, 2 * 1000], 42, DType::F32, &Device::Cpu)?;
        let want = gated_gelu_tanh(&h)?;
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 2e-2)] {
            let got = gated_gelu_tanh(&h.to_dtype(dtype)?.to_device(dev)?)?;
            assert_eq!(got.dtype(), dtype);
            let e = rel_err(&got, &want)?;
            assert!(e < tol, "{dtype:?}: {e}");
        }
        Ok(())
    })
}

fn assert_strictly_channels_last(t: &Tensor, what: &str) {
    assert!(
        crate::testing::is_strictly_channels_last(t),
        "{what}: {:?} strides {:?} is not channels-last",
        t.dims(),
        t.stride()
    );
}

/// The channels-last GroupNorm's transcription (shifted sums per channel and chunk,
/// Chan's merge) against the composite: several chunks with a short last one, groups
/// of 1 to 32 channels, activations far from zero (where `E[x²] - E[x]²` would
/// cancel), f32 and bf16, with a convolution's bias folded in; and what it refuses, by
/// name.
#[test]
fn channels_last_group_norm_matches_the_composite() -> Result<()> {
    use super::group_norm::fused_group_norm_nhwc;
    let dev = Device::Cpu;
    // 33 x 17 = 561 pixels: chunks of 256, 256 and 49 rows
    for (shape, groups) in [
        (vec![2, 64, 33, 17], 16),
        (vec![1, 32, 9, 40], 1),
        (vec![2, 128, 4, 4], 32),
        (vec![1, 64, 3, 5], 2),
    ] {
        let c = shape[1];
        let x = seeded(&shape, 41, DType::F32, &dev)?.affine(3.0, 100.0)?;
        let w = seeded(&[c], 42, DType::F32, &dev)?;
        let b = seeded(&[c], 43, DType::F32, &dev)?;
        let xl = to_channels_last(&x)?;
        for silu in [false, true] {
            let want = group_norm(&x, groups, &w, &b, 1e-6, silu)?;
            let got = fused_group_norm_nhwc(&xl, None, groups, &w, &b, 1e-6, silu)?;
            assert_eq!(got.dims(), want.dims());
            assert_strictly_channels_last(&got, "the NHWC group norm");
            let e = rel_err(&got, &want)?;
            assert!(e < 1e-5, "{shape:?} groups {groups} silu {silu}: {e}");
            // the seam takes this path itself for a channels-last input
            let seam = group_norm(&xl, groups, &w, &b, 1e-6, silu)?;
            assert_strictly_channels_last(&seam, "the seam's group norm");
            assert_eq!(rel_err(&seam, &got)?, 0.0);
            let xb = to_channels_last(&x.to_dtype(DType::BF16)?)?;
            let got = fused_group_norm_nhwc(&xb, None, groups, &w, &b, 1e-6, silu)?;
            assert_eq!(got.dtype(), DType::BF16);
            let e = rel_err(
                &got,
                &group_norm(&x.to_dtype(DType::BF16)?, groups, &w, &b, 1e-6, silu)?,
            )?;
            assert!(e < 2e-2, "{shape:?} silu {silu} bf16: {e}");
        }
        // a convolution's bias folded in: the norm of `x + cb`, the sum never formed
        // (biases of both signs, larger than the spread of a channel)
        let cb = seeded(&[c], 44, DType::F32, &dev)?.affine(20.0, 0.0)?;
        let biased = x.broadcast_add(&cb.reshape((1, c, 1, 1))?)?;
        let want = group_norm(&biased, groups, &w, &b, 1e-6, true)?;
        let got = fused_group_norm_nhwc(&xl, Some(&cb), groups, &w, &b, 1e-6, true)?;
        assert_strictly_channels_last(&got, "the NHWC group norm after a bias");
        let e = rel_err(&got, &want)?;
        assert!(e < 1e-5, "{shape:?} groups {groups} input bias: {e}");
        // the seam takes it for a channels-last input, adds the bias first for NCHW
        let seam = group_norm_after_bias(&xl, Some(&cb), groups, &w, &b, 1e-6, true)?;
        assert_eq!(rel_err(&seam, &got)?, 0.0, "the seam, channels-last");
        let seam = group_norm_after_bias(&x, Some(&cb), groups, &w, &b, 1e-6, true)?;
        assert!(seam.is_contiguous());
        assert_eq!(rel_err(&seam, &want)?, 0.0, "the seam, NCHW");
        // bf16: the f32 norm of the same bf16 inputs, the sum not rounded, to the
        // output's rounding
        let (xb, cbb) = (x.to_dtype(DType::BF16)?, cb.to_dtype(DType::BF16)?);
        let got = group_norm_after_bias(
            &to_channels_last(&xb)?,
            Some(&cbb),
            groups,
            &w,
            &b,
            1e-6,
            true,
        )?;
        assert_eq!(got.dtype(), DType::BF16);
        let f32_of = |t: &Tensor| t.to_dtype(DType::F32);
        let want = group_norm_after_bias(
            &f32_of(&xb)?,
            Some(&f32_of(&cbb)?),
            groups,
            &w,
            &b,
            1e-6,
            true,
        )?;
        let e = rel_err(&got, &want)?;
        assert!(e < 8e-3, "{shape:?} input bias, bf16: {e}");
    }
    // an input bias of the wrong length is named, on either path
    let x = seeded(&[1, 32, 2, 3], 1, DType::F32, &dev)?;
    let w = seeded(&[32], 2, DType::F32, &dev)?;
    let short = seeded(&[31], 3, DType::F32, &dev)?;
    for x in [x.clone(), to_channels_last(&x)?] {
        let e = group_norm_after_bias(&x, Some(&short), 8, &w, &w, 1e-6, true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("31") && e.contains("32"), "{e}");
    }
    // 48 channels: not a multiple of 32; groups of 3: not a power of two
    for (c, groups) in [(48, 4), (96, 32)] {
        let x = to_channels_last(&seeded(&[1, c, 2, 2], 1, DType::F32, &dev)?)?;
        let w = seeded(&[c], 2, DType::F32, &dev)?;
        let e = fused_group_norm_nhwc(&x, None, groups, &w, &w, 1e-6, false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("{c} channels in {groups} groups")),
            "{e}"
        );
        // the seam keeps the composite for them (an NCHW result, the same values)
        let y = group_norm(&x, groups, &w, &w, 1e-6, false)?;
        assert!(y.is_contiguous());
    }
    let nchw = seeded(&[1, 32, 2, 3], 1, DType::F32, &dev)?;
    let w = seeded(&[32], 2, DType::F32, &dev)?;
    let e = fused_group_norm_nhwc(&nchw, None, 8, &w, &w, 1e-6, false)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("[1, 32, 2, 3]") && e.contains("not channels-last"),
        "{e}"
    );
    Ok(())
}

/// Without a gradient the seam keeps a channels-last input channels-last through
/// `conv2d` (with and without a bias), `conv2d_add`, `add` and `zero_pad2d`, with
/// the values of the NCHW computation; with a gradient it takes the composite and
/// the gradient arrives.
#[test]
fn channels_last_stays_channels_last_through_the_seam() -> Result<()> {
    let dev = Device::Cpu;
    let x = seeded(&[2, 5, 7, 6], 51, DType::F32, &dev)?;
    let xl = to_channels_last(&x)?;
    assert_strictly_channels_last(&xl, "the input");
    let w = seeded(&[4, 5, 3, 3], 52, DType::F32, &dev)?;
    let b = seeded(&[4], 53, DType::F32, &dev)?;
    for (padding, stride) in [(1, 1), (0, 2)] {
        let cfg = candle_nn::Conv2dConfig {
            padding,
            stride,
            ..Default::default()
        };
        for bias in [None, Some(&b)] {
            let want = conv2d(&x, &w, bias, &cfg)?;
            assert!(want.is_contiguous(), "an NCHW input stays NCHW");
            let got = conv2d(&xl, &w, bias, &cfg)?;
            assert_strictly_channels_last(&got, "conv2d");
            let e = rel_err(&got, &want)?;
            assert!(e < 1e-6, "conv2d pad {padding} stride {stride}: {e}");
            // onto a residual of either layout
            let r = seeded(want.dims(), 54, DType::F32, &dev)?;
            let sum = (&want + &r)?;
            for res in [r.clone(), to_channels_last(&r)?] {
                let got = conv2d_add(&xl, &w, bias, &res, &cfg)?;
                assert_strictly_channels_last(&got, "conv2d_add");
                assert!(rel_err(&got, &sum)? < 1e-6);
            }
            assert!(rel_err(&conv2d_add(&x, &w, bias, &r, &cfg)?, &sum)? < 1e-6);
        }
    }
    let y = seeded(&[2, 5, 7, 6], 55, DType::F32, &dev)?;
    let sum = add(&xl, &to_channels_last(&y)?)?;
    assert_strictly_channels_last(&sum, "add");
    assert_eq!(rel_err(&sum, &(&x + &y)?)?, 0.0);
    // the first operand's layout decides
    let mixed = add(&xl, &y)?;
    assert_strictly_channels_last(&mixed, "add onto NCHW");
    assert_eq!(rel_err(&mixed, &(&x + &y)?)?, 0.0);
    assert!(add(&x, &y)?.is_contiguous());
    assert!(add(&x, &to_channels_last(&y)?)?.is_contiguous());
    let padded = zero_pad2d(&xl, [0, 1, 2, 1])?;
    assert_strictly_channels_last(&padded, "zero_pad2d");
    let want = x.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 2, 1)?;
    assert_eq!(padded.dims(), &[2, 5, 8, 9]);
    assert_eq!(rel_err(&padded, &want)?, 0.0);
    assert_eq!(rel_err(&zero_pad2d(&x, [0, 1, 2, 1])?, &want)?, 0.0);
    // on a gradient path: candle's convolution, and the input's gradient arrives
    let var = Var::from_tensor(&xl)?;
    let cfg = candle_nn::Conv2dConfig {
        padding: 1,
        ..Default::default()
    };
    let out = conv2d(var.as_tensor(), &w, Some(&b), &cfg)?;
    assert!(out.is_contiguous(), "the composite writes NCHW");
    let grads = weighted_sum(&out)?.backward()?;
    let g = grads.get(var.as_tensor()).expect("the gradient arrives");
    let want = {
        let v = Var::from_tensor(&x)?;
        let o = conv2d(v.as_tensor(), &w, Some(&b), &cfg)?;
        weighted_sum(&o)?
            .backward()?
            .get(v.as_tensor())
            .unwrap()
            .clone()
    };
    assert!(rel_err(g, &want)? < 1e-6);
    Ok(())
}

/// On a GPU the channels-last GroupNorm kernels match the CPU composite in f32 and
/// bf16, at one chunk per image and at many (skipped, saying so, without one).
#[test]
fn channels_last_group_norm_kernels_match_the_cpu_on_cuda() -> Result<()> {
    crate::testing::on_cuda(
        "channels_last_group_norm_kernels_match_the_cpu_on_cuda",
        |dev| {
            let cpu = Device::Cpu;
            // 64 x 65 = 4160 pixels: 17 chunks of 256 rows, the last of 64; 8 x 8: one chunk
            for (shape, groups) in [
                (vec![3, 128, 64, 65], 32),
                (vec![2, 512, 8, 8], 32),
                (vec![1, 256, 40, 40], 8),
            ] {
                let c = shape[1];
                let x = seeded(&shape, 61, DType::F32, &cpu)?.affine(2.0, 10.0)?;
                let w = seeded(&[c], 62, DType::F32, &cpu)?;
                let b = seeded(&[c], 63, DType::F32, &cpu)?;
                let cb = seeded(&[c], 64, DType::F32, &cpu)?.affine(5.0, 0.0)?;
                for (silu, in_bias) in [(false, false), (true, false), (true, true)] {
                    let want = if in_bias {
                        group_norm_after_bias(&x, Some(&cb), groups, &w, &b, 1e-6, silu)?
                    } else {
                        group_norm(&x, groups, &w, &b, 1e-6, silu)?
                    };
                    for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 2e-2)] {
                        let xd = to_channels_last(&x.to_dtype(dtype)?.to_device(dev)?)?;
                        let (wd, bd) = (w.to_device(dev)?, b.to_device(dev)?);
                        let got = if in_bias {
                            let cbd = cb.to_dtype(dtype)?.to_device(dev)?;
                            group_norm_after_bias(&xd, Some(&cbd), groups, &wd, &bd, 1e-6, silu)?
                        } else {
                            group_norm(&xd, groups, &wd, &bd, 1e-6, silu)?
                        };
                        assert_strictly_channels_last(&got, "the kernels' result");
                        assert_eq!(got.dtype(), dtype);
                        let e = rel_err(&got.to_device(&cpu)?, &want)?;
                        assert!(
                            e < tol,
                            "{shape:?} {dtype:?} silu {silu} input bias {in_bias}: {e}"
                        );
                    }
                }
            }
            Ok(())
        },
    )
}
