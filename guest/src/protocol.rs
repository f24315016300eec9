//! The control-port protocol between the guest agent and the VMM.
//!
//! The agent talks to the VMM with 32-bit `outl`/`inl` on [`CONTROL_PORT`]; every access is a
//! synchronous exit, so the conversation lands at the same point of guest execution on every run.
//! A message is `(command << 24) | argument`. The C side (`agent/rrr_protocol.h`) carries the same
//! numbers; a test keeps the two in step.

/// The I/O port of the control device (4 bytes wide).
pub const CONTROL_PORT: u16 = 0x0790;
/// How many ports the control device decodes.
pub const CONTROL_PORT_LEN: u16 = 4;

/// The progress port: instrumented guest code writes one byte here every [`PROGRESS_INTERVAL`]
/// basic blocks, the kernel from its KCOV hook and the stimulus from its trace-pc runtime. Each
/// write is a synchronous exit at a point that replays itself, so timer interrupts reach code
/// that makes no other exit at deterministic points (DESIGN.md, "A software progress counter").
pub const PROGRESS_PORT: u16 = 0x0794;
/// How many ports the progress device decodes.
pub const PROGRESS_PORT_LEN: u16 = 1;
/// Basic blocks (instrumentation callbacks) per progress write; a power of two, so the guest's
/// test is a mask. 65536 cost no measurable boot time (DESIGN.md's prototype table).
pub const PROGRESS_INTERVAL: u64 = 65536;
/// The byte the kernel's KCOV hook writes.
pub const PROGRESS_FROM_KERNEL: u8 = 0x4b; // 'K'
/// The byte the stimulus's trace-pc runtime writes.
pub const PROGRESS_FROM_USER: u8 = 0x55; // 'U'
/// The kernel room rrr's patch to `kcov.c` leaves for the trace pass's in-guest probes: an
/// executable area in `.text` for the stubs the tracer writes (filled with `int3`), and a buffer
/// in `.bss` their records go to (zeroes). Untraced, nothing refers to either.
pub const TRACE_TEXT_SYMBOL: &str = "rrr_trace_text";
pub const TRACE_TEXT_SIZE: u64 = 4 << 20;
pub const TRACE_DATA_SYMBOL: &str = "rrr_trace_data";
pub const TRACE_DATA_SIZE: u64 = 4 << 20;

/// Set (to "1") in the stimulus's environment by the agent once it has granted the progress port
/// with `ioperm`; without it the runtime only counts, since `outb` would fault.
pub const PROGRESS_ENV: &str = "RRR_PROGRESS";

/// The virtual TSC: a 32-bit `inl` at this port reads the low half of the TSC at that exit, at
/// `TSC_PORT + 4` the high half. The stimulus's runtime makes `rdtsc`/`rdtscp` fault
/// (`PR_SET_TSC`) and answers them from here, so user space never reads the host's TSC.
pub const TSC_PORT: u16 = 0x0798;
/// How many ports the TSC device decodes (the 64-bit value, little endian).
pub const TSC_PORT_LEN: u16 = 8;
/// The virtual TSC's frequency in kHz: 500 MHz. The guest kernel never reads a TSC
/// (`clearcpuid=tsc`); what it believes about CPU speed is `lpj=2000000` at `HZ=250` (rrr's
/// kernels), 500 million delay loops per second, which is what a TSC-based delay loop would
/// count on a 500 MHz TSC (BogoMIPS 1000.00 = 2 x MHz, as on hardware).
pub const TSC_KHZ: u64 = 500_000;
/// Deterministic entropy: every `inl` (or narrower `in`) here reads fresh bits from a PRNG that
/// is VMM device state (seeded from the machine's `--seed`, saved in snapshots). The runtime
/// answers the stimulus's rewritten `rdrand`/`rdseed` from it.
pub const RANDOM_PORT: u16 = 0x07a0;
/// How many ports the random device decodes.
pub const RANDOM_PORT_LEN: u16 = 4;
/// The stimulus's function probes (`agent/func_probes.c`): the trace pass turns the marked
/// NOPs of `__cyg_profile_func_enter`/`_exit` into an `outb` here (the agent grants the port);
/// nothing writes it otherwise.
pub const FUNC_PROBE_PORT: u16 = 0x07a4;
/// How many ports the function probes use.
pub const FUNC_PROBE_PORT_LEN: u16 = 1;
/// The symbols marking the hooks' 5-byte NOPs, each preceded by a `mov` of
/// [`FUNC_PROBE_PORT`] into `dx`, so that the first NOP byte can become `out %al, (%dx)`.
pub const FUNC_ENTER_PROBE_SYMBOL: &str = "rrr_func_enter_probe";
pub const FUNC_EXIT_PROBE_SYMBOL: &str = "rrr_func_exit_probe";

/// Set (to "1") in the stimulus's environment by the agent once an rrr VMM answered and it
/// granted [`TSC_PORT`] and [`RANDOM_PORT`] with `ioperm`; only then does the runtime trap
/// `rdtsc`/`rdtscp` (outside rrr they run natively, and rewritten sites use `getrandom`).
pub const TRAPS_ENV: &str = "RRR_TRAPS";

/// Commands the agent writes with `outl`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Command {
    /// Mounts done, about to wait for GO. The snapshot point.
    Ready = 1,
    /// The stimulus exited normally; the argument is its exit status (0..=255).
    Exited = 2,
    /// The stimulus was killed by a signal; the argument is the signal number.
    Signaled = 3,
    /// The stimulus ran past its time limit and was killed.
    TimedOut = 4,
    /// The stimulus has been started (argument: its pid).
    Started = 5,
    /// The agent could not start the stimulus; the argument is the errno.
    SpawnFailed = 6,
    /// A deterministic progress point from instrumented user code (argument free for use).
    Progress = 7,
    /// The agent is about to power the machine off.
    PowerOff = 8,
}

impl Command {
    pub fn from_u8(value: u8) -> Option<Self> {
        Some(match value {
            1 => Command::Ready,
            2 => Command::Exited,
            3 => Command::Signaled,
            4 => Command::TimedOut,
            5 => Command::Started,
            6 => Command::SpawnFailed,
            7 => Command::Progress,
            8 => Command::PowerOff,
            _ => return None,
        })
    }
}

/// The reply to an `inl` from the control port after READY: [`GO`] in the top byte and the
/// stimulus time limit in seconds (0: no limit) in the low 24 bits.
pub const GO: u8 = 0x60;

/// The stimulus disk: the second virtio disk, blank until READY, then block 0 holds
/// [`STIMULUS_MAGIC`] and the program's length (u64 LE) and the program follows at
/// [`STIMULUS_DATA_OFFSET`]. The agent reads it with `O_DIRECT` after GO, so nothing of the
/// stimulus sits in a snapshot's page cache and one snapshot serves every stimulus.
pub const STIMULUS_MAGIC: [u8; 8] = *b"RRRSTIM1";
/// Where the program starts on the stimulus disk (one block: O_DIRECT reads are aligned).
pub const STIMULUS_DATA_OFFSET: u64 = 4096;
/// The stimulus disk's fixed capacity: its size is part of the board the snapshot saw.
pub const STIMULUS_DISK_BYTES: u64 = 64 << 20;

/// Largest stimulus that fits the stimulus disk.
pub const MAX_STIMULUS_BYTES: u64 = STIMULUS_DISK_BYTES - STIMULUS_DATA_OFFSET;

/// The stimulus disk's contents for `program`: header block, then the program.
pub fn stimulus_disk_image(program: &[u8]) -> Option<Vec<u8>> {
    if program.len() as u64 > MAX_STIMULUS_BYTES {
        return None;
    }
    let mut image = vec![0u8; STIMULUS_DATA_OFFSET as usize];
    image[..8].copy_from_slice(&STIMULUS_MAGIC);
    image[8..16].copy_from_slice(&(program.len() as u64).to_le_bytes());
    image.extend_from_slice(program);
    Some(image)
}

/// Largest argument that fits in a message.
pub const ARG_MASK: u32 = 0x00ff_ffff;

/// A decoded `outl` from the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Message {
    pub command: Command,
    pub argument: u32,
}

/// Why a word from the guest is not a message. The guest is not trusted: a bad word is reported,
/// never a panic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("unknown control command {command} (word {word:#010x})")]
pub struct UnknownCommand {
    pub command: u8,
    pub word: u32,
}

impl Message {
    pub fn decode(word: u32) -> Result<Self, UnknownCommand> {
        let command = (word >> 24) as u8;
        Command::from_u8(command)
            .map(|command| Message {
                command,
                argument: word & ARG_MASK,
            })
            .ok_or(UnknownCommand { command, word })
    }

    pub fn encode(self) -> u32 {
        ((self.command as u32) << 24) | (self.argument & ARG_MASK)
    }
}

/// The GO word for a time limit in seconds (saturating at the 24-bit maximum).
pub fn go_word(time_limit_secs: u32) -> u32 {
    ((GO as u32) << 24) | time_limit_secs.min(ARG_MASK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        for raw in 1..=8u8 {
            let command = Command::from_u8(raw).unwrap();
            let message = Message {
                command,
                argument: 0x1234,
            };
            assert_eq!(Message::decode(message.encode()), Ok(message));
        }
    }

    #[test]
    fn unknown_commands_are_errors() {
        assert_eq!(
            Message::decode(0xee00_0001),
            Err(UnknownCommand {
                command: 0xee,
                word: 0xee00_0001
            })
        );
    }

    #[test]
    fn go_word_carries_the_limit() {
        assert_eq!(go_word(30), 0x6000_001e);
        assert_eq!(go_word(u32::MAX) & ARG_MASK, ARG_MASK);
    }
}
