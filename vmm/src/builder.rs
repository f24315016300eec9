//! Building a VM is a recipe of small steps: open KVM, create the VM and its memory, load the
//! kernel, fix the CPU model, attach devices, write the boot structures, set the registers.
//! Each step is a free function so a snapshot restore can reuse the ones it needs. The result
//! is a paused [`Vmm`]; nothing runs until [`crate::run_loop::run`].

use std::io::Write;
use std::sync::{Arc, Mutex};

use kvm_bindings::CpuId;
use vm_memory::GuestMemoryMmap;

use crate::arch::x86_64::boot_params::{self, BootParamsError, InitrdPlacement};
use crate::arch::x86_64::cpuid::{self, CpuidEntry};
use crate::arch::x86_64::kernel::{self, KernelError, LoadedKernel};
use crate::arch::x86_64::layout::{MMIO_DEVICE_SIZE, VIRTIO_MMIO_START};
use crate::bus::{lock, Bus, BusError, BusKind, SharedDevice};
use crate::config::VmConfig;
use crate::description::VmDescription;
use crate::devices::control::{ControlPort, ControlState};
use crate::devices::legacy::serial::SerialState;
use crate::devices::legacy::{
    BoardDevice, Cmos, DebugPort, PicPair, Pit, Serial, BOARD_PORTS, I8042,
};
use crate::devices::progress::{ProgressCounts, ProgressPort};
use crate::devices::random::RandomPort;
use crate::devices::tsc::TscPort;
use crate::devices::virtio::mmio::{MmioTransport, MmioTransportState};
use crate::host::KvmKind;
use crate::irq::IsaIrq;
use crate::vstate::kvm::{KvmError, KvmHandle};
use crate::vstate::memory::{self, MemoryError, MemoryOrigin};
use crate::vstate::vcpu::{Vcpu, VcpuError};
use crate::vstate::vm::{Vm, VmError};

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Kvm(#[from] KvmError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error(transparent)]
    BootParams(#[from] BootParamsError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("placing a device on the {bus:?} bus failed: {source}")]
    Bus { bus: BusKind, source: BusError },
    #[error("building the CPU model failed: {0:?}")]
    Cpuid(vmm_sys_util::fam::Error),
    #[error("no interrupt line left for another virtio-mmio device (all of {0:?} are taken)")]
    NoVirtioIrq(Vec<u8>),
}

/// ISA lines free for virtio-mmio devices on our board, starting at `irq::isa::VIRTIO_FIRST`.
const VIRTIO_IRQS: [u8; 6] = [5, 6, 7, 9, 10, 11];

/// The board's registry of legacy devices, kept typed for the run loop (which asks the PIC what
/// to inject and the PIT when it fires) and for snapshots, next to their places on the PIO bus.
pub struct LegacyDevices {
    pub pic: Arc<Mutex<PicPair>>,
    pub pit: Arc<Mutex<Pit>>,
    pub serial: Arc<Mutex<Serial>>,
    pub cmos: Arc<Mutex<Cmos>>,
    pub i8042: Arc<Mutex<I8042>>,
    pub control: Arc<Mutex<ControlPort>>,
    pub progress: Arc<Mutex<ProgressPort>>,
    pub random: Arc<Mutex<RandomPort>>,
}

/// The legacy devices' snapshot state. The PIC, PIT, CMOS and i8042 hold no host handle, so
/// they are their own state; the UART leaves its host writer out, the control port its
/// per-run time limit.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LegacyState {
    pub pic: PicPair,
    pub pit: Pit,
    pub serial: SerialState,
    pub cmos: Cmos,
    pub i8042: I8042,
    pub control: ControlState,
    pub progress: ProgressCounts,
    pub random: RandomPort,
}

impl LegacyDevices {
    pub fn save(&self) -> LegacyState {
        LegacyState {
            pic: lock(&self.pic).clone(),
            pit: lock(&self.pit).clone(),
            serial: lock(&self.serial).save(),
            cmos: lock(&self.cmos).clone(),
            i8042: lock(&self.i8042).clone(),
            control: lock(&self.control).save(),
            progress: lock(&self.progress).counts(),
            random: lock(&self.random).clone(),
        }
    }

    pub fn restore(&self, state: &LegacyState) {
        *lock(&self.pic) = state.pic.clone();
        *lock(&self.pit) = state.pit.clone();
        lock(&self.serial).restore_state(&state.serial);
        *lock(&self.cmos) = state.cmos.clone();
        *lock(&self.i8042) = state.i8042.clone();
        lock(&self.control).restore_state(&state.control);
        lock(&self.progress).restore_counts(state.progress);
        *lock(&self.random) = state.random.clone();
    }
}

/// Where a virtio-mmio device sits: its register window and its interrupt line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioSlot {
    pub base: u64,
    pub len: u64,
    pub irq: IsaIrq,
}

impl MmioSlot {
    /// The `virtio_mmio.device=` parameter that tells Linux about this device.
    pub fn cmdline_entry(&self) -> String {
        format!(
            "virtio_mmio.device={}K@{:#x}:{}",
            self.len >> 10,
            self.base,
            self.irq.line()
        )
    }
}

/// Makes a virtio-mmio device once its slot is known; it may keep a handle to guest memory.
pub type MmioDeviceFactory = Box<dyn FnOnce(MmioSlot, &GuestMemoryMmap) -> MmioTransport>;

/// The MMIO bus, the slots handed out on it so far and, typed, the transport in each.
pub struct MmioDevices {
    pub bus: Bus,
    pub slots: Vec<MmioSlot>,
    pub transports: Vec<Arc<Mutex<MmioTransport>>>,
}

impl MmioDevices {
    pub fn new() -> Self {
        MmioDevices {
            bus: Bus::new(BusKind::Mmio),
            slots: Vec::new(),
            transports: Vec::new(),
        }
    }

    pub fn save(&self) -> Vec<MmioTransportState> {
        self.transports.iter().map(|t| lock(t).save()).collect()
    }

    /// Puts saved states back into transports built by the same factories, in slot order.
    pub fn restore(&self, states: &[MmioTransportState]) -> Result<(), RestoreError> {
        if states.len() != self.transports.len() {
            return Err(RestoreError::DeviceCount {
                saved: states.len(),
                built: self.transports.len(),
            });
        }
        for (slot, (transport, state)) in self.transports.iter().zip(states).enumerate() {
            lock(transport)
                .restore(state)
                .map_err(|source| RestoreError::Virtio { slot, source })?;
        }
        Ok(())
    }

    /// Places the next device in the next window, on the next free line.
    pub fn attach(
        &mut self,
        mem: &GuestMemoryMmap,
        factory: MmioDeviceFactory,
    ) -> Result<MmioSlot, BuildError> {
        let index = self.slots.len();
        let line = *VIRTIO_IRQS
            .get(index)
            .ok_or_else(|| BuildError::NoVirtioIrq(VIRTIO_IRQS.to_vec()))?;
        let slot = MmioSlot {
            base: VIRTIO_MMIO_START + index as u64 * MMIO_DEVICE_SIZE,
            len: MMIO_DEVICE_SIZE,
            irq: IsaIrq::new(line).expect("virtio lines are ISA lines"),
        };
        let transport = Arc::new(Mutex::new(factory(slot, mem)));
        self.transports.push(transport.clone());
        self.bus
            .insert(slot.base, slot.len, transport)
            .map_err(|source| BuildError::Bus {
                bus: BusKind::Mmio,
                source,
            })?;
        self.slots.push(slot);
        Ok(slot)
    }

    pub fn cmdline_entries(&self) -> Vec<String> {
        self.slots.iter().map(MmioSlot::cmdline_entry).collect()
    }
}

impl Default for MmioDevices {
    fn default() -> Self {
        Self::new()
    }
}

/// A built, paused VM. Field order is drop order: the vCPU goes before the VM, the VM before
/// the memory it maps.
pub struct Vmm {
    pub vcpu: Vcpu,
    pub vm: Vm,
    pub kvm: KvmHandle,
    pub mem: GuestMemoryMmap,
    /// Where `mem` came from (how its final state is hashed).
    pub mem_origin: MemoryOrigin,
    pub pio: Bus,
    pub mmio: MmioDevices,
    pub devices: LegacyDevices,
    pub description: VmDescription,
    pub config: VmConfig,
}

/// The CPU model for this KVM: the supported CPUID with our filter applied.
pub fn cpu_model(kvm: &KvmHandle) -> Result<CpuId, BuildError> {
    let supported = kvm.supported_cpuid()?;
    cpuid::filter(&supported).map_err(BuildError::Cpuid)
}

/// Puts the PC platform devices on the port-I/O bus, each at the ranges
/// [`BOARD_PORTS`] gives it.
pub fn attach_legacy_devices(
    pio: &mut Bus,
    console: Box<dyn Write + Send>,
    config: &VmConfig,
) -> Result<LegacyDevices, BuildError> {
    let devices = LegacyDevices {
        pic: Arc::new(Mutex::new(PicPair::new())),
        pit: Arc::new(Mutex::new(Pit::new())),
        serial: Arc::new(Mutex::new(Serial::new(console))),
        cmos: Arc::new(Mutex::new(Cmos::new(config.epoch_unix_secs))),
        i8042: Arc::new(Mutex::new(I8042::new())),
        control: Arc::new(Mutex::new(ControlPort::new(
            config.stimulus_time_limit_secs,
        ))),
        progress: Arc::new(Mutex::new(ProgressPort::new(
            config.progress_interval,
            config.block_ns,
        ))),
        random: Arc::new(Mutex::new(RandomPort::new(&config.rng_seed))),
    };
    // Stateless: the virtual TSC is a function of virtual time.
    let tsc: SharedDevice = Arc::new(Mutex::new(TscPort));
    let debug_port: SharedDevice = Arc::new(Mutex::new(DebugPort::new()));
    for range in BOARD_PORTS {
        let device: SharedDevice = match range.owner {
            BoardDevice::Pic => devices.pic.clone(),
            BoardDevice::Pit => devices.pit.clone(),
            BoardDevice::I8042 => devices.i8042.clone(),
            BoardDevice::Cmos => devices.cmos.clone(),
            BoardDevice::DebugPort => debug_port.clone(),
            BoardDevice::Serial => devices.serial.clone(),
            BoardDevice::Control => devices.control.clone(),
            BoardDevice::Progress => devices.progress.clone(),
            BoardDevice::Tsc => tsc.clone(),
            BoardDevice::Random => devices.random.clone(),
        };
        pio.insert(range.base, range.len, device)
            .map_err(|source| BuildError::Bus {
                bus: BusKind::Pio,
                source,
            })?;
    }
    Ok(devices)
}

/// The command line: the configured (or host-appropriate default) one, the virtio-mmio devices,
/// then the user's additions.
pub fn compose_cmdline(config: &VmConfig, kind: &KvmKind, mmio: &MmioDevices) -> String {
    let base = config.cmdline.clone().unwrap_or_else(|| match kind {
        KvmKind::Software { .. } => cpuid::software_kvm_cmdline(),
        _ => cpuid::default_cmdline(),
    });
    let mut parts = vec![base];
    parts.extend(mmio.cmdline_entries());
    parts.extend(config.append.iter().cloned());
    parts.retain(|p| !p.trim().is_empty());
    parts.join(" ")
}

/// Writes the command line, the initrd and the zero page.
pub fn configure_boot(
    mem: &GuestMemoryMmap,
    config: &VmConfig,
    kernel: &LoadedKernel,
    cmdline: &str,
) -> Result<Option<InitrdPlacement>, BuildError> {
    let ram_end = config.mem_bytes();
    boot_params::write_cmdline(mem, cmdline)?;
    let initrd = config
        .initrd
        .as_deref()
        .map(|path| boot_params::load_initrd(mem, path, kernel.end, ram_end))
        .transpose()?;
    boot_params::write_boot_params(mem, cmdline.len(), initrd, ram_end)?;
    boot_params::write_rng_seed(mem, &config.rng_seed)?;
    Ok(initrd)
}

/// Builds the whole VM, paused at the kernel entry. `console` receives the serial output.
pub fn build_vm(
    config: VmConfig,
    console: Box<dyn Write + Send>,
    mmio_devices: Vec<MmioDeviceFactory>,
) -> Result<Vmm, BuildError> {
    let kvm = KvmHandle::open()?;
    let kind = KvmKind::detect();
    let vm = Vm::create(&kvm)?;
    let mem = memory::create_guest_memory(config.mem_bytes())?;
    vm.register_memory(&mem, config.dirty_log)?;
    let kernel = kernel::load_kernel(&mem, &config.kernel, config.mem_bytes())?;

    let mut pio = Bus::new(BusKind::Pio);
    let devices = attach_legacy_devices(&mut pio, console, &config)?;
    let mut mmio = MmioDevices::new();
    for factory in mmio_devices {
        mmio.attach(&mem, factory)?;
    }

    let cmdline = compose_cmdline(&config, &kind, &mmio);
    let initrd = configure_boot(&mem, &config, &kernel, &cmdline)?;

    let cpuid = cpu_model(&kvm)?;
    let vcpu = Vcpu::create(&vm)?;
    vcpu.set_cpuid(&cpuid)?;
    vcpu.configure_boot(&mem, kernel.entry)?;

    let description = VmDescription {
        cpuid: cpuid.as_slice().iter().map(CpuidEntry::from).collect(),
        cmdline,
        mem_bytes: config.mem_bytes(),
        quantum_ns: config.quantum_ns,
        epoch_unix_secs: config.epoch_unix_secs,
        kvm: kind.to_string(),
        kernel_entry: kernel.entry,
        initrd_size: initrd.map(|i| i.size),
    };
    tracing::info!(
        entry = format_args!("{:#x}", kernel.entry),
        kernel_end = format_args!("{:#x}", kernel.end),
        initrd = ?initrd,
        mem_mib = config.mem_mib,
        cmdline = %description.cmdline,
        "VM built"
    );
    Ok(Vmm {
        vcpu,
        vm,
        kvm,
        mem,
        mem_origin: MemoryOrigin::Anonymous,
        pio,
        mmio,
        devices,
        description,
        config,
    })
}

/// Why a saved machine cannot be put back into the VM being built.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error("the snapshot was taken on another CPU model ({0}); take a new snapshot on this machine (`rrr snapshot`)")]
    CpuModel(String),
    #[error(
        "the snapshot does not match this VM: {0}; take a new snapshot for it (`rrr snapshot`)"
    )]
    Board(String),
    #[error("the snapshot holds {saved} virtio devices, this VM has {built}")]
    DeviceCount { saved: usize, built: usize },
    #[error("virtio device {slot}: {source}")]
    Virtio {
        slot: usize,
        source: crate::devices::virtio::VirtioStateError,
    },
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    VcpuState(#[from] crate::vstate::vcpu_state::VcpuStateError),
}

/// Builds a VM with the same steps as [`build_vm`], minus loading a kernel and writing boot
/// structures, on guest memory mapped from a snapshot, then puts every device and the vCPU
/// back as saved. `saved` is what [`build_vm`] described when the snapshot's VM was built: the
/// CPU model and the board must come out the same, or nothing is restored.
pub fn restore_vm(
    config: VmConfig,
    console: Box<dyn Write + Send>,
    mmio_devices: Vec<MmioDeviceFactory>,
    mem: GuestMemoryMmap,
    mem_origin: MemoryOrigin,
    saved: &VmDescription,
    machine: &crate::persist::MachineState,
) -> Result<Vmm, RestoreError> {
    let kvm = KvmHandle::open().map_err(BuildError::from)?;
    let kind = KvmKind::detect();
    let cpuid = cpu_model(&kvm)?;
    let entries: Vec<CpuidEntry> = cpuid.as_slice().iter().map(CpuidEntry::from).collect();
    let this = VmDescription {
        cpuid: entries,
        cmdline: String::new(),
        mem_bytes: config.mem_bytes(),
        quantum_ns: config.quantum_ns,
        epoch_unix_secs: config.epoch_unix_secs,
        kvm: kind.to_string(),
        kernel_entry: saved.kernel_entry,
        initrd_size: saved.initrd_size,
    };
    if this.cpuid != saved.cpuid {
        let why = saved.difference(&this).unwrap_or_default();
        return Err(RestoreError::CpuModel(why));
    }
    let vm = Vm::create(&kvm).map_err(BuildError::from)?;
    vm.register_memory(&mem, config.dirty_log)
        .map_err(BuildError::from)?;

    let mut pio = Bus::new(BusKind::Pio);
    let devices = attach_legacy_devices(&mut pio, console, &config)?;
    let mut mmio = MmioDevices::new();
    for factory in mmio_devices {
        mmio.attach(&mem, factory)?;
    }
    let this = VmDescription {
        cmdline: compose_cmdline(&config, &kind, &mmio),
        ..this
    };
    if let Some(why) = saved.difference(&this) {
        return Err(RestoreError::Board(why));
    }
    mmio.restore(&machine.virtio)?;
    devices.restore(&machine.devices);

    let mut vcpu = Vcpu::create(&vm)?;
    vcpu.set_cpuid(&cpuid)?;
    vcpu.restore_state(&machine.vcpu)?;
    tracing::info!(
        mem_mib = config.mem_mib,
        exits = machine.run.stats.exits,
        "VM restored"
    );
    Ok(Vmm {
        vcpu,
        vm,
        kvm,
        mem,
        mem_origin,
        pio,
        mmio,
        devices,
        description: saved.clone(),
        config,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mmio_slots_get_windows_lines_and_cmdline_entries() {
        let mem = memory::create_guest_memory(64 << 20).unwrap();
        let mut mmio = MmioDevices::new();
        for _ in 0..VIRTIO_IRQS.len() {
            mmio.attach(&mem, dummy()).unwrap();
        }
        assert_eq!(mmio.slots[1].base, VIRTIO_MMIO_START + 0x1000);
        assert_eq!(mmio.slots[3].irq.line(), 9);
        assert_eq!(
            mmio.cmdline_entries()[0],
            "virtio_mmio.device=4K@0xd0000000:5"
        );
        let err = mmio.attach(&mem, dummy()).unwrap_err();
        assert!(matches!(err, BuildError::NoVirtioIrq(_)));
    }

    #[test]
    fn cmdline_puts_user_additions_last() {
        let mut config = VmConfig::new("/vmlinux");
        config.append = vec!["init=/init".into(), "quiet".into()];
        let hw = KvmKind::Hardware { extension: "AMD-V" };
        let line = compose_cmdline(&config, &hw, &MmioDevices::new());
        assert!(line.starts_with("console=ttyS0"), "{line}");
        assert!(line.ends_with("init=/init quiet"), "{line}");
        assert!(!line.contains("popcnt"), "{line}");
        let sw = KvmKind::Software { module: None };
        assert!(compose_cmdline(&config, &sw, &MmioDevices::new()).contains("popcnt"));
    }

    /// A transport over a blank read-only disk: enough to occupy a slot.
    fn dummy() -> MmioDeviceFactory {
        struct Blank;
        impl crate::devices::virtio::disk::DiskBackend for Blank {
            fn capacity_bytes(&self) -> u64 {
                4096
            }
            fn read_at(
                &mut self,
                _: u64,
                buf: &mut [u8],
            ) -> Result<(), crate::devices::virtio::disk::DiskError> {
                buf.fill(0);
                Ok(())
            }
            fn write_at(
                &mut self,
                _: u64,
                _: &[u8],
            ) -> Result<(), crate::devices::virtio::disk::DiskError> {
                Err(crate::devices::virtio::disk::DiskError::ReadOnly)
            }
            fn flush(&mut self) -> Result<(), crate::devices::virtio::disk::DiskError> {
                Ok(())
            }
        }
        Box::new(|slot, mem| {
            MmioTransport::new(
                Box::new(crate::devices::virtio::Block::new(Box::new(Blank))),
                mem.clone(),
                slot.irq,
            )
        })
    }
}
