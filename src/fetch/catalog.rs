//! The image catalog: what a bucket listing means as images and layers.
//!
//! Rules (also in `thinimg help ls-remote` via the table): under the prefix,
//! each first path component is an image family; its objects named `<N>.tar`
//! are its layers, N a positive decimal without leading zeros (1..=99999999),
//! applied in numeric order. Family names are 1–100 bytes of letters,
//! digits, `.`, `_`, `-`, not starting with `.` (they become image and
//! device names). Everything else (other names, nested folders, keys
//! directly under the prefix, folder markers, empty objects) is listed as
//! ignored with the reason, never guessed at. A gap in the numbering makes
//! the image (from the gap up) invalid, with an error (66, "no such layer")
//! naming the missing layer and the complete ref below it (`golang/5`); a
//! key the listing names twice makes it invalid from that layer up. This module is pure: no network, no disk, no database.

use std::collections::BTreeMap;

use super::s3::ObjectInfo;
use crate::error::{Error, Kind, Result};

/// The largest layer number accepted (8 digits).
pub const MAX_LAYER: u32 = 99_999_999;

/// One layer of a family: the object `<prefix><family>/<n>.tar`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Layer {
    pub family: String,
    pub n: u32,
    pub key: String,
    pub etag: String,
    pub size: u64,
    pub last_modified: String,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Family {
    pub name: String,
    /// In numeric order.
    pub layers: Vec<Layer>,
    /// Why the whole family cannot be used (a gap), if so.
    pub invalid: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Ignored {
    pub key: String,
    pub reason: String,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Catalog {
    pub bucket: String,
    pub prefix: String,
    pub families: BTreeMap<String, Family>,
    pub ignored: Vec<Ignored>,
}

/// A resolved reference: a family's layers 1..=top.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ImageRef {
    pub family: String,
    pub top: u32,
    pub layers: Vec<Layer>,
}

impl ImageRef {
    /// `golang` for a whole family, `golang/3` for a prefix of it.
    pub fn name(&self, whole_family: bool) -> String {
        if whole_family {
            self.family.clone()
        } else {
            format!("{}/{}", self.family, self.top)
        }
    }
}

/// Why a family name is refused, if it is.
pub fn family_name_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("empty family name".into());
    }
    if name.len() > 100 {
        return Some(format!("family name is {} bytes (limit 100)", name.len()));
    }
    if name.starts_with('.') {
        return Some("family name starts with '.'".into());
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')) {
        return Some("family name has characters other than letters, digits, '.', '_', '-'".into());
    }
    None
}

/// `N.tar` → N, by the rule in the module header.
pub fn layer_number(name: &str) -> std::result::Result<u32, String> {
    let Some(num) = name.strip_suffix(".tar") else {
        return Err("not named <N>.tar".into());
    };
    if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) {
        return Err("not named <N>.tar (N must be a decimal number)".into());
    }
    if num.starts_with('0') {
        return Err("layer number has a leading zero or is 0 (layers count from 1)".into());
    }
    match num.parse::<u32>() {
        Ok(n) if n <= MAX_LAYER => Ok(n),
        _ => Err(format!("layer number is larger than {MAX_LAYER}")),
    }
}

/// Printable form of a key for messages: control characters escaped, long
/// keys cut (the JSON output keeps the full key).
pub fn show_key(key: &str) -> String {
    let mut s: String = key.chars().take(200).flat_map(|c| c.escape_debug()).collect();
    if key.chars().count() > 200 {
        s.push_str("...");
    }
    s
}

impl Catalog {
    pub fn build(bucket: &str, prefix: &str, objects: Vec<ObjectInfo>) -> Catalog {
        let mut families: BTreeMap<String, Family> = BTreeMap::new();
        let mut ignored = Vec::new();
        let mut ignore = |key: &str, reason: String| ignored.push(Ignored { key: key.to_string(), reason });
        for o in objects {
            let Some(rel) = o.key.strip_prefix(prefix) else {
                ignore(&o.key, format!("not under the prefix {prefix:?}"));
                continue;
            };
            let Some((family, name)) = rel.split_once('/') else {
                ignore(&o.key, "directly under the prefix, not inside a family folder".into());
                continue;
            };
            if let Some(p) = family_name_problem(family) {
                ignore(&o.key, p);
                continue;
            }
            if name.is_empty() {
                ignore(&o.key, "folder marker".into());
                continue;
            }
            if name.contains('/') {
                ignore(&o.key, "inside a nested folder (layers are directly in the family folder)".into());
                continue;
            }
            let n = match layer_number(name) {
                Ok(n) => n,
                Err(why) => {
                    ignore(&o.key, why);
                    continue;
                }
            };
            if o.size == 0 {
                ignore(&o.key, "empty object (0 bytes) is not a tar layer".into());
                continue;
            }
            let fam = families.entry(family.to_string()).or_insert_with(|| Family {
                name: family.to_string(),
                layers: Vec::new(),
                invalid: None,
            });
            fam.layers.push(Layer {
                family: family.to_string(),
                n,
                key: o.key,
                etag: o.etag,
                size: o.size,
                last_modified: o.last_modified,
            });
        }
        for fam in families.values_mut() {
            fam.layers.sort_by_key(|l| l.n);
            if let Some(dup) = first_duplicate(&fam.layers) {
                fam.invalid = Some(duplicate_message(bucket, &fam.name, dup));
            } else if let Some(missing) = first_gap(&fam.layers) {
                fam.invalid = Some(gap_message(bucket, prefix, &fam.name, missing, &fam.layers, &ignored));
            }
        }
        Catalog { bucket: bucket.to_string(), prefix: prefix.to_string(), families, ignored }
    }

    /// Resolve a REF: `FAMILY` (all its layers), or a layer's key given as
    /// `<prefix>FAMILY/N.tar`, `FAMILY/N.tar` or `FAMILY/N` (layers 1..=N).
    pub fn resolve(&self, r: &str) -> Result<ImageRef> {
        let rel = r.strip_prefix(&self.prefix).filter(|s| s.contains('/')).unwrap_or(r);
        let (family, top) = match rel.split_once('/') {
            None => (rel, None),
            Some((f, l)) => {
                let l = if l.ends_with(".tar") { l.to_string() } else { format!("{l}.tar") };
                let n = layer_number(&l).map_err(|why| {
                    Error::usage(format!(
                        "reference {:?}: {why}; expected FAMILY, FAMILY/N or {}FAMILY/N.tar",
                        show_key(r),
                        self.prefix
                    ))
                })?;
                (f, Some(n))
            }
        };
        let Some(fam) = self.families.get(family) else {
            let known: Vec<&str> = self.families.keys().map(|s| s.as_str()).collect();
            return Err(Error::new(
                Kind::NoSuchImage,
                format!(
                    "no image family {:?} under s3://{}/{} (have: {})",
                    show_key(family),
                    self.bucket,
                    self.prefix,
                    if known.is_empty() { "none".to_string() } else { known.join(", ") }
                ),
            ));
        };
        let top = match top {
            Some(n) => n,
            None => fam.layers.last().map(|l| l.n).unwrap_or(0),
        };
        if !fam.layers.iter().any(|l| l.n == top) {
            return Err(Error::new(
                Kind::NoSuchImage,
                format!(
                    "image {family} has no layer {top} (no object s3://{}/{}{family}/{top}.tar)",
                    self.bucket, self.prefix
                ),
            ));
        }
        let layers: Vec<Layer> = fam.layers.iter().filter(|l| l.n <= top).cloned().collect();
        if let Some(dup) = first_duplicate(&layers) {
            return Err(Error::new(Kind::Unavailable, duplicate_message(&self.bucket, family, dup)));
        }
        if let Some(missing) = first_gap(&layers) {
            return Err(Error::new(
                Kind::NoSuchImage,
                gap_message(&self.bucket, &self.prefix, family, missing, &fam.layers, &self.ignored),
            ));
        }
        Ok(ImageRef { family: family.to_string(), top, layers })
    }
}

/// A layer listed more than once in a sorted layer list (the same key
/// twice: a layer number has one spelling), if any.
fn first_duplicate(layers: &[Layer]) -> Option<&Layer> {
    layers.windows(2).find(|w| w[0].n == w[1].n).map(|w| &w[1])
}

fn duplicate_message(bucket: &str, family: &str, dup: &Layer) -> String {
    format!(
        "image {family}: the listing names s3://{bucket}/{} more than once (a broken or hostile server); not using it",
        show_key(&dup.key)
    )
}

/// The first missing layer number in a sorted layer list, if any.
fn first_gap(layers: &[Layer]) -> Option<u32> {
    (1..).zip(layers).find(|(want, l)| l.n != *want).map(|(want, _)| want)
}

fn gap_message(
    bucket: &str,
    prefix: &str,
    family: &str,
    missing: u32,
    layers: &[Layer],
    ignored: &[Ignored],
) -> String {
    let key = format!("{prefix}{family}/{missing}.tar");
    let have: Vec<String> = layers.iter().map(|l| l.n.to_string()).collect();
    let mut m = format!(
        "image {family}: layer {missing} is missing (no usable object s3://{bucket}/{key}; layers present: {})",
        have.join(", ")
    );
    if let Some(ig) = ignored.iter().find(|i| i.key == key) {
        m.push_str(&format!("; {key} was ignored: {}", ig.reason));
    }
    // Never guessed around, but the complete part is named.
    if missing > 1 {
        let top = missing - 1;
        m.push_str(&format!("; {family}/{top} (layers 1-{top}) is complete and can be used as that ref"));
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(key: &str, size: u64) -> ObjectInfo {
        ObjectInfo { key: key.into(), etag: format!("{:032x}", size), size, last_modified: String::new() }
    }

    fn catalog(keys: &[(&str, u64)]) -> Catalog {
        Catalog::build("b", "images/", keys.iter().map(|(k, s)| obj(k, *s)).collect())
    }

    #[test]
    fn layers_sort_numerically_and_oddities_are_ignored_with_reasons() {
        let mut keys: Vec<(String, u64)> = (1..=10).map(|n| (format!("images/go/{n}.tar"), 10)).collect();
        keys.extend(
            [
                "images/go/01.tar",
                "images/go/0.tar",
                "images/go/3.tar.gz",
                "images/go/x.tar",
                "images/go/sub/1.tar",
                "images/go/",
                "images/README",
                "images/../1.tar",
                "images/.hidden/1.tar",
                "images/we ird/1.tar",
                "images/go/999999999.tar",
            ]
            .iter()
            .map(|k| (k.to_string(), 5)),
        );
        keys.push(("images/go/11.tar".into(), 0));
        let c = Catalog::build("b", "images/", keys.into_iter().map(|(k, s)| obj(&k, s)).collect());
        let go = &c.families["go"];
        assert_eq!(go.layers.iter().map(|l| l.n).collect::<Vec<_>>(), (1..=10).collect::<Vec<_>>());
        assert!(go.invalid.is_none());
        assert_eq!(c.families.len(), 1);
        assert_eq!(c.ignored.len(), 12, "{:#?}", c.ignored);
        let reason = |k: &str| c.ignored.iter().find(|i| i.key == k).map(|i| i.reason.clone()).unwrap();
        assert!(reason("images/go/01.tar").contains("leading zero"));
        assert!(reason("images/go/sub/1.tar").contains("nested"));
        assert!(reason("images/README").contains("directly under the prefix"));
        assert!(reason("images/../1.tar").contains("starts with '.'"));
        assert!(reason("images/go/11.tar").contains("empty"));
        assert!(reason("images/go/999999999.tar").contains("larger"));
    }

    #[test]
    fn refs_resolve_to_layer_prefixes() {
        let c =
            catalog(&[("images/go/1.tar", 1), ("images/go/2.tar", 2), ("images/go/10.tar", 3), ("images/py/1.tar", 4)]);
        // go has a gap at 3: the whole family is invalid, but go/2 is fine.
        assert!(c.families["go"].invalid.as_deref().unwrap().contains("layer 3 is missing"));
        let e = c.resolve("go").unwrap_err();
        assert_eq!(e.kind(), Kind::NoSuchImage);
        assert!(e.message().contains("go/2 (layers 1-2) is complete"), "{}", e.message());
        assert!(e.message().contains("s3://b/images/go/3.tar"), "{}", e.message());
        for r in ["go/2", "go/2.tar", "images/go/2.tar"] {
            let i = c.resolve(r).unwrap();
            assert_eq!((i.family.as_str(), i.top, i.layers.len()), ("go", 2, 2), "{r}");
        }
        assert_eq!(c.resolve("py").unwrap().top, 1);
        assert_eq!(c.resolve("rust").unwrap_err().kind(), Kind::NoSuchImage);
        assert_eq!(c.resolve("py/2").unwrap_err().kind(), Kind::NoSuchImage);
        assert_eq!(c.resolve("py/02").unwrap_err().kind(), Kind::Usage);
    }

    #[test]
    fn a_key_listed_twice_is_named_not_taken_for_a_gap() {
        for n in [1u64, 2, 3] {
            let mut keys: Vec<(String, u64)> = (1..=3).map(|i| (format!("images/go/{i}.tar"), i)).collect();
            keys.push((format!("images/go/{n}.tar"), n));
            let c = Catalog::build("b", "images/", keys.into_iter().map(|(k, s)| obj(&k, s)).collect());
            let why = c.families["go"].invalid.clone().unwrap();
            assert!(why.contains(&format!("s3://b/images/go/{n}.tar more than once")), "{why}");
            assert!(!why.contains("missing"), "{why}");
            let e = c.resolve("go").unwrap_err();
            assert!(e.message().contains("more than once"), "{}", e.message());
            // Below the duplicate the family is still usable.
            if n > 1 {
                assert_eq!(c.resolve(&format!("go/{}", n - 1)).unwrap().layers.len(), n as usize - 1);
            }
        }
    }
}
