//! THE naming rule for the dm devices of a state dir, and where their
//! nodes are made. Everything that names, lists or looks up one of our
//! devices (the manager, gc, the activation read model, the tests) asks
//! here; nothing else spells a name.
//!
//! Every dm device of a state dir starts with the prefix `thinimg-<tag>-`,
//! where the tag is the first 8 hex digits of the sha256 of the canonical
//! state dir (so several state dirs can share one kernel): the pool is
//! `<prefix>pool`, a chain's build device `<prefix>c<thin-id>`, an
//! activation `<prefix>a-<name>`. Once a pool is recorded, the names come
//! from its recorded dm name ([`Names::of_pool`]), not from where the
//! state dir is now. Nodes are made under `<run-dir>/dev/<dm-name>`.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::dm::{DmName, ThinId};
use crate::error::{Error, Result};

/// The names of one pool's dm devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    /// `thinimg-<tag>-`.
    prefix: String,
}

impl Names {
    /// The names a pool created for `state_dir` gets.
    pub fn for_state_dir(state_dir: &Path) -> Result<Names> {
        let canon = std::fs::canonicalize(state_dir)
            .map_err(|e| Error::io(format!("resolving state dir {}", state_dir.display()), e))?;
        let h = Sha256::digest(canon.as_os_str().as_encoded_bytes());
        let tag = crate::ops::encode::hex(&h[..4]);
        Ok(Names { prefix: format!("thinimg-{tag}-") })
    }

    /// The names of the devices of the pool named `pool` (a recorded pool,
    /// `<prefix>pool`). A pool name without that suffix (made by hand) has
    /// its whole name and a dash as the prefix.
    pub fn of_pool(pool: &DmName) -> Names {
        let n = pool.as_str();
        let prefix = match n.strip_suffix("pool") {
            Some(p) if p.ends_with('-') => p.to_string(),
            _ => format!("{n}-"),
        };
        Names { prefix }
    }

    /// `thinimg-<tag>-`: every device of this state dir starts with it.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The pool device.
    pub fn pool(&self) -> Result<DmName> {
        DmName::new(format!("{}pool", self.prefix))
    }

    /// The device a chain is built on (active only during its build).
    pub fn build(&self, thin_id: ThinId) -> String {
        format!("{}c{thin_id}", self.prefix)
    }

    /// The device of activation `name`.
    pub fn activation(&self, name: &str) -> String {
        format!("{}a-{name}", self.prefix)
    }

    /// Whether `dm_name` is one of this pool's devices (the pool included).
    pub fn is_ours(&self, dm_name: &str) -> bool {
        dm_name.starts_with(&self.prefix)
    }
}

/// The pool device a state dir's new pool gets: `thinimg-<tag>-pool`.
pub fn default_pool_name(state_dir: &Path) -> Result<DmName> {
    Names::for_state_dir(state_dir)?.pool()
}

/// The node of dm device `dm_name` under the run directory.
pub fn node_path(run_dir: &Path, dm_name: &str) -> PathBuf {
    crate::dm::node_path(run_dir, dm_name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_name_is_stable_and_valid() {
        let d = std::env::temp_dir();
        let a = default_pool_name(&d).unwrap();
        assert_eq!(a, default_pool_name(&d).unwrap());
        assert!(a.as_str().starts_with("thinimg-") && a.as_str().ends_with("-pool"));
        assert_eq!(a.as_str().len(), "thinimg-".len() + 8 + "-pool".len());
    }

    #[test]
    fn one_rule_from_the_state_dir_or_the_recorded_pool() {
        let d = std::env::temp_dir();
        let n = Names::for_state_dir(&d).unwrap();
        assert_eq!(Names::of_pool(&n.pool().unwrap()), n);
        let p = n.prefix().to_string();
        assert!(p.starts_with("thinimg-") && p.ends_with('-'));
        assert_eq!(n.build(ThinId::new(7).unwrap()), format!("{p}c7"));
        assert_eq!(n.activation("vm1"), format!("{p}a-vm1"));
        assert!(n.is_ours(&n.activation("vm1")) && n.is_ours(n.pool().unwrap().as_str()));
        assert!(!n.is_ours("thinimg-00000000-a-vm1") || p == "thinimg-00000000-");
        // A recorded pool's name decides, wherever the state dir is now.
        let rec = Names::of_pool(&DmName::new("thinimg-0123abcd-pool").unwrap());
        assert_eq!(rec.activation("x"), "thinimg-0123abcd-a-x");
        assert_eq!(rec.build(ThinId::new(0).unwrap()), "thinimg-0123abcd-c0");
        assert_eq!(rec.pool().unwrap().as_str(), "thinimg-0123abcd-pool");
        assert_eq!(Names::of_pool(&DmName::new("mypool").unwrap()).prefix(), "mypool-");
    }
}
