//! In-memory checkpoints of a running replay, for reverse execution (`rrr replay --gdb`): the
//! whole machine at exit boundaries, restored in place into the same VM (same KVM objects, same
//! memory mapping) so the replay goes on from there.
//!
//! Guest RAM is kept incrementally. The first checkpoint (at READY) keeps every page that is
//! not zero; each later one keeps only the pages written since the one before: those KVM's
//! dirty log reports (the guest's writes) and those the VMM wrote itself (a virtio device's
//! data and used ring, which the dirty log never sees; `vstate::memory::note_host_write`).
//! A page's contents at checkpoint `j` are its copy in the latest checkpoint at or before `j`
//! that kept it (zero if none did). A restore writes back only the pages that may differ: those
//! written since the checkpoint the memory was last synchronized with, and those kept by the
//! checkpoints between that one and the target.
//!
//! Memory is bounded: past the budget, the oldest checkpoint after READY is merged into the
//! next one (its pages move there unless that one has its own copy) and disappears.

use std::collections::{BTreeSet, HashMap};

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::builder::{LegacyState, RestoreError, Vmm};
use crate::devices::virtio::mmio::MmioTransportState;
use crate::rr::replay::ReplayCursor;
use crate::run_loop::RunState;
use crate::vstate::memory::take_host_writes;
use crate::vstate::vcpu_state::{VcpuState, VcpuStateError};

const PAGE: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("saving or restoring the vCPU failed: {0}")]
    Vcpu(#[from] VcpuStateError),
    #[error("restoring the virtio devices failed: {0}")]
    Devices(#[from] RestoreError),
    #[error("reading the dirty-page log failed: {0}")]
    Dirty(#[from] crate::vstate::vm::VmError),
    #[error("guest page {0:#x} is outside guest RAM")]
    NoSuchPage(u64),
}

/// The machine at one exit boundary.
struct Checkpoint {
    exits: u64,
    vcpu: VcpuState,
    devices: LegacyState,
    virtio: Vec<MmioTransportState>,
    run: RunState,
    /// Bytes the UART had transmitted (see `Serial::rewind_output`).
    transmitted: u64,
    /// Where the replayer stood in its log.
    cursor: ReplayCursor,
    /// Guest page number -> offset of its copy in `data`.
    pages: HashMap<u64, usize>,
    data: Vec<u8>,
}

impl Checkpoint {
    fn bytes(&self) -> usize {
        self.data.len() + self.pages.len() * 2 * std::mem::size_of::<u64>()
    }

    fn page(&self, number: u64) -> Option<&[u8]> {
        self.pages.get(&number).map(|&at| &self.data[at..at + PAGE])
    }
}

/// Guest RAM as (first page number, bytes) per region.
///
/// SAFETY (for callers): the vCPU must be stopped (on this thread, between two `KVM_RUN`s) and
/// nothing else may hold a slice of guest memory while these live.
unsafe fn regions(vmm: &mut Vmm) -> Vec<(u64, &mut [u8])> {
    vmm.mem
        .iter()
        .map(|region| {
            // SAFETY: the region maps `len` bytes for as long as `vmm.mem` lives; see above.
            let bytes =
                unsafe { std::slice::from_raw_parts_mut(region.as_ptr(), region.len() as usize) };
            (region.start_addr().0 >> 12, bytes)
        })
        .collect()
}

fn page_mut<'a>(
    rams: &'a mut [(u64, &mut [u8])],
    number: u64,
) -> Result<&'a mut [u8], CheckpointError> {
    for (first, ram) in rams.iter_mut() {
        let index = number.wrapping_sub(*first) as usize;
        if number >= *first && index < ram.len() / PAGE {
            return Ok(&mut ram[index * PAGE..(index + 1) * PAGE]);
        }
    }
    Err(CheckpointError::NoSuchPage(number))
}

/// Every checkpoint of one replay, oldest first (the first is READY's).
pub struct Checkpoints {
    all: Vec<Checkpoint>,
    /// The checkpoint guest memory was last synchronized with (taken or restored)...
    base: usize,
    /// ...and the pages written since.
    written: BTreeSet<u64>,
    budget: usize,
}

/// What a checkpoint costs, for the user and the benchmark.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct CheckpointStats {
    pub count: usize,
    pub bytes: usize,
}

impl Checkpoints {
    /// The first checkpoint, at the top of the run loop (`run` is its state), with every page
    /// of guest RAM that is not zero. `budget` bounds the bytes all of them keep.
    pub fn start(
        vmm: &mut Vmm,
        run: &RunState,
        cursor: ReplayCursor,
        budget: usize,
    ) -> Result<Self, CheckpointError> {
        crate::vstate::memory::track_host_writes(true);
        let mut checkpoint = Self::machine(vmm, run, cursor)?;
        // SAFETY: the vCPU is stopped on this thread, and the slices end with this loop.
        for (first, ram) in unsafe { regions(vmm) } {
            for (i, page) in ram.chunks(PAGE).enumerate() {
                if page.iter().any(|&b| b != 0) {
                    checkpoint
                        .pages
                        .insert(first + i as u64, checkpoint.data.len());
                    checkpoint.data.extend_from_slice(page);
                }
            }
        }
        checkpoint.data.shrink_to_fit();
        // What was written before is in this checkpoint.
        if vmm.config.dirty_log {
            vmm.vm.take_dirty_pages(&vmm.mem)?;
        }
        take_host_writes();
        Ok(Checkpoints {
            all: vec![checkpoint],
            base: 0,
            written: BTreeSet::new(),
            budget,
        })
    }

    /// The machine but guest RAM.
    fn machine(
        vmm: &mut Vmm,
        run: &RunState,
        cursor: ReplayCursor,
    ) -> Result<Checkpoint, CheckpointError> {
        // The last exit's instruction is completed first, as for a snapshot.
        vmm.vcpu.complete_pending_exit()?;
        Ok(Checkpoint {
            exits: run.stats.exits,
            vcpu: vmm.vcpu.save_state(&vmm.kvm)?,
            devices: vmm.devices.save(),
            virtio: vmm.mmio.save(),
            run: run.clone(),
            transmitted: crate::bus::lock(&vmm.devices.serial).transmitted(),
            cursor,
            pages: HashMap::new(),
            data: Vec::new(),
        })
    }

    /// The exit counts of the checkpoints, oldest first.
    pub fn exits(&self) -> Vec<u64> {
        self.all.iter().map(|c| c.exits).collect()
    }

    pub fn stats(&self) -> CheckpointStats {
        CheckpointStats {
            count: self.all.len(),
            bytes: self.all.iter().map(Checkpoint::bytes).sum(),
        }
    }

    /// Collects the pages written since the last call; returns them (the replayer's landmark
    /// hashes want them too, since this empties KVM's log).
    pub fn note_written(&mut self, vmm: &Vmm) -> Result<Vec<u64>, CheckpointError> {
        let mut pages = if vmm.config.dirty_log {
            vmm.vm.take_dirty_pages(&vmm.mem)?
        } else {
            Vec::new()
        };
        self.written.extend(pages.iter().copied());
        let host = take_host_writes();
        self.written.extend(host.iter().copied());
        pages.extend(host);
        Ok(pages)
    }

    /// Whether a new checkpoint belongs at exit `exits` (every `interval` exits, past the last).
    pub fn due(&self, exits: u64, interval: u64) -> bool {
        let last = self.all.last().map_or(0, |c| c.exits);
        exits > last && exits % interval == 0
    }

    /// Takes a checkpoint here (past the last one): the pages that may differ from the last
    /// one, with their contents now. Returns the pages it collected from the dirty log.
    pub fn take(
        &mut self,
        vmm: &mut Vmm,
        run: &RunState,
        cursor: ReplayCursor,
    ) -> Result<Vec<u64>, CheckpointError> {
        let mut checkpoint = Self::machine(vmm, run, cursor)?;
        let dirty = self.note_written(vmm)?;
        let mut pages = std::mem::take(&mut self.written);
        // Restored to an earlier one and run past the last: what the later ones kept may also
        // differ from now.
        for later in &self.all[self.base + 1..] {
            pages.extend(later.pages.keys().copied());
        }
        checkpoint.data.reserve_exact(pages.len() * PAGE);
        // SAFETY: the vCPU is stopped on this thread, and the slices end with this block.
        let mut rams = unsafe { regions(vmm) };
        for number in pages {
            checkpoint.pages.insert(number, checkpoint.data.len());
            checkpoint
                .data
                .extend_from_slice(page_mut(&mut rams, number)?);
        }
        drop(rams);
        self.all.push(checkpoint);
        self.base = self.all.len() - 1;
        self.thin();
        Ok(dirty)
    }

    /// Keeps the checkpoints within the budget: the oldest after READY goes into the next one.
    fn thin(&mut self) {
        while self.stats().bytes > self.budget && self.all.len() > 2 {
            let gone = self.all.remove(1);
            let next = &mut self.all[1];
            for (number, at) in gone.pages {
                if !next.pages.contains_key(&number) {
                    next.pages.insert(number, next.data.len());
                    next.data.extend_from_slice(&gone.data[at..at + PAGE]);
                }
            }
            // Memory was in sync with the one that went: it is with the next one, but for the
            // pages that one kept itself.
            if self.base == 1 {
                self.written.extend(next.pages.keys().copied());
            } else if self.base > 1 {
                self.base -= 1;
            }
        }
    }

    /// The index of the latest checkpoint at or before exit `exits`.
    pub fn before(&self, exits: u64) -> usize {
        self.all.iter().rposition(|c| c.exits <= exits).unwrap_or(0)
    }

    /// Puts the machine back as checkpoint `index` had it; returns the run loop's state to go
    /// on with.
    pub fn restore(
        &mut self,
        vmm: &mut Vmm,
        index: usize,
    ) -> Result<(RunState, ReplayCursor), CheckpointError> {
        // Whatever the last exit left pending in KVM (a port read's data) is finished first, so
        // that nothing of it lands on the restored registers.
        vmm.vcpu.complete_pending_exit()?;
        self.note_written(vmm)?;
        let mut pages = std::mem::take(&mut self.written);
        let (low, high) = (index.min(self.base), index.max(self.base));
        for between in &self.all[low + 1..=high] {
            pages.extend(between.pages.keys().copied());
        }
        // SAFETY: the vCPU is stopped on this thread, and the slices end with this block.
        let mut rams = unsafe { regions(vmm) };
        for number in pages {
            let page = page_mut(&mut rams, number)?;
            match self.all[..=index].iter().rev().find_map(|c| c.page(number)) {
                Some(kept) => page.copy_from_slice(kept),
                None => page.fill(0),
            }
        }
        drop(rams);
        let checkpoint = &self.all[index];
        vmm.vcpu.restore_state(&checkpoint.vcpu)?;
        vmm.devices.restore(&checkpoint.devices);
        vmm.mmio.restore(&checkpoint.virtio)?;
        crate::bus::lock(&vmm.devices.serial).rewind_output(checkpoint.transmitted);
        self.base = index;
        // Our own writes went through the mapping, which neither log sees; nothing else wrote.
        take_host_writes();
        Ok((checkpoint.run.clone(), checkpoint.cursor.clone()))
    }
}

impl Drop for Checkpoints {
    fn drop(&mut self) {
        crate::vstate::memory::track_host_writes(false);
    }
}
