//! `tensorbake train` end to end on a store written by `tensorbake run` with tiny
//! models: the outputs of a run (log, plot, config, checkpoints in the diffusers / BFL
//! layouts), SIGINT and SIGKILL followed by `--resume` ending bit-identical to an
//! uninterrupted run, and every bad configuration failing with one line before
//! anything is written; a Flux LoRA trained from a Flux store.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use tensorbake_kit::synth::write_webdataset;
use tensorbake_nn::tiny::{TinyModel, TinyPixart, write_tiny_model, write_tiny_pixart};

use crate::util::{diffusers_python, tempdir, tensorbake};

const RES: u32 = 64;

/// A store of 12 samples (sd_vae, siglip, t5; 64 px) and a tiny PixArt (and one with
/// the wrong caption width) under `dir`.
pub fn setup(dir: &Path, encoders: &[&str]) -> PathBuf {
    write_webdataset(&dir.join("shards"), "shard", 2, 6, (96, 80), 3).unwrap();
    let mut toml = format!(
        "name = \"t\"\nstore = \"store\"\n[source]\nkind = \"webdataset\"\nurls = [\"shards/shard-{{000000..000001}}.tar\"]\n\
         [preprocess]\nresolution = {RES}\n"
    );
    for (i, name) in encoders.iter().enumerate() {
        let m = TinyModel::for_feature(tensorbake_kit::schema::Feature::from_name(name).unwrap())
            .unwrap();
        write_tiny_model(m, &dir.join("models").join(name), 60 + i as u64).unwrap();
        // a Flux store takes T5 at the length of the Flux it trains (256 without the
        // guidance embedder)
        let extra = if *name == "t5" && encoders.contains(&"flux_vae") {
            "max_length = 256\n"
        } else if *name == "t5" {
            "max_length = 16\n"
        } else {
            ""
        };
        toml.push_str(&format!(
            "\n[[encoders]]\nname = \"{name}\"\nweights = \"models/{name}\"\nbatch = 4\n{extra}"
        ));
    }
    std::fs::write(dir.join("job.toml"), toml).unwrap();
    let o = tensorbake(dir, &["run", "job.toml"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    write_tiny_pixart(
        &dir.join("models/pixart"),
        7,
        TinyPixart::Xl512,
        32,
        (RES / 8) as usize,
    )
    .unwrap();
    write_tiny_pixart(
        &dir.join("models/pixart48"),
        7,
        TinyPixart::Xl512,
        48,
        (RES / 8) as usize,
    )
    .unwrap();
    dir.join("store")
}

pub fn config(dir: &Path, name: &str, body: &str) -> String {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, body).unwrap();
    path.to_string_lossy().into_owned()
}

pub fn base(mode: &str, out: &str, steps: u64) -> String {
    format!(
        "store = \"store\"\nmode = \"{mode}\"\npixart = \"models/pixart\"\nout = \"{out}\"\nsteps = {steps}\n\
         batch_size = 4\nlr = 1e-3\nredux_tokens = 8\ncheckpoint_every = 4\nkeep_checkpoints = 0\nseed = 3\n"
    )
}

fn lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn tensors(path: &Path) -> BTreeMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect()
}

fn same_tensors(a: &Path, b: &Path) {
    let (ta, tb) = (tensors(a), tensors(b));
    assert_eq!(ta.keys().collect::<Vec<_>>(), tb.keys().collect::<Vec<_>>());
    for (k, x) in &ta {
        let y = &tb[k];
        let d = (x.to_dtype(candle_core::DType::F32).unwrap()
            - y.to_dtype(candle_core::DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
        assert_eq!(
            d,
            0.0,
            "{k} differs between {} and {}",
            a.display(),
            b.display()
        );
    }
}

#[test]
fn train_writes_its_log_plot_config_and_checkpoints_in_loadable_layouts() {
    let dir = tempdir();
    let d = dir.path();
    setup(d, &["sd_vae", "siglip", "t5"]);
    let c = config(
        d,
        "adapter",
        &base("pixart_redux_adapter", "runs/adapter", 8),
    );
    let o = tensorbake(d, &["train", &c]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = d.join("runs/adapter");
    let log = lines(&out.join("log.jsonl"));
    assert_eq!(log.len(), 8);
    for key in [
        "step",
        "loss",
        "loss_mse",
        "loss_vb",
        "lr",
        "grad_norm",
        "samples_per_s",
    ] {
        assert!(log[0][key].is_number(), "{key}: {}", log[0]);
    }
    assert!(out.join("loss.png").is_file());
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    // every value used, defaults included, and what the models are
    assert_eq!(cfg["config"]["adam_eps"], 1e-10);
    assert_eq!(cfg["config"]["weight_decay"], 0.03);
    assert_eq!(cfg["models"]["redux"]["trained"], true);
    assert_eq!(
        cfg["models"]["pixart"]["weights_sha256"]
            .as_str()
            .unwrap()
            .len(),
        64
    );
    for step in [4, 8] {
        let ck = out.join(format!("checkpoint-{step}"));
        for f in [
            "redux.safetensors",
            "optimizer.safetensors",
            "trainer_state.json",
        ] {
            assert!(ck.join(f).is_file(), "{f} in checkpoint-{step}");
        }
    }
    let redux = tensors(&out.join("checkpoint-8/redux.safetensors"));
    assert_eq!(
        redux.keys().collect::<Vec<_>>(),
        [
            "redux_down.bias",
            "redux_down.weight",
            "redux_up.bias",
            "redux_up.weight"
        ]
    );
    assert_eq!(redux["redux_up.weight"].dims(), &[96, 32]);

    // PixArt fine-tuned to that adapter, block 1 only, with EMA
    let body = format!(
        "{}redux = \"runs/adapter/checkpoint-8/redux.safetensors\"\ntrain_blocks = [1]\nema = 0.9\n",
        base("pixart_finetune", "runs/finetune", 4)
    );
    let c = config(d, "finetune", &body);
    let o = tensorbake(d, &["train", &c]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ck = d.join("runs/finetune/checkpoint-4");
    let saved = tensors(&ck.join("transformer/diffusion_pytorch_model.safetensors"));
    let original = tensors(&d.join("models/pixart/diffusion_pytorch_model.safetensors"));
    assert_eq!(
        saved.keys().collect::<Vec<_>>(),
        original.keys().collect::<Vec<_>>()
    );
    let moved = |k: &str| {
        let a = saved[k].to_dtype(candle_core::DType::F32).unwrap();
        let b = original[k].to_dtype(candle_core::DType::F32).unwrap();
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    // the trained block moved; frozen weights are the original file's, bit for bit
    assert!(moved("transformer_blocks.1.attn1.to_q.weight") > 0.0);
    assert_eq!(moved("transformer_blocks.0.attn1.to_q.weight"), 0.0);
    assert_eq!(moved("proj_out.weight"), 0.0);
    assert!(ck.join("transformer/config.json").is_file());
    assert!(
        ck.join("ema/transformer/diffusion_pytorch_model.safetensors")
            .is_file()
    );
    match diffusers_python() {
        Some(py) => {
            let o = Command::new(py)
                .args([
                    "-c",
                    "import sys; from diffusers import PixArtTransformer2DModel as M; \
                     m = M.from_pretrained(sys.argv[1]); print(sum(1 for _ in m.state_dict()))",
                    ck.join("transformer").to_str().unwrap(),
                ])
                .output()
                .unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            let n: usize = String::from_utf8_lossy(&o.stdout).trim().parse().unwrap();
            assert_eq!(n, saved.len());
        }
        None => eprintln!(
            "skipped: PixArtTransformer2DModel.from_pretrained check (no Python with diffusers)"
        ),
    }
}

/// Starts `tensorbake train CONFIG` and returns the child.
fn spawn(dir: &Path, config: &str, resume: bool) -> std::process::Child {
    let mut args = vec!["train".to_string(), config.to_string()];
    if resume {
        args.push("--resume".into());
    }
    Command::new(env!("CARGO_BIN_EXE_tensorbake"))
        .args(&args)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits until `log` has at least `n` lines.
fn wait_for_steps(log: &Path, n: usize) {
    let t0 = Instant::now();
    while lines(log).len() < n {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "training did not reach step {n}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn interrupted_and_killed_runs_resume_to_the_uninterrupted_weights() {
    let dir = tempdir();
    let d = dir.path();
    setup(d, &["sd_vae", "t5"]);
    let steps = 20;
    let body = |out: &str, steps: u64| {
        format!(
            "{}checkpoint_every = 3\n",
            base("pixart_text", out, steps).replace("checkpoint_every = 4\n", "")
        )
    };
    let c = config(d, "a", &body("runs/a", steps));
    let o = tensorbake(d, &["train", &c]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let reference = d.join(format!(
        "runs/a/checkpoint-{steps}/transformer/diffusion_pytorch_model.safetensors"
    ));

    // SIGINT: the step finishes, a checkpoint is written, exit 130
    let long = config(d, "b", &body("runs/b", 100_000));
    let child = spawn(d, &long, false);
    wait_for_steps(&d.join("runs/b/log.jsonl"), 5);
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success()
    );
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("--resume"), "{stderr}");
    let stopped = lines(&d.join("runs/b/log.jsonl")).len() as u64;
    assert!(stopped < steps, "stopped at {stopped}");
    assert!(
        d.join(format!("runs/b/checkpoint-{stopped}/trainer_state.json"))
            .is_file()
    );
    // resumed with the shorter step count (steps may change on resume)
    let c = config(d, "b", &body("runs/b", steps));
    let o = tensorbake(d, &["train", &c, "--resume"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    same_tensors(
        &reference,
        &d.join(format!(
            "runs/b/checkpoint-{steps}/transformer/diffusion_pytorch_model.safetensors"
        )),
    );
    let log = lines(&d.join("runs/b/log.jsonl"));
    assert_eq!(log.len() as u64, steps);
    let log_a = lines(&d.join("runs/a/log.jsonl"));
    for (x, y) in log_a.iter().zip(&log) {
        assert_eq!((&x["step"], &x["loss"]), (&y["step"], &y["loss"]));
    }

    // SIGKILL: the steps since the last checkpoint are lost, nothing else
    let long = config(d, "c", &body("runs/c", 100_000));
    let mut child = spawn(d, &long, false);
    wait_for_steps(&d.join("runs/c/log.jsonl"), 8);
    child.kill().unwrap();
    child.wait().unwrap();
    let c = config(d, "c", &body("runs/c", steps));
    let o = tensorbake(d, &["train", &c, "--resume"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    same_tensors(
        &reference,
        &d.join(format!(
            "runs/c/checkpoint-{steps}/transformer/diffusion_pytorch_model.safetensors"
        )),
    );
}

fn fails(dir: &Path, name: &str, body: &str, needles: &[&str]) {
    let c = config(dir, name, body);
    let o = tensorbake(dir, &["train", &c]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{name}: should fail\n{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{name}: one line expected:\n{stderr}");
    assert!(lines[0].starts_with("error: "), "{name}: {stderr}");
    for n in needles {
        assert!(lines[0].contains(n), "{name}: `{n}` not in: {stderr}");
    }
    assert!(
        !dir.join("runs/bad").exists(),
        "{name}: something was written"
    );
}

#[test]
fn bad_configs_fail_with_one_clear_line_and_write_nothing() {
    let dir = tempdir();
    let d = dir.path();
    setup(d, &["sd_vae", "t5"]); // no siglip: the adapter modes cannot run on it
    let adapter = base("pixart_redux_adapter", "runs/bad", 4);
    let text = base("pixart_text", "runs/bad", 4);
    fails(
        d,
        "unknown-key",
        &format!("{text}learning_rate = 1e-4\n"),
        &["unknown-key.toml:", "learning_rate"],
    );
    fails(
        d,
        "wrong-mode",
        &text.replace("pixart_text", "pixart_lora"),
        &["wrong-mode.toml:2", "pixart_lora"],
    );
    fails(
        d,
        "missing-feature",
        &adapter,
        &["siglip_hidden", "does not have"],
    );
    fails(
        d,
        "shape",
        &text.replace("models/pixart\"", "models/pixart48\""),
        &["t5_hidden has width 32", "caption_channels 48"],
    );
    fails(
        d,
        "weights",
        &text.replace("models/pixart\"", "models/nope\""),
        &["models/nope"],
    );
    fails(
        d,
        "redux-given",
        &format!("{adapter}redux = \"models/redux\"\n"),
        &["trains a fresh adapter"],
    );
    fails(
        d,
        "redux-absent",
        &base("pixart_finetune", "runs/bad", 4),
        &["set `redux"],
    );
    fails(
        d,
        "store",
        &text.replace("store = \"store\"", "store = \"nowhere\""),
        &["nowhere"],
    );
    // --resume with nothing to resume from
    let c = config(d, "noresume", &text);
    let o = tensorbake(d, &["train", &c, "--resume"]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && stderr.contains("no complete checkpoint"),
        "{stderr}"
    );
}

#[test]
fn train_runs_a_flux_lora_from_a_flux_store() {
    let dir = tempdir();
    let d = dir.path();
    setup(d, &["flux_vae", "clip_vision", "t5"]);
    // the tiny T5 is 32 wide, the tiny CLIP image embedding 16
    tensorbake_nn::tiny::write_tiny_flux(&d.join("models/flux"), 9, false, 32, 16).unwrap();
    let body = "store = \"store\"\nmode = \"flux_clip_image\"\nflux = \"models/flux\"\n\
                out = \"out-flux\"\nsteps = 4\nbatch_size = 4\nlr = 1e-3\ncheckpoint_every = 2\n\
                keep_checkpoints = 0\nlora = { rank = 2, alpha = 4 }\n\
                cond_dropout = 0.5\ncond_dropout_start = 0.1\n\
                cond_dropout_ramp_steps = 2\n";
    let cfg = config(d, "flux", body);
    let o = tensorbake(d, &["train", &cfg]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = d.join("out-flux");
    let log = lines(&out.join("log.jsonl"));
    assert_eq!(log.len(), 4);
    assert!(
        log.iter()
            .all(|l| l["loss"].as_f64().is_some_and(f64::is_finite))
    );
    let recorded: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(recorded["config"]["mode"], "flux_clip_image");
    assert_eq!(recorded["models"]["training"]["lora"]["rank"], 2);
    assert_eq!(recorded["models"]["t5_tokens"], 256);
    for step in [2, 4] {
        let lora = tensors(&out.join(format!(
            "checkpoint-{step}/pytorch_lora_weights.safetensors"
        )));
        assert!(
            lora.keys()
                .all(|k| k.starts_with("transformer.") && k.contains(".lora_"))
        );
        assert!(
            lora.keys()
                .any(|k| k == "transformer.transformer_blocks.0.attn.to_q.lora_B.weight")
        );
    }
    assert!(out.join("loss.png").is_file());
}
