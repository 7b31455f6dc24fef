//! Operational plumbing: logging, the state-dir lock, signals, fault
//! injection, the retry policy, output helpers, hex and base64. Nothing
//! here knows about images or devices.

pub mod encode;
pub mod fault;
pub mod lock;
pub mod log;
pub mod output;
pub mod retry;
pub mod signals;

/// Lower the calling thread's CPU priority by `by` nice levels (never
/// raise it); threads it starts afterwards inherit the new value. For
/// background work that must not take CPU from the work the caller waits
/// for (a pull's downloads of later layers against its chain builds).
/// Best effort: a failure is logged and changes nothing else.
pub fn lower_thread_priority(by: i32) {
    // On Linux, PRIO_PROCESS with a thread id addresses that one thread.
    let tid = nix::unistd::gettid().as_raw() as libc::id_t;
    nix::errno::Errno::clear();
    // SAFETY: getpriority only reads the scheduling value of thread `tid`
    // (this thread); -1 is a valid value, told from an error by errno.
    let now = unsafe { libc::getpriority(libc::PRIO_PROCESS, tid) };
    if now == -1 && nix::errno::Errno::last_raw() != 0 {
        ::log::debug!("reading this thread's priority: {}", nix::errno::Errno::last());
        return;
    }
    let want = now.saturating_add(by).min(19);
    // SAFETY: setpriority only changes the nice value of thread `tid`
    // (this thread) to a value at or below its current priority.
    if want > now && unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, want) } != 0 {
        ::log::debug!("lowering this thread's priority to nice {want}: {}", nix::errno::Errno::last());
    }
}
