//! Finding model weights offline and fingerprinting them.
//!
//! A weights location is either a local directory in Hugging Face layout (what
//! `huggingface-cli download` or `save_pretrained` writes: `config.json`,
//! `model.safetensors` or sharded `model-0000x-of-0000y.safetensors` with an
//! `*.safetensors.index.json`, diffusers' `diffusion_pytorch_model.safetensors`,
//! BFL's `ae.safetensors`, sub-folders such as `vae/`), or a hub id `org/name` with an
//! optional `@revision`, looked up in the local Hugging Face cache
//! (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`). Nothing is
//! downloaded: a missing model is an error that says how to fetch it.
//!
//! The fingerprint recorded in the store is the sha256 of the safetensors bytes. For a
//! single file it equals the Git LFS object id the hub shows for that file; in the HF
//! cache the blob is already named by that hash, so no byte is read twice.

use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// A resolved model directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelDir {
    /// The directory holding `config.json` and the weights.
    pub root: PathBuf,
    /// What the user gave (path or hub id), for messages and the store.
    pub spec: String,
}

impl ModelDir {
    /// Resolves a local directory or a hub id in the HF cache.
    pub fn resolve(spec: &str) -> Result<Self> {
        let path = Path::new(spec);
        if path.is_dir() {
            return Ok(Self {
                root: path.to_path_buf(),
                spec: spec.to_string(),
            });
        }
        if path.exists() {
            return Err(Error::WeightsNotFound {
                spec: spec.to_string(),
                why: "it is a file; give the model directory (the one holding config.json)".into(),
            });
        }
        let (id, revision) = match spec.split_once('@') {
            Some((id, rev)) => (id, rev),
            None => (spec, "main"),
        };
        let looks_like_hub_id =
            id.split('/').count() == 2 && !id.starts_with('.') && !id.starts_with('/');
        if !looks_like_hub_id {
            return Err(Error::WeightsNotFound {
                spec: spec.to_string(),
                why: "no such directory, and not a hub id of the form org/name".into(),
            });
        }
        let cache = hf_cache_dir();
        let repo = cache.join(format!("models--{}", id.replace('/', "--")));
        let not_cached = |what: String| Error::WeightsNotFound {
            spec: spec.to_string(),
            why: format!(
                "{what}; tensorbake never downloads: run `huggingface-cli download {id}` \
                 (or set HF_HUB_CACHE / HF_HOME to the cache that holds it)"
            ),
        };
        if !repo.is_dir() {
            return Err(not_cached(format!(
                "not in the Hugging Face cache at {}",
                cache.display()
            )));
        }
        // A revision is a ref name (refs/<name> holds the commit) or a commit hash.
        let commit = match std::fs::read_to_string(repo.join("refs").join(revision)) {
            Ok(c) => c.trim().to_string(),
            Err(_) => revision.to_string(),
        };
        let snap = repo.join("snapshots").join(&commit);
        if !snap.is_dir() {
            return Err(not_cached(format!(
                "revision `{revision}` has no snapshot in {}",
                repo.display()
            )));
        }
        Ok(Self {
            root: snap,
            spec: spec.to_string(),
        })
    }

    /// A sub-directory (`vae`, `text_encoder`, ...) as a model directory of its own.
    pub fn sub(&self, name: &str) -> Option<Self> {
        let p = self.root.join(name);
        p.is_dir().then(|| Self {
            root: p,
            spec: format!("{}/{name}", self.spec),
        })
    }

    /// The path of a file in the directory, if present.
    pub fn file(&self, name: &str) -> Option<PathBuf> {
        let p = self.root.join(name);
        p.is_file().then_some(p)
    }

    /// Reads and parses a JSON file of the directory (e.g. `config.json`).
    pub fn json<T: serde::de::DeserializeOwned>(&self, name: &str) -> Result<T> {
        let path = self.root.join(name);
        let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|e| Error::BadFile {
            path,
            why: format!("invalid JSON: {e}"),
        })
    }

    /// The safetensors files of the model: the first of `stems` (e.g. `model`,
    /// `diffusion_pytorch_model`, `ae`) present as `<stem>.safetensors`, or as a
    /// sharded set listed by `<stem>.safetensors.index.json`.
    pub fn safetensors(&self, stems: &[&str]) -> Result<Vec<PathBuf>> {
        for stem in stems {
            if let Some(p) = self.file(&format!("{stem}.safetensors")) {
                return Ok(vec![p]);
            }
            let index = format!("{stem}.safetensors.index.json");
            if self.file(&index).is_some() {
                let v: serde_json::Value = self.json(&index)?;
                let map = v
                    .get("weight_map")
                    .and_then(|m| m.as_object())
                    .ok_or_else(|| Error::BadFile {
                        path: self.root.join(&index),
                        why: "no `weight_map` object".into(),
                    })?;
                let mut files: Vec<String> = map
                    .values()
                    .filter_map(|f| f.as_str().map(str::to_string))
                    .collect();
                files.sort();
                files.dedup();
                return files
                    .into_iter()
                    .map(|f| {
                        self.file(&f).ok_or_else(|| Error::BadFile {
                            path: self.root.join(&index),
                            why: format!("lists `{f}`, which is missing"),
                        })
                    })
                    .collect();
            }
        }
        Err(Error::WeightsNotFound {
            spec: self.spec.clone(),
            why: format!(
                "no {} in {}",
                stems
                    .iter()
                    .map(|s| format!("{s}.safetensors"))
                    .collect::<Vec<_>>()
                    .join(" or "),
                self.root.display()
            ),
        })
    }
}

/// The Hugging Face hub cache directory, as huggingface_hub finds it.
pub fn hf_cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE") {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("HF_HOME") {
        return PathBuf::from(p).join("hub");
    }
    dirs::home_dir()
        .unwrap_or_default()
        .join(".cache/huggingface/hub")
}

/// sha256 (hex) of one file. In the HF cache, a snapshot file is a link to a blob
/// named by its sha256 (64 hex digits), which is used without reading the file.
pub fn file_sha256(path: &Path) -> Result<String> {
    if let Ok(target) = std::fs::read_link(path)
        && let Some(name) = target.file_name().and_then(|n| n.to_str())
        && name.len() == 64
        && name.bytes().all(|b| b.is_ascii_hexdigit())
    {
        return Ok(name.to_ascii_lowercase());
    }
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// The fingerprint of a set of weight files: the file's sha256 for one file; for
/// several, the sha256 of their sha256s in file-name order (one per line).
pub fn fingerprint(files: &[PathBuf]) -> Result<String> {
    let mut sorted: Vec<&PathBuf> = files.iter().collect();
    sorted.sort_by_key(|p| p.file_name().map(|n| n.to_os_string()));
    let hashes = sorted
        .iter()
        .map(|p| file_sha256(p))
        .collect::<Result<Vec<_>>>()?;
    if let [one] = hashes.as_slice() {
        return Ok(one.clone());
    }
    let mut hasher = Sha256::new();
    for h in &hashes {
        hasher.update(h.as_bytes());
        hasher.update(b"\n");
    }
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_local_dirs_and_sharded_weights() {
        let dir = tempfile::tempdir().unwrap();
        let m = ModelDir::resolve(dir.path().to_str().unwrap()).unwrap();
        let err = m.safetensors(&["model"]).unwrap_err().to_string();
        assert!(err.contains("model.safetensors"), "{err}");
        std::fs::write(dir.path().join("a.safetensors"), b"one").unwrap();
        std::fs::write(dir.path().join("b.safetensors"), b"two").unwrap();
        std::fs::write(
            dir.path().join("model.safetensors.index.json"),
            r#"{"weight_map": {"x": "b.safetensors", "y": "a.safetensors", "z": "b.safetensors"}}"#,
        )
        .unwrap();
        let files = m
            .safetensors(&["diffusion_pytorch_model", "model"])
            .unwrap();
        assert_eq!(
            files,
            vec![
                dir.path().join("a.safetensors"),
                dir.path().join("b.safetensors")
            ]
        );
        // sha256("one") and sha256("two") combined; order of the input does not matter.
        let fp = fingerprint(&files).unwrap();
        let rev: Vec<PathBuf> = files.iter().rev().cloned().collect();
        assert_eq!(fp, fingerprint(&rev).unwrap());
        assert_eq!(
            file_sha256(&files[0]).unwrap(),
            "7692c3ad3540bb803c020b3aee66cd8887123234ea0c6e7143c0add73ff431ed"
        );
        // a missing shard is named
        std::fs::remove_file(dir.path().join("b.safetensors")).unwrap();
        let err = m.safetensors(&["model"]).unwrap_err().to_string();
        assert!(
            err.contains("b.safetensors") && err.contains("missing"),
            "{err}"
        );
    }

    #[test]
    fn resolves_hub_ids_in_the_cache_and_explains_misses() {
        let cache = tempfile::tempdir().unwrap();
        let repo = cache.path().join("models--org--tiny");
        let commit = "0123456789abcdef0123456789abcdef01234567";
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::create_dir_all(repo.join("snapshots").join(commit)).unwrap();
        std::fs::create_dir_all(repo.join("blobs")).unwrap();
        std::fs::write(repo.join("refs/main"), format!("{commit}\n")).unwrap();
        let blob_hash = "a".repeat(64);
        std::fs::write(repo.join("blobs").join(&blob_hash), b"weights").unwrap();
        #[cfg(unix)]
        std::os::unix::fs::symlink(
            format!("../../blobs/{blob_hash}"),
            repo.join("snapshots")
                .join(commit)
                .join("model.safetensors"),
        )
        .unwrap();
        temp_env(cache.path(), || {
            let m = ModelDir::resolve("org/tiny").unwrap();
            assert_eq!(m.root, repo.join("snapshots").join(commit));
            let m2 = ModelDir::resolve(&format!("org/tiny@{commit}")).unwrap();
            assert_eq!(m2.root, m.root);
            #[cfg(unix)]
            {
                let files = m.safetensors(&["model"]).unwrap();
                assert_eq!(fingerprint(&files).unwrap(), blob_hash);
            }
            let err = ModelDir::resolve("org/absent").unwrap_err().to_string();
            assert!(err.contains("huggingface-cli download org/absent"), "{err}");
            let err = ModelDir::resolve("org/tiny@v2").unwrap_err().to_string();
            assert!(err.contains("revision `v2`"), "{err}");
            let err = ModelDir::resolve("no/such/dir").unwrap_err().to_string();
            assert!(err.contains("not a hub id"), "{err}");
        });
    }

    fn temp_env(cache: &Path, f: impl FnOnce()) {
        // set_var is unsafe in edition 2024: one lock serialises every test that sets it.
        let _guard = ENV_LOCK.lock().unwrap();
        let old = std::env::var_os("HF_HUB_CACHE");
        set_env("HF_HUB_CACHE", Some(cache.as_os_str()));
        f();
        set_env("HF_HUB_CACHE", old.as_deref());
    }

    static ENV_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

    #[allow(unsafe_code)]
    fn set_env(k: &str, v: Option<&std::ffi::OsStr>) {
        // SAFETY: guarded by ENV_LOCK; no other thread in this crate's tests reads HF_HUB_CACHE.
        unsafe {
            match v {
                Some(v) => std::env::set_var(k, v),
                None => std::env::remove_var(k),
            }
        }
    }
}
