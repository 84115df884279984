//! Captions per second of the text encoders, random weights at real widths.
//!
//! `cargo bench -p tensorbake-encode --bench text_encoders`
//!
//! Environment: `TENSORBAKE_BENCH_DEVICE` (`cpu` default, `cuda`, `cuda:N` in a CUDA
//! build), `TENSORBAKE_BENCH_DTYPE` (`f32` default, `bf16`), `TENSORBAKE_BENCH_BATCH`
//! (captions per batch, default 4 on CPU and 64 on CUDA), `TENSORBAKE_BENCH_T5_XXL_LAYERS`
//! (comma-separated layer counts of the full-width T5-XXL runs, default `1,2`).
//!
//! Each iteration is what `T5TextEncoder` / `ClipTextEncoder` do per batch:
//! tokenize (the fixture tokenizers; every caption is long enough to be truncated, so
//! T5 runs at the full 120 tokens, PixArt's length, and CLIP at 77), build the mask,
//! run the model. Weights are random (N(0, 1/fan_in), norms at one): speed does not
//! depend on their values. T5-v1.1-XXL (24 layers, 4.7 B parameters) does not fit
//! beside other jobs on a small machine in f32, so it runs at full width with 1 and 2
//! layers; the difference is the per-layer time, from which docs/encoders-text.md
//! extrapolates to 24 layers.

use std::path::Path;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;
use candle_nn::var_builder::SimpleBackend;
use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput, criterion_main};
use tensorbake_encode::tokenize::TextTokenizer;
use tensorbake_nn::clip_text::{ClipTextConfig, ClipTextModel};
use tensorbake_nn::t5::{T5Config, T5EncoderModel};
use tensorbake_nn::{DType as Precision, parse_device};

/// Random weights for any name: ones for norm weights, zeros for biases,
/// N(0, 1/fan_in) otherwise.
struct RandomWeights;

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = if name.contains("norm") && name.ends_with("weight") {
            Tensor::ones(s, DType::F32, dev)?
        } else if name.ends_with("bias") && !name.contains("relative_attention_bias") {
            Tensor::zeros(s, DType::F32, dev)?
        } else {
            let fan_in = *s.dims().last().unwrap_or(&1) as f32;
            Tensor::randn(0f32, fan_in.powf(-0.5), s, dev)?
        };
        t.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        Err(candle_core::Error::Msg(format!("{name}: shape unknown")))
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

fn env(key: &str, default: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| default.to_string())
}

fn captions(batch: usize) -> Vec<String> {
    let base = "The image features a large brown dog sitting on a wooden porch next to a \
                white door, with potted plants, a red bicycle leaning against the railing, \
                trees in the background and a clear blue sky above the quiet street";
    (0..batch).map(|i| format!("{base} number {i}")).collect()
}

fn tokenizer(name: &str, pad: &str) -> TextTokenizer {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/text")
        .join(name)
        .join("tokenizer.json");
    TextTokenizer::from_file(&p, &[pad]).expect("fixture tokenizer")
}

fn bench(c: &mut Criterion) {
    let device = parse_device(&env("TENSORBAKE_BENCH_DEVICE", "cpu")).expect("device");
    let dtype: Precision = env("TENSORBAKE_BENCH_DTYPE", "f32").parse().expect("dtype");
    let dtype = dtype.candle();
    let batch: usize = env(
        "TENSORBAKE_BENCH_BATCH",
        if device.is_cpu() { "4" } else { "64" },
    )
    .parse()
    .expect("batch");
    let texts = captions(batch);
    let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
    let vb = || VarBuilder::from_backend(Box::new(RandomWeights), dtype, device.clone());

    let mut g = c.benchmark_group("text_encoders");
    // One iteration of a full-width T5 layer takes seconds on a small CPU: flat
    // sampling, ten samples.
    g.sample_size(10);
    g.sampling_mode(SamplingMode::Flat);
    g.warm_up_time(std::time::Duration::from_secs(1));
    g.measurement_time(std::time::Duration::from_secs(5));
    g.throughput(Throughput::Elements(batch as u64));

    // CLIP ViT-L/14 text, full size, 77 tokens.
    let clip_tok = tokenizer("clip", "<|endoftext|>");
    let clip = ClipTextModel::new(vb(), &ClipTextConfig::vit_l_14()).expect("clip");
    g.bench_function(BenchmarkId::new("clip_text_vit_l14", batch), |b| {
        b.iter(|| {
            let tb = clip_tok.encode_batch(&texts, 77).unwrap();
            let pos: Vec<usize> = (0..tb.len())
                .map(|i| clip.config().pooled_position(tb.row(i)))
                .collect();
            let ids = Tensor::from_vec(tb.ids.clone(), (batch, 77), &device).unwrap();
            let p = clip.pooled(&ids, &pos).unwrap();
            device.synchronize().unwrap();
            p
        });
    });
    drop(clip);

    let t5_tok = tokenizer("t5", "<pad>");
    let mut run_t5 = |label: String, cfg: T5Config| {
        let model = T5EncoderModel::new(vb(), &cfg).expect("t5");
        g.bench_function(BenchmarkId::new(label, batch), |b| {
            b.iter(|| {
                let tb = t5_tok.encode_batch(&texts, 120).unwrap();
                let mask: Vec<f32> = tb
                    .lengths
                    .iter()
                    .flat_map(|&n| (0..120).map(move |j| if j < n { 1.0 } else { 0.0 }))
                    .collect();
                let ids = Tensor::from_vec(tb.ids.clone(), (batch, 120), &device).unwrap();
                let mask = Tensor::from_vec(mask, (batch, 120), &device).unwrap();
                let h = model.forward(&ids, Some(&mask)).unwrap();
                device.synchronize().unwrap();
                h
            });
        });
    };
    run_t5("t5_v1_1_base_12L".into(), T5Config::v1_1_base());
    for layers in env("TENSORBAKE_BENCH_T5_XXL_LAYERS", "1,2").split(',') {
        let n: usize = layers.trim().parse().expect("layer count");
        let cfg = T5Config {
            num_layers: n,
            ..T5Config::v1_1_xxl()
        };
        run_t5(format!("t5_v1_1_xxl_width_{n}L"), cfg);
    }
    g.finish();
}

/// criterion's macro defines an undocumented public `benches` function.
#[allow(missing_docs)]
mod group {
    criterion::criterion_group!(benches, super::bench);
}
criterion_main!(group::benches);
