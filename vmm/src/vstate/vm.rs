//! The VM file descriptor: guest memory registration and vCPU creation.
//!
//! Deliberately absent: `KVM_CREATE_IRQCHIP`, `KVM_CREATE_PIT2`, ioeventfd and irqfd. Every
//! device lives in userspace on the vCPU thread so that interrupts land only at synchronous exits.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::kvm::KvmHandle;

/// Where KVM puts the three pages it needs for real-mode TSS emulation on Intel: just below
/// 4 GiB, inside the MMIO hole and away from every device we place.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("KVM_GET_DIRTY_LOG on memory slot {slot} failed: {source}")]
    DirtyLog {
        slot: u32,
        source: kvm_ioctls::Error,
    },
    #[error("KVM_CREATE_VM failed: {0}")]
    Create(kvm_ioctls::Error),
    #[error("KVM_SET_TSS_ADDR failed: {0}")]
    TssAddress(kvm_ioctls::Error),
    #[error(
        "registering guest memory slot {slot} ({size:#x} bytes at {guest:#x}) failed: {source}"
    )]
    SetMemory {
        slot: u32,
        guest: u64,
        size: u64,
        source: kvm_ioctls::Error,
    },
}

pub struct Vm {
    pub fd: VmFd,
}

impl Vm {
    pub fn create(kvm: &KvmHandle) -> Result<Self, VmError> {
        let fd = kvm.fd.create_vm().map_err(VmError::Create)?;
        fd.set_tss_address(KVM_TSS_ADDRESS)
            .map_err(VmError::TssAddress)?;
        Ok(Vm { fd })
    }

    /// Hands every region of guest RAM to KVM, one slot each, with dirty-page logging on
    /// when `dirty_log` is set.
    pub fn register_memory(&self, mem: &GuestMemoryMmap, dirty_log: bool) -> Result<(), VmError> {
        for (slot, region) in mem.iter().enumerate() {
            let slot = slot as u32;
            let guest = region.start_addr().0;
            let size = region.len();
            let host = region.as_ptr() as u64;
            let desc = kvm_userspace_memory_region {
                slot,
                flags: if dirty_log {
                    kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
                } else {
                    0
                },
                guest_phys_addr: guest,
                memory_size: size,
                userspace_addr: host,
            };
            // SAFETY: the mapping belongs to `mem`, which the VM keeps alive for as long as the
            // VM fd exists (both live in the same `BuiltVm`), and slots never overlap because
            // they come from one non-overlapping collection.
            unsafe { self.fd.set_user_memory_region(desc) }.map_err(|source| {
                VmError::SetMemory {
                    slot,
                    guest,
                    size,
                    source,
                }
            })?;
        }
        Ok(())
    }

    /// The guest-physical page numbers written since the last call (the log is cleared by
    /// reading it). Memory must have been registered with dirty logging.
    pub fn take_dirty_pages(&self, mem: &GuestMemoryMmap) -> Result<Vec<u64>, VmError> {
        let mut pages = Vec::new();
        for (slot, region) in mem.iter().enumerate() {
            let bitmap = self
                .fd
                .get_dirty_log(slot as u32, region.len() as usize)
                .map_err(|source| VmError::DirtyLog {
                    slot: slot as u32,
                    source,
                })?;
            let first = region.start_addr().0 >> 12;
            for (word_index, word) in bitmap.iter().enumerate() {
                let mut bits = *word;
                while bits != 0 {
                    let bit = bits.trailing_zeros() as u64;
                    pages.push(first + word_index as u64 * 64 + bit);
                    bits &= bits - 1;
                }
            }
        }
        Ok(pages)
    }
}
