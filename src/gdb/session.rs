//! The debugger's state machine around gdbstub's. The vCPU thread drives everything: when the
//! guest stops (READY, a breakpoint's `hlt`, a single step or debug-register hit, a Ctrl-C
//! noticed at a synchronous exit), the session reports the stop and serves gdb's requests on
//! the same thread until gdb resumes; then it sets the vCPU up for what gdb asked and returns to
//! the run loop. Nothing runs concurrently with the guest, so gdb always sees a stopped vCPU.
//!
//! Resuming from a software breakpoint executes the instruction under it: the byte is lifted,
//! the vCPU single-steps (`KVM_GUESTDBG_SINGLESTEP`), the byte goes back. None of these exits is
//! one of the VM's synchronous exits, so the replay keeps the recording's timeline.

use std::collections::{HashMap, HashSet, VecDeque};

use gdbstub::common::Signal;
use gdbstub::stub::state_machine::GdbStubStateMachine;
use gdbstub::stub::{DisconnectReason, GdbStub, SingleThreadStopReason};
use gdbstub::target::ext::base::reverse_exec::ReplayLogPosition;
use gdbstub::target::ext::breakpoints::WatchKind;
use rrr_vmm::builder::Vmm;
use rrr_vmm::rr::log::RegState;
use rrr_vmm::rr::{reg_state, RrError};

use super::conn::{Conn, Endpoint};
use super::target::{DebugTarget, Resume, Special};
use super::travel::{Position, StepWant, Task, Why};

type Machine = GdbStubStateMachine<'static, DebugTarget, Conn>;
type Stop = SingleThreadStopReason<u64>;

/// Synchronous exits between two looks for a Ctrl-C from gdb (a `poll`, about a microsecond;
/// an exit costs tens).
const INTERRUPT_POLL: u64 = 16;

/// gdb's packet for `monitor when` (the command in hex).
const WHEN: &[u8] = b"$qRcmd,7768656e#";
/// The start of gdb's packet for `monitor goto ...`.
const GOTO: &[u8] = b"$qRcmd,676f746f20";

/// The position of a whole `monitor goto POSITION` packet at the head of `pending`.
fn deferred_goto(pending: &VecDeque<u8>) -> Option<Position> {
    if !pending
        .iter()
        .copied()
        .take(GOTO.len())
        .eq(GOTO.iter().copied())
    {
        return None;
    }
    let hex: Vec<u8> = pending
        .iter()
        .copied()
        .skip(GOTO.len())
        .take_while(|&b| b != b'#')
        .collect();
    if pending.len() <= GOTO.len() + hex.len() {
        return None;
    }
    let text: Vec<u8> = hex
        .chunks(2)
        .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok())
        .collect::<Option<_>>()?;
    String::from_utf8(text).ok()?.parse().ok()
}

/// RFLAGS.TF.
const TRAP_FLAG: u64 = 0x100;

/// DR6: B0-B3 (which debug register hit) and BS (single step).
const DR6_HITS: u64 = 0xf;

/// A forward continue with watchpoints by value: the exit count, position and registers it
/// started from, and the watched bytes then.
type Watching = (u64, Option<Position>, Option<RegState>, Vec<u8>);

/// The kernel's system call entry point (MSR_LSTAR).
fn lstar(vmm: &Vmm) -> Result<u64, RrError> {
    const MSR_LSTAR: u32 = 0xc000_0082;
    let mut msrs = kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
        index: MSR_LSTAR,
        ..Default::default()
    }])
    .map_err(err)?;
    vmm.vcpu.fd.get_msrs(&mut msrs).map_err(RrError::Vcpu)?;
    Ok(msrs.as_slice()[0].data)
}

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
    /// READY's exit count: the beginning of the replay.
    start: u64,
    /// The exit count of the last synchronous exit (or of READY).
    exits: u64,
    /// Arrivals since that exit at the addresses in `counted`: those where a `hlt` of the
    /// debugger's stood every time the guest ran since that exit (or every address, in a pass
    /// of single steps).
    hits: HashMap<u64, u64>,
    counted: HashSet<u64>,
    all_arrivals: bool,
    /// Where the replay stands, when known.
    pos: Option<Position>,
    /// A travel in progress (reverse execution, `monitor goto`, a watchpoint by value).
    task: Option<Task>,
    /// A forward continue with watchpoints by value: where it started (its exit count and
    /// registers) and the watched bytes at the last exit.
    watching: Option<Watching>,
    /// The run loop is to put the READY checkpoint back.
    pub rewind: bool,
    /// Checkpoint restores so far.
    pub rewinds: u64,
    /// The exit count the restored checkpoint must be at or before.
    pub rewind_to: u64,
    /// The checkpoints' exit counts, oldest first.
    pub checkpoints: Vec<u64>,
    /// The registers at the last stop.
    here_regs: Option<RegState>,
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
            start: 0,
            exits: 0,
            hits: HashMap::new(),
            counted: HashSet::new(),
            all_arrivals: false,
            pos: None,
            task: None,
            watching: None,
            rewind: false,
            rewinds: 0,
            rewind_to: 0,
            checkpoints: Vec::new(),
            here_regs: None,
        }
    }

    fn active(&self) -> bool {
        self.gdb.is_some() && !self.gone
    }

    /// At READY: waits for gdb and serves it until it resumes the guest.
    pub fn attach(&mut self, vmm: &Vmm, exits: u64) -> Result<(), RrError> {
        eprintln!("{}", self.banner);
        let conn = self.endpoint.accept().map_err(err)?;
        let mut target = DebugTarget::new(vmm);
        self.start = exits;
        self.exits = exits;
        let rip = vmm.vcpu.fd.get_regs().map_err(RrError::Vcpu)?.rip;
        self.pos = Some(Position::boundary(exits, rip));
        self.here_regs = Some(reg_state(vmm)?);
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
        self.note_stop(vmm)?;
        self.watching = None;
        let target = self.target.as_mut().expect("attached");
        target.pos = self.pos;
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
        target.pos = self.pos;
        let mut gdb = self.gdb.take().expect("attached");
        let mut buf = [0u8; 4096];
        let gone = loop {
            gdb = match gdb {
                GdbStubStateMachine::Idle(idle) if target.goto.is_some() => {
                    // `monitor goto` was answered: gdb waits for its next command meanwhile.
                    let to = target.goto.take().expect("checked");
                    self.gdb = Some(GdbStubStateMachine::Idle(idle));
                    self.travel(vmm, to, Why::Goto)?;
                    return Ok(());
                }
                GdbStubStateMachine::Idle(idle)
                    if !target.arrived && deferred_goto(&self.pending).is_some() =>
                {
                    // `monitor goto`: the travel comes first, the answer after it (gdb waits
                    // for a monitor command's answer as long as it takes, and sends nothing
                    // meanwhile).
                    let to = deferred_goto(&self.pending).expect("checked");
                    self.gdb = Some(GdbStubStateMachine::Idle(idle));
                    self.travel(vmm, to, Why::Goto)?;
                    return Ok(());
                }
                GdbStubStateMachine::Idle(idle)
                    if self.pos.is_none()
                        && self.here_regs.is_some()
                        && self
                            .pending
                            .iter()
                            .copied()
                            .take(WHEN.len())
                            .eq(WHEN.iter().copied()) =>
                {
                    // `monitor when` where the position is not known: found first, then the
                    // packet is answered.
                    self.gdb = Some(GdbStubStateMachine::Idle(idle));
                    return self.locate(vmm, None);
                }
                GdbStubStateMachine::Idle(mut idle) => {
                    if self.pending.is_empty() {
                        let n = idle.borrow_conn().read_some(&mut buf).map_err(err)?;
                        if n == 0 {
                            break Some("gdb closed the connection");
                        }
                        self.pending.extend(&buf[..n]);
                        // A whole packet may be looked at before it is fed (`monitor when`).
                        GdbStubStateMachine::Idle(idle)
                    } else {
                        let byte = self.pending.pop_front().expect("not empty");
                        idle.incoming_data(target, byte).map_err(err)?
                    }
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
            target.watches.clear();
            target.clear_marker();
        }
        self.task = None;
        self.watching = None;
        self.all_arrivals = false;
        self.gone = true;
        self.stepping = false;
        self.stepping_over = None;
        vmm.vcpu
            .fd
            .set_guest_debug(&Default::default())
            .map_err(RrError::Vcpu)
    }

    /// Sets the vCPU up for what gdb asked: off a breakpoint first (lift it, one step), then a
    /// single step or a run with the debug registers gdb wants; or a travel backwards.
    fn resume(&mut self, vmm: &Vmm) -> Result<(), RrError> {
        let target = self.target.as_ref().expect("attached");
        let action = target.resume.unwrap_or(Resume::Continue);
        if matches!(action, Resume::ReverseCont | Resume::ReverseStep) {
            return self.reverse(vmm, action);
        }
        let rip = vmm.vcpu.fd.get_regs().map_err(RrError::Vcpu)?.rip;
        if action == Resume::Continue {
            // Arrivals are counted only where a `hlt` stays for the whole run.
            self.counted.retain(|&a| target.planted_at(a));
            self.watching = (!target.watches.is_empty())
                .then(|| (self.exits, self.pos, self.here_regs, target.watch_values()));
        }
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

    /// reverse-continue and reverse-step: both replay from the checkpoint.
    fn reverse(&mut self, vmm: &Vmm, action: Resume) -> Result<(), RrError> {
        let Some(here) = self.pos else {
            return self.locate(vmm, Some(action));
        };
        if here.exits == self.start && here.hits == 0 && here.steps == 0 {
            return self.stop(
                vmm,
                Stop::ReplayLog {
                    tid: None,
                    pos: ReplayLogPosition::Begin,
                },
            );
        }
        let target = self.target.as_ref().expect("attached");
        let task = match action {
            Resume::ReverseStep if here.steps > 0 => Task::Goto {
                to: Position {
                    steps: here.steps - 1,
                    ..here
                },
                why: Why::Step,
                steps_left: None,
            },
            Resume::ReverseStep => {
                let (interval, until) = if here.hits == 0 {
                    (here.exits - 1, None)
                } else {
                    (here.exits, Some(here))
                };
                Task::Steps {
                    interval,
                    want: StepWant::Previous,
                    until,
                    from: None,
                    started: false,
                    last_arrival: None,
                    event: None,
                    values: Vec::new(),
                }
            }
            _ => Task::Scan {
                from: self.checkpoint_before(here.exits),
                until: Position { steps: 0, ..here },
                last_hit: None,
                last_change: None,
                values: target.watch_values(),
            },
        };
        self.begin(vmm, task)
    }

    /// Whether a checkpoint may be taken now: not in the middle of single steps (which may
    /// leave the trap flag where the guest saves its flags).
    pub fn may_checkpoint(&self) -> bool {
        !self.stepping && self.stepping_over.is_none() && !self.all_arrivals
    }

    /// The latest checkpoint at or before exit `exits`.
    fn checkpoint_before(&self, exits: u64) -> u64 {
        self.checkpoints
            .iter()
            .copied()
            .filter(|&c| c <= exits)
            .max()
            .unwrap_or(self.start)
    }

    /// Finds where the replay stands by going there again from the checkpoint, then goes on
    /// with `then`.
    fn locate(&mut self, vmm: &Vmm, then: Option<Resume>) -> Result<(), RrError> {
        let Some(regs) = self.here_regs else {
            eprintln!("rrr: gdb: this stop's registers were not kept: no position");
            return self.stop(vmm, Stop::Signal(Signal::SIGTRAP));
        };
        let exits = self.exits;
        self.begin(
            vmm,
            Task::Locate {
                exits,
                regs: Box::new(regs),
                then,
            },
        )
    }

    /// Starts a travel from the checkpoint.
    fn begin(&mut self, vmm: &Vmm, task: Task) -> Result<(), RrError> {
        self.rewind_to = task.starts_at();
        self.task = Some(task);
        self.watching = None;
        self.stepping = false;
        self.stepping_over = None;
        self.rewind = true;
        vmm.vcpu
            .fd
            .set_guest_debug(&Default::default())
            .map_err(RrError::Vcpu)
    }

    fn travel(&mut self, vmm: &Vmm, to: Position, why: Why) -> Result<(), RrError> {
        self.begin(
            vmm,
            Task::Goto {
                to,
                why,
                steps_left: None,
            },
        )
    }

    /// The checkpoint was put back (the replay stands at exit `exits` again): the travel's
    /// breakpoints go in, and it starts.
    pub fn rewound(&mut self, vmm: &Vmm, exits: u64) -> Result<(), RrError> {
        self.rewind = false;
        self.rewinds += 1;
        self.stepping = false;
        self.stepping_over = None;
        self.all_arrivals = false;
        let target = self.target.as_mut().expect("attached");
        target.load(vmm).map_err(RrError::Vcpu)?;
        // The debugger's bytes were lifted before the restore.
        target.marker = None;
        target.user_planted = matches!(self.task, Some(Task::Scan { .. }));
        target.replant();
        if let Some(Task::Scan { values, .. }) = &mut self.task {
            *values = target.watch_values();
        }
        self.exits = exits;
        self.hits.clear();
        self.counted = target.planted().into_iter().collect();
        self.exit_reached(vmm, exits)?;
        self.restore_guest_debug(vmm)
    }

    /// A travel's business at exit `exits` (or at the checkpoint it started from).
    fn exit_reached(&mut self, vmm: &Vmm, exits: u64) -> Result<(), RrError> {
        let target = self.target.as_mut().expect("attached");
        match &mut self.task {
            None => {}
            Some(Task::Goto {
                to,
                why,
                steps_left,
            }) => {
                if to.exits == exits {
                    if to.hits == 0 {
                        if to.steps == 0 {
                            let why = *why;
                            let rip = vmm.vcpu.fd.get_regs().map_err(RrError::Vcpu)?.rip;
                            self.pos = Some(Position::boundary(exits, rip));
                            return self.arrive(vmm, why);
                        }
                        *steps_left = Some(to.steps);
                        self.stepping = true;
                    } else {
                        target.load(vmm).map_err(RrError::Vcpu)?;
                        if !target.plant_marker(to.rip) {
                            eprintln!(
                                "rrr: gdb: {:#x} is not mapped at exit {exits}: no such position",
                                to.rip
                            );
                            return self.arrive(vmm, Why::Begin);
                        }
                        self.counted.insert(to.rip);
                    }
                } else if to.exits < exits && steps_left.is_none() {
                    eprintln!(
                        "rrr: gdb: exit {} passed without reaching {to}: no such position",
                        to.exits
                    );
                    let why = *why;
                    return self.arrive(vmm, why);
                }
            }
            Some(Task::Locate {
                exits: at, regs, ..
            }) => {
                if *at == exits {
                    target.load(vmm).map_err(RrError::Vcpu)?;
                    target.plant_marker(regs.rip());
                    self.counted.insert(regs.rip());
                } else if *at < exits {
                    eprintln!(
                        "rrr: gdb: the stop at {:#x} was not found again after exit {at}",
                        regs.rip()
                    );
                    return self.arrive(vmm, Why::Begin);
                }
            }
            Some(Task::Scan {
                until,
                last_change,
                values,
                ..
            }) => {
                let now = target.watch_values();
                if now != *values {
                    *last_change = Some(exits - 1);
                }
                *values = now;
                if until.exits == exits {
                    if until.hits == 0 {
                        return self.scanned(vmm);
                    }
                    target.load(vmm).map_err(RrError::Vcpu)?;
                    target.plant_marker(until.rip);
                    self.counted.insert(until.rip);
                }
            }
            Some(Task::Steps {
                interval,
                want,
                started,
                event,
                values,
                last_arrival,
                ..
            }) => {
                if !*started && exits == *interval {
                    *started = true;
                    let rip = vmm.vcpu.fd.get_regs().map_err(RrError::Vcpu)?.rip;
                    *last_arrival = Some(Position::boundary(exits, rip));
                    *values = target.watch_values();
                    self.all_arrivals = true;
                    self.stepping = true;
                } else if *started {
                    // The interval ended; a value changed by the exit itself (a device's write)
                    // is an event there.
                    let now = target.watch_values();
                    if let Some(addr) = target.changed_watch(values, &now) {
                        if *want == StepWant::FirstChange {
                            let rip = vmm.vcpu.fd.get_regs().map_err(RrError::Vcpu)?.rip;
                            let at = Position::boundary(exits, rip);
                            return self.travel(vmm, at, Why::Watch(addr));
                        }
                        // Backwards: on the instruction whose exit wrote it.
                        *event = last_arrival.map(|writer| (writer, Why::Watch(addr)));
                    }
                    return self.stepped_through(vmm);
                }
            }
        }
        Ok(())
    }

    /// reverse-continue's first pass reached where it started: off to the last hit, or the
    /// interval of the last change of a watched value, whichever came later.
    fn scanned(&mut self, vmm: &Vmm) -> Result<(), RrError> {
        let target = self.target.as_ref().expect("attached");
        let Some(Task::Scan {
            from,
            until,
            last_hit,
            mut last_change,
            values,
        }) = self.task.take()
        else {
            unreachable!("scanning");
        };
        if target.watch_values() != values {
            last_change = Some(until.exits);
        }
        tracing::debug!(%until, ?last_hit, ?last_change, "reverse-continue: first pass done");
        let task = match (last_change, last_hit) {
            (Some(interval), hit) if hit.map_or(true, |h| interval >= h.exits) => Task::Steps {
                interval,
                want: StepWant::LastEvent,
                until: (interval == until.exits).then_some(until),
                from: None,
                started: false,
                last_arrival: None,
                event: hit.filter(|h| h.exits == interval).map(|h| (h, Why::Break)),
                values: Vec::new(),
            },
            (_, Some(hit)) => Task::Goto {
                to: hit,
                why: Why::Break,
                steps_left: None,
            },
            // Nothing since that checkpoint: the pass before it.
            (_, None) if from > self.start => Task::Scan {
                from: self.checkpoint_before(from - 1),
                until: Position::boundary(from, 0),
                last_hit: None,
                last_change: None,
                values: Vec::new(),
            },
            (_, None) => Task::Goto {
                to: Position::boundary(self.start, 0),
                why: Why::Begin,
                steps_left: None,
            },
        };
        self.begin(vmm, task)
    }

    /// A pass of single steps ended (its `until`, or the end of its interval).
    fn stepped_through(&mut self, vmm: &Vmm) -> Result<(), RrError> {
        let Some(Task::Steps {
            interval,
            want,
            last_arrival,
            event,
            ..
        }) = self.task.take()
        else {
            unreachable!("stepping");
        };
        self.all_arrivals = false;
        self.stepping = false;
        tracing::debug!(interval, ?want, ?last_arrival, ?event, "single steps done");
        let (to, why) = match want {
            // The first arrival after an exit: the instruction before it is the one that made
            // the exit, in the interval before.
            StepWant::Previous
                if interval > self.start && last_arrival.map_or(true, |p| p.hits == 0) =>
            {
                return self.begin(
                    vmm,
                    Task::Steps {
                        interval: interval - 1,
                        want: StepWant::Previous,
                        until: None,
                        from: None,
                        started: false,
                        last_arrival: None,
                        event: None,
                        values: Vec::new(),
                    },
                );
            }
            StepWant::Previous => (
                last_arrival.unwrap_or(Position::boundary(interval, 0)),
                Why::Step,
            ),
            StepWant::LastEvent => event.unwrap_or((Position::boundary(self.start, 0), Why::Begin)),
            // The interval held no change after all (it came with the exit): nothing to stop at
            // before the next one.
            StepWant::FirstChange => {
                self.restore_guest_debug(vmm)?;
                return Ok(());
            }
        };
        self.travel(vmm, to, why)
    }

    /// The end of a travel: gdb hears of the stop (or, after `monitor goto`, is served again).
    fn arrive(&mut self, vmm: &Vmm, why: Why) -> Result<(), RrError> {
        self.task = None;
        self.all_arrivals = false;
        self.stepping = false;
        self.stepping_over = None;
        let target = self.target.as_mut().expect("attached");
        target.clear_marker();
        target.user_planted = true;
        target.replant();
        vmm.vcpu
            .fd
            .set_guest_debug(&Default::default())
            .map_err(RrError::Vcpu)?;
        self.note_stop(vmm)?;
        match why {
            Why::Goto => {
                self.target.as_mut().expect("attached").arrived = true;
                eprintln!(
                    "rrr: gdb: at {}",
                    self.pos
                        .map_or("an unknown position".into(), |p| p.to_string())
                );
                self.serve(vmm)
            }
            Why::Break => self.stop(vmm, Stop::SwBreak(())),
            Why::Step => self.stop(vmm, Stop::DoneStep),
            Why::Watch(addr) => self.stop(
                vmm,
                Stop::Watch {
                    tid: (),
                    kind: WatchKind::Write,
                    addr,
                },
            ),
            Why::Begin => self.stop(
                vmm,
                Stop::ReplayLog {
                    tid: None,
                    pos: ReplayLogPosition::Begin,
                },
            ),
        }
    }

    /// The registers at a stop, for a forward watchpoint started from it.
    fn note_stop(&mut self, vmm: &Vmm) -> Result<(), RrError> {
        self.here_regs = Some(reg_state(vmm)?);
        Ok(())
    }

    /// An arrival at `rip` that counts (a `hlt` of the debugger's there all along, or every
    /// arrival in a pass of single steps).
    fn count(&mut self, rip: u64) -> Option<Position> {
        if !self.all_arrivals && !self.counted.contains(&rip) {
            return None;
        }
        let n = self.hits.entry(rip).or_insert(0);
        *n += 1;
        Some(Position::arrival(self.exits, rip, *n))
    }

    /// Steps on past the `hlt` at `at` without stopping.
    fn pass_over(&mut self, vmm: &Vmm, at: u64) -> Result<(), RrError> {
        let target = self.target.as_ref().expect("attached");
        target.set_planted(at, false);
        self.stepping_over = Some((at, Resume::Continue));
        vmm.vcpu
            .fd
            .set_guest_debug(&target.guest_debug(true, Some(at)))
            .map_err(RrError::Vcpu)
    }

    /// The debug registers and single-step flag the session wants now (after the replayer's
    /// landmark search used its own).
    pub fn restore_guest_debug(&self, vmm: &Vmm) -> Result<(), RrError> {
        let Some(target) = &self.target else {
            // No debugger attached: none at all (the run loop's own steps must not linger).
            return vmm
                .vcpu
                .fd
                .set_guest_debug(&Default::default())
                .map_err(RrError::Vcpu);
        };
        let debug = match self.stepping_over {
            Some((at, _)) => target.guest_debug(true, Some(at)),
            None => target.guest_debug(self.stepping, None),
        };
        vmm.vcpu.fd.set_guest_debug(&debug).map_err(RrError::Vcpu)
    }

    /// A guest `hlt` exit: whether it was one of the debugger's (then the stop is reported
    /// with RIP on the breakpoint and gdb has been served, or a travel went on past it).
    pub fn probe_hit(&mut self, vmm: &Vmm) -> Result<bool, RrError> {
        if !self.active() {
            return Ok(false);
        }
        let target = self.target.as_ref().expect("attached");
        let mut regs = vmm.vcpu.fd.get_regs().map_err(RrError::Vcpu)?;
        // KVM reports a `hlt` exit with RIP past the one-byte instruction.
        let at = regs.rip.wrapping_sub(1);
        if !target.planted_at(at) {
            return Ok(false);
        }
        let user = target.user_planted && target.breakpoints.contains_key(&at);
        regs.rip = at;
        vmm.vcpu.fd.set_regs(&regs).map_err(RrError::Vcpu)?;
        let here = self.count(at);
        match &mut self.task {
            None => {
                self.stepping = false;
                self.pos = here;
                self.stop(vmm, Stop::SwBreak(()))?;
            }
            Some(Task::Goto { to, .. }) => {
                let to = *to;
                if here.is_some_and(|p| p.exits == to.exits && p.rip == to.rip && p.hits == to.hits)
                {
                    self.pos = here;
                    if to.steps > 0 {
                        if let Some(Task::Goto { steps_left, .. }) = &mut self.task {
                            *steps_left = Some(to.steps);
                        }
                        self.stepping = true;
                        self.pass_over(vmm, at)?;
                    } else {
                        let why = match &self.task {
                            Some(Task::Goto { why, .. }) => *why,
                            _ => unreachable!("going"),
                        };
                        self.arrive(vmm, why)?;
                    }
                } else {
                    self.pass_over(vmm, at)?;
                }
            }
            Some(Task::Locate { regs, then, .. }) => {
                let (regs, then) = (**regs, *then);
                if at == regs.rip() && reg_state(vmm)? == regs {
                    self.task = None;
                    self.pos = here;
                    let target = self.target.as_mut().expect("attached");
                    target.clear_marker();
                    target.user_planted = true;
                    target.replant();
                    match then {
                        Some(action) if here.is_some() => self.reverse(vmm, action)?,
                        _ => {
                            self.note_stop(vmm)?;
                            self.serve(vmm)?;
                        }
                    }
                } else {
                    self.pass_over(vmm, at)?;
                }
            }
            Some(Task::Scan {
                until, last_hit, ..
            }) => {
                let until = *until;
                if here.is_some_and(|p| p == until) {
                    self.scanned(vmm)?;
                } else {
                    if user {
                        *last_hit = here.or(*last_hit);
                    }
                    self.pass_over(vmm, at)?;
                }
            }
            // A pass of single steps reached the system call entry (see `steps_arrival`).
            Some(Task::Steps { .. }) => {
                let target = self.target.as_mut().expect("attached");
                target.clear_marker();
                self.stepping = true;
                match here {
                    Some(here) => self.steps_arrival(vmm, here)?,
                    None => self.restore_guest_debug(vmm)?,
                }
            }
        }
        Ok(true)
    }

    /// A `KVM_EXIT_DEBUG`: the end of a step off a breakpoint, of a single step, or a
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
        let rip = vmm.vcpu.fd.get_regs().map_err(RrError::Vcpu)?.rip;
        if let Some((at, action)) = self.stepping_over.take() {
            target.set_planted(at, true);
            if action == Resume::Step || self.task.is_some() && self.stepping {
                return self.step_done(vmm, rip).map(|()| true);
            }
        } else if self.stepping {
            return self.step_done(vmm, rip).map(|()| true);
        }
        if let Some(slot) = hit.and_then(|i| target.slots[i]) {
            self.pos = None;
            let reason = match slot.watch {
                None => Stop::HwBreak(()),
                Some(kind) => Stop::Watch {
                    tid: (),
                    kind,
                    addr: slot.addr,
                },
            };
            self.stop(vmm, reason)?;
        } else {
            // Off the breakpoint; the guest runs on with gdb's debug registers.
            self.restore_guest_debug(vmm)?;
        }
        Ok(true)
    }

    /// A single step ended at `rip`: gdb's, a travel's last steps, or a pass of single steps.
    fn step_done(&mut self, vmm: &Vmm, rip: u64) -> Result<(), RrError> {
        let planted = self.target.as_ref().expect("attached").planted_at(rip);
        // A `hlt` planted where the step ended counts the arrival when it runs, unless the
        // guest stops here.
        let stops_here = !matches!(self.task, Some(Task::Goto { steps_left: Some(n), .. }) if n > 1)
            && !matches!(self.task, Some(Task::Steps { .. }));
        let here = if stops_here || !planted {
            self.count(rip)
        } else {
            None
        };
        match &mut self.task {
            None => {
                self.stepping = false;
                self.pos = here.or(self.pos.map(Position::stepped));
                self.stop(vmm, Stop::DoneStep)
            }
            Some(Task::Goto {
                steps_left, why, ..
            }) => {
                let left = steps_left.unwrap_or(1).saturating_sub(1);
                *steps_left = Some(left);
                if left == 0 {
                    let why = *why;
                    if let Some(Task::Goto { to, .. }) = &self.task {
                        self.pos = Some(*to);
                    }
                    return self.arrive(vmm, why);
                }
                self.restore_guest_debug(vmm)
            }
            Some(Task::Scan { .. } | Task::Locate { .. }) => self.restore_guest_debug(vmm),
            Some(Task::Steps { .. }) => {
                let here = here.expect("every arrival counts in a pass of single steps");
                self.steps_arrival(vmm, here)
            }
        }
    }

    /// An arrival in a pass of single steps.
    fn steps_arrival(&mut self, vmm: &Vmm, here: Position) -> Result<(), RrError> {
        let rip = here.rip;
        let target = self.target.as_mut().expect("attached");
        let Some(Task::Steps {
            want,
            until,
            from,
            last_arrival,
            event,
            values,
            ..
        }) = &mut self.task
        else {
            unreachable!("stepping");
        };
        if *until == Some(here) {
            return self.stepped_through(vmm);
        }
        let previous = last_arrival.replace(here);
        let now = target.watch_values();
        let changed = target.changed_watch(values, &now);
        *values = now;
        match want {
            StepWant::Previous => {}
            StepWant::LastEvent => {
                if let (Some(addr), Some(writer)) = (changed, previous) {
                    // Going backwards, gdb stops before the write: on the writing instruction.
                    *event = Some((writer, Why::Watch(addr)));
                } else if target.breakpoints.contains_key(&rip) {
                    *event = Some((here, Why::Break));
                }
            }
            StepWant::FirstChange => {
                let passed = match from {
                    None => true,
                    Some((pos, regs, passed)) => {
                        let at_start = match pos {
                            Some(pos) => *pos == here,
                            // The flags aside: a single step's trap may leave RF set.
                            None => {
                                rip == regs.rip() && {
                                    let now = reg_state(vmm)?;
                                    now.gprs[..17] == regs.gprs[..17] && now.cr3 == regs.cr3
                                }
                            }
                        };
                        if !*passed && at_start {
                            // The change must come after this point.
                            *passed = true;
                            false
                        } else {
                            *passed
                        }
                    }
                };
                if let (Some(addr), true) = (changed, passed) {
                    // Gone to again from the checkpoint: the single steps may have left the
                    // trap flag where the guest can see it (SYSCALL's saved flags, `pushf`).
                    return self.travel(vmm, here, Why::Watch(addr));
                }
            }
        }
        // SYSCALL masks the trap flag off: the kernel's entry would run unstepped (and the
        // flag, saved in R11, would send the return through IRET instead of SYSRET). The entry
        // point is reached with a `hlt` instead.
        match target.instruction_at(vmm, rip) {
            Some(Special::Syscall) => {
                let entry = lstar(vmm)?;
                if target.plant_marker(entry) {
                    self.stepping = false;
                }
            }
            // SYSRET and IRET load flags saved without the trap flag: the rest of the pass
            // would run unstepped. The flag goes into what they load (the pass is replayed
            // again from a checkpoint before anything stops there, so the guest keeps none of
            // it).
            Some(Special::Sysret) => {
                let mut regs = vmm.vcpu.fd.get_regs().map_err(RrError::Vcpu)?;
                regs.r11 |= TRAP_FLAG;
                vmm.vcpu.fd.set_regs(&regs).map_err(RrError::Vcpu)?;
            }
            Some(Special::Iret) => {
                let rsp = vmm.vcpu.fd.get_regs().map_err(RrError::Vcpu)?.rsp;
                target.set_trap_flag_at(rsp + 16);
            }
            None => {}
        }
        self.restore_guest_debug(vmm)
    }

    /// At a synchronous exit: arrivals count afresh, a travel goes on, a watched value may have
    /// changed, and a Ctrl-C from gdb stops the guest here.
    pub fn after_exit(&mut self, vmm: &Vmm, exits: u64) -> Result<(), RrError> {
        if !self.active() {
            return Ok(());
        }
        self.exits = exits;
        self.hits.clear();
        let target = self.target.as_ref().expect("attached");
        self.counted = target.planted().into_iter().collect();
        if self.task.is_some() {
            self.exit_reached(vmm, exits)?;
            if self.task.is_some() && !self.rewind {
                self.restore_guest_debug(vmm)?;
            }
            return Ok(());
        }
        if let Some((from_exits, from_pos, from_regs, values)) = &mut self.watching {
            let now = target.watch_values();
            if now != *values {
                // Changed since the last exit: single steps through the interval find the write.
                let interval = exits - 1;
                let from = from_regs
                    .filter(|_| *from_exits == interval)
                    .map(|regs| (*from_pos, Box::new(regs), false));
                return self.begin(
                    vmm,
                    Task::Steps {
                        interval,
                        want: StepWant::FirstChange,
                        until: None,
                        from,
                        started: false,
                        last_arrival: None,
                        event: None,
                        values: Vec::new(),
                    },
                );
            }
        }
        if exits % INTERRUPT_POLL != 0 || self.stepping_over.is_some() {
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
        let rip = target.rip();
        self.gdb = Some(match gdb {
            GdbStubStateMachine::CtrlCInterrupt(ctrlc) => {
                self.stepping = false;
                self.pos = Some(Position::boundary(exits, rip));
                self.note_stop(vmm)?;
                let target = self.target.as_mut().expect("attached");
                target.pos = self.pos;
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
