//! Getting a layer's bytes from S3, and the fetch driver: from refs to
//! verified blobs in the store.
//!
//! The folder: [`s3`] is the S3 client (built from a typed [`s3::S3Config`],
//! never from flags), [`catalog`] turns a listing into families and layers
//! and owns the ref grammar, [`blobstore`] is the content-addressed store on
//! disk and [`download`] the resumable, verifying download into it. Only
//! this file persists (through `store::blobs`); the four below it never
//! open the database.
//!
//! One listing resolves every ref; layers are deduplicated by key and by
//! plain-MD5 ETag + size within the same endpoint and bucket (content
//! already stored under another key of that bucket, downloaded and checked
//! against its ETag, is not downloaded again, and two keys with the same
//! content are downloaded once per run); nothing is reused across buckets
//! or endpoints. A layer whose object (key, ETag, size) or content was
//! rejected before fails at once, without a download, and stays rejected
//! until `thinimg blobs --clear-rejection DIGEST` or the object changes.
//! The rest are downloaded by a bounded pool of threads, each
//! with its own database connection. Every download is idempotent through
//! the `downloads`/`objects`/`blobs` rows: a crash anywhere leaves them
//! consistent, and a rerun resumes from the last checkpoint or adopts a
//! finished-but-unrecorded blob instead of downloading durable bytes again.
//! It takes no lock: its callers hold the state-dir lock.

use std::collections::{HashMap, HashSet};
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub mod blobstore;
pub mod catalog;
pub mod download;
pub mod s3;
pub mod tap;

use self::blobstore::{BlobDigest, BlobStore};
use self::catalog::{Catalog, ImageRef, Layer};
use self::download::{DownloadJob, Progress};
use self::s3::{etag_is_plain_md5, S3Client};
use crate::error::{Error, Kind, Result};
use crate::store::blobs as q;
use crate::store::Db;

#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// Download threads (at least 1).
    pub jobs: usize,
    pub max_blob_size: u64,
    /// Bytes to keep free on the state filesystem: downloads that would
    /// leave less are refused before they start.
    pub min_free: u64,
    /// Re-hash blobs already stored before counting them as cached.
    pub verify: bool,
    /// Draw a progress line on stderr (only if it is a terminal).
    pub progress: bool,
    /// Pre-staging (`thinimg fetch`): gc keeps these blobs for the
    /// retention period even when no image uses them.
    pub retain: bool,
}

impl Default for FetchOptions {
    fn default() -> FetchOptions {
        FetchOptions {
            jobs: 4,
            max_blob_size: 16 << 30,
            min_free: 256 << 20,
            verify: false,
            progress: true,
            retain: false,
        }
    }
}

/// How a layer's blob came to be in the store in this run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// Transferred now (possibly resuming an earlier partial download).
    Downloaded,
    /// This key was already stored with the same ETag and size.
    Cached,
    /// Another key with the same plain-MD5 ETag and size holds the content.
    Deduped,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct LayerFetch {
    pub family: String,
    pub n: u32,
    pub key: String,
    pub digest: BlobDigest,
    pub size: u64,
    pub source: Source,
    /// Bytes received over the network for this layer in this run.
    pub transferred: u64,
    /// Bytes of an earlier interrupted download that were reused.
    pub resumed_from: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ImageFetch {
    /// The ref as given.
    pub reference: String,
    pub family: String,
    pub top: u32,
    pub layers: Vec<LayerFetch>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct FetchReport {
    pub bucket: String,
    pub images: Vec<ImageFetch>,
    /// Distinct layers (keys) handled.
    pub layers: usize,
    pub downloaded: usize,
    pub cached: usize,
    pub deduped: usize,
    pub bytes_transferred: u64,
    pub seconds: f64,
}

/// List the bucket once and resolve `refs` against it.
pub fn resolve_refs(s3: &S3Client, refs: &[String]) -> Result<(Catalog, Vec<ImageRef>)> {
    let objects = s3.list(s3.prefix())?;
    let catalog = Catalog::build(s3.bucket(), s3.prefix(), objects);
    let images = refs.iter().map(|r| catalog.resolve(r)).collect::<Result<Vec<_>>>()?;
    Ok((catalog, images))
}

/// Fetch every layer of every ref. All refs are resolved before anything
/// is downloaded; every download runs to its end even if another fails;
/// then the first failure is returned.
pub fn fetch_refs(
    conn: &rusqlite::Connection,
    state_dir: &Path,
    s3: &S3Client,
    store: &BlobStore,
    refs: &[String],
    opts: &FetchOptions,
) -> Result<FetchReport> {
    let start = Instant::now();
    let (_, images) = resolve_refs(s3, refs)?;
    let mut layers: Vec<Layer> = Vec::new();
    let mut seen = HashSet::new();
    for img in &images {
        for l in &img.layers {
            if seen.insert(l.key.clone()) {
                layers.push(l.clone());
            }
        }
    }
    let results = fetch_layers(conn, state_dir, s3, store, &layers, opts)?;
    let mut by_key: HashMap<String, LayerFetch> = HashMap::new();
    let mut failures = Vec::new();
    for (l, r) in layers.iter().zip(results) {
        match r {
            Ok(f) => {
                by_key.insert(l.key.clone(), f);
            }
            Err(e) => failures.push(e),
        }
    }
    if opts.retain {
        for key in by_key.keys() {
            q::object_mark_fetched(conn, s3.bucket(), key)?;
        }
    }
    if let Some(first) = failures.into_iter().next() {
        return Err(first);
    }
    let mut report = FetchReport {
        bucket: s3.bucket().to_string(),
        images: Vec::new(),
        layers: by_key.len(),
        downloaded: 0,
        cached: 0,
        deduped: 0,
        bytes_transferred: 0,
        seconds: 0.0,
    };
    for f in by_key.values() {
        match f.source {
            Source::Downloaded => report.downloaded += 1,
            Source::Cached => report.cached += 1,
            Source::Deduped => report.deduped += 1,
        }
        report.bytes_transferred += f.transferred;
    }
    for (r, img) in refs.iter().zip(images) {
        let layers = img
            .layers
            .iter()
            .map(|l| {
                by_key.get(&l.key).cloned().ok_or_else(|| Error::software(format!("layer {} was not fetched", l.key)))
            })
            .collect::<Result<Vec<_>>>()?;
        report.images.push(ImageFetch { reference: r.clone(), family: img.family, top: img.top, layers });
    }
    report.seconds = start.elapsed().as_secs_f64();
    Ok(report)
}

/// Re-hash a stored blob before use (the pipeline calls this before
/// unpacking). A corrupt or missing blob is removed and marked missing, so
/// the next fetch downloads it again; returns whether it is intact.
pub fn verify_blob(db: &Db, store: &BlobStore, digest: &BlobDigest) -> Result<bool> {
    if store.verify(digest)? {
        q::blob_mark_verified(&db.conn, digest)?;
        Ok(true)
    } else {
        q::blob_mark_missing(&db.conn, digest)?;
        Ok(false)
    }
}

/// The digest of a layer's content if the store already holds it (this key
/// with the same ETag and size, or a verified download with the same
/// plain-MD5 ETag and size in the same endpoint and bucket), without any
/// download. `None`: it has to be fetched.
pub fn stored_digest(
    conn: &rusqlite::Connection,
    s3: &S3Client,
    store: &BlobStore,
    l: &Layer,
) -> Result<Option<BlobDigest>> {
    if q::object_rejection(conn, s3.bucket(), &l.key, &l.etag, l.size)?.is_some() {
        return Ok(None);
    }
    Ok(already_stored(conn, store, s3.endpoint(), s3.bucket(), l, false)?.map(|f| f.digest))
}

/// What to do for one layer, decided on the calling thread.
enum Plan {
    Done(LayerFetch),
    Refused(Error),
    /// Download; the other layer indexes share its plain-MD5 ETag and size.
    Download {
        followers: Vec<usize>,
    },
    Follow,
}

/// Fetch `layers` (distinct keys). Returns one result per layer, in order.
/// `Err` only for failures that stop everything (database, store).
///
/// The caller holds the state-dir lock. Within the process, calls run one
/// at a time (a second waits for the first): each starts by removing
/// partial files that no download row names, which must not race with
/// another call's downloads.
pub fn fetch_layers(
    conn: &rusqlite::Connection,
    state_dir: &Path,
    s3: &S3Client,
    store: &BlobStore,
    layers: &[Layer],
    opts: &FetchOptions,
) -> Result<Vec<Result<LayerFetch>>> {
    let taps = Taps::new();
    fetch_layers_notify(conn, state_dir, s3, store, layers, opts, Watch { on_done: &|_, _| {}, taps: &taps })
}

/// Who watches a [`fetch_layers_notify`]: `on_done` hears of each layer
/// (by index) as soon as its result is known, from whichever thread learns
/// it; a download of a key in `taps` reports its progress there.
#[derive(Clone, Copy)]
pub struct Watch<'a> {
    pub on_done: &'a (dyn Fn(usize, &Result<LayerFetch>) + Sync),
    pub taps: &'a Taps,
}

/// Taps by object key: a download of a key found here reports its
/// progress there (see [`tap`]).
pub type Taps = HashMap<String, std::sync::Arc<tap::Tap>>;

/// One `fetch_layers` at a time in this process (see there).
static FETCHING: Mutex<()> = Mutex::new(());

/// [`fetch_layers`], telling `watch.on_done` about each layer (by index) as
/// soon as its result is known, from whichever thread learns it: a consumer
/// can start on the first layers while later ones are still downloading,
/// or read a blob as it arrives through its tap in `watch.taps`.
/// Downloads start in the order of `layers`.
pub fn fetch_layers_notify(
    conn: &rusqlite::Connection,
    state_dir: &Path,
    s3: &S3Client,
    store: &BlobStore,
    layers: &[Layer],
    opts: &FetchOptions,
    watch: Watch<'_>,
) -> Result<Vec<Result<LayerFetch>>> {
    let (on_done, taps) = (watch.on_done, watch.taps);
    let _serial = FETCHING.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let bucket = s3.bucket();
    let endpoint = s3.endpoint();
    // Partials that no download row names are leftovers of a crash.
    let keep: HashSet<String> = q::downloads_all(conn)?.into_iter().map(|d| d.partial).collect();
    let stale = store.remove_stale_partials(&keep)?;
    if stale > 0 {
        log::debug!("removed {stale} stale partial downloads");
    }
    let mut plans: Vec<Plan> = Vec::with_capacity(layers.len());
    let mut leader_of: HashMap<(String, u64), usize> = HashMap::new();
    for (i, l) in layers.iter().enumerate() {
        // A rejected object is not downloaded (nor unpacked) again.
        if let Some((digest, why)) = q::object_rejection(conn, bucket, &l.key, &l.etag, l.size)? {
            plans.push(Plan::Refused(rejected_error(bucket, &l.key, digest.as_str(), &why)));
            continue;
        }
        if let Some(done) = already_stored(conn, store, endpoint, bucket, l, opts.verify)? {
            plans.push(Plan::Done(done));
            continue;
        }
        if etag_is_plain_md5(&l.etag) {
            if let Some(&lead) = leader_of.get(&(l.etag.clone(), l.size)) {
                if let Plan::Download { followers } = &mut plans[lead] {
                    followers.push(i);
                }
                plans.push(Plan::Follow);
                continue;
            }
            leader_of.insert((l.etag.clone(), l.size), i);
        }
        plans.push(Plan::Download { followers: Vec::new() });
    }
    let work: Vec<(usize, Vec<usize>)> = plans
        .iter()
        .enumerate()
        .filter_map(|(i, p)| match p {
            Plan::Download { followers } => Some((i, followers.clone())),
            _ => None,
        })
        .collect();
    let total_bytes: u64 = work.iter().map(|(i, _)| layers[*i].size).sum();
    if !work.is_empty() {
        // Refuse up front what would fill the disk (a full state filesystem
        // also stops the database and everything else on it).
        let resumable: u64 = work
            .iter()
            .filter_map(|(i, _)| q::download_get(conn, bucket, &layers[*i].key).ok().flatten())
            .filter(|d| d.endpoint == endpoint && d.digest.is_none())
            .map(|d| d.offset)
            .sum();
        let need = total_bytes.saturating_sub(resumable);
        let space = store.space()?;
        if space.free < need.saturating_add(opts.min_free) {
            use crate::ops::output::bytes;
            return Err(Error::new(
                Kind::Io,
                format!(
                    "not enough free space in {} for {} layer(s): {} to download, {} free, keeping --min-free {}; free space (gc removes unused blobs and partial downloads) or lower --min-free",
                    store.root().display(),
                    work.len(),
                    bytes(need),
                    bytes(space.free),
                    bytes(opts.min_free)
                ),
            ));
        }
    }
    let mut results: Vec<Option<Result<LayerFetch>>> = plans
        .into_iter()
        .map(|p| match p {
            Plan::Done(f) => Some(Ok(f)),
            Plan::Refused(e) => Some(Err(e)),
            _ => None,
        })
        .collect();
    for (i, r) in results.iter().enumerate() {
        if let Some(r) = r {
            on_done(i, r);
        }
    }
    if work.is_empty() {
        return Ok(results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(Error::software("layer not planned"))))
            .collect());
    }
    let queue = Mutex::new(work.into_iter().rev().collect::<Vec<_>>());
    let shared: Mutex<&mut Vec<Option<Result<LayerFetch>>>> = Mutex::new(&mut results);
    let received = AtomicU64::new(0);
    let running = AtomicUsize::new(0);
    let jobs = opts.jobs.max(1).min(queue.lock().map(|q| q.len()).unwrap_or(1));
    let fatal: Mutex<Option<Error>> = Mutex::new(None);
    let show = opts.progress && std::io::stderr().is_terminal();
    std::thread::scope(|scope| {
        for _ in 0..jobs {
            running.fetch_add(1, Ordering::SeqCst);
            scope.spawn(|| {
                let worker = || -> Result<()> {
                    let mut tdb = Db::open(state_dir)?;
                    loop {
                        let next = match queue.lock() {
                            Ok(mut q) => q.pop(),
                            Err(_) => return Err(Error::software("download queue lock poisoned")),
                        };
                        let Some((lead, followers)) = next else { return Ok(()) };
                        let out = download_group(&mut tdb, s3, store, layers, lead, &followers, opts, &received, taps);
                        for (i, r) in &out {
                            on_done(*i, r);
                        }
                        let mut res = shared.lock().map_err(|_| Error::software("result lock poisoned"))?;
                        for (i, r) in out {
                            res[i] = Some(r);
                        }
                    }
                };
                if let Err(e) = worker() {
                    if let Ok(mut f) = fatal.lock() {
                        f.get_or_insert(e);
                    }
                }
                running.fetch_sub(1, Ordering::SeqCst);
            });
        }
        if show {
            let t0 = Instant::now();
            while running.load(Ordering::SeqCst) > 0 {
                std::thread::sleep(Duration::from_millis(250));
                let got = received.load(Ordering::Relaxed);
                let rate = got as f64 / t0.elapsed().as_secs_f64().max(0.001);
                let mut err = std::io::stderr().lock();
                let _ = write!(
                    err,
                    "\r\x1b[Kfetching: {} of {} at {}/s",
                    crate::ops::output::bytes(got),
                    crate::ops::output::bytes(total_bytes),
                    crate::ops::output::bytes(rate as u64)
                );
                let _ = err.flush();
            }
            let _ = write!(std::io::stderr(), "\r\x1b[K");
        }
    });
    if let Some(e) = fatal.into_inner().ok().flatten() {
        return Err(e);
    }
    Ok(results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(Error::software("a download thread ended without a result"))))
        .collect())
}

/// The error for a layer whose content was rejected before.
fn rejected_error(bucket: &str, key: &str, digest: &str, why: &str) -> Error {
    Error::bad_data(format!(
        "s3://{bucket}/{}: rejected earlier (blob {digest}): {why}; not downloaded or unpacked again until the object changes or `thinimg blobs --clear-rejection {digest}`",
        catalog::show_key(key)
    ))
}

/// After a download: the bytes are a blob rejected before (by digest).
fn refuse_if_rejected(
    conn: &rusqlite::Connection,
    store: &BlobStore,
    bucket: &str,
    key: &str,
    d: &BlobDigest,
) -> Result<()> {
    if let Some(why) = q::blob_rejection(conn, d)? {
        // Its bytes are not needed: the rejection is what is kept.
        store.remove_blob(d)?;
        return Err(rejected_error(bucket, key, d.as_str(), &why));
    }
    Ok(())
}

/// The layer's blob, if this key is already stored with the same ETag and
/// size, or its plain-MD5 ETag and size match another key of the same
/// endpoint and bucket whose bytes were downloaded and verified.
fn already_stored(
    conn: &rusqlite::Connection,
    store: &BlobStore,
    endpoint: &str,
    bucket: &str,
    l: &Layer,
    verify: bool,
) -> Result<Option<LayerFetch>> {
    let usable = |conn: &rusqlite::Connection, d: &BlobDigest| -> Result<Option<BlobDigest>> {
        let Some(b) = q::blob_get(conn, d)? else { return Ok(None) };
        if b.state != q::BlobState::Present || b.size != l.size {
            return Ok(None);
        }
        let digest = d.clone();
        let ok = store.size_ok(&digest, l.size)? && (!verify || store.verify(&digest)?);
        if !ok {
            log::warn!("blob {d} (for s3://{bucket}/{}) is missing or corrupt; fetching it again", l.key);
            store.remove_blob(&digest)?;
            q::blob_mark_missing(conn, d)?;
            return Ok(None);
        }
        if verify {
            q::blob_mark_verified(conn, d)?;
        }
        Ok(Some(digest))
    };
    let done = |digest: BlobDigest, source| LayerFetch {
        family: l.family.clone(),
        n: l.n,
        key: l.key.clone(),
        digest,
        size: l.size,
        source,
        transferred: 0,
        resumed_from: 0,
    };
    // Same key, same version: S3 changes an object's ETag whenever its
    // content changes, so any ETag form identifies this key's content.
    // (An empty ETag, as a read-through cache may list, identifies nothing.)
    if let Some(o) = q::object_get(conn, endpoint, bucket, &l.key)? {
        if !l.etag.is_empty() && o.etag == l.etag && o.size == l.size {
            if let Some(d) = o.digest.as_ref() {
                if let Some(digest) = usable(conn, d)? {
                    return Ok(Some(done(digest, Source::Cached)));
                }
            }
        }
    }
    // Another key of the same endpoint and bucket: only a plain MD5 says
    // anything about the bytes, and only one checked against downloaded bytes.
    if etag_is_plain_md5(&l.etag) {
        if let Some(d) = q::digest_by_etag(conn, endpoint, bucket, &l.etag, l.size)? {
            if let Some(digest) = usable(conn, &d)? {
                q::object_record(conn, endpoint, bucket, &l.key, &l.etag, l.size, &l.last_modified, &d, false)?;
                return Ok(Some(done(digest, Source::Deduped)));
            }
        }
    }
    Ok(None)
}

#[allow(clippy::too_many_arguments)]
fn download_group(
    db: &mut Db,
    s3: &S3Client,
    store: &BlobStore,
    layers: &[Layer],
    lead: usize,
    followers: &[usize],
    opts: &FetchOptions,
    received: &AtomicU64,
    taps: &Taps,
) -> Vec<(usize, Result<LayerFetch>)> {
    let l = &layers[lead];
    let t0 = std::time::Instant::now();
    let tap_of = |l: &Layer| taps.get(&l.key).map(|t| &**t);
    let first = download_one(db, s3, store, l, opts, received, tap_of(l));
    if let Ok(f) = &first {
        let secs = t0.elapsed().as_secs_f64();
        log::debug!(
            "{}: {:?} ({} bytes) in {secs:.1} s, {:.1} MB/s",
            catalog::show_key(&l.key),
            f.source,
            l.size,
            l.size as f64 / secs.max(0.001) / 1e6
        );
    }
    let mut out = Vec::with_capacity(1 + followers.len());
    match &first {
        Ok(f) => {
            for &i in followers {
                let fl = &layers[i];
                let r = if f.size == fl.size
                    && q::object_get(&db.conn, s3.endpoint(), s3.bucket(), &l.key)
                        .ok()
                        .flatten()
                        .is_some_and(|o| o.etag == fl.etag && o.downloaded)
                {
                    q::object_record(
                        &db.conn,
                        s3.endpoint(),
                        s3.bucket(),
                        &fl.key,
                        &fl.etag,
                        fl.size,
                        &fl.last_modified,
                        &f.digest,
                        false,
                    )
                    .map(|()| LayerFetch {
                        family: fl.family.clone(),
                        n: fl.n,
                        key: fl.key.clone(),
                        digest: f.digest.clone(),
                        size: fl.size,
                        source: Source::Deduped,
                        transferred: 0,
                        resumed_from: 0,
                    })
                } else {
                    // The leader's object changed under us: fetch this one itself.
                    download_one(db, s3, store, fl, opts, received, tap_of(fl))
                };
                out.push((i, r));
            }
        }
        Err(e) => {
            for &i in followers {
                let fl = &layers[i];
                out.push((
                    i,
                    Err(Error::new(
                        e.kind(),
                        format!(
                            "s3://{}/{}: same content as {}, which failed: {}",
                            s3.bucket(),
                            fl.key,
                            l.key,
                            e.full_message()
                        ),
                    )),
                ));
            }
        }
    }
    out.insert(0, (lead, first));
    out
}

fn download_one(
    db: &mut Db,
    s3: &S3Client,
    store: &BlobStore,
    l: &Layer,
    opts: &FetchOptions,
    received: &AtomicU64,
    tap: Option<&tap::Tap>,
) -> Result<LayerFetch> {
    let bucket = s3.bucket();
    let endpoint = s3.endpoint();
    let mut row = q::download_get(&db.conn, bucket, &l.key)?;
    // A download that a crash cut off after verifying it: finish it.
    if let Some(r) = row.as_ref().filter(|r| r.endpoint == endpoint) {
        if let Some(d) = r.digest.as_ref() {
            let digest = d.clone();
            if store.adopt_verified(&r.partial, &digest, r.size)? {
                log::info!("adopting the finished download of s3://{bucket}/{}", l.key);
                q::download_commit(
                    &mut db.conn,
                    Some(r.id),
                    endpoint,
                    bucket,
                    &l.key,
                    &r.etag,
                    r.size,
                    &l.last_modified,
                    d,
                )?;
                refuse_if_rejected(&db.conn, store, bucket, &l.key, &digest)?;
                if r.etag == l.etag && r.size == l.size {
                    return Ok(LayerFetch {
                        family: l.family.clone(),
                        n: l.n,
                        key: l.key.clone(),
                        digest,
                        size: r.size,
                        source: Source::Downloaded,
                        transferred: 0,
                        resumed_from: r.size,
                    });
                }
                row = None;
            }
        }
    }
    let row = match row {
        Some(r) if r.digest.is_none() && r.etag == l.etag && r.size == l.size && r.endpoint == endpoint => r,
        other => {
            if let Some(old) = other {
                store.remove_partial(&old.partial)?;
            }
            q::download_begin(&mut db.conn, endpoint, bucket, &l.key, &l.etag, l.size)?
        }
    };
    let job = DownloadJob {
        key: &l.key,
        etag: &l.etag,
        size: l.size,
        partial: &row.partial,
        resume_offset: row.offset,
        max_size: opts.max_blob_size,
        counter: Some(received),
        tap,
    };
    let conn = &db.conn;
    let id = row.id;
    let res = store.download(s3, &job, &mut |p| match p {
        Progress::Durable { offset, etag, size } => q::download_checkpoint(conn, id, offset, etag, size),
        Progress::Verified { digest, size } => q::download_verified(conn, id, digest, size),
    });
    let d = match res {
        Ok(d) => d,
        Err(e) => {
            if e.kind() == Kind::BadData || download::is_disk_full(&e) {
                // Permanent, or filling the disk: nothing of it is worth keeping.
                store.remove_partial(&row.partial)?;
                q::download_forget(&db.conn, row.id)?;
            }
            return Err(e);
        }
    };
    q::download_commit(
        &mut db.conn,
        Some(row.id),
        endpoint,
        bucket,
        &l.key,
        &d.etag,
        d.size,
        &l.last_modified,
        &d.digest,
    )?;
    refuse_if_rejected(&db.conn, store, bucket, &l.key, &d.digest)?;
    Ok(LayerFetch {
        family: l.family.clone(),
        n: l.n,
        key: l.key.clone(),
        digest: d.digest,
        size: d.size,
        source: Source::Downloaded,
        transferred: d.transferred,
        resumed_from: d.resumed_from,
    })
}
