//! Fault injection for crash tests: `THINIMG_FAULT=POINT` makes the process
//! SIGKILL itself when it reaches POINT, exactly as `kill -9` would (no
//! destructors, no flushing). `THINIMG_FAULT_SKIP=N` lets the first N hits
//! pass. POINT is matched against `before:STEP`, `after:STEP` and named
//! points inside steps; a trailing `*` matches a prefix.
//! `THINIMG_FAULT=fail:POINT` instead makes a [`fail`] point return an error.
//! Unset, this costs one environment lookup per process.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

static SPEC: OnceLock<Option<(String, u64)>> = OnceLock::new();
static HITS: AtomicU64 = AtomicU64::new(0);

fn spec() -> &'static Option<(String, u64)> {
    SPEC.get_or_init(|| {
        let p = std::env::var("THINIMG_FAULT").ok().filter(|s| !s.is_empty())?;
        let skip = std::env::var("THINIMG_FAULT_SKIP").ok().and_then(|s| s.parse().ok()).unwrap_or(0);
        Some((p, skip))
    })
}

fn matches(pattern: &str, point: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => point.starts_with(prefix),
        None => pattern == point,
    }
}

/// Declare a crash point. If THINIMG_FAULT names it, the process dies here.
pub fn point(name: &str) {
    let Some((pat, skip)) = spec() else { return };
    if !matches(pat, name) {
        return;
    }
    let n = HITS.fetch_add(1, Ordering::SeqCst);
    if n < *skip {
        return;
    }
    eprintln!("thinimg: THINIMG_FAULT: killing self at {name}");
    // SIGKILL cannot be caught, so this does not return; abort if it failed.
    let _ = nix::sys::signal::kill(nix::unistd::Pid::this(), nix::sys::signal::Signal::SIGKILL);
    std::process::abort();
}

/// Declare a point that can be made to FAIL (not die): with
/// `THINIMG_FAULT=fail:PATTERN` matching `name`, it returns an I/O error,
/// so tests can make a cleanup path fail the way a busy mount would.
pub fn fail(name: &str) -> crate::error::Result<()> {
    let Some((pat, _)) = spec() else { return Ok(()) };
    match pat.strip_prefix("fail:") {
        Some(p) if matches(p, name) => {
            Err(crate::error::Error::new(crate::error::Kind::Io, format!("THINIMG_FAULT: injected failure at {name}")))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn pattern_matching() {
        assert!(super::matches("before:build*", "before:build:3"));
        assert!(super::matches("after:fetch", "after:fetch"));
        assert!(!super::matches("after:fetch", "after:fetch:1"));
    }
}
