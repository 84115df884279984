//! The resumable HTTP source against a loopback server with injected faults: every
//! faulty download must deliver exactly the bytes of the file.

use std::io::Read;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tensorbake_ingest::source::{Fetcher, NetworkConfig, SourceError};
use tensorbake_kit::http::{Fault, FileServer};

fn fixture() -> (tempfile::TempDir, Vec<u8>, FileServer) {
    let dir = tempfile::tempdir().unwrap();
    // 3 MB of varied bytes: many chunks, so cuts land mid-body.
    let data: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(dir.path().join("shard.tar"), &data).unwrap();
    let server = FileServer::start(dir.path()).unwrap();
    (dir, data, server)
}

fn fast() -> NetworkConfig {
    NetworkConfig {
        stall_timeout_s: 0.5,
        backoff_initial_s: 0.01,
        backoff_max_s: 2.0,
        ..NetworkConfig::default()
    }
}

fn read_all(f: &Fetcher, url: &str) -> Result<(Vec<u8>, u64, u64), std::io::Error> {
    let mut s = f.open(url).map_err(std::io::Error::other)?;
    let stats = s.stats();
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    Ok((
        out,
        stats.retries.load(Ordering::Relaxed),
        stats.resumes.load(Ordering::Relaxed),
    ))
}

#[test]
fn clean_download_is_byte_exact() {
    let (_d, data, server) = fixture();
    let f = Fetcher::new(fast()).unwrap();
    let (got, retries, _) = read_all(&f, &server.url("shard.tar")).unwrap();
    assert_eq!(got, data);
    assert_eq!(retries, 0);
    assert_eq!(server.stats().range_requests.load(Ordering::Relaxed), 0);
}

#[test]
fn cut_connections_resume_with_range_requests() {
    let (_d, data, server) = fixture();
    server.inject("shard.tar", Fault::CutAfter(700_001), 1);
    server.inject("shard.tar", Fault::CutAfter(1_000_003), 1);
    let f = Fetcher::new(fast()).unwrap();
    let (got, retries, resumes) = read_all(&f, &server.url("shard.tar")).unwrap();
    assert_eq!(got.len(), data.len());
    assert!(got == data, "resumed bytes differ from the file");
    assert_eq!((retries, resumes), (2, 2));
    assert_eq!(server.stats().range_requests.load(Ordering::Relaxed), 2);
}

#[test]
fn unavailable_and_rate_limited_are_retried() {
    let (_d, data, server) = fixture();
    server.inject("shard.tar", Fault::Unavailable { retry_after_s: 0 }, 2);
    server.inject("shard.tar", Fault::TooManyRequests { retry_after_s: 0 }, 1);
    let f = Fetcher::new(fast()).unwrap();
    let (got, retries, resumes) = read_all(&f, &server.url("shard.tar")).unwrap();
    assert!(got == data);
    assert_eq!((retries, resumes), (3, 0));
}

#[test]
fn a_stalled_stream_times_out_and_resumes() {
    let (_d, data, server) = fixture();
    server.inject(
        "shard.tar",
        Fault::StallAfter(1_500_000, Duration::from_secs(5)),
        1,
    );
    let f = Fetcher::new(fast()).unwrap();
    let (got, retries, resumes) = read_all(&f, &server.url("shard.tar")).unwrap();
    assert!(got == data);
    assert_eq!((retries, resumes), (1, 1));
}

#[test]
fn not_found_fails_at_open_and_persistent_errors_give_up() {
    let (_d, _data, server) = fixture();
    let f = Fetcher::new(fast()).unwrap();
    match f.open(&server.url("missing.tar")) {
        Err(SourceError::NotFound { url, status: 404 }) => assert!(url.ends_with("/missing.tar")),
        other => panic!("expected NotFound, got {:?}", other.map(|_| ())),
    }
    server.inject("shard.tar", Fault::Unavailable { retry_after_s: 0 }, 10);
    let f = Fetcher::new(NetworkConfig {
        max_retries: 2,
        ..fast()
    })
    .unwrap();
    let err = f.open(&server.url("shard.tar")).map(|_| ()).unwrap_err();
    assert!(
        matches!(
            err,
            SourceError::RetriesExhausted {
                attempts: 3,
                offset: 0,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("HTTP 503"), "{err}");
}

#[test]
fn a_body_that_keeps_dropping_surfaces_as_an_io_error_naming_the_url() {
    let (_d, _data, server) = fixture();
    // every response sends its headers and then closes before the first body byte
    server.inject("shard.tar", Fault::CutAfter(0), 4);
    let f = Fetcher::new(NetworkConfig {
        max_retries: 2,
        ..fast()
    })
    .unwrap();
    let err = read_all(&f, &server.url("shard.tar")).unwrap_err();
    let inner = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<SourceError>())
        .expect("a SourceError inside");
    assert!(
        matches!(
            inner,
            SourceError::RetriesExhausted {
                attempts: 3,
                offset: 0,
                ..
            }
        ),
        "{inner}"
    );
    assert!(inner.to_string().contains("shard.tar"), "{inner}");
}

#[test]
fn local_paths_and_file_urls() {
    let (d, data, _server) = fixture();
    let f = Fetcher::new(fast()).unwrap();
    let p = d.path().join("shard.tar");
    assert!(read_all(&f, p.to_str().unwrap()).unwrap().0 == data);
    assert!(read_all(&f, &format!("file://{}", p.display())).unwrap().0 == data);
    let err = f.open("/no/such/file.tar").map(|_| ()).unwrap_err();
    assert!(err.to_string().starts_with("/no/such/file.tar:"), "{err}");
    assert!(matches!(
        f.open("ftp://h/x.tar").map(|_| ()).unwrap_err(),
        SourceError::Unsupported { .. }
    ));
}

#[test]
fn probe_tells_reachable_missing_and_unreachable_apart() {
    let (dir, _data, server) = fixture();
    let f = Fetcher::new(fast()).unwrap();
    f.probe(&server.url("shard.tar")).unwrap();
    // a busy server passes: the stream itself waits 503s out
    server.inject("shard.tar", Fault::Unavailable { retry_after_s: 1 }, 1);
    f.probe(&server.url("shard.tar")).unwrap();
    // one byte asked for, not the whole shard
    let before = server.stats().bytes_sent.load(Ordering::Relaxed);
    f.probe(&server.url("shard.tar")).unwrap();
    // (the server thread may still be writing its byte when the probe returns)
    let sent = || server.stats().bytes_sent.load(Ordering::Relaxed) - before;
    for _ in 0..200 {
        if sent() > 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(sent(), 1);
    match f.probe(&server.url("missing.tar")) {
        Err(SourceError::NotFound { status: 404, url }) => assert!(url.ends_with("missing.tar")),
        other => panic!("{other:?}"),
    }
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{closed}/shard.tar");
    match f.probe(&url) {
        Err(SourceError::RetriesExhausted {
            attempts: 2, last, ..
        }) => {
            assert!(last.to_lowercase().contains("connect"), "{last}")
        }
        other => panic!("{other:?}"),
    }
    // local files: there or not
    let local = dir.path().join("shard.tar");
    f.probe(local.to_str().unwrap()).unwrap();
    f.probe(&format!("file://{}", local.display())).unwrap();
    assert!(matches!(
        f.probe(dir.path().join("nope.tar").to_str().unwrap()),
        Err(SourceError::File { .. })
    ));
    assert!(matches!(
        f.probe("ftp://host/x.tar"),
        Err(SourceError::Unsupported { .. })
    ));
}
