//! Reading guest memory by virtual address for the trace pass. Every address comes from the
//! guest (registers, pointers in its structs), so every read can fail and is bounded.
//!
//! Kernel text, data and the direct map keep their translations for the whole run, so those
//! pages are translated once; anything else (user memory, vmalloc'd stacks) is walked again
//! through the page tables the vCPU uses now.

use rrr_vmm::arch::x86_64::walk::PagingMode;
use rrr_vmm::builder::Vmm;
// Looked up at every guest read: FxHash costs little next to SipHash, which showed in profiles
// of the replay inside the carrier (where rrr's own code runs emulated).
use rustc_hash::FxHashMap as HashMap;
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};

use super::stubs::CopiedString;

/// The direct map of a kernel without memory randomisation, and the kernel image mapping.
pub const DIRECT_MAP: std::ops::Range<u64> = 0xffff_8880_0000_0000..0xffff_c880_0000_0000;
const KERNEL_IMAGE: u64 = 0xffff_ffff_8000_0000;

pub struct GuestReader {
    /// The page tables in use now, for user addresses; taken again after [`refresh`].
    paging: Option<PagingMode>,
    /// Page tables that map the kernel: the kernel half is the same in every address space
    /// (without page-table isolation), so kernel addresses need no fresh root.
    kernel_paging: Option<PagingMode>,
    stable_pages: HashMap<u64, u64>,
    /// Other pages walked since the last [`refresh`](Self::refresh) (the same tables since).
    recent_pages: HashMap<u64, u64>,
}

impl GuestReader {
    pub fn new() -> Self {
        GuestReader {
            paging: None,
            kernel_paging: None,
            stable_pages: HashMap::default(),
            recent_pages: HashMap::default(),
        }
    }

    /// Forgets the page-table root for user addresses: the next walk of one takes the vCPU's
    /// current root (the task, and so the address space, may have changed).
    pub fn refresh(&mut self) {
        self.paging = None;
        self.recent_pages.clear();
    }

    /// Takes the page tables for user addresses from the running task's `mm->pgd` (`pgd`, a
    /// kernel address), which is what CR3 holds while it runs in the kernel: no ioctl for the
    /// vCPU's registers, which inside the carrier costs about as much as an exit. `None` (a
    /// kernel thread, on borrowed tables) leaves them to be asked of the vCPU.
    pub fn use_user_tables(&mut self, vmm: &Vmm, pgd: Option<u64>) {
        self.paging = None;
        let Some(pgd) = pgd else {
            return;
        };
        let Some(root) = self.translate(vmm, pgd) else {
            return;
        };
        if let Some(kernel) = self.kernel_paging {
            self.paging = Some(PagingMode {
                cr3: root & !0xfff,
                ..kernel
            });
        }
    }

    fn paging(&mut self, vmm: &Vmm) -> Option<PagingMode> {
        if self.paging.is_none() {
            let s = vmm.vcpu.fd.get_sregs().ok()?;
            self.paging = Some(PagingMode::of(&s));
        }
        self.paging
    }

    /// Translates with the kernel's tables, taking the current ones the first time (or after
    /// a walk failed with them).
    fn kernel_translate(&mut self, vmm: &Vmm, gva: u64) -> Option<u64> {
        if let Some(paging) = self.kernel_paging {
            if let Ok(gpa) = paging.translate(&vmm.mem, gva) {
                return Some(gpa);
            }
        }
        self.paging = None;
        let paging = self.paging(vmm)?;
        let gpa = paging.translate(&vmm.mem, gva).ok()?;
        self.kernel_paging = Some(paging);
        Some(gpa)
    }

    /// The guest-physical address of `gva`.
    pub fn translate(&mut self, vmm: &Vmm, gva: u64) -> Option<u64> {
        let stable = DIRECT_MAP.contains(&gva) || gva >= KERNEL_IMAGE;
        let page = gva & !0xfff;
        let known = if stable {
            &self.stable_pages
        } else {
            &self.recent_pages
        };
        if let Some(gpa) = known.get(&page) {
            return Some(gpa | (gva & 0xfff));
        }
        let gpa = if gva >> 63 == 1 {
            self.kernel_translate(vmm, gva)?
        } else {
            self.paging(vmm)?.translate(&vmm.mem, gva).ok()?
        };
        if stable {
            self.stable_pages.insert(page, gpa & !0xfff);
        } else {
            self.recent_pages.insert(page, gpa & !0xfff);
        }
        Some(gpa)
    }

    /// Reads `out.len()` bytes at `gva`, page by page.
    pub fn read(&mut self, vmm: &Vmm, gva: u64, out: &mut [u8]) -> Option<()> {
        self.each_page(vmm, gva, out.len(), |span, gpa| {
            vmm.mem.read_slice(&mut out[span], GuestAddress(gpa)).ok()
        })
    }

    /// Writes guest memory at `gva` (the probes' bytes), page by page.
    pub fn write(&mut self, vmm: &Vmm, gva: u64, bytes: &[u8]) -> Option<()> {
        self.each_page(vmm, gva, bytes.len(), |span, gpa| {
            vmm.mem.write_slice(&bytes[span], GuestAddress(gpa)).ok()
        })
    }

    /// `len` bytes at `gva` split at page boundaries, each part (its range in the buffer, its
    /// guest-physical address) to `part`; `None` at the first page not mapped.
    fn each_page(
        &mut self,
        vmm: &Vmm,
        gva: u64,
        len: usize,
        mut part: impl FnMut(std::ops::Range<usize>, u64) -> Option<()>,
    ) -> Option<()> {
        let mut done = 0usize;
        while done < len {
            let at = gva.checked_add(done as u64)?;
            let n = ((0x1000 - (at & 0xfff)) as usize).min(len - done);
            part(done..done + n, self.translate(vmm, at)?)?;
            done += n;
        }
        Some(())
    }
}

/// Guest memory as the trace's decoding reads it: live, or as it was captured at the moment of
/// an event (when the trace is written after the replay, outside the VM's process).
pub trait Memory {
    /// Reads `out.len()` bytes at `gva`; `None` if any is not mapped.
    fn read(&mut self, gva: u64, out: &mut [u8]) -> Option<()>;

    fn read_u64(&mut self, gva: u64) -> Option<u64> {
        let mut bytes = [0u8; 8];
        self.read(gva, &mut bytes)?;
        Some(u64::from_le_bytes(bytes))
    }

    fn read_u32(&mut self, gva: u64) -> Option<u32> {
        let mut bytes = [0u8; 4];
        self.read(gva, &mut bytes)?;
        Some(u32::from_le_bytes(bytes))
    }

    /// A NUL-terminated string of at most `max` bytes; `None` if its first byte cannot be
    /// read. The flag says whether it was cut at `max`.
    fn read_c_string(&mut self, gva: u64, max: usize) -> Option<(String, bool)> {
        let mut bytes = Vec::new();
        let mut at = gva;
        while bytes.len() < max {
            let in_page = (0x1000 - (at & 0xfff)) as usize;
            let n = in_page.min(max - bytes.len());
            let mut chunk = vec![0u8; n];
            if self.read(at, &mut chunk).is_none() {
                if bytes.is_empty() {
                    return None;
                }
                break;
            }
            if let Some(end) = chunk.iter().position(|&b| b == 0) {
                bytes.extend_from_slice(&chunk[..end]);
                return Some((String::from_utf8_lossy(&bytes).into_owned(), false));
            }
            bytes.extend_from_slice(&chunk);
            at += n as u64;
        }
        Some((String::from_utf8_lossy(&bytes).into_owned(), true))
    }
}

/// The replaying guest's memory now. With `capture`, every successful read is also kept, so the
/// same reads can be answered later from a [`Captured`].
pub struct Live<'a> {
    pub vmm: &'a Vmm,
    pub reader: &'a mut GuestReader,
    pub capture: Option<&'a mut Captured>,
}

impl Memory for Live<'_> {
    fn read(&mut self, gva: u64, out: &mut [u8]) -> Option<()> {
        let read = self.reader.read(self.vmm, gva, out);
        if let Some(captured) = &mut self.capture {
            match read {
                Some(()) => captured.keep(gva, out),
                None => captured.unreadable.push((gva, out.len() as u64)),
            }
        }
        read
    }
}

/// Guest memory read at one event, kept with it: reading it again gives the same answers.
/// Reads that failed then are kept too, so a read that was never made (something the trace
/// reads that the observer did not: a bug) is told apart and counted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Captured {
    /// Each read kept: where, and how many bytes (in order, their bytes one after another in
    /// `bytes`: one buffer, written as one block, which inside the carrier is what costs).
    reads: Vec<(u64, u32)>,
    #[serde(with = "serde_bytes")]
    bytes: Vec<u8>,
    unreadable: Vec<(u64, u64)>,
    #[serde(skip)]
    pub uncaptured: u64,
}

impl Memory for Captured {
    fn read(&mut self, gva: u64, out: &mut [u8]) -> Option<()> {
        let end = gva.checked_add(out.len() as u64)?;
        let found = self
            .blocks()
            .find(|(at, bytes)| *at <= gva && end <= at + bytes.len() as u64);
        let Some((at, bytes)) = found else {
            let failed_then = self
                .unreadable
                .iter()
                .any(|&(at, len)| at <= gva && gva < at + len.max(1));
            if !failed_then {
                self.uncaptured += 1;
            }
            return None;
        };
        let from = (gva - at) as usize;
        out.copy_from_slice(&bytes[from..from + out.len()]);
        Some(())
    }
}

impl Captured {
    /// Keeps the bytes a read at `gva` gave.
    fn keep(&mut self, gva: u64, bytes: &[u8]) {
        self.reads.push((gva, bytes.len() as u32));
        self.bytes.extend_from_slice(bytes);
    }

    /// Each read kept, with its bytes.
    fn blocks(&self) -> impl Iterator<Item = (u64, &[u8])> {
        let mut from = 0usize;
        self.reads.iter().filter_map(move |&(at, len)| {
            let bytes = self.bytes.get(from..from + len as usize)?;
            from += len as usize;
            Some((at, bytes))
        })
    }

    /// The NUL-terminated string of at most `max` bytes at `gva`, if the bytes up to its end
    /// (or to `max`) were all read: what [`Memory::read_c_string`] gave then. It counts no
    /// uncaptured read: a caller asks for memory captured at another event, which may not have
    /// it.
    pub fn c_string(&self, gva: u64, max: usize) -> Option<(String, bool)> {
        let mut bytes = Vec::new();
        let mut at = gva;
        while bytes.len() < max {
            let (start, block) = self
                .blocks()
                .find(|(start, block)| *start <= at && at - start < block.len() as u64)?;
            let rest = &block[(at - start) as usize..];
            let rest = &rest[..rest.len().min(max - bytes.len())];
            if let Some(end) = rest.iter().position(|&b| b == 0) {
                bytes.extend_from_slice(&rest[..end]);
                return Some((String::from_utf8_lossy(&bytes).into_owned(), false));
            }
            bytes.extend_from_slice(rest);
            at += rest.len() as u64;
        }
        Some((String::from_utf8_lossy(&bytes).into_owned(), true))
    }
}

/// The two stack words above a call's return address (`base` is `rsp + 8`), as an entry stub
/// recorded them: the memory a function's stack arguments are read from.
pub struct StackWords {
    pub base: u64,
    pub words: [u64; 2],
}

impl Memory for StackWords {
    fn read(&mut self, gva: u64, out: &mut [u8]) -> Option<()> {
        let from = usize::try_from(gva.checked_sub(self.base)?).ok()?;
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&self.words[0].to_le_bytes());
        bytes[8..].copy_from_slice(&self.words[1].to_le_bytes());
        out.copy_from_slice(bytes.get(from..from.checked_add(out.len())?)?);
        Some(())
    }
}

/// What the trace has to read for a stub's record: its stack words, and for the user strings
/// an entry stub passes on (never a kernel one, see `stubs::StubKind::EntryUserStrings`), the
/// memory its task's system call captured at its start.
pub struct RecordMemory<'a> {
    pub stack: StackWords,
    pub user: Option<&'a Captured>,
    /// The kernel string the stub copied with the record.
    pub copied: Option<&'a CopiedString>,
}

impl Memory for RecordMemory<'_> {
    fn read(&mut self, gva: u64, out: &mut [u8]) -> Option<()> {
        self.stack.read(gva, out)
    }

    fn read_c_string(&mut self, gva: u64, max: usize) -> Option<(String, bool)> {
        if let Some(copied) = self.copied.filter(|c| c.at == gva) {
            return Some(copied.shown(max));
        }
        if gva >> 63 != 0 {
            return None;
        }
        self.user?.c_string(gva, max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captured_memory_answers_the_reads_it_kept_and_no_others() {
        let mut captured = Captured::default();
        captured.keep(0x1000, b"abc\0");
        captured.keep(0x2000, &7u64.to_le_bytes());
        assert_eq!(captured.read_u64(0x2000), Some(7));
        assert_eq!(captured.read_u32(0x2004), Some(0));
        assert_eq!(captured.read_u64(0x2004), None);
        let mut out = [0u8; 2];
        assert_eq!(captured.read(0x1001, &mut out), Some(()));
        assert_eq!(&out, b"bc");
        assert_eq!(captured.read_u64(0x3000), None);
        assert_eq!(captured.uncaptured, 2, "two reads no one made before");
        captured.unreadable.push((0x3000, 8));
        assert_eq!(captured.read_u64(0x3000), None);
        assert_eq!(
            captured.uncaptured, 2,
            "a read that failed then fails again"
        );
    }

    #[test]
    fn a_string_is_taken_from_captured_memory_only_as_far_as_it_was_read() {
        let mut captured = Captured::default();
        // A string read across a page boundary: two reads.
        captured.keep(0x1ffc, b"/tmp");
        captured.keep(0x2000, b"/f\0garbage");
        captured.keep(0x3000, b"abcdefgh");
        assert_eq!(
            captured.c_string(0x1ffc, 96),
            Some(("/tmp/f".into(), false))
        );
        assert_eq!(captured.c_string(0x1fff, 96), Some(("p/f".into(), false)));
        assert_eq!(captured.c_string(0x3000, 4), Some(("abcd".into(), true)));
        assert_eq!(
            captured.c_string(0x3000, 96),
            None,
            "the bytes after the read are unknown"
        );
        assert_eq!(captured.c_string(0x4000, 96), None);
        assert_eq!(captured.uncaptured, 0);
        let mut record = RecordMemory {
            stack: StackWords {
                base: 0x9000,
                words: [1, 2],
            },
            user: Some(&captured),
            copied: None,
        };
        assert_eq!(record.read_u64(0x9008), Some(2));
        assert_eq!(
            record.read_c_string(0x1ffc, 96),
            Some(("/tmp/f".into(), false))
        );
        assert_eq!(
            record.read_c_string(0xffff_8880_0000_1ffc, 96),
            None,
            "kernel memory is never taken from a capture"
        );
    }
}
