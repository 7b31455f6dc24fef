//! One writer per state dir: an exclusive `flock` on `<state-dir>/lock`.
//!
//! The kernel releases the lock when the process dies, so there is no stale
//! lock to time out. The holder writes its pid and command line into the
//! file so a refused invocation can say who holds it. Read-only commands
//! never take it (SQLite WAL gives them a consistent snapshot).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use crate::error::{Error, Kind, Result};

/// Held for as long as it lives.
pub struct StateLock {
    file: Flock<File>,
}

impl StateLock {
    /// Take the lock, waiting up to `wait` if another instance holds it.
    pub fn acquire(state_dir: &Path, wait: Option<Duration>) -> Result<StateLock> {
        let path = state_dir.join("lock");
        // Never follow a symlink planted at the lock's path (its target
        // would be truncated and overwritten), and only lock a plain file.
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::ELOOP) => Error::new(
                    Kind::NoPerm,
                    format!("lock file {} is a symlink; refusing to follow it (remove it)", path.display()),
                ),
                _ => Error::io(format!("opening lock file {}", path.display()), e),
            })?;
        let meta = file.metadata().map_err(|e| Error::io(format!("stat {}", path.display()), e))?;
        if !meta.is_file() {
            return Err(Error::new(Kind::NoPerm, format!("lock file {} is not a regular file", path.display())));
        }
        let deadline = wait.map(|w| Instant::now() + w);
        let mut announced = false;
        let mut file = loop {
            file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(locked) => break locked,
                Err((f, Errno::EWOULDBLOCK)) => f,
                Err((_, e)) => return Err(Error::io(format!("locking {}", path.display()), e.into())),
            };
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
        };
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

/// `dir` made absolute against the current directory, and canonical
/// (symlinks resolved) when it can be resolved; a path that cannot (it
/// does not exist yet, or is not a directory) stays absolute, and the
/// command that uses it reports why.
pub fn absolute_dir(dir: &Path) -> std::io::Result<PathBuf> {
    let abs = std::path::absolute(dir)?;
    Ok(std::fs::canonicalize(&abs).unwrap_or(abs))
}

/// Like sshd's StrictModes: a root process trusts a state dir (its
/// database drives device creation and the zeroing of a metadata device)
/// only if root owns it and nobody else can write it.
pub fn check_state_dir_modes(state_dir: &Path) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    let m = match std::fs::symlink_metadata(state_dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(format!("stat state dir {}", state_dir.display()), e)),
    };
    let problem = if !m.is_dir() {
        Some("is not a directory".to_string())
    } else if m.uid() != 0 {
        Some(format!("is owned by uid {}, not by root", m.uid()))
    } else if m.mode() & 0o022 != 0 {
        Some(format!("is writable by group or others (mode {:o})", m.mode() & 0o7777))
    } else {
        None
    };
    match problem {
        None => Ok(()),
        Some(p) => Err(Error::new(
            Kind::NoPerm,
            format!(
                "refusing state dir {}: it {p}; running as root, it must be owned by root and not writable by group or others (chown root {0}; chmod go-w {0})",
                state_dir.display()
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_symlinked_lock_file_is_never_followed() {
        let dir = std::env::temp_dir().join(format!("thinimg-lock-sym-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let victim = dir.join("victim");
        std::fs::write(&victim, "precious").unwrap();
        std::os::unix::fs::symlink(&victim, dir.join("lock")).unwrap();
        let e = StateLock::acquire(&dir, None).err().expect("a symlinked lock must be refused");
        assert_eq!(e.kind(), Kind::NoPerm, "{e:?}");
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn strict_modes_for_root() {
        if !nix::unistd::geteuid().is_root() {
            return check_state_dir_modes(Path::new("/nonexistent")).unwrap();
        }
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("thinimg-modes-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        check_state_dir_modes(&dir).unwrap();
        for mode in [0o770, 0o757, 0o777] {
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = check_state_dir_modes(&dir).expect_err("a writable state dir must be refused");
            assert_eq!(e.kind(), Kind::NoPerm);
            assert!(e.message().contains("writable by group or others"), "{e:?}");
        }
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        nix::unistd::chown(&dir, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
        let e = check_state_dir_modes(&dir).expect_err("a state dir owned by another user must be refused");
        assert!(e.message().contains("owned by uid 65534"), "{e:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn dirs_become_absolute() {
        let a = absolute_dir(Path::new("some/rel/dir-that-does-not-exist")).unwrap();
        assert!(a.is_absolute() && a.ends_with("some/rel/dir-that-does-not-exist"), "{a:?}");
        assert_eq!(absolute_dir(Path::new(".")).unwrap(), std::fs::canonicalize(".").unwrap());
    }

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
