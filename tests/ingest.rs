//! `tensorbake ingest` end to end: synthetic shards served over loopback HTTP.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use image::ImageEncoder;
use serde_json::Value;
use tensorbake_ingest::caption::{CaptionOutcome, CleanConfig};
use tensorbake_kit::http::{Fault, FileServer};
use tensorbake_kit::synth::{self, Sa1bSpec};

use crate::util::{tempdir, tensorbake};

fn lines(bytes: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(bytes)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn summary(stderr: &[u8]) -> Value {
    lines(stderr)
        .into_iter()
        .find_map(|v| v.get("summary").cloned())
        .expect("a summary line on stderr")
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.to_string_lossy().into_owned()
}

const NET: &str =
    "[network]\nstall_timeout_s = 0.5\nbackoff_initial_s = 0.05\nbackoff_max_s = 2.0\n";

#[test]
fn sa1b_over_http_with_faults_lists_the_same_samples_as_a_clean_run() {
    let dir = tempdir();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    // Write the shards first, then serve them and point the links file at the server.
    let spec = Sa1bSpec {
        shards: 3,
        images_per_shard: 5,
        short_side: 96,
        mask_json_bytes: 300_000,
        seed: 11,
        base_url: None,
    };
    let layout = synth::write_sa1b(&data, &spec).unwrap();
    let server = FileServer::start(&data).unwrap();
    let mut links = String::from("file_name\tcdn_link\n");
    for s in &layout.shards {
        let name = s.file_name().unwrap().to_string_lossy();
        links.push_str(&format!("{name}\t{}\n", server.url(&name)));
    }
    std::fs::write(&layout.links, links).unwrap();
    let manifest = write(
        dir.path(),
        "sa1b.toml",
        &format!(
            "name = \"sa1b-test\"\n[source]\nkind = \"sa1b\"\nlinks = \"data/links.tsv\"\ncaptions = \"{}\"\n\
             [preprocess]\nresolution = 64\n{NET}",
            server.url("SA1B_caption.tar.gz")
        ),
    );
    let clean = tensorbake(dir.path(), &["ingest", &manifest, "--list"]);
    assert!(
        clean.status.success(),
        "{}",
        String::from_utf8_lossy(&clean.stderr)
    );
    let samples = lines(&clean.stdout);

    // every image kept, in shard order, with its caption joined and cleaned
    let want_keys: Vec<String> = layout.ids.iter().flatten().cloned().collect();
    let mut got_keys: Vec<String> = samples
        .iter()
        .map(|s| s["key"].as_str().unwrap().to_string())
        .collect();
    let per_shard: Vec<usize> = samples
        .iter()
        .map(|s| s["shard"].as_str().unwrap()[3..9].parse().unwrap())
        .collect();
    assert!(
        per_shard.windows(2).all(|w| w[0] <= w[1]),
        "shard order: {per_shard:?}"
    );
    got_keys.sort();
    let mut sorted_want = want_keys.clone();
    sorted_want.sort();
    assert_eq!(got_keys, sorted_want);
    let cleaner = CleanConfig::default().build();
    for s in &samples {
        let key = s["key"].as_str().unwrap();
        let CaptionOutcome::Clean(want) = cleaner.clean(&layout.caption_of[key]) else {
            panic!("{key}")
        };
        assert_eq!(s["caption"], want.as_str(), "{key}");
        assert_eq!(
            (
                s["width"].as_u64().unwrap() as u32,
                s["height"].as_u64().unwrap() as u32
            ),
            layout.size_of[key]
        );
        assert_eq!(
            s["fields"],
            serde_json::json!(["jpg"]),
            "mask .json members are not part of samples"
        );
    }
    let sum = summary(&clean.stderr);
    assert_eq!(sum["kept"], 15);
    // every shard streamed to its end (tar stops at its end marker, before the last
    // block of gzip padding)
    let on_disk: u64 = layout
        .shards
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    let streamed = sum["bytes"].as_u64().unwrap();
    assert!(
        streamed <= on_disk && streamed >= on_disk * 9 / 10,
        "{streamed} of {on_disk}"
    );

    // the same run with a cut connection, 503 + Retry-After, 429 and a stall
    let shard = |i: usize| {
        layout.shards[i]
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned()
    };
    let size0 = std::fs::metadata(&layout.shards[0]).unwrap().len();
    server.inject(&shard(0), Fault::CutAfter(size0 / 3), 1);
    server.inject(
        &shard(0),
        Fault::StallAfter(size0 / 2, Duration::from_secs(4)),
        1,
    );
    server.inject(&shard(1), Fault::Unavailable { retry_after_s: 1 }, 1);
    server.inject(&shard(2), Fault::TooManyRequests { retry_after_s: 1 }, 1);
    let faulty = tensorbake(dir.path(), &["ingest", &manifest, "--list"]);
    assert!(
        faulty.status.success(),
        "{}",
        String::from_utf8_lossy(&faulty.stderr)
    );
    assert_eq!(
        lines(&faulty.stdout),
        samples,
        "faults changed the sample list"
    );
    let sum = summary(&faulty.stderr);
    assert_eq!(sum["retries"], 4, "{sum}");
    assert_eq!(sum["kept"], 15);
    assert!(
        sum["failed_shards"].as_object().unwrap().is_empty(),
        "{sum}"
    );
    // the caption index was built once, next to the manifest, and reused
    assert!(dir.path().join("SA1B_caption.captions.redb").exists());
}

#[test]
fn pd12m_webdataset_keeps_captions_and_field_lists() {
    let dir = tempdir();
    let layout =
        synth::write_webdataset(&dir.path().join("pd"), "pd12m", 2, 4, (80, 64), 5).unwrap();
    let m = write(
        dir.path(),
        "pd.toml",
        "name = \"pd\"\n[source]\nkind = \"pd12m\"\nurls = [\"pd/pd12m-{000000..000001}.tar\"]\n[preprocess]\nresolution = 32\n",
    );
    let out = tensorbake(
        dir.path(),
        &["ingest", &m, "--list", "--shards-in-flight", "2"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let samples = lines(&out.stdout);
    let keys: Vec<&str> = samples.iter().map(|s| s["key"].as_str().unwrap()).collect();
    let want: Vec<&str> = layout.keys.iter().flatten().map(String::as_str).collect();
    assert_eq!(keys, want, "shard order, member order");
    assert_eq!(
        samples[0]["fields"],
        serde_json::json!(["jpg", "json", "txt"])
    );
    assert_eq!(samples[0]["shard"], "pd12m-000000.tar");
    assert_eq!(
        (samples[0]["width"].as_u64(), samples[0]["height"].as_u64()),
        (Some(80), Some(64))
    );
    assert!(samples.iter().all(|s| s["caption"].is_string()));
}

/// Every failure mode the ingest stage lists, each a counted outcome that leaves the
/// other samples and shards alone.
#[test]
fn every_failure_is_counted_and_the_rest_goes_on() {
    let dir = tempdir();
    let d = dir.path().join("wds");
    std::fs::create_dir_all(&d).unwrap();
    let good = |seed| synth::jpeg(48, 40, seed);
    let mut truncated_jpeg = good(2);
    truncated_jpeg.truncate(truncated_jpeg.len() / 2);
    // a PNG header claiming 100000 x 100000 pixels
    let mut bomb = Vec::new();
    image::codecs::png::PngEncoder::new(&mut bomb)
        .write_image(&[0u8; 3], 1, 1, image::ExtendedColorType::Rgb8)
        .unwrap();
    bomb[16..20].copy_from_slice(&100_000u32.to_be_bytes());
    bomb[20..24].copy_from_slice(&100_000u32.to_be_bytes());
    let mut crc = flate2::Crc::new(); // the IHDR chunk's CRC covers its type and data
    crc.update(&bomb[12..29]);
    bomb[29..33].copy_from_slice(&crc.sum().to_be_bytes());
    let gif = b"GIF89a\x01\x00\x01\x00\x00\x00\x00;".to_vec();
    let m = |n: &str, d: Vec<u8>| (n.to_string(), d);
    synth::write_tar(
        &d.join("a-000.tar"),
        &[
            m("ok1.jpg", good(1)),
            m("ok1.txt", b"a cat".to_vec()),
            m("trunc.jpg", truncated_jpeg),
            m("trunc.txt", b"x".to_vec()),
            m("garbage.jpg", b"definitely not an image".to_vec()),
            m("garbage.txt", b"x".to_vec()),
            m("bomb.png", bomb),
            m("bomb.txt", b"x".to_vec()),
            m("gif.jpg", gif),
            m("gif.txt", b"x".to_vec()),
            m("dup.jpg", good(3)),
            m("dup.jpg", good(4)),
            m("dup.txt", b"x".to_vec()),
            m("nocap.jpg", good(5)),
            m("badutf.jpg", good(6)),
            m("badutf.txt", vec![0x66, 0xff, 0xfe]),
            m("ok2.jpg", good(7)),
            m("ok2.txt", b"a dog".to_vec()),
        ],
        false,
    )
    .unwrap();
    // a tar cut in the middle of a member: the samples before the cut are kept
    let many: Vec<(String, Vec<u8>)> = (0..6)
        .flat_map(|i| {
            [
                m(&format!("t{i}.jpg"), good(10 + i)),
                m(&format!("t{i}.txt"), b"c".to_vec()),
            ]
        })
        .collect();
    synth::write_tar(&d.join("a-001.tar"), &many, false).unwrap();
    let full = std::fs::read(d.join("a-001.tar")).unwrap();
    let cut = full.len() * 2 / 3;
    std::fs::write(d.join("a-001.tar"), &full[..cut]).unwrap();
    // a corrupt gzip stream
    synth::write_tar(&d.join("a-002.tar"), &many, true).unwrap();
    let mut gz = std::fs::read(d.join("a-002.tar")).unwrap();
    for b in gz.iter_mut().skip(30).take(64) {
        *b = !*b;
    }
    std::fs::write(d.join("a-002.tar"), gz).unwrap();
    // a-003.tar does not exist on the server (404); a-004.tar is fine
    synth::write_tar(&d.join("a-004.tar"), &many, true).unwrap();
    let server = FileServer::start(&d).unwrap();
    let man = write(
        dir.path(),
        "m.toml",
        &format!(
            "name = \"faults\"\n[source]\nkind = \"webdataset\"\nurls = [\"{}/a-{{000..004}}.tar\"]\n\
             [preprocess]\nresolution = 32\n{NET}",
            server.base_url()
        ),
    );
    let out = tensorbake(dir.path(), &["ingest", &man, "--list"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let kept: Vec<String> = lines(&out.stdout)
        .iter()
        .map(|s| s["key"].as_str().unwrap().to_string())
        .collect();
    let sum = summary(&out.stderr);
    let skipped: BTreeMap<String, u64> = serde_json::from_value(sum["skipped"].clone()).unwrap();
    let failed: BTreeMap<String, u64> =
        serde_json::from_value(sum["failed_shards"].clone()).unwrap();
    let reasons: BTreeMap<String, String> = lines(&out.stderr)
        .iter()
        .filter_map(|v| {
            Some((
                v.get("skipped")?.as_str()?.to_string(),
                v["reason"].as_str()?.to_string(),
            ))
        })
        .collect();
    assert_eq!(reasons["trunc"], "truncated_image", "{reasons:?}");
    assert_eq!(reasons["garbage"], "unrecognized_format", "{reasons:?}");
    assert_eq!(reasons["bomb"], "decompression_bomb", "{reasons:?}");
    assert_eq!(reasons["gif"], "unsupported_format", "{reasons:?}");
    assert_eq!(reasons["dup"], "duplicate_field", "{reasons:?}");
    assert_eq!(reasons["nocap"], "missing_caption", "{reasons:?}");
    assert_eq!(reasons["badutf"], "caption_invalid_utf8", "{reasons:?}");
    assert_eq!(skipped.values().sum::<u64>(), 7, "{skipped:?}");
    assert_eq!(failed.get("truncated_tar"), Some(&1), "{failed:?}");
    assert_eq!(failed.get("corrupt_gzip"), Some(&1), "{failed:?}");
    assert_eq!(failed.get("http_not_found"), Some(&1), "{failed:?}");
    assert_eq!(sum["shards_ok"], 2);
    // shard 0: ok1, ok2; shard 1: the samples before the cut; shard 4: all six
    assert_eq!(&kept[..2], ["ok1", "ok2"]);
    assert_eq!(
        &kept[kept.len() - 6..],
        ["t0", "t1", "t2", "t3", "t4", "t5"]
    );
    let before_cut = kept.len() - 8;
    assert!((1..6).contains(&before_cut), "{kept:?}");
    let failed_lines: Vec<Value> = lines(&out.stderr)
        .into_iter()
        .filter(|v| v.get("failed_shard").is_some())
        .collect();
    assert!(
        failed_lines.iter().any(|v| v["failed_shard"] == "a-003.tar"
            && v["url"].as_str().unwrap().ends_with("/a-003.tar"))
    );
}

#[test]
fn bad_manifests_fail_with_one_clear_line() {
    let dir = tempdir();
    let m = write(
        dir.path(),
        "m.toml",
        "name = \"x\"\n[source]\nkind = \"webdataset\"\nurls = [\"a.tar\"]\ncaption_feild = \"txt\"\n",
    );
    let out = tensorbake(dir.path(), &["ingest", &m, "--list"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("m.toml:5:1") && err.contains("caption_feild"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let m = write(
        dir.path(),
        "s.toml",
        "name = \"x\"\n[source]\nkind = \"sa1b\"\ncaptions = \"c.tar.gz\"\n",
    );
    let out = tensorbake(dir.path(), &["ingest", &m]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("links"), "{err}");
    let out = tensorbake(dir.path(), &["ingest", "missing.toml"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("missing.toml"),
        "{err}"
    );
}

/// SA-1B captions joined through the index: a caption that is not UTF-8 and an id with
/// no caption are counted per sample; without a caption tar (and `require_caption =
/// false`) every image is kept with a null caption.
#[test]
fn sa1b_caption_join_counts_bad_and_missing_captions() {
    let dir = tempdir();
    let data = dir.path().join("data");
    let spec = Sa1bSpec {
        shards: 1,
        images_per_shard: 3,
        short_side: 64,
        mask_json_bytes: 1000,
        seed: 3,
        base_url: None,
    };
    let layout = synth::write_sa1b(&data, &spec).unwrap();
    let ids = &layout.ids[0];
    // captions: the first id fine, the second not UTF-8, the third absent
    let caps = vec![
        (format!("{}.txt", ids[0]), b"A red bicycle.".to_vec()),
        (format!("{}.txt", ids[1]), vec![b'a', 0xff, 0xfe, b'b']),
    ];
    synth::write_tar(&data.join("caps.tar.gz"), &caps, true).unwrap();
    let m = write(
        dir.path(),
        "m.toml",
        "name = \"x\"\n[source]\nkind = \"sa1b\"\nlinks = \"data/links.tsv\"\ncaptions = \"data/caps.tar.gz\"\n\
         [preprocess]\nresolution = 32\n",
    );
    let out = tensorbake(dir.path(), &["ingest", &m, "--list"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let kept = lines(&out.stdout);
    assert_eq!(kept.len(), 1);
    assert_eq!(kept[0]["key"], ids[0].as_str());
    assert_eq!(kept[0]["caption"], "a red bicycle.");
    let reasons: BTreeMap<String, String> = lines(&out.stderr)
        .iter()
        .filter_map(|v| {
            Some((
                v.get("skipped")?.as_str()?.to_string(),
                v["reason"].as_str()?.to_string(),
            ))
        })
        .collect();
    assert_eq!(reasons[&ids[1]], "caption_invalid_utf8", "{reasons:?}");
    assert_eq!(reasons[&ids[2]], "missing_caption", "{reasons:?}");

    let m = write(
        dir.path(),
        "nocap.toml",
        "name = \"x\"\n[source]\nkind = \"sa1b\"\nlinks = \"data/links.tsv\"\nrequire_caption = false\n\
         [preprocess]\nresolution = 32\n",
    );
    let out = tensorbake(dir.path(), &["ingest", &m, "--list"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let kept = lines(&out.stdout);
    assert_eq!(kept.len(), 3);
    assert!(kept.iter().all(|s| s["caption"].is_null()), "{kept:?}");
}
