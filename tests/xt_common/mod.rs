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
        panic!(
            "the extract tests must run as root (they chown, mknod and set setuid bits); run them with sudo or as root"
        );
    }
}

/// A sandbox: BASE/a/b/c/root is the image root; canaries sit at every
/// level above it, so a `../` escape of up to 4 levels lands next to one
/// and is seen by `check`.
pub struct Sandbox {
    pub base: PathBuf,
    pub root: PathBuf,
    /// Where test layers are written (a sibling of BASE, not watched).
    pub layers: PathBuf,
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
        let layers = base.with_extension("layers");
        let _ = std::fs::remove_dir_all(&layers);
        std::fs::create_dir_all(&layers).unwrap();
        let mut s = Sandbox { base, root, layers, before: BTreeMap::new() };
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

    /// Write a layer file and return its path.
    pub fn layer(&self, name: &str, bytes: &[u8]) -> PathBuf {
        write_layer(&self.layers, name, bytes)
    }

    /// Apply layers; returns (exit code, stderr).
    pub fn run(&self, layers: &[&PathBuf], extra: &[&str]) -> (i32, String) {
        let ps: Vec<&Path> = layers.iter().map(|p| p.as_path()).collect();
        let o = self.unpack(&ps, extra);
        (o.status.code().unwrap_or(-1), stderr(&o))
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
        let _ = std::fs::remove_dir_all(&self.layers);
    }
}

fn sanitize(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).take(40).collect()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A raw tar writer for hostile archives: any name, any size field.
#[derive(Default)]
pub struct TarW {
    pub buf: Vec<u8>,
}

fn octal(field: &mut [u8], v: u64) {
    let s = format!("{:0width$o}", v, width = field.len() - 1);
    let b = s.as_bytes();
    let b = &b[b.len().saturating_sub(field.len() - 1)..];
    field[..b.len()].copy_from_slice(b);
    field[field.len() - 1] = 0;
}

pub fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
    let body_len = key.len() + value.len() + 3;
    let mut n = body_len + 1;
    loop {
        let l = body_len + n.to_string().len();
        if l == n {
            break;
        }
        n = l;
    }
    let mut r = format!("{n} {key}=").into_bytes();
    r.extend_from_slice(value);
    r.push(b'\n');
    r
}

impl TarW {
    pub fn new() -> TarW {
        TarW::default()
    }

    /// One header block; names longer than the fields go in a PAX header first.
    #[allow(clippy::too_many_arguments)]
    pub fn header(
        &mut self,
        typeflag: u8,
        name: &[u8],
        link: &[u8],
        size: u64,
        mode: u32,
        uid: u64,
        gid: u64,
        dev: (u32, u32),
    ) {
        let mut pax = Vec::new();
        if name.len() > 100 {
            pax.extend(pax_record("path", name));
        }
        if link.len() > 100 {
            pax.extend(pax_record("linkpath", link));
        }
        if !pax.is_empty() {
            self.pax(&pax);
        }
        let mut h = [0u8; 512];
        let n = &name[..name.len().min(100)];
        h[..n.len()].copy_from_slice(n);
        octal(&mut h[100..108], u64::from(mode));
        octal(&mut h[108..116], uid);
        octal(&mut h[116..124], gid);
        octal(&mut h[124..136], size);
        octal(&mut h[136..148], 1_600_000_000);
        h[156] = typeflag;
        let l = &link[..link.len().min(100)];
        h[157..157 + l.len()].copy_from_slice(l);
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        octal(&mut h[329..337], u64::from(dev.0));
        octal(&mut h[337..345], u64::from(dev.1));
        self.block(h);
    }

    /// Append a header block, fixing its checksum.
    pub fn block(&mut self, mut h: [u8; 512]) {
        h[148..156].copy_from_slice(b"        ");
        let sum: u64 = h.iter().map(|&b| u64::from(b)).sum();
        let s = format!("{sum:06o}\0 ");
        h[148..156].copy_from_slice(s.as_bytes());
        self.buf.extend_from_slice(&h);
    }

    pub fn data(&mut self, d: &[u8]) {
        self.buf.extend_from_slice(d);
        let pad = (512 - d.len() % 512) % 512;
        self.buf.extend(std::iter::repeat_n(0u8, pad));
    }

    pub fn pax(&mut self, records: &[u8]) {
        let mut h = [0u8; 512];
        h[..11].copy_from_slice(b"PaxHeader/x");
        octal(&mut h[100..108], 0o644);
        octal(&mut h[124..136], records.len() as u64);
        h[156] = b'x';
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        self.block(h);
        self.data(records);
    }

    pub fn file(&mut self, name: &str, data: &[u8], mode: u32) -> &mut Self {
        self.header(b'0', name.as_bytes(), b"", data.len() as u64, mode, 0, 0, (0, 0));
        self.data(data);
        self
    }
    pub fn file_owned(&mut self, name: &str, data: &[u8], mode: u32, uid: u64, gid: u64) -> &mut Self {
        self.header(b'0', name.as_bytes(), b"", data.len() as u64, mode, uid, gid, (0, 0));
        self.data(data);
        self
    }
    pub fn dir(&mut self, name: &str, mode: u32) -> &mut Self {
        self.header(b'5', name.as_bytes(), b"", 0, mode, 0, 0, (0, 0));
        self
    }
    pub fn symlink(&mut self, name: &str, target: &str) -> &mut Self {
        self.header(b'2', name.as_bytes(), target.as_bytes(), 0, 0o777, 0, 0, (0, 0));
        self
    }
    pub fn hardlink(&mut self, name: &str, target: &str) -> &mut Self {
        self.header(b'1', name.as_bytes(), target.as_bytes(), 0, 0o644, 0, 0, (0, 0));
        self
    }
    pub fn finish(&mut self) -> Vec<u8> {
        let mut b = std::mem::take(&mut self.buf);
        b.extend(std::iter::repeat_n(0u8, 1024));
        b
    }
}

/// Write `bytes` to DIR/name and return the path.
pub fn write_layer(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}
