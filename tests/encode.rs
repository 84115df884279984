//! `tensorbake encode` end to end, on the tiny reference models of
//! encode/tests/fixtures/vision (see make_vision_golden.py there).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, IndexOp, Tensor};

use crate::util::{root, tempdir, tensorbake};

fn fx() -> PathBuf {
    root().join("encode/tests/fixtures/vision")
}

fn images() -> Vec<String> {
    (0..3)
        .map(|i| {
            fx().join(format!("images/img{i}.png"))
                .display()
                .to_string()
        })
        .collect()
}

fn golden() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fx().join("golden.safetensors"), &Device::Cpu).unwrap()
}

fn stack(g: &HashMap<String, Tensor>, key: &str, order: &[usize]) -> Tensor {
    let v: Vec<Tensor> = order
        .iter()
        .map(|i| g[&format!("{key}_{i}")].clone())
        .collect();
    Tensor::stack(&v, 0).unwrap()
}

fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let a = a.to_dtype(DType::F32).unwrap();
    let diff = (&a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    diff / b
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// The `__metadata__` of a safetensors file.
fn metadata(path: &Path) -> serde_json::Map<String, serde_json::Value> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    header["__metadata__"].as_object().unwrap().clone()
}

fn run_ok(dir: &Path, args: &[&str]) {
    let out = tensorbake(dir, args);
    assert!(
        out.status.success(),
        "tensorbake {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn run_err(dir: &Path, args: &[&str]) -> String {
    let out = tensorbake(dir, args);
    assert!(
        !out.status.success(),
        "tensorbake {args:?} should have failed"
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn encode_writes_store_named_arrays_one_row_per_image() {
    let dir = tempdir();
    let g = golden();
    let imgs = images();
    let weights = fx().join("siglip_full").display().to_string();
    let mut args = vec![
        "encode",
        "--encoder",
        "siglip",
        "--weights",
        &weights,
        "--batch",
        "2",
    ];
    args.extend(["--out", "siglip.safetensors"]);
    args.extend(imgs.iter().map(String::as_str));
    run_ok(dir.path(), &args);
    let path = dir.path().join("siglip.safetensors");
    let t = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let hidden = &t["siglip_hidden"];
    assert_eq!(hidden.dims(), &[3, 16, 32]);
    // Image 1 is the one Pillow 13 resizes vertical pass first (see
    // encode/tests/vision.rs): a few pixels differ by a level there.
    for (i, tol) in [(0, 1e-4), (1, 0.05), (2, 1e-4)] {
        let e = rel_err(&hidden.i(i).unwrap(), &g[&format!("siglip_hidden_{i}")]);
        assert!(e <= tol, "image {i}: relative error {e}");
    }
    let meta = metadata(&path);
    assert_eq!(meta["feature"], "siglip");
    let sha =
        tensorbake_nn::weights::file_sha256(&fx().join("siglip_full/model.safetensors")).unwrap();
    assert_eq!(meta["weights_sha256"], sha.as_str());
    let pp: serde_json::Value = serde_json::from_str(meta["preprocess"].as_str().unwrap()).unwrap();
    assert_eq!(pp["processor"]["resample"], "bicubic");
    let inputs: Vec<String> = serde_json::from_str(meta["inputs"].as_str().unwrap()).unwrap();
    assert_eq!(inputs, imgs);
}

#[test]
fn encode_vaes_resize_and_crop_to_the_resolution() {
    let dir = tempdir();
    let g = golden();
    let imgs = images();
    // reversed order: the rows follow the arguments
    for (feature, model) in [("sd_vae", "sd_vae"), ("flux_vae", "flux_vae_bfl")] {
        let weights = fx().join(model).display().to_string();
        let out = format!("{feature}.safetensors");
        let mut args = vec!["encode", "--encoder", feature, "--weights", &weights];
        args.extend(["--resolution", "32", "--out", &out]);
        args.extend(imgs.iter().rev().map(String::as_str));
        run_ok(dir.path(), &args);
        let t = candle_core::safetensors::load(dir.path().join(&out), &Device::Cpu).unwrap();
        for m in ["mean", "std"] {
            let name = format!("{feature}_{m}");
            let e = rel_err(&t[&name], &stack(&g, &name, &[2, 1, 0]));
            assert!(e <= 1e-4, "{name}: relative error {e}");
        }
        assert_eq!(metadata(&dir.path().join(&out))["feature"], feature);
    }
}

#[test]
fn encode_in_half_precision_stays_close_to_f32() {
    let dir = tempdir();
    let g = golden();
    let imgs = images();
    let weights = fx().join("clip_full").display().to_string();
    let mut args = vec!["encode", "--encoder", "clip_vision", "--weights", &weights];
    // bf16 is refused on the CPU (candle has no CPU bf16 matmul); f16 runs.
    let mut bf16 = args.clone();
    bf16.extend(["--dtype", "bf16", "--out", "clip.safetensors"]);
    bf16.extend(imgs.iter().map(String::as_str));
    let e = run_err(dir.path(), &bf16);
    assert!(e.contains("bf16") && e.contains("CPU"), "{e}");
    args.extend(["--dtype", "f16", "--out", "clip.safetensors"]);
    args.extend(imgs.iter().map(String::as_str));
    run_ok(dir.path(), &args);
    let t =
        candle_core::safetensors::load(dir.path().join("clip.safetensors"), &Device::Cpu).unwrap();
    let emb = &t["clip_image_embeds"];
    assert_eq!(emb.dtype(), DType::F16);
    let reference = stack(&g, "clip_image_embeds", &[0, 1, 2]);
    let e = rel_err(emb, &reference);
    assert!(e <= 0.01, "f16 relative error {e}");
    // and it is not a copy of one row
    assert!(rel_err(&emb.i(0).unwrap(), &reference.i(1).unwrap()) > 0.05);
}

#[test]
fn encode_errors_name_what_is_wrong() {
    let dir = tempdir();
    let imgs = images();
    let weights = fx().join("sd_vae").display().to_string();
    // an image that does not exist
    let e = run_err(
        dir.path(),
        &[
            "encode",
            "--encoder",
            "sd_vae",
            "--weights",
            &weights,
            "--resolution",
            "32",
            "--out",
            "o.safetensors",
            "nope.png",
        ],
    );
    assert!(e.contains("nope.png"), "{e}");
    // captions given to an image encoder
    std::fs::write(dir.path().join("caps.jsonl"), "\"a cat\"\n").unwrap();
    let e = run_err(
        dir.path(),
        &[
            "encode",
            "--encoder",
            "sd_vae",
            "--weights",
            &weights,
            "--resolution",
            "32",
            "--text-file",
            "caps.jsonl",
            "--out",
            "o.safetensors",
        ],
    );
    assert!(e.contains("image encoder"), "{e}");
    // a model directory with a broken tensor
    let bad = dir.path().join("bad_vae");
    std::fs::create_dir(&bad).unwrap();
    std::fs::copy(fx().join("sd_vae/config.json"), bad.join("config.json")).unwrap();
    let st = bad.join("diffusion_pytorch_model.safetensors");
    let mut t = candle_core::safetensors::load(
        fx().join("sd_vae/diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    t.remove("encoder.conv_in.bias");
    candle_core::safetensors::save(&t, &st).unwrap();
    let bad_s = bad.display().to_string();
    let e = run_err(
        dir.path(),
        &[
            "encode",
            "--encoder",
            "sd_vae",
            "--weights",
            &bad_s,
            "--resolution",
            "32",
            "--out",
            "o.safetensors",
            &imgs[0],
        ],
    );
    assert!(
        e.contains("encoder.conv_in.bias") && e.contains(&st.display().to_string()),
        "{e}"
    );
    // an unknown encoder
    let e = run_err(
        dir.path(),
        &[
            "encode",
            "--encoder",
            "dino",
            "--weights",
            &weights,
            "--out",
            "o.safetensors",
            &imgs[0],
        ],
    );
    assert!(e.contains("dino") && e.contains("clip_vision"), "{e}");
    assert!(!dir.path().join("o.safetensors").exists());
}

/// `--text-file` through the same command: T5 (masked, zero beyond `t5_len`) and CLIP
/// text pooled, against the transformers golden outputs of encode/tests/fixtures/text.
#[test]
fn encode_text_files_with_t5_and_clip_text() {
    let text = Path::new(env!("CARGO_MANIFEST_DIR")).join("encode/tests/fixtures/text");
    let g = candle_core::safetensors::load(text.join("golden.safetensors"), &Device::Cpu).unwrap();
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(text.join("golden.json")).unwrap()).unwrap();
    let captions: Vec<String> = serde_json::from_value(meta["captions"].clone()).unwrap();
    let lengths: Vec<u32> = serde_json::from_value(meta["t5_lengths"].clone()).unwrap();
    let dir = tempdir();
    let jsonl: String = captions
        .iter()
        .map(|c| serde_json::to_string(c).unwrap() + "\n")
        .collect();
    std::fs::write(dir.path().join("caps.jsonl"), jsonl).unwrap();
    let t5 = text.join("t5");
    run_ok(
        dir.path(),
        &[
            "encode",
            "--encoder",
            "t5",
            "--weights",
            t5.to_str().unwrap(),
            "--max-length",
            "32",
            "--batch",
            "4",
            "--text-file",
            "caps.jsonl",
            "--out",
            "t5.safetensors",
        ],
    );
    let out =
        candle_core::safetensors::load(dir.path().join("t5.safetensors"), &Device::Cpu).unwrap();
    let hidden = &out["t5_hidden"];
    assert_eq!(hidden.dims(), &[captions.len(), 32, 48]);
    let lens: Vec<u32> = out["t5_len"].to_vec1().unwrap();
    assert_eq!(lens, lengths);
    for (i, &len) in lengths.iter().enumerate() {
        let len = len as usize;
        let got = hidden.get(i).unwrap();
        let want = g["t5_hidden"].get(i).unwrap().narrow(0, 0, len).unwrap();
        let err = rel_err(&got.narrow(0, 0, len).unwrap(), &want);
        assert!(err < 1e-4, "caption {i}: rel err {err}");
        if len < 32 {
            let pad = got
                .narrow(0, len, 32 - len)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap();
            assert_eq!(
                pad.to_scalar::<f32>().unwrap(),
                0.0,
                "caption {i}: rows beyond t5_len"
            );
        }
    }
    assert_eq!(
        metadata(&dir.path().join("t5.safetensors"))["feature"],
        "t5"
    );

    let clip = text.join("clip");
    run_ok(
        dir.path(),
        &[
            "encode",
            "--encoder",
            "clip_text",
            "--weights",
            clip.to_str().unwrap(),
            "--text-file",
            "caps.jsonl",
            "--out",
            "clip.safetensors",
        ],
    );
    let out =
        candle_core::safetensors::load(dir.path().join("clip.safetensors"), &Device::Cpu).unwrap();
    let pooled = &out["clip_text_pooled"];
    assert_eq!(pooled.dims(), &[captions.len(), 32]);
    let err = rel_err(pooled, &g["clip_pooled"]);
    assert!(err < 1e-4, "clip pooled rel err {err}");
    // an image encoder given captions, and a text encoder given images, say so
    let e = run_err(
        dir.path(),
        &[
            "encode",
            "--encoder",
            "t5",
            "--weights",
            t5.to_str().unwrap(),
            "--out",
            "x.safetensors",
            "a.jpg",
        ],
    );
    assert!(e.to_lowercase().contains("text"), "{e}");
}
