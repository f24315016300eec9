//! The travels the debugger makes between positions in a replay (reverse execution).
//!
//! The debugger counts arrivals at the addresses where it has a `hlt` planted for a whole exit
//! interval ([`Position`]); a position reached by single steps from a known one is that one plus
//! a number of steps.
//!
//! Going back restores the READY checkpoint kept in memory and replays forward (a checkpoint
//! interval of "infinity" for now: see the README); the first pass of a reverse-continue
//! replays with gdb's breakpoints planted and notes the last hit before where it started, the
//! second goes there.

pub use crate::position::Position;

/// What to tell gdb on arriving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    Break,
    Step,
    /// A write watchpoint at this (virtual) address.
    Watch(u64),
    /// Nothing earlier matched: the beginning of the replay.
    Begin,
    /// `monitor goto`: gdb is not waiting for a stop.
    Goto,
}

/// What a pass of single steps through one exit interval looks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepWant {
    /// The last arrival before `until` (reverse-step).
    Previous,
    /// The last change of a watched value or breakpoint arrival before `until` (or the
    /// interval's end): the second pass of a reverse-continue.
    LastEvent,
    /// The first change of a watched value after the position the guest was continued from
    /// (a forward watchpoint, by value).
    FirstChange,
}

/// Where the debugger's current travel stands.
#[derive(Debug, Clone)]
pub enum Task {
    /// Running to a position, with gdb's breakpoints lifted.
    Goto {
        to: Position,
        why: Why,
        /// Single steps still to make after the arrival.
        steps_left: Option<u64>,
    },
    /// Reverse-continue's first pass: from the checkpoint to `until` with gdb's breakpoints
    /// planted, noting the last hit and the last exit interval in which a watched value
    /// changed.
    Scan {
        /// The checkpoint (by exit count) this pass starts from: no hit between it and
        /// `until` sends the next pass from the checkpoint before it.
        from: u64,
        until: Position,
        last_hit: Option<Position>,
        /// The exit interval (by the exit count that opens it) of the last change.
        last_change: Option<u64>,
        values: Vec<u8>,
    },
    /// Finding the position of a stop the debugger did not count its way to: from exit
    /// `exits`, the arrival at its RIP with its registers; then `then` (a reverse command, or
    /// serving gdb again).
    Locate {
        exits: u64,
        regs: Box<rrr_vmm::rr::log::RegState>,
        then: Option<crate::gdb::target::Resume>,
    },
    /// Single steps through the exit interval opened by exit `interval`.
    Steps {
        interval: u64,
        want: StepWant,
        /// Where to end (reverse-step, or an interval that holds the starting position).
        until: Option<Position>,
        /// FirstChange: where the guest was continued from (its position if known, its
        /// registers), and whether that point has been passed.
        from: Option<(Option<Position>, Box<rrr_vmm::rr::log::RegState>, bool)>,
        started: bool,
        last_arrival: Option<Position>,
        event: Option<(Position, Why)>,
        values: Vec<u8>,
    },
}

impl Task {
    /// The exit count the travel must start at or before.
    pub fn starts_at(&self) -> u64 {
        match self {
            Task::Goto { to, .. } => to.exits,
            Task::Scan { from, .. } => *from,
            Task::Locate { exits, .. } => *exits,
            Task::Steps { interval, .. } => *interval,
        }
    }
}
