//! The vCPU run loop, on the calling thread. It only dispatches: port I/O to the PIO bus, MMIO
//! to the MMIO bus, HLT to the idle logic, everything else to an end of the run.
//!
//! Determinism rules (DESIGN.md, "Determinism without a PMU"): virtual time moves by one quantum
//! per synchronous exit (by the cost of the code it stands for at a progress exit, see
//! `devices::progress`) and jumps to the next timer deadline on HLT; interrupts are injected only
//! at synchronous exits; a watchdog kick (`EINTR`) is not a synchronous exit and changes nothing
//! the guest can see.
//!
//! `RUST_LOG=rrr_vmm::timeline=trace` logs every exit, injection and kick with its exit count:
//! diffing two runs' timelines shows the first exit where they part.

use std::collections::VecDeque;
use std::fmt;
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::time::{Duration, Instant};

use kvm_ioctls::VcpuExit;

use crate::arch::x86_64::fault::CpuSnapshot;
use crate::arch::x86_64::sti_shadow::{self, Shadowed};
use crate::builder::Vmm;
use crate::bus::{lock, DeviceContext};
use crate::clock::{VirtualClock, VirtualTime};
use crate::description::VmDescription;
use crate::devices::control::ControlEvent;
use crate::devices::progress::ProgressCounts;
use crate::exit_ring::{ExitRing, RingEvent};
use crate::irq::IrqLines;
use crate::rr::{ExecMode, ExitWhat, Plain, RrError};
use crate::stall::{LandmarkCounts, StallTracker, Verdict};
use crate::vstate::vcpu::{VcpuError, VcpuKicker};
use crate::watchdog::Watchdog;

/// Deadline jumps in one HLT without a deliverable interrupt before we conclude the timer's
/// interrupt is masked and nothing on the board can wake the guest.
const MAX_IDLE_JUMPS: u32 = 100_000;
/// How often a guest idling for console input re-checks the host timeout.
const INPUT_POLL: Duration = Duration::from_millis(50);

/// How a run ended without a fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunEnd {
    /// HLT with interrupts disabled: Linux's halt/power-off path ends this way.
    PowerOff,
    /// The guest asked for a reset (i8042 pulse, or a reset system event).
    Reboot,
    /// The host-time limit passed.
    HostTimeout,
    /// The virtual-time limit passed.
    VirtualTimeout,
}

impl fmt::Display for RunEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RunEnd::PowerOff => "powered off",
            RunEnd::Reboot => "rebooted",
            RunEnd::HostTimeout => "timed out (host time)",
            RunEnd::VirtualTimeout => "timed out (virtual time)",
        })
    }
}

/// Counters of one run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RunStats {
    /// Synchronous exits: the VM's notion of progress, identical on identical runs.
    pub exits: u64,
    pub pio_exits: u64,
    pub mmio_exits: u64,
    pub halts: u64,
    pub injections: u64,
    /// Watchdog kicks (asynchronous; not part of the guest's timeline).
    pub kicks: u64,
    /// Interrupt windows that opened one instruction early, in an `sti` shadow, and were
    /// stepped to where they belong (host-timed, in the carrier only; not part of the timeline).
    #[serde(default)]
    pub shadow_steps: u64,
    /// Windows that opened on the `hlt` of `sti; hlt` (the idle loop), taken as that `hlt`
    /// (host-timed like the steps; in the carrier only).
    #[serde(default)]
    pub shadowed_halts: u64,
    /// Kicks after a stall at which a timer interrupt was delivered (host-timed: a recording
    /// must log them).
    pub landmarks: u64,
    /// The same landmarks by cause.
    pub landmark_kinds: LandmarkCounts,
    /// Synchronous exits that were progress-port writes (virtual time moved by code executed).
    pub progress_exits: u64,
    /// Progress-port writes by source (kernel KCOV hook, stimulus runtime).
    pub progress: ProgressCounts,
    pub virtual_time: VirtualTime,
}

#[derive(Debug)]
pub struct RunOutcome {
    pub end: RunEnd,
    pub stats: RunStats,
    pub host_elapsed: Duration,
    pub description: VmDescription,
    pub control_events: Vec<(VirtualTime, ControlEvent)>,
    /// Where the vCPU was when a time limit ended the run (to show what it was stuck on).
    pub stopped_at: Option<CpuSnapshot>,
}

/// Why the guest could not continue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FaultKind {
    InternalError {
        suberror: u32,
        data: Vec<u64>,
    },
    FailEntry {
        reason: u64,
        cpu: u32,
    },
    /// `KVM_EXIT_SHUTDOWN` with no reset requested: a triple fault.
    TripleFault,
    /// HLT with interrupts enabled and no timer, interrupt or input that could ever wake it.
    HaltedForever {
        reason: &'static str,
    },
    UnexpectedExit(String),
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FaultKind::InternalError { suberror, data } => {
                let what = match *suberror {
                    kvm_bindings::KVM_INTERNAL_ERROR_EMULATION => {
                        "KVM could not emulate an instruction"
                    }
                    kvm_bindings::KVM_INTERNAL_ERROR_SIMUL_EX => {
                        "exception while delivering an exception"
                    }
                    kvm_bindings::KVM_INTERNAL_ERROR_DELIVERY_EV => "event delivery failed",
                    kvm_bindings::KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON => {
                        "unexpected hardware exit"
                    }
                    _ => "unknown suberror",
                };
                write!(
                    f,
                    "KVM_EXIT_INTERNAL_ERROR, suberror {suberror} ({what}), data {data:x?}"
                )
            }
            FaultKind::FailEntry { reason, cpu } => write!(
                f,
                "KVM_EXIT_FAIL_ENTRY, hardware entry failure reason {reason:#x} on host cpu {cpu}"
            ),
            FaultKind::TripleFault => {
                write!(
                    f,
                    "KVM_EXIT_SHUTDOWN without a reset request (triple fault)"
                )
            }
            FaultKind::HaltedForever { reason } => {
                write!(f, "the guest halted with interrupts enabled and {reason}")
            }
            FaultKind::UnexpectedExit(exit) => write!(f, "unexpected exit {exit}"),
        }
    }
}

/// A run that ended in a guest or KVM fault, with the vCPU state at that point.
#[derive(Debug)]
pub struct Fault {
    pub kind: FaultKind,
    pub stats: RunStats,
    pub cpu: Option<CpuSnapshot>,
    pub description: VmDescription,
    /// The last exits, injections and kicks before it, oldest first (`exit_ring`): after a
    /// triple fault the registers are the reset state, and these are all there is.
    pub last_exits: Vec<String>,
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "guest fault after {} exits at virtual time {:.6} s: {}",
            self.stats.exits,
            self.stats.virtual_time.as_nanos() as f64 / 1e9,
            self.kind
        )?;
        match &self.cpu {
            Some(cpu) => write!(f, "{cpu}")?,
            None => write!(f, "  (registers unavailable)")?,
        }
        if !self.last_exits.is_empty() {
            write!(
                f,
                "\n  last exits before it (rip as KVM reported it at each):"
            )?;
            for exit in &self.last_exits {
                write!(f, "\n    {exit}")?;
            }
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0}")]
    Fault(Box<Fault>),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("KVM_RUN failed: {0}")]
    KvmRun(kvm_ioctls::Error),
    #[error("the KVM run page reports a port-I/O buffer ({offset:#x}+{len:#x}) outside its {size:#x} bytes")]
    BadIoBuffer {
        offset: u64,
        len: usize,
        size: usize,
    },
    #[error("starting the host-time watchdog failed: {0}")]
    Watchdog(std::io::Error),
    /// Recording or replaying failed, or the replay diverged.
    #[error(transparent)]
    Rr(#[from] RrError),
    #[error("stopping the vCPU at READY failed: {0}")]
    Quiesce(crate::vstate::vcpu_state::VcpuStateError),
}

/// What one `KVM_RUN` came back with, once the run page borrow is over.
enum Step {
    /// A port-I/O exit; the data is handled from the run page afterwards.
    Pio,
    /// A synchronous exit already fully handled (MMIO, interrupt window).
    Sync,
    Halt,
    Shutdown,
    Reset,
    PowerOff,
    InternalError,
    Fault(FaultKind),
    Kick,
    /// A probe's `hlt`, handled by the mode: not part of the timeline.
    Probe,
    /// `KVM_EXIT_DEBUG`, for the mode (a debugger's single step or debug-register hit).
    Debug(kvm_bindings::kvm_debug_exit_arch),
    /// An interrupt window opened (or the step out of an `sti` shadow towards it ended); see
    /// [`Runner::window_opened`] for what it turns into.
    Window,
    /// The window opened one instruction early, in an `sti` shadow: the vCPU steps over that
    /// instruction first, and nothing is counted yet.
    InShadow,
}

/// Console input from the host, crossing threads through a channel and handed to the guest only
/// at synchronous exits.
pub type InputReceiver = Receiver<Vec<u8>>;

/// The run loop's own part of the machine: the clock, the counters, and console input taken
/// from the host but not yet given to the guest. It is part of a snapshot; a run resumes from
/// it exactly where the snapshot was taken.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RunState {
    pub clock: VirtualClock,
    pub stats: RunStats,
    pub pending_input: Vec<u8>,
}

impl RunState {
    /// The state of a VM that has not run yet.
    pub fn new(quantum_ns: u64) -> Self {
        RunState {
            clock: VirtualClock::new(quantum_ns),
            stats: RunStats::default(),
            pending_input: Vec::new(),
        }
    }
}

/// How far [`run_until`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Until {
    /// Until the guest agent reports READY (the snapshot point), with the READY exit fully
    /// handled and its instruction completed, so the whole VM can be saved.
    Ready,
    /// Until the VM ends (power off, reboot, fault, a time limit).
    End,
}

/// Where [`run_until`] stopped.
#[derive(Debug)]
pub enum Stopped {
    /// At READY; resume with [`run_until`] and this state.
    Ready(RunState),
    Ended(Box<RunOutcome>),
}

struct Runner<'a> {
    vmm: &'a mut Vmm,
    clock: VirtualClock,
    irqs: IrqLines,
    stats: RunStats,
    input: Option<InputReceiver>,
    pending_input: VecDeque<u8>,
    watchdog: Option<Watchdog>,
    stalls: StallTracker,
    virtual_limit: Option<VirtualTime>,
    stop_at_ready: bool,
    /// Record, replay, or a plain run (`rr`).
    mode: &'a mut dyn ExecMode,
    last_exit: ExitWhat,
    /// The vCPU is single-stepping out of an `sti` shadow, to where its window belongs.
    shadow_step: bool,
    /// The last exits, injections and kicks, for a fault report.
    recent: ExitRing,
}

/// Runs the VM from the start until it powers off, reboots, faults, or a time limit passes.
pub fn run(vmm: &mut Vmm, input: Option<InputReceiver>) -> Result<RunOutcome, RunError> {
    let state = RunState::new(vmm.config.quantum_ns);
    match run_until(vmm, state, input, Until::End)? {
        Stopped::Ended(outcome) => Ok(*outcome),
        Stopped::Ready(_) => unreachable!("a run until the end does not stop at READY"),
    }
}

/// Runs the VM from `state` (a new one, or where a snapshot or an earlier call left it).
/// Console input is only taken in the run until the end.
pub fn run_until(
    vmm: &mut Vmm,
    state: RunState,
    input: Option<InputReceiver>,
    until: Until,
) -> Result<Stopped, RunError> {
    run_until_with(vmm, state, input, until, &mut Plain)
}

/// [`run_until`] in an execution mode: recording or replaying (`rr`).
pub fn run_until_with(
    vmm: &mut Vmm,
    state: RunState,
    input: Option<InputReceiver>,
    until: Until,
    mode: &mut dyn ExecMode,
) -> Result<Stopped, RunError> {
    let started = Instant::now();
    let kicker = VcpuKicker::for_current_thread()?;
    let watchdog = Some(Watchdog::start(vmm.config.host_timeout(), kicker))
        .transpose()
        .map_err(RunError::Watchdog)?;
    let stop_at_ready = until == Until::Ready && !lock(&vmm.devices.control).ready_seen();
    let mut runner = Runner {
        clock: state.clock,
        virtual_limit: vmm.config.virtual_timeout(),
        vmm,
        irqs: IrqLines::new(),
        stats: state.stats,
        input,
        pending_input: state.pending_input.into(),
        watchdog,
        stalls: StallTracker::new(),
        stop_at_ready,
        mode,
        last_exit: ExitWhat::Window,
        shadow_step: false,
        recent: ExitRing::default(),
    };
    let end = runner.run_until_end();
    runner.stats.virtual_time = runner.clock.now();
    runner.stats.progress = lock(&runner.vmm.devices.progress).counts();
    drop(runner.watchdog.take());
    let stats = runner.stats;
    let vmm = runner.vmm;
    match end {
        Ok(None) => {
            vmm.vcpu
                .complete_pending_exit()
                .map_err(RunError::Quiesce)?;
            Ok(Stopped::Ready(RunState {
                clock: runner.clock,
                stats,
                pending_input: runner.pending_input.into(),
            }))
        }
        Ok(Some(end)) => Ok(Stopped::Ended(Box::new(RunOutcome {
            stopped_at: matches!(end, RunEnd::HostTimeout | RunEnd::VirtualTimeout)
                .then(|| vmm.vcpu.snapshot(&vmm.mem).ok())
                .flatten(),
            end,
            stats,
            host_elapsed: started.elapsed(),
            description: vmm.description.clone(),
            control_events: lock(&vmm.devices.control).take_events(),
        }))),
        Err(RunError::Fault(mut fault)) => {
            fault.stats = stats;
            fault.cpu = vmm.vcpu.snapshot(&vmm.mem).ok();
            Err(RunError::Fault(fault))
        }
        Err(other) => Err(other),
    }
}

impl Runner<'_> {
    fn fault(&self, kind: FaultKind) -> RunError {
        tracing::debug!(%kind, "run ends in a fault");
        RunError::Fault(Box::new(Fault {
            kind,
            stats: self.stats,
            cpu: None,
            description: self.vmm.description.clone(),
            last_exits: self.recent.list(),
        }))
    }

    /// Keeps `event` in the ring a fault report shows, with the RIP of the last exit.
    fn note(&mut self, event: RingEvent) {
        let rip = self.vmm.vcpu.exit_rip();
        self.recent
            .push(self.stats.exits, self.clock.now(), rip, event);
    }

    fn host_timed_out(&self) -> bool {
        self.watchdog.as_ref().is_some_and(Watchdog::expired)
    }

    /// Returns `None` when it stopped at READY.
    fn run_until_end(&mut self) -> Result<Option<RunEnd>, RunError> {
        loop {
            if self.stop_at_ready && lock(&self.vmm.devices.control).ready_seen() {
                return Ok(None);
            }
            if self.host_timed_out() {
                return Ok(Some(RunEnd::HostTimeout));
            }
            // A debugger's checkpoints, and its travels back to them (`rr::checkpoint`).
            if self.mode.wants_boundary(self.stats.exits) {
                let here = RunState {
                    clock: self.clock.clone(),
                    stats: self.stats,
                    pending_input: self.pending_input.iter().copied().collect(),
                };
                if let Some(back) = self.mode.boundary(self.vmm, &here)? {
                    self.clock = back.clock;
                    self.stats = back.stats;
                    self.pending_input = back.pending_input.into();
                    self.stalls = StallTracker::new();
                    if let Some(watchdog) = &self.watchdog {
                        watchdog.note_progress(self.stats.exits);
                    }
                    continue;
                }
            }
            // A replay gives the recorded landmarks where they were recorded (`rr::replay`).
            if self.mode.landmark_due(self.vmm, self.stats.exits)? {
                self.landmark()?;
                continue;
            }
            let mut step = self.enter()?;
            if matches!(step, Step::Window) {
                step = self.window_opened()?;
            }
            if matches!(step, Step::Halt) {
                step = self.probe_or_halt()?;
            }
            let end = match step {
                Step::Probe => continue,
                Step::Debug(debug) => {
                    let now = self.clock.now();
                    if self
                        .mode
                        .debug_exit(self.vmm, self.stats.exits, now, &debug)?
                    {
                        continue;
                    }
                    return Err(self.fault(FaultKind::UnexpectedExit(format!(
                        "debug exit (exception {}, pc {:#x}, dr6 {:#x})",
                        debug.exception, debug.pc, debug.dr6
                    ))));
                }
                Step::Kick => {
                    tracing::trace!(target: "rrr_vmm::timeline", exit = self.stats.exits, "kick");
                    self.stats.kicks += 1;
                    self.note(RingEvent::Kick);
                    if self.watchdog.as_ref().is_some_and(Watchdog::take_stall)
                        && self.mode.host_landmarks()
                    {
                        self.stalled()?;
                    }
                    continue;
                }
                Step::Pio if self.is_func_probe() => {
                    let now = self.clock.now();
                    if self.mode.func_probe(self.vmm, self.stats.exits, now)? {
                        continue;
                    }
                    self.stats.pio_exits += 1;
                    self.handle_pio()?;
                    self.after_sync_exit()?
                }
                Step::Pio => {
                    self.stats.pio_exits += 1;
                    self.handle_pio()?;
                    self.after_sync_exit()?
                }
                Step::Sync => self.after_sync_exit()?,
                Step::InShadow => continue,
                Step::Window => unreachable!("window_opened resolves every window"),
                Step::Halt => self.halt()?,
                Step::Shutdown => {
                    self.note(RingEvent::Shutdown);
                    if lock(&self.vmm.devices.i8042).take_reset_request() {
                        Some(RunEnd::Reboot)
                    } else {
                        return Err(self.fault(FaultKind::TripleFault));
                    }
                }
                Step::Reset => Some(RunEnd::Reboot),
                Step::PowerOff => Some(RunEnd::PowerOff),
                Step::InternalError => {
                    let run = self.vmm.vcpu.fd.get_kvm_run();
                    // SAFETY: the exit reason was KVM_EXIT_INTERNAL_ERROR, so `internal` is the
                    // union member KVM filled.
                    let internal = unsafe { run.__bindgen_anon_1.internal };
                    let n = (internal.ndata as usize).min(internal.data.len());
                    return Err(self.fault(FaultKind::InternalError {
                        suberror: internal.suberror,
                        data: internal.data[..n].to_vec(),
                    }));
                }
                Step::Fault(kind) => return Err(self.fault(kind)),
            };
            if let Some(end) = end {
                return Ok(Some(end));
            }
        }
    }

    /// One `KVM_RUN`. MMIO is dispatched here while the run page is borrowed; port I/O is
    /// dispatched afterwards because string I/O needs the element size.
    fn enter(&mut self) -> Result<Step, RunError> {
        let now = self.clock.now();
        let vmm = &mut *self.vmm;
        let step = match vmm.vcpu.fd.run() {
            Ok(VcpuExit::IoIn(..)) | Ok(VcpuExit::IoOut(..)) => Step::Pio,
            Ok(VcpuExit::MmioRead(addr, data)) => {
                tracing::trace!(target: "rrr_vmm::timeline", exit = self.stats.exits, addr, "mmio read");
                self.stats.mmio_exits += 1;
                self.last_exit = ExitWhat::Mmio { addr, write: false };
                let mut cx = DeviceContext {
                    now,
                    irqs: &mut self.irqs,
                };
                vmm.mmio.bus.read(&mut cx, addr, data);
                Step::Sync
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                tracing::trace!(target: "rrr_vmm::timeline", exit = self.stats.exits, addr, "mmio write");
                self.stats.mmio_exits += 1;
                self.last_exit = ExitWhat::Mmio { addr, write: true };
                let mut cx = DeviceContext {
                    now,
                    irqs: &mut self.irqs,
                };
                vmm.mmio.bus.write(&mut cx, addr, data);
                Step::Sync
            }
            Ok(VcpuExit::IrqWindowOpen) => Step::Window,
            Ok(VcpuExit::Hlt) => Step::Halt,
            Ok(VcpuExit::Shutdown) => Step::Shutdown,
            Ok(VcpuExit::InternalError) => Step::InternalError,
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                Step::Fault(FaultKind::FailEntry { reason, cpu })
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_RESET => Step::Reset,
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => Step::PowerOff,
                other => Step::Fault(FaultKind::UnexpectedExit(format!("system event {other}"))),
            },
            Ok(VcpuExit::Intr) => Step::Kick,
            Ok(VcpuExit::Debug(debug)) => Step::Debug(debug),
            Ok(other) => Step::Fault(FaultKind::UnexpectedExit(format!("{other:?}"))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Step::Kick,
            Err(e) => return Err(RunError::KvmRun(e)),
        };
        // A kick can come before the step out of an `sti` shadow is done; any other exit ends it
        // (an instruction that exits on its own is handled as the exit it is).
        if self.shadow_step && !matches!(step, Step::Kick) {
            self.shadow_step = false;
            self.mode.restore_guest_debug(self.vmm)?;
            if matches!(step, Step::Debug(_)) {
                return Ok(Step::Window);
            }
        }
        Ok(step)
    }

    /// An interrupt window opened: where it belongs (a synchronous exit), one instruction early
    /// behind an `sti` (a step over that instruction first), or early on the `hlt` of `sti; hlt`
    /// (the `hlt` exit it would have been). See `arch::x86_64::sti_shadow`.
    fn window_opened(&mut self) -> Result<Step, RunError> {
        let vcpu = &mut self.vmm.vcpu;
        let mut regs = vcpu.exit_regs().map_err(RunError::KvmRun)?;
        let sregs = vcpu.fd.get_sregs().map_err(RunError::KvmRun)?;
        match sti_shadow::shadowed(&regs, &sregs, &self.vmm.mem) {
            Shadowed::No => {
                tracing::trace!(target: "rrr_vmm::timeline", exit = self.stats.exits, "window");
                self.last_exit = ExitWhat::Window;
                Ok(Step::Sync)
            }
            Shadowed::Halt => {
                // KVM leaves RIP after a `hlt` it exits on. The trace, which tells its probes'
                // `hlt`s from the guest's own by that RIP, reads it from the run page.
                regs.rip += 1;
                vcpu.set_regs_now(&regs).map_err(RunError::KvmRun)?;
                self.stats.shadowed_halts += 1;
                self.note(RingEvent::ShadowedHalt);
                tracing::trace!(target: "rrr_vmm::timeline", exit = self.stats.exits, rip = regs.rip, "window on sti; hlt");
                Ok(Step::Halt)
            }
            Shadowed::Instruction => {
                tracing::trace!(target: "rrr_vmm::timeline", exit = self.stats.exits, rip = regs.rip, "window in an sti shadow: stepping");
                // With the window still requested, KVM would open it again before the step.
                vcpu.fd.get_kvm_run().request_interrupt_window = 0;
                let step = kvm_bindings::kvm_guest_debug {
                    control: kvm_bindings::KVM_GUESTDBG_ENABLE
                        | kvm_bindings::KVM_GUESTDBG_SINGLESTEP,
                    ..Default::default()
                };
                vcpu.fd.set_guest_debug(&step).map_err(RunError::KvmRun)?;
                self.shadow_step = true;
                self.stats.shadow_steps += 1;
                self.note(RingEvent::ShadowStep);
                Ok(Step::InShadow)
            }
        }
    }

    /// A `hlt` exit: a probe of the mode's (handled there, not part of the timeline), or the
    /// guest's own.
    fn probe_or_halt(&mut self) -> Result<Step, RunError> {
        let now = self.clock.now();
        if self.mode.probe_hit(self.vmm, self.stats.exits, now)? {
            return Ok(Step::Probe);
        }
        tracing::trace!(target: "rrr_vmm::timeline", exit = self.stats.exits, "hlt");
        self.last_exit = ExitWhat::Halt;
        Ok(Step::Halt)
    }

    /// Whether this port exit is a write to the stimulus's function-probe port.
    fn is_func_probe(&mut self) -> bool {
        let run = self.vmm.vcpu.fd.get_kvm_run();
        // SAFETY: the exit reason was KVM_EXIT_IO, so `io` is the union member KVM filled.
        let io = unsafe { run.__bindgen_anon_1.io };
        io.port == rrr_guest::protocol::FUNC_PROBE_PORT
            && u32::from(io.direction) == kvm_bindings::KVM_EXIT_IO_OUT
    }

    fn handle_pio(&mut self) -> Result<(), RunError> {
        let run_size = self.vmm.vm.fd.run_size();
        let now = self.clock.now();
        let run = self.vmm.vcpu.fd.get_kvm_run();
        // SAFETY: the exit reason was KVM_EXIT_IO, so `io` is the union member KVM filled.
        let io = unsafe { run.__bindgen_anon_1.io };
        let size = usize::from(io.size).max(1);
        let len = size * io.count as usize;
        let offset = io.data_offset;
        if offset
            .checked_add(len as u64)
            .map_or(true, |end| end > run_size as u64)
        {
            return Err(RunError::BadIoBuffer {
                offset,
                len,
                size: run_size,
            });
        }
        // SAFETY: the buffer lies inside the mmapped run page (checked just above), and nothing
        // else references the run page while this slice lives.
        let data = unsafe {
            std::slice::from_raw_parts_mut(
                (run as *mut kvm_bindings::kvm_run as *mut u8).add(offset as usize),
                len,
            )
        };
        let port = u64::from(io.port);
        let write = u32::from(io.direction) == kvm_bindings::KVM_EXIT_IO_OUT;
        tracing::trace!(target: "rrr_vmm::timeline", exit = self.stats.exits, port, write, len, "pio");
        self.last_exit = ExitWhat::Pio {
            port: io.port,
            write,
        };
        for element in data.chunks_mut(size) {
            let mut cx = DeviceContext {
                now,
                irqs: &mut self.irqs,
            };
            if write {
                self.vmm.pio.write(&mut cx, port, element);
            } else {
                self.vmm.pio.read(&mut cx, port, element);
            }
            self.drain_irqs();
        }
        Ok(())
    }

    /// Hands every pending line change to the PIC.
    fn drain_irqs(&mut self) {
        if self.irqs.is_empty() {
            return;
        }
        let mut pic = lock(&self.vmm.devices.pic);
        for change in self.irqs.drain() {
            pic.apply(change);
        }
    }

    fn advance_timers(&mut self) {
        let now = self.clock.now();
        lock(&self.vmm.devices.pit).advance(now, &mut self.irqs);
        self.drain_irqs();
    }

    /// Moves queued console input into the UART as far as its FIFO has room.
    fn deliver_input(&mut self) -> Result<(), RunError> {
        if self.mode.feeds_input() {
            return self.deliver_logged_input();
        }
        if let Some(rx) = &self.input {
            loop {
                match rx.try_recv() {
                    Ok(bytes) => self.pending_input.extend(bytes),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        self.input = None;
                        break;
                    }
                }
            }
        }
        if self.pending_input.is_empty() {
            return Ok(());
        }
        let mut serial = lock(&self.vmm.devices.serial);
        let room = serial.receive_room().min(self.pending_input.len());
        if room == 0 {
            return Ok(());
        }
        let chunk: Vec<u8> = self.pending_input.drain(..room).collect();
        serial.queue_input(&chunk, &mut self.irqs);
        drop(serial);
        self.drain_irqs();
        self.mode
            .input_delivered(self.stats.exits, self.clock.now(), &chunk)?;
        Ok(())
    }

    /// A replay's console input: the log's, at the exit and virtual time it was delivered.
    fn deliver_logged_input(&mut self) -> Result<(), RunError> {
        loop {
            let room = lock(&self.vmm.devices.serial).receive_room();
            let Some(chunk) = self
                .mode
                .input_due(self.stats.exits, self.clock.now(), room)?
            else {
                return Ok(());
            };
            lock(&self.vmm.devices.serial).queue_input(&chunk, &mut self.irqs);
            self.drain_irqs();
        }
    }

    /// The guest ran a stall period without a synchronous exit (see `watchdog`); `stall`
    /// decides whether it waits for time to pass.
    fn stalled(&mut self) -> Result<(), RunError> {
        let sample = self.vmm.vcpu.stall_sample().map_err(RunError::Vcpu)?;
        let verdict = self.stalls.observe(self.stats.exits, sample);
        if let Some(watchdog) = &self.watchdog {
            watchdog.set_hurry(matches!(verdict, Verdict::Landmark(_)));
        }
        match verdict {
            Verdict::Wait => {
                tracing::trace!(target: "rrr_vmm::timeline", exit = self.stats.exits, "stall sample");
                Ok(())
            }
            Verdict::Landmark(cause) => {
                tracing::debug!(
                    ?cause,
                    rip = format_args!("{:#x}", sample.rip),
                    exits = self.stats.exits,
                    "stall landmark"
                );
                self.stats.landmark_kinds.count(cause);
                self.mode.landmark(self.vmm, self.stats.exits, cause)?;
                self.landmark()
            }
        }
    }

    /// Lets the next timer fire, as it would have on hardware, and injects where the vCPU
    /// stands.
    fn landmark(&mut self) -> Result<(), RunError> {
        self.stats.landmarks += 1;
        self.note(RingEvent::Landmark);
        if let Some(deadline) = lock(&self.vmm.devices.pit).next_deadline() {
            self.clock.advance_to(deadline);
        }
        self.advance_timers();
        self.deliver_input()?;
        self.inject_or_request_window()
    }

    /// Bookkeeping shared by every synchronous exit: the clock, timers, input, resets, limits,
    /// and interrupt injection. Returns an end of the run if one was reached.
    fn after_sync_exit(&mut self) -> Result<Option<RunEnd>, RunError> {
        self.stats.exits += 1;
        if let Some(watchdog) = &self.watchdog {
            watchdog.note_progress(self.stats.exits);
        }
        match lock(&self.vmm.devices.progress).take_elapsed() {
            Some(ns) => {
                self.stats.progress_exits += 1;
                self.clock.advance_by(ns);
            }
            None => {
                self.clock.tick();
            }
        }
        self.note(RingEvent::Exit(self.last_exit));
        self.mode
            .after_exit(self.vmm, self.stats.exits, self.clock.now(), self.last_exit)?;
        if lock(&self.vmm.devices.i8042).take_reset_request() {
            return Ok(Some(RunEnd::Reboot));
        }
        if self
            .virtual_limit
            .is_some_and(|limit| self.clock.now() >= limit)
        {
            return Ok(Some(RunEnd::VirtualTimeout));
        }
        self.advance_timers();
        self.deliver_input()?;
        self.inject_or_request_window()?;
        Ok(None)
    }

    /// Injects the PIC's interrupt if the vCPU can take one now; otherwise asks KVM to exit as
    /// soon as it can.
    fn inject_or_request_window(&mut self) -> Result<(), RunError> {
        let pending = lock(&self.vmm.devices.pic).interrupt_pending();
        let run = self.vmm.vcpu.fd.get_kvm_run();
        if !pending {
            run.request_interrupt_window = 0;
            return Ok(());
        }
        if run.ready_for_interrupt_injection == 0 || run.if_flag == 0 {
            run.request_interrupt_window = 1;
            return Ok(());
        }
        let vector = lock(&self.vmm.devices.pic).acknowledge();
        if let Some(vector) = vector {
            if tracing::enabled!(target: "rrr_vmm::timeline", tracing::Level::TRACE) {
                let rip = self.vmm.vcpu.exit_rip().unwrap_or(0);
                tracing::trace!(target: "rrr_vmm::timeline", exit = self.stats.exits, vector, rip, "inject");
            }
            self.vmm.vcpu.inject(vector)?;
            self.stats.injections += 1;
            self.note(RingEvent::Inject { vector });
        }
        let more = lock(&self.vmm.devices.pic).interrupt_pending();
        self.vmm.vcpu.fd.get_kvm_run().request_interrupt_window = u8::from(more);
        Ok(())
    }

    /// HLT: with interrupts off the guest has stopped for good (Linux's halt and power-off end
    /// in `cli; hlt`); with interrupts on, virtual time jumps to the next timer deadline.
    fn halt(&mut self) -> Result<Option<RunEnd>, RunError> {
        self.stats.halts += 1;
        let interrupts_on = self.vmm.vcpu.fd.get_kvm_run().if_flag != 0;
        self.stats.exits += 1;
        if let Some(watchdog) = &self.watchdog {
            watchdog.note_progress(self.stats.exits);
        }
        self.clock.tick();
        self.note(RingEvent::Exit(self.last_exit));
        self.mode
            .after_exit(self.vmm, self.stats.exits, self.clock.now(), self.last_exit)?;
        if !interrupts_on {
            return Ok(Some(RunEnd::PowerOff));
        }
        self.advance_timers();
        self.deliver_input()?;
        let mut jumps = 0u32;
        while !lock(&self.vmm.devices.pic).interrupt_pending() {
            if self.host_timed_out() {
                return Ok(Some(RunEnd::HostTimeout));
            }
            let deadline = lock(&self.vmm.devices.pit).next_deadline();
            match deadline {
                Some(deadline) if jumps < MAX_IDLE_JUMPS => {
                    if self.virtual_limit.is_some_and(|limit| deadline >= limit) {
                        self.clock
                            .advance_to(self.virtual_limit.unwrap_or(deadline));
                        return Ok(Some(RunEnd::VirtualTimeout));
                    }
                    self.clock.advance_to(deadline);
                    self.advance_timers();
                    jumps += 1;
                }
                _ => {
                    let reason = if jumps >= MAX_IDLE_JUMPS {
                        "its timer interrupt masked"
                    } else {
                        "no timer armed"
                    };
                    if !self.wait_for_input(reason)? {
                        return Ok(Some(RunEnd::HostTimeout));
                    }
                    jumps = 0;
                }
            }
            self.deliver_input()?;
        }
        self.inject_or_request_window()?;
        Ok(None)
    }

    /// Blocks until host console input arrives. Returns false if the host timeout passed first;
    /// fails if no input can ever come.
    fn wait_for_input(&mut self, reason: &'static str) -> Result<bool, RunError> {
        // Input reaches the guest only while its UART receives; otherwise none can wake it.
        let receiving = lock(&self.vmm.devices.serial).receive_room() > 0;
        if self.mode.feeds_input()
            && self
                .mode
                .input_pending_at(self.stats.exits, self.clock.now())
        {
            return Ok(true);
        }
        if receiving && !self.pending_input.is_empty() {
            return Ok(true);
        }
        let rx = self.input.as_ref().filter(|_| receiving);
        let Some(rx) = rx else {
            let timer_armed = reason != "no timer armed";
            return Err(self.fault(FaultKind::HaltedForever {
                reason: match (
                    timer_armed,
                    self.input.is_some() || !self.pending_input.is_empty(),
                ) {
                    (false, false) => "no timer armed and no console input to wait for",
                    (true, false) => "its timer interrupt masked and no console input to wait for",
                    (false, true) => "no timer armed and its UART not receiving console input",
                    (true, true) => {
                        "its timer interrupt masked and its UART not receiving console input"
                    }
                },
            }));
        };
        loop {
            match rx.recv_timeout(INPUT_POLL) {
                Ok(bytes) => {
                    self.pending_input.extend(bytes);
                    return Ok(true);
                }
                Err(RecvTimeoutError::Timeout) => {
                    if self.host_timed_out() {
                        return Ok(false);
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    self.input = None;
                    return self.wait_for_input(reason);
                }
            }
        }
    }
}
