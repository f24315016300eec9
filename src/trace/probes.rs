//! The trace pass's probes: a one-byte `hlt` on each chosen function's `__fentry__` site and on
//! each of its return instructions, in the replaying guest's kernel text. With the irqchip in
//! the VMM, KVM hands every guest `hlt` to us, on VT-x, on AMD-V and inside the carrier alike
//! (whose emulated SVM does not intercept `int3` as `#BP`: tried first, the guest took its own
//! breakpoint trap). The guest never runs a probe: the VMM performs the instruction the probe
//! stands on. A fentry site is a 5-byte NOP (ftrace made it one at boot, before the snapshot),
//! so the vCPU moves past it; a return is performed as `ret` does (pop the return address into
//! RIP).
//!
//! The original bytes are kept: the probes are lifted before anything compares guest memory
//! (a landmark search, the final state hash), which is what makes a traced replay pass the same
//! checks as a plain one.

use std::collections::HashMap;

use anyhow::{bail, Result};
use rrr_tracer::Index;
use rrr_vmm::builder::Vmm;

use super::guest::GuestReader;

/// `hlt`: privileged, one byte, and always a VM exit to the VMM.
const PROBE: u8 = 0xf4;
/// What ftrace leaves at a `__fentry__` site, and what the linker put there.
const NOP5: [u8; 5] = [0x0f, 0x1f, 0x44, 0x00, 0x00];
const CALL: u8 = 0xe8;
const RET: u8 = 0xc3;
const JMP32: u8 = 0xe9;

/// What a breakpoint stands for, with the function it belongs to (an index into the index's
/// functions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    Entry(u32),
    Return(u32),
}

pub struct ProbeSet {
    /// Address, what it is, and the byte the breakpoint replaced.
    probes: HashMap<u64, (Probe, u8)>,
    planted: bool,
}

impl ProbeSet {
    /// The probes for `functions` (indices into `index.functions`): each one's fentry site and
    /// return sites.
    pub fn new(index: &Index, functions: &[u32]) -> ProbeSet {
        let mut probes = HashMap::new();
        let chosen: std::collections::HashSet<u32> = functions.iter().copied().collect();
        for &f in functions {
            if let Some(site) = index.functions[f as usize].fentry {
                probes.insert(site, (Probe::Entry(f), 0));
            }
        }
        for site in &index.return_sites {
            if chosen.contains(&site.function) {
                probes.insert(site.address, (Probe::Return(site.function), 0));
            }
        }
        ProbeSet {
            probes,
            planted: false,
        }
    }

    pub fn len(&self) -> usize {
        self.probes.len()
    }

    pub fn get(&self, addr: u64) -> Option<Probe> {
        self.probes.get(&addr).map(|(p, _)| *p)
    }

    /// Writes the probes. A site whose bytes
    /// are not what the probe expects (code the kernel changed since it was built) is left
    /// alone and dropped.
    pub fn plant(&mut self, vmm: &Vmm, mem: &mut GuestReader) -> Result<usize> {
        let mut dropped = 0usize;
        let mut keep = HashMap::with_capacity(self.probes.len());
        for (&addr, &(probe, _)) in &self.probes {
            let mut bytes = [0u8; 5];
            if mem.read(vmm, addr, &mut bytes).is_none() {
                dropped += 1;
                continue;
            }
            let expected = match probe {
                Probe::Entry(_) => bytes == NOP5 || bytes[0] == CALL,
                Probe::Return(_) => bytes[0] == RET || bytes[0] == JMP32,
            };
            if !expected || mem.write(vmm, addr, &[PROBE]).is_none() {
                dropped += 1;
                continue;
            }
            keep.insert(addr, (probe, bytes[0]));
        }
        self.probes = keep;
        self.planted = true;
        Ok(dropped)
    }

    /// Puts every original byte back.
    pub fn lift(&mut self, vmm: &Vmm, mem: &mut GuestReader) -> Result<()> {
        if !self.planted {
            return Ok(());
        }
        for (&addr, &(_, original)) in &self.probes {
            if mem.write(vmm, addr, &[original]).is_none() {
                bail!("cannot restore the kernel byte at {addr:#x} under a probe");
            }
        }
        self.planted = false;
        Ok(())
    }

    pub fn planted(&self) -> bool {
        self.planted
    }
}
