//! The thin pool's rows: the `pool` table (the one thin-pool's parameters,
//! so it can be re-assembled after a reboot), the pool's keys in `meta`
//! (transaction id, device identities) and the `thin_devices` table (thin
//! id allocation, state, size, deletion). Thin ids come from here only: the smallest id not in the
//! table, never hashed or random, so ids stay small and a crash cannot hand
//! out one id twice (the row is the reservation).

use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;

use crate::dm::{DmName, Sectors, ThinId};
use crate::error::{Error, Kind, Result};
use crate::pool::{PoolKind, PoolSpec};

/// Where pool creation stands: `Creating` is the intent recorded before any
/// file or device exists; a rerun finishes or cleans it up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolState {
    Creating,
    Ready,
}

impl PoolState {
    fn as_str(self) -> &'static str {
        match self {
            PoolState::Creating => "creating",
            PoolState::Ready => "ready",
        }
    }
}

/// Insert or replace the pool row.
pub fn save(conn: &Connection, spec: &PoolSpec, state: PoolState) -> Result<()> {
    conn.execute(
        "INSERT INTO pool (id, dm_name, kind, data_path, meta_path, data_sectors, meta_sectors,
                           block_sectors, low_water, state, created_at)
         VALUES (1, ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
         ON CONFLICT (id) DO UPDATE SET dm_name = ?1, kind = ?2, data_path = ?3, meta_path = ?4,
             data_sectors = ?5, meta_sectors = ?6, block_sectors = ?7, low_water = ?8, state = ?9",
        params![
            spec.dm_name.as_str(),
            spec.kind.as_str(),
            path_str(&spec.data_path)?,
            path_str(&spec.meta_path)?,
            spec.data_sectors.0 as i64,
            spec.meta_sectors.0 as i64,
            spec.block_sectors.0 as i64,
            spec.low_water as i64,
            state.as_str(),
            crate::ops::output::now(),
        ],
    )?;
    Ok(())
}

pub fn set_state(conn: &Connection, state: PoolState) -> Result<()> {
    let n = conn.execute("UPDATE pool SET state = ?1 WHERE id = 1", params![state.as_str()])?;
    if n != 1 {
        return Err(Error::software("no pool row to update"));
    }
    Ok(())
}

/// Remove the pool row (a cleaned-up, never-finished creation).
pub fn forget(conn: &Connection) -> Result<()> {
    conn.execute("DELETE FROM pool WHERE id = 1", [])?;
    Ok(())
}

fn path_str(p: &std::path::Path) -> Result<&str> {
    p.to_str().ok_or_else(|| Error::usage(format!("pool path {} is not UTF-8", p.display())))
}

/// The recorded pool, if any. A row this version cannot read is Software.
pub fn load(conn: &Connection) -> Result<Option<(PoolSpec, PoolState)>> {
    let row = conn
        .query_row(
            "SELECT dm_name, kind, data_path, meta_path, data_sectors, meta_sectors, block_sectors,
                    low_water, state FROM pool WHERE id = 1",
            [],
            |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, i64>(4)?,
                    r.get::<_, i64>(5)?,
                    r.get::<_, i64>(6)?,
                    r.get::<_, i64>(7)?,
                    r.get::<_, String>(8)?,
                ))
            },
        )
        .optional()?;
    let Some((name, kind, data, meta, ds, ms, bs, lw, state)) = row else { return Ok(None) };
    let bad = |what: &str| Error::new(Kind::Software, format!("pool row in the database has an invalid {what}"));
    let kind = match kind.as_str() {
        "loop" => PoolKind::Loop,
        "block" => PoolKind::Block,
        _ => return Err(bad("kind")),
    };
    let state = match state.as_str() {
        "creating" => PoolState::Creating,
        "ready" => PoolState::Ready,
        _ => return Err(bad("state")),
    };
    let nonneg = |v: i64, what: &str| u64::try_from(v).map_err(|_| bad(what));
    let spec = PoolSpec {
        dm_name: DmName::new(name).map_err(|e| bad("dm name").with_source(e))?,
        kind,
        data_path: data.into(),
        meta_path: meta.into(),
        data_sectors: Sectors(nonneg(ds, "data size")?),
        meta_sectors: Sectors(nonneg(ms, "metadata size")?),
        block_sectors: Sectors(nonneg(bs, "block size")?),
        low_water: nonneg(lw, "low water mark")?,
    };
    Ok(Some((spec, state)))
}

column_enum! {
    /// Role of a thin device (`thin_devices.role`): a chain's (a built,
    /// shareable layer stack) or an activation's (a VM's writable snapshot).
    ThinRole, "thin device row" { Chain = "chain", Activation = "activation" }
}

/// Reserve the smallest unused thin id, recording the intent (state
/// `creating`, role, origin, size) in the same transaction the caller
/// commits with its own step.
pub fn alloc_thin_id(tx: &Connection, role: ThinRole, origin: Option<ThinId>, size: Sectors) -> Result<ThinId> {
    let id: i64 = tx.query_row(
        "SELECT CASE WHEN NOT EXISTS (SELECT 1 FROM thin_devices WHERE thin_id = 0) THEN 0
                ELSE (SELECT MIN(t.thin_id + 1) FROM thin_devices t
                      WHERE NOT EXISTS (SELECT 1 FROM thin_devices u WHERE u.thin_id = t.thin_id + 1))
                END",
        [],
        |r| r.get(0),
    )?;
    let id = ThinId::new(id as u64).map_err(|_| Error::new(Kind::TempFail, "all 2^24 thin ids are in use"))?;
    tx.execute(
        "INSERT INTO thin_devices (thin_id, role, state, origin, size_sectors, created_at)
         VALUES (?1, ?2, 'creating', ?3, ?4, ?5)",
        params![id, role, origin, size.0 as i64, crate::ops::output::now()],
    )?;
    Ok(id)
}

/// The pool's transaction id as the database recorded it, and the next
/// value an interrupted bump was about to set (see `pool::manager`'s transaction id check).
pub fn transaction_ids(conn: &Connection) -> Result<(Option<u64>, Option<u64>)> {
    let get = |k: &str| -> Result<Option<u64>> {
        let v: Option<String> =
            conn.query_row("SELECT value FROM meta WHERE key = ?1", [k], |r| r.get(0)).optional()?;
        v.map(|v| v.parse::<u64>().map_err(|_| Error::software(format!("meta {k} = {v:?} is not a number"))))
            .transpose()
    };
    Ok((get("pool_transaction_id")?, get("pool_transaction_next")?))
}

/// Record that the pool's transaction id is about to become `next`.
pub fn set_transaction_next(conn: &Connection, next: u64) -> Result<()> {
    conn.execute(
        "INSERT INTO meta (key, value) VALUES ('pool_transaction_next', ?1)
         ON CONFLICT (key) DO UPDATE SET value = ?1",
        [next.to_string()],
    )?;
    Ok(())
}

/// Record the pool's current transaction id (and drop any pending bump).
pub fn set_transaction_id(conn: &Connection, id: u64) -> Result<()> {
    let tx = conn.unchecked_transaction()?;
    tx.execute(
        "INSERT INTO meta (key, value) VALUES ('pool_transaction_id', ?1)
         ON CONFLICT (key) DO UPDATE SET value = ?1",
        [id.to_string()],
    )?;
    tx.execute("DELETE FROM meta WHERE key = 'pool_transaction_next'", [])?;
    tx.commit()?;
    Ok(())
}

/// Forget the recorded transaction id (the pool itself is gone).
pub fn forget_transaction_id(conn: &Connection) -> Result<()> {
    conn.execute("DELETE FROM meta WHERE key IN ('pool_transaction_id', 'pool_transaction_next')", [])?;
    Ok(())
}

column_enum! {
    /// Where a thin device row stands (`thin_devices.state`): `Creating`
    /// and `Deleting` are intents (the device may or may not exist in the
    /// pool), `Ready` is a finished device.
    ThinState, "thin device row" { Creating = "creating", Ready = "ready", Deleting = "deleting" }
}

/// The recorded state of thin device `id`, `None` if no row has it. A
/// database error is an error, never "no row": callers decide teardowns
/// from this.
pub fn thin_state(conn: &Connection, id: ThinId) -> Result<Option<ThinState>> {
    Ok(conn.query_row("SELECT state FROM thin_devices WHERE thin_id = ?1", [id], |r| r.get(0)).optional()?)
}

/// Whether thin device `id` is recorded and `ready` (fully created and not
/// being deleted): only such a device may be shared or snapshotted.
pub fn thin_ready(conn: &Connection, id: ThinId) -> Result<bool> {
    Ok(thin_state(conn, id)? == Some(ThinState::Ready))
}

/// Stable identities (data, metadata) of a block pool's devices, recorded
/// when it was created.
pub fn device_ids(conn: &Connection) -> Result<Option<(String, String)>> {
    let v: Option<String> =
        conn.query_row("SELECT value FROM meta WHERE key = 'pool_device_ids'", [], |r| r.get(0)).optional()?;
    Ok(v.and_then(|v| v.split_once('\n').map(|(a, b)| (a.to_string(), b.to_string()))))
}

pub fn set_device_ids(conn: &Connection, data: &str, meta: &str) -> Result<()> {
    conn.execute(
        "INSERT INTO meta (key, value) VALUES ('pool_device_ids', ?1) ON CONFLICT (key) DO UPDATE SET value = ?1",
        [format!("{data}\n{meta}")],
    )?;
    Ok(())
}

/// (chains, activations) recorded on the pool.
pub fn dependents(conn: &Connection) -> Result<(u64, u64)> {
    let c: i64 = conn.query_row("SELECT COUNT(*) FROM chains", [], |r| r.get(0))?;
    let a: i64 = conn.query_row("SELECT COUNT(*) FROM activations", [], |r| r.get(0))?;
    Ok((c as u64, a as u64))
}

/// Forget the pool and everything that lives in it, in one transaction:
/// activations, images (their layers), chains, thin ids, the pool row and
/// its transaction id. Blobs stay: they are not in the pool.
pub fn destroy_rows(conn: &Connection) -> Result<()> {
    let tx = conn.unchecked_transaction()?;
    tx.execute_batch(
        "DELETE FROM activations;
         DELETE FROM image_layers;
         DELETE FROM images;
         DELETE FROM chains;
         DELETE FROM thin_devices;
         DELETE FROM pool;
         DELETE FROM meta WHERE key IN ('pool_transaction_id', 'pool_transaction_next', 'pool_device_ids');",
    )?;
    tx.commit()?;
    Ok(())
}

/// Number of thin devices the database knows (any state).
pub fn thin_count(conn: &Connection) -> Result<u64> {
    let n: i64 = conn.query_row("SELECT COUNT(*) FROM thin_devices", [], |r| r.get(0))?;
    Ok(n as u64)
}

/// Thin device rows.
#[derive(Debug, Clone, Serialize)]
pub struct ThinRow {
    pub thin_id: ThinId,
    pub role: ThinRole,
    pub state: ThinState,
    pub origin: Option<ThinId>,
    pub size_sectors: u64,
}

pub fn thin_devices(c: &Connection) -> Result<Vec<ThinRow>> {
    let mut st = c.prepare("SELECT thin_id, role, state, origin, size_sectors FROM thin_devices ORDER BY thin_id")?;
    let rows = st.query_map([], |r| {
        Ok(ThinRow {
            thin_id: r.get(0)?,
            role: r.get(1)?,
            state: r.get(2)?,
            origin: r.get(3)?,
            size_sectors: r.get::<_, i64>(4)?.max(0) as u64,
        })
    })?;
    rows.map(|r| r.map_err(Error::from)).collect()
}

/// Virtual size of a thin device, in sectors.
pub fn thin_size(c: &Connection, thin_id: ThinId) -> Result<Sectors> {
    let n: i64 = c.query_row("SELECT size_sectors FROM thin_devices WHERE thin_id = ?1", [thin_id], |r| r.get(0))?;
    Ok(Sectors(n.max(0) as u64))
}

pub fn set_thin_state(c: &Connection, thin_id: ThinId, state: ThinState) -> Result<()> {
    c.execute("UPDATE thin_devices SET state = ?1 WHERE thin_id = ?2", params![state, thin_id])?;
    Ok(())
}

/// Thin ids no chain and no activation owns (e.g. a failed deletion).
pub fn unowned_thin_ids(c: &Connection) -> Result<Vec<ThinId>> {
    let mut st = c.prepare(
        "SELECT thin_id FROM thin_devices t
         WHERE NOT EXISTS (SELECT 1 FROM chains WHERE thin_id = t.thin_id)
           AND NOT EXISTS (SELECT 1 FROM activations WHERE thin_id = t.thin_id)
         ORDER BY thin_id",
    )?;
    let rows = st.query_map([], |r| r.get(0))?;
    rows.map(|r| r.map_err(Error::from)).collect()
}

pub fn delete_thin_row(c: &Connection, thin_id: ThinId) -> Result<()> {
    c.execute("DELETE FROM thin_devices WHERE thin_id = ?1", [thin_id])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Db;

    fn spec() -> PoolSpec {
        PoolSpec {
            dm_name: DmName::new("thinimg-0123abcd-pool").unwrap(),
            kind: PoolKind::Loop,
            data_path: "/s/pool/data.img".into(),
            meta_path: "/s/pool/meta.img".into(),
            data_sectors: Sectors(4 << 20),
            meta_sectors: Sectors(8192),
            block_sectors: Sectors(128),
            low_water: 327,
        }
    }

    fn tmpdir(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("thinimg-store-pool-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn save_load_roundtrip_and_state() {
        let d = tmpdir("rt");
        let db = Db::open(&d).unwrap();
        assert!(load(&db.conn).unwrap().is_none());
        save(&db.conn, &spec(), PoolState::Creating).unwrap();
        assert_eq!(load(&db.conn).unwrap(), Some((spec(), PoolState::Creating)));
        set_state(&db.conn, PoolState::Ready).unwrap();
        assert_eq!(load(&db.conn).unwrap().unwrap().1, PoolState::Ready);
        forget(&db.conn).unwrap();
        assert!(load(&db.conn).unwrap().is_none());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn transaction_ids_roundtrip() {
        let d = tmpdir("txn");
        let db = Db::open(&d).unwrap();
        assert_eq!(transaction_ids(&db.conn).unwrap(), (None, None));
        set_transaction_id(&db.conn, 4).unwrap();
        set_transaction_next(&db.conn, 5).unwrap();
        assert_eq!(transaction_ids(&db.conn).unwrap(), (Some(4), Some(5)));
        set_transaction_id(&db.conn, 5).unwrap();
        assert_eq!(transaction_ids(&db.conn).unwrap(), (Some(5), None));
        forget_transaction_id(&db.conn).unwrap();
        assert_eq!(transaction_ids(&db.conn).unwrap(), (None, None));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn thin_state_reads_rows_and_never_defaults_an_error() {
        let d = tmpdir("state");
        let mut db = Db::open(&d).unwrap();
        let tx = db.conn.transaction().unwrap();
        let a = alloc_thin_id(&tx, ThinRole::Chain, None, Sectors(8)).unwrap();
        tx.commit().unwrap();
        assert_eq!(thin_state(&db.conn, a).unwrap(), Some(ThinState::Creating));
        assert!(!thin_ready(&db.conn, a).unwrap());
        set_thin_state(&db.conn, a, ThinState::Ready).unwrap();
        assert_eq!(thin_state(&db.conn, a).unwrap(), Some(ThinState::Ready));
        assert!(thin_ready(&db.conn, a).unwrap());
        set_thin_state(&db.conn, a, ThinState::Deleting).unwrap();
        assert_eq!(thin_state(&db.conn, a).unwrap(), Some(ThinState::Deleting));
        assert_eq!(thin_state(&db.conn, ThinId::new(u64::from(a.get()) + 1).unwrap()).unwrap(), None);
        // A read that fails (here: no such table) is an error, not "no row".
        let bare = Connection::open_in_memory().unwrap();
        assert!(thin_state(&bare, a).is_err());
        assert!(thin_ready(&bare, a).is_err());
        for s in [ThinState::Creating, ThinState::Ready, ThinState::Deleting] {
            assert_eq!(ThinState::parse(s.as_str()).unwrap(), s);
        }
        assert!(ThinState::parse("Ready").is_err());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn thin_ids_are_smallest_unused() {
        let d = tmpdir("ids");
        let mut db = Db::open(&d).unwrap();
        let tx = db.conn.transaction().unwrap();
        let a = alloc_thin_id(&tx, ThinRole::Chain, None, Sectors(100)).unwrap();
        let b = alloc_thin_id(&tx, ThinRole::Chain, Some(a), Sectors(100)).unwrap();
        let c = alloc_thin_id(&tx, ThinRole::Activation, Some(b), Sectors(100)).unwrap();
        assert_eq!((a.get(), b.get(), c.get()), (0, 1, 2));
        tx.execute("DELETE FROM thin_devices WHERE thin_id = 1", []).unwrap();
        assert_eq!(alloc_thin_id(&tx, ThinRole::Chain, None, Sectors(1)).unwrap().get(), 1);
        assert_eq!(alloc_thin_id(&tx, ThinRole::Chain, None, Sectors(1)).unwrap().get(), 3);
        tx.execute("DELETE FROM thin_devices WHERE thin_id = 0", []).unwrap();
        assert_eq!(alloc_thin_id(&tx, ThinRole::Chain, None, Sectors(1)).unwrap().get(), 0);
        tx.commit().unwrap();
        assert_eq!(thin_count(&db.conn).unwrap(), 4);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
