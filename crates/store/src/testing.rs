//! Object-store wrappers for tests and fault injection: [`CountingStore`]
//! counts requests, [`FaultyStore`] fails chosen puts/gets, and [`PowerCut`] records
//! what a [`DurableLocal`](crate::local::DurableLocal) fsynced so a test can see what a
//! power cut would leave.

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, Result,
};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsString;
use std::fmt;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Request counters of a [`CountingStore`].
#[derive(Debug, Default)]
pub struct Counts {
    /// GET requests (a `get_ranges` call counts once per call).
    pub gets: AtomicU64,
    /// PUT requests.
    pub puts: AtomicU64,
    /// LIST requests.
    pub lists: AtomicU64,
    /// DELETE requests.
    pub deletes: AtomicU64,
}

impl Counts {
    /// (gets, puts, lists, deletes).
    pub fn snapshot(&self) -> (u64, u64, u64, u64) {
        (
            self.gets.load(Ordering::SeqCst),
            self.puts.load(Ordering::SeqCst),
            self.lists.load(Ordering::SeqCst),
            self.deletes.load(Ordering::SeqCst),
        )
    }

    /// Resets every counter.
    pub fn reset(&self) {
        for c in [&self.gets, &self.puts, &self.lists, &self.deletes] {
            c.store(0, Ordering::SeqCst);
        }
    }
}

/// Counts requests to an inner store.
#[derive(Debug)]
pub struct CountingStore {
    inner: Arc<dyn ObjectStore>,
    /// The counters.
    pub counts: Arc<Counts>,
}

impl CountingStore {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn ObjectStore>) -> CountingStore {
        CountingStore {
            inner,
            counts: Arc::default(),
        }
    }
}

impl fmt::Display for CountingStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Counting({})", self.inner)
    }
}

/// What a [`FaultyStore`] should break.
#[derive(Debug, Default, Clone)]
pub struct Faults {
    /// Fail the put with this 1-based number, counted from when set.
    pub fail_nth_put: Option<u64>,
    /// Fail every put whose path contains this string.
    pub fail_puts_containing: Option<String>,
    /// Perform failing puts anyway (the acknowledgement is "lost").
    pub lose_ack: bool,
    /// Fail every get whose path contains this string.
    pub fail_gets_containing: Option<String>,
    /// Fail (without deleting) every delete whose path contains this string: a crash
    /// after the writes before it.
    pub fail_deletes_containing: Option<String>,
}

/// Injects failures into an inner store.
#[derive(Debug)]
pub struct FaultyStore {
    inner: Arc<dyn ObjectStore>,
    faults: Mutex<(Faults, u64)>,
}

impl FaultyStore {
    /// Wraps `inner` with no faults.
    pub fn new(inner: Arc<dyn ObjectStore>) -> FaultyStore {
        FaultyStore {
            inner,
            faults: Mutex::new((Faults::default(), 0)),
        }
    }

    /// Replaces the fault plan (and restarts put counting).
    pub fn set(&self, f: Faults) {
        *self.faults.lock().unwrap() = (f, 0);
    }

    fn injected(what: &str) -> object_store::Error {
        object_store::Error::Generic {
            store: "FaultyStore",
            source: format!("injected {what} failure").into(),
        }
    }
}

impl fmt::Display for FaultyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Faulty({})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for CountingStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        self.counts.puts.fetch_add(1, Ordering::SeqCst);
        self.inner.put_opts(location, payload, opts).await
    }
    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.counts.puts.fetch_add(1, Ordering::SeqCst);
        self.inner.put_multipart_opts(location, opts).await
    }
    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.counts.gets.fetch_add(1, Ordering::SeqCst);
        self.inner.get_opts(location, options).await
    }
    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        self.counts.gets.fetch_add(1, Ordering::SeqCst);
        self.inner.get_ranges(location, ranges).await
    }
    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        self.counts.deletes.fetch_add(1, Ordering::SeqCst);
        self.inner.delete_stream(locations)
    }
    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.counts.lists.fetch_add(1, Ordering::SeqCst);
        self.inner.list(prefix)
    }
    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, Result<ObjectMeta>> {
        self.counts.lists.fetch_add(1, Ordering::SeqCst);
        self.inner.list_with_offset(prefix, offset)
    }
    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.counts.lists.fetch_add(1, Ordering::SeqCst);
        self.inner.list_with_delimiter(prefix).await
    }
    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}

#[async_trait]
impl ObjectStore for FaultyStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        let (fail, lose_ack) = {
            let mut g = self.faults.lock().unwrap();
            g.1 += 1;
            let n = g.1;
            let f = &g.0;
            let fail = f.fail_nth_put == Some(n)
                || f.fail_puts_containing
                    .as_deref()
                    .is_some_and(|s| location.as_ref().contains(s));
            (fail, f.lose_ack)
        };
        if fail {
            if lose_ack {
                self.inner.put_opts(location, payload, opts).await?;
            }
            return Err(Self::injected("put"));
        }
        self.inner.put_opts(location, payload, opts).await
    }
    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }
    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        let fail = {
            let g = self.faults.lock().unwrap();
            g.0.fail_gets_containing
                .as_deref()
                .is_some_and(|s| location.as_ref().contains(s))
        };
        if fail {
            return Err(Self::injected("get"));
        }
        self.inner.get_opts(location, options).await
    }
    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        use futures::StreamExt;
        let pattern = self
            .faults
            .lock()
            .unwrap()
            .0
            .fail_deletes_containing
            .clone();
        let Some(pattern) = pattern else {
            return self.inner.delete_stream(locations);
        };
        let inner = self.inner.clone();
        locations
            .flat_map(move |r| match r {
                Ok(p) if p.as_ref().contains(pattern.as_str()) => {
                    futures::stream::once(async { Err(Self::injected("delete")) }).boxed()
                }
                other => inner.delete_stream(futures::stream::once(async move { other }).boxed()),
            })
            .boxed()
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
        self.inner.copy_opts(from, to, options).await
    }
}

/// A [`FileSync`](crate::local::FileSync) that records, instead of performing, each
/// fsync: the file's bytes at the time it was synced, and the names a directory held when
/// it was synced. [`PowerCut::survivors`] is then what a power cut at that instant would
/// leave: only files whose contents were synced and whose name, and every directory name
/// above it up to the root, was in a synced directory. Everything else is dropped (a
/// file written but never synced may be empty or missing after a real power cut).
#[derive(Debug, Default)]
pub struct PowerCut {
    state: Mutex<Synced>,
}

#[derive(Debug, Default)]
struct Synced {
    files: HashMap<PathBuf, Vec<u8>>,
    dirs: HashMap<PathBuf, HashSet<OsString>>,
}

impl crate::local::FileSync for PowerCut {
    fn sync_file(&self, path: &std::path::Path) -> std::io::Result<()> {
        let bytes = std::fs::read(path)?;
        self.state
            .lock()
            .unwrap()
            .files
            .insert(path.to_path_buf(), bytes);
        Ok(())
    }
    fn sync_dir(&self, dir: &std::path::Path) -> std::io::Result<()> {
        let names = std::fs::read_dir(dir)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<std::io::Result<Vec<_>>>()?;
        self.state
            .lock()
            .unwrap()
            .dirs
            .entry(dir.to_path_buf())
            .or_default()
            .extend(names);
        Ok(())
    }
}

impl PowerCut {
    /// The files under `root` that survive a power cut now, by path relative to `root`
    /// (`/`-separated), with the bytes they would hold.
    pub fn survivors(&self, root: &std::path::Path) -> BTreeMap<String, Vec<u8>> {
        let root = std::fs::canonicalize(root).expect("canonical store root");
        let st = self.state.lock().unwrap();
        let named = |p: &std::path::Path| -> bool {
            let (Some(parent), Some(name)) = (p.parent(), p.file_name()) else {
                return false;
            };
            st.dirs.get(parent).is_some_and(|n| n.contains(name))
        };
        let mut out = BTreeMap::new();
        for (path, bytes) in &st.files {
            let Ok(rel) = path.strip_prefix(&root) else {
                continue;
            };
            let mut p = path.as_path();
            let mut durable = true;
            while p != root {
                if !named(p) {
                    durable = false;
                    break;
                }
                p = p.parent().expect("under the root");
            }
            if durable {
                let rel: Vec<_> = rel.iter().map(|c| c.to_string_lossy()).collect();
                out.insert(rel.join("/"), bytes.clone());
            }
        }
        out
    }

    /// An in-memory store holding exactly [`PowerCut::survivors`] of `root`.
    pub async fn surviving_store(&self, root: &std::path::Path) -> crate::Store {
        use object_store::ObjectStoreExt as _;
        let mem = object_store::memory::InMemory::new();
        for (name, bytes) in self.survivors(root) {
            mem.put(&Path::from(name), PutPayload::from(bytes))
                .await
                .expect("in-memory put");
        }
        crate::Store::new(Arc::new(mem), "")
    }
}
