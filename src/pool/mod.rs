//! The thin pool, in one place. Files by what they hold:
//!
//! - `names.rs`: THE naming rule for the pool's dm devices (pool, build
//!   devices, activations, their prefix and node paths);
//! - `spec.rs`: the pool's parameters ([`PoolSpec`]), metadata sizing, loop
//!   files, block-device identity checks;
//! - `status.rs`: the kernel's status lines parsed ([`PoolStatus`], [`ThinStatus`]);
//! - `kernel.rs`: the pool in the kernel ([`Pool`]): assemble, find,
//!   create, thin devices, teardown;
//! - `manager.rs`: the pool as the database records it joined with the
//!   kernel ([`PoolManager`]): create, destroy, prepare (assemble after a
//!   reboot or create on first use), reactivate, thin ids, the dm lock.
//!
//! All but `manager.rs` are mechanisms: they never touch the database, the
//! pipeline or the command layer. `manager.rs` uses the store
//! (`store::thin_pool`), never the pipeline or the command layer.

pub mod kernel;
pub mod manager;
pub mod names;
pub mod spec;
pub mod status;

pub use kernel::{dm_name_of, node_numbers, Created, DevNode, Gone, Pool};
pub use manager::{CreateRequest, PoolManager, Prepared};
pub use names::Names;
pub use spec::{PoolKind, PoolSpec, DEFAULT_BLOCK_SECTORS};
pub use status::{DiscardMode, NoSpaceMode, PoolMode, PoolStatus, PoolUsage, ThinStatus};
