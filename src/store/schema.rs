//! Schema and migrations. `PRAGMA user_version` is the number of migrations
//! applied; each migration runs in its own transaction together with the
//! version bump, so a crash mid-migration leaves the previous version.
//! Migrations are append-only: never edit one that has shipped.

use rusqlite::Connection;

use crate::error::{Error, Kind, Result};

/// Migration N (1-based) is `MIGRATIONS[N-1]`.
pub const MIGRATIONS: &[&str] = &[
    // 1: domain tables and the journal.
    r#"
    CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    ) STRICT;

    -- Content-addressed blobs (downloaded S3 objects), by SHA-256 hex.
    -- 'missing': the file was found corrupt or absent and removed; the next
    -- fetch of a key holding it downloads it again.
    CREATE TABLE blobs (
        digest        TEXT PRIMARY KEY CHECK (length(digest) = 64),
        size          INTEGER NOT NULL CHECK (size >= 0),
        state         TEXT NOT NULL CHECK (state IN ('present', 'missing', 'rejected')),
        reason        TEXT,             -- why a blob was rejected (rule, entry)
        created_at    INTEGER NOT NULL,
        verified_at   INTEGER
    ) STRICT;

    -- What we know about S3 objects: key -> content. A row with a digest
    -- proves that (bucket, key, etag, size) had that content.
    CREATE TABLE objects (
        bucket        TEXT NOT NULL,
        key           TEXT NOT NULL,
        etag          TEXT NOT NULL,
        size          INTEGER NOT NULL CHECK (size >= 0),
        last_modified TEXT,
        digest        TEXT REFERENCES blobs (digest) ON DELETE SET NULL,
        seen_at       INTEGER NOT NULL,
        PRIMARY KEY (bucket, key)
    ) STRICT;
    CREATE INDEX objects_by_etag ON objects (etag, size);
    CREATE INDEX objects_by_digest ON objects (digest);

    -- Downloads in progress: the partial file's bytes [0, offset) are durable
    -- (fsynced) and were served under `etag`. `digest` is set once the whole
    -- object is written and verified, just before the partial is renamed
    -- into the store, so a crash after the rename is adopted, not redone.
    CREATE TABLE downloads (
        id            INTEGER PRIMARY KEY AUTOINCREMENT,
        bucket        TEXT NOT NULL,
        key           TEXT NOT NULL,
        etag          TEXT NOT NULL,
        size          INTEGER NOT NULL CHECK (size >= 0),
        offset        INTEGER NOT NULL DEFAULT 0 CHECK (offset >= 0),
        partial       TEXT NOT NULL UNIQUE,     -- file name under blobs/partial/, from id
        digest        TEXT CHECK (digest IS NULL OR length(digest) = 64),
        started_at    INTEGER NOT NULL,
        updated_at    INTEGER NOT NULL,
        UNIQUE (bucket, key)
    ) STRICT;

    -- The one thin-pool and how to re-assemble it after a reboot.
    CREATE TABLE pool (
        id            INTEGER PRIMARY KEY CHECK (id = 1),
        dm_name       TEXT NOT NULL UNIQUE,
        kind          TEXT NOT NULL CHECK (kind IN ('loop', 'block')),
        data_path     TEXT NOT NULL,
        meta_path     TEXT NOT NULL,
        data_sectors  INTEGER NOT NULL,
        meta_sectors  INTEGER NOT NULL,
        block_sectors INTEGER NOT NULL,
        low_water     INTEGER NOT NULL,
        state         TEXT NOT NULL CHECK (state IN ('creating', 'ready')),
        created_at    INTEGER NOT NULL
    ) STRICT;

    -- Every thin id we ever asked the pool for. Intent first: a row in state
    -- 'creating' may or may not exist in the pool; 'deleting' likewise.
    CREATE TABLE thin_devices (
        thin_id       INTEGER PRIMARY KEY CHECK (thin_id BETWEEN 0 AND 16777215),
        role          TEXT NOT NULL CHECK (role IN ('chain', 'activation')),
        state         TEXT NOT NULL CHECK (state IN ('creating', 'ready', 'deleting')),
        origin        INTEGER,          -- thin id snapshotted, NULL for a fresh device
        size_sectors  INTEGER NOT NULL,
        created_at    INTEGER NOT NULL
    ) STRICT;

    -- Layer chains: chain_id = sha256(parent_chain_id + " " + blob digest).
    CREATE TABLE chains (
        chain_id      TEXT PRIMARY KEY CHECK (length(chain_id) = 64),
        parent        TEXT REFERENCES chains (chain_id),
        blob          TEXT NOT NULL REFERENCES blobs (digest),
        depth         INTEGER NOT NULL CHECK (depth >= 1),
        thin_id       INTEGER UNIQUE REFERENCES thin_devices (thin_id),
        state         TEXT NOT NULL CHECK (state IN ('building', 'ready')),
        report        TEXT,             -- JSON: what unpacking this layer did
        created_at    INTEGER NOT NULL
    ) STRICT;

    -- Images: a family's layers 1..top, applied in order.
    CREATE TABLE images (
        name          TEXT PRIMARY KEY,  -- 'golang', or 'golang/3' for a prefix
        family        TEXT NOT NULL,
        top_layer     INTEGER NOT NULL,
        top_chain     TEXT REFERENCES chains (chain_id),
        state         TEXT NOT NULL CHECK (state IN ('pulling', 'ready')),
        updated_at    INTEGER NOT NULL
    ) STRICT;

    CREATE TABLE image_layers (
        image         TEXT NOT NULL REFERENCES images (name) ON DELETE CASCADE,
        position      INTEGER NOT NULL CHECK (position >= 1),
        key           TEXT NOT NULL,
        digest        TEXT REFERENCES blobs (digest),
        chain_id      TEXT REFERENCES chains (chain_id),
        PRIMARY KEY (image, position)
    ) STRICT;

    -- Activations: writable snapshots of an image's top chain.
    CREATE TABLE activations (
        name          TEXT PRIMARY KEY,
        image         TEXT NOT NULL REFERENCES images (name),
        chain_id      TEXT NOT NULL REFERENCES chains (chain_id),
        thin_id       INTEGER NOT NULL UNIQUE REFERENCES thin_devices (thin_id),
        state         TEXT NOT NULL CHECK (state IN ('creating', 'active', 'inactive')),
        created_at    INTEGER NOT NULL
    ) STRICT;

    -- The journal. A run is an ordered list of named, idempotent steps.
    CREATE TABLE runs (
        id            INTEGER PRIMARY KEY,
        kind          TEXT NOT NULL,
        subject       TEXT NOT NULL,
        request       TEXT NOT NULL,    -- JSON
        state         TEXT NOT NULL CHECK (state IN ('active', 'cancelling', 'done', 'failed', 'cancelled')),
        error_kind    TEXT,
        error         TEXT,
        pid           INTEGER,
        created_at    INTEGER NOT NULL,
        updated_at    INTEGER NOT NULL
    ) STRICT;
    -- Rule 1: at most one active run per (kind, subject).
    CREATE UNIQUE INDEX runs_one_active ON runs (kind, subject) WHERE state IN ('active', 'cancelling');

    CREATE TABLE steps (
        run_id        INTEGER NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
        idx           INTEGER NOT NULL,
        name          TEXT NOT NULL,
        state         TEXT NOT NULL CHECK (state IN ('pending', 'running', 'done', 'failed')),
        attempts      INTEGER NOT NULL DEFAULT 0,
        error_kind    TEXT,
        error         TEXT,
        intent        TEXT,             -- JSON, written before any kernel/fs action
        outcome       TEXT,             -- JSON, written with completion
        started_at    INTEGER,
        finished_at   INTEGER,
        PRIMARY KEY (run_id, idx),
        UNIQUE (run_id, name)
    ) STRICT;
    "#,
    // 2 (fetch): no content trusted on an unverified claim. Which endpoint
    // an object (or a download) belongs to, and whether the object's digest
    // comes from bytes downloaded from that very key (1) or from an ETag
    // match within the same endpoint and bucket (0). Rows from before this
    // migration have no endpoint, so nothing is reused from them. And the
    // retention of blobs pre-staged with `fetch`.
    r#"
    ALTER TABLE objects ADD COLUMN endpoint TEXT NOT NULL DEFAULT '';
    ALTER TABLE objects ADD COLUMN downloaded INTEGER NOT NULL DEFAULT 0 CHECK (downloaded IN (0, 1));
    ALTER TABLE downloads ADD COLUMN endpoint TEXT NOT NULL DEFAULT '';
    -- When `thinimg fetch` last stored or used the object: gc keeps its
    -- blob, even unused by any image, for a retention period after that.
    ALTER TABLE objects ADD COLUMN fetched_at INTEGER;
    DROP INDEX objects_by_etag;
    CREATE INDEX objects_by_etag ON objects (endpoint, bucket, etag, size);
    "#,
];

/// A database written by a newer thinimg is a configuration problem of this
/// host (exit 78): upgrade thinimg; nothing here may touch it.
pub fn check_version(have: i64) -> Result<()> {
    let want = MIGRATIONS.len() as i64;
    if have > want {
        return Err(Error::new(
            Kind::Config,
            format!(
                "database schema version {have} is newer than this thinimg understands ({want}); \
                 upgrade thinimg (the database was written by a newer version)"
            ),
        ));
    }
    Ok(())
}

/// Bring the database to the newest version, one transaction per migration.
pub fn migrate(conn: &mut Connection) -> Result<()> {
    let have: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    check_version(have)?;
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(have as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrates_from_empty_and_is_idempotent() {
        let mut c = Connection::open_in_memory().unwrap();
        migrate(&mut c).unwrap();
        migrate(&mut c).unwrap();
        let v: i64 = c.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        assert_eq!(v, MIGRATIONS.len() as i64);
    }

    #[test]
    fn refuses_newer_schema() {
        let mut c = Connection::open_in_memory().unwrap();
        c.pragma_update(None, "user_version", 999).unwrap();
        assert_eq!(migrate(&mut c).err().map(|e| e.kind()), Some(Kind::Config));
    }

    #[test]
    fn one_active_run_per_kind_and_subject() {
        let mut c = Connection::open_in_memory().unwrap();
        migrate(&mut c).unwrap();
        let ins = "INSERT INTO runs (kind, subject, request, state, created_at, updated_at) VALUES ('pull', 'golang', '{}', ?1, 0, 0)";
        c.execute(ins, ["active"]).unwrap();
        assert!(c.execute(ins, ["active"]).is_err());
        c.execute(ins, ["done"]).unwrap();
        c.execute(ins, ["failed"]).unwrap();
    }
}
