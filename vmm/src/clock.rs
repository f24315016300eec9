//! Virtual time: the only clock any device may read.
//!
//! Time advances by a fixed quantum at every synchronous exit and jumps to the next timer
//! deadline when the guest halts, so the same sequence of exits always sees the same times.

/// A point in virtual time, in nanoseconds since the VM was created.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Default,
    serde::Serialize,
    serde::Deserialize,
)]
pub struct VirtualTime(pub u64);

impl VirtualTime {
    pub const ZERO: VirtualTime = VirtualTime(0);

    pub fn from_nanos(ns: u64) -> Self {
        VirtualTime(ns)
    }

    pub fn as_nanos(self) -> u64 {
        self.0
    }

    pub fn saturating_add_nanos(self, ns: u64) -> Self {
        VirtualTime(self.0.saturating_add(ns))
    }

    pub fn saturating_sub(self, earlier: VirtualTime) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

/// The VM's clock, owned by the run loop and lent to devices as a [`VirtualTime`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VirtualClock {
    now: VirtualTime,
    quantum_ns: u64,
}

impl VirtualClock {
    /// `quantum_ns` is how far time moves at each synchronous exit.
    pub fn new(quantum_ns: u64) -> Self {
        VirtualClock {
            now: VirtualTime::ZERO,
            quantum_ns,
        }
    }

    pub fn now(&self) -> VirtualTime {
        self.now
    }

    pub fn quantum_ns(&self) -> u64 {
        self.quantum_ns
    }

    /// One synchronous exit happened.
    pub fn tick(&mut self) -> VirtualTime {
        self.now = self.now.saturating_add_nanos(self.quantum_ns);
        self.now
    }

    /// The guest ran code worth `ns` (a progress exit): time moves by that instead of a quantum.
    pub fn advance_by(&mut self, ns: u64) -> VirtualTime {
        self.now = self.now.saturating_add_nanos(ns);
        self.now
    }

    /// The guest is idle: jump to `deadline` if it is in the future.
    pub fn advance_to(&mut self, deadline: VirtualTime) -> VirtualTime {
        if deadline > self.now {
            self.now = deadline;
        }
        self.now
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_by_quantum_and_never_goes_back() {
        let mut clock = VirtualClock::new(1_000);
        assert_eq!(clock.tick(), VirtualTime(1_000));
        assert_eq!(clock.advance_to(VirtualTime(500)), VirtualTime(1_000));
        assert_eq!(clock.advance_to(VirtualTime(9_000)), VirtualTime(9_000));
        assert_eq!(clock.tick(), VirtualTime(10_000));
        assert_eq!(clock.advance_by(131_072), VirtualTime(141_072));
    }
}
