//! The crate's macros for text stored as an enum. Declared first in
//! `lib.rs`, so every module can use them.

/// Text stored in a table or the journal, as an enum: `as_str` spells it
/// as stored, `parse` refuses any other spelling with an error built from
/// `$unknown` (a format string with the named arguments `what` and `s`),
/// never a default. `Display` prints `as_str`.
macro_rules! text_enum {
    ($(#[$m:meta])* $name:ident, $what:literal, $unknown:literal { $($var:ident = $s:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name {
            $($var),+
        }

        impl $name {
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$var => $s),+
                }
            }

            pub fn parse(s: &str) -> crate::error::Result<$name> {
                match s {
                    $($s => Ok($name::$var),)+
                    _ => Err(crate::error::Error::software(format!($unknown, what = $what, s = s))),
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

/// A state column as an enum ([`text_enum!`]): spelled as the schema's
/// CHECK constraint does, serde prints and reads the same spelling, and a
/// row whose column this version cannot read is an error (never a default).
macro_rules! column_enum {
    ($(#[$m:meta])* $name:ident, $what:literal { $($var:ident = $s:literal),+ $(,)? }) => {
        text_enum! {
            $(#[$m])*
            #[derive(serde::Serialize, serde::Deserialize)]
            #[serde(rename_all = "lowercase")]
            $name, $what, "{what} has an unknown state {s:?}" { $($var = $s),+ }
        }

        impl rusqlite::types::FromSql for $name {
            fn column_result(v: rusqlite::types::ValueRef<'_>) -> rusqlite::types::FromSqlResult<Self> {
                $name::parse(v.as_str()?).map_err(|e| rusqlite::types::FromSqlError::Other(e.message().into()))
            }
        }

        impl rusqlite::types::ToSql for $name {
            fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
                Ok(self.as_str().into())
            }
        }
    };
}

/// A name the journal stores as text (a run kind, a step) that only the
/// pipeline reads ([`text_enum!`]): a spelling this version does not know
/// was written by a newer one, and is an error.
macro_rules! journal_enum {
    ($(#[$m:meta])* $name:ident, $what:literal { $($var:ident = $s:literal),+ $(,)? }) => {
        text_enum! {
            $(#[$m])*
            $name, $what, "unknown {what} {s:?} in the journal (written by a newer thinimg?)" { $($var = $s),+ }
        }
    };
}
