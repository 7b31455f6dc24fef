//! Generated hostile layers through `thinimg unpack`, as root, each in a
//! sandbox with canaries outside the root (checked after every case).

mod extract_harness;

use extract_harness::{pax_record, require_root, Sandbox, TarW};
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};

fn lstat(p: &Path) -> std::fs::Metadata {
    std::fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn assert_rejected(code: i32, err: &str, rule: &str) {
    assert_eq!(code, 65, "want exit 65 (rule {rule}), got {code}: {err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.contains(&format!("rule {rule}")), "want rule {rule}: {err}");
}

fn get_xattr(p: &Path, name: &str) -> Option<Vec<u8>> {
    let cp = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let cn = std::ffi::CString::new(name).unwrap();
    let mut buf = vec![0u8; 256];
    // SAFETY: both strings are NUL-terminated and live; buf is valid for buf.len() bytes.
    let n = unsafe { libc::lgetxattr(cp.as_ptr(), cn.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return None;
    }
    buf.truncate(n as usize);
    Some(buf)
}

#[test]
fn setuid_setgid_sticky_owner_and_capability_survive() {
    require_root();
    let sb = Sandbox::new("setuid");
    // v2 file capability: cap_net_raw (13) permitted + effective.
    let mut cap = Vec::new();
    for w in [0x0200_0001u32, 1 << 13, 0, 0, 0] {
        cap.extend_from_slice(&w.to_le_bytes());
    }
    let mut t = TarW::new();
    t.dir("usr/", 0o755).dir("usr/bin/", 0o755);
    t.file_owned("usr/bin/su", b"su\n", 0o4755, 0, 0);
    t.file_owned("usr/bin/agent", b"agent\n", 0o2755, 0, 65534);
    t.header(b'5', b"tmp/", b"", 0, 0o1777, 0, 0, (0, 0));
    t.pax(&pax_record("SCHILY.xattr.security.capability", &cap));
    t.file_owned("usr/bin/ping", b"ping\n", 0o755, 1000, 1000);
    t.file_owned("home/u/f", b"x", 0o640, 123456, 654321);
    let l = sb.layer("1.tar", &t.finish());
    let (code, err) = sb.run(&[&l], &[]);
    assert_eq!(code, 0, "{err}");
    let r = &sb.root;
    assert_eq!(lstat(&r.join("usr/bin/su")).mode() & 0o7777, 0o4755);
    let agent = lstat(&r.join("usr/bin/agent"));
    assert_eq!((agent.mode() & 0o7777, agent.gid()), (0o2755, 65534));
    assert_eq!(lstat(&r.join("tmp")).mode() & 0o7777, 0o1777);
    let ping = lstat(&r.join("usr/bin/ping"));
    assert_eq!((ping.uid(), ping.gid(), ping.mode() & 0o7777), (1000, 1000, 0o755));
    assert_eq!(get_xattr(&r.join("usr/bin/ping"), "security.capability"), Some(cap), "capability set after chown");
    let f = lstat(&r.join("home/u/f"));
    assert_eq!((f.uid(), f.gid()), (123456, 654321), "numeric ids, no name lookup");
    // A capability the kernel cannot parse is the layer's fault (exit 65).
    let mut t = TarW::new();
    t.pax(&pax_record("SCHILY.xattr.security.capability", b"bad"));
    t.file("badcap", b"x", 0o755);
    let bad = sb.layer("badcap.tar", &t.finish());
    let (code, err) = sb.run(&[&bad], &[]);
    assert_rejected(code, &err, "xattr-value");
    // Implicit parents exist as 0755 dirs.
    assert_eq!(lstat(&r.join("home/u")).mode() & 0o7777, 0o755);
    sb.check("setuid");
}

#[test]
fn dotdot_and_absolute_hardlink_targets() {
    require_root();
    let sb = Sandbox::new("hl-targets");
    let mut t = TarW::new();
    t.file("a", b"a", 0o644).hardlink("h", "../canary");
    let l = sb.layer("dotdot.tar", &t.finish());
    let (code, err) = sb.run(&[&l], &[]);
    assert_rejected(code, &err, "path-escape");
    assert!(err.contains("layer dotdot.tar") && err.contains("entry \"h\""), "{err}");
    sb.check("hardlink ../");

    // An absolute target names the file inside the root, never the host's.
    let mut t = TarW::new();
    t.dir("etc/", 0o755).file("etc/passwd", b"in-root\n", 0o644).hardlink("pw", "/etc/passwd");
    let l = sb.layer("abs.tar", &t.finish());
    let (code, err) = sb.run(&[&l], &[]);
    assert_eq!(code, 0, "{err}");
    let a = lstat(&sb.root.join("pw"));
    assert_eq!(a.ino(), lstat(&sb.root.join("etc/passwd")).ino());
    assert_ne!(a.ino(), lstat(Path::new("/etc/passwd")).ino());
    // Absolute target missing in the root: refused, not resolved on the host.
    let mut t = TarW::new();
    t.hardlink("shadow", "/etc/shadow");
    let l = sb.layer("abs2.tar", &t.finish());
    let (code, err) = sb.run(&[&l], &[]);
    assert_rejected(code, &err, "hardlink-target");
    sb.check("hardlink absolute");
}

#[test]
fn hardlink_to_a_symlink_pointing_outside_stays_a_symlink() {
    require_root();
    let sb = Sandbox::new("hl-symlink");
    let mut t = TarW::new();
    t.symlink("s", "../../../canary").hardlink("h", "s").file("h2", b"data", 0o644);
    let l = sb.layer("1.tar", &t.finish());
    let (code, err) = sb.run(&[&l], &[]);
    assert_eq!(code, 0, "{err}");
    let h = lstat(&sb.root.join("h"));
    assert!(h.file_type().is_symlink());
    assert_eq!(std::fs::read_link(sb.root.join("h")).unwrap(), Path::new("../../../canary"));
    // A later layer writing a file at h replaces the link, never writes through it.
    let mut t = TarW::new();
    t.file("h", b"overwrite\n", 0o644);
    let l2 = sb.layer("2.tar", &t.finish());
    let (code, err) = sb.run(&[&l2], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(lstat(&sb.root.join("h")).is_file());
    sb.check("hardlink to symlink");
}

#[test]
fn malformed_whiteout_names_are_refused() {
    require_root();
    for (name, rule) in [
        (".wh..", "whiteout-name"),
        (".wh.", "whiteout-name"),
        ("d/.wh...", "whiteout-name"),
        ("../.wh.x", "path-escape"),
        (".wh..wh.plnk", "whiteout-name"),
    ] {
        let sb = Sandbox::new(name);
        let mut t = TarW::new();
        t.file("keep", b"k", 0o644).file(name, b"", 0o644);
        let l = sb.layer("wh.tar", &t.finish());
        let (code, err) = sb.run(&[&l], &[]);
        assert_rejected(code, &err, rule);
        sb.check(name);
    }
}

#[test]
fn symlink_loops_and_long_chains_are_refused_by_the_kernel() {
    require_root();
    let sb = Sandbox::new("loops");
    let mut t = TarW::new();
    t.symlink("a", "b").symlink("b", "a").file("a/x", b"x", 0o644);
    let l = sb.layer("loop.tar", &t.finish());
    let (code, err) = sb.run(&[&l], &[]);
    assert_rejected(code, &err, "symlink-loop");
    sb.check("loop");

    let sb = Sandbox::new("selfloop");
    let mut t = TarW::new();
    t.dir("usr/bin/", 0o755).symlink("usr/bin/X11", ".").file("usr/bin/X11/X11/X11/xterm", b"x", 0o755);
    let l = sb.layer("self.tar", &t.finish());
    let (code, err) = sb.run(&[&l], &[]);
    assert_eq!(code, 0, "usr/bin/X11 -> . resolves to usr/bin: {err}");
    assert!(lstat(&sb.root.join("usr/bin/xterm")).is_file());
    sb.check("self loop");

    // 60 chained symlinks exceed the kernel's 40-link budget.
    let sb = Sandbox::new("chain");
    let mut t = TarW::new();
    t.dir("d/", 0o755);
    for i in 0..60 {
        let target = if i == 59 { "d".to_string() } else { format!("s{}", i + 1) };
        t.symlink(&format!("s{i}"), &target);
    }
    t.file("s0/x", b"x", 0o644);
    // A PATH_MAX-long target is stored verbatim.
    let long = "a/".repeat(2040) + "z";
    t.symlink("long", &long);
    let l = sb.layer("chain.tar", &t.finish());
    let (code, err) = sb.run(&[&l], &[]);
    assert_rejected(code, &err, "symlink-loop");
    sb.check("chain");

    let sb = Sandbox::new("longtarget");
    let mut t = TarW::new();
    t.symlink("long", &long).file("after", b"x", 0o644);
    let l = sb.layer("long.tar", &t.finish());
    let (code, err) = sb.run(&[&l], &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(std::fs::read_link(sb.root.join("long")).unwrap().as_os_str().len(), long.len());
    sb.check("long target");
}

#[test]
fn symlink_then_same_name_directory_then_chmod_stays_inside() {
    require_root();
    let sb = Sandbox::new("cve-33056");
    let outside = sb.base.join("a/b");
    let mode_before = lstat(&outside).mode();
    let mut t = TarW::new();
    t.symlink("d", "../..").dir("d/", 0o777).dir("d", 0o700).file("d/f", b"f", 0o644);
    let l = sb.layer("1.tar", &t.finish());
    let (code, err) = sb.run(&[&l], &[]);
    assert_eq!(code, 0, "{err}");
    let d = lstat(&sb.root.join("d"));
    assert!(d.is_dir(), "the symlink was replaced by a real directory");
    assert_eq!(d.mode() & 0o7777, 0o700);
    assert_eq!(lstat(&outside).mode(), mode_before, "mode outside unchanged");
    assert!(lstat(&sb.root.join("d/f")).is_file());
    sb.check("symlink/dir/chmod");

    // Same through an absolute target, over two layers.
    let sb = Sandbox::new("cve-33056-abs");
    let mut t = TarW::new();
    t.symlink("etc", "/etc");
    let l1 = sb.layer("1.tar", &t.finish());
    let mut t = TarW::new();
    t.dir("etc", 0o777).file("etc/thinimg-escape", b"x", 0o644);
    let l2 = sb.layer("2.tar", &t.finish());
    let host_etc = lstat(Path::new("/etc")).mode();
    let (code, err) = sb.run(&[&l1, &l2], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(lstat(&sb.root.join("etc")).is_dir());
    assert_eq!(lstat(Path::new("/etc")).mode(), host_etc);
    sb.check("abs symlink then dir");
}

#[test]
fn file_replaced_by_symlink_then_written_through() {
    require_root();
    let sb = Sandbox::new("replace");
    let mut t = TarW::new();
    t.dir("etc/", 0o755).dir("tmp/", 0o1777).file("etc/conf", b"v1\n", 0o644);
    let l1 = sb.layer("1.tar", &t.finish());
    let mut t = TarW::new();
    t.symlink("etc/conf", "../../../../canary").symlink("etc/tmp", "/tmp");
    let l2 = sb.layer("2.tar", &t.finish());
    let mut t = TarW::new();
    t.file("etc/conf", b"v3\n", 0o600).file("etc/tmp/thinimg-escape", b"in root\n", 0o644);
    let l3 = sb.layer("3.tar", &t.finish());
    let (code, err) = sb.run(&[&l1, &l2, &l3], &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(std::fs::read(sb.root.join("etc/conf")).unwrap(), b"v3\n");
    assert!(lstat(&sb.root.join("etc/conf")).is_file());
    assert_eq!(
        std::fs::read(sb.root.join("tmp/thinimg-escape")).unwrap(),
        b"in root\n",
        "absolute symlink resolved in the root"
    );
    sb.check("replace + write through");
}

#[test]
fn entries_replace_other_types() {
    require_root();
    let sb = Sandbox::new("types");
    let mut t = TarW::new();
    t.dir("a/", 0o755).file("a/x", b"x", 0o644).file("b", b"b", 0o644).symlink("c", "a").file("d", b"d", 0o644);
    t.header(b'6', b"p", b"", 0, 0o644, 0, 0, (0, 0));
    t.header(b'3', b"null", b"", 0, 0o666, 0, 0, (1, 3));
    let l1 = sb.layer("1.tar", &t.finish());
    let mut t = TarW::new();
    t.file("a", b"now a file", 0o644).dir("b/", 0o750).dir("c/", 0o755).symlink("d", "b").file("p", b"p", 0o644);
    let l2 = sb.layer("2.tar", &t.finish());
    let (code, err) = sb.run(&[&l1, &l2], &[]);
    assert_eq!(code, 0, "{err}");
    let r = &sb.root;
    assert!(lstat(&r.join("a")).is_file());
    assert_eq!(lstat(&r.join("b")).mode() & 0o7777, 0o750);
    assert!(lstat(&r.join("c")).is_dir());
    assert!(lstat(&r.join("d")).file_type().is_symlink());
    assert!(lstat(&r.join("p")).is_file());
    let null = lstat(&r.join("null"));
    assert!(null.file_type().is_char_device());
    assert_eq!(null.rdev(), libc::makedev(1, 3));
    // A device number Linux cannot represent is the archive's fault.
    let mut t = TarW::new();
    t.header(b'4', b"bad", b"", 0, 0o600, 0, 0, (5000, 1));
    let l3 = sb.layer("3.tar", &t.finish());
    let (code, err) = sb.run(&[&l3], &[]);
    assert_rejected(code, &err, "device-number");
    sb.check("types");
}

/// Stream a generated archive to `thinimg unpack ... /dev/stdin`.
fn unpack_stream(sb: &Sandbox, extra: &[&str], gen: impl FnOnce(&mut dyn Write) + Send + 'static) -> (i32, String) {
    let mut child = Command::new(extract_harness::bin())
        .arg("unpack")
        .arg("--dest")
        .arg(&sb.root)
        .args(extract_harness::FULL)
        .args(extra)
        .arg("/dev/stdin")
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let w = std::thread::spawn(move || gen(&mut stdin));
    let out = child.wait_with_output().unwrap();
    let _ = w.join();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn empty_entries(n: usize, w: &mut dyn Write) {
    let mut t = TarW::new();
    for i in 0..n {
        // Whiteouts of absent names: cheap entries that touch nothing.
        t.header(b'0', format!("d/.wh.{}", i % 1000).as_bytes(), b"", 0, 0o644, 0, 0, (0, 0));
        if t.buf.len() >= 1 << 20 {
            if w.write_all(&t.buf).is_err() {
                return;
            }
            t.buf.clear();
        }
    }
    let _ = w.write_all(&t.finish());
}

#[test]
fn a_million_empty_entries() {
    require_root();
    // A million entries streamed: the default limit would take them all
    // (slowly, in a debug build); a low limit stops the stream early and cleanly.
    let sb = Sandbox::new("million-limit");
    let (code, err) = unpack_stream(&sb, &["--max-entries", "1000"], |w| empty_entries(1_000_000, w));
    assert_rejected(code, &err, "entry-count");
    assert!(err.contains("--max-entries 1000"), "{err}");
    sb.check("million with low limit");
    // Exactly at the limit is accepted; one more is not.
    let sb = Sandbox::new("limit-ok");
    let (code, err) = unpack_stream(&sb, &["--max-entries", "5000"], |w| empty_entries(5000, w));
    assert_eq!(code, 0, "exactly the limit is accepted: {err}");
    let (code, err) = unpack_stream(&sb, &["--max-entries", "5000"], |w| empty_entries(5001, w));
    assert_rejected(code, &err, "entry-count");
    sb.check("limit");
}

fn gnu_sparse(name: &str, real: u64, segs: &[(u64, u64)]) -> Vec<u8> {
    let stored: u64 = segs.iter().map(|s| s.1).sum();
    gnu_sparse_data(name, real, segs, &vec![b'x'; stored as usize])
}

/// A GNU old-style sparse file whose stored segments hold `data`, in order.
fn gnu_sparse_data(name: &str, real: u64, segs: &[(u64, u64)], data: &[u8]) -> Vec<u8> {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    // Octal when it fits, GNU base-256 otherwise (a terabyte does not).
    let oct = |f: &mut [u8], v: u64| {
        let s = format!("{:0w$o}", v, w = f.len() - 1);
        if s.len() < f.len() {
            f[..s.len()].copy_from_slice(s.as_bytes());
        } else {
            f.fill(0);
            let n = f.len();
            f[n - 8..].copy_from_slice(&v.to_be_bytes());
            f[0] = 0x80;
        }
    };
    oct(&mut h[100..108], 0o644);
    oct(&mut h[108..116], 0);
    oct(&mut h[116..124], 0);
    let stored: u64 = segs.iter().map(|s| s.1).sum();
    oct(&mut h[124..136], stored);
    oct(&mut h[136..148], 1_600_000_000);
    h[156] = b'S';
    h[257..265].copy_from_slice(b"ustar  \0");
    for (i, &(o, l)) in segs.iter().enumerate().take(4) {
        oct(&mut h[386 + i * 24..398 + i * 24], o);
        oct(&mut h[398 + i * 24..410 + i * 24], l);
    }
    oct(&mut h[483..495], real);
    assert_eq!(stored, data.len() as u64);
    let mut t = TarW::new();
    t.block(h);
    t.data(data);
    t.finish()
}

#[test]
fn sparse_segments_land_at_their_offsets() {
    // Segments larger than a writer chunk (256 KiB), and small ones after
    // them: each must be read to its own length, no further, and land at
    // its own offset (a reader that filled whole buffers took the next
    // segment's bytes and failed as truncated).
    require_root();
    let sb = Sandbox::new("sparse-segs");
    let segs: [(u64, u64, u8); 4] =
        [(0, 300_000, b'a'), (1 << 20, 7, b'b'), (3 << 20, 600_000, b'c'), (5 << 20, 3, b'd')];
    let real = (5 << 20) + 4096;
    let mut data = Vec::new();
    for &(_, len, fill) in &segs {
        data.extend(std::iter::repeat_n(fill, len as usize));
    }
    let map: Vec<(u64, u64)> = segs.iter().map(|&(o, l, _)| (o, l)).collect();
    let l = sb.layer("segs.tar", &gnu_sparse_data("holes", real, &map, &data));
    let (code, err) = sb.run(&[&l], &[]);
    assert_eq!(code, 0, "{err}");
    let got = std::fs::read(sb.root.join("holes")).unwrap();
    assert_eq!(got.len() as u64, real);
    let mut want = vec![0u8; real as usize];
    for &(off, len, fill) in &segs {
        want[off as usize..(off + len) as usize].fill(fill);
    }
    assert!(
        got == want,
        "the file's bytes differ from its segments at {:?}",
        got.iter().zip(&want).position(|(a, b)| a != b)
    );
}

#[test]
fn sparse_file_declaring_a_terabyte() {
    require_root();
    let tb = 1u64 << 40;
    let sb = Sandbox::new("sparse-tb");
    let l = sb.layer("tb.tar", &gnu_sparse("big", tb, &[(0, 4), (tb - 4, 4)]));
    let (code, err) = sb.run(&[&l], &[]);
    assert_rejected(code, &err, "file-size");
    assert!(std::fs::symlink_metadata(sb.root.join("big")).is_err(), "refused before anything was created");
    let (code, err) = sb.run(&[&l], &["--max-file-size", "2T"]);
    assert_eq!(code, 0, "{err}");
    let m = lstat(&sb.root.join("big"));
    assert_eq!(m.len(), tb);
    assert!(m.blocks() < 1024, "holes kept: {} blocks", m.blocks());
    let mut f = std::fs::File::open(sb.root.join("big")).unwrap();
    use std::io::{Read, Seek, SeekFrom};
    f.seek(SeekFrom::Start(tb - 4)).unwrap();
    let mut b = [0u8; 4];
    f.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"xxxx");
    // A map that claims more bytes than are stored is a lie.
    let l = sb.layer("lie.tar", &{
        let mut v = gnu_sparse("lie", 100, &[(0, 4)]);
        v[124..136].copy_from_slice(b"00000000002\0");
        let mut h = [0u8; 512];
        h.copy_from_slice(&v[..512]);
        let mut t = TarW::new();
        t.block(h);
        t.data(b"xx");
        t.finish()
    });
    let (code, err) = sb.run(&[&l], &[]);
    assert_rejected(code, &err, "sparse-map");
    sb.check("sparse");
}

#[test]
fn truncated_data_and_headers() {
    require_root();
    let sb = Sandbox::new("truncated");
    let mut t = TarW::new();
    t.header(b'0', b"f", b"", 1000, 0o644, 0, 0, (0, 0));
    t.buf.extend_from_slice(b"only ten b");
    let l = sb.layer("t1.tar", &t.buf.clone());
    let (code, err) = sb.run(&[&l], &[]);
    assert_rejected(code, &err, "truncated");
    let mut t = TarW::new();
    t.file("ok", b"fine", 0o644);
    let mut b = t.buf.clone();
    b.extend_from_slice(&[b'x'; 100]);
    let l = sb.layer("t2.tar", &b);
    let (code, err) = sb.run(&[&l], &[]);
    assert_eq!(code, 65, "{err}");
    // Declared 16 GiB, nothing present: the size limit answers first.
    let mut t = TarW::new();
    t.pax(&pax_record("size", b"17179869184"));
    t.header(b'0', b"huge", b"", 0, 0o644, 0, 0, (0, 0));
    let l = sb.layer("t3.tar", &t.buf.clone());
    let (code, err) = sb.run(&[&l], &[]);
    assert_rejected(code, &err, "file-size");
    let (code, err) = sb.run(&[&l], &["--max-file-size", "32G"]);
    assert_rejected(code, &err, "truncated");
    sb.check("truncated");
}

#[test]
fn pax_header_bombs() {
    require_root();
    let sb = Sandbox::new("pax-bomb");
    // A PAX header declaring 1 GiB: refused from the size field alone,
    // before a byte of it is read or allocated.
    let mut h = [0u8; 512];
    h[..11].copy_from_slice(b"PaxHeader/x");
    h[100..108].copy_from_slice(b"0000644\0");
    h[124..136].copy_from_slice(b"10000000000\0");
    h[156] = b'x';
    h[257..263].copy_from_slice(b"ustar\0");
    let mut t = TarW::new();
    t.block(h);
    let l = sb.layer("bomb1.tar", &t.buf.clone());
    let (code, err) = sb.run(&[&l], &[]);
    assert_rejected(code, &err, "header-size");
    // Many small extension headers for one member add up.
    let mut t = TarW::new();
    let rec = pax_record("comment", &vec![b'c'; 60_000]);
    for _ in 0..40 {
        t.pax(&rec);
    }
    t.file("f", b"x", 0o644);
    let l = sb.layer("bomb2.tar", &t.finish());
    let (code, err) = sb.run(&[&l], &[]);
    assert_eq!(code, 65, "{err}");
    assert!(err.contains("rule header-size"), "{err}");
    // A lower --max-header-size is honoured.
    let mut t = TarW::new();
    t.pax(&pax_record("comment", &vec![b'c'; 5000]));
    t.file("f", b"x", 0o644);
    let l = sb.layer("bomb3.tar", &t.finish());
    let (code, err) = sb.run(&[&l], &["--max-header-size", "4K"]);
    assert_rejected(code, &err, "header-size");
    let (code, err) = sb.run(&[&l], &[]);
    assert_eq!(code, 0, "{err}");
    // Path length and depth limits.
    let mut t = TarW::new();
    t.file(&"d/".repeat(200), b"", 0o644);
    let l = sb.layer("deep.tar", &t.finish());
    let (code, err) = sb.run(&[&l], &[]);
    assert_rejected(code, &err, "path-depth");
    let mut t = TarW::new();
    t.file(&"n".repeat(5000), b"", 0o644);
    let l = sb.layer("long.tar", &t.finish());
    let (code, err) = sb.run(&[&l], &[]);
    assert_rejected(code, &err, "path-length");
    sb.check("pax bombs");
}

#[test]
fn opaque_marker_acts_on_lower_layers_only_wherever_it_sits() {
    require_root();
    let sb = Sandbox::new("opaque");
    let mut t = TarW::new();
    t.dir("d/", 0o755).file("d/old", b"old", 0o644).dir("d/sub/", 0o755).file("d/sub/deep", b"x", 0o644);
    t.dir("e/", 0o755).file("e/old", b"old", 0o644);
    let l1 = sb.layer("1.tar", &t.finish());
    let mut t = TarW::new();
    // Marker after this layer's own entries in d; before them in e.
    t.dir("d/", 0o755).file("d/+new", b"new", 0o644).dir("d/sub/", 0o755).file("d/sub/mine", b"m", 0o644);
    t.file("d/.wh..wh..opq", b"", 0o644);
    t.file("e/.wh..wh..opq", b"", 0o644).file("e/zz", b"zz", 0o644);
    let l2 = sb.layer("2.tar", &t.finish());
    let (code, err) = sb.run(&[&l1, &l2], &[]);
    assert_eq!(code, 0, "{err}");
    let names = |p: &str| {
        let mut v: Vec<String> = std::fs::read_dir(sb.root.join(p))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names("d"), vec!["+new", "sub"]);
    assert_eq!(names("d/sub"), vec!["mine"], "lower content of a re-declared subdirectory is hidden too");
    assert_eq!(names("e"), vec!["zz"]);
    sb.check("opaque");
}

#[test]
fn whiteout_of_a_lower_directory() {
    require_root();
    let sb = Sandbox::new("wh-dir");
    let mut t = TarW::new();
    t.dir("x/", 0o755).file("x/a", b"a", 0o644).dir("x/b/", 0o755).file("x/b/c", b"c", 0o644);
    t.dir("y/", 0o755).file("y/a", b"a", 0o644).file("z", b"z", 0o644);
    let l1 = sb.layer("1.tar", &t.finish());
    let mut t = TarW::new();
    // x: removed entirely. y: this layer's y/new comes BEFORE the whiteout
    // and must survive it. z: whiteout of a file.
    t.file(".wh.x", b"", 0o644).file("y/new", b"n", 0o644).file(".wh.y", b"", 0o644).file(".wh.z", b"", 0o644);
    t.file(".wh.absent", b"", 0o644);
    let l2 = sb.layer("2.tar", &t.finish());
    let (code, err) = sb.run(&[&l1, &l2], &["--json"]);
    assert_eq!(code, 0, "{err}");
    assert!(std::fs::symlink_metadata(sb.root.join("x")).is_err());
    assert!(std::fs::symlink_metadata(sb.root.join("z")).is_err());
    assert!(std::fs::symlink_metadata(sb.root.join("y/a")).is_err());
    assert!(lstat(&sb.root.join("y/new")).is_file());
    assert!(std::fs::symlink_metadata(sb.root.join(".wh.x")).is_err(), "markers are not created");
    sb.check("whiteout dir");
}

#[test]
fn big_files_hard_links_and_metadata_wait_for_data() {
    require_root();
    let sb = Sandbox::new("pool");
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let mut t = TarW::new();
    t.file_owned("big", &big, 0o4750, 1000, 1000).hardlink("big-link", "big");
    for i in 0..200 {
        t.file(&format!("small/{i}"), format!("{i}").as_bytes(), 0o600);
    }
    // The same path again: the later entry wins; the earlier pending write
    // went to the earlier inode.
    t.file("big", b"replaced", 0o644);
    let l = sb.layer("1.tar", &t.finish());
    let (code, err) = sb.run(&[&l], &["--jobs", "4"]);
    assert_eq!(code, 0, "{err}");
    let link = lstat(&sb.root.join("big-link"));
    assert_eq!(std::fs::read(sb.root.join("big-link")).unwrap(), big);
    assert_eq!((link.mode() & 0o7777, link.uid(), link.mtime()), (0o4750, 1000, 1_600_000_000));
    assert_eq!(std::fs::read(sb.root.join("big")).unwrap(), b"replaced");
    for i in [0, 57, 199] {
        assert_eq!(std::fs::read(sb.root.join(format!("small/{i}"))).unwrap(), format!("{i}").as_bytes());
    }
    assert_eq!(std::fs::metadata(sb.root.join("small/3")).unwrap().permissions().mode() & 0o777, 0o600);
    sb.check("pool");
}

#[test]
fn dotdot_entry_is_one_line_naming_layer_entry_rule() {
    require_root();
    let sb = Sandbox::new("dotdot");
    let mut t = TarW::new();
    t.file("ok", b"ok", 0o644).file("usr/../../x", b"x", 0o644);
    let l = sb.layer("3.tar", &t.finish());
    let (code, err) = sb.run(&[&l], &[]);
    assert_rejected(code, &err, "path-escape");
    assert!(err.contains("layer 3.tar: entry \"usr/../../x\": rule path-escape"), "{err}");
    assert!(err.contains("1 entries of the rejected layer were applied"), "{err}");
    sb.check("dotdot");
}

#[test]
fn compressed_and_garbage_layers_are_refused_up_front() {
    require_root();
    let sb = Sandbox::new("garbage");
    for (name, bytes, rule, word) in [
        ("g.tar", vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0], "compressed", "gzip"),
        ("z.tar", vec![0x28, 0xb5, 0x2f, 0xfd, 0, 0], "compressed", "zstd"),
        ("x.tar", b"\xfd7zXZ\x00\x00\x00".to_vec(), "compressed", "xz"),
        ("b.tar", b"BZh91AY&SY".to_vec(), "compressed", "bzip2"),
        ("n.tar", vec![b'#'; 4096], "not-tar", "not a tar"),
        ("e.tar", vec![], "not-tar", "empty"),
    ] {
        let l = sb.layer(name, &bytes);
        let (code, err) = sb.run(&[&l], &[]);
        assert_rejected(code, &err, rule);
        assert!(err.contains(word), "{err}");
    }
    sb.check("garbage");
}
