//! The [`Store`] handle: opening, object I/O helpers, escrow and listings.

use crate::error::{Error, Result};
use crate::format::{self, named};
use crate::local::{DurableLocal, OsSync};
use crate::types::{DiskId, EpochInfo, KeyRotation};
use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use std::ops::Range;
use std::sync::Arc;

/// Concurrency for small-object GETs (catalog, index).
pub(crate) const FETCH_CONCURRENCY: usize = 16;

/// Name of the escrow metadata object at the store root.
pub const ESCROW_OBJECT: &str = "escrow.json";

/// A listed object.
#[derive(Debug, Clone)]
pub(crate) struct Listed {
    pub name: String,
    pub size: u64,
    pub modified_ns: u64,
}

/// A target store: an object store plus a key prefix. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    pub(crate) os: Arc<dyn ObjectStore>,
    prefix: String,
}

impl Store {
    /// Opens a store by URL: `file:///abs/path` (directory created if
    /// missing; every put is fsynced with its directories before it returns, see
    /// [`DurableLocal`]), `s3://bucket[/prefix]` (credentials/endpoint/region from the
    /// `AWS_*` environment; plain HTTP is allowed when `AWS_ENDPOINT_URL`
    /// starts with `http://`) or `memory://` (process-local, for tests).
    pub async fn open(url: &str) -> Result<Store> {
        if let Some(path) = url.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(Error::BadUrl {
                    url: url.into(),
                    reason: "file:// needs an absolute path",
                });
            }
            std::fs::create_dir_all(path).map_err(|source| Error::CreateDir {
                path: path.into(),
                source,
            })?;
            let fs = DurableLocal::new(std::path::Path::new(path), Arc::new(OsSync)).map_err(
                |source| Error::OpenDir {
                    path: path.into(),
                    source,
                },
            )?;
            return Ok(Store::new(Arc::new(fs), ""));
        }
        if url == "memory://" || url == "memory:" {
            return Ok(Store::new(
                Arc::new(object_store::memory::InMemory::new()),
                "",
            ));
        }
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(Error::BadUrl {
                    url: url.into(),
                    reason: "missing bucket name",
                });
            }
            let mut b = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(bucket);
            let endpoint = std::env::var("AWS_ENDPOINT_URL").unwrap_or_default();
            if endpoint.starts_with("http://") {
                b = b.with_allow_http(true);
            }
            let s3 = b.build().map_err(|source| Error::Config {
                url: url.into(),
                source,
            })?;
            return Ok(Store::new(Arc::new(s3), prefix));
        }
        Err(Error::BadUrl {
            url: url.into(),
            reason: if url.starts_with('/') {
                "a path, not a URL"
            } else {
                "unknown scheme"
            },
        })
    }

    /// Opens a store that must already exist, for readers (the operator's tool): unlike
    /// [`Store::open`] a missing `file://` directory is not created, and a location without
    /// the store's `escrow.json` (written when the deployment is initialised) is refused
    /// with [`Error::NoStore`] naming the URL, so a mistyped target is an error rather than
    /// an empty store.
    pub async fn open_existing(url: &str) -> Result<Store> {
        if let Some(path) = url.strip_prefix("file://") {
            let dir = std::path::Path::new(path);
            if dir.is_absolute() && !dir.is_dir() {
                return Err(Error::NoStore {
                    url: url.into(),
                    reason: format!("directory {path} does not exist"),
                });
            }
        }
        let store = Store::open(url).await?;
        if store.get_opt(ESCROW_OBJECT).await?.is_none() {
            return Err(Error::NoStore {
                url: url.into(),
                reason: format!(
                    "it holds no {ESCROW_OBJECT} (a store is initialised by `ripcord-ps init`)"
                ),
            });
        }
        Ok(store)
    }

    /// Wraps an object store; every object name is placed under `prefix`
    /// (`""` for the root).
    pub fn new(os: Arc<dyn ObjectStore>, prefix: &str) -> Store {
        Store {
            os,
            prefix: prefix.trim_matches('/').to_string(),
        }
    }

    /// The underlying object store.
    pub fn object_store(&self) -> &Arc<dyn ObjectStore> {
        &self.os
    }

    fn path(&self, rel: &str) -> Path {
        if self.prefix.is_empty() {
            Path::from(rel)
        } else {
            Path::from(format!("{}/{rel}", self.prefix))
        }
    }

    fn rel(&self, p: &Path) -> String {
        let s = p.as_ref();
        if self.prefix.is_empty() {
            s.to_string()
        } else {
            s.strip_prefix(&self.prefix)
                .map(|r| r.trim_start_matches('/'))
                .unwrap_or(s)
                .to_string()
        }
    }

    fn io(object: &str, op: &'static str, e: object_store::Error) -> Error {
        match e {
            object_store::Error::NotFound { .. } => Error::NotFound {
                object: object.into(),
            },
            source => Error::Io {
                object: object.into(),
                op,
                source,
            },
        }
    }

    pub(crate) async fn get(&self, rel: &str) -> Result<Bytes> {
        let r = self
            .os
            .get(&self.path(rel))
            .await
            .map_err(|e| Self::io(rel, "get", e))?;
        r.bytes().await.map_err(|e| Self::io(rel, "get", e))
    }

    pub(crate) async fn get_opt(&self, rel: &str) -> Result<Option<Bytes>> {
        match self.get(rel).await {
            Ok(b) => Ok(Some(b)),
            Err(Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub(crate) async fn get_range(&self, rel: &str, r: Range<u64>) -> Result<Bytes> {
        self.os
            .get_range(&self.path(rel), r)
            .await
            .map_err(|e| Self::io(rel, "ranged get", e))
    }

    pub(crate) async fn get_ranges(&self, rel: &str, r: &[Range<u64>]) -> Result<Vec<Bytes>> {
        self.os
            .get_ranges(&self.path(rel), r)
            .await
            .map_err(|e| Self::io(rel, "ranged get", e))
    }

    pub(crate) async fn put(&self, rel: &str, data: Vec<u8>) -> Result<()> {
        self.os
            .put(&self.path(rel), PutPayload::from(data))
            .await
            .map(|_| ())
            .map_err(|e| Self::io(rel, "put", e))
    }

    /// Deletes an object; a missing object is not an error.
    pub(crate) async fn delete(&self, rel: &str) -> Result<()> {
        match self.os.delete(&self.path(rel)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(Self::io(rel, "delete", e)),
        }
    }

    /// Lists every object under the directory `rel_dir`, sorted by name.
    pub(crate) async fn list(&self, rel_dir: &str) -> Result<Vec<Listed>> {
        self.list_after(rel_dir, None).await
    }

    /// Lists objects under `rel_dir` whose name is greater than `after`
    /// (pushed down to the store where supported), sorted by name.
    pub(crate) async fn list_after(
        &self,
        rel_dir: &str,
        after: Option<&str>,
    ) -> Result<Vec<Listed>> {
        let prefix = self.path(rel_dir);
        let stream = match after {
            Some(a) => self.os.list_with_offset(Some(&prefix), &self.path(a)),
            None => self.os.list(Some(&prefix)),
        };
        let metas: Vec<_> = stream.try_collect().await.or_else(|e| match e {
            object_store::Error::NotFound { .. } => Ok(Vec::new()),
            e => Err(Self::io(rel_dir, "list", e)),
        })?;
        let mut v: Vec<Listed> = metas
            .into_iter()
            .map(|m| Listed {
                name: self.rel(&m.location),
                size: m.size,
                modified_ns: m.last_modified.timestamp_nanos_opt().unwrap_or(0).max(0) as u64,
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(v)
    }

    /// Stores the escrow metadata (`escrow.json`). Written once: succeeds if
    /// absent or identical, fails with [`Error::EscrowConflict`] otherwise.
    pub async fn put_escrow(&self, bytes: &[u8]) -> Result<()> {
        match self.get_opt(ESCROW_OBJECT).await? {
            Some(b) if b.as_ref() == bytes => Ok(()),
            Some(_) => Err(Error::EscrowConflict {
                object: ESCROW_OBJECT.into(),
            }),
            None => self.put(ESCROW_OBJECT, bytes.to_vec()).await,
        }
    }

    /// Reads the escrow metadata ([`Error::NotFound`] if never written).
    pub async fn get_escrow(&self) -> Result<Vec<u8>> {
        Ok(self.get(ESCROW_OBJECT).await?.to_vec())
    }

    /// Disks that have anything in the store.
    pub async fn list_disks(&self) -> Result<Vec<DiskId>> {
        let prefix = self.path("disks");
        let r = self
            .os
            .list_with_delimiter(Some(&prefix))
            .await
            .map_err(|e| Self::io("disks", "list", e))?;
        let mut v: Vec<DiskId> = r
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().and_then(DiskId::from_hex))
            .collect();
        v.sort();
        Ok(v)
    }

    /// Epochs stored for `disk`, ascending.
    pub async fn epochs(&self, disk: &DiskId) -> Result<Vec<EpochInfo>> {
        let listed = self
            .list(&format!("{}/epochs", format::disk_dir(disk)))
            .await?;
        let mut v = Vec::new();
        for l in listed {
            if let Some(e) = format::parse_epoch(&l.name) {
                v.push(self.epoch_info(disk, e).await?);
            }
        }
        Ok(v)
    }

    /// The key rotations of `epoch` of `disk`, by `from_seq` ascending (empty: every
    /// batch of the epoch is sealed with the epoch description's key).
    pub async fn key_rotations(&self, disk: &DiskId, epoch: u64) -> Result<Vec<KeyRotation>> {
        let dir = format!("{}/keys", format::disk_dir(disk));
        let mut v = Vec::new();
        for l in self.list(&dir).await? {
            let Some((e, from_seq)) = format::parse_key_rotation(&l.name) else {
                continue;
            };
            if e == epoch {
                let bytes = self.get(&l.name).await?;
                v.push(named(
                    format::decode_key_rotation(&bytes, e, from_seq),
                    &l.name,
                )?);
            }
        }
        v.sort_by_key(|k| k.from_seq);
        Ok(v)
    }

    /// Reads one epoch description.
    pub async fn epoch_info(&self, disk: &DiskId, epoch: u64) -> Result<EpochInfo> {
        let name = format::epoch_name(disk, epoch);
        match self.get(&name).await {
            Ok(b) => named(format::decode_epoch(&b, epoch), &name),
            Err(Error::NotFound { object }) => Err(Error::UnknownEpoch {
                disk: disk.to_string(),
                epoch,
                object,
            }),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn open_existing_refuses_a_missing_directory_and_creates_nothing() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("no-such-store");
        let url = format!("file://{}", dir.display());
        let e = Store::open_existing(&url)
            .await
            .expect_err("a missing directory");
        assert!(matches!(e, Error::NoStore { .. }), "{e:?}");
        let text = e.to_string();
        assert!(
            text.contains(&url) && text.contains("does not exist"),
            "{text}"
        );
        assert!(!dir.exists(), "open_existing created {}", dir.display());
    }

    #[tokio::test]
    async fn open_existing_refuses_a_directory_without_escrow() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let url = format!("file://{}", tmp.path().display());
        let e = Store::open_existing(&url)
            .await
            .expect_err("an empty directory");
        let text = e.to_string();
        assert!(
            text.contains("no ripcord store") && text.contains(ESCROW_OBJECT),
            "{text}"
        );
        let store = Store::open(&url).await.expect("open");
        store.put_escrow(b"{}").await.expect("escrow");
        Store::open_existing(&url)
            .await
            .expect("a store with escrow.json opens");
    }

    #[tokio::test]
    async fn a_plain_path_is_refused_suggesting_the_file_url() {
        let e = Store::open("/var/lib/x")
            .await
            .expect_err("a path is not a URL");
        let text = e.to_string();
        assert!(
            text.contains("file:///abs/path")
                && text.contains("s3://bucket/prefix")
                && text.contains("did you mean file:///var/lib/x?")
                && !text.contains("memory://"),
            "{text}"
        );
    }
}
