//! What is x86-64 specific: the memory layout, the CPU model, the boot protocol (registers, page
//! tables, zero page, kernel and initrd), and reading guest memory through the guest's paging.

pub mod boot_params;
pub mod cpuid;
pub mod fault;
pub mod kernel;
pub mod layout;
pub mod regs;
pub mod sti_shadow;
pub mod walk;
