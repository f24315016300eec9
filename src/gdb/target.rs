//! What gdb's requests do to the stopped replay: registers from the vCPU (read at each stop),
//! memory by virtual address through the guest's own page tables, breakpoints and watchpoints.
//! The target owns no borrow of the VM: it keeps a handle on guest memory (the same mapping)
//! and the registers read at the stop, and records what gdb asks for (resume, step, debug
//! registers) for the session to carry out once gdb lets the guest run.
//!
//! A replay must stay the recording's, so gdb cannot change it: register and memory writes are
//! refused. Software breakpoints are one-byte `hlt`s in kernel text (see the module docs), never
//! visible to gdb's memory reads, and only on kernel addresses: a user page may be shared by
//! every process that maps the same file.

use std::collections::BTreeMap;

use gdbstub::common::Signal;
use gdbstub::target::ext::base::reverse_exec::{
    ReverseCont, ReverseContOps, ReverseStep, ReverseStepOps,
};
use gdbstub::target::ext::base::singlethread::{
    SingleThreadBase, SingleThreadResume, SingleThreadResumeOps, SingleThreadSingleStep,
    SingleThreadSingleStepOps,
};
use gdbstub::target::ext::base::BaseOps;
use gdbstub::target::ext::breakpoints::{
    Breakpoints, BreakpointsOps, HwBreakpoint, HwBreakpointOps, HwWatchpoint, HwWatchpointOps,
    SwBreakpoint, SwBreakpointOps, WatchKind,
};
use gdbstub::target::ext::monitor_cmd::{outputln, ConsoleOutput, MonitorCmd, MonitorCmdOps};
use gdbstub::target::{Target, TargetError, TargetResult};
use kvm_bindings::{
    kvm_guest_debug, kvm_regs, kvm_sregs, KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP,
    KVM_GUESTDBG_USE_HW_BP,
};
use rrr_vmm::arch::x86_64::walk::PagingMode;
use rrr_vmm::builder::Vmm;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::arch::{Kernel64, KernelRegs};
use super::travel::Position;

/// The breakpoint byte: `hlt`, which KVM always hands to a VMM that owns the irqchip.
pub const HLT: u8 = 0xf4;

/// What gdb asked the guest to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    Continue,
    Step,
    ReverseCont,
    ReverseStep,
}

/// Instructions a pass of single steps handles apart (they would take the trap flag away).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Special {
    Syscall,
    Sysret,
    Iret,
}

/// A write watchpoint kept by value where the debug registers do not fire (the carrier): the
/// watched bytes are compared at every exit, and single steps find the writing instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ValueWatch {
    pub addr: u64,
    pub len: u64,
    pub gpa: u64,
}

/// A debug-register slot: an execution breakpoint (`hbreak`) or a data watchpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub addr: u64,
    pub len: u64,
    /// `None`: execution.
    pub watch: Option<WatchKind>,
}

pub struct DebugTarget {
    mem: GuestMemoryMmap,
    regs: kvm_regs,
    sregs: kvm_sregs,
    /// Planted software breakpoints: virtual address -> (guest-physical address, original byte).
    pub breakpoints: BTreeMap<u64, (u64, u8)>,
    /// DR0-DR3.
    pub slots: [Option<Slot>; 4],
    pub resume: Option<Resume>,
    /// Whether the debug registers are offered to gdb. Not inside the carrier: measured
    /// 2026-11-30, neither an execution breakpoint (`hbreak`) nor a data watchpoint set through
    /// `KVM_GUESTDBG_USE_HW_BP` ever fired there (QEMU's emulated SVM does not seem to arm the
    /// debug registers a nested guest runs with), and a watchpoint that silently never fires is
    /// worse than gdb's "cannot insert". gdb's software watchpoints (`set
    /// can-use-hw-watchpoints 0`) single-step instead, slowly but exactly.
    pub hw_debug: bool,
    /// Write watchpoints by value (where `hw_debug` is off).
    pub watches: Vec<ValueWatch>,
    /// The debugger's own breakpoint (a travel's destination): (address, guest-physical
    /// address, original byte).
    pub marker: Option<(u64, u64, u8)>,
    /// Whether gdb's breakpoints are in guest memory now (a travel to a position lifts them).
    pub user_planted: bool,
    /// Where the replay stands, when known.
    pub pos: Option<Position>,
    /// `monitor goto`'s destination, for the session to travel to.
    pub goto: Option<Position>,
    /// The session went where a `monitor goto` packet asked before it is answered.
    pub arrived: bool,
}

impl DebugTarget {
    pub fn new(vmm: &Vmm) -> Self {
        DebugTarget {
            mem: vmm.mem.clone(),
            regs: kvm_regs::default(),
            sregs: kvm_sregs::default(),
            breakpoints: BTreeMap::new(),
            slots: [None; 4],
            resume: None,
            hw_debug: !crate::carrier::inside_carrier(),
            watches: Vec::new(),
            marker: None,
            user_planted: true,
            pos: None,
            goto: None,
            arrived: false,
        }
    }

    /// Reads the stopped vCPU's registers (at every stop, before gdb asks).
    pub fn load(&mut self, vmm: &Vmm) -> Result<(), kvm_ioctls::Error> {
        self.regs = vmm.vcpu.fd.get_regs()?;
        self.sregs = vmm.vcpu.fd.get_sregs()?;
        Ok(())
    }

    fn paging(&self) -> PagingMode {
        PagingMode::of(&self.sregs)
    }

    /// Puts every original byte back (before the final state hash, a landmark search, a
    /// checkpoint, or when gdb goes away). The breakpoints stay known, for
    /// [`DebugTarget::replant`].
    pub fn lift(&self) {
        for &(gpa, original) in self.breakpoints.values() {
            let _ = self.mem.write_obj(original, GuestAddress(gpa));
        }
        if let Some((_, gpa, original)) = self.marker {
            let _ = self.mem.write_obj(original, GuestAddress(gpa));
        }
    }

    pub fn replant(&self) {
        if self.user_planted {
            for &(gpa, _) in self.breakpoints.values() {
                let _ = self.mem.write_obj(HLT, GuestAddress(gpa));
            }
        }
        if let Some((_, gpa, _)) = self.marker {
            let _ = self.mem.write_obj(HLT, GuestAddress(gpa));
        }
    }

    /// Whether a `hlt` of the debugger's is planted at `addr` now.
    pub fn planted_at(&self, addr: u64) -> bool {
        (self.user_planted && self.breakpoints.contains_key(&addr))
            || self.marker.is_some_and(|(at, _, _)| at == addr)
    }

    /// Every address with a `hlt` of the debugger's now.
    pub fn planted(&self) -> Vec<u64> {
        let mut all: Vec<u64> = if self.user_planted {
            self.breakpoints.keys().copied().collect()
        } else {
            Vec::new()
        };
        all.extend(self.marker.map(|(at, _, _)| at));
        all
    }

    /// Plants the debugger's own breakpoint at `addr` (with the registers loaded at the stop
    /// or exit where it is planted, for the page tables).
    pub fn plant_marker(&mut self, addr: u64) -> bool {
        self.clear_marker();
        let Ok(gpa) = self.paging().translate(&self.mem, addr) else {
            return false;
        };
        let original = match self.breakpoints.get(&addr) {
            Some(&(_, original)) => original,
            None => match self.mem.read_obj::<u8>(GuestAddress(gpa)) {
                Ok(byte) => byte,
                Err(_) => return false,
            },
        };
        self.marker = Some((addr, gpa, original));
        self.mem.write_obj(HLT, GuestAddress(gpa)).is_ok()
    }

    pub fn clear_marker(&mut self) {
        if let Some((addr, gpa, original)) = self.marker.take() {
            if !(self.user_planted && self.breakpoints.contains_key(&addr)) {
                let _ = self.mem.write_obj(original, GuestAddress(gpa));
            }
        }
    }

    /// The watched bytes, one watchpoint after the other.
    pub fn watch_values(&self) -> Vec<u8> {
        let mut all = Vec::new();
        for w in &self.watches {
            let mut bytes = vec![0u8; w.len as usize];
            let _ = self.mem.read_slice(&mut bytes, GuestAddress(w.gpa));
            all.extend(bytes);
        }
        all
    }

    /// The watchpoint whose bytes differ between two [`DebugTarget::watch_values`].
    pub fn changed_watch(&self, before: &[u8], now: &[u8]) -> Option<u64> {
        let mut at = 0usize;
        for w in &self.watches {
            let end = at + w.len as usize;
            if before.get(at..end) != now.get(at..end) {
                return Some(w.addr);
            }
            at = end;
        }
        None
    }

    /// Whether the instruction at `rip` (read through the current page tables) is one a pass
    /// of single steps handles apart.
    pub fn instruction_at(&mut self, vmm: &Vmm, rip: u64) -> Option<Special> {
        self.load(vmm).ok()?;
        let (bytes, _) = self.paging().read_virt(&self.mem, rip, 3);
        match bytes.as_slice() {
            [0x0f, 0x05, ..] if rip >> 63 == 0 => Some(Special::Syscall),
            [0x48, 0x0f, 0x07] => Some(Special::Sysret),
            [0x48, 0xcf, ..] => Some(Special::Iret),
            _ => None,
        }
    }

    /// Sets the trap flag in the flags word at `addr` (an IRET frame on the stack).
    pub fn set_trap_flag_at(&self, addr: u64) {
        let Ok(gpa) = self.paging().translate(&self.mem, addr) else {
            return;
        };
        if let Ok(flags) = self.mem.read_obj::<u64>(GuestAddress(gpa)) {
            let _ = self.mem.write_obj(flags | 0x100, GuestAddress(gpa));
        }
    }

    /// The registers read at the last stop.
    pub fn rip(&self) -> u64 {
        self.regs.rip
    }

    /// Lifts one breakpoint (to execute the instruction under it) or puts it back.
    pub fn set_planted(&self, addr: u64, planted: bool) {
        let found = match self.marker {
            Some((at, gpa, original)) if at == addr => Some((gpa, original)),
            _ => self
                .breakpoints
                .get(&addr)
                .filter(|_| self.user_planted)
                .copied(),
        };
        if let Some((gpa, original)) = found {
            let byte = if planted { HLT } else { original };
            let _ = self.mem.write_obj(byte, GuestAddress(gpa));
        }
    }

    /// The `KVM_SET_GUEST_DEBUG` argument for the debug registers gdb asked for, with a single
    /// step or not; `skip` disables an execution slot at that address (to step off it).
    pub fn guest_debug(&self, step: bool, skip: Option<u64>) -> kvm_guest_debug {
        let mut debug = kvm_guest_debug::default();
        let mut dr7 = 0u64;
        for (i, slot) in self.slots.iter().enumerate() {
            let Some(slot) = slot else { continue };
            if slot.watch.is_none() && skip == Some(slot.addr) {
                continue;
            }
            debug.arch.debugreg[i] = slot.addr;
            // R/W: 00 execute, 01 write, 11 read or write; LEN: 00 1, 01 2, 11 4, 10 8 bytes.
            let rw = match slot.watch {
                None => 0b00,
                Some(WatchKind::Write) => 0b01,
                Some(_) => 0b11,
            };
            let len = match slot.len {
                2 => 0b01,
                4 => 0b11,
                8 => 0b10,
                _ => 0b00,
            };
            dr7 |= (1 << (2 * i)) | (rw << (16 + 4 * i)) | (len << (18 + 4 * i));
        }
        if dr7 != 0 {
            // GE, and bit 10, which always reads as one.
            debug.arch.debugreg[7] = dr7 | 0x600;
            debug.control |= KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP;
        }
        if step {
            debug.control |= KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP;
        }
        debug
    }

    fn add_slot(&mut self, slot: Slot) -> bool {
        let aligned = matches!(slot.len, 1 | 2 | 4 | 8) && slot.addr % slot.len == 0;
        match self.slots.iter_mut().find(|s| s.is_none()) {
            Some(free) if aligned => {
                *free = Some(slot);
                true
            }
            _ => false,
        }
    }

    fn remove_slot(&mut self, slot: Slot) -> bool {
        match self.slots.iter_mut().find(|s| **s == Some(slot)) {
            Some(found) => {
                *found = None;
                true
            }
            None => false,
        }
    }
}

impl Target for DebugTarget {
    type Arch = Kernel64;
    type Error = String;

    fn base_ops(&mut self) -> BaseOps<'_, Self::Arch, Self::Error> {
        BaseOps::SingleThread(self)
    }

    fn support_breakpoints(&mut self) -> Option<BreakpointsOps<'_, Self>> {
        Some(self)
    }

    fn support_monitor_cmd(&mut self) -> Option<MonitorCmdOps<'_, Self>> {
        Some(self)
    }
}

impl MonitorCmd for DebugTarget {
    fn handle_monitor_cmd(&mut self, cmd: &[u8], mut out: ConsoleOutput<'_>) -> Result<(), String> {
        let cmd = String::from_utf8_lossy(cmd);
        let mut words = cmd.split_whitespace();
        match (words.next(), words.next()) {
            (Some("when"), None) => match self.pos {
                Some(pos) => outputln!(out, "{pos}"),
                None => outputln!(
                    out,
                    "rrr: the position here is not known (a stop the debugger did not count its way to); `monitor goto` a known one, or continue to a breakpoint"
                ),
            },
            (Some("goto"), Some(_)) if self.arrived => {
                self.arrived = false;
                match self.pos {
                    Some(pos) => outputln!(
                        out,
                        "rrr: at {pos}; `maint flush register-cache` makes gdb read the registers again"
                    ),
                    None => outputln!(out, "rrr: the position was not found"),
                }
            }
            (Some("goto"), Some(to)) => match to.parse::<Position>() {
                Ok(to) => {
                    self.goto = Some(to);
                    outputln!(
                        out,
                        "rrr: going to {to}; then `maint flush register-cache` (gdb keeps the registers it read)"
                    );
                }
                Err(why) => outputln!(out, "rrr: {why}"),
            },
            _ => outputln!(
                out,
                "rrr monitor commands:\n  when            the position of this stop (EXITS:RIP:HITS)\n  goto POSITION   go there, forward or backward"
            ),
        }
        Ok(())
    }
}

impl SingleThreadBase for DebugTarget {
    fn read_registers(&mut self, regs: &mut KernelRegs) -> TargetResult<(), Self> {
        let r = &self.regs;
        let s = &self.sregs;
        // gdb's order: rax, rbx, rcx, rdx, rsi, rdi, rbp, rsp, r8-r15.
        regs.core.regs = [
            r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.rsp, r.r8, r.r9, r.r10, r.r11,
            r.r12, r.r13, r.r14, r.r15,
        ];
        regs.core.rip = r.rip;
        regs.core.eflags = r.rflags as u32;
        regs.core.segments.cs = u32::from(s.cs.selector);
        regs.core.segments.ss = u32::from(s.ss.selector);
        regs.core.segments.ds = u32::from(s.ds.selector);
        regs.core.segments.es = u32::from(s.es.selector);
        regs.core.segments.fs = u32::from(s.fs.selector);
        regs.core.segments.gs = u32::from(s.gs.selector);
        regs.fs_base = s.fs.base;
        regs.gs_base = s.gs.base;
        regs.sys = [s.cr0, s.cr2, s.cr3, s.cr4, s.cr8, s.efer];
        Ok(())
    }

    fn write_registers(&mut self, _regs: &KernelRegs) -> TargetResult<(), Self> {
        // The replay must stay the recording's.
        Err(TargetError::NonFatal)
    }

    fn read_addrs(&mut self, start: u64, data: &mut [u8]) -> TargetResult<usize, Self> {
        let paging = self.paging();
        let (bytes, _) = paging.read_virt(&self.mem, start, data.len());
        data[..bytes.len()].copy_from_slice(&bytes);
        // gdb sees the kernel's bytes, not the breakpoints'.
        let end = start.saturating_add(bytes.len() as u64);
        for (&addr, &(_, original)) in self.breakpoints.range(start..end) {
            data[(addr - start) as usize] = original;
        }
        if let Some((addr, _, original)) = self.marker.filter(|m| (start..end).contains(&m.0)) {
            data[(addr - start) as usize] = original;
        }
        if bytes.is_empty() && !data.is_empty() {
            return Err(TargetError::Errno(14)); // EFAULT
        }
        Ok(bytes.len())
    }

    fn write_addrs(&mut self, _start: u64, _data: &[u8]) -> TargetResult<(), Self> {
        Err(TargetError::NonFatal)
    }

    fn support_resume(&mut self) -> Option<SingleThreadResumeOps<'_, Self>> {
        Some(self)
    }
}

impl SingleThreadResume for DebugTarget {
    fn resume(&mut self, _signal: Option<Signal>) -> Result<(), Self::Error> {
        // A signal cannot be given to a kernel; gdb only passes one back when it stopped on one.
        self.resume = Some(Resume::Continue);
        Ok(())
    }

    fn support_single_step(&mut self) -> Option<SingleThreadSingleStepOps<'_, Self>> {
        Some(self)
    }

    fn support_reverse_cont(&mut self) -> Option<ReverseContOps<'_, (), Self>> {
        Some(self)
    }

    fn support_reverse_step(&mut self) -> Option<ReverseStepOps<'_, (), Self>> {
        Some(self)
    }
}

impl ReverseCont<()> for DebugTarget {
    fn reverse_cont(&mut self) -> Result<(), Self::Error> {
        self.resume = Some(Resume::ReverseCont);
        Ok(())
    }
}

impl ReverseStep<()> for DebugTarget {
    fn reverse_step(&mut self, _tid: ()) -> Result<(), Self::Error> {
        self.resume = Some(Resume::ReverseStep);
        Ok(())
    }
}

impl SingleThreadSingleStep for DebugTarget {
    fn step(&mut self, _signal: Option<Signal>) -> Result<(), Self::Error> {
        self.resume = Some(Resume::Step);
        Ok(())
    }
}

impl Breakpoints for DebugTarget {
    fn support_sw_breakpoint(&mut self) -> Option<SwBreakpointOps<'_, Self>> {
        Some(self)
    }

    fn support_hw_breakpoint(&mut self) -> Option<HwBreakpointOps<'_, Self>> {
        self.hw_debug.then_some(self)
    }

    fn support_hw_watchpoint(&mut self) -> Option<HwWatchpointOps<'_, Self>> {
        // Without the debug registers, write watchpoints are kept by value.
        Some(self)
    }
}

impl SwBreakpoint for DebugTarget {
    fn add_sw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        if self.breakpoints.contains_key(&addr) {
            return Ok(true);
        }
        if addr >> 63 == 0 {
            return Ok(false);
        }
        let Ok(gpa) = self.paging().translate(&self.mem, addr) else {
            return Ok(false);
        };
        let original = match self.marker {
            Some((at, _, original)) if at == addr => original,
            _ => match self.mem.read_obj::<u8>(GuestAddress(gpa)) {
                Ok(byte) => byte,
                Err(_) => return Ok(false),
            },
        };
        if self.mem.write_obj(HLT, GuestAddress(gpa)).is_err() {
            return Ok(false);
        }
        self.breakpoints.insert(addr, (gpa, original));
        Ok(true)
    }

    fn remove_sw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        match self.breakpoints.remove(&addr) {
            // The debugger's own breakpoint may sit there too.
            Some(_) if self.marker.is_some_and(|(at, _, _)| at == addr) => Ok(true),
            Some((gpa, original)) => Ok(self.mem.write_obj(original, GuestAddress(gpa)).is_ok()),
            None => Ok(false),
        }
    }
}

impl HwBreakpoint for DebugTarget {
    fn add_hw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        Ok(self.add_slot(Slot {
            addr,
            len: 1,
            watch: None,
        }))
    }

    fn remove_hw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        Ok(self.remove_slot(Slot {
            addr,
            len: 1,
            watch: None,
        }))
    }
}

impl HwWatchpoint for DebugTarget {
    fn add_hw_watchpoint(
        &mut self,
        addr: u64,
        len: u64,
        kind: WatchKind,
    ) -> TargetResult<bool, Self> {
        // x86 has no read-only data breakpoint.
        if kind == WatchKind::Read {
            return Ok(false);
        }
        if !self.hw_debug {
            // By value: only writes show, and the bytes must lie in one page.
            if kind != WatchKind::Write || len == 0 || len > 64 || (addr & 0xfff) + len > 0x1000 {
                return Ok(false);
            }
            let Ok(gpa) = self.paging().translate(&self.mem, addr) else {
                return Ok(false);
            };
            self.watches.push(ValueWatch { addr, len, gpa });
            return Ok(true);
        }
        Ok(self.add_slot(Slot {
            addr,
            len,
            watch: Some(kind),
        }))
    }

    fn remove_hw_watchpoint(
        &mut self,
        addr: u64,
        len: u64,
        kind: WatchKind,
    ) -> TargetResult<bool, Self> {
        if !self.hw_debug {
            return Ok(
                match self
                    .watches
                    .iter()
                    .position(|w| w.addr == addr && w.len == len)
                {
                    Some(i) => {
                        self.watches.remove(i);
                        true
                    }
                    None => false,
                },
            );
        }
        Ok(self.remove_slot(Slot {
            addr,
            len,
            watch: Some(kind),
        }))
    }
}
