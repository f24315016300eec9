//! The vCPU's complete architectural state, as KVM exposes it, for snapshots.
//!
//! Captured only at a synchronous exit with nothing half-done: [`Vcpu::complete_pending_exit`]
//! re-enters `KVM_RUN` with `immediate_exit` set, which finishes a pending port or MMIO access
//! (RIP moves past the instruction) without running a single further guest instruction.
//!
//! Restore order follows what KVM expects: the CPU model first, then the mode (MP state, special
//! registers) before the state that depends on it (MSRs such as EFER are checked against CR0/CR4),
//! and the pending events last, so nothing set earlier overwrites a queued injection.

use kvm_bindings::{
    kvm_debugregs, kvm_fpu, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events,
    kvm_xcrs, kvm_xsave, Msrs,
};
use serde::{Deserialize, Serialize};

use super::kvm::KvmHandle;
use super::vcpu::Vcpu;

#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
    #[error("KVM_{ioctl} failed while saving the vCPU: {source}")]
    Get {
        ioctl: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("KVM_{ioctl} failed while restoring the vCPU: {source}")]
    Set {
        ioctl: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error(
        "completing the pending exit before a save failed: KVM_RUN returned {0} instead of EINTR"
    )]
    NotQuiescent(String),
    #[error("KVM_SET_MSRS restored {set} of {wanted} MSRs; the first refused is {first:#x}")]
    Msrs {
        set: usize,
        wanted: usize,
        first: u32,
    },
    #[error("building an MSR list failed: {0:?}")]
    MsrList(vmm_sys_util::fam::Error),
}

/// `kvm_fpu` has no serde support in kvm-bindings; this mirrors it field for field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FpuState {
    pub fpr: [[u8; 16]; 8],
    pub fcw: u16,
    pub fsw: u16,
    pub ftwx: u8,
    pub last_opcode: u16,
    pub last_ip: u64,
    pub last_dp: u64,
    pub xmm: [[u8; 16]; 16],
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for FpuState {
    fn from(f: &kvm_fpu) -> Self {
        FpuState {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
        }
    }
}

impl From<&FpuState> for kvm_fpu {
    fn from(f: &FpuState) -> Self {
        kvm_fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            ..Default::default()
        }
    }
}

/// One MSR and its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsrValue {
    pub index: u32,
    pub data: u64,
}

/// Everything KVM holds for the one vCPU (no LAPIC: there is no in-kernel irqchip).
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub fpu: FpuState,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    /// The MSRs KVM reports as saveable (`KVM_GET_MSR_INDEX_LIST`) that it would read back.
    pub msrs: Vec<MsrValue>,
    /// A queued injection, the interrupt shadow, NMI state, pending exceptions.
    pub events: kvm_vcpu_events,
    pub debugregs: kvm_debugregs,
    pub mp_state: kvm_mp_state,
    /// The run page's request for an exit as soon as the guest can take an interrupt.
    pub request_interrupt_window: u8,
}

fn get<T>(ioctl: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, VcpuStateError> {
    r.map_err(|source| VcpuStateError::Get { ioctl, source })
}

fn set(ioctl: &'static str, r: Result<(), kvm_ioctls::Error>) -> Result<(), VcpuStateError> {
    r.map_err(|source| VcpuStateError::Set { ioctl, source })
}

fn msr_list(indices: &[u32]) -> Result<Msrs, VcpuStateError> {
    let entries: Vec<kvm_msr_entry> = indices
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    Msrs::from_entries(&entries).map_err(VcpuStateError::MsrList)
}

/// On AMD, the VMCB holds TR as LTR loaded it, with the busy bit clear, and KVM sets the bit
/// when it reports TR (its workaround for SVM not exposing it). Written back as reported, a
/// busy TR makes QEMU's SVM emulation (the carrier) fail every I/O permission check with #GP;
/// real AMD hardware ignores the bit there. Clearing it restores what the VMCB held. Intel's
/// VM entry wants the busy type, so there the state stays as saved.
fn sregs_for_this_host(saved: &kvm_sregs) -> kvm_sregs {
    const TSS_AVAILABLE_64: u8 = 9;
    const TSS_BUSY_64: u8 = 11;
    let mut sregs = *saved;
    if host_is_amd() && sregs.tr.type_ == TSS_BUSY_64 {
        sregs.tr.type_ = TSS_AVAILABLE_64;
    }
    sregs
}

fn host_is_amd() -> bool {
    let leaf = std::arch::x86_64::__cpuid(0);
    let mut vendor = [0u8; 12];
    vendor[..4].copy_from_slice(&leaf.ebx.to_le_bytes());
    vendor[4..8].copy_from_slice(&leaf.edx.to_le_bytes());
    vendor[8..].copy_from_slice(&leaf.ecx.to_le_bytes());
    &vendor == b"AuthenticAMD"
}

impl Vcpu {
    /// Finishes the instruction of the last exit (a port read gets its data, RIP moves on)
    /// without entering the guest: `KVM_RUN` with `immediate_exit` returns `EINTR` right after
    /// completing pending operations.
    pub fn complete_pending_exit(&mut self) -> Result<(), VcpuStateError> {
        self.fd.set_kvm_immediate_exit(1);
        let result = match self.fd.run() {
            Err(e) if e.errno() == libc::EINTR => Ok(()),
            Err(e) => Err(VcpuStateError::NotQuiescent(e.to_string())),
            Ok(exit) => Err(VcpuStateError::NotQuiescent(format!("{exit:?}"))),
        };
        self.fd.set_kvm_immediate_exit(0);
        result
    }

    /// Reads the whole vCPU. Call [`Self::complete_pending_exit`] first.
    pub fn save_state(&mut self, kvm: &KvmHandle) -> Result<VcpuState, VcpuStateError> {
        let fd = &self.fd;
        let mp_state = get("GET_MP_STATE", fd.get_mp_state())?;
        let regs = get("GET_REGS", fd.get_regs())?;
        let sregs = get("GET_SREGS", fd.get_sregs())?;
        let fpu = FpuState::from(&get("GET_FPU", fd.get_fpu())?);
        let xsave = get("GET_XSAVE", fd.get_xsave())?;
        let xcrs = get("GET_XCRS", fd.get_xcrs())?;
        let debugregs = get("GET_DEBUGREGS", fd.get_debug_regs())?;
        let events = get("GET_VCPU_EVENTS", fd.get_vcpu_events())?;
        let msrs = self.save_msrs(kvm)?;
        let request_interrupt_window = self.fd.get_kvm_run().request_interrupt_window;
        Ok(VcpuState {
            regs,
            sregs,
            fpu,
            xsave,
            xcrs,
            msrs,
            events,
            debugregs,
            mp_state,
            request_interrupt_window,
        })
    }

    /// KVM lists MSRs it can save that a given CPU model may still refuse to read; `GET_MSRS`
    /// stops at the first refusal, so refused ones are dropped and the rest read again.
    fn save_msrs(&self, kvm: &KvmHandle) -> Result<Vec<MsrValue>, VcpuStateError> {
        let mut indices: Vec<u32> = get("GET_MSR_INDEX_LIST", kvm.fd.get_msr_index_list())?
            .as_slice()
            .to_vec();
        let mut saved = Vec::with_capacity(indices.len());
        while !indices.is_empty() {
            let mut msrs = msr_list(&indices)?;
            let read = get("GET_MSRS", self.fd.get_msrs(&mut msrs))?;
            saved.extend(msrs.as_slice()[..read].iter().map(|e| MsrValue {
                index: e.index,
                data: e.data,
            }));
            if let Some(refused) = indices.get(read) {
                tracing::debug!(
                    msr = format_args!("{refused:#x}"),
                    "MSR not readable; not saved"
                );
            }
            indices.drain(..(read + 1).min(indices.len()));
        }
        Ok(saved)
    }

    /// `SET_MSRS` stops at the first MSR it refuses. KVM lists some MSRs as saveable that it
    /// lets the guest write only with a CPUID feature our CPU model hides (e.g. KVM's
    /// poll-control MSR): such an MSR was never written, so a fresh vCPU already holds the saved
    /// value, and it is skipped. One that holds another value is an error.
    fn restore_msrs(&self, saved: &[MsrValue]) -> Result<(), VcpuStateError> {
        let mut rest = saved;
        while !rest.is_empty() {
            let indices: Vec<u32> = rest.iter().map(|m| m.index).collect();
            let mut msrs = msr_list(&indices)?;
            for (entry, value) in msrs.as_mut_slice().iter_mut().zip(rest) {
                entry.data = value.data;
            }
            let written = self
                .fd
                .set_msrs(&msrs)
                .map_err(|source| VcpuStateError::Set {
                    ioctl: "SET_MSRS",
                    source,
                })?;
            let Some(refused) = rest.get(written) else {
                return Ok(());
            };
            let mut probe = msr_list(&[refused.index])?;
            let read = get("GET_MSRS", self.fd.get_msrs(&mut probe))?;
            if read != 1 || probe.as_slice()[0].data != refused.data {
                return Err(VcpuStateError::Msrs {
                    set: saved.len() - rest.len() + written,
                    wanted: saved.len(),
                    first: refused.index,
                });
            }
            tracing::debug!(
                msr = format_args!("{:#x}", refused.index),
                "MSR not settable but already at its saved value; skipped"
            );
            rest = &rest[written + 1..];
        }
        Ok(())
    }

    /// Writes the whole vCPU back. The CPU model (`KVM_SET_CPUID2`) must be set before.
    pub fn restore_state(&mut self, state: &VcpuState) -> Result<(), VcpuStateError> {
        let fd = &self.fd;
        set("SET_MP_STATE", fd.set_mp_state(state.mp_state))?;
        set(
            "SET_SREGS",
            fd.set_sregs(&sregs_for_this_host(&state.sregs)),
        )?;
        set("SET_REGS", fd.set_regs(&state.regs))?;
        set("SET_FPU", fd.set_fpu(&kvm_fpu::from(&state.fpu)))?;
        // SAFETY: the buffer is a whole `kvm_xsave` read back from KVM_GET_XSAVE, which is the
        // size KVM_SET_XSAVE reads (no AMX state, so the legacy 4 KiB layout is complete).
        set("SET_XSAVE", unsafe { fd.set_xsave(&state.xsave) })?;
        set("SET_XCRS", fd.set_xcrs(&state.xcrs))?;
        set("SET_DEBUGREGS", fd.set_debug_regs(&state.debugregs))?;
        self.restore_msrs(&state.msrs)?;
        set("SET_VCPU_EVENTS", fd.set_vcpu_events(&state.events))?;
        self.fd.get_kvm_run().request_interrupt_window = state.request_interrupt_window;
        Ok(())
    }
}
