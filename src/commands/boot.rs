//! `rrr boot`: boot a kernel in rrr's VMM, stream its console, forward stdin.
//!
//! Where this host's KVM is software-only, the command moves itself into the carrier (a QEMU
//! VM with real AMD-V) unless `--direct` says otherwise.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, Context};
use rrr_vmm::builder;
use rrr_vmm::config::{Timeout, VmConfig};
use rrr_vmm::host::KvmKind;
use rrr_vmm::run_loop::{self, RunEnd, RunError};

#[derive(clap::Args)]
pub struct Args {
    /// The kernel: a `vmlinux` ELF, or a kernel build directory holding one (as printed by
    /// `rrr kernel build`).
    #[arg(long)]
    pub kernel: PathBuf,
    /// An initramfs (cpio, optionally compressed as the kernel supports).
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Extra kernel parameters, appended after rrr's defaults (so they can override them).
    #[arg(long)]
    pub append: Option<String>,
    /// Replace rrr's default kernel command line entirely (`--append` still applies).
    #[arg(long)]
    pub cmdline: Option<String>,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = rrr_vmm::config::DEFAULT_MEM_MIB)]
    pub mem: u64,
    /// Give up after this many seconds of host time.
    #[arg(long)]
    pub timeout: Option<f64>,
    /// Give up after this many seconds of guest virtual time (deterministic).
    #[arg(long)]
    pub virtual_timeout: Option<f64>,
    /// Run on this host's /dev/kvm even if it is software-only (no carrier).
    #[arg(long)]
    pub direct: bool,
    /// Print the VM description (CPU model, command line) as JSON on stderr at the end.
    #[arg(long)]
    pub describe: bool,
}

/// Console output straight to our stdout, flushed per write so the console streams.
struct Console(std::io::Stdout);

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut out = self.0.lock();
        out.write_all(buf)?;
        out.flush()?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.lock().flush()
    }
}

/// The vmlinux to boot: the path itself, or `vmlinux` inside a directory.
pub(crate) fn resolve_kernel(path: &Path) -> anyhow::Result<PathBuf> {
    if path.is_dir() {
        let vmlinux = path.join("vmlinux");
        if !vmlinux.is_file() {
            bail!(
                "{} is a directory without a `vmlinux`; pass a kernel build directory (as printed by `rrr kernel build`) or the vmlinux file itself",
                path.display()
            );
        }
        return Ok(vmlinux);
    }
    if !path.exists() {
        bail!(
            "kernel {} does not exist; build one with `rrr kernel build`, which prints its directory",
            path.display()
        );
    }
    Ok(path.to_owned())
}

fn seconds(what: &str, s: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(s)
        .ok()
        .filter(|d| !d.is_zero())
        .with_context(|| format!("{what} must be a positive number of seconds, not {s}"))
}

/// Forwards stdin to the guest's serial port from a reader thread. The channel is the only
/// thing that crosses threads; the run loop takes what arrived at synchronous exits.
pub(crate) fn spawn_stdin_reader() -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("rrr-stdin".into())
        .spawn(move || {
            let mut stdin = std::io::stdin();
            let mut buf = [0u8; 4096];
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if tx.send(buf[..n].to_vec()).is_err() {
                            return;
                        }
                    }
                }
            }
        });
    if let Err(err) = spawned {
        tracing::warn!("cannot start the stdin reader, console input is off: {err}");
    }
    rx
}

pub fn run(args: Args) -> anyhow::Result<i32> {
    let kernel = resolve_kernel(&args.kernel)?;
    if let Some(initrd) = &args.initrd {
        if !initrd.is_file() {
            bail!(
                "initrd {} does not exist or is not a file",
                initrd.display()
            );
        }
    }
    // The loader's own check, before the carrier starts.
    rrr_vmm::arch::x86_64::kernel::check_kernel(&kernel)?;
    let kind = KvmKind::detect();
    if let KvmKind::Unusable(why) = &kind {
        if !crate::carrier::inside_carrier() {
            bail!("{why}. rrr needs /dev/kvm: load kvm_intel or kvm_amd (modprobe), enable virtualization in the firmware, and make /dev/kvm readable and writable for this user (`rrr doctor` checks it)");
        }
    }
    if !kind.is_hardware() && !args.direct && !crate::carrier::inside_carrier() {
        tracing::info!("host KVM: {kind}; --direct would boot on it anyway");
        return crate::carrier::reexec_in_carrier(crate::carrier::Handover::default());
    }

    let mut config = VmConfig::new(kernel);
    config.initrd = args.initrd.clone();
    config.mem_mib = args.mem;
    config.cmdline = args.cmdline.clone();
    config.append = args.append.iter().cloned().collect();
    if let Some(s) = args.timeout {
        config
            .timeouts
            .push(Timeout::Host(seconds("--timeout", s)?));
    }
    if let Some(s) = args.virtual_timeout {
        let d = seconds("--virtual-timeout", s)?;
        config
            .timeouts
            .push(Timeout::Virtual(rrr_vmm::clock::VirtualTime::from_nanos(
                d.as_nanos().min(u64::MAX as u128) as u64,
            )));
    }

    let mut vmm = builder::build_vm(config, Box::new(Console(std::io::stdout())), Vec::new())
        .context("cannot build the VM")?;
    let input = spawn_stdin_reader();
    let result = run_loop::run(&mut vmm, Some(input));
    let _ = std::io::stdout().flush();
    if args.describe {
        eprintln!("{}", serde_json::to_string_pretty(&vmm.description)?);
    }
    match result {
        Ok(outcome) => {
            let s = outcome.stats;
            eprintln!(
                "rrr: guest {} after {} exits, virtual time {:.6} s ({} PIO of which {} progress, {} MMIO, {} HLT, {} interrupts injected, {} kicks, {} stall landmarks: {} spin-wait, {} changing state), host time {:.3} s",
                outcome.end,
                s.exits,
                s.virtual_time.as_nanos() as f64 / 1e9,
                s.pio_exits,
                s.progress_exits,
                s.mmio_exits,
                s.halts,
                s.injections,
                s.kicks,
                s.landmarks,
                s.landmark_kinds.spin_wait,
                s.landmark_kinds.changing_state,
                outcome.host_elapsed.as_secs_f64()
            );
            for (at, event) in &outcome.control_events {
                tracing::info!(at = at.as_nanos(), ?event, "control port");
            }
            Ok(match outcome.end {
                RunEnd::PowerOff | RunEnd::Reboot => 0,
                RunEnd::HostTimeout | RunEnd::VirtualTimeout => {
                    if let Some(cpu) = &outcome.stopped_at {
                        eprintln!("rrr: the vCPU was stopped at:\n{cpu}");
                    }
                    eprintln!(
                        "rrr: error: the guest did not power off before the time limit; raise --timeout or look at the console above"
                    );
                    2
                }
            })
        }
        Err(RunError::Fault(fault)) => {
            eprintln!("rrr: {fault}");
            Ok(3)
        }
        Err(other) => Err(other).context("the VM stopped with an error"),
    }
}
