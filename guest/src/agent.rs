//! The agent's C source, embedded so `rrr` can build rootfs images from any working directory.

/// `agent/agent.c`: PID 1 of every rootfs.
pub const AGENT_C: &str = include_str!("../agent/agent.c");
/// `agent/rrr_protocol.h`: the protocol numbers for C, included by `agent.c`.
pub const PROTOCOL_H: &str = include_str!("../agent/rrr_protocol.h");

/// `agent/trace_pc.c`: the trace-pc runtime linked into every stimulus (progress exits from user
/// code); compiled next to `rrr_protocol.h`, without instrumentation.
pub const TRACE_PC_C: &str = include_str!("../agent/trace_pc.c");

/// `agent/traps.c`: the time and entropy traps linked into every stimulus next to `trace_pc.c`
/// (`rdtsc`/`rdtscp` made to fault and answered from the VMM's virtual TSC; the `rdrand`/`rdseed`
/// sites rrr rewrote answered from its PRNG); compiled the same way.
pub const TRAPS_C: &str = include_str!("../agent/traps.c");

/// `agent/func_probes.c`: the hooks `-finstrument-functions` calls at every entry and exit of
/// the stimulus's functions, with a marked NOP each that the trace pass turns into a probe.
pub const FUNC_PROBES_C: &str = include_str!("../agent/func_probes.c");

/// The files to place side by side before compiling `agent.c` or the stimulus runtime
/// (name, contents).
pub const SOURCES: [(&str, &str); 5] = [
    ("agent.c", AGENT_C),
    ("rrr_protocol.h", PROTOCOL_H),
    ("trace_pc.c", TRACE_PC_C),
    ("traps.c", TRAPS_C),
    ("func_probes.c", FUNC_PROBES_C),
];

/// The stimulus runtime's C files, each compiled uninstrumented and linked into every stimulus.
pub const RUNTIME_SOURCES: [&str; 3] = ["trace_pc.c", "traps.c", "func_probes.c"];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{
        Command, ARG_MASK, CONTROL_PORT, CONTROL_PORT_LEN, GO, PROGRESS_ENV, PROGRESS_FROM_KERNEL,
        PROGRESS_FROM_USER, PROGRESS_INTERVAL, PROGRESS_PORT, PROGRESS_PORT_LEN, RANDOM_PORT,
        RANDOM_PORT_LEN, TRAPS_ENV, TSC_KHZ, TSC_PORT, TSC_PORT_LEN,
    };
    use std::collections::HashMap;

    /// `#define NAME VALUE` lines of the header, values parsed as C integer literals.
    fn defines() -> HashMap<String, u32> {
        PROTOCOL_H
            .lines()
            .filter_map(|line| {
                let mut words = line.split_whitespace();
                if words.next()? != "#define" {
                    return None;
                }
                let name = words.next()?.to_string();
                let value = words.next()?.trim_end_matches(['u', 'U']);
                let value = match value.strip_prefix("0x") {
                    Some(hex) => u32::from_str_radix(hex, 16).ok()?,
                    None => value.parse().ok()?,
                };
                Some((name, value))
            })
            .collect()
    }

    #[test]
    fn header_matches_protocol_rs() {
        let defs = defines();
        let get = |name: &str| {
            *defs
                .get(name)
                .unwrap_or_else(|| panic!("rrr_protocol.h lacks {name}"))
        };
        assert_eq!(get("RRR_CONTROL_PORT"), u32::from(CONTROL_PORT));
        assert_eq!(get("RRR_CONTROL_PORT_LEN"), u32::from(CONTROL_PORT_LEN));
        assert_eq!(get("RRR_GO"), u32::from(GO));
        assert_eq!(get("RRR_ARG_MASK"), ARG_MASK);
        let magic = std::str::from_utf8(&crate::protocol::STIMULUS_MAGIC).unwrap();
        assert!(PROTOCOL_H.contains(&format!("#define RRR_STIMULUS_MAGIC \"{magic}\"")));
        assert_eq!(
            u64::from(get("RRR_STIMULUS_DATA_OFFSET")),
            crate::protocol::STIMULUS_DATA_OFFSET
        );
        assert_eq!(
            u64::from(get("RRR_STIMULUS_DISK_BYTES")),
            crate::protocol::STIMULUS_DISK_BYTES
        );
        assert_eq!(get("RRR_PROGRESS_PORT"), u32::from(PROGRESS_PORT));
        assert_eq!(get("RRR_PROGRESS_PORT_LEN"), u32::from(PROGRESS_PORT_LEN));
        assert_eq!(u64::from(get("RRR_PROGRESS_INTERVAL")), PROGRESS_INTERVAL);
        assert_eq!(
            get("RRR_PROGRESS_FROM_KERNEL"),
            u32::from(PROGRESS_FROM_KERNEL)
        );
        assert_eq!(get("RRR_PROGRESS_FROM_USER"), u32::from(PROGRESS_FROM_USER));
        assert_eq!(get("RRR_TSC_PORT"), u32::from(TSC_PORT));
        assert_eq!(get("RRR_TSC_PORT_LEN"), u32::from(TSC_PORT_LEN));
        assert_eq!(u64::from(get("RRR_TSC_KHZ")), TSC_KHZ);
        assert_eq!(get("RRR_RANDOM_PORT"), u32::from(RANDOM_PORT));
        assert_eq!(get("RRR_RANDOM_PORT_LEN"), u32::from(RANDOM_PORT_LEN));
        assert_eq!(
            get("RRR_FUNC_PROBE_PORT"),
            u32::from(crate::protocol::FUNC_PROBE_PORT)
        );
        assert_eq!(
            get("RRR_FUNC_PROBE_PORT_LEN"),
            u32::from(crate::protocol::FUNC_PROBE_PORT_LEN)
        );
        for symbol in [
            crate::protocol::FUNC_ENTER_PROBE_SYMBOL,
            crate::protocol::FUNC_EXIT_PROBE_SYMBOL,
        ] {
            assert!(
                FUNC_PROBES_C.contains(symbol),
                "func_probes.c lacks {symbol}"
            );
        }
        let commands = [
            ("RRR_CMD_READY", Command::Ready),
            ("RRR_CMD_EXITED", Command::Exited),
            ("RRR_CMD_SIGNALED", Command::Signaled),
            ("RRR_CMD_TIMED_OUT", Command::TimedOut),
            ("RRR_CMD_STARTED", Command::Started),
            ("RRR_CMD_SPAWN_FAILED", Command::SpawnFailed),
            ("RRR_CMD_PROGRESS", Command::Progress),
            ("RRR_CMD_POWER_OFF", Command::PowerOff),
        ];
        for (name, command) in commands {
            assert_eq!(get(name), command as u32, "{name}");
        }
        // Every command the header defines is one protocol.rs knows, so neither side has extras.
        let header_commands = defs.keys().filter(|k| k.starts_with("RRR_CMD_")).count();
        assert_eq!(header_commands, commands.len());
        let known_commands = (0..=255u8)
            .filter(|&raw| Command::from_u8(raw).is_some())
            .count();
        assert_eq!(
            known_commands,
            commands.len(),
            "protocol.rs has a command the test misses"
        );
    }

    #[test]
    fn agent_includes_the_header() {
        assert!(AGENT_C.contains("#include \"rrr_protocol.h\""));
        assert!(TRACE_PC_C.contains("#include \"rrr_protocol.h\""));
        assert!(TRAPS_C.contains("#include \"rrr_protocol.h\""));
    }

    #[test]
    fn the_agent_announces_the_trap_ports_the_runtime_checks() {
        let assignment = format!("\"{TRAPS_ENV}=1\"");
        assert!(AGENT_C.contains(&assignment), "agent.c lacks {assignment}");
        assert!(TRAPS_C.contains(&format!("getenv(\"{TRAPS_ENV}\")")));
    }

    #[test]
    fn the_agent_announces_the_progress_port_the_runtime_checks() {
        let assignment = format!("\"{PROGRESS_ENV}=1\"");
        assert!(AGENT_C.contains(&assignment), "agent.c lacks {assignment}");
        assert!(TRACE_PC_C.contains(&format!("getenv(\"{PROGRESS_ENV}\")")));
    }
}
