//! SIGINT/SIGTERM handling: the handler only records the signal; long
//! operations poll [`pending`] at safe points (between steps, between
//! chunks, between tar entries) and unwind with [`interrupted_error`], so
//! the journal stays consistent and no device is left half-mounted. The
//! next invocation resumes. A second signal of the same kind while
//! unwinding restores the default action, so an operator can still force
//! an exit.

use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use crate::error::{Error, Kind, Result};

static PENDING: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    // Only async-signal-safe work here: an atomic store, and resetting the
    // disposition so a second signal terminates at once.
    PENDING.store(sig, Ordering::SeqCst);
    // SAFETY: signal(2) is async-signal-safe; SIG_DFL is a valid disposition.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
    }
}

/// Install the handlers (idempotent).
pub fn install() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: `on_signal` is an extern "C" fn that only performs
        // async-signal-safe operations; sa_mask is initialised by sigemptyset.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            sa.sa_flags = 0;
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

/// The signal received, if any.
pub fn pending() -> Option<i32> {
    match PENDING.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// The error to unwind with after a signal (exit 130 for SIGINT, 143 for SIGTERM).
pub fn interrupted_error() -> Error {
    match pending() {
        Some(libc::SIGTERM) => Error::new(Kind::Terminated, "terminated by SIGTERM; the next run resumes"),
        _ => Error::new(Kind::Interrupted, "interrupted by SIGINT; the next run resumes"),
    }
}

/// Return the interruption error if a signal arrived.
pub fn check() -> Result<()> {
    match pending() {
        Some(_) => Err(interrupted_error()),
        None => Ok(()),
    }
}

/// Sleep, waking early with an error if a signal arrives.
pub fn sleep(d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    loop {
        check()?;
        let now = Instant::now();
        if now >= end {
            return Ok(());
        }
        std::thread::sleep((end - now).min(Duration::from_millis(50)));
    }
}
