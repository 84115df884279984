//! The loop on a small linear task over a real store: the loss falls, gradient
//! accumulation equals a larger batch, a stopped-and-resumed run ends bit-identical
//! to an uninterrupted one, and a resume that would compute something else is refused.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use candle_core::{DType, Device, Tensor, Var};
use tensorbake_store::{
    Batch, FeatureSpec, FeatureValue, Location, Record, Store, StoreReader, StoreSpec,
};

use super::*;

/// Fits `y = x . w_true` with `w` from zero; the target is jittered by the noise
/// stream so that a resume must restore it to reproduce the run.
struct Linear {
    w: Var,
}

impl Linear {
    fn new() -> Self {
        Self {
            w: Var::zeros((4, 1), DType::F32, &Device::Cpu).unwrap(),
        }
    }
}

impl Task for Linear {
    fn arrays(&self) -> Vec<String> {
        vec!["x".into(), "y".into()]
    }
    fn vars(&self) -> Vec<(String, Var)> {
        vec![("w".into(), self.w.clone())]
    }
    fn step_with(
        &self,
        batch: &Batch,
        noise: &mut Noise,
        scale: f64,
        _step: u64,
        _side: &crate::recompute::SideGrads,
    ) -> candle_core::Result<(Losses, Vec<Option<Tensor>>)> {
        let x = &batch.tensors["x"];
        let y = &batch.tensors["y"];
        let jitter = (noise.randn(y.dims(), y.device())? * 1e-3)?;
        let err = (x.matmul(self.w.as_tensor())? - (y + jitter)?)?;
        let loss = err.sqr()?.mean_all()?;
        let grads = (&loss * scale)?.backward()?;
        let v = f64::from(loss.to_scalar::<f32>()?);
        Ok((
            Losses {
                loss: v,
                mse: v,
                vb: 0.0,
            },
            vec![grads.get(self.w.as_tensor()).cloned()],
        ))
    }
    fn save(&self, dir: &Path, weights: &BTreeMap<String, Tensor>) -> Result<(), TrainError> {
        save_safetensors(weights, &dir.join("model.safetensors"))
            .map_err(|source| TrainError::Step { step: 0, source })
    }
    fn saved_files(&self, dir: &Path) -> Vec<PathBuf> {
        vec![dir.join("model.safetensors")]
    }
}

fn store(dir: &Path, n: usize) -> Arc<StoreReader> {
    let location = Location::from(dir.join("store"));
    let spec = |shape: Vec<u64>| FeatureSpec {
        model: "linear".into(),
        weights_sha256: "0".into(),
        preprocess: serde_json::json!({}),
        dtype: tensorbake_store::DType::F32,
        shape,
    };
    let features = BTreeMap::from([
        ("x".to_string(), spec(vec![4])),
        ("y".to_string(), spec(vec![1])),
    ]);
    let store = Store::create_or_open(&location, StoreSpec::new(features)).unwrap();
    let w_true = [0.5f32, -1.0, 2.0, 0.25];
    let mut rng = tensorbake_kit::rng::SplitMix64::new(9);
    let mut w = store.part_writer("p0", "synthetic").unwrap();
    for i in 0..n {
        let x: Vec<f32> = (0..4).map(|_| rng.normal() as f32).collect();
        let y: f32 = x.iter().zip(w_true).map(|(a, b)| a * b).sum();
        let bytes = |v: &[f32]| v.iter().flat_map(|f| f.to_le_bytes()).collect::<Vec<u8>>();
        w.push(Record {
            key: format!("k{i:03}"),
            caption: String::new(),
            caption_raw: String::new(),
            orig_size: [1, 1],
            features: BTreeMap::from([
                ("x".to_string(), FeatureValue::Bytes(bytes(&x))),
                ("y".to_string(), FeatureValue::Bytes(bytes(&[y]))),
            ]),
        })
        .unwrap();
    }
    w.commit().unwrap();
    Arc::new(StoreReader::open(&location).unwrap())
}

/// The base test config with the keys of `extra` (TOML) replacing or adding to it.
fn config(out: &Path, extra: &str) -> TrainConfig {
    let base = format!(
        "store = \"s\"\nmode = \"pixart_text\"\npixart = \"p\"\nout = \"{}\"\nsteps = 24\nbatch_size = 4\nlr = 0.05\nweight_decay = 0.0\ngrad_clip = 0.0\ncheckpoint_every = 5\nkeep_checkpoints = 0\nprefetch = 2\n",
        out.display()
    );
    let mut table: toml::Table = base.parse().unwrap();
    table.extend(extra.parse::<toml::Table>().unwrap());
    TrainConfig::parse(&toml::to_string(&table).unwrap(), "test").unwrap()
}

fn train(
    reader: &Arc<StoreReader>,
    out: &Path,
    extra: &str,
    resume: Resume,
    stop_at: Option<u64>,
) -> Result<(Outcome, Vec<f32>, Vec<StepLog>), TrainError> {
    let cfg = config(out, extra);
    let mut t = Trainer::new(
        cfg,
        Linear::new(),
        reader.clone(),
        Device::Cpu,
        out.into(),
        resume,
    )?;
    let stop = AtomicBool::new(false);
    let mut logs = Vec::new();
    let outcome = t.run(&stop, &mut |l| {
        logs.push(l.clone());
        if Some(l.step) == stop_at {
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    })?;
    let w = t
        .task()
        .w
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    Ok((outcome, w, logs))
}

#[test]
fn the_loss_falls_and_the_outputs_are_written() {
    let dir = tempfile::tempdir().unwrap();
    let reader = store(dir.path(), 40);
    let out = dir.path().join("run");
    let (outcome, w, logs) = train(&reader, &out, "lr = 0.2", Resume::No, None).unwrap();
    assert_eq!(
        outcome,
        Outcome::Finished(checkpoint::checkpoint_dir(&out, 24))
    );
    let first = logs[0].loss;
    let last = logs.last().unwrap().loss;
    assert!(last < first / 10.0, "{first} -> {last}");
    // and the weights moved toward the truth (from zero, at distance 2.3)
    let dist: f32 = w
        .iter()
        .zip([0.5f32, -1.0, 2.0, 0.25])
        .map(|(a, b)| (a - b).powi(2))
        .sum::<f32>()
        .sqrt();
    assert!(dist < 0.6, "{w:?}");
    // 40 samples, batches of 4: 10 per epoch, so step 24 is in epoch 2
    assert_eq!(logs.last().unwrap().epoch, 2);
    let lines = std::fs::read_to_string(out.join("log.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 24);
    assert!(out.join("loss.png").is_file());
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["config"]["weight_decay"], 0.0);
    assert_eq!(cfg["config"]["adam_eps"], 1e-10);
    let steps: Vec<u64> = checkpoint::list(&out).iter().map(|(s, _)| *s).collect();
    assert_eq!(steps, [5, 10, 15, 20, 24]);
    // a fresh run into the same directory is refused
    let e = train(&reader, &out, "", Resume::No, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("--resume"), "{e}");
}

#[test]
fn a_stopped_then_resumed_run_is_bit_identical_to_an_uninterrupted_one() {
    let dir = tempfile::tempdir().unwrap();
    let reader = store(dir.path(), 18); // 4 batches an epoch: the resume crosses epochs
    let ema = "ema = 0.9\ngrad_accum = 2\n";
    let (_, w_full, logs_full) =
        train(&reader, &dir.path().join("a"), ema, Resume::No, None).unwrap();
    let b = dir.path().join("b");
    let (outcome, _, _) = train(&reader, &b, ema, Resume::No, Some(7)).unwrap();
    assert_eq!(outcome, Outcome::Stopped(checkpoint::checkpoint_dir(&b, 7)));
    let (_, w_resumed, _) = train(&reader, &b, ema, Resume::Latest, None).unwrap();
    assert_eq!(w_full, w_resumed);
    // the log is whole and the same, step for step
    let resumed: Vec<StepLog> = std::fs::read_to_string(b.join("log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(resumed.len(), 24);
    for (x, y) in logs_full.iter().zip(&resumed) {
        assert_eq!((x.step, x.loss, x.grad_norm), (y.step, y.loss, y.grad_norm));
    }
    // the EMA weights match too
    let ema_a = candle_core::safetensors::load(
        checkpoint::checkpoint_dir(&dir.path().join("a"), 24).join("ema/model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let ema_b = candle_core::safetensors::load(
        checkpoint::checkpoint_dir(&b, 24).join("ema/model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let (ea, eb): (Vec<f32>, Vec<f32>) = (
        ema_a["w"].flatten_all().unwrap().to_vec1().unwrap(),
        ema_b["w"].flatten_all().unwrap().to_vec1().unwrap(),
    );
    assert_eq!(ea, eb);
    // resuming with another learning rate would compute other steps: refused
    let e = train(
        &reader,
        &b,
        &format!("{ema}lr = 0.01\nsteps = 30\n"),
        Resume::Latest,
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("`lr`") && e.contains("0.05"), "{e}");
    // but more steps is a continuation
    let (_, _, more) = train(
        &reader,
        &b,
        &format!("{ema}steps = 26\n"),
        Resume::Latest,
        None,
    )
    .unwrap();
    assert_eq!(more.iter().map(|l| l.step).collect::<Vec<_>>(), [25, 26]);
}

#[test]
fn gradient_accumulation_equals_the_larger_batch() {
    let dir = tempfile::tempdir().unwrap();
    let reader = store(dir.path(), 32);
    let run = |extra: &str, out: &str| {
        let out = dir.path().join(out);
        let cfg = TrainConfig::parse(
            &format!(
                "store = \"s\"\nmode = \"pixart_text\"\npixart = \"p\"\nout = \"{}\"\nsteps = 3\nlr = 0.05\nweight_decay = 0.0\ngrad_clip = 0.0\nprefetch = 1\n{extra}",
                out.display()
            ),
            "t",
        )
        .unwrap();
        let mut t = Trainer::new(
            cfg,
            Linear::new(),
            reader.clone(),
            Device::Cpu,
            out,
            Resume::No,
        )
        .unwrap();
        let mut logs = Vec::new();
        t.run(&AtomicBool::new(false), &mut |l| logs.push(l.loss))
            .unwrap();
        (
            t.task()
                .w
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            logs,
        )
    };
    // the noise jitter differs in draw order, so compare within its 1e-3 scale
    let (w_big, l_big) = run("batch_size = 8\n", "big");
    let (w_acc, l_acc) = run("batch_size = 4\ngrad_accum = 2\n", "acc");
    for (a, b) in w_big.iter().zip(&w_acc) {
        assert!((a - b).abs() < 1e-3, "{w_big:?} vs {w_acc:?}");
    }
    for (a, b) in l_big.iter().zip(&l_acc) {
        assert!((a - b).abs() / a < 1e-2, "{l_big:?} vs {l_acc:?}");
    }
}

#[test]
fn a_store_smaller_than_a_batch_is_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let reader = store(dir.path(), 3);
    let out = dir.path().join("run");
    let e = train(&reader, &out, "", Resume::No, None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("3 committed samples") && e.contains("batch_size"),
        "{e}"
    );
    assert!(!out.exists());
}
