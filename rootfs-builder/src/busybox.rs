//! The busybox that gives the rootfs a shell and the usual tools, and its applet links.

use std::path::{Path, PathBuf};

use crate::tool::combined;
use crate::RootfsError;

/// Debian's busybox-static installs here.
pub const DEFAULT_BUSYBOX: &str = "/bin/busybox";

/// ELF program header type of the dynamic loader's path: present only in dynamic binaries.
const PT_INTERP: u32 = 3;

/// Reads the busybox binary, refusing one that needs a dynamic loader the rootfs does not have.
pub fn load(path: &Path) -> Result<Vec<u8>, RootfsError> {
    let unusable = |why: String| RootfsError::BusyboxUnusable {
        path: path.to_path_buf(),
        why,
    };
    let bytes = std::fs::read(path).map_err(|err| unusable(err.to_string()))?;
    match needs_interpreter(&bytes) {
        None => Err(unusable("not a 64-bit x86 ELF".into())),
        Some(true) => Err(unusable("it is dynamically linked".into())),
        Some(false) => Ok(bytes),
    }
}

/// Whether an ELF64 little-endian file has a PT_INTERP header; None when it is not one.
fn needs_interpreter(elf: &[u8]) -> Option<bool> {
    if elf.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let u16_at = |at: usize| Some(u16::from_le_bytes(elf.get(at..at + 2)?.try_into().ok()?));
    let phoff = u64::from_le_bytes(elf.get(0x20..0x28)?.try_into().ok()?) as usize;
    let phentsize = u16_at(0x36)? as usize;
    let phnum = u16_at(0x38)? as usize;
    for i in 0..phnum {
        let at = phoff.checked_add(i.checked_mul(phentsize)?)?;
        let p_type = u32::from_le_bytes(elf.get(at..at + 4)?.try_into().ok()?);
        if p_type == PT_INTERP {
            return Some(true);
        }
    }
    Some(false)
}

/// The applets this busybox was built with, as paths relative to `/` (`bin/sh`, `sbin/ip`, ...),
/// which is what `busybox --install -s` would create.
pub fn applets(busybox: &Path) -> Result<Vec<PathBuf>, RootfsError> {
    let output = std::process::Command::new(busybox)
        .arg("--list-full")
        .output()
        .map_err(RootfsError::io(format!("cannot run {}", busybox.display())))?;
    if !output.status.success() {
        return Err(RootfsError::BusyboxUnusable {
            path: busybox.to_path_buf(),
            why: format!("`--list-full` failed: {}", combined(&output)),
        });
    }
    Ok(parse_applets(&String::from_utf8_lossy(&output.stdout)))
}

fn parse_applets(list: &str) -> Vec<PathBuf> {
    list.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.contains(".."))
        .map(|line| PathBuf::from(line.trim_start_matches('/')))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn applet_list_is_relative() {
        let list = "usr/bin/[\nbin/sh\n/sbin/ip\n\n../../etc/x\n";
        assert_eq!(
            parse_applets(list),
            [
                PathBuf::from("usr/bin/["),
                PathBuf::from("bin/sh"),
                PathBuf::from("sbin/ip")
            ]
        );
    }

    #[test]
    fn dynamic_binaries_are_detected() {
        // The test binary itself is dynamically linked.
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert_eq!(needs_interpreter(&me), Some(true));
        assert_eq!(needs_interpreter(b"#!/bin/sh\n"), None);
    }
}
