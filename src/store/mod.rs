//! The SQLite database: the single source of truth.
//!
//! Owns the schema, its versioned migrations (`PRAGMA user_version`) and
//! the connection settings (WAL, `synchronous=FULL`, foreign keys on, busy
//! timeout). Typed queries live in the submodules, one per domain table
//! group. Nothing outside `store` and `journal` writes SQL.

pub mod blobs;
pub mod ids;
pub mod images;
pub mod schema;
pub mod stats;
pub mod thin_pool;

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

use crate::error::{Error, Kind, Result};

/// What the database files look like on disk, without opening them: a
/// commit always changes it (the WAL grows, or restarts with a new header,
/// or is checkpointed into a database file whose size or mtime changes),
/// and so does replacing or restoring the file. Equal stamps taken before
/// and after a read mean no commit landed in between, so an answer read
/// then still holds while the stamp is unchanged. (A checkpoint without a
/// commit may also change it: that only costs a fresh read.)
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DbStamp {
    db: FileStamp,
    wal: Option<FileStamp>,
    /// The WAL header (checkpoint sequence and salts), hex.
    wal_header: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct FileStamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
}

impl FileStamp {
    fn of(p: &Path) -> std::io::Result<Option<FileStamp>> {
        use std::os::unix::fs::MetadataExt;
        match std::fs::symlink_metadata(p) {
            Ok(m) => Ok(Some(FileStamp {
                dev: m.dev(),
                ino: m.ino(),
                size: m.size(),
                mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            })),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// The stamp of the database under `state_dir`; `None` when there is no
/// database (or it cannot be looked at: the caller then reads it for real).
pub fn stamp(state_dir: &Path) -> Option<DbStamp> {
    use std::io::Read;
    let db_path = state_dir.join("state.db");
    let db = FileStamp::of(&db_path).ok()??;
    let wal_path = state_dir.join("state.db-wal");
    // A WAL shorter than its header holds no commit (a reader creates an
    // empty one and deletes it on close): the database file is the content.
    let wal = FileStamp::of(&wal_path).ok()?.filter(|w| w.size >= 32);
    let wal_header = match &wal {
        Some(_) => {
            let mut h = [0u8; 32];
            std::fs::File::open(&wal_path).and_then(|mut f| f.read_exact(&mut h)).ok()?;
            Some(crate::ops::encode::hex(&h))
        }
        None => None,
    };
    Some(DbStamp { db, wal, wal_header })
}

/// `file:` URI path: percent-encode what a URI would misread.
fn uri_path(p: &Path) -> String {
    let mut o = String::new();
    for b in p.as_os_str().as_encoded_bytes() {
        match b {
            b'%' | b'?' | b'#' => o.push_str(&format!("%{b:02X}")),
            _ => o.push(char::from(*b)),
        }
    }
    o
}

fn is_missing_or_empty(p: &Path) -> Result<bool> {
    match std::fs::metadata(p) {
        Ok(m) => Ok(m.len() == 0),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(Error::io(format!("reading {}", p.display()), e)),
    }
}

/// Files that only exist because a database recorded them.
fn orphan_evidence(state_dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for d in ["blobs/sha256", "blobs/partial", "pool"] {
        let dir = state_dir.join(d);
        if let Ok(mut rd) = std::fs::read_dir(&dir) {
            if rd.any(|e| e.is_ok()) {
                found.push(dir);
            }
        }
    }
    found
}

fn refuse_orphans(state_dir: &Path, db: &Path) -> Result<()> {
    let found = orphan_evidence(state_dir);
    if found.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = found.iter().map(|p| p.display().to_string()).collect();
    Err(Error::new(
        Kind::Io,
        format!(
            "database {} is missing or empty, but {} exist(s): the state directory does not match its database. \
             Restore state.db from a backup (taken with the pool's metadata); or, to start over, stop using the pool, \
             move those files away and run again. thinimg will not create a new database that would orphan them",
            db.display(),
            list.join(" and ")
        ),
    ))
}

/// A database error at open, named by its file, with advice for a damaged file.
fn db_error(path: &Path, e: rusqlite::Error) -> Error {
    use rusqlite::ErrorCode as C;
    let code = match &e {
        rusqlite::Error::SqliteFailure(f, _) => Some(f.code),
        _ => None,
    };
    match code {
        Some(C::NotADatabase | C::DatabaseCorrupt) => Error::new(
            Kind::Io,
            format!(
                "database {} is damaged; restore it from a backup (taken together with the pool's metadata), \
                 or move it aside and check it with 'sqlite3 {} .recover'",
                path.display(),
                path.display()
            ),
        )
        .with_source(e),
        Some(C::CannotOpen) => {
            Error::new(Kind::CantCreate, format!("cannot open database {}", path.display())).with_source(e)
        }
        Some(C::ReadOnly) => {
            Error::new(Kind::CantCreate, format!("database {} is read-only", path.display())).with_source(e)
        }
        Some(C::PermissionDenied) => {
            Error::new(Kind::NoPerm, format!("permission denied on database {}", path.display())).with_source(e)
        }
        _ => Error::from(e).context(path.display()),
    }
}

/// An open database. Not `Sync`: each thread that needs one opens its own.
pub struct Db {
    pub conn: Connection,
    path: PathBuf,
}

impl Db {
    /// Open (creating if needed) `<state-dir>/state.db` and migrate it.
    /// A missing or empty database next to existing blobs or pool files is
    /// refused: re-creating it would orphan them for good.
    pub fn open(state_dir: &Path) -> Result<Db> {
        std::fs::create_dir_all(state_dir)
            .map_err(|e| Error::io(format!("creating state dir {}", state_dir.display()), e))?;
        let p = state_dir.join("state.db");
        if is_missing_or_empty(&p)? {
            refuse_orphans(state_dir, &p)?;
        }
        Db::open_path(&p)
    }

    /// Open an existing database for reading only (read-only commands): no
    /// lock, no migration, no write of any kind, so it works on a
    /// read-only filesystem and for a user who can only read the state
    /// directory. A missing database reads as empty (`Ok(None)`), unless
    /// blobs or pool files show that one should exist.
    pub fn open_read(state_dir: &Path) -> Result<Option<Db>> {
        let p = state_dir.join("state.db");
        if is_missing_or_empty(&p)? {
            refuse_orphans(state_dir, &p)?;
            return Ok(None);
        }
        // Where this process may write, a normal connection with writes
        // forbidden (query_only) shares the -shm with writers safely.
        if nix::unistd::access(state_dir, nix::unistd::AccessFlags::W_OK).is_ok()
            && nix::unistd::access(&p, nix::unistd::AccessFlags::W_OK).is_ok()
        {
            match Db::open_query_only(&p) {
                Ok(db) => return Ok(Some(db)),
                // A read-only mount answers W_OK for root: fall through.
                Err(e) if e.kind() == Kind::CantCreate || e.kind() == Kind::NoPerm => {}
                Err(e) => return Err(e),
            }
        }
        let db = match Db::open_ro(&p, false) {
            Ok(db) => db,
            // No -wal/-shm and no way to create them (read-only filesystem, or
            // a directory this user cannot write): nobody can be writing, so
            // the file can be read as immutable.
            Err(e) if e.kind() == Kind::CantCreate || e.kind() == Kind::NoPerm => Db::open_ro(&p, true)?,
            Err(e) => return Err(e),
        };
        Ok(Some(db))
    }

    /// Same as [`Db::open_read`]; kept for callers outside the store.
    pub fn open_existing(state_dir: &Path) -> Result<Option<Db>> {
        Db::open_read(state_dir)
    }

    fn open_query_only(path: &Path) -> Result<Db> {
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(path, flags).map_err(|e| db_error(path, e))?;
        conn.busy_timeout(Duration::from_secs(30)).map_err(|e| db_error(path, e))?;
        conn.pragma_update(None, "query_only", true).map_err(|e| db_error(path, e))?;
        Db::check_readable(conn, path)
    }

    /// The first reads, where a damaged file, a newer schema or a missing
    /// -shm show.
    fn check_readable(conn: Connection, path: &Path) -> Result<Db> {
        let have: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(|e| db_error(path, e))?;
        schema::check_version(have).map_err(|e| e.context(path.display()))?;
        conn.query_row("SELECT COUNT(*) FROM sqlite_master", [], |r| r.get::<_, i64>(0))
            .map_err(|e| db_error(path, e))?;
        Ok(Db { conn, path: path.to_path_buf() })
    }

    fn open_ro(path: &Path, immutable: bool) -> Result<Db> {
        let uri = format!("file:{}?mode=ro{}", uri_path(path), if immutable { "&immutable=1" } else { "" });
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_URI | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(&uri, flags).map_err(|e| db_error(path, e))?;
        conn.busy_timeout(Duration::from_secs(30)).map_err(|e| db_error(path, e))?;
        Db::check_readable(conn, path)
    }

    fn open_path(path: &Path) -> Result<Db> {
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_CREATE;
        let mut conn = Connection::open_with_flags(path, flags).map_err(|e| db_error(path, e))?;
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
        )
        .map_err(|e| db_error(path, e))?;
        // A damaged file shows here, named, before any migration touches it.
        conn.query_row("SELECT COUNT(*) FROM sqlite_master", [], |r| r.get::<_, i64>(0))
            .map_err(|e| db_error(path, e))?;
        let mut db = Db { conn, path: path.to_path_buf() };
        schema::migrate(&mut db.conn).map_err(|e| match e.kind() {
            Kind::Config => e.context(path.display()),
            _ => e.context(format!("migrating {}", path.display())),
        })?;
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

/// A migrated in-memory database with foreign keys on, for unit tests.
#[cfg(test)]
pub(crate) fn memory_db() -> Connection {
    let mut c = Connection::open_in_memory().expect("an in-memory database");
    c.execute_batch("PRAGMA foreign_keys=ON").expect("foreign keys on");
    schema::migrate(&mut c).expect("migrations apply");
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("thinimg-stamp-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("a scratch dir");
        d
    }

    #[test]
    fn a_stamp_changes_with_every_commit_and_not_with_reads() {
        let d = tmpdir("commits");
        assert_eq!(stamp(&d), None, "no database, no stamp");
        let db = Db::open(&d).unwrap();
        db.conn.execute("INSERT INTO meta (key, value) VALUES ('t', '0')", []).unwrap();
        drop(db);
        let s0 = stamp(&d).expect("a stamp");
        // Readers, however many times, change nothing.
        for _ in 0..3 {
            let r = Db::open_read(&d).unwrap().expect("the database");
            let _: i64 = r.conn.query_row("SELECT COUNT(*) FROM meta", [], |r| r.get(0)).unwrap();
            assert_eq!(stamp(&d).as_ref(), Some(&s0), "while a reader is open");
            drop(r);
            assert_eq!(stamp(&d).as_ref(), Some(&s0), "after a reader closed");
        }
        // Each commit does, with the connection open (the WAL grows or
        // restarts) and after it closed (checkpointed into the file).
        let mut seen = vec![s0];
        let db = Db::open(&d).unwrap();
        for i in 1..=3 {
            db.conn.execute("UPDATE meta SET value = ?1 WHERE key = 't'", [i.to_string()]).unwrap();
            let s = stamp(&d).expect("a stamp");
            assert!(!seen.contains(&s), "commit {i} left the stamp as it was");
            seen.push(s);
        }
        drop(db);
        let s = stamp(&d).expect("a stamp");
        assert!(!seen[..seen.len() - 1].contains(&s));
        // A restored copy (same content, another file) is another database.
        let copy = d.join("copy");
        std::fs::copy(d.join("state.db"), &copy).unwrap();
        std::fs::rename(&copy, d.join("state.db")).unwrap();
        assert_ne!(stamp(&d), Some(s));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
