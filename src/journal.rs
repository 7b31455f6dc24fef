//! The journal: runs of named, idempotent steps, persisted in SQLite.
