/* The control-port protocol between the guest agent and the rrr VMM.
 *
 * Mirrors guest/src/protocol.rs; a Rust test parses this file and checks every number against it,
 * so change both together. A message is (command << 24) | argument, written with a 32-bit outl to
 * RRR_CONTROL_PORT; the VMM's reply to an inl after READY is GO in the top byte and the time limit
 * in seconds in the low 24 bits. */
#ifndef RRR_PROTOCOL_H
#define RRR_PROTOCOL_H

#define RRR_CONTROL_PORT 0x0790
#define RRR_CONTROL_PORT_LEN 4

#define RRR_CMD_READY 1
#define RRR_CMD_EXITED 2
#define RRR_CMD_SIGNALED 3
#define RRR_CMD_TIMED_OUT 4
#define RRR_CMD_STARTED 5
#define RRR_CMD_SPAWN_FAILED 6
#define RRR_CMD_PROGRESS 7
#define RRR_CMD_POWER_OFF 8

/* Instrumented code writes one byte here every RRR_PROGRESS_INTERVAL basic blocks: the kernel's
 * KCOV hook (RRR_PROGRESS_FROM_KERNEL) and the stimulus's trace-pc runtime (_FROM_USER). The agent
 * grants it with ioperm and says so with RRR_PROGRESS=1 in the stimulus's environment. */
#define RRR_PROGRESS_PORT 0x0794
#define RRR_PROGRESS_PORT_LEN 1
#define RRR_PROGRESS_INTERVAL 65536
#define RRR_PROGRESS_FROM_KERNEL 0x4b
#define RRR_PROGRESS_FROM_USER 0x55

/* The stimulus's time and entropy traps (trace_pc.c's sibling traps.c). An inl at RRR_TSC_PORT
 * reads the low half of the virtual TSC (RRR_TSC_KHZ) at that exit, at RRR_TSC_PORT + 4 the high
 * half; an inl at RRR_RANDOM_PORT reads 32 bits from the VMM's seeded PRNG. The agent grants both
 * with ioperm when an rrr VMM answered, and says so with RRR_TRAPS=1 in the stimulus's
 * environment. */
#define RRR_TSC_PORT 0x0798
#define RRR_TSC_PORT_LEN 8
#define RRR_TSC_KHZ 500000
#define RRR_RANDOM_PORT 0x07a0
#define RRR_RANDOM_PORT_LEN 4

/* The stimulus's function probes (func_probes.c): the trace pass turns the hooks' marked NOPs
 * into an outb to this port, which the agent grants; nothing writes it otherwise. */
#define RRR_FUNC_PROBE_PORT 0x07a4
#define RRR_FUNC_PROBE_PORT_LEN 1

#define RRR_GO 0x60
#define RRR_ARG_MASK 0x00ffffffu

/* The stimulus disk (the second virtio disk): empty until GO; then block 0 holds the magic
 * "RRRSTIM1" and the program's length (u64, little endian) and the program starts at
 * RRR_STIMULUS_DATA_OFFSET. Read with O_DIRECT, so nothing of it was cached before GO. */
#define RRR_STIMULUS_MAGIC "RRRSTIM1"
#define RRR_STIMULUS_DATA_OFFSET 4096
#define RRR_STIMULUS_DISK_BYTES 0x4000000

#endif
