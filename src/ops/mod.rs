//! Operational plumbing: logging, the state-dir lock, signals, fault
//! injection, the retry policy, output helpers, hex and base64, direct
//! I/O for bulk bytes. Nothing
//! here knows about images or devices.

pub mod direct;
pub mod encode;
pub mod fault;
pub mod lock;
pub mod log;
pub mod output;
pub mod retry;
pub mod signals;
