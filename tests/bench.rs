//! `tensorbake bench train` / `bench sample` end to end on the tiny preset, beside the
//! PyTorch / diffusers peers when a Python with diffusers is there (scripts/test.sh's
//! venv): both sides must have trained the same parameters and sampled images of the
//! same models.

use serde_json::Value;

use crate::util::{diffusers_python, tempdir, tensorbake};

fn json(path: &std::path::Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn rows<'a>(v: &'a Value, engine: &str) -> Vec<&'a Value> {
    v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["engine"] == engine)
        .collect()
}

#[test]
fn bench_train_times_both_modes_beside_pytorch() {
    let Some(python) = diffusers_python() else {
        eprintln!("SKIP bench_train_times_both_modes_beside_pytorch: no Python with diffusers");
        return;
    };
    let dir = tempdir();
    let out = tensorbake(
        dir.path(),
        &[
            "bench",
            "train",
            "--preset",
            "tiny",
            "--batch-size",
            "2",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--mode",
            "adapter",
            "--mode",
            "finetune",
            "--mode",
            "flux-lora",
            "--mode",
            "flux-full",
            "--python",
            &python,
            "--json",
            "r.json",
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("vs torch"), "{stdout}");
    assert!(
        stdout.contains("PixArt modes") && stdout.contains("Flux modes"),
        "{stdout}"
    );
    let v = json(&dir.path().join("r.json"));
    let (ours, torch) = (rows(&v, "tensorbake"), rows(&v, "pytorch"));
    assert_eq!((ours.len(), torch.len()), (4, 4), "{v}");
    for (a, b) in ours.iter().zip(&torch) {
        assert_eq!(a["mode"], b["mode"]);
        // the same step trains the same parameters on both sides
        assert_eq!(
            a["trainable_params"], b["trainable_params"],
            "{}",
            a["mode"]
        );
        assert_eq!(
            a["trainable_tensors"], b["trainable_tensors"],
            "{}",
            a["mode"]
        );
        for r in [a, b] {
            assert_eq!(r["samples_per_s_steps"].as_array().unwrap().len(), 2);
            assert!(r["samples_per_s_median"].as_f64().unwrap() > 0.0);
        }
        // the same model and objective on equally drawn data: losses of one size
        let (la, lb) = (
            a["last_loss"].as_f64().unwrap(),
            b["last_loss"].as_f64().unwrap(),
        );
        assert!(
            la.is_finite() && lb.is_finite() && la / lb < 10.0 && lb / la < 10.0,
            "{la} vs {lb}"
        );
    }
    // the adapter mode trains the adapter's 4 tensors, finetune all of PixArt
    assert_eq!(ours[0]["mode"], "adapter");
    assert_eq!(ours[0]["trainable_tensors"], 4);
    assert!(ours[1]["trainable_params"].as_u64() > ours[0]["trainable_params"].as_u64());
    // the Flux LoRA (peft's A and B per adapted linear on the peer) and all of Flux
    assert_eq!(ours[2]["mode"], "flux-lora");
    assert_eq!(ours[3]["mode"], "flux-full");
    assert!(ours[3]["trainable_params"].as_u64() > ours[2]["trainable_params"].as_u64());
    // nothing is left behind in a temporary work directory
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(left.len(), 1, "{left:?}");
}

#[test]
fn bench_sample_times_ours_beside_the_pipeline() {
    let Some(python) = diffusers_python() else {
        eprintln!("SKIP bench_sample_times_ours_beside_the_pipeline: no Python with diffusers");
        return;
    };
    let dir = tempdir();
    let out = tensorbake(
        dir.path(),
        &[
            "bench",
            "sample",
            "--preset",
            "tiny",
            "--steps",
            "4",
            "--rounds",
            "1",
            "--python",
            &python,
            "--json",
            "s.json",
            "--workdir",
            "work",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = json(&dir.path().join("s.json"));
    let (ours, peer) = (rows(&v, "tensorbake"), rows(&v, "diffusers"));
    assert_eq!((ours.len(), peer.len()), (1, 1), "{v}");
    for r in [ours[0], peer[0]] {
        assert!(r["seconds_per_image_median"].as_f64().unwrap() > 0.0);
    }
    // same models and condition, other noise: images of the same overall brightness
    let (a, b) = (
        ours[0]["mean_pixel"].as_f64().unwrap(),
        peer[0]["mean_pixel"].as_f64().unwrap(),
    );
    assert!((a - b).abs() < 0.1, "mean pixel {a} vs {b}");
    // --workdir keeps what both sides read
    for f in [
        "pixart/config.json",
        "vae/config.json",
        "redux/config.json",
        "scheduler_config.json",
    ] {
        assert!(dir.path().join("work").join(f).is_file(), "{f}");
    }
}

#[test]
fn bench_rejects_bad_settings_with_one_error_line() {
    let dir = tempdir();
    let cases: [(&[&str], &str); 4] = [
        (
            &["bench", "train", "--preset", "huge", "--no-torch"],
            "huge",
        ),
        (
            &[
                "bench",
                "train",
                "--preset",
                "tiny",
                "--mode",
                "text",
                "--no-torch",
            ],
            "text",
        ),
        (
            &[
                "bench",
                "sample",
                "--preset",
                "tiny",
                "--steps",
                "0",
                "--no-diffusers",
            ],
            "non-zero",
        ),
        (
            &[
                "bench",
                "train",
                "--preset",
                "tiny",
                "--steps",
                "1",
                "--warmup",
                "0",
                "--batch-size",
                "1",
                "--mode",
                "adapter",
                "--python",
                "/nonexistent/python",
            ],
            "/nonexistent/python",
        ),
    ];
    for (args, names) in cases {
        let out = tensorbake(dir.path(), args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        let errors: Vec<_> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(errors.len(), 1, "{args:?}: {stderr}");
        assert!(errors[0].contains(names), "{args:?}: {stderr}");
    }
}

/// `bench run` on the tiny fixtures: the whole pipeline over loopback into a store it
/// keeps in `--workdir`, every synthetic image written, the report's stages filled,
/// no GPU section for CPU encoders; a second run reuses the shards and models.
#[test]
fn bench_run_streams_encodes_and_writes_every_image() {
    let dir = tempdir();
    let work = dir.path().join("work");
    let args = [
        "bench",
        "run",
        "--models",
        "tiny",
        "--shards",
        "3",
        "--images-per-shard",
        "5",
        "--short-side",
        "200",
        "--resolution",
        "64",
        "--encoders",
        "sd_vae,siglip,t5",
        "--workdir",
        work.to_str().unwrap(),
        "--json",
        "r.json",
    ];
    let out = tensorbake(dir.path(), &args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("end to end") && stdout.contains("GPU                 none"),
        "{stdout}"
    );
    let report = json(&dir.path().join("r.json"));
    assert_eq!(report["samples"]["written"], 15, "{report:#}");
    assert_eq!(report["shards"]["committed"], 3);
    let encoders = report["stages"]["encoders"].as_object().unwrap();
    assert_eq!(encoders.len(), 3);
    assert!(encoders.values().all(|e| e["samples"] == 15));
    assert!(report.get("gpu").is_none());
    let store = tensorbake_store::StoreReader::open(&tensorbake_store::Location::from(
        work.join("store").as_path(),
    ))
    .unwrap();
    assert_eq!(store.len(), 15);
    // again: the shards and models are reused, the store written anew
    let again = tensorbake(dir.path(), &args);
    assert!(again.status.success());
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(stderr.contains("reusing the shards"), "{stderr}");
    assert_eq!(json(&dir.path().join("r.json"))["samples"]["written"], 15);

    let bad = tensorbake(dir.path(), &["bench", "run", "--encoders", "clip_text"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("clip_text"));
}

/// `bench write` at a small size: the run's write stage and tensorstore write the same
/// feature bytes (the production mix, 2.79 MB an image), the table and the JSON agree,
/// and bad settings end in one error line naming them.
#[test]
fn bench_write_times_the_writers_beside_tensorstore() {
    let dir = tempdir();
    let python = std::env::var("TENSORBAKE_PYTHON").ok();
    let mut args = vec![
        "bench",
        "write",
        "--parts",
        "3",
        "--samples-per-part",
        "6",
        "--batch",
        "4",
        "--rounds",
        "2",
        "--json",
        "w.json",
    ];
    match &python {
        Some(p) => args.extend(["--python", p.as_str()]),
        None => {
            eprintln!("bench write: TENSORBAKE_PYTHON is not set, tensorstore not run");
            args.push("--no-tensorstore");
        }
    }
    let out = tensorbake(dir.path(), &args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("| tensorbake |"), "{stdout}");
    let report = json(&dir.path().join("w.json"));
    assert_eq!(
        report["sample_bytes"],
        2 * 65536 + 729 * 1152 * 2 + 120 * 4096 * 2 + 4
    );
    assert_eq!(report["samples"], 18);
    assert_eq!(report["rounds"], 2);
    let rows = report["rows"].as_array().unwrap();
    let bytes = 18 * report["sample_bytes"].as_u64().unwrap();
    assert!(rows.iter().all(|r| r["bytes"] == bytes), "{report:#}");
    assert!(rows.iter().all(|r| r["mb_s"].as_f64().unwrap() > 0.0));
    assert!(report["compression_ratio"].as_f64().unwrap() > 1.0);
    if python.is_some() {
        assert_eq!(rows.len(), 2, "{report:#}");
        assert_eq!(rows[1]["writer"], "tensorstore");
        assert!(stdout.contains("tensorbake / tensorstore:"), "{stdout}");
    }

    for (bad, names) in [
        (
            vec!["bench", "write", "--writers", "0", "--no-tensorstore"],
            "writers",
        ),
        (
            vec![
                "bench",
                "write",
                "--parts",
                "1",
                "--samples-per-part",
                "1",
                "--python",
                "/nonexistent/python",
            ],
            "/nonexistent/python",
        ),
    ] {
        let out = tensorbake(dir.path(), &bad);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{bad:?}");
        let errors: Vec<_> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(errors.len(), 1, "{bad:?}: {stderr}");
        assert!(errors[0].contains(names), "{bad:?}: {stderr}");
    }
}
