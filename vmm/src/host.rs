//! What kind of KVM this host offers.
//!
//! rrr runs its VMM directly where KVM has hardware virtualization (VT-x/AMD-V). Where `/dev/kvm`
//! is a software hypervisor (the `kvm_pvm` module on our CI machines: guest kernel mode is
//! emulated, slowly and with gaps), rrr moves into the carrier instead.

use std::fs::OpenOptions;
use std::path::Path;

/// The KVM a host offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvmKind {
    /// `/dev/kvm` works and the CPU advertises VT-x (`vmx`) or AMD-V (`svm`).
    Hardware { extension: &'static str },
    /// `/dev/kvm` works but the CPU has neither flag: a software hypervisor such as `kvm_pvm`.
    Software { module: Option<String> },
    /// `/dev/kvm` is missing or cannot be opened; the string says why.
    Unusable(String),
}

impl KvmKind {
    pub fn detect() -> Self {
        Self::detect_at(Path::new("/dev/kvm"), Path::new("/proc/cpuinfo"))
    }

    fn detect_at(dev_kvm: &Path, cpuinfo: &Path) -> Self {
        if let Err(err) = OpenOptions::new().read(true).write(true).open(dev_kvm) {
            return KvmKind::Unusable(format!("cannot open {}: {err}", dev_kvm.display()));
        }
        let cpuinfo = std::fs::read_to_string(cpuinfo).unwrap_or_default();
        let flags = cpuinfo
            .lines()
            .find(|line| line.starts_with("flags"))
            .unwrap_or("");
        for (flag, extension) in [("vmx", "VT-x"), ("svm", "AMD-V")] {
            if flags.split_whitespace().any(|f| f == flag) {
                return KvmKind::Hardware { extension };
            }
        }
        KvmKind::Software {
            module: software_kvm_module(),
        }
    }

    pub fn is_hardware(&self) -> bool {
        matches!(self, KvmKind::Hardware { .. })
    }
}

/// The loaded KVM vendor module, when the host exposes `/sys/module`.
fn software_kvm_module() -> Option<String> {
    ["kvm_pvm", "kvm_intel", "kvm_amd"]
        .into_iter()
        .find(|m| Path::new("/sys/module").join(m).exists())
        .map(str::to_owned)
}

impl std::fmt::Display for KvmKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KvmKind::Hardware { extension } => write!(f, "hardware virtualization ({extension})"),
            KvmKind::Software { module: Some(m) } => {
                write!(f, "software-only KVM (module {m}, no vmx/svm CPU flag)")
            }
            KvmKind::Software { module: None } => {
                write!(f, "software-only KVM (no vmx/svm CPU flag)")
            }
            KvmKind::Unusable(why) => write!(f, "no usable KVM: {why}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_device_is_unusable() {
        let kind = KvmKind::detect_at(Path::new("/nonexistent/kvm"), Path::new("/proc/cpuinfo"));
        assert!(matches!(kind, KvmKind::Unusable(ref why) if why.contains("/nonexistent/kvm")));
    }

    #[test]
    fn cpu_flags_decide_hardware_or_software() {
        let dir = tempfile::tempdir().unwrap();
        let dev = dir.path().join("kvm");
        std::fs::write(&dev, b"").unwrap();
        let cpuinfo = dir.path().join("cpuinfo");
        std::fs::write(&cpuinfo, "processor\t: 0\nflags\t\t: fpu sse svm lm\n").unwrap();
        assert_eq!(
            KvmKind::detect_at(&dev, &cpuinfo),
            KvmKind::Hardware { extension: "AMD-V" }
        );
        std::fs::write(&cpuinfo, "flags\t\t: fpu sse lm\n").unwrap();
        assert!(matches!(
            KvmKind::detect_at(&dev, &cpuinfo),
            KvmKind::Software { .. }
        ));
    }
}
