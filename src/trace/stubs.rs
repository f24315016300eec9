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
//! common (string return): rcx = rax; jrcxz return (NULL); else hlt (the VMM reads the string
//!                        and performs the ret)
//! full:                  hlt (the VMM drains the buffer), then try again
//! ```
//!
//! The stubs change no register, no flag (only `mov`, `lea` and `jrcxz`) and no byte of the
//! guest's own memory; interrupts are injected at exits only, so none lands inside one. The
//! VMM drains the records at every exit, so each is handled in order with the `hlt` probes
//! (kept for functions whose arguments must be read from memory at the call: strings, deeper
//! stack arguments, system calls) and stamped with the exit it followed. The room is put back
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
/// The records, after the header's page.
const RECORDS: u64 = 0x1000;
/// One record: the site, six registers, `rsp`, the current task, and (entries of functions with
/// arguments on the stack) the two stack words above the return address.
pub const RECORD_SIZE: u64 = 88;
/// A site's stub.
const STUB_SIZE: u64 = 16;
/// The common code's share of the text area.
const COMMON_SIZE: u64 = 0x400;

const INT3: u8 = 0xcc;
/// Caps the buffer at this many records (tests: a tiny buffer fills at almost every call, and
/// must give the same trace).
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
    /// own `hlt` captured of it. A kernel address in any stops at a `hlt`, where the VMM reads
    /// the string now (see [`StubArea::stub_halt_site`]).
    EntryUserStrings {
        stack: bool,
        registers: ArgRegisters,
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
    /// The checks of [`StubKind::EntryUserStrings`] stubs, one per set of registers (made when
    /// a site first needs them, in the site stubs' room).
    checks: std::collections::HashMap<(bool, ArgRegisters), u64>,
    /// Where a string-returning function's stub stops when the string is not NULL.
    string_halt: u64,
    /// Where an entry's string check jumps for a kernel string, and its `hlt`.
    kernel_string: u64,
    kernel_string_halt: u64,
    /// The `hlt`s the stubs stop at when the buffer is full (addresses of the `hlt`s).
    full_halts: [u64; 3],
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
            let n = v.parse::<u64>().ok().filter(|&n| n > 0);
            if n.is_none() {
                tracing::warn!("{CAPACITY_ENV}={v:?} is not a number of records above 0; ignored");
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
            string_halt: 0,
            kernel_string: 0,
            kernel_string_halt: 0,
            full_halts: [0; 3],
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
    pub fn prepare(&mut self, vmm: &Vmm, mem: &mut GuestReader, current: CurrentAt) -> Result<()> {
        let data = self.data;
        let first = mem.translate(vmm, data);
        let last = mem.translate(vmm, data + TRACE_DATA_SIZE - 1);
        self.data_gpa = match (first, last) {
            (Some(first), Some(last)) if last.wrapping_sub(first) == TRACE_DATA_SIZE - 1 => first,
            _ => bail!("the trace buffer at {data:#x} is not mapped to one physical range: this kernel's image is not what rrr built"),
        };
        let mut asm = Asm::new(self.text);
        let entry = entry_common(&mut asm, data, current, false);
        let entry_with_stack = entry_common(&mut asm, data, current, true);

        // Return: the same, with the return value.
        let ret = RecordStart::emit(&mut asm, data);
        asm.store_rcx(RAX, 8);
        asm.store_rcx(RDX, 2 * 8);
        asm.store_rcx(RSP, 7 * 8);
        asm.store_rip(RAX, data + SAVED_RAX);
        asm.load_rip(RAX, data + SITE);
        asm.store_rcx(RAX, 0);
        finish_record(&mut asm, data, current);
        asm.ret();
        let (return_full, return_retry) = (ret.full, ret.retry);

        // A function that returns a string: a NULL one (most of `step_into`'s and
        // `path_init`'s) is recorded as any return; another stops at a `hlt`, where the VMM
        // reads the string now and performs the `ret`, as at a `hlt` probe on the site.
        let string_return = asm.here();
        asm.store_rip(RCX, data + SAVED_RCX);
        asm.mov_rcx_rax();
        let null_jump = asm.here();
        asm.jrcxz(null_jump); // patched below
        asm.load_rip(RCX, data + SAVED_RCX);
        self.string_halt = asm.here();
        asm.hlt();
        asm.int3();
        let null = asm.here();
        asm.jmp32(return_retry);
        asm.patch_jrcxz(null_jump, null);

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
            ret: ret.common,
            string_return,
        };
        self.full_halts = [entry.full, entry_with_stack.full, return_full];
        self.written = true;
        self.write(vmm, mem, self.text, &asm.code)?;
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
            StubKind::EntryUserStrings { stack, registers } => {
                self.string_check(vmm, mem, stack, registers)?
            }
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

    /// The check an entry with strings in `registers` goes through before its record: each
    /// register's top byte, zero for NULL and for a user address, is tested with `jrcxz` (no
    /// flag changes), and any other goes to the kernel-string `hlt`.
    fn string_check(
        &mut self,
        vmm: &Vmm,
        mem: &mut GuestReader,
        stack: bool,
        registers: ArgRegisters,
    ) -> Result<u64> {
        if let Some(&at) = self.checks.get(&(stack, registers)) {
            return Ok(at);
        }
        let data = self.data;
        let at = self.next_stub;
        let mut asm = Asm::new(at);
        asm.store_rip(RCX, data + SAVED_RCX);
        for reg in registers.registers() {
            if reg == RCX {
                asm.load_rip(RCX, data + SAVED_RCX);
            } else {
                asm.mov_rcx_from(reg);
            }
            asm.bswap_rcx();
            asm.movzx_ecx_cl();
            let user = asm.here();
            asm.jrcxz(user); // patched below
            asm.jmp32(self.kernel_string);
            asm.patch_jrcxz(user, asm.here());
        }
        // Into the entry's common code past its save of `rcx`, done above.
        asm.jmp32(if stack {
            self.commons.entry_with_stack_retry
        } else {
            self.commons.entry_retry
        });
        let size = (asm.code.len() as u64).next_multiple_of(STUB_SIZE);
        if self.room() * STUB_SIZE < size + STUB_SIZE {
            bail!("the stub room is full");
        }
        self.write(vmm, mem, at, &asm.code)?;
        self.next_stub += size;
        self.checks.insert((stack, registers), at);
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
    fn emit(asm: &mut Asm, data: u64) -> RecordStart {
        let full = asm.here();
        asm.hlt();
        let retry_jump = asm.here();
        asm.jmp8(0); // patched below
        let common = asm.here();
        asm.store_rip(RCX, data + SAVED_RCX);
        let retry = asm.here();
        asm.load_rip(RCX, data + REMAINING);
        asm.jrcxz(full);
        asm.lea_rcx_rcx(-1);
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

/// The end every common code shares: `current` into the record, the cursor past it, `rax` and
/// `rcx` back.
fn finish_record(asm: &mut Asm, data: u64, current: CurrentAt) {
    asm.load_current(current);
    asm.store_rcx(RAX, 8 * 8);
    asm.lea_rcx_rcx(RECORD_SIZE as i8);
    asm.store_rip(RCX, data + CURSOR);
    asm.load_rip(RAX, data + SAVED_RAX);
    asm.load_rip(RCX, data + SAVED_RCX);
}

/// The common code of an entry stub: where its full-buffer `hlt` is, where it starts, and where
/// it goes on after saving `rcx`.
fn entry_common(asm: &mut Asm, data: u64, current: CurrentAt, stack: bool) -> RecordStart {
    // The site's stub put the site in data.site.
    let start = RecordStart::emit(asm, data);
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
    finish_record(asm, data, current);
    asm.jmp_indirect_rip(data + SITE);
    start
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

    /// `mov %rax, %rcx`
    fn mov_rcx_rax(&mut self) {
        self.mov_rcx_from(RAX);
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

    /// `movzbl %cl, %ecx`
    fn movzx_ecx_cl(&mut self) {
        self.code.extend_from_slice(&[0x0f, 0xb6, 0xc9]);
    }

    fn patch_jrcxz(&mut self, at: u64, target: u64) {
        let rel = target.wrapping_sub(at + 2) as i64;
        let rel = i8::try_from(rel).expect("jrcxz within 127 bytes");
        self.code[(at - self.base) as usize + 1] = rel as u8;
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
        asm.bswap_rcx();
        asm.movzx_ecx_cl();
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
}
