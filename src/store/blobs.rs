//! Typed queries over `blobs`, `objects` and `downloads`: what is stored,
//! which S3 object holds which content, and which downloads are half done.
//!
//! Every multi-row change is one transaction, so the tables never disagree
//! after a crash. Nothing here touches files; the blob store and the fetch
//! driver decide what the rows mean. Two rules are kept here, in the SQL:
//! an object's content is reused from another key only within the same
//! endpoint and bucket and only from a key whose bytes were downloaded and
//! verified; and a rejected blob stays rejected (storing it again never
//! flips it back to present; only [`blob_clear_rejection`] does).

use rusqlite::{params, Connection, OptionalExtension};

use crate::error::Result;
use crate::fetch::blobstore::BlobDigest;
use crate::ops::output::now;

column_enum! {
    /// Where a blob stands (`blobs.state`): `Present` (its file is stored
    /// and verified), `Missing` (found corrupt or absent and removed; the
    /// next fetch downloads it again), `Rejected` (its content was refused;
    /// the rejection outlives the bytes).
    BlobState, "blob row" { Present = "present", Missing = "missing", Rejected = "rejected" }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BlobRow {
    pub digest: BlobDigest,
    pub size: u64,
    pub state: BlobState,
    /// Why a rejected blob was rejected.
    pub reason: Option<String>,
    pub created_at: i64,
    pub verified_at: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectRow {
    pub endpoint: String,
    pub bucket: String,
    pub key: String,
    pub etag: String,
    pub size: u64,
    pub digest: Option<BlobDigest>,
    /// The digest comes from bytes downloaded from this key (not an ETag match).
    pub downloaded: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownloadRow {
    pub id: i64,
    pub endpoint: String,
    pub bucket: String,
    pub key: String,
    pub etag: String,
    pub size: u64,
    pub offset: u64,
    pub partial: String,
    pub digest: Option<BlobDigest>,
}

fn blob_from(r: &rusqlite::Row) -> rusqlite::Result<BlobRow> {
    Ok(BlobRow {
        digest: r.get(0)?,
        size: r.get::<_, i64>(1)? as u64,
        state: r.get(2)?,
        created_at: r.get(3)?,
        verified_at: r.get(4)?,
        reason: r.get(5)?,
    })
}

pub fn blob_get(c: &Connection, digest: &BlobDigest) -> Result<Option<BlobRow>> {
    Ok(c.query_row(
        "SELECT digest, size, state, created_at, verified_at, reason FROM blobs WHERE digest = ?1",
        [digest],
        blob_from,
    )
    .optional()?)
}

/// (bucket, key) pairs.
pub type ObjectKeys = Vec<(String, String)>;

/// Every blob with the keys known to hold it, ordered by digest.
pub fn blobs_with_keys(c: &Connection) -> Result<Vec<(BlobRow, ObjectKeys)>> {
    let mut st = c.prepare("SELECT digest, size, state, created_at, verified_at, reason FROM blobs ORDER BY digest")?;
    let blobs = st.query_map([], blob_from)?.collect::<rusqlite::Result<Vec<_>>>()?;
    let mut keys = c.prepare("SELECT bucket, key FROM objects WHERE digest = ?1 ORDER BY bucket, key")?;
    let mut out = Vec::with_capacity(blobs.len());
    for b in blobs {
        let k = keys.query_map([&b.digest], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<rusqlite::Result<Vec<_>>>()?;
        out.push((b, k));
    }
    Ok(out)
}

/// The blob file was found corrupt or absent and has been removed. A
/// rejected blob stays rejected.
pub fn blob_mark_missing(c: &Connection, digest: &BlobDigest) -> Result<()> {
    c.execute(
        "UPDATE blobs SET state = 'missing', verified_at = NULL WHERE digest = ?1 AND state != 'rejected'",
        [digest],
    )?;
    Ok(())
}

pub fn blob_mark_verified(c: &Connection, digest: &BlobDigest) -> Result<()> {
    c.execute("UPDATE blobs SET verified_at = ?2 WHERE digest = ?1", params![digest, now()])?;
    Ok(())
}

/// What is known about (bucket, key) as seen at `endpoint` (a row from
/// another endpoint, or from before endpoints were recorded, is not it).
pub fn object_get(c: &Connection, endpoint: &str, bucket: &str, key: &str) -> Result<Option<ObjectRow>> {
    Ok(c.query_row(
        "SELECT endpoint, bucket, key, etag, size, digest, downloaded FROM objects
         WHERE bucket = ?1 AND key = ?2 AND endpoint = ?3",
        params![bucket, key, endpoint],
        |r| {
            Ok(ObjectRow {
                endpoint: r.get(0)?,
                bucket: r.get(1)?,
                key: r.get(2)?,
                etag: r.get(3)?,
                size: r.get::<_, i64>(4)? as u64,
                digest: r.get(5)?,
                downloaded: r.get::<_, i64>(6)? == 1,
            })
        },
    )
    .optional()?)
}

/// A present blob that another key with this plain-MD5 ETag and size holds,
/// in the same endpoint and bucket, known from bytes downloaded from that
/// key (and checked against its ETag), never from an ETag match.
pub fn digest_by_etag(
    c: &Connection,
    endpoint: &str,
    bucket: &str,
    etag: &str,
    size: u64,
) -> Result<Option<BlobDigest>> {
    Ok(c.query_row(
        "SELECT o.digest FROM objects o JOIN blobs b ON b.digest = o.digest
         WHERE o.endpoint = ?1 AND o.bucket = ?2 AND o.etag = ?3 AND o.size = ?4 AND o.downloaded = 1
           AND b.state = 'present' LIMIT 1",
        params![endpoint, bucket, etag, size as i64],
        |r| r.get(0),
    )
    .optional()?)
}

/// Why (bucket, key) in this version (etag, size) was rejected, if its
/// content is a rejected blob: checked before anything is downloaded. Any
/// endpoint: refusing more is the safe side.
pub fn object_rejection(
    c: &Connection,
    bucket: &str,
    key: &str,
    etag: &str,
    size: u64,
) -> Result<Option<(BlobDigest, String)>> {
    Ok(c.query_row(
        "SELECT b.digest, COALESCE(b.reason, 'rejected') FROM objects o JOIN blobs b ON b.digest = o.digest
         WHERE o.bucket = ?1 AND o.key = ?2 AND o.etag = ?3 AND o.size = ?4 AND b.state = 'rejected'",
        params![bucket, key, etag, size as i64],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .optional()?)
}

/// Why a blob was rejected, if it was.
pub fn blob_rejection(c: &Connection, digest: &BlobDigest) -> Result<Option<String>> {
    Ok(c.query_row(
        "SELECT COALESCE(reason, 'rejected') FROM blobs WHERE digest = ?1 AND state = 'rejected'",
        [digest],
        |r| r.get(0),
    )
    .optional()?)
}

/// Operator command: forget a rejection. The blob becomes 'missing' (its
/// file may be gone), so the next fetch downloads and checks it again.
/// Returns whether the blob was rejected.
pub fn blob_clear_rejection(c: &Connection, digest: &BlobDigest) -> Result<bool> {
    let n = c.execute(
        "UPDATE blobs SET state = 'missing', reason = NULL, verified_at = NULL WHERE digest = ?1 AND state = 'rejected'",
        [digest],
    )?;
    Ok(n > 0)
}

/// Record that (bucket, key, etag, size) at `endpoint` holds `digest`
/// (a blob row that exists). `downloaded`: the digest comes from bytes
/// downloaded from this key.
#[allow(clippy::too_many_arguments)]
pub fn object_record(
    c: &Connection,
    endpoint: &str,
    bucket: &str,
    key: &str,
    etag: &str,
    size: u64,
    last_modified: &str,
    digest: &BlobDigest,
    downloaded: bool,
) -> Result<()> {
    c.execute(
        "INSERT INTO objects (endpoint, bucket, key, etag, size, last_modified, digest, downloaded, seen_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
         ON CONFLICT (bucket, key) DO UPDATE SET endpoint = excluded.endpoint, etag = excluded.etag,
             size = excluded.size, last_modified = excluded.last_modified, digest = excluded.digest,
             downloaded = excluded.downloaded, seen_at = excluded.seen_at",
        params![endpoint, bucket, key, etag, size as i64, last_modified, digest, i64::from(downloaded), now()],
    )?;
    Ok(())
}

/// `thinimg fetch` stored or used (bucket, key)'s content now: its blob's
/// retention (see [`unused_blobs`]) starts over.
pub fn object_mark_fetched(c: &Connection, bucket: &str, key: &str) -> Result<()> {
    c.execute("UPDATE objects SET fetched_at = ?3 WHERE bucket = ?1 AND key = ?2", params![bucket, key, now()])?;
    Ok(())
}

/// Blobs no image layer and no chain uses, with their state, that
/// `thinimg fetch` has not stored or used since `fetched_before` (unix
/// seconds): what gc may collect. Blobs only pulled are collectable as soon
/// as no image uses them.
pub fn unused_blobs(c: &Connection, fetched_before: i64) -> Result<Vec<(BlobDigest, u64, BlobState)>> {
    let mut st = c.prepare(
        "SELECT digest, size, state FROM blobs b
         WHERE NOT EXISTS (SELECT 1 FROM image_layers l WHERE l.digest = b.digest)
           AND NOT EXISTS (SELECT 1 FROM chains c WHERE c.blob = b.digest)
           AND NOT EXISTS (SELECT 1 FROM objects o WHERE o.digest = b.digest AND o.fetched_at >= ?1)
         ORDER BY digest",
    )?;
    let rows = st
        .query_map([fetched_before], |r| Ok((r.get(0)?, r.get::<_, i64>(1)?.max(0) as u64, r.get(2)?)))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(rows)
}

/// Forget a blob whose file was removed (never a rejected one: its
/// rejection outlives its bytes).
pub fn blob_delete(c: &Connection, digest: &BlobDigest) -> Result<()> {
    c.execute("DELETE FROM blobs WHERE digest = ?1 AND state != 'rejected'", [digest])?;
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
        endpoint: r.get(8)?,
    })
}

const DOWNLOAD_COLS: &str = "id, bucket, key, etag, size, offset, partial, digest, endpoint";

pub fn download_get(c: &Connection, bucket: &str, key: &str) -> Result<Option<DownloadRow>> {
    Ok(c.query_row(
        &format!("SELECT {DOWNLOAD_COLS} FROM downloads WHERE bucket = ?1 AND key = ?2"),
        params![bucket, key],
        download_from,
    )
    .optional()?)
}

/// Downloads no unfinished run may resume: all of them when no run is
/// active or cancelling (a `fetch` is not a run, and the caller holds the
/// state lock, so none is running), none otherwise.
pub fn downloads_unowned(c: &Connection) -> Result<Vec<DownloadRow>> {
    let busy: bool =
        c.query_row("SELECT EXISTS (SELECT 1 FROM runs WHERE state IN ('active', 'cancelling'))", [], |r| r.get(0))?;
    if busy {
        return Ok(Vec::new());
    }
    downloads_all(c)
}

pub fn downloads_all(c: &Connection) -> Result<Vec<DownloadRow>> {
    let mut st = c.prepare(&format!("SELECT {DOWNLOAD_COLS} FROM downloads ORDER BY id"))?;
    let rows = st.query_map([], download_from)?.collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(rows)
}

/// Start (or restart from 0) the download of (bucket, key). The partial
/// file's name comes from the row id, never from the key.
pub fn download_begin(
    c: &mut Connection,
    endpoint: &str,
    bucket: &str,
    key: &str,
    etag: &str,
    size: u64,
) -> Result<DownloadRow> {
    let tx = c.transaction()?;
    tx.execute("DELETE FROM downloads WHERE bucket = ?1 AND key = ?2", params![bucket, key])?;
    // AUTOINCREMENT: ids (and so partial names) are never reused.
    tx.execute(
        "INSERT INTO downloads (endpoint, bucket, key, etag, size, offset, partial, started_at, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, 0, '', ?6, ?6)",
        params![endpoint, bucket, key, etag, size as i64, now()],
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
pub fn download_verified(c: &Connection, id: i64, digest: &BlobDigest, size: u64) -> Result<()> {
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

/// The blob file `digest` is in place, downloaded from (endpoint, bucket,
/// key) and verified: record the blob, map the object to it and drop the
/// download row, in one transaction.
#[allow(clippy::too_many_arguments)]
pub fn download_commit(
    c: &mut Connection,
    download_id: Option<i64>,
    endpoint: &str,
    bucket: &str,
    key: &str,
    etag: &str,
    size: u64,
    last_modified: &str,
    digest: &BlobDigest,
) -> Result<()> {
    let tx = c.transaction()?;
    blob_present(&tx, digest, size)?;
    object_record(&tx, endpoint, bucket, key, etag, size, last_modified, digest, true)?;
    if let Some(id) = download_id {
        tx.execute("DELETE FROM downloads WHERE id = ?1", [id])?;
    }
    tx.commit()?;
    Ok(())
}

/// Insert the blob as present, or bring a 'missing' one back. A rejected
/// blob stays rejected: storing its bytes again changes nothing about it.
pub fn blob_present(c: &Connection, digest: &BlobDigest, size: u64) -> Result<()> {
    c.execute(
        "INSERT INTO blobs (digest, size, state, created_at, verified_at) VALUES (?1, ?2, 'present', ?3, ?3)
         ON CONFLICT (digest) DO UPDATE SET
             state = CASE WHEN state = 'rejected' THEN 'rejected' ELSE 'present' END,
             size = excluded.size, verified_at = excluded.verified_at",
        params![digest, size as i64, now()],
    )?;
    Ok(())
}

/// Mark a blob as rejected (hostile or invalid) with the reason.
pub fn reject_blob(c: &Connection, digest: &BlobDigest, reason: &str) -> Result<()> {
    c.execute("UPDATE blobs SET state = 'rejected', reason = ?1 WHERE digest = ?2", params![reason, digest])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> Connection {
        crate::store::memory_db()
    }

    #[test]
    fn download_lifecycle_and_dedupe_lookup() {
        let mut c = db();
        let d = BlobDigest::parse(&"a".repeat(64)).unwrap();
        let etag = "0123456789abcdef0123456789abcdef";
        let ep = "http://e";
        let r1 = download_begin(&mut c, ep, "b", "k/1.tar", etag, 100).unwrap();
        assert_eq!(r1.partial, format!("{}.partial", r1.id));
        download_checkpoint(&c, r1.id, 50, etag, 100).unwrap();
        assert_eq!(download_get(&c, "b", "k/1.tar").unwrap().unwrap().offset, 50);
        // A restart gets a fresh, never reused partial name.
        let r2 = download_begin(&mut c, ep, "b", "k/1.tar", etag, 100).unwrap();
        assert_ne!(r1.partial, r2.partial);
        download_verified(&c, r2.id, &d, 100).unwrap();
        download_commit(&mut c, Some(r2.id), ep, "b", "k/1.tar", etag, 100, "", &d).unwrap();
        assert!(downloads_all(&c).unwrap().is_empty());
        assert_eq!(digest_by_etag(&c, ep, "b", etag, 100).unwrap().as_ref(), Some(&d));
        assert_eq!(digest_by_etag(&c, ep, "b", etag, 101).unwrap(), None);
        // Another bucket or another endpoint: nothing is reused.
        assert_eq!(digest_by_etag(&c, ep, "other", etag, 100).unwrap(), None);
        assert_eq!(digest_by_etag(&c, "http://evil", "b", etag, 100).unwrap(), None);
        // A key recorded by an ETag match is not a source for further matches.
        object_record(&c, ep, "b", "k/2.tar", etag, 100, "", &d, false).unwrap();
        blob_mark_missing(&c, &d).unwrap();
        assert_eq!(digest_by_etag(&c, ep, "b", etag, 100).unwrap(), None);
        blob_present(&c, &d, 100).unwrap();
        c.execute("DELETE FROM objects WHERE key = 'k/1.tar'", []).unwrap();
        assert_eq!(digest_by_etag(&c, ep, "b", etag, 100).unwrap(), None, "k/2.tar was only deduped");
        download_commit(&mut c, None, ep, "b", "k/1.tar", etag, 100, "", &d).unwrap();
        let all = blobs_with_keys(&c).unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].1, vec![("b".to_string(), "k/1.tar".to_string()), ("b".to_string(), "k/2.tar".to_string())]);
    }

    #[test]
    fn a_rejected_blob_stays_rejected() {
        let mut c = db();
        let d = BlobDigest::parse(&"b".repeat(64)).unwrap();
        let etag = "0123456789abcdef0123456789abcdef";
        download_commit(&mut c, None, "http://e", "b", "k/1.tar", etag, 100, "", &d).unwrap();
        assert_eq!(object_rejection(&c, "b", "k/1.tar", etag, 100).unwrap(), None);
        reject_blob(&c, &d, "rule xyz: hostile").unwrap();
        // Stored again, marked missing, collected: still rejected.
        blob_present(&c, &d, 100).unwrap();
        download_commit(&mut c, None, "http://e", "b", "k/1.tar", etag, 100, "", &d).unwrap();
        blob_mark_missing(&c, &d).unwrap();
        blob_delete(&c, &d).unwrap();
        assert_eq!(blob_rejection(&c, &d).unwrap().as_deref(), Some("rule xyz: hostile"));
        let (rd, why) = object_rejection(&c, "b", "k/1.tar", etag, 100).unwrap().unwrap();
        assert_eq!((rd.as_str(), why.as_str()), (d.as_str(), "rule xyz: hostile"));
        // Another version of the object is not this rejection.
        assert_eq!(object_rejection(&c, "b", "k/1.tar", etag, 101).unwrap(), None);
        assert!(blob_clear_rejection(&c, &d).unwrap());
        assert_eq!(blob_rejection(&c, &d).unwrap(), None);
        assert!(!blob_clear_rejection(&c, &d).unwrap());
    }
}
