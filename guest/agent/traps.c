/* rrr's time and entropy traps, linked into every stimulus next to trace_pc.c.
 *
 * A KVM VMM cannot intercept rdtsc/rdtscp (the TSC runs in host time), nor, on AMD,
 * rdrand/rdseed: a stimulus executing them would read host values and two runs would part.
 * - rdtsc/rdtscp: the constructor below makes them fault (prctl(PR_SET_TSC, PR_TSC_SIGSEGV),
 *   inherited by threads, children and exec'd programs), and the SIGSEGV handler answers them
 *   from the VMM's virtual TSC (RRR_TSC_PORT), then resumes after the instruction.
 * - rdrand/rdseed: rrr rewrites each one in the linked binary (rootfs-builder/src/traps.rs):
 *   `0F C7 /6` and `/7` become `0F B9` (ud1) with the same prefixes and ModRM, which raises #UD;
 *   the SIGILL handler reads the VMM's seeded PRNG (RRR_RANDOM_PORT), writes the destination
 *   register, reports success (CF=1) and resumes after the instruction.
 * Port reads are synchronous exits at points that replay themselves, so both answers repeat.
 * The agent grants the ports with ioperm and says so with RRR_TRAPS=1; without it (the program
 * run outside rrr) rdtsc runs natively and rewritten sites draw from getrandom().
 *
 * Any other SIGSEGV or SIGILL ends the program as it would have without rrr. A stimulus that
 * installs its own SIGSEGV or SIGILL handler replaces these.
 *
 * Compiled like trace_pc.c: not instrumented, and with no rdtsc/rdrand of its own. */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/random.h>
#include <ucontext.h>

#include "rrr_protocol.h"

#if defined(__x86_64__)
#define RRR_REG_IP REG_RIP
#define RRR_REG_FLAGS REG_EFL
#define RRR_REG_AX REG_RAX
#define RRR_REG_CX REG_RCX
#define RRR_REG_DX REG_RDX
/* Hardware register numbers (ModRM rm plus REX.B) to ucontext's. */
static const int rrr_gregs[16] = { REG_RAX, REG_RCX, REG_RDX, REG_RBX, REG_RSP, REG_RBP,
				   REG_RSI, REG_RDI, REG_R8,  REG_R9,  REG_R10, REG_R11,
				   REG_R12, REG_R13, REG_R14, REG_R15 };
#elif defined(__i386__)
#define RRR_REG_IP REG_EIP
#define RRR_REG_FLAGS REG_EFL
#define RRR_REG_AX REG_EAX
#define RRR_REG_CX REG_ECX
#define RRR_REG_DX REG_EDX
static const int rrr_gregs[8] = { REG_EAX, REG_ECX, REG_EDX, REG_EBX,
				  REG_UESP, REG_EBP, REG_ESI, REG_EDI };
#else
#error "rrr's traps are x86 only"
#endif

/* EFLAGS bits rdrand/rdseed define: CF=1 on success, the others cleared. */
#define RRR_FLAGS_CF 0x001
#define RRR_FLAGS_CLEARED (0x004 | 0x010 | 0x040 | 0x080 | 0x800) /* PF AF ZF SF OF */

/* The rewritten opcode's second byte (ud1). rootfs-builder/src/traps.rs writes it and parses
 * markers exactly as rrr_marker() does: keep the two in step. */
#define RRR_MARKER_OPCODE 0xb9

static int rrr_ports_granted;

static uint32_t rrr_inl(uint16_t port)
{
	uint32_t value;
	__asm__ volatile("inl %w1, %0" : "=a"(value) : "Nd"(port));
	return value;
}

/* The high half is read on both sides of the low one: between two port reads the guest can be
 * preempted by another thread's rdtsc, and time moves on at every exit, so an equal high half
 * is what proves the pair belongs to one value. */
static uint64_t rrr_virtual_tsc(void)
{
	uint32_t high, low, again;
	do {
		high = rrr_inl(RRR_TSC_PORT + 4);
		low = rrr_inl(RRR_TSC_PORT);
		again = rrr_inl(RRR_TSC_PORT + 4);
	} while (high != again);
	return ((uint64_t)high << 32) | low;
}

static uint64_t rrr_random(unsigned bytes)
{
	uint64_t value = 0;
	if (rrr_ports_granted) {
		value = rrr_inl(RRR_RANDOM_PORT);
		if (bytes == 8)
			value |= (uint64_t)rrr_inl(RRR_RANDOM_PORT) << 32;
		return value;
	}
	int saved = errno;
	unsigned char *out = (unsigned char *)&value;
	for (unsigned done = 0; done < bytes;) {
		ssize_t got = getrandom(out + done, bytes - done, 0);
		if (got > 0)
			done += (unsigned)got;
		else if (errno != EINTR)
			break;
	}
	errno = saved;
	return value;
}

/* Not ours: end the program as it would have ended without rrr. For a fault, returning
 * re-executes the instruction, which faults again into the default action with the kernel's own
 * siginfo; a signal sent by a process is raised again. */
static void rrr_not_ours(int sig, const siginfo_t *info)
{
	struct sigaction dfl;
	memset(&dfl, 0, sizeof(dfl));
	dfl.sa_handler = SIG_DFL;
	sigaction(sig, &dfl, NULL);
	if (info->si_code <= 0)
		raise(sig);
}

static void rrr_on_segv(int sig, siginfo_t *info, void *context)
{
	greg_t *regs = ((ucontext_t *)context)->uc_mcontext.gregs;
	/* rdtsc with CR4.TSD set is a #GP, which the kernel reports as SI_KERNEL; a page fault (the
	 * only way RIP itself can be unreadable) is SEGV_MAPERR/ACCERR, so the bytes are readable. */
	if (info->si_code == SI_KERNEL && rrr_ports_granted) {
		const unsigned char *ip = (const unsigned char *)regs[RRR_REG_IP];
		unsigned length = 0;
		if (ip[0] == 0x0f && ip[1] == 0x31)
			length = 2; /* rdtsc */
		else if (ip[0] == 0x0f && ip[1] == 0x01 && ip[2] == 0xf9)
			length = 3; /* rdtscp */
		if (length) {
			uint64_t tsc = rrr_virtual_tsc();
			regs[RRR_REG_AX] = (uint32_t)tsc;
			regs[RRR_REG_DX] = (uint32_t)(tsc >> 32);
			if (length == 3)
				regs[RRR_REG_CX] = 0; /* IA32_TSC_AUX: CPU 0, node 0 */
			regs[RRR_REG_IP] += length;
			return;
		}
	}
	rrr_not_ours(sig, info);
}

/* A rewritten rdrand/rdseed at ip: legacy prefixes (operand size, address size, segments),
 * then in 64-bit code an optional REX, then 0F B9 and a register ModRM whose reg field is 6
 * (rdrand) or 7 (rdseed). Returns its length and sets the destination and the operand size in
 * bytes, or returns 0. */
static unsigned rrr_marker(const unsigned char *ip, unsigned *reg, unsigned *bytes)
{
	unsigned i = 0, size = 4, rex = 0;
	for (;; i++) {
		if (i == 14)
			return 0;
		unsigned char b = ip[i];
		if (b == 0x66)
			size = 2;
		else if (!(b == 0x67 || b == 0x26 || b == 0x2e || b == 0x36 || b == 0x3e ||
			   b == 0x64 || b == 0x65))
			break;
	}
#if defined(__x86_64__)
	if ((ip[i] & 0xf0) == 0x40)
		rex = ip[i++];
#endif
	if (ip[i] != 0x0f || ip[i + 1] != RRR_MARKER_OPCODE)
		return 0;
	unsigned char modrm = ip[i + 2];
	if ((modrm >> 6) != 3 || ((modrm >> 3) & 7) < 6)
		return 0;
	if (rex & 0x08)
		size = 8;
	*reg = (modrm & 7) | ((rex & 1) << 3);
	*bytes = size;
	return i + 3;
}

static void rrr_on_ill(int sig, siginfo_t *info, void *context)
{
	greg_t *regs = ((ucontext_t *)context)->uc_mcontext.gregs;
	unsigned reg, bytes, length = 0;
	if (info->si_code == ILL_ILLOPN || info->si_code == ILL_ILLOPC)
		length = rrr_marker((const unsigned char *)regs[RRR_REG_IP], &reg, &bytes);
	if (!length) {
		rrr_not_ours(sig, info);
		return;
	}
	uint64_t value = rrr_random(bytes);
	greg_t *dest = &regs[rrr_gregs[reg]];
	if (bytes == 2)
		*dest = (*dest & ~(greg_t)0xffff) | (greg_t)(value & 0xffff);
	else if (bytes == 4)
		*dest = (greg_t)(uint32_t)value; /* a 32-bit write zero-extends */
	else
		*dest = (greg_t)value;
	regs[RRR_REG_FLAGS] = (regs[RRR_REG_FLAGS] & ~(greg_t)RRR_FLAGS_CLEARED) | RRR_FLAGS_CF;
	regs[RRR_REG_IP] += length;
}

static void rrr_handle(int sig, void (*handler)(int, siginfo_t *, void *))
{
	struct sigaction action;
	memset(&action, 0, sizeof(action));
	action.sa_sigaction = handler;
	/* NODEFER: a handler that longjmps out (or a thread's second trap) must not leave the
	 * signal blocked, or the next rdtsc would kill the program. */
	action.sa_flags = SA_SIGINFO | SA_NODEFER | SA_RESTART;
	sigemptyset(&action.sa_mask);
	sigaction(sig, &action, NULL);
}

/* Before the program's own constructors (trace_pc.c's is 101 too; their order does not matter). */
__attribute__((constructor(101))) static void rrr_traps_init(void)
{
	const char *granted = getenv("RRR_TRAPS");
	rrr_ports_granted = granted && granted[0] == '1';
	rrr_handle(SIGILL, rrr_on_ill);
	if (!rrr_ports_granted)
		return;
	rrr_handle(SIGSEGV, rrr_on_segv);
	prctl(PR_SET_TSC, PR_TSC_SIGSEGV, 0, 0, 0);
}
