/* rrr's trace-pc runtime, linked into every stimulus.
 *
 * The stimulus is compiled with -fsanitize-coverage=trace-pc, so gcc calls
 * __sanitizer_cov_trace_pc() at every basic block of its code. Every RRR_PROGRESS_INTERVAL calls,
 * this runtime writes one byte to rrr's progress port: a VM exit at a point that replays itself,
 * where the VMM can let timers fire. A CPU-bound loop without system calls is then preempted at
 * the same instructions on every run, as the kernel's KCOV hook does for kernel code.
 *
 * This file itself must not be instrumented (it would call itself). The port write needs the
 * agent's ioperm grant, which it announces with RRR_PROGRESS=1 in the environment; without it
 * (the program run outside rrr) the runtime only counts. Libraries (libc) are not instrumented. */
#include <stdlib.h>

#include "rrr_protocol.h"

/* Shared by all threads. One CPU runs them, and xadd increments in one instruction, so a
 * preemption never loses or repeats a count; a forked child continues from its copy. */
static unsigned long rrr_blocks;
static int rrr_port_granted;

__attribute__((constructor(101))) static void rrr_trace_pc_init(void)
{
	const char *granted = getenv("RRR_PROGRESS");
	rrr_port_granted = granted && granted[0] == '1';
}

void __sanitizer_cov_trace_pc(void)
{
	unsigned long count = 1;

	__asm__ volatile("xadd %0, %1" : "+r"(count), "+m"(rrr_blocks));
	if (__builtin_expect(((count + 1) & (RRR_PROGRESS_INTERVAL - 1)) == 0, 0) && rrr_port_granted)
		__asm__ volatile("outb %b0, %w1"
				 :
				 : "a"((unsigned char)RRR_PROGRESS_FROM_USER),
				   "Nd"((unsigned short)RRR_PROGRESS_PORT));
}
