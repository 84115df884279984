//! Parity of the Redux adapter with diffusers' `ReduxImageEncoder` (forward and
//! gradients, golden from `fixtures/pixart/make_pixart_golden.py`), its locations (BFL
//! file, diffusers `image_embedder/`, pipeline root), saving, and the width check.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Tensor, Var};
use common::{FWD_TOL, GRAD_TOL, fixtures, golden, rel};
use tensorbake_nn::Error;
use tensorbake_nn::loader::{Trainable, VarSet};
use tensorbake_nn::redux::{self, Config};
use tensorbake_nn::tiny::write_tiny_redux;

fn load(spec: &std::path::Path, trainable: Option<&Trainable>) -> (redux::Redux, Config) {
    let (m, cfg, files) =
        redux::load_redux(spec.to_str().unwrap(), DType::F32, &Device::Cpu, trainable).unwrap();
    assert_eq!(files.len(), 1);
    (m, cfg)
}

#[test]
fn forward_and_gradients_match_diffusers() {
    let g = golden();
    let vars = VarSet::new();
    let (model, cfg) = load(
        &fixtures().join("redux/image_embedder"),
        Some(&Trainable::all(&vars)),
    );
    assert_eq!(
        cfg,
        Config {
            redux_dim: 16,
            txt_in_features: 12
        }
    );
    let x = Var::from_tensor(&g["redux.x"]).unwrap();
    let out = model.forward(x.as_tensor()).unwrap();
    let e = rel(&out, &g["redux.out"]);
    eprintln!("redux: forward rel err {e:.2e}");
    assert!(e < FWD_TOL, "{e}");
    let grads = (out * &g["redux.R"])
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let e = rel(grads.get(x.as_tensor()).unwrap(), &g["redux.grad.x"]);
    eprintln!("redux: grad x rel err {e:.2e}");
    assert!(e < GRAD_TOL, "{e}");
    let names: Vec<String> = vars.vars().into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        [
            "redux_down.bias",
            "redux_down.weight",
            "redux_up.bias",
            "redux_up.weight"
        ]
    );
    for (n, v) in vars.vars() {
        let e = rel(
            grads.get(v.as_tensor()).unwrap(),
            &g[&format!("redux.grad.{n}")],
        );
        eprintln!("redux: grad {n} rel err {e:.2e}");
        assert!(e < GRAD_TOL, "{n}: {e}");
    }
}

#[test]
fn loads_the_bfl_file_the_diffusers_dir_and_a_pipeline_root() {
    let g = golden();
    let want = &g["redux.out"];
    let x = &g["redux.x"];
    let tmp = tempfile::tempdir().unwrap();
    // the BFL single file, and a directory holding only it
    let bfl = fixtures().join("redux/flux1-redux-dev.safetensors");
    let only_file = tmp.path().join("bfl");
    std::fs::create_dir_all(&only_file).unwrap();
    std::fs::copy(&bfl, only_file.join("flux1-redux-dev.safetensors")).unwrap();
    // a pipeline root (model_index.json + image_embedder/ + the BFL file, as the hub repo)
    let root = tmp.path().join("FLUX.1-Redux-dev");
    let emb = root.join("image_embedder");
    std::fs::create_dir_all(&emb).unwrap();
    for f in ["config.json", "diffusion_pytorch_model.safetensors"] {
        std::fs::copy(fixtures().join("redux/image_embedder").join(f), emb.join(f)).unwrap();
    }
    std::fs::write(root.join("model_index.json"), "{}").unwrap();
    for spec in [&bfl, &only_file, &root, &fixtures().join("redux")] {
        let (m, cfg) = load(spec, None);
        assert_eq!(cfg.redux_dim, 16, "{}", spec.display());
        let e = rel(&m.forward(x).unwrap(), want);
        assert!(e < FWD_TOL, "{}: {e}", spec.display());
    }
    // nothing Redux-like
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let e = redux::load_redux(empty.to_str().unwrap(), DType::F32, &Device::Cpu, None).unwrap_err();
    assert!(matches!(e, Error::WeightsNotFound { .. }), "{e}");
    // a safetensors file of something else
    let other = tmp.path().join("other.safetensors");
    let mut t = HashMap::new();
    t.insert(
        "proj.weight".to_string(),
        Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&t, &other).unwrap();
    let e = redux::load_redux(other.to_str().unwrap(), DType::F32, &Device::Cpu, None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("redux_up.weight") && e.contains("other.safetensors"),
        "{e}"
    );
}

#[test]
fn saves_bfl_names_and_diffusers_dirs() {
    let g = golden();
    let tmp = tempfile::tempdir().unwrap();
    let vars = VarSet::new();
    let (model, cfg) = load(
        &fixtures().join("redux/flux1-redux-dev.safetensors"),
        Some(&Trainable::all(&vars)),
    );
    let file = tmp.path().join("checkpoint-10/redux.safetensors");
    redux::save_safetensors(&file, &model.tensors()).unwrap();
    let (back, cfg2) = load(&file, None);
    assert_eq!(cfg2, cfg);
    let x = &g["redux.x"];
    assert_eq!(
        rel(&back.forward(x).unwrap(), &model.forward(x).unwrap()),
        0.0
    );
    let dir = tmp.path().join("image_embedder");
    redux::save_diffusers(&dir, &cfg, &model.tensors()).unwrap();
    let (back, _) = load(&dir, None);
    assert_eq!(
        rel(&back.forward(x).unwrap(), &model.forward(x).unwrap()),
        0.0
    );
    match common::diffusers_python() {
        Ok(py) => {
            let mut inp = HashMap::new();
            inp.insert("x".to_string(), x.clone());
            let theirs = common::run_diffusers(&py, &[("redux", dir.as_path(), inp)]).remove(0);
            let e = rel(&model.forward(x).unwrap(), &theirs);
            eprintln!("redux: from_pretrained(saved dir) rel err {e:.2e}");
            assert!(e < FWD_TOL, "{e}");
        }
        Err(why) => eprintln!("redux: from_pretrained check skipped: {why}"),
    }
    // an incomplete set is refused, naming the tensor
    let mut t = model.tensors();
    t.remove("redux_up.bias");
    let e = redux::save_safetensors(&tmp.path().join("bad.safetensors"), &t)
        .unwrap_err()
        .to_string();
    assert!(e.contains("redux_up.bias"), "{e}");
    assert!(!tmp.path().join("bad.safetensors").exists());
}

#[test]
fn tiny_redux_fits_the_demo_widths() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_tiny_redux(tmp.path(), 9, 32, 32).unwrap();
    // the demo: tiny SigLIP tokens of width 32, the tiny PixArt's caption_channels 32
    cfg.check_widths(32, 32, "pixart").unwrap();
    let e = cfg.check_widths(1152, 32, "pixart").unwrap_err();
    assert!(matches!(e, Error::Incompatible { .. }), "{e}");
    let (m, cfg2) = load(tmp.path(), None);
    assert_eq!(cfg2, cfg);
    let x = Tensor::randn(0f32, 1.0, (1, 5, 32), &Device::Cpu).unwrap();
    let y = m.forward(&x).unwrap();
    assert_eq!(y.dims(), &[1, 5, 32]);
    let rms = y
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .sqrt();
    assert!(rms.is_finite() && (0.01..10.0).contains(&rms), "{rms}");
}
