//! `tensorbake run --metrics ADDR --metrics-file PATH`: the Prometheus endpoint
//! scraped while a run goes, its final numbers against the run's report, the file
//! written beside it, and addresses or paths that must fail before anything is written.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tensorbake_kit::http::Fault;

use crate::run::{ok, served_job};
use crate::util::{replace_member, tempdir, tensorbake};

/// Prometheus text -> `series` (name and labels as written) -> value; every sample
/// line must follow a `# TYPE` line of its family.
pub(crate) fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    let mut typed = std::collections::BTreeSet::new();
    let mut out = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            typed.insert(rest.split(' ').next().unwrap().to_string());
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("not a sample line: {line}"));
        let name = series.split('{').next().unwrap();
        assert!(typed.contains(name), "{name} has no # TYPE line:\n{text}");
        let v = value
            .parse::<f64>()
            .unwrap_or_else(|_| panic!("bad value in {line}"));
        assert!(out.insert(series.to_string(), v).is_none(), "twice: {line}");
    }
    out
}

/// `GET /metrics` on `addr`; `None` when nothing answers.
fn scrape(addr: &str) -> Option<String> {
    let mut c = TcpStream::connect(addr).ok()?;
    c.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")
        .ok()?;
    let mut s = String::new();
    c.read_to_string(&mut s).ok()?;
    assert!(s.starts_with("HTTP/1.1 200 OK\r\n"), "{s}");
    Some(s.split_once("\r\n\r\n")?.1.to_string())
}

/// The value of `name` with `labels` after the run's own `run="test",rank="0"`.
fn value(m: &BTreeMap<String, f64>, name: &str, labels: &str) -> f64 {
    let sep = if labels.is_empty() { "" } else { "," };
    let key = format!("{name}{{run=\"test\",rank=\"0\"{sep}{labels}}}");
    *m.get(&key)
        .unwrap_or_else(|| panic!("{key} not in the metrics: {m:#?}"))
}

#[test]
fn metrics_are_live_during_a_run_and_end_equal_to_the_report() {
    let dir = tempdir();
    // shards go one at a time; shard 1 is cut short (fails), shard 2 has a sample
    // that is not an image (skipped), shard 3 stalls for 3 s halfway: the scrapes
    // during the stall see a run part done
    let extra = "[ingest]\nshards_in_flight = 1\n[network]\nstall_timeout_s = 30\n\
                 [run]\npreflight = false\n";
    let (manifest, layout, server) = served_job(dir.path(), 5, 4, extra);
    let whole = std::fs::read(&layout.shards[1]).unwrap();
    std::fs::write(&layout.shards[1], &whole[..whole.len() / 2]).unwrap();
    let bad_key = &layout.keys[2][0];
    replace_member(&layout.shards[2], &format!("{bad_key}.jpg"), b"not a jpeg");
    let half = std::fs::metadata(&layout.shards[3]).unwrap().len() / 2;
    server.inject(
        "shard-000003.tar",
        Fault::StallAfter(half, Duration::from_secs(3)),
        1,
    );

    let file = dir.path().join("metrics/run.prom");
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tensorbake"))
        .args([
            "run",
            manifest.to_str().unwrap(),
            "--metrics",
            "127.0.0.1:0",
            "--metrics-file",
            file.to_str().unwrap(),
            "--metrics-hold",
            "3",
            "--progress-interval",
            "0.2",
        ])
        .current_dir(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    let log = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stderr).lines() {
            let line = line.unwrap();
            if let Some(rest) = line.strip_prefix("run: metrics on http://") {
                tx.send(rest.trim_end_matches("/metrics").to_string())
                    .unwrap();
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("no `run: metrics on` line on stderr");

    // scrape until the run says it is finished (the hold keeps the endpoint up)
    let mut scrapes: Vec<BTreeMap<String, f64>> = Vec::new();
    let mut files_during_run = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        assert!(Instant::now() < deadline, "the run never finished");
        if let Some(text) = scrape(&addr) {
            let m = parse_metrics(&text);
            let finished = value(&m, "tensorbake_run_finished", "") == 1.0;
            scrapes.push(m);
            if finished {
                break;
            }
            if let Ok(t) = std::fs::read_to_string(&file)
                && value(&parse_metrics(&t), "tensorbake_run_finished", "") == 0.0
            {
                files_during_run += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let stderr = log.join().unwrap();
    let o = std::process::Output {
        stderr: stderr.into_bytes(),
        ..out
    };
    // exit 1: shard 1 failed
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["shards"]["committed"], 4, "{report:#}");
    assert_eq!(report["shards"]["failed"], 1);

    // during the run: some shards committed, not all, and counters never go down
    let mid = scrapes.iter().find(|m| {
        let c = value(m, "tensorbake_shards_committed_total", "");
        (1.0..4.0).contains(&c) && value(m, "tensorbake_run_finished", "") == 0.0
    });
    assert!(
        mid.is_some(),
        "no scrape saw the run part done ({} scrapes)",
        scrapes.len()
    );
    assert!(
        files_during_run >= 1,
        "the metrics file was not written during the run"
    );
    for pair in scrapes.windows(2) {
        for (k, v) in &pair[0] {
            if k.contains("_total{") {
                assert!(pair[1][k] >= *v, "{k} went down: {v} -> {}", pair[1][k]);
            }
        }
    }

    // the last scrape holds exactly the report's numbers
    let fin = scrapes.last().unwrap();
    let n = |v: &serde_json::Value| v.as_f64().unwrap();
    let s = &report["shards"];
    assert_eq!(value(fin, "tensorbake_shards_todo", ""), n(&s["todo"]));
    assert_eq!(
        value(fin, "tensorbake_shards_committed_total", ""),
        n(&s["committed"])
    );
    assert_eq!(
        value(fin, "tensorbake_shards_failed_total", ""),
        n(&s["failed"])
    );
    assert_eq!(value(fin, "tensorbake_shards_read_total", ""), 5.0);
    let samples = &report["samples"];
    assert_eq!(
        value(fin, "tensorbake_samples_read_total", ""),
        n(&samples["read"])
    );
    assert_eq!(
        value(fin, "tensorbake_samples_encoded_total", ""),
        n(&samples["encoded"])
    );
    assert_eq!(
        value(fin, "tensorbake_samples_written_total", ""),
        n(&samples["written"])
    );
    let in_parts: f64 = report["committed_parts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| n(&p["samples"]))
        .sum();
    assert_eq!(in_parts, 15.0, "{report:#}"); // shards 0, 2 (one skipped), 3, 4
    let skipped = samples["skipped"].as_object().unwrap();
    assert_eq!(skipped["unrecognized_format"], 1, "{report:#}");
    for (reason, count) in skipped {
        assert_eq!(
            value(
                fin,
                "tensorbake_samples_skipped_total",
                &format!("reason=\"{reason}\"")
            ),
            n(count),
            "{reason}"
        );
    }
    let skip_series = fin
        .keys()
        .filter(|k| k.starts_with("tensorbake_samples_skipped_total{"))
        .count();
    assert_eq!(skip_series, skipped.len());
    assert_eq!(
        value(fin, "tensorbake_bytes_read_total", ""),
        n(&report["bytes"])
    );
    assert_eq!(
        value(fin, "tensorbake_retries_total", ""),
        n(&report["retries"])
    );
    assert!(
        n(&report["retries"]) >= 1.0,
        "the stall made a retry: {report:#}"
    );
    let stages = &report["stages"];
    for stage in ["prepare", "encode", "write"] {
        let l = format!("stage=\"{stage}\"");
        assert_eq!(
            value(fin, "tensorbake_stage_busy_seconds_total", &l),
            n(&stages[stage]["busy_s"]),
            "{stage}"
        );
        assert_eq!(
            value(fin, "tensorbake_stage_wait_seconds_total", &l),
            n(&stages[stage]["wait_s"]),
            "{stage}"
        );
    }
    assert!(n(&stages["encode"]["busy_s"]) > 0.0);
    assert_eq!(
        value(
            fin,
            "tensorbake_stage_blocked_seconds_total",
            "stage=\"ingest\""
        ),
        n(&stages["ingest"]["blocked_s"])
    );
    for enc in ["sd_vae", "siglip", "t5"] {
        let l = format!("encoder=\"{enc}\"");
        let e = &stages["encoders"][enc];
        assert_eq!(
            value(fin, "tensorbake_encoder_samples_total", &l),
            n(&e["samples"])
        );
        assert!(value(fin, "tensorbake_encoder_samples_total", &l) >= 15.0);
        assert_eq!(
            value(fin, "tensorbake_encoder_busy_seconds_total", &l),
            n(&e["busy_s"])
        );
        assert_eq!(
            value(fin, "tensorbake_encoder_samples_per_second", &l),
            n(&e["samples_per_s"])
        );
    }
    // everything drained; the high-water mark is the report's
    for q in ["encode", "write"] {
        assert_eq!(
            value(fin, "tensorbake_queue_depth", &format!("queue=\"{q}\"")),
            0.0
        );
    }
    assert_eq!(
        value(fin, "tensorbake_queue_capacity", "queue=\"encode\""),
        n(&report["queues"]["encode_queue"])
    );
    assert_eq!(value(fin, "tensorbake_samples_in_flight", ""), 0.0);
    assert_eq!(
        value(fin, "tensorbake_samples_in_flight_high", ""),
        n(&report["queues"]["in_flight_high"])
    );
    let info = format!(
        "world=\"1\",store=\"{}\",rank_from=\"default\"",
        report["store"].as_str().unwrap()
    );
    assert_eq!(value(fin, "tensorbake_run_info", &info), 1.0);

    // the file holds the same final numbers (all but the clock), and no temp file
    let in_file = parse_metrics(&std::fs::read_to_string(&file).unwrap());
    let clock = "tensorbake_run_elapsed_seconds";
    let strip = |m: &BTreeMap<String, f64>| -> BTreeMap<String, f64> {
        m.iter()
            .filter(|(k, _)| !k.starts_with(clock))
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    };
    assert_eq!(strip(&in_file), strip(fin));
    let leftovers: Vec<_> = std::fs::read_dir(file.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers, ["run.prom"]);
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(
        log.contains("run: serving the final metrics for 3 s"),
        "{log}"
    );
    // after the hold the endpoint is gone with the process
    assert!(scrape(&addr).is_none());
}

/// `tensorbake run` with `args` fails with one `error:` line holding every needle,
/// and writes no store.
fn refused(dir: &Path, manifest: &Path, args: &[&str], needles: &[&str]) {
    let mut all = vec!["run", manifest.to_str().unwrap()];
    all.extend_from_slice(args);
    let o = tensorbake(dir, &all);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line expected:\n{stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    for n in needles {
        assert!(stderr.contains(n), "`{n}` not in: {stderr}");
    }
    assert!(o.stdout.is_empty());
    assert!(!dir.join("store").exists(), "a store was written: {stderr}");
}

#[test]
fn a_bad_metrics_address_or_file_fails_before_anything_is_written() {
    let dir = tempdir();
    let (manifest, _) = crate::run::job(dir.path(), 1, 2, &crate::run::brace(1), "");
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = held.local_addr().unwrap().to_string();
    refused(
        dir.path(),
        &manifest,
        &["--metrics", &taken],
        &["--metrics", &taken, "cannot listen"],
    );
    refused(
        dir.path(),
        &manifest,
        &["--metrics", "port-nine"],
        &["--metrics", "port-nine", "not a HOST:PORT address"],
    );
    let nowhere = dir.path().join("no/such/dir/run.prom");
    refused(
        dir.path(),
        &manifest,
        &["--metrics-file", nowhere.to_str().unwrap()],
        &[
            "--metrics-file",
            nowhere.to_str().unwrap(),
            "cannot write there",
        ],
    );
    refused(
        dir.path(),
        &manifest,
        &["--metrics", "127.0.0.1:0", "--metrics-hold=-1"],
        &["--metrics-hold", "not a number of seconds"],
    );
    // and a good run with a file only (no endpoint) writes it once at the end
    let file = dir.path().join("final.prom");
    let report = ok(&tensorbake(
        dir.path(),
        &[
            "run",
            manifest.to_str().unwrap(),
            "--metrics-file",
            file.to_str().unwrap(),
        ],
    ));
    let m = parse_metrics(&std::fs::read_to_string(&file).unwrap());
    assert_eq!(value(&m, "tensorbake_run_finished", ""), 1.0);
    assert_eq!(
        value(&m, "tensorbake_samples_written_total", ""),
        report["samples"]["written"].as_f64().unwrap()
    );
    assert_eq!(value(&m, "tensorbake_samples_written_total", ""), 2.0);
}
