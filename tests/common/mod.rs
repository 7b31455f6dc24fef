//! Helpers shared by the extract test targets: temp sandboxes with canary
//! files outside the root, running the built binary, root checks.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_thinimg")
}

/// These tests create devices, set owners and setuid bits: they need root.
pub fn require_root() {
    if nix::unistd::geteuid().as_raw() != 0 {
        panic!("the extract tests must run as root (they chown, mknod and set setuid bits); run them with sudo or as root");
    }
}

/// A sandbox: BASE/a/b/c/root is the image root; canaries sit at every
/// level above it, so a `../` escape of up to 4 levels lands next to one
/// and is seen by `check`.
pub struct Sandbox {
    pub base: PathBuf,
    pub root: PathBuf,
    before: BTreeMap<PathBuf, (u64, i64, i64)>,
}

/// Absolute host paths some archives aim at; none may appear.
pub const HOST_TARGETS: &[&str] = &[
    "/tmp/evil.txt",
    "/tmp/bb_test_evilfile",
    "/tmp/passwd",
    "/tmp/thinimg-escape",
    "/etc/thinimg-escape",
    "/file01",
    "/foo",
];

impl Sandbox {
    pub fn new(tag: &str) -> Sandbox {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let base = std::env::temp_dir().join(format!("thinimg-xt-{}-{}-{}", std::process::id(), n, sanitize(tag)));
        let _ = std::fs::remove_dir_all(&base);
        let deep = base.join("a/b/c");
        std::fs::create_dir_all(&deep).unwrap();
        for d in [base.clone(), base.join("a"), base.join("a/b"), deep.clone()] {
            std::fs::write(d.join("canary"), b"canary\n").unwrap();
        }
        let root = deep.join("root");
        // Created up front: its creation would change c's mtime.
        std::fs::create_dir(&root).unwrap();
        let mut s = Sandbox { base, root, before: BTreeMap::new() };
        s.before = s.snapshot();
        for t in HOST_TARGETS {
            assert!(std::fs::symlink_metadata(t).is_err(), "host path {t} exists before the test; remove it first");
        }
        s
    }

    /// Everything under BASE except the root: path -> (size, mtime, ctime).
    fn snapshot(&self) -> BTreeMap<PathBuf, (u64, i64, i64)> {
        let mut out = BTreeMap::new();
        let mut stack = vec![self.base.clone()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let e = e.unwrap();
                let p = e.path();
                if p == self.root {
                    continue;
                }
                let m = std::fs::symlink_metadata(&p).unwrap();
                out.insert(p.clone(), (m.size(), m.mtime(), m.ctime()));
                if m.is_dir() {
                    stack.push(p);
                }
            }
        }
        out
    }

    /// Nothing outside the root changed and no host target appeared.
    pub fn check(&self, what: &str) {
        let after = self.snapshot();
        assert_eq!(self.before, after, "{what}: something outside the root changed");
        for d in [self.base.clone(), self.base.join("a"), self.base.join("a/b"), self.base.join("a/b/c")] {
            assert_eq!(std::fs::read(d.join("canary")).unwrap(), b"canary\n", "{what}: canary changed");
        }
        for t in HOST_TARGETS {
            assert!(std::fs::symlink_metadata(t).is_err(), "{what}: host path {t} was created");
        }
    }

    pub fn unpack(&self, layers: &[&Path], extra: &[&str]) -> Output {
        let mut c = Command::new(bin());
        c.arg("unpack").arg("--dest").arg(&self.root).args(extra).args(layers);
        c.env("THINIMG_LOG", "error");
        c.output().unwrap()
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

fn sanitize(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).take(40).collect()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
