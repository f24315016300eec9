/* Torture: the instructions that read time and entropy without a system call. Under rrr,
 * rdtsc/rdtscp fault and read the VMM's virtual TSC (500 MHz of virtual time), and rdrand/rdseed
 * are rewritten at build time into traps that read the VMM's seeded PRNG; so two runs print the
 * same values. The program checks what it can itself (monotonic, plausible TSC; CF=1 and the
 * other flags cleared; 16-bit results keep the register's upper bits, 32-bit ones clear them)
 * and exits 1 on the first failure. Outside rrr it runs on the hardware's instructions (rdseed
 * rewritten or not) and passes the same checks. Every CPU-dependent instruction goes through
 * rrr's traps, so no CPUID check is needed: on a CPU without rdseed the trap answers anyway. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define FLAGS_CF 0x001
#define FLAGS_OTHERS 0x8d4 /* OF SF ZF AF PF */

static int failures;

static void check(int ok, const char *what)
{
	if (!ok) {
		printf("tsc_rand: FAIL %s\n", what);
		failures++;
	}
}

static uint64_t rdtsc(void)
{
	uint32_t lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((uint64_t)hi << 32) | lo;
}

static uint64_t rdtscp(uint32_t *aux)
{
	uint32_t lo, hi;
	__asm__ volatile("rdtscp" : "=a"(lo), "=d"(hi), "=c"(*aux));
	return ((uint64_t)hi << 32) | lo;
}

static uint64_t ns(clockid_t clock)
{
	struct timespec ts;
	clock_gettime(clock, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + ts.tv_nsec;
}

/* Each random instruction, run with ZF and PF set beforehand (xor), returns its value and the
 * flags it left; the 16-bit forms start from a register whose upper bits must survive. */
#define RANDOM64(insn, value, flags)                                                       \
	__asm__ volatile("xor %%ecx, %%ecx\n\t" insn " %0\n\tpushfq\n\tpopq %1"            \
			 : "=r"(value), "=r"(flags)                                          \
			 :                                                                   \
			 : "rcx", "cc")
#define RANDOM32(insn, value, flags)                                                       \
	__asm__ volatile("xor %%ecx, %%ecx\n\t" insn " %k0\n\tpushfq\n\tpopq %1"           \
			 : "+r"(value), "=r"(flags)                                          \
			 :                                                                   \
			 : "rcx", "cc")
#define RANDOM16(insn, value, flags)                                                       \
	__asm__ volatile("xor %%ecx, %%ecx\n\t" insn " %w0\n\tpushfq\n\tpopq %1"           \
			 : "+r"(value), "=r"(flags)                                          \
			 :                                                                   \
			 : "rcx", "cc")

static void random_checks(const char *name, int seed)
{
	uint64_t v64, v32 = 0xfeedface00000000u, v16 = 0xdeadbeefcafe0000u, flags, first = 0;
	for (int i = 0; i < 3; i++) {
		if (seed)
			RANDOM64("rdseed", v64, flags);
		else
			RANDOM64("rdrand", v64, flags);
		printf("tsc_rand: %s64 %016llx\n", name, (unsigned long long)v64);
		check((flags & (FLAGS_CF | FLAGS_OTHERS)) == FLAGS_CF, "64-bit flags");
		if (i == 0)
			first = v64;
		else
			check(v64 != first, "64-bit values repeat");
	}
	if (seed)
		RANDOM32("rdseed", v32, flags);
	else
		RANDOM32("rdrand", v32, flags);
	printf("tsc_rand: %s32 %08llx\n", name, (unsigned long long)v32);
	check((flags & (FLAGS_CF | FLAGS_OTHERS)) == FLAGS_CF, "32-bit flags");
	check(v32 >> 32 == 0, "a 32-bit result zero-extends");
	if (seed)
		RANDOM16("rdseed", v16, flags);
	else
		RANDOM16("rdrand", v16, flags);
	printf("tsc_rand: %s16 %04llx\n", name, (unsigned long long)(v16 & 0xffff));
	check((flags & (FLAGS_CF | FLAGS_OTHERS)) == FLAGS_CF, "16-bit flags");
	check(v16 >> 16 == 0xdeadbeefcafeu, "a 16-bit result keeps the upper bits");

	/* A destination in r8-r15 (REX.B). */
	uint64_t high;
	if (seed)
		__asm__ volatile("rdseed %%r9\n\tmovq %%r9, %0" : "=r"(high) : : "r9", "cc");
	else
		__asm__ volatile("rdrand %%r9\n\tmovq %%r9, %0" : "=r"(high) : : "r9", "cc");
	printf("tsc_rand: %s r9 %016llx\n", name, (unsigned long long)high);
}

static void *tsc_reader(void *arg)
{
	uint64_t last = rdtsc(), *backwards = arg;
	for (int i = 0; i < 100; i++) {
		uint64_t now = rdtsc();
		if (now <= last)
			(*backwards)++;
		last = now;
	}
	return NULL;
}

int main(void)
{
	uint64_t boot_ns = ns(CLOCK_BOOTTIME);
	uint64_t t0 = rdtsc();
	uint32_t aux = 0xffffffff;
	uint64_t t1 = rdtscp(&aux);
	printf("tsc_rand: rdtsc %llu rdtscp %llu aux %u\n", (unsigned long long)t0,
	       (unsigned long long)t1, aux);
	check(t1 > t0, "rdtscp after rdtsc is later");
	check(aux < 64, "rdtscp's aux is a CPU number");

	/* Plausible: 10 ms asleep is at least 10 ms of TSC at any frequency above 100 MHz and
	 * below 100 GHz; under rrr it is 5,000,000 ticks and a little more. */
	struct timespec nap = { 0, 10000000 };
	uint64_t before = rdtsc(), mono = ns(CLOCK_MONOTONIC);
	nanosleep(&nap, NULL);
	uint64_t after = rdtsc(), slept_ns = ns(CLOCK_MONOTONIC) - mono;
	printf("tsc_rand: 10 ms asleep: %llu ticks, %llu ns of CLOCK_MONOTONIC\n",
	       (unsigned long long)(after - before), (unsigned long long)slept_ns);
	check(after - before >= slept_ns / 10 && after - before <= slept_ns * 100,
	      "the TSC's rate against CLOCK_MONOTONIC");
	printf("tsc_rand: boot time %llu ns, rdtsc %llu\n", (unsigned long long)boot_ns,
	       (unsigned long long)t0);

	/* Two threads at once: every reading is later than the last of the same thread. */
	uint64_t backwards[2] = { 0, 0 };
	pthread_t threads[2];
	for (int i = 0; i < 2; i++)
		pthread_create(&threads[i], NULL, tsc_reader, &backwards[i]);
	for (int i = 0; i < 2; i++)
		pthread_join(threads[i], NULL);
	printf("tsc_rand: threads went backwards %llu %llu times\n",
	       (unsigned long long)backwards[0], (unsigned long long)backwards[1]);
	check(backwards[0] == 0 && backwards[1] == 0, "rdtsc is monotonic in each thread");

	random_checks("rdrand", 0);
	random_checks("rdseed", 1);
	if (failures) {
		printf("tsc_rand: %d failures\n", failures);
		return 1;
	}
	printf("tsc_rand: done\n");
	return 0;
}
