//! The recording side: every input from outside the guest, logged with the exit count at which
//! it entered, and checkpoints for the replay to check itself against.

use crate::builder::Vmm;
use crate::clock::VirtualTime;
use crate::stall::LandmarkCause;

use super::log::{Checkpoint, End, Landmark, Record, RecordingWriter};
use super::{reg_state, DirtyPages, ExecMode, ExitWhat, RrError};

/// Counts of what a recording holds, for the summary.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct RecordStats {
    pub inputs: u64,
    pub input_bytes: u64,
    pub landmarks_spinning: u64,
    pub landmarks_runaway: u64,
    pub checkpoints: u64,
}

pub struct Recorder {
    writer: RecordingWriter,
    interval: u64,
    dirty: DirtyPages,
    stats: RecordStats,
}

impl Recorder {
    /// `writer` already holds the header.
    pub fn new(writer: RecordingWriter, interval: u64) -> Self {
        Recorder {
            writer,
            interval: interval.max(1),
            dirty: DirtyPages::default(),
            stats: RecordStats::default(),
        }
    }

    pub fn stats(&self) -> RecordStats {
        self.stats
    }

    pub fn writer(&self) -> &RecordingWriter {
        &self.writer
    }

    /// The final state hash of the VM as the run left it.
    pub fn final_hash(&mut self, vmm: &Vmm) -> Result<u64, RrError> {
        self.dirty.final_hash(vmm)
    }

    /// Closes the recording with its end record: from here on it is complete.
    pub fn finish(mut self, end: End) -> Result<RecordingWriter, RrError> {
        self.writer.append(&Record::End(Box::new(end)))?;
        self.writer.sync()?;
        Ok(self.writer)
    }
}

impl ExecMode for Recorder {
    fn after_exit(
        &mut self,
        vmm: &mut Vmm,
        exits: u64,
        now: VirtualTime,
        _what: ExitWhat,
    ) -> Result<(), RrError> {
        if exits % self.interval != 0 {
            return Ok(());
        }
        let regs = reg_state(vmm)?;
        self.writer.append(&Record::Checkpoint(Checkpoint {
            exits,
            time_ns: now.as_nanos(),
            rip: regs.rip(),
            regs_hash: regs.hash(),
            regs,
        }))?;
        self.stats.checkpoints += 1;
        Ok(())
    }

    fn input_delivered(
        &mut self,
        exits: u64,
        now: VirtualTime,
        bytes: &[u8],
    ) -> Result<(), RrError> {
        self.writer.append(&Record::Input {
            exits,
            time_ns: now.as_nanos(),
            bytes: bytes.to_vec(),
        })?;
        self.stats.inputs += 1;
        self.stats.input_bytes += bytes.len() as u64;
        Ok(())
    }

    fn landmark(&mut self, vmm: &mut Vmm, exits: u64, cause: LandmarkCause) -> Result<(), RrError> {
        let regs = reg_state(vmm)?;
        let dirty_hash = self.dirty.take_and_hash(vmm)?;
        tracing::debug!(
            exits,
            ?cause,
            rip = format_args!("{:#x}", regs.rip()),
            "landmark recorded"
        );
        self.writer.append(&Record::Landmark(Box::new(Landmark {
            exits,
            kind: cause.into(),
            regs,
            dirty_hash,
        })))?;
        match cause {
            LandmarkCause::Spinning => self.stats.landmarks_spinning += 1,
            LandmarkCause::Runaway => self.stats.landmarks_runaway += 1,
        }
        Ok(())
    }
}
