//! Parity with the Python `webdataset` library: tars written by its TarWriter (and a
//! few odd members written with `tarfile`) must group exactly as
//! `webdataset.WebDataset` groups them. `fixtures/wds/make_fixtures.py` wrote the tars
//! and `expected.jsonl` (keys, fields and a sha256 per field, in iteration order).

use std::collections::BTreeMap;
use std::path::Path;

use sha2::{Digest, Sha256};
use tensorbake_ingest::wds::{GroupOptions, TarEvent, read_samples};

#[test]
fn groups_like_python_webdataset() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/wds");
    let expected: Vec<serde_json::Value> = std::fs::read_to_string(dir.join("expected.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mut got = Vec::new();
    for shard in ["dirs.tar", "gzip_named.tar", "odd.tar"] {
        let file = std::fs::File::open(dir.join(shard)).unwrap();
        let opts = GroupOptions {
            ignore: &|_| false,
            load: &|_| true,
            max_member_bytes: 1 << 20,
        };
        let stats = read_samples(file, &opts, |ev| {
            let TarEvent::Sample(s) = ev else {
                panic!("unexpected {ev:?} in {shard}")
            };
            let fields: BTreeMap<String, String> = s
                .data
                .iter()
                .map(|(k, v)| (k.clone(), hex::encode(Sha256::digest(v))))
                .collect();
            assert_eq!(fields.len(), s.fields.len(), "every field loaded");
            got.push(serde_json::json!({"shard": shard, "key": s.key, "fields": fields}));
            true
        })
        .unwrap();
        assert_eq!(
            stats.gzip,
            shard == "gzip_named.tar",
            "{shard}: gzip sniffed from magic bytes"
        );
    }
    assert_eq!(got.len(), expected.len());
    for (g, e) in got.iter().zip(&expected) {
        assert_eq!(g, e);
    }
}
