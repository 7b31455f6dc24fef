//! Counts over the whole database for `status`, `doctor` and the metrics
//! file: read-only, one query each, nothing decided from them but what is
//! printed.

use rusqlite::Connection;
use serde::Serialize;

use crate::error::Result;

/// How many of each thing the database records (status and metrics).
#[derive(Debug, Serialize, Default, PartialEq, Eq)]
pub struct Counts {
    pub blobs: i64,
    pub blob_bytes: i64,
    pub rejected_blobs: i64,
    pub chains: i64,
    pub images: i64,
    pub images_ready: i64,
    pub activations: i64,
    pub activations_active: i64,
    pub runs_active: i64,
    pub runs_failed: i64,
}

pub fn counts(c: &Connection) -> Result<Counts> {
    let one = |sql: &str| -> Result<i64> { Ok(c.query_row(sql, [], |r| r.get(0))?) };
    Ok(Counts {
        blobs: one("SELECT COUNT(*) FROM blobs WHERE state = 'present'")?,
        blob_bytes: one("SELECT COALESCE(SUM(size), 0) FROM blobs WHERE state = 'present'")?,
        rejected_blobs: one("SELECT COUNT(*) FROM blobs WHERE state = 'rejected'")?,
        chains: one("SELECT COUNT(*) FROM chains WHERE state = 'ready'")?,
        images: one("SELECT COUNT(*) FROM images")?,
        images_ready: one("SELECT COUNT(*) FROM images WHERE state = 'ready'")?,
        activations: one("SELECT COUNT(*) FROM activations")?,
        activations_active: one("SELECT COUNT(*) FROM activations WHERE state = 'active'")?,
        runs_active: one("SELECT COUNT(*) FROM runs WHERE state IN ('active', 'cancelling')")?,
        runs_failed: crate::journal::unresolved_failures(c)?,
    })
}

/// Journaled runs counted by (kind, state), sorted by both.
pub fn runs_by_kind_state(c: &Connection) -> Result<Vec<(String, String, i64)>> {
    let mut st = c.prepare("SELECT kind, state, COUNT(*) FROM runs GROUP BY kind, state ORDER BY kind, state")?;
    let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
    Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
}

/// SQLite's `PRAGMA quick_check`: "ok", or what it found wrong.
pub fn quick_check(c: &Connection) -> Result<String> {
    Ok(c.query_row("PRAGMA quick_check", [], |r| r.get(0))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::RunSpec;

    fn db() -> Connection {
        crate::store::memory_db()
    }

    #[test]
    fn counts_see_each_state() {
        let mut c = db();
        assert_eq!(counts(&c).unwrap(), Counts::default());
        let [a, b, r] = ["a", "b", "c"].map(|x| crate::fetch::blobstore::BlobDigest::parse(&x.repeat(64)).unwrap());
        crate::store::blobs::blob_present(&c, &a, 100).unwrap();
        crate::store::blobs::blob_present(&c, &b, 20).unwrap();
        crate::store::blobs::blob_present(&c, &r, 7).unwrap();
        crate::store::blobs::reject_blob(&c, &r, "hostile").unwrap();
        crate::store::images::put_image_pulling(&c, "x", "x", &[(1, "x/1".into(), Some(a.clone()))]).unwrap();
        crate::store::images::put_image_pulling(&c, "y", "y", &[]).unwrap();
        let spec = RunSpec {
            kind: "pull".into(),
            subject: "x".into(),
            request: serde_json::json!({}),
            steps: vec!["fetch".into()],
        };
        crate::journal::start(&mut c, &spec).unwrap();
        let n = counts(&c).unwrap();
        assert_eq!((n.blobs, n.blob_bytes, n.rejected_blobs), (2, 120, 1));
        assert_eq!((n.images, n.images_ready, n.chains, n.activations), (2, 0, 0, 0));
        assert_eq!((n.runs_active, n.runs_failed), (1, 0));
        assert_eq!(runs_by_kind_state(&c).unwrap(), vec![("pull".to_string(), "active".to_string(), 1)]);
        assert_eq!(quick_check(&c).unwrap(), "ok");
    }
}
