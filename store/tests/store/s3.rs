//! The S3 backend against moto's S3-compatible server on loopback.
//!
//! object_store reads endpoint and credentials from the environment, and a test may not
//! change its own environment while other tests run, so the round trip runs in a child
//! process of this test binary with the AWS variables set.

use std::io::BufRead;
use std::process::{Child, Command, Stdio};

use tensorbake_store::{Location, Store, StoreError, StoreReader, verify};

use crate::common::{self, expected, options, record, spec};

const CHILD_ENV: &str = "TENSORBAKE_STORE_TEST_S3";

/// moto on a free loopback port; killed on drop.
struct Moto {
    child: Child,
    port: u16,
}

impl Moto {
    fn start(python: &std::path::Path, bucket: &str) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut child = Command::new(python)
            .arg(common::python_dir().join("moto_s3.py"))
            .arg(port.to_string())
            .arg(bucket)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start moto");
        let stdout = child.stdout.take().unwrap();
        let mut lines = std::io::BufReader::new(stdout).lines();
        assert!(
            lines.any(|l| l.map(|l| l.contains("ready")).unwrap_or(false)),
            "moto did not start"
        );
        Self { child, port }
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Child role: the whole round trip against the S3 location in `$TENSORBAKE_STORE_TEST_S3`.
#[test]
fn child_s3_round_trip() {
    let Ok(url) = std::env::var(CHILD_ENV) else {
        return;
    };
    let loc: Location = url.parse().unwrap();
    let store = Store::create_or_open_with(&loc, spec(), options()).unwrap();
    // A part left uncommitted, then a committed one, then the uncommitted one redone.
    {
        let mut w = store.part_writer("p1", "src-1").unwrap();
        for i in 0..11 {
            w.push(record(&expected(61, i))).unwrap();
        }
    }
    let mut w = store.part_writer("p0", "src-0").unwrap();
    for i in 0..13 {
        w.push(record(&expected(60, i))).unwrap();
    }
    w.commit().unwrap();
    let reader = StoreReader::open(&loc).unwrap();
    assert_eq!(reader.len(), 13);
    assert_eq!(reader.uncommitted_parts(), ["p1"]);
    let mut w = store.part_writer("p1", "src-1").unwrap();
    for i in 0..6 {
        w.push(record(&expected(61, 100 + i))).unwrap();
    }
    w.commit().unwrap();
    assert_eq!(store.committed_parts().unwrap().len(), 2);
    assert!(matches!(
        store.part_writer("p0", "src-0"),
        Err(StoreError::PartCommitted { .. })
    ));

    let reader = StoreReader::open(&loc).unwrap();
    assert_eq!(reader.len(), 19);
    for i in 0..19u64 {
        let e = if i < 13 {
            expected(60, i)
        } else {
            expected(61, 100 + i - 13)
        };
        let s = reader.get(i).unwrap();
        assert_eq!(
            (s.key.as_str(), s.caption.as_str(), s.orig_size),
            (e.key.as_str(), e.caption.as_str(), e.orig_size)
        );
        for (name, bytes) in &e.features {
            assert_eq!(
                &common::tensor_bytes(name, &s.features[name]),
                bytes,
                "{name}"
            );
        }
    }
    let report = verify(&loc).unwrap();
    assert!(report.ok(), "{report:?}");
    assert_eq!(report.parts_checked, 2);

    let mut other = spec();
    other.resolution = Some(1);
    assert!(
        matches!(Store::create_or_open(&loc, other), Err(StoreError::SpecMismatch { field, .. }) if field == "resolution")
    );
    println!("S3 ROUND TRIP OK");
}

#[test]
fn s3_backend_round_trips_against_moto() {
    let Some(python) = common::python("s3_backend_round_trips_against_moto") else {
        return;
    };
    let moto = Moto::start(&python, "tensorbake-test");
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "s3::child_s3_round_trip",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "s3://tensorbake-test/stores/run1.zarr")
        .env(
            "AWS_ENDPOINT_URL",
            format!("http://127.0.0.1:{}", moto.port),
        )
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ALLOW_HTTP", "true")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("S3 ROUND TRIP OK"),
        "child failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
