//! In-memory checkpoints of a running replay, for reverse execution (`rrr replay --gdb`): the
//! whole machine at an exit boundary, restored in place into the same VM (same KVM objects,
//! same memory mapping) so the replay goes on from there.
//!
//! Guest RAM is kept as the pages that are not zero. A restore first drops every page of the
//! anonymous mapping (`MADV_DONTNEED`: they read as zero again, and KVM's mappings of them are
//! invalidated through its MMU notifier) and then writes the kept pages back. The whole of RAM
//! is restored, not only what KVM's dirty log saw written: the virtio devices write guest
//! memory through the VMM's own mapping (disk reads, used rings), which the dirty log never
//! sees.

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::builder::{LegacyState, RestoreError, Vmm};
use crate::devices::virtio::mmio::MmioTransportState;
use crate::run_loop::RunState;
use crate::vstate::vcpu_state::{VcpuState, VcpuStateError};

const PAGE: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("saving or restoring the vCPU failed: {0}")]
    Vcpu(#[from] VcpuStateError),
    #[error("restoring the virtio devices failed: {0}")]
    Devices(#[from] RestoreError),
    #[error("dropping guest RAM (madvise) failed: {0}")]
    Madvise(std::io::Error),
    #[error("clearing the dirty-page log failed: {0}")]
    Dirty(#[from] crate::vstate::vm::VmError),
}

/// The machine at one exit boundary.
pub struct Checkpoint {
    /// The exit count it was taken at.
    pub exits: u64,
    vcpu: VcpuState,
    devices: LegacyState,
    virtio: Vec<MmioTransportState>,
    run: RunState,
    /// Bytes the UART had transmitted (see `Serial::rewind_output`).
    transmitted: u64,
    /// (region index, page index in the region) of every non-zero page, and their contents.
    pages: Vec<(usize, usize)>,
    data: Vec<u8>,
}

/// The guest RAM regions as byte slices.
///
/// SAFETY (for callers): the vCPU must be stopped (on this thread, between two `KVM_RUN`s) and
/// nothing else may hold a slice of guest memory while these live.
unsafe fn regions(vmm: &mut Vmm) -> Vec<&mut [u8]> {
    vmm.mem
        .iter()
        .map(|region| {
            // SAFETY: the region maps `len` bytes for as long as `vmm.mem` lives; see above.
            unsafe { std::slice::from_raw_parts_mut(region.as_ptr(), region.len() as usize) }
        })
        .collect()
}

/// Makes every page of one anonymous private mapping of guest RAM read as zero again, without
/// touching them one by one: `MADV_DONTNEED`, or where the kernel has no `madvise` (the
/// carrier's is built without it) a fresh anonymous mapping over the same range. KVM follows
/// either through its MMU notifier: its mappings of the old pages are invalidated.
fn drop_pages(ram: &mut [u8]) -> Result<(), CheckpointError> {
    let ptr = ram.as_mut_ptr().cast::<libc::c_void>();
    // SAFETY: the range is exactly one anonymous private mapping of guest RAM, and nothing
    // holds a reference into it across this call but `ram` itself.
    if unsafe { libc::madvise(ptr, ram.len(), libc::MADV_DONTNEED) } == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::ENOSYS) {
        return Err(CheckpointError::Madvise(err));
    }
    // SAFETY: as above; MAP_FIXED replaces the same range with the same protection and flags
    // `vm-memory` mapped it with, so the address stays valid for `vmm.mem`.
    let mapped = unsafe {
        libc::mmap(
            ptr,
            ram.len(),
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
            -1,
            0,
        )
    };
    if mapped != ptr {
        return Err(CheckpointError::Madvise(std::io::Error::last_os_error()));
    }
    Ok(())
}

impl Checkpoint {
    /// Takes the machine as it stands at the top of the run loop (`run` is the loop's state).
    /// The last exit's instruction is completed first, as for a snapshot.
    pub fn take(vmm: &mut Vmm, run: &RunState) -> Result<Self, CheckpointError> {
        vmm.vcpu.complete_pending_exit()?;
        let vcpu = vmm.vcpu.save_state(&vmm.kvm)?;
        let mut pages = Vec::new();
        let mut data = Vec::new();
        // SAFETY: the vCPU is stopped on this thread, and the slices end with this loop.
        for (r, ram) in unsafe { regions(vmm) }.into_iter().enumerate() {
            for (i, page) in ram.chunks(PAGE).enumerate() {
                if page.iter().any(|&b| b != 0) {
                    pages.push((r, i));
                    data.extend_from_slice(page);
                }
            }
        }
        data.shrink_to_fit();
        Ok(Checkpoint {
            exits: run.stats.exits,
            vcpu,
            devices: vmm.devices.save(),
            virtio: vmm.mmio.save(),
            run: run.clone(),
            transmitted: crate::bus::lock(&vmm.devices.serial).transmitted(),
            pages,
            data,
        })
    }

    /// Host memory it holds.
    pub fn bytes(&self) -> usize {
        self.data.len() + self.pages.len() * std::mem::size_of::<(usize, usize)>()
    }

    /// Puts the machine back as it was taken; returns the run loop's state to go on with.
    pub fn restore(&self, vmm: &mut Vmm) -> Result<RunState, CheckpointError> {
        // Whatever the last exit left pending in KVM (a port read's data) is finished first, so
        // that nothing of it lands on the restored registers.
        vmm.vcpu.complete_pending_exit()?;
        // SAFETY: the vCPU is stopped on this thread, and the slices end with this block.
        let mut rams = unsafe { regions(vmm) };
        for ram in &mut rams {
            drop_pages(ram)?;
        }
        for (&(r, i), page) in self.pages.iter().zip(self.data.chunks(PAGE)) {
            rams[r][i * PAGE..(i + 1) * PAGE].copy_from_slice(page);
        }
        drop(rams);
        vmm.vcpu.restore_state(&self.vcpu)?;
        vmm.devices.restore(&self.devices);
        vmm.mmio.restore(&self.virtio)?;
        crate::bus::lock(&vmm.devices.serial).rewind_output(self.transmitted);
        // The pages the abandoned future wrote are nobody's business now.
        if vmm.config.dirty_log {
            vmm.vm.take_dirty_pages(&vmm.mem)?;
        }
        Ok(self.run.clone())
    }
}
