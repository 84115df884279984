//! Opening a shard as a byte stream: local paths, `file://` URLs and HTTP(S).
//!
//! HTTP streams are resumable: the body is pulled by an async task (reqwest on a small
//! tokio runtime) into a bounded channel that a blocking [`Read`] drains, so memory
//! stays at a few chunks whatever the shard size, and gzip/tar parsing runs on an
//! ordinary thread. When the connection drops, the body ends short, or no byte
//! arrives for `stall_timeout`, the task asks again with `Range: bytes=<offset>-`
//! (and `If-Range` when the server gave a validator), so the reader sees one unbroken
//! stream. Failures back off exponentially; 429 and 503 honour `Retry-After`. 404,
//! 410, 401 and 403 are final at once.

use std::io::{self, Read};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use reqwest::StatusCode;
use reqwest::header::{
    CONTENT_LENGTH, CONTENT_RANGE, ETAG, IF_RANGE, LAST_MODIFIED, RANGE, RETRY_AFTER,
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// How shards are fetched: the manifest's `[network]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkConfig {
    /// Seconds to establish a connection.
    pub connect_timeout_s: f64,
    /// Seconds without a single body byte before the stream is resumed.
    pub stall_timeout_s: f64,
    /// Failed attempts in a row (no byte received in between) before a shard fails.
    pub max_retries: u32,
    /// First backoff delay in seconds; doubles per failed attempt, with jitter.
    pub backoff_initial_s: f64,
    /// Backoff ceiling in seconds (also caps a server's Retry-After).
    pub backoff_max_s: f64,
    /// Body chunks buffered per stream between the network and the tar reader.
    pub buffer_chunks: usize,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            connect_timeout_s: 10.0,
            stall_timeout_s: 30.0,
            max_retries: 8,
            backoff_initial_s: 0.5,
            backoff_max_s: 60.0,
            buffer_chunks: 64,
        }
    }
}

/// Why a shard could not be streamed.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The server says the shard does not exist (404/410).
    #[error("{url}: HTTP {status}: not found")]
    NotFound {
        /// The shard URL.
        url: String,
        /// 404 or 410.
        status: u16,
    },
    /// The server refused the request in a way retrying cannot fix.
    #[error("{url}: HTTP {status}")]
    Status {
        /// The shard URL.
        url: String,
        /// The status code.
        status: u16,
    },
    /// Every retry failed.
    #[error("{url}: gave up after {attempts} attempts at byte {offset}: {last}")]
    RetriesExhausted {
        /// The shard URL.
        url: String,
        /// Attempts made in a row without progress.
        attempts: u32,
        /// Bytes delivered before giving up.
        offset: u64,
        /// The last failure.
        last: String,
    },
    /// The object changed between the first request and a resume.
    #[error(
        "{url}: the shard changed on the server while it was being read (validator mismatch at byte {offset})"
    )]
    Changed {
        /// The shard URL.
        url: String,
        /// Where the resume was attempted.
        offset: u64,
    },
    /// A local file could not be opened.
    #[error("{path}: {source}")]
    File {
        /// The path.
        path: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A URL scheme this build does not read.
    #[error("{url}: unsupported URL scheme (use a path, file://, http:// or https://)")]
    Unsupported {
        /// The URL.
        url: String,
    },
}

impl SourceError {
    /// A short snake_case reason for counts in reports.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotFound { .. } => "http_not_found",
            Self::Status { .. } => "http_status",
            Self::RetriesExhausted { .. } => "network",
            Self::Changed { .. } => "shard_changed",
            Self::File { .. } => "file",
            Self::Unsupported { .. } => "unsupported_url",
        }
    }
}

/// Counters of one stream, shared with its reader (for reports and tests).
#[derive(Debug, Default)]
pub struct StreamStats {
    /// Body bytes delivered to the reader.
    pub bytes: AtomicU64,
    /// Requests made after the first (resumes and retries).
    pub retries: AtomicU64,
    /// Of those, requests that resumed mid-body with a Range header.
    pub resumes: AtomicU64,
}

/// Opens shards. Cheap to clone; one per pipeline.
#[derive(Clone)]
pub struct Fetcher {
    inner: Arc<FetcherInner>,
}

struct FetcherInner {
    client: reqwest::Client,
    rt: tokio::runtime::Runtime,
    cfg: NetworkConfig,
}

impl std::fmt::Debug for Fetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetcher")
            .field("cfg", &self.inner.cfg)
            .finish()
    }
}

impl Fetcher {
    /// A fetcher with its own small runtime (2 network threads serve many streams).
    pub fn new(cfg: NetworkConfig) -> io::Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("tb-net")
            .enable_all()
            .build()?;
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs_f64(cfg.connect_timeout_s))
            .user_agent(concat!("tensorbake/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(io::Error::other)?;
        Ok(Self {
            inner: Arc::new(FetcherInner { client, rt, cfg }),
        })
    }

    /// Opens `url` (a path, `file://`, `http://` or `https://`) as a byte stream.
    /// HTTP errors that need no body (404, refused status) are reported here; later
    /// failures surface as `io::Error`s whose inner error is a [`SourceError`].
    pub fn open(&self, url: &str) -> Result<ShardStream, SourceError> {
        let stats = Arc::new(StreamStats::default());
        if url.starts_with("http://") || url.starts_with("https://") {
            let (tx, rx) = mpsc::channel(self.inner.cfg.buffer_chunks.max(1));
            let (first_tx, first_rx) = std::sync::mpsc::channel();
            let task = HttpTask {
                client: self.inner.client.clone(),
                cfg: self.inner.cfg.clone(),
                url: url.to_string(),
                stats: stats.clone(),
            };
            self.inner.rt.spawn(task.run(tx, first_tx));
            // Wait for the first response so that 404 & co. fail `open` itself.
            match first_rx.recv() {
                Ok(Ok(())) | Err(_) => {}
                Ok(Err(e)) => return Err(e),
            }
            return Ok(ShardStream {
                inner: StreamInner::Http {
                    rx,
                    cur: Bytes::new(),
                },
                stats,
            });
        }
        let file = open_local(url)?;
        Ok(ShardStream {
            inner: StreamInner::File(io::BufReader::with_capacity(1 << 20, file)),
            stats,
        })
    }
}

impl Fetcher {
    /// Checks quickly that `url` can be read, before a job commits to it: a local file
    /// must exist; an HTTP(S) server must answer a one-byte `Range` GET (a GET, not a
    /// HEAD: signed CDN links often refuse HEAD). Two attempts at most, each bounded by
    /// the connect and stall timeouts, so a mistyped host fails in seconds rather
    /// than after the stream's full retry schedule. A busy answer (429, 5xx) passes:
    /// the stream itself waits those out.
    ///
    /// # Errors
    /// [`SourceError::NotFound`], [`SourceError::Status`], [`SourceError::File`],
    /// [`SourceError::Unsupported`], or [`SourceError::RetriesExhausted`] when no
    /// answer came (connection refused, unknown host, timeout).
    pub fn probe(&self, url: &str) -> Result<(), SourceError> {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return open_local(url).map(drop);
        }
        let cfg = &self.inner.cfg;
        let limit = Duration::from_secs_f64(cfg.connect_timeout_s + cfg.stall_timeout_s);
        let pause = Duration::from_secs_f64(cfg.backoff_initial_s);
        let client = self.inner.client.clone();
        self.inner.rt.block_on(async move {
            let mut last = String::new();
            const ATTEMPTS: u32 = 2;
            for attempt in 1..=ATTEMPTS {
                let req = client.get(url).header(RANGE, "bytes=0-0").send();
                match tokio::time::timeout(limit, req).await {
                    Ok(Ok(resp)) => {
                        let status = resp.status();
                        return match status {
                            StatusCode::NOT_FOUND | StatusCode::GONE => {
                                Err(SourceError::NotFound {
                                    url: url.to_string(),
                                    status: status.as_u16(),
                                })
                            }
                            s if s.is_success()
                                || s.is_server_error()
                                || s == StatusCode::TOO_MANY_REQUESTS
                                || s == StatusCode::REQUEST_TIMEOUT
                                // an empty file has no byte 0
                                || s == StatusCode::RANGE_NOT_SATISFIABLE =>
                            {
                                Ok(())
                            }
                            s => Err(SourceError::Status {
                                url: url.to_string(),
                                status: s.as_u16(),
                            }),
                        };
                    }
                    Ok(Err(e)) => last = error_chain(&e),
                    Err(_) => last = format!("no answer within {:.0} s", limit.as_secs_f64()),
                }
                if attempt < ATTEMPTS {
                    tokio::time::sleep(pause).await;
                }
            }
            Err(SourceError::RetriesExhausted {
                url: url.to_string(),
                attempts: ATTEMPTS,
                offset: 0,
                last,
            })
        })
    }
}

/// Opens a plain path or `file://` URL; other schemes are [`SourceError::Unsupported`].
fn open_local(url: &str) -> Result<std::fs::File, SourceError> {
    let path = match url.strip_prefix("file://") {
        Some(p) => p,
        None if url.contains("://") => {
            return Err(SourceError::Unsupported {
                url: url.to_string(),
            });
        }
        None => url,
    };
    std::fs::File::open(path).map_err(|source| SourceError::File {
        path: path.to_string(),
        source,
    })
}

/// An error with its causes, outermost first (reqwest's own message omits them).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let c_s = c.to_string();
        if !s.contains(&c_s) {
            s.push_str(": ");
            s.push_str(&c_s);
        }
        cur = c.source();
    }
    s
}

/// Opens one URL or path with default network settings (for one-off reads such as a
/// caption tar or a links file).
pub fn open_url(url: &str) -> Result<ShardStream, SourceError> {
    let f = Fetcher::new(NetworkConfig::default()).map_err(|source| SourceError::File {
        path: url.into(),
        source,
    })?;
    let stream = f.open(url)?;
    Ok(stream.keep_alive(f))
}

/// A shard's bytes as a blocking reader.
pub struct ShardStream {
    inner: StreamInner,
    stats: Arc<StreamStats>,
}

enum StreamInner {
    File(io::BufReader<std::fs::File>),
    Http {
        rx: mpsc::Receiver<Result<Bytes, SourceError>>,
        cur: Bytes,
    },
    /// A stream that owns the fetcher (and so the runtime) it came from.
    Owned {
        stream: Box<ShardStream>,
        _runtime: Fetcher,
    },
}

impl ShardStream {
    /// The stream's counters.
    pub fn stats(&self) -> Arc<StreamStats> {
        self.stats.clone()
    }

    fn keep_alive(self, f: Fetcher) -> Self {
        let stats = self.stats.clone();
        Self {
            inner: StreamInner::Owned {
                stream: Box::new(self),
                _runtime: f,
            },
            stats,
        }
    }
}

impl Read for ShardStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = match &mut self.inner {
            StreamInner::File(f) => f.read(buf)?,
            StreamInner::Owned { stream, .. } => return stream.read(buf),
            StreamInner::Http { rx, cur } => {
                while cur.is_empty() {
                    match rx.blocking_recv() {
                        None => return Ok(0),
                        Some(Ok(b)) => *cur = b,
                        Some(Err(e)) => return Err(io::Error::other(e)),
                    }
                }
                let n = cur.len().min(buf.len());
                buf[..n].copy_from_slice(&cur[..n]);
                let _ = cur.split_to(n);
                n
            }
        };
        self.stats.bytes.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

struct HttpTask {
    client: reqwest::Client,
    cfg: NetworkConfig,
    url: String,
    stats: Arc<StreamStats>,
}

/// What one attempt ended with.
enum Attempt {
    Done,
    /// Retry after this delay (None: the backoff schedule decides).
    Retry(String, Option<Duration>),
    Fatal(SourceError),
    /// The reader went away.
    Closed,
}

impl HttpTask {
    async fn run(
        self,
        tx: mpsc::Sender<Result<Bytes, SourceError>>,
        first: std::sync::mpsc::Sender<Result<(), SourceError>>,
    ) {
        let mut offset = 0u64;
        let mut total: Option<u64> = None;
        let mut validator: Option<String> = None;
        let mut failures = 0u32;
        let mut first = Some(first);
        loop {
            let before = offset;
            let outcome = self
                .attempt(&tx, &mut offset, &mut total, &mut validator, &mut first)
                .await;
            if offset > before {
                failures = 0;
            }
            match outcome {
                Attempt::Done | Attempt::Closed => break,
                Attempt::Fatal(e) => {
                    Self::fail(&tx, &mut first, e).await;
                    break;
                }
                Attempt::Retry(why, wait) => {
                    failures += 1;
                    if failures > self.cfg.max_retries {
                        let e = SourceError::RetriesExhausted {
                            url: self.url.clone(),
                            attempts: failures,
                            offset,
                            last: why,
                        };
                        Self::fail(&tx, &mut first, e).await;
                        break;
                    }
                    let delay = wait
                        .unwrap_or_else(|| self.backoff(failures))
                        .min(Duration::from_secs_f64(self.cfg.backoff_max_s));
                    tracing::debug!(url = %self.url, offset, attempt = failures, delay_ms = delay.as_millis() as u64, why = %why, "stream interrupted; retrying");
                    self.stats.retries.fetch_add(1, Ordering::Relaxed);
                    if offset > 0 {
                        self.stats.resumes.fetch_add(1, Ordering::Relaxed);
                    }
                    tokio::time::sleep(delay).await;
                }
            }
        }
        if let Some(f) = first.take() {
            let _ = f.send(Ok(()));
        }
    }

    async fn fail(
        tx: &mpsc::Sender<Result<Bytes, SourceError>>,
        first: &mut Option<std::sync::mpsc::Sender<Result<(), SourceError>>>,
        e: SourceError,
    ) {
        match first.take() {
            Some(f) => {
                let _ = f.send(Err(e));
            }
            None => {
                let _ = tx.send(Err(e)).await;
            }
        }
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let base = self.cfg.backoff_initial_s * 2f64.powi(attempt.saturating_sub(1).min(30) as i32);
        // +-25% jitter, from the clock: enough to de-synchronise many workers.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let jitter = 0.75 + 0.5 * f64::from(nanos % 1000) / 1000.0;
        Duration::from_secs_f64((base * jitter).min(self.cfg.backoff_max_s))
    }

    async fn attempt(
        &self,
        tx: &mpsc::Sender<Result<Bytes, SourceError>>,
        offset: &mut u64,
        total: &mut Option<u64>,
        validator: &mut Option<String>,
        first: &mut Option<std::sync::mpsc::Sender<Result<(), SourceError>>>,
    ) -> Attempt {
        let stall = Duration::from_secs_f64(self.cfg.stall_timeout_s);
        let mut req = self.client.get(&self.url);
        if *offset > 0 {
            req = req.header(RANGE, format!("bytes={offset}-"));
            if let Some(v) = validator.as_ref() {
                req = req.header(IF_RANGE, v.as_str());
            }
        }
        let resp = match tokio::time::timeout(stall, req.send()).await {
            Err(_) => {
                return Attempt::Retry("no response headers within the stall timeout".into(), None);
            }
            Ok(Err(e)) => return Attempt::Retry(format!("request failed: {e}"), None),
            Ok(Ok(r)) => r,
        };
        let status = resp.status();
        let url = self.url.clone();
        match status {
            StatusCode::OK | StatusCode::PARTIAL_CONTENT => {}
            StatusCode::RANGE_NOT_SATISFIABLE if Some(*offset) == *total => return Attempt::Done,
            StatusCode::NOT_FOUND | StatusCode::GONE => {
                return Attempt::Fatal(SourceError::NotFound {
                    url,
                    status: status.as_u16(),
                });
            }
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => {
                let wait = resp
                    .headers()
                    .get(RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_retry_after);
                return Attempt::Retry(format!("HTTP {}", status.as_u16()), wait);
            }
            s if s.is_server_error() || s == StatusCode::REQUEST_TIMEOUT => {
                return Attempt::Retry(format!("HTTP {}", s.as_u16()), None);
            }
            s => {
                return Attempt::Fatal(SourceError::Status {
                    url,
                    status: s.as_u16(),
                });
            }
        }
        let headers = resp.headers();
        let header = |h| {
            headers
                .get(h)
                .and_then(|v: &reqwest::header::HeaderValue| v.to_str().ok())
                .map(str::to_string)
        };
        let this_validator = header(ETAG)
            .filter(|e| !e.starts_with("W/"))
            .or_else(|| header(LAST_MODIFIED));
        let length = header(CONTENT_LENGTH).and_then(|v| v.parse::<u64>().ok());
        // How many leading body bytes to drop (a server that ignores Range sends all).
        let mut skip = 0u64;
        if status == StatusCode::PARTIAL_CONTENT {
            let start = header(CONTENT_RANGE).and_then(|v| parse_content_range_start(&v));
            if start != Some(*offset) {
                return Attempt::Retry(format!("bad Content-Range for a resume at {offset}"), None);
            }
            if let Some(l) = length {
                *total = Some(*offset + l);
            }
        } else {
            if *offset > 0 {
                if validator.is_some() && this_validator != *validator {
                    return Attempt::Fatal(SourceError::Changed {
                        url,
                        offset: *offset,
                    });
                }
                skip = *offset;
            }
            *total = length;
        }
        if validator.is_none() {
            *validator = this_validator;
        }
        if let Some(f) = first.take() {
            let _ = f.send(Ok(()));
        }
        let mut resp = resp;
        loop {
            match tokio::time::timeout(stall, resp.chunk()).await {
                Err(_) => {
                    return Attempt::Retry(
                        format!("stalled: no byte for {:.1} s", self.cfg.stall_timeout_s),
                        None,
                    );
                }
                Ok(Err(e)) => return Attempt::Retry(format!("connection lost: {e}"), None),
                Ok(Ok(None)) => {
                    return match *total {
                        Some(t) if *offset < t => {
                            Attempt::Retry(format!("body ended at byte {offset} of {t}"), None)
                        }
                        _ => Attempt::Done,
                    };
                }
                Ok(Ok(Some(mut chunk))) => {
                    if skip > 0 {
                        let drop = skip.min(chunk.len() as u64);
                        let _ = chunk.split_to(drop as usize);
                        skip -= drop;
                        if chunk.is_empty() {
                            continue;
                        }
                    }
                    *offset += chunk.len() as u64;
                    if tx.send(Ok(chunk)).await.is_err() {
                        return Attempt::Closed;
                    }
                }
            }
        }
    }
}

/// `Retry-After` as delta-seconds or an HTTP date.
fn parse_retry_after(v: &str) -> Option<Duration> {
    if let Ok(secs) = v.trim().parse::<f64>() {
        return (secs >= 0.0 && secs.is_finite()).then(|| Duration::from_secs_f64(secs));
    }
    let when = httpdate(v)?;
    Some(
        when.duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    )
}

/// Parses an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), the form RFC 9110 requires.
fn httpdate(v: &str) -> Option<std::time::SystemTime> {
    let parts: Vec<&str> = v.split_whitespace().collect();
    let [_, day, mon, year, time, "GMT"] = parts.as_slice() else {
        return None;
    };
    let day: u64 = day.parse().ok()?;
    let month = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ]
    .iter()
    .position(|m| m == mon)? as u64
        + 1;
    let year: u64 = year.parse().ok()?;
    let hms: Vec<u64> = time
        .split(':')
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    let [h, m, s] = hms.as_slice() else {
        return None;
    };
    // days from civil (Howard Hinnant's algorithm), valid for years >= 1970
    let (y, mm) = if month <= 2 {
        (year - 1, month + 9)
    } else {
        (year, month - 3)
    };
    let era = y / 400;
    let yoe = y - era * 400;
    let doy = (153 * mm + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe;
    let days = days.checked_sub(719_468)?;
    Some(std::time::UNIX_EPOCH + Duration::from_secs(days * 86_400 + h * 3600 + m * 60 + s))
}

fn parse_content_range_start(v: &str) -> Option<u64> {
    let rest = v.trim().strip_prefix("bytes ")?;
    rest.split('-').next()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_forms() {
        assert_eq!(parse_retry_after("2"), Some(Duration::from_secs(2)));
        assert_eq!(parse_retry_after("0.5"), Some(Duration::from_millis(500)));
        assert_eq!(parse_retry_after("-1"), None);
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(Duration::ZERO)
        );
        let t = httpdate("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        assert_eq!(
            t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs(),
            784_111_777
        );
        assert!(httpdate("Sunday, 06-Nov-94 08:49:37 GMT").is_none());
    }

    #[test]
    fn content_range() {
        assert_eq!(parse_content_range_start("bytes 100-199/200"), Some(100));
        assert_eq!(parse_content_range_start("bytes */200"), None);
    }
}
