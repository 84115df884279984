//! The decode benchmark behind `tensorbake bench decode`: JPEG decode + resize +
//! centre crop on one core, beside Pillow (with and without `Image.draft`) on the
//! same files in the same run.
//!
//! Our pipelines run on the calling thread (libjpeg-turbo and fast_image_resize are
//! single-threaded), Pillow in `scripts/bench/pillow_decode.py`, which is compiled
//! into the crate and written next to the images, so the bench runs from any
//! directory and the script always matches the code. Rounds alternate the
//! contenders so that a machine whose load changes treats them alike; the report
//! gives each round and the median.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;
use tensorbake_kit::measure::median;

use serde::Serialize;
use thiserror::Error;

use super::ImageError;
use super::candidates::Candidate;

/// The Pillow peer script.
pub const PILLOW_SCRIPT: &str = include_str!("../../../scripts/bench/pillow_decode.py");

/// What to measure.
#[derive(Debug, Clone)]
pub struct DecodeBenchConfig {
    /// JPEG files to use; empty: synthetic photos written by
    /// [`tensorbake_kit::synth_image::photo_jpeg`].
    pub images: Vec<PathBuf>,
    /// Number of synthetic photos (seeds `0..count`).
    pub count: u64,
    /// Synthetic photo width.
    pub width: u32,
    /// Synthetic photo height.
    pub height: u32,
    /// Synthetic photo JPEG quality.
    pub quality: u8,
    /// Output side.
    pub resolution: u32,
    /// Minimum timed seconds per contender and round.
    pub seconds: f64,
    /// Rounds.
    pub rounds: usize,
    /// Python with Pillow; `None` skips Pillow.
    pub python: Option<PathBuf>,
    /// Time every [`Candidate`], not only tensorbake's pipeline.
    pub candidates: bool,
}

impl Default for DecodeBenchConfig {
    fn default() -> Self {
        Self {
            images: Vec::new(),
            count: 8,
            width: 2250,
            height: 1500,
            quality: 90,
            resolution: 512,
            seconds: 3.0,
            rounds: 3,
            python: Some(PathBuf::from("python3")),
            candidates: false,
        }
    }
}

/// Why the benchmark could not run.
#[derive(Debug, Error)]
pub enum BenchError {
    /// Reading or writing a file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Writing a synthetic photo.
    #[error(transparent)]
    Synth(#[from] tensorbake_kit::synth_image::SynthImageError),
    /// One of our pipelines failed on an input.
    #[error("{pipeline} on {path}: {source}")]
    Decode {
        /// The pipeline.
        pipeline: String,
        /// The input.
        path: PathBuf,
        /// The cause.
        source: ImageError,
    },
    /// The Pillow script failed or printed something unexpected.
    #[error(
        "Pillow peer ({python}): {message} (pass an interpreter with Pillow via --python or TENSORBAKE_PYTHON, or --no-pillow)"
    )]
    Pillow {
        /// The interpreter.
        python: String,
        /// What went wrong.
        message: String,
    },
    /// A setting that cannot work.
    #[error("invalid bench setting: {0}")]
    Config(String),
}

/// One contender's results.
#[derive(Debug, Clone, Serialize)]
pub struct BenchRow {
    /// Short name.
    pub name: String,
    /// What it does.
    pub pipeline: String,
    /// Images/s in each round.
    pub images_per_s_rounds: Vec<f64>,
    /// Median over the rounds.
    pub images_per_s_median: f64,
}

/// The benchmark's results.
#[derive(Debug, Clone, Serialize)]
pub struct DecodeBenchReport {
    /// What the inputs were.
    pub images: String,
    /// Number of inputs.
    pub image_count: usize,
    /// Mean input size in bytes.
    pub mean_bytes: f64,
    /// Output side.
    pub resolution: u32,
    /// Rounds.
    pub rounds: usize,
    /// Minimum timed seconds per contender and round.
    pub seconds: f64,
    /// Pillow's version, when it ran.
    pub pillow_version: Option<String>,
    /// Ours first, then Pillow and Pillow + draft.
    pub results: Vec<BenchRow>,
}

impl DecodeBenchReport {
    fn median_of(&self, name: &str) -> Option<f64> {
        self.results
            .iter()
            .find(|r| r.name == name)
            .map(|r| r.images_per_s_median)
    }

    /// The table `tensorbake bench decode` prints.
    pub fn table(&self) -> String {
        let mut out = format!(
            "decode + resize shortest side + centre crop to {r}x{r} (bicubic): {what}, mean {mb:.2} MB\n\
             one core; images/s, median of {rounds} rounds of >= {s} s{pillow}\n\n",
            r = self.resolution,
            what = self.images,
            mb = self.mean_bytes / 1e6,
            rounds = self.rounds,
            s = self.seconds,
            pillow = self
                .pillow_version
                .as_ref()
                .map(|v| format!("; Pillow {v}"))
                .unwrap_or_default(),
        );
        let (pillow, draft) = (self.median_of("pillow"), self.median_of("pillow-draft"));
        out += &format!(
            "{:<14} {:>9} {:>10} {:>16}  pipeline\n",
            "name", "images/s", "vs Pillow", "vs Pillow+draft"
        );
        for row in &self.results {
            let m = row.images_per_s_median;
            let ratio =
                |base: Option<f64>| base.map_or("-".to_string(), |b| format!("{:.2}x", m / b));
            out += &format!(
                "{:<14} {:>9.1} {:>10} {:>16}  {}\n",
                row.name,
                m,
                ratio(pillow),
                ratio(draft),
                row.pipeline
            );
        }
        out
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BenchError + '_ {
    move |source| BenchError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Runs the benchmark, writing synthetic photos and the Pillow script into
/// `workdir` (which must exist). Progress goes to stderr.
pub fn run_decode_bench(
    cfg: &DecodeBenchConfig,
    workdir: &Path,
) -> Result<DecodeBenchReport, BenchError> {
    if cfg.rounds == 0 || cfg.resolution == 0 {
        return Err(BenchError::Config(
            "rounds and resolution must be at least 1".into(),
        ));
    }
    let (files, what) = if cfg.images.is_empty() {
        eprintln!(
            "writing {} synthetic {}x{} photos (JPEG q{}, 4:2:0)",
            cfg.count, cfg.width, cfg.height, cfg.quality
        );
        let mut files = Vec::new();
        for seed in 0..cfg.count {
            let jpeg =
                tensorbake_kit::synth_image::photo_jpeg(cfg.width, cfg.height, seed, cfg.quality)?;
            let path = workdir.join(format!("photo_{seed:03}.jpg"));
            std::fs::write(&path, jpeg).map_err(io(&path))?;
            files.push(path);
        }
        let what = format!(
            "{} synthetic {}x{} JPEGs (q{}, 4:2:0)",
            cfg.count, cfg.width, cfg.height, cfg.quality
        );
        (files, what)
    } else {
        (
            cfg.images.clone(),
            format!("{} given JPEGs", cfg.images.len()),
        )
    };
    if files.is_empty() {
        return Err(BenchError::Config("no images to decode".into()));
    }
    let blobs = files
        .iter()
        .map(|f| std::fs::read(f).map_err(io(f)))
        .collect::<Result<Vec<_>, _>>()?;
    let mean_bytes = blobs.iter().map(Vec::len).sum::<usize>() as f64 / blobs.len() as f64;

    let ours: Vec<Candidate> = if cfg.candidates {
        Candidate::ALL.to_vec()
    } else {
        vec![Candidate::Tensorbake]
    };
    for c in &ours {
        for (blob, path) in blobs.iter().zip(&files) {
            let out = c
                .run(blob, cfg.resolution)
                .map_err(|source| BenchError::Decode {
                    pipeline: c.name().into(),
                    path: path.clone(),
                    source,
                })?;
            assert_eq!(out.len(), (cfg.resolution as usize).pow(2) * 3);
        }
    }
    let script = workdir.join("pillow_decode.py");
    if cfg.python.is_some() {
        std::fs::write(&script, PILLOW_SCRIPT).map_err(io(&script))?;
    }
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); ours.len() + 2];
    let mut pillow_version = None;
    for round in 0..cfg.rounds {
        eprintln!("round {}/{}", round + 1, cfg.rounds);
        for (i, c) in ours.iter().enumerate() {
            let rate = time_pipeline(*c, &blobs, cfg.resolution, cfg.seconds);
            eprintln!("  {:<14} {rate:8.1} images/s", c.name());
            rates[i].push(rate);
        }
        if let Some(python) = &cfg.python {
            let (version, plain, draft) =
                run_pillow(python, &script, &files, cfg.resolution, cfg.seconds)?;
            eprintln!("  {:<14} {plain:8.1} images/s", "pillow");
            eprintln!("  {:<14} {draft:8.1} images/s", "pillow-draft");
            rates[ours.len()].push(plain);
            rates[ours.len() + 1].push(draft);
            pillow_version = Some(version);
        }
    }
    let mut results: Vec<BenchRow> = ours
        .iter()
        .zip(&rates)
        .map(|(c, r)| BenchRow {
            name: c.name().into(),
            pipeline: c.description().into(),
            images_per_s_median: median(r),
            images_per_s_rounds: r.clone(),
        })
        .collect();
    if cfg.python.is_some() {
        for (name, pipeline, r) in [
            (
                "pillow",
                "Pillow: open, convert RGB, ImageOps.fit bicubic",
                &rates[ours.len()],
            ),
            (
                "pillow-draft",
                "same with Image.draft (DCT scale 1/2^k)",
                &rates[ours.len() + 1],
            ),
        ] {
            results.push(BenchRow {
                name: name.into(),
                pipeline: pipeline.into(),
                images_per_s_median: median(r),
                images_per_s_rounds: r.clone(),
            });
        }
    }
    Ok(DecodeBenchReport {
        images: what,
        image_count: blobs.len(),
        mean_bytes,
        resolution: cfg.resolution,
        rounds: cfg.rounds,
        seconds: cfg.seconds,
        pillow_version,
        results,
    })
}

/// Images/s of one pipeline on the calling thread: whole passes over the inputs
/// until `seconds` have elapsed (inputs were checked to decode beforehand).
fn time_pipeline(c: Candidate, blobs: &[Vec<u8>], resolution: u32, seconds: f64) -> f64 {
    let start = Instant::now();
    let mut n = 0usize;
    loop {
        for b in blobs {
            // Checked before timing; a failure here would only make the figure lower.
            let _ = std::hint::black_box(c.run(std::hint::black_box(b), resolution));
        }
        n += blobs.len();
        let elapsed = start.elapsed().as_secs_f64();
        if elapsed >= seconds {
            return n as f64 / elapsed;
        }
    }
}

/// Runs the Pillow script once (both modes); returns (version, plain, draft).
fn run_pillow(
    python: &Path,
    script: &Path,
    files: &[PathBuf],
    resolution: u32,
    seconds: f64,
) -> Result<(String, f64, f64), BenchError> {
    let fail = |message: String| BenchError::Pillow {
        python: python.display().to_string(),
        message,
    };
    let output = Command::new(python)
        .arg(script)
        .arg("--resolution")
        .arg(resolution.to_string())
        .arg("--seconds")
        .arg(seconds.to_string())
        .args(files)
        .output()
        .map_err(|e| fail(format!("cannot start: {e}")))?;
    if !output.status.success() {
        return Err(fail(format!(
            "{}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let v: serde_json::Value = serde_json::from_str(stdout.trim())
        .map_err(|e| fail(format!("unreadable output {stdout:?}: {e}")))?;
    let rate = |mode: &str| {
        v[mode]["images_per_s"]
            .as_f64()
            .ok_or_else(|| fail(format!("output lacks {mode}.images_per_s: {v}")))
    };
    let version = v["pillow_version"].as_str().unwrap_or("?").to_string();
    Ok((version, rate("plain")?, rate("draft")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The whole bench on two tiny images, ours only (no Python in unit tests):
    /// the report has one row per candidate with positive rates per round.
    #[test]
    fn runs_and_reports_every_candidate() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = DecodeBenchConfig {
            count: 2,
            width: 96,
            height: 64,
            resolution: 32,
            seconds: 0.01,
            rounds: 2,
            python: None,
            candidates: true,
            ..DecodeBenchConfig::default()
        };
        let report = run_decode_bench(&cfg, dir.path()).unwrap();
        assert_eq!(report.results.len(), Candidate::ALL.len());
        assert_eq!(report.image_count, 2);
        for row in &report.results {
            assert_eq!(row.images_per_s_rounds.len(), 2);
            assert!(row.images_per_s_median > 0.0, "{}", row.name);
        }
        let table = report.table();
        assert!(
            table.contains("tensorbake") && table.contains("zune-jpeg"),
            "{table}"
        );
        assert!(dir.path().join("photo_001.jpg").exists());
    }

    /// With the test Python (scripts/test.sh installs Pillow): Pillow's rows are
    /// there and the script's output was understood.
    #[test]
    fn runs_the_pillow_peer() {
        let Some(python) = std::env::var_os("TENSORBAKE_PYTHON") else {
            assert!(
                std::env::var("TENSORBAKE_REQUIRE_PYTHON").as_deref() != Ok("1"),
                "TENSORBAKE_REQUIRE_PYTHON=1 but TENSORBAKE_PYTHON is unset"
            );
            eprintln!("skipping runs_the_pillow_peer: TENSORBAKE_PYTHON is unset");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let cfg = DecodeBenchConfig {
            count: 2,
            width: 96,
            height: 64,
            resolution: 32,
            seconds: 0.01,
            rounds: 1,
            python: Some(PathBuf::from(python)),
            ..DecodeBenchConfig::default()
        };
        let report = run_decode_bench(&cfg, dir.path()).unwrap();
        let names: Vec<_> = report.results.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["tensorbake", "pillow", "pillow-draft"]);
        assert!(report.results.iter().all(|r| r.images_per_s_median > 0.0));
        assert!(report.pillow_version.is_some());
    }

    #[test]
    fn pillow_script_is_the_repository_file() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/bench/pillow_decode.py");
        assert_eq!(std::fs::read_to_string(path).unwrap(), PILLOW_SCRIPT);
    }
}
