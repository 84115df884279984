//! `tensorbake demo` end to end, and its manifest run again offline.

use crate::util::{assert_same_store, tempdir, tensorbake};

#[test]
fn demo_runs_the_whole_job_and_leaves_a_manifest_that_runs_offline() {
    let dir = tempdir();
    let out = dir.path().join("demo");
    let o = out.to_str().unwrap();
    let args = [
        "demo",
        "--out",
        o,
        "--shards",
        "2",
        "--images-per-shard",
        "3",
        "--resolution",
        "64",
        "--flux",
    ];
    let run = tensorbake(dir.path(), &args);
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(stdout.contains("samples in store      6 of 6"), "{stdout}");
    assert!(
        stdout.contains("read back             6 samples"),
        "{stdout}"
    );
    assert!(stdout.contains("sd_vae_mean [6, 4, 8, 8]"), "{stdout}");
    assert!(stdout.contains("flux_vae_mean [6, 16, 8, 8]"), "{stdout}");
    // both image modes trained on the store, 30 steps each
    assert!(stdout.contains("train pixart_redux_adapter"), "{stdout}");
    assert!(stdout.contains("train pixart_finetune"), "{stdout}");
    // --flux: a LoRA of the tiny Flux on the CLIP image embedding
    assert!(stdout.contains("train flux_clip_image"), "{stdout}");
    let flux_log = std::fs::read_to_string(out.join("train/flux-clip-image/log.jsonl")).unwrap();
    assert_eq!(flux_log.lines().count(), 30);
    let log = std::fs::read_to_string(out.join("train/finetune/log.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 30);
    for f in [
        "shards/sa_000000.tar",
        "manifest.toml",
        "models/sd_vae/config.json",
        "models/sd_vae/diffusion_pytorch_model.safetensors",
        "models/siglip/preprocessor_config.json",
        "models/siglip/model.safetensors",
        "models/clip_vision/model.safetensors",
        "models/t5/spiece.model",
        "models/t5/tokenizer_config.json",
        "store/zarr.json",
        "models/pixart/config.json",
        "train-redux-adapter.toml",
        "train-finetune.toml",
        "train/redux-adapter/loss.png",
        "train/redux-adapter/checkpoint-30/redux.safetensors",
        "train/finetune/log.jsonl",
        "train/finetune/checkpoint-30/transformer/diffusion_pytorch_model.safetensors",
        "train/finetune/samples/step-30.png",
        "train/redux-adapter/samples/step-30.png",
        "models/flux_vae/config.json",
        "models/flux/config.json",
        "train-flux-clip-image.toml",
        "train/flux-clip-image/checkpoint-30/pytorch_lora_weights.safetensors",
        "train/flux-clip-image/samples/step-30.png",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let store = tensorbake_store::StoreReader::open(&tensorbake_store::Location::from(
        out.join("store").as_path(),
    ))
    .unwrap();
    assert_eq!(store.len(), 6);
    assert_eq!(store.parts().len(), 2);

    // The kept manifest, run again: everything is committed, nothing to do.
    let manifest = out.join("manifest.toml");
    let m = manifest.to_str().unwrap();
    let again = tensorbake(dir.path(), &["run", m]);
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(report["shards"]["todo"], 0, "{report:#}");
    assert_eq!(report["shards"]["already_committed"], 2);

    // Into a new store, offline from DIR/shards: the same parts and bytes as the
    // demo's run over HTTP (only each part's source URL and commit time differ).
    let fresh = tensorbake(dir.path(), &["run", m, "--output", "from-disk"]);
    assert!(
        fresh.status.success(),
        "{}",
        String::from_utf8_lossy(&fresh.stderr)
    );
    assert_same_store(
        &out.join("store"),
        &dir.path().join("from-disk"),
        &["committed_at", "source"],
    );

    // and the ingest stage alone still lists the samples from disk
    let listed = tensorbake(dir.path(), &["ingest", m, "--list"]);
    assert!(listed.status.success());
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert_eq!(listed.lines().count(), 6, "{listed}");
    assert!(
        listed.lines().all(|l| l.contains("\"caption\":\"")),
        "{listed}"
    );

    // a second demo into the same directory starts from a fresh store
    let second = tensorbake(dir.path(), &args);
    assert!(second.status.success());
    assert!(String::from_utf8_lossy(&second.stdout).contains("samples in store      6 of 6"));
}
