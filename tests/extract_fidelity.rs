//! Fidelity against GNU tar on real data: the debootstrap rootfs and the
//! layered fixture buckets from scripts/make-fixtures, extracted by
//! `thinimg unpack` and by GNU tar (with whiteouts applied by hand for the
//! layered images), compared entry by entry: type, mode, owner, size,
//! content hash, link target, xattrs, mtime, hard-link count, device number.
//! Runs as root (ownership, devices).

mod extract_harness;

use extract_harness::require_root;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("build/fixtures")
}

fn need(p: &Path) {
    if !p.exists() {
        panic!("fixture {} is missing: run scripts/make-fixtures (as root) first", p.display());
    }
}

struct Dirs {
    base: PathBuf,
}

impl Dirs {
    fn new(tag: &str) -> Dirs {
        let base = extract_harness::scratch().join(format!("thinimg-fid-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(base.join("ours")).unwrap();
        std::fs::create_dir_all(base.join("gnu")).unwrap();
        Dirs { base }
    }
    fn ours(&self) -> PathBuf {
        self.base.join("ours")
    }
    fn gnu(&self) -> PathBuf {
        self.base.join("gnu")
    }
}

impl Drop for Dirs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

fn thinimg(dest: &Path, layers: &[PathBuf]) {
    let out = Command::new(extract_harness::bin())
        .arg("unpack")
        .arg("--dest")
        .arg(dest)
        .args(extract_harness::FULL)
        .args(layers)
        .output()
        .unwrap();
    assert!(out.status.success(), "thinimg unpack failed: {}", String::from_utf8_lossy(&out.stderr));
}

fn gnu_tar(dest: &Path, layer: &Path) {
    let out = Command::new("tar")
        .args(["--numeric-owner", "--same-owner", "-p", "--xattrs", "--xattrs-include=*", "--exclude=.wh.*"])
        .arg("-xf")
        .arg(layer)
        .arg("-C")
        .arg(dest)
        .output()
        .expect("GNU tar");
    assert!(out.status.success(), "GNU tar failed on {}: {}", layer.display(), String::from_utf8_lossy(&out.stderr));
}

/// The reference whiteout application: every whiteout of the layer first
/// (they act on lower layers only), then GNU tar extracts the rest.
fn apply_whiteouts(dest: &Path, layer: &Path) {
    let f = std::fs::File::open(layer).unwrap();
    let mut ar = tar::Archive::new(f);
    for e in ar.entries().unwrap() {
        let e = e.unwrap();
        let p = e.path().unwrap().into_owned();
        let Some(name) = p.file_name().map(|n| n.to_string_lossy().into_owned()) else { continue };
        let dir = dest.join(p.parent().unwrap_or(Path::new("")));
        if name == ".wh..wh..opq" {
            if let Ok(rd) = std::fs::read_dir(&dir) {
                for c in rd {
                    remove(&c.unwrap().path());
                }
            }
        } else if let Some(t) = name.strip_prefix(".wh.") {
            remove(&dir.join(t));
        }
    }
}

fn remove(p: &Path) {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p).unwrap(),
        Ok(_) => std::fs::remove_file(p).unwrap(),
        Err(_) => {}
    }
}

fn xattrs(p: &Path) -> Vec<(String, Vec<u8>)> {
    let cp = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let mut names = vec![0u8; 4096];
    // SAFETY: cp is NUL-terminated; names is valid for names.len() bytes.
    let n = unsafe { libc::llistxattr(cp.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if n <= 0 {
        return Vec::new();
    }
    names.truncate(n as usize);
    let mut out = Vec::new();
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let cn = std::ffi::CString::new(name).unwrap();
        let mut v = vec![0u8; 65536];
        // SAFETY: both strings NUL-terminated; v valid for v.len() bytes.
        let k = unsafe { libc::lgetxattr(cp.as_ptr(), cn.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
        if k >= 0 {
            v.truncate(k as usize);
            out.push((String::from_utf8_lossy(name).into_owned(), v));
        }
    }
    out.sort();
    out
}

/// Everything observable about a tree below its root (the root excluded).
fn describe(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let ft = m.file_type();
            let kind = if ft.is_dir() {
                stack.push(p.clone());
                "dir".to_string()
            } else if ft.is_symlink() {
                format!("symlink -> {:?}", std::fs::read_link(&p).unwrap())
            } else if ft.is_file() {
                let data = std::fs::read(&p).unwrap();
                format!("file size={} sha256={:x} nlink={}", m.len(), Sha256::digest(&data), m.nlink())
            } else {
                format!("special mode={:o} rdev={}", m.mode() & libc::S_IFMT, m.rdev())
            };
            let desc = format!(
                "{kind} mode={:o} uid={} gid={} mtime={}.{:09} xattrs={:?}",
                m.mode() & 0o7777,
                m.uid(),
                m.gid(),
                m.mtime(),
                m.mtime_nsec(),
                xattrs(&p)
            );
            out.insert(p.strip_prefix(root).unwrap().to_path_buf(), desc);
        }
    }
    out
}

fn compare(what: &str, ours: &Path, gnu: &Path) -> usize {
    let a = describe(ours);
    let b = describe(gnu);
    let mut diffs = Vec::new();
    for (p, d) in &b {
        match a.get(p) {
            None => diffs.push(format!("missing in thinimg's tree: {} ({d})", p.display())),
            Some(x) if x != d => diffs.push(format!("{}:\n  thinimg: {x}\n  gnu tar: {d}", p.display())),
            _ => {}
        }
    }
    for p in a.keys() {
        if !b.contains_key(p) {
            diffs.push(format!("only in thinimg's tree: {}", p.display()));
        }
    }
    assert!(
        diffs.is_empty(),
        "{what}: {} differences from GNU tar (first 20):\n{}",
        diffs.len(),
        diffs.iter().take(20).cloned().collect::<Vec<_>>().join("\n")
    );
    assert!(!b.is_empty(), "{what}: nothing was extracted");
    b.len()
}

#[test]
fn rootfs_matches_gnu_tar() {
    require_root();
    let tarball = fixtures().join("rootfs.tar");
    need(&tarball);
    let d = Dirs::new("rootfs");
    thinimg(&d.ours(), std::slice::from_ref(&tarball));
    gnu_tar(&d.gnu(), &tarball);
    let n = compare("rootfs.tar", &d.ours(), &d.gnu());
    assert!(n > 5000, "the rootfs has thousands of entries, saw {n}");
}

fn layered(bucket: &str) {
    let images = fixtures().join(bucket).join("images");
    need(&images);
    for family in ["golang", "node", "python"] {
        let layers: Vec<PathBuf> = (1..=5).map(|n| images.join(family).join(format!("{n}.tar"))).collect();
        for l in &layers {
            need(l);
        }
        let d = Dirs::new(&format!("{bucket}-{family}"));
        thinimg(&d.ours(), &layers);
        for l in &layers {
            apply_whiteouts(&d.gnu(), l);
            gnu_tar(&d.gnu(), l);
        }
        compare(&format!("{bucket}/{family}"), &d.ours(), &d.gnu());
        // What the layer plan promises, checked on our tree.
        let r = d.ours();
        assert_eq!(std::fs::read_link(r.join("usr/bin/X11")).unwrap(), Path::new("."));
        assert!(std::fs::symlink_metadata(r.join("etc/motd")).is_err(), "layer 3 whiteout");
        if family != "golang" {
            let names: Vec<String> = std::fs::read_dir(r.join("etc/apt/apt.conf.d"))
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            assert_eq!(names, vec!["+fixture".to_string()], "opaque dir keeps only this layer's entry");
        }
    }
}

#[test]
fn small_layered_bucket_matches_gnu_tar_with_whiteouts() {
    require_root();
    layered("bucket-small");
}

#[test]
fn layered_bucket_matches_gnu_tar_with_whiteouts() {
    require_root();
    layered("bucket");
}
