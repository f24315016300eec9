//! The KVM system handle: open `/dev/kvm` and check it offers what rrr needs.

use kvm_bindings::CpuId;
use kvm_ioctls::{Cap, Kvm};

use crate::arch::x86_64::cpuid::MAX_CPUID_ENTRIES;

#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    #[error("cannot open /dev/kvm: {0}. Load the KVM module (modprobe kvm_intel or kvm_amd), make sure the CPU's virtualization extension is on, and that this user may open /dev/kvm (group kvm); `rrr doctor` checks all of it")]
    Open(kvm_ioctls::Error),
    #[error("/dev/kvm speaks KVM API version {0}, rrr needs 12")]
    ApiVersion(i32),
    #[error("this KVM lacks the {0:?} capability, which rrr needs")]
    MissingCap(Cap),
    #[error("KVM_GET_SUPPORTED_CPUID failed: {0}")]
    SupportedCpuid(kvm_ioctls::Error),
}

const REQUIRED_CAPS: &[Cap] = &[Cap::UserMemory, Cap::ExtCpuid, Cap::ImmediateExit];

/// An open, checked `/dev/kvm`.
pub struct KvmHandle {
    pub fd: Kvm,
}

impl KvmHandle {
    pub fn open() -> Result<Self, KvmError> {
        let fd = Kvm::new().map_err(KvmError::Open)?;
        let version = fd.get_api_version();
        if version != kvm_bindings::KVM_API_VERSION as i32 {
            return Err(KvmError::ApiVersion(version));
        }
        if let Some(cap) = REQUIRED_CAPS.iter().find(|c| !fd.check_extension(**c)) {
            return Err(KvmError::MissingCap(*cap));
        }
        Ok(KvmHandle { fd })
    }

    pub fn supported_cpuid(&self) -> Result<CpuId, KvmError> {
        self.fd
            .get_supported_cpuid(MAX_CPUID_ENTRIES)
            .map_err(KvmError::SupportedCpuid)
    }
}
