//! The pipeline's view of S3 and the blob store: resolve a ref to its
//! layers and make their blobs present; re-fetch one that went missing or
//! corrupt; collect blobs no image needs.
//!
//! [`Feed`]: the blobs of a command's pulls, downloading in the background
//! (one listing, `--download-jobs` threads, deduplicated) while chains
//! build. A pull's `fetch` step records the layers (with the digests
//! already known); each `chain:N` step waits for its own layer's blob only,
//! or reads it through the feed's tap while it downloads.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use rusqlite::Connection;

use super::Ctx;
use crate::error::{Error, Kind, Result};
use crate::fetch;
use crate::fetch::blobstore::{BlobDigest, BlobStore};
use crate::fetch::catalog::{Catalog, ImageRef, Layer};
use crate::fetch::s3::S3Client;
use crate::fetch::tap::Tap;
use crate::store::blobs as q;
use crate::store::Db;

/// The local image name of a ref: `golang` for a whole family, `golang/3`
/// for a family up to layer 3 (given as `golang/3`, `golang/3.tar` or the
/// full key `images/golang/3.tar`, where `images/` is the `prefix`).
pub fn image_name(prefix: &str, r: &str) -> Result<String> {
    let rel = r.strip_prefix(prefix).filter(|s| s.contains('/')).unwrap_or(r);
    let (family, layer) = match rel.split_once('/') {
        None => (rel, None),
        Some((f, l)) => {
            let l = if l.ends_with(".tar") { l.to_string() } else { format!("{l}.tar") };
            let n = crate::fetch::catalog::layer_number(&l).map_err(|why| {
                Error::usage(format!("reference {r:?}: {why}; expected FAMILY, FAMILY/N or {prefix}FAMILY/N.tar"))
            })?;
            (f, Some(n))
        }
    };
    if let Some(why) = crate::fetch::catalog::family_name_problem(family) {
        return Err(Error::usage(format!("reference {r:?}: {why}")));
    }
    Ok(match layer {
        None => family.to_string(),
        Some(n) => format!("{family}/{n}"),
    })
}

#[derive(Debug)]
pub struct FetchedLayer {
    pub position: i64,
    pub key: String,
    /// `None`: still downloading (a [`Feed`] delivers it to the chain step).
    pub digest: Option<BlobDigest>,
    pub size: u64,
    pub how: String,
}

#[derive(Debug)]
pub struct Fetched {
    pub family: String,
    pub layers: Vec<FetchedLayer>,
}

fn s3(ctx: &Ctx) -> Result<S3Client> {
    S3Client::new(ctx.s3.get()?.clone())
}

/// The bucket's listing read as families and layers (what is ignored is logged).
pub fn catalog(ctx: &Ctx) -> Result<Catalog> {
    let client = s3(ctx)?;
    let objects = client.list(client.prefix())?;
    let cat = Catalog::build(client.bucket(), client.prefix(), objects);
    for i in &cat.ignored {
        log::info!("ignoring s3://{}/{}: {}", cat.bucket, crate::fetch::catalog::show_key(&i.key), i.reason);
    }
    Ok(cat)
}

/// Resolve `reference` with one listing and make every layer's blob present.
pub fn fetch_image(ctx: &mut Ctx, conn: &mut Connection, reference: &str) -> Result<Fetched> {
    let client = s3(ctx)?;
    let store = BlobStore::open(&ctx.state_dir)?;
    let report = fetch::fetch_refs(conn, &ctx.state_dir, &client, &store, &[reference.to_string()], &ctx.fetch)?;
    let img = report
        .images
        .into_iter()
        .next()
        .ok_or_else(|| Error::software(format!("fetch of {reference} returned no image")))?;
    Ok(Fetched {
        family: img.family,
        layers: img
            .layers
            .into_iter()
            .map(|l| FetchedLayer {
                position: i64::from(l.n),
                key: l.key,
                digest: Some(l.digest.clone()),
                size: l.size,
                how: serde_json::to_value(l.source).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default(),
            })
            .collect(),
    })
}

/// Resolve `reference` against the feed's listing and record what is
/// known now: each layer's digest if its blob is already stored (or the
/// feed already has it), else `None` (the chain step waits for it).
pub fn plan_image(ctx: &mut Ctx, conn: &mut Connection, feed: &Feed, reference: &str) -> Result<Fetched> {
    let img = feed.resolve(reference)?;
    let client = s3(ctx)?;
    let store = BlobStore::open(&ctx.state_dir)?;
    let mut layers = Vec::with_capacity(img.layers.len());
    for l in &img.layers {
        let (digest, how) = match feed.known(&l.key) {
            Some(d) => (Some(d), "fetched"),
            None => match fetch::stored_digest(conn, &client, &store, l)? {
                Some(d) => (Some(d), "cached"),
                None => (None, "pending"),
            },
        };
        layers.push(FetchedLayer {
            position: i64::from(l.n),
            key: l.key.clone(),
            digest,
            size: l.size,
            how: how.to_string(),
        });
    }
    Ok(Fetched { family: img.family, layers })
}

/// The digest of `key`'s content, its blob present in the store: from the
/// feed (waiting for its download) if the feed fetches it, else fetched
/// now with a listing of its own (a resumed run; a retry after the feed's
/// attempt failed).
pub fn layer_digest(ctx: &mut Ctx, conn: &mut Connection, key: &str) -> Result<BlobDigest> {
    if let Some(feed) = ctx.feed.clone() {
        if let Some(d) = feed.wait(key)? {
            return Ok(d);
        }
    }
    let listed = catalog(ctx)?;
    let client = s3(ctx)?;
    let store = BlobStore::open(&ctx.state_dir)?;
    let layer = listed
        .families
        .values()
        .flat_map(|f| f.layers.iter())
        .find(|l| l.key == key)
        .cloned()
        .ok_or_else(|| Error::new(Kind::NoSuchImage, format!("{key} is no longer in the bucket")))?;
    let mut results = fetch::fetch_layers(conn, &ctx.state_dir, &client, &store, &[layer], &ctx.fetch)?;
    let fetched = results.pop().ok_or_else(|| Error::software(format!("no fetch result for {key}")))??;
    Ok(fetched.digest.clone())
}

/// What a feed downloads: distinct layers in build order, the first
/// `bases` of them the images' base layers.
#[derive(Debug, Clone, Default)]
pub struct Planned {
    pub layers: Vec<Layer>,
    pub bases: usize,
}

/// A failure kept to hand to whoever waits for that key.
type Kept = std::result::Result<BlobDigest, (Kind, String)>;

/// The blobs of one command's pulls, downloading in the background.
///
/// One listing ([`Feed::new`]) resolves every ref; [`Feed::plan`] orders
/// the distinct layers the way builds need them (every image's first
/// layer, then every second, ...); [`Feed::run`], on its own thread,
/// downloads them with `--download-jobs` threads (deduplicated by
/// [`fetch::fetch_layers_notify`]) and publishes each result as it comes;
/// [`Feed::wait`] blocks a chain step until its layer's result is in.
/// Memory is bounded by the download threads' buffers: blobs go to the
/// store on disk, where they stay (nothing is downloaded twice).
pub struct Feed {
    catalog: Catalog,
    state: Mutex<FeedState>,
    arrived: Condvar,
}

#[derive(Default)]
struct FeedState {
    /// Keys planned and not yet published.
    pending: HashSet<String>,
    /// The listing's ETag and size of each planned key with an ETag: keys
    /// that agree on both hold the same bytes, fetched once (the others
    /// reuse that download), so they are one download still to come.
    content: HashMap<String, (String, u64)>,
    results: HashMap<String, Kept>,
    /// Blobs whose bytes this feed downloaded and hashed just now (under
    /// whichever key: another key with the same content is the same file).
    downloaded: HashSet<BlobDigest>,
    /// One tap per planned key: a chain step may unpack the blob while it
    /// downloads.
    taps: fetch::Taps,
}

impl Feed {
    /// A feed over one listing of the bucket.
    pub fn new(catalog: Catalog) -> Feed {
        Feed { catalog, state: Mutex::new(FeedState::default()), arrived: Condvar::new() }
    }

    /// `r` resolved against the feed's listing.
    pub fn resolve(&self, r: &str) -> Result<ImageRef> {
        self.catalog.resolve(r)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FeedState> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The distinct layers of `refs` (those that resolve), in the order
    /// builds need them (every image's first layer, then every second, ...);
    /// marks them pending.
    pub fn plan(&self, refs: &[String]) -> Planned {
        let images: Vec<ImageRef> = refs.iter().filter_map(|r| self.catalog.resolve(r).ok()).collect();
        let depth = images.iter().map(|i| i.layers.len()).max().unwrap_or(0);
        let mut seen = HashSet::new();
        let mut out = Planned::default();
        for d in 0..depth {
            for l in images.iter().filter_map(|i| i.layers.get(d)) {
                if seen.insert(l.key.clone()) {
                    out.layers.push(l.clone());
                }
            }
            if d == 0 {
                out.bases = out.layers.len();
            }
        }
        let mut st = self.lock();
        st.pending.extend(out.layers.iter().map(|l| l.key.clone()));
        for l in out.layers.iter().filter(|l| !l.etag.is_empty()) {
            st.content.insert(l.key.clone(), (l.etag.clone(), l.size));
        }
        for l in &out.layers {
            st.taps.entry(l.key.clone()).or_insert_with(|| Arc::new(Tap::new(&l.key, l.size)));
        }
        drop(st);
        out
    }

    /// The tap of a key this feed downloads (or did), to unpack its blob
    /// while it arrives.
    pub fn tap(&self, key: &str) -> Option<Arc<Tap>> {
        self.lock().taps.get(key).cloned()
    }

    /// Download the planned layers, publishing each result. Returns when
    /// every one has a result; a failure that stops the whole download
    /// (database, store, no space for them) becomes every remaining
    /// layer's result.
    ///
    /// The base layers come first, on their own: no chain of any image can
    /// start before its base is there, so they get the whole network and
    /// CPU, and the first build starts as early as it can. Then the rest,
    /// `--download-jobs` at a time, in build order. (Running these threads
    /// at a lower CPU priority than the builds was measured and made the
    /// real-scale pull slower: the largest layer then arrived late.)
    pub fn run(&self, ctx: &Ctx, planned: &Planned) {
        let layers = &planned.layers;
        let publish = |i: usize, r: &Result<crate::fetch::LayerFetch>| {
            if let Some(l) = layers.get(i) {
                let kept = match r {
                    Ok(f) => Ok(f.digest.clone()),
                    Err(e) => Err((e.kind(), e.full_message())),
                };
                let downloaded = matches!(r, Ok(f) if f.source == crate::fetch::Source::Downloaded);
                self.publish(&l.key, kept, downloaded);
                crate::ops::fault::point("feed:published");
            }
        };
        let res = (|| -> Result<()> {
            if layers.is_empty() {
                return Ok(());
            }
            let client = s3(ctx)?;
            let store = BlobStore::open(&ctx.state_dir)?;
            let db = Db::open(&ctx.state_dir)?;
            let taps = self.lock().taps.clone();
            let (bases, rest) = layers.split_at(planned.bases.min(layers.len()));
            let watch = fetch::Watch { on_done: &publish, taps: &taps };
            fetch::fetch_layers_notify(&db.conn, &ctx.state_dir, &client, &store, bases, &ctx.fetch, watch)?;
            let later = |i: usize, r: &Result<crate::fetch::LayerFetch>| publish(i + bases.len(), r);
            let watch = fetch::Watch { on_done: &later, taps: &taps };
            fetch::fetch_layers_notify(&db.conn, &ctx.state_dir, &client, &store, rest, &ctx.fetch, watch)?;
            Ok(())
        })();
        let why = match res {
            Ok(()) => (Kind::Software, "the download ended without a result for this layer".to_string()),
            Err(e) => (e.kind(), e.full_message()),
        };
        let mut st = self.lock();
        let left: Vec<String> = st.pending.drain().collect();
        for key in left {
            if let Some(t) = st.taps.get(&key) {
                t.finish(Err(why.clone()));
            }
            st.results.insert(key, Err(why.clone()));
        }
        drop(st);
        self.arrived.notify_all();
    }

    /// Record `key`'s result and wake whoever waits for it (or for the
    /// set of downloads still running to change).
    fn publish(&self, key: &str, kept: Kept, downloaded: bool) {
        let mut st = self.lock();
        if let (true, Ok(d)) = (downloaded, &kept) {
            st.downloaded.insert(d.clone());
        }
        st.pending.remove(key);
        // A tap's reader learns the ending after the result (and the
        // blob's row) is recorded.
        if let Some(t) = st.taps.get(key) {
            t.finish(kept.clone());
        }
        st.results.insert(key.to_string(), kept);
        drop(st);
        self.arrived.notify_all();
    }

    /// Wait until `key`'s blob is in (`false`), or until it is the only
    /// blob of this command still to come (`true`: every other download
    /// has ended, so unpacking this one as it arrives takes CPU from no
    /// other download). `false` too when this feed does not fetch `key`.
    /// Keys that hold the same bytes by the listing (another node/4 for
    /// node/4: python/4) stay pending until that one download ends, and
    /// do not count as other downloads.
    pub fn wait_until_last(&self, key: &str) -> Result<bool> {
        self.wait_until(|st| {
            if !st.pending.contains(key) {
                return Some(Ok(false));
            }
            let mine = st.content.get(key);
            let others = st.pending.iter().filter(|k| *k != key && (mine.is_none() || st.content.get(*k) != mine));
            match others.count() {
                0 => Some(Ok(true)),
                _ => None,
            }
        })
    }

    /// Block until `ready` answers (it sees the state after every
    /// publication), checking for signals meanwhile.
    fn wait_until<T>(&self, mut ready: impl FnMut(&mut FeedState) -> Option<Result<T>>) -> Result<T> {
        let mut st = self.lock();
        loop {
            if let Some(answer) = ready(&mut st) {
                return answer;
            }
            crate::ops::signals::check()?;
            st = self.arrived.wait_timeout(st, Duration::from_millis(200)).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// The digest of a layer the feed has already fetched.
    pub fn known(&self, key: &str) -> Option<BlobDigest> {
        match self.lock().results.get(key) {
            Some(Ok(d)) => Some(d.clone()),
            _ => None,
        }
    }

    /// Whether this feed downloaded blob `digest` in this command, for any
    /// key: its bytes were hashed as they were written, moments ago, so the
    /// build need not hash them again (a blob stored by an earlier command
    /// is).
    pub fn downloaded_now(&self, digest: &BlobDigest) -> bool {
        self.lock().downloaded.contains(digest)
    }

    /// Wait for `key`'s blob. `Ok(None)`: this feed does not fetch it. A
    /// failure is handed out once: a retry of the step fetches the layer
    /// itself.
    pub fn wait(&self, key: &str) -> Result<Option<BlobDigest>> {
        self.wait_until(|st| match st.results.get(key) {
            Some(Ok(d)) => Some(Ok(Some(d.clone()))),
            Some(Err(_)) => match st.results.remove(key) {
                Some(Err((kind, msg))) => Some(Err(Error::new(kind, msg))),
                _ => Some(Err(Error::software("feed result vanished"))),
            },
            None if !st.pending.contains(key) => Some(Ok(None)),
            None => None,
        })
    }
}

/// The blob's path, fetching it again if it went missing or changed size.
/// (Content corruption is caught while unpacking, which hashes every byte.)
pub fn ensure_blob(ctx: &mut Ctx, conn: &mut Connection, key: &str, digest: &BlobDigest) -> Result<PathBuf> {
    let store = BlobStore::open(&ctx.state_dir)?;
    let d = digest;
    // A database error here is an error, never "absent" (which would fetch again).
    if let Some(b) = q::blob_get(conn, digest)?.filter(|b| b.state == q::BlobState::Present) {
        if store.size_ok(d, b.size)? {
            return Ok(store.blob_path(d));
        }
    }
    log::warn!("blob {digest} of {key} is missing from the store; fetching it again");
    let client = s3(ctx)?;
    // The key as listed now must still hold the same content.
    let report = fetch::fetch_refs(conn, &ctx.state_dir, &client, &store, &[key.to_string()], &ctx.fetch)?;
    let got = report.images.first().and_then(|i| i.layers.iter().find(|l| l.key == key)).map(|l| l.digest.clone());
    match got {
        Some(g) if &g == digest => Ok(store.blob_path(d)),
        Some(g) => Err(Error::new(
            Kind::TempFail,
            format!("{key} changed in the bucket while being pulled (now sha256 {g}, was {digest}); pull again"),
        )),
        None => Err(Error::new(Kind::NoSuchImage, format!("{key} is no longer in the bucket"))),
    }
}

/// How long a blob that `thinimg fetch` stored or used stays when no image
/// uses it: gc collects it only after no fetch has touched it for this
/// long, so `fetch` (pre-staging) and `gc` do not undo each other. Blobs
/// only pulled are collected as soon as no image uses them.
pub const FETCH_RETENTION_SECS: i64 = 7 * 24 * 3600;

/// Remove blobs no image layer references and no `thinimg fetch` used
/// within [`FETCH_RETENTION_SECS`], partial downloads no unfinished run owns, and
/// store files nothing knows. A rejected blob's file is removed but its row
/// (the rejection) is kept. Returns (digests removed, bytes freed, strays).
pub fn gc_blobs(ctx: &mut Ctx, conn: &mut Connection, dry_run: bool) -> Result<(Vec<BlobDigest>, u64, Vec<String>)> {
    let store = BlobStore::open(&ctx.state_dir)?;
    let rows = q::unused_blobs(conn, crate::ops::output::now() - FETCH_RETENTION_SECS)?;
    let mut removed = Vec::new();
    let mut bytes = 0u64;
    for (d, size, state) in rows {
        let digest = d.clone();
        if state == q::BlobState::Rejected {
            if !dry_run {
                store.remove_blob(&digest)?;
            }
            continue;
        }
        removed.push(d.clone());
        bytes += size;
        if !dry_run {
            store.remove_blob(&digest)?;
            q::blob_delete(conn, &d)?;
        }
    }
    // gc holds the state lock, so no fetch is running: a partial download
    // that no unfinished run owns would only be resumed by chance, and may
    // be what filled the disk.
    let mut strays = Vec::new();
    let orphans = q::downloads_unowned(conn)?;
    if !orphans.is_empty() {
        let n = orphans.len();
        let partial_bytes: u64 = orphans.iter().map(|d| store.partial_len(&d.partial)).sum();
        if !dry_run {
            for d in &orphans {
                store.remove_partial(&d.partial)?;
                q::download_forget(conn, d.id)?;
            }
        }
        strays.push(format!("{n} partial download(s) ({})", crate::ops::output::bytes(partial_bytes)));
        bytes += partial_bytes;
    }
    let keep: std::collections::HashSet<String> = q::downloads_all(conn)?.into_iter().map(|d| d.partial).collect();
    if !dry_run {
        let n = store.remove_stale_partials(&keep)?;
        if n > 0 {
            strays.push(format!("{n} partial file(s)"));
        }
    }
    Ok((removed, bytes, strays))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fetch::s3::ObjectInfo;

    #[test]
    fn a_feed_plans_bases_first_then_layers_in_build_order() {
        let obj = |k: &str| ObjectInfo { key: k.into(), etag: String::new(), size: 10, last_modified: String::new() };
        let keys = ["a/1.tar", "a/2.tar", "a/3.tar", "b/1.tar", "b/2.tar", "c/1.tar"];
        let cat = Catalog::build("b", "images/", keys.iter().map(|k| obj(&format!("images/{k}"))).collect());
        let feed = Feed::new(cat);
        let p = feed.plan(&["a".into(), "b".into(), "c".into(), "nosuch".into()]);
        let got: Vec<&str> = p.layers.iter().map(|l| l.key.trim_start_matches("images/")).collect();
        assert_eq!(got, ["a/1.tar", "b/1.tar", "c/1.tar", "a/2.tar", "b/2.tar", "a/3.tar"]);
        assert_eq!(p.bases, 3, "every image's base layer is in the first group");
        // A ref naming one layer plans that image's layers up to it.
        let feed =
            Feed::new(Catalog::build("b", "images/", keys.iter().map(|k| obj(&format!("images/{k}"))).collect()));
        let p = feed.plan(&["a/2".into()]);
        assert_eq!((p.layers.len(), p.bases), (2, 1));
        assert_eq!(feed.plan(&[]).bases, 0);
    }

    /// A feed over a listing of `keys` (under `images/`).
    fn feed_of(keys: &[&str]) -> Feed {
        feed_with_etags(&keys.iter().map(|k| (*k, "")).collect::<Vec<_>>())
    }

    /// A feed over keys with the ETags given ("" for none), all of size 10.
    fn feed_with_etags(keys: &[(&str, &str)]) -> Feed {
        let obj =
            |k: &str, e: &str| ObjectInfo { key: k.into(), etag: e.into(), size: 10, last_modified: String::new() };
        Feed::new(Catalog::build("b", "images/", keys.iter().map(|(k, e)| obj(&format!("images/{k}"), e)).collect()))
    }

    /// A made-up digest: `c` 64 times.
    fn digest(c: char) -> BlobDigest {
        BlobDigest::parse(&c.to_string().repeat(64)).unwrap()
    }

    #[test]
    fn a_layer_is_last_once_every_other_download_has_ended() {
        let feed = Arc::new(feed_of(&["a/1.tar", "a/2.tar", "b/1.tar"]));
        feed.plan(&["a".into(), "b".into()]);
        let d = digest;
        // Not planned: nothing to wait for.
        assert!(!feed.wait_until_last("images/c/1.tar").unwrap());
        // a/2 waits while a/1 and b/1 still download ...
        let waiter = {
            let feed = feed.clone();
            std::thread::spawn(move || feed.wait_until_last("images/a/2.tar"))
        };
        feed.publish("images/a/1.tar", Ok(d('a')), true);
        std::thread::sleep(Duration::from_millis(50));
        assert!(!waiter.is_finished(), "b/1 is still downloading");
        // ... and is last once they have ended, failed ones included.
        feed.publish("images/b/1.tar", Err((Kind::TempFail, "stalled".into())), false);
        assert!(waiter.join().unwrap().unwrap(), "a/2 is the only download left");
        // Once its own blob is in, it is no longer waiting for anything.
        feed.publish("images/a/2.tar", Ok(d('b')), true);
        assert!(!feed.wait_until_last("images/a/2.tar").unwrap());
        assert_eq!(feed.wait("images/a/2.tar").unwrap(), Some(d('b')));
    }

    /// A key with another key's bytes (same ETag and size: one download,
    /// reused) is not another download to wait for: on the real bucket,
    /// python/4 is node/4, and with it pending node/4 was never last.
    #[test]
    fn keys_with_the_same_content_are_one_download_for_last() {
        let feed = Arc::new(feed_with_etags(&[
            ("node/1.tar", "e1"),
            ("node/2.tar", "e4"),
            ("python/1.tar", "e1"),
            ("python/2.tar", "e4"),
            ("golang/1.tar", "e1"),
            ("golang/2.tar", "e5"),
        ]));
        feed.plan(&["golang".into(), "node".into(), "python".into()]);
        let d = digest;
        let waiter = {
            let feed = feed.clone();
            std::thread::spawn(move || feed.wait_until_last("images/node/2.tar"))
        };
        for k in ["golang/1.tar", "node/1.tar", "python/1.tar"] {
            feed.publish(&format!("images/{k}"), Ok(d('a')), k == "golang/1.tar");
        }
        std::thread::sleep(Duration::from_millis(50));
        assert!(!waiter.is_finished(), "golang/2 is still downloading");
        feed.publish("images/golang/2.tar", Ok(d('c')), true);
        // python/2 is still pending, but it is node/2's bytes.
        let t0 = std::time::Instant::now();
        while !waiter.is_finished() && t0.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(waiter.is_finished(), "node/2 still waits for python/2, which is its own bytes");
        assert!(waiter.join().unwrap().unwrap(), "node/2 is the only download left");
    }

    #[test]
    fn a_blob_downloaded_under_one_key_is_fresh_for_every_key_holding_it() {
        let feed = feed_of(&["a/1.tar", "b/1.tar", "c/1.tar"]);
        feed.plan(&["a".into(), "b".into(), "c".into()]);
        let d = digest;
        // a/1 downloaded; b/1 holds the same content (reused by ETag); c/1
        // was in the store before this command.
        feed.publish("images/a/1.tar", Ok(d('a')), true);
        feed.publish("images/b/1.tar", Ok(d('a')), false);
        feed.publish("images/c/1.tar", Ok(d('c')), false);
        assert!(feed.downloaded_now(&d('a')), "hashed as it was written, whichever key builds from it");
        assert!(!feed.downloaded_now(&d('c')), "stored earlier: hashed again while unpacked");
    }
}
