//! Architecture-specific parts of the VMM. rrr only targets x86-64.

pub mod x86_64;
