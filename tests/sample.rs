//! `tensorbake sample` end to end on a checkpoint trained from a `run` store, and the
//! validation grids of `tensorbake train`: grid sizes, the same seed giving the same
//! bytes, every bad input failing with one line before anything is written.

use std::path::Path;

use crate::train::{base, config, setup};
use crate::util::{tempdir, tensorbake};

fn ok(o: &std::process::Output) -> String {
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{stderr}");
    stderr
}

fn png_size(path: &Path) -> (u32, u32) {
    let img = image::open(path).unwrap();
    (img.width(), img.height())
}

/// A trained adapter checkpoint (4 steps) and its config.
fn trained(d: &Path) -> String {
    setup(d, &["sd_vae", "siglip", "t5"]);
    let c = config(
        d,
        "adapter",
        &base("pixart_redux_adapter", "runs/adapter", 4),
    );
    ok(&tensorbake(d, &["train", &c]));
    c
}

#[test]
fn grids_have_a_row_per_prompt_and_the_same_seed_gives_the_same_images() {
    let dir = tempdir();
    let d = dir.path();
    let c = trained(d);
    let ckpt = "runs/adapter/checkpoint-4";
    let args = |out: &str, seed: &str| {
        vec![
            "sample",
            "--config",
            &c,
            "--checkpoint",
            ckpt,
            "--from-store",
            "2",
            "--n",
            "2",
            "--steps",
            "3",
            "--seed",
            seed,
            "--out",
            out,
        ]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>()
    };
    let run = |a: Vec<String>| {
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        tensorbake(d, &refs)
    };
    let stderr = ok(&run(args("a.png", "0")));
    assert!(stderr.contains("2 prompts x 2 variations"), "{stderr}");
    // 3 columns (prompt + 2) and 2 rows of 64 px cells, 2 px borders (the prompt column
    // set off by one more)
    assert_eq!(png_size(&d.join("a.png")), (3 * 64 + 5 * 2, 2 * 64 + 3 * 2));
    ok(&run(args("b.png", "0")));
    ok(&run(args("c.png", "1")));
    let bytes = |f: &str| std::fs::read(d.join(f)).unwrap();
    assert_eq!(bytes("a.png"), bytes("b.png"));
    assert_ne!(bytes("a.png"), bytes("c.png"));

    // an image prompt (embedded with the store's SigLIP), DDIM, the latest checkpoint
    let photo = tensorbake_kit::synth_image::photo_rgb(120, 90, 4);
    image::RgbImage::from_raw(120, 90, photo)
        .unwrap()
        .save(d.join("prompt.png"))
        .unwrap();
    let o = tensorbake(
        d,
        &[
            "sample",
            "--config",
            &c,
            "--checkpoint",
            "latest",
            "--image",
            "prompt.png",
            "--n",
            "3",
            "--steps",
            "2",
            "--scheduler",
            "ddim",
            "--out",
            "grids/img.png",
        ],
    );
    let stderr = ok(&o);
    assert!(stderr.contains("DDIMScheduler"), "{stderr}");
    assert_eq!(
        png_size(&d.join("grids/img.png")),
        (4 * 64 + 6 * 2, 64 + 2 * 2)
    );
}

fn fails(d: &Path, args: &[&str], needles: &[&str]) {
    let o = tensorbake(d, args);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{args:?} should fail:\n{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line expected:\n{stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    for n in needles {
        assert!(lines[0].contains(n), "`{n}` not in: {stderr}");
    }
    assert!(!d.join("bad.png").exists(), "a grid was written");
}

#[test]
fn bad_inputs_fail_with_one_line_naming_the_file_and_write_nothing() {
    let dir = tempdir();
    let d = dir.path();
    let c = trained(d);
    let ckpt = "runs/adapter/checkpoint-4";
    std::fs::write(d.join("empty.jpg"), b"").unwrap();
    std::fs::write(d.join("garbage.jpg"), b"this is not an image").unwrap();
    let with = |img: &str| {
        vec![
            "sample",
            "--config",
            &c,
            "--checkpoint",
            ckpt,
            "--image",
            img,
            "--n",
            "1",
            "--out",
            "bad.png",
        ]
        .into_iter()
        .map(String::from)
        .collect::<Vec<String>>()
    };
    for (img, needle) in [
        ("empty.jpg", "empty"),
        ("garbage.jpg", "garbage.jpg"),
        ("missing.jpg", "missing.jpg"),
    ] {
        let a = with(img);
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        fails(d, &refs, &[img, needle]);
    }
    // a checkpoint of another mode
    let ft = format!(
        "{}redux = \"runs/adapter/checkpoint-4/redux.safetensors\"\n",
        base("pixart_finetune", "runs/finetune", 2)
    );
    let ft = config(d, "finetune", &ft);
    ok(&tensorbake(d, &["train", &ft]));
    fails(
        d,
        &[
            "sample",
            "--config",
            &c,
            "--checkpoint",
            "runs/finetune/checkpoint-2",
            "--from-store",
            "1",
            "--out",
            "bad.png",
        ],
        &[
            "runs/finetune/checkpoint-2",
            "pixart_finetune",
            "pixart_redux_adapter",
        ],
    );
    // the wrong kind of prompt for the mode
    fails(
        d,
        &[
            "sample",
            "--config",
            &c,
            "--checkpoint",
            ckpt,
            "--prompt-file",
            "x.txt",
            "--out",
            "bad.png",
        ],
        &["--prompt-file"],
    );
}

#[test]
fn a_store_without_the_decoders_record_is_refused() {
    let dir = tempdir();
    let d = dir.path();
    let c = trained(d);
    // the same run's config pointed at a store of other features (no sd_vae record)
    let other = tempdir();
    setup(other.path(), &["siglip", "t5"]);
    let moved = std::fs::read_to_string(&c).unwrap().replace(
        "store = \"store\"",
        &format!("store = \"{}\"", other.path().join("store").display()),
    );
    let c2 = config(d, "other-store", &moved);
    fails(
        d,
        &[
            "sample",
            "--config",
            &c2,
            "--checkpoint",
            "runs/adapter/checkpoint-4",
            "--from-store",
            "1",
            "--out",
            "bad.png",
        ],
        &["no `sd_vae_mean` record"],
    );
}

#[test]
fn validation_grids_are_written_on_schedule_and_line_up_between_runs() {
    let dir = tempdir();
    let d = dir.path();
    setup(d, &["sd_vae", "siglip", "t5"]);
    let body = |out: &str| {
        format!(
            "{}validation_every = 2\nvalidation_images = {{ from_store = 2 }}\nvalidation_n = 2\nvalidation_steps = 2\n",
            base("pixart_redux_adapter", out, 5)
        )
    };
    for out in ["runs/v1", "runs/v2"] {
        let c = config(d, &out.replace('/', "-"), &body(out));
        ok(&tensorbake(d, &["train", &c]));
    }
    for step in [2, 4, 5] {
        let a = std::fs::read(d.join(format!("runs/v1/samples/step-{step}.png"))).unwrap();
        let b = std::fs::read(d.join(format!("runs/v2/samples/step-{step}.png"))).unwrap();
        assert_eq!(a, b, "step {step}: same seed, same grid");
    }
    assert!(!d.join("runs/v1/samples/step-3.png").exists());
    // the grids' time is logged apart from the steps'
    let log = std::fs::read_to_string(d.join("runs/v1/log.jsonl")).unwrap();
    let timed: Vec<u64> = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["validation_s"].is_number())
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert_eq!(timed, [2, 4, 5]);
    // the adapter trained in between: the step-2 and step-4 grids differ
    let two = std::fs::read(d.join("runs/v1/samples/step-2.png")).unwrap();
    let four = std::fs::read(d.join("runs/v1/samples/step-4.png")).unwrap();
    assert_ne!(two, four);
}

/// Flux: a LoRA run with validation grids (the Flux VAE decoder, the flow-match
/// scheduler, true CFG on a de-distilled model), then `tensorbake sample` from its
/// checkpoint with a stored prompt and an image prompt embedded by the store's CLIP:
/// grid sizes, same seed same bytes, the guidance scale and the trained LoRA change
/// the images, Flux-only and PixArt-only flags refused with one line.
#[test]
fn flux_grids_from_a_lora_run_and_its_checkpoints() {
    let dir = tempdir();
    let d = dir.path();
    setup(d, &["flux_vae", "clip_vision", "t5"]);
    tensorbake_nn::tiny::write_tiny_flux(&d.join("models/flux"), 9, false, 32, 16).unwrap();
    let body = "store = \"store\"\nmode = \"flux_clip_image\"\nflux = \"models/flux\"\n\
                out = \"runs/flux\"\nsteps = 4\nbatch_size = 4\nlr = 1e-2\ncheckpoint_every = 2\n\
                keep_checkpoints = 0\nlora = { rank = 2 }\nvalidation_every = 2\n\
                validation_images = { from_store = 2 }\nvalidation_n = 2\nvalidation_steps = 3\n";
    let c = config(d, "flux", body);
    ok(&tensorbake(d, &["train", &c]));
    for step in [2, 4] {
        let grid = d.join(format!("runs/flux/samples/step-{step}.png"));
        assert_eq!(png_size(&grid), (3 * 64 + 5 * 2, 2 * 64 + 3 * 2), "{step}");
    }
    let two = std::fs::read(d.join("runs/flux/samples/step-2.png")).unwrap();
    let four = std::fs::read(d.join("runs/flux/samples/step-4.png")).unwrap();
    assert_ne!(two, four, "the LoRA trained between the grids");

    let photo = tensorbake_kit::synth_image::photo_rgb(120, 90, 4);
    image::RgbImage::from_raw(120, 90, photo)
        .unwrap()
        .save(d.join("prompt.png"))
        .unwrap();
    let sample = |ckpt: &str, extra: &[&str], out: &str| {
        let mut a = vec![
            "sample",
            "--config",
            &c,
            "--checkpoint",
            ckpt,
            "--from-store",
            "1",
            "--image",
            "prompt.png",
            "--n",
            "2",
            "--steps",
            "3",
            "--out",
            out,
        ];
        a.extend_from_slice(extra);
        tensorbake(d, &a)
    };
    let stderr = ok(&sample("latest", &[], "a.png"));
    assert!(
        stderr.contains("2 prompts x 2 variations")
            && stderr.contains("FLUX.1-dev's FlowMatchEulerDiscreteScheduler")
            && stderr.contains("true CFG 2.5"),
        "{stderr}"
    );
    assert_eq!(png_size(&d.join("a.png")), (3 * 64 + 5 * 2, 2 * 64 + 3 * 2));
    ok(&sample("latest", &[], "b.png"));
    ok(&sample("latest", &["--guidance", "1"], "c.png"));
    ok(&sample("runs/flux/checkpoint-2", &[], "d.png"));
    let bytes = |f: &str| std::fs::read(d.join(f)).unwrap();
    assert_eq!(bytes("a.png"), bytes("b.png"));
    assert_ne!(bytes("a.png"), bytes("c.png"), "true CFG off");
    assert_ne!(bytes("a.png"), bytes("d.png"), "another checkpoint's LoRA");
    for (extra, needle) in [
        (&["--guidance-embed", "3"][..], "no guidance embedder"),
        (&["--siglip", "models/siglip"][..], "give --clip-vision"),
        (&["--scheduler", "ddim"][..], "ddim"),
    ] {
        let o = sample("latest", extra, "bad.png");
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && stderr.contains(needle),
            "{extra:?}: {stderr}"
        );
        assert!(!d.join("bad.png").exists());
    }
}
