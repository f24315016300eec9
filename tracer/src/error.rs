//! The crate's errors.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not an ELF file this index can read")]
    Elf {
        path: PathBuf,
        #[source]
        source: object::read::Error,
    },
    #[error("{path} has compressed debug sections, which this index does not read")]
    Compressed { path: PathBuf },
    #[error("malformed DWARF")]
    Dwarf(#[from] gimli::Error),
    #[error("__fentry__ sites: {0}")]
    Fentry(String),
    #[error("no struct or union named `{0}` in the DWARF")]
    NoStruct(String),
    #[error("`{strukt}` has no member `{path}`")]
    NoMember { strukt: String, path: String },
    #[error("neither `current_task` nor `pcpu_hot.current_task` is in the symbols")]
    NoCurrentTask,
    #[error("the cached index is not in this version's format")]
    CacheFormat,
    #[error("the cached index is unreadable")]
    CacheDecode(#[source] postcard::Error),
}
