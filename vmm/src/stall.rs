//! When a guest that makes no synchronous exit gets a host-timed timer tick (a "landmark",
//! DESIGN.md's fallback).
//!
//! Every landmark is a point where host timing decides guest behaviour, so they must be rare.
//! Most long stretches without an exit are bounded work that ends on its own (clearing BSS,
//! ftrace patching 20,000 call sites, initialising the memory map): ticking into them only
//! reorders the guest's asynchronous work from run to run. What truly needs a tick is a guest
//! that waits for time to pass without exiting:
//!
//! - a kernel spin-wait (`cpu_relax()` until `jiffies` moves): it changes no register between
//!   iterations, so two samples with the same RIP and the same registers prove it;
//!   The same holds for a user-mode `for (;;);`;
//! - a loop that never ends but changes state (a stimulus computing forever, or the runaway
//!   kernel loop a reproducer finds): after a grace period it gets ticks at the normal stall
//!   rate, so time limits pass and the kernel's own lockup detectors can see it.
//!
//! Where the vCPU happens to be (user or kernel mode) says nothing: system calls and page faults
//! are not VM exits, so a sample in user mode does not mean user mode ran all along.
//!
//! With the progress counter (`devices::progress`) instrumented code exits on its own every
//! 65536 blocks, so this is the fallback for code without instrumentation only.
//!
//! Time here is the vCPU thread's CPU time, not the wall clock: a guest starved of host CPU
//! executes nothing between two samples, so its registers are unchanged, and taking that for a
//! spin-wait parted runs under load (DESIGN.md, item 7: 12 of 12 parted runs had such a
//! landmark). A repeated state is a spin only if the vCPU ran in between.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Work without exits that is still allowed to finish on its own, in vCPU CPU time. The longest
/// bounded stretch in a boot is the kernel's early setup before its first port access: about
/// 0.4 s in the carrier on an idle machine, so this leaves room for a loaded one.
pub const RUNAWAY_AFTER: Duration = Duration::from_secs(2);

/// vCPU CPU time between two samples of one state that makes it a spin-wait: a guest that ran
/// this long (millions of instructions even under emulation) and came back to the same registers
/// loops without changing anything.
///
/// Long, because inside the carrier the thread's CPU time is the carrier kernel's view: when the
/// host starves the carrier's vCPU, the carrier's clock still moves and charges the time to our
/// thread (measured 2026-11-30: 2 ms let a loaded machine produce 2 "spin-wait" landmarks in a
/// run of `cpu_threads.c`, whose code makes a progress exit every 65536 blocks). Host starvation
/// of 50 ms is rarer, and with every kernel and stimulus block counted a real spin-wait is rare
/// too, so waiting longer for one costs little.
pub const SPIN_EVIDENCE: Duration = Duration::from_millis(50);

/// Exits between two stalls below which the second continues the first (an interrupt handler
/// ran in between, then the guest went back to the same loop).
const CONTINUATION_EXITS: u64 = 64;

/// Distinct register states remembered within one stall.
const MAX_SAMPLES: usize = 256;

/// What the run loop saw at a stall kick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StallSample {
    pub rip: u64,
    /// A digest of every general-purpose register and the flags.
    pub state: u64,
    /// CPU time of the vCPU thread so far (guest execution included).
    pub cpu: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LandmarkCause {
    /// The same state twice with the vCPU running in between: a spin-wait.
    Spinning,
    /// A loop whose state keeps changing ran past [`RUNAWAY_AFTER`].
    Runaway,
}

/// Landmarks of one run by cause: spin-waits replay cheaply (the first hit of the same state
/// matches), loops with changing state may not, so every run summary shows both.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LandmarkCounts {
    pub spin_wait: u64,
    pub changing_state: u64,
}

impl LandmarkCounts {
    pub fn count(&mut self, cause: LandmarkCause) {
        match cause {
            LandmarkCause::Spinning => self.spin_wait += 1,
            LandmarkCause::Runaway => self.changing_state += 1,
        }
    }

    pub fn total(&self) -> u64 {
        self.spin_wait + self.changing_state
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Let the guest run on untouched.
    Wait,
    Landmark(LandmarkCause),
}

/// One stretch without synchronous exits, as seen through the watchdog's kicks.
#[derive(Debug)]
struct Stall {
    exits: u64,
    started: Duration,
    /// (rip, state, CPU time when first seen).
    seen: Vec<(u64, u64, Duration)>,
}

#[derive(Debug, Default)]
pub struct StallTracker {
    current: Option<Stall>,
    /// Exit count at the last landmark given to a runaway loop.
    last_unbounded: Option<u64>,
}

impl StallTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// The watchdog found the guest at `exits` synchronous exits for a stall period.
    pub fn observe(&mut self, exits: u64, sample: StallSample) -> Verdict {
        let stall = match &mut self.current {
            Some(stall) if stall.exits == exits => stall,
            current => current.insert(Stall {
                exits,
                started: sample.cpu,
                seen: Vec::new(),
            }),
        };
        let earlier = stall
            .seen
            .iter()
            .find(|(rip, state, _)| (*rip, *state) == (sample.rip, sample.state))
            .map(|(_, _, cpu)| *cpu);
        let verdict = if earlier.is_some_and(|cpu| sample.cpu.saturating_sub(cpu) >= SPIN_EVIDENCE)
        {
            Verdict::Landmark(LandmarkCause::Spinning)
        } else if sample.cpu.saturating_sub(stall.started) >= RUNAWAY_AFTER
            || self
                .last_unbounded
                .is_some_and(|at| exits.saturating_sub(at) < CONTINUATION_EXITS)
        {
            Verdict::Landmark(LandmarkCause::Runaway)
        } else {
            // A state seen before without the vCPU running since proves nothing: keep the
            // first sighting, and wait for evidence.
            if earlier.is_none() && stall.seen.len() < MAX_SAMPLES {
                stall.seen.push((sample.rip, sample.state, sample.cpu));
            }
            Verdict::Wait
        };
        if let Verdict::Landmark(cause) = verdict {
            self.current = None;
            if cause == LandmarkCause::Runaway {
                self.last_unbounded = Some(exits);
            }
        }
        verdict
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sample taken when the vCPU had run `cpu_ms` milliseconds.
    fn sample(rip: u64, state: u64, cpu_ms: u64) -> StallSample {
        StallSample {
            rip,
            state,
            cpu: Duration::from_millis(cpu_ms),
        }
    }

    /// CPU time a vCPU that runs all along gets between two samples.
    const TICK: u64 = 10;

    #[test]
    fn bounded_kernel_work_is_left_alone() {
        let mut tracker = StallTracker::new();
        for i in 0..20u64 {
            let verdict = tracker.observe(5, sample(0x1000 + i, i, TICK * i));
            assert_eq!(verdict, Verdict::Wait, "sample {i}");
        }
    }

    /// [`SPIN_EVIDENCE`] in milliseconds.
    fn evidence_ms() -> u64 {
        SPIN_EVIDENCE.as_millis() as u64
    }

    #[test]
    fn a_repeated_state_is_a_spin_wait() {
        let mut tracker = StallTracker::new();
        assert_eq!(tracker.observe(7, sample(0x10, 1, 0)), Verdict::Wait);
        assert_eq!(tracker.observe(7, sample(0x14, 1, TICK)), Verdict::Wait);
        assert_eq!(
            tracker.observe(7, sample(0x10, 1, evidence_ms())),
            Verdict::Landmark(LandmarkCause::Spinning)
        );
        // The same RIP with other registers is progress, not a spin.
        assert_eq!(tracker.observe(9, sample(0x10, 1, 0)), Verdict::Wait);
        assert_eq!(tracker.observe(9, sample(0x10, 2, TICK)), Verdict::Wait);
    }

    #[test]
    fn a_starved_guest_is_not_a_spinning_one() {
        // The host gave the vCPU no CPU between samples: the same registers prove nothing.
        let mut tracker = StallTracker::new();
        let short = evidence_ms() - 1;
        assert_eq!(tracker.observe(7, sample(0x10, 1, 100)), Verdict::Wait);
        assert_eq!(tracker.observe(7, sample(0x10, 1, 100)), Verdict::Wait);
        assert_eq!(
            tracker.observe(7, sample(0x10, 1, 100 + short)),
            Verdict::Wait
        );
        // Once it has run, the same state is a spin, measured from its first sighting.
        assert_eq!(
            tracker.observe(7, sample(0x10, 1, 100 + evidence_ms())),
            Verdict::Landmark(LandmarkCause::Spinning)
        );
        // Starved for longer than the grace period in wall time is still no runaway.
        let mut tracker = StallTracker::new();
        for i in 0..1000 {
            assert_eq!(
                tracker.observe(3, sample(0x20, i, 50)),
                Verdict::Wait,
                "sample {i}"
            );
        }
    }

    #[test]
    fn samples_from_an_earlier_stall_do_not_count() {
        let mut tracker = StallTracker::new();
        assert_eq!(tracker.observe(1, sample(0x10, 1, 0)), Verdict::Wait);
        assert_eq!(tracker.observe(200, sample(0x10, 1, TICK)), Verdict::Wait);
    }

    #[test]
    fn a_runaway_kernel_loop_gets_ticks_after_the_grace_period_and_then_at_every_stall() {
        let mut tracker = StallTracker::new();
        let mut cpu = 0;
        let mut state = 0;
        let verdict = loop {
            state += 1;
            match tracker.observe(50, sample(0x20, state, cpu)) {
                Verdict::Wait => cpu += TICK,
                other => break other,
            }
        };
        assert_eq!(verdict, Verdict::Landmark(LandmarkCause::Runaway));
        assert!(Duration::from_millis(cpu) >= RUNAWAY_AFTER);
        // The tick's handler made a few exits; the loop goes on and is ticked at once.
        assert_eq!(
            tracker.observe(60, sample(0x20, state + 1, cpu + TICK)),
            Verdict::Landmark(LandmarkCause::Runaway)
        );
        // Long after, a new stall gets its grace period again.
        assert_eq!(
            tracker.observe(10_000, sample(0x20, state + 2, cpu + TICK * 2)),
            Verdict::Wait
        );
    }

    #[test]
    fn landmarks_are_counted_by_cause() {
        let mut counts = LandmarkCounts::default();
        counts.count(LandmarkCause::Spinning);
        counts.count(LandmarkCause::Runaway);
        counts.count(LandmarkCause::Runaway);
        assert_eq!(
            counts,
            LandmarkCounts {
                spin_wait: 1,
                changing_state: 2
            }
        );
        assert_eq!(counts.total(), 3);
    }
}
