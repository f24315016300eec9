//! The trace pass proper: what happens at each probe hit. The vCPU is moved past the probe as
//! the instruction under it would move it; the hit becomes a function entry or return on the
//! current task's track, with its arguments or return value decoded by type; the kernel's
//! system call wrappers (`__x64_sys_NAME`) become the syscall layer.
//!
//! Each task keeps a shadow stack of the calls it is in. A return closes the frames entered at
//! the same or a deeper stack pointer on the same stack: that also closes a function that
//! tail-called the returning one, and frames whose return was never seen.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufWriter;
use std::path::Path;

use rrr_perfetto::{Arg, Event, Kind, TraceWriter, TrackId, Value, MAX_DEPTH};
use rrr_tracer::{Index, TaskLayout, UserImage};
use rrr_vmm::builder::Vmm;
use rrr_vmm::clock::VirtualTime;
use rrr_vmm::rr::RrError;

use super::decode::{self, Shown};
use super::func_probes::{FuncProbe, FuncProbes};
use super::guest::GuestReader;
use super::probes::{Probe, ProbeSet};
use super::stubs::{CurrentAt, Record};
use crate::position::Position;

/// Kernel stacks (task and interrupt stacks) are 16 KiB and aligned to it: an address's stack.
const STACK_SHIFT: u32 = 14;
/// The idle task has pid 0, which Perfetto does not take: it gets this one.
const IDLE_PID: i32 = 0x3fff_ffff;
const SYSCALL_PREFIXES: [&str; 2] = ["__x64_sys_", "__ia32_sys_"];

/// What the trace shows, beyond which functions carry probes.
#[derive(Debug, Clone, Default)]
pub struct EmitFilter {
    /// Only these tasks (by pid or thread-group id); empty: all.
    pub pids: Vec<i32>,
    /// Only this many levels of calls per task (the syscall layer counts as one).
    pub depth: Option<u32>,
}

/// Counts of one trace pass.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct TraceStats {
    pub probes: usize,
    pub probes_dropped: usize,
    pub entries: u64,
    pub returns: u64,
    pub syscalls: u64,
    /// Entries and exits of the stimulus's own functions.
    pub user_entries: u64,
    pub user_returns: u64,
    pub events: u64,
    pub tasks: usize,
    pub switches: u64,
    /// Host time spent handling probe hits (the rest of a traced replay's extra time is the
    /// exits themselves).
    pub handling_ns: u64,
    /// Sites with an in-guest stub (no exit), and with a `hlt`.
    pub stub_sites: usize,
    pub halt_sites: usize,
    /// Calls and returns the stubs recorded, and the exits that drained them when their buffer
    /// was full.
    pub stub_records: u64,
    pub full_drains: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FrameKind {
    Function,
    Syscall,
    /// One of the stimulus's own functions (`function` numbers it in its image).
    User,
}

#[derive(Debug)]
struct Frame {
    stack: u64,
    entry_rsp: u64,
    function: u32,
    kind: FrameKind,
    emitted: bool,
}

struct Task {
    pid: i32,
    tgid: i32,
    comm: String,
    track: TrackId,
    frames: Vec<Frame>,
    shown: bool,
}

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

pub struct Tracer {
    index: Index,
    probes: ProbeSet,
    mem: GuestReader,
    writer: TraceWriter<BufWriter<File>>,
    filter: EmitFilter,
    task_layout: TaskLayout,
    pt_regs: Option<PtRegs>,
    /// Where the current task's pointer is (per-CPU offsets applied).
    current_at: u64,
    tasks: HashMap<u64, Task>,
    last_task: Option<u64>,
    last_ts: u64,
    next_flow: u64,
    arg_names: HashMap<u32, std::rc::Rc<[String]>>,
    /// Probe hits per address since the last exit: with the exit count they name the moment of
    /// an event in the replay (its position).
    hits: HitCounter,
    caller: Option<Caller>,
    func_probes: Option<FuncProbes>,
    /// Where the stubs read the current task.
    stub_current: Option<CurrentAt>,
    /// The exit count and virtual time since the last exit: the moment of the stubs' records
    /// drained at the next one.
    since: (u64, VirtualTime),
    records: Vec<Record>,
    stats: TraceStats,
}

/// Counts arrivals at each probe address between two exits.
#[derive(Default)]
struct HitCounter {
    exits: u64,
    counts: HashMap<u64, u64>,
}

impl HitCounter {
    fn arrive(&mut self, exits: u64, rip: u64) -> Position {
        if exits != self.exits {
            self.exits = exits;
            self.counts.clear();
        }
        let hits = self.counts.entry(rip).or_insert(0);
        *hits += 1;
        Position::arrival(exits, rip, *hits)
    }
}

impl Tracer {
    pub fn new(
        index: Index,
        functions: &[u32],
        output: &Path,
        filter: EmitFilter,
    ) -> anyhow::Result<Tracer> {
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
        let probes = ProbeSet::new(&index, functions);
        let writer = TraceWriter::create(output)
            .with_context(|| format!("cannot create the trace {}", output.display()))?;
        Ok(Tracer {
            stats: TraceStats {
                probes: probes.len(),
                ..Default::default()
            },
            index,
            probes,
            mem: GuestReader::new(),
            writer,
            filter,
            task_layout,
            pt_regs,
            current_at: 0,
            tasks: HashMap::new(),
            last_task: None,
            last_ts: 0,
            next_flow: 1,
            arg_names: HashMap::new(),
            hits: HitCounter::default(),
            caller: None,
            func_probes: None,
            stub_current: None,
            since: (0, VirtualTime::ZERO),
            records: Vec::new(),
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
            self.func_probes = FuncProbes::new(&image);
            if self.func_probes.is_none() {
                tracing::warn!("the stimulus has no rrr function hooks (built by an older rrr?); its own functions are not traced");
            }
            self.caller = Some(Caller {
                image,
                start_code,
                end_code,
            });
        }
    }

    /// Where in the stimulus the current task made the system call whose `pt_regs` are at
    /// `regs_ptr`: `main+0x1c (repro.c:14)`, or `None` in another program.
    fn call_site(&mut self, vmm: &Vmm, task_ptr: u64, regs_ptr: u64) -> Option<String> {
        let (bias, start, end) = self.stimulus_bias(vmm, task_ptr)?;
        let caller = self.caller.as_ref()?;
        let layout = self.pt_regs.as_ref()?;
        let ip = self.mem.read_u64(vmm, regs_ptr + layout.ip)?;
        let direct = caller.image.describe(ip.wrapping_sub(bias))?;
        if caller.image.has_source(ip.wrapping_sub(bias)) {
            return Some(direct);
        }
        // The `syscall` instruction is in a C library wrapper (no frame pointers, no lines):
        // the program's own caller is the first return address into its code on the stack.
        let sp = self.mem.read_u64(vmm, regs_ptr + layout.sp)?;
        for slot in 0..STACK_SCAN_WORDS {
            let Some(word) = self.mem.read_u64(vmm, sp.wrapping_add(slot * 8)) else {
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

    /// Where the task at `task_ptr` has the stimulus's image, if it runs the stimulus: the load
    /// bias and its code range (`mm_struct.start_code..end_code`).
    fn stimulus_bias(&mut self, vmm: &Vmm, task_ptr: u64) -> Option<(u64, u64, u64)> {
        let caller = self.caller.as_ref()?;
        let mm = self.mem.read_u64(vmm, task_ptr + self.task_layout.mm)?;
        if mm == 0 {
            return None;
        }
        let start = self.mem.read_u64(vmm, mm + caller.start_code)?;
        let end = self.mem.read_u64(vmm, mm + caller.end_code)?;
        let code = caller.image.code_range();
        // The loader keeps the image's layout: the same code length is the same program.
        if end.wrapping_sub(start) != code.end - code.start {
            return None;
        }
        Some((start.wrapping_sub(code.start), start, end))
    }

    /// Plants the stimulus's function probes once a task running it has their page mapped
    /// (tried at kernel probe hits until both are in).
    fn plant_func_probes(&mut self, vmm: &Vmm) {
        if !self
            .func_probes
            .as_ref()
            .is_some_and(FuncProbes::wants_planting)
        {
            return;
        }
        let Some(task) = self.mem.read_u64(vmm, self.current_at) else {
            return;
        };
        let Some((bias, _, _)) = self.stimulus_bias(vmm, task) else {
            return;
        };
        if let Some(probes) = &mut self.func_probes {
            probes.plant(vmm, &mut self.mem, bias);
        }
    }

    /// An `outb` to the function-probe port: the entry or exit of one of the stimulus's
    /// functions. Returns false if it was not one of ours (then it is the guest's own write).
    pub fn func_hit(
        &mut self,
        vmm: &mut Vmm,
        exits: u64,
        now: VirtualTime,
    ) -> Result<bool, RrError> {
        let started = std::time::Instant::now();
        let r = self.func_hit_inner(vmm, exits, now);
        self.stats.handling_ns += started.elapsed().as_nanos() as u64;
        r
    }

    fn func_hit_inner(
        &mut self,
        vmm: &mut Vmm,
        exits: u64,
        now: VirtualTime,
    ) -> Result<bool, RrError> {
        if self.func_probes.is_none() {
            return Ok(false);
        }
        self.drain(vmm, exits, now)?;
        let regs = self.read_regs(vmm)?;
        self.mem.refresh();
        let Some(task_ptr) = self.mem.read_u64(vmm, self.current_at) else {
            return Ok(false);
        };
        let Some((bias, _, _)) = self.stimulus_bias(vmm, task_ptr) else {
            return Ok(false);
        };
        // KVM leaves RIP on an `out` it hands to the VMM.
        let at = regs.rip.wrapping_sub(bias);
        let Some(kind) = self.func_probes.as_ref().and_then(|p| p.at(at)) else {
            return Ok(false);
        };
        let mut moved = regs;
        moved.rip = bias.wrapping_add(FuncProbes::resume_after(at));
        self.write_regs(vmm, &moved)?;
        let image = &self
            .caller
            .as_ref()
            .expect("probes come with the image")
            .image;
        let mask = if image.is_32() { 0xffff_ffff } else { u64::MAX };
        let function = (regs.rdi & mask).wrapping_sub(bias);
        let call_site = (regs.rsi & mask).wrapping_sub(bias);
        let Some((index, _)) = image.function_at(function) else {
            return Ok(true);
        };
        let ts = self.timestamp(now);
        let position = self.hits.arrive(exits, regs.rip);
        let ptr = self
            .read_current(vmm)
            .map_err(|e| RrError::Probe(e.to_string()))?;
        let result = match kind {
            FuncProbe::Enter => self.entered_user(ptr, index, call_site, &regs, ts, position),
            FuncProbe::Exit => self.returned_user(ptr, index, ts, position),
        };
        result.map_err(|e| RrError::Probe(e.to_string()))?;
        Ok(true)
    }

    fn entered_user(
        &mut self,
        ptr: u64,
        function: u32,
        call_site: u64,
        regs: &kvm_bindings::kvm_regs,
        ts: u64,
        at: Position,
    ) -> anyhow::Result<()> {
        self.stats.user_entries += 1;
        self.close_kernel_frames(ptr, ts)?;
        let emitted = self.shows_next_frame(ptr);
        if emitted {
            let image = &self
                .caller
                .as_ref()
                .expect("probes come with the image")
                .image;
            let name = image.function_name(function).to_owned();
            let mut shown = Vec::new();
            if let Some(from) = image.describe_return(call_site) {
                shown.push(("from", Shown::Str(from)));
            }
            shown.push((POSITION_ARG, Shown::Str(at.to_string())));
            let args = as_args(&shown);
            let track = self.tasks[&ptr].track;
            self.writer.event(
                &Event::new(ts, track, Kind::Begin(&name))
                    .category(STIMULUS_CATEGORY)
                    .args(&args),
            )?;
        }
        let task = self.tasks.get_mut(&ptr).expect("current() inserted it");
        task.frames.push(Frame {
            stack: regs.rsp >> STACK_SHIFT,
            entry_rsp: regs.rsp,
            function,
            kind: FrameKind::User,
            emitted,
        });
        Ok(())
    }

    /// The exit hook of one of the stimulus's functions: closes its frame, and any left open
    /// above it (a `longjmp` out of them, or a system call that never returned, such as `exit`).
    fn returned_user(
        &mut self,
        ptr: u64,
        function: u32,
        ts: u64,
        at: Position,
    ) -> anyhow::Result<()> {
        self.stats.user_returns += 1;
        self.close_kernel_frames(ptr, ts)?;
        let task = self.tasks.get_mut(&ptr).expect("current() inserted it");
        let Some(first) = task
            .frames
            .iter()
            .rposition(|f| f.kind == FrameKind::User && f.function == function)
        else {
            // Entered before the probes were planted.
            return Ok(());
        };
        let closed: Vec<Frame> = task.frames.drain(first..).rev().collect();
        let track = task.track;
        let at = at.to_string();
        let position = [Arg::new(POSITION_ARG, Value::Str(&at))];
        let unseen = [Arg::new("return", Value::Str("<not seen>"))];
        for frame in closed.iter().filter(|f| f.emitted) {
            let args: &[Arg<'_>] = if frame.kind == FrameKind::User && frame.function == function {
                &position
            } else {
                &unseen
            };
            self.writer.end(ts, track, args)?;
        }
        Ok(())
    }

    /// The task runs its user code: every kernel frame still open on top of its stack is one
    /// whose return was never seen (`execve`, which returns into a new program; a signal's
    /// delivery), and ends here, before a user function's slice begins or ends.
    fn close_kernel_frames(&mut self, ptr: u64, ts: u64) -> anyhow::Result<()> {
        let task = self.tasks.get_mut(&ptr).expect("current() inserted it");
        let track = task.track;
        let unseen = [Arg::new("return", Value::Str("<not seen>"))];
        while task
            .frames
            .last()
            .is_some_and(|f| f.kind != FrameKind::User)
        {
            let frame = task.frames.pop().expect("just looked");
            if frame.emitted {
                self.writer.end(ts, track, &unseen)?;
            }
        }
        Ok(())
    }

    pub fn stats(&self) -> TraceStats {
        TraceStats {
            events: self.writer.stats().events,
            ..self.stats
        }
    }

    /// Plants the probes: at READY (exit `exits`, virtual time `now`), once the snapshot is
    /// restored.
    pub fn start(&mut self, vmm: &Vmm, exits: u64, now: VirtualTime) -> anyhow::Result<()> {
        self.since = (exits, now);
        use anyhow::Context;
        let current = self
            .index
            .current_task
            .clone()
            .context("the kernel's symbols do not say where the current task is")?;
        self.current_at = current.address;
        if current.per_cpu {
            // One vCPU: CPU 0's per-CPU area.
            let offsets = self
                .index
                .symbol("__per_cpu_offset")
                .context("a per-CPU kernel without __per_cpu_offset")?
                .address;
            let base = self
                .mem
                .read_u64(vmm, offsets)
                .context("cannot read CPU 0's per-CPU offset")?;
            self.current_at = self.current_at.wrapping_add(base);
        }
        self.stub_current = Some(if current.per_cpu {
            CurrentAt::PerCpu(current.address)
        } else {
            CurrentAt::Global(current.address)
        });
        let wanted = self.probes.len();
        self.stats.probes_dropped = self.probes.plant(vmm, &mut self.mem, self.stub_current)?;
        self.stats.probes = self.probes.len();
        self.stats.stub_sites = self.probes.stubbed;
        self.stats.halt_sites = self.probes.halted;
        if !self.probes.has_stub_room() {
            tracing::info!("the kernel has no room for in-guest probes (not built by rrr?): every traced call is a VM exit, and the trace takes longer");
        }
        // A few sites may have changed since the build (code the kernel patched at boot); most
        // not matching means the code in memory is not this vmlinux's.
        if self.stats.probes_dropped * 10 > wanted {
            self.probes.lift(vmm, &mut self.mem)?;
            anyhow::bail!(
                "{} of {wanted} probe sites in the guest do not hold the instructions {} has there: the kernel in memory is not this vmlinux, or it is relocated (KASLR: boot with nokaslr, as rrr's command line does)",
                self.stats.probes_dropped,
                "the vmlinux"
            );
        }
        Ok(())
    }

    /// Lifts the probes (the guest's memory is its own again), once the stubs' last records are
    /// in the trace.
    pub fn lift(&mut self, vmm: &Vmm) -> Result<(), RrError> {
        let (exits, now) = self.since;
        self.drain(vmm, exits, now)?;
        if let Some(probes) = &mut self.func_probes {
            probes.lift(vmm);
        }
        self.probes
            .lift(vmm, &mut self.mem)
            .map_err(|e| RrError::Probe(e.to_string()))
    }

    pub fn replant(&mut self, vmm: &Vmm) -> Result<(), RrError> {
        if let Some(probes) = &mut self.func_probes {
            probes.replant(vmm);
        }
        self.probes
            .plant(vmm, &mut self.mem, self.stub_current)
            .map(|_| ())
            .map_err(|e| RrError::Probe(e.to_string()))
    }

    pub fn planted(&self) -> bool {
        self.probes.planted()
    }

    /// A counted exit (`exits` so far, virtual time `now` after it): the stubs' records made
    /// since the last one go into the trace, stamped with that one.
    pub fn exit_seen(&mut self, vmm: &Vmm, exits: u64, now: VirtualTime) -> Result<(), RrError> {
        if self.probes.planted() {
            let started = std::time::Instant::now();
            let (at, then) = self.since;
            self.drain(vmm, at, then)?;
            self.stats.handling_ns += started.elapsed().as_nanos() as u64;
        }
        self.since = (exits, now);
        Ok(())
    }

    /// Handles the records in the stubs' buffer, as if each had been a probe hit after exit
    /// `exits`. (Its time counts in the caller's `handling_ns`.)
    fn drain(&mut self, vmm: &Vmm, exits: u64, now: VirtualTime) -> Result<(), RrError> {
        let mut records = std::mem::take(&mut self.records);
        self.probes
            .drain(vmm, &mut self.mem, &mut records)
            .map_err(|e| RrError::Probe(format!("{e:#}")))?;
        if !records.is_empty() {
            self.mem.refresh();
            self.stats.stub_records += records.len() as u64;
        }
        let mut result = Ok(());
        for record in records.drain(..) {
            result = self.recorded(vmm, &record, exits, now);
            if result.is_err() {
                break;
            }
        }
        self.records = records;
        result.map_err(|e| RrError::Probe(e.to_string()))
    }

    /// One stub's record: a call or a return, with the registers the stub kept.
    fn recorded(
        &mut self,
        vmm: &Vmm,
        record: &Record,
        exits: u64,
        now: VirtualTime,
    ) -> anyhow::Result<()> {
        let Some(probe) = self.probes.get(record.site) else {
            anyhow::bail!(
                "the trace buffer holds a record from {:#x}, which has no probe: the guest wrote over the buffer",
                record.site
            );
        };
        let mut regs = kvm_bindings::kvm_regs {
            rsp: record.rsp,
            ..Default::default()
        };
        match probe {
            Probe::Entry(_) => {
                let [rdi, rsi, rdx, rcx, r8, r9] = record.regs;
                (regs.rdi, regs.rsi, regs.rdx, regs.rcx, regs.r8, regs.r9) =
                    (rdi, rsi, rdx, rcx, r8, r9);
            }
            Probe::Return(_) => (regs.rax, regs.rdx) = (record.regs[0], record.regs[1]),
        }
        let ts = self.timestamp(now);
        let ptr = self.switch_to(vmm, record.current)?;
        match probe {
            Probe::Entry(f) => {
                let at = self.hits.arrive(exits, record.site);
                self.entered(vmm, ptr, f, &regs, ts, at)
            }
            Probe::Return(f) => self.returned(vmm, ptr, f, &regs, ts),
        }?;
        self.plant_func_probes(vmm);
        Ok(())
    }

    /// Ends every open slice and writes the rest of the trace (after [`Tracer::lift`]).
    pub fn finish(mut self, now: VirtualTime) -> anyhow::Result<TraceStats> {
        let ts = self.timestamp(now);
        let stats = self.stats();
        for (_, task) in std::mem::take(&mut self.tasks) {
            self.end_all(task, ts)?;
        }
        self.writer.finish()?;
        Ok(stats)
    }

    fn timestamp(&mut self, now: VirtualTime) -> u64 {
        // Virtual time moves at exits only; events between two exits get one nanosecond each
        // so they keep their order on every track.
        self.last_ts = now.as_nanos().max(self.last_ts + 1);
        self.last_ts
    }

    /// One `hlt` exit. Returns false if it was the guest's own `hlt`.
    pub fn hit(&mut self, vmm: &mut Vmm, exits: u64, now: VirtualTime) -> Result<bool, RrError> {
        let started = std::time::Instant::now();
        let r = self.hit_inner(vmm, exits, now);
        self.stats.handling_ns += started.elapsed().as_nanos() as u64;
        r
    }

    fn hit_inner(&mut self, vmm: &mut Vmm, exits: u64, now: VirtualTime) -> Result<bool, RrError> {
        let regs = self.read_regs(vmm)?;
        // KVM completed the `hlt` before it exited: RIP is past it.
        let at = regs.rip.wrapping_sub(1);
        let full = self.probes.is_full_halt(at);
        let probe = self.probes.get(at);
        if !full && probe.is_none() {
            return Ok(false);
        }
        // Every call the stubs recorded came before this one.
        self.drain(vmm, exits, now)?;
        if full {
            // The stub goes on to record its call into the emptied buffer.
            self.stats.full_drains += 1;
            return Ok(true);
        }
        let Some(probe) = probe else {
            return Ok(false);
        };
        // User memory and vmalloc'd stacks are read through the page tables in use now.
        self.mem.refresh();
        tracing::trace!(
            rip = format_args!("{:#x}", regs.rip),
            at = format_args!("{at:#x}"),
            ?probe,
            rsp = format_args!("{:#x}", regs.rsp),
            "probe hit"
        );
        let mut moved = regs;
        match probe {
            Probe::Entry(_) => moved.rip = at + 5,
            Probe::Return(_) => {
                let ret = self.mem.read_u64(vmm, regs.rsp).ok_or_else(|| {
                    RrError::Probe(format!(
                        "cannot read the return address at rsp {:#x} (return at {at:#x})",
                        regs.rsp
                    ))
                })?;
                moved.rip = ret;
                moved.rsp = regs.rsp.wrapping_add(8);
            }
        }
        self.write_regs(vmm, &moved)?;
        let ts = self.timestamp(now);
        let at = self.hits.arrive(exits, at);
        let result = self.read_current(vmm).and_then(|ptr| match probe {
            Probe::Entry(f) => self.entered(vmm, ptr, f, &regs, ts, at),
            // Returns carry no position (half the events, and most of their size): gdb gets
            // to one from its call's entry with `finish`.
            Probe::Return(f) => self.returned(vmm, ptr, f, &regs, ts),
        });
        result.map_err(|e| RrError::Probe(e.to_string()))?;
        self.plant_func_probes(vmm);
        Ok(true)
    }

    /// The vCPU's registers at a probe, from the run page (KVM_CAP_SYNC_REGS): no ioctl.
    fn read_regs(&self, vmm: &Vmm) -> Result<kvm_bindings::kvm_regs, RrError> {
        vmm.vcpu.exit_regs().map_err(RrError::Vcpu)
    }

    /// Where the guest goes on after a probe (the instruction under it done by the VMM).
    fn write_regs(&mut self, vmm: &mut Vmm, moved: &kvm_bindings::kvm_regs) -> Result<(), RrError> {
        vmm.vcpu.set_regs_for_entry(moved).map_err(RrError::Vcpu)
    }

    /// Whether a frame the task at `ptr` enters now is written: the task is shown (`--pid`), and
    /// the frame is within Perfetto's depth and the `--depth` filter.
    fn shows_next_frame(&self, ptr: u64) -> bool {
        let task = &self.tasks[&ptr];
        let depth = task.frames.iter().filter(|f| f.emitted).count() as u32;
        task.shown && depth + 1 < MAX_DEPTH && self.filter.depth.map_or(true, |max| depth < max)
    }

    /// The task running now, read from the guest (and its identity when it is new).
    fn read_current(&mut self, vmm: &Vmm) -> anyhow::Result<u64> {
        let ptr = self
            .mem
            .read_u64(vmm, self.current_at)
            .ok_or_else(|| anyhow::anyhow!("cannot read the current task pointer"))?;
        self.switch_to(vmm, ptr)
    }

    /// The task at `ptr` runs (and its identity is read when it is new).
    fn switch_to(&mut self, vmm: &Vmm, ptr: u64) -> anyhow::Result<u64> {
        if self.last_task != Some(ptr) {
            // A task runs after a switch, and a new task's first run is one: this is where a
            // task_struct the kernel reused for another task is told from the one we knew.
            let known = self.tasks.get(&ptr).map(|t| (t.pid, t.tgid));
            if known.is_none() || known != Some(self.read_ids(vmm, ptr)) {
                let task = self.read_task(vmm, ptr)?;
                if let Some(old) = self.tasks.insert(ptr, task) {
                    self.end_all(old, self.last_ts)?;
                }
            }
            self.switched(ptr)?;
        }
        Ok(ptr)
    }

    fn read_ids(&mut self, vmm: &Vmm, ptr: u64) -> (i32, i32) {
        let l = &self.task_layout;
        let (pid_at, tgid_at) = (ptr + l.pid, ptr + l.tgid);
        let pid = self.mem.read_u32(vmm, pid_at).unwrap_or(0) as i32;
        let tgid = self.mem.read_u32(vmm, tgid_at).unwrap_or(0) as i32;
        (pid, tgid)
    }

    /// Ends the open slices of a task that is gone (its task_struct now holds another).
    fn end_all(&mut self, mut task: Task, ts: u64) -> anyhow::Result<()> {
        let unfinished = [Arg::new("unfinished", Value::Bool(true))];
        while let Some(frame) = task.frames.pop() {
            if frame.emitted {
                self.writer.end(ts, task.track, &unfinished)?;
            }
        }
        Ok(())
    }

    fn read_task(&mut self, vmm: &Vmm, ptr: u64) -> anyhow::Result<Task> {
        let (pid, tgid) = self.read_ids(vmm, ptr);
        let comm = self.read_comm(vmm, ptr);
        self.stats.tasks += 1;
        let (p, t) = displayed_ids(pid, tgid);
        let shown = self.filter.pids.is_empty()
            || self.filter.pids.contains(&pid)
            || self.filter.pids.contains(&tgid);
        let track = self.writer.thread(t, p, &comm)?;
        if tgid == pid {
            self.writer.process(t, Some(&comm))?;
        }
        Ok(Task {
            pid,
            tgid,
            comm,
            track,
            frames: Vec::new(),
            shown,
        })
    }

    fn read_comm(&mut self, vmm: &Vmm, ptr: u64) -> String {
        let l = &self.task_layout;
        self.mem
            .read_c_string(vmm, ptr + l.comm, l.comm_len as usize)
            .map(|(s, _)| s)
            .unwrap_or_else(|| "?".into())
    }

    /// A switch between tasks: an arrow from where the last one stopped to where this one
    /// goes on.
    fn switched(&mut self, to: u64) -> anyhow::Result<()> {
        let ts = self.last_ts;
        if let Some(from) = self.last_task {
            let id = [self.next_flow];
            self.next_flow += 1;
            self.stats.switches += 1;
            let from_track = self.tasks[&from].track;
            let to_track = self.tasks[&to].track;
            self.writer.event(
                &Event::new(ts, from_track, Kind::Instant("switched out"))
                    .category("sched")
                    .flows(&id),
            )?;
            self.writer.event(
                &Event::new(ts, to_track, Kind::Instant("switched in"))
                    .category("sched")
                    .terminating_flows(&id),
            )?;
        }
        self.last_task = Some(to);
        Ok(())
    }

    fn entered(
        &mut self,
        vmm: &Vmm,
        ptr: u64,
        function: u32,
        regs: &kvm_bindings::kvm_regs,
        ts: u64,
        at: Position,
    ) -> anyhow::Result<()> {
        self.stats.entries += 1;
        let name = self.index.functions[function as usize].name.as_str();
        let syscall = SYSCALL_PREFIXES
            .iter()
            .find_map(|p| name.strip_prefix(p))
            .map(str::to_owned);
        let kind = if syscall.is_some() {
            FrameKind::Syscall
        } else {
            FrameKind::Function
        };
        let emitted = self.shows_next_frame(ptr);
        if emitted {
            match &syscall {
                Some(call) => self.begin_syscall(vmm, ptr, call, regs.rdi, ts, at)?,
                None => self.begin_function(vmm, ptr, function, regs, ts, at)?,
            }
        }
        let task = self.tasks.get_mut(&ptr).expect("current() inserted it");
        task.frames.push(Frame {
            stack: regs.rsp >> STACK_SHIFT,
            entry_rsp: regs.rsp,
            function,
            kind,
            emitted,
        });
        Ok(())
    }

    fn begin_function(
        &mut self,
        vmm: &Vmm,
        ptr: u64,
        function: u32,
        regs: &kvm_bindings::kvm_regs,
        ts: u64,
        at: Position,
    ) -> anyhow::Result<()> {
        let names = self.arg_names(function);
        let f = &self.index.functions[function as usize];
        let mut shown: Vec<(&str, Shown)> = Vec::with_capacity(f.params.len());
        for (i, p) in f.params.iter().enumerate() {
            let raw = match &p.location {
                rrr_tracer::Location::Reg(r)
                | rrr_tracer::Location::Abi(r)
                | rrr_tracer::Location::RegPair(r, _) => Some(register(regs, *r)),
                rrr_tracer::Location::Stack(off) => {
                    self.mem.read_u64(vmm, regs.rsp.wrapping_add(*off as u64))
                }
                rrr_tracer::Location::Const(v) => Some(*v),
                rrr_tracer::Location::Expr(_) | rrr_tracer::Location::Unavailable => None,
            };
            let value = match raw {
                Some(raw) => decode::show(&self.index, p.ty, raw, vmm, &mut self.mem),
                None => Shown::Str("<optimized out>".into()),
            };
            shown.push((names[i].as_str(), value));
        }
        shown.push((POSITION_ARG, Shown::Str(at.to_string())));
        let args = as_args(&shown);
        let category = self.index.source_path(f).split('/').next().unwrap_or("");
        let track = self.tasks[&ptr].track;
        self.writer.event(
            &Event::new(ts, track, Kind::Begin(&f.name))
                .category(category)
                .args(&args),
        )?;
        Ok(())
    }

    /// The names a function's arguments have in the trace, made once per function.
    fn arg_names(&mut self, function: u32) -> std::rc::Rc<[String]> {
        if let Some(names) = self.arg_names.get(&function) {
            return names.clone();
        }
        let f = &self.index.functions[function as usize];
        let names: std::rc::Rc<[String]> = f
            .params
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let name = p.name.as_deref().unwrap_or(ARG_NAMES[i.min(5)]);
                decode::arg_name(&self.index, name, p.ty)
            })
            .collect();
        self.arg_names.insert(function, names.clone());
        names
    }

    fn begin_syscall(
        &mut self,
        vmm: &Vmm,
        ptr: u64,
        call: &str,
        regs_ptr: u64,
        ts: u64,
        at: Position,
    ) -> anyhow::Result<()> {
        self.stats.syscalls += 1;
        let mut shown: Vec<(String, Shown)> = Vec::new();
        if let Some(layout) = &self.pt_regs {
            let nr = self.mem.read_u64(vmm, regs_ptr + layout.orig_ax);
            if let Some(nr) = nr {
                shown.push(("nr".into(), Shown::Int(nr as i64)));
            }
            let params = self.index.syscalls.get(call).cloned().unwrap_or_default();
            for (i, p) in params.iter().enumerate().take(6) {
                let name = p.name.as_deref().unwrap_or(ARG_NAMES[i]);
                let name = decode::arg_name(&self.index, name, p.ty);
                let value = match self.mem.read_u64(vmm, regs_ptr + layout.args[i]) {
                    Some(raw) => decode::show(&self.index, p.ty, raw, vmm, &mut self.mem),
                    None => Shown::Str("<unreadable>".into()),
                };
                shown.push((name, value));
            }
        }
        if let Some(site) = self.call_site(vmm, ptr, regs_ptr) {
            shown.push(("from".into(), Shown::Str(site)));
        }
        shown.push((POSITION_ARG.into(), Shown::Str(at.to_string())));
        // A new program's name shows from its first system call on.
        let comm = self.read_comm(vmm, ptr);
        let task = self.tasks.get_mut(&ptr).expect("current() inserted it");
        if comm != task.comm {
            task.comm = comm;
            let (p, t) = displayed_ids(task.pid, task.tgid);
            let comm = task.comm.clone();
            self.writer.thread(t, p, &comm)?;
            if p == t {
                self.writer.process(t, Some(&comm))?;
            }
        }
        let args = as_args(&shown);
        let track = self.tasks[&ptr].track;
        self.writer.event(
            &Event::new(ts, track, Kind::Begin(call))
                .category("syscall")
                .args(&args),
        )?;
        Ok(())
    }

    fn returned(
        &mut self,
        vmm: &Vmm,
        ptr: u64,
        function: u32,
        regs: &kvm_bindings::kvm_regs,
        ts: u64,
    ) -> anyhow::Result<()> {
        self.stats.returns += 1;
        let stack = regs.rsp >> STACK_SHIFT;
        let frames = &self.tasks[&ptr].frames;
        // The frames this return closes: from the top, those on this stack entered at or below
        // this stack pointer, and any left above them on other stacks (an interrupt's frames
        // whose return was missed).
        let mut first = None;
        for (i, f) in frames.iter().enumerate().rev() {
            // Kernel frames under a user function's were left by an earlier kernel entry.
            if f.kind == FrameKind::User {
                break;
            }
            if f.stack == stack {
                if f.entry_rsp <= regs.rsp {
                    first = Some(i);
                } else {
                    break;
                }
            }
        }
        let Some(first) = first else {
            // A return from a call entered before the probes were planted.
            return Ok(());
        };
        let task = self.tasks.get_mut(&ptr).expect("current() inserted it");
        let closed: Vec<Frame> = task.frames.drain(first..).rev().collect();
        let track = task.track;
        for frame in closed {
            if !frame.emitted {
                continue;
            }
            // The function that returned, and those that tail-called it, return its value.
            let returns_here = frame.entry_rsp == regs.rsp && frame.stack == stack;
            let mut shown: Vec<(&str, Shown)> = Vec::new();
            if returns_here {
                match frame.kind {
                    FrameKind::Syscall => {
                        let (value, errno) = decode::syscall_return(regs.rax);
                        shown.push(("return", Shown::Int(value)));
                        if let Some(errno) = errno {
                            shown.push(("errno", Shown::Str(errno.into())));
                        }
                    }
                    FrameKind::Function => {
                        if let Some(ty) = self.index.functions[frame.function as usize].ret {
                            let value = decode::show(&self.index, ty, regs.rax, vmm, &mut self.mem);
                            shown.push(("return", value));
                        }
                    }
                    // A kernel return never returns from the stimulus's code.
                    FrameKind::User => {}
                }
                if frame.kind != FrameKind::User && frame.function != function {
                    let by = &self.index.functions[function as usize].name;
                    shown.push(("returned through", Shown::Str(by.clone())));
                }
            } else {
                shown.push(("return", Shown::Str("<not seen>".into())));
            }
            let args = as_args(&shown);
            self.writer.end(ts, track, &args)?;
        }
        Ok(())
    }
}

/// How far up the user stack a system call's caller in the program's own code is looked for.
const STACK_SCAN_WORDS: u64 = 64;

/// Named values as the writer's arguments (borrowing them).
fn as_args<N: AsRef<str>>(shown: &[(N, Shown)]) -> Vec<Arg<'_>> {
    shown
        .iter()
        .map(|(name, value)| Arg::new(name.as_ref(), value.value()))
        .collect()
}

/// The category of the stimulus's own functions in the trace.
const STIMULUS_CATEGORY: &str = "stimulus";

/// The argument every entry carries: where it happened, for `monitor goto` in gdb.
const POSITION_ARG: &str = "position";

const ARG_NAMES: [&str; 6] = ["arg0", "arg1", "arg2", "arg3", "arg4", "arg5"];

/// (pid, tid) as Perfetto shows them: the thread group is the process, the idle task gets a
/// pid Perfetto accepts.
fn displayed_ids(pid: i32, tgid: i32) -> (i32, i32) {
    let pid = if pid == 0 { IDLE_PID } else { pid };
    let tgid = if tgid == 0 { IDLE_PID } else { tgid };
    (pid, tgid)
}

fn register(regs: &kvm_bindings::kvm_regs, reg: rrr_tracer::Reg) -> u64 {
    use rrr_tracer::Reg::*;
    match reg {
        Rax => regs.rax,
        Rdx => regs.rdx,
        Rcx => regs.rcx,
        Rbx => regs.rbx,
        Rsi => regs.rsi,
        Rdi => regs.rdi,
        Rbp => regs.rbp,
        Rsp => regs.rsp,
        R8 => regs.r8,
        R9 => regs.r9,
        R10 => regs.r10,
        R11 => regs.r11,
        R12 => regs.r12,
        R13 => regs.r13,
        R14 => regs.r14,
        R15 => regs.r15,
    }
}

#[cfg(test)]
mod tests {
    use super::{HitCounter, Position};

    #[test]
    fn a_position_counts_arrivals_at_one_address_since_the_last_exit() {
        let mut hits = HitCounter::default();
        assert_eq!(hits.arrive(7, 0x10).hits, 1);
        assert_eq!(hits.arrive(7, 0x20).hits, 1);
        assert_eq!(hits.arrive(7, 0x10).hits, 2);
        // A new exit starts the count again.
        let p = hits.arrive(8, 0x10);
        assert_eq!(p, Position::arrival(8, 0x10, 1));
        assert_eq!(p.to_string(), "8:0x10:1");
    }
}
