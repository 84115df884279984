//! The manifest: one TOML file that configures every stage of a job.
//!
//! Each table deserializes into the config struct of the stage that owns it
//! (`[source]`, `[preprocess]`, `[captions]`, `[network]`, `[ingest]`, `[[encoders]]`,
//! `[run]`, `[zarr]`);
//! unknown keys anywhere are an error that names the key, the file and the line.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use tensorbake_encode::EncoderConfig;
use tensorbake_ingest::caption::CleanConfig;
use tensorbake_ingest::image::PreprocessConfig;
use tensorbake_ingest::pipeline::{IngestConfig, ParallelConfig, SourceConfig};
use tensorbake_ingest::source::NetworkConfig;
use tensorbake_kit::rank::Rank;
use tensorbake_run::{RunConfig, RunOptions};
use tensorbake_store::{Location, StoreOptions};

/// A job manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// A name for the job (reports, store attributes).
    pub name: String,
    /// Where `tensorbake run` writes (a directory or `s3://bucket/prefix`).
    #[serde(default)]
    pub store: Option<String>,
    /// The shards and their layout.
    pub source: SourceConfig,
    /// Image decoding and resizing.
    #[serde(default)]
    pub preprocess: PreprocessConfig,
    /// Caption cleaning.
    #[serde(default)]
    pub captions: CleanConfig,
    /// Network behaviour (timeouts, retries).
    #[serde(default)]
    pub network: NetworkConfig,
    /// Parallelism of the ingest stage.
    #[serde(default)]
    pub ingest: ParallelConfig,
    /// The encoders `tensorbake run` applies.
    #[serde(default)]
    pub encoders: Vec<EncoderConfig>,
    /// Queues and threads of `tensorbake run`.
    #[serde(default)]
    pub run: RunOptions,
    /// Layout of the parts `tensorbake run` writes (Zarr shard size, zstd level).
    #[serde(default)]
    pub zarr: StoreOptions,
}

impl Manifest {
    /// Reads and validates a manifest file.
    pub fn load(path: &Path) -> Result<(Self, PathBuf)> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("manifest {}", path.display()))?;
        let manifest = Self::parse(&text, &path.display().to_string())?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let base = if base.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            base
        };
        Ok((manifest, base))
    }

    /// Parses manifest text; `origin` names the file in errors (`file:line:col: ...`).
    pub fn parse(text: &str, origin: &str) -> Result<Self> {
        toml::from_str(text).map_err(|e| {
            let at = e.span().map(|s| {
                let line = text[..s.start].matches('\n').count() + 1;
                let col = s.start - text[..s.start].rfind('\n').map_or(0, |i| i + 1) + 1;
                format!(":{line}:{col}")
            });
            anyhow::anyhow!(
                "manifest {origin}{}: {}",
                at.unwrap_or_default(),
                e.message().trim()
            )
        })
    }

    /// The ingest stage's configuration, paths resolved against `base`.
    pub fn ingest_config(&self, base: &Path) -> IngestConfig {
        IngestConfig {
            source: self.source.clone(),
            preprocess: self.preprocess.clone(),
            captions: self.captions.clone(),
            network: self.network.clone(),
            parallel: self.ingest.clone(),
            base_dir: base.to_path_buf(),
        }
    }

    /// The configuration of `tensorbake run`: `output` (a flag, relative to the
    /// working directory) overrides the manifest's `store` (relative to `base`).
    pub fn run_config(&self, base: &Path, output: Option<&str>, rank: Rank) -> Result<RunConfig> {
        let store = match (output, &self.store) {
            (Some(o), _) => o.to_string(),
            (None, Some(s)) => tensorbake_ingest::shards::resolve(s, base),
            (None, None) => anyhow::bail!(
                "no store: set `store = \"DIR\"` (or s3://bucket/prefix) in the manifest, or pass --output"
            ),
        };
        let store: Location = store.parse()?;
        Ok(RunConfig {
            name: self.name.clone(),
            ingest: self.ingest_config(base),
            encoders: self.encoders.clone(),
            store,
            layout: self.zarr,
            rank,
            options: self.run.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_manifests_parse_and_round_trip() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let p = entry.unwrap().path();
            if p.extension().is_some_and(|e| e == "toml")
                && !p
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("train")
            {
                let (m, _) =
                    Manifest::load(&p).unwrap_or_else(|e| panic!("{}: {e:#}", p.display()));
                let again = Manifest::parse(&toml::to_string(&m).unwrap(), "round-trip").unwrap();
                assert_eq!(m, again, "{}", p.display());
                n += 1;
            }
        }
        assert!(
            n >= 3,
            "expected the sa1b, pd12m and webdataset manifests, found {n}"
        );
    }

    #[test]
    fn unknown_keys_name_the_key_file_and_line() {
        let text = "name = \"x\"\n[source]\nkind = \"webdataset\"\nurls = [\"a.tar\"]\ncaption_feild = \"txt\"\n";
        let e = Manifest::parse(text, "m.toml").unwrap_err().to_string();
        assert!(
            e.starts_with("manifest m.toml:5:1:") && e.contains("caption_feild"),
            "{e}"
        );
        let e = Manifest::parse("name = \"x\"\n[source]\nkind = \"tarball\"\n", "m.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("tarball") && e.contains("m.toml:3"), "{e}");
        let e = Manifest::parse(
            "name = \"x\"\n[source]\nkind = \"sa1b\"\n[preprocess]\nresolutoin = 5\n",
            "m.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("resolutoin"), "{e}");
    }
}
