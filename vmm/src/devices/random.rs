//! The random port: deterministic entropy for the stimulus's `rdrand`/`rdseed`.
//!
//! On AMD a KVM VMM cannot intercept `rdrand`/`rdseed`, so rrr rewrites them in the stimulus
//! into traps (`rootfs-builder/src/traps.rs`) and the runtime's SIGILL handler reads this port.
//! The numbers come from a PRNG seeded from the machine's boot seed (`--seed`), and its state is
//! device state saved in snapshots: the same snapshot gives the same numbers in the same order,
//! and another seed gives others. They are not secret, only unpredictable to the program.

use serde::{Deserialize, Serialize};

use crate::bus::{BusDevice, DeviceContext};
use crate::config::RNG_SEED_LEN;

/// The device at [`rrr_guest::protocol::RANDOM_PORT`]: splitmix64, whose whole state is one word.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RandomPort {
    state: u64,
}

impl RandomPort {
    /// Seeded from the machine's boot seed, mixed with a constant of its own so the numbers are
    /// not the kernel's seed bytes.
    pub fn new(seed: &[u8; RNG_SEED_LEN]) -> Self {
        let mut state = 0x7272_725f_7264_7261; // "rrr_rdra"
        for chunk in seed.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            state = mix(state ^ u64::from_le_bytes(word));
        }
        RandomPort { state }
    }

    fn next(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.state)
    }
}

/// splitmix64's output function.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl BusDevice for RandomPort {
    /// Every access, of any width, takes one fresh number.
    fn read(&mut self, _cx: &mut DeviceContext<'_>, _base: u64, _offset: u64, data: &mut [u8]) {
        let bytes = self.next().to_le_bytes();
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = bytes[i % bytes.len()];
        }
    }

    fn write(&mut self, _cx: &mut DeviceContext<'_>, _base: u64, _offset: u64, _data: &[u8]) {
        // The guest cannot reseed it: the numbers depend on the machine's seed only.
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::VirtualTime;
    use crate::config::rng_seed;
    use crate::irq::IrqLines;

    fn inl(port: &mut RandomPort) -> u32 {
        let mut irqs = IrqLines::new();
        let mut cx = DeviceContext {
            now: VirtualTime::ZERO,
            irqs: &mut irqs,
        };
        let mut data = [0u8; 4];
        port.read(&mut cx, 0, 0, &mut data);
        u32::from_le_bytes(data)
    }

    #[test]
    fn the_same_seed_gives_the_same_numbers_and_another_seed_others() {
        let draw = |seed| {
            let mut port = RandomPort::new(&rng_seed(seed));
            (0..4).map(|_| inl(&mut port)).collect::<Vec<_>>()
        };
        assert_eq!(draw(0), draw(0));
        assert_ne!(draw(0), draw(1));
        let numbers = draw(0);
        assert!(numbers.windows(2).all(|w| w[0] != w[1]), "{numbers:x?}");
    }

    #[test]
    fn a_saved_state_continues_where_it_stopped() {
        let mut port = RandomPort::new(&rng_seed(7));
        inl(&mut port);
        let mut saved = port.clone();
        assert_eq!(inl(&mut port), inl(&mut saved));
        let text = serde_json::to_string(&port).unwrap();
        let mut restored: RandomPort = serde_json::from_str(&text).unwrap();
        assert_eq!(inl(&mut port), inl(&mut restored));
    }
}
