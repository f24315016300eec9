//! In-guest probes: calls recorded without a VM exit.
//!
//! A `hlt` probe costs an exit per call and per return, about 100 µs each inside the carrier.
//! Where rrr's kernel patch left room for it (`rrr_trace_text` in `.text`, `rrr_trace_data` in
//! `.bss`, see `kernels/src/patches.rs`), a traced function's `__fentry__` NOP and its
//! `ret; int3 x4` return sites become a 5-byte `jmp` to a stub of its own in that room:
//!
//! ```text
//! site stub (16 bytes):  movq $SITE, data.site(%rip); jmp common
//! common (entry):        save rcx; rcx = data.remaining; jrcxz full; remaining -= 1;
//!                        rcx = data.cursor; store rdi rsi rdx rcx r8 r9 rsp site current there
//!                        (and [rsp+8], [rsp+16] for stack arguments);
//!                        cursor += RECORD_SIZE; restore rax rcx; jmp *(site + 5)
//! common (return):       the same with rax and rdx, then ret
//! string check (entry):  each string register's top byte: zero (user or NULL) goes on to the
//!                        entry; a kernel string in always-mapped memory to the entry that
//!                        copies it; any other to a hlt (the VMM reads the string there)
//! common (string return): rcx = rax; jrcxz return (NULL); in always-mapped memory: the return
//!                        that copies it; else hlt (the VMM reads it and performs the ret)
//! copying entry/return:  the same, with three slots: the record, then the string's first 96
//!                        bytes, copied byte by byte up to its NUL, in two extension slots
//! full:                  hlt (the VMM drains the buffer), then try again
//! ```
//!
//! The stubs change no register, no flag (only `mov`, `lea`, `not`, `bswap`, `movzx` and
//! `jrcxz`) and no byte of the guest's own memory; interrupts are injected at exits only, so
//! none lands inside one. A kernel string is copied only from memory no page of which the
//! kernel unmaps while it runs ([`CopyRanges`]: its read-only data, and the direct map of a
//! kernel without KFENCE or DEBUG_PAGEALLOC), and only its own bytes are read, so a copy cannot
//! fault. The VMM drains the records at every exit, so each is handled in order with the `hlt`
//! probes (kept for what must be read from memory at the call: system calls, other kernel
//! strings, deeper stack arguments) and stamped with the exit it followed. The room is put back
//! to the `int3`s and zeroes it held before the final state is compared.

use anyhow::{bail, Context, Result};
use rrr_guest::protocol::{TRACE_DATA_SIZE, TRACE_DATA_SYMBOL, TRACE_TEXT_SIZE, TRACE_TEXT_SYMBOL};
use rrr_tracer::Index;
use rrr_vmm::builder::Vmm;
use vm_memory::{Bytes, GuestAddress};

use super::guest::GuestReader;

/// The header at the start of the data area (offsets). Its scratch slots are shared by every
/// stub: rrr's guests have one vCPU, and no interrupt lands inside a stub.
const CURSOR: u64 = 0x00;
const REMAINING: u64 = 0x08;
const SAVED_RCX: u64 = 0x10;
const SAVED_RAX: u64 = 0x18;
const SITE: u64 = 0x20;
/// Registers a string copy uses, kept while it runs.
const SAVED_RDX: u64 = 0x28;
const SAVED_RSI: u64 = 0x30;
const SAVED_RDI: u64 = 0x38;
const SAVED_R8: u64 = 0x40;
/// The kernel string a stub copies.
const COPY_SOURCE: u64 = 0x48;
/// The ranges a kernel string is copied from: each one's bounds, negated (`lea` adds them).
const COPY_RANGES: u64 = 0x50;
const MAX_COPY_RANGES: u64 = 2;
/// Where a string is copied first, in one piece.
const SCRATCH: u64 = 0x80;
/// The records, after the header's page.
const RECORDS: u64 = 0x1000;
/// One record: the site, six registers, `rsp`, the current task, and (entries of functions with
/// arguments on the stack) the two stack words above the return address.
pub const RECORD_SIZE: u64 = 88;
/// The bytes of a kernel string a stub copies: as many as the trace shows (`decode::MAX_STRING`).
pub const STRING_BYTES: usize = 96;
/// A record with a copied string is followed by two slots of the record's size that start with
/// a zero word (never a site): the string's bytes (80 in the first, 16 in the second) and, in
/// the second, the address they were read at.
const EXTENSION_SLOTS: u64 = 2;
const SECOND_EXTENSION: u64 = 2 * RECORD_SIZE;
const COPIED_FROM: u64 = SECOND_EXTENSION + 24;
/// A site's stub.
const STUB_SIZE: u64 = 16;
/// The common code's share of the text area.
const COMMON_SIZE: u64 = 0x1000;

const INT3: u8 = 0xcc;
/// Caps the buffer at this many record slots, 3 at least (tests: a tiny buffer fills at almost
/// every call, and must give the same trace).
pub const CAPACITY_ENV: &str = "RRR_TRACE_STUB_CAPACITY";

/// One call or return, as its stub recorded it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    /// The probed site (a `__fentry__` site or a return site).
    pub site: u64,
    /// At an entry: `rdi rsi rdx rcx r8 r9`. At a return: `rax rdx` and four zeroes.
    pub regs: [u64; 6],
    pub rsp: u64,
    pub current: u64,
    /// `[rsp + 8]` and `[rsp + 16]` at an entry of a function with arguments on the stack.
    pub stack: [u64; 2],
}

/// A kernel string a stub copied with its record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopiedString {
    /// Where it was read.
    pub at: u64,
    /// Its first [`STRING_BYTES`] bytes (those after its NUL are stale).
    pub bytes: [u8; STRING_BYTES],
}

impl CopiedString {
    /// The string as reading at most `max` bytes of it shows it: up to its NUL, or cut at `max`.
    pub fn shown(&self, max: usize) -> (String, bool) {
        let bytes = &self.bytes[..max.min(STRING_BYTES)];
        match bytes.iter().position(|&b| b == 0) {
            Some(end) => (String::from_utf8_lossy(&bytes[..end]).into_owned(), false),
            None => (String::from_utf8_lossy(bytes).into_owned(), true),
        }
    }
}

/// The records in a drained run of slots, each with the string copied with it, if any.
pub fn records(raw: &[u8]) -> impl Iterator<Item = (Record, Option<CopiedString>)> + '_ {
    let size = RECORD_SIZE as usize;
    let slots = raw.len() / size;
    let mut i = 0usize;
    std::iter::from_fn(move || {
        while i < slots && Record::is_extension(&raw[i * size..]) {
            // An extension without its record (a drain never splits them): skipped.
            i += 1;
        }
        if i >= slots {
            return None;
        }
        let start = i * size;
        let record = Record::parse(&raw[start..start + size]);
        i += 1;
        let extended = i + 1 < slots
            && Record::is_extension(&raw[i * size..])
            && Record::is_extension(&raw[(i + 1) * size..]);
        let copied = extended.then(|| {
            let first = &raw[start + size + 8..start + 2 * size];
            let second = start + SECOND_EXTENSION as usize;
            let mut bytes = [0u8; STRING_BYTES];
            bytes[..first.len()].copy_from_slice(first);
            bytes[first.len()..]
                .copy_from_slice(&raw[second + 8..second + 8 + STRING_BYTES - first.len()]);
            let from = start + COPIED_FROM as usize;
            let at = u64::from_le_bytes(raw[from..from + 8].try_into().unwrap());
            i += EXTENSION_SLOTS as usize;
            CopiedString { at, bytes }
        });
        Some((record, copied))
    })
}

/// Where in guest memory a stub may read a kernel string: ranges that stay mapped for the whole
/// run, so that the copy cannot fault (`lo..hi`: where a string may start, so that all
/// [`STRING_BYTES`] bytes lie inside).
#[derive(Debug, Clone, Default)]
pub struct CopyRanges {
    ranges: Vec<(u64, u64)>,
    /// Whether the kernel keeps all of its direct map mapped.
    direct_map_stays: bool,
}

impl CopyRanges {
    /// The kernel's read-only data (string literals). The direct map joins them
    /// ([`Self::with_direct_map`]) where the kernel never unmaps a page of it: without KFENCE or
    /// DEBUG_PAGEALLOC, which both unmap freed pages (a stub's read there would fault, or be
    /// reported as the use after free that the callee's own read may be).
    pub fn of(index: &Index) -> CopyRanges {
        let symbol = |name| index.symbol(name).map(|s| s.address);
        let mut ranges = CopyRanges {
            ranges: Vec::new(),
            direct_map_stays: symbol("__kfence_pool").is_none()
                && symbol("_debug_pagealloc_enabled").is_none(),
        };
        if let (Some(lo), Some(end)) = (symbol("__start_rodata"), symbol("__end_rodata")) {
            ranges.add(lo, end);
        }
        ranges
    }

    /// The direct map's first `len` bytes from `base` (the guest's RAM below its first hole).
    pub fn with_direct_map(mut self, base: u64, len: u64) -> CopyRanges {
        if self.direct_map_stays {
            self.add(base, base.saturating_add(len));
        }
        self
    }

    fn add(&mut self, lo: u64, end: u64) {
        if end.saturating_sub(lo) > STRING_BYTES as u64
            && (self.ranges.len() as u64) < MAX_COPY_RANGES
        {
            self.ranges.push((lo, end - STRING_BYTES as u64));
        }
    }
}

/// Which common code a site's stub goes on to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StubKind {
    Entry,
    /// An entry whose function has arguments on the stack (at most two words, at `rsp + 8` and
    /// `rsp + 16`): they are in its caller's frame, so reading them cannot fault.
    EntryWithStack,
    /// An entry whose function takes strings, in `registers`. A user address or NULL in each is
    /// recorded like any entry: a stub cannot read user memory (it could fault, and would touch
    /// the page tables' accessed bits), and the trace finds the string in what the system call's
    /// own `hlt` captured of it. A kernel string in `copy` (one of them) is copied with the
    /// record where it lies in memory that is always mapped ([`CopyRanges`]). Any other kernel
    /// address stops at a `hlt`, where the VMM reads the string now (see
    /// [`StubArea::stub_halt_site`]).
    EntryUserStrings {
        stack: bool,
        registers: ArgRegisters,
        copy: Option<ArgRegisters>,
    },
    Return,
    /// The return of a function that returns a string (see [`StubArea::stub_halt_site`]).
    StringReturn,
}

/// A set of argument registers (`rdi rsi rdx rcx r8 r9`), one bit each by x86 register number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ArgRegisters(u16);

impl ArgRegisters {
    const ORDER: [u8; 6] = [RDI, RSI, RDX, RCX, R8, R9];

    /// Adds argument register `n` (0 for `rdi` to 5 for `r9`).
    pub fn with_argument(self, n: usize) -> ArgRegisters {
        ArgRegisters(self.0 | 1 << Self::ORDER[n])
    }

    /// The set of argument register `n` alone.
    pub fn argument(n: usize) -> ArgRegisters {
        ArgRegisters::default().with_argument(n)
    }

    fn without(self, other: Option<ArgRegisters>) -> ArgRegisters {
        ArgRegisters(self.0 & !other.map_or(0, |o| o.0))
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    fn registers(self) -> impl Iterator<Item = u8> {
        Self::ORDER
            .into_iter()
            .filter(move |r| self.0 & 1 << r != 0)
    }
}

impl Record {
    /// One record as the stub wrote it (`RECORD_SIZE` bytes).
    pub fn parse(bytes: &[u8]) -> Record {
        let word = |i: usize| u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().unwrap());
        Record {
            site: word(0),
            regs: [word(1), word(2), word(3), word(4), word(5), word(6)],
            rsp: word(7),
            current: word(8),
            stack: [word(9), word(10)],
        }
    }

    /// The current task of the record at the start of `bytes`.
    pub fn current_of(bytes: &[u8]) -> u64 {
        u64::from_le_bytes(bytes[64..72].try_into().unwrap())
    }

    /// Whether the slot at the start of `bytes` continues the record before it (a copied
    /// string) rather than being a record.
    pub fn is_extension(bytes: &[u8]) -> bool {
        bytes[..8] == [0; 8]
    }

    /// The registers an entry or return record kept, in DWARF's numbering (the others zero).
    pub fn regs(&self, is_return: bool) -> [u64; 16] {
        let mut regs = [0; 16];
        regs[7] = self.rsp;
        if is_return {
            (regs[0], regs[1]) = (self.regs[0], self.regs[1]);
        } else {
            let [rdi, rsi, rdx, rcx, r8, r9] = self.regs;
            (regs[5], regs[4], regs[1], regs[2], regs[8], regs[9]) = (rdi, rsi, rdx, rcx, r8, r9);
        }
        regs
    }
}

/// Where the current task's pointer is, as the stubs read it.
#[derive(Debug, Clone, Copy)]
pub enum CurrentAt {
    /// `%gs:offset` (an SMP kernel's per-CPU variable).
    PerCpu(u64),
    /// A plain variable (a UP kernel).
    Global(u64),
}

/// The stub room in one kernel, and what has been written there.
pub struct StubArea {
    text: u64,
    text_size: u64,
    data: u64,
    /// Where the data area is in guest-physical memory (the kernel image is contiguous there),
    /// so that a drain is one copy.
    data_gpa: u64,
    capacity: u64,
    /// The common code each kind of stub goes on to.
    commons: Commons,
    /// The checks of [`StubKind::EntryUserStrings`] stubs, one per kind (made when a site first
    /// needs them, in the site stubs' room).
    checks: std::collections::HashMap<StubKind, u64>,
    /// Where kernel strings are copied from.
    copy_ranges: CopyRanges,
    /// Where a string-returning function's stub stops when the string is not NULL.
    string_halt: u64,
    /// Where an entry's string check jumps for a kernel string, and its `hlt`.
    kernel_string: u64,
    kernel_string_halt: u64,
    /// The `hlt`s the stubs stop at when the buffer is full (addresses of the `hlt`s).
    full_halts: Vec<u64>,
    /// Where the next site's stub goes.
    next_stub: u64,
    /// How far records have ever been written (zeroed again when the room is put back).
    high_water: u64,
    written: bool,
}

impl StubArea {
    /// The room in `index`'s kernel, if it has rrr's patch.
    pub fn find(index: &Index) -> Option<StubArea> {
        let text = index.symbol(TRACE_TEXT_SYMBOL)?.address;
        let data = index.symbol(TRACE_DATA_SYMBOL)?.address;
        let room = (TRACE_DATA_SIZE - RECORDS) / RECORD_SIZE;
        let capped = std::env::var(CAPACITY_ENV).ok().and_then(|v| {
            // A record with a copied string takes three slots: the buffer holds one at least.
            let least = 1 + EXTENSION_SLOTS;
            let n = v.parse::<u64>().ok().filter(|&n| n >= least);
            if n.is_none() {
                tracing::warn!(
                    "{CAPACITY_ENV}={v:?} is not a number of record slots of {least} or more; ignored"
                );
            }
            n
        });
        Some(StubArea {
            text,
            text_size: TRACE_TEXT_SIZE,
            data,
            data_gpa: 0,
            capacity: capped.map_or(room, |n| n.min(room)),
            commons: Commons::default(),
            checks: std::collections::HashMap::new(),
            copy_ranges: CopyRanges::default(),
            string_halt: 0,
            kernel_string: 0,
            kernel_string_halt: 0,
            full_halts: Vec::new(),
            next_stub: text + COMMON_SIZE,
            high_water: 0,
            written: false,
        })
    }

    /// How many more site stubs fit.
    pub fn room(&self) -> u64 {
        (self.text + self.text_size - self.next_stub) / STUB_SIZE
    }

    /// Writes the common code and an empty buffer. Site stubs come after, one per site.
    pub fn prepare(
        &mut self,
        vmm: &Vmm,
        mem: &mut GuestReader,
        current: CurrentAt,
        copy_ranges: CopyRanges,
    ) -> Result<()> {
        let data = self.data;
        let first = mem.translate(vmm, data);
        let last = mem.translate(vmm, data + TRACE_DATA_SIZE - 1);
        self.data_gpa = match (first, last) {
            (Some(first), Some(last)) if last.wrapping_sub(first) == TRACE_DATA_SIZE - 1 => first,
            _ => bail!("the trace buffer at {data:#x} is not mapped to one physical range: this kernel's image is not what rrr built"),
        };
        let mut asm = Asm::new(self.text);
        let entry = entry_common(&mut asm, data, current, false, false);
        let entry_with_stack = entry_common(&mut asm, data, current, true, false);
        let entry_copy = entry_common(&mut asm, data, current, false, true);
        let entry_with_stack_copy = entry_common(&mut asm, data, current, true, true);
        let ret = return_common(&mut asm, data, current, false);
        let ret_copy = return_common(&mut asm, data, current, true);

        // A function that returns a string: a NULL one (most of `step_into`'s and
        // `path_init`'s) is recorded as any return; one in always-mapped kernel memory is
        // copied with the record; another stops at a `hlt`, where the VMM reads the string now
        // and performs the `ret`, as at a `hlt` probe on the site.
        let string_return = asm.here();
        asm.store_rip(RCX, data + SAVED_RCX);
        asm.mov_rcx_from(RAX);
        let null = asm.jump_if_rcx_zero();
        asm.store_rip(RAX, data + COPY_SOURCE);
        asm.store_rip(RAX, data + SAVED_RAX);
        let copyable = copy_range_checks(&mut asm, data, copy_ranges.ranges.len());
        asm.load_rip(RAX, data + SAVED_RAX);
        asm.load_rip(RCX, data + SAVED_RCX);
        self.string_halt = asm.here();
        asm.hlt();
        asm.int3();
        for at in copyable {
            asm.patch_jmp32(at, asm.here());
        }
        asm.load_rip(RAX, data + SAVED_RAX);
        asm.jmp32(ret_copy.retry);
        asm.patch_jmp32(null, asm.here());
        asm.jmp32(ret.retry);

        // An entry with a kernel string: `rcx` back as it was, and a `hlt`, where the VMM reads
        // the string and moves the vCPU past the site, as at a `hlt` probe on it.
        self.kernel_string = asm.here();
        asm.load_rip(RCX, data + SAVED_RCX);
        self.kernel_string_halt = asm.here();
        asm.hlt();
        asm.int3();

        if asm.code.len() as u64 > COMMON_SIZE {
            bail!("the stubs' common code outgrew its room");
        }
        self.commons = Commons {
            entry: entry.common,
            entry_retry: entry.retry,
            entry_with_stack: entry_with_stack.common,
            entry_with_stack_retry: entry_with_stack.retry,
            entry_copy_retry: entry_copy.retry,
            entry_with_stack_copy_retry: entry_with_stack_copy.retry,
            ret: ret.common,
            string_return,
        };
        self.full_halts = [
            entry.full,
            entry_with_stack.full,
            entry_copy.full,
            entry_with_stack_copy.full,
            ret.full,
            ret_copy.full,
        ]
        .to_vec();
        self.copy_ranges = copy_ranges;
        self.written = true;
        self.write(vmm, mem, self.text, &asm.code)?;
        let mut ranges = [0u8; (MAX_COPY_RANGES * 16) as usize];
        for (i, &(lo, hi)) in self.copy_ranges.ranges.iter().enumerate() {
            ranges[i * 16..i * 16 + 8].copy_from_slice(&lo.wrapping_neg().to_le_bytes());
            ranges[i * 16 + 8..i * 16 + 16].copy_from_slice(&hi.wrapping_neg().to_le_bytes());
        }
        vmm.mem
            .write_slice(&ranges, GuestAddress(self.data_gpa + COPY_RANGES))
            .context("cannot write the trace stubs' header")?;
        self.rearm(vmm)
    }

    /// The 16-byte stub for one site, going on to the common code of its kind.
    pub fn add_stub(
        &mut self,
        vmm: &Vmm,
        mem: &mut GuestReader,
        site: u64,
        kind: StubKind,
    ) -> Result<u64> {
        let common = match kind {
            StubKind::Entry => self.commons.entry,
            StubKind::EntryWithStack => self.commons.entry_with_stack,
            StubKind::EntryUserStrings { .. } => self.string_check(vmm, mem, kind)?,
            StubKind::Return => self.commons.ret,
            StubKind::StringReturn => self.commons.string_return,
        };
        if self.room() == 0 {
            bail!("the stub room is full");
        }
        let at = self.next_stub;
        let mut asm = Asm::new(at);
        asm.movq_imm_rip(sign_extended(site)?, self.data + SITE);
        asm.jmp32(common);
        self.write(vmm, mem, at, &asm.code)?;
        self.next_stub += STUB_SIZE;
        Ok(at)
    }

    /// The check an entry with strings goes through before its record: each register's top
    /// byte, zero for NULL and for a user address, is tested with `jrcxz` (no flag changes).
    /// A kernel address in the register whose string may be copied goes to the copying record
    /// if it is in a [`CopyRanges`] range; any other to the kernel-string `hlt`.
    fn string_check(&mut self, vmm: &Vmm, mem: &mut GuestReader, kind: StubKind) -> Result<u64> {
        let StubKind::EntryUserStrings {
            stack,
            registers,
            copy,
        } = kind
        else {
            bail!("{kind:?} has no string check");
        };
        if let Some(&at) = self.checks.get(&kind) {
            return Ok(at);
        }
        let data = self.data;
        let at = self.next_stub;
        let mut asm = Asm::new(at);
        asm.store_rip(RCX, data + SAVED_RCX);
        let load = |asm: &mut Asm, reg: u8| {
            if reg == RCX {
                asm.load_rip(RCX, data + SAVED_RCX);
            } else {
                asm.mov_rcx_from(reg);
            }
        };
        for reg in registers.without(copy).registers() {
            load(&mut asm, reg);
            asm.top_byte_of_rcx();
            let kernel = asm.jump_if_rcx_nonzero();
            asm.patch_jmp32(kernel, self.kernel_string);
        }
        let (plain_retry, copy_retry) = if stack {
            (
                self.commons.entry_with_stack_retry,
                self.commons.entry_with_stack_copy_retry,
            )
        } else {
            (self.commons.entry_retry, self.commons.entry_copy_retry)
        };
        if let Some(reg) = copy.and_then(|c| c.registers().next()) {
            load(&mut asm, reg);
            asm.top_byte_of_rcx();
            let user = asm.jump_if_rcx_zero();
            load(&mut asm, reg);
            asm.store_rip(RCX, data + COPY_SOURCE);
            asm.store_rip(RAX, data + SAVED_RAX);
            let copyable = copy_range_checks(&mut asm, data, self.copy_ranges.ranges.len());
            asm.load_rip(RAX, data + SAVED_RAX);
            asm.jmp32(self.kernel_string);
            for at in copyable {
                asm.patch_jmp32(at, asm.here());
            }
            asm.load_rip(RAX, data + SAVED_RAX);
            asm.jmp32(copy_retry);
            asm.patch_jmp32(user, asm.here());
        }
        // Into the entry's common code past its save of `rcx`, done above.
        asm.jmp32(plain_retry);
        let size = (asm.code.len() as u64).next_multiple_of(STUB_SIZE);
        if self.room() * STUB_SIZE < size + STUB_SIZE {
            bail!("the stub room is full");
        }
        self.write(vmm, mem, at, &asm.code)?;
        self.next_stub += size;
        self.checks.insert(kind, at);
        Ok(at)
    }

    /// Whether `addr` is one of the stubs' `hlt`s (the buffer is full).
    pub fn is_full_halt(&self, addr: u64) -> bool {
        self.written && self.full_halts.contains(&addr)
    }

    /// If `addr` is the `hlt` a stub stops at to have its site handled as a `hlt` probe (a
    /// string-returning function's non-NULL string, an entry's kernel string): that site (its
    /// stub left it in the header).
    pub fn stub_halt_site(&self, vmm: &Vmm, addr: u64) -> Option<u64> {
        if !self.written || (addr != self.string_halt && addr != self.kernel_string_halt) {
            return None;
        }
        vmm.mem.read_obj(GuestAddress(self.data_gpa + SITE)).ok()
    }

    /// The records written since the last drain, in order, as the stubs wrote them (see
    /// [`Record::parse`]); the buffer is empty again after.
    pub fn drain(&mut self, vmm: &Vmm, out: &mut Vec<u8>) -> Result<()> {
        if !self.written {
            return Ok(());
        }
        let start = self.data + RECORDS;
        let cursor: u64 = vmm
            .mem
            .read_obj(GuestAddress(self.data_gpa + CURSOR))
            .context("cannot read the trace buffer's cursor")?;
        if cursor == start {
            return Ok(());
        }
        let used = cursor.wrapping_sub(start);
        if cursor < start || used % RECORD_SIZE != 0 || used / RECORD_SIZE > self.capacity {
            bail!("the trace buffer's cursor {cursor:#x} is outside its buffer: the guest wrote over it");
        }
        let from = out.len();
        out.resize(from + used as usize, 0);
        vmm.mem
            .read_slice(&mut out[from..], GuestAddress(self.data_gpa + RECORDS))
            .context("cannot read the trace buffer")?;
        self.high_water = self.high_water.max(used);
        self.rearm(vmm)
    }

    fn rearm(&mut self, vmm: &Vmm) -> Result<()> {
        let mut header = [0u8; 16];
        header[..8].copy_from_slice(&(self.data + RECORDS).to_le_bytes());
        header[8..].copy_from_slice(&self.capacity.to_le_bytes());
        vmm.mem
            .write_slice(&header, GuestAddress(self.data_gpa + CURSOR))
            .context("cannot reset the trace buffer")
    }

    /// Puts back the `int3`s and zeroes the room held (records drained first).
    pub fn clear(&mut self, vmm: &Vmm, mem: &mut GuestReader) -> Result<()> {
        if !self.written {
            return Ok(());
        }
        let text = vec![INT3; (self.next_stub - self.text) as usize];
        self.write(vmm, mem, self.text, &text)?;
        let data = vec![0u8; (RECORDS + self.high_water) as usize];
        vmm.mem
            .write_slice(&data, GuestAddress(self.data_gpa))
            .context("cannot clear the trace buffer")?;
        self.next_stub = self.text + COMMON_SIZE;
        self.checks.clear();
        self.high_water = 0;
        self.written = false;
        Ok(())
    }

    fn write(&self, vmm: &Vmm, mem: &mut GuestReader, at: u64, bytes: &[u8]) -> Result<()> {
        mem.write(vmm, at, bytes)
            .with_context(|| format!("cannot write the trace stubs' room at {at:#x}"))
    }
}

/// Where each kind of stub's common code starts (and, for entries, where it goes on after the
/// save of `rcx`, which a string check has made already).
#[derive(Debug, Clone, Copy, Default)]
struct Commons {
    entry: u64,
    entry_retry: u64,
    entry_with_stack: u64,
    entry_with_stack_retry: u64,
    entry_copy_retry: u64,
    entry_with_stack_copy_retry: u64,
    ret: u64,
    string_return: u64,
}

/// The start every common code shares: the full-buffer `hlt` (and the jump back to try again
/// after the drain), `rcx` saved, one record taken from `remaining`, `rcx` at the record.
struct RecordStart {
    full: u64,
    common: u64,
    retry: u64,
}

impl RecordStart {
    /// `slots`: the record's, and its extension's if it copies a string.
    fn emit(asm: &mut Asm, data: u64, slots: u64) -> RecordStart {
        let full = asm.here();
        asm.hlt();
        let retry_jump = asm.here();
        asm.jmp8(0); // patched below
        let common = asm.here();
        asm.store_rip(RCX, data + SAVED_RCX);
        let retry = asm.here();
        asm.load_rip(RCX, data + REMAINING);
        for _ in 0..slots {
            asm.jrcxz(full);
            asm.lea_rcx_rcx(-1);
        }
        asm.store_rip(RCX, data + REMAINING);
        asm.load_rip(RCX, data + CURSOR);
        asm.patch_jmp8(retry_jump, retry);
        RecordStart {
            full,
            common,
            retry,
        }
    }
}

/// The end every common code shares: `current` into the record, the cursor past it (and its
/// extension's `slots`), `rax` and `rcx` back.
fn finish_record(asm: &mut Asm, data: u64, current: CurrentAt, slots: u64) {
    asm.load_current(current);
    asm.store_rcx(RAX, 8 * 8);
    asm.lea_rcx_rcx_far((slots * RECORD_SIZE) as i32);
    asm.store_rip(RCX, data + CURSOR);
    asm.load_rip(RAX, data + SAVED_RAX);
    asm.load_rip(RCX, data + SAVED_RCX);
}

/// The common code of an entry stub: where its full-buffer `hlt` is, where it starts, and where
/// it goes on after saving `rcx`. With `copy`, it also copies the string at `COPY_SOURCE`.
fn entry_common(
    asm: &mut Asm,
    data: u64,
    current: CurrentAt,
    stack: bool,
    copy: bool,
) -> RecordStart {
    // The site's stub put the site in data.site.
    let slots = if copy { 1 + EXTENSION_SLOTS } else { 1 };
    let start = RecordStart::emit(asm, data, slots);
    for (reg, slot) in [(RDI, 1), (RSI, 2), (RDX, 3), (R8, 5), (R9, 6), (RSP, 7)] {
        asm.store_rcx(reg, slot * 8);
    }
    asm.store_rip(RAX, data + SAVED_RAX);
    if stack {
        asm.load_rsp(RAX, 8);
        asm.store_rcx(RAX, 9 * 8);
        asm.load_rsp(RAX, 16);
        asm.store_rcx(RAX, 10 * 8);
    }
    asm.load_rip(RAX, data + SITE);
    asm.store_rcx(RAX, 0);
    // The way back: the instruction after the 5-byte site (`lea` leaves the flags alone).
    asm.lea_rax_rax(5);
    asm.store_rip(RAX, data + SITE);
    asm.load_rip(RAX, data + SAVED_RCX);
    asm.store_rcx(RAX, 4 * 8);
    if copy {
        copy_string(asm, data);
    }
    finish_record(asm, data, current, slots);
    asm.jmp_indirect_rip(data + SITE);
    start
}

/// The common code of a return stub (with `copy`, copying the string at `COPY_SOURCE`).
fn return_common(asm: &mut Asm, data: u64, current: CurrentAt, copy: bool) -> RecordStart {
    let slots = if copy { 1 + EXTENSION_SLOTS } else { 1 };
    let start = RecordStart::emit(asm, data, slots);
    asm.store_rcx(RAX, 8);
    asm.store_rcx(RDX, 2 * 8);
    asm.store_rcx(RSP, 7 * 8);
    asm.store_rip(RAX, data + SAVED_RAX);
    asm.load_rip(RAX, data + SITE);
    asm.store_rcx(RAX, 0);
    if copy {
        copy_string(asm, data);
    }
    finish_record(asm, data, current, slots);
    asm.ret();
    start
}

/// The registers a string copy uses, and where each is kept meanwhile.
const COPY_REGISTERS: [(u8, u64); 4] = [
    (RDX, SAVED_RDX),
    (RSI, SAVED_RSI),
    (RDI, SAVED_RDI),
    (R8, SAVED_R8),
];

/// Copies the string at `COPY_SOURCE` into the extension after the record at `rcx`: byte by
/// byte up to its NUL or [`STRING_BYTES`] (never further: only the string's own bytes are
/// read), into the scratch area, then word by word into the extension. `rax` is free (saved);
/// `rcx` is the record again after.
fn copy_string(asm: &mut Asm, data: u64) {
    for (reg, slot) in COPY_REGISTERS {
        asm.store_rip(reg, data + slot);
    }
    asm.mov_r8_rcx();
    asm.load_rip(RSI, data + COPY_SOURCE);
    asm.lea_rip(RDI, data + SCRATCH);
    asm.mov_imm_rdx(-(STRING_BYTES as i32));
    let next = asm.here();
    asm.movzx_ecx_byte_rsi();
    asm.store_cl_rdi();
    let nul = asm.jump_if_rcx_zero();
    asm.increment(RSI);
    asm.increment(RDI);
    asm.increment(RDX);
    asm.mov_rcx_from(RDX);
    let full = asm.jump_if_rcx_zero();
    asm.jmp8_to(next);
    let copied = asm.here();
    asm.patch_jmp32(nul, copied);
    asm.patch_jmp32(full, copied);
    asm.store_zero_r8(RECORD_SIZE as i32);
    asm.store_zero_r8(SECOND_EXTENSION as i32);
    for word in 0..(STRING_BYTES / 8) as u64 {
        // 80 bytes after the first extension's zero word, the rest after the second's.
        let first = (RECORD_SIZE - 8) / 8;
        let to = if word < first {
            RECORD_SIZE + 8 + word * 8
        } else {
            SECOND_EXTENSION + 8 + (word - first) * 8
        };
        asm.load_rip(RAX, data + SCRATCH + word * 8);
        asm.store_r8(RAX, to as i32);
    }
    asm.load_rip(RAX, data + COPY_SOURCE);
    asm.store_r8(RAX, COPIED_FROM as i32);
    asm.mov_rcx_from(R8);
    for (reg, slot) in COPY_REGISTERS {
        asm.load_rip(reg, data + slot);
    }
}

/// Whether the address at `COPY_SOURCE` is in one of the first `ranges` copy ranges: for each,
/// `address - lo` must have a zero top byte and `address - hi` a top byte of 0xff (negative),
/// tested without changing a flag (`lea`, `not`, `bswap`, `movzx`, `jrcxz`). Uses `rax` and
/// `rcx`. Falls through if it is in none; returns the jumps to patch to where it is in one.
fn copy_range_checks(asm: &mut Asm, data: u64, ranges: usize) -> Vec<u64> {
    let mut copyable = Vec::new();
    for r in 0..ranges as u64 {
        let bounds = data + COPY_RANGES + r * 16;
        asm.load_rip(RCX, data + COPY_SOURCE);
        asm.load_rip(RAX, bounds);
        asm.lea_rcx_rcx_rax();
        asm.top_byte_of_rcx();
        let below = asm.jump_if_rcx_nonzero();
        asm.load_rip(RCX, data + COPY_SOURCE);
        asm.load_rip(RAX, bounds + 8);
        asm.lea_rcx_rcx_rax();
        asm.not_rcx();
        asm.top_byte_of_rcx();
        let above = asm.jump_if_rcx_nonzero();
        copyable.push(asm.here());
        asm.jmp32(0);
        let next = asm.here();
        asm.patch_jmp32(below, next);
        asm.patch_jmp32(above, next);
    }
    copyable
}

/// A kernel address as the sign-extended 32-bit immediate `movq` takes.
fn sign_extended(addr: u64) -> Result<i32> {
    let imm = addr as i64;
    if imm < i32::MIN as i64 || imm > i32::MAX as i64 {
        bail!("{addr:#x} is not in the kernel's top 2 GiB");
    }
    Ok(imm as i32)
}

/// The `jmp rel32` that replaces a 5-byte site.
pub fn jump(from: u64, to: u64) -> Option<[u8; 5]> {
    let rel = to.wrapping_sub(from + 5) as i64;
    let rel = i32::try_from(rel).ok()?;
    let mut bytes = [0xe9, 0, 0, 0, 0];
    bytes[1..].copy_from_slice(&rel.to_le_bytes());
    Some(bytes)
}

const RAX: u8 = 0;
const RCX: u8 = 1;
const RDX: u8 = 2;
const RSP: u8 = 4;
const RSI: u8 = 6;
const RDI: u8 = 7;
const R8: u8 = 8;
const R9: u8 = 9;

/// The handful of x86-64 instructions the stubs are made of, encoded at a known address.
struct Asm {
    base: u64,
    code: Vec<u8>,
}

impl Asm {
    fn new(base: u64) -> Asm {
        Asm {
            base,
            code: Vec::new(),
        }
    }

    fn here(&self) -> u64 {
        self.base + self.code.len() as u64
    }

    /// `bytes` then a RIP-relative displacement to `target`, then `imm`.
    fn rip_relative(&mut self, bytes: &[u8], target: u64, imm: &[u8]) {
        let end = self.here() + (bytes.len() + 4 + imm.len()) as u64;
        let disp = target.wrapping_sub(end) as i64;
        let disp = i32::try_from(disp).expect("the stub room and the buffer are in one image");
        self.code.extend_from_slice(bytes);
        self.code.extend_from_slice(&disp.to_le_bytes());
        self.code.extend_from_slice(imm);
    }

    fn rex_w(reg: u8) -> u8 {
        0x48 | ((reg >> 3) << 2)
    }

    /// `mov %reg, target(%rip)`
    fn store_rip(&mut self, reg: u8, target: u64) {
        self.rip_relative(&[Self::rex_w(reg), 0x89, ((reg & 7) << 3) | 5], target, &[]);
    }

    /// `mov target(%rip), %reg`
    fn load_rip(&mut self, reg: u8, target: u64) {
        self.rip_relative(&[Self::rex_w(reg), 0x8b, ((reg & 7) << 3) | 5], target, &[]);
    }

    /// `mov %reg, disp8(%rcx)`
    fn store_rcx(&mut self, reg: u8, disp: u64) {
        let disp = i8::try_from(disp).expect("a record field");
        self.code.extend_from_slice(&[
            Self::rex_w(reg),
            0x89,
            0x40 | ((reg & 7) << 3) | RCX,
            disp as u8,
        ]);
    }

    /// `mov disp8(%rsp), %reg`
    fn load_rsp(&mut self, reg: u8, disp: u8) {
        self.code
            .extend_from_slice(&[Self::rex_w(reg), 0x8b, 0x44 | ((reg & 7) << 3), 0x24, disp]);
    }

    /// `lea disp8(%rcx), %rcx`
    fn lea_rcx_rcx(&mut self, disp: i8) {
        self.code.extend_from_slice(&[0x48, 0x8d, 0x49, disp as u8]);
    }

    /// `lea disp8(%rax), %rax`
    fn lea_rax_rax(&mut self, disp: i8) {
        self.code.extend_from_slice(&[0x48, 0x8d, 0x40, disp as u8]);
    }

    /// `movq $imm, target(%rip)`
    fn movq_imm_rip(&mut self, imm: i32, target: u64) {
        self.rip_relative(&[0x48, 0xc7, 0x05], target, &imm.to_le_bytes());
    }

    /// `mov current, %rax`
    fn load_current(&mut self, current: CurrentAt) {
        match current {
            CurrentAt::PerCpu(offset) => {
                let disp = i32::try_from(offset as i64).expect("a per-CPU offset");
                self.code.extend_from_slice(&[0x65, 0x48, 0x8b, 0x04, 0x25]);
                self.code.extend_from_slice(&disp.to_le_bytes());
            }
            CurrentAt::Global(addr) => self.load_rip(RAX, addr),
        }
    }

    fn jrcxz(&mut self, target: u64) {
        let rel = target.wrapping_sub(self.here() + 2) as i64;
        let rel = i8::try_from(rel).expect("jrcxz within 127 bytes");
        self.code.extend_from_slice(&[0xe3, rel as u8]);
    }

    fn jmp8(&mut self, rel: i8) {
        self.code.extend_from_slice(&[0xeb, rel as u8]);
    }

    fn patch_jmp8(&mut self, at: u64, target: u64) {
        let rel = target.wrapping_sub(at + 2) as i64;
        let rel = i8::try_from(rel).expect("a short jump");
        self.code[(at - self.base) as usize + 1] = rel as u8;
    }

    fn jmp32(&mut self, target: u64) {
        let rel = target.wrapping_sub(self.here() + 5) as i64;
        let rel = i32::try_from(rel).expect("a jump within the image");
        self.code.push(0xe9);
        self.code.extend_from_slice(&rel.to_le_bytes());
    }

    /// `jmp *target(%rip)`
    fn jmp_indirect_rip(&mut self, target: u64) {
        self.rip_relative(&[0xff, 0x25], target, &[]);
    }

    fn hlt(&mut self) {
        self.code.push(0xf4);
    }

    fn int3(&mut self) {
        self.code.push(INT3);
    }

    /// `mov %reg, %rcx`
    fn mov_rcx_from(&mut self, reg: u8) {
        self.code
            .extend_from_slice(&[Self::rex_w(reg), 0x89, 0xc0 | ((reg & 7) << 3) | RCX]);
    }

    /// `bswap %rcx`
    fn bswap_rcx(&mut self) {
        self.code.extend_from_slice(&[0x48, 0x0f, 0xc9]);
    }

    /// `rcx`'s top byte, alone in `rcx` (`bswap`, `movzbl`).
    fn top_byte_of_rcx(&mut self) {
        self.bswap_rcx();
        self.movzx_ecx_cl();
    }

    /// `not %rcx`
    fn not_rcx(&mut self) {
        self.code.extend_from_slice(&[0x48, 0xf7, 0xd1]);
    }

    /// `lea (%rcx,%rax), %rcx`
    fn lea_rcx_rcx_rax(&mut self) {
        self.code.extend_from_slice(&[0x48, 0x8d, 0x0c, 0x01]);
    }

    /// `lea disp32(%rcx), %rcx`
    fn lea_rcx_rcx_far(&mut self, disp: i32) {
        self.code.extend_from_slice(&[0x48, 0x8d, 0x89]);
        self.code.extend_from_slice(&disp.to_le_bytes());
    }

    /// `lea target(%rip), %reg`
    fn lea_rip(&mut self, reg: u8, target: u64) {
        self.rip_relative(&[Self::rex_w(reg), 0x8d, ((reg & 7) << 3) | 5], target, &[]);
    }

    /// `lea 1(%reg), %reg` (`rdx`, `rsi` or `rdi`)
    fn increment(&mut self, reg: u8) {
        assert!(matches!(reg, RDX | RSI | RDI));
        self.code
            .extend_from_slice(&[0x48, 0x8d, 0x40 | (reg << 3) | reg, 1]);
    }

    /// `mov %rcx, %r8`
    fn mov_r8_rcx(&mut self) {
        self.code.extend_from_slice(&[0x49, 0x89, 0xc8]);
    }

    /// `mov $imm, %rdx`
    fn mov_imm_rdx(&mut self, imm: i32) {
        self.code.extend_from_slice(&[0x48, 0xc7, 0xc2]);
        self.code.extend_from_slice(&imm.to_le_bytes());
    }

    /// `movzbl (%rsi), %ecx`
    fn movzx_ecx_byte_rsi(&mut self) {
        self.code.extend_from_slice(&[0x0f, 0xb6, 0x0e]);
    }

    /// `mov %cl, (%rdi)`
    fn store_cl_rdi(&mut self) {
        self.code.extend_from_slice(&[0x88, 0x0f]);
    }

    /// `mov %reg, disp32(%r8)`
    fn store_r8(&mut self, reg: u8, disp: i32) {
        self.code
            .extend_from_slice(&[Self::rex_w(reg) | 1, 0x89, 0x80 | ((reg & 7) << 3)]);
        self.code.extend_from_slice(&disp.to_le_bytes());
    }

    /// `movq $0, disp32(%r8)`
    fn store_zero_r8(&mut self, disp: i32) {
        self.code.extend_from_slice(&[0x49, 0xc7, 0x80]);
        self.code.extend_from_slice(&disp.to_le_bytes());
        self.code.extend_from_slice(&0i32.to_le_bytes());
    }

    /// A `jmp rel32` to patch later ([`Self::patch_jmp32`]), taken when `rcx` is zero
    /// (`jrcxz` over a short jump over it).
    fn jump_if_rcx_zero(&mut self) -> u64 {
        self.code.extend_from_slice(&[0xe3, 0x02, 0xeb, 0x05]);
        let at = self.here();
        self.jmp32(at + 5);
        at
    }

    /// A `jmp rel32` to patch later, taken when `rcx` is not zero (`jrcxz` over it).
    fn jump_if_rcx_nonzero(&mut self) -> u64 {
        self.code.extend_from_slice(&[0xe3, 0x05]);
        let at = self.here();
        self.jmp32(at + 5);
        at
    }

    fn patch_jmp32(&mut self, at: u64, target: u64) {
        let rel = target.wrapping_sub(at + 5) as i64;
        let rel = i32::try_from(rel).expect("a jump within the image");
        let from = (at - self.base) as usize + 1;
        self.code[from..from + 4].copy_from_slice(&rel.to_le_bytes());
    }

    /// `jmp rel8` back to `target`
    fn jmp8_to(&mut self, target: u64) {
        let rel = target.wrapping_sub(self.here() + 2) as i64;
        self.jmp8(i8::try_from(rel).expect("a short jump"));
    }

    /// `movzbl %cl, %ecx`
    fn movzx_ecx_cl(&mut self) {
        self.code.extend_from_slice(&[0x0f, 0xb6, 0xc9]);
    }

    fn ret(&mut self) {
        self.code.push(0xc3);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions, Formatter, NasmFormatter};

    fn disassemble(base: u64, code: &[u8]) -> Vec<String> {
        let mut decoder = Decoder::with_ip(64, code, base, DecoderOptions::NONE);
        let mut formatter = NasmFormatter::new();
        let mut out = Vec::new();
        for instr in &mut decoder {
            let mut s = String::new();
            formatter.format(&instr, &mut s);
            out.push(s);
        }
        out
    }

    #[test]
    fn the_encoder_writes_what_a_disassembler_reads() {
        let mut asm = Asm::new(0xffff_ffff_8100_0000);
        asm.store_rip(RCX, 0xffff_ffff_8100_1000);
        asm.load_rip(R9, 0xffff_ffff_8100_1008);
        asm.store_rcx(R8, 40);
        asm.store_rcx(RSP, 56);
        asm.lea_rcx_rcx(-1);
        asm.lea_rax_rax(5);
        asm.movq_imm_rip(-0x7eff_0000, 0xffff_ffff_8100_1020);
        asm.load_current(CurrentAt::PerCpu(0x2c000));
        asm.load_rsp(RAX, 16);
        asm.jmp_indirect_rip(0xffff_ffff_8100_1020);
        asm.mov_rcx_from(R9);
        asm.mov_rcx_from(RSI);
        asm.top_byte_of_rcx();
        asm.not_rcx();
        asm.lea_rcx_rcx_rax();
        asm.lea_rcx_rcx_far(264);
        asm.lea_rip(RDI, 0xffff_ffff_8100_1080);
        asm.increment(RSI);
        asm.increment(RDI);
        asm.increment(RDX);
        asm.mov_r8_rcx();
        asm.mov_imm_rdx(-96);
        asm.movzx_ecx_byte_rsi();
        asm.store_cl_rdi();
        asm.store_r8(RAX, 96);
        asm.store_r8(RDX, 200);
        asm.store_zero_r8(176);
        let text = disassemble(0xffff_ffff_8100_0000, &asm.code);
        assert_eq!(
            text,
            [
                "mov [rel 0FFFFFFFF81001000h],rcx",
                "mov r9,[rel 0FFFFFFFF81001008h]",
                "mov [rcx+28h],r8",
                "mov [rcx+38h],rsp",
                "lea rcx,[rcx-1]",
                "lea rax,[rax+5]",
                "mov qword [rel 0FFFFFFFF81001020h],0FFFFFFFF81010000h",
                "mov rax,[gs:2C000h]",
                "mov rax,[rsp+10h]",
                "jmp qword [rel 0FFFFFFFF81001020h]",
                "mov rcx,r9",
                "mov rcx,rsi",
                "bswap rcx",
                "movzx ecx,cl",
                "not rcx",
                "lea rcx,[rcx+rax]",
                "lea rcx,[rcx+108h]",
                "lea rdi,[rel 0FFFFFFFF81001080h]",
                "lea rsi,[rsi+1]",
                "lea rdi,[rdi+1]",
                "lea rdx,[rdx+1]",
                "mov r8,rcx",
                "mov rdx,0FFFFFFFFFFFFFFA0h",
                "movzx ecx,byte [rsi]",
                "mov [rdi],cl",
                "mov [r8+60h],rax",
                "mov [r8+0C8h],rdx",
                "mov qword [r8+0B0h],0",
            ]
        );
    }

    #[test]
    fn a_site_jumps_to_its_stub_and_far_targets_are_refused() {
        assert_eq!(jump(0x1000, 0x1005), Some([0xe9, 0, 0, 0, 0]));
        assert_eq!(jump(0x1000, 0x0ffb), Some([0xe9, 0xf6, 0xff, 0xff, 0xff]));
        assert_eq!(jump(0, 1 << 40), None);
        assert!(sign_extended(0xffff_ffff_8123_4567).is_ok());
        assert!(sign_extended(0xffff_8880_0000_0000).is_err());
    }

    #[test]
    fn a_record_reads_back_in_its_field_order() {
        let words: Vec<u8> = (1..=11u64).flat_map(|w| w.to_le_bytes()).collect();
        assert_eq!(words.len() as u64, RECORD_SIZE);
        let r = Record::parse(&words);
        assert_eq!(r.site, 1);
        assert_eq!(r.regs, [2, 3, 4, 5, 6, 7]);
        assert_eq!((r.rsp, r.current), (8, 9));
        assert_eq!(r.stack, [10, 11]);
    }

    #[test]
    fn conditional_jumps_land_where_they_were_patched_to() {
        let base = 0xffff_ffff_8100_0000;
        let mut asm = Asm::new(base);
        let zero = asm.jump_if_rcx_zero();
        let nonzero = asm.jump_if_rcx_nonzero();
        asm.hlt();
        let target = asm.here();
        asm.patch_jmp32(zero, target);
        asm.patch_jmp32(nonzero, target);
        let text = disassemble(base, &asm.code);
        let at = |a: u64| format!("0{a:X}h");
        // jrcxz over a short jump over the long one; jrcxz over the long one.
        assert_eq!(
            text,
            [
                format!("jrcxz {}", at(base + 4)),
                format!("jmp short {}", at(base + 9)),
                format!("jmp {}", at(target)),
                format!("jrcxz {}", at(base + 16)),
                format!("jmp {}", at(target)),
                "hlt".to_string(),
            ]
        );
    }

    /// Slots as a drain gives them: a record, a record with a copied string, a record.
    fn slot(site: u64) -> Vec<u8> {
        let mut bytes = vec![0u8; RECORD_SIZE as usize];
        bytes[..8].copy_from_slice(&site.to_le_bytes());
        bytes[64..72].copy_from_slice(&0xffff_8880_0000_1000u64.to_le_bytes());
        bytes
    }

    #[test]
    fn a_copied_string_is_read_back_with_its_record() {
        let text = b"/tmp/bench.txt\0";
        let mut raw = slot(0xffff_ffff_8100_0010);
        raw.extend(slot(0xffff_ffff_8100_0020));
        let at = raw.len();
        raw.resize(at + 2 * RECORD_SIZE as usize, 0xee);
        raw[at..at + 8].fill(0);
        raw[at + 8..at + 8 + text.len()].copy_from_slice(text);
        let second = at + RECORD_SIZE as usize;
        raw[second..second + 8].fill(0);
        raw[second + 24..second + 32].copy_from_slice(&0xffff_8880_0123_4000u64.to_le_bytes());
        raw.extend(slot(0xffff_ffff_8100_0030));
        let read: Vec<_> = records(&raw).collect();
        assert_eq!(read.len(), 3);
        assert_eq!(read[0].0.site, 0xffff_ffff_8100_0010);
        assert!(read[0].1.is_none());
        let copied = read[1]
            .1
            .as_ref()
            .expect("the second record copied a string");
        assert_eq!(copied.at, 0xffff_8880_0123_4000);
        assert_eq!(copied.shown(96), ("/tmp/bench.txt".into(), false));
        assert_eq!(copied.shown(4), ("/tmp".into(), true));
        assert_eq!(read[2].0.site, 0xffff_ffff_8100_0030);
        assert!(Record::is_extension(&raw[at..]));
        assert!(!Record::is_extension(&raw[..]));

        // A string without a NUL in its first 96 bytes is shown cut, as a live read shows it.
        let long = CopiedString {
            at: 0,
            bytes: [b'a'; STRING_BYTES],
        };
        assert_eq!(long.shown(96), ("a".repeat(96), true));
    }

    #[test]
    fn strings_are_copied_only_from_memory_that_stays_mapped() {
        let mut ranges = CopyRanges {
            ranges: Vec::new(),
            direct_map_stays: false,
        };
        ranges.add(0xffff_ffff_81c0_0000, 0xffff_ffff_81d9_e000);
        let kfence = ranges
            .clone()
            .with_direct_map(0xffff_8880_0000_0000, 1 << 30);
        assert_eq!(
            kfence.ranges.len(),
            1,
            "a kernel that unmaps freed pages: rodata only"
        );
        ranges.direct_map_stays = true;
        let all = ranges.with_direct_map(0xffff_8880_0000_0000, 1 << 30);
        assert_eq!(
            all.ranges,
            [
                (0xffff_ffff_81c0_0000, 0xffff_ffff_81d9_e000 - 96),
                (0xffff_8880_0000_0000, 0xffff_8880_4000_0000 - 96),
            ],
            "a string starts where all its bytes are inside"
        );
    }
}
