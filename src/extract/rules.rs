//! Lexical rules on entry names, run before the kernel sees a path: they give
//! clear messages ("rule path-escape") for what containment would also stop,
//! and they decide what a name means (whiteout, opaque marker, the root).
//!
//! Nothing here touches the file system; containment itself is `root`'s job
//! and never relies on these checks.

use std::fmt;

/// Why a layer was refused: the rule's stable name and the detail. The entry
/// and the layer are added by the caller that knows them.
#[derive(Debug)]
pub struct Reject {
    pub rule: &'static str,
    pub detail: String,
    /// Set when the cause is an I/O error reading the layer, not its content.
    pub io: Option<std::io::Error>,
}

impl Reject {
    pub fn new(rule: &'static str, detail: impl Into<String>) -> Reject {
        Reject { rule, detail: detail.into(), io: None }
    }
    pub fn io(e: std::io::Error) -> Reject {
        Reject { rule: "read", detail: "reading the layer".into(), io: Some(e) }
    }
}

impl fmt::Display for Reject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rule {}: {}", self.rule, self.detail)
    }
}

/// A name, cleaned: components without "", "." and leading slashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CleanPath {
    pub comps: Vec<Vec<u8>>,
}

impl CleanPath {
    pub fn is_root(&self) -> bool {
        self.comps.is_empty()
    }
    /// "a/b/c"
    pub fn joined(&self) -> Vec<u8> {
        self.comps.join(&b'/')
    }
    pub fn parent(&self) -> Vec<u8> {
        match self.comps.split_last() {
            Some((_, rest)) => rest.join(&b'/'),
            None => Vec::new(),
        }
    }
    pub fn name(&self) -> &[u8] {
        self.comps.last().map(|c| c.as_slice()).unwrap_or(b".")
    }
}

/// Check and clean an entry name (or hard-link target). Leading slashes are
/// dropped (layers are rooted at the image root), "." and empty components
/// vanish, ".." is refused outright: a layer has no business naming a parent.
pub fn clean(raw: &[u8], max_len: u64, max_depth: u64, what: &str) -> Result<CleanPath, Reject> {
    if raw.is_empty() {
        return Err(Reject::new("empty-path", format!("{what} is empty")));
    }
    if raw.contains(&0) {
        return Err(Reject::new("nul-in-path", format!("{what} contains a NUL byte")));
    }
    if raw.len() as u64 > max_len {
        return Err(Reject::new(
            "path-length",
            format!("{what} is {} bytes, more than --max-path-len {max_len}", raw.len()),
        ));
    }
    let mut comps = Vec::new();
    for c in raw.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err(Reject::new("path-escape", format!("{what} has a '..' component"))),
            c => {
                if c.len() > 255 {
                    return Err(Reject::new("path-length", format!("{what} has a component longer than 255 bytes")));
                }
                comps.push(c.to_vec());
            }
        }
        if comps.len() as u64 > max_depth {
            return Err(Reject::new("path-depth", format!("{what} is deeper than --max-depth {max_depth}")));
        }
    }
    Ok(CleanPath { comps })
}

/// What an entry's last component says about it.
#[derive(Debug, PartialEq, Eq)]
pub enum Whiteout {
    /// An ordinary name.
    None,
    /// `.wh..wh..opq`: the parent directory hides its lower-layer content.
    Opaque,
    /// `.wh.NAME`: NAME in the parent directory is deleted from lower layers.
    Delete(Vec<u8>),
}

pub const WH_PREFIX: &[u8] = b".wh.";
pub const WH_OPAQUE: &[u8] = b".wh..wh..opq";

/// Classify a name's last component. `.wh.` alone, `.wh..`, `.wh...` and
/// other `.wh..wh.*` AUFS metadata names are malformed.
pub fn whiteout(name: &[u8]) -> Result<Whiteout, Reject> {
    if name == WH_OPAQUE {
        return Ok(Whiteout::Opaque);
    }
    let Some(target) = name.strip_prefix(WH_PREFIX) else {
        return Ok(Whiteout::None);
    };
    if target.is_empty() || target == b"." || target == b".." {
        return Err(Reject::new("whiteout-name", "malformed whiteout: it names no file"));
    }
    if target.starts_with(WH_PREFIX) {
        return Err(Reject::new("whiteout-name", "unsupported whiteout metadata name (.wh..wh.*)"));
    }
    Ok(Whiteout::Delete(target.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(p: &str) -> Result<Vec<String>, &'static str> {
        clean(p.as_bytes(), 4095, 128, "path")
            .map(|c| c.comps.iter().map(|x| String::from_utf8_lossy(x).into_owned()).collect())
            .map_err(|r| r.rule)
    }

    #[test]
    fn cleans_and_refuses() {
        assert_eq!(c("usr/bin/x"), Ok(vec!["usr".into(), "bin".into(), "x".into()]));
        assert_eq!(c("./etc//passwd"), Ok(vec!["etc".into(), "passwd".into()]));
        assert_eq!(c("/abs/x"), Ok(vec!["abs".into(), "x".into()]));
        assert_eq!(c("dir/"), Ok(vec!["dir".into()]));
        assert_eq!(c("./"), Ok(vec![]));
        assert_eq!(c("usr/../../x"), Err("path-escape"));
        assert_eq!(c("../x"), Err("path-escape"));
        assert_eq!(c("/../x"), Err("path-escape"));
        assert_eq!(c("a/.."), Err("path-escape"));
        assert_eq!(c(""), Err("empty-path"));
        assert_eq!(clean(b"a\0b", 4095, 128, "p").unwrap_err().rule, "nul-in-path");
        assert_eq!(clean(&[b'a'; 300], 4095, 128, "p").unwrap_err().rule, "path-length");
        assert_eq!(clean(b"aaaa/bbbb", 8, 128, "p").unwrap_err().rule, "path-length");
        assert_eq!(clean(b"a/b/c", 4095, 2, "p").unwrap_err().rule, "path-depth");
        assert!(clean(b"a/b", 4095, 2, "p").is_ok());
        // Backslashes and drive letters are ordinary bytes on Linux.
        assert_eq!(c("c:..\\x"), Ok(vec!["c:..\\x".into()]));
    }

    #[test]
    fn whiteout_names() {
        assert_eq!(whiteout(b"foo").unwrap(), Whiteout::None);
        assert_eq!(whiteout(b".wh..wh..opq").unwrap(), Whiteout::Opaque);
        assert_eq!(whiteout(b".wh.foo").unwrap(), Whiteout::Delete(b"foo".to_vec()));
        assert_eq!(whiteout(b".wh..hidden").unwrap(), Whiteout::Delete(b".hidden".to_vec()));
        assert_eq!(whiteout(b".wh.").unwrap_err().rule, "whiteout-name");
        assert_eq!(whiteout(b".wh..").unwrap_err().rule, "whiteout-name");
        assert_eq!(whiteout(b".wh...").unwrap_err().rule, "whiteout-name");
        assert_eq!(whiteout(b".wh..wh.plnk").unwrap_err().rule, "whiteout-name");
        assert_eq!(whiteout(b".whfoo").unwrap(), Whiteout::None);
    }
}
