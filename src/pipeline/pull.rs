//! The `pull` run: fetch an image's blobs, then build its layer chain.
//!
//! Steps: `fetch` (resolve the ref with one listing, download what is
//! missing, record the image and its layers, plan one `chain:N` step per
//! layer), `chain:1` … `chain:N` (find or build that chain's thin device),
//! `finish` (mark the image ready). A chain shared with another image is
//! found, not rebuilt.
//!
//! Building a chain, intent first: allocate a thin id and record
//! {thin_id, chain_id} with a `building` chain row in one transaction; then
//! create the thin device (fresh or a snapshot of the parent chain),
//! activate it under a build name, mkfs (first layer only), mount
//! nosuid,nodev, unpack, create missing mount points, unmount, deactivate,
//! and mark device and chain ready together with the step. A step that
//! finds an intent from a dead attempt tears that attempt's work down
//! (unmount, deactivate, delete the thin id, delete its rows) and starts over.
//!
//! With `--stream-unpack`, a layer whose blob is still downloading in this
//! command (the feed's [`Tap`]) is built as it arrives: the intent names the thin id only (the
//! chain id needs the digest), the unpack reads the growing partial, and the
//! chain row is written, ready, with the step once the download verified
//! the blob. A failed or restarted download fails the build like a bad
//! layer, and its bytes are never held against the object.

use std::io::Read;
use std::path::Path;

use rusqlite::Connection;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::{mount, Ctx, StreamUnpack};
use crate::dm::{Sectors, ThinId};
use crate::error::{Error, Kind, Result};
use crate::fetch::blobstore::BlobDigest;
use crate::fetch::tap::{Start, Tap, TapReader};
use crate::journal::{Completion, Executor, RunSpec, StepCx};
use crate::ops::direct::BlockReader;
use crate::ops::fault;
use crate::pool::PoolManager;
use crate::store::ids::ChainId;
use crate::store::images as q;
use crate::store::thin_pool::ThinRole;

/// What a pull run is asked for: the ref as given (the subject is the
/// normalized image name). Runs recorded without one pull their subject.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PullRequest {
    #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
}

/// A pull run's steps, as the journal names them: `fetch`, `chain:N` for
/// layer N (1-based), `finish`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullStep {
    Fetch,
    Chain(i64),
    Finish,
}

impl PullStep {
    pub fn name(self) -> String {
        match self {
            PullStep::Fetch => "fetch".into(),
            PullStep::Chain(pos) => format!("chain:{pos}"),
            PullStep::Finish => "finish".into(),
        }
    }

    pub fn parse(s: &str) -> Result<PullStep> {
        match s {
            "fetch" => Ok(PullStep::Fetch),
            "finish" => Ok(PullStep::Finish),
            _ => match s.strip_prefix("chain:").map(str::parse::<i64>) {
                Some(Ok(pos)) if pos >= 1 => Ok(PullStep::Chain(pos)),
                _ => Err(Error::software(format!("pull: unknown step {s:?}"))),
            },
        }
    }
}

/// The run spec for pulling `image` (a normalized ref).
pub fn spec(image: &str, reference: &str) -> RunSpec {
    RunSpec {
        kind: super::RunKind::Pull.as_str().into(),
        subject: image.into(),
        request: json!(PullRequest { reference: Some(reference.into()) }),
        steps: vec![PullStep::Fetch.name()],
    }
}

/// What a chain build records before any kernel work: enough to undo the
/// attempt after a crash. `foreign`: the thin id already existed in the
/// pool (EEXIST), so nothing of it in the kernel is this attempt's.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BuildIntent {
    pub thin_id: ThinId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain_id: Option<ChainId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dm_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount: Option<std::path::PathBuf>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub foreign: bool,
}

impl BuildIntent {
    /// The intent a step recorded; `None` if it names no thin id.
    pub fn read(v: &Value) -> Result<Option<BuildIntent>> {
        crate::journal::typed_intent(v, "thin_id")
    }
}

pub struct Pull<'a> {
    pub ctx: &'a mut Ctx,
}

impl Executor for Pull<'_> {
    fn step(&mut self, cx: &mut StepCx<'_>) -> Result<()> {
        match PullStep::parse(&cx.step)? {
            PullStep::Fetch => self.fetch(cx),
            PullStep::Chain(pos) => self.chain(cx, pos),
            PullStep::Finish => finish(cx),
        }
    }

    fn abort(&mut self, cx: &mut StepCx<'_>) -> Result<()> {
        if let Some(intent) = cx.intent().cloned() {
            let run_dir = self.ctx.run_dir.clone();
            let dev = self.ctx.prepare_pool(cx.conn)?;
            teardown_attempt(&run_dir, dev, cx.conn, &intent)?;
        }
        Ok(())
    }
}

impl Pull<'_> {
    fn fetch(&mut self, cx: &mut StepCx<'_>) -> Result<()> {
        let reference = cx.request_as::<PullRequest>()?.reference.unwrap_or_else(|| cx.subject.clone());
        let image = cx.subject.clone();
        // With a feed (the command's downloads, running beside the builds)
        // the layers are recorded now and each chain step waits for its own
        // blob; without one (a resumed run) everything is fetched here.
        let fetched = match self.ctx.feed.clone() {
            Some(feed) => super::sources::plan_image(self.ctx, cx.conn, &feed, &reference)?,
            None => super::sources::fetch_image(self.ctx, cx.conn, &reference)?,
        };
        // A layer rejected before is not unpacked again until its content changes.
        for l in &fetched.layers {
            if let Some(d) = &l.digest {
                refuse_rejected(cx.conn, &image, &l.key, d)?;
            }
        }
        let n = fetched.layers.len();
        cx.complete(|tx| {
            let rows: Vec<(i64, String, Option<BlobDigest>)> =
                fetched.layers.iter().map(|l| (l.position, l.key.clone(), l.digest.clone())).collect();
            q::put_image_pulling(tx, &image, &fetched.family, &rows)?;
            let mut append: Vec<String> = (1..=n as i64).map(|i| PullStep::Chain(i).name()).collect();
            append.push(PullStep::Finish.name());
            Ok(Completion {
                outcome: Some(json!({
                    "family": fetched.family,
                    "layers": fetched.layers.iter().map(|l| json!({"key": l.key, "digest": l.digest, "size": l.size, "how": l.how})).collect::<Vec<_>>(),
                })),
                append,
            })
        })
    }

    fn chain(&mut self, cx: &mut StepCx<'_>, pos: i64) -> Result<()> {
        let image = cx.subject.clone();
        let layers = q::layers(cx.conn, &image)?;
        let idx = usize::try_from(pos - 1).map_err(|_| Error::software(format!("image {image}: no layer {pos}")))?;
        let Some(layer) = layers.get(idx).cloned() else {
            return Err(Error::software(format!("image {image}: no layer {pos}")));
        };
        // This layer's blob still downloading in this command
        // (--stream-unpack): unpack it as it arrives, and learn its digest
        // (so its chain id) at the end. By default only the last download
        // is: wait until every other one has ended, or this one has.
        if layer.digest.is_none() && cx.intent().is_none() && self.streams(&layer.key)? {
            if let Some(tap) = self.ctx.feed.as_ref().and_then(|f| f.tap(&layer.key)) {
                let parents = known_digests(&image, &layers[..idx])?;
                let parent = ChainId::of_layers(&parents).pop();
                if self.chain_streamed(cx, pos, &layer, parent, tap)? {
                    return Ok(());
                }
            }
        }
        // The digests of layers 1..=pos. One the fetch step could not know
        // yet (its blob was still downloading) is learned here, waiting for
        // that blob only, and recorded at once: it is a fact about the
        // listed object's content, true whatever this step does next.
        let mut digests: Vec<BlobDigest> = Vec::with_capacity(idx + 1);
        for l in layers.iter().take(idx + 1) {
            let d = match &l.digest {
                Some(d) => d.clone(),
                None => {
                    let d = super::sources::layer_digest(self.ctx, cx.conn, &l.key)
                        .map_err(|e| e.context(format!("image {image}: layer {}", l.key)))?;
                    q::set_layer_digest(cx.conn, &image, l.position, &d)?;
                    fault::point("chain:digest");
                    refuse_rejected(cx.conn, &image, &l.key, &d)?;
                    d
                }
            };
            digests.push(d);
        }
        let ids = ChainId::of_layers(&digests);
        let Some(chain_id) = ids.get(idx) else {
            return Err(Error::software(format!("image {image}: no layer {pos}")));
        };
        let parent = if idx == 0 { None } else { ids.get(idx - 1).cloned() };

        // Threads of this process pulling images that share this chain
        // build it once: the others wait here, then find it ready.
        let _claim = ChainClaim::acquire(chain_id, parent.as_ref(), None)?;

        // A dead attempt of this step may have left work behind.
        if let Some(intent) = cx.intent().cloned() {
            let run_dir = self.ctx.run_dir.clone();
            let dev = self.ctx.prepare_pool(cx.conn)?;
            teardown_attempt(&run_dir, dev, cx.conn, &intent)?;
        }
        self.finish_dead_streams(cx)?;

        // A building row whose owner is no longer running (its run failed
        // or was cancelled after its teardown failed) is finished off here,
        // so one bad attempt does not block this chain for every image.
        if q::chain(cx.conn, chain_id)?.is_some_and(|c| c.state == q::ChainState::Building) {
            for (run, idx, intent) in crate::journal::dead_intents(cx.conn, "chain_id", chain_id.as_str())? {
                log::info!("chain {}: finishing the teardown of run {run}'s failed attempt", short(chain_id));
                let run_dir = self.ctx.run_dir.clone();
                let dev = self.ctx.prepare_pool(cx.conn)?;
                teardown_attempt(&run_dir, dev, cx.conn, &intent)?;
                crate::journal::clear_intent(cx.conn, run, idx)?;
            }
        }

        if let Some(c) = q::chain(cx.conn, chain_id)? {
            return share_chain(cx, &image, pos, &layer.key, &c);
        }
        let parent_thin = parent_thin_of(cx.conn, &image, pos, parent.as_ref())?;

        let blob_path = super::sources::ensure_blob(self.ctx, cx.conn, &layer.key, &digests[idx])?;
        // A blob this command downloaded was hashed as it was written;
        // one stored earlier is hashed again while it is unpacked.
        let fresh = self.ctx.feed.as_ref().is_some_and(|f| f.downloaded_now(&digests[idx]));
        let blob_size = std::fs::metadata(&blob_path).map(|m| m.len()).unwrap_or(0);
        let known = Known { chain_id: chain_id.clone(), parent: parent.clone(), blob: digests[idx].clone() };
        let (thin_id, _) = self.begin_attempt(cx, pos, Some(&known), parent_thin, blob_size)?;
        let blob = Blob { path: &blob_path, key: &layer.key, digest: &digests[idx], hash: !fresh };
        let report = self.attempt(cx, thin_id, parent_thin, Source::Stored(&blob))?;
        let report = match report {
            Ok(r) => r,
            Err(e) => {
                if e.kind() == Kind::BadData {
                    crate::store::blobs::reject_blob(cx.conn, &digests[idx], e.message())?;
                }
                return Err(e.context(format!("image {image}: layer {}", layer.key)));
            }
        };
        fault::point("chain:built");
        let (img, cid) = (image.clone(), chain_id.clone());
        cx.complete(move |tx| {
            crate::store::thin_pool::set_thin_state(tx, thin_id, crate::store::thin_pool::ThinState::Ready)?;
            q::set_chain_ready(tx, &cid, &report)?;
            q::set_layer_chain(tx, &img, pos, &cid)?;
            Ok(Completion::with_outcome(json!({"chain": cid, "built": true, "thin_id": thin_id, "report": report})))
        })
    }

    /// Whether the chain of `key`, whose blob this command is still
    /// downloading, unpacks it as it arrives (`--stream-unpack`). With
    /// `last`, this waits until the blob is in (`false`: build from the
    /// store) or is the only one still to come (`true`).
    fn streams(&self, key: &str) -> Result<bool> {
        let Some(feed) = self.ctx.feed.as_ref() else { return Ok(false) };
        match self.ctx.opts.stream_unpack {
            StreamUnpack::Never => Ok(false),
            StreamUnpack::Always => Ok(true),
            StreamUnpack::Last => feed.wait_until_last(key),
        }
    }

    /// Build layer `pos` from its blob while the blob downloads (`tap`), on
    /// top of chain `parent`. The device is made and filled under an
    /// intent that names no chain yet: the chain id needs the blob's
    /// digest, known when the download verified the last byte. Then the
    /// chain is claimed and its `building` row recorded with the intent,
    /// and it is marked ready with the step. `Ok(false)`: the download
    /// ended before this step could read it; build from the stored blob.
    fn chain_streamed(
        &mut self,
        cx: &mut StepCx<'_>,
        pos: i64,
        layer: &q::LayerRow,
        parent: Option<ChainId>,
        tap: std::sync::Arc<Tap>,
    ) -> Result<bool> {
        let image = cx.subject.clone();
        // One reader per download: an image sharing this key waits here,
        // then finds the download ended and the chain built.
        let claim = ChainClaim::stream(parent.clone(), tap.clone())?;
        if tap.ending().is_some() || matches!(tap.wait_start()?, Start::Ended) {
            return Ok(false);
        }
        self.finish_dead_streams(cx)?;
        let parent_thin = parent_thin_of(cx.conn, &image, pos, parent.as_ref())?;
        let (thin_id, _) = self.begin_attempt(cx, pos, None, parent_thin, tap.size())?;
        log::debug!("image {image}: layer {pos} ({}) unpacks as it downloads", layer.key);
        let key = layer.key.as_str();
        // Once the download verified the blob: claim its chain, and name it
        // in the intent with a `building` row (a failed teardown then leaves
        // what another image needing this chain finishes, as for any build).
        let mut held: Option<ChainClaim> = None;
        let mut existing: Option<q::ChainRow> = None;
        let mut verified: Option<(ChainId, BlobDigest)> = None;
        let result = {
            let mut on_verified = |cx: &mut StepCx<'_>, d: &BlobDigest| -> Result<()> {
                let cid = ChainId::child(parent.as_ref(), d);
                held = Some(ChainClaim::acquire(&cid, parent.as_ref(), Some(&claim))?);
                q::set_layer_digest(cx.conn, &image, pos, d)?;
                fault::point("chain:digest");
                verified = Some((cid.clone(), d.clone()));
                if let Some(c) = q::chain(cx.conn, &cid)? {
                    existing = Some(c);
                    return Ok(());
                }
                let now = cx.intent().cloned().unwrap_or(Value::Null);
                let mut intent = BuildIntent::read(&now)?.ok_or_else(|| Error::software("intent lost its thin id"))?;
                intent.chain_id = Some(cid.clone());
                let intent = crate::journal::intent_value(&intent)?;
                cx.record_intent_with(|tx| {
                    q::insert_chain_building(tx, &cid, parent.as_ref(), d, pos, thin_id)?;
                    Ok(intent)
                })
            };
            self.attempt(cx, thin_id, parent_thin, Source::Streamed { tap: &tap, key, on_verified: &mut on_verified })?
        };
        let report = match result {
            Ok(r) => r,
            Err(e) => {
                // The bytes were judged before the download checked them:
                // a verdict stands only for the blob the download stored.
                let ending = match (tap.ending(), e.kind()) {
                    (Some(end), _) => Some(end),
                    (None, Kind::BadData) => Some(tap.wait_end()?),
                    (None, _) => None,
                };
                let e = match ending {
                    Some(Err((kind, msg))) => Error::new(kind, msg),
                    _ if tap.restarted() => Error::new(
                        Kind::TempFail,
                        format!("{key} changed in the bucket while it was being unpacked; pull again"),
                    ),
                    Some(Ok(d)) if e.kind() == Kind::BadData => {
                        q::set_layer_digest(cx.conn, &image, pos, &d)?;
                        crate::store::blobs::reject_blob(cx.conn, &d, e.message())?;
                        e
                    }
                    _ => e,
                };
                // The feed's result for this key was handed out here.
                if let Some(feed) = self.ctx.feed.as_ref() {
                    let _ = feed.wait(key);
                }
                return Err(e.context(format!("image {image}: layer {key}")));
            }
        };
        let Some((chain_id, _)) = verified else {
            return Err(Error::software(format!("{key}: unpacked, but its download has no digest")));
        };
        if let Some(c) = existing {
            // The same content reached this chain another way meanwhile
            // (another key with a multipart ETag): keep that one.
            log::info!("image {image}: layer {key}: chain {} exists; dropping this copy", short(&chain_id));
            let run_dir = self.ctx.run_dir.clone();
            let dev = self.ctx.prepare_pool(cx.conn)?;
            let intent = cx.intent().cloned().unwrap_or(Value::Null);
            teardown_attempt(&run_dir, dev, cx.conn, &intent)?;
            cx.record_intent(Value::Null)?;
            share_chain(cx, &image, pos, key, &c)?;
            return Ok(true);
        }
        fault::point("chain:built");
        let cid = chain_id.clone();
        cx.complete(move |tx| {
            crate::store::thin_pool::set_thin_state(tx, thin_id, crate::store::thin_pool::ThinState::Ready)?;
            q::set_chain_ready(tx, &cid, &report)?;
            q::set_layer_chain(tx, &image, pos, &cid)?;
            Ok(Completion::with_outcome(
                json!({"chain": cid, "built": true, "streamed": true, "thin_id": thin_id, "report": report}),
            ))
        })?;
        drop(held);
        Ok(true)
    }

    /// Tear down what dead streamed builds left (their teardown failed and
    /// their intent names no chain, so no step would find it by chain).
    fn finish_dead_streams(&mut self, cx: &mut StepCx<'_>) -> Result<()> {
        let kind = super::RunKind::Pull.as_str();
        for (run, idx, intent) in crate::journal::dead_intents_without(cx.conn, kind, "chain:", "chain_id")? {
            if BuildIntent::read(&intent)?.is_none() {
                continue;
            }
            log::info!("finishing the teardown of run {run}'s failed build (step {idx})");
            let run_dir = self.ctx.run_dir.clone();
            let dev = self.ctx.prepare_pool(cx.conn)?;
            teardown_attempt(&run_dir, dev, cx.conn, &intent)?;
            crate::journal::clear_intent(cx.conn, run, idx)?;
        }
        Ok(())
    }

    /// Record the intent of a build (a thin id; with `known`, the chain's
    /// `building` row too), durably, before any kernel work. Returns the
    /// thin id and the intent.
    fn begin_attempt(
        &mut self,
        cx: &mut StepCx<'_>,
        pos: i64,
        known: Option<&Known>,
        parent_thin: Option<ThinId>,
        blob_size: u64,
    ) -> Result<(ThinId, Value)> {
        let size = Sectors::from_bytes(self.ctx.opts.device_size);
        let run_dir = self.ctx.run_dir.clone();
        let dev = self.ctx.prepare_pool(cx.conn)?;
        dev.check_usable()?;
        // Unpacked data takes about the blob's size; metadata is gated inside.
        dev.ensure_space(blob_size + blob_size / 4)?;
        let build_name = |t: ThinId| dev.build_name(t);
        cx.record_intent_with(|tx| {
            let thin_id = crate::pool::manager::alloc_thin_id(tx, ThinRole::Chain, parent_thin, size)?;
            if let Some(k) = known {
                q::insert_chain_building(tx, &k.chain_id, k.parent.as_ref(), &k.blob, pos, thin_id)?;
            }
            crate::journal::intent_value(&BuildIntent {
                thin_id,
                chain_id: known.map(|k| k.chain_id.clone()),
                dm_name: Some(build_name(thin_id)),
                mount: Some(mount::mount_point(&run_dir, thin_id)),
                foreign: false,
            })
        })?;
        let intent = cx.intent().cloned().unwrap_or(Value::Null);
        let thin_id =
            BuildIntent::read(&intent)?.map(|i| i.thin_id).ok_or_else(|| Error::software("intent lost its thin id"))?;
        fault::point("chain:intent");
        Ok((thin_id, intent))
    }

    /// Create the attempt's thin device and build into it. The outer error:
    /// the attempt could not be cleaned up, or its device id was someone
    /// else's. The inner one: the build failed, and nothing of it is left.
    fn attempt(
        &mut self,
        cx: &mut StepCx<'_>,
        thin_id: ThinId,
        parent_thin: Option<ThinId>,
        source: Source<'_>,
    ) -> Result<Result<Value>> {
        let size = Sectors::from_bytes(self.ctx.opts.device_size);
        let run_dir = self.ctx.run_dir.clone();
        let opts = self.ctx.opts.extract.clone();
        let dev = self.ctx.prepare_pool(cx.conn)?;
        let created = match parent_thin {
            None => dev.create_thin(thin_id),
            Some(p) => dev.snapshot(thin_id, p),
        };
        if let Ok(crate::pool::Created::Exists) = created {
            // Not ours: never touched. Mark the attempt so no teardown (now
            // or after a crash) deletes it, drop its rows, and stop.
            let intent = cx.intent().cloned().unwrap_or(Value::Null);
            let mut foreign = BuildIntent::read(&intent)?.ok_or_else(|| Error::software("intent lost its thin id"))?;
            foreign.foreign = true;
            let foreign = crate::journal::intent_value(&foreign)?;
            cx.record_intent(foreign.clone())?;
            teardown_attempt(&run_dir, dev, cx.conn, &foreign)?;
            cx.record_intent(Value::Null)?;
            return Err(crate::pool::manager::diverged(&dev.pool_name(), thin_id));
        }
        let result = created.and_then(|_| match source {
            Source::Stored(blob) => build(dev, &run_dir, thin_id, parent_thin, size, Input::Stored(blob), &opts),
            Source::Streamed { tap, key, on_verified } => {
                let mut hook = |d: &BlobDigest| on_verified(&mut *cx, d);
                let input = Input::Streamed { tap, key, on_verified: &mut hook };
                build(dev, &run_dir, thin_id, parent_thin, size, input, &opts)
            }
        });
        match result {
            Ok(r) => Ok(Ok(r)),
            Err(e) => {
                // Tear down this attempt now (as its intent stands: a
                // streamed build may have named its chain meanwhile); a
                // permanent failure leaves nothing.
                let intent = cx.intent().cloned().unwrap_or(Value::Null);
                if let Err(te) = teardown_attempt(&run_dir, dev, cx.conn, &intent) {
                    log::error!("cleaning up after a failed build of thin device {thin_id}: {}", te.full_message());
                    return Err(e);
                }
                cx.record_intent(Value::Null)?;
                // A signal shows as a read error inside the unpack.
                if crate::ops::signals::pending().is_some() {
                    return Err(crate::ops::signals::interrupted_error());
                }
                Ok(Err(e))
            }
        }
    }
}

/// What a chain step builds from.
enum Source<'a> {
    Stored(&'a Blob<'a>),
    /// `on_verified` runs once the download verified the blob, before the
    /// build goes on (sync, checks).
    Streamed {
        tap: &'a Tap,
        key: &'a str,
        on_verified: &'a mut dyn FnMut(&mut StepCx<'_>, &BlobDigest) -> Result<()>,
    },
}

/// What a chain build with a known digest records in its intent.
struct Known {
    chain_id: ChainId,
    parent: Option<ChainId>,
    blob: BlobDigest,
}

/// The digests of `layers`, every one already known (they are the lower
/// layers of a chain step, whose own steps recorded them).
fn known_digests(image: &str, layers: &[q::LayerRow]) -> Result<Vec<BlobDigest>> {
    layers
        .iter()
        .map(|l| {
            l.digest.clone().ok_or_else(|| {
                Error::software(format!("image {image}: layer {} has no digest before the layers above it", l.key))
            })
        })
        .collect()
}

/// The step's chain exists: share it if it is ready (and its device is).
fn share_chain(cx: &mut StepCx<'_>, image: &str, pos: i64, key: &str, c: &q::ChainRow) -> Result<()> {
    let chain_id = &c.chain_id;
    if c.state == q::ChainState::Ready {
        let thin_ok = match c.thin_id {
            Some(t) => crate::store::thin_pool::thin_ready(cx.conn, t)?,
            None => false,
        };
        if !thin_ok {
            return Err(Error::new(
                Kind::Software,
                format!(
                    "chain {} is marked ready but its thin device {:?} is not; refusing to share it (run `thinimg gc`)",
                    short(chain_id),
                    c.thin_id
                ),
            ));
        }
        log::debug!("image {image}: layer {pos} ({key}) shares chain {}", short(chain_id));
        let (img, cid) = (image.to_string(), chain_id.clone());
        return cx.complete(move |tx| {
            q::set_layer_chain(tx, &img, pos, &cid)?;
            Ok(Completion::with_outcome(json!({"chain": cid, "built": false})))
        });
    }
    // A 'building' row owned by no live intent: a dead run of another
    // image. Its own resume cleans it up; we must not build twice.
    Err(Error::new(Kind::TempFail, format!("chain {} is being built by another run; retry later", short(chain_id))))
}

/// The thin device of chain `parent`, which must be built and ready.
fn parent_thin_of(conn: &Connection, image: &str, pos: i64, parent: Option<&ChainId>) -> Result<Option<ThinId>> {
    let Some(p) = parent else { return Ok(None) };
    let pc = q::chain(conn, p)?
        .filter(|c| c.state == q::ChainState::Ready)
        .ok_or_else(|| Error::software(format!("image {image}: parent chain of layer {pos} is not built")))?;
    let t = pc.thin_id.ok_or_else(|| Error::software("parent chain has no thin device"))?;
    if !crate::store::thin_pool::thin_ready(conn, t)? {
        return Err(Error::software(format!(
            "image {image}: the thin device {t} of layer {pos}'s parent chain is not ready; refusing to snapshot it"
        )));
    }
    Ok(Some(t))
}

/// A layer rejected before is not unpacked again until its content changes.
fn refuse_rejected(conn: &rusqlite::Connection, image: &str, key: &str, digest: &BlobDigest) -> Result<()> {
    match crate::store::blobs::blob_rejection(conn, digest)? {
        Some(reason) => Err(Error::bad_data(format!("image {image}: layer {key}: rejected earlier: {reason}"))),
        None => Ok(()),
    }
}

/// An in-process claim on building one chain (the state lock already
/// keeps other processes out), or on reading one download as it arrives
/// (the chain it builds is known only at the end of the download).
struct ChainClaim(u64);

enum Claimed {
    Chain {
        id: ChainId,
    },
    /// A build on `parent` reading `tap`: it claims the chain its blob
    /// turns out to make, as soon as the download knows the digest.
    Stream {
        parent: Option<ChainId>,
        tap: std::sync::Arc<Tap>,
    },
}

struct Claims {
    next: u64,
    held: Vec<(u64, Claimed)>,
}

static CLAIMS: std::sync::Mutex<Claims> = std::sync::Mutex::new(Claims { next: 0, held: Vec::new() });
static CLAIM_FREED: std::sync::Condvar = std::sync::Condvar::new();

impl ChainClaim {
    /// Wait until nothing else in this process holds what `busy` says, then hold `what`.
    fn take(what: Claimed, busy: impl Fn(u64, &Claimed) -> bool) -> Result<ChainClaim> {
        let mut claims = CLAIMS.lock().map_err(|_| Error::software("chain claim lock poisoned"))?;
        while claims.held.iter().any(|(t, c)| busy(*t, c)) {
            crate::ops::signals::check()?;
            claims = CLAIM_FREED
                .wait_timeout(claims, std::time::Duration::from_millis(200))
                .map_err(|_| Error::software("chain claim lock poisoned"))?
                .0;
        }
        claims.next += 1;
        let token = claims.next;
        claims.held.push((token, what));
        Ok(ChainClaim(token))
    }

    /// Claim chain `id` (on `parent`), waiting for whoever builds it, also
    /// a streamed build whose download turned out to make it. `mine`: the
    /// caller's own stream claim, not waited for.
    fn acquire(id: &ChainId, parent: Option<&ChainId>, mine: Option<&ChainClaim>) -> Result<ChainClaim> {
        let own = mine.map(|c| c.0);
        ChainClaim::take(Claimed::Chain { id: id.clone() }, |token, c| match c {
            _ if Some(token) == own => false,
            Claimed::Chain { id: held } => held == id,
            Claimed::Stream { parent: p, tap } => {
                p.as_ref() == parent && matches!(tap.ending(), Some(Ok(d)) if &ChainId::child(parent, &d) == id)
            }
        })
    }

    /// Claim reading `tap` to build on `parent`, waiting for another reader of it.
    fn stream(parent: Option<ChainId>, tap: std::sync::Arc<Tap>) -> Result<ChainClaim> {
        let t = tap.clone();
        ChainClaim::take(
            Claimed::Stream { parent, tap },
            move |_, c| matches!(c, Claimed::Stream { tap: held, .. } if std::sync::Arc::ptr_eq(held, &t)),
        )
    }
}

impl Drop for ChainClaim {
    fn drop(&mut self) {
        if let Ok(mut claims) = CLAIMS.lock() {
            claims.held.retain(|(t, _)| *t != self.0);
        }
        CLAIM_FREED.notify_all();
    }
}

fn short(id: &ChainId) -> &str {
    &id.as_str()[..12]
}

/// The blob a chain build unpacks. `hash`: hash every byte while
/// unpacking and fail the build (removing the file) if the digest differs.
struct Blob<'a> {
    path: &'a Path,
    key: &'a str,
    digest: &'a BlobDigest,
    hash: bool,
}

/// The kernel and filesystem work of one chain build.
fn build(
    dev: &PoolManager,
    run_dir: &Path,
    thin_id: ThinId,
    parent_thin: Option<ThinId>,
    size: Sectors,
    input: Input<'_>,
    opts: &crate::extract::Options,
) -> Result<Value> {
    fault::point("chain:thin-created");
    let t0 = std::time::Instant::now();
    let node = dev.activate(&dev.build_name(thin_id), thin_id, size)?;
    if parent_thin.is_none() {
        mkfs_ext4(&node)?;
    }
    let mnt = mount::mount_point(run_dir, thin_id);
    mount::mount_ext4(&node, &mnt)?;
    fault::point("chain:mounted");
    let t_ready = t0.elapsed();

    let (key, hashed) = match &input {
        Input::Stored(blob) => (blob.key, blob.hash),
        Input::Streamed { key, .. } => (*key, false),
    };
    let report = match input {
        Input::Stored(blob) => unpack_stored(&mnt, blob, opts)?,
        Input::Streamed { tap, key, on_verified } => {
            let mut reader = TapReader::open(tap)?;
            let report = crate::extract::apply_layer(&mnt, &mut reader, key, opts)?;
            // The rest (end-of-archive padding), up to the download's verdict:
            // the layer is kept only for the blob the download verified.
            std::io::copy(&mut reader, &mut std::io::sink())
                .map_err(|e| Error::io(format!("reading layer {key} as it downloads"), e))?;
            match tap.ending() {
                Some(Ok(d)) => on_verified(&d)?,
                _ => return Err(Error::software(format!("{key}: read to the end, but its download has no digest"))),
            }
            report
        }
    };
    fault::point("chain:unpacked");
    fault::fail("build:unpacked")?;
    let t_unpacked = t0.elapsed();
    let created = mount::ensure_layout(&mnt)?;
    let missing = mount::missing_layout(&mnt);
    mount::sync_and_unmount(&mnt)?;
    fault::point("chain:unmounted");
    log::debug!(
        "layer {key}: device{} and mount {:.1} s, unpack {:.1} s{}, sync and unmount {:.1} s",
        if parent_thin.is_none() { ", mkfs" } else { "" },
        t_ready.as_secs_f64(),
        (t_unpacked - t_ready).as_secs_f64(),
        if hashed { " (hashed)" } else { "" },
        (t0.elapsed() - t_unpacked).as_secs_f64()
    );
    // Every write reached the pool: the filesystem recorded no error, the
    // thin device did not fail, and the pool is not out of space, read-only
    // or in needs_check. Otherwise the layer is not marked ready.
    if mount::ext4_has_errors(&node)? {
        return Err(Error::new(
            Kind::Io,
            format!(
                "the filesystem of layer {key} recorded write errors (thin-pool {} full or failing?)",
                dev.pool_name()
            ),
        ));
    }
    dev.check_thin(&dev.build_name(thin_id))?;
    dev.check_usable()
        .map_err(|e| e.context(format!("after writing layer {key}, the pool is not healthy; the layer is not kept")))?;
    dev.deactivate(&dev.build_name(thin_id))?;
    let mut v = serde_json::to_value(&report).unwrap_or(Value::Null);
    if let Value::Object(m) = &mut v {
        m.insert("created_mount_points".into(), json!(created));
        m.insert("missing".into(), json!(missing));
    }
    Ok(v)
}

/// What a chain build unpacks.
enum Input<'a> {
    /// A blob in the store.
    Stored(&'a Blob<'a>),
    /// A blob still downloading, read as it arrives; `on_verified` is told
    /// its digest once the download verified it.
    Streamed { tap: &'a Tap, key: &'a str, on_verified: &'a mut dyn FnMut(&BlobDigest) -> Result<()> },
}

/// Unpack a stored blob, hashing it on the way if asked.
fn unpack_stored(mnt: &Path, blob: &Blob<'_>, opts: &crate::extract::Options) -> Result<crate::extract::Report> {
    let (key, digest) = (blob.key, blob.digest);
    let file = std::fs::File::open(blob.path).map_err(|e| Error::io(format!("opening blob of {key}"), e))?;
    // Read past the page cache where the filesystem allows (the download
    // wrote it that way too): see ops::direct.
    let inner = BlockReader::whole(file).map_err(|e| Error::io(format!("opening blob of {key}"), e))?;
    let mut reader = HashingReader { inner, hasher: blob.hash.then(Sha256::new) };
    let unpacked = crate::extract::apply_layer(mnt, &mut reader, key, opts);
    // Hash the rest (end-of-archive padding) so the digest covers every byte.
    let drained = if blob.hash { std::io::copy(&mut reader, &mut std::io::sink()).map(|_| ()) } else { Ok(()) };
    let report = unpacked?;
    drained.map_err(|e| Error::io(format!("reading blob of {key}"), e))?;
    if let Some(h) = reader.hasher.take() {
        let got = crate::ops::encode::hex(&h.finalize());
        if got != digest.as_str() {
            let _ = std::fs::remove_file(blob.path);
            return Err(Error::new(
                Kind::Io,
                format!(
                    "blob of {key} is corrupt on disk (sha256 {got}, expected {digest}); removed, it is fetched again"
                ),
            ));
        }
    }
    Ok(report)
}

struct HashingReader<R> {
    inner: R,
    /// `None`: pass the bytes through unhashed.
    hasher: Option<Sha256>,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(h) = self.hasher.as_mut() {
            h.update(&buf[..n]);
        }
        Ok(n)
    }
}

/// mkfs.ext4 options for a chain's base filesystem, chosen by measurement
/// (scripts/bench-mkfs, one VM run, 8 GiB device, golang's five fixture
/// layers, 64 KiB pool blocks; README "Filesystem options"):
///
/// | mkfs -E ..., mount                            | mkfs    | base chain | blocks: base / 5 chains | idle rw mount |
/// |-----------------------------------------------|---------|------------|-------------------------|---------------|
/// | lazy_itable_init=0,lazy_journal_init=0 (before) | 2092 ms | 4371 ms  | 3681 / 4886             | +1            |
/// | lazy_itable_init=1,lazy_journal_init=1        | 1213 ms | 6499 ms    | 629 / 2663              | +1216         |
/// | the same, mounted noinit_itable               | 607 ms  | 2806 ms    | 628 / 1837              | +1            |
/// | assume_storage_prezeroed=1 (now)              | 529 ms  | 3632 ms    | 628 / 1833              | +1            |
///
/// Journal size (-J size=16) and bytes-per-inode (-i 65536) changed nothing
/// measurable; a 2 GiB device saves 56 blocks per base, a 32 GiB one costs
/// 52 more. Times vary by +-40% between runs on a loaded host under TCG.
///
/// A fresh thin device reads every unprovisioned block as zeros, so the
/// "storage is pre-zeroed" promise holds by construction: mkfs writes no
/// inode tables and no journal, and marks every group's inode table as
/// zeroed, so no mount (build mounts or a user's mount of an activation)
/// ever starts ext4's lazy inode-table init and writes into the pool in
/// the background. `nodiscard`: discarding a fresh thin device is a no-op.
/// `-m 0`: no root-reserved blocks on an image.
pub const MKFS_OPTS: &[&str] = &["-q", "-F", "-E", "nodiscard,assume_storage_prezeroed=1", "-m", "0"];

/// What e2fsprogs before 1.47 (no `assume_storage_prezeroed`) gets: every
/// inode table and the journal written at mkfs time, so no mount ever
/// initializes anything in the background either, at the cost measured above.
pub const MKFS_OPTS_FULL_INIT: &[&str] =
    &["-q", "-F", "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0", "-m", "0"];

pub fn mkfs_ext4(node: &Path) -> Result<()> {
    mkfs_with(Path::new("mkfs.ext4"), node)
}

fn mkfs_with(program: &Path, node: &Path) -> Result<()> {
    let out = run_mkfs(program, MKFS_OPTS, node)?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let out = if stderr.contains("assume_storage_prezeroed") {
        log::warn!(
            "{} does not know -E assume_storage_prezeroed (e2fsprogs < 1.47): writing every inode table at mkfs time instead",
            program.display()
        );
        run_mkfs(program, MKFS_OPTS_FULL_INIT, node)?
    } else {
        out
    };
    if !out.status.success() {
        return Err(Error::new(
            Kind::CantCreate,
            format!(
                "mkfs.ext4 {} failed ({}): {}",
                node.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    Ok(())
}

fn run_mkfs(program: &Path, opts: &[&str], node: &Path) -> Result<std::process::Output> {
    std::process::Command::new(program).args(opts).arg(node).stdin(std::process::Stdio::null()).output().map_err(|e| {
        let kind = if e.kind() == std::io::ErrorKind::NotFound { Kind::Unavailable } else { Kind::Io };
        Error::new(kind, "running mkfs.ext4 (package e2fsprogs)").with_source(e)
    })
}

/// Undo whatever an attempt recorded in `intent`: unmount, deactivate,
/// delete the thin id from the pool and its rows from the database.
/// Every part tolerates "already gone".
pub fn teardown_attempt(run_dir: &Path, dev: &PoolManager, conn: &Connection, intent: &Value) -> Result<()> {
    let Some(intent) = BuildIntent::read(intent)? else {
        return Ok(());
    };
    let (thin_id, cid) = (intent.thin_id, intent.chain_id.as_ref());
    if !q::build_attempt_pending(conn, thin_id, cid)? {
        // Completed and committed, or already torn down (its rows go last;
        // the id may belong to another device by now): nothing to undo.
        return Ok(());
    }
    log::info!("cleaning up an interrupted build of thin device {thin_id}");
    fault::fail("build:teardown")?;
    // A "foreign" id existed in the pool before this attempt (EEXIST):
    // nothing of it in the kernel is ours, only the rows are.
    if !intent.foreign {
        mount::unmount(&mount::mount_point(run_dir, thin_id))?;
        dev.deactivate(&dev.build_name(thin_id))?;
        dev.delete_thin(thin_id)?;
    }
    q::drop_build_attempt(conn, cid, thin_id)
}

fn finish(cx: &mut StepCx<'_>) -> Result<()> {
    let image = cx.subject.clone();
    let layers = q::layers(cx.conn, &image)?;
    let top = layers
        .last()
        .and_then(|l| l.chain_id.clone())
        .ok_or_else(|| Error::software(format!("image {image}: top layer has no chain")))?;
    if let Some(c) = q::chain(cx.conn, &top)? {
        if let Some(missing) = c.report.as_ref().and_then(|r| r.get("missing")).and_then(|m| m.as_array()) {
            if !missing.is_empty() {
                log::warn!(
                    "image {image}: top layer lacks {} — it may not boot as a root filesystem",
                    missing.iter().filter_map(|m| m.as_str()).collect::<Vec<_>>().join(", ")
                );
            }
        }
    }
    cx.complete(move |tx| {
        q::set_image_ready(tx, &image, &top)?;
        Ok(Completion::with_outcome(json!({"top_chain": top})))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_streamed_build_holds_the_chain_its_download_turns_out_to_make() {
        use std::sync::{mpsc, Arc};
        use std::time::Duration;
        let d = |c: &str| BlobDigest::parse(&c.repeat(64)).unwrap();
        let parent = ChainId::of_layers(&[d("1")]).pop();
        let made = ChainId::child(parent.as_ref(), &d("2"));
        let other = ChainId::child(parent.as_ref(), &d("3"));
        let tap = Arc::new(Tap::new("k", 1));
        let stream = ChainClaim::stream(parent.clone(), tap.clone()).unwrap();
        // Unresolved: the chains of siblings on the same parent build meanwhile.
        drop(ChainClaim::acquire(&made, parent.as_ref(), None).unwrap());
        tap.finish(Ok(d("2")));
        drop(ChainClaim::acquire(&other, parent.as_ref(), None).unwrap());
        // Resolved to `made`: whoever wants it waits for the streamed build...
        let (tx, rx) = mpsc::channel();
        let (m, p) = (made.clone(), parent.clone());
        let waiter = std::thread::spawn(move || {
            let c = ChainClaim::acquire(&m, p.as_ref(), None);
            tx.send(c.is_ok()).unwrap();
        });
        assert!(rx.recv_timeout(Duration::from_millis(600)).is_err(), "the chain was taken from the streamed build");
        // ...which itself claims it,
        let own = ChainClaim::acquire(&made, parent.as_ref(), Some(&stream)).unwrap();
        // and a second reader of the same download waits too.
        let (tx2, rx2) = mpsc::channel();
        let (t2, p2) = (tap.clone(), parent.clone());
        let second = std::thread::spawn(move || tx2.send(ChainClaim::stream(p2, t2).is_ok()).unwrap());
        assert!(rx2.recv_timeout(Duration::from_millis(600)).is_err());
        drop(own);
        drop(stream);
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)), Ok(true));
        assert_eq!(rx2.recv_timeout(Duration::from_secs(5)), Ok(true));
        waiter.join().unwrap();
        second.join().unwrap();
    }

    #[test]
    fn pull_steps_and_requests_read_back() {
        for s in [PullStep::Fetch, PullStep::Chain(1), PullStep::Chain(12), PullStep::Finish] {
            assert_eq!(PullStep::parse(&s.name()).unwrap(), s);
        }
        assert_eq!(PullStep::Chain(3).name(), "chain:3");
        for bad in ["chain:0", "chain:-1", "chain:", "chain:x", "chain 1", "Fetch", ""] {
            assert!(PullStep::parse(bad).is_err(), "{bad:?}");
        }
        let r: PullRequest = serde_json::from_value(spec("golang", "golang/3").request).unwrap();
        assert_eq!(r.reference.as_deref(), Some("golang/3"));
        let r: PullRequest = serde_json::from_value(json!({})).unwrap();
        assert_eq!(r.reference, None);
        assert!(serde_json::from_value::<PullRequest>(json!({"ref": 3})).is_err());
    }

    #[test]
    fn build_intents_read_back_and_refuse_what_they_cannot_read() {
        let i = BuildIntent {
            thin_id: ThinId::new(7).unwrap(),
            chain_id: Some(ChainId::parse(&"c".repeat(64)).unwrap()),
            dm_name: Some("x-c7".into()),
            mount: Some("/run/thinimg/mnt/7".into()),
            foreign: false,
        };
        let v = crate::journal::intent_value(&i).unwrap();
        // The JSON earlier versions wrote, key for key.
        assert_eq!(
            v,
            json!({"thin_id": 7, "chain_id": "c".repeat(64), "dm_name": "x-c7", "mount": "/run/thinimg/mnt/7"})
        );
        assert_eq!(BuildIntent::read(&v).unwrap(), Some(i.clone()));
        let foreign = json!({"thin_id": 7, "chain_id": "c".repeat(64), "foreign": true});
        assert!(BuildIntent::read(&foreign).unwrap().unwrap().foreign);
        // Cleared, or recorded before an id was allocated: nothing to undo.
        assert_eq!(BuildIntent::read(&Value::Null).unwrap(), None);
        assert_eq!(BuildIntent::read(&json!({"chain_id": "x"})).unwrap(), None);
        // An id that does not fit (once truncated with `as u32`) or is not a
        // number is an error, never another device's id or "nothing to undo".
        assert!(BuildIntent::read(&json!({"thin_id": (1u64 << 32) + 7})).is_err());
        assert!(BuildIntent::read(&json!({"thin_id": "7"})).is_err());
        assert!(BuildIntent::read(&json!({"thin_id": 7, "foreign": "yes"})).is_err());
        // Nor an id past the kernel's 24 bits, nor a chain id that is not one.
        assert!(BuildIntent::read(&json!({"thin_id": 1u64 << 24})).is_err());
        assert!(BuildIntent::read(&json!({"thin_id": 7, "chain_id": "x"})).is_err());
    }

    /// A scratch dir of this test under the system temp dir.
    fn scratch(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("thinimg-mkfs-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// mkfs on a sparse 1 GiB file (a thin device's stand-in: holes read as
    /// zeros); returns the bytes it allocated and whether every block group
    /// is marked ITABLE_ZEROED (so no mount starts lazy inode-table init).
    fn mkfs_sparse(program: &Path, dir: &Path) -> (u64, bool) {
        use std::os::unix::fs::MetadataExt;
        let img = dir.join("fs.img");
        std::fs::File::create(&img).unwrap().set_len(1 << 30).unwrap();
        mkfs_with(program, &img).unwrap();
        let allocated = std::fs::metadata(&img).unwrap().blocks() * 512;
        let out = std::process::Command::new("dumpe2fs").arg(&img).output().expect("dumpe2fs (e2fsprogs)");
        assert!(out.status.success(), "dumpe2fs: {}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout);
        let groups: Vec<&str> = text.lines().filter(|l| l.starts_with("Group ") && l.contains(": (Blocks")).collect();
        assert!(groups.len() > 4, "dumpe2fs listed {} groups", groups.len());
        (allocated, groups.iter().all(|g| g.contains("ITABLE_ZEROED")))
    }

    #[test]
    fn mkfs_writes_only_metadata_and_marks_inode_tables_zeroed() {
        let d = scratch("pre");
        let (allocated, zeroed) = mkfs_sparse(Path::new("mkfs.ext4"), &d);
        // Writing the inode tables (16 MiB per GiB) and the journal (32 MiB
        // at 1 GiB) would allocate ~50 MiB; bitmaps, descriptors and
        // superblock copies are well under 4 MiB.
        assert!(allocated < 4 << 20, "mkfs allocated {allocated} bytes of a 1 GiB sparse device");
        assert!(zeroed, "a group's inode table is not marked zeroed: mounts would init it in the background");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn mkfs_without_prezeroed_support_falls_back_to_full_init() {
        use std::os::unix::fs::PermissionsExt;
        let d = scratch("old");
        // e2fsprogs < 1.47 rejects the option with this message; every
        // other call goes to the real mkfs.ext4.
        let old = d.join("mkfs.ext4");
        std::fs::write(
            &old,
            "#!/bin/sh\ncase \"$*\" in *assume_storage_prezeroed*) echo '\nBad option(s) specified: assume_storage_prezeroed' >&2; exit 1;; esac\nexec mkfs.ext4 \"$@\"\n",
        )
        .unwrap();
        std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o755)).unwrap();
        let (allocated, zeroed) = mkfs_sparse(&old, &d);
        assert!(allocated > 16 << 20, "the fallback should write the inode tables: {allocated} bytes");
        assert!(zeroed, "full init marks every inode table zeroed");
        // Any other failure is reported, not retried.
        let err = mkfs_with(&old, &d.join("missing-dir/fs.img")).unwrap_err();
        assert!(err.to_string().contains("mkfs.ext4"), "{err}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
