//! The one vCPU: configuration for the 64-bit boot, interrupt injection without an in-kernel
//! irqchip, and the kick that forces it out of `KVM_RUN`.

use std::sync::Once;
use std::time::Duration;

use kvm_bindings::{kvm_interrupt, kvm_regs, CpuId};
use kvm_ioctls::{Cap, SyncReg, VcpuFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_iow_nr;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use super::vm::Vm;
use crate::arch::x86_64::fault::CpuSnapshot;
use crate::arch::x86_64::regs::{self, RegsError};
use crate::stall::StallSample;

const KVMIO: u32 = 0xae;
ioctl_iow_nr!(KVM_INTERRUPT, KVMIO, 0x86, kvm_interrupt);

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("KVM_CREATE_VCPU failed: {0}")]
    Create(kvm_ioctls::Error),
    #[error("KVM_SET_CPUID2 failed: {0}")]
    SetCpuid(kvm_ioctls::Error),
    #[error("setting up the boot registers failed: {0}")]
    Regs(#[from] RegsError),
    #[error("KVM_INTERRUPT with vector {vector:#x} failed: {source}")]
    Interrupt { vector: u8, source: std::io::Error },
    #[error("reading the vCPU registers failed: {0}")]
    GetRegs(kvm_ioctls::Error),
    #[error("installing the vCPU kick signal handler failed: {0}")]
    SignalHandler(vmm_sys_util::errno::Error),
}

pub struct Vcpu {
    pub fd: VcpuFd,
    /// Whether KVM stores the registers in the run page at every exit (`KVM_CAP_SYNC_REGS`).
    sync_regs: bool,
}

impl Vcpu {
    pub fn create(vm: &Vm) -> Result<Self, VcpuError> {
        let mut fd = vm.fd.create_vcpu(0).map_err(VcpuError::Create)?;
        // The RIP at every exit, for the report of a fault (`exit_ring`), at the cost of a
        // register copy inside KVM rather than a `KVM_GET_REGS` per exit. Only read: KVM takes
        // nothing back from the run page while no dirty bit is set.
        let sync_regs = vm.fd.check_extension(Cap::SyncRegs);
        if sync_regs {
            fd.set_sync_valid_reg(SyncReg::Register);
        }
        Ok(Vcpu { fd, sync_regs })
    }

    /// The guest's RIP at the last exit, when KVM reports it in the run page.
    pub fn exit_rip(&self) -> Option<u64> {
        self.sync_regs.then(|| self.fd.sync_regs().regs.rip)
    }

    /// The registers at the last exit: from the run page where KVM stores them, else by ioctl
    /// (inside the carrier an ioctl costs about as much as an exit).
    pub fn exit_regs(&self) -> Result<kvm_regs, kvm_ioctls::Error> {
        if self.sync_regs {
            Ok(self.fd.sync_regs().regs)
        } else {
            self.fd.get_regs()
        }
    }

    /// Registers for the next entry: through the run page (KVM takes them back at `KVM_RUN`),
    /// else by ioctl. Nothing may read them by ioctl before that entry.
    pub fn set_regs_for_entry(&mut self, regs: &kvm_regs) -> Result<(), kvm_ioctls::Error> {
        if self.sync_regs {
            self.fd.sync_regs_mut().regs = *regs;
            self.fd.set_sync_dirty_reg(SyncReg::Register);
            Ok(())
        } else {
            self.fd.set_regs(regs)
        }
    }

    /// Registers set now (`KVM_SET_REGS`), with the run page's copy made the same, so that a
    /// reader of either (the trace reads the run page) sees them before the next entry.
    pub fn set_regs_now(&mut self, regs: &kvm_regs) -> Result<(), kvm_ioctls::Error> {
        self.fd.set_regs(regs)?;
        if self.sync_regs {
            self.fd.sync_regs_mut().regs = *regs;
        }
        Ok(())
    }

    pub fn set_cpuid(&self, cpuid: &CpuId) -> Result<(), VcpuError> {
        self.fd.set_cpuid2(cpuid).map_err(VcpuError::SetCpuid)
    }

    /// Everything the kernel's 64-bit entry expects.
    pub fn configure_boot(&self, mem: &GuestMemoryMmap, entry: u64) -> Result<(), VcpuError> {
        regs::setup_msrs(&self.fd)?;
        regs::setup_fpu(&self.fd)?;
        regs::setup_sregs(mem, &self.fd)?;
        regs::setup_regs(&self.fd, entry)?;
        Ok(())
    }

    /// Queues an external interrupt for the next entry (`KVM_INTERRUPT`; valid only because
    /// there is no in-kernel irqchip, and only when the run page said injection is possible).
    pub fn inject(&self, vector: u8) -> Result<(), VcpuError> {
        let irq = kvm_interrupt {
            irq: u32::from(vector),
        };
        // SAFETY: KVM_INTERRUPT reads one `kvm_interrupt` from the pointer, which is valid for
        // the duration of the call; the fd is a vCPU fd.
        let ret = unsafe { ioctl_with_ref(&self.fd, KVM_INTERRUPT(), &irq) };
        if ret < 0 {
            return Err(VcpuError::Interrupt {
                vector,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Where the vCPU stands and a digest of its registers, for the stall policy.
    pub fn stall_sample(&self) -> Result<StallSample, VcpuError> {
        let r = self.fd.get_regs().map_err(VcpuError::GetRegs)?;
        let words = [
            r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.rbp, r.r8, r.r9, r.r10, r.r11,
            r.r12, r.r13, r.r14, r.r15, r.rip, r.rflags,
        ];
        // FNV-1a over the words: stable across runs, unlike std's randomly seeded hasher.
        let state = words.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, w| {
            (h ^ w).wrapping_mul(0x0000_0100_0000_01b3)
        });
        Ok(StallSample {
            rip: r.rip,
            state,
            cpu: thread_cpu_time(),
        })
    }

    /// Registers, control registers and the code at RIP, for a fault report.
    pub fn snapshot(&self, mem: &GuestMemoryMmap) -> Result<CpuSnapshot, VcpuError> {
        let regs = self.fd.get_regs().map_err(VcpuError::GetRegs)?;
        let sregs = self.fd.get_sregs().map_err(VcpuError::GetRegs)?;
        Ok(CpuSnapshot::capture(regs, &sregs, mem))
    }
}

/// CPU time of the calling thread (the vCPU thread: its guest execution is accounted to it).
/// Zero if the clock cannot be read, which makes the stall policy wait rather than guess.
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through the pointer, valid for the call.
    let ret = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if ret != 0 {
        return Duration::ZERO;
    }
    Duration::new(
        ts.tv_sec.max(0) as u64,
        ts.tv_nsec.clamp(0, 999_999_999) as u32,
    )
}

/// Sends the kick signal to the vCPU thread. The signal's only job is to make `KVM_RUN` return
/// `EINTR`; the handler does nothing.
#[derive(Debug, Clone, Copy)]
pub struct VcpuKicker {
    thread: libc::pthread_t,
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

impl VcpuKicker {
    /// A kicker for the calling thread, which must be the one that calls `KVM_RUN`.
    pub fn for_current_thread() -> Result<Self, VcpuError> {
        static INSTALL: Once = Once::new();
        let mut result = Ok(());
        INSTALL.call_once(|| result = register_signal_handler(SIGRTMIN(), on_kick));
        result.map_err(VcpuError::SignalHandler)?;
        // SAFETY: pthread_self has no preconditions.
        let thread = unsafe { libc::pthread_self() };
        Ok(VcpuKicker { thread })
    }

    pub fn kick(&self) {
        // SAFETY: the thread id came from pthread_self on the vCPU thread, which outlives every
        // kicker use (the watchdog is stopped and joined before the run returns).
        unsafe {
            libc::pthread_kill(self.thread, SIGRTMIN());
        }
    }
}
