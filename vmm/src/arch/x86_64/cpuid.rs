//! The fixed CPU model the guest sees, and the kernel command line that goes with it.
//!
//! Starting from what KVM supports, we hide everything that lets the guest reach around the
//! deterministic devices (local APIC, x2APIC, TSC-deadline timer), read entropy or time we cannot
//! intercept (RDRAND, RDSEED), behave differently from run to run (TSX, MONITOR/MWAIT, the PMU),
//! or notice it is virtualized (the hypervisor bit and KVM's paravirt leaves). The topology is one
//! core, one thread.
//!
//! On a software-only KVM (`kvm_pvm`) the guest's `CPUID` returns the host's values whatever
//! `KVM_SET_CPUID2` said, so the same features are also cleared on the kernel command line.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};
use serde::{Deserialize, Serialize};

/// Size of the buffer handed to `KVM_GET_SUPPORTED_CPUID`.
pub const MAX_CPUID_ENTRIES: usize = kvm_bindings::KVM_MAX_CPUID_ENTRIES;

/// Kernel parameters that match the CPU model and the board: serial console, PIC-only interrupt
/// delivery, jiffies as the clocksource (virtual time is the only time the guest may trust), no
/// KVM paravirt clock, no KASLR (so kernel addresses are the same on every run), and a panic or
/// reboot that ends the VM instead of waiting. `noxsave` keeps the FPU state in the legacy
/// FXSAVE layout on every host: the XSAVE area's size and features depend on the host CPU (and
/// nested AMD-V under QEMU reports inconsistent XSAVE sizes, which makes Linux WARN at boot).
///
/// The kernel is also kept off the TSC (`tsc` in [`CLEARED_FEATURES`]) with a preset `lpj=`: a
/// KVM VMM cannot trap `rdtsc`, and the TSC runs in host time, so TSC calibration against the
/// virtual PIT, `udelay()`'s TSC loops and `random_get_entropy()` all made the exit count vary
/// by thousands between two boots. Without it `udelay()` counts loops and the entropy fallback
/// reads jiffies; measured in the carrier, two boots then differ by about ten exits (the stall
/// landmarks) instead of about a thousand, and boot to init is ~40% faster.
pub const BASE_CMDLINE: &str = "console=ttyS0 earlyprintk=serial,ttyS0 nolapic noapic nokaslr \
     no-kvmclock tsc=unstable clocksource=jiffies lpj=2000000 i8042.noaux panic=-1 reboot=k \
     noxsave mitigations=off ibt=off";

/// Feature flags (Linux 6.12 `/proc/cpuinfo` names) the guest kernel must not use; the CPUID
/// table hides the same ones. Linux reads at most 127 characters of `clearcpuid=`.
pub const CLEARED_FEATURES: &[&str] = &[
    "rdrand",
    "rdseed",
    "x2apic",
    "tsc_deadline_timer",
    "rtm",
    "hle",
    "monitor",
    "waitpkg",
    "hypervisor",
    "arch_perfmon",
    "perfctr_core",
    "tsc",
];

/// Extra features to clear where CPUID cannot be filtered and guest kernel mode is emulated:
/// `kvm_pvm`'s instruction emulator fails on POPCNT, XRSTOR and VEX-encoded instructions.
pub const SOFTWARE_KVM_CLEARED_FEATURES: &[&str] = &["popcnt"];
/// The default command line for a host with hardware virtualization.
pub fn default_cmdline() -> String {
    format!("{BASE_CMDLINE} clearcpuid={}", CLEARED_FEATURES.join(","))
}

/// The default command line for a software-only KVM.
pub fn software_kvm_cmdline() -> String {
    let mut cleared: Vec<&str> = CLEARED_FEATURES.to_vec();
    cleared.extend_from_slice(SOFTWARE_KVM_CLEARED_FEATURES);
    format!("{BASE_CMDLINE} clearcpuid={}", cleared.join(","))
}

// Bit positions, by leaf and register.
mod bits {
    // Leaf 1 ECX.
    pub const MONITOR: u32 = 3;
    pub const VMX: u32 = 5;
    pub const X2APIC: u32 = 21;
    pub const TSC_DEADLINE: u32 = 24;
    pub const RDRAND: u32 = 30;
    pub const HYPERVISOR: u32 = 31;
    // Leaf 1 EDX.
    pub const APIC: u32 = 9;
    pub const HTT: u32 = 28;
    // Leaf 7.0 EBX.
    pub const HLE: u32 = 4;
    pub const RTM: u32 = 11;
    pub const RDSEED: u32 = 18;
    // Leaf 7.0 ECX.
    pub const WAITPKG: u32 = 5;
    // Leaf 7.0 EDX.
    pub const RTM_ALWAYS_ABORT: u32 = 11;
    pub const TSX_FORCE_ABORT: u32 = 13;
    // Leaf 0x8000_0001 ECX.
    pub const CMP_LEGACY: u32 = 1;
    pub const SVM: u32 = 2;
    pub const EXT_APIC_SPACE: u32 = 3;
    pub const MWAITX: u32 = 29;
    pub const PERFCTR_CORE: u32 = 23;
    pub const PERFCTR_NB: u32 = 24;
    pub const PERFCTR_LLC: u32 = 28;
    // Leaf 0x8000_0007 EDX.
    pub const INVARIANT_TSC: u32 = 8;
}

fn clear(reg: &mut u32, bits: &[u32]) {
    for bit in bits {
        *reg &= !(1u32 << bit);
    }
}

/// Applies the CPU model to the entries KVM supports.
pub fn filter(supported: &CpuId) -> Result<CpuId, vmm_sys_util::fam::Error> {
    let entries: Vec<kvm_cpuid_entry2> = supported
        .as_slice()
        .iter()
        // KVM's paravirt leaves (and any other hypervisor range) are dropped entirely.
        .filter(|e| !(0x4000_0000..0x5000_0000).contains(&e.function))
        .map(|e| filter_entry(*e))
        .collect();
    CpuId::from_entries(&entries)
}

fn filter_entry(mut e: kvm_cpuid_entry2) -> kvm_cpuid_entry2 {
    match (e.function, e.index) {
        (0x1, _) => {
            clear(
                &mut e.ecx,
                &[
                    bits::MONITOR,
                    bits::VMX,
                    bits::X2APIC,
                    bits::TSC_DEADLINE,
                    bits::RDRAND,
                    bits::HYPERVISOR,
                ],
            );
            clear(&mut e.edx, &[bits::APIC, bits::HTT]);
            // EBX: brand index and CLFLUSH size stay; one logical processor, initial APIC ID 0.
            e.ebx = (e.ebx & 0x0000_ffff) | (1 << 16);
        }
        (0x4, _) => {
            // Deterministic cache parameters: one core per package, one thread per cache.
            e.eax &= !(0xfc00_0000 | 0x03ff_c000);
        }
        (0x5, _) => {
            // MONITOR/MWAIT parameters are meaningless once MONITOR is hidden.
            e.eax = 0;
            e.ebx = 0;
            e.ecx = 0;
            e.edx = 0;
        }
        (0x7, 0) => {
            clear(&mut e.ebx, &[bits::HLE, bits::RTM, bits::RDSEED]);
            clear(&mut e.ecx, &[bits::WAITPKG]);
            clear(&mut e.edx, &[bits::RTM_ALWAYS_ABORT, bits::TSX_FORCE_ABORT]);
        }
        (0xa, _) | (0x8000_0022, _) => {
            // Architectural and AMD PerfMonV2 PMU leaves: no counters.
            e.eax = 0;
            e.ebx = 0;
            e.ecx = 0;
            e.edx = 0;
        }
        (0xb, index) | (0x1f, index) => {
            // Extended topology: level 0 is SMT with one thread, level 1 is core with one core.
            e.edx = 0;
            match index {
                0 => {
                    e.eax = 0;
                    e.ebx = 1;
                    e.ecx = (1 << 8) | index;
                }
                1 => {
                    e.eax = 0;
                    e.ebx = 1;
                    e.ecx = (2 << 8) | index;
                }
                _ => {
                    e.eax = 0;
                    e.ebx = 0;
                    e.ecx = index;
                }
            }
        }
        (0x8000_0001, _) => {
            clear(
                &mut e.ecx,
                &[
                    bits::CMP_LEGACY,
                    bits::SVM,
                    bits::EXT_APIC_SPACE,
                    bits::MWAITX,
                    bits::PERFCTR_CORE,
                    bits::PERFCTR_NB,
                    bits::PERFCTR_LLC,
                ],
            );
            clear(&mut e.edx, &[bits::APIC]);
        }
        (0x8000_0007, _) => clear(&mut e.edx, &[bits::INVARIANT_TSC]),
        (0x8000_0008, _) => {
            // ECX: NC (cores - 1) = 0 and APIC ID size = 0.
            e.ecx &= !0x0000_f0ff;
        }
        (0x8000_001e, _) => {
            // AMD topology extensions: compute unit 0, one thread per unit, node 0.
            e.eax = 0;
            e.ebx = 0;
            e.ecx = 0;
        }
        _ => {}
    }
    e
}

/// One CPUID entry as recorded in a [`crate::description::VmDescription`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuidEntry {
    pub function: u32,
    pub index: u32,
    pub flags: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

impl From<&kvm_cpuid_entry2> for CpuidEntry {
    fn from(e: &kvm_cpuid_entry2) -> Self {
        CpuidEntry {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    fn find(cpuid: &CpuId, function: u32, index: u32) -> Option<kvm_cpuid_entry2> {
        cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .copied()
    }

    #[test]
    fn hides_apic_entropy_tsx_pmu_and_hypervisor() {
        let supported = CpuId::from_entries(&[
            entry(0x1, 0, [0x00a2_0f12, 0x0810_0800, u32::MAX, u32::MAX]),
            entry(0x7, 0, [0, u32::MAX, u32::MAX, u32::MAX]),
            entry(0xa, 0, [0x0804_0002, 0xff, 0, 0x603]),
            entry(
                0x4000_0000,
                0,
                [0x4000_0001, 0x4b4d_564b, 0x564b_4d56, 0x4d],
            ),
            entry(0x4000_0001, 0, [0xffff, 0, 0, 0]),
        ])
        .unwrap();
        let model = filter(&supported).unwrap();
        assert_eq!(model.as_slice().len(), 3, "paravirt leaves must be gone");
        let leaf1 = find(&model, 0x1, 0).unwrap();
        assert_eq!(leaf1.eax, 0x00a2_0f12, "family/model/stepping are kept");
        assert_eq!(leaf1.edx & (1 << 9), 0, "APIC");
        assert_eq!(leaf1.edx & (1 << 28), 0, "HTT");
        for bit in [3, 21, 24, 30, 31] {
            assert_eq!(leaf1.ecx & (1 << bit), 0, "leaf 1 ECX bit {bit}");
        }
        assert_eq!((leaf1.ebx >> 16) & 0xff, 1, "one logical processor");
        assert_eq!(leaf1.ebx >> 24, 0, "APIC ID 0");
        assert_eq!(leaf1.ebx & 0xffff, 0x0800, "CLFLUSH size kept");
        let leaf7 = find(&model, 0x7, 0).unwrap();
        for bit in [4, 11, 18] {
            assert_eq!(leaf7.ebx & (1 << bit), 0, "leaf 7 EBX bit {bit}");
        }
        assert_ne!(leaf7.ebx & 1, 0, "unrelated features stay");
        let pmu = find(&model, 0xa, 0).unwrap();
        assert_eq!((pmu.eax, pmu.ebx, pmu.ecx, pmu.edx), (0, 0, 0, 0));
    }

    #[test]
    fn topology_is_one_thread_one_core() {
        let supported = CpuId::from_entries(&[
            entry(0xb, 0, [1, 2, 0x100, 7]),
            entry(0xb, 1, [4, 16, 0x201, 7]),
            entry(0x8000_0008, 0, [0x3030, 0, 0x700f, 0]),
        ])
        .unwrap();
        let model = filter(&supported).unwrap();
        let smt = find(&model, 0xb, 0).unwrap();
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 0));
        let core = find(&model, 0xb, 1).unwrap();
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (0, 1, 0x201, 0));
        assert_eq!(find(&model, 0x8000_0008, 0).unwrap().ecx & 0xf0ff, 0);
    }

    #[test]
    fn cmdline_fits_linux_limits() {
        let cleared = CLEARED_FEATURES
            .iter()
            .chain(SOFTWARE_KVM_CLEARED_FEATURES)
            .copied()
            .collect::<Vec<_>>()
            .join(",");
        assert!(cleared.len() < 128, "clearcpuid= is cut at 127 characters");
        assert!(default_cmdline().contains("nolapic noapic"));
        assert!(software_kvm_cmdline().contains("noxsave"));
        assert!(software_kvm_cmdline().contains("popcnt"));
    }
}
