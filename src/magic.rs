//! Recognising what a blob is from its first bytes.
//!
//! Used twice: by the downloader, to refuse non-tar content as soon as the
//! first block arrives, and by the extractor, so compressed or foreign data
//! is never fed to the tar parser as garbage.

/// What the first bytes of a blob say it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Magic {
    /// A tar header block with a valid checksum (ustar, GNU or v7).
    Tar,
    /// An all-zero first block: an empty archive (only end-of-archive blocks).
    EmptyTar,
    Gzip,
    Zstd,
    Xz,
    Bzip2,
    Lz4,
    Zip,
    /// Fewer than 512 bytes: too short to be any tar with content.
    TooShort,
    Unknown,
}

impl Magic {
    pub fn name(self) -> &'static str {
        match self {
            Magic::Tar => "tar",
            Magic::EmptyTar => "empty tar",
            Magic::Gzip => "gzip",
            Magic::Zstd => "zstd",
            Magic::Xz => "xz",
            Magic::Bzip2 => "bzip2",
            Magic::Lz4 => "lz4",
            Magic::Zip => "zip",
            Magic::TooShort => "truncated (shorter than one 512-byte tar block)",
            Magic::Unknown => "not a tar archive (first block has no valid tar header checksum)",
        }
    }

    pub fn is_compressed(self) -> bool {
        matches!(self, Magic::Gzip | Magic::Zstd | Magic::Xz | Magic::Bzip2 | Magic::Lz4)
    }
}

/// Classify a blob by its first bytes (pass at least 512 if available).
pub fn classify(head: &[u8]) -> Magic {
    if head.starts_with(&[0x1f, 0x8b]) {
        return Magic::Gzip;
    }
    if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        return Magic::Zstd;
    }
    if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0x00]) {
        return Magic::Xz;
    }
    if head.starts_with(b"BZh") && head.len() > 3 && (b'1'..=b'9').contains(&head[3]) {
        return Magic::Bzip2;
    }
    if head.starts_with(&[0x04, 0x22, 0x4d, 0x18]) {
        return Magic::Lz4;
    }
    if head.starts_with(b"PK\x03\x04") {
        return Magic::Zip;
    }
    if head.len() < 512 {
        return Magic::TooShort;
    }
    let block = &head[..512];
    if block.iter().all(|&b| b == 0) {
        return Magic::EmptyTar;
    }
    if header_checksum_ok(block) {
        Magic::Tar
    } else {
        Magic::Unknown
    }
}

/// The tar checksum: the sum of the header's bytes with the checksum field
/// (offset 148, 8 bytes) counted as spaces, stored as octal. Both the
/// unsigned and the historic signed sum are accepted.
pub fn header_checksum_ok(block: &[u8]) -> bool {
    if block.len() < 512 {
        return false;
    }
    let field = &block[148..156];
    let digits: Vec<u8> =
        field.iter().copied().skip_while(|&b| b == b' ' || b == 0).take_while(|b| (b'0'..=b'7').contains(b)).collect();
    if digits.is_empty() {
        return false;
    }
    let mut want: u64 = 0;
    for d in digits {
        want = match want.checked_mul(8).and_then(|w| w.checked_add(u64::from(d - b'0'))) {
            Some(w) => w,
            None => return false,
        };
    }
    let mut unsigned: u64 = 0;
    let mut signed: i64 = 0;
    for (i, &b) in block[..512].iter().enumerate() {
        let b = if (148..156).contains(&i) { b' ' } else { b };
        unsigned += u64::from(b);
        signed += i64::from(b as i8);
    }
    want == unsigned || (signed >= 0 && want == signed as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_header() -> Vec<u8> {
        let mut h = tar::Header::new_ustar();
        h.set_path("etc/hostname").unwrap();
        h.set_size(3);
        h.set_mode(0o644);
        h.set_cksum();
        h.as_bytes().to_vec()
    }

    #[test]
    fn recognises_formats() {
        assert_eq!(classify(&tar_header()), Magic::Tar);
        assert_eq!(classify(&[0u8; 1024]), Magic::EmptyTar);
        assert_eq!(classify(&[0x1f, 0x8b, 8, 0]), Magic::Gzip);
        assert_eq!(classify(&[0x28, 0xb5, 0x2f, 0xfd, 0]), Magic::Zstd);
        assert_eq!(classify(b"\xfd7zXZ\x00\x00"), Magic::Xz);
        assert_eq!(classify(b"BZh91AY&SY"), Magic::Bzip2);
        assert_eq!(classify(b"hello"), Magic::TooShort);
        assert_eq!(classify(&[b'x'; 512]), Magic::Unknown);
        let mut bad = tar_header();
        bad[0] ^= 1;
        assert_eq!(classify(&bad), Magic::Unknown);
    }
}
