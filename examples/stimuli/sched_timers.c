/* sched_timers.c: a short workout for the scheduler, the timers and the disk, for the test that
 * runs a stimulus twice and expects the very same run. A thread sleeps in a nanosleep loop (timer
 * interrupts, wakeups), the parent and a child process bounce a byte through two pipes (context
 * switches), and a small file is written and fsynced to the ext4 disk (virtio). The sleeper and
 * the child print as they go: console bytes are VM exits, so virtual time moves during the
 * ping-pong, the sleeper's timers fire in the middle of it, and the order of the lines shows where
 * the interrupts landed. Times come from CLOCK_MONOTONIC, so two runs whose virtual time differed
 * print differently. Exits 0 when all went well. */
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define SLEEPS 20
#define SLEEP_NS 3000000L
#define ROUNDS 600
#define ROUNDS_PER_LINE 20
#define FILE_BYTES (64 * 1024)
#define PATH "/var/tmp/rrr-sched-timers.bin"

static long long now_us(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000000LL + ts.tv_nsec / 1000;
}

/* One write(2) per line: stdio's locks are not safe in a child forked from a threaded process. */
static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...)
{
	char buf[256];
	va_list ap;
	va_start(ap, fmt);
	int len = vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	if (len > (int)sizeof(buf) - 1)
		len = sizeof(buf) - 1;
	if (len > 0 && write(STDOUT_FILENO, buf, len) < 0)
		_exit(2);
}

static long long start_us;
static long long sleeper_us;

static void *sleeper(void *arg)
{
	(void)arg;
	long long start = now_us();
	for (int i = 0; i < SLEEPS; i++) {
		struct timespec ts = { .tv_sec = 0, .tv_nsec = SLEEP_NS };
		while (nanosleep(&ts, &ts) < 0)
			;
		say("sched_timers: sleeper woke %d at %lld us\n", i, now_us() - start_us);
	}
	sleeper_us = now_us() - start;
	return NULL;
}

static int ping_pong(void)
{
	int to_child[2], to_parent[2];
	if (pipe(to_child) < 0 || pipe(to_parent) < 0) {
		say("sched_timers: pipe: %m\n");
		return -1;
	}
	pid_t child = fork();
	if (child < 0) {
		say("sched_timers: fork: %m\n");
		return -1;
	}
	if (child == 0) {
		char byte;
		for (int i = 0; i < ROUNDS; i++) {
			if (read(to_child[0], &byte, 1) != 1)
				_exit(1);
			byte++;
			if (i % ROUNDS_PER_LINE == 0)
				say("sched_timers: pong %d at %lld us\n", i, now_us() - start_us);
			if (write(to_parent[1], &byte, 1) != 1)
				_exit(1);
		}
		_exit(0);
	}
	char byte = 0;
	for (int i = 0; i < ROUNDS; i++) {
		if (write(to_child[1], &byte, 1) != 1 || read(to_parent[0], &byte, 1) != 1) {
			say("sched_timers: ping-pong: %m\n");
			return -1;
		}
	}
	int status;
	if (waitpid(child, &status, 0) != child || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
		say("sched_timers: the ping-pong child failed\n");
		return -1;
	}
	/* Each round trip adds one. */
	return (unsigned char)byte;
}

static int disk(void)
{
	static char buf[FILE_BYTES];
	for (size_t i = 0; i < sizeof(buf); i++)
		buf[i] = (char)(i * 7);
	int fd = open(PATH, O_CREAT | O_TRUNC | O_WRONLY, 0644);
	if (fd < 0 || write(fd, buf, sizeof(buf)) != (ssize_t)sizeof(buf) || fsync(fd) < 0) {
		say("sched_timers: write %s: %m\n", PATH);
		return -1;
	}
	close(fd);
	return 0;
}

int main(void)
{
	long long start = start_us = now_us();
	pthread_t thread;
	if (pthread_create(&thread, NULL, sleeper, NULL) != 0) {
		say("sched_timers: pthread_create failed\n");
		return 1;
	}
	long long pong_start = now_us();
	int pongs = ping_pong();
	long long pong_us = now_us() - pong_start;
	long long disk_start = now_us();
	int disk_ok = disk();
	long long disk_us = now_us() - disk_start;
	pthread_join(thread, NULL);
	if (pongs < 0 || disk_ok < 0)
		return 1;
	say("sched_timers: %d sleeps in %lld us, %d round trips (last byte %d) in %lld us, "
	       "%d KiB fsynced in %lld us, %lld us in all\n",
	       SLEEPS, sleeper_us, ROUNDS, pongs, pong_us, FILE_BYTES / 1024, disk_us,
	       now_us() - start);
	return 0;
}
