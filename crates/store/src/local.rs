//! A local-directory target whose puts are durable when they return.
//!
//! `object_store`'s [`LocalFileSystem`] writes a staging file and renames it over the
//! object's path, creating directories on the way, but (by default) never fsyncs: after a
//! power cut an acknowledged put may be missing or empty. The uploader trims the journal
//! once the store has a batch, so a put that is not durable loses acknowledged data.
//!
//! [`DurableLocal`] wraps a [`LocalFileSystem`] and, before a write (put or copy) counts
//! as done, fsyncs
//! 1. the written file (its data; the rename kept the inode), then
//! 2. its parent directory (the rename that published the name), then
//! 3. each ancestor up to the store root, until it reaches one whose own name is already
//!    known durable (directories `LocalFileSystem` created for this put get their names
//!    synced in their parents).
//!
//! The root's own name and its ancestors are synced once, at [`DurableLocal::new`]. The
//! set of directories known named is never invalidated: `LocalFileSystem` (without
//! automatic cleanup) never removes a directory, and nothing else may.
//!
//! Invariant: when `put_opts`/`copy_opts` return `Ok`, the object survives a power cut
//! with the bytes the put carried. Deletes are not synced: a deleted object may reappear
//! after a crash, which GC already tolerates (it deletes what is unreferenced again).
//! Multipart uploads are refused (the store never uses them; their completion would
//! need the same syncing).
//!
//! Every fsync goes through a [`FileSync`], so tests can record what was synced and
//! simulate a power cut (`testing::PowerCut`); production uses [`OsSync`]. S3 puts need
//! none of this: they are durable by contract when acknowledged.

use async_trait::async_trait;
use futures::stream::BoxStream;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, Result,
};
use std::collections::HashSet;
use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// The fsyncs a [`DurableLocal`] needs, behind a trait so tests can observe them.
pub trait FileSync: Send + Sync + fmt::Debug + 'static {
    /// Make a regular file's contents durable.
    fn sync_file(&self, path: &std::path::Path) -> io::Result<()>;
    /// Make a directory's entries (names created, renamed, removed in it) durable.
    fn sync_dir(&self, dir: &std::path::Path) -> io::Result<()>;
}

/// The real fsyncs, through `ripcord_crashsafe`.
#[derive(Debug, Default, Clone, Copy)]
pub struct OsSync;

impl FileSync for OsSync {
    fn sync_file(&self, path: &std::path::Path) -> io::Result<()> {
        ripcord_crashsafe::sync_file(path)
    }
    fn sync_dir(&self, dir: &std::path::Path) -> io::Result<()> {
        ripcord_crashsafe::sync_dir(dir)
    }
}

/// A [`LocalFileSystem`] whose writes are durable when they return (see the module doc).
#[derive(Debug)]
pub struct DurableLocal {
    inner: LocalFileSystem,
    root: PathBuf,
    sync: Arc<dyn FileSync>,
    /// Directories under the root whose own name is known to be durable in their parent.
    named: Mutex<HashSet<PathBuf>>,
}

impl DurableLocal {
    /// Opens the existing directory `root` (canonicalised) and makes its name durable.
    pub fn new(root: &std::path::Path, sync: Arc<dyn FileSync>) -> io::Result<DurableLocal> {
        let root = std::fs::canonicalize(root)?;
        let inner = LocalFileSystem::new_with_prefix(&root).map_err(io::Error::other)?;
        // The root may have just been created (with its parents): sync its name upwards.
        let mut dir = Some(root.as_path());
        while let Some(d) = dir {
            sync.sync_dir(d)?;
            dir = d.parent();
        }
        Ok(DurableLocal {
            inner,
            root,
            sync,
            named: Mutex::new(HashSet::new()),
        })
    }

    /// Fsyncs `location`'s file and the directories up to the first one already named
    /// durably (or the root).
    async fn make_durable(&self, location: &Path) -> Result<()> {
        let file = self.inner.path_to_filesystem(location)?;
        let (sync, root) = (Arc::clone(&self.sync), self.root.clone());
        let known: HashSet<PathBuf> = self.named.lock().expect("named lock").clone();
        let newly_named = tokio::task::spawn_blocking(move || -> io::Result<Vec<PathBuf>> {
            sync.sync_file(&file)?;
            let mut newly_named = Vec::new();
            let mut dir = file.parent();
            while let Some(d) = dir {
                // Syncing `d` makes its entries durable, including the child we came from.
                sync.sync_dir(d)?;
                if d == root || known.contains(d) || !d.starts_with(&root) {
                    break;
                }
                newly_named.push(d.to_path_buf());
                dir = d.parent();
            }
            // Every directory pushed had its parent synced by the next iteration.
            Ok(newly_named)
        })
        .await?
        .map_err(|source| object_store::Error::Generic {
            store: "DurableLocal",
            source: format!("fsync after writing {location}: {source}").into(),
        })?;
        self.named.lock().expect("named lock").extend(newly_named);
        Ok(())
    }
}

impl fmt::Display for DurableLocal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DurableLocal({})", self.root.display())
    }
}

#[async_trait]
impl ObjectStore for DurableLocal {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        let r = self.inner.put_opts(location, payload, opts).await?;
        self.make_durable(location).await?;
        Ok(r)
    }
    async fn put_multipart_opts(
        &self,
        _location: &Path,
        _opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        Err(object_store::Error::NotImplemented {
            operation: "durable multipart upload".into(),
            implementer: "DurableLocal".into(),
        })
    }
    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.inner.get_opts(location, options).await
    }
    async fn get_ranges(
        &self,
        location: &Path,
        ranges: &[std::ops::Range<u64>],
    ) -> Result<Vec<bytes::Bytes>> {
        self.inner.get_ranges(location, ranges).await
    }
    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        self.inner.delete_stream(locations)
    }
    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list(prefix)
    }
    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list_with_offset(prefix, offset)
    }
    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }
    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.inner.copy_opts(from, to, options).await?;
        self.make_durable(to).await
    }
}
