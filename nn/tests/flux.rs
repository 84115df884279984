//! Parity of the Flux transformer with diffusers' `FluxTransformer2DModel`, forward and
//! gradients, with and without the guidance embedder, on the tiny random-weight models
//! and goldens that `fixtures/flux/make_flux_golden.py` wrote; RoPE, packing and ids;
//! the BFL single-file loader against the diffusers directory; which tensors get
//! gradients in frozen and partly trainable builds; adapters; the diffusers save round
//! trip (and `from_pretrained` on it, where a Python with diffusers is at hand); the
//! tiny writer.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use candle_core::{DType, Device, Module, Tensor, Var};
use common::{FWD_TOL, GRAD_TOL, rel};
use tensorbake_nn::Error;
use tensorbake_nn::flux::{self, Config, Flux, Inputs, bfl};
use tensorbake_nn::layers::Linear;
use tensorbake_nn::loader::{Trainable, VarSet};

/// The golden models: FLUX.1-dev shaped (guidance embedder) and schnell / OpenFLUX shaped.
const MODELS: [&str; 2] = ["dev", "schnell"];

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/flux")
}

fn bfl_file() -> PathBuf {
    fixtures().join("bfl/flux1-tiny-dev.safetensors")
}

fn golden() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("golden.safetensors"), &Device::Cpu).unwrap()
}

#[derive(Clone)]
struct Case {
    hidden: Tensor,
    ehs: Tensor,
    pooled: Tensor,
    t: Tensor,
    img_ids: Tensor,
    txt_ids: Tensor,
    guidance: Option<Tensor>,
    r: Tensor,
}

impl Case {
    fn of(g: &HashMap<String, Tensor>, m: &str) -> Self {
        let get = |k: &str| g[&format!("{m}.{k}")].clone();
        Self {
            hidden: get("hidden_states"),
            ehs: get("encoder_hidden_states"),
            pooled: get("pooled_projections"),
            t: get("timestep"),
            img_ids: get("img_ids"),
            txt_ids: get("txt_ids"),
            guidance: g.get(&format!("{m}.guidance")).cloned(),
            r: get("R"),
        }
    }

    fn inputs<'a>(&'a self, hidden: &'a Tensor, ehs: &'a Tensor, pooled: &'a Tensor) -> Inputs<'a> {
        Inputs {
            hidden_states: hidden,
            encoder_hidden_states: ehs,
            pooled_projections: pooled,
            timestep: &self.t,
            img_ids: &self.img_ids,
            txt_ids: &self.txt_ids,
            guidance: self.guidance.as_ref(),
        }
    }

    fn run(&self, model: &Flux) -> Tensor {
        model
            .forward(&self.inputs(&self.hidden, &self.ehs, &self.pooled))
            .unwrap()
    }

    /// The named inputs `run_diffusers.py` reads.
    fn named(&self) -> HashMap<String, Tensor> {
        let mut x = HashMap::new();
        for (k, v) in [
            ("hidden_states", &self.hidden),
            ("encoder_hidden_states", &self.ehs),
            ("pooled_projections", &self.pooled),
            ("timestep", &self.t),
            ("img_ids", &self.img_ids),
            ("txt_ids", &self.txt_ids),
        ] {
            x.insert(k.to_string(), v.to_dtype(DType::F32).unwrap());
        }
        if let Some(g) = &self.guidance {
            x.insert("guidance".to_string(), g.clone());
        }
        x
    }
}

fn load(spec: &Path, trainable: Option<&Trainable>) -> (Flux, Config) {
    let (model, cfg, files) =
        flux::load_flux(spec.to_str().unwrap(), DType::F32, &Device::Cpu, trainable).unwrap();
    assert_eq!(files.len(), 1);
    (model, cfg)
}

fn dev_config() -> Config {
    let (_, cfg) = load(&fixtures().join("dev"), None);
    cfg
}

fn load_bfl(trainable: Option<&Trainable>) -> Flux {
    let (model, cfg, _) = flux::load_flux_file(
        &bfl_file(),
        Some(&dev_config()),
        DType::F32,
        &Device::Cpu,
        trainable,
    )
    .unwrap();
    assert_eq!(cfg, dev_config());
    model
}

/// The golden's parameter gradients of model `m`, by parameter name.
fn golden_param_grads(g: &HashMap<String, Tensor>, m: &str) -> BTreeMap<String, Tensor> {
    let prefix = format!("{m}.grad.");
    let inputs = [
        "hidden_states",
        "encoder_hidden_states",
        "pooled_projections",
    ];
    g.iter()
        .filter_map(|(k, v)| k.strip_prefix(&prefix).map(|n| (n.to_string(), v.clone())))
        .filter(|(n, _)| !inputs.contains(&n.as_str()))
        .collect()
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

/// Per-tensor gradient error, max-abs normalised, with a floor: a gradient whose own
/// scale is below `floor` (1e-4 of the model's largest parameter gradient) is measured
/// against the floor, so float noise on a near-zero true gradient does not count as an
/// error of its own size.
fn grad_err(ours: &Tensor, theirs: &Tensor, floor: f32) -> f32 {
    let diff = max_abs(&(ours - theirs).unwrap());
    diff / max_abs(theirs).max(floor)
}

fn loss_grads(out: &Tensor, r: &Tensor) -> candle_core::backprop::GradStore {
    (out * r)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap()
}

#[test]
fn forward_matches_diffusers_with_and_without_guidance() {
    let g = golden();
    for m in MODELS {
        let (model, cfg) = load(&fixtures().join(m), None);
        assert_eq!(cfg.guidance_embeds, m == "dev");
        let case = Case::of(&g, m);
        let out = case.run(&model);
        assert_eq!(out.dims(), g[&format!("{m}.out")].dims());
        let e = rel(&out, &g[&format!("{m}.out")]);
        eprintln!("{m}: forward rel err {e:.2e}");
        assert!(e < FWD_TOL, "{m}: {e}");
    }
    // the guidance value matters
    let (model, _) = load(&fixtures().join("dev"), None);
    let mut case = Case::of(&g, "dev");
    case.guidance = Some(Tensor::new(&[1.0f32, 1.0], &Device::Cpu).unwrap());
    assert!(rel(&case.run(&model), &g["dev.out"]) > 1e-3);
}

#[test]
fn gradients_match_autograd_for_inputs_and_every_parameter() {
    let g = golden();
    for m in MODELS {
        let vars = VarSet::new();
        let (model, _) = load(&fixtures().join(m), Some(&Trainable::all(&vars)));
        let case = Case::of(&g, m);
        let x = Var::from_tensor(&case.hidden).unwrap();
        let e = Var::from_tensor(&case.ehs).unwrap();
        let p = Var::from_tensor(&case.pooled).unwrap();
        let out = model
            .forward(&case.inputs(x.as_tensor(), e.as_tensor(), p.as_tensor()))
            .unwrap();
        assert!(rel(&out, &g[&format!("{m}.out")]) < FWD_TOL);
        let grads = loss_grads(&out, &case.r);
        for (which, var) in [
            ("hidden_states", &x),
            ("encoder_hidden_states", &e),
            ("pooled_projections", &p),
        ] {
            let err = rel(
                grads.get(var.as_tensor()).unwrap(),
                &g[&format!("{m}.grad.{which}")],
            );
            eprintln!("{m}: grad {which} rel err {err:.2e}");
            assert!(err < GRAD_TOL, "{m}: grad {which}: {err}");
        }
        let golden_params = golden_param_grads(&g, m);
        let names: BTreeSet<String> = vars.vars().into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            golden_params.keys().cloned().collect::<BTreeSet<_>>(),
            "{m}: the variables are exactly diffusers' parameters"
        );
        let largest = golden_params.values().map(max_abs).fold(0f32, f32::max);
        let floor = 1e-4 * largest;
        let mut worst = (String::new(), 0f32);
        let mut worst_own = (String::new(), 0f32);
        let mut floored = Vec::new();
        for (name, var) in vars.vars() {
            let ours = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{m}: no gradient reaches {name}"));
            let theirs = &golden_params[&name];
            let err = grad_err(ours, theirs, floor);
            assert!(err < GRAD_TOL, "{m}: grad {name}: {err}");
            if err > worst.1 {
                worst = (name.clone(), err);
            }
            if max_abs(theirs) < floor {
                floored.push(name.clone());
            } else {
                let own = rel(ours, theirs);
                if own > worst_own.1 {
                    worst_own = (name.clone(), own);
                }
            }
        }
        eprintln!(
            "{m}: {} parameter gradients, worst rel err {:.2e} ({}); without the floor {:.2e} ({}); \
             measured against the floor (|grad| < 1e-4 of the largest, {largest:.2e}): {floored:?}",
            vars.len(),
            worst.1,
            worst.0,
            worst_own.1,
            worst_own.0
        );
    }
}

#[test]
fn the_per_block_api_is_the_forward() {
    let g = golden();
    for m in MODELS {
        let (model, cfg) = load(&fixtures().join(m), None);
        let case = Case::of(&g, m);
        let inp = case.inputs(&case.hidden, &case.ehs, &case.pooled);
        let s = model.prepare(&inp).unwrap();
        assert_eq!(s.img.dims(), &[2, 15, cfg.inner_dim()]);
        assert_eq!(s.txt.dims(), &[2, 7, cfg.inner_dim()]);
        assert_eq!(s.temb.dims(), &[2, cfg.inner_dim()]);
        assert_eq!(s.rope.len(), 22);
        let (mut img, mut txt) = (s.img.clone(), s.txt.clone());
        for b in model.double_blocks() {
            (img, txt) = b.forward(&img, &txt, &s.temb, &s.rope).unwrap();
        }
        let mut x = flux::join(&img, &txt).unwrap();
        for b in model.single_blocks() {
            x = b.forward(&x, &s.temb, &s.rope).unwrap();
        }
        let out = model.finish(&x, &s).unwrap();
        let whole = case.run(&model);
        assert_eq!(rel(&out, &whole), 0.0);
        // finish takes the image tokens alone too
        let img_only = x.narrow(1, 7, 15).unwrap();
        assert_eq!(rel(&model.finish(&img_only, &s).unwrap(), &whole), 0.0);
        // a [1] timestep broadcasts, integer dtypes read as their values
        let t1 = Tensor::new(&[0.5f32], &Device::Cpu).unwrap();
        let t2 = Tensor::new(&[0.5f32, 0.5], &Device::Cpu).unwrap();
        let mut a = case.clone();
        a.t = t1;
        let mut b = case.clone();
        b.t = t2;
        assert_eq!(rel(&a.run(&model), &b.run(&model)), 0.0);
        // the deprecated 3-D ids read row 0
        let mut c = case.clone();
        c.img_ids = case.img_ids.unsqueeze(0).unwrap();
        c.txt_ids = case.txt_ids.unsqueeze(0).unwrap();
        assert_eq!(rel(&c.run(&model), &whole), 0.0);
    }
}

#[test]
fn rope_packing_and_ids_match_diffusers() {
    let g = golden();
    let dev = Device::Cpu;
    let ids = Tensor::cat(&[&g["dev.txt_ids"], &g["dev.img_ids"]], 0).unwrap();
    let rope = flux::Rope::new(&ids, &[4, 6, 6], &dev).unwrap();
    let (cos, sin) = rope.cos_sin().unwrap();
    let (ec, es) = (rel(&cos, &g["rope.cos"]), rel(&sin, &g["rope.sin"]));
    eprintln!("rope cos / sin rel err {ec:.2e} / {es:.2e}");
    assert!(ec < 1e-6 && es < 1e-6, "{ec} {es}");
    let packed = flux::pack_latents(&g["pack.latents"]).unwrap();
    assert_eq!(rel(&packed, &g["pack.packed"]), 0.0);
    assert_eq!(rel(&packed, &g["dev.hidden_states"]), 0.0);
    let unpacked = flux::unpack_latents(&packed, 6, 10).unwrap();
    assert_eq!(rel(&unpacked, &g["pack.unpacked"]), 0.0);
    let ids = flux::latent_image_ids(3, 5, &dev).unwrap();
    assert_eq!(rel(&ids, &g["pack.ids_3x5"]), 0.0);
    assert_eq!(flux::text_ids(7, &dev).unwrap().dims(), &[7, 3]);
}

#[test]
fn bfl_single_file_computes_what_the_diffusers_dir_does() {
    let g = golden();
    let case = Case::of(&g, "dev");
    let (diffusers, _) = load(&fixtures().join("dev"), None);
    let want = case.run(&diffusers);
    let model = load_bfl(None);
    let e = rel(&case.run(&model), &want);
    eprintln!("BFL file vs diffusers dir: rel err {e:.2e}");
    assert_eq!(e, 0.0);
    // the same tensors, under diffusers names
    let (a, b) = (model.tensors(), diffusers.tensors());
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (k, t) in &a {
        assert_eq!(rel(t, &b[k]), 0.0, "{k}");
    }
    // our diffusers -> BFL conversion is the Python script's, tensor for tensor
    let ours = bfl::to_bfl(&b, &dev_config()).unwrap();
    let file = candle_core::safetensors::load(bfl_file(), &Device::Cpu).unwrap();
    assert_eq!(
        ours.keys().collect::<BTreeSet<_>>(),
        file.keys().collect::<BTreeSet<_>>()
    );
    for (k, t) in &ours {
        assert_eq!(rel(t, &file[k]), 0.0, "{k}");
    }

    // trainable from the BFL file: variables under diffusers names, golden gradients
    let vars = VarSet::new();
    let model = load_bfl(Some(&Trainable::all(&vars)));
    let golden_params = golden_param_grads(&g, "dev");
    assert_eq!(
        vars.vars()
            .into_iter()
            .map(|(n, _)| n)
            .collect::<BTreeSet<_>>(),
        golden_params.keys().cloned().collect::<BTreeSet<_>>()
    );
    let grads = loss_grads(&case.run(&model), &case.r);
    let floor = 1e-4 * golden_params.values().map(max_abs).fold(0f32, f32::max);
    for (name, var) in vars.vars() {
        let err = grad_err(
            grads.get(var.as_tensor()).unwrap(),
            &golden_params[&name],
            floor,
        );
        assert!(err < GRAD_TOL, "{name}: {err}");
    }

    // ComfyUI's prefix
    let tmp = tempfile::tempdir().unwrap();
    let prefixed = tmp.path().join("flux1-tiny-comfy.safetensors");
    let map: HashMap<String, Tensor> = file
        .iter()
        .map(|(k, v)| (format!("{}{k}", bfl::PREFIX), v.clone()))
        .collect();
    candle_core::safetensors::save(&map, &prefixed).unwrap();
    let (model, _, _) = flux::load_flux_file(
        &prefixed,
        Some(&dev_config()),
        DType::F32,
        &Device::Cpu,
        None,
    )
    .unwrap();
    assert_eq!(rel(&case.run(&model), &want), 0.0);

    // the tiny file's head width (16) has no standard RoPE axes: the config is asked for
    let e = flux::load_flux(bfl_file().to_str().unwrap(), DType::F32, &Device::Cpu, None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("head width 16") && e.contains("load_flux_file"),
        "{e}"
    );
}

#[test]
fn bfl_errors_name_the_bfl_tensor_and_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let mut file = candle_core::safetensors::load(bfl_file(), &Device::Cpu).unwrap();
    let broken = tmp.path().join("flux1-broken.safetensors");
    file.remove("double_blocks.0.txt_attn.qkv.weight");
    candle_core::safetensors::save(&file, &broken).unwrap();
    let cfg = dev_config();
    match flux::load_flux_file(&broken, Some(&cfg), DType::F32, &Device::Cpu, None) {
        Err(Error::BadTensor { tensor, path, why }) => {
            assert_eq!(tensor, "double_blocks.0.txt_attn.qkv.weight");
            assert!(path.contains("flux1-broken.safetensors"), "{path}");
            assert!(why.contains("missing"), "{why}");
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("loaded without a tensor"),
    }
    // a fused tensor of the wrong size is named with its full expected shape
    let w = file["double_blocks.0.img_attn.qkv.weight"].clone();
    file.insert(
        "double_blocks.0.txt_attn.qkv.weight".into(),
        w.narrow(0, 0, 64).unwrap(),
    );
    candle_core::safetensors::save(&file, &broken).unwrap();
    let e = flux::load_flux_file(&broken, Some(&cfg), DType::F32, &Device::Cpu, None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("double_blocks.0.txt_attn.qkv.weight") && e.contains("[96, 32]"),
        "{e}"
    );
    // a diffusers-named file is not a BFL file
    let e = flux::load_flux(
        fixtures()
            .join("dev/diffusion_pytorch_model.safetensors")
            .to_str()
            .unwrap(),
        DType::F32,
        &Device::Cpu,
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("diffusers names"), "{e}");
}

/// A Flux of head width 128 (the real one's, so a BFL file's config comes from its
/// shapes), seeded fresh weights, 1 double + 1 single block.
fn wide_config() -> Config {
    Config {
        num_layers: 1,
        num_single_layers: 1,
        num_attention_heads: 1,
        joint_attention_dim: 24,
        pooled_projection_dim: 12,
        in_channels: 16,
        ..Config::flux1_dev()
    }
}

#[test]
fn a_bfl_file_of_head_width_128_gives_its_config_and_loads_from_a_folder() {
    let cfg = wide_config();
    let vars = VarSet::new();
    let vb = tensorbake_nn::init::fresh_var_builder(3, &vars, DType::F32, &Device::Cpu);
    let fresh = Flux::new(vb, &cfg).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("flux-bfl");
    std::fs::create_dir_all(&dir).unwrap();
    let bfl_tensors = bfl::to_bfl(&fresh.tensors(), &cfg).unwrap();
    let map: HashMap<String, Tensor> = bfl_tensors
        .iter()
        .map(|(k, v)| (k.clone(), v.detach()))
        .collect();
    candle_core::safetensors::save(&map, dir.join("flux1-wide.safetensors")).unwrap();
    // a folder holding the single file
    let (model, got, files) =
        flux::load_flux(dir.to_str().unwrap(), DType::F32, &Device::Cpu, None).unwrap();
    assert_eq!(got, cfg);
    assert!(files[0].ends_with("flux1-wide.safetensors"));
    let dev = Device::Cpu;
    let hidden = Tensor::randn(0f32, 1.0, (1, 6, 16), &dev).unwrap();
    let ehs = Tensor::randn(0f32, 1.0, (1, 4, 24), &dev).unwrap();
    let pooled = Tensor::randn(0f32, 1.0, (1, 12), &dev).unwrap();
    let t = Tensor::new(&[0.3f32], &dev).unwrap();
    let gd = Tensor::new(&[3.5f32], &dev).unwrap();
    let img_ids = flux::latent_image_ids(2, 3, &dev).unwrap();
    let txt_ids = flux::text_ids(4, &dev).unwrap();
    let inp = Inputs {
        hidden_states: &hidden,
        encoder_hidden_states: &ehs,
        pooled_projections: &pooled,
        timestep: &t,
        img_ids: &img_ids,
        txt_ids: &txt_ids,
        guidance: Some(&gd),
    };
    let a = fresh.forward(&inp).unwrap();
    let b = model.forward(&inp).unwrap();
    assert_eq!(rel(&b, &a), 0.0);
}

#[test]
fn only_the_trainable_block_gets_variables_and_gradients() {
    let g = golden();
    let m = "dev";
    let vars = VarSet::new();
    let train = Trainable::when(&vars, |n| n.starts_with("transformer_blocks.0."));
    let (model, _) = load(&fixtures().join(m), Some(&train));
    let golden_block: BTreeMap<String, Tensor> = golden_param_grads(&g, m)
        .into_iter()
        .filter(|(n, _)| n.starts_with("transformer_blocks.0."))
        .collect();
    let names: BTreeSet<String> = vars.vars().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, golden_block.keys().cloned().collect::<BTreeSet<_>>());
    // the group of the block lists exactly those names
    let groups = model.tensor_groups();
    let block = groups
        .iter()
        .find(|(n, _)| n == "transformer_blocks.0")
        .unwrap();
    assert_eq!(block.1.iter().cloned().collect::<BTreeSet<_>>(), names);
    for (name, t) in model.tensors() {
        assert_eq!(
            t.is_variable(),
            name.starts_with("transformer_blocks.0."),
            "{name}"
        );
    }
    let case = Case::of(&g, m);
    let grads = loss_grads(&case.run(&model), &case.r);
    let floor = 1e-4
        * golden_param_grads(&g, m)
            .values()
            .map(max_abs)
            .fold(0f32, f32::max);
    for (name, var) in vars.vars() {
        let err = grad_err(
            grads.get(var.as_tensor()).unwrap(),
            &golden_block[&name],
            floor,
        );
        assert!(err < GRAD_TOL, "{name}: {err}");
    }
    for (name, t) in model.tensors() {
        if !name.starts_with("transformer_blocks.0.") {
            assert!(grads.get(&t).is_none(), "{name}");
        }
    }
    assert!(grads.get(&case.hidden).is_none() && grads.get(&case.ehs).is_none());
}

#[test]
fn frozen_model_passes_input_gradients_and_holds_no_variable() {
    let g = golden();
    for m in MODELS {
        let (model, _) = load(&fixtures().join(m), None);
        assert!(model.tensors().values().all(|t| !t.is_variable()));
        let case = Case::of(&g, m);
        let x = Var::from_tensor(&case.hidden).unwrap();
        let e = Var::from_tensor(&case.ehs).unwrap();
        let p = Var::from_tensor(&case.pooled).unwrap();
        let out = model
            .forward(&case.inputs(x.as_tensor(), e.as_tensor(), p.as_tensor()))
            .unwrap();
        let grads = loss_grads(&out, &case.r);
        for (which, var) in [
            ("hidden_states", &x),
            ("encoder_hidden_states", &e),
            ("pooled_projections", &p),
        ] {
            let err = rel(
                grads.get(var.as_tensor()).unwrap(),
                &g[&format!("{m}.grad.{which}")],
            );
            eprintln!("{m}: frozen model, grad {which} rel err {err:.2e}");
            assert!(err < GRAD_TOL, "{m}: {which}: {err}");
        }
        for t in model.tensors().values() {
            assert!(grads.get(t).is_none());
        }
    }
}

/// `B(A x)`: a rank-2 LoRA with variables, for the adapter hook.
struct Lora {
    a: Linear,
    b: Linear,
}

impl Module for Lora {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.b.forward(&self.a.forward(x)?)
    }
}

#[test]
fn adapters_plug_into_named_linears_and_get_gradients() {
    let g = golden();
    let (mut model, cfg) = load(&fixtures().join("dev"), None);
    let targets = model.lora_targets();
    // per double block 12 linears, per single block 5
    assert_eq!(
        targets.len(),
        12 * cfg.num_layers + 5 * cfg.num_single_layers
    );
    assert!(targets.contains(&"transformer_blocks.0.attn.to_q".to_string()));
    assert!(targets.contains(&"single_transformer_blocks.0.proj_mlp".to_string()));
    assert!(!targets.iter().any(|t| t.contains("norm")));
    // every tensor is in exactly one group, the groups in forward order
    let groups = model.tensor_groups();
    let names: Vec<&String> = groups.iter().flat_map(|(_, v)| v).collect();
    assert_eq!(names.len(), model.tensors().len());
    assert_eq!(
        names.iter().collect::<BTreeSet<_>>().len(),
        model.tensors().len()
    );
    assert_eq!(
        groups.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        [
            "embed",
            "transformer_blocks.0",
            "single_transformer_blocks.0",
            "out"
        ]
    );
    assert_eq!(flux::tensor_groups(&cfg).unwrap(), groups);

    let case = Case::of(&g, "dev");
    let base = case.run(&model);
    let vars = VarSet::new();
    let vb = tensorbake_nn::init::fresh_var_builder(9, &vars, DType::F32, &Device::Cpu);
    let lin = model.linear("transformer_blocks.0.attn.to_q").unwrap();
    let (i, o) = (lin.in_dim(), lin.out_dim());
    let lora = Lora {
        a: Linear::no_bias(i, 2, vb.pp("lora_A")).unwrap(),
        b: Linear::no_bias(2, o, vb.pp("lora_B")).unwrap(),
    };
    model
        .set_adapter("transformer_blocks.0.attn.to_q", Some(Arc::new(lora)))
        .unwrap();
    let out = case.run(&model);
    assert!(rel(&out, &base) > 1e-6, "the adapter changes the output");
    let grads = loss_grads(&out, &case.r);
    for (n, v) in vars.vars() {
        assert!(max_abs(grads.get(v.as_tensor()).unwrap()) > 0.0, "{n}");
    }
    for t in model.tensors().values() {
        assert!(grads.get(t).is_none());
    }
    model
        .set_adapter("transformer_blocks.0.attn.to_q", None)
        .unwrap();
    assert_eq!(rel(&case.run(&model), &base), 0.0);
    let e = model
        .set_adapter("transformer_blocks.0.attn.to_z", None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("to_z"), "{e}");
}

#[test]
fn guidance_mismatches_and_bad_shapes_are_clear_errors() {
    let g = golden();
    let (dev, _) = load(&fixtures().join("dev"), None);
    let (schnell, _) = load(&fixtures().join("schnell"), None);
    let mut case = Case::of(&g, "dev");
    case.guidance = None;
    let e = dev
        .forward(&case.inputs(&case.hidden, &case.ehs, &case.pooled))
        .unwrap_err()
        .to_string();
    assert!(e.contains("guidance"), "{e}");
    let mut case = Case::of(&g, "schnell");
    case.guidance = Some(Tensor::new(&[3.5f32, 3.5], &Device::Cpu).unwrap());
    let e = schnell
        .forward(&case.inputs(&case.hidden, &case.ehs, &case.pooled))
        .unwrap_err()
        .to_string();
    assert!(e.contains("no guidance embedder"), "{e}");
    let case = Case::of(&g, "schnell");
    let short = case.img_ids.narrow(0, 0, 14).unwrap();
    let inp = Inputs {
        img_ids: &short,
        ..case.inputs(&case.hidden, &case.ehs, &case.pooled)
    };
    let e = schnell.forward(&inp).unwrap_err().to_string();
    assert!(e.contains("img_ids"), "{e}");
    let narrow = case.pooled.narrow(1, 0, 8).unwrap();
    let e = schnell
        .forward(&case.inputs(&case.hidden, &case.ehs, &narrow))
        .unwrap_err()
        .to_string();
    assert!(e.contains("pooled_projections"), "{e}");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn loads_pipeline_roots_and_refuses_other_classes() {
    let g = golden();
    let case = Case::of(&g, "schnell");
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("pipeline");
    copy_dir(&fixtures().join("schnell"), &root.join("transformer"));
    std::fs::write(root.join("model_index.json"), "{}").unwrap();
    let (model, _) = load(&root, None);
    assert!(rel(&case.run(&model), &g["schnell.out"]) < FWD_TOL);
    // a pipeline root with neither transformer/ nor a BFL file
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    std::fs::write(empty.join("model_index.json"), "{}").unwrap();
    let e = flux::load_flux(empty.to_str().unwrap(), DType::F32, &Device::Cpu, None).unwrap_err();
    assert!(
        matches!(&e, Error::WeightsNotFound { .. }) && e.to_string().contains("transformer/"),
        "{e}"
    );
    // a PixArt directory is refused by class
    let other = tmp.path().join("pixart");
    copy_dir(&fixtures().join("schnell"), &other);
    std::fs::write(
        other.join("config.json"),
        r#"{"_class_name": "PixArtTransformer2DModel"}"#,
    )
    .unwrap();
    let e = flux::load_flux(other.to_str().unwrap(), DType::F32, &Device::Cpu, None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("PixArtTransformer2DModel") && e.contains("config.json"),
        "{e}"
    );
}

/// Runs `fixtures/flux/run_diffusers.py` on every `(dir, inputs)` in one Python process,
/// returns each `out`; `None` (printed why) where no Python with diffusers is at hand.
fn run_diffusers(jobs: &[(PathBuf, HashMap<String, Tensor>)]) -> Option<Vec<Tensor>> {
    let py = match common::diffusers_python() {
        Ok(py) => py,
        Err(why) => {
            eprintln!("from_pretrained checks skipped: {why}");
            return None;
        }
    };
    let tmp = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(py);
    cmd.arg(fixtures().join("run_diffusers.py"));
    let mut outs = Vec::new();
    for (i, (dir, inputs)) in jobs.iter().enumerate() {
        let inp = tmp.path().join(format!("inputs{i}.safetensors"));
        let out = tmp.path().join(format!("out{i}.safetensors"));
        candle_core::safetensors::save(inputs, &inp).unwrap();
        cmd.arg(dir).arg(&inp).arg(&out);
        outs.push(out);
    }
    let o = cmd.output().unwrap();
    assert!(
        o.status.success(),
        "diffusers failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    Some(
        outs.iter()
            .map(|p| {
                candle_core::safetensors::load(p, &Device::Cpu)
                    .unwrap()
                    .remove("out")
                    .unwrap()
            })
            .collect(),
    )
}

fn from_pretrained_checks(checks: &[(String, PathBuf, HashMap<String, Tensor>, Tensor)]) {
    let jobs: Vec<(PathBuf, HashMap<String, Tensor>)> = checks
        .iter()
        .map(|(_, d, x, _)| (d.clone(), x.clone()))
        .collect();
    let Some(outs) = run_diffusers(&jobs) else {
        return;
    };
    for ((name, _, _, ours), theirs) in checks.iter().zip(&outs) {
        let e = rel(ours, theirs);
        eprintln!("{name}: diffusers from_pretrained on the saved dir vs ours, rel err {e:.2e}");
        assert!(e < FWD_TOL, "{name}: {e}");
    }
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
        flux::save_diffusers(&dir, &cfg, &model.tensors()).unwrap();
        let read = |p: &Path| -> serde_json::Value {
            serde_json::from_str(&std::fs::read_to_string(p.join("config.json")).unwrap()).unwrap()
        };
        assert_eq!(read(&dir), read(&fixtures().join(m)), "{m}: config.json");
        let (reloaded, cfg2) = load(&dir, None);
        assert_eq!(cfg2, cfg);
        let case = Case::of(&g, m);
        let a = case.run(&model);
        let b = case.run(&reloaded);
        assert_eq!(rel(&a, &b), 0.0, "{m}: reloaded model differs");
        checks.push((m.to_string(), dir, case.named(), b));
    }
    // the BFL file saved as a diffusers directory
    let model = load_bfl(None);
    let dir = tmp.path().join("from-bfl");
    flux::save_diffusers(&dir, &dev_config(), &model.tensors()).unwrap();
    let case = Case::of(&g, "dev");
    let (reloaded, _) = load(&dir, None);
    let out = case.run(&reloaded);
    assert_eq!(rel(&out, &case.run(&model)), 0.0);
    checks.push(("from-bfl".to_string(), dir, case.named(), out));
    from_pretrained_checks(&checks);

    // missing, extra and misshapen tensors are refused before anything is written
    let (model, cfg) = load(&fixtures().join("schnell"), None);
    let mut t = model.tensors();
    let dir = tmp.path().join("refused");
    let w = t.remove("proj_out.bias").unwrap();
    let e = flux::save_diffusers(&dir, &cfg, &t)
        .unwrap_err()
        .to_string();
    assert!(e.contains("proj_out.bias") && e.contains("missing"), "{e}");
    t.insert("proj_out.bias".into(), w.clone());
    t.insert("lora.A".into(), w.clone());
    let e = flux::save_diffusers(&dir, &cfg, &t)
        .unwrap_err()
        .to_string();
    assert!(e.contains("lora.A"), "{e}");
    t.remove("lora.A");
    t.insert("proj_out.bias".into(), w.narrow(0, 0, 3).unwrap());
    let e = flux::save_diffusers(&dir, &cfg, &t)
        .unwrap_err()
        .to_string();
    assert!(e.contains("proj_out.bias") && e.contains("[12]"), "{e}");
    assert!(!dir.exists());
}

#[test]
fn presets_have_the_hub_shapes() {
    let count = |cfg: &Config| -> (usize, BTreeMap<String, Vec<usize>>) {
        let t = flux::expected_tensors(cfg).unwrap();
        (t.values().map(|s| s.iter().product::<usize>()).sum(), t)
    };
    let (dev, t) = count(&Config::flux1_dev());
    let (schnell, _) = count(&Config::flux1_schnell());
    eprintln!("FLUX.1 parameters: dev {dev}, schnell {schnell}");
    // FLUX.1-dev's transformer: 11,901,408,320 parameters; schnell lacks the guidance
    // embedder (256 x 3072 + 3072 x 3072 + 2 x 3072)
    assert_eq!(dev, 11_901_408_320);
    assert_eq!(dev - schnell, 256 * 3072 + 3072 * 3072 + 2 * 3072);
    assert_eq!(t.len(), 780 + 2 * 19 * 4 + 2 * 38 * 3);
    assert_eq!(t["x_embedder.weight"], vec![3072, 64]);
    assert_eq!(t["context_embedder.weight"], vec![3072, 4096]);
    assert_eq!(
        t["single_transformer_blocks.37.proj_out.weight"],
        vec![3072, 15360]
    );
    assert_eq!(
        t["transformer_blocks.18.norm1.linear.weight"],
        vec![18432, 3072]
    );
    assert_eq!(t["norm_out.linear.weight"], vec![6144, 3072]);
    assert_eq!(
        t["transformer_blocks.0.attn.norm_added_q.weight"],
        vec![128]
    );
    let groups = flux::tensor_groups(&Config::flux1_dev()).unwrap();
    assert_eq!(groups.len(), 1 + 19 + 38 + 1);
}

#[test]
fn tiny_writer_gives_trainable_models_that_diffusers_reads() {
    let tmp = tempfile::tempdir().unwrap();
    let dev = Device::Cpu;
    let mut checks = Vec::new();
    for guidance in [true, false] {
        let name = if guidance { "tiny-dev" } else { "tiny-schnell" };
        let dir = tmp.path().join(name);
        // the demo's widths: tiny T5 32, tiny CLIP image embedding 16
        let cfg = tensorbake_nn::tiny::write_tiny_flux(&dir, 5, guidance, 32, 16).unwrap();
        assert_eq!(cfg.guidance_embeds, guidance);
        assert_eq!(cfg.in_channels, 64);
        let vars = VarSet::new();
        let (model, cfg2) = load(&dir, Some(&Trainable::all(&vars)));
        assert_eq!(cfg2, cfg);
        // a 256 px image: 32x32 latents of 16 channels, packed 16x16 = 256 tokens
        let latents = Tensor::randn(0f32, 1.0, (2, 16, 32, 32), &dev).unwrap();
        let hidden = flux::pack_latents(&latents).unwrap();
        let ehs = Tensor::randn(0f32, 1.0, (2, 6, 32), &dev).unwrap();
        let pooled = Tensor::randn(0f32, 1.0, (2, 16), &dev).unwrap();
        let case = Case {
            hidden,
            ehs,
            pooled,
            t: Tensor::new(&[0.1f32, 0.9], &dev).unwrap(),
            img_ids: flux::latent_image_ids(16, 16, &dev).unwrap(),
            txt_ids: flux::text_ids(6, &dev).unwrap(),
            guidance: guidance.then(|| Tensor::new(&[3.5f32, 3.5], &dev).unwrap()),
            r: Tensor::zeros(1, DType::F32, &dev).unwrap(),
        };
        let out = case.run(&model);
        assert_eq!(out.dims(), &[2, 256, 64]);
        let rms = out
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .sqrt();
        eprintln!("{name}: output rms {rms:.3}");
        assert!(
            rms.is_finite() && (0.05..20.0).contains(&rms),
            "{name}: {rms}"
        );
        let grads = out.sqr().unwrap().mean_all().unwrap().backward().unwrap();
        for (n, v) in vars.vars() {
            assert!(
                max_abs(grads.get(v.as_tensor()).unwrap()).is_finite(),
                "{name}: {n}"
            );
        }
        checks.push((name.to_string(), dir, case.named(), out));
    }
    from_pretrained_checks(&checks);
}

/// bf16 activations with f32 master weights. diffusers rounds the timestep (and the
/// guidance) to the activation dtype before `x 1000`, and so does this model: at
/// `t = 0.93` bf16 gives 929.7, a phase error of up to 0.3 rad in the sinusoids, so a bf16
/// run is compared with the f32 one at timesteps and guidance exact in bf16 (0.5, 0.25;
/// 1.0, 0.5), and with diffusers itself run in bf16 at the golden's (where a Python with
/// diffusers is at hand).
#[test]
fn bf16_activations_with_f32_master_weights() {
    let g = golden();
    let dev = Device::Cpu;
    let mut against_diffusers = Vec::new();
    for m in MODELS {
        let dir = fixtures().join(m);
        let vars = VarSet::new();
        let (model, _, _) = flux::load_flux(
            dir.to_str().unwrap(),
            DType::BF16,
            &dev,
            Some(&Trainable::all(&vars)),
        )
        .unwrap();
        assert!(vars.vars().iter().all(|(_, v)| v.dtype() == DType::F32));
        let vars32 = VarSet::new();
        let (model32, _) = load(&dir, Some(&Trainable::all(&vars32)));
        let mut case = Case::of(&g, m);
        case.t = Tensor::new(&[0.5f32, 0.25], &dev).unwrap();
        if case.guidance.is_some() {
            case.guidance = Some(Tensor::new(&[1.0f32, 0.5], &dev).unwrap());
        }
        let bf = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
        let case16 = Case {
            hidden: bf(&case.hidden),
            ehs: bf(&case.ehs),
            pooled: bf(&case.pooled),
            r: bf(&case.r),
            ..case.clone()
        };
        let out = case16.run(&model);
        assert_eq!(out.dtype(), DType::BF16);
        let out32 = case.run(&model32);
        let e = rel(&out, &out32);
        let grads = loss_grads(&out, &case16.r);
        let grads32 = loss_grads(&out32, &case.r);
        let mut worst = 0f32;
        for (name, var) in vars.vars() {
            let gr = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{m}: no gradient reaches the f32 {name}"));
            assert_eq!(gr.dtype(), DType::F32);
            let want = grads32.get(vars32.get(&name).unwrap().as_tensor()).unwrap();
            worst = worst.max(rel(gr, want));
        }
        eprintln!(
            "{m}: bf16 activations vs f32: forward rel err {e:.2e}, worst param grad {worst:.2e}"
        );
        assert!(e < 3e-2, "{m}: bf16 forward {e}");
        assert!(worst < 0.1, "{m}: bf16 gradients {worst}");

        let golden_case = Case::of(&g, m);
        let g16 = Case {
            hidden: bf(&golden_case.hidden),
            ehs: bf(&golden_case.ehs),
            pooled: bf(&golden_case.pooled),
            ..golden_case.clone()
        };
        let mut named = golden_case.named();
        named.insert("bf16".into(), Tensor::zeros(1, DType::F32, &dev).unwrap());
        against_diffusers.push((m, dir, named, g16.run(&model)));
    }
    let jobs: Vec<(PathBuf, HashMap<String, Tensor>)> = against_diffusers
        .iter()
        .map(|(_, d, x, _)| (d.clone(), x.clone()))
        .collect();
    if let Some(outs) = run_diffusers(&jobs) {
        for ((m, _, _, ours), theirs) in against_diffusers.iter().zip(&outs) {
            let e = rel(ours, theirs);
            let e32 = rel(ours, &g[&format!("{m}.out")]);
            eprintln!(
                "{m}: bf16 at the golden's timesteps: vs diffusers in bf16 {e:.2e} (vs the f32 golden {e32:.2e})"
            );
            assert!(e < 3e-2, "{m}: {e}");
        }
    }
}
