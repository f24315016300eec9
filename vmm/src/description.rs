//! What the guest was shown: the CPU model and the board. A run returns it so that a replay can
//! refuse to run on a machine that would show the guest something different.

use serde::{Deserialize, Serialize};

use crate::arch::x86_64::cpuid::CpuidEntry;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmDescription {
    /// The final CPUID table handed to `KVM_SET_CPUID2`.
    pub cpuid: Vec<CpuidEntry>,
    /// The kernel command line, exactly as written into guest memory.
    pub cmdline: String,
    pub mem_bytes: u64,
    /// Virtual nanoseconds per synchronous exit.
    pub quantum_ns: u64,
    /// Unix time of the CMOS clock at virtual time zero.
    pub epoch_unix_secs: u64,
    /// The KVM the VM ran on (`host::KvmKind`'s description); CPUID filtering only binds the
    /// guest on hardware virtualization.
    pub kvm: String,
    /// Physical address of the kernel entry point.
    pub kernel_entry: u64,
    pub initrd_size: Option<u64>,
}

impl VmDescription {
    /// The first difference that would make a replay see another machine, if any.
    pub fn difference(&self, other: &VmDescription) -> Option<String> {
        if self.cpuid != other.cpuid {
            let first = self
                .cpuid
                .iter()
                .zip(&other.cpuid)
                .find(|(a, b)| a != b)
                .map(|(a, b)| format!("{a:x?} vs {b:x?}"))
                .unwrap_or_else(|| {
                    format!("{} vs {} entries", self.cpuid.len(), other.cpuid.len())
                });
            return Some(format!("CPUID differs: {first}"));
        }
        let fields = [
            ("command line", self.cmdline != other.cmdline),
            ("memory size", self.mem_bytes != other.mem_bytes),
            ("time quantum", self.quantum_ns != other.quantum_ns),
            ("epoch", self.epoch_unix_secs != other.epoch_unix_secs),
            ("kernel entry", self.kernel_entry != other.kernel_entry),
            ("initrd size", self.initrd_size != other.initrd_size),
        ];
        fields
            .iter()
            .find(|(_, differs)| *differs)
            .map(|(what, _)| format!("{what} differs"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_names_differences() {
        let a = VmDescription {
            cpuid: vec![CpuidEntry {
                function: 1,
                index: 0,
                flags: 0,
                eax: 0xa20f12,
                ebx: 0x10800,
                ecx: 0,
                edx: 0,
            }],
            cmdline: "console=ttyS0".into(),
            mem_bytes: 256 << 20,
            quantum_ns: 2000,
            epoch_unix_secs: 1,
            kvm: "hardware virtualization (AMD-V)".into(),
            kernel_entry: 0x100_0000,
            initrd_size: Some(4096),
        };
        let json = serde_json::to_string(&a).unwrap();
        let b: VmDescription = serde_json::from_str(&json).unwrap();
        assert_eq!(a.difference(&b), None);
        let mut c = b.clone();
        c.cpuid[0].ecx = 1;
        assert!(a.difference(&c).unwrap().contains("CPUID"));
        let mut d = b;
        d.cmdline.push_str(" quiet");
        assert_eq!(a.difference(&d).unwrap(), "command line differs");
    }
}
