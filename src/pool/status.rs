//! What the kernel says about the pool and its thin devices: the
//! `thin-pool` and `thin` status lines parsed exactly ([`PoolStatus`],
//! [`ThinStatus`]), and which states a pool may be used in.

use crate::dm::{DmName, Sectors};
use crate::error::{Error, Kind, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PoolMode {
    Rw,
    Ro,
    OutOfDataSpace,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DiscardMode {
    DiscardPassdown,
    NoDiscardPassdown,
    IgnoreDiscard,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NoSpaceMode {
    ErrorIfNoSpace,
    QueueIfNoSpace,
}

/// The counters of a working pool.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PoolUsage {
    pub transaction_id: u64,
    pub meta_used: u64,
    pub meta_total: u64,
    pub data_used: u64,
    pub data_total: u64,
    pub held_root: Option<u64>,
    pub mode: PoolMode,
    pub discard: DiscardMode,
    pub no_space: NoSpaceMode,
    pub needs_check: bool,
    /// Free metadata blocks below which the kernel raises an event (newer kernels).
    pub meta_low_water: Option<u64>,
}

/// A parsed thin-pool status line.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "health")]
pub enum PoolStatus {
    /// The pool failed: all I/O errors.
    Fail,
    /// The kernel could not read the pool's counters.
    Error,
    Active(PoolUsage),
}

impl PoolStatus {
    /// Parse the params of a `thin-pool` status target exactly; anything
    /// unexpected is an error, not a guess.
    pub fn parse(line: &str) -> Result<PoolStatus> {
        let bad = |why: &str| Error::new(Kind::Software, format!("unexpected thin-pool status {line:?}: {why}"));
        let t: Vec<&str> = line.split_whitespace().collect();
        match t.as_slice() {
            ["Fail"] => return Ok(PoolStatus::Fail),
            ["Error"] => return Ok(PoolStatus::Error),
            _ => {}
        }
        if t.len() != 8 && t.len() != 9 {
            return Err(bad("expected 8 or 9 fields"));
        }
        let num = |s: &str, what: &str| s.parse::<u64>().map_err(|_| bad(&format!("{what} {s:?} is not a number")));
        let frac = |s: &str, what: &str| -> Result<(u64, u64)> {
            let (a, b) = s.split_once('/').ok_or_else(|| bad(&format!("{what} {s:?} is not used/total")))?;
            Ok((num(a, what)?, num(b, what)?))
        };
        let transaction_id = num(t[0], "transaction id")?;
        let (meta_used, meta_total) = frac(t[1], "metadata")?;
        let (data_used, data_total) = frac(t[2], "data")?;
        let held_root = if t[3] == "-" { None } else { Some(num(t[3], "held root")?) };
        let mode = match t[4] {
            "rw" => PoolMode::Rw,
            "ro" => PoolMode::Ro,
            "out_of_data_space" => PoolMode::OutOfDataSpace,
            o => return Err(bad(&format!("unknown mode {o:?}"))),
        };
        let discard = match t[5] {
            "discard_passdown" => DiscardMode::DiscardPassdown,
            "no_discard_passdown" => DiscardMode::NoDiscardPassdown,
            "ignore_discard" => DiscardMode::IgnoreDiscard,
            o => return Err(bad(&format!("unknown discard mode {o:?}"))),
        };
        let no_space = match t[6] {
            "error_if_no_space" => NoSpaceMode::ErrorIfNoSpace,
            "queue_if_no_space" => NoSpaceMode::QueueIfNoSpace,
            o => return Err(bad(&format!("unknown no-space mode {o:?}"))),
        };
        let needs_check = match t[7] {
            "needs_check" => true,
            "-" => false,
            o => return Err(bad(&format!("unknown needs_check field {o:?}"))),
        };
        let meta_low_water = match t.get(8) {
            Some(s) => Some(num(s, "metadata low watermark")?),
            None => None,
        };
        Ok(PoolStatus::Active(PoolUsage {
            transaction_id,
            meta_used,
            meta_total,
            data_used,
            data_total,
            held_root,
            mode,
            discard,
            no_space,
            needs_check,
            meta_low_water,
        }))
    }

    /// HostFatal for a failed, read-only or needs_check pool; TempFail when
    /// it is out of data space. Returns the usage of a usable pool.
    pub fn usable(&self, pool: &DmName) -> Result<&PoolUsage> {
        let u = match self {
            PoolStatus::Fail => {
                return Err(Error::new(
                    Kind::HostFatal,
                    format!("thin-pool {pool} has failed (status Fail); all I/O to it errors"),
                ))
            }
            PoolStatus::Error => {
                return Err(Error::new(
                    Kind::HostFatal,
                    format!("thin-pool {pool} reports Error status: its metadata cannot be read"),
                ))
            }
            PoolStatus::Active(u) => u,
        };
        if u.needs_check {
            return Err(Error::new(
                Kind::HostFatal,
                format!("thin-pool {pool} needs_check: run thin_check/thin_repair on its metadata before using it"),
            ));
        }
        match u.mode {
            PoolMode::Ro => Err(Error::new(
                Kind::HostFatal,
                format!("thin-pool {pool} is read-only (metadata error or full metadata)"),
            )),
            PoolMode::OutOfDataSpace => Err(Error::new(
                Kind::TempFail,
                format!(
                    "thin-pool {pool} is out of data space ({}/{} blocks used); free space by deleting devices",
                    u.data_used, u.data_total
                ),
            )),
            PoolMode::Rw => Ok(u),
        }
    }
}

/// A parsed `thin` target status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "health")]
pub enum ThinStatus {
    /// The pool failed.
    Fail,
    /// Mapped sectors and the highest mapped sector (None when nothing is mapped).
    Active { mapped: Sectors, highest: Option<Sectors> },
}

impl ThinStatus {
    pub fn parse(line: &str) -> Result<ThinStatus> {
        let bad = || Error::new(Kind::Software, format!("unexpected thin status {line:?}"));
        let t: Vec<&str> = line.split_whitespace().collect();
        match t.as_slice() {
            ["Fail"] => Ok(ThinStatus::Fail),
            [m, h] => {
                let mapped = Sectors(m.parse().map_err(|_| bad())?);
                let highest = if *h == "-" { None } else { Some(Sectors(h.parse().map_err(|_| bad())?)) };
                Ok(ThinStatus::Active { mapped, highest })
            }
            _ => Err(bad()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_parse_full_line() {
        let s = PoolStatus::parse("0 10/1024 0/32768 - rw discard_passdown error_if_no_space - 256 ").unwrap();
        let PoolStatus::Active(u) = s else { panic!("not active") };
        assert_eq!(u.transaction_id, 0);
        assert_eq!((u.meta_used, u.meta_total), (10, 1024));
        assert_eq!((u.data_used, u.data_total), (0, 32768));
        assert_eq!(u.held_root, None);
        assert_eq!(u.mode, PoolMode::Rw);
        assert_eq!(u.discard, DiscardMode::DiscardPassdown);
        assert_eq!(u.no_space, NoSpaceMode::ErrorIfNoSpace);
        assert!(!u.needs_check);
        assert_eq!(u.meta_low_water, Some(256));
    }

    /// Lines captured from Debian's 6.1 kernel in the test VM.
    #[test]
    fn status_parse_real_kernel_lines() {
        let PoolStatus::Active(u) =
            PoolStatus::parse("0 60/512 0/4096 - rw discard_passdown error_if_no_space - 128 ").unwrap()
        else {
            panic!()
        };
        assert_eq!((u.meta_used, u.meta_total, u.data_used, u.data_total), (60, 512, 0, 4096));
        assert_eq!((u.mode, u.meta_low_water), (PoolMode::Rw, Some(128)));
        let full = PoolStatus::parse("0 64/512 512/512 - out_of_data_space discard_passdown error_if_no_space - 128 ")
            .unwrap();
        let PoolStatus::Active(u) = &full else { panic!() };
        assert_eq!((u.data_used, u.data_total, u.mode), (512, 512, PoolMode::OutOfDataSpace));
        let n = DmName::new("p").unwrap();
        assert_eq!(full.usable(&n).unwrap_err().kind(), Kind::TempFail);
    }

    #[test]
    fn status_parse_variants() {
        let PoolStatus::Active(u) = PoolStatus::parse(
            "7 300/1024 32768/32768 123 out_of_data_space ignore_discard queue_if_no_space needs_check",
        )
        .unwrap() else {
            panic!()
        };
        assert_eq!(u.held_root, Some(123));
        assert_eq!(u.mode, PoolMode::OutOfDataSpace);
        assert_eq!(u.discard, DiscardMode::IgnoreDiscard);
        assert_eq!(u.no_space, NoSpaceMode::QueueIfNoSpace);
        assert!(u.needs_check);
        assert_eq!(u.meta_low_water, None);
        let PoolStatus::Active(u) =
            PoolStatus::parse("1 1/2 3/4 - ro no_discard_passdown error_if_no_space - 9").unwrap()
        else {
            panic!()
        };
        assert_eq!(u.mode, PoolMode::Ro);
        assert_eq!(u.discard, DiscardMode::NoDiscardPassdown);
        assert_eq!(PoolStatus::parse("Fail").unwrap(), PoolStatus::Fail);
        assert_eq!(PoolStatus::parse("Error").unwrap(), PoolStatus::Error);
    }

    #[test]
    fn status_parse_rejects_garbage() {
        for bad in [
            "",
            "0 10/1024",
            "x 10/1024 0/32768 - rw discard_passdown error_if_no_space - 256",
            "0 10-1024 0/32768 - rw discard_passdown error_if_no_space - 256",
            "0 10/1024 0/32768 - rx discard_passdown error_if_no_space - 256",
            "0 10/1024 0/32768 - rw discard error_if_no_space - 256",
            "0 10/1024 0/32768 - rw discard_passdown error - 256",
            "0 10/1024 0/32768 - rw discard_passdown error_if_no_space maybe 256",
            "0 10/1024 0/32768 - rw discard_passdown error_if_no_space - 256 extra",
        ] {
            assert!(PoolStatus::parse(bad).is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn thin_status_parse() {
        assert_eq!(ThinStatus::parse("0 -").unwrap(), ThinStatus::Active { mapped: Sectors(0), highest: None });
        assert_eq!(
            ThinStatus::parse("16384 16383").unwrap(),
            ThinStatus::Active { mapped: Sectors(16384), highest: Some(Sectors(16383)) }
        );
        assert_eq!(ThinStatus::parse("Fail").unwrap(), ThinStatus::Fail);
        assert!(ThinStatus::parse("1").is_err());
        assert!(ThinStatus::parse("a b").is_err());
    }

    #[test]
    fn usable_classifies() {
        let n = DmName::new("p").unwrap();
        let k = |l: &str| PoolStatus::parse(l).unwrap().usable(&n).err().map(|e| e.kind());
        assert_eq!(k("0 1/10 1/10 - rw discard_passdown error_if_no_space - 2"), None);
        assert_eq!(k("0 1/10 1/10 - rw discard_passdown error_if_no_space needs_check 2"), Some(Kind::HostFatal));
        assert_eq!(k("0 1/10 1/10 - ro discard_passdown error_if_no_space - 2"), Some(Kind::HostFatal));
        assert_eq!(k("0 1/10 10/10 - out_of_data_space discard_passdown error_if_no_space - 2"), Some(Kind::TempFail));
        assert_eq!(k("Fail"), Some(Kind::HostFatal));
        assert_eq!(k("Error"), Some(Kind::HostFatal));
    }
}
