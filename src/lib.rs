//! thinimg: container images in S3 → devicemapper thin devices.
//!
//! Data flows one way: `cli` → `cmd` (one file per command, parsing only) →
//! `pipeline` (journaled steps) → the mechanisms (`fetch`, `extract`,
//! `dm`, `loopdev`, `pool`) → kernel and network. Mechanisms never call the
//! pipeline or the CLI and never touch the database; `store` and `journal`
//! own all SQL.

pub mod cli;
pub mod cmd;
pub mod dm;
pub mod error;
pub mod extract;
pub mod fetch;
pub mod journal;
pub mod loopdev;
pub mod magic;
pub mod ops;
pub mod pipeline;
pub mod pool;
pub mod poolctl;
pub mod store;

pub use error::{Error, Kind, Result};
