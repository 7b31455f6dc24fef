//! The typed ids rows carry, and how SQLite stores them.
//!
//! A [`ChainId`] (the OCI ChainID of a layer stack) is defined here, next
//! to the rows that key on it. [`ThinId`] (`dm`) and [`BlobDigest`]
//! (`fetch`) belong to their mechanisms; this file only teaches rusqlite to
//! read and write all three. A column that does not hold a valid id (a
//! digest that is not 64 lower-case hex digits, a thin id out of the
//! kernel's 24-bit range) is a read error naming the value, never a
//! default.

use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSql, ToSqlOutput, ValueRef};
use sha2::{Digest, Sha256};

use crate::dm::ThinId;
use crate::error::Result;
use crate::fetch::blobstore::BlobDigest;

/// The OCI ChainID of layers 1..=n, as 64 lower-case hex digits:
/// ChainID(L1) = DiffID(L1), and ChainID(L1..n) is the SHA-256 of
/// "sha256:<ChainID(L1..n-1)> sha256:<DiffID(Ln)>". A chain is named by it
/// in the `chains` table, so two images with the same lower layers share
/// those chains.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ChainId(String);

impl ChainId {
    pub fn parse(s: &str) -> Result<ChainId> {
        // The same spelling as a digest: reuse its check.
        BlobDigest::parse(s).map(|d| ChainId(d.as_str().to_string()))
    }

    /// The chain ids of an ordered list of layer digests, bottom first.
    pub fn of_layers(digests: &[BlobDigest]) -> Vec<ChainId> {
        let mut out: Vec<ChainId> = Vec::with_capacity(digests.len());
        for d in digests {
            let id = ChainId::child(out.last(), d);
            out.push(id);
        }
        out
    }

    /// The chain id of layer `d` on top of chain `parent` (`None`: a base layer).
    pub fn child(parent: Option<&ChainId>, d: &BlobDigest) -> ChainId {
        match parent {
            None => ChainId(d.as_str().to_string()),
            Some(parent) => {
                let mut h = Sha256::new();
                h.update(format!("sha256:{} sha256:{}", parent.0, d.as_str()).as_bytes());
                ChainId(crate::ops::encode::hex(&h.finalize()))
            }
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for ChainId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for ChainId {
    type Error = String;
    fn try_from(s: String) -> std::result::Result<ChainId, String> {
        ChainId::parse(&s).map_err(|_| format!("{s:?} is not a chain id (64 lower-case hex digits)"))
    }
}

impl From<ChainId> for String {
    fn from(c: ChainId) -> String {
        c.0
    }
}

fn bad(what: &str, v: impl std::fmt::Debug) -> FromSqlError {
    FromSqlError::Other(format!("{v:?} is not a {what}").into())
}

impl FromSql for ChainId {
    fn column_result(v: ValueRef<'_>) -> FromSqlResult<Self> {
        let s = v.as_str()?;
        ChainId::parse(s).map_err(|_| bad("chain id", s))
    }
}

impl ToSql for ChainId {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(self.0.as_str().into())
    }
}

impl FromSql for BlobDigest {
    fn column_result(v: ValueRef<'_>) -> FromSqlResult<Self> {
        let s = v.as_str()?;
        BlobDigest::parse(s).map_err(|_| bad("SHA-256 digest", s))
    }
}

impl ToSql for BlobDigest {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(self.as_str().into())
    }
}

impl FromSql for ThinId {
    fn column_result(v: ValueRef<'_>) -> FromSqlResult<Self> {
        let n = v.as_i64()?;
        u64::try_from(n).ok().and_then(|n| ThinId::new(n).ok()).ok_or_else(|| bad("thin id (0..2^24)", n))
    }
}

impl ToSql for ThinId {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(i64::from(self.get()).into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_oci() {
        let a = BlobDigest::parse(&"a".repeat(64)).unwrap();
        let b = BlobDigest::parse(&"b".repeat(64)).unwrap();
        let ids = ChainId::of_layers(&[a.clone(), b.clone()]);
        assert_eq!(ids[0].as_str(), a.as_str());
        let mut h = Sha256::new();
        h.update(format!("sha256:{} sha256:{}", a, b).as_bytes());
        assert_eq!(ids[1].as_str(), crate::ops::encode::hex(&h.finalize()));
        // Same prefix, same ids: that is what makes chains shareable.
        assert_eq!(ChainId::of_layers(std::slice::from_ref(&a))[0], ids[0]);
    }

    #[test]
    fn columns_that_do_not_hold_an_id_are_errors() {
        let c = crate::store::memory_db();
        let chain = |sql: &str| c.query_row(sql, [], |r| r.get::<_, ChainId>(0));
        let thin = |sql: &str| c.query_row(sql, [], |r| r.get::<_, ThinId>(0));
        let digest = |sql: &str| c.query_row(sql, [], |r| r.get::<_, BlobDigest>(0));
        let hex = "0123456789abcdef".repeat(4);
        assert_eq!(chain(&format!("SELECT '{hex}'")).unwrap().as_str(), hex);
        assert_eq!(digest(&format!("SELECT '{hex}'")).unwrap().as_str(), hex);
        for bad in ["SELECT 'ABC'", "SELECT ''", "SELECT 7", "SELECT NULL"] {
            assert!(chain(bad).is_err(), "{bad}");
            assert!(digest(bad).is_err(), "{bad}");
        }
        assert!(chain(&format!("SELECT '{}'", hex.to_uppercase())).is_err());
        assert_eq!(thin("SELECT 16777215").unwrap().get(), ThinId::MAX);
        for bad in ["SELECT 16777216", "SELECT -1", "SELECT 'x'", "SELECT NULL"] {
            assert!(thin(bad).is_err(), "{bad}");
        }
        // Stored and read back the same.
        let t = ThinId::new(42).unwrap();
        assert_eq!(c.query_row("SELECT ?1", [t], |r| r.get::<_, ThinId>(0)).unwrap(), t);
        let id = ChainId::parse(&hex).unwrap();
        assert_eq!(c.query_row("SELECT ?1", [&id], |r| r.get::<_, ChainId>(0)).unwrap(), id);
        // Intents carry ids through serde with the same checks.
        assert!(serde_json::from_str::<ChainId>("\"xyz\"").is_err());
        assert_eq!(serde_json::to_string(&id).unwrap(), format!("\"{hex}\""));
    }
}
