//! Faults: a writer killed in the middle of a part, concurrent writers on disjoint
//! parts, a damaged shard in a committed part.

use std::collections::BTreeSet;
use std::io::BufRead;
use std::process::{Command, Stdio};

use tensorbake_store::{Location, Store, StoreReader, verify};

use crate::common::{expected, options, record, spec};

const CHILD_ENV: &str = "TENSORBAKE_STORE_TEST_CHILD";

/// Child role of `a_writer_killed_mid_part_loses_and_duplicates_nothing`: writes part
/// "victim" (seed 20) up to sample 13, flushing whole shards, says so, and waits to be
/// killed. As a normal test (no env var) it does nothing.
#[test]
fn child_writer_waiting_to_be_killed() {
    let Ok(store_path) = std::env::var(CHILD_ENV) else {
        return;
    };
    let store =
        Store::create_or_open_with(&Location::Local(store_path.into()), spec(), options()).unwrap();
    let mut w = store.part_writer("victim", "src-victim").unwrap();
    for i in 0..13 {
        w.push(record(&expected(20, i))).unwrap();
    }
    println!("WROTE 13");
    std::thread::sleep(std::time::Duration::from_secs(600));
}

fn all_keys(reader: &StoreReader) -> Vec<String> {
    (0..reader.len())
        .map(|i| reader.read_string(i, "key").unwrap())
        .collect()
}

#[test]
fn a_writer_killed_mid_part_loses_and_duplicates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.zarr");
    let loc = Location::Local(path.clone());
    let store = Store::create_or_open_with(&loc, spec(), options()).unwrap();
    // A part committed before the crash.
    let mut w = store.part_writer("done", "src-done").unwrap();
    for i in 0..9 {
        w.push(record(&expected(10, i))).unwrap();
    }
    w.commit().unwrap();

    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "faults::child_writer_waiting_to_be_killed",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, &path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = std::io::BufReader::new(stdout).lines();
    assert!(
        lines.any(|l| l.unwrap().contains("WROTE 13")),
        "child did not write"
    );
    child.kill().unwrap(); // SIGKILL: no destructor, no commit
    child.wait().unwrap();
    // The dead writer left whole shards behind (8 samples of emb_bf16), no marker.
    assert!(path.join("parts/victim/emb_bf16/c/0/0/0").exists());
    assert!(!path.join("parts/victim/zarr.json").exists());

    let reader = StoreReader::open(&loc).unwrap();
    assert_eq!(reader.len(), 9, "the half-written part must be invisible");
    assert_eq!(reader.uncommitted_parts(), ["victim"]);

    // The re-run: committed parts are skipped, the victim is redone from scratch.
    let store = Store::create_or_open_with(&loc, spec(), options()).unwrap();
    let committed = store.committed_parts().unwrap();
    assert_eq!(committed, BTreeSet::from(["done".to_string()]));
    let mut w = store.part_writer("victim", "src-victim").unwrap();
    for i in 0..20 {
        w.push(record(&expected(20, i))).unwrap();
    }
    w.commit().unwrap();

    let reader = StoreReader::open(&loc).unwrap();
    let keys = all_keys(&reader);
    let mut want: Vec<String> = (0..9)
        .map(|i| expected(10, i).key)
        .chain((0..20).map(|i| expected(20, i).key))
        .collect();
    want.sort();
    let mut got = keys.clone();
    got.sort();
    assert_eq!(got, want, "lost or duplicated samples");
    assert!(verify(&loc).unwrap().ok());
}

#[test]
fn writers_on_disjoint_parts_run_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let loc = Location::Local(dir.path().join("s.zarr"));
    // Every worker creates-or-opens the store itself, as separate processes would.
    std::thread::scope(|scope| {
        for w in 0..4u64 {
            let loc = loc.clone();
            scope.spawn(move || {
                let store = Store::create_or_open_with(&loc, spec(), options()).unwrap();
                for part in 0..2u64 {
                    let seed = 100 + w * 10 + part;
                    let mut writer = store
                        .part_writer(&format!("w{w}-p{part}"), &format!("src-{seed}"))
                        .unwrap();
                    for i in 0..(7 + seed % 5) {
                        writer.push(record(&expected(seed, i))).unwrap();
                    }
                    writer.commit().unwrap();
                }
            });
        }
    });
    let reader = StoreReader::open(&loc).unwrap();
    assert_eq!(reader.parts().len(), 8);
    let mut want = Vec::new();
    for w in 0..4u64 {
        for part in 0..2u64 {
            let seed = 100 + w * 10 + part;
            want.extend((0..(7 + seed % 5)).map(|i| expected(seed, i).key));
        }
    }
    want.sort();
    let mut got = all_keys(&reader);
    got.sort();
    assert_eq!(got, want);
    // Values are those of the right sample, not of a neighbour's.
    for i in 0..reader.len() {
        let s = reader.get(i).unwrap();
        let seed: u64 = s.key[1..s.key.find('_').unwrap()].parse().unwrap();
        let row: u64 = s.key[s.key.find('_').unwrap() + 1..].parse().unwrap();
        assert_eq!(s.caption, expected(seed, row).caption);
    }
    assert!(verify(&loc).unwrap().ok());
}

#[test]
fn verify_finds_a_truncated_shard_and_reads_refuse_its_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.zarr");
    let loc = Location::Local(path.clone());
    let store = Store::create_or_open_with(&loc, spec(), options()).unwrap();
    for (part, seed) in [("good", 30u64), ("bad", 31)] {
        let mut w = store.part_writer(part, &format!("src-{part}")).unwrap();
        for i in 0..12 {
            w.push(record(&expected(seed, i))).unwrap();
        }
        w.commit().unwrap();
    }
    let report = verify(&loc).unwrap();
    assert!(report.ok(), "{report:?}");
    assert_eq!(report.parts_checked, 2);
    // 12 samples: emb/lat_f32 2 shards, lat_f16 1, strings 3 each, ids 1, len 1, orig 1.
    assert_eq!(report.shards_checked, 2 * (2 + 2 + 1 + 3 * 3 + 1 + 1 + 1));
    // 9 arrays x 12 samples, less the 3 empty captions (fill value: absent inner chunks).
    assert_eq!(report.chunks_checked, 2 * (12 * 9 - 3));

    // Truncate the first shard of `bad`'s bf16 embeddings.
    let shard = path.join("parts/bad/emb_bf16/c/0/0/0");
    let len = std::fs::metadata(&shard).unwrap().len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&shard)
        .unwrap();
    f.set_len(len - 37).unwrap();
    drop(f);
    // And flip one byte inside an inner chunk of `bad`'s lat_f32 shard 1.
    let shard2 = path.join("parts/bad/lat_f32/c/1/0/0/0");
    let mut bytes = std::fs::read(&shard2).unwrap();
    bytes[5] ^= 0x40;
    std::fs::write(&shard2, bytes).unwrap();

    let report = verify(&loc).unwrap();
    assert!(!report.ok());
    assert_eq!(report.damaged.len(), 1, "{report:?}");
    let damaged = &report.damaged[0];
    assert_eq!(
        (damaged.part.as_str(), damaged.source.as_str()),
        ("bad", "src-bad")
    );
    assert_eq!(damaged.problems.len(), 2, "{:?}", damaged.problems);
    assert!(
        damaged.problems[0].contains("parts/bad/emb_bf16/c/0/0/0"),
        "{:?}",
        damaged.problems
    );
    assert!(
        damaged.problems[1].contains("parts/bad/lat_f32/c/1/0/0/0")
            && damaged.problems[1].contains("checksum"),
        "{:?}",
        damaged.problems
    );

    // The reader never hands out damaged bytes: sample 0 of `bad` fails, `good` reads.
    let reader = StoreReader::open(&loc).unwrap();
    let parts = reader.parts();
    assert_eq!(parts[0].0, "bad");
    let err = reader.get(0).unwrap_err().to_string();
    assert!(err.contains("bad") && err.contains("emb_bf16"), "{err}");
    assert!(reader.get(12).is_ok());

    // A missing shard file is damage too.
    std::fs::remove_file(path.join("parts/good/key/c/2")).unwrap();
    let report = verify(&loc).unwrap();
    assert_eq!(report.damaged.len(), 2);
    assert!(
        report.damaged[1]
            .problems
            .iter()
            .any(|p| p.contains("parts/good/key/c/2") && p.contains("missing"))
    );
}
