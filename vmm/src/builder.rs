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
use crate::bus::{Bus, BusError, BusKind, SharedDevice};
use crate::config::VmConfig;
use crate::description::VmDescription;
use crate::devices::control::ControlPort;
use crate::devices::legacy::cmos::{self, Cmos};
use crate::devices::legacy::debug_port::{self, DebugPort};
use crate::devices::legacy::i8042::{self, I8042};
use crate::devices::legacy::pic::{self, PicPair};
use crate::devices::legacy::pit::{self, Pit};
use crate::devices::legacy::serial::{self, Serial};
use crate::devices::progress::ProgressPort;
use crate::host::KvmKind;
use crate::irq::IsaIrq;
use crate::vstate::kvm::{KvmError, KvmHandle};
use crate::vstate::memory::{self, MemoryError};
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

/// The legacy devices, kept typed for the run loop (which asks the PIC what to inject and the
/// PIT when it fires) next to their places on the PIO bus.
pub struct LegacyDevices {
    pub pic: Arc<Mutex<PicPair>>,
    pub pit: Arc<Mutex<Pit>>,
    pub serial: Arc<Mutex<Serial>>,
    pub cmos: Arc<Mutex<Cmos>>,
    pub i8042: Arc<Mutex<I8042>>,
    pub control: Arc<Mutex<ControlPort>>,
    pub progress: Arc<Mutex<ProgressPort>>,
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
pub type MmioDeviceFactory = Box<dyn FnOnce(MmioSlot, &GuestMemoryMmap) -> SharedDevice>;

/// The MMIO bus and the slots handed out on it so far.
pub struct MmioDevices {
    pub bus: Bus,
    pub slots: Vec<MmioSlot>,
}

impl MmioDevices {
    pub fn new() -> Self {
        MmioDevices {
            bus: Bus::new(BusKind::Mmio),
            slots: Vec::new(),
        }
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
        let device = factory(slot, mem);
        self.bus
            .insert(slot.base, slot.len, device)
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

fn insert(bus: &mut Bus, base: u64, len: u64, device: SharedDevice) -> Result<(), BuildError> {
    bus.insert(base, len, device)
        .map_err(|source| BuildError::Bus {
            bus: BusKind::Pio,
            source,
        })
}

/// Puts the PC platform devices on the port-I/O bus.
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
    };
    let pic: SharedDevice = devices.pic.clone();
    insert(pio, pic::PIC_MASTER_BASE, pic::PIC_PORT_LEN, pic.clone())?;
    insert(pio, pic::PIC_SLAVE_BASE, pic::PIC_PORT_LEN, pic.clone())?;
    insert(pio, pic::ELCR_BASE, pic::ELCR_PORT_LEN, pic)?;
    let pit: SharedDevice = devices.pit.clone();
    insert(pio, pit::PIT_BASE, pit::PIT_PORT_LEN, pit.clone())?;
    insert(pio, pit::PORT_B, pit::PORT_B_LEN, pit)?;
    insert(
        pio,
        serial::COM1_BASE,
        serial::SERIAL_PORT_LEN,
        devices.serial.clone(),
    )?;
    insert(
        pio,
        cmos::CMOS_BASE,
        cmos::CMOS_PORT_LEN,
        devices.cmos.clone(),
    )?;
    insert(
        pio,
        debug_port::DEBUG_PORT,
        debug_port::DEBUG_PORT_LEN,
        Arc::new(Mutex::new(DebugPort::new())),
    )?;
    let i8042: SharedDevice = devices.i8042.clone();
    insert(pio, i8042::I8042_DATA, i8042::I8042_PORT_LEN, i8042.clone())?;
    insert(pio, i8042::I8042_COMMAND, i8042::I8042_PORT_LEN, i8042)?;
    insert(
        pio,
        u64::from(rrr_guest::protocol::CONTROL_PORT),
        u64::from(rrr_guest::protocol::CONTROL_PORT_LEN),
        devices.control.clone(),
    )?;
    insert(
        pio,
        u64::from(rrr_guest::protocol::PROGRESS_PORT),
        u64::from(rrr_guest::protocol::PROGRESS_PORT_LEN),
        devices.progress.clone(),
    )?;
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
    vm.register_memory(&mem)?;
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
        pio,
        mmio,
        devices,
        description,
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
            mmio.attach(&mem, Box::new(|_, _| Arc::new(Mutex::new(Dummy))))
                .unwrap();
        }
        assert_eq!(mmio.slots[1].base, VIRTIO_MMIO_START + 0x1000);
        assert_eq!(mmio.slots[3].irq.line(), 9);
        assert_eq!(
            mmio.cmdline_entries()[0],
            "virtio_mmio.device=4K@0xd0000000:5"
        );
        let err = mmio
            .attach(&mem, Box::new(|_, _| Arc::new(Mutex::new(Dummy))))
            .unwrap_err();
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

    struct Dummy;
    impl crate::bus::BusDevice for Dummy {
        fn read(&mut self, _: &mut crate::bus::DeviceContext<'_>, _: u64, _: u64, d: &mut [u8]) {
            d.fill(0);
        }
        fn write(&mut self, _: &mut crate::bus::DeviceContext<'_>, _: u64, _: u64, _: &[u8]) {}
    }
}
