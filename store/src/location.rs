//! Where a store lives: a local directory or an S3-compatible bucket prefix, and the
//! storage handle (zarrs) that reads and writes it.
//!
//! S3 locations are `s3://bucket/prefix`; endpoint, region and credentials come from
//! the usual environment variables (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION`, `AWS_ALLOW_HTTP`), read
//! by `object_store`'s `AmazonS3Builder::from_env`. S3 access is synchronous: it runs
//! on a private tokio runtime, so call the store from plain threads (or
//! `spawn_blocking`), never from inside an async task.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use zarrs::storage::{
    Bytes, ReadableWritableListableStorage, ReadableWritableListableStorageTraits, StoreKey,
    StorePrefix,
};
use zarrs_storage::storage_adapter::async_to_sync::{
    AsyncToSyncBlockOn, AsyncToSyncStorageAdapter,
};

use crate::StoreError;

/// A store location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A directory on a local (or mounted) filesystem.
    Local(PathBuf),
    /// A prefix in an S3-compatible bucket.
    S3 {
        /// Bucket name.
        bucket: String,
        /// Key prefix inside the bucket, without leading or trailing `/` (may be empty).
        prefix: String,
    },
}

impl FromStr for Location {
    type Err = StoreError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(rest) = s.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(StoreError::Location {
                    location: s.to_string(),
                    reason: "no bucket name after s3://".into(),
                });
            }
            return Ok(Self::S3 {
                bucket: bucket.to_string(),
                prefix: prefix.trim_matches('/').to_string(),
            });
        }
        if let Some((scheme, _)) = s.split_once("://")
            && scheme != "file"
        {
            return Err(StoreError::Location {
                location: s.to_string(),
                reason: format!(
                    "unsupported scheme {scheme}:// (use a local path, file:// or s3://)"
                ),
            });
        }
        let path = s.strip_prefix("file://").unwrap_or(s);
        if path.is_empty() {
            return Err(StoreError::Location {
                location: s.to_string(),
                reason: "empty path".into(),
            });
        }
        Ok(Self::Local(PathBuf::from(path)))
    }
}

impl From<&Path> for Location {
    fn from(path: &Path) -> Self {
        Self::Local(path.to_path_buf())
    }
}

impl From<PathBuf> for Location {
    fn from(path: PathBuf) -> Self {
        Self::Local(path)
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Local(path) => write!(f, "{}", path.display()),
            Self::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            Self::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
        }
    }
}

struct TokioBlockOn(tokio::runtime::Handle);

impl AsyncToSyncBlockOn for TokioBlockOn {
    fn block_on<F: core::future::Future>(&self, future: F) -> F::Output {
        self.0.block_on(future)
    }
}

/// An opened location: the zarrs storage plus what is needed for atomic writes.
pub(crate) struct Backend {
    pub(crate) location: Location,
    pub(crate) storage: ReadableWritableListableStorage,
    /// Keeps the runtime of an S3 backend alive as long as the storage.
    _runtime: Option<Arc<tokio::runtime::Runtime>>,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend")
            .field("location", &self.location)
            .finish_non_exhaustive()
    }
}

impl Backend {
    /// Opens the storage of `location`; a local directory is created when `create`.
    /// `handle_cache` keeps that many local files open between reads (readers only:
    /// cached handles do not see files replaced by another process).
    pub(crate) fn open(
        location: &Location,
        create: bool,
        handle_cache: usize,
    ) -> Result<Self, StoreError> {
        match location {
            Location::Local(path) => {
                if create {
                    std::fs::create_dir_all(path).map_err(|source| StoreError::Io {
                        path: path.display().to_string(),
                        source,
                    })?;
                } else if !path.is_dir() {
                    return Err(StoreError::NotAStore {
                        location: location.to_string(),
                        reason: "no such directory".into(),
                    });
                }
                let mut options = zarrs::filesystem::FilesystemStoreOptions::default();
                options.file_handle_cache_size(handle_cache);
                let fs = zarrs::filesystem::FilesystemStore::new_with_options(path, options)
                    .map_err(|e| StoreError::Location {
                        location: location.to_string(),
                        reason: e.to_string(),
                    })?;
                Ok(Self {
                    location: location.clone(),
                    storage: Arc::new(fs),
                    _runtime: None,
                })
            }
            Location::S3 { bucket, prefix } => {
                let s3 = object_store::aws::AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .build()
                    .map_err(|e| StoreError::ObjectStore {
                        location: location.to_string(),
                        source: Box::new(e),
                    })?;
                let runtime = Arc::new(
                    tokio::runtime::Builder::new_multi_thread()
                        .worker_threads(2)
                        .thread_name("tensorbake-s3")
                        .enable_all()
                        .build()
                        .map_err(|source| StoreError::Io {
                            path: "tokio runtime for S3".into(),
                            source,
                        })?,
                );
                let storage: Arc<dyn ReadableWritableListableStorageTraits> = if prefix.is_empty() {
                    let store = zarrs_object_store::AsyncObjectStore::new(s3);
                    Arc::new(AsyncToSyncStorageAdapter::new(
                        Arc::new(store),
                        TokioBlockOn(runtime.handle().clone()),
                    ))
                } else {
                    let prefixed = object_store::prefix::PrefixStore::new(s3, prefix.as_str());
                    let store = zarrs_object_store::AsyncObjectStore::new(prefixed);
                    Arc::new(AsyncToSyncStorageAdapter::new(
                        Arc::new(store),
                        TokioBlockOn(runtime.handle().clone()),
                    ))
                };
                Ok(Self {
                    location: location.clone(),
                    storage,
                    _runtime: Some(runtime),
                })
            }
        }
    }

    fn storage_err(
        &self,
        op: &'static str,
        key: &str,
        e: zarrs::storage::StorageError,
    ) -> StoreError {
        StoreError::Storage {
            location: self.location.to_string(),
            op,
            key: key.to_string(),
            source: Box::new(e),
        }
    }

    pub(crate) fn get(&self, key: &str) -> Result<Option<Bytes>, StoreError> {
        let k = store_key(key);
        self.storage
            .get(&k)
            .map_err(|e| self.storage_err("read", key, e))
    }

    pub(crate) fn get_json(&self, key: &str) -> Result<Option<serde_json::Value>, StoreError> {
        let Some(bytes) = self.get(key)? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| StoreError::Metadata {
                location: self.location.to_string(),
                key: key.to_string(),
                reason: e.to_string(),
            })
    }

    /// Writes `value` so that readers see either the old object or the whole new one:
    /// a temporary file renamed over the target locally, a single PUT on S3.
    pub(crate) fn put_atomic(&self, key: &str, value: Vec<u8>) -> Result<(), StoreError> {
        match &self.location {
            Location::Local(root) => {
                let target = root.join(key);
                let dir = target.parent().unwrap_or(root);
                let io = |path: &Path, source| StoreError::Io {
                    path: path.display().to_string(),
                    source,
                };
                std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos());
                // Unique per process, thread and call: concurrent writers of the same
                // key (identical null embeddings) each rename their own temporary file.
                static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
                let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let tmp = dir.join(format!(
                    ".{}.tmp-{}-{nanos}-{seq}",
                    target
                        .file_name()
                        .and_then(|n| n.to_str())
                        .unwrap_or("zarr.json"),
                    std::process::id()
                ));
                {
                    use std::io::Write;
                    let mut file = std::fs::File::create(&tmp).map_err(|e| io(&tmp, e))?;
                    file.write_all(&value).map_err(|e| io(&tmp, e))?;
                    file.sync_all().map_err(|e| io(&tmp, e))?;
                }
                std::fs::rename(&tmp, &target).map_err(|e| io(&target, e))?;
                Ok(())
            }
            Location::S3 { .. } => {
                let k = store_key(key);
                self.storage
                    .set(&k, Bytes::from(value))
                    .map_err(|e| self.storage_err("write", key, e))
            }
        }
    }

    /// Child "directories" of `prefix` (names without the trailing `/`).
    pub(crate) fn list_dirs(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let p = store_prefix(prefix);
        let listing = self
            .storage
            .list_dir(&p)
            .map_err(|e| self.storage_err("list", prefix, e))?;
        let mut names: Vec<String> = listing
            .prefixes()
            .iter()
            .filter_map(|child| {
                child
                    .as_str()
                    .strip_prefix(p.as_str())
                    .map(|rest| rest.trim_end_matches('/').to_string())
            })
            .filter(|n| !n.is_empty())
            .collect();
        names.sort();
        Ok(names)
    }

    /// Total stored bytes under `prefix`.
    pub(crate) fn size_prefix(&self, prefix: &str) -> Result<u64, StoreError> {
        let p = store_prefix(prefix);
        self.storage
            .size_prefix(&p)
            .map_err(|e| self.storage_err("list", prefix, e))
    }

    /// Deletes everything under `prefix`.
    pub(crate) fn erase_prefix(&self, prefix: &str) -> Result<(), StoreError> {
        let p = store_prefix(prefix);
        self.storage
            .erase_prefix(&p)
            .map_err(|e| self.storage_err("delete", prefix, e))
    }
}

fn store_key(key: &str) -> StoreKey {
    // Keys are built from validated components; this cannot fail for them.
    StoreKey::new(key).unwrap_or_else(|_| StoreKey::new("invalid-key").expect("valid key"))
}

fn store_prefix(prefix: &str) -> StorePrefix {
    let p = if prefix.is_empty() || prefix.ends_with('/') {
        prefix.to_string()
    } else {
        format!("{prefix}/")
    };
    StorePrefix::new(p).unwrap_or_else(|_| StorePrefix::root())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_locations() {
        assert_eq!(
            "s3://bucket/a/b/".parse::<Location>().unwrap(),
            Location::S3 {
                bucket: "bucket".into(),
                prefix: "a/b".into()
            }
        );
        assert_eq!(
            "s3://bucket".parse::<Location>().unwrap(),
            Location::S3 {
                bucket: "bucket".into(),
                prefix: String::new()
            }
        );
        assert_eq!(
            "/x/y.zarr".parse::<Location>().unwrap(),
            Location::Local("/x/y.zarr".into())
        );
        assert_eq!(
            "file:///x".parse::<Location>().unwrap(),
            Location::Local("/x".into())
        );
        assert!(
            "gs://b/x"
                .parse::<Location>()
                .unwrap_err()
                .to_string()
                .contains("gs://")
        );
        assert!("s3:///x".parse::<Location>().is_err());
        assert_eq!(
            "s3://bucket/a/b".parse::<Location>().unwrap().to_string(),
            "s3://bucket/a/b"
        );
    }
}
