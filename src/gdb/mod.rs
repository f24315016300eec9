//! `rrr replay REC --gdb [ADDR:PORT]`: the GDB remote protocol (the `gdbstub` crate) served on a
//! replay, so a kernel developer can stop a recorded run anywhere and look at it with gdb.
//!
//! - [`arch`]: the registers gdb sees (and the target description that names them);
//! - [`target`]: gdb's requests against the stopped vCPU and guest memory;
//! - [`session`]: the stop/serve/resume state machine on the vCPU thread;
//! - [`conn`]: the byte stream (TCP on loopback, or the carrier's virtio-serial port).
//!
//! [`GdbReplay`] wraps the [`Replayer`] the way the trace pass does: the replayer decides
//! everything about the run and checks it; the debugger only adds exits of its own (its
//! breakpoints' `hlt`s, single steps, debug-register hits), which count neither as exits nor as
//! virtual time, and it lifts its breakpoints before anything compares guest state.

pub mod arch;
pub mod conn;
pub mod session;
pub mod target;
pub mod travel;

use std::net::{SocketAddr, ToSocketAddrs};

use anyhow::{bail, Context, Result};
use rrr_vmm::builder::Vmm;
use rrr_vmm::clock::VirtualTime;
use rrr_vmm::rr::checkpoint::{CheckpointStats, Checkpoints};
use rrr_vmm::rr::{ExecMode, ExitWhat, Replayer, RrError};
use rrr_vmm::run_loop::RunState;

pub use session::Debugger;

/// Where gdb connects when `--gdb` has no address.
pub const DEFAULT_ADDR: &str = "127.0.0.1:1234";

/// The address to serve gdb on: `ADDR:PORT` or a bare port, on a loopback address only (the
/// protocol has no authentication, and reads all of the guest's memory).
pub fn parse_addr(text: &str) -> Result<SocketAddr> {
    let text = if text.chars().all(|c| c.is_ascii_digit()) {
        format!("127.0.0.1:{text}")
    } else {
        text.to_owned()
    };
    let addr = text
        .to_socket_addrs()
        .with_context(|| format!("--gdb {text}: not an ADDR:PORT"))?
        .next()
        .with_context(|| format!("--gdb {text}: the name resolves to no address"))?;
    if !addr.ip().is_loopback() {
        bail!(
            "--gdb {text}: {} is not a loopback address; the GDB remote protocol has no authentication and gives all of the guest's memory, so rrr serves it on 127.0.0.1 (or ::1) only (use an SSH tunnel to debug from another machine)",
            addr.ip()
        );
    }
    Ok(addr)
}

/// The seconds the connect line tells gdb to wait for an answer.
pub const REMOTE_TIMEOUT_S: u32 = 60;

/// The line that tells the user how to connect.
pub fn banner(addr: SocketAddr, vmlinux: &std::path::Path) -> String {
    // With the kernel's gdb scripts beside vmlinux, gdb loads them (lx-dmesg, lx-ps, ...) once
    // their directory is on its auto-load safe path.
    let scripts = vmlinux
        .parent()
        .filter(|dir| dir.join(rrr_kernels::gdb_scripts::SCRIPT_NAME).is_file())
        .map(|dir| format!("-iex 'add-auto-load-safe-path {}' ", dir.display()))
        .unwrap_or_default();
    // gdb gives up on a remote that takes 2 s to answer; a replay going back over checkpoints,
    // or a carrier on a loaded machine, can take longer.
    format!(
        "rrr: gdb: the replay waits at READY for gdb on {addr}; connect with:\n  gdb {scripts}-iex 'set remotetimeout {REMOTE_TIMEOUT_S}' {} -ex 'target remote {addr}'",
        vmlinux.display()
    )
}

/// A replay under gdb.
pub struct GdbReplay {
    pub replayer: Replayer,
    pub debugger: Debugger,
    /// In-memory checkpoints (the first at READY, taken at the run loop's first turn):
    /// reverse execution restores the latest one before where it must start and replays
    /// forward from there.
    pub checkpoints: Option<Checkpoints>,
    /// Exits between two checkpoints.
    pub interval: u64,
    /// Bytes the checkpoints may keep.
    pub budget: usize,
}

/// Exits between two checkpoints unless `RRR_GDB_CHECKPOINT_INTERVAL` says otherwise. A
/// checkpoint costs the vCPU state (a few ioctls) and a copy of the pages written since the
/// last one; going back costs the replay of up to this many exits (measured with
/// `scripts/bench-gdb`).
pub const CHECKPOINT_INTERVAL: u64 = 250;

/// The checkpoints' memory budget unless `RRR_GDB_CHECKPOINT_MIB` says otherwise.
pub const CHECKPOINT_MIB: usize = 512;

fn env_number(name: &str) -> Option<u64> {
    std::env::var(name).ok()?.trim().parse().ok()
}

impl GdbReplay {
    pub fn new(replayer: Replayer, debugger: Debugger) -> Self {
        GdbReplay {
            replayer,
            debugger,
            checkpoints: None,
            interval: env_number("RRR_GDB_CHECKPOINT_INTERVAL")
                .unwrap_or(CHECKPOINT_INTERVAL)
                .max(1),
            budget: env_number("RRR_GDB_CHECKPOINT_MIB").map_or(CHECKPOINT_MIB, |m| m as usize)
                << 20,
        }
    }

    pub fn checkpoint_stats(&self) -> CheckpointStats {
        self.checkpoints
            .as_ref()
            .map(Checkpoints::stats)
            .unwrap_or_default()
    }
}

impl ExecMode for GdbReplay {
    rrr_vmm::replayer_passthrough!(replayer);

    fn after_exit(
        &mut self,
        vmm: &mut Vmm,
        exits: u64,
        now: VirtualTime,
        what: ExitWhat,
    ) -> Result<(), RrError> {
        let checked = self.replayer.after_exit(vmm, exits, now, what);
        if checked.is_err() {
            // gdb hears that the replay ended, and how: a divergence is not a clean exit.
            self.debugger.lift();
            self.debugger.ended(2);
            return checked;
        }
        self.debugger.after_exit(vmm, exits)
    }

    fn wants_boundary(&self, exits: u64) -> bool {
        match &self.checkpoints {
            None => true,
            Some(checkpoints) => {
                self.debugger.rewind
                    || checkpoints.due(exits, self.interval) && self.debugger.may_checkpoint()
            }
        }
    }

    fn boundary(&mut self, vmm: &mut Vmm, run: &RunState) -> Result<Option<RunState>, RrError> {
        let Some(checkpoints) = &mut self.checkpoints else {
            // The checkpoints hold the guest's own bytes, none of the debugger's `hlt`s.
            self.debugger.lift();
            let taken = std::time::Instant::now();
            let first = Checkpoints::start(vmm, run, self.replayer.cursor(), self.budget)?;
            self.debugger.replant(vmm)?;
            eprintln!(
                "rrr: gdb: checkpoint at READY (exit {}): {:.1} MiB of guest memory kept, taken in {:.2} s; then one every {} exits",
                run.stats.exits,
                first.stats().bytes as f64 / (1 << 20) as f64,
                taken.elapsed().as_secs_f64(),
                self.interval
            );
            self.debugger.checkpoints = first.exits();
            self.checkpoints = Some(first);
            return Ok(None);
        };
        if self.debugger.rewind {
            let index = checkpoints.before(self.debugger.rewind_to);
            // A restore writes back only the pages the guest or a device changed: the
            // debugger's bytes go first, the travel plants its own.
            self.debugger.lift();
            let (state, cursor) = checkpoints.restore(vmm, index)?;
            self.replayer.rewind(&cursor);
            self.debugger.rewound(vmm, state.stats.exits)?;
            return Ok(Some(state));
        }
        self.debugger.lift();
        let dirty = checkpoints.take(vmm, run, self.replayer.cursor())?;
        self.debugger.replant(vmm)?;
        self.replayer.carry_dirty(&dirty);
        self.debugger.checkpoints = checkpoints.exits();
        Ok(None)
    }

    fn restore_guest_debug(&mut self, vmm: &mut Vmm) -> Result<(), RrError> {
        self.debugger.restore_guest_debug(vmm)
    }

    fn probe_hit(
        &mut self,
        vmm: &mut Vmm,
        _exits: u64,
        _now: VirtualTime,
    ) -> Result<bool, RrError> {
        self.debugger.probe_hit(vmm)
    }

    fn debug_exit(
        &mut self,
        vmm: &mut Vmm,
        _exits: u64,
        _now: VirtualTime,
        debug: &kvm_bindings::kvm_debug_exit_arch,
    ) -> Result<bool, RrError> {
        self.debugger.debug_exit(vmm, debug)
    }

    fn landmark_due(&mut self, vmm: &mut Vmm, exits: u64) -> Result<bool, RrError> {
        if !self.replayer.landmark_at(exits) {
            return Ok(false);
        }
        // The replayer finds the landmark with its own debug exits and compares registers and
        // written memory: gdb's breakpoints and debug registers step aside meanwhile. The pages
        // the checkpoints took from the dirty log count as written.
        if let Some(checkpoints) = &mut self.checkpoints {
            let pages = checkpoints.note_written(vmm)?;
            self.replayer.carry_dirty(&pages);
        }
        self.debugger.lift();
        let due = self.replayer.landmark_due(vmm, exits);
        self.debugger.replant(vmm)?;
        due
    }
}

#[cfg(test)]
mod tests {
    use super::parse_addr;

    #[test]
    fn serves_on_loopback_only() {
        assert_eq!(parse_addr("127.0.0.1:1234").unwrap().port(), 1234);
        assert_eq!(parse_addr("4321").unwrap().to_string(), "127.0.0.1:4321");
        assert!(parse_addr("[::1]:1234").unwrap().ip().is_loopback());
        let refused = parse_addr("0.0.0.0:1234").unwrap_err().to_string();
        assert!(refused.contains("not a loopback address"), "{refused}");
        assert!(parse_addr("10.1.2.3:1234").is_err());
        assert!(parse_addr("nonsense").is_err());
    }
}
