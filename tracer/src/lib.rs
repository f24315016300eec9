//! The DWARF index the replay tracer works from, over a kernel `vmlinux` or a user binary.
//!
//! [`Index::build`] reads the ELF symbols, the `__fentry__` sites (`__mcount_loc`) and the DWARF:
//! every function with code, its address ranges, inlined instances, parameters with their types
//! and where each is at entry (SysV registers or DWARF locations), named struct layouts for
//! introspection ([`Index::member`], [`Index::task_layout`]) and where the current task pointer
//! lives ([`Index::current_task`]). The index serializes ([`Index::to_bytes`]) so a kernel's
//! index is built once and cached by its content key.

mod dwarf;
mod elf;
mod error;
mod index;
mod introspect;
mod location;
mod merge;
mod model;
mod returns;
mod types;
mod user;

pub use error::IndexError;
pub use index::{BuildOptions, Index};
pub use introspect::{MemberInfo, TaskLayout};
pub use model::{
    CurrentTask, Function, Inlined, Layout, Location, Member, Param, Range, Reg, Symbol,
    SymbolKind, SyscallParam, Type, TypeId,
};
pub use returns::{ReturnKind, ReturnSite};
pub use types::{format_enum, TypeTable, ValueKind};
pub use user::UserImage;
