//! The machine every stimulus runs on: a kernel, the base rootfs (agent and busybox) on the
//! first virtio disk, the stimulus disk second, and the guest stopped at the agent's READY,
//! either booted there or restored from the snapshot of exactly that machine.
//!
//! One snapshot per machine, not per stimulus: the stimulus is handed in after READY on the
//! stimulus disk, which reads as zeros until then, so the same snapshot serves every stimulus.
//! The snapshot's cache key is the machine (kernel and rootfs contents, memory, command line)
//! and the CPU model of the KVM it runs on.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rrr_vmm::builder::{self, MmioDeviceFactory, Vmm};
use rrr_vmm::config::VmConfig;
use rrr_vmm::devices::virtio::block::Block;
use rrr_vmm::devices::virtio::disk::{open_qcow2_overlay, Medium, MediumSlot};
use rrr_vmm::devices::virtio::mmio::MmioTransport;
use rrr_vmm::persist::{self, ExpectedIdentity, MemoryCheck, SnapshotError, SnapshotIdentity};
use rrr_vmm::run_loop::{self, RunError, RunOutcome, RunState, Stopped, Until};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The kernel parameters every rrr machine boots with, before the user's.
const MACHINE_PARAMS: [&str; 4] = ["root=/dev/vda", "rw", "rootfstype=ext4", "init=/init"];

/// What the machine is made of.
#[derive(Debug, Clone)]
pub struct MachineSpec {
    /// The kernel's `vmlinux`.
    pub kernel: PathBuf,
    /// The base rootfs image (qcow2), never written.
    pub rootfs: PathBuf,
    pub mem_mib: u64,
    /// Extra kernel parameters from the user, after rrr's own.
    pub append: Option<String>,
    /// The boot entropy seed (`setup_data` `SETUP_RNG_SEED`): part of the snapshot, since the
    /// kernel took it at boot.
    pub seed: u64,
    /// Basic blocks per progress exit the guest was built for.
    pub progress_interval: u64,
}

impl MachineSpec {
    /// The VM config for this machine; the caller adds the per-run parts (time limits).
    pub fn vm_config(&self) -> VmConfig {
        let mut config = VmConfig::new(&self.kernel);
        config.mem_mib = self.mem_mib;
        config.append = MACHINE_PARAMS.map(String::from).to_vec();
        config.append.extend(self.append.iter().cloned());
        config.rng_seed = rrr_vmm::config::rng_seed(self.seed);
        config.progress_interval = self.progress_interval;
        config
    }

    /// The two disks, in the order the kernel names them: `vda` the rootfs, `vdb` the stimulus.
    pub fn disks(&self, stimulus: &MediumSlot) -> Result<Vec<MmioDeviceFactory>> {
        let rootfs = open_qcow2_overlay(&self.rootfs).with_context(|| {
            format!(
                "cannot open the root filesystem image {}",
                self.rootfs.display()
            )
        })?;
        let medium = Medium::new(rrr_guest::protocol::STIMULUS_DISK_BYTES, stimulus.clone());
        Ok(vec![
            Box::new(move |slot, mem| {
                MmioTransport::new(Box::new(Block::new(rootfs)), mem.clone(), slot.irq)
            }),
            Box::new(move |slot, mem| {
                MmioTransport::new(
                    Box::new(Block::new(Box::new(medium))),
                    mem.clone(),
                    slot.irq,
                )
            }),
        ])
    }

    /// What a snapshot of this machine must have been taken of.
    pub fn expected_identity(&self) -> Result<ExpectedIdentity> {
        Ok(ExpectedIdentity {
            rrr_version: env!("CARGO_PKG_VERSION").to_owned(),
            kernel_sha256: crate::digest::file_sha256(&self.kernel)?,
            rootfs_sha256: crate::digest::file_sha256(&self.rootfs)?,
            mem_bytes: self.mem_mib << 20,
        })
    }

    /// Where the cached snapshot of this machine on this KVM lives.
    pub fn snapshot_path(&self, expected: &ExpectedIdentity) -> Result<PathBuf> {
        let kvm = rrr_vmm::vstate::kvm::KvmHandle::open().context("cannot open KVM")?;
        let cpu = builder::cpu_model(&kvm).context("cannot read the CPU model")?;
        let mut hasher = Sha256::new();
        let mut field = |bytes: &[u8]| {
            hasher.update((bytes.len() as u64).to_le_bytes());
            hasher.update(bytes);
        };
        field(expected.rrr_version.as_bytes());
        field(&rrr_vmm::persist::file::FORMAT_VERSION.to_le_bytes());
        field(expected.kernel_sha256.as_bytes());
        field(expected.rootfs_sha256.as_bytes());
        field(&expected.mem_bytes.to_le_bytes());
        let config = self.vm_config();
        for param in &config.append {
            field(param.as_bytes());
        }
        field(&config.rng_seed);
        field(&config.progress_interval.to_le_bytes());
        field(&config.quantum_ns.to_le_bytes());
        for entry in cpu.as_slice() {
            field(format!("{entry:?}").as_bytes());
        }
        let key = hex::encode(hasher.finalize());
        Ok(crate::cache::cache_dir()?
            .join("snapshots")
            .join(format!("{}.rrrsnap", &key[..32])))
    }
}

/// How the guest got to READY.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StartKind {
    /// Booted (`--boot`): no snapshot used or made.
    Booted,
    /// Booted, and the snapshot taken at READY for the next runs.
    BootedAndSaved,
    /// Restored from the cached snapshot.
    Restored,
}

/// What the start cost, for the summary.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StartReport {
    pub kind: StartKind,
    pub snapshot: Option<PathBuf>,
    /// Boot to READY, or restore to running (memory mapped, devices and vCPU set).
    pub start_ms: f64,
    /// Writing the snapshot, when one was made.
    pub save_ms: Option<f64>,
    pub snapshot_file_bytes: Option<u64>,
    pub snapshot_disk_bytes: Option<u64>,
}

impl std::fmt::Display for StartReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let path = self
            .snapshot
            .as_deref()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        match self.kind {
            StartKind::Booted => write!(
                f,
                "booted to READY in {:.0} ms (no snapshot)",
                self.start_ms
            ),
            StartKind::BootedAndSaved => write!(
                f,
                "booted to READY in {:.0} ms and saved the snapshot {path} in {:.0} ms",
                self.start_ms,
                self.save_ms.unwrap_or_default()
            ),
            StartKind::Restored => {
                write!(f, "restored the snapshot {path} in {:.1} ms", self.start_ms)
            }
        }
    }
}

/// Whether a start may use (and make) the cached snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartMode {
    Boot,
    Snapshot,
}

/// Where [`start`] got the machine.
pub enum Started {
    AtReady(Box<AtReady>),
    /// The guest ended or faulted while booting, before READY (a kernel that cannot mount its
    /// root, a boot-time panic): the run is over, and says why.
    EndedBeforeReady {
        vmm: Box<Vmm>,
        result: Result<Box<RunOutcome>, RunError>,
    },
}

/// A VM stopped at READY, ready for the stimulus.
pub struct AtReady {
    pub vmm: Vmm,
    pub state: RunState,
    pub report: StartReport,
    /// The console output up to READY (replayed into the log when restored).
    pub boot_console: Vec<u8>,
}

/// Brings the machine to READY: restores the cached snapshot, or boots (and saves the snapshot
/// if the mode allows). `console_log` is the file the console writer appends to; its contents
/// at READY are the boot console saved with the snapshot.
pub fn start(
    spec: &MachineSpec,
    config: VmConfig,
    console: Box<dyn Write + Send>,
    disks: Vec<MmioDeviceFactory>,
    mode: StartMode,
    console_log: &Path,
) -> Result<Started> {
    let snapshot = match mode {
        StartMode::Boot => None,
        StartMode::Snapshot => {
            let expected = spec.expected_identity()?;
            Some((spec.snapshot_path(&expected)?, expected))
        }
    };
    if let Some((path, expected)) = &snapshot {
        if path.is_file() {
            let started = Instant::now();
            let check = memory_check(path);
            match persist::load(path, expected, check) {
                Ok(loaded) => {
                    if check == MemoryCheck::Full {
                        mark_verified(path);
                    }
                    let vmm = builder::restore_vm(
                        config,
                        console,
                        disks,
                        loaded.mem,
                        loaded.origin,
                        &loaded.identity.description,
                        &loaded.machine,
                    )
                    .with_context(|| format!("cannot restore the snapshot {}", path.display()))?;
                    return Ok(Started::AtReady(Box::new(AtReady {
                        vmm,
                        state: loaded.machine.run,
                        report: StartReport {
                            kind: StartKind::Restored,
                            snapshot: Some(path.clone()),
                            start_ms: ms(started.elapsed()),
                            save_ms: None,
                            snapshot_file_bytes: None,
                            snapshot_disk_bytes: None,
                        },
                        boot_console: loaded.boot_console,
                    })));
                }
                Err(err) => {
                    // A cached snapshot that no longer fits (a newer rrr, a damaged file) is
                    // replaced; nothing is lost, it is only a cache.
                    eprintln!("rrr: the cached snapshot cannot be used ({err}); booting to take a new one");
                    let _ = std::fs::remove_file(path);
                    let _ = std::fs::remove_file(verified_marker(path));
                }
            }
        }
    }

    let started = Instant::now();
    let mut vmm = builder::build_vm(config, console, disks).context("cannot build the VM")?;
    let state = RunState::new(vmm.config.quantum_ns);
    let state = match run_loop::run_until(&mut vmm, state, None, Until::Ready) {
        Ok(Stopped::Ready(state)) => state,
        Ok(Stopped::Ended(outcome)) => {
            return Ok(Started::EndedBeforeReady {
                vmm: Box::new(vmm),
                result: Ok(outcome),
            })
        }
        Err(err @ RunError::Fault(_)) => {
            return Ok(Started::EndedBeforeReady {
                vmm: Box::new(vmm),
                result: Err(err),
            })
        }
        Err(err) => {
            return Err(err).context(format!(
                "the VM stopped with an error during boot, before READY; see the console ({})",
                console_log.display()
            ))
        }
    };
    let boot_ms = ms(started.elapsed());
    let boot_console = std::fs::read(console_log)
        .with_context(|| format!("cannot read back {}", console_log.display()))?;
    let Some((path, expected)) = snapshot else {
        return Ok(booted(vmm, state, boot_ms, boot_console));
    };
    let identity = SnapshotIdentity {
        rrr_version: expected.rrr_version.clone(),
        kernel_sha256: expected.kernel_sha256.clone(),
        rootfs_sha256: expected.rootfs_sha256.clone(),
        description: vmm.description.clone(),
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let _ = std::fs::remove_file(verified_marker(&path));
    let saved = match persist::save(&mut vmm, &state, &identity, &boot_console, &path) {
        Ok(saved) => saved,
        Err(err) => {
            // A snapshot is only a cache: a full disk must not cost the run. The writer has
            // removed its partial file.
            eprintln!(
                "rrr: warning: {:#}; going on without a snapshot (the next run boots again)",
                snapshot_error(err, &path)
            );
            return Ok(booted(vmm, state, boot_ms, boot_console));
        }
    };
    // Its checksums were computed from the guest's own memory as it was written.
    mark_verified(&saved.path);
    Ok(Started::AtReady(Box::new(AtReady {
        vmm,
        state,
        report: StartReport {
            kind: StartKind::BootedAndSaved,
            snapshot: Some(saved.path.clone()),
            start_ms: boot_ms,
            save_ms: Some(ms(saved.took)),
            snapshot_file_bytes: Some(saved.file_bytes),
            snapshot_disk_bytes: Some(saved.disk_bytes),
        },
        boot_console,
    })))
}

/// A snapshot's memory is checked whole (read, checksummed) the first time a file is restored,
/// then mapped lazily (`MAP_PRIVATE`, milliseconds) as long as the file is unchanged since: a
/// marker beside it records the size and modification time of the file it checked (or that
/// rrr itself wrote). A damaged or replaced file thus never runs unchecked.
/// `RRR_SNAPSHOT_MEMORY=read|mapped` forces one way, for benchmarks.
fn memory_check(path: &Path) -> MemoryCheck {
    match std::env::var("RRR_SNAPSHOT_MEMORY").as_deref() {
        Ok("mapped") => return MemoryCheck::SizeOnly,
        Ok("read") => return MemoryCheck::Full,
        _ => {}
    }
    let marked = std::fs::read_to_string(verified_marker(path)).ok();
    if marked.is_some() && marked == file_stamp(path) {
        MemoryCheck::SizeOnly
    } else {
        MemoryCheck::Full
    }
}

fn verified_marker(path: &Path) -> PathBuf {
    path.with_extension("verified")
}

fn file_stamp(path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    Some(format!(
        "{} {} {}",
        meta.len(),
        meta.mtime(),
        meta.mtime_nsec()
    ))
}

pub fn mark_verified(path: &Path) {
    if let Some(stamp) = file_stamp(path) {
        // Best effort: without the marker the next restore checks the file again.
        let _ = std::fs::write(verified_marker(path), stamp);
    }
}

/// A VM booted to READY with no snapshot made.
fn booted(vmm: Vmm, state: RunState, boot_ms: f64, boot_console: Vec<u8>) -> Started {
    Started::AtReady(Box::new(AtReady {
        vmm,
        state,
        report: StartReport {
            kind: StartKind::Booted,
            snapshot: None,
            start_ms: boot_ms,
            save_ms: None,
            snapshot_file_bytes: None,
            snapshot_disk_bytes: None,
        },
        boot_console,
    }))
}

fn snapshot_error(err: SnapshotError, path: &Path) -> anyhow::Error {
    anyhow::Error::new(err).context(format!("cannot save the snapshot {}", path.display()))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Puts the compiled stimulus on the stimulus disk (after READY: see the module doc).
pub fn insert_stimulus(slot: &MediumSlot, binary: &Path) -> Result<()> {
    let program = std::fs::read(binary)
        .with_context(|| format!("cannot read the stimulus binary {}", binary.display()))?;
    insert_stimulus_bytes(slot, &program, binary)
}

/// [`insert_stimulus`] of a program already read (from `binary`, named in errors).
pub fn insert_stimulus_bytes(slot: &MediumSlot, program: &[u8], binary: &Path) -> Result<()> {
    let image = rrr_guest::protocol::stimulus_disk_image(program).with_context(|| {
        format!(
            "the stimulus binary {} is {} bytes; the stimulus disk holds at most {}",
            binary.display(),
            program.len(),
            rrr_guest::protocol::MAX_STIMULUS_BYTES
        )
    })?;
    slot.insert(image);
    Ok(())
}
