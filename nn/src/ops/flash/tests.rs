use candle_core::{DType, Device, Result, Storage, Tensor};

use super::{Dims, FlashAttention, KERNEL, geometry, padded_head_dim};
use crate::ops::{AttentionOpts, attention};
use crate::testing::rel_err;

/// A seeded tensor of values in [-2, 2) (bf16).
fn seeded(shape: &[usize], seed: u64) -> Result<Tensor> {
    let mut rng = tensorbake_kit::rng::SplitMix64::new(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| (4.0 * rng.unit() - 2.0) as f32).collect();
    Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(DType::BF16)
}

/// One case: q, k, v `[B, H, T, D]` views (strided or not) and the biases as
/// the models give them.
struct Case {
    name: &'static str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: f64,
    bias: Option<Tensor>,
    mask: Option<Tensor>,
}

impl Case {
    /// Self-attention over a stacked q/k/v projection `[B, T, 3, H, D]`: q, k, v are
    /// head views of it (no copy; the token stride is 3·H·D).
    fn stacked(
        name: &'static str,
        b: usize,
        t: usize,
        h: usize,
        d: usize,
        seed: u64,
    ) -> Result<Self> {
        let qkv = seeded(&[b, t, 3, h, d], seed)?;
        let part = |i| qkv.narrow(2, i, 1)?.squeeze(2)?.transpose(1, 2);
        Ok(Self {
            name,
            q: part(0)?,
            k: part(1)?,
            v: part(2)?,
            scale: (d as f64).powf(-0.5),
            bias: None,
            mask: None,
        })
    }

    /// Contiguous q `[B, H, Tq, D]`, k and v `[B, H, Tk, D]`, no scale.
    fn plain(
        name: &'static str,
        (b, h, tq, tk, d): (usize, usize, usize, usize, usize),
        seed: u64,
    ) -> Result<Self> {
        Ok(Self {
            name,
            q: (seeded(&[b, h, tq, d], seed)? * 0.25)?,
            k: seeded(&[b, h, tk, d], seed + 1)?,
            v: seeded(&[b, h, tk, d], seed + 2)?,
            scale: 1.0,
            bias: None,
            mask: None,
        })
    }

    /// T5's biases: a position bias `[1, H, Tq, Tk]` (a transposed view: strided) and
    /// a padding mask `[B, 1, 1, Tk]` of f32::MIN on sample `i`'s last `5 + 7i` keys.
    fn with_t5_biases(mut self) -> Result<Self> {
        let (b, h, tq, _) = self.q.dims4()?;
        let tk = self.k.dim(2)?;
        let pos = seeded(&[1, h, tk, tq], 77)?
            .to_dtype(DType::F32)?
            .transpose(2, 3)?;
        let mask: Vec<f32> = (0..b * tk)
            .map(|i| {
                if i % tk + 5 + 7 * (i / tk) >= tk {
                    f32::MIN
                } else {
                    0.0
                }
            })
            .collect();
        self.bias = Some(pos);
        self.mask = Some(Tensor::from_vec(mask, (b, 1, 1, tk), &Device::Cpu)?);
        Ok(self)
    }

    fn opts(&self) -> AttentionOpts<'_> {
        AttentionOpts {
            scale: Some(self.scale),
            bias: self.bias.as_ref(),
            mask: self.mask.as_ref(),
            softmax_f32: true,
        }
    }

    /// The op as the seam builds it (biases f32 and broadcast to the scores).
    fn op(&self) -> Result<FlashAttention> {
        let (b, h, tq, _) = self.q.dims4()?;
        let tk = self.k.dim(2)?;
        let spread = |t: &Option<Tensor>| {
            t.as_ref()
                .map(|t| t.to_dtype(DType::F32)?.broadcast_as((b, h, tq, tk)))
                .transpose()
        };
        Ok(FlashAttention {
            scale: self.scale as f32,
            bias: spread(&self.bias)?,
            mask: spread(&self.mask)?,
        })
    }

    /// The op's CPU definition: `[B, Tq, H, D]`.
    fn definition(&self) -> Result<Tensor> {
        self.q.apply_op3_no_bwd(&self.k, &self.v, &self.op()?)
    }
}

fn cases() -> Result<Vec<Case>> {
    Ok(vec![
        // SigLIP's head dim (72, padded to 80), two query tiles, a ragged key tile
        Case::stacked("stacked d72", 2, 100, 3, 72, 1)?,
        // T5's biases, a short query tile, three key tiles
        Case::plain("t5 biases d64", (2, 2, 37, 130, 64), 11)?.with_t5_biases()?,
        // the widest instance, exactly one tile and one row past it
        Case::plain("d128", (1, 1, 65, 65, 128), 21)?,
        // a head dim below the smallest instance, fewer keys than a fragment
        Case::plain("d20", (1, 2, 5, 3, 20), 31)?,
    ])
}

/// The definition is the seam's composite attention (f32 scores and softmax of the
/// same bf16 inputs) within bf16's rounding, for strided inputs and both biases;
/// its output is `[B, Tq, H, D]`.
#[test]
fn the_definition_is_the_composite_attention() -> Result<()> {
    for case in cases()? {
        let f32 = |t: &Tensor| t.to_dtype(DType::F32);
        let opts = case.opts();
        let f32c = |t: &Tensor| f32(t)?.contiguous();
        let want = attention(&f32c(&case.q)?, &f32c(&case.k)?, &f32c(&case.v)?, &opts)?;
        let got = case.definition()?;
        let (b, h, tq, d) = case.q.dims4()?;
        assert_eq!(got.dims(), [b, tq, h, d], "{}", case.name);
        let e = rel_err(&got.transpose(1, 2)?, &want)?;
        assert!(e < 1e-2, "{}: {e}", case.name);
    }
    Ok(())
}

/// The padded head dims: the smallest instance at or above `d`, none above 128.
#[test]
fn head_dims_pad_to_the_smallest_instance() {
    assert_eq!(padded_head_dim(72), Some(80));
    assert_eq!(padded_head_dim(64), Some(64));
    assert_eq!(padded_head_dim(1), Some(32));
    assert_eq!(padded_head_dim(97), Some(128));
    assert_eq!(padded_head_dim(129), None);
    assert_eq!(padded_head_dim(0), None);
}

/// Operands whose shapes disagree, a strided last axis or a head dim the kernel has
/// no instance for are refused with the shapes named.
#[test]
fn geometry_refuses_what_the_kernel_cannot_take() -> Result<()> {
    let q = seeded(&[1, 2, 4, 8], 1)?;
    let k = seeded(&[1, 2, 5, 8], 2)?;
    let err = geometry(q.layout(), k.layout(), q.layout())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("[1, 2, 5, 8]") && err.contains("[1, 2, 4, 8]"),
        "{err}"
    );
    let wide = seeded(&[1, 1, 4, 130], 3)?;
    let err = geometry(wide.layout(), wide.layout(), wide.layout())
        .unwrap_err()
        .to_string();
    assert!(err.contains("128 head dims"), "{err}");
    let strided = seeded(&[1, 2, 8, 4], 4)?.transpose(2, 3)?;
    let err = geometry(strided.layout(), strided.layout(), strided.layout())
        .unwrap_err()
        .to_string();
    assert!(err.contains("q's last axis has stride 4"), "{err}");
    Ok(())
}

/// The raw bytes of a CPU tensor's storage from its start offset (bf16 bits or f32):
/// what the kernel's pointer sees.
fn raw(t: &Tensor) -> Result<Vec<u8>> {
    let (s, l) = t.storage_and_layout();
    let Storage::Cpu(s) = &*s else {
        candle_core::bail!("not on the CPU")
    };
    Ok(match s {
        candle_core::CpuStorage::BF16(v) => v[l.start_offset()..]
            .iter()
            .flat_map(|x| x.to_bits().to_ne_bytes())
            .collect(),
        candle_core::CpuStorage::F32(v) => v[l.start_offset()..]
            .iter()
            .flat_map(|x| x.to_ne_bytes())
            .collect(),
        _ => candle_core::bail!("{:?} storage: only bf16 and f32 are passed", t.dtype()),
    })
}

/// The kernel's CUDA source built for the CPU (`flash_emu.cpp`) in `dir`, or `None`
/// (saying so) where there is no C++20 compiler.
fn emulator(dir: &std::path::Path) -> Result<Option<std::path::PathBuf>> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("kernel.cu"), crate::ops::kernel_source(KERNEL))?;
    std::fs::write(dir.join("flash_emu.cpp"), include_str!("../flash_emu.cpp"))?;
    let bin = dir.join("flash_emu");
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let out = std::process::Command::new(&cxx)
        .args([
            "-std=c++20",
            "-O1",
            "-pthread",
            "-fno-strict-aliasing",
            "-Wno-unknown-pragmas",
        ])
        .arg(dir.join("flash_emu.cpp"))
        .arg("-o")
        .arg(&bin)
        .output();
    match out {
        Ok(o) if o.status.success() => Ok(Some(bin)),
        Ok(o) => panic!(
            "the kernel does not compile for the CPU with {cxx}:\n{}",
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => {
            eprintln!("flash attention on the CPU: skipped: no C++ compiler `{cxx}` ({e})");
            Ok(None)
        }
    }
}

/// The kernel's own CUDA source, run on the CPU with its tensor-core products
/// emulated from the PTX fragment layouts, gives the definition's result for every
/// case (strided heads, both biases, ragged query and key tiles, each padded head dim
/// but 96), every output element written.
#[test]
fn the_kernel_source_runs_on_the_cpu_as_the_definition() -> Result<()> {
    let work = std::env::temp_dir().join(format!("tensorbake-flash-emu-{}", std::process::id()));
    let Some(bin) = emulator(&work)? else {
        return Ok(());
    };
    for (i, case) in cases()?.into_iter().enumerate() {
        let op = case.op()?;
        let (Dims { b, h, tq, d, .. }, args) =
            geometry(case.q.layout(), case.k.layout(), case.v.layout())?;
        let args = op.with_biases(args)?;
        let dir = bin.with_file_name(format!("case{i}"));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("args.bin"), args.to_bytes())?;
        for (name, t) in [("q", &case.q), ("k", &case.k), ("v", &case.v)] {
            std::fs::write(dir.join(format!("{name}.bin")), raw(t)?)?;
        }
        for (name, t) in [("bias", &op.bias), ("mask", &op.mask)] {
            std::fs::write(
                dir.join(format!("{name}.bin")),
                t.as_ref().map(raw).transpose()?.unwrap_or_default(),
            )?;
        }
        let dp = padded_head_dim(d).unwrap();
        let out = std::process::Command::new(&bin)
            .arg(&dir)
            .arg(dp.to_string())
            .arg((b * h).to_string())
            .output()?;
        assert!(
            out.status.success(),
            "{}: {}",
            case.name,
            String::from_utf8_lossy(&out.stderr)
        );
        let bits: Vec<half::bf16> = std::fs::read(dir.join("o.bin"))?
            .chunks_exact(2)
            .map(|c| half::bf16::from_bits(u16::from_ne_bytes([c[0], c[1]])))
            .collect();
        let got = Tensor::from_vec(bits, (b, tq, h, d), &Device::Cpu)?;
        let unwritten = got
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .filter(|x| x.is_nan())
            .count();
        assert_eq!(unwritten, 0, "{}: outputs left unwritten", case.name);
        let e = rel_err(&got, &case.definition()?)?;
        assert!(e < 1e-2, "{}: {e}", case.name);
    }
    std::fs::remove_dir_all(&work)?;
    Ok(())
}

/// On a GPU the seam's fused path gives the definition's result for every case and
/// hands back a `[B, H, Tq, D]` view whose head transpose is contiguous (skipped,
/// saying so, without one).
#[test]
fn flash_attention_matches_the_definition_on_cuda() -> Result<()> {
    crate::testing::on_cuda("flash_attention_matches_the_definition_on_cuda", |dev| {
        for case in cases()? {
            let on = |t: &Tensor| t.to_device(dev);
            let (bias, mask) = (
                case.bias.as_ref().map(on).transpose()?,
                case.mask.as_ref().map(on).transpose()?,
            );
            let opts = AttentionOpts {
                bias: bias.as_ref(),
                mask: mask.as_ref(),
                ..case.opts()
            };
            let got = attention(&on(&case.q)?, &on(&case.k)?, &on(&case.v)?, &opts)?;
            assert!(got.transpose(1, 2)?.is_contiguous(), "{}", case.name);
            let e = rel_err(&got.transpose(1, 2)?, &case.definition()?)?;
            assert!(e < 1e-2, "{}: {e}", case.name);
        }
        Ok(())
    })
}

#[cfg(feature = "cuda")]
#[test]
fn flash_kernel_compiles() {
    let src = super::ptx().unwrap();
    for dp in super::PADDED_DIMS {
        let entry = format!("tb_flash_bf16_d{dp}");
        assert!(src.contains(&entry), "{entry} missing from the PTX");
    }
}
