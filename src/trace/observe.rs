//! The trace pass's half that runs beside the replay: it plants the probes, answers their hits
//! (moving the vCPU past a `hlt` as the instruction under it would), drains the in-guest stubs'
//! records, and hands each call, return and task switch on as an [`Observation`]. What an
//! event's decoding reads from guest memory is read here, at the event, and kept with it
//! ([`Captured`]), so the trace itself can be written anywhere later ([`super::tracer`]): in
//! this process, or, when the replay runs inside the carrier, natively after it.

use std::io::{BufWriter, Read, Write};
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use rrr_vmm::builder::Vmm;
use rrr_vmm::clock::VirtualTime;
use rrr_vmm::rr::RrError;
use serde::{Deserialize, Serialize};

use super::func_probes::{FuncProbe, FuncProbes};
use super::guest::{Captured, GuestReader, Live, Memory as _};
use super::introspect::Introspection;
use super::probes::{Probe, ProbeSet};
use super::stubs::{CurrentAt, Record, RECORD_SIZE};
use super::tracer::TraceStats;

/// The general registers in DWARF's numbering (rax, rdx, rcx, rbx, rsi, rdi, rbp, rsp, r8..r15).
pub type Regs = [u64; 16];

/// One thing the trace shows, as seen during the replay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Observation {
    /// The task at `ptr` runs from the next event on: its identity as read then.
    Switch {
        ptr: u64,
        pid: i32,
        tgid: i32,
        comm: String,
    },
    /// The probes planted: which site is which function's entry or return (before any
    /// [`Observation::Records`]).
    Probes { sites: Vec<(u64, Probe)> },
    /// Calls and returns the in-guest stubs recorded after exit `exits` (virtual time
    /// `now_ns`), all on the current task: records of `stubs::RECORD_SIZE` bytes as the stubs
    /// wrote them.
    Records {
        exits: u64,
        now_ns: u64,
        #[serde(with = "serde_bytes")]
        raw: Vec<u8>,
    },
    /// A kernel function entered or returned at a `hlt` probe, after exit `exits` (virtual
    /// time `now_ns`), with what its trace reads from memory.
    Kernel {
        probe: Probe,
        site: u64,
        exits: u64,
        now_ns: u64,
        regs: Box<Regs>,
        memory: Captured,
    },
    /// The replay ended, at virtual time `now_ns` (the last observation of a whole file).
    End { now_ns: u64 },
    /// One of the stimulus's own functions entered or left (its hook's port write).
    User {
        enter: bool,
        /// The function's number in the stimulus's image, and the return address into the
        /// caller (image addresses).
        function: u32,
        call_site: u64,
        rsp: u64,
        site: u64,
        exits: u64,
        now_ns: u64,
    },
}

/// Where observations go: the trace writer itself, or a file it reads later.
pub trait Sink {
    fn observe(&mut self, observation: Observation) -> Result<()>;

    /// An [`Observation::Records`], from the drained buffer as it is (a file writes it without
    /// another copy: inside the carrier, copies of every record are much of a drain's cost).
    fn observe_records(&mut self, exits: u64, now_ns: u64, raw: &[u8]) -> Result<()> {
        self.observe(Observation::Records {
            exits,
            now_ns,
            raw: raw.to_vec(),
        })
    }

    /// The replay ended at virtual time `now_ns`. Returns the trace's counts if the trace was
    /// written here.
    fn finish(self: Box<Self>, now_ns: u64) -> Result<Option<TraceStats>>;

    /// Makes what was observed so far durable (a replay stopped by Ctrl-C keeps it).
    fn flush(&mut self) -> Result<()> {
        Ok(())
    }
}

/// How often observations written to a file are flushed: a replay stopped early (Ctrl-C stops
/// the carrier at once) loses at most this much of them.
const FLUSH_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

/// Counts of the observing half.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct ObserveStats {
    pub probes: usize,
    pub probes_dropped: usize,
    /// Sites with an in-guest stub (no exit), and with a `hlt`.
    pub stub_sites: usize,
    pub halt_sites: usize,
    /// Calls and returns the stubs recorded, and the exits that drained them when their buffer
    /// was full.
    pub stub_records: u64,
    pub full_drains: u64,
    /// Host time spent on probe hits and records during the replay (the rest of a traced
    /// replay's extra time is the exits and the stubs in the guest), and the part of it spent
    /// draining the stubs' records at exits.
    pub handling_ns: u64,
    pub drain_ns: u64,
}

pub struct Observer {
    intro: Arc<Introspection>,
    probes: ProbeSet,
    mem: GuestReader,
    func_probes: Option<FuncProbes>,
    /// Where the current task's pointer is (per-CPU offsets applied), and where the stubs read
    /// it.
    current_at: u64,
    stub_current: Option<CurrentAt>,
    last_task: Option<u64>,
    /// The exit count and virtual time since the last exit: the moment of the stubs' records
    /// drained at the next one.
    since: (u64, VirtualTime),
    records: Vec<u8>,
    sink: Box<dyn Sink>,
    stats: ObserveStats,
    /// `hlt` probe hits per function: the ones that cost exits (logged at the end, at debug).
    halts_by_function: rustc_hash::FxHashMap<u32, u64>,
    last_flush: std::time::Instant,
}

impl Observer {
    pub fn new(intro: Arc<Introspection>, functions: &[u32], sink: Box<dyn Sink>) -> Observer {
        let probes = ProbeSet::new(&intro.index, functions);
        let func_probes = intro.stimulus_image().and_then(FuncProbes::new);
        if intro.stimulus_image().is_some() && func_probes.is_none() {
            tracing::warn!("the stimulus has no rrr function hooks (built by an older rrr?); its own functions are not traced");
        }
        Observer {
            stats: ObserveStats {
                probes: probes.len(),
                ..Default::default()
            },
            intro,
            probes,
            mem: GuestReader::new(),
            func_probes,
            current_at: 0,
            stub_current: None,
            last_task: None,
            since: (0, VirtualTime::ZERO),
            records: Vec::new(),
            sink,
            halts_by_function: Default::default(),
            last_flush: std::time::Instant::now(),
        }
    }

    /// Plants the probes: at READY (exit `exits`, virtual time `now`), once the snapshot is
    /// restored.
    pub fn start(&mut self, vmm: &Vmm, exits: u64, now: VirtualTime) -> Result<()> {
        self.since = (exits, now);
        let current = self
            .intro
            .index
            .current_task
            .clone()
            .context("the kernel's symbols do not say where the current task is")?;
        self.current_at = current.address;
        if current.per_cpu {
            // One vCPU: CPU 0's per-CPU area.
            let offsets = self
                .intro
                .index
                .symbol("__per_cpu_offset")
                .context("a per-CPU kernel without __per_cpu_offset")?
                .address;
            let base = self
                .live(vmm)
                .read_u64(offsets)
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
        self.sink.observe(Observation::Probes {
            sites: self.probes.sites(),
        })?;
        if !self.probes.has_stub_room() {
            tracing::info!("the kernel has no room for in-guest probes (not built by rrr?): every traced call is a VM exit, and the trace takes longer");
        }
        // A few sites may have changed since the build (code the kernel patched at boot); most
        // not matching means the code in memory is not this vmlinux's.
        if self.stats.probes_dropped * 10 > wanted {
            self.probes.lift(vmm, &mut self.mem)?;
            bail!(
                "{} of {wanted} probe sites in the guest do not hold the instructions the vmlinux has there: the kernel in memory is not this vmlinux, or it is relocated (KASLR: boot with nokaslr, as rrr's command line does)",
                self.stats.probes_dropped,
            );
        }
        Ok(())
    }

    fn live<'a>(&'a mut self, vmm: &'a Vmm) -> Live<'a> {
        Live {
            vmm,
            reader: &mut self.mem,
            capture: None,
        }
    }

    pub fn planted(&self) -> bool {
        self.probes.planted()
    }

    /// Lifts the probes (the guest's memory is its own again), once the stubs' last records are
    /// observed.
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

    /// Ends the observations at virtual time `now` (after [`Observer::lift`], which observed
    /// the last records): the trace is written, or its observations are complete.
    pub fn finish(self, now: VirtualTime) -> Result<(ObserveStats, Option<TraceStats>)> {
        if tracing::enabled!(tracing::Level::DEBUG) {
            let mut most: Vec<_> = self.halts_by_function.iter().collect();
            most.sort_unstable_by_key(|&(_, n)| std::cmp::Reverse(*n));
            for (&f, n) in most.into_iter().take(20) {
                let name = &self.intro.index.functions[f as usize].name;
                tracing::debug!("{n} hlt probe hits in {name}");
            }
        }
        let written = self.sink.finish(now.as_nanos())?;
        Ok((self.stats, written))
    }

    /// A counted exit (`exits` so far, virtual time `now` after it): the stubs' records made
    /// since the last one are observed, stamped with that one.
    pub fn exit_seen(&mut self, vmm: &Vmm, exits: u64, now: VirtualTime) -> Result<(), RrError> {
        if self.probes.planted() {
            let started = std::time::Instant::now();
            let (at, then) = self.since;
            self.drain(vmm, at, then)?;
            let spent = started.elapsed().as_nanos() as u64;
            self.stats.handling_ns += spent;
            self.stats.drain_ns += spent;
            if self.last_flush.elapsed() >= FLUSH_EVERY {
                self.last_flush = std::time::Instant::now();
                self.sink
                    .flush()
                    .map_err(|e| RrError::Probe(format!("{e:#}")))?;
            }
        }
        self.since = (exits, now);
        Ok(())
    }

    /// Observes the records in the stubs' buffer, as if each had been a probe hit after exit
    /// `exits`. (Its time counts in the caller's `handling_ns`.)
    fn drain(&mut self, vmm: &Vmm, exits: u64, now: VirtualTime) -> Result<(), RrError> {
        let mut records = std::mem::take(&mut self.records);
        records.clear();
        self.probes
            .drain(vmm, &mut records)
            .map_err(|e| RrError::Probe(format!("{e:#}")))?;
        let result = self.observe_records(vmm, &records, exits, now);
        self.records = records;
        result.map_err(|e| RrError::Probe(format!("{e:#}")))
    }

    /// The stubs' records, in runs on one task each (the records are passed on raw: decoding
    /// them is the trace writer's work, which may run natively after a replay in the carrier).
    fn observe_records(
        &mut self,
        vmm: &Vmm,
        records: &[u8],
        exits: u64,
        now: VirtualTime,
    ) -> Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        // The guest ran since the last event: other page tables may be in use.
        self.mem.refresh();
        let size = RECORD_SIZE as usize;
        let mut run_start = 0;
        while run_start < records.len() {
            let current = Record::current_of(&records[run_start..]);
            self.stats.stub_records += 1;
            let mut run_end = run_start + size;
            // A copied string's slots go with the record before them.
            while run_end < records.len() {
                let slot = &records[run_end..];
                if Record::is_extension(slot) {
                    run_end += size;
                } else if Record::current_of(slot) == current {
                    self.stats.stub_records += 1;
                    run_end += size;
                } else {
                    break;
                }
            }
            self.switch_to(vmm, current)?;
            self.sink
                .observe_records(exits, now.as_nanos(), &records[run_start..run_end])?;
            run_start = run_end;
        }
        self.plant_func_probes(vmm);
        Ok(())
    }

    /// The task at `ptr` runs: a switch is observed with the identity it has now (a task runs
    /// after a switch, and a new task's first run is one: this is where a task_struct the
    /// kernel reused for another task is told from the one before).
    fn switch_to(&mut self, vmm: &Vmm, ptr: u64) -> Result<()> {
        if self.last_task == Some(ptr) {
            return Ok(());
        }
        self.last_task = Some(ptr);
        let intro = self.intro.clone();
        let mut mem = self.live(vmm);
        let (pid, tgid) = intro.read_ids(&mut mem, ptr);
        let comm = intro.read_comm(&mut mem, ptr);
        self.sink.observe(Observation::Switch {
            ptr,
            pid,
            tgid,
            comm,
        })
    }

    fn read_current(&mut self, vmm: &Vmm) -> Result<u64> {
        let at = self.current_at;
        let ptr = self
            .live(vmm)
            .read_u64(at)
            .context("cannot read the current task pointer")?;
        self.switch_to(vmm, ptr)?;
        Ok(ptr)
    }

    /// One `hlt` exit. Returns false if it was the guest's own `hlt`.
    pub fn hit(&mut self, vmm: &mut Vmm, exits: u64, now: VirtualTime) -> Result<bool, RrError> {
        if !self.probes.planted() {
            return Ok(false);
        }
        let started = std::time::Instant::now();
        let r = self.hit_inner(vmm, exits, now);
        self.stats.handling_ns += started.elapsed().as_nanos() as u64;
        r
    }

    fn hit_inner(&mut self, vmm: &mut Vmm, exits: u64, now: VirtualTime) -> Result<bool, RrError> {
        let regs = vmm.vcpu.exit_regs().map_err(RrError::Vcpu)?;
        // KVM completed the `hlt` before it exited: RIP is past it.
        let halted = regs.rip.wrapping_sub(1);
        let full = self.probes.is_full_halt(halted);
        // A stub stops here for a string to read now: then it is its site's `hlt` probe.
        let at = self.probes.stub_halt_site(vmm, halted).unwrap_or(halted);
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
        let (Probe::Entry(f) | Probe::Return(f)) = probe;
        *self.halts_by_function.entry(f).or_default() += 1;
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
                let ret = self.live(vmm).read_u64(regs.rsp).ok_or_else(|| {
                    RrError::Probe(format!(
                        "cannot read the return address at rsp {:#x} (return at {at:#x})",
                        regs.rsp
                    ))
                })?;
                moved.rip = ret;
                moved.rsp = regs.rsp.wrapping_add(8);
            }
        }
        vmm.vcpu.set_regs_for_entry(&moved).map_err(RrError::Vcpu)?;
        let observed = (|| {
            let ptr = self.read_current(vmm)?;
            let regs = regs_of(&regs);
            let intro = self.intro.clone();
            let tables = intro.page_table_root(&mut self.live(vmm), ptr);
            self.mem.use_user_tables(vmm, tables);
            let mut memory = Captured::default();
            let mut mem = Live {
                vmm,
                reader: &mut self.mem,
                capture: Some(&mut memory),
            };
            intro.read_for(&mut mem, probe, ptr, &regs);
            self.sink.observe(Observation::Kernel {
                probe,
                site: at,
                exits,
                now_ns: now.as_nanos(),
                regs: Box::new(regs),
                memory,
            })?;
            self.plant_func_probes(vmm);
            anyhow::Ok(())
        })();
        observed.map_err(|e| RrError::Probe(format!("{e:#}")))?;
        Ok(true)
    }

    /// An `outb` to the function-probe port: the entry or exit of one of the stimulus's
    /// functions. Returns false if it was not one of ours (then it is the guest's own write).
    pub fn func_hit(
        &mut self,
        vmm: &mut Vmm,
        exits: u64,
        now: VirtualTime,
    ) -> Result<bool, RrError> {
        if !self.probes.planted() || self.func_probes.is_none() {
            return Ok(false);
        }
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
        self.drain(vmm, exits, now)?;
        let regs = vmm.vcpu.exit_regs().map_err(RrError::Vcpu)?;
        self.mem.refresh();
        let at_current = self.current_at;
        let Some(task_ptr) = self.live(vmm).read_u64(at_current) else {
            return Ok(false);
        };
        let intro = self.intro.clone();
        let Some((bias, _, _)) = intro.stimulus_bias(&mut self.live(vmm), task_ptr) else {
            return Ok(false);
        };
        // KVM leaves RIP on an `out` it hands to the VMM.
        let at = regs.rip.wrapping_sub(bias);
        let Some(kind) = self.func_probes.as_ref().and_then(|p| p.at(at)) else {
            return Ok(false);
        };
        let mut moved = regs;
        moved.rip = bias.wrapping_add(FuncProbes::resume_after(at));
        vmm.vcpu.set_regs_for_entry(&moved).map_err(RrError::Vcpu)?;
        let image = intro.stimulus_image().expect("probes come with the image");
        let mask = if image.is_32() { 0xffff_ffff } else { u64::MAX };
        let function = (regs.rdi & mask).wrapping_sub(bias);
        let call_site = (regs.rsi & mask).wrapping_sub(bias);
        let Some((index, _)) = image.function_at(function) else {
            return Ok(true);
        };
        let observed = (|| {
            self.switch_to(vmm, task_ptr)?;
            self.sink.observe(Observation::User {
                enter: kind == FuncProbe::Enter,
                function: index,
                call_site,
                rsp: regs.rsp,
                site: regs.rip,
                exits,
                now_ns: now.as_nanos(),
            })
        })();
        observed.map_err(|e| RrError::Probe(format!("{e:#}")))?;
        Ok(true)
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
        let at = self.current_at;
        let intro = self.intro.clone();
        let mut mem = self.live(vmm);
        let Some(task) = mem.read_u64(at) else {
            return;
        };
        let Some((bias, _, _)) = intro.stimulus_bias(&mut mem, task) else {
            return;
        };
        if let Some(probes) = &mut self.func_probes {
            probes.plant(vmm, &mut self.mem, bias);
        }
    }
}

/// The registers KVM gave at an exit, in DWARF's numbering.
fn regs_of(r: &kvm_bindings::kvm_regs) -> Regs {
    [
        r.rax, r.rdx, r.rcx, r.rbx, r.rsi, r.rdi, r.rbp, r.rsp, r.r8, r.r9, r.r10, r.r11, r.r12,
        r.r13, r.r14, r.r15,
    ]
}

/// Observations kept in a file, to be written into a trace later (outside the carrier).
pub struct ObservationFile {
    out: BufWriter<std::fs::File>,
    /// Where each observation is encoded (kept: no allocation per observation).
    encoded: Vec<u8>,
}

/// Written first in an observation file.
const MAGIC: &[u8; 8] = b"RRROBS02";
/// `Observation::Records`'s index among the variants (postcard encodes a variant by it).
const RECORDS_VARIANT: u32 = 2;

impl ObservationFile {
    pub fn create(path: &Path) -> Result<ObservationFile> {
        let file = std::fs::File::create(path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(MAGIC)?;
        Ok(ObservationFile {
            out,
            encoded: Vec::new(),
        })
    }

    /// Every observation in `path`, in order, to `sink`, as they arrive: the file is waited for
    /// (made, then grown) until `written` says its writer has stopped, so that the trace is
    /// written while the carrier replays, not after. It ends whole, or short of the replay's
    /// end (a replay stopped by Ctrl-C, or that failed): `sink` has had everything up to there.
    pub fn follow_into(
        path: &Path,
        sink: &mut dyn Sink,
        written: &std::sync::atomic::AtomicBool,
    ) -> Result<Followed> {
        const POLL: std::time::Duration = std::time::Duration::from_millis(20);
        let mut waited = std::time::Duration::ZERO;
        let mut file: Option<std::fs::File> = None;
        let mut pending: Vec<u8> = Vec::new();
        let mut at = 0usize;
        let mut magic_seen = false;
        loop {
            // Read before the file: what was written before the writer stopped is read below.
            let stopped = written.load(std::sync::atomic::Ordering::Acquire);
            if file.is_none() {
                file = match std::fs::File::open(path) {
                    Ok(f) => Some(f),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound && !stopped => None,
                    Err(e) => {
                        return Err(e).with_context(|| format!("cannot open {}", path.display()))
                    }
                };
            }
            let mut grew = false;
            if let Some(f) = &mut file {
                grew = f
                    .read_to_end(&mut pending)
                    .with_context(|| format!("cannot read {}", path.display()))?
                    > 0;
            }
            if !magic_seen && pending.len() >= MAGIC.len() {
                if &pending[..MAGIC.len()] != MAGIC {
                    bail!("{} is not an rrr observation file", path.display());
                }
                at = MAGIC.len();
                magic_seen = true;
            }
            while magic_seen && at < pending.len() {
                let Some(len) = pending.get(at..at + 4) else {
                    break;
                };
                let len = u32::from_le_bytes(len.try_into().expect("four bytes")) as usize;
                let Some(frame) = pending.get(at + 4..at + 4 + len) else {
                    break;
                };
                let observation: Observation = postcard::from_bytes(frame)
                    .with_context(|| format!("{} holds a damaged observation", path.display()))?;
                at += 4 + len;
                if let Observation::End { now_ns } = observation {
                    return Ok(Followed {
                        end_ns: Some(now_ns),
                        waited,
                    });
                }
                sink.observe(observation)?;
            }
            if at > 1 << 20 {
                pending.drain(..at);
                at = 0;
            }
            if !grew {
                if stopped {
                    return Ok(Followed {
                        end_ns: None,
                        waited,
                    });
                }
                std::thread::sleep(POLL);
                waited += POLL;
            }
        }
    }
}

/// How following an observation file ended.
pub struct Followed {
    /// When the replay ended, if the file reached its end (`None`: it was cut short).
    pub end_ns: Option<u64>,
    /// Time spent waiting for the file to grow.
    pub waited: std::time::Duration,
}

impl Sink for ObservationFile {
    fn observe(&mut self, observation: Observation) -> Result<()> {
        let mut encoded = std::mem::take(&mut self.encoded);
        encoded.clear();
        let encoded =
            postcard::to_extend(&observation, encoded).context("cannot encode an observation")?;
        self.out.write_all(&(encoded.len() as u32).to_le_bytes())?;
        self.out.write_all(&encoded)?;
        self.encoded = encoded;
        Ok(())
    }

    fn observe_records(&mut self, exits: u64, now_ns: u64, raw: &[u8]) -> Result<()> {
        // Postcard's encoding of `Observation::Records`, made by hand around the borrowed
        // bytes: the variant's index, the two numbers, the bytes' length, the bytes.
        let head = (RECORDS_VARIANT, exits, now_ns, raw.len() as u64);
        let mut buf = [0u8; 40];
        let head = postcard::to_slice(&head, &mut buf).context("cannot encode an observation")?;
        let len = u32::try_from(head.len() + raw.len()).context("a drain of over 4 GiB")?;
        self.out.write_all(&len.to_le_bytes())?;
        self.out.write_all(head)?;
        self.out.write_all(raw)?;
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        // Synced: the carrier's shares cache writes, and a stopped carrier drops its cache.
        self.out.flush().context("cannot write the observations")?;
        self.out
            .get_ref()
            .sync_data()
            .context("cannot write the observations")
    }

    fn finish(mut self: Box<Self>, now_ns: u64) -> Result<Option<TraceStats>> {
        self.observe(Observation::End { now_ns })?;
        self.out.flush().context("cannot write the observations")?;
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Collect(Vec<Observation>);

    /// A whole file, its writer gone.
    fn replay_into(path: &Path, sink: &mut dyn Sink) -> Result<bool> {
        let written = std::sync::atomic::AtomicBool::new(true);
        Ok(ObservationFile::follow_into(path, sink, &written)?
            .end_ns
            .is_some())
    }

    impl Sink for Collect {
        fn observe(&mut self, observation: Observation) -> Result<()> {
            self.0.push(observation);
            Ok(())
        }

        fn finish(self: Box<Self>, _now_ns: u64) -> Result<Option<TraceStats>> {
            Ok(None)
        }
    }

    #[test]
    fn observations_read_back_from_their_file_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("obs");
        let written = vec![
            Observation::Switch {
                ptr: 0xffff_8880_0100_0000,
                pid: 7,
                tgid: 7,
                comm: "repro".into(),
            },
            Observation::Kernel {
                probe: Probe::Entry(3),
                site: 0xffff_ffff_8100_0004,
                exits: 12,
                now_ns: 34,
                regs: Box::new([5; 16]),
                memory: Captured::default(),
            },
        ];
        let raw: Vec<u8> = (0..=255u8).cycle().take(3 * RECORD_SIZE as usize).collect();
        let records = Observation::Records {
            exits: u64::MAX,
            now_ns: 300,
            raw: raw.clone(),
        };
        let mut file = ObservationFile::create(&path).unwrap();
        // Records as a drain writes them (encoded by hand), then as any other observation.
        file.observe_records(u64::MAX, 300, &raw).unwrap();
        file.observe(records.clone()).unwrap();
        for o in &written {
            file.observe(o.clone()).unwrap();
        }
        Box::new(file).finish(0).unwrap();
        let mut read = Collect(Vec::new());
        assert!(replay_into(&path, &mut read).unwrap(), "whole");
        let mut expected = vec![records.clone(), records];
        expected.extend(written);
        assert_eq!(read.0, expected);

        // Cut short (the end, and part of the last observation, missing): what was whole is
        // read, and the file says it stopped early.
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 8]).unwrap();
        let mut read = Collect(Vec::new());
        assert!(!replay_into(&path, &mut read).unwrap());
        assert_eq!(read.0.len(), 3);

        // Damaged: a clear error.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[12] = 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let err = replay_into(&path, &mut Collect(Vec::new())).unwrap_err();
        assert!(format!("{err:#}").contains("damaged"), "{err:#}");
    }

    #[test]
    fn observations_are_read_while_their_file_is_still_being_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("obs");
        let stopped = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let switch = |pid| Observation::Switch {
            ptr: 0xffff_8880_0100_0000,
            pid,
            tgid: pid,
            comm: "repro".into(),
        };
        let writer = {
            let (path, stopped) = (path.clone(), stopped.clone());
            std::thread::spawn(move || {
                // The reader starts before the file exists.
                std::thread::sleep(std::time::Duration::from_millis(60));
                let mut file = ObservationFile::create(&path).unwrap();
                file.observe(switch(1)).unwrap();
                file.flush().unwrap();
                std::thread::sleep(std::time::Duration::from_millis(60));
                file.observe_records(5, 6, &[7; RECORD_SIZE as usize])
                    .unwrap();
                file.flush().unwrap();
                std::thread::sleep(std::time::Duration::from_millis(60));
                // Stopped without its end (Ctrl-C in the carrier).
                stopped.store(true, std::sync::atomic::Ordering::Release);
            })
        };
        let mut read = Collect(Vec::new());
        let followed = ObservationFile::follow_into(&path, &mut read, &stopped).unwrap();
        writer.join().unwrap();
        assert!(followed.end_ns.is_none(), "no end mark: cut short");
        assert!(followed.waited > std::time::Duration::ZERO);
        assert_eq!(read.0.len(), 2);
        assert_eq!(read.0[0], switch(1));

        // A writer that never made the file: a clear error once it has stopped.
        let missing = dir.path().join("never");
        let err = ObservationFile::follow_into(&missing, &mut read, &stopped).err();
        assert!(format!("{err:?}").contains("cannot open"), "{err:?}");
    }
}
