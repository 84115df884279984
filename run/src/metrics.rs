//! The run's counters as Prometheus text (exposition format 0.0.4), and a small HTTP
//! endpoint that serves them (`tensorbake run --metrics ADDR`).
//!
//! The numbers are the run's [`RunStats`], the same counters the progress lines and
//! the final [`RunReport`](crate::RunReport) read, so a scrape taken after the run
//! finished shows exactly the report's counts. Every series carries the labels `run`
//! (the job's name) and `rank`, so the files of many workers can be collected side by
//! side (node_exporter's textfile collector, a Pushgateway) without clashing.
//!
//! | metric | type | what |
//! |---|---|---|
//! | `tensorbake_run_info{world,store,rank_from}` | gauge | 1, the run's identity |
//! | `tensorbake_run_finished` | gauge | 1 once every stage is done |
//! | `tensorbake_run_elapsed_seconds` | gauge | seconds since the run started |
//! | `tensorbake_shards_todo` | gauge | this run's shards to do |
//! | `tensorbake_shards_read_total` | counter | shards read to their end (or failure) |
//! | `tensorbake_shards_committed_total` | counter | parts committed (shards done) |
//! | `tensorbake_shards_failed_total` | counter | shards failed, not committed |
//! | `tensorbake_samples_read_total` | counter | samples decoded and kept (in) |
//! | `tensorbake_samples_encoded_total` | counter | samples through the encoders |
//! | `tensorbake_samples_written_total` | counter | samples written into parts (out) |
//! | `tensorbake_samples_skipped_total{reason}` | counter | samples skipped, by reason |
//! | `tensorbake_samples_in_flight` / `_high` | gauge | decoded, not yet written (now / most) |
//! | `tensorbake_bytes_read_total` | counter | bytes read from the sources |
//! | `tensorbake_retries_total` | counter | requests after the first (resumes, retries) |
//! | `tensorbake_stage_busy_seconds_total{stage}` | counter | `prepare`, `encode`, `write`: working |
//! | `tensorbake_stage_wait_seconds_total{stage}` | counter | `prepare`, `encode`, `write`: waiting for input |
//! | `tensorbake_stage_blocked_seconds_total{stage="ingest"}` | counter | decode threads blocked on a full encode queue |
//! | `tensorbake_queue_depth{queue}` / `tensorbake_queue_capacity{queue}` | gauge | `encode` (messages), `write` (batches) |
//! | `tensorbake_encoder_samples_total{encoder}` | counter | samples through each encoder |
//! | `tensorbake_encoder_busy_seconds_total{encoder}` | counter | host seconds running each encoder's model |
//! | `tensorbake_encoder_prepare_seconds_total{encoder}` | counter | host seconds preparing each encoder's inputs |
//! | `tensorbake_encoder_gpu_seconds_total{encoder}` | counter | device seconds of each encoder (on a GPU only) |
//! | `tensorbake_host_to_device_bytes_total` | counter | model input bytes uploaded to a GPU |
//! | `tensorbake_encoder_samples_per_second{encoder}` | gauge | samples per busy second |

use std::fmt::Write as _;
use std::io::{self, BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::Run;
use crate::stats::RunStats;

/// The identity of a run, as labels.
#[derive(Debug, Clone)]
pub struct RunLabels {
    /// The job's name.
    pub run: String,
    /// This worker's rank.
    pub rank: usize,
    /// Workers in all.
    pub world: usize,
    /// The store written.
    pub store: String,
    /// Where rank and world came from.
    pub rank_from: String,
    /// Capacity of the encode queue (messages).
    pub encode_queue: usize,
    /// Capacity of the write queues (batches, all writers together).
    pub write_queue: usize,
}

/// A label value, escaped as the exposition format wants it.
fn esc(v: &str) -> String {
    v.replace('\\', r"\\")
        .replace('"', "\\\"")
        .replace('\n', r"\n")
}

/// Writes Prometheus text for `stats`.
pub fn render(labels: &RunLabels, stats: &RunStats) -> String {
    let s = stats.snapshot();
    let base = format!("run=\"{}\",rank=\"{}\"", esc(&labels.run), labels.rank);
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, rows: &[(String, String)]| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (extra, value) in rows {
            let sep = if extra.is_empty() { "" } else { "," };
            let _ = writeln!(out, "{name}{{{base}{sep}{extra}}} {value}");
        }
    };
    let one = |v: String| vec![(String::new(), v)];
    family(
        "tensorbake_run_info",
        "gauge",
        "The run: world size, store, where the rank came from.",
        &[(
            format!(
                "world=\"{}\",store=\"{}\",rank_from=\"{}\"",
                labels.world,
                esc(&labels.store),
                esc(&labels.rank_from)
            ),
            "1".into(),
        )],
    );
    family(
        "tensorbake_run_finished",
        "gauge",
        "1 once every stage of the run is done.",
        &one(u8::from(s.finished).to_string()),
    );
    family(
        "tensorbake_run_elapsed_seconds",
        "gauge",
        "Seconds since the run started.",
        &one(s.elapsed_s.to_string()),
    );
    let counters: [(&str, &str, &str, u64); 9] = [
        (
            "tensorbake_shards_todo",
            "gauge",
            "Shards this run has to do.",
            s.shards_todo,
        ),
        (
            "tensorbake_shards_read_total",
            "counter",
            "Shards read to their end or failure.",
            s.shards_read,
        ),
        (
            "tensorbake_shards_committed_total",
            "counter",
            "Parts committed (shards done).",
            s.shards_committed,
        ),
        (
            "tensorbake_shards_failed_total",
            "counter",
            "Shards that failed and were not committed.",
            s.shards_failed,
        ),
        (
            "tensorbake_samples_read_total",
            "counter",
            "Samples decoded and kept by the ingest stage.",
            s.samples_read,
        ),
        (
            "tensorbake_samples_encoded_total",
            "counter",
            "Samples through the encoders.",
            s.samples_encoded,
        ),
        (
            "tensorbake_samples_written_total",
            "counter",
            "Samples written into parts.",
            s.samples_written,
        ),
        (
            "tensorbake_bytes_read_total",
            "counter",
            "Bytes read from the sources.",
            s.bytes,
        ),
        (
            "tensorbake_retries_total",
            "counter",
            "Requests after the first (resumes and retries).",
            s.retries,
        ),
    ];
    for (name, kind, help, v) in counters {
        family(name, kind, help, &one(v.to_string()));
    }
    let skipped: Vec<(String, String)> = stats
        .skipped_by_reason()
        .into_iter()
        .map(|(r, n)| (format!("reason=\"{}\"", esc(&r)), n.to_string()))
        .collect();
    family(
        "tensorbake_samples_skipped_total",
        "counter",
        "Samples skipped by the ingest stage, by reason.",
        &skipped,
    );
    family(
        "tensorbake_samples_in_flight",
        "gauge",
        "Samples decoded and not yet written or dropped.",
        &one(s.in_flight.to_string()),
    );
    family(
        "tensorbake_samples_in_flight_high",
        "gauge",
        "The most samples in flight at once so far.",
        &one(s.in_flight_high.to_string()),
    );
    let (pre, enc, wr) = (
        stats.prepare_time(),
        stats.encode_time(),
        stats.write.time(),
    );
    family(
        "tensorbake_stage_busy_seconds_total",
        "counter",
        "Seconds a stage spent working, all its threads together.",
        &[
            ("stage=\"prepare\"".into(), pre.busy_s.to_string()),
            ("stage=\"encode\"".into(), enc.busy_s.to_string()),
            ("stage=\"write\"".into(), wr.busy_s.to_string()),
        ],
    );
    family(
        "tensorbake_stage_wait_seconds_total",
        "counter",
        "Seconds a stage spent waiting for input, all its threads together.",
        &[
            ("stage=\"prepare\"".into(), pre.wait_s.to_string()),
            ("stage=\"encode\"".into(), enc.wait_s.to_string()),
            ("stage=\"write\"".into(), wr.wait_s.to_string()),
        ],
    );
    family(
        "tensorbake_stage_blocked_seconds_total",
        "counter",
        "Seconds the decode threads spent blocked on a full encode queue, together.",
        &[("stage=\"ingest\"".into(), s.ingest_blocked_s.to_string())],
    );
    family(
        "tensorbake_queue_depth",
        "gauge",
        "Messages waiting in a queue: encode (samples and shard ends), write (batches).",
        &[
            ("queue=\"encode\"".into(), s.encode_queue.to_string()),
            ("queue=\"write\"".into(), s.write_queue.to_string()),
        ],
    );
    family(
        "tensorbake_queue_capacity",
        "gauge",
        "The most messages a queue holds.",
        &[
            ("queue=\"encode\"".into(), labels.encode_queue.to_string()),
            ("queue=\"write\"".into(), labels.write_queue.to_string()),
        ],
    );
    let encoders = stats.encoder_times();
    let per = |f: &dyn Fn(&crate::EncoderTime) -> String| -> Vec<(String, String)> {
        encoders
            .iter()
            .map(|(n, t)| (format!("encoder=\"{}\"", esc(n)), f(t)))
            .collect()
    };
    family(
        "tensorbake_encoder_samples_total",
        "counter",
        "Samples through each encoder.",
        &per(&|t| t.samples.to_string()),
    );
    family(
        "tensorbake_encoder_busy_seconds_total",
        "counter",
        "Host seconds running each encoder's model and output cast (on a GPU: queueing the work).",
        &per(&|t| t.busy_s.to_string()),
    );
    family(
        "tensorbake_encoder_prepare_seconds_total",
        "counter",
        "Host seconds preparing each encoder's inputs (preprocessing or tokenizing, upload).",
        &per(&|t| t.prepare_s.to_string()),
    );
    let gpu: Vec<(String, String)> = encoders
        .iter()
        .filter_map(|(n, t)| Some((format!("encoder=\"{}\"", esc(n)), t.gpu_s?.to_string())))
        .collect();
    if !gpu.is_empty() {
        family(
            "tensorbake_encoder_gpu_seconds_total",
            "counter",
            "Device seconds of each encoder's work on the GPU (CUDA events).",
            &gpu,
        );
    }
    family(
        "tensorbake_host_to_device_bytes_total",
        "counter",
        "Model input bytes uploaded to the GPU.",
        &[(
            String::new(),
            stats
                .host_to_device_bytes
                .load(Ordering::Relaxed)
                .to_string(),
        )],
    );
    family(
        "tensorbake_encoder_samples_per_second",
        "gauge",
        "Samples per busy second of each encoder.",
        &per(&|t| t.samples_per_s.to_string()),
    );
    out
}

impl Run {
    /// This run's labels for [`render`].
    pub fn metrics_labels(&self) -> RunLabels {
        let o = &self.cfg.options;
        RunLabels {
            run: self.cfg.name.clone(),
            rank: self.cfg.rank.rank,
            world: self.cfg.rank.world,
            store: self.cfg.store.to_string(),
            rank_from: self.cfg.rank.origin.to_string(),
            encode_queue: o.encode_queue.max(1),
            write_queue: (o.write_queue / o.writers.max(1)).max(1) * o.writers.max(1),
        }
    }

    /// The run's counters now, as Prometheus text.
    pub fn metrics_text(&self) -> String {
        render(&self.metrics_labels(), &self.stats)
    }
}

/// A listening Prometheus endpoint: `GET /metrics` (or `/`) answers the text.
#[derive(Debug)]
pub struct MetricsEndpoint {
    listener: TcpListener,
}

/// Why the endpoint could not listen.
#[derive(Debug, thiserror::Error)]
#[error("{addr}: {why}")]
pub struct MetricsBindError {
    /// The address asked for.
    pub addr: String,
    /// What went wrong.
    pub why: String,
}

impl MetricsEndpoint {
    /// Listens on `addr` (`HOST:PORT`, `:PORT` for every interface; port 0 picks a
    /// free one, see [`MetricsEndpoint::local_addr`]).
    pub fn bind(addr: &str) -> Result<Self, MetricsBindError> {
        let err = |why: String| MetricsBindError {
            addr: addr.to_string(),
            why,
        };
        let full = if addr.starts_with(':') {
            format!("0.0.0.0{addr}")
        } else {
            addr.to_string()
        };
        let addrs: Vec<SocketAddr> = full
            .to_socket_addrs()
            .map_err(|e| err(format!("not a HOST:PORT address ({e})")))?
            .collect();
        let listener =
            TcpListener::bind(addrs.as_slice()).map_err(|e| err(format!("cannot listen: {e}")))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| err(e.to_string()))?;
        Ok(Self { listener })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Answers requests with `text()` until `stop` is set (checked every 20 ms).
    pub fn serve(&self, text: &dyn Fn() -> String, stop: &AtomicBool) {
        while !stop.load(Ordering::SeqCst) {
            match self.listener.accept() {
                Ok((conn, peer)) => {
                    if let Err(e) = answer(conn, text) {
                        tracing::debug!(%peer, "metrics request failed: {e}");
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    tracing::warn!("metrics endpoint: accept failed: {e}");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }
}

/// One HTTP/1.x request: GET or HEAD of `/metrics` or `/`; the connection closes after.
fn answer(conn: TcpStream, text: &dyn Fn() -> String) -> io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    conn.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut request = String::new();
    reader.read_line(&mut request)?;
    // the headers: read up to the blank line, ignored
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
    }
    let mut parts = request.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, ctype, body) = match (method, path) {
        ("GET" | "HEAD", "/metrics" | "/") => {
            ("200 OK", "text/plain; version=0.0.4; charset=utf-8", text())
        }
        ("GET" | "HEAD", _) => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            format!("no such page {path}; the metrics are at /metrics\n"),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            format!("method {method} not allowed; GET /metrics\n"),
        ),
    };
    let mut conn = conn;
    write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    if method != "HEAD" {
        conn.write_all(body.as_bytes())?;
    }
    conn.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn labels() -> RunLabels {
        RunLabels {
            run: "nightly \"sa1b\"".into(),
            rank: 2,
            world: 3,
            store: "s3://bucket/x".into(),
            rank_from: "Slurm".into(),
            encode_queue: 256,
            write_queue: 4,
        }
    }

    /// Parses the text back: `name{labels}` -> value, checking every sample line has
    /// a `# TYPE` before it.
    fn parse(text: &str) -> std::collections::BTreeMap<String, f64> {
        let mut typed = std::collections::BTreeSet::new();
        let mut out = std::collections::BTreeMap::new();
        for l in text.lines() {
            if let Some(rest) = l.strip_prefix("# TYPE ") {
                typed.insert(rest.split(' ').next().unwrap().to_string());
                continue;
            }
            if l.starts_with('#') {
                continue;
            }
            let (series, value) = l.rsplit_once(' ').unwrap();
            let name = series.split('{').next().unwrap();
            assert!(typed.contains(name), "{name} has no # TYPE line");
            out.insert(series.to_string(), value.parse::<f64>().unwrap());
        }
        out
    }

    #[test]
    fn text_has_every_family_labelled_and_escaped() {
        let stats = RunStats::new(5, &["siglip".into(), "t5".into()]);
        stats.sample_read();
        stats.sample_read();
        stats.sample_skipped("corrupt_image");
        stats.written(1);
        stats.shard_committed();
        stats.shard_read(1234, 1);
        stats.encoder(0).run.busy(Duration::from_secs(2));
        stats.encoder(0).run.samples(10);
        stats.encoder(0).prepared(Duration::from_secs(3));
        stats.encoder(1).gpu(Duration::from_millis(1500));
        stats
            .host_to_device_bytes
            .fetch_add(4096, std::sync::atomic::Ordering::Relaxed);
        let text = render(&labels(), &stats);
        let m = parse(&text);
        let base = r#"run="nightly \"sa1b\"",rank="2""#;
        let get = |name: &str, extra: &str| -> f64 {
            let sep = if extra.is_empty() { "" } else { "," };
            let key = format!("{name}{{{base}{sep}{extra}}}");
            *m.get(&key)
                .unwrap_or_else(|| panic!("{key} missing from\n{text}"))
        };
        assert_eq!(get("tensorbake_shards_todo", ""), 5.0);
        assert_eq!(get("tensorbake_shards_committed_total", ""), 1.0);
        assert_eq!(get("tensorbake_shards_failed_total", ""), 0.0);
        assert_eq!(get("tensorbake_samples_read_total", ""), 2.0);
        assert_eq!(get("tensorbake_samples_written_total", ""), 1.0);
        assert_eq!(get("tensorbake_samples_in_flight", ""), 1.0);
        assert_eq!(
            get(
                "tensorbake_samples_skipped_total",
                r#"reason="corrupt_image""#
            ),
            1.0
        );
        assert_eq!(get("tensorbake_bytes_read_total", ""), 1234.0);
        assert_eq!(get("tensorbake_retries_total", ""), 1.0);
        assert_eq!(
            get("tensorbake_encoder_samples_total", r#"encoder="siglip""#),
            10.0
        );
        assert_eq!(
            get(
                "tensorbake_encoder_samples_per_second",
                r#"encoder="siglip""#
            ),
            5.0
        );
        assert_eq!(
            get("tensorbake_encoder_samples_total", r#"encoder="t5""#),
            0.0
        );
        assert_eq!(get("tensorbake_queue_capacity", r#"queue="encode""#), 256.0);
        assert_eq!(get("tensorbake_run_finished", ""), 0.0);
        assert_eq!(
            get(
                "tensorbake_run_info",
                r#"world="3",store="s3://bucket/x",rank_from="Slurm""#
            ),
            1.0
        );
        for stage in ["prepare", "encode", "write"] {
            get(
                "tensorbake_stage_busy_seconds_total",
                &format!("stage=\"{stage}\""),
            );
        }
        assert_eq!(
            get(
                "tensorbake_encoder_prepare_seconds_total",
                r#"encoder="siglip""#
            ),
            3.0
        );
        // device time only where an encoder ran on a GPU
        assert_eq!(
            get("tensorbake_encoder_gpu_seconds_total", r#"encoder="t5""#),
            1.5
        );
        assert!(
            !text.contains(r#"tensorbake_encoder_gpu_seconds_total{run="nightly \"sa1b\"",rank="2",encoder="siglip"}"#),
            "{text}"
        );
        assert_eq!(get("tensorbake_host_to_device_bytes_total", ""), 4096.0);
    }

    fn request(addr: SocketAddr, req: &str) -> String {
        let mut c = TcpStream::connect(addr).unwrap();
        c.write_all(req.as_bytes()).unwrap();
        let mut s = String::new();
        c.read_to_string(&mut s).unwrap();
        s
    }

    #[test]
    fn endpoint_serves_live_text_and_refuses_other_pages() {
        let ep = MetricsEndpoint::bind("127.0.0.1:0").unwrap();
        let addr = ep.local_addr().unwrap();
        let stop = AtomicBool::new(false);
        let n = std::sync::atomic::AtomicU64::new(0);
        std::thread::scope(|s| {
            s.spawn(|| {
                ep.serve(
                    &|| format!("x {}\n", n.fetch_add(1, Ordering::SeqCst)),
                    &stop,
                );
            });
            let a = request(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
            assert!(a.starts_with("HTTP/1.1 200 OK\r\n"), "{a}");
            assert!(a.contains("text/plain; version=0.0.4"), "{a}");
            assert!(a.ends_with("\r\n\r\nx 0\n"), "{a}");
            // rendered again for every scrape
            let b = request(addr, "GET /?x=1 HTTP/1.0\r\n\r\n");
            assert!(b.ends_with("x 1\n"), "{b}");
            let head = request(addr, "HEAD /metrics HTTP/1.1\r\n\r\n");
            assert!(head.starts_with("HTTP/1.1 200") && head.ends_with("\r\n\r\n"));
            let missing = request(addr, "GET /favicon.ico HTTP/1.1\r\n\r\n");
            assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
            let post = request(addr, "POST /metrics HTTP/1.1\r\n\r\n");
            assert!(post.starts_with("HTTP/1.1 405"), "{post}");
            stop.store(true, Ordering::SeqCst);
        });
        // a port in use, and something that is no address, name the address
        let held = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = held.local_addr().unwrap().port();
        let e = MetricsEndpoint::bind(&format!("127.0.0.1:{port}")).unwrap_err();
        assert!(
            e.to_string()
                .starts_with(&format!("127.0.0.1:{port}: cannot listen")),
            "{e}"
        );
        let e = MetricsEndpoint::bind("nine-thousand").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("nine-thousand: not a HOST:PORT address"),
            "{e}"
        );
    }
}
