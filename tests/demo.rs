//! `tensorbake demo` end to end, and its manifest run again offline.

use crate::util::{tempdir, tensorbake};

#[test]
fn demo_runs_and_leaves_a_manifest_that_runs_offline() {
    let dir = tempdir();
    let out = dir.path().join("demo");
    let o = out.to_str().unwrap();
    let run = tensorbake(
        dir.path(),
        &[
            "demo",
            "--out",
            o,
            "--shards",
            "2",
            "--images-per-shard",
            "3",
            "--resolution",
            "64",
        ],
    );
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(stdout.contains("samples kept         6 of 6"), "{stdout}");
    assert!(out.join("shards/sa_000000.tar").is_file() && out.join("manifest.toml").is_file());
    let again = tensorbake(
        dir.path(),
        &[
            "ingest",
            out.join("manifest.toml").to_str().unwrap(),
            "--list",
        ],
    );
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    let listed = String::from_utf8_lossy(&again.stdout);
    assert_eq!(listed.lines().count(), 6, "{listed}");
    assert!(
        listed.lines().all(|l| l.contains("\"caption\":\"")),
        "{listed}"
    );
}
