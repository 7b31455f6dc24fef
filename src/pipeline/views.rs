//! Read models: what the read commands print, as typed `Serialize`
//! structs built in one place. `--json` prints them through serde, and
//! the text tables print from their fields, so the two never disagree (one
//! spelling of the pool mode, `out_of_data_space`, everywhere).
//!
//! - `images`, `pull`: [`ImageView`];
//! - `activate`, `activations`: [`ActivationView`];
//! - `status`: [`StatusView`] with [`PoolView`], [`Counts`] and
//!   [`SpaceView`] (the pool view and counts also feed `doctor` and the
//!   metrics file);
//! - `pool status`, `pool create`: [`PoolReport`];
//! - `cancel`: [`CancelView`].
//!
//! Nothing here changes the pool, the kernel or the database: a view is
//! read from the store, the run directory, sysfs and (for the pool) the
//! kernel's status line, never by assembling anything.

use std::path::{Path, PathBuf};

use rusqlite::Connection;
use serde::Serialize;

use crate::dm::ThinId;
use crate::error::{Error, Kind, Result};
use crate::fetch::blobstore::BlobDigest;
use crate::journal::{Outcome, RunId, RunState};
use crate::pool::{Pool, PoolMode, PoolStatus};
use crate::store::ids::ChainId;
use crate::store::images::{self as q, ActivationState, ImageState, LayerRow};
use crate::store::{Db, DbStamp};

pub use crate::store::stats::Counts;

/// What state a pool is in, as `status` and `pool status` print it: its
/// kernel mode when it runs, else its health. Serialized (and printed) in
/// the spelling the man page documents, which is `pool status --json`'s
/// `status.mode` and `status.health`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PoolState {
    Rw,
    Ro,
    OutOfDataSpace,
    /// The pool failed: all I/O errors.
    Fail,
    /// The kernel could not read the pool's counters.
    Error,
}

impl PoolState {
    pub fn of(st: &PoolStatus) -> PoolState {
        match st {
            PoolStatus::Active(u) => match u.mode {
                PoolMode::Rw => PoolState::Rw,
                PoolMode::Ro => PoolState::Ro,
                PoolMode::OutOfDataSpace => PoolState::OutOfDataSpace,
            },
            PoolStatus::Fail => PoolState::Fail,
            PoolStatus::Error => PoolState::Error,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            PoolState::Rw => "rw",
            PoolState::Ro => "ro",
            PoolState::OutOfDataSpace => "out_of_data_space",
            PoolState::Fail => "fail",
            PoolState::Error => "error",
        }
    }
}

impl std::fmt::Display for PoolState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Serialize, Clone)]
pub struct PoolView {
    /// Serialized with the same names as `pool status --json`.
    #[serde(rename = "dm_name")]
    pub name: String,
    pub kind: crate::pool::PoolKind,
    #[serde(rename = "assembled")]
    pub present: bool,
    pub mode: Option<PoolState>,
    pub needs_check: Option<bool>,
    pub data_used_pct: Option<f64>,
    pub meta_used_pct: Option<f64>,
    pub data_used_bytes: Option<u64>,
    pub data_total_bytes: Option<u64>,
    pub thin_devices: u64,
    pub error: Option<String>,
}

impl PoolView {
    /// A recorded pool whose kernel state is not known (yet): not assembled,
    /// every kernel figure unknown.
    pub fn recorded(name: &str, kind: crate::pool::PoolKind, thin_devices: u64) -> PoolView {
        PoolView {
            name: name.to_string(),
            kind,
            present: false,
            mode: None,
            needs_check: None,
            data_used_pct: None,
            meta_used_pct: None,
            data_used_bytes: None,
            data_total_bytes: None,
            thin_devices,
            error: None,
        }
    }
}

/// The recorded pool and, if its dm device is up, its status. Never assembles.
pub fn pool_view(db: &Db, run_dir: &Path) -> Result<Option<PoolView>> {
    let Some((spec, _)) = crate::store::thin_pool::load(&db.conn)? else { return Ok(None) };
    let thin = crate::store::thin_pool::thin_count(&db.conn)?;
    let mut v = PoolView::recorded(spec.dm_name.as_str(), spec.kind, thin);
    match Pool::find(&spec, run_dir) {
        Ok(Some(p)) => {
            v.present = true;
            match p.status() {
                Ok(st) => {
                    v.mode = Some(PoolState::of(&st));
                    if let PoolStatus::Active(u) = st {
                        let block = spec.block_sectors.0 * 512;
                        v.needs_check = Some(u.needs_check);
                        v.data_used_pct = Some(pct(u.data_used, u.data_total));
                        v.meta_used_pct = Some(pct(u.meta_used, u.meta_total));
                        v.data_used_bytes = Some(u.data_used * block);
                        v.data_total_bytes = Some(u.data_total * block);
                    }
                }
                Err(e) => v.error = Some(e.full_message()),
            }
        }
        Ok(None) => {}
        Err(e) => v.error = Some(e.full_message()),
    }
    Ok(Some(v))
}

/// used/total as a percentage with one decimal (0 for an empty total).
pub fn pct(used: u64, total: u64) -> f64 {
    if total == 0 {
        0.0
    } else {
        (used as f64 * 1000.0 / total as f64).round() / 10.0
    }
}

/// Where the state directory's space goes, and what is left.
#[derive(Debug, Serialize, Default)]
pub struct SpaceView {
    pub blobs: i64,
    pub blob_bytes: i64,
    /// Partial downloads under blobs/partial/ (kept to resume).
    pub partial_downloads: u64,
    pub partial_bytes: u64,
    /// Loop-pool files: apparent size and bytes actually allocated on disk.
    pub pool_files: Vec<PoolFile>,
    pub pool_data_used_bytes: Option<u64>,
    pub pool_data_total_bytes: Option<u64>,
    pub pool_meta_used_pct: Option<f64>,
    /// Free space of the filesystem holding the state directory.
    pub fs_free_bytes: Option<u64>,
    pub fs_total_bytes: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct PoolFile {
    pub path: PathBuf,
    pub size_bytes: u64,
    pub allocated_bytes: u64,
}

/// Free and total bytes of the filesystem holding `path` (for unprivileged users).
pub fn fs_space(path: &Path) -> Option<(u64, u64)> {
    let st = nix::sys::statvfs::statvfs(path).ok()?;
    let frag = st.fragment_size();
    Some((st.blocks_available().saturating_mul(frag), st.blocks().saturating_mul(frag)))
}

pub fn space(state_dir: &Path, counts: Option<&Counts>, pool: Option<&PoolView>) -> SpaceView {
    use std::os::unix::fs::MetadataExt;
    let mut v = SpaceView::default();
    if let Some(c) = counts {
        v.blobs = c.blobs;
        v.blob_bytes = c.blob_bytes;
    }
    if let Ok(rd) = std::fs::read_dir(state_dir.join("blobs").join("partial")) {
        for e in rd.flatten() {
            if let Ok(m) = e.metadata() {
                if m.is_file() {
                    v.partial_downloads += 1;
                    v.partial_bytes += m.len();
                }
            }
        }
    }
    if let Ok(rd) = std::fs::read_dir(state_dir.join("pool")) {
        let mut files: Vec<PoolFile> = rd
            .flatten()
            .filter_map(|e| {
                let m = e.metadata().ok()?;
                m.is_file().then(|| PoolFile { path: e.path(), size_bytes: m.len(), allocated_bytes: m.blocks() * 512 })
            })
            .collect();
        files.sort_by(|a, b| a.path.cmp(&b.path));
        v.pool_files = files;
    }
    if let Some(p) = pool {
        v.pool_data_used_bytes = p.data_used_bytes;
        v.pool_data_total_bytes = p.data_total_bytes;
        v.pool_meta_used_pct = p.meta_used_pct;
    }
    if let Some((free, total)) = fs_space(state_dir) {
        v.fs_free_bytes = Some(free);
        v.fs_total_bytes = Some(total);
    }
    v
}

/// How many of each thing the database records.
pub fn counts(db: &Db) -> Result<Counts> {
    crate::store::stats::counts(&db.conn)
}

/// A layer whose blob was rejected, with why (it stays rejected).
#[derive(Debug, Clone, Serialize)]
pub struct RejectedLayer {
    pub position: i64,
    pub key: String,
    pub digest: BlobDigest,
    pub reason: String,
}

/// An image as `images` and `pull` print it.
#[derive(Debug, Clone, Serialize)]
pub struct ImageView {
    pub name: String,
    pub family: String,
    pub state: ImageState,
    pub top_layer: i64,
    pub top_chain: Option<ChainId>,
    pub layers: Vec<LayerRow>,
    /// Names of its activations.
    pub activations: Vec<String>,
    pub rejected_layers: Vec<RejectedLayer>,
}

/// The image `name`; no such image is [`Kind::NoSuchImage`].
pub fn image(conn: &Connection, name: &str) -> Result<ImageView> {
    let img = q::image(conn, name)?.ok_or_else(|| Error::new(Kind::NoSuchImage, format!("no image {name}")))?;
    let layers = q::layers(conn, name)?;
    let activations = q::activations_of(conn, name)?.into_iter().map(|a| a.name).collect();
    let mut rejected_layers = Vec::new();
    for l in &layers {
        if let Some(d) = &l.digest {
            if let Some(why) = crate::store::blobs::blob_rejection(conn, d)? {
                rejected_layers.push(RejectedLayer {
                    position: l.position,
                    key: l.key.clone(),
                    digest: d.clone(),
                    reason: why,
                });
            }
        }
    }
    Ok(ImageView {
        name: img.name,
        family: img.family,
        state: img.state,
        top_layer: img.top_layer,
        top_chain: img.top_chain,
        layers,
        activations,
        rejected_layers,
    })
}

/// Every image, by name.
pub fn images(conn: &Connection) -> Result<Vec<ImageView>> {
    q::images(conn)?.iter().map(|i| image(conn, &i.name)).collect()
}

/// An activation as `activate` and `activations` print it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ActivationView {
    pub name: String,
    pub image: String,
    pub state: ActivationState,
    pub thin_id: ThinId,
    pub dm_name: String,
    /// Stable path under the run directory.
    pub path: String,
    /// /dev/dm-N, when the device is active.
    pub dev_path: Option<String>,
    pub major: Option<u32>,
    pub minor: Option<u32>,
    pub size_bytes: u64,
}

impl ActivationView {
    /// Active, with its dm device verified in the kernel.
    pub fn is_up(&self) -> bool {
        self.state == ActivationState::Active && self.minor.is_some()
    }
}

/// An idempotent `activate` answer kept under the run directory
/// (`answers/activate-<name>.json`, gone with a reboot), so a re-run with
/// nothing to do answers without opening the database: provisioning
/// scripts call `activate` for every boot of a VM. It is used only while
/// the database has not changed since it was read (same [`DbStamp`]: no
/// commit, no restore, and so no run left to resume) and the kernel still
/// agrees (the node is a dm device of that name). Anything else falls
/// back to reading the database.
#[derive(Debug, Serialize, serde::Deserialize)]
struct ActivateAnswer {
    stamp: DbStamp,
    view: ActivationView,
}

fn answer_path(run_dir: &Path, name: &str) -> PathBuf {
    run_dir.join("answers").join(format!("activate-{name}.json"))
}

/// The kept answer for activation `name` of `image`, if it still holds.
pub fn remembered_activation(state_dir: &Path, run_dir: &Path, name: &str, image: &str) -> Option<ActivationView> {
    let text = std::fs::read(answer_path(run_dir, name)).ok()?;
    let a: ActivateAnswer = serde_json::from_slice(&text).ok()?;
    let v = a.view;
    if v.name != name || v.image != image || !v.is_up() || crate::store::stamp(state_dir)? != a.stamp {
        return None;
    }
    let (ma, mi) = dm_node(Path::new(&v.path), &v.dm_name)?;
    (Some(ma) == v.major && Some(mi) == v.minor).then_some(v)
}

/// The numbers of the node at `path` when the kernel agrees it is dm
/// device `dm_name` (`/sys/dev/block/M:m/dm/name`): a stale node, or one
/// whose minor was reused by another device, is `None`.
fn dm_node(path: &Path, dm_name: &str) -> Option<(u32, u32)> {
    let (ma, mi) = crate::pool::node_numbers(path)?;
    (crate::pool::dm_name_of(ma, mi)? == dm_name).then_some((ma, mi))
}

/// Keep `view` (read from the database while it had stamp `before`, and
/// answered as is) if the database is still unchanged now that the reader
/// closed it. Best effort: not keeping it only costs the next re-run a
/// database read.
pub fn remember_activation(state_dir: &Path, run_dir: &Path, view: &ActivationView, before: Option<DbStamp>) {
    let Some(stamp) = before.filter(|b| crate::store::stamp(state_dir).as_ref() == Some(b)) else {
        return;
    };
    let path = answer_path(run_dir, &view.name);
    let res = (|| -> std::io::Result<()> {
        let dir = run_dir.join("answers");
        std::fs::create_dir_all(&dir)?;
        let tmp = dir.join(format!(".activate-{}.{}", view.name, std::process::id()));
        let text = serde_json::to_vec(&ActivateAnswer { stamp, view: view.clone() }).map_err(std::io::Error::other)?;
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, &path).inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })
    })();
    if let Err(e) = res {
        log::debug!("keeping the answer for activation {} in {}: {e}", view.name, path.display());
    }
}

/// Drop the kept answer for activation `name` (it is about to change).
pub fn forget_activation(run_dir: &Path, name: &str) {
    let _ = std::fs::remove_file(answer_path(run_dir, name));
}

/// The activation `name`, if recorded. Read-only: needs no pool and no
/// device-mapper access, only the database, the run directory and sysfs.
/// The dm name comes from the pool the database recorded (not from where
/// the state dir is now), and the node is reported only when the kernel
/// agrees: its dev_t is a dm device (`/sys/dev/block/M:m/dm/name`) of
/// exactly that name. A stale node, or one whose minor was reused by
/// another device, is not an answer.
pub fn activation(state_dir: &Path, run_dir: &Path, conn: &Connection, name: &str) -> Result<Option<ActivationView>> {
    let Some(a) = q::activation(conn, name)? else { return Ok(None) };
    let names = match crate::pool::manager::recorded_names(conn)? {
        Some(names) => names,
        None => crate::pool::Names::for_state_dir(state_dir)?,
    };
    let dm_name = names.activation(name);
    let path = crate::pool::names::node_path(run_dir, &dm_name);
    let (major, minor) = match dm_node(&path, &dm_name) {
        Some((ma, mi)) if a.state == ActivationState::Active => (Some(ma), Some(mi)),
        _ => (None, None),
    };
    // The row exists (a foreign key); failing to read it is an error, not a size of 0.
    let size = crate::store::thin_pool::thin_size(conn, a.thin_id)?.bytes();
    Ok(Some(ActivationView {
        name: a.name,
        image: a.image,
        state: a.state,
        thin_id: a.thin_id,
        dm_name,
        path: path.display().to_string(),
        // devtmpfs names every dm device dm-<minor>; only a verified dm
        // device gets that path.
        dev_path: minor.map(|m| format!("/dev/dm-{m}")),
        major,
        minor,
        size_bytes: size,
    }))
}

/// Every recorded activation, by name.
pub fn activations(state_dir: &Path, run_dir: &Path, conn: &Connection) -> Result<Vec<ActivationView>> {
    let mut all = Vec::new();
    for a in q::activations(conn)? {
        if let Some(v) = activation(state_dir, run_dir, conn, &a.name)? {
            all.push(v);
        }
    }
    Ok(all)
}

/// A run that has not ended.
#[derive(Debug, Clone, Serialize)]
pub struct RunInFlight {
    pub id: RunId,
    pub kind: String,
    pub subject: String,
    pub state: RunState,
    /// The step it is at (the first not done).
    pub step: Option<String>,
    /// Steps done of all: `2/5`.
    pub progress: String,
    pub pid: Option<i64>,
    /// Its process is alive (else it resumes on the next write).
    pub running: bool,
}

/// A failed run that no later run of its kind and subject replaced.
#[derive(Debug, Clone, Serialize)]
pub struct RecentError {
    pub id: RunId,
    pub kind: String,
    pub subject: String,
    pub error_kind: Option<String>,
    pub error: Option<String>,
}

/// What `status` prints. Without a database only the state dir and its
/// space are known: the other fields are left out (not null).
#[derive(Debug, Serialize)]
pub struct StatusView {
    pub state_dir: PathBuf,
    /// Whether the state dir has a database yet.
    pub database: bool,
    #[serde(flatten)]
    pub recorded: Option<Recorded>,
    pub space: SpaceView,
}

/// The part of [`StatusView`] read from the database.
#[derive(Debug, Serialize)]
pub struct Recorded {
    /// The recorded pool (`null`: none yet).
    pub pool: Option<PoolView>,
    pub counts: Counts,
    pub runs_in_flight: Vec<RunInFlight>,
    /// The five newest unresolved failures.
    pub recent_errors: Vec<RecentError>,
}

/// The host's state for `status`, read without the lock.
pub fn status(state_dir: &Path, run_dir: &Path) -> Result<StatusView> {
    let Some(db) = Db::open_existing(state_dir)? else {
        let space = space(state_dir, None, None);
        return Ok(StatusView { state_dir: state_dir.to_path_buf(), database: false, recorded: None, space });
    };
    let pool = pool_view(&db, run_dir)?;
    let counts = counts(&db)?;
    let space = space(state_dir, Some(&counts), pool.as_ref());
    let runs = crate::journal::list(&db.conn, false)?;
    let runs_in_flight = runs
        .iter()
        .filter(|r| matches!(r.state, RunState::Active | RunState::Cancelling))
        .map(|r| {
            let done = r.steps.iter().filter(|s| s.state == crate::journal::StepState::Done).count();
            let cur = r.steps.iter().find(|s| s.state != crate::journal::StepState::Done);
            RunInFlight {
                id: r.id,
                kind: r.kind.clone(),
                subject: r.subject.clone(),
                state: r.state,
                step: cur.map(|s| s.name.clone()),
                progress: format!("{done}/{}", r.steps.len()),
                pid: r.pid,
                running: r.pid.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists()),
            }
        })
        .collect();
    let recent_errors = runs
        .iter()
        .filter(|r| r.state == RunState::Failed)
        .take(5)
        .map(|r| RecentError {
            id: r.id,
            kind: r.kind.clone(),
            subject: r.subject.clone(),
            error_kind: r.error_kind.clone(),
            error: r.error.clone(),
        })
        .collect();
    Ok(StatusView {
        state_dir: state_dir.to_path_buf(),
        database: true,
        recorded: Some(Recorded { pool, counts, runs_in_flight, recent_errors }),
        space,
    })
}

/// What `pool status` and `pool create` print about an assembled pool.
#[derive(Debug, Serialize)]
pub struct PoolReport {
    pub dm_name: String,
    /// `major:minor` of the pool's dm device.
    pub dev: String,
    pub kind: crate::pool::PoolKind,
    /// `created`, `exists` or `assembled`: what the command found or did.
    pub state: &'static str,
    pub assembled: bool,
    pub data_path: PathBuf,
    pub meta_path: PathBuf,
    pub block_bytes: u64,
    pub thin_devices: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_used_pct: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub meta_used_pct: Option<f64>,
    /// The data device's size (the same as `data_total_bytes`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_bytes: Option<u64>,
    /// The same name as in `status --json`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_total_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_used_bytes: Option<u64>,
    /// The kernel's status line, parsed (`null` if not read).
    pub status: Option<PoolStatus>,
    /// [`PoolState::of`] the status: printed by the text form; `status`
    /// already holds it for JSON.
    #[serde(skip)]
    pub mode: Option<PoolState>,
}

/// The report on `pool` with its kernel status `st`, as the command `what` left it.
pub fn pool_report(conn: &Connection, pool: &Pool, st: Option<&PoolStatus>, what: &'static str) -> Result<PoolReport> {
    let spec = pool.spec();
    let block = spec.block_sectors.bytes();
    let mut r = PoolReport {
        dm_name: spec.dm_name.as_str().to_string(),
        dev: pool.dev().to_string(),
        kind: spec.kind,
        state: what,
        assembled: true,
        data_path: spec.data_path.clone(),
        meta_path: spec.meta_path.clone(),
        block_bytes: block,
        thin_devices: crate::store::thin_pool::thin_count(conn)?,
        data_used_pct: None,
        meta_used_pct: None,
        data_bytes: None,
        data_total_bytes: None,
        data_used_bytes: None,
        status: st.cloned(),
        mode: st.map(PoolState::of),
    };
    if let Some(PoolStatus::Active(u)) = st {
        r.data_used_pct = Some(pct(u.data_used, u.data_total));
        r.meta_used_pct = Some(pct(u.meta_used, u.meta_total));
        r.data_bytes = Some(u.data_total * block);
        r.data_total_bytes = Some(u.data_total * block);
        r.data_used_bytes = Some(u.data_used * block);
    }
    Ok(r)
}

/// What `cancel` prints per run.
#[derive(Debug, Clone, Serialize)]
pub struct CancelView {
    pub id: RunId,
    /// How the run ended: `cancelled`, or `done` if it finished first.
    pub state: Outcome,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_state_has_one_spelling() {
        let all = [PoolState::Rw, PoolState::Ro, PoolState::OutOfDataSpace, PoolState::Fail, PoolState::Error];
        for s in all {
            assert_eq!(serde_json::to_value(s).unwrap(), serde_json::json!(s.as_str()));
        }
        // The same words as the kernel status `pool status --json` prints.
        for (m, s) in [(PoolMode::Rw, "rw"), (PoolMode::Ro, "ro"), (PoolMode::OutOfDataSpace, "out_of_data_space")] {
            assert_eq!(serde_json::to_value(m).unwrap(), serde_json::json!(s));
        }
        assert_eq!(serde_json::to_value(PoolStatus::Fail).unwrap()["health"], "fail");
        assert_eq!(PoolState::of(&PoolStatus::Fail).as_str(), "fail");
        assert_eq!(PoolState::of(&PoolStatus::Error).as_str(), "error");
    }

    #[test]
    fn status_without_a_database_leaves_the_rest_out() {
        let dir = std::env::temp_dir().join(format!("thinimg-views-{}", std::process::id()));
        let v = status(&dir, &dir).unwrap();
        let j = serde_json::to_value(&v).unwrap();
        let mut keys: Vec<&str> = j.as_object().unwrap().keys().map(|k| k.as_str()).collect();
        keys.sort();
        assert_eq!(keys, ["database", "space", "state_dir"]);
        assert_eq!(j["database"], false);
    }
}
