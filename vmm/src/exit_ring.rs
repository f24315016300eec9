//! The last things the run loop saw, for the report of a fault or a divergence.
//!
//! A triple fault leaves nothing to read: KVM resets the vCPU before it reports
//! `KVM_EXIT_SHUTDOWN` (AMD's VMCB is undefined after a shutdown), so the registers in the
//! report are the reset state. What the guest was doing just before is only known from the
//! exits that came before, with the RIP KVM stores in the run page at each one
//! (`KVM_CAP_SYNC_REGS`, [`crate::vstate::vcpu::Vcpu::exit_rip`]). The ring is plain data,
//! formatted only for a report, since it is filled at every exit.

use std::collections::VecDeque;
use std::fmt;

use crate::clock::VirtualTime;
use crate::rr::ExitWhat;

/// One thing the run loop saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RingEvent {
    /// A synchronous exit: part of the guest's timeline.
    Exit(ExitWhat),
    /// An interrupt injected before the next entry.
    Inject { vector: u8 },
    /// A host-timed kick (watchdog, input): not part of the timeline.
    Kick,
    /// A step out of an `sti` shadow (`arch::x86_64::sti_shadow`).
    ShadowStep,
    /// A window on the `hlt` of `sti; hlt`, taken as that `hlt`.
    ShadowedHalt,
    /// A tick given at a stall (`stall`).
    Landmark,
    /// `KVM_EXIT_SHUTDOWN`: the vCPU was reset, its RIP is the reset vector.
    Shutdown,
}

impl fmt::Display for RingEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RingEvent::Exit(what) => write!(f, "{what}"),
            RingEvent::Inject { vector } => write!(f, "inject vector {vector}"),
            RingEvent::Kick => f.write_str("kick (host-timed)"),
            RingEvent::ShadowStep => f.write_str("step out of an sti shadow"),
            RingEvent::ShadowedHalt => f.write_str("window on sti; hlt, taken as the hlt"),
            RingEvent::Landmark => f.write_str("landmark tick"),
            RingEvent::Shutdown => f.write_str("shutdown (triple fault)"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    exits: u64,
    now: VirtualTime,
    rip: Option<u64>,
    event: RingEvent,
}

/// The last [`ExitRing::LEN`] events, oldest first.
#[derive(Debug, Default, Clone)]
pub struct ExitRing {
    ring: VecDeque<Entry>,
}

impl ExitRing {
    pub const LEN: usize = 24;

    pub fn push(&mut self, exits: u64, now: VirtualTime, rip: Option<u64>, event: RingEvent) {
        if self.ring.len() == Self::LEN {
            self.ring.pop_front();
        }
        self.ring.push_back(Entry {
            exits,
            now,
            rip,
            event,
        });
    }

    /// One line per event, oldest first: `exit N at T ns, rip R: what`.
    pub fn list(&self) -> Vec<String> {
        self.ring
            .iter()
            .map(|e| match e.rip {
                Some(rip) => format!(
                    "exit {} at {} ns, rip {rip:#x}: {}",
                    e.exits,
                    e.now.as_nanos(),
                    e.event
                ),
                None => format!("exit {} at {} ns: {}", e.exits, e.now.as_nanos(), e.event),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_keeps_the_last_events_oldest_first() {
        let mut ring = ExitRing::default();
        for exits in 0..(ExitRing::LEN as u64 + 5) {
            ring.push(
                exits,
                VirtualTime::from_nanos(exits * 10),
                Some(0xffff_ffff_8100_0000 + exits),
                RingEvent::Exit(ExitWhat::Halt),
            );
        }
        ring.push(29, VirtualTime::from_nanos(290), None, RingEvent::Shutdown);
        let list = ring.list();
        assert_eq!(list.len(), ExitRing::LEN);
        assert_eq!(list[0], "exit 6 at 60 ns, rip 0xffffffff81000006: hlt");
        assert_eq!(
            list.last().unwrap(),
            "exit 29 at 290 ns: shutdown (triple fault)"
        );
    }
}
