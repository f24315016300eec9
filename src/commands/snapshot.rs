//! `rrr snapshot`: the machine booted to the agent's READY and saved, once per kernel (and
//! rootfs, memory size, command line and CPU model). Prints the snapshot's path. `rrr run`
//! restores the same snapshot, making it on first use if needed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rrr_vmm::config::Timeout;
use rrr_vmm::devices::virtio::disk::MediumSlot;
use rrr_vmm::host::KvmKind;
use rrr_vmm::persist::{self, MemoryCheck};

use crate::machine::{MachineSpec, StartKind, StartMode, Started};

/// Host time a boot to READY may take.
const BOOT_LIMIT_SECS: u64 = 240;

#[derive(clap::Args)]
pub struct Args {
    /// A kernel build directory (as printed by `rrr kernel build`) or a vmlinux; default: rrr's
    /// default kernel.
    #[arg(long, env = KERNEL_ENV, hide_env = true)]
    pub kernel: Option<PathBuf>,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = super::run::DEFAULT_MEM_MIB)]
    pub mem: u64,
    /// Extra kernel parameters, after rrr's own (they are part of the snapshot's key).
    #[arg(long, value_name = "ARGS")]
    pub append: Option<String>,
    /// The boot entropy seed (part of the snapshot: the kernel takes it at boot).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Basic blocks per progress exit the kernel was built with.
    #[arg(long, hide = true, default_value_t = rrr_guest::protocol::PROGRESS_INTERVAL)]
    pub progress_interval: u64,
    /// Run on this host's /dev/kvm even if it is software-only (no carrier).
    #[arg(long)]
    pub direct: bool,
    /// The base rootfs image, already built (`rrr rootfs build` makes one).
    #[arg(long, hide = true, env = ROOTFS_ENV)]
    pub rootfs: Option<PathBuf>,
}

/// What `rrr snapshot` hands its copy inside the carrier, besides its command line: the kernel
/// and image it found or built on the host.
const KERNEL_ENV: &str = "RRR_SNAPSHOT_KERNEL";
const ROOTFS_ENV: &str = "RRR_SNAPSHOT_ROOTFS";

pub fn run(args: Args) -> Result<i32> {
    run_as(args, None)
}

/// `rrr snapshot` with these words after it, for a command that takes the snapshot on the
/// user's behalf (`rrr from-syzbot`): inside the carrier, these words run, not the caller's.
pub fn run_words(words: &[std::ffi::OsString]) -> Result<i32> {
    #[derive(clap::Parser)]
    #[command(name = "rrr snapshot")]
    struct Line {
        #[command(flatten)]
        args: Args,
    }
    let argv =
        std::iter::once(std::ffi::OsString::from("rrr snapshot")).chain(words.iter().cloned());
    let line = <Line as clap::Parser>::try_parse_from(argv)?;
    let mut command_line = vec![std::ffi::OsString::from("snapshot")];
    command_line.extend(words.iter().cloned());
    run_as(line.args, Some(command_line))
}

fn run_as(args: Args, command_line: Option<Vec<std::ffi::OsString>>) -> Result<i32> {
    let kernel = match &args.kernel {
        Some(path) => super::boot::resolve_kernel(path)?,
        None => super::kernel::ensure_default_kernel()?.vmlinux(),
    };
    rrr_vmm::arch::x86_64::kernel::check_kernel(&kernel)?;
    let rootfs = match &args.rootfs {
        Some(image) => image.clone(),
        None => super::rootfs::ensure_base_rootfs()?,
    };
    let kind = KvmKind::detect();
    if !kind.is_hardware() && !args.direct && !crate::carrier::inside_carrier() {
        tracing::info!("host KVM: {kind}; --direct would take the snapshot on it anyway");
        return snapshot_inside_carrier(&kernel, &rootfs, command_line);
    }
    let spec = MachineSpec {
        kernel,
        rootfs,
        mem_mib: args.mem,
        append: args.append.clone(),
        seed: args.seed,
        progress_interval: args.progress_interval,
    };
    let path = ensure_snapshot(&spec)?;
    println!("{}", path.display());
    Ok(0)
}

/// The cached snapshot of `spec`, checked whole, or a new one.
fn ensure_snapshot(spec: &MachineSpec) -> Result<PathBuf> {
    let expected = spec.expected_identity()?;
    let path = spec.snapshot_path(&expected)?;
    if path.is_file() {
        match persist::load(&path, &expected, MemoryCheck::Full) {
            Ok(_) => {
                crate::machine::mark_verified(&path);
                eprintln!("rrr: snapshot from the cache, checked");
                return Ok(path);
            }
            Err(err) => {
                eprintln!(
                    "rrr: the cached snapshot cannot be used ({err}); booting to take a new one"
                )
            }
        }
    }
    let scratch = tempfile::Builder::new()
        .prefix("snapshot-console-")
        .tempdir_in(crate::cache::cache_dir()?)
        .context("cannot create a scratch directory in the cache")?;
    let console_log = scratch.path().join("console.log");
    let console = std::fs::File::create(&console_log)
        .with_context(|| format!("cannot create {}", console_log.display()))?;
    let mut config = spec.vm_config();
    config
        .timeouts
        .push(Timeout::Host(Duration::from_secs(BOOT_LIMIT_SECS)));
    let disks = spec.disks(&MediumSlot::new())?;
    let spinner = crate::progress::spinner("booting to READY and saving the snapshot");
    let at_ready = crate::machine::start(
        spec,
        config,
        Box::new(console),
        disks,
        StartMode::Snapshot,
        &console_log,
    );
    spinner.finish_and_clear();
    let keep_console = |scratch: tempfile::TempDir| {
        // The boot log is the one thing that says why a boot failed: keep it.
        let kept = scratch.path().join("console.log");
        let _ = scratch.keep();
        kept
    };
    let at_ready = match at_ready {
        Ok(Started::AtReady(at_ready)) => *at_ready,
        Ok(Started::EndedBeforeReady { result, .. }) => {
            let how = match result {
                Ok(outcome) => {
                    format!("the VM {} after {} exits", outcome.end, outcome.stats.exits)
                }
                Err(err) => err.to_string(),
            };
            bail!(
                "the guest never reported READY ({how}); the boot console is in {}",
                keep_console(scratch).display()
            );
        }
        Err(err) => {
            let kept = keep_console(scratch);
            return Err(err.context(format!("the boot console is in {}", kept.display())));
        }
    };
    eprintln!("rrr: {}", at_ready.report);
    if let (StartKind::BootedAndSaved, Some(bytes), Some(disk)) = (
        at_ready.report.kind,
        at_ready.report.snapshot_file_bytes,
        at_ready.report.snapshot_disk_bytes,
    ) {
        eprintln!(
            "rrr: snapshot file {} MiB apparent, {} MiB on disk (zero pages are holes)",
            bytes >> 20,
            disk >> 20
        );
    }
    Ok(at_ready.report.snapshot.unwrap_or(path))
}

/// Reruns this command in the carrier, handing over the kernel and image found on the host.
fn snapshot_inside_carrier(
    kernel: &Path,
    rootfs: &Path,
    command_line: Option<Vec<std::ffi::OsString>>,
) -> Result<i32> {
    // Digests are memoized in the cache; computing them here, natively, spares the carrier
    // from hashing the kernel under emulation.
    crate::digest::file_sha256(kernel)?;
    crate::digest::file_sha256(rootfs)?;
    let absolute = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_owned());
    crate::carrier::reexec_in_carrier(crate::carrier::Handover {
        env: vec![
            (KERNEL_ENV.into(), absolute(kernel).into()),
            (ROOTFS_ENV.into(), absolute(rootfs).into()),
        ],
        command_line,
        ..Default::default()
    })
}
