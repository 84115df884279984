//! Parity of the PixArt-α transformer with diffusers' `PixArtTransformer2DModel`, forward
//! and gradients, on the tiny random-weight models and goldens that
//! `fixtures/pixart/make_pixart_golden.py` wrote; which tensors get gradients in frozen
//! and partly trainable builds; the loader's locations and errors; the diffusers save
//! round trip (and `from_pretrained` on it, where a Python with diffusers is at hand);
//! the tiny writers.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use common::{FWD_TOL, GRAD_TOL, fixtures, golden, rel};
use tensorbake_nn::Error;
use tensorbake_nn::loader::{Trainable, VarSet};
use tensorbake_nn::pixart::{self, Config, PixArt};
use tensorbake_nn::tiny::{TinyPixart, write_tiny_pixart};

/// The golden models: 512-style (no size embedders) and 1024-MS-style (with them).
const MODELS: [&str; 2] = ["xl512", "xl1024ms"];

struct Inputs {
    latents: Tensor,
    timestep: Tensor,
    y: Tensor,
    mask: Tensor,
    added: Option<(Tensor, Tensor)>,
    r: Tensor,
}

fn inputs(g: &HashMap<String, Tensor>, m: &str) -> Inputs {
    let get = |k: &str| g[&format!("{m}.{k}")].clone();
    let added = g
        .contains_key(&format!("{m}.resolution"))
        .then(|| (get("resolution"), get("aspect_ratio")));
    Inputs {
        latents: get("latents"),
        timestep: get("timestep"),
        y: get("encoder_hidden_states"),
        mask: get("encoder_attention_mask"),
        added,
        r: get("R"),
    }
}

fn run(model: &PixArt, inp: &Inputs, latents: &Tensor, y: &Tensor, mask: bool) -> Tensor {
    model
        .forward(
            latents,
            &inp.timestep,
            y,
            mask.then_some(&inp.mask),
            inp.added.as_ref().map(|(a, b)| (a, b)),
        )
        .unwrap()
}

fn load(dir: &Path, trainable: Option<&Trainable>) -> (PixArt, Config) {
    let (model, cfg, files) =
        pixart::load_pixart(dir.to_str().unwrap(), DType::F32, &Device::Cpu, trainable).unwrap();
    assert_eq!(files.len(), 1);
    (model, cfg)
}

/// The golden's parameter gradients of model `m`, by parameter name.
fn golden_param_grads(g: &HashMap<String, Tensor>, m: &str) -> BTreeMap<String, Tensor> {
    let prefix = format!("{m}.grad.");
    g.iter()
        .filter_map(|(k, v)| k.strip_prefix(&prefix).map(|n| (n.to_string(), v.clone())))
        .filter(|(n, _)| n != "latents" && n != "encoder_hidden_states")
        .collect()
}

/// Per-tensor gradient error, max-abs normalised. Gradients that are zero in exact
/// arithmetic (a key bias shifts every logit of a query equally, so softmax ignores it)
/// are float noise in both implementations; they are normalised by a floor of 1e-4 of
/// the largest gradient of the model instead of by their own noise.
fn grad_err(ours: &Tensor, theirs: &Tensor, floor: f32) -> f32 {
    let diff = (ours - theirs)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let scale = max_abs(theirs);
    diff / scale.max(floor)
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn forward_matches_diffusers() {
    let g = golden();
    for m in MODELS {
        let (model, cfg) = load(&fixtures().join(m), None);
        assert_eq!(cfg.uses_additional_conditions(), m == "xl1024ms");
        let inp = inputs(&g, m);
        let out = run(&model, &inp, &inp.latents, &inp.y, true);
        assert_eq!(out.dims(), &[2, 8, 8, 12]);
        let e = rel(&out, &g[&format!("{m}.out")]);
        let out = run(&model, &inp, &inp.latents, &inp.y, false);
        let e2 = rel(&out, &g[&format!("{m}.out_nomask")]);
        eprintln!("{m}: forward rel err {e:.2e} (masked), {e2:.2e} (no mask)");
        assert!(e < FWD_TOL && e2 < FWD_TOL, "{m}: {e} / {e2}");
        // the mask matters: row 1 is padded
        assert!(rel(&g[&format!("{m}.out")], &g[&format!("{m}.out_nomask")]) > 1e-3);
    }
}

#[test]
fn gradients_match_autograd_for_inputs_and_every_parameter() {
    let g = golden();
    for m in MODELS {
        let vars = VarSet::new();
        let (model, _) = load(&fixtures().join(m), Some(&Trainable::all(&vars)));
        let inp = inputs(&g, m);
        let x = Var::from_tensor(&inp.latents).unwrap();
        let y = Var::from_tensor(&inp.y).unwrap();
        let out = run(&model, &inp, x.as_tensor(), y.as_tensor(), true);
        assert!(rel(&out, &g[&format!("{m}.out")]) < FWD_TOL);
        let grads = (out * &inp.r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let golden_params = golden_param_grads(&g, m);
        let names: BTreeSet<String> = vars.vars().into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            golden_params.keys().cloned().collect::<BTreeSet<_>>(),
            "{m}: the variables are exactly diffusers' parameters"
        );
        let floor = 1e-4 * golden_params.values().map(max_abs).fold(0f32, f32::max);
        let mut worst = ("", 0f32);
        for (which, var) in [("latents", &x), ("encoder_hidden_states", &y)] {
            let e = rel(
                grads.get(var.as_tensor()).unwrap(),
                &g[&format!("{m}.grad.{which}")],
            );
            eprintln!("{m}: grad {which} rel err {e:.2e}");
            assert!(e < GRAD_TOL, "{m}: grad {which}: {e}");
        }
        let mut errs = Vec::new();
        for (name, var) in vars.vars() {
            let ours = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{m}: no gradient reaches {name}"));
            let e = grad_err(ours, &golden_params[&name], floor);
            assert!(e < GRAD_TOL, "{m}: grad {name}: {e}");
            errs.push((name, e));
        }
        for (n, e) in &errs {
            if *e > worst.1 {
                worst = (n.as_str(), *e);
            }
        }
        // the same measure without the floor, over the gradients not zero in exact
        // arithmetic
        let own = errs
            .iter()
            .filter(|(n, _)| !n.ends_with("to_k.bias"))
            .map(|(n, _)| {
                (
                    n.as_str(),
                    rel(
                        grads.get(vars.get(n).unwrap().as_tensor()).unwrap(),
                        &golden_params[n],
                    ),
                )
            })
            .fold(("", 0f32), |a, b| if b.1 > a.1 { b } else { a });
        eprintln!(
            "{m}: {} parameter gradients, worst rel err {:.2e} ({}); {:.2e} ({}) without the key biases",
            errs.len(),
            worst.1,
            worst.0,
            own.1,
            own.0
        );
    }
}

#[test]
fn only_the_trainable_block_gets_variables_and_gradients() {
    let g = golden();
    let m = "xl512";
    let vars = VarSet::new();
    let train = Trainable::when(&vars, |n| n.starts_with("transformer_blocks.1."));
    let (model, _) = load(&fixtures().join(m), Some(&train));
    let golden_block1: BTreeMap<String, Tensor> = golden_param_grads(&g, m)
        .into_iter()
        .filter(|(n, _)| n.starts_with("transformer_blocks.1."))
        .collect();
    let names: BTreeSet<String> = vars.vars().into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        golden_block1.keys().cloned().collect::<BTreeSet<_>>()
    );
    // the model holds variables exactly there, constants everywhere else
    for (name, t) in model.tensors().unwrap() {
        assert_eq!(
            t.is_variable(),
            name.starts_with("transformer_blocks.1."),
            "{name}"
        );
    }
    let inp = inputs(&g, m);
    let out = run(&model, &inp, &inp.latents, &inp.y, true);
    let grads = (out * &inp.r)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let floor = 1e-4
        * golden_param_grads(&g, m)
            .values()
            .map(max_abs)
            .fold(0f32, f32::max);
    for (name, var) in vars.vars() {
        let e = grad_err(
            grads.get(var.as_tensor()).unwrap(),
            &golden_block1[&name],
            floor,
        );
        assert!(e < GRAD_TOL, "{name}: {e}");
    }
    assert!(grads.get(&inp.latents).is_none() && grads.get(&inp.y).is_none());
}

#[test]
fn frozen_model_passes_the_caption_gradient_and_holds_no_variable() {
    let g = golden();
    for m in MODELS {
        let (model, _) = load(&fixtures().join(m), None);
        assert!(
            model.tensors().unwrap().values().all(|t| !t.is_variable()),
            "{m}: frozen means no variable"
        );
        let inp = inputs(&g, m);
        let y = Var::from_tensor(&inp.y).unwrap();
        let out = run(&model, &inp, &inp.latents, y.as_tensor(), true);
        let grads = (out * &inp.r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let e = rel(
            grads.get(y.as_tensor()).unwrap(),
            &g[&format!("{m}.grad.encoder_hidden_states")],
        );
        eprintln!("{m}: frozen model, caption grad rel err {e:.2e}");
        assert!(e < GRAD_TOL, "{m}: {e}");
        for t in model.tensors().unwrap().values() {
            assert!(grads.get(t).is_none());
        }
    }
}

#[test]
fn the_per_block_api_is_the_forward() {
    let g = golden();
    for m in MODELS {
        let (model, _) = load(&fixtures().join(m), None);
        let inp = inputs(&g, m);
        let s = model
            .prepare(
                &inp.latents,
                &inp.timestep,
                &inp.y,
                Some(&inp.mask),
                inp.added.as_ref().map(|(a, b)| (a, b)),
            )
            .unwrap();
        assert_eq!(s.grid, (4, 6));
        assert_eq!(s.temb6.dims(), &[2, 6 * model.config().inner_dim()]);
        assert_eq!(s.mask_bias.as_ref().unwrap().dims(), &[2, 1, 1, 7]);
        let mut x = s.hidden.clone();
        for b in model.blocks() {
            x = b
                .forward(&x, &s.caption, &s.temb6, s.mask_bias.as_ref())
                .unwrap();
        }
        let out = model.finish(&x, &s).unwrap();
        let whole = run(&model, &inp, &inp.latents, &inp.y, true);
        assert_eq!(rel(&out, &whole), 0.0);
        // integer timesteps give the same result as their f32 values
        let t_u32 = inp.timestep.to_dtype(DType::U32).unwrap();
        let out_u32 = model
            .forward(
                &inp.latents,
                &t_u32,
                &inp.y,
                Some(&inp.mask),
                inp.added.as_ref().map(|(a, b)| (a, b)),
            )
            .unwrap();
        assert_eq!(rel(&out_u32, &whole), 0.0);
    }
}

#[test]
fn multi_scale_model_without_sizes_is_a_clear_error() {
    let g = golden();
    let (model, _) = load(&fixtures().join("xl1024ms"), None);
    let inp = inputs(&g, "xl1024ms");
    let e = model
        .forward(&inp.latents, &inp.timestep, &inp.y, None, None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("resolution") && e.contains("aspect_ratio"),
        "{e}"
    );
    let e = model
        .forward(
            &inp.latents.narrow(2, 0, 7).unwrap(),
            &inp.timestep,
            &inp.y,
            None,
            None,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("patch size"), "{e}");
}

#[test]
fn position_embedding_matches_diffusers_on_a_non_square_grid() {
    let g = golden();
    let ours = pixart::sincos_pos_embed_2d(24, (3, 5), 7, 1.5, &Device::Cpu).unwrap();
    let e = rel(&ours, &g["pos_embed.3x5.base7.scale1_5"]);
    eprintln!("pos embed 3x5 rel err {e:.2e}");
    assert!(e < 1e-6, "{e}");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn loads_pipeline_roots_and_sharded_weights_and_names_what_is_wrong() {
    let g = golden();
    let inp = inputs(&g, "xl512");
    let want = &g["xl512.out"];
    let tmp = tempfile::tempdir().unwrap();
    // a pipeline root: model_index.json + transformer/
    let root = tmp.path().join("pipeline");
    copy_dir(&fixtures().join("xl512"), &root.join("transformer"));
    std::fs::write(root.join("model_index.json"), "{}").unwrap();
    let (model, _) = load(&root, None);
    assert!(rel(&run(&model, &inp, &inp.latents, &inp.y, true), want) < FWD_TOL);
    // a root without config.json is read as a pipeline too
    std::fs::remove_file(root.join("model_index.json")).unwrap();
    let (model, _) = load(&root, None);
    assert!(rel(&run(&model, &inp, &inp.latents, &inp.y, true), want) < FWD_TOL);

    // a pipeline root without transformer/
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    std::fs::write(empty.join("model_index.json"), "{}").unwrap();
    let e =
        pixart::load_pixart(empty.to_str().unwrap(), DType::F32, &Device::Cpu, None).unwrap_err();
    assert!(
        matches!(&e, Error::WeightsNotFound { .. }) && e.to_string().contains("transformer/"),
        "{e}"
    );

    // sharded weights with an index
    let sharded = tmp.path().join("sharded");
    std::fs::create_dir_all(&sharded).unwrap();
    std::fs::copy(
        fixtures().join("xl512/config.json"),
        sharded.join("config.json"),
    )
    .unwrap();
    let all = candle_core::safetensors::load(
        fixtures().join("xl512/diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let (mut a, mut b) = (HashMap::new(), HashMap::new());
    let mut weight_map = serde_json::Map::new();
    for (k, v) in &all {
        let (shard, file) = if k.starts_with("transformer_blocks.") {
            (&mut a, "diffusion_pytorch_model-00001-of-00002.safetensors")
        } else {
            (&mut b, "diffusion_pytorch_model-00002-of-00002.safetensors")
        };
        shard.insert(k.clone(), v.clone());
        weight_map.insert(k.clone(), file.into());
    }
    candle_core::safetensors::save(
        &a,
        sharded.join("diffusion_pytorch_model-00001-of-00002.safetensors"),
    )
    .unwrap();
    candle_core::safetensors::save(
        &b,
        sharded.join("diffusion_pytorch_model-00002-of-00002.safetensors"),
    )
    .unwrap();
    std::fs::write(
        sharded.join("diffusion_pytorch_model.safetensors.index.json"),
        serde_json::json!({"metadata": {}, "weight_map": weight_map}).to_string(),
    )
    .unwrap();
    let (model, _, files) =
        pixart::load_pixart(sharded.to_str().unwrap(), DType::F32, &Device::Cpu, None).unwrap();
    assert_eq!(files.len(), 2);
    assert!(rel(&run(&model, &inp, &inp.latents, &inp.y, true), want) < FWD_TOL);

    // a missing tensor is named with the file
    let broken = tmp.path().join("broken");
    copy_dir(&fixtures().join("xl512"), &broken);
    let mut less = all.clone();
    less.remove("transformer_blocks.1.attn2.to_k.weight");
    let file = broken.join("diffusion_pytorch_model.safetensors");
    candle_core::safetensors::save(&less, &file).unwrap();
    match pixart::load_pixart(broken.to_str().unwrap(), DType::F32, &Device::Cpu, None) {
        Err(Error::BadTensor { tensor, path, why }) => {
            assert_eq!(tensor, "transformer_blocks.1.attn2.to_k.weight");
            assert!(
                path.contains("diffusion_pytorch_model.safetensors"),
                "{path}"
            );
            assert!(why.contains("missing"), "{why}");
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("loaded without a tensor"),
    }
    // another model class is refused by name
    let other = tmp.path().join("flux");
    copy_dir(&fixtures().join("xl512"), &other);
    std::fs::write(
        other.join("config.json"),
        r#"{"_class_name": "FluxTransformer2DModel", "num_layers": 19}"#,
    )
    .unwrap();
    let e = pixart::load_pixart(other.to_str().unwrap(), DType::F32, &Device::Cpu, None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("FluxTransformer2DModel") && e.contains("config.json"),
        "{e}"
    );
}

/// The named inputs `run_diffusers.py` reads for a PixArt forward.
fn diffusers_inputs(
    latents: &Tensor,
    timestep: &Tensor,
    y: &Tensor,
    mask: &Tensor,
    added: Option<(&Tensor, &Tensor)>,
) -> HashMap<String, Tensor> {
    let mut x = HashMap::new();
    x.insert("latents".to_string(), latents.clone());
    x.insert(
        "timestep".to_string(),
        timestep.to_dtype(DType::F32).unwrap(),
    );
    x.insert("encoder_hidden_states".to_string(), y.clone());
    x.insert("encoder_attention_mask".to_string(), mask.clone());
    if let Some((r, ar)) = added {
        x.insert("resolution".to_string(), r.clone());
        x.insert("aspect_ratio".to_string(), ar.clone());
    }
    x
}

#[test]
fn save_diffusers_round_trips_and_checks_the_tensors() {
    let g = golden();
    let tmp = tempfile::tempdir().unwrap();
    let mut checks = Vec::new();
    for m in MODELS {
        let vars = VarSet::new();
        let (model, cfg) = load(&fixtures().join(m), Some(&Trainable::all(&vars)));
        let dir = tmp.path().join(m);
        pixart::save_diffusers(&dir, &cfg, &model.tensors().unwrap()).unwrap();
        // the same config.json as diffusers' save_pretrained wrote
        let ours: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                .unwrap();
        let theirs: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(fixtures().join(m).join("config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(ours, theirs, "{m}: config.json");
        let (reloaded, cfg2) = load(&dir, None);
        assert_eq!(cfg2, cfg);
        let inp = inputs(&g, m);
        let a = run(&model, &inp, &inp.latents, &inp.y, true);
        let b = run(&reloaded, &inp, &inp.latents, &inp.y, true);
        assert_eq!(rel(&a, &b), 0.0, "{m}: reloaded model differs");
        let x = diffusers_inputs(
            &inp.latents,
            &inp.timestep,
            &inp.y,
            &inp.mask,
            inp.added.as_ref().map(|(a, b)| (a, b)),
        );
        checks.push((m.to_string(), dir, x, b));
    }
    from_pretrained_checks(&checks);

    // missing, extra and misshapen tensors are refused before anything is written
    let (model, cfg) = load(&fixtures().join("xl512"), None);
    let mut t = model.tensors().unwrap();
    let dir = tmp.path().join("refused");
    let w = t.remove("proj_out.bias").unwrap();
    let e = pixart::save_diffusers(&dir, &cfg, &t)
        .unwrap_err()
        .to_string();
    assert!(e.contains("proj_out.bias") && e.contains("missing"), "{e}");
    t.insert("proj_out.bias".into(), w.clone());
    t.insert("lora.A".into(), w.clone());
    let e = pixart::save_diffusers(&dir, &cfg, &t)
        .unwrap_err()
        .to_string();
    assert!(e.contains("lora.A"), "{e}");
    t.remove("lora.A");
    t.insert("proj_out.bias".into(), w.narrow(0, 0, 3).unwrap());
    let e = pixart::save_diffusers(&dir, &cfg, &t)
        .unwrap_err()
        .to_string();
    assert!(e.contains("proj_out.bias") && e.contains("[32]"), "{e}");
    assert!(!dir.exists());
}

/// `PixArtTransformer2DModel.from_pretrained` on each saved directory gives our output
/// on the same inputs (one Python process for all), or a printed reason for the skip.
fn from_pretrained_checks(
    checks: &[(String, std::path::PathBuf, HashMap<String, Tensor>, Tensor)],
) {
    let py = match common::diffusers_python() {
        Ok(py) => py,
        Err(why) => {
            eprintln!("from_pretrained checks skipped: {why}");
            return;
        }
    };
    let jobs: Vec<common::Job<'_>> = checks
        .iter()
        .map(|(_, dir, x, _)| ("pixart", dir.as_path(), x.clone()))
        .collect();
    let outs = common::run_diffusers(&py, &jobs);
    for ((name, _, _, ours), theirs) in checks.iter().zip(&outs) {
        let e = rel(ours, theirs);
        eprintln!("{name}: diffusers from_pretrained on the saved dir vs ours, rel err {e:.2e}");
        assert!(e < FWD_TOL, "{name}: {e}");
    }
}

#[test]
fn presets_have_the_hub_shapes() {
    let n: usize = pixart::expected_tensors(&Config::xl_2_512())
        .unwrap()
        .values()
        .map(|s| s.iter().product::<usize>())
        .sum();
    // PixArt-XL-2-512x512: 610,856,096 parameters (diffusers reports 611M)
    let ms: BTreeMap<String, Vec<usize>> =
        pixart::expected_tensors(&Config::xl_2_1024_ms()).unwrap();
    let n_ms: usize = ms.values().map(|s| s.iter().product::<usize>()).sum();
    eprintln!("PixArt-XL-2 parameters: 512 {n}, 1024-MS {n_ms}");
    assert!((600_000_000..620_000_000).contains(&n), "{n}");
    assert_eq!(
        ms["adaln_single.emb.resolution_embedder.linear_1.weight"],
        vec![384, 256]
    );
    assert_eq!(ms["caption_projection.linear_1.weight"], vec![1152, 4096]);
    assert_eq!(ms["pos_embed.proj.weight"], vec![1152, 4, 2, 2]);
    assert_eq!(ms["proj_out.weight"], vec![32, 1152]);
    assert_eq!(ms["transformer_blocks.27.scale_shift_table"], vec![6, 1152]);
}

#[test]
fn tiny_writers_give_trainable_models_that_diffusers_reads() {
    let tmp = tempfile::tempdir().unwrap();
    let mut checks = Vec::new();
    for (variant, name) in [
        (TinyPixart::Xl512, "tiny512"),
        (TinyPixart::Xl1024Ms, "tiny1024ms"),
    ] {
        let dir = tmp.path().join(name);
        // the demo's widths: tiny T5 32, latents of a 256 px store 32x32
        let cfg = write_tiny_pixart(&dir, 5, variant, 32, 32).unwrap();
        assert_eq!(
            cfg.uses_additional_conditions(),
            variant == TinyPixart::Xl1024Ms
        );
        let vars = VarSet::new();
        let (model, cfg2) = load(&dir, Some(&Trainable::all(&vars)));
        assert_eq!(cfg2, cfg);
        let dev = Device::Cpu;
        let latents = Tensor::randn(0f32, 1.0, (2, 4, 32, 32), &dev).unwrap();
        let t = Tensor::new(&[10u32, 900], &dev).unwrap();
        let y = Tensor::randn(0f32, 1.0, (2, 6, 32), &dev).unwrap();
        let mask = Tensor::new(
            &[[1f32, 1., 1., 1., 1., 1.], [1., 1., 1., 0., 0., 0.]],
            &dev,
        )
        .unwrap();
        let res = Tensor::new(&[[256f32, 256.], [256., 256.]], &dev).unwrap();
        let ar = Tensor::new(&[[1f32], [1.]], &dev).unwrap();
        let added = (variant == TinyPixart::Xl1024Ms).then_some((&res, &ar));
        let out = model.forward(&latents, &t, &y, Some(&mask), added).unwrap();
        assert_eq!(out.dims(), &[2, 8, 32, 32]);
        let std = out
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .sqrt();
        eprintln!("{name}: output rms {std:.3}");
        assert!(
            std.is_finite() && (0.05..20.0).contains(&std),
            "{name}: rms {std}"
        );
        let grads = out.sqr().unwrap().mean_all().unwrap().backward().unwrap();
        for (n, v) in vars.vars() {
            let gmax = max_abs(grads.get(v.as_tensor()).unwrap());
            assert!(gmax.is_finite(), "{name}: {n}");
        }
        let x = diffusers_inputs(&latents, &t, &y, &mask, added);
        checks.push((name.to_string(), dir, x, out));
    }
    from_pretrained_checks(&checks);
}

#[test]
fn bf16_activations_with_f32_master_weights() {
    let g = golden();
    for m in MODELS {
        let vars = VarSet::new();
        let (model, _, _) = pixart::load_pixart(
            fixtures().join(m).to_str().unwrap(),
            DType::BF16,
            &Device::Cpu,
            Some(&Trainable::all(&vars)),
        )
        .unwrap();
        assert!(vars.vars().iter().all(|(_, v)| v.dtype() == DType::F32));
        let inp = inputs(&g, m);
        let bf = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
        let inp16 = Inputs {
            latents: bf(&inp.latents),
            timestep: inp.timestep.clone(),
            y: bf(&inp.y),
            mask: inp.mask.clone(),
            added: inp.added.clone(),
            r: bf(&inp.r),
        };
        let out = run(&model, &inp16, &inp16.latents, &inp16.y, true);
        assert_eq!(out.dtype(), DType::BF16);
        let e = rel(&out, &g[&format!("{m}.out")]);
        let grads = (out * &inp16.r)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let golden_params = golden_param_grads(&g, m);
        let mut worst = 0f32;
        for (name, var) in vars.vars() {
            let gr = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{m}: no gradient reaches the f32 {name}"));
            assert_eq!(gr.dtype(), DType::F32);
            if !name.ends_with("to_k.bias") {
                worst = worst.max(rel(gr, &golden_params[&name]));
            }
        }
        eprintln!("{m}: bf16 activations: forward rel err {e:.2e}, worst param grad {worst:.2e}");
        assert!(e < 3e-2, "{m}: bf16 forward {e}");
        assert!(worst < 0.1, "{m}: bf16 gradients {worst}");
    }
}

#[test]
#[allow(unsafe_code)]
fn loads_a_hub_id_from_the_hf_cache() {
    let g = golden();
    let cache = tempfile::tempdir().unwrap();
    let repo = cache.path().join("models--org--tiny-pixart");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let snap = repo.join("snapshots").join(commit);
    copy_dir(&fixtures().join("xl1024ms"), &snap.join("transformer"));
    std::fs::write(snap.join("model_index.json"), "{}").unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    // SAFETY: std serialises its own environment reads and writes (the other tests
    // read TMPDIR and TENSORBAKE_PYTHON only through std), nothing in this binary calls
    // libc's getenv behind std's back, and this is the only test that resolves a hub id
    // (every other location is a local path, resolved without HF_HUB_CACHE).
    unsafe { std::env::set_var("HF_HUB_CACHE", cache.path()) };
    let (model, cfg, files) =
        pixart::load_pixart("org/tiny-pixart", DType::F32, &Device::Cpu, None).unwrap();
    let missing = pixart::load_pixart("org/absent", DType::F32, &Device::Cpu, None)
        .unwrap_err()
        .to_string();
    unsafe { std::env::remove_var("HF_HUB_CACHE") };
    assert!(cfg.uses_additional_conditions());
    assert!(files[0].starts_with(&snap));
    let inp = inputs(&g, "xl1024ms");
    let out = run(&model, &inp, &inp.latents, &inp.y, true);
    assert!(rel(&out, &g["xl1024ms.out"]) < FWD_TOL);
    assert!(
        missing.contains("huggingface-cli download org/absent"),
        "{missing}"
    );
}

#[test]
fn generic_transformer_keys_that_change_the_architecture_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    copy_dir(&fixtures().join("xl512"), &dir);
    let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["_class_name"] = "Transformer2DModel".into();
    v["only_cross_attention"] = false.into();
    std::fs::write(dir.join("config.json"), v.to_string()).unwrap();
    // the original PixArt-α repos' class name and neutral keys load
    load(&dir, None);
    v["double_self_attention"] = true.into();
    std::fs::write(dir.join("config.json"), v.to_string()).unwrap();
    let e = pixart::load_pixart(dir.to_str().unwrap(), DType::F32, &Device::Cpu, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("double_self_attention"), "{e}");
}
