//! `tensorbake captions clean` and `tensorbake captions index` / `get`, end to end.

use std::io::Write;
use std::process::{Command, Stdio};

use crate::util::{root, tempdir, tensorbake};

fn clean_via_cli(input: &[u8], args: &[&str]) -> (String, String, bool) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tensorbake"))
        .args(["captions", "clean"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tensorbake");
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input).unwrap());
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    (
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
        out.status.success(),
    )
}

#[test]
fn clean_reproduces_the_golden_file() {
    let dir = root().join("ingest/tests/fixtures/captions");
    let corpus = std::fs::read(dir.join("corpus.jsonl")).unwrap();
    let expected = std::fs::read_to_string(dir.join("expected.jsonl")).unwrap();
    let (stdout, stderr, ok) = clean_via_cli(&corpus, &[]);
    assert!(ok, "{stderr}");
    let got: Vec<&str> = stdout.lines().collect();
    let want: Vec<&str> = expected.lines().collect();
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        let g: String = serde_json::from_str(g).unwrap();
        let w: String = serde_json::from_str(w).unwrap();
        assert_eq!(g, w, "line {}", i + 1);
    }
    assert!(stderr.contains("ok="), "{stderr}");
}

#[test]
fn clean_counts_bad_lines_and_keeps_alignment() {
    let big = format!("{:?}\n", "x".repeat(1 << 20));
    let input = format!(
        "{}\n{}\nnot json\n{}\n{}{}\n",
        serde_json::to_string("The image shows a <b>red</b> bike &amp; a dog.").unwrap(),
        serde_json::to_string("").unwrap(),
        serde_json::to_string("a\u{0}b").unwrap(),
        big,
        serde_json::to_string("In this image, we can see two cats.").unwrap(),
    );
    let (stdout, stderr, ok) = clean_via_cli(input.as_bytes(), &["--strip-boilerplate"]);
    assert!(ok, "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines,
        [
            r#""a red bike a dog.""#,
            r#""""#,
            "null",
            "null",
            "null",
            r#""two cats.""#
        ]
    );
    for part in [
        "ok=2",
        "caption_empty=1",
        "invalid_json=1",
        "caption_nul=1",
        "caption_too_long=1",
    ] {
        assert!(stderr.contains(part), "{part} missing from {stderr}");
    }
}

/// Writes a plain (uncompressed) tar of `n` SA-1B-style captions with hand-made
/// ustar headers (the binary's tests do not depend on the tar crate).
fn write_caption_tar(path: &std::path::Path, n: usize) {
    let mut tar = TarWriter {
        file: std::fs::File::create(path).unwrap(),
    };
    tar.finish_with(n);
}

struct TarWriter {
    file: std::fs::File,
}

impl TarWriter {
    fn entry(&mut self, name: &str, body: &[u8]) {
        let mut h = [0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        h[100..108].copy_from_slice(b"0000644\0");
        h[108..116].copy_from_slice(b"0000000\0");
        h[116..124].copy_from_slice(b"0000000\0");
        h[124..136].copy_from_slice(format!("{:011o}\0", body.len()).as_bytes());
        h[136..148].copy_from_slice(b"00000000000\0");
        h[156] = b'0';
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        self.file.write_all(&h).unwrap();
        self.file.write_all(body).unwrap();
        let pad = (512 - body.len() % 512) % 512;
        self.file.write_all(&vec![0u8; pad]).unwrap();
    }

    fn finish_with(&mut self, n: usize) {
        for i in 0..n {
            self.entry(
                &format!("sa_{}.txt", i + 1),
                format!("caption number {i} of a dog").as_bytes(),
            );
        }
        self.file.write_all(&[0u8; 1024]).unwrap();
    }
}

#[test]
fn index_then_get() {
    let dir = tempdir();
    let tar = dir.path().join("SA1B_caption.tar");
    write_caption_tar(&tar, 250);
    let db = dir.path().join("captions.redb");
    let out = tensorbake(
        dir.path(),
        &[
            "captions",
            "index",
            tar.to_str().unwrap(),
            "--db",
            db.to_str().unwrap(),
            "--commit-every",
            "100",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("250 captions"), "{stderr}");

    // Again: already complete.
    let out = tensorbake(
        dir.path(),
        &[
            "captions",
            "index",
            &format!("file://{}", tar.display()),
            "--db",
            db.to_str().unwrap(),
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("already complete"), "{stderr}");

    let out = tensorbake(
        dir.path(),
        &[
            "captions",
            "get",
            "--db",
            db.to_str().unwrap(),
            "sa_1",
            "sa_250",
            "sa_999",
        ],
    );
    assert_eq!(out.status.code(), Some(3), "a missing id exits 3");
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        [
            r#""caption number 0 of a dog""#,
            r#""caption number 249 of a dog""#,
            "null"
        ]
    );
}

#[test]
fn index_errors_name_the_source() {
    let dir = tempdir();
    let db = dir.path().join("c.redb");
    let out = tensorbake(
        dir.path(),
        &[
            "captions",
            "index",
            "missing.tar.gz",
            "--db",
            db.to_str().unwrap(),
        ],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.tar.gz"));
    // over HTTP: a missing caption tar fails at once (404) and names the URL
    let server = tensorbake_kit::http::FileServer::start(dir.path()).unwrap();
    let url = server.url("SA1B_caption.tar.gz");
    let out = tensorbake(
        dir.path(),
        &["captions", "index", &url, "--db", db.to_str().unwrap()],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&url) && err.contains("404"), "{err}");
    assert!(
        !db.exists(),
        "nothing written for a source that cannot be read"
    );
}
