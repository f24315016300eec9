//! What a VM is built from: kernel, initrd, command line, memory, limits, and the clock's shape.

use std::path::PathBuf;
use std::time::Duration;

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
