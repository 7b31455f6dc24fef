//! Records the git commit the binary is built from, for `thinimg version`.
//! `THINIMG_COMMIT` overrides it (packages built from a tarball); without
//! git the commit is "unknown".

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!s.is_empty()).then_some(s)
}

fn main() {
    println!("cargo:rerun-if-env-changed=THINIMG_COMMIT");
    let commit = std::env::var("THINIMG_COMMIT")
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=THINIMG_COMMIT={commit}");
    // Rebuild when HEAD moves (worktrees keep refs in the common dir).
    if let Some(dir) = git(&["rev-parse", "--absolute-git-dir"]) {
        println!("cargo:rerun-if-changed={dir}/HEAD");
    }
    if let (Some(common), Some(head)) =
        (git(&["rev-parse", "--path-format=absolute", "--git-common-dir"]), git(&["symbolic-ref", "-q", "HEAD"]))
    {
        let r = format!("{common}/{head}");
        if std::path::Path::new(&r).exists() {
            println!("cargo:rerun-if-changed={r}");
        }
        println!("cargo:rerun-if-changed={common}/packed-refs");
    }
}
