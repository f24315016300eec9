//! The QEMU command line of a carrier: TCG with an emulated AMD-V CPU, the host root over 9p
//! (read-only), writable 9p shares, the console to a log file, the command's output over
//! virtio-serial ports to host FIFOs and its input over one from a socket on QEMU's stdin
//! (virtio ports are not ttys: bytes arrive unchanged).

use std::ffi::OsString;
use std::path::Path;

use super::script::{Share, NINEP_OPTS, STDERR_PORT, STDIN_PORT, STDOUT_PORT};

pub const QEMU: &str = "qemu-system-x86_64";
/// Extra carrier kernel parameters, appended to the command line (debugging aid).
pub const EXTRA_CMDLINE_ENV: &str = "RRR_CARRIER_CMDLINE";
/// Mount tag of the read-only host root.
const ROOT_TAG: &str = "hostroot";

pub struct Launch<'a> {
    /// The carrier's `vmlinux`, booted through its PVH entry point: QEMU loads the ELF itself,
    /// so the compressed bzImage's self-decompression (0.5 to 0.9 s under TCG) never runs.
    pub vmlinux: &'a Path,
    pub mem_mb: u32,
    pub cpus: u32,
    pub init: &'a Path,
    pub console_log: &'a Path,
    pub stdout_fifo: &'a Path,
    pub stderr_fifo: &'a Path,
    pub shares: &'a [Share],
    /// Host TCP listeners, each reaching the inside as a virtio-serial port of that name.
    pub forwards: &'a [(String, std::net::SocketAddr)],
}

impl Launch<'_> {
    pub fn args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = Vec::new();
        let mut push = |a: &str| args.push(OsString::from(a));
        // One host thread per vCPU only helps with more than one vCPU.
        push("-accel");
        push(if self.cpus > 1 {
            "tcg,thread=multi"
        } else {
            "tcg"
        });
        // EPYC is an AMD model, so Linux picks kvm_amd; +svm is what makes KVM work inside.
        push("-cpu");
        push("EPYC,+svm");
        push("-smp");
        push(&self.cpus.to_string());
        push("-m");
        push(&self.mem_mb.to_string());
        for a in [
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ] {
            push(a);
        }
        push("-monitor");
        push("none");
        push("-chardev");
        push(&format!(
            "file,id=console,path={}",
            opt_path(self.console_log)
        ));
        push("-serial");
        push("chardev:console");
        push("-kernel");
        push(&self.vmlinux.to_string_lossy());
        push("-append");
        push(&self.cmdline());
        push("-virtfs");
        push(&format!(
            "local,path=/,mount_tag={ROOT_TAG},security_model=none,readonly=on,multidevs=remap"
        ));
        for share in self.shares {
            push("-virtfs");
            push(&format!(
                "local,path={},mount_tag={},security_model=none,multidevs=remap",
                opt_path(&share.path),
                share.tag
            ));
        }
        push("-device");
        push("virtio-serial-pci,id=ports");
        // The caller hands QEMU a connected socket as its stdin (fd 0); nothing else in this
        // configuration reads QEMU's stdin.
        let chardevs = [
            (
                "out",
                STDOUT_PORT,
                format!("file,id=out,path={}", opt_path(self.stdout_fifo)),
            ),
            (
                "err",
                STDERR_PORT,
                format!("file,id=err,path={}", opt_path(self.stderr_fifo)),
            ),
            ("in", STDIN_PORT, "socket,id=in,fd=0".to_owned()),
        ];
        for (nr, (id, name, chardev)) in chardevs.into_iter().enumerate() {
            push("-chardev");
            push(&chardev);
            push("-device");
            push(&format!(
                "virtserialport,bus=ports.0,nr={},chardev={id},name={name}",
                nr + 1
            ));
        }
        // QEMU listens (and accepts one client at a time); what the client sends reaches the
        // port inside, and what the inside writes goes back to it.
        for (i, (name, addr)) in self.forwards.iter().enumerate() {
            push("-chardev");
            push(&format!(
                "socket,id=fwd{i},host={},port={},server=on,wait=off",
                addr.ip(),
                addr.port()
            ));
            push("-device");
            push(&format!(
                "virtserialport,bus=ports.0,nr={},chardev=fwd{i},name={name}",
                // After stdout, stderr and stdin (ports 1 to 3).
                4 + i
            ));
        }
        args
    }

    /// The kernel command line. `panic=-1` plus QEMU's `-no-reboot` make any end of init (a
    /// clean exit or a crash) end QEMU; the root is the host's, read-only, with its page cache
    /// kept (`cache=loose`): it does not change under a run, and re-reading every executable
    /// page over 9p is the slowest part of starting programs. `pci=noacpi` routes PCI
    /// interrupts by the BIOS's table instead of ACPI's interrupt links: enabling a link for each
    /// virtio device took 0.15 s apiece under TCG.
    pub fn cmdline(&self) -> String {
        let mut cmdline = format!(
            "console=ttyS0 panic=-1 quiet pci=noacpi root={ROOT_TAG} rootfstype=9p \
             rootflags={NINEP_OPTS},cache=loose ro init={}",
            self.init.display()
        );
        // Under TCG the carrier's TSC runs at the host's rate, but its boot-time calibration
        // against the emulated PIT often fails on a loaded host; Linux then sets tsc_khz to 0
        // and KVM loops forever on KVM_REQ_CLOCK_UPDATE, so no nested guest ever runs an
        // instruction. Telling it the rate skips that calibration.
        if let Some(khz) = host_tsc_khz() {
            cmdline.push_str(&format!(" tsc_early_khz={khz}"));
        }
        // For experiments and debugging: extra kernel parameters for the carrier.
        if let Ok(extra) = std::env::var(EXTRA_CMDLINE_ENV) {
            cmdline.push(' ');
            cmdline.push_str(&extra);
        }
        cmdline
    }
}

/// The host's TSC rate in kHz, measured against the monotonic clock over 20 ms.
fn host_tsc_khz() -> Option<u64> {
    #[cfg(target_arch = "x86_64")]
    {
        let start = std::time::Instant::now();
        // SAFETY: RDTSC has no preconditions on x86-64.
        let t0 = unsafe { core::arch::x86_64::_rdtsc() };
        std::thread::sleep(std::time::Duration::from_millis(20));
        // SAFETY: as above.
        let t1 = unsafe { core::arch::x86_64::_rdtsc() };
        let nanos = start.elapsed().as_nanos() as u64;
        let khz = t1.checked_sub(t0)?.checked_mul(1_000_000)? / nanos.max(1);
        (khz > 0).then_some(khz)
    }
    #[cfg(not(target_arch = "x86_64"))]
    None
}

/// QEMU splits option values at commas; a literal comma is written twice.
fn opt_path(path: &Path) -> String {
    path.to_string_lossy().replace(',', ",,")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch<'a>(shares: &'a [Share], cpus: u32) -> Launch<'a> {
        Launch {
            vmlinux: Path::new("/k/vmlinux"),
            mem_mb: 2048,
            cpus,
            init: Path::new("/c/run/init.sh"),
            console_log: Path::new("/c/run/console.log"),
            stdout_fifo: Path::new("/c/run/out,1"),
            stderr_fifo: Path::new("/c/run/err"),
            shares,
            forwards: &[],
        }
    }

    fn joined(l: &Launch) -> String {
        l.args()
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn command_line_has_svm_root_share_ports_and_escaped_commas() {
        let shares = [Share {
            path: "/work/a,b".into(),
            tag: "rrr0".into(),
        }];
        let text = joined(&launch(&shares, 1));
        assert!(text.contains("-cpu EPYC,+svm"));
        assert!(text.contains("-accel tcg "));
        assert!(text.contains("path=/,mount_tag=hostroot,security_model=none,readonly=on"));
        assert!(text.contains("local,path=/work/a,,b,mount_tag=rrr0,security_model=none,"));
        assert!(!text.contains("rrr0,security_model=none,readonly"));
        assert!(text.contains("file,id=out,path=/c/run/out,,1"));
        assert!(text.contains("nr=1,chardev=out,name=rrr.stdout"));
        assert!(text.contains("nr=2,chardev=err,name=rrr.stderr"));
        assert!(text.contains("-chardev socket,id=in,fd=0 "));
        assert!(text.contains("nr=3,chardev=in,name=rrr.stdin"));
        assert!(text.contains("-kernel /k/vmlinux "));
        assert!(text.contains("-no-reboot"));
        assert!(text.contains("panic=-1") && text.contains("init=/c/run/init.sh"));
    }

    #[test]
    fn several_cpus_get_several_host_threads() {
        assert!(joined(&launch(&[], 2)).contains("-accel tcg,thread=multi -cpu EPYC,+svm -smp 2"));
    }
}
