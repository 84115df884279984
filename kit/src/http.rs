//! A loopback HTTP/1.1 file server with fault injection.
//!
//! Serves the files of one directory on `127.0.0.1:<free port>` with `Range`
//! support (`206`, `Content-Range`), `ETag` and `Last-Modified`, one thread per
//! connection. It is what `tensorbake demo` streams its synthetic shards from, and
//! what the ingest tests break on purpose: [`Fault`]s cut a body after N bytes, stall
//! it, or answer `503` with `Retry-After`, each a set number of times.
//!
//! ```no_run
//! use tensorbake_kit::http::{FileServer, Fault};
//! let server = FileServer::start("shards").unwrap();
//! server.inject("shard-000.tar", Fault::CutAfter(10_000), 1);
//! println!("{}", server.url("shard-000.tar"));
//! ```

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// A fault to inject into responses for one file.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// Send the headers and this many body bytes, then close the connection.
    CutAfter(u64),
    /// Send this many body bytes, then send nothing for the duration (keeping the
    /// connection open), then close it.
    StallAfter(u64, Duration),
    /// Answer `503 Service Unavailable` with `Retry-After: <secs>`.
    Unavailable {
        /// The `Retry-After` value, in seconds.
        retry_after_s: u32,
    },
    /// Answer `429 Too Many Requests` with `Retry-After: <secs>`.
    TooManyRequests {
        /// The `Retry-After` value, in seconds.
        retry_after_s: u32,
    },
}

/// What the server has seen (for assertions in tests).
#[derive(Debug, Default)]
pub struct ServerStats {
    /// GET requests answered.
    pub requests: AtomicU64,
    /// Of those, requests with a `Range` header.
    pub range_requests: AtomicU64,
    /// Faults injected so far.
    pub faults: AtomicU64,
    /// Body bytes sent.
    pub bytes_sent: AtomicU64,
}

type FaultTable = Arc<Mutex<HashMap<String, Vec<Fault>>>>;

/// A running file server; stops when dropped.
pub struct FileServer {
    addr: std::net::SocketAddr,
    stop: Arc<AtomicBool>,
    faults: FaultTable,
    stats: Arc<ServerStats>,
    thread: Option<JoinHandle<()>>,
}

impl FileServer {
    /// Serves `root` on a free loopback port.
    pub fn start(root: impl AsRef<Path>) -> io::Result<Self> {
        let root = root.as_ref().canonicalize()?;
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let faults: FaultTable = Arc::default();
        let stats = Arc::new(ServerStats::default());
        let (s, f, st) = (stop.clone(), faults.clone(), stats.clone());
        let thread = std::thread::Builder::new()
            .name("tb-http".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if s.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let (root, f, st) = (root.clone(), f.clone(), st.clone());
                    std::thread::spawn(move || {
                        let _ = serve(conn, &root, &f, &st);
                    });
                }
            })?;
        Ok(Self {
            addr,
            stop,
            faults,
            stats,
            thread: Some(thread),
        })
    }

    /// `http://127.0.0.1:<port>/<name>`.
    pub fn url(&self, name: &str) -> String {
        format!("http://{}/{}", self.addr, name.trim_start_matches('/'))
    }

    /// The base URL, `http://127.0.0.1:<port>`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Injects `fault` into the next `times` requests for `name` (path below the root).
    pub fn inject(&self, name: &str, fault: Fault, times: usize) {
        let mut t = self.faults.lock().expect("fault table");
        t.entry(name.trim_start_matches('/').to_string())
            .or_default()
            .extend(std::iter::repeat_n(fault, times));
    }

    /// Counters of what was served.
    pub fn stats(&self) -> &ServerStats {
        &self.stats
    }
}

impl Drop for FileServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr); // wake the accept loop
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(conn: TcpStream, root: &Path, faults: &FaultTable, stats: &ServerStats) -> io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or("/"));
    let mut range: Option<String> = None;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':')
            && k.eq_ignore_ascii_case("range")
        {
            range = Some(v.trim().to_string());
        }
    }
    let mut out = conn;
    if method != "GET" && method != "HEAD" {
        return respond_empty(&mut out, "405 Method Not Allowed", &[]);
    }
    let name = percent_decode(
        target
            .split('?')
            .next()
            .unwrap_or("")
            .trim_start_matches('/'),
    );
    let path: PathBuf = root.join(&name);
    let inside = path
        .canonicalize()
        .map(|p| p.starts_with(root))
        .unwrap_or(false);
    if !inside || !path.is_file() {
        return respond_empty(&mut out, "404 Not Found", &[]);
    }
    stats.requests.fetch_add(1, Ordering::Relaxed);
    if range.is_some() {
        stats.range_requests.fetch_add(1, Ordering::Relaxed);
    }
    let fault = {
        let mut t = faults.lock().expect("fault table");
        t.get_mut(&name)
            .and_then(|v| (!v.is_empty()).then(|| v.remove(0)))
    };
    if fault.is_some() {
        stats.faults.fetch_add(1, Ordering::Relaxed);
    }
    match fault {
        Some(Fault::Unavailable { retry_after_s }) => {
            return respond_empty(
                &mut out,
                "503 Service Unavailable",
                &[("Retry-After", retry_after_s.to_string())],
            );
        }
        Some(Fault::TooManyRequests { retry_after_s }) => {
            return respond_empty(
                &mut out,
                "429 Too Many Requests",
                &[("Retry-After", retry_after_s.to_string())],
            );
        }
        _ => {}
    }
    let mut file = std::fs::File::open(&path)?;
    let meta = file.metadata()?;
    let size = meta.len();
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    let etag = format!("\"{size:x}-{mtime:x}\"");
    let (start, end, status) = match range.as_deref().and_then(parse_range) {
        Some((s, e)) if s < size => (
            s,
            e.map_or(size - 1, |e| e.min(size - 1)),
            "206 Partial Content",
        ),
        Some(_) => {
            return respond_empty(
                &mut out,
                "416 Range Not Satisfiable",
                &[("Content-Range", format!("bytes */{size}"))],
            );
        }
        None => (0, size.saturating_sub(1), "200 OK"),
    };
    let len = if size == 0 { 0 } else { end + 1 - start };
    let mut head = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {len}\r\nAccept-Ranges: bytes\r\nETag: {etag}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n"
    );
    if start > 0 || range.is_some() {
        head.push_str(&format!("Content-Range: bytes {start}-{end}/{size}\r\n"));
    }
    head.push_str("\r\n");
    out.write_all(head.as_bytes())?;
    if method == "HEAD" {
        return Ok(());
    }
    file.seek(SeekFrom::Start(start))?;
    let limit = match &fault {
        Some(Fault::CutAfter(n)) | Some(Fault::StallAfter(n, _)) => (*n).min(len),
        _ => len,
    };
    let mut body = file.take(limit);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = body.read(&mut buf)?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n])?;
        stats.bytes_sent.fetch_add(n as u64, Ordering::Relaxed);
    }
    out.flush()?;
    if let Some(Fault::StallAfter(_, d)) = fault {
        std::thread::sleep(d);
    }
    let _ = out.shutdown(Shutdown::Both);
    Ok(())
}

fn respond_empty(out: &mut TcpStream, status: &str, headers: &[(&str, String)]) -> io::Result<()> {
    let mut head = format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    out.write_all(head.as_bytes())?;
    out.flush()
}

/// `bytes=<start>-` (how streams resume) and `bytes=<start>-<end>` (inclusive; how
/// a probe asks for one byte): the start and, if given, the end.
fn parse_range(v: &str) -> Option<(u64, Option<u64>)> {
    let (start, end) = v.strip_prefix("bytes=")?.split_once('-')?;
    let start = start.trim().parse().ok()?;
    let end = match end.trim() {
        "" => None,
        e => Some(e.parse().ok().filter(|&e| e >= start)?),
    };
    Some((start, end))
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(v) =
                u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16)
        {
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(url: &str, range: Option<u64>) -> (String, Vec<u8>) {
        get_range(url, range.map(|r| format!("bytes={r}-")))
    }

    fn get_range(url: &str, range: Option<String>) -> (String, Vec<u8>) {
        let rest = url.strip_prefix("http://").unwrap();
        let (host, path) = rest.split_once('/').unwrap();
        let mut s = TcpStream::connect(host).unwrap();
        let mut req = format!("GET /{path} HTTP/1.1\r\nHost: {host}\r\n");
        if let Some(r) = range {
            req.push_str(&format!("Range: {r}\r\n"));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes()).unwrap();
        let mut all = Vec::new();
        let _ = s.read_to_end(&mut all);
        let split = all.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        (
            String::from_utf8_lossy(&all[..split]).into_owned(),
            all[split + 4..].to_vec(),
        )
    }

    #[test]
    fn ranges_faults_and_not_found() {
        let dir = std::env::temp_dir().join(format!("tb-http-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(dir.join("a b.bin"), &data).unwrap();
        let server = FileServer::start(&dir).unwrap();
        let (h, body) = get(&server.url("a%20b.bin"), None);
        assert!(h.starts_with("HTTP/1.1 200"), "{h}");
        assert_eq!(body, data);
        let (h, body) = get(&server.url("a%20b.bin"), Some(9_000));
        assert!(
            h.starts_with("HTTP/1.1 206") && h.contains("Content-Range: bytes 9000-9999/10000"),
            "{h}"
        );
        assert_eq!(body, &data[9_000..]);
        // a closed range: inclusive end, clamped to the file
        let (h, body) = get_range(&server.url("a%20b.bin"), Some("bytes=0-0".into()));
        assert!(h.contains("Content-Range: bytes 0-0/10000"), "{h}");
        assert_eq!(body, &data[..1]);
        let (h, body) = get_range(&server.url("a%20b.bin"), Some("bytes=9990-20000".into()));
        assert!(h.contains("Content-Range: bytes 9990-9999/10000"), "{h}");
        assert_eq!(body, &data[9990..]);
        server.inject("a b.bin", Fault::CutAfter(100), 1);
        server.inject("a b.bin", Fault::Unavailable { retry_after_s: 3 }, 1);
        let (_, body) = get(&server.url("a%20b.bin"), None);
        assert_eq!(body, &data[..100]);
        let (h, body) = get(&server.url("a%20b.bin"), None);
        assert!(
            h.starts_with("HTTP/1.1 503") && h.contains("Retry-After: 3"),
            "{h}"
        );
        assert!(body.is_empty());
        let (h, _) = get(&server.url("missing.tar"), None);
        assert!(h.starts_with("HTTP/1.1 404"), "{h}");
        let (h, _) = get(&server.url("../etc/passwd"), None);
        assert!(h.starts_with("HTTP/1.1 404"), "{h}");
        assert_eq!(server.stats().faults.load(Ordering::Relaxed), 2);
        assert_eq!(server.stats().range_requests.load(Ordering::Relaxed), 3);
        drop(server);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
