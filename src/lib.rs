//! thinimg: container images in S3 → devicemapper thin devices.
//!
//! Data flows one way: `cli` → `cmd` (one file per command, parsing only) →
//! `pipeline` (journaled steps) → the mechanisms (`fetch`, `extract`,
//! `dm`, `loopdev`, `pool`) → kernel and network. Mechanisms never call the
//! pipeline or the CLI and never touch the database, except the two files
//! that join a mechanism with its rows through `store`: the fetch driver
//! (`fetch/mod.rs`) and the pool's manager (`pool/manager.rs`). `store` and
//! `journal` own all SQL (`tests/layering.rs` checks all of this).

#[macro_use]
mod macros;

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
pub mod store;

pub use error::{Error, Kind, Result};
