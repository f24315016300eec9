//! The stimulus's function probes: the marked NOPs in its `-finstrument-functions` hooks
//! (`guest/agent/func_probes.c`), turned into `out %al, (%dx)` while a trace watches.
//!
//! The hooks live in the stimulus's text, which every process running the stimulus maps from
//! one page of the page cache: one byte written there (through the page tables of a task that
//! runs the stimulus, once the page is present) probes them all. The bytes are kept by
//! guest-physical address, so lifting them (around a landmark search, before the final state
//! hash) needs no page tables.

use rrr_guest::protocol::{FUNC_ENTER_PROBE_SYMBOL, FUNC_EXIT_PROBE_SYMBOL};
use rrr_tracer::UserImage;
use rrr_vmm::builder::Vmm;
use vm_memory::{Bytes, GuestAddress};

use super::guest::GuestReader;

/// `out %al, (%dx)`: the hooks loaded the probe port into dx just before.
const OUT_DX: u8 = 0xee;
/// `nopl 0x0(%rax,%rax,1)`, what the hooks run when no trace watches.
const NOP5: [u8; 5] = [0x0f, 0x1f, 0x44, 0x00, 0x00];
/// `movw $RRR_FUNC_PROBE_PORT, %dx` before each NOP.
const MOV_DX: [u8; 4] = [
    0x66,
    0xba,
    rrr_guest::protocol::FUNC_PROBE_PORT.to_le_bytes()[0],
    rrr_guest::protocol::FUNC_PROBE_PORT.to_le_bytes()[1],
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FuncProbe {
    Enter,
    Exit,
}

struct Site {
    /// The NOP's address in the image (before the load bias).
    at: u64,
    kind: FuncProbe,
    /// Where the probe byte is, once planted.
    gpa: Option<u64>,
}

pub struct FuncProbes {
    sites: [Site; 2],
    lifted: bool,
}

impl FuncProbes {
    /// The hooks' NOPs, if the stimulus has them (one built before rrr had them does not).
    pub fn new(image: &UserImage) -> Option<FuncProbes> {
        let site = |name: &str, kind| {
            Some(Site {
                at: image.symbol(name)?,
                kind,
                gpa: None,
            })
        };
        Some(FuncProbes {
            sites: [
                site(FUNC_ENTER_PROBE_SYMBOL, FuncProbe::Enter)?,
                site(FUNC_EXIT_PROBE_SYMBOL, FuncProbe::Exit)?,
            ],
            lifted: false,
        })
    }

    /// Whether a site still waits for its page.
    pub fn wants_planting(&self) -> bool {
        !self.lifted && self.sites.iter().any(|s| s.gpa.is_none())
    }

    /// Plants the sites whose page is present now, reading through the current task's page
    /// tables; `bias` is where the current task (one running the stimulus) has the image.
    /// A site whose bytes are not the hooks' (another build, a damaged page) is left alone.
    pub fn plant(&mut self, vmm: &Vmm, mem: &mut GuestReader, bias: u64) {
        if self.lifted {
            return;
        }
        for site in self.sites.iter_mut().filter(|s| s.gpa.is_none()) {
            let va = site.at.wrapping_add(bias);
            let mut bytes = [0u8; 9];
            if mem.read(vmm, va.wrapping_sub(4), &mut bytes).is_none() {
                continue; // not faulted in yet: a later probe hit tries again
            }
            if bytes[..4] != MOV_DX || bytes[4..] != NOP5 {
                tracing::warn!(
                    address = format_args!("{va:#x}"),
                    ?bytes,
                    "the stimulus's function hook is not as built; its functions are not traced"
                );
                site.gpa = Some(u64::MAX);
                continue;
            }
            let Some(gpa) = mem.translate(vmm, va) else {
                continue;
            };
            if vmm.mem.write_obj(OUT_DX, GuestAddress(gpa)).is_ok() {
                tracing::debug!(
                    kind = ?site.kind,
                    va = format_args!("{va:#x}"),
                    gpa = format_args!("{gpa:#x}"),
                    "stimulus function probe planted"
                );
                site.gpa = Some(gpa);
            }
        }
    }

    /// The probe at `at` (an address in the image, before the bias), if it is one of ours.
    pub fn at(&self, at: u64) -> Option<FuncProbe> {
        self.sites
            .iter()
            .find(|s| s.at == at && s.gpa.is_some_and(|g| g != u64::MAX))
            .map(|s| s.kind)
    }

    /// Where the guest resumes after the probe at `at`: past the NOP.
    pub fn resume_after(at: u64) -> u64 {
        at + NOP5.len() as u64
    }

    /// The hooks' own bytes back (the guest's memory is its own again).
    pub fn lift(&mut self, vmm: &Vmm) {
        self.write_all(vmm, NOP5[0]);
        self.lifted = true;
    }

    pub fn replant(&mut self, vmm: &Vmm) {
        self.write_all(vmm, OUT_DX);
        self.lifted = false;
    }

    fn write_all(&self, vmm: &Vmm, byte: u8) {
        for gpa in self.sites.iter().filter_map(|s| s.gpa) {
            if gpa != u64::MAX {
                // The page was guest RAM when planted and guest RAM does not move.
                let _ = vmm.mem.write_obj(byte, GuestAddress(gpa));
            }
        }
    }
}
