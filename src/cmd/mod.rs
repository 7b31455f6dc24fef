//! One function per command: read the invocation, call into the library,
//! print the result. No business logic lives here.

use crate::cli::Invocation;
use crate::error::{Error, Result};

pub mod unpack;

/// Run the command; `Ok(code)` is the exit code (0, or 1 for a partial sync).
pub fn dispatch(inv: &Invocation) -> Result<u8> {
    match inv.command.name {
        "unpack" => unpack::run(inv),
        other => Err(Error::software(format!("command '{other}' is not implemented in this build"))),
    }
}
