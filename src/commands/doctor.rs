//! `rrr doctor`: is this machine ready for rrr? KVM (hardware or software-only), the carrier,
//! the build tools, the cache. Every problem comes with the command that fixes it.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Result;
use rrr_vmm::host::KvmKind;

#[derive(clap::Args, Default)]
pub struct Args {
    /// Print the checks as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
enum Status {
    Ok,
    /// Works, but worth knowing (e.g. the carrier will be used, a kernel is not built yet).
    Note,
    /// Something required is missing: doctor exits non-zero.
    Fail,
}

#[derive(Debug, serde::Serialize)]
struct Check {
    name: String,
    status: Status,
    detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    fix: Option<String>,
}

impl Check {
    fn new(name: &str, status: Status, detail: impl Into<String>) -> Self {
        Check {
            name: name.to_owned(),
            status,
            detail: detail.into(),
            fix: None,
        }
    }

    fn fix(mut self, fix: impl Into<String>) -> Self {
        self.fix = Some(fix.into());
        self
    }
}

fn apt(package: &str) -> String {
    format!("sudo scripts/setup  (or: sudo apt-get install --no-install-recommends {package})")
}

pub fn run(args: Args) -> Result<i32> {
    let mut checks = Vec::new();
    let kvm = KvmKind::detect();
    checks.extend(kvm_checks(&kvm));
    checks.extend(carrier_checks(!kvm.is_hardware()));
    checks.extend(tool_checks());
    checks.extend(cache_checks());

    let failed = checks.iter().filter(|c| c.status == Status::Fail).count();
    if args.json {
        let report = serde_json::json!({ "ok": failed == 0, "checks": checks });
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&checks);
        if failed == 0 {
            println!("rrr is ready.");
        } else {
            println!("{failed} problem(s); `sudo scripts/setup` installs everything rrr needs.");
        }
    }
    Ok(if failed == 0 { 0 } else { 1 })
}

fn print_table(checks: &[Check]) {
    let width = checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
    for c in checks {
        let tag = match c.status {
            Status::Ok => "ok  ",
            Status::Note => "note",
            Status::Fail => "FAIL",
        };
        println!("{tag}  {:width$}  {}", c.name, c.detail);
        if let Some(fix) = &c.fix {
            println!("      {:width$}  fix: {fix}", "");
        }
    }
}

fn kvm_checks(kvm: &KvmKind) -> Vec<Check> {
    match kvm {
        KvmKind::Hardware { .. } => vec![Check::new("/dev/kvm", Status::Ok, kvm.to_string())],
        KvmKind::Software { .. } => vec![Check::new(
            "/dev/kvm",
            Status::Note,
            format!("{kvm}: rrr runs its VMM inside the carrier (QEMU with AMD-V)"),
        )],
        KvmKind::Unusable(_) => vec![Check::new("/dev/kvm", Status::Fail, kvm.to_string()).fix(
            "load KVM (`sudo modprobe kvm_intel` or `sudo modprobe kvm_amd`), enable \
             virtualization in the firmware, and give this user read/write access to /dev/kvm",
        )],
    }
}

/// The carrier is required only where KVM is not hardware virtualization.
fn carrier_checks(needed: bool) -> Vec<Check> {
    let missing = if needed { Status::Fail } else { Status::Note };
    let mut checks = Vec::new();
    match first_line(Command::new("qemu-system-x86_64").arg("--version")) {
        Some(version) => checks.push(Check::new("qemu-system-x86_64", Status::Ok, version)),
        None => checks.push(
            Check::new(
                "qemu-system-x86_64",
                missing,
                "not found (the carrier needs it)",
            )
            .fix(apt("qemu-system-x86")),
        ),
    }
    let kernel = crate::cache::cache_dir()
        .ok()
        .and_then(|cache| rrr_kernels::cached(&rrr_kernels::KernelSpec::carrier(), &cache).ok())
        .flatten();
    checks.push(match kernel {
        Some(k) => Check::new(
            "carrier kernel",
            Status::Ok,
            format!("cached at {}", k.dir.display()),
        ),
        None => Check::new(
            "carrier kernel",
            Status::Note,
            "not built yet; built on first use (about 5 minutes)",
        )
        .fix("rrr kernel build --carrier"),
    });
    checks
}

/// The commands rrr needs and the Debian package of each: the very list `scripts/setup` checks
/// after installing (`scripts/check-requirements`), so the two cannot disagree.
const REQUIREMENTS: &str = include_str!("../../scripts/requirements");

fn requirements() -> Vec<(&'static str, &'static str)> {
    REQUIREMENTS
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            Some((words.next()?, words.next()?))
        })
        .collect()
}

fn tool_checks() -> Vec<Check> {
    let mut checks = Vec::new();
    // QEMU's system emulator is the carrier's, checked (and required only where needed) above.
    for (tool, package) in requirements()
        .into_iter()
        .filter(|(tool, _)| *tool != "qemu-system-x86_64")
    {
        checks.push(match find_in_path(tool) {
            Some(path) => Check::new(tool, Status::Ok, path.display().to_string()),
            None => Check::new(tool, Status::Fail, "not found").fix(apt(package)),
        });
    }
    for (name, header, package) in [
        ("libelf headers", "/usr/include/libelf.h", "libelf-dev"),
        (
            "openssl headers",
            "/usr/include/openssl/ssl.h",
            "libssl-dev",
        ),
    ] {
        checks.push(if Path::new(header).is_file() {
            Check::new(name, Status::Ok, header)
        } else {
            Check::new(name, Status::Fail, format!("{header} missing")).fix(apt(package))
        });
    }
    checks.push(match static_elf("/bin/busybox") {
        Ok(true) => Check::new("busybox", Status::Ok, "/bin/busybox (static)"),
        Ok(false) => Check::new(
            "busybox",
            Status::Fail,
            "/bin/busybox is dynamically linked",
        )
        .fix(apt("busybox-static")),
        Err(why) => Check::new("busybox", Status::Fail, why).fix(apt("busybox-static")),
    });
    let tarball = rrr_kernels::source::debian_tarball();
    checks.push(if tarball.is_file() {
        let version = rrr_kernels::source::debian_version().unwrap_or_default();
        Check::new(
            "kernel source",
            Status::Ok,
            format!("{} ({version})", tarball.display()),
        )
    } else {
        Check::new(
            "kernel source",
            Status::Fail,
            format!("{} missing", tarball.display()),
        )
        .fix(apt(rrr_kernels::source::DEBIAN_PACKAGE))
    });
    checks
}

fn cache_checks() -> Vec<Check> {
    match crate::cache::cache_dir() {
        Ok(dir) => {
            let used = dir_size(&dir);
            let free = free_bytes(&dir);
            let mut check = Check::new(
                "cache",
                Status::Ok,
                format!(
                    "{} ({} used, {} free)",
                    dir.display(),
                    human(used),
                    free.map_or("?".into(), human)
                ),
            );
            // Two kernel builds with their object directories take a few GiB.
            if free.is_some_and(|f| f < 5 << 30) {
                check.status = Status::Fail;
                check = check.fix(format!(
                    "free disk space under {} (at least 5 GiB), or set RRR_CACHE_DIR elsewhere",
                    dir.display()
                ));
            }
            vec![check]
        }
        Err(err) => vec![Check::new("cache", Status::Fail, format!("{err:#}"))
            .fix("set RRR_CACHE_DIR to a writable directory")],
    }
}

fn first_line(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status.success().then(|| {
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .to_owned()
    })
}

fn find_in_path(tool: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(tool))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Whether an ELF executable is static (has no `PT_INTERP` program header). The guest has no
/// dynamic loader, so a dynamically linked busybox cannot run there.
fn static_elf(path: &str) -> Result<bool, String> {
    let data = std::fs::read(path).map_err(|e| format!("{path}: {e}"))?;
    let u16_at = |o: usize| data.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        data.get(o..o + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
    };
    let u64_at = |o: usize| {
        data.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
    };
    if data.get(..5) != Some(b"\x7fELF\x02") {
        return Err(format!("{path} is not a 64-bit ELF executable"));
    }
    let bad = || format!("{path}: truncated ELF header");
    let phoff = u64_at(0x20).ok_or_else(bad)? as usize;
    let phentsize = u16_at(0x36).ok_or_else(bad)? as usize;
    let phnum = u16_at(0x38).ok_or_else(bad)? as usize;
    for i in 0..phnum {
        const PT_INTERP: u32 = 3;
        if u32_at(phoff + i * phentsize).ok_or_else(bad)? == PT_INTERP {
            return Ok(false);
        }
    }
    Ok(true)
}

fn dir_size(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            match entry.metadata() {
                Ok(m) if m.is_dir() => stack.push(entry.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs fills the zeroed struct we pass; the path is NUL-terminated.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) } == 0)
        .then(|| stat.f_bavail as u64 * stat.f_frsize as u64)
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_and_dynamic_executables_are_told_apart() {
        assert_eq!(static_elf("/bin/sh"), Ok(false));
        let err = static_elf("/etc/hostname").unwrap_err();
        assert!(err.contains("not a 64-bit ELF"), "{err}");
    }

    #[test]
    fn doctor_checks_the_list_setup_checks() {
        let list = requirements();
        for tool in [
            "gcc",
            "make",
            "mke2fs",
            "qemu-img",
            "qemu-system-x86_64",
            "git",
        ] {
            assert!(list.iter().any(|(t, _)| *t == tool), "{tool} missing");
        }
        assert!(list.contains(&("qemu-img", "qemu-utils")));
        let names: Vec<String> = tool_checks().into_iter().map(|c| c.name).collect();
        assert!(names.iter().any(|n| n == "qemu-img"), "{names:?}");
        assert!(
            !names.iter().any(|n| n == "qemu-system-x86_64"),
            "{names:?}"
        );
    }

    #[test]
    fn sizes_are_human() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(3 << 30), "3.0 GiB");
    }
}
