/* cpu_threads.c: two threads computing with no system call for about 2 s of guest time (10^9
 * instrumented blocks at rrr's 2 ns per block), for the test that two runs preempt them at the
 * very same instructions.
 *
 * Nothing here makes a VM exit but rrr's progress counter (the stimulus is built with
 * -fsanitize-coverage=trace-pc): the timer interrupts that make the kernel switch between the
 * threads arrive only at progress exits. Each thread notes in shared memory every time it finds
 * the other one ran since its own last iteration, with the iteration it was at; the list of those
 * switch points is printed at the end. Two runs that preempted anywhere differently print
 * different lists. Exits 0 when both threads finished and switched at least once. */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>

#define ITERATIONS 250000000UL
#define MAX_SWITCHES 4096
#define SHOWN 12

static volatile int last_runner = -1;
static volatile int started;
static unsigned long switch_at[MAX_SWITCHES];
static volatile unsigned switches;
static uint64_t result[2];

static void *worker(void *arg)
{
	int id = (int)(intptr_t)arg;
	uint64_t x = 0x9e3779b97f4a7c15ULL * (uint64_t)(id + 1);
	/* Both threads start computing together: the first to arrive spins (no syscall) until the
	 * other is there too. */
	__atomic_add_fetch(&started, 1, __ATOMIC_SEQ_CST);
	while (started < 2)
		;
	for (unsigned long i = 0; i < ITERATIONS; i++) {
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		if (last_runner != id) {
			unsigned n = switches;
			if (n < MAX_SWITCHES)
				switch_at[n] = ((unsigned long)id << 40) | i;
			switches = n + 1;
			last_runner = id;
		}
	}
	result[id] = x;
	return NULL;
}

int main(void)
{
	pthread_t threads[2];
	for (long id = 0; id < 2; id++)
		if (pthread_create(&threads[id], NULL, worker, (void *)id) != 0) {
			printf("cpu_threads: pthread_create failed\n");
			return 1;
		}
	for (int id = 0; id < 2; id++)
		pthread_join(threads[id], NULL);

	unsigned n = switches < MAX_SWITCHES ? switches : MAX_SWITCHES;
	uint64_t digest = 14695981039346656037ULL;
	for (unsigned i = 0; i < n; i++)
		digest = (digest ^ switch_at[i]) * 1099511628211ULL;
	printf("cpu_threads: %u switches between the threads, digest %016llx\n", switches,
	       (unsigned long long)digest);
	for (unsigned i = 0; i < n && i < SHOWN; i++)
		printf("cpu_threads: switch %u: thread %lu at iteration %lu\n", i, switch_at[i] >> 40,
		       switch_at[i] & ((1UL << 40) - 1));
	printf("cpu_threads: results %016llx %016llx\n", (unsigned long long)result[0],
	       (unsigned long long)result[1]);
	return switches >= 2 ? 0 : 1;
}
