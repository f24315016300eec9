//! Positions in a replay: (exit count, RIP, arrivals at that RIP since that exit). Execution
//! between two synchronous exits is deterministic, so the n-th arrival at an address after exit
//! E names one instruction boundary in every replay of a recording. The trace gives every event
//! its position and gdb's `monitor goto` takes it. `H` = 0 names the exit boundary itself; a
//! position reached by single steps from a known one is that one plus a number of steps
//! (`E:RIP:H+N`).

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
