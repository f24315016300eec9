//! The replaying side: the log's inputs fed back at their exit counts, landmarks found again by
//! their register state, and every checkpoint checked. The first mismatch stops the replay with
//! a [`Divergence`].

use kvm_bindings::{
    kvm_guest_debug, KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP, KVM_GUESTDBG_USE_HW_BP,
};
use kvm_ioctls::VcpuExit;

use crate::builder::Vmm;
use crate::clock::VirtualTime;

use super::log::{End, Landmark, Record, Recording, RegState, Tail};
use super::{reg_state, DirtyPages, Divergence, ExecMode, ExitWhat, RrError};
use crate::exit_ring::{ExitRing, RingEvent};

/// Breakpoint hits at a landmark's RIP with another state before the replay gives up: a
/// spin-wait matches at its first hit, a loop whose state changes may take many (DESIGN.md,
/// item 6); each hit costs two debug exits that the guest never sees.
pub const MAX_LANDMARK_HITS: u64 = 1_000_000;

/// Single steps tried before breaking on the landmark's RIP (about 33 µs each in the carrier).
const SINGLE_STEPS_FIRST: u64 = 20_000;

/// DR7: breakpoint 0 enabled (L0), on execution (R/W0 = 00, LEN0 = 00), GE and the bit that
/// always reads as one.
const DR7_EXEC_BP0: u64 = 0x0601;

/// Counts of what a replay did, for its summary.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ReplayStats {
    pub checkpoints: u64,
    pub inputs: u64,
    pub landmarks: u64,
    /// Exits that exist only for the replayer (breakpoint hits and single steps while finding
    /// landmarks); they count neither as exits nor as virtual time.
    pub debug_exits: u64,
    /// Landmarks whose dirty-page hash differed (see `landmark_due`).
    pub dirty_mismatches: u64,
}

/// Where a replayer stands in its log, to go back there (reverse execution).
#[derive(Debug, Clone)]
pub struct ReplayCursor {
    next: usize,
    dirty: DirtyPages,
    ring: ExitRing,
    stats: ReplayStats,
}

pub struct Replayer {
    records: Vec<Record>,
    complete: bool,
    next: usize,
    interval: u64,
    dirty: DirtyPages,
    ring: ExitRing,
    stats: ReplayStats,
}

impl Replayer {
    pub fn new(recording: Recording) -> Self {
        Replayer {
            complete: recording.tail == Tail::Complete,
            records: recording.records,
            next: 0,
            interval: recording.header.config.checkpoint_interval.max(1),
            dirty: DirtyPages::default(),
            ring: ExitRing::default(),
            stats: ReplayStats::default(),
        }
    }

    pub fn stats(&self) -> ReplayStats {
        self.stats
    }

    /// Pages an in-memory checkpoint took from KVM's dirty log: the next landmark's hash
    /// counts them as if the replayer had taken them itself.
    pub fn carry_dirty(&mut self, pages: &[u64]) {
        self.dirty.carry(pages);
    }

    pub fn cursor(&self) -> ReplayCursor {
        ReplayCursor {
            next: self.next,
            dirty: self.dirty.clone(),
            ring: self.ring.clone(),
            stats: self.stats,
        }
    }

    /// Goes back to a cursor taken earlier in this replay; the debug exits made since stay
    /// counted.
    pub fn rewind(&mut self, cursor: &ReplayCursor) {
        let debug_exits = self.stats.debug_exits;
        self.next = cursor.next;
        self.dirty = cursor.dirty.clone();
        self.ring = cursor.ring.clone();
        self.stats = cursor.stats;
        self.stats.debug_exits = debug_exits;
    }

    /// Whether a logged landmark is to be given at exit `exits` (a probe that plants
    /// breakpoints lifts them while the replayer finds the landmark with its own).
    pub fn landmark_at(&self, exits: u64) -> bool {
        matches!(self.peek(), Some(Record::Landmark(l)) if l.exits == exits)
    }

    fn peek(&self) -> Option<&Record> {
        self.records.get(self.next)
    }

    fn divergence(&self, exits: u64, expected: String, seen: String) -> RrError {
        RrError::Divergence(Box::new(Divergence {
            event: self.next + 1,
            exits,
            expected,
            seen,
            last_exits: self.ring.list(),
        }))
    }

    /// Compares the end of the replayed run with the recording's end record.
    pub fn finish(
        &mut self,
        vmm: &Vmm,
        vm_end: &str,
        exits: u64,
        now: VirtualTime,
    ) -> Result<&End, RrError> {
        let hash = self.dirty.final_hash(vmm)?;
        let end = match self.peek() {
            Some(Record::End(end)) => end.clone(),
            Some(other) => {
                return Err(self.divergence(
                    exits,
                    describe(other),
                    format!("the run ended ({vm_end})"),
                ))
            }
            None if self.complete => unreachable!("a complete recording ends with its end record"),
            None => return Err(RrError::EndOfPartial { exits }),
        };
        let seen = (vm_end, exits, now.as_nanos(), hash);
        let expected = (end.vm_end.as_str(), end.exits, end.time_ns, end.state_hash);
        if seen != expected {
            return Err(self.divergence(
                exits,
                format!(
                    "the end: VM {}, exit {}, virtual time {} ns, final state hash {:#018x}",
                    expected.0, expected.1, expected.2, expected.3
                ),
                format!(
                    "the end: VM {}, exit {}, virtual time {} ns, final state hash {:#018x}",
                    seen.0, seen.1, seen.2, seen.3
                ),
            ));
        }
        match &self.records[self.next] {
            Record::End(end) => Ok(end),
            _ => unreachable!("peeked above"),
        }
    }

    /// Whether the next record should have come before exit `exits`.
    fn check_not_passed(&self, exits: u64) -> Result<(), RrError> {
        let passed = match self.peek() {
            Some(Record::Input { exits: at, .. }) => *at < exits,
            Some(Record::Landmark(l)) => l.exits < exits,
            Some(Record::End(end)) => end.exits < exits,
            _ => false,
        };
        if passed {
            let record = self.peek().expect("checked above");
            return Err(self.divergence(
                exits,
                describe(record),
                format!("exit {exits} reached without it"),
            ));
        }
        Ok(())
    }

    /// Runs the vCPU, under guest debugging, until its registers are `want`'s.
    fn seek(&mut self, vmm: &mut Vmm, exits: u64, want: &RegState) -> Result<(), RrError> {
        let mut state = reg_state(vmm)?;
        let mut hits = 0u64;
        let mut steps = 0u64;
        let result = loop {
            if state == *want {
                break Ok(());
            }
            if hits >= MAX_LANDMARK_HITS {
                break Err(self.divergence(
                    exits,
                    format!(
                        "a landmark at RIP {:#x} with registers hash {:#x}",
                        want.rip(),
                        want.hash()
                    ),
                    format!("{hits} hits at that RIP, none with the recorded registers"),
                ));
            }
            // Single steps first: a landmark given to a guest starved of host CPU is a few
            // instructions away, and a step cannot miss it. Then an instruction breakpoint on
            // the RIP; one on the current RIP would trap again at once, so step over it first.
            let step = steps < SINGLE_STEPS_FIRST || state.rip() == want.rip();
            if step {
                steps += 1;
            }
            let mut debug = kvm_guest_debug {
                control: KVM_GUESTDBG_ENABLE
                    | if step {
                        KVM_GUESTDBG_SINGLESTEP
                    } else {
                        KVM_GUESTDBG_USE_HW_BP
                    },
                ..Default::default()
            };
            if !step {
                debug.arch.debugreg[0] = want.rip();
                debug.arch.debugreg[7] = DR7_EXEC_BP0;
                hits += 1;
            }
            if let Err(e) = vmm.vcpu.fd.set_guest_debug(&debug) {
                break Err(RrError::Vcpu(e));
            }
            if let Err(e) = self.debug_run(vmm, exits, want) {
                break Err(e);
            }
            state = match reg_state(vmm) {
                Ok(state) => state,
                Err(e) => break Err(e),
            };
        };
        let cleared = vmm
            .vcpu
            .fd
            .set_guest_debug(&kvm_guest_debug::default())
            .map_err(RrError::Vcpu);
        tracing::debug!(exits, hits, steps, "landmark seek done");
        result.and(cleared)
    }

    /// One `KVM_RUN` that must come back with a debug exit.
    fn debug_run(&mut self, vmm: &mut Vmm, exits: u64, want: &RegState) -> Result<(), RrError> {
        loop {
            let seen = match vmm.vcpu.fd.run() {
                Ok(VcpuExit::Debug(_)) => {
                    self.stats.debug_exits += 1;
                    return Ok(());
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
                Err(e) => return Err(RrError::Vcpu(e)),
                Ok(other) => format!("{other:?}"),
            };
            return Err(self.divergence(
                exits,
                format!("a landmark at RIP {:#x}", want.rip()),
                format!("a synchronous exit ({seen}) before the landmark's state was reached"),
            ));
        }
    }
}

trait PipeDivergence {
    fn pipe_divergence(self, replayer: &Replayer, exits: u64, expected: &str) -> RrError;
}

impl PipeDivergence for String {
    fn pipe_divergence(self, replayer: &Replayer, exits: u64, expected: &str) -> RrError {
        replayer.divergence(exits, expected.into(), self)
    }
}

/// The registers that differ, with both values.
fn differing_registers(want: &RegState, seen: &RegState) -> String {
    const NAMES: [&str; 18] = [
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11", "r12",
        "r13", "r14", "r15", "rip", "rflags",
    ];
    let mut out: Vec<String> = NAMES
        .iter()
        .zip(want.gprs.iter().zip(&seen.gprs))
        .filter(|(_, (a, b))| a != b)
        .map(|(name, (a, b))| format!("{name} {a:#x} vs {b:#x}"))
        .collect();
    if want.cr3 != seen.cr3 {
        out.push(format!("cr3 {:#x} vs {:#x}", want.cr3, seen.cr3));
    }
    if want.cs != seen.cs {
        out.push(format!("cs {:#x} vs {:#x}", want.cs, seen.cs));
    }
    if out.is_empty() {
        "none (the hash alone)".into()
    } else {
        out.join(", ")
    }
}

fn describe(record: &Record) -> String {
    match record {
        Record::Header(_) => "the header".into(),
        Record::Input {
            exits,
            time_ns,
            bytes,
        } => format!(
            "console input {:?} at exit {exits}, virtual time {time_ns} ns",
            String::from_utf8_lossy(bytes)
        ),
        Record::Landmark(l) => format!(
            "a {:?} landmark at exit {}, RIP {:#x}",
            l.kind,
            l.exits,
            l.regs.rip()
        ),
        Record::Checkpoint(c) => format!(
            "checkpoint at exit {}: virtual time {} ns, RIP {:#x}, registers hash {:#018x}",
            c.exits, c.time_ns, c.rip, c.regs_hash
        ),
        Record::End(end) => format!("the end at exit {} ({})", end.exits, end.vm_end),
    }
}

impl ExecMode for Replayer {
    fn after_exit(
        &mut self,
        vmm: &mut Vmm,
        exits: u64,
        now: VirtualTime,
        what: ExitWhat,
    ) -> Result<(), RrError> {
        self.ring
            .push(exits, now, vmm.vcpu.exit_rip(), RingEvent::Exit(what));
        if self.peek().is_none() && !self.complete {
            return Err(RrError::EndOfPartial { exits });
        }
        self.check_not_passed(exits)?;
        if exits % self.interval != 0 {
            return Ok(());
        }
        let regs = reg_state(vmm)?;
        let seen = Record::Checkpoint(super::log::Checkpoint {
            exits,
            time_ns: now.as_nanos(),
            rip: regs.rip(),
            regs_hash: regs.hash(),
            regs,
        });
        match self.peek() {
            Some(expected) if *expected == seen => {
                self.next += 1;
                self.stats.checkpoints += 1;
                Ok(())
            }
            Some(Record::Checkpoint(c)) if c.exits == exits => {
                let differs = differing_registers(&c.regs, &regs);
                Err(self.divergence(
                    exits,
                    describe(&self.records[self.next]),
                    format!("{}; differing: {differs}", describe(&seen)),
                ))
            }
            Some(expected) => Err(self.divergence(exits, describe(expected), describe(&seen))),
            None => Err(self.divergence(exits, "the end".into(), describe(&seen))),
        }
    }

    fn host_landmarks(&self) -> bool {
        false
    }

    fn feeds_input(&self) -> bool {
        true
    }

    fn input_due(
        &mut self,
        exits: u64,
        now: VirtualTime,
        room: usize,
    ) -> Result<Option<Vec<u8>>, RrError> {
        let Some(Record::Input {
            exits: at,
            time_ns,
            bytes,
        }) = self.peek()
        else {
            return Ok(None);
        };
        if *at != exits || *time_ns != now.as_nanos() {
            return Ok(None);
        }
        if bytes.len() > room {
            return Err(self.divergence(
                exits,
                describe(&self.records[self.next]),
                format!("the UART takes {room} bytes now"),
            ));
        }
        let bytes = bytes.clone();
        self.next += 1;
        self.stats.inputs += 1;
        Ok(Some(bytes))
    }

    fn input_pending_at(&self, exits: u64, now: VirtualTime) -> bool {
        matches!(self.peek(), Some(Record::Input { exits: at, time_ns, .. })
            if *at == exits && *time_ns == now.as_nanos())
    }

    fn landmark_due(&mut self, vmm: &mut Vmm, exits: u64) -> Result<bool, RrError> {
        let Some(Record::Landmark(landmark)) = self.peek() else {
            return Ok(false);
        };
        if landmark.exits != exits {
            return Ok(false);
        }
        let Landmark {
            regs, dirty_hash, ..
        } = **landmark;
        self.seek(vmm, exits, &regs)?;
        // The recorded landmark came at a kick: `KVM_RUN` returned `EINTR`, and KVM refreshed
        // the run page (IF, ready for injection) on the way out. Found again by debug exits, or
        // with no entry at all, the run page may say something else; an entry with
        // `immediate_exit` leaves at once through the same path.
        vmm.vcpu.fd.set_kvm_immediate_exit(1);
        let refreshed = match vmm.vcpu.fd.run() {
            Err(e) if e.errno() == libc::EINTR => Ok(()),
            Err(e) => Err(RrError::Vcpu(e)),
            Ok(exit) => Err(format!("{exit:?}").pipe_divergence(
                self,
                exits,
                "no exit while standing at the landmark",
            )),
        };
        vmm.vcpu.fd.set_kvm_immediate_exit(0);
        refreshed?;
        let seen = self.dirty.take_and_hash(vmm)?;
        if seen != dirty_hash {
            // Not a divergence by itself: KVM's dirty log also holds pages KVM wrote for its own
            // reasons at host-timed points (measured: a landmark at the first exit after the
            // restore had pages dirty while recording and none while replaying). The checkpoints
            // and the final state decide.
            tracing::warn!(
                exits,
                recorded = format_args!("{dirty_hash:#018x}"),
                seen = format_args!("{seen:#018x}"),
                "the memory written before a landmark hashes differently"
            );
            self.stats.dirty_mismatches += 1;
        }
        self.next += 1;
        self.stats.landmarks += 1;
        Ok(true)
    }
}
