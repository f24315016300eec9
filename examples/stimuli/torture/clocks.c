/* Torture: every clock the guest can read, and every source of randomness. Two runs of a
 * recording must print the same values: time comes from virtual time, randomness from the
 * boot seed in the snapshot. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <sys/random.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static void hex(const char *what, const unsigned char *b, size_t n)
{
	printf("%s:", what);
	for (size_t i = 0; i < n; i++)
		printf("%02x", b[i]);
	printf("\n");
}

int main(void)
{
	static const struct {
		clockid_t id;
		const char *name;
	} clocks[] = {
		{ CLOCK_REALTIME, "REALTIME" },
		{ CLOCK_MONOTONIC, "MONOTONIC" },
		{ CLOCK_PROCESS_CPUTIME_ID, "PROCESS_CPUTIME_ID" },
		{ CLOCK_THREAD_CPUTIME_ID, "THREAD_CPUTIME_ID" },
		{ CLOCK_MONOTONIC_RAW, "MONOTONIC_RAW" },
		{ CLOCK_REALTIME_COARSE, "REALTIME_COARSE" },
		{ CLOCK_MONOTONIC_COARSE, "MONOTONIC_COARSE" },
		{ CLOCK_BOOTTIME, "BOOTTIME" },
		{ CLOCK_TAI, "TAI" },
	};
	for (int round = 0; round < 3; round++) {
		for (size_t i = 0; i < sizeof(clocks) / sizeof(clocks[0]); i++) {
			struct timespec ts;
			if (clock_gettime(clocks[i].id, &ts) == 0)
				printf("clock %s %lld.%09ld\n", clocks[i].name, (long long)ts.tv_sec,
				       ts.tv_nsec);
			else
				printf("clock %s unavailable\n", clocks[i].name);
		}
		struct timeval tv;
		gettimeofday(&tv, NULL);
		printf("gettimeofday %lld.%06ld time %lld\n", (long long)tv.tv_sec, (long)tv.tv_usec,
		       (long long)time(NULL));
		struct timespec nap = { 0, 3000000 };
		nanosleep(&nap, NULL);
	}
	unsigned char buf[16];
	if (getrandom(buf, sizeof(buf), 0) == (ssize_t)sizeof(buf))
		hex("getrandom", buf, sizeof(buf));
	int fd = open("/dev/urandom", O_RDONLY);
	if (fd >= 0 && read(fd, buf, sizeof(buf)) == (ssize_t)sizeof(buf))
		hex("urandom", buf, sizeof(buf));
	int on_stack;
	printf("addresses stack %p heap %p\n", (void *)&on_stack, (void *)sbrk(0));
	return 0;
}
