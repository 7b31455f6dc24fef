//! The crate-wide error type and the exit-code contract.
//!
//! Every failure that reaches `main` is an [`Error`]: a [`Kind`] that decides
//! the documented exit code (sysexits), a message written for an operator
//! (naming the object, the entry and the rule where there is one), and the
//! underlying cause kept as a source. Mechanism modules may define their own
//! error enums; they convert into this one at their boundary. Nothing here
//! prints or exits.

use std::fmt;

/// Error classes. Each maps to exactly one exit code; see [`Kind::exit_code`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Bad command line (EX_USAGE, 64).
    Usage,
    /// Hostile, malformed or otherwise invalid input data, e.g. a rejected
    /// layer tarball (EX_DATAERR, 65). Permanent: not retried until the input changes.
    BadData,
    /// No such image, layer or object (EX_NOINPUT, 66).
    NoSuchImage,
    /// S3 or another service could not be reached or answered with errors (EX_UNAVAILABLE, 69).
    Unavailable,
    /// A device, file or directory could not be created (EX_CANTCREAT, 73).
    CantCreate,
    /// Local I/O failure (EX_IOERR, 74).
    Io,
    /// Temporary condition: another instance holds the lock, a device is busy,
    /// the pool is short of space. Try again later (EX_TEMPFAIL, 75).
    TempFail,
    /// Credentials rejected, access denied, or not running as root (EX_NOPERM, 77).
    NoPerm,
    /// Internal inconsistency: a bug or a database this version cannot read (EX_SOFTWARE, 70).
    Software,
    /// The host's storage is unsafe to touch: pool in needs_check, read-only or
    /// failed mode (EX_OSERR, 71). Stops everything.
    HostFatal,
    /// A bad configuration file (unknown key, invalid value, missing file),
    /// configuration that contradicts recorded state (pool devices that are
    /// not the recorded pool's), or a database written by a newer thinimg
    /// (EX_CONFIG, 78).
    Config,
    /// Interrupted by SIGINT (130).
    Interrupted,
    /// Terminated by SIGTERM (143).
    Terminated,
}

impl Kind {
    /// The process exit code for this class. Documented in `--help` and thinimg(8).
    pub fn exit_code(self) -> u8 {
        match self {
            Kind::Usage => 64,
            Kind::BadData => 65,
            Kind::NoSuchImage => 66,
            Kind::Unavailable => 69,
            Kind::Software => 70,
            Kind::HostFatal => 71,
            Kind::CantCreate => 73,
            Kind::Io => 74,
            Kind::TempFail => 75,
            Kind::NoPerm => 77,
            Kind::Config => 78,
            Kind::Interrupted => 130,
            Kind::Terminated => 143,
        }
    }

    /// Whether a journaled step that failed with this class may be retried
    /// automatically (bounded attempts with backoff).
    pub fn retryable(self) -> bool {
        matches!(self, Kind::Unavailable | Kind::TempFail | Kind::Io)
    }

    /// Stable lower-case name, used in JSON output and in the journal.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Usage => "usage",
            Kind::BadData => "bad_data",
            Kind::NoSuchImage => "no_such_image",
            Kind::Unavailable => "unavailable",
            Kind::CantCreate => "cant_create",
            Kind::Io => "io",
            Kind::TempFail => "temp_fail",
            Kind::NoPerm => "no_perm",
            Kind::Software => "software",
            Kind::HostFatal => "host_fatal",
            Kind::Config => "config",
            Kind::Interrupted => "interrupted",
            Kind::Terminated => "terminated",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        ALL_KINDS.iter().copied().find(|k| k.as_str() == s)
    }
}

pub const ALL_KINDS: [Kind; 13] = [
    Kind::Usage,
    Kind::BadData,
    Kind::NoSuchImage,
    Kind::Unavailable,
    Kind::Software,
    Kind::HostFatal,
    Kind::CantCreate,
    Kind::Io,
    Kind::TempFail,
    Kind::NoPerm,
    Kind::Config,
    Kind::Interrupted,
    Kind::Terminated,
];

/// An error with a class, an operator-facing message and an optional cause.
pub struct Error {
    kind: Kind,
    msg: String,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(kind: Kind, msg: impl Into<String>) -> Error {
        Error { kind, msg: msg.into(), source: None }
    }

    /// Attach the underlying cause (kept as `source()`, printed after the message).
    pub fn with_source(mut self, e: impl std::error::Error + Send + Sync + 'static) -> Error {
        self.source = Some(Box::new(e));
        self
    }

    pub fn usage(msg: impl Into<String>) -> Error {
        Error::new(Kind::Usage, msg)
    }
    pub fn bad_data(msg: impl Into<String>) -> Error {
        Error::new(Kind::BadData, msg)
    }
    pub fn software(msg: impl Into<String>) -> Error {
        Error::new(Kind::Software, msg)
    }

    /// An I/O error with what was being done: `Error::io("open /x", e)`.
    /// The class follows the errno: EACCES/EPERM are permission errors,
    /// ENOSPC/EBUSY/EAGAIN temporary, the rest plain I/O.
    pub fn io(what: impl Into<String>, e: std::io::Error) -> Error {
        let kind = match e.raw_os_error() {
            Some(libc::EACCES) | Some(libc::EPERM) => Kind::NoPerm,
            Some(libc::EBUSY) | Some(libc::EAGAIN) | Some(libc::ENOSPC) => Kind::TempFail,
            _ => Kind::Io,
        };
        Error::new(kind, what).with_source(e)
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }
    pub fn message(&self) -> &str {
        &self.msg
    }

    /// Prefix the message with more context, keeping kind and source.
    pub fn context(mut self, ctx: impl fmt::Display) -> Error {
        self.msg = format!("{ctx}: {}", self.msg);
        self
    }

    /// Change the class (e.g. an I/O error that is really hostile input).
    pub fn with_kind(mut self, kind: Kind) -> Error {
        self.kind = kind;
        self
    }

    /// The message followed by every cause in the chain, `: `-separated.
    pub fn full_message(&self) -> String {
        let mut s = self.msg.clone();
        let mut cur: Option<&(dyn std::error::Error + 'static)> = match &self.source {
            Some(b) => Some(b.as_ref()),
            None => None,
        };
        while let Some(e) = cur {
            let t = e.to_string();
            if !t.is_empty() && !s.ends_with(&t) {
                s.push_str(": ");
                s.push_str(&t);
            }
            cur = e.source();
        }
        s
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.full_message())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.msg)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.source {
            Some(b) => Some(b.as_ref()),
            None => None,
        }
    }
}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Error {
        let kind = match &e {
            rusqlite::Error::SqliteFailure(f, _)
                if matches!(f.code, rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) =>
            {
                Kind::TempFail
            }
            // A full state filesystem needs space freed, not a retry (not 75).
            rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::DiskFull => {
                return Error::new(
                    Kind::Io,
                    "database: the state filesystem is full (free space: 'thinimg gc' removes unused blobs and partial downloads)",
                )
                .with_source(e)
            }
            rusqlite::Error::SqliteFailure(f, _)
                if matches!(f.code, rusqlite::ErrorCode::ReadOnly | rusqlite::ErrorCode::CannotOpen) =>
            {
                Kind::CantCreate
            }
            // A damaged file is a storage problem, not a bug in thinimg.
            rusqlite::Error::SqliteFailure(f, _)
                if matches!(f.code, rusqlite::ErrorCode::NotADatabase | rusqlite::ErrorCode::DatabaseCorrupt) =>
            {
                Kind::Io
            }
            _ => Kind::Software,
        };
        if kind == Kind::Io {
            return Error::new(
                kind,
                "the database (state.db) is damaged; restore it from a backup taken with the pool's metadata, \
                 or move it aside and recover it with 'sqlite3 state.db .recover'",
            )
            .with_source(e);
        }
        Error::new(kind, "database").with_source(e)
    }
}

/// `result.ctx("what was being done")` for io results.
pub trait IoContext<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for std::result::Result<T, std::io::Error> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(what(), e))
    }
}

impl<T> IoContext<T> for std::result::Result<T, nix::errno::Errno> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(what(), std::io::Error::from(e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_are_the_documented_ones() {
        let got: Vec<(&str, u8)> = ALL_KINDS.iter().map(|k| (k.as_str(), k.exit_code())).collect();
        assert_eq!(
            got,
            vec![
                ("usage", 64),
                ("bad_data", 65),
                ("no_such_image", 66),
                ("unavailable", 69),
                ("software", 70),
                ("host_fatal", 71),
                ("cant_create", 73),
                ("io", 74),
                ("temp_fail", 75),
                ("no_perm", 77),
                ("config", 78),
                ("interrupted", 130),
                ("terminated", 143),
            ]
        );
        for k in ALL_KINDS {
            assert_eq!(Kind::parse(k.as_str()), Some(k));
        }
    }

    #[test]
    fn io_errors_are_classified_by_errno() {
        let e = Error::io("open x", std::io::Error::from_raw_os_error(libc::EACCES));
        assert_eq!(e.kind(), Kind::NoPerm);
        let e = Error::io("write x", std::io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(e.kind(), Kind::TempFail);
        let e = Error::io("read x", std::io::Error::from_raw_os_error(libc::EIO));
        assert_eq!(e.kind(), Kind::Io);
        assert!(e.full_message().starts_with("read x: "));
    }

    #[test]
    fn a_full_state_filesystem_is_not_retry_later() {
        let full = rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL), None);
        let e = Error::from(full);
        assert_eq!(e.kind(), Kind::Io);
        assert!(e.message().contains("state filesystem is full"), "{}", e.message());
    }
}
