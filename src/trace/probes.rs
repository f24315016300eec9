//! The trace pass's probes: a one-byte `hlt` on each chosen function's `__fentry__` site and on
//! each of its return instructions, in the replaying guest's kernel text. With the irqchip in
//! the VMM, KVM hands every guest `hlt` to us, on VT-x, on AMD-V and inside the carrier alike
//! (whose emulated SVM does not intercept `int3` as `#BP`: tried first, the guest took its own
//! breakpoint trap). The guest never runs a probe: the VMM performs the instruction the probe
//! stands on. A fentry site is a 5-byte NOP (ftrace made it one at boot, before the snapshot),
//! so the vCPU moves past it; a return is performed as `ret` does (pop the return address into
//! RIP).
//!
//! Where rrr's kernel patch left room for them, most sites get a `jmp` to an in-guest stub
//! instead ([`super::stubs`]), which records the call without an exit. A function keeps `hlt`s
//! where its trace needs guest memory as it was at the call and a stub cannot read it (a system
//! call's registers and user memory, an argument deeper on the stack), and where the kernel's
//! identity of a task changes (`copy_process`, `free_task`: the buffer is drained before it
//! does). A string argument or return value is decided at each call, by the stub: a user one is
//! taken from its system call's capture, a kernel one in always-mapped memory is copied, and
//! only another stops at a `hlt`.
//!
//! The original bytes are kept: the probes are lifted before anything compares guest memory
//! (a landmark search, the final state hash), which is what makes a traced replay pass the same
//! checks as a plain one.

use std::collections::HashSet;

use anyhow::{bail, Result};
use rrr_tracer::{Index, Location, Reg, ValueKind};
use rrr_vmm::builder::Vmm;
use rustc_hash::FxHashMap as HashMap;

use super::guest::GuestReader;
use super::guest::DIRECT_MAP;
use super::introspect::SYSCALL_PREFIXES;
use super::stubs::{self, ArgRegisters, CopyRanges, CurrentAt, StubArea, StubKind};

/// `hlt`: privileged, one byte, and always a VM exit to the VMM.
const PROBE: u8 = 0xf4;
/// What ftrace leaves at a `__fentry__` site, and what the linker put there.
const NOP5: [u8; 5] = [0x0f, 0x1f, 0x44, 0x00, 0x00];
const CALL: u8 = 0xe8;
const RET: u8 = 0xc3;
const JMP32: u8 = 0xe9;
/// A return thunk's `jmp` as the kernel rewrites it at boot without the mitigation.
const RET_INT3: [u8; 5] = [RET, 0xcc, 0xcc, 0xcc, 0xcc];
/// `sti`: the instruction after it runs in its interrupt shadow.
const STI: u8 = 0xfb;
/// Functions whose entry changes which task a `task_struct` is: the buffer is drained there, so
/// records are told apart by the identity they were made under.
const IDENTITY_CHANGES: [&str; 2] = ["copy_process", "free_task"];
/// The functions a task returns from when it runs again after a switch (`schedule`) and when it
/// runs for the first time (`schedule_tail`). With both traced, every task that runs records
/// something, and a switch between tasks is seen before the next task can run user code.
const SWITCHED_IN: [&str; 2] = ["schedule", "schedule_tail"];

/// What a breakpoint stands for, with the function it belongs to (an index into the index's
/// functions).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Probe {
    Entry(u32),
    Return(u32),
}

/// How a site reaches the tracer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    /// A `hlt`: an exit.
    Halt,
    /// A `jmp` to an in-guest stub: a record in the buffer.
    Stub,
}

#[derive(Debug, Clone, Copy)]
struct Site {
    probe: Probe,
    /// The stub that may stand here, if the call's trace needs no other memory read at the time.
    stub: Option<StubKind>,
    via: Via,
    original: [u8; 5],
}

pub struct ProbeSet {
    probes: HashMap<u64, Site>,
    stubs: Option<StubArea>,
    /// Where the stubs may copy kernel strings from (the direct map joins at planting).
    copy_ranges: CopyRanges,
    planted: bool,
    /// Sites planted with a stub and with a `hlt`, at the last planting.
    pub stubbed: usize,
    pub halted: usize,
}

impl ProbeSet {
    /// The probes for `functions` (indices into `index.functions`): each one's fentry site and
    /// return sites.
    pub fn new(index: &Index, functions: &[u32]) -> ProbeSet {
        let mut probes = HashMap::default();
        let chosen: HashSet<u32> = functions.iter().copied().collect();
        let user_strings = switches_are_seen(index, &chosen);
        let site = |probe, stub| Site {
            probe,
            stub,
            via: Via::Halt,
            original: [0; 5],
        };
        for &f in functions {
            if let Some(at) = index.functions[f as usize].fentry {
                probes.insert(
                    at,
                    site(Probe::Entry(f), entry_stub(index, f, user_strings)),
                );
            }
        }
        for ret in &index.return_sites {
            if chosen.contains(&ret.function) {
                let stub = Some(if returns_string(index, ret.function) {
                    StubKind::StringReturn
                } else {
                    StubKind::Return
                });
                probes.insert(ret.address, site(Probe::Return(ret.function), stub));
            }
        }
        ProbeSet {
            probes,
            stubs: StubArea::find(index),
            copy_ranges: CopyRanges::of(index),
            planted: false,
            stubbed: 0,
            halted: 0,
        }
    }

    /// Whether the kernel has room for in-guest stubs.
    pub fn has_stub_room(&self) -> bool {
        self.stubs.is_some()
    }

    pub fn len(&self) -> usize {
        self.probes.len()
    }

    pub fn get(&self, addr: u64) -> Option<Probe> {
        self.probes.get(&addr).map(|s| s.probe)
    }

    /// Every planted site and what it stands for.
    pub fn sites(&self) -> Vec<(u64, Probe)> {
        self.probes.iter().map(|(&a, s)| (a, s.probe)).collect()
    }

    /// Writes the probes. A site whose bytes are not what the probe expects (code the kernel
    /// changed since it was built) is left alone and dropped.
    pub fn plant(
        &mut self,
        vmm: &Vmm,
        mem: &mut GuestReader,
        current: Option<CurrentAt>,
    ) -> Result<usize> {
        let mut dropped = 0usize;
        let mut keep = HashMap::with_capacity_and_hasher(self.probes.len(), Default::default());
        let mut stubs = match (self.stubs.take(), current) {
            (Some(mut area), Some(current)) => {
                let ranges = match low_ram(vmm, mem) {
                    Some(len) => self
                        .copy_ranges
                        .clone()
                        .with_direct_map(DIRECT_MAP.start, len),
                    None => self.copy_ranges.clone(),
                };
                area.prepare(vmm, mem, current, ranges)?;
                Some(area)
            }
            (area, _) => {
                self.stubs = area;
                None
            }
        };
        let (mut stubbed, mut halted) = (0, 0);
        // In address order: the same stubs in the same places at every planting.
        let mut sites: Vec<(u64, Site)> = self.probes.iter().map(|(&a, &s)| (a, s)).collect();
        sites.sort_unstable_by_key(|&(a, _)| a);
        for (addr, mut site) in sites {
            let mut bytes = [0u8; 5];
            if mem.read(vmm, addr, &mut bytes).is_none() {
                dropped += 1;
                continue;
            }
            let expected = match site.probe {
                Probe::Entry(_) => bytes == NOP5 || bytes[0] == CALL,
                Probe::Return(_) => bytes[0] == RET || bytes[0] == JMP32,
            };
            if !expected {
                dropped += 1;
                continue;
            }
            let stubbable = match site.probe {
                Probe::Entry(_) => bytes == NOP5,
                Probe::Return(_) => bytes == RET_INT3,
            } && !after_sti(vmm, mem, addr);
            let jump = match (&mut stubs, site.stub) {
                (Some(area), Some(kind)) if stubbable && area.room() > 0 => {
                    let stub = area.add_stub(vmm, mem, addr, kind)?;
                    stubs::jump(addr, stub)
                }
                _ => None,
            };
            let written = match jump {
                Some(jump) => {
                    site.via = Via::Stub;
                    stubbed += 1;
                    mem.write(vmm, addr, &jump)
                }
                None => {
                    site.via = Via::Halt;
                    halted += 1;
                    mem.write(vmm, addr, &[PROBE])
                }
            };
            if written.is_none() {
                dropped += 1;
                continue;
            }
            site.original = bytes;
            keep.insert(addr, site);
        }
        if stubs.is_some() {
            self.stubs = stubs;
        }
        self.probes = keep;
        self.planted = true;
        (self.stubbed, self.halted) = (stubbed, halted);
        Ok(dropped)
    }

    /// If `addr` is a `hlt` a stub stops at to be handled as a `hlt` probe: the probe's site.
    pub fn stub_halt_site(&self, vmm: &Vmm, addr: u64) -> Option<u64> {
        self.stubs
            .as_ref()
            .and_then(|s| s.stub_halt_site(vmm, addr))
    }

    /// Whether `addr` is the `hlt` of a stub whose buffer is full.
    pub fn is_full_halt(&self, addr: u64) -> bool {
        self.stubs.as_ref().is_some_and(|s| s.is_full_halt(addr))
    }

    /// The stubs' records since the last drain, in order (raw, see [`super::stubs::Record`]).
    pub fn drain(&mut self, vmm: &Vmm, out: &mut Vec<u8>) -> Result<()> {
        match &mut self.stubs {
            Some(area) if self.planted => area.drain(vmm, out),
            _ => Ok(()),
        }
    }

    /// Puts every original byte back, and the stubs' room as it was (drain it first).
    pub fn lift(&mut self, vmm: &Vmm, mem: &mut GuestReader) -> Result<()> {
        if !self.planted {
            return Ok(());
        }
        for (&addr, site) in &self.probes {
            let len = match site.via {
                Via::Halt => 1,
                Via::Stub => 5,
            };
            if mem.write(vmm, addr, &site.original[..len]).is_none() {
                bail!("cannot restore the kernel bytes at {addr:#x} under a probe");
            }
        }
        if let Some(area) = &mut self.stubs {
            area.clear(vmm, mem)?;
        }
        self.planted = false;
        Ok(())
    }

    pub fn planted(&self) -> bool {
        self.planted
    }
}

/// How much of the guest's RAM the direct map maps without a hole from its start (the first
/// memory region), if the kernel maps it where rrr expects (no memory randomisation).
fn low_ram(vmm: &Vmm, mem: &mut GuestReader) -> Option<u64> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    let first = vmm.mem.iter().find(|r| r.start_addr().0 == 0)?.len();
    let probe = 0x10_0000u64;
    (first > probe && mem.translate(vmm, DIRECT_MAP.start + probe) == Some(probe)).then_some(first)
}

/// Whether the site may follow an `sti` (its byte before is `sti`'s opcode). A `jmp` there would
/// run in the interrupt shadow, and an interrupt window the recording took after the site's
/// instruction (a `ret`) would open at the stub instead: such a site keeps its `hlt`, which the
/// run loop already takes apart from the shadow.
fn after_sti(vmm: &Vmm, mem: &mut GuestReader, addr: u64) -> bool {
    let mut before = [0u8; 1];
    mem.read(vmm, addr.wrapping_sub(1), &mut before).is_none() || before[0] == STI
}

/// The stub a function's entry can be traced with: one that records the argument registers,
/// and the two stack words above the return address if arguments are there. `None` if an
/// argument is somewhere else, for a system call (whose arguments are read from its `pt_regs`),
/// and for a change of a task's identity. A function taking strings in registers gets a stub
/// that checks them (a kernel string stops at a `hlt`) when `user_strings` says that a user
/// string can be taken from its system call's capture (see [`switches_are_seen`]); otherwise
/// `None`.
fn entry_stub(index: &Index, f: u32, user_strings: bool) -> Option<StubKind> {
    let function = &index.functions[f as usize];
    if SYSCALL_PREFIXES
        .iter()
        .any(|p| function.name.starts_with(p))
        || IDENTITY_CHANGES.contains(&function.name.as_str())
    {
        return None;
    }
    let mut stack = false;
    let mut strings = ArgRegisters::default();
    let mut first_string = None;
    for p in &function.params {
        let string = matches!(index.value_kind(p.ty), ValueKind::Str);
        match p.location {
            Location::Reg(r) | Location::Abi(r) | Location::RegPair(r, _) => {
                let n = Reg::ARGS.iter().position(|&a| a == r)?;
                if string {
                    strings = strings.with_argument(n);
                    first_string = first_string.or(Some(n));
                }
            }
            // Nothing to read: the trace shows it as optimized out.
            Location::Expr(_) | Location::Unavailable => {}
            // A constant string (`__func__` passed to a clone) is kernel memory to read.
            Location::Const(_) if string => return None,
            Location::Const(_) => {}
            Location::Stack(8 | 16) if !string => stack = true,
            Location::Stack(_) => return None,
        }
    }
    Some(match (strings.is_empty(), stack) {
        (true, false) => StubKind::Entry,
        (true, true) => StubKind::EntryWithStack,
        (false, _) if user_strings => StubKind::EntryUserStrings {
            stack,
            registers: strings,
            copy: first_string.map(ArgRegisters::argument),
        },
        (false, _) => return None,
    })
}

/// Whether every switch between tasks shows in the trace before the task switched to can run
/// (the functions of [`SWITCHED_IN`] are traced). A user string an entry stub passes on is
/// shown from what its system call's `hlt` captured (`super::tracer`), which stays true while
/// the task making the call is the only one that ran: only another task could change the
/// memory of a call's `const` buffer in the meantime.
fn switches_are_seen(index: &Index, chosen: &HashSet<u32>) -> bool {
    SWITCHED_IN.iter().all(|name| {
        index
            .functions
            .iter()
            .enumerate()
            .any(|(i, f)| f.name == *name && f.fentry.is_some() && chosen.contains(&(i as u32)))
    })
}

/// Whether a function returns a string (read where it is not NULL, see [`StubKind`]).
fn returns_string(index: &Index, f: u32) -> bool {
    index.functions[f as usize]
        .ret
        .is_some_and(|ty| matches!(index.value_kind(ty), ValueKind::Str | ValueKind::CharBuffer))
}
