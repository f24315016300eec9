//! The trace pass's half that writes the trace: each [`Observation`] becomes a function entry
//! or return on the current task's track, with its arguments or return value decoded by type;
//! the kernel's system call wrappers (`__x64_sys_NAME`) become the syscall layer. It reads no
//! live guest: what an event needs from guest memory came with it.
//!
//! Each task keeps a shadow stack of the calls it is in. A return closes the frames entered at
//! the same or a deeper stack pointer on the same stack: that also closes a function that
//! tail-called the returning one, and frames whose return was never seen.

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rrr_perfetto::{Arg, Event, Kind, TraceWriter, TrackId, Value, MAX_DEPTH};
use rustc_hash::FxHashMap as HashMap;

use super::decode::{self, Shown};
use super::guest::{Captured, Memory, RecordMemory, StackWords};
use super::introspect::Introspection;
use super::observe::{Observation, Regs, Sink};
use super::probes::Probe;
use super::stubs;
use crate::position::Position;

/// Kernel stacks (task and interrupt stacks) are 16 KiB and aligned to it: an address's stack.
const STACK_SHIFT: u32 = 14;
/// The idle task has pid 0, which Perfetto does not take: it gets this one.
const IDLE_PID: i32 = 0x3fff_ffff;

/// What the trace shows, beyond which functions carry probes.
#[derive(Debug, Clone, Default)]
pub struct EmitFilter {
    /// Only these tasks (by pid or thread-group id); empty: all.
    pub pids: Vec<i32>,
    /// Only this many levels of calls per task (the syscall layer counts as one).
    pub depth: Option<u32>,
}

/// Counts of the trace written.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
pub struct TraceStats {
    pub entries: u64,
    pub returns: u64,
    pub syscalls: u64,
    /// Entries and exits of the stimulus's own functions.
    pub user_entries: u64,
    pub user_returns: u64,
    pub events: u64,
    pub tasks: usize,
    pub switches: u64,
    /// Reads of guest memory the trace made that the observer had not made at the event (0
    /// unless the two halves disagree on what an event reads).
    pub uncaptured_reads: u64,
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

/// A switch observed, applied at the next event (whose time it takes).
struct PendingSwitch {
    ptr: u64,
    pid: i32,
    tgid: i32,
    comm: String,
}

pub struct Tracer {
    intro: Arc<Introspection>,
    writer: TraceWriter<BufWriter<File>>,
    /// The trace is written beside its place and renamed into it when it is whole: a killed
    /// run leaves `FILE.pftrace.partial`, never a cut `FILE.pftrace`.
    partial: PathBuf,
    output: PathBuf,
    filter: EmitFilter,
    tasks: HashMap<u64, Task>,
    last_task: Option<u64>,
    pending: Option<PendingSwitch>,
    /// Which site is which probe (from [`Observation::Probes`]).
    probes: HashMap<u64, Probe>,
    last_ts: u64,
    next_flow: u64,
    arg_names: HashMap<u32, std::rc::Rc<[String]>>,
    /// Probe hits per address since the last exit: with the exit count they name the moment of
    /// an event in the replay (its position).
    hits: HitCounter,
    /// What the system call the current task is in captured at its start (its string
    /// arguments, its user stack): the user strings its kernel functions' stubs pass on are
    /// read from it. Dropped at the call's return and at any switch, after which another task
    /// may have changed that memory (see `probes::switches_are_seen`).
    syscall_memory: Option<(u64, Arc<Captured>)>,
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

impl Sink for Tracer {
    fn observe(&mut self, observation: Observation) -> anyhow::Result<()> {
        match observation {
            Observation::Switch {
                ptr,
                pid,
                tgid,
                comm,
            } => {
                self.pending = Some(PendingSwitch {
                    ptr,
                    pid,
                    tgid,
                    comm,
                });
                Ok(())
            }
            Observation::End { .. } => Ok(()),
            Observation::Probes { sites } => {
                self.probes = sites.into_iter().collect();
                Ok(())
            }
            Observation::Records { exits, now_ns, raw } => {
                for (record, copied) in stubs::records(&raw) {
                    let Some(&probe) = self.probes.get(&record.site) else {
                        anyhow::bail!(
                            "the trace buffer held a record from {:#x}, which has no probe: the guest wrote over the buffer",
                            record.site
                        );
                    };
                    let regs = record.regs(matches!(probe, Probe::Return(_)));
                    let user = self
                        .syscall_memory
                        .as_ref()
                        .filter(|(task, _)| *task == record.current)
                        .map(|(_, memory)| memory.clone());
                    let mut memory = RecordMemory {
                        stack: StackWords {
                            base: record.rsp.wrapping_add(8),
                            words: record.stack,
                        },
                        user: user.as_deref(),
                        copied: copied.as_ref(),
                    };
                    self.kernel_event(probe, record.site, exits, now_ns, &regs, &mut memory)?;
                }
                Ok(())
            }
            Observation::Kernel {
                probe,
                site,
                exits,
                now_ns,
                regs,
                mut memory,
            } => {
                let written = self.kernel_event(probe, site, exits, now_ns, &regs, &mut memory);
                self.stats.uncaptured_reads += memory.uncaptured;
                if let Probe::Entry(f) = probe {
                    let keeps = self.intro.syscall_of(f).is_some_and(keeps_user_memory);
                    if let (true, Some(task)) = (keeps, self.last_task) {
                        self.syscall_memory = Some((task, Arc::new(memory)));
                    }
                }
                written
            }
            Observation::User {
                enter,
                function,
                call_site,
                rsp,
                site,
                exits,
                now_ns,
            } => {
                let ts = self.timestamp(now_ns);
                let position = self.hits.arrive(exits, site);
                let ptr = self.current()?;
                if enter {
                    self.entered_user(ptr, function, call_site, rsp, ts, position)
                } else {
                    self.returned_user(ptr, function, ts, position)
                }
            }
        }
    }

    fn finish(self: Box<Self>, now_ns: u64) -> anyhow::Result<Option<TraceStats>> {
        Tracer::finish(*self, now_ns).map(Some)
    }
}

impl Tracer {
    fn kernel_event(
        &mut self,
        probe: Probe,
        site: u64,
        exits: u64,
        now_ns: u64,
        regs: &Regs,
        memory: &mut dyn Memory,
    ) -> anyhow::Result<()> {
        let ts = self.timestamp(now_ns);
        let ptr = self.current()?;
        match probe {
            Probe::Entry(f) => {
                let at = self.hits.arrive(exits, site);
                self.entered(ptr, f, regs, memory, ts, at)
            }
            // Returns carry no position (half the events, and most of their size): gdb gets to
            // one from its call's entry with `finish`.
            Probe::Return(f) => self.returned(ptr, f, regs, memory, ts),
        }
    }

    pub fn new(
        intro: Arc<Introspection>,
        output: &Path,
        filter: EmitFilter,
    ) -> anyhow::Result<Tracer> {
        use anyhow::Context;
        let mut partial = output.as_os_str().to_owned();
        partial.push(".partial");
        let partial = PathBuf::from(partial);
        let writer = TraceWriter::create(&partial)
            .with_context(|| format!("cannot create the trace {}", partial.display()))?;
        Ok(Tracer {
            intro,
            writer,
            partial,
            output: output.to_owned(),
            filter,
            tasks: HashMap::default(),
            last_task: None,
            pending: None,
            probes: HashMap::default(),
            last_ts: 0,
            next_flow: 1,
            arg_names: HashMap::default(),
            hits: HitCounter::default(),
            syscall_memory: None,
            stats: TraceStats::default(),
        })
    }

    pub fn stats(&self) -> TraceStats {
        TraceStats {
            events: self.writer.stats().events,
            ..self.stats
        }
    }

    /// Drops a trace that was never written (its replay observed nothing): no partial file is
    /// left.
    pub fn abandon(self) {
        let _ = std::fs::remove_file(&self.partial);
    }

    /// Ends every open slice (at virtual time `now_ns`) and writes the rest of the trace.
    pub fn finish(mut self, now_ns: u64) -> anyhow::Result<TraceStats> {
        let ts = self.timestamp(now_ns);
        let stats = self.stats();
        for (_, task) in std::mem::take(&mut self.tasks) {
            self.end_all(task, ts)?;
        }
        self.writer.finish()?;
        std::fs::rename(&self.partial, &self.output).map_err(|e| {
            anyhow::anyhow!(
                "cannot move the trace {} to {}: {e}",
                self.partial.display(),
                self.output.display()
            )
        })?;
        Ok(stats)
    }

    fn timestamp(&mut self, now_ns: u64) -> u64 {
        // Virtual time moves at exits only; events between two exits get one nanosecond each
        // so they keep their order on every track.
        self.last_ts = now_ns.max(self.last_ts + 1);
        self.last_ts
    }

    /// The task the event runs on: the last one switched to (a pending switch applied now).
    fn current(&mut self) -> anyhow::Result<u64> {
        if let Some(switch) = self.pending.take() {
            let ptr = switch.ptr;
            let known = self.tasks.get(&ptr).map(|t| (t.pid, t.tgid));
            if known != Some((switch.pid, switch.tgid)) {
                let task = self.new_task(switch)?;
                if let Some(old) = self.tasks.insert(ptr, task) {
                    self.end_all(old, self.last_ts)?;
                }
            }
            self.switched(ptr)?;
        }
        self.last_task
            .ok_or_else(|| anyhow::anyhow!("an event came before any task was observed"))
    }

    /// Whether a frame the task at `ptr` enters now is written: the task is shown (`--pid`), and
    /// the frame is within Perfetto's depth and the `--depth` filter.
    fn shows_next_frame(&self, ptr: u64) -> bool {
        let task = &self.tasks[&ptr];
        let depth = task.frames.iter().filter(|f| f.emitted).count() as u32;
        task.shown && depth + 1 < MAX_DEPTH && self.filter.depth.map_or(true, |max| depth < max)
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

    fn new_task(&mut self, switch: PendingSwitch) -> anyhow::Result<Task> {
        let PendingSwitch {
            pid, tgid, comm, ..
        } = switch;
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

    /// A switch between tasks: an arrow from where the last one stopped to where this one
    /// goes on.
    fn switched(&mut self, to: u64) -> anyhow::Result<()> {
        let ts = self.last_ts;
        if let Some(from) = self.last_task.filter(|&from| from != to) {
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
            self.syscall_memory = None;
        }
        self.last_task = Some(to);
        Ok(())
    }

    fn entered(
        &mut self,
        ptr: u64,
        function: u32,
        regs: &Regs,
        memory: &mut dyn Memory,
        ts: u64,
        at: Position,
    ) -> anyhow::Result<()> {
        self.stats.entries += 1;
        let syscall = self.intro.syscall_of(function).map(str::to_owned);
        let kind = if syscall.is_some() {
            FrameKind::Syscall
        } else {
            FrameKind::Function
        };
        let emitted = self.shows_next_frame(ptr);
        if emitted {
            match &syscall {
                Some(call) => self.begin_syscall(ptr, call, regs[5], memory, ts, at)?,
                None => self.begin_function(ptr, function, regs, memory, ts, at)?,
            }
        }
        let task = self.tasks.get_mut(&ptr).expect("current() inserted it");
        task.frames.push(Frame {
            stack: regs[7] >> STACK_SHIFT,
            entry_rsp: regs[7],
            function,
            kind,
            emitted,
        });
        Ok(())
    }

    fn begin_function(
        &mut self,
        ptr: u64,
        function: u32,
        regs: &Regs,
        memory: &mut dyn Memory,
        ts: u64,
        at: Position,
    ) -> anyhow::Result<()> {
        let names = self.arg_names(function);
        let values = self.intro.entry_args(memory, function, regs);
        let mut shown: Vec<(&str, Shown)> = names
            .iter()
            .map(String::as_str)
            .zip(values)
            .collect::<Vec<_>>();
        let position = at.to_string();
        shown.push((POSITION_ARG, Shown::Str(position)));
        let args = as_args(&shown);
        let f = &self.intro.index.functions[function as usize];
        let category = self
            .intro
            .index
            .source_path(f)
            .split('/')
            .next()
            .unwrap_or("");
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
        let count = self.intro.index.functions[function as usize].params.len();
        let names: std::rc::Rc<[String]> = (0..count)
            .map(|i| self.intro.arg_name(function, i))
            .collect();
        self.arg_names.insert(function, names.clone());
        names
    }

    fn begin_syscall(
        &mut self,
        ptr: u64,
        call: &str,
        regs_ptr: u64,
        memory: &mut dyn Memory,
        ts: u64,
        at: Position,
    ) -> anyhow::Result<()> {
        self.stats.syscalls += 1;
        let mut shown = self.intro.syscall_args(memory, ptr, call, regs_ptr);
        shown.push((POSITION_ARG.into(), Shown::Str(at.to_string())));
        // A new program's name shows from its first system call on.
        let comm = self.intro.read_comm(memory, ptr);
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
        ptr: u64,
        function: u32,
        regs: &Regs,
        memory: &mut dyn Memory,
        ts: u64,
    ) -> anyhow::Result<()> {
        self.stats.returns += 1;
        let (rax, rsp) = (regs[0], regs[7]);
        let stack = rsp >> STACK_SHIFT;
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
                if f.entry_rsp <= rsp {
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
        if closed.iter().any(|f| f.kind == FrameKind::Syscall) {
            // The task goes back to user code, which may change its memory.
            self.syscall_memory = None;
        }
        for frame in closed {
            if !frame.emitted {
                continue;
            }
            // The function that returned, and those that tail-called it, return its value.
            let returns_here = frame.entry_rsp == rsp && frame.stack == stack;
            let mut shown: Vec<(&str, Shown)> = Vec::new();
            if returns_here {
                match frame.kind {
                    FrameKind::Syscall => {
                        let (value, errno) = decode::syscall_return(rax);
                        shown.push(("return", Shown::Int(value)));
                        if let Some(errno) = errno {
                            shown.push(("errno", Shown::Str(errno.into())));
                        }
                    }
                    FrameKind::Function => {
                        if let Some(value) = self.intro.return_value(memory, frame.function, rax) {
                            shown.push(("return", value));
                        }
                    }
                    // A kernel return never returns from the stimulus's code.
                    FrameKind::User => {}
                }
                if frame.kind != FrameKind::User && frame.function != function {
                    let by = &self.intro.index.functions[function as usize].name;
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

    fn entered_user(
        &mut self,
        ptr: u64,
        function: u32,
        call_site: u64,
        rsp: u64,
        ts: u64,
        at: Position,
    ) -> anyhow::Result<()> {
        self.stats.user_entries += 1;
        self.close_kernel_frames(ptr, ts)?;
        let emitted = self.shows_next_frame(ptr);
        if emitted {
            let image = self
                .intro
                .stimulus_image()
                .expect("user events come with the image");
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
            stack: rsp >> STACK_SHIFT,
            entry_rsp: rsp,
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
}

/// Named values as the writer's arguments (borrowing them).
/// Whether a system call's user memory at its start still holds for its kernel functions'
/// `const` strings until it returns: not across an `exec`, which replaces that memory.
fn keeps_user_memory(call: &str) -> bool {
    !call.starts_with("exec")
}

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

/// (pid, tid) as Perfetto shows them: the thread group is the process, the idle task gets a
/// pid Perfetto accepts.
fn displayed_ids(pid: i32, tgid: i32) -> (i32, i32) {
    let pid = if pid == 0 { IDLE_PID } else { pid };
    let tgid = if tgid == 0 { IDLE_PID } else { tgid };
    (pid, tgid)
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
