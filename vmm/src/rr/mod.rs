//! Record and replay: the recording's format ([`log`]) and the execution modes the run loop
//! calls at each exit. As in rr, what only applies while recording lives in [`record`], what
//! only applies while replaying in [`replay`], and the run loop sees one trait, [`ExecMode`];
//! devices never know which mode runs.
//!
//! Where the two modes meet the run loop (DESIGN.md, "Determinism without a PMU", items 5-8):
//! - after every synchronous exit (checkpoints every [`CHECKPOINT_INTERVAL`] exits);
//! - when console bytes are handed to the UART (logged while recording, taken from the log
//!   while replaying: the host's input is ignored);
//! - at a landmark (a tick the host-timed stall watchdog gave): logged with the full register
//!   state while recording; while replaying the watchdog gives none, and the replayer finds the
//!   recorded state again before the run loop enters the guest.

pub mod checkpoint;
pub mod final_state;
pub mod log;
pub mod record;
pub mod replay;

use std::collections::BTreeSet;
use std::fmt;

use vm_memory::{Bytes, GuestAddress};

use crate::builder::Vmm;
use crate::clock::VirtualTime;
use crate::run_loop::RunState;
use crate::stall::LandmarkCause;
use crate::vstate::vm::VmError;
use log::{LandmarkKind, LogError, RegState};

pub use record::Recorder;
pub use replay::Replayer;

/// Exits between two checkpoints. A checkpoint costs two register reads (tens of microseconds
/// inside the carrier, where an exit costs about as much) and 30 bytes: at 256 the cost stays
/// under 1% and a divergence is caught within a few milliseconds of guest time.
pub const CHECKPOINT_INTERVAL: u64 = 256;

/// What the last synchronous exit was, for a divergence report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitWhat {
    Pio { port: u16, write: bool },
    Mmio { addr: u64, write: bool },
    Window,
    Halt,
}

impl fmt::Display for ExitWhat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dir = |write: bool| if write { "write" } else { "read" };
        match self {
            ExitWhat::Pio { port, write } => write!(f, "port {port:#x} {}", dir(*write)),
            ExitWhat::Mmio { addr, write } => write!(f, "mmio {addr:#x} {}", dir(*write)),
            ExitWhat::Window => f.write_str("interrupt window"),
            ExitWhat::Halt => f.write_str("hlt"),
        }
    }
}

/// The first place a replay parted from its recording.
#[derive(Debug, Clone)]
pub struct Divergence {
    /// 1-based number of the record (after the header) the replay was checking.
    pub event: usize,
    pub exits: u64,
    pub expected: String,
    pub seen: String,
    /// The last exits before it, oldest first.
    pub last_exits: Vec<String>,
}

impl fmt::Display for Divergence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "the replay diverged from the recording at event {} (exit {}):",
            self.event, self.exits
        )?;
        writeln!(f, "  expected: {}", self.expected)?;
        writeln!(f, "  seen:     {}", self.seen)?;
        write!(f, "  last exits before it:")?;
        for exit in &self.last_exits {
            write!(f, "\n    {exit}")?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RrError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("{0}")]
    Divergence(Box<Divergence>),
    /// A partial recording was replayed to its last whole record.
    #[error("the recording ends here (exit {exits}): replayed up to its last whole record")]
    EndOfPartial { exits: u64 },
    #[error("reading the vCPU state failed: {0}")]
    Vcpu(kvm_ioctls::Error),
    #[error("reading the dirty-page log failed: {0}")]
    Dirty(#[from] VmError),
    #[error("reading guest page {page:#x} failed")]
    Memory { page: u64 },
    /// A probe of the mode (the trace pass) failed.
    #[error("the trace pass failed: {0}")]
    Probe(String),
    /// The debugger (`rrr replay --gdb`) failed: its connection, or gdb's protocol.
    #[error("the debugger failed: {0}")]
    Debugger(String),
    /// Taking or restoring an in-memory checkpoint (reverse execution) failed.
    #[error("a checkpoint failed: {0}")]
    Checkpoint(#[from] checkpoint::CheckpointError),
}

/// What the run loop asks of the mode. Every method has the plain-run default: no log, host
/// landmarks and host input as they come.
/// Inside `impl ExecMode for W`, where `W` wraps a [`Replayer`] in field `$field` and adds
/// probes of its own (the trace pass, gdb): the methods such a wrapper hands to the replayer
/// unchanged, written once here.
#[macro_export]
macro_rules! replayer_passthrough {
    ($field:ident) => {
        fn host_landmarks(&self) -> bool {
            self.$field.host_landmarks()
        }

        fn feeds_input(&self) -> bool {
            self.$field.feeds_input()
        }

        fn input_delivered(
            &mut self,
            exits: u64,
            now: $crate::clock::VirtualTime,
            bytes: &[u8],
        ) -> Result<(), $crate::rr::RrError> {
            self.$field.input_delivered(exits, now, bytes)
        }

        fn input_due(
            &mut self,
            exits: u64,
            now: $crate::clock::VirtualTime,
            room: usize,
        ) -> Result<Option<Vec<u8>>, $crate::rr::RrError> {
            self.$field.input_due(exits, now, room)
        }

        fn input_pending_at(&self, exits: u64, now: $crate::clock::VirtualTime) -> bool {
            self.$field.input_pending_at(exits, now)
        }

        fn landmark(
            &mut self,
            vmm: &mut $crate::builder::Vmm,
            exits: u64,
            cause: $crate::stall::LandmarkCause,
        ) -> Result<(), $crate::rr::RrError> {
            self.$field.landmark(vmm, exits, cause)
        }
    };
}

pub trait ExecMode {
    /// After synchronous exit number `exits` was counted and the clock ticked.
    fn after_exit(
        &mut self,
        _vmm: &mut Vmm,
        _exits: u64,
        _now: VirtualTime,
        _what: ExitWhat,
    ) -> Result<(), RrError> {
        Ok(())
    }

    /// Whether the host-timed watchdog may give landmarks (a replay takes them from its log).
    fn host_landmarks(&self) -> bool {
        true
    }

    /// Whether console input comes from [`ExecMode::input_due`] instead of the host.
    fn feeds_input(&self) -> bool {
        false
    }

    /// Console bytes just handed to the UART from the host.
    fn input_delivered(
        &mut self,
        _exits: u64,
        _now: VirtualTime,
        _bytes: &[u8],
    ) -> Result<(), RrError> {
        Ok(())
    }

    /// Console bytes to hand to the UART now, if the log has some for this point; `room` is
    /// what the UART takes now (a logged chunk that does not fit is a divergence).
    fn input_due(
        &mut self,
        _exits: u64,
        _now: VirtualTime,
        _room: usize,
    ) -> Result<Option<Vec<u8>>, RrError> {
        Ok(None)
    }

    /// Whether the log has console input for this point that a halted guest may wait for.
    fn input_pending_at(&self, _exits: u64, _now: VirtualTime) -> bool {
        false
    }

    /// A host-timed landmark is about to be given where the vCPU stands.
    fn landmark(
        &mut self,
        _vmm: &mut Vmm,
        _exits: u64,
        _cause: LandmarkCause,
    ) -> Result<(), RrError> {
        Ok(())
    }

    /// A `hlt` exit that may be a probe the mode planted (the trace pass puts a one-byte `hlt`
    /// where it wants an exit: KVM hands every guest `hlt` to the VMM when the irqchip is ours,
    /// inside the carrier too, where the emulated SVM does not intercept `int3`). Returns whether
    /// it was one, and then the mode has moved the vCPU on; otherwise the run loop idles as for
    /// any `hlt`. Probe hits are not synchronous exits: they advance neither the exit count nor
    /// virtual time, and nothing is injected at them, so a probed run keeps the recording's
    /// timeline.
    fn probe_hit(
        &mut self,
        _vmm: &mut Vmm,
        _exits: u64,
        _now: VirtualTime,
    ) -> Result<bool, RrError> {
        Ok(false)
    }

    /// An `outb` to the stimulus's function-probe port
    /// ([`rrr_guest::protocol::FUNC_PROBE_PORT`]), which the guest makes only where a mode put a
    /// probe into the stimulus's hooks. Returns whether it was the mode's; like probe hits, these
    /// are not synchronous exits. Otherwise it is an ordinary port write (no device answers).
    fn func_probe(
        &mut self,
        _vmm: &mut Vmm,
        _exits: u64,
        _now: VirtualTime,
    ) -> Result<bool, RrError> {
        Ok(false)
    }

    /// A `KVM_EXIT_DEBUG` (a single step or a debug-register hit) that a mode asked for with
    /// `KVM_SET_GUEST_DEBUG` outside the replayer's own landmark search (a debugger). Returns
    /// whether it was the mode's; if not, the run ends with an unexpected exit. Like probe hits,
    /// debug exits are not synchronous exits: no exit count, no virtual time, no injection.
    fn debug_exit(
        &mut self,
        _vmm: &mut Vmm,
        _exits: u64,
        _now: VirtualTime,
        _debug: &kvm_bindings::kvm_debug_exit_arch,
    ) -> Result<bool, RrError> {
        Ok(false)
    }

    /// Puts back the guest-debug settings the mode wants after the run loop single-stepped on
    /// its own (out of an `sti` shadow). The default: none.
    fn restore_guest_debug(&mut self, vmm: &mut Vmm) -> Result<(), RrError> {
        vmm.vcpu
            .fd
            .set_guest_debug(&kvm_bindings::kvm_guest_debug::default())
            .map_err(RrError::Vcpu)
    }

    /// Whether [`ExecMode::boundary`] is to be called at the top of the run loop now (a cheap
    /// question asked before every entry).
    fn wants_boundary(&self, _exits: u64) -> bool {
        false
    }

    /// At the top of the run loop, between two exits with nothing pending: the mode may keep
    /// the machine and `run` (an in-memory checkpoint) or put an earlier machine back, and then
    /// returns the run loop's state to go on with (its clock, counters and pending input).
    fn boundary(&mut self, _vmm: &mut Vmm, _run: &RunState) -> Result<Option<RunState>, RrError> {
        Ok(None)
    }

    /// Before entering the guest: whether a logged landmark is due here. The mode has moved the
    /// vCPU to the landmark's state; the run loop then gives the tick.
    fn landmark_due(&mut self, _vmm: &mut Vmm, _exits: u64) -> Result<bool, RrError> {
        Ok(false)
    }
}

/// A plain run: nothing logged, nothing replayed.
#[derive(Debug, Default)]
pub struct Plain;

impl ExecMode for Plain {}

impl From<LandmarkCause> for LandmarkKind {
    fn from(cause: LandmarkCause) -> Self {
        match cause {
            LandmarkCause::Spinning => LandmarkKind::Spinning,
            LandmarkCause::Runaway => LandmarkKind::Runaway,
        }
    }
}

/// FNV-1a over words: stable across runs and hosts.
pub fn fnv(words: impl IntoIterator<Item = u64>) -> u64 {
    words.into_iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, w| {
        (h ^ w).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The registers a landmark is found by and a checkpoint checks.
pub fn reg_state(vmm: &Vmm) -> Result<RegState, RrError> {
    let r = vmm.vcpu.fd.get_regs().map_err(RrError::Vcpu)?;
    let s = vmm.vcpu.fd.get_sregs().map_err(RrError::Vcpu)?;
    Ok(RegState {
        gprs: [
            r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.rbp, r.r8, r.r9, r.r10, r.r11,
            r.r12, r.r13, r.r14, r.r15, r.rip, r.rflags,
        ],
        cr3: s.cr3,
        cs: s.cs.selector,
    })
}

impl RegState {
    pub fn hash(&self) -> u64 {
        fnv(self
            .gprs
            .iter()
            .copied()
            .chain([self.cr3, u64::from(self.cs)]))
    }
}

/// The pages the guest wrote during a run, from KVM's dirty log, taken at the same points
/// (landmarks and the end) while recording and replaying.
#[derive(Debug, Default, Clone)]
pub struct DirtyPages {
    all: BTreeSet<u64>,
    /// Pages someone else took from KVM's log since the last take (in-memory checkpoints).
    carried: Vec<u64>,
}

impl DirtyPages {
    /// Takes the pages written since the last call and returns a hash of their contents.
    pub fn take_and_hash(&mut self, vmm: &Vmm) -> Result<u64, RrError> {
        let mut pages = vmm.vm.take_dirty_pages(&vmm.mem)?;
        pages.append(&mut self.carried);
        pages.sort_unstable();
        pages.dedup();
        let hash = hash_pages(vmm, &pages)?;
        self.all.extend(pages);
        Ok(hash)
    }

    /// Pages taken from KVM's log by someone else, for the next take.
    pub fn carry(&mut self, pages: &[u64]) {
        self.carried.extend_from_slice(pages);
    }

    /// The final state: registers and the whole of guest RAM. Not only the pages the dirty log
    /// saw written: KVM also marks pages dirty for its own reasons, at host-timed points, so
    /// two identical runs can list different pages (measured: a replay matching every
    /// checkpoint, the exits and the console differed in that list).
    pub fn final_hash(&mut self, vmm: &Vmm) -> Result<u64, RrError> {
        self.take_and_hash(vmm)?;
        let memory = final_state::memory_hash(vmm);
        let regs = reg_state(vmm)?;
        tracing::debug!(
            written_pages = self.all.len(),
            memory = format_args!("{memory:#018x}"),
            regs = format_args!("{:#018x}", regs.hash()),
            "final state"
        );
        Ok(fnv([regs.hash(), memory]))
    }
}

fn hash_pages(vmm: &Vmm, pages: &[u64]) -> Result<u64, RrError> {
    let mut page = [0u8; 4096];
    let mut words = Vec::with_capacity(pages.len() * 2);
    for &number in pages {
        vmm.mem
            .read_slice(&mut page, GuestAddress(number << 12))
            .map_err(|_| RrError::Memory { page: number })?;
        words.push(number);
        words.push(u64::from(crc32fast::hash(&page)));
    }
    Ok(fnv(words))
}
