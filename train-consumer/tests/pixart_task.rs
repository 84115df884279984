//! The PixArt modes on a tiny random PixArt and a small synthetic store: gradients
//! reach exactly the tensors each mode trains, gradient checkpointing gives the
//! gradients of the plain backward, dropout swaps in the recorded null condition, and a
//! short run overfits (the loss falls at least 10x).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use candle_core::{DType, Device, Tensor};
use tensorbake_kit::rng::SplitMix64;
use tensorbake_nn::tiny::{TinyPixart, write_tiny_pixart, write_tiny_redux};
use tensorbake_store::{
    FeatureSpec, FeatureValue, Loader, LoaderConfig, Location, Record, Store, StoreReader,
    StoreSpec,
};
use tensorbake_train::config::TrainConfig;
use tensorbake_train::noise::Noise;
use tensorbake_train::pixart_task::PixArtTask;
use tensorbake_train::trainer::{Resume, Task, Trainer};

const SIG: (usize, usize) = (16, 32); // SigLIP tokens x width of the tiny store
const T5: (usize, usize) = (12, 32);
const LAT: usize = 8;

fn bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|f| f.to_le_bytes()).collect()
}

/// A store of `n` samples with latent moments, SigLIP and T5 features, and the null
/// embeddings (black image, empty caption) recorded. `with_null = false` leaves them out.
fn store(dir: &Path, n: usize, with_null: bool) -> Arc<StoreReader> {
    let loc = Location::from(dir.join("store"));
    let f = |dtype, shape: &[usize]| FeatureSpec {
        model: "synthetic".into(),
        weights_sha256: "0".into(),
        preprocess: serde_json::json!({}),
        dtype,
        shape: shape.iter().map(|&d| d as u64).collect(),
    };
    use tensorbake_store::DType as S;
    let features = BTreeMap::from([
        ("sd_vae_mean".to_string(), f(S::F32, &[4, LAT, LAT])),
        ("sd_vae_std".to_string(), f(S::F32, &[4, LAT, LAT])),
        ("siglip_hidden".to_string(), f(S::Bf16, &[SIG.0, SIG.1])),
        ("t5_hidden".to_string(), f(S::Bf16, &[T5.0, T5.1])),
        ("t5_len".to_string(), f(S::U32, &[])),
    ]);
    let mut spec = StoreSpec::new(features);
    spec.resolution = Some(8 * LAT as u32);
    let store = Store::create_or_open(&loc, spec).unwrap();
    let mut rng = SplitMix64::new(11);
    let mut normal =
        |k: usize, s: f64| -> Vec<f32> { (0..k).map(|_| (rng.normal() * s) as f32).collect() };
    let mut w = store.part_writer("p0", "synthetic").unwrap();
    for i in 0..n {
        let t = |v: Vec<f32>, shape: &[usize]| {
            FeatureValue::Tensor(Tensor::from_vec(v, shape, &Device::Cpu).unwrap())
        };
        let len = 3 + (i % 8) as u32;
        w.push(Record {
            key: format!("s{i:02}"),
            caption: format!("caption {i}"),
            caption_raw: String::new(),
            orig_size: [64, 64],
            features: BTreeMap::from([
                (
                    "sd_vae_mean".into(),
                    t(normal(4 * LAT * LAT, 1.0), &[4, LAT, LAT]),
                ),
                (
                    "sd_vae_std".into(),
                    FeatureValue::Bytes(bytes(&vec![0.05f32; 4 * LAT * LAT])),
                ),
                (
                    "siglip_hidden".into(),
                    t(normal(SIG.0 * SIG.1, 1.0), &[SIG.0, SIG.1]),
                ),
                (
                    "t5_hidden".into(),
                    t(normal(T5.0 * T5.1, 0.2), &[T5.0, T5.1]),
                ),
                (
                    "t5_len".into(),
                    FeatureValue::Bytes(len.to_le_bytes().to_vec()),
                ),
            ]),
        })
        .unwrap();
    }
    w.commit().unwrap();
    if with_null {
        let nulls = BTreeMap::from([
            (
                "siglip_hidden".to_string(),
                Tensor::full(0.5f32, SIG, &Device::Cpu).unwrap(),
            ),
            (
                "t5_hidden".to_string(),
                Tensor::zeros(T5, DType::F32, &Device::Cpu).unwrap(),
            ),
            (
                "t5_len".to_string(),
                Tensor::new(1u32, &Device::Cpu).unwrap(),
            ),
        ]);
        store.record_null_embedding(&nulls).unwrap();
    }
    Arc::new(StoreReader::open(&loc).unwrap())
}

fn models(dir: &Path) {
    write_tiny_pixart(&dir.join("pixart"), 5, TinyPixart::Xl512, 32, LAT).unwrap();
    write_tiny_redux(&dir.join("redux"), 6, SIG.1, 32).unwrap();
}

/// The test config; the keys of `extra` (TOML) replace or add to the base ones.
fn cfg(dir: &Path, mode: &str, extra: &str) -> TrainConfig {
    let redux = if mode == "pixart_finetune" {
        "redux = \"redux\"\n"
    } else {
        ""
    };
    let base = format!(
        "store = \"store\"\nmode = \"{mode}\"\npixart = \"pixart\"\nout = \"{}\"\nsteps = 2\n\
         batch_size = 4\nredux_tokens = 8\nprefetch = 1\n{redux}",
        dir.join("out").display()
    );
    let mut table: toml::Table = base.parse().unwrap();
    table.extend(extra.parse::<toml::Table>().unwrap());
    TrainConfig::parse(&toml::to_string(&table).unwrap(), "test").unwrap()
}

fn task(dir: &Path, reader: &StoreReader, mode: &str, extra: &str) -> PixArtTask {
    PixArtTask::build(&cfg(dir, mode, extra), dir, reader, &Device::Cpu).unwrap()
}

fn first_batch(reader: &Arc<StoreReader>, t: &PixArtTask) -> tensorbake_store::Batch {
    let mut arrays = t.arrays();
    arrays.extend([
        "siglip_hidden".to_string(),
        "t5_hidden".into(),
        "t5_len".into(),
    ]);
    arrays.sort();
    arrays.dedup();
    let c = LoaderConfig::new(0, 0, 4, arrays);
    Loader::new(reader.clone(), &c)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
}

#[test]
fn gradients_reach_exactly_the_tensors_each_mode_trains() {
    let dir = tempfile::tempdir().unwrap();
    let reader = store(dir.path(), 8, true);
    models(dir.path());
    let all_pixart = tensorbake_nn::pixart::expected_tensors(
        &tensorbake_nn::pixart::io::read_config(
            &tensorbake_nn::pixart::io::transformer_dir(
                dir.path().join("pixart").to_str().unwrap(),
            )
            .unwrap(),
        )
        .unwrap(),
    )
    .unwrap();
    type Trained = Box<dyn Fn(&str) -> bool>;
    let cases: [(&str, &str, Trained); 4] = [
        (
            "pixart_redux_adapter",
            "",
            Box::new(|n: &str| n.starts_with("redux_")),
        ),
        (
            "pixart_finetune",
            "",
            Box::new(|n: &str| !n.starts_with("redux_")),
        ),
        (
            "pixart_finetune",
            "train_blocks = [1]\n",
            Box::new(|n: &str| n.starts_with("transformer_blocks.1.")),
        ),
        ("pixart_text", "", Box::new(|_: &str| true)),
    ];
    for (mode, extra, trained) in cases {
        let t = task(dir.path(), &reader, mode, extra);
        let names: Vec<String> = t.vars().into_iter().map(|(n, _)| n).collect();
        let want: Vec<String> = if mode == "pixart_redux_adapter" {
            [
                "redux_down.bias",
                "redux_down.weight",
                "redux_up.bias",
                "redux_up.weight",
            ]
            .map(String::from)
            .to_vec()
        } else {
            all_pixart.keys().filter(|n| trained(n)).cloned().collect()
        };
        assert_eq!(names, want, "{mode} {extra}");
        let batch = first_batch(&reader, &t);
        let (losses, grads) = t.step(&batch, &mut Noise::new(1), 1.0, 1).unwrap();
        assert!(
            losses.loss.is_finite() && losses.vb > 0.0,
            "{mode}: {losses:?}"
        );
        for ((n, _), g) in t.vars().iter().zip(&grads) {
            let g = g
                .as_ref()
                .unwrap_or_else(|| panic!("{mode}: no gradient for {n}"));
            let norm = g
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(norm.is_finite(), "{mode} {n}");
        }
        // the frozen parts are constants: no variable for them exists at all
        assert!(names.iter().all(|n| trained(n)), "{mode}");
    }
}

#[test]
fn gradient_checkpointing_gives_the_plain_gradients() {
    let dir = tempfile::tempdir().unwrap();
    let reader = store(dir.path(), 8, true);
    models(dir.path());
    for (mode, extra) in [
        ("pixart_finetune", "train_blocks = [1]\n"),
        ("pixart_text", ""),
        ("pixart_redux_adapter", ""),
    ] {
        let plain = task(dir.path(), &reader, mode, extra);
        let ckpt = task(
            dir.path(),
            &reader,
            mode,
            &format!("{extra}gradient_checkpointing = true\n"),
        );
        let batch = first_batch(&reader, &plain);
        let (la, ga) = plain.step(&batch, &mut Noise::new(3), 1.0, 1).unwrap();
        let (lb, gb) = ckpt.step(&batch, &mut Noise::new(3), 1.0, 1).unwrap();
        assert!(
            (la.loss - lb.loss).abs() <= 1e-6 * la.loss.abs(),
            "{mode}: {la:?} {lb:?}"
        );
        for (((n, _), a), b) in plain.vars().iter().zip(&ga).zip(&gb) {
            let (a, b) = (
                a.as_ref().unwrap(),
                b.as_ref()
                    .unwrap_or_else(|| panic!("{mode}: {n} lost its gradient")),
            );
            let e = tensorbake_nn::testing::rel_err(b, a).unwrap();
            assert!(e < 1e-4, "{mode} {n}: checkpointed gradient off by {e}");
        }
    }
}

#[test]
fn eps_only_trains_the_epsilon_half_of_a_learned_sigma_model() {
    let dir = tempfile::tempdir().unwrap();
    let reader = store(dir.path(), 8, true);
    models(dir.path());
    let t = task(dir.path(), &reader, "pixart_text", "objective = \"eps\"\n");
    let batch = first_batch(&reader, &t);
    let (losses, grads) = t.step(&batch, &mut Noise::new(2), 1.0, 1).unwrap();
    assert_eq!(losses.vb, 0.0);
    assert_eq!(losses.loss, losses.mse);
    // proj_out's rows for the variance channels (channel is the fastest axis of its
    // p x p x 8 outputs) get no gradient, the epsilon rows do
    let (i, _) = t
        .vars()
        .iter()
        .enumerate()
        .find(|(_, (n, _))| n == "proj_out.weight")
        .unwrap();
    let g: Vec<Vec<f32>> = grads[i].as_ref().unwrap().to_vec2().unwrap();
    for (r, row) in g.iter().enumerate() {
        let m = row.iter().fold(0f32, |a, v| a.max(v.abs()));
        if r % 8 >= 4 {
            assert_eq!(m, 0.0, "row {r}");
        } else {
            assert!(m > 0.0, "row {r}");
        }
    }
}

#[test]
fn dropout_swaps_in_the_recorded_null_condition() {
    let dir = tempfile::tempdir().unwrap();
    let reader = store(dir.path(), 8, true);
    models(dir.path());
    let t = task(dir.path(), &reader, "pixart_text", "");
    let batch = first_batch(&reader, &t);
    let (h, mask) = t.condition(&batch, &[false, true, false, true]).unwrap();
    let mask = mask.unwrap().to_vec2::<f32>().unwrap();
    // dropped rows: the empty caption (zeros, length 1); kept rows: their own
    let lens: Vec<u32> = batch.tensors["t5_len"].to_vec1().unwrap();
    for (i, row) in mask.iter().enumerate() {
        let n = row.iter().filter(|&&m| m == 1.0).count();
        assert_eq!(n, if i % 2 == 1 { 1 } else { lens[i] as usize }, "row {i}");
    }
    let dropped = h
        .get(1)
        .unwrap()
        .abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(dropped, 0.0);
    let a = t.condition(&batch, &[false; 4]).unwrap().0;
    let kept = (h.get(0).unwrap() - a.get(0).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    assert_eq!(
        kept.to_dtype(DType::F32)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        0.0
    );
    // the adapter mode: a dropped sample is the adapter's output of the black image
    let t = task(dir.path(), &reader, "pixart_redux_adapter", "");
    let (y, none) = t.condition(&batch, &[true, false, false, false]).unwrap();
    assert!(none.is_none());
    let (y2, _) = t.condition(&batch, &[true, true, true, true]).unwrap();
    let d = (y.get(0).unwrap() - y2.get(2).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
}

#[test]
fn a_store_without_the_null_embedding_says_how_to_add_it() {
    let dir = tempfile::tempdir().unwrap();
    let reader = store(dir.path(), 8, false);
    models(dir.path());
    let e = PixArtTask::build(
        &cfg(dir.path(), "pixart_redux_adapter", ""),
        dir.path(),
        &reader,
        &Device::Cpu,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        e.contains("black image") && e.contains("siglip_hidden") && e.contains("tensorbake run"),
        "{e}"
    );
}

#[test]
fn a_tiny_pixart_overfits_a_small_store() {
    let dir = tempfile::tempdir().unwrap();
    let reader = store(dir.path(), 4, true);
    models(dir.path());
    // PixArt trained (text, finetune): the loss falls at least 10x. PixArt frozen
    // (adapter): only what the condition can change falls, the frozen variance head's
    // VB term stays; the adapter still has to pull the loss down.
    for (mode, factor) in [
        ("pixart_text", 10.0),
        ("pixart_finetune", 10.0),
        ("pixart_redux_adapter", 1.05),
    ] {
        let extra = "steps = 150\nlr = 2e-3\ncond_dropout = 0.0\nweight_decay = 0.0\ngrad_clip = 1.0\ncheckpoint_every = 1000\n";
        let mut c = cfg(dir.path(), mode, extra);
        c.out = dir
            .path()
            .join(format!("out-{mode}"))
            .to_string_lossy()
            .into_owned();
        let t = PixArtTask::build(&c, dir.path(), &reader, &Device::Cpu).unwrap();
        let out = std::path::PathBuf::from(&c.out);
        let mut tr = Trainer::new(c, t, reader.clone(), Device::Cpu, out, Resume::No).unwrap();
        let mut losses = Vec::new();
        tr.run(&AtomicBool::new(false), &mut |l| losses.push(l.loss))
            .unwrap();
        let head: f64 = losses[..10].iter().sum::<f64>() / 10.0;
        let tail: f64 = losses[losses.len() - 10..].iter().sum::<f64>() / 10.0;
        eprintln!("{mode}: loss {head:.4} -> {tail:.4}");
        assert!(tail < head / factor, "{mode}: {head} -> {tail}");
    }
}
