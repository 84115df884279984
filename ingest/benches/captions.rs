//! Caption benchmarks: captions cleaned per second (the golden corpus), captions
//! indexed per second (a synthetic SA-1B caption tar.gz), lookups per second.
//!
//! `cargo bench -p tensorbake-ingest --bench captions`

#![allow(missing_docs)] // criterion's macros generate undocumented items

use std::hint::black_box;
use std::io::Write;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tensorbake_ingest::caption::CleanConfig;
use tensorbake_ingest::caption::index::{BuildOptions, CaptionIndex, build_index};

fn corpus() -> Vec<String> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/captions/corpus.jsonl"
    );
    std::fs::read_to_string(path)
        .expect("golden corpus")
        .lines()
        .map(|l| serde_json::from_str::<String>(l).expect("JSON string"))
        .collect()
}

/// A gzip'd tar of `n` captions named like SA-1B's (`sa_<id>.txt`).
fn caption_tar_gz(n: usize) -> Vec<u8> {
    let corpus = corpus();
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    for i in 0..n {
        let text = corpus[i % corpus.len()].as_bytes();
        let mut header = tar::Header::new_gnu();
        header.set_size(text.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        tar.append_data(&mut header, format!("sa_{}.txt", i + 1), text)
            .expect("append");
    }
    let mut gz = tar.into_inner().expect("tar");
    gz.flush().expect("flush");
    gz.finish().expect("gzip")
}

fn bench(c: &mut Criterion) {
    let corpus = corpus();
    let cleaner = CleanConfig::default().build();
    let mut g = c.benchmark_group("captions");
    g.sample_size(10);
    g.throughput(Throughput::Elements(corpus.len() as u64));
    g.bench_function("clean_corpus", |b| {
        b.iter(|| {
            for s in &corpus {
                black_box(cleaner.clean(s));
            }
        });
    });

    let n = 200_000;
    let tgz = caption_tar_gz(n);
    g.throughput(Throughput::Elements(n as u64));
    g.bench_function("index_build", |b| {
        b.iter_with_setup(
            || tempfile::tempdir().expect("tempdir"),
            |dir| {
                let db = dir.path().join("captions.redb");
                build_index(&db, &tgz[..], &BuildOptions::new("bench.tar.gz"), |_| {})
                    .expect("build");
            },
        );
    });

    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("captions.redb");
    build_index(&db, &tgz[..], &BuildOptions::new("bench.tar.gz"), |_| {}).expect("build");
    let index = CaptionIndex::open(&db).expect("open");
    let ids: Vec<String> = (0..100_000)
        .map(|i| format!("sa_{}", (i * 7919) % n + 1))
        .collect();
    g.throughput(Throughput::Elements(ids.len() as u64));
    g.bench_function("lookup", |b| {
        b.iter(|| {
            for id in &ids {
                black_box(index.get(id).expect("get").expect("present"));
            }
        });
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
