//! Parity of the `t5` and `clip_text` encoders with transformers, on the tiny
//! random-weight models and golden outputs of `fixtures/text/make_text_golden.py`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, IndexOp, Tensor};
use tensorbake_encode::text::T5_DEFAULT_MAX_LENGTH;
use tensorbake_encode::{
    ClipTextEncoder, EncodeError, Encoder, EncoderConfig, Input, Rgb8, T5TextEncoder,
    build_encoder, null_embedding,
};
use tensorbake_kit::dtype::DType as Precision;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/text")
}

struct Golden {
    t: HashMap<String, Tensor>,
    captions: Vec<String>,
    t5_lengths: Vec<usize>,
}

fn golden() -> Golden {
    let t = candle_core::safetensors::load(fixtures().join("golden.safetensors"), &Device::Cpu)
        .unwrap();
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("golden.json")).unwrap())
            .unwrap();
    Golden {
        t,
        captions: serde_json::from_value(meta["captions"].clone()).unwrap(),
        t5_lengths: serde_json::from_value(meta["t5_lengths"].clone()).unwrap(),
    }
}

impl Golden {
    fn get(&self, k: &str) -> &Tensor {
        &self.t[k]
    }
    fn ids(&self, k: &str) -> Vec<Vec<u32>> {
        self.t[k]
            .to_vec2::<i64>()
            .unwrap()
            .into_iter()
            .map(|r| r.into_iter().map(|x| x as u32).collect())
            .collect()
    }
    fn caps(&self) -> Vec<&str> {
        self.captions.iter().map(String::as_str).collect()
    }
}

fn cfg(name: &str, weights: &Path, max_length: Option<usize>) -> EncoderConfig {
    EncoderConfig {
        name: name.into(),
        weights: weights.display().to_string(),
        dtype: Precision::F32,
        batch: 16,
        device: "cpu".into(),
        max_length,
        store_dtype: None,
    }
}

/// max |a - b| / max |b|: the relative error of `a` against the reference `b`.
fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.to_dtype(DType::F32).unwrap();
    let b = b.to_dtype(DType::F32).unwrap();
    assert_eq!(a.dims(), b.dims());
    let diff = (&a - &b).unwrap().abs().unwrap().flatten_all().unwrap();
    let diff = diff.max(0).unwrap().to_scalar::<f32>().unwrap();
    let scale = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
    diff / scale.to_scalar::<f32>().unwrap().max(1e-12)
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

fn t5(max_length: usize) -> T5TextEncoder {
    T5TextEncoder::load(&cfg("t5", &fixtures().join("t5"), Some(max_length))).unwrap()
}

fn clip() -> ClipTextEncoder {
    ClipTextEncoder::load(&cfg("clip_text", &fixtures().join("clip"), None)).unwrap()
}

#[test]
fn t5_tokenizes_as_transformers_with_truncation_keeping_eos() {
    let g = golden();
    let enc = t5(32);
    let tb = enc.tokenize(&g.caps()).unwrap();
    let want = g.ids("t5_input_ids");
    for (i, row) in want.iter().enumerate() {
        assert_eq!(
            tb.row(i),
            row.as_slice(),
            "caption {i}: {:?}",
            g.captions[i]
        );
    }
    assert_eq!(tb.lengths, g.t5_lengths);
    // the empty caption is `</s>` alone; the long caption is cut at 32 with `</s>` last
    let eos = enc.tokenizer().token_id("</s>").unwrap();
    assert_eq!((tb.lengths[1], tb.row(1)[0]), (1, eos));
    assert_eq!((tb.lengths[3], tb.row(3)[31]), (32, eos));
    assert_eq!(enc.tokenizer().pad_id(), 0);

    // a shorter maximum length truncates every long caption the same way
    let short = t5(8).tokenize(&g.caps()).unwrap();
    for (i, row) in g.ids("t5_input_ids_short").iter().enumerate() {
        assert_eq!(short.row(i), row.as_slice(), "caption {i} at max_length 8");
        assert_eq!(short.row(i)[short.lengths[i] - 1], eos);
    }
}

#[test]
fn t5_padded_batch_matches_transformers_and_is_zero_beyond_len() {
    let g = golden();
    let enc = t5(32);
    let (hidden, lens) = enc.encode_texts(&g.caps()).unwrap();
    assert_eq!(hidden.dims(), &[6, 32, 48]);
    let lens: Vec<u32> = lens.to_vec1().unwrap();
    assert_eq!(
        lens,
        g.t5_lengths.iter().map(|&n| n as u32).collect::<Vec<_>>()
    );
    let want = g.get("t5_hidden");
    for (i, &n) in g.t5_lengths.iter().enumerate() {
        let got = hidden.i((i, ..n)).unwrap();
        let err = rel_err(&got, &want.i((i, ..n)).unwrap());
        assert!(err < 1e-4, "caption {i}: relative error {err}");
        if n < 32 {
            assert_eq!(
                max_abs(&hidden.i((i, n..)).unwrap()),
                0.0,
                "caption {i} padding"
            );
        }
    }
}

#[test]
fn t5_batch_equals_each_caption_alone() {
    let g = golden();
    let enc = t5(32);
    let (batch, _) = enc.encode_texts(&g.caps()).unwrap();
    for (i, c) in g.caps().iter().enumerate() {
        let (alone, len) = enc.encode_texts(&[c]).unwrap();
        assert_eq!(len.to_vec1::<u32>().unwrap()[0] as usize, g.t5_lengths[i]);
        let err = rel_err(&alone.i(0).unwrap(), &batch.i(i).unwrap());
        assert!(err < 1e-5, "caption {i}: batch vs alone {err}");
    }
}

#[test]
fn t5_unmasked_matches_flux_pipeline_style() {
    let g = golden();
    let enc = t5(32);
    let got = enc.encode_unmasked(&g.caps()).unwrap();
    let want = g.get("t5_hidden_unmasked");
    for i in 0..g.captions.len() {
        let err = rel_err(&got.i(i).unwrap(), &want.i(i).unwrap());
        assert!(err < 1e-4, "caption {i}: relative error {err}");
    }
    // without the mask, padding changes the real rows: the masked output differs
    let (masked, _) = enc.encode_texts(&g.caps()).unwrap();
    let n = g.t5_lengths[0];
    assert!(rel_err(&got.i((0, ..n)).unwrap(), &masked.i((0, ..n)).unwrap()) > 1e-3);
}

#[test]
fn t5_relative_buckets_match_transformers() {
    let g = golden();
    let want: Vec<i64> = g.get("t5_buckets_32_128").to_vec1().unwrap();
    for (j, w) in want.iter().enumerate() {
        let rel = j as i64 - 600;
        assert_eq!(
            i64::from(tensorbake_nn::t5::relative_position_bucket(rel, 32, 128)),
            *w,
            "relative position {rel}"
        );
    }
}

#[test]
fn null_embeddings_match_the_reference_and_are_stable() {
    let g = golden();
    let enc = t5(32);
    let (h, n) = enc.null_embedding().unwrap();
    assert_eq!((h.dims(), n), (&[32usize, 48][..], 1));
    let want = g.get("t5_null");
    assert!(rel_err(&h.i(..1).unwrap(), &want.i(..1).unwrap()) < 1e-4);
    assert_eq!(max_abs(&h.i(1..).unwrap()), 0.0);
    // stable: the same bits on every call, and the same as "" inside a batch
    let (h2, _) = enc.null_embedding().unwrap();
    assert_eq!(max_abs(&(&h - &h2).unwrap()), 0.0);
    let (batch, _) = enc.encode_texts(&g.caps()).unwrap();
    assert!(rel_err(&batch.i(1).unwrap(), &h).abs() < 1e-5);

    // through the trait: per-sample shapes, both arrays
    let boxed: Box<dyn Encoder> = Box::new(enc);
    let arrays = null_embedding(boxed.as_ref(), 0).unwrap();
    assert_eq!(arrays[0].0, "t5_hidden");
    assert_eq!(arrays[0].1.dims(), &[32, 48]);
    assert_eq!(arrays[1].0, "t5_len");
    assert_eq!(arrays[1].1.to_scalar::<u32>().unwrap(), 1);

    let c = clip();
    let p = c.null_embedding().unwrap();
    assert!(rel_err(&p, g.get("clip_null")) < 1e-4);
    assert_eq!(max_abs(&(&p - &c.null_embedding().unwrap()).unwrap()), 0.0);
    let arrays = null_embedding(&c, 0).unwrap();
    assert_eq!(arrays[0].0, "clip_text_pooled");
    assert!(rel_err(&arrays[0].1, g.get("clip_null")) < 1e-4);
}

#[test]
fn clip_tokenizes_and_pools_as_transformers() {
    let g = golden();
    let enc = clip();
    let tb = enc.tokenize(&g.caps()).unwrap();
    for (i, row) in g.ids("clip_input_ids").iter().enumerate() {
        assert_eq!(
            tb.row(i),
            row.as_slice(),
            "caption {i}: {:?}",
            g.captions[i]
        );
    }
    let eot = enc.tokenizer().token_id("<|endoftext|>").unwrap();
    assert_eq!(tb.row(3)[76], eot, "truncated caption keeps <|endoftext|>");
    let short = ClipTextEncoder::load(&cfg("clip_text", &fixtures().join("clip"), Some(8)))
        .unwrap()
        .tokenize(&g.caps())
        .unwrap();
    for (i, row) in g.ids("clip_input_ids_short").iter().enumerate() {
        assert_eq!(short.row(i), row.as_slice(), "caption {i} at max_length 8");
    }

    let pooled = enc.encode_texts(&g.caps()).unwrap();
    assert_eq!(pooled.dims(), &[6, 32]);
    for i in 0..g.captions.len() {
        let err = rel_err(&pooled.i(i).unwrap(), &g.get("clip_pooled").i(i).unwrap());
        assert!(err < 1e-4, "caption {i}: relative error {err}");
    }
    // pooled is the final-norm row at the end token (the golden last_hidden_state)
    let last = g.get("clip_last_hidden");
    let pos = tb.lengths[0] - 1;
    assert!(rel_err(&pooled.i(0).unwrap(), &last.i((0, pos)).unwrap()) < 1e-4);
    // each caption alone gives the same vector
    for (i, c) in g.caps().iter().enumerate() {
        let one = enc.encode_texts(&[c]).unwrap();
        assert!(rel_err(&one.i(0).unwrap(), &pooled.i(i).unwrap()) < 1e-5);
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn edit_json(path: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

#[test]
fn clip_new_eos_rule_and_clip_model_checkpoints() {
    let g = golden();
    let tmp = tempfile::tempdir().unwrap();
    // eos_token_id set to the real <|endoftext|> id: the first-eos rule
    let d = tmp.path().join("eos");
    copy_dir(&fixtures().join("clip"), &d);
    let eot = clip().tokenizer().token_id("<|endoftext|>").unwrap();
    edit_json(&d.join("config.json"), |v| v["eos_token_id"] = eot.into());
    let enc = ClipTextEncoder::load(&cfg("clip_text", &d, None)).unwrap();
    let pooled = enc.encode_texts(&g.caps()).unwrap();
    assert!(rel_err(&pooled, g.get("clip_pooled_eos_rule")) < 1e-4);

    // a CLIPModel checkpoint: nested text_config, tensors under `text_model.`, plus a
    // vision tower that is not read
    let d = tmp.path().join("clipmodel");
    copy_dir(&fixtures().join("clip"), &d);
    let text: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("config.json")).unwrap()).unwrap();
    std::fs::write(
        d.join("config.json"),
        serde_json::json!({"model_type": "clip", "architectures": ["CLIPModel"],
            "text_config": text, "vision_config": {"hidden_size": 8}})
        .to_string(),
    )
    .unwrap();
    let st = candle_core::safetensors::load(d.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut renamed: HashMap<String, Tensor> = st
        .into_iter()
        .map(|(k, v)| (format!("text_model.{k}"), v))
        .collect();
    renamed.insert(
        "vision_model.post_layernorm.weight".into(),
        Tensor::ones(8, DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&renamed, d.join("model.safetensors")).unwrap();
    let enc = ClipTextEncoder::load(&cfg("clip_text", &d, None)).unwrap();
    assert!(rel_err(&enc.encode_texts(&g.caps()).unwrap(), g.get("clip_pooled")) < 1e-4);

    let err = ClipTextEncoder::load(&cfg("clip_text", &d, Some(78)))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("max_length 78") && err.contains("77"), "{err}");
}

/// A diffusers pipeline root: CLIP in text_encoder/ + tokenizer/, T5 in text_encoder_2/
/// + tokenizer_2/ (Flux's layout).
fn pipeline(root: &Path) {
    for (model, te, tok) in [
        ("clip", "text_encoder", "tokenizer"),
        ("t5", "text_encoder_2", "tokenizer_2"),
    ] {
        let src = fixtures().join(model);
        for (dir, files) in [
            (te, &["config.json", "model.safetensors"][..]),
            (tok, &["tokenizer.json", "tokenizer_config.json"][..]),
        ] {
            std::fs::create_dir_all(root.join(dir)).unwrap();
            for f in files {
                std::fs::copy(src.join(f), root.join(dir).join(f)).unwrap();
            }
        }
    }
    std::fs::write(
        root.join("model_index.json"),
        r#"{"_class_name": "FluxPipeline"}"#,
    )
    .unwrap();
}

#[test]
fn pipeline_roots_and_text_encoder_dirs_find_their_tokenizers() {
    let g = golden();
    let tmp = tempfile::tempdir().unwrap();
    pipeline(tmp.path());
    let want = t5(32).encode_texts(&g.caps()).unwrap().0;
    for w in [tmp.path().to_path_buf(), tmp.path().join("text_encoder_2")] {
        let enc = build_encoder(&cfg("t5", &w, Some(32)), 512).unwrap();
        assert!(enc.takes_text());
        let out = enc.encode(Input::Texts(&g.caps())).unwrap();
        assert_eq!(rel_err(&out[0].1, &want), 0.0, "{}", w.display());
        let info = enc.info();
        assert_eq!(info.feature, "t5");
        assert_eq!(info.arrays[0].shape, vec![32, 48]);
        assert!(info.arrays[1].shape.is_empty());
        assert!(
            info.preprocess["tokenizer"]
                .as_str()
                .unwrap()
                .contains("tokenizer_2")
        );
        assert_eq!(info.weights_sha256.len(), 64);
    }
    let want = clip().encode_texts(&g.caps()).unwrap();
    for w in [tmp.path().to_path_buf(), tmp.path().join("text_encoder")] {
        let enc = build_encoder(&cfg("clip_text", &w, None), 512).unwrap();
        let out = enc.encode(Input::Texts(&g.caps())).unwrap();
        assert_eq!(out[0].0, "clip_text_pooled");
        assert_eq!(rel_err(&out[0].1, &want), 0.0);
        assert_eq!(enc.info().arrays[0].shape, vec![32]);
    }
    // T5 asked of a CLIP-only directory: says what it found
    let err = build_encoder(&cfg("t5", &tmp.path().join("text_encoder"), None), 512)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("no T5 config.json") && err.contains("clip_text_model"),
        "{err}"
    );
}

#[test]
fn t5_spiece_model_converts_exactly_as_transformers() {
    // the converted document equals the tokenizer.json transformers wrote from it
    let sp = std::fs::read(fixtures().join("t5_spiece_only/spiece.model")).unwrap();
    let got = tensorbake_encode::spm::t5_tokenizer_json(&sp, 10).unwrap();
    let want: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("t5/tokenizer.json")).unwrap(),
    )
    .unwrap();
    for key in [
        "added_tokens",
        "normalizer",
        "pre_tokenizer",
        "post_processor",
        "decoder",
    ] {
        assert_eq!(got[key], want[key], "{key}");
    }
    for key in ["type", "unk_id", "byte_fallback"] {
        assert_eq!(got["model"][key], want["model"][key], "model.{key}");
    }
    // scores are f32 in the model; serde_json's float parsing may be one f64 ulp off
    let pieces = |v: &serde_json::Value| -> Vec<(String, f32)> {
        v["model"]["vocab"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e[0].as_str().unwrap().to_string(),
                    e[1].as_f64().unwrap() as f32,
                )
            })
            .collect()
    };
    assert_eq!(pieces(&got), pieces(&want));

    // a directory with only spiece.model (+ tokenizer_config.json) tokenizes and
    // encodes exactly as the golden batch
    let g = golden();
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("t5_spiece");
    copy_dir(&fixtures().join("t5_spiece_only"), &d);
    std::fs::copy(
        fixtures().join("t5/model.safetensors"),
        d.join("model.safetensors"),
    )
    .unwrap();
    let enc = T5TextEncoder::load(&cfg("t5", &d, Some(32))).unwrap();
    assert!(enc.tokenizer().path().ends_with("spiece.model"));
    assert_eq!(enc.max_length(), 32);
    let tb = enc.tokenize(&g.caps()).unwrap();
    for (i, row) in g.ids("t5_input_ids").iter().enumerate() {
        assert_eq!(tb.row(i), row.as_slice(), "caption {i}");
    }
    let (h, _) = enc.encode_texts(&g.caps()).unwrap();
    let (want, _) = t5(32).encode_texts(&g.caps()).unwrap();
    assert_eq!(rel_err(&h, &want), 0.0);
    let enc = T5TextEncoder::load(&cfg("t5", &d, None)).unwrap();
    assert_eq!(enc.max_length(), T5_DEFAULT_MAX_LENGTH);

    // a broken spiece.model is named
    std::fs::write(d.join("spiece.model"), b"\x0a\xff\xff").unwrap();
    let msg = T5TextEncoder::load(&cfg("t5", &d, None))
        .err()
        .unwrap()
        .to_string();
    assert!(
        msg.contains("spiece.model") && msg.contains("not a T5 SentencePiece"),
        "{msg}"
    );
}

#[test]
fn spiece_only_clip_or_missing_tokenizers_say_how_to_fix_it() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("clip");
    copy_dir(&fixtures().join("clip"), &d);
    std::fs::remove_file(d.join("tokenizer.json")).unwrap();
    let msg = ClipTextEncoder::load(&cfg("clip_text", &d, None))
        .err()
        .unwrap()
        .to_string();
    assert!(
        msg.contains("no tokenizer.json or spiece.model in"),
        "{msg}"
    );
    std::fs::write(d.join("tokenizer.model"), b"x").unwrap();
    let err = ClipTextEncoder::load(&cfg("clip_text", &d, None))
        .err()
        .unwrap();
    assert!(
        matches!(
            err,
            EncodeError::Model(tensorbake_nn::Error::WeightsNotFound { .. })
        ),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("tokenizer.model")
            && msg.contains("without tokenizer.json")
            && msg.contains("save_pretrained")
            && msg.contains(&d.display().to_string()),
        "{msg}"
    );
}

#[test]
fn bad_weights_and_dtypes_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("t5");
    copy_dir(&fixtures().join("t5"), &d);
    let file = d.join("model.safetensors");
    let mut st = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
    let gone = "encoder.block.1.layer.1.DenseReluDense.wi_1.weight";
    st.remove(gone).unwrap();
    candle_core::safetensors::save(&st, &file).unwrap();
    let err = T5TextEncoder::load(&cfg("t5", &d, None)).err().unwrap();
    let msg = err.to_string();
    assert!(
        matches!(
            err,
            EncodeError::Model(tensorbake_nn::Error::BadTensor { .. })
        ) && msg.contains(gone)
            && msg.contains("missing")
            && msg.contains(&file.display().to_string()),
        "{msg}"
    );

    // a config that disagrees with the tensors: the shape is named
    copy_dir(&fixtures().join("t5"), &d);
    edit_json(&d.join("config.json"), |v| v["d_ff"] = 64.into());
    let msg = T5TextEncoder::load(&cfg("t5", &d, None))
        .err()
        .unwrap()
        .to_string();
    assert!(
        msg.contains("DenseReluDense") && msg.contains("expected shape [48, 64], found [48, 80]"),
        "{msg}"
    );

    // not a safetensors file at all
    std::fs::write(&file, b"not safetensors").unwrap();
    let msg = T5TextEncoder::load(&cfg("t5", &d, None))
        .err()
        .unwrap()
        .to_string();
    assert!(
        msg.contains("model.safetensors") && msg.contains("safetensors"),
        "{msg}"
    );

    // f16 T5 is refused with the supported dtypes named
    let mut c = cfg("t5", &fixtures().join("t5"), None);
    c.dtype = Precision::F16;
    let msg = T5TextEncoder::load(&c).err().unwrap().to_string();
    assert!(
        msg.contains("f16") && msg.contains("bf16") && msg.contains("f32"),
        "{msg}"
    );

    // images to a text encoder
    let enc = t5(16);
    let img = [Rgb8 {
        width: 1,
        height: 1,
        pixels: &[0, 0, 0],
    }];
    let msg = enc.encode(Input::Images(&img)).unwrap_err().to_string();
    assert!(msg.contains("takes captions"), "{msg}");
}

#[test]
fn bf16_runs_close_to_f32() {
    let g = golden();
    let mut c = cfg("t5", &fixtures().join("t5"), Some(32));
    c.dtype = Precision::Bf16;
    let enc = T5TextEncoder::load(&c).unwrap();
    let (h, _) = enc.encode_texts(&g.caps()).unwrap();
    assert_eq!(h.dtype(), DType::BF16);
    let n = g.t5_lengths[0];
    let err = rel_err(
        &h.i((0, ..n)).unwrap(),
        &g.get("t5_hidden").i((0, ..n)).unwrap(),
    );
    assert!(err < 0.05, "bf16 relative error {err}");
    // chunking by the configured batch size does not change results
    let mut c = cfg("t5", &fixtures().join("t5"), Some(32));
    c.batch = 2;
    let (chunked, _) = T5TextEncoder::load(&c)
        .unwrap()
        .encode_texts(&g.caps())
        .unwrap();
    let (whole, _) = t5(32).encode_texts(&g.caps()).unwrap();
    assert!(rel_err(&chunked, &whole) < 1e-5);
}
