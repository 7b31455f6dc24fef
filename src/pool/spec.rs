//! The pool's parameters and the files or devices under it: [`PoolSpec`]
//! (what the database records to assemble the pool again), metadata
//! sizing, the sparse files of a loop pool, and the checks that a block
//! pool's devices are still the ones it was made on (superblock geometry,
//! sysfs identities). Data and file I/O only: no dm calls, no database.

use std::fs::OpenOptions;
use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};

use crate::dm::{DevId, DmName, Sectors};
use crate::error::{Error, Kind, Result};

pub const DEFAULT_BLOCK_SECTORS: u64 = 128;
const MIN_META_BYTES: u64 = 2 << 20;
const MAX_META_BYTES: u64 = 16 << 30;
/// On-disk magic of a thin-pool metadata superblock (offset 32, little-endian).
pub(super) const THIN_SUPERBLOCK_MAGIC: u64 = 27022010;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolKind {
    /// Sparse files bound to loop devices: development only.
    Loop,
    /// Real block devices.
    Block,
}

impl PoolKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PoolKind::Loop => "loop",
            PoolKind::Block => "block",
        }
    }
}

/// Everything needed to assemble the pool again after a reboot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PoolSpec {
    pub dm_name: DmName,
    pub kind: PoolKind,
    pub data_path: PathBuf,
    pub meta_path: PathBuf,
    pub data_sectors: Sectors,
    pub meta_sectors: Sectors,
    pub block_sectors: Sectors,
    /// In pool blocks.
    pub low_water: u64,
}

/// Metadata size: thin_metadata_size's rule (48 bytes per data block) with
/// a 2x margin, at least 2 MiB, at most what the kernel uses (16 GiB),
/// rounded up to 4 KiB.
pub fn metadata_bytes(data_bytes: u64, block_sectors: u64) -> u64 {
    let blocks = data_bytes / (block_sectors.max(1) * 512);
    let b = (blocks.saturating_mul(48).saturating_mul(2)).clamp(MIN_META_BYTES, MAX_META_BYTES);
    b.div_ceil(4096) * 4096
}

fn check_block_sectors(block_sectors: u64) -> Result<()> {
    // The kernel wants 64 KiB..1 GiB in multiples of 64 KiB (128 sectors).
    if block_sectors < 128 || block_sectors % 128 != 0 || block_sectors > 2_097_152 {
        return Err(Error::usage(format!(
            "thin-pool block size {block_sectors} sectors: must be a multiple of 128 between 128 and 2097152"
        )));
    }
    Ok(())
}

fn low_water_for(data_blocks: u64) -> u64 {
    (data_blocks / 100).max(1)
}

/// The spec of a loop pool under `dir` (no files touched).
pub fn loop_spec(dir: &Path, dm_name: DmName, data_size: u64, block_sectors: u64) -> Result<PoolSpec> {
    check_block_sectors(block_sectors)?;
    let block_bytes = block_sectors * 512;
    let data_bytes = data_size / block_bytes * block_bytes;
    if data_bytes < 16 * block_bytes {
        return Err(Error::usage(format!(
            "pool data size {data_size} is too small (at least 16 blocks of {block_bytes} bytes)"
        )));
    }
    let meta_bytes = metadata_bytes(data_bytes, block_sectors);
    Ok(PoolSpec {
        dm_name,
        kind: PoolKind::Loop,
        data_path: dir.join("data.img"),
        meta_path: dir.join("meta.img"),
        data_sectors: Sectors(data_bytes / 512),
        meta_sectors: Sectors(meta_bytes / 512),
        block_sectors: Sectors(block_sectors),
        low_water: low_water_for(data_bytes / block_bytes),
    })
}

/// Create the sparse files of a loop pool spec, keeping files a rerun finds
/// with the right size (their content is the pool's).
pub fn make_loop_files(spec: &PoolSpec) -> Result<()> {
    if let Some(dir) = spec.data_path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    }
    for (p, size) in [(&spec.data_path, spec.data_sectors.bytes()), (&spec.meta_path, spec.meta_sectors.bytes())] {
        let f =
            OpenOptions::new().read(true).write(true).create(true).truncate(false).open(p).map_err(|e| {
                Error::new(Kind::CantCreate, format!("creating pool file {}", p.display())).with_source(e)
            })?;
        let have = f.metadata().map_err(|e| Error::io(format!("stat {}", p.display()), e))?.len();
        if have != size {
            if have > size {
                return Err(Error::new(
                    Kind::CantCreate,
                    format!(
                        "pool file {} exists with {have} bytes, more than the {size} asked for; refusing to shrink it",
                        p.display()
                    ),
                ));
            }
            f.set_len(size).map_err(|e| Error::io(format!("sizing {}", p.display()), e))?;
        }
        f.sync_all().map_err(|e| Error::io(format!("fsync {}", p.display()), e))?;
    }
    Ok(())
}

/// [`loop_spec`] + [`make_loop_files`]: sparse data and metadata files under `dir`.
pub fn create_loop_files(dir: &Path, dm_name: DmName, data_size: u64, block_sectors: u64) -> Result<PoolSpec> {
    let spec = loop_spec(dir, dm_name, data_size, block_sectors)?;
    make_loop_files(&spec)?;
    Ok(spec)
}

/// A pool spec on existing block devices (sizes read from the devices).
pub fn block_spec(dm_name: DmName, data_dev: &Path, meta_dev: &Path, block_sectors: u64) -> Result<PoolSpec> {
    check_block_sectors(block_sectors)?;
    let same = match (std::fs::metadata(data_dev), std::fs::metadata(meta_dev)) {
        (Ok(a), Ok(b)) => {
            use std::os::unix::fs::MetadataExt;
            (a.dev(), a.ino()) == (b.dev(), b.ino()) || (a.rdev() != 0 && a.rdev() == b.rdev())
        }
        _ => false,
    };
    if same {
        return Err(Error::usage(format!(
            "--data-dev {} and --meta-dev {} are the same device; the pool needs two",
            data_dev.display(),
            meta_dev.display()
        )));
    }
    let size = |p: &Path| -> Result<u64> {
        let mut f = std::fs::File::open(p).map_err(|e| Error::io(format!("opening {}", p.display()), e))?;
        f.seek(SeekFrom::End(0)).map_err(|e| Error::io(format!("size of {}", p.display()), e))
    };
    let data_sectors = size(data_dev)? / 512 / block_sectors * block_sectors;
    let meta_sectors = size(meta_dev)? / 512;
    if data_sectors < 16 * block_sectors || meta_sectors * 512 < MIN_META_BYTES {
        return Err(Error::usage(format!(
            "{} or {} is too small for a thin-pool (data at least 16 blocks, metadata at least 2 MiB)",
            data_dev.display(),
            meta_dev.display()
        )));
    }
    Ok(PoolSpec {
        dm_name,
        kind: PoolKind::Block,
        data_path: data_dev.to_path_buf(),
        meta_path: meta_dev.to_path_buf(),
        data_sectors: Sectors(data_sectors),
        meta_sectors: Sectors(meta_sectors),
        block_sectors: Sectors(block_sectors),
        low_water: low_water_for(data_sectors / block_sectors),
    })
}

/// Geometry a thin-pool superblock records: (data block size in sectors,
/// number of data blocks), or `None` when `meta` holds no superblock.
/// Offsets are those of `struct thin_disk_superblock`: magic at 32, the
/// data space map root (nr_blocks first) at 64, data_block_size at 336.
pub fn superblock_geometry(meta: &Path) -> Result<Option<(u64, u64)>> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(meta).map_err(|e| Error::io(format!("opening {}", meta.display()), e))?;
    let mut sb = [0u8; 512];
    f.read_exact_at(&mut sb, 0).map_err(|e| Error::io(format!("reading {}", meta.display()), e))?;
    let le64 = |o: usize| u64::from_le_bytes(sb[o..o + 8].try_into().unwrap_or([0; 8]));
    if le64(32) != THIN_SUPERBLOCK_MAGIC {
        return Ok(None);
    }
    let block = u64::from(u32::from_le_bytes(sb[336..340].try_into().unwrap_or([0; 4])));
    Ok(Some((block, le64(64))))
}

/// A stable identity of a block device, from sysfs: a dm uuid, a disk's
/// wwid or serial (with the partition number for a partition), or a loop
/// device's backing file. `None` when the kernel offers none.
pub fn device_identity(p: &Path) -> Option<String> {
    let dev = block_dev_of(p).ok()?;
    let sys = PathBuf::from(format!("/sys/dev/block/{}:{}", dev.major, dev.minor));
    let read =
        |rel: &str| std::fs::read_to_string(sys.join(rel)).ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
    let part = read("partition").map(|n| format!("/part{n}")).unwrap_or_default();
    for (rel, tag) in [
        ("dm/uuid", "dm"),
        ("device/wwid", "wwid"),
        ("device/serial", "serial"),
        ("../device/wwid", "wwid"),
        ("../device/serial", "serial"),
        ("loop/backing_file", "loop"),
    ] {
        if let Some(v) = read(rel) {
            return Some(format!("{tag}:{v}{part}"));
        }
    }
    None
}

/// Before a recorded block pool is assembled (after a reboot device names
/// may have moved): the metadata device must hold a thin-pool superblock
/// of exactly this pool's geometry, the data device must have its size,
/// and where identities were recorded they must match. dm-thin would
/// otherwise format a blank device taken for the metadata, or map the
/// pool onto another disk.
pub fn check_block_identity(spec: &PoolSpec, recorded: Option<(&str, &str)>) -> Result<()> {
    if spec.kind != PoolKind::Block {
        return Ok(());
    }
    let refuse = |why: String| {
        Error::new(
            Kind::HostFatal,
            format!(
                "refusing to assemble thin-pool {} on data {} / metadata {}: {why}; the device names may have changed (check /dev/disk/by-id and the recorded paths in `thinimg pool status --json`)",
                spec.dm_name,
                spec.data_path.display(),
                spec.meta_path.display()
            ),
        )
    };
    let want = (spec.block_sectors.0, spec.data_sectors.0 / spec.block_sectors.0.max(1));
    match superblock_geometry(&spec.meta_path)? {
        None => return Err(refuse(format!("{} holds no thin-pool superblock", spec.meta_path.display()))),
        Some(g) if g != want => {
            return Err(refuse(format!(
                "the superblock on {} is of another pool ({} sectors per block, {} blocks; this pool has {} and {})",
                spec.meta_path.display(),
                g.0,
                g.1,
                want.0,
                want.1
            )))
        }
        Some(_) => {}
    }
    let mut f = std::fs::File::open(&spec.data_path)
        .map_err(|e| Error::io(format!("opening {}", spec.data_path.display()), e))?;
    let size = f.seek(SeekFrom::End(0)).map_err(|e| Error::io(format!("size of {}", spec.data_path.display()), e))?;
    if size / 512 / spec.block_sectors.0.max(1) * spec.block_sectors.0 != spec.data_sectors.0 {
        return Err(refuse(format!("{} has {size} bytes, not the recorded pool's size", spec.data_path.display())));
    }
    if let Some((data_id, meta_id)) = recorded {
        for (p, want) in [(&spec.data_path, data_id), (&spec.meta_path, meta_id)] {
            match device_identity(p) {
                Some(got) if got != want => {
                    return Err(refuse(format!("{} is {got}, but the pool was created on {want}", p.display())))
                }
                _ => {}
            }
        }
    }
    Ok(())
}

/// The device number of block device node `p`.
pub(super) fn block_dev_of(p: &Path) -> Result<DevId> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let m = std::fs::metadata(p).map_err(|e| Error::io(format!("stat {}", p.display()), e))?;
    if !m.file_type().is_block_device() {
        return Err(Error::usage(format!("{} is not a block device", p.display())));
    }
    Ok(DevId::from_rdev(m.rdev()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_sizing_rule() {
        // 2 GiB of 64 KiB blocks = 32768 blocks * 96 B = 3 MiB.
        assert_eq!(metadata_bytes(2 << 30, 128), 3 << 20);
        assert_eq!(metadata_bytes(64 << 20, 128), 2 << 20);
        assert_eq!(metadata_bytes(1 << 50, 128), 16 << 30);
        assert_eq!(metadata_bytes(20 << 30, 128) % 4096, 0);
    }

    #[test]
    fn block_size_rule() {
        assert!(check_block_sectors(128).is_ok());
        assert!(check_block_sectors(256).is_ok());
        assert!(check_block_sectors(64).is_err());
        assert!(check_block_sectors(200).is_err());
    }

    #[test]
    fn superblock_geometry_reads_the_thin_superblock() {
        let d = std::env::temp_dir().join(format!("thinimg-sb-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("meta");
        let mut sb = vec![0u8; 4096];
        std::fs::write(&p, &sb).unwrap();
        assert_eq!(superblock_geometry(&p).unwrap(), None);
        sb[32..40].copy_from_slice(&THIN_SUPERBLOCK_MAGIC.to_le_bytes());
        sb[64..72].copy_from_slice(&4096u64.to_le_bytes());
        sb[336..340].copy_from_slice(&128u32.to_le_bytes());
        std::fs::write(&p, &sb).unwrap();
        assert_eq!(superblock_geometry(&p).unwrap(), Some((128, 4096)));
        // A loop spec is not checked; a block spec whose "device" is this
        // file is refused when the geometry or the data size differ.
        let mut spec = loop_spec(&d, DmName::new("p").unwrap(), 4096 * 65536, 128).unwrap();
        spec.kind = PoolKind::Block;
        spec.meta_path = p.clone();
        spec.data_path = d.join("data");
        std::fs::File::create(&spec.data_path).unwrap().set_len(4096 * 65536).unwrap();
        check_block_identity(&spec, None).unwrap();
        std::fs::File::create(&spec.data_path).unwrap().set_len(4000 * 65536).unwrap();
        assert_eq!(check_block_identity(&spec, None).unwrap_err().kind(), Kind::HostFatal);
        std::fs::File::create(&spec.data_path).unwrap().set_len(4096 * 65536).unwrap();
        spec.block_sectors = Sectors(256);
        spec.data_sectors = Sectors(4096 * 128);
        assert_eq!(check_block_identity(&spec, None).unwrap_err().kind(), Kind::HostFatal);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
