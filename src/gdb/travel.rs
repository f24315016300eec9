//! Positions in a replay, and the travels the debugger makes between them (reverse execution).
//!
//! A position is (exit count, RIP, arrivals at that RIP since that exit): execution between two
//! synchronous exits is deterministic, so the n-th arrival at an address after exit E names one
//! instruction boundary. The debugger counts arrivals at the addresses where it has a `hlt`
//! planted for a whole exit interval; a position reached by single steps from a known one is
//! that one plus a number of steps (`E:RIP:H+N`). `H` = 0 names the exit boundary itself.
//!
//! Going back restores the READY checkpoint kept in memory and replays forward (a checkpoint
//! interval of "infinity" for now: see the README); the first pass of a reverse-continue
//! replays with gdb's breakpoints planted and notes the last hit before where it started, the
//! second goes there.

use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub exits: u64,
    pub rip: u64,
    pub hits: u64,
    /// Single steps after that arrival.
    pub steps: u64,
}

impl Position {
    pub fn boundary(exits: u64, rip: u64) -> Self {
        Position {
            exits,
            rip,
            hits: 0,
            steps: 0,
        }
    }

    pub fn arrival(exits: u64, rip: u64, hits: u64) -> Self {
        Position {
            exits,
            rip,
            hits,
            steps: 0,
        }
    }

    pub fn stepped(self) -> Self {
        Position {
            steps: self.steps + 1,
            ..self
        }
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{:#x}:{}", self.exits, self.rip, self.hits)?;
        if self.steps > 0 {
            write!(f, "+{}", self.steps)?;
        }
        Ok(())
    }
}

impl FromStr for Position {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let bad =
            || format!("{text:?} is not a position (EXITS:RIP:HITS, as `monitor when` prints it)");
        let mut parts = text.trim().split(':');
        let (Some(exits), Some(rip), Some(hits), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        let (hits, steps) = match hits.split_once('+') {
            Some((hits, steps)) => (hits, steps.parse().map_err(|_| bad())?),
            None => (hits, 0),
        };
        let rip = rip.trim_start_matches("0x");
        Ok(Position {
            exits: exits.parse().map_err(|_| bad())?,
            rip: u64::from_str_radix(rip, 16).map_err(|_| bad())?,
            hits: hits.parse().map_err(|_| bad())?,
            steps,
        })
    }
}

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

#[cfg(test)]
mod tests {
    use super::Position;

    #[test]
    fn positions_print_as_they_parse() {
        let p: Position = "19197:0xffffffff8117fd33:2".parse().unwrap();
        assert_eq!(p, Position::arrival(19197, 0xffff_ffff_8117_fd33, 2));
        assert_eq!(p.to_string(), "19197:0xffffffff8117fd33:2");
        let q = p.stepped().stepped();
        assert_eq!(q.to_string(), "19197:0xffffffff8117fd33:2+2");
        assert_eq!(q.to_string().parse::<Position>().unwrap(), q);
        assert!("12:34".parse::<Position>().is_err());
        assert!("a:0x1:2".parse::<Position>().is_err());
    }
}
