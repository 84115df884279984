//! `tensorbake run` end to end: the store it writes, kills and resumption, ranks,
//! failed shards, and manifests that must fail before writing anything.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use tensorbake_encode::{EncoderConfig, Input, Rgb8, build_encoder};
use tensorbake_kit::http::{Fault, FileServer};
use tensorbake_kit::synth::{WdsLayout, write_webdataset};
use tensorbake_nn::tiny::{TinyModel, write_tiny_model};
use tensorbake_store::{Location, StoreReader};

use crate::util::{assert_same_store, replace_member, store_files, tempdir, tensorbake};

const RES: u32 = 64;

/// Tiny sd_vae, siglip and t5 under `dir/models`.
pub(crate) fn models(dir: &Path) {
    for (i, m) in [TinyModel::SdVae, TinyModel::Siglip, TinyModel::T5]
        .into_iter()
        .enumerate()
    {
        write_tiny_model(
            m,
            &dir.join("models").join(m.feature().name()),
            40 + i as u64,
        )
        .unwrap();
    }
}

fn encoders_toml(batch: usize) -> String {
    ["sd_vae", "siglip", "t5"]
        .iter()
        .map(|n| {
            let extra = if *n == "t5" { "max_length = 24\n" } else { "" };
            format!(
                "\n[[encoders]]\nname = \"{n}\"\nweights = \"models/{n}\"\nbatch = {batch}\n{extra}"
            )
        })
        .collect()
}

/// `n` WebDataset shards of `per` samples in `dir/shards`, tiny models, and a manifest
/// reading them through `urls` (a brace pattern), with `extra` TOML appended.
pub(crate) fn job(
    dir: &Path,
    n: usize,
    per: usize,
    urls: &str,
    extra: &str,
) -> (PathBuf, WdsLayout) {
    let layout = write_webdataset(&dir.join("shards"), "shard", n, per, (96, 80), 5).unwrap();
    models(dir);
    (write_manifest(dir, urls, extra), layout)
}

/// `dir/job.toml`: the shards at `urls` through the tiny models into `dir/store`.
pub(crate) fn write_manifest(dir: &Path, urls: &str, extra: &str) -> PathBuf {
    let manifest = dir.join("job.toml");
    std::fs::write(
        &manifest,
        format!(
            "name = \"test\"\nstore = \"store\"\n[source]\nkind = \"webdataset\"\nurls = [\"{urls}\"]\n\
             [preprocess]\nresolution = {RES}\n{extra}{}",
            encoders_toml(2)
        ),
    )
    .unwrap();
    manifest
}

/// Like [`job`], with the shards served over loopback HTTP by the returned server
/// (which can inject faults: a stall holds a worker mid-run).
pub(crate) fn served_job(
    dir: &Path,
    n: usize,
    per: usize,
    extra: &str,
) -> (PathBuf, WdsLayout, FileServer) {
    let (_, layout) = job(dir, n, per, &brace(n), extra);
    let server = FileServer::start(dir.join("shards")).unwrap();
    let urls = format!("{}/shard-{{000000..{:06}}}.tar", server.base_url(), n - 1);
    (write_manifest(dir, &urls, extra), layout, server)
}

pub(crate) fn brace(n: usize) -> String {
    format!("shards/shard-{{000000..{:06}}}.tar", n - 1)
}

/// The JSON report of a run that must have succeeded.
pub(crate) fn ok(o: &std::process::Output) -> serde_json::Value {
    assert!(
        o.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).expect("the report is JSON on stdout")
}

fn reader(path: &Path) -> StoreReader {
    StoreReader::open(&Location::from(path)).unwrap()
}

#[test]
fn run_writes_every_sample_with_the_features_of_its_own_image() {
    let dir = tempdir();
    let (manifest, layout) = job(dir.path(), 3, 5, &brace(3), "");
    let report = ok(&tensorbake(
        dir.path(),
        &["run", manifest.to_str().unwrap()],
    ));
    assert_eq!(report["shards"]["committed"], 3, "{report:#}");
    assert_eq!(report["samples"]["written"], 15);
    assert_eq!(report["samples"]["read"], 15);
    assert!(report["failed_shards"].as_array().unwrap().is_empty());
    for stage in ["sd_vae", "siglip", "t5"] {
        assert_eq!(
            report["stages"]["encoders"][stage]["samples"], 15,
            "{stage}"
        );
    }

    let store = reader(&dir.path().join("store"));
    assert_eq!(store.len(), 15);
    assert_eq!(store.parts().len(), 3);
    let spec = store.spec();
    assert_eq!(
        spec.features["sd_vae_mean"].dtype,
        tensorbake_store::DType::F32
    );
    assert_eq!(
        spec.features["siglip_hidden"].dtype,
        tensorbake_store::DType::Bf16
    );
    assert_eq!(spec.features["t5_len"].dtype, tensorbake_store::DType::U32);
    assert_eq!(spec.resolution, Some(RES));
    // the empty caption's T5 embedding and the black image's SigLIP embedding are
    // recorded for conditioning dropout
    assert_eq!(
        store.null_embeddings().unwrap(),
        ["siglip_hidden", "t5_hidden", "t5_len"]
    );
    let group: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("store/null/zarr.json")).unwrap())
            .unwrap();
    assert_eq!(
        group["attributes"]["tensorbake_null"]["inputs"],
        serde_json::json!({"siglip_hidden": "black image", "t5_hidden": "empty caption",
                           "t5_len": "empty caption"})
    );

    // Every sample: its key, caption and features are those of its own image,
    // encoded alone (batch of one) with the same encoders.
    let cfg = |name: &str| EncoderConfig {
        name: name.into(),
        weights: dir
            .path()
            .join("models")
            .join(name)
            .to_string_lossy()
            .into_owned(),
        dtype: Default::default(),
        batch: 1,
        device: "cpu".into(),
        max_length: Some(24),
        store_dtype: None,
    };
    let vae = build_encoder(&cfg("sd_vae"), RES).unwrap();
    let siglip = build_encoder(&cfg("siglip"), RES).unwrap();
    let t5 = build_encoder(&cfg("t5"), RES).unwrap();
    let pre = tensorbake_ingest::image::PreprocessConfig {
        resolution: RES,
        ..Default::default()
    };
    // the null SigLIP embedding is a black sample's, stored like every sample (bf16)
    let black = vec![0u8; (RES * RES * 3) as usize];
    let black = [Rgb8 {
        width: RES,
        height: RES,
        pixels: &black,
    }];
    let (_, want) = siglip.encode(Input::Images(&black)).unwrap().remove(0);
    let want = want
        .squeeze(0)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let got = store
        .null_embedding("siglip_hidden", &Device::Cpu)
        .unwrap()
        .expect("black-image embedding recorded")
        .to_dtype(DType::F32)
        .unwrap();
    assert_eq!(f32s(&got), f32s(&want));
    let cleaner = tensorbake_ingest::caption::CleanConfig::default().build();
    let mut seen = 0;
    for i in 0..store.len() {
        let sample = store.get(i).unwrap();
        let (s, _) = layout
            .keys
            .iter()
            .enumerate()
            .find(|(_, keys)| keys.contains(&sample.key))
            .unwrap_or_else(|| panic!("unknown key {}", sample.key));
        let tar = std::fs::read(&layout.shards[s]).unwrap();
        let jpeg = member(&tar, &format!("{}.jpg", sample.key));
        let img = tensorbake_ingest::image::preprocess(&jpeg, &pre).unwrap();
        let rgb = [Rgb8 {
            width: RES,
            height: RES,
            pixels: &img.rgb,
        }];
        let want_caption = match cleaner.clean(&layout.caption_of[&sample.key]) {
            tensorbake_ingest::caption::CaptionOutcome::Clean(c) => c,
            other => panic!("{other:?}"),
        };
        assert_eq!(store.read_string(i, "caption").unwrap(), want_caption);
        assert_eq!(
            store.read_string(i, "caption_raw").unwrap(),
            layout.caption_of[&sample.key]
        );
        let mut alone: BTreeMap<String, Tensor> = BTreeMap::new();
        let named = |v: Vec<(tensorbake_kit::schema::Array, Tensor)>| {
            v.into_iter().map(|(a, t)| (a.name().to_string(), t))
        };
        alone.extend(named(vae.encode(Input::Images(&rgb)).unwrap()));
        alone.extend(named(siglip.encode(Input::Images(&rgb)).unwrap()));
        alone.extend(named(
            t5.encode(Input::Texts(&[want_caption.as_str()])).unwrap(),
        ));
        for (name, want) in &alone {
            let got = store.read_tensor(i, name, &Device::Cpu).unwrap();
            let want = want.squeeze(0).unwrap();
            assert_eq!(got.dims(), want.dims(), "{name}");
            let (g, w) = (f32s(&got), f32s(&want));
            let scale = w.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
            let err = g
                .iter()
                .zip(&w)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            // bf16 storage: 2^-8 relative; latents are f32
            assert!(
                err <= scale * 1e-2,
                "{} {name}: max error {err} of {scale}",
                sample.key
            );
        }
        seen += 1;
    }
    assert_eq!(seen, 15);
}

fn f32s(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// The bytes of tar member `name`.
fn member(tar: &[u8], name: &str) -> Vec<u8> {
    let mut a = tar::Archive::new(tar);
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        if e.path().unwrap().to_string_lossy() == name {
            let mut v = Vec::new();
            std::io::Read::read_to_end(&mut e, &mut v).unwrap();
            return v;
        }
    }
    panic!("no member {name}")
}

#[test]
fn a_second_run_of_a_complete_store_does_nothing_and_changes_nothing() {
    let dir = tempdir();
    let (manifest, _) = job(dir.path(), 2, 3, &brace(2), "");
    let m = manifest.to_str().unwrap();
    ok(&tensorbake(dir.path(), &["run", m]));
    let before = store_files(&dir.path().join("store"), &[]);
    let again = tensorbake(dir.path(), &["run", m]);
    let report = ok(&again);
    assert_eq!(report["shards"]["todo"], 0, "{report:#}");
    assert_eq!(report["shards"]["already_committed"], 2);
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("0 shards to do (2 already committed"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    // byte for byte, commit times included: nothing was rewritten
    assert_eq!(before, store_files(&dir.path().join("store"), &[]));
}

/// `n` shards of 6 samples served with shard 3 stalling for 6 s half way, and a job
/// that reads one shard at a time, decodes each sample as it comes and writes a Zarr
/// shard every 2 samples: a run is in the middle of shard 3 (its part has files on
/// disk) for those 6 seconds.
fn stalled_job(dir: &Path, n: usize) -> (PathBuf, FileServer) {
    let layout = write_webdataset(&dir.join("shards"), "shard", n, 6, (96, 80), 9).unwrap();
    models(dir);
    let server = FileServer::start(dir.join("shards")).unwrap();
    let half = std::fs::metadata(&layout.shards[3]).unwrap().len() / 2;
    server.inject(
        "shard-000003.tar",
        Fault::StallAfter(half, Duration::from_secs(6)),
        1,
    );
    let manifest = dir.join("job.toml");
    std::fs::write(
        &manifest,
        format!(
            "name = \"stall\"\nstore = \"store\"\n[source]\nkind = \"webdataset\"\n\
             urls = [\"{}/shard-{{000000..{:06}}}.tar\"]\n[preprocess]\nresolution = {RES}\n\
             [ingest]\nshards_in_flight = 1\ndecode_batch = 1\n[network]\nstall_timeout_s = 30\n\
             [zarr]\nmax_shard_samples = 2\n[run]\npreflight = false\n{}",
            server.base_url(),
            n - 1,
            encoders_toml(2)
        ),
    )
    .unwrap();
    (manifest, server)
}

/// Waits (up to 60 s) until the store at `store` has shard 3's part in progress and
/// `committed` parts; `child` must still be running.
fn wait_for_shard_3_in_progress(store: &Path, committed: usize, child: &mut std::process::Child) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = StoreReader::open(&Location::from(store))
            && r.parts().len() >= committed
            && r.uncommitted_parts().iter().any(|p| p.contains("000003"))
        {
            return;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before shard 3 was in progress"
        );
        assert!(Instant::now() < deadline, "shard 3 never got under way");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts `tensorbake run MANIFEST extra...` in `dir` (report and progress piped; no
/// progress lines), waits until shard 3 is under way with `committed` parts in the
/// store, sends it SIGTERM and returns how it ended, with its stderr.
fn sigterm_during_shard_3(
    dir: &Path,
    manifest: &str,
    extra: &[&str],
    committed: usize,
) -> (std::process::Output, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tensorbake"))
        .args(["run", manifest, "--progress-interval", "600"])
        .args(extra)
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_shard_3_in_progress(&dir.join("store"), committed, &mut child);
    let st = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out, stderr)
}

#[test]
fn a_killed_run_resumes_and_ends_equal_to_an_uninterrupted_one() {
    let dir = tempdir();
    let n = 5;
    // the kill lands while shard 3 stalls (the stream waits it out: stall timeout 30 s)
    let (manifest, _server) = stalled_job(dir.path(), n);
    let m = manifest.to_str().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tensorbake"))
        .args(["run", m])
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let store = dir.path().join("store");
    wait_for_shard_3_in_progress(&store, 3, &mut child);
    child.kill().unwrap(); // SIGKILL: no chance to clean up
    child.wait().unwrap();
    let killed = reader(&store);
    assert_eq!(killed.parts().len(), 3);
    assert_eq!(killed.len(), 18);
    let leftover = killed.uncommitted_parts()[0].clone();
    assert!(store.join("parts").join(&leftover).is_dir());

    // the same command again: the three committed parts are kept, the rest redone
    let report = ok(&tensorbake(dir.path(), &["run", m]));
    assert_eq!(report["shards"]["already_committed"], 3, "{report:#}");
    assert_eq!(report["shards"]["committed"], 2);
    let resumed = reader(&store);
    assert_eq!(resumed.parts().len(), 5);
    assert!(resumed.uncommitted_parts().is_empty());
    assert_eq!(resumed.len(), 30);

    // an uninterrupted run of the same manifest into another store
    ok(&tensorbake(
        dir.path(),
        &["run", m, "--output", "reference"],
    ));
    assert_same_store(&store, &dir.path().join("reference"), &["committed_at"]);
}

/// SIGTERM (a scheduler preempting the job) drains a run: the shard in flight
/// finishes and commits, no other starts, and the report says what was left (exit 1);
/// the same command again does the rest.
#[test]
fn sigterm_drains_a_run_and_the_same_command_finishes_it() {
    let dir = tempdir();
    let (manifest, _server) = stalled_job(dir.path(), 5);
    let m = manifest.to_str().unwrap();
    let store = dir.path().join("store");
    let (out, stderr) = sigterm_during_shard_3(dir.path(), m, &[], 3);
    assert_eq!(out.status.code(), Some(1), "drained, not killed: {stderr}");
    assert!(
        stderr.contains("finishing the shards in flight"),
        "{stderr}"
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let shards = &report["shards"];
    assert_eq!(
        (
            &shards["committed"],
            &shards["failed"],
            &shards["not_started"]
        ),
        (&4.into(), &0.into(), &1.into()),
        "{report:#}"
    );
    let drained = reader(&store);
    assert_eq!(drained.parts().len(), 4);
    assert!(drained.uncommitted_parts().is_empty(), "shard 3 finished");
    assert_eq!(drained.len(), 24);
    let report = ok(&tensorbake(dir.path(), &["run", m]));
    assert_eq!(report["shards"]["already_committed"], 4, "{report:#}");
    assert_eq!(report["shards"]["committed"], 1);
    assert_eq!(reader(&store).len(), 30);
}

/// SIGTERM to the `--devices` parent alone (what Kubernetes sends a container's first
/// process) reaches each worker once: they drain as a single run does.
#[test]
fn sigterm_to_the_devices_parent_drains_its_workers() {
    let dir = tempdir();
    // worker 0 has shards 0, 2, 4; worker 1 has 1, 3, 5 and stalls in 3
    let (manifest, _server) = stalled_job(dir.path(), 6);
    let m = manifest.to_str().unwrap();
    let (out, stderr) = sigterm_during_shard_3(dir.path(), m, &["--devices", "0,1"], 1);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("[gpu 1] run: interrupted: finishing the shards in flight"),
        "{stderr}"
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let w1 = &report["workers"][1];
    // drained (exit 1, a shard left), not stopped at once by a second signal (130)
    assert_eq!(w1["exit_code"], 1, "{report:#}");
    let shards = &w1["report"]["shards"];
    assert_eq!(
        (&shards["committed"], &shards["not_started"]),
        (&2.into(), &1.into()),
        "{report:#}"
    );
    let store = reader(&dir.path().join("store"));
    assert!(store.uncommitted_parts().is_empty());
    let report = ok(&tensorbake(dir.path(), &["run", m]));
    assert_eq!(
        report["shards"]["committed"].as_u64().unwrap()
            + report["shards"]["already_committed"].as_u64().unwrap(),
        6
    );
}

#[test]
fn ranks_together_write_the_store_that_one_process_writes() {
    let dir = tempdir();
    let (manifest, _) = job(dir.path(), 5, 3, &brace(5), "");
    let m = manifest.to_str().unwrap();
    ok(&tensorbake(dir.path(), &["run", m, "--output", "single"]));
    // three workers at once, their ranks from a flag, Slurm and torchrun variables
    let envs: [&[(&str, &str)]; 3] = [
        &[],
        &[
            ("SLURM_ARRAY_TASK_ID", "1"),
            ("SLURM_ARRAY_TASK_COUNT", "3"),
        ],
        &[("RANK", "2"), ("WORLD_SIZE", "3")],
    ];
    let children: Vec<_> = envs
        .iter()
        .enumerate()
        .map(|(i, env)| {
            let mut c = Command::new(env!("CARGO_BIN_EXE_tensorbake"));
            c.args(["run", m, "--output", "ranked"])
                .current_dir(dir.path());
            if i == 0 {
                c.args(["--rank", "0", "--world", "3"]);
            }
            for (k, v) in *env {
                c.env(k, v);
            }
            c.stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut mine = Vec::new();
    for c in children {
        let report = ok(&c.wait_with_output().unwrap());
        mine.push((
            report["rank"].as_u64().unwrap(),
            report["world"].as_u64().unwrap(),
            report["shards"]["committed"].as_u64().unwrap(),
        ));
    }
    // shards 0..5 by i % 3: ranks 0 and 1 have two, rank 2 one
    assert_eq!(mine, vec![(0, 3, 2), (1, 3, 2), (2, 3, 1)]);
    assert_same_store(
        &dir.path().join("single"),
        &dir.path().join("ranked"),
        &["committed_at"],
    );
}

/// `--devices 0,1`: two worker processes, one per device, ranks 0 and 1 of 2 (the
/// node is rank 0 of 1), together writing the store one process writes; the
/// parent's report holds each worker's; their progress comes prefixed. A node
/// that is rank 1 of 2 gives its workers ranks 2 and 3 of 4.
#[test]
fn devices_run_one_worker_per_gpu_sharing_the_rank_rule() {
    let dir = tempdir();
    let (manifest, _) = job(dir.path(), 5, 3, &brace(5), "");
    let m = manifest.to_str().unwrap();
    ok(&tensorbake(dir.path(), &["run", m, "--output", "single"]));
    let o = tensorbake(
        dir.path(),
        &[
            "run",
            m,
            "--output",
            "pergpu",
            "--devices",
            "0,1",
            "--report",
            "r.json",
        ],
    );
    let report = ok(&o);
    assert_eq!(report["devices"], serde_json::json!(["0", "1"]));
    let workers = report["workers"].as_array().unwrap();
    let got: Vec<_> = workers
        .iter()
        .map(|w| {
            (
                w["device"].as_str().unwrap().to_string(),
                w["report"]["rank"].as_u64().unwrap(),
                w["report"]["world"].as_u64().unwrap(),
                w["report"]["shards"]["committed"].as_u64().unwrap(),
                w["exit_code"].as_i64().unwrap(),
            )
        })
        .collect();
    // shards 0..5 by i % 2: rank 0 has three, rank 1 two
    assert_eq!(got, [("0".into(), 0, 2, 3, 0), ("1".into(), 1, 2, 2, 0)]);
    // CPU encoders: no GPU section in the workers' reports
    assert!(workers.iter().all(|w| w["report"].get("gpu").is_none()));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("[gpu 0] run:") && stderr.contains("[gpu 1] run:"),
        "{stderr}"
    );
    let written: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("r.json")).unwrap()).unwrap();
    assert_eq!(written, report);
    assert_same_store(
        &dir.path().join("single"),
        &dir.path().join("pergpu"),
        &["committed_at"],
    );

    // the second node of two: ranks 2 and 3 of 4 (nothing left to do in this store)
    let report = ok(&tensorbake(
        dir.path(),
        &[
            "run",
            m,
            "--output",
            "pergpu",
            "--devices",
            "2,3",
            "--rank",
            "1",
            "--world",
            "2",
        ],
    ));
    let ranks: Vec<_> = report["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            (
                w["rank"].as_u64().unwrap(),
                w["report"]["world"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(ranks, [(2, 4), (3, 4)]);

    // a device listed twice, or not an index, is refused before anything starts
    for bad in ["0,0", "0,gpu1"] {
        let o = tensorbake(dir.path(), &["run", m, "--output", "x", "--devices", bad]);
        assert!(!o.status.success());
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains("--devices"), "{e}");
        assert!(!dir.path().join("x").exists());
    }
}

#[test]
fn a_truncated_shard_fails_alone_is_not_committed_and_is_redone_next_time() {
    let dir = tempdir();
    let (manifest, layout) = job(dir.path(), 3, 4, &brace(3), "");
    let good = std::fs::read(&layout.shards[1]).unwrap();
    std::fs::write(&layout.shards[1], &good[..good.len() * 2 / 3]).unwrap();
    // and in shard 2, one image that is not a JPEG: a skipped sample, not a failure
    let bad_key = layout.keys[2][1].clone();
    replace_member(
        &layout.shards[2],
        &format!("{bad_key}.jpg"),
        b"<html>503 Service Unavailable</html>",
    );
    let m = manifest.to_str().unwrap();
    let o = tensorbake(dir.path(), &["run", m]);
    assert!(!o.status.success());
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("shard shard-000001.tar failed") && stderr.contains("not committed"),
        "{stderr}"
    );
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["shards"]["committed"], 2, "{report:#}");
    let failed = &report["failed_shards"][0];
    assert_eq!(failed["shard"], "shard-000001.tar");
    assert_eq!(failed["reason"], "truncated_tar", "{failed:#}");
    assert!(failed["samples_read"].as_u64().unwrap() >= 1);
    assert_eq!(
        report["samples"]["skipped"]["unrecognized_format"], 1,
        "{report:#}"
    );
    let skipped = &report["skipped_samples"][0];
    assert_eq!(skipped["key"], bad_key.as_str());
    assert_eq!(skipped["shard"], "shard-000002.tar");
    assert!(
        skipped["detail"].as_str().unwrap().contains("html"),
        "{skipped:#}"
    );
    let store = reader(&dir.path().join("store"));
    assert_eq!(store.parts().len(), 2);
    assert_eq!(store.len(), 7);
    // the shard is repaired upstream: the same command commits just it
    std::fs::write(&layout.shards[1], &good).unwrap();
    let report = ok(&tensorbake(dir.path(), &["run", m]));
    assert_eq!(report["shards"]["todo"], 1);
    assert_eq!(report["shards"]["committed"], 1);
    assert_eq!(reader(&dir.path().join("store")).len(), 11);
}

#[test]
fn memory_stays_bounded_with_more_data_than_the_queues_hold() {
    let dir = tempdir();
    let extra = "[ingest]\nshards_in_flight = 2\ndecode_batch = 2\n\
                 [run]\nencode_queue = 4\nwrite_queue = 1\nwriters = 1\n";
    let (manifest, _) = job(dir.path(), 4, 16, &brace(4), extra);
    let report = ok(&tensorbake(
        dir.path(),
        &["run", manifest.to_str().unwrap()],
    ));
    let q = &report["queues"];
    let bound = q["in_flight_bound"].as_u64().unwrap();
    let high = q["in_flight_high"].as_u64().unwrap();
    // encode queue 4 + 2 shards x batch 2 pending + batch 2 prepared + batch 2
    // encoding (no batch held: the CPU's work is done when it returns)
    // + 1 writer x (1 queued + 1 writing) x 2 + 2 blocked decode threads = 18
    assert_eq!(bound, 18, "{q:#}");
    assert!(high >= 1 && high <= bound, "{q:#}");
    assert_eq!(report["samples"]["written"], 64);
    assert!(64 > 3 * bound);
}

/// Runs `tensorbake run` on `toml` and checks it fails with one `error:` line that
/// contains every one of `needles`, and that no store was created.
fn fails_cleanly(dir: &Path, toml: &str, needles: &[&str]) {
    let manifest = dir.join("bad.toml");
    std::fs::write(&manifest, toml).unwrap();
    let o = tensorbake(dir, &["run", manifest.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line expected:\n{stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    for n in needles {
        assert!(lines[0].contains(n), "`{n}` not in: {stderr}");
    }
    assert!(o.stdout.is_empty());
    assert!(!dir.join("store").exists(), "a store was written: {stderr}");
}

#[test]
fn bad_manifests_fail_with_one_clear_line_and_write_nothing() {
    let dir = tempdir();
    let (manifest, _) = job(dir.path(), 1, 2, &brace(1), "");
    let good = std::fs::read_to_string(&manifest).unwrap();
    // an unknown key, with file and line
    fails_cleanly(
        dir.path(),
        &good.replace("[preprocess]\n", "[preprocess]\nresolutoin = 5\n"),
        &["bad.toml:7", "resolutoin"],
    );
    // weights that are not there
    fails_cleanly(
        dir.path(),
        &good.replace("models/siglip", "models/siglip-missing"),
        &[
            "[[encoders]] #2 (siglip)",
            "models/siglip-missing",
            "not found",
        ],
    );
    // a misspelt encoder, with a suggestion
    fails_cleanly(
        dir.path(),
        &good.replace("name = \"siglip\"", "name = \"siglib\""),
        &["[[encoders]] #2", "`siglib`", "did you mean `siglip`"],
    );
    // shards on a host that does not answer (a closed loopback port)
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    fails_cleanly(
        dir.path(),
        &good.replace(
            &brace(1),
            &format!("http://127.0.0.1:{closed}/shard-000000.tar"),
        ),
        &["cannot read the shards", &format!("127.0.0.1:{closed}")],
    );
    // no store given anywhere
    fails_cleanly(
        dir.path(),
        &good.replace("store = \"store\"\n", ""),
        &["no store", "--output"],
    );
    // a store written by other weights is refused, naming the field
    ok(&tensorbake(
        dir.path(),
        &["run", manifest.to_str().unwrap()],
    ));
    let before = store_files(&dir.path().join("store"), &[]);
    write_tiny_model(TinyModel::Siglip, &dir.path().join("models/siglip"), 999).unwrap();
    let o = tensorbake(dir.path(), &["run", manifest.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("siglip_hidden.weights_sha256"), "{stderr}");
    assert_eq!(before, store_files(&dir.path().join("store"), &[]));
}

#[test]
fn run_writes_to_s3_and_resumes_there() {
    // moto's S3 on loopback; object_store takes endpoint and credentials from the
    // environment, which the child processes get
    let Some(python) = std::env::var_os("TENSORBAKE_PYTHON") else {
        assert!(
            std::env::var("TENSORBAKE_REQUIRE_PYTHON").as_deref() != Ok("1"),
            "TENSORBAKE_PYTHON is not set but TENSORBAKE_REQUIRE_PYTHON=1"
        );
        eprintln!("SKIP run_writes_to_s3_and_resumes_there: TENSORBAKE_PYTHON is not set");
        return;
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut moto = Command::new(python)
        .arg(crate::util::root().join("store/python/moto_s3.py"))
        .arg(port.to_string())
        .arg("bake")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start moto");
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(moto.stdout.take().unwrap()));
    assert!(
        lines.any(|l| l.map(|l| l.contains("ready")).unwrap_or(false)),
        "moto did not start"
    );
    let dir = tempdir();
    let (manifest, _) = job(dir.path(), 3, 3, &brace(3), "");
    let m = manifest.to_str().unwrap();
    let s3 = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_tensorbake"))
            .args(args)
            .current_dir(dir.path())
            .env("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{port}"))
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ALLOW_HTTP", "true")
            .output()
            .unwrap()
    };
    let url = "s3://bake/stores/test.zarr";
    // two ranks, then everything again: the second pass has nothing to do
    for r in ["0", "1"] {
        let report = ok(&s3(&[
            "run", m, "--output", url, "--rank", r, "--world", "2",
        ]));
        assert_eq!(report["failed_shards"].as_array().unwrap().len(), 0);
    }
    let report = ok(&s3(&["run", m, "--output", url]));
    assert_eq!(report["shards"]["already_committed"], 3, "{report:#}");
    assert_eq!(report["shards"]["todo"], 0);
    let inspect = s3(&["inspect", url, "--json", "--verify"]);
    assert!(
        inspect.status.success(),
        "{}",
        String::from_utf8_lossy(&inspect.stderr)
    );
    let info: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    assert_eq!(info["parts"], 3, "{info:#}");
    assert_eq!(info["samples"], 9);
    assert_eq!(info["verify"]["ok"], true, "{info:#}");
    assert_eq!(info["verify"]["parts_checked"], 3);
    assert_eq!(
        info["null_embeddings"],
        serde_json::json!(["siglip_hidden", "t5_hidden", "t5_len"])
    );
    let _ = moto.kill();
    let _ = moto.wait();
}
