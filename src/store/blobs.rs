//! Typed queries over `blobs`, `objects` and `downloads`: what is stored,
//! which S3 object holds which content, and which downloads are half done.
//!
//! Every multi-row change is one transaction, so the tables never disagree
//! after a crash. Nothing here touches files; the blob store and the fetch
//! driver decide what the rows mean.

use rusqlite::{params, Connection, OptionalExtension};

use crate::error::Result;
use crate::ops::output::now;

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BlobRow {
    pub digest: String,
    pub size: u64,
    pub state: String,
    pub created_at: i64,
    pub verified_at: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectRow {
    pub bucket: String,
    pub key: String,
    pub etag: String,
    pub size: u64,
    pub digest: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownloadRow {
    pub id: i64,
    pub bucket: String,
    pub key: String,
    pub etag: String,
    pub size: u64,
    pub offset: u64,
    pub partial: String,
    pub digest: Option<String>,
}

fn blob_from(r: &rusqlite::Row) -> rusqlite::Result<BlobRow> {
    Ok(BlobRow {
        digest: r.get(0)?,
        size: r.get::<_, i64>(1)? as u64,
        state: r.get(2)?,
        created_at: r.get(3)?,
        verified_at: r.get(4)?,
    })
}

pub fn blob_get(c: &Connection, digest: &str) -> Result<Option<BlobRow>> {
    Ok(c.query_row(
        "SELECT digest, size, state, created_at, verified_at FROM blobs WHERE digest = ?1",
        [digest],
        blob_from,
    )
    .optional()?)
}

/// (bucket, key) pairs.
pub type ObjectKeys = Vec<(String, String)>;

/// Every blob with the keys known to hold it, ordered by digest.
pub fn blobs_with_keys(c: &Connection) -> Result<Vec<(BlobRow, ObjectKeys)>> {
    let mut st = c.prepare("SELECT digest, size, state, created_at, verified_at FROM blobs ORDER BY digest")?;
    let blobs = st.query_map([], blob_from)?.collect::<rusqlite::Result<Vec<_>>>()?;
    let mut keys = c.prepare("SELECT bucket, key FROM objects WHERE digest = ?1 ORDER BY bucket, key")?;
    let mut out = Vec::with_capacity(blobs.len());
    for b in blobs {
        let k = keys.query_map([&b.digest], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<rusqlite::Result<Vec<_>>>()?;
        out.push((b, k));
    }
    Ok(out)
}

/// The blob file was found corrupt or absent and has been removed.
pub fn blob_mark_missing(c: &Connection, digest: &str) -> Result<()> {
    c.execute("UPDATE blobs SET state = 'missing', verified_at = NULL WHERE digest = ?1", [digest])?;
    Ok(())
}

pub fn blob_mark_verified(c: &Connection, digest: &str) -> Result<()> {
    c.execute("UPDATE blobs SET verified_at = ?2 WHERE digest = ?1", params![digest, now()])?;
    Ok(())
}

pub fn object_get(c: &Connection, bucket: &str, key: &str) -> Result<Option<ObjectRow>> {
    Ok(c.query_row(
        "SELECT bucket, key, etag, size, digest FROM objects WHERE bucket = ?1 AND key = ?2",
        params![bucket, key],
        |r| {
            Ok(ObjectRow {
                bucket: r.get(0)?,
                key: r.get(1)?,
                etag: r.get(2)?,
                size: r.get::<_, i64>(3)? as u64,
                digest: r.get(4)?,
            })
        },
    )
    .optional()?)
}

/// A present blob that an object with this (plain-MD5) ETag and size is
/// known to hold, in any bucket.
pub fn digest_by_etag(c: &Connection, etag: &str, size: u64) -> Result<Option<String>> {
    Ok(c.query_row(
        "SELECT o.digest FROM objects o JOIN blobs b ON b.digest = o.digest
         WHERE o.etag = ?1 AND o.size = ?2 AND b.state = 'present' LIMIT 1",
        params![etag, size as i64],
        |r| r.get(0),
    )
    .optional()?)
}

/// Record that (bucket, key, etag, size) holds `digest` (which must be a
/// present blob).
pub fn object_record(
    c: &Connection,
    bucket: &str,
    key: &str,
    etag: &str,
    size: u64,
    last_modified: &str,
    digest: &str,
) -> Result<()> {
    c.execute(
        "INSERT INTO objects (bucket, key, etag, size, last_modified, digest, seen_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT (bucket, key) DO UPDATE SET etag = excluded.etag, size = excluded.size,
             last_modified = excluded.last_modified, digest = excluded.digest, seen_at = excluded.seen_at",
        params![bucket, key, etag, size as i64, last_modified, digest, now()],
    )?;
    Ok(())
}

fn download_from(r: &rusqlite::Row) -> rusqlite::Result<DownloadRow> {
    Ok(DownloadRow {
        id: r.get(0)?,
        bucket: r.get(1)?,
        key: r.get(2)?,
        etag: r.get(3)?,
        size: r.get::<_, i64>(4)? as u64,
        offset: r.get::<_, i64>(5)? as u64,
        partial: r.get(6)?,
        digest: r.get(7)?,
    })
}

const DOWNLOAD_COLS: &str = "id, bucket, key, etag, size, offset, partial, digest";

pub fn download_get(c: &Connection, bucket: &str, key: &str) -> Result<Option<DownloadRow>> {
    Ok(c.query_row(
        &format!("SELECT {DOWNLOAD_COLS} FROM downloads WHERE bucket = ?1 AND key = ?2"),
        params![bucket, key],
        download_from,
    )
    .optional()?)
}

pub fn downloads_all(c: &Connection) -> Result<Vec<DownloadRow>> {
    let mut st = c.prepare(&format!("SELECT {DOWNLOAD_COLS} FROM downloads ORDER BY id"))?;
    let rows = st.query_map([], download_from)?.collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(rows)
}

/// Start (or restart from 0) the download of (bucket, key). The partial
/// file's name comes from the row id, never from the key.
pub fn download_begin(c: &mut Connection, bucket: &str, key: &str, etag: &str, size: u64) -> Result<DownloadRow> {
    let tx = c.transaction()?;
    tx.execute("DELETE FROM downloads WHERE bucket = ?1 AND key = ?2", params![bucket, key])?;
    // AUTOINCREMENT: ids (and so partial names) are never reused.
    tx.execute(
        "INSERT INTO downloads (bucket, key, etag, size, offset, partial, started_at, updated_at)
         VALUES (?1, ?2, ?3, ?4, 0, '', ?5, ?5)",
        params![bucket, key, etag, size as i64, now()],
    )?;
    let id = tx.last_insert_rowid();
    tx.execute("UPDATE downloads SET partial = ?2 WHERE id = ?1", params![id, format!("{id}.partial")])?;
    let row = tx.query_row(&format!("SELECT {DOWNLOAD_COLS} FROM downloads WHERE id = ?1"), [id], download_from)?;
    tx.commit()?;
    Ok(row)
}

/// Bytes [0, offset) of the partial are fsynced and were served under `etag`.
pub fn download_checkpoint(c: &Connection, id: i64, offset: u64, etag: &str, size: u64) -> Result<()> {
    c.execute(
        "UPDATE downloads SET offset = ?2, etag = ?3, size = ?4, digest = NULL, updated_at = ?5 WHERE id = ?1",
        params![id, offset as i64, etag, size as i64, now()],
    )?;
    Ok(())
}

/// The partial is complete, fsynced and hashes to `digest`.
pub fn download_verified(c: &Connection, id: i64, digest: &str, size: u64) -> Result<()> {
    c.execute(
        "UPDATE downloads SET offset = ?3, size = ?3, digest = ?2, updated_at = ?4 WHERE id = ?1",
        params![id, digest, size as i64, now()],
    )?;
    Ok(())
}

pub fn download_forget(c: &Connection, id: i64) -> Result<()> {
    c.execute("DELETE FROM downloads WHERE id = ?1", [id])?;
    Ok(())
}

/// The blob file `digest` is in place: record the blob, map the object to
/// it and drop the download row, in one transaction.
#[allow(clippy::too_many_arguments)]
pub fn download_commit(
    c: &mut Connection,
    download_id: Option<i64>,
    bucket: &str,
    key: &str,
    etag: &str,
    size: u64,
    last_modified: &str,
    digest: &str,
) -> Result<()> {
    let tx = c.transaction()?;
    blob_present(&tx, digest, size)?;
    object_record(&tx, bucket, key, etag, size, last_modified, digest)?;
    if let Some(id) = download_id {
        tx.execute("DELETE FROM downloads WHERE id = ?1", [id])?;
    }
    tx.commit()?;
    Ok(())
}

/// Insert the blob as present, or bring a 'missing' one back.
pub fn blob_present(c: &Connection, digest: &str, size: u64) -> Result<()> {
    c.execute(
        "INSERT INTO blobs (digest, size, state, created_at, verified_at) VALUES (?1, ?2, 'present', ?3, ?3)
         ON CONFLICT (digest) DO UPDATE SET state = 'present', size = excluded.size, verified_at = excluded.verified_at",
        params![digest, size as i64, now()],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> Connection {
        let mut c = Connection::open_in_memory().unwrap();
        c.execute_batch("PRAGMA foreign_keys=ON").unwrap();
        crate::store::schema::migrate(&mut c).unwrap();
        c
    }

    #[test]
    fn download_lifecycle_and_dedupe_lookup() {
        let mut c = db();
        let d = "a".repeat(64);
        let etag = "0123456789abcdef0123456789abcdef";
        let r1 = download_begin(&mut c, "b", "k/1.tar", etag, 100).unwrap();
        assert_eq!(r1.partial, format!("{}.partial", r1.id));
        download_checkpoint(&c, r1.id, 50, etag, 100).unwrap();
        assert_eq!(download_get(&c, "b", "k/1.tar").unwrap().unwrap().offset, 50);
        // A restart gets a fresh, never reused partial name.
        let r2 = download_begin(&mut c, "b", "k/1.tar", etag, 100).unwrap();
        assert_ne!(r1.partial, r2.partial);
        download_verified(&c, r2.id, &d, 100).unwrap();
        download_commit(&mut c, Some(r2.id), "b", "k/1.tar", etag, 100, "", &d).unwrap();
        assert!(downloads_all(&c).unwrap().is_empty());
        assert_eq!(digest_by_etag(&c, etag, 100).unwrap().as_deref(), Some(d.as_str()));
        assert_eq!(digest_by_etag(&c, etag, 101).unwrap(), None);
        blob_mark_missing(&c, &d).unwrap();
        assert_eq!(digest_by_etag(&c, etag, 100).unwrap(), None);
        blob_present(&c, &d, 100).unwrap();
        let all = blobs_with_keys(&c).unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].1, vec![("b".to_string(), "k/1.tar".to_string())]);
    }
}
