//! `rrr boot` end to end. The guest-running tests go through `rrr boot`, which moves itself into
//! the carrier on a host whose KVM is software-only; they fail loudly if anything is missing.
//! The bad-input tests need no guest.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{default_kernel, initramfs_with_init, text, RRR};

fn rrr(args: &[&str]) -> Output {
    Command::new(RRR)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("cannot run the rrr binary")
}

/// A minimal x86-64 ELF with one loadable segment, enough to get past the kernel checks.
fn tiny_elf() -> Vec<u8> {
    let paddr: u64 = 0x100_0000;
    let mut b = vec![0u8; 64 + 56];
    b[..4].copy_from_slice(b"\x7fELF");
    b[4] = 2;
    b[5] = 1;
    b[6] = 1;
    b[16..18].copy_from_slice(&2u16.to_le_bytes());
    b[18..20].copy_from_slice(&62u16.to_le_bytes());
    b[24..32].copy_from_slice(&paddr.to_le_bytes());
    b[32..40].copy_from_slice(&64u64.to_le_bytes());
    b[52..54].copy_from_slice(&64u16.to_le_bytes());
    b[54..56].copy_from_slice(&56u16.to_le_bytes());
    b[56..58].copy_from_slice(&1u16.to_le_bytes());
    let ph = &mut b[64..];
    ph[0..4].copy_from_slice(&1u32.to_le_bytes());
    ph[8..16].copy_from_slice(&120u64.to_le_bytes());
    ph[16..24].copy_from_slice(&paddr.to_le_bytes());
    ph[24..32].copy_from_slice(&paddr.to_le_bytes());
    ph[32..40].copy_from_slice(&1u64.to_le_bytes());
    ph[40..48].copy_from_slice(&0x1000u64.to_le_bytes());
    b.push(0xf4);
    b
}

#[test]
fn refuses_a_missing_kernel() {
    let out = rrr(&["boot", "--direct", "--kernel", "/nonexistent/vmlinux"]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("/nonexistent/vmlinux") && err.contains("does not exist"),
        "{err}"
    );
}

#[test]
fn refuses_a_kernel_that_is_not_elf() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("vmlinux");
    std::fs::write(&kernel, b"#!/bin/sh\necho not a kernel\n").unwrap();
    let out = rrr(&["boot", "--direct", "--kernel", kernel.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("not an ELF file") && err.contains("vmlinux"),
        "{err}"
    );
}

#[test]
fn refuses_an_initrd_that_does_not_fit() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("vmlinux");
    std::fs::write(&kernel, tiny_elf()).unwrap();
    let initrd = dir.path().join("initrd");
    // Sparse: 100 MiB of initrd for a 64 MiB guest.
    std::fs::File::create(&initrd)
        .unwrap()
        .set_len(100 << 20)
        .unwrap();
    let out = rrr(&[
        "boot",
        "--direct",
        "--mem",
        "64",
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("initrd") && err.contains("--mem"),
        "expected the initrd-too-big error, got: {err}"
    );
}

struct Boot {
    console: String,
    summary: String,
}

fn boot(kernel: &Path, initrd: &Path) -> Boot {
    let out = rrr(&[
        "boot",
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--timeout",
        "300",
    ]);
    let console = text(&out.stdout);
    let err = text(&out.stderr);
    assert!(
        out.status.success(),
        "rrr boot failed ({}):\n--- stderr\n{err}\n--- console tail\n{}",
        out.status,
        console
            .lines()
            .rev()
            .take(30)
            .collect::<Vec<_>>()
            .join("\n")
    );
    let summary = err
        .lines()
        .find(|l| l.contains("rrr: guest "))
        .unwrap_or_else(|| panic!("no run summary on stderr:\n{err}"))
        .to_owned();
    Boot { console, summary }
}

/// "after N exits" from the summary line.
fn exits(summary: &str) -> u64 {
    summary
        .split("after ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exit count in {summary:?}"))
}

#[test]
fn boots_to_init_in_pic_mode_with_jiffies_twice() {
    let kernel = default_kernel();
    // In /tmp, where users keep such files and the carrier has its own tmpfs: the initrd's
    // directory must be shared with it.
    let dir = tempfile::tempdir_in("/tmp").unwrap();
    let initrd = initramfs_with_init(dir.path(), "guest/test-init/init.c");

    let first = boot(&kernel, &initrd);
    for expected in [
        "rrr-test: marker=RRR_INIT_STARTED",
        "rrr-test: clocksource=jiffies",
        "rrr-test: xt-pic=yes",
        "rrr-test: marker=RRR_INIT_DONE",
    ] {
        assert!(
            first.console.contains(expected),
            "console lacks {expected:?}:\n{}",
            first.console
        );
    }
    assert!(
        first.console.contains("APIC: Keep in PIC mode(8259)"),
        "the kernel did not keep PIC mode"
    );
    assert!(first.summary.contains("powered off"), "{}", first.summary);

    let second = boot(&kernel, &initrd);
    assert!(second.console.contains("rrr-test: marker=RRR_INIT_DONE"));
    eprintln!("boot 1: {}\nboot 2: {}", first.summary, second.summary);
    // Interrupts arrive only at synchronous exits, virtual time counts exits, the kernel is kept
    // off the TSC, and bounded work without exits gets no host-timed tick (`vmm::stall`): two
    // boots are the same run. A stall landmark in either boot would be the one host-timed input.
    assert_eq!(
        exits(&first.summary),
        exits(&second.summary),
        "two boots made different numbers of synchronous exits"
    );
    let differing: Vec<_> = first
        .console
        .lines()
        .zip(second.console.lines())
        .filter(|(x, y)| x != y)
        .take(10)
        .collect();
    assert!(
        differing.is_empty() && first.console.len() == second.console.len(),
        "two boots printed different consoles (timestamps included); first differing lines: \
         {differing:#?}"
    );
}
