//! The Flux modes on a tiny random Flux and a small synthetic store: gradients reach
//! exactly the tensors each setting trains (LoRA, blocks, all, the Redux adapter); the
//! step's loss, velocity and gradients equal PyTorch autograd's on the model and LoRA
//! loaded from tensorbake's checkpoint files by diffusers; a short run overfits (the
//! loss falls at least 5x in 150 steps); a resumed run ends with the uninterrupted run's weights;
//! the store and settings that do not fit Flux fail with one clear error.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use candle_core::{DType, Device, Tensor};
use tensorbake_kit::rng::SplitMix64;
use tensorbake_nn::tiny::write_tiny_flux;
use tensorbake_store::{
    FeatureSpec, FeatureValue, Loader, LoaderConfig, Location, Record, Store, StoreReader,
    StoreSpec,
};
use tensorbake_train::TrainError;
use tensorbake_train::config::TrainConfig;
use tensorbake_train::flux_task::FluxTask;
use tensorbake_train::noise::Noise;
use tensorbake_train::trainer::{Outcome, Resume, Task, Trainer, load_trained};

const LAT: usize = 8; // latent side: 16 packed tokens
const POOLED: usize = 16; // the tiny CLIP width (pooled_projection_dim)
const SIG: (usize, usize) = (12, 24); // SigLIP tokens x width
const T5_WIDTH: usize = 32; // the tiny T5 width (joint_attention_dim)

/// What a test store holds.
#[derive(Clone, Copy)]
struct StoreShape {
    latent_channels: usize,
    pooled: usize,
    t5_tokens: usize,
    nulls: bool,
}

const FITS: StoreShape = StoreShape {
    latent_channels: 16,
    pooled: POOLED,
    t5_tokens: 256,
    nulls: true,
};

fn bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|f| f.to_le_bytes()).collect()
}

/// A store of `n` samples with Flux-VAE moments, CLIP image and text embeddings, SigLIP
/// and T5 features, and (when `shape.nulls`) the null embeddings.
fn store(dir: &Path, name: &str, n: usize, shape: StoreShape) -> Arc<StoreReader> {
    let loc = Location::from(dir.join(name));
    let f = |dtype, shape: &[usize]| FeatureSpec {
        model: "synthetic".into(),
        weights_sha256: "0".into(),
        preprocess: serde_json::json!({}),
        dtype,
        shape: shape.iter().map(|&d| d as u64).collect(),
    };
    use tensorbake_store::DType as S;
    let c = shape.latent_channels;
    let t5 = (shape.t5_tokens, T5_WIDTH);
    let features = BTreeMap::from([
        ("flux_vae_mean".to_string(), f(S::F32, &[c, LAT, LAT])),
        ("flux_vae_std".to_string(), f(S::F32, &[c, LAT, LAT])),
        ("clip_image_embeds".to_string(), f(S::F32, &[shape.pooled])),
        ("clip_text_pooled".to_string(), f(S::F32, &[shape.pooled])),
        ("siglip_hidden".to_string(), f(S::Bf16, &[SIG.0, SIG.1])),
        ("t5_hidden".to_string(), f(S::Bf16, &[t5.0, t5.1])),
        ("t5_len".to_string(), f(S::U32, &[])),
    ]);
    let mut spec = StoreSpec::new(features);
    spec.resolution = Some(8 * LAT as u32);
    let store = Store::create_or_open(&loc, spec).unwrap();
    let mut rng = SplitMix64::new(11);
    let mut normal =
        |k: usize, s: f64| -> Vec<f32> { (0..k).map(|_| (rng.normal() * s) as f32).collect() };
    let mut w = store.part_writer("p0", "synthetic").unwrap();
    let t = |v: Vec<f32>, shape: &[usize]| {
        FeatureValue::Tensor(Tensor::from_vec(v, shape, &Device::Cpu).unwrap())
    };
    for i in 0..n {
        w.push(Record {
            key: format!("s{i:02}"),
            caption: format!("caption {i}"),
            caption_raw: String::new(),
            orig_size: [64, 64],
            features: BTreeMap::from([
                (
                    "flux_vae_mean".into(),
                    t(normal(c * LAT * LAT, 3.0), &[c, LAT, LAT]),
                ),
                (
                    "flux_vae_std".into(),
                    FeatureValue::Bytes(bytes(&vec![0.01f32; c * LAT * LAT])),
                ),
                (
                    "clip_image_embeds".into(),
                    t(normal(shape.pooled, 1.0), &[shape.pooled]),
                ),
                (
                    "clip_text_pooled".into(),
                    t(normal(shape.pooled, 1.0), &[shape.pooled]),
                ),
                (
                    "siglip_hidden".into(),
                    t(normal(SIG.0 * SIG.1, 1.0), &[SIG.0, SIG.1]),
                ),
                (
                    "t5_hidden".into(),
                    t(normal(t5.0 * t5.1, 0.2), &[t5.0, t5.1]),
                ),
                (
                    "t5_len".into(),
                    FeatureValue::Bytes(5u32.to_le_bytes().to_vec()),
                ),
            ]),
        })
        .unwrap();
    }
    w.commit().unwrap();
    if shape.nulls {
        let mut r = SplitMix64::new(99);
        let mut v = |k: usize| -> Vec<f32> { (0..k).map(|_| (r.normal() * 0.3) as f32).collect() };
        let cpu = &Device::Cpu;
        let nulls = BTreeMap::from([
            (
                "clip_image_embeds".to_string(),
                Tensor::from_vec(v(shape.pooled), shape.pooled, cpu).unwrap(),
            ),
            (
                "clip_text_pooled".to_string(),
                Tensor::from_vec(v(shape.pooled), shape.pooled, cpu).unwrap(),
            ),
            (
                "siglip_hidden".to_string(),
                Tensor::full(0.5f32, SIG, cpu).unwrap(),
            ),
            (
                "t5_hidden".to_string(),
                Tensor::from_vec(v(t5.0 * t5.1), t5, cpu).unwrap(),
            ),
            ("t5_len".to_string(), Tensor::new(1u32, cpu).unwrap()),
        ]);
        store.record_null_embedding(&nulls).unwrap();
    }
    Arc::new(StoreReader::open(&loc).unwrap())
}

/// `flux` (no guidance embedder, OpenFLUX style) and `flux-dev` (with it).
fn models(dir: &Path) {
    write_tiny_flux(&dir.join("flux"), 5, false, T5_WIDTH, POOLED).unwrap();
    write_tiny_flux(&dir.join("flux-dev"), 6, true, T5_WIDTH, POOLED).unwrap();
}

/// The test config; the keys of `extra` (TOML) replace or add to the base ones.
fn cfg(dir: &Path, mode: &str, extra: &str) -> TrainConfig {
    let base = format!(
        "store = \"store\"\nmode = \"{mode}\"\nflux = \"flux\"\nout = \"{}\"\nsteps = 2\n\
         batch_size = 4\nprefetch = 1\n",
        dir.join("out").display()
    );
    let mut table: toml::Table = base.parse().unwrap();
    table.extend(extra.parse::<toml::Table>().unwrap());
    TrainConfig::parse(&toml::to_string(&table).unwrap(), "test").unwrap()
}

fn try_task(
    dir: &Path,
    reader: &StoreReader,
    mode: &str,
    extra: &str,
) -> Result<FluxTask, TrainError> {
    FluxTask::build(&cfg(dir, mode, extra), dir, reader, &Device::Cpu)
}

fn task(dir: &Path, reader: &StoreReader, mode: &str, extra: &str) -> FluxTask {
    try_task(dir, reader, mode, extra).unwrap()
}

fn first_batch(reader: &Arc<StoreReader>, t: &FluxTask) -> tensorbake_store::Batch {
    let c = LoaderConfig::new(0, 0, 4, t.arrays());
    Loader::new(reader.clone(), &c)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
}

fn norm(t: &Tensor) -> f32 {
    t.sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .sqrt()
}

#[test]
fn gradients_reach_exactly_the_tensors_each_setting_trains() {
    let dir = tempfile::tempdir().unwrap();
    let reader = store(dir.path(), "store", 8, FITS);
    models(dir.path());
    let flux_cfg =
        tensorbake_nn::flux::io::config_of(dir.path().join("flux").to_str().unwrap()).unwrap();
    let all = tensorbake_nn::flux::expected_tensors(&flux_cfg).unwrap();
    let probe = task(
        dir.path(),
        &reader,
        "flux_clip_image",
        "lora = { rank = 2 }\n",
    );
    let targets = probe.flux().lora_targets();
    assert!(targets.len() > 10, "{targets:?}");
    let lora_names = |paths: &[String]| -> Vec<String> {
        let mut v: Vec<String> = paths
            .iter()
            .flat_map(|p| {
                [
                    format!("transformer.{p}.lora_A.weight"),
                    format!("transformer.{p}.lora_B.weight"),
                ]
            })
            .collect();
        v.sort();
        v
    };
    let cases: [(&str, &str, Vec<String>); 5] = [
        (
            "flux_clip_image",
            "lora = { rank = 2 }\n",
            lora_names(&targets),
        ),
        (
            "flux_clip_image",
            "lora = { rank = 2, targets = [\"attn.to_q\", \"proj_mlp\"] }\n",
            lora_names(
                &targets
                    .iter()
                    .filter(|p| p.ends_with("attn.to_q") || p.ends_with("proj_mlp"))
                    .cloned()
                    .collect::<Vec<_>>(),
            ),
        ),
        (
            "flux_clip_image",
            // double block 1 and single block 0 (indices go on after the 2 double blocks)
            "train_blocks = [1, 2]\n",
            all.keys()
                .filter(|n| {
                    n.starts_with("transformer_blocks.1.")
                        || n.starts_with("single_transformer_blocks.0.")
                })
                .cloned()
                .collect(),
        ),
        ("flux_clip_image", "", all.keys().cloned().collect()),
        (
            "flux_redux_adapter",
            "",
            [
                "redux_down.bias",
                "redux_down.weight",
                "redux_up.bias",
                "redux_up.weight",
            ]
            .map(String::from)
            .to_vec(),
        ),
    ];
    for (mode, extra, want) in cases {
        let t = task(dir.path(), &reader, mode, extra);
        let mut names: Vec<String> = t.vars().into_iter().map(|(n, _)| n).collect();
        names.sort();
        assert_eq!(names, want, "{mode} {extra}");
        let batch = first_batch(&reader, &t);
        let (losses, grads) = t.step(&batch, &mut Noise::new(1), 1.0, 1).unwrap();
        assert!(
            losses.loss.is_finite() && losses.loss > 0.0,
            "{mode}: {losses:?}"
        );
        assert_eq!(grads.len(), names.len());
        for ((n, _), g) in t.vars().iter().zip(&grads) {
            let g = g
                .as_ref()
                .unwrap_or_else(|| panic!("{mode} {extra}: no gradient for {n}"));
            let v = norm(g);
            assert!(v.is_finite(), "{mode} {n}");
            // LoRA starts at B = 0: B's gradient is non-zero, A's is zero until B moves
            if n.ends_with("lora_B.weight") || !n.contains("lora_") {
                assert!(v > 0.0, "{mode} {extra}: zero gradient for {n}");
            }
        }
    }
}

/// Per-block recomputation (`gradient_checkpointing`) gives the plain step's loss and
/// gradients: a LoRA (a random B so that A's gradient is not zero), some blocks (a
/// frozen double block before a trained one, a trained single block), all of Flux with
/// the guidance embedder, and the adapter (gradients through every frozen block).
#[test]
fn gradient_checkpointing_gives_the_plain_gradients() {
    let dir = tempfile::tempdir().unwrap();
    let reader = store(dir.path(), "store", 8, FITS);
    // FLUX.1-dev-style models take T5 at 512 tokens
    let reader_512 = store(
        dir.path(),
        "store-512",
        8,
        StoreShape {
            t5_tokens: 512,
            ..FITS
        },
    );
    models(dir.path());
    for (mode, extra) in [
        ("flux_clip_image", "lora = { rank = 2 }\n"),
        ("flux_clip_image", "train_blocks = [1, 2]\n"),
        (
            "flux_clip_image",
            "flux = \"flux-dev\"\nstore = \"store-512\"\n",
        ),
        ("flux_redux_adapter", ""),
    ] {
        let reader = if extra.contains("store-512") {
            &reader_512
        } else {
            &reader
        };
        let plain = task(dir.path(), reader, mode, extra);
        let ckpt = task(
            dir.path(),
            reader,
            mode,
            &format!("{extra}gradient_checkpointing = true\n"),
        );
        for ((n, a), (_, b)) in plain.vars().iter().zip(ckpt.vars()) {
            if n.ends_with("lora_B.weight") {
                let r = a.as_tensor().randn_like(0.0, 0.1).unwrap();
                a.set(&r).unwrap();
                b.set(&r).unwrap();
            }
        }
        let batch = first_batch(reader, &plain);
        let (la, ga) = plain.step(&batch, &mut Noise::new(3), 1.0, 1).unwrap();
        let (lb, gb) = ckpt.step(&batch, &mut Noise::new(3), 1.0, 1).unwrap();
        assert!(
            (la.loss - lb.loss).abs() <= 1e-6 * la.loss.abs(),
            "{mode} {extra}: {la:?} {lb:?}"
        );
        assert_eq!(ga.len(), gb.len());
        for (((n, _), a), b) in plain.vars().iter().zip(&ga).zip(&gb) {
            let (a, b) = (
                a.as_ref().unwrap(),
                b.as_ref()
                    .unwrap_or_else(|| panic!("{mode} {extra}: {n} lost its gradient")),
            );
            assert!(norm(a) > 0.0, "{mode} {extra}: {n}");
            let e = tensorbake_nn::testing::rel_err(b, a).unwrap();
            assert!(
                e < 1e-4,
                "{mode} {extra} {n}: recomputed gradient off by {e}"
            );
        }
    }
}

/// The lean full fine-tune: Adafactor updating each recomputed block's tensors inside
/// the backward ends N steps with the weights of the same optimizer stepping the whole
/// model after the backward, with f32 and with stochastically rounded bf16 masters;
/// during the backward every block tensor is applied once, blocks in reverse order, and
/// the step hands back gradients only for the tensors outside the blocks.
#[test]
fn updating_block_by_block_in_the_backward_equals_a_whole_model_step() {
    use std::sync::Mutex;
    use tensorbake_train::recompute::SideGrads;
    let dir = tempfile::tempdir().unwrap();
    let reader = store(dir.path(), "store", 8, FITS);
    models(dir.path());
    let steps = 3;
    for master in ["f32", "bf16"] {
        let run = |fused: bool| {
            let c = cfg(
                dir.path(),
                "flux_clip_image",
                &format!(
                    "optimizer = \"adafactor\"\nmaster_weights = \"{master}\"\n\
                     gradient_checkpointing = true\ngrad_clip = 0\nlr = 1e-3\n\
                     update_in_backward = {fused}\n"
                ),
            );
            let t = FluxTask::build(&c, dir.path(), &reader, &Device::Cpu).unwrap();
            let mut trainer = Trainer::new(
                c,
                t,
                reader.clone(),
                Device::Cpu,
                dir.path().join("unused"),
                Resume::No,
            )
            .unwrap();
            let mut norms = Vec::new();
            trainer
                .bench_steps(steps, &mut |l| norms.push(l.grad_norm))
                .unwrap();
            let weights: Vec<(String, Tensor)> = trainer
                .task()
                .vars()
                .into_iter()
                .map(|(n, v)| (n, v.as_tensor().to_dtype(DType::F32).unwrap()))
                .collect();
            (weights, norms)
        };
        let (whole, whole_norms) = run(false);
        let (fused, fused_norms) = run(true);
        let start = task(dir.path(), &reader, "flux_clip_image", "");
        for (((n, a), (_, b)), (_, v0)) in whole.iter().zip(&fused).zip(start.vars()) {
            let moved = (a - v0.as_tensor())
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap();
            assert!(
                moved.to_scalar::<f32>().unwrap() > 0.0,
                "{master} {n}: did not train"
            );
            let e = tensorbake_nn::testing::rel_err(b, a).unwrap();
            assert!(
                e < 1e-6,
                "{master} {n}: block-by-block off the whole step by {e}"
            );
        }
        for (a, b) in whole_norms.iter().zip(&fused_norms) {
            assert!((a - b).abs() <= 1e-5 * a, "{master}: |g| {a} vs {b}");
        }
    }
    // what the backward applies, and in which order
    let t = task(
        dir.path(),
        &reader,
        "flux_clip_image",
        "gradient_checkpointing = true\n",
    );
    let names: HashMap<candle_core::TensorId, String> = t
        .vars()
        .into_iter()
        .map(|(n, v)| (v.as_tensor().id(), n))
        .collect();
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let log = seen.clone();
    let side = SideGrads::applying(Arc::new(move |v: &candle_core::Var, _g: &Tensor| {
        log.lock().unwrap().push(names[&v.as_tensor().id()].clone());
        Ok(true)
    }));
    let batch = first_batch(&reader, &t);
    let (_, grads) = t
        .step_with(&batch, &mut Noise::new(1), 1.0, 1, &side)
        .unwrap();
    let seen = seen.lock().unwrap().clone();
    let in_block = |n: &str| {
        n.starts_with("transformer_blocks.") || n.starts_with("single_transformer_blocks.")
    };
    for ((n, _), g) in t.vars().iter().zip(&grads) {
        assert_eq!(g.is_none(), in_block(n), "{n}");
        assert_eq!(
            seen.iter().filter(|s| *s == n).count(),
            usize::from(in_block(n)),
            "{n} applied"
        );
    }
    let block_of = |n: &str| -> (u8, usize) {
        let mut parts = n.split('.');
        let kind = parts.next().unwrap();
        let i: usize = parts.next().unwrap().parse().unwrap();
        (u8::from(kind == "single_transformer_blocks"), i)
    };
    let order: Vec<(u8, usize)> = seen.iter().map(|n| block_of(n)).collect();
    assert!(
        order.windows(2).all(|w| w[0] >= w[1]),
        "blocks applied out of reverse order: {order:?}"
    );
}

#[test]
fn dropout_and_the_blend_warm_up_build_the_pooled_input() {
    let dir = tempfile::tempdir().unwrap();
    let reader = store(dir.path(), "store", 8, FITS);
    models(dir.path());
    let t = task(
        dir.path(),
        &reader,
        "flux_clip_image",
        "lora = { rank = 2 }\npooled_blend_steps = 10\npooled_blend_start = 0.5\n",
    );
    let batch = first_batch(&reader, &t);
    let img = &batch.tensors["clip_image_embeds"];
    let text = &batch.tensors["clip_text_pooled"];
    let null = reader
        .null_embedding("clip_image_embeds", &Device::Cpu)
        .unwrap()
        .unwrap();
    let t5_null = reader
        .null_embedding("t5_hidden", &Device::Cpu)
        .unwrap()
        .unwrap();
    let close = |a: &Tensor, b: &Tensor| {
        let d = (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-5, "off by {d}");
    };
    let dropped = [false, true, false, false];
    // step 1: half and half; step 6: 0.75 image; from step 11: the image alone
    for (step, w) in [(1u64, 0.5f64), (6, 0.75), (11, 1.0), (500, 1.0)] {
        let (txt, pooled) = t.condition(&batch, &dropped, step).unwrap();
        assert_eq!(txt.dims(), &[4, 256, T5_WIDTH]);
        close(&txt.get(2).unwrap(), &t5_null);
        let want = ((img.get(0).unwrap() * w).unwrap()
            + (text.get(0).unwrap() * (1.0 - w)).unwrap())
        .unwrap();
        close(&pooled.get(0).unwrap(), &want);
        close(&pooled.get(1).unwrap(), &null);
    }
    // the dropout ramp: 0.2 at step 1 to 0.5 from step 11
    let c = cfg(
        dir.path(),
        "flux_clip_image",
        "cond_dropout = 0.5\ncond_dropout_start = 0.2\ncond_dropout_ramp_steps = 10\n",
    );
    let d = tensorbake_train::trainer::Ramp::dropout(&c);
    assert!((d.at(1) - 0.2).abs() < 1e-12);
    assert!((d.at(6) - 0.35).abs() < 1e-12);
    assert!((d.at(11) - 0.5).abs() < 1e-12 && (d.at(1000) - 0.5).abs() < 1e-12);
}

/// A Python with diffusers and peft, or `None` (the PyTorch checks skipped) unless
/// `TENSORBAKE_REQUIRE_PYTHON=1`.
fn torch_python() -> Option<String> {
    let py = std::env::var("TENSORBAKE_PYTHON").ok();
    let found = py.filter(|py| {
        Command::new(py)
            .args(["-c", "import diffusers, peft"])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    assert!(
        found.is_some() || std::env::var("TENSORBAKE_REQUIRE_PYTHON").as_deref() != Ok("1"),
        "TENSORBAKE_REQUIRE_PYTHON=1 but no TENSORBAKE_PYTHON with diffusers and peft"
    );
    found
}

/// Trains `steps` steps of `extra` into `out`; the final checkpoint.
fn train(dir: &Path, reader: &Arc<StoreReader>, out: &str, extra: &str, steps: u64) -> PathBuf {
    let c = cfg(
        dir,
        "flux_clip_image",
        &format!(
            "{extra}out = \"{}\"\nsteps = {steps}\ncheckpoint_every = 2\nkeep_checkpoints = 0\n",
            dir.join(out).display()
        ),
    );
    let t = FluxTask::build(&c, dir, reader, &Device::Cpu).unwrap();
    let mut trainer =
        Trainer::new(c, t, reader.clone(), Device::Cpu, dir.join(out), Resume::No).unwrap();
    match trainer.run(&AtomicBool::new(false), &mut |_| {}).unwrap() {
        Outcome::Finished(d) => d,
        Outcome::Stopped(d) => panic!("stopped at {}", d.display()),
    }
}

#[test]
fn a_step_equals_pytorch_autograd_on_the_checkpoints_diffusers_loads() {
    let Some(py) = torch_python() else {
        eprintln!("skipped: no Python with diffusers and peft");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let reader = store(d, "store", 8, FITS);
    models(d);
    // a few steps at a high rate so the LoRA's B (zero at first) and the weights move
    let extra_lora = "lora = { rank = 4, alpha = 8 }\nlr = 0.01\ngrad_clip = 0.0\n";
    let extra_all = "lr = 0.001\ngrad_clip = 0.0\nweight_decay = 0.0\n";
    let lora_ckpt = train(d, &reader, "out-lora", extra_lora, 2);
    let all_ckpt = train(d, &reader, "out-all", extra_all, 2);
    let mut jobs: Vec<(FluxTask, PathBuf, &str, PathBuf)> = Vec::new();
    for (extra, ckpt, model_dir, lora_arg) in [
        (
            extra_lora,
            &lora_ckpt,
            d.join("flux"),
            lora_ckpt.to_string_lossy().into_owned(),
        ),
        (
            extra_all,
            &all_ckpt,
            all_ckpt.join("transformer"),
            "-".to_string(),
        ),
    ] {
        let t = task(d, &reader, "flux_clip_image", extra);
        load_trained(&t, ckpt, &Device::Cpu).unwrap();
        jobs.push((
            t,
            model_dir,
            if lora_arg == "-" { "-" } else { "lora" },
            ckpt.clone(),
        ));
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(&py);
    cmd.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/flux/flux_train_step.py"));
    let mut ours = Vec::new();
    for (i, (t, model_dir, kind, ckpt)) in jobs.iter().enumerate() {
        let batch = first_batch(&reader, t);
        let mut noise = Noise::new(7 + i as u64);
        let mean = batch.tensors["flux_vae_mean"].to_dtype(DType::F32).unwrap();
        let x0 = tensorbake_train::latents::LatentScaling::FLUX
            .apply(&mean)
            .unwrap();
        let n = noise.randn(x0.dims(), &Device::Cpu).unwrap();
        let sigmas = Tensor::new(&[0.1f32, 0.4, 0.7, 0.95], &Device::Cpu).unwrap();
        let (txt, pooled) = t
            .condition(&batch, &[false, true, false, false], 1)
            .unwrap();
        let (loss, v) = t
            .loss_of(&x0, &n, &sigmas, &txt, &pooled, &Default::default())
            .unwrap();
        let grads = loss.backward().unwrap();
        let (img_ids, txt_ids) = t.position_ids();
        let inputs: HashMap<String, Tensor> = [
            ("x0", x0.clone()),
            ("noise", n.clone()),
            ("sigmas", sigmas.clone()),
            ("encoder_hidden_states", txt.to_dtype(DType::F32).unwrap()),
            ("pooled_projections", pooled.to_dtype(DType::F32).unwrap()),
            ("img_ids", img_ids.clone()),
            ("txt_ids", txt_ids.clone()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let inp = tmp.path().join(format!("in{i}.safetensors"));
        let out = tmp.path().join(format!("out{i}.safetensors"));
        candle_core::safetensors::save(&inputs, &inp).unwrap();
        let lora_arg = if *kind == "-" {
            "-".into()
        } else {
            ckpt.clone()
        };
        cmd.arg(model_dir).arg(lora_arg).arg(&inp).arg(&out);
        let g: BTreeMap<String, Tensor> = t
            .vars()
            .into_iter()
            .map(|(name, var)| (name, grads.get(var.as_tensor()).unwrap().clone()))
            .collect();
        ours.push((loss.to_scalar::<f32>().unwrap(), v, g, out));
    }
    let o = cmd.output().unwrap();
    assert!(
        o.status.success(),
        "PyTorch failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    for (i, (loss, v, grads, out)) in ours.into_iter().enumerate() {
        let theirs = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
        let their_loss = theirs["loss"].to_vec1::<f32>().unwrap()[0];
        assert!(
            ((loss - their_loss) / their_loss).abs() < 1e-4,
            "job {i}: loss {loss} vs PyTorch {their_loss}"
        );
        let e = tensorbake_nn::testing::rel_err(&v, &theirs["velocity"]).unwrap();
        assert!(e < 1e-4, "job {i}: velocity off by {e}");
        let theirs_grads: Vec<&String> = theirs.keys().filter(|k| k.starts_with("grad.")).collect();
        assert_eq!(
            theirs_grads.len(),
            grads.len(),
            "job {i}: trained tensor count"
        );
        for (name, g) in &grads {
            let tg = theirs
                .get(&format!("grad.{name}"))
                .unwrap_or_else(|| panic!("job {i}: PyTorch has no gradient for {name}"));
            let e = tensorbake_nn::testing::rel_err(g, tg).unwrap();
            assert!(e < 1e-3, "job {i}: gradient of {name} off by {e}");
            assert!(norm(tg) > 0.0, "job {i}: {name}");
        }
    }
}

#[test]
fn a_short_run_overfits_and_a_resumed_run_ends_where_the_straight_one_does() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let reader = store(d, "store", 4, FITS);
    models(d);
    // wider than the 64 packed channels, so the model can pass x_t through
    let wide = tensorbake_nn::flux::Config {
        num_attention_heads: 6,
        ..tensorbake_nn::tiny::tiny_flux_config(false, T5_WIDTH, POOLED)
    };
    tensorbake_nn::tiny::write_flux(&d.join("flux-wide"), 8, &wide).unwrap();
    let extra = "flux = \"flux-wide\"\nlr = 0.006\ngrad_clip = 0.0\nweight_decay = 0.0\n\
                 cond_dropout = 0.0\nshift = 3.0\n";
    let steps = 150;
    let ckpt = train(d, &reader, "out-fit", extra, steps);
    let log = std::fs::read_to_string(d.join("out-fit/log.jsonl")).unwrap();
    let losses: Vec<f64> = log
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect();
    assert_eq!(losses.len(), steps as usize);
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (first, last) = (mean(&losses[..5]), mean(&losses[losses.len() - 5..]));
    // Measured 2.93 -> 0.33 (8.8x) in these 150 steps.
    eprintln!("overfit: loss {first:.4} -> {last:.4}");
    assert!(
        first > 5.0 * last,
        "loss {first:.4} -> {last:.4}: not 5x lower"
    );
    assert!(
        ckpt.join("transformer/diffusion_pytorch_model.safetensors")
            .is_file()
    );

    // LoRA: 4 steps straight, or 2 then a resume
    let (straight, resumed) =
        straight_and_resumed(d, &reader, "lora = { rank = 2 }\nlr = 0.01\n", "lora");
    let file = tensorbake_nn::lora::LORA_FILE;
    let a = candle_core::safetensors::load(straight.join(file), &Device::Cpu).unwrap();
    let b = candle_core::safetensors::load(resumed.join(file), &Device::Cpu).unwrap();
    assert_eq!(a.len(), b.len());
    for (k, v) in &a {
        let (x, y) = (
            v.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b[k].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        assert_eq!(x, y, "{k} differs after the resume");
    }
    assert!(
        a.keys()
            .any(|k| k.ends_with("lora_B.weight") && norm(&a[k]) > 0.0)
    );
}

/// Checkpoint 4 of a run of 4 steps straight, and of 2 steps then a resume to 4.
fn straight_and_resumed(
    d: &Path,
    reader: &Arc<StoreReader>,
    extra: &str,
    tag: &str,
) -> (PathBuf, PathBuf) {
    let straight = train(d, reader, &format!("out-{tag}-a"), extra, 4);
    let out = d.join(format!("out-{tag}-b"));
    let c = |steps: u64| {
        cfg(
            d,
            "flux_clip_image",
            &format!(
                "{extra}out = \"{}\"\nsteps = {steps}\ncheckpoint_every = 2\n",
                out.display()
            ),
        )
    };
    let t = FluxTask::build(&c(2), d, reader, &Device::Cpu).unwrap();
    let mut first = Trainer::new(
        c(2),
        t,
        reader.clone(),
        Device::Cpu,
        out.clone(),
        Resume::No,
    )
    .unwrap();
    first.run(&AtomicBool::new(false), &mut |_| {}).unwrap();
    let t = FluxTask::build(&c(4), d, reader, &Device::Cpu).unwrap();
    let mut second =
        Trainer::new(c(4), t, reader.clone(), Device::Cpu, out, Resume::Latest).unwrap();
    assert_eq!(second.start_step(), 2);
    let Outcome::Finished(resumed) = second.run(&AtomicBool::new(false), &mut |_| {}).unwrap()
    else {
        panic!("stopped")
    };
    (straight, resumed)
}

/// The lean full fine-tune (Adafactor, bf16 masters rounded stochastically, updates in
/// the backward) resumes bit-identically too: its factored moments, per-tensor step
/// counts and rounding seeds are restored.
#[test]
fn a_lean_full_fine_tune_resumes_bit_identically() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let reader = store(d, "store", 8, FITS);
    models(d);
    let extra = "optimizer = \"adafactor\"\nmaster_weights = \"bf16\"\nupdate_in_backward = true\n\
                 gradient_checkpointing = true\ngrad_clip = 0\nlr = 1e-3\n";
    let (straight, resumed) = straight_and_resumed(d, &reader, extra, "lean");
    let file = "transformer/diffusion_pytorch_model.safetensors";
    let a = candle_core::safetensors::load(straight.join(file), &Device::Cpu).unwrap();
    let b = candle_core::safetensors::load(resumed.join(file), &Device::Cpu).unwrap();
    let start = task(d, &reader, "flux_clip_image", "");
    assert_eq!(a.len(), b.len());
    let mut moved = 0;
    for (k, v) in &a {
        let (x, y) = (
            v.to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            b[k].to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
        );
        assert_eq!(x, y, "{k} differs after the resume");
        let v0 = start
            .vars()
            .into_iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| {
                v.as_tensor()
                    .to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            });
        if v0.is_some_and(|v0| v0 != x) {
            moved += 1;
        }
    }
    assert!(
        moved > a.len() / 2,
        "only {moved} of {} tensors trained",
        a.len()
    );
}

#[test]
fn stores_and_settings_that_do_not_fit_flux_fail_with_one_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    models(d);
    let good = store(d, "store", 4, FITS);
    // latents of other than 16 channels: the store's schema refuses them already
    let e = Store::create_or_open(
        &Location::from(d.join("store-4ch")),
        StoreSpec::new(BTreeMap::from([(
            "flux_vae_mean".to_string(),
            FeatureSpec {
                model: "synthetic".into(),
                weights_sha256: "0".into(),
                preprocess: serde_json::json!({}),
                dtype: tensorbake_store::DType::F32,
                shape: vec![4, 8, 8],
            },
        )])),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        e.contains("flux_vae_mean") && e.contains("[16, h, w]"),
        "{e}"
    );
    let cases: Vec<(StoreShape, &str, &str, &str)> = vec![
        (
            StoreShape { pooled: 24, ..FITS },
            "flux_clip_image",
            "",
            "clip_image_embeds is 24 wide",
        ),
        (
            StoreShape {
                nulls: false,
                ..FITS
            },
            "flux_clip_image",
            "",
            "no embedding of the",
        ),
        (
            FITS,
            "flux_clip_image",
            "flux = \"flux-dev\"\n",
            "has 256 tokens",
        ),
        (
            FITS,
            "flux_clip_image",
            "guidance = 3.5\n",
            "no guidance embedder",
        ),
        (
            FITS,
            "flux_clip_image",
            "lora = { rank = 2, targets = [\"attn.to_nothing\"] }\n",
            "`attn.to_nothing` names no linear layer",
        ),
        (
            FITS,
            "flux_clip_image",
            "train_blocks = [4]\n",
            "names block 4",
        ),
    ];
    for (i, (shape, mode, extra, needle)) in cases.into_iter().enumerate() {
        let reader = if i < 2 {
            store(d, &format!("store{i}"), 4, shape)
        } else {
            good.clone()
        };
        let name = if i < 2 {
            format!("store{i}")
        } else {
            "store".into()
        };
        let e = try_task(d, &reader, mode, &format!("store = \"{name}\"\n{extra}"))
            .err()
            .unwrap_or_else(|| panic!("{needle}: no error"))
            .to_string();
        assert!(e.contains(needle), "wanted `{needle}` in: {e}");
        assert_eq!(e.lines().count(), 1, "{e}");
    }
    // the config checks that need no files
    let base = "store = \"s\"\nmode = \"flux_clip_image\"\nout = \"o\"\nsteps = 2\n";
    for (extra, needle) in [
        ("", "set `flux"),
        ("flux = \"f\"\npixart = \"p\"\n", "both `pixart` and `flux`"),
        ("flux = \"f\"\nlora = { rank = 0 }\n", "`lora.rank`"),
        (
            "flux = \"f\"\nlora = { rank = 2 }\ntrain_blocks = [0]\n",
            "not both",
        ),
        (
            "flux = \"f\"\ncond_dropout_start = 0.2\n",
            "cond_dropout_ramp_steps",
        ),
        ("flux = \"f\"\nredux = \"r\"\n", "uses no adapter"),
    ] {
        let e = TrainConfig::parse(&format!("{base}{extra}"), "t.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains(needle), "{extra}: {e}");
    }
    let pixart = "store = \"s\"\nmode = \"pixart_text\"\npixart = \"p\"\nout = \"o\"\nsteps = 2\n";
    let e = TrainConfig::parse(&format!("{pixart}lora = {{ rank = 2 }}\n"), "t.toml")
        .unwrap_err()
        .to_string();
    assert!(e.contains("`lora` is a Flux setting"), "{e}");
}
