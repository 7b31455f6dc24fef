//! Helpers shared by the extract test targets: temp sandboxes with canary
//! files outside the root, running the built binary, root checks.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The binary under test. THINIMG_XT_BIN runs the tests against another
/// build (e.g. an older commit's, to show a regression test fails there).
pub fn bin() -> String {
    std::env::var("THINIMG_XT_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_thinimg").to_string())
}

/// These tests create devices, set owners and setuid bits: they need root.
/// They also unpack hostile archives, so every test that calls this runs
/// in its own sandbox: see [`enter_sandbox`].
pub fn require_root() {
    if nix::unistd::geteuid().as_raw() != 0 {
        panic!(
            "the extract tests must run as root (they chown, mknod and set setuid bits); run them with sudo or as root"
        );
    }
    enter_sandbox();
}

thread_local! {
    static SANDBOXED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// This process's scratch directory: a tmpfs inside each sandbox. Its own
/// directory under the temp dir, not the temp dir itself, so a checkout
/// under /tmp (a CI clone) stays visible, read-only, in the sandbox.
pub fn scratch() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("thinimg-xt-scratch-{}", std::process::id()))
}

/// Move the calling test thread (and every process it starts) into a
/// private mount namespace where every mount is read-only and the temp
/// directory is a fresh tmpfs: the only place a hostile archive could
/// write to. Each libtest test runs on its own thread, so each gets its
/// own namespace (unshare(CLONE_NEWNS) acts on the calling thread). Any
/// step that fails panics: a test never runs on the live host.
pub fn enter_sandbox() {
    if SANDBOXED.with(|s| s.get()) {
        return;
    }
    let fail = |what: &str, e: &dyn std::fmt::Display| -> ! {
        panic!("cannot build the test sandbox (private mount namespace, read-only host, tmpfs scratch): {what}: {e}")
    };
    // The scratch mount point is made on the host first (the host is
    // read-only from the next step on).
    if let Err(e) = std::fs::create_dir_all(scratch()) {
        fail(&format!("creating {}", scratch().display()), &e);
    }
    // SAFETY: unshare(2) with a constant flag; it only changes this
    // thread's namespace and fs_struct.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        fail("unshare(CLONE_NEWNS)", &std::io::Error::last_os_error());
    }
    use nix::mount::{mount, MsFlags};
    if let Err(e) = mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>) {
        fail("making / private", &e);
    }
    #[repr(C)]
    struct MountAttr {
        attr_set: u64,
        attr_clr: u64,
        propagation: u64,
        userns_fd: u64,
    }
    const MOUNT_ATTR_RDONLY: u64 = 1;
    const AT_RECURSIVE: libc::c_int = 0x8000;
    let attr = MountAttr { attr_set: MOUNT_ATTR_RDONLY, attr_clr: 0, propagation: 0, userns_fd: 0 };
    // SAFETY: mount_setattr(2) on "/" (a NUL-terminated literal) with a
    // properly sized, initialised struct mount_attr.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            c"/".as_ptr(),
            AT_RECURSIVE,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if r != 0 {
        fail("remounting every mount read-only (mount_setattr)", &std::io::Error::last_os_error());
    }
    let scratch = scratch();
    if let Err(e) = mount(Some("tmpfs"), &scratch, Some("tmpfs"), MsFlags::empty(), Some("mode=1777,size=4g")) {
        fail(&format!("mounting a tmpfs on {}", scratch.display()), &e);
    }
    // Prove it before any archive is touched.
    for probe in
        [Path::new("/root/.thinimg-xt-probe"), Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.thinimg-xt-probe"))]
    {
        match std::fs::write(probe, b"x") {
            Err(e) if e.raw_os_error() == Some(libc::EROFS) => {}
            Err(e) => fail(&format!("{} should be read-only", probe.display()), &e),
            Ok(()) => {
                let _ = std::fs::remove_file(probe);
                fail(&format!("{} is writable", probe.display()), &"the host is not read-only");
            }
        }
    }
    let ok = scratch.join(".thinimg-xt-probe");
    if let Err(e) = std::fs::write(&ok, b"x").and_then(|_| std::fs::remove_file(&ok)) {
        fail(&format!("the scratch tmpfs {} is not writable", scratch.display()), &e);
    }
    SANDBOXED.with(|s| s.set(true));
}

/// Whether the calling thread is inside the sandbox.
pub fn sandboxed() -> bool {
    SANDBOXED.with(|s| s.get())
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
        require_root();
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let base = scratch().join(format!("thinimg-xt-{}-{}-{}", std::process::id(), n, sanitize(tag)));
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
        // Full fidelity, layer after layer on the same root: what the
        // pipeline does (its mounts are nosuid,nodev). `unpack_plain` runs
        // the command's safe defaults.
        c.arg("unpack").arg("--dest").arg(&self.root).args(FULL).args(extra).args(layers);
        c.env("THINIMG_LOG", "error");
        c.output().unwrap()
    }
}

/// The flags that make `thinimg unpack` apply layers like the pipeline.
pub const FULL: &[&str] = &["--apply-on-top", "--keep-privileges", "--devices"];

impl Sandbox {
    /// `thinimg unpack` with its defaults (no FULL flags) into `dest`.
    pub fn unpack_plain(&self, dest: &Path, layers: &[&Path], extra: &[&str]) -> Output {
        let mut c = Command::new(bin());
        c.arg("unpack").arg("--dest").arg(dest).args(extra).args(layers);
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
        self.ext(b'x', records);
    }

    /// A global ('g') PAX header: its records apply to every later member.
    pub fn global(&mut self, records: &[u8]) {
        self.ext(b'g', records);
    }

    fn ext(&mut self, typeflag: u8, records: &[u8]) {
        let mut h = [0u8; 512];
        h[..11].copy_from_slice(b"PaxHeader/x");
        octal(&mut h[100..108], 0o644);
        octal(&mut h[124..136], records.len() as u64);
        h[156] = typeflag;
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
