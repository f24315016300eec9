//! The debugger's state machine around gdbstub's. The vCPU thread drives everything: when the
//! guest stops (READY, a breakpoint's `hlt`, a single step or debug-register hit, a Ctrl-C
//! noticed at a synchronous exit), the session reports the stop and serves gdb's requests on
//! the same thread until gdb resumes; then it sets the vCPU up for what gdb asked and returns to
//! the run loop. Nothing runs concurrently with the guest, so gdb always sees a stopped vCPU.
//!
//! Resuming from a software breakpoint executes the instruction under it: the byte is lifted,
//! the vCPU single-steps (`KVM_GUESTDBG_SINGLESTEP`), the byte goes back. None of these exits is
//! one of the VM's synchronous exits, so the replay keeps the recording's timeline.

use std::collections::VecDeque;

use gdbstub::common::Signal;
use gdbstub::stub::state_machine::GdbStubStateMachine;
use gdbstub::stub::{DisconnectReason, GdbStub, SingleThreadStopReason};
use rrr_vmm::builder::Vmm;
use rrr_vmm::rr::RrError;

use super::conn::{Conn, Endpoint};
use super::target::{DebugTarget, Resume};

type Machine = GdbStubStateMachine<'static, DebugTarget, Conn>;
type Stop = SingleThreadStopReason<u64>;

/// Synchronous exits between two looks for a Ctrl-C from gdb (a `poll`, about a microsecond;
/// an exit costs tens).
const INTERRUPT_POLL: u64 = 16;

/// DR6: B0-B3 (which debug register hit) and BS (single step).
const DR6_HITS: u64 = 0xf;

fn err(what: impl std::fmt::Display) -> RrError {
    RrError::Debugger(what.to_string())
}

pub struct Debugger {
    endpoint: Endpoint,
    /// What to tell the user once gdb may connect.
    pub banner: String,
    target: Option<DebugTarget>,
    gdb: Option<Machine>,
    /// Bytes read from gdb not yet fed to the state machine.
    pending: VecDeque<u8>,
    /// The breakpoint the vCPU is executing the instruction of, and what gdb asked for.
    stepping_over: Option<(u64, Resume)>,
    /// gdb asked for one instruction.
    stepping: bool,
    /// gdb went away: the replay runs on without it.
    gone: bool,
}

impl Debugger {
    pub fn new(endpoint: Endpoint, banner: String) -> Self {
        Debugger {
            endpoint,
            banner,
            target: None,
            gdb: None,
            pending: VecDeque::new(),
            stepping_over: None,
            stepping: false,
            gone: false,
        }
    }

    fn active(&self) -> bool {
        self.gdb.is_some() && !self.gone
    }

    /// At READY: waits for gdb and serves it until it resumes the guest.
    pub fn attach(&mut self, vmm: &Vmm) -> Result<(), RrError> {
        eprintln!("{}", self.banner);
        let conn = self.endpoint.accept().map_err(err)?;
        let mut target = DebugTarget::new(vmm);
        let gdb = GdbStub::new(conn)
            .run_state_machine(&mut target)
            .map_err(err)?;
        eprintln!("rrr: gdb attached; the replay stands at READY");
        self.target = Some(target);
        self.gdb = Some(gdb);
        self.serve(vmm)
    }

    /// Reports a stop and serves gdb until it resumes the guest.
    fn stop(&mut self, vmm: &Vmm, reason: Stop) -> Result<(), RrError> {
        let target = self.target.as_mut().expect("attached");
        target.load(vmm).map_err(RrError::Vcpu)?;
        self.gdb = match self.gdb.take() {
            Some(GdbStubStateMachine::Running(gdb)) => {
                Some(gdb.report_stop(target, reason).map_err(err)?)
            }
            other => other,
        };
        self.serve(vmm)
    }

    /// Feeds gdb's bytes to the state machine while the guest stands still; returns once gdb
    /// resumed it (or went away), with the vCPU set up for that.
    fn serve(&mut self, vmm: &Vmm) -> Result<(), RrError> {
        let target = self.target.as_mut().expect("attached");
        target.load(vmm).map_err(RrError::Vcpu)?;
        target.resume = None;
        let mut gdb = self.gdb.take().expect("attached");
        let mut buf = [0u8; 4096];
        let gone = loop {
            gdb = match gdb {
                GdbStubStateMachine::Idle(mut idle) => {
                    if self.pending.is_empty() {
                        let n = idle.borrow_conn().read_some(&mut buf).map_err(err)?;
                        if n == 0 {
                            break Some("gdb closed the connection");
                        }
                        self.pending.extend(&buf[..n]);
                    }
                    let byte = self.pending.pop_front().expect("filled above");
                    idle.incoming_data(target, byte).map_err(err)?
                }
                GdbStubStateMachine::Running(running) => {
                    self.gdb = Some(GdbStubStateMachine::Running(running));
                    break None;
                }
                GdbStubStateMachine::CtrlCInterrupt(ctrlc) => ctrlc
                    .interrupt_handled(target, Some(Stop::Signal(Signal::SIGINT)))
                    .map_err(err)?,
                GdbStubStateMachine::Disconnected(gone) => {
                    break Some(match gone.get_reason() {
                        DisconnectReason::Kill => "gdb killed the target",
                        _ => "gdb detached",
                    });
                }
            };
        };
        match gone {
            Some(why) => self.go_away(vmm, why),
            None => self.resume(vmm),
        }
    }

    /// gdb is gone: every breakpoint and debug register goes, and the replay runs on to its end
    /// and its checks.
    fn go_away(&mut self, vmm: &Vmm, why: &str) -> Result<(), RrError> {
        eprintln!("rrr: {why}: the replay runs on to its end without the debugger");
        if let Some(target) = &mut self.target {
            target.lift();
            target.breakpoints.clear();
            target.slots = [None; 4];
        }
        self.gone = true;
        self.stepping = false;
        self.stepping_over = None;
        vmm.vcpu
            .fd
            .set_guest_debug(&Default::default())
            .map_err(RrError::Vcpu)
    }

    /// Sets the vCPU up for what gdb asked: off a breakpoint first (lift it, one step), then a
    /// single step or a run with the debug registers gdb wants.
    fn resume(&mut self, vmm: &Vmm) -> Result<(), RrError> {
        let target = self.target.as_ref().expect("attached");
        let action = target.resume.unwrap_or(Resume::Continue);
        let rip = vmm.vcpu.fd.get_regs().map_err(RrError::Vcpu)?.rip;
        let on_breakpoint = target.breakpoints.contains_key(&rip)
            || target
                .slots
                .iter()
                .flatten()
                .any(|s| s.watch.is_none() && s.addr == rip);
        let debug = if on_breakpoint {
            target.set_planted(rip, false);
            self.stepping_over = Some((rip, action));
            target.guest_debug(true, Some(rip))
        } else {
            self.stepping = action == Resume::Step;
            target.guest_debug(self.stepping, None)
        };
        vmm.vcpu.fd.set_guest_debug(&debug).map_err(RrError::Vcpu)
    }

    /// The debug registers and single-step flag the session wants now (after the replayer's
    /// landmark search used its own).
    fn restore_guest_debug(&self, vmm: &Vmm) -> Result<(), RrError> {
        let Some(target) = &self.target else {
            return Ok(());
        };
        let debug = match self.stepping_over {
            Some((at, _)) => target.guest_debug(true, Some(at)),
            None => target.guest_debug(self.stepping, None),
        };
        vmm.vcpu.fd.set_guest_debug(&debug).map_err(RrError::Vcpu)
    }

    /// A guest `hlt` exit: whether it was one of gdb's breakpoints (then the stop is reported
    /// with RIP on the breakpoint, and gdb has been served).
    pub fn probe_hit(&mut self, vmm: &Vmm) -> Result<bool, RrError> {
        if !self.active() {
            return Ok(false);
        }
        let target = self.target.as_ref().expect("attached");
        if target.breakpoints.is_empty() {
            return Ok(false);
        }
        let mut regs = vmm.vcpu.fd.get_regs().map_err(RrError::Vcpu)?;
        // KVM reports a `hlt` exit with RIP past the one-byte instruction.
        let at = regs.rip.wrapping_sub(1);
        if !target.breakpoints.contains_key(&at) {
            return Ok(false);
        }
        regs.rip = at;
        vmm.vcpu.fd.set_regs(&regs).map_err(RrError::Vcpu)?;
        self.stepping = false;
        self.stop(vmm, Stop::SwBreak(()))?;
        Ok(true)
    }

    /// A `KVM_EXIT_DEBUG`: the end of a step off a breakpoint, of gdb's single step, or a
    /// debug-register hit.
    pub fn debug_exit(
        &mut self,
        vmm: &Vmm,
        debug: &kvm_bindings::kvm_debug_exit_arch,
    ) -> Result<bool, RrError> {
        if !self.active() {
            return Ok(false);
        }
        let target = self.target.as_ref().expect("attached");
        let hit = (0..4).find(|i| debug.dr6 & DR6_HITS & (1 << i) != 0);
        let mut reason = None;
        if let Some((at, action)) = self.stepping_over.take() {
            target.set_planted(at, true);
            if action == Resume::Step {
                reason = Some(Stop::DoneStep);
            }
        } else if self.stepping {
            self.stepping = false;
            reason = Some(Stop::DoneStep);
        }
        if let Some(slot) = hit.and_then(|i| target.slots[i]) {
            reason = Some(match slot.watch {
                None => Stop::HwBreak(()),
                Some(kind) => Stop::Watch {
                    tid: (),
                    kind,
                    addr: slot.addr,
                },
            });
        }
        match reason {
            Some(reason) => self.stop(vmm, reason)?,
            // Off the breakpoint; the guest runs on with gdb's debug registers.
            None => self.restore_guest_debug(vmm)?,
        }
        Ok(true)
    }

    /// At a synchronous exit: a Ctrl-C from gdb stops the guest here.
    pub fn after_exit(&mut self, vmm: &Vmm, exits: u64) -> Result<(), RrError> {
        if !self.active() || exits % INTERRUPT_POLL != 0 || self.stepping_over.is_some() {
            return Ok(());
        }
        let Some(GdbStubStateMachine::Running(running)) = &mut self.gdb else {
            return Ok(());
        };
        if !running.borrow_conn().readable() {
            return Ok(());
        }
        let mut buf = [0u8; 256];
        let n = running.borrow_conn().read_some(&mut buf).map_err(err)?;
        if n == 0 {
            return self.go_away(vmm, "gdb closed the connection");
        }
        self.pending.extend(&buf[..n]);
        let target = self.target.as_mut().expect("attached");
        target.load(vmm).map_err(RrError::Vcpu)?;
        let mut gdb = self.gdb.take().expect("attached");
        while let GdbStubStateMachine::Running(running) = gdb {
            let Some(byte) = self.pending.pop_front() else {
                gdb = GdbStubStateMachine::Running(running);
                break;
            };
            gdb = running.incoming_data(target, byte).map_err(err)?;
        }
        self.gdb = Some(match gdb {
            GdbStubStateMachine::CtrlCInterrupt(ctrlc) => {
                self.stepping = false;
                ctrlc
                    .interrupt_handled(target, Some(Stop::Signal(Signal::SIGINT)))
                    .map_err(err)?
            }
            other => other,
        });
        match self.gdb {
            Some(GdbStubStateMachine::Running(_)) => Ok(()),
            _ => self.serve(vmm),
        }
    }

    /// The guest's memory is its own again (a landmark search, the final state hash).
    pub fn lift(&self) {
        if let Some(target) = &self.target {
            target.lift();
        }
    }

    /// After a landmark search: the breakpoints and debug registers back.
    pub fn replant(&self, vmm: &Vmm) -> Result<(), RrError> {
        if !self.active() {
            return Ok(());
        }
        let target = self.target.as_ref().expect("attached");
        target.replant();
        if let Some((at, _)) = self.stepping_over {
            target.set_planted(at, false);
        }
        self.restore_guest_debug(vmm)
    }

    /// The replay ended: gdb hears that the process exited, with 0 if the replay matched the
    /// recording.
    pub fn ended(&mut self, code: u8) {
        if !self.active() {
            return;
        }
        if let (Some(GdbStubStateMachine::Running(gdb)), Some(target)) =
            (self.gdb.take(), self.target.as_mut())
        {
            let _ = gdb.report_stop(target, Stop::Exited(code));
        }
        self.gone = true;
    }
}
