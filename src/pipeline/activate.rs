//! Activations: writable thin snapshots of an image's top chain.
//!
//! `activate` run (subject = activation name): `image` (pull the image if
//! it is not ready, as a nested pull run), `snapshot` (intent: thin id and
//! a `creating` activation row; then create_snap of the top chain's
//! device), `device` (activate the snapshot as a dm device under its stable
//! name). `deactivate` run: `remove` (the dm device) and, with --delete,
//! `delete` (the thin device and the row). Idempotence by name lives in the
//! command: a ready activation is answered from the database without any
//! device-mapper work.

use serde_json::{json, Value};

use super::{Ctx, RunKind};
use crate::dm::ThinId;
use crate::error::{Error, Kind, Result};
use crate::journal::{Completion, Executor, RunSpec, StepCx};
use crate::ops::fault;
use crate::pool::PoolManager;
use crate::store::images::{self as q, ActivationState, ChainState, ImageState};
use crate::store::thin_pool::{ThinRole, ThinState};

/// Activation names become dm names and file names: keep them boring.
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 100
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(Error::usage(format!(
            "activation name {name:?} is invalid: use 1-100 of [A-Za-z0-9._-], not starting with '.'"
        )))
    }
}

journal_enum! {
    /// An activate run's steps: pull the image if needed (a nested run),
    /// take the writable snapshot, create its dm device.
    ActivateStep, "activate step" { Image = "image", Snapshot = "snapshot", Device = "device" }
}

journal_enum! {
    /// A deactivate run's steps: remove the dm device, then (with
    /// `--delete`) delete the snapshot and the activation.
    DeactivateStep, "deactivate step" { Remove = "remove", Delete = "delete" }
}

pub fn spec(name: &str, image: &str, reference: &str) -> RunSpec {
    let request = ActivateRequest { image: image.into(), reference: Some(reference.into()) };
    RunSpec {
        kind: RunKind::Activate.as_str().into(),
        subject: name.into(),
        request: json!(request),
        steps: [ActivateStep::Image, ActivateStep::Snapshot, ActivateStep::Device]
            .iter()
            .map(|s| s.as_str().into())
            .collect(),
    }
}

pub fn deactivate_spec(name: &str, delete: bool) -> RunSpec {
    let mut steps = vec![DeactivateStep::Remove.as_str().to_string()];
    if delete {
        steps.push(DeactivateStep::Delete.as_str().into());
    }
    RunSpec {
        kind: RunKind::Deactivate.as_str().into(),
        subject: name.into(),
        request: json!(DeactivateRequest { delete }),
        steps,
    }
}

/// What a deactivate run is asked for.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeactivateRequest {
    /// Also delete the snapshot and the activation.
    pub delete: bool,
}

/// What a deactivate run's `delete` step records before deleting the
/// snapshot: the thin device it is deleting (its row is `deleting`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeleteIntent {
    pub thin_id: ThinId,
}

/// What an activate run is asked for: the image (normalized name) and the
/// ref as given (runs recorded without one pull the image name).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ActivateRequest {
    pub image: String,
    #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
}

/// What the `snapshot` step records before creating the snapshot: enough
/// to undo it after a crash. `foreign`: the thin id already existed in the
/// pool (EEXIST), so nothing of it in the kernel is this attempt's.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SnapshotIntent {
    pub thin_id: ThinId,
    pub name: String,
    pub origin: ThinId,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub foreign: bool,
}

impl SnapshotIntent {
    /// The intent the step recorded; `None` if it names no thin id.
    pub fn read(v: &Value) -> Result<Option<SnapshotIntent>> {
        crate::journal::typed_intent(v, "thin_id")
    }
}

pub struct Activate<'a> {
    pub ctx: &'a mut Ctx,
}

impl Executor for Activate<'_> {
    fn step(&mut self, cx: &mut StepCx<'_>) -> Result<()> {
        let name = cx.subject.clone();
        let req: ActivateRequest = cx.request_as()?;
        let image = req.image;
        let reference = req.reference.unwrap_or_else(|| image.clone());
        match ActivateStep::parse(&cx.step)? {
            ActivateStep::Image => {
                let ready = q::image(cx.conn, &image)?.map(|i| i.state == ImageState::Ready && i.top_chain.is_some());
                if ready != Some(true) {
                    // A nested run on its own subject: resumable on its own.
                    let mut pull = super::pull::Pull { ctx: self.ctx };
                    cx.run_nested(&super::pull::spec(&image, &reference), &mut pull)?;
                }
                Ok(())
            }
            ActivateStep::Snapshot => self.snapshot(cx, &name, &image),
            ActivateStep::Device => {
                let act = q::activation(cx.conn, &name)?
                    .ok_or_else(|| Error::software(format!("activation {name}: row missing after snapshot")))?;
                let size = crate::store::thin_pool::thin_size(cx.conn, act.thin_id)?;
                let dev = self.ctx.prepare_pool(cx.conn)?;
                dev.activate(&dev.activation_name(&name), act.thin_id, size)?;
                fault::point("activate:device");
                cx.complete(move |tx| {
                    q::set_activation_state(tx, &name, ActivationState::Active)?;
                    Ok(Completion::default())
                })
            }
        }
    }

    fn abort(&mut self, cx: &mut StepCx<'_>) -> Result<()> {
        if ActivateStep::parse(&cx.step)? == ActivateStep::Snapshot {
            if let Some(intent) = cx.intent().cloned() {
                let dev = self.ctx.prepare_pool(cx.conn)?;
                undo_snapshot(dev, cx.conn, &intent)?;
            }
        }
        Ok(())
    }
}

fn undo_snapshot(dev: &PoolManager, conn: &rusqlite::Connection, intent: &Value) -> Result<()> {
    let Some(intent) = SnapshotIntent::read(intent)? else {
        return Ok(());
    };
    let (thin_id, name) = (intent.thin_id, intent.name.as_str());
    // A failed read stops here: it must not read as "nothing to undo" or
    // as "undo it".
    match crate::store::thin_pool::thin_state(conn, thin_id)? {
        None | Some(ThinState::Ready) => return Ok(()),
        Some(ThinState::Creating | ThinState::Deleting) => {}
    }
    log::info!("cleaning up an interrupted snapshot for activation {name} (thin {thin_id})");
    if !intent.foreign {
        dev.deactivate(&dev.activation_name(name))?;
        dev.delete_thin(thin_id)?;
    }
    q::drop_snapshot_attempt(conn, name, thin_id)
}

impl Activate<'_> {
    fn snapshot(&mut self, cx: &mut StepCx<'_>, name: &str, image: &str) -> Result<()> {
        if let Some(intent) = cx.intent().cloned() {
            let dev = self.ctx.prepare_pool(cx.conn)?;
            undo_snapshot(dev, cx.conn, &intent)?;
        }
        if let Some(a) = q::activation(cx.conn, name)? {
            if a.state != ActivationState::Creating {
                // Already snapshotted (e.g. an inactive activation being re-activated).
                return Ok(());
            }
        }
        let img = q::image(cx.conn, image)?
            .filter(|i| i.state == ImageState::Ready)
            .ok_or_else(|| Error::new(Kind::NoSuchImage, format!("image {image} is not pulled")))?;
        let top = img.top_chain.ok_or_else(|| Error::software(format!("image {image} has no top chain")))?;
        let chain = q::chain(cx.conn, &top)?.ok_or_else(|| Error::software(format!("chain {top} missing")))?;
        let origin = chain.thin_id.ok_or_else(|| Error::software("top chain has no thin device"))?;
        if chain.state != ChainState::Ready || !crate::store::thin_pool::thin_ready(cx.conn, origin)? {
            return Err(Error::software(format!(
                "image {image}: its top chain's thin device {origin} is not ready; refusing to snapshot it"
            )));
        }
        let size = crate::store::thin_pool::thin_size(cx.conn, origin)?;
        let dev = self.ctx.prepare_pool(cx.conn)?;
        dev.check_usable()?;
        dev.ensure_space(0)?;
        let (n, i, t) = (name.to_string(), image.to_string(), top.clone());
        cx.record_intent_with(|tx| {
            let thin_id = crate::pool::manager::alloc_thin_id(tx, ThinRole::Activation, Some(origin), size)?;
            q::insert_activation(tx, &n, &i, &t, thin_id)?;
            crate::journal::intent_value(&SnapshotIntent { thin_id, name: n, origin, foreign: false })
        })?;
        let thin_id = SnapshotIntent::read(cx.intent().unwrap_or(&Value::Null))?
            .map(|i| i.thin_id)
            .ok_or_else(|| Error::software("intent lost its thin id"))?;
        fault::point("snapshot:intent");
        // The origin is an image chain, never active (read-only once built),
        // so no suspend is needed; the pool layer suspends if it finds it active.
        if dev.snapshot(thin_id, origin)? == crate::pool::Created::Exists {
            // Not ours (database and pool diverged): never delete it.
            let foreign = crate::journal::intent_value(&SnapshotIntent {
                thin_id,
                name: name.to_string(),
                origin,
                foreign: true,
            })?;
            cx.record_intent(foreign.clone())?;
            undo_snapshot(dev, cx.conn, &foreign)?;
            cx.record_intent(Value::Null)?;
            return Err(crate::pool::manager::diverged(&dev.pool_name(), thin_id));
        }
        fault::point("snapshot:created");
        cx.complete(move |tx| {
            crate::store::thin_pool::set_thin_state(tx, thin_id, ThinState::Ready)?;
            Ok(Completion::with_outcome(json!({ "thin_id": thin_id, "origin": origin })))
        })
    }
}

pub struct Deactivate<'a> {
    pub ctx: &'a mut Ctx,
}

impl Executor for Deactivate<'_> {
    fn step(&mut self, cx: &mut StepCx<'_>) -> Result<()> {
        let name = cx.subject.clone();
        let Some(act) = q::activation(cx.conn, &name)? else {
            return Ok(()); // already gone: deleting is idempotent
        };
        let dev = self.ctx.prepare_pool(cx.conn)?;
        match DeactivateStep::parse(&cx.step)? {
            DeactivateStep::Remove => {
                dev.deactivate(&dev.activation_name(&name))?;
                fault::point("deactivate:removed");
                cx.complete(move |tx| {
                    q::set_activation_state(tx, &name, ActivationState::Inactive)?;
                    Ok(Completion::default())
                })
            }
            DeactivateStep::Delete => {
                let thin_id = act.thin_id;
                cx.record_intent_with(|tx| {
                    crate::store::thin_pool::set_thin_state(tx, thin_id, ThinState::Deleting)?;
                    crate::journal::intent_value(&DeleteIntent { thin_id })
                })?;
                dev.delete_thin(thin_id)?;
                fault::point("deactivate:deleted");
                cx.complete(move |tx| {
                    q::delete_activation(tx, &name)?;
                    crate::store::thin_pool::delete_thin_row(tx, thin_id)?;
                    Ok(Completion::default())
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_intents_read_back_and_refuse_what_they_cannot_read() {
        let id = |n| ThinId::new(n).unwrap();
        let i = SnapshotIntent { thin_id: id(3), name: "vm1".into(), origin: id(1), foreign: false };
        let v = crate::journal::intent_value(&i).unwrap();
        // The JSON earlier versions wrote, key for key.
        assert_eq!(v, json!({"thin_id": 3, "name": "vm1", "origin": 1}));
        assert_eq!(SnapshotIntent::read(&v).unwrap(), Some(i));
        let f = json!({"thin_id": 3, "name": "vm1", "origin": 1, "foreign": true});
        assert!(SnapshotIntent::read(&f).unwrap().unwrap().foreign);
        assert_eq!(SnapshotIntent::read(&Value::Null).unwrap(), None);
        // Not "nothing to undo", and not another device's id after truncation.
        assert!(SnapshotIntent::read(&json!({"thin_id": (1u64 << 32) + 3, "name": "vm1", "origin": 1})).is_err());
        // Nor an id the kernel cannot hold (24 bits), nor a negative one.
        assert!(SnapshotIntent::read(&json!({"thin_id": 1u64 << 24, "name": "vm1", "origin": 1})).is_err());
        assert!(SnapshotIntent::read(&json!({"thin_id": 3, "name": "vm1", "origin": -1})).is_err());
        assert!(SnapshotIntent::read(&json!({"thin_id": 3, "origin": 1})).is_err(), "no name: which activation?");
    }

    #[test]
    fn activate_requests_read_back() {
        let r: ActivateRequest = serde_json::from_value(spec("vm1", "golang", "golang/3").request).unwrap();
        assert_eq!(r, ActivateRequest { image: "golang".into(), reference: Some("golang/3".into()) });
        // No image: an error, not an activation of the image named "".
        assert!(serde_json::from_value::<ActivateRequest>(json!({"ref": "golang"})).is_err());
    }
}
