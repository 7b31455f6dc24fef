//! One writer per state dir: an exclusive `flock` on `<state-dir>/lock`.
//!
//! The kernel releases the lock when the process dies, so there is no stale
//! lock to time out. The holder writes its pid and command line into the
//! file so a refused invocation can say who holds it. Read-only commands
//! never take it (SQLite WAL gives them a consistent snapshot).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::error::{Error, Kind, Result};

/// Held for as long as it lives.
pub struct StateLock {
    file: File,
}

fn try_flock(f: &File) -> std::io::Result<bool> {
    // SAFETY: flock on a valid, open fd owned by `f`; no memory is passed.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

impl StateLock {
    /// Take the lock, waiting up to `wait` if another instance holds it.
    pub fn acquire(state_dir: &Path, wait: Option<Duration>) -> Result<StateLock> {
        let path = state_dir.join("lock");
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io(format!("opening lock file {}", path.display()), e))?;
        let deadline = wait.map(|w| Instant::now() + w);
        let mut announced = false;
        loop {
            if try_flock(&file).map_err(|e| Error::io(format!("locking {}", path.display()), e))? {
                break;
            }
            let holder = holder_of(&mut file);
            match deadline {
                Some(d) if Instant::now() < d => {
                    crate::ops::signals::check()?;
                    if !announced {
                        log::info!("waiting for {holder} to release {}", path.display());
                        announced = true;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                _ => {
                    return Err(Error::new(
                        Kind::TempFail,
                        format!(
                            "another thinimg instance holds {} ({holder}); retry later or pass --wait SECONDS",
                            path.display()
                        ),
                    ))
                }
            }
        }
        let me = format!("pid {} ({})\n", std::process::id(), std::env::args().collect::<Vec<_>>().join(" "));
        let _ = file.set_len(0);
        let _ = file.rewind();
        let _ = file.write_all(me.as_bytes());
        let _ = file.flush();
        Ok(StateLock { file })
    }
}

impl Drop for StateLock {
    fn drop(&mut self) {
        let _ = self.file.set_len(0);
    }
}

fn holder_of(file: &mut File) -> String {
    let mut s = String::new();
    let _ = file.rewind();
    let _ = file.take(4096).read_to_string(&mut s);
    let s = s.trim();
    if s.is_empty() {
        "unknown holder".to_string()
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_is_refused_with_holder_then_granted_after_release() {
        let dir = std::env::temp_dir().join(format!("thinimg-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let a = StateLock::acquire(&dir, None).unwrap();
        // flock locks belong to the open file description, so a second open in
        // the same process conflicts just as another process would.
        let err = StateLock::acquire(&dir, None).err().unwrap();
        assert_eq!(err.kind(), Kind::TempFail);
        assert!(err.message().contains(&format!("pid {}", std::process::id())), "{}", err.message());
        drop(a);
        let _b = StateLock::acquire(&dir, Some(Duration::from_millis(200))).unwrap();
        std::fs::remove_dir_all(&dir).ok();
    }
}
