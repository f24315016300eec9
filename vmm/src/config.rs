//! What a VM is built from: kernel, initrd, command line, memory, limits, and the clock's shape.

use std::path::PathBuf;
use std::time::Duration;

use rrr_guest::protocol::PROGRESS_INTERVAL;

use crate::clock::VirtualTime;

/// Virtual time per synchronous exit, in nanoseconds.
///
/// 2 µs is about what one exit to userspace plus the guest work around it costs on hardware KVM,
/// so exit-dense code (the boot's console and PIT traffic) sees timers fire at roughly the rate
/// it would on a real machine. Idle time is not counted by quantum: a HLT jumps straight to the
/// next deadline, so the choice only shapes busy periods.
pub const DEFAULT_QUANTUM_NS: u64 = 2_000;

/// 2024-01-01T00:00:00Z: the CMOS clock's fixed start, so the guest's wall clock never comes
/// from the host.
pub const DEFAULT_EPOCH_UNIX_SECS: u64 = 1_704_067_200;

pub const DEFAULT_MEM_MIB: u64 = 256;

/// Virtual time per basic block of instrumented code: a progress exit, which stands for
/// [`rrr_guest::protocol::PROGRESS_INTERVAL`] blocks, moves the clock by that many of these.
///
/// An instrumented block (a few instructions and the coverage call) takes about 2 ns on a
/// current x86 core; what matters for determinism is only that it is fixed.
pub const DEFAULT_BLOCK_NS: u64 = 2;

/// The boot RNG seed's length: what Linux's `SETUP_RNG_SEED` credits as 256 bits, enough for
/// its crng to be ready before init.
pub const RNG_SEED_LEN: usize = 32;

/// When a run gives up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timeout {
    /// Wall-clock time on the host; the watchdog kicks the vCPU out of `KVM_RUN` to enforce it.
    Host(Duration),
    /// Guest virtual time; checked at every synchronous exit, so it is deterministic.
    Virtual(VirtualTime),
}

/// Everything needed to build and run one VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// An uncompressed x86-64 `vmlinux` ELF.
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// The kernel command line; `None` picks the one matching the CPU model on this host's KVM
    /// (see [`crate::arch::x86_64::cpuid::default_cmdline`]).
    pub cmdline: Option<String>,
    /// Appended to the command line (after the defaults, so it can override them).
    pub append: Vec<String>,
    pub mem_mib: u64,
    pub timeouts: Vec<Timeout>,
    /// Unix time the CMOS clock reads at virtual time zero.
    pub epoch_unix_secs: u64,
    /// Virtual nanoseconds per synchronous exit.
    pub quantum_ns: u64,
    /// Virtual nanoseconds per instrumented basic block (see [`DEFAULT_BLOCK_NS`]).
    pub block_ns: u64,
    /// Blocks per progress write the guest was built with: [`PROGRESS_INTERVAL`] for everything
    /// rrr builds; another value only to measure kernels built with another interval.
    pub progress_interval: u64,
    /// Entropy handed to the kernel at boot (`setup_data` `SETUP_RNG_SEED`), so its random
    /// numbers are ready at once and the same on every run with the same seed.
    pub rng_seed: [u8; RNG_SEED_LEN],
    /// Time limit handed to the guest agent with GO (0: none).
    pub stimulus_time_limit_secs: u32,
    /// Register guest RAM with `KVM_MEM_LOG_DIRTY_PAGES`, so the pages the guest writes can be
    /// listed ([`crate::vstate::vm::Vm::take_dirty_pages`]); for the recorder.
    pub dirty_log: bool,
}

impl VmConfig {
    /// A config with the defaults for everything but the kernel.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        VmConfig {
            kernel: kernel.into(),
            initrd: None,
            cmdline: None,
            append: Vec::new(),
            mem_mib: DEFAULT_MEM_MIB,
            timeouts: Vec::new(),
            epoch_unix_secs: DEFAULT_EPOCH_UNIX_SECS,
            quantum_ns: DEFAULT_QUANTUM_NS,
            block_ns: DEFAULT_BLOCK_NS,
            progress_interval: PROGRESS_INTERVAL,
            rng_seed: rng_seed(0),
            stimulus_time_limit_secs: 0,
            dirty_log: false,
        }
    }

    pub fn mem_bytes(&self) -> u64 {
        self.mem_mib.saturating_mul(1 << 20)
    }

    pub fn host_timeout(&self) -> Option<Duration> {
        self.timeouts
            .iter()
            .filter_map(|t| match t {
                Timeout::Host(d) => Some(*d),
                Timeout::Virtual(_) => None,
            })
            .min()
    }

    pub fn virtual_timeout(&self) -> Option<VirtualTime> {
        self.timeouts
            .iter()
            .filter_map(|t| match t {
                Timeout::Virtual(v) => Some(*v),
                Timeout::Host(_) => None,
            })
            .min()
    }
}

/// The boot RNG seed for a user's seed number (`rrr run --seed N`; 0 by default): a fixed
/// expansion, so the same number always gives the same 32 bytes, and different numbers give
/// unrelated ones (splitmix64; the kernel mixes them through its own hash anyway).
pub fn rng_seed(seed: u64) -> [u8; RNG_SEED_LEN] {
    let mut state = seed ^ 0x7272_725f_7365_6564; // "rrr_seed"
    let mut bytes = [0u8; RNG_SEED_LEN];
    for chunk in bytes.chunks_mut(8) {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        chunk.copy_from_slice(&z.to_le_bytes());
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_are_fixed_per_number_and_differ_between_numbers() {
        assert_eq!(rng_seed(0), rng_seed(0));
        assert_ne!(rng_seed(0), rng_seed(1));
        assert_ne!(rng_seed(1), rng_seed(2));
        assert_ne!(rng_seed(0), [0; RNG_SEED_LEN]);
        assert_eq!(VmConfig::new("/k").rng_seed, rng_seed(0));
    }
}
