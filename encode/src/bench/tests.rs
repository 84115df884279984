use super::*;

/// The configs written for both sides are the published ones: each parses into the
/// model crate's own constructor of that model.
#[test]
fn full_configs_are_the_published_ones() {
    let vae = |k| serde_json::from_value::<vae::Config>(full_config(k)).unwrap();
    assert_eq!(vae(Feature::SdVae), vae::Config::sd_vae_ft_ema());
    assert_eq!(vae(Feature::FluxVae), vae::Config::flux());
    assert_eq!(
        siglip::Config::from_json(&full_config(Feature::Siglip))
            .unwrap()
            .vision,
        siglip::VisionConfig::so400m_patch14_384()
    );
    let clip = clip_vision::Config::from_json(&full_config(Feature::ClipVision)).unwrap();
    let want = clip_vision::Config::vit_large_patch14();
    assert_eq!(
        (clip.vision, clip.projection_dim),
        (want.vision, want.projection_dim)
    );
    assert_eq!(
        serde_json::from_value::<T5Config>(full_config(Feature::T5)).unwrap(),
        T5Config::v1_1_xxl()
    );
    assert_eq!(
        ClipTextConfig::from_json(&full_config(Feature::ClipText)).unwrap(),
        ClipTextConfig::vit_l_14()
    );
}

#[test]
fn parses_encoder_names() {
    let t5 = BenchEncoder::parse("t5").unwrap();
    assert_eq!(
        t5.iter().map(|e| e.name()).collect::<Vec<_>>(),
        ["t5@120", "t5@512"]
    );
    assert_eq!(BenchEncoder::parse("t5@77").unwrap()[0].tokens, 77);
    assert_eq!(BenchEncoder::all().len(), 7);
    for bad in ["t5@0", "t5@x", "vae", ""] {
        let e = BenchEncoder::parse(bad).unwrap_err().to_string();
        assert!(
            e.contains(&format!("`{bad}`")) && e.contains("clip_vision"),
            "{e}"
        );
    }
}

fn tiny(encoders: &[&str], dtype: DType, check: bool) -> EncodeBenchConfig {
    EncodeBenchConfig {
        encoders: encoders
            .iter()
            .flat_map(|n| BenchEncoder::parse(n).unwrap())
            .collect(),
        preset: Preset::Tiny,
        batch: Some(3),
        dtype: Some(dtype),
        warmup: 1,
        iters: 1,
        rounds: 2,
        check,
        ..EncodeBenchConfig::default()
    }
}

/// Every encoder on the tiny fixtures on the CPU, in f16 against the f32 reference
/// (T5, which f16 overflows, in f32): each check ran in another dtype than its
/// reference (a non-zero error) and passed; every row has a rate per round; the
/// FLOP count of SigLIP is the closed form of its products.
#[test]
fn checks_and_times_every_encoder_on_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny(
        &["sd_vae", "flux_vae", "siglip", "clip_vision", "clip_text"],
        DType::F16,
        true,
    );
    let report = run_encode_bench(&cfg, dir.path()).unwrap();
    assert!(!report.failed(), "{}", report.table());
    assert_eq!(report.rows.len(), 5);
    for r in &report.rows {
        let c = r.check.as_ref().unwrap();
        assert!(
            c.pass && c.rel_err > 0.0 && c.batch == 2,
            "{}: {c:?}",
            r.encoder
        );
        assert_eq!(r.items_per_s_rounds.len(), 2);
        assert!(r.items_per_s > 0.0 && r.gflop_per_item > 0.0 && r.params > 0);
        assert!(r.ceiling_fraction.is_none(), "no ceiling on the CPU");
    }
    // tiny SigLIP: 64 px, patch 16 -> 16 tokens, width 32, MLP 64, 2 layers, no head:
    // patch conv, then per layer q, k, v, o, two MLP products and attention's two
    let (t, h, inter, p) = (16.0, 32.0, 64.0, 16.0);
    let per_layer = 8.0 * t * h * h + 4.0 * t * h * inter + 4.0 * t * t * h;
    let want = 2.0 * t * h * 3.0 * p * p + 2.0 * per_layer;
    let siglip = &report.rows[2];
    assert_eq!(siglip.encoder, "siglip");
    assert!(
        (siglip.gflop_per_item * 1e9 - want).abs() < 1.0,
        "{}",
        siglip.gflop_per_item
    );
    // the VAE's count scales with the pixels: it is the convolutions' (the mid-block
    // attention of 8x8 latents is small beside them)
    assert!(report.rows[0].gflop_per_item > siglip.gflop_per_item);

    let t5 = run_encode_bench(&tiny(&["t5@24"], DType::F32, true), dir.path()).unwrap();
    let c = t5.rows[0].check.as_ref().unwrap();
    assert!(c.pass && c.rel_err <= 1e-5, "{c:?}");
    assert_eq!(t5.rows[0].input, "24 tokens");
    let table = t5.table();
    assert!(table.contains("t5@24") && table.contains("ok "), "{table}");
}

#[test]
fn refuses_settings_it_cannot_honour() {
    let dir = tempfile::tempdir().unwrap();
    let run = |cfg: EncodeBenchConfig| run_encode_bench(&cfg, dir.path()).unwrap_err().to_string();
    let mut cfg = tiny(&["siglip"], DType::F32, false);
    cfg.rounds = 0;
    assert!(run(cfg).contains("rounds"));
    let e = run(tiny(&["t5"], DType::F16, false));
    assert!(e.contains("t5") && e.contains("f16"), "{e}");
    let e = run(tiny(&["siglip"], DType::Bf16, false));
    assert!(e.contains("bf16") && e.contains("cpu"), "{e}");
    let mut cfg = tiny(&["siglip"], DType::F32, false);
    cfg.device = "gpu0".into();
    assert!(run(cfg).contains("gpu0"));
    let mut cfg = tiny(&["siglip"], DType::F32, false);
    cfg.batch = Some(0);
    assert!(run(cfg).contains("batch"));
}

/// A row whose forward fails keeps its error, the next row still runs, and the
/// report counts as failed; a peer that cannot start is reported in its row only.
#[test]
fn a_failing_row_does_not_stop_the_others() {
    let dir = tempfile::tempdir().unwrap();
    // CLIP text has 77 positions: 100 tokens cannot run
    let mut cfg = tiny(&["clip_text", "siglip"], DType::F32, false);
    cfg.encoders[0].tokens = 100;
    cfg.python = Some(dir.path().join("no-such-python"));
    let report = run_encode_bench(&cfg, dir.path()).unwrap();
    assert!(report.failed());
    let e = report.rows[0].error.as_deref().unwrap();
    assert!(e.contains("77"), "{e}");
    assert!(report.rows[1].error.is_none() && report.rows[1].items_per_s > 0.0);
    let peer = report.rows[1].torch.as_ref().unwrap();
    assert!(peer.eager.is_none());
    assert!(peer.error.as_deref().unwrap().contains("no-such-python"));
    let table = report.table();
    assert!(
        table.contains("clip_text: FAILED") && table.contains("siglip: torch:"),
        "{table}"
    );
}

/// The PyTorch peer on the tiny fixtures (eager only: compiling takes minutes on a
/// CPU): a rate for each, and the versions it ran with.
#[test]
fn the_torch_peer_runs_the_same_models() {
    let Some(python) = std::env::var_os("TENSORBAKE_PYTHON") else {
        assert!(
            std::env::var_os("TENSORBAKE_REQUIRE_PYTHON").is_none(),
            "TENSORBAKE_REQUIRE_PYTHON=1 but TENSORBAKE_PYTHON is unset"
        );
        eprintln!("skipping the_torch_peer_runs_the_same_models: TENSORBAKE_PYTHON is unset");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = tiny(
        &["sd_vae", "siglip", "clip_vision", "t5@16", "clip_text"],
        DType::F32,
        false,
    );
    cfg.python = Some(python.into());
    cfg.torch_modes = vec!["eager".into()];
    let report = run_encode_bench(&cfg, dir.path()).unwrap();
    for r in &report.rows {
        let t = r.torch.as_ref().unwrap();
        assert!(t.error.is_none(), "{}: {:?}", r.encoder, t.error);
        assert!(
            t.eager.unwrap() > 0.0 && t.compile.is_none(),
            "{}: {t:?}",
            r.encoder
        );
        assert!(t.versions.contains("torch") && t.versions.contains("transformers"));
    }
    assert!(report.table().contains("peer: "), "{}", report.table());
}

/// A full-size model written for `bench run` loads through the encoders' own
/// loader (every tensor under its real name and shape, the published config).
#[test]
fn a_written_full_size_vae_loads_as_the_pipeline_loads_it() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("sd_vae");
    let params = write_full_model(Feature::SdVae, &model, &Device::Cpu, DType::F16).unwrap();
    // sd-vae-ft-ema's encoder and quant_conv
    assert!((34_000_000..35_000_000).contains(&params), "{params}");
    let cfg: crate::EncoderConfig = serde_json::from_value(json!({
        "name": "sd_vae",
        "weights": model.to_str().unwrap(),
        "dtype": "f32",
    }))
    .unwrap();
    let enc = crate::build_encoder(&cfg, 64).unwrap();
    assert_eq!(enc.info().feature, tensorbake_kit::schema::Feature::SdVae);
    let e = write_full_model(
        Feature::ClipText,
        &dir.path().join("ct"),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("clip_text"), "{e}");
}

/// On a GPU: every encoder on CUDA in bf16 gives its f32 CPU result within bf16's
/// tolerance, on the tiny fixtures (all six, T5 masked) and at full size with random
/// weights (the three image encoders, one item each: the CPU reference of a full VAE
/// is a TFLOP). Without a GPU it says why it skipped.
#[test]
fn every_encoder_on_cuda_in_bf16_matches_the_cpu_in_f32() {
    const NAME: &str = "every_encoder_on_cuda_in_bf16_matches_the_cpu_in_f32";
    if !cfg!(feature = "cuda") {
        eprintln!("{NAME}: skipped: built without the `cuda` feature");
        return;
    }
    if let Err(e) = candle_core::Device::new_cuda(0) {
        eprintln!("{NAME}: skipped: no CUDA device ({e})");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut small = tiny(
        &[
            "sd_vae",
            "flux_vae",
            "siglip",
            "clip_vision",
            "clip_text",
            "t5@24",
        ],
        DType::Bf16,
        true,
    );
    small.device = "cuda:0".into();
    let mut full = EncodeBenchConfig {
        encoders: ["sd_vae", "siglip", "clip_vision"]
            .iter()
            .flat_map(|n| BenchEncoder::parse(n).unwrap())
            .collect(),
        preset: Preset::Full,
        batch: Some(1),
        ..small.clone()
    };
    full.rounds = 1;
    for cfg in [small, full] {
        let report = run_encode_bench(&cfg, dir.path()).unwrap();
        assert!(!report.failed(), "{}", report.table());
        for r in &report.rows {
            let c = r.check.as_ref().expect("checked");
            assert!(c.pass && c.rel_err > 0.0, "{}: {c:?}", r.encoder);
        }
    }
}
