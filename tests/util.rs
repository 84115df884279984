//! Helpers shared by the end-to-end tests.

use std::path::PathBuf;
use std::process::{Command, Output};

/// Runs the built `tensorbake` binary with `args` in `dir` and returns its output.
pub fn tensorbake(dir: &std::path::Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tensorbake"))
        .args(args)
        .current_dir(dir)
        .env("NO_COLOR", "1")
        .output()
        .expect("run tensorbake")
}

/// A fresh temporary directory for one test.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

/// The workspace root (for manifests/ and fixtures).
#[allow(dead_code)]
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every file of a store by path relative to it, as bytes. Part commit markers are
/// compared as JSON with the fields in `strip` removed from `tensorbake_part` (e.g.
/// `committed_at`, which differs between two runs that write the same data).
#[allow(dead_code)]
pub fn store_files(
    dir: &std::path::Path,
    strip: &[&str],
) -> std::collections::BTreeMap<String, Vec<u8>> {
    fn walk(
        root: &std::path::Path,
        dir: &std::path::Path,
        strip: &[&str],
        out: &mut std::collections::BTreeMap<String, Vec<u8>>,
    ) {
        for e in std::fs::read_dir(dir).expect("read store dir") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                walk(root, &p, strip, out);
                continue;
            }
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let mut bytes = std::fs::read(&p).expect("read store file");
            let is_marker = rel.starts_with("parts/")
                && rel.matches('/').count() == 2
                && rel.ends_with("/zarr.json");
            if is_marker && !strip.is_empty() {
                let mut v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
                if let Some(m) = v["attributes"]["tensorbake_part"].as_object_mut() {
                    for k in strip {
                        m.remove(*k);
                    }
                }
                bytes = serde_json::to_vec(&v).unwrap();
            }
            out.insert(rel, bytes);
        }
    }
    let mut out = std::collections::BTreeMap::new();
    walk(dir, dir, strip, &mut out);
    out
}

/// Asserts that two stores hold the same files (see [`store_files`]), naming the
/// files that differ instead of printing their bytes.
#[allow(dead_code)]
pub fn assert_same_store(a: &std::path::Path, b: &std::path::Path, strip: &[&str]) {
    let (fa, fb) = (store_files(a, strip), store_files(b, strip));
    let only_a: Vec<&String> = fa.keys().filter(|k| !fb.contains_key(*k)).collect();
    let only_b: Vec<&String> = fb.keys().filter(|k| !fa.contains_key(*k)).collect();
    let differ: Vec<&String> = fa
        .iter()
        .filter(|(k, v)| fb.get(*k).is_some_and(|w| w != *v))
        .map(|(k, _)| k)
        .collect();
    assert!(
        only_a.is_empty() && only_b.is_empty() && differ.is_empty(),
        "{} and {} differ:\n only in the first: {only_a:?}\n only in the second: {only_b:?}\n different bytes: {differ:?}",
        a.display(),
        b.display()
    );
}

/// A Python that can import diffusers: `$TENSORBAKE_PYTHON` (scripts/test.sh's venv) or
/// the reference environment, if any. With `TENSORBAKE_REQUIRE_PYTHON=1` (the test
/// command) a missing one is a failure, not a skip.
#[allow(dead_code)]
pub fn diffusers_python() -> Option<String> {
    let candidates = [
        std::env::var("TENSORBAKE_PYTHON").ok(),
        Some("/opt/refvenv/bin/python".to_string()),
    ];
    let found = candidates.into_iter().flatten().find(|p| {
        Command::new(p)
            .args(["-c", "import diffusers"])
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    assert!(
        found.is_some() || std::env::var("TENSORBAKE_REQUIRE_PYTHON").as_deref() != Ok("1"),
        "TENSORBAKE_REQUIRE_PYTHON=1 but no Python with diffusers (TENSORBAKE_PYTHON={:?})",
        std::env::var("TENSORBAKE_PYTHON").ok()
    );
    found
}

/// Rewrites the tar at `path` with member `name`'s bytes replaced by `bytes` (a
/// corrupt image, say); the other members keep their order and bytes.
#[allow(dead_code)]
pub fn replace_member(path: &std::path::Path, name: &str, bytes: &[u8]) {
    let tar = std::fs::read(path).expect("read tar");
    let mut a = tar::Archive::new(tar.as_slice());
    let members: Vec<(String, Vec<u8>)> = a
        .entries()
        .expect("tar entries")
        .map(|e| {
            let mut e = e.expect("tar entry");
            let member = e
                .path()
                .expect("member path")
                .to_string_lossy()
                .into_owned();
            let mut v = Vec::new();
            std::io::Read::read_to_end(&mut e, &mut v).expect("read member");
            if member == name {
                v = bytes.to_vec();
            }
            (member, v)
        })
        .collect();
    assert!(
        members.iter().any(|(m, _)| m == name),
        "{} has no member {name}",
        path.display()
    );
    tensorbake_kit::synth::write_tar(path, &members, false).expect("write tar");
}

/// The test Python (`TENSORBAKE_PYTHON`) with the scale-out packages importable:
/// when one of `modules` is missing, `scripts/requirements-deploy.txt` is installed
/// into it with pip. `None` (the test skips) only when no Python is configured and
/// `TENSORBAKE_REQUIRE_PYTHON` is not 1.
#[allow(dead_code)]
pub fn deploy_python(test: &str, modules: &[&str]) -> Option<PathBuf> {
    let Some(python) = std::env::var_os("TENSORBAKE_PYTHON").map(PathBuf::from) else {
        assert!(
            std::env::var("TENSORBAKE_REQUIRE_PYTHON").as_deref() != Ok("1"),
            "TENSORBAKE_PYTHON is not set but TENSORBAKE_REQUIRE_PYTHON=1"
        );
        eprintln!("SKIP {test}: TENSORBAKE_PYTHON is not set (scripts/test.sh sets it)");
        return None;
    };
    let import = format!("import {}", modules.join(", "));
    let have = |py: &std::path::Path| {
        Command::new(py)
            .args(["-c", &import])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !have(&python) {
        let o = Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "-q",
                "--disable-pip-version-check",
                "-r",
            ])
            .arg(root().join("scripts/requirements-deploy.txt"))
            .output()
            .expect("run pip");
        assert!(
            o.status.success() && have(&python),
            "installing scripts/requirements-deploy.txt into {} failed: {}",
            python.display(),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Some(python)
}
