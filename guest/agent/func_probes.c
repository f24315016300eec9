/* rrr's function probes, linked into every stimulus.
 *
 * The stimulus is compiled with -finstrument-functions, so gcc calls these two hooks at the entry
 * and at every exit of each of its functions (inlined ones too), with the function's address and
 * its call site. While recording and replaying they do nothing: each loads rrr's function-probe
 * port into dx and runs a 5-byte NOP. The trace pass turns the NOP's first byte into
 * `out %al, (%dx)` on the page the stimulus's processes share: a VM exit where the VMM reads the
 * function from rdi, names it from the stimulus's symbols, and resumes after the NOP, so the
 * guest never runs the rest. dx is a caller-saved register and the hooks clobber it in every run
 * alike, so the recording's register state does not depend on whether a trace watches.
 *
 * This file itself is not instrumented (the hooks would call themselves). */
#include "rrr_protocol.h"

#define RRR_STR2(x) #x
#define RRR_STR(x) RRR_STR2(x)

/* The marked NOP: `movw $port, %dx`, then the global label, then `nopl 0x0(%rax,%rax,1)`. The
 * function and the call site are pinned to rdi and rsi (edi and esi in a 32-bit stimulus). */
#define RRR_FUNC_PROBE(label, fn, site)                                                           \
	__asm__ volatile("movw $" RRR_STR(RRR_FUNC_PROBE_PORT) ", %%dx\n\t"                         \
			 ".globl " label "\n" label ":\n\t"                                         \
			 ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00"                                       \
			 :                                                                          \
			 : "D"(fn), "S"(site)                                                       \
			 : "dx", "memory")

__attribute__((no_instrument_function)) void __cyg_profile_func_enter(void *fn, void *site)
{
	RRR_FUNC_PROBE("rrr_func_enter_probe", fn, site);
}

__attribute__((no_instrument_function)) void __cyg_profile_func_exit(void *fn, void *site)
{
	RRR_FUNC_PROBE("rrr_func_exit_probe", fn, site);
}
