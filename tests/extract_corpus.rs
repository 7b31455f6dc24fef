//! Every archive of the hostile-tar corpus (tests/data/hostile-tar, with
//! MANIFEST.tsv) through `thinimg unpack`, as root, into a sandbox with
//! canaries outside the root. The outcome must match the manifest's
//! expectation, or the deviation table below, which says why we differ.

mod extract_harness;

use extract_harness::{require_root, stderr, Sandbox};
use std::path::{Path, PathBuf};

/// Where thinimg deliberately decides differently from MANIFEST.tsv's
/// "expected" column: (file, our outcome, why).
const DEVIATIONS: &[(&str, Outcome, &str)] = &[
    (
        "tarfs_invalid.tar",
        Outcome::Accept,
        "foo -> ../ is stored verbatim; foo/bar is resolved with RESOLVE_IN_ROOT and lands at ROOT/bar. \
         Nothing escapes (the manifest notes accept-with-sanitizing is also safe).",
    ),
    (
        "busybox_tar_symlink_attack.tar",
        Outcome::Reject,
        "symlink -> /tmp dangles inside the root (ROOT/tmp does not exist); a parent that is a dangling \
         symlink is refused (rule parent-unresolvable). The manifest allows reject.",
    ),
    (
        "go_pax-global-records.tar",
        Outcome::Reject,
        "two entries have an empty name after the PAX records are applied; an empty name is refused \
         (rule empty-path) rather than guessed to mean '.'.",
    ),
    (
        "go_gnu-sparse-big.tar",
        Outcome::Reject,
        "sparse real size 60 GB exceeds the default --max-file-size 8G (rule file-size); accepted with a \
         higher limit, holes kept (tests/extract_attacks.rs sparse cases).",
    ),
    (
        "go_pax-sparse-big.tar",
        Outcome::Reject,
        "sparse real size 60 GB exceeds the default --max-file-size 8G (rule file-size).",
    ),
    (
        "libarchive_gtar_sparse_skip_entry.tar",
        Outcome::Reject,
        "sparse real size 10 GiB exceeds the default --max-file-size 8G (rule file-size); accepted with \
         --max-file-size 16G (checked below).",
    ),
    (
        "tarsplit_extranils.tar.gz",
        Outcome::Reject,
        "gzip-compressed: refused by magic (rule compressed); no decompressor is in the allowed dependency set.",
    ),
    ("libarchive_test_compat_zstd_1.tar.zst", Outcome::Reject, "zstd-compressed: refused by magic (rule compressed)."),
    ("gcr_whiteout_dir_layer.tar.gz", Outcome::Reject, "gzip-compressed: refused by magic (rule compressed)."),
    (
        "cpython_testtar.tar",
        Outcome::Reject,
        "gnu/regtype-gnu-uid has uid 4294967295, (uid_t)-1: chown would leave the file root's, so a header \
         that names a non-root owner would yield a root-owned (possibly setuid-root) file. Refused \
         (rule owner-range), issue 10 item 5.",
    ),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Accept,
    Reject,
}

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/hostile-tar")
}

struct Row {
    file: String,
    expected: String,
}

fn manifest() -> Vec<Row> {
    let text = std::fs::read_to_string(corpus().join("MANIFEST.tsv")).expect("tests/data/hostile-tar/MANIFEST.tsv");
    let mut rows = Vec::new();
    for line in text.lines().skip(1) {
        let cols: Vec<&str> = line.split('\t').collect();
        assert!(cols.len() >= 5, "bad manifest line {line:?}");
        rows.push(Row { file: cols[0].to_string(), expected: cols[4].to_string() });
    }
    rows
}

fn wanted(row: &Row) -> (Outcome, Option<&'static str>) {
    if let Some((_, o, why)) = DEVIATIONS.iter().find(|(f, _, _)| *f == row.file) {
        return (*o, Some(why));
    }
    match row.expected.as_str() {
        "reject" => (Outcome::Reject, None),
        "accept" | "accept-with-sanitizing" => (Outcome::Accept, None),
        other => panic!("{}: unknown expectation {other:?}", row.file),
    }
}

#[test]
fn corpus_outcomes_match_the_manifest() {
    require_root();
    let rows = manifest();
    assert_eq!(rows.len(), 60, "the corpus has 60 archives");
    let files: Vec<String> = std::fs::read_dir(corpus())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "MANIFEST.tsv")
        .collect();
    assert_eq!(files.len(), rows.len(), "every corpus file is in the manifest");
    for (f, _, _) in DEVIATIONS {
        assert!(rows.iter().any(|r| r.file == *f), "deviation for unknown file {f}");
    }
    let mut failures = Vec::new();
    for row in &rows {
        let sb = Sandbox::new(&row.file);
        let path = corpus().join(&row.file);
        let out = sb.unpack(&[&path], &["--jobs", "2"]);
        let err = stderr(&out);
        let got = match out.status.code() {
            Some(0) => Outcome::Accept,
            Some(65) => Outcome::Reject,
            other => {
                failures.push(format!("{}: exit {other:?}: {err}", row.file));
                continue;
            }
        };
        sb.check(&row.file);
        let (want, why) = wanted(row);
        if got != want {
            failures.push(format!(
                "{}: got {got:?}, want {want:?} (manifest: {}{}): {err}",
                row.file,
                row.expected,
                why.map(|w| format!("; deviation: {w}")).unwrap_or_default()
            ));
        }
        if got == Outcome::Reject {
            let lines: Vec<&str> = err.lines().collect();
            if lines.len() != 1 || !lines[0].contains(&format!("layer {}", row.file)) || !lines[0].contains("rule ") {
                failures
                    .push(format!("{}: rejection is not one line naming the layer and the rule: {err:?}", row.file));
            }
        }
        specific_checks(&row.file, &sb, got, &mut failures);
    }
    assert!(failures.is_empty(), "{} corpus mismatches:\n{}", failures.len(), failures.join("\n"));
}

/// What an accepted archive must have produced.
fn specific_checks(file: &str, sb: &Sandbox, got: Outcome, failures: &mut Vec<String>) {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let r = &sb.root;
    let lm = |p: &str| std::fs::symlink_metadata(r.join(p));
    let mut fail = |m: String| failures.push(format!("{file}: {m}"));
    if got != Outcome::Accept {
        return;
    }
    // One arm per corpus file, each a block of checks: collapsing a single
    // check into a match guard would hide which file the arm is for.
    #[allow(clippy::collapsible_match)]
    match file {
        "busybox_attack.tar" => match lm("passwd") {
            Ok(m) if m.file_type().is_file() => {}
            other => fail(format!("passwd should be a regular file replacing the symlink: {other:?}")),
        },
        "tarfs_invalid.tar" => {
            if !lm("foo").map(|m| m.file_type().is_symlink()).unwrap_or(false) {
                fail("foo should be the symlink, verbatim".into());
            }
        }
        "libarchive_test_leading_slash.tar" => {
            let a = lm("foo/file");
            let b = lm("foo/hardlink");
            match (a, b) {
                (Ok(a), Ok(b)) if a.ino() == b.ino() => {}
                other => fail(format!("foo/file and foo/hardlink should be one inode inside the root: {other:?}")),
            }
        }
        "libarchive_test_compat_tar_hardlink_1.tar" => {
            match (lm("xmcd-3.3.2/README"), lm("xmcd-3.3.2/docs_d/READMf")) {
                (Ok(a), Ok(b)) if a.ino() == b.ino() && a.len() == 321 => {}
                other => fail(format!("README should be a hard link to READMf (321 bytes): {other:?}")),
            }
        }
        "gcr_whiteout_layer.tar" => {
            if lm(".wh.foo.txt").is_ok() {
                fail("a whiteout marker was created as a file".into());
            }
            let m = std::fs::metadata(r).unwrap();
            if !m.is_dir() {
                fail("the root must stay a directory".into());
            }
        }
        "go_hdr-only.tar" => {
            let kinds: Vec<bool> = ["chr", "blk", "fifo"]
                .iter()
                .filter_map(|n| lm(n).ok())
                .map(|m| m.file_type().is_char_device() || m.file_type().is_block_device() || m.file_type().is_fifo())
                .collect();
            if kinds.is_empty() || kinds.iter().any(|k| !k) {
                fail(format!("device nodes and FIFOs should be created as such: {kinds:?}"));
            }
        }
        "moby_tarsum_collision-0.tar" => {
            if !lm("file").map(|m| m.is_file()).unwrap_or(false) {
                fail("file should exist once (last wins)".into());
            }
        }
        "tarrs_biguid_pax.tar" => {
            let any = std::fs::read_dir(r).unwrap().next();
            if any.is_none() {
                fail("the file should be extracted".into());
            }
        }
        _ => {}
    }
}

#[test]
fn sparse_corpus_files_are_accepted_with_a_higher_limit() {
    require_root();
    use std::os::unix::fs::MetadataExt;
    let sb = Sandbox::new("sparse-skip");
    let out = sb.unpack(&[&corpus().join("libarchive_gtar_sparse_skip_entry.tar")], &["--max-file-size", "16G"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let a = std::fs::metadata(sb.root.join("a")).unwrap();
    assert_eq!(a.len(), 10737418244);
    assert!(a.blocks() * 512 < 1 << 20, "holes must stay holes: {} blocks", a.blocks());
    assert_eq!(std::fs::read(sb.root.join("b")).unwrap().len(), 4);
    sb.check("sparse-skip");
}

/// `thinimg unpack` with its defaults (no --keep-privileges, --devices,
/// --apply-on-top) over every corpus archive: whatever is accepted leaves
/// no setuid/setgid file, no file capability and no device node behind.
#[test]
fn corpus_in_unpack_defaults_materializes_no_privileges() {
    require_root();
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let mut found = Vec::new();
    for row in manifest() {
        let sb = Sandbox::new(&format!("plain-{}", row.file));
        let dest = sb.layers.join("dest");
        let out = sb.unpack_plain(&dest, &[&corpus().join(&row.file)], &["--jobs", "2"]);
        let code = out.status.code();
        assert!(matches!(code, Some(0) | Some(65)), "{}: exit {code:?}: {}", row.file, stderr(&out));
        if code == Some(0) {
            assert_eq!(std::fs::metadata(&dest).unwrap().mode() & 0o7777, 0o700, "{}", row.file);
        }
        let mut stack = vec![dest.clone()];
        while let Some(d) = stack.pop() {
            let Ok(rd) = std::fs::read_dir(&d) else { continue };
            for e in rd {
                let p = e.unwrap().path();
                let m = std::fs::symlink_metadata(&p).unwrap();
                let ft = m.file_type();
                if ft.is_dir() {
                    stack.push(p);
                    continue;
                }
                let cap = {
                    let cp = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
                    // SAFETY: NUL-terminated strings; a null buffer of size 0 asks for the size only.
                    unsafe { libc::lgetxattr(cp.as_ptr(), c"security.capability".as_ptr(), std::ptr::null_mut(), 0) }
                };
                if ft.is_char_device()
                    || ft.is_block_device()
                    || (!ft.is_symlink() && m.mode() & 0o6000 != 0)
                    || cap >= 0
                {
                    found.push(format!("{}: {}", row.file, p.display()));
                }
            }
        }
        sb.check(&row.file);
    }
    assert!(found.is_empty(), "privileges materialized by default:\n{}", found.join("\n"));
}
