//! What the trace reads from the guest's kernel structures, and how: a task's identity, a
//! system call's registers and the place in the stimulus it was made from, and arguments
//! decoded by type. Every read goes through [`Memory`], so the same code reads the live guest
//! during the replay (capturing what it read) and the captured bytes when the trace is written.

use std::path::Path;

use rrr_tracer::{Index, TaskLayout, UserImage, ValueKind};

use super::decode::{self, Shown};
use super::guest::Memory;
use super::observe::Regs;
use super::probes::Probe;

pub const SYSCALL_PREFIXES: [&str; 2] = ["__x64_sys_", "__ia32_sys_"];
/// How far up the user stack a system call's caller in the program's own code is looked for.
const STACK_SCAN_WORDS: u64 = 64;
const ARG_NAMES: [&str; 6] = ["arg0", "arg1", "arg2", "arg3", "arg4", "arg5"];

/// Where `struct pt_regs` keeps a system call's number, arguments and user return address.
struct PtRegs {
    args: [u64; 6],
    orig_ax: u64,
    ip: u64,
    sp: u64,
}

/// The stimulus's image, to name the place in it each system call was made from, and where the
/// kernel keeps a task's code range (`mm_struct.start_code`, `end_code`).
struct Caller {
    image: UserImage,
    start_code: u64,
    end_code: u64,
}

pub struct Introspection {
    pub index: Index,
    task_layout: TaskLayout,
    pt_regs: Option<PtRegs>,
    caller: Option<Caller>,
    /// `mm_struct.pgd`: the root of a task's page tables.
    mm_pgd: Option<u64>,
}

impl Introspection {
    pub fn new(index: Index) -> anyhow::Result<Introspection> {
        use anyhow::Context;
        let task_layout = index
            .task_layout()
            .context("the kernel's DWARF has no usable task_struct (pid, tgid, comm)")?;
        let pt_regs = (|| {
            let off = |m: &str| index.member_offset("pt_regs", m);
            Some(PtRegs {
                args: [
                    off("di")?,
                    off("si")?,
                    off("dx")?,
                    off("r10")?,
                    off("r8")?,
                    off("r9")?,
                ],
                orig_ax: off("orig_ax")?,
                ip: off("ip")?,
                sp: off("sp")?,
            })
        })();
        let mm_pgd = index.member_offset("mm_struct", "pgd");
        Ok(Introspection {
            index,
            task_layout,
            pt_regs,
            caller: None,
            mm_pgd,
        })
    }

    /// The stimulus's image: its functions get probes (their `-finstrument-functions` hooks),
    /// and each system call names where in it it was made (`from`), for tasks that run it.
    /// Without its symbols or the kernel's `mm_struct`, neither happens.
    pub fn know_stimulus(&mut self, name: &str, binary: &[u8]) {
        let image = match UserImage::parse(binary, Path::new(name)) {
            Ok(image) => image,
            Err(err) => {
                tracing::warn!("the stimulus's symbols cannot be read ({err}); system calls are not named with the place they were made from");
                return;
            }
        };
        let off = |m: &str| self.index.member_offset("mm_struct", m);
        if let (Some(start_code), Some(end_code)) = (off("start_code"), off("end_code")) {
            self.caller = Some(Caller {
                image,
                start_code,
                end_code,
            });
        }
    }

    pub fn stimulus_image(&self) -> Option<&UserImage> {
        self.caller.as_ref().map(|c| &c.image)
    }

    pub fn read_ids(&self, mem: &mut dyn Memory, ptr: u64) -> (i32, i32) {
        let l = &self.task_layout;
        let pid = mem.read_u32(ptr + l.pid).unwrap_or(0) as i32;
        let tgid = mem.read_u32(ptr + l.tgid).unwrap_or(0) as i32;
        (pid, tgid)
    }

    /// Where the page tables of the task at `ptr` are (`mm->pgd`, a kernel address); `None` for
    /// a kernel thread, which runs on whichever tables were loaded before it.
    pub fn page_table_root(&self, mem: &mut dyn Memory, ptr: u64) -> Option<u64> {
        let mm = mem.read_u64(ptr + self.task_layout.mm)?;
        if mm == 0 {
            return None;
        }
        mem.read_u64(mm + self.mm_pgd?)
    }

    pub fn read_comm(&self, mem: &mut dyn Memory, ptr: u64) -> String {
        let l = &self.task_layout;
        mem.read_c_string(ptr + l.comm, l.comm_len as usize)
            .map(|(s, _)| s)
            .unwrap_or_else(|| "?".into())
    }

    /// Where the task at `task_ptr` has the stimulus's image, if it runs the stimulus: the load
    /// bias and its code range (`mm_struct.start_code..end_code`).
    pub fn stimulus_bias(&self, mem: &mut dyn Memory, task_ptr: u64) -> Option<(u64, u64, u64)> {
        let caller = self.caller.as_ref()?;
        let mm = mem.read_u64(task_ptr + self.task_layout.mm)?;
        if mm == 0 {
            return None;
        }
        let start = mem.read_u64(mm + caller.start_code)?;
        let end = mem.read_u64(mm + caller.end_code)?;
        let code = caller.image.code_range();
        // The loader keeps the image's layout: the same code length is the same program.
        if end.wrapping_sub(start) != code.end - code.start {
            return None;
        }
        Some((start.wrapping_sub(code.start), start, end))
    }

    /// Where in the stimulus the task at `task_ptr` made the system call whose `pt_regs` are at
    /// `regs_ptr`: `main+0x1c (repro.c:14)`, or `None` in another program.
    fn call_site(&self, mem: &mut dyn Memory, task_ptr: u64, regs_ptr: u64) -> Option<String> {
        let (bias, start, end) = self.stimulus_bias(mem, task_ptr)?;
        let caller = self.caller.as_ref()?;
        let layout = self.pt_regs.as_ref()?;
        let ip = mem.read_u64(regs_ptr + layout.ip)?;
        let direct = caller.image.describe(ip.wrapping_sub(bias))?;
        if caller.image.has_source(ip.wrapping_sub(bias)) {
            return Some(direct);
        }
        // The `syscall` instruction is in a C library wrapper (no frame pointers, no lines):
        // the program's own caller is the first return address into its code on the stack.
        let sp = mem.read_u64(regs_ptr + layout.sp)?;
        for slot in 0..STACK_SCAN_WORDS {
            let Some(word) = mem.read_u64(sp.wrapping_add(slot * 8)) else {
                break;
            };
            if !(start..end).contains(&word) {
                continue;
            }
            if let Some(own) = caller.image.describe_return(word.wrapping_sub(bias)) {
                return Some(format!("{own} via {direct}"));
            }
        }
        Some(direct)
    }

    /// A kernel function's arguments at its entry, decoded by type.
    pub fn entry_args(&self, mem: &mut dyn Memory, function: u32, regs: &Regs) -> Vec<Shown> {
        let f = &self.index.functions[function as usize];
        f.params
            .iter()
            .map(|p| match arg_value(p, regs, mem) {
                Some(raw) => decode::show_arg(&self.index, p.ty, raw, mem),
                None => Shown::Str("<optimized out>".into()),
            })
            .collect()
    }

    /// A system call's number, arguments (from its `pt_regs` at `regs_ptr`) and the place in
    /// the stimulus it was made from.
    pub fn syscall_args(
        &self,
        mem: &mut dyn Memory,
        task_ptr: u64,
        call: &str,
        regs_ptr: u64,
    ) -> Vec<(String, Shown)> {
        let mut shown: Vec<(String, Shown)> = Vec::new();
        if let Some(layout) = &self.pt_regs {
            if let Some(nr) = mem.read_u64(regs_ptr + layout.orig_ax) {
                shown.push(("nr".into(), Shown::Int(nr as i64)));
            }
            let params = self.index.syscalls.get(call).cloned().unwrap_or_default();
            for (i, p) in params.iter().enumerate().take(6) {
                let name = p.name.as_deref().unwrap_or(ARG_NAMES[i]);
                let name = decode::arg_name(&self.index, name, p.ty);
                let value = match mem.read_u64(regs_ptr + layout.args[i]) {
                    Some(raw) => decode::show_arg(&self.index, p.ty, raw, mem),
                    None => Shown::Str("<unreadable>".into()),
                };
                shown.push((name, value));
            }
        }
        if let Some(site) = self.call_site(mem, task_ptr, regs_ptr) {
            shown.push(("from".into(), Shown::Str(site)));
        }
        shown
    }

    /// The value a function returns in `rax`, decoded by its type.
    pub fn return_value(&self, mem: &mut dyn Memory, function: u32, rax: u64) -> Option<Shown> {
        let ty = self.index.functions[function as usize].ret?;
        Some(decode::show(&self.index, ty, rax, mem))
    }

    /// The system call a kernel function is the wrapper of (`openat` for `__x64_sys_openat`).
    pub fn syscall_of(&self, function: u32) -> Option<&str> {
        let name = self.index.functions[function as usize].name.as_str();
        SYSCALL_PREFIXES.iter().find_map(|p| name.strip_prefix(p))
    }

    /// Everything the trace may read for a `hlt` probe's event, read now (so that a capturing
    /// reader keeps it): what [`super::tracer::Tracer`] reads when it writes the event, or more.
    /// Only the reads: the values are decoded (and the call site named) when the trace is
    /// written, which inside the carrier is natively, after the replay.
    pub fn read_for(&self, mem: &mut dyn Memory, probe: Probe, task_ptr: u64, regs: &Regs) {
        match probe {
            Probe::Entry(f) => match self.syscall_of(f) {
                Some(call) => {
                    self.read_syscall(mem, task_ptr, call, regs[5]);
                    self.read_comm(mem, task_ptr);
                }
                None => {
                    for p in &self.index.functions[f as usize].params {
                        if let Some(raw) = arg_value(p, regs, mem) {
                            self.read_arg(mem, p.ty, raw);
                        }
                    }
                }
            },
            Probe::Return(f) => {
                if let Some(ty) = self.index.functions[f as usize].ret {
                    if matches!(
                        self.index.value_kind(ty),
                        ValueKind::Str | ValueKind::CharBuffer
                    ) {
                        read_string(mem, regs[0]);
                    }
                }
            }
        }
    }

    /// What showing an argument of type `ty` reads ([`decode::show_arg`]): a `const char *`'s
    /// string.
    fn read_arg(&self, mem: &mut dyn Memory, ty: rrr_tracer::TypeId, raw: u64) {
        if matches!(self.index.value_kind(ty), ValueKind::Str) {
            read_string(mem, raw);
        }
    }

    /// What [`Introspection::syscall_args`] reads: the `pt_regs`, the strings its arguments
    /// point to, and for the call site the task's code range, the user `ip` and `sp`, and the
    /// user stack above `sp` (all of the words the search may look at).
    fn read_syscall(&self, mem: &mut dyn Memory, task_ptr: u64, call: &str, regs_ptr: u64) {
        let Some(layout) = &self.pt_regs else {
            return;
        };
        mem.read_u64(regs_ptr + layout.orig_ax);
        if let Some(params) = self.index.syscalls.get(call) {
            for (i, p) in params.iter().enumerate().take(6) {
                if let Some(raw) = mem.read_u64(regs_ptr + layout.args[i]) {
                    self.read_arg(mem, p.ty, raw);
                }
            }
        }
        if self.stimulus_bias(mem, task_ptr).is_none() {
            return;
        }
        mem.read_u64(regs_ptr + layout.ip);
        let Some(sp) = mem.read_u64(regs_ptr + layout.sp) else {
            return;
        };
        // Page by page, as far as it is mapped: the search reads word by word and stops at the
        // first word it cannot read.
        let end = sp.wrapping_add(STACK_SCAN_WORDS * 8);
        let mut at = sp;
        while at < end {
            let n = (0x1000 - (at & 0xfff)).min(end - at) as usize;
            let mut chunk = vec![0u8; n];
            if mem.read(at, &mut chunk).is_none() {
                break;
            }
            at += n as u64;
        }
    }

    pub fn arg_name(&self, function: u32, i: usize) -> String {
        let p = &self.index.functions[function as usize].params[i];
        let name = p.name.as_deref().unwrap_or(ARG_NAMES[i.min(5)]);
        decode::arg_name(&self.index, name, p.ty)
    }
}

/// A parameter's value at its function's entry, where DWARF places it (a constant included:
/// `__func__` passed to a clone is a string to read). `None` where it cannot be had.
fn arg_value(p: &rrr_tracer::Param, regs: &Regs, mem: &mut dyn Memory) -> Option<u64> {
    match &p.location {
        rrr_tracer::Location::Reg(r)
        | rrr_tracer::Location::Abi(r)
        | rrr_tracer::Location::RegPair(r, _) => Some(regs[*r as usize]),
        rrr_tracer::Location::Stack(off) => mem.read_u64(regs[7].wrapping_add(*off as u64)),
        rrr_tracer::Location::Const(v) => Some(*v),
        rrr_tracer::Location::Expr(_) | rrr_tracer::Location::Unavailable => None,
    }
}

/// What showing a string at `raw` reads (NULL is shown without a read).
fn read_string(mem: &mut dyn Memory, raw: u64) {
    if raw != 0 {
        mem.read_c_string(raw, decode::MAX_STRING);
    }
}
