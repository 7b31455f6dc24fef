//! The tar stream under limits: turns a sequential byte source into
//! [`Member`]s (one per file-system object) and their data.
//!
//! The tar crate decodes single header blocks (names with the ustar prefix,
//! link names, entry types); this module walks the blocks itself, because the
//! crate reads PAX and GNU extension bodies into memory without a size cap and
//! does not interpret PAX sparse files. Every size is checked against
//! [`Limits`] before anything is allocated or written, and every read that
//! comes up short is a truncation. It never touches the file system.

use std::collections::BTreeMap;
use std::io::Read;
use std::sync::Arc;

use super::rules::Reject;
use super::Limits;

pub const BLOCK: u64 = 512;

/// Extended attributes by name: one record replaces another in O(log n).
pub type Xattrs = BTreeMap<Vec<u8>, Vec<u8>>;

/// Records one extension header may hold (GNU.sparse.offset/numbytes pairs
/// of PAX 0.0 sparse files are counted by the sparse-map limit instead).
/// Real writers emit a handful; the cap keeps one header's cost bounded.
pub const MAX_PAX_RECORDS: usize = 4096;

/// xattrs one member may carry, its own and inherited from global headers.
pub const MAX_XATTRS: usize = 1024;

/// What a member creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberKind {
    File,
    Dir,
    Symlink,
    HardLink,
    Char,
    Block,
    Fifo,
}

/// The sparse layout of a file: data segments (offset, length) in the order
/// their bytes follow in the archive, and the apparent size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sparse {
    pub real_size: u64,
    pub map: Vec<(u64, u64)>,
}

/// One archive member after extension headers were folded in.
#[derive(Debug, Clone)]
pub struct Member {
    /// 1-based number of the member in the layer.
    pub index: u64,
    pub path: Vec<u8>,
    pub link: Vec<u8>,
    pub kind: MemberKind,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime_sec: i64,
    pub mtime_nsec: u32,
    pub dev_major: u32,
    pub dev_minor: u32,
    /// The member's own xattrs (local PAX header).
    pub xattrs: Xattrs,
    /// xattrs of the global headers so far, shared by every member (never
    /// copied per member); a local record of the same name wins.
    pub global_xattrs: Arc<Xattrs>,
    /// Bytes of file data that follow in the archive (after a PAX 1.0 sparse map).
    pub data_size: u64,
    pub sparse: Option<Sparse>,
}

impl Member {
    /// The apparent size of the file this member makes.
    pub fn apparent_size(&self) -> u64 {
        match &self.sparse {
            Some(s) => s.real_size,
            None => self.data_size,
        }
    }

    /// The member's path for messages.
    pub fn display(&self) -> String {
        display_path(&self.path)
    }

    /// Every xattr of the member: its own, then the inherited ones it does
    /// not override.
    pub fn all_xattrs(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        let own = self.xattrs.iter().map(|(k, v)| (k.as_slice(), v.as_slice()));
        let inherited = self
            .global_xattrs
            .iter()
            .filter(|(k, _)| !self.xattrs.contains_key(*k))
            .map(|(k, v)| (k.as_slice(), v.as_slice()));
        own.chain(inherited)
    }
}

/// A path for messages: lossy UTF-8, cut short when huge.
pub fn display_path(p: &[u8]) -> String {
    let s = String::from_utf8_lossy(&p[..p.len().min(200)]).into_owned();
    if p.len() > 200 {
        format!("{s}...({} bytes)", p.len())
    } else {
        s
    }
}

/// PAX records that matter to us, local or global.
#[derive(Default, Clone)]
struct Pax {
    path: Option<Vec<u8>>,
    linkpath: Option<Vec<u8>>,
    size: Option<u64>,
    uid: Option<u64>,
    gid: Option<u64>,
    mtime: Option<(i64, u32)>,
    xattrs: Xattrs,
    sparse_major: Option<u64>,
    sparse_minor: Option<u64>,
    sparse_name: Option<Vec<u8>>,
    sparse_realsize: Option<u64>,
    sparse_map: Option<Vec<u64>>,
    /// PAX 0.0: GNU.sparse.offset / GNU.sparse.numbytes records, in order.
    sparse_legacy: Vec<u64>,
}

/// Reads members from a sequential source.
pub struct TarStream<'a> {
    src: &'a mut dyn Read,
    limits: Limits,
    /// Bytes consumed from `src`.
    pub offset: u64,
    members: u64,
    /// Data bytes of the current member not yet read, and its padding.
    data_left: u64,
    pad_left: u64,
    /// Scalar and path records of the global headers (never xattrs or sparse records).
    global: Pax,
    global_xattrs: Arc<Xattrs>,
    /// Bytes the global state holds (names and values), capped by --max-header-size.
    global_bytes: u64,
    ended: bool,
}

/// A read interrupted by SIGINT/SIGTERM is not retried: the unpack stops
/// (the caller maps the interruption to exit 130/143), even while the
/// source has nothing to give.
fn signalled() -> bool {
    crate::ops::signals::pending().is_some()
}

fn rej(rule: &'static str, detail: impl Into<String>) -> Reject {
    Reject::new(rule, detail)
}

impl<'a> TarStream<'a> {
    pub fn new(src: &'a mut dyn Read, limits: Limits) -> TarStream<'a> {
        TarStream {
            src,
            limits,
            offset: 0,
            members: 0,
            data_left: 0,
            pad_left: 0,
            global: Pax::default(),
            global_xattrs: Arc::new(Xattrs::new()),
            global_bytes: 0,
            ended: false,
        }
    }

    /// Members read so far.
    pub fn members(&self) -> u64 {
        self.members
    }

    /// Fill `buf` completely; `Ok(false)` on a clean EOF before the first byte.
    fn fill(&mut self, buf: &mut [u8]) -> Result<bool, Reject> {
        let mut got = 0;
        while got < buf.len() {
            match self.src.read(&mut buf[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted && !signalled() => continue,
                Err(e) => return Err(Reject::io(e)),
            }
        }
        self.offset += got as u64;
        if got == 0 {
            return Ok(false);
        }
        if got < buf.len() {
            return Err(rej("truncated", format!("archive ends inside a 512-byte block at byte {}", self.offset)));
        }
        Ok(true)
    }

    /// Discard `n` bytes; short input is a truncation.
    fn skip(&mut self, mut n: u64, what: &str) -> Result<(), Reject> {
        let mut buf = [0u8; 8192];
        while n > 0 {
            let want = n.min(buf.len() as u64) as usize;
            let got = match self.src.read(&mut buf[..want]) {
                Ok(0) => {
                    return Err(rej("truncated", format!("archive ends {n} bytes before the end of {what}")));
                }
                Ok(k) => k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted && !signalled() => continue,
                Err(e) => return Err(Reject::io(e)),
            };
            self.offset += got as u64;
            n -= got as u64;
        }
        Ok(())
    }

    /// Read the whole body of an extension header (size already checked).
    fn read_body(&mut self, size: u64) -> Result<Vec<u8>, Reject> {
        let mut v = vec![0u8; size as usize];
        let mut got = 0;
        while got < v.len() {
            match self.src.read(&mut v[got..]) {
                Ok(0) => {
                    return Err(rej(
                        "truncated",
                        format!("archive ends {} bytes before the end of an extension header", v.len() - got),
                    ))
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted && !signalled() => continue,
                Err(e) => return Err(Reject::io(e)),
            }
        }
        self.offset += size;
        self.skip(padding(size), "an extension header")?;
        Ok(v)
    }

    /// Read data of the current member into `buf`; 0 at the end of its data.
    pub fn read_data(&mut self, buf: &mut [u8]) -> Result<usize, Reject> {
        if self.data_left == 0 {
            return Ok(0);
        }
        let want = (buf.len() as u64).min(self.data_left) as usize;
        loop {
            match self.src.read(&mut buf[..want]) {
                Ok(0) => {
                    return Err(rej(
                        "truncated",
                        format!("declared size not present: archive ends {} bytes early", self.data_left),
                    ))
                }
                Ok(n) => {
                    self.offset += n as u64;
                    self.data_left -= n as u64;
                    return Ok(n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted && !signalled() => continue,
                Err(e) => return Err(Reject::io(e)),
            }
        }
    }

    /// Skip what is left of the current member's data and padding.
    fn finish_member(&mut self) -> Result<(), Reject> {
        let n = self.data_left;
        self.data_left = 0;
        self.skip(n, "an entry's data")?;
        let p = self.pad_left;
        self.pad_left = 0;
        self.skip(p, "an entry's padding")
    }

    /// The next member, or `None` at the end of the archive.
    pub fn next_member(&mut self) -> Result<Option<Member>, Reject> {
        if self.ended {
            return Ok(None);
        }
        self.finish_member()?;
        let mut local = Pax::default();
        let mut have_local = false;
        let mut long_name: Option<Vec<u8>> = None;
        let mut long_link: Option<Vec<u8>> = None;
        let mut ext_bytes: u64 = 0;
        let mut pending_ext = false;
        loop {
            let mut block = [0u8; BLOCK as usize];
            let at = self.offset;
            if !self.fill(&mut block)? {
                if pending_ext {
                    return Err(rej("truncated", "archive ends after an extension header, before its entry"));
                }
                self.ended = true;
                return Ok(None);
            }
            if block.iter().all(|&b| b == 0) {
                if pending_ext {
                    return Err(rej("orphan-extension", "extension header followed by the end-of-archive marker"));
                }
                // End of archive; whatever follows (a second zero block, a
                // trailer, a concatenated archive) is not part of this layer.
                self.ended = true;
                return Ok(None);
            }
            if !crate::magic::header_checksum_ok(&block) {
                return Err(rej("header-checksum", format!("header block at byte {at} has a bad checksum")));
            }
            let header = tar::Header::from_byte_slice(&block);
            let typeflag = block[156];
            let size =
                num(&block[124..136]).map_err(|m| rej("header-field", format!("size field at byte {at}: {m}")))?;
            match typeflag {
                // 'X' is Solaris's name for the PAX local header.
                b'L' | b'K' | b'x' | b'X' | b'g' => {
                    ext_bytes = ext_bytes.saturating_add(size);
                    if size > self.limits.max_header_size || ext_bytes > self.limits.max_header_size {
                        return Err(rej(
                            "header-size",
                            format!(
                                "extension header of {} bytes exceeds --max-header-size {}",
                                ext_bytes.max(size),
                                self.limits.max_header_size
                            ),
                        ));
                    }
                    let body = self.read_body(size)?;
                    match typeflag {
                        b'L' => long_name = Some(cut_nul(body)),
                        b'K' => long_link = Some(cut_nul(body)),
                        b'x' | b'X' => {
                            parse_pax(&body, &mut local)?;
                            have_local = true;
                        }
                        _ => {
                            self.fold_global(&body)?;
                            self.members += 1;
                            self.check_count()?;
                            // A global header is a member of its own; a
                            // member must not follow it necessarily.
                            continue;
                        }
                    }
                    pending_ext = true;
                    continue;
                }
                _ => {}
            }
            self.members += 1;
            self.check_count()?;
            let pax = merge(&self.global, if have_local { Some(local) } else { None });
            let m = self.member(header, &block, size, pax, long_name, long_link)?;
            return Ok(Some(m));
        }
    }

    /// Fold a global ('g') header into the state every later member
    /// inherits: applied once here, shared by reference afterwards.
    fn fold_global(&mut self, body: &[u8]) -> Result<(), Reject> {
        let mut g = Pax::default();
        parse_pax(body, &mut g)?;
        if g.sparse_major.is_some()
            || g.sparse_minor.is_some()
            || g.sparse_name.is_some()
            || g.sparse_realsize.is_some()
            || g.sparse_map.is_some()
            || !g.sparse_legacy.is_empty()
        {
            return Err(rej("pax-record", "GNU.sparse.* records in a global header (they describe one file)"));
        }
        macro_rules! take {
            ($($f:ident),*) => { $( if g.$f.is_some() { self.global.$f = g.$f.take(); } )* };
        }
        take!(path, linkpath, size, uid, gid, mtime);
        if !g.xattrs.is_empty() {
            let map = Arc::make_mut(&mut self.global_xattrs);
            map.append(&mut g.xattrs);
            if map.len() > MAX_XATTRS {
                return Err(rej("xattr-count", format!("global headers declare more than {MAX_XATTRS} xattrs")));
            }
        }
        let lens = |v: &Option<Vec<u8>>| v.as_ref().map_or(0, |v| v.len() as u64);
        self.global_bytes = self.global_xattrs.iter().map(|(k, v)| (k.len() + v.len()) as u64).sum::<u64>()
            + lens(&self.global.path)
            + lens(&self.global.linkpath);
        if self.global_bytes > self.limits.max_header_size {
            return Err(rej(
                "header-size",
                format!(
                    "global extension headers add up to {} bytes, more than --max-header-size {}",
                    self.global_bytes, self.limits.max_header_size
                ),
            ));
        }
        Ok(())
    }

    fn check_count(&self) -> Result<(), Reject> {
        if self.members > self.limits.max_entries {
            return Err(rej("entry-count", format!("more than --max-entries {} entries", self.limits.max_entries)));
        }
        Ok(())
    }

    fn member(
        &mut self,
        header: &tar::Header,
        block: &[u8; 512],
        header_size: u64,
        mut pax: Pax,
        long_name: Option<Vec<u8>>,
        long_link: Option<Vec<u8>>,
    ) -> Result<Member, Reject> {
        let typeflag = block[156];
        let path = match (&pax.path, &long_name) {
            (Some(p), _) => p.clone(),
            (None, Some(l)) => l.clone(),
            (None, None) => header.path_bytes().into_owned(),
        };
        let link = match (&pax.linkpath, &long_link) {
            (Some(p), _) => p.clone(),
            (None, Some(l)) => l.clone(),
            (None, None) => header.link_name_bytes().map(|c| c.into_owned()).unwrap_or_default(),
        };
        let field = |r: std::ops::Range<usize>, name: &str| {
            num(&block[r]).map_err(|m| rej("header-field", format!("{name} field: {m}")))
        };
        let mode = (field(100..108, "mode")? & 0o7777) as u32;
        let uid = match pax.uid {
            Some(u) => u,
            None => field(108..116, "uid")?,
        };
        let gid = match pax.gid {
            Some(g) => g,
            None => field(116..124, "gid")?,
        };
        let (mtime_sec, mtime_nsec) = match pax.mtime {
            Some(t) => t,
            None => {
                let t = field(136..148, "mtime")?;
                (i64::try_from(t).map_err(|_| rej("header-field", "mtime out of range"))?, 0)
            }
        };
        let is_ustar = &block[257..262] == b"ustar";
        let (dev_major, dev_minor) = if is_ustar && matches!(typeflag, b'3' | b'4') {
            let ma = field(329..337, "devmajor")?;
            let mi = field(337..345, "devminor")?;
            (
                u32::try_from(ma).map_err(|_| rej("header-field", "device major out of range"))?,
                u32::try_from(mi).map_err(|_| rej("header-field", "device minor out of range"))?,
            )
        } else {
            (0, 0)
        };
        let kind = match typeflag {
            b'0' | 0 | b'7' => MemberKind::File,
            b'1' => MemberKind::HardLink,
            b'2' => MemberKind::Symlink,
            b'3' => MemberKind::Char,
            b'4' => MemberKind::Block,
            b'5' => MemberKind::Dir,
            // GNU dumpdir: a directory whose data lists its contents (skipped).
            b'D' => MemberKind::Dir,
            b'6' => MemberKind::Fifo,
            b'S' => MemberKind::File,
            // Old tars mark directories by a trailing slash on a regular entry.
            other => {
                return Err(rej("entry-type", format!("unsupported entry type {:?} (0x{other:02x})", other as char)))
            }
        };
        let kind =
            if kind == MemberKind::File && typeflag != b'S' && path.ends_with(b"/") { MemberKind::Dir } else { kind };
        // Like Go's archive/tar and GNU tar: links, devices, directories and
        // FIFOs carry no data whatever their size field says (old writers
        // put the target's size on hard links, with no bytes following).
        let header_only = typeflag != b'D'
            && matches!(
                kind,
                MemberKind::HardLink
                    | MemberKind::Symlink
                    | MemberKind::Char
                    | MemberKind::Block
                    | MemberKind::Dir
                    | MemberKind::Fifo
            );
        let stored = if header_only { 0 } else { pax.size.unwrap_or(header_size) };
        if pax.xattrs.len() + self.global_xattrs.len() > MAX_XATTRS {
            let inherited = self.global_xattrs.keys().filter(|k| !pax.xattrs.contains_key(*k)).count();
            if pax.xattrs.len() + inherited > MAX_XATTRS {
                return Err(rej("xattr-count", format!("an entry carries more than {MAX_XATTRS} xattrs")));
            }
        }
        let mut m = Member {
            index: self.members,
            path,
            link,
            kind,
            mode,
            uid,
            gid,
            mtime_sec,
            mtime_nsec,
            dev_major,
            dev_minor,
            xattrs: std::mem::take(&mut pax.xattrs),
            global_xattrs: self.global_xattrs.clone(),
            data_size: stored,
            sparse: None,
        };
        // Data follows every member type whose size says so; only regular
        // files keep it, the rest is skipped (never written through a link).
        self.data_left = stored;
        self.pad_left = padding(stored);
        if typeflag == b'S' {
            m.sparse = Some(self.gnu_old_sparse(block)?);
        } else if pax.sparse_major.is_some() || pax.sparse_map.is_some() || !pax.sparse_legacy.is_empty() {
            if let Some(n) = &pax.sparse_name {
                m.path = n.clone();
            }
            m.sparse = Some(self.pax_sparse(&pax)?);
        }
        if let Some(s) = &m.sparse {
            m.data_size = self.data_left;
            check_sparse_map(s, m.data_size)?;
        }
        Ok(m)
    }

    fn gnu_old_sparse(&mut self, block: &[u8; 512]) -> Result<Sparse, Reject> {
        let bad = |m: String| rej("sparse-map", m);
        let mut map = Vec::new();
        let push = |e: &[u8], map: &mut Vec<(u64, u64)>| -> Result<(), Reject> {
            if e.iter().all(|&b| b == 0) {
                return Ok(());
            }
            let off = num(&e[0..12]).map_err(|m| bad(format!("offset: {m}")))?;
            let len = num(&e[12..24]).map_err(|m| bad(format!("length: {m}")))?;
            map.push((off, len));
            Ok(())
        };
        for i in 0..4 {
            let s = 386 + i * 24;
            push(&block[s..s + 24], &mut map)?;
        }
        let real_size = num(&block[483..495]).map_err(|m| bad(format!("real size: {m}")))?;
        let mut extended = block[482] != 0;
        while extended {
            if map.len() > 100_000 {
                return Err(bad("more than 100000 sparse segments".into()));
            }
            let mut ext = [0u8; 512];
            if !self.fill(&mut ext)? {
                return Err(rej("truncated", "archive ends inside a sparse map"));
            }
            for i in 0..21 {
                let s = i * 24;
                push(&ext[s..s + 24], &mut map)?;
            }
            extended = ext[504] != 0;
        }
        Ok(Sparse { real_size, map })
    }

    fn pax_sparse(&mut self, pax: &Pax) -> Result<Sparse, Reject> {
        let bad = |m: &str| rej("sparse-map", m.to_string());
        let real_size = pax.sparse_realsize.ok_or_else(|| bad("PAX sparse file without GNU.sparse.realsize/size"))?;
        match (pax.sparse_major, pax.sparse_minor) {
            (Some(1), Some(0)) => {
                // The map is text at the start of the data: count, then
                // offset/length pairs, one number a line, padded to a block.
                let mut numbers: Vec<u64> = Vec::new();
                let mut line: Vec<u8> = Vec::new();
                let mut read: u64 = 0;
                let done = |numbers: &Vec<u64>| match numbers.first() {
                    Some(&w) => numbers.len() as u64 == 1 + 2 * w,
                    None => false,
                };
                while !done(&numbers) {
                    if read >= self.limits.max_header_size {
                        return Err(rej("header-size", "PAX 1.0 sparse map exceeds --max-header-size"));
                    }
                    if self.data_left < 512 {
                        return Err(bad("sparse map runs past the entry's data"));
                    }
                    let mut blk = [0u8; 512];
                    self.read_exact_data(&mut blk)?;
                    read += 512;
                    for &c in blk.iter() {
                        if c != b'\n' {
                            if line.len() >= 20 {
                                return Err(bad("sparse map line is not a number"));
                            }
                            line.push(c);
                            continue;
                        }
                        let s = std::str::from_utf8(&line).map_err(|_| bad("sparse map is not text"))?;
                        numbers.push(s.parse::<u64>().map_err(|_| bad("sparse map number"))?);
                        line.clear();
                        if numbers.len() == 1 && numbers[0] > 1_000_000 {
                            return Err(bad("more than 1000000 sparse segments"));
                        }
                        if done(&numbers) {
                            break;
                        }
                    }
                }
                let map = numbers[1..].chunks(2).map(|c| (c[0], c[1])).collect();
                Ok(Sparse { real_size, map })
            }
            _ => match &pax.sparse_map {
                Some(v) if v.len() % 2 == 0 => {
                    Ok(Sparse { real_size, map: v.chunks(2).map(|c| (c[0], c[1])).collect() })
                }
                Some(_) => Err(bad("GNU.sparse.map has an odd number of values")),
                None if pax.sparse_legacy.len() % 2 == 0 => {
                    Ok(Sparse { real_size, map: pax.sparse_legacy.chunks(2).map(|c| (c[0], c[1])).collect() })
                }
                None => Err(bad("GNU.sparse.offset/numbytes records do not pair up")),
            },
        }
    }

    fn read_exact_data(&mut self, buf: &mut [u8]) -> Result<usize, Reject> {
        let mut got = 0;
        while got < buf.len() {
            let n = self.read_data(&mut buf[got..])?;
            if n == 0 {
                break;
            }
            got += n;
        }
        Ok(got)
    }
}

/// Segments must be in order, not overlap, end inside the apparent size and
/// add up to the data present.
fn check_sparse_map(s: &Sparse, data: u64) -> Result<(), Reject> {
    let mut end = 0u64;
    let mut sum = 0u64;
    for &(off, len) in &s.map {
        if off < end {
            return Err(rej("sparse-map", "sparse segments overlap or are out of order"));
        }
        end = off.checked_add(len).ok_or_else(|| rej("sparse-map", "sparse segment overflows"))?;
        if end > s.real_size {
            return Err(rej("sparse-map", "sparse segment ends beyond the real size"));
        }
        sum = sum.checked_add(len).ok_or_else(|| rej("sparse-map", "sparse lengths overflow"))?;
    }
    // Writers may store a little more than the map names (libarchive's
    // tests do); the excess is skipped. Less is a lie about the data.
    if sum > data {
        return Err(rej("sparse-map", format!("sparse segments hold {sum} bytes but the entry stores only {data}")));
    }
    Ok(())
}

fn padding(size: u64) -> u64 {
    (BLOCK - size % BLOCK) % BLOCK
}

fn cut_nul(mut v: Vec<u8>) -> Vec<u8> {
    if let Some(p) = v.iter().position(|&b| b == 0) {
        v.truncate(p);
    }
    v
}

/// The records a member sees: its local header's, else the global ones.
/// Only small fields are copied from the global state; its xattrs are
/// shared through `TarStream::global_xattrs`.
fn merge(global: &Pax, local: Option<Pax>) -> Pax {
    let mut p = local.unwrap_or_default();
    macro_rules! inherit {
        ($($f:ident),*) => { $( if p.$f.is_none() { p.$f = global.$f.clone(); } )* };
    }
    inherit!(path, linkpath, size, uid, gid, mtime);
    p
}

/// A numeric header field: octal text (NUL/space padded) or GNU base-256.
/// Negative base-256 values are refused.
pub fn num(field: &[u8]) -> Result<u64, String> {
    if field.first().is_some_and(|b| b & 0x80 != 0) {
        if field[0] & 0x40 != 0 {
            return Err("negative base-256 number".into());
        }
        let mut v: u64 = u64::from(field[0] & 0x3f);
        for &b in &field[1..] {
            v = v.checked_mul(256).and_then(|v| v.checked_add(u64::from(b))).ok_or("base-256 number overflows")?;
        }
        return Ok(v);
    }
    let t: &[u8] = {
        let s = field.iter().position(|&b| b != b' ' && b != 0).unwrap_or(field.len());
        let rest = &field[s..];
        let e = rest.iter().position(|&b| b == b' ' || b == 0).unwrap_or(rest.len());
        if rest[e..].iter().any(|&b| b != b' ' && b != 0) {
            return Err("garbage after octal number".into());
        }
        &rest[..e]
    };
    let mut v: u64 = 0;
    for &b in t {
        if !(b'0'..=b'7').contains(&b) {
            return Err(format!("not an octal number: {:?}", String::from_utf8_lossy(field)));
        }
        v = v.checked_mul(8).and_then(|v| v.checked_add(u64::from(b - b'0'))).ok_or("octal number overflows")?;
    }
    Ok(v)
}

fn dec(v: &[u8], key: &str) -> Result<u64, Reject> {
    let s = std::str::from_utf8(v).map_err(|_| rej("pax-record", format!("{key} is not a number")))?;
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(rej("pax-record", format!("{key}={s:?} is not a non-negative decimal number")));
    }
    s.parse::<u64>().map_err(|_| rej("pax-record", format!("{key}={s:?} is out of range")))
}

fn pax_time(v: &[u8]) -> Result<(i64, u32), Reject> {
    let bad = || rej("pax-record", format!("mtime={:?} is not a time", String::from_utf8_lossy(v)));
    let s = std::str::from_utf8(v).map_err(|_| bad())?;
    let (neg, s) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s),
    };
    let (whole, frac) = match s.split_once('.') {
        Some((w, f)) => (w, f),
        None => (s, ""),
    };
    if whole.is_empty() || !whole.bytes().all(|b| b.is_ascii_digit()) || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let w: i64 = whole.parse().map_err(|_| bad())?;
    let mut ns: u32 = 0;
    for (i, c) in frac.bytes().take(9).enumerate() {
        ns += u32::from(c - b'0') * 10u32.pow(8 - i as u32);
    }
    if neg {
        if ns > 0 {
            Ok((-w - 1, 1_000_000_000 - ns))
        } else {
            Ok((-w, 0))
        }
    } else {
        Ok((w, ns))
    }
}

/// Strict PAX record parsing: "LEN KEY=VALUE\n", LEN counting the whole record.
fn parse_pax(body: &[u8], out: &mut Pax) -> Result<(), Reject> {
    let mut rest = body;
    let mut records = 0usize;
    while !rest.is_empty() {
        // GNU tar pads nothing, but some writers leave NULs after the last record.
        if rest.iter().all(|&b| b == 0) {
            break;
        }
        let sp = rest.iter().position(|&b| b == b' ').ok_or_else(|| rej("pax-record", "record without a length"))?;
        let len_s = std::str::from_utf8(&rest[..sp]).map_err(|_| rej("pax-record", "record length is not text"))?;
        if len_s.is_empty() || !len_s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(rej("pax-record", format!("record length {len_s:?} is not a number")));
        }
        let len: usize = len_s.parse().map_err(|_| rej("pax-record", "record length out of range"))?;
        if len <= sp + 1 || len > rest.len() {
            return Err(rej("pax-record", format!("record length {len} does not fit the header")));
        }
        let rec = &rest[sp + 1..len];
        if rec.last() != Some(&b'\n') {
            return Err(rej("pax-record", "record not terminated by a newline"));
        }
        let rec = &rec[..rec.len() - 1];
        let eq = rec.iter().position(|&b| b == b'=').ok_or_else(|| rej("pax-record", "record without '='"))?;
        let (key, val) = (&rec[..eq], &rec[eq + 1..]);
        if key.is_empty() {
            return Err(rej("pax-record", "record with an empty key"));
        }
        if key.contains(&0) {
            return Err(rej("pax-record", "record key contains NUL"));
        }
        if key != b"GNU.sparse.offset" && key != b"GNU.sparse.numbytes" {
            records += 1;
            if records > MAX_PAX_RECORDS {
                return Err(rej(
                    "pax-records",
                    format!("an extension header holds more than {MAX_PAX_RECORDS} records"),
                ));
            }
        }
        apply_record(key, val, out)?;
        rest = &rest[len..];
    }
    Ok(())
}

fn apply_record(key: &[u8], val: &[u8], out: &mut Pax) -> Result<(), Reject> {
    let k = String::from_utf8_lossy(key);
    match key {
        b"path" | b"linkpath" => {
            if val.contains(&0) {
                return Err(rej("nul-in-path", format!("PAX {k} contains a NUL byte")));
            }
            if key == b"path" {
                out.path = Some(val.to_vec());
            } else {
                out.linkpath = Some(val.to_vec());
            }
        }
        b"size" => out.size = Some(dec(val, "size")?),
        b"uid" => out.uid = Some(dec(val, "uid")?),
        b"gid" => out.gid = Some(dec(val, "gid")?),
        b"mtime" => out.mtime = Some(pax_time(val)?),
        b"GNU.sparse.major" => out.sparse_major = Some(dec(val, &k)?),
        b"GNU.sparse.minor" => out.sparse_minor = Some(dec(val, &k)?),
        b"GNU.sparse.name" => {
            if val.contains(&0) {
                return Err(rej("nul-in-path", "GNU.sparse.name contains a NUL byte"));
            }
            out.sparse_name = Some(val.to_vec())
        }
        b"GNU.sparse.realsize" | b"GNU.sparse.size" => out.sparse_realsize = Some(dec(val, &k)?),
        b"GNU.sparse.map" => {
            let mut v = Vec::new();
            if !val.is_empty() {
                for part in val.split(|&b| b == b',') {
                    v.push(dec(part, "GNU.sparse.map")?);
                    if v.len() > 2_000_000 {
                        return Err(rej("sparse-map", "more than 1000000 sparse segments"));
                    }
                }
            }
            out.sparse_map = Some(v);
        }
        b"GNU.sparse.offset" | b"GNU.sparse.numbytes" => {
            // Pairs must alternate offset, numbytes.
            let is_offset = key == b"GNU.sparse.offset";
            if is_offset != (out.sparse_legacy.len() % 2 == 0) {
                return Err(rej("sparse-map", "GNU.sparse.offset/numbytes records out of order"));
            }
            if out.sparse_legacy.len() >= 2_000_000 {
                return Err(rej("sparse-map", "more than 1000000 sparse segments"));
            }
            out.sparse_legacy.push(dec(val, &k)?);
        }
        _ => {
            if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                if name.is_empty() {
                    return Err(rej("xattr-name", "empty xattr name"));
                }
                out.xattrs.insert(name.to_vec(), val.to_vec());
            }
            // Everything else (atime, ctime, uname, gname, comment, charset,
            // vendor keys) carries nothing we apply.
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numeric_fields() {
        assert_eq!(num(b"0000644\0"), Ok(0o644));
        assert_eq!(num(b"   12 \0"), Ok(0o12));
        assert_eq!(num(b"\0\0\0\0"), Ok(0));
        assert!(num(b"12x4\0").is_err());
        assert!(num(b"1 2\0").is_err());
        assert_eq!(num(&[0x80, 0, 0, 0, 0, 0, 0, 1]), Ok(1));
        assert!(num(&[0xff, 0xff, 0, 0, 0, 0, 0, 1]).is_err());
        assert!(num(&[0x80, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]).is_err());
    }

    #[test]
    fn pax_records_are_strict() {
        let mut p = Pax::default();
        parse_pax(b"13 path=abcd\n", &mut p).unwrap();
        assert_eq!(p.path.as_deref(), Some(&b"abcd"[..]));
        assert!(parse_pax(b"14 path=abcd\n", &mut Pax::default()).is_err());
        assert!(parse_pax(b"13 path=abcdX", &mut Pax::default()).is_err());
        assert!(parse_pax(b"999999999999 path=a\n", &mut Pax::default()).is_err());
        assert!(parse_pax(b"14 path=ab\0cd\n", &mut Pax::default()).is_err());
        assert!(parse_pax(b"9 size=-1\n", &mut Pax::default()).is_err());
        let mut p = Pax::default();
        parse_pax(b"21 mtime=1.500000000\n", &mut p).unwrap();
        assert_eq!(p.mtime, Some((1, 500_000_000)));
        assert_eq!(pax_time(b"-1.25").unwrap(), (-2, 750_000_000));
    }

    #[test]
    fn sparse_map_checks() {
        let ok = Sparse { real_size: 100, map: vec![(0, 10), (50, 10)] };
        assert!(check_sparse_map(&ok, 20).is_ok());
        assert!(check_sparse_map(&ok, 19).is_err());
        assert!(check_sparse_map(&ok, 21).is_ok());
        let overlap = Sparse { real_size: 100, map: vec![(0, 10), (5, 10)] };
        assert!(check_sparse_map(&overlap, 20).is_err());
        let beyond = Sparse { real_size: 10, map: vec![(5, 10)] };
        assert!(check_sparse_map(&beyond, 10).is_err());
    }
}
