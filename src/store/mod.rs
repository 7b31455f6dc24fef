//! The SQLite database: the single source of truth.
//!
//! Owns the schema, its versioned migrations (`PRAGMA user_version`) and
//! the connection settings (WAL, `synchronous=FULL`, foreign keys on, busy
//! timeout). Typed queries live in the submodules, one per domain table
//! group. Nothing outside `store` and `journal` writes SQL.

pub mod blobs;
pub mod images;
pub mod pool;
pub mod schema;

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

use crate::error::{Error, Kind, Result};

/// An open database. Not `Sync`: each thread that needs one opens its own.
pub struct Db {
    pub conn: Connection,
    path: PathBuf,
}

impl Db {
    /// Open (creating if needed) `<state-dir>/state.db` and migrate it.
    pub fn open(state_dir: &Path) -> Result<Db> {
        std::fs::create_dir_all(state_dir)
            .map_err(|e| Error::io(format!("creating state dir {}", state_dir.display()), e))?;
        Db::open_path(&state_dir.join("state.db"), false)
    }

    /// Open an existing database without creating or migrating it (read-only
    /// commands). A missing database reads as empty: `Ok(None)`.
    pub fn open_existing(state_dir: &Path) -> Result<Option<Db>> {
        let p = state_dir.join("state.db");
        if !p.exists() {
            return Ok(None);
        }
        Db::open_path(&p, true).map(Some)
    }

    fn open_path(path: &Path, existing_only: bool) -> Result<Db> {
        let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        if !existing_only {
            flags |= OpenFlags::SQLITE_OPEN_CREATE;
        }
        let mut conn = Connection::open_with_flags(path, flags)
            .map_err(|e| Error::from(e).context(format!("opening {}", path.display())))?;
        conn.busy_timeout(Duration::from_secs(30))?;
        // Every transaction here writes. IMMEDIATE takes the write lock at
        // BEGIN (waiting with the busy timeout), instead of failing with
        // SQLITE_BUSY_SNAPSHOT when a read turns into a write after another
        // connection (a sync worker thread) committed in between.
        conn.set_transaction_behavior(rusqlite::TransactionBehavior::Immediate);
        conn.execute_batch(
            "PRAGMA journal_mode=WAL;
             PRAGMA synchronous=FULL;
             PRAGMA foreign_keys=ON;",
        )?;
        let mut db = Db { conn, path: path.to_path_buf() };
        schema::migrate(&mut db.conn).map_err(|e| e.context(format!("migrating {}", path.display())))?;
        Ok(db)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `PRAGMA integrity_check` and `foreign_key_check`: both must be clean.
    pub fn integrity_check(&self) -> Result<()> {
        let r: String = self.conn.query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
        if r != "ok" {
            return Err(Error::new(Kind::Software, format!("database integrity check: {r}")));
        }
        let mut st = self.conn.prepare("PRAGMA foreign_key_check")?;
        let mut rows = st.query([])?;
        if let Some(row) = rows.next()? {
            let t: String = row.get(0)?;
            return Err(Error::new(Kind::Software, format!("database foreign key check failed in table {t}")));
        }
        Ok(())
    }
}
