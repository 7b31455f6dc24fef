//! Typed queries over images, image layers, chains and activations, and
//! the attempts that drop a chain's or an activation's row together with
//! its thin device's (the thin rows themselves are `thin_pool`'s). Callers pass a `Connection` or a `Transaction`
//! (which derefs to one), so a step can group these writes with its
//! journal completion.

use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;

use crate::dm::ThinId;
use crate::error::{Error, Kind, Result};
use crate::fetch::blobstore::BlobDigest;
use crate::ops::output::now;
use crate::store::ids::ChainId;

#[derive(Debug, Clone, Serialize)]
pub struct ImageRow {
    pub name: String,
    pub family: String,
    pub top_layer: i64,
    pub top_chain: Option<ChainId>,
    pub state: ImageState,
    pub updated_at: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct LayerRow {
    pub position: i64,
    pub key: String,
    pub digest: Option<BlobDigest>,
    pub chain_id: Option<ChainId>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChainRow {
    pub chain_id: ChainId,
    pub parent: Option<ChainId>,
    pub blob: BlobDigest,
    pub depth: i64,
    pub thin_id: Option<ThinId>,
    pub state: ChainState,
    pub report: Option<serde_json::Value>,
}

column_enum! {
    /// Where an activation stands (`activations.state`): `Creating` (intent:
    /// its snapshot may not exist yet), `Active` (its dm device is up),
    /// `Inactive` (snapshot kept, no dm device).
    ActivationState, "activation row" { Creating = "creating", Active = "active", Inactive = "inactive" }
}

column_enum! {
    /// Where an image stands (`images.state`): `Pulling` until its top chain is built.
    ImageState, "image row" { Pulling = "pulling", Ready = "ready" }
}

column_enum! {
    /// Where a chain stands (`chains.state`): `Building` is an attempt's
    /// intent, `Ready` a finished, shareable chain.
    ChainState, "chain row" { Building = "building", Ready = "ready" }
}

#[derive(Debug, Clone, Serialize)]
pub struct ActivationRow {
    pub name: String,
    pub image: String,
    pub chain_id: ChainId,
    pub thin_id: ThinId,
    pub state: ActivationState,
    pub created_at: i64,
}

fn image_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ImageRow> {
    Ok(ImageRow {
        name: r.get(0)?,
        family: r.get(1)?,
        top_layer: r.get(2)?,
        top_chain: r.get(3)?,
        state: r.get(4)?,
        updated_at: r.get(5)?,
    })
}

pub fn image(c: &Connection, name: &str) -> Result<Option<ImageRow>> {
    Ok(c.query_row(
        "SELECT name, family, top_layer, top_chain, state, updated_at FROM images WHERE name = ?1",
        [name],
        image_from_row,
    )
    .optional()?)
}

pub fn images(c: &Connection) -> Result<Vec<ImageRow>> {
    let mut st = c.prepare("SELECT name, family, top_layer, top_chain, state, updated_at FROM images ORDER BY name")?;
    let rows = st.query_map([], image_from_row)?;
    rows.map(|r| r.map_err(Error::from)).collect()
}

/// Create or update an image being pulled, replacing its layer list.
/// Existing chains stay referenced through `chain_id` until rebuilt.
/// Record an image being pulled and its layers: (position, key, digest if
/// already known; a chain step records the rest).
pub fn put_image_pulling(
    c: &Connection,
    name: &str,
    family: &str,
    layers: &[(i64, String, Option<BlobDigest>)],
) -> Result<()> {
    let top = layers.len() as i64;
    c.execute(
        "INSERT INTO images (name, family, top_layer, top_chain, state, updated_at) VALUES (?1, ?2, ?3, NULL, 'pulling', ?4)
         ON CONFLICT (name) DO UPDATE SET family = excluded.family, top_layer = excluded.top_layer,
             state = CASE WHEN images.top_chain IS NULL THEN 'pulling' ELSE images.state END, updated_at = excluded.updated_at",
        params![name, family, top, now()],
    )?;
    c.execute("DELETE FROM image_layers WHERE image = ?1", [name])?;
    for (pos, key, digest) in layers {
        c.execute(
            "INSERT INTO image_layers (image, position, key, digest, chain_id) VALUES (?1, ?2, ?3, ?4, NULL)",
            params![name, pos, key, digest],
        )?;
    }
    Ok(())
}

pub fn layers(c: &Connection, image: &str) -> Result<Vec<LayerRow>> {
    let mut st =
        c.prepare("SELECT position, key, digest, chain_id FROM image_layers WHERE image = ?1 ORDER BY position")?;
    let rows = st.query_map([image], |r| {
        Ok(LayerRow { position: r.get(0)?, key: r.get(1)?, digest: r.get(2)?, chain_id: r.get(3)? })
    })?;
    rows.map(|r| r.map_err(Error::from)).collect()
}

/// A layer's digest, learned when its download finished.
pub fn set_layer_digest(c: &Connection, image: &str, pos: i64, digest: &BlobDigest) -> Result<()> {
    c.execute("UPDATE image_layers SET digest = ?1 WHERE image = ?2 AND position = ?3", params![digest, image, pos])?;
    Ok(())
}

pub fn set_layer_chain(c: &Connection, image: &str, pos: i64, chain: &ChainId) -> Result<()> {
    c.execute("UPDATE image_layers SET chain_id = ?1 WHERE image = ?2 AND position = ?3", params![chain, image, pos])?;
    Ok(())
}

pub fn set_image_ready(c: &Connection, image: &str, top_chain: &ChainId) -> Result<()> {
    c.execute(
        "UPDATE images SET state = 'ready', top_chain = ?1, updated_at = ?2 WHERE name = ?3",
        params![top_chain, now(), image],
    )?;
    Ok(())
}

pub fn delete_image(c: &Connection, image: &str) -> Result<()> {
    c.execute("DELETE FROM images WHERE name = ?1", [image])?;
    Ok(())
}

fn chain_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ChainRow> {
    let report: Option<String> = r.get(6)?;
    Ok(ChainRow {
        chain_id: r.get(0)?,
        parent: r.get(1)?,
        blob: r.get(2)?,
        depth: r.get(3)?,
        thin_id: r.get(4)?,
        state: r.get(5)?,
        report: report.and_then(|s| serde_json::from_str(&s).ok()),
    })
}

pub fn chain(c: &Connection, id: &ChainId) -> Result<Option<ChainRow>> {
    Ok(c.query_row(
        "SELECT chain_id, parent, blob, depth, thin_id, state, report FROM chains WHERE chain_id = ?1",
        [id],
        chain_from_row,
    )
    .optional()?)
}

pub fn chains(c: &Connection) -> Result<Vec<ChainRow>> {
    let mut st =
        c.prepare("SELECT chain_id, parent, blob, depth, thin_id, state, report FROM chains ORDER BY depth DESC")?;
    let rows = st.query_map([], chain_from_row)?;
    rows.map(|r| r.map_err(Error::from)).collect()
}

pub fn insert_chain_building(
    c: &Connection,
    id: &ChainId,
    parent: Option<&ChainId>,
    blob: &BlobDigest,
    depth: i64,
    thin_id: ThinId,
) -> Result<()> {
    c.execute(
        "INSERT INTO chains (chain_id, parent, blob, depth, thin_id, state, created_at) VALUES (?1, ?2, ?3, ?4, ?5, 'building', ?6)",
        params![id, parent, blob, depth, thin_id, now()],
    )?;
    Ok(())
}

pub fn set_chain_ready(c: &Connection, id: &ChainId, report: &serde_json::Value) -> Result<()> {
    c.execute("UPDATE chains SET state = 'ready', report = ?1 WHERE chain_id = ?2", params![report.to_string(), id])?;
    Ok(())
}

pub fn delete_chain(c: &Connection, id: &ChainId) -> Result<()> {
    c.execute("DELETE FROM chains WHERE chain_id = ?1", [id])?;
    Ok(())
}

/// Chains that no image layer, no activation and no kept child references.
pub fn unused_chains(c: &Connection) -> Result<Vec<ChainRow>> {
    let mut st = c.prepare(
        "SELECT chain_id, parent, blob, depth, thin_id, state, report FROM chains ch
         WHERE NOT EXISTS (SELECT 1 FROM image_layers l WHERE l.chain_id = ch.chain_id)
           AND NOT EXISTS (SELECT 1 FROM images i WHERE i.top_chain = ch.chain_id)
           AND NOT EXISTS (SELECT 1 FROM activations a WHERE a.chain_id = ch.chain_id)
         ORDER BY depth DESC",
    )?;
    let rows = st.query_map([], chain_from_row)?;
    rows.map(|r| r.map_err(Error::from)).collect()
}

pub fn has_children(c: &Connection, id: &ChainId) -> Result<bool> {
    Ok(c.query_row("SELECT EXISTS (SELECT 1 FROM chains WHERE parent = ?1)", [id], |r| r.get(0))?)
}

fn act_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ActivationRow> {
    Ok(ActivationRow {
        name: r.get(0)?,
        image: r.get(1)?,
        chain_id: r.get(2)?,
        thin_id: r.get(3)?,
        state: r.get(4)?,
        created_at: r.get(5)?,
    })
}

pub fn activation(c: &Connection, name: &str) -> Result<Option<ActivationRow>> {
    Ok(c.query_row(
        "SELECT name, image, chain_id, thin_id, state, created_at FROM activations WHERE name = ?1",
        [name],
        act_from_row,
    )
    .optional()?)
}

pub fn activations(c: &Connection) -> Result<Vec<ActivationRow>> {
    let mut st =
        c.prepare("SELECT name, image, chain_id, thin_id, state, created_at FROM activations ORDER BY name")?;
    let rows = st.query_map([], act_from_row)?;
    rows.map(|r| r.map_err(Error::from)).collect()
}

pub fn activations_of(c: &Connection, image: &str) -> Result<Vec<ActivationRow>> {
    Ok(activations(c)?.into_iter().filter(|a| a.image == image).collect())
}

pub fn insert_activation(c: &Connection, name: &str, image: &str, chain: &ChainId, thin_id: ThinId) -> Result<()> {
    c.execute(
        "INSERT INTO activations (name, image, chain_id, thin_id, state, created_at) VALUES (?1, ?2, ?3, ?4, 'creating', ?5)",
        params![name, image, chain, thin_id, now()],
    )?;
    Ok(())
}

pub fn set_activation_state(c: &Connection, name: &str, state: ActivationState) -> Result<()> {
    let n = c.execute("UPDATE activations SET state = ?1 WHERE name = ?2", params![state, name])?;
    if n != 1 {
        return Err(Error::new(Kind::Software, format!("activation {name} vanished from the database")));
    }
    Ok(())
}

/// Forget an interrupted snapshot attempt, in one transaction: activation
/// `name`'s row if it is still `creating` on `thin_id`, and `thin_id`'s row
/// unless it is `ready` (a finished device is never dropped here).
pub fn drop_snapshot_attempt(c: &Connection, name: &str, thin_id: ThinId) -> Result<()> {
    let tx = c.unchecked_transaction()?;
    tx.execute(
        "DELETE FROM activations WHERE name = ?1 AND state = 'creating' AND thin_id = ?2",
        params![name, thin_id],
    )?;
    tx.execute("DELETE FROM thin_devices WHERE thin_id = ?1 AND state <> 'ready'", [thin_id])?;
    tx.commit()?;
    Ok(())
}

pub fn delete_activation(c: &Connection, name: &str) -> Result<()> {
    c.execute("DELETE FROM activations WHERE name = ?1", [name])?;
    Ok(())
}

/// Whether a build attempt's thin id (from its intent) is still that
/// attempt's to undo: its row exists, is not `ready`, and no activation or
/// other chain owns it (a finished teardown deleted the rows last, and the
/// id may have been handed out again since).
pub fn build_attempt_pending(c: &Connection, thin_id: ThinId, chain_id: Option<&ChainId>) -> Result<bool> {
    Ok(c.query_row(
        "SELECT EXISTS (SELECT 1 FROM thin_devices WHERE thin_id = ?1 AND state <> 'ready')
            AND NOT EXISTS (SELECT 1 FROM activations WHERE thin_id = ?1)
            AND NOT EXISTS (SELECT 1 FROM chains WHERE thin_id = ?1 AND chain_id IS NOT ?2)",
        params![thin_id, chain_id],
        |r| r.get(0),
    )?)
}

/// Forget a torn-down build attempt, in one transaction: chain `chain_id`'s
/// row if it is still `building`, and `thin_id`'s row unless it is `ready`
/// (a finished chain or device is never dropped here).
pub fn drop_build_attempt(c: &Connection, chain_id: Option<&ChainId>, thin_id: ThinId) -> Result<()> {
    let tx = c.unchecked_transaction()?;
    if let Some(cid) = chain_id {
        tx.execute("DELETE FROM chains WHERE chain_id = ?1 AND state = 'building'", [cid])?;
    }
    tx.execute("DELETE FROM thin_devices WHERE thin_id = ?1 AND state <> 'ready'", [thin_id])?;
    tx.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dm::Sectors;
    use crate::store::thin_pool::{alloc_thin_id, delete_thin_row, set_thin_state, thin_state, ThinRole, ThinState};

    fn db() -> Connection {
        crate::store::memory_db()
    }

    #[test]
    fn a_dropped_snapshot_attempt_keeps_what_finished() {
        let c = db();
        let blob = BlobDigest::parse(&"a".repeat(64)).unwrap();
        let chain = ChainId::parse(&"c".repeat(64)).unwrap();
        crate::store::blobs::blob_present(&c, &blob, 1).unwrap();
        put_image_pulling(&c, "img", "img", &[(1, "img/1".into(), Some(blob.clone()))]).unwrap();
        let origin = alloc_thin_id(&c, ThinRole::Chain, None, Sectors(8)).unwrap();
        insert_chain_building(&c, &chain, None, &blob, 1, origin).unwrap();
        let t = alloc_thin_id(&c, ThinRole::Activation, None, Sectors(8)).unwrap();
        insert_activation(&c, "a1", "img", &chain, t).unwrap();
        // Another activation's id, or a row no longer `creating`, is not this attempt's.
        drop_snapshot_attempt(&c, "a1", ThinId::new(u64::from(t.get()) + 1).unwrap()).unwrap();
        assert!(activation(&c, "a1").unwrap().is_some());
        set_activation_state(&c, "a1", ActivationState::Active).unwrap();
        set_thin_state(&c, t, ThinState::Ready).unwrap();
        drop_snapshot_attempt(&c, "a1", t).unwrap();
        assert_eq!(activation(&c, "a1").unwrap().unwrap().state, ActivationState::Active);
        assert_eq!(thin_state(&c, t).unwrap(), Some(ThinState::Ready));
        // An interrupted one goes, rows together.
        delete_activation(&c, "a1").unwrap();
        delete_thin_row(&c, t).unwrap();
        let t = alloc_thin_id(&c, ThinRole::Activation, None, Sectors(8)).unwrap();
        insert_activation(&c, "a2", "img", &chain, t).unwrap();
        drop_snapshot_attempt(&c, "a2", t).unwrap();
        assert!(activation(&c, "a2").unwrap().is_none());
        assert_eq!(thin_state(&c, t).unwrap(), None);
        for s in [ActivationState::Creating, ActivationState::Active, ActivationState::Inactive] {
            assert_eq!(ActivationState::parse(s.as_str()).unwrap(), s);
        }
        assert!(ActivationState::parse("gone").is_err());
    }

    #[test]
    fn state_columns_read_as_enums_and_refuse_unknown_spellings() {
        let c = db();
        let read = |sql: &str| c.query_row(sql, [], |r| r.get::<_, ChainState>(0));
        assert_eq!(read("SELECT 'building'").unwrap(), ChainState::Building);
        assert_eq!(read("SELECT 'ready'").unwrap(), ChainState::Ready);
        assert!(read("SELECT 'Ready'").is_err());
        assert!(read("SELECT NULL").is_err());
        assert!(read("SELECT 1").is_err());
        for s in [ImageState::Pulling, ImageState::Ready] {
            assert_eq!(ImageState::parse(s.as_str()).unwrap(), s);
            assert_eq!(serde_json::to_value(s).unwrap(), serde_json::json!(s.as_str()));
            assert_eq!(s.to_string(), s.as_str());
        }
        assert_eq!(serde_json::to_value(ThinState::Deleting).unwrap(), serde_json::json!("deleting"));
        assert_eq!(serde_json::to_value(ActivationState::Inactive).unwrap(), serde_json::json!("inactive"));
    }

    #[test]
    fn a_dropped_build_attempt_keeps_what_finished() {
        let c = db();
        let blob = BlobDigest::parse(&"a".repeat(64)).unwrap();
        let (c1, c2) = (ChainId::parse(&"1".repeat(64)).unwrap(), ChainId::parse(&"2".repeat(64)).unwrap());
        crate::store::blobs::blob_present(&c, &blob, 1).unwrap();
        let t1 = alloc_thin_id(&c, ThinRole::Chain, None, Sectors(8)).unwrap();
        insert_chain_building(&c, &c1, None, &blob, 1, t1).unwrap();
        set_thin_state(&c, t1, ThinState::Ready).unwrap();
        set_chain_ready(&c, &c1, &serde_json::json!({})).unwrap();
        // A ready chain and device stay.
        drop_build_attempt(&c, Some(&c1), t1).unwrap();
        assert_eq!(chain(&c, &c1).unwrap().unwrap().state, ChainState::Ready);
        assert_eq!(thin_state(&c, t1).unwrap(), Some(ThinState::Ready));
        // A building one goes with its thin row.
        let t2 = alloc_thin_id(&c, ThinRole::Chain, Some(t1), Sectors(8)).unwrap();
        insert_chain_building(&c, &c2, Some(&c1), &blob, 2, t2).unwrap();
        assert!(build_attempt_pending(&c, t2, Some(&c2)).unwrap());
        drop_build_attempt(&c, Some(&c2), t2).unwrap();
        assert!(chain(&c, &c2).unwrap().is_none());
        assert_eq!(thin_state(&c, t2).unwrap(), None);
        assert!(!build_attempt_pending(&c, t2, Some(&c2)).unwrap());
        // Without a chain id (an intent from before the row): only the thin row.
        let t3 = alloc_thin_id(&c, ThinRole::Chain, None, Sectors(8)).unwrap();
        drop_build_attempt(&c, None, t3).unwrap();
        assert_eq!(thin_state(&c, t3).unwrap(), None);
        assert!(chain(&c, &c1).unwrap().is_some());
    }
}
