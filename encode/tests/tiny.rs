//! The tiny random-weight models (tensorbake-nn `tiny`) load through the real
//! feature loaders and give finite, input-dependent outputs; the tiny T5's
//! SentencePiece model tokenizes as designed.

use std::path::Path;

use candle_core::DType;
use tensorbake_encode::{EncoderConfig, Input, Rgb8, build_encoder};
use tensorbake_nn::tiny::{TinyModel, write_tiny_model};

fn cfg(name: &str, dir: &Path) -> EncoderConfig {
    EncoderConfig {
        name: name.into(),
        weights: dir.to_string_lossy().into_owned(),
        dtype: Default::default(),
        batch: 2,
        device: "cpu".into(),
        max_length: Some(16),
        store_dtype: None,
    }
}

fn image(seed: u8, side: u32) -> Vec<u8> {
    (0..side * side * 3)
        .map(|i| (i as u8).wrapping_mul(seed).wrapping_add(i as u8 / 7))
        .collect()
}

#[test]
fn every_tiny_model_loads_through_the_real_loader_and_gives_finite_outputs() {
    let root = tempfile::tempdir().unwrap();
    for model in [
        TinyModel::SdVae,
        TinyModel::FluxVae,
        TinyModel::Siglip,
        TinyModel::ClipVision,
        TinyModel::T5,
    ] {
        let dir = root.path().join(model.feature().name());
        write_tiny_model(model, &dir, 3).unwrap();
        let enc = build_encoder(&cfg(model.feature().name(), &dir), 64)
            .unwrap_or_else(|e| panic!("{}: {e}", model.feature()));
        let out = if model == TinyModel::T5 {
            enc.encode(Input::Texts(&["a red bicycle", "zebra crossing"]))
                .unwrap()
        } else {
            let (a, b) = (image(3, 64), image(5, 64));
            let imgs = [
                Rgb8 {
                    width: 64,
                    height: 64,
                    pixels: &a,
                },
                Rgb8 {
                    width: 64,
                    height: 64,
                    pixels: &b,
                },
            ];
            enc.encode(Input::Images(&imgs)).unwrap()
        };
        let info = enc.info();
        assert_eq!(out.len(), info.arrays.len(), "{}", model.feature());
        for ((name, t), spec) in out.iter().zip(&info.arrays) {
            assert_eq!(name, &spec.array);
            let mut want = vec![2];
            want.extend(&spec.shape);
            assert_eq!(t.dims(), want.as_slice(), "{name}");
            let v: Vec<f32> = t
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert!(
                v.iter().all(|x| x.is_finite()),
                "{name} has non-finite values"
            );
            if name.name() != "t5_len" {
                // two different inputs give two different outputs (not a constant net)
                let half = v.len() / 2;
                assert!(
                    v[..half] != v[half..],
                    "{name}: both samples encode the same"
                );
                let spread = v.iter().fold(0f32, |m, x| m.max(x.abs()));
                assert!(spread > 1e-3, "{name} is all zeros");
            }
        }
    }
}

#[test]
fn tiny_t5_tokenizes_words_whole_and_spells_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(TinyModel::T5, dir.path(), 1).unwrap();
    let tok = tensorbake_encode::tokenize::TextTokenizer::from_t5_spiece(
        &dir.path().join("spiece.model"),
    )
    .unwrap();
    let b = tok.encode_batch(&["a red bicycle", "zq"], 16).unwrap();
    // "▁a", "▁red", "▁bicycle", "</s>", then padding
    assert_eq!(b.lengths[0], 4, "{:?}", b.row(0));
    assert_eq!(b.row(0)[3], 1, "ends with </s>");
    assert!(b.row(0)[4..].iter().all(|&id| id == 0));
    // "▁z" + "q" + "</s>": spelled, no <unk> (id 2)
    assert_eq!(b.lengths[1], 3, "{:?}", b.row(1));
    assert!(!b.row(1)[..3].contains(&2));
    assert_eq!(tok.pad_id(), 0);
}
